//! The NTFS reader judged by ntfs-3g: volumes made by `mkntfs -F -Q`,
//! populated through an ntfs-3g mount (a 20,000-entry directory, hard
//! links, alternate data streams, sparse and compressed files, Interix
//! symlinks as ntfs-3g makes them, a junction and a reparse symlink set
//! through `system.ntfs_reparse_data`, unicode and case-only-different
//! POSIX names, Windows/System32), then compared with ntfs-3g mounted
//! read-only on a copy: names, kinds, inode numbers, sizes, mtimes,
//! symlink targets, contents and `user.*` xattrs (streams). Also the dirty
//! flag note and a byte-flip fuzz (see guest_ntfs/fuzz.rs).

#[path = "guest_ntfs/fuzz.rs"]
mod fuzz;
#[path = "guest_ntfs/tree.rs"]
mod tree;

use snaptree::guest::{ntfs, FileBytes, GuestFs};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tree::{run, skip, tools, walk_mount, walk_ours, Mount};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A reparse buffer: MOUNT_POINT (junction) or SYMLINK (with flags).
fn reparse(tag: u32, subst: &str, print: &str, symlink_flags: Option<u32>) -> String {
    let w = |s: &str| {
        s.encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let (s, p) = (w(subst), w(print));
    let mut body = Vec::new();
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&(s.len() as u16).to_le_bytes());
    body.extend_from_slice(&(s.len() as u16 + 2).to_le_bytes());
    body.extend_from_slice(&(p.len() as u16).to_le_bytes());
    if let Some(f) = symlink_flags {
        body.extend_from_slice(&f.to_le_bytes());
    }
    body.extend_from_slice(&s);
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&p);
    body.extend_from_slice(&[0, 0]);
    let mut r = tag.to_le_bytes().to_vec();
    r.extend_from_slice(&(body.len() as u16).to_le_bytes());
    r.extend_from_slice(&[0, 0]);
    r.extend_from_slice(&body);
    format!(
        "0x{}",
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn setfattr(name: &str, value: &str, p: &Path) -> Result<String, String> {
    run(
        "setfattr",
        &["-h", "-n", name, "-v", value, p.to_str().unwrap()],
    )
}

fn write(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap();
}

/// Fills a fresh volume through ntfs-3g.
fn populate(m: &Path, bigdir: usize) -> Result<(), String> {
    let d = |s: &str| m.join(s);
    for s in [
        "docs",
        "big",
        "Windows/System32/drivers/etc",
        "comp",
        "links",
        "ünï/日本",
    ] {
        std::fs::create_dir_all(d(s)).unwrap();
    }
    for i in 0..bigdir {
        let mut f = std::fs::File::create(d(&format!("big/entry-{i:05}.txt"))).unwrap();
        if i % 1000 == 0 {
            f.write_all(format!("file {i}\n").as_bytes()).unwrap();
        }
    }
    write(&d("docs/hello.txt"), b"hello ntfs\n");
    write(&d("docs/big.bin"), &tree_noise(1, 3 << 20));
    std::fs::hard_link(d("docs/hello.txt"), d("links/hello-link.txt")).unwrap();
    std::fs::hard_link(d("docs/hello.txt"), d("docs/second name.txt")).unwrap();
    setfattr("user.stream1", "streamvalue", &d("docs/hello.txt"))?;
    setfattr("user.Zone.Identifier", "[ZoneTransfer]", &d("docs/big.bin"))?;
    // Enough streams to overflow one MFT record: an $ATTRIBUTE_LIST.
    write(&d("docs/many-streams"), b"base data");
    for i in 0..40 {
        setfattr(
            &format!("user.s{i:02}"),
            &format!("value {i} {}", "x".repeat(60)),
            &d("docs/many-streams"),
        )?;
    }
    // Sparse: data, a 40 MiB hole, data.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(d("docs/sparse.img"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"start", 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", 40 << 20).unwrap();
    drop(f);
    std::os::unix::fs::symlink("../docs/hello.txt", d("links/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", d("links/abs")).unwrap();
    for (n, v) in [("kernel32.dll", 70_000usize), ("ntdll.dll", 5_000)] {
        write(
            &d(&format!("Windows/System32/{n}")),
            &tree_noise(n.len() as u64, v),
        );
    }
    write(
        &d("Windows/System32/drivers/etc/hosts"),
        b"127.0.0.1 localhost\r\n",
    );
    write(&d("ünï/日本/файл.txt"), "ünïcödé ✓\n".as_bytes());
    write(&d("docs/Case"), b"upper");
    write(&d("docs/case"), b"lower");
    // Compressed: files written into a directory flagged compressed.
    setfattr("system.ntfs_attrib_be", "0x00000800", &d("comp"))?;
    let text: Vec<u8> = (0..400_000u32)
        .flat_map(|i| format!("line {} of text\n", i % 977).into_bytes())
        .take(1_500_000)
        .collect();
    write(&d("comp/text.txt"), &text);
    write(&d("comp/random.bin"), &tree_noise(7, 300_000));
    let mut mixed = tree_noise(9, 100_000);
    mixed.extend(std::iter::repeat_n(0u8, 200_000));
    mixed.extend(b"tail".repeat(20_000));
    write(&d("comp/mixed.bin"), &mixed);
    write(&d("comp/small.txt"), b"tiny compressed-dir file");
    // A junction to Windows/System32, and a relative reparse symlink.
    std::fs::create_dir(d("links/junction")).unwrap();
    let j = reparse(
        0xA000_0003,
        "\\??\\C:\\Windows\\System32",
        "C:\\Windows\\System32",
        None,
    );
    setfattr("system.ntfs_reparse_data", &j, &d("links/junction"))?;
    write(&d("links/winlink"), b"");
    let s = reparse(
        0xA000_000C,
        "..\\docs\\hello.txt",
        "..\\docs\\hello.txt",
        Some(1),
    );
    setfattr("system.ntfs_reparse_data", &s, &d("links/winlink"))?;
    Ok(())
}

fn tree_noise(seed: u64, len: usize) -> Vec<u8> {
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

/// A populated image in `tmp`, or why not.
fn build(tmp: &Path, size_mb: u64, bigdir: usize) -> Result<std::path::PathBuf, String> {
    tools()?;
    let img = tmp.join("ntfs.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mb << 20).unwrap();
    run(
        "mkntfs",
        &[
            "-F",
            "-Q",
            "-c",
            "4096",
            "-L",
            "SnapVol",
            img.to_str().unwrap(),
        ],
    )?;
    let m = Mount::new(&img, &tmp.join("rw"), false)?;
    populate(&m.dir, bigdir)?;
    drop(m);
    Ok(img)
}

fn open(img: &Path) -> Arc<dyn GuestFs> {
    ntfs::open("ntfs-test", Arc::new(FileBytes::open(img).unwrap())).unwrap()
}

#[test]
fn tree_matches_ntfs3g() {
    let tmp = tempfile::tempdir().unwrap();
    let img = match build(tmp.path(), 256, knob("SNAPTREE_NTFS_BIGDIR", 20_000)) {
        Ok(i) => i,
        Err(e) => return skip(&e),
    };
    let copy = tmp.path().join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    let theirs = {
        let m = Mount::new(&copy, &tmp.path().join("ro"), true).unwrap();
        walk_mount(&m.dir)
    };
    let fs = open(&img);
    let ours = walk_ours(&*fs);
    let keys = |t: &tree::Tree| t.keys().cloned().collect::<Vec<_>>();
    let (a, b) = (keys(&theirs), keys(&ours));
    let missing: Vec<_> = a
        .iter()
        .filter(|k| !ours.contains_key(*k))
        .take(10)
        .collect();
    let extra: Vec<_> = b
        .iter()
        .filter(|k| !theirs.contains_key(*k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (k, t) in &theirs {
        assert_eq!(&ours[k], t, "{k}");
    }
    // The things the test is about are really there.
    for p in [
        "/links/junction",
        "/links/winlink",
        "/links/abs",
        "/comp/text.txt",
        "/docs/Case",
        "/docs/case",
    ] {
        assert!(theirs.contains_key(p), "{p}");
    }
    assert_eq!(theirs["/links/junction"].kind, "symlink");
    assert_eq!(
        theirs["/links/junction"].target.as_deref(),
        Some("../Windows/System32")
    );
    assert_eq!(
        theirs["/docs/hello.txt"].ino,
        theirs["/links/hello-link.txt"].ino
    );
    assert!(
        theirs.keys().filter(|k| k.starts_with("/big/")).count()
            >= knob("SNAPTREE_NTFS_BIGDIR", 20_000)
    );
    let info = fs.info();
    assert_eq!(info.label.as_deref(), Some("SnapVol"));
    assert!(!info.unclean, "{:?}", info.notes);
    assert!(
        !info
            .notes
            .iter()
            .any(|n| n.starts_with("volume dirty") || n.starts_with("log not replayed")),
        "{:?}",
        info.notes
    );
    dos_attrs_and_holes(&*fs, tmp.path(), &copy);
}

/// `system.ntfs_attrib_be` as ntfs-3g shows it, and hole maps.
fn dos_attrs_and_holes(fs: &dyn GuestFs, tmp: &Path, copy: &Path) {
    let m = Mount::new(copy, &tmp.join("ro2"), true).unwrap();
    let mut dir = fs.root();
    for c in ["comp", "text.txt"] {
        dir = fs.lookup(dir, c.as_bytes()).unwrap();
    }
    let theirs = run(
        "getfattr",
        &[
            "-n",
            "system.ntfs_attrib_be",
            "-e",
            "hex",
            m.dir.join("comp/text.txt").to_str().unwrap(),
        ],
    )
    .unwrap();
    let ours = fs.getxattr(dir, b"system.ntfs_attrib_be").unwrap();
    let hex: String = ours.iter().map(|b| format!("{b:02x}")).collect();
    assert!(theirs.contains(&format!("=0x{hex}")), "{theirs} vs {hex}");
    assert!(u32::from_be_bytes(ours.try_into().unwrap()) & 0x800 != 0);
    // Compressed text takes less room than its size: LZNT1 units.
    let a = fs.getattr(dir).unwrap();
    assert!(a.allocated < a.size / 2, "{a:?}");
    let docs = fs.lookup(fs.root(), b"docs").unwrap();
    let sparse = fs.lookup(docs, b"sparse.img").unwrap();
    let hole = fs.next_hole(sparse, 0).unwrap();
    assert!(hole > 0 && hole < 40 << 20, "hole at {hole}");
    let data = fs.next_data(sparse, hole).unwrap().unwrap();
    assert!(data > hole && data <= 40 << 20, "data at {data}");
    // Exact lookups only, as ntfs-3g: a name in another case is not found.
    assert!(fs.lookup(docs, b"HELLO.TXT").is_err());
    assert!(std::fs::metadata(m.dir.join("docs/HELLO.TXT")).is_err());
}

/// Sets the dirty flag in `$Volume`'s `$VOLUME_INFORMATION` (record 3).
fn set_dirty(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let cs = u64::from(u16::from_le_bytes([b[0x0b], b[0x0c]])) * u64::from(b[0x0d]);
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) * cs;
    let rec = (mft + 3 * 1024) as usize;
    let mut at = rec + usize::from(u16::from_le_bytes([b[rec + 0x14], b[rec + 0x15]]));
    loop {
        let ty = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_ne!(ty, 0xFFFF_FFFF, "no $VOLUME_INFORMATION");
        if ty == 0x70 {
            let v = at + usize::from(u16::from_le_bytes([b[at + 0x14], b[at + 0x15]]));
            b[v + 10] |= 1;
            break;
        }
        at += u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
    }
    std::fs::write(img, b).unwrap();
}

#[test]
fn dirty_volume_is_shown_with_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let img = match build(tmp.path(), 64, 50) {
        Ok(i) => i,
        Err(e) => return skip(&e),
    };
    set_dirty(&img);
    // ntfs-3g agrees it is dirty: it refuses a read-write mount.
    assert!(Mount::new(&img, &tmp.path().join("rwd"), false).is_err());
    let fs = open(&img);
    assert!(fs.info().unclean, "a dirty volume is served unclean");
    let notes = fs.info().notes;
    assert!(
        notes.iter().any(|n| n.starts_with("volume dirty")),
        "{notes:?}"
    );
    let docs = fs.lookup(fs.root(), b"docs").unwrap();
    let f = fs.lookup(docs, b"hello.txt").unwrap();
    let mut buf = [0u8; 64];
    let n = fs.read(f, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello ntfs\n");
}

#[test]
fn byte_flips_give_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let img = match build(tmp.path(), 64, 600) {
        Ok(i) => i,
        Err(e) => return skip(&e),
    };
    fuzz::run(&img, knob("SNAPTREE_FUZZ_ITERS", 150));
}
