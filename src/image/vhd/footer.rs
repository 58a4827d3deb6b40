//! The VHD hard disk footer, declared once with the field names of
//! Microsoft's "Virtual Hard Disk Image Format Specification" (v1.0) and
//! parsed with every field checked before anything else trusts it.
//!
//! Every VHD ends in a 512-byte footer; dynamic and differencing disks keep
//! a copy of it at offset 0. The copy at the end is authoritative; the
//! copy at the start is used when the end holds no footer (a block
//! allocation interrupted between writing the block and rewriting the
//! footer), as XCP's libvhd does. Virtual PC before 2004 wrote 511-byte
//! footers on fixed disks; those are accepted too.
//!
//! The virtual size follows QEMU's `vpc` driver, so that snaptree agrees
//! with `qemu-img info` and `qemu-img convert`: images written by Virtual
//! PC (`vpc `) and by QEMU without `force_size` (`qemu`) are as large as
//! their CHS geometry says; every other creator (Hyper-V `win `, QEMU with
//! `force_size` `qem2`, XenServer `tap\0`, disk2vhd, Azure, ...) and any
//! image whose geometry is the maximum use `current_size`.

use crate::error::{ImageError, Result};
use crate::fileio::{be_u16, be_u32, be_u64, file_len, read_exact_at};
use crate::image::storage::Storage;
use std::path::Path;

pub const COOKIE: &[u8; 8] = b"conectix";
pub const FOOTER_LEN: u64 = 512;
/// Virtual PC before 2004 wrote footers one byte short.
pub const SHORT_FOOTER_LEN: u64 = 511;

/// `Disk Type` values.
pub const DISK_FIXED: u32 = 2;
pub const DISK_DYNAMIC: u32 = 3;
pub const DISK_DIFFERENCING: u32 = 4;

/// Byte offsets of fields inside the footer.
pub const OFF_CHECKSUM: usize = 64;
pub const OFF_UNIQUE_ID: usize = 68;
/// XCP's tapdisk keeps its "hidden" flag in the first reserved byte.
const OFF_TAPDISK_HIDDEN: usize = 85;

/// CHS geometry QEMU writes when the size cannot be expressed in CHS: the
/// size then comes from `current_size`.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// The largest disk the format allows (2040 GiB), as QEMU enforces.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// VHD time stamps count seconds from 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// `t` as a VHD time stamp (seconds since 2000, saturating at both ends).
pub fn vhd_time(t: std::time::SystemTime) -> u32 {
    let unix = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    unix.saturating_sub(VHD_EPOCH_UNIX).min(u32::MAX as u64) as u32
}

/// `Disk Geometry`: cylinders, heads, sectors per track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    pub cylinder: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl DiskGeometry {
    pub fn sectors(&self) -> u64 {
        self.cylinder as u64 * self.heads as u64 * self.sectors_per_track as u64
    }

    /// The geometry QEMU writes when the size is not a CHS size (and
    /// `force_size`): readers then take the size from `current_size`.
    pub const MAX: DiskGeometry = DiskGeometry {
        cylinder: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// The CHS geometry of the spec's appendix for `total` sectors; it
    /// may describe fewer sectors than `total` (it rounds down).
    pub fn for_sectors(total: u64) -> DiskGeometry {
        let total = total.min(MAX_CHS_SECTORS);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            (spt, heads, cth) = (s, h, c);
        }
        DiskGeometry {
            cylinder: (cth / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }
}

/// The parsed footer. Field names follow the spec.
#[derive(Clone, Debug)]
pub struct Footer {
    pub features: u32,
    pub file_format_version: u32,
    pub data_offset: u64,
    pub time_stamp: u32,
    pub creator_application: [u8; 4],
    pub creator_version: u32,
    pub creator_host_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub disk_geometry: DiskGeometry,
    pub disk_type: u32,
    pub checksum: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    /// XCP's "hidden" flag (a reserved byte in the spec).
    pub tapdisk_hidden: u8,
    // Where it came from:
    /// File offset of the footer that was used.
    pub at: u64,
    /// 512, or 511 for an old Virtual PC fixed disk.
    pub len: u64,
    /// The end of the file holds no footer; the copy at offset 0 was used.
    pub from_head_copy: bool,
}

/// One's complement of the byte sum, skipping the 4-byte checksum field at
/// `skip` (the checksum of the footer, the dynamic header and XCP's batmap).
pub fn checksum(bytes: &[u8], skip: Option<usize>) -> u32 {
    let mut sum: u32 = 0;
    for (i, b) in bytes.iter().enumerate() {
        if skip.is_some_and(|s| (s..s + 4).contains(&i)) {
            continue;
        }
        sum = sum.wrapping_add(*b as u32);
    }
    !sum
}

/// The 16 bytes of a VHD unique id as text (bytes in file order, as
/// `vhdiinfo` prints them).
pub fn format_uuid(id: &[u8; 16]) -> String {
    crate::units::uuid_text(id)
}

fn disk_type_name(t: u32) -> &'static str {
    match t {
        0 => "none",
        1 => "reserved (deprecated)",
        DISK_FIXED => "fixed",
        DISK_DYNAMIC => "dynamic",
        DISK_DIFFERENCING => "differencing",
        5 | 6 => "reserved (deprecated)",
        _ => "unknown",
    }
}

impl Footer {
    /// Parses and checks the footer in `b` (512 bytes; a 511-byte footer is
    /// passed padded with a zero, which leaves its checksum unchanged),
    /// read at file offset `at`.
    pub fn parse(b: &[u8; 512], path: &Path, at: u64, len: u64) -> Result<Footer> {
        let bad = |off: usize, what: String| ImageError::corrupt(path, at + off as u64, what);
        if &b[0..8] != COOKIE {
            return Err(bad(0, "no VHD footer cookie \"conectix\"".into()));
        }
        let mut creator_application = [0u8; 4];
        creator_application.copy_from_slice(&b[28..32]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16]);
        let f = Footer {
            features: be_u32(b, 8),
            file_format_version: be_u32(b, 12),
            data_offset: be_u64(b, 16),
            time_stamp: be_u32(b, 24),
            creator_application,
            creator_version: be_u32(b, 32),
            creator_host_os: be_u32(b, 36),
            original_size: be_u64(b, 40),
            current_size: be_u64(b, 48),
            disk_geometry: DiskGeometry {
                cylinder: be_u16(b, 56),
                heads: b[58],
                sectors_per_track: b[59],
            },
            disk_type: be_u32(b, 60),
            checksum: be_u32(b, OFF_CHECKSUM),
            unique_id,
            saved_state: b[84],
            tapdisk_hidden: b[OFF_TAPDISK_HIDDEN],
            at,
            len,
            from_head_copy: false,
        };
        let computed = checksum(b, Some(OFF_CHECKSUM));
        if computed != f.checksum && !f.tapdisk_unhidden_checksum_matches(b) {
            return Err(bad(
                OFF_CHECKSUM,
                format!(
                    "footer checksum 0x{:08x} does not match the footer's contents (0x{computed:08x}); \
                     the footer is damaged, repair or replace the image",
                    f.checksum
                ),
            ));
        }
        if f.file_format_version >> 16 != 1 {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "VHD file format version 0x{:08x} (at offset {}); only version 1.x exists",
                    f.file_format_version,
                    at + 12
                ),
            ));
        }
        if !matches!(f.disk_type, DISK_FIXED | DISK_DYNAMIC | DISK_DIFFERENCING) {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "VHD disk type {} ({}) at offset {}; only fixed (2), dynamic (3) and differencing (4) disks exist",
                    f.disk_type,
                    disk_type_name(f.disk_type),
                    at + 60
                ),
            ));
        }
        if len == SHORT_FOOTER_LEN && f.disk_type != DISK_FIXED {
            return Err(bad(
                60,
                format!(
                    "a 511-byte footer (old Virtual PC) on a {} disk; only fixed disks had those",
                    disk_type_name(f.disk_type)
                ),
            ));
        }
        Ok(f)
    }

    /// The footer as stored: 512 bytes with a fresh checksum (the
    /// `checksum` field is ignored).
    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.file_format_version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.time_stamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_application);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.disk_geometry.cylinder.to_be_bytes());
        b[58] = self.disk_geometry.heads;
        b[59] = self.disk_geometry.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        b[OFF_TAPDISK_HIDDEN] = self.tapdisk_hidden;
        let sum = checksum(&b, Some(OFF_CHECKSUM));
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Early XCP tools set the hidden flag without updating the checksum;
    /// libvhd accepts such footers, so do we.
    fn tapdisk_unhidden_checksum_matches(&self, b: &[u8; 512]) -> bool {
        if self.tapdisk_hidden == 0
            || &self.creator_application[..3] != b"tap"
            || !matches!(self.creator_version, 0x0000_0001 | 0x0001_0001)
        {
            return false;
        }
        let mut copy = *b;
        copy[OFF_TAPDISK_HIDDEN] = 0;
        checksum(&copy, Some(OFF_CHECKSUM)) == self.checksum
    }

    /// Reads the footer of `file`: at the end, else (dynamic and
    /// differencing disks) the copy at offset 0. A copy that is present is
    /// checked too: a damaged copy means a damaged image.
    pub fn read(file: &dyn Storage, path: &Path) -> Result<Footer> {
        let len = file_len(file, path)?;
        if len < SHORT_FOOTER_LEN {
            return Err(ImageError::corrupt(
                path,
                0,
                format!("file is {len} bytes, shorter than the 512-byte VHD footer (truncated?)"),
            ));
        }
        let mut tail = [0u8; 512];
        let tail_at = len.saturating_sub(FOOTER_LEN);
        // The last min(len, 512) bytes, right-aligned: a 511-byte footer
        // is then always `tail[1..]`.
        let n = (len - tail_at) as usize;
        read_exact_at(file, path, &mut tail[512 - n..], tail_at, "VHD footer")?;
        let mut head = [0u8; 512];
        let head_has_cookie = len >= FOOTER_LEN && {
            read_exact_at(file, path, &mut head, 0, "VHD footer copy")?;
            &head[0..8] == COOKIE
        };
        let end = if n == 512 && &tail[0..8] == COOKIE {
            Some(Footer::parse(&tail, path, tail_at, FOOTER_LEN)?)
        } else if &tail[1..9] == COOKIE {
            let at = len - SHORT_FOOTER_LEN;
            let mut short = [0u8; 512];
            short[..511].copy_from_slice(&tail[1..]);
            Some(Footer::parse(&short, path, at, SHORT_FOOTER_LEN)?)
        } else {
            None
        };
        match end {
            Some(f) if f.disk_type == DISK_FIXED => Ok(f),
            Some(f) => {
                // A dynamic disk's copy at 0 must be intact if present; a
                // fixed disk's first sector is guest data and may be anything.
                if head_has_cookie && tail_at != 0 {
                    Footer::parse(&head, path, 0, FOOTER_LEN)?;
                }
                Ok(f)
            }
            None if head_has_cookie => {
                let mut f = Footer::parse(&head, path, 0, FOOTER_LEN)?;
                if f.disk_type == DISK_FIXED {
                    return Err(ImageError::corrupt(
                        path,
                        tail_at,
                        "fixed VHD without a footer at the end of the file (truncated?)",
                    ));
                }
                tracing::warn!(
                    "{}: no VHD footer at the end of the file (offset {tail_at}); using the copy at offset 0",
                    path.display()
                );
                f.from_head_copy = true;
                Ok(f)
            }
            None => Err(ImageError::corrupt(
                path,
                tail_at,
                "no VHD footer: neither the last 512 bytes nor the first 512 bytes start with \"conectix\"",
            )),
        }
    }

    /// Creator application as text, e.g. `qemu`, `win `, `tap`.
    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_application)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }

    /// Whether QEMU sizes this image by its CHS geometry (see module docs).
    pub fn size_from_chs(&self) -> bool {
        matches!(&self.creator_application, b"vpc " | b"qemu")
            && self.disk_geometry.sectors() != MAX_CHS_SECTORS
    }

    /// The virtual size in bytes (whole sectors), as QEMU computes it.
    pub fn virtual_size(&self, path: &Path) -> Result<u64> {
        let sectors = if self.size_from_chs() {
            self.disk_geometry.sectors()
        } else {
            self.current_size / 512
        };
        if sectors > MAX_SECTORS {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "virtual size of {} bytes (footer at offset {}) exceeds the VHD maximum of 2040 GiB",
                    sectors * 512,
                    self.at
                ),
            ));
        }
        Ok(sectors * 512)
    }

    pub fn is_fixed(&self) -> bool {
        self.disk_type == DISK_FIXED
    }

    pub fn is_differencing(&self) -> bool {
        self.disk_type == DISK_DIFFERENCING
    }

    pub fn disk_type_name(&self) -> &'static str {
        disk_type_name(self.disk_type)
    }
}

/// Whether `file` is a fixed VHD: no magic at the start, but a valid fixed
/// disk footer at the end (QEMU needs `-f vpc` for those; we recognise
/// them, since only a checksummed footer of type fixed matches).
pub fn is_fixed_vhd(file: &dyn Storage, path: &Path) -> bool {
    Footer::read(file, path).is_ok_and(|f| f.is_fixed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_skips_its_field() {
        let mut b = [0u8; 512];
        b[0] = 1;
        b[64..68].copy_from_slice(&[0xff; 4]);
        assert_eq!(checksum(&b, Some(64)), !1u32);
    }

    #[test]
    fn geometry_of_the_spec() {
        // 8 MiB: 16384 sectors = 240 x 4 x 17 (16320, rounded down).
        let g = DiskGeometry::for_sectors(16384);
        assert_eq!((g.cylinder, g.heads, g.sectors_per_track), (240, 4, 17));
        let g = DiskGeometry::for_sectors(u64::MAX);
        assert_eq!(g, DiskGeometry::MAX);
    }

    #[test]
    fn encode_parses_back() {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(COOKIE);
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[60..64].copy_from_slice(&DISK_DYNAMIC.to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 20).to_be_bytes());
        let sum = checksum(&b, Some(OFF_CHECKSUM));
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        let f = Footer::parse(&b, Path::new("x"), 0, FOOTER_LEN).unwrap();
        assert_eq!(f.encode(), b);
    }

    #[test]
    fn uuid_text() {
        let id = [
            0x28, 0xf3, 0x3c, 0xfd, 0xdb, 0xc0, 0x4d, 0x53, 0x9f, 0xf3, 0x8e, 0xbd, 0x5f, 0xf5,
            0x41, 0xf3,
        ];
        assert_eq!(format_uuid(&id), "28f33cfd-dbc0-4d53-9ff3-8ebd5ff541f3");
    }
}
