//! snaptree: a VM's snapshot tree (qcow2 backing chains, later VHD chains
//! and memory checkpoints) as plain files. See ../shared/DESIGN.md.
//!
//! Layers: `image` (formats, one [`image::Layer`] each), `chain` (resolving
//! reads through a stack of layers, fast at any depth), `cli` (the
//! `snaptree` command).

pub mod chain;
pub mod cli;
pub mod error;
pub mod fileio;
pub mod fs;
pub mod image;
pub mod tree;
