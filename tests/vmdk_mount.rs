//! VMDK trees through the mount: a directory of VMDKs made by qemu-img (a
//! monolithicSparse base, a sparse delta, a twoGbMaxExtentSparse delta on
//! it, a monolithicFlat disk and a streamOptimized one) shows one point
//! per disk, never one per extent file, and every point reads like
//! `qemu-img convert`. The VMDK leaf (a twoGbMaxExtentSparse delta) is
//! written through the mount and snapshotted, which makes a
//! monolithicSparse delta; both are judged by `qemu-img convert` and
//! `check` and libvmdk, and every other VMDK file keeps its bytes.
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

    // Writes into the twoGbMaxExtentSparse leaf (grains allocated, a new
    // CID), then a snapshot: the leaf is frozen as s1 and a monolithicSparse
    // delta takes its name and the next writes.
    let mut leaf = want[2].1.clone();
    let f = open_rw(&mnt, "vm-000002");
    write_model(&f, &mut leaf, 3 * MIB + 1000, &[0x61; 70000]);
    write_model(&f, &mut leaf, SIZE - 512, &[0x62; 512]);
    drop(f);
    let frozen = leaf.clone();
    ctl_ok(&mnt, "vm-000002", "snapshot s1");
    let f = open_rw(&mnt, "vm-000002");
    write_model(&f, &mut leaf, 20 * MIB - 100, &[0x77; 300]);
    write_model(&f, &mut leaf, 3 * MIB + 4096, &[0x78; 4096]);
    drop(f);
    assert_disk(&mnt, "s1", &frozen);
    assert_disk(&mnt, "vm-000002", &leaf);
    assert_eq!(info(&mnt, "vm-000002")["disks"]["disk"]["chain_depth"], 4);
    unmount_ok(m);

    // Untouched VMDKs keep every byte; the written ones read as written,
    // pass `qemu-img check` and libvmdk, and the delta names s1 by its
    // new CID.
    let after = files(&ws);
    for (name, bytes) in &before {
        if name.starts_with("vm-000002") {
            continue;
        }
        let now = after.iter().find(|(n, _)| n == name).map(|(_, b)| b);
        assert!(now == Some(bytes), "{name} changed");
    }
    assert_bytes_eq("qemu-img convert s1.vmdk", &ws.flatten("s1.vmdk"), &frozen);
    assert_bytes_eq(
        "qemu-img convert vm-000002.vmdk",
        &ws.flatten("vm-000002.vmdk"),
        &leaf,
    );
    for name in ["s1.vmdk", "vm-000002.vmdk"] {
        ws.check(name);
        let out = std::process::Command::new("vmdkinfo")
            .arg(ws.img(name))
            .output();
        if let Ok(out) = out {
            assert!(out.status.success(), "vmdkinfo {name}: {out:?}");
        }
    }
    let old_cid = descriptor_value(&before_leaf_descriptor(&before), "CID");
    let s1_cid = descriptor_value(&std::fs::read(ws.img("s1.vmdk")).unwrap(), "CID");
    assert_ne!(old_cid, s1_cid, "writing the leaf did not change its CID");
    let delta = std::fs::read(ws.img("vm-000002.vmdk")).unwrap();
    assert_eq!(
        u32::from_str_radix(&descriptor_value(&delta, "parentCID"), 16).unwrap(),
        u32::from_str_radix(&s1_cid, 16).unwrap()
    );
    assert_eq!(
        descriptor_value(&delta, "parentFileNameHint"),
        "\"s1.vmdk\""
    );
    assert!(ws.qcow2_images().is_empty(), "no qcow2 overlay on a VMDK");

    // A merge of the frozen s1 (twoGbMaxExtentSparse, hidden once
    // deleted) with its delta (snaptree's monolithicSparse child): every
    // point reads the same, QEMU reads the merged leaf over vm-000001, and
    // s1's files are gone (see tests/vmdk_merge.rs for the merges in
    // detail).
    let m = ws.remount(&["-o", "gc_idle=off"]);
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "s1", "delete");
    let merged = OpenOptions::new()
        .write(true)
        .open(mnt.join("merge-now"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"1\n"));
    assert!(
        merged.is_ok(),
        "merge-now: {merged:?}\n{}",
        status_text(&mnt)
    );
    assert_eq!(
        visible(&mnt),
        names(&["vm", "vm-000001", "vm-000002", "flat", "ova"])
    );
    assert_disk(&mnt, "vm-000002", &leaf);
    assert_disk(&mnt, "vm-000001", &want[1].1);
    unmount_ok(m);
    assert_bytes_eq(
        "qemu-img convert vm-000002.vmdk",
        &ws.flatten("vm-000002.vmdk"),
        &leaf,
    );
    ws.check("vm-000002.vmdk");
    assert!(!ws.img("s1.vmdk").exists(), "s1.vmdk is left");
}

fn before_leaf_descriptor(before: &[(String, Vec<u8>)]) -> Vec<u8> {
    before
        .iter()
        .find(|(n, _)| n == "vm-000002.vmdk")
        .map(|(_, b)| b.clone())
        .expect("leaf descriptor")
}

/// `KEY=value` of a descriptor (embedded or not).
fn descriptor_value(bytes: &[u8], key: &str) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}="))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {key}"))
}

fn open_rw(mnt: &Path, point: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk(mnt, point))
        .unwrap_or_else(|e| panic!("open {point}: {e}"))
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

/// SIGKILL while writes allocate grains in a VMDK delta: `qemu-img check`
/// is clean, libvmdk reads it, what was fsynced reads back (lower half),
/// and a new mount reads what QEMU reads.
#[test]
fn vmdk_writes_survive_sigkill() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    create(&ws, "base.vmdk", "", None);
    ws.qemu_io("base.vmdk", "vmdk", &["write -P 0x11 0 24M"]);
    create(&ws, "leaf.vmdk", "", Some("base.vmdk"));
    let mut model = ws.flatten("leaf.vmdk");
    let Some(mut m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let f = open_rw(&mnt, "leaf");
    let half = SIZE / 2;
    // Lower half: written and fsynced, must survive.
    for i in 0..40u64 {
        let off = (i * 7919 * 4099) % (half - 70000);
        write_model(
            &f,
            &mut model,
            off,
            &vec![(i as u8) | 0x80; 1 + (i as usize * 1777) % 70000],
        );
    }
    // Upper half: written without fsync by a thread the kill interrupts.
    let writer = {
        let f = f.try_clone().expect("dup");
        std::thread::spawn(move || {
            for i in 0..100_000u64 {
                let off = half + (i * 104_729) % (half - 65536);
                if f.write_all_at(&[i as u8; 5000], off).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(30));
    kill(m.pid(), libc::SIGKILL);
    let status = m.wait_for_kill();
    assert!(!status.success(), "killed daemon exited {status:?}");
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mnt)
        .status();
    let _ = writer.join();
    drop(f);
    drop(m);
    ws.check("leaf.vmdk");
    if let Ok(out) = std::process::Command::new("vmdkinfo")
        .arg(ws.img("leaf.vmdk"))
        .output()
    {
        assert!(out.status.success(), "vmdkinfo after SIGKILL: {out:?}");
    }
    let got = ws.flatten("leaf.vmdk");
    assert_bytes_eq(
        "fsynced lower half after SIGKILL",
        &got[..half as usize],
        &model[..half as usize],
    );
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_disk(&m.mnt, "leaf", &got);
    unmount_ok(m);
}
