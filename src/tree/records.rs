//! Snapshot records kept outside the tree directory by a VM manager
//! (today libvirt's, built by the `libvirt` module above the tree): point
//! names, parents, creation times, descriptions and memory files. The tree
//! applies them at open over the manifest: where both name an image, the
//! records win for the name and the parent, and every disagreement goes
//! to `status`. The records are only read; nothing here writes them.

use super::discover::Found;
use super::manifest::{Manifest, ManifestPoint};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Every point the records name, in no particular order.
#[derive(Clone, Debug, Default)]
pub struct Records {
    /// Who keeps them ("libvirt"), for `status` and `info.json`.
    pub keeper: String,
    pub points: Vec<RecordPoint>,
    /// What the keeper refused or noticed while reading them, for
    /// `status`.
    pub notes: Vec<String>,
}

/// One recorded snapshot point.
#[derive(Clone, Debug, Default)]
pub struct RecordPoint {
    pub name: String,
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub description: Option<String>,
    /// Its disks that are external snapshots: `(disk, overlay)`, the
    /// overlay (canonical) created when the snapshot was taken. As in
    /// libvirt, the point's own state is the image the overlay backs onto
    /// (which `apply` looks up in the images found). `disk` is `None` on a
    /// one-disk VM.
    pub overlays: Vec<(Option<String>, PathBuf)>,
    /// The RAM saved with it (canonical, checked by the keeper), if any.
    pub memory: Option<PathBuf>,
    /// A file that holds (or may hold) its RAM in a layout snaptree does
    /// not read (a VMware `.vmsn` or `.vmss`), and why: `info.json` says so.
    pub unreadable_memory: Option<(PathBuf, String)>,
    /// Images that are this point's own state, per disk (canonical): the
    /// current state of a multi-disk VM, whose disks' leaves make one
    /// point. Its parent is the point its images back onto.
    pub images: Vec<(Option<String>, PathBuf)>,
    /// What the keeper says each disk's state was when the snapshot was
    /// taken (libvirt's embedded `<domain>`), per disk: checked against
    /// the overlay's backing file, and a difference goes to `status`.
    pub states: Vec<(Option<String>, PathBuf)>,
}

impl Records {
    /// The record of point `name`.
    pub fn point(&self, name: &str) -> Option<&RecordPoint> {
        self.points.iter().find(|p| p.name == name)
    }
}

/// Lays `records` over `manifest`: each recorded image gets the record's
/// name, parent, time and disk; a manifest entry that says otherwise is
/// replaced, and the disagreement goes to `problems`. Images the tree did
/// not find are reported and skipped.
pub(super) fn apply(
    records: &Records,
    manifest: &mut Manifest,
    found: &BTreeMap<PathBuf, Found>,
    dir: &Path,
    problems: &mut Vec<String>,
) {
    problems.extend(records.notes.iter().cloned());
    let mut at: HashMap<String, usize> = HashMap::new();
    for (i, m) in manifest
        .points
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.garbage)
    {
        at.insert(m.image.clone(), i);
    }
    let mut lay = Laying {
        keeper: &records.keeper,
        manifest,
        found,
        dir,
        at,
        problems,
    };
    for r in &records.points {
        for (disk, overlay) in &r.overlays {
            lay.overlay(r, disk, overlay);
        }
    }
    // Own images last: their parent is whatever point, by now named, they
    // back onto.
    for r in &records.points {
        for (disk, image) in &r.images {
            lay.own_image(r, disk, image);
        }
    }
}

/// What [`apply`] works on: the manifest being rewritten and where each
/// image's entry is in it.
struct Laying<'a> {
    keeper: &'a str,
    manifest: &'a mut Manifest,
    found: &'a BTreeMap<PathBuf, Found>,
    dir: &'a Path,
    at: HashMap<String, usize>,
    problems: &'a mut Vec<String>,
}

impl Laying<'_> {
    /// An external snapshot's disk: the point is the image `overlay`
    /// backs onto.
    fn overlay(&mut self, r: &RecordPoint, disk: &Option<String>, overlay: &Path) {
        let keeper = self.keeper;
        let image = self.found.get(overlay).and_then(|f| f.backing.as_ref());
        check_state(keeper, r, disk, overlay, image, self.problems);
        let rel = match image.map(|i| (i, i.strip_prefix(self.dir))) {
            Some((i, Ok(rel))) if self.found.contains_key(i) => rel.to_string_lossy().into_owned(),
            _ => {
                self.problems.push(format!(
                    "{keeper} snapshot {:?}: its overlay {} is no image of the tree backing onto one; the snapshot is not shown by that name",
                    r.name,
                    overlay.display()
                ));
                return;
            }
        };
        let entry = entry(r, &rel, r.parent.clone(), disk);
        match self.at.get(&rel) {
            Some(&i) => {
                let old = &mut self.manifest.points[i];
                report_disagreement(keeper, old, &entry, self.problems);
                old.name = entry.name;
                old.parent = entry.parent;
                old.created = entry.created;
                old.disk = entry.disk;
            }
            None => {
                self.at.insert(rel, self.manifest.points.len());
                self.manifest.points.push(entry);
            }
        }
    }

    /// A point's own image (the current state of a multi-disk VM, a
    /// VMware snapshot's disk): its parent is the point it backs onto.
    fn own_image(&mut self, r: &RecordPoint, disk: &Option<String>, image: &PathBuf) {
        let keeper = self.keeper;
        let Some(rel) = image
            .strip_prefix(self.dir)
            .ok()
            .filter(|_| self.found.contains_key(image))
            .map(|r| r.to_string_lossy().into_owned())
        else {
            self.problems.push(format!(
                "{keeper} point {:?}: {} is no image of the tree; not shown by that name",
                r.name,
                image.display()
            ));
            return;
        };
        let parent = self
            .found
            .get(image)
            .and_then(|f| f.backing.as_ref())
            .and_then(|b| b.strip_prefix(self.dir).ok())
            .and_then(|b| self.at.get(&*b.to_string_lossy()))
            .map(|&i| self.manifest.points[i].name.clone());
        if r.parent.is_some() && r.parent != parent {
            self.problems.push(format!(
                "disagreement: {keeper}'s records say the parent of {:?} is {}, but its image {} backs onto {}; following the image",
                r.name,
                quoted_or_none(r.parent.as_deref()),
                crate::confine::shown(&rel),
                quoted_or_none(parent.as_deref())
            ));
        }
        match self.at.get(&rel) {
            Some(&i) => {
                let old = &mut self.manifest.points[i];
                if old.name != r.name {
                    self.problems.push(format!(
                        "disagreement: .snaptree.json names image {} {:?}, {keeper}'s records {:?}; {keeper}'s name is used",
                        crate::confine::shown(&rel),
                        old.name,
                        r.name
                    ));
                }
                old.name = r.name.clone();
                old.parent = parent;
                old.disk = disk.clone();
                if r.created != 0 {
                    old.created = r.created;
                }
            }
            None => {
                self.at.insert(rel.clone(), self.manifest.points.len());
                self.manifest.points.push(entry(r, &rel, parent, disk));
            }
        }
    }
}

/// The manifest entry record `r` makes for image `rel`.
fn entry(
    r: &RecordPoint,
    rel: &str,
    parent: Option<String>,
    disk: &Option<String>,
) -> ManifestPoint {
    ManifestPoint {
        name: r.name.clone(),
        image: rel.to_string(),
        parent,
        created: r.created,
        hidden: false,
        format: None,
        disk: disk.clone(),
        garbage: false,
        memory: None,
    }
}

/// `"name"`, or `none`.
fn quoted_or_none(name: Option<&str>) -> String {
    name.map_or_else(|| "none".into(), |n| format!("{n:?}"))
}

/// Reports an external snapshot whose overlay backs onto another file
/// than the one the keeper's record says held the disk then (libvirt's
/// embedded `<domain>`); the image is followed, as everywhere.
fn check_state(
    keeper: &str,
    r: &RecordPoint,
    disk: &Option<String>,
    overlay: &Path,
    image: Option<&PathBuf>,
    problems: &mut Vec<String>,
) {
    let said = match disk {
        Some(d) => r.states.iter().find(|(s, _)| s.as_deref() == Some(d)),
        None if r.states.len() == 1 => r.states.first(),
        None => None,
    };
    if let (Some((_, said)), Some(image)) = (said, image) {
        if said != image {
            problems.push(format!(
                "disagreement: {keeper} snapshot {:?}: its overlay {} backs onto {}, but the record's <domain> names {}; following the image",
                r.name,
                overlay.display(),
                image.display(),
                said.display()
            ));
        }
    }
}

/// A `status` line for each way the manifest entry `old` disagrees with
/// the record `new` of the same image.
fn report_disagreement(
    keeper: &str,
    old: &ManifestPoint,
    new: &ManifestPoint,
    problems: &mut Vec<String>,
) {
    let image = crate::confine::shown(&new.image);
    if old.name != new.name {
        problems.push(format!(
            "disagreement: .snaptree.json names image {image} {:?}, {keeper}'s records {:?}; {keeper}'s name is used",
            old.name, new.name
        ));
    }
    if old.parent != new.parent {
        problems.push(format!(
            "disagreement: .snaptree.json says the parent of {:?} (image {image}) is {:?}, {keeper}'s records {:?}; {keeper}'s parent is used",
            new.name, old.parent, new.parent
        ));
    }
}

/// Hangs each internal-snapshot point under the parent its record names
/// (the image's table only gives creation order), or makes it a root when
/// the record names none. A parent that is not a point, or that would make
/// a loop, is reported and the creation-order parent kept.
pub(super) fn relink_internal(
    nodes: &mut BTreeMap<u64, super::Node>,
    records: &Records,
    problems: &mut Vec<String>,
) {
    let ids: Vec<u64> = nodes
        .iter()
        .filter(|(_, n)| n.point.internal.is_some())
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        let (name, disk) = (nodes[&id].point.name.clone(), nodes[&id].point.disk.clone());
        let Some(r) = records.point(&name) else {
            continue;
        };
        let target = match &r.parent {
            None => None,
            Some(p) => {
                let by_name = |n: &&super::Node| &n.point.name == p;
                let pick = nodes
                    .values()
                    .filter(by_name)
                    .find(|n| n.point.disk == disk)
                    .or_else(|| nodes.values().find(by_name));
                match pick {
                    Some(n) if !is_below(nodes, n.point.id, id) => Some(n.point.id),
                    _ => {
                        problems.push(format!(
                            "{} snapshot {name:?}: parent {p:?} is no point it can hang under; creation order is used",
                            records.keeper
                        ));
                        continue;
                    }
                }
            }
        };
        move_node(nodes, id, target);
    }
}

/// Whether `node` is `top` or below it.
fn is_below(nodes: &BTreeMap<u64, super::Node>, node: u64, top: u64) -> bool {
    let mut cur = Some(node);
    let mut steps = 0;
    while let Some(c) = cur {
        if c == top || steps > nodes.len() {
            return true;
        }
        steps += 1;
        cur = nodes.get(&c).and_then(|n| n.parent);
    }
    false
}

fn move_node(nodes: &mut BTreeMap<u64, super::Node>, id: u64, parent: Option<u64>) {
    let old = nodes[&id].parent;
    if old == parent {
        return;
    }
    if let Some(o) = old.and_then(|o| nodes.get_mut(&o)) {
        o.children.retain(|c| *c != id);
    }
    if let Some(p) = parent.and_then(|p| nodes.get_mut(&p)) {
        p.children.push(id);
    }
    if let Some(n) = nodes.get_mut(&id) {
        n.parent = parent;
    }
}
