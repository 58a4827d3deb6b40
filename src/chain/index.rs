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
