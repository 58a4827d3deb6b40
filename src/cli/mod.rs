//! The `snaptree` command line: argument parsing and dispatch. Each
//! subcommand lives in its own module; all print errors as
//! `snaptree: error: ...` and exit 1 (never a panic on bad input).

mod checkpoint;
mod export;
mod info;
mod map;
mod merge;
mod mount;

use crate::chain::{Chain, OpenOptions, DEFAULT_MAX_DEPTH};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub type CliResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// snaptree: a VM's snapshot tree (qcow2 backing chains) as plain files.
///
/// Mount a tree of snapshots, inspect a chain, print its allocation map, or
/// export the disk as it is at any image of the chain.
#[derive(Parser, Debug)]
#[command(name = "snaptree", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show the backing chain of IMAGE: one entry per layer (file, format,
    /// version, sizes, bytes held, backing reference, features, internal
    /// snapshots).
    Info(info::InfoArgs),
    /// Print which layer provides each range of the flattened disk, in the
    /// shape of `qemu-img map`.
    Map(map::MapArgs),
    /// Write the flattened disk of IMAGE (its whole chain resolved) to OUT
    /// as a standalone raw (sparse) or qcow2 image.
    Export(export::ExportArgs),
    /// Mount a snapshot tree: one directory per snapshot point, each with
    /// its disk as a flat file (`disk.raw`), `info.json`, a `ctl` file and
    /// a `parent` link; `tree`, `status` and `merge-now` at the top.
    Mount(mount::MountArgs),
    /// Coalesce hidden snapshot points into their only child, offline
    /// (the tree must not be mounted): every visible point reads the same
    /// bytes before, during and after, also if the merge is interrupted.
    Merge(merge::MergeArgs),
    /// Memory checkpoints of snapshot points.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCmd),
}

/// How to open a chain; shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct ChainArgs {
    /// Follow backing references that point outside IMAGE's directory.
    /// Off by default so a crafted image cannot pull in arbitrary host
    /// files.
    #[arg(long)]
    pub allow_external_backing: bool,
    /// Refuse chains with more layers than this.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH, value_name = "N")]
    pub max_depth: usize,
}

impl ChainArgs {
    pub fn open(&self, image: &PathBuf) -> CliResult<Chain> {
        let opts = OpenOptions {
            writable: false,
            allow_external_backing: self.allow_external_backing,
            max_depth: self.max_depth,
        };
        Ok(Chain::open(image, &opts)?)
    }

    /// Opens the tree at `source` read-write for an offline command,
    /// with its merge engine (no background merges; the open finishes a
    /// merge a crash interrupted), printing the problems found.
    pub fn open_tree(&self, source: &std::path::Path) -> CliResult<crate::merge::Engine> {
        let engine = crate::merge::Engine::open(
            source,
            crate::tree::TreeOptions {
                read_only: false,
                allow_external_backing: self.allow_external_backing,
                max_depth: self.max_depth,
                import: crate::memory::checkpoint::Throttle::DEFAULT,
                reserved_names: crate::fs::reserved_names(),
                records: None,
            },
            crate::merge::BackgroundMergeSettings {
                idle: None,
                ..Default::default()
            },
        )?;
        for p in engine.tree().problems() {
            eprintln!("snaptree: {p}");
        }
        Ok(engine)
    }
}

/// Parses the arguments, runs the command, returns the exit code.
pub fn run() -> i32 {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SNAPTREE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    crate::fdlimit::raise();
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Map(a) => map::run(a),
        Command::Export(a) => export::run(a),
        Command::Mount(a) => mount::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Checkpoint(c) => checkpoint::run(c),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("snaptree: error: {e}");
            1
        }
    }
}

pub use crate::units::human_size;
