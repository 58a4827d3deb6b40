//! Whole directories: reading one (the fixed FAT12/16 root region or a
//! cluster chain), parsing its entries, and a cache of parsed directories
//! bounded by their total number of entries, so `ls -l` of a 65,535-entry
//! directory parses it once and many small directories stay cached.

use super::bpb::{Geometry, RootDir};
use super::dirent::{Parsed, Parser};
use super::table::Table;
use crate::guest::{GuestError, GuestResult, ReadBytes};
use lru::LruCache;
use std::collections::HashMap;
use std::sync::Arc;

/// The Microsoft spec caps a directory at 65,536 entries (2 MiB); a longer
/// chain is corruption, and the cap bounds what one directory costs.
pub const MAX_DIR_BYTES: u64 = 65536 * 32;

/// A parsed directory.
pub struct Dir {
    pub entries: Vec<Parsed>,
    /// Name -> index into `entries` (the first entry of a name wins).
    pub index: HashMap<Vec<u8>, usize>,
    /// The directory's size as Linux shows it: its whole cluster chain (or
    /// the fixed root region).
    pub bytes: u64,
    pub subdirs: u32,
    /// The volume label entry (root only).
    pub label: Option<Vec<u8>>,
}

/// Where a directory's entries are.
#[derive(Clone, Copy)]
pub enum Loc {
    Root,
    Cluster(u32),
}

/// Reads and parses the directory at `loc`.
pub fn load(
    volume: &str,
    bytes: &dyn ReadBytes,
    geo: &Geometry,
    table: &Table,
    loc: Loc,
) -> GuestResult<Dir> {
    let mut p = Parser::default();
    let read = |buf: &mut [u8], off: u64| {
        bytes
            .read_exact_at(buf, off)
            .map_err(|e| GuestError::io(volume, off, buf.len(), e))
    };
    let total = match (loc, geo.root) {
        (Loc::Root, RootDir::Fixed { offset, entries }) => {
            let mut buf = vec![0u8; entries as usize * 32];
            read(&mut buf, offset)?;
            p.feed(&buf, offset);
            buf.len() as u64
        }
        (Loc::Root, RootDir::Cluster(c)) | (Loc::Cluster(c), _) => {
            let cs = u64::from(geo.cluster_size);
            let cap = MAX_DIR_BYTES.div_ceil(cs);
            let runs = table.chain(c, Some(cap + 1), false)?;
            let n: u64 = runs.iter().map(|r| u64::from(r.len)).sum();
            if n > cap {
                return Err(GuestError::corrupt(
                    volume,
                    geo.cluster_offset(c),
                    format!("directory at cluster {c} is longer than 65,536 entries"),
                ));
            }
            let mut buf = vec![0u8; cs as usize];
            'runs: for r in &runs {
                for k in 0..r.len {
                    let off = geo.cluster_offset(r.start + k);
                    read(&mut buf, off)?;
                    p.feed(&buf, off);
                    if p.ended {
                        break 'runs;
                    }
                }
            }
            n * cs
        }
    };
    let mut index = HashMap::with_capacity(p.entries.len());
    for (i, e) in p.entries.iter().enumerate() {
        index.entry(e.name.clone()).or_insert(i);
    }
    Ok(Dir {
        subdirs: p.entries.iter().filter(|e| e.short.is_dir()).count() as u32,
        entries: p.entries,
        index,
        bytes: total,
        label: p.label,
    })
}

/// Parsed directories by directory inode, evicted least recently used once
/// they hold more than `max_entries` entries in total.
pub struct Cache {
    lru: LruCache<u64, Arc<Dir>>,
    held: usize,
    max_entries: usize,
}

impl Cache {
    pub fn new(max_entries: usize) -> Cache {
        Cache {
            lru: LruCache::unbounded(),
            held: 0,
            max_entries,
        }
    }

    pub fn get(&mut self, ino: u64) -> Option<Arc<Dir>> {
        self.lru.get(&ino).cloned()
    }

    pub fn put(&mut self, ino: u64, dir: Arc<Dir>) {
        self.held += dir.entries.len() + 1;
        if let Some(old) = self.lru.put(ino, dir) {
            self.held -= old.entries.len() + 1;
        }
        // The newest stays even if it alone is over the bound.
        while self.held > self.max_entries && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, d)) => self.held -= d.entries.len() + 1,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(n: usize) -> Arc<Dir> {
        let short = super::super::dirent::Short::parse(&[b'A'; 32]);
        let e = Parsed {
            name: b"x".to_vec(),
            offset: 0,
            short,
        };
        Arc::new(Dir {
            entries: vec![e; n],
            index: HashMap::new(),
            bytes: 0,
            subdirs: 0,
            label: None,
        })
    }

    #[test]
    fn cache_is_bounded_by_entries() {
        let mut c = Cache::new(100);
        c.put(1, dir(60));
        c.put(2, dir(30));
        assert!(c.get(1).is_some() && c.get(2).is_some());
        c.put(3, dir(50)); // evicts the least recently used (1)
        assert!(c.get(1).is_none() && c.get(2).is_some() && c.get(3).is_some());
        c.put(4, dir(500)); // alone over the bound: kept, others dropped
        assert!(c.get(4).is_some() && c.get(2).is_none() && c.get(3).is_none());
    }
}
