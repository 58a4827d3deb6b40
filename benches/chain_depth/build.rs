//! Building the chains under test, with `qemu-img create` and one `qemu-io`
//! session per set of layers, and the model of what each flattened chain
//! holds.
//!
//! Two layouts (see the crate doc): [`build_shared`] puts every byte in one
//! base image and gives each layer above it a few 64 KiB zero clusters of
//! its own, and serves every depth from one stack (the chain of depth `d` ends
//! in layer `d - 1`); [`build_striped`] spreads the data over the layers of
//! a chain built for one depth.

use crate::util::run_cmd;
use crate::{CHUNK, MIB, R};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest bytes per own cluster of a shared-layout layer: one in every
/// slice of this size (at least one per layer). 512 MiB is what one L2
/// table maps with 64 KiB clusters, so every L2 table a layer could have
/// exists and holds an entry.
const OWN_SLICE: u64 = 512 * MIB;

/// One write: guest offset, length, fill byte (`None`: zeros).
pub type Write = (u64, u64, Option<u8>);

/// The fill byte `writer` uses in `stripe`: never 0, different for
/// neighbouring stripes of one writer and for the writers of one stripe.
fn pattern(stripe: u64, writer: usize) -> u8 {
    (1 + (stripe * 31 + writer as u64 * 101 + 7) % 255) as u8
}

/// Expected byte of every 64 KiB chunk of the flattened disk, and the
/// layer (0 = base) that wrote it last.
#[derive(Clone)]
pub struct Model {
    chunks: Vec<u8>,
    owner: Vec<u16>,
}

impl Model {
    fn new(size: u64) -> Model {
        let n = (size / CHUNK) as usize;
        Model {
            chunks: vec![0; n],
            owner: vec![0; n],
        }
    }

    /// Applies the writes of layer `layer`, after those of the layers
    /// below it: what a read through the chain sees.
    fn apply(&mut self, layer: usize, writes: &[Write]) {
        for &(off, len, fill) in writes {
            for c in off / CHUNK..(off + len) / CHUNK {
                self.chunks[c as usize] = fill.unwrap_or(0);
                self.owner[c as usize] = layer as u16;
            }
        }
    }

    pub fn at(&self, offset: u64) -> u8 {
        self.chunks[(offset / CHUNK) as usize]
    }

    /// Bytes of the flattened disk served by a layer above the base.
    pub fn above_base(&self) -> u64 {
        self.owner.iter().filter(|&&o| o != 0).count() as u64 * CHUNK
    }

    /// Checks the first byte of every chunk of `buf` (read at `offset`):
    /// cheap enough for a timed pass.
    pub fn spot_check(&self, buf: &[u8], offset: u64, who: &str) -> R<()> {
        for (i, c) in buf.chunks(CHUNK as usize).enumerate() {
            let at = offset + i as u64 * CHUNK;
            if c[0] != self.at(at) {
                return Err(format!(
                    "{who}: byte at {at} is {:#04x}, expected {:#04x}",
                    c[0],
                    self.at(at)
                )
                .into());
            }
        }
        Ok(())
    }
}

/// A chain ready to measure.
pub struct Built {
    pub depth: usize,
    pub leaf: PathBuf,
    pub model: Model,
}

/// Creates the chain `names[0]` (base) <- ... <- `names[last]` in `dir`
/// and writes `writes[k]` into layer `k`.
fn make_chain(dir: &Path, names: &[String], size: u64, writes: &[Vec<Write>]) -> R<()> {
    for (k, name) in names.iter().enumerate() {
        let mut c = Command::new("qemu-img");
        c.current_dir(dir).args(["create", "-q", "-f", "qcow2"]);
        if k > 0 {
            // -u: do not open the backing chain to check it (that would
            // make building a chain quadratic in its depth).
            c.args(["-u", "-b", &names[k - 1], "-F", "qcow2"]);
        }
        run_cmd(c.arg(name).arg(size.to_string()))?;
    }
    let mut args: Vec<String> = Vec::new();
    for (k, layer) in writes.iter().enumerate() {
        if k > 0 {
            args.push("-c".into());
            args.push("close".into());
            args.push("-c".into());
            args.push(format!("open -o driver=qcow2 {}", names[k]));
        }
        for &(off, len, fill) in layer {
            args.push("-c".into());
            args.push(match fill {
                Some(p) => format!("write -q -P {p} {off} {len}"),
                None => format!("write -q -z {off} {len}"),
            });
        }
    }
    let out = run_cmd(
        Command::new("qemu-io")
            .current_dir(dir)
            .args(["-f", "qcow2", &names[0]])
            .args(&args),
    )?;
    // qemu-io reports a failed command on its output, not always in its
    // exit status.
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    if !text.trim().is_empty() {
        return Err(format!("qemu-io said: {}", text.trim()).into());
    }
    unsafe { libc::sync() };
    Ok(())
}

/// How many clusters of its own each layer above the base of the shared
/// layout holds.
pub fn own_per_layer(size: u64) -> u64 {
    (size / OWN_SLICE).max(1)
}

/// The clusters layer `k` (>= 1) of the shared layout owns: one 64 KiB
/// cluster in each [`OWN_SLICE`] of the disk, at a place that moves with
/// `k` (consecutive layers about 0.38 of a slice apart), so that the
/// layers' own clusters are spread over the disk and rarely overlap.
///
/// They are zero clusters (qcow2 v3's zero flag in the L2 entry, no host
/// cluster): the layer has real L2 tables that every lookup must consult,
/// but the disk reads stay those of the base. Data clusters would add one
/// cold random read of 64 KiB per cluster in a different file at depth 64
/// (126 at 1 GiB, about 0.8 ms each on these VMs), a filesystem cost that
/// layout 2 measures already and that would swamp the 5 % at stake here.
fn own_clusters(k: usize, size: u64) -> Vec<Write> {
    let slices = own_per_layer(size);
    let per_slice = size / CHUNK / slices;
    let stride = (per_slice * 382 / 1000) | 1;
    (0..slices)
        .map(|s| {
            let c = s * per_slice + (k as u64 * stride + s * 7) % per_slice;
            (c * CHUNK, CHUNK, None)
        })
        .collect()
}

/// Layout 1, "same bytes, deeper chain": `base.qcow2` holds the whole disk
/// (1 MiB stripes, each with its own fill byte), and `up01.qcow2` ..
/// `up{max-1}.qcow2` above it each hold only a few zero clusters
/// ([`own_clusters`]). The chain
/// of depth `d` is the stack up to `up{d-1}` (depth 1: the base alone), so
/// the base is written once and every depth reads the very same file.
/// Returns one [`Built`] per depth, shallowest first.
pub fn build_shared(dir: &Path, size: u64, depths: &[usize]) -> R<Vec<Built>> {
    let max = depths.iter().copied().max().unwrap_or(1);
    let names: Vec<String> = (0..max)
        .map(|k| match k {
            0 => "base.qcow2".to_string(),
            k => format!("up{k:02}.qcow2"),
        })
        .collect();
    let mut writes = vec![(0..size / MIB)
        .map(|i| (i * MIB, MIB, Some(pattern(i, 0))))
        .collect::<Vec<Write>>()];
    writes.extend((1..max).map(|k| own_clusters(k, size)));
    make_chain(dir, &names, size, &writes)?;

    let mut model = Model::new(size);
    let mut built = Vec::new();
    let mut applied = 0;
    for &depth in depths.iter().collect::<BTreeSet<_>>() {
        for (k, w) in writes.iter().enumerate().take(depth).skip(applied) {
            model.apply(k, w);
        }
        applied = depth;
        built.push(Built {
            depth,
            leaf: dir.join(&names[depth - 1]),
            model: model.clone(),
        });
    }
    Ok(built)
}

/// Layout 2, "data spread over layers": the chain `l00.qcow2` (base) ..
/// `l{depth-1}.qcow2` (leaf) in `dir`, every byte allocated somewhere in
/// it: layer `k` owns every `depth`-th 1 MiB stripe, a higher layer (the
/// owner itself when none is) overwrites 64 KiB of every fifth stripe, and
/// the leaf writes zeros over 64 KiB of every 37th. Each (stripe, writer)
/// pair gets its own fill byte, so reading a stripe from the wrong layer or
/// the wrong place shows. Stripes owned by the base make each region's
/// resolution walk the whole depth.
pub fn build_striped(dir: &Path, depth: usize, size: u64) -> R<Built> {
    let names: Vec<String> = (0..depth).map(|k| format!("l{k:02}.qcow2")).collect();
    let stripes = size / MIB;
    let mut writes: Vec<Vec<Write>> = vec![Vec::new(); depth];
    for i in 0..stripes {
        let owner = (i % depth as u64) as usize;
        writes[owner].push((i * MIB, MIB, Some(pattern(i, owner))));
    }
    for i in 0..stripes {
        let owner = (i % depth as u64) as usize;
        let above = |salt: u64| {
            let room = (depth - 1 - owner) as u64;
            if room == 0 {
                owner
            } else {
                owner + 1 + (i * salt % room) as usize
            }
        };
        if i % 5 == 2 {
            let w = above(7);
            writes[w].push((i * MIB + (i * 3 % 16) * CHUNK, CHUNK, Some(pattern(i, w))));
        }
        if i % 37 == 11 {
            writes[depth - 1].push((i * MIB + (i * 5 % 16) * CHUNK, CHUNK, None));
        }
    }
    make_chain(dir, &names, size, &writes)?;
    let mut model = Model::new(size);
    for (k, w) in writes.iter().enumerate() {
        model.apply(k, w);
    }
    Ok(Built {
        depth,
        leaf: dir.join(&names[depth - 1]),
        model,
    })
}
