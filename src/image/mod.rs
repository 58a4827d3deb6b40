//! Image formats as *layers*: one source of bytes that knows which guest
//! ranges it holds.
//!
//! An open image is a [`Layer`]: the sum of small capability traits —
//! [`ReadMap`] (reading and mapping), [`Writable`], [`Identity`] (ids
//! children check), [`Locking`] — each format implementing what it can
//! and keeping the defaults for the rest. What is done to an image file by
//! path (re-pointing its backing reference in one atomic step, adopting an
//! identity, repair after a crash, creating a child, the merge directions
//! it allows) is a capability of its driver in [`formats`], where formats
//! are registered; [`formats`] also lists the files a new format touches.
//!
//! Every format (qcow2, raw, VHD) implements [`ReadMap`]. A layer answers
//! `map(range)` with extents that say where each guest byte lives *in this
//! layer only* — at a host offset, in a compressed cluster, as zeros, or not
//! here at all (fall through to the backing layer). Everything above this
//! module (chain resolution, the mount, merges) works on that answer and
//! never parses a format itself.
//!
//! A format reads and writes its bytes through [`storage::Storage`]: the
//! image's `File` in production (the same `pread`s as ever), memory in
//! the formats' unit tests (`open_storage` constructors; images built in
//! a [`storage::MemStorage`]).
//!
//! Concurrency: layers are `Send + Sync`; metadata lookups take a short
//! internal lock, data reads are `pread`s on the layer's file without it.

pub mod formats;
pub mod lock;
pub mod overlay;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod repoint;
/// Where formats keep their bytes (a file, or memory in tests); a crate-level
/// module so `fileio` can use it without depending on `image`.
pub use crate::storage;
#[cfg(test)]
pub mod testutil;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use crate::error::{ImageError, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where a guest range lives within one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Plain bytes at this host offset of the layer's file.
    Data { host: u64 },
    /// Inside a compressed cluster; `cluster_start` is the guest offset where
    /// that cluster begins, so the layer can find and inflate it.
    Compressed { cluster_start: u64 },
    /// Reads as zeros, decided by this layer (zero cluster, hole in a raw file).
    Zero,
    /// This layer does not hold the range: ask the backing layer.
    Unallocated,
}

/// A guest range with one mapping; `host` of `Data` belongs to `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
    pub mapping: Mapping,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Appends `e` to `out`, merging it into the previous extent when both are
/// the same kind and (for data) contiguous on the host.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == e.start {
            let merged = match (last.mapping, e.mapping) {
                (Mapping::Data { host: a }, Mapping::Data { host: b }) => a + last.len == b,
                (Mapping::Zero, Mapping::Zero) => true,
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                _ => false,
            };
            if merged {
                last.len += e.len;
                return;
            }
        }
    }
    out.push(e);
}

/// Formats snaptree can open; each has a driver in [`formats::FORMATS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
    /// VHD, by QEMU's name for it.
    #[serde(rename = "vpc")]
    Vhd,
    /// VHDX and AVHDX (Hyper-V).
    Vhdx,
    /// VMware's VMDK (every kind QEMU reads; hosted sparse and flat written).
    Vmdk,
}

impl Format {
    /// QEMU's name for it (what backing-format fields record).
    pub fn name(self) -> &'static str {
        self.driver().names()[0]
    }

    /// The format named in a backing-format header field.
    pub fn from_name(name: &str) -> Option<Format> {
        formats::FORMATS
            .iter()
            .find(|d| d.names().contains(&name))
            .map(|d| d.format())
    }
}

/// The backing file an image names, as written in the image.
#[derive(Clone, Debug, Serialize)]
pub struct BackingRef {
    pub name: String,
    /// Where the name is stored in the image file (for error messages).
    pub offset: u64,
    /// The format recorded with it, if the image records one.
    pub format: Option<String>,
}

/// An internal (qcow2) snapshot, listed by `snaptree info`.
#[derive(Clone, Debug, Serialize)]
pub struct InternalSnapshot {
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    /// Nanoseconds part of the creation date.
    pub date_nsec: u32,
    /// Instructions counted at the snapshot (record/replay), if recorded.
    pub icount: Option<u64>,
}

/// An internal snapshot opened read-only (see [`ReadMap::open_internal`]):
/// its disk as a layer of its own (mapping through the snapshot's tables;
/// what it does not hold falls through to the image's backing chain), and
/// its saved VM state, if any, as bytes read in place.
pub struct InternalLayer {
    pub disk: std::sync::Arc<dyn Layer>,
    /// The vmstate (a QEMU migration stream) as read-only storage whose
    /// offset 0 is the stream's first byte; `None` when the snapshot has none.
    pub vmstate: Option<std::sync::Arc<dyn storage::Storage>>,
}

/// Static facts about one layer, for `info`.
#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    pub file: PathBuf,
    pub format: Format,
    pub version: Option<u32>,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    pub file_size: u64,
    pub backing: Option<BackingRef>,
    pub features: Vec<String>,
    pub snapshots: Vec<InternalSnapshot>,
}

/// Reads of the flattened view *below* a layer: what copy-on-write of a
/// partial cluster copies from.
pub trait BackingRead {
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A view with nothing below it: reads zeros.
pub struct NoBacking;

impl BackingRead for NoBacking {
    fn read_below(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// Reading and mapping: what every layer does. The chain's read path
/// calls only these (`map`, `read_host`, `read_compressed`), through the
/// one `dyn Layer` vtable it always used.
pub trait ReadMap: Send + Sync {
    fn path(&self) -> &Path;

    fn format(&self) -> Format;

    fn virtual_size(&self) -> u64;

    fn backing(&self) -> Option<&BackingRef>;

    /// The unit in which this layer allocates: a write anywhere inside one
    /// may change the mapping of all of it (copy-on-write of a cluster).
    fn allocation_unit(&self) -> u64 {
        1
    }

    /// Extents covering exactly `[offset, offset+len)`, which must lie inside
    /// the virtual size, in ascending order.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Reads `buf.len()` bytes at `host` of this layer's file (a `Data`
    /// mapping); never takes the metadata lock.
    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()>;

    /// Splits host range `[host, host+len)` into (start, end, is_data)
    /// pieces: holes in the file read as zeros even inside data clusters
    /// (preallocated images). Used for maps, not for reads.
    fn host_segments(&self, host: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        Ok(vec![(host, host + len, true)])
    }

    /// Reads guest bytes at `offset` from the compressed cluster that starts
    /// at guest offset `cluster_start`.
    fn read_compressed(&self, cluster_start: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (cluster_start, offset, buf);
        Err(ImageError::unsupported(
            self.path(),
            "this format has no compressed clusters",
        ))
    }

    fn info(&self) -> Result<LayerInfo>;

    /// Opens internal snapshot `index` (of `info().snapshots`) read-only,
    /// after checking its tables against the file and the other snapshots;
    /// the error names the image, the offset and what is wrong. Formats
    /// without internal snapshots keep the default, which refuses.
    fn open_internal(&self, index: usize) -> Result<InternalLayer> {
        Err(ImageError::unsupported(
            self.path(),
            format!("internal snapshot {index}: this format has none"),
        ))
    }

    /// Guest bytes this layer itself holds (data, compressed or zero-marked).
    fn allocated_bytes(&self) -> Result<u64> {
        let mut total = 0;
        let size = self.virtual_size();
        let step = 1u64 << 30;
        let mut at = 0;
        while at < size {
            let len = step.min(size - at);
            for e in self.map(at, len)? {
                if e.mapping != Mapping::Unallocated {
                    total += e.len;
                }
            }
            at += len;
        }
        Ok(total)
    }
}

/// Writing guest bytes into a layer opened for writing; read-only
/// layers keep the defaults, which refuse.
pub trait Writable: ReadMap {
    fn is_writable(&self) -> bool {
        false
    }

    /// Writes guest bytes; partial clusters are completed from `below`.
    fn write(&self, offset: u64, data: &[u8], below: &dyn BackingRead) -> Result<()> {
        let _ = (offset, data, below);
        Err(ImageError::invalid(self.path(), "image is open read-only"))
    }

    /// Makes the range read as zeros, releasing storage where the format can
    /// (zero clusters, holes). Used for both zero writes and discards.
    fn write_zeroes(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        let _ = (offset, len, below);
        Err(ImageError::invalid(self.path(), "image is open read-only"))
    }

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// The writes that follow change no byte a visible reader sees (a
    /// merge's copies): keep the identity children check, which a format
    /// may otherwise renew on the first write (a VMDK's CID).
    fn keep_identity(&self) {}

    /// Deletes the internal snapshot with this ID (`InternalSnapshot::id`)
    /// from the image, freeing what only it used; formats without internal
    /// snapshots keep the default, which refuses.
    fn delete_internal(&self, id: &str) -> Result<()> {
        Err(ImageError::invalid(
            self.path(),
            format!("internal snapshot {id:?}: this image cannot delete internal snapshots"),
        ))
    }
}

/// Identity a format records for its children to check (a VHD's unique
/// id; a VMDK's CID would go here). Formats without one keep the defaults.
pub trait Identity: ReadMap {
    /// The id this image carries for its children to check (a VHD's
    /// footer unique id), if the format has one.
    fn unique_id(&self) -> Option<[u8; 16]> {
        None
    }

    /// The id the backing image must carry (a differencing VHD's
    /// parent_unique_id); checked when the chain is opened.
    fn expected_parent_id(&self) -> Option<[u8; 16]> {
        None
    }
}

/// QEMU-compatible image locks (see [`lock`]); formats whose files are
/// never shared keep the no-op defaults.
pub trait Locking: ReadMap {
    /// The storage whose file carries the locks; `None` (the default):
    /// nothing to lock.
    fn lock_storage(&self) -> Option<&dyn crate::storage::Storage> {
        None
    }

    /// Takes QEMU-compatible locks on the image file (see `lock`).
    fn lock(&self, mode: lock::LockMode) -> Result<(), lock::LockError> {
        self.lock_storage()
            .map_or(Ok(()), |s| lock::acquire(s, mode))
    }

    /// Drops the locks taken by `lock`.
    fn unlock(&self) {
        if let Some(s) = self.lock_storage() {
            lock::release(s)
        }
    }
}

/// One source of bytes in a chain, with every capability an open image
/// has (see the module docs). Implemented for any type that has them all:
/// a format implements the four traits above, and `Arc<dyn Layer>` calls
/// any of their methods through one vtable, as before the split.
pub trait Layer: ReadMap + Writable + Identity + Locking + Send + Sync {}

impl<T: ReadMap + Writable + Identity + Locking + Send + Sync> Layer for T {}

/// Checks that `[offset, offset+len)` lies inside a layer of `size` bytes.
pub fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::invalid(
            path,
            format!("request at offset {offset}, length {len} is outside the virtual size {size}"),
        )),
    }
}
