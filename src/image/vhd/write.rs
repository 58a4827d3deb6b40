//! The VHD writer: block allocation, sector bitmaps, and an order of writes
//! that leaves a valid image, readable by snaptree, QEMU, libvhdi and XCP,
//! after a crash or power loss at any point.
//!
//! Fixed disks are written in place (the data area is the file up to the
//! footer). Dynamic and differencing disks keep data in blocks:
//!
//! - **Allocation.** A new block (sector bitmap, then data) goes where the
//!   footer is now, at the end of the file. The footer is first written at
//!   the new end (after the block) and `fdatasync`ed; only then is the old
//!   footer overwritten (by the new block's bitmap). A crash in between
//!   leaves a valid footer at the end and leaked, unreferenced space before
//!   it, which every reader ignores. Blocks never move afterwards.
//! - **New blocks** of a dynamic disk start with every bit set: their data
//!   area lies past the old end of the file and reads zeros, as an absent
//!   sector does. QEMU does the same, and QEMU and libvhdi read a dynamic
//!   disk's data area whatever its bitmap says, so every reader agrees on
//!   such a block, also about writes a crash lost. New blocks of a
//!   differencing disk start empty (their sectors come from the parent).
//! - **Data and bitmap bits.** Data goes into the block first. The bits
//!   that expose it, and the BAT entry of a new block, change in memory
//!   (so reads through this layer see the write at once) and reach the
//!   file only in `flush`: `fdatasync` (data, the moved footer, new blocks'
//!   bitmaps), then the changed bitmaps and BAT entries, then `fdatasync`
//!   again. A bitmap or BAT entry therefore never exposes bytes that are
//!   not on disk. If a crash hits between the two syncs, any mix of old
//!   and new bitmaps and entries is consistent: a new entry with the bitmap
//!   its block got at allocation is a block holding nothing yet (or, in a
//!   dynamic disk, zeros and data already on disk); a new bitmap without
//!   its entry is unreferenced. Writes not yet flushed may be lost at a
//!   crash, sector by sector, as on any disk; flushed ones never are.
//! - **Granularity.** Bits are set eight at a time (one bitmap byte, 4 KiB
//!   of guest data, aligned within the block): a write that covers part of
//!   such a group completes the rest from what the group reads as now (this
//!   file where a bit is set, else the parent chain, or zeros in a dynamic
//!   disk's block another tool left partly set). libvhdi 20210425 (Debian's
//!   `vhdimount`/`vhdiinfo`) misreads a bitmap byte with only some bits set
//!   (every sector after the first set bit reads as present); whole bytes
//!   keep every image we write readable by it, for the price of copying at
//!   most 3.5 KiB per write.
//! - **Zeros.** A dynamic disk's absent sectors read as zeros, so a zero
//!   write only punches holes into the sectors the file holds (written
//!   zeros where the file system cannot). A differencing disk has nothing
//!   that reads as zeros but data: zeros are written as data. Blocks are
//!   never freed (XCP's batmap, below, relies on that; the space is
//!   reused by later writes to the block).
//! - **XCP's batmap** ("block fully allocated", trusted by tapdisk instead
//!   of the bitmap) is left as it is: we never clear a bitmap bit and never
//!   free a block, so every bit it sets stays true, and a block that fills
//!   up merely is not marked (tapdisk then reads its bitmap, as for any
//!   unmarked block). The one way it could go wrong, a batmap that marks a
//!   block full which the BAT does not have, is refused when that block
//!   would be allocated.
//!
//! Concurrency: writers (write, zero write, flush) are serialised by the
//! `Writer` mutex, held across their I/O; readers never take it. A writer
//! publishes a change after its data is written: the changed bitmap first,
//! then a new block's BAT entry, then the block's "fully allocated" bit, so
//! a reader sees either the old mapping or the new one, each with its
//! bytes in place.

use super::bat::{self, Bat, Batmap, UNUSED};
use super::footer::Footer;
use super::header::DynamicHeader;
use super::{Sparse, VhdLayer};
use crate::error::{ImageError, Result};
use crate::fileio::{read_exact_at, sync_data, write_all_at};
use crate::image::storage::Storage;
use crate::image::{check_range, BackingRead};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

/// Sectors whose bitmap bits a write sets together (see module docs).
pub(super) const GROUP_SECTORS: u64 = 8;
/// Changed bitmaps kept in memory at most before they are written back
/// without a flush (128k blocks: 256 GiB of 2 MiB blocks).
const MAX_DIRTY_BITMAP_BYTES: u64 = 64 << 20;

/// Guest bytes per bitmap group in a disk of `block_size` blocks.
pub(super) fn group_bytes(block_size: u64) -> u64 {
    (GROUP_SECTORS * 512).min(block_size)
}

/// What a writer needs besides the read side's metadata.
pub(super) struct Writer {
    /// Where the footer is now, at the end of the file; the next block
    /// goes here.
    alloc_at: u64,
    /// The footer, as found, written at each new end of the file.
    footer: [u8; 512],
    /// BAT entries changed in memory and not yet written back.
    dirty_bat: BTreeSet<u64>,
    /// Something was written since the last `fdatasync`.
    pub(super) data_written: bool,
    /// Unallocated blocks XCP's batmap marks full, with the file offset of
    /// the batmap byte that says so.
    batmap_conflicts: HashMap<u64, u64>,
}

impl Writer {
    pub(super) fn fixed() -> Writer {
        Writer {
            alloc_at: 0,
            footer: [0; 512],
            dirty_bat: BTreeSet::new(),
            data_written: false,
            batmap_conflicts: HashMap::new(),
        }
    }

    /// The writer of a dynamic or differencing disk. `forbidden` holds the
    /// metadata the read side checked the blocks against; blocks must also
    /// not overlap each other, the parent locators' data or XCP's batmap.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sparse(
        file: &dyn Storage,
        path: &Path,
        footer: &Footer,
        header: &DynamicHeader,
        bat: &Bat,
        batmap: Option<&Batmap>,
        forbidden: &[(u64, u64, &str)],
        file_len: u64,
    ) -> Result<Writer> {
        let mut meta: Vec<(u64, u64, &str)> = forbidden.to_vec();
        if footer.is_differencing() {
            // Only what lies inside the file can be overwritten (the read
            // side checked the locators it uses; others may hold anything).
            for (s, e) in header.locator_ranges() {
                if s < file_len {
                    meta.push((s, e.min(file_len), "parent locator data"));
                }
            }
        }
        let mut conflicts = HashMap::new();
        if let Some(b) = batmap {
            meta.push((b.header_at, b.header_at + 512, "XCP batmap header"));
            meta.push((b.map_at, b.map_at + b.map.len() as u64, "XCP batmap"));
            for i in 0..bat.len() {
                if bat.bitmap_offset(i).is_none() && bat::BitOrder::MsbFirst.test(&b.map, i) {
                    conflicts.insert(i, b.map_at + i / 8);
                }
            }
        }
        bat.check_disjoint(path, &meta)?;
        // New blocks go where the footer is; past the end of the file when
        // there is none at the end (a crash of another writer). Never over
        // metadata that a damaged image put after the footer.
        let footer_at = if footer.from_head_copy {
            file_len
        } else {
            footer.at
        };
        let metadata_end = meta
            .iter()
            .filter(|(s, _, _)| *s != footer.at || footer.from_head_copy)
            .map(|(_, e, _)| *e)
            .max()
            .unwrap_or(0);
        let mut raw = [0u8; 512];
        read_exact_at(file, path, &mut raw, footer.at, "VHD footer")?;
        Ok(Writer {
            alloc_at: footer_at.max(metadata_end).div_ceil(512) * 512,
            footer: raw,
            dirty_bat: BTreeSet::new(),
            data_written: false,
            batmap_conflicts: conflicts,
        })
    }
}

impl VhdLayer {
    pub(super) fn writer(&self) -> Result<&Mutex<Writer>> {
        self.writer
            .as_ref()
            .ok_or_else(|| ImageError::invalid(&self.path, "image is open read-only"))
    }

    /// `Layer::write`.
    pub(super) fn write_guest(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let writer = self.writer()?;
        check_range(&self.path, self.size, offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut w = writer.lock();
        match &self.sparse {
            None => {
                w.data_written = true;
                write_all_at(&*self.file, &self.path, data, offset)
            }
            Some(sp) => {
                self.write_sparse(sp, &mut w, offset, data, below)?;
                self.maybe_write_back(sp, &mut w)
            }
        }
    }

    /// Writes `data` at guest `offset` of a dynamic or differencing disk
    /// (writer lock held): allocates the blocks it needs, writes each
    /// block's piece, publishes the new bits.
    pub(super) fn write_sparse(
        &self,
        sp: &Sparse,
        w: &mut Writer,
        offset: u64,
        data: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let bs = sp.bat.block_size;
        let end = offset + data.len() as u64;
        let fresh_bitmap = self.fresh_bitmap(sp);
        let fresh = self.allocate_missing(sp, w, offset, end, &fresh_bitmap)?;
        w.data_written = true;
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let pend = ((block + 1) * bs).min(end);
            let piece = &data[(at - offset) as usize..(pend - offset) as usize];
            match fresh.get(&block) {
                Some(&bitmap_at) => {
                    let changed =
                        self.write_piece(sp, block, bitmap_at, &fresh_bitmap, at, piece, below)?;
                    // A full new bitmap is on disk already (see `allocate`).
                    let dirty = changed.is_some();
                    let map = changed.unwrap_or_else(|| fresh_bitmap.clone());
                    self.publish(sp, w, block, Some(bitmap_at), map, dirty);
                }
                None => self.write_allocated(sp, w, block, at, piece, below)?,
            }
            at = pend;
        }
        Ok(())
    }

    /// The sector bitmap a newly allocated block starts with.
    fn fresh_bitmap(&self, sp: &Sparse) -> Vec<u8> {
        // A new block of a dynamic disk starts with every bit set: its data
        // area lies past the old end of the file and reads zeros, which is
        // what an absent sector of a dynamic disk reads. That is what QEMU
        // writes, and it keeps QEMU and libvhdi (which read a dynamic
        // disk's data area whatever the bitmap says) in agreement with us
        // even about writes lost in a crash. A differencing disk's new
        // block starts empty: its absent sectors come from the parent.
        vec![
            if self.footer.is_differencing() {
                0
            } else {
                0xff
            };
            sp.bat.bitmap_size as usize
        ]
    }

    /// Allocates (in one step, see `allocate`) the blocks of `[offset,
    /// end)` the BAT does not map yet, and returns where each one's bitmap
    /// now lies. Refuses, before allocating anything, a block that an XCP
    /// batmap marks full although the BAT has none.
    fn allocate_missing(
        &self,
        sp: &Sparse,
        w: &mut Writer,
        offset: u64,
        end: u64,
        fresh_bitmap: &[u8],
    ) -> Result<HashMap<u64, u64>> {
        let bs = sp.bat.block_size;
        let new: Vec<u64> = (offset / bs..=(end - 1) / bs)
            .filter(|b| sp.bat.bitmap_offset(*b).is_none())
            .collect();
        let mut fresh: HashMap<u64, u64> = HashMap::new();
        if !new.is_empty() {
            if let Some((b, at)) = new
                .iter()
                .find_map(|b| w.batmap_conflicts.get(b).map(|at| (*b, *at)))
            {
                return Err(ImageError::corrupt(
                    &self.path,
                    at,
                    format!(
                        "XCP batmap marks block {b} fully allocated, but the BAT has no block {b}; \
                         XCP would read it wrong once allocated, so it is not written (repair the \
                         image with vhd-util)"
                    ),
                ));
            }
            let first = self.allocate(sp, w, new.len() as u64, fresh_bitmap)?;
            let span = sp.bat.block_span();
            for (i, b) in new.iter().enumerate() {
                fresh.insert(*b, first + i as u64 * span);
            }
        }
        Ok(fresh)
    }

    /// Writes `piece` (guest offset `at`) into the already allocated
    /// `block`: straight into the data area when the block is known full,
    /// else through its sector bitmap, publishing the changed bitmap.
    fn write_allocated(
        &self,
        sp: &Sparse,
        w: &mut Writer,
        block: u64,
        at: u64,
        piece: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let bs = sp.bat.block_size;
        let bitmap_at = sp
            .bat
            .bitmap_offset(block)
            .ok_or_else(|| ImageError::invalid(&self.path, format!("block {block} vanished")))?;
        if sp.full.get(block) {
            let host = bitmap_at + sp.bat.bitmap_size + (at - block * bs);
            write_all_at(&*self.file, &self.path, piece, host)?;
        } else {
            let old = self.bitmap(sp, block, bitmap_at)?;
            let changed = self.write_piece(sp, block, bitmap_at, &old, at, piece, below)?;
            if let Some(new_map) = changed {
                self.publish(sp, w, block, None, new_map, true);
            }
        }
        Ok(())
    }

    /// Makes room for `count` new blocks at the end of the file, their
    /// bitmaps set to `bitmap`; returns the file offset of the first (see
    /// the module docs for the order).
    fn allocate(&self, sp: &Sparse, w: &mut Writer, count: u64, bitmap: &[u8]) -> Result<u64> {
        let span = sp.bat.block_span();
        let first = w.alloc_at;
        let end = count
            .checked_mul(span)
            .and_then(|n| first.checked_add(n))
            .filter(|end| (end - span) / 512 < UNUSED as u64)
            .ok_or_else(|| {
                ImageError::unsupported(
                    &self.path,
                    format!(
                        "allocating {count} blocks at offset {first} would put a block past the \
                         2 TiB a BAT entry (a 32-bit sector number) can address"
                    ),
                )
            })?;
        // The footer moves first and is durable before anything overwrites
        // the old one. The space is given up at once, even if the sync
        // fails: a later allocation must not put a block's data where this
        // footer may have landed.
        write_all_at(&*self.file, &self.path, &w.footer, end)?;
        w.alloc_at = end;
        sync_data(&*self.file, &self.path)?;
        // The first block's bitmap lies where the old footer was; the rest
        // of the new space lies past the old end of the file and reads
        // zeros, so an empty bitmap need not be written there.
        for i in 0..count {
            if i == 0 || bitmap.iter().any(|b| *b != 0) {
                write_all_at(&*self.file, &self.path, bitmap, first + i * span)?;
            }
        }
        Ok(first)
    }

    /// Writes one block's piece `[at, at+piece.len())`, completing the
    /// partly covered bitmap groups at its ends; returns the block's new
    /// bitmap, or `None` when every bit it needs was set already.
    #[allow(clippy::too_many_arguments)]
    fn write_piece(
        &self,
        sp: &Sparse,
        block: u64,
        bitmap_at: u64,
        bitmap: &[u8],
        at: u64,
        piece: &[u8],
        below: &dyn BackingRead,
    ) -> Result<Option<Vec<u8>>> {
        let bs = sp.bat.block_size;
        let bstart = block * bs;
        let data_at = bitmap_at + sp.bat.bitmap_size;
        let end = at + piece.len() as u64;
        // Sectors of this block inside the disk (the last block may extend
        // past the virtual size, which is whole sectors).
        let in_disk = (self.size - bstart).min(bs) / 512;
        let s0 = (at - bstart) / 512;
        let s1 = (end - bstart).div_ceil(512);
        let g0 = s0 / GROUP_SECTORS * GROUP_SECTORS;
        let g1 = (s1.div_ceil(GROUP_SECTORS) * GROUP_SECTORS)
            .min(in_disk)
            .max(s1);
        if (g0..g1).all(|s| sp.order.test(bitmap, s)) {
            write_all_at(&*self.file, &self.path, piece, data_at + (at - bstart))?;
            return Ok(None);
        }
        let (span_s, span_e) = (bstart + g0 * 512, bstart + g1 * 512);
        if span_s == at && span_e == end {
            write_all_at(&*self.file, &self.path, piece, data_at + g0 * 512)?;
        } else {
            let mut buf = vec![0u8; (span_e - span_s) as usize];
            for (rs, re) in [(span_s, at), (end, span_e)] {
                if rs < re {
                    let dst = &mut buf[(rs - span_s) as usize..(re - span_s) as usize];
                    self.current_view(sp, bitmap, bstart, data_at, rs, dst, below)?;
                }
            }
            buf[(at - span_s) as usize..(end - span_s) as usize].copy_from_slice(piece);
            write_all_at(&*self.file, &self.path, &buf, data_at + g0 * 512)?;
        }
        let mut new_map = bitmap.to_vec();
        sp.order.set_range(&mut new_map, g0, g1);
        Ok(Some(new_map))
    }

    /// Reads guest bytes `[rs, rs+buf.len())` of one block as they read
    /// now: from this file where the bit is set, else from below (a
    /// differencing disk) or zeros (a dynamic disk).
    #[allow(clippy::too_many_arguments)]
    fn current_view(
        &self,
        sp: &Sparse,
        bitmap: &[u8],
        bstart: u64,
        data_at: u64,
        rs: u64,
        buf: &mut [u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let re = rs + buf.len() as u64;
        let first = (rs - bstart) / 512;
        let last = (re - bstart).div_ceil(512);
        for (s, e, set) in bat::runs(bitmap, first, last, sp.order) {
            let gs = (bstart + s * 512).max(rs);
            let ge = (bstart + e * 512).min(re);
            let dst = &mut buf[(gs - rs) as usize..(ge - rs) as usize];
            if set {
                self.read_host_bytes(data_at + (gs - bstart), dst)?;
            } else if self.footer.is_differencing() {
                below.read_below(gs, dst)?;
            } else {
                dst.fill(0);
            }
        }
        Ok(())
    }

    fn read_host_bytes(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        crate::fileio::read_at_zero_fill(&*self.file, &self.path, buf, host)
    }

    /// Makes a block's new bitmap (and, for a new block at `new_block_at`,
    /// its BAT entry) visible to readers, in that order.
    /// `dirty`: the bitmap differs from the one in the file.
    fn publish(
        &self,
        sp: &Sparse,
        w: &mut Writer,
        block: u64,
        new_block_at: Option<u64>,
        bitmap: Vec<u8>,
        dirty: bool,
    ) {
        let bstart = block * sp.bat.block_size;
        let in_disk = (self.size - bstart).min(sp.bat.block_size) / 512;
        let full = bat::all_set(&bitmap, in_disk, sp.order);
        {
            let mut cache = sp.bitmaps.lock();
            cache.generation += 1;
            cache.dirty.remove(&block);
            cache.clean.pop(&block);
            if dirty {
                cache.dirty.insert(block, Arc::new(bitmap));
            } else {
                cache.clean.put(block, Arc::new(bitmap));
            }
        }
        if let Some(at) = new_block_at {
            // `allocate` keeps every block below 2^32 sectors.
            sp.bat.set_entry(block, (at / 512) as u32);
            w.dirty_bat.insert(block);
        }
        if full {
            sp.full.set(block);
        }
    }

    pub(super) fn maybe_write_back(&self, sp: &Sparse, w: &mut Writer) -> Result<()> {
        let dirty = sp.bitmaps.lock().dirty.len() as u64 * sp.bat.bitmap_size;
        if dirty > MAX_DIRTY_BITMAP_BYTES {
            self.write_back(w)?;
        }
        Ok(())
    }

    /// `Layer::flush`.
    pub(super) fn flush_writes(&self) -> Result<()> {
        let Some(writer) = &self.writer else {
            return Ok(());
        };
        let mut w = writer.lock();
        self.write_back(&mut w)
    }

    /// Makes every completed write durable, in the order of the module
    /// docs. What fails stays dirty, for the next attempt.
    fn write_back(&self, w: &mut Writer) -> Result<()> {
        let (file, path) = (&*self.file, self.path.as_path());
        let Some(sp) = &self.sparse else {
            if w.data_written {
                sync_data(file, path)?;
                w.data_written = false;
            }
            return Ok(());
        };
        let mut dirty: Vec<(u64, Arc<Vec<u8>>)> = sp
            .bitmaps
            .lock()
            .dirty
            .iter()
            .map(|(b, m)| (*b, m.clone()))
            .collect();
        if !w.data_written && dirty.is_empty() && w.dirty_bat.is_empty() {
            return Ok(());
        }
        dirty.sort_unstable_by_key(|(b, _)| *b);
        sync_data(file, path)?;
        for (block, map) in &dirty {
            let at = sp.bat.bitmap_offset(*block).ok_or_else(|| {
                ImageError::invalid(path, format!("changed bitmap of unallocated block {block}"))
            })?;
            write_all_at(file, path, map, at)?;
        }
        let entries: Vec<u64> = w.dirty_bat.iter().copied().collect();
        for run in entries.chunk_by(|a, b| a + 1 == *b) {
            let bytes: Vec<u8> = run
                .iter()
                .flat_map(|i| sp.bat.entry(*i).to_be_bytes())
                .collect();
            write_all_at(file, path, &bytes, sp.bat.table_offset + run[0] * 4)?;
        }
        sync_data(file, path)?;
        {
            let mut cache = sp.bitmaps.lock();
            cache.generation += 1;
            for (block, map) in dirty {
                cache.dirty.remove(&block);
                cache.clean.put(block, map);
            }
        }
        w.dirty_bat.clear();
        w.data_written = false;
        Ok(())
    }
}
