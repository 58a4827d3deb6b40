//! Bad input derived from the real files the read tests build (cut,
//! patched, fuzzed): refused with the file and the offset, never a panic,
//! never an index that points outside the file.

use super::*;

/// Position of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> usize {
    from + hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:?} not found"))
}

/// Writes `bytes` to `name` in `dir`; indexes it with `index`; expects an
/// error that names the file, the offset `at` (when given) and `says`.
fn expect_refusal(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    index: fn(&Path) -> snaptree::error::Result<MemorySource>,
    at: Option<u64>,
    says: &str,
) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = match index(&path) {
        Ok(src) => panic!(
            "{name}: indexed, but should be refused: {} blocks",
            src.blocks.len()
        ),
        Err(e) => e.to_string(),
    };
    eprintln!("{name}: {err}");
    assert!(
        err.contains(&path.display().to_string()),
        "{name}: names the file: {err}"
    );
    assert!(err.contains("offset"), "{name}: names an offset: {err}");
    if let Some(at) = at {
        assert!(
            err.contains(&format!("offset {at}")),
            "{name}: names offset {at}: {err}"
        );
    }
    assert!(err.contains(says), "{name}: says {says:?}: {err}");
}

#[test]
fn bad_streams_and_cores_are_refused_with_file_and_offset() {
    let dir = TempDir::new().unwrap();
    let size = 16 * MIB;
    let ram = known_ram(size, 4);
    let Some((plain, mapped, core)) = make_sources(dir.path(), &ram) else {
        return;
    };
    let p = std::fs::read(&plain).unwrap();
    let d = dir.path();
    let mig = migstream::index as fn(&Path) -> _;

    // Landmarks found by bytes, not by the parser under test: the block
    // list's entry for "mem", and the first page record (page 0 of "mem",
    // a data page) right after the PART section header that carries it.
    let entry = find(&p, b"\x03mem", 0);
    let mut rec0 = vec![0u8; 7];
    rec0.extend_from_slice(&[0x08, 3, b'm', b'e', b'm']);
    let first = find(&p, &rec0, entry + 4);
    let part = first - 5;
    assert_eq!(
        p[part], 0x02,
        "a PART section header precedes the first page"
    );

    expect_refusal(
        d,
        "cut-page.mig",
        &p[..first + 12 + 100],
        mig,
        Some(first as u64 + 12),
        "truncated",
    );
    expect_refusal(
        d,
        "cut-list.mig",
        &p[..entry + 6],
        mig,
        Some(entry as u64 + 4),
        "truncated",
    );
    expect_refusal(
        d,
        "cut-section.mig",
        &p[..part],
        mig,
        Some(part as u64),
        "truncated",
    );

    let mut b = p.clone();
    b[part + 4] ^= 0x40;
    expect_refusal(
        d,
        "section-id.mig",
        &b,
        mig,
        Some(part as u64),
        "section id",
    );
    let mut b = p.clone();
    b[part] = 0x09;
    expect_refusal(
        d,
        "section-type.mig",
        &b,
        mig,
        Some(part as u64),
        "unknown section type 0x09",
    );

    let mut b = p.clone();
    b[first..first + 8].copy_from_slice(&(size | 0x08).to_be_bytes());
    expect_refusal(
        d,
        "past-block.mig",
        &b,
        mig,
        Some(first as u64),
        "past the end of RAM block 'mem'",
    );
    let mut b = p.clone();
    b[first + 6] = 0x08;
    expect_refusal(
        d,
        "unknown-flag.mig",
        &b,
        mig,
        Some(first as u64),
        "unknown flag 0x800",
    );
    let mut b = p.clone();
    b[first + 7] = 0x48;
    expect_refusal(d, "xbzrle.mig", &b, mig, Some(first as u64), "XBZRLE");
    // Page 10 is the first zero page: a CONTINUE|ZERO record and its fill
    // byte.
    let zero10 = find(&p, &((10 * PAGE) | 0x22).to_be_bytes(), first);
    let mut b = p.clone();
    b[zero10 + 8] = 0x5a;
    expect_refusal(
        d,
        "zero-fill.mig",
        &b,
        mig,
        Some(zero10 as u64),
        "fill byte 0x5a",
    );
    let mut b = p.clone();
    b[7] = 2;
    expect_refusal(d, "version2.mig", &b, mig, Some(4), "version 2");

    // mapped-ram: a file cut inside the page region of "mem".
    let m = std::fs::read(&mapped).unwrap();
    let header = find(&m, b"\x03mem", 0) as u64 + 12;
    let cut = &m[..m.len() / 2];
    expect_refusal(
        d,
        "cut-mapped.mig",
        cut,
        mig,
        Some(header),
        "end of the file",
    );

    // libvirt: compressed and incomplete images are refused.
    let img = d.join("gz.img");
    libvirt_image(&plain, &img, 1, *b"LibvirtQemudSave");
    expect_refusal(
        d,
        "gz.img",
        &std::fs::read(&img).unwrap(),
        mig,
        Some(28),
        "gzip",
    );
    libvirt_image(&plain, &img, 0, *b"LibvirtQemudPart");
    expect_refusal(
        d,
        "part.img",
        &std::fs::read(&img).unwrap(),
        mig,
        Some(0),
        "incomplete",
    );

    // ELF: overlapping segments, a segment past the end of the file.
    let e = std::fs::read(&core).unwrap();
    let phoff = u64::from_le_bytes(e[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(e[56..58].try_into().unwrap()) as usize;
    let loads: Vec<usize> = (0..phnum).filter(|i| e[phoff + 56 * i] == 1).collect();
    assert!(
        loads.len() >= 3,
        "dump-guest-memory writes a PT_LOAD per RAM range"
    );
    let field = |b: &[u8], i: usize, at: usize| {
        u64::from_le_bytes(
            b[phoff + 56 * i + at..phoff + 56 * i + at + 8]
                .try_into()
                .unwrap(),
        )
    };
    let (a, c) = (loads[0], loads[1]);
    let mut b = e.clone();
    let into_a = field(&e, a, 24) + PAGE;
    b[phoff + 56 * c + 24..phoff + 56 * c + 32].copy_from_slice(&into_a.to_le_bytes());
    let elf_index = elf::index as fn(&Path) -> _;
    let header_c = (phoff + 56 * c) as u64;
    expect_refusal(
        d,
        "overlap.elf",
        &b,
        elf_index,
        Some(header_c),
        "overlaps segment",
    );
    let last = *loads.last().unwrap();
    let end_of_last = field(&e, last, 8) + field(&e, last, 32);
    expect_refusal(
        d,
        "cut.elf",
        &e[..end_of_last as usize - 1],
        elf_index,
        Some((phoff + 56 * last) as u64),
        "past the end of the file",
    );
    let mut b = e.clone();
    b[16] = 2; // ET_EXEC
    expect_refusal(d, "exec.elf", &b, elf_index, Some(16), "not a core dump");

    // Dumps in formats that are not raw RAM are refused, not shown as such.
    let any = detect::index_any as fn(&Path) -> _;
    let mut kdump = b"KDUMP   ".to_vec();
    kdump.resize(8192, 0);
    expect_refusal(d, "dump.kdump", &kdump, any, Some(0), "kdump-compressed");
}

/// A configuration record as QEMU writes one (machine type `machine`),
/// with a target-page-bits subsection saying `bits`.
fn configuration(machine: &[u8], bits: u32) -> Vec<u8> {
    let sub = b"configuration/target-page-bits";
    let mut out = vec![0x07];
    out.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    out.extend_from_slice(machine);
    out.push(0x05);
    out.push(sub.len() as u8);
    out.extend_from_slice(sub);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&bits.to_be_bytes());
    out
}

/// `v` as 8 big-endian bytes at `at` of `b`.
fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// `v` as 8 little-endian bytes at `at` of `b`.
fn put_le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Headers whose sizes and offsets point outside the file (or into what
/// the parser has already built) are refused where they are written.
#[test]
fn sizes_and_offsets_from_the_file_are_checked() {
    let dir = TempDir::new().unwrap();
    let ram = known_ram(16 * MIB, 6);
    let Some((plain, mapped, core)) = make_sources(dir.path(), &ram) else {
        return;
    };
    let d = dir.path();
    let mig = migstream::index as fn(&Path) -> _;
    let elf_index = elf::index as fn(&Path) -> _;
    let p = std::fs::read(&plain).unwrap();
    let entry = find(&p, b"\x03mem", 0);
    let mut rec0 = vec![0u8; 7];
    rec0.extend_from_slice(&[0x08, 3, b'm', b'e', b'm']);
    let first = find(&p, &rec0, entry + 4);
    let machine_len = u32::from_be_bytes(p[9..13].try_into().unwrap()) as usize;
    let machine = &p[13..13 + machine_len];
    assert_eq!(p[8], 0x07, "the configuration follows the header");

    // A configuration after the first RAM part (then an empty END part):
    // its 1 MiB pages would put every 4 KiB page indexed so far 256 times
    // further into its block (this used to panic building the runs).
    let footer_part = find(&p, b"\x7e\x00\x00\x00\x01", first) + 5;
    let mut b = p[..footer_part].to_vec();
    b.extend_from_slice(&configuration(machine, 20));
    b.extend_from_slice(&[0x03, 0, 0, 0, 1]);
    b.extend_from_slice(&0x10u64.to_be_bytes());
    b.extend_from_slice(&[0x7e, 0, 0, 0, 1]);
    expect_refusal(
        d,
        "reconfigured.mig",
        &b,
        mig,
        Some(footer_part as u64),
        "configuration",
    );
    // A second configuration before anything else is refused too: QEMU
    // writes exactly one, right after the header.
    let mut b = p[..8 + 5 + machine_len].to_vec();
    let again = b.len();
    b.extend_from_slice(&configuration(machine, 12));
    b.extend_from_slice(&p[again..]);
    expect_refusal(
        d,
        "two-configurations.mig",
        &b,
        mig,
        Some(again as u64),
        "writes only one",
    );

    // Block lengths: 2^60 bytes (no per-page work may follow from it), not
    // a page multiple, longer than the list's total.
    for (name, len, says) in [
        ("huge-block.mig", 1u64 << 60, "impossible length"),
        ("odd-block.mig", 16 * MIB + 1, "impossible length"),
        ("long-block.mig", 1 << 30, "longer than"),
    ] {
        let mut b = p.clone();
        put_be64(&mut b, entry + 4, len);
        expect_refusal(d, name, &b, mig, Some(entry as u64), says);
    }
    // A block list inside a page record's place, a page of a block the
    // list never named, a refused command.
    let mut b = p.clone();
    put_be64(&mut b, first, 0x04);
    expect_refusal(
        d,
        "second-list.mig",
        &b,
        mig,
        Some(first as u64),
        "second RAM block list",
    );
    let mut b = p.clone();
    b[first + 11] = b'M';
    expect_refusal(
        d,
        "unnamed-block.mig",
        &b,
        mig,
        Some(first as u64),
        "does not name",
    );
    let cmd = find(&p, b"\x7e\x00\x00\x00\x01\x08", first) + 5;
    let mut b = p.clone();
    b[cmd + 1..cmd + 3].copy_from_slice(&4u16.to_be_bytes());
    expect_refusal(d, "postcopy.mig", &b, mig, Some(cmd as u64), "postcopy");

    // libvirt: a header cut short, an XML length past the end of the file,
    // an unknown magic.
    let image = d.join("saved.img");
    libvirt_image(&plain, &image, 0, *b"LibvirtQemudSave");
    let img = std::fs::read(&image).unwrap();
    expect_refusal(d, "cut.img", &img[..60], mig, Some(0), "truncated");
    let mut b = img.clone();
    b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_refusal(d, "xml-len.img", &b, mig, Some(20), "past the end");
    let mut b = img.clone();
    b[12..16].copy_from_slice(b"Oops");
    expect_refusal(d, "magic.img", &b, mig, Some(0), "unknown libvirt");

    // mapped-ram: the header of "mem" with its bitmap or its pages past
    // the end of the file, or a page size that is not the stream's.
    let m = std::fs::read(&mapped).unwrap();
    let header = find(&m, b"\x03mem", 0) + 12;
    let (bitmap_at, pages_at) = (header + 12, header + 20);
    let past = (m.len() as u64).next_multiple_of(PAGE);
    for (name, at, v, says) in [
        ("bitmap-past.mig", bitmap_at, past, "bitmap of block 'mem'"),
        (
            "bitmap-wrap.mig",
            bitmap_at,
            u64::MAX - 8,
            "bitmap of block 'mem'",
        ),
        ("pages-past.mig", pages_at, past, "pages of block 'mem'"),
        (
            "pages-wrap.mig",
            pages_at,
            !(PAGE - 1),
            "pages of block 'mem'",
        ),
        ("pages-behind.mig", pages_at, 0, "pages of block 'mem'"),
        ("page-size.mig", header + 4, 8192, "page size 8192"),
    ] {
        let mut b = m.clone();
        put_be64(&mut b, at, v);
        expect_refusal(d, name, &b, mig, Some(header as u64), says);
    }

    // ELF: a segment with more file bytes than memory bytes, physical
    // ranges that overflow or end where no file size reaches, program
    // headers (or, with PN_XNUM, section header 0) past the end of the
    // file.
    let e = std::fs::read(&core).unwrap();
    let phoff = u64::from_le_bytes(e[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(e[56..58].try_into().unwrap()) as usize;
    let last = (0..phnum).rfind(|i| e[phoff + 56 * i] == 1).unwrap();
    let ph = phoff + 56 * last;
    let filesz = u64::from_le_bytes(e[ph + 32..ph + 40].try_into().unwrap());
    for (name, at, v, says) in [
        ("memsz.elf", 40, filesz - 1, "larger than p_memsz"),
        ("paddr-wrap.elf", 24, u64::MAX - PAGE, "overflows"),
        ("paddr-high.elf", 24, 1 << 63, "larger than a file"),
    ] {
        let mut b = e.clone();
        put_le64(&mut b, ph + at, v);
        expect_refusal(d, name, &b, elf_index, Some(ph as u64), says);
    }
    let mut b = e.clone();
    put_le64(&mut b, 32, e.len() as u64);
    expect_refusal(d, "phoff.elf", &b, elf_index, Some(32), "program headers");
    let mut b = e.clone();
    b[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
    put_le64(&mut b, 40, u64::MAX - 10);
    expect_refusal(d, "shoff.elf", &b, elf_index, Some(40), "section header 0");
}

/// The header areas of one real file for [`fuzz`]: where the parser reads
/// sizes, offsets and flags, as `(start, len)` byte ranges.
struct Target<'a> {
    name: &'a str,
    bytes: &'a [u8],
    areas: Vec<(usize, usize)>,
    index: fn(&Path) -> snaptree::error::Result<MemorySource>,
}

/// Random changes to the header areas of real files: bytes replaced or
/// bit-flipped, the file cut short (in a header area or anywhere). Each
/// try either fails with an error naming the file or gives a source whose
/// runs are sorted, disjoint, inside their block and, for data, inside the
/// file; placing and mapping it works. A panic fails the test; a loop that
/// never ends would hang it (each try is one index of a 16 MiB file).
fn fuzz(dir: &Path, t: &Target, tries: usize, rng: &mut SmallRng) {
    let path = dir.join(t.name);
    std::fs::write(&path, t.bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let (mut refused, mut indexed) = (0, 0);
    for _ in 0..tries {
        let mut changed = Vec::new();
        let mode = rng.gen_range(0..10);
        if mode < 8 {
            for _ in 0..rng.gen_range(1..5) {
                let (start, len) = t.areas[rng.gen_range(0..t.areas.len())];
                let at = (start + rng.gen_range(0..len)).min(t.bytes.len() - 1);
                let v = match rng.gen_range(0..4) {
                    0 => t.bytes[at] ^ (1 << rng.gen_range(0..8)),
                    1 => 0,
                    2 => 0xff,
                    _ => rng.gen(),
                };
                f.write_all_at(&[v], at as u64).unwrap();
                changed.push(at);
            }
        }
        let cut = (mode >= 6).then(|| {
            if rng.gen_bool(0.5) {
                let (start, len) = t.areas[rng.gen_range(0..t.areas.len())];
                (start + rng.gen_range(0..len)).min(t.bytes.len())
            } else {
                rng.gen_range(0..t.bytes.len())
            }
        });
        if let Some(cut) = cut {
            f.set_len(cut as u64).unwrap();
        }
        let file_len = std::fs::metadata(&path).unwrap().len();
        match (t.index)(&path) {
            Err(err) => {
                let err = err.to_string();
                assert!(err.contains(&path.display().to_string()), "{err}");
                assert!(file_len == 0 || err.contains("offset"), "{err}");
                refused += 1;
            }
            Ok(src) => {
                check_source(&src, file_len);
                indexed += 1;
            }
        }
        if let Some(cut) = cut {
            f.write_all_at(&t.bytes[cut..], cut as u64).unwrap();
        }
        for at in changed {
            f.write_all_at(&t.bytes[at..at + 1], at as u64).unwrap();
        }
    }
    common::note(format_args!(
        "fuzzed {}: {refused} refused, {indexed} indexed",
        t.name
    ));
}

/// The invariants every indexed source keeps, whatever the file said.
fn check_source(src: &MemorySource, file_len: u64) {
    let sorted = |what: &str, size: u64, runs: &[snaptree::memory::Run]| {
        let mut end = 0;
        for r in runs {
            assert!(r.len > 0 && r.start >= end, "{what}: {r:?} after {end}");
            end = r.start.checked_add(r.len).expect("run end overflows");
            assert!(end <= size, "{what}: {r:?} past its size {size}");
            if let Piece::Data { file_offset } = r.piece {
                let stop = file_offset.checked_add(r.len);
                assert!(
                    stop.is_some_and(|s| s <= file_len),
                    "{what}: {r:?} past the end of the file ({file_len} bytes)"
                );
            }
        }
    };
    for b in &src.blocks {
        sorted(&b.name, b.size, &b.runs);
    }
    if let Ok(placed) = layout::place(src) {
        sorted("placement", placed.size, &placed.runs);
        let layer = MemoryLayer::new(&src.path, &src.kind, placed.size, placed.runs).unwrap();
        let extents = layer.map(0, placed.size).expect("map the whole placement");
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), placed.size);
    }
}

#[test]
fn fuzzed_headers_never_panic_or_break_the_index() {
    let dir = TempDir::new().unwrap();
    let ram = known_ram(16 * MIB, 7);
    let Some((plain, mapped, core)) = make_sources(dir.path(), &ram) else {
        return;
    };
    let (p, m, e) = (
        std::fs::read(&plain).unwrap(),
        std::fs::read(&mapped).unwrap(),
        std::fs::read(&core).unwrap(),
    );
    let image = dir.path().join("saved.img");
    libvirt_image(&plain, &image, 0, *b"LibvirtQemudSave");
    let img = std::fs::read(&image).unwrap();
    let stream_at = img.len() - p.len();

    // Landmarks by bytes: the first page record of "mem", the zero page
    // records of pages 10.., the device state after the RAM section; the
    // mapped-ram headers (version 1, 4 KiB pages); the ELF program headers.
    let mut rec0 = vec![0u8; 7];
    rec0.extend_from_slice(&[0x08, 3, b'm', b'e', b'm']);
    let first = find(&p, &rec0, 0);
    let zero10 = find(&p, &((10 * PAGE) | 0x22).to_be_bytes(), first);
    let end = p
        .windows(6)
        .rposition(|w| w == b"\x7e\x00\x00\x00\x01\x04")
        .expect("device state after the RAM section");
    // Each block's region is followed by the next block's list entry
    // and header.
    let magic = b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x10\x00";
    let be64 = |at: usize| u64::from_be_bytes(m[at..at + 8].try_into().unwrap()) as usize;
    let mut h = find(&m, magic, 0);
    let mut mapped_areas = vec![(0, h + 28)];
    loop {
        mapped_areas.push((h, 28));
        mapped_areas.push((be64(h + 12), 64));
        let next = be64(h + 20) + be64(h - 8);
        let ahead = &m[next.min(m.len())..(next + 300).min(m.len())];
        match ahead.windows(magic.len()).position(|w| w == magic) {
            Some(i) => h = next + i,
            None => break,
        }
    }
    let phoff = u64::from_le_bytes(e[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(e[56..58].try_into().unwrap()) as usize;
    let mig = migstream::index as fn(&Path) -> _;
    let targets = [
        Target {
            name: "plain.fuzz",
            bytes: &p,
            areas: vec![(0, first + 12), (zero10, 9 * 8), (end - 32, 48)],
            index: mig,
        },
        Target {
            name: "libvirt.fuzz",
            bytes: &img,
            areas: vec![(0, 92), (stream_at, 64)],
            index: detect::index_any,
        },
        Target {
            name: "mapped.fuzz",
            bytes: &m,
            areas: mapped_areas,
            index: mig,
        },
        Target {
            name: "core.fuzz",
            bytes: &e,
            areas: vec![(0, 64), (phoff, 56 * phnum)],
            index: elf::index,
        },
    ];
    // SNAPTREE_FUZZ_TRIES and SNAPTREE_FUZZ_SEED run it longer or
    // differently by hand.
    let env = |name, default| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let tries = env("SNAPTREE_FUZZ_TRIES", 300);
    let mut rng = SmallRng::seed_from_u64(env("SNAPTREE_FUZZ_SEED", 8) as u64);
    for t in &targets {
        fuzz(dir.path(), t, tries, &mut rng);
    }
}
