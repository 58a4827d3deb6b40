//! The copier's pieces: the allocated ranges of one layer, moving one
//! range from a chain into another, and pacing between steps.

use super::Throttle;
use crate::chain::Chain;
use crate::image::{Layer, Mapping};
use crate::tree::{Tree, TreeError};
use std::time::Duration;

/// A range a layer holds itself: data, or marked zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub start: u64,
    pub len: u64,
    pub zero: bool,
}

pub fn chain_err(e: crate::chain::ChainError) -> TreeError {
    TreeError::new(e.errno(), e.to_string())
}

pub fn image_err(e: crate::error::ImageError) -> TreeError {
    TreeError::new(e.errno(), e.to_string())
}

/// The ranges of `[start, end)` that `layer` holds itself, adjacent ones
/// of one kind joined.
pub fn held(layer: &dyn Layer, start: u64, end: u64) -> Result<Vec<Held>, TreeError> {
    let mut out: Vec<Held> = Vec::new();
    let mut at = start;
    while at < end {
        let len = (1u64 << 30).min(end - at);
        for e in layer.map(at, len).map_err(image_err)? {
            let zero = match e.mapping {
                Mapping::Unallocated => continue,
                Mapping::Zero => true,
                _ => false,
            };
            match out.last_mut() {
                Some(l) if l.zero == zero && l.start + l.len == e.start => l.len += e.len,
                _ => out.push(Held {
                    start: e.start,
                    len: e.len,
                    zero,
                }),
            }
        }
        at += len;
    }
    Ok(out)
}

/// Splits ranges into pieces of at most `step` bytes.
pub fn steps(ranges: &[Held], step: u64) -> Vec<Held> {
    let step = step.max(64 << 10);
    let mut out = Vec::new();
    for r in ranges {
        let mut at = r.start;
        while at < r.start + r.len {
            let len = step.min(r.start + r.len - at);
            out.push(Held {
                start: at,
                len,
                zero: r.zero,
            });
            at += len;
        }
    }
    out
}

/// Makes `[start, start+len)` of `dst` read what `src` reads there:
/// zeros as zero clusters, data copied in pieces of at most 8 MiB.
pub fn copy_range(src: &Chain, dst: &Chain, piece: Held) -> Result<(), TreeError> {
    if piece.zero {
        return dst.write_zeroes(piece.start, piece.len).map_err(chain_err);
    }
    const BUF: u64 = 8 << 20;
    let mut buf = vec![0u8; BUF.min(piece.len) as usize];
    let mut at = piece.start;
    let end = piece.start + piece.len;
    while at < end {
        let n = BUF.min(end - at) as usize;
        src.read_at(&mut buf[..n], at).map_err(chain_err)?;
        dst.write_at(&buf[..n], at).map_err(chain_err)?;
        at += n as u64;
    }
    Ok(())
}

/// Between two steps: the throttle's pause, and while foreground I/O is
/// running (background merges), wait until it has been quiet a moment,
/// at most 5 s a step so a busy mount still sees progress.
pub fn pace(tree: &Tree, throttle: &Throttle) -> Result<(), TreeError> {
    if tree.merge.cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(TreeError::new(
            libc::ECANCELED,
            "stopped because the mount is going away; nothing was committed",
        ));
    }
    if throttle.yield_to_io && tree.merge.preempt.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        return Err(TreeError::new(
            libc::EAGAIN,
            "gave way to a tree command; nothing was committed, it starts over later",
        ));
    }
    if !throttle.pause.is_zero() {
        std::thread::sleep(throttle.pause);
    }
    if throttle.yield_to_io {
        let quiet = Duration::from_millis(200);
        let mut waited = Duration::ZERO;
        while tree.merge.idle_for() < quiet && waited < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
            waited += Duration::from_millis(50);
        }
    }
    Ok(())
}
