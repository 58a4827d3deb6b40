//! Regressions for the hostile review of the XFS reader: a v5 volume made
//! by mkfs.xfs and filled through a kernel loop mount, then damaged the
//! way a crafted image would be (fields written with `xfs_db -x`, which
//! recomputes CRCs, or raw bytes patched here with the CRC recomputed).
//! Each damage must give a named `Corrupt` error (never a panic, a loop
//! or unbounded memory) while the undamaged parts still read.

use snaptree::guest::{xfs, FileBytes, GuestError, GuestFs, ReadBytes};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn skip(why: &str) {
    let t = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIP: {t}: {why}");
}

fn run(cmd: &str, args: &[&str]) -> String {
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

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A loop mount, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A fresh v5 volume holding: `sf` (shortform directory), `ld` (a leaf
/// directory of two data blocks in two extents), `at` (60 attrs: a node
/// attr fork with three leaves), `rm` (a leaf attr fork with one remote
/// value). None if the tools or root are missing.
fn base(tmp: &Path) -> Option<PathBuf> {
    for tool in ["mkfs.xfs", "xfs_db", "mount", "setfattr"] {
        if !have(tool) {
            skip(&format!("{tool} missing"));
            return None;
        }
    }
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root for loop mounts");
        return None;
    }
    let img = tmp.join("x.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    run("mkfs.xfs", &["-q", "-f", img.to_str().unwrap()]);
    let dir = tmp.join("m");
    std::fs::create_dir(&dir).unwrap();
    run(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), dir.to_str().unwrap()],
    );
    let m = Mount(dir);
    let d = |s: &str| m.0.join(s);
    std::fs::create_dir(d("sf")).unwrap();
    std::fs::create_dir(d("ld")).unwrap();
    std::fs::write(d("sf/a"), b"a").unwrap();
    std::fs::write(d("sf/b"), b"b").unwrap();
    for i in 0..120 {
        std::fs::write(d(&format!("ld/entry-with-a-longish-name-{i}")), b"").unwrap();
    }
    let set = |p: &str, n: &str, v: &str| {
        run("setfattr", &["-n", n, "-v", v, d(p).to_str().unwrap()]);
    };
    std::fs::write(d("at"), b"").unwrap();
    for i in 0..60 {
        set("at", &format!("user.attr{i}"), &"v".repeat(100));
    }
    std::fs::write(d("rm"), b"").unwrap();
    set("rm", "user.small", "local value");
    set("rm", "user.remote", &"r".repeat(5000));
    drop(m);
    Some(img)
}

fn open(img: &Path) -> Arc<dyn GuestFs> {
    let bytes: Arc<dyn ReadBytes> = Arc::new(FileBytes::open(img).unwrap());
    xfs::open("hostile", bytes).unwrap()
}

fn ino(fs: &dyn GuestFs, name: &str) -> u64 {
    fs.lookup(fs.root(), name.as_bytes()).unwrap()
}

fn xfs_db_x(img: &Path, cmds: &[String]) {
    let mut args = vec!["-x".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run("xfs_db", &a);
}

/// The byte offset of filesystem block `fsb` (AG-relative numbering).
fn fsblock_byte(img: &Path, fsb: u64) -> u64 {
    let c = format!("convert fsblock {fsb} byte");
    let out = run("xfs_db", &["-r", "-c", &c, img.to_str().unwrap()]);
    let n = out.split('(').nth(1).and_then(|s| s.split(')').next());
    n.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("convert: {out}"))
}

/// `(file block, filesystem block)` of each mapped block `xfs_db bmap`
/// lists.
fn bmap(img: &Path, ino: u64, attr: bool) -> Vec<(u64, u64)> {
    let i = format!("inode {ino}");
    let b = if attr { "bmap -a" } else { "bmap" };
    let out = run("xfs_db", &["-r", "-c", &i, "-c", b, img.to_str().unwrap()]);
    let mut blocks = Vec::new();
    for l in out.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (off, start, count): (u64, u64, u64) = (
            w[2].parse().unwrap(),
            w[4].parse().unwrap(),
            w[7].parse().unwrap(),
        );
        blocks.extend((0..count).map(|i| (off + i, start + i)));
    }
    blocks
}

fn crc32c(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Rewrites the 4 KiB metadata block at `off` through `f`, then its CRC
/// (little-endian at `crc_at`, over the block with the field zeroed).
fn patch_block(img: &Path, off: u64, crc_at: usize, f: impl FnOnce(&mut [u8])) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = vec![0u8; 4096];
    file.read_exact_at(&mut b, off).unwrap();
    f(&mut b);
    b[crc_at..crc_at + 4].fill(0);
    let c = crc32c(&b);
    b[crc_at..crc_at + 4].copy_from_slice(&c.to_le_bytes());
    file.write_all_at(&b, off).unwrap();
}

fn assert_corrupt<T: std::fmt::Debug>(r: Result<T, GuestError>, what: &str) -> String {
    match r {
        Err(e @ GuestError::Corrupt { .. }) => {
            let s = e.to_string();
            assert!(s.starts_with("hostile: "), "{what}: {s}");
            eprintln!("{what}: {s}");
            s
        }
        other => panic!("{what}: want Corrupt, got {other:?}"),
    }
}

/// Finding 2: an attr leaf chain that loops back is refused at once as a
/// loop (it used to be followed 65,536 times, collecting every value on
/// each round).
#[test]
fn attr_leaf_chain_loop_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = base(tmp.path()) else { return };
    let at = ino(&*open(&img), "at");
    // Leaves are chained by forw/back from the leftmost one; point the
    // last one back at the first, whose back link is made to agree.
    let i = format!("inode {at}");
    let leaf = |b: u64, field: &str| {
        let out = run(
            "xfs_db",
            &[
                "-r",
                "-c",
                &i,
                "-c",
                &format!("ablock {b}"),
                "-c",
                &format!("print hdr.info.hdr.{field}"),
                img.to_str().unwrap(),
            ],
        );
        out.trim()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let leaves: Vec<u64> = (1..bmap(&img, at, true).len() as u64).collect();
    assert!(leaves.len() >= 2, "want a node attr fork: {leaves:?}");
    let first = *leaves.iter().find(|&&b| leaf(b, "back") == 0).unwrap();
    let last = *leaves.iter().find(|&&b| leaf(b, "forw") == 0).unwrap();
    let img2 = tmp.path().join("skip.img");
    std::fs::copy(&img, &img2).unwrap();
    xfs_db_x(
        &img,
        &[
            i.clone(),
            format!("ablock {last}"),
            format!("write hdr.info.hdr.forw {first}"),
            format!("ablock {first}"),
            format!("write hdr.info.hdr.back {last}"),
        ],
    );
    let fs = open(&img);
    let e = assert_corrupt(fs.listxattr(at), "listxattr of a looping chain");
    assert!(e.contains("attr leaf chain loops"), "{e}");
    assert_corrupt(
        fs.getxattr(at, b"user.attr1"),
        "getxattr of a looping chain",
    );
    // A forward link that skips a leaf: the back link does not agree.
    let mid = *leaves
        .iter()
        .find(|&&b| b != first && b != last)
        .unwrap_or(&last);
    if mid != last {
        xfs_db_x(
            &img2,
            &[
                i.clone(),
                format!("ablock {first}"),
                format!("write hdr.info.hdr.forw {last}"),
            ],
        );
        let e = assert_corrupt(open(&img2).listxattr(at), "skipped leaf");
        assert!(e.contains("back link"), "{e}");
    }
}

/// Finding 2: listing attr names reads no remote value (a damaged remote
/// block fails only the getxattr of its own value).
#[test]
fn listxattr_reads_names_only() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = base(tmp.path()) else { return };
    let rm = ino(&*open(&img), "rm");
    let ext = bmap(&img, rm, true);
    let &(_, remote) = ext.iter().find(|e| e.0 > 0).expect("a remote value block");
    let off = fsblock_byte(&img, remote);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"X", off + 200).unwrap();
    let fs = open(&img);
    let mut names = fs.listxattr(rm).unwrap();
    names.sort();
    assert_eq!(names, [b"user.remote".to_vec(), b"user.small".to_vec()]);
    assert_eq!(fs.getxattr(rm, b"user.small").unwrap(), b"local value");
    assert_corrupt(fs.getxattr(rm, b"user.remote"), "damaged remote value");
}

/// Finding 3: a shortform directory whose size cannot hold its header.
#[test]
fn shortform_dir_smaller_than_its_header() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = base(tmp.path()) else { return };
    let sf = ino(&*open(&img), "sf");
    for size in [0, 1, 5] {
        xfs_db_x(
            &img,
            &[format!("inode {sf}"), format!("write core.size {size}")],
        );
        let fs = open(&img);
        assert_corrupt(fs.readdir(sf), &format!("readdir, size {size}"));
        assert_corrupt(fs.lookup(sf, b"a"), &format!("lookup, size {size}"));
        assert!(fs.lookup(fs.root(), b"ld").is_ok());
    }
}

/// Finding 4: a data block (no tail: entries run to its end) whose last
/// 8 bytes start an entry rather than a free region.
#[test]
fn data_block_entry_in_its_last_8_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = base(tmp.path()) else { return };
    let ld = ino(&*open(&img), "ld");
    let ext = bmap(&img, ld, false);
    // The data block with the highest offset below the leaf: it ends in
    // a free region.
    let &(_, blk) = ext.iter().filter(|e| e.0 < 1 << 20).max().unwrap();
    let off = fsblock_byte(&img, blk);
    patch_block(&img, off, 4, |b| {
        // Walk to the last record (entry or free region) and replace it
        // and what follows by a free region up to byte 4088, then the
        // start of an entry (no 0xffff free tag) in the last 8 bytes.
        let be16 = |b: &[u8], p: usize| usize::from(u16::from_be_bytes([b[p], b[p + 1]]));
        let mut p = 64;
        let mut last = p;
        while p < 4096 {
            last = p;
            p += if be16(b, p) == 0xffff {
                be16(b, p + 2)
            } else {
                (11 + usize::from(b[p + 8]) + 1).next_multiple_of(8)
            };
        }
        assert!(last < 4088, "no room to craft at {last}");
        let len = 4088 - last;
        b[last..last + 2].copy_from_slice(&[0xff, 0xff]);
        b[last + 2..last + 4].copy_from_slice(&(len as u16).to_be_bytes());
        b[last + len - 2..last + len].copy_from_slice(&(last as u16).to_be_bytes());
        b[4088..4096].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 131]);
    });
    let fs = open(&img);
    assert_corrupt(fs.readdir(ld), "readdir");
}

/// Finding 12: two logical directory blocks mapped onto one physical
/// block; listing it twice would let a crafted fork repeat it without
/// bound.
#[test]
fn dir_extents_sharing_a_block() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = base(tmp.path()) else { return };
    let ld = ino(&*open(&img), "ld");
    let before = open(&img).readdir(ld).unwrap().len();
    assert!(before >= 120, "{before} entries");
    let ext = bmap(&img, ld, false);
    assert!(ext.len() >= 3 && ext[1].0 == 1, "two data blocks: {ext:?}");
    xfs_db_x(
        &img,
        &[
            format!("inode {ld}"),
            format!("write u3.bmx[1].startblock {}", ext[0].1),
        ],
    );
    let e = assert_corrupt(open(&img).readdir(ld), "readdir");
    assert!(e.contains("maps a block listed before"), "{e}");
}
