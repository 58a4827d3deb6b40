//! Leak repair (`qcow2::repair::repair_leaks`) on images qemu-img made,
//! with leaks planted the way a killed flush leaves them: a cluster whose
//! refcount is 1 that nothing references. Judged by `qemu-img check` and by
//! the bytes `qemu-img convert` reads.

#[macro_use]
mod common;
#[path = "common/qcow2_file.rs"]
mod qcow2_file;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::qio::{write, zero};
use common::*;
use qcow2_file::{be, bytes_at, export_raw};
use snaptree::image::qcow2::repair::repair_leaks;

/// `qemu-img check` exit status: 0 clean, 3 leaks only, 2 corruption.
fn check(dir: &Path, img: &str) -> i32 {
    run_unchecked(&mut qemu_img_cmd(dir, ["check", "-q", img]))
        .status
        .code()
        .unwrap_or(-1)
}

/// The guest view of `img` in `dir`.
fn flat(dir: &Path, img: &str) -> Vec<u8> {
    read_file(&export_raw(dir, img, "flat.raw"))
}

/// Appends `n` clusters to the image and gives each refcount 1 in the
/// first refcount block (16-bit refcounts), as a flush killed after its
/// refcount increments leaves them.
fn plant_leaks(path: &Path, n: u64) {
    let h = bytes_at(path, 0, 104);
    let cs = 1u64 << be(&h, 20, 4);
    assert_eq!(be(&h, 96, 4), 4, "test expects 16-bit refcounts");
    let rt = be(&h, 48, 8);
    let block = be(&bytes_at(path, rt, 8), 0, 8);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    let len = f.metadata().expect("stat").len().div_ceil(cs) * cs;
    for i in 0..n {
        let c = len / cs + i;
        assert!(c < cs / 2, "test image too big for one refcount block");
        f.write_all_at(&1u16.to_be_bytes(), block + c * 2)
            .expect("refcount");
    }
    f.set_len(len + n * cs).expect("extend");
}

#[test]
fn planted_leaks_are_freed_and_data_kept() {
    require_qemu!();
    let mut chain = Chain::new();
    chain
        .base("base.qcow2", Format::Qcow2, 16 * MIB, &[])
        .io(&[write(7, 0, 3 * MIB), zero(5 * MIB, MIB)]);
    chain
        .overlay("top.qcow2", None, &["extended_l2=on", "cluster_size=128k"])
        .io(&[write(9, 100 * KIB, 300 * KIB)]);
    // Compressed clusters too.
    chain.qemu_img(&["convert", "-c", "-O", "qcow2", "base.qcow2", "comp.qcow2"]);
    let d = chain.dir();
    for img in ["base.qcow2", "top.qcow2", "comp.qcow2"] {
        let before = flat(d, img);
        assert_eq!(
            repair_leaks(&d.join(img)).expect("repair clean"),
            Some(0),
            "{img}: clean image"
        );
        plant_leaks(&d.join(img), 3);
        assert_eq!(check(d, img), 3, "{img}: planted leaks must show as leaks");
        assert_eq!(
            repair_leaks(&d.join(img)).expect("repair"),
            Some(3),
            "{img}"
        );
        assert_eq!(check(d, img), 0, "{img}: check after repair");
        assert!(flat(d, img) == before, "{img}: bytes changed by repair");
    }
}

/// With internal snapshots, references count once per L1 table (QEMU's
/// rule): a consistent image is left as it is, and a shared cluster whose
/// refcount is one too high (a killed copy-on-write flush) is lowered to
/// its references, not freed.
#[test]
fn images_with_snapshots_count_references_per_l1_table() {
    require_qemu!();
    let mut chain = Chain::new();
    chain
        .base("s.qcow2", Format::Qcow2, 4 * MIB, &[])
        .io(&[write(1, 0, 2 * MIB)]);
    chain.qemu_img(&["snapshot", "-c", "one", "s.qcow2"]);
    chain.qemu_img(&["snapshot", "-c", "two", "s.qcow2"]);
    let s = chain.file("s.qcow2");
    let d = chain.dir();
    let bytes = read_file(&s);
    assert_eq!(repair_leaks(&s).expect("repair"), Some(0));
    assert!(read_file(&s) == bytes, "file changed");
    // Raise the refcount of the first cluster shared three ways to 4.
    let h = bytes_at(&s, 0, 104);
    assert_eq!(be(&h, 96, 4), 4, "test expects 16-bit refcounts");
    let block = be(&bytes_at(&s, be(&h, 48, 8), 8), 0, 8);
    let cs = 1u64 << be(&h, 20, 4);
    let rb = bytes_at(&s, block, cs as usize);
    let i = (0..cs / 2)
        .find(|&i| be(&rb, (i * 2) as usize, 2) == 3)
        .expect("a cluster with refcount 3");
    let f = std::fs::OpenOptions::new().write(true).open(&s).unwrap();
    f.write_all_at(&4u16.to_be_bytes(), block + i * 2).unwrap();
    drop(f);
    assert_eq!(check(d, "s.qcow2"), 3, "planted leak not seen");
    let before = flat(d, "s.qcow2");
    assert_eq!(repair_leaks(&s).expect("repair"), Some(1));
    assert_eq!(check(d, "s.qcow2"), 0, "check after repair");
    assert!(flat(d, "s.qcow2") == before, "bytes changed by repair");
}
