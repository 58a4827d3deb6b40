//! The metadata region (MS-VHDX 2.6): its table of items, and the items
//! snaptree needs: file parameters (block size, leave-blocks-allocated,
//! has-parent), virtual disk size, logical and physical sector size, page
//! 83 data and the parent locator of a differencing disk.
//!
//! The region carries no checksum, so every item is checked for its place
//! (inside the region, past the table) and its value (the spec's ranges);
//! an unknown item marked required is refused, as QEMU refuses it.

use super::guid::{self, Guid};
use super::{le_u16, le_u32, le_u64, MIB};
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use std::path::Path;

/// The table occupies the first 64 KiB of the region; items follow it.
const TABLE_LEN: usize = 64 * 1024;
const MAX_ENTRIES: u16 = 2047;
/// Largest virtual disk the spec allows (64 TiB).
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Parent locator items are small: a handful of keys and paths.
const MAX_LOCATOR_LEN: u32 = 1 << 20;

/// The parsed metadata.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub block_size: u64,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub logical_sector: u64,
    pub physical_sector: u64,
    pub page83: Guid,
    /// Key/value pairs of a differencing disk's parent locator, and the
    /// file offset of the locator item (for errors).
    pub locator: Option<(Vec<(String, String)>, u64)>,
}

struct Item {
    id: Guid,
    offset: u32,
    len: u32,
    required: bool,
    /// Where its table entry is, for errors.
    at: u64,
}

/// Reads and checks the metadata region at `region`.
pub fn read(file: &dyn Storage, path: &Path, region: (u64, u64)) -> Result<Metadata> {
    let (base, rlen) = region;
    let mut t = vec![0u8; TABLE_LEN];
    read_exact_at(file, path, &mut t, base, "VHDX metadata table")?;
    if &t[0..8] != b"metadata" {
        return Err(ImageError::corrupt(path, base, "no \"metadata\" signature"));
    }
    let count = le_u16(&t, 10);
    if count > MAX_ENTRIES {
        return Err(ImageError::corrupt(
            path,
            base + 10,
            format!("metadata table claims {count} entries (at most {MAX_ENTRIES})"),
        ));
    }
    let mut items: Vec<Item> = Vec::new();
    for i in 0..count as usize {
        let e = 32 + i * 32;
        let at = base + e as u64;
        let item = Item {
            id: guid::at(&t, e),
            offset: le_u32(&t, e + 16),
            len: le_u32(&t, e + 20),
            required: le_u32(&t, e + 24) & 4 != 0,
            at,
        };
        if items.iter().any(|o| o.id == item.id) {
            return Err(ImageError::corrupt(path, at, "metadata item listed twice"));
        }
        let end = item.offset as u64 + item.len as u64;
        if item.len != 0 && ((item.offset as usize) < TABLE_LEN || end > rlen) {
            return Err(ImageError::corrupt(
                path,
                at,
                format!(
                    "metadata item {} at region offset {}, length {} is not inside the region ({} bytes) past its table",
                    guid::text(&item.id), item.offset, item.len, rlen
                ),
            ));
        }
        items.push(item);
    }
    parse_items(file, path, base, &items)
}

/// Reads item `id`'s bytes, if present, checking it has `want` bytes (or
/// any size when `want` is 0).
fn item_bytes(
    file: &dyn Storage,
    path: &Path,
    base: u64,
    items: &[Item],
    id: &Guid,
    want: u32,
    what: &str,
) -> Result<Option<(Vec<u8>, u64)>> {
    let Some(it) = items.iter().find(|i| i.id == *id) else {
        return Ok(None);
    };
    if (want != 0 && it.len < want) || it.len > MAX_LOCATOR_LEN {
        return Err(ImageError::corrupt(
            path,
            it.at,
            format!(
                "metadata item {what} has length {} (expected {want})",
                it.len
            ),
        ));
    }
    let mut b = vec![0u8; it.len as usize];
    let at = base + it.offset as u64;
    read_exact_at(file, path, &mut b, at, what)?;
    Ok(Some((b, at)))
}

/// A parent locator's key/value pairs and its item's file offset.
type Locator = (Vec<(String, String)>, u64);

/// The item table and where to read items from, so the per-item parsers
/// below share one way of fetching (and of naming a missing item).
struct Table<'a> {
    file: &'a dyn Storage,
    path: &'a Path,
    base: u64,
    items: &'a [Item],
}

impl Table<'_> {
    /// Item `id`'s bytes and file offset; a missing item is corrupt.
    fn get(&self, id: &Guid, want: u32, what: &str) -> Result<(Vec<u8>, u64)> {
        item_bytes(self.file, self.path, self.base, self.items, id, want, what)?.ok_or_else(|| {
            ImageError::corrupt(
                self.path,
                self.base,
                format!("metadata lacks the {what} item"),
            )
        })
    }

    /// A sector size item (logical or physical): 512 or 4096.
    fn sector(&self, id: &Guid, what: &str) -> Result<u64> {
        let (b, at) = self.get(id, 4, what)?;
        match le_u32(&b, 0) {
            n @ (512 | 4096) => Ok(n as u64),
            n => Err(ImageError::corrupt(
                self.path,
                at,
                format!("{what} {n} is neither 512 nor 4096"),
            )),
        }
    }
}

fn parse_items(file: &dyn Storage, path: &Path, base: u64, items: &[Item]) -> Result<Metadata> {
    refuse_unknown_required(path, items)?;
    let table = Table {
        file,
        path,
        base,
        items,
    };
    let (block_size, flags, fp_at) = file_parameters(&table)?;
    let (vs, vs_at) = table.get(&guid::VIRTUAL_DISK_SIZE, 8, "virtual disk size")?;
    let virtual_size = le_u64(&vs, 0);
    let logical_sector = table.sector(&guid::LOGICAL_SECTOR, "logical sector size")?;
    let physical_sector = table.sector(&guid::PHYSICAL_SECTOR, "physical sector size")?;
    if virtual_size == 0
        || virtual_size > MAX_DISK_SIZE
        || !virtual_size.is_multiple_of(logical_sector)
    {
        return Err(ImageError::corrupt(
            path,
            vs_at,
            format!(
                "virtual disk size {virtual_size} is not a multiple of the {logical_sector}-byte sector up to 64 TiB"
            ),
        ));
    }
    let (p83, _) = table.get(&guid::PAGE83, 16, "page 83 data")?;
    let has_parent = flags & 2 != 0;
    let locator = parent_locator(&table, has_parent, fp_at)?;
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        logical_sector,
        physical_sector,
        page83: guid::at(&p83, 0),
        locator,
    })
}

/// Refuses an item marked required that this reader does not know (as
/// QEMU does): its meaning could change how the disk reads.
fn refuse_unknown_required(path: &Path, items: &[Item]) -> Result<()> {
    let known = [
        guid::FILE_PARAMETERS,
        guid::VIRTUAL_DISK_SIZE,
        guid::PAGE83,
        guid::LOGICAL_SECTOR,
        guid::PHYSICAL_SECTOR,
        guid::PARENT_LOCATOR,
    ];
    if let Some(it) = items.iter().find(|i| i.required && !known.contains(&i.id)) {
        return Err(ImageError::unsupported(
            path,
            format!(
                "metadata entry at offset {}: unknown required item {}",
                it.at,
                guid::text(&it.id)
            ),
        ));
    }
    Ok(())
}

/// The file parameters item: (block size, flags, item offset), the block
/// size checked against the spec's range.
fn file_parameters(table: &Table) -> Result<(u64, u32, u64)> {
    let (fp, fp_at) = table.get(&guid::FILE_PARAMETERS, 8, "file parameters")?;
    let block_size = le_u32(&fp, 0) as u64;
    let flags = le_u32(&fp, 4);
    if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(ImageError::corrupt(
            table.path,
            fp_at,
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    Ok((block_size, flags, fp_at))
}

/// The parsed parent locator and its offset when the disk has a parent
/// (then the locator must exist; `fp_at` names the file parameters item
/// that says so); None otherwise, even if a locator is present.
fn parent_locator(table: &Table, has_parent: bool, fp_at: u64) -> Result<Option<Locator>> {
    let path = table.path;
    let found = item_bytes(
        table.file,
        path,
        table.base,
        table.items,
        &guid::PARENT_LOCATOR,
        20,
        "parent locator",
    )?;
    match found {
        Some((b, at)) if has_parent => Ok(Some((parse_locator(&b, at, path)?, at))),
        None if has_parent => Err(ImageError::corrupt(
            path,
            fp_at,
            "a differencing disk (has-parent set) without a parent locator",
        )),
        _ => Ok(None),
    }
}

/// The key/value pairs of a VHDX parent locator (MS-VHDX 2.6.2.6).
fn parse_locator(b: &[u8], at: u64, path: &Path) -> Result<Vec<(String, String)>> {
    let ty = guid::at(b, 0);
    if ty != guid::VHDX_PARENT_TYPE {
        return Err(ImageError::unsupported(
            path,
            format!(
                "parent locator at offset {at}: type {} is not a VHDX parent",
                guid::text(&ty)
            ),
        ));
    }
    let count = le_u16(b, 18) as usize;
    if 20 + count * 12 > b.len() {
        return Err(ImageError::corrupt(
            path,
            at + 18,
            format!(
                "parent locator claims {count} entries, more than its {} bytes hold",
                b.len()
            ),
        ));
    }
    let mut out: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let e = 20 + i * 12;
        let eat = at + e as u64;
        let field = |off: usize, len: usize, what: &str| -> Result<String> {
            let s = b
                .get(off..off + len)
                .filter(|_| len.is_multiple_of(2) && len > 0);
            let s = s.ok_or_else(|| {
                ImageError::corrupt(
                    path,
                    eat,
                    format!("parent locator {what} at {off}, length {len} is empty, odd or outside the item"),
                )
            })?;
            let units: Vec<u16> = s
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| {
                ImageError::corrupt(
                    path,
                    at + off as u64,
                    format!("parent locator {what} is not UTF-16"),
                )
            })
        };
        let key = field(le_u32(b, e) as usize, le_u16(b, e + 8) as usize, "key")?;
        let value = field(
            le_u32(b, e + 4) as usize,
            le_u16(b, e + 10) as usize,
            "value",
        )?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(ImageError::corrupt(
                path,
                eat,
                format!("parent locator key {key:?} twice"),
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}
