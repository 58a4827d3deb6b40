//! qcow2 internal snapshots as read-only points: each point's disk equals
//! `qemu-img convert -l TAG`, the tree follows creation order, the image
//! is never changed (bytes and `qemu-img check`), corrupt snapshot
//! tables leave out only the snapshot they break, with a named error, and
//! a real `savevm`'s RAM reads as the point's `memory.raw`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use serde_json::json;

use super::*;

const SIZE: u64 = 8 * MIB;

/// `qemu-img convert -l snapshot.name=TAG -O raw` of `images/<image>`.
fn convert_snapshot(ws: &Workspace, image: &str, tag: &str) -> Vec<u8> {
    convert_with(ws, image, &format!("snapshot.name={tag}"))
}

/// `qemu-img convert -l PARAM -O raw` of `images/<image>`. It keeps the
/// image's current size (the snapshot's own size is what `snapshot -a`
/// restores; see [`applied`]).
fn convert_with(ws: &Workspace, image: &str, l: &str) -> Vec<u8> {
    let out = ws.scratch(&format!("snap-{image}-{}.raw", l.replace('/', "_")));
    let _ = std::fs::remove_file(&out);
    let o = out.to_string_lossy().into_owned();
    ws.qemu_img(&["convert", "-U", "-l", l, "-O", "raw", image, &o]);
    let v = std::fs::read(&out).expect("read converted snapshot");
    let _ = std::fs::remove_file(&out);
    v
}

/// The disk of `images/<image>` after `qemu-img snapshot -a TAG` on a
/// copy of it (QEMU resizes to the snapshot's own disk size).
fn applied(ws: &Workspace, image: &str, tag: &str) -> Vec<u8> {
    let copy = format!("applied-{image}");
    std::fs::copy(ws.img(image), ws.img(&copy)).unwrap();
    ws.qemu_img(&["snapshot", "-a", tag, &copy]);
    let v = ws.flatten(&copy);
    std::fs::remove_file(ws.img(&copy)).unwrap();
    v
}

fn snapshot_create(ws: &Workspace, image: &str, tag: &str) {
    ws.qemu_img(&["snapshot", "-c", tag, image]);
}

/// base.qcow2 under vm.qcow2; vm has s1, s2 (both at 8 MiB), then a resize
/// to 12 MiB and s3, with writes between all of them.
fn build_tree(ws: &Workspace) {
    ws.create_qcow2("base.qcow2", SIZE, None, "");
    ws.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 0x11 0 2M", "write -P 0x12 6M 1M"],
    );
    ws.create_qcow2("vm.qcow2", SIZE, Some(("base.qcow2", "qcow2")), "");
    ws.qemu_io(
        "vm.qcow2",
        "qcow2",
        &["write -P 0x21 1M 64k", "write -P 0x22 3M 5000"],
    );
    snapshot_create(ws, "vm.qcow2", "s1");
    ws.qemu_io(
        "vm.qcow2",
        "qcow2",
        &["write -P 0x31 1M 4k", "write -z 6M 128k"],
    );
    snapshot_create(ws, "vm.qcow2", "s2");
    ws.qemu_io("vm.qcow2", "qcow2", &["write -P 0x41 0 64k"]);
    ws.qemu_img(&["resize", "-q", "vm.qcow2", "12M"]);
    ws.qemu_io("vm.qcow2", "qcow2", &["write -P 0x51 10M 1M"]);
    // A tag that is also a point's name, and one that is no valid name.
    snapshot_create(ws, "vm.qcow2", "base");
    ws.qemu_io(
        "vm.qcow2",
        "qcow2",
        &["write -P 0x61 11M 64k", "write -P 0x62 2M 4k"],
    );
    snapshot_create(ws, "vm.qcow2", "a/b");
    ws.qemu_io("vm.qcow2", "qcow2", &["write -P 0x71 4M 64k"]);
}

#[test]
fn internal_snapshots_read_as_qemu_img_converts_them() {
    let Some(ws) = workspace() else {
        return;
    };
    build_tree(&ws);
    let tags = ["s1", "s2", "base", "a/b"];
    let want_applied: Vec<Vec<u8>> = tags.iter().map(|t| applied(&ws, "vm.qcow2", t)).collect();
    let before = std::fs::read(ws.img("vm.qcow2")).unwrap();
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    let fallback = visible(&mnt)
        .into_iter()
        .find(|n| n.starts_with("vm@snapshot-"))
        .unwrap_or_else(|| {
            panic!(
                "no fallback name for tag a/b: {:?}\n{status}",
                visible(&mnt)
            )
        });
    assert!(
        status.contains("\"a/b\""),
        "no status line for the tag a/b:\n{status}"
    );
    assert_eq!(
        visible(&mnt),
        names(&["base", "s1", "s2", "vm@base", &fallback, "vm"]),
        "{status}"
    );
    let points = ["s1", "s2", "vm@base", fallback.as_str()];
    for ((point, tag), want) in points.into_iter().zip(tags).zip(&want_applied) {
        // What `snapshot -a` restores, and `convert -l` up to that size.
        assert_disk(&mnt, point, want);
        let converted = convert_snapshot(&ws, "vm.qcow2", tag);
        assert_bytes_eq(point, &want[..], &converted[..want.len()]);
        let i = info(&mnt, point);
        assert_eq!(i["kind"], "internal", "{i}");
        assert_eq!(i["internal"]["tag"], tag, "{i}");
        assert_eq!(i["parent_from"], "creation order", "{i}");
        assert_eq!(i["disks"]["disk"]["writable"], false, "{i}");
    }
    // The disk size is the snapshot's own.
    assert_eq!(std::fs::metadata(disk(&mnt, "s1")).unwrap().len(), SIZE);
    assert_eq!(
        std::fs::metadata(disk(&mnt, "vm@base")).unwrap().len(),
        12 * MIB
    );
    assert_disk(&mnt, "vm", &ws.flatten("vm.qcow2"));
    assert_disk(&mnt, "base", &ws.flatten("base.qcow2"));
    // Creation order.
    let up = |p: &str| Some(format!("../{p}"));
    assert_eq!(parent_link(&mnt, "s1"), up("base"));
    assert_eq!(parent_link(&mnt, "s2"), up("s1"));
    assert_eq!(parent_link(&mnt, "vm@base"), up("s2"));
    assert_eq!(parent_link(&mnt, &fallback), up("vm@base"));
    assert_eq!(parent_link(&mnt, "vm"), up(&fallback));
    assert_eq!(info(&mnt, "vm")["parent_from"], "creation order");
    refusals(&mnt);
    // The backing point deleted: hidden for its children, and never merged
    // into an image with internal snapshots.
    let base_before = std::fs::read(ws.img("base.qcow2")).unwrap();
    ctl_ok(&mnt, "base", "delete");
    let _ = std::fs::write(mnt.join("merge-now"), "now");
    assert!(!visible(&mnt).contains("base"));
    assert_disk(&mnt, "s1", &want_applied[0]);
    assert_disk(&mnt, "vm", &ws.flatten("vm.qcow2"));
    unmount_ok(m);
    assert_eq!(std::fs::read(ws.img("base.qcow2")).unwrap(), base_before);
    assert_eq!(
        std::fs::read(ws.img("vm.qcow2")).unwrap(),
        before,
        "vm.qcow2 changed"
    );
    ws.check("vm.qcow2");
    assert!(
        !std::fs::read_to_string(ws.img(".snaptree.json"))
            .unwrap_or_default()
            .contains("\"s1\""),
        "internal points are not in the manifest"
    );
}

/// Internal points refuse writes and the commands that would change them
/// (other than `delete`).
fn refusals(mnt: &Path) {
    assert_errno(
        "write to s1/disk.raw",
        OpenOptions::new().write(true).open(disk(mnt, "s1")),
        libc::EROFS,
    );
    // (`delete`/`rmdir` delete the snapshot: see `internal_writes`.)
    for cmd in ["clone c1", "merge", "memory none"] {
        assert_errno(cmd, ctl(mnt, "s1", cmd), libc::EROFS);
        assert!(status_text(mnt).contains("internal snapshot"), "{cmd}");
    }
    // Deleting the image's current state would delete its snapshots.
    assert_errno("delete vm", ctl(mnt, "vm", "delete"), libc::EROFS);
    assert!(mnt.join("s1/disk.raw").exists() && mnt.join("vm/disk.raw").exists());
}

/// Where each snapshot table entry of the qcow2 file `bytes` starts.
fn entries(bytes: &[u8]) -> Vec<usize> {
    let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let be16 = |o: usize| u16::from_be_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let n = be32(60);
    let mut at = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(at);
        let len = 40 + be32(at + 36) + be16(at + 12) + be16(at + 14);
        at += len.div_ceil(8) * 8;
    }
    out
}

/// An image `name` with snapshots `<p>1`, `<p>2`, `<p>3`, whose entry 1 is
/// then patched by `patch(file bytes, entry offsets)`.
fn patched(ws: &Workspace, name: &str, p: &str, patch: impl Fn(&mut Vec<u8>, &[usize])) {
    ws.create_qcow2(name, SIZE, None, "");
    for k in 1..=3 {
        ws.qemu_io(name, "qcow2", &[&format!("write -P 0x{k}{k} {k}M 64k")]);
        snapshot_create(ws, name, &format!("{p}{k}"));
    }
    let mut bytes = std::fs::read(ws.img(name)).unwrap();
    let e = entries(&bytes);
    patch(&mut bytes, &e);
    std::fs::write(ws.img(name), &bytes).unwrap();
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn internal_snapshot_tables_that_lie_leave_out_one_snapshot() {
    let Some(ws) = workspace() else {
        return;
    };
    let past_eof = |b: &mut Vec<u8>, e: &[usize]| put64(b, e[1], 1 << 40);
    let overlap = |b: &mut Vec<u8>, e: &[usize]| {
        let l1 = b[e[0]..e[0] + 8].to_vec();
        b[e[1]..e[1] + 8].copy_from_slice(&l1);
    };
    let huge_vmstate = |b: &mut Vec<u8>, e: &[usize]| {
        b[e[1] + 32..e[1] + 36].copy_from_slice(&u32::MAX.to_be_bytes());
        put64(b, e[1] + 40, 1 << 50); // vm_state_size_large
    };
    // Entry 1's id ("2") becomes entry 0's ("1").
    let dup_id = |b: &mut Vec<u8>, e: &[usize]| {
        let extra = u32::from_be_bytes(b[e[1] + 36..e[1] + 40].try_into().unwrap()) as usize;
        b[e[1] + 40 + extra] = b'1';
    };
    // Its name "e2" becomes "/2".
    let slash = |b: &mut Vec<u8>, e: &[usize]| {
        let extra = u32::from_be_bytes(b[e[1] + 36..e[1] + 40].try_into().unwrap()) as usize;
        let id_len = u16::from_be_bytes(b[e[1] + 12..e[1] + 14].try_into().unwrap()) as usize;
        b[e[1] + 40 + extra + id_len] = b'/';
    };
    patched(&ws, "a.qcow2", "a", past_eof);
    patched(&ws, "b.qcow2", "b", overlap);
    patched(&ws, "c.qcow2", "c", huge_vmstate);
    patched(&ws, "d.qcow2", "d", dup_id);
    patched(&ws, "e.qcow2", "e", slash);
    let images = ["a.qcow2", "b.qcow2", "c.qcow2", "d.qcow2", "e.qcow2"];
    let before: Vec<Vec<u8>> = images
        .iter()
        .map(|i| std::fs::read(ws.img(i)).unwrap())
        .collect();
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    let shown = visible(&mnt);
    for (img, p, why) in [
        ("a.qcow2", "a", "past the end of the file"),
        ("b.qcow2", "b", "overlaps the L1 table of snapshot entry 0"),
        ("c.qcow2", "c", "vm_state_size"),
        ("d.qcow2", "d", "its id is also the id of snapshot entry 0"),
    ] {
        let line = status
            .lines()
            .find(|l| l.contains(img) && l.contains(why))
            .unwrap_or_else(|| panic!("no named error for {img} ({why}):\n{status}"));
        assert!(line.contains("offset"), "{line}");
        assert!(line.contains(&format!("\"{p}2\"")), "{line}");
        assert!(!shown.contains(&format!("{p}2")), "{p}2 shown: {shown:?}");
        for k in [1, 3] {
            let tag = format!("{p}{k}");
            assert_disk(&mnt, &tag, &convert_snapshot(&ws, img, &tag));
        }
    }
    // The name with '/' is no reason to leave it out: a fallback name.
    let e2 = shown
        .iter()
        .find(|n| n.starts_with("e@snapshot-"))
        .expect("e's /2 shown");
    assert_eq!(info(&mnt, e2)["internal"]["tag"], "/2");
    assert_disk(&mnt, e2, &convert_with(&ws, "e.qcow2", "snapshot.id=2"));
    for i in images {
        let stem = i.trim_end_matches(".qcow2");
        assert_disk(&mnt, stem, &ws.flatten(i));
    }
    unmount_ok(m);
    for (i, b) in images.iter().zip(&before) {
        assert_eq!(&std::fs::read(ws.img(i)).unwrap(), b, "{i} changed");
    }
}

const VM_RAM: u64 = 32 * MIB;

/// A paused VM with `disks` (images of the tree, attached in this order)
/// does `savevm s1`, its RAM changes, `savevm s2`; returns the two RAMs,
/// or `None` (printed SKIP) without qemu-system-x86_64.
fn savevm_twice(ws: &Workspace, disks: &[&str]) -> Option<(Vec<u8>, Vec<u8>)> {
    use super::qemu_vm::{Vm, VmError};
    let dir = ws.scratch("vm");
    std::fs::create_dir_all(&dir).unwrap();
    let ram_file = dir.join("ram.bin");
    let ram1 = pattern(71, VM_RAM as usize);
    std::fs::write(&ram_file, &ram1).unwrap();
    let mut vm = match Vm::start(&dir, &ram_file, VM_RAM, false) {
        Ok(vm) => vm,
        Err(VmError::Missing(why)) | Err(VmError::NoStart(why)) => {
            skip(&why);
            return None;
        }
    };
    for (k, d) in disks.iter().enumerate() {
        let file = ws.img(d).to_string_lossy().into_owned();
        vm.must(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": format!("disk{k}"),
                    "file": { "driver": "file", "filename": file } }),
        );
    }
    let hmp = |vm: &mut Vm, line: &str| {
        let out = vm.must("human-monitor-command", json!({ "command-line": line }));
        assert!(
            out.as_str().unwrap_or("").trim().is_empty(),
            "{line}: {out}\nQEMU log: {}",
            vm.log_text()
        );
    };
    hmp(&mut vm, "savevm s1");
    let mut ram2 = ram1.clone();
    ram2[..(8 * MIB) as usize].copy_from_slice(&pattern(72, (8 * MIB) as usize));
    ram2[(20 * MIB) as usize..(21 * MIB) as usize].fill(0);
    let f = OpenOptions::new().write(true).open(&ram_file).unwrap();
    f.write_all_at(&ram2, 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    hmp(&mut vm, "savevm s2");
    vm.quit();
    Some((ram1, ram2))
}

/// `savevm` of a paused VM over a qcow2 disk, twice with different RAM:
/// each internal point's `memory.raw` is the RAM it saved.
#[test]
fn internal_snapshot_vmstate_is_memory_raw() {
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_qcow2("vm.qcow2", SIZE, None, "");
    ws.qemu_io("vm.qcow2", "qcow2", &["write -P 0x21 1M 64k"]);
    let Some((ram1, ram2)) = savevm_twice(&ws, &["vm.qcow2"]) else {
        return;
    };
    let before = std::fs::read(ws.img("vm.qcow2")).unwrap();
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let status = status_text(&mnt);
    for (point, ram) in [("s1", &ram1), ("s2", &ram2)] {
        let i = info(&mnt, point);
        assert!(
            i["internal"]["vm_state_size"].as_u64().unwrap_or(0) > 0,
            "{i}\n{status}"
        );
        // The stream's main RAM block, placed as guest-physical memory.
        let mem = read_disk(&mnt.join(point).join("memory.raw"));
        assert_bytes_eq(&format!("{point}/memory.raw"), &mem, ram);
        assert_disk(&mnt, point, &convert_snapshot(&ws, "vm.qcow2", point));
    }
    assert!(!mnt.join("vm/memory.raw").exists());
    unmount_ok(m);
    assert_eq!(
        std::fs::read(ws.img("vm.qcow2")).unwrap(),
        before,
        "vm.qcow2 changed"
    );
    ws.check("vm.qcow2");
}

/// `savevm` of a VM with two disks: one point per tag with both disks,
/// its memory from whichever disk QEMU put the vmstate in.
#[test]
fn internal_snapshot_vmstate_of_a_two_disk_vm() {
    let Some(ws) = workspace() else {
        return;
    };
    two_disks(&ws);
    // vdb first: QEMU saves the vmstate in the first disk it finds.
    let Some((ram1, ram2)) = savevm_twice(&ws, &["vdb.qcow2", "vda.qcow2"]) else {
        return;
    };

    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert_eq!(
        visible(&mnt),
        names(&["s1", "s2", "vm"]),
        "{}",
        status_text(&mnt)
    );
    for (point, ram) in [("s1", &ram1), ("s2", &ram2)] {
        let mem = read_disk(&mnt.join(point).join("memory.raw"));
        assert_bytes_eq(&format!("{point}/memory.raw"), &mem, ram);
        for d in ["vda", "vdb"] {
            let want = convert_snapshot(&ws, &format!("{d}.qcow2"), point);
            assert_bytes_eq(&format!("{point}/{d}.raw"), &member(&mnt, point, d), &want);
        }
    }
    unmount_ok(m);
    ws.check("vda.qcow2");
    ws.check("vdb.qcow2");
}

/// Two disks `vda.qcow2`, `vdb.qcow2` of one point `vm` (by the manifest).
fn two_disks(ws: &Workspace) {
    ws.create_qcow2("vda.qcow2", SIZE, None, "");
    ws.create_qcow2("vdb.qcow2", SIZE / 2, None, "cluster_size=4096");
    ws.qemu_io("vda.qcow2", "qcow2", &["write -P 0x0a 0 1M"]);
    ws.qemu_io("vdb.qcow2", "qcow2", &["write -P 0x0b 64k 300000"]);
    let entry = |disk: &str| {
        json!({ "name": "vm", "disk": disk, "image": format!("{disk}.qcow2"),
                "parent": null, "created": 1_700_000_000u64 })
    };
    let manifest = json!({ "version": 1, "points": [entry("vda"), entry("vdb")] });
    std::fs::write(ws.img(".snaptree.json"), manifest.to_string()).unwrap();
}

/// `MNT/<point>/<disk>.raw`, whole.
fn member(mnt: &Path, point: &str, disk: &str) -> Vec<u8> {
    read_disk(&mnt.join(point).join(format!("{disk}.raw")))
}

#[test]
fn internal_snapshots_of_every_disk_make_one_point() {
    let Some(ws) = workspace() else {
        return;
    };
    two_disks(&ws);
    for d in ["vda.qcow2", "vdb.qcow2"] {
        snapshot_create(&ws, d, "s1");
    }
    ws.qemu_io("vda.qcow2", "qcow2", &["write -P 0x1a 512k 1M"]);
    ws.qemu_io("vdb.qcow2", "qcow2", &["write -P 0x1b 0 4k"]);
    for d in ["vda.qcow2", "vdb.qcow2"] {
        snapshot_create(&ws, d, "s2");
    }
    ws.qemu_io("vdb.qcow2", "qcow2", &["write -P 0x2b 1M 64k"]);
    // A tag only one disk has: a point with that one disk.
    snapshot_create(&ws, "vda.qcow2", "only-a");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert_eq!(
        visible(&mnt),
        names(&["s1", "s2", "only-a", "vm"]),
        "{}",
        status_text(&mnt)
    );
    for tag in ["s1", "s2"] {
        for d in ["vda", "vdb"] {
            let want = convert_snapshot(&ws, &format!("{d}.qcow2"), tag);
            assert_bytes_eq(&format!("{tag}/{d}.raw"), &member(&mnt, tag, d), &want);
        }
        let i = info(&mnt, tag);
        assert_eq!(i["kind"], "internal", "{i}");
        assert!(
            i["disks"]["vda"].is_object() && i["disks"]["vdb"].is_object(),
            "{i}"
        );
    }
    assert_eq!(parent_link(&mnt, "s2"), Some("../s1".into()));
    assert_eq!(parent_link(&mnt, "vm"), Some("../only-a".into()));
    assert_bytes_eq(
        "vm/vdb.raw",
        &member(&mnt, "vm", "vdb"),
        &ws.flatten("vdb.qcow2"),
    );
    let r = ctl(&mnt, "s1", "delete");
    assert!(r.is_ok(), "delete s1: {r:?}\n{}", status_text(&mnt));
    assert_eq!(visible(&mnt), names(&["s2", "only-a", "vm"]));
    for d in ["vda", "vdb"] {
        let want = convert_snapshot(&ws, &format!("{d}.qcow2"), "s2");
        assert_bytes_eq(&format!("s2/{d}.raw"), &member(&mnt, "s2", d), &want);
    }
    unmount_ok(m);
    ws.check("vda.qcow2");
    ws.check("vdb.qcow2");
}
