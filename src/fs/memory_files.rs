//! A point's memory files: `memory.raw` and the `memory/` directory of its
//! other RAM blocks. Both show the point's memory view, which a `ctl`
//! command can replace; this module finds the view behind them, serves
//! `memory/` (the handler of its layout entry, see `layout`) and guards
//! against replacing a view under a file that is open.

use super::attrs::{attr, epoch};
use super::command::Command;
use super::handles::Handle;
use super::inodes::{self, encode, Inode};
use super::layout::Listed;
use super::{modes, SnapFs};
use crate::memory::view::MemoryView;
use crate::tree::PointDisk;
use fuser::{Errno, FileAttr, FileType};
use std::sync::Arc;
use std::time::Duration;

impl SnapFs {
    /// The memory view of visible point `p`, when it has a readable one.
    pub(super) fn memory_of(&self, p: u64) -> Option<Arc<MemoryView>> {
        let v = self.tree.view(p).filter(|v| !v.hidden)?;
        let m = v.point.memory.read();
        m.as_ref().and_then(|m| m.view.as_ref().ok().cloned())
    }

    /// The memory view of point `p` if it has other RAM blocks to show.
    pub(super) fn memory_blocks_of(&self, p: u64) -> Option<Arc<MemoryView>> {
        self.memory_of(p).filter(|m| !m.blocks.is_empty())
    }

    /// The memory view of point `p` and its block `i`, if it has one.
    pub(super) fn memory_block(&self, p: u64, i: u64) -> Option<(Arc<MemoryView>, usize)> {
        let m = self.memory_of(p)?;
        let i = usize::try_from(i).ok().filter(|i| *i < m.blocks.len())?;
        Some((m, i))
    }

    /// Whether `command` (a `ctl` write to point `p`) could put another
    /// memory view behind `p`'s memory files while one of them is open
    /// (also one opened before a `snapshot` moved the view away):
    /// the kernel keys its page cache by inode, so the open file and new
    /// ones would share pages of two different sources.
    pub(super) fn memory_in_use(&self, p: &PointDisk, command: &Command) -> bool {
        if !command.changes_memory() {
            return false;
        }
        let open = || {
            self.handles
                .lock()
                .values()
                .any(|h| matches!(h, Handle::Memory(id, ..) if *id == p.id))
        };
        // The kernel sends RELEASE after close(2) returns: a file closed
        // just before the command may still be counted for a moment.
        for _ in 0..20 {
            if !open() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// The attributes of RAM block `i` of point `p`, in `memory/`.
    pub(super) fn memory_block_attr(&self, p: u64, i: u64) -> Result<FileAttr, Errno> {
        let (m, i) = self.memory_block(p, i).ok_or(Errno::ENOENT)?;
        let t = self
            .tree
            .view(p)
            .map_or(self.mounted_at, |v| epoch(v.point.created));
        Ok(attr(
            Inode::MemoryBlock(p, i as u64),
            FileType::RegularFile,
            modes::memory(self.owners.of(&m.path)),
            super::disk::memory_chain(&m, Some(i)).size(),
            t,
        ))
    }
}

/// `memory/` of point `p`: the block file called `name`.
pub(super) fn lookup_block(fs: &SnapFs, p: u64, name: &str) -> Option<Inode> {
    let m = fs.memory_blocks_of(p)?;
    let i = m.blocks.iter().position(|b| b.file == name)? as u64;
    // Inode numbers hold MAX_BLOCKS blocks per point (readdir lists no
    // more).
    (i < inodes::MAX_BLOCKS).then_some(Inode::MemoryBlock(p, i))
}

/// `memory/` of point `p`: its block files, at most MAX_BLOCKS.
pub(super) fn list_blocks(fs: &SnapFs, p: u64) -> Option<Vec<Listed>> {
    let m = fs.memory_blocks_of(p)?;
    let n = (m.blocks.len() as u64).min(inodes::MAX_BLOCKS);
    let files = m.blocks.iter().take(n as usize).enumerate();
    Some(
        files
            .map(|(i, b)| {
                let ino = encode(Inode::MemoryBlock(p, i as u64));
                (ino, FileType::RegularFile, b.file.clone())
            })
            .collect(),
    )
}
