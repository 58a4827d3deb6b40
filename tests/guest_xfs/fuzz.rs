//! Byte-flip fuzz of the XFS reader: bytes flipped in the superblock, the
//! AG headers (AGF, AGI), inode chunks, a bmbt block, directory data,
//! leaf and node (dabtree) blocks and attr blocks, on a v5 image (CRCs:
//! flips must fail as named errors) and a v4 image (no CRCs: flips reach
//! the parsers). Each round opens the volume and walks it: no panic, no
//! hang, no read outside the volume, and every damage error names the
//! volume.

use super::tree::{noise, sh_out};
use snaptree::guest::{FileBytes, FileKind, GuestError, GuestFs, ReadBytes};
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// A volume image with some bytes flipped; remembers reads past its end.
pub struct Flipped {
    base: Arc<FileBytes>,
    flips: Vec<(u64, u8)>,
    outside: AtomicBool,
}

impl ReadBytes for Flipped {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size())
        {
            self.outside.store(true, Ordering::Relaxed);
        }
        self.base.read_exact_at(buf, offset)?;
        for &(o, x) in &self.flips {
            if o >= offset && o < offset + buf.len() as u64 {
                buf[(o - offset) as usize] ^= x;
            }
        }
        Ok(())
    }
}

fn xfs_db(img: &Path, cmds: &[String]) -> String {
    let mut args = vec!["-r".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    sh_out("xfs_db", &a)
}

fn field(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name} = ")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {out}"))
}

/// Volume byte ranges of the blocks `xfs_db bmap` lists for `path`.
fn file_blocks(img: &Path, path: &str, attr: bool, bs: u64, agblocks: u64) -> Vec<(u64, u64)> {
    let out = xfs_db(
        img,
        &[
            format!("path {path}"),
            if attr { "bmap -a" } else { "bmap" }.into(),
        ],
    );
    let mut r = Vec::new();
    for l in out.lines() {
        // "data offset 0 startblock 24 (0/24) count 1 flag 0"
        let Some(ag) = l.split('(').nth(1).and_then(|s| s.split(')').next()) else {
            continue;
        };
        let (a, b) = ag.split_once('/').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        let count: u64 = l
            .split("count ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let start = (a * agblocks + b) * bs;
        r.push((start, start + count.min(4) * bs));
    }
    r
}

/// The structures worth flipping in `img`.
pub fn regions(img: &Path, v5: bool) -> Vec<(String, u64, u64)> {
    let sb = xfs_db(
        img,
        &[
            "sb 0".into(),
            "print blocksize agblocks rootino sectsize".into(),
        ],
    );
    let (bs, agblocks, root, sect) = (
        field(&sb, "blocksize"),
        field(&sb, "agblocks"),
        field(&sb, "rootino"),
        field(&sb, "sectsize"),
    );
    let mut r = vec![
        ("superblock".to_string(), 0, 512),
        ("AGF".into(), sect, 2 * sect),
        ("AGI".into(), 2 * sect, 3 * sect),
    ];
    let agino_bits =
        (64 - (agblocks - 1).leading_zeros() as u64) + (bs / 512).trailing_zeros() as u64;
    let agbno = (root & ((1 << agino_bits) - 1)) >> (bs / 512).trailing_zeros();
    r.push(("root inode chunk".into(), agbno * bs, agbno * bs + 64 * 512));
    let (frag, dir, attrs) = if v5 {
        ("/fragmented", "/bigA", "/leafdir")
    } else {
        ("/data-3000001", "/bigdir", "/leafdir")
    };
    if v5 {
        let ino = xfs_db(
            img,
            &[format!("path {frag}"), "print u3.bmbt.ptrs[1]".into()],
        );
        if let Some(p) = ino
            .split('=')
            .nth(1)
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            let b = (p >> (64 - (agblocks - 1).leading_zeros())) * agblocks
                + (p & ((1 << (64 - (agblocks - 1).leading_zeros())) - 1));
            r.push(("bmbt block".into(), b * bs, b * bs + bs));
        }
    }
    let blocks = file_blocks(img, dir, false, bs, agblocks);
    let leaf_start = (1u64 << 35) / bs;
    let out = xfs_db(img, &[format!("path {dir}"), "bmap".into()]);
    for (l, (s, e)) in out.lines().zip(blocks.iter()) {
        let off: u64 = l
            .split("offset ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let what = if off >= leaf_start {
            "dabtree leaf/node block"
        } else {
            "directory data block"
        };
        if off >= leaf_start || off < 3 {
            r.push((what.into(), *s, *e));
        }
    }
    for (s, e) in file_blocks(img, attrs, true, bs, agblocks) {
        r.push(("attr block".into(), s, e));
    }
    r
}

/// Walks everything reachable, tolerating errors; bounded.
fn walk(fs: &dyn GuestFs) -> Vec<GuestError> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![fs.root()];
    let mut budget = 20_000usize;
    while let Some(dir) = stack.pop() {
        if !seen.insert(dir) {
            continue;
        }
        let entries = match fs.readdir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for e in entries {
            budget = match budget.checked_sub(1) {
                Some(b) => b,
                None => return errors,
            };
            let mut step = || -> Result<(), GuestError> {
                fs.lookup(dir, &e.name)?;
                let a = fs.getattr(e.ino)?;
                for n in fs.listxattr(e.ino)? {
                    fs.getxattr(e.ino, &n)?;
                }
                match a.kind {
                    FileKind::Dir => stack.push(e.ino),
                    FileKind::Symlink => drop(fs.readlink(e.ino)?),
                    FileKind::File => {
                        if let Some(d) = fs.next_data(e.ino, 0)? {
                            fs.next_hole(e.ino, d)?;
                        }
                        let mut buf = vec![0u8; 64 << 10];
                        fs.read(e.ino, 0, &mut buf)?;
                    }
                    _ => {}
                }
                Ok(())
            };
            if let Err(err) = step() {
                errors.push(err);
            }
        }
    }
    errors
}

/// `rounds` rounds of flips in `regions` of `img`.
pub fn fuzz(img: &Path, regions: &[(String, u64, u64)], rounds: usize, seed: u64) {
    let base = Arc::new(FileBytes::open(img).unwrap());
    let rng = noise(seed, rounds * 64);
    for round in 0..rounds {
        let r = &rng[round * 64..round * 64 + 64];
        // A kind of structure first, then one of its blocks, so the many
        // directory blocks do not crowd out the superblock and AG headers.
        let mut kinds: Vec<&str> = regions.iter().map(|x| x.0.as_str()).collect();
        kinds.dedup();
        let kind = kinds[r[0] as usize % kinds.len()];
        let of_kind: Vec<_> = regions.iter().filter(|x| x.0 == kind).collect();
        let (what, start, end) = of_kind[r[7] as usize % of_kind.len()].clone();
        let n = 1 + r[1] as usize % 4;
        let flips: Vec<(u64, u8)> = (0..n)
            .map(|i| {
                let x = u64::from_le_bytes(r[8 + i * 8..16 + i * 8].try_into().unwrap());
                (start + x % (end - start), r[2 + i] | 1)
            })
            .collect();
        let bytes = Arc::new(Flipped {
            base: base.clone(),
            flips: flips.clone(),
            outside: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let b2 = bytes.clone();
        let h = std::thread::spawn(move || {
            let errs = match snaptree::guest::xfs::open("fuzzvol", b2) {
                Ok(fs) => walk(&*fs),
                Err(e) => vec![e],
            };
            let _ = tx.send(errs);
        });
        let errs = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(e) => e,
            Err(_) => panic!("round {round}: hang or panic after flips {flips:?} in {what}"),
        };
        h.join().unwrap();
        assert!(
            !bytes.outside.load(Ordering::Relaxed),
            "round {round}: read outside the volume ({what}, {flips:?})"
        );
        for e in &errs {
            match e {
                GuestError::Corrupt { volume, .. }
                | GuestError::Io { volume, .. }
                | GuestError::Unsupported { volume, .. } => {
                    assert_eq!(volume, "fuzzvol", "{e}")
                }
                _ => {}
            }
        }
        eprintln!(
            "fuzz round {round}: {what} {flips:?}: {} errors{}",
            errs.len(),
            errs.first()
                .map(|e| format!(", e.g. {e}"))
                .unwrap_or_default()
        );
    }
}
