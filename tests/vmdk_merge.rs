//! Merges of VMDK chains through the mount (ARCHITECTURE.md, "The merge
//! invariant"): chains made by `qemu-img create -f vmdk -b` and written
//! by `qemu-io`, a hidden point merged by `merge-now` (or `ctl merge`) in
//! the direction that copies less. Every visible point reads as before,
//! through the mount and through `qemu-img convert` of its file; every
//! VMDK left is clean for `qemu-img check` and read by libvmdk's
//! `vmdkinfo`; the hidden file (and its extent files) is gone, and
//! children still match their parents' CIDs (QEMU refuses to read them
//! otherwise). Flat and streamOptimized VMDKs are refused with their kind
//! named and nothing changes.
//!
//! A binary of its own (the mount tests' `support` is shared by path).

#[path = "mount/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use support::*;

const SIZE: u64 = 16 * MIB;
const NO_GC: [&str; 2] = ["-o", "gc_idle=off"];

/// `qemu-img create -f vmdk` of `name`, over `parent` when given.
pub fn create(ws: &Workspace, name: &str, opts: &str, parent: Option<&str>) {
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "vmdk"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some(p) = parent {
        args.extend(["-b", p, "-F", "vmdk"]);
    }
    args.push(name);
    if parent.is_none() {
        args.push(&size);
    }
    ws.qemu_img(&args);
}

/// `qemu-io` writes of pattern `pat` over `mib` MiB from `at` MiB (QEMU's
/// vmdk takes at most 2 MiB per request).
pub fn fill(pat: u8, at: u64, mib: u64) -> Vec<String> {
    (at..at + mib)
        .map(|m| format!("write -P {pat:#x} {m}M 1M"))
        .collect()
}

/// `qemu-io` of `cmds` on `name`.
pub fn qio(ws: &Workspace, name: &str, cmds: &[String]) {
    let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ws.qemu_io(name, "vmdk", &c);
}

/// Writes `1` to `merge-now`; the error carries `status` when it fails.
fn merge_now(mnt: &Path) -> Result<(), String> {
    let r = OpenOptions::new()
        .write(true)
        .open(mnt.join("merge-now"))
        .and_then(|mut f| f.write(b"1\n").map(|_| ()));
    r.map_err(|e| format!("merge-now: {e}\nstatus:\n{}", status_text(mnt)))
}

/// What `merge-now` says about the last merge.
fn last_merge(mnt: &Path) -> String {
    read_text(&mnt.join("merge-now"))
}

#[track_caller]
fn assert_disk(mnt: &Path, point: &str, want: &[u8]) {
    assert_bytes_eq(
        &format!("{point}/disk.raw"),
        &read_disk(&mnt.join(point).join("disk.raw")),
        want,
    );
}

/// The VMDK files (and extent files) of the tree directory.
fn vmdk_files(ws: &Workspace) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&ws.images)
        .expect("read images")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".vmdk"))
        .collect();
    v.sort();
    v
}

/// `qemu-img check` and `vmdkinfo` (when installed) accept `name`.
pub fn judge_file(ws: &Workspace, name: &str) {
    ws.check(name);
    match std::process::Command::new("vmdkinfo")
        .arg(ws.img(name))
        .output()
    {
        Ok(out) => assert!(out.status.success(), "vmdkinfo {name}: {out:?}"),
        Err(_) => eprintln!("SKIP part: vmdkinfo not installed (libvmdk-utils)"),
    }
}

/// Every point's bytes as `qemu-img convert` of its file reads them.
fn flatten_all(ws: &Workspace, points: &[&str]) -> BTreeMap<String, Vec<u8>> {
    points
        .iter()
        .map(|p| (p.to_string(), ws.flatten(&format!("{p}.vmdk"))))
        .collect()
}

/// The tree is `want` (point -> bytes): shown by the mount, read by it and
/// by `qemu-img convert` of each point's file, which `qemu-img check` and
/// `vmdkinfo` accept.
#[track_caller]
fn assert_tree(ws: &Workspace, mnt: &Path, want: &BTreeMap<String, Vec<u8>>) {
    let shown: Vec<&str> = want.keys().map(String::as_str).collect();
    assert_eq!(visible(mnt), names(&shown), "{}", status_text(mnt));
    for (p, bytes) in want {
        assert_disk(mnt, p, bytes);
        let file = format!("{p}.vmdk");
        assert_bytes_eq(
            &format!("qemu-img convert {file}"),
            &ws.flatten(&file),
            bytes,
        );
        judge_file(ws, &file);
    }
    assert!(
        !ws.images.join(".snaptree-merge.json").exists(),
        "the merge journal is left"
    );
}

/// base <- mid <- c [<- leaf]: `mid` is deleted (hidden) and merged into
/// `c`, streamed or committed as `commit` asks (by how much each holds).
fn merge_hidden_mid(commit: bool, c_has_child: bool) {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    create(&ws, "base.vmdk", "", None);
    qio(&ws, "base.vmdk", &fill(0x11, 0, 6));
    // Each layer is written before its child is made: a write gives a
    // VMDK a new CID, which children made before no longer match.
    let (mut mid_w, mut c_w) = if commit {
        (fill(0x22, 1, 5), vec!["write -P 0x33 2M 64k".to_string()])
    } else {
        (vec!["write -P 0x22 1M 64k".to_string()], fill(0x33, 2, 5))
    };
    mid_w.push("write -z 5M 64k".into());
    c_w.push("write -P 0x34 12345678 1000".into());
    create(&ws, "mid.vmdk", "", Some("base.vmdk"));
    qio(&ws, "mid.vmdk", &mid_w);
    create(&ws, "c.vmdk", "", Some("mid.vmdk"));
    qio(&ws, "c.vmdk", &c_w);
    let mut points = vec!["base", "mid", "c"];
    if c_has_child {
        create(&ws, "leaf.vmdk", "", Some("c.vmdk"));
        ws.qemu_io("leaf.vmdk", "vmdk", &["write -P 0x44 3M 4k"]);
        points.push("leaf");
    }
    let mut want = flatten_all(&ws, &points);
    let Some(m) = ws.mount(&NO_GC) else {
        return;
    };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "mid", "delete");
    want.remove("mid");
    merge_now(&mnt).unwrap_or_else(|e| panic!("{e}"));
    let last = last_merge(&mnt);
    assert!(
        last.starts_with("ok: merged \"mid\" into \"c\""),
        "merge-now: {last:?}"
    );
    assert_eq!(last.contains("committing the child"), commit, "{last}");
    assert_tree(&ws, &mnt, &want);
    assert!(!ws.img("mid.vmdk").exists(), "{:?}", vmdk_files(&ws));
    // c now names base (QEMU reads it only if the CIDs match).
    let chain = ws.qemu_img(&["info", "-U", "--backing-chain", "c.vmdk"]);
    let text = String::from_utf8_lossy(&chain.stdout);
    assert!(
        text.contains("base.vmdk") && !text.contains("mid.vmdk"),
        "{text}"
    );
    m.unmount();
    let m = ws.remount(&NO_GC);
    assert_tree(&ws, &m.mnt, &want);
    m.unmount();
}

#[test]
fn a_hidden_vmdk_streams_into_its_leaf() {
    merge_hidden_mid(false, false);
}

#[test]
fn a_vmdk_leaf_commits_into_its_hidden_parent() {
    merge_hidden_mid(true, false);
}

/// The child has a child: a stream writes it keeping its CID, a commit
/// gives the hidden file the child's CID before it takes its name.
#[test]
fn merging_into_a_vmdk_with_children_keeps_their_parent_cid() {
    merge_hidden_mid(false, true);
    merge_hidden_mid(true, true);
}

/// A hidden root: a stream leaves the child a base of its own (no
/// parentFileNameHint, parentCID ffffffff); a commit renames the root.
#[test]
fn a_hidden_vmdk_root_merges_either_way() {
    for commit in [false, true] {
        if !prerequisites_or_skip() {
            return;
        }
        let ws = Workspace::new();
        create(&ws, "base.vmdk", "", None);
        let small = |p: u8| vec![format!("write -P {p:#x} 1M 64k")];
        let (b_w, l_w) = if commit {
            (fill(0x11, 0, 6), small(0x22))
        } else {
            (small(0x11), fill(0x22, 1, 6))
        };
        qio(&ws, "base.vmdk", &b_w);
        create(&ws, "leaf.vmdk", "", Some("base.vmdk"));
        qio(&ws, "leaf.vmdk", &l_w);
        let mut want = flatten_all(&ws, &["leaf"]);
        let Some(m) = ws.mount(&NO_GC) else {
            return;
        };
        let mnt = m.mnt.clone();
        ctl_ok(&mnt, "base", "delete");
        merge_now(&mnt).unwrap_or_else(|e| panic!("{e}"));
        let last = last_merge(&mnt);
        assert_eq!(last.contains("committing the child"), commit, "{last}");
        assert_tree(&ws, &mnt, &want);
        let text =
            String::from_utf8_lossy(&std::fs::read(ws.img("leaf.vmdk")).unwrap()).into_owned();
        if !commit {
            assert!(text.contains("parentCID=ffffffff"), "leaf is a base now");
            assert!(!text.contains("parentFileNameHint"), "leaf names no parent");
        }
        assert_eq!(vmdk_files(&ws), ["leaf.vmdk"]);
        m.unmount();
        let m = ws.remount(&NO_GC);
        want = flatten_all(&ws, &["leaf"]);
        assert_tree(&ws, &m.mnt, &want);
        m.unmount();
    }
}

/// twoGbMaxExtentSparse: a hidden one streamed into a twoGb leaf (its
/// descriptor file replaced by rename; the hidden disk's extent files
/// go with it), and one committed into a monolithicSparse leaf (its
/// descriptor takes the leaf's name and keeps its extent files). A twoGb
/// leaf is never replaced by a commit: it is streamed into.
#[test]
fn two_gb_max_extent_sparse_chains_merge() {
    for leaf_two_gb in [true, false] {
        if !prerequisites_or_skip() {
            return;
        }
        let ws = Workspace::new();
        create(&ws, "base.vmdk", "", None);
        qio(&ws, "base.vmdk", &fill(0x11, 0, 6));
        create(
            &ws,
            "mid.vmdk",
            "subformat=twoGbMaxExtentSparse",
            Some("base.vmdk"),
        );
        qio(&ws, "mid.vmdk", &fill(0x22, 1, 3));
        let opts = if leaf_two_gb {
            "subformat=twoGbMaxExtentSparse"
        } else {
            ""
        };
        create(&ws, "leaf.vmdk", opts, Some("mid.vmdk"));
        ws.qemu_io("leaf.vmdk", "vmdk", &["write -P 0x33 2M 64k"]);
        let want = flatten_all(&ws, &["base", "leaf"]);
        let Some(m) = ws.mount(&NO_GC) else {
            return;
        };
        let mnt = m.mnt.clone();
        // `ctl merge`: delete and coalesce in one command.
        ctl_ok(&mnt, "mid", "merge");
        assert_tree(&ws, &mnt, &want);
        let files = vmdk_files(&ws);
        if leaf_two_gb {
            assert_eq!(files, ["base.vmdk", "leaf-s001.vmdk", "leaf.vmdk"]);
        } else {
            assert_eq!(files, ["base.vmdk", "leaf.vmdk", "mid-s001.vmdk"]);
        }
        m.unmount();
        let m = ws.remount(&NO_GC);
        assert_tree(&ws, &m.mnt, &want);
        m.unmount();
    }
}

/// A hidden monolithicFlat or streamOptimized VMDK, and a sparse child of
/// one: `merge-now` says which kind stays and why, and no file changes.
#[test]
fn merges_of_other_vmdk_kinds_are_refused_with_the_kind() {
    for kind in ["monolithicFlat", "streamOptimized"] {
        if !prerequisites_or_skip() {
            return;
        }
        let ws = Workspace::new();
        if kind == "streamOptimized" {
            create(&ws, "src.vmdk", "", None);
            ws.qemu_io("src.vmdk", "vmdk", &["write -P 0x11 0 1M"]);
            let o = ["-o", "subformat=streamOptimized"];
            ws.qemu_img(
                &[
                    &["convert", "-q", "-O", "vmdk"][..],
                    &o,
                    &["src.vmdk", "base.vmdk"],
                ]
                .concat(),
            );
            std::fs::remove_file(ws.img("src.vmdk")).unwrap();
        } else {
            create(&ws, "base.vmdk", &format!("subformat={kind}"), None);
            ws.qemu_io("base.vmdk", "vmdk", &["write -P 0x11 0 1M"]);
        }
        create(&ws, "leaf.vmdk", "", Some("base.vmdk"));
        ws.qemu_io("leaf.vmdk", "vmdk", &["write -P 0x22 512k 1M"]);
        let want = flatten_all(&ws, &["leaf"]);
        let bytes = |ws: &Workspace| -> Vec<(String, Vec<u8>)> {
            vmdk_files(ws)
                .into_iter()
                .map(|n| (n.clone(), std::fs::read(ws.img(&n)).unwrap()))
                .collect()
        };
        let before = bytes(&ws);
        let Some(m) = ws.mount(&NO_GC) else {
            return;
        };
        let mnt = m.mnt.clone();
        ctl_ok(&mnt, "base", "delete");
        let _ = merge_now(&mnt);
        let status = status_text(&mnt);
        assert!(
            status.contains(&format!("is a {kind} VMDK")) && status.contains("hosted sparse VMDKs"),
            "status should say why base stays:\n{status}"
        );
        assert_eq!(visible(&mnt), names(&["leaf"]));
        assert_disk(&mnt, "leaf", &want["leaf"]);
        m.unmount();
        assert!(bytes(&ws) == before, "a refused merge changed VMDK files");
    }
}
