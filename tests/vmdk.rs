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
//! Hostile inputs (extent files outside the directory, 10,000 extents,
//! grain tables past the end, aliased grain tables, huge extents, CID
//! mismatches) must fail with a named error and change nothing, and random
//! byte flips of the metadata must never panic.

#[macro_use]
mod common;

use common::qio::{write, zero};
use common::*;
use serde_json::Value;
use snaptree::chain::{Chain, OpenOptions};
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

// ---------------------------------------------------------------------------
// Hostile inputs

/// `snaptree info` and `export` of `img` fail with status 1 and a message
/// containing `want`; no file in `dir` changes.
fn assert_refused(dir: &Path, img: &Path, want: &str) {
    let before = snapshot_dir(dir);
    for args in [
        vec!["info".into(), img.as_os_str().to_owned()],
        vec![
            "export".into(),
            "--quiet".into(),
            "--force".into(),
            img.as_os_str().to_owned(),
            dir.join("refused.raw").into_os_string(),
        ],
    ] {
        let out = snaptree_cmd(&args).output().expect("snaptree");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} (want {want:?}): {err}"
        );
        assert!(err.contains(want), "{args:?}: want {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = fs::remove_file(dir.join("refused.raw"));
    assert_eq!(snapshot_dir(dir), before, "files changed");
}

fn snapshot_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file() && p.metadata().map(|m| m.len()).unwrap_or(0) < 64 * MIB)
        .map(|p| {
            let b = read(&p);
            (p, b)
        })
        .collect();
    v.sort();
    v
}

fn flat_descriptor(extents: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\n# Extent description\n{extents}\n"
    )
}

#[test]
fn extent_files_outside_the_directory_are_refused() {
    let outer = tempdir();
    let dir = outer.path().join("tree");
    fs::create_dir(&dir).unwrap();
    fs::write(outer.path().join("secret-flat.vmdk"), vec![0x5a; 4096]).unwrap();
    fs::write(
        dir.join("up.vmdk"),
        flat_descriptor("RW 8 FLAT \"../secret-flat.vmdk\" 0"),
    )
    .unwrap();
    assert_refused(&dir, &dir.join("up.vmdk"), "outside");
    let abs = outer.path().join("secret-flat.vmdk");
    fs::write(
        dir.join("abs.vmdk"),
        flat_descriptor(&format!("RW 8 FLAT \"{}\" 0", abs.display())),
    )
    .unwrap();
    assert_refused(&dir, &dir.join("abs.vmdk"), "outside");
    std::os::unix::fs::symlink(&abs, dir.join("link-flat.vmdk")).unwrap();
    fs::write(
        dir.join("link.vmdk"),
        flat_descriptor("RW 8 FLAT \"link-flat.vmdk\" 0"),
    )
    .unwrap();
    assert_refused(&dir, &dir.join("link.vmdk"), "outside");
}

#[test]
fn ten_thousand_extents_and_huge_extents_are_refused() {
    let d = tempdir();
    let dir = d.path();
    fs::write(dir.join("x-flat.vmdk"), vec![0; 4096]).unwrap();
    let many: String = (0..10_000)
        .map(|_| "RW 8 FLAT \"x-flat.vmdk\" 0\n")
        .collect();
    fs::write(dir.join("many.vmdk"), flat_descriptor(&many)).unwrap();
    assert_refused(dir, &dir.join("many.vmdk"), "more than 1024 extents");
    fs::write(
        dir.join("huge.vmdk"),
        flat_descriptor("RW 9223372036854775807 FLAT \"x-flat.vmdk\" 0"),
    )
    .unwrap();
    assert_refused(dir, &dir.join("huge.vmdk"), "more than");
    fs::write(
        dir.join("far.vmdk"),
        flat_descriptor("RW 8 FLAT \"x-flat.vmdk\" 999999999999999"),
    )
    .unwrap();
    assert_refused(dir, &dir.join("far.vmdk"), "2^48");
    fs::write(dir.join("noext.vmdk"), flat_descriptor("")).unwrap();
    assert_refused(dir, &dir.join("noext.vmdk"), "no extents");
    fs::write(
        dir.join("twice.vmdk"),
        flat_descriptor("RW 8 FLAT \"x-flat.vmdk\" 0").replace("CID=12345678\n", "CID=1\nCID=2\n"),
    )
    .unwrap();
    assert_refused(dir, &dir.join("twice.vmdk"), "key given twice");
}

/// A monolithicSparse image with one grain written; returns its path and
/// the header fields the tests patch (GD offset, first GT offset).
fn sparse_image(dir: &Path) -> (PathBuf, u64, u64) {
    let img = create(dir, "s.vmdk", "128M", "", None);
    qemu_io(dir, "vmdk", "s.vmdk", &[write(0x71, 0, 64 * KIB)]);
    let b = read(&img);
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) * 512;
    let gt = u32::from_le_bytes(b[gd as usize..gd as usize + 4].try_into().unwrap()) as u64 * 512;
    (img, gd, gt)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let mut b = read(path);
    b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    fs::write(path, b).unwrap();
}

#[test]
fn corrupt_grain_directories_are_refused() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    let (img, gd, _) = sparse_image(dir);
    let good = read(&img);
    // A grain table past the end of the file.
    patch(&img, gd, &0x0fff_ffffu32.to_le_bytes());
    assert_refused(dir, &img, "past the end of the file");
    // Two directory entries sharing one grain table (a "loop" that would
    // alias two ranges of the disk).
    fs::write(&img, &good).unwrap();
    let first = good[gd as usize..gd as usize + 4].to_vec();
    patch(&img, gd + 4, &first);
    assert_refused(dir, &img, "overlapping grain tables");
    // A grain table over the header.
    fs::write(&img, &good).unwrap();
    patch(&img, gd, &1u32.to_le_bytes());
    assert_refused(dir, &img, "overlaps the embedded descriptor");
    // A capacity far past what a sparse extent holds.
    fs::write(&img, &good).unwrap();
    patch(&img, 12, &(1u64 << 40).to_le_bytes());
    assert_refused(dir, &img, "capacity");
    // A grain entry past the end of the file: the open succeeds, the read
    // of that grain fails.
    fs::write(&img, &good).unwrap();
    let gt =
        u32::from_le_bytes(good[gd as usize..gd as usize + 4].try_into().unwrap()) as u64 * 512;
    patch(&img, gt, &0x0fff_ffffu32.to_le_bytes());
    let out = snaptree_cmd(args![
        "export",
        "--quiet",
        "--force",
        &img,
        dir.join("o.raw")
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("outside the grain area"), "{err}");
}

/// Random byte flips in the header, descriptor, grain directory and grain
/// table of a qemu-made image: opening and reading must fail cleanly or
/// succeed, never panic or hang (`SNAPTREE_FUZZ_ITERS`, default 200).
#[test]
fn byte_flips_never_panic() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    let (img, gd, gt) = sparse_image(dir);
    let good = read(&img);
    let iters: u64 = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let regions = [(0u64, 1024u64), (gd, 64), (gt, 512)];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..iters {
        let mut b = good.clone();
        for _ in 0..1 + next() % 4 {
            let (s, l) = regions[(next() % regions.len() as u64) as usize];
            let at = (s + next() % l) as usize;
            b[at] ^= 1 << (next() % 8);
        }
        fs::write(&img, &b).unwrap();
        let r = std::panic::catch_unwind(|| sample(&img));
        match r {
            Ok(Ok(())) => opened += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("panic on a flipped image (kept bytes differ from qemu's)"),
        }
    }
    note(format_args!(
        "{}: {opened} opened, {refused} refused",
        test_name()
    ));
}

fn sample(leaf: &Path) -> Result<(), String> {
    let chain = Chain::open(leaf, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let size = chain.size();
    chain.map(0, size).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size.min(MIB) as usize];
    chain.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    let tail = size - buf.len() as u64;
    chain.read_at(&mut buf, tail).map_err(|e| e.to_string())?;
    Ok(())
}

/// Extent files alone are no disks: a directory scan must not take a
/// twoGbMaxExtentSparse disk's `-s001.vmdk` for one (QEMU refuses them).
#[test]
fn extent_files_are_not_detected_as_disks() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    create(dir, "t.vmdk", "3M", "subformat=twoGbMaxExtentSparse", None);
    create(dir, "f.vmdk", "3M", "subformat=monolithicFlat", None);
    use snaptree::image::probe;
    assert_eq!(
        probe::sniff_image(&dir.join("t.vmdk")).map(|f| f.name()),
        Some("vmdk")
    );
    assert_eq!(
        probe::sniff_image(&dir.join("f.vmdk")).map(|f| f.name()),
        Some("vmdk")
    );
    assert_eq!(probe::sniff_image(&dir.join("t-s001.vmdk")), None);
    assert_eq!(probe::sniff_image(&dir.join("f-flat.vmdk")), None);
}
