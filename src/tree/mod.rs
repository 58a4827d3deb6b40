//! The snapshot tree: snapshot points, their parent/child links, names,
//! hidden flags, and the operations that change them (snapshot, clone,
//! delete). FUSE-free: the `fs` module presents it, the CLI opens it.
//!
//! Concurrency: the structure (`nodes`) sits behind an `RwLock` taken
//! briefly. Each point's I/O state (its chain and whether it is writable)
//! sits behind the point's own `RwLock`: every read or write of its disk
//! holds the read side for the whole request, and structural operations
//! take the write side, so they wait for in-flight I/O on that point and
//! no write can land in an image after it stopped being a leaf.
//! Structural operations are serialised by `ops`.
//!
//! The tree does not know the merge engine (`merge` uses the tree, never
//! the other way): the engine reads and changes the structure through
//! the methods in `coalesce`, and its recovery at open comes in through
//! [`Recovery`] (ARCHITECTURE.md, "Layers").

mod close;
mod coalesce;
mod hyperv;
mod internal_delete;
pub use coalesce::StillLocked;
pub mod discover;
pub mod manifest;
mod memory;
pub mod naming;
mod open;
pub mod records;
pub use open::{OpenError, Recovery};
mod ops;
mod render;
pub use render::one_line;

use crate::chain::Chain;
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;

/// How to open a tree.
#[derive(Clone, Debug)]
pub struct TreeOptions {
    pub read_only: bool,
    pub allow_external_backing: bool,
    pub max_depth: usize,
    /// How fast `checkpoint SOURCE` imports memory (mounts only; the CLI
    /// passes its own).
    pub import: crate::memory::checkpoint::Throttle,
    /// Names no point may take: the mount's own entries at its root.
    /// The mount's layout owns them (`fs::reserved_names`); the tree
    /// only refuses them, also in the manifest at open.
    pub reserved_names: Vec<String>,
    /// A VM manager's snapshot records (libvirt's), laid over the
    /// manifest at open (see `records`); `None` for a plain directory.
    pub records: Option<std::sync::Arc<records::Records>>,
}

/// A failed tree operation: the errno for the file system call and the
/// reason for `status`.
#[derive(Debug, Clone)]
pub struct TreeError {
    pub errno: i32,
    pub message: String,
}

impl TreeError {
    pub fn new(errno: i32, message: impl Into<String>) -> TreeError {
        TreeError {
            errno,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TreeError {}

/// What one disk of a point reads through, and whether it may be written.
pub struct DiskIo {
    pub chain: Arc<Chain>,
    /// Canonical path of the point's own image file.
    pub image: PathBuf,
    pub writable: bool,
}

/// One disk of a snapshot point: a snapshot point is the group of
/// `PointDisk`s that share a name (one for single-disk VMs). Its id (and so
/// its inode numbers) never changes.
pub struct PointDisk {
    pub id: u64,
    pub name: String,
    /// Which disk of a multi-disk snapshot point this is (`None` when the
    /// point has one disk). The points of one name form one snapshot point
    /// shown as one directory, one file per member.
    pub disk: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub io: RwLock<DiskIo>,
    /// The memory checkpoint saved with this point, if any (on the first
    /// disk of a multi-disk point).
    pub memory: RwLock<Option<PointMemory>>,
    /// Set on a point that is an internal snapshot of its image (read-only;
    /// not in the manifest: the image's snapshot table records it).
    pub internal: Option<InternalPoint>,
}

/// What an image's snapshot table says about an internal-snapshot point,
/// for `info.json`.
#[derive(Clone, Debug)]
pub struct InternalPoint {
    pub tag: String,
    pub id: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
    pub vm_state_size: u64,
}

/// A point's memory: the source file the manifest names, and its view, or
/// why it cannot be read (kept, so the manifest keeps naming it).
pub struct PointMemory {
    pub source: String,
    pub view: Result<Arc<crate::memory::view::MemoryView>, String>,
}

impl PointMemory {
    /// Indexes `source` (relative to the tree directory `dir`, or
    /// absolute), through the index cache in `cache` if given.
    pub fn open(dir: &Path, source: &str, cache: Option<&Path>) -> PointMemory {
        PointMemory {
            source: source.to_string(),
            view: crate::memory::view::open_view(dir, source, cache)
                .map(Arc::new)
                .map_err(|e| e.to_string()),
        }
    }
}

struct Node {
    pub point: Arc<PointDisk>,
    pub parent: Option<u64>,
    pub children: Vec<u64>,
    pub hidden: bool,
}

/// A snapshot of one disk's place in the tree (its point's parent and
/// children by name), for presenting it.
#[derive(Clone)]
pub struct DiskView {
    pub point: Arc<PointDisk>,
    pub parent: Option<String>,
    pub children: Vec<String>,
    pub hidden: bool,
}

impl DiskView {
    pub fn is_leaf(&self) -> bool {
        self.children.is_empty()
    }
}

/// What `status` shows besides the merge engine: the last command's
/// outcome and problems found when opening the tree.
#[derive(Default)]
pub struct StatusLog {
    pub last_command: Option<(String, Result<(), String>)>,
    pub problems: Vec<String>,
    /// Memory imports running now, by point name: their progress line.
    pub imports: BTreeMap<String, String>,
}

pub struct Tree {
    dir: PathBuf,
    /// Where names read from the tree's files may lead (see `confine`).
    confine: crate::confine::Confine,
    opts: TreeOptions,
    nodes: RwLock<BTreeMap<u64, Node>>,
    next_id: AtomicU64,
    status: Mutex<StatusLog>,
    /// Manifest entries of images this mount does not hold (another chain
    /// in the same directory); written back unchanged.
    foreign: Vec<manifest::ManifestPoint>,
    /// Images a merge has just cut out of the tree, listed as garbage in
    /// the manifest until their files are gone.
    garbage: Mutex<Vec<manifest::ManifestPoint>>,
    ops: Mutex<()>,
    /// Tree commands waiting for `ops` (see `Tree::lock_ops`): whoever
    /// holds it for long (a background merge) gives way to them.
    commands_waiting: AtomicUsize,
    /// Set when the mount goes away (see `close`): long work (a merge, an
    /// import) stops, and nothing structural starts again.
    closing: AtomicBool,
    /// Images another process holds a lock on, so we could not take ours:
    /// the merge engine leaves them alone.
    unlocked: Mutex<std::collections::HashSet<PathBuf>>,
    /// Opened from one leaf image rather than a directory: other chains
    /// may share its images unseen, so nothing is merged.
    single_chain: bool,
    /// Held while the tree is open read-write (see `open::lock_tree`).
    _tree_lock: Option<std::fs::File>,
    /// Memory files the manifest named for points that did not open:
    /// never removed by the memory sweep.
    pinned_memory: Vec<String>,
}

impl Tree {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    pub fn import_throttle(&self) -> crate::memory::checkpoint::Throttle {
        self.opts.import
    }

    /// Whether some hidden point has exactly one child (cheap; the
    /// planner says whether it can really go).
    pub fn has_coalescable(&self) -> bool {
        self.nodes
            .read()
            .values()
            .any(|n| n.hidden && n.children.len() == 1)
    }

    /// A new point with a fresh id.
    pub(crate) fn new_point(
        &self,
        name: String,
        disk: Option<String>,
        created: u64,
        io: DiskIo,
    ) -> Arc<PointDisk> {
        self.point_with(name, disk, created, io, None)
    }

    /// A new internal-snapshot point (see [`InternalPoint`]), read-only.
    pub(crate) fn new_internal_point(
        &self,
        name: String,
        disk: Option<String>,
        io: DiskIo,
        internal: InternalPoint,
    ) -> Arc<PointDisk> {
        let created = internal.date_sec as u64;
        self.point_with(name, disk, created, io, Some(internal))
    }

    fn point_with(
        &self,
        name: String,
        disk: Option<String>,
        created: u64,
        io: DiskIo,
        internal: Option<InternalPoint>,
    ) -> Arc<PointDisk> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(PointDisk {
            id,
            name,
            disk,
            created,
            io: RwLock::new(io),
            memory: RwLock::new(None),
            internal,
        })
    }

    /// Visible snapshot points, by name: one per name (its first disk,
    /// the one the point's directory, `ctl` and `info.json` belong to).
    pub fn visible(&self) -> Vec<Arc<PointDisk>> {
        let nodes = self.nodes.read();
        let mut v: Vec<Arc<PointDisk>> = nodes
            .values()
            .filter(|n| !n.hidden)
            .map(|n| n.point.clone())
            .collect();
        v.sort_by(|a, b| (&a.name, &a.disk).cmp(&(&b.name, &b.disk)));
        v.dedup_by(|b, a| a.name == b.name);
        v
    }

    /// Every disk of every visible snapshot point.
    pub fn visible_disks(&self) -> Vec<Arc<PointDisk>> {
        self.nodes
            .read()
            .values()
            .filter(|n| !n.hidden)
            .map(|n| n.point.clone())
            .collect()
    }

    /// The visible snapshot point called `name` (its first disk).
    pub fn lookup(&self, name: &str) -> Option<Arc<PointDisk>> {
        self.nodes
            .read()
            .values()
            .filter(|n| !n.hidden && n.point.name == name)
            .map(|n| n.point.clone())
            .min_by(|a, b| a.disk.cmp(&b.disk))
    }

    /// Every disk of the snapshot point `id` belongs to, ordered by disk
    /// name (`id` itself included).
    pub fn members(&self, id: u64) -> Vec<Arc<PointDisk>> {
        let nodes = self.nodes.read();
        let Some(name) = nodes.get(&id).map(|n| n.point.name.clone()) else {
            return Vec::new();
        };
        let mut v: Vec<Arc<PointDisk>> = nodes
            .values()
            .filter(|n| n.point.name == name)
            .map(|n| n.point.clone())
            .collect();
        v.sort_by(|a, b| a.disk.cmp(&b.disk));
        v
    }

    /// The id of the point called `name`, hidden or not.
    pub fn nodes_by_name(&self, name: &str) -> Option<u64> {
        self.nodes
            .read()
            .iter()
            .find(|(_, n)| n.point.name == name)
            .map(|(id, _)| *id)
    }

    pub fn view(&self, id: u64) -> Option<DiskView> {
        let nodes = self.nodes.read();
        let n = nodes.get(&id)?;
        let name_of = |id: &u64| nodes.get(id).map(|c| c.point.name.clone());
        Some(DiskView {
            point: n.point.clone(),
            parent: n.parent.as_ref().and_then(name_of),
            children: n.children.iter().filter_map(name_of).collect(),
            hidden: n.hidden,
        })
    }

    /// Records the outcome of a command for `status`.
    pub fn record(&self, command: &str, result: &Result<(), TreeError>) {
        let r = result.as_ref().map(|_| ()).map_err(|e| e.message.clone());
        if let Err(e) = &r {
            tracing::warn!("{command}: {e}");
        }
        self.status.lock().last_command = Some((command.to_string(), r));
    }

    /// Shows (or, with `None`, clears) the progress of a memory import
    /// into point `name` in `status`.
    pub fn import_progress(&self, name: &str, line: Option<String>) {
        let mut s = self.status.lock();
        match line {
            Some(l) => s.imports.insert(name.to_string(), l),
            None => s.imports.remove(name),
        };
    }

    pub fn problem(&self, what: String) {
        tracing::warn!("{what}");
        self.status.lock().problems.push(what);
    }

    /// Every point, hidden ones too (one per disk), taken out of the
    /// structure lock.
    pub(crate) fn all_points(&self) -> Vec<Arc<PointDisk>> {
        self.nodes
            .read()
            .values()
            .map(|n| n.point.clone())
            .collect()
    }

    /// Flushes every writable point.
    pub fn flush_all(&self) -> Result<(), TreeError> {
        let points = self.all_points();
        let mut first_err = None;
        for p in points {
            let io = p.io.read();
            if io.writable {
                if let Err(e) = io.chain.flush() {
                    first_err.get_or_insert(TreeError::new(e.errno(), e.to_string()));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
