//! Writing the current state of a qcow2 image that has internal
//! snapshots: clusters and L2 tables shared with a snapshot are copied on
//! write, so after random writes, zero writes and discards through the
//! mount the leaf equals an in-memory model, every snapshot still equals
//! what `qemu-img convert -l TAG` gave before the writes, and `qemu-img
//! check` is clean, also after a SIGKILL (once leaks are repaired).

use std::process::Command;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

const SIZE: u64 = 16 * MIB;
pub(super) const TAGS: [&str; 3] = ["s1", "s2", "s3"];

/// base.qcow2 under vm.qcow2, whose first data was written compressed
/// (`convert -c`), then three snapshots over writes, zero writes and
/// discards. `opts` are vm.qcow2's creation options.
pub(super) fn build(ws: &Workspace, opts: &str) {
    ws.create_qcow2("base.qcow2", SIZE, None, "");
    ws.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 0x11 0 3M", "write -P 0x12 9M 1M"],
    );
    ws.create_qcow2("src.qcow2", SIZE, None, opts);
    ws.qemu_io(
        "src.qcow2",
        "qcow2",
        &["write -P 0x21 1M 2M", "write -P 0x22 12M 300k"],
    );
    let mut args = vec!["convert", "-c", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["src.qcow2", "vm.qcow2"]);
    ws.qemu_img(&args);
    std::fs::remove_file(ws.img("src.qcow2")).unwrap();
    ws.qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "vm.qcow2",
    ]);
    ws.qemu_io("vm.qcow2", "qcow2", &["write -P 0x31 5M 200k"]);
    ws.qemu_img(&["snapshot", "-c", "s1", "vm.qcow2"]);
    ws.qemu_io(
        "vm.qcow2",
        "qcow2",
        &[
            "write -P 0x41 1500k 100k",
            "write -z 12M 64k",
            "discard 5M 64k",
        ],
    );
    ws.qemu_img(&["snapshot", "-c", "s2", "vm.qcow2"]);
    ws.qemu_io(
        "vm.qcow2",
        "qcow2",
        &["write -P 0x51 7M 1M", "write -P 0x52 4097 9000"],
    );
    ws.qemu_img(&["snapshot", "-c", "s3", "vm.qcow2"]);
    // No write after s3: every L2 table of the leaf is shared with it.
}

/// `qemu-img convert -l snapshot.name=TAG -O raw vm.qcow2`.
pub(super) fn convert_snapshot(ws: &Workspace, tag: &str) -> Vec<u8> {
    let out = ws.scratch(&format!("snap-{tag}.raw"));
    let o = out.to_string_lossy().into_owned();
    let l = format!("snapshot.name={tag}");
    ws.qemu_img(&["convert", "-U", "-l", &l, "-O", "raw", "vm.qcow2", &o]);
    let v = std::fs::read(&out).expect("read converted snapshot");
    std::fs::remove_file(&out).unwrap();
    v
}

fn snapshots(ws: &Workspace) -> Vec<Vec<u8>> {
    TAGS.iter().map(|t| convert_snapshot(ws, t)).collect()
}

/// One random write, zero write, hole punch or zero range on `f` and
/// `model`, at or after `lo`; returns what it did.
pub(super) fn random_op(
    f: &File,
    model: &mut [u8],
    rng: &mut SmallRng,
    seed: u64,
    lo: u64,
) -> String {
    let len = match rng.gen_range(0..3) {
        0 => rng.gen_range(1..5000),
        1 => rng.gen_range(1..200_000),
        _ => 65_536 * rng.gen_range(1..4),
    } as u64;
    let off = match rng.gen_range(0..3) {
        0 => rng.gen_range(lo / 65_536..SIZE / 65_536) * 65_536,
        _ => rng.gen_range(lo..=SIZE - len),
    }
    .min(SIZE - len);
    let kind = rng.gen_range(0..100);
    match kind {
        0..=49 => write_both(
            f,
            model,
            off,
            &pattern(seed ^ rng.gen::<u64>(), len as usize),
        ),
        50..=64 => write_both(f, model, off, &vec![0u8; len as usize]),
        65..=84 => {
            punch_hole(f, off, len).unwrap_or_else(|e| panic!("punch {off}+{len}: {e}"));
            model[off as usize..(off + len) as usize].fill(0);
        }
        _ => {
            fallocate(f, libc::FALLOC_FL_ZERO_RANGE, off, len)
                .unwrap_or_else(|e| panic!("zero range {off}+{len}: {e}"));
            model[off as usize..(off + len) as usize].fill(0);
        }
    }
    format!("op kind {kind} at {off}+{len}")
}

/// The snapshots of vm.qcow2 read as `want`, through qemu-img and (when
/// `mnt` is given) through the mount.
#[track_caller]
fn assert_snapshots(ws: &Workspace, mnt: Option<&Path>, want: &[Vec<u8>]) {
    for ((tag, got), want) in TAGS.iter().zip(snapshots(ws)).zip(want) {
        assert_bytes_eq(&format!("qemu-img convert -l {tag}"), &got, want);
        if let Some(mnt) = mnt {
            assert_disk(mnt, tag, want);
        }
    }
}

fn random_writes_keep_snapshots(opts: &str) {
    let Some(ws) = workspace() else { return };
    build(&ws, opts);
    ws.check("vm.qcow2");
    let want = snapshots(&ws);
    let mut model = ws.flatten("vm.qcow2");
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    let f = open_rw(&mnt, "vm").expect("open vm/disk.raw rw");
    const OPS: usize = 200;
    for op in 0..OPS {
        let what = random_op(&f, &mut model, &mut rng, seed ^ op as u64, 0);
        if op % 25 == 24 {
            assert_bytes_eq(
                &format!("vm after op {op} ({what}, seed {seed})"),
                &read_disk(&disk(&mnt, "vm")),
                &model,
            );
        }
        if op == OPS / 2 {
            f.sync_all().expect("fsync");
            ws.check("vm.qcow2");
            ws.compare("vm.qcow2", &model);
            assert_snapshots(&ws, Some(&mnt), &want);
        }
    }
    f.sync_all().expect("fsync");
    assert_disk(&mnt, "vm", &model);
    assert_snapshots(&ws, Some(&mnt), &want);
    drop(f);
    unmount_ok(m);
    ws.check_all();
    ws.compare("vm.qcow2", &model);
    assert_snapshots(&ws, None, &want);
}

#[test]
fn internal_writes_match_a_model_and_keep_snapshots() {
    random_writes_keep_snapshots("");
}

#[test]
fn internal_writes_small_clusters_keep_snapshots() {
    random_writes_keep_snapshots("cluster_size=4096");
}

#[test]
fn internal_writes_extended_l2_keep_snapshots() {
    random_writes_keep_snapshots("extended_l2=on,cluster_size=128k");
}

/// SIGKILL during writes: `qemu-img check` finds at most leaks, the leak
/// repair makes it clean, the snapshots are intact and what was fsynced
/// reads back, also through a new mount.
#[test]
fn internal_writes_survive_sigkill() {
    let Some(ws) = workspace() else { return };
    build(&ws, "cluster_size=4096");
    let want = snapshots(&ws);
    let mut model = ws.flatten("vm.qcow2");
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let Some(mut m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    {
        let f = open_rw(&m.mnt, "vm").expect("open vm rw");
        for op in 0..60 {
            random_op(&f, &mut model, &mut rng, seed ^ op, 0);
        }
        f.sync_all().expect("fsync");
        // Not synced, and only in the upper half: may or may not survive,
        // but must not corrupt.
        let mut scratch = model.clone();
        for op in 60..160 {
            random_op(&f, &mut scratch, &mut rng, seed ^ op, SIZE / 2);
        }
    }
    let mnt = m.mnt.clone();
    kill(m.pid(), libc::SIGKILL);
    let status = m.wait_for_kill();
    assert!(!status.success(), "killed daemon exited {status:?}");
    let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    drop(m);
    let out = ws.qemu_img_unchecked(&["check", "vm.qcow2"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check after SIGKILL (seed {seed}): {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    snaptree::image::qcow2::repair::repair_leaks(&ws.img("vm.qcow2")).expect("leak repair");
    ws.check("vm.qcow2");
    assert_snapshots(&ws, None, &want);
    let got = ws.flatten("vm.qcow2");
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    assert_snapshots(&ws, Some(&m.mnt), &want);
    assert_disk(&m.mnt, "vm", &got);
    unmount_ok(m);
    let half = (SIZE / 2) as usize;
    assert_bytes_eq(
        &format!("fsynced lower half after SIGKILL (seed {seed})"),
        &got[..half],
        &model[..half],
    );
}
