//! Hostile VMDKs: extent files outside the directory (relative, absolute,
//! through a symlink), 10,000 extents, huge and far extents, keys given
//! twice, grain tables past the end of the file, aliased grain tables (a
//! directory "loop"), tables over the descriptor, grains past the end;
//! each fails with a named error (file, offset, what) and changes no
//! file. Random byte flips of a qemu-made image's header, descriptor,
//! grain directory and grain table never panic (`SNAPTREE_FUZZ_ITERS`).

#[macro_use]
mod common;

use common::qio::write;
use common::*;
use snaptree::chain::{Chain, OpenOptions};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

fn tempdir() -> TempDir {
    TempDir::with_prefix("snaptree-vmdk-").expect("temp dir")
}

/// `qemu-img create -q -f vmdk NAME SIZE` in `dir`.
fn create(dir: &Path, name: &str, size: &str) -> PathBuf {
    qemu_img(dir, ["create", "-q", "-f", "vmdk", name, size]);
    dir.join(name)
}

/// `qemu-io -f vmdk -c CMD... NAME` in `dir`.
fn qemu_io(dir: &Path, name: &str, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", "vmdk"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(name));
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
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
    let img = create(dir, "s.vmdk", "128M");
    qemu_io(dir, "s.vmdk", &[write(0x71, 0, 64 * KIB)]);
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
    qemu_img(
        dir,
        [
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            "t.vmdk",
            "3M",
        ],
    );
    qemu_img(
        dir,
        [
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "f.vmdk",
            "3M",
        ],
    );
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

/// Extents sharing a file (or naming the descriptor itself) could make a
/// write to one change another: such a disk opens for reading, not for
/// writing, and nothing changes.
#[test]
fn shared_extent_files_are_not_writable() {
    let d = tempdir();
    let dir = d.path();
    fs::write(dir.join("x-flat.vmdk"), vec![7; 8192]).unwrap();
    fs::write(
        dir.join("twice.vmdk"),
        flat_descriptor("RW 8 FLAT \"x-flat.vmdk\" 0\nRW 8 FLAT \"x-flat.vmdk\" 4"),
    )
    .unwrap();
    fs::write(
        dir.join("self.vmdk"),
        flat_descriptor("RW 1 FLAT \"self.vmdk\" 0"),
    )
    .unwrap();
    for name in ["twice.vmdk", "self.vmdk"] {
        let before = snapshot_dir(dir);
        let img = dir.join(name);
        Chain::open(&img, &OpenOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let opts = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let err = Chain::open(&img, &opts).err().expect("refused").to_string();
        assert!(
            err.contains("used twice") && err.contains("not writable"),
            "{name}: {err}"
        );
        assert_eq!(snapshot_dir(dir), before, "{name}: files changed");
    }
}

/// A writable open of `img` is refused with a message containing every
/// word of `want`, and no file in `dir` changes; the disk still opens
/// read-only.
fn assert_read_only(dir: &Path, img: &Path, want: &[&str]) {
    let before = snapshot_dir(dir);
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let err = Chain::open(img, &opts).err().expect("refused").to_string();
    for w in want {
        assert!(err.contains(w), "{}: want {w:?} in: {err}", img.display());
    }
    Chain::open(img, &OpenOptions::default()).unwrap_or_else(|e| panic!("read-only: {e}"));
    assert_eq!(snapshot_dir(dir), before, "files changed");
}

fn flat_child(parent_cid: &str, parent: &str, extent: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=cfde1f6b\nparentCID={parent_cid}\n\
         createType=\"monolithicFlat\"\nparentFileNameHint=\"{parent}\"\n\n{extent}\n"
    )
}

/// Review finding 1: a hand-written leaf whose extent is another disk's
/// file (its parent's flat extent, as in the review's evidence; a
/// monolithicSparse disk; a hard link to one) opens read-only, naming
/// why, so no write reaches the other disk. Extent names that are not
/// plain names in the directory (a symlink, `sub/..`) are refused even
/// for reading.
#[test]
fn a_leaf_using_another_disks_file_is_read_only() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    qemu_img(
        dir,
        [
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "base.vmdk",
            "1M",
        ],
    );
    let base_cid = String::from_utf8_lossy(&read(&dir.join("base.vmdk")))
        .lines()
        .find_map(|l| l.strip_prefix("CID=").map(str::to_string))
        .unwrap();
    fs::write(
        dir.join("child.vmdk"),
        flat_child(&base_cid, "base.vmdk", "RW 2048 FLAT \"base-flat.vmdk\" 0"),
    )
    .unwrap();
    assert_read_only(
        dir,
        &dir.join("child.vmdk"),
        &["read-only", "base-flat.vmdk", "another"],
    );
    // A monolithicSparse disk named as another descriptor's extent: both
    // are read-only (each writer would change the other's data).
    create(dir, "mono.vmdk", "1M");
    fs::write(
        dir.join("uses-mono.vmdk"),
        flat_descriptor("RW 8 FLAT \"mono.vmdk\" 0"),
    )
    .unwrap();
    assert_read_only(
        dir,
        &dir.join("uses-mono.vmdk"),
        &["read-only", "mono.vmdk"],
    );
    assert_read_only(dir, &dir.join("mono.vmdk"), &["read-only", "another"]);
    fs::remove_file(dir.join("uses-mono.vmdk")).unwrap();
    // A hard link: the other name may belong to anything.
    fs::hard_link(dir.join("base-flat.vmdk"), dir.join("hl-flat.vmdk")).unwrap();
    fs::write(
        dir.join("hl.vmdk"),
        flat_descriptor("RW 2048 FLAT \"hl-flat.vmdk\" 0"),
    )
    .unwrap();
    assert_read_only(dir, &dir.join("hl.vmdk"), &["read-only", "hard links"]);
    // Names that are not plain names in the directory.
    std::os::unix::fs::symlink("base-flat.vmdk", dir.join("lnk")).unwrap();
    fs::create_dir(dir.join("sub")).unwrap();
    for (name, extent) in [
        ("sym.vmdk", "lnk"),
        ("dotdot.vmdk", "sub/../base-flat.vmdk"),
    ] {
        let line = format!("RW 2048 FLAT \"{extent}\" 0");
        fs::write(dir.join(name), flat_descriptor(&line)).unwrap();
        assert_refused(dir, &dir.join(name), "outside");
    }
}

/// Review finding 2: the extent files removed with a twoGbMaxExtentSparse
/// disk are compared with what other disks use by file identity, not by
/// name: another descriptor naming `a-s001.vmdk` as `./a-s001.vmdk` (the
/// review's evidence), by absolute path, through `sub/..`, a symlink to it
/// or a hard link keeps it off the list, so removing `a.vmdk` leaves it.
#[test]
fn companions_shared_by_any_spelling_are_kept() {
    require_qemu!();
    use snaptree::image::formats;
    let d = tempdir();
    let dir = d.path();
    let opts = "subformat=twoGbMaxExtentSparse";
    for n in ["a.vmdk", "b.vmdk"] {
        qemu_img(dir, ["create", "-q", "-f", "vmdk", "-o", opts, n, "1M"]);
    }
    let a = dir.join("a.vmdk");
    let ext = dir.join("a-s001.vmdk");
    assert_eq!(formats::companions(&a), vec![ext.clone()]);
    let b_text = String::from_utf8(read(&dir.join("b.vmdk"))).unwrap();
    fs::create_dir(dir.join("sub")).unwrap();
    let spellings = [
        "./a-s001.vmdk".to_string(),
        ext.display().to_string(),
        "sub/../a-s001.vmdk".to_string(),
    ];
    for s in &spellings {
        let text = b_text.replace("\"b-s001.vmdk\"", &format!("\"{s}\""));
        assert_ne!(text, b_text);
        fs::write(dir.join("b.vmdk"), text).unwrap();
        assert_eq!(formats::companions(&a), Vec::<PathBuf>::new(), "{s}");
    }
    fs::write(dir.join("b.vmdk"), &b_text).unwrap();
    std::os::unix::fs::symlink("a-s001.vmdk", dir.join("lnk")).unwrap();
    assert_eq!(formats::companions(&a), Vec::<PathBuf>::new(), "symlink");
    fs::remove_file(dir.join("lnk")).unwrap();
    fs::hard_link(&ext, dir.join("other-s001.vmdk")).unwrap();
    assert_eq!(formats::companions(&a), Vec::<PathBuf>::new(), "hard link");
    fs::remove_file(dir.join("other-s001.vmdk")).unwrap();
    // The review's case end to end: the merge's removal keeps b's data.
    let text = b_text.replace("\"b-s001.vmdk\"", "\"./a-s001.vmdk\"");
    fs::write(dir.join("b.vmdk"), text).unwrap();
    formats::remove_image(&a).unwrap();
    assert!(ext.exists(), "b.vmdk's extent was removed with a.vmdk");
}

/// Review finding 5: a grain table entry whose grain runs past the end
/// of the file (the review's evidence: the file's last sector, so the
/// next appended grain would land inside it) or whose grain overlaps
/// another grain makes a writable open fail naming the file, the entry's
/// or grain's offset and what is wrong; the disk still reads, and
/// nothing changes.
#[test]
fn grains_past_the_end_or_overlapping_are_not_writable() {
    require_qemu!();
    let d = tempdir();
    let dir = d.path();
    let (img, _, gt) = sparse_image(dir);
    qemu_io(dir, "s.vmdk", &[write(0x72, 64 * KIB, 64 * KIB)]);
    let len = read(&img).len() as u64;
    let first = u32::from_le_bytes(read(&img)[gt as usize..gt as usize + 4].try_into().unwrap());
    let pristine = read(&img);
    // The file's last sector; grain 0's sector; half a grain into it.
    for (entry, want) in [
        ((len / 512 - 1) as u32, "past the end"),
        (first, "overlaps"),
        (first + 64, "overlaps"),
    ] {
        fs::write(&img, &pristine).unwrap();
        // Guest grain 3 of the first table.
        patch(&img, gt + 12, &entry.to_le_bytes());
        assert_read_only(dir, &img, &[want, &img.display().to_string()]);
    }
}
