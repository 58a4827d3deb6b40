//! Resolving a guest range through a stack of layers: ask the top layer,
//! pass what it does not hold to the next one, and so on.
//!
//! The result carries, per range, the depth of the layer that answered,
//! with QEMU's conventions (so `snaptree map` matches `qemu-img map`):
//! a range no layer holds has the depth of the bottom layer; a range past
//! the end of a backing file reads as zeros and has the depth of the layer
//! above that backing file.

use crate::error::Result;
use crate::image::{Layer, Mapping};
use std::sync::Arc;

/// What provides a resolved range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Bytes at `host` in the layer at `depth`.
    Data { host: u64 },
    /// Like `Data`, but the host bytes are a hole in the layer's file, so
    /// they read as zeros (preallocated clusters). Only `Chain::map`
    /// reports this; the read path treats it as data.
    DataHole { host: u64 },
    /// Inside the compressed cluster starting at guest `cluster_start`.
    Compressed { cluster_start: u64 },
    /// The layer at `depth` says: zeros.
    Zero,
    /// No layer holds it: reads zeros.
    Unallocated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub start: u64,
    pub len: u64,
    pub depth: u32,
    pub source: Source,
}

impl Resolved {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The part of this extent inside `[from, to)`, if any.
    pub fn clip(&self, from: u64, to: u64) -> Option<Resolved> {
        let s = self.start.max(from);
        let e = self.end().min(to);
        if s >= e {
            return None;
        }
        let source = match self.source {
            Source::Data { host } => Source::Data {
                host: host + (s - self.start),
            },
            other => other,
        };
        Some(Resolved {
            start: s,
            len: e - s,
            depth: self.depth,
            source,
        })
    }
}

/// Appends, merging with the previous extent when it continues it.
pub fn push_resolved(out: &mut Vec<Resolved>, r: Resolved) {
    if r.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == r.start && last.depth == r.depth {
            let joins = match (last.source, r.source) {
                (Source::Data { host: a }, Source::Data { host: b })
                | (Source::DataHole { host: a }, Source::DataHole { host: b }) => a + last.len == b,
                (Source::Zero, Source::Zero) | (Source::Unallocated, Source::Unallocated) => true,
                _ => false,
            };
            if joins {
                last.len += r.len;
                return;
            }
        }
    }
    out.push(r);
}

/// Resolves `[offset, offset+len)` through `layers[from..]`.
pub fn resolve(
    layers: &[Arc<dyn Layer>],
    from: usize,
    offset: u64,
    len: u64,
) -> Result<Vec<Resolved>> {
    let mut out = Vec::new();
    if len == 0 {
        return Ok(out);
    }
    if from >= layers.len() {
        out.push(Resolved {
            start: offset,
            len,
            depth: from.saturating_sub(1) as u32,
            source: Source::Unallocated,
        });
        return Ok(out);
    }
    let mut pending = vec![(offset, offset + len)];
    let last = layers.len() - 1;
    for (d, layer) in layers.iter().enumerate().skip(from) {
        if pending.is_empty() {
            break;
        }
        let size = layer.virtual_size();
        let mut next = Vec::new();
        for (s, e) in pending {
            let ce = e.min(size);
            if ce < e {
                // Past the end of this (backing) layer: zeros, attributed
                // to the layer above it.
                let from_s = s.max(ce);
                out.push(Resolved {
                    start: from_s,
                    len: e - from_s,
                    depth: d.saturating_sub(1) as u32,
                    source: Source::Unallocated,
                });
            }
            if s >= ce {
                continue;
            }
            for ext in layer.map(s, ce - s)? {
                let source = match ext.mapping {
                    Mapping::Unallocated if d < last => {
                        next.push((ext.start, ext.end()));
                        continue;
                    }
                    Mapping::Unallocated => Source::Unallocated,
                    Mapping::Zero => Source::Zero,
                    Mapping::Data { host } => Source::Data { host },
                    Mapping::Compressed { cluster_start } => Source::Compressed { cluster_start },
                };
                out.push(Resolved {
                    start: ext.start,
                    len: ext.len,
                    depth: d as u32,
                    source,
                });
            }
        }
        pending = next;
    }
    out.sort_by_key(|r| r.start);
    let mut merged = Vec::with_capacity(out.len());
    for r in out {
        push_resolved(&mut merged, r);
    }
    Ok(merged)
}
