//! `snaptree info`: the chain, one entry per layer.

use super::{human_size, ChainArgs, CliResult};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// The leaf image (its backing chain is followed).
    image: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

#[derive(Serialize)]
struct LayerEntry {
    depth: usize,
    #[serde(flatten)]
    info: crate::image::LayerInfo,
    /// Guest bytes this layer itself holds (data, compressed or zero).
    allocated_bytes: u64,
}

#[derive(Serialize)]
struct InfoOut {
    virtual_size: u64,
    depth: usize,
    chain: Vec<LayerEntry>,
}

pub fn run(a: InfoArgs) -> CliResult {
    let chain = a.chain.open(&a.image)?;
    let mut entries = Vec::new();
    for (depth, layer) in chain.layers().iter().enumerate() {
        entries.push(LayerEntry {
            depth,
            info: layer.info()?,
            allocated_bytes: layer.allocated_bytes()?,
        });
    }
    let out = InfoOut {
        virtual_size: chain.size(),
        depth: entries.len(),
        chain: entries,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "chain of {} layer(s), virtual size {} ({} bytes)",
        out.depth,
        human_size(out.virtual_size),
        out.virtual_size
    );
    for e in &out.chain {
        let i = &e.info;
        println!();
        println!("[{}] {}", e.depth, i.file.display());
        let version = i.version.map(|v| format!(" v{v}")).unwrap_or_default();
        println!("    format:        {}{version}", i.format.name());
        println!(
            "    virtual size:  {} ({} bytes)",
            human_size(i.virtual_size),
            i.virtual_size
        );
        if let Some(cs) = i.cluster_size {
            println!("    cluster size:  {cs}");
        }
        println!(
            "    allocated:     {} ({} bytes) held by this layer",
            human_size(e.allocated_bytes),
            e.allocated_bytes
        );
        println!(
            "    file size:     {} ({} bytes)",
            human_size(i.file_size),
            i.file_size
        );
        match &i.backing {
            Some(b) => println!(
                "    backing:       {}{}",
                b.name,
                b.format
                    .as_ref()
                    .map(|f| format!(" (format {f})"))
                    .unwrap_or_default()
            ),
            None => println!("    backing:       none"),
        }
        if !i.features.is_empty() {
            println!("    features:      {}", i.features.join(", "));
        }
        if !i.snapshots.is_empty() {
            println!("    internal snapshots:");
            println!(
                "      {:<6} {:<20} {:>12} {:>12}",
                "ID", "NAME", "VM STATE", "DATE (s)"
            );
            for s in &i.snapshots {
                println!(
                    "      {:<6} {:<20} {:>12} {:>12}",
                    s.id, s.name, s.vm_state_size, s.date_sec
                );
            }
        }
    }
    Ok(())
}
