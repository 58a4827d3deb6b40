//! The deep-chain test: 10,000 qcow2 images, each backed by the previous.
//!
//! Why a module of its own: this is a scenario rather than a table of
//! cases. It needs a chain far deeper than qemu-img could build in time
//! (two images come from qemu-img, the rest are byte-for-byte clones with
//! the backing name patched), and it checks more than a refusal: that the
//! error names the depth cap, that `--max-depth` moves the cap, that a
//! chain within the cap works, and that all of it is fast.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::contract::{assert_refused, decimal_tokens, Expect};
use crate::fixtures::{create_overlay, create_qcow2, qemu_io, tempdir};
use crate::outcome::snaptree;
use crate::qcow2::Header;
use crate::report::{Report, READS_FAIL};

const DEEP_CHAIN: usize = 10_000;

/// The whole deep-chain test (see the test function's doc).
pub fn fails_fast_at_depth_cap() {
    let started = Instant::now();
    let dir = tempdir();
    let mut report = Report::default();
    let h = build_chain(dir.path(), DEEP_CHAIN);
    eprintln!(
        "built a {DEEP_CHAIN}-image chain in {:?}",
        started.elapsed()
    );
    let layer = |i: usize| dir.path().join(chain_name(i));
    let leaf = layer(DEEP_CHAIN - 1);
    let watched: Vec<PathBuf> = [0, 1, DEEP_CHAIN - 1025, DEEP_CHAIN - 2, DEEP_CHAIN - 1]
        .map(layer)
        .to_vec();
    let watched_refs: Vec<&Path> = watched.iter().map(PathBuf::as_path).collect();
    let chain_files: Vec<PathBuf> = (0..DEEP_CHAIN).map(layer).collect();
    let chain_refs: Vec<&Path> = chain_files.iter().map(PathBuf::as_path).collect();

    // Default cap: 1024 layers; the message must say so.
    let exp = Expect {
        paths: &chain_refs,
        offsets: &h.backing_offsets(),
        words: &["deep", "depth"],
    };
    report.check_inputs("default cap", &leaf, &[], &READS_FAIL, &exp, &watched_refs);
    let out = snaptree(&args!["map", leaf, "--output", "json"]);
    assert!(
        decimal_tokens(&out.stderr).contains(&1024),
        "depth error does not name the cap 1024\n{}",
        out.describe()
    );

    // An explicit cap is honoured and named too.
    let ten = layer(9);
    let out = snaptree(&args!["map", ten, "--output", "json", "--max-depth", "8"]);
    assert_refused(&out, &exp);
    assert!(
        decimal_tokens(&out.stderr).contains(&8),
        "depth error does not name the cap 8\n{}",
        out.describe()
    );
    report.check_inputs(
        "--max-depth 8, 10 layers",
        &ten,
        &["--max-depth", "8"],
        &READS_FAIL,
        &exp,
        &watched_refs,
    );

    // ...and a chain within the cap works.
    let six = layer(5);
    let out = snaptree(&args!["map", six, "--output", "json", "--max-depth", "8"]);
    assert!(
        out.code == Some(0),
        "6-layer chain with --max-depth 8 should map\n{}",
        out.describe()
    );
    assert!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok(),
        "map --output json printed no valid JSON\n{}",
        out.describe()
    );
    let elapsed = started.elapsed();
    eprintln!("deep-chain test took {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(60),
        "deep-chain test took {elapsed:?} (limit 60 s)"
    );
    report.finish();
}

/// File name of layer `i` of [`build_chain`]'s chain.
pub fn chain_name(i: usize) -> String {
    format!("c{i:05}.qcow2")
}

/// Builds c00000.qcow2 <- c00001.qcow2 <- ... <- c{n-1}.qcow2: two images
/// from qemu-img, the rest cloned from the second with the (same-length)
/// backing name patched in place. Returns the header of an overlay.
pub fn build_chain(dir: &Path, n: usize) -> Header {
    let base = dir.join(chain_name(0));
    create_qcow2(&base, "cluster_size=512", "1M");
    qemu_io(&base, &["write -P 0x01 0 512"]);
    let second = dir.join(chain_name(1));
    create_overlay(&second, &chain_name(0), "cluster_size=512");
    let template = fs::read(&second).expect("read chain template");
    let h = Header::read(&second);
    assert_eq!(h.backing_file_size as usize, chain_name(0).len());
    let at = h.backing_file_offset as usize;
    for i in 2..n {
        let mut bytes = template.clone();
        bytes[at..at + chain_name(0).len()].copy_from_slice(chain_name(i - 1).as_bytes());
        fs::write(dir.join(chain_name(i)), bytes).expect("write chain layer");
    }
    h
}
