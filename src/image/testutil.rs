//! Helpers for the formats' unit tests (compiled for tests only): reading
//! guest bytes of one layer through its map, and a backing view with a
//! known pattern. Images themselves live in
//! [`MemStorage`](super::storage::MemStorage).

use super::{BackingRead, Layer, Mapping};
use crate::error::Result;
use std::path::Path;

/// Where tests say their in-memory images are (named in errors only).
pub fn mem_path(name: &str) -> &Path {
    Path::new(name)
}

/// Guest bytes `[offset, offset+len)` of `layer` alone, read through its
/// map the way the chain does: data with `read_host`, compressed clusters
/// with `read_compressed`, zeros for `Zero` and (no backing) `Unallocated`.
pub fn read_guest(layer: &dyn Layer, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    for e in layer.map(offset, len)? {
        let dst = &mut buf[(e.start - offset) as usize..(e.end() - offset) as usize];
        match e.mapping {
            Mapping::Data { host } => layer.read_host(host, dst)?,
            Mapping::Compressed { cluster_start } => {
                layer.read_compressed(cluster_start, e.start, dst)?
            }
            Mapping::Zero | Mapping::Unallocated => dst.fill(0),
        }
    }
    Ok(buf)
}

/// The byte `pattern(seed, offset)` puts at guest offset `offset`.
pub fn pattern_byte(seed: u8, offset: u64) -> u8 {
    (offset % 251) as u8 ^ seed
}

pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(seed, offset + i))
        .collect()
}

/// A view below a layer that reads `pattern(seed, ..)` everywhere.
pub struct PatternBelow(pub u8);

impl BackingRead for PatternBelow {
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(self.0, offset + i as u64);
        }
        Ok(())
    }
}
