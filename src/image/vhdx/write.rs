//! The VHDX writer: payload and sector bitmap blocks allocated at the end
//! of the file, BAT entries and bitmap bits published in an order that
//! leaves, after a crash or power loss at any point, a file QEMU's `vhdx`
//! driver and libvhdi read as it was before a write or after it.
//!
//! The metadata log is not used: every metadata change is one aligned
//! write (an 8-byte BAT entry, a block's bits of a sector bitmap, a 4 KiB
//! header) ordered by `fdatasync`s, which MS-VHDX allows for a writer that
//! keeps the file consistent without it.
//!
//! - **Identity first.** The first write after open writes a new header
//!   into the slot that is *not* current, with the next sequence number, a
//!   new file write GUID and a new data write GUID (QEMU changes the
//!   latter on the first write; children's `parent_linkage` names it), and
//!   `fdatasync`s it. A torn header fails its CRC-32C and readers keep the
//!   old current one. One exception: a file that a VHDX beside it names as
//!   its parent keeps its data write GUID. snaptree writes such a file only
//!   in a merge, which leaves every child's view as it was (a commit then
//!   gives the file its child's GUID, see `reparent`); a new GUID would
//!   break the children's linkage while the merge runs, and after a crash.
//! - **Allocation.** New blocks go at the end of the file, 1 MiB aligned;
//!   the file is extended first (`set_len`), so a new block reads zeros and
//!   a crash leaves only unreferenced space, which no reader minds. Blocks
//!   never move.
//! - **States.** A write into a block the disk does not hold as data: in a
//!   differencing disk's not-present block, a partially present block whose
//!   sector bitmap marks what was written (sectors in groups of eight, see
//!   below); a whole block, or a block of a dynamic disk, or one marked
//!   zero/unmapped/undefined, a fully present block whose rest reads the
//!   zeros of the new space (which is what it read before). Zero writes
//!   leave blocks that read zeros alone and write zeros elsewhere: libvhdi
//!   reads a differencing disk's ZERO blocks from the parent, so zero
//!   states are never written.
//! - **Publishing.** Data goes into its block first. New bits and BAT
//!   entries change in memory (readers see them at once) and reach the
//!   file in `flush`: `fdatasync` (data), then the changed bitmap pieces
//!   and new sector bitmap blocks' BAT entries, `fdatasync`, then the
//!   payload BAT entries, `fdatasync`. So no entry or bit on disk ever
//!   exposes bytes that are not; a crash between the steps leaves bits of
//!   blocks the disk's BAT does not hold yet (ignored) or a bitmap block
//!   no payload block uses yet.
//! - **Granularity.** Bits are set eight sectors at a time (one bitmap
//!   byte, aligned within the block), a partly covered group completed from
//!   what it reads now: libvhdi 20210425 misreads a byte with only some
//!   bits set, as it does in VHD (see `vhd::write`).
//!
//! Concurrency: writers are serialised by the `Writer` mutex, held across
//! their I/O; readers never take it. A writer publishes a block's bits
//! before its BAT entry, each after the data it exposes is written.

use super::bat::{self, Geometry};
use super::guid::{self, Guid};
use super::header::{self, Header, HEADER_AT};
use super::metadata::{self, Metadata};
use super::{VhdxLayer, MIB};
use crate::error::{ImageError, Result};
use crate::fileio::{file_len, read_at_zero_fill, sync_data, write_all_at};
use crate::image::{check_range, BackingRead};
use crate::storage::Storage;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Sectors whose bits a write sets together (see module docs).
const GROUP_SECTORS: u64 = 8;
/// Changed bitmap pieces kept in memory at most before they are written
/// back without a flush.
const MAX_DIRTY_BITMAP_BYTES: u64 = 64 << 20;
/// Zero writes are written in pieces of at most this.
const ZERO_CHUNK: u64 = MIB;

/// What a writer keeps besides the layer's BAT and bitmaps.
pub struct Writer {
    /// The end of the file: the next block goes here.
    alloc_at: u64,
    /// Payload BAT entries changed in memory, not yet in the file.
    dirty_payload: BTreeSet<u64>,
    /// Sector bitmap BAT entries changed in memory, not yet in the file.
    dirty_bitmap_entries: BTreeSet<u64>,
    /// Data written since the last `fdatasync`.
    data_written: bool,
    /// The header with new write GUIDs is on disk (see module docs).
    ids_changed: bool,
}

impl Writer {
    /// A writer for a file whose BAT `bat` the read side checked; refuses
    /// blocks that overlap each other (a write to one would change the
    /// other), naming the later BAT entry.
    pub(super) fn new(
        path: &Path,
        bat: &[u64],
        geo: &Geometry,
        bat_at: u64,
        file_len: u64,
        metadata_end: u64,
    ) -> Result<Writer> {
        let mut spans: Vec<(u64, u64, u64)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            let is_bitmap = (i as u64 + 1).is_multiple_of(geo.chunk_ratio + 1);
            let len = match bat::state(e) {
                bat::BITMAP_PRESENT if is_bitmap => MIB,
                bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT if !is_bitmap => geo.block_size,
                _ => continue,
            };
            spans.push((bat::offset(e), bat::offset(e) + len, bat_at + i as u64 * 8));
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(ImageError::corrupt(
                    path,
                    w[1].2,
                    format!(
                        "BAT entry points at [{}, {}), overlapping the block of the BAT entry at offset {}; not writing",
                        w[1].0, w[1].1, w[0].2
                    ),
                ));
            }
        }
        Ok(Writer {
            alloc_at: file_len.max(metadata_end).div_ceil(MIB) * MIB,
            dirty_payload: BTreeSet::new(),
            dirty_bitmap_entries: BTreeSet::new(),
            data_written: false,
            ids_changed: false,
        })
    }
}

/// A GUID from the kernel's random source (version 4 bits set).
pub fn new_guid(path: &Path) -> Result<[u8; 16]> {
    let mut g = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into our buffer.
    let n = unsafe { libc::getrandom(g.as_mut_ptr().cast(), g.len(), 0) };
    if n != 16 {
        return Err(ImageError::io(
            path,
            "getrandom",
            0,
            std::io::Error::last_os_error(),
        ));
    }
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    Ok(g)
}

/// Whether a VHDX in `path`'s directory names `id` as its parent linkage
/// (how many files are looked at is bounded; unreadable ones are skipped).
pub fn named_by_a_child(path: &Path, id: &Guid) -> bool {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let accept = crate::input::Accept::RegularOrBlock;
    for p in entries.take(10_000).flatten().map(|e| e.path()) {
        if p == path {
            continue;
        }
        let Ok(f) = crate::input::open_input(&p, false, accept) else {
            continue;
        };
        let mut magic = [0u8; 8];
        if f.read_exact_at(&mut magic, 0).is_err() || !header::is_vhdx(&magic) {
            continue;
        }
        let meta = file_len(&f, &p)
            .and_then(|len| header::read_regions(&f, &p, len))
            .and_then(|r| metadata::read(&f, &p, r.metadata));
        let Ok(Metadata {
            locator: Some((pairs, _)),
            ..
        }) = meta
        else {
            continue;
        };
        let names_it = pairs.iter().any(|(k, v)| {
            (k.eq_ignore_ascii_case("parent_linkage") || k.eq_ignore_ascii_case("parent_linkage2"))
                && guid::parse(v) == Some(*id)
        });
        if names_it {
            return true;
        }
    }
    false
}

impl VhdxLayer {
    fn writer(&self) -> Result<&Mutex<Writer>> {
        self.writer
            .as_ref()
            .ok_or_else(|| ImageError::invalid(&self.path, "image is open read-only"))
    }

    /// `Writable::write`.
    pub(super) fn write_guest(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let writer = self.writer()?;
        check_range(
            &self.path,
            self.meta.virtual_size,
            offset,
            data.len() as u64,
        )?;
        if data.is_empty() {
            return Ok(());
        }
        let mut w = writer.lock();
        self.begin_writing(&mut w)?;
        let bs = self.geo.block_size;
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let pend = ((at / bs + 1) * bs).min(end);
            let piece = &data[(at - offset) as usize..(pend - offset) as usize];
            self.write_piece(&mut w, at / bs, at, piece, below)?;
            at = pend;
        }
        self.maybe_write_back(&mut w)
    }

    /// `Writable::write_zeroes`: blocks of a dynamic disk that read zeros
    /// stay as they are; everything else gets zeros written.
    pub(super) fn zero_guest(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        let writer = self.writer()?;
        check_range(&self.path, self.meta.virtual_size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut w = writer.lock();
        self.begin_writing(&mut w)?;
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let bs = self.geo.block_size;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let pend = ((block + 1) * bs).min(at + ZERO_CHUNK).min(end);
            let e = self.entry(self.geo.payload_index(block));
            let holds = matches!(bat::state(e), bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT);
            if holds || self.meta.has_parent {
                let piece = &zeros[..(pend - at) as usize];
                self.write_piece(&mut w, block, at, piece, below)?;
            }
            at = pend;
        }
        self.maybe_write_back(&mut w)
    }

    /// Before the first write: the new header (see module docs).
    fn begin_writing(&self, w: &mut Writer) -> Result<()> {
        if w.ids_changed {
            return Ok(());
        }
        let cur = self.current_header();
        let sequence = cur.next_sequence(&self.path, 1)?;
        let fw = new_guid(&self.path)?;
        let dw = if named_by_a_child(&self.path, &cur.data_write_guid) {
            cur.data_write_guid
        } else {
            new_guid(&self.path)?
        };
        let mut raw = cur.raw.clone();
        raw[16..32].copy_from_slice(&fw);
        raw[32..48].copy_from_slice(&dw);
        let slot = 1 - cur.slot;
        let b = Header { raw, ..cur.clone() }.encode_with(sequence, &[0; 16]);
        write_all_at(&*self.file, &self.path, &b, HEADER_AT[slot])?;
        sync_data(&*self.file, &self.path)?;
        *self.header.lock() = Header {
            slot,
            sequence,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: [0; 16],
            raw: b,
            ..cur
        };
        w.ids_changed = true;
        Ok(())
    }

    /// Writes `piece` (guest offset `at`) into payload block `block`.
    fn write_piece(
        &self,
        w: &mut Writer,
        block: u64,
        at: u64,
        piece: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let bs = self.geo.block_size;
        let bstart = block * bs;
        let idx = self.geo.payload_index(block);
        let e = self.entry(idx);
        let whole = at == bstart && at + piece.len() as u64 >= self.block_end(block);
        w.data_written = true;
        match bat::state(e) {
            bat::FULLY_PRESENT => {
                write_all_at(&*self.file, &self.path, piece, bat::offset(e) + at - bstart)
            }
            bat::PARTIALLY_PRESENT => {
                let old = self.bitmap(block)?;
                let new = self.write_partial(block, bat::offset(e), &old, at, piece, below)?;
                self.publish(w, block, new, None);
                Ok(())
            }
            bat::NOT_PRESENT if self.meta.has_parent && !whole => {
                self.ensure_bitmap_block(w, block)?;
                let host = self.allocate(w, bs)?;
                let empty = vec![0u8; (self.geo.block_sectors() / 8) as usize];
                let new = self.write_partial(block, host, &empty, at, piece, below)?;
                self.publish(
                    w,
                    block,
                    Some(new.unwrap_or(empty)),
                    Some((idx, host | bat::PARTIALLY_PRESENT as u64)),
                );
                Ok(())
            }
            _ => {
                // The new space reads zeros: what a dynamic disk's absent
                // block and a zero/unmapped/undefined block read.
                let host = self.allocate(w, bs)?;
                write_all_at(&*self.file, &self.path, piece, host + at - bstart)?;
                self.publish(
                    w,
                    block,
                    None,
                    Some((idx, host | bat::FULLY_PRESENT as u64)),
                );
                Ok(())
            }
        }
    }

    /// Where block `block`'s guest bytes end (the last block may be cut
    /// short by the virtual size).
    fn block_end(&self, block: u64) -> u64 {
        ((block + 1) * self.geo.block_size).min(self.meta.virtual_size)
    }

    /// Writes one piece into the partially present block at `host` whose
    /// bits are `bits`, completing the partly covered groups at its ends;
    /// the block's new bits, or `None` when every bit it needs was set.
    fn write_partial(
        &self,
        block: u64,
        host: u64,
        bits: &[u8],
        at: u64,
        piece: &[u8],
        below: &dyn BackingRead,
    ) -> Result<Option<Vec<u8>>> {
        let sec = self.geo.sector;
        let bstart = block * self.geo.block_size;
        let end = at + piece.len() as u64;
        let in_disk = (self.block_end(block) - bstart) / sec;
        let s0 = (at - bstart) / sec;
        let s1 = (end - bstart).div_ceil(sec);
        let g0 = s0 / GROUP_SECTORS * GROUP_SECTORS;
        let g1 = (s1.div_ceil(GROUP_SECTORS) * GROUP_SECTORS)
            .min(in_disk)
            .max(s1);
        let test = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1 != 0;
        if (g0..g1).all(test) {
            write_all_at(&*self.file, &self.path, piece, host + (at - bstart))?;
            return Ok(None);
        }
        let (span_s, span_e) = (bstart + g0 * sec, bstart + g1 * sec);
        let mut buf = vec![0u8; (span_e - span_s) as usize];
        for (rs, re) in [(span_s, at), (end, span_e)] {
            if rs < re {
                let dst = &mut buf[(rs - span_s) as usize..(re - span_s) as usize];
                self.current_view(bits, bstart, host, rs, dst, below)?;
            }
        }
        buf[(at - span_s) as usize..(end - span_s) as usize].copy_from_slice(piece);
        write_all_at(&*self.file, &self.path, &buf, host + g0 * sec)?;
        let mut new = bits.to_vec();
        for s in g0..g1 {
            new[(s / 8) as usize] |= 1 << (s % 8);
        }
        Ok(Some(new))
    }

    /// Guest bytes `[rs, rs+buf.len())` of a partially present block as
    /// they read now: this file where the bit is set, else the parent.
    fn current_view(
        &self,
        bits: &[u8],
        bstart: u64,
        host: u64,
        rs: u64,
        buf: &mut [u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let sec = self.geo.sector;
        let re = rs + buf.len() as u64;
        let (first, last) = ((rs - bstart) / sec, (re - bstart).div_ceil(sec));
        for (s, e, set) in bat::runs(bits, first, last) {
            let gs = (bstart + s * sec).max(rs);
            let ge = (bstart + e * sec).min(re);
            let dst = &mut buf[(gs - rs) as usize..(ge - rs) as usize];
            if set {
                read_at_zero_fill(&*self.file, &self.path, dst, host + (gs - bstart))?;
            } else {
                below.read_below(gs, dst)?;
            }
        }
        Ok(())
    }

    /// The sector bitmap block of `block`'s chunk, allocated (zeros: no
    /// sector present) when the chunk has none yet.
    fn ensure_bitmap_block(&self, w: &mut Writer, block: u64) -> Result<()> {
        let idx = self.geo.bitmap_index(block);
        if bat::state(self.entry(idx)) == bat::BITMAP_PRESENT {
            return Ok(());
        }
        let at = self.allocate(w, MIB)?;
        self.bat[idx as usize].store(at | bat::BITMAP_PRESENT as u64, Ordering::Release);
        w.dirty_bitmap_entries.insert(idx);
        Ok(())
    }

    /// `len` bytes of new space at the end of the file, the file extended
    /// to cover them before anything is written there.
    fn allocate(&self, w: &mut Writer, len: u64) -> Result<u64> {
        let at = w.alloc_at;
        let end = at
            .checked_add(len)
            .filter(|e| *e < 1 << 63)
            .ok_or_else(|| {
                ImageError::unsupported(&self.path, format!("no room for a block at {at}"))
            })?;
        if file_len(&*self.file, &self.path)? < end {
            self.file
                .set_len(end)
                .map_err(|e| ImageError::io(&self.path, "extend", end, e))?;
        }
        w.alloc_at = end;
        Ok(at)
    }

    /// Makes a block's new bits, then its new BAT entry (index, value),
    /// visible to readers, in that order.
    fn publish(
        &self,
        w: &mut Writer,
        block: u64,
        bits: Option<Vec<u8>>,
        entry: Option<(u64, u64)>,
    ) {
        if let Some(b) = bits {
            let mut c = self.bitmaps.lock();
            c.generation += 1;
            c.clean.pop(&block);
            c.dirty.insert(block, Arc::new(b));
        }
        if let Some((idx, e)) = entry {
            self.bat[idx as usize].store(e, Ordering::Release);
            w.dirty_payload.insert(idx);
        }
    }

    fn maybe_write_back(&self, w: &mut Writer) -> Result<()> {
        let bytes = self.bitmaps.lock().dirty.len() as u64 * self.geo.block_sectors() / 8;
        if bytes > MAX_DIRTY_BITMAP_BYTES {
            self.write_back(w)?;
        }
        Ok(())
    }

    /// `Writable::flush`.
    pub(super) fn flush_writes(&self) -> Result<()> {
        match &self.writer {
            Some(writer) => self.write_back(&mut writer.lock()),
            None => Ok(()),
        }
    }

    /// Writes BAT entries `idx` (ascending) where they belong, in runs.
    fn write_entries(&self, idx: &BTreeSet<u64>) -> Result<()> {
        let all: Vec<u64> = idx.iter().copied().collect();
        for run in all.chunk_by(|a, b| a + 1 == *b) {
            let bytes: Vec<u8> = run
                .iter()
                .flat_map(|i| self.entry(*i).to_le_bytes())
                .collect();
            write_all_at(&*self.file, &self.path, &bytes, self.bat_at + run[0] * 8)?;
        }
        Ok(())
    }

    /// Makes every completed write durable in the order of the module
    /// docs; what fails stays dirty for the next attempt.
    fn write_back(&self, w: &mut Writer) -> Result<()> {
        let (file, path) = (&*self.file, self.path.as_path());
        let mut dirty: Vec<(u64, Arc<Vec<u8>>)> = {
            let c = self.bitmaps.lock();
            c.dirty.iter().map(|(b, m)| (*b, m.clone())).collect()
        };
        if !w.data_written
            && dirty.is_empty()
            && w.dirty_payload.is_empty()
            && w.dirty_bitmap_entries.is_empty()
        {
            return Ok(());
        }
        dirty.sort_unstable_by_key(|(b, _)| *b);
        sync_data(file, path)?;
        if !dirty.is_empty() || !w.dirty_bitmap_entries.is_empty() {
            let piece = self.geo.block_sectors() / 8;
            for (block, bits) in &dirty {
                let e = self.entry(self.geo.bitmap_index(*block));
                let at = bat::offset(e) + (block % self.geo.chunk_ratio) * piece;
                write_all_at(file, path, bits, at)?;
            }
            self.write_entries(&w.dirty_bitmap_entries)?;
            sync_data(file, path)?;
            w.dirty_bitmap_entries.clear();
            let mut c = self.bitmaps.lock();
            c.generation += 1;
            for (block, bits) in dirty {
                // Unless a writer changed it again meanwhile (it holds the
                // writer lock, so it cannot have).
                c.dirty.remove(&block);
                c.clean.put(block, bits);
            }
        }
        if !w.dirty_payload.is_empty() {
            self.write_entries(&w.dirty_payload)?;
            sync_data(file, path)?;
            w.dirty_payload.clear();
        }
        w.data_written = false;
        Ok(())
    }
}
