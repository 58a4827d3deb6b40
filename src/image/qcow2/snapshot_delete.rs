//! Deleting an internal snapshot of the image this layer writes, as
//! `qemu-img snapshot -d` does.
//!
//! The order keeps the image consistent at every crash point (leaks and
//! COPIED flags left clear are what the leak repair fixes):
//! 1. the snapshot table without the entry goes to new clusters, whose
//!    refcounts are flushed first (`flush_locked`);
//! 2. the commit: one 12-byte write of the header's snapshot count and
//!    table offset (offsets 60..72, one sector), synced;
//! 3. the refcounts of the old table, the snapshot's L1 table, and every
//!    L2 table and data cluster it reaches drop by one, after the commit
//!    (a crash before leaves them one too high: leaks);
//! 4. entries of the current state whose cluster is now referenced only by
//!    it get COPIED back, as QEMU does;
//! 5. the clusters nothing references any more are punched out of the
//!    file.
//!
//! Steps 1 to 4 run with the image's dirty bit set (v3 images): a crash
//! among them leaves leaks, refcounts one too high or COPIED flags clear,
//! and the bit makes the next writer repair all that before it writes
//! (QEMU does on open; we do in `tree::open::open_point_layer`), so
//! `qemu-img check` is clean after that recovery at every crash point.

use super::header::{self, Header};
use super::l2::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::snapshot::{read_snapshots, SnapshotEntry};
use super::{Meta, Qcow2Layer};
use crate::error::{ImageError, Result};
use crate::fileio::{self, read_exact_at, sync_data, write_all_at};
use std::sync::Arc;

/// An L1 table longer than this (QEMU's own limit) is corrupt.
const MAX_L1_BYTES: u64 = 32 << 20;

impl Qcow2Layer {
    /// Deletes the internal snapshot whose ID is `id`.
    pub(super) fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.require_writable()?;
        let _w = self.write_lock.lock();
        let mut meta = self.meta.lock();
        self.flush_locked(&mut meta)?;
        let (file, path) = (&*self.file, self.path.as_path());
        let h = Header::read(file, path)?;
        let snaps = read_snapshots(file, path, &h, fileio::file_len(file, path)?)?;
        let victim = snaps.iter().position(|s| s.info.id == id).ok_or_else(|| {
            ImageError::invalid(path, format!("no internal snapshot with ID {id:?}"))
        })?;
        let frees = self.snapshot_clusters(&snaps[victim])?;
        // From here until COPIED is right again the image says it is
        // dirty, so that whoever opens it for writing after a crash (QEMU,
        // or our `open_point_layer`) repairs it first: leaks from step 1
        // or 3, COPIED flags from step 4.
        super::repair::set_dirty(file, path, &h, true)?;
        // 1. The new table, in new clusters, durable with its refcounts.
        // The last entry's padding may lie past the end of the file.
        let len = fileio::file_len(file, path)?;
        let mut table = Vec::new();
        for (_, s) in snaps.iter().enumerate().filter(|(i, _)| *i != victim) {
            let mut e = vec![0u8; s.entry_len as usize];
            let n = s.entry_len.min(len.saturating_sub(s.entry_at)) as usize;
            read_exact_at(file, path, &mut e[..n], s.entry_at, "snapshot table entry")?;
            table.extend(e);
        }
        let cs = self.geom.cluster_size;
        let new_off = if table.is_empty() {
            0
        } else {
            let off = self.alloc(&mut meta, (table.len() as u64).div_ceil(cs))?;
            write_all_at(file, path, &table, off)?;
            off
        };
        meta.data_written = true;
        self.flush_locked(&mut meta)?;
        // 2. The commit.
        let mut hb = [0u8; 12];
        hb[..4].copy_from_slice(&(snaps.len() as u32 - 1).to_be_bytes());
        hb[4..].copy_from_slice(&new_off.to_be_bytes());
        write_all_at(file, path, &hb, header::OFF_NB_SNAPSHOTS)?;
        sync_data(file, path)?;
        // 3. Refcounts drop, after the commit.
        let mut freed = frees;
        if let Some(last) = snaps.last() {
            let old_len = last.entry_at + last.entry_len - h.snapshots_offset;
            freed.push((h.snapshots_offset, old_len));
        }
        meta.pending_free.extend(freed.iter().copied());
        self.flush_locked(&mut meta)?;
        // 4. COPIED where the current state is now alone.
        self.restore_copied(&mut meta)?;
        self.flush_locked(&mut meta)?;
        super::repair::set_dirty(file, path, &h, false)?;
        // 5. The space nothing references any more goes back to the host
        // filesystem, as QEMU's `pass-discard-snapshot` does.
        self.discard_unreferenced(&mut meta, &freed)
    }

    /// Punches out the clusters of `ranges` whose refcount is 0 now. Best
    /// effort: a filesystem that cannot punch holes keeps them allocated
    /// (they are free in the image either way, and our allocator never
    /// writes below the end of the file).
    fn discard_unreferenced(&self, meta: &mut Meta, ranges: &[(u64, u64)]) -> Result<()> {
        let cs = self.geom.cluster_size;
        let mut clusters: Vec<u64> = ranges
            .iter()
            .filter(|(_, len)| *len > 0)
            .flat_map(|&(off, len)| off / cs..=(off + len - 1) / cs)
            .collect();
        clusters.sort_unstable();
        clusters.dedup();
        let mut run: Option<(u64, u64)> = None;
        for c in clusters {
            if self.refcount(meta, c * cs)? != 0 {
                continue;
            }
            run = match run {
                Some((first, n)) if first + n == c => Some((first, n + 1)),
                other => {
                    if let Some((first, n)) = other {
                        let _ = self.file.punch_hole(first * cs, n * cs);
                    }
                    Some((c, 1))
                }
            };
        }
        if let Some((first, n)) = run {
            let _ = self.file.punch_hole(first * cs, n * cs);
        }
        Ok(())
    }

    /// The host ranges the snapshot references through its L1 table: the
    /// table itself, its L2 tables and their clusters (once per reference).
    fn snapshot_clusters(&self, sn: &SnapshotEntry) -> Result<Vec<(u64, u64)>> {
        let (file, path) = (&*self.file, self.path.as_path());
        let g = self.geom;
        let cs = g.cluster_size;
        let bytes = sn.l1_size as u64 * 8;
        if bytes > MAX_L1_BYTES || !sn.l1_offset.is_multiple_of(cs) {
            return Err(ImageError::corrupt(
                path,
                sn.entry_at,
                format!(
                    "snapshot L1 table of {} entries at {}",
                    sn.l1_size, sn.l1_offset
                ),
            ));
        }
        let end = fileio::file_len(file, path)?;
        let mut out = Vec::new();
        if bytes == 0 {
            return Ok(out);
        }
        let mut l1 = vec![0u8; bytes as usize];
        read_exact_at(file, path, &mut l1, sn.l1_offset, "snapshot L1 table")?;
        out.push((sn.l1_offset, bytes));
        let xbits = g.compressed_offset_bits();
        let mut l2 = vec![0u8; cs as usize];
        for e in header::decode_u64s(&l1) {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) || off + cs > end {
                return Err(ImageError::corrupt(
                    path,
                    sn.l1_offset,
                    "snapshot L2 table outside the file",
                ));
            }
            out.push((off, cs));
            read_exact_at(file, path, &mut l2, off, "snapshot L2 table")?;
            let words = header::decode_u64s(&l2);
            for w in words.iter().step_by(g.words_per_entry as usize) {
                if w & OFLAG_COMPRESSED != 0 {
                    let host = w & ((1u64 << xbits) - 1);
                    let sectors = ((w >> xbits) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
                    // A last sector qemu did not pad may run past the end.
                    let len = ((host & !511) + sectors * 512 - host).min(end.saturating_sub(host));
                    if host >= end {
                        return Err(ImageError::corrupt(
                            path,
                            off,
                            "compressed cluster past the end of the file",
                        ));
                    }
                    out.push((host, len));
                } else if w & L2E_OFFSET_MASK != 0 {
                    let host = w & L2E_OFFSET_MASK;
                    if host + cs > end {
                        return Err(ImageError::corrupt(
                            path,
                            off,
                            "data cluster past the end of the file",
                        ));
                    }
                    out.push((host, cs));
                }
            }
        }
        Ok(out)
    }

    /// Sets COPIED on the current state's L1 and L2 entries whose cluster
    /// has refcount 1 now (changed tables are written by the next flush).
    fn restore_copied(&self, meta: &mut Meta) -> Result<()> {
        for i in 0..meta.l1.len() {
            let off = meta.l1[i] & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if meta.l1[i] & OFLAG_COPIED == 0 {
                if self.refcount(meta, off)? != 1 {
                    continue;
                }
                meta.l1[i] |= OFLAG_COPIED;
                meta.l1_dirty.insert(i);
            }
            let Some((_, table)) = self.l2_table(meta, i)? else {
                continue;
            };
            let mut fixed: Option<Vec<u64>> = None;
            let step = self.geom.words_per_entry as usize;
            for j in (0..table.len()).step_by(step) {
                let w = table[j];
                let host = w & L2E_OFFSET_MASK;
                if w & (OFLAG_COMPRESSED | OFLAG_COPIED) != 0 || host == 0 {
                    continue;
                }
                if self.refcount(meta, host)? == 1 {
                    fixed.get_or_insert_with(|| table.to_vec())[j] = w | OFLAG_COPIED;
                }
            }
            if let Some(t) = fixed {
                meta.l2_clean.pop(&off);
                meta.l2_dirty.insert(off, Arc::new(t));
                self.maybe_write_back(meta)?;
            }
        }
        Ok(())
    }

    fn refcount(&self, meta: &mut Meta, off: u64) -> Result<u64> {
        let cs = self.geom.cluster_size;
        let Meta { refs, file_end, .. } = meta;
        let refs = self.refs_mut(refs, *file_end)?;
        refs.get(&*self.file, &self.path, off / cs, *file_end)
    }
}
