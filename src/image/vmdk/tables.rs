//! Grain directories and grain tables: the two-level map every sparse
//! VMDK extent (hosted `KDMV`, ESXi `COWD`, seSparse) uses from a grain
//! of the extent to where it lives in the extent's file.
//!
//! The kinds differ only in how entries are encoded; each kind's opener
//! (`sparse`, `cowd`, `sesparse`) decodes its grain directory into file
//! offsets of grain tables (checked against the file and the metadata
//! there) and gives an [`EntryCodec`] for the table entries. Grain tables
//! are read on first use, every entry checked, and kept decoded in a small
//! LRU behind a mutex held only for the lookup or insert, never during
//! I/O.

use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where one grain is, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Not in this extent: the parent's (or zeros on a base).
    Unallocated,
    /// Reads as zeros, decided here.
    Zero,
    /// At this byte offset of the extent file.
    At(u64),
}

/// How a grain-table entry is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryCodec {
    /// 32-bit sector numbers; 0 unallocated; 1 a zero grain when the
    /// extent has zero grains (hosted sparse, `COWD`).
    Sector32 { zero_grain: bool },
    /// seSparse's 64-bit entries: the top nibble says unallocated (0),
    /// unmapped or zero (1, 2) or allocated (3, grain number in the rest,
    /// counted from `grains_at`).
    SeSparse { grains_at: u64 },
}

impl EntryCodec {
    fn entry_size(self) -> u64 {
        match self {
            EntryCodec::Sector32 { .. } => 4,
            EntryCodec::SeSparse { .. } => 8,
        }
    }
}

/// Bytes of decoded grain tables cached per extent (at least 4 tables): a
/// disk may have 1024 extents, each with its own cache.
const CACHE_BYTES: u64 = 128 << 10;

/// Decoded grain tables by number, and a generation bumped by every
/// change, so that a table read from the file while a writer changed it
/// is not cached stale.
struct Cache {
    tables: LruCache<u64, Arc<Vec<Grain>>>,
    generation: u64,
}

/// The grain map of one sparse extent.
pub struct GrainTables {
    /// Bytes per grain.
    pub grain: u64,
    /// Entries per grain table.
    pub gt_entries: u64,
    /// File offset of each grain table; 0: none. Grows only by the
    /// writer, under its lock, after the table is in the file.
    gd: RwLock<Vec<u64>>,
    pub codec: EntryCodec,
    /// Grains may not start before this file offset (the metadata).
    pub data_from: u64,
    /// Length of the extent file when it was opened (grains past it are
    /// refused; the writer raises it as it appends).
    file_len: AtomicU64,
    cache: Mutex<Cache>,
}

impl GrainTables {
    pub fn new(
        grain: u64,
        gt_entries: u64,
        gd: Vec<u64>,
        codec: EntryCodec,
        data_from: u64,
        file_len: u64,
    ) -> GrainTables {
        GrainTables {
            grain,
            gt_entries,
            gd: RwLock::new(gd),
            codec,
            data_from,
            file_len: AtomicU64::new(file_len),
            cache: Mutex::new(Cache {
                tables: crate::cache::lazy_lru(
                    (CACHE_BYTES / (gt_entries.max(1) * std::mem::size_of::<Grain>() as u64)).max(4)
                        as usize,
                ),
                generation: 0,
            }),
        }
    }

    /// File offsets of every grain table (0: none).
    pub fn gt_offsets(&self) -> Vec<u64> {
        self.gd.read().clone()
    }

    /// File offset of grain table `gt` (0: none).
    pub fn gt_offset(&self, gt: u64) -> Option<u64> {
        self.gd.read().get(gt as usize).copied()
    }

    /// Records grain table `gt` at `at` (the writer, once it is in the
    /// file).
    pub fn set_gt_offset(&self, gt: u64, at: u64) {
        if let Some(e) = self.gd.write().get_mut(gt as usize) {
            *e = at;
        }
    }

    /// Records that grain `index` is now `grain` (the writer, once the
    /// table entry is in the file).
    pub fn set_grain(&self, index: u64, grain: Grain) {
        let mut c = self.cache.lock();
        c.generation += 1;
        let gt = index / self.gt_entries;
        if let Some(t) = c.tables.get_mut(&gt) {
            Arc::make_mut(t)[(index % self.gt_entries) as usize] = grain;
        }
    }

    /// Raises the file length grains may reach (the writer appended).
    pub fn grow_file(&self, len: u64) {
        self.file_len.fetch_max(len, Ordering::Relaxed);
    }

    /// Bytes of one grain table in the file.
    pub fn table_bytes(&self) -> u64 {
        self.gt_entries * self.codec.entry_size()
    }

    /// Where grain `index` (of the extent) is.
    pub fn lookup(&self, file: &dyn Storage, path: &Path, index: u64) -> Result<Grain> {
        let gt = index / self.gt_entries;
        let Some(at) = self.gt_offset(gt) else {
            return Err(ImageError::invalid(
                path,
                format!("grain {index} is past the grain directory"),
            ));
        };
        if at == 0 {
            return Ok(Grain::Unallocated);
        }
        let table = self.table(file, path, gt, at)?;
        Ok(table[(index % self.gt_entries) as usize])
    }

    /// The file offset of every allocated grain, for a writer's checks
    /// (`write`): each table read once (not cached), every entry checked
    /// as a lookup checks it, and each grain's end checked to be inside
    /// the file. More grains than the file can hold side by side means
    /// some overlap: refused there, so what is kept is bounded by the
    /// file's length.
    pub fn allocated(&self, file: &dyn Storage, path: &Path) -> Result<Vec<u64>> {
        let file_len = self.file_len.load(Ordering::Relaxed);
        let most = file_len / self.grain + 1;
        let size = self.codec.entry_size() as usize;
        let mut out = Vec::new();
        let mut raw = vec![0u8; self.table_bytes() as usize];
        for at in self.gt_offsets().into_iter().filter(|&at| at != 0) {
            read_exact_at(file, path, &mut raw, at, "VMDK grain table")?;
            for (i, e) in raw.chunks_exact(size).enumerate() {
                let entry_at = at + (i * size) as u64;
                let Grain::At(o) = self.decode(path, entry_at, e)? else {
                    continue;
                };
                if o + self.grain > file_len {
                    return Err(ImageError::corrupt(
                        path,
                        entry_at,
                        format!(
                            "grain at file offset {o} ({} bytes) runs past the end of the file ({file_len} bytes); not writable",
                            self.grain
                        ),
                    ));
                }
                if out.len() as u64 >= most {
                    return Err(ImageError::corrupt(
                        path,
                        entry_at,
                        format!("more grains than fit in the file ({file_len} bytes): some overlaps another; not writable"),
                    ));
                }
                out.push(o);
            }
        }
        Ok(out)
    }

    fn table(&self, file: &dyn Storage, path: &Path, gt: u64, at: u64) -> Result<Arc<Vec<Grain>>> {
        let generation = {
            let mut c = self.cache.lock();
            if let Some(t) = c.tables.get(&gt) {
                return Ok(t.clone());
            }
            c.generation
        };
        let mut raw = vec![0u8; self.table_bytes() as usize];
        read_exact_at(file, path, &mut raw, at, "VMDK grain table")?;
        let size = self.codec.entry_size() as usize;
        let mut out = Vec::with_capacity(self.gt_entries as usize);
        for (i, e) in raw.chunks_exact(size).enumerate() {
            let entry_at = at + (i * size) as u64;
            out.push(self.decode(path, entry_at, e)?);
        }
        let t = Arc::new(out);
        let mut c = self.cache.lock();
        if c.generation == generation {
            c.tables.put(gt, t.clone());
        }
        Ok(t)
    }

    fn decode(&self, path: &Path, entry_at: u64, e: &[u8]) -> Result<Grain> {
        let offset = match self.codec {
            EntryCodec::Sector32 { zero_grain } => {
                let v = u32::from_le_bytes(e.try_into().expect("4 bytes"));
                match v {
                    0 => return Ok(Grain::Unallocated),
                    1 if zero_grain => return Ok(Grain::Zero),
                    s => s as u64 * 512,
                }
            }
            EntryCodec::SeSparse { grains_at } => {
                let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                match v >> 60 {
                    0 if v == 0 => return Ok(Grain::Unallocated),
                    1 | 2 => return Ok(Grain::Zero),
                    3 => {
                        // The grain number is split: low 48 bits hold its
                        // high part, bits 48..60 its low 12 bits.
                        let n =
                            ((v & 0x0fff_0000_0000_0000) >> 48) | ((v & 0xffff_ffff_ffff) << 12);
                        n.checked_mul(self.grain)
                            .and_then(|b| b.checked_add(grains_at))
                            .unwrap_or(u64::MAX)
                    }
                    _ => {
                        return Err(ImageError::corrupt(
                            path,
                            entry_at,
                            format!("seSparse grain table entry {v:#018x} has an unknown type"),
                        ))
                    }
                }
            }
        };
        // Host offsets are `extent << 48 | offset` (`HOST_SHIFT`): a grain
        // reaching 2^48 would read into the next extent's window.
        if offset.saturating_add(self.grain) >= 1 << super::HOST_SHIFT {
            return Err(ImageError::corrupt(
                path,
                entry_at,
                format!(
                    "grain at file offset {offset} ({} bytes) ends at or past 2^48 bytes of the file",
                    self.grain
                ),
            ));
        }
        let file_len = self.file_len.load(Ordering::Relaxed);
        if offset < self.data_from || offset >= file_len {
            return Err(ImageError::corrupt(
                path,
                entry_at,
                format!(
                    "grain at file offset {offset} is outside the grain area [{}, {file_len}) of the file",
                    self.data_from
                ),
            ));
        }
        Ok(Grain::At(offset))
    }
}

/// Checks decoded grain-directory entries: each table inside the file and
/// past `data_from`-style metadata (`forbidden`), none shared by two
/// entries (a table two directory entries use would alias two ranges of
/// the disk). `gd_at` and `entry_size` locate entries for errors.
pub fn check_directory(
    path: &Path,
    gd: &[u64],
    gd_at: u64,
    entry_size: u64,
    table_bytes: u64,
    file_len: u64,
    forbidden: &[(u64, u64, &str)],
) -> Result<()> {
    let mut used: Vec<(u64, usize)> = Vec::new();
    for (i, &at) in gd.iter().enumerate() {
        if at == 0 {
            continue;
        }
        let entry_at = gd_at + i as u64 * entry_size;
        let end = at.saturating_add(table_bytes);
        if end > file_len {
            return Err(ImageError::corrupt(
                path,
                entry_at,
                format!("grain table at offset {at} extends past the end of the file ({file_len} bytes)"),
            ));
        }
        if let Some((_, _, what)) = forbidden.iter().find(|(s, e, _)| at < *e && end > *s) {
            return Err(ImageError::corrupt(
                path,
                entry_at,
                format!("grain table at offset {at} overlaps the {what}"),
            ));
        }
        used.push((at, i));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        if w[1].0 < w[0].0 + table_bytes {
            return Err(ImageError::corrupt(
                path,
                gd_at + w[1].1 as u64 * entry_size,
                format!(
                    "grain directory entries {} and {} use overlapping grain tables (at {} and {})",
                    w[0].1, w[1].1, w[0].0, w[1].0
                ),
            ));
        }
    }
    Ok(())
}
