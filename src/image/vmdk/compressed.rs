//! streamOptimized grains: each grain is deflated (zlib, as QEMU's and
//! VMware's writers make them) behind a marker (guest sector as a 64-bit
//! LBA, then the compressed length). Inflated grains are kept in a small
//! LRU so that small sequential reads of one grain inflate it once.
//!
//! Bounds: a marker's length may not exceed two grains (QEMU's limit), and
//! a grain inflates to at most one grain; the LBA must be the grain's own.

use super::extents::{ExtentKind, OpenExtent};
use super::tables::Grain;
use crate::error::{ImageError, Result};
use crate::fileio;
use lru::LruCache;
use parking_lot::Mutex;
use std::sync::Arc;

/// Inflated grains kept (64 KiB each by default).
const CACHED_GRAINS: usize = 32;

/// Inflated grains by (extent index, guest offset of the grain).
type Inflated = LruCache<(usize, u64), Arc<Vec<u8>>>;

pub struct GrainCache {
    cache: Mutex<Inflated>,
}

impl Default for GrainCache {
    fn default() -> Self {
        GrainCache::new()
    }
}

impl GrainCache {
    pub fn new() -> GrainCache {
        GrainCache {
            cache: Mutex::new(crate::cache::lazy_lru(CACHED_GRAINS)),
        }
    }

    /// Reads guest bytes at `offset` from the compressed grain of extent
    /// `i` that starts at guest `grain_start`.
    pub fn read(
        &self,
        i: usize,
        e: &OpenExtent,
        grain_start: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let cached = self.cache.lock().get(&(i, grain_start)).cloned();
        let data = match cached {
            Some(d) => d,
            None => {
                let d = Arc::new(inflate_grain(e, grain_start)?);
                self.cache.lock().put((i, grain_start), d.clone());
                d
            }
        };
        let from = offset
            .checked_sub(grain_start)
            .map(|f| f as usize)
            .filter(|f| f + buf.len() <= data.len());
        let Some(from) = from else {
            return Err(ImageError::corrupt(
                &e.path,
                0,
                format!(
                    "compressed grain at guest offset {grain_start} inflates to {} bytes, too few for a read at {offset} of {}",
                    data.len(),
                    buf.len()
                ),
            ));
        };
        buf.copy_from_slice(&data[from..from + buf.len()]);
        Ok(())
    }
}

fn inflate_grain(e: &OpenExtent, grain_start: u64) -> Result<Vec<u8>> {
    let ExtentKind::Sparse(t) = &e.kind else {
        return Err(ImageError::invalid(&e.path, "not a sparse extent"));
    };
    let file = e.file.as_deref().expect("sparse extents have a file");
    let index = (grain_start - e.start) / t.grain;
    let Grain::At(at) = t.lookup(file, &e.path, index)? else {
        return Err(ImageError::invalid(
            &e.path,
            format!("grain at guest offset {grain_start} is not stored"),
        ));
    };
    let grain = t.grain as usize;
    let (data_at, len) = if e.markers {
        let mut m = [0u8; 12];
        fileio::read_exact_at(file, &e.path, &mut m, at, "VMDK grain marker")?;
        let lba = u64::from_le_bytes(m[..8].try_into().expect("8 bytes"));
        let size = u32::from_le_bytes(m[8..].try_into().expect("4 bytes")) as u64;
        let want = (grain_start - e.start) / 512;
        if lba != want {
            return Err(ImageError::corrupt(
                &e.path,
                at,
                format!(
                    "grain marker says sector {lba}, but the grain table puts it at sector {want}"
                ),
            ));
        }
        if size == 0 || size > 2 * t.grain {
            return Err(ImageError::corrupt(
                &e.path,
                at + 8,
                format!("compressed grain of {size} bytes (at most two grains)"),
            ));
        }
        (at + 12, size as usize)
    } else {
        // No markers: the deflated grain starts right there; it may run
        // into the next one, which the inflater stops before.
        (at, 2 * grain)
    };
    let mut input = vec![0u8; len];
    if e.markers {
        fileio::read_exact_at(file, &e.path, &mut input, data_at, "VMDK compressed grain")?;
    } else {
        fileio::read_at_zero_fill(file, &e.path, &mut input, data_at)?;
    }
    let mut out = vec![0u8; grain];
    let mut d = flate2::Decompress::new(true);
    let status = d
        .decompress(&input, &mut out, flate2::FlushDecompress::Finish)
        .map_err(|err| ImageError::corrupt(&e.path, data_at, format!("compressed grain: {err}")))?;
    if status != flate2::Status::StreamEnd {
        return Err(ImageError::corrupt(
            &e.path,
            data_at,
            format!("compressed grain does not end within {} bytes", grain),
        ));
    }
    out.truncate(d.total_out() as usize);
    Ok(out)
}
