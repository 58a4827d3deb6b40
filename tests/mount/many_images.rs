//! Trees of many images (issue 11, finding 10): a mount's memory must not
//! grow by caches nobody uses, it keeps exactly one descriptor per image
//! (the one holding the image's QEMU-compatible lock, see
//! `src/fdlimit.rs`), and an open-file limit too small for the tree is
//! refused up front with a message naming the limit and the count needed.
//!
//! The images are copies of one tiny qcow2 (a few made different with
//! qemu-io) written sparsely, so thousands of them cost little disk and
//! time. `SNAPTREE_MANY_IMAGES` sets the count of the big test (default
//! 2000; the case is 10000). The bounds are on resources, never
//! on time.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::disk;
use super::support::*;

/// RSS a mount may use whatever the tree (binary, threads, FUSE buffers).
const RSS_BASE_KIB: u64 = 48 << 10;
/// RSS a mount may use per tiny image. Before the fix each one cost
/// about 129 KiB (preallocated LRU tables and the refcount table); now
/// about 4.
const RSS_PER_IMAGE_KIB: u64 = 24;

fn count_from_env() -> usize {
    match std::env::var("SNAPTREE_MANY_IMAGES") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n >= 4)
            .unwrap_or_else(|| panic!("SNAPTREE_MANY_IMAGES={v:?}: want a count of at least 4")),
        Err(_) => 2000,
    }
}

/// `img00000.qcow2`…: the point `img00000` and so on.
fn name(i: usize) -> String {
    format!("img{i:05}")
}

/// Copies `src` to `dst` writing only the 4 KiB blocks that are not all
/// zero (a fresh 1 MiB qcow2 is 192 KiB, nearly all zeros).
fn sparse_copy(src: &[u8], dst: &Path) {
    let f = std::fs::File::create(dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
    for (i, block) in src.chunks(4096).enumerate() {
        if block.iter().any(|b| *b != 0) {
            f.write_all_at(block, (i * 4096) as u64)
                .unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
        }
    }
    f.set_len(src.len() as u64)
        .unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
}

/// Builds `n` independent 1 MiB qcow2 roots; the images at the returned
/// indices hold distinct data written by qemu-io.
fn many_images(ws: &Workspace, n: usize) -> Vec<usize> {
    ws.create_qcow2("template.qcow2", MIB, None, "");
    let template = ws.img("template.qcow2");
    let bytes = std::fs::read(&template).expect("read the template image");
    std::fs::remove_file(&template).expect("remove the template image");
    for i in 0..n {
        sparse_copy(&bytes, &ws.img(&format!("{}.qcow2", name(i))));
    }
    let special = vec![0, 1, n / 2, n - 1];
    for (k, &i) in special.iter().enumerate() {
        let img = format!("{}.qcow2", name(i));
        let a = format!("write -P {} 0 65536", 0x41 + k);
        let b = format!("write -P {} 700001 3000", 0x61 + k);
        ws.qemu_io(&img, "qcow2", &[&a, &b]);
    }
    special
}

/// (VmRSS in KiB, open descriptors) of process `pid`.
fn resources(pid: i32) -> (u64, u64) {
    let mut status = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .and_then(|mut f| f.read_to_string(&mut status))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count() as u64;
    (rss, fds)
}

/// Sets RLIMIT_NOFILE of the command's process to `soft`:`hard`.
fn with_nofile(cmd: &mut Command, soft: u64, hard: u64) {
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn many_images_mount_with_bounded_memory_and_one_fd_each() {
    if !prerequisites_or_skip() {
        return;
    }
    let n = count_from_env();
    let ws = Workspace::new();
    let special = many_images(&ws, n);
    let Some(m) = ws.mount(&[]) else { return };
    let (rss, fds) = resources(m.pid());
    eprintln!("{n} images mounted: VmRSS {rss} KiB, {fds} descriptors");

    let points = visible(&ws.mnt);
    assert_eq!(points.len(), n, "points listed in the mount");
    for i in [0, 7, n / 3, n - 2] {
        assert!(points.contains(&name(i)), "point {} is missing", name(i));
    }
    for &i in &special {
        let p = name(i);
        let want = ws.flatten(&format!("{p}.qcow2"));
        assert_bytes_eq(
            &format!("{p}/disk.raw"),
            &read_disk(&disk(&ws.mnt, &p)),
            &want,
        );
    }
    let limit = RSS_BASE_KIB + RSS_PER_IMAGE_KIB * n as u64;
    assert!(
        rss <= limit,
        "{n} tiny images take {rss} KiB RSS, more than {limit} KiB ({RSS_BASE_KIB} + {RSS_PER_IMAGE_KIB} per image)"
    );
    // One descriptor per image (its lock lives on it), plus a few of the
    // daemon's own: never two per image.
    assert!(
        fds >= n as u64 && fds <= n as u64 + 64,
        "{n} images mounted with {fds} open descriptors"
    );
    let (rss_after, fds_after) = resources(m.pid());
    assert!(
        fds_after <= n as u64 + 64,
        "after reads: {fds_after} descriptors (RSS {rss_after} KiB)"
    );
    m.unmount();
}

/// A hard limit below what the tree needs: the mount is refused before
/// anything is opened, naming the limit and the count; nothing is mounted.
#[test]
fn nofile_limit_too_small_is_refused_naming_the_limit() {
    if !prerequisites_or_skip() {
        return;
    }
    let n = 300;
    let ws = Workspace::new();
    many_images(&ws, n);
    let _guard = Mount::background(&ws.mnt);
    let mut c = Command::new(bin());
    c.arg("mount")
        .arg(&ws.images)
        .arg(&ws.mnt)
        .arg("-f")
        .current_dir("/");
    with_nofile(&mut c, 256, 256);
    let o = run_with_timeout(&mut c, COMMAND_TIMEOUT);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "mount with nofile 256 of {n} images succeeded: {err}"
    );
    assert!(
        err.contains("open-file limit (RLIMIT_NOFILE) is 256")
            && err.contains(&format!("{n} images need about {}", n + 64))
            && err.contains("ulimit"),
        "the message must name the limit and the count needed: {err}"
    );
    assert!(
        !is_mounted(&ws.mnt),
        "a refused mount left {} mounted",
        ws.mnt.display()
    );
}

/// A soft limit below what the tree needs but a hard limit above it: the
/// soft limit is raised and the whole tree mounts.
#[test]
fn low_soft_nofile_limit_is_raised_to_the_hard_one() {
    if !prerequisites_or_skip() {
        return;
    }
    let n = 300;
    let ws = Workspace::new();
    many_images(&ws, n);
    let guard = Mount::background(&ws.mnt);
    let mut c = Command::new(bin());
    c.arg("mount").arg(&ws.images).arg(&ws.mnt).current_dir("/");
    with_nofile(&mut c, 128, 4096);
    let o = run_with_timeout(&mut c, COMMAND_TIMEOUT);
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && (err.contains("/dev/fuse") || err.contains("No such device")) {
        skip(&format!("FUSE mount refused: {err}"));
        return;
    }
    assert!(
        o.status.success(),
        "mount with nofile 128:4096 of {n} images: {err}"
    );
    assert_eq!(visible(&ws.mnt).len(), n, "points listed in the mount");
    let p = name(n / 2);
    let want = ws.flatten(&format!("{p}.qcow2"));
    assert_bytes_eq(
        &format!("{p}/disk.raw"),
        &read_disk(&disk(&ws.mnt, &p)),
        &want,
    );
    guard.unmount();
}

/// A writable leaf loads its refcount table only when a write first needs
/// it. A discard of whole clusters is such a first change that allocates
/// nothing but frees clusters: it must still reach the image, with the
/// freed clusters' refcounts dropped (no leak in `qemu-img check`).
#[test]
fn discard_as_first_write_frees_clusters_without_a_leak() {
    if !prerequisites_or_skip() {
        return;
    }
    let ws = Workspace::new();
    ws.create_qcow2("leaf.qcow2", 4 * MIB, None, "");
    ws.qemu_io("leaf.qcow2", "qcow2", &["write -P 0x77 0 1M"]);
    let mut model = ws.flatten("leaf.qcow2");
    let Some(m) = ws.mount(&[]) else { return };
    {
        let f = super::open_rw(&ws.mnt, "leaf").expect("open leaf/disk.raw");
        let (off, len) = (128 << 10, 256 << 10);
        fallocate(
            &f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
        .expect("punch a hole of whole clusters");
        model[off as usize..(off + len) as usize].fill(0);
        f.sync_all().expect("fsync leaf/disk.raw");
    }
    m.unmount();
    ws.check("leaf.qcow2");
    ws.compare("leaf.qcow2", &model);
    let map = ws.qemu_img(&["map", "--output=json", "leaf.qcow2"]);
    let map = String::from_utf8_lossy(&map.stdout);
    let zeroed = "{ \"start\": 131072, \"length\": 262144, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false";
    assert!(
        map.contains(zeroed),
        "the discarded clusters must be zero clusters now: {map}"
    );
}
