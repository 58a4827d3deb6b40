//! Turning what `Tree::open` found (the images and the manifest) into the
//! tree's nodes: which manifest entries match no image, which images are
//! usable, their names, and a chain per point that shares layer objects
//! with its parent's. Kept apart from `open`, which decides what is found
//! (recovery, discovery, the manifest), because this part is pure
//! bookkeeping over that result plus opening the layers.

use super::{mtime, open_point_layer, point_or_none};
use crate::chain::Chain;
use crate::image::Layer;
use crate::tree::discover::Found;
use crate::tree::manifest::{Manifest, ManifestPoint};
use crate::tree::naming::{self, Names};
use crate::tree::{DiskIo, Node, PointDisk, PointMemory, Tree};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `build` looks points up in while it opens them: the images found,
/// the manifest entries by image file name, the names chosen, and which
/// images back onto each image.
struct Plan<'a> {
    found: &'a BTreeMap<PathBuf, Found>,
    by_image: HashMap<String, &'a ManifestPoint>,
    names: HashMap<PathBuf, String>,
    disks: HashMap<PathBuf, Option<String>>,
    children: HashMap<PathBuf, Vec<PathBuf>>,
}

/// The nodes built so far, and the node id of each image opened (a child
/// finds its parent's node, and so its parent's layers, through it).
#[derive(Default)]
pub(super) struct Built {
    nodes: BTreeMap<u64, Node>,
    ids: HashMap<PathBuf, u64>,
    /// Every point name in use or reserved (internal snapshots are named
    /// after the images' points, avoiding these).
    pub(super) taken: HashSet<String>,
    /// Names given to internal snapshots of multi-disk points, by the
    /// point's name and the tag: the same tag on every disk is one point.
    pub(super) groups: HashMap<(String, String), String>,
}

impl Built {
    /// Adds `point` (the point of image `path`) as a node under `parent`,
    /// when that parent was opened, and records it as `path`'s node.
    fn link(&mut self, point: Arc<PointDisk>, parent: Option<u64>, hidden: bool, path: &Path) {
        let id = point.id;
        self.link_node(point, parent, hidden);
        self.ids.insert(path.to_path_buf(), id);
    }

    /// Adds `point` as a node under `parent` (when that was opened).
    pub(super) fn link_node(&mut self, point: Arc<PointDisk>, parent: Option<u64>, hidden: bool) {
        let id = point.id;
        if let Some(pid) = parent {
            if let Some(n) = self.nodes.get_mut(&pid) {
                let n: &mut Node = n;
                n.children.push(id);
            }
        }
        self.nodes.insert(
            id,
            Node {
                point,
                parent,
                children: Vec::new(),
                hidden,
            },
        );
    }
}

impl Tree {
    /// Fills `nodes` from the images `found` and `manifest`, reporting in
    /// `problems` what disagrees or is broken. Roots are opened first, so
    /// each chain reuses its parent's layer objects.
    pub(super) fn build(
        &mut self,
        found: BTreeMap<PathBuf, Found>,
        manifest: Manifest,
        problems: &mut Vec<String>,
    ) {
        let by_image = manifest_by_image(&manifest, problems);
        self.keep_unmatched_entries(&manifest, &found, problems);
        let usable = usable_images(&found, problems);
        // Names: the manifest's, else the file stem, made unique. Entries
        // of one name with different `disk`s are the disks of one point.
        let mut ordered: Vec<&PathBuf> = usable.iter().collect();
        ordered.sort();
        let stems = crate::tree::hyperv::checkpoint_names(&found);
        let Names { names, disks } = naming::assign(
            &ordered,
            &by_image,
            &self.foreign,
            &stems,
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
        let mut queue: Vec<PathBuf> = ordered
            .iter()
            .filter(|p| found[**p].backing.is_none())
            .map(|p| (*p).clone())
            .collect();
        let plan = Plan {
            found: &found,
            by_image,
            names,
            disks,
            children,
        };
        let mut built = Built::default();
        built.taken.extend(plan.names.values().cloned());
        built
            .taken
            .extend(self.foreign.iter().map(|m| m.name.clone()));
        built.taken.extend(self.opts.reserved_names.iter().cloned());
        while let Some(path) = queue.pop() {
            if let Some(kids) = self.build_node(&path, &plan, &mut built, problems) {
                queue.extend(kids);
            }
        }
        if let Some(r) = &self.opts.records {
            crate::tree::records::relink_internal(&mut built.nodes, r, problems);
        }
        super::internal::gather_memory(&built.nodes);
        check_groups(&built.nodes, problems);
        *self.nodes.write() = built.nodes;
    }

    /// Keeps the manifest entries no found image matches: marked garbage
    /// (still referenced), naming an image outside the tree's confinement,
    /// or one that exists but is not an image of the tree all stay in
    /// `foreign` so the manifest is written back with them. An entry whose
    /// image is missing is reported and dropped, and its memory pinned.
    fn keep_unmatched_entries(
        &mut self,
        manifest: &Manifest,
        found: &BTreeMap<PathBuf, Found>,
        problems: &mut Vec<String>,
    ) {
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
    }

    /// Opens the point of image `path` (its parent's node is built: roots
    /// go first) and links it under its parent. Returns the images backed
    /// by it, to open next; `None` when it is not mounted (too deep, or its
    /// image does not open), the reason in `problems`: its children are
    /// then not opened either.
    fn build_node(
        &self,
        path: &PathBuf,
        plan: &Plan,
        built: &mut Built,
        problems: &mut Vec<String>,
    ) -> Option<Vec<PathBuf>> {
        let f = &plan.found[path];
        let kids = plan.children.get(path).cloned().unwrap_or_default();
        let name = plan.names[path].clone();
        let m = plan
            .by_image
            .get(&file_name(path))
            .filter(|m| m.name == name)
            .copied();
        let hidden = still_hidden(&name, m, kids.is_empty(), problems);
        let parent_id = f.backing.as_ref().and_then(|b| built.ids.get(b).copied());
        if let (Some(m), Some(b)) = (m, &f.backing) {
            check_manifest_parent(&name, m, plan.names.get(b), problems);
        }
        let parent_layers: Vec<Arc<dyn Layer>> = match parent_id {
            Some(pid) => {
                let n: &Node = &built.nodes[&pid];
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
            return None;
        }
        let want_write = kids.is_empty() && !hidden && !self.opts.read_only;
        let (layer, writable) = match open_point_layer(path, f.format, want_write, &name, problems)
        {
            Ok((l, w, locked)) => {
                if !locked {
                    self.unlocked.lock().insert(path.clone());
                }
                (l, w)
            }
            Err(e) => {
                problems.push(e.to_string());
                return None;
            }
        };
        let mut layers = vec![layer];
        layers.extend(parent_layers);
        let disk = plan.disks.get(path).cloned().flatten();
        // The image's internal snapshots hang between its backing point
        // and its current state (see `internal`).
        let parent_id = self
            .build_internal(path, &layers, (&name, &disk), parent_id, built, problems)
            .or(parent_id);
        let created = m.map(|m| m.created).unwrap_or_else(|| mtime(path));
        let io = DiskIo {
            chain: Arc::new(Chain::from_layers(layers)),
            image: path.clone(),
            writable,
        };
        let point = self.new_point(name, disk, created, io);
        if let Some(source) = m.and_then(|m| m.memory.as_deref()) {
            self.attach_memory(&point, source, plan.found, problems);
        }
        self.attach_recorded_memory(&point, problems);
        built.link(point, parent_id, hidden, path);
        Some(kids)
    }

    /// Gives `point` the memory checkpoint `source` its manifest entry
    /// names. A source that is a disk image of this tree is not opened:
    /// `Tree::open` kept it as a disk, so the memory naming it is refused.
    /// Why a memory is unusable goes to `problems`.
    fn attach_memory(
        &self,
        point: &PointDisk,
        source: &str,
        found: &BTreeMap<PathBuf, Found>,
        problems: &mut Vec<String>,
    ) {
        let is_disk = self
            .dir
            .join(source)
            .canonicalize()
            .is_ok_and(|p| found.contains_key(&p));
        let mem = if is_disk {
            PointMemory {
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
}

/// The live (not garbage) manifest entries by image file name; an image
/// listed twice is reported, and its last entry wins.
fn manifest_by_image<'a>(
    manifest: &'a Manifest,
    problems: &mut Vec<String>,
) -> HashMap<String, &'a ManifestPoint> {
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
    by_image
}

/// The images that can be mounted: not broken, every ancestor found and
/// not broken, and no loop in the backing chain. Why each other image is
/// not mounted goes to `problems` (in `found`'s order).
fn usable_images(found: &BTreeMap<PathBuf, Found>, problems: &mut Vec<String>) -> HashSet<PathBuf> {
    let mut usable: HashSet<PathBuf> = HashSet::new();
    for (path, f) in found {
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
    usable
}

/// Whether point `name` stays hidden: its manifest entry `m` says so and
/// it still has children.
fn still_hidden(
    name: &str,
    m: Option<&ManifestPoint>,
    no_kids: bool,
    problems: &mut Vec<String>,
) -> bool {
    let hidden = m.is_some_and(|m| m.hidden);
    if hidden && no_kids {
        // Hidden points exist for their children; one without any
        // is what an interrupted delete leaves. Show it again
        // rather than keep an invisible, unremovable image.
        problems.push(format!("{name:?} was hidden but has no children any more (an interrupted delete?); it is visible again"));
        return false;
    }
    hidden
}

/// Reports a manifest entry `m` whose parent differs from the point
/// `image_parent` its image backs onto; the image is followed.
fn check_manifest_parent(
    name: &str,
    m: &ManifestPoint,
    image_parent: Option<&String>,
    problems: &mut Vec<String>,
) {
    if m.parent.as_ref() != image_parent {
        problems.push(format!(
            "manifest says the parent of {name:?} is {}, but its image's backing file says {}; following the image",
            point_or_none(m.parent.as_ref()),
            point_or_none(image_parent)
        ));
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

/// The file name of `p` as the manifest records images (lossy UTF-8).
fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
