//! `ctl delete` / `rmdir` of internal-snapshot points, judged by QEMU:
//! deleted in random order (after writes to the current state), every
//! other point reads what it read before, `qemu-img snapshot -l` lists
//! the rest and `qemu-img check` is clean; a SIGKILL at any moment of a
//! delete leaves the old or the new table, clean after a read-write
//! mount repaired it.

use std::process::Command;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::internal_writes::{build, convert_snapshot, random_op, TAGS};
use super::*;

/// The tags `qemu-img snapshot -l` lists for vm.qcow2.
fn tags(ws: &Workspace) -> Vec<String> {
    let out = ws.qemu_img(&["snapshot", "-U", "-l", "vm.qcow2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

#[test]
fn internal_deletes_in_random_order_keep_the_rest() {
    let Some(ws) = workspace() else { return };
    build(&ws, "cluster_size=4096");
    let want: Vec<Vec<u8>> = TAGS.iter().map(|t| convert_snapshot(&ws, t)).collect();
    let mut model = ws.flatten("vm.qcow2");
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let f = open_rw(&mnt, "vm").expect("open vm rw");
    let mut order: Vec<usize> = (0..TAGS.len()).collect();
    order.shuffle(&mut rng);
    let mut left: Vec<usize> = order.clone();
    for (k, &victim) in order.iter().enumerate() {
        for op in 0..20 {
            random_op(&f, &mut model, &mut rng, seed ^ (k * 100 + op) as u64, 0);
        }
        f.sync_all().expect("fsync");
        let tag = TAGS[victim];
        if rng.gen_bool(0.5) {
            ctl_ok(&mnt, tag, "delete");
        } else {
            std::fs::remove_dir(mnt.join(tag)).unwrap_or_else(|e| panic!("rmdir {tag}: {e}"));
        }
        left.retain(|&i| i != victim);
        let what = format!("after deleting {tag} (seed {seed})");
        let mut names: Vec<&str> = left.iter().map(|&i| TAGS[i]).collect();
        names.extend(["base", "vm"]);
        assert_eq!(visible(&mnt), super::names(&names), "{what}");
        ws.check("vm.qcow2");
        let mut listed = tags(&ws);
        listed.sort();
        let mut expect: Vec<String> = left.iter().map(|&i| TAGS[i].to_string()).collect();
        expect.sort();
        assert_eq!(listed, expect, "{what}");
        for &i in &left {
            assert_disk(&mnt, TAGS[i], &want[i]);
            assert_bytes_eq(&what, &convert_snapshot(&ws, TAGS[i]), &want[i]);
        }
        assert_disk(&mnt, "vm", &model);
        ws.compare("vm.qcow2", &model);
    }
    // With no snapshot left, the current state owns every cluster.
    for op in 0..20 {
        random_op(&f, &mut model, &mut rng, seed ^ (1000 + op), 0);
    }
    f.sync_all().expect("fsync");
    drop(f);
    unmount_ok(m);
    ws.check_all();
    ws.compare("vm.qcow2", &model);
}

/// SIGKILL at varied moments of deletes: each time the image lists the
/// old or the new set of snapshots, every listed one reads as before, and
/// after a read-write mount (which repairs the image a kill left dirty)
/// `qemu-img check` is clean.
#[test]
fn internal_deletes_survive_sigkill() {
    let Some(ws) = workspace() else { return };
    build(&ws, "cluster_size=4096");
    let want: Vec<Vec<u8>> = TAGS.iter().map(|t| convert_snapshot(&ws, t)).collect();
    let current = ws.flatten("vm.qcow2");
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    for round in 0..6 {
        let before = tags(&ws);
        let Some(victim) = before.choose(&mut rng).cloned() else {
            break;
        };
        let Some(mut m) = ws.mount(&["-o", "gc_idle=off"]) else {
            return;
        };
        let mnt = m.mnt.clone();
        let pid = m.pid();
        let delay = rng.gen_range(0..3000u64);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_micros(delay));
            kill(pid, libc::SIGKILL);
        });
        let _ = ctl(&mnt, &victim, "delete");
        killer.join().unwrap();
        let _ = m.wait_for_kill();
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        drop(m);
        let what = format!("round {round}, delete {victim} killed after {delay} us (seed {seed})");
        // Recovery is a read-write mount: a kill during the delete left
        // the image marked dirty, and the mount repairs it before it
        // writes.
        let dirty = header_is_dirty(&ws.img("vm.qcow2"));
        let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
            return;
        };
        let status = std::fs::read_to_string(m.mnt.join("status")).unwrap_or_default();
        drop(m);
        assert!(
            !header_is_dirty(&ws.img("vm.qcow2")),
            "{what}: still dirty after a read-write mount; status:\n{status}"
        );
        if dirty {
            assert!(status.contains("repaired"), "{what}: status:\n{status}");
            eprintln!("{what}: the kill left the image dirty; the mount repaired it");
        }
        ws.check("vm.qcow2");
        let after = tags(&ws);
        let mut without = before.clone();
        without.retain(|t| *t != victim);
        assert!(
            after == before || after == without,
            "{what}: {before:?} -> {after:?}"
        );
        eprintln!("{what}: {} -> {} snapshots", before.len(), after.len());
        for t in &after {
            let i = TAGS.iter().position(|x| x == t).expect("known tag");
            assert_bytes_eq(&what, &convert_snapshot(&ws, t), &want[i]);
        }
        ws.compare("vm.qcow2", &current);
    }
}

/// While another process (here `qemu-io`) has the image open for writing,
/// the current state is mounted read-only and deleting one of its
/// internal points is refused; nothing changes.
#[test]
fn internal_delete_is_refused_while_another_writer_holds_the_image() {
    let Some(ws) = workspace() else { return };
    build(&ws, "");
    // `sleep` keeps the image open (and locked) for as long as the test
    // may need, without depending on a stdin pipe; its stderr is kept to
    // say why if it does not take the lock.
    let log = ws.scratch("qemu-io.log");
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 120000", "vm.qcow2"])
        .current_dir(ws.img(""))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("qemu-io log"))
        .spawn()
        .expect("spawn qemu-io");
    // Held once qemu-img (without -U) cannot get its shared lock.
    let held = wait_until(std::time::Duration::from_secs(60), || {
        !ws.qemu_img_unchecked(&["info", "vm.qcow2"])
            .status
            .success()
    });
    let before = std::fs::read(ws.img("vm.qcow2")).unwrap();
    let result = held
        .then(|| ws.mount(&["-o", "gc_idle=off"]))
        .flatten()
        .map(|m| {
            let r = ctl(&m.mnt, "s1", "delete");
            let status = status_text(&m.mnt);
            let names = visible(&m.mnt);
            unmount_ok(m);
            (r, status, names)
        });
    let exited = holder.try_wait().ok().flatten();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        held,
        "qemu-io did not take its lock (exited: {exited:?}; stderr: {})",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let Some((r, status, names)) = result else {
        return;
    };
    assert_errno("delete s1 while qemu-io writes", r, libc::EROFS);
    assert!(status.contains("read-only"), "{status}");
    assert!(names.contains("s1"), "{names:?}");
    assert!(
        std::fs::read(ws.img("vm.qcow2")).unwrap() == before,
        "image changed"
    );
    assert_eq!(tags(&ws).len(), 3);
}

/// Whether the qcow2 header's dirty bit (incompatible feature bit 0, in
/// the big-endian u64 at offset 72) is set.
fn header_is_dirty(path: &std::path::Path) -> bool {
    let b = std::fs::read(path).expect("image");
    b.len() >= 80 && b[79] & 1 != 0
}
