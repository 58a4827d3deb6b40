//! Issue 12: the mounted layout is declared once (`src/fs/layout.rs`) and
//! `lookup`, `readdir` and `getattr` derive from it. These tests hold the
//! three to one another on a real mount: every listed entry can be looked
//! up and has the inode number and kind it was listed with, `info.json`
//! names the files its directory lists, and the mount's own root names
//! stay refused as point names.

use std::os::unix::fs::DirEntryExt;
use std::path::Path;

use super::*;

/// `(name, inode, is_dir, is_symlink)` of each entry readdir lists in `dir`.
fn listed(dir: &Path) -> Vec<(String, u64, bool, bool)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("dir entry");
            let t = e.file_type().expect("entry type");
            let name = e.file_name().to_string_lossy().into_owned();
            (name, e.ino(), t.is_dir(), t.is_symlink())
        })
        .collect();
    v.sort();
    v
}

/// Every entry of `dir` looks up (`lstat`) to the inode and kind readdir
/// listed it with.
fn assert_lookup_matches_readdir(dir: &Path) {
    for (name, ino, is_dir, is_link) in listed(dir) {
        let path = dir.join(&name);
        let m = std::fs::symlink_metadata(&path)
            .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.ino(), ino, "{}: inode of stat vs readdir", path.display());
        assert_eq!(m.is_dir(), is_dir, "{}: directory?", path.display());
        assert_eq!(m.file_type().is_symlink(), is_link, "{}", path.display());
    }
}

#[test]
fn lookup_getattr_and_readdir_agree_on_every_entry() {
    const S: u64 = 4 * MIB;
    let Some(ws) = workspace() else { return };
    // A two-disk point `base` and a one-disk child chain: root entries,
    // per-disk files, the `parent` link.
    ws.create_qcow2("base.vda.qcow2", S, None, "");
    ws.create_qcow2("base.vdb.qcow2", S, None, "");
    ws.create_qcow2("top.vda.qcow2", S, Some(("base.vda.qcow2", "qcow2")), "");
    ws.create_qcow2("top.vdb.qcow2", S, Some(("base.vdb.qcow2", "qcow2")), "");
    super::multidisk::write_two_disk_manifest(&ws);
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();

    let root: Vec<String> = listed(&mnt).into_iter().map(|e| e.0).collect();
    assert_eq!(root, ["base", "merge-now", "status", "top", "tree"]);
    assert_lookup_matches_readdir(&mnt);
    for p in ["base", "top"] {
        assert_lookup_matches_readdir(&mnt.join(p));
        // info.json names exactly the disk files the directory lists.
        let i = info(&mnt, p);
        let mut files: Vec<String> = i["disks"]
            .as_object()
            .unwrap_or_else(|| panic!("{p}/info.json has no disks: {i}"))
            .values()
            .map(|d| d["file"].as_str().unwrap_or_default().to_string())
            .collect();
        files.sort();
        assert_eq!(files, ["vda.raw", "vdb.raw"], "{i}");
        for f in &files {
            assert!(mnt.join(p).join(f).is_file(), "{p}/{f} not there");
        }
    }
    let top: Vec<String> = listed(&mnt.join("top")).into_iter().map(|e| e.0).collect();
    assert_eq!(
        top,
        [
            "ctl",
            "fs",
            "info.json",
            "parent",
            "vda.raw",
            "vdb.raw",
            "volumes"
        ]
    );
    // Not listed, so not found either.
    for absent in ["disk.raw", "memory.raw", "memory", "parent"] {
        let path = mnt.join("base").join(absent);
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "{absent} in base"
        );
    }

    // The root's own names are no point's.
    for name in ["tree", "status", "merge-now"] {
        let cmd = format!("snapshot {name}");
        assert_errno(&cmd, ctl(&mnt, "top", &cmd), libc::EINVAL);
        let status = status_text(&mnt);
        assert!(
            status.contains("one of the mount's own files (tree, status, merge-now)"),
            "{cmd}: {status}"
        );
    }
    unmount_ok(m);
}
