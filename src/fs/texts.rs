//! The mount's generated files: the texts rendered at open (`tree`,
//! `status`, a point's `info.json`, `volumes/index.json`) and the target
//! of a point's `parent` link.

use super::inodes::{Inode, PointFile};
use super::{guest, layout, SnapFs};

impl SnapFs {
    /// The text of a dynamic file, rendered now.
    pub(super) fn text(&self, ino: Inode) -> Option<Vec<u8>> {
        match ino {
            Inode::Tree => Some(self.tree.render_tree().into_bytes()),
            // The tree's lines with the merge engine's composed in.
            Inode::Status => {
                let between = self.merge.render_status() + &self.guest.status_lines(&self.tree);
                Some(self.tree.render_status(&between).into_bytes())
            }
            Inode::Point(p, PointFile::Info) => self
                .tree
                .info_json(p, layout::disk_file, layout::MEMORY_FILE)
                .map(String::into_bytes),
            Inode::Volume(p, guest::INDEX_SLOT) => self
                .guest
                .get(&self.tree, p, false)
                .map(|o| o.guest.index_json().into_bytes()),
            _ => None,
        }
    }

    /// Nearest visible ancestor of point `p`, for the `parent` symlink.
    pub(super) fn visible_parent(&self, p: u64) -> Option<String> {
        let mut v = self.tree.view(p)?;
        loop {
            let name = v.parent.clone()?;
            let next = self.tree.nodes_by_name(&name)?;
            let nv = self.tree.view(next)?;
            if !nv.hidden {
                return Some(name);
            }
            v = nv;
        }
    }
}
