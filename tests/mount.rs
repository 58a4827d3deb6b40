//! The FUSE mount, for real: `snaptree mount` on trees built with
//! `qemu-img`/`qemu-io`, judged by `qemu-img convert/check/compare` and by
//! in-memory models (DESIGN.md, "Mounted layout" and "Testing").
//!
//! Each test builds its own tree in a temp directory, mounts it (normally
//! `-f`, as a child whose pid the guard holds) and tears the mount down
//! even when it fails; see `mount_support`. Without `/dev/fuse`, qemu, or a
//! kernel that accepts the mount, a test prints `SKIP: ...` and returns.
//! Randomised tests print their seed; replay with `SNAPTREE_TEST_SEED`.

mod mount_support;

use mount_support::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

// ---------------------------------------------------------------------------
// 1. Every point reads as qemu-img convert flattens it; sparse copies; seeks
// ---------------------------------------------------------------------------

#[test]
fn every_point_reads_like_qemu_img_convert() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 32 * MIB;
    // base.raw (raw root) <- snap1 <- snap2 <- leaf
    //                        snap1 <- clone (4 KiB clusters)
    // other.qcow2: a second, qcow2 root (4 KiB clusters).
    ws.create_raw("base.raw", S);
    let base = File::options()
        .write(true)
        .open(ws.img("base.raw"))
        .expect("open base.raw");
    base.write_all_at(&pattern(1, 3 * MIB as usize), 0)
        .expect("write base.raw");
    base.write_all_at(&pattern(2, MIB as usize + 333), 10 * MIB + 77)
        .expect("write base.raw");
    drop(base);
    ws.create_qcow2("snap1.qcow2", S, Some(("base.raw", "raw")), "");
    ws.qemu_io(
        "snap1.qcow2",
        "qcow2",
        &[
            "write -P 0x22 1048577 70000",
            "write -z 2097152 300000",
            "write -P 0x23 20M 1M",
            "discard 10M 64k",
        ],
    );
    ws.create_qcow2("snap2.qcow2", S, Some(("snap1.qcow2", "qcow2")), "");
    ws.qemu_io(
        "snap2.qcow2",
        "qcow2",
        &["write -P 0x33 5M 123457", "write -P 0x34 0 512"],
    );
    ws.create_qcow2("leaf.qcow2", S, Some(("snap2.qcow2", "qcow2")), "");
    ws.qemu_io("leaf.qcow2", "qcow2", &["write -P 0x44 7M 4097"]);
    ws.create_qcow2(
        "clone.qcow2",
        S,
        Some(("snap1.qcow2", "qcow2")),
        "cluster_size=4096",
    );
    ws.qemu_io(
        "clone.qcow2",
        "qcow2",
        &["write -P 0x55 1M 9000", "write -z 0 4096"],
    );
    ws.create_qcow2("other.qcow2", 16 * MIB, None, "cluster_size=4096");
    ws.qemu_io(
        "other.qcow2",
        "qcow2",
        &["write -P 0x66 1M 100k", "write -P 0x67 9M 4096"],
    );
    let points = [
        ("base", "base.raw", None),
        ("snap1", "snap1.qcow2", Some("base")),
        ("snap2", "snap2.qcow2", Some("snap1")),
        ("leaf", "leaf.qcow2", Some("snap2")),
        ("clone", "clone.qcow2", Some("snap1")),
        ("other", "other.qcow2", None),
    ];
    let expected: Vec<Vec<u8>> = points.iter().map(|(_, img, _)| ws.flatten(img)).collect();

    let Some(m) = ws.mount(&[]) else { return };
    let mnt = &m.mnt;
    assert_eq!(
        visible(mnt),
        names(&["base", "snap1", "snap2", "leaf", "clone", "other"])
    );
    let tree = read_text(&mnt.join("tree"));
    for ((name, image, parent), want) in points.iter().zip(&expected) {
        assert!(tree.contains(name), "tree does not show {name}:\n{tree}");
        let meta = std::fs::metadata(disk(mnt, name)).expect("stat disk.raw");
        assert_eq!(meta.len(), want.len() as u64, "{name}: size of disk.raw");
        assert_disk(mnt, name, want);
        let i = info(mnt, name);
        assert_eq!(i["name"], *name, "{name}/info.json: {i}");
        assert_eq!(i["disks"]["disk"]["image"], *image, "{name}/info.json: {i}");
        assert_eq!(
            i["disks"]["disk"]["virtual_size"],
            want.len() as u64,
            "{name}/info.json: {i}"
        );
        assert_eq!(
            i["parent"].as_str(),
            *parent,
            "{name}/info.json parent: {i}"
        );
        assert_eq!(
            parent_link(mnt, name),
            parent.map(|p| format!("../{p}")),
            "{name}/parent"
        );
        let kind = if matches!(*name, "leaf" | "clone" | "other") {
            "leaf"
        } else {
            "snapshot"
        };
        assert_eq!(i["kind"], kind, "{name}/info.json: {i}");
        // SEEK_DATA/SEEK_HOLE agree with qemu-img map's data ranges.
        let f = File::open(disk(mnt, name)).expect("open disk.raw");
        assert_eq!(
            data_ranges(&f, want.len() as u64),
            qemu_data_ranges(&ws, image),
            "{name}: SEEK_DATA/SEEK_HOLE ranges vs qemu-img map data ranges"
        );
    }

    // Exact seeks on `other` (4 KiB clusters, data at 1 MiB+100 KiB, 9 MiB+4 KiB).
    let f = File::open(disk(mnt, "other")).expect("open other");
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).ok(), Some(MIB));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE).ok(), Some(0));
    assert_eq!(lseek(&f, MIB + 5, libc::SEEK_DATA).ok(), Some(MIB + 5));
    assert_eq!(lseek(&f, MIB, libc::SEEK_HOLE).ok(), Some(MIB + 102_400));
    assert_eq!(
        lseek(&f, MIB + 102_400, libc::SEEK_DATA).ok(),
        Some(9 * MIB)
    );
    assert_eq!(
        lseek(&f, 9 * MIB + 4096, libc::SEEK_HOLE).ok(),
        Some(9 * MIB + 4096)
    );
    assert_eq!(
        errno_of(
            "SEEK_DATA after the last data",
            lseek(&f, 9 * MIB + 4096, libc::SEEK_DATA)
        ),
        libc::ENXIO
    );
    assert_eq!(
        errno_of("SEEK_DATA at the end", lseek(&f, 16 * MIB, libc::SEEK_DATA)),
        libc::ENXIO
    );
    drop(f);

    // cp --sparse=always: same bytes, and a sparse copy.
    for (i, name) in [(3usize, "leaf"), (5, "other")] {
        let copy = ws.scratch(&format!("copy-{name}.raw"));
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(disk(mnt, name))
            .arg(&copy));
        let bytes = std::fs::read(&copy).expect("read copy");
        assert_bytes_eq(
            &format!("cp --sparse=always of {name}"),
            &bytes,
            &expected[i],
        );
        let meta = std::fs::metadata(&copy).expect("stat copy");
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < meta.len() / 2,
            "cp --sparse=always of {name}: {allocated} bytes allocated of {}",
            meta.len()
        );
    }
    let status = m.unmount();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon exit: {status:?}"
    );
    ws.check_all();
}

// ---------------------------------------------------------------------------
// 2. Random writes through a leaf against a model
// ---------------------------------------------------------------------------

#[test]
fn random_writes_match_a_model() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 32 * MIB;
    base_and_leaf(&ws, S);
    let base_before = ws.flatten("base.qcow2");
    let mut model = ws.flatten("leaf.qcow2");
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);

    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    let f = open_rw(&mnt, "leaf").expect("open leaf/disk.raw rw");
    let mut zero_range_ok = true;
    // Edge cases first, then random operations.
    write_both(&f, &mut model, S - 3, &[1, 2, 3]);
    write_both(&f, &mut model, 0, &[9]);
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        S - 5000,
        10_000,
    )
    .expect("punch hole across the end");
    model[(S - 5000) as usize..].fill(0);
    const OPS: usize = 300;
    for op in 0..OPS {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..600),
            1 => rng.gen_range(1..70_000),
            2 => rng.gen_range(60_000..300_000),
            _ => 65_536 * rng.gen_range(1..4) + rng.gen_range(0..3),
        } as u64;
        let off = rng.gen_range(0..=S - len);
        let kind = rng.gen_range(0..100);
        let what = match kind {
            0..=44 => {
                let data = pattern(seed ^ op as u64, len as usize);
                write_both(&f, &mut model, off, &data);
                "write"
            }
            45..=59 => {
                write_both(&f, &mut model, off, &vec![0u8; len as usize]);
                "write zeros"
            }
            60..=74 => {
                fallocate(
                    &f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap_or_else(|e| panic!("op {op}: punch hole {off}+{len}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
                "punch hole"
            }
            75..=89 => match fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, off, len) {
                Ok(()) => {
                    model[off as usize..(off + len) as usize].fill(0);
                    "zero range"
                }
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && op == 0 => {
                    zero_range_ok = false;
                    "zero range (unsupported by this kernel)"
                }
                Err(e) => panic!("op {op}: zero range {off}+{len}: {e}"),
            },
            _ => {
                f.sync_all()
                    .unwrap_or_else(|e| panic!("op {op}: fsync: {e}"));
                "fsync"
            }
        };
        if what != "fsync" {
            // Read back the range and a margin around it, from the daemon.
            let a = off.saturating_sub(4097);
            let b = (off + len + 4097).min(S);
            assert_bytes_eq(
                &format!("op {op} ({what} {off}+{len}, seed {seed}): read back [{a}, {b})"),
                &read_at(&f, a, (b - a) as usize),
                &model[a as usize..b as usize],
            );
        }
        if op == OPS / 2 {
            // fsync makes everything durable: the image on disk, read by
            // qemu while still mounted, is consistent and equals the model.
            f.sync_all().expect("fsync");
            ws.check("leaf.qcow2");
            ws.compare("leaf.qcow2", &model);
        }
        if op % 60 == 59 {
            assert_disk(&mnt, "leaf", &model);
        }
    }
    if !zero_range_ok {
        eprintln!(
            "{}: note: FALLOC_FL_ZERO_RANGE not supported by this kernel's FUSE",
            test_name()
        );
    }
    f.sync_all().expect("fsync");
    assert_disk(&mnt, "leaf", &model);
    drop(f);
    let status = m.unmount();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon exit: {status:?}"
    );
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
    ws.compare("base.qcow2", &base_before);
}

// ---------------------------------------------------------------------------
// 3. snapshot, clone, delete and rmdir
// ---------------------------------------------------------------------------

/// fsync the leaf descriptor and `qemu-img check` every image, mounted.
fn checkpoint(ws: &Workspace, leaf: &File) {
    leaf.sync_all().expect("fsync leaf");
    ws.check_all();
}

#[test]
fn snapshot_clone_delete_change_the_tree() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
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
        read_text(&mnt.join("status")).contains("last command: leaf/ctl: snapshot s1: ok"),
        "status:\n{}",
        read_text(&mnt.join("status"))
    );
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf"]));
    let tree = read_text(&mnt.join("tree"));
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
    assert_eq!(
        errno_of("open s1/disk.raw for write", open_rw(&mnt, "s1")),
        libc::EROFS
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
    assert_eq!(
        errno_of("snapshot of a non-leaf", ctl(&mnt, "s1", "snapshot x")),
        libc::EINVAL
    );
    assert_eq!(
        errno_of("snapshot to a taken name", ctl(&mnt, "leaf", "snapshot s1")),
        libc::EEXIST
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
    assert_eq!(
        errno_of("open c1 (now a snapshot) for write", open_rw(&mnt, "c1")),
        libc::EROFS
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
    let tree = read_text(&mnt.join("tree"));
    assert!(
        tree.lines()
            .any(|l| l.contains("s2") && l.contains("hidden")),
        "tree does not show s2 hidden:\n{tree}"
    );
    assert_disk(&mnt, "leaf", &model);
    write_both(&early, &mut model, 15 * MIB, &pattern(17, 123));
    checkpoint(&ws, &early);

    // --- rmdir c1 (a leaf): its image goes ---
    std::fs::remove_dir(mnt.join("c1")).expect("rmdir c1");
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf"]));
    assert!(!ws.img("c1.qcow2").exists(), "c1.qcow2 left behind");
    assert_eq!(
        errno_of("rmdir of a gone point", std::fs::remove_dir(mnt.join("c1"))),
        libc::ENOENT
    );
    assert_disk(&mnt, "s1", &model_s1);
    assert_disk(&mnt, "leaf", &model);
    checkpoint(&ws, &early);

    // --- unmount: images clean and equal to the models ---
    drop(early);
    let status = m.unmount();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon exit: {status:?}"
    );
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
    let tree = read_text(&mnt.join("tree"));
    assert!(
        tree.lines()
            .any(|l| l.contains("s2") && l.contains("hidden")),
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
    let status = m.unmount();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon exit: {status:?}"
    );
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
}

// ---------------------------------------------------------------------------
// 4. Concurrent readers while a writer writes and snapshots
// ---------------------------------------------------------------------------

/// Sets the flag when dropped, so a panicking writer still stops readers.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn readers_and_a_snapshotting_writer() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    // base <- p1 <- p2 <- p3 <- leaf, each layer with its own data.
    ws.create_qcow2("base.qcow2", S, None, "");
    ws.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 0x10 0 6M", "write -P 0x11 10M 1M"],
    );
    let mut below = "base.qcow2".to_string();
    for (i, p) in ["p1", "p2", "p3"].iter().enumerate() {
        let name = format!("{p}.qcow2");
        ws.create_qcow2(&name, S, Some((&below, "qcow2")), "");
        let c1 = format!(
            "write -P {} {} 700001",
            0x20 + i,
            i as u64 * 2 * MIB + 12_345
        );
        let c2 = format!("write -z {} 65536", 9 * MIB + i as u64 * 65_536);
        ws.qemu_io(&name, "qcow2", &[&c1, &c2]);
        below = name;
    }
    ws.create_qcow2("leaf.qcow2", S, Some(("p3.qcow2", "qcow2")), "");
    // A second leaf on p3, written meanwhile by another thread.
    ws.create_qcow2("c.qcow2", S, Some(("p3.qcow2", "qcow2")), "");
    let mut model_c = ws.flatten("c.qcow2");
    let readers = ["base", "p1", "p2", "p3"];
    let expected: Vec<Arc<Vec<u8>>> = readers
        .iter()
        .map(|p| {
            let img = format!("{p}.qcow2");
            Arc::new(ws.flatten(&img))
        })
        .collect();
    let mut model = ws.flatten("leaf.qcow2");
    let seed = seed();

    let Some(m) = ws.mount(&["--threads", "4"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let stop = AtomicBool::new(false);
    let newest: Mutex<Option<(String, Arc<Vec<u8>>)>> = Mutex::new(None);
    let reads = AtomicUsize::new(0);
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    std::thread::scope(|s| {
        for (point, want) in readers.iter().zip(&expected) {
            let (mnt, stop, newest, reads) = (&mnt, &stop, &newest, &reads);
            s.spawn(move || {
                let started = Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(90) {
                    assert_bytes_eq(
                        &format!("reader of {point}, pass {n}"),
                        &read_disk(&disk(mnt, point)),
                        want,
                    );
                    reads.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                    if n.is_multiple_of(2) {
                        let snap = newest.lock().unwrap().clone();
                        if let Some((name, want)) = snap {
                            assert_bytes_eq(
                                &format!("reader of {point}, reading {name}"),
                                &read_disk(&disk(mnt, &name)),
                                &want,
                            );
                        }
                    }
                }
            });
        }
        // A reader of the leaf's upper half, which the writer never
        // touches: snapshots swap the leaf's chain under it.
        let (mnt_l, stop_l, reads_l) = (&mnt, &stop, &reads);
        let upper = model[(S / 2) as usize..].to_vec();
        s.spawn(move || {
            let early = File::open(disk(mnt_l, "leaf")).expect("open leaf");
            let mut n = 0u64;
            while !stop_l.load(Ordering::SeqCst) {
                let got = if n.is_multiple_of(2) {
                    read_at(&early, S / 2, (S / 2) as usize)
                } else {
                    let f = File::open(disk(mnt_l, "leaf")).expect("open leaf");
                    read_at(&f, S / 2, (S / 2) as usize)
                };
                assert_bytes_eq(&format!("leaf upper half, pass {n}"), &got, &upper);
                reads_l.fetch_add(1, Ordering::SeqCst);
                n += 1;
            }
        });
        // The other leaf's writer: until the snapshots are done.
        let (mnt_c, stop_c, model_c) = (&mnt, &stop, &mut model_c);
        s.spawn(move || {
            let mut rng = SmallRng::seed_from_u64(seed ^ 0xc);
            let f = open_rw(mnt_c, "c").expect("open c rw");
            let mut n = 0u64;
            while !stop_c.load(Ordering::SeqCst) {
                let len = rng.gen_range(1..100_000u64);
                let off = rng.gen_range(0..=S - len);
                write_both(
                    &f,
                    model_c,
                    off,
                    &pattern(seed ^ (1 << 40) ^ n, len as usize),
                );
                n += 1;
            }
            assert_bytes_eq("c, read back", &read_at(&f, 0, S as usize), model_c);
        });
        // The writer.
        let _stop = StopOnDrop(&stop);
        let mut rng = SmallRng::seed_from_u64(seed);
        let f = open_rw(&mnt, "leaf").expect("open leaf rw");
        for round in 0..10 {
            for w in 0..25 {
                let len = rng.gen_range(1..200_000u64);
                let off = rng.gen_range(0..=S / 2 - len);
                let data = pattern(seed ^ (round * 100 + w), len as usize);
                write_both(&f, &mut model, off, &data);
            }
            let name = format!("w{round}");
            ctl_ok(&mnt, "leaf", &format!("snapshot {name}"));
            assert_disk(&mnt, &name, &model);
            *newest.lock().unwrap() = Some((name.clone(), Arc::new(model.clone())));
            snapshots.push((name, model.clone()));
        }
        assert_disk(&mnt, "leaf", &model);
        // Let the readers see the last snapshot a few times.
        let target = reads.load(Ordering::SeqCst) + 8;
        let waited = wait_until(Duration::from_secs(60), || {
            reads.load(Ordering::SeqCst) >= target
        });
        assert!(waited, "readers stalled");
    });
    eprintln!(
        "{}: {} whole-disk reads during {} snapshots",
        test_name(),
        reads.load(Ordering::SeqCst),
        snapshots.len()
    );
    let status = m.unmount();
    assert!(
        status.is_some_and(|s| s.success()),
        "daemon exit: {status:?}"
    );
    ws.check_all();
    for (name, want) in &snapshots {
        ws.compare(&format!("{name}.qcow2"), want);
    }
    for (p, want) in readers.iter().zip(&expected) {
        ws.compare(&format!("{p}.qcow2"), want);
    }
    ws.compare("leaf.qcow2", &model);
    ws.compare("c.qcow2", &model_c);
}

// ---------------------------------------------------------------------------
// 5. Errors
// ---------------------------------------------------------------------------

#[test]
fn errors_are_errnos_with_reasons() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let base_bytes = ws.flatten("base.qcow2");
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    let status = || read_text(&mnt.join("status"));

    // Non-leaf disks are read-only.
    assert_eq!(
        errno_of(
            "open base/disk.raw O_WRONLY",
            OpenOptions::new().write(true).open(disk(&mnt, "base"))
        ),
        libc::EROFS
    );
    assert_eq!(
        errno_of("open base/disk.raw O_RDWR", open_rw(&mnt, "base")),
        libc::EROFS
    );

    // Unknown and malformed ctl commands: EINVAL, reason in status.
    assert_eq!(
        errno_of("ctl frobnicate", ctl(&mnt, "leaf", "frobnicate\n")),
        libc::EINVAL
    );
    let st = status();
    assert!(
        st.contains("last command: leaf/ctl: frobnicate: error:") && st.contains("unknown command"),
        "status after an unknown command:\n{st}"
    );
    assert_eq!(
        errno_of("ctl snapshot without a name", ctl(&mnt, "leaf", "snapshot")),
        libc::EINVAL
    );
    assert!(status().contains("error:"), "status:\n{}", status());
    assert_eq!(
        errno_of("ctl snapshot .x", ctl(&mnt, "leaf", "snapshot .x")),
        libc::EINVAL
    );
    assert_eq!(
        errno_of("ctl snapshot a/b", ctl(&mnt, "leaf", "snapshot a/b")),
        libc::EINVAL
    );
    assert_eq!(
        errno_of("ctl snapshot tree", ctl(&mnt, "leaf", "snapshot tree")),
        libc::EINVAL
    );
    assert_eq!(
        errno_of("ctl snapshot base", ctl(&mnt, "leaf", "snapshot base")),
        libc::EEXIST
    );
    assert_eq!(
        errno_of("ctl on base: snapshot", ctl(&mnt, "base", "snapshot y")),
        libc::EINVAL
    );
    assert!(
        status().contains("base/ctl: snapshot y: error:"),
        "status:\n{}",
        status()
    );
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));

    // A disk keeps its size: truncate to another size fails.
    let f = open_rw(&mnt, "leaf").expect("open leaf rw");
    errno_of("truncate to size-4096", f.set_len(S - 4096));
    errno_of("truncate to size+4096", f.set_len(S + 4096));
    errno_of("truncate to 0", f.set_len(0));
    assert!(
        status().contains("truncate"),
        "status does not explain the truncate:\n{}",
        status()
    );
    f.set_len(S).expect("truncate to the same size is harmless");
    errno_of(
        "open leaf/disk.raw with O_TRUNC",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(disk(&mnt, "leaf")),
    );
    // Writes do not grow the disk: one across the end is short or fails,
    // one at the end fails.
    let mut leaf_bytes = leaf_bytes;
    match f.write_at(&[1, 2, 3, 4], S - 2) {
        Err(_) => {}
        Ok(n) => {
            assert!(n <= 2, "pwrite of 4 bytes at size-2 wrote {n}");
            leaf_bytes[(S - 2) as usize..(S - 2) as usize + n].copy_from_slice(&[1, 2][..n]);
        }
    }
    assert_eq!(
        errno_of("pwrite at the end", f.write_at(&[1], S)),
        libc::EFBIG
    );
    drop(f);
    assert_eq!(
        std::fs::metadata(disk(&mnt, "leaf")).expect("stat").len(),
        S
    );
    assert_disk(&mnt, "leaf", &leaf_bytes);
    assert_disk(&mnt, "base", &base_bytes);
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);

    // -o ro: everything is read-only.
    let m = ws.remount(&["-o", "ro"]);
    let mnt = m.mnt.clone();
    assert!(
        read_text(&mnt.join("status")).contains("read-only"),
        "status of a ro mount:\n{}",
        read_text(&mnt.join("status"))
    );
    assert_eq!(
        errno_of("ro: open leaf for write", open_rw(&mnt, "leaf")),
        libc::EROFS
    );
    assert_eq!(
        errno_of("ro: ctl snapshot", ctl(&mnt, "leaf", "snapshot s")),
        libc::EROFS
    );
    assert_eq!(
        errno_of("ro: ctl delete", ctl(&mnt, "leaf", "delete")),
        libc::EROFS
    );
    assert_eq!(
        errno_of("ro: rmdir leaf", std::fs::remove_dir(mnt.join("leaf"))),
        libc::EROFS
    );
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert_disk(&mnt, "leaf", &leaf_bytes);
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);
    assert!(!ws.img("s.qcow2").exists());
}

#[test]
fn broken_images_are_listed_and_the_rest_mounts() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let base_bytes = ws.flatten("base.qcow2");
    let leaf_bytes = ws.flatten("leaf.qcow2");
    // x.qcow2: qcow2 magic, then junk.
    let mut junk = b"QFI\xfb".to_vec();
    junk.extend(pattern(99, 8192));
    std::fs::write(ws.img("x.qcow2"), &junk).expect("write x.qcow2");
    // orphan.qcow2: its backing file does not exist.
    ws.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "orphan.qcow2",
        "16M",
    ]);
    // kid.qcow2: backed by the broken x.qcow2.
    ws.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "x.qcow2",
        "-F",
        "qcow2",
        "kid.qcow2",
        "16M",
    ]);
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    let st = read_text(&mnt.join("status"));
    for broken in ["x.qcow2", "orphan.qcow2", "kid.qcow2"] {
        assert!(
            st.lines()
                .skip_while(|l| !l.starts_with("problems"))
                .any(|l| l.contains(broken)),
            "status does not list {broken} as a problem:\n{st}"
        );
    }
    assert!(
        st.contains("missing.qcow2"),
        "status does not name the missing backing file:\n{st}"
    );
    assert_disk(&mnt, "base", &base_bytes);
    assert_disk(&mnt, "leaf", &leaf_bytes);
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    assert_eq!(std::fs::read(ws.img("x.qcow2")).expect("x.qcow2"), junk);
}

// ---------------------------------------------------------------------------
// 6. mount -t snaptree through mount.snaptree
// ---------------------------------------------------------------------------

/// The helper installed at a path; dropping it puts back what was there
/// before (or removes it).
struct InstalledHelper {
    path: &'static str,
    previous: Option<Vec<u8>>,
}

impl InstalledHelper {
    fn install(from: &Path, path: &'static str) -> InstalledHelper {
        use std::os::unix::fs::PermissionsExt;
        let previous = std::fs::read(path).ok();
        let installed = InstalledHelper { path, previous };
        let tmp = format!("{path}.snaptree-test-{}", std::process::id());
        std::fs::copy(from, &tmp).expect("copy the helper");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the helper");
        std::fs::rename(&tmp, path).expect("install the helper");
        installed
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        match &self.previous {
            Some(old) => {
                let _ = std::fs::write(self.path, old);
                let _ = std::fs::set_permissions(self.path, std::fs::Permissions::from_mode(0o755));
            }
            None => {
                let _ = std::fs::remove_file(self.path);
            }
        }
    }
}

#[test]
fn mount_t_snaptree_through_the_helper() {
    if !prerequisites_or_skip() {
        return;
    }
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.snaptree");
    if !helper.exists() {
        skip(&format!("{} does not exist yet", helper.display()));
        return;
    }
    let _installed = InstalledHelper::install(&helper, "/sbin/mount.snaptree");
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let leaf_bytes = ws.flatten("leaf.qcow2");

    for opts in [None, Some("ro")] {
        let guard = Mount::background(&ws.mnt);
        let mut c = Command::new("mount");
        c.args(["-t", "snaptree"]);
        if let Some(o) = opts {
            c.args(["-o", o]);
        }
        c.arg(&ws.images)
            .arg(&ws.mnt)
            .env("SNAPTREE_BIN", bin())
            .current_dir("/");
        let o = run_unchecked(&mut c);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("/dev/fuse") || err.contains("No such device") {
                skip(&format!("FUSE mount refused: {err}"));
                return;
            }
            panic!(
                "{} failed ({}): {}{}",
                describe(&c),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                err
            );
        }
        // mount(8) returns once mounted: no polling.
        assert!(
            ws.mnt.join("tree").exists(),
            "{}: returned 0 but MNT/tree does not exist",
            describe(&c)
        );
        let entry = mount_entry(&ws.mnt).unwrap_or_default();
        assert!(is_fuse_entry(&entry), "/proc/mounts: {entry:?}");
        assert_eq!(visible(&ws.mnt), names(&["base", "leaf"]));
        assert_disk(&ws.mnt, "leaf", &leaf_bytes);
        let pids = guard.daemon_pids();
        assert_eq!(
            pids.len(),
            1,
            "daemons serving {}: {pids:?}",
            ws.mnt.display()
        );
        match opts {
            Some("ro") => {
                assert!(
                    entry
                        .split(' ')
                        .nth(3)
                        .is_some_and(|o| o.split(',').any(|x| x == "ro")),
                    "-o ro not in /proc/mounts: {entry}"
                );
                assert_eq!(
                    errno_of("ro: open leaf for write", open_rw(&ws.mnt, "leaf")),
                    libc::EROFS
                );
            }
            _ => {
                let f = open_rw(&ws.mnt, "leaf").expect("open leaf rw");
                f.write_all_at(&leaf_bytes[..4096], 0).expect("write");
            }
        }
        guard.unmount();
        assert!(!is_mounted(&ws.mnt));
    }
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);
}

// ---------------------------------------------------------------------------
// 7. SIGTERM and SIGINT unmount cleanly
// ---------------------------------------------------------------------------

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    if !prerequisites_or_skip() {
        return;
    }
    for (sig, sig_name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let ws = Workspace::new();
        const S: u64 = 16 * MIB;
        base_and_leaf(&ws, S);
        let mut model = ws.flatten("leaf.qcow2");
        let Some(m) = ws.mount(&[]) else { return };
        {
            // Written, not fsynced: the daemon must flush on its way out.
            let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
            write_both(&f, &mut model, 77, &pattern(sig as u64, 3 * MIB as usize));
            write_both(&f, &mut model, 11 * MIB + 1, &pattern(5, 4097));
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                MIB,
                65_536,
            )
            .expect("punch hole");
            model[MIB as usize..(MIB + 65_536) as usize].fill(0);
        }
        ctl_ok(&m.mnt, "leaf", "snapshot before-signal");
        let snap = model.clone();
        {
            let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
            write_both(&f, &mut model, 6 * MIB, &pattern(6, 100_000));
        }
        let mnt = m.mnt.clone();
        kill(m.pid(), sig);
        let status = m.wait_exit();
        assert_eq!(status.code(), Some(0), "{sig_name}: daemon exit {status:?}");
        assert!(
            !is_mounted(&mnt),
            "{sig_name}: {} still in /proc/mounts",
            mnt.display()
        );
        ws.check_all();
        ws.compare("leaf.qcow2", &model);
        ws.compare("before-signal.qcow2", &snap);
    }
}

/// SIGKILL while writing: the images stay consistent (`qemu-img check`
/// finds no corruption; leaked clusters are allowed) and everything
/// fsynced before the kill reads back exactly.
#[test]
fn sigkill_leaves_images_consistent() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let mut model = ws.flatten("leaf.qcow2");
    let Some(mut m) = ws.mount(&[]) else { return };
    let synced_end = {
        let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
        write_both(&f, &mut model, 12_345, &pattern(1, 5 * MIB as usize));
        write_both(&f, &mut model, 9 * MIB + 3, &pattern(2, 70_000));
        f.sync_all().expect("fsync");
        // Not synced: may or may not survive, but must not corrupt.
        for i in 0..64u64 {
            f.write_all_at(&pattern(100 + i, 40_000), 10 * MIB + i * 65_536)
                .expect("pwrite");
        }
        10 * MIB
    };
    let mnt = m.mnt.clone();
    kill(m.pid(), libc::SIGKILL);
    let status = m.wait_for_kill();
    assert!(!status.success(), "killed daemon exited {status:?}");
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    let out = ws.qemu_img_unchecked(&["check", "leaf.qcow2"]);
    // 0 = clean, 3 = leaked clusters only; 2 would be corruption.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check after SIGKILL: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let got = ws.flatten("leaf.qcow2");
    assert_bytes_eq(
        "fsynced part of the leaf after SIGKILL",
        &got[..synced_end as usize],
        &model[..synced_end as usize],
    );
}

/// A raw disk whose guest wrote a qcow2 header into its first sector stays
/// raw: the format its child records wins over the magic, so a guest cannot
/// make snaptree parse metadata it chose (and follow a backing file of its
/// choosing).
#[test]
fn raw_disk_with_a_guest_written_qcow2_header_stays_raw() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    // A real qcow2 header naming another image as its backing file...
    ws.create_qcow2("victim.qcow2", S, None, "");
    ws.qemu_io("victim.qcow2", "qcow2", &["write -P 0x77 0 1M"]);
    ws.create_qcow2("evil.qcow2", S, Some(("victim.qcow2", "qcow2")), "");
    let header = std::fs::read(ws.img("evil.qcow2")).expect("read evil");
    std::fs::remove_file(ws.img("evil.qcow2")).expect("rm evil");
    // ...written by the "guest" into the first sector of its raw disk.
    ws.create_raw("disk.raw", S);
    let f = OpenOptions::new()
        .write(true)
        .open(ws.img("disk.raw"))
        .expect("open raw");
    f.write_all_at(&header[..4096], 0).expect("write header");
    drop(f);
    ws.create_qcow2("leaf.qcow2", S, Some(("disk.raw", "raw")), "");
    let raw_bytes = std::fs::read(ws.img("disk.raw")).expect("read raw");
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    assert_disk(&m.mnt, "disk", &raw_bytes);
    assert_disk(&m.mnt, "leaf", &leaf_bytes);
    let info = info(&m.mnt, "disk");
    assert_eq!(info["disks"]["disk"]["format"], "raw", "{info}");
    m.unmount();
}

// ---------------------------------------------------------------------------
// 8. Background mode
// ---------------------------------------------------------------------------

#[test]
fn background_mount_returns_when_ready() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let leaf_bytes = ws.flatten("leaf.qcow2");
    // The guard exists before the mount, so even a failure below unmounts.
    let guard = Mount::background(&ws.mnt);
    let mut c = Command::new(bin());
    c.arg("mount")
        .arg(&ws.images)
        .arg(&ws.mnt)
        .current_dir("/")
        .env("SNAPTREE_LOG", "warn");
    let o = run_with_timeout(&mut c, Duration::from_secs(30));
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("cannot mount") {
            skip(&format!("FUSE mount refused: {err}"));
            return;
        }
        panic!("{} failed ({}): {err}", describe(&c), o.status);
    }
    // Ready when the command returns: no polling.
    assert!(
        ws.mnt.join("tree").exists(),
        "snaptree mount returned 0 before MNT/tree existed"
    );
    let pids = guard.daemon_pids();
    assert_eq!(
        pids.len(),
        1,
        "daemons serving {}: {pids:?}",
        ws.mnt.display()
    );
    assert_eq!(visible(&ws.mnt), names(&["base", "leaf"]));
    assert_disk(&ws.mnt, "leaf", &leaf_bytes);
    let mut model = leaf_bytes.clone();
    {
        let f = open_rw(&ws.mnt, "leaf").expect("open leaf rw");
        write_both(&f, &mut model, 4097, &pattern(8, 50_000));
    }
    guard.unmount();
    assert!(!is_mounted(&ws.mnt));
    ws.check_all();
    ws.compare("leaf.qcow2", &model);

    // A failing background mount says why, exits non-zero, leaves nothing.
    let empty = ws.scratch("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let guard = Mount::background(&ws.mnt);
    let mut c = Command::new(bin());
    c.arg("mount").arg(&empty).arg(&ws.mnt).current_dir("/");
    let o = run_with_timeout(&mut c, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "mounting an empty directory succeeded");
    assert!(err.contains("no usable image"), "stderr: {err}");
    assert!(!is_mounted(&ws.mnt), "mounted anyway");
    assert!(
        wait_until(EXIT_DEADLINE, || guard.daemon_pids().is_empty()),
        "a daemon is left: {:?}",
        guard.daemon_pids()
    );
    drop(guard);
}

// ---------------------------------------------------------------------------
// More of the tree: cascading deletes, raw leaves, one-image sources
// ---------------------------------------------------------------------------

#[test]
fn delete_cascades_through_hidden_points() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
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
    let tree = read_text(&mnt.join("tree"));
    for p in ["base", "s1", "s2"] {
        assert!(
            tree.lines().any(|l| l.contains(p) && l.contains("hidden")),
            "{p} not shown hidden:\n{tree}"
        );
    }

    // Deleting the leaf removes it and its hidden parent s2 (nothing needs
    // s2 now), but not s1 (c needs it) nor base.
    std::fs::remove_dir(mnt.join("leaf")).expect("rmdir leaf");
    assert_eq!(visible(&mnt), names(&["c"]));
    assert_eq!(ws.qcow2_images(), ["base.qcow2", "c.qcow2", "s1.qcow2"]);
    assert_disk(&mnt, "c", &c_bytes);
    let tree = read_text(&mnt.join("tree"));
    let drawn: Vec<&str> = tree
        .lines()
        .filter_map(|l| {
            l.trim_start_matches(|c: char| !c.is_alphanumeric())
                .split(' ')
                .next()
        })
        .collect();
    assert_eq!(drawn, ["base", "s1", "c"], "tree:\n{tree}");
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    ws.check_all();
    ws.compare("c.qcow2", &c_bytes);

    // Remount: still hidden.
    let m = ws.remount(&[]);
    assert_eq!(visible(&m.mnt), names(&["c"]));
    assert_disk(&m.mnt, "c", &c_bytes);
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

#[test]
fn snapshot_of_a_raw_leaf() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
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
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
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
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

#[test]
fn one_image_source_mounts_its_chain() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    // Another chain in the same directory: not part of leaf's tree.
    ws.create_qcow2("other.qcow2", S, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io("other.qcow2", "qcow2", &["write -P 0x7f 0 64k"]);
    let other_bytes = ws.flatten("other.qcow2");
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount_source(&ws.img("leaf.qcow2"), &[]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    {
        let f = open_rw(&mnt, "leaf").expect("open leaf rw");
        write_both(&f, &mut model, 333, &pattern(30, 5000));
    }
    ctl_ok(&mnt, "leaf", "snapshot s1");
    assert_eq!(visible(&mnt), names(&["base", "s1", "leaf"]));
    assert_disk(&mnt, "s1", &model);
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    ws.check_all();
    // The leaf file now stands on s1: the one-image mount finds it.
    let m = ws
        .mount_source(&ws.img("leaf.qcow2"), &[])
        .expect("remount refused");
    assert_eq!(visible(&m.mnt), names(&["base", "s1", "leaf"]));
    assert_disk(&m.mnt, "leaf", &model);
    drop(m);
    // The whole directory: both chains, and the other chain untouched.
    let m = ws.remount(&[]);
    assert_eq!(visible(&m.mnt), names(&["base", "s1", "leaf", "other"]));
    assert_disk(&m.mnt, "other", &other_bytes);
    assert_disk(&m.mnt, "s1", &model);
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

// ---------------------------------------------------------------------------
// Model-based: random writes, snapshots, clones and deletes
// ---------------------------------------------------------------------------

/// One snapshot point of the model tree.
#[derive(Clone)]
struct ModelPoint {
    data: Vec<u8>,
    parent: Option<String>,
    children: Vec<String>,
    hidden: bool,
}

/// The tree as DESIGN.md describes it, in memory.
#[derive(Default)]
struct ModelTree {
    points: std::collections::BTreeMap<String, ModelPoint>,
}

impl ModelTree {
    fn visible(&self) -> std::collections::BTreeSet<String> {
        self.points
            .iter()
            .filter(|(_, p)| !p.hidden)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn leaves(&self) -> Vec<String> {
        self.points
            .iter()
            .filter(|(_, p)| !p.hidden && p.children.is_empty())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Nearest visible ancestor.
    fn visible_parent(&self, name: &str) -> Option<String> {
        let mut cur = self.points[name].parent.clone();
        while let Some(p) = cur {
            if !self.points[&p].hidden {
                return Some(p);
            }
            cur = self.points[&p].parent.clone();
        }
        None
    }

    fn snapshot(&mut self, leaf: &str, name: &str) {
        let l = self.points[leaf].clone();
        if let Some(pp) = &l.parent {
            for c in self.points.get_mut(pp).expect("parent").children.iter_mut() {
                if c == leaf {
                    *c = name.to_string();
                }
            }
        }
        self.points.insert(
            name.to_string(),
            ModelPoint {
                data: l.data.clone(),
                parent: l.parent.clone(),
                children: vec![leaf.to_string()],
                hidden: false,
            },
        );
        self.points.get_mut(leaf).expect("leaf").parent = Some(name.to_string());
    }

    fn clone_point(&mut self, of: &str, name: &str) {
        let data = self.points[of].data.clone();
        self.points.insert(
            name.to_string(),
            ModelPoint {
                data,
                parent: Some(of.to_string()),
                children: Vec::new(),
                hidden: false,
            },
        );
        self.points
            .get_mut(of)
            .expect("point")
            .children
            .push(name.to_string());
    }

    /// Returns the points removed (their images go).
    fn delete(&mut self, name: &str) -> Vec<String> {
        if !self.points[name].children.is_empty() {
            self.points.get_mut(name).expect("point").hidden = true;
            return Vec::new();
        }
        let mut removed = Vec::new();
        let mut cur = Some(name.to_string());
        while let Some(victim) = cur.take() {
            let p = self.points.remove(&victim).expect("victim");
            removed.push(victim.clone());
            if let Some(parent) = p.parent {
                let pp = self.points.get_mut(&parent).expect("parent");
                pp.children.retain(|c| *c != victim);
                if pp.children.is_empty() && pp.hidden {
                    cur = Some(parent);
                }
            }
        }
        removed
    }
}

/// Compares every visible point of the mount with the model.
fn assert_tree_matches(mnt: &Path, model: &ModelTree, step: &str) {
    assert_eq!(visible(mnt), model.visible(), "{step}: visible points");
    for name in model.visible() {
        let p = &model.points[&name];
        assert_bytes_eq(
            &format!("{step}: {name}/disk.raw"),
            &read_disk(&disk(mnt, &name)),
            &p.data,
        );
        assert_eq!(
            parent_link(mnt, &name),
            model.visible_parent(&name).map(|p| format!("../{p}")),
            "{step}: {name}/parent"
        );
        let kind = if p.children.is_empty() {
            "leaf"
        } else {
            "snapshot"
        };
        assert_eq!(
            info(mnt, &name)["kind"],
            kind,
            "{step}: {name}/info.json kind"
        );
    }
}

#[test]
fn random_tree_operations_match_a_model() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 8 * MIB;
    ws.create_qcow2("base.qcow2", S, None, "");
    ws.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 0x41 0 3M", "write -P 0x42 5M 1M"],
    );
    ws.create_qcow2("leaf.qcow2", S, Some(("base.qcow2", "qcow2")), "");
    let mut model = ModelTree::default();
    model.points.insert(
        "base".into(),
        ModelPoint {
            data: ws.flatten("base.qcow2"),
            parent: None,
            children: vec!["leaf".into()],
            hidden: false,
        },
    );
    model.points.insert(
        "leaf".into(),
        ModelPoint {
            data: ws.flatten("leaf.qcow2"),
            parent: Some("base".into()),
            children: Vec::new(),
            hidden: false,
        },
    );
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    // Descriptors of leaves, kept open across snapshots.
    let mut fds: std::collections::BTreeMap<String, File> = Default::default();
    let mut next = 0;
    for step in 0..45 {
        let leaves = model.leaves();
        let vis: Vec<String> = model.visible().into_iter().collect();
        let what = match rng.gen_range(0..100) {
            0..=39 => {
                let l = &leaves[rng.gen_range(0..leaves.len())];
                let len = rng.gen_range(1..300_000u64);
                let off = rng.gen_range(0..=S - len);
                let f = match fds.get(l) {
                    Some(f) => f,
                    None => {
                        let f = open_rw(&mnt, l).unwrap_or_else(|e| panic!("open {l}: {e}"));
                        fds.entry(l.clone()).or_insert(f)
                    }
                };
                let data = pattern(seed ^ step, len as usize);
                let p = model.points.get_mut(l).expect("leaf");
                write_both(f, &mut p.data, off, &data);
                format!("write {l} {off}+{len}")
            }
            40..=49 => {
                let l = &leaves[rng.gen_range(0..leaves.len())];
                let len = rng.gen_range(1..300_000u64);
                let off = rng.gen_range(0..=S - len);
                let f = open_rw(&mnt, l).unwrap_or_else(|e| panic!("open {l}: {e}"));
                fallocate(
                    &f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap_or_else(|e| panic!("punch {l}: {e}"));
                let p = model.points.get_mut(l).expect("leaf");
                p.data[off as usize..(off + len) as usize].fill(0);
                format!("punch {l} {off}+{len}")
            }
            50..=64 => {
                let l = leaves[rng.gen_range(0..leaves.len())].clone();
                next += 1;
                let name = format!("s{next}");
                ctl_ok(&mnt, &l, &format!("snapshot {name}"));
                model.snapshot(&l, &name);
                format!("snapshot {l} as {name}")
            }
            65..=79 => {
                let p = vis[rng.gen_range(0..vis.len())].clone();
                next += 1;
                let name = format!("c{next}");
                ctl_ok(&mnt, &p, &format!("clone {name}"));
                if let Some(f) = fds.remove(&p) {
                    // p was a leaf: its open descriptor is read-only now.
                    assert_eq!(
                        errno_of("write to a cloned leaf", f.write_at(b"x", 0)),
                        libc::EROFS,
                        "step {step}"
                    );
                }
                model.clone_point(&p, &name);
                format!("clone {p} as {name}")
            }
            80..=94 if vis.len() > 2 && leaves.len() > 1 => {
                let p = vis[rng.gen_range(0..vis.len())].clone();
                if rng.gen_bool(0.5) {
                    ctl_ok(&mnt, &p, "delete");
                } else {
                    std::fs::remove_dir(mnt.join(&p))
                        .unwrap_or_else(|e| panic!("step {step}: rmdir {p}: {e}"));
                }
                for gone in model.delete(&p) {
                    if let Some(f) = fds.remove(&gone) {
                        assert_eq!(
                            errno_of("write to a deleted leaf", f.write_at(b"x", 0)),
                            libc::ESTALE,
                            "step {step}"
                        );
                    }
                }
                format!("delete {p}")
            }
            _ => {
                for f in fds.values() {
                    f.sync_all().expect("fsync");
                }
                ws.check_all();
                "fsync + qemu-img check".to_string()
            }
        };
        assert_tree_matches(&mnt, &model, &format!("step {step} ({what}, seed {seed})"));
    }
    drop(fds);
    // Images of the visible points, to compare with qemu after unmounting.
    let images: Vec<(String, String)> = model
        .visible()
        .into_iter()
        .map(|n| {
            let img = info(&mnt, &n)["disks"]["disk"]["image"]
                .as_str()
                .expect("image name")
                .to_string();
            (n, img)
        })
        .collect();
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    ws.check_all();
    for (name, img) in &images {
        ws.compare(img, &model.points[name].data);
    }
    let m = ws.remount(&[]);
    assert_tree_matches(&m.mnt, &model, "after remount");
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

// ---------------------------------------------------------------------------
// Users of the mount: qemu on top of it, other users
// ---------------------------------------------------------------------------

/// DESIGN.md: "run a VM on top of the mount". qemu-io opens the leaf's
/// disk.raw as a raw image, with O_DIRECT (`-t none`, threads and native
/// AIO) and through the page cache; every pattern reads back, the mount
/// reads what was written, and qemu-img sees the same disk.
#[test]
fn qemu_io_runs_on_the_mount() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    const S: u64 = 16 * MIB;
    base_and_leaf(&ws, S);
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    let leaf = disk(&mnt, "leaf");
    let runs: [(&[&str], u8, u64, u64); 4] = [
        (&["-t", "none", "-i", "threads"], 0x31, 4096, 65_536),
        (&["-t", "none", "-i", "native"], 0x32, 3 * MIB - 512, 8192),
        (&["-t", "writeback"], 0x33, 777, 12_345),
        (&["-t", "none"], 0x34, 9 * MIB, MIB),
    ];
    for (opts, p, off, len) in runs {
        let write = format!("write -P {p} {off} {len}");
        let read = format!("read -P {p} {off} {len}");
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"])
            .args(opts)
            .args(["-c", &write, "-c", "flush", "-c", &read])
            .arg(&leaf);
        let o = run(&mut c);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("error"),
            "{}: {out}",
            describe(&c)
        );
        model[off as usize..(off + len) as usize].fill(p);
    }
    assert_disk(&mnt, "leaf", &model);
    // qemu-img reads the mounted disk like the image underneath.
    let flat = ws.scratch("via-mount.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&leaf)
        .arg(&flat));
    assert_bytes_eq(
        "qemu-img convert of leaf/disk.raw",
        &std::fs::read(&flat).expect("read"),
        &model,
    );
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
}

/// `-o allow_other` lets other users in (within file permissions);
/// without it, FUSE keeps them out.
#[test]
fn allow_other_lets_other_users_read() {
    if !prerequisites_or_skip() {
        return;
    }
    let setpriv_ok = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !setpriv_ok {
        skip("setpriv (util-linux) not found");
        return;
    }
    let ws = Workspace::new();
    base_and_leaf(&ws, 16 * MIB);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(ws.root(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod workspace");
    }
    let as_nobody = |script: &str| {
        run_unchecked(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(["sh", "-c", script])
                .current_dir("/"),
        )
    };
    let tree = ws.mnt.join("tree").display().to_string();
    let leaf = disk(&ws.mnt, "leaf").display().to_string();
    let ctl_path = ws.mnt.join("leaf").join("ctl").display().to_string();

    let Some(m) = ws.mount(&[]) else { return };
    let o = as_nobody(&format!("cat {tree}"));
    assert!(
        !o.status.success(),
        "without allow_other, another user read MNT/tree"
    );
    drop(m);

    let m = ws.remount(&["-o", "allow_other"]);
    let o = as_nobody(&format!("cat {tree}"));
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("leaf"),
        "with allow_other, another user cannot read MNT/tree: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = as_nobody(&format!("cmp {leaf} {leaf}"));
    assert!(o.status.success(), "other user reading disk.raw: {o:?}");
    // Permissions still apply: root's 0644 disk and ctl are not theirs.
    let o = as_nobody(&format!("printf x > {leaf}"));
    assert!(!o.status.success(), "another user wrote the leaf");
    let o = as_nobody(&format!("echo 'snapshot z' > {ctl_path}"));
    assert!(!o.status.success(), "another user ran a ctl command");
    assert_eq!(visible(&m.mnt), names(&["base", "leaf"]));
    let st = m.unmount();
    assert!(st.is_some_and(|s| s.success()), "daemon exit: {st:?}");
}

// ---------------------------------------------------------------------------
// Regression tests for bugs these tests found
// ---------------------------------------------------------------------------

/// A daemon whose mount was removed by `umount` calls `umount2(MNT)` once
/// more while exiting (fuser's `Mount` drop, after up to 100 ms of
/// polling); if MNT was mounted again meanwhile, it unmounts the new mount.
#[test]
fn remount_right_after_umount_keeps_the_new_mount() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    base_and_leaf(&ws, 16 * MIB);
    let Some(mut first) = ws.mount(&[]) else {
        return;
    };
    first.umount_only();
    // Mount again at once, without waiting for the first daemon to exit.
    let mut second = ws.remount(&[]);
    let status = first.wait_exit();
    assert!(status.success(), "first daemon: {status:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        second.daemon_alive() && ws.mnt.join("tree").exists(),
        "the second mount vanished when the first daemon exited (alive: {}, mounted: {})",
        second.daemon_alive(),
        is_mounted(&ws.mnt)
    );
}

/// SIGTERM while a file of the mount is open: the daemon's unmount fails
/// with EBUSY, it exits 1, and the mount stays behind, dead (ENOTCONN).
#[test]
fn sigterm_with_an_open_file_leaves_no_dead_mount() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    base_and_leaf(&ws, 16 * MIB);
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    let mut m = m;
    let f = open_rw(&m.mnt, "leaf").expect("open leaf rw");
    write_both(&f, &mut model, 5, &pattern(40, 100_000));
    kill(m.pid(), libc::SIGTERM);
    // Either it detaches at once (the mount leaves /proc/mounts) or it
    // keeps serving until the file is closed; a dead mount is neither.
    let mnt = m.mnt.clone();
    wait_until(Duration::from_secs(3), || {
        !m.daemon_alive() || !is_mounted(&mnt)
    });
    let alive = m.daemon_alive();
    assert!(
        alive || !is_mounted(&mnt),
        "daemon exited but left {} mounted (dead); log:\n{}",
        mnt.display(),
        m.log_text()
    );
    drop(f);
    let status = m.wait_exit();
    assert_eq!(status.code(), Some(0), "daemon exit: {status:?}");
    assert!(!is_mounted(&mnt), "still mounted");
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
}

/// After `echo delete > MNT/c/ctl`, the kernel keeps `MNT/c` (entry and
/// attributes cached for the 1 s TTL): `stat` still finds a directory and
/// `ls` fails with ENOTDIR instead of ENOENT.
#[test]
fn a_point_deleted_through_ctl_is_gone_at_once() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    base_and_leaf(&ws, 16 * MIB);
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "leaf", "clone c");
    assert!(mnt.join("c").is_dir());
    assert!(mnt.join("c").join("disk.raw").exists());
    ctl_ok(&mnt, "c", "delete");
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert_eq!(
        errno_of(
            "stat of the deleted point",
            std::fs::metadata(mnt.join("c"))
        ),
        libc::ENOENT
    );
    assert_eq!(
        errno_of(
            "ls of the deleted point",
            std::fs::read_dir(mnt.join("c")).and_then(|d| d.collect::<Result<Vec<_>, _>>())
        ),
        libc::ENOENT
    );
}

/// qemu locks the images it writes (OFD locks), so two writers of one
/// qcow2 file cannot corrupt it. snaptree takes no lock: while it has the
/// leaf open for writing, `qemu-io` writes the same file, and a second
/// read-write mount of the same tree succeeds.
#[test]
fn a_mounted_leaf_is_locked_against_other_writers() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    base_and_leaf(&ws, 16 * MIB);
    let Some(m) = ws.mount(&[]) else { return };
    let mut c = Command::new("qemu-io");
    c.current_dir(&ws.images)
        .args(["-f", "qcow2", "-c", "write -P 0x99 0 64k", "leaf.qcow2"]);
    let o = run_unchecked(&mut c);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success() || out.contains("lock"),
        "qemu-io wrote leaf.qcow2 while snaptree has it open for writing: {out}"
    );
    let mnt2 = ws.scratch("mnt2");
    std::fs::create_dir(&mnt2).expect("mkdir mnt2");
    let log = ws.scratch("second.log");
    let second = Mount::foreground(&ws.images, &mnt2, &[], &log);
    if let Ok(second) = second {
        let writable = open_rw(&mnt2, "leaf").is_ok();
        drop(second);
        assert!(
            !writable,
            "a second mount of the same tree can write the leaf too"
        );
    }
    drop(m);
}
