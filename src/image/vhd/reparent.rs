//! Re-pointing a differencing VHD at another parent: the header's parent
//! unique id, time stamp and Unicode name, and the data of every parent
//! locator, computed as a list of writes ([`Patch`]) applied afterwards;
//! and changing a VHD's own unique id (what its children check).
//!
//! Why a list and not a write: qcow2 names its backing file in one sector,
//! so one `pwrite` can be a merge's commit point. A VHD header is two
//! sectors and the locators live elsewhere in the file, so no single write
//! switches a VHD's parent. A merge therefore stores the list in its
//! journal (one atomic rename: the commit point) and then applies it; an
//! interrupted application is redone from the journal, which is safe
//! because the writes are idempotent. A snapshot applies the list to a new
//! file before anything references it.
//!
//! Locators are rewritten in place, keeping their platform codes: `W2ru`
//! (relative Windows path), `W2ku` (absolute path), `MacX` (file URL).
//! A locator whose reserved space is too small for the new name, and the
//! deprecated codes nobody reads any more, are cleared: the Unicode name
//! and the remaining locators still name the parent.

use super::create::ParentNames;
use super::footer::{
    checksum, Footer, COOKIE as FOOTER_COOKIE, FOOTER_LEN, OFF_CHECKSUM as OFF_FOOTER_CHECKSUM,
    OFF_UNIQUE_ID,
};
use super::header::{
    HEADER_LEN, LOCATOR_ENTRIES, OFF_CHECKSUM, OFF_PARENT_LOCATORS, OFF_PARENT_UNICODE_NAME,
    OFF_PARENT_UNIQUE_ID, PLAT_NONE,
};
use super::VhdLayer;
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use std::os::unix::fs::FileExt;
use std::path::Path;

const LOCATOR_ENTRY_LEN: usize = 24;
/// Offset of `Parent Time Stamp` in the dynamic header.
const OFF_PARENT_TIME_STAMP: usize = 56;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;
/// A patch list read back from a journal is bounded by this many writes
/// (a header and eight locators).
const MAX_PATCHES: usize = 1 + LOCATOR_ENTRIES;

pub use crate::image::repoint::{hex, unhex, Patch};
use crate::image::repoint::{write_checked, PatchLimits};

/// The writes that make the differencing disk `child` name `parent`
/// (whose file is at `parent_path`) as `name`: a path relative to the
/// child's directory, or absolute. Nothing is written.
pub fn parent_patches(child: &Path, parent_path: &Path, name: &str) -> Result<Vec<Patch>> {
    let file = crate::input::open_input(child, false, crate::input::Accept::RegularOrBlock)?;
    let layer = VhdLayer::open(
        child,
        file.try_clone()
            .map_err(|e| ImageError::io(child, "dup", 0, e))?,
    )?;
    if !layer.footer().is_differencing() {
        return Err(ImageError::unsupported(
            child,
            format!(
                "a {} VHD has no parent to change; only differencing disks do",
                layer.footer().disk_type_name()
            ),
        ));
    }
    let Some(h) = layer.dynamic_header() else {
        return Err(ImageError::invalid(
            child,
            "differencing disk without a dynamic header",
        ));
    };
    let pfile = crate::input::open_input(parent_path, false, crate::input::Accept::RegularOrBlock)?;
    let parent = VhdLayer::open(parent_path, pfile).map_err(|e| {
        ImageError::unsupported(
            child,
            format!(
                "the parent of a differencing VHD must be a VHD; {} is not one: {e}",
                parent_path.display()
            ),
        )
    })?;
    let parent_abs = parent_path
        .canonicalize()
        .map_err(|e| ImageError::io(parent_path, "canonicalize", 0, e))?;
    let names = ParentNames::from_name(child, Path::new(name), &parent_abs)?;
    let locators = names.locators();

    let mut raw = vec![0u8; HEADER_LEN as usize];
    read_exact_at(&file, child, &mut raw, h.at, "VHD dynamic disk header")?;
    let file_len = file
        .metadata()
        .map_err(|e| ImageError::io(child, "stat", 0, e))?
        .len();
    raw[OFF_PARENT_UNIQUE_ID..OFF_PARENT_UNIQUE_ID + 16]
        .copy_from_slice(&parent.footer().unique_id);
    raw[OFF_PARENT_TIME_STAMP..OFF_PARENT_TIME_STAMP + 4]
        .copy_from_slice(&parent_time_stamp(parent_path).to_be_bytes());
    raw[OFF_PARENT_UNICODE_NAME..OFF_PARENT_UNICODE_NAME + 512].copy_from_slice(&names.unicode);

    let mut patches = patch_locators(h, &locators, &mut raw, file_len);
    let sum = checksum(&raw, Some(OFF_CHECKSUM));
    raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    patches.push(Patch::new(h.at, &raw));
    Ok(patches)
}

/// Applies `patches` to `child` and makes them durable. The list may come
/// from a journal on disk: every write must lie inside the file.
pub fn apply(child: &Path, patches: &[Patch]) -> Result<()> {
    let file = crate::input::open_input(child, true, crate::input::Accept::RegularOrBlock)?;
    let limits = PatchLimits {
        what: "header write",
        max_count: MAX_PATCHES,
        max_bytes: 64 << 10,
    };
    write_checked(&file, child, patches, &limits)
}

/// Checks that `patches` (read back from a merge journal, so not to be
/// trusted) only re-point `child`: the last one rewrites the dynamic
/// header where the footer says it is, changing nothing but the parent's
/// unique id, time stamp and name, the locators' data lengths (or clearing
/// a locator) and the checksum, and each other one lies inside the data
/// space of a parent locator that header lists. A crash may have left the
/// header half written; the check holds for any mix of the old and the
/// new header, so recovery still works then.
pub fn check_patches(child: &Path, patches: &[Patch]) -> Result<()> {
    let bad = |what: String| Err(ImageError::invalid(child, format!("merge journal: {what}")));
    let file = crate::input::open_input(child, false, crate::input::Accept::RegularOrBlock)?;
    let footer = Footer::read(&file, child)?;
    let Some((last, locators)) = patches.split_last() else {
        return bad("no header write".into());
    };
    if last.offset != footer.data_offset {
        return bad(format!(
            "the last write is at offset {}, but the dynamic header is at {}",
            last.offset, footer.data_offset
        ));
    }
    let new = match last.bytes() {
        Some(b) if b.len() == HEADER_LEN as usize => b,
        _ => return bad(format!("the header write is not {HEADER_LEN} bytes of hex")),
    };
    let mut old = vec![0u8; HEADER_LEN as usize];
    read_exact_at(
        &file,
        child,
        &mut old,
        footer.data_offset,
        "VHD dynamic disk header",
    )?;
    if let Some(i) = first_foreign_change(&old, &new) {
        return bad(format!(
            "the header write changes byte {i} of the dynamic header, which re-pointing never changes"
        ));
    }
    if checksum(&new, Some(OFF_CHECKSUM)).to_be_bytes() != new[OFF_CHECKSUM..OFF_CHECKSUM + 4] {
        return bad("the header write has a wrong checksum".into());
    }
    let regions = locator_regions(&old);
    for p in locators {
        let len = p.bytes().map_or(u64::MAX, |b| b.len() as u64);
        let inside = regions.iter().any(|(off, space)| {
            p.offset >= *off
                && p.offset
                    .checked_add(len)
                    .is_some_and(|end| end <= off.saturating_add(*space))
        });
        if !inside {
            return bad(format!(
                "a write at offset {} lies outside every parent locator's data space",
                p.offset
            ));
        }
    }
    Ok(())
}

/// Re-points `child` at once (a file nothing references yet).
pub fn set_parent(child: &Path, parent_path: &Path, name: &str) -> Result<()> {
    apply(child, &parent_patches(child, parent_path, name)?)
}

/// The unique id in the footer of the VHD at `path`.
pub fn unique_id(path: &Path) -> Result<[u8; 16]> {
    let file = crate::input::open_input(path, false, crate::input::Accept::RegularOrBlock)?;
    Ok(Footer::read(&file, path)?.unique_id)
}

/// Gives the VHD at `path` another unique id, in its footer and in the
/// footer's copy at the start, and makes it durable. A commit merge does
/// this before renaming a hidden VHD onto its child: the child's children
/// check the id of the file they find under the child's name.
pub fn set_unique_id(path: &Path, id: [u8; 16]) -> Result<()> {
    let file = crate::input::open_input(path, true, crate::input::Accept::RegularOrBlock)?;
    let f = Footer::read(&file, path)?;
    if f.len != FOOTER_LEN {
        return Err(ImageError::unsupported(
            path,
            "an old 511-byte footer; snaptree does not rewrite those",
        ));
    }
    let mut at = vec![f.at];
    if !f.from_head_copy && f.at != 0 && !f.is_fixed() {
        let mut head = [0u8; 8];
        read_exact_at(&file, path, &mut head, 0, "VHD footer copy")?;
        if &head == FOOTER_COOKIE {
            at.push(0);
        }
    }
    for off in at {
        let mut b = [0u8; FOOTER_LEN as usize];
        read_exact_at(&file, path, &mut b, off, "VHD footer")?;
        b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&id);
        let sum = checksum(&b, Some(OFF_FOOTER_CHECKSUM));
        b[OFF_FOOTER_CHECKSUM..OFF_FOOTER_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        file.write_all_at(&b, off)
            .map_err(|e| ImageError::io(path, "write", off, e))?;
    }
    file.sync_data()
        .map_err(|e| ImageError::io(path, "fdatasync", 0, e))
}

/// The parent's modification time in VHD seconds, as vhd-util records it.
fn parent_time_stamp(parent: &Path) -> u32 {
    std::fs::metadata(parent)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| {
            d.as_secs().saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32
        })
}

/// For each parent locator of `h`: a write of the new name's data where
/// it fits the locator's data space inside the file (its length entered in
/// `raw`, the header being rewritten), else the entry is cleared in `raw`.
fn patch_locators(
    h: &super::header::DynamicHeader,
    locators: &[(u32, Vec<u8>)],
    raw: &mut [u8],
    file_len: u64,
) -> Vec<Patch> {
    let mut patches = Vec::new();
    for (i, loc) in h.parent_locators.iter().enumerate() {
        let entry = OFF_PARENT_LOCATORS + i * LOCATOR_ENTRY_LEN;
        if loc.platform_code == PLAT_NONE {
            continue;
        }
        let data = locators
            .iter()
            .find(|(code, _)| *code == loc.platform_code)
            .map(|(_, d)| d.clone());
        let space = data_space(loc.platform_data_space as u64);
        let off = loc.platform_data_offset;
        let fits = |d: &Vec<u8>| {
            d.len() as u64 <= space
                && off >= FOOTER_LEN
                && off
                    .checked_add(space.max(loc.platform_data_length as u64))
                    .is_some_and(|e| e <= file_len)
        };
        match data.filter(fits) {
            Some(d) => {
                // Old bytes past the new name are cleared.
                let mut bytes = d.clone();
                bytes.resize(d.len().max(loc.platform_data_length as usize), 0);
                patches.push(Patch::new(off, &bytes));
                raw[entry + 8..entry + 12].copy_from_slice(&(d.len() as u32).to_be_bytes());
            }
            None => raw[entry..entry + LOCATOR_ENTRY_LEN].fill(0),
        }
    }
    patches
}

/// A locator's data space in bytes. Hyper-V stores bytes in
/// platform_data_space, the spec sectors: small values are sectors.
fn data_space(field: u64) -> u64 {
    if field < 512 {
        field * 512
    } else {
        field
    }
}

/// The first byte where the dynamic header `new` differs from `old`
/// outside the fields re-pointing rewrites: the parent's id, time stamp,
/// Unicode name, the checksum, and per locator entry its data length or
/// the whole entry when it is cleared.
fn first_foreign_change(old: &[u8], new: &[u8]) -> Option<usize> {
    let may_differ = |i: usize| {
        let within = |start: usize, len: usize| (start..start + len).contains(&i);
        if within(OFF_PARENT_UNIQUE_ID, 16)
            || within(OFF_PARENT_TIME_STAMP, 4)
            || within(OFF_PARENT_UNICODE_NAME, 512)
            || within(OFF_CHECKSUM, 4)
        {
            return true;
        }
        let table = OFF_PARENT_LOCATORS..OFF_PARENT_LOCATORS + LOCATOR_ENTRIES * LOCATOR_ENTRY_LEN;
        if !table.contains(&i) {
            return false;
        }
        let entry =
            OFF_PARENT_LOCATORS + (i - OFF_PARENT_LOCATORS) / LOCATOR_ENTRY_LEN * LOCATOR_ENTRY_LEN;
        let in_entry = i - entry;
        (8..12).contains(&in_entry)
            || new[entry..entry + LOCATOR_ENTRY_LEN]
                .iter()
                .all(|b| *b == 0)
    };
    (0..new.len()).find(|i| old[*i] != new[*i] && !may_differ(*i))
}

/// The data space (offset, bytes) of each locator entry of the header
/// `old`, leaving out empty ones and ones over the footer copy.
fn locator_regions(old: &[u8]) -> Vec<(u64, u64)> {
    // Locator data lies where the header, old or new (they agree on the
    // offsets), says.
    (0..LOCATOR_ENTRIES)
        .map(|n| {
            let e = &old[OFF_PARENT_LOCATORS + n * LOCATOR_ENTRY_LEN..][..LOCATOR_ENTRY_LEN];
            let be32 = |o: usize| u32::from_be_bytes([e[o], e[o + 1], e[o + 2], e[o + 3]]) as u64;
            let space = data_space(be32(4));
            let off = u64::from_be_bytes(e[16..24].try_into().unwrap_or_default());
            (off, space.max(be32(8)))
        })
        .filter(|(off, len)| *off >= FOOTER_LEN && *len > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let p = Patch::new(7, &[0, 1, 0xab]);
        assert_eq!(p.hex, "0001ab");
        assert_eq!(p.bytes(), Some(vec![0, 1, 0xab]));
        assert_eq!(
            Patch {
                offset: 0,
                hex: "0g".into()
            }
            .bytes(),
            None
        );
    }
}
