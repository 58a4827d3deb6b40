//! VHD (QEMU's `vpc`) read side against real peers.
//!
//! qemu-img and qemu-io make fixed and dynamic VHDs and write to them; the
//! flattened disk `snaptree export` writes must equal `qemu-img convert -f
//! vpc -O raw` byte for byte, and `snaptree info` must agree on the size.
//! qemu-img cannot make differencing VHDs, so those (and dynamic disks with
//! partly set sector bitmaps, and XCP's batmap) are built here by hand from
//! the spec ([`Spec`]); the expected bytes are computed from what was put
//! in, and libvhdi's `vhdiinfo` (when installed) must accept the images.
//! Corrupt copies of valid images must fail with status 1 and a message
//! naming the file, never panic.

#[macro_use]
mod common;

use common::qio::{write, zero};
use common::*;
use serde_json::Value;
use snaptree::chain::{Chain, OpenOptions};
use snaptree::image::vhd::VhdLayer;
use snaptree::image::{probe, Format as ImgFormat, ReadMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Helpers

/// A test's temporary directory; kept (and its path printed) when
/// `SNAPTREE_KEEP_TEST_DIRS=1`, for a post-mortem with qemu-img/vhdiinfo.
struct TestDir(Option<TempDir>);

impl TestDir {
    fn path(&self) -> &Path {
        self.0.as_ref().expect("live").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("SNAPTREE_KEEP_TEST_DIRS").is_some_and(|v| v != "0") {
            if let Some(dir) = self.0.take() {
                note(format_args!(
                    "{}: kept {}",
                    test_name(),
                    dir.keep().display()
                ));
            }
        }
    }
}

fn tempdir() -> TestDir {
    TestDir(Some(
        TempDir::with_prefix("snaptree-vhd-").expect("temp dir"),
    ))
}

/// `qemu-img create -q -f vpc [-o OPTS] NAME SIZE` in `dir`.
fn create_vpc(dir: &Path, name: &str, size: u64, opts: &[&str]) -> PathBuf {
    let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), "vpc".into()];
    if !opts.is_empty() {
        args.push("-o".into());
        args.push(opts.join(","));
    }
    args.push(name.into());
    args.push(size.to_string());
    qemu_img(dir, &args);
    dir.join(name)
}

/// `qemu-io -f vpc -c CMD... NAME` in `dir`.
fn qemu_io(dir: &Path, name: &str, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", "vpc"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(name);
    run(&mut cmd);
}

fn qemu_info(dir: &Path, name: &str) -> Value {
    let out = qemu_img(dir, ["info", "--output=json", "-f", "vpc", name]);
    serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
}

fn qemu_virtual_size(dir: &Path, name: &str) -> u64 {
    qemu_info(dir, name)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// `qemu-img convert -f vpc -O raw NAME NAME.qemu.raw`.
fn qemu_raw(dir: &Path, name: &str) -> PathBuf {
    let out = format!("{name}.qemu.raw");
    qemu_img(dir, ["convert", "-f", "vpc", "-O", "raw", name, &out]);
    dir.join(out)
}

/// `snaptree export IMG IMG.snaptree.raw`.
fn snaptree_raw(img: &Path) -> PathBuf {
    let out = PathBuf::from(format!("{}.snaptree.raw", img.display()));
    snaptree(args!["export", "--quiet", "--force", img, out]);
    out
}

/// `snaptree info --json IMG`.
fn snaptree_info(img: &Path) -> Value {
    let out = snaptree(args!["info", "--json", img]);
    serde_json::from_slice(&out.stdout).expect("snaptree info JSON")
}

/// The export, the map and the size must equal qemu's.
fn assert_matches_qemu(dir: &Path, name: &str) {
    let img = dir.join(name);
    assert_same_file(&qemu_raw(dir, name), &snaptree_raw(&img));
    let size = qemu_virtual_size(dir, name);
    let parse = |out: std::process::Output, who: &str| {
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        let entries = parse_map(&json).unwrap_or_else(|e| panic!("{who} map: {e}\n{json}"));
        extents(&entries, size).unwrap_or_else(|e| panic!("{who} map: {e}\n{json}"))
    };
    let qemu = parse(
        qemu_img(dir, ["map", "--output=json", "-f", "vpc", name]),
        "qemu-img",
    );
    let ours = parse(snaptree(args!["map", "--output", "json", img]), "snaptree");
    let mismatches = diff_extents(&qemu, &ours);
    assert!(
        mismatches.is_empty(),
        "{name}: snaptree map differs from qemu-img map:\n{}",
        format_mismatches(&mismatches)
    );
    let info = snaptree_info(&img);
    assert_eq!(
        info["virtual_size"].as_u64(),
        Some(qemu_virtual_size(dir, name)),
        "{name}: snaptree info {info}"
    );
    assert_eq!(info["chain"][0]["format"], "vpc", "{info}");
}

/// Writes at offsets that matter for `size`: unaligned, across a 2 MiB
/// block boundary, zeros, the last bytes of the disk.
fn writes_for(size: u64) -> Vec<String> {
    let mut w = vec![write(0x11, 0, 512), write(0x22, 1000, 3000)];
    if size > 2 * MIB + 8192 {
        w.push(write(0x33, 2 * MIB - 4096, 8192));
    }
    if size > 5 * MIB {
        w.push(zero(4 * MIB, MIB));
        w.push(write(0x55, 4 * MIB + 512, 100));
    }
    w.push(write(0x44, size - 1000, 1000));
    w
}

fn footer_unique_id(path: &Path) -> [u8; 16] {
    let b = fs::read(path).expect("read image");
    let f = &b[b.len() - 512..];
    f[68..84].try_into().expect("16 bytes")
}

fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn chain_bytes(leaf: &Path) -> Result<Vec<u8>, String> {
    let chain = Chain::open(leaf, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Opens the chain of `leaf`, maps all of it and reads its first and last
/// MiB (a fuzzed size may be huge).
fn sample_chain(leaf: &Path) -> Result<(), String> {
    let chain = Chain::open(leaf, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let size = chain.size();
    chain.map(0, size).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; size.min(MIB) as usize];
    chain.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    let tail = size - buf.len() as u64;
    chain.read_at(&mut buf, tail).map_err(|e| e.to_string())?;
    for layer in chain.layers() {
        layer.info().map_err(|e| e.to_string())?;
        layer.allocated_bytes().map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn assert_bytes(expected: &[u8], got: &[u8], what: &str) {
    if let Some(d) = diff_bytes(expected, got) {
        panic!("{what}:\n{d}");
    }
}

/// Runs `snaptree info` and `snaptree export` on `img`: both must fail with
/// status 1 (no panic, no signal) and name the file and every `needle`.
fn assert_refused(img: &Path, needles: &[&str]) -> String {
    let name = img.file_name().unwrap().to_string_lossy().to_string();
    let mut last = String::new();
    for sub in ["info", "export"] {
        let out_file = PathBuf::from(format!("{}.out", img.display()));
        let mut cmd = if sub == "info" {
            snaptree_cmd(args!["info", img])
        } else {
            snaptree_cmd(args!["export", "--quiet", "--force", img, out_file])
        };
        let out = run_unchecked(&mut cmd);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(
            out.status.code(),
            Some(1),
            "snaptree {sub} must fail cleanly\n{}",
            describe_output(&cmd, &out)
        );
        for n in std::iter::once(name.as_str()).chain(needles.iter().copied()) {
            assert!(
                err.contains(n),
                "snaptree {sub}: stderr lacks {n:?}\n{}",
                describe_output(&cmd, &out)
            );
        }
        last = err;
    }
    last
}

fn tool_runs(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty())
}

// ---------------------------------------------------------------------------
// A VHD built by hand from the spec.

const DYNAMIC: u32 = 3;
const DIFFERENCING: u32 = 4;

/// One allocated block: which sectors its bitmap marks present, and the
/// whole block's data (absent sectors hold garbage that must never show).
struct Block {
    index: u64,
    present: Vec<bool>,
    data: Vec<u8>,
}

/// Parent locators: platform code and data.
type Locators = Vec<([u8; 4], Vec<u8>)>;

struct Spec {
    disk_type: u32,
    size: u64,
    block_size: u32,
    creator: [u8; 4],
    creator_version: u32,
    unique_id: [u8; 16],
    parent_id: [u8; 16],
    parent_name: String,
    locators: Locators,
    blocks: Vec<Block>,
    /// XCP batmap: (version, break its checksum).
    batmap: Option<(u32, bool)>,
}

fn pad512(n: u64) -> u64 {
    n.div_ceil(512).max(1) * 512
}

fn vhd_checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, x| s.wrapping_add(*x as u32))
}

/// The CHS geometry of the spec's appendix.
fn chs(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (mut spt, mut heads, mut cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        spt = 17;
        cth = total / spt;
        heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = total / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = total / spt;
        }
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

impl Spec {
    fn new(disk_type: u32, size: u64, block_size: u32) -> Spec {
        Spec {
            disk_type,
            size,
            block_size,
            creator: *b"win ",
            creator_version: 0x0006_0001,
            unique_id: [0x5a; 16],
            parent_id: [0; 16],
            parent_name: String::new(),
            locators: Vec::new(),
            blocks: Vec::new(),
            batmap: None,
        }
    }

    fn bitmap_size(&self) -> u64 {
        (self.block_size as u64 / 512).div_ceil(8).div_ceil(512) * 512
    }

    fn footer(&self) -> [u8; 512] {
        let mut f = [0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&512u64.to_be_bytes());
        f[24..28].copy_from_slice(&0x2d00_0000u32.to_be_bytes());
        f[28..32].copy_from_slice(&self.creator);
        f[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[48..56].copy_from_slice(&self.size.to_be_bytes());
        let (c, h, s) = chs(self.size);
        f[56..58].copy_from_slice(&c.to_be_bytes());
        f[58] = h;
        f[59] = s;
        f[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        f[68..84].copy_from_slice(&self.unique_id);
        let sum = vhd_checksum(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        f
    }

    /// The image: footer copy, header, BAT, [batmap], locators, blocks,
    /// footer.
    fn build(&self) -> Vec<u8> {
        let bs = self.block_size as u64;
        let entries = self.size.div_ceil(bs);
        let bat_at = 1536u64;
        let mut img = vec![0u8; bat_at as usize];
        img.resize((bat_at + pad512(entries * 4)) as usize, 0xff);
        let full: Vec<u64> = self
            .blocks
            .iter()
            .filter(|b| b.present.iter().all(|p| *p))
            .map(|b| b.index)
            .collect();
        if let Some((version, corrupt)) = self.batmap {
            let hdr_at = img.len();
            let map_len = pad512(entries.div_ceil(8));
            let map_at = hdr_at as u64 + 512;
            let mut map = vec![0u8; map_len as usize];
            for i in &full {
                map[(*i / 8) as usize] |= 0x80 >> (i % 8);
            }
            // Version 1.1 summed the bytes as signed chars.
            let mut sum = if version == 0x0001_0001 {
                !map.iter()
                    .fold(0u32, |s, x| s.wrapping_add(*x as i8 as i32 as u32))
            } else {
                vhd_checksum(&map)
            };
            if corrupt {
                sum ^= 1;
            }
            let mut hdr = vec![0u8; 512];
            hdr[0..8].copy_from_slice(b"tdbatmap");
            hdr[8..16].copy_from_slice(&map_at.to_be_bytes());
            hdr[16..20].copy_from_slice(&((map_len / 512) as u32).to_be_bytes());
            hdr[20..24].copy_from_slice(&version.to_be_bytes());
            hdr[24..28].copy_from_slice(&sum.to_be_bytes());
            img.extend_from_slice(&hdr);
            img.extend_from_slice(&map);
        }
        let mut header = vec![0u8; 1024];
        header[0..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        header[16..24].copy_from_slice(&bat_at.to_be_bytes());
        header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        header[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        header[40..56].copy_from_slice(&self.parent_id);
        for (i, c) in self.parent_name.encode_utf16().take(256).enumerate() {
            header[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        for (i, (code, data)) in self.locators.iter().enumerate() {
            let at = img.len() as u64;
            let space = pad512(data.len() as u64);
            img.extend_from_slice(data);
            img.resize((at + space) as usize, 0);
            let e = 576 + 24 * i;
            header[e..e + 4].copy_from_slice(code);
            header[e + 4..e + 8].copy_from_slice(&(space as u32).to_be_bytes());
            header[e + 8..e + 12].copy_from_slice(&(data.len() as u32).to_be_bytes());
            header[e + 16..e + 24].copy_from_slice(&at.to_be_bytes());
        }
        let sum = vhd_checksum(&header);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
        img[512..1536].copy_from_slice(&header);
        for b in &self.blocks {
            let at = img.len() as u64;
            let e = (bat_at + b.index * 4) as usize;
            img[e..e + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
            let mut bitmap = vec![0u8; self.bitmap_size() as usize];
            for (s, p) in b.present.iter().enumerate() {
                if *p {
                    bitmap[s / 8] |= 0x80 >> (s % 8);
                }
            }
            img.extend_from_slice(&bitmap);
            img.extend_from_slice(&b.data);
        }
        let footer = self.footer();
        img[0..512].copy_from_slice(&footer);
        img.extend_from_slice(&footer);
        img
    }

    fn write(&self, path: &Path) {
        fs::write(path, self.build()).expect("write hand-built VHD");
    }

    /// Puts the present sectors of every block over `below`.
    fn overlay(&self, below: &mut [u8]) {
        let bs = self.block_size as usize;
        for b in &self.blocks {
            for (s, p) in b.present.iter().enumerate() {
                let at = b.index as usize * bs + s * 512;
                if *p && at < below.len() {
                    below[at..at + 512].copy_from_slice(&b.data[s * 512..s * 512 + 512]);
                }
            }
        }
    }

    /// A block with the sectors in `present` set, each filled with a
    /// pattern of `seed` and its number; absent sectors hold 0xEE.
    fn block(&self, index: u64, seed: u8, present: impl Fn(usize) -> bool) -> Block {
        let sectors = self.block_size as usize / 512;
        let mut data = vec![0xeeu8; self.block_size as usize];
        let present: Vec<bool> = (0..sectors).map(present).collect();
        for (s, p) in present.iter().enumerate() {
            if *p {
                for (k, byte) in data[s * 512..(s + 1) * 512].iter_mut().enumerate() {
                    *byte = seed ^ (s as u8).wrapping_mul(7) ^ (k as u8);
                }
            }
        }
        Block {
            index,
            present,
            data,
        }
    }

    fn locate_parent(&mut self, name: &str) {
        self.locators = vec![
            (*b"W2ru", utf16le(&format!(".\\{name}"))),
            (*b"W2ku", utf16le(&format!("C:\\vms\\{name}"))),
            (*b"MacX", format!("file://./{name}").into_bytes()),
        ];
        self.parent_name = name.to_string();
    }
}

/// A differencing child of `parent` (8 MiB, 1 MiB blocks) with blocks that
/// exercise every bitmap case.
fn child_spec(parent: &Path, parent_name: &str) -> Spec {
    let mut s = Spec::new(DIFFERENCING, 8 * MIB, MIB as u32);
    s.parent_id = footer_unique_id(parent);
    s.locate_parent(parent_name);
    s.blocks = vec![
        s.block(0, 0xc0, |k| k < 8 || k == 100 || k >= 2000),
        s.block(2, 0xc2, |_| true),
        s.block(3, 0xc3, |k| k < 64 && k % 2 == 0),
        s.block(7, 0xc7, |k| k == 2047),
    ];
    s
}

/// A qemu-made dynamic parent of 8 MiB (exact size), filled everywhere.
fn make_parent(dir: &Path, name: &str) -> PathBuf {
    let p = create_vpc(dir, name, 8 * MIB, &["force_size=on"]);
    qemu_io(
        dir,
        name,
        &[
            write(0x11, 0, 8 * MIB),
            write(0x12, 3 * MIB + 7, 5000),
            write(0x13, 8 * MIB - 4096, 4096),
        ],
    );
    p
}

/// `vhdiinfo IMG` must succeed, if libvhdi-utils is installed.
fn assert_vhdiinfo_accepts(img: &Path) {
    if !tool_runs("vhdiinfo", "-V") {
        skip("vhdiinfo (libvhdi-utils) is not installed; not asking libvhdi");
        return;
    }
    let mut cmd = Command::new("vhdiinfo");
    cmd.arg(img);
    let out = run_unchecked(&mut cmd);
    assert!(
        out.status.success(),
        "vhdiinfo refuses the image\n{}",
        describe_output(&cmd, &out)
    );
}

// ---------------------------------------------------------------------------
// Images made by qemu-img

#[test]
fn qemu_dynamic_images_match_qemu() {
    require_qemu!();
    let dir = tempdir();
    for (i, size) in [MIB, 10 * MIB, 5000 * KIB, 100 * MIB + 7 * 512]
        .into_iter()
        .enumerate()
    {
        let name = format!("d{i}.vhd");
        create_vpc(dir.path(), &name, size, &[]);
        assert_matches_qemu(dir.path(), &name);
        let vsize = qemu_virtual_size(dir.path(), &name);
        qemu_io(dir.path(), &name, &writes_for(vsize));
        assert_matches_qemu(dir.path(), &name);
    }
}

#[test]
fn qemu_force_size_images_match_qemu() {
    require_qemu!();
    let dir = tempdir();
    for (i, size) in [10 * MIB, 3 * 1024 * MIB, 33 * MIB + 512]
        .into_iter()
        .enumerate()
    {
        let name = format!("f{i}.vhd");
        create_vpc(dir.path(), &name, size, &["force_size=on"]);
        assert_eq!(qemu_virtual_size(dir.path(), &name), size);
        qemu_io(dir.path(), &name, &writes_for(size));
        assert_matches_qemu(dir.path(), &name);
    }
}

#[test]
fn qemu_fixed_images_match_qemu() {
    require_qemu!();
    let dir = tempdir();
    let cases: [(&str, u64, &[&str]); 2] = [
        ("fixed-chs.vhd", 10 * MIB, &["subformat=fixed"]),
        (
            "fixed-exact.vhd",
            6 * MIB,
            &["subformat=fixed", "force_size=on"],
        ),
    ];
    for (name, size, opts) in cases {
        create_vpc(dir.path(), name, size, opts);
        let vsize = qemu_virtual_size(dir.path(), name);
        qemu_io(dir.path(), name, &writes_for(vsize));
        assert_matches_qemu(dir.path(), name);
        // Found by its footer alone (qemu itself needs `-f vpc`).
        let layer = probe::open_layer(&dir.path().join(name), None, false).expect("open");
        assert_eq!(layer.format(), ImgFormat::Vhd);
        assert_eq!(layer.virtual_size(), vsize);
    }
}

#[test]
fn full_blocks_are_served_without_their_bitmaps() {
    require_qemu!();
    let dir = tempdir();
    let name = "full.vhd";
    let img = create_vpc(dir.path(), name, 8 * MIB, &["force_size=on"]);
    qemu_io(
        dir.path(),
        name,
        &[write(0x21, 100, 10), write(0x22, 2 * MIB, 512)],
    );
    let layer = VhdLayer::open(&img, fs::File::open(&img).unwrap()).expect("open");
    assert_eq!((layer.bitmap_reads(), layer.full_blocks()), (0, 0));
    // QEMU sets every bit of a block it allocates: one look makes it full.
    layer.map(0, 2 * MIB).unwrap();
    assert_eq!((layer.bitmap_reads(), layer.full_blocks()), (1, 1));
    layer.map(512, 4096).unwrap();
    layer.map(0, 2 * MIB).unwrap();
    assert_eq!(
        layer.bitmap_reads(),
        1,
        "a full block is served without its bitmap"
    );
    let map = layer.map(0, 8 * MIB).unwrap();
    assert_eq!((layer.bitmap_reads(), layer.full_blocks()), (2, 2));
    assert_eq!(map.len(), 3, "data, data (after a bitmap), zero: {map:?}");
    assert_eq!(layer.allocated_bytes().unwrap(), 4 * MIB);
}

#[test]
fn footer_variants_are_read() {
    require_qemu!();
    let dir = tempdir();
    // A dynamic disk whose end lost its footer (an allocation interrupted
    // before the footer was rewritten) is read through the copy at 0.
    let name = "dyn.vhd";
    let img = create_vpc(dir.path(), name, 6 * MIB, &["force_size=on"]);
    qemu_io(dir.path(), name, &writes_for(6 * MIB));
    let expected = read_all(&qemu_raw(dir.path(), name));
    let mut b = read_all(&img);
    let n = b.len();
    b[n - 512..].fill(0);
    let headless = dir.path().join("no-end-footer.vhd");
    fs::write(&headless, &b).unwrap();
    assert_bytes(&expected, &chain_bytes(&headless).unwrap(), "head copy");
    // An old Virtual PC fixed disk with a 511-byte footer.
    let name = "fixed.vhd";
    let img = create_vpc(
        dir.path(),
        name,
        4 * MIB,
        &["subformat=fixed", "force_size=on"],
    );
    qemu_io(dir.path(), name, &writes_for(4 * MIB));
    let expected = read_all(&qemu_raw(dir.path(), name));
    let b = read_all(&img);
    let short = dir.path().join("short-footer.vhd");
    fs::write(&short, &b[..b.len() - 1]).unwrap();
    assert_bytes(&expected, &chain_bytes(&short).unwrap(), "511-byte footer");
    let info = snaptree_info(&short);
    assert!(info.to_string().contains("511-byte footer"), "{info}");
}

// ---------------------------------------------------------------------------
// Hand-built images: differencing disks, partial bitmaps, batmaps

#[test]
fn differencing_chain_reads_through_its_parent() {
    require_qemu!();
    let dir = tempdir();
    let parent = make_parent(dir.path(), "parent.vhd");
    let child = dir.path().join("child.vhd");
    let spec = child_spec(&parent, "parent.vhd");
    spec.write(&child);
    let mut expected = read_all(&qemu_raw(dir.path(), "parent.vhd"));
    spec.overlay(&mut expected);
    assert_bytes(&expected, &chain_bytes(&child).unwrap(), "chain read");
    let out = snaptree_raw(&child);
    assert_bytes(&expected, &read_all(&out), "snaptree export");
    let info = snaptree_info(&child);
    assert_eq!(info["depth"], 2, "{info}");
    assert_eq!(info["chain"][0]["backing"]["name"], "parent.vhd", "{info}");
    assert_eq!(info["chain"][0]["backing"]["format"], "vpc", "{info}");
    // The child holds blocks 0, 2, 3 and 7 in part or whole.
    let held = (8 + 1 + 48 + 2048 + 32 + 1) * 512;
    assert_eq!(info["chain"][0]["allocated_bytes"], held, "{info}");
    assert_vhdiinfo_accepts(&child);
}

/// Unmounts a FUSE mount point when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        for tool in ["umount", "fusermount"] {
            let mut cmd = Command::new(tool);
            if tool == "fusermount" {
                cmd.arg("-u");
            }
            if run_until(cmd.arg(&self.0), COMMAND_TIMEOUT)
                .output
                .status
                .success()
            {
                return;
            }
        }
    }
}

/// libvhdi's view of the chain must equal ours. libvhdi 20210425 decodes a
/// sector bitmap byte with an unmasked shift (every sector after the first
/// set bit of a byte reads as present), so this child's bitmap runs are
/// whole bytes; the partial-byte cases are checked against the spec above.
#[test]
fn libvhdi_reads_the_same_chain() {
    require_qemu!();
    if !tool_runs("vhdimount", "-V") || !Path::new("/dev/fuse").exists() {
        skip("vhdimount (libvhdi-utils) or /dev/fuse is not available");
        return;
    }
    let dir = tempdir();
    let parent = make_parent(dir.path(), "parent.vhd");
    let mut spec = child_spec(&parent, "parent.vhd");
    spec.blocks = vec![
        spec.block(0, 0xd0, |k| k < 16 || (96..104).contains(&k)),
        spec.block(2, 0xd2, |_| true),
        spec.block(5, 0xd5, |k| k >= 2040),
    ];
    let child = dir.path().join("child.vhd");
    spec.write(&child);
    let mut expected = read_all(&qemu_raw(dir.path(), "parent.vhd"));
    spec.overlay(&mut expected);
    assert_bytes(&expected, &chain_bytes(&child).unwrap(), "snaptree");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new("vhdimount");
    cmd.arg(&child).arg(&mnt);
    let done = run_until(&mut cmd, COMMAND_TIMEOUT);
    if !done.output.status.success() {
        skip(format!(
            "vhdimount cannot mount here\n{}",
            describe_output(&cmd, &done.output)
        ));
        return;
    }
    let _mounted = Mounted(mnt.clone());
    let views: Vec<PathBuf> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        views
            .iter()
            .any(|v| fs::read(v).is_ok_and(|b| b == expected)),
        "no libvhdi view of {} equals snaptree's: {views:?}",
        child.display()
    );
}

#[test]
fn differencing_on_a_fixed_parent() {
    require_qemu!();
    let dir = tempdir();
    let name = "base.vhd";
    let parent = create_vpc(
        dir.path(),
        name,
        8 * MIB,
        &["subformat=fixed", "force_size=on"],
    );
    qemu_io(dir.path(), name, &[write(0x31, 0, 8 * MIB)]);
    let child = dir.path().join("child.vhd");
    let spec = child_spec(&parent, name);
    spec.write(&child);
    let mut expected = read_all(&qemu_raw(dir.path(), name));
    spec.overlay(&mut expected);
    assert_bytes(&expected, &chain_bytes(&child).unwrap(), "chain on fixed");
}

#[test]
fn differencing_parent_id_mismatch_is_refused() {
    require_qemu!();
    let dir = tempdir();
    let parent = make_parent(dir.path(), "parent.vhd");
    let child = dir.path().join("child.vhd");
    let mut spec = child_spec(&parent, "parent.vhd");
    spec.parent_id[0] ^= 0xff;
    spec.write(&child);
    let err = assert_refused(&child, &["parent ID mismatch", "parent.vhd"]);
    assert!(err.contains("child.vhd"), "{err}");
}

#[test]
fn parent_locators_fall_back_in_order() {
    require_qemu!();
    let dir = tempdir();
    let parent = make_parent(dir.path(), "parent.vhd");
    let mut expected = read_all(&qemu_raw(dir.path(), "parent.vhd"));
    let base = child_spec(&parent, "parent.vhd");
    base.overlay(&mut expected);
    let cases: Vec<(&str, Locators, &str)> = vec![
        // W2ru names a file that is not there: MacX is next.
        (
            "macx.vhd",
            vec![
                (*b"W2ru", utf16le(".\\gone.vhd")),
                (*b"MacX", b"file://./parent.vhd".to_vec()),
            ],
            "",
        ),
        // Only the absolute Windows path: its last component.
        (
            "w2ku.vhd",
            vec![(*b"W2ku", utf16le("D:\\Hyper-V\\disks\\parent.vhd"))],
            "",
        ),
        // An absolute Mac URL with escapes: its last component.
        (
            "macx-abs.vhd",
            vec![(*b"MacX", b"file://localhost/Users/x/parent.vhd".to_vec())],
            "",
        ),
        // No locator at all: the parent's Unicode name.
        ("name.vhd", vec![], "parent.vhd"),
    ];
    for (name, locators, parent_name) in cases {
        let mut spec = child_spec(&parent, "parent.vhd");
        spec.locators = locators;
        spec.parent_name = parent_name.to_string();
        let img = dir.path().join(name);
        spec.write(&img);
        assert_bytes(&expected, &chain_bytes(&img).unwrap(), name);
    }
    // Nothing that exists: the error names the preferred candidate.
    let mut spec = child_spec(&parent, "parent.vhd");
    spec.locators = vec![(*b"W2ru", utf16le(".\\gone.vhd"))];
    spec.parent_name = "also-gone.vhd".into();
    let img = dir.path().join("orphan.vhd");
    spec.write(&img);
    assert_refused(&img, &["gone.vhd"]);
}

#[test]
fn dynamic_disk_clear_bits_read_as_zeros() {
    let dir = tempdir();
    let mut spec = Spec::new(DYNAMIC, 5 * MIB + 3 * 512, 512 * KIB as u32);
    spec.blocks = vec![
        spec.block(0, 0x40, |k| k % 3 == 0),
        spec.block(4, 0x44, |_| true),
        // The last block reaches past the end of the disk.
        spec.block(10, 0x4a, |k| k < 2 || k == 3),
    ];
    let img = dir.path().join("dyn.vhd");
    spec.write(&img);
    let mut expected = vec![0u8; spec.size as usize];
    spec.overlay(&mut expected);
    assert_bytes(&expected, &chain_bytes(&img).unwrap(), "hand-built dynamic");
    assert_bytes(&expected, &read_all(&snaptree_raw(&img)), "export");
    assert_vhdiinfo_accepts(&img);
}

#[test]
fn xcp_batmap_marks_full_blocks() {
    let dir = tempdir();
    for (version, corrupt) in [
        (0x0001_0002, false),
        (0x0001_0002, true),
        (0x0001_0001, false),
    ] {
        let mut spec = Spec::new(DYNAMIC, 4 * MIB, 2 * MIB as u32);
        spec.creator = *b"tap\0";
        spec.creator_version = 0x0001_0003;
        spec.batmap = Some((version, corrupt));
        spec.blocks = vec![
            spec.block(0, 0x70, |_| true),
            spec.block(1, 0x71, |k| k > 5),
        ];
        let img = dir.path().join(format!("xcp-{version:x}-{corrupt}.vhd"));
        spec.write(&img);
        let layer = VhdLayer::open(&img, fs::File::open(&img).unwrap()).expect("open");
        assert_eq!(layer.uses_batmap(), !corrupt, "{}", img.display());
        layer.map(0, 2 * MIB).unwrap();
        assert_eq!(
            layer.bitmap_reads(),
            if corrupt { 1 } else { 0 },
            "block 0 is full per the batmap"
        );
        let mut expected = vec![0u8; spec.size as usize];
        spec.overlay(&mut expected);
        assert_bytes(&expected, &chain_bytes(&img).unwrap(), "batmap image");
    }
}

// ---------------------------------------------------------------------------
// Bad input

/// Where qemu puts the dynamic disk header.
const HDR: usize = 512;

/// Overwrites `b` at `at` with `bytes`.
fn patch(b: &mut [u8], at: usize, bytes: &[u8]) {
    b[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Recomputes the checksum at `start + field` of the structure of `len`
/// bytes at `start` (footer: 512/64, dynamic header: 1024/36).
fn fix_checksum(b: &mut [u8], start: usize, len: usize, field: usize) {
    b[start + field..start + field + 4].fill(0);
    let sum = vhd_checksum(&b[start..start + len]);
    b[start + field..start + field + 4].copy_from_slice(&sum.to_be_bytes());
}

#[test]
fn corrupt_images_fail_cleanly() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let name = "good.vhd";
    let good = create_vpc(d, name, 6 * MIB, &["force_size=on"]);
    qemu_io(d, name, &writes_for(6 * MIB));
    let fixed = create_vpc(
        d,
        "fixed.vhd",
        4 * MIB,
        &["subformat=fixed", "force_size=on"],
    );
    let g = read_all(&good);
    let n = g.len();
    type Mutate = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutate, &[&str])> = vec![
        (
            "bad-footer-checksum.vhd",
            Box::new(move |b| b[n - 512 + 100] ^= 1),
            &["checksum", "offset"],
        ),
        (
            "bad-head-copy-checksum.vhd",
            Box::new(|b| b[100] ^= 1),
            &["checksum", "offset 64"],
        ),
        (
            "bad-header-checksum.vhd",
            Box::new(|b| b[512 + 900] ^= 1),
            &["dynamic disk header checksum", "offset 548"],
        ),
        (
            "bat-past-eof.vhd",
            Box::new(|b| patch(b, 1536 + 4, &0x00ff_0000u32.to_be_bytes())),
            &["BAT entry 1", "past the end of the file"],
        ),
        (
            "block-over-header.vhd",
            Box::new(|b| patch(b, 1536, &1u32.to_be_bytes())),
            &["BAT entry 0", "dynamic disk header"],
        ),
        (
            "block-size-zero.vhd",
            Box::new(|b| {
                patch(b, HDR + 32, &0u32.to_be_bytes());
                fix_checksum(b, HDR, 1024, 36);
            }),
            &["block_size 0", "power of two"],
        ),
        (
            "block-size-3k.vhd",
            Box::new(|b| {
                patch(b, HDR + 32, &3072u32.to_be_bytes());
                fix_checksum(b, HDR, 1024, 36);
            }),
            &["block_size 3072", "power of two"],
        ),
        (
            "table-past-eof.vhd",
            Box::new(|b| {
                patch(b, HDR + 16, &(1u64 << 40).to_be_bytes());
                fix_checksum(b, HDR, 1024, 36);
            }),
            &["BAT at offset", "past the end"],
        ),
        (
            "too-few-entries.vhd",
            Box::new(|b| {
                patch(b, HDR + 28, &1u32.to_be_bytes());
                fix_checksum(b, HDR, 1024, 36);
            }),
            &["max_table_entries 1"],
        ),
        (
            "data-offset-wild.vhd",
            Box::new(move |b| {
                for at in [0, n - 512] {
                    patch(b, at + 16, &(1u64 << 40).to_be_bytes());
                    fix_checksum(b, at, 512, 64);
                }
            }),
            &["data_offset"],
        ),
        (
            "disk-type-5.vhd",
            Box::new(move |b| {
                for at in [0, n - 512] {
                    patch(b, at + 60, &5u32.to_be_bytes());
                    fix_checksum(b, at, 512, 64);
                }
            }),
            &["disk type 5"],
        ),
        (
            "truncated.vhd",
            Box::new(|b| b.truncate(3 * MIB as usize)),
            &["offset"],
        ),
        ("empty.vhd", Box::new(|b| b.truncate(100)), &[]),
    ];
    for (file, mutate, needles) in cases {
        let mut b = g.clone();
        mutate(&mut b);
        let img = d.join(file);
        fs::write(&img, &b).unwrap();
        if file == "empty.vhd" {
            // 100 bytes starting with "conectix": no footer can fit.
            assert_refused(&img, &["shorter than the 512-byte VHD footer"]);
            continue;
        }
        assert_refused(&img, needles);
    }
    // A fixed disk's only footer.
    let mut b = read_all(&fixed);
    let m = b.len();
    b[m - 512 + 200] ^= 1;
    let img = d.join("bad-fixed-footer.vhd");
    fs::write(&img, &b).unwrap();
    // Without a valid footer it is not recognised as a fixed VHD at all,
    // so ask for the format explicitly.
    let e = probe::open_layer(&img, Some(ImgFormat::Vhd), false)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("bad-fixed-footer.vhd") && e.contains("checksum"),
        "{e}"
    );
}

#[test]
fn bad_parent_locators_fail_cleanly() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let parent = make_parent(d, "parent.vhd");
    // The child names itself as its parent.
    let mut spec = child_spec(&parent, "self.vhd");
    spec.locate_parent("self.vhd");
    spec.write(&d.join("self.vhd"));
    assert_refused(&d.join("self.vhd"), &["loops"]);
    // Locator data pointing into the dynamic header, past the file end, or
    // far too long; a MacX locator that is no URL.
    let base = child_spec(&parent, "parent.vhd").build();
    let loc0 = 512 + 576;
    type Mutate = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutate, &[&str])> = vec![
        (
            "loc-in-header.vhd",
            Box::new(move |b| patch(b, loc0 + 16, &600u64.to_be_bytes())),
            &[
                "parent locator 0 (W2ru)",
                "overlaps the dynamic disk header",
            ],
        ),
        (
            "loc-past-eof.vhd",
            Box::new(move |b| patch(b, loc0 + 16, &(1u64 << 40).to_be_bytes())),
            &["parent locator 0", "past the end of the file"],
        ),
        (
            "loc-huge.vhd",
            Box::new(move |b| patch(b, loc0 + 8, &u32::MAX.to_be_bytes())),
            &["platform_data_length"],
        ),
        (
            "loc-odd-utf16.vhd",
            Box::new(move |b| patch(b, loc0 + 8, &3u32.to_be_bytes())),
            &["not UTF-16LE"],
        ),
    ];
    for (file, mutate, needles) in cases {
        let mut b = base.clone();
        mutate(&mut b);
        fix_checksum(&mut b, 512, 1024, 36);
        let img = d.join(file);
        fs::write(&img, &b).unwrap();
        assert_refused(&img, needles);
    }
}

/// Random damage to metadata (with checksums fixed half of the time, so
/// the checks behind them are reached) must give an error or a read,
/// never a panic or a huge allocation.
#[test]
fn fuzzed_metadata_never_panics() {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let parent = make_parent(d, "parent.vhd");
    let seeds = [read_all(&parent), child_spec(&parent, "parent.vhd").build()];
    let iters: usize = std::env::var("SNAPTREE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut rng = SmallRng::seed_from_u64(0x5eed_0f0d);
    let (mut opened, mut refused) = (0, 0);
    for i in 0..iters {
        let mut b = seeds[i % 2].clone();
        let n = b.len();
        let hot = [
            0..1536usize,
            1536..1536 + 64,
            1536 + 512..1536 + 512 * 8,
            n - 512..n,
        ];
        for _ in 0..rng.gen_range(1..6) {
            let r = &hot[rng.gen_range(0..hot.len())];
            let at = rng.gen_range(r.clone());
            b[at] = rng.gen();
        }
        if rng.gen_bool(0.5) {
            fix_checksum(&mut b, 0, 512, 64);
            fix_checksum(&mut b, n - 512, 512, 64);
            fix_checksum(&mut b, 512, 1024, 36);
        }
        let img = d.join("fuzz.vhd");
        fs::write(&img, &b).unwrap();
        let result = std::panic::catch_unwind(|| sample_chain(&img));
        match result {
            Ok(Ok(_)) => opened += 1,
            Ok(Err(e)) => {
                assert!(e.contains("vhd"), "error does not name the file: {e}");
                refused += 1;
            }
            Err(_) => {
                let keep = d.join(format!("panic-{i}.vhd"));
                let _ = fs::copy(&img, &keep);
                panic!("iteration {i} panicked (image kept as {})", keep.display());
            }
        }
    }
    note(format!("fuzz: {opened} opened, {refused} refused"));
}
