//! A qcow2 file as the leak-repair and rebase tests read it: header fields
//! straight from the file (big-endian, as the qcow2 spec lays them out),
//! and the guest view through `qemu-img convert`.
//!
//! Not declared in `mod.rs`: a test binary that wants it declares it next
//! to `mod common;` (whose [`qemu_img`] it uses) with
//! `#[path = "common/qcow2_file.rs"] mod qcow2_file;`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::qemu_img;

/// `len` bytes of the file at `path`, from offset `off`.
pub fn bytes_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut buf, off))
        .unwrap_or_else(|e| panic!("read {} at {off}: {e}", path.display()));
    buf
}

/// The big-endian field of `n` bytes at `at` in `b`.
pub fn be(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n].iter().fold(0, |v, x| v << 8 | *x as u64)
}

/// The guest view of qcow2 image `name` in `dir` (through its backing
/// chain), written by `qemu-img convert -O raw` to `dir/out`; its path.
pub fn export_raw(dir: &Path, name: &str, out: &str) -> PathBuf {
    qemu_img(dir, ["convert", "-f", "qcow2", "-O", "raw", name, out]);
    dir.join(out)
}
