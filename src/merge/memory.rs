//! The memory side of a merge: before hidden point H is coalesced into
//! its only child C, C's page-delta checkpoint must stop backing onto H's
//! (H's delta goes with H). H's pages stream into C's delta where it holds
//! none, then one atomic re-point names H's delta's parent: the same
//! stream-and-repoint as a disk merge, crash-safe the same way. The tree
//! (`tree/memory.rs`) owns the deltas and says which belong to it; this
//! is the merge step that rewrites one.

use super::stream::{copy_lacking, ranges_to_stream};
use super::{run::err, Engine, Throttle};
use crate::chain::{Chain, OpenOptions};
use crate::image::formats::repoint_of;
use crate::image::repoint::NewBacking;
use crate::tree::{PointDisk, TreeError};
use std::path::{Path, PathBuf};

/// Before `hidden` is coalesced into its only child `child`: if the
/// child's delta backs onto the hidden point's, the hidden delta's pages
/// go into the child's delta where it holds none and the child's delta
/// then names the hidden delta's parent (one header write). The child's
/// memory reads the same throughout.
pub fn detach_memory(
    eng: &Engine,
    hidden: &PointDisk,
    child: &PointDisk,
    throttle: &Throttle,
) -> Result<(), TreeError> {
    let tree = eng.tree();
    let (Some(h), Some(c)) = (
        tree.own_memory_delta(hidden.id),
        tree.own_memory_delta(child.id),
    ) else {
        return Ok(());
    };
    let backs_on_h = c
        .chain
        .layers()
        .get(1)
        .is_some_and(|l| same_file(l.path(), &h.path));
    if !backs_on_h {
        return Ok(());
    }
    let merge_err = |e: crate::chain::ChainError| {
        err(
            e.errno(),
            format!("merging memory delta {}: {e}", h.path.display()),
        )
    };
    let writer = Chain::open(
        &c.path,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .map_err(merge_err)?;
    // What the child's delta lacks of the hidden one's, copied paced
    // like the disk merge it comes with (it may be GiBs), by the same
    // stream routine.
    let ranges = ranges_to_stream(&h.chain, c.chain.size())?;
    copy_lacking(eng, throttle, &h.chain, &writer, &ranges)?;
    writer.flush().map_err(merge_err)?;
    let format = writer.leaf().format();
    drop(writer);
    // The commit: one atomic re-point (a header write for the qcow2
    // deltas snaptree makes, which record their base as of their own
    // format; see `memory::checkpoint`).
    let backing = h.chain.leaf().backing().map(|b| b.name.clone());
    let to = backing.as_deref().map(|name| NewBacking {
        name,
        format: format.name(),
        path: h.chain.layers().get(1).map(|l| l.path()),
    });
    let how = repoint_of(format, &c.path).map_err(|e| err(e.errno(), e.to_string()))?;
    let plan = how
        .plan(&c.path, to)
        .map_err(|e| err(e.errno(), e.to_string()))?;
    if plan.patches().is_some() {
        return Err(err(
            libc::EOPNOTSUPP,
            format!(
                "merging memory delta {}: a {} delta is not re-pointed in one write",
                h.path.display(),
                format.name()
            ),
        ));
    }
    how.apply(&c.path, &plan)
        .map_err(|e| err(e.errno(), e.to_string()))?;
    // Every view whose chain runs through the child's delta (the
    // child's, and its descendants' deltas on it) opens anew, without
    // H's delta.
    tree.reopen_memory_through(&c.path);
    Ok(())
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn same_file(a: &Path, b: &Path) -> bool {
    canon(a) == canon(b)
}
