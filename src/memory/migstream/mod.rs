//! QEMU migration streams (what `migrate` writes to `file:` or
//! `exec:cat > F`, what libvirt's `virsh save` stores behind its header)
//! indexed in place: which file offset holds each guest page.
//!
//! The stream (QEMU's migration/savevm.c and migration/ram.c) is a magic
//! `QEVM`, version 3, a configuration record (the machine type and the
//! capabilities both ends must agree on, `mapped-ram` among them), then
//! sections. The RAM section is iterative: its START part carries the RAM
//! block list, its PART and END parts carry page records (`offset|flags`:
//! PAGE + the page's bytes, ZERO + one fill byte, CONTINUE = same block as
//! the record before). A page can be sent several times (pre-copy sends
//! again what the guest dirtied); the last copy is what the guest had when
//! it stopped, so a later record replaces an earlier one.
//!
//! With `mapped-ram` the block list instead gives each block a fixed
//! region of the file (page `i` at `pages_offset + i * page_size`) and a
//! bitmap of the pages written there; a clear bit is a page never written
//! (zero on the destination), a hole here.
//!
//! Device state (non-iterative sections) carries no length and can only
//! be skipped by parsing every device's vmstate, so indexing stops where
//! the RAM section ends; anything before that the parser cannot skip is
//! refused with its name and offset. The file is read with `pread`
//! through a small window; page bytes are never copied, only their
//! offsets kept, so memory grows with the number of records, not with
//! the block sizes a (possibly corrupt) stream claims. In a plain stream
//! each data page is a run of its own (an 8-byte record header separates
//! consecutive pages in the file): about 8 MiB of index per GiB of RAM,
//! built in ~0.2 s per GiB from the page cache (disk speed when cold).
//! Zero pages and mapped-ram pages merge into long runs.
//!
//! One file per layer of the format, outermost first: [`libvirt`] (the
//! save image header in front of the stream), [`sections`] (the stream's
//! framing: header, configuration, commands, section headers and
//! footers), [`ram`] (the RAM section's records and block list),
//! [`mapped`] (a mapped-ram block's bitmap and region), [`pages`] (the
//! page index a plain stream builds); [`reader`] is the bounds-checked
//! cursor they all read through. Parsing is single-threaded and owns its
//! state: nothing here is shared.

use super::{MemorySource, RamBlock, Run};
use crate::error::Result;
use crate::fileio;
use std::collections::HashMap;
use std::path::Path;

/// `return Err(Corrupt)` naming the parser's file and `$at`.
macro_rules! corrupt {
    ($p:expr, $at:expr, $($msg:tt)+) => {
        return Err(ImageError::corrupt($p.path, $at, format!($($msg)+)))
    };
}

/// `return Err(Unsupported)` naming the parser's file and `$at`.
macro_rules! unsupported {
    ($p:expr, $at:expr, $($msg:tt)+) => {
        return Err(ImageError::unsupported(
            $p.path,
            format!("{} (at offset {})", format_args!($($msg)+), $at),
        ))
    };
}

mod libvirt;
mod mapped;
mod pages;
mod ram;
mod reader;
mod sections;

use pages::PageMap;
use reader::Reader;

/// What the page records of a stream held, for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Pages with data (PAGE records; set bits of a mapped-ram bitmap).
    pub data_pages: u64,
    /// Zero-page records.
    pub zero_pages: u64,
    /// Records for a page an earlier record had already sent.
    pub resent: u64,
}

/// Indexes the QEMU migration stream or libvirt save image at `path`.
pub fn index(path: &Path) -> Result<MemorySource> {
    index_with_stats(path).map(|(src, _)| src)
}

/// [`index`], also saying what the page records held.
pub fn index_with_stats(path: &Path) -> Result<(MemorySource, StreamStats)> {
    let file = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
    index_storage(&file, path)
}

/// [`index_with_stats`] of a stream held by any storage (a file, or the
/// vmstate of an internal snapshot read in place); `path` names it.
pub fn index_storage(
    file: &dyn crate::storage::Storage,
    path: &Path,
) -> Result<(MemorySource, StreamStats)> {
    let len = fileio::file_len(file, path)?;
    let mut r = Reader::new(file, path, len);
    let libvirt = libvirt::present(&mut r)?;
    r.pos = if libvirt { libvirt::header(&mut r)? } else { 0 };
    let mut p = Parser::new(r);
    p.parse()?;
    let kind = match (libvirt, p.mapped_ram) {
        (false, false) => "qemu migration stream",
        (false, true) => "qemu migration stream (mapped-ram)",
        (true, false) => "libvirt save image",
        (true, true) => "libvirt save image (mapped-ram)",
    };
    let page = p.page_size;
    let blocks = std::mem::take(&mut p.s.blocks)
        .into_iter()
        .map(|b| RamBlock {
            runs: match b.pages {
                Pages::Records(map) => map.into_runs(page, b.size),
                Pages::Mapped(runs) => runs,
            },
            name: b.name,
            size: b.size,
        });
    let src = MemorySource {
        path: path.to_path_buf(),
        kind: kind.to_string(),
        machine: p.s.machine.take(),
        physical: false,
        blocks: blocks.collect(),
    };
    Ok((src, p.stats))
}

/// Where a block's pages are: found record by record (plain streams), or
/// fixed by its mapped-ram header and bitmap.
enum Pages {
    Records(PageMap),
    Mapped(Vec<Run>),
}

/// A RAM block of the block list.
struct Block {
    name: String,
    size: u64,
    pages: Pages,
}

/// What the stream has said so far.
#[derive(Default)]
struct State {
    machine: Option<String>,
    mapped_ram: bool,
    ignore_shared: bool,
    postcopy_advised: bool,
    blocks: Vec<Block>,
    by_name: HashMap<String, usize>,
    listed: bool,
    last_block: Option<usize>,
    ram_section: Option<u32>,
    footers: Option<bool>,
    stats: StreamStats,
}

struct Parser<'a> {
    r: Reader<'a>,
    path: &'a Path,
    /// The target page size: 4 KiB unless the configuration says
    /// otherwise. Fixed before the first section, so every page number
    /// of the index is in the same unit.
    page_size: u64,
    s: State,
}

impl std::ops::Deref for Parser<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.s
    }
}
impl std::ops::DerefMut for Parser<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.s
    }
}

impl<'a> Parser<'a> {
    fn new(r: Reader<'a>) -> Self {
        let path = r.path;
        Parser {
            r,
            path,
            page_size: 4096,
            s: State::default(),
        }
    }
}
