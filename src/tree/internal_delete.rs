//! `delete` / `rmdir` of an internal-snapshot point: each disk's image
//! deletes the snapshot from its own table (`Writable::delete_internal`,
//! through the layer of the image's current state, which holds the
//! image's write lock), and the point leaves the tree, its children
//! hanging from its parent. The tree never names a format.

use super::ops::err;
use super::{Node, PointDisk, Tree, TreeError};
use std::collections::BTreeMap;
use std::sync::Arc;

impl Tree {
    /// Deletes internal point `members` (all disks of one point).
    pub(super) fn delete_internal_point(
        &self,
        members: &[Arc<PointDisk>],
        name: &str,
    ) -> Result<(), TreeError> {
        self.for_each_disk(members, "delete", name, |m| self.delete_internal_disk(m))?;
        self.save_manifest()
    }

    fn delete_internal_disk(&self, m: &Arc<PointDisk>) -> Result<(), TreeError> {
        let Some(internal) = &m.internal else {
            return Err(err(libc::EINVAL, "not an internal snapshot"));
        };
        let image = m.io.read().image.clone();
        let current = {
            let nodes = self.nodes.read();
            nodes
                .values()
                .find(|n| n.point.internal.is_none() && n.point.io.read().image == image)
                .map(|n| n.point.clone())
        };
        let Some(current) = current else {
            return Err(err(
                libc::EROFS,
                format!("{}: its current state is not in the tree", image.display()),
            ));
        };
        let io = current.io.read();
        if !io.writable {
            return Err(err(
                libc::EROFS,
                format!(
                    "{} is open read-only (in use by another process, or not the leaf of its chain): its snapshots cannot be deleted now",
                    image.display()
                ),
            ));
        }
        io.chain.leaf().delete_internal(&internal.id).map_err(|e| {
            err(
                libc::EIO,
                format!("deleting internal snapshot {:?}: {e}", internal.tag),
            )
        })?;
        drop(io);
        unlink(&mut self.nodes.write(), m.id);
        Ok(())
    }
}

/// Removes node `id`, moving its children to its parent.
fn unlink(nodes: &mut BTreeMap<u64, Node>, id: u64) {
    let Some(node) = nodes.remove(&id) else {
        return;
    };
    for c in &node.children {
        if let Some(child) = nodes.get_mut(c) {
            child.parent = node.parent;
        }
    }
    if let Some(p) = node.parent.and_then(|p| nodes.get_mut(&p)) {
        p.children.retain(|c| *c != id);
        p.children.extend(node.children.iter().copied());
    }
}
