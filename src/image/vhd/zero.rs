//! Zero writes to a VHD (`Layer::write_zeroes`), following the "Zeros"
//! rule of `write`'s module docs: a dynamic disk punches holes into the
//! sectors the file holds, a differencing disk writes zeros as data.
//!
//! It is apart from `write` because it adds no ordering of its own: it
//! either goes through `write_sparse` (so the crash-safety order of
//! `write` applies) or changes only guest data already exposed, never
//! metadata.

use super::VhdLayer;
use crate::error::Result;
use crate::fileio::write_all_at;
use crate::image::{check_range, BackingRead, Mapping};

/// Zero writes go in pieces of this size.
const ZERO_CHUNK: u64 = 1 << 20;

impl VhdLayer {
    /// `Layer::write_zeroes`.
    pub(super) fn zero_guest(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        let writer = self.writer()?;
        check_range(&self.path, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut w = writer.lock();
        w.data_written = true;
        let Some(sp) = &self.sparse else {
            return self.zero_host(offset, len, true);
        };
        if self.footer.is_differencing() {
            let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(ZERO_CHUNK) as usize;
                self.write_sparse(sp, &mut w, at, &zeros[..n], below)?;
                self.maybe_write_back(sp, &mut w)?;
                at += n as u64;
            }
            return Ok(());
        }
        // A dynamic disk: what the file does not hold reads zeros already;
        // what it holds becomes a hole in the data area (every reader reads
        // a hole as zeros, bitmap or not) or, where the file system cannot
        // punch, written zeros. Blocks are never freed (see module docs).
        for e in self.map_sparse(sp, offset, len)? {
            if let Mapping::Data { host } = e.mapping {
                self.zero_host(host, e.len, true)?;
            }
        }
        Ok(())
    }

    /// Zeros `[host, host+len)` of the file (guest data, never metadata):
    /// a hole where allowed and possible, else written zeros.
    fn zero_host(&self, host: u64, len: u64, punch: bool) -> Result<()> {
        // A hole where the storage can (the caller passes a range of guest
        // data, which `map` and `check_range` bounded), else written zeros.
        if punch && self.file.punch_hole(host, len).is_ok() {
            return Ok(());
        }
        let chunk = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut at = host;
        while at < host + len {
            let n = (host + len - at).min(ZERO_CHUNK) as usize;
            write_all_at(&*self.file, &self.path, &chunk[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}
