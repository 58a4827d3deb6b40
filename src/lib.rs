//! snaptree: a VM's snapshot tree (qcow2 backing chains, later VHD chains
//! and memory checkpoints) as plain files. See ARCHITECTURE.md.
//!
//! Layers, bottom up: `image` (formats, one [`image::Layer`] each), `chain`
//! (resolving reads through a stack of layers, fast at any depth), `tree`
//! (snapshot points and the commands that change them), `fs` (the FUSE
//! adapter), `cli` (the `snaptree` command). Format code never knows about
//! FUSE; FUSE code never parses a format.

pub mod cache;
pub mod chain;
pub mod cli;
pub mod confine;
pub mod crc;
pub mod error;
pub mod fdlimit;
pub mod fileio;
pub mod fs;
pub mod guest;
pub mod image;
pub mod input;
pub mod libvirt;
pub mod memory;
pub mod merge;
pub mod ownership;
pub mod storage;
pub mod tree;
pub mod units;
pub mod vmware;
