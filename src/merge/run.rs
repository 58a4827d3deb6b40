//! One merge, from journal entry to cleanup; the two directions live in
//! `stream` and `commit`.
//!
//! Both write only ranges that every visible reader takes from elsewhere,
//! flush, then switch the tree in one atomic step (the commit point); the
//! journal written first lets the next open finish or redo the merge.
//! Whatever writes an image holds QEMU's writer lock on it first (our own
//! reader lock on that file is dropped for it and taken back on failure),
//! so another process reading or writing it, or another snaptree, makes
//! the merge fail before anything is written.

use super::copy::{image_err, Held};
use super::journal::{self, Entry};
use super::plan::{Direction, Job};
use super::{commit, stream, Engine, Throttle};
use crate::chain::Chain;
use crate::image::formats::repoint_of;
use crate::image::lock::LockMode;
use crate::image::repoint::{hex, NewBacking};
use crate::image::{probe, Format, Layer};
use crate::tree::{DiskIo, Tree, TreeError};
use parking_lot::RwLockWriteGuard;
use std::path::Path;
use std::sync::Arc;

pub fn err(errno: i32, msg: impl Into<String>) -> TreeError {
    TreeError::new(errno, msg)
}

/// `path` relative to the tree directory (absolute if outside it): how the
/// journal and the manifest name images.
pub fn rel(tree: &Tree, path: &Path) -> String {
    path.strip_prefix(tree.dir())
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Refuses when the tree's filesystem cannot take the copy (with room for
/// metadata), as XCP's GC estimates before it coalesces.
fn check_space(dir: &Path, bytes: u64) -> Result<(), TreeError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| err(libc::EINVAL, "path contains NUL"))?;
    // SAFETY: statvfs fills the struct we own from a valid path.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Ok(()); // cannot tell; the copy fails cleanly with ENOSPC anyway
    }
    let free = s.f_bavail as u64 * s.f_frsize as u64;
    let need = bytes + bytes / 16 + (16 << 20);
    if free < need {
        return Err(err(
            libc::ENOSPC,
            format!(
                "not enough free space in {}: the merge may need {} and {} are free",
                dir.display(),
                crate::units::human_size(need),
                crate::units::human_size(free)
            ),
        ));
    }
    Ok(())
}

/// The backing reference the child gets when H goes: H's parent, named
/// relative to the child's directory (H's own name for it is relative to
/// H's directory), with its format. `None` when H is a root.
pub fn new_backing(h_chain: &Chain, child_image: &Path) -> Option<(String, String)> {
    let b = h_chain.leaf().backing()?;
    let parent = h_chain.layers().get(1);
    let fmt = b
        .format
        .clone()
        .or_else(|| parent.map(|l| l.format().name().to_string()))
        .unwrap_or_else(|| "raw".into());
    let c_dir = child_image.parent();
    let name = if h_chain.leaf().path().parent() == c_dir {
        b.name.clone()
    } else {
        match parent.map(|l| l.path().to_path_buf()) {
            Some(p) if p.parent() == c_dir => p
                .file_name()
                .map_or(b.name.clone(), |n| n.to_string_lossy().into_owned()),
            Some(p) => p.to_string_lossy().into_owned(),
            None => b.name.clone(),
        }
    };
    Some((name, fmt))
}

/// The journal entry of `job` before its commit point.
fn entry_for(tree: &Tree, job: &Job, h_chain: &Chain) -> Entry {
    Entry {
        direction: job.direction.name().into(),
        hidden: rel(tree, &job.hidden_image),
        child: rel(tree, &job.child_image),
        parent: new_backing(h_chain, &job.child_image).map(|b| b.0),
        patches: None,
        hidden_id: job
            .adopt_id
            .and(h_chain.leaf().unique_id())
            .map(|id| hex(&id)),
    }
}

/// The commit point of a stream: from now on the child names H's parent,
/// as the child's format re-points (see `image::repoint`). One write
/// (qcow2: a header `pwrite` of the backing name) is the commit point
/// itself. Several writes (a differencing VHD: its header and parent
/// locators) go into the journal first, whose atomic rewrite is then the
/// commit point, and are applied after it; the next open applies them
/// again if a crash interrupted that.
pub fn repoint(tree: &Tree, job: &Job, h_chain: &Chain, child: Format) -> Result<(), Failed> {
    let backing = new_backing(h_chain, &job.child_image);
    let to = backing.as_ref().map(|(name, format)| NewBacking {
        name,
        format,
        path: h_chain.layers().get(1).map(|l| l.path()),
    });
    let before = |e| Failed::BeforeCommit(image_err(e));
    let how = repoint_of(child, &job.child_image).map_err(before)?;
    let plan = how.plan(&job.child_image, to).map_err(before)?;
    let Some(patches) = plan.patches() else {
        return how.apply(&job.child_image, &plan).map_err(before);
    };
    let mut entry = entry_for(tree, job, h_chain);
    entry.patches = Some(patches.to_vec());
    // Whether a failed store renamed the file or not cannot be told:
    // count it as committed, so recovery decides from the journal.
    journal::store(tree.dir(), &entry).map_err(|e| {
        Failed::AfterCommit(err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("writing the merge journal: {e}"),
        ))
    })?;
    how.apply(&job.child_image, &plan)
        .map_err(|e| Failed::AfterCommit(image_err(e)))
}

/// Runs `job`; returns the bytes copied.
pub fn run(eng: &Engine, job: &Job, throttle: &Throttle) -> Result<u64, TreeError> {
    let tree = eng.tree();
    let dir = tree.dir();
    check_space(dir, job.bytes)?;
    // The child's memory delta stops needing H's first (its own atomic
    // step; H's delta goes with H).
    super::memory::detach_memory(eng, &job.hidden, &job.child, throttle)?;
    let h_chain = job.hidden.io.read().chain.clone();
    journal::store(dir, &entry_for(tree, job, &h_chain)).map_err(|e| {
        err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("writing the merge journal: {e}"),
        )
    })?;
    eng.state.begin(job.describe(), job.bytes);
    let r = match job.direction {
        Direction::Stream => stream::run(eng, job, throttle, &h_chain),
        Direction::Commit => commit::run(eng, job, throttle, &h_chain),
    };
    eng.state.end_one();
    match r {
        Ok(bytes) => {
            if let Err(e) = tree.save_manifest() {
                // The images are right; the journal makes the next open
                // fix the manifest.
                tree.problem(format!("after merging {}: {e}", job.describe()));
                return Ok(bytes);
            }
            if let Err(e) = journal::clear(dir) {
                tree.problem(format!("removing the merge journal: {e}"));
            }
            Ok(bytes)
        }
        Err(Failed::BeforeCommit(e)) => {
            // Nothing visible changed; the hidden node stays for a retry.
            let _ = journal::clear(dir);
            Err(e)
        }
        Err(Failed::AfterCommit(e)) => {
            // The journal stays for the next open to finish the cleanup;
            // no merge runs before that (the tree in memory is behind).
            let msg = format!(
                "merge {} committed, but: {}; remount to finish it",
                job.describe(),
                e.message
            );
            tree.problem(msg.clone());
            *eng.state.broken.lock() = Some(msg);
            Err(e)
        }
    }
}

pub enum Failed {
    BeforeCommit(TreeError),
    AfterCommit(TreeError),
}

impl From<TreeError> for Failed {
    fn from(e: TreeError) -> Failed {
        Failed::BeforeCommit(e)
    }
}

/// A chain of `top` over `below`.
pub fn stack(top: Arc<dyn Layer>, below: &[Arc<dyn Layer>]) -> Arc<Chain> {
    let mut layers = vec![top];
    layers.extend(below.iter().cloned());
    Arc::new(Chain::from_layers(layers))
}

/// A writable descriptor of an image our tree holds with a reader lock
/// (`own`), holding the writer lock: `own`'s lock goes first (OFD locks of
/// two of our descriptors conflict). Dropping the returned guard before
/// the commit gives `own` its reader lock back.
pub fn open_writer(
    own: &Arc<dyn Layer>,
    path: &Path,
) -> Result<(Arc<dyn Layer>, Relock), TreeError> {
    let w = probe::open_layer(path, Some(own.format()), true).map_err(image_err)?;
    // A merge writes only what readers already read (or, in a hidden
    // image, what they take from its child): children's identity checks
    // must keep matching, through a crash too.
    w.keep_identity();
    own.unlock();
    if let Err(why) = w.lock(LockMode::Writer) {
        let _ = own.lock(LockMode::Reader);
        return Err(err(
            libc::EBUSY,
            format!("{}: {why}; not merged", path.display()),
        ));
    }
    Ok((w, Relock(Some(own.clone()))))
}

/// Gives a layer its reader lock back when dropped (see [`open_writer`]);
/// declare it before the writer so the writer's descriptor closes first.
pub struct Relock(Option<Arc<dyn Layer>>);

impl Relock {
    /// The layer is replaced after a commit: no lock to give back.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Relock {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            let _ = l.lock(LockMode::Reader);
        }
    }
}

/// Opens the child's image again after its file changed: writable with a
/// writer lock for a leaf, else read-only with a reader lock. `old` (the
/// child's previous layer) loses its locks first.
pub fn reopen(
    path: &Path,
    old: &Arc<dyn Layer>,
    writable: bool,
    name: &str,
) -> Result<Arc<dyn Layer>, TreeError> {
    old.unlock();
    let l = probe::open_layer(path, Some(old.format()), writable).map_err(image_err)?;
    let mode = if writable {
        LockMode::Writer
    } else {
        LockMode::Reader
    };
    l.lock(mode)
        .map_err(|why| err(libc::EBUSY, format!("{name}: {}: {why}", path.display())))?;
    Ok(l)
}

/// After the commit: H leaves the tree, C hangs under H's parent, and C
/// and every point below it read through chains built on the new files.
pub fn relink(
    tree: &Tree,
    job: &Job,
    c_chain: Arc<Chain>,
    guard: Option<RwLockWriteGuard<'_, DiskIo>>,
) {
    let (hid, cid) = (job.hidden.id, job.child.id);
    // C's chain first, then the structure: the lock order everywhere is
    // `nodes` before any point's `io`, so the guard goes before `nodes`.
    match guard {
        Some(mut g) => g.chain = c_chain.clone(),
        None => job.child.io.write().chain = c_chain.clone(),
    }
    tree.unlink_coalesced(hid, cid);
    // Below C: each point's own layer over its parent's new chain.
    let mut queue = vec![(cid, c_chain)];
    while let Some((id, chain)) = queue.pop() {
        let kids = tree.children_of(id);
        for k in kids {
            let mut io = k.io.write();
            let new = stack(io.chain.leaf().clone(), chain.layers());
            io.chain = new.clone();
            drop(io);
            queue.push((k.id, new));
        }
    }
}

/// A range marked zero, for the copier; `None` when it is empty.
pub fn zeros(start: u64, end: u64) -> Option<Held> {
    // `then`, not `then_some`: the length must not be computed when `end`
    // is below `start` (it would overflow).
    (end > start).then(|| Held {
        start,
        len: end - start,
        zero: true,
    })
}

#[cfg(test)]
mod tests {
    use super::zeros;

    #[test]
    fn zeros_of_an_empty_or_inverted_range_is_none() {
        assert!(zeros(10, 10).is_none());
        // A hidden image larger than what its child reads through it.
        assert!(zeros(10 << 20, 4 << 20).is_none());
        let z = zeros(4, 10).expect("a range");
        assert_eq!((z.start, z.len, z.zero), (4, 6, true));
    }
}
