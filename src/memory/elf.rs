//! ELF core files of guest memory, as QEMU's `dump-guest-memory` (and
//! `virsh dump --memory-only`) write them (QEMU's dump/dump.c): a
//! PT_NOTE with CPU state, then one PT_LOAD per guest RAM range, placed
//! by its physical address (`p_paddr`). Bytes past a segment's `p_filesz`
//! up to its `p_memsz` are zero (dump.c writes them out, a filtered dump
//! may not).
//!
//! The source is already laid out by guest-physical address, so it is one
//! block, "physical", from 0 to the end of the highest segment; what no
//! segment covers (the PCI hole, MMIO) is a hole. QEMU writes ELF64 unless
//! every range ends below 4 GiB on a 32-bit guest (then ELF32); both are
//! read, in either byte order (s390x and ppc64 dumps are big-endian).
//!
//! Every offset, count and size in the headers is checked against the
//! file (and against overflow) before it is used, and reported at the
//! offset of the header field that holds it. Overlapping segments (a
//! paging dump, a process core) are refused rather than guessed at.

use super::{MemorySource, Piece, RamBlock, Run};
use crate::error::{ImageError, Result};
use crate::fileio;
use std::fs::File;
use std::path::Path;

const ET_CORE: u16 = 4;
const PT_LOAD: u32 = 1;
/// `e_phnum` value meaning "the count is in section header 0's sh_info".
const PN_XNUM: u16 = 0xffff;
/// Program headers are read in batches of this many bytes.
const BATCH: usize = 64 << 10;
/// The highest physical end accepted: the source is shown as a file of
/// that size, and file sizes are `off_t` (no guest has RAM near it;
/// x86 and arm64 addresses stop at 2^52).
const MAX_PHYS_END: u64 = i64::MAX as u64;

/// Field readers for one ELF class and byte order.
#[derive(Clone, Copy)]
struct Form {
    wide: bool,
    big: bool,
}

impl Form {
    fn u16(self, b: &[u8], at: usize) -> u16 {
        let v = [b[at], b[at + 1]];
        if self.big {
            u16::from_be_bytes(v)
        } else {
            u16::from_le_bytes(v)
        }
    }
    fn u32(self, b: &[u8], at: usize) -> u32 {
        let v = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if self.big {
            u32::from_be_bytes(v)
        } else {
            u32::from_le_bytes(v)
        }
    }
    fn u64(self, b: &[u8], at: usize) -> u64 {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        if self.big {
            u64::from_be_bytes(v)
        } else {
            u64::from_le_bytes(v)
        }
    }
    /// An address-sized field: ELF32 offsets `at32`, ELF64 `at64`.
    fn word(self, b: &[u8], at32: usize, at64: usize) -> u64 {
        if self.wide {
            self.u64(b, at64)
        } else {
            u64::from(self.u32(b, at32))
        }
    }
}

/// One PT_LOAD segment.
struct Segment {
    index: u64,
    header_at: u64,
    paddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
}

/// Indexes the ELF core at `path`.
pub fn index(path: &Path) -> Result<MemorySource> {
    let file = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
    let len = fileio::file_len(&file, path)?;
    let mut ident = [0u8; 64];
    let head_len = (len as usize).min(64);
    fileio::read_exact_at(&file, path, &mut ident[..head_len], 0, "ELF header")?;
    let f = Form::of(path, &ident, head_len)?;
    let ehsize = if f.wide { 64 } else { 52 };
    if head_len < ehsize {
        return Err(ImageError::corrupt(
            path,
            0,
            "ELF header runs past the end of the file",
        ));
    }
    let table = ProgramTable::read(&file, path, f, &ident[..ehsize], len)?;
    let segments = read_segments(
        &file,
        path,
        f,
        table.phoff,
        table.phnum,
        table.phentsize,
        len,
    )?;
    let (size, runs) = place(path, segments)?;
    Ok(MemorySource {
        path: path.to_path_buf(),
        kind: "elf core".to_string(),
        machine: None,
        physical: true,
        blocks: vec![RamBlock {
            name: "physical".to_string(),
            size,
            runs,
        }],
    })
}

impl Form {
    /// The class and byte order the identification bytes `ident` (the
    /// first `head_len` bytes of the file) declare; refused unless they
    /// start with the ELF magic and name a known class and encoding.
    fn of(path: &Path, ident: &[u8; 64], head_len: usize) -> Result<Form> {
        if head_len < 16 || ident[..4] != *b"\x7fELF" {
            return Err(ImageError::corrupt(
                path,
                0,
                "not an ELF file (no \\x7fELF magic)",
            ));
        }
        let wide = match ident[4] {
            1 => false,
            2 => true,
            c => {
                return Err(ImageError::corrupt(
                    path,
                    4,
                    format!("unknown ELF class {c}"),
                ))
            }
        };
        let big = match ident[5] {
            1 => false,
            2 => true,
            d => {
                return Err(ImageError::corrupt(
                    path,
                    5,
                    format!("unknown ELF data encoding {d}"),
                ))
            }
        };
        Ok(Form { wide, big })
    }

    /// Offsets in the ELF header of e_phoff, e_shoff, e_phentsize and
    /// e_shentsize (e_phnum follows e_phentsize), for reading them and for
    /// messages that point at them.
    fn field_offsets(self) -> (usize, usize, usize, usize) {
        if self.wide {
            (32, 40, 54, 58)
        } else {
            (28, 32, 42, 46)
        }
    }
}

/// Where the program header table is and how it is laid out, as the ELF
/// header says, checked against the file.
struct ProgramTable {
    phoff: u64,
    phnum: u64,
    phentsize: u16,
}

impl ProgramTable {
    /// Reads the program table's place from the ELF header `h` of a file
    /// of `len` bytes: refused unless it is a core dump whose entries are
    /// large enough and whose table lies inside the file.
    fn read(file: &File, path: &Path, f: Form, h: &[u8], len: u64) -> Result<ProgramTable> {
        let e_type = f.u16(h, 16);
        if e_type != ET_CORE {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "ELF file of type {e_type} (at offset 16), not a core dump (type 4): \
                     snaptree reads guest memory dumps from dump-guest-memory"
                ),
            ));
        }
        // Offsets of the header fields, for messages that point at them.
        let (phoff_at, _, phentsize_at, _) = f.field_offsets();
        let phoff = f.word(h, 28, 32);
        let (phentsize, phnum16) = (f.u16(h, phentsize_at), f.u16(h, phentsize_at + 2));
        let min_phent = if f.wide { 56 } else { 32 };
        if u64::from(phentsize) < min_phent {
            return Err(ImageError::corrupt(
                path,
                phentsize_at as u64,
                format!("program header size {phentsize} (at least {min_phent} expected)"),
            ));
        }
        let phnum = if phnum16 == PN_XNUM {
            extended_phnum(file, path, f, h, len)?
        } else {
            u64::from(phnum16)
        };
        // At most 2^32 entries of at most 64 KiB: no overflow.
        let table_len = phnum * u64::from(phentsize);
        if phoff.checked_add(table_len).is_none_or(|e| e > len) {
            return Err(ImageError::corrupt(
                path,
                phoff_at as u64,
                format!(
                    "{phnum} program headers ({table_len} bytes at e_phoff {phoff}) run past \
                     the end of the file ({len} bytes)"
                ),
            ));
        }
        Ok(ProgramTable {
            phoff,
            phnum,
            phentsize,
        })
    }
}

/// The program header count of a file with more than 65534 segments
/// (e_phnum is PN_XNUM): section header 0's sh_info, read from the file
/// of `len` bytes after checking that section header 0 lies inside it.
fn extended_phnum(file: &File, path: &Path, f: Form, h: &[u8], len: u64) -> Result<u64> {
    let (_, shoff_at, _, shentsize_at) = f.field_offsets();
    let shoff = f.word(h, 32, 40);
    let shentsize = f.u16(h, shentsize_at);
    // More than 65534 segments: the count is in section 0's sh_info.
    let mut sh = [0u8; 64];
    let n = if f.wide { 64 } else { 40 };
    if u64::from(shentsize) < n as u64 {
        return Err(ImageError::corrupt(
            path,
            shentsize_at as u64,
            format!(
                "section header size {shentsize}: too small to hold the program header \
                 count that e_phnum 0xffff (PN_XNUM) says is there"
            ),
        ));
    }
    if shoff.checked_add(n as u64).is_none_or(|e| e > len) {
        return Err(ImageError::corrupt(
            path,
            shoff_at as u64,
            format!(
                "section header 0 ({n} bytes at e_shoff {shoff}), which holds the program \
                 header count (e_phnum is PN_XNUM), runs past the end of the file \
                 ({len} bytes)"
            ),
        ));
    }
    fileio::read_exact_at(file, path, &mut sh[..n], shoff, "section header 0")?;
    Ok(u64::from(f.u32(&sh, if f.wide { 44 } else { 28 })))
}

/// The PT_LOAD segments, each checked against the file.
fn read_segments(
    file: &File,
    path: &Path,
    f: Form,
    phoff: u64,
    phnum: u64,
    phentsize: u16,
    len: u64,
) -> Result<Vec<Segment>> {
    let ent = usize::from(phentsize);
    let per_batch = (BATCH / ent).max(1) as u64;
    let mut buf = vec![0u8; per_batch as usize * ent];
    let mut out = Vec::new();
    let mut first = 0u64;
    while first < phnum {
        let n = (phnum - first).min(per_batch);
        let bytes = &mut buf[..n as usize * ent];
        let at = phoff + first * ent as u64;
        fileio::read_exact_at(file, path, bytes, at, "program headers")?;
        for i in 0..n as usize {
            let ph = &bytes[i * ent..(i + 1) * ent];
            if f.u32(ph, 0) != PT_LOAD {
                continue;
            }
            let s = Segment {
                index: first + i as u64,
                header_at: at + (i * ent) as u64,
                offset: f.word(ph, 4, 8),
                paddr: f.word(ph, 12, 24),
                filesz: f.word(ph, 16, 32),
                memsz: f.word(ph, 20, 40),
            };
            let what = |why: String| {
                ImageError::corrupt(
                    path,
                    s.header_at,
                    format!(
                        "PT_LOAD segment {} (program header at this offset): {why}",
                        s.index
                    ),
                )
            };
            if s.filesz > s.memsz {
                return Err(what(format!(
                    "p_filesz {} is larger than p_memsz {}",
                    s.filesz, s.memsz
                )));
            }
            if s.offset.checked_add(s.filesz).is_none_or(|e| e > len) {
                return Err(what(format!(
                    "its {} bytes at file offset {} run past the end of the file ({len} bytes)",
                    s.filesz, s.offset
                )));
            }
            match s.paddr.checked_add(s.memsz) {
                None => {
                    return Err(what(format!(
                        "physical range 0x{:x}+0x{:x} overflows",
                        s.paddr, s.memsz
                    )))
                }
                Some(end) if end > MAX_PHYS_END => {
                    return Err(what(format!(
                        "physical range 0x{:x}..0x{end:x} ends past 0x{MAX_PHYS_END:x}: \
                         memory.raw would be larger than a file can be",
                        s.paddr
                    )))
                }
                Some(_) => {}
            }
            if s.memsz > 0 {
                out.push(s);
            }
        }
        first += n;
    }
    Ok(out)
}

/// Sorts segments by physical address, refuses overlaps, and turns them
/// into merged runs. Returns the address space size and the runs.
fn place(path: &Path, mut segs: Vec<Segment>) -> Result<(u64, Vec<Run>)> {
    if segs.is_empty() {
        return Err(ImageError::corrupt(
            path,
            0,
            "the ELF core has no PT_LOAD segment: it holds no memory",
        ));
    }
    segs.sort_by_key(|s| s.paddr);
    let mut runs: Vec<Run> = Vec::with_capacity(segs.len());
    let mut end = 0u64;
    let mut prev: Option<&Segment> = None;
    for s in &segs {
        if let Some(p) = prev {
            if s.paddr < p.paddr + p.memsz {
                return Err(ImageError::corrupt(
                    path,
                    s.header_at,
                    format!(
                        "PT_LOAD segment {} (physical 0x{:x}..0x{:x}) overlaps segment {} \
                         (0x{:x}..0x{:x}); a dump-guest-memory core with paging=false has \
                         no overlaps (is this a paging dump or a process core?)",
                        s.index,
                        s.paddr,
                        s.paddr + s.memsz,
                        p.index,
                        p.paddr,
                        p.paddr + p.memsz
                    ),
                ));
            }
        }
        prev = Some(s);
        if s.filesz > 0 {
            push(
                &mut runs,
                Run {
                    start: s.paddr,
                    len: s.filesz,
                    piece: Piece::Data {
                        file_offset: s.offset,
                    },
                },
            );
        }
        if s.memsz > s.filesz {
            push(
                &mut runs,
                Run {
                    start: s.paddr + s.filesz,
                    len: s.memsz - s.filesz,
                    piece: Piece::Zero,
                },
            );
        }
        end = s.paddr + s.memsz;
    }
    Ok((end, runs))
}

/// Appends `r`, merging it into the last run when it continues it.
fn push(runs: &mut Vec<Run>, r: Run) {
    if let Some(last) = runs.last_mut() {
        let continues = match (last.piece, r.piece) {
            (Piece::Zero, Piece::Zero) => true,
            (Piece::Data { file_offset: a }, Piece::Data { file_offset: b }) => a + last.len == b,
            _ => false,
        };
        if continues && last.start + last.len == r.start {
            last.len += r.len;
            return;
        }
    }
    runs.push(r);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core with a PT_NOTE and PT_LOADs `(paddr, filesz, memsz)`, data
    /// after the headers in order. QEMU writes ELF32 only for 32-bit
    /// guests whose memory all ends below 4 GiB (never a PC: its BIOS
    /// ends at 4 GiB) and big-endian ones only for big-endian guests, so
    /// these two forms are built here rather than by a VM.
    fn core(wide: bool, big: bool, loads: &[(u64, u64, u64)]) -> Vec<u8> {
        let put = |out: &mut Vec<u8>, v: u64, n: usize| {
            let b = v.to_le_bytes();
            let mut b = b[..n].to_vec();
            if big {
                b.reverse();
            }
            out.extend_from_slice(&b);
        };
        let (eh, ph) = if wide { (64, 56) } else { (52, 32) };
        let w = if wide { 8 } else { 4 };
        let mut out = b"\x7fELF".to_vec();
        out.extend_from_slice(&[if wide { 2 } else { 1 }, if big { 2 } else { 1 }, 1]);
        out.resize(16, 0);
        put(&mut out, u64::from(ET_CORE), 2);
        put(&mut out, 3, 2); // e_machine
        put(&mut out, 1, 4); // e_version
        put(&mut out, 0, w); // e_entry
        put(&mut out, eh as u64, w); // e_phoff
        put(&mut out, 0, w); // e_shoff
        put(&mut out, 0, 4); // e_flags
        for v in [eh, ph, 1 + loads.len(), 0, 0, 0] {
            put(&mut out, v as u64, 2);
        }
        assert_eq!(out.len(), eh);
        let mut data_at = (eh + ph * (1 + loads.len())) as u64;
        let phdr = |out: &mut Vec<u8>, ty: u64, off: u64, paddr: u64, fsz: u64, msz: u64| {
            put(out, ty, 4);
            if wide {
                put(out, 0, 4); // p_flags
            }
            for v in [off, paddr, paddr, fsz, msz] {
                put(out, v, w);
            }
            if !wide {
                put(out, 0, 4);
            }
            put(out, 0, w); // p_align
        };
        phdr(&mut out, 4, 0, 0, 0, 0);
        for &(paddr, fsz, msz) in loads {
            phdr(&mut out, 1, data_at, paddr, fsz, msz);
            data_at += fsz;
        }
        for (i, &(_, fsz, _)) in loads.iter().enumerate() {
            out.extend(std::iter::repeat_n(i as u8 + 1, fsz as usize));
        }
        out
    }

    fn runs_of(bytes: &[u8]) -> Result<(u64, Vec<Run>)> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        let src = index(f.path())?;
        assert!(src.physical);
        let b = &src.blocks[0];
        Ok((b.size, b.runs.clone()))
    }

    #[test]
    fn elf32_and_big_endian_cores() {
        let loads = [
            (0x2000, 0x1000, 0x1000),
            (0x3000, 0x800, 0x2000),
            (0, 0x1000, 0x1000),
        ];
        for (wide, big) in [(false, false), (true, true), (false, true)] {
            let bytes = core(wide, big, &loads);
            let data = (if wide { 64 + 56 * 4 } else { 52 + 32 * 4 }) as u64;
            let (size, runs) = runs_of(&bytes).unwrap();
            assert_eq!(size, 0x5000);
            let want = vec![
                Run {
                    start: 0,
                    len: 0x1000,
                    piece: Piece::Data {
                        file_offset: data + 0x1800,
                    },
                },
                // Segments 0 and 1: contiguous in memory and in the file.
                Run {
                    start: 0x2000,
                    len: 0x1800,
                    piece: Piece::Data { file_offset: data },
                },
                Run {
                    start: 0x3800,
                    len: 0x1800,
                    piece: Piece::Zero,
                },
            ];
            assert_eq!(runs, want, "wide {wide} big {big}");
        }
    }

    #[test]
    fn bad_cores_are_refused() {
        let err = runs_of(&core(false, false, &[(0, 0x1000, 0x800)])).unwrap_err();
        assert!(err.to_string().contains("larger than p_memsz"), "{err}");
        let err = runs_of(&core(true, false, &[])).unwrap_err();
        assert!(err.to_string().contains("no PT_LOAD"), "{err}");
        let bytes = core(true, false, &[(0, 0x1000, 0x1000)]);
        let err = runs_of(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.to_string().contains("offset 120"), "{err}");
        let err = runs_of(&bytes[..40]).unwrap_err();
        assert!(err.to_string().contains("ELF header"), "{err}");
    }
}
