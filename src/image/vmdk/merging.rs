//! Which VMDKs merges may touch, and the extent files that go with a
//! VMDK when a merge removes or replaces it.
//!
//! Merges write, re-point, rename and remove hosted sparse disks only
//! (`monolithicSparse`, `twoGbMaxExtentSparse`): those snaptree writes
//! (`write`) and re-points (`reparent`). A flat disk's data is not in the
//! grains a merge copies around, streamOptimized and the ESXi deltas are
//! read-only here, so a merge touching one is refused with its kind named.
//!
//! A twoGbMaxExtentSparse disk is a descriptor plus extent files
//! (`name-s001.vmdk` ...). Removing the descriptor alone would leak them,
//! so [`companions`] lists the ones that are this disk's alone: bare
//! sparse extents (no descriptor of their own) in the same directory,
//! named after the descriptor. Anything else a hostile descriptor may
//! name stays where it is.

use super::descriptor::{self, ExtentType};
use super::sparse;
use crate::fileio;
use std::path::{Path, PathBuf};

/// The kinds merges handle.
pub const MERGEABLE: &[&str] = &["monolithicSparse", "twoGbMaxExtentSparse"];

fn descriptor_of(path: &Path) -> crate::error::Result<(bool, descriptor::Descriptor)> {
    let f = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
    let len = fileio::file_len(&f, path)?;
    let mut magic = [0u8; 4];
    let embedded = len >= 4 && {
        fileio::read_exact_at(&f, path, &mut magic, 0, "VMDK magic")?;
        &magic == sparse::MAGIC
    };
    let text = super::driver::descriptor_text(&f, path, len)?;
    Ok((embedded, descriptor::parse(path, 0, &text)?))
}

/// Why a merge must not touch the VMDK at `path`; `None` when it may.
pub fn refusal(path: &Path) -> Option<String> {
    let d = match descriptor_of(path) {
        Ok((_, d)) => d,
        Err(e) => return Some(format!("its VMDK kind cannot be told: {e}")),
    };
    let kind = d.create_type.as_str();
    if !MERGEABLE.contains(&kind) {
        return Some(format!(
            "{} is a {kind} VMDK; snaptree merges hosted sparse VMDKs (monolithicSparse, twoGbMaxExtentSparse) only",
            path.display()
        ));
    }
    if let Some(e) = d.extents.iter().find(|e| e.kind != ExtentType::Sparse) {
        return Some(format!(
            "{} is a {kind} VMDK with a {} extent; snaptree merges hosted sparse extents only",
            path.display(),
            e.kind.name()
        ));
    }
    None
}

/// The extent files that belong to the VMDK at `path` alone (see the
/// module docs); empty for a monolithicSparse disk.
pub fn companions(path: &Path) -> Vec<PathBuf> {
    let Ok((false, d)) = descriptor_of(path) else {
        return Vec::new();
    };
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Some(others) = extents_of_others(dir, path) else {
        return Vec::new();
    };
    d.extents
        .iter()
        .filter(|e| e.kind == ExtentType::Sparse && !e.file.contains('/'))
        .filter(|e| !others.contains(&e.file))
        .map(|e| dir.join(&e.file))
        .filter(|p| p != path && is_bare_extent(p))
        .collect()
}

/// The extent file names every other descriptor file in `dir` lists (a
/// file two disks name is neither's alone); `None` when the directory
/// cannot be read (then nothing is known to be this disk's alone).
fn extents_of_others(dir: &Path, path: &Path) -> Option<Vec<String>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut names = Vec::new();
    for p in entries.flatten().map(|e| e.path()) {
        if p == path
            || p.file_name()
                .is_none_or(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        if let Ok((false, d)) = descriptor_of(&p) {
            names.extend(d.extents.into_iter().map(|e| e.file));
        }
    }
    Some(names)
}
/// A regular file holding a sparse extent and no descriptor.
fn is_bare_extent(p: &Path) -> bool {
    let Ok(f) = crate::input::open_input(p, false, crate::input::Accept::Regular) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    let mut magic = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0).is_ok()
        && &magic == sparse::MAGIC
        && sparse::is_bare_extent(&f, len)
}
