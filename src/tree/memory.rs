//! Memory checkpoints of snapshot points: attaching a source file in place
//! (`memory SOURCE`), importing one as a page-delta checkpoint against the
//! parent's memory (`checkpoint SOURCE`, see `memory::checkpoint`), and
//! keeping the deltas right when the tree changes.
//!
//! Deltas live in `SOURCE/.snaptree-memory/`, out of sight of disk
//! discovery. A point's delta backs onto its parent point's delta (only
//! ever its direct parent's), so when the merge engine coalesces a hidden
//! point into its only child, the child's delta is first made independent
//! of the hidden point's (the hidden delta's pages stream into it where it
//! has none, then one header write names the hidden delta's parent: the
//! same stream-and-repoint as a disk merge, crash-safe the same way), and
//! the hidden point's delta is removed once no point names it. Files in
//! the memory directory that no point names and no named delta backs onto
//! are removed after every manifest write ([`Tree::sweep_memory`]); other
//! sources (migration streams, dumps) are never written or removed. Their
//! indexes are cached in `.snaptree-memory/index/` (see
//! `memory::index_cache`), and dropped with the last point naming them.

use super::ops::{err, rename_noreplace};
use super::{manifest, PointDisk, PointMemory, Tree, TreeError};
use crate::chain::{Chain, OpenOptions};
use crate::memory::checkpoint::{self, Base, ImportStats, Throttle};
use crate::memory::index_cache;
use crate::memory::view::MemoryView;
use crate::ownership::Ownership;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where page-delta checkpoints live, relative to the tree directory.
pub const MEMORY_DIR: &str = ".snaptree-memory";
/// Suffix of a delta being imported (removed at open if a crash left it).
const IMPORTING: &str = ".importing";
/// Index caches of sources read in place, in the memory directory.
const INDEX_DIR: &str = "index";

/// What a `checkpoint` command imports into (see `Tree::checkpoint_target`).
struct CheckpointTarget {
    /// The visible point that gets the checkpoint.
    point: Arc<PointDisk>,
    /// The delta the import goes against: the parent point's, if ours.
    base: Option<Arc<MemoryView>>,
    /// The source as the manifest will name it.
    source_name: String,
}

impl Tree {
    /// The memory index cache directory, unless the tree is read-only.
    fn index_cache(&self) -> Option<PathBuf> {
        (!self.opts.read_only).then(|| self.dir.join(MEMORY_DIR).join(INDEX_DIR))
    }

    /// The memory `source` names, opened (see [`PointMemory::open`]),
    /// once it passed the confinement check: a manifest may name any
    /// file, and `memory.raw` would show it to whoever reads the mount.
    pub(crate) fn open_memory(&self, source: &str) -> PointMemory {
        if let Err(why) = self.confine.reference(&self.dir, source) {
            return PointMemory {
                source: source.to_string(),
                view: Err(format!("not opened: {why}")),
            };
        }
        PointMemory::open(&self.dir, source, self.index_cache().as_deref())
    }

    /// Gives `point` the memory file its VM manager's record names (see
    /// `records`), on the point's first recorded disk. The record is the
    /// host's own configuration, so the file may lie outside the tree
    /// directory; it must still be a regular file (a FIFO or a device
    /// would block or leak whatever it is), which is checked here again.
    pub(super) fn attach_recorded_memory(&self, point: &PointDisk, problems: &mut Vec<String>) {
        let Some(r) = self
            .opts
            .records
            .as_ref()
            .and_then(|r| r.point(&point.name))
        else {
            return;
        };
        let Some(path) = &r.memory else {
            return;
        };
        let first = r
            .overlays
            .iter()
            .chain(&r.images)
            .map(|(d, _)| d)
            .min()
            .cloned()
            .flatten();
        if point.internal.is_none() && point.disk != first {
            return;
        }
        let mem = if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
            let source = path.to_string_lossy();
            PointMemory::open(&self.dir, &source, self.index_cache().as_deref())
        } else {
            PointMemory {
                source: path.to_string_lossy().into_owned(),
                view: Err("not opened: not a regular file".into()),
            }
        };
        if let Err(why) = &mem.view {
            problems.push(format!(
                "{:?}: memory {}: {why}",
                point.name,
                path.display()
            ));
        }
        *point.memory.write() = Some(mem);
    }

    /// The snapshot point `id`'s memory view, if it has a readable one.
    fn memory_view(point: &PointDisk) -> Option<Arc<MemoryView>> {
        point
            .memory
            .read()
            .as_ref()
            .and_then(|m| m.view.as_ref().ok().cloned())
    }

    /// The member of point `id`'s snapshot point that carries its memory
    /// (the first disk, unless a merge moved things).
    fn memory_holder(&self, id: u64) -> Option<Arc<PointDisk>> {
        let members = self.members(id);
        members
            .iter()
            .find(|m| m.memory.read().is_some())
            .or(members.first())
            .cloned()
    }

    /// `SOURCE` as the manifest will name it (relative to the tree when
    /// inside it), refusing files that are disks of this tree. A source
    /// named through the mount (`confined`) must pass the confinement
    /// check like a manifest's: whoever may write `ctl` must not make the
    /// mount show any host file; one typed on snaptree's command line is
    /// the user's own choice.
    fn memory_source_name(&self, source: &str, confined: bool) -> Result<String, TreeError> {
        let canon = if confined {
            self.confine.reference(&self.dir, source).map_err(|why| {
                let errno = match why {
                    crate::confine::Refused::Missing { .. } => libc::ENOENT,
                    crate::confine::Refused::Outside { .. } => libc::EACCES,
                    crate::confine::Refused::Invalid { .. } => libc::EINVAL,
                };
                err(errno, format!("memory source {why}"))
            })?
        } else {
            let path = self.dir.join(source);
            path.canonicalize()
                .map_err(|e| err(libc::ENOENT, format!("{}: {e}", path.display())))?
        };
        if self
            .nodes
            .read()
            .values()
            .any(|n| n.point.io.read().image == canon)
        {
            return Err(err(
                libc::EINVAL,
                format!(
                    "{} is a disk image of this tree, not a memory checkpoint",
                    canon.display()
                ),
            ));
        }
        Ok(canon
            .strip_prefix(&self.dir)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_else(|_| canon.to_string_lossy().into_owned()))
    }

    /// `memory SOURCE` on point `id`: shows the memory checkpoint in
    /// `SOURCE` (a QEMU migration stream, libvirt save image, ELF core or
    /// raw dump; relative to the tree directory, or absolute) as the
    /// point's `memory.raw`, read in place. `None` detaches it. Only the
    /// manifest changes; the file is never written (a page-delta
    /// checkpoint detached this way is removed unless another delta backs
    /// onto it).
    pub fn set_memory(&self, id: u64, source: Option<&str>) -> Result<(), TreeError> {
        self.writable_check()?;
        let _ops = self.lock_ops();
        let point = self
            .view(id)
            .ok_or_else(|| err(libc::ENOENT, "no such snapshot point"))?
            .point;
        let mem = match source {
            None => None,
            Some(s) => {
                let name = self.memory_source_name(s, true)?;
                let m = self.open_memory(&name);
                if let Err(why) = &m.view {
                    return Err(err(libc::EINVAL, why.clone()));
                }
                Some(m)
            }
        };
        *point.memory.write() = mem;
        self.save_manifest()
    }

    /// What `checkpoint` works on, checked under the ops lock: the visible
    /// point `id` (which must have no memory yet), the delta its import
    /// goes against (its parent's, if that is one of ours) and the source's
    /// name as the manifest will record it (see `memory_source_name`).
    fn checkpoint_target(
        &self,
        id: u64,
        source: &str,
        confined: bool,
    ) -> Result<CheckpointTarget, TreeError> {
        let _ops = self.lock_ops();
        let point = self
            .view(id)
            .filter(|v| !v.hidden)
            .ok_or_else(|| err(libc::ENOENT, "no such snapshot point"))?
            .point;
        if let Some(m) = point.memory.read().as_ref() {
            return Err(err(
                libc::EEXIST,
                format!(
                    "{:?} has a memory checkpoint already ({}); `memory none` first",
                    point.name, m.source
                ),
            ));
        }
        Ok(CheckpointTarget {
            point: point.clone(),
            base: self.delta_base(id),
            source_name: self.memory_source_name(source, confined)?,
        })
    }

    /// Opens `source_name` (in the tree directory) as the full memory image
    /// a checkpoint imports. A qcow2 delta is refused: it is attached with
    /// `memory`, not imported.
    fn open_full_source(&self, source_name: &str) -> Result<MemoryView, TreeError> {
        let src =
            crate::memory::view::open_view(&self.dir, source_name, self.index_cache().as_deref())
                .map_err(|why| err(libc::EINVAL, why.to_string()))?;
        if src.delta {
            return Err(err(
                libc::EINVAL,
                format!(
                    "{} is a qcow2 image; attach it with `memory {source_name}` instead",
                    src.path.display()
                ),
            ));
        }
        Ok(src)
    }

    /// `checkpoint SOURCE` on point `id`: imports the memory source as a
    /// page-delta checkpoint against the parent point's delta (or as a
    /// whole one when the parent has none), throttled by `throttle`;
    /// `progress` sees each step and may cancel. The tree is not locked
    /// while the pages are copied; the new delta is attached at the end if
    /// the point and its parent's memory are still what they were.
    pub fn checkpoint(
        &self,
        id: u64,
        source: &str,
        confined: bool,
        throttle: Throttle,
        progress: &mut dyn FnMut(&ImportStats) -> bool,
    ) -> Result<ImportStats, TreeError> {
        self.writable_check()?;
        let CheckpointTarget {
            point,
            base,
            source_name,
        } = self.checkpoint_target(id, source, confined)?;
        let parent = self.nodes.read().get(&id).and_then(|n| n.parent);
        let src = self.open_full_source(&source_name)?;
        let mem_dir = crate::confine::own_dir(&self.dir, MEMORY_DIR)
            .map_err(|e| err(libc::EIO, format!("{e}")))?;
        let tmp = mem_dir.join(format!(".{}{IMPORTING}", point.name));
        let stats = checkpoint::import(
            &src.chain,
            base.as_ref().map(|b| Base {
                view: &b.chain,
                backing_name: file_name(&b.path),
            }),
            &tmp,
            // The delta holds the source's pages: as private as it is.
            Some(
                Ownership::of(&src.path)
                    .map_err(|e| err(libc::EIO, format!("{}: {e}", src.path.display())))?,
            ),
            throttle,
            progress,
        )
        .map_err(|e| {
            if e.errno() != libc::EEXIST {
                let _ = std::fs::remove_file(&tmp);
            }
            let msg = match e.errno() {
                libc::EEXIST => format!(
                    "{} exists: another import into {:?} is running (or a crash left it; \
                     it is removed at the next read-write open)",
                    tmp.display(),
                    point.name
                ),
                _ => format!("importing {source_name}: {e}"),
            };
            err(e.errno(), msg)
        })?;
        let attached = self.attach_delta(id, &point, parent, base.as_ref(), &tmp, &mem_dir);
        if attached.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        attached.map(|_| stats)
    }

    /// The delta a new checkpoint of point `id` is made against: its
    /// parent point's, if that is a page-delta checkpoint.
    /// Only snaptree's own deltas qualify: a qcow2 attached in place
    /// elsewhere could not be named as a backing file from the memory
    /// directory (nor is it ours to merge).
    fn delta_base(&self, id: u64) -> Option<Arc<MemoryView>> {
        let parent = self.nodes.read().get(&id)?.parent?;
        let holder = self.memory_holder(parent)?;
        Self::memory_view(&holder).filter(|v| self.is_own_delta(v))
    }

    /// A page-delta checkpoint in the tree's memory directory.
    fn is_own_delta(&self, v: &MemoryView) -> bool {
        v.delta && canon(&v.path).parent() == Some(canon(&self.dir.join(MEMORY_DIR)).as_path())
    }

    /// Renames the imported delta into place and names it in the
    /// manifest, if nothing changed under the import.
    /// Nothing changed means: the point is still there, still under the
    /// same parent (a `snapshot` of a leaf puts a new point between), and
    /// the parent's memory is the very view the delta was made against (a
    /// path is not enough: a delta detached, swept and imported anew can
    /// reuse the name).
    fn attach_delta(
        &self,
        id: u64,
        point: &Arc<PointDisk>,
        parent: Option<u64>,
        base: Option<&Arc<MemoryView>>,
        tmp: &Path,
        mem_dir: &Path,
    ) -> Result<(), TreeError> {
        let _ops = self.lock_ops();
        let still = self
            .view(id)
            .is_some_and(|v| !v.hidden && Arc::ptr_eq(&v.point, point))
            && self.nodes.read().get(&id).and_then(|n| n.parent) == parent;
        let same_base = match (self.delta_base(id), base) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(&a, b),
            _ => false,
        };
        if !still || point.memory.read().is_some() || !same_base {
            return Err(err(
                libc::EAGAIN,
                format!(
                    "the tree changed during the import ({:?} or its parent's memory); run it again",
                    point.name
                ),
            ));
        }
        let mut n = 0;
        let target = loop {
            let name = match n {
                0 => format!("{}.qcow2", point.name),
                _ => format!("{}.{n}.qcow2", point.name),
            };
            let t = mem_dir.join(name);
            if !t.exists() {
                break t;
            }
            n += 1;
        };
        rename_noreplace(tmp, &target)?;
        let _ = manifest::sync_dir(mem_dir);
        let name = format!("{MEMORY_DIR}/{}", file_name(&target));
        let m = self.open_memory(&name);
        if let Err(why) = &m.view {
            let _ = std::fs::remove_file(&target);
            return Err(err(
                libc::EIO,
                format!("the new checkpoint does not open: {why}"),
            ));
        }
        *point.memory.write() = Some(m);
        self.save_manifest()
    }

    /// The page-delta checkpoint (in the tree's memory directory) that
    /// carries point `id`'s memory, if it has a readable one.
    pub fn own_memory_delta(&self, id: u64) -> Option<Arc<MemoryView>> {
        let holder = self.memory_holder(id)?;
        Self::memory_view(&holder).filter(|v| self.is_own_delta(v))
    }

    /// Opens anew every memory view whose chain runs through the delta
    /// file `delta` (after a merge re-pointed it); views already open
    /// keep reading through the old chain.
    pub fn reopen_memory_through(&self, delta: &Path) {
        let file = canon(delta);
        for p in self.all_points() {
            let through = Self::memory_view(&p).is_some_and(|v| {
                v.delta && v.chain.layers().iter().any(|l| canon(l.path()) == file)
            });
            if through {
                let source = p.memory.read().as_ref().map(|m| m.source.clone());
                if let Some(s) = source {
                    *p.memory.write() = Some(self.open_memory(&s));
                }
            }
        }
    }

    /// Removes files of the memory directory that no point names and no
    /// named delta backs onto (see the module docs). Does nothing when a
    /// named memory does not open (what it needs cannot be told), and
    /// never touches imports in progress.
    pub(crate) fn sweep_memory(&self, at_open: bool) {
        let mem_dir = self.dir.join(MEMORY_DIR);
        // Never a symlink: the sweep removes files in it.
        if self.opts.read_only || !crate::confine::is_real_dir(&mem_dir) {
            return;
        }
        let mut keep: HashSet<PathBuf> = HashSet::new();
        let points = self.all_points();
        for p in points {
            match p.memory.read().as_ref().map(|m| &m.view) {
                None => {}
                Some(Ok(v)) => keep.extend(v.chain.layers().iter().map(|l| canon(l.path()))),
                Some(Err(_)) => return,
            }
        }
        let named = self.foreign.iter().filter_map(|m| m.memory.as_deref());
        for f in named.chain(self.pinned_memory.iter().map(String::as_str)) {
            let path = self.dir.join(f);
            keep.insert(canon(&path));
            if path.starts_with(&mem_dir) && path.exists() {
                match Chain::open(&path, &OpenOptions::default()) {
                    Ok(c) => keep.extend(c.layers().iter().map(|l| canon(l.path()))),
                    Err(_) => return,
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&mem_dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = if name.starts_with('.') {
                at_open && name.ends_with(IMPORTING)
            } else {
                is_delta_name(&name)
            };
            if ours && !keep.contains(&canon(&path)) {
                match std::fs::remove_file(&path) {
                    Ok(()) => tracing::info!("removed unused memory delta {}", path.display()),
                    Err(e) => self.problem(format!("{}: {e}", path.display())),
                }
            }
        }
        let _ = manifest::sync_dir(&mem_dir);
        // Index caches of sources no point names any more.
        let index_dir = mem_dir.join(INDEX_DIR);
        let wanted: HashSet<PathBuf> = keep
            .iter()
            .map(|p| index_cache::file_for(&index_dir, p))
            .collect();
        for e in std::fs::read_dir(&index_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if !wanted.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Whether `name`, a file of the memory directory, is a page-delta
/// checkpoint (an import in progress starts with a dot).
fn is_delta_name(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".qcow2")
}

/// Frees the clusters a kill left leaked in the page-delta checkpoints of
/// the memory directory of the tree in `dir`: a merge copies pages into a
/// child's delta before its journal exists, and an import writes its
/// delta with none at all, so no journal names them. The deltas are
/// snaptree's own files, and the tree lock keeps every other writer out.
pub(super) fn repair_memory_deltas(dir: &Path, problems: &mut Vec<String>) {
    let mem_dir = dir.join(MEMORY_DIR);
    if !crate::confine::is_real_dir(&mem_dir) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(&mem_dir) else {
        return;
    };
    for e in entries.flatten() {
        let own_delta = e.file_type().is_ok_and(|t| t.is_file())
            && e.file_name().to_str().is_some_and(is_delta_name);
        if own_delta {
            problems.extend(crate::image::formats::repair_and_report(
                &e.path(),
                "merge or import",
            ));
        }
    }
}

fn canon(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}
