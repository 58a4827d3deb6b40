//! ESXi's seSparse extents (`-sesparse.vmdk`, the snapshot format of
//! VMFS6), read as QEMU's vmdk driver reads them: the format is not
//! documented, so every header field QEMU checks is checked here the same
//! strict way (one version, 4 KiB grains, 16 MiB per grain table, no
//! flags, zero reserved fields and padding, no journal to replay).
//!
//! Grain directory entries are 64-bit: 0, or `0x1000_0000` in the high
//! half and a grain table number in the low half. Grain table entries are
//! decoded by `tables::EntryCodec::SeSparse`.

use super::descriptor::MAX_DISK_BYTES;
use super::tables::{check_directory, EntryCodec, GrainTables};
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::storage::Storage;
use std::path::Path;

/// The constant header's magic, little-endian.
pub const MAGIC_BYTES: [u8; 8] = 0xcafe_babe_u64.to_le_bytes();
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
/// Grain size and grain table size, in sectors (the only ones QEMU reads).
const GRAIN_SECTORS: u64 = 8;
const GT_SECTORS: u64 = 64;
/// Entries per grain table.
const GT_ENTRIES: u64 = GT_SECTORS * 512 / 8;

fn le64(b: &[u8], field: usize) -> u64 {
    u64::from_le_bytes(b[field * 8..field * 8 + 8].try_into().expect("8 bytes"))
}

/// The capacity (sectors) and grain map of the seSparse extent `file`.
pub fn open(file: &dyn Storage, path: &Path, file_len: u64) -> Result<(u64, GrainTables)> {
    let mut h = [0u8; 512];
    read_exact_at(file, path, &mut h, 0, "seSparse header")?;
    let capacity = check_header(path, &h)?;
    check_volatile(file, path, le64(&h, 10), file_len)?;
    let (gd_at, gd_len) = region(path, &h, 16, file_len)?;
    let (gts_at, gts_len) = region(path, &h, 18, file_len)?;
    let grains_at = le64(&h, 24).saturating_mul(512);
    let gd = read_directory(file, path, capacity, (gd_at, gd_len), (gts_at, gts_len))?;
    let table_bytes = GT_ENTRIES * 8;
    let forbidden = [
        (0, 512, "header"),
        (gd_at, gd_at + gd_len, "grain directory"),
    ];
    check_directory(path, &gd, gd_at, 8, table_bytes, file_len, &forbidden)?;
    let tables = GrainTables::new(
        GRAIN_SECTORS * 512,
        GT_ENTRIES,
        gd,
        EntryCodec::SeSparse { grains_at },
        grains_at.max(512),
        file_len,
    );
    Ok((capacity, tables))
}

/// Checks the constant header's fixed fields the way QEMU does (magic,
/// the one version, capacity, 4 KiB grains and 16 MiB tables, zero flags,
/// reserved fields and padding); returns the capacity in sectors.
/// Separate because these checks need only the header bytes.
fn check_header(path: &Path, h: &[u8; 512]) -> Result<u64> {
    let f = |i: usize| le64(h, i);
    let bad = |field: usize, what: String| Err(ImageError::corrupt(path, field as u64 * 8, what));
    if f(0) != u64::from_le_bytes(MAGIC_BYTES) {
        return bad(0, "no seSparse magic".into());
    }
    if f(1) != VERSION {
        return Err(ImageError::unsupported(
            path,
            format!("seSparse version {:#018x}", f(1)),
        ));
    }
    let capacity = f(2);
    if capacity == 0 || capacity.saturating_mul(512) > MAX_DISK_BYTES {
        return bad(2, format!("capacity of {capacity} sectors"));
    }
    if f(3) != GRAIN_SECTORS || f(4) != GT_SECTORS {
        return Err(ImageError::unsupported(
            path,
            format!(
                "seSparse grain of {} sectors, grain tables of {} sectors",
                f(3),
                f(4)
            ),
        ));
    }
    if f(5) != 0 || (6..10).any(|i| f(i) != 0) || h[26 * 8..].iter().any(|&b| b != 0) {
        return Err(ImageError::unsupported(
            path,
            "seSparse flags, reserved fields or padding are not zero",
        ));
    }
    Ok(capacity)
}

/// The (offset, length) in bytes of the region whose sector offset and
/// sector count are header fields `field` and `field + 1`, checked to lie
/// inside the file. One function for the directory and the table area.
fn region(path: &Path, h: &[u8; 512], field: usize, file_len: u64) -> Result<(u64, u64)> {
    let (at, len) = (
        le64(h, field).saturating_mul(512),
        le64(h, field + 1).saturating_mul(512),
    );
    if at == 0 || at.saturating_add(len) > file_len {
        return Err(ImageError::corrupt(
            path,
            field as u64 * 8,
            format!("seSparse region at {at}, {len} bytes, is outside the file ({file_len} bytes)"),
        ));
    }
    Ok((at, len))
}

/// Reads the grain directory entries the capacity needs and turns each
/// into a grain table's byte offset (0 = none), refusing entries that name
/// no table inside the table area. Separate because it is the one loop
/// over on-disk entries.
fn read_directory(
    file: &dyn Storage,
    path: &Path,
    capacity: u64,
    (gd_at, gd_len): (u64, u64),
    (gts_at, gts_len): (u64, u64),
) -> Result<Vec<u64>> {
    let needed = capacity.div_ceil(GT_ENTRIES * GRAIN_SECTORS);
    if gd_len / 8 < needed {
        return Err(ImageError::corrupt(
            path,
            17 * 8,
            format!("grain directory of {} entries, {needed} needed", gd_len / 8),
        ));
    }
    let mut raw = vec![0u8; (needed * 8) as usize];
    read_exact_at(file, path, &mut raw, gd_at, "seSparse grain directory")?;
    let table_bytes = GT_ENTRIES * 8;
    let mut gd = Vec::with_capacity(needed as usize);
    for (i, c) in raw.chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let entry_at = gd_at + i as u64 * 8;
        if v == 0 {
            gd.push(0);
            continue;
        }
        let n = v & 0xffff_ffff;
        if v >> 32 != 0x1000_0000 || (n + 1) * table_bytes > gts_len {
            return Err(ImageError::corrupt(
                path,
                entry_at,
                format!("seSparse grain directory entry {v:#018x} names no grain table"),
            ));
        }
        gd.push(gts_at + n * table_bytes);
    }
    Ok(gd)
}

/// The volatile header: its magic, no journal to replay (an unclean
/// image QEMU refuses too), zero padding.
fn check_volatile(file: &dyn Storage, path: &Path, sector: u64, file_len: u64) -> Result<()> {
    let at = sector.saturating_mul(512);
    if sector == 0 || at.saturating_add(512) > file_len {
        return Err(ImageError::corrupt(
            path,
            80,
            format!("seSparse volatile header at sector {sector} is outside the file"),
        ));
    }
    let mut v = [0u8; 512];
    read_exact_at(file, path, &mut v, at, "seSparse volatile header")?;
    if le64(&v, 0) != VOLATILE_MAGIC {
        return Err(ImageError::corrupt(
            path,
            at,
            "no seSparse volatile header magic",
        ));
    }
    if le64(&v, 3) != 0 {
        return Err(ImageError::unsupported(
            path,
            "seSparse journal needs replaying (the image was not closed cleanly)",
        ));
    }
    if v[32..].iter().any(|&b| b != 0) {
        return Err(ImageError::unsupported(
            path,
            "seSparse volatile header padding is not zero",
        ));
    }
    Ok(())
}
