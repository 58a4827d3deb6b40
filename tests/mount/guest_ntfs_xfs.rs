//! Guest files on Windows and RHEL-family guests through the mount: an
//! NTFS volume holding `Windows/System32` (made by `mkntfs`, populated
//! through `ntfs-3g`, judged by `ntfs-3g` on a copy), a crash-consistent
//! XFS snapshot taken while the kernel had it mounted read-write (judged
//! by the kernel's `ro,norecovery` mount of a copy, and flagged), and the
//! volumes snaptree lists but does not browse (btrfs, LUKS, exFAT), each
//! with its reason.

use std::path::Path;

use super::guest_files::{
    assert_trees_eq, have, kernel_judge, kernel_view_with, sh, snapshot_tree, LoopDev, LoopMount,
};
use super::*;

const MIB: u64 = 1 << 20;

/// Whether every tool is installed; else prints SKIP naming the package.
fn tools(list: &[(&str, &str)]) -> bool {
    for (t, package) in list {
        if !have(t) {
            skip(&format!("{t} not installed ({package})"));
            return false;
        }
    }
    true
}

/// The volume entry `name` of a point's `volumes/index.json`.
fn volume_entry(point: &Path, name: &str) -> serde_json::Value {
    let index = read_json(&point.join("volumes/index.json")).expect("index.json");
    index["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {index}"))
}

/// A whole-disk XFS (320 MiB, sparse) made by `mkfs.xfs` and populated
/// through a kernel loop mount, as `base.qcow2`.
fn xfs_base(ws: &Workspace) {
    let raw = ws.scratch("xfs.img");
    let gm = ws.scratch("xfs-populate");
    std::fs::create_dir_all(&gm).unwrap();
    sh(
        "mkfs.xfs",
        &format!(
            "truncate -s 320M {r}; mkfs.xfs -q -L rhelroot {r}",
            r = raw.display()
        ),
    );
    {
        let _m = LoopMount::new(&raw, &gm, "loop");
        sh(
            "populate xfs",
            &format!(
                "cd {g}; mkdir -p etc home/alice usr/share/doc
                 echo 'NAME=\"Rocky Linux\"' > etc/os-release
                 for i in $(seq 1 300); do echo \"doc $i\" > usr/share/doc/file-$i.txt; done
                 head -c 3000000 /dev/urandom > home/alice/blob
                 ln -s ../../etc/os-release home/alice/release
                 setfattr -n user.colour -v blue home/alice/blob
                 truncate -s 50M home/alice/sparse; echo tail >> home/alice/sparse
                 sync",
                g = gm.display()
            ),
        );
    }
    ws.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        "base.qcow2",
    ]);
}

/// XFS on the leaf, mounted read-write by the kernel through a loop device
/// over `disk.raw`; files written and fsynced; `ctl snapshot` taken while
/// mounted. The snapshot's log is dirty: `fs/` serves it without replay,
/// `index.json` and `status` say so, and every file reads what the
/// kernel's `ro,norecovery` mount of a copy reads. The clean base point
/// reads what a plain read-only mount reads.
#[test]
fn a_crash_consistent_xfs_snapshot_reads_like_norecovery() {
    let Some(ws) = workspace() else { return };
    if !tools(&[("mkfs.xfs", "xfsprogs"), ("setfattr", "attr")]) || !kernel_judge() {
        return;
    }
    xfs_base(&ws);
    let Some(m) = ws.mount(&["-o", "gc_idle=off"]) else {
        return;
    };
    let mnt = m.mnt.clone();
    ctl_ok(&mnt, "base", "snapshot clean");
    let gm = ws.scratch("xfs-guest");
    std::fs::create_dir_all(&gm).unwrap();
    {
        let size = std::fs::metadata(mnt.join("base/disk.raw")).unwrap().len();
        let dev = LoopDev::new(&mnt.join("base/disk.raw"), 0, size);
        let g = LoopMount::new(Path::new(&dev.0), &gm, "rw");
        let f = std::fs::File::create(gm.join("home/alice/monday.txt")).unwrap();
        std::io::Write::write_all(&mut &f, &pattern(5, 300_000)).unwrap();
        f.sync_all().unwrap();
        std::fs::create_dir(gm.join("home/alice/new-dir")).unwrap();
        std::fs::write(gm.join("home/alice/new-dir/note"), b"fsynced\n").unwrap();
        for d in [
            "home/alice/new-dir/note",
            "home/alice/new-dir",
            "home/alice",
        ] {
            std::fs::File::open(gm.join(d)).unwrap().sync_all().unwrap();
        }
        ctl_ok(&mnt, "base", "snapshot crash");
        drop(f);
        drop(g);
    }
    let crash = mnt.join("crash");
    let want = kernel_view_with(
        &ws,
        &crash.join("volumes/disk.raw"),
        "crash",
        "loop,ro,norecovery",
    );
    assert_trees_eq("crash", &snapshot_tree(&crash.join("fs/disk")), &want);
    let v = volume_entry(&crash, "disk");
    assert_eq!(v["filesystem"], "xfs", "{v}");
    assert_eq!(v["browsable"], true, "{v}");
    assert!(
        v["notes"].to_string().contains("dirty log"),
        "no dirty-log note: {v}"
    );
    let status = read_text(&mnt.join("status"));
    assert!(
        status.contains("unclean"),
        "status does not flag it:\n{status}"
    );
    assert_eq!(
        read_link_text(&crash.join("files")),
        "fs/disk",
        "etc/os-release marks the root"
    );
    let clean = mnt.join("clean");
    let want = kernel_view_with(&ws, &clean.join("volumes/disk.raw"), "clean", "loop,ro");
    assert_trees_eq("clean", &snapshot_tree(&clean.join("fs/disk")), &want);
    let v = volume_entry(&clean, "disk");
    assert!(!v["notes"].to_string().contains("dirty"), "{v}");
    m.unmount();
}

/// A GPT disk whose p1 is NTFS with `Windows/System32`: `files` points at
/// it, and `fs/p1` shows what `ntfs-3g` shows of a copy of the volume.
#[test]
fn ntfs_files_point_at_windows_and_read_like_ntfs_3g() {
    let Some(ws) = workspace() else { return };
    if !tools(&[
        ("mkntfs", "ntfs-3g"),
        ("ntfs-3g", "ntfs-3g"),
        ("sgdisk", "gdisk"),
    ]) || !kernel_judge()
    {
        return;
    }
    let (disk, vol) = (ws.scratch("win.img"), ws.scratch("ntfs.img"));
    let gm = ws.scratch("ntfs-populate");
    std::fs::create_dir_all(&gm).unwrap();
    let len = 60 * MIB;
    sh(
        "mkntfs",
        &format!(
            "truncate -s {len} {v}; mkntfs -q -F -Q -L Windows {v}",
            v = vol.display()
        ),
    );
    {
        let _m = LoopMount::new(&vol, &gm, "rw -t ntfs-3g");
        sh(
            "populate ntfs",
            &format!(
                "cd {g}; mkdir -p Windows/System32/drivers/etc Users/alice/Documents 'Program Files'
                 printf '127.0.0.1 localhost\\r\\n' > Windows/System32/drivers/etc/hosts
                 head -c 1000000 /dev/urandom > Windows/System32/kernel32.dll
                 echo 'quarterly numbers' > 'Users/alice/Documents/report Q3.txt'
                 echo 'h\u{e9}llo' > 'Users/alice/Documents/caf\u{e9}.txt'
                 ln Windows/System32/kernel32.dll Windows/System32/kernel32-link.dll
                 setfattr -n user.Zone.Identifier -v '[ZoneTransfer]' 'Users/alice/Documents/report Q3.txt'
                 for i in $(seq 1 200); do echo $i > \"Program Files/f$i.txt\"; done
                 sync",
                g = gm.display()
            ),
        );
    }
    sh(
        "build the disk",
        &format!(
            "truncate -s {t} {d}
             sgdisk -n1:2048:+{k}K -t1:0700 -c1:'Basic data partition' {d} >/dev/null
             dd if={v} of={d} bs=1M seek=1 conv=notrunc status=none",
            t = len + 2 * MIB,
            k = len / 1024,
            d = disk.display(),
            v = vol.display()
        ),
    );
    ws.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        disk.to_str().unwrap(),
        "base.qcow2",
    ]);
    let Some(m) = ws.mount(&["-o", "ro"]) else {
        return;
    };
    let point = m.mnt.join("base");
    assert_eq!(read_link_text(&point.join("files")), "fs/p1");
    let v = volume_entry(&point, "p1");
    assert_eq!(v["filesystem"], "ntfs", "{v}");
    assert_eq!(v["label"], "Windows", "{v}");
    let want = kernel_view_with(&ws, &point.join("volumes/p1.raw"), "ntfs", "ro -t ntfs-3g");
    assert_trees_eq("ntfs", &snapshot_tree(&point.join("fs/p1")), &want);
    assert_eq!(
        read_text(&point.join("files/Windows/System32/drivers/etc/hosts")),
        "127.0.0.1 localhost\r\n"
    );
    m.unmount();
}

/// btrfs, LUKS and exFAT volumes are listed under `volumes/` with
/// `browsable: false` and the reason, and `fs/` shows none of them.
#[test]
fn volumes_snaptree_does_not_browse_are_listed_with_the_reason() {
    let Some(ws) = workspace() else { return };
    let need = [
        ("sgdisk", "gdisk"),
        ("mkfs.btrfs", "btrfs-progs"),
        ("cryptsetup", "cryptsetup-bin"),
        ("mkfs.exfat", "exfatprogs"),
    ];
    if !tools(&need) {
        return;
    }
    let disk = ws.scratch("others.img");
    let part = |n: u64| ws.scratch(&format!("part{n}.img"));
    let luks = "-q --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --type luks2";
    sh(
        "build the disk",
        &format!(
            "truncate -s 400M {d}
             sgdisk -n1:2048:+128M -n2:0:+32M -n3:0:+32M {d} >/dev/null
             truncate -s 128M {p1}; mkfs.btrfs -q {p1}
             truncate -s 32M {p2}; echo -n pw | cryptsetup luksFormat {luks} {p2} -
             truncate -s 32M {p3}; mkfs.exfat {p3} >/dev/null
             dd if={p1} of={d} bs=1M seek=1 conv=notrunc status=none
             dd if={p2} of={d} bs=1M seek=129 conv=notrunc status=none
             dd if={p3} of={d} bs=1M seek=161 conv=notrunc status=none",
            d = disk.display(),
            p1 = part(1).display(),
            p2 = part(2).display(),
            p3 = part(3).display(),
        ),
    );
    ws.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        disk.to_str().unwrap(),
        "base.qcow2",
    ]);
    let Some(m) = ws.mount(&["-o", "ro"]) else {
        return;
    };
    let point = m.mnt.join("base");
    for (vol, fstype, why) in [
        ("p1", "btrfs", "does not read btrfs"),
        ("p2", "crypto_LUKS", "LUKS-encrypted"),
        ("p3", "exfat", "does not read exfat"),
    ] {
        let v = volume_entry(&point, vol);
        assert_eq!(v["filesystem"], fstype, "{v}");
        assert_eq!(v["browsable"], false, "{v}");
        assert!(v["why_not"].to_string().contains(why), "{v}");
        assert!(point.join(format!("volumes/{vol}.raw")).exists());
    }
    let listed: Vec<_> = std::fs::read_dir(point.join("fs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(listed.is_empty(), "fs/ shows {listed:?}");
    m.unmount();
}

fn read_link_text(p: &Path) -> String {
    std::fs::read_link(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_string_lossy()
        .into_owned()
}
