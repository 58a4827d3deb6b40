//! A qcow2 image opened *at* one of its internal snapshots, read-only: the
//! same file, header and storage as the image, but the snapshot's own L1
//! table and disk size, so its disk reads what `qemu-img convert -l TAG`
//! reads (what the snapshot does not hold falls through to the image's
//! backing chain, as in the active state). Its saved VM state (a QEMU
//! migration stream) lies in the same guest address space past the end of
//! the disk, at the first L1-entry boundary after the disk size (QEMU's
//! `qcow2_vm_state_offset`), and is served as read-only [`Storage`] that
//! maps through the snapshot's tables on every read: never copied out.
//!
//! The snapshot table comes from whoever wrote the image: before a
//! snapshot is opened its entry is checked against the file and the
//! other metadata (L1 alignment and bounds, overlap with the header,
//! the active L1, the refcount table, the snapshot table and earlier
//! snapshots' L1 tables, every L1 entry's L2 offset, the vmstate's extent,
//! duplicate ids and names). A failed check names the image, the offset of
//! the field and what is wrong; the image and its other snapshots are
//! unaffected. Nothing here writes.

use super::header::{self, MAX_L1_BYTES};
use super::snapshot::SnapshotEntry;
use super::{l2, Qcow2Layer};
use crate::error::{ImageError, Result};
use crate::fileio::{self, read_exact_at};
use crate::image::storage::Storage;
use crate::image::{InternalLayer, Mapping, ReadMap};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

/// Where a snapshot's vmstate starts: the first guest offset past a disk
/// of `disk_size` bytes that begins a new L2 table's span.
pub(super) fn vm_state_offset(l2_span: u64, disk_size: u64) -> u64 {
    disk_size.div_ceil(l2_span).saturating_mul(l2_span)
}

/// Opens snapshot `index` of `image` (see the module docs).
pub(super) fn open(image: &Qcow2Layer, index: usize) -> Result<InternalLayer> {
    let path = &image.path;
    let sn = image
        .snapshots
        .get(index)
        .ok_or_else(|| ImageError::invalid(path, format!("no internal snapshot number {index}")))?;
    check_unique(image, index)?;
    let file_len = fileio::file_len(&*image.file, path)?;
    let g = image.geom;
    let disk_size = sn.info.disk_size.unwrap_or(image.header.size);
    let vm_off = vm_state_offset(g.l2_span(), disk_size);
    let vm_end = vm_off.checked_add(sn.info.vm_state_size);
    let l1_cover = sn.l1_size as u64 * g.l2_span();
    let max_entries = MAX_L1_BYTES / 8;
    if disk_size.div_ceil(g.l2_span()) > max_entries {
        return Err(bad_in(image, sn, 8, format!("disk size {disk_size} needs an L1 table larger than QEMU's limit of {MAX_L1_BYTES} bytes")));
    }
    match vm_end {
        Some(end) if sn.info.vm_state_size == 0 || end <= l1_cover => {}
        _ => {
            return Err(bad_in(image, sn, 32, format!(
                "vm_state_size {} at guest offset {vm_off} runs past what its L1 table of {} entries can hold ({l1_cover} bytes)",
                sn.info.vm_state_size, sn.l1_size
            )))
        }
    }
    check_l1_place(image, index, file_len)?;
    let l1 = read_l1(image, sn, file_len, disk_size)?;
    let mut h = image.header.clone();
    h.l1_table_offset = sn.l1_offset;
    h.l1_size = l1.len() as u32;
    h.size = disk_size;
    let map_limit = if sn.info.vm_state_size > 0 {
        vm_end.unwrap_or(disk_size).max(disk_size)
    } else {
        disk_size
    };
    let layer = Arc::new(snapshot_layer(image, h, l1, map_limit, file_len));
    let vmstate = (sn.info.vm_state_size > 0).then(|| {
        Arc::new(VmState {
            layer: layer.clone(),
            base: vm_off,
            len: sn.info.vm_state_size,
        }) as Arc<dyn Storage>
    });
    Ok(InternalLayer {
        disk: layer,
        vmstate,
    })
}

/// A corrupt-field error for snapshot `sn`'s entry in `image`, at the
/// field `field` bytes into the entry.
fn bad_in(image: &Qcow2Layer, sn: &SnapshotEntry, field: u64, what: String) -> ImageError {
    ImageError::corrupt(
        &image.path,
        sn.entry_at + field,
        format!(
            "internal snapshot {:?} (id {:?}): {what}",
            sn.info.name, sn.info.id
        ),
    )
}

/// Refuses a snapshot whose id or name an earlier entry has already.
fn check_unique(image: &Qcow2Layer, index: usize) -> Result<()> {
    let sn = &image.snapshots[index];
    for (i, o) in image.snapshots[..index].iter().enumerate() {
        let what = if o.info.id == sn.info.id {
            format!("its id is also the id of snapshot entry {i}")
        } else if o.info.name == sn.info.name {
            format!("its name is also the name of snapshot entry {i}")
        } else {
            continue;
        };
        return Err(bad_in(image, sn, 12, what));
    }
    Ok(())
}

/// The L1 table must be cluster aligned, inside the file, and overlap no
/// other metadata (header cluster, active L1, refcount table, snapshot
/// table, an earlier snapshot's L1).
fn check_l1_place(image: &Qcow2Layer, index: usize, file_len: u64) -> Result<()> {
    let sn = &image.snapshots[index];
    let h = &image.header;
    let cs = image.geom.cluster_size;
    let bytes = sn.l1_size as u64 * 8;
    let (off, end) = (sn.l1_offset, sn.l1_offset.saturating_add(bytes));
    if bytes > MAX_L1_BYTES {
        return Err(bad_in(
            image,
            sn,
            8,
            format!("L1 table of {bytes} bytes exceeds QEMU's limit of {MAX_L1_BYTES}"),
        ));
    }
    if !off.is_multiple_of(cs) || off < cs || end > file_len {
        let why = if !off.is_multiple_of(cs) {
            "is not cluster aligned".to_string()
        } else if off < cs {
            "is inside the header cluster".to_string()
        } else {
            format!("runs past the end of the file ({file_len} bytes)")
        };
        return Err(bad_in(
            image,
            sn,
            0,
            format!("L1 table at offset {off} ({bytes} bytes) {why}"),
        ));
    }
    let table_start = image.snapshots.first().map_or(0, |s| s.entry_at);
    let table_end = image
        .snapshots
        .last()
        .map_or(0, |s| s.entry_at + s.entry_len);
    let mut others = vec![
        (
            "the active L1 table".to_string(),
            h.l1_table_offset,
            h.l1_size as u64 * 8,
        ),
        (
            "the refcount table".to_string(),
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        ),
        (
            "the snapshot table".to_string(),
            table_start,
            table_end - table_start,
        ),
    ];
    for (i, o) in image.snapshots[..index].iter().enumerate() {
        others.push((
            format!("the L1 table of snapshot entry {i}"),
            o.l1_offset,
            o.l1_size as u64 * 8,
        ));
    }
    for (what, o_off, o_len) in others {
        if bytes > 0 && o_len > 0 && off < o_off.saturating_add(o_len) && o_off < end {
            return Err(bad_in(
                image,
                sn,
                0,
                format!(
                    "L1 table at offset {off} ({bytes} bytes) overlaps {what} at offset {o_off}"
                ),
            ));
        }
    }
    Ok(())
}

/// Reads the snapshot's L1 table, checks every L2 offset in it, and pads
/// it with unallocated entries to cover a disk of `disk_size` bytes.
fn read_l1(
    image: &Qcow2Layer,
    sn: &SnapshotEntry,
    file_len: u64,
    disk_size: u64,
) -> Result<Vec<u64>> {
    let cs = image.geom.cluster_size;
    let mut bytes = vec![0u8; sn.l1_size as usize * 8];
    read_exact_at(
        &*image.file,
        &image.path,
        &mut bytes,
        sn.l1_offset,
        "snapshot L1 table",
    )?;
    let mut l1 = header::decode_u64s(&bytes);
    for (i, e) in l1.iter().enumerate() {
        let l2 = e & l2::L1E_OFFSET_MASK;
        if l2 != 0 && (!l2.is_multiple_of(cs) || l2 < cs || l2.saturating_add(cs) > file_len) {
            return Err(ImageError::corrupt(
                &image.path,
                sn.l1_offset + i as u64 * 8,
                format!(
                    "internal snapshot {:?}: L1 entry {i} points to an L2 table at offset {l2}, which is misaligned, in the header cluster or past the end of the file ({file_len} bytes)",
                    sn.info.name
                ),
            ));
        }
    }
    let needed = disk_size.div_ceil(image.geom.l2_span()) as usize;
    if l1.len() < needed {
        l1.resize(needed, 0);
    }
    Ok(l1)
}

/// A read-only layer over `image`'s storage with header `h` (the
/// snapshot's L1 and size) and L1 table `l1`.
fn snapshot_layer(
    image: &Qcow2Layer,
    h: header::Header,
    l1: Vec<u64>,
    map_limit: u64,
    file_len: u64,
) -> Qcow2Layer {
    let geom = super::l2::Geometry::new(&h);
    let cache_tables = (super::L2_CACHE_BYTES / geom.cluster_size).max(16) as usize;
    Qcow2Layer {
        path: image.path.clone(),
        file: image.file.clone(),
        header: h,
        geom,
        snapshots: image.snapshots.clone(),
        map_limit,
        at_snapshot: true,
        backing: image.backing.clone(),
        writable: false,
        meta: Mutex::new(super::Meta {
            l1,
            l1_dirty: Default::default(),
            l2_clean: crate::cache::lazy_lru(cache_tables),
            l2_dirty: Default::default(),
            file_end: file_len,
            refs: None,
            pending_free: Vec::new(),
            data_written: false,
        }),
        write_lock: Mutex::new(()),
        compressed_cache: Mutex::new(crate::cache::lazy_lru(super::COMPRESSED_CACHE)),
        metadata_preallocation: std::sync::OnceLock::new(),
        autoclear_cleared: std::sync::atomic::AtomicBool::new(false),
    }
}

/// A snapshot's vmstate: `len` bytes at guest offset `base` of `layer`,
/// read through its mapping (what the snapshot does not hold reads as
/// zeros: the vmstate never comes from a backing file).
struct VmState {
    layer: Arc<Qcow2Layer>,
    base: u64,
    len: u64,
}

fn to_io(e: ImageError) -> io::Error {
    io::Error::other(e.to_string())
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl Storage for VmState {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (self.len - offset).min(buf.len() as u64);
        let at = self.base + offset;
        let buf = &mut buf[..n as usize];
        for e in self.layer.map(at, n).map_err(to_io)? {
            let dst = &mut buf[(e.start - at) as usize..(e.end() - at) as usize];
            match e.mapping {
                Mapping::Data { host } => self.layer.read_host(host, dst).map_err(to_io)?,
                Mapping::Compressed { cluster_start } => self
                    .layer
                    .read_compressed(cluster_start, e.start, dst)
                    .map_err(to_io)?,
                Mapping::Zero | Mapping::Unallocated => dst.fill(0),
            }
        }
        Ok(n as usize)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
        Err(read_only())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[path = "at_snapshot_tests.rs"]
mod tests;
