//! The allocating writer: copy-on-write of partial clusters and
//! subclusters from the backing chain, zero clusters, and a flush that
//! orders data and metadata so the image on disk is always consistent.
//!
//! A write runs in three phases under `write_lock`:
//! 1. plan (metadata lock held): decide per cluster whether it is written
//!    in place or needs a new cluster, and reserve new host clusters;
//! 2. copy (no metadata lock): assemble cluster contents (old bytes from the
//!    backing chain, an inflated compressed cluster, or zeros, overlaid with
//!    the new data) and `pwrite` them, coalescing contiguous host ranges;
//! 3. link (metadata lock held): point the L2 entries at the new clusters.
//!
//! Metadata is written back only in `flush_locked`: data is synced first,
//! then refcount increments, then L2 tables and the L1 table, and only then
//! are the refcounts of clusters dropped from the tables decremented. A
//! crash at any point leaves at worst leaked clusters, never an entry that
//! points at unwritten data or a cluster in use with refcount 0. Clusters
//! and L2 tables shared with internal snapshots (no COPIED) are copied.

use super::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::hostwrite::HostWriter;
use super::l2::{self, Entry, BITMAP_ALL_ALLOC, OFLAG_COPIED};
use super::{Meta, Qcow2Layer, MAX_DIRTY_BYTES};
use crate::error::{ImageError, Result};
use crate::fileio::{self, sync_data, write_all_at};
use crate::image::storage::Storage;
use crate::image::{check_range, BackingRead, ReadMap};
use std::path::Path;
use std::sync::Arc;

/// Refuses images whose metadata cannot be trusted for writing.
pub(super) fn check_writable(path: &Path, h: &Header) -> Result<()> {
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(ImageError::unsupported(
            path,
            "image is marked corrupt (incompatible bit 1 at offset 72); it can be read, but repair it with `qemu-img check -r all` before writing",
        ));
    }
    if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        return Err(ImageError::unsupported(
            path,
            "image is marked dirty (lazy refcounts not written back after a crash); it can be read, but run `qemu-img check -r all` before writing",
        ));
    }
    // Clusters shared with internal snapshots are copied on write.
    Ok(())
}

/// Autoclear features (e.g. persistent bitmaps) describe data we will not
/// keep up to date; the spec says a writer that does not maintain them must
/// clear them.
pub(super) fn clear_autoclear(file: &dyn Storage, path: &Path, h: &Header) -> Result<()> {
    if h.version >= 3 && h.autoclear_features != 0 {
        write_all_at(file, path, &0u64.to_be_bytes(), header::OFF_AUTOCLEAR)?;
        sync_data(file, path)?;
    }
    Ok(())
}

/// How one cluster-sized piece of a write is carried out.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Overwrite bytes of a cluster this image owns alone.
    InPlace { host: u64 },
    /// Write a whole new cluster; `old` supplies the bytes not written.
    NewCluster { host: u64, old: Entry },
    /// Extended L2: write subclusters `first..=last` into the cluster at
    /// `host`, which is new (`fresh`) when the old entry had no host cluster.
    Subclusters {
        fresh: bool,
        host: u64,
        first: u64,
        last: u64,
        word: u64,
        bitmap: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Piece {
    guest: u64,
    len: u64,
    cluster_start: u64,
    plan: Plan,
}

impl Qcow2Layer {
    /// Refuses writes to read-only images; before the first write, clears
    /// the autoclear features (see `clear_autoclear`).
    pub(super) fn require_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(ImageError::invalid(&self.path, "image is open read-only"));
        }
        use std::sync::atomic::Ordering;
        if !self.autoclear_cleared.load(Ordering::Acquire) {
            let _w = self.meta.lock();
            if !self.autoclear_cleared.load(Ordering::Acquire) {
                clear_autoclear(&*self.file, &self.path, &self.header)?;
                self.autoclear_cleared.store(true, Ordering::Release);
            }
        }
        Ok(())
    }

    pub(super) fn write_data(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        self.require_writable()?;
        check_range(&self.path, self.header.size, offset, data.len() as u64)?;
        let _w = self.write_lock.lock();
        self.write_locked(offset, data, below)
    }

    pub(super) fn write_locked(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let pieces = self.plan(offset, data.len() as u64)?;
        if let Err(e) = self.copy(offset, data, &pieces, below) {
            self.unreserve(&pieces);
            return Err(e);
        }
        self.link(&pieces)
    }

    /// After a failed copy: the clusters `plan` reserved are referenced by
    /// nothing, so their refcounts go straight back to 0 (no leak).
    fn unreserve(&self, pieces: &[Piece]) {
        let cs = self.geom.cluster_size;
        let mut meta = self.meta.lock();
        let Meta { refs, file_end, .. } = &mut *meta;
        let Some(refs) = refs.as_mut() else { return };
        for p in pieces {
            let host = match p.plan {
                Plan::NewCluster { host, .. } => host,
                Plan::Subclusters {
                    host, fresh: true, ..
                } => host,
                _ => continue,
            };
            if let Err(e) = refs.set(&*self.file, &self.path, host / cs, 0, file_end) {
                tracing::warn!(
                    "releasing a reserved cluster of {}: {e}",
                    self.path.display()
                );
            }
        }
    }

    /// Phase 1: decide per cluster and reserve new clusters.
    fn plan(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let g = self.geom;
        let cs = g.cluster_size;
        let mut meta = self.meta.lock();
        let mut pieces = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let cluster_start = at / cs * cs;
            let piece_end = (cluster_start + cs).min(end);
            let (toff, table) = self.l2_for_write(&mut meta, g.l1_index(at))?;
            let entry = self.decode_entry(&meta, toff, &table, g.l2_index(at))?;
            let plan = match entry {
                Entry::Normal {
                    host: Some(h),
                    copied: true,
                    bitmap: None,
                } => Plan::InPlace {
                    host: h + (at - cluster_start),
                },
                Entry::Normal {
                    host,
                    copied,
                    bitmap: Some(bm),
                } if host.is_none() || copied => {
                    self.plan_subclusters(&mut meta, at, piece_end, host, bm)?
                }
                Entry::Unallocated if g.extended => {
                    self.plan_subclusters(&mut meta, at, piece_end, None, 0)?
                }
                old => Plan::NewCluster {
                    host: self.alloc(&mut meta, 1)?,
                    old,
                },
            };
            pieces.push(Piece {
                guest: at,
                len: piece_end - at,
                cluster_start,
                plan,
            });
            at = piece_end;
        }
        Ok(pieces)
    }

    /// Extended L2: write the touched subclusters of the cluster holding
    /// `[at, piece_end)`, in place when all are allocated already, else
    /// into the cluster's host cluster (allocated now if it has none).
    fn plan_subclusters(
        &self,
        meta: &mut Meta,
        at: u64,
        piece_end: u64,
        host: Option<u64>,
        bitmap: u64,
    ) -> Result<Plan> {
        let g = self.geom;
        let cluster_start = at / g.cluster_size * g.cluster_size;
        let first = (at - cluster_start) / g.subcluster_size;
        let last = (piece_end - 1 - cluster_start) / g.subcluster_size;
        let mask = sub_mask(first, last);
        Ok(match host {
            Some(h) if bitmap & mask == mask => Plan::InPlace {
                host: h + (at - cluster_start),
            },
            Some(h) => Plan::Subclusters {
                fresh: false,
                host: h,
                first,
                last,
                word: h | OFLAG_COPIED,
                bitmap,
            },
            None => {
                let h = self.alloc(meta, 1)?;
                Plan::Subclusters {
                    fresh: true,
                    host: h,
                    first,
                    last,
                    word: h | OFLAG_COPIED,
                    bitmap,
                }
            }
        })
    }

    /// Phase 2: assemble and write the bytes, without the metadata lock.
    fn copy(
        &self,
        offset: u64,
        data: &[u8],
        pieces: &[Piece],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let cs = self.geom.cluster_size;
        let mut out = HostWriter::new(self);
        for p in pieces {
            let src = &data[(p.guest - offset) as usize..(p.guest - offset + p.len) as usize];
            match p.plan {
                Plan::InPlace { host } => out.write(host, src)?,
                Plan::NewCluster { host, old } => {
                    if p.len == cs {
                        out.write(host, src)?;
                    } else {
                        let mut buf = vec![0u8; cs as usize];
                        self.old_content(&old, p.cluster_start, &mut buf, below)?;
                        let from = (p.guest - p.cluster_start) as usize;
                        buf[from..from + src.len()].copy_from_slice(src);
                        out.write(host, &buf)?;
                    }
                }
                Plan::Subclusters {
                    host,
                    first,
                    last,
                    bitmap,
                    ..
                } => {
                    let sc = self.geom.subcluster_size;
                    let span_start = p.cluster_start + first * sc;
                    let mut buf = vec![0u8; ((last - first + 1) * sc) as usize];
                    for i in first..=last {
                        let sub = p.cluster_start + i * sc;
                        let covered = p.guest <= sub && p.guest + p.len >= sub + sc;
                        if covered {
                            continue;
                        }
                        let dst =
                            &mut buf[((i - first) * sc) as usize..((i - first + 1) * sc) as usize];
                        if bitmap & (1 << i) != 0 {
                            self.read_host(host + i * sc, dst)?;
                        } else if bitmap & (1 << (32 + i)) == 0 {
                            self.read_below_clipped(below, sub, dst)?;
                        }
                    }
                    let from = (p.guest - span_start) as usize;
                    buf[from..from + src.len()].copy_from_slice(src);
                    out.write(host + first * sc, &buf)?;
                }
            }
        }
        out.finish()
    }

    /// Reads below, but only inside the virtual size; the rest is zeros.
    fn read_below_clipped(&self, below: &dyn BackingRead, at: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.header.size;
        let n = (size.saturating_sub(at)).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n > 0 {
            below.read_below(at, &mut buf[..n])?;
        }
        Ok(())
    }

    /// The bytes a cluster held before it is rewritten.
    fn old_content(
        &self,
        old: &Entry,
        cluster_start: u64,
        buf: &mut [u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        match *old {
            Entry::Unallocated => self.read_below_clipped(below, cluster_start, buf),
            Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Entry::Compressed(desc) => {
                buf.copy_from_slice(&self.inflate(desc)?);
                Ok(())
            }
            Entry::Normal { host, bitmap, .. } => {
                // Only reached for a shared (not COPIED) cluster or, with
                // extended L2, never; read it as it reads now.
                let mut extents = Vec::new();
                let g = self.geom;
                l2::push_mappings(
                    &g,
                    &mut extents,
                    cluster_start,
                    cluster_start,
                    cluster_start + g.cluster_size,
                    &Entry::Normal {
                        host,
                        copied: false,
                        bitmap,
                    },
                );
                for e in extents {
                    let dst = &mut buf
                        [(e.start - cluster_start) as usize..(e.end() - cluster_start) as usize];
                    match e.mapping {
                        crate::image::Mapping::Data { host } => self.read_host(host, dst)?,
                        crate::image::Mapping::Unallocated => {
                            self.read_below_clipped(below, e.start, dst)?
                        }
                        _ => dst.fill(0),
                    }
                }
                Ok(())
            }
        }
    }

    /// Phase 3: point the entries at the written clusters.
    fn link(&self, pieces: &[Piece]) -> Result<()> {
        let g = self.geom;
        let mut meta = self.meta.lock();
        for p in pieces {
            match p.plan {
                Plan::InPlace { .. } => {}
                Plan::NewCluster { host, old } => {
                    let bitmap = if g.extended { BITMAP_ALL_ALLOC } else { 0 };
                    self.set_entry(&mut meta, p.cluster_start, host | OFLAG_COPIED, bitmap)?;
                    release(&mut meta, &old, g.cluster_size);
                }
                Plan::Subclusters {
                    first,
                    last,
                    word,
                    bitmap,
                    ..
                } => {
                    let mask = sub_mask(first, last);
                    let bitmap = (bitmap | mask) & !(mask << 32);
                    self.set_entry(&mut meta, p.cluster_start, word, bitmap)?;
                }
            }
        }
        meta.data_written = true;
        self.maybe_write_back(&mut meta)
    }

    /// Allocates `n` contiguous clusters at the end of the file.
    pub(super) fn alloc(&self, meta: &mut Meta, n: u64) -> Result<u64> {
        let cs = self.geom.cluster_size;
        let Meta { refs, file_end, .. } = meta;
        let refs = self.refs_mut(refs, *file_end)?;
        let start = *file_end;
        *file_end += n * cs;
        for c in start / cs..start / cs + n {
            let old = refs.get(&*self.file, &self.path, c, *file_end)?;
            if old != 0 {
                return Err(ImageError::corrupt(
                    &self.path,
                    c * cs,
                    format!("cluster past the end of the file already has refcount {old}"),
                ));
            }
            refs.set(&*self.file, &self.path, c, 1, file_end)?;
        }
        Ok(start)
    }

    /// The refcounts, loaded from the image on first use (see `open`).
    pub(super) fn refs_mut<'m>(
        &self,
        refs: &'m mut Option<super::refcount::Refcounts>,
        file_end: u64,
    ) -> Result<&'m mut super::refcount::Refcounts> {
        if !self.writable {
            return Err(ImageError::invalid(&self.path, "image is open read-only"));
        }
        if refs.is_none() {
            *refs = Some(super::refcount::Refcounts::load(
                &*self.file,
                &self.path,
                &self.header,
                file_end,
            )?);
        }
        Ok(refs.as_mut().expect("just loaded"))
    }

    /// The L2 table for L1 index `i`, allocating an empty one if needed.
    /// One shared with an internal snapshot (no COPIED in L1) is copied to
    /// a new cluster first; the old one's refcount drops at the next flush
    /// (module docs). Its data clusters keep their refcounts.
    fn l2_for_write(&self, meta: &mut Meta, i: usize) -> Result<(u64, Arc<Vec<u64>>)> {
        if let Some((off, table)) = self.l2_table(meta, i)? {
            if meta.l1[i] & OFLAG_COPIED != 0 {
                return Ok((off, table));
            }
            let new = self.alloc(meta, 1)?;
            let copy = Arc::new(table.to_vec());
            meta.l2_dirty.insert(new, copy.clone());
            meta.l1[i] = new | OFLAG_COPIED;
            meta.l1_dirty.insert(i);
            meta.pending_free.push((off, self.geom.cluster_size));
            return Ok((new, copy));
        }
        let off = self.alloc(meta, 1)?;
        let table = Arc::new(vec![0u64; (self.geom.cluster_size / 8) as usize]);
        meta.l2_dirty.insert(off, table.clone());
        meta.l1[i] = off | OFLAG_COPIED;
        meta.l1_dirty.insert(i);
        Ok((off, table))
    }

    /// Replaces the entry of the guest cluster at `guest` in memory.
    pub(super) fn set_entry(
        &self,
        meta: &mut Meta,
        guest: u64,
        word: u64,
        bitmap: u64,
    ) -> Result<()> {
        let g = self.geom;
        let (off, _) = self.l2_for_write(meta, g.l1_index(guest))?;
        let mut table = match meta.l2_dirty.remove(&off) {
            Some(t) => t,
            None => meta
                .l2_clean
                .pop(&off)
                .ok_or_else(|| ImageError::invalid(&self.path, "L2 table left the cache"))?,
        };
        let t = Arc::make_mut(&mut table);
        let idx = g.l2_index(guest) * g.words_per_entry as usize;
        t[idx] = word;
        if g.extended {
            t[idx + 1] = bitmap;
        }
        meta.l2_dirty.insert(off, table);
        Ok(())
    }

    /// Writes metadata back once the dirty part held in memory exceeds
    /// `MAX_DIRTY_BYTES`, which bounds memory use between flushes.
    pub(super) fn maybe_write_back(&self, meta: &mut Meta) -> Result<()> {
        let dirty = meta.l2_dirty.len() as u64 * self.geom.cluster_size
            + meta.refs.as_ref().map_or(0, |r| r.dirty_bytes());
        if dirty > MAX_DIRTY_BYTES {
            self.flush_locked(meta)?;
        }
        Ok(())
    }

    /// Writes everything back in crash-safe order (see the module docs).
    pub(super) fn flush_locked(&self, meta: &mut Meta) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let meta_dirty = !meta.l2_dirty.is_empty()
            || !meta.l1_dirty.is_empty()
            || !meta.pending_free.is_empty()
            || meta
                .refs
                .as_ref()
                .is_some_and(|r| r.table_moved || r.table_dirty || !r.dirty_blocks.is_empty());
        if !meta.data_written && !meta_dirty {
            return Ok(());
        }
        // Freed clusters (`pending_free`) need the refcounts even when no
        // write allocated anything yet.
        let refs = self.refs_mut(&mut meta.refs, meta.file_end)?;
        let (file, path) = (&*self.file, self.path.as_path());
        // Every allocated cluster lies inside the file, even the ones whose
        // contents are still only in memory.
        if fileio::file_len(file, path)? < meta.file_end {
            file.set_len(meta.file_end)
                .map_err(|e| ImageError::io(path, "extend", meta.file_end, e))?;
        }
        sync_data(file, path)?;
        // Refcount increments before any table refers to the clusters.
        refs.write_out(file, path)?;
        sync_data(file, path)?;
        if refs.table_moved {
            let mut h = [0u8; 12];
            h[..8].copy_from_slice(&refs.table_offset.to_be_bytes());
            h[8..].copy_from_slice(&(refs.table_clusters as u32).to_be_bytes());
            write_all_at(file, path, &h, header::OFF_REFCOUNT_TABLE_OFFSET)?;
            sync_data(file, path)?;
            refs.table_moved = false;
            meta.pending_free.append(&mut refs.old_tables);
        }
        // L2 tables, then the L1 entries that point at new ones.
        // Each item leaves its dirty set only once written, so a failed
        // flush keeps everything for the next attempt.
        let dirty: Vec<(u64, Arc<Vec<u64>>)> =
            meta.l2_dirty.iter().map(|(o, t)| (*o, t.clone())).collect();
        for (off, t) in dirty {
            write_all_at(file, path, &header::encode_u64s(&t), off)?;
            meta.l2_dirty.remove(&off);
            meta.l2_clean.put(off, t);
        }
        if !meta.l1_dirty.is_empty() {
            sync_data(file, path)?;
            let dirty: Vec<usize> = meta.l1_dirty.iter().copied().collect();
            for i in dirty {
                let at = self.header.l1_table_offset + i as u64 * 8;
                write_all_at(file, path, &meta.l1[i].to_be_bytes(), at)?;
                meta.l1_dirty.remove(&i);
            }
        }
        sync_data(file, path)?;
        // Only now may refcounts of clusters no table uses any more drop.
        if !meta.pending_free.is_empty() {
            let Meta {
                refs,
                file_end,
                pending_free,
                ..
            } = meta;
            let refs = refs.as_mut().expect("checked above");
            while let Some(&(off, len)) = pending_free.last() {
                refs.decrement_range(file, path, off, len, file_end)?;
                pending_free.pop();
            }
            refs.write_out(file, path)?;
            sync_data(file, path)?;
        }
        meta.data_written = false;
        Ok(())
    }
}

/// Queues the host storage an overwritten entry held for freeing.
pub(super) fn release(meta: &mut Meta, old: &Entry, cluster_size: u64) {
    match *old {
        Entry::Compressed(d) => meta.pending_free.push((d.host, d.len)),
        _ => {
            if let Some(h) = old.host_cluster() {
                meta.pending_free.push((h, cluster_size));
            }
        }
    }
}

/// Allocation bits for subclusters `first..=last`.
pub(super) fn sub_mask(first: u64, last: u64) -> u64 {
    let n = last - first + 1;
    let ones = if n >= 32 {
        0xffff_ffff
    } else {
        (1u64 << n) - 1
    };
    ones << first
}
