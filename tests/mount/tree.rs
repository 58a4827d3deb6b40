//! Changing the tree through the mount (`ctl` snapshot/clone/delete and
//! `rmdir`), step by step: which points are visible or hidden, which images
//! exist, what `parent` and `info.json` say, and that it all survives a
//! remount.

use std::fs::File;

use super::*;

/// fsync the leaf descriptor and `qemu-img check` every image, mounted.
fn checkpoint(ws: &Workspace, leaf: &File) {
    leaf.sync_all().expect("fsync leaf");
    ws.check_all();
}

/// Whether `MNT/tree` text shows point `p` as hidden.
fn shows_hidden(tree: &str, p: &str) -> bool {
    tree.lines().any(|l| l.contains(p) && l.contains("hidden"))
}

#[test]
fn snapshot_clone_delete_change_the_tree() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
    let base_bytes = ws.flatten("base.qcow2");
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));

    // A descriptor opened before any snapshot; used throughout.
    let early = open_rw(&mnt, "leaf").expect("open leaf rw");
    write_both(&early, &mut model, 100_001, &pattern(10, 200_000));
    write_both(&early, &mut model, 8 * MIB - 7, &pattern(11, 65_536 + 14));

    // --- snapshot s1 ---
    ctl_ok(&mnt, "leaf", "snapshot s1");
    let model_s1 = model.clone();
    assert!(
        status_text(&mnt).contains("last command: leaf/ctl: snapshot s1: ok"),
        "status:\n{}",
        status_text(&mnt)
    );
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf"]));
    let tree = tree_text(&mnt);
    let pos = |n: &str| {
        tree.find(n)
            .unwrap_or_else(|| panic!("{n} not in tree:\n{tree}"))
    };
    assert!(
        pos("base") < pos("s1") && pos("s1") < pos("leaf"),
        "tree order:\n{tree}"
    );
    let i = info(&mnt, "s1");
    assert_eq!(i["kind"], "snapshot", "s1: {i}");
    assert_eq!(i["parent"], "base", "s1: {i}");
    assert_eq!(i["children"], serde_json::json!(["leaf"]), "s1: {i}");
    assert_eq!(i["disks"]["disk"]["image"], "s1.qcow2", "s1: {i}");
    let s1_created = i["created"].clone();
    let i = info(&mnt, "leaf");
    assert_eq!(i["kind"], "leaf", "leaf: {i}");
    assert_eq!(i["parent"], "s1", "leaf: {i}");
    assert_eq!(i["disks"]["disk"]["image"], "leaf.qcow2", "leaf: {i}");
    assert_eq!(i["disks"]["disk"]["chain_depth"], 3, "leaf: {i}");
    assert_eq!(parent_link(&mnt, "leaf").as_deref(), Some("../s1"));
    assert_eq!(parent_link(&mnt, "s1").as_deref(), Some("../base"));
    for f in ["s1.qcow2", "leaf.qcow2", "base.qcow2", ".snaptree.json"] {
        assert!(ws.img(f).exists(), "{f} missing after snapshot");
    }
    assert_disk(&mnt, "s1", &model_s1);
    assert_disk(&mnt, "leaf", &model);
    assert_errno(
        "open s1/disk.raw for write",
        open_rw(&mnt, "s1"),
        libc::EROFS,
    );
    checkpoint(&ws, &early);

    // The descriptor opened before the snapshot still writes the leaf.
    write_both(&early, &mut model, 3, &pattern(12, 10_000));
    write_both(&early, &mut model, 12 * MIB + 1, &pattern(13, 300_000));
    assert_bytes_eq(
        "leaf through the early fd",
        &read_at(&early, 0, S as usize),
        &model,
    );
    assert_disk(&mnt, "leaf", &model);
    assert_disk(&mnt, "s1", &model_s1);
    checkpoint(&ws, &early);
    ws.compare("s1.qcow2", &model_s1);
    ws.compare("leaf.qcow2", &model);

    // --- snapshot s2, more writes ---
    ctl_ok(&mnt, "leaf", "snapshot s2");
    let model_s2 = model.clone();
    write_both(&early, &mut model, 2 * MIB, &pattern(14, 4096));
    assert_eq!(visible(&mnt), names(&["base", "s1", "s2", "leaf"]));
    assert_eq!(parent_link(&mnt, "leaf").as_deref(), Some("../s2"));
    assert_eq!(parent_link(&mnt, "s2").as_deref(), Some("../s1"));
    assert_disk(&mnt, "s2", &model_s2);
    assert_disk(&mnt, "s1", &model_s1);
    assert_disk(&mnt, "leaf", &model);
    checkpoint(&ws, &early);

    // --- errors on the way ---
    assert_errno(
        "snapshot of a non-leaf",
        ctl(&mnt, "s1", "snapshot x"),
        libc::EINVAL,
    );
    assert_errno(
        "snapshot to a taken name",
        ctl(&mnt, "leaf", "snapshot s1"),
        libc::EEXIST,
    );

    // --- clone c1 of s1 ---
    ctl_ok(&mnt, "s1", "clone c1");
    assert_eq!(visible(&mnt), names(&["base", "s1", "s2", "leaf", "c1"]));
    assert!(ws.img("c1.qcow2").exists(), "c1.qcow2 missing");
    let i = info(&mnt, "c1");
    assert_eq!(i["kind"], "leaf", "c1: {i}");
    assert_eq!(i["parent"], "s1", "c1: {i}");
    let mut kids: Vec<String> = info(&mnt, "s1")["children"]
        .as_array()
        .expect("children")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    kids.sort();
    assert_eq!(kids, ["c1", "s2"]);
    assert_eq!(parent_link(&mnt, "c1").as_deref(), Some("../s1"));
    let mut model_c1 = model_s1.clone();
    assert_disk(&mnt, "c1", &model_c1);
    {
        let c1 = open_rw(&mnt, "c1").expect("open c1 rw");
        write_both(&c1, &mut model_c1, 5 * MIB + 3, &pattern(15, 77_777));
        c1.sync_all().expect("fsync c1");
    }
    assert_disk(&mnt, "c1", &model_c1);
    assert_disk(&mnt, "s1", &model_s1);
    checkpoint(&ws, &early);

    // --- clone c2 of the leaf c1: c1 stops being writable ---
    ctl_ok(&mnt, "c1", "clone c2");
    assert_eq!(info(&mnt, "c1")["kind"], "snapshot");
    assert_errno(
        "open c1 (now a snapshot) for write",
        open_rw(&mnt, "c1"),
        libc::EROFS,
    );
    assert_disk(&mnt, "c2", &model_c1);
    checkpoint(&ws, &early);

    // --- delete c2 through ctl: c1 is a writable leaf again ---
    ctl_ok(&mnt, "c2", "delete");
    assert_eq!(visible(&mnt), names(&["base", "s1", "s2", "leaf", "c1"]));
    assert!(!ws.img("c2.qcow2").exists(), "c2.qcow2 left behind");
    assert_eq!(info(&mnt, "c1")["kind"], "leaf");
    {
        let c1 = open_rw(&mnt, "c1").expect("c1 writable again");
        write_both(&c1, &mut model_c1, 0, &pattern(16, 1000));
        c1.sync_all().expect("fsync c1");
    }
    assert_disk(&mnt, "c1", &model_c1);
    checkpoint(&ws, &early);
    ws.compare("c1.qcow2", &model_c1);

    // --- rmdir s2 (it has a child): hidden, its image kept ---
    std::fs::remove_dir(mnt.join("s2")).expect("rmdir s2");
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf", "c1"]));
    assert!(
        ws.img("s2.qcow2").exists(),
        "s2.qcow2 removed but leaf needs it"
    );
    assert!(!mnt.join("s2").exists(), "s2 still reachable");
    assert_eq!(parent_link(&mnt, "leaf").as_deref(), Some("../s1"));
    let tree = tree_text(&mnt);
    assert!(
        shows_hidden(&tree, "s2"),
        "tree does not show s2 hidden:\n{tree}"
    );
    assert_disk(&mnt, "leaf", &model);
    write_both(&early, &mut model, 15 * MIB, &pattern(17, 123));
    checkpoint(&ws, &early);

    // --- rmdir c1 (a leaf): its image goes ---
    std::fs::remove_dir(mnt.join("c1")).expect("rmdir c1");
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf"]));
    assert!(!ws.img("c1.qcow2").exists(), "c1.qcow2 left behind");
    assert_errno(
        "rmdir of a gone point",
        std::fs::remove_dir(mnt.join("c1")),
        libc::ENOENT,
    );
    assert_disk(&mnt, "s1", &model_s1);
    assert_disk(&mnt, "leaf", &model);
    checkpoint(&ws, &early);

    // --- unmount: images clean and equal to the models ---
    drop(early);
    unmount_ok(m);
    ws.check_all();
    assert_eq!(
        ws.qcow2_images(),
        ["base.qcow2", "leaf.qcow2", "s1.qcow2", "s2.qcow2"]
    );
    ws.compare("base.qcow2", &base_bytes);
    ws.compare("s1.qcow2", &model_s1);
    ws.compare("s2.qcow2", &model_s2);
    ws.compare("leaf.qcow2", &model);

    // --- remount: the tree (names, hidden, created) persists ---
    let m = ws.remount(&[]);
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf"]));
    let tree = tree_text(&mnt);
    assert!(
        shows_hidden(&tree, "s2"),
        "after remount, s2 not hidden:\n{tree}"
    );
    assert_eq!(info(&mnt, "s1")["created"], s1_created);
    assert_eq!(parent_link(&mnt, "leaf").as_deref(), Some("../s1"));
    assert_disk(&mnt, "base", &base_bytes);
    assert_disk(&mnt, "s1", &model_s1);
    assert_disk(&mnt, "leaf", &model);
    {
        let f = open_rw(&mnt, "leaf").expect("leaf writable after remount");
        write_both(&f, &mut model, 7, &pattern(18, 70_000));
    }
    assert_disk(&mnt, "leaf", &model);
    unmount_ok(m);
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
}

#[test]
fn delete_cascades_through_hidden_points() {
    let Some(ws) = workspace() else {
        return;
    };
    const S: u64 = 16 * MIB;
    // base <- s1 <- s2 <- leaf;  s1 <- c
    ws.create_qcow2("base.qcow2", S, None, "");
    ws.qemu_io("base.qcow2", "qcow2", &["write -P 0x11 0 2M"]);
    ws.create_qcow2("s1.qcow2", S, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("s1.qcow2", "qcow2", &["write -P 0x12 1M 2M"]);
    ws.create_qcow2("s2.qcow2", S, Some(("s1.qcow2", "qcow2")), "");
    ws.qemu_io("s2.qcow2", "qcow2", &["write -P 0x13 2M 2M"]);
    ws.create_qcow2("leaf.qcow2", S, Some(("s2.qcow2", "qcow2")), "");
    ws.create_qcow2("c.qcow2", S, Some(("s1.qcow2", "qcow2")), "");
    ws.qemu_io("c.qcow2", "qcow2", &["write -P 0x14 3M 1M"]);
    let c_bytes = ws.flatten("c.qcow2");
    let leaf_bytes = ws.flatten("leaf.qcow2");

    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    for p in ["s2", "s1", "base"] {
        std::fs::remove_dir(mnt.join(p)).unwrap_or_else(|e| panic!("rmdir {p}: {e}"));
    }
    assert_eq!(visible(&mnt), names(&["leaf", "c"]));
    for f in [
        "base.qcow2",
        "s1.qcow2",
        "s2.qcow2",
        "leaf.qcow2",
        "c.qcow2",
    ] {
        assert!(ws.img(f).exists(), "{f} removed while still needed");
    }
    // No visible ancestor: no parent link.
    assert_eq!(parent_link(&mnt, "leaf"), None);
    assert_eq!(parent_link(&mnt, "c"), None);
    assert_disk(&mnt, "leaf", &leaf_bytes);
    assert_disk(&mnt, "c", &c_bytes);
    let tree = tree_text(&mnt);
    for p in ["base", "s1", "s2"] {
        assert!(shows_hidden(&tree, p), "{p} not shown hidden:\n{tree}");
    }

    // Deleting the leaf removes it and its hidden parent s2 (nothing needs
    // s2 now), but not s1 (c needs it) nor base.
    std::fs::remove_dir(mnt.join("leaf")).expect("rmdir leaf");
    assert_eq!(visible(&mnt), names(&["c"]));
    assert_eq!(ws.qcow2_images(), ["base.qcow2", "c.qcow2", "s1.qcow2"]);
    assert_disk(&mnt, "c", &c_bytes);
    let tree = tree_text(&mnt);
    // A linear chain: each point the only child of the line above, all
    // in one column (no box drawing, as `git log --graph`).
    let drawn: Vec<&str> = tree.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(drawn, ["base", "s1", "c"], "tree:\n{tree}");
    unmount_ok(m);
    ws.check_all();
    ws.compare("c.qcow2", &c_bytes);

    // Remount: still hidden.
    let m = ws.remount(&[]);
    assert_eq!(visible(&m.mnt), names(&["c"]));
    assert_disk(&m.mnt, "c", &c_bytes);
    unmount_ok(m);
}

#[test]
fn snapshot_of_a_raw_leaf() {
    let Some(ws) = workspace() else {
        return;
    };
    const S: u64 = 16 * MIB;
    ws.create_raw("disk.img", S);
    ws.qemu_io(
        "disk.img",
        "raw",
        &["write -P 0x71 0 1M", "write -P 0x72 5M 4097"],
    );
    let mut model = ws.flatten("disk.img");
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["disk"]));
    assert_eq!(info(&mnt, "disk")["disks"]["disk"]["format"], "raw");
    let f = open_rw(&mnt, "disk").expect("raw leaf writable");
    write_both(&f, &mut model, 100, &pattern(20, 70_000));
    ctl_ok(&mnt, "disk", "snapshot s1");
    let model_s1 = model.clone();
    // The raw file becomes the snapshot (s1.img); the leaf goes on in a
    // new qcow2 overlay beside it (disk.qcow2).
    assert!(ws.img("s1.img").exists(), "s1.img missing");
    assert!(ws.img("disk.qcow2").exists(), "disk.qcow2 missing");
    assert!(!ws.img("disk.img").exists(), "disk.img still there");
    assert_eq!(visible(&mnt), names(&["disk", "s1"]));
    assert_eq!(parent_link(&mnt, "disk").as_deref(), Some("../s1"));
    write_both(&f, &mut model, 4 * MIB + 1, &pattern(21, 300_000));
    assert_disk(&mnt, "s1", &model_s1);
    assert_disk(&mnt, "disk", &model);
    drop(f);
    unmount_ok(m);
    ws.check_all();
    assert_bytes_eq(
        "s1.img",
        &std::fs::read(ws.img("s1.img")).expect("s1.img"),
        &model_s1,
    );
    ws.compare("disk.qcow2", &model);
    let m = ws.remount(&[]);
    assert_eq!(visible(&m.mnt), names(&["disk", "s1"]));
    assert_disk(&m.mnt, "disk", &model);
    assert_disk(&m.mnt, "s1", &model_s1);
    unmount_ok(m);
}

/// After `echo delete > MNT/c/ctl`, the kernel keeps `MNT/c` (entry and
/// attributes cached for the 1 s TTL): `stat` still finds a directory and
/// `ls` fails with ENOTDIR instead of ENOENT.
#[test]
fn a_point_deleted_through_ctl_is_gone_at_once() {
    let Some(ws) = base_and_leaf_workspace(16 * MIB) else {
        return;
    };
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "leaf", "clone c");
    assert!(mnt.join("c").is_dir());
    assert!(mnt.join("c").join("disk.raw").exists());
    ctl_ok(&mnt, "c", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert_errno(
        "stat of the deleted point",
        std::fs::metadata(mnt.join("c")),
        libc::ENOENT,
    );
    assert_errno(
        "ls of the deleted point",
        std::fs::read_dir(mnt.join("c")).and_then(|d| d.collect::<Result<Vec<_>, _>>()),
        libc::ENOENT,
    );
}
