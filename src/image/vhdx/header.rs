//! The fixed-place structures at the start of a VHDX (MS-VHDX 2.2): the
//! file identifier, the two headers (the current one is the valid one with
//! the higher sequence number) and the region table that says where the
//! BAT and the metadata region are.
//!
//! Why both headers are read and compared: an update writes the header
//! that is not current, so a crash leaves one old valid header and one
//! torn one; the checksum and sequence number pick the survivor.

use super::guid::{self, Guid};
use super::{crc32c_of, le_u16, le_u32, le_u64, MIB};
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use std::path::Path;

pub const FILE_ID: &[u8; 8] = b"vhdxfile";
pub const HEADER_AT: [u64; 2] = [64 * 1024, 128 * 1024];
pub const HEADER_LEN: usize = 4096;
pub const REGION_AT: [u64; 2] = [192 * 1024, 256 * 1024];
pub const REGION_LEN: usize = 64 * 1024;
/// The most entries a region table may hold (MS-VHDX 2.2.3.1).
const MAX_REGIONS: u32 = 2047;

/// One of the two headers.
#[derive(Clone, Debug)]
pub struct Header {
    /// 0 or 1: which slot it was read from.
    pub slot: usize,
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
    /// The 4 KiB as read (rewritten with a new sequence and log GUID
    /// after a replay into the file).
    pub raw: Vec<u8>,
}

impl Header {
    /// The header with `sequence` and `log_guid` changed, checksummed.
    pub fn encode_with(&self, sequence: u64, log_guid: &Guid) -> Vec<u8> {
        let mut b = self.raw.clone();
        b[8..16].copy_from_slice(&sequence.to_le_bytes());
        b[48..64].copy_from_slice(log_guid);
        b[4..8].fill(0);
        let crc = crc32c_of(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The sequence number of the `n`th header written after this one
    /// (`n` >= 1). A current header whose number has no successor
    /// (`u64::MAX`, which only a hostile or broken writer makes) cannot
    /// be replaced by a newer one, so the file cannot be written: an
    /// error naming the field, never a wrap to a lower number that would
    /// make the new header lose to the old.
    pub fn next_sequence(&self, path: &Path, n: u64) -> Result<u64> {
        self.sequence.checked_add(n).ok_or_else(|| {
            ImageError::corrupt(
                path,
                HEADER_AT[self.slot] + 8,
                format!(
                    "header {} sequence number {} has no successor: no newer header can be written (read-only)",
                    self.slot + 1,
                    self.sequence
                ),
            )
        })
    }
}

/// Whether the first bytes are a VHDX file identifier.
pub fn is_vhdx(magic: &[u8]) -> bool {
    magic.len() >= 8 && &magic[..8] == FILE_ID
}

/// Whether a checksummed structure (checksum at bytes 4..8) is intact.
pub fn checksum_ok(b: &[u8]) -> bool {
    let stored = le_u32(b, 4);
    let mut c = b.to_vec();
    c[4..8].fill(0);
    crc32c_of(&c) == stored
}

/// Parses the header in slot `slot`, or says why it is not valid.
fn parse_header(b: &[u8], slot: usize) -> std::result::Result<Header, &'static str> {
    if &b[0..4] != b"head" {
        return Err("no \"head\" signature");
    }
    if !checksum_ok(b) {
        return Err("CRC-32C mismatch");
    }
    let h = Header {
        slot,
        sequence: le_u64(b, 8),
        file_write_guid: guid::at(b, 16),
        data_write_guid: guid::at(b, 32),
        log_guid: guid::at(b, 48),
        log_version: le_u16(b, 64),
        version: le_u16(b, 66),
        log_length: le_u32(b, 68),
        log_offset: le_u64(b, 72),
        raw: b.to_vec(),
    };
    if h.version != 1 {
        return Err("version is not 1");
    }
    Ok(h)
}

/// Checks the file identifier and returns the current header.
pub fn read_current(file: &dyn Storage, path: &Path) -> Result<Header> {
    let mut id = [0u8; 8];
    read_exact_at(file, path, &mut id, 0, "VHDX file identifier")?;
    if !is_vhdx(&id) {
        return Err(ImageError::corrupt(
            path,
            0,
            "no \"vhdxfile\" file identifier",
        ));
    }
    let mut found = Vec::new();
    let mut why = Vec::new();
    for (slot, at) in HEADER_AT.iter().enumerate() {
        let mut b = vec![0u8; HEADER_LEN];
        read_exact_at(file, path, &mut b, *at, "VHDX header")?;
        match parse_header(&b, slot) {
            Ok(h) => found.push(h),
            Err(e) => why.push(format!("header {} at offset {at}: {e}", slot + 1)),
        }
    }
    // Equal sequence numbers in two valid headers: QEMU takes the first.
    let best = found
        .into_iter()
        .reduce(|a, b| if b.sequence > a.sequence { b } else { a });
    best.ok_or_else(|| {
        ImageError::corrupt(
            path,
            HEADER_AT[0],
            format!("both VHDX headers are bad ({})", why.join("; ")),
        )
    })
}

/// Where the BAT and the metadata region are.
#[derive(Clone, Copy, Debug)]
pub struct Regions {
    pub bat: (u64, u64),
    pub metadata: (u64, u64),
}

/// Reads the region table (the copy if the first is damaged), refusing
/// unknown required regions, duplicates, misalignment and overlaps.
pub fn read_regions(file: &dyn Storage, path: &Path, file_len: u64) -> Result<Regions> {
    let mut first_err = None;
    for at in REGION_AT {
        let mut b = vec![0u8; REGION_LEN];
        read_exact_at(file, path, &mut b, at, "VHDX region table")?;
        if &b[0..4] != b"regi" || !checksum_ok(&b) {
            first_err.get_or_insert_with(|| {
                ImageError::corrupt(
                    path,
                    at,
                    "region table: bad \"regi\" signature or CRC-32C mismatch",
                )
            });
            continue;
        }
        return parse_regions(&b, at, path, file_len);
    }
    Err(first_err.expect("two tables tried"))
}

fn parse_regions(b: &[u8], at: u64, path: &Path, file_len: u64) -> Result<Regions> {
    let count = le_u32(b, 8);
    if count > MAX_REGIONS {
        return Err(ImageError::corrupt(
            path,
            at + 8,
            format!("region table claims {count} entries (at most {MAX_REGIONS})"),
        ));
    }
    let (mut bat, mut meta) = (None, None);
    for i in 0..count as usize {
        let e = 16 + i * 32;
        let eat = at + e as u64;
        let id = guid::at(b, e);
        let off = le_u64(b, e + 16);
        let len = le_u32(b, e + 24) as u64;
        let required = le_u32(b, e + 28) & 1 != 0;
        let slot = if id == guid::BAT_REGION {
            &mut bat
        } else if id == guid::METADATA_REGION {
            &mut meta
        } else if required {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "region table entry at offset {eat}: unknown required region {}",
                    guid::text(&id)
                ),
            ));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(ImageError::corrupt(path, eat, "region listed twice"));
        }
        if off < MIB || !off.is_multiple_of(MIB) || len == 0 || !len.is_multiple_of(MIB) {
            return Err(ImageError::corrupt(
                path,
                eat,
                format!("region at {off}, length {len}: not 1 MiB aligned past the headers"),
            ));
        }
        match off.checked_add(len) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(ImageError::corrupt(
                    path,
                    eat,
                    format!(
                        "region at {off}, length {len} ends past the end of the file ({file_len})"
                    ),
                ))
            }
        }
        *slot = Some((off, len));
    }
    let (Some(bat), Some(metadata)) = (bat, meta) else {
        return Err(ImageError::corrupt(
            path,
            at,
            "region table lacks the BAT or the metadata region",
        ));
    };
    if bat.0 < metadata.0 + metadata.1 && metadata.0 < bat.0 + bat.1 {
        return Err(ImageError::corrupt(
            path,
            at,
            format!(
                "the BAT region [{}, {}) overlaps the metadata region [{}, {})",
                bat.0,
                bat.0 + bat.1,
                metadata.0,
                metadata.0 + metadata.1
            ),
        ));
    }
    Ok(Regions { bat, metadata })
}
