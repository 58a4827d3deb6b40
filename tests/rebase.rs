//! `set_backing`, the commit point of a stream merge, against qemu-img.
//!
//! Chains are built by qemu-img/qemu-io so that the leaf already holds every
//! cluster of the image being removed (what the stream copy leaves behind);
//! `set_backing` then points the leaf past it. qemu is the oracle: `qemu-img
//! info` must show the new backing file and format, `qemu-img check` must
//! find the image clean, and `qemu-img convert -O raw` must give exactly the
//! bytes it gave before. Where qemu-img can make the same change itself
//! (`qemu-img rebase -u`), the two files must be byte-identical.

#[macro_use]
mod common;
#[path = "common/qcow2_file.rs"]
mod qcow2_file;

use common::qio::{write, zero};
use common::*;
use qcow2_file::{be, bytes_at};
use serde_json::Value;
use snaptree::image::qcow2::rebase::set_backing;
use std::path::{Path, PathBuf};

const SIZE: u64 = 4 * MIB;

/// `qemu-img info --output=json` of a qcow2 file in the chain directory.
fn info(chain: &Chain, name: &str) -> Value {
    image_info(chain.dir(), name, Format::Qcow2)
}

/// Panics unless `qemu-img check` finds no errors, leaks or corruptions.
fn assert_check_clean(chain: &Chain, name: &str) {
    let out = qemu_img(chain.dir(), ["check", "--output=json", "-f", "qcow2", name]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img check JSON");
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = v.get(key).and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check of {name}: {key} = {n}\n{v}");
    }
}

/// The guest view of `name` (through its backing chain) as a raw file
/// `OUT` in the chain directory.
fn export_raw(chain: &Chain, name: &str, out: &str) -> PathBuf {
    qcow2_file::export_raw(chain.dir(), name, out)
}

/// The first `len` bytes of a file.
fn head(path: &Path, len: usize) -> Vec<u8> {
    bytes_at(path, 0, len)
}

/// (backing_file_offset, backing_file_size) from the header.
fn backing_fields(path: &Path) -> (u64, u32) {
    let h = head(path, 20);
    (be(&h, 8, 8), be(&h, 16, 4) as u32)
}

/// Asserts qemu-img sees `name` with backing file `backing` (format qcow2)
/// or none.
fn assert_backing(chain: &Chain, name: &str, backing: Option<&str>) {
    let v = info(chain, name);
    match backing {
        Some(b) => {
            assert_eq!(v["backing-filename"].as_str(), Some(b), "{v}");
            assert_eq!(v["backing-filename-format"].as_str(), Some("qcow2"), "{v}");
        }
        None => {
            assert!(v.get("backing-filename").is_none(), "{v}");
            assert!(v.get("backing-filename-format").is_none(), "{v}");
        }
    }
}

/// Points top.qcow2 at `backing` (format qcow2; `None`: no backing file)
/// with `set_backing`, then asks qemu: `qemu-img info` shows the new
/// backing, `qemu-img check` finds the image clean, and the guest view
/// (exported as `out`) is the file `before` still.
fn set_backing_judged(chain: &Chain, backing: Option<&str>, before: &Path, out: &str) {
    let top = chain.file("top.qcow2");
    set_backing(&top, backing.map(|b| (b, "qcow2"))).unwrap_or_else(|e| panic!("{e}"));
    assert_backing(chain, "top.qcow2", backing);
    assert_check_clean(chain, "top.qcow2");
    assert_same_file(before, &export_raw(chain, "top.qcow2", out));
}

/// [`set_backing_judged`] (exporting `after.raw`), and top.qcow2 must then
/// be byte for byte the file `qemu-img rebase -u` makes of a copy of it
/// taken before.
fn set_backing_as_qemu_does(chain: &Chain, backing: Option<&str>, before: &Path) {
    let top = chain.file("top.qcow2");
    let copy = chain.file("qemu.qcow2");
    std::fs::copy(&top, &copy).unwrap();
    set_backing_judged(chain, backing, before, "after.raw");
    let mut rebase = vec!["rebase", "-u", "-f", "qcow2", "-b", backing.unwrap_or("")];
    if backing.is_some() {
        rebase.extend(["-F", "qcow2"]);
    }
    rebase.push("qemu.qcow2");
    qemu_img(chain.dir(), rebase);
    assert_same_file(&copy, &top);
}

/// base <- mid <- top, where top also holds every cluster mid holds (the
/// state right after streaming mid into top), all with qcow2 options `opts`.
fn streamed_chain(opts: &[&str]) -> Chain {
    let mut c = Chain::new();
    c.base("base.qcow2", Format::Qcow2, SIZE, opts)
        .io(&[write(0xa1, 0, MIB), write(0xa2, 3 * MIB, 512 * KIB)]);
    let mid = [
        write(0xb1, 512 * KIB, MIB),
        write(0xb2, 2 * MIB, 64 * KIB),
        zero(3 * MIB + 128 * KIB, 64 * KIB),
    ];
    c.overlay("mid.qcow2", None, opts).io(&mid);
    // top: mid's clusters first (the stream copy), then top's own writes.
    c.overlay("top.qcow2", None, opts)
        .io(&mid)
        .io(&[write(0xc1, 1792 * KIB, 128 * KIB), write(0xc2, 5000, 3000)]);
    c
}

/// The stream commit on a chain made with `opts`: top is switched from mid
/// to base, and qemu must see the same bytes, the new backing, a clean
/// image, and the same file `qemu-img rebase -u` makes.
fn stream_commit(opts: &[&str]) -> Chain {
    let chain = streamed_chain(opts);
    let before = export_raw(&chain, "top.qcow2", "before.raw");
    set_backing_as_qemu_does(&chain, Some("base.qcow2"), &before);
    chain
}

#[test]
fn stream_commit_switches_to_grandparent() {
    require_qemu!();
    stream_commit(&[]);
}

#[test]
fn stream_commit_v2_image() {
    require_qemu!();
    let chain = stream_commit(&["compat=0.10"]);
    assert_eq!(
        info(&chain, "top.qcow2")["format-specific"]["data"]["compat"].as_str(),
        Some("0.10")
    );
}

#[test]
fn stream_commit_extended_l2_image() {
    require_qemu!();
    stream_commit(&["extended_l2=on"]);
}

#[test]
fn stream_commit_4k_clusters() {
    require_qemu!();
    stream_commit(&["cluster_size=4096"]);
}

#[test]
fn stream_commit_512_byte_clusters() {
    require_qemu!();
    stream_commit(&["cluster_size=512"]);
}

#[test]
fn remove_unused_backing() {
    require_qemu!();
    let mut chain = Chain::new();
    chain
        .base("base.qcow2", Format::Qcow2, SIZE, &[])
        .io(&[write(0x11, 0, SIZE)]);
    chain.overlay("top.qcow2", None, &[]).io(&[
        write(0x22, 0, SIZE),
        zero(MIB, 256 * KIB),
        write(0x33, 100, 200),
    ]);
    let before = export_raw(&chain, "top.qcow2", "before.raw");
    set_backing_as_qemu_does(&chain, None, &before);
    assert_eq!(backing_fields(&chain.file("top.qcow2")), (0, 0));

    // And back: a root image gains a backing file (unused, top is full).
    set_backing_judged(&chain, Some("base.qcow2"), &before, "again.raw");
}

#[test]
fn name_too_long_to_fit_writes_nothing() {
    require_qemu!();
    // 512-byte clusters: the header block is 512 bytes, so a 400-byte name
    // (valid for qcow2) cannot fit.
    let chain = streamed_chain(&["cluster_size=512"]);
    let top = chain.file("top.qcow2");
    let original = read_file(&top);
    let long = format!("{}.qcow2", "n".repeat(394));

    let err = set_backing(&top, Some((&long, "qcow2"))).expect_err("name cannot fit");
    let msg = err.to_string();
    assert!(msg.contains(&*top.to_string_lossy()), "{msg}");
    assert!(msg.contains("does not fit"), "{msg}");
    assert!(msg.contains("400 bytes"), "{msg}");
    assert!(read_file(&top) == original, "file changed: {msg}");

    // Invalid names and formats are refused before anything is read.
    let too_long = "x".repeat(1024);
    for (name, format) in [
        ("", "qcow2"),
        (too_long.as_str(), "qcow2"),
        ("base\0.qcow2", "qcow2"),
        ("base.qcow2", ""),
        ("base.qcow2", "a-format-name-of-16"),
    ] {
        let err = set_backing(&top, Some((name, format))).expect_err("invalid name");
        assert!(err.to_string().contains(&*top.to_string_lossy()), "{err}");
        assert!(read_file(&top) == original, "file changed: {err}");
    }
    assert_backing(&chain, "top.qcow2", Some("mid.qcow2"));
    assert_check_clean(&chain, "top.qcow2");
}

#[test]
fn refuses_dirty_image() {
    require_qemu!();
    let mut chain = Chain::new();
    chain.base("base.qcow2", Format::Qcow2, SIZE, &[]);
    chain
        .overlay("top.qcow2", None, &["lazy_refcounts=on"])
        .io_then_abort(&[write(0x44, 0, MIB)]);
    let top = chain.file("top.qcow2");
    assert_eq!(
        qcow2_incompatible_features(&top) & 1,
        1,
        "dirty bit not set"
    );
    let original = read_file(&top);
    let err = set_backing(&top, None).expect_err("dirty image");
    assert!(err.to_string().contains("dirty"), "{err}");
    assert!(read_file(&top) == original, "file changed: {err}");
}

#[test]
fn long_then_short_name_round_trip() {
    require_qemu!();
    let chain = streamed_chain(&[]);
    let top = chain.file("top.qcow2");
    let before = export_raw(&chain, "top.qcow2", "before.raw");

    // A long relative name: nested directories (each name under the
    // 255-byte limit) ending in a symlink to base.qcow2.
    let mut rel = String::new();
    for i in 0..4 {
        rel.push_str(&format!("d{i}-{}/", "l".repeat(200)));
    }
    std::fs::create_dir_all(chain.file(&rel)).unwrap();
    let long = format!("{rel}base-{}.qcow2", "k".repeat(180));
    std::os::unix::fs::symlink(chain.file("base.qcow2"), chain.file(&long)).unwrap();
    assert!(long.len() > 900 && long.len() <= 1023, "{}", long.len());

    set_backing_judged(&chain, Some(&long), &before, "long.raw");
    let (off, size) = backing_fields(&top);
    assert_eq!(size as usize, long.len());
    let long_end = off as usize + long.len();

    set_backing_judged(&chain, Some("base.qcow2"), &before, "short.raw");

    // Nothing of the long name is left after the short one.
    let (off, size) = backing_fields(&top);
    let block = head(&top, 4096);
    assert_eq!(&block[off as usize..][..size as usize], b"base.qcow2");
    let tail = &block[off as usize + size as usize..];
    assert!(long_end > off as usize + size as usize);
    assert!(tail.iter().all(|&b| b == 0), "stale bytes after the name");
}

#[test]
fn keeps_other_extensions() {
    require_qemu!();
    let mut chain = streamed_chain(&[]);
    chain.qemu_img(&["bitmap", "--add", "-f", "qcow2", "top.qcow2", "bm0"]);
    let top = chain.file("top.qcow2");
    let before = export_raw(&chain, "top.qcow2", "before.raw");
    let old = head(&top, 4096);
    let (name_at, name_len) = backing_fields(&top);
    assert_eq!(&old[name_at as usize..][..name_len as usize], b"mid.qcow2");

    set_backing_judged(&chain, Some("base.qcow2"), &before, "after.raw");
    let v = info(&chain, "top.qcow2");
    let bitmaps = &v["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"].as_str(), Some("bm0"), "{v}");

    // Byte for byte: only the name's size and the name itself changed (the
    // format extension is rewritten with the same bytes, in place).
    let new = head(&top, 4096);
    let name_at = name_at as usize;
    assert_eq!(backing_fields(&top), (name_at as u64, 10));
    assert!(new[..16] == old[..16], "fixed header changed");
    assert!(
        new[20..name_at] == old[20..name_at],
        "header or extensions changed"
    );
    assert_eq!(&new[name_at..name_at + 10], b"base.qcow2");
    assert!(new[name_at + 10..].iter().all(|&b| b == 0));
}
