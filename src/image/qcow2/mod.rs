//! qcow2 (versions 2 and 3) as a [`Layer`](crate::image::Layer).
//!
//! Layout of this module: `header` parses and validates the header and its
//! extensions; `l2` turns L1/L2 entries into mappings; `snapshot` reads the
//! internal snapshot table; `compress` inflates zlib/zstd clusters;
//! `refcount` and `write` are the allocating writer; `create` makes new
//! images. This file holds the open image and the read side.
//!
//! Concurrency: all metadata (L1, cached L2 tables, refcounts) sits behind
//! one `Mutex<Meta>`, held only for lookups and updates. Guest data is read
//! and written with `pread`/`pwrite` outside it. Writers are serialised by a
//! separate `write_lock`, so a writer can drop the metadata lock while it
//! copies data and be sure nobody changed the entries it planned on. Host
//! clusters are only ever appended, never reused within a session, so a
//! reader holding a host offset that a concurrent write just replaced still
//! reads the old, intact bytes.

mod at_snapshot;
pub mod compress;
#[cfg(test)]
mod cow_tests;
pub mod create;
pub mod driver;
pub mod header;
mod hostwrite;
pub mod l2;
pub mod rebase;
mod refcount;
pub mod repair;
pub mod snapshot;
mod snapshot_delete;
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
use header::Header;
use l2::{CompressedDesc, Entry, Geometry};
use lru::LruCache;
use parking_lot::Mutex;
use refcount::Refcounts;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of L2 tables kept cached per image.
const L2_CACHE_BYTES: u64 = 8 << 20;
/// Decompressed clusters kept per image.
const COMPRESSED_CACHE: usize = 8;
/// Dirty metadata beyond this is written out even without a flush, to
/// bound memory.
pub(crate) const MAX_DIRTY_BYTES: u64 = 64 << 20;

/// Mutable metadata state, behind `Qcow2Layer::meta`.
pub(crate) struct Meta {
    pub l1: Vec<u64>,
    pub l1_dirty: BTreeSet<usize>,
    pub l2_clean: LruCache<u64, Arc<Vec<u64>>>,
    pub l2_dirty: HashMap<u64, Arc<Vec<u64>>>,
    /// Bound for host offsets: the file length at open, or for a writer
    /// the end of everything allocated so far.
    pub file_end: u64,
    /// The writer's refcounts, loaded on first need (see `open`); always
    /// `None` for a read-only image.
    pub refs: Option<Refcounts>,
    /// Host ranges whose references were dropped from L2 tables in memory;
    /// their refcounts fall only after the new tables are on disk.
    pub pending_free: Vec<(u64, u64)>,
    pub data_written: bool,
    /// At an internal snapshot: `l1` is read on first use (see
    /// `at_snapshot`), so snapshots nobody reads cost no memory.
    pub l1_unloaded: bool,
}

pub struct Qcow2Layer {
    path: PathBuf,
    /// Shared with the layers of its internal snapshots (`at_snapshot`).
    file: Arc<dyn Storage>,
    header: Header,
    geom: Geometry,
    snapshots: Vec<snapshot::SnapshotEntry>,
    /// Guest offsets `map` answers for: the virtual size, or at an
    /// internal snapshot also its vmstate past the disk's end.
    map_limit: u64,
    /// Opened at an internal snapshot: read-only, and the image's locks
    /// belong to the layer of its current state (which shares `file`).
    at_snapshot: bool,
    /// Problems of each snapshot table entry found by comparing it with
    /// the others (duplicates, overlapping L1 tables), computed once.
    snapshot_checks: std::sync::OnceLock<Vec<Option<(u64, String)>>>,
    backing: Option<BackingRef>,
    writable: bool,
    meta: Mutex<Meta>,
    write_lock: Mutex<()>,
    compressed_cache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    /// Whether clusters were allocated without data (`preallocation=
    /// metadata`), decided on first use; see `detect_metadata_preallocation`.
    metadata_preallocation: std::sync::OnceLock<bool>,
    /// Autoclear features are cleared on the first write, not at open, so
    /// opening an image (which may turn out to be locked by a running VM)
    /// never changes it.
    autoclear_cleared: std::sync::atomic::AtomicBool,
}

impl Qcow2Layer {
    pub fn open(path: &Path, file: File, writable: bool) -> Result<Qcow2Layer> {
        Qcow2Layer::open_storage(path, Box::new(file), writable)
    }

    /// Opens the image held by `file` (any storage: memory in unit tests);
    /// `path` names it in errors.
    pub fn open_storage(path: &Path, file: Box<dyn Storage>, writable: bool) -> Result<Qcow2Layer> {
        let file: Arc<dyn Storage> = Arc::from(file);
        let header = Header::read(&*file, path)?;
        let geom = Geometry::new(&header);
        let len = fileio::file_len(&*file, path)?;
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        read_exact_at(
            &*file,
            path,
            &mut l1_bytes,
            header.l1_table_offset,
            "L1 table",
        )?;
        let l1 = header::decode_u64s(&l1_bytes);
        let snapshots = snapshot::read_snapshots(&*file, path, &header, len)?;
        let backing = header.backing_file.clone().map(|name| BackingRef {
            name,
            offset: header.backing_file_offset,
            format: header.backing_format.clone(),
        });
        let cache_tables = (L2_CACHE_BYTES / geom.cluster_size).max(16) as usize;
        let mut meta = Meta {
            l1,
            l1_dirty: BTreeSet::new(),
            l2_clean: crate::cache::lazy_lru(cache_tables),
            l2_dirty: HashMap::new(),
            file_end: len,
            refs: None,
            pending_free: Vec::new(),
            data_written: false,
            l1_unloaded: false,
        };
        if writable {
            write::check_writable(path, &header)?;
            meta.file_end = len.div_ceil(geom.cluster_size) * geom.cluster_size;
            // The refcount table (at least a cluster, 64 KiB by default) is
            // loaded by the first allocation or flush that needs it
            // (`write::refs_mut`), not here: most mounted leaves are never
            // written, and with thousands of them the tables were most of
            // the mount's memory.
        }
        Ok(Qcow2Layer {
            path: path.to_path_buf(),
            file,
            map_limit: header.size,
            header,
            geom,
            snapshots,
            at_snapshot: false,
            snapshot_checks: std::sync::OnceLock::new(),
            backing,
            writable,
            meta: Mutex::new(meta),
            write_lock: Mutex::new(()),
            compressed_cache: Mutex::new(crate::cache::lazy_lru(COMPRESSED_CACHE)),
            metadata_preallocation: std::sync::OnceLock::new(),
            autoclear_cleared: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The file's length now, rounded up to whole clusters (0 if unknown).
    fn current_end(&self) -> u64 {
        let cs = self.geom.cluster_size;
        fileio::file_len(&*self.file, &self.path).map_or(0, |l| l.div_ceil(cs) * cs)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// The L2 table for L1 index `i`, loaded into the cache if needed;
    /// `None` when the L1 entry is unallocated.
    fn l2_table(&self, meta: &mut Meta, i: usize) -> Result<Option<(u64, Arc<Vec<u64>>)>> {
        let l1_at = self.header.l1_table_offset + i as u64 * 8;
        if meta.l1_unloaded {
            at_snapshot::load_l1(self, meta)?;
        }
        if self.at_snapshot && i >= meta.l1.len() {
            // A snapshot's L1 may be shorter than its disk: the rest is
            // unallocated (QEMU pads it with zeros when it loads it).
            return Ok(None);
        }
        let entry = *meta.l1.get(i).ok_or_else(|| {
            ImageError::corrupt(
                &self.path,
                l1_at,
                format!("L1 index {i} beyond l1_size {}", meta.l1.len()),
            )
        })?;
        let off = entry & l2::L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let cs = self.geom.cluster_size;
        if off + cs > meta.file_end {
            meta.file_end = meta.file_end.max(self.current_end());
        }
        if !off.is_multiple_of(cs) || off < cs || off + cs > meta.file_end {
            return Err(ImageError::corrupt(
                &self.path,
                l1_at,
                format!(
                    "L1 entry {i} points to an L2 table at offset {off}, which is {} (file is {} bytes)",
                    if !off.is_multiple_of(cs) {
                        "not cluster aligned"
                    } else if off < cs {
                        "inside the header cluster"
                    } else {
                        "past the end of the file"
                    },
                    meta.file_end
                ),
            ));
        }
        if let Some(t) = meta.l2_dirty.get(&off) {
            return Ok(Some((off, t.clone())));
        }
        if let Some(t) = meta.l2_clean.get(&off) {
            return Ok(Some((off, t.clone())));
        }
        let mut bytes = vec![0u8; cs as usize];
        read_exact_at(&*self.file, &self.path, &mut bytes, off, "L2 table")?;
        let table = Arc::new(header::decode_u64s(&bytes));
        meta.l2_clean.put(off, table.clone());
        Ok(Some((off, table)))
    }

    /// The decoded entry for the guest cluster containing `guest`.
    fn entry_at(&self, meta: &mut Meta, guest: u64) -> Result<Entry> {
        match self.l2_table(meta, self.geom.l1_index(guest))? {
            None => Ok(Entry::Unallocated),
            Some((off, table)) => self.decode_entry(meta, off, &table, self.geom.l2_index(guest)),
        }
    }

    fn decode_entry(
        &self,
        meta: &Meta,
        table_off: u64,
        table: &[u64],
        idx: usize,
    ) -> Result<Entry> {
        let w = self.geom.words_per_entry as usize;
        let word = table[idx * w];
        let bitmap = if w == 2 { table[idx * w + 1] } else { 0 };
        let at = table_off + (idx * w * 8) as u64;
        l2::decode(&self.geom, &self.path, at, word, bitmap, meta.file_end).or_else(|e| {
            // Another descriptor (the merge engine's writer) may have
            // appended clusters since we looked: check against the file's
            // length now before calling the entry corrupt.
            let end = self.current_end();
            if end > meta.file_end {
                l2::decode(&self.geom, &self.path, at, word, bitmap, end)
            } else {
                Err(e)
            }
        })
    }

    /// Reads guest bytes this layer holds by mapping them afresh (used when
    /// a cluster changed under a reader). Falling through to the backing
    /// file cannot happen for a cluster that was just rewritten.
    fn read_current(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for e in self.map(offset, buf.len() as u64)? {
            let dst = &mut buf[(e.start - offset) as usize..(e.end() - offset) as usize];
            match e.mapping {
                Mapping::Data { host } => self.read_host(host, dst)?,
                Mapping::Zero => dst.fill(0),
                Mapping::Compressed { cluster_start } => {
                    let entry = {
                        let mut meta = self.meta.lock();
                        self.entry_at(&mut meta, cluster_start)?
                    };
                    let Entry::Compressed(desc) = entry else {
                        return Err(ImageError::invalid(&self.path, format!("cluster at guest offset {cluster_start} changed twice during one read")));
                    };
                    let data = self.inflate(desc)?;
                    let from = (e.start - cluster_start) as usize;
                    dst.copy_from_slice(&data[from..from + dst.len()]);
                }
                Mapping::Unallocated => {
                    return Err(ImageError::invalid(
                        &self.path,
                        format!(
                            "guest offset {} was rewritten as unallocated during a read",
                            e.start
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// QEMU's heuristic, followed so maps agree with `qemu-img map`: an
    /// image is metadata-preallocated when noticeably more clusters have
    /// refcounts than the filesystem has blocks for. Only then are holes in
    /// the file inside data clusters worth reporting as zeros.
    fn detect_metadata_preallocation(&self) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        // Storage without a file (memory) has no holes to compare with.
        let Some(file) = self.file.as_file() else {
            return Ok(false);
        };
        let m = file
            .metadata()
            .map_err(|e| ImageError::io(&self.path, "stat", 0, e))?;
        let cs = self.geom.cluster_size;
        let real_clusters = m.blocks() * 512 / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let mut refs = Refcounts::load(&*self.file, &self.path, &self.header, m.len())?;
        let mut count = 0;
        for c in 0..m.len().div_ceil(cs) {
            if count >= threshold {
                break;
            }
            if refs.get(&*self.file, &self.path, c, m.len())? > 0 {
                count += 1;
            }
        }
        Ok(count >= threshold)
    }

    /// Inflates the compressed cluster `desc`, through a small cache.
    fn inflate(&self, desc: CompressedDesc) -> Result<Arc<Vec<u8>>> {
        if let Some(c) = self.compressed_cache.lock().get(&desc.host) {
            return Ok(c.clone());
        }
        let mut raw = vec![0u8; desc.len as usize];
        fileio::read_at_zero_fill(&*self.file, &self.path, &mut raw, desc.host)?;
        let out = compress::inflate(
            self.header.compression_type,
            &raw,
            self.geom.cluster_size as usize,
        )
        .map_err(|why| {
            ImageError::corrupt(
                &self.path,
                desc.host,
                format!(
                    "compressed cluster ({} bytes) does not decompress: {why}",
                    desc.len
                ),
            )
        })?;
        let out = Arc::new(out);
        self.compressed_cache.lock().put(desc.host, out.clone());
        Ok(out)
    }
}

impl ReadMap for Qcow2Layer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn allocation_unit(&self) -> u64 {
        self.geom.cluster_size
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.path, self.map_limit, offset, len)?;
        let g = self.geom;
        let end = offset + len;
        let mut out = Vec::new();
        let mut meta = self.meta.lock();
        let mut at = offset;
        while at < end {
            let span_end = ((at / g.l2_span() + 1) * g.l2_span()).min(end);
            match self.l2_table(&mut meta, g.l1_index(at))? {
                None => push_extent(
                    &mut out,
                    Extent {
                        start: at,
                        len: span_end - at,
                        mapping: Mapping::Unallocated,
                    },
                ),
                Some((off, table)) => {
                    while at < span_end {
                        let cstart = at / g.cluster_size * g.cluster_size;
                        let cend = (cstart + g.cluster_size).min(span_end);
                        let entry = self.decode_entry(&meta, off, &table, g.l2_index(at))?;
                        l2::push_mappings(&g, &mut out, cstart, at, cend, &entry);
                        at = cend;
                    }
                }
            }
            at = span_end;
        }
        Ok(out)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        fileio::read_at_zero_fill(&*self.file, &self.path, buf, host)
    }

    fn host_segments(&self, host: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let preallocated = match self.metadata_preallocation.get() {
            Some(p) => *p,
            None => {
                let p = self.detect_metadata_preallocation()?;
                *self.metadata_preallocation.get_or_init(|| p)
            }
        };
        if !preallocated {
            return Ok(vec![(host, host + len, true)]);
        }
        fileio::data_segments(&*self.file, &self.path, host, host + len)
    }

    fn read_compressed(&self, cluster_start: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let entry = {
            let mut meta = self.meta.lock();
            self.entry_at(&mut meta, cluster_start)?
        };
        let Entry::Compressed(desc) = entry else {
            // A concurrent write rewrote the cluster since the caller mapped
            // it: read what it holds now (its old bytes or the new ones).
            return self.read_current(offset, buf);
        };
        let data = self.inflate(desc)?;
        let from = (offset - cluster_start) as usize;
        buf.copy_from_slice(&data[from..from + buf.len()]);
        Ok(())
    }

    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            file: self.path.clone(),
            format: Format::Qcow2,
            version: Some(self.header.version),
            virtual_size: self.header.size,
            cluster_size: Some(self.geom.cluster_size),
            file_size: fileio::file_len(&*self.file, &self.path)?,
            backing: self.backing.clone(),
            features: self.header.feature_list(),
            snapshots: self.snapshots.iter().map(|s| s.info.clone()).collect(),
        })
    }

    fn open_internal(&self, index: usize) -> Result<crate::image::InternalLayer> {
        at_snapshot::open(self, index)
    }
}

impl Writable for Qcow2Layer {
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write(&self, offset: u64, data: &[u8], below: &dyn BackingRead) -> Result<()> {
        self.write_data(offset, data, below)
    }

    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        self.zero_range(offset, len, below)
    }

    fn delete_internal(&self, id: &str) -> Result<()> {
        self.delete_snapshot(id)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _w = self.write_lock.lock();
        let mut meta = self.meta.lock();
        self.flush_locked(&mut meta)
    }
}

impl Identity for Qcow2Layer {}

impl Locking for Qcow2Layer {
    fn lock_storage(&self) -> Option<&dyn crate::storage::Storage> {
        // A snapshot's layer shares the image's descriptor: unlocking it
        // would drop the image's own locks.
        (!self.at_snapshot).then_some(&*self.file as &dyn Storage)
    }
}

impl Drop for Qcow2Layer {
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.flush() {
                tracing::error!("flushing {} on close: {e}", self.path.display());
            }
        }
    }
}
