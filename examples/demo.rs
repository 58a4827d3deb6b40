//! A two-minute tour: builds a small snapshot tree with qemu-img (a base,
//! two snapshots, a leaf and a clone), shows what the chain engine sees,
//! then mounts the tree so you can look around with `ls`, `cat` and `cp`.
//!
//! Run: `cargo run --release --example demo` (needs qemu-img, qemu-io and
//! /dev/fuse; root or a user allowed to mount FUSE). Ctrl-C unmounts.
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let no_wait = std::env::args().any(|a| a == "--no-wait");
    let tmp = std::env::temp_dir().join(format!("snaptree-demo-{}", std::process::id()));
    let images = tmp.join("images");
    let mnt = tmp.join("mnt");
    std::fs::create_dir_all(&images)?;
    std::fs::create_dir_all(&mnt)?;
    let d = images.as_path();
    println!("building a demo tree in {}", d.display());
    run(
        d,
        &["qemu-img", "create", "-q", "-f", "raw", "base.raw", "64M"],
    )?;
    run(
        d,
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xaa 0 8M",
            "base.raw",
        ],
    )?;
    let mut parent = ("base.raw", "raw");
    for (i, name) in ["monday.qcow2", "tuesday.qcow2", "leaf.qcow2"]
        .iter()
        .enumerate()
    {
        run(
            d,
            &[
                "qemu-img", "create", "-q", "-f", "qcow2", "-b", parent.0, "-F", parent.1, name,
            ],
        )?;
        let cmd = format!("write -P {} {}M 4M", i + 1, 4 * i + 2);
        run(d, &["qemu-io", "-c", &cmd, name])?;
        parent = (name, "qcow2");
    }
    run(
        d,
        &[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "monday.qcow2",
            "-F",
            "qcow2",
            "experiment.qcow2",
        ],
    )?;

    let chain = Chain::open(d.join("leaf.qcow2"), &OpenOptions::default())?;
    println!("\nthe chain of leaf.qcow2, and where each range of its disk comes from:");
    for r in chain.map(0, chain.size())? {
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
    drop(chain);

    let opts = TreeOptions {
        read_only: false,
        allow_external_backing: false,
        max_depth: 1024,
        import: snaptree::memory::checkpoint::Throttle::DEFAULT,
        reserved_names: snaptree::fs::reserved_names(),
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
    println!(
        "  cmp {0}/monday/disk.raw {0}/experiment/disk.raw",
        mnt.display()
    );
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
