//! The tree's side of a merge: the narrow interface through which the
//! merge engine (`merge`, which the tree does not know) reads what may be
//! coalesced and changes the structure once a merge committed. The
//! engine takes no field of the tree; every step here keeps the lock
//! order of ARCHITECTURE.md ("Locks").

use super::{manifest, PointDisk, Tree};
use crate::image::lock::LockMode;
use crate::image::Layer;
use std::path::Path;
use std::sync::Arc;

impl Tree {
    /// Every hidden point (one per disk) with its children.
    pub fn hidden_with_children(&self) -> Vec<(Arc<PointDisk>, Vec<Arc<PointDisk>>)> {
        let nodes = self.nodes.read();
        nodes
            .values()
            .filter(|n| n.hidden)
            .map(|n| {
                let kids = n
                    .children
                    .iter()
                    .filter_map(|c| nodes.get(c).map(|c| c.point.clone()))
                    .collect();
                (n.point.clone(), kids)
            })
            .collect()
    }

    /// Every hidden point's name with its number of children, for the
    /// merge queue in `status`.
    pub fn hidden_child_counts(&self) -> Vec<(String, usize)> {
        self.nodes
            .read()
            .values()
            .filter(|n| n.hidden)
            .map(|n| (n.point.name.clone(), n.children.len()))
            .collect()
    }

    /// Whether point `id` has no children (or is gone).
    pub fn is_leaf(&self, id: u64) -> bool {
        self.nodes
            .read()
            .get(&id)
            .is_none_or(|n| n.children.is_empty())
    }

    /// Opened from one leaf image rather than a directory: other chains
    /// may share its images unseen, so nothing may be merged.
    pub fn single_chain(&self) -> bool {
        self.single_chain
    }

    /// Takes the reader lock on each of `images` (path, layer) that could
    /// not be locked at open (another process held it): it may be free
    /// now. Fails on the first one still held, saying which.
    pub fn retry_image_locks(
        &self,
        images: &[(&Path, &Arc<dyn Layer>)],
    ) -> Result<(), StillLocked> {
        let mut unlocked = self.unlocked.lock();
        for (p, layer) in images {
            if unlocked.contains(*p) {
                if let Err(source) = layer.lock(LockMode::Reader) {
                    return Err(StillLocked {
                        image: p.to_path_buf(),
                        source,
                    });
                }
                unlocked.remove(*p);
            }
        }
        Ok(())
    }

    /// After a merge committed: hidden point `hidden` leaves the tree and
    /// its only child `child` hangs under `hidden`'s parent. Takes
    /// `nodes`, so no point's `io` may be held.
    pub fn unlink_coalesced(&self, hidden: u64, child: u64) {
        let mut nodes = self.nodes.write();
        let parent = nodes.get(&hidden).and_then(|n| n.parent);
        nodes.remove(&hidden);
        if let Some(p) = parent.and_then(|p| nodes.get_mut(&p)) {
            for k in p.children.iter_mut() {
                if *k == hidden {
                    *k = child;
                }
            }
        }
        if let Some(n) = nodes.get_mut(&child) {
            n.parent = parent;
        }
    }

    /// The children of point `id` (none if it is gone).
    pub fn children_of(&self, id: u64) -> Vec<Arc<PointDisk>> {
        let nodes = self.nodes.read();
        nodes
            .get(&id)
            .map(|n| {
                n.children
                    .iter()
                    .filter_map(|k| nodes.get(k).map(|k| k.point.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Lists an image a merge cut out of the tree as garbage in the
    /// manifest (written by the next [`Tree::save_manifest`]), so an
    /// interrupted removal is finished by the next open.
    pub fn note_garbage(&self, image: manifest::ManifestPoint) {
        self.garbage.lock().push(image);
    }

    /// The garbage images are gone: the manifest stops listing them.
    pub fn clear_garbage(&self) {
        self.garbage.lock().clear();
    }
}

/// An image another process still holds a lock on (see
/// [`Tree::retry_image_locks`]).
#[derive(Debug, thiserror::Error)]
#[error("{} is locked by another process (a running VM?): {source}; not merged", image.display())]
pub struct StillLocked {
    pub image: std::path::PathBuf,
    #[source]
    pub source: crate::image::lock::LockError,
}
