//! The block allocation table (MS-VHDX 2.5): one 64-bit entry per payload
//! block (state in bits 0-2, file offset in MiB in bits 20-63), with one
//! sector bitmap entry after every `chunk_ratio` payload entries. The
//! chunk ratio is how many payload blocks one 1 MiB sector bitmap block
//! covers: 2^23 sectors over the sectors per block.
//!
//! Every entry is checked at open (a valid state; present blocks inside
//! the file and clear of the metadata), so the read path trusts it.

use super::metadata::Metadata;
use super::{le_u64, MIB};
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use std::path::Path;

pub const NOT_PRESENT: u8 = 0;
pub const UNDEFINED: u8 = 1;
pub const ZERO: u8 = 2;
pub const UNMAPPED: u8 = 3;
/// "Unmapped" as VHDX 0.95 wrote it: QEMU reads it as zeros and writes it
/// as an absent block (`PAYLOAD_BLOCK_UNMAPPED_v095` in its vhdx.c), and
/// so does snaptree (the read and write paths treat every state but the
/// present ones and NOT_PRESENT as zeros).
pub const UNMAPPED_V095: u8 = 5;
pub const FULLY_PRESENT: u8 = 6;
pub const PARTIALLY_PRESENT: u8 = 7;
/// A sector bitmap block's state when it exists.
pub const BITMAP_PRESENT: u8 = 6;

/// Sectors one sector bitmap block describes (1 MiB of bits).
const BITMAP_SECTORS: u64 = 1 << 23;

/// The BAT's shape, from the metadata.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub block_size: u64,
    pub sector: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub entries: u64,
}

impl Geometry {
    pub fn new(path: &Path, m: &Metadata, at: u64) -> Result<Geometry> {
        let covered = BITMAP_SECTORS * m.logical_sector;
        if !covered.is_multiple_of(m.block_size) || covered < m.block_size {
            return Err(ImageError::corrupt(
                path,
                at,
                format!(
                    "chunk ratio does not divide: 2^23 sectors of {} bytes over blocks of {}",
                    m.logical_sector, m.block_size
                ),
            ));
        }
        let chunk_ratio = covered / m.block_size;
        let data_blocks = m.virtual_size.div_ceil(m.block_size);
        let entries = if m.has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        Ok(Geometry {
            block_size: m.block_size,
            sector: m.logical_sector,
            chunk_ratio,
            data_blocks,
            entries,
        })
    }

    /// The BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// The BAT index of the sector bitmap covering payload block `block`.
    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Sectors per payload block.
    pub fn block_sectors(&self) -> u64 {
        self.block_size / self.sector
    }
}

pub fn state(entry: u64) -> u8 {
    (entry & 7) as u8
}

/// File offset of a present block.
pub fn offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

/// Reads the BAT from `region` and checks every entry against the file:
/// `forbidden` are the metadata ranges no block may overlap.
pub fn read(
    file: &dyn Storage,
    path: &Path,
    g: &Geometry,
    m: &Metadata,
    region: (u64, u64),
    file_len: u64,
    forbidden: &[(u64, u64, &str)],
) -> Result<Vec<u64>> {
    let bytes = g.entries.checked_mul(8).filter(|b| *b <= region.1);
    let Some(bytes) = bytes else {
        return Err(ImageError::corrupt(
            path,
            region.0,
            format!(
                "BAT region of {} bytes cannot hold the {} entries a {}-byte disk in {}-byte blocks needs",
                region.1, g.entries, m.virtual_size, g.block_size
            ),
        ));
    };
    let mut raw = vec![0u8; bytes as usize];
    read_exact_at(file, path, &mut raw, region.0, "VHDX BAT")?;
    let bat: Vec<u64> = (0..g.entries as usize)
        .map(|i| le_u64(&raw, i * 8))
        .collect();
    for (i, &e) in bat.iter().enumerate() {
        let is_bitmap = (i as u64 + 1).is_multiple_of(g.chunk_ratio + 1);
        check_entry(
            path,
            region.0 + i as u64 * 8,
            e,
            is_bitmap,
            g,
            m,
            file_len,
            forbidden,
        )?;
    }
    Ok(bat)
}

#[allow(clippy::too_many_arguments)]
fn check_entry(
    path: &Path,
    at: u64,
    e: u64,
    is_bitmap: bool,
    g: &Geometry,
    m: &Metadata,
    file_len: u64,
    forbidden: &[(u64, u64, &str)],
) -> Result<()> {
    let st = state(e);
    let (present, len) = if is_bitmap {
        match st {
            NOT_PRESENT => (false, 0),
            BITMAP_PRESENT => (true, MIB),
            _ => {
                return Err(ImageError::corrupt(
                    path,
                    at,
                    format!("sector bitmap entry in state {st}"),
                ))
            }
        }
    } else {
        match st {
            NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED | UNMAPPED_V095 => (false, 0),
            FULLY_PRESENT => (true, g.block_size),
            PARTIALLY_PRESENT if m.has_parent => (true, g.block_size),
            PARTIALLY_PRESENT => {
                return Err(ImageError::corrupt(
                    path,
                    at,
                    "payload block partially present in a disk without a parent",
                ))
            }
            _ => {
                return Err(ImageError::corrupt(
                    path,
                    at,
                    format!("payload block entry in state {st}"),
                ))
            }
        }
    };
    if !present {
        return Ok(());
    }
    let start = offset(e);
    let end = start.saturating_add(len);
    if start < MIB || end > file_len {
        return Err(ImageError::corrupt(
            path,
            at,
            format!("BAT entry points at [{start}, {end}), outside the file data area (file is {file_len} bytes)"),
        ));
    }
    if let Some((s, t, what)) = forbidden.iter().find(|(s, t, _)| start < *t && *s < end) {
        return Err(ImageError::corrupt(
            path,
            at,
            format!("BAT entry points at [{start}, {end}), overlapping the {what} [{s}, {t})"),
        ));
    }
    Ok(())
}

/// (first, last, set) runs of sector bits `[first, last)` in `bits` (LSB
/// first: bit i of byte j is sector 8j+i).
pub fn runs(bits: &[u8], first: u64, last: u64) -> Vec<(u64, u64, bool)> {
    let test = |s: u64| bits[(s / 8) as usize] >> (s % 8) & 1 != 0;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for s in first..last {
        let v = test(s);
        match out.last_mut() {
            Some(r) if r.2 == v => r.1 = s + 1,
            _ => out.push((s, s + 1, v)),
        }
    }
    out
}
