//! Positioned I/O on image files with errors that carry path and offset.
//!
//! All data I/O in snaptree is `pread`/`pwrite` on a shared file descriptor,
//! so many threads can read one image at once without a seek position to
//! fight over and without holding any lock while the kernel works.

use crate::error::{ImageError, Result};
use crate::storage::Storage;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zero (as QEMU does), so a last cluster that was never fully
/// written does not turn into an error.
pub fn read_at_zero_fill(
    file: &dyn Storage,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(path, "read", offset + done as u64, e)),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is corruption
/// (used for metadata, which must be entirely inside the file).
pub fn read_exact_at(
    file: &dyn Storage,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ImageError::corrupt(
                path,
                offset,
                format!(
                    "{what} ({} bytes) extends past the end of the file",
                    buf.len()
                ),
            )
        } else {
            ImageError::io(path, "read", offset, e)
        }
    })
}

pub fn write_all_at(file: &dyn Storage, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
    file.write_all_at(buf, offset)
        .map_err(|e| ImageError::io(path, "write", offset, e))
}

pub fn sync_data(file: &dyn Storage, path: &Path) -> Result<()> {
    file.sync_data()
        .map_err(|e| ImageError::io(path, "fdatasync", 0, e))
}

pub fn file_len(file: &dyn Storage, path: &Path) -> Result<u64> {
    file.len().map_err(|e| ImageError::io(path, "stat", 0, e))
}

pub fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Splits `[from, to)` of the file into (start, end, is_data) segments with
/// `SEEK_DATA`/`SEEK_HOLE`. Bytes past the end of the file are a hole.
/// Filesystems without hole support report everything as data, which is
/// right, and so is storage without a file (memory): all data.
pub fn data_segments(
    file: &dyn Storage,
    path: &Path,
    from: u64,
    to: u64,
) -> Result<Vec<(u64, u64, bool)>> {
    let Some(file) = file.as_file() else {
        return Ok(if from < to {
            vec![(from, to, true)]
        } else {
            Vec::new()
        });
    };
    let seek = |at: u64, whence: i32| -> Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; no memory is touched.
        let r = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(ImageError::io(path, "lseek", at, e));
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let data = seek(at, libc::SEEK_DATA)?.unwrap_or(to).clamp(at, to);
        if data > at {
            out.push((at, data, false));
        }
        if data >= to {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?
            .unwrap_or(to)
            .clamp(data + 1, to);
        out.push((data, hole, true));
        at = hole;
    }
    Ok(out)
}
