//! Opening a chain: from the leaf, follow each image's backing reference
//! (relative to that image's directory), refusing cycles, chains deeper
//! than a cap, and — unless allowed — references that leave the directory
//! of the leaf, so a crafted image cannot pull arbitrary host files (say
//! /dev/sda or /etc/shadow) into a mount.

use super::ChainError;
use crate::confine::{Confine, Refused};
use crate::error::ImageError;
use crate::image::{probe, BackingRef, Format, Layer};
use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Chains deeper than this are refused unless the caller raises the cap;
/// XenServer stops at 30, VMware at 32, real chains stay far below.
pub const DEFAULT_MAX_DEPTH: usize = 1024;

#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Open the leaf for writing (layers below are always read-only).
    pub writable: bool,
    /// Follow backing references that leave the leaf's directory.
    pub allow_external_backing: bool,
    pub max_depth: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            allow_external_backing: false,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Opens every layer of the chain that ends in `leaf`, leaf first.
pub fn open_layers(leaf: &Path, opts: &OpenOptions) -> Result<Vec<Arc<dyn Layer>>, ChainError> {
    let confine = leaf_confine(leaf, opts)?;
    let mut layers: Vec<Arc<dyn Layer>> = Vec::new();
    let mut seen = HashSet::new();
    let mut path = leaf.to_path_buf();
    let mut format: Option<Format> = None;
    loop {
        let meta = std::fs::metadata(&path).map_err(|e| ChainError::Open {
            path: path.clone(),
            source: e,
        })?;
        if !seen.insert((meta.dev(), meta.ino())) {
            let referrer = layers.last().expect("a repeat needs a referrer");
            return Err(ChainError::Cycle {
                path: referrer.path().to_path_buf(),
                offset: referrer.backing().map_or(0, |b| b.offset),
                target: path,
            });
        }
        let layer = probe::open_layer(&path, format, opts.writable && layers.is_empty())?;
        if let Some(child) = layers.last() {
            check_parent_id(child.as_ref(), layer.as_ref())?;
        }
        let backing = layer.backing().cloned();
        layers.push(layer);
        let Some(b) = backing else { break };
        let referrer = layers.last().expect("just pushed");
        if layers.len() >= opts.max_depth {
            return Err(ChainError::TooDeep {
                path: referrer.path().to_path_buf(),
                offset: b.offset,
                max: opts.max_depth,
            });
        }
        (path, format) = follow(&confine, referrer.as_ref(), &b)?;
    }
    Ok(layers)
}

/// The confinement of the chain of `leaf`: the leaf's directory (unless
/// `opts` allows references out of it). Refused unless the leaf is a
/// regular file or a block device.
fn leaf_confine(leaf: &Path, opts: &OpenOptions) -> Result<Confine, ChainError> {
    let leaf_canon = leaf.canonicalize().map_err(|e| ChainError::Open {
        path: leaf.to_path_buf(),
        source: e,
    })?;
    let ft = std::fs::metadata(&leaf_canon).map(|m| m.file_type());
    if !ft
        .as_ref()
        .is_ok_and(|t| t.is_file() || t.is_block_device())
    {
        return Err(ChainError::Open {
            path: leaf.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ),
        });
    }
    let root = leaf_canon
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    Confine::new(&root, opts.allow_external_backing).map_err(|e| ChainError::Open {
        path: root.clone(),
        source: e,
    })
}

/// Where the backing reference `b` of `referrer` leads (relative to the
/// referrer's directory) and the format it records, if any. Refused when
/// `confine` refuses the target (missing, outside the tree, not an image)
/// or the format is unknown; the error names the referrer and the offset
/// of the reference in it.
fn follow(
    confine: &Confine,
    referrer: &dyn Layer,
    b: &BackingRef,
) -> Result<(PathBuf, Option<Format>), ChainError> {
    let dir = referrer
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let referrer_path = referrer.path().to_path_buf();
    confine.reference(&dir, &b.name).map_err(|r| match r {
        Refused::Missing { path, source, .. } => ChainError::Missing {
            path: referrer_path.clone(),
            offset: b.offset,
            name: b.name.clone(),
            target: path,
            source,
        },
        Refused::Outside { target, root, .. } => ChainError::Outside {
            path: referrer_path.clone(),
            offset: b.offset,
            name: b.name.clone(),
            target,
            root,
        },
        Refused::Invalid { .. } => ChainError::NotAnImage {
            path: referrer_path.clone(),
            offset: b.offset,
            name: b.name.clone(),
            target: dir.join(&b.name),
        },
    })?;
    let format = match &b.format {
        None => None,
        Some(f) => Some(Format::from_name(f).ok_or_else(|| ChainError::Format {
            path: referrer.path().to_path_buf(),
            format: f.clone(),
        })?),
    };
    Ok((dir.join(&b.name), format))
}

/// A child that records its parent's id (a differencing VHD) must find that
/// id in the parent: a different id means the parent was replaced or
/// changed behind the child's back, and reading through it would mix two
/// disks. Hyper-V refuses such a chain the same way.
fn check_parent_id(child: &dyn Layer, parent: &dyn Layer) -> Result<(), ChainError> {
    let (Some(expected), Some(found)) = (child.expected_parent_id(), parent.unique_id()) else {
        return Ok(());
    };
    if expected == found {
        return Ok(());
    }
    let uuid = crate::image::vhd::footer::format_uuid;
    Err(ImageError::invalid(
        child.path(),
        format!(
            "parent ID mismatch: this differencing disk expects parent unique id {}, but its parent {} \
             has unique id {}; the parent was replaced or modified by a tool that does not keep VHD ids",
            uuid(&expected),
            parent.path().display(),
            uuid(&found)
        ),
    )
    .into())
}
