//! Coalescing of the copy phase's `pwrite`s (see `write`'s module docs).
//!
//! A large guest write becomes one piece per cluster; writing each piece
//! with its own `pwrite` would cost one system call per cluster. This
//! buffer joins pieces whose host ranges are contiguous, up to a bound, so
//! it is kept apart from the planning and linking logic of `write`.

use super::Qcow2Layer;
use crate::error::Result;
use crate::fileio::write_all_at;

/// Coalesces `pwrite`s to contiguous host ranges into one call.
pub(super) struct HostWriter<'a> {
    layer: &'a Qcow2Layer,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> HostWriter<'a> {
    /// The most bytes buffered before they are written, bounding memory.
    const MAX: usize = 8 << 20;

    /// An empty writer to `layer`'s file.
    pub(super) fn new(layer: &'a Qcow2Layer) -> Self {
        HostWriter {
            layer,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Queues `data` for host offset `host`, first writing out what is
    /// buffered when `host` does not continue it or the buffer is full.
    pub(super) fn write(&mut self, host: u64, data: &[u8]) -> Result<()> {
        if !self.buf.is_empty()
            && (self.start + self.buf.len() as u64 != host
                || self.buf.len() + data.len() > Self::MAX)
        {
            self.finish()?;
        }
        if self.buf.is_empty() {
            self.start = host;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Writes out what is buffered (no sync: `flush_locked` orders syncs).
    pub(super) fn finish(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            write_all_at(&*self.layer.file, &self.layer.path, &self.buf, self.start)?;
            self.buf.clear();
        }
        Ok(())
    }
}
