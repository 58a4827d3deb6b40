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

mod bad_input;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/qemu_vm.rs"]
mod qemu_vm;

use common::skip;
use qemu_vm::{Vm, VmError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use snaptree::chain::Chain;
use snaptree::image::{Mapping, ReadMap};
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
