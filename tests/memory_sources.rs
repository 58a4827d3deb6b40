//! Memory sources made by the real peer: a paused QEMU VM whose RAM is a
//! file of known content saves it as a migration stream (plain and
//! mapped-ram), as a `dump-guest-memory` ELF core, and the RAM file itself
//! is a raw dump. Each is indexed, placed at guest-physical addresses and
//! read back through a chain; every RAM byte must be what the file held.
//!
//! Bad input is derived from those real files (cut, patched), never
//! written from scratch: the parsers must refuse it with an error that
//! names the file and the offset, and never panic.
//!
//! Without `qemu-system-x86_64` (or when it cannot start here) the tests
//! print `SKIP: <test>: <why>` and return.

mod common;
#[path = "common/qemu_vm.rs"]
mod qemu_vm;

use common::skip;
use qemu_vm::{Vm, VmError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use snaptree::chain::Chain;
use snaptree::image::{Layer, Mapping};
use snaptree::memory::{detect, elf, layout, migstream, raw, MemoryLayer, MemorySource, Piece};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// RAM of `size` bytes: random, with whole zero pages alone and in runs.
fn known_ram(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut ram = vec![0u8; size as usize];
    rng.fill(&mut ram[..]);
    let pages = size / PAGE;
    let mut zero = |p: u64, n: u64| {
        ram[(p * PAGE) as usize..((p + n) * PAGE) as usize].fill(0);
    };
    zero(10, 5);
    zero(100, 1);
    zero(2000, 300);
    zero(pages / 2, 64);
    zero(pages - 1, 1);
    ram
}

/// Writes the RAM file and starts a VM on it, or prints why not.
fn vm(dir: &Path, ram: &[u8], qtest: bool) -> Option<Vm> {
    let path = dir.join("ram.bin");
    std::fs::write(&path, ram).expect("write RAM file");
    match Vm::start(dir, &path, ram.len() as u64, qtest) {
        Ok(vm) => Some(vm),
        Err(VmError::Missing(why)) | Err(VmError::NoStart(why)) => {
            skip(why);
            None
        }
    }
}

/// The placed source as a chain, with its placement.
fn chain_of(src: &MemorySource) -> (Chain, layout::Placement) {
    let placed = layout::place(src).expect("place");
    let layer = MemoryLayer::new(&src.path, &src.kind, placed.size, placed.runs.clone())
        .expect("memory layer");
    (Chain::from_layers(vec![Arc::new(layer)]), placed)
}

/// `len` bytes at `offset` of the chain.
fn read(chain: &Chain, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    chain
        .read_at(&mut buf, offset)
        .expect("read through the chain");
    buf
}

/// Every byte of `[from, to)` of the chain equals `want[from..to]`.
fn assert_reads(what: &str, chain: &Chain, want: &[u8], from: u64, to: u64) {
    let mut at = from;
    while at < to {
        let n = (to - at).min(MIB);
        let got = read(chain, at, n);
        if got[..] != want[at as usize..(at + n) as usize] {
            let i = (0..n as usize)
                .find(|&i| got[i] != want[at as usize + i])
                .unwrap_or(0);
            panic!("{what}: byte 0x{:x} differs", at + i as u64);
        }
        at += n;
    }
}

/// For each page of `[0, size)`: does the layer map it as `Zero`?
fn zero_pages_of(src: &MemorySource, size: u64) -> Vec<bool> {
    let placed = layout::place(src).expect("place");
    let layer = MemoryLayer::new(&src.path, &src.kind, placed.size, placed.runs).expect("layer");
    let mut zero = vec![false; (size / PAGE) as usize];
    for e in layer.map(0, size).expect("map") {
        assert_eq!(e.start % PAGE, 0, "extents on page boundaries: {e:?}");
        for p in e.start / PAGE..e.end().div_ceil(PAGE) {
            zero[p as usize] = matches!(e.mapping, Mapping::Zero);
        }
    }
    zero
}

fn ram_zero_pages(ram: &[u8]) -> Vec<bool> {
    ram.chunks(PAGE as usize)
        .map(|p| p.iter().all(|&b| b == 0))
        .collect()
}

/// Bytes of RAM block `name` of `src`.
fn block_bytes(src: &MemorySource, name: &str) -> Vec<u8> {
    let b = src
        .blocks
        .iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("no block {name} in {src:?}"));
    let layer = MemoryLayer::new(&src.path, &src.kind, b.size, b.runs.clone()).expect("layer");
    let chain = Chain::from_layers(vec![Arc::new(layer)]);
    read(&chain, 0, b.size)
}

#[test]
fn streams_cores_and_raw_dumps_read_back_exactly() {
    let dir = TempDir::new().unwrap();
    let size = 64 * MIB;
    let ram = known_ram(size, 1);
    let Some((plain, mapped, core)) = make_sources(dir.path(), &ram) else {
        return;
    };
    let zero = ram_zero_pages(&ram);
    let n_zero = zero.iter().filter(|z| **z).count() as u64;

    // The plain stream: every page once, zero pages as zero records.
    let (src, stats) = migstream::index_with_stats(&plain).expect("index plain stream");
    assert_eq!(src.kind, "qemu migration stream");
    assert!(
        src.machine
            .as_deref()
            .is_some_and(|m| m.starts_with("pc-i440fx")),
        "{:?}",
        src.machine
    );
    assert!(stats.zero_pages >= n_zero, "{stats:?}");
    assert_eq!(stats.resent, 0, "{stats:?}");
    let (chain, placed) = chain_of(&src);
    assert_eq!(placed.ram_block.as_deref(), Some("mem"));
    assert_eq!(placed.size, size, "64 MiB all below 4 GiB");
    assert_reads("plain stream", &chain, &ram, 0, size);
    assert_eq!(
        zero_pages_of(&src, size),
        zero,
        "plain stream: zero pages map as Zero, others as Data"
    );
    let names: Vec<&str> = src.blocks.iter().map(|b| b.name.as_str()).collect();
    assert!(
        names.contains(&"pc.bios") && names.contains(&"pc.rom"),
        "{names:?}"
    );
    let (bios, rom) = (block_bytes(&src, "pc.bios"), block_bytes(&src, "pc.rom"));

    // mapped-ram: fixed offsets and a bitmap; zero pages are never written.
    let src = migstream::index(&mapped).expect("index mapped-ram stream");
    assert_eq!(src.kind, "qemu migration stream (mapped-ram)");
    let (chain, placed) = chain_of(&src);
    assert_eq!(placed.size, size);
    assert_reads("mapped-ram stream", &chain, &ram, 0, size);
    assert_eq!(
        zero_pages_of(&src, size),
        zero,
        "mapped-ram: zero pages are holes"
    );
    assert!(
        src.blocks[0].runs.len() < 64,
        "contiguous pages merge into few runs"
    );
    assert_eq!(block_bytes(&src, "pc.bios"), bios);
    assert_eq!(block_bytes(&src, "pc.rom"), rom);

    // The ELF core: guest-physical. 0xc0000..0x100000 shows the ROMs
    // (pc.rom, then the BIOS's last 128 KiB) the machine maps over RAM
    // there at reset, and the BIOS again below 4 GiB.
    let src = elf::index(&core).expect("index ELF core");
    assert_eq!(src.kind, "elf core");
    assert!(src.physical);
    let (chain, placed) = chain_of(&src);
    assert_eq!(placed.size, 4 << 30, "ends with the BIOS below 4 GiB");
    assert_reads("ELF core below the ROMs", &chain, &ram, 0, 0xc0000);
    assert_eq!(
        read(&chain, 0xc0000, 0x20000),
        rom,
        "ELF core: option ROM area"
    );
    assert_eq!(
        read(&chain, 0xe0000, 0x20000),
        bios[0x20000..],
        "ELF core: BIOS shadow"
    );
    assert_reads("ELF core above 1 MiB", &chain, &ram, 0x100000, size);
    assert_eq!(
        read(&chain, 0xfffc0000, 0x40000),
        bios,
        "ELF core: BIOS at 4 GiB - 256 KiB"
    );
    let layer = MemoryLayer::new(&src.path, &src.kind, placed.size, placed.runs).unwrap();
    let hole = layer
        .map(size, 0xfffc0000 - size)
        .expect("map the PCI hole");
    assert!(
        hole.iter().all(|e| e.mapping == Mapping::Zero),
        "no memory between RAM and the BIOS: {hole:?}"
    );

    // The RAM file itself, as a raw dump.
    let src = raw::index(&vm_ram(dir.path())).expect("index raw dump");
    assert_eq!(src.kind, "raw dump");
    let (chain, _) = chain_of(&src);
    assert_reads("raw dump", &chain, &ram, 0, size);
    // A sparse copy: zero pages are holes in the file, and zero runs in
    // the index where the filesystem reports holes.
    let sparse = dir.path().join("sparse.vmem");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(size).unwrap();
    for (p, page) in ram.chunks(PAGE as usize).enumerate() {
        if !zero[p] {
            f.write_all_at(page, p as u64 * PAGE).unwrap();
        }
    }
    drop(f);
    let src = raw::index(&sparse).expect("index sparse raw dump");
    let (chain, _) = chain_of(&src);
    assert_reads("sparse raw dump", &chain, &ram, 0, size);
    if src.blocks[0].runs.iter().any(|r| r.piece == Piece::Zero) {
        assert_eq!(
            zero_pages_of(&src, size),
            zero,
            "holes of a sparse dump are zero runs"
        );
    } else {
        common::note("note: this filesystem reports no holes; sparse dump read as data");
    }

    // Detection by magic picks the same parsers.
    for (f, kind) in [
        (&plain, "qemu migration stream"),
        (&mapped, "qemu migration stream (mapped-ram)"),
        (&core, "elf core"),
        (&vm_ram(dir.path()), "raw dump"),
    ] {
        assert_eq!(
            detect::index_any(f).expect("detect").kind,
            kind,
            "{}",
            f.display()
        );
    }

    // A libvirt save image: header, XML, then the same stream.
    let image = dir.path().join("saved.img");
    libvirt_image(&plain, &image, 0, *b"LibvirtQemudSave");
    let src = detect::index_any(&image).expect("index libvirt save image");
    assert_eq!(src.kind, "libvirt save image");
    let (chain, _) = chain_of(&src);
    assert_reads("libvirt save image", &chain, &ram, 0, size);
}

/// A plain stream, a mapped-ram stream and an ELF core of `ram`, from
/// two VMs on the same RAM file (QEMU migrates a VM only once: after that
/// it is in "postmigrate" and would have to run guest code to leave it).
fn make_sources(dir: &Path, ram: &[u8]) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let (plain, mapped, core) = (
        dir.join("plain.mig"),
        dir.join("mapped.mig"),
        dir.join("dump.elf"),
    );
    let mut first = vm(dir, ram, false)?;
    first.migrate_to_file(&plain);
    first.dump_guest_memory(&core);
    first.quit();
    let mut second = vm(dir, ram, false)?;
    second.set_capability("mapped-ram", true);
    second.migrate_to_file(&mapped);
    second.quit();
    Some((plain, mapped, core))
}

fn vm_ram(dir: &Path) -> PathBuf {
    dir.join("ram.bin")
}

/// `stream` behind a libvirt save header (version 2, `format`) and XML,
/// as qemu_saveimage.c writes it: header, XML + NUL, 64 KiB of padding.
fn libvirt_image(stream: &Path, to: &Path, format: u32, magic: [u8; 16]) {
    let xml = b"<domain type='kvm'><name>t</name></domain>\0";
    let data_len = xml.len() as u32 + 65536;
    let mut out = magic.to_vec();
    for v in [2u32, data_len, 0, format, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.resize(92, 0);
    out.extend_from_slice(xml);
    out.resize(92 + data_len as usize, 0);
    out.extend_from_slice(&std::fs::read(stream).unwrap());
    std::fs::write(to, out).unwrap();
}

#[test]
fn a_page_sent_twice_keeps_the_later_copy() {
    let dir = TempDir::new().unwrap();
    let size = 64 * MIB;
    let mut ram = known_ram(size, 2);
    let Some(mut vm) = vm(dir.path(), &ram, true) else {
        return;
    };
    let mig = dir.path().join("twice.mig");
    // Slow enough that the first pass is still running when the guest
    // "writes": pages written after they were sent are dirty and go again.
    vm.must(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 4 * MIB }),
    );
    vm.start_migration(&mig);
    let t0 = std::time::Instant::now();
    loop {
        let r = vm.must("query-migrate", json!({}));
        if r["ram"]["transferred"].as_u64().unwrap_or(0) > MIB {
            break;
        }
        assert!(t0.elapsed().as_secs() < 30, "migration does not move: {r}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Pages 2..5 and 11 (zero) were sent in the first MiB of the stream.
    let mut rng = SmallRng::seed_from_u64(3);
    let mut changed = Vec::new();
    for page in [2u64, 3, 4, 11] {
        let mut data = vec![0u8; PAGE as usize];
        rng.fill(&mut data[..]);
        vm.write_guest(page * PAGE, &data);
        ram[(page * PAGE) as usize..((page + 1) * PAGE) as usize].copy_from_slice(&data);
        changed.push(page);
    }
    vm.write_guest(5 * PAGE, &[0u8; PAGE as usize]);
    ram[(5 * PAGE) as usize..(6 * PAGE) as usize].fill(0);
    vm.must(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1u64 << 40 }),
    );
    let end = vm.wait_migration();
    vm.quit();
    assert_eq!(
        std::fs::read(vm_ram(dir.path())).unwrap(),
        ram,
        "the guest's writes reached its RAM file"
    );

    let (src, stats) = migstream::index_with_stats(&mig).expect("index");
    common::note(format_args!("pages sent twice: {stats:?}"));
    assert!(
        stats.resent >= 5,
        "QEMU sent the written pages again: {stats:?}, {end}"
    );
    let (chain, _) = chain_of(&src);
    assert_reads("stream with pages sent twice", &chain, &ram, 0, size);
    let zero = zero_pages_of(&src, size);
    assert!(zero[5], "page 5 was data, then zero: the zero record wins");
    assert!(!zero[11], "page 11 was zero, then data: the data wins");
}

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
