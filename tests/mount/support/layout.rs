//! Reading the mounted layout (`tree`, `status`, `<point>/info.json`,
//! `ctl`, `parent`, `disk.raw`) and the syscalls the tests aim at it
//! (`lseek` with `SEEK_DATA`/`SEEK_HOLE`, `fallocate`), each failing with
//! the path or errno that matters.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde_json::Value;

use super::Workspace;

/// Writes one command to `MNT/<point>/ctl` in a single `write(2)`;
/// `Err` carries the write's (or open's) errno.
pub fn ctl(mnt: &Path, point: &str, command: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(mnt.join(point).join("ctl"))?;
    let n = f.write(command.as_bytes())?;
    assert_eq!(n, command.len(), "short write of ctl command {command:?}");
    Ok(())
}

/// Like [`ctl`], but the command must succeed (else the panic shows
/// `status`).
#[track_caller]
pub fn ctl_ok(mnt: &Path, point: &str, command: &str) {
    if let Err(e) = ctl(mnt, point, command) {
        panic!(
            "{point}/ctl: {command:?} failed: {e}\nstatus:\n{}",
            read_text(&mnt.join("status"))
        );
    }
}

/// A text file of the mount (`tree`, `status`, `info.json`).
pub fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `MNT/<point>/info.json`, parsed.
pub fn info(mnt: &Path, point: &str) -> Value {
    let text = read_text(&mnt.join(point).join("info.json"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{point}/info.json: {e}: {text}"))
}

/// The point directories listed in `MNT` (everything but the top files).
pub fn visible(mnt: &Path) -> BTreeSet<String> {
    std::fs::read_dir(mnt)
        .unwrap_or_else(|e| panic!("ls {}: {e}", mnt.display()))
        .map(|e| e.expect("dir entry"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A set of names, for comparisons with [`visible`].
pub fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Where `MNT/<point>/parent` points (`None` if it does not exist).
pub fn parent_link(mnt: &Path, point: &str) -> Option<String> {
    std::fs::read_link(mnt.join(point).join("parent"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Drops the page cache of `f`, so the next reads come from the daemon.
pub fn drop_cache(f: &File) {
    // SAFETY: advisory call on an open descriptor.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Reads a whole file through a fresh descriptor, its cache dropped first.
pub fn read_disk(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    drop_cache(&f);
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Reads `len` bytes at `off` of an open disk (cache dropped first).
pub fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    drop_cache(f);
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off)
        .unwrap_or_else(|e| panic!("pread {len} at {off}: {e}"));
    v
}

/// `lseek(fd, off, whence)`, as an `io::Result`.
pub fn lseek(f: &File, off: u64, whence: i32) -> std::io::Result<u64> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// The data ranges of `f` as `SEEK_DATA`/`SEEK_HOLE` report them.
pub fn data_ranges(f: &File, size: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match lseek(f, at, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA at {at}: {e}"),
        };
        let end = lseek(f, start, libc::SEEK_HOLE)
            .unwrap_or_else(|e| panic!("SEEK_HOLE at {start}: {e}"));
        assert!(
            end > start && end <= size,
            "SEEK_DATA {start} then SEEK_HOLE {end} (size {size})"
        );
        v.push((start, end));
        at = end;
    }
    v
}

/// The data ranges `qemu-img map` reports for `images/<name>` (entries
/// with `"data": true`, adjacent ones merged).
pub fn qemu_data_ranges(ws: &Workspace, name: &str) -> Vec<(u64, u64)> {
    let o = ws.qemu_img(&["map", "-U", "--output=json", name]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img map json");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("map array") {
        if e["data"] != Value::Bool(true) {
            continue;
        }
        let s = e["start"].as_u64().expect("start");
        let end = s + e["length"].as_u64().expect("length");
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = end,
            _ => out.push((s, end)),
        }
    }
    out
}

/// `fallocate(fd, mode, off, len)`, as an `io::Result`.
pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The errno of `r`'s error, or a panic naming `what` if it succeeded.
#[track_caller]
pub fn errno_of<T>(what: &str, r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("{what}: succeeded, but it must fail"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: error without errno: {e}")),
    }
}

/// Panics, naming `what`, unless `r` failed with errno `want`.
#[track_caller]
pub fn assert_errno<T>(what: &str, r: std::io::Result<T>, want: i32) {
    let got = errno_of(what, r);
    assert_eq!(got, want, "{what}: errno {got}, expected {want}");
}

/// `MNT/status`.
pub fn status_text(mnt: &Path) -> String {
    read_text(&mnt.join("status"))
}

/// `MNT/tree`.
pub fn tree_text(mnt: &Path) -> String {
    read_text(&mnt.join("tree"))
}

/// PointDisk names drawn in `MNT/tree` (first word after the box drawing).
pub fn tree_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            l.trim_start_matches(|c: char| "│├└─ ".contains(c))
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .collect()
}

/// The JSON file at `path`, `None` if it does not exist (a file that is
/// not JSON fails the test).
pub fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read(path).ok()?;
    Some(serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The inode number of `path`.
pub fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

/// The files of the tree's `.snaptree-memory` (none when it does not
/// exist), not its index cache directory.
pub fn memory_dir_files(ws: &Workspace) -> BTreeSet<String> {
    std::fs::read_dir(ws.img(".snaptree-memory"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
