//! Leak repair: lowers the refcount of clusters to the number of
//! references metadata makes to them (freeing the ones nothing
//! references), as `qemu-img check -r leaks` does. References are counted
//! as QEMU counts them: once per L1 table (the current state's and each
//! internal snapshot's) through which an L2 table or data cluster is
//! reached. Then the current state's COPIED flags are set exactly where
//! the refcount is 1, which a killed snapshot deletion can leave wrong.
//!
//! Our writer flushes refcount increments before the L2 tables that use the
//! new clusters, and refcount decrements last (see `write`), so a process
//! killed in the middle of a flush leaves leaks and never a cluster in use
//! with refcount zero. Leaks lose no data but make `qemu-img check` report
//! them; the merge engine repairs the images a crash interrupted it on.
//!
//! Only images this code fully understands are touched: no persistent
//! bitmaps, no dirty or corrupt bit. Others are left alone (reported as
//! not repaired).

use super::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::l2::{Geometry, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::refcount::Refcounts;
use crate::error::{ImageError, Result};
use crate::fileio::{file_len, read_exact_at, sync_data, write_all_at};
use crate::image::storage::Storage;
use std::path::Path;

/// Refuse to scan images with more clusters than this (the reference
/// count per cluster would exceed 64 MiB).
const MAX_CLUSTERS: u64 = 1 << 25;

/// An L1 table longer than this (QEMU's own limit) is corrupt.
const MAX_L1_BYTES: u64 = 32 << 20;

/// How many references metadata makes to each cluster, saturating at
/// `u16::MAX` (a saturated count is never acted on; compressed clusters
/// make hundreds of references to one host cluster).
struct Used {
    counts: Vec<u16>,
    clusters: u64,
    cluster_size: u64,
}

impl Used {
    /// Counts a reference to every cluster `[off, off+len)` touches; `at`
    /// names the metadata that points there, for the error if it is
    /// outside the file.
    fn mark(&mut self, path: &Path, at: u64, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len.max(1));
        let (first, last) = (off / self.cluster_size, (end - 1) / self.cluster_size);
        if last >= self.clusters {
            return Err(ImageError::corrupt(
                path,
                at,
                format!("points to offset {off}, past the end of the file"),
            ));
        }
        for c in first..=last {
            let n = &mut self.counts[c as usize];
            *n = n.saturating_add(1);
        }
        Ok(())
    }

    /// The references to cluster `c`, or `None` when too many to count.
    fn count(&self, c: u64) -> Option<u64> {
        match self.counts.get(c as usize) {
            None => Some(0),
            Some(&u16::MAX) => None,
            Some(&n) => Some(n as u64),
        }
    }
}

/// Frees the leaked clusters of the qcow2 image at `path`. Returns how many
/// were freed, or `None` when the image is of a kind this does not repair.
pub fn repair_leaks(path: &Path) -> Result<Option<u64>> {
    let file = crate::input::open_input(path, true, crate::input::Accept::RegularOrBlock)?;
    repair_leaks_in(&file, path)
}

/// [`repair_leaks`] on the image in `file` (any storage); `path` names it
/// in errors.
pub fn repair_leaks_in(file: &dyn Storage, path: &Path) -> Result<Option<u64>> {
    let mut magic = [0u8; 4];
    if read_exact_at(file, path, &mut magic, 0, "magic").is_err() || &magic != super::header::MAGIC
    {
        return Ok(None); // not qcow2
    }
    let h = Header::read(file, path)?;
    if h.has_bitmaps || h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
        return Ok(None);
    }
    let g = Geometry::new(&h);
    let cs = g.cluster_size;
    let len = file_len(file, path)?;
    let clusters = len.div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        return Ok(None);
    }
    let mut used = Used {
        counts: vec![0; clusters as usize],
        clusters,
        cluster_size: cs,
    };
    mark_references(file, path, &h, &g, &mut used)?;

    let mut refs = Refcounts::load(file, path, &h, len)?;
    let mut file_end = clusters * cs;
    let mut freed = lower_refcounts(file, path, &used, &mut refs, &mut file_end)?;
    if freed > 0 {
        refs.write_out(file, path)?;
        sync_data(file, path)?;
    }
    freed += fix_copied(file, path, &h, &g, &mut refs, &mut file_end)?;
    Ok(Some(freed))
}

/// Repairs an image whose dirty bit (incompatible bit 0) is set, as QEMU
/// does when it opens one for writing: every refcount becomes the number
/// of references metadata makes (raised where too low, lowered where too
/// high), COPIED is set exactly where the refcount is 1, and then the bit
/// is cleared. Returns how many refcounts and flags changed, or `None`
/// when the image is no qcow2 or not dirty. Our snapshot deletion sets the
/// bit for the span where refcounts and COPIED flags are in flux.
pub fn repair_dirty_in(file: &dyn Storage, path: &Path) -> Result<Option<u64>> {
    let mut magic = [0u8; 4];
    if read_exact_at(file, path, &mut magic, 0, "magic").is_err() || &magic != super::header::MAGIC
    {
        return Ok(None);
    }
    let h = Header::read(file, path)?;
    if h.incompatible_features & INCOMPAT_DIRTY == 0 {
        return Ok(None);
    }
    if h.has_bitmaps || h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(ImageError::unsupported(
            path,
            "image is marked dirty and holds persistent bitmaps or is marked corrupt; repair it with `qemu-img check -r all`",
        ));
    }
    let g = Geometry::new(&h);
    let cs = g.cluster_size;
    let len = file_len(file, path)?;
    let clusters = len.div_ceil(cs);
    if clusters > MAX_CLUSTERS {
        return Err(ImageError::unsupported(
            path,
            format!("image is marked dirty and has {clusters} clusters, more than snaptree repairs; use `qemu-img check -r all`"),
        ));
    }
    let mut used = Used {
        counts: vec![0; clusters as usize],
        clusters,
        cluster_size: cs,
    };
    mark_references(file, path, &h, &g, &mut used)?;
    let mut refs = Refcounts::load(file, path, &h, len)?;
    let mut file_end = clusters * cs;
    let mut changed = lower_refcounts(file, path, &used, &mut refs, &mut file_end)?;
    for c in 0..clusters {
        let Some(want) = used.count(c) else { continue };
        if want > refs.get(file, path, c, file_end)? {
            refs.set(file, path, c, want, &mut file_end)?;
            changed += 1;
        }
    }
    if refs.table_moved {
        // A grown table would need the header re-pointed and the old one
        // freed; that is `qemu-img check -r all`'s work, not ours.
        return Err(ImageError::unsupported(
            path,
            "repairing the dirty image would move its refcount table; use `qemu-img check -r all`",
        ));
    }
    refs.write_out(file, path)?;
    sync_data(file, path)?;
    changed += fix_copied(file, path, &h, &g, &mut refs, &mut file_end)?;
    set_dirty(file, path, &h, false)?;
    Ok(Some(changed))
}

/// Sets or clears the dirty bit (v3 images; v2 have no feature fields)
/// and syncs.
pub(super) fn set_dirty(file: &dyn Storage, path: &Path, h: &Header, dirty: bool) -> Result<()> {
    if h.version < 3 {
        return Ok(());
    }
    let features = if dirty {
        h.incompatible_features | INCOMPAT_DIRTY
    } else {
        h.incompatible_features & !INCOMPAT_DIRTY
    };
    write_all_at(
        file,
        path,
        &features.to_be_bytes(),
        super::header::OFF_INCOMPATIBLE,
    )?;
    sync_data(file, path)
}

/// Lowers every refcount above the references metadata makes (a refcount
/// block may cover clusters past the end of the file: those references
/// are zero); returns how many changed. Changes stay in `refs` until
/// written out.
fn lower_refcounts(
    file: &dyn Storage,
    path: &Path,
    used: &Used,
    refs: &mut Refcounts,
    file_end: &mut u64,
) -> Result<u64> {
    let mut freed = 0;
    let per_block = refs.per_block();
    for i in 0..refs.table.len() as u64 {
        if refs.table[i as usize] == 0 {
            continue;
        }
        for c in i * per_block..(i + 1) * per_block {
            let Some(want) = used.count(c) else { continue };
            if refs.get(file, path, c, *file_end)? > want {
                refs.set(file, path, c, want, file_end)?;
                freed += 1;
            }
        }
    }
    Ok(freed)
}

/// Sets COPIED on the current state's L1 and L2 entries exactly where the
/// cluster's refcount is 1 (a snapshot deletion killed between dropping
/// refcounts and restoring COPIED leaves it clear); returns how many
/// entries changed. Compressed entries never carry COPIED.
fn fix_copied(
    file: &dyn Storage,
    path: &Path,
    h: &Header,
    g: &Geometry,
    refs: &mut Refcounts,
    file_end: &mut u64,
) -> Result<u64> {
    let cs = g.cluster_size;
    let mut fixed = 0;
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    read_exact_at(file, path, &mut l1, h.l1_table_offset, "L1 table")?;
    let mut l2 = vec![0u8; cs as usize];
    for (i, e) in super::header::decode_u64s(&l1).into_iter().enumerate() {
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let want = refs.get(file, path, off / cs, *file_end)? == 1;
        if want != (e & OFLAG_COPIED != 0) {
            let w = if want {
                e | OFLAG_COPIED
            } else {
                e & !OFLAG_COPIED
            };
            let at = h.l1_table_offset + i as u64 * 8;
            write_all_at(file, path, &w.to_be_bytes(), at)?;
            fixed += 1;
        }
        read_exact_at(file, path, &mut l2, off, "L2 table")?;
        let mut changed = false;
        for j in (0..cs as usize / 8).step_by(g.words_per_entry as usize) {
            let w = u64::from_be_bytes(l2[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
            let host = w & L2E_OFFSET_MASK;
            if w & OFLAG_COMPRESSED != 0 || host == 0 {
                continue;
            }
            let want = refs.get(file, path, host / cs, *file_end)? == 1;
            if want != (w & OFLAG_COPIED != 0) {
                let w = if want {
                    w | OFLAG_COPIED
                } else {
                    w & !OFLAG_COPIED
                };
                l2[j * 8..j * 8 + 8].copy_from_slice(&w.to_be_bytes());
                changed = true;
                fixed += 1;
            }
        }
        if changed {
            write_all_at(file, path, &l2, off)?;
        }
    }
    if fixed > 0 {
        sync_data(file, path)?;
    }
    Ok(fixed)
}

/// Marks the header, L1, L2 tables, data clusters, refcount table and
/// refcount blocks.
fn mark_references(
    file: &dyn Storage,
    path: &Path,
    h: &Header,
    g: &Geometry,
    used: &mut Used,
) -> Result<()> {
    let cs = g.cluster_size;
    used.mark(path, 0, 0, cs)?;
    used.mark(
        path,
        48,
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
    )?;
    let mut rt = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
    read_exact_at(
        file,
        path,
        &mut rt,
        h.refcount_table_offset,
        "refcount table",
    )?;
    for (i, e) in super::header::decode_u64s(&rt).into_iter().enumerate() {
        let off = e & !(cs - 1);
        if off != 0 {
            used.mark(path, h.refcount_table_offset + i as u64 * 8, off, cs)?;
        }
    }
    used.mark(path, 0, h.l1_table_offset, h.l1_size as u64 * 8)?;
    mark_l1(file, path, g, used, h.l1_table_offset, h.l1_size as u64)?;
    if h.nb_snapshots > 0 {
        let len = used.clusters * cs;
        let snaps = super::snapshot::read_snapshots(file, path, h, len)?;
        if let Some(last) = snaps.last() {
            let table_len = last.entry_at + last.entry_len - h.snapshots_offset;
            used.mark(path, 64, h.snapshots_offset, table_len)?;
        }
        for sn in &snaps {
            let bytes = sn.l1_size as u64 * 8;
            if bytes > MAX_L1_BYTES {
                return Err(ImageError::corrupt(
                    path,
                    sn.entry_at,
                    format!("snapshot L1 table of {} entries", sn.l1_size),
                ));
            }
            used.mark(path, sn.entry_at, sn.l1_offset, bytes)?;
            mark_l1(file, path, g, used, sn.l1_offset, sn.l1_size as u64)?;
        }
    }
    Ok(())
}

/// Counts the references of the L1 table at `l1_offset` (`l1_size`
/// entries): its L2 tables and, through them, the data clusters.
fn mark_l1(
    file: &dyn Storage,
    path: &Path,
    g: &Geometry,
    used: &mut Used,
    l1_offset: u64,
    l1_size: u64,
) -> Result<()> {
    let cs = g.cluster_size;
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(ImageError::corrupt(path, l1_offset, "L1 table too large"));
    }
    let mut l1 = vec![0u8; l1_size as usize * 8];
    read_exact_at(file, path, &mut l1, l1_offset, "L1 table")?;
    let mut l2 = vec![0u8; cs as usize];
    let xbits = g.compressed_offset_bits();
    for (i, e) in super::header::decode_u64s(&l1).into_iter().enumerate() {
        let l1_at = l1_offset + i as u64 * 8;
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        used.mark(path, l1_at, off, cs)?;
        read_exact_at(file, path, &mut l2, off, "L2 table")?;
        let words = super::header::decode_u64s(&l2);
        for (j, w) in words.iter().step_by(g.words_per_entry as usize).enumerate() {
            let at = off + (j as u64) * 8 * g.words_per_entry;
            if w & OFLAG_COMPRESSED != 0 {
                let host = w & ((1u64 << xbits) - 1);
                let sectors = ((w >> xbits) & ((1u64 << (g.cluster_bits - 8)) - 1)) + 1;
                // The data runs to the end of the `sectors`-th 512-byte
                // sector counted from the one it starts in.
                let len = (host & !511) + sectors * 512 - host;
                used.mark(path, at, host, len.min(len_to_end(host, used)))?;
            } else {
                let host = w & L2E_OFFSET_MASK;
                if host != 0 {
                    used.mark(path, at, host, cs)?;
                }
            }
        }
    }
    Ok(())
}

/// Bytes from `host` to the end of the file: a compressed cluster's last
/// sector may lie past the end of a file qemu did not pad.
fn len_to_end(host: u64, used: &Used) -> u64 {
    (used.clusters * used.cluster_size)
        .saturating_sub(host)
        .max(1)
}
