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
use std::collections::HashMap;
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
    if let Some((field, what)) = table_checks(image, file_len)[index].clone() {
        return Err(bad_in(image, sn, field, what));
    }
    check_l1_entries(image, sn, file_len)?;
    let mut h = image.header.clone();
    h.l1_table_offset = sn.l1_offset;
    h.l1_size = sn.l1_size;
    h.size = disk_size;
    let map_limit = if sn.info.vm_state_size > 0 {
        vm_end.unwrap_or(disk_size).max(disk_size)
    } else {
        disk_size
    };
    let layer = Arc::new(snapshot_layer(image, h, map_limit, file_len));
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

/// What comparing the entries with each other finds, per entry: an id
/// or name an earlier entry has already, or an L1 table overlapping one
/// kept before it (by offset; of two overlapping tables the one further
/// into the file is left out). O(n log n) for QEMU's 65536 entries, and
/// the kept L1 tables are disjoint, so together they fit in the file.
fn table_checks(image: &Qcow2Layer, file_len: u64) -> &[Option<(u64, String)>] {
    image.snapshot_checks.get_or_init(|| {
        let sns = &image.snapshots;
        let mut out: Vec<Option<(u64, String)>> = vec![None; sns.len()];
        let (mut ids, mut names) = (HashMap::new(), HashMap::new());
        for (i, sn) in sns.iter().enumerate() {
            if let Some(j) = ids.get(&sn.info.id) {
                out[i] = Some((12, format!("its id is also the id of snapshot entry {j}")));
            } else if let Some(j) = names.get(&sn.info.name) {
                out[i] = Some((12, format!("its name is also the name of snapshot entry {j}")));
            }
            ids.entry(sn.info.id.clone()).or_insert(i);
            names.entry(sn.info.name.clone()).or_insert(i);
        }
        // Only tables that are fine on their own (`place_problem`) can
        // overlap: a wild one must not push a good one out.
        let mut by_offset: Vec<usize> = (0..sns.len())
            .filter(|&i| sns[i].l1_size > 0 && place_problem(image, &sns[i], file_len).is_none())
            .collect();
        by_offset.sort_by_key(|&i| (sns[i].l1_offset, i));
        let mut reach: Option<(u64, usize)> = None; // furthest end kept, by whom
        for i in by_offset {
            let (off, len) = (sns[i].l1_offset, sns[i].l1_size as u64 * 8);
            match reach {
                Some((end, j)) if off < end => {
                    out[i].get_or_insert((0, format!(
                        "L1 table at offset {off} ({len} bytes) overlaps the L1 table of snapshot entry {j} at offset {}",
                        sns[j].l1_offset
                    )));
                }
                _ => reach = Some((off.saturating_add(len), i)),
            }
        }
        out
    })
}

/// The L1 table must be cluster aligned, inside the file, and overlap no
/// other metadata (header cluster, active L1, refcount table, snapshot
/// table; other snapshots' L1 tables are `table_checks`).
fn check_l1_place(image: &Qcow2Layer, index: usize, file_len: u64) -> Result<()> {
    let sn = &image.snapshots[index];
    let h = &image.header;
    let cs = image.geom.cluster_size;
    let bytes = sn.l1_size as u64 * 8;
    let (off, end) = (sn.l1_offset, sn.l1_offset.saturating_add(bytes));
    if let Some((field, why)) = place_problem(image, sn, file_len) {
        return Err(bad_in(image, sn, field, why));
    }
    let table_start = image.snapshots.first().map_or(0, |s| s.entry_at);
    let table_end = image
        .snapshots
        .last()
        .map_or(0, |s| s.entry_at + s.entry_len);
    let others = [
        (
            "the active L1 table",
            h.l1_table_offset,
            h.l1_size as u64 * 8,
        ),
        (
            "the refcount table",
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * cs,
        ),
        ("the snapshot table", table_start, table_end - table_start),
    ];
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

/// Checks every L2 offset in the snapshot's L1 table (read in pieces,
/// not kept: the layer reads the table again on first use).
fn check_l1_entries(image: &Qcow2Layer, sn: &SnapshotEntry, file_len: u64) -> Result<()> {
    let cs = image.geom.cluster_size;
    const PIECE: u64 = 64 << 10;
    let total = sn.l1_size as u64 * 8;
    let mut done = 0;
    while done < total {
        let n = PIECE.min(total - done);
        let mut bytes = vec![0u8; n as usize];
        let at = sn.l1_offset + done;
        read_exact_at(
            &*image.file,
            &image.path,
            &mut bytes,
            at,
            "snapshot L1 table",
        )?;
        for (k, e) in header::decode_u64s(&bytes).into_iter().enumerate() {
            let l2 = e & l2::L1E_OFFSET_MASK;
            if l2 != 0 && (!l2.is_multiple_of(cs) || l2 < cs || l2.saturating_add(cs) > file_len) {
                let i = (done / 8) as usize + k;
                return Err(ImageError::corrupt(
                    &image.path,
                    at + k as u64 * 8,
                    format!(
                        "internal snapshot {:?}: L1 entry {i} points to an L2 table at offset {l2}, which is misaligned, in the header cluster or past the end of the file ({file_len} bytes)",
                        sn.info.name
                    ),
                ));
            }
        }
        done += n;
    }
    Ok(())
}

/// Why snapshot `sn`'s L1 table cannot be where its entry says on its
/// own (too large, misaligned, in the header cluster, past the end), with
/// the entry's field that says so.
fn place_problem(image: &Qcow2Layer, sn: &SnapshotEntry, file_len: u64) -> Option<(u64, String)> {
    let cs = image.geom.cluster_size;
    let bytes = sn.l1_size as u64 * 8;
    let off = sn.l1_offset;
    if bytes > MAX_L1_BYTES {
        return Some((
            8,
            format!("L1 table of {bytes} bytes exceeds QEMU's limit of {MAX_L1_BYTES}"),
        ));
    }
    let why = if !off.is_multiple_of(cs) {
        "is not cluster aligned".to_string()
    } else if off < cs {
        "is inside the header cluster".to_string()
    } else if off.saturating_add(bytes) > file_len {
        format!("runs past the end of the file ({file_len} bytes)")
    } else {
        return None;
    };
    Some((0, format!("L1 table at offset {off} ({bytes} bytes) {why}")))
}

/// Reads a snapshot layer's L1 table (checked at open) on first use.
pub(super) fn load_l1(layer: &Qcow2Layer, meta: &mut super::Meta) -> Result<()> {
    let h = &layer.header;
    let mut bytes = vec![0u8; h.l1_size as usize * 8];
    read_exact_at(
        &*layer.file,
        &layer.path,
        &mut bytes,
        h.l1_table_offset,
        "snapshot L1 table",
    )?;
    meta.l1 = header::decode_u64s(&bytes);
    meta.l1_unloaded = false;
    Ok(())
}

/// A read-only layer over `image`'s storage with header `h` (the
/// snapshot's L1 and size), its L1 table read on first use.
fn snapshot_layer(
    image: &Qcow2Layer,
    h: header::Header,
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
        snapshot_checks: std::sync::OnceLock::new(),
        backing: image.backing.clone(),
        writable: false,
        meta: Mutex::new(super::Meta {
            l1: Vec::new(),
            l1_dirty: Default::default(),
            l2_clean: crate::cache::lazy_lru(cache_tables),
            l2_dirty: Default::default(),
            file_end: file_len,
            refs: None,
            pending_free: Vec::new(),
            data_written: false,
            l1_unloaded: true,
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
