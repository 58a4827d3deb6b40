//! The copier's pieces: the allocated ranges of one layer, moving one
//! range from a chain into another, and pacing between steps.

use super::{Engine, Throttle};
use crate::chain::Chain;
use crate::image::{Layer, Mapping};
use crate::tree::TreeError;
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

/// Bytes read and written at once.
const BUF: u64 = 8 << 20;

/// Makes `[start, start+len)` of `dst` read what `src` reads there:
/// zeros as zero clusters, data copied in pieces of at most 8 MiB.
pub fn copy_range(src: &Chain, dst: &Chain, piece: Held) -> Result<(), TreeError> {
    if piece.zero {
        return dst.write_zeroes(piece.start, piece.len).map_err(chain_err);
    }
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

/// What the reading side of [`copy_pieces`] hands to the writing side.
enum Chunk {
    Data(u64, Vec<u8>),
    Zero(Held),
}

/// Copies `pieces` from `src` to `dst` like [`copy_range`], with reads
/// running on a helper thread ahead of the writes (two buffers in flight),
/// so reading the source and writing the destination overlap. Paces by
/// [`Pacer`]; returns the bytes copied.
pub fn copy_pieces(
    eng: &Engine,
    throttle: &Throttle,
    src: &Chain,
    dst: &Chain,
    pieces: &[Held],
) -> Result<u64, TreeError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Chunk, TreeError>>(2);
    std::thread::scope(|s| {
        s.spawn(move || {
            for p in pieces {
                if p.zero {
                    if tx.send(Ok(Chunk::Zero(*p))).is_err() {
                        return;
                    }
                    continue;
                }
                let mut at = p.start;
                while at < p.start + p.len {
                    let n = BUF.min(p.start + p.len - at) as usize;
                    let mut buf = vec![0u8; n];
                    let r = src.read_at(&mut buf, at).map_err(chain_err);
                    let failed = r.is_err();
                    if tx.send(r.map(|_| Chunk::Data(at, buf))).is_err() || failed {
                        return;
                    }
                    at += n as u64;
                }
            }
        });
        let mut copied = 0;
        let mut pacer = Pacer::new(eng, throttle);
        // Returning early drops `rx`, which stops the reader at its next send.
        for chunk in rx {
            let len = match chunk? {
                Chunk::Data(at, buf) => {
                    dst.write_at(&buf, at).map_err(chain_err)?;
                    buf.len() as u64
                }
                Chunk::Zero(p) => {
                    dst.write_zeroes(p.start, p.len).map_err(chain_err)?;
                    p.len
                }
            };
            copied += len;
            eng.state.progress(len);
            pacer.after(len)?;
        }
        Ok(copied)
    })
}

/// Paces a copy: checks after every piece whether the merge must stop
/// (the mount going away, a tree command waiting), and once a step's worth
/// of bytes (`step_bytes`) has been copied, takes the throttle's pause and,
/// while foreground I/O is running (background merges), waits until it has
/// been quiet for 200 ms, at most 1 s a step, so a busy mount still sees
/// progress (one step a second). Pieces are often smaller than a step
/// (scattered clusters): pausing per piece would make the step knob
/// meaningless.
pub struct Pacer<'a> {
    eng: &'a Engine,
    throttle: &'a Throttle,
    since_pause: u64,
}

impl<'a> Pacer<'a> {
    pub fn new(eng: &'a Engine, throttle: &'a Throttle) -> Pacer<'a> {
        Pacer {
            eng,
            throttle,
            since_pause: 0,
        }
    }

    /// `bytes` more were copied.
    pub fn after(&mut self, bytes: u64) -> Result<(), TreeError> {
        let (eng, throttle) = (self.eng, self.throttle);
        let tree = eng.tree();
        if tree.closing() {
            return Err(TreeError::new(
                libc::ECANCELED,
                "stopped because the mount is going away; nothing was committed",
            ));
        }
        if throttle.yield_to_io && tree.commands_waiting() {
            return Err(TreeError::new(
                libc::EAGAIN,
                "gave way to a tree command; nothing was committed, it starts over later",
            ));
        }
        self.since_pause += bytes;
        if self.since_pause < throttle.step_bytes {
            return Ok(());
        }
        self.since_pause = 0;
        if !throttle.pause.is_zero() {
            std::thread::sleep(throttle.pause);
        }
        if throttle.yield_to_io {
            let quiet = Duration::from_millis(200);
            let mut waited = Duration::ZERO;
            while eng.state.idle_for() < quiet && waited < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(50));
                waited += Duration::from_millis(50);
            }
        }
        Ok(())
    }
}
