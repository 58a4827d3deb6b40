//! The VHD write side (dynamic, differencing, creation) against real peers.
//!
//! - qemu-made dynamic VHDs written through snaptree (random writes,
//!   unaligned, sub-sector, zero writes, flushes) must convert with
//!   `qemu-img convert` to exactly the bytes of an in-memory model; QEMU's
//!   own writes afterwards must land where snaptree reads them.
//! - Differencing chains of depth 1, 8 and 40 made with
//!   `create_differencing` and written level by level through the crate's
//!   `Chain`: snaptree reads the model, `vhdiinfo` accepts every image, and
//!   `vhdimount` of the leaf reads the same bytes (every level at depth 8).
//! - A writer killed with SIGKILL at planned and at random moments leaves
//!   an image qemu-img and libvhdi open, where every flushed write reads
//!   new, every other write old or new, and everything else unchanged.
//! - Damaged metadata refuses writing, naming file and offset, and leaves
//!   the file as it was; reads running during writes never see anything
//!   but old or new bytes.
//!
//! Random sequences are seeded; the seed is in every failure message
//! (`SNAPTREE_TEST_SEED=N` replays one).

#[macro_use]
mod common;
#[path = "common/chain_rw.rs"]
mod chain_rw;
#[path = "common/vhd_peers.rs"]
mod vhd_peers;

/// The `-f` QEMU gives this format (`chain_rw`).
const QEMU_FORMAT: &str = "vpc";

use chain_rw::*;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use snaptree::chain::{Chain, OpenOptions};
use snaptree::image::vhd::create::{create_differencing, create_dynamic};
use snaptree::image::{probe, Format as ImgFormat, NoBacking};
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;
use vhd_peers::{libvhdi_tool, vhdiinfo, VhdiMount};

// ---------------------------------------------------------------------------
// Helpers

fn tempdir() -> TempDir {
    TempDir::with_prefix("snaptree-vhdw-").expect("temp dir")
}

/// `vhdiinfo` must accept `img`, when libvhdi-utils is installed.
fn assert_vhdiinfo(img: &Path) {
    if let Err(e) = vhdiinfo(img) {
        panic!("libvhdi refuses an image snaptree wrote: {e}");
    }
}

/// A random step for a disk of `size` bytes in `block`-byte blocks:
/// sub-sector, unaligned, 4 KiB aligned, multi-block and zero writes.
fn random_op(rng: &mut SmallRng, size: u64, block: u64) -> Op {
    let at = |rng: &mut SmallRng, len: u64| rng.gen_range(0..=size - len);
    let write = |rng: &mut SmallRng, off: u64, len: u64| {
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        Op::Write(off, data)
    };
    match rng.gen_range(0..100) {
        0..=11 => {
            let len = rng.gen_range(1..512u64);
            let off = at(rng, len);
            write(rng, off, len)
        }
        12..=41 => {
            let len = rng.gen_range(1..40_000u64).min(size);
            let off = at(rng, len);
            write(rng, off, len)
        }
        42..=59 => {
            let len = (4096 * rng.gen_range(1..=16u64)).min(size / 4096 * 4096);
            let off = rng.gen_range(0..=(size - len) / 4096) * 4096;
            write(rng, off, len)
        }
        60..=69 => {
            let len = rng.gen_range(block / 2..=block * 5 / 2).min(size);
            let off = at(rng, len);
            write(rng, off, len)
        }
        70..=79 => {
            let len = rng.gen_range(1..300_000u64).min(size);
            Op::Zero(at(rng, len), len)
        }
        80..=84 => {
            // A whole block of zeros, aligned.
            let len = block.min(size);
            Op::Zero(
                rng.gen_range(0..size / block.max(1)).min(size / len - 1) * len,
                len,
            )
        }
        85..=94 => {
            let off = rng.gen_range(0..size / 512) * 512;
            write(rng, off, 512)
        }
        _ => Op::Flush,
    }
}

/// Mounts `leaf` with vhdimount, or says why not (`Ok(None)` = skip).
fn mount_leaf(leaf: &Path, at: &Path) -> Option<VhdiMount> {
    if !libvhdi_tool("vhdimount") || !Path::new("/dev/fuse").exists() {
        skip("vhdimount (libvhdi-utils) or /dev/fuse is missing; not asking libvhdi");
        return None;
    }
    match VhdiMount::new(leaf, at) {
        Ok(m) => Some(m),
        Err(e) => panic!("vhdimount cannot mount an image snaptree wrote: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Dynamic disks made by qemu-img

#[test]
fn qemu_dynamic_disks_written_by_snaptree_convert_to_the_model() {
    require_qemu!();
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempdir();
    // (name, create options, size, qemu writes first)
    let cases: [(&str, &[&str], u64, &[&str]); 2] = [
        ("chs.vhd", &[], 20 * MIB + 7 * 512, &[]),
        (
            "forced.vhd",
            &["force_size=on"],
            17 * MIB + 3 * 512,
            &["write -P 0x5a 0 3M", "write -P 0x66 9437184 100000"],
        ),
    ];
    for (name, opts, size, qemu_writes) in cases {
        let img = dir.path().join(name);
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into(), "vpc".into()];
        if !opts.is_empty() {
            args.push("-o".into());
            args.push(opts.join(","));
        }
        args.push(name.into());
        args.push(size.to_string());
        qemu_img(dir.path(), &args);
        for w in qemu_writes {
            qemu_io(&img, w);
        }
        let mut model = qemu_raw(&img);
        let ctx = format!("{name}, seed {seed}");
        let chain = open_rw(&img);
        assert_eq!(chain.size(), model.len() as u64, "{ctx}: size");
        for i in 0..240 {
            let op = random_op(&mut rng, chain.size(), 2 * MIB);
            apply(&chain, &mut model, &op);
            if i % 40 == 39 {
                // Reads through the writer see unflushed writes at once.
                check_bytes(
                    &model,
                    &read_chain(&chain),
                    format!("{ctx}: read after op {i}"),
                );
            }
        }
        chain.flush().expect("flush");
        drop(chain);
        check_bytes(&model, &qemu_raw(&img), format!("{ctx}: qemu-img convert"));
        check_bytes(
            &model,
            &read_leaf(&img),
            format!("{ctx}: snaptree reopened"),
        );
        if libvhdi_tool("vhdiinfo") {
            assert_vhdiinfo(&img);
        }
        // QEMU writes after snaptree: into blocks we allocated and new ones.
        let tail = model.len() as u64 - 70_000;
        qemu_io(&img, &format!("write -P 0x3c {tail} 65536"));
        qemu_io(&img, "write -P 0x3d 1000 5000");
        model[tail as usize..tail as usize + 65536].fill(0x3c);
        model[1000..6000].fill(0x3d);
        check_bytes(
            &model,
            &qemu_raw(&img),
            format!("{ctx}: qemu after snaptree"),
        );
        check_bytes(
            &model,
            &read_leaf(&img),
            format!("{ctx}: snaptree after qemu"),
        );
        if let Some(m) = mount_leaf(&img, &dir.path().join(format!("{name}.mnt"))) {
            let got = fs::read(m.view(1)).expect("read vhdimount view");
            check_bytes(&model, &got, format!("{ctx}: vhdimount"));
        }
    }
}

#[test]
fn created_dynamic_disks_have_the_size_qemu_sees() {
    require_qemu!();
    let dir = tempdir();
    // CHS-exact (8 MiB is not: 240x4x17), odd sizes, block sizes.
    for (i, (size, bs)) in [
        (8 * MIB, 2 << 20),
        (16_515_072, 512 << 10),
        (5 * MIB + 512, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path().join(format!("d{i}.vhd"));
        create_dynamic(&img, size, bs).expect("create_dynamic");
        let info = qemu_img(
            dir.path(),
            args!["info", "--output=json", "-f", "vpc", &img],
        );
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            info["virtual-size"].as_u64(),
            Some(size),
            "{size}/{bs}: {info}"
        );
        let layer = probe::open_layer(&img, Some(ImgFormat::Vhd), true).unwrap();
        assert_eq!(layer.virtual_size(), size);
        assert_eq!(layer.info().unwrap().cluster_size, Some(bs as u64));
        let mut data = vec![0xa5u8; 3000];
        data[0] = 1;
        layer.write(size - 3000, &data, &NoBacking).unwrap();
        layer.flush().unwrap();
        drop(layer);
        let mut expected = vec![0u8; size as usize];
        expected[(size - 3000) as usize..].copy_from_slice(&data);
        check_bytes(
            &expected,
            &qemu_raw(&img),
            format!("{size}/{bs}: qemu-img convert"),
        );
        if libvhdi_tool("vhdiinfo") {
            assert_vhdiinfo(&img);
        }
        assert!(create_dynamic(&img, size, bs).is_err(), "overwrote {img:?}");
    }
    // QEMU reads blocks under 4 KiB without their bitmap: refused.
    let err = create_dynamic(&dir.path().join("tiny.vhd"), MIB, 2048).unwrap_err();
    assert!(err.to_string().contains("4096"), "{err}");
}

// ---------------------------------------------------------------------------
// Differencing chains made by create_differencing

#[derive(Clone, Copy, Debug)]
enum Base {
    QemuFixed,
    QemuDynamic,
    Snaptree,
}

/// Builds a chain of `depth` differencing disks on a base, writing random
/// steps at every level through the crate's `Chain`, and checks it against
/// the model, `vhdiinfo` and `vhdimount`.
fn differencing_chain(depth: usize, base: Base, ops_per_level: usize) {
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempdir();
    let name = |k: usize| format!("l{k:02}.vhd");
    let path = |k: usize| dir.path().join(name(k));
    let ctx = format!("depth {depth} on {base:?}, seed {seed}");
    let size = 12 * MIB + 3 * 512;
    match base {
        Base::QemuFixed => {
            let args = args![
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
                name(0),
                size.to_string()
            ];
            qemu_img(dir.path(), args);
            qemu_io(&path(0), "write -P 0x21 0 12M");
        }
        Base::QemuDynamic => {
            qemu_img(
                dir.path(),
                args!["create", "-q", "-f", "vpc", name(0), size.to_string()],
            );
            qemu_io(&path(0), "write -P 0x22 1M 6M");
        }
        Base::Snaptree => create_dynamic(&path(0), size, 512 << 10).expect("create_dynamic"),
    }
    let mut model = read_leaf(&path(0));
    if !matches!(base, Base::Snaptree) {
        check_bytes(&qemu_raw(&path(0)), &model, format!("{ctx}: base"));
    }
    let block = if matches!(base, Base::Snaptree) {
        512 << 10
    } else {
        2 * MIB
    };
    if matches!(base, Base::Snaptree) {
        let chain = open_rw(&path(0));
        for _ in 0..20 {
            let op = random_op(&mut rng, chain.size(), block);
            apply(&chain, &mut model, &op);
        }
    }
    let mut levels = vec![model.clone()];
    for k in 1..=depth {
        create_differencing(&path(k), &path(k - 1))
            .unwrap_or_else(|e| panic!("{ctx}: create level {k}: {e}"));
        let chain = open_rw(&path(k));
        assert_eq!(chain.layers().len(), k + 1, "{ctx}: level {k}");
        check_bytes(
            &model,
            &read_chain(&chain),
            format!("{ctx}: empty level {k}"),
        );
        for _ in 0..ops_per_level {
            let op = random_op(&mut rng, chain.size(), block);
            apply(&chain, &mut model, &op);
        }
        if depth <= 8 || k % 8 == 0 || k == depth {
            check_bytes(&model, &read_chain(&chain), format!("{ctx}: level {k}"));
        }
        chain.flush().expect("flush");
        if depth <= 8 {
            levels.push(model.clone());
        }
    }
    check_bytes(
        &model,
        &read_leaf(&path(depth)),
        format!("{ctx}: reopened leaf"),
    );
    if libvhdi_tool("vhdiinfo") {
        for k in 0..=depth {
            assert_vhdiinfo(&path(k));
        }
    } else {
        skip("vhdiinfo (libvhdi-utils) is missing; not asking libvhdi");
    }
    let Some(m) = mount_leaf(&path(depth), &dir.path().join("mnt")) else {
        return;
    };
    // vhdi1 is the base, vhdi{depth+1} the leaf.
    let leaf_view = fs::read(m.view(depth + 1))
        .unwrap_or_else(|e| panic!("{ctx}: read vhdimount view: {e}\n{}", m.log_text()));
    check_bytes(&model, &leaf_view, format!("{ctx}: vhdimount of the leaf"));
    if depth <= 8 {
        for (k, expected) in levels.iter().enumerate() {
            let got = fs::read(m.view(k + 1)).expect("read vhdimount view");
            check_bytes(expected, &got, format!("{ctx}: vhdimount level {k}"));
        }
    }
}

#[test]
fn differencing_depth_1_on_a_fixed_parent() {
    require_qemu!();
    differencing_chain(1, Base::QemuFixed, 40);
}

#[test]
fn differencing_depth_8_on_a_qemu_dynamic_parent() {
    require_qemu!();
    differencing_chain(8, Base::QemuDynamic, 12);
}

/// libvhdi 20210425's vhdimount opens all 41 images of this chain.
#[test]
fn differencing_depth_40_on_a_snaptree_dynamic_parent() {
    require_qemu!();
    differencing_chain(40, Base::Snaptree, 6);
}

#[test]
fn differencing_disks_name_their_parent_for_every_reader() {
    let dir = tempdir();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let base = sub.join("base disk.vhd");
    create_dynamic(&base, 4 * MIB, 1 << 20).unwrap();
    let child = dir.path().join("child.vhd");
    create_differencing(&child, &base).unwrap();
    let layer = probe::open_layer(&child, None, false).unwrap();
    let b = layer.backing().expect("names a parent");
    assert_eq!(b.name, "sub/base disk.vhd");
    assert_eq!(b.format.as_deref(), Some("vpc"));
    let base_layer = probe::open_layer(&base, None, false).unwrap();
    assert_eq!(layer.expected_parent_id(), base_layer.unique_id());
    let bytes = fs::read(&child).unwrap();
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(has(&utf16(".\\sub\\base disk.vhd")), "W2ru");
    let abs = base.canonicalize().unwrap();
    assert!(has(&utf16(abs.to_str().unwrap())), "W2ku");
    assert!(has(b"file://./sub/base%20disk.vhd"), "MacX");
    // A parent outside the child's directory is named by absolute path.
    let other = tempdir();
    let far = other.path().join("far.vhd");
    create_differencing(&far, &child).unwrap();
    let bytes = fs::read(&far).unwrap();
    let url = format!("file://{}", child.canonicalize().unwrap().display());
    assert!(
        bytes.windows(url.len()).any(|w| w == url.as_bytes()),
        "MacX absolute"
    );
    assert!(
        create_differencing(&far, &child).is_err(),
        "overwrote {far:?}"
    );
    if libvhdi_tool("vhdiinfo") {
        let info = vhdiinfo(&child).expect("vhdiinfo");
        assert!(info.contains("base disk.vhd"), "{info}");
    }
}

// ---------------------------------------------------------------------------
// A writer killed without flushing

const CRASH_LEAF: &str = "SNAPTREE_VHD_CRASH_LEAF";
const CRASH_PLAN: &str = "SNAPTREE_VHD_CRASH_PLAN";
const CRASH_LOG: &str = "SNAPTREE_VHD_CRASH_LOG";
const CRASH_KILL_AFTER: &str = "SNAPTREE_VHD_CRASH_KILL_AFTER";

/// One planned write: disjoint from every other, so each reads wholly old
/// or wholly new after a crash. `flush` after it if set.
#[derive(Clone, Copy, Debug)]
struct Planned {
    off: u64,
    len: u64,
    data_seed: u64,
    flush: bool,
}

impl Planned {
    fn data(&self) -> Vec<u8> {
        let mut data = vec![0u8; self.len as usize];
        SmallRng::seed_from_u64(self.data_seed).fill(&mut data[..]);
        data
    }
}

/// The crash tests' writer, run by them in a child process (it does
/// nothing when run by hand): performs the plan, logs each completed
/// flush, and kills itself with SIGKILL after step `KILL_AFTER`, or waits
/// to be killed.
#[test]
#[ignore = "the crash tests run this in a child process"]
fn crash_writer() {
    let Some(leaf) = std::env::var_os(CRASH_LEAF) else {
        return;
    };
    let plan: Vec<Planned> = fs::read_to_string(std::env::var_os(CRASH_PLAN).unwrap())
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            Planned {
                off: f[0],
                len: f[1],
                data_seed: f[2],
                flush: f[3] == 1,
            }
        })
        .collect();
    let mut log = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(std::env::var_os(CRASH_LOG).unwrap())
        .unwrap();
    let kill_after: Option<usize> = std::env::var(CRASH_KILL_AFTER)
        .ok()
        .and_then(|s| s.parse().ok());
    let chain = open_rw(Path::new(&leaf));
    for (i, p) in plan.iter().enumerate() {
        chain.write_at(&p.data(), p.off).unwrap();
        if p.flush {
            chain.flush().unwrap();
            writeln!(log, "{i}").unwrap();
        }
        if kill_after == Some(i) {
            // SAFETY: kill on our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// How the writer dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Right after this step.
    After(usize),
    /// After this many milliseconds, wherever it is.
    Timed(u64),
}

/// Runs the plan on `leaf` in a child process until it is killed; returns
/// the last step whose flush completed.
fn run_killed_writer(leaf: &Path, plan: &[Planned], death: Death, ctx: &str) -> Option<usize> {
    let dir = leaf.parent().unwrap();
    let plan_file = dir.join("plan.txt");
    let log_file = dir.join("flushed.log");
    let text: String = plan
        .iter()
        .map(|p| format!("{} {} {} {}\n", p.off, p.len, p.data_seed, p.flush as u8))
        .collect();
    fs::write(&plan_file, text).unwrap();
    let _ = fs::remove_file(&log_file);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "crash_writer",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CRASH_LEAF, leaf)
    .env(CRASH_PLAN, &plan_file)
    .env(CRASH_LOG, &log_file)
    .stdout(std::process::Stdio::null());
    if let Death::After(k) = death {
        cmd.env(CRASH_KILL_AFTER, k.to_string());
    }
    let mut child = cmd.spawn().expect("start the writer");
    let status = match death {
        Death::After(_) => {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(s) = child.try_wait().unwrap() {
                    break s;
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{ctx}: writer did not kill itself within 60 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Death::Timed(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            child.kill().unwrap();
            child.wait().unwrap()
        }
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{ctx}: writer ended with {status}"
    );
    fs::read_to_string(&log_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .max()
}

/// Every planned write reads new (flushed), old (never run), or else old
/// or new in each sector (an unflushed write lands in place where this file
/// held the sectors already, and is lost where it did not, as on any disk);
/// everything else reads as `before`.
fn check_after_crash(
    got: &[u8],
    before: &[u8],
    plan: &[Planned],
    flushed: Option<usize>,
    ran: Option<usize>,
    what: &str,
) {
    let mut rest = got.to_vec();
    for (i, p) in plan.iter().enumerate() {
        let r = p.off as usize..(p.off + p.len) as usize;
        let new = p.data();
        let is_new = got[r.clone()] == new[..];
        let is_old = got[r.clone()] == before[r.clone()];
        if flushed.is_some_and(|f| i <= f) {
            assert!(
                is_new,
                "{what}: step {i} {p:?} was flushed but does not read new"
            );
        } else if ran.is_some_and(|k| i > k) {
            assert!(
                is_old,
                "{what}: step {i} {p:?} never ran but does not read old"
            );
        } else if !is_new && !is_old {
            let mut at = r.start;
            while at < r.end {
                let end = ((at / 512 + 1) * 512).min(r.end);
                let k = at - r.start..end - r.start;
                assert!(
                    got[at..end] == new[k] || got[at..end] == before[at..end],
                    "{what}: step {i} {p:?} reads neither old nor new in sector {}",
                    at / 512
                );
                at = end;
            }
        }
        rest[r.clone()].copy_from_slice(&before[r]);
    }
    check_bytes(before, &rest, format!("{what}: bytes no step wrote"));
}

#[test]
fn killed_writers_leave_valid_images() {
    require_qemu!();
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let size = 8 * MIB;
    let slot = 64 * 1024;
    let rounds = [
        (false, Death::After(20)),
        (false, Death::Timed(rng.gen_range(3..60))),
        (true, Death::After(33)),
        (true, Death::Timed(rng.gen_range(3..60))),
    ];
    for (r, (differencing, death)) in rounds.into_iter().enumerate() {
        let dir = tempdir();
        let ctx = format!("round {r} (differencing: {differencing}, {death:?}), seed {seed}");
        let victim = dir.path().join("victim.vhd");
        let base = dir.path().join("base.vhd");
        // The victim already holds flushed data, so steps write into
        // existing blocks as well as new ones.
        let prefill = |path: &Path, rng: &mut SmallRng, n: usize| {
            let chain = open_rw(path);
            let mut scratch = read_chain(&chain);
            for _ in 0..n {
                let op = random_op(rng, size, 256 << 10);
                apply(&chain, &mut scratch, &op);
            }
            chain.flush().unwrap();
        };
        if differencing {
            create_dynamic(&base, size, 256 << 10).unwrap();
            prefill(&base, &mut rng, 60);
            create_differencing(&victim, &base).unwrap();
        } else {
            create_dynamic(&victim, size, 256 << 10).unwrap();
        }
        prefill(&victim, &mut rng, 15);
        let before = read_leaf(&victim);
        let qemu_before = qemu_raw(&victim);
        let mut slots: Vec<u64> = (0..size / slot).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.gen_range(0..=i));
        }
        let plan: Vec<Planned> = slots[..120]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let len = match i % 3 {
                    0 => rng.gen_range(1..512),
                    1 => rng.gen_range(1..slot),
                    _ => slot,
                };
                Planned {
                    off: s * slot + rng.gen_range(0..=slot - len),
                    len,
                    data_seed: rng.gen(),
                    flush: i % 7 == 6,
                }
            })
            .collect();
        let flushed = run_killed_writer(&victim, &plan, death, &ctx);
        let ran = match death {
            Death::After(k) => Some(k),
            Death::Timed(_) => None,
        };
        check_after_crash(
            &read_leaf(&victim),
            &before,
            &plan,
            flushed,
            ran,
            &format!("{ctx}: snaptree"),
        );
        // QEMU must still open it (for a differencing disk it ignores the
        // parent, so only a dynamic disk's bytes are comparable).
        let qemu_after = qemu_raw(&victim);
        if !differencing {
            check_after_crash(
                &qemu_after,
                &qemu_before,
                &plan,
                flushed,
                ran,
                &format!("{ctx}: qemu-img"),
            );
        }
        if libvhdi_tool("vhdiinfo") {
            assert_vhdiinfo(&victim);
        }
        // And it stays writable: new blocks go after whatever was leaked.
        let now = read_leaf(&victim);
        let mut model = now.clone();
        let chain = open_rw(&victim);
        for _ in 0..10 {
            let op = random_op(&mut rng, size, 256 << 10);
            apply(&chain, &mut model, &op);
        }
        chain.flush().unwrap();
        drop(chain);
        check_bytes(
            &model,
            &read_leaf(&victim),
            format!("{ctx}: written after the crash"),
        );
        if !differencing {
            check_bytes(
                &model,
                &qemu_raw(&victim),
                format!("{ctx}: qemu after the crash"),
            );
        }
        if libvhdi_tool("vhdiinfo") {
            assert_vhdiinfo(&victim);
        }
    }
}

// ---------------------------------------------------------------------------
// Bad input, read-only, concurrency

#[test]
fn damaged_bat_refuses_writing_and_changes_nothing() {
    let dir = tempdir();
    let img = dir.path().join("bad.vhd");
    create_dynamic(&img, 8 * MIB, 1 << 20).unwrap();
    {
        let chain = open_rw(&img);
        chain.write_at(&[7u8; 5000], 100).unwrap();
        chain.flush().unwrap();
    }
    let good = fs::read(&img).unwrap();
    let entry =
        |b: &[u8], i: usize| u32::from_be_bytes(b[1536 + 4 * i..1540 + 4 * i].try_into().unwrap());
    assert_ne!(entry(&good, 0), u32::MAX, "block 0 allocated");
    // (what, value of BAT entry 1, opens read-only)
    let cases = [
        ("past EOF", (good.len() as u32 / 512) + 100, false),
        ("block 0 again", entry(&good, 0), true),
    ];
    for (what, value, readable) in cases {
        let mut bad = good.clone();
        bad[1540..1544].copy_from_slice(&value.to_be_bytes());
        fs::write(&img, &bad).unwrap();
        let err = match probe::open_layer(&img, Some(ImgFormat::Vhd), true) {
            Ok(_) => panic!("{what}: opened for writing"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("bad.vhd") && err.contains("offset 1540"),
            "{what}: {err}"
        );
        let chain_err = match Chain::open(
            &img,
            &OpenOptions {
                writable: true,
                ..Default::default()
            },
        ) {
            Ok(_) => panic!("{what}: chain opened for writing"),
            Err(e) => e.to_string(),
        };
        assert!(chain_err.contains("bad.vhd"), "{what}: {chain_err}");
        assert_eq!(
            probe::open_layer(&img, Some(ImgFormat::Vhd), false).is_ok(),
            readable,
            "{what}"
        );
        assert!(fs::read(&img).unwrap() == bad, "{what}: the file changed");
    }
    // Read-only layers refuse writes, naming the file.
    fs::write(&img, &good).unwrap();
    let ro = probe::open_layer(&img, Some(ImgFormat::Vhd), false).unwrap();
    assert!(!ro.is_writable());
    let err = ro.write(0, &[1], &NoBacking).unwrap_err().to_string();
    assert!(
        err.contains("bad.vhd") && err.contains("read-only"),
        "{err}"
    );
    let err = ro.write_zeroes(0, 512, &NoBacking).unwrap_err().to_string();
    assert!(err.contains("read-only"), "{err}");
    drop(ro);
    let rw = probe::open_layer(&img, Some(ImgFormat::Vhd), true).unwrap();
    let err = rw
        .write(8 * MIB - 10, &[1; 11], &NoBacking)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.vhd") && err.contains("outside"), "{err}");
    drop(rw);
    assert!(
        fs::read(&img).unwrap() == good,
        "a refused write changed the file"
    );
}

/// XCP's batmap is left alone (bits stay true as blocks only fill up), but
/// a block it marks full that the BAT lacks is never allocated.
#[test]
fn xcp_batmap_is_kept_true() {
    let dir = tempdir();
    let img = dir.path().join("xcp.vhd");
    let size = 4 * MIB;
    create_dynamic(&img, size, 1 << 20).unwrap();
    // create_dynamic's layout: footer copy, header, BAT at 1536 (one
    // sector), footer at 2048. Insert a batmap header and map (XCP puts
    // them in the sector after the BAT), then block 0, full, then the footer.
    let made = fs::read(&img).unwrap();
    let mut footer = made[2048..2560].to_vec();
    let retag = |f: &mut [u8]| {
        f[28..32].copy_from_slice(b"tap\0");
        f[32..36].copy_from_slice(&0x0001_0002u32.to_be_bytes());
        f[64..68].fill(0);
        let sum = !f.iter().fold(0u32, |s, b| s.wrapping_add(*b as u32));
        f[64..68].copy_from_slice(&sum.to_be_bytes());
    };
    retag(&mut footer);
    let mut b = made[..2048].to_vec();
    b[..512].copy_from_slice(&footer);
    let mut map = vec![0u8; 512];
    map[0] = 0x80 | 0x20; // block 0 (true) and block 2 (unallocated: wrong)
    let mut hdr = vec![0u8; 512];
    hdr[0..8].copy_from_slice(b"tdbatmap");
    hdr[8..16].copy_from_slice(&2560u64.to_be_bytes());
    hdr[16..20].copy_from_slice(&1u32.to_be_bytes());
    hdr[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    let sum = !map.iter().fold(0u32, |s, x| s.wrapping_add(*x as u32));
    hdr[24..28].copy_from_slice(&sum.to_be_bytes());
    b.extend_from_slice(&hdr);
    b.extend_from_slice(&map);
    b[1536..1540].copy_from_slice(&(3072u32 / 512).to_be_bytes());
    b.extend_from_slice(&[0xff; 512]);
    b.extend(std::iter::repeat_n(0x42u8, MIB as usize));
    b.extend_from_slice(&footer);
    fs::write(&img, &b).unwrap();

    let mut model = vec![0u8; size as usize];
    model[..MIB as usize].fill(0x42);
    let layer = probe::open_layer(&img, Some(ImgFormat::Vhd), true).unwrap();
    let features = layer.info().unwrap().features.join(", ");
    assert!(features.contains("XCP batmap"), "{features}");
    for (off, len) in [(1000u64, 3000usize), (MIB + 700, 5000)] {
        layer.write(off, &vec![0x17; len], &NoBacking).unwrap();
        model[off as usize..off as usize + len].fill(0x17);
    }
    layer.flush().unwrap();
    let before = fs::read(&img).unwrap();
    let err = layer
        .write(2 * MIB + 5, &[1, 2, 3], &NoBacking)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("xcp.vhd") && err.contains("batmap") && err.contains("offset 2560"),
        "{err}"
    );
    layer.flush().unwrap();
    drop(layer);
    let after = fs::read(&img).unwrap();
    assert!(after == before, "a refused write changed the file");
    assert_eq!(after[2048..3072], b[2048..3072], "the batmap changed");
    check_bytes(&model, &read_leaf(&img), "snaptree after writes");
    if libvhdi_tool("vhdiinfo") {
        assert_vhdiinfo(&img);
    }
}

/// Readers racing a writer see, byte by byte, the parent's bytes or the
/// write's, never a block's unwritten data area or a stale bitmap.
#[test]
fn reads_during_writes_see_old_or_new_bytes() {
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempdir();
    let base = dir.path().join("base.vhd");
    let size = 8 * MIB;
    create_dynamic(&base, size, 256 << 10).unwrap();
    {
        let chain = open_rw(&base);
        chain.write_at(&vec![0xb1; size as usize], 0).unwrap();
    }
    let leaf = dir.path().join("leaf.vhd");
    create_differencing(&leaf, &base).unwrap();
    let chain = open_rw(&leaf);
    let slot = 32 * 1024u64;
    let mut slots: Vec<u64> = (0..size / slot).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.gen_range(0..=i));
    }
    let pattern = |s: u64| 0x10 + (s % 0x80) as u8;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..2u64 {
            let (chain, done) = (&chain, &done);
            scope.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ (t + 1));
                let mut buf = vec![0u8; slot as usize];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let s = rng.gen_range(0..size / slot);
                    chain.read_at(&mut buf, s * slot).unwrap();
                    if let Some(k) = buf.iter().position(|b| *b != 0xb1 && *b != pattern(s)) {
                        panic!("seed {seed}: slot {s} byte {k} reads {:#x}", buf[k]);
                    }
                }
            });
        }
        for (i, s) in slots.iter().enumerate() {
            let len = rng.gen_range(1..=slot);
            let off = s * slot + rng.gen_range(0..=slot - len);
            chain
                .write_at(&vec![pattern(*s); len as usize], off)
                .unwrap();
            if i % 16 == 15 {
                chain.flush().unwrap();
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}
