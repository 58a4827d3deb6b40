//! Name indexes of directories that have no htree index of their own
//! (ext2/ext3 without dir_index, and ext4 directories `mkfs.ext4 -d` or a
//! small kernel directory left linear). Looking a name up in such a
//! directory means scanning every block of it; a walk that looks up every
//! entry of a directory of n entries would scan it n times. The first
//! lookup builds a name -> inode map, kept in an LRU bounded by the total
//! number of names held.

use super::dir::Raw;
use crate::guest::fsapi::Ino;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Names held in all indexes of one volume (a name costs about 64 bytes:
/// some 16 MiB).
const MAX_NAMES: usize = 256 * 1024;

/// One directory's names; the same name twice (a damaged directory) keeps
/// the first, as a linear scan finds it.
pub type Index = HashMap<Vec<u8>, u32>;

#[derive(Default)]
pub struct Names {
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// Directory inode -> (its index, when last used).
    map: HashMap<Ino, (Arc<Index>, u64)>,
    clock: u64,
    names: usize,
}

impl Names {
    /// The index of directory `dir`, if held.
    pub fn get(&self, dir: Ino) -> Option<Arc<Index>> {
        let mut g = self.inner.lock();
        g.clock += 1;
        let now = g.clock;
        let e = g.map.get_mut(&dir)?;
        e.1 = now;
        Some(e.0.clone())
    }

    /// Keeps `index` for directory `dir`, dropping the least recently used
    /// indexes while over the bound. An index larger than the bound is not
    /// kept (the caller still uses it for this lookup).
    pub fn put(&self, dir: Ino, index: Arc<Index>) {
        if index.len() > MAX_NAMES {
            return;
        }
        let mut g = self.inner.lock();
        g.clock += 1;
        let now = g.clock;
        g.names += index.len();
        if let Some((old, _)) = g.map.insert(dir, (index, now)) {
            g.names -= old.len();
        }
        while g.names > MAX_NAMES {
            let Some((&oldest, _)) = g.map.iter().min_by_key(|(_, (_, used))| *used) else {
                break;
            };
            if let Some((old, _)) = g.map.remove(&oldest) {
                g.names -= old.len();
            }
        }
    }
}

/// Adds a scanned entry to `index` ("." and ".." are not looked up here).
pub fn add(index: &mut Index, e: &Raw) {
    if e.name != b"." && e.name != b".." {
        index.entry(e.name.to_vec()).or_insert(e.ino);
    }
}
