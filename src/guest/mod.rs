//! The guest's own view of a snapshot point's disks: the volumes on them
//! (partitions, LVM logical volumes) and the files inside those volumes,
//! parsed in userspace so a user needs no root, no helper VM and no kernel
//! filesystem driver on an untrusted image. See ARCHITECTURE.md ("Guest
//! files").
//!
//! Everything here reads through [`ReadBytes`]: a point's disk as the chain
//! resolves it, a slice of it (one volume), or a file in tests. Nothing here
//! writes; guest views are read-only everywhere, also on leaves.
//!
//! Every offset and size read from a guest structure is untrusted: it is
//! checked against the volume before use, and a bad one becomes a
//! [`GuestError::Corrupt`] naming the volume, the byte offset and what is
//! wrong. No panic, no unbounded allocation, no read outside the volume.

pub mod error;
pub mod ext;
pub mod fat;
pub mod fsapi;
pub mod ntfs;
pub mod point;
pub mod probe;
pub mod volumes;
pub mod xfs;

pub use crate::crc;
pub use error::{GuestError, GuestResult};
pub use fsapi::{Attr, DirEntry, FileKind, FsInfo, GuestFs, Timestamp};

use std::io;

/// Positioned reads of a fixed-size byte range (a disk or a volume).
/// `Send + Sync`: FUSE serves requests from several threads at once.
pub trait ReadBytes: Send + Sync {
    /// The size in bytes; reads past it fail.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`. Fails with `UnexpectedEof` if the range
    /// ends past [`ReadBytes::size`]; never returns a short read.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A file read as a volume or disk (tests, and `snaptree` tools run on an
/// exported image).
pub struct FileBytes {
    file: std::fs::File,
    size: u64,
}

impl FileBytes {
    pub fn open(path: &std::path::Path) -> io::Result<FileBytes> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileBytes { file, size })
    }
}

impl ReadBytes for FileBytes {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, buf.len(), offset)?;
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
}

impl ReadBytes for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.len() as u64, buf.len(), offset)?;
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

/// `UnexpectedEof` unless `[offset, offset+len)` lies inside `size` bytes.
pub fn check_range(size: u64, len: usize, offset: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read of {len} bytes at offset {offset} ends past the end ({size} bytes)"),
        )),
    }
}
