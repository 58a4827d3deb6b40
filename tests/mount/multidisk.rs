//! Snapshot points with several disks: a manifest that gives one point
//! name to several images (one `disk` each) makes one directory with one
//! `<disk>.raw` per disk, and `ctl` commands act on every disk of it.

use std::path::Path;

use super::*;

/// `MNT/<point>/<disk>.raw`, whole.
fn read_member(mnt: &Path, point: &str, disk: &str) -> Vec<u8> {
    read_disk(&mnt.join(point).join(format!("{disk}.raw")))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// The manifest of two disks `vda`, `vdb`, each a chain
/// `base.<disk>.qcow2` <- `top.<disk>.qcow2`: points `base` and `top`, one
/// entry per disk.
pub(crate) fn write_two_disk_manifest(ws: &Workspace) {
    let entry = |name: &str, disk: &str, parent: Option<&str>| {
        serde_json::json!({
            "name": name, "disk": disk, "image": format!("{name}.{disk}.qcow2"),
            "parent": parent, "created": 1_700_000_000u64,
        })
    };
    let manifest = serde_json::json!({ "version": 1, "points": [
        entry("base", "vda", None), entry("base", "vdb", None),
        entry("top", "vda", Some("base")), entry("top", "vdb", Some("base")),
    ]});
    std::fs::write(ws.img(".snaptree.json"), manifest.to_string()).expect("manifest");
}

#[test]
fn multi_disk_points_show_one_file_per_disk_and_snapshot_together() {
    const S: u64 = 8 * MIB;
    let Some(ws) = workspace() else { return };
    // Two disks, each a chain base <- top, as libvirt leaves them after one
    // external snapshot of a two-disk VM.
    ws.create_qcow2("base.vda.qcow2", S, None, "");
    ws.create_qcow2("base.vdb.qcow2", S / 2, None, "cluster_size=4096");
    ws.qemu_io("base.vda.qcow2", "qcow2", &["write -P 0x11 0 1M"]);
    ws.qemu_io("base.vdb.qcow2", "qcow2", &["write -P 0x22 65536 300000"]);
    ws.create_qcow2("top.vda.qcow2", S, Some(("base.vda.qcow2", "qcow2")), "");
    ws.create_qcow2(
        "top.vdb.qcow2",
        S / 2,
        Some(("base.vdb.qcow2", "qcow2")),
        "",
    );
    ws.qemu_io("top.vda.qcow2", "qcow2", &["write -P 0x33 512K 1M"]);
    write_two_disk_manifest(&ws);
    let base_vda = ws.flatten("base.vda.qcow2");
    let base_vdb = ws.flatten("base.vdb.qcow2");
    let mut top_vda = ws.flatten("top.vda.qcow2");
    let top_vdb = ws.flatten("top.vdb.qcow2");

    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["base", "top"]));
    assert_eq!(
        entries(&mnt.join("top")),
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
    assert_bytes_eq("base/vda.raw", &read_member(&mnt, "base", "vda"), &base_vda);
    assert_bytes_eq("base/vdb.raw", &read_member(&mnt, "base", "vdb"), &base_vdb);
    assert_bytes_eq("top/vda.raw", &read_member(&mnt, "top", "vda"), &top_vda);
    assert_bytes_eq("top/vdb.raw", &read_member(&mnt, "top", "vdb"), &top_vdb);
    let i = info(&mnt, "top");
    assert_eq!(i["disks"]["vda"]["image"], "top.vda.qcow2", "{i}");
    assert_eq!(i["disks"]["vdb"]["image"], "top.vdb.qcow2", "{i}");
    assert_eq!(i["disks"]["vdb"]["virtual_size"], S / 2, "{i}");
    assert!(
        status_text(&mnt).contains("problems: none"),
        "{}",
        status_text(&mnt)
    );

    // Write vda of the leaf, then snapshot the point: both disks freeze.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("top/vda.raw"))
        .expect("open top/vda.raw rw");
    write_both(&f, &mut top_vda, 3 * MIB + 5, &pattern(7, 100_000));
    drop(f);
    ctl_ok(&mnt, "top", "snapshot s1");
    assert_eq!(visible(&mnt), names(&["base", "s1", "top"]));
    assert_eq!(
        entries(&mnt.join("s1")),
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
    for f in [
        "s1.vda.qcow2",
        "s1.vdb.qcow2",
        "top.vda.qcow2",
        "top.vdb.qcow2",
    ] {
        assert!(ws.img(f).exists(), "{f} missing after snapshot");
    }
    assert_bytes_eq("s1/vda.raw", &read_member(&mnt, "s1", "vda"), &top_vda);
    assert_bytes_eq("s1/vdb.raw", &read_member(&mnt, "s1", "vdb"), &top_vdb);
    assert_eq!(parent_link(&mnt, "top").as_deref(), Some("../s1"));
    let tree = tree_text(&mnt);
    assert!(
        tree.contains("vda: ") && tree.contains("vdb: "),
        "tree:\n{tree}"
    );
    assert_errno(
        "open s1/vdb.raw for write",
        std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("s1/vdb.raw")),
        libc::EROFS,
    );

    // A clone of s1 gets both disks; deleting it removes both overlays.
    ctl_ok(&mnt, "s1", "clone c1");
    assert_eq!(
        entries(&mnt.join("c1")),
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
    assert_bytes_eq("c1/vdb.raw", &read_member(&mnt, "c1", "vdb"), &top_vdb);
    ws.check_all();
    std::fs::remove_dir(mnt.join("c1")).expect("rmdir c1");
    assert!(!ws.img("c1.vda.qcow2").exists() && !ws.img("c1.vdb.qcow2").exists());
    unmount_ok(m);

    // The manifest keeps the grouping across a remount.
    let Some(m) = ws.mount(&["-o", "ro"]) else {
        return;
    };
    assert_eq!(visible(&m.mnt), names(&["base", "s1", "top"]));
    assert_bytes_eq("top/vda.raw", &read_member(&m.mnt, "top", "vda"), &top_vda);
    assert_bytes_eq("s1/vdb.raw", &read_member(&m.mnt, "s1", "vdb"), &top_vdb);
    unmount_ok(m);
    ws.check_all();
    ws.compare("top.vda.qcow2", &top_vda);
    ws.compare("top.vdb.qcow2", &top_vdb);
}
