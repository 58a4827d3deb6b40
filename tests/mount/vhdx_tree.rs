//! VHDX through the mount: a tree directory holding a VHDX made by
//! qemu-img reads like `qemu-img convert`; one whose metadata log was left
//! unapplied reads like QEMU after its own replay, is replayed into the
//! file only by a read-write mount (under the image's write lock; `status`
//! says so), and never by a read-only one. A VHDX leaf is writable: what
//! is written through the mount is what `qemu-img convert` reads after the
//! unmount, and `qemu-img check` is clean.

use std::path::Path;

use super::vhd_peers::{libvhdi_tool, vhdiinfo, VhdiMount};
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
    ws.create_vhdx("base.vhdx", SIZE);
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
    ws.create_vhdx("disk.vhdx", SIZE);
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

/// A qemu-img VHDX snapshotted `depth` times through the mount (`ctl
/// snapshot`), written at every level: each level is a differencing
/// `.vhdx` snaptree made; snaptree reads the model at every point;
/// `vhdiinfo` accepts every file, `vhdimount` of the leaf reads the model,
/// and qemu-img (which opens no differencing VHDX) reads the root as the
/// first snapshot.
fn vhdx_chain_through_snapshots(depth: usize) {
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_vhdx("disk.vhdx", SIZE);
    ws.qemu_io("disk.vhdx", "vhdx", &["write -P 0x21 0 5M"]);
    let mut model = ws.flatten("disk.vhdx");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 1..=depth as u64 {
        let name = format!("s{i}");
        ctl_ok(&mnt, "disk", &format!("snapshot {name}"));
        snaps.push((name, model.clone()));
        let f = open_rw(&mnt, "disk").expect("open the leaf");
        for j in 0..3u64 {
            let len = 1 + (i * 7919 + j * 104_729) % 90_000;
            let off = (i * 1_000_003 + j * 5_242_877) % (SIZE - len);
            write_both(&f, &mut model, off, &pattern(i * 10 + j, len as usize));
        }
        f.sync_all().expect("fsync");
    }
    // A clone of the first snapshot: an `.avhdx` child of its own,
    // writable, which leaves the snapshot as it was.
    ctl_ok(&mnt, "s1", "clone c1");
    let mut clone = snaps[0].1.clone();
    let f = open_rw(&mnt, "c1").expect("open the clone");
    write_both(&f, &mut clone, 4 * MIB + 77, &pattern(999, 70_000));
    f.sync_all().expect("fsync");
    drop(f);
    assert_disk(&mnt, "c1", &clone);
    assert_disk(&mnt, "disk", &model);
    for k in [0, depth / 2, depth - 1] {
        let (name, want) = &snaps[k];
        assert_disk(&mnt, name, want);
    }
    assert_eq!(
        info(&mnt, "disk")["disks"]["disk"]["chain_depth"],
        depth as u64 + 1
    );
    unmount_ok(m);
    let images = ws.vhdx_images();
    assert_eq!(images.len(), depth + 2, "{images:?}");
    assert!(
        images
            .iter()
            .any(|n| n.starts_with("c1") && n.ends_with(".avhdx")),
        "the clone is no .avhdx: {images:?}"
    );
    if libvhdi_tool("vhdiinfo") {
        for name in &images {
            if let Err(e) = vhdiinfo(&ws.img(name)) {
                panic!("libvhdi refuses {name}: {e}");
            }
        }
    }
    assert_bytes_eq(
        "qemu-img convert s1.vhdx",
        &ws.flatten("s1.vhdx"),
        &snaps[0].1,
    );
    assert_bytes_eq("snaptree export disk.vhdx", &ws.export("disk.vhdx"), &model);
    if !libvhdi_tool("vhdimount") {
        return skip("vhdimount is not installed (apt-get install libvhdi-utils)");
    }
    let v =
        VhdiMount::new(&ws.img("disk.vhdx"), &ws.scratch("vhdi")).unwrap_or_else(|e| panic!("{e}"));
    let got = std::fs::read(v.last_view()).expect("read vhdimount's view");
    assert_bytes_eq("vhdimount disk.vhdx (the leaf)", &got, &model);
    drop(v);
    let c1 = images.iter().find(|n| n.starts_with("c1")).unwrap();
    let v = VhdiMount::new(&ws.img(c1), &ws.scratch("vhdi-c1")).unwrap_or_else(|e| panic!("{e}"));
    let got = std::fs::read(v.last_view()).expect("read vhdimount's view");
    assert_bytes_eq("vhdimount of the clone", &got, &clone);
}

#[test]
fn vhdx_snapshots_make_avhdx_chains_depth_1() {
    vhdx_chain_through_snapshots(1);
}

#[test]
fn vhdx_snapshots_make_avhdx_chains_depth_8() {
    vhdx_chain_through_snapshots(8);
}

#[test]
fn vhdx_snapshots_make_avhdx_chains_depth_40() {
    vhdx_chain_through_snapshots(40);
}

/// Writes `data` at `off` of point `p` through the mount and the model.
fn put(mnt: &Path, p: &str, model: &mut [u8], off: u64, data: &[u8]) {
    let f = open_rw(mnt, p).unwrap_or_else(|e| panic!("open {p}: {e}"));
    write_both(&f, model, off, data);
    f.sync_all().expect("fsync");
}

/// What libvhdi's `vhdimount` reads from `image`, or `None` without it.
fn vhdimount_read(image: &Path, dir: &Path) -> Option<Vec<u8>> {
    if !libvhdi_tool("vhdimount") {
        skip("vhdimount is not installed (apt-get install libvhdi-utils)");
        return None;
    }
    let m = VhdiMount::new(image, dir).unwrap_or_else(|e| panic!("{e}"));
    Some(std::fs::read(m.last_view()).expect("read vhdimount's view"))
}

fn vhdiinfo_all(ws: &Workspace) {
    if !libvhdi_tool("vhdiinfo") {
        return;
    }
    for name in ws.vhdx_images() {
        if let Err(e) = vhdiinfo(&ws.img(&name)) {
            panic!("libvhdi refuses {name}: {e}");
        }
    }
}

/// Merges on a VHDX tree in both directions, as on VHD: a stream (the
/// hidden snapshot's data into its child, which is re-pointed at the
/// grandparent through the journal) and a commit (the child's data into
/// the hidden root, whose file takes the child's name and data write
/// GUID, which the leaf's `parent_linkage` names). Judged by snaptree,
/// libvhdi (`vhdiinfo`, `vhdimount` of the leaf) and qemu-img (the root).
#[test]
fn vhdx_tree_merges_stream_and_commit() {
    use super::merge::merge_now_ok;
    let Some(ws) = workspace() else {
        return;
    };
    ws.create_vhdx("disk.vhdx", SIZE);
    ws.qemu_io(
        "disk.vhdx",
        "vhdx",
        &["write -P 0x11 0 3M", "write -P 0x12 9M 512K"],
    );
    let mut model = ws.flatten("disk.vhdx");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    put(&mnt, "disk", &mut model, 1_000_001, &pattern(1, 70_000));
    let s1 = model.clone();
    ctl_ok(&mnt, "disk", "snapshot s1");
    put(&mnt, "disk", &mut model, 2 * MIB - 100, &pattern(3, 300));
    put(&mnt, "disk", &mut model, 7, &pattern(4, 5));
    let s2 = model.clone();
    ctl_ok(&mnt, "disk", "snapshot s2");
    // The leaf holds more than s2, so merging s2 streams it.
    put(&mnt, "disk", &mut model, 0, &pattern(6, 6 * MIB as usize));
    assert_disk(&mnt, "s1", &s1);
    assert_disk(&mnt, "s2", &s2);
    unmount_ok(m);
    vhdiinfo_all(&ws);

    let m = ws.remount(&["-o", "gc_idle=off"]);
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "s2", "delete");
    merge_now_ok(&mnt);
    let said = read_text(&mnt.join("merge-now"));
    assert!(
        said.contains("\"s2\" into \"disk\"") && !said.contains("committing"),
        "expected a stream of s2 into disk: {said}"
    );
    assert_eq!(info(&mnt, "disk")["disks"]["disk"]["chain_depth"], 2);
    assert_disk(&mnt, "disk", &model);
    assert_disk(&mnt, "s1", &s1);
    assert!(!ws.img("s2.vhdx").exists(), "s2.vhdx left after the merge");

    // s1 is the root: s3 is committed into it (s1's file takes s3's name
    // and data write GUID, which disk.vhdx names).
    let s3 = model.clone();
    ctl_ok(&mnt, "disk", "snapshot s3");
    put(&mnt, "disk", &mut model, 3 * MIB, &pattern(7, 4096));
    ctl_ok(&mnt, "s1", "delete");
    merge_now_ok(&mnt);
    let said = read_text(&mnt.join("merge-now"));
    assert!(
        said.contains("\"s1\" into \"s3\"") && said.contains("committing"),
        "expected s3 committed into s1: {said}"
    );
    assert_eq!(visible(&mnt), names(&["s3", "disk"]));
    assert_disk(&mnt, "s3", &s3);
    assert_disk(&mnt, "disk", &model);
    unmount_ok(m);
    assert_eq!(ws.vhdx_images(), vec!["disk.vhdx", "s3.vhdx"]);
    vhdiinfo_all(&ws);
    ws.check("s3.vhdx");
    assert_bytes_eq("qemu-img convert s3.vhdx", &ws.flatten("s3.vhdx"), &s3);
    if let Some(v) = vhdimount_read(&ws.img("disk.vhdx"), &ws.scratch("vhdi")) {
        assert_bytes_eq("vhdimount disk.vhdx after the merges", &v, &model);
    }
    assert_bytes_eq("snaptree export disk.vhdx", &ws.export("disk.vhdx"), &model);
    let m = ws.remount(&["-o", "gc_idle=off"]);
    assert_disk(&m.mnt, "disk", &model);
    assert_disk(&m.mnt, "s3", &s3);
    unmount_ok(m);
}

/// A Hyper-V VM's disks: the base `Win10.vhdx` and two checkpoints'
/// differencing disks named as Hyper-V names them, `Win10_<GUID>.avhdx`
/// (made here by snaptree's own child creation, which writes Hyper-V's
/// parent locator). They show as `checkpoint-1` and `checkpoint-2` in
/// chain order, the file name (with its GUID) stays in `info.json`, and a
/// saved-memory `.vmrs` in the VM's `Snapshots` directory is reported in
/// `status` as present and not readable.
#[test]
fn hyperv_checkpoints_get_short_names_in_chain_order() {
    let Some(ws) = workspace() else { return };
    ws.qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "Win10.vhdx",
        &SIZE.to_string(),
    ]);
    ws.qemu_io("Win10.vhdx", "vhdx", &["write -P 0x41 0 1M"]);
    // The GUIDs sort against chain order, so numbering by name would
    // show.
    let files = [
        "Win10_F1D2C3B4-0000-4000-8000-000000000002.avhdx",
        "Win10_0A1B2C3D-0000-4000-8000-000000000001.avhdx",
    ];
    let mut parent = ws.img("Win10.vhdx");
    for f in files {
        let layer = snaptree::image::probe::open_layer(&parent, None, false).expect("open parent");
        let child = ws.img(f);
        // The name the child records for its parent.
        let name = parent.file_name().unwrap().to_string_lossy().into_owned();
        snaptree::image::overlay::create_child(&child, &*layer, &parent, &name, SIZE)
            .expect("create child");
        parent = child;
    }
    let snapshots = ws.img("").parent().unwrap().join("Snapshots");
    std::fs::create_dir_all(&snapshots).unwrap();
    std::fs::write(snapshots.join("3B1D-CKPT.vmrs"), b"not ours to read").unwrap();
    let Some(m) = ws.mount(&["-o", "ro"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    assert_eq!(
        visible(&mnt),
        super::names(&["Win10", "checkpoint-1", "checkpoint-2"]),
        "{}",
        status_text(&mnt)
    );
    assert_eq!(
        parent_link(&mnt, "checkpoint-1").as_deref(),
        Some("../Win10")
    );
    assert_eq!(
        parent_link(&mnt, "checkpoint-2").as_deref(),
        Some("../checkpoint-1")
    );
    let i = info(&mnt, "checkpoint-1");
    assert!(i.to_string().contains(files[0]), "{i}");
    let mut want = vec![0u8; SIZE as usize];
    want[..MIB as usize].fill(0x41);
    assert_disk(&mnt, "checkpoint-2", &want);
    let status = status_text(&mnt);
    assert!(
        status.contains("3B1D-CKPT.vmrs\" is present and not readable"),
        "{status}"
    );
    unmount_ok(m);
}
