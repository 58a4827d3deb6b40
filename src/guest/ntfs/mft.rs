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

pub struct Vol {
    pub name: String,
    bytes: Arc<dyn ReadBytes>,
    pub boot: Boot,
    /// Where `$MFT`'s data is (set once at open).
    pub mft: Map,
    /// Records `$MFT`'s data holds.
    pub records: u64,
    cache: Mutex<LruCache<u64, Arc<Record>>>,
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
        }
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
        let by_map = map.clusters() * self.boot.cluster;
        self.records = size.min(by_map) / u64::from(self.boot.record_size);
        self.mft = map;
        self.cache.lock().clear();
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
        let r = Arc::new(self.record_at(no, off)?);
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
