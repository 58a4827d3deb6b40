//! VMDK read side against real peers.
//!
//! qemu-img makes every subformat it can (monolithicSparse,
//! twoGbMaxExtentSparse, monolithicFlat, twoGbMaxExtentFlat; streamOptimized
//! by converting a raw disk qemu-io wrote) and children with `-b parent -F
//! vmdk`; qemu-io writes data. Every layer's flattened disk (`snaptree
//! export`) must equal `qemu-img convert -O raw` byte for byte, `snaptree
//! map` must agree with `qemu-img map --output=json` (present, zero, data,
//! depth), and libvmdk's `vmdkinfo` (when installed) must accept the image.
//! qemu-img does not make `vmfs` descriptors, so one is written here the
//! way ESXi writes it (a VMFS extent on a `-flat.vmdk`) and judged by qemu.
//! A parent written after its child was made is refused ("parent CID
//! mismatch", both values). Hostile inputs are in `vmdk_hostile.rs`.

#[macro_use]
mod common;

use common::qio::{write, zero};
use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Helpers

fn tempdir() -> TempDir {
    TempDir::with_prefix("snaptree-vmdk-").expect("temp dir")
}

/// `qemu-img create -q -f vmdk [-o OPTS] [-b PARENT -F vmdk] NAME SIZE`.
fn create(dir: &Path, name: &str, size: &str, opts: &str, parent: Option<&str>) -> PathBuf {
    let mut args: Vec<String> = ["create", "-q", "-f", "vmdk"].map(String::from).into();
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    if let Some(p) = parent {
        args.extend(["-b".into(), p.into(), "-F".into(), "vmdk".into()]);
    }
    args.push(name.into());
    if !size.is_empty() {
        args.push(size.into());
    }
    qemu_img(dir, &args);
    dir.join(name)
}

/// `qemu-io -f FORMAT -c CMD... NAME` in `dir`.
fn qemu_io(dir: &Path, format: &str, name: &str, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", format]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(name);
    run(&mut cmd);
}

fn qemu_virtual_size(dir: &Path, name: &str) -> u64 {
    let out = qemu_img(dir, ["info", "--output=json", "-f", "vmdk", name]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// `vmdkinfo IMG` must succeed (when libvmdk-utils is installed).
fn vmdkinfo_accepts(img: &Path) {
    let Ok(out) = Command::new("vmdkinfo").arg(img).output() else {
        note(format_args!(
            "{}: vmdkinfo not installed, libvmdk not asked",
            test_name()
        ));
        return;
    };
    assert!(
        out.status.success(),
        "vmdkinfo {} failed:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The export, the map and the size of `name` must equal qemu's, and
/// libvmdk must accept it.
fn assert_matches_qemu(dir: &Path, name: &str) {
    let img = dir.join(name);
    let want = dir.join(format!("{name}.qemu.raw"));
    qemu_img(
        dir,
        args!["convert", "-f", "vmdk", "-O", "raw", name, &want],
    );
    let got = dir.join(format!("{name}.snaptree.raw"));
    snaptree(args!["export", "--quiet", "--force", img, got]);
    assert_same_file(&want, &got);
    fs::remove_file(&want).ok();
    fs::remove_file(&got).ok();
    let size = qemu_virtual_size(dir, name);
    let parse = |out: std::process::Output, who: &str| {
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let entries = parse_map(&json).unwrap_or_else(|e| panic!("{who} map: {e}\n{json}"));
        extents(&entries, size).unwrap_or_else(|e| panic!("{who} map: {e}\n{json}"))
    };
    let qemu = parse(
        qemu_img(dir, ["map", "--output=json", "-f", "vmdk", name]),
        "qemu-img",
    );
    let ours = parse(snaptree(args!["map", "--output", "json", img]), "snaptree");
    let mismatches = diff_extents(&qemu, &ours);
    assert!(
        mismatches.is_empty(),
        "{name}: snaptree map differs from qemu-img map:\n{}",
        format_mismatches(&mismatches)
    );
    let out = snaptree(args!["info", "--json", img]);
    let info: Value = serde_json::from_slice(&out.stdout).expect("snaptree info JSON");
    assert_eq!(info["virtual_size"].as_u64(), Some(size), "{name}: {info}");
    assert_eq!(info["chain"][0]["format"], "vmdk", "{info}");
    vmdkinfo_accepts(&img);
}

/// Writes that matter on a disk of `size` bytes: unaligned, across a grain,
/// zeros, across the 2 GiB extent boundary when there is one, the end.
fn writes_for(size: u64, pattern: u8) -> Vec<String> {
    let mut w = vec![
        write(pattern, 0, 512),
        write(pattern + 1, 1000, 3000),
        write(pattern + 2, 64 * KIB - 4096, 8192),
        zero(3 * MIB, MIB),
        write(pattern + 3, 3 * MIB + 512, 100),
    ];
    if size > 2 * GIB + MIB {
        w.push(write(pattern + 4, 2 * GIB - 100 * KIB, 200 * KIB));
    }
    w.push(write(pattern + 5, size - 1000, 1000));
    w
}

const GIB: u64 = 1 << 30;

/// Bytes of the file, or a panic naming it.
fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Subformats qemu-img makes

fn subformat_with_child(sub: &str, size: u64) {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    create(
        dir,
        "base.vmdk",
        &size.to_string(),
        &format!("subformat={sub}"),
        None,
    );
    qemu_io(dir, "vmdk", "base.vmdk", &writes_for(size, 0x10));
    assert_matches_qemu(dir, "base.vmdk");
    // A hosted sparse child (QEMU's default) and one of the same kind.
    create(dir, "child.vmdk", "", "", Some("base.vmdk"));
    qemu_io(
        dir,
        "vmdk",
        "child.vmdk",
        &[
            write(0x77, 512, 1024),
            zero(3 * MIB + 4096, 8192),
            write(0x78, size - 70 * KIB, 70 * KIB),
        ],
    );
    assert_matches_qemu(dir, "child.vmdk");
    // QEMU makes no flat children; a twoGbMaxExtentSparse one then.
    let grandchild = if sub.contains("Flat") {
        "twoGbMaxExtentSparse"
    } else {
        sub
    };
    create(
        dir,
        "grandchild.vmdk",
        "",
        &format!("subformat={grandchild}"),
        Some("child.vmdk"),
    );
    qemu_io(
        dir,
        "vmdk",
        "grandchild.vmdk",
        &[write(0x79, 64 * KIB, 64 * KIB)],
    );
    assert_matches_qemu(dir, "grandchild.vmdk");
    // The parent is still what it was.
    assert_matches_qemu(dir, "base.vmdk");
}

#[test]
fn monolithic_sparse_and_children() {
    subformat_with_child("monolithicSparse", 64 * MIB + 4096);
}

#[test]
fn two_gb_max_extent_sparse_and_children() {
    subformat_with_child("twoGbMaxExtentSparse", 2 * GIB + 64 * MIB);
}

#[test]
fn monolithic_flat_and_children() {
    subformat_with_child("monolithicFlat", 64 * MIB);
}

#[test]
fn two_gb_max_extent_flat_and_children() {
    subformat_with_child("twoGbMaxExtentFlat", 2 * GIB + 64 * MIB);
}

/// Zero grains (`zeroed_grain=on`): zero writes become grain-table
/// entries of 1, which read as zeros over a parent's data.
#[test]
fn zeroed_grains_hide_the_parent() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    create(dir, "base.vmdk", "32M", "zeroed_grain=on", None);
    qemu_io(dir, "vmdk", "base.vmdk", &[write(0x21, 0, 4 * MIB)]);
    create(dir, "child.vmdk", "", "zeroed_grain=on", Some("base.vmdk"));
    qemu_io(
        dir,
        "vmdk",
        "child.vmdk",
        &[zero(MIB, MIB), write(0x22, 3 * MIB, 4096)],
    );
    assert_matches_qemu(dir, "child.vmdk");
    let out = snaptree(args!["map", "--output", "json", dir.join("child.vmdk")]);
    let entries = parse_map(&String::from_utf8_lossy(&out.stdout)).expect("map");
    assert_map_has(&entries, "a zero grain in the child", |e| {
        e.depth == 0 && e.present && e.zero && !e.data
    });
}

/// streamOptimized: a raw disk written by qemu-io, converted; and a sparse
/// child on it.
#[test]
fn stream_optimized_and_child() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    let size = 40 * MIB + 512;
    qemu_img(
        dir,
        ["create", "-q", "-f", "raw", "src.raw", &size.to_string()],
    );
    let mut w = writes_for(size, 0x30);
    w.push(write(0x3f, 10 * MIB, 3 * MIB));
    qemu_io(dir, "raw", "src.raw", &w);
    qemu_img(
        dir,
        [
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "src.raw",
            "base.vmdk",
        ],
    );
    assert_matches_qemu(dir, "base.vmdk");
    assert_same_file(&dir.join("src.raw"), &export(&dir.join("base.vmdk")));
    let out = snaptree(args!["map", "--output", "json", dir.join("base.vmdk")]);
    let entries = parse_map(&String::from_utf8_lossy(&out.stdout)).expect("map");
    assert_map_has(&entries, "compressed grains", |e| e.compressed);
    create(dir, "child.vmdk", "", "", Some("base.vmdk"));
    qemu_io(
        dir,
        "vmdk",
        "child.vmdk",
        &[write(0x40, 10 * MIB + 100, 5000)],
    );
    assert_matches_qemu(dir, "child.vmdk");
}

fn export(img: &Path) -> PathBuf {
    let out = PathBuf::from(format!("{}.export.raw", img.display()));
    snaptree(args!["export", "--quiet", "--force", img, out]);
    out
}

/// ESXi's `vmfs`: a descriptor naming a `-flat.vmdk` with a VMFS extent
/// line (qemu-img does not make these); plus a sparse child on it.
#[test]
fn vmfs_flat_descriptor_written_like_esxi() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    let size = 16 * MIB;
    qemu_img(
        dir,
        [
            "create",
            "-q",
            "-f",
            "raw",
            "disk-flat.vmdk",
            &size.to_string(),
        ],
    );
    qemu_io(dir, "raw", "disk-flat.vmdk", &writes_for(size, 0x50));
    fs::write(
        dir.join("disk.vmdk"),
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
             isNativeSnapshot=\"no\"\ncreateType=\"vmfs\"\n\n# Extent description\n\
             RW {} VMFS \"disk-flat.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"2\"\n\
             ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n\
             ddb.longContentID = \"0123456789abcdef0123456789abcdef\"\n\
             ddb.uuid = \"60 00 C2 9b 2b 8a 2e 6c-3f 9b 1e 2a 3c 6b 66 5a\"\n\
             ddb.virtualHWVersion = \"13\"\n",
            size / 512
        ),
    )
    .expect("write descriptor");
    assert_matches_qemu(dir, "disk.vmdk");
    create(dir, "disk-000001.vmdk", "", "", Some("disk.vmdk"));
    qemu_io(
        dir,
        "vmdk",
        "disk-000001.vmdk",
        &[write(0x5f, 5 * MIB, 4096)],
    );
    assert_matches_qemu(dir, "disk-000001.vmdk");
    let out = snaptree(args!["info", dir.join("disk.vmdk")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("createType vmfs") && text.contains("adapter lsilogic"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Parent checks

/// A parent written after its child was made gets a new CID: QEMU then
/// refuses to read the child, and so does snaptree, naming both CIDs.
#[test]
fn parent_cid_mismatch_is_refused_with_both_values() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    create(dir, "base.vmdk", "8M", "", None);
    qemu_io(dir, "vmdk", "base.vmdk", &[write(0x61, 0, 4096)]);
    create(dir, "child.vmdk", "", "", Some("base.vmdk"));
    let before = read(&dir.join("base.vmdk"));
    let expected = descriptor_value(&read(&dir.join("child.vmdk")), "parentCID");
    // Writing the parent gives it a new CID.
    qemu_io(dir, "vmdk", "base.vmdk", &[write(0x62, 0, 4096)]);
    let found = descriptor_value(&read(&dir.join("base.vmdk")), "CID");
    assert_ne!(expected, found, "qemu-io did not change the parent's CID");
    let q = Command::new("qemu-img")
        .current_dir(dir)
        .args(["convert", "-O", "raw", "child.vmdk", "q.raw"])
        .output()
        .expect("qemu-img");
    assert!(
        !q.status.success(),
        "qemu-img read through a changed parent"
    );
    let child_bytes = read(&dir.join("child.vmdk"));
    let parent_bytes = read(&dir.join("base.vmdk"));
    let out = snaptree_cmd(args![
        "export",
        "--quiet",
        "--force",
        dir.join("child.vmdk"),
        dir.join("x.raw")
    ])
    .output()
    .expect("snaptree");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("parent CID mismatch") && err.contains(&expected) && err.contains(&found),
        "want both CIDs ({expected}, {found}) in: {err}"
    );
    assert_eq!(read(&dir.join("child.vmdk")), child_bytes, "child changed");
    assert_eq!(read(&dir.join("base.vmdk")), parent_bytes, "parent changed");
    drop(before);
}

/// `KEY=value` from the descriptor in `bytes` (embedded or not).
fn descriptor_value(bytes: &[u8], key: &str) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in descriptor"))
        .trim()
        .to_string()
}
