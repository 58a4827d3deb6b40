//! The VMDK descriptor: the text that says what a disk is made of (its
//! extents), who it is (`CID`), what it sits on (`parentCID`,
//! `parentFileNameHint`) and, in the disk database (`ddb.*`), its
//! geometry and adapter.
//!
//! It is either a file of its own (`# Disk DescriptorFile`, every kind but
//! monolithicSparse and streamOptimized) or embedded in a hosted sparse
//! extent (see `sparse`). Either way it comes from a file someone else
//! made, so it is parsed strictly and within bounds: every line is a
//! comment, a blank, `key=value` or an extent line, nothing else; the keys
//! that decide what is read appear at most once; numbers are checked;
//! sizes are capped (see [`MAX_EXTENTS`], [`MAX_DISK_BYTES`]). An error
//! names the file, the byte offset of the line and what is wrong.

use crate::error::{ImageError, Result};
use std::path::Path;

/// The largest descriptor read (QEMU reads at most 1 MiB, too).
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// The most extents one descriptor may list: a 2 TiB disk in 2 GiB
/// extents is 1024 of them. Each extent is an open file, so a crafted
/// descriptor with more is refused rather than exhausting descriptors.
pub const MAX_EXTENTS: usize = 1024;

/// The largest disk accepted: 64 TiB, the most any VMDK kind can address
/// (seSparse, the largest, stops just below it).
pub const MAX_DISK_BYTES: u64 = 64 << 40;

/// What the first line of a descriptor file says.
pub const SIGNATURE: &[u8] = b"# Disk DescriptorFile";

/// Who may access an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

/// How an extent stores its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentType {
    /// A hosted sparse extent (`KDMV`), or an old `COWD` one.
    Sparse,
    /// Plain bytes from `offset` sectors into the file.
    Flat,
    /// ESXi's flat extent (`-flat.vmdk`), from the start of the file.
    Vmfs,
    /// ESXi's `COWD` delta (`-delta.vmdk`).
    VmfsSparse,
    /// ESXi 6.5+ space-efficient sparse (`-sesparse.vmdk`).
    SeSparse,
    /// Reads as zeros; no file.
    Zero,
}

impl ExtentType {
    fn parse(s: &str) -> Option<ExtentType> {
        Some(match s {
            "SPARSE" => ExtentType::Sparse,
            "FLAT" => ExtentType::Flat,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "ZERO" => ExtentType::Zero,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::Zero => "ZERO",
        }
    }
}

/// One extent line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentType,
    /// The file, as written (relative to the descriptor's directory); empty
    /// for `ZERO`.
    pub file: String,
    /// Sectors into the file where a `FLAT` extent starts.
    pub offset: u64,
    /// Byte offset of the line in the descriptor (for errors).
    pub at: u64,
}

/// A parsed descriptor.
#[derive(Clone, Debug, Default)]
pub struct Descriptor {
    pub version: u32,
    pub cid: u32,
    /// `0xffffffff` when the disk has no parent.
    pub parent_cid: u32,
    pub create_type: String,
    /// Where the parent is, relative to this descriptor's directory.
    pub parent_hint: Option<String>,
    /// Byte offset of `parentFileNameHint` in the descriptor.
    pub parent_hint_at: u64,
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` entries, in order (geometry, adapter, tools version...).
    pub ddb: Vec<(String, String)>,
}

/// The parentCID of a disk with no parent.
pub const NO_PARENT: u32 = 0xffff_ffff;

/// Create types snaptree knows; anything else is refused as unsupported.
const CREATE_TYPES: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "vmfsThick",
];

impl Descriptor {
    pub fn has_parent(&self) -> bool {
        self.parent_cid != NO_PARENT || self.parent_hint.is_some()
    }

    /// Total sectors of the extents.
    pub fn sectors(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum()
    }

    /// A ddb value, e.g. `geometry.cylinders`.
    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k.strip_prefix("ddb.") == Some(key))
            .map(|(_, v)| v.as_str())
    }
}

/// Keys whose value decides what is read: each may appear once.
const SINGLE_KEYS: &[&str] = &[
    "version",
    "CID",
    "parentCID",
    "createType",
    "parentFileNameHint",
];

/// Parses descriptor text `text`, found at byte `base` of `path` (0 for a
/// descriptor file, the embedded descriptor's offset in a sparse extent).
/// The text ends at its first NUL byte, if any.
pub fn parse(path: &Path, base: u64, text: &[u8]) -> Result<Descriptor> {
    if text.len() as u64 > MAX_DESCRIPTOR_BYTES {
        return Err(ImageError::corrupt(
            path,
            base,
            format!(
                "descriptor of {} bytes is larger than {MAX_DESCRIPTOR_BYTES}",
                text.len()
            ),
        ));
    }
    // The text ends at the first NUL, as QEMU reads it (a C string). An
    // embedded descriptor is NUL-padded to its sectors, and QEMU's own CID
    // update rewrites a descriptor file as DESC_SIZE bytes in which the
    // tail of the old, longer text can follow the new text's NUL: what
    // follows the first NUL is not read.
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let mut d = Descriptor {
        parent_cid: NO_PARENT,
        ..Descriptor::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut at = 0usize;
    for raw in text[..end].split(|&b| b == b'\n') {
        let line_at = base + at as u64;
        at += raw.len() + 1;
        let line = std::str::from_utf8(raw)
            .map_err(|_| ImageError::corrupt(path, line_at, "descriptor line is not UTF-8 text"))?;
        let line = line.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(e) = parse_extent(path, line_at, line)? {
            if d.extents.len() >= MAX_EXTENTS {
                return Err(ImageError::corrupt(
                    path,
                    line_at,
                    format!("more than {MAX_EXTENTS} extents"),
                ));
            }
            d.extents.push(e);
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad_line(
                path,
                line_at,
                line,
                "neither key=value nor an extent",
            ));
        };
        let key = key.trim();
        let value = value.trim();
        if let Some(k) = SINGLE_KEYS.iter().find(|k| **k == key) {
            if seen.contains(k) {
                return Err(bad_line(path, line_at, line, "key given twice"));
            }
            seen.push(k);
        }
        set_key(&mut d, path, line_at, line, key, value)?;
    }
    check(&d, path, base, &seen)?;
    Ok(d)
}

fn set_key(
    d: &mut Descriptor,
    path: &Path,
    at: u64,
    line: &str,
    key: &str,
    value: &str,
) -> Result<()> {
    match key {
        "version" => {
            d.version = value
                .parse()
                .ok()
                .filter(|v| (1..=3).contains(v))
                .ok_or_else(|| bad_line(path, at, line, "version must be 1, 2 or 3"))?
        }
        "CID" => {
            d.cid = hex_u32(value).ok_or_else(|| bad_line(path, at, line, "CID is not hex"))?
        }
        "parentCID" => {
            d.parent_cid =
                hex_u32(value).ok_or_else(|| bad_line(path, at, line, "parentCID is not hex"))?
        }
        "createType" => {
            d.create_type = unquote(value)
                .ok_or_else(|| bad_line(path, at, line, "createType must be quoted"))?
                .to_string()
        }
        "parentFileNameHint" => {
            let name = unquote(value)
                .ok_or_else(|| bad_line(path, at, line, "parentFileNameHint must be quoted"))?;
            if name.is_empty() || name.len() > 4096 {
                return Err(bad_line(path, at, line, "empty or overlong parent name"));
            }
            d.parent_hint = Some(name.to_string());
            d.parent_hint_at = at;
        }
        k if k.starts_with("ddb.") => {
            let v = unquote(value).unwrap_or(value);
            if d.ddb.len() < 256 {
                d.ddb.push((k.to_string(), v.to_string()));
            }
        }
        // Other keys (encoding, isNativeSnapshot, changeTrackPath...)
        // change nothing that is read.
        _ => {}
    }
    Ok(())
}

/// The whole-descriptor checks once every line is read.
fn check(d: &Descriptor, path: &Path, base: u64, seen: &[&str]) -> Result<()> {
    for k in ["CID", "createType"] {
        if !seen.contains(&k) {
            return Err(ImageError::corrupt(
                path,
                base,
                format!("descriptor has no {k}"),
            ));
        }
    }
    if !CREATE_TYPES.contains(&d.create_type.as_str()) {
        return Err(ImageError::unsupported(
            path,
            format!("VMDK createType {:?}", d.create_type),
        ));
    }
    if d.parent_cid != NO_PARENT && d.parent_hint.is_none() {
        return Err(ImageError::corrupt(
            path,
            base,
            format!(
                "parentCID {:08x} but no parentFileNameHint names the parent",
                d.parent_cid
            ),
        ));
    }
    let mut total: u64 = 0;
    for e in &d.extents {
        total = total.saturating_add(e.sectors);
        if total.saturating_mul(512) > MAX_DISK_BYTES {
            return Err(ImageError::corrupt(
                path,
                e.at,
                format!("extents add up to more than {MAX_DISK_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

/// Parses `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; `None` when the line is
/// not an extent line (does not start with an access word).
fn parse_extent(path: &Path, at: u64, line: &str) -> Result<Option<ExtentLine>> {
    let (word, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let access = match word {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Ok(None),
    };
    let rest = rest.trim_start();
    let (sectors, rest) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let sectors: u64 = sectors
        .parse()
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| bad_line(path, at, line, "sector count is not a positive number"))?;
    let rest = rest.trim_start();
    let (kind, rest) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let kind = ExtentType::parse(kind).ok_or_else(|| {
        ImageError::unsupported(path, format!("extent type {kind:?} (line at offset {at})"))
    })?;
    let rest = rest.trim();
    let mut e = ExtentLine {
        access,
        sectors,
        kind,
        file: String::new(),
        offset: 0,
        at,
    };
    if kind == ExtentType::Zero {
        if !rest.is_empty() {
            return Err(bad_line(path, at, line, "a ZERO extent names no file"));
        }
        return Ok(Some(e));
    }
    let Some(after) = rest.strip_prefix('"') else {
        return Err(bad_line(path, at, line, "extent file name must be quoted"));
    };
    let Some((name, tail)) = after.split_once('"') else {
        return Err(bad_line(path, at, line, "unterminated extent file name"));
    };
    if name.is_empty() || name.len() > 4096 {
        return Err(bad_line(
            path,
            at,
            line,
            "empty or overlong extent file name",
        ));
    }
    e.file = name.to_string();
    let tail = tail.trim();
    match (kind, tail) {
        (ExtentType::Flat, t) => {
            e.offset = t
                .parse()
                .map_err(|_| bad_line(path, at, line, "a FLAT extent needs its sector offset"))?;
        }
        (_, "") => {}
        // VMware allows an offset of 0 after a VMFS extent.
        (ExtentType::Vmfs, "0") => {}
        _ => {
            return Err(bad_line(
                path,
                at,
                line,
                "unexpected text after the file name",
            ))
        }
    }
    Ok(Some(e))
}

fn bad_line(path: &Path, at: u64, line: &str, why: &str) -> ImageError {
    let shown: String = line.chars().take(80).collect();
    ImageError::corrupt(path, at, format!("descriptor line {shown:?}: {why}"))
}

fn unquote(v: &str) -> Option<&str> {
    v.strip_prefix('"')?.strip_suffix('"')
}

fn hex_u32(v: &str) -> Option<u32> {
    if v.is_empty() || v.len() > 8 {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

/// Renders a descriptor for a new image (used by `create`): the keys in
/// the order VMware and QEMU write them.
pub fn render(d: &Descriptor) -> String {
    let mut s = String::from("# Disk DescriptorFile\n");
    s += &format!("version={}\n", d.version.max(1));
    s += &format!("CID={:08x}\n", d.cid);
    s += &format!("parentCID={:08x}\n", d.parent_cid);
    s += &format!("createType=\"{}\"\n", d.create_type);
    if let Some(h) = &d.parent_hint {
        s += &format!("parentFileNameHint=\"{h}\"\n");
    }
    s += "\n# Extent description\n";
    for e in &d.extents {
        let access = match e.access {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        };
        s += &format!("{access} {} {}", e.sectors, e.kind.name());
        if e.kind != ExtentType::Zero {
            s += &format!(" \"{}\"", e.file);
        }
        if e.kind == ExtentType::Flat {
            s += &format!(" {}", e.offset);
        }
        s += "\n";
    }
    s += "\n# The Disk Data Base\n#DDB\n\n";
    for (k, v) in &d.ddb {
        s += &format!("{k} = \"{v}\"\n");
    }
    s
}
