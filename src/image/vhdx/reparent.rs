//! Re-pointing a differencing VHDX at another parent (a stream merge), and
//! giving a VHDX another data write GUID (a commit merge: the file that
//! takes a child's name takes the GUID the child's children check).
//!
//! Re-pointing is two writes ([`Patch`]es, stored in the merge journal
//! before they are applied, and idempotent, so recovery applies them
//! again): the new parent locator item into free space of the metadata
//! region past every item (nothing references it yet), then the 32-byte
//! table entry of the locator, pointing at it (one sector: the switch).
//! The metadata region carries no checksum, so nothing else changes. The
//! locator names the new parent's current data write GUID
//! (`parent_linkage`), its name relative to the child and its absolute
//! path, as `create` writes them.
//!
//! A new data write GUID goes into a new header in the slot that is not
//! current, with the next sequence number (a torn write fails its CRC and
//! the old header stays current), as the writer's first write does.

use super::guid::{self, Guid};
use super::header::{self, HEADER_AT};
use super::{create, le_u16, le_u32, log, VhdxLayer};
use crate::error::{ImageError, Result};
use crate::fileio::{file_len, read_exact_at, sync_data, write_all_at};
use crate::image::repoint::Patch;
use crate::storage::Storage;
use std::path::Path;

const TABLE_LEN: usize = 64 * 1024;
const ENTRY_LEN: usize = 32;

/// The metadata region of a file: where it is, its table, and the ranges
/// of its items (region offsets).
struct Region {
    base: u64,
    len: u64,
    table: Vec<u8>,
    /// (table entry offset in the table, item id, offset, length)
    entries: Vec<(usize, Guid, u64, u64)>,
}

fn open_ro(path: &Path) -> Result<std::fs::File> {
    crate::input::open_input(path, false, crate::input::Accept::RegularOrBlock)
}

/// Reads the metadata table of the VHDX in `file`, refusing a file with a
/// log still to replay (its metadata may be elsewhere).
fn region(file: &dyn Storage, path: &Path) -> Result<Region> {
    let h = header::read_current(file, path)?;
    let len = file_len(file, path)?;
    if log::find(file, path, &h, len)?.is_some() {
        return Err(ImageError::invalid(
            path,
            "the VHDX log holds entries to replay before it can be changed",
        ));
    }
    let r = header::read_regions(file, path, len)?;
    let (base, rlen) = r.metadata;
    let mut table = vec![0u8; TABLE_LEN];
    read_exact_at(file, path, &mut table, base, "VHDX metadata table")?;
    let count = le_u16(&table, 10) as usize;
    if &table[0..8] != b"metadata" || count > 2047 {
        return Err(ImageError::corrupt(path, base, "bad VHDX metadata table"));
    }
    let entries = (0..count)
        .map(|i| {
            let e = 32 + i * ENTRY_LEN;
            let id = guid::at(&table, e);
            (
                e,
                id,
                le_u32(&table, e + 16) as u64,
                le_u32(&table, e + 20) as u64,
            )
        })
        .collect();
    Ok(Region {
        base,
        len: rlen,
        table,
        entries,
    })
}

/// The writes that make the differencing VHDX `child` name the VHDX at
/// `parent_path` as `name` (relative to the child's directory, or
/// absolute). Nothing is written.
pub fn parent_patches(child: &Path, parent_path: &Path, name: &str) -> Result<Vec<Patch>> {
    let file = open_ro(child)?;
    let layer = VhdxLayer::open(child, Box::new(open_ro(child)?))?;
    if !layer.metadata().has_parent {
        return Err(ImageError::unsupported(
            child,
            "a VHDX without a parent cannot be re-pointed; only differencing disks can",
        ));
    }
    let parent = VhdxLayer::open(parent_path, Box::new(open_ro(parent_path)?)).map_err(|e| {
        ImageError::unsupported(
            child,
            format!(
                "the parent of a differencing VHDX must be a VHDX; {} is not one: {e}",
                parent_path.display()
            ),
        )
    })?;
    let linkage = parent.current_header().data_write_guid;
    let item = create::locator(&create::locator_pairs(child, name, &linkage)?);
    let r = region(&file, child)?;
    let Some(&(e, _, _, _)) = r.entries.iter().find(|x| x.1 == guid::PARENT_LOCATOR) else {
        return Err(ImageError::corrupt(
            child,
            r.base,
            "a differencing VHDX without a parent locator entry",
        ));
    };
    let end = r
        .entries
        .iter()
        .map(|x| x.2 + x.3)
        .max()
        .unwrap_or(0)
        .max(TABLE_LEN as u64);
    let at = end.div_ceil(8) * 8;
    if at + item.len() as u64 > r.len {
        return Err(ImageError::unsupported(
            child,
            format!(
                "no room for a new parent locator in the {}-byte metadata region",
                r.len
            ),
        ));
    }
    let mut entry = r.table[e..e + ENTRY_LEN].to_vec();
    entry[16..20].copy_from_slice(&(at as u32).to_le_bytes());
    entry[20..24].copy_from_slice(&(item.len() as u32).to_le_bytes());
    Ok(vec![
        Patch::new(r.base + at, &item),
        Patch::new(r.base + e as u64, &entry),
    ])
}

/// Checks that `patches` (from a merge journal, so not trusted) only
/// re-point `child`: a locator item written into the metadata region past
/// the table, over no item but the locator itself (a re-application), and
/// the locator's own table entry pointing at exactly that item, its id and
/// flags unchanged.
pub fn check_patches(child: &Path, patches: &[Patch]) -> Result<()> {
    let bad = |what: String| Err(ImageError::invalid(child, format!("merge journal: {what}")));
    let file = open_ro(child)?;
    let r = region(&file, child)?;
    let [item, entry] = patches else {
        return bad(format!(
            "{} writes; re-pointing a VHDX is two",
            patches.len()
        ));
    };
    let (Some(ib), Some(eb)) = (item.bytes(), entry.bytes()) else {
        return bad("a write that is not hex".into());
    };
    let Some(&(e, _, loc_at, loc_len)) = r.entries.iter().find(|x| x.1 == guid::PARENT_LOCATOR)
    else {
        return bad("the child has no parent locator entry".into());
    };
    if entry.offset != r.base + e as u64 || eb.len() != ENTRY_LEN {
        return bad(format!(
            "the entry write at offset {} is not the parent locator's table entry",
            entry.offset
        ));
    }
    let old = &r.table[e..e + ENTRY_LEN];
    if eb[..16] != old[..16] || eb[24..] != old[24..] {
        return bad("the entry write changes the locator's id or flags".into());
    }
    let (at, len) = (le_u32(&eb, 16) as u64, le_u32(&eb, 20) as u64);
    let (s, t) = (item.offset.wrapping_sub(r.base), ib.len() as u64);
    if item.offset < r.base || s != at || t != len || s < TABLE_LEN as u64 || s + t > r.len {
        return bad(format!(
            "the locator write at offset {} is not where the new entry points, inside the metadata region",
            item.offset
        ));
    }
    let is_itself = s == loc_at && t == loc_len;
    let overlaps = r
        .entries
        .iter()
        .any(|x| x.3 != 0 && s < x.2 + x.3 && x.2 < s + t && !(is_itself && x.0 == e));
    if overlaps || ib.len() < 20 || guid::at(&ib, 0) != guid::VHDX_PARENT_TYPE {
        return bad("the locator write overlaps another item or is no VHDX parent locator".into());
    }
    Ok(())
}

/// Applies checked `patches` to `child` in order and makes them durable.
pub fn apply(child: &Path, patches: &[Patch]) -> Result<()> {
    check_patches(child, patches)?;
    let file = crate::input::open_input(child, true, crate::input::Accept::RegularOrBlock)?;
    for p in patches {
        let b = p.bytes().unwrap_or_default();
        write_all_at(&file, child, &b, p.offset)?;
        sync_data(&file, child)?;
    }
    Ok(())
}

/// Gives the VHDX at `path` the data write GUID `id` (see module docs).
pub fn set_data_write_guid(path: &Path, id: Guid) -> Result<()> {
    let file = crate::input::open_input(path, true, crate::input::Accept::RegularOrBlock)?;
    let h = header::read_current(&file, path)?;
    let len = file_len(&file, path)?;
    if log::find(&file, path, &h, len)?.is_some() {
        return Err(ImageError::invalid(
            path,
            "the VHDX log holds entries to replay before its GUID can change",
        ));
    }
    if h.data_write_guid == id {
        return Ok(());
    }
    let mut raw = h.raw.clone();
    raw[32..48].copy_from_slice(&id);
    let slot = 1 - h.slot;
    let sequence = h.next_sequence(path, 1)?;
    let b = header::Header { raw, ..h.clone() }.encode_with(sequence, &[0; 16]);
    write_all_at(&file, path, &b, HEADER_AT[slot])?;
    sync_data(&file, path)
}
