//! A point's disk as the guest readers see it: the chain's bytes, with a
//! small read-ahead cache of aligned windows.
//!
//! Guest readers ask for a few KiB at a time (an inode table block, a
//! directory block, a small file), and a tree walk or `tar` asks for them
//! roughly in disk order: `mkfs` and the guest's allocator lay metadata and
//! small files out one after another. The kernel reading the same disk
//! through a loop device gets page-cache read-ahead for that; here a miss
//! reads the whole aligned window around it, so the next few requests are
//! memory copies. Reads of a window or more (file data in bulk) go straight
//! to the chain.
//!
//! A window remembers the chain's write count when it was read and is
//! dropped when the leaf has been written since, so a cached window never
//! outlives a write (the guest views themselves are rebuilt then, see
//! `views`).

use crate::chain::Chain;
use crate::guest::ReadBytes;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Bytes read per miss.
const WINDOW: u64 = 128 << 10;
/// Windows kept per disk of an open view (4 MiB).
const WINDOWS: usize = 32;

type Window = (u64, Arc<Vec<u8>>);

pub(super) struct ChainBytes {
    chain: Arc<Chain>,
    /// Window index -> (chain generation when read, bytes).
    windows: Mutex<lru::LruCache<u64, Window>>,
}

impl ChainBytes {
    pub fn new(chain: Arc<Chain>) -> ChainBytes {
        ChainBytes {
            chain,
            windows: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(WINDOWS).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn read_chain(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.chain
            .read_at(buf, offset)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    /// Window `w`, from the cache or read now.
    fn window(&self, w: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let generation = self.chain.generation();
        if let Some((g, bytes)) = self.windows.lock().get(&w) {
            if *g == generation {
                return Ok(bytes.clone());
            }
        }
        let start = w * WINDOW;
        let len = WINDOW.min(self.chain.size() - start);
        let mut bytes = vec![0u8; len as usize];
        self.read_chain(&mut bytes, start)?;
        let bytes = Arc::new(bytes);
        self.windows.lock().put(w, (generation, bytes.clone()));
        Ok(bytes)
    }
}

impl ReadBytes for ChainBytes {
    fn size(&self) -> u64 {
        self.chain.size()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        crate::guest::check_range(self.size(), buf.len(), offset)?;
        if buf.len() as u64 >= WINDOW {
            return self.read_chain(buf, offset);
        }
        // At most two windows: the request is shorter than one.
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let w = self.window(at / WINDOW)?;
            let skip = (at % WINDOW) as usize;
            let n = (buf.len() - done).min(w.len() - skip);
            buf[done..done + n].copy_from_slice(&w[skip..skip + n]);
            done += n;
        }
        Ok(())
    }
}
