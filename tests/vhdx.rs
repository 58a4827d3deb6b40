//! VHDX against real peers.
//!
//! qemu-img and qemu-io make dynamic and fixed VHDXs and write to them;
//! `snaptree export` must equal `qemu-img convert -f vhdx -O raw` byte for
//! byte. `qemu-img map` says nothing about a VHDX beyond "present" (QEMU's
//! driver reports no block status), so maps are compared on that, and every
//! data extent snaptree maps is checked against the file: the bytes at its
//! host offset are the flattened disk's. What qemu-img cannot make
//! (4096-byte logical sectors, differencing disks, logs left unapplied) is
//! edited into qemu-img's own images from the spec (`vhdx/spec.rs`) and
//! judged by libvhdi or by QEMU's own log replay (`qemu-img check -r all`).

#[macro_use]
mod common;
#[path = "vhdx/spec.rs"]
mod spec;
#[path = "common/vhd_peers.rs"]
mod vhd_peers;

use common::qio::{discard, write, zero};
use common::*;
use serde_json::Value;
use snaptree::chain::{Chain, OpenOptions};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

fn tempdir() -> TempDir {
    TempDir::with_prefix("snaptree-vhdx-").expect("temp dir")
}

/// `qemu-img create -q -f vhdx [-o OPTS] NAME SIZE` in `dir`.
fn create(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size = size.to_string();
    args.extend([name, &size]);
    qemu_img(dir, &args);
    dir.join(name)
}

/// `qemu-io -f vhdx -c CMD... NAME` in `dir`.
fn qemu_io(dir: &Path, name: &str, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.current_dir(dir).args(["-f", "vhdx"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(name));
}

/// `qemu-img convert -f vhdx -O raw NAME NAME.qemu.raw`.
fn qemu_raw(dir: &Path, name: &str) -> PathBuf {
    let out = format!("{name}.qemu.raw");
    qemu_img(dir, ["convert", "-f", "vhdx", "-O", "raw", name, &out]);
    dir.join(out)
}

/// `snaptree export IMG IMG.snaptree.raw`.
fn snaptree_raw(img: &Path) -> PathBuf {
    let out = PathBuf::from(format!("{}.snaptree.raw", img.display()));
    snaptree(args!["export", "--quiet", "--force", img, out]);
    out
}

fn snaptree_info(img: &Path) -> Value {
    serde_json::from_slice(&snaptree(args!["info", "--json", img]).stdout).expect("info JSON")
}

/// Export, map and size of `name` against qemu's.
fn assert_like_qemu(dir: &Path, name: &str) {
    let img = dir.join(name);
    let flat = qemu_raw(dir, name);
    assert_same_file(&flat, &snaptree_raw(&img));
    assert_map_like_qemu(dir, name, &flat);
    let qinfo: Value = serde_json::from_slice(
        &qemu_img(dir, ["info", "--output=json", "-f", "vhdx", name]).stdout,
    )
    .expect("qemu-img info JSON");
    let info = snaptree_info(&img);
    assert_eq!(info["virtual_size"], qinfo["virtual-size"], "{info}");
    assert_eq!(info["chain"][0]["format"], "vhdx", "{info}");
}

/// qemu-img's map says only "present at depth 0" for a VHDX; ours must
/// agree on that, and its data extents must point at the right bytes.
fn assert_map_like_qemu(dir: &Path, name: &str, flat: &Path) {
    let img = dir.join(name);
    let size = fs::metadata(flat).expect("flat").len();
    let parse = |out: std::process::Output| {
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        parse_map(&json).unwrap_or_else(|e| panic!("map: {e}\n{json}"))
    };
    let qemu = parse(qemu_img(dir, ["map", "--output=json", "-f", "vhdx", name]));
    let ours = parse(snaptree(args!["map", "--output", "json", img]));
    let shape = |m: &[MapEntry]| {
        let m: Vec<MapEntry> = m
            .iter()
            .map(|e| MapEntry {
                zero: false,
                data: false,
                offset: None,
                ..e.clone()
            })
            .collect();
        extents(&m, size).unwrap_or_else(|e| panic!("{e}"))
    };
    let d = diff_extents(&shape(&qemu), &shape(&ours));
    assert!(
        d.is_empty(),
        "{name}: present/depth differ:\n{}",
        format_mismatches(&d)
    );
    let (file, flat) = (fs::File::open(&img).unwrap(), fs::File::open(flat).unwrap());
    for e in ours.iter().filter(|e| e.data) {
        let off = e.offset.expect("data extents have offsets");
        let (mut a, mut b) = (vec![0u8; e.length as usize], vec![0u8; e.length as usize]);
        file.read_exact_at(&mut a, off).expect("read image");
        flat.read_exact_at(&mut b, e.start).expect("read flat");
        assert!(
            a == b,
            "{name}: bytes at host {off} differ from guest {} ({e:?})",
            e.start
        );
    }
}

/// Writes at offsets that matter for block size `bs` and disk size `size`.
fn writes_for(bs: u64, size: u64) -> Vec<String> {
    let mut w = vec![write(0x11, 0, 512), write(0x22, 1000, 3000)];
    w.push(write(0x33, bs - 4096, 8192));
    if size > 3 * bs {
        w.push(write(0x44, 2 * bs, bs));
        w.push(zero(2 * bs + 4096, 8192));
        w.push(discard(2 * bs, bs));
        w.push(write(0x55, 2 * bs + 100, 300));
    }
    w.push(write(0x66, size - 1000, 1000));
    w
}

#[test]
fn dynamic_and_fixed_images_read_like_qemu() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    let cases: [(&str, u64, &str, u64); 6] = [
        ("b1m.vhdx", 64 * MIB, "block_size=1M", MIB),
        ("b32m.vhdx", 100 * MIB + 512, "block_size=32M", 32 * MIB),
        ("b256m.vhdx", 600 * MIB, "block_size=256M", 256 * MIB),
        ("log4m.vhdx", 40 * MIB, "block_size=1M,log_size=4M", MIB),
        ("default.vhdx", 3 * 1024 * MIB, "", 32 * MIB),
        (
            "fixed.vhdx",
            24 * MIB,
            "subformat=fixed,block_size=8M",
            8 * MIB,
        ),
    ];
    for (name, size, opts, bs) in cases {
        create(d, name, size, opts);
        qemu_io(d, name, &writes_for(bs, size));
        assert_like_qemu(d, name);
    }
    // Untouched images read as zeros and map as zero (dynamic) or data.
    create(d, "empty.vhdx", 10 * MIB, "");
    assert_like_qemu(d, "empty.vhdx");
}

/// QEMU refuses 4096-byte logical sectors, so the image is qemu-img's with
/// that one metadata item changed; with fewer blocks than a chunk the BAT
/// layout is the same, so the disk must read as before, and libvhdi must
/// see 4096-byte sectors.
#[test]
fn logical_sector_4096() {
    require_qemu!();
    let dir = tempdir();
    let d = dir.path();
    create(d, "s.vhdx", 48 * MIB, "block_size=1M");
    qemu_io(d, "s.vhdx", &writes_for(MIB, 48 * MIB));
    let flat = qemu_raw(d, "s.vhdx");
    let mut v = spec::Vhdx::load(&d.join("s.vhdx"));
    v.set_logical_sector(4096);
    v.save(&d.join("s4k.vhdx"));
    assert_same_file(&flat, &snaptree_raw(&d.join("s4k.vhdx")));
    let info = snaptree_info(&d.join("s4k.vhdx"));
    assert!(info.to_string().contains("logical sector 4096"), "{info}");
    if !vhd_peers::libvhdi_tool("vhdiinfo") {
        return skip("vhdiinfo is not installed (apt-get install libvhdi-utils)");
    }
    let text = vhd_peers::vhdiinfo(&d.join("s4k.vhdx")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        text.contains("Bytes per sector\t: 4096 bytes"),
        "vhdiinfo:\n{text}"
    );
}

/// Reads all of the chain of `img` through the library.
fn chain_bytes(img: &Path) -> Result<Vec<u8>, String> {
    let chain = Chain::open(img, &OpenOptions::default()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

#[path = "vhdx/diff.rs"]
mod diff;
#[path = "vhdx/hostile.rs"]
mod hostile;
#[path = "vhdx/log.rs"]
mod log;
