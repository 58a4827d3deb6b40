//! What a mount shows: every point of a tree (qcow2 and raw, several
//! chains, broken images beside them) reads exactly as `qemu-img convert`
//! flattens it, `SEEK_DATA`/`SEEK_HOLE` agree with `qemu-img map`, and
//! qemu itself can run on a mounted disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;

use super::*;

#[test]
fn every_point_reads_like_qemu_img_convert() {
    let Some(ws) = workspace() else {
        return;
    };
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
    let tree = tree_text(mnt);
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
    assert_errno(
        "SEEK_DATA after the last data",
        lseek(&f, 9 * MIB + 4096, libc::SEEK_DATA),
        libc::ENXIO,
    );
    assert_errno(
        "SEEK_DATA at the end",
        lseek(&f, 16 * MIB, libc::SEEK_DATA),
        libc::ENXIO,
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
    unmount_ok(m);
    ws.check_all();
}

/// A raw disk whose guest wrote a qcow2 header into its first sector stays
/// raw: the format its child records wins over the magic, so a guest cannot
/// make snaptree parse metadata it chose (and follow a backing file of its
/// choosing).
#[test]
fn raw_disk_with_a_guest_written_qcow2_header_stays_raw() {
    let Some(ws) = workspace() else {
        return;
    };
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

#[test]
fn one_image_source_mounts_its_chain() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
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
    unmount_ok(m);
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
    unmount_ok(m);
}

#[test]
fn broken_images_are_listed_and_the_rest_mounts() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
    let base_bytes = ws.flatten("base.qcow2");
    let leaf_bytes = ws.flatten("leaf.qcow2");
    // x.qcow2: qcow2 magic, then junk.
    let mut junk = b"QFI\xfb".to_vec();
    junk.extend(pattern(99, 8192));
    std::fs::write(ws.img("x.qcow2"), &junk).expect("write x.qcow2");
    // orphan.qcow2: its backing file does not exist.
    // kid.qcow2: backed by the broken x.qcow2.
    for (backing, name) in [("missing.qcow2", "orphan.qcow2"), ("x.qcow2", "kid.qcow2")] {
        ws.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, "16M",
        ]);
    }
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    assert_eq!(visible(&mnt), names(&["base", "leaf"]));
    let st = status_text(&mnt);
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
    unmount_ok(m);
    assert_eq!(std::fs::read(ws.img("x.qcow2")).expect("x.qcow2"), junk);
}

/// What users do: "run a VM on top of the mount". qemu-io opens the leaf's
/// disk.raw as a raw image, with O_DIRECT (`-t none`, threads and native
/// AIO) and through the page cache; every pattern reads back, the mount
/// reads what was written, and qemu-img sees the same disk.
#[test]
fn qemu_io_runs_on_the_mount() {
    const S: u64 = 16 * MIB;
    let Some(ws) = base_and_leaf_workspace(S) else {
        return;
    };
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
    unmount_ok(m);
    ws.check_all();
    ws.compare("leaf.qcow2", &model);
}
