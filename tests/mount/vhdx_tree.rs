//! VHDX through the mount: a tree directory holding a VHDX made by
//! qemu-img reads like `qemu-img convert`; one whose metadata log was left
//! unapplied reads like QEMU after its own replay, is replayed into the
//! file only by a read-write mount (under the image's write lock; `status`
//! says so), and never by a read-only one. A VHDX leaf is writable: what
//! is written through the mount is what `qemu-img convert` reads after the
//! unmount, and `qemu-img check` is clean.

use std::path::Path;

use super::*;
use spec::Vhdx;

#[path = "../vhdx/spec.rs"]
mod spec;

const SIZE: u64 = 16 * MIB;

/// Whether the current header of `img` names a log to replay.
fn log_guid_set(img: &Path) -> bool {
    let v = Vhdx::load(img);
    let at = v.header_at();
    v.b[at + 48..at + 64] != [0; 16]
}

/// `base.vhdx` written by qemu-io, with a log entry (built from the spec)
/// pointing block 3 at block 0's data, not yet applied.
fn vhdx_with_log(ws: &Workspace) {
    ws.qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        "base.vhdx",
        &SIZE.to_string(),
    ]);
    ws.qemu_io(
        "base.vhdx",
        "vhdx",
        &["write -P 0x31 0 1M", "write -P 0x32 9M 700K"],
    );
    let mut v = Vhdx::load(&ws.img("base.vhdx"));
    let bat = v.region(&spec::BAT).0;
    let mut sector = v.b[bat as usize..bat as usize + 4096].to_vec();
    let b0 = spec::u64_at(&sector, 0);
    sector[24..32].copy_from_slice(&b0.to_le_bytes());
    v.log_entry([0x61; 16], 1, 0, &[(bat, sector)], &[]);
    v.save(&ws.img("base.vhdx"));
}

/// What QEMU reads from `base.vhdx` after its own replay (of a copy).
fn qemu_replayed(ws: &Workspace) -> Vec<u8> {
    std::fs::copy(ws.img("base.vhdx"), ws.img("copy.vhdx")).expect("copy");
    ws.qemu_img(&["check", "-q", "-r", "all", "copy.vhdx"]);
    let want = ws.flatten("copy.vhdx");
    std::fs::remove_file(ws.img("copy.vhdx")).expect("rm copy");
    want
}

#[test]
fn vhdx_tree_reads_like_qemu_and_is_written_through_the_mount() {
    let Some(ws) = workspace() else {
        return;
    };
    ws.qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        "disk.vhdx",
        &SIZE.to_string(),
    ]);
    ws.qemu_io(
        "disk.vhdx",
        "vhdx",
        &[
            "write -P 0x11 0 3M",
            "write -P 0x12 1000001 70000",
            "write -z 5M 1M",
        ],
    );
    let mut want = ws.flatten("disk.vhdx");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    assert_eq!(visible(&m.mnt), names(&["disk"]));
    assert_disk(&m.mnt, "disk", &want);
    assert_eq!(info(&m.mnt, "disk")["disks"]["disk"]["format"], "vhdx");
    // An unaligned write across a present block and a new one, a
    // sub-sector one, and one far into the disk.
    let f = open_rw(&m.mnt, "disk").expect("open the VHDX leaf read-write");
    for (at, len, fill) in [
        (3 * MIB - 700, 5000u64, 0x41u8),
        (9 * MIB + 3, 100, 0x42),
        (15 * MIB, MIB, 0x43),
    ] {
        f.write_all_at(&vec![fill; len as usize], at)
            .expect("write through the mount");
        want[at as usize..(at + len) as usize].fill(fill);
    }
    f.sync_all().expect("fsync");
    drop(f);
    assert_disk(&m.mnt, "disk", &want);
    unmount_ok(m);
    ws.check("disk.vhdx");
    assert_bytes_eq(
        "qemu-img convert after the mount",
        &ws.flatten("disk.vhdx"),
        &want,
    );
}

#[test]
fn vhdx_log_is_replayed_in_memory_read_only_and_into_the_file_read_write() {
    let Some(ws) = workspace() else {
        return;
    };
    vhdx_with_log(&ws);
    let want = qemu_replayed(&ws);
    let before = std::fs::read(ws.img("base.vhdx")).expect("read");

    // Read-only: replayed in memory, the file untouched.
    let Some(m) = ws.mount(&["-o", "ro,gc_idle=off"]) else {
        return;
    };
    assert_disk(&m.mnt, "base", &want);
    unmount_ok(m);
    assert!(
        std::fs::read(ws.img("base.vhdx")).expect("read") == before,
        "a read-only mount changed the file"
    );
    assert!(log_guid_set(&ws.img("base.vhdx")));

    // Read-write: replayed into the file under the write lock.
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_disk(&m.mnt, "base", &want);
    let status = status_text(&m.mnt);
    assert!(
        status.contains("base.vhdx") && status.contains("repaired"),
        "status:\n{status}"
    );
    unmount_ok(m);
    assert!(
        !log_guid_set(&ws.img("base.vhdx")),
        "the log is still pending"
    );
    ws.check("base.vhdx");
    assert_bytes_eq(
        "qemu-img convert after the replay",
        &ws.flatten("base.vhdx"),
        &want,
    );
}
