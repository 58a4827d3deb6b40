//! Stream: the hidden node H's blocks go into its only child C where C
//! holds nothing; then C's header names H's parent (the commit point, see
//! `run::repoint`), and H's file goes.
//!
//! C reads the same throughout: it took those ranges from H before and
//! holds the same bytes itself after. A leaf C is filled one step at a
//! time under its I/O lock, so a guest write cannot land between checking
//! that C lacks a range and filling it.

use super::copy::{chain_err, copy_pieces, copy_range, held, image_err, steps, Held, Pacer};
use super::plan::Job;
use super::run::{err, open_writer, rel, relink, reopen, repoint, stack, zeros, Failed};
use super::{Engine, Throttle};
use crate::chain::Chain;
use crate::image::Mapping;
use crate::tree::{manifest, Tree, TreeError};
use std::time::Instant;

pub fn run(eng: &Engine, job: &Job, throttle: &Throttle, h_chain: &Chain) -> Result<u64, Failed> {
    let tree = eng.tree();
    let c = &job.child;
    let (c_chain, leaf) = {
        let io = c.io.read();
        (io.chain.clone(), io.writable)
    };
    // A leaf is written through its own chain so the mount's writes and
    // ours share one metadata state; any other child through a writable
    // descriptor of its own, holding the writer lock.
    let (writer, mut relock) = if leaf {
        (c_chain.clone(), None)
    } else {
        let (w, relock) = open_writer(c_chain.leaf(), &job.child_image)?;
        (stack(w, &c_chain.layers()[1..]), Some(relock))
    };
    let mut ranges = ranges_to_stream(h_chain, c_chain.size())?;
    let mut copied = 0;
    if !leaf {
        // Nothing else writes C: find what it lacks once, then copy it all
        // in one pipelined run.
        copied = copy_lacking(eng, throttle, h_chain, &writer, &ranges)?;
        ranges.clear();
    }
    // A leaf: step by step (`ranges` is empty for any other child).
    let (leaf_copied, mut longest_pause) =
        fill_leaf(eng, throttle, job, h_chain, &writer, &ranges)?;
    copied += leaf_copied;
    let t = Instant::now();
    let mut guard = if leaf { Some(c.io.write()) } else { None };
    writer.flush().map_err(chain_err)?;
    // The commit point.
    repoint(tree, job, h_chain, writer.leaf().format())?;
    let after = (|| -> Result<(), crate::tree::TreeError> {
        drop(writer);
        if let Some(r) = relock.as_mut() {
            r.disarm();
        }
        let new_leaf = reopen(&job.child_image, c_chain.leaf(), leaf, c.name.as_str())?;
        relink(
            tree,
            job,
            stack(new_leaf, &h_chain.layers()[1..]),
            guard.take(),
        );
        remove_hidden(tree, job)
    })();
    if let (Err(_), Some(g)) = (&after, guard.as_mut()) {
        // The leaf's old layer still believes in its old header: no more
        // writes through it.
        g.writable = false;
    }
    drop(guard);
    if leaf {
        longest_pause = longest_pause.max(t.elapsed().as_secs_f64() * 1e3);
        eng.state.writer_pause(longest_pause);
    }
    after.map_err(Failed::AfterCommit)?;
    Ok(copied)
}

/// Fills the leaf child through `writer` (its own chain) with the parts of
/// `ranges` it lacks, from `h_chain`, one step at a time, each step under
/// the leaf's I/O lock so a guest write cannot land between checking that
/// the leaf lacks a range and filling it. Paced between steps (and stops
/// when the mount goes away or a command waits). Returns the bytes copied
/// and the longest pause of the leaf's I/O, in milliseconds.
fn fill_leaf(
    eng: &Engine,
    throttle: &Throttle,
    job: &Job,
    h_chain: &Chain,
    writer: &Chain,
    ranges: &[Held],
) -> Result<(u64, f64), Failed> {
    let c = &job.child;
    let mut copied = 0;
    let mut longest_pause = 0f64;
    let mut pacer = Pacer::new(eng, throttle);
    for piece in steps(ranges, throttle.step_bytes) {
        let t = Instant::now();
        // Check-then-write of a leaf must not race a guest write to it.
        let guard = c.io.write();
        for e in writer
            .leaf()
            .map(piece.start, piece.len)
            .map_err(image_err)?
            .into_iter()
            .filter(|e| e.mapping == Mapping::Unallocated)
        {
            let part = Held {
                start: e.start,
                len: e.len,
                zero: piece.zero,
            };
            copy_range(h_chain, writer, part)?;
            copied += e.len;
        }
        drop(guard);
        longest_pause = longest_pause.max(t.elapsed().as_secs_f64() * 1e3);
        eng.state.progress(piece.len);
        pacer.after(piece.len)?;
    }
    Ok((copied, longest_pause))
}

/// What a stream of H (the leaf of `h_chain`) into a child of `c_size`
/// bytes must make the child hold: H's own ranges; without a parent of H,
/// not H's zeros (ranges the child does not hold read as zeros anyway);
/// with one, zeros past H's end, where the child read zeros and its new
/// parent may hold data. Shared by disk merges and the memory-delta merge
/// (`Tree::detach_memory`).
pub fn ranges_to_stream(h_chain: &Chain, c_size: u64) -> Result<Vec<Held>, TreeError> {
    let h_size = h_chain.size();
    let mut ranges = held(h_chain.leaf().as_ref(), 0, h_size.min(c_size))?;
    if h_chain.layers().len() == 1 {
        ranges.retain(|r| !r.zero);
    } else if let Some(z) = zeros(h_size, c_size.min(h_chain.layers()[1].virtual_size())) {
        ranges.push(z);
    }
    Ok(ranges)
}

/// Copies into `writer` (a chain over the child's file that nothing else
/// writes) the parts of `ranges` its top layer does not hold, from
/// `h_chain`, in one pipelined paced run; returns the bytes copied. The
/// child reads the same before and after: it took those ranges from H.
/// The caller then flushes and re-points the child in one atomic step.
pub fn copy_lacking(
    eng: &Engine,
    throttle: &Throttle,
    h_chain: &Chain,
    writer: &Chain,
    ranges: &[Held],
) -> Result<u64, TreeError> {
    let mut todo = Vec::new();
    for r in ranges {
        for e in writer.leaf().map(r.start, r.len).map_err(image_err)? {
            if e.mapping == Mapping::Unallocated {
                todo.push(Held {
                    start: e.start,
                    len: e.len,
                    zero: r.zero,
                });
            }
        }
    }
    copy_pieces(
        eng,
        throttle,
        h_chain,
        writer,
        &steps(&todo, throttle.step_bytes),
    )
}

/// H's file goes once nothing references it: the manifest lists it as
/// garbage first, so an interrupted cleanup is finished by the next open.
fn remove_hidden(tree: &Tree, job: &Job) -> Result<(), crate::tree::TreeError> {
    if let Some(user) = super::journal::referenced_by(tree.dir(), &job.hidden_image, &[]) {
        return Err(err(
            libc::EBUSY,
            format!(
                "{} is still the backing file of {}; kept",
                job.hidden_image.display(),
                user.display()
            ),
        ));
    }
    tree.note_garbage(manifest::ManifestPoint {
        name: job.hidden.name.clone(),
        image: rel(tree, &job.hidden_image),
        parent: None,
        created: job.hidden.created,
        hidden: true,
        format: None,
        disk: job.hidden.disk.clone(),
        garbage: true,
        memory: None,
    });
    tree.save_manifest()?;
    if let Err(e) = crate::image::formats::remove_image(&job.hidden_image) {
        tree.problem(format!("{}: {e}", job.hidden_image.display()));
    } else {
        tree.clear_garbage();
    }
    let _ = manifest::sync_dir(tree.dir());
    Ok(())
}
