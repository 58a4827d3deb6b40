//! What the VHD and VHDX write tests (`vhd_write.rs`, `vhdx_write.rs`)
//! share: opening and reading a chain through the crate, a random
//! workload's steps applied to the chain and to an in-memory model, and
//! QEMU's view of an image (`qemu-img convert`, `qemu-io`) in the crate's
//! `QEMU_FORMAT`. Each crate keeps its own step generator (`random_op`):
//! their mixes differ, and a seed must replay the same sequence.
//!
//! Declared by the test crates that use it with
//! `#[path = "common/chain_rw.rs"] mod chain_rw;` after `mod common;`.
#![allow(dead_code)]

use crate::common::{diff_bytes, qemu_img, run};
use rand::Rng;
use snaptree::chain::{Chain, OpenOptions};
use std::fs;
use std::path::Path;
use std::process::Command;

/// `SNAPTREE_TEST_SEED`, or a random seed.
pub fn seed() -> u64 {
    std::env::var("SNAPTREE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

pub fn open_rw(leaf: &Path) -> Chain {
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    Chain::open(leaf, &opts).unwrap_or_else(|e| panic!("open {} for writing: {e}", leaf.display()))
}

pub fn read_chain(chain: &Chain) -> Vec<u8> {
    let mut buf = vec![0u8; chain.size() as usize];
    chain.read_at(&mut buf, 0).expect("chain read");
    buf
}

pub fn read_leaf(leaf: &Path) -> Vec<u8> {
    let chain = Chain::open(leaf, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", leaf.display()));
    read_chain(&chain)
}

pub fn check_bytes(expected: &[u8], got: &[u8], what: impl std::fmt::Display) {
    if let Some(d) = diff_bytes(expected, got) {
        panic!("{what}:\n{d}");
    }
}

/// `qemu-img convert -f QEMU_FORMAT -O raw` of `img`, read back.
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let dir = img.parent().unwrap();
    let out = img.with_extension("qemu.raw");
    qemu_img(
        dir,
        args!["convert", "-f", crate::QEMU_FORMAT, "-O", "raw", img, &out],
    );
    let bytes = fs::read(&out).unwrap();
    let _ = fs::remove_file(&out);
    bytes
}

/// `qemu-io -f QEMU_FORMAT -c CMD IMG`.
pub fn qemu_io(img: &Path, cmd: &str) {
    run(Command::new("qemu-io")
        .args(["-f", crate::QEMU_FORMAT, "-c", cmd])
        .arg(img));
}

/// One step of a random workload.
#[derive(Clone, Debug)]
pub enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Flush,
}

/// Applies `op` to the chain and to the model.
pub fn apply(chain: &Chain, model: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, data) => {
            chain.write_at(data, *off).expect("write");
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        Op::Zero(off, len) => {
            chain.write_zeroes(*off, *len).expect("write_zeroes");
            model[*off as usize..(*off + *len) as usize].fill(0);
        }
        Op::Flush => chain.flush().expect("flush"),
    }
}
