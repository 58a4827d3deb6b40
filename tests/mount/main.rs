//! The FUSE mount, for real: `snaptree mount` on trees built with
//! `qemu-img`/`qemu-io`, judged by `qemu-img convert/check/compare` and by
//! in-memory models (ARCHITECTURE.md, "The mounted layout" and "Testing").
//!
//! Each test builds its own tree in a temp directory, mounts it (normally
//! `-f`, as a child whose pid the guard holds) and tears the mount down
//! even when it fails; see `support`. Without `/dev/fuse`, qemu, or a
//! kernel that accepts the mount, a test prints `SKIP: ...` and returns.
//! Randomised tests print their seed; replay with `SNAPTREE_TEST_SEED`.
//!
//! This file holds what the tests share: the fixtures and the few
//! per-point helpers. The tests live by subject in the modules below.

mod guest_files;
mod guest_lvm;
mod guest_ntfs_xfs;
mod hostile_fs;
mod hostile_paths;
mod internal_deletes;
mod internal_snapshots;
mod internal_writes;
mod layout_contract;
mod libvirt;
mod lifecycle;
mod many_images;
mod memory;
mod merge;
mod model_tree;
mod modes;
mod multidisk;
#[path = "../common/qemu_vm.rs"]
mod qemu_vm;
mod reads;
mod support;
mod tree;
#[path = "../common/vhd_peers.rs"]
mod vhd_peers;
mod vhd_tree;
mod vhdx_tree;
mod writes;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use support::*;

/// Opens `MNT/<point>/disk.raw` for reading and writing.
fn open_rw(mnt: &Path, point: &str) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join(point).join("disk.raw"))
}

/// `MNT/<point>/disk.raw`.
fn disk(mnt: &Path, point: &str) -> std::path::PathBuf {
    mnt.join(point).join("disk.raw")
}

/// Writes `data` at `off` through `f` and into `model`.
fn write_both(f: &File, model: &mut [u8], off: u64, data: &[u8]) {
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("pwrite {} bytes at {off}: {e}", data.len()));
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Reads a point's whole disk through the mount and compares it.
#[track_caller]
fn assert_disk(mnt: &Path, point: &str, want: &[u8]) {
    assert_bytes_eq(
        &format!("{point}/disk.raw"),
        &read_disk(&disk(mnt, point)),
        want,
    );
}

/// A simple chain for tests that need one: `base.qcow2` (with data in
/// several places, some of it unaligned) under `leaf.qcow2` (a little data).
fn base_and_leaf(ws: &Workspace, size: u64) {
    ws.create_qcow2("base.qcow2", size, None, "");
    ws.qemu_io(
        "base.qcow2",
        "qcow2",
        &[
            "write -P 0x5a 0 3M",
            "write -P 0x5b 4194305 777777",
            "write -P 0x5c 9437184 65536",
        ],
    );
    ws.create_qcow2("leaf.qcow2", size, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("leaf.qcow2", "qcow2", &["write -P 0x61 1048577 5000"]);
}

/// A fresh workspace, or `None` (after printing SKIP) when the machine
/// cannot run the mount tests.
fn workspace() -> Option<Workspace> {
    prerequisites_or_skip().then(Workspace::new)
}

/// [`workspace`] holding the [`base_and_leaf`] chain of `size` bytes.
fn base_and_leaf_workspace(size: u64) -> Option<Workspace> {
    let ws = workspace()?;
    base_and_leaf(&ws, size);
    Some(ws)
}

/// Unmounts `m` and requires its daemon to exit 0.
#[track_caller]
fn unmount_ok(m: Mount) {
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

/// Punches a hole of `len` bytes at `off` through `f`, keeping its size.
fn punch_hole(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}
