//! Random byte flips: the seed images, where flips matter most, and the
//! flips themselves.
//!
//! Why a fuzzer beside the hand-written cases: those cover the corruptions
//! someone thought of. Flips, most of them aimed at metadata (header,
//! extensions, L1/L2 and refcount tables), find the ones nobody did. The
//! rest land anywhere, data included. Each flipped image goes through
//! `info`, `info --json`, `map` and `export`; exit 1 is a fine answer, a
//! crash, a hang or a change to the input file is not.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::contract::{crash_problem, FileState};
use crate::fixtures::{create_overlay, create_qcow2, qemu_io};
use crate::outcome::snaptree_with_timeout;
use crate::qcow2::{
    be32, be64, OFFSET_MASK, OFF_BACKING_FILE_OFFSET, OFF_BACKING_FILE_SIZE, OFF_CLUSTER_BITS,
    OFF_HEADER_LENGTH, OFF_L1_SIZE, OFF_L1_TABLE_OFFSET, OFF_REFCOUNT_TABLE_OFFSET, OFF_VERSION,
};

/// Name of the backing file the seed images share (kept with a failing
/// case, which needs it).
pub const SEED_BASE: &str = "fbase.qcow2";

/// Small valid images for the fuzzer: mostly 512-byte clusters, so that the
/// files are tiny and flips land in metadata.
pub fn fuzz_seeds(dir: &Path) -> Vec<PathBuf> {
    let base = dir.join(SEED_BASE);
    create_qcow2(&base, "cluster_size=512", "256K");
    qemu_io(&base, &["write -P 0x33 0 8k", "write -P 0x44 128k 1k"]);

    let v3 = dir.join("fv3.qcow2");
    create_overlay(&v3, SEED_BASE, "cluster_size=512");
    qemu_io(
        &v3,
        &[
            "write -P 0x11 0 4k",
            "write -z 8k 2k",
            "write -c -P 0x22 64k 512",
            "write -c -P 0x23 66048 512",
            "write -P 0x55 200k 3k",
        ],
    );

    let v2 = dir.join("fv2.qcow2");
    create_qcow2(&v2, "cluster_size=512,compat=0.10", "256K");
    qemu_io(
        &v2,
        &[
            "write -P 0x66 0 2k",
            "write -c -P 0x77 32k 512",
            "write -P 0x88 100k 1k",
        ],
    );
    // Subclusters (extended L2 entries) and zstd.
    let ext = dir.join("fext.qcow2");
    create_overlay(
        &ext,
        SEED_BASE,
        "cluster_size=16k,extended_l2=on,compression_type=zstd",
    );
    qemu_io(
        &ext,
        &[
            "write -P 0x99 1k 1k",
            "write -z 20k 1k",
            "write -c -P 0xaa 64k 16k",
            "write -P 0xbb 130k 3k",
        ],
    );
    vec![v3, v2, ext]
}

/// Byte ranges of a valid qcow2 holding metadata: header fields, header
/// extensions and backing name, L1 table, L2 tables, refcount table.
pub fn metadata_ranges(b: &[u8]) -> Vec<Range<usize>> {
    let cluster = 1usize << be32(b, OFF_CLUSTER_BITS);
    let version = be32(b, OFF_VERSION);
    let header_len = if version >= 3 {
        be32(b, OFF_HEADER_LENGTH) as usize
    } else {
        72
    };
    let mut ranges = Vec::new();
    ranges.push(0..header_len);
    // Extensions follow the header up to the backing name (or a short way).
    let bfo = be64(b, OFF_BACKING_FILE_OFFSET) as usize;
    let bfs = be32(b, OFF_BACKING_FILE_SIZE) as usize;
    let ext_end = if bfo > 0 { bfo + bfs } else { header_len + 256 };
    ranges.push(header_len..ext_end.min(cluster));
    let l1 = be64(b, OFF_L1_TABLE_OFFSET) as usize;
    let l1_size = be32(b, OFF_L1_SIZE) as usize;
    ranges.push(l1..l1 + 8 * l1_size);
    for i in 0..l1_size {
        let l2 = (be64(b, (l1 + 8 * i) as u64) & OFFSET_MASK) as usize;
        if l2 != 0 {
            ranges.push(l2..l2 + cluster);
        }
    }
    let rt = be64(b, OFF_REFCOUNT_TABLE_OFFSET) as usize;
    ranges.push(rt..rt + cluster);
    ranges.retain(|r| r.start < r.end && r.end <= b.len());
    ranges
}

/// Flips 1 to 4 bytes of `bytes`, most of them inside `hot` (metadata
/// ranges); returns a log of the flips (`pos:old->new`).
pub fn flip_bytes(rng: &mut SmallRng, bytes: &mut [u8], hot: &[Range<usize>]) -> Vec<String> {
    let flips = rng.gen_range(1..=4);
    let mut log = Vec::new();
    for _ in 0..flips {
        // Most flips land in metadata, where they matter.
        let pos = if rng.gen_bool(0.65) {
            let r = &hot[rng.gen_range(0..hot.len())];
            rng.gen_range(r.clone())
        } else {
            rng.gen_range(0..bytes.len())
        };
        let old = bytes[pos];
        bytes[pos] = match rng.gen_range(0..4) {
            0 => old ^ (1 << rng.gen_range(0..8)),
            1 => 0xff,
            2 => 0x00,
            _ => old ^ rng.gen_range(1..=255u8),
        };
        log.push(format!("{pos}:{old:#04x}->{:#04x}", bytes[pos]));
    }
    log
}

/// What [`run`] found.
pub struct Findings {
    /// snaptree runs made.
    pub runs: usize,
    /// Runs that refused their input with exit status 1.
    pub refused: usize,
    /// One description per failing iteration.
    pub failures: Vec<String>,
}

/// Flips bytes of the seed images (built in `dir`) `iterations` times, with
/// the RNG seeded by `seed`, and runs snaptree on each result. Stops after
/// `max_reported` failing iterations; the image of each one is kept under
/// `keep` (with the seeds' backing file) for a rerun by hand.
pub fn run(dir: &Path, iterations: usize, seed: u64, max_reported: usize, keep: &Path) -> Findings {
    let seeds = fuzz_seeds(dir);
    let seed_bytes: Vec<Vec<u8>> = seeds
        .iter()
        .map(|p| fs::read(p).expect("read seed image"))
        .collect();
    let hot: Vec<_> = seed_bytes.iter().map(|b| metadata_ranges(b)).collect();
    let mut rng = SmallRng::seed_from_u64(seed);
    let img = dir.join("fuzz.qcow2");
    let out_file = dir.join("fuzz.raw");
    let mut found = Findings {
        runs: 0,
        refused: 0,
        failures: Vec::new(),
    };
    for iter in 0..iterations {
        let which = iter % seeds.len();
        let mut bytes = seed_bytes[which].clone();
        let log = flip_bytes(&mut rng, &mut bytes, &hot[which]);
        fs::write(&img, &bytes).expect("write fuzzed image");
        let commands = [
            args!["info", img].to_vec(),
            args!["info", img, "--json"].to_vec(),
            args!["map", img, "--output", "json"].to_vec(),
            args!["export", img, out_file].to_vec(),
        ];
        for args in commands {
            let state = FileState::capture(&img);
            let out = snaptree_with_timeout(&args, Duration::from_secs(20));
            let _ = fs::remove_file(&out_file);
            found.runs += 1;
            if out.code == Some(1) {
                found.refused += 1;
            }
            let problem = crash_problem(&out).or_else(|| state.changed());
            if let Some(problem) = problem {
                let _ = fs::create_dir_all(keep);
                let kept = keep.join(format!(
                    "iter{iter}-{}",
                    seeds[which].file_name().unwrap().to_string_lossy()
                ));
                let _ = fs::write(&kept, &bytes);
                let _ = fs::copy(dir.join(SEED_BASE), keep.join(SEED_BASE));
                found.failures.push(format!(
                    "iteration {iter} (seed image {}, flips {}), kept as {}: {problem}\n{}",
                    seeds[which].display(),
                    log.join(" "),
                    kept.display(),
                    out.describe()
                ));
                break;
            }
        }
        if found.failures.len() >= max_reported {
            break;
        }
    }
    found
}
