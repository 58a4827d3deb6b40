//! VHDX (MS-VHDX, Hyper-V's format since Windows Server 2012; QEMU's
//! `vhdx`) as a [`Layer`](crate::image::Layer): fixed, dynamic and
//! differencing disks (`.avhdx` files are VHDX), read and written (see
//! `write` for the order of writes that keeps a crash harmless).
//!
//! Layout of this module: `header` the file identifier, the two headers
//! and the region table; `metadata` the metadata region and its items;
//! `bat` the block allocation table and its geometry; `log` the metadata
//! log and its replay; `locator` a differencing disk's parent; `guid` the
//! GUIDs; `write` the writer; `create` new differencing children;
//! `reparent` re-pointing a child and changing a file's data write GUID
//! (merges);
//! `driver` the registry entry. This file holds the open image and turns
//! guest ranges into mappings.
//!
//! What a range maps to, by its payload block's state:
//! - fully present: data at the block's file offset;
//! - partially present (differencing only): per sector, by the sector
//!   bitmap block of its chunk: set bits are data, clear ones fall through
//!   to the parent (`Unallocated`);
//! - not present: `Unallocated` in a differencing disk, else `Zero`;
//! - zero, unmapped, undefined: `Zero` (QEMU reads them as zeros).
//!
//! Opening replays the log first when the header names one (see `log`):
//! in memory on a read-only open; a read-write open is refused until the
//! replay was written into the file under the write lock (the driver's
//! `repair_dirty`, run by the tree's read-write open).
//!
//! Concurrency: BAT entries are atomics a writer changes after the data
//! they expose is written; sector bitmaps sit in a small LRU (plus the
//! ones a writer changed and has not written back) behind a mutex held
//! only for the lookup or insert; data is read with `pread` and no lock.

pub mod bat;
pub mod create;
pub mod driver;
pub mod guid;
pub mod header;
pub mod locator;
pub mod log;
pub mod metadata;
pub mod reparent;
#[cfg(test)]
mod tests;
pub mod write;

use crate::error::{ImageError, Result};
use crate::fileio::{self, read_exact_at};
use crate::image::storage::Storage;
use crate::image::{check_range, push_extent, BackingRef, Extent, Format, LayerInfo, Mapping};
use crate::image::{Identity, Locking, ReadMap, Writable};
use bat::Geometry;
use guid::Guid;
use header::Header;
use locator::ParentRef;
use lru::LruCache;
use metadata::Metadata;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const MIB: u64 = 1 << 20;
/// Sector bitmap pieces (one payload block's bits each) kept cached.
const BITMAP_CACHE: usize = 256;

pub fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// CRC-32C as VHDX stores it (standard initial value and final inversion).
pub fn crc32c_of(b: &[u8]) -> u32 {
    !crate::crc::crc32c(!0, b)
}

/// Sector bitmap pieces by payload block: the clean ones cached, the
/// ones a writer changed and has not written back yet (readers look there
/// first), and a generation that tells a reader whether a writer changed
/// anything while it read a piece from the file.
pub(crate) struct Bitmaps {
    clean: LruCache<u64, Arc<Vec<u8>>>,
    dirty: HashMap<u64, Arc<Vec<u8>>>,
    generation: u64,
}

pub struct VhdxLayer {
    path: PathBuf,
    /// The file, or the file with its log replayed over it in memory.
    file: Box<dyn Storage>,
    /// The current header (a writer's first write makes a new one).
    header: Mutex<Header>,
    meta: Metadata,
    geo: Geometry,
    bat: Vec<AtomicU64>,
    /// File offset of the BAT region.
    bat_at: u64,
    writer: Option<Mutex<write::Writer>>,
    backing: Option<BackingRef>,
    parent: Option<ParentRef>,
    /// The parent linkage the parent's data write GUID matched at open.
    matched_linkage: Option<Guid>,
    /// Log entries replayed in memory at open.
    replayed: usize,
    bitmaps: Mutex<Bitmaps>,
}

/// The file to read the rest of the VHDX through, and how many log
/// entries it replays: the file itself when the log is empty, the file
/// with the log laid over it in memory when reading, and an error when
/// writing (the caller must replay into the file first). Separate because
/// everything after it reads through the file it returns.
fn replay_log(
    file: Box<dyn Storage>,
    path: &Path,
    header: &Header,
    writable: bool,
) -> Result<(Box<dyn Storage>, usize)> {
    let file_len = fileio::file_len(&*file, path)?;
    Ok(match log::find(&*file, path, header, file_len)? {
        Some(_) if writable => {
            return Err(ImageError::invalid(
                path,
                "the VHDX log holds entries to replay before it can be written",
            ))
        }
        Some(replay) => {
            let n = replay.entries;
            (Box::new(log::Replayed::new(file, replay)), n)
        }
        None => (file, 0),
    })
}

/// The file ranges no payload or bitmap block may overlap: headers and
/// region tables, the BAT and metadata regions, and the log (checked here
/// not to overlap the others). Separate because the BAT check and the
/// writer's allocation start both derive from it.
fn forbidden_ranges(
    path: &Path,
    header: &Header,
    regions: &header::Regions,
) -> Result<Vec<(u64, u64, &'static str)>> {
    let mut forbidden: Vec<(u64, u64, &'static str)> = vec![
        (0, MIB, "headers and region tables"),
        (regions.bat.0, regions.bat.0 + regions.bat.1, "BAT region"),
        (
            regions.metadata.0,
            regions.metadata.0 + regions.metadata.1,
            "metadata region",
        ),
    ];
    if header.log_length != 0 {
        let (s, e) = (
            header.log_offset,
            header.log_offset.saturating_add(header.log_length as u64),
        );
        if let Some((a, b, what)) = forbidden.iter().find(|(a, b, _)| s < *b && *a < e) {
            return Err(ImageError::corrupt(
                path,
                header::HEADER_AT[header.slot] + 68,
                format!("the log [{s}, {e}) overlaps the {what} [{a}, {b})"),
            ));
        }
        forbidden.push((s, e, "log"));
    }
    Ok(forbidden)
}

impl VhdxLayer {
    /// Opens a VHDX read-only (replaying its log in memory).
    pub fn open(path: &Path, file: Box<dyn Storage>) -> Result<VhdxLayer> {
        Self::open_with(path, file, false)
    }

    /// Opens a VHDX; `writable` refuses a file whose log still holds
    /// entries (the caller replays it into the file first, see `driver`).
    pub fn open_with(path: &Path, file: Box<dyn Storage>, writable: bool) -> Result<VhdxLayer> {
        let header = header::read_current(&*file, path)?;
        if writable {
            // The first write needs a newer header: refused here, so the
            // tree opens the leaf read-only with this reason.
            header.next_sequence(path, 1)?;
        }
        let (file, replayed) = replay_log(file, path, &header, writable)?;
        let file_len = fileio::file_len(&*file, path)?;
        let regions = header::read_regions(&*file, path, file_len)?;
        let meta = metadata::read(&*file, path, regions.metadata)?;
        let geo = Geometry::new(path, &meta, regions.metadata.0)?;
        let forbidden = forbidden_ranges(path, &header, &regions)?;
        let bat = bat::read(&*file, path, &geo, &meta, regions.bat, file_len, &forbidden)?;
        let metadata_end = forbidden.iter().map(|f| f.1).max().unwrap_or(MIB);
        let writer = if writable {
            Some(Mutex::new(write::Writer::new(
                path,
                &bat,
                &geo,
                regions.bat.0,
                file_len,
                metadata_end,
            )?))
        } else {
            None
        };
        let mut layer = VhdxLayer {
            path: path.to_path_buf(),
            file,
            header: Mutex::new(header),
            meta,
            geo,
            bat: bat.into_iter().map(AtomicU64::new).collect(),
            bat_at: regions.bat.0,
            writer,
            backing: None,
            parent: None,
            matched_linkage: None,
            replayed,
            bitmaps: Mutex::new(Bitmaps {
                clean: crate::cache::lazy_lru(BITMAP_CACHE),
                dirty: HashMap::new(),
                generation: 0,
            }),
        };
        layer.find_parent()?;
        Ok(layer)
    }

    /// A differencing disk: its parent's name, checked by linkage when the
    /// parent is there to read (a missing one is the chain's error).
    fn find_parent(&mut self) -> Result<()> {
        let Some((pairs, at)) = &self.meta.locator else {
            return Ok(());
        };
        let p = locator::parent_ref(&self.path, pairs, *at)?;
        let parent_path = self.path.parent().unwrap_or(Path::new(".")).join(&p.name);
        let accept = crate::input::Accept::RegularOrBlock;
        if let Ok(f) = crate::input::open_input(&parent_path, false, accept) {
            if let Ok(h) = header::read_current(&f, &parent_path) {
                let found = h.data_write_guid;
                self.matched_linkage = Some(locator::check_linkage(
                    &self.path,
                    &p,
                    &parent_path,
                    &found,
                )?);
            }
        }
        self.backing = Some(BackingRef {
            name: p.name.clone(),
            offset: *at,
            format: Some("vhdx".into()),
        });
        self.parent = Some(p);
        Ok(())
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn current_header(&self) -> Header {
        self.header.lock().clone()
    }

    /// BAT entry `idx`.
    fn entry(&self, idx: u64) -> u64 {
        self.bat[idx as usize].load(Ordering::Acquire)
    }

    /// Log entries replayed in memory at open.
    pub fn replayed_entries(&self) -> usize {
        self.replayed
    }

    /// Payload block `block`'s bits of its chunk's sector bitmap.
    fn bitmap(&self, block: u64) -> Result<Arc<Vec<u8>>> {
        let generation = {
            let mut c = self.bitmaps.lock();
            if let Some(b) = c.dirty.get(&block) {
                return Ok(b.clone());
            }
            if let Some(b) = c.clean.get(&block) {
                return Ok(b.clone());
            }
            c.generation
        };
        let idx = self.geo.bitmap_index(block);
        let e = self.entry(idx);
        if bat::state(e) != bat::BITMAP_PRESENT {
            return Err(ImageError::corrupt(
                &self.path,
                idx * 8,
                format!(
                    "payload block {block} is partially present but its sector bitmap block is not"
                ),
            ));
        }
        let bytes = self.geo.block_sectors() / 8;
        let at = bat::offset(e) + (block % self.geo.chunk_ratio) * bytes;
        let mut buf = vec![0u8; bytes as usize];
        read_exact_at(&*self.file, &self.path, &mut buf, at, "VHDX sector bitmap")?;
        let b = Arc::new(buf);
        let mut c = self.bitmaps.lock();
        // A writer changed bitmaps meanwhile: what was read may be stale.
        if c.generation == generation {
            c.clean.put(block, b.clone());
        }
        Ok(b)
    }

    fn map_block(&self, block: u64, at: u64, end: u64, out: &mut Vec<Extent>) -> Result<()> {
        let bs = self.geo.block_size;
        let bstart = block * bs;
        let e = self.entry(self.geo.payload_index(block));
        let absent = if self.meta.has_parent {
            Mapping::Unallocated
        } else {
            Mapping::Zero
        };
        let data = |g: u64| Mapping::Data {
            host: bat::offset(e) + (g - bstart),
        };
        let mut push = |start: u64, end: u64, mapping| {
            push_extent(
                out,
                Extent {
                    start,
                    len: end - start,
                    mapping,
                },
            )
        };
        match bat::state(e) {
            bat::NOT_PRESENT => push(at, end, absent),
            bat::FULLY_PRESENT => push(at, end, data(at)),
            bat::PARTIALLY_PRESENT => {
                let bits = self.bitmap(block)?;
                let sec = self.geo.sector;
                let first = (at - bstart) / sec;
                let last = (end - bstart).div_ceil(sec);
                for (s, t, set) in bat::runs(&bits, first, last) {
                    let gs = (bstart + s * sec).max(at);
                    let ge = (bstart + t * sec).min(end);
                    push(gs, ge, if set { data(gs) } else { absent });
                }
            }
            _ => push(at, end, Mapping::Zero),
        }
        Ok(())
    }

    fn features(&self) -> Vec<String> {
        let m = &self.meta;
        let h = &self.current_header();
        let mut out = vec![
            format!("block size {}", m.block_size),
            format!(
                "logical sector {}, physical sector {}",
                m.logical_sector, m.physical_sector
            ),
            format!("header {} sequence {}", h.slot + 1, h.sequence),
            format!("data write guid {{{}}}", guid::text(&h.data_write_guid)),
            format!("page 83 {{{}}}", guid::text(&m.page83)),
        ];
        if m.has_parent {
            out.push("differencing disk".into());
        }
        if m.leave_blocks_allocated {
            out.push("leave blocks allocated (fixed)".into());
        }
        if self.replayed > 0 {
            out.push(format!(
                "log replayed in memory ({} entries)",
                self.replayed
            ));
        }
        if let Some(p) = &self.parent {
            out.push(format!("parent linkage {{{}}}", guid::text(&p.linkage)));
        }
        out
    }
}

impl ReadMap for VhdxLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn allocation_unit(&self) -> u64 {
        self.geo.block_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.path, self.meta.virtual_size, offset, len)?;
        let mut out = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let block = at / self.geo.block_size;
            let bend = ((block + 1) * self.geo.block_size).min(end);
            self.map_block(block, at, bend, &mut out)?;
            at = bend;
        }
        Ok(out)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        fileio::read_at_zero_fill(&*self.file, &self.path, buf, host)
    }

    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            file: self.path.clone(),
            format: Format::Vhdx,
            version: Some(self.current_header().version as u32),
            virtual_size: self.meta.virtual_size,
            cluster_size: Some(self.geo.block_size),
            file_size: fileio::file_len(&*self.file, &self.path)?,
            backing: self.backing.clone(),
            features: self.features(),
            snapshots: Vec::new(),
        })
    }

    /// Only what this file holds as data: zero blocks take no space.
    fn allocated_bytes(&self) -> Result<u64> {
        let mut total = 0;
        let size = self.meta.virtual_size;
        let mut at = 0;
        while at < size {
            let len = (1u64 << 30).min(size - at);
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

impl Writable for VhdxLayer {
    fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    fn write(&self, offset: u64, data: &[u8], below: &dyn crate::image::BackingRead) -> Result<()> {
        self.write_guest(offset, data, below)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        below: &dyn crate::image::BackingRead,
    ) -> Result<()> {
        self.zero_guest(offset, len, below)
    }

    fn flush(&self) -> Result<()> {
        self.flush_writes()
    }
}

impl Drop for VhdxLayer {
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = self.flush_writes() {
                tracing::error!("flushing {} on close: {e}", self.path.display());
            }
        }
    }
}

impl Identity for VhdxLayer {
    /// What children's `parent_linkage` names.
    fn unique_id(&self) -> Option<[u8; 16]> {
        Some(self.header.lock().data_write_guid)
    }

    fn expected_parent_id(&self) -> Option<[u8; 16]> {
        let p = self.parent.as_ref()?;
        Some(self.matched_linkage.unwrap_or(p.linkage))
    }
}

impl Locking for VhdxLayer {
    fn lock_storage(&self) -> Option<&dyn Storage> {
        Some(&*self.file)
    }
}
