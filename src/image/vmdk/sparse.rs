//! Hosted sparse extents (`KDMV`, VMware Virtual Disk Format 1.1 section
//! "Hosted Sparse Extents"): the header, the embedded descriptor, the
//! grain directory and its redundant copy, and streamOptimized's footer.
//!
//! Header fields, little-endian, from byte 0: magic `KDMV`, version (1-3),
//! flags (bit 0: the newline check bytes are valid; bit 1: a redundant
//! grain directory; bit 2: zero grains (entry 1); bit 16: compressed
//! grains; bit 17: markers), capacity, grain size and descriptor
//! offset/size (sectors), grain table entries, redundant and primary grain
//! directory offsets (sectors), the sectors of metadata before the first
//! grain, an unclean-shutdown byte, the check bytes `\n \r\n` and the
//! compression algorithm (1 = deflate).

use super::tables::{check_directory, EntryCodec, GrainTables};
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"KDMV";

const FLAG_NL_DETECT: u32 = 1;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
const GD_AT_END: u64 = u64::MAX;
const CHECK_BYTES: &[u8; 4] = b"\n \r\n";

/// The largest grain accepted: 1 MiB (VMware and QEMU use 64 KiB).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest grain directory read (QEMU's bound, too).
const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Largest capacity of one hosted sparse extent: 2^32 sectors (2 TiB).
const MAX_CAPACITY_SECTORS: u64 = 1 << 32;

/// A hosted sparse header, parsed and checked.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gt_entries: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean: bool,
    pub compression: u16,
    /// The header was read from streamOptimized's footer.
    pub from_footer: bool,
}

impl Header {
    pub fn compressed(&self) -> bool {
        self.compression == 1 || self.flags & FLAG_COMPRESSED != 0
    }

    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    pub fn has_rgd(&self) -> bool {
        self.flags & FLAG_RGD != 0
    }

    /// Whether the header embeds a descriptor.
    pub fn has_descriptor(&self) -> bool {
        self.desc_offset != 0 && self.desc_size != 0
    }

    /// Grain directory entries: one per grain table's worth of capacity.
    pub fn gd_entries(&self) -> u64 {
        let per = self.gt_entries as u64 * self.grain_sectors;
        self.capacity.div_ceil(per)
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes the 512-byte header sector at `at` (no checks).
fn decode(b: &[u8]) -> Header {
    Header {
        version: le32(b, 4),
        flags: le32(b, 8),
        capacity: le64(b, 12),
        grain_sectors: le64(b, 20),
        desc_offset: le64(b, 28),
        desc_size: le64(b, 36),
        gt_entries: le32(b, 44),
        rgd_offset: le64(b, 48),
        gd_offset: le64(b, 56),
        overhead: le64(b, 64),
        unclean: b[72] != 0,
        compression: u16::from_le_bytes([b[77], b[78]]),
        from_footer: false,
    }
}

/// Reads and checks the header of the sparse extent `file` (of
/// `file_len` bytes); streamOptimized's footer replaces it when the
/// header puts the grain directory at the end.
pub fn read_header(file: &dyn Storage, path: &Path, file_len: u64) -> Result<Header> {
    let mut b = [0u8; 512];
    read_exact_at(file, path, &mut b, 0, "VMDK sparse header")?;
    if &b[..4] != MAGIC {
        return Err(ImageError::corrupt(path, 0, "no KDMV magic"));
    }
    let mut h = decode(&b);
    if h.gd_offset == GD_AT_END {
        h = read_footer(file, path, file_len)?;
    }
    check_header(&h, &b, path, file_len)?;
    Ok(h)
}

/// streamOptimized: the footer marker, the footer (a header copy with the
/// real grain directory offset) and the end-of-stream marker, in the last
/// three sectors.
fn read_footer(file: &dyn Storage, path: &Path, file_len: u64) -> Result<Header> {
    if file_len < 1536 + 512 {
        return Err(ImageError::corrupt(
            path,
            56,
            "grain directory at the end, but the file is too short for a footer",
        ));
    }
    let at = file_len - 1536;
    let mut b = [0u8; 1536];
    read_exact_at(file, path, &mut b, at, "VMDK stream footer")?;
    let marker_ok = le64(&b, 0) == 0 && le32(&b, 8) == 0 && le32(&b, 12) == 3;
    let eos_ok = le64(&b, 1024) == 0 && le32(&b, 1032) == 0 && le32(&b, 1036) == 0;
    if !marker_ok || &b[512..516] != MAGIC || !eos_ok {
        return Err(ImageError::corrupt(
            path,
            at,
            "grain directory at the end, but no valid footer and end-of-stream marker there",
        ));
    }
    let mut h = decode(&b[512..1024]);
    if h.gd_offset == GD_AT_END {
        return Err(ImageError::corrupt(
            path,
            at + 512 + 56,
            "the footer too puts the grain directory at the end",
        ));
    }
    h.from_footer = true;
    Ok(h)
}

fn check_header(h: &Header, b: &[u8], path: &Path, file_len: u64) -> Result<()> {
    let bad = |at: u64, what: String| Err(ImageError::corrupt(path, at, what));
    if !(1..=3).contains(&h.version) {
        return Err(ImageError::unsupported(
            path,
            format!("VMDK sparse version {}", h.version),
        ));
    }
    if h.flags & FLAG_NL_DETECT != 0 && &b[73..77] != CHECK_BYTES {
        return bad(
            73,
            "newline check bytes damaged (the file went through a text-mode transfer?)".into(),
        );
    }
    if h.compression > 1 {
        return Err(ImageError::unsupported(
            path,
            format!("VMDK compression algorithm {}", h.compression),
        ));
    }
    if h.capacity == 0 || h.capacity > MAX_CAPACITY_SECTORS {
        return bad(12, format!("capacity of {} sectors", h.capacity));
    }
    if !h.grain_sectors.is_power_of_two() || h.grain_sectors > MAX_GRAIN_SECTORS {
        return bad(
            20,
            format!(
                "grain of {} sectors (a power of two up to {MAX_GRAIN_SECTORS})",
                h.grain_sectors
            ),
        );
    }
    if h.gt_entries == 0 || h.gt_entries > 512 {
        return bad(
            44,
            format!("{} entries per grain table (1-512)", h.gt_entries),
        );
    }
    if h.gd_entries() > MAX_GD_ENTRIES {
        return bad(
            44,
            format!(
                "{} grain directory entries (at most {MAX_GD_ENTRIES}): grains or tables too small for the capacity",
                h.gd_entries()
            ),
        );
    }
    if h.overhead.saturating_mul(512) > file_len {
        return bad(
            64,
            format!(
                "metadata of {} sectors, but the file has only {file_len} bytes (truncated?)",
                h.overhead
            ),
        );
    }
    if h.desc_offset != 0 || h.desc_size != 0 {
        let end = h
            .desc_offset
            .saturating_add(h.desc_size)
            .saturating_mul(512);
        if h.desc_offset == 0 || h.desc_size == 0 || end > file_len {
            return bad(
                28,
                format!(
                    "embedded descriptor at sector {}, {} sectors, outside the file",
                    h.desc_offset, h.desc_size
                ),
            );
        }
        if h.desc_size * 512 > super::descriptor::MAX_DESCRIPTOR_BYTES {
            return bad(
                36,
                format!("embedded descriptor of {} sectors", h.desc_size),
            );
        }
    }
    Ok(())
}

/// The embedded descriptor's bytes and their file offset.
pub fn read_descriptor(file: &dyn Storage, path: &Path, h: &Header) -> Result<(u64, Vec<u8>)> {
    let at = h.desc_offset * 512;
    let mut buf = vec![0u8; (h.desc_size * 512) as usize];
    read_exact_at(file, path, &mut buf, at, "VMDK embedded descriptor")?;
    Ok((at, buf))
}

/// Whether an embedded descriptor area holds a descriptor: QEMU reserves
/// one in every extent of a twoGbMaxExtentSparse disk and leaves it
/// zeroed (the descriptor is a file of its own), so an all-zero area
/// means "an extent, not a disk".
pub fn descriptor_present(text: &[u8]) -> bool {
    text.iter().any(|&b| b != 0)
}

/// Whether a `KDMV` file is plainly an extent of a disk described
/// elsewhere: its header, read without checks, reserves no descriptor, or
/// an all-zero one. A damaged header is not plainly anything, so it stays
/// a VMDK (and its open says what is wrong) rather than turn into raw.
pub fn is_bare_extent(file: &dyn Storage, file_len: u64) -> bool {
    let mut b = [0u8; 512];
    if file.read_exact_at(&mut b, 0).is_err() {
        return false;
    }
    let h = decode(&b);
    if h.desc_offset == 0 && h.desc_size == 0 {
        return true;
    }
    let at = h.desc_offset.saturating_mul(512);
    let len = h.desc_size.saturating_mul(512);
    if h.desc_offset == 0
        || len > super::descriptor::MAX_DESCRIPTOR_BYTES
        || at.saturating_add(len) > file_len
    {
        return false;
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact_at(&mut text, at).is_ok() && !descriptor_present(&text)
}

/// Reads grain directory at sector `sector` (primary or redundant).
fn read_gd(
    file: &dyn Storage,
    path: &Path,
    h: &Header,
    sector: u64,
    field_at: u64,
    file_len: u64,
) -> Result<Vec<u64>> {
    let n = h.gd_entries();
    let at = sector.saturating_mul(512);
    if sector == 0 || at.saturating_add(n * 4) > file_len {
        return Err(ImageError::corrupt(
            path,
            field_at,
            format!("grain directory at sector {sector} ({n} entries) is outside the file"),
        ));
    }
    let mut raw = vec![0u8; (n * 4) as usize];
    read_exact_at(file, path, &mut raw, at, "VMDK grain directory")?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as u64 * 512)
        .collect())
}

/// The grain map of a hosted sparse extent, its directory and the
/// redundant one checked against the file; also the redundant directory's
/// table offsets (empty without one), which a writer keeps in step.
pub fn open_tables(
    file: &dyn Storage,
    path: &Path,
    h: &Header,
    file_len: u64,
) -> Result<(GrainTables, Vec<u64>)> {
    let field = if h.from_footer { file_len - 1024 } else { 0 };
    let gd = read_gd(file, path, h, h.gd_offset, field + 56, file_len)?;
    let table_bytes = h.gt_entries as u64 * 4;
    let gd_bytes = h.gd_entries() * 4;
    let mut forbidden = vec![
        (0, 512, "header"),
        (
            h.gd_offset * 512,
            h.gd_offset * 512 + gd_bytes,
            "grain directory",
        ),
    ];
    if h.has_descriptor() {
        let s = h.desc_offset * 512;
        forbidden.push((s, s + h.desc_size * 512, "embedded descriptor"));
    }
    let mut redundant = Vec::new();
    if h.has_rgd() && !h.compressed() {
        let rgd = read_gd(file, path, h, h.rgd_offset, field + 48, file_len)?;
        let s = h.rgd_offset * 512;
        forbidden.push((s, s + gd_bytes, "redundant grain directory"));
        check_directory(path, &rgd, s, 4, table_bytes, file_len, &forbidden)?;
        redundant = rgd;
    }
    check_directory(
        path,
        &gd,
        h.gd_offset * 512,
        4,
        table_bytes,
        file_len,
        &forbidden,
    )?;
    let tables = GrainTables::new(
        h.grain_sectors * 512,
        h.gt_entries as u64,
        gd,
        EntryCodec::Sector32 {
            zero_grain: h.zero_grain(),
        },
        512,
        file_len,
    );
    Ok((tables, redundant))
}
