//! Page-delta checkpoints, snaptree's own memory format: a memory source
//! imported as a qcow2 image with 4 KiB clusters (one guest page each)
//! that holds only the pages that differ from the parent snapshot point's
//! memory, and whose backing file is that memory's own delta image. The
//! memory of a whole tree so costs little more than what changed between
//! its points, and `qemu-img convert` reads every checkpoint as raw RAM.
//!
//! A page the same as the parent's is skipped (it reads through), a page
//! that became zero is a qcow2 zero cluster where the parent had data and
//! a hole where it had none; everything else is stored.
//!
//! The import is throttled the way VMware's lazy checkpointing is
//! (`mainMem.ioBlockPages` pages, then a `mainMem.ioWait` sleep): after
//! every `block_pages` pages it sleeps `wait_ms`, so an import does not
//! take the disk and a core from the VMs and readers that share them. It
//! writes into a file of its caller's choosing and flushes it; the caller
//! renames it into place, which is its only commit.

use crate::chain::{Chain, ChainError, OpenOptions};
use crate::error::ImageError;
use crate::image::qcow2::create::{create, CreateOptions};
use crate::ownership::Ownership;
use std::path::Path;
use std::time::{Duration, Instant};

/// One guest page: the cluster size of a delta.
pub const PAGE: u64 = 4096;
const CLUSTER_BITS: u32 = 12;
/// Bytes compared at once.
const MAX_PIECE: u64 = 8 << 20;

/// How fast an import goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Throttle {
    /// Pages compared (and written where they differ) between two sleeps.
    pub block_pages: u64,
    /// Sleep after each block; 0 = full speed.
    pub wait_ms: u64,
}

impl Throttle {
    /// The defaults, chosen by `benches/checkpoint_throttle.sh` (see the
    /// README): a 1 GiB delta import takes about 3 s (1.4 s at full
    /// speed) and a sequential reader of another point's disk keeps about
    /// 90 % of its throughput (73-85 % at full speed); shorter waits or
    /// bigger blocks fell to 80-88 %, VMware's 64 pages / 25 ms took 110 s.
    pub const DEFAULT: Throttle = Throttle {
        block_pages: 4096,
        wait_ms: 20,
    };

    /// No sleeps at all.
    pub const FULL: Throttle = Throttle {
        block_pages: 2048,
        wait_ms: 0,
    };
}

/// What an import did: what live migration logs per iteration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Pages looked at so far.
    pub pages_done: u64,
    pub pages_total: u64,
    /// Pages written into the delta.
    pub stored: u64,
    /// Pages the same as the parent's (not written).
    pub skipped: u64,
    /// Zero pages (holes, or zero clusters over parent data).
    pub zero: u64,
    pub elapsed_ms: u64,
}

impl ImportStats {
    /// Bytes per second of guest memory looked at.
    pub fn rate(&self) -> f64 {
        self.pages_done as f64 * PAGE as f64 / (self.elapsed_ms.max(1) as f64 / 1000.0)
    }

    /// One line for logs and `status`.
    pub fn describe(&self) -> String {
        format!(
            "{}/{} pages, {} stored, {} skipped (same as parent), {} zero, {}/s",
            self.pages_done,
            self.pages_total,
            self.stored,
            self.skipped,
            self.zero,
            crate::units::human_size(self.rate() as u64)
        )
    }
}

/// A failed import.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("import cancelled")]
    Cancelled,
}

impl ImportError {
    pub fn errno(&self) -> i32 {
        match self {
            ImportError::Chain(e) => e.errno(),
            ImportError::Image(e) => e.errno(),
            ImportError::Cancelled => libc::ECANCELED,
        }
    }
}

/// The parent memory a delta is made against: its view, and the name and
/// format the new image records as its backing file.
pub struct Base<'a> {
    pub view: &'a Chain,
    /// Relative to the new image's directory.
    pub backing_name: String,
}

/// Imports `source` (a placed memory view) into a new delta image at
/// `out` against `base`; `progress` is called after every block and may
/// cancel by returning false. `out` must not exist; it is created with
/// the owner and mode `like` (the source file's: it holds its pages).
pub fn import(
    source: &Chain,
    base: Option<Base<'_>>,
    out: &Path,
    like: Option<Ownership>,
    throttle: Throttle,
    progress: &mut dyn FnMut(&ImportStats) -> bool,
) -> Result<ImportStats, ImportError> {
    let size = source
        .size()
        .div_ceil(PAGE)
        .checked_mul(PAGE)
        .ok_or_else(|| ImageError::invalid(out, "memory source too large to import"))?;
    let mut opts = CreateOptions::new(size);
    opts.cluster_bits = CLUSTER_BITS;
    opts.backing = base
        .as_ref()
        .map(|b| (b.backing_name.clone(), "qcow2".to_string()));
    opts.like = like;
    create(out, &opts)?;
    let delta = Chain::open(
        out,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )?;
    let base_view = base.as_ref().map(|b| b.view);
    let mut stats = ImportStats {
        pages_total: size / PAGE,
        ..Default::default()
    };
    let started = Instant::now();
    // Work in pieces of at most MAX_PIECE whatever the block size, so a
    // huge `block_pages` costs no more memory.
    let block_pages = throttle.block_pages.max(1);
    let piece = block_pages.saturating_mul(PAGE).min(MAX_PIECE);
    let mut new = vec![0u8; piece as usize];
    let mut old = vec![0u8; piece as usize];
    let mut at = 0;
    let mut since_pause = 0;
    while at < source.size() {
        let len = piece.min(source.size() - at) as usize;
        source.read_at(&mut new[..len], at)?;
        let base_len = base_view.map_or(0, |b| (len as u64).min(b.size().saturating_sub(at)));
        old[..len].fill(0);
        if let Some(b) = base_view.filter(|_| base_len > 0) {
            b.read_at(&mut old[..base_len as usize], at)?;
        }
        write_block(&delta, at, &new[..len], &old[..len], &mut stats)?;
        at += len as u64;
        stats.elapsed_ms = started.elapsed().as_millis() as u64;
        if !progress(&stats) {
            return Err(ImportError::Cancelled);
        }
        since_pause += (len as u64).div_ceil(PAGE);
        if since_pause >= block_pages && throttle.wait_ms > 0 && at < source.size() {
            since_pause = 0;
            std::thread::sleep(Duration::from_millis(throttle.wait_ms));
        }
    }
    delta.flush()?;
    stats.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(stats)
}

/// Writes the pages of one block that differ from the parent's, runs of
/// neighbouring pages in one write.
fn write_block(
    delta: &Chain,
    offset: u64,
    new: &[u8],
    old: &[u8],
    stats: &mut ImportStats,
) -> Result<(), ImportError> {
    #[derive(PartialEq, Clone, Copy)]
    enum Kind {
        Skip,
        Zero,
        Data,
    }
    let page = PAGE as usize;
    let kinds: Vec<Kind> = new
        .chunks(page)
        .zip(old.chunks(page))
        .map(|(n, o)| {
            let zero = is_zero(n);
            if zero {
                stats.zero += 1;
            }
            if n == o {
                if !zero {
                    stats.skipped += 1;
                }
                Kind::Skip
            } else if zero {
                Kind::Zero
            } else {
                stats.stored += 1;
                Kind::Data
            }
        })
        .collect();
    stats.pages_done += kinds.len() as u64;
    let mut i = 0;
    while i < kinds.len() {
        let k = kinds[i];
        let mut j = i + 1;
        while j < kinds.len() && kinds[j] == k {
            j += 1;
        }
        let (start, end) = (i * page, (j * page).min(new.len()));
        let at = offset + start as u64;
        match k {
            Kind::Skip => {}
            Kind::Zero => delta.write_zeroes(at, (end - start) as u64)?,
            Kind::Data => delta.write_at(&new[start..end], at)?,
        }
        i = j;
    }
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .fold(0, |acc, w| acc | w)
        == 0
        && tail.iter().all(|&x| x == 0)
}
