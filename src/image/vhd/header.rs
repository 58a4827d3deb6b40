//! The dynamic disk header ("cxsparse") of dynamic and differencing VHDs,
//! and the parent locators of differencing disks, declared once with the
//! spec's field names and checked field by field.
//!
//! A differencing disk names its parent several ways: up to eight parent
//! locators (platform code, data offset and length in the file) and the
//! parent's Unicode name in the header. We try them in the order that
//! survives a tree being copied to another directory or host: the relative
//! Windows path (`W2ru`), the Mac OS X URL (`MacX`, relative as XCP writes
//! it, else its last component), the absolute Windows path's last
//! component (`W2ku`), then the last component of the Unicode name. The
//! first candidate that exists next to the child wins; if none exists the
//! first one is reported, so the "missing backing file" error names what
//! the image asked for.

use super::footer::{checksum, Footer, FOOTER_LEN};
use crate::error::{ImageError, Result};
use crate::fileio::{be_u32, be_u64, read_exact_at};
use crate::image::storage::Storage;
use std::path::Path;

pub const COOKIE: &[u8; 8] = b"cxsparse";
pub const HEADER_LEN: u64 = 1024;
pub const OFF_CHECKSUM: usize = 36;
pub const OFF_PARENT_UNIQUE_ID: usize = 40;
pub const OFF_PARENT_UNICODE_NAME: usize = 64;
pub const OFF_PARENT_LOCATORS: usize = 576;
pub const LOCATOR_ENTRIES: usize = 8;
const LOCATOR_ENTRY_LEN: usize = 24;

/// Smallest and largest block sizes we accept. The spec's default is
/// 2 MiB; QEMU accepts any power of two from 512 bytes; 256 MiB bounds the
/// memory one sector bitmap may take (64 KiB).
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Locator data is one path; Windows paths stop at 32767 UTF-16 units.
pub const MAX_LOCATOR_BYTES: u32 = 64 << 10;

/// Platform codes of parent locators.
pub const PLAT_NONE: u32 = 0;
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLAT_MAC: u32 = u32::from_be_bytes(*b"Mac ");
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

/// One `Parent Locator Entry`. Field names follow the spec.
#[derive(Clone, Debug, Default)]
pub struct ParentLocator {
    pub platform_code: u32,
    /// Sectors reserved for the locator, though Hyper-V and Virtual PC
    /// store bytes here; informational only, we read `platform_data_length`.
    pub platform_data_space: u32,
    pub platform_data_length: u32,
    pub platform_data_offset: u64,
}

impl ParentLocator {
    pub fn code_name(&self) -> String {
        String::from_utf8_lossy(&self.platform_code.to_be_bytes()).into_owned()
    }
}

/// The parsed dynamic disk header. Field names follow the spec.
#[derive(Clone, Debug)]
pub struct DynamicHeader {
    pub data_offset: u64,
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub checksum: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_time_stamp: u32,
    /// The raw 512 bytes of `Parent Unicode Name` (UTF-16 big endian).
    pub parent_unicode_name: Vec<u8>,
    pub parent_locators: Vec<ParentLocator>,
    /// File offset of this header (the footer's `data_offset`).
    pub at: u64,
}

/// Where the parent of a differencing disk is, as the child names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentName {
    /// A path relative to the child's directory (or absolute).
    pub name: String,
    /// File offset where the chosen name is stored.
    pub offset: u64,
    /// Which field it came from (`W2ru`, `MacX`, `W2ku`, `parent name`).
    pub source: &'static str,
}

impl DynamicHeader {
    /// Reads and checks the header the footer points at.
    pub fn read(
        file: &dyn Storage,
        path: &Path,
        footer: &Footer,
        file_len: u64,
    ) -> Result<DynamicHeader> {
        let at = footer.data_offset;
        let field = footer.at + 16;
        if at < FOOTER_LEN || at.checked_add(HEADER_LEN).is_none_or(|e| e > file_len) {
            return Err(ImageError::corrupt(
                path,
                field,
                format!(
                    "data_offset {at} does not point at a 1024-byte dynamic disk header inside the file \
                     ({file_len} bytes) after the footer copy"
                ),
            ));
        }
        let mut b = vec![0u8; HEADER_LEN as usize];
        read_exact_at(file, path, &mut b, at, "VHD dynamic disk header")?;
        let bad = |off: usize, what: String| ImageError::corrupt(path, at + off as u64, what);
        if &b[0..8] != COOKIE {
            return Err(bad(
                0,
                "no dynamic disk header cookie \"cxsparse\" where the footer's data_offset points"
                    .into(),
            ));
        }
        let h = DynamicHeader::decode(&b, at);
        h.check(path, &b)?;
        Ok(h)
    }

    /// The header's fields from its 1024 bytes `b`, read at offset `at`;
    /// nothing is checked here.
    fn decode(b: &[u8], at: u64) -> DynamicHeader {
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&b[OFF_PARENT_UNIQUE_ID..OFF_PARENT_UNIQUE_ID + 16]);
        let parent_locators = (0..LOCATOR_ENTRIES)
            .map(|i| {
                let o = OFF_PARENT_LOCATORS + i * LOCATOR_ENTRY_LEN;
                ParentLocator {
                    platform_code: be_u32(b, o),
                    platform_data_space: be_u32(b, o + 4),
                    platform_data_length: be_u32(b, o + 8),
                    platform_data_offset: be_u64(b, o + 16),
                }
            })
            .collect();
        DynamicHeader {
            data_offset: be_u64(b, 8),
            table_offset: be_u64(b, 16),
            header_version: be_u32(b, 24),
            max_table_entries: be_u32(b, 28),
            block_size: be_u32(b, 32),
            checksum: be_u32(b, OFF_CHECKSUM),
            parent_unique_id,
            parent_time_stamp: be_u32(b, 56),
            parent_unicode_name: b[OFF_PARENT_UNICODE_NAME..OFF_PARENT_UNICODE_NAME + 512].to_vec(),
            parent_locators,
            at,
        }
    }

    /// Checks the checksum over `b`, the version and the block size, in
    /// that order, naming the offset of the first bad field.
    fn check(&self, path: &Path, b: &[u8]) -> Result<()> {
        let at = self.at;
        let bad = |off: usize, what: String| ImageError::corrupt(path, at + off as u64, what);
        let computed = checksum(b, Some(OFF_CHECKSUM));
        if computed != self.checksum {
            return Err(bad(
                OFF_CHECKSUM,
                format!(
                    "dynamic disk header checksum 0x{:08x} does not match the header's contents \
                     (0x{computed:08x}); the header is damaged, repair or replace the image",
                    self.checksum
                ),
            ));
        }
        if self.header_version >> 16 != 1 {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "dynamic disk header version 0x{:08x} (at offset {}); only version 1.x exists",
                    self.header_version,
                    at + 24
                ),
            ));
        }
        let bs = self.block_size;
        if bs == 0 || !bs.is_power_of_two() {
            return Err(bad(
                32,
                format!("block_size {bs} is not a power of two (the default is 2 MiB)"),
            ));
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "block_size {bs} at offset {} is outside {MIN_BLOCK_SIZE} bytes..256 MiB",
                    at + 32
                ),
            ));
        }
        Ok(())
    }

    /// The header as stored: 1024 bytes with a fresh checksum (the
    /// `checksum` and `at` fields are ignored; at most eight locators).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&self.data_offset.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[OFF_PARENT_UNIQUE_ID..OFF_PARENT_UNIQUE_ID + 16].copy_from_slice(&self.parent_unique_id);
        b[56..60].copy_from_slice(&self.parent_time_stamp.to_be_bytes());
        let name = &self.parent_unicode_name[..self.parent_unicode_name.len().min(512)];
        b[OFF_PARENT_UNICODE_NAME..OFF_PARENT_UNICODE_NAME + name.len()].copy_from_slice(name);
        for (i, loc) in self
            .parent_locators
            .iter()
            .take(LOCATOR_ENTRIES)
            .enumerate()
        {
            let o = OFF_PARENT_LOCATORS + i * LOCATOR_ENTRY_LEN;
            b[o..o + 4].copy_from_slice(&loc.platform_code.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&loc.platform_data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&loc.platform_data_length.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&loc.platform_data_offset.to_be_bytes());
        }
        let sum = checksum(&b, Some(OFF_CHECKSUM));
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// File ranges holding the data of locators with a known platform code
    /// (for overlap checks before writing), not validated: empty, unused
    /// and unknown entries are left out.
    pub fn locator_ranges(&self) -> Vec<(u64, u64)> {
        const KNOWN: [u32; 6] = [
            PLAT_W2RU, PLAT_W2KU, PLAT_MACX, PLAT_WI2R, PLAT_WI2K, PLAT_MAC,
        ];
        self.parent_locators
            .iter()
            .filter(|l| KNOWN.contains(&l.platform_code) && l.platform_data_length > 0)
            .map(|l| {
                let s = l.platform_data_offset;
                (s, s.saturating_add(l.platform_data_length as u64))
            })
            .collect()
    }

    /// Bytes of the sector bitmap in front of each block: one bit per
    /// sector, padded to whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        (self.block_size as u64 / 512).div_ceil(8).div_ceil(512) * 512
    }

    /// Reads locator `i`'s data and decodes it into a path, or `None` for an
    /// empty or unused entry. Deprecated and unknown platform codes are
    /// skipped (their data is in formats nobody writes any more).
    fn read_locator(
        &self,
        file: &dyn Storage,
        path: &Path,
        i: usize,
        file_len: u64,
        forbidden: &[(u64, u64, &str)],
    ) -> Result<Option<(String, u64)>> {
        let loc = &self.parent_locators[i];
        let entry_at = self.at + (OFF_PARENT_LOCATORS + i * LOCATOR_ENTRY_LEN) as u64;
        if loc.platform_code == PLAT_NONE || loc.platform_data_length == 0 {
            return Ok(None);
        }
        if !matches!(loc.platform_code, PLAT_W2RU | PLAT_W2KU | PLAT_MACX) {
            if !matches!(loc.platform_code, PLAT_WI2R | PLAT_WI2K | PLAT_MAC) {
                tracing::warn!(
                    "{}: parent locator {i} (offset {entry_at}) has unknown platform code 0x{:08x}; ignored",
                    path.display(),
                    loc.platform_code
                );
            }
            return Ok(None);
        }
        let (off, len) = (loc.platform_data_offset, loc.platform_data_length as u64);
        let what = format!("parent locator {i} ({})", loc.code_name());
        if len > MAX_LOCATOR_BYTES as u64 {
            return Err(ImageError::corrupt(
                path,
                entry_at + 8,
                format!("{what}: platform_data_length {len} is larger than any path ({MAX_LOCATOR_BYTES} bytes)"),
            ));
        }
        let end = off.checked_add(len).filter(|e| *e <= file_len);
        let Some(end) = end else {
            return Err(ImageError::corrupt(
                path,
                entry_at + 16,
                format!(
                    "{what}: data at offset {off}, length {len} extends past the end of the file ({file_len} bytes)"
                ),
            ));
        };
        if let Some((_, _, name)) = forbidden.iter().find(|(s, e, _)| off < *e && *s < end) {
            return Err(ImageError::corrupt(
                path,
                entry_at + 16,
                format!("{what}: data at offset {off}, length {len} overlaps the {name}"),
            ));
        }
        let mut raw = vec![0u8; len as usize];
        read_exact_at(file, path, &mut raw, off, "parent locator data")?;
        let text = decode_locator_text(path, loc.platform_code, &what, off, raw)?;
        let name = locator_name(path, loc.platform_code, &what, off, &text)?;
        Ok(name.map(|n| (n, off)))
    }

    /// The parent's file name as the child names it (see module docs),
    /// relative to the directory of the child at `path`. Locator data must
    /// lie inside the file and outside the `forbidden` metadata ranges.
    pub fn parent_name(
        &self,
        file: &dyn Storage,
        path: &Path,
        file_len: u64,
        forbidden: &[(u64, u64, &str)],
    ) -> Result<ParentName> {
        let mut found: Vec<(u32, String, u64)> = Vec::new();
        for i in 0..LOCATOR_ENTRIES {
            if let Some((name, off)) = self.read_locator(file, path, i, file_len, forbidden)? {
                found.push((self.parent_locators[i].platform_code, name, off));
            }
        }
        let mut candidates: Vec<ParentName> = Vec::new();
        for (code, source) in [
            (PLAT_W2RU, "W2ru"),
            (PLAT_MACX, "MacX"),
            (PLAT_W2KU, "W2ku"),
        ] {
            for (_, name, offset) in found.iter().filter(|(c, _, _)| *c == code) {
                candidates.push(ParentName {
                    name: name.clone(),
                    offset: *offset,
                    source,
                });
            }
        }
        let name_at = self.at + OFF_PARENT_UNICODE_NAME as u64;
        match decode_utf16_name(&self.parent_unicode_name).map(|n| last_component(&n)) {
            Some(Some(name)) => candidates.push(ParentName {
                name,
                offset: name_at,
                source: "parent name",
            }),
            Some(None) => {}
            None if candidates.is_empty() => return Err(ImageError::corrupt(
                path,
                name_at,
                "differencing disk: no parent locator, and the parent Unicode name is not UTF-16",
            )),
            None => {}
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let first = candidates.first().cloned().ok_or_else(|| {
            ImageError::corrupt(
                path,
                self.at + OFF_PARENT_LOCATORS as u64,
                "differencing disk names no parent: no usable parent locator (W2ru, W2ku, MacX) \
                 and an empty parent Unicode name",
            )
        })?;
        Ok(candidates
            .into_iter()
            .find(|c| dir.join(&c.name).exists())
            .unwrap_or(first))
    }
}

/// UTF-16 (little endian unless `big_endian`) to text; `None` if invalid
/// or of odd length.
fn decode_utf16(raw: &[u8], big_endian: bool) -> Option<String> {
    if !raw.len().is_multiple_of(2) {
        return None;
    }
    let units = raw.chunks_exact(2).map(|c| {
        if big_endian {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_le_bytes([c[0], c[1]])
        }
    });
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .ok()
}

/// The `Parent Unicode Name` field: UTF-16 big endian up to the first NUL;
/// XCP's first tapdisk wrote host-order UTF-16 with a byte order mark.
fn decode_utf16_name(raw: &[u8]) -> Option<String> {
    let (body, big_endian) = match raw {
        [0xff, 0xfe, rest @ ..] => (rest, false),
        [0xfe, 0xff, rest @ ..] => (rest, true),
        _ => (raw, true),
    };
    let end = body
        .chunks_exact(2)
        .position(|c| c == [0, 0])
        .map_or(body.len() - body.len() % 2, |p| p * 2);
    decode_utf16(&body[..end], big_endian)
}

/// A relative path as Windows writes it (`.\dir\parent.vhd`), as a Unix
/// relative path (`dir/parent.vhd`). An absolute one (drive letter or
/// leading separator) yields its last component.
fn relative_windows_path(p: &str) -> Option<String> {
    let p = p.replace('\\', "/");
    let bytes = p.as_bytes();
    if p.starts_with('/') || (bytes.len() >= 2 && bytes[1] == b':') {
        return last_component(&p);
    }
    let mut rest = p.as_str();
    while let Some(r) = rest.strip_prefix("./") {
        rest = r;
    }
    let rest = rest.trim_end_matches('/');
    (!rest.is_empty() && rest != "." && rest != ".." && !rest.contains('\0'))
        .then(|| rest.to_string())
}

/// The file name at the end of a Windows or Unix path.
fn last_component(p: &str) -> Option<String> {
    let name = p.rsplit(['\\', '/']).next().unwrap_or("");
    (!name.is_empty() && name != "." && name != ".." && !name.contains('\0'))
        .then(|| name.to_string())
}

/// `%XX` escapes of a URL path, decoded (Mac OS X writes them).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

/// A locator's data as text: UTF-8 for Mac OS X URLs, UTF-16LE for
/// Windows paths, without trailing NULs; `what` and `off` name it in errors.
fn decode_locator_text(
    path: &Path,
    code: u32,
    what: &str,
    off: u64,
    raw: Vec<u8>,
) -> Result<String> {
    let text = if code == PLAT_MACX {
        String::from_utf8(raw)
            .map_err(|_| ImageError::corrupt(path, off, format!("{what}: data is not UTF-8")))?
    } else {
        decode_utf16(&raw, false).ok_or_else(|| {
            ImageError::corrupt(path, off, format!("{what}: data is not UTF-16LE"))
        })?
    };
    Ok(text.trim_end_matches('\0').to_string())
}

/// The parent's file name a locator's text gives: a relative or absolute
/// Windows path, or a file:// URL (Mac OS X); `None` when it has no usable
/// name.
fn locator_name(
    path: &Path,
    code: u32,
    what: &str,
    off: u64,
    text: &str,
) -> Result<Option<String>> {
    Ok(match code {
        PLAT_W2RU => relative_windows_path(text),
        PLAT_W2KU => last_component(text),
        _ => {
            let Some(url) = text.strip_prefix("file://") else {
                return Err(ImageError::corrupt(
                    path,
                    off,
                    format!("{what}: {text:?} is not a file:// URL"),
                ));
            };
            let url = percent_decode(url.strip_prefix("localhost").unwrap_or(url));
            if url.starts_with('/') {
                last_component(&url)
            } else {
                relative_windows_path(&url)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_relative_paths() {
        assert_eq!(
            relative_windows_path(".\\parent.vhd").as_deref(),
            Some("parent.vhd")
        );
        assert_eq!(
            relative_windows_path("..\\base\\p.vhd").as_deref(),
            Some("../base/p.vhd")
        );
        assert_eq!(
            relative_windows_path("C:\\vms\\p.vhd").as_deref(),
            Some("p.vhd")
        );
        assert_eq!(relative_windows_path(".\\"), None);
    }

    #[test]
    fn names() {
        assert_eq!(last_component("C:\\a\\b.vhd").as_deref(), Some("b.vhd"));
        assert_eq!(last_component("/srv/x.vhd").as_deref(), Some("x.vhd"));
        assert_eq!(last_component("dir/"), None);
        assert_eq!(percent_decode("/a%20b.vhd"), "/a b.vhd");
        assert_eq!(percent_decode("/a%2"), "/a%2");
        let mut raw = vec![0u8; 512];
        for (i, c) in "p.vhd".encode_utf16().enumerate() {
            raw[2 * i..2 * i + 2].copy_from_slice(&c.to_be_bytes());
        }
        assert_eq!(decode_utf16_name(&raw).as_deref(), Some("p.vhd"));
    }
}
