//! What the mount answers to changes it does not make: creating, linking,
//! renaming or removing names (other than `rmdir` of a point), and setting
//! times. The layout is the tree's, changed only through `ctl`; a file's
//! times are its image's. ENOSYS ("not implemented") would tell a user or
//! a tool to try another way; EPERM says "not allowed here", and EROFS
//! says so where nothing may change at all: a read-only mount, or a point
//! whose disk is read-only.

use super::inodes::{decode, Inode, PointFile};
use super::SnapFs;
use fuser::Errno;

impl SnapFs {
    /// The errno for a change under (or to) inode `ino` that the mount
    /// does not make.
    pub(super) fn refusal(&self, ino: u64) -> Errno {
        if self.tree.read_only() {
            return Errno::EROFS;
        }
        match decode(ino) {
            Some(Inode::Point(p, f)) => {
                let writable = self
                    .tree
                    .view(p)
                    .is_some_and(|v| !v.hidden && v.point.io.read().writable);
                if writable && f != PointFile::Memory && f != PointFile::MemoryDir {
                    Errno::EPERM
                } else {
                    Errno::EROFS
                }
            }
            Some(Inode::MemoryBlock(..)) => Errno::EROFS,
            _ => Errno::EPERM,
        }
    }
}
