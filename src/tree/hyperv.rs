//! Hyper-V's conventions for a VM's disks, which the tree applies when it
//! names points. Hyper-V keeps its checkpoint list in binary `.vmcx` files
//! (undocumented), so the only names are the files': each checkpoint makes
//! the running disk an `.avhdx` differencing disk named
//! `<disk>_<GUID>.avhdx`. Those stems are unreadable as point names, so
//! they become `checkpoint-1`, `checkpoint-2`, ... in chain order (the
//! file name, GUID included, stays in `info.json`); a manifest name still
//! wins. Saved memory (`.vmrs`, `.bin`) is in a format snaptree does not
//! read, and which checkpoint it belongs to is only in the `.vmcx`: such
//! files are reported in `status`, never opened.

use super::discover::Found;
use crate::image::Format;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Short names for the GUID-named AVHDX files among `found`: numbered by
/// their depth in the chain (the first checkpoint above the base is 1),
/// then by file name, so a checkpoint added at the end of a chain never
/// renames an older one (a new branch can shift the numbers of deeper
/// checkpoints on other branches).
pub(super) fn checkpoint_names(found: &BTreeMap<PathBuf, Found>) -> HashMap<PathBuf, String> {
    let mut named: Vec<(usize, &PathBuf)> = found
        .values()
        .filter(|f| f.format == Format::Vhdx && is_checkpoint_file(&f.path))
        .map(|f| (depth(found, &f.path), &f.path))
        .collect();
    named.sort();
    named
        .into_iter()
        .enumerate()
        .map(|(i, (_, p))| (p.clone(), format!("checkpoint-{}", i + 1)))
        .collect()
}

/// `<anything>_<GUID>.avhdx` or `<GUID>.avhdx` (the GUID with or
/// without braces, any case).
fn is_checkpoint_file(path: &Path) -> bool {
    let ext_ok = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("avhdx"));
    let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
        return false;
    };
    let tail = stem.rsplit('_').next().unwrap_or(stem);
    let guid = tail
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(tail);
    ext_ok && is_guid(guid)
}

/// 8-4-4-4-12 hex digits.
fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Backing steps from `path` to its root (bounded: a loop counts as deep).
fn depth(found: &BTreeMap<PathBuf, Found>, path: &Path) -> usize {
    let mut n = 0;
    let mut cur = found.get(path).and_then(|f| f.backing.as_ref());
    while let Some(b) = cur {
        n += 1;
        if n > found.len() {
            break;
        }
        cur = found.get(b).and_then(|f| f.backing.as_ref());
    }
    n
}

/// `status` lines for Hyper-V saved-memory files in the tree directory and
/// where Hyper-V keeps them beside a VM's `Virtual Hard Disks` directory
/// (`../Snapshots`, `../Virtual Machines`); only looked for when the tree
/// holds a VHDX. Bounded: at most this many are listed.
pub(super) fn memory_notes(dir: &Path, found: &BTreeMap<PathBuf, Found>) -> Vec<String> {
    const MAX: usize = 64;
    if !found.values().any(|f| f.format == Format::Vhdx) {
        return Vec::new();
    }
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(up) = dir.parent() {
        dirs.push(up.join("Snapshots"));
        dirs.push(up.join("Virtual Machines"));
    }
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().take(4096))
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vmrs") || e.eq_ignore_ascii_case("bin"))
        })
        .collect();
    files.sort();
    files
        .iter()
        .take(MAX)
        .map(|p| {
            format!(
                "Hyper-V saved memory {} is present and not readable: its format is undocumented, and which checkpoint it belongs to is recorded only in Hyper-V's binary .vmcx",
                crate::confine::shown(&p.display().to_string())
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_named_avhdx_files_are_checkpoints() {
        for yes in [
            "Win10_3F2504E0-4F89-11D3-9A0C-0305E82C3301.avhdx",
            "disk_{3f2504e0-4f89-11d3-9a0c-0305e82c3301}.AVHDX",
            "3F2504E0-4F89-11D3-9A0C-0305E82C3301.avhdx",
        ] {
            assert!(is_checkpoint_file(Path::new(yes)), "{yes}");
        }
        for no in [
            "Win10.vhdx",
            "Win10_3F2504E0-4F89-11D3-9A0C-0305E82C3301.vhdx",
            "Win10_3F2504E0-4F89-11D3-9A0C.avhdx",
            "Win10_3F2504E0X4F89-11D3-9A0C-0305E82C3301.avhdx",
            "checkpoint.avhdx",
        ] {
            assert!(!is_checkpoint_file(Path::new(no)), "{no}");
        }
    }
}
