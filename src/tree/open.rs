//! Building a `Tree` from a source (a directory of images, or one leaf
//! image): finish interrupted snapshots, find the images, name them (from
//! the manifest, else by file stem), report what disagrees or is broken,
//! and open a chain per point that shares layer objects with its parent.

mod build;
mod internal;

use super::discover::{self, Found};
use super::manifest::{self, Manifest};
use super::{StatusLog, Tree, TreeOptions};
use crate::confine::Confine;
use crate::image::lock::LockMode;
use crate::image::{probe, Format, Layer};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// Suffix of an overlay created by `snapshot` before it is renamed into
/// place; a crash can leave one behind (see `recover_snapshots`).
pub const TMP_SUFFIX: &str = ".snaptree-tmp";

/// Work of a layer above the tree that a read-write open must finish
/// before anything else reads the directory: it runs under the tree lock,
/// after interrupted snapshots are finished and before the images are
/// discovered, and reports what it found in `problems` (shown in
/// `status`). The tree defines it and does not know who implements it:
/// the merge engine's journal recovery does (`merge::Engine::open`).
pub trait Recovery {
    fn recover(&mut self, dir: &Path, problems: &mut Vec<String>);
}

/// Why a tree could not be opened at all (problems with single images
/// are no failure: they go to `status`).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The source or the tree directory could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `.snaptree.lock` is no regular file (a FIFO planted there, say).
    #[error("{}: not a regular file; remove it (snaptree keeps its lock there)", .path.display())]
    LockNotAFile { path: PathBuf },
    /// Another read-write opener holds the tree.
    #[error("{} is in use by another snaptree (mounted read-write, or a `snaptree merge` running); unmount it first, or mount with -o ro", .dir.display())]
    InUse { dir: PathBuf },
    #[error(transparent)]
    OverBudget(#[from] crate::fdlimit::OverBudget),
    /// Not one image could be used; `problems` says why for each.
    #[error("no usable image found in {}{}", .source_path.display(), .problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    NothingUsable {
        source_path: PathBuf,
        problems: Vec<String>,
    },
}

impl OpenError {
    /// The errno a mount or command reports for it.
    pub fn errno(&self) -> i32 {
        match self {
            OpenError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            OpenError::LockNotAFile { .. } => libc::EINVAL,
            OpenError::InUse { .. } => libc::EBUSY,
            OpenError::OverBudget(e) => e.errno(),
            OpenError::NothingUsable { .. } => libc::ENOENT,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Tree {
    /// Opens the tree at `source`. Fails only when nothing usable is found;
    /// individual broken images are reported in `status`. A read-write
    /// open runs `recovery` under the tree lock, before discovery.
    pub fn open(
        source: &Path,
        opts: TreeOptions,
        recovery: &mut dyn Recovery,
    ) -> Result<Tree, OpenError> {
        let canon = source.canonicalize().map_err(io_err(source))?;
        let is_dir = canon.is_dir();
        let dir = tree_dir(&canon, is_dir);
        let mut problems = Vec::new();
        let tree_lock = take_over(&dir, opts.read_only, recovery, &mut problems)?;
        let confine = Confine::new(&dir, opts.allow_external_backing).map_err(io_err(&dir))?;
        let mut found = find_images(&canon, is_dir, &confine, opts.max_depth, &mut problems)
            .map_err(io_err(&dir))?;
        let manifest = match manifest::load(&dir) {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                problems.push(e.to_string());
                manifest::Manifest::default()
            }
        };
        let mut manifest = manifest;
        if let Some(records) = opts.records.clone() {
            super::records::apply(&records, &mut manifest, &found, &dir, &mut problems);
        }
        drop_memory_files(&mut found, &manifest, &dir);
        problems.extend(super::hyperv::memory_notes(&dir, &found));
        apply_manifest_formats(&mut found, &manifest, &dir, &confine);
        // Every image stays open (its descriptor holds its lock): refuse a
        // tree the open-file limit cannot hold before opening any of it,
        // rather than mount part of it.
        let memories = manifest.points.iter().filter(|p| p.memory.is_some());
        let images = found.values().filter(|f| f.broken.is_none()).count();
        crate::fdlimit::check_budget((images + memories.count()) as u64, &dir)?;
        let mut tree = Tree::unbuilt(dir, confine, opts, !is_dir, tree_lock);
        tree.build(found, manifest, &mut problems);
        if tree.nodes.read().is_empty() {
            return Err(OpenError::NothingUsable {
                source_path: source.to_path_buf(),
                problems,
            });
        }
        tree.status.lock().problems = problems;
        tree.sweep_memory(true);
        Ok(tree)
    }

    /// A tree with no points yet, for `build` to fill: `single_chain` when
    /// it was opened from one leaf image rather than a directory, and
    /// `tree_lock` the held lock of a read-write opener.
    fn unbuilt(
        dir: PathBuf,
        confine: Confine,
        opts: TreeOptions,
        single_chain: bool,
        tree_lock: Option<std::fs::File>,
    ) -> Tree {
        Tree {
            dir,
            confine,
            opts,
            nodes: RwLock::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            status: Mutex::new(StatusLog::default()),
            foreign: Vec::new(),
            garbage: Mutex::new(Vec::new()),
            single_chain,
            _tree_lock: tree_lock,
            ops: Mutex::new(()),
            commands_waiting: Default::default(),
            closing: AtomicBool::new(false),
            unlocked: Mutex::new(Default::default()),
            pinned_memory: Vec::new(),
        }
    }
}

/// The tree's directory: `canon` itself, or the directory of the leaf
/// image `canon` when the tree is opened from one image.
fn tree_dir(canon: &Path, is_dir: bool) -> PathBuf {
    if is_dir {
        canon.to_path_buf()
    } else {
        canon
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"))
    }
}

/// For a read-write opener: takes the tree lock, then finishes what a
/// crash interrupted (snapshots; through `recovery`, merges and their
/// garbage; leaked memory-delta clusters), reporting it in `problems`.
/// Returns the lock (`None` when read-only).
fn take_over(
    dir: &Path,
    read_only: bool,
    recovery: &mut dyn Recovery,
    problems: &mut Vec<String>,
) -> Result<Option<std::fs::File>, OpenError> {
    // One read-write opener per tree: a second one (a `snaptree merge`
    // while mounted, two mounts) would recover the first one's
    // in-flight snapshots and merges and write the same images.
    let tree_lock = if read_only {
        None
    } else {
        Some(lock_tree(dir)?)
    };
    if !read_only {
        recover_snapshots(dir, problems);
        recovery.recover(dir, problems);
        super::memory::repair_memory_deltas(dir, problems);
    }
    Ok(tree_lock)
}

/// The images of the tree: every image in the confinement's root when
/// opened from a directory (what was skipped goes to `problems`), else the
/// chain of the leaf image `canon`.
fn find_images(
    canon: &Path,
    is_dir: bool,
    confine: &Confine,
    max_depth: usize,
    problems: &mut Vec<String>,
) -> std::io::Result<BTreeMap<PathBuf, Found>> {
    if is_dir {
        discover::scan_dir(confine).map(|scan| {
            problems.extend(scan.skipped);
            scan.found
        })
    } else {
        discover::scan_chain(canon, confine, max_depth)
    }
}

/// Memory checkpoints the manifest names are no disk images, even when
/// named like raw ones (`*.raw`); unless an image backs onto the file or
/// the manifest names it as a point's image too: then it is a disk, and
/// the memory naming it is refused (in `build`).
fn drop_memory_files(found: &mut BTreeMap<PathBuf, Found>, manifest: &Manifest, dir: &Path) {
    let disks_named: HashSet<String> = manifest
        .points
        .iter()
        .filter(|p| !p.garbage)
        .map(|p| p.image.clone())
        .collect();
    for m in manifest.points.iter().filter_map(|p| p.memory.as_deref()) {
        let Ok(p) = dir.join(m).canonicalize() else {
            continue;
        };
        let backed_onto = found.values().any(|f| f.backing.as_ref() == Some(&p));
        let named = p
            .strip_prefix(dir)
            .is_ok_and(|r| disks_named.contains(r.to_string_lossy().as_ref()));
        if !backed_onto && !named {
            found.remove(&p);
        }
    }
}

/// Re-reads as raw the images the manifest says are raw (a raw image's
/// content may look like another format).
fn apply_manifest_formats(
    found: &mut BTreeMap<PathBuf, Found>,
    manifest: &Manifest,
    dir: &Path,
    confine: &Confine,
) {
    let raw_by_manifest: Vec<PathBuf> = manifest
        .points
        .iter()
        .filter(|m| m.format.as_deref() == Some("raw"))
        .map(|m| dir.join(&m.image))
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    discover::force_raw(found, raw_by_manifest, confine);
}

/// Opens the image of point `name`, for writing if `want_write` and
/// nobody else uses it, and takes QEMU-compatible locks. A leaf another
/// process uses is opened read-only; a layer another process writes is
/// opened without a lock. Both are reported in `problems`. Returns the
/// layer, whether it is writable, and whether we hold its lock.
pub(super) fn open_point_layer(
    path: &Path,
    format: Format,
    want_write: bool,
    name: &str,
    problems: &mut Vec<String>,
) -> Result<(Arc<dyn Layer>, bool, bool), crate::error::ImageError> {
    if want_write {
        let mut opened = probe::open_layer(path, Some(format), true);
        if opened.is_err() && recover_dirty(path, format, name, problems) {
            opened = probe::open_layer(path, Some(format), true);
        }
        match opened {
            Ok(l) => match l.lock(LockMode::Writer) {
                Ok(()) => return Ok((l, true, true)),
                Err(why) => problems.push(format!("{name}: read-only: {}: {why}", path.display())),
            },
            Err(e) => problems.push(format!("{name}: read-only: {e}")),
        }
    }
    let layer = probe::open_layer(path, Some(format), false)?;
    if let Err(why) = layer.lock(LockMode::Reader) {
        problems.push(format!(
            "{name}: {}: {why}; mounted without a lock, so what it reads may change",
            path.display()
        ));
        return Ok((layer, false, false));
    }
    Ok((layer, false, true))
}

/// Repairs an image a crash left marked dirty (refcounts in flux, as a
/// killed snapshot deletion leaves them), holding its write lock, the way
/// QEMU repairs one it opens for writing. True when it repaired, so the
/// read-write open is worth another try; what happened is a `status` line.
fn recover_dirty(path: &Path, format: Format, name: &str, problems: &mut Vec<String>) -> bool {
    let Some(repair) = format.driver().repair() else {
        return false;
    };
    let accept = crate::input::Accept::RegularOrBlock;
    let Ok(file) = crate::input::open_input(path, true, accept) else {
        return false;
    };
    // Another writer's lock: the read-only open that follows says so.
    if crate::image::lock::acquire(&file, LockMode::Writer).is_err() {
        return false;
    }
    let done = match repair.repair_dirty(&file, path) {
        Ok(Some(n)) => {
            problems.push(format!(
                "{name}: {}: was marked dirty by an interrupted write; repaired ({n} refcounts and flags corrected)",
                path.display()
            ));
            true
        }
        Ok(None) => false,
        Err(e) => {
            problems.push(format!("{name}: repair of the dirty image: {e}"));
            false
        }
    };
    crate::image::lock::release(&file);
    done
}

/// Name of the lock file a read-write opener holds in the tree directory.
pub const TREE_LOCK_NAME: &str = ".snaptree.lock";

/// Takes the tree's exclusive lock (an OFD-independent `flock`, released
/// when the process dies), or says who to blame.
fn lock_tree(dir: &Path) -> Result<std::fs::File, OpenError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let path = dir.join(TREE_LOCK_NAME);
    // O_NONBLOCK: a FIFO planted under this name must not block the open
    // (nothing is ever read or written through this descriptor).
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(io_err(&path))?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(OpenError::LockNotAFile { path });
    }
    // A mount that was just unmounted may still be flushing on its way
    // out: give it a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // SAFETY: flock on a descriptor we own.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        if std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        return Err(OpenError::InUse {
            dir: dir.to_path_buf(),
        });
    }
    Ok(f)
}

/// A point name for `status`: quoted, or "no parent".
fn point_or_none(name: Option<&String>) -> String {
    name.map_or_else(|| "no parent (a root)".into(), |n| format!("{n:?}"))
}

fn mtime(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Finishes or undoes snapshots a crash interrupted: an overlay
/// `X.snaptree-tmp` whose backing file exists and whose target `X` does
/// not is renamed into place; any other leftover is removed.
fn recover_snapshots(dir: &Path, problems: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(target) = name.strip_suffix(TMP_SUFFIX) else {
            continue;
        };
        let target = dir.join(target);
        let tmp = e.path();
        let backing_ok = probe::open_layer(&tmp, None, false)
            .ok()
            .and_then(|l| l.backing().map(|b| dir.join(&b.name).exists()))
            .unwrap_or(false);
        let outcome = if !target.exists() && backing_ok {
            std::fs::rename(&tmp, &target).map(|_| "completed")
        } else {
            std::fs::remove_file(&tmp).map(|_| "rolled back")
        };
        match outcome {
            Ok(what) => problems.push(format!(
                "an interrupted snapshot ({}) was {what}",
                target.display()
            )),
            Err(err) => problems.push(format!(
                "{}: cannot recover interrupted snapshot: {err}",
                tmp.display()
            )),
        }
    }
    let _ = manifest::sync_dir(dir);
}
