//! Zeroing a guest range: in metadata where the format can say "zero"
//! (zero clusters in v3, zero subclusters with extended L2, or dropping a
//! cluster when there is no backing file), and as written zeros elsewhere.
//!
//! It lives apart from `write` because it is a separate decision per cluster
//! (which entry expresses zeros) that only reuses the writer: the parts it
//! cannot express in metadata go through `write_locked`, and the entries it
//! replaces are freed through `release`, so the crash-safety order described
//! in `write`'s module docs applies unchanged.

use super::l2::{Entry, BITMAP_ALL_ZERO, OFLAG_COPIED, OFLAG_ZERO};
use super::write::{release, sub_mask};
use super::{Meta, Qcow2Layer};
use crate::error::Result;
use crate::image::{check_range, BackingRead};

impl Qcow2Layer {
    /// Makes `[offset, offset + len)` read as zeros: metadata first, then
    /// the leftover ranges as written zeros, all under `write_lock`.
    pub(super) fn zero_range(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        self.require_writable()?;
        check_range(&self.path, self.header.size, offset, len)?;
        let _w = self.write_lock.lock();
        // Ranges that cannot be expressed in metadata are written as zeros.
        let partial = self.zero_in_metadata(offset, len)?;
        for (at, n) in partial {
            self.write_locked(at, &vec![0u8; n as usize], below)?;
        }
        Ok(())
    }

    /// Under the metadata lock, marks every cluster of `[offset, offset +
    /// len)` that metadata can express as zero, and returns the ranges
    /// that must be written as zeros instead; the lock is dropped on return
    /// because those writes take it themselves.
    fn zero_in_metadata(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let g = self.geom;
        let cs = g.cluster_size;
        let size = self.header.size;
        let mut partial: Vec<(u64, u64)> = Vec::new();
        let mut meta = self.meta.lock();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let cstart = at / cs * cs;
            let cend = (cstart + cs).min(end);
            let full = at == cstart && (cend == cstart + cs || cend == size);
            let entry = self.entry_at(&mut meta, at)?;
            if g.extended {
                self.zero_extended(&mut meta, at, cend, full, entry, &mut partial)?;
            } else if full && g.version >= 3 {
                // Unallocated with no backing file reads zeros already.
                let zero_already = matches!(entry, Entry::Zero { host: None })
                    || (entry == Entry::Unallocated && self.backing.is_none());
                if !zero_already {
                    self.set_entry(&mut meta, cstart, OFLAG_ZERO, 0)?;
                    release(&mut meta, &entry, cs);
                }
            } else if full && self.backing.is_none() {
                if entry != Entry::Unallocated {
                    self.set_entry(&mut meta, cstart, 0, 0)?;
                    release(&mut meta, &entry, cs);
                }
            } else {
                partial.push((at, cend - at));
            }
            at = cend;
        }
        self.maybe_write_back(&mut meta)?;
        Ok(partial)
    }

    /// Extended L2, for `[at, cend)` inside one cluster: a whole cluster
    /// becomes all-zero subclusters; otherwise the whole subclusters inside
    /// the range are marked zero and the pieces of partly covered
    /// subclusters go to `partial`. A compressed cluster has no
    /// subclusters, so it is written as zeros in full.
    fn zero_extended(
        &self,
        meta: &mut Meta,
        at: u64,
        cend: u64,
        full: bool,
        entry: Entry,
        partial: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let g = self.geom;
        let cs = g.cluster_size;
        let sc = g.subcluster_size;
        let cstart = at / cs * cs;
        let first = (at - cstart).div_ceil(sc);
        let last_excl = if cend == self.header.size {
            (cend - cstart).div_ceil(sc)
        } else {
            (cend - cstart) / sc
        };
        if full {
            if !matches!(
                entry,
                Entry::Normal {
                    host: None,
                    bitmap: Some(BITMAP_ALL_ZERO),
                    ..
                }
            ) {
                self.set_entry(meta, cstart, 0, BITMAP_ALL_ZERO)?;
                release(meta, &entry, cs);
            }
        } else if first < last_excl && !matches!(entry, Entry::Compressed(_)) {
            self.zero_subclusters(meta, cstart, first, last_excl, entry)?;
            let (zs, ze) = (cstart + first * sc, (cstart + last_excl * sc).min(cend));
            if at < zs {
                partial.push((at, zs - at));
            }
            if ze < cend {
                partial.push((ze, cend - ze));
            }
        } else {
            partial.push((at, cend - at));
        }
        Ok(())
    }

    /// Marks subclusters `first..last_excl` of the cluster at `cstart` zero
    /// (zero bit set, allocation bit cleared), keeping the cluster's host
    /// cluster and COPIED flag for the subclusters left as they were.
    fn zero_subclusters(
        &self,
        meta: &mut Meta,
        cstart: u64,
        first: u64,
        last_excl: u64,
        entry: Entry,
    ) -> Result<()> {
        let mask = sub_mask(first, last_excl - 1);
        let (word, bm) = match entry {
            Entry::Normal {
                host,
                copied,
                bitmap: Some(bm),
            } => {
                let flag = if copied { OFLAG_COPIED } else { 0 };
                (host.map_or(0, |h| h | flag), bm)
            }
            _ => (0, 0),
        };
        self.set_entry(meta, cstart, word, (bm & !mask) | (mask << 32))
    }
}
