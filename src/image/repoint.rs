//! Re-pointing a child image at another backing file in one atomic step:
//! the capability a stream merge (and the memory-delta merge) commits
//! with.
//!
//! Two shapes exist. qcow2 names its backing file in one header sector, so
//! one `pwrite` is the commit point ([`RepointPlan::OneWrite`]). A
//! differencing VHD needs several writes (header and parent locators), so
//! its plan is a list of [`Patch`]es ([`RepointPlan::Journaled`]): the
//! caller stores them in its journal (that atomic rename is the commit
//! point), then applies them; recovery applies them again after checking,
//! through the same format, that they only re-point that file. A format
//! adds its own shape by implementing [`Repoint`] in its module and
//! returning it from its [`Driver`](super::formats::Driver).

use crate::error::{ImageError, Result};
use crate::fileio;
use crate::storage::Storage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One write of a re-pointing: `bytes` at `offset` of the child's file.
/// Stored as is in the merge journal (`patches`), so the field names stay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub offset: u64,
    /// The bytes, as lower-case hex (the journal is JSON).
    pub hex: String,
}

impl Patch {
    pub fn new(offset: u64, bytes: &[u8]) -> Patch {
        Patch {
            offset,
            hex: hex(bytes),
        }
    }

    /// The bytes; `None` when `hex` is not hex.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        unhex(&self.hex)
    }
}

/// Bytes as lower-case hex, for JSON.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of [`hex`] text; `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let h = text.as_bytes();
    if !h.len().is_multiple_of(2) {
        return None;
    }
    h.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// The backing reference a re-pointed child gets.
#[derive(Clone, Copy, Debug)]
pub struct NewBacking<'a> {
    /// The name as the child records it (relative to its directory, or
    /// absolute).
    pub name: &'a str,
    /// The backing format as the child records it.
    pub format: &'a str,
    /// The new parent's file, for formats that record facts about it
    /// (a VHD its unique id and time stamp); `None` when not open.
    pub path: Option<&'a Path>,
}

/// What re-points one child: computed first (nothing written), then
/// applied; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepointPlan {
    /// One write switches the child: applying the plan is the commit point.
    /// The backing reference as (name, format); `None` for no backing.
    OneWrite(Option<(String, String)>),
    /// Several writes: the caller stores them at its commit point, then
    /// applies them (again, after a crash).
    Journaled(Vec<Patch>),
}

impl RepointPlan {
    /// The writes a journal must store before applying them, if any.
    pub fn patches(&self) -> Option<&[Patch]> {
        match self {
            RepointPlan::OneWrite(_) => None,
            RepointPlan::Journaled(p) => Some(p),
        }
    }
}

/// Re-pointing a child of this format (see the module docs).
pub trait Repoint: Sync {
    /// The plan that makes `child` name `to` (`None`: no backing file).
    /// Writes nothing.
    fn plan(&self, child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan>;

    /// Carries out `plan` and makes it durable.
    fn apply(&self, child: &Path, plan: &RepointPlan) -> Result<()>;

    /// Checks that `patches`, read back from a journal and so not to be
    /// trusted, only re-point `child`.
    fn check(&self, child: &Path, patches: &[Patch]) -> Result<()>;
}

/// The new parent of a child whose format always keeps one (a
/// differencing VHD or VHDX): `to` and its open file; an error naming
/// `kind` ("a differencing VHD") when there is none.
pub fn required_parent<'a>(
    child: &Path,
    to: Option<NewBacking<'a>>,
    kind: &str,
) -> Result<(NewBacking<'a>, &'a Path)> {
    to.and_then(|b| Some((b, b.path?)))
        .ok_or_else(|| ImageError::invalid(child, format!("{kind} cannot lose its parent")))
}

/// The writes of a plan for a format that re-points only by journaled
/// writes; a one-write plan is an error naming `kind`.
pub fn journaled_only<'p>(child: &Path, plan: &'p RepointPlan, kind: &str) -> Result<&'p [Patch]> {
    plan.patches().ok_or_else(|| {
        ImageError::invalid(
            child,
            format!("{kind} is re-pointed by journaled writes, not one"),
        )
    })
}

/// What one format allows in a patch list read back from a journal (not
/// to be trusted): see [`write_checked`].
pub struct PatchLimits<'a> {
    /// What one patch rewrites, for errors ("header write").
    pub what: &'a str,
    pub max_count: usize,
    pub max_bytes: usize,
}

/// Writes `patches` into `file` (of `child`) and makes them durable, after
/// checking all of them against `limits`: at most `max_count` patches,
/// each valid hex of at most `max_bytes` bytes lying inside the file.
/// Nothing is written when one fails.
pub fn write_checked(
    file: &dyn Storage,
    child: &Path,
    patches: &[Patch],
    limits: &PatchLimits<'_>,
) -> Result<()> {
    let what = limits.what;
    if patches.len() > limits.max_count {
        return Err(ImageError::invalid(
            child,
            format!(
                "{} {what}s to apply; at most {} exist",
                patches.len(),
                limits.max_count
            ),
        ));
    }
    let len = fileio::file_len(file, child)?;
    let mut writes = Vec::with_capacity(patches.len());
    for p in patches {
        let bytes = p
            .bytes()
            .filter(|b| b.len() <= limits.max_bytes)
            .ok_or_else(|| {
                ImageError::invalid(
                    child,
                    format!(
                        "{what} at offset {} is not valid hex of at most {} bytes",
                        p.offset, limits.max_bytes
                    ),
                )
            })?;
        if p.offset
            .checked_add(bytes.len() as u64)
            .is_none_or(|e| e > len)
        {
            return Err(ImageError::invalid(
                child,
                format!(
                    "{what} at offset {}, {} bytes, lies outside the file ({len} bytes)",
                    p.offset,
                    bytes.len()
                ),
            ));
        }
        writes.push((p.offset, bytes));
    }
    for (off, bytes) in writes {
        fileio::write_all_at(file, child, &bytes, off)?;
    }
    fileio::sync_data(file, child)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const LIMITS: PatchLimits<'static> = PatchLimits {
        what: "header write",
        max_count: 2,
        max_bytes: 4,
    };

    #[test]
    fn write_checked_writes_all_or_nothing() {
        let child = Path::new("child.img");
        let f = MemStorage::from_bytes(vec![0; 8]);
        let good = Patch::new(0, &[1, 2]);
        // One bad patch after a good one: nothing is written.
        for bad in [
            Patch::new(7, &[1, 2]),
            Patch::new(u64::MAX, &[1]),
            Patch::new(0, &[1; 5]),
            Patch {
                offset: 0,
                hex: "zz".into(),
            },
        ] {
            let e = write_checked(&f, child, &[good.clone(), bad], &LIMITS).unwrap_err();
            assert!(e.to_string().contains("header write at offset"), "{e}");
            assert_eq!(f.to_vec(), vec![0; 8]);
        }
        let three = vec![good.clone(); 3];
        let e = write_checked(&f, child, &three, &LIMITS).unwrap_err();
        assert!(e.to_string().contains("3 header writes to apply"), "{e}");
        assert_eq!(f.to_vec(), vec![0; 8]);
        write_checked(&f, child, &[good, Patch::new(6, &[9, 9])], &LIMITS).unwrap();
        assert_eq!(f.to_vec(), vec![1, 2, 0, 0, 0, 0, 9, 9]);
    }

    #[test]
    fn a_kept_parent_and_journaled_writes_are_required() {
        let child = Path::new("child.vhd");
        let none = NewBacking {
            name: "p.vhd",
            format: "vpc",
            path: None,
        };
        let e = required_parent(child, Some(none), "a differencing VHD").unwrap_err();
        assert!(e.to_string().contains("cannot lose its parent"), "{e}");
        assert!(required_parent(child, None, "a differencing VHD").is_err());
        let with = NewBacking {
            path: Some(Path::new("p.vhd")),
            ..none
        };
        assert_eq!(
            required_parent(child, Some(with), "x").unwrap().1,
            Path::new("p.vhd")
        );
        let one = RepointPlan::OneWrite(None);
        assert!(journaled_only(child, &one, "a differencing VHD").is_err());
        let j = RepointPlan::Journaled(vec![Patch::new(0, &[1])]);
        assert_eq!(journaled_only(child, &j, "x").unwrap().len(), 1);
    }
}
