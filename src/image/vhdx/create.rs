//! Creating an empty differencing VHDX (what `ctl snapshot` and `clone`
//! put on a VHDX point): QEMU cannot make one, so snaptree lays it out
//! itself, as MS-VHDX 2.1 describes and as QEMU lays out the images it
//! creates: headers and region tables in the first 1 MiB, a 1 MiB empty
//! log, the metadata region, then the BAT (every block not present, so
//! everything reads from the parent).
//!
//! The child copies the parent's block size, sector sizes and virtual
//! size, and names it in a parent locator (type B04AEFB7-...): its data
//! write GUID (`parent_linkage`, which readers check), the name relative
//! to the child's directory (`relative_path`, `.\`-prefixed with
//! backslashes, as Hyper-V writes it) and its absolute path
//! (`absolute_win32_path`, the path the VHD W2ku locator holds, with
//! backslashes: libvhdi looks for the file name after the last one).
//! Both headers are valid (sequence 0 and 1) with a zero log GUID, so
//! nothing is to be replayed.

use super::bat::Geometry;
use super::guid::{self, Guid};
use super::header::{FILE_ID, HEADER_AT, HEADER_LEN, REGION_AT, REGION_LEN};
use super::metadata::Metadata;
use super::write::new_guid;
use super::{crc32c_of, VhdxLayer, MIB};
use crate::error::{ImageError, Result};
use crate::fileio::write_all_at;
use crate::image::formats::ChildRequest;
use crate::ownership::{new_file, Ownership};
use std::path::Path;

const LOG_AT: u64 = MIB;
const LOG_LEN: u64 = MIB;
const METADATA_AT: u64 = 2 * MIB;
const METADATA_LEN: u64 = MIB;
const BAT_AT: u64 = 3 * MIB;
/// Where items start in the metadata region (after the 64 KiB table).
const ITEMS_AT: usize = 64 * 1024;
/// Metadata item flags (MS-VHDX 2.6.1.2).
const IS_VIRTUAL_DISK: u32 = 2;
const IS_REQUIRED: u32 = 4;

/// Creates the child `req` asks for; the parent must be a VHDX.
pub fn create_child(req: &ChildRequest<'_>) -> Result<()> {
    let accept = crate::input::Accept::RegularOrBlock;
    let pfile = crate::input::open_input(req.parent_path, false, accept)?;
    let parent = VhdxLayer::open(req.parent_path, Box::new(pfile)).map_err(|e| {
        ImageError::unsupported(
            req.path,
            format!(
                "the parent of a differencing VHDX must be a VHDX; {} is not one: {e}",
                req.parent_path.display()
            ),
        )
    })?;
    // The open layer's GUID is the file's: a writer changes it on disk
    // before its first write, and this is what children must name.
    let linkage = req
        .parent
        .unique_id()
        .unwrap_or(parent.current_header().data_write_guid);
    let pairs = locator_pairs(req.path, req.name, &linkage)?;
    let mut meta = parent.metadata().clone();
    meta.virtual_size = req.size;
    write_child(req.path, &meta, &pairs, Some(&req.like))
}

/// The locator's keys and values for a parent named `name` (relative to
/// the child's directory, or absolute). The parent's file may be about to
/// take that name (a snapshot renames it), so paths are made from `name`.
pub(super) fn locator_pairs(
    child: &Path,
    name: &str,
    linkage: &Guid,
) -> Result<Vec<(&'static str, String)>> {
    let abs = if name.starts_with('/') {
        std::path::PathBuf::from(name)
    } else {
        let dir = match child.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        dir.canonicalize()
            .map_err(|e| ImageError::io(dir, "canonicalize", 0, e))?
            .join(name)
    };
    let abs = abs.to_str().ok_or_else(|| {
        ImageError::unsupported(child, format!("parent path {} is not UTF-8", abs.display()))
    })?;
    // libvhdi parses the GUID only in lower case (as Hyper-V writes it),
    // and takes the parent's file name after the last backslash of the
    // absolute path.
    let text = guid::text(linkage).to_lowercase();
    let mut pairs = vec![("parent_linkage", format!("{{{text}}}"))];
    if !name.starts_with('/') {
        pairs.push(("relative_path", format!(".\\{}", name.replace('/', "\\"))));
    }
    pairs.push(("absolute_win32_path", abs.replace('/', "\\")));
    Ok(pairs)
}

/// Writes a new differencing VHDX at `path` (which must not exist) with
/// the geometry of `meta` and a locator of `pairs`.
pub fn write_child(
    path: &Path,
    meta: &Metadata,
    pairs: &[(&str, String)],
    like: Option<&Ownership>,
) -> Result<()> {
    if meta.virtual_size == 0
        || !meta.virtual_size.is_multiple_of(meta.logical_sector)
        || meta.virtual_size > super::metadata::MAX_DISK_SIZE
    {
        return Err(ImageError::invalid(
            path,
            format!(
                "a VHDX of {} bytes: the size must be a multiple of the {}-byte sector, up to 64 TiB",
                meta.virtual_size, meta.logical_sector
            ),
        ));
    }
    let mut child = meta.clone();
    child.has_parent = true;
    child.leave_blocks_allocated = false;
    let geo = Geometry::new(path, &child, METADATA_AT)?;
    let bat_len = (geo.entries * 8).div_ceil(MIB) * MIB;
    let file = new_file(like)
        .open(path)
        .map_err(|e| ImageError::io(path, "create", 0, e))?;
    if let Some(like) = like {
        like.apply(&file, path)
            .map_err(|e| ImageError::io(path, "set owner and mode of", 0, e))?;
    }
    file.set_len(BAT_AT + bat_len)
        .map_err(|e| ImageError::io(path, "extend", BAT_AT + bat_len, e))?;
    write_all_at(
        &file,
        path,
        &metadata_region(path, &child, pairs)?,
        METADATA_AT,
    )?;
    let mut head = vec![0u8; HEADER_AT[0] as usize];
    head[..8].copy_from_slice(FILE_ID);
    for (i, u) in "snaptree".encode_utf16().enumerate() {
        head[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    write_all_at(&file, path, &head, 0)?;
    let table = region_table(bat_len);
    for at in REGION_AT {
        write_all_at(&file, path, &table, at)?;
    }
    let (fw, dw) = (new_guid(path)?, new_guid(path)?);
    for (seq, at) in HEADER_AT.iter().enumerate() {
        write_all_at(&file, path, &header(seq as u64, &fw, &dw), *at)?;
    }
    file.sync_all()
        .map_err(|e| ImageError::io(path, "fsync", 0, e))
}

fn seal(b: &mut [u8]) {
    b[4..8].fill(0);
    let c = crc32c_of(b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
}

fn header(sequence: u64, file_write: &Guid, data_write: &Guid) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"head");
    h[8..16].copy_from_slice(&sequence.to_le_bytes());
    h[16..32].copy_from_slice(file_write);
    h[32..48].copy_from_slice(data_write);
    // Log GUID zero: no log to replay. Log version 0, version 1.
    h[66..68].copy_from_slice(&1u16.to_le_bytes());
    h[68..72].copy_from_slice(&(LOG_LEN as u32).to_le_bytes());
    h[72..80].copy_from_slice(&LOG_AT.to_le_bytes());
    seal(&mut h);
    h
}

fn region_table(bat_len: u64) -> Vec<u8> {
    let mut t = vec![0u8; REGION_LEN];
    t[0..4].copy_from_slice(b"regi");
    t[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (i, (id, at, len)) in [
        (guid::BAT_REGION, BAT_AT, bat_len),
        (guid::METADATA_REGION, METADATA_AT, METADATA_LEN),
    ]
    .iter()
    .enumerate()
    {
        let e = 16 + i * 32;
        t[e..e + 16].copy_from_slice(id);
        t[e + 16..e + 24].copy_from_slice(&at.to_le_bytes());
        t[e + 24..e + 28].copy_from_slice(&(*len as u32).to_le_bytes());
        t[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes()); // required
    }
    seal(&mut t);
    t
}

/// The metadata region's table and items.
fn metadata_region(path: &Path, m: &Metadata, pairs: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut params = (m.block_size as u32).to_le_bytes().to_vec();
    params.extend_from_slice(&2u32.to_le_bytes()); // has parent
    let items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (guid::FILE_PARAMETERS, params, IS_REQUIRED),
        (
            guid::VIRTUAL_DISK_SIZE,
            m.virtual_size.to_le_bytes().to_vec(),
            IS_VIRTUAL_DISK | IS_REQUIRED,
        ),
        (
            guid::PAGE83,
            new_guid(path)?.to_vec(),
            IS_VIRTUAL_DISK | IS_REQUIRED,
        ),
        (
            guid::LOGICAL_SECTOR,
            (m.logical_sector as u32).to_le_bytes().to_vec(),
            IS_VIRTUAL_DISK | IS_REQUIRED,
        ),
        (
            guid::PHYSICAL_SECTOR,
            (m.physical_sector as u32).to_le_bytes().to_vec(),
            IS_VIRTUAL_DISK | IS_REQUIRED,
        ),
        (guid::PARENT_LOCATOR, locator(pairs), IS_REQUIRED),
    ];
    let mut r = vec![0u8; ITEMS_AT];
    r[0..8].copy_from_slice(b"metadata");
    r[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
    for (i, (id, data, flags)) in items.iter().enumerate() {
        let e = 32 + i * 32;
        // Items 8-byte aligned after the table.
        let at = r.len().div_ceil(8) * 8;
        r.resize(at, 0);
        r[e..e + 16].copy_from_slice(id);
        r[e + 16..e + 20].copy_from_slice(&(at as u32).to_le_bytes());
        r[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        r[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        r.extend_from_slice(data);
    }
    if r.len() as u64 > METADATA_LEN {
        return Err(ImageError::unsupported(
            path,
            "the parent locator does not fit the 1 MiB metadata region",
        ));
    }
    Ok(r)
}

/// A parent locator item (MS-VHDX 2.6.2.6): type, key/value entries, then
/// the UTF-16LE keys and values.
pub(super) fn locator(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + pairs.len() * 12];
    b[0..16].copy_from_slice(&guid::VHDX_PARENT_TYPE);
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    for (i, (k, v)) in pairs.iter().enumerate() {
        let e = 20 + i * 12;
        let (k, v) = (utf16(k), utf16(v));
        let ko = b.len();
        b.extend_from_slice(&k);
        let vo = b.len();
        b.extend_from_slice(&v);
        b[e..e + 4].copy_from_slice(&(ko as u32).to_le_bytes());
        b[e + 4..e + 8].copy_from_slice(&(vo as u32).to_le_bytes());
        b[e + 8..e + 10].copy_from_slice(&(k.len() as u16).to_le_bytes());
        b[e + 10..e + 12].copy_from_slice(&(v.len() as u16).to_le_bytes());
    }
    b
}
