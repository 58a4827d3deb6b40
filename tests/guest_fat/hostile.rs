//! Hostile FAT volumes: hand-made chain and directory loops and byte
//! flips over boot sector, FATs and directories (`SNAPTREE_FAT_FUZZ`
//! rounds): errors naming the volume, never a panic or a hang.

use super::tools::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::guest::fat;
use snaptree::guest::{FileKind, GuestFs, ReadBytes};
use std::collections::HashSet;
use std::sync::Arc;

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

/// A directory entry pointing back at its parent's cluster lists the
/// parent's entries at the same offsets, so it contains itself (same
/// inode): the kernel and `find` see a loop, and walking by inode ends.
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
    assert_ne!(a, b);
    assert_eq!(fs.lookup(b, b"b").unwrap(), b);
    assert_eq!(walk_bounded(&*fs), 0);
}

/// Walks every directory once by inode, reading every file; returns errors
/// instead of failing (for fuzzing).
pub fn walk_bounded(fs: &dyn GuestFs) -> usize {
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
