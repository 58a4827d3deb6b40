//! Judging the FAT reader: walking its tree and the trees mtools and a
//! kernel loop mount show, and comparing them.

use super::tools::run;
use snaptree::guest::{FileKind, GuestFs};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

/// What a reader shows of one path.
#[derive(Debug, PartialEq)]
pub struct Seen {
    pub dir: bool,
    pub size: u64,
    pub mtime: i64,
    pub data: Option<Vec<u8>>,
}

/// Walks our reader's whole tree: path -> what it shows.
pub fn walk_ours(fs: &dyn GuestFs) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(fs.root(), String::new())];
    while let Some((dir, path)) = stack.pop() {
        for e in fs.readdir(dir).unwrap() {
            let name = String::from_utf8(e.name.clone()).unwrap();
            let p = format!("{path}/{name}");
            assert_eq!(fs.lookup(dir, &e.name).unwrap(), e.ino, "lookup of {p}");
            let a = fs.getattr(e.ino).unwrap();
            assert_eq!(a.ino, e.ino);
            assert_eq!(a.kind, e.kind, "{p}");
            let data = (e.kind == FileKind::File).then(|| read_all(fs, e.ino, a.size));
            if e.kind == FileKind::Dir {
                stack.push((e.ino, p.clone()));
            }
            let size = if e.kind == FileKind::Dir { 0 } else { a.size };
            out.insert(
                p,
                Seen {
                    dir: e.kind == FileKind::Dir,
                    size,
                    mtime: a.mtime.secs,
                    data,
                },
            );
        }
    }
    out
}

/// Reads a file in odd-sized pieces so reads cross cluster and run ends.
pub fn read_all(fs: &dyn GuestFs, ino: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 7919];
    loop {
        let n = fs.read(ino, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out.len() as u64, size);
    out
}

/// Walks a host directory tree (an mtools extraction or a kernel mount).
pub fn walk_host(root: &Path) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, path)) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = format!("{path}/{}", e.file_name().to_str().unwrap());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let data = m.is_file().then(|| std::fs::read(e.path()).unwrap());
            if m.is_dir() {
                stack.push((e.path(), p.clone()));
            }
            let size = if m.is_dir() { 0 } else { m.len() };
            out.insert(
                p,
                Seen {
                    dir: m.is_dir(),
                    size,
                    mtime: m.mtime(),
                    data,
                },
            );
        }
    }
    out
}

/// mtools' view: the whole volume copied out with `mcopy -s -m`.
pub fn walk_mtools(img: &Path) -> BTreeMap<String, Seen> {
    let out = tempfile::tempdir().unwrap();
    let img_s = img.to_str().unwrap();
    run(&[
        "mcopy",
        "-s",
        "-n",
        "-m",
        "-i",
        img_s,
        "::/*",
        out.path().to_str().unwrap(),
    ]);
    walk_host(out.path())
}

/// Compares names, types, sizes, bytes and (files') mtimes.
pub fn compare(ours: &BTreeMap<String, Seen>, judge: &BTreeMap<String, Seen>, who: &str) {
    let a: Vec<_> = ours.keys().collect();
    let b: Vec<_> = judge.keys().collect();
    assert_eq!(a, b, "names differ from {who}");
    for (p, s) in ours {
        let j = &judge[p];
        assert_eq!((s.dir, s.size), (j.dir, j.size), "{p} vs {who}");
        assert!(s.data == j.data, "{p}: bytes differ from {who}");
        if !s.dir {
            assert_eq!(s.mtime, j.mtime, "{p}: mtime vs {who}");
        }
    }
}

/// Loop-mounts a copy read-only when the kernel has vfat; `None` (after
/// printing SKIP) when it has not.
pub struct Mount {
    dir: tempfile::TempDir,
    _copy: tempfile::TempDir,
}

impl Mount {
    fn new(img: &Path) -> Option<Mount> {
        let fss = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fss.lines().any(|l| l.trim_end().ends_with("\tvfat")) {
            println!("SKIP: kernel judge: this kernel has no vfat driver");
            return None;
        }
        let copy = tempfile::tempdir().unwrap();
        let c = copy.path().join("copy.img");
        std::fs::copy(img, &c).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop,ro,uid=0,gid=0,tz=UTC"])
            .arg(&c)
            .arg(dir.path())
            .status()
            .ok()?;
        if !st.success() {
            println!("SKIP: kernel judge: mount -o loop failed");
            return None;
        }
        Some(Mount { dir, _copy: copy })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Kernel view, plus modes and link counts against ours.
pub fn judge_kernel(fs: &dyn GuestFs, img: &Path, ours: &BTreeMap<String, Seen>) {
    let Some(m) = Mount::new(img) else { return };
    compare(ours, &walk_host(m.dir.path()), "the kernel");
    for p in ours.keys() {
        let host = std::fs::symlink_metadata(m.dir.path().join(&p[1..])).unwrap();
        let mut ino = fs.root();
        for part in p[1..].split('/') {
            ino = fs.lookup(ino, part.as_bytes()).unwrap();
        }
        let a = fs.getattr(ino).unwrap();
        assert_eq!(u32::from(a.perm), host.mode() & 0o7777, "{p}: mode");
        assert_eq!(a.nlink as u64, host.nlink(), "{p}: nlink");
        assert_eq!(a.size, host.len(), "{p}: size");
    }
}
