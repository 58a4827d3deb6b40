//! Guest-to-host translation: the geometry of L1/L2 tables and the decoding
//! of one L2 entry (standard or extended, with subclusters) into mappings.
//!
//! Every host offset an entry names is checked here, once, against the
//! header cluster and the end of the file, so the I/O code never sees a
//! wild offset.

use super::header::Header;
use crate::error::{ImageError, Result};
use crate::image::{push_extent, Extent, Mapping};
use std::path::Path;

pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
/// Extended L2: all 32 "reads as zero" bits.
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;
pub const BITMAP_ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;
pub const SUBCLUSTERS: u64 = 32;

/// Sizes derived from the header.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// 1 for standard entries, 2 (entry + bitmap) for extended ones.
    pub words_per_entry: u64,
    pub extended: bool,
    pub subcluster_size: u64,
    pub version: u32,
    pub size: u64,
}

impl Geometry {
    pub fn new(h: &Header) -> Geometry {
        let cs = h.cluster_size();
        let extended = h.extended_l2();
        let words = if extended { 2 } else { 1 };
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size: cs,
            l2_entries: cs / (8 * words),
            words_per_entry: words,
            extended,
            subcluster_size: if extended { cs / SUBCLUSTERS } else { cs },
            version: h.version,
            size: h.size,
        }
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries * self.cluster_size
    }

    pub fn l1_index(&self, guest: u64) -> usize {
        (guest / self.l2_span()) as usize
    }

    pub fn l2_index(&self, guest: u64) -> usize {
        ((guest / self.cluster_size) % self.l2_entries) as usize
    }

    /// Bits of a compressed descriptor holding the host offset.
    pub fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// Where a compressed cluster's bytes are in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressedDesc {
    pub host: u64,
    /// Bytes to read: up to the end of the last 512-byte sector used.
    pub len: u64,
}

/// One decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Unallocated,
    /// Standard zero cluster; `host` is a preallocation that still holds a
    /// refcount.
    Zero {
        host: Option<u64>,
    },
    /// A standard data cluster, or for extended L2 a cluster whose
    /// subclusters each are data, zero or unallocated per `bitmap`.
    Normal {
        host: Option<u64>,
        copied: bool,
        bitmap: Option<u64>,
    },
    Compressed(CompressedDesc),
}

impl Entry {
    /// Host clusters this entry holds a reference to (for freeing on rewrite).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            Entry::Zero { host } | Entry::Normal { host, .. } => host,
            _ => None,
        }
    }
}

/// Checks and decodes one entry. `at` is the entry's offset in the file,
/// named in every error; `file_end` bounds host offsets.
pub fn decode(
    g: &Geometry,
    path: &Path,
    at: u64,
    word: u64,
    bitmap: u64,
    file_end: u64,
) -> Result<Entry> {
    let bad = |what: String| Err(ImageError::corrupt(path, at, what));
    if word & OFLAG_COMPRESSED != 0 {
        let bits = g.compressed_offset_bits();
        let host = word & ((1u64 << bits) - 1);
        let sectors = (word & !OFLAG_COPIED & !OFLAG_COMPRESSED) >> bits;
        let len = (sectors + 1) * 512 - (host & 511);
        if host < g.cluster_size {
            return bad(format!(
                "compressed cluster at host offset {host} points into the header"
            ));
        }
        if host >= file_end {
            return bad(format!(
                "compressed cluster at host offset {host} is past the end of the file ({file_end} bytes)"
            ));
        }
        if word & OFLAG_COPIED != 0 {
            return bad("compressed cluster entry has the COPIED flag set".into());
        }
        return Ok(Entry::Compressed(CompressedDesc { host, len }));
    }
    let host = word & L2E_OFFSET_MASK;
    let copied = word & OFLAG_COPIED != 0;
    if host != 0 {
        if !host.is_multiple_of(g.cluster_size) {
            return bad(format!(
                "host offset {host} is not aligned to the cluster size {}",
                g.cluster_size
            ));
        }
        if host < g.cluster_size {
            return bad(format!("host offset {host} points into the header cluster"));
        }
        if host >= file_end {
            return bad(format!(
                "host offset {host} is past the end of the file ({file_end} bytes)"
            ));
        }
    }
    let host_opt = (host != 0).then_some(host);
    if g.extended {
        let alloc = bitmap & BITMAP_ALL_ALLOC;
        let zero = bitmap >> 32;
        if alloc & zero != 0 {
            return bad(format!(
                "subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero"
            ));
        }
        if alloc != 0 && host == 0 {
            return bad(format!("subcluster bitmap {bitmap:#018x} allocates subclusters of a cluster with no host offset"));
        }
        if bitmap == 0 && host == 0 {
            return Ok(Entry::Unallocated);
        }
        return Ok(Entry::Normal {
            host: host_opt,
            copied,
            bitmap: Some(bitmap),
        });
    }
    if word & OFLAG_ZERO != 0 && g.version >= 3 {
        return Ok(Entry::Zero { host: host_opt });
    }
    match host_opt {
        None => Ok(Entry::Unallocated),
        Some(_) => Ok(Entry::Normal {
            host: host_opt,
            copied,
            bitmap: None,
        }),
    }
}

/// Pushes the mappings of `[from, to)` (guest offsets inside the cluster
/// that starts at `cluster_start`) described by `entry`.
pub fn push_mappings(
    g: &Geometry,
    out: &mut Vec<Extent>,
    cluster_start: u64,
    from: u64,
    to: u64,
    entry: &Entry,
) {
    let whole = |m: Mapping| Extent {
        start: from,
        len: to - from,
        mapping: m,
    };
    match *entry {
        Entry::Unallocated => push_extent(out, whole(Mapping::Unallocated)),
        Entry::Zero { .. } => push_extent(out, whole(Mapping::Zero)),
        Entry::Compressed(_) => push_extent(out, whole(Mapping::Compressed { cluster_start })),
        Entry::Normal {
            host, bitmap: None, ..
        } => {
            let host = host.unwrap_or(0) + (from - cluster_start);
            push_extent(out, whole(Mapping::Data { host }))
        }
        Entry::Normal {
            host,
            bitmap: Some(bitmap),
            ..
        } => {
            let sc = g.subcluster_size;
            let mut at = from;
            while at < to {
                let i = (at - cluster_start) / sc;
                let sub_end = (cluster_start + (i + 1) * sc).min(to);
                let mapping = if bitmap & (1 << i) != 0 {
                    Mapping::Data {
                        host: host.unwrap_or(0) + (at - cluster_start),
                    }
                } else if bitmap & (1 << (32 + i)) != 0 {
                    Mapping::Zero
                } else {
                    Mapping::Unallocated
                };
                push_extent(
                    out,
                    Extent {
                        start: at,
                        len: sub_end - at,
                        mapping,
                    },
                );
                at = sub_end;
            }
        }
    }
}
