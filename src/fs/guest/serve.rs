//! The kernel's requests on guest inodes (`fs/<vol>/...`) and volume
//! files (`volumes/<vol>.raw`), answered from the guest readers. Guest
//! names are bytes (a guest may use names that are not UTF-8), so these
//! take `&[u8]` where the rest of the layout takes `&str`.

use super::super::handles::Handle;
use super::super::SnapFs;
use super::{guest_attr, kind, ttl};
use crate::guest::{GuestError, GuestFs};
use fuser::{Errno, FileAttr, FileType, FopenFlags};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::time::Duration;

/// A guest directory's entries as listed at opendir, served from there
/// by index so a large directory is read once per `ls`.
pub(in crate::fs) type GuestListing = Arc<Vec<(u64, FileType, OsString)>>;

pub(in crate::fs) fn errno_of(e: &GuestError) -> Errno {
    // Damage is worth a line in the log: the reply carries only EIO.
    if matches!(e, GuestError::Corrupt { .. } | GuestError::Io { .. }) {
        tracing::warn!("{e}");
    }
    Errno::from_i32(e.errno())
}

impl SnapFs {
    fn slot_fs(&self, slot: u64) -> Result<(Arc<dyn GuestFs>, bool), Errno> {
        self.guest_fs(slot, false).ok_or(Errno::ENOENT)
    }

    pub(in crate::fs) fn guest_getattr(
        &self,
        slot: u64,
        g: u64,
    ) -> Result<(FileAttr, Duration), Errno> {
        let (fs, changes) = self.slot_fs(slot)?;
        let a = fs.getattr(g).map_err(|e| errno_of(&e))?;
        Ok((guest_attr(slot, &a), ttl(changes)))
    }

    pub(in crate::fs) fn guest_lookup(
        &self,
        slot: u64,
        dir: u64,
        name: &[u8],
    ) -> Result<(FileAttr, Duration), Errno> {
        // A leaf's view is rebuilt here when its disk was written.
        let (fs, changes) = self.guest_fs(slot, true).ok_or(Errno::ENOENT)?;
        let g = fs.lookup(dir, name).map_err(|e| errno_of(&e))?;
        if !super::super::inodes::guest_fits(g) {
            return Err(Errno::EOVERFLOW);
        }
        let a = fs.getattr(g).map_err(|e| errno_of(&e))?;
        Ok((guest_attr(slot, &a), ttl(changes)))
    }

    pub(in crate::fs) fn guest_opendir(&self, slot: u64, g: u64) -> Result<Handle, Errno> {
        let (fs, _) = self.guest_fs(slot, true).ok_or(Errno::ENOENT)?;
        let entries = fs.readdir(g).map_err(|e| errno_of(&e))?;
        // An entry whose inode has no number here is left out (its lookup
        // says EOVERFLOW): listing it would give it another file's number.
        let listing = entries
            .into_iter()
            .filter(|e| super::super::inodes::guest_fits(e.ino))
            .map(|e| {
                let ino = super::encode(super::Inode::Guest(slot, e.ino));
                (ino, kind(e.kind), OsString::from_vec(e.name))
            })
            .collect();
        Ok(Handle::GuestDir(Arc::new(listing)))
    }

    pub(in crate::fs) fn guest_open(
        &self,
        slot: u64,
        g: u64,
        wants_write: bool,
    ) -> Result<(Handle, FopenFlags), Errno> {
        if wants_write {
            return Err(Errno::EROFS);
        }
        let (fs, changes) = self.slot_fs(slot)?;
        let a = fs.getattr(g).map_err(|e| errno_of(&e))?;
        match a.kind {
            crate::guest::FileKind::File => {}
            crate::guest::FileKind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::ENXIO),
        }
        // What a point that cannot change shows never changes: keep the
        // page cache. A leaf's view may be rebuilt under the same inode.
        // Nothing to flush on close (read-only): no FLUSH round trip.
        let fl = if changes {
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
        };
        Ok((Handle::GuestFile(fs, g), fl))
    }

    pub(in crate::fs) fn guest_readlink(&self, slot: u64, g: u64) -> Result<Vec<u8>, Errno> {
        let (fs, _) = self.slot_fs(slot)?;
        fs.readlink(g).map_err(|e| errno_of(&e))
    }

    pub(in crate::fs) fn guest_listxattr(&self, slot: u64, g: u64) -> Result<Vec<u8>, Errno> {
        let (fs, _) = self.slot_fs(slot)?;
        let names = fs.listxattr(g).map_err(|e| errno_of(&e))?;
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub(in crate::fs) fn guest_getxattr(
        &self,
        slot: u64,
        g: u64,
        name: &[u8],
    ) -> Result<Vec<u8>, Errno> {
        let (fs, _) = self.slot_fs(slot)?;
        fs.getxattr(g, name).map_err(|e| match e {
            GuestError::NotFound => Errno::NO_XATTR,
            e => errno_of(&e),
        })
    }
}

/// Reads `size` bytes at `offset` of guest file `g`.
pub(in crate::fs) fn read_file(
    fs: &dyn GuestFs,
    g: u64,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; size as usize];
    let n = fs.read(g, offset, &mut buf).map_err(|e| errno_of(&e))?;
    buf.truncate(n.min(buf.len()));
    Ok(buf)
}

/// `SEEK_DATA`/`SEEK_HOLE` (else `SEEK_SET`/`SEEK_CUR`-like offsets are
/// the kernel's) in guest file `g`.
pub(in crate::fs) fn seek_file(
    fs: &dyn GuestFs,
    g: u64,
    offset: i64,
    whence: i32,
) -> Result<i64, Errno> {
    // As Linux filesystems answer a negative offset.
    let off = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
    let size = fs.getattr(g).map_err(|e| errno_of(&e))?.size;
    if off >= size && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE) {
        return Err(Errno::ENXIO);
    }
    let at = match whence {
        libc::SEEK_DATA => fs
            .next_data(g, off)
            .map_err(|e| errno_of(&e))?
            .ok_or(Errno::ENXIO)?,
        libc::SEEK_HOLE => fs.next_hole(g, off).map_err(|e| errno_of(&e))?,
        _ => return Err(Errno::EINVAL),
    };
    i64::try_from(at.min(size)).map_err(|_| Errno::EOVERFLOW)
}

/// Reads `size` bytes at `offset` of a volume, short at its end.
pub(in crate::fs) fn read_volume(
    bytes: &dyn crate::guest::ReadBytes,
    offset: u64,
    size: u32,
) -> Result<Vec<u8>, Errno> {
    let end = offset.saturating_add(size as u64).min(bytes.size());
    if offset >= end {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    bytes
        .read_exact_at(&mut buf, offset)
        .map_err(|e| Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(buf)
}
