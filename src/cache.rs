//! Bounded LRU caches that cost nothing until they are used.
//!
//! Every open image (and every chain's resolution index) keeps a few LRU
//! caches. `lru::LruCache::new(cap)` reserves a hash table for `cap`
//! entries up front: with 10,000 mounted images that was about 40 KiB per
//! image of empty tables that most images (never read) never fill. A cache
//! made here starts empty, grows as entries arrive, and still evicts at
//! `cap`, so the bound on memory is unchanged.

use lru::LruCache;
use std::hash::Hash;
use std::num::NonZeroUsize;

/// An empty LRU cache holding at most `cap` entries (at least one), with no
/// table allocated until the first insert.
pub fn lazy_lru<K: Hash + Eq, V>(cap: usize) -> LruCache<K, V> {
    let mut c = LruCache::unbounded();
    // `resize` on an empty cache only records the bound (it shrinks the
    // empty table, which allocates nothing).
    c.resize(NonZeroUsize::new(cap.max(1)).expect("at least one"));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_unallocated_and_evicts_at_the_bound() {
        let mut c = lazy_lru::<u64, u64>(3);
        assert_eq!(c.cap().get(), 3);
        for i in 0..10 {
            c.put(i, i);
        }
        assert_eq!(c.len(), 3);
        assert!(c.contains(&9) && c.contains(&7) && !c.contains(&6));
        assert_eq!(lazy_lru::<u64, u64>(0).cap().get(), 1);
    }
}
