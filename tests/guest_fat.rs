//! The FAT reader (`snaptree::guest::fat`) against volumes made by
//! `mkfs.vfat` + `mcopy`, judged by mtools (`mcopy` back out, `mdir`), by
//! blkid for label and UUID, and, where the kernel has vfat, by a read-only
//! loop mount of a copy. Then byte flips over boot sector, FATs and
//! directories (`SNAPTREE_FAT_FUZZ` rounds) and hand-made chain and
//! directory loops: errors, never a panic or a hang.

mod guest_fat {
    pub mod hostile;
    pub mod judge;
    pub mod reopen;
    pub mod tools;
}

use guest_fat::judge::*;
use guest_fat::tools::*;
use snaptree::guest::{FileKind, GuestError};
use std::process::Command;

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
