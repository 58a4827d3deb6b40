//! Writing VMDK leaves through the library, judged by QEMU and libvmdk.
//!
//! For every kind snaptree writes (monolithicSparse with and without zero
//! grains, twoGbMaxExtentSparse, monolithicFlat, twoGbMaxExtentFlat), as a
//! base and as a sparse delta over a qemu-written parent: random writes
//! and zero writes (unaligned, across grains and extents, whole grains)
//! go to the chain and to a model; after the chain is closed, `qemu-img
//! convert` must read the model, `qemu-img check` must find the image
//! clean, `vmdkinfo` must accept it, the CID must have changed, and the
//! parent's files must not have. Kinds snaptree does not write refuse a
//! writable open naming the reason, changing nothing. A child made by
//! snaptree's `create` over a written leaf is read by QEMU and libvmdk
//! with the right parentCID and parentFileNameHint.

#[macro_use]
mod common;

use common::qio::write;
use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::chain::{Chain, OpenOptions};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

const GIB: u64 = 1 << 30;

fn qemu_io(dir: &Path, name: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "vmdk"]);
    for w in cmds {
        c.arg("-c").arg(w);
    }
    run(c.arg(name));
}

fn create(dir: &Path, name: &str, opts: &str, size: Option<u64>, parent: Option<&str>) {
    let mut a: Vec<String> = ["create", "-q", "-f", "vmdk"].map(String::from).into();
    if !opts.is_empty() {
        a.extend(["-o".into(), opts.into()]);
    }
    if let Some(p) = parent {
        a.extend(["-b".into(), p.into(), "-F".into(), "vmdk".into()]);
    }
    a.push(name.into());
    if let Some(s) = size {
        a.push(s.to_string());
    }
    qemu_img(dir, &a);
}

/// The model of a disk: a sparse raw file, first what `qemu-img convert`
/// reads from `name`, then every write applied to it.
fn model_of(dir: &Path, name: &str) -> File {
    let out = dir.join("model.raw");
    let _ = fs::remove_file(&out);
    qemu_img(dir, args!["convert", "-f", "vmdk", "-O", "raw", name, &out]);
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&out)
        .unwrap()
}

fn cid(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap())
        .lines()
        .find_map(|l| l.strip_prefix("CID=").map(str::to_string))
        .expect("CID")
}

fn all_bytes(dir: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .map(|p| (p.display().to_string(), fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Random writes and zero writes into `leaf`'s chain and `model`.
fn write_randomly(leaf: &Path, model: &File, seed: u64, grain: u64) {
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let chain = Chain::open(leaf, &opts).unwrap_or_else(|e| panic!("open {}: {e}", leaf.display()));
    let size = model.metadata().unwrap().len();
    let mut rng = SmallRng::seed_from_u64(seed);
    for n in 0..40u32 {
        let (off, len) = match n % 4 {
            // Whole grains.
            0 => {
                let g = rng.gen_range(0..size / grain);
                (g * grain, grain.min(size - g * grain))
            }
            // Across a 2 GiB extent boundary where there is one.
            1 if size > 2 * GIB => (
                2 * GIB - rng.gen_range(1..3 * grain),
                rng.gen_range(1..5 * grain),
            ),
            _ => {
                let off = rng.gen_range(0..size - 1);
                (off, rng.gen_range(1..(3 * grain).min(size - off)))
            }
        };
        if rng.gen_bool(0.25) {
            chain.write_zeroes(off, len).unwrap();
            model.write_all_at(&vec![0; len as usize], off).unwrap();
        } else {
            let byte = rng.gen::<u8>() | 1;
            let data = vec![byte; len as usize];
            chain.write_at(&data, off).unwrap();
            model.write_all_at(&data, off).unwrap();
        }
    }
    chain.flush().unwrap();
}

/// `qemu-img compare` of the model with `name`, `qemu-img check` and
/// `vmdkinfo` of `name`.
fn judge(dir: &Path, name: &str) {
    qemu_img(
        dir,
        [
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "vmdk",
            "model.raw",
            name,
        ],
    );
    qemu_img(dir, ["check", "-q", "-f", "vmdk", name]);
    if let Ok(out) = Command::new("vmdkinfo").arg(dir.join(name)).output() {
        assert!(out.status.success(), "vmdkinfo {name}: {out:?}");
    }
}

fn kind(sub: &str, size: u64, grain: u64, seed: u64) {
    require_qemu!();
    let d = TempDir::with_prefix("snaptree-vmdk-write-").unwrap();
    let dir = d.path();
    let opts = if sub.is_empty() {
        String::new()
    } else {
        format!("subformat={sub}")
    };
    // A base written by snaptree.
    create(dir, "base.vmdk", &opts, Some(size), None);
    qemu_io(
        dir,
        "base.vmdk",
        &[write(0x11, 0, 3 * grain), write(0x12, size - 5000, 5000)],
    );
    let model = model_of(dir, "base.vmdk");
    let before = cid(&dir.join("base.vmdk"));
    write_randomly(&dir.join("base.vmdk"), &model, seed, grain);
    judge(dir, "base.vmdk");
    assert_ne!(
        cid(&dir.join("base.vmdk")),
        before,
        "the CID did not change"
    );
    // A delta of the same kind (flat kinds: a sparse one) written by
    // snaptree; its parent does not change.
    let child_opts = if sub.contains("Flat") {
        ""
    } else {
        opts.as_str()
    };
    create(dir, "child.vmdk", child_opts, None, Some("base.vmdk"));
    let parent = all_bytes(dir, "base");
    write_randomly(&dir.join("child.vmdk"), &model, seed + 1, grain);
    judge(dir, "child.vmdk");
    assert!(all_bytes(dir, "base") == parent, "the parent changed");
}

#[test]
fn monolithic_sparse_writes() {
    kind("", 32 * MIB + 512, 65536, 1);
}

#[test]
fn zeroed_grain_sparse_writes() {
    kind("monolithicSparse,zeroed_grain=on", 32 * MIB, 65536, 2);
}

#[test]
fn two_gb_max_extent_sparse_writes() {
    kind("twoGbMaxExtentSparse", 2 * GIB + 32 * MIB, 65536, 3);
}

#[test]
fn monolithic_flat_writes() {
    kind("monolithicFlat", 16 * MIB, 65536, 4);
}

#[test]
fn two_gb_max_extent_flat_writes() {
    kind("twoGbMaxExtentFlat", 2 * GIB + 16 * MIB, 65536, 5);
}

/// streamOptimized is read-only: a writable open is refused with the
/// reason and changes nothing.
#[test]
fn stream_optimized_refuses_writes() {
    require_qemu!();
    let d = TempDir::with_prefix("snaptree-vmdk-write-").unwrap();
    let dir = d.path();
    qemu_img(dir, ["create", "-q", "-f", "raw", "r.raw", "4M"]);
    qemu_img(
        dir,
        [
            "convert",
            "-q",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "r.raw",
            "s.vmdk",
        ],
    );
    let before = fs::read(dir.join("s.vmdk")).unwrap();
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let err = Chain::open(dir.join("s.vmdk"), &opts)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("read-only") && err.contains("compressed"),
        "{err}"
    );
    assert_eq!(fs::read(dir.join("s.vmdk")).unwrap(), before);
}

/// A delta made by snaptree (`create_child`, as `ctl snapshot` makes it)
/// over a written leaf: QEMU and libvmdk read the chain, with the
/// parent's CID as parentCID and the given name as parentFileNameHint.
#[test]
fn created_child_is_read_by_qemu_and_libvmdk() {
    require_qemu!();
    let d = TempDir::with_prefix("snaptree-vmdk-write-").unwrap();
    let dir = d.path();
    create(
        dir,
        "p.vmdk",
        "subformat=twoGbMaxExtentSparse",
        Some(3 * GIB + 512),
        None,
    );
    qemu_io(dir, "p.vmdk", &[write(0x21, GIB, 3 * MIB)]);
    let model = model_of(dir, "p.vmdk");
    let size = model.metadata().unwrap().len();
    let like = snaptree::ownership::Ownership::of(&dir.join("p.vmdk")).unwrap();
    snaptree::image::vmdk::create::create_child(
        &dir.join("c.vmdk"),
        &dir.join("p.vmdk"),
        "p.vmdk",
        size,
        &like,
    )
    .unwrap();
    let info = qemu_img(dir, ["info", "--output=json", "c.vmdk"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["backing-filename"], "p.vmdk", "{v}");
    assert_eq!(v["virtual-size"].as_u64(), Some(size));
    judge(dir, "c.vmdk");
    let parent_cid = u32::from_str_radix(&cid(&dir.join("p.vmdk")), 16).unwrap();
    let text = String::from_utf8_lossy(&fs::read(dir.join("c.vmdk")).unwrap()).into_owned();
    assert!(
        text.contains(&format!("parentCID={parent_cid:08x}\n")),
        "parent CID {parent_cid:08x}"
    );
    assert!(
        text.contains("parentFileNameHint=\"p.vmdk\"\n"),
        "parentFileNameHint"
    );
    write_randomly(&dir.join("c.vmdk"), &model, 9, 65536);
    judge(dir, "c.vmdk");
    // A write to the parent now changes its CID: QEMU and snaptree refuse
    // the child.
    qemu_io(dir, "p.vmdk", &[write(0x22, 0, 512)]);
    let out = snaptree_cmd(args!["info", dir.join("c.vmdk")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("parent CID mismatch"),
        "{out:?}"
    );
}
