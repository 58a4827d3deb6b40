//! Memory checkpoints through the mount: `memory SOURCE` on a point's
//! `ctl` shows the source as `memory.raw` (read in place, by guest-physical
//! address), kept in the manifest across remounts, moved to the frozen
//! point by `snapshot`, read-only, with holes where the source has none.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::*;

const RAM: u64 = 16 * MIB;

/// A raw dump: random pages, whole zero pages, and a sparse hole.
fn raw_dump(ws: &Workspace, name: &str) -> Vec<u8> {
    let mut ram = pattern(42, RAM as usize);
    ram[(3 * MIB) as usize..(3 * MIB + 8192) as usize].fill(0);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(ws.img(name))
        .expect("create dump");
    f.write_all_at(&ram[..(8 * MIB) as usize], 0)
        .expect("write dump");
    // 8..12 MiB stays a hole in the file (zeros), then data again.
    ram[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    f.write_all_at(&ram[(12 * MIB) as usize..], 12 * MIB)
        .expect("write dump");
    ram
}

#[test]
fn memory_checkpoint_of_a_raw_dump() {
    let Some(ws) = base_and_leaf_workspace(RAM) else {
        return;
    };
    let ram = raw_dump(&ws, "leaf.vmem");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert!(!mnt.join("leaf/memory.raw").exists(), "no checkpoint yet");
    // Refusals: a missing file, a disk image of the tree.
    assert_errno(
        "memory of a missing file",
        ctl(&mnt, "leaf", "memory nosuch.vmem"),
        libc::ENOENT,
    );
    assert_errno(
        "memory of a disk image",
        ctl(&mnt, "leaf", "memory base.qcow2"),
        libc::EINVAL,
    );
    assert!(status_text(&mnt).contains("disk image of this tree"));

    ctl_ok(&mnt, "leaf", "memory leaf.vmem");
    let mem = mnt.join("leaf/memory.raw");
    assert_bytes_eq("leaf/memory.raw", &read_disk(&mem), &ram);
    let i = info(&mnt, "leaf");
    assert_eq!(i["memory"]["source"], "leaf.vmem", "{i}");
    assert_eq!(i["memory"]["kind"], "raw dump", "{i}");
    assert_eq!(i["memory"]["size"], RAM, "{i}");
    // The file's hole is a hole of memory.raw too.
    let f = std::fs::File::open(&mem).expect("open memory.raw");
    let data: Vec<(u64, u64)> = data_ranges(&f, RAM);
    drop(f); // an open file would keep the unmount below busy
    assert!(
        data.iter().all(|&(s, e)| e <= 8 * MIB || s >= 12 * MIB),
        "data reported inside the dump's hole: {data:?}"
    );
    assert_errno(
        "write to memory.raw",
        OpenOptions::new().write(true).open(&mem),
        libc::EROFS,
    );

    // The checkpoint moves to the point a snapshot freezes.
    ctl_ok(&mnt, "leaf", "snapshot s1");
    assert!(!mnt.join("leaf/memory.raw").exists());
    assert_bytes_eq(
        "s1/memory.raw",
        &read_disk(&mnt.join("s1/memory.raw")),
        &ram,
    );
    unmount_ok(m);

    // Kept in the manifest.
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_eq!(visible(&m.mnt), names(&["base", "s1", "leaf"]));
    assert_bytes_eq(
        "s1/memory.raw after remount",
        &read_disk(&m.mnt.join("s1/memory.raw")),
        &ram,
    );
    ctl_ok(&m.mnt, "s1", "memory none");
    assert!(!m.mnt.join("s1/memory.raw").exists());
    assert!(info(&m.mnt, "s1")["memory"].is_null());
    unmount_ok(m);
    assert!(
        ws.img("leaf.vmem").exists(),
        "the dump itself is never removed"
    );
}
