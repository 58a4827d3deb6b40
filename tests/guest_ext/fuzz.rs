//! Byte-flip fuzz of the ext reader: bytes flipped in the superblock,
//! group descriptors, inode table, an extent index block, htree directory
//! blocks and the live journal of a crash-consistent image (metadata_csum
//! on), and of an image without checksums (so flips reach the parsers).
//! Each round opens the volume and walks it: no panic, no hang, only Ok or
//! errors naming the volume.

use super::tree::{build_tree, sh_out};
use snaptree::guest::{ext, GuestError, ReadBytes};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// A volume image with some bytes flipped (the base is shared).
struct Flipped {
    base: Arc<Vec<u8>>,
    flips: Vec<(u64, u8)>,
}

impl ReadBytes for Flipped {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.base.read_exact_at(buf, offset)?;
        for &(o, x) in &self.flips {
            if o >= offset && o < offset + buf.len() as u64 {
                buf[(o - offset) as usize] ^= x;
            }
        }
        Ok(())
    }
}

fn debugfs(img: &Path, req: &str) -> String {
    sh_out("debugfs", &["-R", req, img.to_str().unwrap()])
}

fn numbers(s: &str) -> Vec<u64> {
    s.split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// Byte ranges of the structures worth flipping in `img`.
fn regions(img: &Path) -> Vec<(&'static str, u64, u64)> {
    let bs = 4096;
    let mut r = vec![
        ("superblock", 1024, 2048),
        ("group descriptors", bs, 2 * bs),
    ];
    let imap = debugfs(img, "imap <2>");
    let line = imap
        .lines()
        .find(|l| l.contains("located at block"))
        .unwrap();
    let blk: u64 = line
        .split("block ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    r.push(("inode table", blk * bs, blk * bs + 200 * 1024));
    let stat = debugfs(img, "stat /fragmented");
    if let Some(etb) = stat.split("(ETB0):").nth(1) {
        let b: u64 = etb
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        r.push(("extent index block", b * bs, b * bs + bs));
    }
    for b in numbers(&debugfs(img, "blocks /bigdir")).into_iter().take(4) {
        r.push(("htree directory block", b * bs, b * bs + bs));
    }
    let dump = sh_out("dumpe2fs", &["-h", img.to_str().unwrap()]);
    let start = dump
        .lines()
        .find_map(|l| l.strip_prefix("Journal start:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    if let Some(start) = start.filter(|&s| s > 0) {
        let jblocks = numbers(&debugfs(img, "blocks <8>"));
        for &b in jblocks
            .iter()
            .take(1)
            .chain(jblocks.iter().skip(start).take(40))
        {
            r.push(("journal", b * bs, b * bs + bs));
        }
    }
    r
}

fn check_err(e: &GuestError) {
    match e {
        GuestError::Corrupt { volume, .. }
        | GuestError::Io { volume, .. }
        | GuestError::Unsupported { volume, .. } => {
            assert_eq!(volume, "fuzzvol", "{e}")
        }
        _ => {}
    }
}

/// Opens and walks the volume with bounds of its own (a fuzzed directory
/// may loop in ways only a walker can see).
fn walk(bytes: Arc<dyn ReadBytes>) {
    let fs = match ext::open("fuzzvol", bytes) {
        Ok(fs) => fs,
        Err(e) => return check_err(&e),
    };
    let _ = fs.info();
    let mut stack = vec![(fs.root(), 0)];
    let mut seen = 0;
    let mut buf = vec![0u8; 256 * 1024];
    while let Some((dir, depth)) = stack.pop() {
        let entries = match fs.readdir(dir) {
            Ok(e) => e,
            Err(e) => {
                check_err(&e);
                continue;
            }
        };
        for e in entries {
            seen += 1;
            if seen > 5000 {
                return;
            }
            let results: Vec<Result<(), GuestError>> = vec![
                fs.lookup(dir, &e.name).map(|_| ()),
                fs.getattr(e.ino).map(|_| ()),
                fs.listxattr(e.ino).map(|_| ()),
                fs.getxattr(e.ino, b"user.color").map(|_| ()),
                fs.readlink(e.ino).map(|_| ()),
                fs.read(e.ino, 0, &mut buf).map(|_| ()),
                fs.next_data(e.ino, 0).map(|_| ()),
                fs.next_hole(e.ino, 0).map(|_| ()),
            ];
            for r in results {
                if let Err(err) = r {
                    check_err(&err);
                }
            }
            if fs
                .getattr(e.ino)
                .map(|a| a.kind == snaptree::guest::FileKind::Dir)
                .unwrap_or(false)
                && depth < 60
            {
                stack.push((e.ino, depth + 1));
            }
        }
    }
}

fn fuzz_base(name: &str, img: &Path, rounds: usize, seed: u64) {
    let base = Arc::new(std::fs::read(img).unwrap());
    let regs = regions(img);
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..rounds {
        let (what, lo, hi) = regs[(rnd() % regs.len() as u64) as usize];
        let flips: Vec<(u64, u8)> = (0..1 + rnd() % 3)
            .map(|_| (lo + rnd() % (hi - lo), (rnd() % 255 + 1) as u8))
            .collect();
        let desc = format!("{name} round {round}: {what} flips {flips:?}");
        let bytes: Arc<dyn ReadBytes> = Arc::new(Flipped {
            base: base.clone(),
            flips,
        });
        let (tx, rx) = mpsc::channel();
        let d2 = desc.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| walk(bytes)));
            let _ = tx.send(r.map_err(|_| d2));
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(())) => {}
            Ok(Err(d)) => panic!("panic in {d}"),
            Err(_) => panic!("hang in {desc}"),
        }
    }
}

#[test]
fn byte_flip_fuzz_never_panics_or_hangs() {
    if !crate::can_mount() {
        return;
    }
    let rounds = std::env::var("SNAPTREE_EXT_FUZZ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let tmp = tempfile::tempdir().unwrap();
    // Without checksums, so flips reach the parsers.
    let src = tmp.path().join("plain-src");
    std::fs::create_dir(&src).unwrap();
    build_tree(&src, 2000, false);
    let plain = tmp.path().join("plain.img");
    crate::mkfs(
        &src,
        &plain,
        "64M",
        &["-t", "ext4", "-O", "^metadata_csum", "-b", "4096"],
    )
    .unwrap();
    fuzz_base("no-csum", &plain, rounds, 0x1234_5678);
    // metadata_csum and a journal to replay.
    let dirty_dir = tmp.path().join("dirty");
    std::fs::create_dir(&dirty_dir).unwrap();
    if let Some(dirty) = crate::dirty_copy(&dirty_dir) {
        assert!(
            regions(&dirty).iter().any(|r| r.0 == "journal"),
            "the dirty image should have a live journal"
        );
        fuzz_base("csum+journal", &dirty, rounds, 0x8765_4321);
    }
}
