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
    let (entries, index) = unique(p.entries);
    Ok(Dir {
        subdirs: entries.iter().filter(|e| e.short.is_dir()).count() as u32,
        entries,
        index,
        bytes: total,
        label: p.label,
    })
}

/// The entries with unique names, and the index of their names: the first
/// entry of a name keeps it; a later one takes its short name if that is
/// still free, else it is left out (it could never be looked up).
fn unique(parsed: Vec<Parsed>) -> (Vec<Parsed>, HashMap<Vec<u8>, usize>) {
    let mut index = HashMap::with_capacity(parsed.len());
    let mut entries = Vec::with_capacity(parsed.len());
    for mut e in parsed {
        if index.contains_key(&e.name) {
            e.name = e.short.display_name();
            if index.contains_key(&e.name) || !super::dirent::usable(&e.name) {
                continue;
            }
        }
        index.insert(e.name.clone(), entries.len());
        entries.push(e);
    }
    (entries, index)
}

/// Parsed directories by key (first cluster), evicted least recently used once
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

    pub fn get(&mut self, key: u64) -> Option<Arc<Dir>> {
        self.lru.get(&key).cloned()
    }

    pub fn put(&mut self, key: u64, dir: Arc<Dir>) {
        self.held += dir.entries.len() + 1;
        if let Some(old) = self.lru.put(key, dir) {
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
    fn duplicate_names_fall_back_to_short_names_or_are_left_out() {
        let e = |name: &str, raw: &[u8; 11], offset: u64| {
            let mut b = [0u8; 32];
            b[..11].copy_from_slice(raw);
            b[11] = 0x20;
            Parsed {
                name: name.as_bytes().to_vec(),
                offset,
                short: super::super::dirent::Short::parse(&b),
            }
        };
        let (entries, index) = unique(vec![
            e("a\u{fffd}.txt", b"A_1     TXT", 0),
            e("a\u{fffd}.txt", b"A_2     TXT", 32),
            e("A_2.TXT", b"A_3     TXT", 64),
            e("a\u{fffd}.txt", b"A_1     TXT", 96),
            e("A_1.TXT", b"A_1     TXT", 128),
        ]);
        let names: Vec<_> = entries
            .iter()
            .map(|e| (String::from_utf8(e.name.clone()).unwrap(), e.offset))
            .collect();
        assert_eq!(
            names,
            [
                ("a\u{fffd}.txt".to_string(), 0),
                ("A_2.TXT".to_string(), 32),
                ("A_3.TXT".to_string(), 64),
                ("A_1.TXT".to_string(), 96),
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(index[&e.name], i);
        }
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
