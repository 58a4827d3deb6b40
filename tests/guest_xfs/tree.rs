//! Populating a mounted XFS (every directory format, a bmbt file, sparse
//! and unwritten ranges, xattrs in every attr fork format, symlinks,
//! devices, owners, times) and walking a tree two ways: through the kernel
//! (std::fs, lseek, lgetxattr on a loop mount) and through our reader, into
//! one record shape compared entry by entry.

use snaptree::guest::{FileKind, GuestError, GuestFs};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

pub fn sh_out(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_times(p: &Path, secs: i64, nsecs: i64) {
    let ts = [libc::timespec {
        tv_sec: secs,
        tv_nsec: nsecs,
    }; 2];
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {p:?}");
}

pub fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    let r = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {p:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// A file of `blocks` 4 KiB blocks with every other block punched out
/// (so at least blocks/2 extents: a bmbt data fork), plus an unwritten
/// (preallocated) range inside its size.
fn fragmented(p: &Path, blocks: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.write_at(&noise(99, (blocks * 4096) as usize), 0).unwrap();
    f.sync_all().unwrap();
    for b in (1..blocks).step_by(2) {
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (b * 4096) as i64,
                4096,
            )
        };
        assert_eq!(r, 0, "punch");
    }
    f.sync_all().unwrap();
}

/// Directories named `a` and `b` filled in turns, so their blocks
/// interleave on disk: each gets many extents (a btree data fork).
pub fn interleaved_dirs(root: &Path, a: &str, b: &str, n: usize) {
    std::fs::create_dir(root.join(a)).unwrap();
    std::fs::create_dir(root.join(b)).unwrap();
    for i in 0..n {
        for d in [a, b] {
            let name = format!("{d}-entry-{i:06}-{}", "long-name-part-".repeat(1 + i % 9));
            std::fs::File::create(root.join(d).join(name)).unwrap();
        }
    }
}

/// Fills a mounted XFS at `root` with every case; `big` entries go into
/// each of the two interleaved big directories.
pub fn populate(root: &Path, big: usize) {
    let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    w("hello.txt", b"hello, world\n");
    w("empty", b"");
    for (i, n) in [1usize, 4095, 4096, 4097, 100_000, 3_000_001]
        .iter()
        .enumerate()
    {
        w(&format!("data-{n}"), &noise(i as u64 + 1, *n));
    }
    fragmented(&root.join("fragmented"), 2400);
    let f = std::fs::File::create(root.join("sparse")).unwrap();
    f.write_at(&noise(7, 5000), 0).unwrap();
    f.write_at(&noise(8, 4096), (5 << 30) + 8192).unwrap();
    f.set_len((5 << 30) + 8192 + 4096 + 100).unwrap();
    // Preallocated but never written: unwritten extents read as zeros and
    // count as holes for SEEK_DATA.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 1 << 20, 1 << 20) };
    assert_eq!(r, 0);
    drop(f);
    std::os::unix::fs::symlink("hello.txt", root.join("short-link")).unwrap();
    let long = format!("/{}/target", "long-component".repeat(60));
    std::os::unix::fs::symlink(&long, root.join("long-link")).unwrap();
    std::fs::hard_link(root.join("data-4097"), root.join("hardlink")).unwrap();
    std::fs::create_dir(root.join("Ελληνικά-目录")).unwrap();
    w("Ελληνικά-目录/üñíçødé-😀.txt", "unicode ✓\n".as_bytes());
    // Directory formats: shortform (above), block, leaf.
    for (d, n) in [("blockdir", 20), ("leafdir", 400)] {
        std::fs::create_dir(root.join(d)).unwrap();
        for i in 0..n {
            w(&format!("{d}/file-{i:04}-{}", "n".repeat(i % 40)), b"x");
        }
    }
    // A leaf directory whose entries fit one data block (too many for a
    // block directory of 4 KiB, which also holds the leaf): its size is
    // that of a block directory, its leaf block mapped far beyond.
    std::fs::create_dir(root.join("leaf1dir")).unwrap();
    for i in 0..110 {
        w(&format!("leaf1dir/one-block-{i:04}-"), b"y");
    }
    // xattrs: shortform, leaf with a remote value, node form.
    setxattr(&root.join("hello.txt"), "user.color", b"blue");
    setxattr(&root.join("hello.txt"), "trusted.secret", b"\x00\xff\x10");
    setxattr(&root.join("data-1"), "security.label", b"lbl");
    setxattr(&root.join("data-1"), "user.remote", &noise(5, 6000));
    setxattr(&root.join("data-1"), "user.remote2", &noise(6, 70));
    for i in 0..400 {
        setxattr(
            &root.join("leafdir"),
            &format!("user.attr-{i:04}"),
            format!("value-{i}-{}", "v".repeat(i % 50)).as_bytes(),
        );
    }
    let dev = root.join("dev");
    std::fs::create_dir(&dev).unwrap();
    sh_out(
        "mknod",
        &[dev.join("null").to_str().unwrap(), "c", "1", "3"],
    );
    sh_out(
        "mknod",
        &[dev.join("sda1").to_str().unwrap(), "b", "8", "1"],
    );
    sh_out(
        "mknod",
        &[dev.join("bignum").to_str().unwrap(), "c", "300", "70000"],
    );
    sh_out("mkfifo", &[dev.join("fifo").to_str().unwrap()]);
    drop(std::os::unix::net::UnixListener::bind(dev.join("socket")).unwrap());
    sh_out(
        "chown",
        &["1000:1000", root.join("hello.txt").to_str().unwrap()],
    );
    sh_out(
        "chown",
        &["70000:70001", root.join("data-1").to_str().unwrap()],
    );
    sh_out("chmod", &["4755", root.join("data-4096").to_str().unwrap()]);
    sh_out("chmod", &["1777", dev.to_str().unwrap()]);
    set_times(&root.join("hello.txt"), 981_173_106, 123_456_789);
    set_times(&root.join("data-4095"), -315_619_200, 5); // 1960
    set_times(&root.join("data-4097"), 2_000_000_000, 999_999_999);
    if big > 0 {
        interleaved_dirs(root, "bigA", "bigB", big);
    }
}

/// Everything compared about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rec {
    pub kind: char,
    pub ino: u64,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub allocated: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub rdev: u64,
    pub target: Option<Vec<u8>>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Data segments (SEEK_DATA..SEEK_HOLE) and the sha256 of their bytes.
    pub data: Option<(Vec<(u64, u64)>, String)>,
}

/// Path -> record, or the error seen reading it.
pub type Tree = BTreeMap<Vec<u8>, Result<Rec, String>>;

fn kind_char(k: FileKind) -> char {
    match k {
        FileKind::File => 'f',
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
    }
}

fn sha(chunks: &[Vec<u8>]) -> String {
    let mut h = super::sha::Sha256::new();
    for c in chunks {
        h.update(c);
    }
    h.hex()
}

fn kernel_xattrs(p: &Path) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = cpath(p);
    let mut names = vec![0u8; 65536];
    let n = unsafe {
        libc::llistxattr(
            c.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cn.as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                v.len(),
            )
        };
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    Ok(out)
}

fn kernel_data(p: &Path) -> std::io::Result<(Vec<(u64, u64)>, String)> {
    let f = std::fs::File::open(p)?;
    let fd = f.as_raw_fd();
    let (mut segs, mut bufs, mut pos) = (Vec::new(), Vec::new(), 0i64);
    loop {
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let e = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let mut buf = vec![0u8; (e - d) as usize];
        f.read_exact_at(&mut buf, d as u64)?;
        bufs.push(buf);
        segs.push((d as u64, e as u64));
        pos = e;
    }
    Ok((segs, sha(&bufs)))
}

fn kernel_rec(p: &Path) -> std::io::Result<Rec> {
    let m = std::fs::symlink_metadata(p)?;
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else {
        'f'
    };
    Ok(Rec {
        kind,
        ino: m.ino(),
        perm: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        nlink: m.nlink(),
        allocated: m.blocks() * 512,
        atime: (m.atime(), m.atime_nsec() as u32),
        mtime: (m.mtime(), m.mtime_nsec() as u32),
        ctime: (m.ctime(), m.ctime_nsec() as u32),
        rdev: m.rdev(),
        target: if kind == 'l' {
            Some(std::fs::read_link(p)?.as_os_str().as_bytes().to_vec())
        } else {
            None
        },
        xattrs: kernel_xattrs(p)?,
        data: if kind == 'f' {
            Some(kernel_data(p)?)
        } else {
            None
        },
    })
}

/// The tree under `root` as the kernel shows it (errors recorded, as a
/// norecovery mount of a crash-consistent image may fail some inodes).
pub fn kernel_walk(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                out.insert([rel, b"/<readdir>".to_vec()].concat(), Err(e.to_string()));
                continue;
            }
        };
        for e in rd {
            let e = e.unwrap();
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(e.file_name().as_bytes());
            let rec = kernel_rec(&e.path()).map_err(|e| e.to_string());
            if matches!(&rec, Ok(x) if x.kind == 'd') {
                stack.push((e.path(), r.clone()));
            }
            out.insert(r, rec);
        }
    }
    out
}

fn reader_data(fs: &dyn GuestFs, ino: u64) -> Result<(Vec<(u64, u64)>, String), GuestError> {
    let (mut segs, mut bufs, mut pos) = (Vec::new(), Vec::new(), 0u64);
    while let Some(d) = fs.next_data(ino, pos)? {
        let e = fs.next_hole(ino, d)?;
        let mut buf = vec![0u8; (e - d) as usize];
        let n = fs.read(ino, d, &mut buf)?;
        assert_eq!(n, buf.len(), "short read of inode {ino}");
        bufs.push(buf);
        segs.push((d, e));
        pos = e;
    }
    Ok((segs, sha(&bufs)))
}

/// One entry through the reader (lookup checked against readdir's ino).
pub fn reader_rec(fs: &dyn GuestFs, dir: u64, name: &[u8], ino: u64) -> Result<Rec, GuestError> {
    assert_eq!(
        fs.lookup(dir, name)?,
        ino,
        "lookup of {:?}",
        String::from_utf8_lossy(name)
    );
    let a = fs.getattr(ino)?;
    let kind = kind_char(a.kind);
    let mut xattrs = Vec::new();
    for n in fs.listxattr(ino)? {
        let v = fs.getxattr(ino, &n)?;
        xattrs.push((n, v));
    }
    xattrs.sort();
    Ok(Rec {
        kind,
        ino: a.ino,
        perm: a.perm as u32,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        nlink: a.nlink as u64,
        allocated: a.allocated,
        atime: (a.atime.secs, a.atime.nsecs),
        mtime: (a.mtime.secs, a.mtime.nsecs),
        ctime: (a.ctime.secs, a.ctime.nsecs),
        rdev: a.rdev as u64,
        target: if kind == 'l' {
            Some(fs.readlink(ino)?)
        } else {
            None
        },
        xattrs,
        data: if kind == 'f' {
            Some(reader_data(fs, ino)?)
        } else {
            None
        },
    })
}

/// The whole tree through the reader, errors recorded per entry.
pub fn reader_walk(fs: &dyn GuestFs) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(fs.root(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match fs.readdir(dir) {
            Ok(e) => e,
            Err(e) => {
                out.insert([rel, b"/<readdir>".to_vec()].concat(), Err(e.to_string()));
                continue;
            }
        };
        for e in entries {
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(&e.name);
            let rec = reader_rec(fs, dir, &e.name, e.ino).map_err(|e| e.to_string());
            if let Ok(x) = &rec {
                assert_eq!(
                    x.kind,
                    kind_char(e.kind),
                    "readdir kind of {:?}",
                    String::from_utf8_lossy(&r)
                );
                if x.kind == 'd' {
                    stack.push((e.ino, r.clone()));
                }
            }
            out.insert(r, rec);
        }
    }
    out
}
