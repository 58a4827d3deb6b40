//! Guest files through the mount (`files`, `fs/`, `volumes/`): a GPT disk
//! with an EFI (FAT) partition and an ext4 root made by `sgdisk`,
//! `mkfs.vfat`+`mcopy` and `mkfs.ext4 -d`, judged by the kernel (a loop
//! mount of a copy of the volume) and by mtools. Also a snapshot chain
//! whose files change between points, and a crash-consistent snapshot
//! taken while the guest filesystem is mounted read-write.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

const MIB: u64 = 1 << 20;
/// The EFI partition: sectors 2048.. (1 MiB), 32 MiB.
const P1_OFF: u64 = MIB;
const P1_LEN: u64 = 32 * MIB;
/// The root partition: from 33 MiB to the end of the usable area.
const P2_OFF: u64 = 33 * MIB;
const DISK: u64 = 128 * MIB;

pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What these tests need beyond the mount's own prerequisites.
fn guest_tools() -> bool {
    for t in ["sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "mtype"] {
        if !have(t) {
            skip(&format!(
                "{t} not installed (gdisk, e2fsprogs, dosfstools, mtools)"
            ));
            return false;
        }
    }
    true
}

/// Root and a kernel that loop-mounts ext4: the judge of ext volumes.
pub(crate) fn kernel_judge() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("not root: the kernel (a loop mount) is the judge of ext4");
        return false;
    }
    true
}

pub(crate) fn sh(what: &str, script: &str) {
    let o = run_unchecked(Command::new("sh").args(["-ec", script]));
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The guest's root tree for `mkfs.ext4 -d`: `motd` says `day`.
fn make_root_tree(dir: &Path, day: &str) {
    let w = |p: &str, data: &[u8]| {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    };
    w(
        "etc/os-release",
        b"ID=debian\nPRETTY_NAME=\"snaptree test\"\n",
    );
    w("etc/motd", format!("welcome, it is {day}\n").as_bytes());
    w("etc/nginx/nginx.conf", b"worker_processes 4;\n");
    w("home/alice/report.txt", &pattern(11, 300_000));
    w("usr/bin/tool", &pattern(12, 70_000));
    std::fs::set_permissions(
        dir.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../etc/motd", dir.join("home/motd-link")).unwrap();
    std::os::unix::fs::symlink("x".repeat(100), dir.join("home/slow-link")).unwrap();
    std::fs::hard_link(dir.join("etc/motd"), dir.join("home/alice/motd-hard")).unwrap();
    w("home/alice/ünïcødé ✓.txt", b"unicode\n");
    let f = std::fs::File::create(dir.join("home/alice/sparse")).unwrap();
    f.set_len(3 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", 3 * MIB - 3).unwrap();
    sh(
        "mkfifo",
        &format!("mkfifo '{}'", dir.join("home/fifo").display()),
    );
    if have("setfattr") {
        sh(
            "setfattr",
            &format!(
                "setfattr -n user.note -v hello '{}'",
                dir.join("home/alice/report.txt").display()
            ),
        );
    }
}

/// A raw GPT disk: p1 EFI (FAT16 with `EFI/BOOT/grub.cfg`), p2 ext4 of
/// `root`. Returns its path.
fn make_disk(ws: &Workspace, root: &Path) -> PathBuf {
    let disk = ws.scratch("disk.img");
    let efi = ws.scratch("efi.img");
    let ext = ws.scratch("root.img");
    for f in [&disk, &efi, &ext] {
        let _ = std::fs::remove_file(f);
    }
    let cfg = ws.scratch("grub.cfg");
    std::fs::write(&cfg, b"set timeout=5\n").unwrap();
    let p2_len = DISK - P2_OFF - MIB;
    sh(
        "build the disk",
        &format!(
            "truncate -s {DISK} {d}
             sgdisk -n1:2048:+32M -t1:ef00 -c1:EFI -n2:{p2s}:+{p2k}K -t2:8300 -c2:root {d} >/dev/null
             mkfs.vfat -C {e} {p1k} >/dev/null
             mmd -i {e} ::EFI ::EFI/BOOT
             mcopy -i {e} {cfg} ::EFI/BOOT/grub.cfg
             mkfs.ext4 -q -F -L guestroot -d {r} {x} {p2k}K
             dd if={e} of={d} bs=1M seek={p1m} conv=notrunc status=none
             dd if={x} of={d} bs=1M seek={p2m} conv=notrunc status=none",
            d = disk.display(),
            e = efi.display(),
            x = ext.display(),
            r = root.display(),
            cfg = cfg.display(),
            p1k = P1_LEN / 1024,
            p2s = P2_OFF / 512,
            p2k = p2_len / 1024,
            p1m = P1_OFF / MIB,
            p2m = P2_OFF / MIB,
        ),
    );
    disk
}

/// A tree of one qcow2 image `base.qcow2` holding the disk of `root`.
fn guest_workspace() -> Option<(Workspace, PathBuf)> {
    let ws = workspace()?;
    if !guest_tools() {
        return None;
    }
    let root = ws.scratch("root-tree");
    make_root_tree(&root, "monday");
    let disk = make_disk(&ws, &root);
    ws.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        disk.to_str().unwrap(),
        "base.qcow2",
    ]);
    Some((ws, root))
}

/// Everything `stat`, `readlink`, `getxattr` and `read` show of a tree,
/// by relative path.
pub(crate) fn snapshot_tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    // Hard links: every name of one inode says which inode (by its first
    // name in path order, filled in below).
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel.as_os_str() == "lost+found" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut d = format!(
                "mode={:o} uid={} gid={} mtime={}.{:09} nlink={}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                m.nlink()
            );
            if !ft.is_dir() {
                d += &format!(" size={}", m.len());
            }
            if ft.is_char_device() || ft.is_block_device() {
                d += &format!(" rdev={:x}", m.rdev());
            }
            if m.nlink() > 1 && !ft.is_dir() {
                inodes.entry(m.ino()).or_default().push(rel.clone());
            }
            if ft.is_symlink() {
                d += &format!(" -> {}", std::fs::read_link(&p).unwrap().display());
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                d += &format!(" data={:016x}", fnv(&data));
            } else if ft.is_dir() {
                stack.push(p.clone());
            }
            d += &format!(" xattrs={:?}", user_xattrs(&p));
            out.insert(rel, d);
        }
    }
    for names in inodes.values() {
        let first = names.iter().min().cloned().unwrap_or_default();
        for n in names {
            if let Some(d) = out.get_mut(n) {
                *d += &format!(" link-of={}", first.display());
            }
        }
    }
    out
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// `user.*` xattrs of `p` (not following a symlink), name=value.
fn user_xattrs(p: &Path) -> Vec<String> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: buffers are valid for the lengths given.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| n.starts_with(b"user.")) {
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: as above.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(len.max(0) as usize);
        out.push(format!(
            "{}={}",
            String::from_utf8_lossy(name),
            String::from_utf8_lossy(&v)
        ));
    }
    out
}

/// Loop-mounts a copy of `volume` read-only (the kernel replays its
/// journal in the copy) and returns the tree it shows.
pub(crate) fn kernel_view(ws: &Workspace, volume: &Path, tag: &str) -> BTreeMap<PathBuf, String> {
    kernel_view_with(ws, volume, tag, "loop")
}

/// [`kernel_view`] with other mount options (`loop,ro,norecovery`: what
/// a crash-consistent XFS shows without log replay).
pub(crate) fn kernel_view_with(
    ws: &Workspace,
    volume: &Path,
    tag: &str,
    opts: &str,
) -> BTreeMap<PathBuf, String> {
    let copy = ws.scratch(&format!("judge-{tag}.img"));
    let mnt = ws.scratch(&format!("judge-{tag}"));
    std::fs::copy(volume, &copy).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let _guard = LoopMount::new(&copy, &mnt, opts);
    snapshot_tree(&mnt)
}

/// A kernel mount that is undone on drop, also when the test fails.
pub(crate) struct LoopMount(PathBuf);

impl LoopMount {
    pub(crate) fn new(image: &Path, mnt: &Path, opts: &str) -> LoopMount {
        sh(
            "loop mount",
            &format!("mount -o {opts} '{}' '{}'", image.display(), mnt.display()),
        );
        LoopMount(mnt.to_path_buf())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("umount {} failed; detaching it lazily", self.0.display());
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A loop device over a range of a file (the partition inside a mounted
/// `disk.raw`), detached on drop.
pub(crate) struct LoopDev(pub(crate) String);

impl LoopDev {
    pub(crate) fn new(file: &Path, offset: u64, size: u64) -> LoopDev {
        let o = run(Command::new("losetup").args([
            "-f",
            "--show",
            "-o",
            &offset.to_string(),
            "--sizelimit",
            &size.to_string(),
            file.to_str().unwrap(),
        ]));
        LoopDev(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
        // Detaching is finished asynchronously: wait until the device lets
        // go of its file, so the FUSE mount under it can be unmounted.
        let dev = self.0.trim_start_matches("/dev/");
        let backing = PathBuf::from(format!("/sys/block/{dev}/loop/backing_file"));
        wait_until(std::time::Duration::from_secs(10), || !backing.exists());
    }
}

pub(crate) fn assert_trees_eq(
    what: &str,
    got: &BTreeMap<PathBuf, String>,
    want: &BTreeMap<PathBuf, String>,
) {
    for (p, w) in want {
        match got.get(p) {
            Some(g) => assert_eq!(g, w, "{what}: {} differs", p.display()),
            None => panic!("{what}: {} missing", p.display()),
        }
    }
    for p in got.keys() {
        assert!(want.contains_key(p), "{what}: {} is extra", p.display());
    }
}

#[test]
fn a_points_guest_files_match_what_the_kernel_and_mtools_read() {
    let Some((ws, _root)) = guest_workspace() else {
        return;
    };
    let Some(m) = ws.mount(&[]) else { return };
    let point = m.mnt.join("base");
    let link = std::fs::read_link(point.join("files")).expect("files link");
    assert_eq!(link, Path::new("fs/p2"));
    assert_eq!(
        read_text(&point.join("files/etc/motd")),
        "welcome, it is monday\n"
    );
    let index = read_json(&point.join("volumes/index.json")).expect("index.json");
    let vols = index["volumes"].as_array().expect("volumes").clone();
    let by_name = |n: &str| vols.iter().find(|v| v["name"] == n).cloned().unwrap();
    let (p1, p2) = (by_name("p1"), by_name("p2"));
    assert_eq!(p1["source"], "gpt", "{index}");
    assert_eq!(p1["filesystem"], "vfat", "{index}");
    assert_eq!(p1["partition_name"], "EFI", "{index}");
    assert_eq!(p1["ranges"][0]["offset"], P1_OFF, "{index}");
    assert_eq!(p2["filesystem"], "ext4", "{index}");
    assert_eq!(p2["label"], "guestroot", "{index}");
    assert_eq!(p2["browsable"], true, "{index}");

    // volumes/p2.raw is the partition's bytes; the kernel reading a copy
    // of it is the judge of every file in fs/p2.
    let raw = point.join("volumes/p2.raw");
    let want = kernel_view(&ws, &raw, "p2");
    assert_trees_eq("fs/p2", &snapshot_tree(&point.join("fs/p2")), &want);

    // Holes: SEEK_DATA/SEEK_HOLE inside the sparse file, as the kernel
    // reports them on its copy.
    let sparse = std::fs::File::open(point.join("fs/p2/home/alice/sparse")).unwrap();
    let ours = data_ranges(&sparse, 3 * MIB);
    assert!(
        ours.len() == 1 && ours[0].0 > 0 && ours[0].1 == 3 * MIB,
        "{ours:?}"
    );
    drop(sparse);
    // Device nodes are never opened through the mount (nodev).
    if point.join("fs/p2/home/null").exists() {
        assert_errno(
            "open a guest device node",
            std::fs::File::open(point.join("fs/p2/home/null")),
            libc::EACCES,
        );
    }

    // FAT: mtools reading volumes/p1.raw is the judge.
    let o = run(Command::new("mtype").args([
        "-i",
        point.join("volumes/p1.raw").to_str().unwrap(),
        "::EFI/BOOT/grub.cfg",
    ]));
    assert_eq!(
        std::fs::read(point.join("fs/p1/EFI/BOOT/grub.cfg")).unwrap(),
        o.stdout
    );
    // Read-only everywhere, also on a leaf.
    assert_errno(
        "write a guest file",
        std::fs::OpenOptions::new()
            .write(true)
            .open(point.join("files/etc/motd")),
        libc::EROFS,
    );
    m.unmount();
}

#[test]
fn each_point_shows_its_own_files_and_a_crash_consistent_snapshot_replays() {
    let Some((ws, _root)) = guest_workspace() else {
        return;
    };
    if !kernel_judge() {
        return;
    }
    let Some(m) = ws.mount(&[]) else { return };
    let mnt = m.mnt.clone();
    // The leaf's view is open before its disk changes.
    assert_eq!(
        read_text(&mnt.join("base/files/etc/motd")),
        "welcome, it is monday\n"
    );
    ctl_ok(&mnt, "base", "snapshot monday");
    // Change the leaf's files through the kernel, on a loop device over
    // the partition inside the mounted disk.
    let p2_len = DISK - P2_OFF - MIB;
    let gmnt = ws.scratch("guest-mnt");
    std::fs::create_dir_all(&gmnt).unwrap();
    {
        let dev = LoopDev::new(&disk(&mnt, "base"), P2_OFF, p2_len);
        let _g = LoopMount::new(Path::new(&dev.0), &gmnt, "rw");
        std::fs::write(gmnt.join("etc/motd"), b"welcome, it is tuesday\n").unwrap();
        std::fs::remove_file(gmnt.join("etc/nginx/nginx.conf")).unwrap();
    }
    // The leaf's view is rebuilt from its written disk: within a second
    // (the recheck interval and the leaf's entry TTL).
    let leaf_motd = mnt.join("base/files/etc/motd");
    let rebuilt = wait_until(std::time::Duration::from_secs(5), || {
        std::fs::read_to_string(&leaf_motd).is_ok_and(|t| t == "welcome, it is tuesday\n")
    });
    assert!(
        rebuilt,
        "the leaf still shows {:?}",
        std::fs::read_to_string(&leaf_motd)
    );
    assert!(!mnt.join("base/files/etc/nginx/nginx.conf").exists());
    ctl_ok(&mnt, "base", "snapshot tuesday");
    // Crash-consistent: written and fsynced, snapshotted while mounted.
    {
        let dev = LoopDev::new(&disk(&mnt, "base"), P2_OFF, p2_len);
        let g = LoopMount::new(Path::new(&dev.0), &gmnt, "rw");
        let f = std::fs::File::create(gmnt.join("home/alice/wednesday.txt")).unwrap();
        std::io::Write::write_all(&mut &f, &pattern(3, 200_000)).unwrap();
        f.sync_all().unwrap();
        std::fs::File::open(gmnt.join("home/alice"))
            .unwrap()
            .sync_all()
            .unwrap();
        ctl_ok(&mnt, "base", "snapshot wednesday");
        drop(f);
        drop(g);
    }
    let motd = |p: &str| read_text(&mnt.join(p).join("files/etc/motd"));
    assert_eq!(motd("monday"), "welcome, it is monday\n");
    assert_eq!(motd("tuesday"), "welcome, it is tuesday\n");
    assert!(mnt.join("monday/files/etc/nginx/nginx.conf").exists());
    assert!(!mnt.join("tuesday/files/etc/nginx/nginx.conf").exists());
    assert_eq!(
        std::fs::read(mnt.join("wednesday/files/home/alice/wednesday.txt")).unwrap(),
        pattern(3, 200_000)
    );
    // Each point against the kernel, which replays the journal of its copy.
    for p in ["monday", "tuesday", "wednesday"] {
        let point = mnt.join(p);
        let want = kernel_view(&ws, &point.join("volumes/p2.raw"), p);
        assert_trees_eq(p, &snapshot_tree(&point.join("fs/p2")), &want);
    }
    m.unmount();
}

#[test]
fn a_damaged_volume_fails_with_a_reason_and_the_mount_survives() {
    let Some(ws) = workspace() else { return };
    if !guest_tools() {
        return;
    }
    let root = ws.scratch("root-tree");
    make_root_tree(&root, "monday");
    let disk = make_disk(&ws, &root);
    // Break p2's superblock magic, and the FAT's boot sector signature of p1:
    // neither filesystem may be guessed at.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0, 0], P2_OFF + 1024 + 56).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0; 16], P1_OFF).unwrap();
    drop(f);
    ws.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        disk.to_str().unwrap(),
        "base.qcow2",
    ]);
    // And a second point whose ext4 inode table is garbage (a flipped
    // group descriptor): browsing it gives errors, not a crash.
    let disk2 = make_disk(&ws, &root);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk2)
        .unwrap();
    let garbage = pattern(99, 64 * 1024);
    std::os::unix::fs::FileExt::write_all_at(&f, &garbage, P2_OFF + 4096).unwrap();
    drop(f);
    ws.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        disk2.to_str().unwrap(),
        "other.qcow2",
    ]);

    let Some(m) = ws.mount(&["-o", "ro"]) else {
        return;
    };
    let point = m.mnt.join("base");
    assert!(std::fs::symlink_metadata(point.join("files")).is_err());
    let index = read_json(&point.join("volumes/index.json")).expect("index.json");
    let p2 = index["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "p2"))
        .cloned()
        .unwrap_or_else(|| panic!("no p2 in {index}"));
    assert_eq!(p2["browsable"], false, "{index}");
    assert!(p2["why_not"].is_string(), "{index}");
    // The raw volume is still there to loop-mount or repair.
    assert_eq!(
        std::fs::metadata(point.join("volumes/p2.raw"))
            .unwrap()
            .len(),
        DISK - P2_OFF - MIB
    );

    // Walking the damaged one: every error is an errno, the daemon lives.
    let other = m.mnt.join("other/fs");
    let mut stack = vec![other.clone()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            let p = e.path();
            match std::fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() && seen < 10_000 => stack.push(p),
                Ok(md) if md.is_file() => {
                    let _ = std::fs::read(&p);
                }
                _ => {}
            }
        }
    }
    assert!(m.mnt.join("other/disk.raw").exists(), "the mount is gone");
    let index = read_text(&m.mnt.join("other/volumes/index.json"));
    assert!(index.contains("\"p2\""), "{index}");
    m.unmount();
}

/// A multi-disk point's guest views are no more open than its most
/// private disk: `vdb`'s image is 0600, so `fs/` and `volumes/` (and a
/// volume on `vdb`) are closed to others even though `vda`'s is 0644.
#[test]
fn guest_views_of_several_disks_are_as_private_as_the_most_private_disk() {
    use std::os::unix::fs::PermissionsExt;
    let Some(ws) = workspace() else { return };
    for (name, backing) in [("base", None), ("top", Some("base"))] {
        for d in ["vda", "vdb"] {
            let b = backing.map(|b| format!("{b}.{d}.qcow2"));
            let img = format!("{name}.{d}.qcow2");
            ws.create_qcow2(&img, 4 * MIB, b.as_deref().map(|b| (b, "qcow2")), "");
        }
    }
    super::multidisk::write_two_disk_manifest(&ws);
    for n in ["base.vdb.qcow2", "top.vdb.qcow2"] {
        std::fs::set_permissions(ws.img(n), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let Some(m) = ws.mount(&[]) else { return };
    let top = m.mnt.join("top");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&top.join("vda.raw")) & 0o044, 0o044);
    for p in [
        "fs",
        "volumes",
        "volumes/vdb-disk.raw",
        "volumes/index.json",
    ] {
        let path = top.join(p);
        assert_eq!(mode(&path) & 0o077, 0, "{p} is open to others");
    }
    m.unmount();
}
