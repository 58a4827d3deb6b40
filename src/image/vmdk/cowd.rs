//! ESXi's `COWD` sparse extents (vmfsSparse snapshot deltas,
//! `-delta.vmdk`), read as QEMU's vmdk driver reads them.
//!
//! Header, little-endian 32-bit fields after the magic `COWD`: version,
//! flags, capacity (sectors), grain size (sectors), grain directory
//! offset (sectors) and entries, file size (sectors), then the geometry.
//! Grain tables have 4096 entries; an entry is the grain's sector in the
//! file, 0 when the grain is not in this delta. There are no zero grains.

use super::sparse::MAX_GRAIN_SECTORS;
use super::tables::{check_directory, EntryCodec, GrainTables};
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"COWD";

/// Entries per grain table (fixed by the format).
pub const GT_ENTRIES: u64 = 4096;

/// Largest grain directory read (QEMU's bound on any directory).
const MAX_GD_ENTRIES: u64 = 32 << 20;

fn le32(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}

/// The capacity (sectors) and grain map of the `COWD` extent `file`.
pub fn open(file: &dyn Storage, path: &Path, file_len: u64) -> Result<(u64, GrainTables)> {
    let mut b = [0u8; 44];
    read_exact_at(file, path, &mut b, 0, "COWD header")?;
    if &b[..4] != MAGIC {
        return Err(ImageError::corrupt(path, 0, "no COWD magic"));
    }
    let bad = |at: u64, what: String| Err(ImageError::corrupt(path, at, what));
    let capacity = le32(&b, 12);
    let grain = le32(&b, 16);
    let gd_sector = le32(&b, 20);
    let gd_entries = le32(&b, 24);
    if capacity == 0 {
        return bad(12, "capacity of 0 sectors".into());
    }
    if !grain.is_power_of_two() || grain > MAX_GRAIN_SECTORS {
        return bad(16, format!("grain of {grain} sectors"));
    }
    let needed = capacity.div_ceil(GT_ENTRIES * grain);
    if gd_entries < needed || gd_entries > MAX_GD_ENTRIES {
        return bad(
            24,
            format!("{gd_entries} grain directory entries for a capacity that needs {needed}"),
        );
    }
    let gd_at = gd_sector * 512;
    if gd_sector == 0 || gd_at + gd_entries * 4 > file_len {
        return bad(
            20,
            format!(
                "grain directory at sector {gd_sector} ({gd_entries} entries) is outside the file"
            ),
        );
    }
    let mut raw = vec![0u8; (needed * 4) as usize];
    read_exact_at(file, path, &mut raw, gd_at, "COWD grain directory")?;
    let gd: Vec<u64> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as u64 * 512)
        .collect();
    let forbidden = [
        (0, 512, "header"),
        (gd_at, gd_at + gd_entries * 4, "grain directory"),
    ];
    check_directory(path, &gd, gd_at, 4, GT_ENTRIES * 4, file_len, &forbidden)?;
    let tables = GrainTables::new(
        grain * 512,
        GT_ENTRIES,
        gd,
        EntryCodec::Sector32 { zero_grain: false },
        512,
        file_len,
    );
    Ok((capacity, tables))
}
