//! The VHDX write side against real peers.
//!
//! - Dynamic and fixed VHDXs made by qemu-img (1 MiB and 32 MiB blocks,
//!   one with 4096-byte logical sectors edited in from the spec) and written through
//!   the crate's `Chain` (random unaligned, sub-sector, multi-block and
//!   zero writes, flushes) convert with `qemu-img convert` to exactly the
//!   bytes of an in-memory model; `qemu-img check` is clean; `vhdiinfo`
//!   accepts them; QEMU's own writes afterwards land where we read them;
//!   the data write GUID changed.
//! - A differencing child (edited from a qemu-img image, as QEMU cannot
//!   make one) written at random reads as the model through snaptree and
//!   through libvhdi's `vhdimount`.
//! - A storage that stops writing after N writes (every N until the
//!   workload completes) leaves a file qemu-img checks clean and libvhdi
//!   opens, where each byte reads its value at the last flush or a value
//!   a later write gave it.
//!
//! Random sequences are seeded; the seed is in every failure message
//! (`SNAPTREE_TEST_SEED=N` replays one).

#[macro_use]
mod common;
#[path = "common/chain_rw.rs"]
mod chain_rw;
#[path = "vhdx/spec.rs"]
mod spec;
#[path = "common/vhd_peers.rs"]
mod vhd_peers;

/// The `-f` QEMU gives this format (`chain_rw`).
const QEMU_FORMAT: &str = "vhdx";

use chain_rw::*;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::chain::{Chain, OpenOptions};
use snaptree::image::vhdx::VhdxLayer;
use snaptree::image::{NoBacking, Writable};
use snaptree::storage::{MemStorage, Storage};
use spec::{Vhdx, MIB};
use std::fs;
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

fn tempdir() -> TempDir {
    TempDir::with_prefix("snaptree-vhdxw-").expect("temp dir")
}

fn create(dir: &Path, name: &str, size: u64, opts: &str) {
    qemu_img(
        dir,
        [
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            opts,
            name,
            &size.to_string(),
        ],
    );
}

/// `qemu-img check -f vhdx`: its output when it is not clean.
fn qemu_check(img: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(img)
        .output()
        .expect("run qemu-img check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// `vhdiinfo` must accept `img`, when libvhdi-utils is installed.
fn assert_vhdiinfo(img: &Path, what: &str) {
    if !vhd_peers::libvhdi_tool("vhdiinfo") {
        return;
    }
    if let Err(e) = vhd_peers::vhdiinfo(img) {
        panic!("{what}: libvhdi refuses an image snaptree wrote: {e}");
    }
}

/// A random step for a disk of `size` bytes in `block`-byte blocks.
fn random_op(rng: &mut SmallRng, size: u64, block: u64) -> Op {
    let at = |rng: &mut SmallRng, len: u64| rng.gen_range(0..=size - len);
    let write = |rng: &mut SmallRng, off: u64, len: u64| {
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        Op::Write(off, data)
    };
    match rng.gen_range(0..100) {
        0..=14 => {
            let len = rng.gen_range(1..512u64);
            let off = at(rng, len);
            write(rng, off, len)
        }
        15..=44 => {
            let len = rng.gen_range(1..40_000u64).min(size);
            let off = at(rng, len);
            write(rng, off, len)
        }
        45..=59 => {
            let len = 4096 * rng.gen_range(1..=16u64);
            let off = rng.gen_range(0..=(size - len) / 4096) * 4096;
            write(rng, off, len)
        }
        60..=67 => {
            let len = rng.gen_range(block / 2..=block * 5 / 2).min(size);
            let off = at(rng, len);
            write(rng, off, len)
        }
        68..=79 => {
            let len = rng.gen_range(1..300_000u64).min(size);
            Op::Zero(at(rng, len), len)
        }
        80..=83 => {
            let b = rng.gen_range(0..size / block);
            Op::Zero(b * block, block)
        }
        84..=93 => {
            let off = rng.gen_range(0..size / 512) * 512;
            write(rng, off, 512)
        }
        _ => Op::Flush,
    }
}

// ---------------------------------------------------------------------------

#[test]
fn qemu_dynamic_vhdx_written_by_snaptree_converts_to_the_model() {
    require_qemu!();
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempdir();
    let d = dir.path();
    // (name, options, size, logical sector edited in)
    let cases = [
        ("b1m.vhdx", "block_size=1M", 24 * MIB + 7 * 512, 512u32),
        ("b32m.vhdx", "block_size=32M", 80 * MIB, 512),
        ("s4k.vhdx", "block_size=1M", 20 * MIB, 4096),
        ("fixed.vhdx", "subformat=fixed,block_size=1M", 8 * MIB, 512),
    ];
    for (name, opts, size, sector) in cases {
        let ctx = format!("{name} (seed {seed})");
        let img = d.join(name);
        create(d, name, size, opts);
        if sector != 512 {
            let mut v = Vhdx::load(&img);
            v.set_logical_sector(sector);
            v.save(&img);
        } else {
            qemu_io(&img, "write -P 0x5a 1M 1536K");
        }
        let before_guid = Vhdx::load(&img).data_write_guid();
        let mut model = read_leaf(&img);
        let block = Vhdx::load(&img).block_size();
        let chain = open_rw(&img);
        for i in 0..150 {
            let op = random_op(&mut rng, size, block);
            apply(&chain, &mut model, &op);
            if i % 40 == 39 {
                check_bytes(
                    &model,
                    &read_chain(&chain),
                    format!("{ctx}: read after op {i}"),
                );
            }
        }
        chain.flush().expect("flush");
        drop(chain);
        check_bytes(&model, &read_leaf(&img), format!("{ctx}: snaptree read"));
        // QEMU opens no 4096-byte-sector VHDX; libvhdi does.
        if sector == 512 {
            if let Err(e) = qemu_check(&img) {
                panic!("{ctx}: qemu-img check:\n{e}");
            }
        }
        assert_vhdiinfo(&img, &ctx);
        assert_ne!(
            Vhdx::load(&img).data_write_guid(),
            before_guid,
            "{ctx}: data write GUID unchanged"
        );
        if sector == 512 {
            check_bytes(&model, &qemu_raw(&img), format!("{ctx}: qemu-img convert"));
            // QEMU writes after us land where we read them.
            qemu_io(&img, "write -P 0x77 3000000 70000");
            model[3_000_000..3_070_000].fill(0x77);
            check_bytes(&model, &read_leaf(&img), format!("{ctx}: after qemu-io"));
        }
    }
}

/// A child of a qemu-img parent, edited into a differencing disk (QEMU
/// cannot make or open one), written at random: snaptree and vhdimount
/// read the model.
#[test]
fn differencing_vhdx_written_by_snaptree_reads_the_model_in_libvhdi() {
    require_qemu!();
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempdir();
    let d = dir.path();
    let size = 24 * MIB;
    create(d, "base.vhdx", size, "block_size=1M");
    qemu_io(&d.join("base.vhdx"), "write -P 0x31 0 10M");
    qemu_io(&d.join("base.vhdx"), "write -P 0x32 15M 3M");
    create(d, "child.avhdx", size, "block_size=1M");
    let link = Vhdx::load(&d.join("base.vhdx")).data_write_guid();
    let mut v = Vhdx::load(&d.join("child.avhdx"));
    v.make_differencing(&[
        ("parent_linkage", spec::guid_text(&link)),
        ("relative_path", ".\\base.vhdx".into()),
        ("absolute_win32_path", "C:\\VMs\\base.vhdx".into()),
    ]);
    v.save(&d.join("child.avhdx"));
    let leaf = d.join("child.avhdx");
    let mut model = read_leaf(&leaf);
    let chain = open_rw(&leaf);
    for _ in 0..120 {
        let op = random_op(&mut rng, size, MIB);
        apply(&chain, &mut model, &op);
    }
    drop(chain);
    let ctx = format!("seed {seed}");
    check_bytes(&model, &read_leaf(&leaf), format!("{ctx}: snaptree read"));
    assert_eq!(
        Vhdx::load(&d.join("base.vhdx")).data_write_guid(),
        link,
        "the parent was changed"
    );
    if !vhd_peers::libvhdi_tool("vhdimount") || !Path::new("/dev/fuse").exists() {
        return skip("vhdimount (libvhdi-utils) or /dev/fuse is missing");
    }
    assert_vhdiinfo(&leaf, &ctx);
    let m = vhd_peers::VhdiMount::new(&leaf, &d.join("mnt")).unwrap_or_else(|e| panic!("{e}"));
    let got = fs::read(m.last_view()).expect("read vhdimount view");
    check_bytes(&model, &got, format!("{ctx}: vhdimount"));
}

// ---------------------------------------------------------------------------
// Crashes

/// Storage that stops writing after `left` writes, as a machine that
/// loses power does: every later write (and resize) fails, reads go on.
struct CrashAfter {
    inner: MemStorage,
    left: std::sync::atomic::AtomicI64,
}

impl CrashAfter {
    fn spend(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(std::io::Error::other("simulated crash"));
        }
        Ok(())
    }
}

impl Storage for CrashAfter {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        self.spend()?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.spend()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_all(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The workload a crash interrupts: fresh blocks, writes into them,
/// zeros, flushes in between.
fn crash_plan(size: u64) -> Vec<Op> {
    let mut rng = SmallRng::seed_from_u64(17);
    let mut ops = vec![
        Op::Write(100, vec![0xa1; 3000]),
        Op::Write(2 * MIB - 1000, vec![0xa2; 5000]),
        Op::Flush,
        Op::Write(5 * MIB + 512, vec![0xa3; 512]),
        Op::Zero(MIB / 2, MIB),
        Op::Write(7 * MIB, vec![0xa4; 2 * MIB as usize]),
        Op::Flush,
    ];
    for _ in 0..8 {
        ops.push(random_op(&mut rng, size, MIB));
    }
    ops.push(Op::Flush);
    ops
}

/// Each byte of `got` is its value at the last completed flush, or a value
/// a write since then (the interrupted one included) gave it.
fn assert_old_or_new(got: &[u8], flushed: &[u8], since: &[Op], what: &str) {
    for (i, &b) in got.iter().enumerate() {
        if b == flushed[i] {
            continue;
        }
        let old = flushed[i];
        let i = i as u64;
        let ok = since.iter().any(|op| match op {
            Op::Write(o, data) => {
                (*o..*o + data.len() as u64).contains(&i) && data[(i - o) as usize] == b
            }
            Op::Zero(o, l) => (*o..*o + *l).contains(&i) && b == 0,
            Op::Flush => false,
        });
        assert!(
            ok,
            "{what}: byte {i} reads {b:#x}, neither its flushed value {:#x} nor one written since",
            old
        );
    }
}

#[test]
fn a_crash_after_any_write_leaves_a_valid_image_with_old_or_new_bytes() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let size = 12 * MIB;
    create(d, "c.vhdx", size, "block_size=1M");
    qemu_io(&d.join("c.vhdx"), "write -P 0x11 0 1M");
    let original = fs::read(d.join("c.vhdx")).unwrap();
    let base = read_leaf(&d.join("c.vhdx"));
    let plan = crash_plan(size);
    let crashed = d.join("crashed.vhdx");
    let mut crashes = 0;
    for n in 0.. {
        let mem = MemStorage::from_bytes(original.clone());
        let storage = CrashAfter {
            inner: mem.clone(),
            left: std::sync::atomic::AtomicI64::new(n),
        };
        let layer = VhdxLayer::open_with(&crashed, Box::new(storage), true).expect("open");
        let (mut model, mut flushed, mut since) = (base.clone(), base.clone(), Vec::new());
        let mut done = true;
        for op in &plan {
            since.push(op.clone());
            let r = match op {
                Op::Write(o, data) => layer.write(*o, data, &NoBacking),
                Op::Zero(o, l) => layer.write_zeroes(*o, *l, &NoBacking),
                Op::Flush => layer.flush(),
            };
            if r.is_err() {
                done = false;
                break;
            }
            match op {
                Op::Write(o, data) => {
                    model[*o as usize..*o as usize + data.len()].copy_from_slice(data)
                }
                Op::Zero(o, l) => model[*o as usize..(*o + *l) as usize].fill(0),
                Op::Flush => {
                    flushed = model.clone();
                    since.clear();
                }
            }
        }
        drop(layer);
        fs::write(&crashed, mem.to_vec()).expect("write crash state");
        let what = format!("crash after {n} writes");
        if let Err(e) = qemu_check(&crashed) {
            panic!("{what}: qemu-img check:\n{e}");
        }
        assert_vhdiinfo(&crashed, &what);
        let got = qemu_raw(&crashed);
        if done {
            check_bytes(&model, &got, format!("{what}: completed workload"));
            check_bytes(&model, &read_leaf(&crashed), "snaptree after the workload");
            break;
        }
        assert_old_or_new(&got, &flushed, &since, &what);
        check_bytes(
            &got,
            &read_leaf(&crashed),
            format!("{what}: snaptree vs qemu"),
        );
        crashes += 1;
    }
    assert!(crashes > 20, "only {crashes} crash points");
}

/// Two BAT entries sharing a block: a read-write open refuses, naming the
/// file and the entry, and changes nothing (a write to one would change
/// the other).
#[test]
fn overlapping_blocks_refuse_writing_and_change_nothing() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    create(d, "o.vhdx", 8 * MIB, "block_size=1M");
    let img = d.join("o.vhdx");
    qemu_io(&img, "write -P 0x61 0 2M");
    let mut v = Vhdx::load(&img);
    let b0 = v.bat(0);
    v.set_bat(1, b0);
    v.save(&img);
    let before = fs::read(&img).unwrap();
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let err = Chain::open(&img, &opts)
        .err()
        .expect("a writable open")
        .to_string();
    assert!(
        err.contains("o.vhdx") && err.contains("overlapping"),
        "{err}"
    );
    assert!(fs::read(&img).unwrap() == before, "the file changed");
    // Reading it is still allowed.
    let got = read_leaf(&img);
    assert_eq!(&got[MIB as usize..MIB as usize + 4], &[0x61; 4]);
}

/// Review finding 3: a current header numbered 2^64 - 1 has no successor,
/// so nothing that writes a newer header may proceed (a writable open, a
/// GUID change, a log replay into the file); each is refused naming the
/// file, the field's offset and why, never a panic or a wrap, the file
/// unchanged, and the file still reads like QEMU reads it.
#[test]
fn a_header_numbered_u64_max_is_refused_for_writing() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    create(d, "m.vhdx", 8 * MIB, "block_size=1M");
    let img = d.join("m.vhdx");
    qemu_io(&img, "write -P 0x62 0 2M");
    let mut v = Vhdx::load(&img);
    v.edit_header(|h| h[8..16].copy_from_slice(&u64::MAX.to_le_bytes()));
    let field = v.header_at() + 8;
    v.save(&img);
    let before = fs::read(&img).unwrap();
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let err = Chain::open(&img, &opts)
        .err()
        .expect("a writable open refused")
        .to_string();
    assert!(
        err.contains("m.vhdx")
            && err.contains(&format!("offset {field}"))
            && err.contains("no successor"),
        "{err}"
    );
    let err = snaptree::image::vhdx::reparent::set_data_write_guid(&img, [9; 16])
        .expect_err("a GUID change refused")
        .to_string();
    assert!(err.contains("no successor"), "{err}");
    assert!(fs::read(&img).unwrap() == before, "the file changed");
    check_bytes(&qemu_raw(&img), &read_leaf(&img), "read-only");

    // One below: a log replay needs two newer headers. Refused before it
    // writes anything.
    let mut v = Vhdx { b: before };
    let bat = v.region(&spec::BAT).0;
    let sector = v.b[bat as usize..bat as usize + 4096].to_vec();
    v.log_entry([3; 16], 1, 0, &[(bat, sector)], &[]);
    v.edit_header(|h| h[8..16].copy_from_slice(&(u64::MAX - 1).to_le_bytes()));
    v.save(&img);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let err = snaptree::image::vhdx::driver::replay_into_file(&f, &img)
        .expect_err("a replay refused")
        .to_string();
    assert!(err.contains("no successor"), "{err}");
    assert!(
        fs::read(&img).unwrap() == v.b,
        "the replay changed the file"
    );
}

/// Re-pointing a differencing VHDX: the journaled writes re-point it (and
/// may be applied again), and writes a journal could hold that do more
/// than re-point it are refused, naming the child, with the file unchanged.
#[test]
fn repoint_patches_are_idempotent_and_hostile_ones_refused() {
    use snaptree::image::repoint::Patch;
    use snaptree::image::vhdx::reparent::{apply, check_patches, parent_patches};
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    for (name, fill) in [("a.vhdx", "0x41"), ("b.vhdx", "0x42")] {
        create(d, name, 8 * MIB, "block_size=1M");
        qemu_io(&d.join(name), &format!("write -P {fill} 0 8M"));
    }
    create(d, "c.avhdx", 8 * MIB, "block_size=1M");
    let link = Vhdx::load(&d.join("a.vhdx")).data_write_guid();
    let mut v = Vhdx::load(&d.join("c.avhdx"));
    v.make_differencing(&[
        ("parent_linkage", spec::guid_text(&link)),
        ("relative_path", ".\\a.vhdx".into()),
    ]);
    v.save(&d.join("c.avhdx"));
    let child = d.join("c.avhdx");
    assert_eq!(read_leaf(&child)[100], 0x41);
    let patches = parent_patches(&child, &d.join("b.vhdx"), "b.vhdx").expect("plan");
    let before = fs::read(&child).unwrap();
    let mut hostile: Vec<Vec<Patch>> = vec![
        patches[..1].to_vec(),
        vec![patches[0].clone(), patches[1].clone(), patches[1].clone()],
    ];
    let mut moved = patches.clone();
    moved[1].offset += 32; // another table entry
    hostile.push(moved);
    let mut on_table = patches.clone();
    on_table[0].offset = on_table[1].offset; // the item over the table
    hostile.push(on_table);
    let mut header = patches.clone();
    header[0].offset = 64 * 1024; // the item over the header
    hostile.push(header);
    for h in &hostile {
        let e = check_patches(&child, h).expect_err("hostile patches accepted");
        assert!(e.to_string().contains("c.avhdx"), "{e}");
        assert!(apply(&child, h).is_err());
    }
    assert!(
        fs::read(&child).unwrap() == before,
        "refused patches changed the file"
    );
    apply(&child, &patches).expect("apply");
    assert_eq!(read_leaf(&child)[100], 0x42, "not re-pointed at b.vhdx");
    // A crash after the application: the journal applies it again.
    check_patches(&child, &patches).expect("re-check after apply");
    apply(&child, &patches).expect("apply again");
    assert_eq!(read_leaf(&child)[100], 0x42);
    assert_vhdiinfo(&child, "re-pointed child");
}
