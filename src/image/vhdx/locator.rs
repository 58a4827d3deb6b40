//! Finding a differencing VHDX's parent from its parent locator
//! (MS-VHDX 2.6.2.6): `relative_path` first, then `volume_path` and
//! `absolute_win32_path` mapped to the child's directory (a Windows path
//! means nothing here but its file name), and checking the parent found by
//! `parent_linkage` (or `parent_linkage2`) against the parent's data write
//! GUID, as Hyper-V does.
//!
//! Where a name may lead is the chain's business (`confine`): this only
//! picks the name.

use super::guid::{self, Guid};
use crate::error::{ImageError, Result};
use std::path::Path;

/// The parent a locator names.
#[derive(Clone, Debug)]
pub struct ParentRef {
    /// Relative to the child's directory, `/`-separated.
    pub name: String,
    pub linkage: Guid,
    pub linkage2: Option<Guid>,
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The last component of a Windows (or POSIX) path.
fn file_name(p: &str) -> Option<&str> {
    p.rsplit(['\\', '/'])
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

/// The candidate names in the order they are tried.
pub fn candidates(pairs: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = value(pairs, "relative_path") {
        let mut r = r.replace('\\', "/");
        while let Some(rest) = r.strip_prefix("./") {
            r = rest.to_string();
        }
        if !r.is_empty() && !r.starts_with('/') && !r.contains(':') {
            out.push(r);
        }
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(n) = value(pairs, key).and_then(file_name) {
            if !out.iter().any(|o| o == n) {
                out.push(n.to_string());
            }
        }
    }
    out
}

/// Reads the parent reference of the child at `path` from its locator
/// (`at`: the locator's file offset, for errors): the first candidate that
/// exists beside the child, else the first candidate (the chain then says
/// it is missing).
pub fn parent_ref(path: &Path, pairs: &[(String, String)], at: u64) -> Result<ParentRef> {
    let linkage = |key: &str| -> Result<Option<Guid>> {
        match value(pairs, key) {
            None => Ok(None),
            Some(v) => guid::parse(v).map(Some).ok_or_else(|| {
                ImageError::corrupt(
                    path,
                    at,
                    format!("parent locator {key} {v:?} is not a GUID"),
                )
            }),
        }
    };
    let Some(linkage1) = linkage("parent_linkage")? else {
        return Err(ImageError::corrupt(
            path,
            at,
            "parent locator has no parent_linkage",
        ));
    };
    let names = candidates(pairs);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = names
        .iter()
        .find(|n| dir.join(n).is_file())
        .or(names.first())
        .cloned()
        .ok_or_else(|| {
            ImageError::corrupt(
                path,
                at,
                "parent locator names no usable parent path (relative_path, volume_path, absolute_win32_path)",
            )
        })?;
    Ok(ParentRef {
        name,
        linkage: linkage1,
        linkage2: linkage("parent_linkage2")?,
    })
}

/// Checks that the parent's data write GUID is one the child accepts;
/// returns the one that matched.
pub fn check_linkage(child: &Path, p: &ParentRef, parent: &Path, found: &Guid) -> Result<Guid> {
    if *found == p.linkage || p.linkage2 == Some(*found) {
        return Ok(*found);
    }
    Err(ImageError::invalid(
        child,
        format!(
            "parent linkage mismatch: this differencing disk expects data write GUID {{{}}}, but its parent {} has {{{}}}; the parent was modified after the child was made",
            guid::text(&p.linkage),
            parent.display(),
            guid::text(found)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn relative_path_first_then_windows_paths_by_file_name() {
        let p = kv(&[
            ("absolute_win32_path", "C:\\VMs\\Disks\\base.vhdx"),
            ("relative_path", ".\\sub\\base.vhdx"),
            (
                "volume_path",
                "\\\\?\\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\\VMs\\other.vhdx",
            ),
        ]);
        assert_eq!(candidates(&p), ["sub/base.vhdx", "other.vhdx", "base.vhdx"]);
        assert_eq!(
            candidates(&kv(&[("relative_path", "C:\\x.vhdx")])),
            Vec::<String>::new()
        );
    }
}
