//! Building source trees for `mkfs.ext4 -d` and walking a tree two ways:
//! through the kernel (a loop mount, std::fs, lseek, lgetxattr) and
//! through our reader (`GuestFs`), into the same record shape, so the two
//! can be compared entry by entry.

use snaptree::guest::{FileKind, GuestError, GuestFs};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::hash::Hasher;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

/// Runs a command; panics with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

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

fn set_times(p: &Path, secs: i64, nsecs: i64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsecs,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsecs,
        },
    ];
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {p:?}");
}

/// Fills `src` with the cases the issue lists: a directory of `bigdir`
/// entries, a 40-deep path, fast and slow symlinks, hardlinks, a sparse
/// file with a 5 GiB hole (if `sparse`), unicode names, xattrs, special
/// files, owners with high 16 bits, nanosecond and out-of-range times.
pub fn build_tree(src: &Path, bigdir: usize, sparse: bool) {
    let w = |p: &str, data: &[u8]| std::fs::write(src.join(p), data).unwrap();
    w("hello.txt", b"hello, world\n");
    w("empty", b"");
    for (i, n) in [1usize, 4095, 4096, 4097, 100_000, 3_000_001]
        .iter()
        .enumerate()
    {
        w(&format!("data-{n}"), &noise(i as u64 + 1, *n));
    }
    // Many extents (data, hole, data ...) so the extent tree needs index nodes.
    let frag = std::fs::File::create(src.join("fragmented")).unwrap();
    for i in 0..400u64 {
        frag.write_at(&noise(100 + i, 4096), i * 8192).unwrap();
    }
    drop(frag);
    if sparse {
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.write_at(&noise(7, 5000), 0).unwrap();
        f.write_at(&noise(8, 4096), (5 << 30) + 8192).unwrap();
        f.set_len((5 << 30) + 8192 + 4096 + 100).unwrap();
    }
    build_links(src);
    build_xattrs(src);
    build_specials(src);
    if bigdir > 0 {
        fill_bigdir(&src.join("bigdir"), bigdir);
    }
}

/// Deep paths, symlinks, hardlinks, unicode names.
fn build_links(src: &Path) {
    let w = |p: &str, data: &[u8]| std::fs::write(src.join(p), data).unwrap();
    let mut deep = src.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level{i:02}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.txt"), b"forty levels down\n").unwrap();
    std::os::unix::fs::symlink("hello.txt", src.join("fast-link")).unwrap();
    let slow = format!("/{}/target", "long-component".repeat(20));
    std::os::unix::fs::symlink(&slow, src.join("slow-link")).unwrap();
    std::os::unix::fs::symlink("../../../../etc/passwd", src.join("dangling")).unwrap();
    std::fs::hard_link(src.join("data-4097"), src.join("hardlink-a")).unwrap();
    std::fs::hard_link(src.join("data-4097"), src.join("hardlink-b")).unwrap();
    std::fs::create_dir(src.join("Ελληνικά-目录")).unwrap();
    w("Ελληνικά-目录/üñíçødé-😀.txt", "unicode ✓\n".as_bytes());
}

/// xattrs: small ones in the inode, a big one in the xattr block.
fn build_xattrs(src: &Path) {
    sh(
        "setfattr",
        &[
            "-n",
            "user.color",
            "-v",
            "blue",
            src.join("hello.txt").to_str().unwrap(),
        ],
    );
    sh(
        "setfattr",
        &[
            "-n",
            "trusted.secret",
            "-v",
            "0x00ff10",
            src.join("hello.txt").to_str().unwrap(),
        ],
    );
    sh(
        "setfattr",
        &[
            "-n",
            "security.label",
            "-v",
            "lbl",
            src.join("data-1").to_str().unwrap(),
        ],
    );
    let big = format!("0x{}", "ab".repeat(900));
    sh(
        "setfattr",
        &[
            "-n",
            "user.big",
            "-v",
            &big,
            src.join("data-1").to_str().unwrap(),
        ],
    );
    for i in 0..12 {
        let n = format!("user.attr{i}");
        sh(
            "setfattr",
            &[
                "-n",
                &n,
                "-v",
                &format!("value-{i}"),
                src.join("Ελληνικά-目录").to_str().unwrap(),
            ],
        );
    }
}

/// Device nodes, a FIFO, a socket; owners, modes and odd times.
fn build_specials(src: &Path) {
    let dev = src.join("dev");
    std::fs::create_dir(&dev).unwrap();
    sh(
        "mknod",
        &[dev.join("null").to_str().unwrap(), "c", "1", "3"],
    );
    sh(
        "mknod",
        &[dev.join("sda1").to_str().unwrap(), "b", "8", "1"],
    );
    sh(
        "mknod",
        &[dev.join("bignum").to_str().unwrap(), "c", "300", "70000"],
    );
    sh("mkfifo", &[dev.join("fifo").to_str().unwrap()]);
    drop(std::os::unix::net::UnixListener::bind(dev.join("socket")).unwrap());
    sh(
        "chown",
        &["1000:1000", src.join("hello.txt").to_str().unwrap()],
    );
    sh(
        "chown",
        &["70000:70001", src.join("data-1").to_str().unwrap()],
    );
    sh("chmod", &["4755", src.join("data-4096").to_str().unwrap()]);
    sh("chmod", &["1777", dev.to_str().unwrap()]);
    set_times(&src.join("hello.txt"), 981_173_106, 123_456_789);
    set_times(&src.join("data-4095"), -315_619_200, 5); // 1960
    set_times(&src.join("data-4097"), 4_102_444_800, 999_999_999); // 2100
}

/// A directory of `n` empty files with names of many lengths (so the
/// htree hashes see short, 32+ and 64+ byte names).
pub fn fill_bigdir(b: &Path, n: usize) {
    std::fs::create_dir(b).unwrap();
    for i in 0..n {
        // Non-ASCII bytes make the signed and unsigned hash variants differ.
        let tail = if i % 3 == 0 { "é-ü" } else { "" };
        let name = format!("entry-{i:06}-{}{tail}", "x".repeat(i % 97));
        std::fs::File::create(b.join(name)).unwrap();
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
    /// Data segments (SEEK_DATA..SEEK_HOLE) and a hash of their bytes.
    pub data: Option<(Vec<(u64, u64)>, u64)>,
}

pub type Tree = BTreeMap<Vec<u8>, Rec>;

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

fn kernel_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    let n = unsafe {
        libc::llistxattr(
            c.as_ptr(),
            names.as_mut_ptr() as *mut libc::c_char,
            names.len(),
        )
    };
    assert!(n >= 0, "llistxattr {p:?}");
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
        assert!(m >= 0, "lgetxattr {p:?}");
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

fn kernel_data(p: &Path) -> (Vec<(u64, u64)>, u64) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(p).unwrap();
    let fd = f.as_raw_fd();
    let (mut segs, mut h, mut pos) = (Vec::new(), DefaultHasher::new(), 0i64);
    loop {
        let d = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let e = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let mut buf = vec![0u8; (e - d) as usize];
        f.read_exact_at(&mut buf, d as u64).unwrap();
        h.write(&buf);
        segs.push((d as u64, e as u64));
        pos = e;
    }
    (segs, h.finish())
}

/// The tree under `root` as the kernel shows it.
pub fn kernel_walk(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(e.file_name().as_bytes());
            let ft = m.file_type();
            use std::os::unix::fs::FileTypeExt;
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
            if kind == 'd' && r != b"lost+found" {
                stack.push((p.clone(), r.clone()));
            }
            let rec = Rec {
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
                target: (kind == 'l').then(|| {
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec()
                }),
                xattrs: kernel_xattrs(&p),
                data: (kind == 'f').then(|| kernel_data(&p)),
            };
            out.insert(r, rec);
        }
    }
    out
}

fn reader_data(fs: &dyn GuestFs, ino: u64) -> Result<(Vec<(u64, u64)>, u64), GuestError> {
    let (mut segs, mut h, mut pos) = (Vec::new(), DefaultHasher::new(), 0u64);
    while let Some(d) = fs.next_data(ino, pos)? {
        let e = fs.next_hole(ino, d)?;
        let mut buf = vec![0u8; (e - d) as usize];
        let n = fs.read(ino, d, &mut buf)?;
        assert_eq!(n, buf.len(), "short read of inode {ino}");
        h.write(&buf);
        segs.push((d, e));
        pos = e;
    }
    Ok((segs, h.finish()))
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

/// The whole tree through the reader; `errors` collects per-entry errors
/// (e.g. Unsupported inline files) instead of failing the walk.
pub fn reader_walk(fs: &dyn GuestFs, errors: &mut Vec<(Vec<u8>, GuestError)>) -> Tree {
    let mut out = Tree::new();
    let mut stack = vec![(fs.root(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match fs.readdir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push((rel, e));
                continue;
            }
        };
        for e in entries {
            let mut r = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(&e.name);
            match reader_rec(fs, dir, &e.name, e.ino) {
                Ok(rec) => {
                    assert_eq!(
                        rec.kind,
                        kind_char(e.kind),
                        "readdir kind of {:?}",
                        String::from_utf8_lossy(&r)
                    );
                    if rec.kind == 'd' && r != b"lost+found" {
                        stack.push((e.ino, r.clone()));
                    }
                    out.insert(r, rec);
                }
                Err(err) => errors.push((r, err)),
            }
        }
    }
    out
}
