//! The valid images the tests corrupt, built by qemu-img and qemu-io (the
//! oracle for what "valid" means), and the few other files they need.
//!
//! Why paths rather than `common::Chain`: the cases copy, patch, rebase and
//! clone image files by absolute path, thousands of them for the deep
//! chain, and a case's copy must sit next to its source so that relative
//! backing names resolve the same way.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use crate::common::{describe_output, note, run, run_unchecked};

/// A fresh temp directory for one test's images.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("snaptree-bad-input-")
        .tempdir()
        .expect("create temp dir")
}

/// Copies `src` to `dir/name` and returns the new path.
pub fn copy_to(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst).expect("copy fixture");
    dst
}

/// `qemu-img ARGS`; panics with the command and its output unless it
/// succeeds.
fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-img ARGS`, which may fail: `Err` describes the failure.
pub fn try_qemu_img<S: AsRef<OsStr>>(args: &[S]) -> Result<Output, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    let out = run_unchecked(&mut cmd);
    if out.status.success() {
        Ok(out)
    } else {
        Err(describe_output(&cmd, &out))
    }
}

/// `qemu-img create -f qcow2 [-o opts] path size`.
pub fn create_qcow2(path: &Path, opts: &str, size: &str) {
    let mut args = Vec::from(args!["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        args.extend(args!["-o", opts]);
    }
    args.extend(args![path, size]);
    qemu_img(&args);
}

/// `qemu-img create -f qcow2 -b backing -F qcow2 [-o opts] path` (the
/// backing name is stored as given; qemu-img resolves it relative to the
/// overlay itself).
pub fn create_overlay(path: &Path, backing_name: &str, opts: &str) {
    let mut args = Vec::from(args![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing_name,
        "-F",
        "qcow2"
    ]);
    if !opts.is_empty() {
        args.extend(args!["-o", opts]);
    }
    args.push(path.into());
    qemu_img(&args);
}

/// Runs qemu-io commands (`-c` each) against a qcow2 image.
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut args = Vec::from(args!["-f", "qcow2"]);
    for c in cmds {
        args.extend(args!["-c", c]);
    }
    args.push(path.into());
    run(Command::new("qemu-io").args(&args));
}

/// `qemu-img convert -O raw img out`.
pub fn convert_to_raw(img: &Path, out: &Path) {
    qemu_img(&args!["convert", "-O", "raw", img, out]);
}

/// A 1 MiB qcow2 (64 KiB clusters) with data at guest 0 and 512 KiB, so the
/// first L1 entry and its L2 table exist.
pub fn image_with_data(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let path = dir.join(name);
    create_qcow2(&path, opts, "1M");
    qemu_io(&path, &["write -P 0xab 0 64k", "write -P 0xcd 512k 4k"]);
    path
}

/// Creates `dir/name`, a qcow2 whose guest range 128 KiB.. is unallocated
/// (so reads fall through) and whose backing file is `reference` (raw).
pub fn overlay_on(dir: &Path, name: &str, reference: &str) -> PathBuf {
    let img = image_with_data(dir, name, "");
    rebase_unsafe_fmt(&img, reference, "raw");
    img
}

/// `qemu-img rebase -u` to a qcow2 backing file.
pub fn rebase_unsafe(img: &Path, backing_name: &str) {
    rebase_unsafe_fmt(img, backing_name, "qcow2");
}

/// `qemu-img rebase -u`: rewrites the backing reference without opening it.
pub fn rebase_unsafe_fmt(img: &Path, backing_name: &str, format: &str) {
    qemu_img(&args![
        "rebase",
        "-u",
        "-b",
        backing_name,
        "-F",
        format,
        img
    ]);
}

/// `qemu-img create` of a 1 MiB LUKS-encrypted qcow2 at `path`; `Err` says
/// why this qemu-img cannot.
pub fn create_luks_qcow2(path: &Path) -> Result<(), String> {
    try_qemu_img(&args![
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=snaptree-test",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path,
        "1M",
    ])
    .map(drop)
}

/// Makes a FIFO at `path`; false if `mkfifo` fails.
pub fn make_fifo(path: &Path) -> bool {
    Command::new("mkfifo")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `qemu-img convert` reads every byte of `img` (run on a copy, so
/// qemu can never flag or repair the original).
pub fn qemu_reads_ok(img: &Path) -> bool {
    let dir = tempdir();
    let copy = copy_to(img, dir.path(), "copy.qcow2");
    let out = dir.path().join("out.raw");
    try_qemu_img(&args!["convert", "-O", "raw", copy, out]).is_ok()
}

/// Converts `raw` to a compressed qcow2 with the given compression type;
/// returns None (after a note) when this qemu-img cannot.
pub fn compressed_image(dir: &Path, raw: &Path, ctype: &str) -> Option<PathBuf> {
    let img = dir.join(format!("{ctype}.qcow2"));
    let opts = format!("compression_type={ctype}");
    let made = try_qemu_img(&args![
        "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img,
    ]);
    match made {
        Ok(_) => Some(img),
        Err(why) => {
            note(format_args!("note: no {ctype} compression here\n{why}"));
            None
        }
    }
}

/// A valid compressed stream that inflates to far less than a cluster
/// (qemu treats that as an I/O error too).
pub fn short_stream(ctype: &str) -> Vec<u8> {
    match ctype {
        "zlib" => {
            use flate2::write::DeflateEncoder;
            use std::io::Write;
            let mut enc = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(&[0x5a; 100]).unwrap();
            enc.finish().unwrap()
        }
        _ => zstd::bulk::compress(&[0x5a; 100], 3).unwrap(),
    }
}
