//! Block access for the XFS reader: bounds-checked reads of the volume, a
//! small LRU of metadata blocks (inode clusters, bmbt, directory and attr
//! blocks are re-read from memory while walking a tree), the big-endian
//! field helpers and the v5 metadata CRC check. Nothing here writes.

use crate::guest::{GuestError, GuestResult, ReadBytes};
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Bytes of metadata blocks kept in the cache (per open volume).
const CACHE_BYTES: u64 = 32 << 20;

/// Big-endian u16 at `off`; 0 past the end (callers check lengths first;
/// this only keeps a missed check from becoming a panic).
pub fn be16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

pub fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()))
}

pub fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap()))
}

/// Continues a CRC-32C register over `data` (`crate::crc::crc32c`, which
/// steps eight bytes at a time: every inode and directory block a tree
/// walk reads is checked).
pub fn crc32c(crc: u32, data: &[u8]) -> u32 {
    crate::crc::crc32c(crc, data)
}

/// Checks a v5 metadata CRC: CRC-32C over `buf` with the 4-byte field at
/// `off` taken as zero, stored inverted and little-endian.
pub fn verify_crc(buf: &[u8], off: usize) -> bool {
    if off + 4 > buf.len() {
        return false;
    }
    let mut c = crc32c(!0, &buf[..off]);
    c = crc32c(c, &[0; 4]);
    c = crc32c(c, &buf[off + 4..]);
    !c == u32::from_le_bytes(buf[off..off + 4].try_into().unwrap())
}

/// Checks the self-describing header v5 metadata blocks carry: CRC,
/// their own address (512-byte units), the filesystem's UUID and the
/// owning inode (None: an AG header, no owner). Offsets are the format's.
pub struct V5Hdr {
    pub crc: usize,
    pub blkno: usize,
    pub uuid: usize,
    pub owner: Option<usize>,
}

impl V5Hdr {
    /// `None` if fine, else what is wrong.
    pub fn check(&self, b: &[u8], at: u64, uuid: &[u8; 16], owner: u64) -> Option<&'static str> {
        if !verify_crc(b, self.crc) {
            return Some("CRC mismatch");
        }
        if be64(b, self.blkno) != at / 512 {
            return Some("header names another block");
        }
        if b.get(self.uuid..self.uuid + 16) != Some(&uuid[..]) {
            return Some("header names another filesystem");
        }
        match self.owner {
            Some(o) if be64(b, o) != owner => Some("header names another owner inode"),
            _ => None,
        }
    }
}

type BlockCache = LruCache<(u64, u64), Arc<Vec<u8>>>;

pub struct Disk {
    pub name: String,
    bytes: Arc<dyn ReadBytes>,
    pub block_size: u64,
    pub blocks: u64,
    /// (first block, block count) -> bytes.
    cache: Mutex<BlockCache>,
}

impl Disk {
    pub fn new(name: &str, bytes: Arc<dyn ReadBytes>, block_size: u64, blocks: u64) -> Disk {
        let cap = (CACHE_BYTES / block_size).max(16) as usize;
        Disk {
            name: name.to_string(),
            bytes,
            block_size,
            blocks,
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(cap).unwrap())),
        }
    }

    pub fn read_raw(&self, buf: &mut [u8], offset: u64) -> GuestResult<()> {
        self.bytes
            .read_exact_at(buf, offset)
            .map_err(|e| GuestError::io(&self.name, offset, buf.len(), e))
    }

    /// Corrupt error unless blocks `blk..blk+count` lie inside the filesystem.
    pub fn check_blocks(&self, blk: u64, count: u64, at: u64, what: &str) -> GuestResult<()> {
        match blk.checked_add(count) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(GuestError::corrupt(
                &self.name,
                at,
                format!(
                    "{what} points to blocks {blk}+{count} outside the filesystem ({} blocks)",
                    self.blocks
                ),
            )),
        }
    }

    /// One metadata block (volume block number) through the cache.
    pub fn block(&self, blk: u64) -> GuestResult<Arc<Vec<u8>>> {
        self.blocks(blk, 1)
    }

    /// `n` contiguous metadata blocks (a directory block of several
    /// filesystem blocks) through the cache.
    pub fn blocks(&self, blk: u64, n: u64) -> GuestResult<Arc<Vec<u8>>> {
        if let Some(b) = self.cache.lock().get(&(blk, n)) {
            return Ok(b.clone());
        }
        self.check_blocks(blk, n, blk.saturating_mul(self.block_size), "metadata read")?;
        let mut buf = vec![0u8; (n * self.block_size) as usize];
        self.read_raw(&mut buf, blk * self.block_size)?;
        let b = Arc::new(buf);
        self.cache.lock().put((blk, n), b.clone());
        Ok(b)
    }

    /// Reads file data: `buf.len()` bytes from `skip` bytes into block
    /// `blk` (contiguous blocks), uncached.
    pub fn read_data(&self, blk: u64, skip: u64, buf: &mut [u8]) -> GuestResult<()> {
        let bs = self.block_size;
        let nblocks = (skip + buf.len() as u64).div_ceil(bs);
        self.check_blocks(blk, nblocks, blk.saturating_mul(bs), "data read")?;
        self.read_raw(buf, blk * bs + skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::crc;

    #[test]
    fn crc_round_trip() {
        let mut b = vec![7u8; 64];
        b[8..12].fill(0);
        let c = !crc::crc32c(!0, &b);
        b[8..12].copy_from_slice(&c.to_le_bytes());
        assert!(verify_crc(&b, 8));
        b[20] ^= 1;
        assert!(!verify_crc(&b, 8));
        assert!(!verify_crc(&b, 62));
    }

    #[test]
    fn short_reads_are_zero() {
        assert_eq!(be32(&[1, 2, 3], 0), 0);
        assert_eq!(be16(&[1, 2], 0), 0x102);
    }
}
