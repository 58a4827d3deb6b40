//! qcow2 in the format registry (see `image::formats`): recognised by its
//! magic; re-pointed by one header write (`rebase`); leaks repaired after
//! a crash (`repair`); children are qcow2 overlays (`create`).

use super::create::{create, CreateOptions};
use super::{header, rebase, repair, Qcow2Layer};
use crate::error::{ImageError, Result};
use crate::image::formats::{ChildRequest, Driver, MergeCaps, Repair};
use crate::image::repoint::{NewBacking, Patch, Repoint, RepointPlan};
use crate::image::{Format, Layer};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

pub struct Qcow2Driver;

pub static DRIVER: Qcow2Driver = Qcow2Driver;

impl Driver for Qcow2Driver {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn names(&self) -> &'static [&'static str] {
        &["qcow2"]
    }

    fn extension(&self) -> &'static str {
        "qcow2"
    }

    fn sniff(&self, _file: &File, _path: &Path, magic: &[u8]) -> bool {
        magic.len() >= 4 && &magic[..4] == header::MAGIC
    }

    fn open(&self, path: &Path, file: File, writable: bool) -> Result<Arc<dyn Layer>> {
        Ok(Arc::new(Qcow2Layer::open(path, file, writable)?))
    }

    fn merge_caps(&self) -> MergeCaps {
        MergeCaps {
            can_repoint: true,
            repoint_needs_parent: false,
            parent_same_format: false,
            can_commit_into: true,
            children_check_id: false,
        }
    }

    fn create_child(&self, req: &ChildRequest<'_>) -> Result<()> {
        let mut opts = CreateOptions::new(req.size);
        opts.backing = Some((req.name.to_string(), req.parent.format().name().to_string()));
        opts.like = Some(req.like);
        if let Some(cs) = req.parent.info().ok().and_then(|i| i.cluster_size) {
            opts.cluster_bits = cs.trailing_zeros().clamp(9, 21);
        }
        create(req.path, &opts)
    }

    fn repoint(&self) -> Option<&dyn Repoint> {
        Some(self)
    }

    fn repair(&self) -> Option<&dyn Repair> {
        Some(self)
    }

    fn backing_name_unchecked(&self, file: &File) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let mut h = [0u8; 20];
        file.read_exact_at(&mut h, 0).ok()?;
        if &h[..4] != header::MAGIC {
            return None;
        }
        let off = u64::from_be_bytes(h[8..16].try_into().ok()?);
        let len = u32::from_be_bytes(h[16..20].try_into().ok()?) as usize;
        if off == 0 || len == 0 || len > 1023 || off > 2 << 20 {
            return None;
        }
        let mut name = vec![0u8; len];
        file.read_exact_at(&mut name, off).ok()?;
        String::from_utf8(name).ok().filter(|n| !n.contains('\0'))
    }
}

/// One header `pwrite` names the new backing file (see `rebase`).
impl Repoint for Qcow2Driver {
    fn plan(&self, _child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan> {
        Ok(RepointPlan::OneWrite(
            to.map(|b| (b.name.to_string(), b.format.to_string())),
        ))
    }

    fn apply(&self, child: &Path, plan: &RepointPlan) -> Result<()> {
        match plan {
            RepointPlan::OneWrite(b) => {
                rebase::set_backing(child, b.as_ref().map(|(n, f)| (n.as_str(), f.as_str())))
            }
            RepointPlan::Journaled(_) => Err(not_journaled(child)),
        }
    }

    fn check(&self, child: &Path, _patches: &[Patch]) -> Result<()> {
        Err(not_journaled(child))
    }
}

fn not_journaled(child: &Path) -> ImageError {
    ImageError::invalid(
        child,
        "merge journal: a qcow2 image is re-pointed by one header write, not by journaled writes",
    )
}

impl Repair for Qcow2Driver {
    fn repair(&self, path: &Path) -> Result<Option<u64>> {
        repair::repair_leaks(path)
    }

    fn repair_dirty(&self, file: &dyn crate::storage::Storage, path: &Path) -> Result<Option<u64>> {
        repair::repair_dirty_in(file, path)
    }
}
