//! `snaptree checkpoint import`: a memory source (QEMU migration stream,
//! libvirt save image, ELF core, raw dump) imported offline as a
//! page-delta checkpoint of one snapshot point, throttled, with a
//! progress bar and the per-import figures live migration logs.

use super::{ChainArgs, CliResult};
use crate::memory::checkpoint::Throttle;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum CheckpointCmd {
    /// Import SOURCE as the memory checkpoint of snapshot point NAME: only
    /// the pages that differ from the parent point's checkpoint are
    /// stored (a qcow2 image with 4 KiB clusters in TREE/.snaptree-memory/
    /// backed by the parent's), and NAME/memory.raw shows it.
    Import(ImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The tree: a directory of images. Must not be mounted read-write at
    /// the same time (use `echo checkpoint SOURCE > MOUNT/NAME/ctl` then).
    tree: PathBuf,
    /// The snapshot point the memory belongs to.
    name: String,
    /// The memory source: a QEMU migration stream (plain or mapped-ram), a
    /// libvirt save image, a dump-guest-memory ELF core or a raw dump.
    source: PathBuf,
    /// Pages compared and written between two pauses.
    #[arg(long, value_name = "N", default_value_t = Throttle::DEFAULT.block_pages)]
    block_pages: u64,
    /// Pause after each block of pages, in milliseconds (0 = full speed).
    #[arg(long, value_name = "MS", default_value_t = Throttle::DEFAULT.wait_ms)]
    wait_ms: u64,
    /// Never show a progress bar (it is shown only on a terminal anyway).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

pub fn run(cmd: CheckpointCmd) -> CliResult {
    let CheckpointCmd::Import(a) = cmd;
    if a.block_pages == 0 {
        return Err("--block-pages must be at least 1".into());
    }
    let engine = a.chain.open_tree(&a.tree)?;
    let tree = engine.tree();
    let point = tree
        .lookup(&a.name)
        .ok_or_else(|| format!("no snapshot point named {:?}", a.name))?;
    let source = a
        .source
        .canonicalize()
        .map_err(|e| format!("{}: {e}", a.source.display()))?;
    let bar = if a.quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} pages, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("importing {}", source.display()));
    let throttle = Throttle {
        block_pages: a.block_pages,
        wait_ms: a.wait_ms,
    };
    let stats = tree
        .checkpoint(
            point.id,
            &source.to_string_lossy(),
            false,
            throttle,
            &mut |s| {
                bar.set_length(s.pages_total);
                bar.set_position(s.pages_done);
                true
            },
        )
        .map_err(|e| e.message);
    bar.finish_and_clear();
    let stats = stats?;
    let mem = point.memory.read();
    let file = mem.as_ref().map_or("?".into(), |m| m.source.clone());
    println!(
        "{}: memory checkpoint {file}: {} pages: {} stored, {} skipped (same as parent), {} zero; {:.1} s, {}/s",
        a.name,
        stats.pages_total,
        stats.stored,
        stats.skipped,
        stats.zero,
        stats.elapsed_ms as f64 / 1000.0,
        crate::units::human_size(stats.rate() as u64)
    );
    Ok(())
}
