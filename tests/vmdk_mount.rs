//! VMDK trees through the mount: a directory of VMDKs made by qemu-img (a
//! monolithicSparse base, a sparse delta, a twoGbMaxExtentSparse delta on
//! it, a monolithicFlat disk and a streamOptimized one) shows one point
//! per disk, never one per extent file, and every point reads like
//! `qemu-img convert`. VMDKs are read-only to snaptree, so a snapshot of
//! the VMDK leaf is a qcow2 overlay on it (judged by `qemu-img check` and
//! `convert`), and the VMDK files are left byte for byte as they were.
//!
//! A binary of its own (the mount tests' `support` is shared by path) so
//! that it adds no line to `tests/mount/main.rs`.

#[path = "mount/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use support::*;

const SIZE: u64 = 24 * MIB;

fn disk(mnt: &Path, point: &str) -> PathBuf {
    mnt.join(point).join("disk.raw")
}

#[track_caller]
fn assert_disk(mnt: &Path, point: &str, want: &[u8]) {
    assert_bytes_eq(
        &format!("{point}/disk.raw"),
        &read_disk(&disk(mnt, point)),
        want,
    );
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Every file of the tree directory with its bytes.
fn files(ws: &Workspace) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(&ws.images)
        .expect("read images")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "vmdk"))
        .map(|p| {
            let b = std::fs::read(&p).expect("read");
            (p.file_name().unwrap().to_string_lossy().into_owned(), b)
        })
        .collect();
    v.sort();
    v
}

fn create(ws: &Workspace, name: &str, opts: &str, parent: Option<&str>) {
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

#[test]
fn vmdk_directory_mounts_with_one_point_per_disk() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    create(&ws, "vm.vmdk", "", None);
    ws.qemu_io(
        "vm.vmdk",
        "vmdk",
        &["write -P 0x11 0 3M", "write -P 0x12 9437185 70000"],
    );
    create(&ws, "vm-000001.vmdk", "", Some("vm.vmdk"));
    ws.qemu_io("vm-000001.vmdk", "vmdk", &["write -P 0x21 1048577 5000"]);
    create(
        &ws,
        "vm-000002.vmdk",
        "subformat=twoGbMaxExtentSparse",
        Some("vm-000001.vmdk"),
    );
    ws.qemu_io("vm-000002.vmdk", "vmdk", &["write -P 0x31 20M 1M"]);
    create(&ws, "flat.vmdk", "subformat=monolithicFlat", None);
    ws.qemu_io("flat.vmdk", "vmdk", &["write -P 0x41 5M 1M"]);
    ws.create_raw("ova-src.img", SIZE);
    ws.qemu_io(
        "ova-src.img",
        "raw",
        &["write -P 0x51 0 2M", "write -P 0x52 17M 100k"],
    );
    ws.qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "ova-src.img",
        "ova.vmdk",
    ]);
    std::fs::remove_file(ws.img("ova-src.img")).expect("rm");
    let want: Vec<(&str, Vec<u8>)> = ["vm", "vm-000001", "vm-000002", "flat", "ova"]
        .iter()
        .map(|p| (*p, ws.flatten(&format!("{p}.vmdk"))))
        .collect();
    let before = files(&ws);

    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert_eq!(
        visible(&mnt),
        names(&["vm", "vm-000001", "vm-000002", "flat", "ova"]),
        "one point per disk (extent files are no points):\n{}",
        status_text(&mnt)
    );
    for (p, bytes) in &want {
        assert_disk(&mnt, p, bytes);
    }
    assert_eq!(info(&mnt, "vm-000002")["disks"]["disk"]["chain_depth"], 3);
    assert_eq!(info(&mnt, "vm-000002")["disks"]["disk"]["format"], "vmdk");

    // A snapshot of the VMDK leaf: a qcow2 overlay takes the writes.
    ctl_ok(&mnt, "vm-000002", "snapshot s1");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk(&mnt, "vm-000002"))
        .expect("open leaf");
    let mut leaf = want[2].1.clone();
    write_model(&f, &mut leaf, 20 * MIB - 100, &[0x77; 300]);
    drop(f);
    assert_disk(&mnt, "s1", &want[2].1);
    assert_disk(&mnt, "vm-000002", &leaf);
    unmount_ok(m);

    // The frozen leaf keeps its bytes under the snapshot's name (the
    // tree renames the leaf; its extent files keep theirs); every other
    // VMDK file is untouched.
    let mut after = files(&ws);
    let mut before = before;
    for (name, _) in after.iter_mut() {
        if name == "s1.vmdk" {
            *name = "vm-000002.vmdk".into();
        }
    }
    after.sort();
    before.sort();
    let changed: Vec<&String> = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a != b)
        .map(|(a, _)| &a.0)
        .collect();
    assert!(
        changed.is_empty() && after.len() == before.len(),
        "VMDK files changed: {changed:?} ({} files before, {} after)",
        before.len(),
        after.len()
    );
    let overlays = ws.qcow2_images();
    assert_eq!(overlays.len(), 1, "one qcow2 overlay: {overlays:?}");
    ws.check(&overlays[0]);
    assert_bytes_eq(
        "qemu-img convert of the overlay",
        &ws.flatten(&overlays[0]),
        &leaf,
    );
}

fn write_model(f: &File, model: &mut [u8], off: u64, data: &[u8]) {
    f.write_all_at(data, off).expect("pwrite");
    f.sync_all().expect("fsync");
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

#[track_caller]
fn unmount_ok(m: Mount) {
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}
