//! A snapshot point's memory as the tree holds it: the file the manifest
//! names, opened once when the tree opens (or when `memory`/`checkpoint`
//! attaches it) and served as a chain, so `memory.raw` reads like any
//! `disk.raw`. A page-delta checkpoint (a qcow2 image, see [`checkpoint`])
//! is a chain through its parents' deltas; any other source is indexed
//! and placed at guest-physical addresses (see [`layout`]) as a one-layer
//! chain over the original file.
//!
//! [`checkpoint`]: super::checkpoint

use super::error::MemoryError;
use super::{detect, index_cache, layout, MemoryLayer};
use crate::chain::{Chain, OpenOptions};
use crate::image::{probe, Format};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct MemoryView {
    /// The source as the manifest names it (relative to the tree
    /// directory, or absolute).
    pub source: String,
    pub path: PathBuf,
    pub chain: Arc<Chain>,
    /// True for snaptree's own page-delta checkpoints (which the tree
    /// creates, merges and removes; other sources are never written).
    pub delta: bool,
    /// The source's other RAM blocks (video memory, ROMs), shown under
    /// `memory/` by name.
    pub blocks: Vec<Block>,
    /// What `info.json` says about it.
    pub info: Value,
}

/// One RAM block besides the main RAM: `memory/<file>`.
pub struct Block {
    /// The block's name made a file name (`/` becomes `_`), `.raw`.
    pub file: String,
    pub chain: Arc<Chain>,
}

/// File names for blocks named `names` (QEMU's names can hold `/`, as in
/// `0000:00:02.0/vga.vram`), unique within the list.
fn block_files<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        let base: String = n
            .trim_start_matches('/')
            .chars()
            .map(|c| if c == '/' || c.is_control() { '_' } else { c })
            .collect();
        let base = if base.is_empty() || base.starts_with('.') {
            format!("_{base}")
        } else {
            base
        };
        let mut file = format!("{base}.raw");
        let mut k = 1;
        while out.contains(&file) {
            k += 1;
            file = format!("{base}.{k}.raw");
        }
        out.push(file);
    }
    out
}

/// True when the file at `path` is a qcow2 image (by the disk probe).
fn is_qcow2(path: &Path) -> bool {
    crate::input::open_input(path, false, crate::input::Accept::Regular)
        .ok()
        .and_then(|f| probe::detect_format(&f, path).ok())
        == Some(Format::Qcow2)
}

/// Opens the memory source `source` of the tree in `dir`, its index taken
/// from (and stored in) the cache directory `cache` when given.
pub fn open_view(
    dir: &Path,
    source: &str,
    cache: Option<&Path>,
) -> Result<MemoryView, MemoryError> {
    let path = dir.join(source);
    if is_qcow2(&path) {
        return open_delta(source, path);
    }
    let canon = path.canonicalize().unwrap_or(path.clone());
    let src = index_cache::load_or_index(cache, &canon, detect::index_any)?;
    let file = crate::input::open_input(&path, false, crate::input::Accept::Regular)?;
    placed_view(source, path, Arc::new(file), &src)
}

/// The vmstate of an internal snapshot (a QEMU migration stream in the
/// image's own storage, `bytes`), indexed and read in place; `source`
/// names it for `info.json`, `path` (the image) in errors.
pub fn open_vmstate(
    source: &str,
    path: &Path,
    bytes: Arc<dyn crate::storage::Storage>,
) -> Result<MemoryView, MemoryError> {
    let (src, _) = crate::memory::migstream::index_storage(&*bytes, path)?;
    let mut view = placed_view(source, path.to_path_buf(), bytes, &src)?;
    view.info["kind"] = json!(format!("{} (internal snapshot vmstate)", src.kind));
    Ok(view)
}

/// The view of indexed source `src` whose bytes are `file`: its blocks
/// placed at guest-physical addresses, one chain each.
fn placed_view(
    source: &str,
    path: PathBuf,
    file: Arc<dyn crate::storage::Storage>,
    src: &super::MemorySource,
) -> Result<MemoryView, MemoryError> {
    let placed = layout::place(src).map_err(|source| MemoryError::Placement {
        path: path.clone(),
        source,
    })?;
    let layer = MemoryLayer::over(
        file.clone(),
        &path,
        &src.kind,
        placed.size,
        placed.runs.clone(),
    );
    let files = block_files(placed.others.iter().map(|b| b.name.as_str()));
    let mut blocks = Vec::new();
    for (b, name) in placed.others.iter().zip(files) {
        let l = MemoryLayer::over(file.clone(), &path, &src.kind, b.size, b.runs.clone());
        blocks.push(Block {
            file: name,
            chain: Arc::new(Chain::from_layers(vec![Arc::new(l)])),
        });
    }
    let info = json!({
        "source": source,
        "kind": src.kind,
        "machine": src.machine,
        "size": placed.size,
        "ram_block": placed.ram_block,
        "ram_below_4g": placed.below_4g,
        "other_blocks": placed
            .others
            .iter()
            .zip(&blocks)
            .map(|(b, f)| json!({ "name": b.name, "size": b.size, "file": format!("memory/{}", f.file) }))
            .collect::<Vec<_>>(),
    });
    Ok(MemoryView {
        source: source.to_string(),
        path,
        chain: Arc::new(Chain::from_layers(vec![Arc::new(layer)])),
        delta: false,
        blocks,
        info,
    })
}

/// A page-delta checkpoint: its chain through the parents' deltas.
fn open_delta(source: &str, path: PathBuf) -> Result<MemoryView, MemoryError> {
    let chain = Chain::open(&path, &OpenOptions::default())?;
    let held = chain.leaf().allocated_bytes()?;
    let parent = chain.leaf().backing().map(|b| b.name.clone());
    let info = json!({
        "source": source,
        "kind": "page-delta checkpoint (qcow2)",
        "size": chain.size(),
        "chain_depth": chain.layers().len(),
        "delta_parent": parent,
        "bytes_held": held,
    });
    Ok(MemoryView {
        source: source.to_string(),
        path,
        chain: Arc::new(chain),
        delta: true,
        blocks: Vec::new(),
        info,
    })
}
