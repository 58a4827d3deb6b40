//! Memory checkpoints: guest RAM saved with a snapshot point, read in place
//! from the file the hypervisor wrote (a QEMU migration stream, an ELF core
//! from `dump-guest-memory`, a raw dump) and shown as `memory.raw`, laid
//! out by guest-physical address, so forensics tools read it as a raw
//! physical dump (ARCHITECTURE.md, "Layers": a memory source is one more
//! layer, and a point's memory one more chain).
//!
//! Each source format has a parser that indexes the file once into a
//! [`MemorySource`]: the RAM blocks it holds and, for each, which ranges
//! are bytes at some file offset and which are zero pages. [`layout`]
//! places the blocks at guest-physical addresses; [`MemoryLayer`] serves
//! that placement as a [`Layer`](crate::image::Layer), reading the original file with `pread`
//! (no conversion). Ranges a source never sent are holes (read as zeros,
//! reported by SEEK_HOLE).

pub mod checkpoint;
pub mod detect;
pub mod elf;
pub mod error;
pub mod index_cache;
pub mod layout;
pub mod migstream;
pub mod raw;
pub mod view;

use crate::error::Result;
use crate::fileio;
use crate::image::{
    check_range, BackingRef, Extent, Format, Identity, LayerInfo, Locking, Mapping, ReadMap,
    Writable,
};
use crate::storage::Storage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where some bytes of a RAM block are in the source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Stored at this offset of the source file.
    Data { file_offset: u64 },
    /// A zero page (the source recorded it as all zeros).
    Zero,
}

/// A run of a RAM block: `[start, start+len)` within the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
    pub piece: Piece,
}

/// One RAM block of a source: QEMU's RAMBlock (`pc.ram`, a memory
/// backend's id, `vga.vram`, ...), or for sources that already know
/// physical addresses (ELF cores) the guest-physical address space itself.
#[derive(Clone, Debug)]
pub struct RamBlock {
    pub name: String,
    pub size: u64,
    /// Sorted, non-overlapping; what no run covers was never sent.
    pub runs: Vec<Run>,
}

/// What a parser found in a memory source file.
#[derive(Clone, Debug)]
pub struct MemorySource {
    pub path: PathBuf,
    /// What kind of file it is, for `info.json` ("qemu migration stream",
    /// "elf core", "raw dump").
    pub kind: String,
    /// The machine type the source names (`pc-i440fx-10.0`), if any.
    pub machine: Option<String>,
    /// True when the single block's offsets are guest-physical addresses.
    pub physical: bool,
    pub blocks: Vec<RamBlock>,
}

/// A memory view as a chain layer: a flat address space of `size` bytes
/// made of runs that point into `file`.
pub struct MemoryLayer {
    path: PathBuf,
    /// The source's bytes: its file, or the vmstate of an internal
    /// snapshot read in place.
    file: Arc<dyn Storage>,
    size: u64,
    /// Sorted, non-overlapping, guest-physical.
    runs: Vec<Run>,
    kind: String,
}

impl MemoryLayer {
    /// A layer over `runs` of the source file at `path`.
    pub fn new(path: &Path, kind: &str, size: u64, runs: Vec<Run>) -> Result<MemoryLayer> {
        let file = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
        Ok(MemoryLayer::over(Arc::new(file), path, kind, size, runs))
    }

    /// A layer over `runs` of the source bytes `file` (named `path`).
    pub fn over(
        file: Arc<dyn Storage>,
        path: &Path,
        kind: &str,
        size: u64,
        runs: Vec<Run>,
    ) -> MemoryLayer {
        MemoryLayer {
            path: path.to_path_buf(),
            file,
            size,
            runs,
            kind: kind.to_string(),
        }
    }

    /// What kind of source this reads.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

impl ReadMap for MemoryLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<&BackingRef> {
        None
    }

    /// Runs as `Data`/`Zero`; gaps between them (never sent, or no RAM at
    /// that address) as `Zero` too: a memory view is the bottom of its
    /// chain, nothing is below it.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(&self.path, self.size, offset, len)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        let first = self.runs.partition_point(|r| r.start + r.len <= offset);
        for r in &self.runs[first..] {
            if r.start >= end {
                break;
            }
            if r.start > at {
                out.push(Extent {
                    start: at,
                    len: r.start - at,
                    mapping: Mapping::Zero,
                });
                at = r.start;
            }
            let stop = (r.start + r.len).min(end);
            let mapping = match r.piece {
                Piece::Data { file_offset } => Mapping::Data {
                    host: file_offset + (at - r.start),
                },
                Piece::Zero => Mapping::Zero,
            };
            crate::image::push_extent(
                &mut out,
                Extent {
                    start: at,
                    len: stop - at,
                    mapping,
                },
            );
            at = stop;
        }
        if at < end {
            crate::image::push_extent(
                &mut out,
                Extent {
                    start: at,
                    len: end - at,
                    mapping: Mapping::Zero,
                },
            );
        }
        Ok(out)
    }

    fn read_host(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        fileio::read_exact_at(&*self.file, &self.path, buf, host, "memory source data")
    }

    fn info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            file: self.path.clone(),
            format: Format::Raw,
            version: None,
            virtual_size: self.size,
            cluster_size: None,
            file_size: fileio::file_len(&*self.file, &self.path)?,
            backing: None,
            features: vec![self.kind.clone()],
            snapshots: Vec::new(),
        })
    }
}

impl Writable for MemoryLayer {}

impl Identity for MemoryLayer {}

impl Locking for MemoryLayer {}
