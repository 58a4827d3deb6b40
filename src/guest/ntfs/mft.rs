//! The volume as the rest of the reader sees it: bounds-checked cluster
//! reads and MFT records by number, located through `$MFT`'s own runlist
//! and kept in a bounded LRU (a tree walk reads each record several times:
//! getattr, readdir, lookup).

use super::boot::Boot;
use super::record::Record;
use super::runlist::Map;
use crate::guest::{GuestError, GuestResult, ReadBytes};
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Bytes of MFT records kept parsed (per open volume).
const RECORD_CACHE_BYTES: usize = 16 << 20;
/// Records are read in aligned chunks of this many volume bytes: a walk
/// asks for a directory's files in name order, their records lie near
/// each other in creation order, and one read then serves many of them.
const CHUNK: u64 = 256 << 10;
/// Chunks kept (16 MiB per open volume).
const CHUNKS: usize = 64;

pub struct Vol {
    pub name: String,
    bytes: Arc<dyn ReadBytes>,
    pub boot: Boot,
    /// Where `$MFT`'s data is (set once at open).
    pub mft: Map,
    /// Records `$MFT`'s data holds.
    pub records: u64,
    cache: Mutex<LruCache<u64, Arc<Record>>>,
    /// Chunk index -> its bytes (see `CHUNK`).
    chunks: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
}

impl Vol {
    pub fn new(name: &str, bytes: Arc<dyn ReadBytes>, boot: Boot) -> Vol {
        let cap = (RECORD_CACHE_BYTES / boot.record_size as usize).max(64);
        Vol {
            name: name.to_string(),
            bytes,
            boot,
            mft: Map::default(),
            records: 0,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cap).unwrap())),
            chunks: Mutex::new(LruCache::new(NonZeroUsize::new(CHUNKS).unwrap())),
        }
    }

    /// Reads `buf.len()` bytes at `off` through the chunk cache when they
    /// lie in one chunk (records, index blocks), else straight.
    pub fn read_meta(&self, buf: &mut [u8], off: u64) -> GuestResult<()> {
        let c = off / CHUNK;
        let end = off.checked_add(buf.len() as u64);
        if buf.is_empty() || end.is_none_or(|e| (e - 1) / CHUNK != c) {
            return self.read_at(buf, off);
        }
        let chunk = self.chunks.lock().get(&c).cloned();
        let chunk = match chunk {
            Some(ch) => ch,
            None => {
                let start = c * CHUNK;
                let len = CHUNK.min(self.bytes.size().saturating_sub(start));
                let mut v = vec![0u8; len as usize];
                self.read_at(&mut v, start)?;
                let v = Arc::new(v);
                self.chunks.lock().put(c, v.clone());
                v
            }
        };
        let skip = (off - c * CHUNK) as usize;
        match chunk.get(skip..skip + buf.len()) {
            Some(src) => buf.copy_from_slice(src),
            // Past the end of the volume: the straight read says so.
            None => return self.read_at(buf, off),
        }
        Ok(())
    }

    pub fn corrupt(&self, offset: u64, what: impl Into<String>) -> GuestError {
        GuestError::corrupt(&self.name, offset, what)
    }

    /// Reads volume bytes; the range must lie inside the volume.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> GuestResult<()> {
        self.bytes
            .read_exact_at(buf, off)
            .map_err(|e| GuestError::io(&self.name, off, buf.len(), e))
    }

    /// Installs `$MFT`'s runlist holding `size` bytes of records.
    pub fn set_mft(&mut self, map: Map, size: u64) {
        let by_map = map.clusters().saturating_mul(self.boot.cluster);
        self.records = size.min(by_map) / u64::from(self.boot.record_size);
        self.mft = map;
        self.cache.lock().clear();
        self.chunks.lock().clear();
    }

    /// Volume offset of record `no` (records never straddle a run gap
    /// when a record is at least a cluster; smaller ones sit in one).
    fn record_offset(&self, no: u64) -> GuestResult<u64> {
        let rs = u64::from(self.boot.record_size);
        if no >= self.records {
            return Err(GuestError::NotFound);
        }
        let byte = no * rs;
        let cs = self.boot.cluster;
        let vcn = byte / cs;
        let run = self.mft.find(vcn).ok_or(GuestError::NotFound)?;
        let Some(lcn) = run.lcn else {
            return Err(self.corrupt(
                self.boot.mft_lcn * cs,
                format!("$MFT: record {no} lies in a sparse run"),
            ));
        };
        // A record spanning clusters must have them all in this run.
        let last_vcn = (byte + rs - 1) / cs;
        if last_vcn >= run.vcn + run.len {
            return Err(GuestError::unsupported(
                &self.name,
                format!("MFT record {no} spans two $MFT runs"),
            ));
        }
        Ok((lcn + vcn - run.vcn) * cs + byte % cs)
    }

    /// MFT record `no`, fixed up; `NotFound` past the end of `$MFT`.
    pub fn record(&self, no: u64) -> GuestResult<Arc<Record>> {
        if let Some(r) = self.cache.lock().get(&no) {
            return Ok(r.clone());
        }
        let off = self.record_offset(no)?;
        let mut buf = vec![0u8; self.boot.record_size as usize];
        self.read_meta(&mut buf, off)?;
        let r = Arc::new(Record::parse(&self.name, no, buf, off)?);
        self.cache.lock().put(no, r.clone());
        Ok(r)
    }

    /// Reads and parses record `no` at volume offset `off` (at open,
    /// before `$MFT`'s runlist is known).
    pub fn record_at(&self, no: u64, off: u64) -> GuestResult<Record> {
        let mut buf = vec![0u8; self.boot.record_size as usize];
        self.read_at(&mut buf, off)?;
        Record::parse(&self.name, no, buf, off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(size: usize) -> Vol {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 4096) as u8).collect();
        let boot = Boot {
            cluster: 4096,
            clusters: size as u64 / 4096,
            mft_lcn: 0,
            record_size: 1024,
            serial: 0,
        };
        Vol::new("v", Arc::new(bytes), boot)
    }

    #[test]
    fn chunked_reads_match_straight_ones() {
        // A volume ending inside a chunk, so the last chunk is short.
        let size = 2 * CHUNK as usize + 12288;
        let v = vol(size);
        let c = CHUNK;
        let cases = [
            (0, 1024),
            (c - 1024, 1024),
            (c - 512, 1024), // across a chunk boundary: read straight
            (c, 4096),
            (2 * c + 8192, 4096), // the short last chunk
            (size as u64 - 1, 1),
        ];
        for (off, len) in cases {
            let mut a = vec![0u8; len];
            let mut b = vec![1u8; len];
            v.read_meta(&mut a, off).unwrap();
            v.read_at(&mut b, off).unwrap();
            assert_eq!(a, b, "{off}+{len}");
        }
        // Past the end fails, through the cache or not.
        let mut a = vec![0u8; 1024];
        assert!(v.read_meta(&mut a, size as u64 - 512).is_err());
        assert!(v.read_meta(&mut a, size as u64 + 4096).is_err());
        assert!(v.read_meta(&mut a, u64::MAX - 100).is_err());
    }
}
