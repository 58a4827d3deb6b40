//! The qcow2 header and its extensions, declared once with the spec's field
//! names (QEMU's docs/interop/qcow2.rst) and parsed with every field checked
//! before anything else trusts it.

use crate::error::{ImageError, Result};
use crate::fileio::{be_u32, be_u64, file_len, read_exact_at};
use crate::image::storage::Storage;
use std::path::Path;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Size of the fixed version 2 header.
pub const V2_HEADER_LEN: usize = 72;
/// Size of the fixed version 3 header up to and including `header_length`.
pub const V3_HEADER_LEN: usize = 104;
/// Our own images carry compression_type and padding: 112 bytes.
pub const V3_HEADER_LEN_WITH_COMPRESSION: usize = 112;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of the fields we rewrite in place.
pub const OFF_REFCOUNT_TABLE_OFFSET: u64 = 48;
pub const OFF_AUTOCLEAR: u64 = 88;
/// Where the incompatible feature bits lie (v3).
pub const OFF_INCOMPATIBLE: u64 = 72;
/// nb_snapshots (4 bytes) then snapshots_offset (8): one 12-byte write.
pub const OFF_NB_SNAPSHOTS: u64 = 60;

/// QEMU refuses L1 tables above 32 MiB; so do we (bounds memory).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Compression method of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// The parsed header. Field names follow the spec.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    // From header extensions:
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// (type, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
    pub has_bitmaps: bool,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Human names of the features in use, for `info`.
    pub fn feature_list(&self) -> Vec<String> {
        let mut out = Vec::new();
        let named = |kind: u8, bit: u8, default: &str| -> String {
            self.feature_names
                .iter()
                .find(|(t, b, _)| *t == kind && *b == bit)
                .map(|(_, _, n)| n.clone())
                .unwrap_or_else(|| default.to_string())
        };
        for bit in 0..64u8 {
            // Bit 3 (compression type) is named with its value below.
            if self.incompatible_features & (1 << bit) != 0 && bit != 3 {
                out.push(named(0, bit, &format!("incompatible bit {bit}")));
            }
            if self.compatible_features & (1 << bit) != 0 {
                out.push(named(1, bit, &format!("compatible bit {bit}")));
            }
            if self.autoclear_features & (1 << bit) != 0 {
                out.push(named(2, bit, &format!("autoclear bit {bit}")));
            }
        }
        if self.compression_type == CompressionType::Zstd {
            out.push("compression type zstd".into());
        }
        out.push(format!("refcount bits {}", 1u32 << self.refcount_order));
        out
    }

    /// Reads and validates the header of `file` at `path`.
    pub fn read(file: &dyn Storage, path: &Path) -> Result<Header> {
        let len = file_len(file, path)?;
        let mut h = Header::read_v2(file, path, len)?;
        if h.version == 3 {
            h.read_v3(file, path, len)?;
        }
        h.validate(path, len)?;
        h.read_extensions(file, path, len)?;
        h.read_backing_name(file, path, len)?;
        h.check_features(path)?;
        Ok(h)
    }

    /// The version 2 fields (the first 72 bytes), after checking the file
    /// length, magic, version and cluster size in that order; the v3
    /// fields keep their defaults here.
    fn read_v2(file: &dyn Storage, path: &Path, len: u64) -> Result<Header> {
        let bad = |offset: u64, what: String| ImageError::corrupt(path, offset, what);
        if len < V2_HEADER_LEN as u64 {
            return Err(bad(
                0,
                format!("file is {len} bytes, shorter than the 72-byte qcow2 header (truncated?)"),
            ));
        }
        let mut fixed = [0u8; V2_HEADER_LEN];
        read_exact_at(file, path, &mut fixed, 0, "qcow2 header")?;
        if &fixed[0..4] != MAGIC {
            return Err(bad(0, "no qcow2 magic".into()));
        }
        let version = be_u32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(ImageError::unsupported(
                path,
                format!("qcow2 version {version} (at offset 4); only versions 2 and 3 exist"),
            ));
        }
        let cluster_bits = be_u32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(
                20,
                format!("cluster_bits {cluster_bits} outside 9..=21 (512 B..2 MiB)"),
            ));
        }
        Ok(Header {
            version,
            backing_file_offset: be_u64(&fixed, 8),
            backing_file_size: be_u32(&fixed, 16),
            cluster_bits,
            size: be_u64(&fixed, 24),
            crypt_method: be_u32(&fixed, 32),
            l1_size: be_u32(&fixed, 36),
            l1_table_offset: be_u64(&fixed, 40),
            refcount_table_offset: be_u64(&fixed, 48),
            refcount_table_clusters: be_u32(&fixed, 56),
            nb_snapshots: be_u32(&fixed, 60),
            snapshots_offset: be_u64(&fixed, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            has_bitmaps: false,
        })
    }

    /// The version 3 fields (bytes 72..104) and, when the header is
    /// longer, the compression type; checks the file length first, then
    /// `header_length`.
    fn read_v3(&mut self, file: &dyn Storage, path: &Path, len: u64) -> Result<()> {
        let bad = |offset: u64, what: String| ImageError::corrupt(path, offset, what);
        let cluster_size = 1u64 << self.cluster_bits;
        if len < V3_HEADER_LEN as u64 {
            return Err(bad(
                0,
                format!(
                    "file is {len} bytes, shorter than the 104-byte qcow2 v3 header (truncated?)"
                ),
            ));
        }
        let mut v3 = [0u8; V3_HEADER_LEN - V2_HEADER_LEN];
        read_exact_at(file, path, &mut v3, V2_HEADER_LEN as u64, "qcow2 v3 header")?;
        self.incompatible_features = be_u64(&v3, 0);
        self.compatible_features = be_u64(&v3, 8);
        self.autoclear_features = be_u64(&v3, 16);
        self.refcount_order = be_u32(&v3, 24);
        self.header_length = be_u32(&v3, 28);
        if (self.header_length as usize) < V3_HEADER_LEN
            || self.header_length as u64 > cluster_size
            || self.header_length as u64 > len
        {
            return Err(bad(
                100,
                format!(
                    "header_length {} must be at least 104 and inside the first cluster ({cluster_size} bytes) and the file ({len} bytes)",
                    self.header_length
                ),
            ));
        }
        if self.header_length as usize > V3_HEADER_LEN {
            self.compression_type = read_compression_type(file, path)?;
        }
        Ok(())
    }

    fn validate(&self, path: &Path, len: u64) -> Result<()> {
        let bad = |offset: u64, what: String| Err(ImageError::corrupt(path, offset, what));
        let cs = self.cluster_size();
        if self.refcount_order > 6 || (self.version == 2 && self.refcount_order != 4) {
            return bad(
                96,
                format!("refcount_order {} is invalid", self.refcount_order),
            );
        }
        if self.size > (1u64 << 62) {
            return bad(
                24,
                format!(
                    "virtual size {} is beyond any image qcow2 can describe",
                    self.size
                ),
            );
        }
        let l2_entries = cs / if self.extended_l2() { 16 } else { 8 };
        let l1_needed = self.size.div_ceil(cs * l2_entries);
        if (self.l1_size as u64) < l1_needed {
            return bad(
                36,
                format!(
                    "l1_size {} cannot cover the virtual size {} (needs {l1_needed})",
                    self.l1_size, self.size
                ),
            );
        }
        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return bad(
                36,
                format!("L1 table of {l1_bytes} bytes exceeds the 32 MiB limit"),
            );
        }
        if self.l1_size > 0 {
            self.check_table(path, len, 40, self.l1_table_offset, l1_bytes, "L1 table")?;
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return bad(
                56,
                format!("refcount table of {rt_bytes} bytes exceeds the 8 MiB limit"),
            );
        }
        if rt_bytes == 0 {
            return bad(56, "refcount table has no clusters".into());
        }
        self.check_table(
            path,
            len,
            48,
            self.refcount_table_offset,
            rt_bytes,
            "refcount table",
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return bad(
                60,
                format!(
                    "{} internal snapshots exceed the limit of 65536",
                    self.nb_snapshots
                ),
            );
        }
        if self.nb_snapshots > 0 {
            self.check_table(path, len, 64, self.snapshots_offset, 40, "snapshot table")?;
        }
        Ok(())
    }

    /// A metadata table must be cluster aligned, outside the header cluster
    /// and inside the file.
    fn check_table(
        &self,
        path: &Path,
        len: u64,
        field_at: u64,
        offset: u64,
        bytes: u64,
        what: &str,
    ) -> Result<()> {
        let cs = self.cluster_size();
        if !offset.is_multiple_of(cs) || offset == 0 {
            return Err(ImageError::corrupt(
                path,
                field_at,
                format!("{what} offset {offset} is not a cluster-aligned offset after the header"),
            ));
        }
        if offset.checked_add(bytes).is_none_or(|end| end > len) {
            return Err(ImageError::corrupt(
                path,
                field_at,
                format!("{what} at offset {offset} ({bytes} bytes) extends past the end of the file ({len} bytes)"),
            ));
        }
        Ok(())
    }

    fn read_extensions(&mut self, file: &dyn Storage, path: &Path, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        // Extensions live in the first cluster, before the backing file name.
        let mut end = cs.min(len);
        if self.backing_file_offset != 0 {
            end = end.min(self.backing_file_offset);
        }
        let mut at = self.header_length as u64;
        while at + 8 <= end {
            let mut th = [0u8; 8];
            read_exact_at(file, path, &mut th, at, "header extension")?;
            let ty = be_u32(&th, 0);
            let elen = be_u32(&th, 4) as u64;
            if ty == EXT_END {
                return Ok(());
            }
            let data_at = at + 8;
            if data_at + elen > end {
                return Err(ImageError::corrupt(
                    path,
                    at,
                    format!(
                        "header extension 0x{ty:08x} of {elen} bytes runs past the first cluster"
                    ),
                ));
            }
            let mut data = vec![0u8; elen as usize];
            read_exact_at(file, path, &mut data, data_at, "header extension")?;
            match ty {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(String::from_utf8_lossy(&data).into_owned());
                }
                EXT_FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&e[2..2 + name_end]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                EXT_CRYPTO | EXT_DATA_FILE => {} // refused through the feature bits
                _ => {}                          // unknown extensions are skipped, per spec
            }
            at = data_at + elen.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn read_backing_name(&mut self, file: &dyn Storage, path: &Path, len: u64) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let n = self.backing_file_size as u64;
        if n == 0
            || n > 1023
            || self
                .backing_file_offset
                .checked_add(n)
                .is_none_or(|e| e > self.cluster_size().min(len))
        {
            return Err(ImageError::corrupt(
                path,
                8,
                format!(
                    "backing file name at offset {} ({n} bytes) must be 1..1023 bytes inside the first cluster",
                    self.backing_file_offset
                ),
            ));
        }
        let mut name = vec![0u8; n as usize];
        read_exact_at(
            file,
            path,
            &mut name,
            self.backing_file_offset,
            "backing file name",
        )?;
        let name = String::from_utf8(name).map_err(|_| {
            ImageError::corrupt(
                path,
                self.backing_file_offset,
                "backing file name is not UTF-8",
            )
        })?;
        if name.contains('\0') {
            return Err(ImageError::corrupt(
                path,
                self.backing_file_offset,
                "backing file name contains NUL",
            ));
        }
        self.backing_file = Some(name);
        Ok(())
    }

    fn check_features(&self, path: &Path) -> Result<()> {
        if self.crypt_method != 0 {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "encrypted image (crypt_method {} at offset 32); decrypt it first with `qemu-img convert --object secret,... -O qcow2`",
                    self.crypt_method
                ),
            ));
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    self.feature_names
                        .iter()
                        .find(|(t, bit, _)| *t == 0 && *bit == b)
                        .map(|(_, _, n)| format!("{n} (bit {b})"))
                        .unwrap_or_else(|| format!("bit {b}"))
                })
                .collect();
            return Err(ImageError::unsupported(
                path,
                format!(
                    "unknown incompatible features at offset 72: {}",
                    names.join(", ")
                ),
            ));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(ImageError::unsupported(
                path,
                "external data file (incompatible feature bit 2 at offset 72); convert it to a self-contained image with `qemu-img convert -O qcow2`",
            ));
        }
        let says_zstd = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if says_zstd != (self.compression_type != CompressionType::Zlib) {
            return Err(ImageError::corrupt(
                path,
                72,
                "compression type feature bit and compression_type field disagree",
            ));
        }
        Ok(())
    }
}

/// Big-endian u64 table entries from bytes.
pub fn decode_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks_exact(8).map(|c| be_u64(c, 0)).collect()
}

/// Encodes u64 table entries big-endian.
pub fn encode_u64s(entries: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 8);
    for e in entries {
        out.extend_from_slice(&e.to_be_bytes());
    }
    out
}

/// The compression type byte at offset 104, present when `header_length`
/// is over 104; unknown types are refused rather than misread.
fn read_compression_type(file: &dyn Storage, path: &Path) -> Result<CompressionType> {
    let mut b = [0u8; 1];
    read_exact_at(file, path, &mut b, V3_HEADER_LEN as u64, "compression_type")?;
    Ok(match b[0] {
        0 => CompressionType::Zlib,
        1 => CompressionType::Zstd,
        t => {
            return Err(ImageError::unsupported(
                path,
                format!("compression type {t} at offset 104 (known: 0 zlib, 1 zstd)"),
            ))
        }
    })
}
