//! Internal snapshots as snapshot points: every snapshot an image's own
//! table records (qcow2's `savevm`, `qemu-img snapshot -c`, libvirt's and
//! Proxmox's default snapshots) becomes a read-only point, opened through
//! the image's `open_internal` capability (the tree never parses a format).
//!
//! Shape: without other records, creation order is all there is, so each
//! snapshot's parent is the one before it (by date, then id); the first
//! hangs under the image's backing point, and the image's current state
//! under the newest. Each snapshot's disk reads its own tables and then
//! the image's backing chain, as `qemu-img convert -l TAG` does.
//!
//! Names: the tag; on a clash with another point `<image stem>@<tag>`; the
//! same tag on every disk of a multi-disk point (libvirt snapshots all
//! disks under one name) is one point with one disk file per disk; a
//! tag that fails the one name check (`naming`) gets a made-safe fallback
//! and a `status` line. A snapshot whose entry fails the format's checks
//! is left out, its error (image, offset, what) in `status`. Internal
//! points are not in the manifest: the image's table is their record.

use super::build::Built;
use crate::chain::Chain;
use crate::image::{InternalSnapshot, Layer};
use crate::tree::naming::{name_from_stem, name_problem};
use crate::tree::{DiskIo, InternalPoint, Node, PointDisk, PointMemory, Tree};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Creation order: date, then the id (numerically when both are numbers).
fn creation_key(s: &InternalSnapshot) -> (u32, u32, Option<u64>, String) {
    (s.date_sec, s.date_nsec, s.id.parse().ok(), s.id.clone())
}

impl Tree {
    /// Adds the internal snapshots of the image at `path` (whose point's
    /// layers are `layers`, its own first, and whose point is `image_point`:
    /// name and disk) as points under `parent`, in creation order. Returns
    /// the newest one's node id: the parent of the image's current state.
    /// `None` when it has none that open.
    pub(super) fn build_internal(
        &self,
        path: &Path,
        layers: &[Arc<dyn Layer>],
        image_point: (&str, &Option<String>),
        parent: Option<u64>,
        built: &mut Built,
        problems: &mut Vec<String>,
    ) -> Option<u64> {
        let image = &layers[0];
        let snapshots = image.info().map(|i| i.snapshots).unwrap_or_default();
        let mut order: Vec<usize> = (0..snapshots.len()).collect();
        order.sort_by_key(|&i| creation_key(&snapshots[i]));
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut prev = parent;
        for i in order {
            let sn = &snapshots[i];
            let opened = match image.open_internal(i) {
                Ok(o) => o,
                Err(e) => {
                    problems.push(format!("internal snapshot left out: {e}"));
                    continue;
                }
            };
            let name = match image_point.1 {
                Some(_) => {
                    let key = (image_point.0.to_string(), sn.name.clone());
                    match built.groups.get(&key) {
                        Some(n) => n.clone(),
                        None => {
                            let n = self.internal_name(&stem, sn, built, problems);
                            built.groups.insert(key, n.clone());
                            n
                        }
                    }
                }
                None => self.internal_name(&stem, sn, built, problems),
            };
            let mut chain = vec![opened.disk];
            chain.extend(layers[1..].iter().cloned());
            let io = DiskIo {
                chain: Arc::new(Chain::from_layers(chain)),
                image: path.to_path_buf(),
                writable: false,
            };
            let disk = image_point.1.clone();
            let point = self.new_internal_point(name, disk, io, internal_point(sn));
            if let Some(bytes) = opened.vmstate {
                let source = format!("{}@{} (vmstate)", stem, sn.name);
                let view = crate::memory::view::open_vmstate(&source, path, bytes)
                    .map(Arc::new)
                    .map_err(|e| e.to_string());
                if let Err(why) = &view {
                    problems.push(format!("{:?}: memory (vmstate): {why}", point.name));
                }
                *point.memory.write() = Some(PointMemory { source, view });
            }
            let id = point.id;
            built.link_node(point, prev, false);
            prev = Some(id);
        }
        prev.filter(|p| Some(*p) != parent)
    }

    /// The point name of internal snapshot `sn` of the image with file
    /// stem `stem` (see the module docs), marked taken in `built`.
    fn internal_name(
        &self,
        stem: &str,
        sn: &InternalSnapshot,
        built: &mut Built,
        problems: &mut Vec<String>,
    ) -> String {
        let reserved = &self.opts.reserved_names;
        let free = |n: &str, built: &Built| !built.taken.contains(n);
        let qualified = format!("{stem}@{}", sn.name);
        let name = if let Some(why) = name_problem(&sn.name, reserved) {
            let base = name_from_stem(&format!("{stem}@snapshot-{}", sn.id), reserved);
            let mut name = base.clone();
            let mut k = 1;
            while !free(&name, built) || name_problem(&name, reserved).is_some() {
                k += 1;
                name = format!("{base}-{k}");
            }
            problems.push(format!(
                "{}: internal snapshot {:?} (id {:?}) is shown as {name:?}: its tag {why}",
                crate::confine::shown(stem),
                sn.name,
                sn.id
            ));
            name
        } else if free(&sn.name, built) {
            sn.name.clone()
        } else if name_problem(&qualified, reserved).is_none() && free(&qualified, built) {
            qualified
        } else {
            let mut k = 1;
            let mut name = qualified.clone();
            while !free(&name, built) || name_problem(&name, reserved).is_some() {
                k += 1;
                name = name_from_stem(&format!("{qualified}-{k}"), reserved);
            }
            name
        };
        built.taken.insert(name.clone());
        name
    }
}

/// QEMU saves the vmstate in one disk of a multi-disk VM; the point's
/// memory belongs on its first disk (by name), which the mount serves it
/// from: moved there when another disk holds it.
pub(super) fn gather_memory(nodes: &BTreeMap<u64, Node>) {
    let mut groups: BTreeMap<&str, Vec<&PointDisk>> = BTreeMap::new();
    for n in nodes.values().filter(|n| n.point.internal.is_some()) {
        groups
            .entry(n.point.name.as_str())
            .or_default()
            .push(&n.point);
    }
    for members in groups.values().filter(|m| m.len() > 1) {
        let Some(first) = members.iter().min_by(|a, b| a.disk.cmp(&b.disk)) else {
            continue;
        };
        if first.memory.read().is_some() {
            continue;
        }
        if let Some(holder) = members.iter().find(|m| m.memory.read().is_some()) {
            let mem = holder.memory.write().take();
            *first.memory.write() = mem;
        }
    }
}

fn internal_point(sn: &InternalSnapshot) -> InternalPoint {
    InternalPoint {
        tag: sn.name.clone(),
        id: sn.id.clone(),
        date_sec: sn.date_sec,
        date_nsec: sn.date_nsec,
        vm_clock_nsec: sn.vm_clock_nsec,
        icount: sn.icount,
        vm_state_size: sn.vm_state_size,
    }
}
