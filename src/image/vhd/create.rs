//! Creating empty VHDs: a differencing disk on a VHD parent (what a
//! snapshot or clone of a VHD chain puts on top, laid out so Hyper-V, XCP's
//! vhd-util and libvhdi find its parent) and a dynamic disk laid out as
//! `qemu-img create -f vpc` lays it out.
//!
//! Layout of both: the footer's copy at 0, the dynamic disk header at 512,
//! the BAT at 1536 (every entry unused, padded to whole sectors), for a
//! differencing disk the parent locators' data, then the footer. Blocks are
//! appended later by the writer (see `write`).
//!
//! Sizes: QEMU takes the size from the CHS geometry for creators `vpc `
//! and `qemu` (older QEMUs for every creator they do not know), and from
//! `current_size` when the geometry is the maximum one or the creator is
//! another. Our images say creator `snap` and carry the exact size in
//! `current_size`, with the spec's geometry only when it describes exactly
//! that size and the maximum geometry otherwise (as `qemu-img create -o
//! force_size=on` does), so every QEMU version, libvhdi, Hyper-V and
//! snaptree agree on the size. A differencing disk copies its parent's
//! geometry and takes the parent's virtual size as `current_size` (the
//! same value for every parent QEMU or Hyper-V made).
//!
//! No temporary names here: callers create under a temporary name and
//! rename. A file that exists is never overwritten.

use super::bat::MAX_BAT_BYTES;
use super::footer::{
    vhd_time, DiskGeometry, Footer, DISK_DIFFERENCING, DISK_DYNAMIC, FOOTER_LEN, MAX_SECTORS,
};
use super::header::{
    DynamicHeader, ParentLocator, HEADER_LEN, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, PLAT_MACX, PLAT_W2KU,
    PLAT_W2RU,
};
use super::VhdLayer;
use crate::error::{ImageError, Result};
use crate::fileio::write_all_at;
use crate::image::ReadMap;
use crate::ownership::{new_file, Ownership};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

/// The block size of a new differencing disk on a fixed parent (the spec's
/// default, and what Hyper-V and XCP use).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// `Creator Application` of our images.
pub const CREATOR: &[u8; 4] = b"snap";
/// `Creator Version`: 1.0.
const CREATOR_VERSION: u32 = 0x0001_0000;
/// `Creator Host OS`, as QEMU writes it.
const HOST_OS_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
const BAT_OFFSET: u64 = 1536;
/// Bytes reserved for each parent locator's data: room for a longer name
/// later (a snapshot renames the parent; `reparent` rewrites locators in
/// place and drops one that no longer fits). 1024 UTF-16 units.
const LOCATOR_SPACE: u64 = 2048;
/// QEMU sizes a block's sector bitmap as `block_size / 4096` rounded up to
/// whole sectors, which is no bitmap at all below 4 KiB (the spec pads the
/// bits to a sector): it would read such images wrong.
const MIN_DYNAMIC_BLOCK_SIZE: u32 = 4096;

/// Creates an empty dynamic VHD of `size` bytes (rounded up to whole
/// sectors) in blocks of `block_size` bytes (a power of two, 4 KiB to
/// 256 MiB) at `path`, which must not exist.
pub fn create_dynamic(path: &Path, size: u64, block_size: u32) -> Result<()> {
    let img = dynamic_bytes(path, size, block_size)?;
    write_new(path, &img, None)
}

/// The bytes of a new empty dynamic VHD (see [`create_dynamic`]); `path`
/// names it in errors. Unit tests open these from memory.
pub fn dynamic_bytes(path: &Path, size: u64, block_size: u32) -> Result<Vec<u8>> {
    let size = size.div_ceil(512) * 512;
    check_size(path, size)?;
    check_block_size(path, block_size, MIN_DYNAMIC_BLOCK_SIZE)?;
    let sectors = size / 512;
    let chs = DiskGeometry::for_sectors(sectors);
    let geometry = if chs.sectors() == sectors {
        chs
    } else {
        DiskGeometry::MAX
    };
    let footer = new_footer(DISK_DYNAMIC, size, geometry)?;
    let header = new_header(path, size, block_size)?;
    Ok(layout(&footer, header, &[]))
}

/// Creates at `path` (which must not exist) an empty differencing VHD whose
/// parent is the VHD at `parent` (fixed, dynamic or differencing); see the
/// module docs for what it copies from the parent. The parent is named
/// relative to `path`'s directory when it lies in it or below, else by its
/// absolute path: in the Unicode name (the file name, which libvhdi looks
/// for next to the child), `W2ru` (`.\dir\name`), `W2ku` (absolute) and
/// `MacX` (`file://./dir/name`, as XCP writes it).
pub fn create_differencing(path: &Path, parent: &Path) -> Result<()> {
    create_differencing_like(path, parent, None)
}

/// [`create_differencing`], the new file taking the owner and mode `like`
/// (see `crate::ownership`) instead of the umask's.
pub fn create_differencing_like(
    path: &Path,
    parent: &Path,
    like: Option<&Ownership>,
) -> Result<()> {
    let pfile = crate::input::open_input(parent, false, crate::input::Accept::RegularOrBlock)?;
    let player = VhdLayer::open(parent, pfile).map_err(|e| {
        ImageError::unsupported(
            path,
            format!(
                "the parent of a differencing VHD must be a VHD; {} is not one: {e}",
                parent.display()
            ),
        )
    })?;
    let time_stamp = std::fs::metadata(parent)
        .and_then(|m| m.modified())
        .map_or(0, vhd_time);
    let names = ParentNames::new(path, parent)?;
    let img = differencing_bytes(path, &player, &names, time_stamp)?;
    write_new(path, &img, like)
}

/// The bytes of a new empty differencing VHD on `parent`, which `names`
/// name and whose file was last modified at `parent_time_stamp` (VHD
/// time); `path` names the child in errors.
pub(super) fn differencing_bytes(
    path: &Path,
    parent: &VhdLayer,
    names: &ParentNames,
    parent_time_stamp: u32,
) -> Result<Vec<u8>> {
    let pf = parent.footer();
    let size = parent.virtual_size();
    let block_size = parent
        .dynamic_header()
        .map_or(DEFAULT_BLOCK_SIZE, |h| h.block_size);
    let footer = new_footer(DISK_DIFFERENCING, size, pf.disk_geometry)?;
    let mut header = new_header(path, size, block_size)?;
    header.parent_unique_id = pf.unique_id;
    header.parent_time_stamp = parent_time_stamp;
    header.parent_unicode_name = names.unicode.clone();
    Ok(layout(&footer, header, &names.locators()))
}

/// The ways a differencing disk names its parent (also used by
/// `reparent` when it re-points one).
pub(super) struct ParentNames {
    /// `Parent Unicode Name`: the file name, UTF-16 big endian, 512 bytes.
    pub unicode: Vec<u8>,
    w2ru: String,
    absolute: String,
    macx: String,
}

impl ParentNames {
    /// For a new child at `child` of the VHD at `parent`: relative to the
    /// child's directory when the parent lies in it or below, else
    /// absolute.
    fn new(child: &Path, parent: &Path) -> Result<ParentNames> {
        let canon = |p: &Path| {
            p.canonicalize()
                .map_err(|e| ImageError::io(p, "canonicalize", 0, e))
        };
        let parent_abs = canon(parent)?;
        let dir = match child.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir_abs = canon(dir)?;
        let name = match parent_abs.strip_prefix(&dir_abs) {
            Ok(r) if !r.as_os_str().is_empty() => r,
            _ => &parent_abs,
        };
        ParentNames::from_name(child, name, &parent_abs)
    }

    /// For a parent named `name` (relative to the child's directory, or
    /// absolute) whose absolute path is `parent_abs`.
    pub(super) fn from_name(child: &Path, name: &Path, parent_abs: &Path) -> Result<ParentNames> {
        let text = |p: &Path| {
            p.to_str().map(str::to_string).ok_or_else(|| {
                ImageError::unsupported(child, format!("parent path {} is not UTF-8", p.display()))
            })
        };
        let absolute = text(parent_abs)?;
        let name = text(name)?;
        let file_name = Path::new(&name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let units: Vec<u16> = file_name.encode_utf16().collect();
        if units.is_empty() || units.len() > 256 {
            return Err(ImageError::unsupported(
                child,
                format!(
                    "parent file name {file_name:?} does not fit the 256 UTF-16 units of a VHD header"
                ),
            ));
        }
        let mut unicode = vec![0u8; 512];
        for (i, u) in units.iter().enumerate() {
            unicode[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        let (w2ru, macx) = if name.starts_with('/') {
            (absolute.clone(), file_url(&absolute))
        } else {
            (
                format!(".\\{}", name.replace('/', "\\")),
                file_url(&format!("./{name}")),
            )
        };
        Ok(ParentNames {
            unicode,
            w2ru,
            absolute,
            macx,
        })
    }

    /// The data of each locator this module writes, by platform code.
    pub(super) fn locators(&self) -> [(u32, Vec<u8>); 3] {
        [
            (PLAT_W2RU, utf16le(&self.w2ru)),
            (PLAT_W2KU, utf16le(&self.absolute)),
            (PLAT_MACX, self.macx.clone().into_bytes()),
        ]
    }
}

/// `file://` and the path, bytes outside the URL-safe set percent-encoded
/// (as Mac OS X writes them; snaptree decodes them).
fn file_url(path: &str) -> String {
    let mut out = String::from("file://");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn check_size(path: &Path, size: u64) -> Result<()> {
    if size == 0 || size / 512 > MAX_SECTORS {
        return Err(ImageError::invalid(
            path,
            format!("a VHD of {size} bytes: the size must be more than 0 and at most 2040 GiB"),
        ));
    }
    Ok(())
}

fn check_block_size(path: &Path, block_size: u32, min: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(min..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(ImageError::invalid(
            path,
            format!(
                "VHD block size {block_size}: must be a power of two from {min} bytes to 256 MiB"
            ),
        ));
    }
    Ok(())
}

/// 16 random bytes as a version 4 UUID.
fn new_unique_id(path: &Path) -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into our buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut id))
            .map_err(|e| ImageError::io(Path::new("/dev/urandom"), "read", 0, e))
            .map_err(|e| ImageError::invalid(path, format!("no random unique id: {e}")))?;
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

pub(super) fn new_footer(disk_type: u32, size: u64, geometry: DiskGeometry) -> Result<Footer> {
    Ok(Footer {
        // Bit 1 is reserved and must be set.
        features: 2,
        file_format_version: 0x0001_0000,
        data_offset: FOOTER_LEN,
        time_stamp: vhd_time(SystemTime::now()),
        creator_application: *CREATOR,
        creator_version: CREATOR_VERSION,
        creator_host_os: HOST_OS_WI2K,
        original_size: size,
        current_size: size,
        disk_geometry: geometry,
        disk_type,
        checksum: 0,
        unique_id: new_unique_id(Path::new("new VHD"))?,
        saved_state: 0,
        tapdisk_hidden: 0,
        at: 0,
        len: FOOTER_LEN,
        from_head_copy: false,
    })
}

fn new_header(path: &Path, size: u64, block_size: u32) -> Result<DynamicHeader> {
    check_size(path, size)?;
    check_block_size(path, block_size, MIN_BLOCK_SIZE)?;
    let entries = size.div_ceil(block_size as u64);
    if entries * 4 > MAX_BAT_BYTES || entries > u32::MAX as u64 {
        return Err(ImageError::invalid(
            path,
            format!("{size} bytes in blocks of {block_size} need a BAT too large to hold"),
        ));
    }
    Ok(DynamicHeader {
        // The spec says 0xFFFFFFFF; Microsoft's tools expect all 64 bits.
        data_offset: u64::MAX,
        table_offset: BAT_OFFSET,
        header_version: 0x0001_0000,
        max_table_entries: entries as u32,
        block_size,
        checksum: 0,
        parent_unique_id: [0; 16],
        parent_time_stamp: 0,
        parent_unicode_name: vec![0; 512],
        parent_locators: Vec::new(),
        at: FOOTER_LEN,
    })
}

/// Lays out a new image: footer copy, header, BAT, locator data
/// (`(platform code, data)`), footer.
fn layout(footer: &Footer, mut header: DynamicHeader, locators: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let bat_bytes = (header.max_table_entries as u64 * 4).div_ceil(512) * 512;
    let mut at = BAT_OFFSET + bat_bytes;
    let mut data = Vec::new();
    for (code, bytes) in locators {
        let space = (bytes.len() as u64).div_ceil(512).max(1) * 512;
        let space = space.max(LOCATOR_SPACE);
        // Hyper-V and XCP record the space in bytes (the spec says
        // sectors); readers tell the two apart by size.
        header.parent_locators.push(ParentLocator {
            platform_code: *code,
            platform_data_space: space as u32,
            platform_data_length: bytes.len() as u32,
            platform_data_offset: at,
        });
        data.push((at, bytes));
        at += space;
    }
    let footer_bytes = footer.encode();
    let mut img = vec![0u8; (BAT_OFFSET + bat_bytes) as usize];
    img[..FOOTER_LEN as usize].copy_from_slice(&footer_bytes);
    img[FOOTER_LEN as usize..(FOOTER_LEN + HEADER_LEN) as usize].copy_from_slice(&header.encode());
    img[BAT_OFFSET as usize..].fill(0xff);
    img.resize(at as usize, 0);
    for (off, bytes) in data {
        img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    }
    img.extend_from_slice(&footer_bytes);
    img
}

/// Writes `img` to the new file `path`, then fsync. The file gets the
/// owner and mode `like` before its first byte.
fn write_new(path: &Path, img: &[u8], like: Option<&Ownership>) -> Result<()> {
    let file = new_file(like)
        .open(path)
        .map_err(|e| ImageError::io(path, "create", 0, e))?;
    if let Some(like) = like {
        like.apply(&file, path)
            .map_err(|e| ImageError::io(path, "set owner and mode of", 0, e))?;
    }
    write_all_at(&file, path, img, 0)?;
    file.sync_all()
        .map_err(|e| ImageError::io(path, "fsync", 0, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(file_url("./a b.vhd"), "file://./a%20b.vhd");
        assert_eq!(file_url("/srv/p.vhd"), "file:///srv/p.vhd");
    }

    #[test]
    fn ids_are_random_v4() {
        let a = new_unique_id(Path::new("x")).unwrap();
        let b = new_unique_id(Path::new("x")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4);
    }
}
