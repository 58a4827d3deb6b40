//! VMDK (VMware's virtual disk, QEMU's `vmdk`) as a [`Layer`](crate::image::Layer):
//! monolithicSparse, twoGbMaxExtentSparse, monolithicFlat,
//! twoGbMaxExtentFlat, vmfs, streamOptimized, vmfsSparse and seSparse
//! read; hosted sparse and flat extents written (`write`); monolithicSparse
//! children created (`create`).
//!
//! Layout of this module: `descriptor` parses the descriptor text;
//! `sparse` the hosted sparse header (`KDMV`), its grain directories and
//! streamOptimized's footer; `cowd` ESXi's `COWD` deltas; `sesparse`
//! ESXi's seSparse; `tables` the grain directory/table lookups they share;
//! `extents` opens the extents a descriptor lists; `compressed` inflates
//! streamOptimized grains; `driver` registers the format. This file holds
//! the open disk and turns guest ranges into mappings.
//!
//! A disk is a list of extents, each in its own file (a monolithicSparse
//! disk is one extent in the file that also holds its descriptor). A
//! layer's `Mapping::Data { host }` is an offset in *one* address space,
//! so a VMDK gives each extent file its own window of it: extent `i`'s
//! file offset `o` is host `i << 48 | o` (`HOST_SHIFT`), and `read_host`
//! and `host_segments` decode it. A single-extent sparse disk's host
//! offsets are therefore plain file offsets, as `qemu-img map` shows
//! them. The chain never looks inside host offsets, it only adds to them
//! within a run, and a run never crosses a window (no extent reaches
//! 2^48 bytes of its file: flat extents are checked at open, sparse
//! grains as their tables are decoded, `tables`).
//!
//! A child names its parent by `parentFileNameHint` (`backing()`, format
//! `vmdk`) and records the parent's `CID` as `parentCID`; `driver` checks
//! it against the parent when the child is opened ("parent CID
//! mismatch"), and `Identity` exposes both so the chain checks them too.

pub mod compressed;
pub mod cowd;
pub mod create;
pub mod descriptor;
pub mod driver;
pub mod extents;
pub mod merging;
pub mod reparent;
pub mod sesparse;
pub mod shared;
pub mod sparse;
pub mod tables;
mod write;

#[cfg(test)]
mod tests;

use crate::error::{ImageError, Result};
use crate::fileio;
use crate::image::storage::Storage;
use crate::image::{
    check_range, push_extent, BackingRead, BackingRef, Extent, Format, LayerInfo, Mapping,
};
use crate::image::{Identity, Locking, ReadMap, Writable};
use descriptor::Descriptor;
use extents::{ExtentFiles, ExtentKind, OpenExtent};
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tables::Grain;

/// Bits of a host offset that are the offset inside an extent file.
pub const HOST_SHIFT: u32 = 48;

/// The 16-byte identity a CID is given for `Identity` (the chain compares
/// them as opaque ids).
pub fn cid_id(cid: u32) -> [u8; 16] {
    let mut id = *b"VMDK-CID\0\0\0\0\0\0\0\0";
    id[8..12].copy_from_slice(&cid.to_be_bytes());
    id
}

pub struct VmdkLayer {
    path: PathBuf,
    /// The file opened as the image: the descriptor, or the
    /// monolithicSparse/streamOptimized file holding it. Locks go here.
    file: Arc<dyn Storage>,
    desc: Descriptor,
    /// Where the descriptor is in `file`, and its length.
    desc_at: u64,
    desc_len: u64,
    /// The disk's CID now (a first write changes it).
    cid: AtomicU32,
    extents: Vec<OpenExtent>,
    size: u64,
    backing: Option<BackingRef>,
    compressed: compressed::GrainCache,
    /// The writer's state, for a disk opened for writing (see `write`).
    writer: Option<Mutex<write::Writer>>,
}

impl VmdkLayer {
    /// Opens the VMDK held by `file` (its descriptor, or a sparse extent
    /// embedding one); extent files are opened through `files`. `path`
    /// names it in errors. `writable`: refused unless every extent can be
    /// written (see `write`); `file` and `files` must then be writable.
    pub fn open_storage(
        path: &Path,
        file: Arc<dyn Storage>,
        files: &dyn ExtentFiles,
        writable: bool,
    ) -> Result<VmdkLayer> {
        let file_len = fileio::file_len(&*file, path)?;
        let mut magic = [0u8; 4];
        if file_len >= 4 {
            fileio::read_exact_at(&*file, path, &mut magic, 0, "VMDK magic")?;
        }
        let (desc, desc_at, desc_len, extents) = if &magic == sparse::MAGIC {
            extents::open_monolithic(path, &file, file_len)?
        } else if &magic == cowd::MAGIC || magic == sesparse::MAGIC_BYTES[..4] {
            return Err(ImageError::unsupported(
                path,
                "a vmfsSparse/seSparse extent has no descriptor of its own: open the descriptor that names it",
            ));
        } else {
            let text = read_descriptor_file(&*file, path, file_len)?;
            let desc = descriptor::parse(path, 0, &text)?;
            let extents = extents::open_listed(path, &desc, files)?;
            (desc, 0, file_len, extents)
        };
        let size = extents.last().map_or(0, |e| e.start + e.len);
        if size == 0 {
            return Err(ImageError::corrupt(
                path,
                desc_at,
                "the descriptor lists no extents",
            ));
        }
        let backing = desc.parent_hint.as_ref().map(|name| BackingRef {
            name: name.clone(),
            offset: desc_at + desc.parent_hint_at,
            format: Some("vmdk".to_string()),
        });
        let writer = if writable {
            if let Some(why) = extents.iter().find_map(write::refuse_reason) {
                return Err(ImageError::unsupported(path, format!("read-only: {why}")));
            }
            write::check_distinct_files(path, &*file, &extents)?;
            if let Some(dir) = files.directory() {
                shared::check_writable(path, &*file, &extents, dir)?;
            }
            Some(Mutex::new(write::Writer::new(&extents)?))
        } else {
            None
        };
        Ok(VmdkLayer {
            path: path.to_path_buf(),
            file,
            cid: AtomicU32::new(desc.cid),
            desc,
            desc_at,
            desc_len,
            extents,
            size,
            backing,
            compressed: compressed::GrainCache::new(),
            writer,
        })
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.desc
    }

    /// The extent holding guest `offset` (inside the disk).
    fn extent_at(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= offset)
    }

    fn map_extent(&self, i: usize, from: u64, to: u64, out: &mut Vec<Extent>) -> Result<()> {
        let e = &self.extents[i];
        let window = (i as u64) << HOST_SHIFT;
        let mut push = |start: u64, end: u64, mapping: Mapping| {
            push_extent(
                out,
                Extent {
                    start,
                    len: end - start,
                    mapping,
                },
            )
        };
        match &e.kind {
            ExtentKind::Zero => push(from, to, Mapping::Zero),
            ExtentKind::Flat { offset } => push(
                from,
                to,
                Mapping::Data {
                    host: window | (offset + (from - e.start)),
                },
            ),
            ExtentKind::Sparse(t) => {
                let mut at = from;
                while at < to {
                    let rel = at - e.start;
                    let index = rel / t.grain;
                    let gstart = e.start + index * t.grain;
                    let gend = (gstart + t.grain).min(to);
                    let file = e.file.as_deref().expect("sparse extents have a file");
                    let mapping = match t.lookup(file, &e.path, index)? {
                        Grain::Unallocated => Mapping::Unallocated,
                        Grain::Zero => Mapping::Zero,
                        Grain::At(_) if e.compressed => Mapping::Compressed {
                            cluster_start: gstart,
                        },
                        Grain::At(o) => Mapping::Data {
                            host: window | (o + (at - gstart)),
                        },
                    };
                    push(at, gend, mapping);
                    at = gend;
                }
            }
        }
        Ok(())
    }

    /// The extent and file offset a host offset stands for.
    fn decode_host(&self, host: u64) -> Result<(&OpenExtent, u64)> {
        let i = (host >> HOST_SHIFT) as usize;
        let off = host & ((1 << HOST_SHIFT) - 1);
        match self.extents.get(i) {
            Some(e) if e.file.is_some() => Ok((e, off)),
            _ => Err(ImageError::invalid(
                &self.path,
                format!("host offset {host:#x} names no extent file"),
            )),
        }
    }

    fn features(&self) -> Vec<String> {
        let d = &self.desc;
        let mut out = vec![
            format!("createType {}", d.create_type),
            format!("CID {:08x}", self.cid.load(Ordering::Relaxed)),
        ];
        if d.has_parent() {
            out.push(format!("parentCID {:08x}", d.parent_cid));
        }
        for (k, label) in [
            ("adapterType", "adapter"),
            ("virtualHWVersion", "virtual hardware version"),
        ] {
            if let Some(v) = d.ddb(k) {
                out.push(format!("{label} {v}"));
            }
        }
        if let (Some(c), Some(h), Some(s)) = (
            d.ddb("geometry.cylinders"),
            d.ddb("geometry.heads"),
            d.ddb("geometry.sectors"),
        ) {
            out.push(format!("geometry {c}/{h}/{s}"));
        }
        out.push(format!("{} extents", self.extents.len()));
        for e in self.extents.iter().take(8) {
            out.push(e.describe());
        }
        out
    }
}

/// A descriptor file's text, bounded.
fn read_descriptor_file(file: &dyn Storage, path: &Path, len: u64) -> Result<Vec<u8>> {
    if len > descriptor::MAX_DESCRIPTOR_BYTES {
        return Err(ImageError::corrupt(
            path,
            0,
            format!(
                "a VMDK descriptor file of {len} bytes (at most {} are read)",
                descriptor::MAX_DESCRIPTOR_BYTES
            ),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    fileio::read_exact_at(file, path, &mut buf, 0, "VMDK descriptor")?;
    Ok(buf)
}

impl ReadMap for VmdkLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<&BackingRef> {
        self.backing.as_ref()
    }

    fn allocation_unit(&self) -> u64 {
        self.extents
            .iter()
            .filter_map(|e| e.grain())
            .max()
            .unwrap_or(512)
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.path, self.size, offset, len)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        let mut i = self.extent_at(offset);
        while at < end {
            let e = &self.extents[i];
            let to = (e.start + e.len).min(end);
            self.map_extent(i, at, to, &mut out)?;
            at = to;
            i += 1;
        }
        Ok(out)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        let (e, off) = self.decode_host(host)?;
        let file = e.file.as_deref().expect("checked");
        fileio::read_at_zero_fill(file, &e.path, buf, off)
    }

    /// Holes in a flat extent's file read as zeros and are reported so
    /// (QEMU looks into flat extents too); sparse grains are data.
    fn host_segments(&self, host: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let (e, off) = self.decode_host(host)?;
        if !matches!(e.kind, ExtentKind::Flat { .. }) {
            return Ok(vec![(host, host + len, true)]);
        }
        let base = host - off;
        let file = e.file.as_deref().expect("checked");
        Ok(fileio::data_segments(file, &e.path, off, off + len)?
            .into_iter()
            .map(|(s, t, d)| (base + s, base + t, d))
            .collect())
    }

    fn read_compressed(&self, cluster_start: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let i = self.extent_at(cluster_start);
        let e = self.extents.get(i).ok_or_else(|| {
            ImageError::invalid(&self.path, format!("no extent at {cluster_start}"))
        })?;
        self.compressed.read(i, e, cluster_start, offset, buf)
    }

    fn info(&self) -> Result<LayerInfo> {
        let mut file_size = fileio::file_len(&*self.file, &self.path)?;
        for e in &self.extents {
            if let Some(f) = &e.file {
                if !e.same_as_image {
                    file_size += fileio::file_len(&**f, &e.path)?;
                }
            }
        }
        Ok(LayerInfo {
            file: self.path.clone(),
            format: Format::Vmdk,
            version: Some(self.desc.version.max(1)),
            virtual_size: self.size,
            cluster_size: self.extents.iter().find_map(|e| e.grain()),
            file_size,
            backing: self.backing.clone(),
            features: self.features(),
            snapshots: Vec::new(),
        })
    }
}

impl Writable for VmdkLayer {
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

    /// A merge's writer keeps the CID its children (or, for a hidden
    /// image, its child) check: no new CID on the first write.
    fn keep_identity(&self) {
        if let Some(w) = &self.writer {
            w.lock().keep_cid();
        }
    }
}

impl Drop for VmdkLayer {
    fn drop(&mut self) {
        if let Err(e) = self.flush_writes() {
            tracing::error!("flushing {} on close: {e}", self.path.display());
        }
    }
}

impl Identity for VmdkLayer {
    fn unique_id(&self) -> Option<[u8; 16]> {
        Some(cid_id(self.cid.load(Ordering::Relaxed)))
    }

    fn expected_parent_id(&self) -> Option<[u8; 16]> {
        (self.backing.is_some() && self.desc.parent_cid != descriptor::NO_PARENT)
            .then(|| cid_id(self.desc.parent_cid))
    }
}

impl Locking for VmdkLayer {
    fn lock_storage(&self) -> Option<&dyn crate::storage::Storage> {
        Some(&*self.file)
    }
}

impl VmdkLayer {
    /// Where the descriptor starts in the image file.
    pub fn descriptor_offset(&self) -> u64 {
        self.desc_at
    }
}
