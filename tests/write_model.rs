//! Writes through the library against an in-memory model.
//!
//! Chains are built by qemu-img/qemu-io; snaptree then applies random
//! writes (odd sizes and offsets), zero writes and discards to the leaf
//! through `Chain`, comparing every byte with the model after each step.
//! At the end `qemu-img check` must find no errors and no leaks, and
//! `qemu-img compare` must find the leaf identical to the model.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::chain::{Chain, OpenOptions};
use snaptree::image::qcow2::create::{create, CreateOptions};
use std::path::Path;
use std::process::Command;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: qemu-img not found; install qemu-utils");
    }
    ok
}

fn sh(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn raw_of(dir: &Path, image: &str) -> Vec<u8> {
    sh(
        dir,
        &["qemu-img", "convert", "-O", "raw", image, "model-init.raw"],
    );
    let v = std::fs::read(dir.join("model-init.raw")).unwrap();
    std::fs::remove_file(dir.join("model-init.raw")).unwrap();
    v
}

/// One random operation; returns a description for failure messages.
fn step(rng: &mut SmallRng, chain: &Chain, model: &mut [u8], cluster: u64) -> String {
    let size = model.len() as u64;
    // Bias offsets and lengths around cluster boundaries, where bugs live.
    let pick_off = |rng: &mut SmallRng| -> u64 {
        match rng.gen_range(0..3) {
            0 => rng.gen_range(0..size),
            1 => rng.gen_range(0..size / cluster) * cluster,
            _ => (rng.gen_range(1..size / cluster) * cluster).saturating_sub(rng.gen_range(1..700)),
        }
    };
    let off = pick_off(rng);
    let max = (size - off).min(3 * cluster + 1000);
    let len = match rng.gen_range(0..3) {
        0 => rng.gen_range(1..=max.min(700)),
        1 => max.min(cluster),
        _ => rng.gen_range(1..=max),
    };
    let range = off as usize..(off + len) as usize;
    match rng.gen_range(0..10) {
        0..=5 => {
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            if rng.gen_bool(0.1) {
                data.fill(0); // a plain write of zero bytes
            }
            chain.write_at(&data, off).unwrap();
            model[range].copy_from_slice(&data);
            format!("write {off}+{len}")
        }
        6..=7 => {
            chain.write_zeroes(off, len).unwrap();
            model[range].fill(0);
            format!("write_zeroes {off}+{len}")
        }
        8 => {
            chain.discard(off, len).unwrap();
            model[range].fill(0);
            format!("discard {off}+{len}")
        }
        _ => {
            chain.flush().unwrap();
            "flush".into()
        }
    }
}

fn check_all(chain: &Chain, model: &[u8], what: &str) {
    let mut got = vec![0u8; model.len()];
    chain.read_at(&mut got, 0).unwrap();
    if got != model {
        let first = got.iter().zip(model).position(|(a, b)| a != b).unwrap();
        panic!(
            "after {what}: byte {first} reads {} but model has {}",
            got[first], model[first]
        );
    }
}

/// Runs `steps` random operations on the chain whose leaf is `leaf`.
fn run_model(dir: &Path, leaf: &str, cluster: u64, steps: usize, seed: u64) {
    let mut model = raw_of(dir, leaf);
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    {
        let chain = Chain::open(dir.join(leaf), &opts).unwrap();
        check_all(&chain, &model, "open");
        let mut rng = SmallRng::seed_from_u64(seed);
        for i in 0..steps {
            let what = step(&mut rng, &chain, &mut model, cluster);
            // Random small reads each step; the whole disk now and then.
            for _ in 0..4 {
                let off = rng.gen_range(0..model.len() as u64);
                let len = rng.gen_range(1..=(model.len() as u64 - off).min(200_000));
                let mut b = vec![0u8; len as usize];
                chain.read_at(&mut b, off).unwrap();
                assert!(
                    b == model[off as usize..(off + len) as usize],
                    "step {i} ({what}): read {off}+{len} differs"
                );
            }
            if i % 10 == 0 {
                check_all(&chain, &model, &format!("step {i} ({what})"));
            }
        }
        check_all(&chain, &model, "last step");
        chain.flush().unwrap();
    }
    // The chain is closed: judge the files with qemu-img.
    let check = Command::new("qemu-img")
        .args(["check", leaf])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check {leaf}: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::write(dir.join("model.raw"), &model).unwrap();
    let cmp = sh(
        dir,
        &[
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            leaf,
            "model.raw",
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    // And reopened by us, read-only, it still matches.
    let chain = Chain::open(dir.join(leaf), &OpenOptions::default()).unwrap();
    check_all(&chain, &model, "reopen");
}

/// `top.qcow2` on `base.qcow2`, made by qemu-img with `-o OPTS`.
fn overlay_on_base(dir: &Path, opts: &str) {
    sh(
        dir,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
}

/// A base with patterned data (and zeros, discards) under `leaf`.
fn base_with_data(dir: &Path, create_opts: &[&str], size: &str) {
    let mut args = vec!["qemu-img", "create", "-q", "-f", "qcow2"];
    args.extend_from_slice(create_opts);
    args.extend_from_slice(&["base.qcow2", size]);
    sh(dir, &args);
    sh(
        dir,
        &[
            "qemu-io",
            "-c",
            "write -P 0x11 0 300k",
            "-c",
            "write -P 0x22 1000k 77k",
            "-c",
            "write -z 1100k 64k",
            "base.qcow2",
        ],
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn overlay_made_by_snaptree_64k() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    base_with_data(d.path(), &[], "2M");
    let mut o = CreateOptions::new(2 << 20);
    o.backing = Some(("base.qcow2".into(), "qcow2".into()));
    create(&d.path().join("top.qcow2"), &o).unwrap();
    // qemu-img accepts what we created before any write.
    sh(d.path(), &["qemu-img", "check", "top.qcow2"]);
    run_model(d.path(), "top.qcow2", 65536, 150, 1);
}

#[test]
fn overlay_by_qemu_v2_512b_clusters() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    base_with_data(d.path(), &["-o", "compat=0.10,cluster_size=512"], "2M");
    overlay_on_base(d.path(), "compat=0.10,cluster_size=512");
    run_model(d.path(), "top.qcow2", 512, 150, 2);
}

#[test]
fn overlay_extended_l2_subclusters() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    base_with_data(d.path(), &[], "2M");
    overlay_on_base(d.path(), "extended_l2=on,cluster_size=64k");
    sh(
        d.path(),
        &[
            "qemu-io",
            "-c",
            "write -P 0x33 2k 2k",
            "-c",
            "write -z 16k 4k",
            "top.qcow2",
        ],
    );
    run_model(d.path(), "top.qcow2", 65536, 150, 3);
}

#[test]
fn refcount_widths_1_and_64_with_small_clusters() {
    if !have_qemu() {
        return;
    }
    for (bits, seed) in [("1", 4u64), ("64", 5)] {
        let d = tmp();
        base_with_data(d.path(), &[], "2M");
        let o = format!("refcount_bits={bits},cluster_size=1k");
        overlay_on_base(d.path(), &o);
        run_model(d.path(), "top.qcow2", 1024, 120, seed);
    }
}

#[test]
fn rewrite_compressed_zstd_image_in_place() {
    if !have_qemu() {
        return;
    }
    let d = tmp();
    base_with_data(d.path(), &[], "2M");
    sh(
        d.path(),
        &[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "base.qcow2",
            "comp.qcow2",
        ],
    );
    run_model(d.path(), "comp.qcow2", 65536, 100, 6);
}

#[test]
fn raw_base_under_overlay_and_refcount_table_growth() {
    if !have_qemu() {
        return;
    }
    // 512-byte clusters make the refcount table grow several times.
    let d = tmp();
    let mut base = vec![0u8; 4 << 20];
    for (i, b) in base.iter_mut().enumerate().skip(1 << 20).take(1 << 20) {
        *b = (i % 251) as u8;
    }
    std::fs::write(d.path().join("base.raw"), &base).unwrap();
    let mut o = CreateOptions::new(4 << 20);
    o.cluster_bits = 9;
    o.backing = Some(("base.raw".into(), "raw".into()));
    create(&d.path().join("top.qcow2"), &o).unwrap();
    {
        let chain = Chain::open(
            d.path().join("top.qcow2"),
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        // Fill the whole disk: thousands of clusters and refcount blocks.
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        chain.write_at(&data, 0).unwrap();
    }
    let check = sh(d.path(), &["qemu-img", "check", "top.qcow2"]);
    assert!(check.contains("No errors"), "{check}");
    run_model(d.path(), "top.qcow2", 512, 80, 7);
}
