//! Where a file's bytes are, and a cache of that bounded in bytes.
//!
//! A file's cluster chain is walked and checked once (loops, free or
//! out-of-range clusters, a chain shorter than the size), then kept so
//! reads neither re-read its entry nor re-walk the FAT. A hostile or badly
//! fragmented file can have millions of runs (a 4 GiB file of alternating
//! 512-byte clusters: 8 M runs), so a map keeps its runs only up to
//! `MAX_RUNS`; beyond that it keeps every `STRIDE`-th cluster of the chain
//! and a read follows the FAT from the nearest one (at most `STRIDE` steps
//! through the cached FAT). The cache holds at most `budget` bytes of maps,
//! evicting the least recently used; a map bigger than the budget is
//! returned but not kept.

use super::table::{Run, Table};
use crate::guest::GuestResult;
use lru::LruCache;
use std::sync::Arc;

/// Runs kept as runs (16 bytes each: 1 MiB).
pub const MAX_RUNS: usize = 64 * 1024;
/// A sampled map keeps the cluster at every this many file clusters.
pub const STRIDE: u64 = 256;

/// A file's size and where its clusters are.
pub struct FileMap {
    pub size: u64,
    /// Clusters the size needs.
    pub clusters: u64,
    how: How,
}

enum How {
    /// The runs, and the file cluster index each starts at.
    Runs { runs: Vec<Run>, starts: Vec<u64> },
    /// The volume cluster at file cluster index `i * STRIDE`.
    Sampled(Vec<u32>),
}

impl FileMap {
    /// The map of a file of `size` bytes whose already checked chain is
    /// `runs` (covering at least `clusters` clusters).
    pub fn new(size: u64, clusters: u64, runs: Vec<Run>, max_runs: usize) -> FileMap {
        let how = if runs.len() <= max_runs {
            let mut starts = Vec::with_capacity(runs.len());
            let mut at = 0u64;
            for r in &runs {
                starts.push(at);
                at += u64::from(r.len);
            }
            How::Runs { runs, starts }
        } else {
            let mut samples = Vec::with_capacity(clusters.div_ceil(STRIDE) as usize);
            let mut at = 0u64;
            for r in &runs {
                // The first multiple of STRIDE at or after `at`.
                let mut i = at.div_ceil(STRIDE) * STRIDE;
                while i < at + u64::from(r.len) && i < clusters {
                    samples.push(r.start + (i - at) as u32);
                    i += STRIDE;
                }
                at += u64::from(r.len);
            }
            How::Sampled(samples)
        };
        FileMap {
            size,
            clusters,
            how,
        }
    }

    /// Bytes this map holds, for the cache budget.
    pub fn bytes(&self) -> usize {
        64 + match &self.how {
            How::Runs { runs, .. } => runs.len() * 16,
            How::Sampled(s) => s.len() * 4,
        }
    }

    /// The runs holding file clusters `from .. from + count` (clipped to
    /// the file), in file order; the first run starts at cluster `from`.
    pub fn extents(&self, table: &Table, from: u64, count: u64) -> GuestResult<Vec<Run>> {
        let end = (from + count).min(self.clusters);
        let mut out: Vec<Run> = Vec::new();
        if from >= end {
            return Ok(out);
        }
        match &self.how {
            How::Runs { runs, starts } => {
                let mut i = starts.partition_point(|&s| s <= from).saturating_sub(1);
                let mut at = from;
                while at < end && i < runs.len() {
                    let (r, st) = (runs[i], starts[i]);
                    let skip = at - st;
                    let n = (u64::from(r.len) - skip).min(end - at);
                    out.push(Run {
                        start: r.start + skip as u32,
                        len: n as u32,
                    });
                    at += n;
                    i += 1;
                }
            }
            How::Sampled(samples) => {
                let k = (from / STRIDE) as usize;
                let Some(&first) = samples.get(k) else {
                    return Ok(out);
                };
                let mut c = first;
                for _ in k as u64 * STRIDE..from {
                    c = table.next_cluster(c)?;
                }
                for at in from..end {
                    if at > from {
                        c = table.next_cluster(c)?;
                    }
                    match out.last_mut() {
                        Some(r) if u64::from(r.start) + u64::from(r.len) == u64::from(c) => {
                            r.len += 1
                        }
                        _ => out.push(Run { start: c, len: 1 }),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// File maps by inode, bounded by their total bytes.
pub struct ChainCache {
    lru: LruCache<u64, Arc<FileMap>>,
    held: usize,
    budget: usize,
}

impl ChainCache {
    pub fn new(budget: usize) -> ChainCache {
        ChainCache {
            lru: LruCache::unbounded(),
            held: 0,
            budget,
        }
    }

    pub fn get(&mut self, ino: u64) -> Option<Arc<FileMap>> {
        self.lru.get(&ino).cloned()
    }

    /// Keeps `map` unless it alone is over the budget; evicts the least
    /// recently used until the rest fit.
    pub fn put(&mut self, ino: u64, map: Arc<FileMap>) {
        let size = map.bytes();
        if size > self.budget {
            return;
        }
        self.held += size;
        if let Some(old) = self.lru.put(ino, map) {
            self.held -= old.bytes();
        }
        while self.held > self.budget {
            match self.lru.pop_lru() {
                Some((_, m)) => self.held -= m.bytes(),
                None => break,
            }
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::super::bpb::FatType;
    use super::super::table::tests::{fat12, geo};
    use super::*;

    /// A fragmented 1000-cluster chain: runs of 1..=3 clusters with gaps.
    fn fragmented() -> (Table, u32, u64) {
        let mut next = vec![0u32; 4000];
        next[0] = 0xFF8;
        next[1] = 0xFFF;
        let mut chain = Vec::new();
        let mut c = 2u32;
        while chain.len() < 1000 {
            for _ in 0..(chain.len() % 3 + 1) {
                chain.push(c);
                c += 1;
            }
            c += 1 + (chain.len() as u32 % 2);
        }
        chain.truncate(1000);
        for w in chain.windows(2) {
            next[w[0] as usize] = w[1];
        }
        next[*chain.last().unwrap() as usize] = 0xFFF;
        let t = Table::new("v", Arc::new(fat12(&next)), geo(FatType::Fat12, 3990));
        (t, chain[0], chain.len() as u64)
    }

    #[test]
    fn sampled_maps_agree_with_run_maps() {
        let (t, first, n) = fragmented();
        let runs = t.chain(first, Some(n), true).unwrap();
        assert!(runs.len() > 300);
        let full = FileMap::new(n * 512, n, runs.clone(), usize::MAX);
        let sampled = FileMap::new(n * 512, n, runs, 10);
        assert!(matches!(sampled.how, How::Sampled(_)));
        assert!(sampled.bytes() < full.bytes() / 10);
        for from in (0..n + 3).step_by(7) {
            for count in [1, 2, 5, 300, 2000] {
                let a = full.extents(&t, from, count).unwrap();
                let b = sampled.extents(&t, from, count).unwrap();
                assert_eq!(a, b, "from {from} count {count}");
                let total: u64 = a.iter().map(|r| u64::from(r.len)).sum();
                assert_eq!(total, (from + count).min(n).saturating_sub(from));
            }
        }
    }

    #[test]
    fn cache_is_bounded_by_bytes() {
        let map = |runs: usize| {
            let r = (0..runs)
                .map(|i| Run {
                    start: 2 + 2 * i as u32,
                    len: 1,
                })
                .collect();
            Arc::new(FileMap::new(0, runs as u64, r, usize::MAX))
        };
        let mut c = ChainCache::new(64 + 100 * 16 + 64 + 50 * 16);
        c.put(1, map(100));
        c.put(2, map(50));
        assert!(c.get(1).is_some() && c.get(2).is_some());
        c.put(3, map(10)); // over budget: evicts 1 (least recently used)
        assert!(c.get(1).is_none() && c.get(2).is_some() && c.get(3).is_some());
        assert!(c.held() <= 64 + 100 * 16 + 64 + 50 * 16);
        c.put(4, map(1000)); // alone over the budget: not kept
        assert!(c.get(4).is_none() && c.get(2).is_some() && c.get(3).is_some());
        c.put(2, map(5)); // replacing an entry releases its bytes
        assert_eq!(c.held(), 64 + 5 * 16 + 64 + 10 * 16);
    }
}
