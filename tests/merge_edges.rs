//! Edge cases of the offline merge (`snaptree merge SOURCE [NAME]`,
//! README "Merging"): backing files shorter than their child, images
//! outside the tree that still use a hidden node, a tree opened from one
//! leaf, images in a subdirectory, a second read-write opener, and a stale
//! merge journal.
//!
//! Each test builds its tree with `qemu-img`/`qemu-io` in a temp directory
//! (`support::Workspace`), records `qemu-img convert -O raw` of every image
//! that stays visible, runs the `snaptree` binary, and judges with
//! `qemu-img`: the flattened bytes are compared, `qemu-img check` must be
//! clean on every remaining qcow2, and `qemu-img info --backing-chain` of
//! the leaves must name the expected files. Without `qemu-img`/`qemu-io`
//! (and, for the mount test, `/dev/fuse` and root) a test prints `SKIP:`
//! and returns.

#[path = "mount/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use support::*;

const JOURNAL: &str = ".snaptree-merge.json";

/// Whether `qemu-img` and `qemu-io` run; otherwise prints `SKIP:`.
fn qemu_or_skip() -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip(&format!("{tool} not found (qemu-utils)"));
            return false;
        }
    }
    true
}

/// A fresh workspace, or `None` after printing `SKIP:`.
fn workspace() -> Option<Workspace> {
    qemu_or_skip().then(Workspace::new)
}

/// Runs `snaptree ARGS` (bounded), whatever its exit status.
fn snaptree(args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.args(args).env("SNAPTREE_LOG", "warn").current_dir("/");
    run_unchecked(&mut c)
}

/// stdout and stderr of `o`, for messages and searches.
fn text(o: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

/// `snaptree ARGS`, which must exit 0.
fn snaptree_ok(args: &[&str]) -> Output {
    let o = snaptree(args);
    assert!(
        o.status.success(),
        "snaptree {} failed:\n{}",
        args.join(" "),
        text(&o)
    );
    o
}

/// `qemu-img convert -O raw` of each image (names relative to the tree).
fn flatten_all(ws: &Workspace, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    names
        .iter()
        .map(|n| (n.to_string(), ws.flatten(n)))
        .collect()
}

/// Every recorded image still flattens to its recorded bytes.
fn assert_reads_as_before(ws: &Workspace, before: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in before {
        ws.compare(name, bytes);
    }
}

/// The bytes of the files themselves (not flattened).
fn file_bytes(ws: &Workspace, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    names
        .iter()
        .map(|n| {
            let v = std::fs::read(ws.img(n)).unwrap_or_else(|e| panic!("read {n}: {e}"));
            (n.to_string(), v)
        })
        .collect()
}

#[track_caller]
fn assert_files_unchanged(ws: &Workspace, before: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in before {
        let now = std::fs::read(ws.img(name)).unwrap_or_else(|e| panic!("{name} is gone: {e}"));
        if let Some(d) = diff_bytes(&now, bytes) {
            panic!("{name} changed on disk: {d}");
        }
    }
}

/// The files of `qemu-img info --backing-chain` of `leaf`, leaf first,
/// as absolute paths.
fn backing_chain(ws: &Workspace, leaf: &str) -> Vec<PathBuf> {
    let o = ws.qemu_img(&["info", "-U", "--backing-chain", "--output=json", leaf]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img info JSON");
    let entries = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    entries
        .iter()
        .map(|e| {
            let f = e["filename"].as_str().expect("filename in qemu-img info");
            let p = ws.images.join(f);
            p.canonicalize().unwrap_or(p)
        })
        .collect()
}

#[track_caller]
fn assert_chain(ws: &Workspace, leaf: &str, want: &[&str]) {
    let got = backing_chain(ws, leaf);
    let want: Vec<PathBuf> = want.iter().map(|n| ws.img(n)).collect();
    assert_eq!(got, want, "qemu-img info --backing-chain {leaf}");
}

/// `qemu-img check` of each image must be clean.
fn check_each(ws: &Workspace, names: &[&str]) {
    for n in names {
        ws.check(n);
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `base <- S <- {A, B}`, 4 MiB each, with data in every layer.
fn base_s_a_b(ws: &Workspace) {
    ws.create_qcow2("base.qcow2", 4 * MIB, None, "");
    ws.qemu_io("base.qcow2", "qcow2", &["write -P 0x01 0 4M"]);
    ws.create_qcow2("S.qcow2", 4 * MIB, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("S.qcow2", "qcow2", &["write -P 0x02 0 2M"]);
    for n in ["A.qcow2", "B.qcow2"] {
        ws.create_qcow2(n, 4 * MIB, Some(("S.qcow2", "qcow2")), "");
    }
    ws.qemu_io("A.qcow2", "qcow2", &["write -P 0x03 1M 64k"]);
    ws.qemu_io("B.qcow2", "qcow2", &["write -P 0x04 3M 1M"]);
}

/// A hidden node smaller than its child: past the hidden node's end the
/// child read zeros, and must keep reading zeros although the new parent
/// holds data there.
#[test]
fn stream_when_the_hidden_node_is_shorter_than_its_child() {
    let Some(ws) = workspace() else { return };
    ws.create_qcow2("P.qcow2", 2 * MIB, None, "");
    ws.qemu_io("P.qcow2", "qcow2", &["write -P 0xaa 0 2M"]);
    ws.create_qcow2("H.qcow2", MIB, Some(("P.qcow2", "qcow2")), "");
    ws.qemu_io("H.qcow2", "qcow2", &["write -P 0x11 0 256k"]);
    ws.create_qcow2("C.qcow2", 2 * MIB, Some(("H.qcow2", "qcow2")), "");
    // More than H holds, all inside H's size.
    ws.qemu_io("C.qcow2", "qcow2", &["write -P 0x22 512k 512k"]);

    let before = flatten_all(&ws, &["P.qcow2", "C.qcow2"]);
    let c = &before["C.qcow2"];
    assert!(c[MIB as usize..].iter().all(|&b| b == 0), "C's 2nd MiB");
    assert!(c[..256 << 10].iter().all(|&b| b == 0x11), "H's data");
    assert!(
        c[256 << 10..512 << 10].iter().all(|&b| b == 0xaa),
        "P's data"
    );

    let o = snaptree_ok(&["merge", &path_str(&ws.images), "H", "--quiet"]);
    eprintln!("{}", text(&o));

    assert!(!ws.img("H.qcow2").exists(), "H.qcow2 left after the merge");
    assert_reads_as_before(&ws, &before);
    check_each(&ws, &["P.qcow2", "C.qcow2"]);
    assert_chain(&ws, "C.qcow2", &["C.qcow2", "P.qcow2"]);
    assert!(!ws.img(JOURNAL).exists(), "journal left behind");
}

/// B cannot be a point of the tree (its L1 table is cut off, so snaptree
/// lists it as broken) but still names S as its backing file: S must stay.
#[test]
fn a_hidden_node_another_image_uses_stays() {
    let Some(ws) = workspace() else { return };
    base_s_a_b(&ws);
    // Cut B off inside its metadata: the header (and backing name) stays,
    // the L1 table goes past the end of the file. qemu-img info still
    // opens it.
    let b = std::fs::read(ws.img("B.qcow2")).expect("read B");
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    assert!(
        l1 >= 64 << 10,
        "B's L1 table at {l1}, inside the header cluster"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(ws.img("B.qcow2"))
        .and_then(|f| f.set_len(l1))
        .expect("truncate B");
    let b_info = ws
        .qemu_img(&["info", "-U", "--backing-chain", "B.qcow2"])
        .stdout;

    // snaptree sees B as broken and says so.
    let files = file_bytes(&ws, &["base.qcow2", "S.qcow2", "A.qcow2", "B.qcow2"]);
    let before = flatten_all(&ws, &["base.qcow2", "A.qcow2"]);
    let o = snaptree_ok(&["merge", &path_str(&ws.images), "--quiet"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("B.qcow2"),
        "snaptree merge lists no problem for the broken B.qcow2:\n{}",
        text(&o)
    );
    assert_files_unchanged(&ws, &files);

    let o = snaptree(&["merge", &path_str(&ws.images), "S", "--quiet"]);
    eprintln!("{}", text(&o));
    assert!(
        ws.img("S.qcow2").exists(),
        "S.qcow2 was removed although B.qcow2 still uses it:\n{}",
        text(&o)
    );
    let kept: BTreeMap<String, Vec<u8>> = ["S.qcow2", "B.qcow2"]
        .iter()
        .map(|k| (k.to_string(), files[*k].clone()))
        .collect();
    assert_files_unchanged(&ws, &kept);
    let all = text(&o);
    assert!(
        !o.status.success() || all.contains("left hidden: \"S\""),
        "snaptree merge neither failed nor said that S stays:\n{all}"
    );
    let b_info_after = ws.qemu_img_unchecked(&["info", "-U", "--backing-chain", "B.qcow2"]);
    assert!(
        b_info_after.status.success() && b_info_after.stdout == b_info,
        "qemu-img info --backing-chain B.qcow2 changed:\nbefore:\n{}\nafter:\n{}",
        String::from_utf8_lossy(&b_info),
        text(&b_info_after)
    );
    assert_reads_as_before(&ws, &before);
    check_each(&ws, &["base.qcow2", "S.qcow2", "A.qcow2"]);
    assert_chain(&ws, "A.qcow2", &["A.qcow2", "S.qcow2", "base.qcow2"]);
}

/// Opened from one leaf, the tree cannot see the sibling B: S must stay.
#[test]
fn merge_refused_for_a_tree_opened_from_one_leaf() {
    let Some(ws) = workspace() else { return };
    base_s_a_b(&ws);
    let files = file_bytes(&ws, &["base.qcow2", "S.qcow2", "A.qcow2", "B.qcow2"]);
    let before = flatten_all(&ws, &["base.qcow2", "A.qcow2", "B.qcow2"]);

    let o = snaptree(&["merge", &path_str(&ws.img("A.qcow2")), "S", "--quiet"]);
    eprintln!("{}", text(&o));

    assert!(
        ws.img("S.qcow2").exists(),
        "S.qcow2 was removed although B.qcow2 uses it:\n{}",
        text(&o)
    );
    assert_files_unchanged(&ws, &files);
    assert_reads_as_before(&ws, &before);
    check_each(&ws, &["base.qcow2", "S.qcow2", "A.qcow2", "B.qcow2"]);
    assert_chain(&ws, "A.qcow2", &["A.qcow2", "S.qcow2", "base.qcow2"]);
    assert_chain(&ws, "B.qcow2", &["B.qcow2", "S.qcow2", "base.qcow2"]);
    assert!(!ws.img(JOURNAL).exists(), "journal left behind");
}

/// `C.qcow2 -> sub/H.qcow2 -> sub/P.qcow2` (H names its backing `P.qcow2`,
/// relative to its own directory). After streaming H into C, C must name
/// a backing file that resolves to `sub/P.qcow2`.
#[test]
fn stream_with_images_in_a_subdirectory() {
    let Some(ws) = workspace() else { return };
    std::fs::create_dir(ws.img("sub")).expect("mkdir sub");
    ws.create_qcow2("sub/P.qcow2", 4 * MIB, None, "");
    ws.qemu_io("sub/P.qcow2", "qcow2", &["write -P 0xaa 0 4M"]);
    // Named as qemu-img stores it: relative to H's directory.
    let mut c = Command::new("qemu-img");
    c.current_dir(ws.img("sub")).args([
        "create", "-q", "-f", "qcow2", "-b", "P.qcow2", "-F", "qcow2", "H.qcow2", "4M",
    ]);
    run(&mut c);
    ws.qemu_io("sub/H.qcow2", "qcow2", &["write -P 0x11 1M 256k"]);
    ws.create_qcow2("C.qcow2", 4 * MIB, Some(("sub/H.qcow2", "qcow2")), "");
    // C holds more than H: the engine streams H into C.
    ws.qemu_io("C.qcow2", "qcow2", &["write -P 0x22 2M 1M"]);
    assert_chain(&ws, "C.qcow2", &["C.qcow2", "sub/H.qcow2", "sub/P.qcow2"]);

    let before = flatten_all(&ws, &["C.qcow2", "sub/P.qcow2"]);
    let o = snaptree(&["merge", &path_str(&ws.images), "--quiet"]);
    eprintln!("points before the merge:\n{}", text(&o));
    let o = snaptree_ok(&["merge", &path_str(&ws.images), "H", "--quiet"]);
    eprintln!("{}", text(&o));

    let info = ws.qemu_img_unchecked(&["info", "-U", "--backing-chain", "C.qcow2"]);
    assert!(
        info.status.success(),
        "C.qcow2 no longer opens:\n{}",
        text(&info)
    );
    assert_chain(&ws, "C.qcow2", &["C.qcow2", "sub/P.qcow2"]);
    assert_reads_as_before(&ws, &before);
    check_each(&ws, &["C.qcow2", "sub/P.qcow2"]);
    assert!(!ws.img("sub/H.qcow2").exists(), "sub/H.qcow2 left behind");
    assert!(!ws.img(JOURNAL).exists(), "journal left behind");
}

/// While a read-write mount holds the tree, `snaptree merge` is refused
/// and changes nothing; after the unmount it works.
#[test]
fn second_read_write_opener_is_refused() {
    if !prerequisites_or_skip() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root to mount FUSE");
        return;
    }
    let ws = Workspace::new();
    ws.create_qcow2("base.qcow2", 4 * MIB, None, "");
    ws.qemu_io("base.qcow2", "qcow2", &["write -P 0x01 0 4M"]);
    ws.create_qcow2("S.qcow2", 4 * MIB, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("S.qcow2", "qcow2", &["write -P 0x02 1M 1M"]);
    ws.create_qcow2("A.qcow2", 4 * MIB, Some(("S.qcow2", "qcow2")), "");
    ws.qemu_io("A.qcow2", "qcow2", &["write -P 0x03 1536k 1M"]);
    let images = ["base.qcow2", "S.qcow2", "A.qcow2"];
    let before = flatten_all(&ws, &["base.qcow2", "A.qcow2"]);
    let src = path_str(&ws.images);

    let Some(mount) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    // What the mount itself wrote at open is not the merge's doing.
    let mut files = file_bytes(&ws, &images);
    let manifest = ws.img(".snaptree.json");
    let manifest_before = std::fs::read(&manifest).ok();
    for args in [
        vec!["merge", src.as_str(), "--quiet"],
        vec!["merge", src.as_str(), "S", "--quiet"],
    ] {
        let o = snaptree(&args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "snaptree {} while mounted:\n{}",
            args.join(" "),
            text(&o)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("in use by another snaptree"),
            "snaptree {} while mounted:\n{}",
            args.join(" "),
            text(&o)
        );
        assert_files_unchanged(&ws, &files);
        assert_eq!(
            std::fs::read(&manifest).ok(),
            manifest_before,
            "the manifest changed"
        );
        assert!(!ws.img(JOURNAL).exists(), "a journal appeared");
    }
    // The mount still serves the same tree and bytes.
    assert_eq!(visible(&mount.mnt), names(&["A", "S", "base"]));
    assert_bytes_eq(
        "A/disk.raw",
        &read_disk(&mount.mnt.join("A").join("disk.raw")),
        &before["A.qcow2"],
    );
    mount.unmount();
    files.remove("S.qcow2");

    let o = snaptree_ok(&["merge", &src, "S", "--quiet"]);
    eprintln!("{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("merged \"S\""),
        "nothing merged:\n{}",
        text(&o)
    );
    assert!(!ws.img("S.qcow2").exists(), "S.qcow2 left after the merge");
    assert_reads_as_before(&ws, &before);
    check_each(&ws, &["base.qcow2", "A.qcow2"]);
    assert_chain(&ws, "A.qcow2", &["A.qcow2", "base.qcow2"]);
    assert!(!ws.img(JOURNAL).exists(), "journal left behind");
}

/// A journal naming a child that does not exist is dropped, and nothing
/// else changes.
#[test]
fn interrupted_merge_journal_with_missing_child_is_dropped() {
    let Some(ws) = workspace() else { return };
    base_s_a_b(&ws);
    let images = ["base.qcow2", "S.qcow2", "A.qcow2", "B.qcow2"];
    let files = file_bytes(&ws, &images);
    let before = flatten_all(&ws, &images);
    let journal = serde_json::json!({
        "direction": "stream",
        "hidden": "S.qcow2",
        "child": "Z.qcow2",
        "parent": "base.qcow2",
    });
    std::fs::write(ws.img(JOURNAL), journal.to_string()).expect("write journal");

    let o = snaptree_ok(&["merge", &path_str(&ws.images), "--quiet"]);
    eprintln!("{}", text(&o));

    assert!(!ws.img(JOURNAL).exists(), "the journal is still there");
    assert!(!ws.img("Z.qcow2").exists(), "Z.qcow2 appeared");
    let mut want: Vec<String> = images.map(String::from).to_vec();
    want.sort();
    assert_eq!(ws.qcow2_images(), want, "the tree's images");
    assert_files_unchanged(&ws, &files);
    assert_reads_as_before(&ws, &before);
    check_each(&ws, &images);
    assert_chain(&ws, "A.qcow2", &["A.qcow2", "S.qcow2", "base.qcow2"]);
    assert_chain(&ws, "B.qcow2", &["B.qcow2", "S.qcow2", "base.qcow2"]);
}
