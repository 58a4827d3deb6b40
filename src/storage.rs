//! Where a format's bytes live: a file (production) or memory (unit tests).
//!
//! Format code (qcow2, VHD, raw) reads and writes its image through
//! [`Storage`] rather than owning a `std::fs::File`, so the formats can be
//! tested beside their code on images built in memory, in milliseconds,
//! while qemu-img stays the oracle in the integration tests.
//!
//! The file implementation is the production path and adds nothing: each
//! call is the same `pread`/`pwrite`/`fstat` as before, one virtual call
//! away (layers already sit behind `dyn Layer`). What only a real file
//! descriptor can do — QEMU-compatible OFD locks (`image/lock.rs`),
//! `SEEK_DATA`/`SEEK_HOLE`, hole punching — is reached through
//! [`Storage::as_file`]; memory has no descriptor, so it takes no locks,
//! reports everything as data and writes zeros instead of punching holes.
//! See ARCHITECTURE.md ("The read path", "Locks").

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

/// Positioned I/O on the bytes of one image. `Send + Sync`: many threads
/// read one image at once (no seek position to share).
pub trait Storage: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; 0 means end of storage.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes up to `buf.len()` bytes at `offset`, growing the storage if
    /// the write ends past it.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;

    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Makes written data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;

    /// Makes written data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;

    /// The file underneath, for what needs a descriptor: OFD locks,
    /// `SEEK_DATA`/`SEEK_HOLE`, hole punching. `None` for memory.
    fn as_file(&self) -> Option<&File> {
        None
    }

    /// Makes `[offset, offset+len)` a hole that reads as zeros, keeping the
    /// length; `Unsupported` where it cannot (callers then write zeros).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Exactly `buf.len()` bytes at `offset`; `UnexpectedEof` if shorter.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// All of `buf` at `offset`.
    fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Storage for File {
    #[inline]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }

    #[inline]
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.metadata().map(|m| m.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }

    fn as_file(&self) -> Option<&File> {
        Some(self)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on our own descriptor; no memory is touched.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
}

/// An image held in memory, for unit tests of the formats. Grows on
/// writes past the end, as a file does. `limit` caps its size so a test
/// of a hostile header cannot make it allocate without bound. Clones
/// share the bytes (as two descriptors of one file do), so a test can
/// hand one to a layer and look at, or reopen, what the layer wrote.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    bytes: Arc<RwLock<Vec<u8>>>,
    limit: Option<u64>,
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: Arc::new(RwLock::new(bytes)),
            limit: None,
        }
    }

    /// Refuses (with `ENOSPC`) to grow past `limit` bytes.
    pub fn with_limit(mut self, limit: u64) -> MemStorage {
        self.limit = Some(limit);
        self
    }

    /// A copy of the bytes now held.
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn grow_to(&self, v: &mut Vec<u8>, end: u64) -> io::Result<()> {
        if self.limit.is_some_and(|l| end > l) || end > usize::MAX as u64 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if end as usize > v.len() {
            v.resize(end as usize, 0);
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let v = self.bytes.read().unwrap_or_else(|e| e.into_inner());
        if offset >= v.len() as u64 {
            return Ok(0);
        }
        let at = offset as usize;
        let n = buf.len().min(v.len() - at);
        buf[..n].copy_from_slice(&v[at..at + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut v = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.grow_to(&mut v, end)?;
        v[offset as usize..end as usize].copy_from_slice(buf);
        Ok(buf.len())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut v = self.bytes.write().unwrap_or_else(|e| e.into_inner());
        self.grow_to(&mut v, len)?;
        v.truncate(len as usize);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_short_at_the_end_and_grows_on_write() {
        let m = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut b = [9u8; 4];
        assert_eq!(m.read_at(&mut b, 1).unwrap(), 2);
        assert_eq!(&b[..2], &[2, 3]);
        assert_eq!(m.read_at(&mut b, 3).unwrap(), 0);
        assert_eq!(
            m.read_exact_at(&mut b, 1).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        m.write_all_at(&[7, 7], 5).unwrap();
        assert_eq!(m.to_vec(), vec![1, 2, 3, 0, 0, 7, 7]);
        let other = m.clone();
        other.set_len(2).unwrap();
        assert_eq!(m.len().unwrap(), 2);
        assert!(m.as_file().is_none());
    }

    #[test]
    fn memory_limit_refuses_growth() {
        let m = MemStorage::new().with_limit(8);
        assert!(m.write_all_at(&[0; 4], 4).is_ok());
        let e = m.write_all_at(&[0; 1], 8).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert!(m.set_len(u64::MAX).is_err());
        assert!(m.write_at(&[1], u64::MAX).is_err());
    }

    #[test]
    fn file_storage_is_the_file() {
        let f = tempfile_in_target();
        let s: &dyn Storage = &f;
        s.write_all_at(b"abc", 2).unwrap();
        assert_eq!(s.len().unwrap(), 5);
        let mut b = [0u8; 5];
        s.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"\0\0abc");
        assert!(s.as_file().is_some());
    }

    fn tempfile_in_target() -> File {
        let dir = std::env::temp_dir();
        let p = dir.join(format!("snaptree-storage-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }
}
