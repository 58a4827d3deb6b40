//! The Block Allocation Table, the sector bitmaps in front of each block,
//! and the in-memory "block fully allocated" bits.
//!
//! A dynamic or differencing disk stores its data in blocks (2 MiB by
//! default). The BAT holds, per block, the sector where the block starts in
//! the file (big endian u32), or 0xFFFFFFFF when it is not allocated. An
//! allocated block begins with a sector bitmap (one bit per sector, most
//! significant bit first, padded to whole sectors) followed by the block's
//! data. Every BAT entry is checked once, at open, against the file and the
//! metadata, so mapping never meets a wild offset.
//!
//! Looking at a bitmap costs a read. Most blocks end up fully written, so,
//! like XCP's tapdisk ("BATmap"), we keep one bit per block saying "every
//! sector is present": set from XCP's on-disk batmap when the image has a
//! valid one, and otherwise the first time a block's bitmap is read and
//! found full. A block with the bit set is served without its bitmap. The
//! bits are atomics, so readers set them without a lock.
//!
//! A writable image changes the BAT in memory when it allocates a block;
//! the entries are atomics too, so readers look them up without a lock
//! while a writer publishes new blocks (see `write`).

use super::footer::{checksum, Footer};
use super::header::DynamicHeader;
use crate::error::{ImageError, Result};
use crate::fileio::read_exact_at;
use crate::image::storage::Storage;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const UNUSED: u32 = 0xFFFF_FFFF;
/// Bytes of BAT we hold in memory at most (16M blocks: 32 TiB of 2 MiB
/// blocks, far beyond the format's 2040 GiB).
pub const MAX_BAT_BYTES: u64 = 64 << 20;

/// Largest batmap we read (16M blocks).
const MAX_BATMAP_BYTES: u64 = 2 << 20;
/// XCP's batmap header, at the first sector after the BAT.
pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
const BATMAP_HEADER_LEN: usize = 512;
/// Batmap versions: 1.1 summed signed chars, 1.2 unsigned ones.
const BATMAP_V1_1: u32 = 0x0001_0001;
const BATMAP_V1_2: u32 = 0x0001_0002;

/// The block allocation table: only the entries the virtual size needs.
/// Entries are atomics: a writer publishes a new block with one store after
/// its data is written (`Release`), readers load without a lock (`Acquire`).
pub struct Bat {
    entries: Vec<AtomicU32>,
    pub table_offset: u64,
    pub block_size: u64,
    pub bitmap_size: u64,
}

impl Bat {
    /// Reads the BAT and checks every allocated entry: the bitmap and data
    /// must lie inside the file (QEMU's rule: the last block may end at the
    /// end of the file) and outside the metadata in `forbidden`.
    pub fn read(
        file: &dyn Storage,
        path: &Path,
        h: &DynamicHeader,
        virtual_size: u64,
        file_len: u64,
        forbidden: &[(u64, u64, &str)],
    ) -> Result<Bat> {
        let (at, bytes, end) = table_extent(path, h, virtual_size, file_len, forbidden)?;
        let mut raw = vec![0u8; bytes as usize];
        read_exact_at(file, path, &mut raw, at, "VHD block allocation table")?;
        let entries: Vec<AtomicU32> = raw
            .chunks_exact(4)
            .map(|c| AtomicU32::new(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        let bat = Bat {
            entries,
            table_offset: at,
            block_size: h.block_size as u64,
            bitmap_size: h.bitmap_size(),
        };
        bat.check_entries(path, file_len, forbidden, end)?;
        Ok(bat)
    }

    /// Checks that every used entry puts its block (bitmap and data) inside
    /// the file and over none of the `forbidden` ranges nor the table
    /// itself (which ends at `table_end`), naming the first bad entry.
    fn check_entries(
        &self,
        path: &Path,
        file_len: u64,
        forbidden: &[(u64, u64, &str)],
        table_end: u64,
    ) -> Result<()> {
        let bat_range = (self.table_offset, table_end, "block allocation table");
        for i in 0..self.len() {
            let e = self.entry(i);
            if e == UNUSED {
                continue;
            }
            let start = e as u64 * 512;
            let stop = start + self.bitmap_size + self.block_size;
            let entry_at = self.table_offset + i * 4;
            if stop > file_len {
                return Err(ImageError::corrupt(
                    path,
                    entry_at,
                    format!(
                        "BAT entry {i} puts block {i} at offset {start}, but the block ({} bytes with \
                         its bitmap) ends at {stop}, past the end of the file ({file_len} bytes); \
                         the image was truncated",
                        self.bitmap_size + self.block_size
                    ),
                ));
            }
            let overlap = forbidden
                .iter()
                .chain(std::iter::once(&bat_range))
                .find(|(s, e, _)| start < *e && *s < stop);
            if let Some((_, _, name)) = overlap {
                return Err(ImageError::corrupt(
                    path,
                    entry_at,
                    format!("BAT entry {i} puts block {i} at offset {start}, over the {name}"),
                ));
            }
        }
        Ok(())
    }

    /// Number of entries (blocks of the virtual size).
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry `i` as stored (a sector number or `UNUSED`); `UNUSED` past
    /// the end.
    pub fn entry(&self, i: u64) -> u32 {
        self.entries
            .get(i as usize)
            .map_or(UNUSED, |e| e.load(Ordering::Acquire))
    }

    /// Points entry `i` at the block starting at file sector `sector`. The
    /// caller has made the block's bitmap and data visible first.
    pub fn set_entry(&self, i: u64, sector: u32) {
        if let Some(e) = self.entries.get(i as usize) {
            e.store(sector, Ordering::Release);
        }
    }

    /// File offset of block `i`'s sector bitmap, if allocated.
    pub fn bitmap_offset(&self, i: u64) -> Option<u64> {
        match self.entry(i) {
            UNUSED => None,
            e => Some(e as u64 * 512),
        }
    }

    /// Bytes of a block in the file: its bitmap and its data.
    pub fn block_span(&self) -> u64 {
        self.bitmap_size + self.block_size
    }

    /// Before writing: no two allocated blocks may share bytes (a write to
    /// one would change the other), nor may a block cover other metadata
    /// (`forbidden`, e.g. parent locator data or XCP's batmap, which the
    /// read side only checks against the structures it needs). Errors name
    /// the BAT entry.
    pub fn check_disjoint(&self, path: &Path, forbidden: &[(u64, u64, &str)]) -> Result<()> {
        let span = self.block_span();
        let mut blocks: Vec<(u64, u64)> = (0..self.len())
            .filter_map(|i| self.bitmap_offset(i).map(|at| (at, i)))
            .collect();
        blocks.sort_unstable();
        let entry_at = |i: u64| self.table_offset + i * 4;
        for pair in blocks.windows(2) {
            let ((a, i), (b, j)) = (pair[0], pair[1]);
            if a + span > b {
                return Err(ImageError::corrupt(
                    path,
                    entry_at(j),
                    format!(
                        "BAT entry {j} puts block {j} at offset {b}, inside block {i} (offset {a}, \
                         {span} bytes with its bitmap); writing one would change the other, so the \
                         image is not opened for writing"
                    ),
                ));
            }
        }
        for &(at, i) in &blocks {
            let hit = forbidden.iter().find(|(s, e, _)| at < *e && *s < at + span);
            if let Some((_, _, name)) = hit {
                return Err(ImageError::corrupt(
                    path,
                    entry_at(i),
                    format!(
                        "BAT entry {i} puts block {i} at offset {at}, over the {name}; the image \
                         is not opened for writing"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Sector bitmap bit order. The spec's is most significant bit first; XCP's
/// first tapdisk (creator `tap`, version 0.1) stored host-order u32 words,
/// which on x86 puts the least significant bit first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitOrder {
    MsbFirst,
    LsbFirst,
}

impl BitOrder {
    pub fn for_footer(f: &Footer) -> BitOrder {
        if &f.creator_application[..3] == b"tap" && f.creator_version == 1 {
            BitOrder::LsbFirst
        } else {
            BitOrder::MsbFirst
        }
    }

    fn mask(self, bit: u64) -> u8 {
        match self {
            BitOrder::MsbFirst => 0x80 >> (bit & 7),
            BitOrder::LsbFirst => 1 << (bit & 7),
        }
    }

    pub fn test(self, map: &[u8], bit: u64) -> bool {
        map.get((bit >> 3) as usize)
            .is_some_and(|b| b & self.mask(bit) != 0)
    }

    /// Sets bits `[first, end)` of `map` (bits past its end are ignored).
    pub fn set_range(self, map: &mut [u8], first: u64, end: u64) {
        for bit in first..end {
            if let Some(b) = map.get_mut((bit >> 3) as usize) {
                *b |= self.mask(bit);
            }
        }
    }
}

/// Whether the first `n` bits of `map` are all set.
pub fn all_set(map: &[u8], n: u64, order: BitOrder) -> bool {
    let whole = (n / 8) as usize;
    if map.len() < n.div_ceil(8) as usize || map[..whole].iter().any(|b| *b != 0xff) {
        return false;
    }
    (whole as u64 * 8..n).all(|bit| order.test(map, bit))
}

/// Runs of equal bits in `[first, end)` of `map`, as (first, end, set).
pub fn runs(map: &[u8], first: u64, end: u64, order: BitOrder) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut bit = first;
    while bit < end {
        // Whole bytes of equal bits go at once.
        let (len, set) = match map.get((bit >> 3) as usize) {
            Some(&b) if bit.is_multiple_of(8) && end - bit >= 8 && (b == 0 || b == 0xff) => {
                (8, b == 0xff)
            }
            _ => (1, order.test(map, bit)),
        };
        match out.last_mut() {
            Some(last) if last.1 == bit && last.2 == set => last.1 += len,
            _ => out.push((bit, bit + len, set)),
        }
        bit += len;
    }
    out
}

/// One bit per block: "every sector of this block is present".
pub struct FullBlocks(Vec<AtomicU64>);

impl FullBlocks {
    pub fn new(blocks: u64) -> FullBlocks {
        FullBlocks(
            (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }

    pub fn set(&self, i: u64) {
        if let Some(w) = self.0.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

/// A valid XCP batmap and where it lives in the file.
pub struct Batmap {
    /// One bit per block, most significant first: "block fully allocated".
    pub map: Vec<u8>,
    /// File offset of its 512-byte header.
    pub header_at: u64,
    /// File offset of the map.
    pub map_at: u64,
}

/// XCP's batmap, if this image has a valid one: one bit per block, most
/// significant first, set when the block is fully allocated. libvhd puts
/// its header in the sector after the padded BAT (as declared by
/// `max_table_entries`) and only for images its tapdisk created (`tap`,
/// version 1.1 and later). The batmap is only a shortcut, so anything
/// wrong with it (cookie, version, bounds, checksum) means "no batmap",
/// with a warning, never an error.
pub fn read_batmap(
    file: &dyn Storage,
    path: &Path,
    f: &Footer,
    h: &DynamicHeader,
    blocks: u64,
    file_len: u64,
) -> Option<Batmap> {
    if &f.creator_application[..3] != b"tap" || f.creator_version < 0x0001_0001 {
        return None;
    }
    let warn = |why: String| {
        tracing::warn!("{}: XCP batmap ignored: {why}", path.display());
        None
    };
    let at = h.table_offset + (h.max_table_entries as u64 * 4).div_ceil(512).max(1) * 512;
    if at + BATMAP_HEADER_LEN as u64 > file_len {
        return None;
    }
    let mut hdr = [0u8; BATMAP_HEADER_LEN];
    read_exact_at(file, path, &mut hdr, at, "XCP batmap header").ok()?;
    if &hdr[0..8] != BATMAP_COOKIE {
        // Version 1.1 images updated from 0.1 may lack one: not an error.
        return None;
    }
    let map_offset = u64::from_be_bytes(hdr[8..16].try_into().ok()?);
    let map_sectors = u32::from_be_bytes(hdr[16..20].try_into().ok()?) as u64;
    let version = u32::from_be_bytes(hdr[20..24].try_into().ok()?);
    let sum = u32::from_be_bytes(hdr[24..28].try_into().ok()?);
    if version > BATMAP_V1_2 {
        return warn(format!("version 0x{version:08x} at offset {}", at + 20));
    }
    let map_len = map_sectors * 512;
    let declared = (h.max_table_entries as u64).max(blocks).div_ceil(8);
    let too_big = map_len > declared.div_ceil(512) * 512 + 512 || map_len > MAX_BATMAP_BYTES;
    if map_len < blocks.div_ceil(8) || too_big {
        return warn(format!(
            "{map_sectors} sectors (offset {}) do not fit {blocks} blocks",
            at + 16
        ));
    }
    if map_offset.checked_add(map_len).is_none_or(|e| e > file_len) {
        return warn(format!(
            "map at offset {map_offset} ({map_len} bytes) is past the end of the file"
        ));
    }
    let mut map = vec![0u8; map_len as usize];
    read_exact_at(file, path, &mut map, map_offset, "XCP batmap").ok()?;
    let computed = if version == BATMAP_V1_1 {
        !map.iter()
            .fold(0u32, |s, b| s.wrapping_add(*b as i8 as i32 as u32))
    } else {
        checksum(&map, None)
    };
    if computed != sum {
        return warn(format!(
            "checksum 0x{sum:08x} (offset {}) does not match the map (0x{computed:08x})",
            at + 24
        ));
    }
    Some(Batmap {
        map,
        header_at: at,
        map_at: map_offset,
    })
}

/// Where the BAT lies, as (offset, bytes, end): checks that
/// `max_table_entries` covers the virtual size, that the table is not too
/// large to hold in memory, and that it lies inside the file and over none
/// of the `forbidden` ranges, in that order.
fn table_extent(
    path: &Path,
    h: &DynamicHeader,
    virtual_size: u64,
    file_len: u64,
    forbidden: &[(u64, u64, &str)],
) -> Result<(u64, u64, u64)> {
    let block_size = h.block_size as u64;
    let needed = virtual_size.div_ceil(block_size);
    let entries_at = h.at + 28;
    if (h.max_table_entries as u64) < needed {
        return Err(ImageError::corrupt(
            path,
            entries_at,
            format!(
                "max_table_entries {} is too small: a virtual size of {virtual_size} bytes in \
                 {block_size}-byte blocks needs {needed} BAT entries",
                h.max_table_entries
            ),
        ));
    }
    let bytes = needed * 4;
    if bytes > MAX_BAT_BYTES {
        return Err(ImageError::unsupported(
            path,
            format!(
                "BAT of {needed} entries ({bytes} bytes, block size {block_size}) is larger than \
                 the {MAX_BAT_BYTES} bytes snaptree holds in memory"
            ),
        ));
    }
    let at = h.table_offset;
    let table_field = h.at + 16;
    let end = at.checked_add(bytes).filter(|e| *e <= file_len);
    let Some(end) = end else {
        return Err(ImageError::corrupt(
            path,
            table_field,
            format!(
                "BAT at offset {at} ({bytes} bytes) extends past the end of the file ({file_len} bytes)"
            ),
        ));
    };
    if let Some((_, _, name)) = forbidden.iter().find(|(s, e, _)| at < *e && *s < end) {
        return Err(ImageError::corrupt(
            path,
            table_field,
            format!("BAT at offset {at} ({bytes} bytes) overlaps the {name}"),
        ));
    }
    Ok((at, bytes, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_runs() {
        let map = [0xff, 0x0f, 0x00, 0x80];
        assert_eq!(
            runs(&map, 0, 32, BitOrder::MsbFirst),
            vec![
                (0, 8, true),
                (8, 12, false),
                (12, 16, true),
                (16, 24, false),
                (24, 25, true),
                (25, 32, false)
            ]
        );
        assert_eq!(
            runs(&map, 10, 14, BitOrder::MsbFirst),
            vec![(10, 12, false), (12, 14, true)]
        );
        assert_eq!(
            runs(&[0x01], 0, 8, BitOrder::LsbFirst),
            vec![(0, 1, true), (1, 8, false)]
        );
        assert!(all_set(&[0xff, 0xc0], 10, BitOrder::MsbFirst));
        assert!(!all_set(&[0xff, 0x40], 10, BitOrder::MsbFirst));
        assert!(!all_set(&[0xff], 10, BitOrder::MsbFirst));
    }

    #[test]
    fn full_bits() {
        let f = FullBlocks::new(130);
        f.set(129);
        f.set(3);
        assert!(f.get(129) && f.get(3) && !f.get(4) && !f.get(1000));
        assert_eq!(f.count(), 2);
    }
}
