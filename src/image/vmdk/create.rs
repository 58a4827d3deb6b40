//! Creating a VMDK child (a snapshot's or a clone's delta): an empty
//! monolithicSparse disk with the layout QEMU gives it (header, embedded
//! descriptor in sectors 1-20, redundant grain directory and its tables,
//! grain directory and its tables, grains from a 64 KiB boundary on),
//! whose descriptor names the parent (`parentFileNameHint`) and records
//! its CID (`parentCID`), and copies its disk database (geometry,
//! adapter), so QEMU, VMware and libvmdk read the chain.
//!
//! Grain tables are all preallocated (as QEMU does); they are zeros, so
//! they stay holes in the file until written.

use super::descriptor::{self, Access, Descriptor, ExtentLine, ExtentType};
use super::write::new_cid;
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::ownership::Ownership;
use std::path::Path;

const GRAIN_SECTORS: u64 = 128;
const GT_ENTRIES: u64 = 512;
const DESC_SECTORS: u64 = 20;
/// The largest hosted sparse extent: 2 TiB less a grain.
const MAX_BYTES: u64 = (1 << 41) - GRAIN_SECTORS * 512;

/// Creates at `path` an empty monolithicSparse child of the VMDK at
/// `parent_path`, naming it `name` (relative to `path`'s directory), of
/// `size` bytes, owned `like` the parent.
pub fn create_child(
    path: &Path,
    parent_path: &Path,
    name: &str,
    size: u64,
    like: &Ownership,
) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_BYTES {
        return Err(ImageError::invalid(
            path,
            format!("a VMDK child of {size} bytes: a multiple of 512 up to 2 TiB is needed"),
        ));
    }
    let parent = parent_descriptor(parent_path)?;
    let capacity = size / 512;
    let desc = Descriptor {
        version: 1,
        cid: new_cid(8, parent.cid),
        parent_cid: parent.cid,
        create_type: "monolithicSparse".into(),
        parent_hint: Some(name.to_string()),
        extents: vec![ExtentLine {
            access: Access::ReadWrite,
            sectors: capacity,
            kind: ExtentType::Sparse,
            file: final_name(path),
            offset: 0,
            at: 0,
        }],
        ddb: child_ddb(&parent, capacity),
        ..Descriptor::default()
    };
    let text = descriptor::render(&desc);
    if text.len() as u64 > DESC_SECTORS * 512 {
        return Err(ImageError::invalid(
            path,
            "parent name too long for an embedded descriptor",
        ));
    }
    let layout = Layout::new(capacity);
    let f = crate::ownership::create_replacing(path, like)
        .map_err(|e| ImageError::io(path, "create", 0, e))?;
    let file: &dyn crate::storage::Storage = &f;
    file.set_len(layout.overhead * 512)
        .map_err(|e| ImageError::io(path, "truncate", 0, e))?;
    fileio::write_all_at(file, path, &layout.header(capacity), 0)?;
    fileio::write_all_at(file, path, text.as_bytes(), 512)?;
    for (dir, tables) in [
        (layout.rgd, layout.rgd + layout.gd_sectors),
        (layout.gd, layout.gd + layout.gd_sectors),
    ] {
        let entries: Vec<u8> = (0..layout.gt_count)
            .flat_map(|i| ((tables + i * layout.gt_sectors) as u32).to_le_bytes())
            .collect();
        fileio::write_all_at(file, path, &entries, dir * 512)?;
    }
    f.sync_all()
        .map_err(|e| ImageError::io(path, "fsync", 0, e))
}

/// Where QEMU puts a sparse extent's metadata (sectors).
struct Layout {
    gt_count: u64,
    gt_sectors: u64,
    gd_sectors: u64,
    rgd: u64,
    gd: u64,
    overhead: u64,
}

impl Layout {
    fn new(capacity: u64) -> Layout {
        let gt_count = capacity.div_ceil(GT_ENTRIES * GRAIN_SECTORS);
        let gt_sectors = GT_ENTRIES * 4 / 512;
        let gd_sectors = (gt_count * 4).div_ceil(512);
        let rgd = 1 + DESC_SECTORS;
        let gd = rgd + gd_sectors + gt_count * gt_sectors;
        let overhead =
            (gd + gd_sectors + gt_count * gt_sectors).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
        Layout {
            gt_count,
            gt_sectors,
            gd_sectors,
            rgd,
            gd,
            overhead,
        }
    }

    /// The header sector: version 1, newline check and redundant
    /// directory flags, no compression.
    fn header(&self, capacity: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(super::sparse::MAGIC);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&3u32.to_le_bytes());
        for (at, v) in [
            (12, capacity),
            (20, GRAIN_SECTORS),
            (28, 1),
            (36, DESC_SECTORS),
            (48, self.rgd),
            (56, self.gd),
            (64, self.overhead),
        ] {
            h[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        h[44..48].copy_from_slice(&(GT_ENTRIES as u32).to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h
    }
}

/// The parent's descriptor (it must be a VMDK).
fn parent_descriptor(parent_path: &Path) -> Result<Descriptor> {
    let f = crate::input::open_input(parent_path, false, crate::input::Accept::RegularOrBlock)?;
    let len = f
        .metadata()
        .map_err(|e| ImageError::io(parent_path, "stat", 0, e))?
        .len();
    let text = super::driver::descriptor_text(&f, parent_path, len)?;
    descriptor::parse(parent_path, 0, &text)
}

/// The file name the child will have: a name being created under a
/// temporary suffix gets its final `.vmdk` name in its extent line.
fn final_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.find(".vmdk") {
        Some(i) => name[..i + 5].to_string(),
        None => name,
    }
}

/// The parent's geometry and adapter, else QEMU's defaults for the size.
fn child_ddb(parent: &Descriptor, capacity: u64) -> Vec<(String, String)> {
    let keep = [
        "ddb.virtualHWVersion",
        "ddb.geometry.cylinders",
        "ddb.geometry.heads",
        "ddb.geometry.sectors",
        "ddb.adapterType",
    ];
    let from_parent: Vec<(String, String)> = parent
        .ddb
        .iter()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .cloned()
        .collect();
    if from_parent
        .iter()
        .any(|(k, _)| k == "ddb.geometry.cylinders")
    {
        return from_parent;
    }
    let cylinders = (capacity / (16 * 63)).min(16383);
    vec![
        ("ddb.virtualHWVersion".into(), "4".into()),
        ("ddb.geometry.cylinders".into(), cylinders.to_string()),
        ("ddb.geometry.heads".into(), "16".into()),
        ("ddb.geometry.sectors".into(), "63".into()),
        ("ddb.adapterType".into(), "ide".into()),
    ]
}
