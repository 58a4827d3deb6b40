//! `snaptree merge`: the merge engine offline. Coalesces every hidden
//! point that has one child (or deletes point NAME and coalesces it), at
//! full speed, with a progress bar on a terminal. Also finishes a merge a
//! crash interrupted.

use super::{ChainArgs, CliResult};
use crate::merge::{Engine, Throttle};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The tree: a directory of images, or one leaf image. Must not be
    /// mounted read-write at the same time (image locks refuse it).
    source: PathBuf,
    /// Delete this snapshot point first (hidden if it has children), then
    /// coalesce. Without NAME, only points deleted earlier are coalesced.
    name: Option<String>,
    /// Never show a progress bar (it is shown only on a terminal anyway).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

pub fn run(a: MergeArgs) -> CliResult {
    let engine = Arc::new(a.chain.open_tree(&a.source)?);
    let tree = engine.tree();
    let done = Arc::new(AtomicBool::new(false));
    let bar = (!a.quiet && std::io::stderr().is_terminal()).then(|| {
        let t = engine.clone();
        let done = done.clone();
        std::thread::spawn(move || show_progress(&t, &done))
    });
    let result = match &a.name {
        Some(name) => {
            let p = tree
                .lookup(name)
                .ok_or_else(|| format!("no snapshot point named {name:?}"))?;
            engine.merge_point(p.id)
        }
        None => engine.merge_all(&Throttle::full()),
    };
    done.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.join();
    }
    let summary = result.map_err(|e| e.message)?;
    tree.flush_all().map_err(|e| e.message)?;
    println!("{}", summary.describe());
    Ok(())
}

fn show_progress(engine: &Engine, done: &AtomicBool) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    while !done.load(Ordering::Relaxed) {
        if let Some((what, d, t)) = engine.current() {
            bar.set_message(what);
            bar.set_length(t);
            bar.set_position(d.min(t));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}
