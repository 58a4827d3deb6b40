//! Building a `Tree` from a source (a directory of images, or one leaf
//! image): finish interrupted snapshots, find the images, name them (from
//! the manifest, else by file stem), report what disagrees or is broken,
//! and open a chain per point that shares layer objects with its parent.

use super::discover::{self, Found};
use super::manifest::{self, ManifestPoint};
use super::{Node, PointIo, StatusLog, Tree, TreeOptions};
use crate::chain::Chain;
use crate::confine::Confine;
use crate::image::lock::LockMode;
use crate::image::{probe, Format, Layer};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Suffix of an overlay created by `snapshot` before it is renamed into
/// place; a crash can leave one behind (see `recover_snapshots`).
pub const TMP_SUFFIX: &str = ".snaptree-tmp";

impl Tree {
    /// Opens the tree at `source`. Fails only when nothing usable is found;
    /// individual broken images are reported in `status`.
    pub fn open(source: &Path, opts: TreeOptions) -> Result<Tree, String> {
        let canon = source
            .canonicalize()
            .map_err(|e| format!("{}: {e}", source.display()))?;
        let is_dir = canon.is_dir();
        let dir = if is_dir {
            canon.clone()
        } else {
            canon
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/"))
        };
        let mut problems = Vec::new();
        // One read-write opener per tree: a second one (a `snaptree merge`
        // while mounted, two mounts) would recover the first one's
        // in-flight snapshots and merges and write the same images.
        let tree_lock = if opts.read_only {
            None
        } else {
            Some(lock_tree(&dir)?)
        };
        let mut resume_merge = false;
        if !opts.read_only {
            recover_snapshots(&dir, &mut problems);
            resume_merge = crate::merge::journal::recover(&dir, &mut problems);
            crate::merge::journal::reclaim_garbage(&dir, &mut problems);
            repair_memory_deltas(&dir, &mut problems);
        }
        let confine = Confine::new(&dir, opts.allow_external_backing)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let found = if is_dir {
            discover::scan_dir(&confine).map(|scan| {
                problems.extend(scan.skipped);
                scan.found
            })
        } else {
            discover::scan_chain(&canon, &confine, opts.max_depth)
        }
        .map_err(|e| format!("{}: {e}", dir.display()))?;
        let manifest = match manifest::load(&dir) {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                problems.push(e);
                manifest::Manifest::default()
            }
        };
        let mut found = found;
        // Memory checkpoints the manifest names are no disk images, even
        // when named like raw ones (`*.raw`); unless an image backs onto
        // the file or the manifest names it as a point's image too: then
        // it is a disk, and the memory naming it is refused (in `build`).
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
                .strip_prefix(&dir)
                .is_ok_and(|r| disks_named.contains(r.to_string_lossy().as_ref()));
            if !backed_onto && !named {
                found.remove(&p);
            }
        }
        let raw_by_manifest: Vec<PathBuf> = manifest
            .points
            .iter()
            .filter(|m| m.format.as_deref() == Some("raw"))
            .map(|m| dir.join(&m.image))
            .filter_map(|p| p.canonicalize().ok())
            .collect();
        discover::force_raw(&mut found, raw_by_manifest, &confine);
        // Every image stays open (its descriptor holds its lock): refuse a
        // tree the open-file limit cannot hold before opening any of it,
        // rather than mount part of it.
        let memories = manifest.points.iter().filter(|p| p.memory.is_some());
        let images = found.values().filter(|f| f.broken.is_none()).count();
        crate::fdlimit::check_budget((images + memories.count()) as u64, &dir)?;
        let mut tree = Tree {
            dir: dir.clone(),
            confine,
            opts,
            nodes: RwLock::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            status: Mutex::new(StatusLog::default()),
            foreign: Vec::new(),
            garbage: Mutex::new(Vec::new()),
            single_chain: !is_dir,
            _tree_lock: tree_lock,
            ops: Mutex::new(()),
            unlocked: Mutex::new(Default::default()),
            merge: crate::merge::MergeState::default(),
            pinned_memory: Vec::new(),
        };
        tree.build(found, manifest, &mut problems);
        if tree.nodes.read().is_empty() {
            let mut msg = format!("no usable image found in {}", source.display());
            for p in &problems {
                msg.push_str("\n  ");
                msg.push_str(p);
            }
            return Err(msg);
        }
        tree.status.lock().problems = problems;
        tree.sweep_memory(true);
        tree.merge
            .resume
            .store(resume_merge, std::sync::atomic::Ordering::Relaxed);
        Ok(tree)
    }

    fn build(
        &mut self,
        found: BTreeMap<PathBuf, Found>,
        manifest: manifest::Manifest,
        problems: &mut Vec<String>,
    ) {
        let file_name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut by_image: HashMap<String, &ManifestPoint> = HashMap::new();
        for m in manifest.points.iter().filter(|m| !m.garbage) {
            if by_image.insert(m.image.clone(), m).is_some() {
                problems.push(format!(
                    "manifest lists image {} more than once; its last entry ({}) is used",
                    crate::confine::shown(&m.image),
                    crate::confine::shown(&m.name)
                ));
            }
        }
        for m in &manifest.points {
            if m.garbage {
                // Still referenced (see `reclaim_garbage`). Found as an
                // image of the tree, it is one again: the mark goes, so it
                // is never reclaimed under a visible point.
                if !found.contains_key(&self.dir.join(&m.image)) {
                    self.foreign.push(m.clone());
                }
                continue;
            }
            if !found.contains_key(&self.dir.join(&m.image)) {
                if let Err(why) = self.confine.record(&m.image) {
                    // Kept (written back as it is), never acted on.
                    problems.push(format!(
                        "manifest entry {:?} ignored: its image {why}",
                        m.name
                    ));
                    self.foreign.push(m.clone());
                } else if self.dir.join(&m.image).exists() {
                    self.foreign.push(m.clone());
                } else {
                    problems.push(format!(
                        "manifest lists {} (image {}), but that file is missing",
                        crate::confine::shown(&m.name),
                        crate::confine::shown(&m.image)
                    ));
                    // Its memory is not ours to remove.
                    self.pinned_memory.extend(m.memory.clone());
                }
            }
        }
        // Usable = not broken and every ancestor usable and no cycle.
        let mut usable: HashSet<PathBuf> = HashSet::new();
        for (path, f) in &found {
            let mut seen = HashSet::new();
            let mut cur = Some(path.clone());
            let mut ok = true;
            while let Some(p) = cur {
                if !seen.insert(p.clone()) {
                    problems.push(format!("{}: backing chain loops", path.display()));
                    ok = false;
                    break;
                }
                match found.get(&p) {
                    Some(g) if g.broken.is_none() => cur = g.backing.clone(),
                    Some(g) => {
                        if &p == path {
                            problems.push(g.broken.clone().unwrap_or_default());
                        } else {
                            problems.push(format!(
                                "{}: not mounted, its backing file {} is broken",
                                path.display(),
                                p.display()
                            ));
                        }
                        ok = false;
                        break;
                    }
                    None => {
                        problems.push(format!(
                            "{}: backing file {} is not part of the tree",
                            path.display(),
                            p.display()
                        ));
                        ok = false;
                        break;
                    }
                }
            }
            if ok && f.broken.is_none() {
                usable.insert(path.clone());
            }
        }
        // Names: the manifest's, else the file stem, made unique. Entries
        // of one name with different `disk`s are the disks of one point.
        let mut ordered: Vec<&PathBuf> = usable.iter().collect();
        ordered.sort();
        let super::naming::Names { names, disks } = super::naming::assign(
            &ordered,
            &by_image,
            &self.foreign,
            &self.opts.reserved_names,
            problems,
        );
        // Children, then open roots first so each chain reuses its parent's.
        let mut children: HashMap<PathBuf, Vec<PathBuf>> = HashMap::new();
        for p in &ordered {
            if let Some(b) = &found[*p].backing {
                children.entry(b.clone()).or_default().push((*p).clone());
            }
        }
        let mut ids: HashMap<PathBuf, u64> = HashMap::new();
        let mut queue: Vec<PathBuf> = ordered
            .iter()
            .filter(|p| found[**p].backing.is_none())
            .map(|p| (*p).clone())
            .collect();
        let mut nodes = BTreeMap::new();
        while let Some(path) = queue.pop() {
            let f = &found[&path];
            let kids = children.get(&path).cloned().unwrap_or_default();
            let name = names[&path].clone();
            let m = by_image.get(&file_name(&path)).filter(|m| m.name == name);
            let mut hidden = m.is_some_and(|m| m.hidden);
            if hidden && kids.is_empty() {
                // Hidden points exist for their children; one without any
                // is what an interrupted delete leaves. Show it again
                // rather than keep an invisible, unremovable image.
                problems.push(format!("{name:?} was hidden but has no children any more (an interrupted delete?); it is visible again"));
                hidden = false;
            }
            let parent_id = f.backing.as_ref().and_then(|b| ids.get(b).copied());
            if let (Some(m), Some(b)) = (m, &f.backing) {
                let image_parent = names.get(b);
                if m.parent.as_ref() != image_parent {
                    problems.push(format!(
                        "manifest says the parent of {name:?} is {}, but its image's backing file says {}; following the image",
                        point_or_none(m.parent.as_ref()),
                        point_or_none(image_parent)
                    ));
                }
            }
            let parent_layers: Vec<Arc<dyn Layer>> = match parent_id {
                Some(pid) => {
                    let n: &Node = &nodes[&pid];
                    n.point.io.read().chain.layers().to_vec()
                }
                None => Vec::new(),
            };
            if parent_layers.len() + 1 > self.opts.max_depth {
                problems.push(format!(
                    "{}: chain deeper than {} layers, not mounted",
                    path.display(),
                    self.opts.max_depth
                ));
                continue;
            }
            let want_write = kids.is_empty() && !hidden && !self.opts.read_only;
            let (layer, writable) =
                match open_point_layer(&path, f.format, want_write, &name, problems) {
                    Ok((l, w, locked)) => {
                        if !locked {
                            self.unlocked.lock().insert(path.clone());
                        }
                        (l, w)
                    }
                    Err(e) => {
                        problems.push(e);
                        continue;
                    }
                };
            let mut layers = vec![layer];
            layers.extend(parent_layers);
            let created = m.map(|m| m.created).unwrap_or_else(|| mtime(&path));
            let disk = disks.get(&path).cloned().flatten();
            let point = self.new_point(
                name,
                disk,
                created,
                PointIo {
                    chain: Arc::new(Chain::from_layers(layers)),
                    image: path.clone(),
                    writable,
                },
            );
            if let Some(source) = m.and_then(|m| m.memory.as_deref()) {
                let is_disk = self
                    .dir
                    .join(source)
                    .canonicalize()
                    .is_ok_and(|p| found.contains_key(&p));
                let mem = if is_disk {
                    super::PointMemory {
                        source: source.to_string(),
                        view: Err("not opened: it is a disk image of this tree".into()),
                    }
                } else {
                    self.open_memory(source)
                };
                if let Err(why) = &mem.view {
                    problems.push(format!("{:?}: memory {source:?}: {why}", point.name));
                }
                *point.memory.write() = Some(mem);
            }
            let id = point.id;
            if let Some(pid) = parent_id {
                if let Some(n) = nodes.get_mut(&pid) {
                    let n: &mut Node = n;
                    n.children.push(id);
                }
            }
            nodes.insert(
                id,
                Node {
                    point,
                    parent: parent_id,
                    children: Vec::new(),
                    hidden,
                },
            );
            ids.insert(path.clone(), id);
            queue.extend(kids);
        }
        check_groups(&nodes, problems);
        *self.nodes.write() = nodes;
    }
}

/// The disks of one multi-disk point must hang under one parent point and
/// agree on being hidden; the images are the truth, so a mismatch is
/// reported (the disks still show under the shared name).
fn check_groups(nodes: &BTreeMap<u64, Node>, problems: &mut Vec<String>) {
    let mut groups: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in nodes.values() {
        groups.entry(n.point.name.as_str()).or_default().push(n);
    }
    for (name, members) in groups.into_iter().filter(|(_, m)| m.len() > 1) {
        let parent_name = |n: &Node| {
            n.parent
                .and_then(|p| nodes.get(&p))
                .map(|p| p.point.name.clone())
        };
        let first = parent_name(members[0]);
        if members.iter().any(|m| parent_name(m) != first) {
            problems.push(format!(
                "the disks of {name:?} have different parents in their images' backing files; each disk reads its own chain"
            ));
        }
        if members.iter().any(|m| m.hidden != members[0].hidden) {
            problems.push(format!(
                "some disks of {name:?} are hidden and some are not"
            ));
        }
    }
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
) -> Result<(Arc<dyn Layer>, bool, bool), String> {
    if want_write {
        match probe::open_layer(path, Some(format), true) {
            Ok(l) => match l.lock(LockMode::Writer) {
                Ok(()) => return Ok((l, true, true)),
                Err(why) => problems.push(format!("{name}: read-only: {}: {why}", path.display())),
            },
            Err(e) => problems.push(format!("{name}: read-only: {e}")),
        }
    }
    let layer = probe::open_layer(path, Some(format), false).map_err(|e| e.to_string())?;
    if let Err(why) = layer.lock(LockMode::Reader) {
        problems.push(format!(
            "{name}: {}: {why}; mounted without a lock, so what it reads may change",
            path.display()
        ));
        return Ok((layer, false, false));
    }
    Ok((layer, false, true))
}

/// Name of the lock file a read-write opener holds in the tree directory.
pub const TREE_LOCK_NAME: &str = ".snaptree.lock";

/// Takes the tree's exclusive lock (an OFD-independent `flock`, released
/// when the process dies), or says who to blame.
fn lock_tree(dir: &Path) -> Result<std::fs::File, String> {
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
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(format!(
            "{}: not a regular file; remove it (snaptree keeps its lock there)",
            path.display()
        ));
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
        return Err(format!(
            "{} is in use by another snaptree (mounted read-write, or a `snaptree merge` running); unmount it first, or mount with -o ro",
            dir.display()
        ));
    }
    Ok(f)
}

/// Frees the clusters a kill left leaked in the page-delta checkpoints of
/// the memory directory: a merge copies pages into a child's delta before
/// its journal exists, and an import writes its delta with none at all, so
/// no journal names them. The deltas are snaptree's own files, and the
/// tree lock keeps every other writer out.
fn repair_memory_deltas(dir: &Path, problems: &mut Vec<String>) {
    let mem_dir = dir.join(super::memory::MEMORY_DIR);
    if !crate::confine::is_real_dir(&mem_dir) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(&mem_dir) else {
        return;
    };
    for e in entries.flatten() {
        let own_delta = e.file_type().is_ok_and(|t| t.is_file())
            && e.file_name()
                .to_str()
                .is_some_and(|n| n.ends_with(".qcow2") && !n.starts_with('.'));
        if !own_delta {
            continue;
        }
        match crate::image::repair_after_crash(&e.path()) {
            Ok(Some(n)) if n > 0 => problems.push(format!(
                "{}: freed {n} clusters an interrupted merge or import had leaked",
                e.path().display()
            )),
            Ok(_) => {}
            Err(err) => problems.push(format!("{}: leak repair: {err}", e.path().display())),
        }
    }
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
