//! Which files in a VMDK's directory other disks use, by `(dev, ino)`.
//!
//! A descriptor may name any file of its directory as an extent, so a
//! hand-written leaf can name its parent's `-flat.vmdk`, or a
//! monolithicSparse disk, and a write through it would change the other
//! disk. Names cannot be compared as text (`./a`, `sub/../a`, an absolute
//! path, a symlink or a hard link all reach the same file), so what is
//! compared is the file identity: [`used_by_others`] collects the
//! identities of every other VMDK in the directory (its own file and
//! every file its extent lines reach, by any spelling) and of every
//! symlink's target there. A writable open ([`check_writable`]) and a
//! merge's removal of extent files (`merging::companions`) both refuse a
//! file in that set, or one with more than one hard link (the other name
//! may be anywhere). The scan is bounded ([`MAX_ENTRIES`]).

use super::descriptor;
use super::extents::OpenExtent;
use super::sparse;
use crate::error::{ImageError, Result};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A file's identity: device and inode.
pub type FileId = (u64, u64);

/// Directory entries examined at most; a larger directory is not
/// scanned, and nothing in it counts as one disk's alone.
pub const MAX_ENTRIES: usize = 16384;

pub fn id_of(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino())
}

/// The descriptor of the VMDK file `p` (`true`: embedded in a sparse
/// extent), or `None` when `p` is no VMDK disk. Only files that start
/// like one are read.
pub fn descriptor_of(p: &Path) -> Option<(bool, descriptor::Descriptor)> {
    let f = crate::input::open_input(p, false, crate::input::Accept::Regular).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; 21];
    let n = head.len().min(len as usize);
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut head[..n], 0).ok()?;
    let embedded = head.starts_with(sparse::MAGIC);
    if embedded {
        if sparse::is_bare_extent(&f, len) {
            return None;
        }
    } else if head[..n] != *descriptor::SIGNATURE {
        return None;
    }
    let text = super::driver::descriptor_text(&f, p, len).ok()?;
    let d = descriptor::parse(p, 0, &text).ok()?;
    Some((embedded, d))
}

/// The identities of the files that images in `dir` other than `me` (the
/// image file's identity) use: each other VMDK's own file, every file its
/// extent lines reach (following symlinks and not), and every symlink's
/// target. `Err` says why the directory could not be scanned.
pub fn used_by_others(dir: &Path, me: FileId) -> std::result::Result<HashSet<FileId>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut out = HashSet::new();
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(format!(
                "{} has more than {MAX_ENTRIES} entries; the files other disks use there cannot be checked",
                dir.display()
            ));
        }
        let Ok(entry) = entry else { continue };
        let p = entry.path();
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if id_of(&meta) == me {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_symlink()) {
            out.insert(id_of(&meta));
        }
        if !meta.is_file() {
            continue;
        }
        let Some((embedded, d)) = descriptor_of(&p) else {
            continue;
        };
        out.insert(id_of(&meta));
        if embedded {
            // Its extent line is not used (see `extents::open_monolithic`).
            continue;
        }
        for line in d.extents.iter().filter(|l| !l.file.is_empty()) {
            let q = dir.join(&line.file);
            for m in [std::fs::metadata(&q), std::fs::symlink_metadata(&q)]
                .into_iter()
                .flatten()
            {
                out.insert(id_of(&m));
            }
        }
    }
    Ok(out)
}

/// Refuses writing a disk whose extent files (or image file) another
/// image in `dir` uses, or whose extent files have other names (hard
/// links): a write would change that other disk. The reason is for
/// "read-only: ...".
pub fn check_writable(
    path: &Path,
    image: &dyn crate::storage::Storage,
    extents: &[OpenExtent],
    dir: &Path,
) -> Result<()> {
    let meta = |f: &File, p: &Path| f.metadata().map_err(|e| ImageError::io(p, "stat", 0, e));
    let Some(image_file) = image.as_file() else {
        return Ok(());
    };
    let me = meta(image_file, path)?;
    let refuse = |why: String| Err(ImageError::unsupported(path, format!("read-only: {why}")));
    let others = match used_by_others(dir, id_of(&me)) {
        Ok(o) => o,
        Err(why) => return refuse(why),
    };
    let mut files = vec![(path, image_file, false)];
    for e in extents {
        if let Some(f) = e.file.as_deref().and_then(|f| f.as_file()) {
            files.push((&e.path, f, true));
        }
    }
    for (p, f, is_extent) in files {
        let m = meta(f, p)?;
        if is_extent && m.nlink() > 1 {
            return refuse(format!(
                "extent file {} has {} hard links; another disk may use it",
                p.display(),
                m.nlink()
            ));
        }
        if others.contains(&id_of(&m)) {
            return refuse(format!(
                "{} is also used by another image in {} (as its file or an extent)",
                p.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}
