//! Volume discovery judged by the tools that made the volumes: partition
//! offsets against `sgdisk -i` and `sfdisk --json`, LV layout against
//! `lvs`/`pvs` reports, filesystem type/label/UUID against `blkid -p`.

mod guest_volumes {
    pub mod fuzz;
    pub mod lvm;
    pub mod tools;
}

use guest_volumes::tools::*;
use snaptree::guest::probe::probe;
use snaptree::guest::volumes::{scan, Scan, Source, Volume, VolumeBytes};
use snaptree::guest::ReadBytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `sgdisk -i N`: first byte, length, type GUID (lowercase), name.
fn sgdisk_info(img: &Path, n: u32) -> (u64, u64, String, String) {
    let out = run("sgdisk", &["-i", &n.to_string(), img.to_str().unwrap()]);
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {out}"))
            .trim()
            .to_string()
    };
    let first: u64 = field("First sector:")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let last: u64 = field("Last sector:")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let kind = field("Partition GUID code:")
        .split(' ')
        .next()
        .unwrap()
        .to_lowercase();
    let name = field("Partition name:").trim_matches('\'').to_string();
    (first * 512, (last - first + 1) * 512, kind, name)
}

fn by_name<'a>(scan: &'a Scan, name: &str) -> &'a Volume {
    scan.volumes
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name} in {:?}", scan.volumes))
}

fn names(scan: &Scan) -> Vec<&str> {
    scan.volumes.iter().map(|v| v.name.as_str()).collect()
}

/// A GPT disk: p1 EFI (vfat), p2 root (ext4), no entry 3, p4 swap. Each
/// filesystem is made in its own file (kept for blkid) and copied in.
fn make_gpt(dir: &Path) -> (PathBuf, Vec<(u32, PathBuf)>) {
    let img = image(dir, "gpt.img", 64);
    let s = img.to_str().unwrap();
    run(
        "sgdisk",
        &[
            "-n1:2048:+8M",
            "-t1:ef00",
            "-c1:EFI",
            "-n2:0:+20M",
            "-t2:8300",
            "-c2:root fs",
            "-n4:0:+4M",
            "-t4:8200",
            s,
        ],
    );
    let mut fss = Vec::new();
    for (n, mib) in [(1u32, 8u64), (2, 20), (4, 4)] {
        let f = image(dir, &format!("fs{n}"), mib);
        let fs = f.to_str().unwrap();
        match n {
            1 => run("mkfs.vfat", &["-n", "ESP LABEL", fs]),
            2 => run("mkfs.ext4", &["-q", "-L", "rootfs", fs]),
            _ => run("mkswap", &["-L", "swp", fs]),
        };
        let (first, _, _, _) = sgdisk_info(&img, n);
        write_at(&img, first, &std::fs::read(&f).unwrap());
        fss.push((n, f));
    }
    (img, fss)
}

/// `probe` of a volume equals `blkid -p` of the file its filesystem was made in.
fn assert_probe_like_blkid(v: &Volume, disks: &[Arc<dyn ReadBytes>], made: &Path) {
    let got = probe(&VolumeBytes::new(v, disks));
    let want = blkid(made);
    assert_eq!(
        got.fstype.as_deref(),
        want.get("TYPE").map(String::as_str),
        "{}",
        v.name
    );
    assert_eq!(
        got.label.as_deref(),
        want.get("LABEL").map(String::as_str),
        "{}",
        v.name
    );
    assert_eq!(
        got.uuid.as_deref(),
        want.get("UUID").map(String::as_str),
        "{}",
        v.name
    );
}

#[test]
fn gpt_512_matches_sgdisk_and_blkid() {
    if !have(&["sgdisk", "mkfs.vfat", "mkfs.ext4", "mkswap", "blkid"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, fss) = make_gpt(dir.path());
    let disks = vec![disk(&img)];
    let found = scan(&[("vda".into(), disks[0].clone())]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    assert_eq!(names(&found), ["p1", "p2", "p4"]);
    for (n, made) in &fss {
        let v = by_name(&found, &format!("p{n}"));
        let (first, len, kind, name) = sgdisk_info(&img, *n);
        assert_eq!(v.source, Source::Gpt);
        assert_eq!(
            (v.pieces[0].offset, v.pieces[0].len, v.size),
            (first, len, len)
        );
        assert_eq!(v.part_type.as_deref(), Some(kind.as_str()));
        assert_eq!(v.part_name.as_deref().unwrap_or(""), name);
        assert_probe_like_blkid(v, &disks, made);
    }
    assert_eq!(
        by_name(&found, "p1").part_type_name.as_deref(),
        Some("efi system")
    );
    assert_eq!(
        by_name(&found, "p2").part_type_name.as_deref(),
        Some("linux filesystem")
    );
}

#[test]
fn gpt_backup_header_used_when_the_primary_is_damaged() {
    if !have(&["sgdisk", "mkfs.vfat", "mkfs.ext4", "mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_gpt(dir.path());
    let good = scan(&[("vda".into(), disk(&img))]);
    let pristine = std::fs::read(&img).unwrap();
    // A flipped header field, then a flipped entry of the array.
    for (at, why) in [
        (512 + 40, "header CRC mismatch"),
        (1024 + 130, "entry array CRC mismatch"),
    ] {
        let mut bytes = pristine.clone();
        bytes[at] ^= 0x5a;
        let got = scan(&[("vda".into(), Arc::new(bytes) as Arc<dyn ReadBytes>)]);
        assert_eq!(got.volumes, good.volumes, "flip at {at}");
        assert_eq!(got.problems.len(), 1, "{:?}", got.problems);
        let p = &got.problems[0];
        assert!(
            p.contains(why) && p.contains("using the backup at offset"),
            "{p}"
        );
        assert!(p.contains(&format!("{}", pristine.len() - 512)), "{p}");
    }
    // Both copies damaged: no partitions, and a problem saying why.
    let mut bytes = pristine.clone();
    bytes[512 + 40] ^= 1;
    let end = bytes.len();
    bytes[end - 512 + 40] ^= 1;
    let got = scan(&[("vda".into(), Arc::new(bytes) as Arc<dyn ReadBytes>)]);
    assert!(got.volumes.is_empty(), "{:?}", got.volumes);
    assert!(
        got.problems[0].contains("no valid backup"),
        "{:?}",
        got.problems
    );
}

#[test]
fn gpt_4096_byte_sectors_match_sfdisk() {
    if !have(&["sfdisk", "losetup", "blockdev"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "4k.img", 64);
    let parts = {
        let lo = Loop::new(&img, &["--sector-size", "4096"]);
        assert_eq!(run("blockdev", &["--getss", &lo.0]).trim(), "4096");
        let script =
            "label: gpt\nstart=256, size=2048, type=linux, name=\"one\"\nsize=1024, type=uefi\n";
        sfdisk(Path::new(&lo.0), script);
        let json: serde_json::Value =
            serde_json::from_str(&run("sfdisk", &["--json", &lo.0])).unwrap();
        assert_eq!(json["partitiontable"]["sectorsize"], 4096);
        json["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .clone()
    };
    let found = scan(&[("vda".into(), disk(&img))]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    assert_eq!(names(&found), ["p1", "p2"]);
    for (v, p) in found.volumes.iter().zip(&parts) {
        let start = p["start"].as_u64().unwrap() * 4096;
        let size = p["size"].as_u64().unwrap() * 4096;
        assert_eq!((v.pieces[0].offset, v.size), (start, size), "{}", v.name);
        assert_eq!(
            v.part_type.as_deref(),
            p["type"].as_str().map(str::to_lowercase).as_deref()
        );
    }
    assert_eq!(found.volumes[0].part_name.as_deref(), Some("one"));
}

#[test]
fn mbr_extended_and_logical_partitions_match_sfdisk() {
    if !have(&["sfdisk", "mkfs.vfat", "blkid"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "mbr.img", 64);
    let script = "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=4096, type=82\n\
                  start=14336, type=5\nstart=16384, size=8192, type=83\n\
                  size=4096, type=8e\nsize=8192, type=c\n";
    sfdisk(&img, script);
    let json: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["--json", img.to_str().unwrap()])).unwrap();
    let parts = json["partitiontable"]["partitions"].as_array().unwrap();
    // A FAT32 in logical partition 7, judged by blkid.
    let fat = image(dir.path(), "fat", 4);
    run(
        "mkfs.vfat",
        &["-F", "32", "-n", "LOGICAL7", fat.to_str().unwrap()],
    );
    let disks = vec![disk(&img)];
    let found = scan(&[("sda".into(), disks[0].clone())]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    assert_eq!(names(&found), ["p1", "p2", "p5", "p6", "p7"]);
    for p in parts {
        let node = p["node"].as_str().unwrap();
        let n: u32 = node[img.to_str().unwrap().len()..].parse().unwrap();
        let kind = p["type"].as_str().unwrap();
        if kind == "5" {
            assert!(!names(&found).contains(&format!("p{n}").as_str()));
            continue;
        }
        let v = by_name(&found, &format!("p{n}"));
        let start = p["start"].as_u64().unwrap() * 512;
        assert_eq!(
            (v.pieces[0].offset, v.size),
            (start, p["size"].as_u64().unwrap() * 512)
        );
        assert_eq!(
            v.part_type.as_deref(),
            Some(format!("0x{:0>2}", kind).as_str())
        );
        assert_eq!(v.source, Source::Mbr);
        if n == 7 {
            write_at(&img, start, &std::fs::read(&fat).unwrap());
        }
    }
    assert_probe_like_blkid(by_name(&found, "p7"), &disks, &fat);
}

#[test]
fn hybrid_mbr_is_read_through_to_the_gpt() {
    if !have(&["sgdisk", "mkfs.vfat", "mkfs.ext4", "mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_gpt(dir.path());
    run("sgdisk", &["-h", "1:2", img.to_str().unwrap()]);
    let sector = std::fs::read(&img).unwrap()[..512].to_vec();
    let kinds: Vec<u8> = (0..4).map(|i| sector[446 + 16 * i + 4]).collect();
    assert!(
        kinds.contains(&0xee) && kinds.contains(&0x83),
        "not hybrid: {kinds:x?}"
    );
    let found = scan(&[("vda".into(), disk(&img))]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    assert_eq!(names(&found), ["p1", "p2", "p4"]);
    for v in &found.volumes {
        let n = v.name[1..].parse().unwrap();
        assert_eq!(v.source, Source::Gpt);
        assert_eq!(v.pieces[0].offset, sgdisk_info(&img, n).0);
    }
}

#[test]
fn whole_disk_filesystems_are_one_volume_named_disk() {
    if !have(&["mkfs.ext4", "mkfs.vfat", "mkswap", "blkid"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut made = Vec::new();
    for (name, cmd, args) in [
        ("ext4", "mkfs.ext4", vec!["-q", "-L", "whole"]),
        ("ext2", "mkfs.ext4", vec!["-q", "-t", "ext2"]),
        ("ext3", "mkfs.ext4", vec!["-q", "-t", "ext3", "-L", "three"]),
        ("fat16", "mkfs.vfat", vec!["-F", "16", "-n", "SIXTEEN"]),
        ("fat12", "mkfs.vfat", vec!["-F", "12"]),
        ("swap", "mkswap", vec![]),
        ("xfs", "mkfs.xfs", vec!["-q", "-L", "xlabel"]),
    ] {
        if !have(&[cmd]) {
            continue;
        }
        let f = image(dir.path(), name, if name == "xfs" { 320 } else { 24 });
        let mut a = args.clone();
        a.push(f.to_str().unwrap());
        run(cmd, &a);
        made.push(f);
    }
    let disks: Vec<Arc<dyn ReadBytes>> = made.iter().map(|f| disk(f)).collect();
    for (f, d) in made.iter().zip(&disks) {
        let found = scan(&[("vda".into(), d.clone())]);
        assert!(found.problems.is_empty(), "{f:?}: {:?}", found.problems);
        assert_eq!(names(&found), ["disk"], "{f:?}");
        assert_eq!(found.volumes[0].source, Source::Disk);
        assert_eq!(found.volumes[0].size, d.size());
        assert_probe_like_blkid(&found.volumes[0], std::slice::from_ref(d), f);
    }
}

#[test]
fn several_disks_put_the_disk_name_first() {
    if !have(&["sgdisk", "mkfs.vfat", "mkfs.ext4", "mkswap"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_gpt(dir.path());
    let plain = image(dir.path(), "plain", 4);
    let found = scan(&[("vda".into(), disk(&img)), ("vdb".into(), disk(&plain))]);
    assert_eq!(names(&found), ["vda-p1", "vda-p2", "vda-p4", "vdb-disk"]);
    assert_eq!(found.volumes[3].disk, 1);
    assert_eq!(found.volumes[3].pieces[0].disk, 1);
}

#[test]
fn probe_matches_blkid_for_btrfs_ntfs_luks_exfat_and_iso9660() {
    if !have(&["blkid"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let iso_dir = d.join("isodir");
    std::fs::create_dir(&iso_dir).unwrap();
    std::fs::write(iso_dir.join("a"), "hi").unwrap();
    let luks = "-q --pbkdf pbkdf2 --pbkdf-force-iterations 1000";
    let cases = [
        (
            "btrfs",
            "mkfs.btrfs",
            128,
            "mkfs.btrfs -q -L btlabel F".to_string(),
        ),
        (
            "ntfs",
            "mkntfs",
            16,
            "mkntfs -q -F -f -L 'nt label' F".to_string(),
        ),
        (
            "luks2",
            "cryptsetup",
            32,
            format!("echo -n pw | cryptsetup luksFormat {luks} --type luks2 --label lk2 F -"),
        ),
        (
            "luks1",
            "cryptsetup",
            32,
            format!("echo -n pw | cryptsetup luksFormat {luks} --type luks1 F -"),
        ),
        (
            "exfat",
            "mkfs.exfat",
            16,
            "mkfs.exfat F >/dev/null".to_string(),
        ),
        (
            "iso",
            "xorriso",
            0,
            format!(
                "xorriso -as mkisofs -quiet -V ISOLAB -o F {}",
                iso_dir.display()
            ),
        ),
    ];
    let mut tried = 0;
    for (name, tool, mib, script) in cases {
        if !have(&[tool]) {
            continue;
        }
        let f = if mib > 0 {
            image(d, name, mib)
        } else {
            d.join(name)
        };
        run(
            "sh",
            &["-c", &script.replace(" F", &format!(" {}", f.display()))],
        );
        let one = disk(&f);
        let found = scan(&[("vda".into(), one.clone())]);
        assert_eq!(names(&found), ["disk"], "{name}: {:?}", found.problems);
        assert_probe_like_blkid(&found.volumes[0], &[one], &f);
        tried += 1;
    }
    println!("{tried} filesystems compared with blkid");
}
