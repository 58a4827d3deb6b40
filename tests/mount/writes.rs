//! Writing through a leaf: random writes, hole punches and fsyncs against
//! an in-memory model, the errnos of what a disk refuses, and readers that
//! must never see a torn disk while a writer snapshots under them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

#[test]
fn random_writes_match_a_model() {
    const S: u64 = 32 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
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
    punch_hole(&f, S - 5000, 10_000).expect("punch hole across the end");
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
                punch_hole(&f, off, len)
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
    unmount_ok(m);
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
    ws.compare("base.qcow2", &base_before);
}

#[test]
fn errors_are_errnos_with_reasons() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
    let base_bytes = ws.flatten("base.qcow2");
    let leaf_bytes = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    let status = || status_text(&mnt);

    // Non-leaf disks are read-only.
    assert_errno(
        "open base/disk.raw O_WRONLY",
        OpenOptions::new().write(true).open(disk(&mnt, "base")),
        libc::EROFS,
    );
    assert_errno(
        "open base/disk.raw O_RDWR",
        open_rw(&mnt, "base"),
        libc::EROFS,
    );

    // Unknown and malformed ctl commands: EINVAL, reason in status.
    assert_errno(
        "ctl frobnicate",
        ctl(&mnt, "leaf", "frobnicate\n"),
        libc::EINVAL,
    );
    let st = status();
    assert!(
        st.contains("last command: leaf/ctl: frobnicate: error:") && st.contains("unknown command"),
        "status after an unknown command:\n{st}"
    );
    assert_errno(
        "ctl snapshot without a name",
        ctl(&mnt, "leaf", "snapshot"),
        libc::EINVAL,
    );
    assert!(status().contains("error:"), "status:\n{}", status());
    for (point, command, errno) in [
        ("leaf", "snapshot .x", libc::EINVAL),
        ("leaf", "snapshot a/b", libc::EINVAL),
        ("leaf", "snapshot tree", libc::EINVAL),
        ("leaf", "snapshot base", libc::EEXIST),
        ("base", "snapshot y", libc::EINVAL),
    ] {
        let what = format!("{point}/ctl: {command}");
        assert_errno(&what, ctl(&mnt, point, command), errno);
    }
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
    assert_errno("pwrite at the end", f.write_at(&[1], S), libc::EFBIG);
    drop(f);
    assert_eq!(
        std::fs::metadata(disk(&mnt, "leaf")).expect("stat").len(),
        S
    );
    assert_disk(&mnt, "leaf", &leaf_bytes);
    assert_disk(&mnt, "base", &base_bytes);
    unmount_ok(m);
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);

    // -o ro: everything is read-only.
    let m = ws.remount(&["-o", "ro"]);
    let mnt = m.mnt.clone();
    assert!(
        status_text(&mnt).contains("read-only"),
        "status of a ro mount:\n{}",
        status_text(&mnt)
    );
    assert_errno(
        "ro: open leaf for write",
        open_rw(&mnt, "leaf"),
        libc::EROFS,
    );
    assert_errno(
        "ro: ctl snapshot",
        ctl(&mnt, "leaf", "snapshot s"),
        libc::EROFS,
    );
    assert_errno("ro: ctl delete", ctl(&mnt, "leaf", "delete"), libc::EROFS);
    assert_errno(
        "ro: rmdir leaf",
        std::fs::remove_dir(mnt.join("leaf")),
        libc::EROFS,
    );
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    assert_disk(&mnt, "leaf", &leaf_bytes);
    unmount_ok(m);
    ws.check_all();
    ws.compare("leaf.qcow2", &leaf_bytes);
    assert!(!ws.img("s.qcow2").exists());
}

/// Sets the flag when dropped, so a panicking writer still stops readers.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn readers_and_a_snapshotting_writer() {
    let Some(ws) = workspace() else {
        return;
    };
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
    unmount_ok(m);
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
