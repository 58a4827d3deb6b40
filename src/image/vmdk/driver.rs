//! VMDK in the format registry (see `image::formats`): recognised by a
//! hosted sparse header that embeds a descriptor (`KDMV`) or by a
//! descriptor file's first line (`# Disk DescriptorFile`); opened after
//! checking a child's `parentCID` against its parent's `CID`; children
//! are monolithicSparse deltas (`create`). Merges stream into and commit
//! into hosted sparse disks (`merge_caps`): a child is re-pointed by its
//! descriptor's parent name and CID (`reparent`), a file that takes a
//! name children check adopts the CID they expect; other kinds are
//! refused with their kind named (`merging`).
//!
//! Extent files on their own (a twoGbMaxExtent disk's `-s001.vmdk`,
//! a `-flat.vmdk`, ESXi's `-delta.vmdk` and `-sesparse.vmdk`) are not
//! disks: they have no descriptor, so no size, CID or parent of their own
//! (QEMU refuses them too), and a directory scan must not show them as
//! points. They are not recognised.

use super::descriptor::{self, NO_PARENT};
use super::extents::DirFiles;
use super::{sparse, VmdkLayer};
use crate::confine::Confine;
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::image::formats::{AdoptId, ChildRequest, Driver, MergeCaps};
use crate::image::repoint::{NewBacking, Patch, Repoint, RepointPlan};
use crate::image::{Format, Layer};
use crate::storage::Storage;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct VmdkDriver;

pub static DRIVER: VmdkDriver = VmdkDriver;

impl Driver for VmdkDriver {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn names(&self) -> &'static [&'static str] {
        &["vmdk"]
    }

    fn extension(&self) -> &'static str {
        "vmdk"
    }

    fn sniff(&self, file: &File, _path: &Path, magic: &[u8]) -> bool {
        if magic.starts_with(sparse::MAGIC) {
            return embeds_descriptor(file);
        }
        let mut sig = [0u8; 21];
        magic.starts_with(&descriptor::SIGNATURE[..magic.len().min(8)])
            && magic.len() == 8
            && FileExt::read_exact_at(file, &mut sig, 0).is_ok()
            && sig == descriptor::SIGNATURE
    }

    fn open(&self, path: &Path, file: File, writable: bool) -> Result<Arc<dyn Layer>> {
        let files = DirFiles::for_descriptor(path, writable)?;
        let layer = VmdkLayer::open_storage(path, Arc::new(file), &files, writable)?;
        check_parent_cid(&layer)?;
        Ok(Arc::new(layer))
    }

    /// A VMDK child names VMDK parents only (QEMU and VMware check the
    /// parent's CID, which only a VMDK has), or none (a base); children
    /// check the CID. Which kinds of VMDK: `merge_refusal`.
    fn merge_caps(&self) -> MergeCaps {
        MergeCaps {
            can_repoint: true,
            repoint_needs_parent: false,
            parent_same_format: true,
            can_commit_into: true,
            children_check_id: true,
        }
    }

    fn merge_refusal(&self, path: &Path) -> Option<String> {
        super::merging::refusal(path)
    }

    fn companions(&self, path: &Path) -> Vec<PathBuf> {
        super::merging::companions(path)
    }

    fn repoint(&self) -> Option<&dyn Repoint> {
        Some(self)
    }

    fn adopt_id(&self) -> Option<&dyn AdoptId> {
        Some(self)
    }

    /// A snapshot or clone of a VMDK gets a VMDK delta, as in VMware: a
    /// VMware or libvmdk reader of the tree sees a VMDK chain.
    fn children_own_format(&self) -> bool {
        true
    }

    fn create_child(&self, req: &ChildRequest<'_>) -> Result<()> {
        super::create::create_child(req.path, req.parent_path, req.name, req.size, &req.like)
    }

    fn backing_name_unchecked(&self, file: &File) -> Option<String> {
        let len = file.metadata().ok()?.len();
        let path = Path::new("");
        let text = descriptor_text(file, path, len).ok()?;
        descriptor::parse(path, 0, &text).ok()?.parent_hint
    }
}

/// Whether a `KDMV` file holds a descriptor (a disk), not just an extent.
fn embeds_descriptor(file: &File) -> bool {
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    !sparse::is_bare_extent(file, len)
}

/// The descriptor text of a VMDK file (embedded or the whole file).
pub(super) fn descriptor_text(file: &dyn Storage, path: &Path, len: u64) -> Result<Vec<u8>> {
    let mut magic = [0u8; 4];
    fileio::read_exact_at(file, path, &mut magic, 0, "VMDK magic")?;
    if &magic == sparse::MAGIC {
        let h = sparse::read_header(file, path, len)?;
        if !h.has_descriptor() {
            return Err(ImageError::unsupported(path, "no embedded descriptor"));
        }
        let text = sparse::read_descriptor(file, path, &h)?.1;
        if !sparse::descriptor_present(&text) {
            return Err(ImageError::unsupported(path, "no embedded descriptor"));
        }
        return Ok(text);
    }
    super::read_descriptor_file(file, path, len)
}

/// The CID of the VMDK at `path`, if it is one that reads.
fn cid_of(path: &Path) -> Option<u32> {
    let f = crate::input::open_input(path, false, crate::input::Accept::Regular).ok()?;
    let len = f.metadata().ok()?.len();
    let text = descriptor_text(&f, path, len).ok()?;
    descriptor::parse(path, 0, &text).ok().map(|d| d.cid)
}

/// A child records its parent's CID; a parent whose CID differs was
/// written or replaced after the child was made, and reading through it
/// would mix two disks (QEMU refuses such reads, too). Checked here, on
/// the parent the hint names inside the child's directory, so the error
/// says which CIDs differ; a parent elsewhere is checked by the chain
/// through `Identity`.
fn check_parent_cid(layer: &VmdkLayer) -> Result<()> {
    let d = layer.descriptor();
    let Some(hint) = &d.parent_hint else {
        return Ok(());
    };
    if d.parent_cid == NO_PARENT {
        return Ok(());
    }
    let path = crate::image::ReadMap::path(layer);
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(confine) = Confine::new(dir, false) else {
        return Ok(());
    };
    let Ok(parent) = confine.reference(dir, hint) else {
        return Ok(());
    };
    match cid_of(&parent) {
        Some(cid) if cid != d.parent_cid => Err(ImageError::invalid(
            path,
            format!(
                "parent CID mismatch: this disk expects parentCID {:08x}, but its parent {} has CID {cid:08x}; \
                 the parent was written or replaced after this disk was made",
                d.parent_cid,
                parent.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// A descriptor file by rename, an embedded descriptor journaled (see
/// `reparent`).
impl Repoint for VmdkDriver {
    fn plan(&self, child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan> {
        super::reparent::plan(child, to)
    }

    fn apply(&self, child: &Path, plan: &RepointPlan) -> Result<()> {
        super::reparent::apply(child, plan)
    }

    fn check(&self, child: &Path, patches: &[Patch]) -> Result<()> {
        super::reparent::check(child, patches)
    }
}

/// The identity children check is the CID (`cid_id`).
impl AdoptId for VmdkDriver {
    fn set_id(&self, path: &Path, id: [u8; 16]) -> Result<()> {
        super::reparent::set_cid(path, id)
    }
}
