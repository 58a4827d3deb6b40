//! The XFS reader (`snaptree::guest::xfs`) judged by the kernel: v5
//! filesystems made with mkfs.xfs, populated through a read-write loop
//! mount (every directory format, a bmbt file, sparse and unwritten
//! ranges, xattrs in every attr fork format with remote values, local and
//! remote symlinks), unmounted, then loop-mounted read-only from a COPY:
//! the whole tree (names, kinds, inode numbers, modes, owners, sizes,
//! times, link targets, xattrs, SEEK_DATA/SEEK_HOLE maps and content
//! sha256) must equal what our reader shows. v4 (`-m crc=0`, which this
//! kernel no longer mounts) is populated with a mkfs protofile and judged
//! against its source tree and xfs_db. Also: a dirty log in an image copied
//! while mounted (judged by `mount -o ro,norecovery`), and a byte-flip fuzz.
//!
//! Knobs: SNAPTREE_XFS_BIGDIR (entries in each of the two big directories,
//! default 12000), SNAPTREE_FUZZ_ITERS (fuzz rounds, default 40).

mod guest_xfs {
    pub mod fuzz;
    pub mod sha;
    pub mod tree;
    pub mod v4;
}

use guest_xfs::tree::{kernel_walk, populate, reader_walk, sh_out, Tree};
use snaptree::guest::{xfs, FileBytes, GuestError, GuestFs, ReadBytes};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

pub fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn skip(why: &str) {
    let t = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIP: {t}: {why}");
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether this process can make and loop-mount XFS; prints SKIP if not.
pub fn can_mount() -> bool {
    for tool in ["mkfs.xfs", "xfs_db", "mount", "losetup"] {
        if !have(tool) {
            skip(&format!("{tool} missing"));
            return false;
        }
    }
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root for loop mounts");
        return false;
    }
    true
}

/// A loop device and a mount on it, unmounted and detached on drop.
pub struct Mount {
    pub dir: PathBuf,
    dev: String,
    mounted: bool,
}

impl Mount {
    pub fn new(image: &Path, dir: &Path, opts: &str) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).unwrap();
        let dev = sh_out("losetup", &["-f", "--show", image.to_str().unwrap()])
            .trim()
            .to_string();
        let mut m = Mount {
            dir: dir.to_path_buf(),
            dev,
            mounted: false,
        };
        let out = Command::new("mount")
            .args(["-t", "xfs", "-o", opts, &m.dev])
            .arg(dir)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        m.mounted = true;
        Ok(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            for _ in 0..50 {
                if Command::new("umount")
                    .arg(&self.dir)
                    .status()
                    .is_ok_and(|s| s.success())
                {
                    self.mounted = false;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if self.mounted {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// A sparse image file with mkfs.xfs `opts`.
pub fn mkfs(img: &Path, size: &str, opts: &[&str]) -> Result<(), String> {
    sh_out("truncate", &["-s", size, img.to_str().unwrap()]);
    let out = Command::new("mkfs.xfs")
        .args(["-q", "-f", "-L", "guestvol"])
        .args(opts)
        .arg(img)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(())
}

pub fn copy(from: &Path, to: &Path) {
    sh_out(
        "cp",
        &[
            "--sparse=always",
            from.to_str().unwrap(),
            to.to_str().unwrap(),
        ],
    );
}

/// The kernel's view of a copy of `img`, mounted with `opts`.
fn kernel_tree(tmp: &Path, img: &Path, opts: &str) -> Result<Tree, String> {
    let judge = tmp.join("judge.img");
    copy(img, &judge);
    let m = Mount::new(&judge, &tmp.join("judge"), opts)?;
    let t = kernel_walk(&m.dir);
    drop(m);
    std::fs::remove_file(&judge).unwrap();
    Ok(t)
}

pub fn open(img: &Path) -> Arc<dyn GuestFs> {
    let bytes: Arc<dyn ReadBytes> = Arc::new(FileBytes::open(img).unwrap());
    assert!(xfs::probe(&*bytes));
    xfs::open("testvol", bytes).unwrap()
}

fn assert_same(kernel: &Tree, ours: &Tree) {
    for (path, k) in kernel {
        let p = String::from_utf8_lossy(path);
        let o = ours
            .get(path)
            .unwrap_or_else(|| panic!("{p}: missing in our walk"));
        match (k, o) {
            (Ok(k), Ok(o)) => assert_eq!(k, o, "{p}: kernel (left) and reader (right) differ"),
            (Err(_), Err(_)) => {}
            _ => panic!("{p}: kernel {k:?} but reader {o:?}"),
        }
    }
    for path in ours.keys() {
        assert!(
            kernel.contains_key(path),
            "{}: only in our walk",
            String::from_utf8_lossy(path)
        );
    }
}

/// `xfs_db` prints of inode `ino` (e.g. "core.format").
pub fn xfs_db_inode(img: &Path, ino: u64, fields: &[&str]) -> String {
    let mut args = vec!["-r".to_string(), "-c".into(), format!("inode {ino}")];
    for f in fields {
        args.push("-c".into());
        args.push(format!("print {f}"));
    }
    args.push(img.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    sh_out("xfs_db", &a)
}

/// Asserts the formats the populated tree is meant to reach, so the
/// comparison really covered them.
fn assert_formats(img: &Path, fs: &dyn GuestFs, big: bool) {
    let root = fs.root();
    let ino = |n: &str| fs.lookup(root, n.as_bytes()).unwrap();
    let frag = xfs_db_inode(img, ino("fragmented"), &["core.format"]);
    assert!(frag.contains("(btree)"), "fragmented: {frag}");
    let leafdir = xfs_db_inode(img, ino("leafdir"), &["core.format", "core.aformat"]);
    assert!(
        leafdir.contains("core.aformat = 3") || leafdir.contains("core.aformat = 2"),
        "leafdir: {leafdir}"
    );
    let leaf1 = xfs_db_inode(img, ino("leaf1dir"), &["core.size", "core.nextents"]);
    eprintln!("leaf1dir: {leaf1}");
    let blockdir = xfs_db_inode(img, ino("blockdir"), &["core.size"]);
    assert!(
        blockdir.contains("core.size = 4096") || blockdir.contains("core.size = 8192"),
        "blockdir: {blockdir}"
    );
    if big {
        let a = xfs_db_inode(img, ino("bigA"), &["core.format"]);
        assert!(
            a.contains("(btree)"),
            "bigA should be a btree directory: {a}"
        );
    }
}

fn check_misc(fs: &dyn GuestFs, big: bool) {
    let root = fs.root();
    assert!(matches!(
        fs.lookup(root, b"no-such-name"),
        Err(GuestError::NotFound)
    ));
    assert_eq!(fs.lookup(root, b".").unwrap(), root);
    let dev = fs.lookup(root, b"dev").unwrap();
    assert_eq!(fs.lookup(dev, b"..").unwrap(), root);
    let leaf = fs.lookup(root, b"leafdir").unwrap();
    assert_eq!(fs.lookup(leaf, b"..").unwrap(), root);
    // Through the hash index of a leaf directory of one data block.
    let leaf1 = fs.lookup(root, b"leaf1dir").unwrap();
    let f = fs.lookup(leaf1, b"one-block-0107-").unwrap();
    assert_eq!(fs.getattr(f).unwrap().size, 1);
    assert_eq!(fs.readdir(leaf1).unwrap().len(), 110);
    assert!(matches!(
        fs.lookup(leaf, b"file-0001-"),
        Err(GuestError::NotFound)
    ));
    assert!(matches!(
        fs.read(leaf, 0, &mut [0; 4]),
        Err(GuestError::IsDir)
    ));
    assert!(matches!(
        fs.readdir(fs.lookup(root, b"hello.txt").unwrap()),
        Err(GuestError::NotDir)
    ));
    if big {
        let a = fs.lookup(root, b"bigA").unwrap();
        for name in [
            &b"bigA-entry-000001-"[..],
            b"bigA-entry-999999-long-name-part-",
            b"",
        ] {
            assert!(
                matches!(fs.lookup(a, name), Err(GuestError::NotFound)),
                "{name:?}"
            );
        }
    }
    assert_eq!(fs.info().label.as_deref(), Some("guestvol"));
    assert_eq!(fs.info().fstype, "xfs");
}

/// mkfs with `opts`, populate through the kernel, unmount, judge.
fn compare_variant(opts: &[&str], big: usize) -> bool {
    if !can_mount() || !have("mknod") {
        return false;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    if let Err(e) = mkfs(&img, "1G", opts) {
        skip(&format!("mkfs.xfs {opts:?}: {e}"));
        return false;
    }
    match Mount::new(&img, &tmp.path().join("fill"), "rw") {
        Ok(m) => populate(&m.dir, big),
        Err(e) => {
            skip(&format!("kernel cannot mount {opts:?}: {e}"));
            return false;
        }
    }
    let kernel = kernel_tree(tmp.path(), &img, "ro").unwrap();
    let fs = open(&img);
    assert!(!fs.info().unclean, "{:?}", fs.info().notes);
    assert!(
        fs.info().notes.iter().all(|n| !n.starts_with("dirty log")),
        "{:?}",
        fs.info().notes
    );
    let bytes = FileBytes::open(&img).unwrap();
    assert_eq!(xfs::root_ino(&bytes), Some(fs.root()));
    let ours = reader_walk(&*fs);
    let errors: Vec<_> = ours.iter().filter(|(_, r)| r.is_err()).take(5).collect();
    assert!(errors.is_empty(), "reader errors: {errors:?}");
    assert_same(&kernel, &ours);
    assert!(kernel.len() > 2 * big, "tree too small: {}", kernel.len());
    assert_formats(&img, &*fs, big > 5000);
    let info = sh_out("xfs_db", &["-r", "-c", "info", img.to_str().unwrap()]);
    eprintln!("{opts:?}: {} entries compared\n{info}", kernel.len());
    check_misc(&*fs, big > 0);
    true
}

#[test]
fn xfs_v5_default_matches_kernel() {
    compare_variant(&[], knob("SNAPTREE_XFS_BIGDIR", 12000));
}

#[test]
fn xfs_v5_old_times_nrext64_8k_dirs_matches_kernel() {
    compare_variant(
        &[
            "-m",
            "bigtime=0",
            "-i",
            "sparse=0,nrext64=1",
            "-n",
            "size=8192",
        ],
        3000,
    );
}

#[test]
fn xfs_v5_small_blocks_matches_kernel() {
    compare_variant(
        &[
            "-b",
            "size=1024",
            "-m",
            "reflink=0,rmapbt=0",
            "-i",
            "size=512",
        ],
        3000,
    );
}

/// A crash-consistent image: copied while mounted read-write after files
/// were written and fsynced. Our reader flags the dirty log and serves
/// exactly what `mount -o ro,norecovery` of another copy shows.
#[test]
fn xfs_dirty_log_served_as_norecovery() {
    if !can_mount() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    mkfs(&img, "600M", &[]).unwrap();
    let crash = tmp.path().join("crash.img");
    {
        let m = Mount::new(&img, &tmp.path().join("live"), "rw").unwrap();
        // Settled part: written, then the log is pushed by freeze/thaw.
        populate(&m.dir, 0);
        sh_out("xfs_freeze", &["-f", m.dir.to_str().unwrap()]);
        sh_out("xfs_freeze", &["-u", m.dir.to_str().unwrap()]);
        // Live part: in the log only (maybe), fsynced.
        std::fs::create_dir(m.dir.join("live")).unwrap();
        for i in 0..50u64 {
            let p = m.dir.join(format!("live/file-{i}"));
            std::fs::write(
                &p,
                guest_xfs::tree::noise(1000 + i, 3000 + i as usize * 100),
            )
            .unwrap();
            std::fs::File::open(&p).unwrap().sync_all().unwrap();
        }
        std::fs::remove_file(m.dir.join("data-4095")).unwrap();
        // Overwrites in place (the bytes reach the disk, the inode change
        // only the log) and an append (the new size only in the log).
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.dir.join("data-100000"))
            .unwrap();
        f.write_at(&guest_xfs::tree::noise(77, 50_000), 10_000)
            .unwrap();
        f.sync_all().unwrap();
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(m.dir.join("data-4096"))
            .unwrap();
        f.write_at(&guest_xfs::tree::noise(78, 9000), 4096).unwrap();
        f.sync_all().unwrap();
        std::fs::File::open(m.dir.join("live"))
            .unwrap()
            .sync_all()
            .unwrap();
        copy(&img, &crash);
    }
    let fs = open(&crash);
    assert!(fs.info().unclean, "a dirty log is served unclean");
    let notes = fs.info().notes;
    assert!(
        notes.iter().any(|n| n.starts_with("dirty log")),
        "notes: {notes:?}"
    );
    let kernel = kernel_tree(tmp.path(), &crash, "ro,norecovery").unwrap();
    let ours = reader_walk(&*fs);
    assert_same(&kernel, &ours);
    let failed = kernel.values().filter(|r| r.is_err()).count();
    let live = kernel.keys().filter(|k| k.starts_with(b"live/")).count();
    eprintln!(
        "dirty log: {} entries compared, {failed} failing in both, {live} live files visible",
        kernel.len()
    );
    assert!(kernel.len() > 20, "too little visible: {}", kernel.len());
    // The cleanly unmounted original has a clean log.
    let clean = open(&img);
    assert!(
        clean
            .info()
            .notes
            .iter()
            .all(|n| !n.starts_with("dirty log")),
        "{:?}",
        clean.info().notes
    );
}

#[test]
fn xfs_not_xfs_and_truncated() {
    let junk: Arc<dyn ReadBytes> = Arc::new(vec![0u8; 1 << 20]);
    assert!(!xfs::probe(&*junk));
    assert_eq!(xfs::root_ino(&*junk), None);
    assert!(matches!(
        xfs::open("junk", junk),
        Err(GuestError::Corrupt { .. })
    ));
    if !have("mkfs.xfs") {
        skip("mkfs.xfs missing");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    mkfs(&img, "400M", &[]).unwrap();
    let mut head = vec![0u8; 64 << 20];
    FileBytes::open(&img)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    let cut: Arc<dyn ReadBytes> = Arc::new(head);
    let e = xfs::open("cut", cut)
        .err()
        .expect("a truncated volume must fail");
    assert!(e.to_string().starts_with("cut: "), "{e}");
}

#[test]
fn xfs_v4_protofile_matches_source_and_xfs_db() {
    guest_xfs::v4::run(knob("SNAPTREE_XFS_BIGDIR", 12000));
}

#[test]
fn xfs_byte_flip_fuzz() {
    if !can_mount() || !have("mknod") {
        return;
    }
    let rounds = knob("SNAPTREE_FUZZ_ITERS", 24);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fuzz.img");
    mkfs(&img, "320M", &[]).unwrap();
    {
        let m = Mount::new(&img, &tmp.path().join("fill"), "rw").unwrap();
        populate(&m.dir, 2500);
    }
    let regions = guest_xfs::fuzz::regions(&img, true);
    assert!(
        regions.iter().any(|r| r.0.contains("dabtree")),
        "{regions:?}"
    );
    assert!(regions.iter().any(|r| r.0 == "bmbt block"), "{regions:?}");
    guest_xfs::fuzz::fuzz(&img, &regions, rounds.div_ceil(2), 1);
    if let Some((v4, _, _)) = guest_xfs::v4::image(tmp.path(), 2500) {
        let regions = guest_xfs::fuzz::regions(&v4, false);
        guest_xfs::fuzz::fuzz(&v4, &regions, rounds / 2, 2);
    }
}
