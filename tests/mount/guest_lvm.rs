//! A guest root on LVM through the mount: a GPT disk whose p1 is an ext4
//! `/boot` and whose p2 is an LVM2 PV holding VG `vg0` with LVs `root`
//! (ext4, in two segments with `swap` between them) and `swap`, made by
//! `sgdisk`, `pvcreate`/`vgcreate`/`lvcreate`/`lvextend`, `mkfs.ext4 -d`
//! and `mkswap`. The LV bytes go where `pvs` and `lvs --segments` say they
//! lie; `volumes/` must give them back byte for byte and `fs/` must show
//! what the kernel shows of a loop mount of a copy of each volume.
//!
//! LVM runs without device-mapper (nothing is activated) and with a
//! private configuration: it sees only the test's loop device, keeps no
//! devices file, hints, backups or locks outside the workspace, and waits
//! for no udev.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::guest_files::{
    assert_trees_eq, have, kernel_judge, kernel_view, sh, snapshot_tree, LoopDev,
};
use super::*;

const MIB: u64 = 1 << 20;
/// p1 (`/boot`): sectors 2048.. (1 MiB), 16 MiB.
const P1_OFF: u64 = MIB;
const P1_LEN: u64 = 16 * MIB;
/// p2 (the PV): right after p1, 78 MiB, leaving the last MiB to the
/// backup GPT.
const P2_OFF: u64 = P1_OFF + P1_LEN;
const P2_LEN: u64 = 78 * MIB;
const DISK: u64 = P2_OFF + P2_LEN + MIB;
/// LV sizes: `root` is made with the first part, `swap` after it, then
/// `root` grows by the second part (a segment after `swap`'s).
const ROOT_FIRST: u64 = 12 * MIB;
const ROOT_SECOND: u64 = 14 * MIB;
const SWAP_LEN: u64 = 8 * MIB;
const VG: &str = "vg0";
/// A file bigger than the first segment, so its data lies in both.
const BIG_LEN: usize = 15 << 20;

/// One segment of an LV as `lvs --segments` reports it: where in the LV
/// (bytes), how long, and the first physical extent on the PV.
#[derive(Debug, Clone, Copy)]
struct Segment {
    lv_start: u64,
    len: u64,
    first_pe: u64,
}

/// The VG's layout on p2: where extents start on the PV, how big they
/// are, and each LV's segments in LV order.
struct Layout {
    pe_start: u64,
    extent: u64,
    root: Vec<Segment>,
    swap: Vec<Segment>,
}

impl Layout {
    /// Byte offset on the disk of a segment's first extent.
    fn disk_offset(&self, s: &Segment) -> u64 {
        P2_OFF + self.pe_start + s.first_pe * self.extent
    }
}

/// LVM under a private configuration (see the module doc) that accepts
/// only `dev`; on drop the VG and the PV label are removed again.
struct Lvm {
    dir: PathBuf,
    dev: String,
}

impl Lvm {
    fn new(dir: PathBuf, dev: &str) -> Lvm {
        std::fs::create_dir_all(dir.join("locks")).unwrap();
        let conf = format!(
            "devices {{ use_devicesfile = 0 obtain_device_list_from_udev = 0 hints = \"none\" \
             filter = [ \"a|^{dev}$|\", \"r|.*|\" ] }}\n\
             activation {{ udev_sync = 0 udev_rules = 0 }}\n\
             global {{ locking_dir = \"{}\" }}\n\
             backup {{ backup = 0 archive = 0 }}\n",
            dir.join("locks").display()
        );
        std::fs::write(dir.join("lvm.conf"), conf).unwrap();
        Lvm {
            dir,
            dev: dev.to_string(),
        }
    }

    fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new(cmd);
        c.env("LVM_SYSTEM_DIR", &self.dir)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1");
        c
    }

    /// Runs an LVM command; panics with its output unless it succeeds.
    fn cmd(&self, cmd: &str, args: &[&str]) -> Vec<u8> {
        run(self.command(cmd).args(args)).stdout
    }

    /// `lvcreate`/`lvextend` without device-mapper: nothing is activated
    /// or zeroed (there is no LV device to do it through).
    fn lv(&self, cmd: &str, args: &[&str]) {
        let mut all = vec!["--driverloaded", "n"];
        if cmd == "lvcreate" {
            all.extend(["-an", "-Zn", "-Wn", "-y"]);
        }
        all.extend_from_slice(args);
        self.cmd(cmd, &all);
    }

    /// The rows of a JSON report (`pvs`, `vgs`, `lvs --segments`), in bytes.
    fn report(&self, cmd: &str, fields: &str, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec![
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ];
        args.extend_from_slice(extra);
        let out = self.cmd(cmd, &args);
        let v: serde_json::Value = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{cmd} report: {e}: {}", String::from_utf8_lossy(&out)));
        let report = v["report"][0].as_object().cloned().unwrap_or_default();
        report
            .values()
            .find_map(|r| r.as_array().cloned())
            .unwrap_or_default()
    }

    /// Where the VG's extents and `root`'s and `swap`'s segments lie.
    fn layout(&self) -> Layout {
        let num = |v: &serde_json::Value, k: &str| -> u64 {
            let s = v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"));
            s.trim().parse().unwrap_or_else(|e| panic!("{k}={s}: {e}"))
        };
        let pv = &self.report("pvs", "pv_name,pe_start", &[])[0];
        assert_eq!(pv["pv_name"], self.dev.as_str(), "{pv}");
        let vg = &self.report("vgs", "vg_extent_size", &[VG])[0];
        let extent = num(vg, "vg_extent_size");
        let segs = self.report(
            "lvs",
            "lv_name,seg_start,seg_size,seg_pe_ranges",
            &["--segments", VG],
        );
        let of = |lv: &str| {
            let mut out: Vec<Segment> = segs
                .iter()
                .filter(|s| s["lv_name"] == lv)
                .map(|s| {
                    // "/dev/loopN:first-last": one PV, linear.
                    let ranges = s["seg_pe_ranges"].as_str().unwrap().trim();
                    let (dev, pes) = ranges.rsplit_once(':').unwrap();
                    assert_eq!(dev, self.dev, "{s}");
                    let (first, last) = pes.split_once('-').unwrap();
                    let first_pe: u64 = first.parse().unwrap();
                    let last_pe: u64 = last.parse().unwrap();
                    let len = num(s, "seg_size");
                    assert_eq!(len, (last_pe - first_pe + 1) * extent, "{s}");
                    Segment {
                        lv_start: num(s, "seg_start"),
                        len,
                        first_pe,
                    }
                })
                .collect();
            out.sort_by_key(|s| s.lv_start);
            out
        };
        Layout {
            pe_start: num(pv, "pe_start"),
            extent,
            root: of("root"),
            swap: of("swap"),
        }
    }
}

impl Drop for Lvm {
    fn drop(&mut self) {
        // Only the test's disk file holds LVM state (its PV label and VG
        // metadata); remove them so that nothing of the VG outlives the
        // loop device, even when the test failed half way.
        for (cmd, args) in [
            ("vgremove", vec!["-ff", "-y", VG]),
            ("pvremove", vec!["-ff", "-y", self.dev.as_str()]),
        ] {
            let _ = run_unchecked(self.command(cmd).args(&args));
        }
    }
}

/// The guest's root tree: os-release (so `files` points at it), text
/// files, a symlink, a hard link, an xattr and a file bigger than the LV's
/// first segment.
fn make_root_tree(dir: &Path) {
    let w = |p: &str, data: &[u8]| {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
    };
    w(
        "etc/os-release",
        b"ID=fedora\nPRETTY_NAME=\"snaptree lvm test\"\n",
    );
    w("etc/motd", b"root on lvm\n");
    w("home/alice/notes.txt", b"two segments, one filesystem\n");
    w("home/alice/big.bin", &pattern(21, BIG_LEN));
    std::os::unix::fs::symlink("../etc/motd", dir.join("home/motd-link")).unwrap();
    std::fs::hard_link(dir.join("etc/motd"), dir.join("home/alice/motd-hard")).unwrap();
    set_user_xattr(&dir.join("home/alice/notes.txt"), "user.origin", b"lvm");
}

fn set_user_xattr(p: &Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: the strings are NUL-terminated and the value is valid for
    // its length.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Copies `len` bytes at `from` of `src` to `to` of `dst`, with `dd`.
fn dd(src: &Path, from: u64, dst: &Path, to: u64, len: u64) {
    sh(
        "dd",
        &format!(
            "dd if='{}' of='{}' bs=1M iflag=skip_bytes,count_bytes oflag=seek_bytes \
             skip={from} seek={to} count={len} conv=notrunc status=none",
            src.display(),
            dst.display()
        ),
    );
}

/// What the disk was made of, kept to judge the mount with.
struct Made {
    root_img: PathBuf,
    swap_img: PathBuf,
    layout: Layout,
}

/// Builds the disk in scratch space and converts it to `base.qcow2`;
/// the LVM state and the loop device are gone when this returns.
fn make_disk(ws: &Workspace) -> Made {
    let disk = ws.scratch("disk.img");
    let (boot_img, root_img, swap_img) = (
        ws.scratch("boot.img"),
        ws.scratch("root.img"),
        ws.scratch("swap.img"),
    );
    let (boot_tree, root_tree) = (ws.scratch("boot-tree"), ws.scratch("root-tree"));
    std::fs::create_dir_all(boot_tree.join("grub")).unwrap();
    std::fs::write(
        boot_tree.join("grub/grub.cfg"),
        b"set root=(lvm/vg0-root)\n",
    )
    .unwrap();
    std::fs::write(boot_tree.join("vmlinuz"), pattern(22, 300_000)).unwrap();
    make_root_tree(&root_tree);
    sh(
        "partition and make the filesystems",
        &format!(
            "truncate -s {DISK} {d}
             sgdisk -n1:{p1s}:+{p1k}K -t1:8300 -c1:boot -n2:{p2s}:+{p2k}K -t2:8e00 -c2:lvm {d} >/dev/null
             mkfs.ext4 -q -F -L boot -d {bt} {b} {p1k}K
             mkfs.ext4 -q -F -L lvroot -d {rt} {r} {rk}K
             truncate -s {SWAP_LEN} {s}
             mkswap -L swap0 {s} >/dev/null",
            d = disk.display(),
            b = boot_img.display(),
            r = root_img.display(),
            s = swap_img.display(),
            bt = boot_tree.display(),
            rt = root_tree.display(),
            p1s = P1_OFF / 512,
            p1k = P1_LEN / 1024,
            p2s = P2_OFF / 512,
            p2k = P2_LEN / 1024,
            rk = (ROOT_FIRST + ROOT_SECOND) / 1024,
        ),
    );
    dd(&boot_img, 0, &disk, P1_OFF, P1_LEN);
    let dev = LoopDev::new(&disk, P2_OFF, P2_LEN);
    let layout = {
        let lvm = Lvm::new(ws.scratch("lvm"), &dev.0);
        lvm.cmd("pvcreate", &["-y", &dev.0]);
        lvm.cmd("vgcreate", &["-s", "1M", VG, &dev.0]);
        let mib = |b: u64| format!("{}M", b / MIB);
        lvm.lv("lvcreate", &["-L", &mib(ROOT_FIRST), "-n", "root", VG]);
        lvm.lv("lvcreate", &["-L", &mib(SWAP_LEN), "-n", "swap", VG]);
        let plus = format!("+{}", mib(ROOT_SECOND));
        lvm.lv("lvextend", &["-L", &plus, &format!("{VG}/root")]);
        let layout = lvm.layout();
        // Each LV's bytes, segment by segment, where LVM put its extents
        // (written to the disk file, not through the loop device).
        for (img, segs) in [(&root_img, &layout.root), (&swap_img, &layout.swap)] {
            for s in segs {
                dd(img, s.lv_start, &disk, layout.disk_offset(s), s.len);
            }
        }
        // The tree keeps its own copy; LVM's guard then wipes the scratch disk.
        ws.qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            disk.to_str().unwrap(),
            "base.qcow2",
        ]);
        layout
    };
    drop(dev);
    Made {
        root_img,
        swap_img,
        layout,
    }
}

/// Loop devices whose backing file lies in the workspace.
fn workspace_loops(ws: &Workspace) -> Vec<String> {
    let o = run(Command::new("losetup").arg("-a"));
    let root = ws.root().to_string_lossy().into_owned();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(&root))
        .map(str::to_string)
        .collect()
}

#[test]
fn an_lvm_root_in_two_segments_is_browsable_and_matches_the_kernel() {
    let Some(ws) = workspace() else { return };
    if !kernel_judge() {
        return;
    }
    for t in [
        "sgdisk",
        "pvcreate",
        "lvcreate",
        "mkswap",
        "mkfs.ext4",
        "losetup",
    ] {
        if !have(t) {
            skip(&format!(
                "{t} not installed (gdisk, lvm2, util-linux, e2fsprogs)"
            ));
            return;
        }
    }
    let made = make_disk(&ws);
    let layout = &made.layout;
    assert_eq!(layout.root.len(), 2, "root's segments: {:?}", layout.root);
    assert_eq!(layout.swap.len(), 1, "swap's segments: {:?}", layout.swap);
    // root's second segment comes after swap's on the PV.
    assert!(layout.root[1].first_pe > layout.swap[0].first_pe);

    let Some(m) = ws.mount(&[]) else { return };
    let point = m.mnt.join("base");
    let link = std::fs::read_link(point.join("files")).expect("files link");
    assert_eq!(link, Path::new("fs/vg0-root"));
    assert_eq!(read_text(&point.join("files/etc/motd")), "root on lvm\n");

    let index = read_json(&point.join("volumes/index.json")).expect("index.json");
    assert_eq!(index["problems"], serde_json::json!([]), "{index}");
    let vols = index["volumes"].as_array().expect("volumes").clone();
    let names: Vec<&str> = vols.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["p1", "p2", "vg0-root", "vg0-swap"], "{index}");
    let by_name = |n: &str| vols.iter().find(|v| v["name"] == n).cloned().unwrap();
    let (p1, p2) = (by_name("p1"), by_name("p2"));
    assert_eq!(
        (&p1["filesystem"], &p1["label"], &p1["browsable"]),
        (&"ext4".into(), &"boot".into(), &true.into()),
        "{index}"
    );
    assert_eq!(p1["ranges"][0]["offset"], P1_OFF, "{index}");
    assert_eq!(p2["filesystem"], "LVM2_member", "{index}");
    assert_eq!(p2["browsable"], false, "{index}");
    assert!(
        p2["why_not"].as_str().is_some_and(|w| !w.is_empty()),
        "{index}"
    );
    assert_eq!(
        (&p2["ranges"][0]["offset"], &p2["ranges"][0]["length"]),
        (&P2_OFF.into(), &P2_LEN.into()),
        "{index}"
    );

    // The LVs lie where LVM put their extents, in LV order.
    let ranges = |segs: &[Segment]| -> serde_json::Value {
        segs.iter()
            .map(|s| serde_json::json!({"offset": layout.disk_offset(s), "length": s.len}))
            .collect()
    };
    let root = by_name("vg0-root");
    assert_eq!(root["source"], "lvm", "{index}");
    assert_eq!(root["ranges"], ranges(&layout.root), "{index}");
    assert_eq!(root["size"], ROOT_FIRST + ROOT_SECOND, "{index}");
    assert_eq!(root["filesystem"], "ext4", "{index}");
    assert_eq!(root["label"], "lvroot", "{index}");
    assert_eq!(root["browsable"], true, "{index}");
    let swap = by_name("vg0-swap");
    assert_eq!(swap["source"], "lvm", "{index}");
    assert_eq!(swap["ranges"], ranges(&layout.swap), "{index}");
    assert_eq!(swap["filesystem"], "swap", "{index}");
    assert_eq!(swap["browsable"], false, "{index}");
    assert!(
        swap["why_not"].as_str().is_some_and(|w| !w.is_empty()),
        "{index}"
    );

    // The LVs' bytes, put together again from their segments.
    let root_raw = point.join("volumes/vg0-root.raw");
    let want_root = std::fs::read(&made.root_img).unwrap();
    assert_bytes_eq(
        "vg0-root.raw",
        &std::fs::read(&root_raw).unwrap(),
        &want_root,
    );
    assert_bytes_eq(
        "vg0-swap.raw",
        &std::fs::read(point.join("volumes/vg0-swap.raw")).unwrap(),
        &std::fs::read(&made.swap_img).unwrap(),
    );
    // The big file crosses from the first segment into the second.
    assert_eq!(
        std::fs::read(point.join("fs/vg0-root/home/alice/big.bin")).unwrap(),
        pattern(21, BIG_LEN)
    );

    // The kernel reading copies of the volumes is the judge of fs/.
    let want = kernel_view(&ws, &root_raw, "vg0-root");
    assert!(want.keys().any(|p| p.ends_with("motd-hard")), "{want:?}");
    assert_trees_eq(
        "fs/vg0-root",
        &snapshot_tree(&point.join("fs/vg0-root")),
        &want,
    );
    let want = kernel_view(&ws, &point.join("volumes/p1.raw"), "p1");
    assert_trees_eq("fs/p1", &snapshot_tree(&point.join("fs/p1")), &want);
    m.unmount();

    let clean = wait_until(std::time::Duration::from_secs(10), || {
        workspace_loops(&ws).is_empty()
    });
    assert!(clean, "loop devices left: {:?}", workspace_loops(&ws));
}
