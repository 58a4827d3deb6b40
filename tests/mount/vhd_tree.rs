//! VHD trees through the mount: a dynamic VHD made by qemu-img, snapshots
//! that make differencing VHDs (snaptree's own), writes, and merges in
//! both directions, judged by qemu-img (the dynamic base), libvhdi's
//! `vhdiinfo` and `vhdimount` (the differencing chain) and the model.

use std::path::Path;
use std::process::Command;

use super::merge::merge_now_ok;
use super::vhd_peers::{libvhdi_tool, VhdiMount};
use super::*;

const SIZE: u64 = 16 * MIB;

/// What libvhdi's `vhdimount` reads from `image`, or `None` (after SKIP)
/// without it.
fn vhdimount_read(image: &Path, dir: &Path) -> Option<Vec<u8>> {
    if !libvhdi_tool("vhdimount") {
        skip("vhdimount is not installed (apt-get install libvhdi-utils)");
        return None;
    }
    let m = VhdiMount::new(image, dir).unwrap_or_else(|e| panic!("{e}"));
    Some(std::fs::read(m.last_view()).expect("read vhdimount's view"))
}

/// Writes `data` at `off` of point `p` through the mount and the model.
fn put(mnt: &Path, p: &str, model: &mut [u8], off: u64, data: &[u8]) {
    let f = open_rw(mnt, p).unwrap_or_else(|e| panic!("open {p}: {e}"));
    write_both(&f, model, off, data);
    f.sync_all().expect("fsync");
}

#[test]
fn vhd_tree_snapshots_writes_and_merges() {
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_vpc("base.vhd", SIZE);
    ws.qemu_io(
        "base.vhd",
        "vpc",
        &["write -P 0x11 0 3M", "write -P 0x12 9M 512K"],
    );
    let mut base = ws.flatten("base.vhd");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    // The dynamic base is the only point, so it is the leaf: write it.
    put(&mnt, "base", &mut base, 1_000_001, &pattern(1, 70_000));
    put(&mnt, "base", &mut base, 5 << 20, &pattern(2, 3 << 20));
    let s1 = base.clone();
    ctl_ok(&mnt, "base", "snapshot s1");
    // Unaligned, sub-sector and block-crossing writes into the new
    // differencing disk.
    put(&mnt, "base", &mut base, 2 * MIB - 100, &pattern(3, 300));
    put(&mnt, "base", &mut base, 7, &pattern(4, 5));
    let s2 = {
        put(&mnt, "base", &mut base, 12 * MIB, &pattern(5, 64 * 1024));
        base.clone()
    };
    ctl_ok(&mnt, "base", "snapshot s2");
    // The leaf holds more than s2, so merging s2 streams it.
    put(&mnt, "base", &mut base, 0, &pattern(6, 6 * MIB as usize));
    assert_eq!(visible(&mnt), names(&["s1", "s2", "base"]));
    assert_disk(&mnt, "s1", &s1);
    assert_disk(&mnt, "s2", &s2);
    assert_disk(&mnt, "base", &base);
    assert_eq!(info(&mnt, "base")["disks"]["disk"]["chain_depth"], 3);
    assert_eq!(
        ws.vhd_images(),
        vec!["base.vhd", "s1.vhd", "s2.vhd"],
        "snapshots of a VHD leaf make VHD images"
    );
    unmount_ok(m);

    // Judged by others: qemu-img reads the dynamic base as written,
    // libvhdi accepts every image and reads the leaf's chain.
    assert_bytes_eq("qemu-img convert s1.vhd", &ws.flatten("s1.vhd"), &s1);
    ws.vhdiinfo_all();
    if let Some(v) = vhdimount_read(&ws.img("base.vhd"), &ws.scratch("vhdi")) {
        assert_bytes_eq("vhdimount base.vhd", &v, &base);
    }

    // Stream: s2 goes into base, which then names s1 (re-pointed through
    // the merge journal).
    let m = ws.remount(&["-o", "gc_idle=off"]);
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "s2", "delete");
    merge_now_ok(&mnt);
    let said = read_text(&mnt.join("merge-now"));
    assert!(
        said.contains("\"s2\" into \"base\"") && !said.contains("committing"),
        "expected a stream of s2 into base: {said}"
    );
    assert_eq!(info(&mnt, "base")["disks"]["disk"]["chain_depth"], 2);
    assert_disk(&mnt, "base", &base);
    assert_disk(&mnt, "s1", &s1);
    assert!(!ws.img("s2.vhd").exists(), "s2.vhd left after the merge");

    // Commit with a new id: s1 is a root, so it cannot be streamed into
    // its child s3 (a differencing disk needs a parent); s3's data goes
    // into s1, whose file takes s3's name and unique id (base checks it).
    let s3 = base.clone();
    ctl_ok(&mnt, "base", "snapshot s3");
    put(&mnt, "base", &mut base, 3 * MIB, &pattern(7, 4096));
    ctl_ok(&mnt, "s1", "delete");
    merge_now_ok(&mnt);
    let said = read_text(&mnt.join("merge-now"));
    assert!(
        said.contains("\"s1\" into \"s3\"") && said.contains("committing"),
        "expected s3 committed into s1: {said}"
    );
    assert_eq!(visible(&mnt), names(&["s3", "base"]));
    assert_disk(&mnt, "s3", &s3);
    assert_disk(&mnt, "base", &base);
    assert_eq!(info(&mnt, "base")["disks"]["disk"]["chain_depth"], 2);
    unmount_ok(m);
    assert_eq!(ws.vhd_images(), vec!["base.vhd", "s3.vhd"]);
    ws.vhdiinfo_all();
    assert_bytes_eq("qemu-img convert s3.vhd", &ws.flatten("s3.vhd"), &s3);
    if let Some(v) = vhdimount_read(&ws.img("base.vhd"), &ws.scratch("vhdi2")) {
        assert_bytes_eq("vhdimount base.vhd after the merges", &v, &base);
    }
    assert_bytes_eq("snaptree export base.vhd", &ws.export("base.vhd"), &base);
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_disk(&m.mnt, "base", &base);
    assert_disk(&m.mnt, "s3", &s3);
    unmount_ok(m);
}

/// A differencing VHD whose parent locators lead out of the tree
/// directory is reported as broken (file, offset, why); the rest of the
/// tree mounts, and nothing outside is opened for writing.
#[test]
fn vhd_parent_outside_the_tree_is_refused() {
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_vpc("base.vhd", SIZE);
    let outside = ws.scratch("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let parent = outside.join("p.vhd");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "force_size=on"])
        .arg(&parent)
        .arg(SIZE.to_string())
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "qemu-img create: {o:?}");
    let child = ws.img("child.vhd");
    snaptree::image::vhd::create::create_differencing(&child, &parent).expect("create child");
    snaptree::image::vhd::reparent::set_parent(&child, &parent, "../outside/p.vhd")
        .expect("re-point child");
    let before = std::fs::read(&parent).expect("read parent");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    assert_eq!(visible(&m.mnt), names(&["base"]));
    let status = status_text(&m.mnt);
    assert!(
        status.contains("child.vhd") && status.contains("outside the tree directory"),
        "status should name the image and the reason:\n{status}"
    );
    unmount_ok(m);
    assert_eq!(
        std::fs::read(&parent).expect("read parent"),
        before,
        "the parent outside the tree changed"
    );
}
