//! Sequential read throughput of a flattened qcow2 chain as the chain grows
//! deeper, against QEMU reading the same chain.
//!
//! ARCHITECTURE.md ("The read path") promises that, through the resolution index, once a region has
//! been looked at a lookup costs the same at chain depth 64 as at depth 1
//! (goal: reading a 1 GiB flattened disk at depth 64 at >= 95 % of depth
//! 1), and its "Performance notes" put qemu-storage-daemon's FUSE export at
//! about half speed at depth 32. This benchmark measures both on one
//! machine in one run, on two layouts of a virtual disk of 1 GiB (or
//! `SNAPTREE_BENCH_SIZE_MB` MiB), each at depths 1, 16 and 64, built with
//! `qemu-img create` and one `qemu-io` session (see `build.rs`):
//!
//! 1. "same bytes, deeper chain", the goal's measure: one base image holds
//!    every byte of the disk (written once); each layer above it holds one
//!    64 KiB zero cluster of its own per 512 MiB of disk (the span of one
//!    L2 table), spread over the disk, so it has real L2 tables and every
//!    region is resolved down through all of them (zero, not data,
//!    clusters: see `build.rs`). The chains of all depths are one stack
//!    over that one base file, so the bytes read from the disk are those of
//!    the base at every depth (less the zero clusters, 0.8 % of the disk at
//!    depth 64) and only resolution differs.
//! 2. "data spread over layers", the realistic case: layer `k` of `d` owns
//!    every `d`-th 1 MiB stripe, with 64 KiB overwrites from higher layers.
//!    A sequential read hops over all `d` files, and the kernel's
//!    readahead and page cache cost grows with that: the "pread replay"
//!    control (below) shows how much.
//!
//! Every byte of every chain is verified, untimed, against `qemu-img convert
//! -O raw` and the model of what was written; every timed snaptree and qsd
//! pass checks one byte per 64 KiB, so a fast but wrong path cannot score.
//!
//! Each chain is read whole, each pass cold (page cache dropped with
//! `/proc/sys/vm/drop_caches`, if root) unless said otherwise, with:
//!
//! 1. snaptree: `Chain::open` plus `read_at` in 1 MiB calls, then warm
//!    passes on the same chain (index and page cache warm; the fastest of
//!    three counts, as a warm pass is short enough for one preemption to
//!    skew it);
//! 2. `qemu-img bench -d 1 -s 1M -S 1M`: QEMU's block layer reading the chain
//!    1 MiB at a time with one request in flight and writing nothing, the
//!    like-for-like peer of (1); and `qemu-img convert -n` into a `null-co`
//!    target (8 coroutines, output discarded);
//! 3. `qemu-storage-daemon --export type=fuse` of the chain (a fresh daemon
//!    per pass), read through the mount with 1 MiB `read`s; needs root and
//!    /dev/fuse, else `SKIP qsd: <reason>`. The daemon is stopped by its pid
//!    and its mount removed by a guard that also runs on errors;
//! 4. the "pread replay": the exact preads snaptree issues (from the
//!    resolver the index uses) run by a bare loop, which is what the kernel
//!    and the disk cost without snaptree (cold, then warm like (1)).
//!
//! Each of the `SNAPTREE_BENCH_RUNS` (default 3) runs measures every tool
//! on every depth of a layout, one depth after another (starting with a
//! different depth each run), so drifting load hits all alike; every run
//! is printed and the summaries show medians, and depth 64 against depth 1
//! per run too. Before each chain's turn in a run, its files are read once,
//! untimed: the hypervisor caches what the guest reads, so otherwise the
//! first tool to read a chain after the others were read pays for the
//! disk below and the rest do not. A breakdown of snaptree's time (open,
//! resolution with metadata cold and warm, a fresh index over a warm page
//! cache) follows. The storage of a VM is noisy: look at the spread.
//!
//! Images live in a temp dir under /var/tmp (a real disk, not tmpfs, so
//! "cold" means the disk; the hypervisor's cache below it is out of reach),
//! removed at the end unless `SNAPTREE_BENCH_KEEP=1`. Run: `cargo bench
//! --bench chain_depth`. Outside `cargo bench` (e.g. `cargo test
//! --all-targets`) it does nothing: it drops the whole machine's page cache,
//! which a test run should not do.

mod build;
mod measure;
mod qsd;
mod report;
mod util;

use measure::Target;
use report::Layout;
use std::error::Error;
use std::path::Path;
use std::time::Instant;
use util::{env_u64, is_tmpfs, loadavg, which};

type R<T> = Result<T, Box<dyn Error>>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Granularity of overwrites and of the model (the qcow2 cluster size).
const CHUNK: u64 = 64 * KIB;
/// Size of every read, ours and the peers'.
const READ: u64 = MIB;
/// Guest bytes per resolution-index region (`snaptree::chain::index::REGION`).
const REGION: u64 = snaptree::chain::index::REGION;
const DEPTHS: [usize; 3] = [1, 16, 64];
const DEEPEST: usize = DEPTHS[DEPTHS.len() - 1];

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("chain_depth: not run by `cargo bench`; skipping (it drops the page cache)");
        return;
    }
    if let Err(e) = run() {
        eprintln!("chain_depth: {e}");
        std::process::exit(1);
    }
}

pub struct Config {
    size: u64,
    runs: usize,
    root: bool,
}

fn run() -> R<()> {
    let started = Instant::now();
    let cfg = Config {
        size: env_u64("SNAPTREE_BENCH_SIZE_MB", 1024)? * MIB,
        runs: env_u64("SNAPTREE_BENCH_RUNS", 3)? as usize,
        root: unsafe { libc::geteuid() } == 0,
    };
    for tool in ["qemu-img", "qemu-io"] {
        which(tool).ok_or_else(|| format!("{tool} is not on PATH; it builds the chains"))?;
    }
    let keep = std::env::var_os("SNAPTREE_BENCH_KEEP").is_some_and(|v| v != "0");
    let tmp = tempfile::Builder::new()
        .prefix("snaptree-bench-")
        .tempdir_in("/var/tmp")?;
    println!(
        "chain_depth: {} MiB virtual disk, depths {:?}, 1 MiB sequential reads, median of {} cold run(s), in {}",
        cfg.size / MIB,
        DEPTHS,
        cfg.runs,
        tmp.path().display()
    );
    println!("load average at start: {}", loadavg());
    if is_tmpfs(tmp.path()) {
        println!("note: /var/tmp is tmpfs here, so \"cold\" reads come from RAM");
    }
    if !cfg.root {
        println!("note: not root, page cache not dropped: \"cold\" is whatever the cache holds");
    }
    let mut qsd_skip = qsd::available().err();
    if let Some(why) = &qsd_skip {
        println!("SKIP qsd: {why}");
    }

    // Layout 1: one base, all depths stacked on it.
    let t = Instant::now();
    let dir = tmp.path().join("same");
    std::fs::create_dir(&dir)?;
    let built = build::build_shared(&dir, cfg.size, &DEPTHS)?;
    let targets = built
        .into_iter()
        .map(|b| Target::new(b, cfg.size))
        .collect::<R<Vec<_>>>()?;
    let above = targets.last().map_or(0, |t| t.model.above_base());
    println!(
        "same bytes: base and {} layers above it built in {:.1} s",
        DEEPEST - 1,
        t.elapsed().as_secs_f64()
    );
    let mut same = Layout {
        title: "layout 1: same bytes, deeper chain (the goal's measure)",
        note: format!(
            "base.qcow2 holds all {} MiB; each layer above holds {} zero cluster(s) of 64 KiB of its own; \
             at depth {} they cover {:.1} MiB ({:.1} % of the disk, read as zeros, not from the base)",
            cfg.size / MIB,
            build::own_per_layer(cfg.size),
            DEEPEST,
            above as f64 / MIB as f64,
            100.0 * above as f64 / cfg.size as f64
        ),
        goal: true,
        size: cfg.size,
        targets,
    };
    measure_layout(&cfg, tmp.path(), &mut same, &mut qsd_skip)?;
    if !keep {
        std::fs::remove_dir_all(&dir)?;
    }

    // Layout 2: one striped chain per depth.
    let t = Instant::now();
    let dir = tmp.path().join("striped");
    let mut targets = Vec::new();
    for depth in DEPTHS {
        let d = dir.join(format!("d{depth}"));
        std::fs::create_dir_all(&d)?;
        targets.push(Target::new(
            build::build_striped(&d, depth, cfg.size)?,
            cfg.size,
        )?);
    }
    let above = targets.last().map_or(0, |t| t.model.above_base());
    println!(
        "data spread over layers: chains of depth {:?} built in {:.1} s",
        DEPTHS,
        t.elapsed().as_secs_f64()
    );
    let mut striped = Layout {
        title: "layout 2: data spread over layers (striped)",
        note: format!(
            "layer k of d owns every d-th 1 MiB stripe, plus 64 KiB overwrites from above; \
             at depth {} the layers above the base serve {:.0} MiB ({:.1} % of the disk)",
            DEEPEST,
            above as f64 / MIB as f64,
            100.0 * above as f64 / cfg.size as f64
        ),
        goal: false,
        size: cfg.size,
        targets,
    };
    measure_layout(&cfg, tmp.path(), &mut striped, &mut qsd_skip)?;

    println!();
    println!("==================== summary ====================");
    println!(
        "{} MiB disk, median of {} run(s), 1 MiB sequential reads",
        cfg.size / MIB,
        cfg.runs
    );
    for layout in [&same, &striped] {
        report::print_summary(layout, qsd_skip.is_none());
    }
    report::print_legend();
    if keep {
        println!("kept {} (SNAPTREE_BENCH_KEEP)", tmp.keep().display());
    } else {
        tmp.close()?;
    }
    println!(
        "total time {:.1} s; load average at end: {} (other work on the machine skews cold numbers)",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}

/// Runs every tool `cfg.runs` times over every chain of `layout`, then
/// measures the breakdown and verifies each chain (the flat copy for
/// that goes into `scratch`), and prints every run.
fn measure_layout(
    cfg: &Config,
    scratch: &Path,
    layout: &mut Layout,
    qsd_skip: &mut Option<String>,
) -> R<()> {
    let n = layout.targets.len();
    for run in 0..cfg.runs {
        let t = Instant::now();
        for i in 0..n {
            layout.targets[(i + run) % n].run_once(cfg, qsd_skip)?;
        }
        println!(
            "{}: run {}/{} in {:.1} s",
            layout.title,
            run + 1,
            cfg.runs,
            t.elapsed().as_secs_f64()
        );
    }
    for t in &mut layout.targets {
        t.measure_parts(cfg)?;
        t.verify(&scratch.join("flat.raw"), cfg.size)?;
        println!(
            "depth {}: verified every byte against qemu-img convert -O raw and the model",
            t.depth
        );
    }
    report::print_runs(layout);
    Ok(())
}
