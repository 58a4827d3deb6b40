//! VHD (Microsoft Virtual Hard Disk, QEMU's `vpc`) as a [`Layer`](crate::image::Layer): fixed,
//! dynamic and differencing disks, read and written.
//!
//! Layout of this module: `footer` parses the footer (and decides the
//! virtual size the way QEMU does); `header` the dynamic disk header and the
//! parent locators of differencing disks; `bat` the block allocation table,
//! sector bitmaps and the per-block "fully allocated" bits; `write` the
//! writer (block allocation, sector bitmaps, crash-safe write-back);
//! `create` makes new dynamic and differencing disks. This file holds the
//! open image and turns guest ranges into mappings.
//!
//! What a range maps to:
//! - fixed disk: the file itself, up to the footer (a valid chain base);
//! - dynamic disk: blocks the BAT lists, sectors whose bitmap bit is set,
//!   are data; everything else reads as zeros (`Zero`: a dynamic disk is a
//!   base, nothing is below it).
//!   QEMU reads an allocated block's data area whatever its bitmap says;
//!   we follow the spec. QEMU sets every bit of a block it allocates, and
//!   so does snaptree's writer, so the two agree on every image either
//!   writes;
//! - differencing disk: the same, but what is not here is `Unallocated`, so
//!   the chain asks the parent. The parent is named by the parent locators
//!   (`backing()`, format `vpc`), and must carry the unique id the child
//!   recorded (`expected_parent_id()`, checked when the chain is opened).
//!
//! Concurrency: BAT entries and the "block fully allocated" bits are
//! atomics (see `bat`); sector bitmaps sit in a small LRU, plus the
//! bitmaps writes changed and not yet written back, behind a mutex held
//! only for the lookup or insert, never during I/O. Data is read with
//! `pread` and no lock. Writers are serialised by their own mutex (see
//! `write`) and publish a change only after its data is in the file, so a
//! concurrent reader sees either the old mapping (and old bytes) or the new
//! one (and new bytes). Blocks never move once allocated.

pub mod bat;
pub mod create;
pub mod driver;
pub mod footer;
pub mod header;
pub mod reparent;

#[cfg(test)]
mod tests;
mod write;
mod zero;

use crate::error::{ImageError, Result};
use crate::fileio::{self, read_exact_at};
use crate::image::storage::Storage;
use crate::image::{
    check_range, push_extent, BackingRead, BackingRef, Extent, Format, LayerInfo, Mapping,
};
use crate::image::{Identity, Locking, ReadMap, Writable};
use bat::{Bat, BitOrder, FullBlocks};
use footer::{format_uuid, Footer};
use header::DynamicHeader;
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of sector bitmaps kept cached per image (at least 16 bitmaps).
const BITMAP_CACHE_BYTES: u64 = 1 << 20;

/// Sector bitmaps in memory.
struct Bitmaps {
    clean: LruCache<u64, Arc<Vec<u8>>>,
    /// Bitmaps writes changed and `flush` has not written back yet; never
    /// evicted (they are the only copy).
    dirty: HashMap<u64, Arc<Vec<u8>>>,
    /// Bumped whenever a bitmap changes, so a reader that read a bitmap
    /// from the file meanwhile does not cache a stale copy.
    generation: u64,
}

impl Bitmaps {
    fn get(&mut self, block: u64) -> Option<Arc<Vec<u8>>> {
        if let Some(b) = self.dirty.get(&block) {
            return Some(b.clone());
        }
        self.clean.get(&block).cloned()
    }
}

/// The metadata of a dynamic or differencing disk.
struct Sparse {
    header: DynamicHeader,
    bat: Bat,
    order: BitOrder,
    full: FullBlocks,
    bitmaps: Mutex<Bitmaps>,
    /// The fully-allocated bits were seeded from XCP's on-disk batmap.
    batmap: bool,
}

pub struct VhdLayer {
    path: PathBuf,
    file: Box<dyn Storage>,
    footer: Footer,
    size: u64,
    backing: Option<BackingRef>,
    /// `None` for a fixed disk.
    sparse: Option<Sparse>,
    /// Sector bitmaps read from the file so far (for tests and tuning).
    bitmap_reads: AtomicU64,
    /// The writer's state, for an image opened for writing; its mutex
    /// serialises writers (see `write`).
    writer: Option<Mutex<write::Writer>>,
}

impl VhdLayer {
    /// Opens a VHD read-only; every structure is checked here.
    pub fn open(path: &Path, file: File) -> Result<VhdLayer> {
        VhdLayer::open_with(path, file, false)
    }

    /// Opens a VHD read-only or (`file` opened read-write) for writing.
    /// Writing needs a little more from the file than reading: blocks that
    /// do not overlap each other or any metadata (see `write`).
    pub fn open_with(path: &Path, file: File, writable: bool) -> Result<VhdLayer> {
        VhdLayer::open_storage(path, Box::new(file), writable)
    }

    /// Opens the VHD held by `file` (any storage: memory in unit tests);
    /// `path` names it in errors.
    pub fn open_storage(path: &Path, file: Box<dyn Storage>, writable: bool) -> Result<VhdLayer> {
        let footer = Footer::read(&*file, path)?;
        let file_len = fileio::file_len(&*file, path)?;
        let size = footer.virtual_size(path)?;
        let mut layer = VhdLayer {
            path: path.to_path_buf(),
            file,
            footer,
            size,
            backing: None,
            sparse: None,
            bitmap_reads: AtomicU64::new(0),
            writer: None,
        };
        if layer.footer.is_fixed() {
            check_fixed_size(path, &layer.footer, size)?;
            if writable {
                layer.writer = Some(Mutex::new(write::Writer::fixed()));
            }
            return Ok(layer);
        }
        layer.open_sparse(path, file_len, writable)?;
        Ok(layer)
    }

    /// Dynamic and differencing disks: reads and checks the dynamic
    /// header, the BAT (against the other metadata) and the parent
    /// locators, then sets up the block state and, if `writable`, the
    /// writer.
    fn open_sparse(&mut self, path: &Path, file_len: u64, writable: bool) -> Result<()> {
        let footer = &self.footer;
        let size = self.size;
        let header = DynamicHeader::read(&*self.file, path, footer, file_len)?;
        let mut forbidden = metadata_ranges(footer, &header);
        let bat = Bat::read(&*self.file, path, &header, size, file_len, &forbidden)?;
        let blocks = bat.len();
        forbidden.push((
            bat.table_offset,
            bat.table_offset + blocks * 4,
            "block allocation table",
        ));
        if footer.is_differencing() {
            let parent = header.parent_name(&*self.file, path, file_len, &forbidden)?;
            // XCP records a raw parent with a nil id: let the chain probe it.
            let nil = header.parent_unique_id == [0; 16];
            self.backing = Some(BackingRef {
                name: parent.name,
                offset: parent.offset,
                format: (!nil).then(|| "vpc".to_string()),
            });
        }
        let batmap = bat::read_batmap(&*self.file, path, footer, &header, blocks, file_len);
        let full = batmap_full_blocks(&bat, batmap.as_ref());
        if writable {
            self.writer = Some(Mutex::new(write::Writer::sparse(
                &*self.file,
                path,
                footer,
                &header,
                &bat,
                batmap.as_ref(),
                &forbidden,
                file_len,
            )?));
        }
        let cached = (BITMAP_CACHE_BYTES / bat.bitmap_size).max(16) as usize;
        self.sparse = Some(Sparse {
            order: BitOrder::for_footer(footer),
            header,
            bat,
            full,
            bitmaps: Mutex::new(Bitmaps {
                clean: crate::cache::lazy_lru(cached),
                dirty: HashMap::new(),
                generation: 0,
            }),
            batmap: batmap.is_some(),
        });
        Ok(())
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn dynamic_header(&self) -> Option<&DynamicHeader> {
        self.sparse.as_ref().map(|s| &s.header)
    }

    /// Sector bitmaps read from the file since open.
    pub fn bitmap_reads(&self) -> u64 {
        self.bitmap_reads.load(Ordering::Relaxed)
    }

    /// Blocks known to be fully allocated so far.
    pub fn full_blocks(&self) -> u64 {
        self.sparse.as_ref().map_or(0, |s| s.full.count())
    }

    /// Whether XCP's batmap seeded the fully-allocated bits.
    pub fn uses_batmap(&self) -> bool {
        self.sparse.as_ref().is_some_and(|s| s.batmap)
    }

    /// Block `block`'s sector bitmap (at file offset `at`), cached. The
    /// read happens without the lock; its result is cached only if no
    /// bitmap changed meanwhile (else it may predate a write).
    fn bitmap(&self, sp: &Sparse, block: u64, at: u64) -> Result<Arc<Vec<u8>>> {
        let generation = {
            let mut cache = sp.bitmaps.lock();
            if let Some(b) = cache.get(block) {
                return Ok(b);
            }
            cache.generation
        };
        let mut buf = vec![0u8; sp.bat.bitmap_size as usize];
        read_exact_at(&*self.file, &self.path, &mut buf, at, "VHD sector bitmap")?;
        self.bitmap_reads.fetch_add(1, Ordering::Relaxed);
        let b = Arc::new(buf);
        let mut cache = sp.bitmaps.lock();
        if let Some(now) = cache.get(block) {
            return Ok(now);
        }
        if cache.generation == generation {
            cache.clean.put(block, b.clone());
        }
        Ok(b)
    }

    fn map_sparse(&self, sp: &Sparse, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let bs = sp.bat.block_size;
        let absent = if self.footer.is_differencing() {
            Mapping::Unallocated
        } else {
            Mapping::Zero
        };
        let mut out = Vec::new();
        let mut push = |start: u64, end: u64, mapping: Mapping| {
            push_extent(
                &mut out,
                Extent {
                    start,
                    len: end - start,
                    mapping,
                },
            )
        };
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let bstart = block * bs;
            let bend = (bstart + bs).min(end);
            let Some(bitmap_at) = sp.bat.bitmap_offset(block) else {
                push(at, bend, absent);
                at = bend;
                continue;
            };
            let data = bitmap_at + sp.bat.bitmap_size;
            let data_at = |guest: u64| Mapping::Data {
                host: data + (guest - bstart),
            };
            if sp.full.get(block) {
                push(at, bend, data_at(at));
                at = bend;
                continue;
            }
            let bitmap = self.bitmap(sp, block, bitmap_at)?;
            // Sectors of this block inside the disk (the last block may
            // extend past the virtual size).
            let sectors = (self.size - bstart).min(bs) / 512;
            if bat::all_set(&bitmap, sectors, sp.order) {
                sp.full.set(block);
                push(at, bend, data_at(at));
                at = bend;
                continue;
            }
            let first = (at - bstart) / 512;
            let last = (bend - bstart).div_ceil(512);
            for (s, e, set) in bat::runs(&bitmap, first, last, sp.order) {
                let gs = (bstart + s * 512).max(at);
                let ge = (bstart + e * 512).min(bend);
                push(gs, ge, if set { data_at(gs) } else { absent });
            }
            at = bend;
        }
        Ok(out)
    }

    fn features(&self) -> Vec<String> {
        let f = &self.footer;
        let g = f.disk_geometry;
        let mut out = vec![
            format!("{} disk", f.disk_type_name()),
            format!(
                "creator {} {}.{}",
                f.creator(),
                f.creator_version >> 16,
                f.creator_version & 0xffff
            ),
            if f.size_from_chs() {
                format!(
                    "size from CHS geometry {}/{}/{}",
                    g.cylinder, g.heads, g.sectors_per_track
                )
            } else {
                "size from current_size".to_string()
            },
            format!("unique id {}", format_uuid(&f.unique_id)),
        ];
        if let Some(sp) = &self.sparse {
            if f.is_differencing() {
                out.push(format!(
                    "parent unique id {}",
                    format_uuid(&sp.header.parent_unique_id)
                ));
            }
            if sp.batmap {
                out.push("XCP batmap".into());
            }
        }
        if f.len == footer::SHORT_FOOTER_LEN {
            out.push("511-byte footer (Virtual PC before 2004)".into());
        }
        if f.from_head_copy {
            out.push("no footer at the end, using the copy at offset 0".into());
        }
        if f.saved_state != 0 {
            out.push("saved state".into());
        }
        if f.tapdisk_hidden != 0 && f.creator_application.starts_with(b"tap") {
            out.push("hidden (XCP)".into());
        }
        out
    }
}

impl ReadMap for VhdLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    /// A write sets the bitmap bits of whole groups of sectors (see
    /// `write::GROUP_SECTORS`), so that is what its mapping can change by.
    fn allocation_unit(&self) -> u64 {
        self.sparse
            .as_ref()
            .map_or(512, |s| write::group_bytes(s.bat.block_size))
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.path, self.size, offset, len)?;
        if let Some(sp) = &self.sparse {
            return self.map_sparse(sp, offset, len);
        }
        // Fixed: the file itself. Holes in it are found by `host_segments`
        // (as `qemu-img map` reports them: zero and data).
        Ok(vec![Extent {
            start: offset,
            len,
            mapping: Mapping::Data { host: offset },
        }])
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        fileio::read_at_zero_fill(&*self.file, &self.path, buf, host)
    }

    /// A fixed disk's holes read as zeros and are reported so; inside the
    /// blocks of a dynamic disk QEMU does not look for holes, nor do we, so
    /// maps agree with `qemu-img map`.
    fn host_segments(&self, host: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        if self.sparse.is_some() {
            return Ok(vec![(host, host + len, true)]);
        }
        fileio::data_segments(&*self.file, &self.path, host, host + len)
    }

    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            file: self.path.clone(),
            format: Format::Vhd,
            version: Some(self.footer.file_format_version >> 16),
            virtual_size: self.size,
            cluster_size: self.sparse.as_ref().map(|s| s.bat.block_size),
            file_size: fileio::file_len(&*self.file, &self.path)?,
            backing: self.backing.clone(),
            features: self.features(),
            snapshots: Vec::new(),
        })
    }

    /// Only what this file holds: a dynamic disk's unallocated sectors read
    /// as zeros but take no space.
    fn allocated_bytes(&self) -> Result<u64> {
        if self.sparse.is_none() {
            return Ok(self.size);
        }
        let mut total = 0;
        let step = 1u64 << 30;
        let mut at = 0;
        while at < self.size {
            let len = step.min(self.size - at);
            for e in self.map(at, len)? {
                if matches!(e.mapping, Mapping::Data { .. }) {
                    total += e.len;
                }
            }
            at += len;
        }
        Ok(total)
    }
}

impl Writable for VhdLayer {
    fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    fn write(&self, offset: u64, data: &[u8], below: &dyn BackingRead) -> Result<()> {
        self.write_guest(offset, data, below)
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        self.zero_guest(offset, len, below)
    }

    fn flush(&self) -> Result<()> {
        self.flush_writes()
    }
}

impl Identity for VhdLayer {
    fn unique_id(&self) -> Option<[u8; 16]> {
        Some(self.footer.unique_id)
    }

    fn expected_parent_id(&self) -> Option<[u8; 16]> {
        let sp = self.sparse.as_ref()?;
        let id = sp.header.parent_unique_id;
        (self.footer.is_differencing() && id != [0; 16]).then_some(id)
    }
}

impl Locking for VhdLayer {
    fn lock_storage(&self) -> Option<&dyn crate::storage::Storage> {
        Some(&*self.file)
    }
}

impl Drop for VhdLayer {
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = self.flush_writes() {
                tracing::error!("flushing {} on close: {e}", self.path.display());
            }
        }
    }
}

/// A fixed disk's data is the file up to the footer, so the virtual size
/// must fit before it.
fn check_fixed_size(path: &Path, footer: &Footer, size: u64) -> Result<()> {
    if size > footer.at {
        return Err(ImageError::corrupt(
            path,
            footer.at + 48,
            format!(
                "fixed disk of {size} bytes, but only {} bytes precede the footer (truncated?)",
                footer.at
            ),
        ));
    }
    Ok(())
}

/// The metadata ranges no BAT entry or locator may overlap: the footer
/// copy, the dynamic header and (unless it was lost and the copy is used)
/// the footer.
fn metadata_ranges(footer: &Footer, header: &DynamicHeader) -> Vec<(u64, u64, &'static str)> {
    let mut forbidden: Vec<(u64, u64, &str)> = vec![
        (0, footer::FOOTER_LEN, "footer copy at offset 0"),
        (
            header.at,
            header.at + header::HEADER_LEN,
            "dynamic disk header",
        ),
    ];
    if !footer.from_head_copy {
        forbidden.push((footer.at, footer.at + footer.len, "footer"));
    }
    forbidden
}

/// The blocks the batmap marks fully written (only blocks the BAT maps):
/// their sector bitmaps need not be read.
fn batmap_full_blocks(bat: &Bat, batmap: Option<&bat::Batmap>) -> FullBlocks {
    let blocks = bat.len();
    let full = FullBlocks::new(blocks);
    if let Some(b) = batmap {
        for i in 0..blocks {
            if bat.bitmap_offset(i).is_some() && BitOrder::MsbFirst.test(&b.map, i) {
                full.set(i);
            }
        }
    }
    full
}
