//! Measuring one chain: one run of every tool (snaptree cold and warm, the
//! pread replay, `qemu-img bench` and `convert`, qsd's FUSE export), the
//! breakdown of snaptree's time, and the untimed byte-for-byte check
//! against `qemu-img convert -O raw` and the model.

use crate::build::{Built, Model};
use crate::util::{drop_caches, mbps, run_cmd};
use crate::{qsd, Config, CHUNK, R, READ, REGION};
use snaptree::chain::resolve::{resolve, Source};
use snaptree::chain::{Chain, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Warm passes per run, of which the fastest counts.
const WARM_PASSES: usize = 3;

/// Throughputs of every run, MB/s.
#[derive(Default)]
pub struct Samples {
    pub snap_cold: Vec<f64>,
    pub snap_warm: Vec<f64>,
    pub replay_cold: Vec<f64>,
    pub replay_warm: Vec<f64>,
    pub qimg_bench: Vec<f64>,
    pub qimg_convert: Vec<f64>,
    pub qsd: Vec<f64>,
}

/// Where snaptree's time goes, measured once per chain.
#[derive(Default)]
pub struct Parts {
    /// `Chain::open`, page cache dropped, ms.
    pub open_ms: f64,
    /// Resolving every region afresh, L2 tables from disk / page cache, ms.
    pub resolve_cold_ms: f64,
    pub resolve_ms: f64,
    /// A pass with a fresh index over a warm page cache, MB/s.
    pub cold_index: f64,
}

/// One chain under test and what was measured on it.
pub struct Target {
    pub depth: usize,
    pub leaf: PathBuf,
    /// The layers' files, leaf first.
    files: Vec<PathBuf>,
    pub model: Model,
    /// The preads snaptree issues, per 1 MiB read.
    plan: Vec<Vec<Piece>>,
    pub samples: Samples,
    pub parts: Parts,
}

impl Target {
    /// Opens the built chain once to check it and to record its files and
    /// its preads.
    pub fn new(b: Built, size: u64) -> R<Target> {
        let chain = Chain::open(&b.leaf, &OpenOptions::default())?;
        if chain.layers().len() != b.depth || chain.size() != size {
            return Err(format!(
                "snaptree opened {} layers of {} bytes, expected {} of {size}",
                chain.layers().len(),
                chain.size(),
                b.depth
            )
            .into());
        }
        let files = chain
            .layers()
            .iter()
            .map(|l| l.path().to_path_buf())
            .collect();
        Ok(Target {
            depth: b.depth,
            plan: replay_plan(&chain)?,
            leaf: b.leaf,
            files,
            model: b.model,
            samples: Samples::default(),
            parts: Parts::default(),
        })
    }

    /// Every file of the chain, read once with the page cache dropped,
    /// untimed: the hypervisor below caches what the guest reads, so this
    /// puts every tool's cold pass on the same footing (the first read of
    /// freshly written images, or of a chain after others were read, is
    /// otherwise the slowest of all here).
    fn read_files(&self, root: bool) -> R<()> {
        drop_caches(root)?;
        let mut buf = vec![0u8; READ as usize];
        for f in &self.files {
            let f = File::open(f)?;
            let mut off = 0;
            while let n @ 1.. = f.read_at(&mut buf, off)? {
                off += n as u64;
            }
        }
        Ok(())
    }

    /// One run of every tool over this chain, each pass cold unless said
    /// otherwise. `qsd_skip` is why qsd does not run (set on its first
    /// failure).
    pub fn run_once(&mut self, cfg: &Config, qsd_skip: &mut Option<String>) -> R<()> {
        self.read_files(cfg.root)?;
        let size = cfg.size;
        let s = &mut self.samples;
        // (1) snaptree: cold (fresh chain, no page cache), then warm (the
        // same chain, index and page cache warm).
        drop_caches(cfg.root)?;
        let t = Instant::now();
        let chain = Chain::open(&self.leaf, &OpenOptions::default())?;
        snap_pass(&chain, &self.model)?;
        s.snap_cold.push(mbps(size, t.elapsed()));
        let t = fastest(|| snap_pass(&chain, &self.model))?;
        s.snap_warm.push(mbps(size, t));
        drop(chain);

        // The same preads snaptree issues, by a bare loop: what the kernel
        // and the disk cost by themselves.
        drop_caches(cfg.root)?;
        let t = Instant::now();
        let fds = self
            .files
            .iter()
            .map(File::open)
            .collect::<Result<Vec<_>, _>>()?;
        replay(&fds, &self.plan, &self.model)?;
        s.replay_cold.push(mbps(size, t.elapsed()));
        let t = fastest(|| replay(&fds, &self.plan, &self.model))?;
        s.replay_warm.push(mbps(size, t));
        drop(fds);

        // (2) qemu-img reading the same chain: 1 MiB at a time with one
        // request in flight, and convert's 8 coroutines into a null target.
        drop_caches(cfg.root)?;
        let t = Instant::now();
        run_cmd(
            Command::new("qemu-img")
                .args(["bench", "-f", "qcow2", "-c", &(size / READ).to_string()])
                .args(["-d", "1", "-s", "1M", "-S", "1M"])
                .arg(&self.leaf),
        )?;
        s.qimg_bench.push(mbps(size, t.elapsed()));
        drop_caches(cfg.root)?;
        let t = Instant::now();
        run_cmd(
            Command::new("qemu-img")
                .args(["convert", "-n", "-f", "qcow2"])
                .arg(&self.leaf)
                .args([
                    "--target-image-opts",
                    &format!("driver=null-co,size={size}"),
                ]),
        )?;
        s.qimg_convert.push(mbps(size, t.elapsed()));

        // (3) qemu-storage-daemon's FUSE export, mounted next to the leaf.
        if qsd_skip.is_none() {
            let dir = self.leaf.parent().unwrap_or(Path::new("."));
            match qsd::pass(cfg.root, dir, &self.leaf, &self.model, size) {
                Ok(v) => s.qsd.push(v),
                Err(e) => {
                    println!("SKIP qsd: depth {}: {e}", self.depth);
                    *qsd_skip = Some(e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Where snaptree's time goes: open, resolution alone (metadata read
    /// from disk, then from the page cache), and a cold index over a warm
    /// page cache.
    pub fn measure_parts(&mut self, cfg: &Config) -> R<()> {
        drop_caches(cfg.root)?;
        let t = Instant::now();
        let chain = Chain::open(&self.leaf, &OpenOptions::default())?;
        let p = &mut self.parts;
        p.open_ms = t.elapsed().as_secs_f64() * 1e3;
        p.resolve_cold_ms = resolve_all(&chain)?;
        let chain = Chain::open(&self.leaf, &OpenOptions::default())?;
        p.resolve_ms = resolve_all(&chain)?;
        snap_pass(&chain, &self.model)?;
        let chain = Chain::open(&self.leaf, &OpenOptions::default())?;
        let t = Instant::now();
        snap_pass(&chain, &self.model)?;
        p.cold_index = mbps(cfg.size, t.elapsed());
        Ok(())
    }

    /// Untimed: every byte snaptree reads equals `qemu-img convert -O raw`
    /// (written to `raw`, removed after) and the model.
    pub fn verify(&self, raw: &Path, size: u64) -> R<()> {
        run_cmd(
            Command::new("qemu-img")
                .args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(&self.leaf)
                .arg(raw),
        )?;
        let flat = File::open(raw)?;
        if flat.metadata()?.len() != size {
            return Err("qemu-img convert -O raw wrote the wrong size".into());
        }
        let chain = Chain::open(&self.leaf, &OpenOptions::default())?;
        let mut ours = vec![0u8; READ as usize];
        let mut theirs = vec![0u8; READ as usize];
        let mut off = 0;
        while off < size {
            let n = READ.min(size - off) as usize;
            chain.read_at(&mut ours[..n], off)?;
            flat.read_exact_at(&mut theirs[..n], off)?;
            if ours[..n] != theirs[..n] {
                let i = (0..n).find(|&i| ours[i] != theirs[i]).unwrap_or(0);
                return Err(format!(
                    "snaptree differs from qemu-img at byte {}: {:#04x} vs {:#04x}",
                    off + i as u64,
                    ours[i],
                    theirs[i]
                )
                .into());
            }
            for (i, c) in ours[..n].chunks(CHUNK as usize).enumerate() {
                let at = off + i as u64 * CHUNK;
                if c.iter().any(|&b| b != self.model.at(at)) {
                    return Err(format!(
                        "snaptree and qemu-img agree, but the chunk at {at} is not the {:#04x} written there",
                        self.model.at(at)
                    )
                    .into());
                }
            }
            off += n as u64;
        }
        drop(flat);
        std::fs::remove_file(raw)?;
        Ok(())
    }
}

/// The shortest time of [`WARM_PASSES`] back-to-back runs of `pass`: a
/// warm pass over 1 GiB takes under 0.1 s, so one preemption on a busy
/// 2-core machine would skew a single one.
fn fastest(mut pass: impl FnMut() -> R<()>) -> R<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..WARM_PASSES {
        let t = Instant::now();
        pass()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

/// One sequential pass over the flattened disk in 1 MiB `read_at` calls.
fn snap_pass(chain: &Chain, model: &Model) -> R<()> {
    let mut buf = vec![0u8; READ as usize];
    let mut off = 0;
    while off < chain.size() {
        let n = READ.min(chain.size() - off) as usize;
        chain.read_at(&mut buf[..n], off)?;
        model.spot_check(&buf[..n], off, "snaptree")?;
        off += n as u64;
    }
    Ok(())
}

/// Milliseconds to resolve every 2 MiB region of `chain` afresh, with the
/// function the resolution index builds its regions with: the work a cold
/// index does over one pass.
fn resolve_all(chain: &Chain) -> R<f64> {
    let t = Instant::now();
    let mut off = 0;
    while off < chain.size() {
        let len = REGION.min(chain.size() - off);
        std::hint::black_box(resolve(chain.layers(), 0, off, len)?);
        off += len;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// One piece of a replayed read: guest offset, then the layer and host
/// offset to `pread` (or `None` for zeros), and the length.
type Piece = (u64, Option<(usize, u64)>, u64);

/// Per 1 MiB read, the pieces snaptree's read path resolves it into
/// (host-contiguous runs of one layer, merged as `Chain::read_at` merges
/// them).
fn replay_plan(chain: &Chain) -> R<Vec<Vec<Piece>>> {
    let mut plan = Vec::new();
    let mut off = 0;
    while off < chain.size() {
        let n = READ.min(chain.size() - off);
        let mut pieces: Vec<Piece> = Vec::new();
        for r in resolve(chain.layers(), 0, off, n)? {
            let src = match r.source {
                Source::Data { host } | Source::DataHole { host } => Some((r.depth as usize, host)),
                Source::Zero | Source::Unallocated => None,
                other => return Err(format!("replay: cannot replay {other:?}").into()),
            };
            if let Some((_, Some((d, h)), len)) = pieces.last_mut() {
                if let Some((d2, h2)) = src {
                    if *d == d2 && *h + *len == h2 {
                        *len += r.len;
                        continue;
                    }
                }
            }
            pieces.push((r.start, src, r.len));
        }
        plan.push(pieces);
        off += n;
    }
    Ok(plan)
}

fn replay(files: &[File], plan: &[Vec<Piece>], model: &Model) -> R<()> {
    let mut buf = vec![0u8; READ as usize];
    for (i, pieces) in plan.iter().enumerate() {
        let base = i as u64 * READ;
        let mut n = 0;
        for &(start, src, len) in pieces {
            let at = (start - base) as usize;
            let dst = &mut buf[at..at + len as usize];
            match src {
                Some((d, host)) => files[d].read_exact_at(dst, host)?,
                None => dst.fill(0),
            }
            n = at + len as usize;
        }
        model.spot_check(&buf[..n], base, "pread replay")?;
    }
    Ok(())
}
