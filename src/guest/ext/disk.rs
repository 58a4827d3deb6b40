//! Block access for the ext reader: bounds-checked reads of the volume, the
//! in-memory journal overlay (filesystem block -> newest committed copy in
//! the journal), and a small LRU of metadata blocks so walking a large tree
//! re-reads inode tables and directory blocks from memory. Nothing here
//! writes to the volume.

use crate::guest::{GuestError, GuestResult, ReadBytes};
use lru::LruCache;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Bytes of metadata blocks kept in the cache (per open volume).
const CACHE_BYTES: u64 = 16 << 20;

/// jbd2 magic, put back into journal copies whose first word was escaped.
pub const JBD2_MAGIC: u32 = 0xC03B_3998;

/// Where the replayed copy of a filesystem block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalCopy {
    /// Byte offset of the copy on the volume (inside the journal).
    pub offset: u64,
    /// The journal stored it with its first four bytes zeroed (they were
    /// the jbd2 magic); they are restored on read.
    pub escaped: bool,
}

pub struct Disk {
    pub name: String,
    bytes: Arc<dyn ReadBytes>,
    pub block_size: u64,
    pub blocks_count: u64,
    overlay: BTreeMap<u64, JournalCopy>,
    cache: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
}

impl Disk {
    pub fn new(name: &str, bytes: Arc<dyn ReadBytes>, block_size: u64, blocks_count: u64) -> Disk {
        let cap = (CACHE_BYTES / block_size).max(16) as usize;
        Disk {
            name: name.to_string(),
            bytes,
            block_size,
            blocks_count,
            overlay: BTreeMap::new(),
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cap).unwrap())),
        }
    }

    /// Installs the journal overlay (and drops cached blocks it changes).
    pub fn set_overlay(&mut self, overlay: BTreeMap<u64, JournalCopy>) {
        self.cache.lock().clear();
        self.overlay = overlay;
    }

    /// Reads raw volume bytes (no overlay).
    pub fn read_raw(&self, buf: &mut [u8], offset: u64) -> GuestResult<()> {
        self.bytes
            .read_exact_at(buf, offset)
            .map_err(|e| GuestError::io(&self.name, offset, buf.len(), e))
    }

    /// Corrupt error for a block number outside the filesystem.
    pub fn check_block(&self, blk: u64, count: u64, at: u64, what: &str) -> GuestResult<()> {
        match blk.checked_add(count) {
            Some(end) if end <= self.blocks_count => Ok(()),
            _ => Err(GuestError::corrupt(
                &self.name,
                at,
                format!(
                    "{what} points to blocks {blk}+{count} outside the filesystem ({} blocks)",
                    self.blocks_count
                ),
            )),
        }
    }

    fn read_copy(&self, copy: JournalCopy, buf: &mut [u8]) -> GuestResult<()> {
        self.read_raw(buf, copy.offset)?;
        if copy.escaped && buf.len() >= 4 {
            buf[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        }
        Ok(())
    }

    /// One metadata block through the overlay and the cache.
    pub fn block(&self, blk: u64) -> GuestResult<Arc<Vec<u8>>> {
        if let Some(b) = self.cache.lock().get(&blk) {
            return Ok(b.clone());
        }
        self.check_block(blk, 1, blk.saturating_mul(self.block_size), "metadata read")?;
        let mut buf = vec![0u8; self.block_size as usize];
        match self.overlay.get(&blk) {
            Some(&copy) => self.read_copy(copy, &mut buf)?,
            None => self.read_raw(&mut buf, blk * self.block_size)?,
        }
        let b = Arc::new(buf);
        self.cache.lock().put(blk, b.clone());
        Ok(b)
    }

    /// Reads `buf.len()` bytes starting `skip` bytes into block `blk`
    /// (contiguous blocks), uncached, with journal copies patched in.
    pub fn read_data(&self, blk: u64, skip: u64, buf: &mut [u8]) -> GuestResult<()> {
        let bs = self.block_size;
        let nblocks = (skip + buf.len() as u64).div_ceil(bs);
        self.check_block(blk, nblocks, blk.saturating_mul(bs), "data read")?;
        self.read_raw(buf, blk * bs + skip)?;
        for (&b, &copy) in self.overlay.range(blk..blk + nblocks) {
            // The part of block b that buf covers.
            let start = (b - blk) * bs;
            let lo = start.max(skip);
            let hi = (start + bs).min(skip + buf.len() as u64);
            if lo >= hi {
                continue;
            }
            let mut whole = vec![0u8; bs as usize];
            self.read_copy(copy, &mut whole)?;
            buf[(lo - skip) as usize..(hi - skip) as usize]
                .copy_from_slice(&whole[(lo - start) as usize..(hi - start) as usize]);
        }
        Ok(())
    }

    /// Reads `len` bytes at volume byte `offset` through the overlay
    /// (superblock and group descriptors, which need not be block aligned).
    pub fn read_meta(&self, offset: u64, buf: &mut [u8]) -> GuestResult<()> {
        let bs = self.block_size;
        self.read_data(offset / bs, offset % bs, buf)
    }
}
