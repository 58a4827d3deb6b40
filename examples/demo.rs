//! A two-minute tour: builds a small snapshot chain with qemu-img (a raw
//! base, two qcow2 snapshots, a leaf), then shows what snaptree sees:
//! the chain, which layer provides each range, and that the flattened
//! disk equals `qemu-img convert -O raw`.
//!
//! Run: `cargo run --release --example demo` (needs qemu-img and qemu-io).

use snaptree::chain::{resolve::Source, Chain, OpenOptions};
use std::path::Path;
use std::process::Command;

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
    let tmp = std::env::temp_dir().join(format!("snaptree-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let d = tmp.as_path();
    println!("building a demo chain in {}", d.display());
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

    let chain = Chain::open(d.join("leaf.qcow2"), &OpenOptions::default())?;
    println!("\nchain (leaf first):");
    for (depth, layer) in chain.layers().iter().enumerate() {
        println!(
            "  [{depth}] {} ({})",
            layer.path().display(),
            layer.format().name()
        );
    }
    println!("\nwhere each range of the flattened disk comes from:");
    for r in chain.map(0, chain.size())? {
        let what = match r.source {
            Source::Data { .. } => "data",
            Source::DataHole { .. } => "data (hole in the file)",
            Source::Compressed { .. } => "compressed",
            Source::Zero => "zero",
            Source::Unallocated => "unallocated",
        };
        println!(
            "  {:>10} +{:>10}  depth {}  {what}",
            r.start, r.len, r.depth
        );
    }
    let mut flat = vec![0u8; chain.size() as usize];
    chain.read_at(&mut flat, 0)?;
    run(
        d,
        &["qemu-img", "convert", "-O", "raw", "leaf.qcow2", "qemu.raw"],
    )?;
    let same = std::fs::read(d.join("qemu.raw"))? == flat;
    println!("\nflattened disk equals `qemu-img convert -O raw`: {same}");
    println!(
        "try: snaptree info {0}/leaf.qcow2; snaptree map {0}/leaf.qcow2",
        d.display()
    );
    if !same {
        return Err("flattened disk differs from qemu-img's".into());
    }
    Ok(())
}
