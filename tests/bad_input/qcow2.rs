//! The qcow2 layout these tests corrupt: header field offsets, L1/L2 entry
//! bits, a reader for the few header fields the cases are computed from,
//! and [`Edit`]s that patch a file.
//!
//! Why it is spelled out here instead of using snaptree's parser: the tests
//! must not trust the code under test to tell them where a field is. The
//! offsets come from the qcow2 spec ("Header"); fields are big-endian.

use std::fs;
use std::path::Path;

// qcow2 header field offsets (qcow2 spec, "Header").
pub const OFF_VERSION: u64 = 4;
pub const OFF_BACKING_FILE_OFFSET: u64 = 8;
pub const OFF_BACKING_FILE_SIZE: u64 = 16;
pub const OFF_CLUSTER_BITS: u64 = 20;
pub const OFF_SIZE: u64 = 24;
pub const OFF_CRYPT_METHOD: u64 = 32;
pub const OFF_L1_SIZE: u64 = 36;
pub const OFF_L1_TABLE_OFFSET: u64 = 40;
pub const OFF_REFCOUNT_TABLE_OFFSET: u64 = 48;
pub const OFF_NB_SNAPSHOTS: u64 = 60;
pub const OFF_SNAPSHOTS_OFFSET: u64 = 64;
pub const OFF_INCOMPATIBLE_FEATURES: u64 = 72;
pub const OFF_REFCOUNT_ORDER: u64 = 96;
pub const OFF_HEADER_LENGTH: u64 = 100;

/// (offset, length) of every fixed header field up to `compression_type`.
const HEADER_FIELDS: &[(u64, u64)] = &[
    (0, 4),
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 1),
];

/// Bits 9-55 of an L1 or standard L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const FLAG_COPIED: u64 = 1 << 63;
pub const FLAG_COMPRESSED: u64 = 1 << 62;

/// Start offsets of the header fields that `len` cuts through or that start
/// at `len` (the first field that is missing).
pub fn fields_cut_at(len: u64) -> Vec<u64> {
    HEADER_FIELDS
        .iter()
        .filter(|(off, size)| *off <= len && len < off + size)
        .map(|(off, _)| *off)
        .collect()
}

pub fn be32(bytes: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_be_bytes(bytes[o..o + 4].try_into().expect("4 bytes"))
}

pub fn be64(bytes: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8 bytes"))
}

/// One change to an image file.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Overwrite bytes at an offset (within the file).
    Bytes(u64, Vec<u8>),
    /// Cut the file to this length.
    Truncate(u64),
}

impl Edit {
    /// Overwrite the big-endian `u32` at `off`.
    pub fn be32(off: u64, v: u32) -> Edit {
        Edit::Bytes(off, v.to_be_bytes().to_vec())
    }

    /// Overwrite the big-endian `u64` at `off`.
    pub fn be64(off: u64, v: u64) -> Edit {
        Edit::Bytes(off, v.to_be_bytes().to_vec())
    }

    /// Applies the edit to the file at `path`.
    pub fn apply(&self, path: &Path) {
        let mut bytes = fs::read(path).expect("read image to patch");
        match self {
            Edit::Bytes(off, data) => {
                let o = *off as usize;
                assert!(
                    o + data.len() <= bytes.len(),
                    "patch at {off} beyond {}",
                    path.display()
                );
                bytes[o..o + data.len()].copy_from_slice(data);
            }
            Edit::Truncate(len) => bytes.truncate(*len as usize),
        }
        fs::write(path, bytes).expect("write patched image");
    }
}

/// The qcow2 header fields these tests care about, read from a valid image.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub l1_table_offset: u64,
    pub incompatible_features: u64,
    pub header_length: u32,
    pub file_len: u64,
}

impl Header {
    pub fn read(path: &Path) -> Header {
        let b = fs::read(path).expect("read header");
        assert_eq!(&b[..4], b"QFI\xfb", "{} is not qcow2", path.display());
        Header {
            backing_file_offset: be64(&b, OFF_BACKING_FILE_OFFSET),
            backing_file_size: be32(&b, OFF_BACKING_FILE_SIZE),
            cluster_bits: be32(&b, OFF_CLUSTER_BITS),
            l1_table_offset: be64(&b, OFF_L1_TABLE_OFFSET),
            incompatible_features: be64(&b, OFF_INCOMPATIBLE_FEATURES),
            header_length: be32(&b, OFF_HEADER_LENGTH),
            file_len: b.len() as u64,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// File offset of L1 entry `i`.
    pub fn l1_entry_pos(&self, i: u64) -> u64 {
        self.l1_table_offset + 8 * i
    }

    /// Host offset of the L2 table behind L1 entry `i` (must be allocated).
    pub fn l2_table(&self, path: &Path, i: u64) -> u64 {
        let b = fs::read(path).expect("read image");
        let l2 = be64(&b, self.l1_entry_pos(i)) & OFFSET_MASK;
        assert_ne!(l2, 0, "L1[{i}] of {} is unallocated", path.display());
        l2
    }

    /// The first cluster-aligned offset at or past the end of the file.
    pub fn eof_cluster(&self) -> u64 {
        let cs = self.cluster_size();
        self.file_len.div_ceil(cs) * cs
    }

    /// A cluster-aligned offset well past the end of the file.
    pub fn past_eof(&self) -> u64 {
        self.eof_cluster() + 16 * self.cluster_size()
    }

    /// The largest cluster-aligned host offset an entry can hold.
    pub fn max_entry_offset(&self) -> u64 {
        OFFSET_MASK & !(self.cluster_size() - 1)
    }

    /// Bits of a compressed L2 entry's host offset field (`x` in the spec).
    pub fn compressed_offset_bits(&self) -> u64 {
        62 - (u64::from(self.cluster_bits) - 8)
    }

    /// The offsets a refusal of a bad backing file reference may name: the
    /// two header fields and where the name is stored.
    pub fn backing_offsets(&self) -> [u64; 3] {
        [
            OFF_BACKING_FILE_OFFSET,
            OFF_BACKING_FILE_SIZE,
            self.backing_file_offset,
        ]
    }
}

/// A compressed L2 entry decoded per the spec: where its bytes are.
pub struct Compressed {
    pub entry_pos: u64,
    pub host_offset: u64,
    /// End (exclusive) of the sectors the descriptor says it uses.
    pub end: u64,
}

/// The first compressed cluster behind L1 entry 0 of `path`.
pub fn first_compressed(path: &Path) -> Compressed {
    let h = Header::read(path);
    let b = fs::read(path).expect("read image");
    let l2 = h.l2_table(path, 0);
    let x = h.compressed_offset_bits();
    for i in 0..h.cluster_size() / 8 {
        let pos = l2 + 8 * i;
        let e = be64(&b, pos);
        if e & FLAG_COMPRESSED == 0 {
            continue;
        }
        let host_offset = e & ((1 << x) - 1);
        let sectors = ((e >> x) & ((1 << (62 - x)) - 1)) + 1;
        return Compressed {
            entry_pos: pos,
            host_offset,
            end: (host_offset & !511) + sectors * 512,
        };
    }
    panic!("no compressed cluster in {}", path.display());
}
