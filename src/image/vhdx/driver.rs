//! VHDX in the format registry (see `image::formats`): recognised by its
//! `vhdxfile` identifier (AVHDX files are VHDX), read and written; its
//! children are differencing VHDXs (`create`). Its one
//! repair is the log replay a read-write open needs: written into the file
//! while the caller holds the write lock (`repair_dirty`), never on a
//! read-only open (those replay in memory, see `log`).

use super::{create, header, log, reparent, VhdxLayer};
use crate::error::Result;
use crate::image::formats::{AdoptId, ChildRequest, Driver, MergeCaps, Repair};
use crate::image::repoint::{self, NewBacking, Patch, Repoint, RepointPlan};
use crate::image::{Format, Layer};
use crate::storage::Storage;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

pub struct VhdxDriver;

pub static DRIVER: VhdxDriver = VhdxDriver;

impl Driver for VhdxDriver {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn names(&self) -> &'static [&'static str] {
        &["vhdx"]
    }

    /// New VHDX images snaptree makes are differencing children, which
    /// Hyper-V names `.avhdx`.
    fn extension(&self) -> &'static str {
        "avhdx"
    }

    fn sniff(&self, _file: &File, _path: &Path, magic: &[u8]) -> bool {
        header::is_vhdx(magic)
    }

    /// Read-only opens replay a log in memory. A read-write open of a file
    /// with a log to replay is refused with the reason, so the tree runs
    /// `repair_dirty` (the replay into the file, under its write lock)
    /// and tries again.
    fn open(&self, path: &Path, file: File, writable: bool) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(VhdxLayer::open_with(
            path,
            Box::new(file),
            writable,
        )?))
    }

    /// As a VHD: a differencing VHDX names only a VHDX parent and keeps
    /// one; its children check its data write GUID.
    fn merge_caps(&self) -> MergeCaps {
        MergeCaps {
            can_repoint: true,
            repoint_needs_parent: true,
            parent_same_format: true,
            can_commit_into: true,
            children_check_id: true,
        }
    }

    fn repoint(&self) -> Option<&dyn Repoint> {
        Some(self)
    }

    fn adopt_id(&self) -> Option<&dyn AdoptId> {
        Some(self)
    }

    /// Hyper-V reads VHDX chains only: a VHDX point's children are
    /// differencing VHDXs (`create`).
    fn children_own_format(&self) -> bool {
        true
    }

    fn create_child(&self, req: &ChildRequest<'_>) -> Result<()> {
        create::create_child(req)
    }

    fn repair(&self) -> Option<&dyn Repair> {
        Some(self)
    }
}

impl Repair for VhdxDriver {
    /// VHDX leaks nothing snaptree could free.
    fn repair(&self, _path: &Path) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Replays the log into the file (the caller holds the write lock):
    /// how many log entries were applied; `None` when there was no log or
    /// the file is not a VHDX.
    fn repair_dirty(&self, file: &dyn Storage, path: &Path) -> Result<Option<u64>> {
        let mut magic = [0u8; 8];
        if file.read_exact_at(&mut magic, 0).is_err() || !header::is_vhdx(&magic) {
            return Ok(None);
        }
        replay_into_file(file, path).map(|n| n.map(|n| n as u64))
    }
}

/// Writes a pending log into the file; the number of entries, `None` when
/// there was none. The caller holds the write lock.
pub fn replay_into_file(file: &dyn Storage, path: &Path) -> Result<Option<usize>> {
    let h = header::read_current(file, path)?;
    let len = crate::fileio::file_len(file, path)?;
    let Some(r) = log::find(file, path, &h, len)? else {
        return Ok(None);
    };
    log::apply_to_file(file, path, &h, &r)?;
    Ok(Some(r.entries))
}

/// The locator writes, journaled (see `reparent`).
impl Repoint for VhdxDriver {
    fn plan(&self, child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan> {
        let (b, parent) = repoint::required_parent(child, to, "a differencing VHDX")?;
        reparent::parent_patches(child, parent, b.name).map(RepointPlan::Journaled)
    }

    fn apply(&self, child: &Path, plan: &RepointPlan) -> Result<()> {
        reparent::apply(
            child,
            repoint::journaled_only(child, plan, "a differencing VHDX")?,
        )
    }

    fn check(&self, child: &Path, patches: &[Patch]) -> Result<()> {
        reparent::check_patches(child, patches)
    }
}

/// A VHDX's identity is its data write GUID (what `parent_linkage` names).
impl AdoptId for VhdxDriver {
    fn set_id(&self, path: &Path, id: [u8; 16]) -> Result<()> {
        reparent::set_data_write_guid(path, id)
    }
}
