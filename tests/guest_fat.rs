//! The FAT reader (`snaptree::guest::fat`) against volumes made by
//! `mkfs.vfat` + `mcopy`, judged by mtools (`mcopy` back out, `mdir`), by
//! blkid for label and UUID, and, where the kernel has vfat, by a read-only
//! loop mount of a copy. Then byte flips over boot sector, FATs and
//! directories (`SNAPTREE_FAT_FUZZ` rounds) and hand-made chain and
//! directory loops: errors, never a panic or a hang.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::guest::fat;
use snaptree::guest::{FileBytes, FileKind, GuestError, GuestFs, ReadBytes};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn tools_or_skip() -> bool {
    for t in ["mkfs.vfat", "mcopy", "mdel", "mattrib", "mdir"] {
        if !have(t) {
            println!("SKIP: {t} not installed (apt-get install dosfstools mtools)");
            return false;
        }
    }
    true
}

/// Runs a tool with mtools' environment; panics with its stderr on failure.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("MTOOLSRC", "/dev/null")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic bytes for file contents.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut r = SmallRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Writes the source tree; `many` is the size of the big directory.
fn make_tree(root: &Path, many: usize) {
    let w = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
    };
    w(
        "Long unicode name ünïcödé ☃ 日本語 with spaces.txt",
        b"unicode\n",
    );
    w("UPPER.TXT", b"upper\n");
    w("lower.txt", b"lower\n");
    w("Mixed.Txt", b"mixed\n");
    w("lowerdir/inner.c", b"int main;\n");
    w("a/b/c/d/e/deep file.txt", b"deep\n");
    w("big.bin", &noise(1, 1_500_000));
    w("empty.txt", b"");
    w("empty2", b"");
    w("readonly.txt", b"ro\n");
    for i in 0..many {
        let data = if i % 97 == 0 {
            noise(i as u64, 3000)
        } else {
            Vec::new()
        };
        w(&format!("many/f{i:04}.txt"), &data);
    }
}

/// A volume image made and filled by the real tools.
struct Volume {
    _dir: tempfile::TempDir,
    img: PathBuf,
}

/// `mkfs.vfat ARGS` on a `kib` KiB image, the tree copied in with `mcopy`,
/// `readonly.txt` marked read-only and a file fragmented by deleting every
/// other small file before copying it.
fn make_volume(mkfs_args: &[&str], kib: u64, many: usize) -> Volume {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    let img_s = img.to_str().unwrap().to_string();
    let kib_s = kib.to_string();
    let mut a = vec!["mkfs.vfat", "-C"];
    a.extend_from_slice(mkfs_args);
    a.extend_from_slice(&[&img_s, &kib_s]);
    run(&a);
    let src = dir.path().join("src");
    make_tree(&src, many);
    let mut a = vec![
        "mcopy".to_string(),
        "-s".into(),
        "-m".into(),
        "-i".into(),
        img_s.clone(),
    ];
    for e in std::fs::read_dir(&src).unwrap() {
        a.push(e.unwrap().path().to_str().unwrap().to_string());
    }
    a.push("::/".into());
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    run(&["mattrib", "-i", &img_s, "+r", "::/readonly.txt"]);
    // Fragment: small files, delete every other, then a file filling the gaps.
    let frag = dir.path().join("fragsrc");
    std::fs::create_dir(&frag).unwrap();
    let mut small = Vec::new();
    for i in 0..8 {
        let p = frag.join(format!("s{i}"));
        std::fs::write(&p, noise(100 + i, 4096)).unwrap();
        small.push(p.to_str().unwrap().to_string());
    }
    let mut a = vec!["mcopy", "-i", &img_s];
    a.extend(small.iter().map(String::as_str));
    a.push("::/");
    run(&a);
    run(&["mdel", "-i", &img_s, "::/s1", "::/s3", "::/s5"]);
    rewind_fsinfo_hint(&img);
    let f = dir.path().join("fragmented.bin");
    std::fs::write(&f, noise(7, 40_000)).unwrap();
    run(&["mcopy", "-m", "-i", &img_s, f.to_str().unwrap(), "::/"]);
    Volume { _dir: dir, img }
}

/// On FAT32, mtools allocates after the FSInfo "next free" hint, past the
/// gaps just freed; setting the hint to cluster 2 makes it fill them.
fn rewind_fsinfo_hint(img: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 0).unwrap();
    if u16::from_le_bytes([b[22], b[23]]) != 0 {
        return; // FAT12/16: no FSInfo; mtools searches from the start
    }
    let bps = u64::from(u16::from_le_bytes([b[11], b[12]]));
    let fsinfo = u64::from(u16::from_le_bytes([b[48], b[49]])) * bps;
    let mut sig = [0u8; 4];
    f.read_exact_at(&mut sig, fsinfo).unwrap();
    assert_eq!(&sig, b"RRaA", "FSInfo signature");
    f.write_all_at(&2u32.to_le_bytes(), fsinfo + 492).unwrap();
}

/// Runs of `fragmented.bin` as sleuthkit's `istat -r` lists them, or `None`
/// without sleuthkit.
fn sleuthkit_runs(img: &Path) -> Option<usize> {
    if !have("fls") || !have("istat") {
        println!("SKIP: sleuthkit second opinion: fls/istat not installed");
        return None;
    }
    let img_s = img.to_str().unwrap();
    let list = run(&["fls", "-f", "fat", img_s]);
    let line = list.lines().find(|l| l.ends_with("\tfragmented.bin"))?;
    let inum = line
        .split(':')
        .next()?
        .split_whitespace()
        .last()?
        .to_string();
    let stat = run(&["istat", "-r", "-f", "fat", img_s, &inum]);
    Some(
        stat.lines()
            .filter(|l| l.contains("Starting address"))
            .count(),
    )
}

fn open(img: &Path) -> Arc<dyn GuestFs> {
    let bytes: Arc<dyn ReadBytes> = Arc::new(FileBytes::open(img).unwrap());
    assert!(fat::probe(&*bytes), "probe rejects {}", img.display());
    fat::open("testvol", bytes).unwrap()
}

/// What a reader shows of one path.
#[derive(Debug, PartialEq)]
struct Seen {
    dir: bool,
    size: u64,
    mtime: i64,
    data: Option<Vec<u8>>,
}

/// Walks our reader's whole tree: path -> what it shows.
fn walk_ours(fs: &dyn GuestFs) -> BTreeMap<String, Seen> {
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
fn read_all(fs: &dyn GuestFs, ino: u64, size: u64) -> Vec<u8> {
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
fn walk_host(root: &Path) -> BTreeMap<String, Seen> {
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
fn walk_mtools(img: &Path) -> BTreeMap<String, Seen> {
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
fn compare(ours: &BTreeMap<String, Seen>, judge: &BTreeMap<String, Seen>, who: &str) {
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
struct Mount {
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
fn judge_kernel(fs: &dyn GuestFs, img: &Path, ours: &BTreeMap<String, Seen>) {
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

fn check_volume(mkfs_args: &[&str], kib: u64, many: usize, label: &str, id: &str) {
    if !tools_or_skip() {
        return;
    }
    let v = make_volume(mkfs_args, kib, many);
    let fs = open(&v.img);
    let ours = walk_ours(&*fs);
    assert!(ours.len() > many + 15, "{} entries", ours.len());
    compare(&ours, &walk_mtools(&v.img), "mtools");
    judge_kernel(&*fs, &v.img, &ours);
    if let Some(runs) = sleuthkit_runs(&v.img) {
        assert!(
            runs > 1,
            "fragmented.bin is in {runs} run(s); the test needs it fragmented"
        );
    }

    // Names the way Linux vfat shows them; sizes; the read-only bit.
    for p in [
        "/UPPER.TXT",
        "/lower.txt",
        "/Mixed.Txt",
        "/many/f0001.txt",
        "/a/b/c/d/e/deep file.txt",
    ] {
        assert!(
            ours.contains_key(p),
            "{p} missing: {:?}",
            ours.keys().take(20).collect::<Vec<_>>()
        );
    }
    assert_eq!(ours["/empty.txt"].size, 0);
    let ro = fs.lookup(fs.root(), b"readonly.txt").unwrap();
    assert_eq!(fs.getattr(ro).unwrap().perm, 0o555);
    let big = fs.lookup(fs.root(), b"BIG.BIN").unwrap(); // case-insensitive
    let a = fs.getattr(big).unwrap();
    assert_eq!(
        (a.perm, a.nlink, a.uid, a.kind),
        (0o755, 1, 0, FileKind::File)
    );
    assert_eq!(fs.next_data(big, 10).unwrap(), Some(10));
    assert_eq!(fs.next_hole(big, 10).unwrap(), a.size);
    assert!(fs.listxattr(big).unwrap().is_empty());
    assert!(matches!(fs.lookup(big, b"x"), Err(GuestError::NotDir)));
    assert!(matches!(
        fs.lookup(fs.root(), b"nonexistent"),
        Err(GuestError::NotFound)
    ));
    let root = fs.getattr(fs.root()).unwrap();
    assert_eq!(
        (root.kind, root.perm, root.nlink),
        (FileKind::Dir, 0o755, 2 + 3)
    );

    let info = fs.info();
    assert_eq!(info.fstype, "vfat");
    assert_eq!(info.label.as_deref(), Some(label));
    assert_eq!(info.uuid.as_deref(), Some(id));
    if have("blkid") {
        let img = v.img.to_str().unwrap();
        assert_eq!(run(&["blkid", "-o", "value", "-s", "UUID", img]).trim(), id);
        assert_eq!(
            run(&["blkid", "-o", "value", "-s", "LABEL", img]).trim(),
            label
        );
    }
}

#[test]
fn fat12_512() {
    check_volume(
        &["-F", "12", "-n", "SMALL12", "-i", "0000BEEF"],
        6 * 1024,
        3000,
        "SMALL12",
        "0000-BEEF",
    );
}

#[test]
fn fat16_512() {
    check_volume(
        &["-F", "16", "-s", "1", "-n", "Sixteen", "-i", "1234ABCD"],
        24 * 1024,
        3000,
        "Sixteen",
        "1234-ABCD",
    );
}

#[test]
fn fat16_4096_sectors() {
    check_volume(
        &[
            "-F", "16", "-S", "4096", "-s", "1", "-n", "BIGSECT", "-i", "0BADF00D",
        ],
        32 * 1024,
        300,
        "BIGSECT",
        "0BAD-F00D",
    );
}

#[test]
fn fat32_512() {
    check_volume(
        &["-F", "32", "-s", "1", "-n", "THIRTYTWO", "-i", "CAFE0001"],
        48 * 1024,
        3000,
        "THIRTYTWO",
        "CAFE-0001",
    );
}

#[test]
fn fat32_4096_sectors() {
    check_volume(
        &[
            "-F", "32", "-S", "4096", "-s", "1", "-n", "FAT32K4", "-i", "4B4B4B4B",
        ],
        300 * 1024,
        300,
        "FAT32K4",
        "4B4B-4B4B",
    );
}

/// FAT32 on 4096-byte sectors with fewer clusters than the spec's FAT32
/// minimum (as Windows formats small ESPs on 4Kn disks). fsck.fat (like
/// Linux) reads it as FAT32 by its boot sector layout, and so do we; mtools
/// and sleuthkit misread it, so they cannot judge the contents.
#[test]
fn fat32_with_few_clusters_is_fat32() {
    if !tools_or_skip() || !have("fsck.fat") {
        println!("SKIP: fsck.fat not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("esp4k.img");
    let img_s = img.to_str().unwrap();
    run(&[
        "mkfs.vfat",
        "-C",
        "-F",
        "32",
        "-S",
        "4096",
        "-s",
        "1",
        "-n",
        "ESP4K",
        "-i",
        "00C0FFEE",
        img_s,
        "65536",
    ]);
    let fsck = Command::new("fsck.fat")
        .args(["-n", "-v", img_s])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&fsck.stdout).into_owned() + &String::from_utf8_lossy(&fsck.stderr);
    assert!(text.contains("is FAT32 according to fat_length"), "{text}");
    let fs = open(&img);
    let info = fs.info();
    assert!(
        info.notes[0].starts_with("FAT32, 16320 clusters"),
        "{:?}",
        info.notes
    );
    assert_eq!(info.label.as_deref(), Some("ESP4K"));
    assert_eq!(info.uuid.as_deref(), Some("00C0-FFEE"));
    assert!(fs.readdir(fs.root()).unwrap().is_empty());
}

/// An EFI system partition as installers make it: FAT32, label, the usual
/// EFI tree.
#[test]
fn efi_system_partition() {
    if !tools_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("esp.img");
    let img_s = img.to_str().unwrap();
    run(&[
        "mkfs.vfat",
        "-C",
        "-F",
        "32",
        "-n",
        "EFI",
        "-i",
        "52A1C0DE",
        img_s,
        "102400",
    ]);
    let src = dir.path().join("EFI");
    for (p, len) in [
        ("BOOT/BOOTX64.EFI", 900_000),
        ("debian/grubx64.efi", 2_500_000),
        ("debian/grub.cfg", 120),
    ] {
        let f = src.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, noise(len as u64, len)).unwrap();
    }
    run(&[
        "mcopy",
        "-s",
        "-m",
        "-i",
        img_s,
        src.to_str().unwrap(),
        "::/",
    ]);
    let fs = open(&img);
    let ours = walk_ours(&*fs);
    compare(&ours, &walk_mtools(&img), "mtools");
    judge_kernel(&*fs, &img, &ours);
    assert!(ours.contains_key("/EFI/BOOT/BOOTX64.EFI"));
    let mut ino = fs.root();
    for part in ["efi", "boot", "bootx64.efi"] {
        ino = fs.lookup(ino, part.as_bytes()).unwrap();
    }
    assert_eq!(fs.getattr(ino).unwrap().size, 900_000);
    assert_eq!(fs.info().uuid.as_deref(), Some("52A1-C0DE"));
    assert!(
        fs.info().notes[0].starts_with("FAT32"),
        "{:?}",
        fs.info().notes
    );
}

/// Boot sector fields this test needs to aim corruption.
struct Layout {
    fat_offset: u64,
    fat32: bool,
}

fn layout(img: &[u8]) -> Layout {
    let bps = u64::from(u16::from_le_bytes([img[11], img[12]]));
    let reserved = u64::from(u16::from_le_bytes([img[14], img[15]]));
    Layout {
        fat_offset: reserved * bps,
        fat32: u16::from_le_bytes([img[22], img[23]]) == 0,
    }
}

/// A FAT chain that loops back on itself is corruption naming the volume,
/// not a hang; so is one pointing outside the volume.
#[test]
fn chain_loops_and_out_of_range_clusters() {
    if !tools_or_skip() {
        return;
    }
    let v = make_volume(&["-F", "32", "-s", "1"], 40 * 1024, 10);
    let fs = open(&v.img);
    let big = fs.lookup(fs.root(), b"big.bin").unwrap();
    // Find big.bin's first cluster through its directory entry.
    let img = std::fs::read(&v.img).unwrap();
    let l = layout(&img);
    assert!(l.fat32);
    let pos = img
        .windows(11)
        .position(|w| w == b"BIG     BIN")
        .expect("short entry");
    let first = u32::from(u16::from_le_bytes([img[pos + 20], img[pos + 21]])) << 16
        | u32::from(u16::from_le_bytes([img[pos + 26], img[pos + 27]]));
    let entry = |c: u32| (l.fat_offset + 4 * u64::from(c)) as usize;
    for (value, what) in [(first, "loop"), (0x0FFF_FFF0, "outside"), (0, "free")] {
        let mut bad = img.clone();
        // The fifth cluster points back to the first (or outside, or free).
        let mut c = first;
        for _ in 0..4 {
            c = u32::from_le_bytes(bad[entry(c)..entry(c) + 4].try_into().unwrap());
        }
        bad[entry(c)..entry(c) + 4].copy_from_slice(&value.to_le_bytes());
        let bytes: Arc<dyn ReadBytes> = Arc::new(bad);
        let fs = fat::open("loopvol", bytes).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = fs.read(big, 0, &mut buf).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("loopvol: corrupt"), "{msg}");
        assert!(msg.contains(what), "{what}: {msg}");
    }
}

/// A directory entry pointing back at its parent's cluster gets the
/// parent's inode (so `find` and the kernel see a loop), and walking it
/// by inode terminates.
#[test]
fn directory_pointing_at_its_ancestor() {
    if !tools_or_skip() {
        return;
    }
    let v = make_volume(&["-F", "16", "-s", "1"], 24 * 1024, 10);
    let mut img = std::fs::read(&v.img).unwrap();
    // a/b: make b's entry (inside a) point at a's cluster.
    let a_pos = img.windows(11).position(|w| w == b"A          ").unwrap();
    let a_cluster = [img[a_pos + 26], img[a_pos + 27]];
    let b_pos = img.windows(11).position(|w| w == b"B          ").unwrap();
    img[b_pos + 26..b_pos + 28].copy_from_slice(&a_cluster);
    let fs = fat::open("v", Arc::new(img)).unwrap();
    let a = fs.lookup(fs.root(), b"a").unwrap();
    let b = fs.lookup(a, b"b").unwrap();
    assert_eq!(a, b);
    walk_bounded(&*fs);
}

/// Walks every directory once by inode, reading every file; returns errors
/// instead of failing (for fuzzing).
fn walk_bounded(fs: &dyn GuestFs) -> usize {
    let mut seen = HashSet::new();
    let mut stack = vec![fs.root()];
    let mut errors = 0;
    let mut buf = vec![0u8; 65536];
    while let Some(d) = stack.pop() {
        if !seen.insert(d) {
            continue;
        }
        let Ok(entries) = fs.readdir(d) else {
            errors += 1;
            continue;
        };
        for e in entries {
            let _ = fs.lookup(d, &e.name);
            match fs.getattr(e.ino) {
                Ok(a) if a.kind == FileKind::Dir => stack.push(e.ino),
                Ok(a) => {
                    let mut off = 0;
                    while off < a.size {
                        match fs.read(e.ino, off, &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => off += n as u64,
                        }
                    }
                }
                Err(_) => errors += 1,
            }
        }
    }
    errors
}

/// Byte flips in the boot sector, the FAT and directory entries: every
/// outcome is a value or an error naming the volume, never a panic or hang.
#[test]
fn byte_flip_fuzz() {
    if !tools_or_skip() {
        return;
    }
    let rounds: usize = std::env::var("SNAPTREE_FAT_FUZZ")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    for (args, kib) in [
        (&["-F", "12"][..], 4 * 1024u64),
        (&["-F", "32", "-s", "1"][..], 40 * 1024),
    ] {
        let v = make_volume(args, kib, 40);
        let img = std::fs::read(&v.img).unwrap();
        let l = layout(&img);
        // Directory entries: wherever the source names sit.
        let dirs: Vec<usize> = [
            &b"MANY       "[..],
            b"BIG     BIN",
            b"LOWER   TXT",
            b"F0001   TXT",
        ]
        .iter()
        .filter_map(|n| img.windows(11).position(|w| w == *n))
        .collect();
        let mut rng = SmallRng::seed_from_u64(13);
        for round in 0..rounds {
            let mut bad = img.clone();
            for _ in 0..rng.gen_range(1..6) {
                let at = match round % 3 {
                    0 => rng.gen_range(0..512),
                    1 => l.fat_offset as usize + rng.gen_range(0..4096),
                    _ => dirs[rng.gen_range(0..dirs.len())] + rng.gen_range(0..64),
                };
                bad[at] ^= 1 << rng.gen_range(0..8);
            }
            let bytes: Arc<dyn ReadBytes> = Arc::new(bad);
            let _ = fat::probe(&*bytes);
            match fat::open("fuzzvol", bytes) {
                Ok(fs) => {
                    walk_bounded(&*fs);
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("fuzzvol: "), "{msg}");
                }
            }
        }
    }
}
