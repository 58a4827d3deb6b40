//! Regressions for the hostile review of the NTFS reader: volumes made by
//! `mkntfs` and filled through ntfs-3g, then damaged by byte patches of
//! the boot sector or of attribute headers inside MFT records (fields that
//! no update sequence stride covers, so the fixups stay valid). Damage
//! gives a named `Corrupt` error, never a panic or guessed bytes; where
//! ntfs-3g can judge (a DOS name lookup, a short compressed runlist), our
//! answer is compared with what it does on a copy.

#[allow(dead_code)]
#[path = "guest_ntfs/tree.rs"]
mod tree;

use snaptree::guest::{ntfs, FileBytes, GuestError, GuestFs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tree::{run, skip, tools, Mount};

/// A fresh 64 MiB volume with `f` run on its ntfs-3g mount.
fn build(tmp: &Path, f: impl FnOnce(&Path)) -> Option<PathBuf> {
    if let Err(e) = tools() {
        skip(&e);
        return None;
    }
    let img = tmp.join("n.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run("mkntfs", &["-F", "-Q", "-c", "4096", img.to_str().unwrap()]).unwrap();
    let m = Mount::new(&img, &tmp.join("rw"), false).unwrap();
    f(&m.dir);
    drop(m);
    Some(img)
}

fn open(img: &Path) -> Result<Arc<dyn GuestFs>, GuestError> {
    ntfs::open("hostile", Arc::new(FileBytes::open(img).unwrap()))
}

fn corrupt<T: std::fmt::Debug>(r: Result<T, GuestError>, what: &str) -> String {
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

/// Volume offset of the unnamed `$DATA` attribute header of MFT record
/// `no` (records assumed in `$MFT`'s first run, as on a fresh volume).
fn data_attr(b: &[u8], no: u64) -> usize {
    let cs = u64::from(u16::from_le_bytes([b[0x0b], b[0x0c]])) * u64::from(b[0x0d]);
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) * cs;
    let rec = (mft + no * 1024) as usize;
    assert_eq!(&b[rec..rec + 4], b"FILE");
    let mut at = rec + usize::from(u16::from_le_bytes([b[rec + 0x14], b[rec + 0x15]]));
    loop {
        let ty = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_ne!(ty, 0xFFFF_FFFF, "record {no}: no $DATA");
        if ty == 0x80 && b[at + 9] == 0 {
            // Fields patched below must lie clear of the stride ends.
            assert!((at - rec) % 512 < 512 - 0x40, "attribute near a sector end");
            return at;
        }
        at += u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
    }
}

fn lookup(fs: &dyn GuestFs, path: &str) -> u64 {
    path.split('/')
        .fold(fs.root(), |d, c| fs.lookup(d, c.as_bytes()).unwrap())
}

/// Finding 5: MFT records of 256 bytes (boot sector byte 0x40 = -8) are
/// no whole sectors; the fixup used to index past them.
#[test]
fn mft_records_below_a_sector() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = build(tmp.path(), |_| {}) else {
        return;
    };
    let mut b = std::fs::read(&img).unwrap();
    b[0x40] = 0xF8;
    // Record 0's update sequence: one entry (no strides in 256 bytes) at
    // offset 400, inside the first sector but past the record.
    let cs = u64::from(u16::from_le_bytes([b[0x0b], b[0x0c]])) * u64::from(b[0x0d]);
    let rec = (u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) * cs) as usize;
    b[rec + 4..rec + 6].copy_from_slice(&400u16.to_le_bytes());
    b[rec + 6..rec + 8].copy_from_slice(&1u16.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    corrupt(open(&img).map(|_| ()), "open");
}

/// Finding 8: a compressed attribute whose compression unit byte is 64
/// (SEEK_DATA shifted by it).
#[test]
fn compression_unit_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = build(tmp.path(), |m| {
        std::fs::create_dir(m.join("comp")).unwrap();
        run(
            "setfattr",
            &[
                "-n",
                "system.ntfs_attrib_be",
                "-v",
                "0x00000800",
                m.join("comp").to_str().unwrap(),
            ],
        )
        .unwrap();
        std::fs::write(m.join("comp/t.txt"), "line of text\n".repeat(20_000)).unwrap();
    }) else {
        return;
    };
    let no = lookup(&*open(&img).unwrap(), "comp/t.txt");
    let mut b = std::fs::read(&img).unwrap();
    let at = data_attr(&b, no);
    assert_eq!(b[at + 0x22], 4, "a compressed stream");
    b[at + 0x22] = 64;
    std::fs::write(&img, &b).unwrap();
    let fs = open(&img).unwrap();
    let comp = lookup(&*fs, "comp");
    let r = fs
        .lookup(comp, b"t.txt")
        .and_then(|f| fs.next_data(f, 0).map(|_| f));
    corrupt(r, "compression unit 2^64");
}

/// Finding 9: a compressed stream whose size runs past its runlist. The
/// unmapped units used to read as zeros; ntfs-3g fails them with EIO.
#[test]
fn compressed_size_past_runlist() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = build(tmp.path(), |m| {
        std::fs::create_dir(m.join("comp")).unwrap();
        run(
            "setfattr",
            &[
                "-n",
                "system.ntfs_attrib_be",
                "-v",
                "0x00000800",
                m.join("comp").to_str().unwrap(),
            ],
        )
        .unwrap();
        std::fs::write(m.join("comp/t.txt"), "line of text\n".repeat(20_000)).unwrap();
    }) else {
        return;
    };
    let no = lookup(&*open(&img).unwrap(), "comp/t.txt");
    let mut b = std::fs::read(&img).unwrap();
    let at = data_attr(&b, no);
    // Data and initialized size one 64 KiB unit past the allocation.
    let alloc = u64::from_le_bytes(b[at + 0x28..at + 0x30].try_into().unwrap());
    let size = alloc + (64 << 10);
    b[at + 0x30..at + 0x38].copy_from_slice(&size.to_le_bytes());
    b[at + 0x38..at + 0x40].copy_from_slice(&size.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    let fs = open(&img).unwrap();
    let f = lookup(&*fs, "comp/t.txt");
    assert_eq!(fs.getattr(f).unwrap().size, size);
    let mut buf = vec![0u8; 4096];
    let n = fs.read(f, 0, &mut buf).unwrap();
    assert_eq!(&buf[..n], &"line of text\n".repeat(400).as_bytes()[..n]);
    corrupt(fs.read(f, alloc + 100, &mut buf), "read past the runlist");
    // ntfs-3g on a copy: the same read fails.
    let copy = tmp.path().join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    let m = Mount::new(&copy, &tmp.path().join("ro"), true).unwrap();
    let theirs = std::fs::read(m.dir.join("comp/t.txt"));
    assert!(
        theirs.is_err(),
        "ntfs-3g read {:?} bytes",
        theirs.map(|v| v.len())
    );
}

/// Finding 10: a DOS (8.3) name set through ntfs-3g is found by lookup
/// (as ntfs-3g resolves it) but not listed (as ntfs-3g lists).
#[test]
fn dos_name_lookup_matches_ntfs3g() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(img) = build(tmp.path(), |m| {
        let p = m.join("A Long File Name.txt");
        std::fs::write(&p, b"long name").unwrap();
        run(
            "setfattr",
            &[
                "-n",
                "system.ntfs_dos_name",
                "-v",
                "LONGFI~1.TXT",
                p.to_str().unwrap(),
            ],
        )
        .unwrap();
    }) else {
        return;
    };
    let fs = open(&img).unwrap();
    let root = fs.root();
    let long = fs.lookup(root, b"A Long File Name.txt").unwrap();
    let m = Mount::new(&img, &tmp.path().join("ro"), true).unwrap();
    use std::os::unix::fs::MetadataExt;
    for name in ["LONGFI~1.TXT", "A Long File Name.txt"] {
        let theirs = std::fs::metadata(m.dir.join(name)).unwrap().ino();
        assert_eq!(fs.lookup(root, name.as_bytes()).unwrap(), long, "{name}");
        assert_eq!(theirs, long, "{name}: ntfs-3g");
    }
    let listed: Vec<String> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let ours: Vec<Vec<u8>> = fs
        .readdir(root)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(!listed.iter().any(|n| n == "LONGFI~1.TXT"), "{listed:?}");
    assert!(!ours.iter().any(|n| n == b"LONGFI~1.TXT"));
    assert!(ours.iter().any(|n| n == b"A Long File Name.txt"));
}
