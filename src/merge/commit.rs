//! Commit: the child C's blocks go into the hidden node H; then
//! `rename(H, C)` puts H's file in C's place (the commit point).
//!
//! C reads the same throughout: H only changes in ranges C holds itself,
//! and nobody reads H alone (it is hidden; its open handles end). A leaf C
//! that is being written is copied like live migration copies RAM: copy,
//! then re-copy what was written meanwhile, while that shrinks; then its
//! writers (and readers) pause for the last short pass and the rename.

use super::copy::{chain_err, copy_pieces, held, image_err, steps};
use super::plan::Job;
use super::run::{err, open_writer, relink, reopen, stack, Failed};
use super::{Engine, PassReport, Throttle};
use crate::chain::dirty::total;
use crate::chain::Chain;
use crate::image::formats::set_id;
use crate::image::Layer;
use crate::tree::{manifest, TreeError};
use std::sync::Arc;
use std::time::Instant;

/// A pass loop ends once a pass leaves at most this much dirty...
const FINAL_PASS_BYTES: u64 = 4 << 20;
/// ... or after this many passes (a writer faster than the copy) ...
const MAX_PASSES: u32 = 8;
/// ... and the paused last pass may copy at most this much: beyond it the
/// merge gives up (and is retried later) rather than stall the guest.
const MAX_PAUSED_BYTES: u64 = 64 << 20;

pub fn run(eng: &Engine, job: &Job, throttle: &Throttle, h_chain: &Chain) -> Result<u64, Failed> {
    let c_chain = job.child.io.read().chain.clone();
    let leaf = job.child.io.read().writable;
    // Declared before the writer, so the writer closes first on failure.
    let (w, relock) = open_writer(h_chain.leaf(), &job.hidden_image)?;
    let hw = stack(w.clone(), &h_chain.layers()[1..]);
    if leaf {
        c_chain.dirty.start();
    }
    let r = copy_and_commit(eng, job, throttle, h_chain, &c_chain, hw, w, relock, leaf);
    c_chain.dirty.stop();
    r
}

/// Copies what `src`'s own layer holds inside `ranges` into `dst`.
fn copy_held(
    eng: &Engine,
    throttle: &Throttle,
    src: &Chain,
    dst: &Chain,
    ranges: &[(u64, u64)],
) -> Result<u64, TreeError> {
    let mut pieces = Vec::new();
    for &(s, e) in ranges {
        pieces.extend(held(src.leaf().as_ref(), s, e.min(src.size()))?);
    }
    copy_pieces(
        eng,
        throttle,
        src,
        dst,
        &steps(&pieces, throttle.step_bytes),
    )
}

/// The whole commit, in the order the module doc's argument needs: copy
/// C into H while C's writers run, flush, pause C's I/O for the last pass
/// and flush, give H C's owner and mode (and id), rename H onto C (the
/// commit point), then put the renamed file in C's place in the tree.
#[allow(clippy::too_many_arguments)]
fn copy_and_commit(
    eng: &Engine,
    job: &Job,
    throttle: &Throttle,
    h_chain: &Chain,
    c_chain: &Arc<Chain>,
    hw: Arc<Chain>,
    w: Arc<dyn Layer>,
    mut relock: super::run::Relock,
    leaf: bool,
) -> Result<u64, Failed> {
    let tree = eng.tree();
    let c = &job.child;
    let LivePasses {
        mut copied,
        pass,
        pending,
    } = live_passes(eng, throttle, c_chain, &hw, leaf)?;
    // Make the passes so far durable while writers still run, so the
    // paused part flushes only the last pass.
    hw.flush().map_err(chain_err)?;
    let t = Instant::now();
    let mut guard = c.io.write();
    if leaf {
        copied += paused_pass(eng, c_chain, &hw, pending, pass, t)?;
    }
    take_owner_and_mode(job)?;
    // A VHD child with children: H's file takes the child's unique id
    // (they check it) before it takes the child's name. H is written by
    // nobody else now (the child is no leaf); its writer goes first so no
    // footer it caches can be written back over the new id.
    let (hw, w) = match job.adopt_id {
        Some(id) => {
            drop(hw);
            drop(w);
            adopt_id(job, h_chain, id)?;
            (None, None)
        }
        None => (Some(hw), Some(w)),
    };
    // The commit point.
    rename_onto_child(job, h_chain)?;
    relock.disarm();
    let _ = manifest::sync_dir(tree.dir());
    // C's old file is gone: its descriptor's locks go with it.
    c_chain.leaf().unlock();
    let new_leaf: Result<Arc<dyn Layer>, TreeError> = match (leaf, w) {
        // The writer already holds the writer lock of what is now C.
        (true, Some(w)) => Ok(w),
        (_, w) => {
            drop(hw);
            drop(w);
            reopen(&job.child_image, h_chain.leaf(), false, &c.name)
        }
    };
    let r = match new_leaf {
        Ok(l) => {
            relink(tree, job, stack(l, &h_chain.layers()[1..]), Some(guard));
            Ok(copied)
        }
        Err(e) => {
            // Reads stay right through the old descriptors; writes stop.
            guard.writable = false;
            drop(guard);
            Err(Failed::AfterCommit(e))
        }
    };
    if leaf {
        eng.state.writer_pause(t.elapsed().as_secs_f64() * 1e3);
    }
    r
}

/// What the passes while C's writers run leave for the paused one.
struct LivePasses {
    /// Bytes copied so far.
    copied: u64,
    /// The number of the last pass.
    pass: u32,
    /// Ranges still dirty after it.
    pending: Vec<(u64, u64)>,
}

/// The copy passes while C's writers run: a first pass over all C holds,
/// then, for a leaf, passes over what was written meanwhile until they stop
/// shrinking (see the constants). What is still dirty is for the paused
/// pass.
fn live_passes(
    eng: &Engine,
    throttle: &Throttle,
    c_chain: &Chain,
    hw: &Chain,
    leaf: bool,
) -> Result<LivePasses, Failed> {
    let mut pass = 1;
    let t = Instant::now();
    let mut copied = copy_held(eng, throttle, c_chain, hw, &[(0, c_chain.size())])?;
    let mut pending = Vec::new();
    if leaf {
        let (mut pass_copied, mut pass_start, mut last) = (copied, t, u64::MAX);
        loop {
            let dirty = c_chain.dirty.take();
            let d = total(&dirty);
            let report = PassReport {
                pass,
                copied: pass_copied,
                dirtied: d,
                millis: pass_start.elapsed().as_millis() as u64,
            };
            eng.state.pass_done(report, d);
            if d <= FINAL_PASS_BYTES || pass >= MAX_PASSES || d >= last {
                pending = dirty;
                break;
            }
            last = d;
            pass += 1;
            pass_start = Instant::now();
            pass_copied = copy_held(eng, &Throttle::full(), c_chain, hw, &dirty)?;
            copied += pass_copied;
        }
    }
    Ok(LivePasses {
        copied,
        pass,
        pending,
    })
}

/// The last pass of a leaf, run by the caller while it holds the leaf's
/// I/O lock (its writers and readers paused since `paused_at`): copies
/// `pending` plus what was written since, and flushes it, so H holds all
/// of C before the commit. Gives up (before the commit) if that is more
/// than `MAX_PAUSED_BYTES`, rather than stall the guest. Returns the bytes
/// copied.
fn paused_pass(
    eng: &Engine,
    c_chain: &Chain,
    hw: &Chain,
    mut pending: Vec<(u64, u64)>,
    pass: u32,
    paused_at: Instant,
) -> Result<u64, Failed> {
    // The last pass, with the leaf's I/O paused.
    pending.extend(c_chain.dirty.take());
    pending.sort_unstable();
    let n = total(&pending);
    if n > MAX_PAUSED_BYTES {
        return Err(Failed::BeforeCommit(err(
            libc::EAGAIN,
            format!(
                "the leaf is written faster than it can be copied ({} still dirty after {pass} passes); try again when it is quieter",
                crate::units::human_size(n)
            ),
        )));
    }
    let n = copy_held(eng, &Throttle::full(), c_chain, hw, &pending)?;
    let report = PassReport {
        pass: pass + 1,
        copied: n,
        dirtied: 0,
        millis: paused_at.elapsed().as_millis() as u64,
    };
    eng.state.pass_done(report, 0);
    hw.flush().map_err(chain_err)?;
    Ok(n)
}

/// H's file becomes C's, holding C's data: it takes C's owner and mode
/// (a 0644 parent must not turn a 0600 leaf world-readable). Runs before
/// the commit, so a failure leaves C as it was.
fn take_owner_and_mode(job: &Job) -> Result<(), Failed> {
    let like = crate::ownership::Ownership::of(&job.child_image);
    if let Err(e) = like.and_then(|o| o.apply_path(&job.hidden_image)) {
        return Err(Failed::BeforeCommit(err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!(
                "giving {} the owner and mode of {}: {e}",
                job.hidden_image.display(),
                job.child_image.display()
            ),
        )));
    }
    Ok(())
}

/// The commit point: `rename(H, C)`. If the rename fails nothing was
/// committed; an id H adopted from C is put back first (see `adopt_id`).
fn rename_onto_child(job: &Job, h_chain: &Chain) -> Result<(), Failed> {
    if let Err(e) = std::fs::rename(&job.hidden_image, &job.child_image) {
        if job.adopt_id.is_some() {
            adopt_id(job, h_chain, h_chain.leaf().unique_id().unwrap_or_default())?;
        }
        return Err(Failed::BeforeCommit(err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!(
                "rename {} to {}: {e}",
                job.hidden_image.display(),
                job.child_image.display()
            ),
        )));
    }
    Ok(())
}

/// Writes `id` into H's footers (see `copy_and_commit`). A failure may
/// leave H's two footers disagreeing: then the journal must stay, so the
/// next open puts H's own id back, and it counts as after the commit.
fn adopt_id(job: &Job, h_chain: &Chain, id: [u8; 16]) -> Result<(), Failed> {
    let format = h_chain.leaf().format();
    set_id(format, &job.hidden_image, id).map_err(|e| {
        let own = h_chain.leaf().unique_id().unwrap_or_default();
        match set_id(format, &job.hidden_image, own) {
            Ok(()) => Failed::BeforeCommit(image_err(e)),
            Err(_) => Failed::AfterCommit(image_err(e)),
        }
    })
}
