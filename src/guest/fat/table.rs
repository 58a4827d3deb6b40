//! The file allocation table: reading entries (FAT12's packed 12-bit pairs,
//! FAT16, FAT32's 28 bits) and following cluster chains into runs of
//! contiguous clusters. Chains come from an untrusted disk, so every step is
//! checked: a free or out-of-range entry is corruption, and a chain is never
//! followed further than the volume has clusters, which ends loops.

use super::bpb::{FatType, Geometry};
use crate::guest::{GuestError, GuestResult, ReadBytes};
use lru::LruCache;
use parking_lot::Mutex;
use std::sync::Arc;

/// FAT bytes are cached in chunks of this size (a multiple of 4, so FAT16
/// and FAT32 entries never straddle two chunks).
const CHUNK: u64 = 64 * 1024;
/// At most this many chunks (4 MiB) stay cached.
const CHUNKS: usize = 64;

/// One run of a chain: `len` clusters starting at cluster `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u32,
    pub len: u32,
}

/// What a FAT entry says about the cluster after this one.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Cluster(u32),
    End,
}

/// Reads the first FAT of a volume, with a bounded cache.
pub struct Table {
    volume: String,
    bytes: Arc<dyn ReadBytes>,
    geo: Geometry,
    chunks: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
}

impl Table {
    pub fn new(volume: &str, bytes: Arc<dyn ReadBytes>, geo: Geometry) -> Table {
        Table {
            volume: volume.to_string(),
            bytes,
            geo,
            chunks: Mutex::new(crate::cache::lazy_lru(CHUNKS)),
        }
    }

    /// The chunk of the FAT starting at FAT-relative byte `start`.
    fn chunk(&self, start: u64) -> GuestResult<Arc<Vec<u8>>> {
        if let Some(c) = self.chunks.lock().get(&start) {
            return Ok(c.clone());
        }
        let len = CHUNK.min(self.geo.fat_len - start) as usize;
        let mut buf = vec![0u8; len];
        let off = self.geo.fat_offset + start;
        self.bytes
            .read_exact_at(&mut buf, off)
            .map_err(|e| GuestError::io(&self.volume, off, len, e))?;
        let c = Arc::new(buf);
        self.chunks.lock().put(start, c.clone());
        Ok(c)
    }

    /// The FAT byte at FAT-relative offset `pos` (inside the FAT: the BPB
    /// check guaranteed the FAT holds every valid cluster's entry).
    fn byte(&self, pos: u64) -> GuestResult<u8> {
        let start = pos - pos % CHUNK;
        Ok(self.chunk(start)?[(pos - start) as usize])
    }

    /// The raw entry of valid cluster `c`.
    fn entry(&self, c: u32) -> GuestResult<u32> {
        let c64 = u64::from(c);
        Ok(match self.geo.fat_type {
            FatType::Fat12 => {
                // Two entries share three bytes; even ones take the low 12
                // bits of the little-endian pair, odd ones the high 12.
                let pos = c64 + c64 / 2;
                let v = u32::from(self.byte(pos)?) | u32::from(self.byte(pos + 1)?) << 8;
                if c & 1 == 0 {
                    v & 0xFFF
                } else {
                    v >> 4
                }
            }
            FatType::Fat16 => {
                let pos = c64 * 2;
                u32::from(self.byte(pos)?) | u32::from(self.byte(pos + 1)?) << 8
            }
            FatType::Fat32 => {
                let pos = c64 * 4;
                let start = pos - pos % CHUNK;
                let ch = self.chunk(start)?;
                let i = (pos - start) as usize;
                u32::from_le_bytes([ch[i], ch[i + 1], ch[i + 2], ch[i + 3]]) & 0x0FFF_FFFF
            }
        })
    }

    /// Byte offset of cluster `c`'s entry in the first FAT, for errors.
    fn entry_offset(&self, c: u32) -> u64 {
        let c = u64::from(c);
        self.geo.fat_offset
            + match self.geo.fat_type {
                FatType::Fat12 => c + c / 2,
                FatType::Fat16 => c * 2,
                FatType::Fat32 => c * 4,
            }
    }

    fn next(&self, c: u32) -> GuestResult<Next> {
        let v = self.entry(c)?;
        let (bad, eoc) = match self.geo.fat_type {
            FatType::Fat12 => (0xFF7, 0xFF8),
            FatType::Fat16 => (0xFFF7, 0xFFF8),
            FatType::Fat32 => (0x0FFF_FFF7, 0x0FFF_FFF8),
        };
        if v >= eoc {
            Ok(Next::End)
        } else if self.geo.valid_cluster(v) {
            Ok(Next::Cluster(v))
        } else {
            let what = match v {
                0 => "free".to_string(),
                _ if v == bad => "bad-cluster mark".to_string(),
                _ => format!("cluster {v} outside the volume"),
            };
            Err(GuestError::corrupt(
                &self.volume,
                self.entry_offset(c),
                format!("FAT entry of cluster {c} in a chain is {what}"),
            ))
        }
    }

    /// The runs of the chain starting at `first`, following at most `max`
    /// clusters (`None`: to the end-of-chain mark). A chain longer than the
    /// volume has clusters loops and is corruption; so is one ending before
    /// `max` clusters when `need_all`.
    pub fn chain(&self, first: u32, max: Option<u64>, need_all: bool) -> GuestResult<Vec<Run>> {
        let limit = u64::from(self.geo.cluster_count);
        let want = max.unwrap_or(limit + 1);
        let mut runs: Vec<Run> = Vec::new();
        if want == 0 {
            return Ok(runs);
        }
        if !self.geo.valid_cluster(first) {
            return Err(GuestError::corrupt(
                &self.volume,
                0,
                format!("chain starts at cluster {first}, outside 2..{}", limit + 2),
            ));
        }
        let (mut c, mut n) = (first, 0u64);
        loop {
            n += 1;
            if n > limit {
                return Err(GuestError::corrupt(
                    &self.volume,
                    self.entry_offset(c),
                    format!("cluster chain from cluster {first} is longer than the volume's {limit} clusters (a loop)"),
                ));
            }
            match runs.last_mut() {
                Some(r) if u64::from(r.start) + u64::from(r.len) == u64::from(c) => r.len += 1,
                _ => runs.push(Run { start: c, len: 1 }),
            }
            if n == want {
                return self.no_repeats(first, runs);
            }
            match self.next(c)? {
                Next::Cluster(nc) => c = nc,
                Next::End if need_all => {
                    return Err(GuestError::corrupt(
                        &self.volume,
                        self.entry_offset(c),
                        format!(
                            "cluster chain from cluster {first} ends after {n} of {want} clusters"
                        ),
                    ))
                }
                Next::End => return self.no_repeats(first, runs),
            }
        }
    }
}

impl Table {
    /// The cluster after `c` in its chain; the end mark is corruption here
    /// (callers follow chains already checked to be long enough).
    pub fn next_cluster(&self, c: u32) -> GuestResult<u32> {
        match self.next(c)? {
            Next::Cluster(n) => Ok(n),
            Next::End => Err(GuestError::corrupt(
                &self.volume,
                self.entry_offset(c),
                format!("cluster chain ends early at cluster {c}"),
            )),
        }
    }

    /// `runs` unless a cluster occurs twice: a chain that loops back within
    /// the clusters a file needs would otherwise repeat its bytes.
    fn no_repeats(&self, first: u32, runs: Vec<Run>) -> GuestResult<Vec<Run>> {
        let mut sorted: Vec<(u32, u32)> = runs.iter().map(|r| (r.start, r.len)).collect();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if u64::from(w[0].0) + u64::from(w[0].1) > u64::from(w[1].0) {
                return Err(GuestError::corrupt(
                    &self.volume,
                    self.entry_offset(w[1].0),
                    format!(
                        "cluster chain from cluster {first} visits cluster {} twice (a loop)",
                        w[1].0
                    ),
                ));
            }
        }
        Ok(runs)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::bpb::RootDir;
    use super::*;

    pub fn geo(fat_type: FatType, count: u32) -> Geometry {
        Geometry {
            fat_type,
            bytes_per_sector: 512,
            cluster_size: 512,
            fat_offset: 0,
            fat_len: 512 * 1024,
            root: RootDir::Fixed {
                offset: 0,
                entries: 16,
            },
            data_offset: 0,
            cluster_count: count,
            volume_bytes: 512 * 1024,
            volume_id: None,
            bpb_label: None,
        }
    }

    pub fn fat12(entries: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 512 * 1024];
        for (i, &e) in entries.iter().enumerate() {
            let pos = i + i / 2;
            if i % 2 == 0 {
                v[pos] = e as u8;
                v[pos + 1] = (v[pos + 1] & 0xF0) | (e >> 8) as u8;
            } else {
                v[pos] = (v[pos] & 0x0F) | ((e & 0xF) << 4) as u8;
                v[pos + 1] = (e >> 4) as u8;
            }
        }
        v
    }

    #[test]
    fn fat12_packed_chain_and_runs() {
        // 2 -> 3 -> 4 -> 7 -> 8 -> end
        let v = fat12(&[0xFF8, 0xFFF, 3, 4, 7, 0, 0, 8, 0xFFF]);
        let t = Table::new("v", Arc::new(v), geo(FatType::Fat12, 100));
        let runs = t.chain(2, None, false).unwrap();
        assert_eq!(
            runs,
            vec![Run { start: 2, len: 3 }, Run { start: 7, len: 2 }]
        );
        assert_eq!(t.chain(2, Some(4), true).unwrap().len(), 2);
        assert!(t.chain(2, Some(6), true).is_err());
    }

    #[test]
    fn loops_and_free_entries_are_corrupt() {
        let v = fat12(&[0xFF8, 0xFFF, 3, 2]);
        let t = Table::new("loopvol", Arc::new(v), geo(FatType::Fat12, 100));
        let e = t.chain(2, None, false).unwrap_err().to_string();
        assert!(
            e.starts_with("loopvol: corrupt") && e.contains("loop"),
            "{e}"
        );
        let v = fat12(&[0xFF8, 0xFFF, 3, 0]);
        let t = Table::new("v", Arc::new(v), geo(FatType::Fat12, 100));
        assert!(t
            .chain(2, None, false)
            .unwrap_err()
            .to_string()
            .contains("free"));
        let v = fat12(&[0xFF8, 0xFFF, 500]);
        let t = Table::new("v", Arc::new(v), geo(FatType::Fat12, 100));
        assert!(t
            .chain(2, None, false)
            .unwrap_err()
            .to_string()
            .contains("outside"));
    }

    #[test]
    fn fat32_masks_high_bits() {
        let mut v = vec![0u8; 512 * 1024];
        v[8..12].copy_from_slice(&0xF000_0003u32.to_le_bytes());
        v[12..16].copy_from_slice(&0x0FFF_FFFFu32.to_le_bytes());
        let t = Table::new("v", Arc::new(v), geo(FatType::Fat32, 70000));
        assert_eq!(
            t.chain(2, None, false).unwrap(),
            vec![Run { start: 2, len: 2 }]
        );
    }
}
