//! The cursor every part of the stream parser reads through: sequential
//! big-endian fields at a position, each checked against the file's
//! length before it is read, so a size or offset from the stream can only
//! move the cursor inside the file (or fail with where and what). The
//! file is read with `pread` through one window, refilled as the cursor
//! leaves it; page bytes are skipped, never read.

use crate::error::{ImageError, Result};
use crate::fileio;
use crate::storage::Storage;
use std::path::Path;

/// Read window: a few dozen page records per `pread`.
pub(super) const WINDOW: usize = 256 << 10;

/// Sequential big-endian reads through a window of the file.
pub(super) struct Reader<'a> {
    pub(super) file: &'a dyn Storage,
    pub(super) path: &'a Path,
    pub(super) len: u64,
    pub(super) pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl<'a> Reader<'a> {
    pub(super) fn new(file: &'a dyn Storage, path: &'a Path, len: u64) -> Self {
        let (pos, buf, buf_at) = (0, Vec::new(), 0);
        Reader {
            file,
            path,
            len,
            pos,
            buf,
            buf_at,
        }
    }

    /// Checks that `n` bytes at the current position are in the file.
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if self.len.saturating_sub(self.pos) < n {
            corrupt!(
                self,
                self.pos,
                "{what} ({n} bytes) runs past the end of the file: the stream is truncated"
            );
        }
        Ok(())
    }

    /// `n` bytes at the current position, consumed.
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        self.need(n as u64, what)?;
        if self.pos < self.buf_at || self.pos + n as u64 > self.buf_at + self.buf.len() as u64 {
            let want = n.max(WINDOW).min((self.len - self.pos) as usize);
            self.buf.resize(want, 0);
            fileio::read_exact_at(self.file, self.path, &mut self.buf, self.pos, what)?;
            self.buf_at = self.pos;
        }
        let at = (self.pos - self.buf_at) as usize;
        self.pos += n as u64;
        Ok(&self.buf[at..at + n])
    }

    pub(super) fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        self.take(n, what).map(<[u8]>::to_vec)
    }
    pub(super) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    pub(super) fn be16(&mut self, what: &str) -> Result<u16> {
        Ok(fileio::be_u16(self.take(2, what)?, 0))
    }
    pub(super) fn be32(&mut self, what: &str) -> Result<u32> {
        Ok(fileio::be_u32(self.take(4, what)?, 0))
    }
    pub(super) fn be64(&mut self, what: &str) -> Result<u64> {
        Ok(fileio::be_u64(self.take(8, what)?, 0))
    }
    /// A string with a one-byte length, as QEMU writes ids and names.
    pub(super) fn str8(&mut self, what: &str) -> Result<String> {
        let n = self.u8(what)? as usize;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    /// The next byte, not consumed; `None` at the end of the file.
    pub(super) fn peek(&mut self) -> Result<Option<u8>> {
        if self.pos >= self.len {
            return Ok(None);
        }
        let b = self.u8("section type")?;
        self.pos -= 1;
        Ok(Some(b))
    }
    /// Skips `n` bytes that must be in the file.
    pub(super) fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        self.pos += n;
        Ok(())
    }
}
