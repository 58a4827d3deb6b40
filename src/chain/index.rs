//! The resolution index: a cache of fully resolved extent maps, one per
//! fixed-size region of the guest disk, so that once a region has been
//! looked at, finding which layer serves a byte is one hash lookup and a
//! binary search — the same cost at chain depth 64 as at depth 1.
//!
//! Regions are built lazily (by `resolve`, without holding the index lock)
//! and bounded by an LRU. Writes to the leaf patch cached regions in place:
//! the leaf's new mapping of the written range replaces what was there.
//!
//! Concurrency: a builder notes the write epoch before resolving and only
//! caches its result if no write happened meanwhile; writers bump the epoch
//! and patch under the index lock, after the leaf's metadata is updated.
//! So a cached region is never older than the leaf's metadata.

use super::resolve::{push_resolved, resolve, Resolved, Source};
use crate::error::Result;
use crate::image::{Layer, Mapping};
use lru::LruCache;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Guest bytes per region.
pub const REGION: u64 = 2 << 20;
/// Regions kept: 1024 × 2 MiB = the maps of 2 GiB of guest disk.
const REGIONS_CACHED: usize = 1024;

pub struct ResolutionIndex {
    regions: Mutex<LruCache<u64, Arc<Vec<Resolved>>>>,
    epoch: AtomicU64,
    size: u64,
}

impl ResolutionIndex {
    pub fn new(size: u64) -> ResolutionIndex {
        ResolutionIndex {
            regions: Mutex::new(crate::cache::lazy_lru(REGIONS_CACHED)),
            epoch: AtomicU64::new(0),
            size,
        }
    }

    /// Whether region `idx` is cached (without touching the LRU order).
    pub fn is_cached(&self, idx: u64) -> bool {
        self.regions.lock().contains(&idx)
    }

    /// The resolved map of region number `idx`.
    pub fn region(&self, layers: &[Arc<dyn Layer>], idx: u64) -> Result<Arc<Vec<Resolved>>> {
        if let Some(r) = self.regions.lock().get(&idx) {
            return Ok(r.clone());
        }
        let before = self.epoch.load(Ordering::Acquire);
        let start = idx * REGION;
        let len = REGION.min(self.size - start);
        let map = Arc::new(resolve(layers, 0, start, len)?);
        let mut regions = self.regions.lock();
        if self.epoch.load(Ordering::Acquire) == before {
            regions.put(idx, map.clone());
        }
        Ok(map)
    }

    /// Called after the leaf (depth 0) changed `[offset, offset+len)`.
    pub fn leaf_written(&self, leaf: &dyn Layer, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut regions = self.regions.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let first = offset / REGION;
        let last = (offset + len - 1) / REGION;
        for idx in first..=last {
            let Some(old) = regions.peek(&idx).cloned() else {
                continue;
            };
            let s = offset.max(idx * REGION);
            let e = (offset + len).min((idx + 1) * REGION).min(self.size);
            match leaf.map(s, e - s) {
                Ok(exts) if exts.iter().all(|x| x.mapping != Mapping::Unallocated) => {
                    let new: Vec<Resolved> = exts
                        .iter()
                        .map(|x| Resolved {
                            start: x.start,
                            len: x.len,
                            depth: 0,
                            source: match x.mapping {
                                Mapping::Data { host } => Source::Data { host },
                                Mapping::Compressed { cluster_start } => {
                                    Source::Compressed { cluster_start }
                                }
                                _ => Source::Zero,
                            },
                        })
                        .collect();
                    regions.put(idx, Arc::new(splice(&old, &new, s, e)));
                }
                // Parts fall through to lower layers again (or the leaf
                // could not say): rebuild this region on the next read.
                _ => {
                    regions.pop(&idx);
                }
            }
        }
    }

    /// Forgets everything (after the layers below changed).
    pub fn clear(&self) {
        let mut regions = self.regions.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        regions.clear();
    }
}

/// `old` with `[s, e)` replaced by `new`.
fn splice(old: &[Resolved], new: &[Resolved], s: u64, e: u64) -> Vec<Resolved> {
    let mut out = Vec::with_capacity(old.len() + new.len() + 2);
    for r in old {
        if let Some(c) = r.clip(0, s) {
            push_resolved(&mut out, c);
        }
    }
    for r in new {
        push_resolved(&mut out, *r);
    }
    for r in old {
        if let Some(c) = r.clip(e, u64::MAX) {
            push_resolved(&mut out, c);
        }
    }
    out
}

/// Index of the first extent in `map` that ends after `offset`.
pub fn find(map: &[Resolved], offset: u64) -> usize {
    map.partition_point(|r| r.end() <= offset)
}

#[cfg(test)]
mod tests {
    //! The index on chains built in memory: a raw base with a known
    //! pattern under qcow2 overlays made by our own `create`.
    use super::*;
    use crate::chain::resolve::{resolve, Source};
    use crate::image::qcow2::create::{create_on, CreateOptions};
    use crate::image::qcow2::Qcow2Layer;
    use crate::image::raw::RawLayer;
    use crate::image::storage::MemStorage;
    use crate::image::testutil::{mem_path, pattern, PatternBelow};
    use crate::image::Writable;

    const CS: u64 = 64 << 10;
    /// Two and a half regions: the last one is short.
    const SIZE: u64 = 5 * REGION / 2;

    fn base() -> Arc<dyn Layer> {
        let mem = MemStorage::from_bytes(pattern(1, 0, SIZE as usize));
        Arc::new(RawLayer::open_storage(mem_path("base.raw"), Box::new(mem), false).unwrap())
    }

    fn overlay(name: &str) -> Arc<Qcow2Layer> {
        let mem = MemStorage::new();
        let mut opts = CreateOptions::new(SIZE);
        opts.backing = Some(("below".into(), "qcow2".into()));
        create_on(&mem, mem_path(name), &opts).unwrap();
        Arc::new(Qcow2Layer::open_storage(mem_path(name), Box::new(mem), true).unwrap())
    }

    /// A chain of `depth` overlays over the base; overlay k (0 = leaf)
    /// holds cluster k of region 0.
    fn chain(depth: usize) -> (Vec<Arc<dyn Layer>>, Arc<Qcow2Layer>) {
        let mut layers: Vec<Arc<dyn Layer>> = Vec::new();
        let mut leaf = None;
        for k in 0..depth {
            let o = overlay(&format!("o{k}.qcow2"));
            o.write(k as u64 * CS, &[k as u8; 100], &PatternBelow(1))
                .unwrap();
            leaf.get_or_insert_with(|| o.clone());
            layers.push(o);
        }
        layers.push(base());
        (layers, leaf.unwrap())
    }

    fn depth_at(map: &[Resolved], offset: u64) -> u32 {
        map[find(map, offset)].depth
    }

    #[test]
    fn a_region_is_resolved_once_then_served_from_the_cache() {
        let (layers, _) = chain(3);
        let idx = ResolutionIndex::new(SIZE);
        assert!(!idx.is_cached(0));
        let r = idx.region(&layers, 0).unwrap();
        assert!(idx.is_cached(0) && !idx.is_cached(1));
        assert_eq!(*r, resolve(&layers, 0, 0, REGION).unwrap());
        for k in 0..3u64 {
            assert_eq!(depth_at(&r, k * CS + 50), k as u32);
        }
        // Past the overlays' clusters the raw base serves, host = guest.
        let at = 3 * CS + 5;
        let e = r[find(&r, at)].clip(at, at + 1).unwrap();
        assert_eq!((e.depth, e.source), (3, Source::Data { host: at }));
        // The same Arc comes back: no second resolution.
        assert!(Arc::ptr_eq(&r, &idx.region(&layers, 0).unwrap()));
    }

    #[test]
    fn the_last_region_is_cut_at_the_disk_size() {
        let (layers, _) = chain(1);
        let idx = ResolutionIndex::new(SIZE);
        let last = idx.region(&layers, 2).unwrap();
        assert_eq!(last.first().unwrap().start, 2 * REGION);
        assert_eq!(last.last().unwrap().end(), SIZE);
    }

    #[test]
    fn a_leaf_write_patches_the_cached_region_in_place() {
        let (layers, leaf) = chain(2);
        let idx = ResolutionIndex::new(SIZE);
        idx.region(&layers, 0).unwrap();
        idx.region(&layers, 1).unwrap();
        // A write spanning the border of regions 0 and 1.
        let at = REGION - CS;
        leaf.write(at, &vec![9u8; 2 * CS as usize], &PatternBelow(1))
            .unwrap();
        idx.leaf_written(leaf.as_ref(), at, 2 * CS);
        for i in 0..2 {
            assert!(idx.is_cached(i), "region {i} was dropped, not patched");
            let patched = idx.region(&layers, i).unwrap();
            let fresh = resolve(&layers, 0, i * REGION, REGION).unwrap();
            assert_eq!(*patched, fresh, "region {i}");
        }
        let r0 = idx.region(&layers, 0).unwrap();
        assert_eq!(depth_at(&r0, at), 0);
        assert_eq!(depth_at(&r0, at - 1), 2);
    }

    #[test]
    fn a_write_the_leaf_cannot_map_drops_the_region() {
        let (layers, leaf) = chain(2);
        let idx = ResolutionIndex::new(SIZE);
        idx.region(&layers, 1).unwrap();
        // Nothing was written at REGION + CS: the leaf maps it as
        // unallocated, so the region must be rebuilt, not patched.
        idx.leaf_written(leaf.as_ref(), REGION + CS, 10);
        assert!(!idx.is_cached(1));
        // An uncached region stays uncached; an empty write is nothing.
        idx.leaf_written(leaf.as_ref(), 0, 0);
        idx.leaf_written(leaf.as_ref(), 0, CS);
        assert!(!idx.is_cached(0));
    }

    #[test]
    fn clear_forgets_every_region() {
        let (layers, _) = chain(1);
        let idx = ResolutionIndex::new(SIZE);
        for i in 0..3 {
            idx.region(&layers, i).unwrap();
        }
        idx.clear();
        assert!((0..3).all(|i| !idx.is_cached(i)));
    }

    #[test]
    fn depth_64_resolves_each_cluster_to_its_layer() {
        let (layers, _) = chain(64);
        let idx = ResolutionIndex::new(SIZE);
        // 64 clusters of 64 KiB span regions 0 and 1.
        let depth = |at: u64| depth_at(&idx.region(&layers, at / REGION).unwrap(), at);
        for k in 0..64u64 {
            assert_eq!(depth(k * CS), k as u32, "cluster {k}");
            // The untouched rest of each cluster was copied up from below:
            // the cluster is the overlay's whole.
            assert_eq!(depth(k * CS + CS - 1), k as u32, "cluster {k}");
        }
        assert_eq!(depth(64 * CS), 64);
        assert!(idx.is_cached(0) && idx.is_cached(1) && idx.is_cached(2));
    }

    #[test]
    fn splice_and_find_keep_extents_ordered_and_exact() {
        let ext = |start, len, depth, host| Resolved {
            start,
            len,
            depth,
            source: Source::Data { host },
        };
        let old = vec![ext(0, 100, 1, 1000), ext(100, 100, 2, 5000)];
        let new = vec![ext(50, 100, 0, 0)];
        let out = splice(&old, &new, 50, 150);
        assert_eq!(
            out,
            vec![
                ext(0, 50, 1, 1000),
                ext(50, 100, 0, 0),
                ext(150, 50, 2, 5050)
            ]
        );
        assert_eq!(find(&out, 0), 0);
        assert_eq!(find(&out, 49), 0);
        assert_eq!(find(&out, 50), 1);
        assert_eq!(find(&out, 199), 2);
        assert_eq!(find(&out, 200), 3);
    }
}
