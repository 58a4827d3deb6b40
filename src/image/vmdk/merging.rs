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
//! sparse extents (no descriptor of their own) in the same directory, with
//! one link, that no other disk or symlink there reaches (by file
//! identity, whatever the spelling: `shared`). Anything else a hostile
//! descriptor may name stays where it is.

use super::descriptor::{self, ExtentType};
use super::{shared, sparse};
use crate::fileio;
use std::os::unix::fs::MetadataExt;
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
/// module docs); empty for a monolithicSparse disk. A file is this
/// disk's alone when its line names it plainly in the directory, it is a
/// regular file (no symlink) with one link, and no other VMDK or symlink
/// in the directory reaches it by any spelling (compared by `(dev, ino)`,
/// see `shared`).
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
    let Ok(me) = std::fs::metadata(path) else {
        return Vec::new();
    };
    // Unreadable or too large a directory: nothing is known to be this
    // disk's alone.
    let Ok(others) = shared::used_by_others(dir, shared::id_of(&me)) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = Vec::new();
    for e in d.extents.iter().filter(|e| e.kind == ExtentType::Sparse) {
        if e.file.is_empty() || e.file.contains('/') || e.file == "." || e.file == ".." {
            continue;
        }
        let p = dir.join(&e.file);
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let id = shared::id_of(&m);
        let alone = m.is_file()
            && m.nlink() == 1
            && id != shared::id_of(&me)
            && !others.contains(&id)
            && !seen.contains(&id);
        if alone && is_bare_extent(&p) {
            seen.push(id);
            out.push(p);
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(kind: &str, extents: &str) -> String {
        format!("# Disk DescriptorFile\nversion=1\nCID=1234\nparentCID=ffffffff\ncreateType=\"{kind}\"\n\n{extents}\n")
    }

    /// ESXi deltas (no tool here makes them; the refusal reads only the
    /// descriptor), flat kinds and a sparse kind with a flat extent are
    /// refused naming the kind; hosted sparse kinds are not.
    #[test]
    fn refusals_name_the_kind() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, extent, refused) in [
            ("vmfsSparse", "RW 2048 VMFSSPARSE \"d-delta.vmdk\"", true),
            ("seSparse", "RW 2048 SESPARSE \"d-sesparse.vmdk\"", true),
            ("vmfs", "RW 2048 VMFS \"d-flat.vmdk\"", true),
            ("monolithicFlat", "RW 2048 FLAT \"d-flat.vmdk\" 0", true),
            ("twoGbMaxExtentFlat", "RW 2048 FLAT \"d-f001.vmdk\" 0", true),
            ("streamOptimized", "RW 2048 SPARSE \"d.vmdk\"", true),
            (
                "twoGbMaxExtentSparse",
                "RW 2048 FLAT \"d-s001.vmdk\" 0",
                true,
            ),
            (
                "twoGbMaxExtentSparse",
                "RW 2048 SPARSE \"d-s001.vmdk\"",
                false,
            ),
        ] {
            let p = dir.path().join("d.vmdk");
            std::fs::write(&p, descriptor(kind, extent)).unwrap();
            let why = refusal(&p);
            assert_eq!(why.is_some(), refused, "{kind} {extent}: {why:?}");
            if let Some(why) = why {
                assert!(why.contains(kind), "{why}");
            }
        }
        let garbage = dir.path().join("g.vmdk");
        std::fs::write(&garbage, "# Disk DescriptorFile\nnonsense\n").unwrap();
        assert!(refusal(&garbage).is_some_and(|w| w.contains("cannot be told")));
    }

    /// Only bare sparse extents in the directory that no other descriptor
    /// names go with a descriptor.
    #[test]
    fn companions_are_bare_extents_no_one_else_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A bare KDMV extent: a header with no descriptor area.
        let mut bare = vec![0u8; 512];
        bare[..4].copy_from_slice(sparse::MAGIC);
        for n in ["a-s001.vmdk", "a-s002.vmdk", "shared-s001.vmdk"] {
            std::fs::write(d.join(n), &bare).unwrap();
        }
        std::fs::write(d.join("not-kdmv.vmdk"), b"plain bytes").unwrap();
        let a = d.join("a.vmdk");
        let lines = "RW 2048 SPARSE \"a-s001.vmdk\"\nRW 2048 SPARSE \"a-s002.vmdk\"\nRW 2048 SPARSE \"shared-s001.vmdk\"\nRW 2048 SPARSE \"not-kdmv.vmdk\"\nRW 2048 SPARSE \"../a-s001.vmdk\"";
        std::fs::write(&a, descriptor("twoGbMaxExtentSparse", lines)).unwrap();
        std::fs::write(
            d.join("b.vmdk"),
            descriptor(
                "twoGbMaxExtentSparse",
                "RW 2048 SPARSE \"shared-s001.vmdk\"",
            ),
        )
        .unwrap();
        let mut got = companions(&a);
        got.sort();
        assert_eq!(got, vec![d.join("a-s001.vmdk"), d.join("a-s002.vmdk")]);
    }
}
