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

use super::{MemorySource, Piece, RamBlock, Run};
use crate::error::{ImageError, Result};
use crate::fileio;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

const QEMU_VM_FILE_MAGIC: &[u8] = b"QEVM";
const QEMU_VM_FILE_VERSION: u32 = 3;

// Section types (savevm.c).
const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_SECTION_START: u8 = 0x01;
const QEMU_VM_SECTION_PART: u8 = 0x02;
const QEMU_VM_SECTION_END: u8 = 0x03;
const QEMU_VM_SECTION_FULL: u8 = 0x04;
const QEMU_VM_SUBSECTION: u8 = 0x05;
const QEMU_VM_CONFIGURATION: u8 = 0x07;
const QEMU_VM_COMMAND: u8 = 0x08;
const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

// Page record flags (ram.c), in the low bits of the page offset.
const RAM_SAVE_FLAG_FULL: u64 = 0x01;
const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
const RAM_SAVE_FLAG_EOS: u64 = 0x10;
const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
const RAM_SAVE_FLAG_HOOK: u64 = 0x80;
const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;
const KNOWN_FLAGS: u64 = RAM_SAVE_FLAG_ZERO
    | RAM_SAVE_FLAG_MEM_SIZE
    | RAM_SAVE_FLAG_PAGE
    | RAM_SAVE_FLAG_EOS
    | RAM_SAVE_FLAG_CONTINUE
    | RAM_SAVE_FLAG_HOOK;

/// QEMU_VM_COMMAND sub-command (savevm.c `enum qemu_vm_cmd`).
const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// The RAM section's vmstate version since QEMU 2.x.
const RAM_SECTION_VERSION: u32 = 4;
/// `MappedRamHeader` (ram.c), packed: be32 version, be64 page_size,
/// be64 bitmap_offset, be64 pages_offset.
const MAPPED_RAM_HEADER_LEN: usize = 28;
const MAPPED_RAM_HDR_VERSION: u32 = 1;
/// No RAM block is larger; a bigger length is corruption.
const MAX_BLOCK: u64 = 16 << 40;

// libvirt's save image header (src/qemu/qemu_saveimage.h): magic[16],
// then u32 version, data_len, was_running, format, cookieOffset,
// unused[14], in the byte order of the host that wrote it; then
// `data_len` bytes of XML (and cookie, and padding); then the stream.
const LIBVIRT_MAGIC: &[u8] = b"LibvirtQemudSave";
const LIBVIRT_PARTIAL: &[u8] = b"LibvirtQemudPart";
const LIBVIRT_HEADER_LEN: usize = 92;
const LIBVIRT_VERSION: u32 = 2;
const LIBVIRT_FORMATS: [&str; 7] = ["raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse"];
const LIBVIRT_FORMAT_SPARSE: u32 = 6;

/// Read window: a few dozen page records per `pread`.
const WINDOW: usize = 256 << 10;

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
    let file = File::open(path).map_err(|e| ImageError::io(path, "open", 0, e))?;
    let len = fileio::file_len(&file, path)?;
    let mut p = Parser::new(Reader::new(&file, path, len));
    let libvirt = p.r.len >= 12 && p.r.bytes(12, "magic")?[..] == LIBVIRT_MAGIC[..12];
    p.r.pos = if libvirt { p.libvirt_header()? } else { 0 };
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

/// Sequential big-endian reads through a window of the file.
struct Reader<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl<'a> Reader<'a> {
    fn new(file: &'a File, path: &'a Path, len: u64) -> Self {
        let (pos, buf, buf_at) = (0, Vec::new(), 0);
        Reader {
            file,
            path,
            len,
            pos,
            buf,
            buf_at,
        }
    }

    /// Checks that `n` bytes at the current position are in the file.
    fn need(&self, n: u64, what: &str) -> Result<()> {
        if self.len.saturating_sub(self.pos) < n {
            corrupt!(
                self,
                self.pos,
                "{what} ({n} bytes) runs past the end of the file: the stream is truncated"
            );
        }
        Ok(())
    }

    /// `n` bytes at the current position, consumed.
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        self.need(n as u64, what)?;
        if self.pos < self.buf_at || self.pos + n as u64 > self.buf_at + self.buf.len() as u64 {
            let want = n.max(WINDOW).min((self.len - self.pos) as usize);
            self.buf.resize(want, 0);
            fileio::read_exact_at(self.file, self.path, &mut self.buf, self.pos, what)?;
            self.buf_at = self.pos;
        }
        let at = (self.pos - self.buf_at) as usize;
        self.pos += n as u64;
        Ok(&self.buf[at..at + n])
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        self.take(n, what).map(<[u8]>::to_vec)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn be16(&mut self, what: &str) -> Result<u16> {
        Ok(fileio::be_u16(self.take(2, what)?, 0))
    }
    fn be32(&mut self, what: &str) -> Result<u32> {
        Ok(fileio::be_u32(self.take(4, what)?, 0))
    }
    fn be64(&mut self, what: &str) -> Result<u64> {
        Ok(fileio::be_u64(self.take(8, what)?, 0))
    }
    /// A string with a one-byte length, as QEMU writes ids and names.
    fn str8(&mut self, what: &str) -> Result<String> {
        let n = self.u8(what)? as usize;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    /// The next byte, not consumed; `None` at the end of the file.
    fn peek(&mut self) -> Result<Option<u8>> {
        if self.pos >= self.len {
            return Ok(None);
        }
        let b = self.u8("section type")?;
        self.pos -= 1;
        Ok(Some(b))
    }
    /// Skips `n` bytes that must be in the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        self.need(n, what)?;
        self.pos += n;
        Ok(())
    }
}

/// `piece` moved `bytes` into its run.
fn advance(piece: Piece, bytes: u64) -> Piece {
    match piece {
        Piece::Data { file_offset } => Piece::Data {
            file_offset: file_offset + bytes,
        },
        Piece::Zero => Piece::Zero,
    }
}

/// The pages of one block as the records send them, the latest piece of
/// each page, kept as runs: start page -> (pages, piece of the first).
#[derive(Default)]
struct PageMap(BTreeMap<u64, (u64, Piece)>);

impl PageMap {
    /// Records `piece` for `page`, replacing what an earlier record sent.
    /// Returns whether the page had been sent before.
    fn set(&mut self, page: u64, piece: Piece, ps: u64) -> bool {
        if let Some((&start, &(len, first))) = self.0.range(..=page).next_back() {
            if page < start + len {
                if advance(first, (page - start) * ps) != piece {
                    self.0.remove(&start);
                    if page > start {
                        self.0.insert(start, (page - start, first));
                    }
                    if page + 1 < start + len {
                        let rest = advance(first, (page + 1 - start) * ps);
                        self.0.insert(page + 1, (start + len - page - 1, rest));
                    }
                    self.0.insert(page, (1, piece));
                }
                return true;
            }
            if page == start + len && advance(first, len * ps) == piece {
                self.0.insert(start, (len + 1, first));
                return false;
            }
        }
        self.0.insert(page, (1, piece));
        false
    }

    /// The runs in bytes, neighbours whose pieces continue merged.
    fn into_runs(self, ps: u64, block_size: u64) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for (page, (pages, piece)) in self.0 {
            let start = page * ps;
            let len = (pages * ps).min(block_size - start);
            match out.last_mut() {
                Some(l) if l.start + l.len == start && advance(l.piece, l.len) == piece => {
                    l.len += len
                }
                _ => out.push(Run { start, len, piece }),
            }
        }
        out
    }
}

enum Pages {
    Records(PageMap),
    Mapped(Vec<Run>),
}

struct Block {
    name: String,
    size: u64,
    pages: Pages,
}

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

    /// Checks libvirt's header; returns where the QEMU stream starts.
    fn libvirt_header(&mut self) -> Result<u64> {
        self.r.pos = 0;
        let h = self
            .r
            .bytes(LIBVIRT_HEADER_LEN, "libvirt save image header")?;
        if h[..16] == LIBVIRT_PARTIAL[..] {
            unsupported!(
                self,
                0,
                "incomplete libvirt save image (magic LibvirtQemudPart: the save did \
                not finish); save the domain again"
            );
        }
        if h[..16] != LIBVIRT_MAGIC[..] {
            corrupt!(self, 0, "unknown libvirt save image magic");
        }
        let field = |i: usize, swap: bool| {
            let b = [h[16 + 4 * i], h[17 + 4 * i], h[18 + 4 * i], h[19 + 4 * i]];
            if swap {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        // The saving host's byte order: libvirt swaps when the version
        // makes no sense as it is.
        let swap = field(0, false) > LIBVIRT_VERSION;
        let (version, data_len, format) = (field(0, swap), field(1, swap), field(3, swap));
        if version == 0 || version > LIBVIRT_VERSION {
            unsupported!(
                self,
                16,
                "libvirt save image version {version} (snaptree reads 1 and 2)"
            );
        }
        if version == 2 && format != 0 && format != LIBVIRT_FORMAT_SPARSE {
            let name = LIBVIRT_FORMATS
                .get(format as usize)
                .copied()
                .unwrap_or("an unknown format");
            unsupported!(
                self,
                28,
                "libvirt save image compressed with {name} (format {format}); snaptree \
                reads uncompressed images only: save with save_image_format = \"raw\" \
                in qemu.conf, or restore the domain and save it again"
            );
        }
        let start = LIBVIRT_HEADER_LEN as u64 + u64::from(data_len);
        if start > self.r.len {
            corrupt!(
                self,
                20,
                "libvirt XML length {data_len} runs past the end of the file"
            );
        }
        Ok(start)
    }

    /// Reads up to the end of the RAM section.
    fn parse(&mut self) -> Result<()> {
        let start = self.r.pos;
        if self.r.bytes(4, "stream magic")? != QEMU_VM_FILE_MAGIC {
            corrupt!(self, start, "not a QEMU migration stream (no QEVM magic)");
        }
        let version = self.r.be32("stream version")?;
        if version != QEMU_VM_FILE_VERSION {
            unsupported!(
                self,
                start + 4,
                "QEMU migration stream version {version}; snaptree reads version 3 \
                (QEMU 0.13 and later)"
            );
        }
        loop {
            let at = self.r.pos;
            let Some(kind) = self.r.peek()? else {
                corrupt!(
                    self,
                    at,
                    "the stream ends before its RAM section is complete: the file is truncated"
                );
            };
            self.r.pos += 1;
            match kind {
                QEMU_VM_CONFIGURATION => self.configuration()?,
                QEMU_VM_COMMAND => self.command(at)?,
                QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                    let id = self.r.be32("section id")?;
                    let name = self.r.str8("section name")?;
                    let instance = self.r.be32("section instance id")?;
                    let version = self.r.be32("section version id")?;
                    if kind == QEMU_VM_SECTION_FULL {
                        unsupported!(
                            self,
                            at,
                            "device state section '{name}' (id {id}, instance {instance}) before \
                            the RAM section is complete: device state carries no length, so \
                            snaptree cannot skip it"
                        );
                    }
                    if name != "ram" {
                        unsupported!(
                            self,
                            at,
                            "iterative section '{name}' (id {id}) interleaved with RAM: snaptree \
                            cannot skip it without parsing it; migrate without the capability \
                            that adds it"
                        );
                    }
                    if self.ram_section.is_some() {
                        corrupt!(self, at, "a second RAM section starts");
                    }
                    if version != RAM_SECTION_VERSION {
                        unsupported!(
                            self,
                            at,
                            "RAM section version {version} (snaptree reads version 4)"
                        );
                    }
                    self.ram_section = Some(id);
                    self.ram_part()?;
                    self.footer(id)?;
                }
                QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                    let id = self.r.be32("section id")?;
                    if self.ram_section != Some(id) {
                        let ram = match self.ram_section {
                            Some(ram) => format!("RAM is section {ram}"),
                            None => "the RAM section has not started".to_string(),
                        };
                        corrupt!(self, at, "section id {id} never started ({ram})");
                    }
                    self.ram_part()?;
                    self.footer(id)?;
                    if kind == QEMU_VM_SECTION_END {
                        if !self.listed {
                            corrupt!(self, at, "the RAM section ended without a RAM block list");
                        }
                        // The rest is device state, which a memory view
                        // does not need.
                        return Ok(());
                    }
                }
                QEMU_VM_EOF => {
                    corrupt!(
                        self,
                        at,
                        "the stream ends (QEMU_VM_EOF) before its RAM section is complete"
                    );
                }
                other => {
                    corrupt!(
                        self,
                        at,
                        "unknown section type 0x{other:02x} before the RAM section is complete"
                    );
                }
            }
        }
    }

    /// QEMU_VM_CONFIGURATION: the machine type, then subsections.
    fn configuration(&mut self) -> Result<()> {
        let at = self.r.pos;
        let len = self.r.be32("machine type length")?;
        if len > 256 {
            corrupt!(self, at, "machine type name of {len} bytes");
        }
        let name = self.r.bytes(len as usize, "machine type")?;
        self.machine = Some(String::from_utf8_lossy(&name).into_owned());
        while self.r.peek()? == Some(QEMU_VM_SUBSECTION) {
            let at = self.r.pos;
            self.r.pos += 1;
            let name = self.r.str8("configuration subsection name")?;
            self.r.be32("configuration subsection version")?;
            match name.as_str() {
                "configuration/target-page-bits" => {
                    let bits = self.r.be32("target page bits")?;
                    if !(9..=20).contains(&bits) {
                        corrupt!(self, at, "target page bits {bits}");
                    }
                    self.page_size = 1 << bits;
                }
                "configuration/capabilities" => {
                    for _ in 0..self.r.be32("capability count")? {
                        match self.r.str8("capability name")?.as_str() {
                            "mapped-ram" => self.mapped_ram = true,
                            "x-ignore-shared" => self.ignore_shared = true,
                            _ => {}
                        }
                    }
                }
                "configuration/uuid" => self.r.skip(16, "VM UUID")?,
                _ => unsupported!(self, at, "unknown configuration subsection '{name}'"),
            }
        }
        Ok(())
    }

    /// QEMU_VM_COMMAND: be16 command, be16 length, arguments.
    fn command(&mut self, at: u64) -> Result<()> {
        let cmd = self.r.be16("command")?;
        let len = self.r.be16("command length")?;
        let refused = match cmd {
            4 | 5 => "postcopy (POSTCOPY_LISTEN/RUN): RAM completes after the device state",
            6 => "a postcopy page discard (POSTCOPY_RAM_DISCARD)",
            7 => "a packaged stream (PACKAGED, postcopy)",
            8 => "COLO (ENABLE_COLO)",
            9 => "a postcopy resume (POSTCOPY_RESUME)",
            _ => "",
        };
        if !refused.is_empty() {
            unsupported!(
                self,
                at,
                "stream command {cmd}: {refused}; snaptree reads pre-copy streams"
            );
        }
        if cmd == MIG_CMD_POSTCOPY_ADVISE && len >= 16 {
            // Postcopy RAM was enabled: block list entries of blocks on
            // huge pages carry their page size.
            self.postcopy_advised = true;
        }
        self.r.skip(u64::from(len), "command arguments")
    }

    /// The footer after a section part (machine types since 2.4 write
    /// one; then every part has one).
    fn footer(&mut self, id: u32) -> Result<()> {
        let at = self.r.pos;
        let present = self.r.peek()? == Some(QEMU_VM_SECTION_FOOTER);
        if !present && self.footers == Some(true) {
            corrupt!(self, at, "missing footer of section {id}");
        }
        self.footers = Some(present);
        if present {
            self.r.pos += 1;
            let got = self.r.be32("section footer")?;
            if got != id {
                corrupt!(self, at, "footer of section {got} ends section {id}");
            }
        }
        Ok(())
    }

    /// Page records up to RAM_SAVE_FLAG_EOS.
    fn ram_part(&mut self) -> Result<()> {
        let mask = self.page_size - 1;
        loop {
            let at = self.r.pos;
            let word = self.r.be64("RAM record header")?;
            let (addr, flags) = (word & !mask, word & mask);
            self.check_flags(at, flags)?;
            match flags & !RAM_SAVE_FLAG_CONTINUE {
                RAM_SAVE_FLAG_EOS => return Ok(()),
                RAM_SAVE_FLAG_HOOK => {} // RDMA's hook: nothing in the stream
                RAM_SAVE_FLAG_MEM_SIZE => self.block_list(at, addr)?,
                RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE => self.page(at, addr, flags)?,
                _ => corrupt!(
                    self,
                    at,
                    "RAM record with an invalid combination of flags 0x{flags:x}"
                ),
            }
        }
    }

    fn check_flags(&self, at: u64, flags: u64) -> Result<()> {
        let named = [
            (
                RAM_SAVE_FLAG_XBZRLE,
                "an XBZRLE-compressed page (xbzrle capability)",
            ),
            (
                RAM_SAVE_FLAG_COMPRESS_PAGE,
                "a compressed page (compress capability, QEMU < 9.1)",
            ),
            (
                RAM_SAVE_FLAG_MULTIFD_FLUSH,
                "multifd: the pages went over other channels, not into this file",
            ),
            (RAM_SAVE_FLAG_FULL, "RAM_SAVE_FLAG_FULL (QEMU before 0.13)"),
        ];
        for (flag, what) in named {
            if flags & flag != 0 {
                unsupported!(
                    self,
                    at,
                    "RAM record flag 0x{flag:x}: {what}; migrate without it"
                );
            }
        }
        if flags & !KNOWN_FLAGS != 0 {
            corrupt!(
                self,
                at,
                "RAM record with unknown flag 0x{:x}",
                flags & !KNOWN_FLAGS
            );
        }
        if self.mapped_ram
            && flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_HOOK) != 0
        {
            corrupt!(
                self,
                at,
                "page record (flags 0x{flags:x}) in a mapped-ram stream"
            );
        }
        Ok(())
    }

    /// RAM_SAVE_FLAG_MEM_SIZE: the block list (ram_save_setup).
    fn block_list(&mut self, at: u64, total: u64) -> Result<()> {
        if self.listed {
            corrupt!(self, at, "a second RAM block list");
        }
        if self.postcopy_advised && self.ignore_shared {
            unsupported!(
                self,
                at,
                "a block list written with both postcopy-ram and x-ignore-shared"
            );
        }
        self.listed = true;
        let mut left = total;
        while left > 0 {
            let at = self.r.pos;
            let name = self.r.str8("RAM block name")?;
            let size = self.r.be64("RAM block length")?;
            if size == 0 || size > MAX_BLOCK || !size.is_multiple_of(self.page_size) {
                corrupt!(
                    self,
                    at,
                    "RAM block '{name}' has an impossible length {size}"
                );
            }
            if size > left {
                corrupt!(
                    self,
                    at,
                    "RAM block '{name}' ({size} bytes) is longer than the {left} bytes \
                    the block list's total ({total}) leaves"
                );
            }
            left -= size;
            if self.postcopy_advised {
                // A page size (a power of two >= 4 KiB) follows only for
                // blocks on huge pages; neither the next block's name
                // length (top byte non-zero) nor a record (flags < 4 KiB)
                // looks like one.
                let save = self.r.pos;
                let v = self.r.be64("RAM block page size")?;
                if !(v.is_power_of_two() && v >= 4096 && v >> 56 == 0) {
                    self.r.pos = save;
                }
            }
            if self.ignore_shared {
                self.r.be64("RAM block guest address")?;
            }
            let pages = if self.mapped_ram {
                Pages::Mapped(self.mapped_block(&name, size)?)
            } else {
                Pages::Records(PageMap::default())
            };
            let index = self.blocks.len();
            if self.by_name.insert(name.clone(), index).is_some() {
                corrupt!(self, at, "RAM block '{name}' is listed twice");
            }
            self.blocks.push(Block { name, size, pages });
        }
        Ok(())
    }

    /// A mapped-ram block: header, bitmap, fixed page region. Leaves the
    /// reader after the page region, where the stream goes on.
    fn mapped_block(&mut self, name: &str, size: u64) -> Result<Vec<Run>> {
        let at = self.r.pos;
        let h = self.r.bytes(MAPPED_RAM_HEADER_LEN, "mapped-ram header")?;
        let version = fileio::be_u32(&h, 0);
        let (ps, bitmap_at, pages_at) = (
            fileio::be_u64(&h, 4),
            fileio::be_u64(&h, 12),
            fileio::be_u64(&h, 20),
        );
        if version == 0 || version > MAPPED_RAM_HDR_VERSION {
            unsupported!(
                self,
                at,
                "mapped-ram header version {version} of block '{name}'"
            );
        }
        if ps != self.page_size || !pages_at.is_multiple_of(ps) {
            corrupt!(
                self,
                at,
                "mapped-ram header of block '{name}': page size {ps}, pages at {pages_at}"
            );
        }
        let (pages, len) = (size / ps, self.r.len);
        let bitmap_len = pages.div_ceil(64) * 8;
        if bitmap_at.checked_add(bitmap_len).is_none_or(|e| e > len) {
            corrupt!(
                self,
                at,
                "bitmap of block '{name}' ({bitmap_len} bytes at {bitmap_at}) runs \
                past the end of the file"
            );
        }
        // The stream goes on after the region, so it must lie ahead.
        let ahead = |&e: &u64| e <= len && pages_at >= self.r.pos;
        let Some(region_end) = pages_at.checked_add(size).filter(ahead) else {
            corrupt!(
                self,
                at,
                "the pages of block '{name}' ({size} bytes at {pages_at}) are not \
                between its header and the end of the file"
            );
        };
        // An array of host `unsigned long`s, little-endian on the hosts
        // QEMU runs on (x86, arm, ...): bit i of byte i/8 is page i.
        let mut runs: Vec<Run> = Vec::new();
        let mut chunk = vec![0u8; WINDOW];
        let mut done = 0u64;
        while done < bitmap_len {
            let n = (bitmap_len - done).min(WINDOW as u64) as usize;
            fileio::read_exact_at(
                self.r.file,
                self.path,
                &mut chunk[..n],
                bitmap_at + done,
                "mapped-ram bitmap",
            )?;
            for (i, &byte) in chunk[..n].iter().enumerate() {
                for bit in (0..8).filter(|b| byte & (1 << b) != 0) {
                    let page = (done + i as u64) * 8 + bit;
                    if page >= pages {
                        break;
                    }
                    let (start, file_offset) = (page * ps, pages_at + page * ps);
                    self.s.stats.data_pages += 1;
                    match runs.last_mut() {
                        Some(r) if r.start + r.len == start => r.len += ps,
                        _ => runs.push(Run {
                            start,
                            len: ps,
                            piece: Piece::Data { file_offset },
                        }),
                    }
                }
            }
            done += n as u64;
        }
        self.r.pos = region_end;
        Ok(runs)
    }

    /// A ZERO or PAGE record.
    fn page(&mut self, at: u64, addr: u64, flags: u64) -> Result<()> {
        let b = if flags & RAM_SAVE_FLAG_CONTINUE != 0 {
            let Some(b) = self.last_block else {
                corrupt!(
                    self,
                    at,
                    "a page record continues a block, but no block came before"
                );
            };
            b
        } else {
            let name = self.r.str8("RAM block name")?;
            let Some(&b) = self.by_name.get(&name) else {
                corrupt!(
                    self,
                    at,
                    "page record for RAM block '{name}', which the block list does not name"
                );
            };
            self.last_block = Some(b);
            b
        };
        let (size, name) = (self.blocks[b].size, &self.blocks[b].name);
        if addr >= size {
            corrupt!(
                self,
                at,
                "page offset 0x{addr:x} is past the end of RAM block '{name}' ({size} bytes)"
            );
        }
        let piece = if flags & RAM_SAVE_FLAG_PAGE != 0 {
            let data = self.r.pos;
            self.r.skip(self.page_size, "page data")?;
            self.stats.data_pages += 1;
            Piece::Data { file_offset: data }
        } else {
            let fill = self.r.u8("zero page fill byte")?;
            if fill != 0 {
                corrupt!(
                    self,
                    at,
                    "zero-page record with fill byte 0x{fill:02x} (QEMU only sends 0)"
                );
            }
            self.stats.zero_pages += 1;
            Piece::Zero
        };
        let ps = self.page_size;
        if let Pages::Records(map) = &mut self.s.blocks[b].pages {
            if map.set(addr / ps, piece, ps) {
                self.s.stats.resent += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    fn run(page: u64, pages: u64, piece: Piece) -> Run {
        Run {
            start: page * PS,
            len: pages * PS,
            piece,
        }
    }
    fn data(o: u64) -> Piece {
        Piece::Data { file_offset: o }
    }

    /// The later-copy rule on its own, through every split of a run it can
    /// cause. (tests/memory_sources.rs makes QEMU re-send pages for real.)
    #[test]
    fn a_later_record_replaces_an_earlier_one() {
        let mut m = PageMap::default();
        for p in 0..8 {
            assert!(!m.set(p, Piece::Zero, PS));
        }
        assert!(!m.set(8, data(10_000), PS));
        assert!(!m.set(9, data(10_000 + PS), PS)); // continues: one run
        assert!(m.set(3, data(50_000), PS)); // splits the zero run
        assert!(m.set(9, Piece::Zero, PS)); // the tail of a data run
        assert!(m.set(3, data(60_000), PS)); // a third copy
        assert!(m.set(0, Piece::Zero, PS)); // the same again: no change
        assert!(!m.set(12, Piece::Zero, PS));
        let want = vec![
            run(0, 3, Piece::Zero),
            run(3, 1, data(60_000)),
            run(4, 4, Piece::Zero),
            run(8, 1, data(10_000)),
            run(9, 1, Piece::Zero),
            run(12, 1, Piece::Zero),
        ];
        assert_eq!(m.into_runs(PS, 16 * PS), want);
    }
}
