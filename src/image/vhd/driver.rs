//! VHD in the format registry (see `image::formats`): recognised by its
//! footer cookie (a fixed VHD by its name and checksummed footer);
//! re-pointed by journaled writes and given another unique id
//! (`reparent`); children are differencing VHDs (`create`).

use super::{create, footer, reparent, VhdLayer};
use crate::error::Result;
use crate::image::formats::{AdoptId, ChildRequest, Driver, MergeCaps};
use crate::image::repoint::{self, NewBacking, Patch, Repoint, RepointPlan};
use crate::image::{Format, Layer};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

pub struct VhdDriver;

pub static DRIVER: VhdDriver = VhdDriver;

impl Driver for VhdDriver {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn names(&self) -> &'static [&'static str] {
        &["vpc", "vhd"]
    }

    fn extension(&self) -> &'static str {
        "vhd"
    }

    /// Dynamic and differencing VHDs have a footer copy at the start; a
    /// file named `*.vhd` with a valid checksummed footer at the end is a
    /// fixed VHD (a raw disk can end in any bytes its guest wrote, so the
    /// footer alone does not decide).
    fn sniff(&self, file: &File, path: &Path, magic: &[u8]) -> bool {
        magic.len() == 8 && magic == footer::COOKIE
            || named_vhd(path) && footer::is_fixed_vhd(file, path)
    }

    fn open(&self, path: &Path, file: File, writable: bool) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(VhdLayer::open_with(path, file, writable)?))
    }

    /// A VHD names its parent only as a differencing disk, and only a
    /// VHD; its children check its unique id.
    fn merge_caps(&self) -> MergeCaps {
        MergeCaps {
            can_repoint: true,
            repoint_needs_parent: true,
            parent_same_format: true,
            can_commit_into: true,
            children_check_id: true,
        }
    }

    /// XCP and Hyper-V read VHD chains only, and a qcow2 overlay on a
    /// differencing VHD would ask QEMU to open that VHD without its parent.
    fn children_own_format(&self) -> bool {
        true
    }

    fn create_child(&self, req: &ChildRequest<'_>) -> Result<()> {
        create::create_differencing_like(req.path, req.parent_path, Some(&req.like))?;
        reparent::set_parent(req.path, req.parent_path, req.name)
    }

    fn repoint(&self) -> Option<&dyn Repoint> {
        Some(self)
    }

    fn adopt_id(&self) -> Option<&dyn AdoptId> {
        Some(self)
    }
}

/// Whether the file name says VHD (`.vhd`, `.vpc`, any case).
fn named_vhd(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("vhd") || e.eq_ignore_ascii_case("vpc"))
}

/// The header and locator writes, journaled (see `reparent`).
impl Repoint for VhdDriver {
    fn plan(&self, child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan> {
        let (b, parent) = repoint::required_parent(child, to, "a differencing VHD")?;
        reparent::parent_patches(child, parent, b.name).map(RepointPlan::Journaled)
    }

    fn apply(&self, child: &Path, plan: &RepointPlan) -> Result<()> {
        reparent::apply(
            child,
            repoint::journaled_only(child, plan, "a differencing VHD")?,
        )
    }

    fn check(&self, child: &Path, patches: &[Patch]) -> Result<()> {
        reparent::check_patches(child, patches)
    }
}

impl AdoptId for VhdDriver {
    fn set_id(&self, path: &Path, id: [u8; 16]) -> Result<()> {
        reparent::set_unique_id(path, id)
    }
}
