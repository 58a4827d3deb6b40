//! A two-minute tour: builds a small snapshot tree with qemu-img (a base,
//! two snapshots, a leaf and a clone) whose disks hold a guest (GPT, EFI
//! partition, ext4 root) with files that change from point to point,
//! shows what the chain engine sees, then mounts the tree so you can look
//! around with `ls`, `cat`, `diff` and `cp`.
//!
//! Run: `cargo run --release --example demo` (needs qemu-img, sgdisk,
//! mkfs.vfat, mtools, mkfs.ext4 and /dev/fuse; root or a user allowed to
//! mount FUSE). Ctrl-C unmounts.
//! `--no-wait` mounts, prints what is there and unmounts at once.

use snaptree::chain::{resolve::Source, Chain, OpenOptions};
use snaptree::fs::{mount, MountConfig};
use snaptree::merge::Engine;
use snaptree::tree::TreeOptions;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn run(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .map_err(|e| format!("{}: {e} (is qemu-utils installed?)", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A point of the demo: its name, its parent's image, and the guest files
/// (path, text) changed since the base.
type Day = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `DIR/NAME.disk`: a 64 MiB raw disk with a GPT, an EFI system
/// partition (FAT) and an ext4 root partition holding a small Linux tree
/// with `changes` (path, text) applied. Fixed UUIDs, hash seed and time,
/// so two days' disks differ only where their files do.
fn guest_disk(dir: &Path, name: &str, changes: &[(&str, &str)]) -> Result<(), String> {
    let root = dir.join(format!("{name}-root"));
    let files: &[(&str, &str)] = &[
        ("etc/os-release", "PRETTY_NAME=\"Demo Linux\"\nID=demo\n"),
        ("etc/hostname", "demo-vm\n"),
        ("etc/motd", "Welcome.\n"),
        ("etc/nginx/nginx.conf", "worker_processes 4;\n"),
        ("home/alice/notes.txt", "buy milk\n"),
    ];
    for (p, text) in files.iter().chain(changes) {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap_or(&root)).map_err(|e| e.to_string())?;
        std::fs::write(&f, text).map_err(|e| e.to_string())?;
    }
    let disk = dir.join(format!("{name}.disk"));
    let ext = dir.join(format!("{name}.ext4"));
    let efi = dir.join(format!("{name}.efi"));
    let cfg = dir.join("grub.cfg");
    std::fs::write(&cfg, "set timeout=3\n").map_err(|e| e.to_string())?;
    let script = format!(
        "set -e
         truncate -s 64M {disk}
         sgdisk -n1:2048:+16M -t1:ef00 -c1:EFI -n2:34816:+46M -t2:8300 -c2:root {disk} >/dev/null
         mkfs.vfat -i 5eed0001 --invariant -C {efi} 16384 >/dev/null
         mmd -i {efi} ::EFI ::EFI/BOOT
         mcopy -i {efi} {cfg} ::EFI/BOOT/grub.cfg
         E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -L root -U 7e57da7a-0000-4000-8000-000000000001 -E hash_seed=7e57da7a-0000-4000-8000-000000000002 -d {root} {ext} 47104K
         dd if={efi} of={disk} bs=1M seek=1 conv=notrunc status=none
         dd if={ext} of={disk} bs=1M seek=17 conv=notrunc status=none
         rm -rf {ext} {efi} {root}",
        disk = path(&disk),
        efi = path(&efi),
        ext = path(&ext),
        cfg = path(&cfg),
        root = path(&root),
    );
    run(dir, &["sh", "-c", &script]).map_err(|e| {
        format!("{e}\n(the demo needs sgdisk, mkfs.vfat, mtools and mkfs.ext4: apt-get install gdisk dosfstools mtools e2fsprogs)")
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let no_wait = std::env::args().any(|a| a == "--no-wait");
    let tmp = std::env::temp_dir().join(format!("snaptree-demo-{}", std::process::id()));
    let images = tmp.join("images");
    let mnt = tmp.join("mnt");
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(&mnt)?;
    let d = images.as_path();
    println!("building a demo tree in {}", d.display());
    // Each point's disk is a whole guest: a GPT, an EFI partition and an
    // ext4 root made by mkfs.ext4 -d. A point's image holds only what
    // differs from its parent (`qemu-img convert -B`).
    let work = tmp.join("build");
    std::fs::create_dir_all(&work)?;
    guest_disk(&work, "base", &[])?;
    std::fs::rename(work.join("base.disk"), d.join("base.raw"))?;
    let days: [Day; 4] = [
        (
            "monday",
            "base.raw",
            &[
                ("etc/motd", "Monday: all quiet.\n"),
                ("home/alice/report.txt", "Q3 figures, first draft.\n"),
            ],
        ),
        (
            "tuesday",
            "monday.qcow2",
            &[
                ("etc/motd", "Tuesday: nginx upgraded.\n"),
                ("etc/nginx/nginx.conf", "worker_processes 8;\n"),
                ("home/alice/report.txt", "Q3 figures, final.\n"),
            ],
        ),
        (
            "leaf",
            "tuesday.qcow2",
            &[("etc/motd", "Wednesday: oops, rm -rf happened.\n")],
        ),
        (
            "experiment",
            "monday.qcow2",
            &[
                ("etc/motd", "Monday, cloned: trying a new kernel.\n"),
                ("home/alice/report.txt", "Q3 figures, first draft.\n"),
            ],
        ),
    ];
    let mut changes: Vec<(&str, &str)> = Vec::new();
    for (name, parent, edits) in days {
        if name == "experiment" {
            changes.truncate(0);
        }
        changes.extend(edits.iter().copied());
        guest_disk(&work, name, &changes)?;
        let pfmt = if parent.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        let disk = work.join(format!("{name}.disk"));
        let out = d.join(format!("{name}.qcow2"));
        run(
            d,
            &[
                "qemu-img",
                "convert",
                "-q",
                "-O",
                "qcow2",
                "-B",
                parent,
                "-F",
                pfmt,
                path(&disk),
                path(&out),
            ],
        )?;
        std::fs::remove_file(disk)?;
    }
    std::fs::remove_dir_all(&work)?;

    let chain = Chain::open(d.join("leaf.qcow2"), &OpenOptions::default())?;
    println!("\nthe chain of leaf.qcow2, and where each range of its disk comes from:");
    let map = chain.map(0, chain.size())?;
    for r in map.iter().take(12) {
        let what = match r.source {
            Source::Data { .. } => "data",
            Source::DataHole { .. } => "data (hole in the file)",
            Source::Compressed { .. } => "compressed",
            Source::Zero => "zero",
            Source::Unallocated => "unallocated",
        };
        let file = chain.layers()[r.depth as usize]
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        println!("  {:>10} +{:>10}  {file:<14} {what}", r.start, r.len);
    }
    if map.len() > 12 {
        println!(
            "  ... {} more ranges (`snaptree map` shows them all)",
            map.len() - 12
        );
    }
    drop(chain);

    let opts = TreeOptions {
        read_only: false,
        allow_external_backing: false,
        max_depth: 1024,
        import: snaptree::memory::checkpoint::Throttle::DEFAULT,
        reserved_names: snaptree::fs::reserved_names(),
        records: None,
    };
    let engine = Arc::new(Engine::open(d, opts, Default::default())?);
    let config = MountConfig {
        fs_name: d.display().to_string(),
        read_only: false,
        allow_other: false,
        allow_root: false,
        threads: 4,
    };
    let mounted = mount(engine, &mnt, &config)
        .map_err(|e| format!("mounting on {}: {e} (is /dev/fuse there?)", mnt.display()))?;
    println!("\nmounted on {}:\n", mnt.display());
    print!("{}", std::fs::read_to_string(mnt.join("tree"))?);
    println!("\ntry:");
    println!("  ls {0}  {0}/leaf", mnt.display());
    println!("  cat {}/monday/files/etc/motd", mnt.display());
    println!(
        "  diff -r {0}/monday/files/etc {0}/leaf/files/etc",
        mnt.display()
    );
    println!(
        "  cp -a {}/monday/files/home/alice/report.txt .",
        mnt.display()
    );
    println!("  cat {}/leaf/volumes/index.json", mnt.display());
    println!("  echo 'snapshot wednesday' > {}/leaf/ctl", mnt.display());
    println!(
        "  cp --sparse=always {}/tuesday/disk.raw /tmp/tuesday.raw",
        mnt.display()
    );
    let stop = Arc::new(AtomicBool::new(no_wait));
    if !no_wait {
        println!("\nCtrl-C (or `umount {}`) unmounts.", mnt.display());
        signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    }
    mounted.wait(&stop)?;
    println!("unmounted; the images stay in {}", d.display());
    Ok(())
}
