//! Open files: what each file opens to (a [`Handle`] and the kernel's
//! cache flags for it) and the table of open handles. A handle holds what
//! the file showed at open (a disk's point, a memory view, rendered text),
//! so a request on it needs no lookup and sees one consistent file.

use super::inodes::{Inode, PointFile};
use super::SnapFs;
use crate::memory::view::MemoryView;
use crate::tree::PointDisk;
use fuser::{Errno, FileHandle, FopenFlags};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What an open file handle refers to (cheap to clone: Arcs).
#[derive(Clone)]
pub(super) enum Handle {
    Disk(Arc<PointDisk>),
    /// A memory view of point `.0` (`memory.raw`, or block `Some(i)` under
    /// `memory/`): read-only, never changes while open.
    Memory(u64, Arc<MemoryView>, Option<usize>),
    /// Text rendered at open.
    Text(Arc<Vec<u8>>),
    Ctl(Arc<PointDisk>),
    MergeNow,
    /// A guest file (`fs/<vol>/...`): the filesystem as it was at open,
    /// and the guest inode.
    GuestFile(Arc<dyn crate::guest::GuestFs>, u64),
    /// A guest directory, listed at opendir.
    GuestDir(super::guest::GuestListing),
    /// `volumes/<vol>.raw`.
    Volume(Arc<dyn crate::guest::ReadBytes>),
}

impl SnapFs {
    /// The handle `fh` refers to, cloned so the table lock is not held
    /// during the request.
    pub(super) fn handle(&self, fh: FileHandle) -> Option<Handle> {
        self.handles.lock().get(&fh.0).cloned()
    }

    /// The point of a `disk.raw` handle.
    pub(super) fn disk_handle(&self, fh: FileHandle) -> Option<Arc<PointDisk>> {
        match self.handle(fh)? {
            Handle::Disk(p) => Some(p),
            _ => None,
        }
    }

    pub(super) fn new_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h);
        FileHandle(fh)
    }

    /// What opening `i` (for writing if `wants_write`) gives, or why it
    /// cannot be opened.
    pub(super) fn open_file(
        &self,
        i: Inode,
        wants_write: bool,
    ) -> Result<(Handle, FopenFlags), Errno> {
        match i {
            Inode::Tree
            | Inode::Status
            | Inode::Point(_, PointFile::Info)
            | Inode::Volume(_, super::guest::INDEX_SLOT) => {
                if wants_write {
                    return Err(Errno::EACCES);
                }
                let t = self.text(i).ok_or(Errno::ENOENT)?;
                Ok((Handle::Text(Arc::new(t)), FopenFlags::FOPEN_DIRECT_IO))
            }
            Inode::MergeNow => Ok((Handle::MergeNow, FopenFlags::FOPEN_DIRECT_IO)),
            Inode::Point(p, f) => {
                let v = self
                    .tree
                    .view(p)
                    .filter(|v| !v.hidden)
                    .ok_or(Errno::ENOENT)?;
                match f {
                    PointFile::Disk => {
                        let writable = v.point.io.read().writable;
                        if wants_write && !writable {
                            return Err(Errno::EROFS);
                        }
                        // Every disk keeps the page cache across opens, so a
                        // second read runs at memory speed. Safe for leaves
                        // too: their bytes change only through this mount,
                        // whose writes, fallocates and direct I/O the kernel
                        // applies to (or drops from) its cache; tree commands
                        // never change what a point reads.
                        let fl = FopenFlags::FOPEN_KEEP_CACHE;
                        Ok((Handle::Disk(v.point.clone()), fl))
                    }
                    PointFile::Memory => {
                        if wants_write {
                            return Err(Errno::EROFS);
                        }
                        let m = self.memory_of(p).ok_or(Errno::ENOENT)?;
                        // Not FOPEN_KEEP_CACHE: a view never changes, but
                        // `memory`/`checkpoint` can put another one behind
                        // the same inode while the kernel still holds it
                        // (a file kept open) with the old pages. Each open
                        // starts from a clean cache.
                        Ok((Handle::Memory(p, m, None), FopenFlags::empty()))
                    }
                    PointFile::Ctl => {
                        if wants_write && self.tree.read_only() {
                            return Err(Errno::EROFS);
                        }
                        let fl = FopenFlags::FOPEN_DIRECT_IO;
                        Ok((Handle::Ctl(v.point.clone()), fl))
                    }
                    _ => Err(Errno::EISDIR),
                }
            }
            Inode::MemoryBlock(p, i) => {
                if wants_write {
                    return Err(Errno::EROFS);
                }
                let (m, i) = self.memory_block(p, i).ok_or(Errno::ENOENT)?;
                // No FOPEN_KEEP_CACHE, as for memory.raw.
                Ok((Handle::Memory(p, m, Some(i)), FopenFlags::empty()))
            }
            Inode::Volume(p, i) => {
                if wants_write {
                    return Err(Errno::EROFS);
                }
                let bytes = self.volume_bytes(p, i).ok_or(Errno::ENOENT)?;
                Ok((Handle::Volume(bytes), FopenFlags::FOPEN_NOFLUSH))
            }
            Inode::Guest(s, g) => self.guest_open(s, g, wants_write),
            Inode::Root => Err(Errno::EISDIR),
        }
    }
}
