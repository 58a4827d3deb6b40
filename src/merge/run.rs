//! One merge, from journal entry to cleanup.
//!
//! Stream (hidden H into child C): for every range H holds and C does not,
//! write H's bytes (or zeros) into C; C reads the same before and after,
//! since it used to take those ranges from H. Flush C. Commit: one header
//! `pwrite` makes C name H's parent. Then H's file is removed.
//!
//! Commit (C into H, then H's file replaces C's): write every range C
//! holds into H; C reads the same since it takes those ranges from itself,
//! and H is hidden, so nobody reads H alone. Flush H. Commit: `rename(H,
//! C)`. A leaf C that is being written is copied in passes; the last pass
//! and the rename run with C's writers (and readers) paused.
//!
//! Either way, chains that held C or H are rebuilt from the new files
//! under each point's I/O lock, and the manifest is saved.

use super::copy::{chain_err, copy_pieces, copy_range, held, image_err, pace, steps, Held};
use super::journal::{self, Entry};
use super::plan::{Direction, Job};
use super::{PassReport, Throttle};
use crate::chain::dirty::total;
use crate::chain::Chain;
use crate::image::lock::LockMode;
use crate::image::qcow2::rebase::set_backing;
use crate::image::{probe, Format, Layer, Mapping};
use crate::tree::{manifest, PointIo, Tree, TreeError};
use parking_lot::RwLockWriteGuard;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// A leaf pass loop ends once a pass leaves at most this much dirty.
const FINAL_PASS_BYTES: u64 = 4 << 20;
/// ... or after this many passes (a writer faster than the copy).
const MAX_PASSES: u32 = 8;

fn err(errno: i32, msg: impl Into<String>) -> TreeError {
    TreeError::new(errno, msg)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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

/// Runs `job`; returns the bytes copied.
pub fn run(tree: &Tree, job: &Job, throttle: &Throttle) -> Result<u64, TreeError> {
    let dir = tree.dir();
    check_space(dir, job.bytes)?;
    let h_chain = job.hidden.io.read().chain.clone();
    let entry = Entry {
        direction: job.direction.name().into(),
        hidden: file_name(&job.hidden_image),
        child: file_name(&job.child_image),
        parent: h_chain.leaf().backing().map(|b| b.name.clone()),
    };
    journal::store(dir, &entry).map_err(|e| {
        err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("writing the merge journal: {e}"),
        )
    })?;
    tree.merge.begin(job.describe(), job.bytes);
    let r = match job.direction {
        Direction::Stream => stream(tree, job, throttle, &h_chain),
        Direction::Commit => commit(tree, job, throttle, &h_chain),
    };
    tree.merge.end_one();
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
            // The journal stays: the next open finishes the cleanup.
            tree.problem(format!(
                "merge {} committed, but: {}; remount to finish",
                job.describe(),
                e.message
            ));
            Err(e)
        }
    }
}

enum Failed {
    BeforeCommit(TreeError),
    AfterCommit(TreeError),
}

impl From<TreeError> for Failed {
    fn from(e: TreeError) -> Failed {
        Failed::BeforeCommit(e)
    }
}

/// A chain of `top` over `below`.
fn stack(top: Arc<dyn Layer>, below: &[Arc<dyn Layer>]) -> Arc<Chain> {
    let mut layers = vec![top];
    layers.extend(below.iter().cloned());
    Arc::new(Chain::from_layers(layers))
}

fn stream(tree: &Tree, job: &Job, throttle: &Throttle, h_chain: &Chain) -> Result<u64, Failed> {
    let c = &job.child;
    let (c_chain, leaf) = {
        let io = c.io.read();
        (io.chain.clone(), io.writable)
    };
    // A leaf is written through its own chain so the mount's writes and
    // ours share one metadata state; any other child gets a writable
    // descriptor of its own (our reader lock keeps other processes out).
    let writer = if leaf {
        c_chain.clone()
    } else {
        let w =
            probe::open_layer(&job.child_image, Some(Format::Qcow2), true).map_err(image_err)?;
        stack(w, &c_chain.layers()[1..])
    };
    let end = h_chain.size().min(c_chain.size());
    let mut ranges = held(h_chain.leaf().as_ref(), 0, end)?;
    if h_chain.layers().len() == 1 {
        // Without a parent, ranges the child does not hold read as zeros
        // anyway: H's zeros need no copy.
        ranges.retain(|r| !r.zero);
    }
    let mut copied = 0;
    let mut longest_pause = 0f64;
    if !leaf {
        // Nothing else writes C: find what it lacks once, then copy it all
        // in one pipelined run.
        let mut todo = Vec::new();
        for r in &ranges {
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
        let todo = steps(&todo, throttle.step_bytes);
        copied = copy_pieces(tree, throttle, h_chain, &writer, &todo)?;
        ranges.clear();
    }
    for piece in steps(&ranges, throttle.step_bytes) {
        let t = Instant::now();
        // Check-then-write of a leaf must not race a guest write to it.
        let guard = leaf.then(|| c.io.write());
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
            copy_range(h_chain, &writer, part)?;
            copied += e.len;
        }
        drop(guard);
        if leaf {
            longest_pause = longest_pause.max(t.elapsed().as_secs_f64() * 1e3);
        }
        tree.merge.progress(piece.len);
        pace(tree, throttle)?;
    }
    let t = Instant::now();
    let mut guard = if leaf { Some(c.io.write()) } else { None };
    writer.flush().map_err(chain_err)?;
    let backing = h_chain.leaf().backing().map(|b| {
        let fmt = b
            .format
            .clone()
            .or_else(|| {
                h_chain
                    .layers()
                    .get(1)
                    .map(|l| l.format().name().to_string())
            })
            .unwrap_or_else(|| "raw".into());
        (b.name.clone(), fmt)
    });
    // The commit point.
    set_backing(
        &job.child_image,
        backing.as_ref().map(|(n, f)| (n.as_str(), f.as_str())),
    )
    .map_err(image_err)?;
    let after = (|| -> Result<(), TreeError> {
        // The child's own layer (for a non-leaf, `writer` is a private
        // descriptor without locks).
        let old = c_chain.leaf().clone();
        drop(writer);
        let new_leaf = reopen(&job.child_image, &old, leaf, c.name.as_str())?;
        drop(old);
        let new_chain = stack(new_leaf, &h_chain.layers()[1..]);
        relink(tree, job, new_chain, guard.take())?;
        // Nothing references H now. The manifest says so before the file
        // goes, so an interrupted cleanup is finished by the next open.
        tree.garbage.lock().push(manifest::ManifestPoint {
            name: job.hidden.name.clone(),
            image: file_name(&job.hidden_image),
            parent: None,
            created: job.hidden.created,
            hidden: true,
            format: None,
            disk: job.hidden.disk.clone(),
            garbage: true,
            memory: None,
        });
        tree.save_manifest()?;
        if let Err(e) = std::fs::remove_file(&job.hidden_image) {
            tree.problem(format!("{}: {e}", job.hidden_image.display()));
        } else {
            tree.garbage.lock().clear();
        }
        let _ = manifest::sync_dir(tree.dir());
        Ok(())
    })();
    if leaf {
        longest_pause = longest_pause.max(t.elapsed().as_secs_f64() * 1e3);
        tree.merge.writer_pause(longest_pause);
    }
    after.map_err(Failed::AfterCommit)?;
    Ok(copied)
}

/// Opens the child's image again after its file changed under the old
/// layer object `old`: writable with a writer lock for a leaf, else
/// read-only with a reader lock. The old descriptor's locks go first, as
/// ours would conflict with them.
fn reopen(
    path: &Path,
    old: &Arc<dyn Layer>,
    writable: bool,
    name: &str,
) -> Result<Arc<dyn Layer>, TreeError> {
    old.unlock();
    let l = probe::open_layer(path, Some(Format::Qcow2), writable).map_err(image_err)?;
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
fn relink(
    tree: &Tree,
    job: &Job,
    c_chain: Arc<Chain>,
    guard: Option<RwLockWriteGuard<'_, PointIo>>,
) -> Result<(), TreeError> {
    let (hid, cid) = (job.hidden.id, job.child.id);
    // C's chain first, then the structure: the lock order everywhere is
    // `nodes` before any point's `io`, so the guard goes before `nodes`.
    match guard {
        Some(mut g) => g.chain = c_chain.clone(),
        None => job.child.io.write().chain = c_chain.clone(),
    }
    {
        let mut nodes = tree.nodes.write();
        let parent = nodes.get(&hid).and_then(|n| n.parent);
        nodes.remove(&hid);
        if let Some(p) = parent.and_then(|p| nodes.get_mut(&p)) {
            for k in p.children.iter_mut() {
                if *k == hid {
                    *k = cid;
                }
            }
        }
        if let Some(n) = nodes.get_mut(&cid) {
            n.parent = parent;
        }
    }
    // Below C: each point's own layer over its parent's new chain.
    let mut queue = vec![(cid, c_chain)];
    while let Some((id, chain)) = queue.pop() {
        let kids: Vec<_> = {
            let nodes = tree.nodes.read();
            nodes
                .get(&id)
                .map(|n| {
                    n.children
                        .iter()
                        .filter_map(|k| nodes.get(k).map(|k| k.point.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        for k in kids {
            let mut io = k.io.write();
            let new = stack(io.chain.leaf().clone(), chain.layers());
            io.chain = new.clone();
            drop(io);
            queue.push((k.id, new));
        }
    }
    Ok(())
}

/// Copies what `src`'s own layer holds inside `ranges` into `dst`, in
/// steps; returns the bytes copied.
fn copy_held(
    tree: &Tree,
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
        tree,
        throttle,
        src,
        dst,
        &steps(&pieces, throttle.step_bytes),
    )
}

fn commit(tree: &Tree, job: &Job, throttle: &Throttle, h_chain: &Chain) -> Result<u64, Failed> {
    let c = &job.child;
    let (c_chain, leaf) = {
        let io = c.io.read();
        (io.chain.clone(), io.writable)
    };
    let w = probe::open_layer(&job.hidden_image, Some(Format::Qcow2), true).map_err(image_err)?;
    let hw = stack(w.clone(), &h_chain.layers()[1..]);
    if leaf {
        c_chain.dirty.start();
    }
    let r = commit_copy(tree, job, throttle, h_chain, &c_chain, &hw, &w, leaf);
    c_chain.dirty.stop();
    r
}

#[allow(clippy::too_many_arguments)]
fn commit_copy(
    tree: &Tree,
    job: &Job,
    throttle: &Throttle,
    h_chain: &Chain,
    c_chain: &Arc<Chain>,
    hw: &Arc<Chain>,
    w: &Arc<dyn Layer>,
    leaf: bool,
) -> Result<u64, Failed> {
    let c = &job.child;
    let mut pass = 1;
    let t = Instant::now();
    let mut copied = copy_held(tree, throttle, c_chain, hw, &[(0, c_chain.size())])?;
    let mut pending = Vec::new();
    if leaf {
        let mut pass_copied = copied;
        let mut pass_start = t;
        let mut last = u64::MAX;
        loop {
            let dirty = c_chain.dirty.take();
            let d = total(&dirty);
            tree.merge.pass_done(
                PassReport {
                    pass,
                    copied: pass_copied,
                    dirtied: d,
                    millis: pass_start.elapsed().as_millis() as u64,
                },
                d,
            );
            if d <= FINAL_PASS_BYTES || pass >= MAX_PASSES || d >= last {
                pending = dirty;
                break;
            }
            last = d;
            pass += 1;
            pass_start = Instant::now();
            pass_copied = copy_held(tree, &Throttle::full(), c_chain, hw, &dirty)?;
            copied += pass_copied;
        }
    }
    // Make the passes so far durable while writers still run, so the
    // paused part flushes only the last pass.
    hw.flush().map_err(chain_err)?;
    // The last pass and the commit, with the leaf's I/O paused.
    let t = Instant::now();
    let mut guard = Some(c.io.write());
    if leaf {
        pending.extend(c_chain.dirty.take());
        pending.sort_unstable();
        let n = copy_held(tree, &Throttle::full(), c_chain, hw, &pending)?;
        copied += n;
        tree.merge.pass_done(
            PassReport {
                pass: pass + 1,
                copied: n,
                dirtied: 0,
                millis: t.elapsed().as_millis() as u64,
            },
            0,
        );
    } else {
        // Nothing writes a non-leaf; readers need not wait for the copy.
        guard = None;
    }
    hw.flush().map_err(chain_err)?;
    // Our reader lock on H would refuse H's writer lock as the new leaf.
    h_chain.leaf().unlock();
    if guard.is_none() && !leaf {
        guard = Some(c.io.write());
    }
    // The commit point.
    if let Err(e) = std::fs::rename(&job.hidden_image, &job.child_image) {
        let _ = h_chain.leaf().lock(LockMode::Reader);
        return Err(Failed::BeforeCommit(err(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!(
                "rename {} to {}: {e}",
                job.hidden_image.display(),
                job.child_image.display()
            ),
        )));
    }
    let after = (|| -> Result<(), TreeError> {
        let _ = manifest::sync_dir(tree.dir());
        let new_leaf: Arc<dyn Layer> = if leaf {
            w.lock(LockMode::Writer)
                .map_err(|why| err(libc::EBUSY, format!("{}: {why}", job.child_image.display())))?;
            w.clone()
        } else {
            reopen(&job.child_image, c_chain.leaf(), false, &c.name)?
        };
        c_chain.leaf().unlock();
        let new_chain = stack(new_leaf, &h_chain.layers()[1..]);
        relink(tree, job, new_chain, guard.take())
    })();
    drop(guard);
    if leaf {
        tree.merge.writer_pause(t.elapsed().as_secs_f64() * 1e3);
    }
    after.map_err(Failed::AfterCommit)?;
    Ok(copied)
}
