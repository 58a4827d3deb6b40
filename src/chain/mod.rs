//! A chain: the leaf-first stack of layers that makes one disk as it is at
//! one snapshot point, read (and, at the leaf, written) as one flat disk.
//!
//! Reads go through the [`index::ResolutionIndex`]; a read is split into
//! runs (consecutive bytes from one layer at consecutive host offsets) and
//! each run is served with one `pread`, with no lock held. Writes go to the
//! leaf, which completes partial clusters from the layers below, and then
//! patch the index.

pub mod dirty;
pub mod index;
pub mod open;
pub mod resolve;

use crate::error::ImageError;
use crate::image::{BackingRead, Layer};
use index::{ResolutionIndex, REGION};
pub use open::{OpenOptions, DEFAULT_MAX_DEPTH};
use resolve::{resolve, Resolved, Source};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Errors of opening or using a chain; image errors pass through.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{}: cannot open: {source}{}", .path.display(), crate::fdlimit::hint(.source))]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: backing file {name:?} (named at offset {offset}) cannot be opened as {}: {source}{}", .path.display(), .target.display(), crate::fdlimit::hint(.source))]
    Missing {
        path: PathBuf,
        offset: u64,
        name: String,
        target: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: backing file {name:?} (named at offset {offset}) is {}, which is not a regular file or block device", .path.display(), .target.display())]
    NotAnImage {
        path: PathBuf,
        offset: u64,
        name: String,
        target: PathBuf,
    },
    #[error("{}: backing file {name:?} (named at offset {offset}) resolves to {}, outside the tree directory {}; pass --allow-external-backing if you trust this image", .path.display(), .target.display(), .root.display())]
    Outside {
        path: PathBuf,
        offset: u64,
        name: String,
        target: PathBuf,
        root: PathBuf,
    },
    #[error("{}: backing chain loops: the backing file named at offset {offset} is {}, which is already in the chain", .path.display(), .target.display())]
    Cycle {
        path: PathBuf,
        offset: u64,
        target: PathBuf,
    },
    #[error("{}: backing chain is deeper than {max} layers (stopped at the backing file named at offset {offset}); raise --max-depth if the chain is real", .path.display())]
    TooDeep {
        path: PathBuf,
        offset: u64,
        max: usize,
    },
    #[error("{}: backing file format {format:?} is not supported (qcow2, raw and vpc are)", .path.display())]
    Format { path: PathBuf, format: String },
}

impl ChainError {
    pub fn errno(&self) -> i32 {
        match self {
            ChainError::Image(e) => e.errno(),
            ChainError::Open { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ChainError::Format { .. } => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }
    }
}

pub type Result<T, E = ChainError> = std::result::Result<T, E>;

pub struct Chain {
    layers: Vec<Arc<dyn Layer>>,
    size: u64,
    index: Arc<ResolutionIndex>,
    /// Where the last read ended, to spot sequential readers.
    last_end: AtomicU64,
    /// A read-ahead resolver thread is running.
    resolving_ahead: Arc<AtomicBool>,
    /// Writes since the merge engine last asked (see `dirty`).
    pub dirty: dirty::DirtyLog,
    /// Counts writes to the leaf, so views parsed from the disk (the
    /// guest's files) can tell that they are out of date.
    writes: AtomicU64,
}

/// Regions resolved ahead of a sequential reader. Resolving a cold region
/// reads an L2 table per layer; doing it on a helper thread overlaps that
/// metadata I/O with the reader's data I/O, which matters on deep chains.
const RESOLVE_AHEAD: u64 = 2;

/// The view below the leaf, for copy-on-write.
struct Below<'a>(&'a Chain);

impl BackingRead for Below<'_> {
    fn read_below(&self, offset: u64, buf: &mut [u8]) -> crate::error::Result<()> {
        let map = resolve(&self.0.layers, 1, offset, buf.len() as u64)?;
        self.0.read_resolved(map.iter().copied(), offset, buf)
    }
}

impl Chain {
    /// Opens the chain ending in `leaf`.
    pub fn open(leaf: impl AsRef<std::path::Path>, opts: &OpenOptions) -> Result<Chain> {
        Ok(Chain::from_layers(open::open_layers(leaf.as_ref(), opts)?))
    }

    /// A chain of already opened layers, leaf first (at least one).
    pub fn from_layers(layers: Vec<Arc<dyn Layer>>) -> Chain {
        let size = layers[0].virtual_size();
        Chain {
            layers,
            size,
            index: Arc::new(ResolutionIndex::new(size)),
            last_end: AtomicU64::new(u64::MAX),
            resolving_ahead: Arc::new(AtomicBool::new(false)),
            dirty: dirty::DirtyLog::default(),
            writes: AtomicU64::new(0),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many writes the leaf has taken through this chain; changes
    /// whenever what the chain reads may have.
    pub fn generation(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    pub fn leaf(&self) -> &Arc<dyn Layer> {
        &self.layers[0]
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        Ok(crate::image::check_range(
            self.leaf().path(),
            self.size,
            offset,
            len,
        )?)
    }

    /// Reads `buf.len()` bytes of the flattened disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut regions = Vec::new();
        for idx in offset / REGION..=(end - 1) / REGION {
            regions.push(self.index.region(&self.layers, idx)?);
        }
        let pieces = regions.iter().flat_map(|m| {
            m[index::find(m, offset)..]
                .iter()
                .map_while(move |r| r.clip(offset, end))
        });
        self.read_resolved(pieces, offset, buf)?;
        if self.last_end.swap(end, Ordering::Relaxed) == offset {
            self.resolve_ahead((end - 1) / REGION + 1);
        }
        Ok(())
    }

    /// Starts resolving regions `first..first+RESOLVE_AHEAD` on a helper
    /// thread, unless they are cached or one is already at work.
    fn resolve_ahead(&self, first: u64) {
        let last = (first + RESOLVE_AHEAD).min(self.size.div_ceil(REGION));
        let missing: Vec<u64> = (first..last)
            .filter(|i| !self.index.is_cached(*i))
            .collect();
        if missing.is_empty() || self.resolving_ahead.swap(true, Ordering::AcqRel) {
            return;
        }
        let (layers, index, busy) = (
            self.layers.clone(),
            self.index.clone(),
            self.resolving_ahead.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("resolve-ahead".into())
            .spawn(move || {
                for idx in missing {
                    // Errors surface when the reader gets there.
                    if index.region(&layers, idx).is_err() {
                        break;
                    }
                }
                busy.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.resolving_ahead.store(false, Ordering::Release);
        }
    }

    /// Serves a read from resolved extents that cover it in order, one
    /// `pread` per run of host-contiguous data from one layer.
    fn read_resolved(
        &self,
        pieces: impl Iterator<Item = Resolved>,
        offset: u64,
        buf: &mut [u8],
    ) -> crate::error::Result<()> {
        // The pending run: (depth, host, start in buf, length).
        let mut run: Option<(u32, u64, usize, usize)> = None;
        let flush = |run: &mut Option<(u32, u64, usize, usize)>,
                     buf: &mut [u8]|
         -> crate::error::Result<()> {
            if let Some((d, host, at, len)) = run.take() {
                self.layers[d as usize].read_host(host, &mut buf[at..at + len])?;
            }
            Ok(())
        };
        for r in pieces {
            let at = (r.start - offset) as usize;
            let len = r.len as usize;
            match r.source {
                Source::Data { host } | Source::DataHole { host } => {
                    if let Some((d, h, s, l)) = &mut run {
                        if *d == r.depth && *h + *l as u64 == host && *s + *l == at {
                            *l += len;
                            continue;
                        }
                    }
                    flush(&mut run, buf)?;
                    run = Some((r.depth, host, at, len));
                }
                Source::Compressed { cluster_start } => {
                    flush(&mut run, buf)?;
                    self.layers[r.depth as usize].read_compressed(
                        cluster_start,
                        r.start,
                        &mut buf[at..at + len],
                    )?;
                }
                Source::Zero | Source::Unallocated => {
                    flush(&mut run, buf)?;
                    buf[at..at + len].fill(0);
                }
            }
        }
        flush(&mut run, buf)
    }

    /// The resolved allocation map of `[offset, offset+len)`, computed
    /// afresh (not cached), merged where attributes continue.
    /// Data ranges whose host bytes are holes in the file are reported as
    /// `Source::DataHole`, as `qemu-img map` reports them (zero and data).
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Resolved>> {
        self.check(offset, len)?;
        let mut out = Vec::new();
        for r in resolve(&self.layers, 0, offset, len)? {
            let Source::Data { host } = r.source else {
                resolve::push_resolved(&mut out, r);
                continue;
            };
            for (s, e, data) in self.layers[r.depth as usize].host_segments(host, r.len)? {
                let source = if data {
                    Source::Data { host: s }
                } else {
                    Source::DataHole { host: s }
                };
                let piece = Resolved {
                    start: r.start + (s - host),
                    len: e - s,
                    depth: r.depth,
                    source,
                };
                resolve::push_resolved(&mut out, piece);
            }
        }
        Ok(out)
    }

    fn leaf_for_write(&self) -> Result<&Arc<dyn Layer>> {
        let leaf = self.leaf();
        if !leaf.is_writable() {
            return Err(ImageError::invalid(leaf.path(), "chain is open read-only").into());
        }
        Ok(leaf)
    }

    /// Writes to the leaf.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        let leaf = self.leaf_for_write()?;
        let r = leaf.write(offset, data, &Below(self));
        self.leaf_changed(offset, data.len() as u64);
        self.dirty.record(offset, data.len() as u64);
        Ok(r?)
    }

    /// Makes `[offset, offset+len)` read as zeros (zero write or discard).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let leaf = self.leaf_for_write()?;
        let r = leaf.write_zeroes(offset, len, &Below(self));
        self.leaf_changed(offset, len);
        self.dirty.record(offset, len);
        Ok(r?)
    }

    /// Patches the index for a write to `[offset, offset+len)`, widened to
    /// whole allocation units: copy-on-write remaps the unwritten rest of a
    /// cluster too (a compressed cluster becomes a plain one).
    fn leaf_changed(&self, offset: u64, len: u64) {
        self.writes.fetch_add(1, Ordering::Release);
        let unit = self.leaf().allocation_unit().max(1);
        let start = offset / unit * unit;
        let end = (offset + len)
            .div_ceil(unit)
            .saturating_mul(unit)
            .min(self.size);
        self.index
            .leaf_written(self.leaf().as_ref(), start, end - start);
    }

    /// Discard: the range reads as zeros afterwards and its storage is
    /// released where the format allows.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// Makes completed writes durable.
    pub fn flush(&self) -> Result<()> {
        Ok(self.leaf().flush()?)
    }
}

#[cfg(test)]
mod tests {
    //! Reads and writes through a whole chain built in memory, against a
    //! model of the bytes each layer contributes.
    use super::*;
    use crate::image::qcow2::create::{create_on, CreateOptions};
    use crate::image::qcow2::Qcow2Layer;
    use crate::image::raw::RawLayer;
    use crate::image::storage::MemStorage;
    use crate::image::testutil::{mem_path, pattern};

    const SIZE: u64 = 3 * REGION;

    fn qcow2(name: &str, backing: bool) -> Arc<dyn Layer> {
        let mem = MemStorage::new();
        let mut opts = CreateOptions::new(SIZE);
        opts.cluster_bits = 12;
        opts.backing = backing.then(|| ("below".into(), "qcow2".into()));
        create_on(&mem, mem_path(name), &opts).unwrap();
        Arc::new(Qcow2Layer::open_storage(mem_path(name), Box::new(mem), true).unwrap())
    }

    #[test]
    fn reads_match_a_model_across_layers_regions_and_writes() {
        let base = MemStorage::from_bytes(pattern(1, 0, SIZE as usize));
        let base: Arc<dyn Layer> =
            Arc::new(RawLayer::open_storage(mem_path("base.raw"), Box::new(base), false).unwrap());
        let mid = Chain::from_layers(vec![qcow2("mid.qcow2", true), base.clone()]);
        let mut model = pattern(1, 0, SIZE as usize);
        // The middle layer: a write across the border of regions 0 and 1.
        let w = pattern(2, 0, 10_000);
        mid.write_at(&w, REGION - 5000).unwrap();
        model[(REGION - 5000) as usize..(REGION + 5000) as usize].copy_from_slice(&w);
        let top = Chain::from_layers(vec![
            qcow2("top.qcow2", true),
            mid.layers()[0].clone(),
            base,
        ]);
        let mut got = vec![0u8; SIZE as usize];
        top.read_at(&mut got, 0).unwrap();
        assert!(got == model, "chain read differs from the model");
        // Leaf writes (partial clusters, zeros) patch the warm index and,
        // while the merge engine tracks them, the dirty log.
        top.dirty.start();
        top.write_at(b"hello", REGION - 2).unwrap();
        model[(REGION - 2) as usize..(REGION + 3) as usize].copy_from_slice(b"hello");
        top.write_zeroes(2 * REGION + 4096, 8192).unwrap();
        model[(2 * REGION + 4096) as usize..(2 * REGION + 12288) as usize].fill(0);
        top.read_at(&mut got, 0).unwrap();
        assert!(
            got == model,
            "chain read after writes differs from the model"
        );
        // Unaligned small reads agree too.
        let mut b = [0u8; 7];
        top.read_at(&mut b, REGION - 4).unwrap();
        assert_eq!(&b, &model[(REGION - 4) as usize..(REGION + 3) as usize]);
        assert!(top.read_at(&mut b, SIZE - 3).is_err());
        assert_eq!(
            top.dirty.take(),
            vec![
                (REGION - 2, REGION + 3),
                (2 * REGION + 4096, 2 * REGION + 12288)
            ]
        );
    }
}
