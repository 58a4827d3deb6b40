//! Inode numbers outlive the `FatFs` that handed them out: the mount
//! reopens a volume (its view rebuilt, or evicted from the LRU) while the
//! kernel still holds inodes, so every number must resolve in a fresh
//! instance on the same bytes. And names: every listed name can be looked
//! up, even when long names repeat or are too long for a path.

use super::judge::read_all;
use super::tools::*;
use snaptree::guest::fat;
use snaptree::guest::{Attr, FileKind, GuestError, GuestFs, ReadBytes};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every inode of the tree, by path, with its attributes.
fn inodes(fs: &dyn GuestFs) -> BTreeMap<String, Attr> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(fs.root(), String::new())];
    while let Some((dir, path)) = stack.pop() {
        for e in fs.readdir(dir).unwrap() {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            if e.kind == FileKind::Dir {
                stack.push((e.ino, p.clone()));
            }
            out.insert(p, fs.getattr(e.ino).unwrap());
        }
    }
    out
}

fn reopen_resolves_every_inode(mkfs_args: &[&str], kib: u64) {
    let v = make_volume(mkfs_args, kib, 40);
    let bytes: Arc<dyn ReadBytes> = Arc::new(std::fs::read(&v.img).unwrap());
    let first = fat::open("v", bytes.clone()).unwrap();
    // The repro: a subdirectory looked up in one instance, stat in the next.
    let a = first.lookup(first.root(), b"a").unwrap();
    let b = first.lookup(a, b"b").unwrap();
    let fresh = fat::open("v", bytes.clone()).unwrap();
    assert_eq!(fresh.getattr(b).unwrap(), first.getattr(b).unwrap());
    assert_eq!(fresh.readdir(b).unwrap(), first.readdir(b).unwrap());

    let all = inodes(&*first);
    assert!(all.values().filter(|a| a.kind == FileKind::Dir).count() >= 7);
    for (p, attr) in &all {
        // A new instance per inode: nothing it resolves was listed first.
        let fresh = fat::open("v", bytes.clone()).unwrap();
        assert_eq!(&fresh.getattr(attr.ino).unwrap(), attr, "{p}");
        match attr.kind {
            FileKind::Dir => {
                assert_eq!(
                    fresh.readdir(attr.ino).unwrap(),
                    first.readdir(attr.ino).unwrap(),
                    "{p}"
                );
            }
            _ => {
                let fresh = fat::open("v", bytes.clone()).unwrap();
                assert_eq!(
                    read_all(&*fresh, attr.ino, attr.size),
                    read_all(&*first, attr.ino, attr.size),
                    "{p}"
                );
            }
        }
    }
    // Numbers no instance hands out.
    for ino in [0, 2, 3, 1000, (1 << 32) - 1, u64::MAX] {
        assert!(
            matches!(fresh.getattr(ino), Err(GuestError::NotFound)),
            "{ino}"
        );
    }
}

#[test]
fn reopened_fat16_resolves_every_inode() {
    if tools_or_skip() {
        reopen_resolves_every_inode(&["-F", "16", "-s", "1"], 24 * 1024);
    }
}

#[test]
fn reopened_fat32_resolves_every_inode() {
    if tools_or_skip() {
        reopen_resolves_every_inode(&["-F", "32", "-s", "1"], 40 * 1024);
    }
}

/// The 8.3 name of the short entry at `pos`, as listed (no case flags).
fn short_name(img: &[u8], pos: usize) -> String {
    let part = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_string();
    let (base, ext) = (part(&img[pos..pos + 8]), part(&img[pos + 8..pos + 11]));
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// Two entries whose long names decode alike: the first keeps the name,
/// the second shows as its short name; a long name of more than 255 bytes
/// of UTF-8 shows as its short name. Every listed name looks up to its
/// own entry.
#[test]
fn repeated_and_overlong_names_can_be_looked_up() {
    if !tools_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("names.img");
    let img_s = img.to_str().unwrap();
    run(&["mkfs.vfat", "-C", "-F", "12", img_s, "4096"]);
    for (name, data) in [("dup one.txt", "one\n"), ("dup two.txt", "two\n")] {
        let f = dir.path().join(name);
        std::fs::write(&f, data).unwrap();
        run(&["mcopy", "-i", img_s, f.to_str().unwrap(), "::/"]);
    }
    // 127 'é' and ".txt": 258 bytes of UTF-8 in 131 UTF-16 units.
    let long = format!("{}.txt", "é".repeat(127));
    let f = dir.path().join("long");
    std::fs::write(&f, "long\n").unwrap();
    let out = std::process::Command::new("mcopy")
        .args(["-i", img_s, f.to_str().unwrap(), &format!("::/{long}")])
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("LC_ALL", "C.UTF-8")
        .status()
        .unwrap();
    assert!(out.success());
    let mut bytes = std::fs::read(&img).unwrap();
    // "dup two.txt" -> "dup one.txt" in its long-name slot (units 4..7 at
    // slot offsets 9, 14, 16); its checksum still matches its short entry.
    let needle = b"d\0u\0p\0 \0t\0";
    let slot = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("slot of dup two.txt")
        - 1;
    for (o, c) in [(9, b'o'), (14, b'n'), (16, b'e')] {
        bytes[slot + o] = c;
    }
    let two_short = short_name(&bytes, slot + 32);
    let fs = fat::open("names", Arc::new(bytes)).unwrap();
    let names: Vec<String> = fs
        .readdir(fs.root())
        .unwrap()
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    println!("{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "dup one.txt").count(), 1);
    assert!(names.contains(&two_short), "{two_short} in {names:?}");
    assert!(!names.contains(&long));
    assert!(names.iter().all(|n| n.len() <= 255), "{names:?}");
    let mut contents = Vec::new();
    for n in &names {
        let ino = fs.lookup(fs.root(), n.as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        let k = fs.read(ino, 0, &mut buf).unwrap();
        contents.push(String::from_utf8(buf[..k].to_vec()).unwrap());
    }
    contents.sort();
    assert_eq!(contents, ["long\n", "one\n", "two\n"]);
}
