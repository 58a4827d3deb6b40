//! The format registry: one [`Driver`] per format, and what each format
//! can do beyond reading, as capability queries the layers above use
//! instead of naming formats.
//!
//! An open image is a [`Layer`](super::Layer) (reading and mapping,
//! writing, identity, locking: the traits in `image/mod.rs`). What is done
//! to an image *file* by path lives here: re-pointing its backing
//! reference ([`Repoint`]), giving it another identity ([`AdoptId`]),
//! repairing it after a crash ([`Repair`]), creating a child on it, and
//! the merge directions it allows ([`MergeCaps`]).
//!
//! Adding a format touches:
//! - `src/image/<format>/` (or `<format>.rs`): the layer, implementing
//!   `ReadMap` (+ `Writable`, `Identity`, `Locking` as it can), and a
//!   `Driver` (`DRIVER`) saying how it is recognised and opened and which
//!   capabilities it has;
//! - `src/image/mod.rs`: its `mod` line and its [`Format`] variant;
//! - this file: its line in [`FORMATS`].
//!
//! `merge/`, `tree/` and `fs/` never name a format.

use super::repoint::Repoint;
use super::{Format, Layer};
use crate::error::{ImageError, Result};
use crate::ownership::Ownership;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Every format snaptree opens. Magic detection asks them in this order;
/// a file no driver recognises is raw.
pub static FORMATS: [&dyn Driver; 5] = [
    &super::qcow2::driver::DRIVER,
    &super::vhd::driver::DRIVER,
    &super::vhdx::driver::DRIVER,
    &super::vmdk::driver::DRIVER,
    &super::raw::DRIVER,
];

/// Which merges a format allows (see `merge/plan.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergeCaps {
    /// A child of this format can be re-pointed at another backing file
    /// (a stream into it).
    pub can_repoint: bool,
    /// ... but never to no backing file (a differencing VHD stays one).
    pub repoint_needs_parent: bool,
    /// ... and only at a parent of its own format (a VHD names only VHDs).
    pub parent_same_format: bool,
    /// A child's data can be committed into an image of this format, whose
    /// file then takes the child's name.
    pub can_commit_into: bool,
    /// Children check this format's identity (a VHD's unique id): a file
    /// that takes a name children use must adopt the id they expect.
    pub children_check_id: bool,
}

/// Giving an image file another identity (what its children check), in
/// place and durably.
pub trait AdoptId: Sync {
    fn set_id(&self, path: &Path, id: [u8; 16]) -> Result<()>;
}

/// Repairing what a crash left behind in an image file that was being
/// written (leaked clusters), never losing data.
pub trait Repair: Sync {
    /// How many units were freed; `None` when the file is not of this
    /// format or not in a state this repairs.
    fn repair(&self, path: &Path) -> Result<Option<u64>>;

    /// Repairs an image a crash left marked dirty (its metadata says it
    /// may be inconsistent) before anything writes it; the caller holds
    /// its write lock. How many units changed; `None` when not dirty.
    fn repair_dirty(&self, file: &dyn crate::storage::Storage, path: &Path) -> Result<Option<u64>>;
}

/// One format: how it is recognised and opened, and what it can do.
pub trait Driver: Sync {
    fn format(&self) -> Format;

    /// Names a backing-format field uses for it; the first is its own
    /// (QEMU's) name.
    fn names(&self) -> &'static [&'static str];

    /// The file extension new images of this format get.
    fn extension(&self) -> &'static str;

    /// Whether the file is of this format, from its first bytes (`magic`,
    /// up to 8) and, where the format needs it, its name or its end.
    fn sniff(&self, file: &File, path: &Path, magic: &[u8]) -> bool;

    fn open(&self, path: &Path, file: File, writable: bool) -> Result<Arc<dyn Layer>>;

    fn merge_caps(&self) -> MergeCaps;

    /// Whether snapshots of an image of this format get a child of the same
    /// format (else a qcow2 overlay; see `overlay`).
    fn children_own_format(&self) -> bool {
        false
    }

    /// Creates at `path` an empty child of `parent` naming it `name` (see
    /// `overlay::create_child`).
    fn create_child(&self, req: &ChildRequest<'_>) -> Result<()> {
        Err(ImageError::unsupported(
            req.path,
            format!("snaptree does not create {} images", self.names()[0]),
        ))
    }

    fn repoint(&self) -> Option<&dyn Repoint> {
        None
    }

    fn adopt_id(&self) -> Option<&dyn AdoptId> {
        None
    }

    fn repair(&self) -> Option<&dyn Repair> {
        None
    }

    /// The backing file name of an image that does not open, read with no
    /// more checks than it takes to read it safely.
    fn backing_name_unchecked(&self, file: &File) -> Option<String> {
        let _ = file;
        None
    }

    /// Why the image at `path` takes part in no merge although its format
    /// does (a kind of the format that merges cannot write, re-point or
    /// remove), naming the kind; `None` when it can.
    fn merge_refusal(&self, path: &Path) -> Option<String> {
        let _ = path;
        None
    }

    /// Files other than `path` that belong to that image alone (extent
    /// files): removed with it, and a file that has some is never
    /// replaced by a commit (they would be left behind).
    fn companions(&self, path: &Path) -> Vec<PathBuf> {
        let _ = path;
        Vec::new()
    }
}

/// What a new child is created from (see [`Driver::create_child`]).
pub struct ChildRequest<'a> {
    pub path: &'a Path,
    pub parent: &'a dyn Layer,
    pub parent_path: &'a Path,
    pub name: &'a str,
    pub size: u64,
    pub like: Ownership,
}

impl Format {
    /// This format's driver.
    pub fn driver(self) -> &'static dyn Driver {
        // Every variant has a driver (a unit test checks it); raw is the
        // harmless answer should one be missing.
        FORMATS
            .iter()
            .copied()
            .find(|d| d.format() == self)
            .unwrap_or(&super::raw::DRIVER)
    }

    pub fn merge_caps(self) -> MergeCaps {
        self.driver().merge_caps()
    }

    /// Whether a child of this format can be re-pointed past a hidden
    /// parent of `hidden` format that does (or not) have a parent itself.
    pub fn can_stream_into(self, hidden: Format, hidden_has_parent: bool) -> bool {
        let caps = self.merge_caps();
        caps.can_repoint
            && (!caps.repoint_needs_parent || hidden_has_parent)
            && (!caps.parent_same_format || hidden == self)
    }

    /// Plain bytes: what a file no format recognises is.
    pub fn raw() -> Format {
        super::raw::DRIVER.format()
    }

    pub fn is_raw(self) -> bool {
        self == Format::raw()
    }
}

/// Frees what a crash left leaked in the image at `path`, by whichever
/// format repairs it; `None` when none does.
pub fn repair_after_crash(path: &Path) -> Result<Option<u64>> {
    for d in FORMATS {
        if let Some(r) = d.repair() {
            if let Some(n) = r.repair(path)? {
                return Ok(Some(n));
            }
        }
    }
    Ok(None)
}

/// [`repair_after_crash`] of `path`, as a line for `status` when it
/// freed something or failed (`interrupted` says by what, for the
/// message); `None` when there was nothing to repair.
pub fn repair_and_report(path: &Path, interrupted: &str) -> Option<String> {
    match repair_after_crash(path) {
        Ok(Some(n)) if n > 0 => Some(format!(
            "{}: freed {n} clusters an interrupted {interrupted} had leaked",
            path.display()
        )),
        Ok(_) => None,
        Err(err) => Some(format!("{}: leak repair: {err}", path.display())),
    }
}

/// The format of the file at `path`, by its contents (see `probe`).
pub fn format_of(path: &Path) -> Result<Format> {
    let file = crate::input::open_input(path, false, crate::input::Accept::RegularOrBlock)?;
    super::probe::detect_format(&file, path)
}

/// The re-pointing capability of `format`, or why it has none.
pub fn repoint_of(format: Format, child: &Path) -> Result<&'static dyn Repoint> {
    format.driver().repoint().ok_or_else(|| {
        ImageError::unsupported(
            child,
            format!("a {} image names no backing file", format.name()),
        )
    })
}

/// Gives the image at `path` (of `format`) the identity `id`.
pub fn set_id(format: Format, path: &Path, id: [u8; 16]) -> Result<()> {
    match format.driver().adopt_id() {
        Some(a) => a.set_id(path, id),
        None => Err(ImageError::unsupported(
            path,
            format!("a {} image carries no unique id", format.name()),
        )),
    }
}

/// Why the image at `path` (of `format`) takes part in no merge (see
/// [`Driver::merge_refusal`]).
pub fn merge_refusal(format: Format, path: &Path) -> Option<String> {
    format.driver().merge_refusal(path)
}

/// The files that go with the image at `path` (see
/// [`Driver::companions`]); none when it does not open.
pub fn companions(path: &Path) -> Vec<PathBuf> {
    format_of(path).map_or_else(|_| Vec::new(), |f| f.driver().companions(path))
}

/// Removes the image at `path` and its companions; the companions go
/// first, so an interrupted removal leaves the file that lists the rest
/// for the next try. A companion already gone is fine.
pub fn remove_image(path: &Path) -> std::io::Result<()> {
    for c in companions(path) {
        match std::fs::remove_file(&c) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::remove_file(path)
}

/// The backing file name of an image that does not open (see
/// [`Driver::backing_name_unchecked`]).
pub fn backing_name_unchecked(path: &Path) -> Option<String> {
    let file = crate::input::open_input(path, false, crate::input::Accept::RegularOrBlock).ok()?;
    FORMATS.iter().find_map(|d| d.backing_name_unchecked(&file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_has_one_driver_and_its_names() {
        for f in [
            Format::Qcow2,
            Format::Raw,
            Format::Vhd,
            Format::Vhdx,
            Format::Vmdk,
        ] {
            assert_eq!(FORMATS.iter().filter(|d| d.format() == f).count(), 1);
            assert_eq!(f.driver().format(), f);
            for n in f.driver().names() {
                assert_eq!(Format::from_name(n), Some(f));
            }
        }
    }

    /// The merge directions `merge/plan.rs` decided by format before the
    /// capability query, for every pair of formats.
    #[test]
    fn merge_caps_keep_the_decisions_by_format() {
        let all = [
            Format::Qcow2,
            Format::Raw,
            Format::Vhd,
            Format::Vhdx,
            Format::Vmdk,
        ];
        for c in all {
            for h in all {
                for has_parent in [false, true] {
                    let old = match c {
                        Format::Qcow2 => true,
                        // A differencing disk names only its own format.
                        Format::Vhd | Format::Vhdx => has_parent && h == c,
                        // A VMDK child names VMDK parents only, or none.
                        Format::Vmdk => h == Format::Vmdk,
                        Format::Raw => false,
                    };
                    assert_eq!(c.can_stream_into(h, has_parent), old);
                }
            }
        }
        assert!(Format::Qcow2.merge_caps().can_commit_into);
        assert!(Format::Vhd.merge_caps().can_commit_into);
        assert!(Format::Vmdk.merge_caps().can_commit_into);
        assert!(Format::Vmdk.merge_caps().children_check_id);
        assert!(!Format::Raw.merge_caps().can_commit_into);
        assert!(Format::Vhd.merge_caps().children_check_id);
        assert!(Format::Vhdx.merge_caps().can_commit_into);
        assert!(Format::Vhdx.merge_caps().children_check_id);
        assert!(!Format::Qcow2.merge_caps().children_check_id);
        assert!(Format::raw().is_raw() && !Format::Qcow2.is_raw());
    }
}
