//! Re-pointing a VMDK child at another parent (its descriptor's
//! `parentFileNameHint` and `parentCID`) and giving a VMDK another CID:
//! what a merge commits with (see `image::repoint`, `formats::AdoptId`).
//!
//! Where the descriptor is decides how the change is made atomic:
//! - A descriptor file of its own (twoGbMaxExtentSparse): the new text is
//!   written to a temporary file beside it, synced, and renamed over it
//!   ([`RepointPlan::OneWrite`]): the rename is the commit point.
//! - A descriptor embedded in a monolithicSparse extent: it lives in a
//!   fixed area of the extent file (`descriptorOffset`/`descriptorSize` in
//!   the header), and a new parent name usually moves every byte after
//!   it, so the change spans several sectors and no single write is safe
//!   against a crash that tears it. It is journaled like a VHD's
//!   re-pointing ([`RepointPlan::Journaled`]): the merge stores the
//!   writes in its journal (that rename is the commit point) and applies
//!   them; recovery applies them again. The list is two writes of the
//!   same bytes of the area: first the text as it is now, then the new
//!   text. Writing the old text first changes nothing, but it lets
//!   recovery check the journal against the file even when a crash tore
//!   the second write: every sector of the area must then be one or the
//!   other, and the two texts must differ in the parent alone.
//!
//! The text is edited, not rendered anew: only the `parentCID` value and
//! the `parentFileNameHint` line change, so comments, keys snaptree does
//! not know and the disk database stay as VMware or QEMU wrote them.

use super::descriptor::{self, Descriptor, NO_PARENT};
use super::sparse;
use super::write::cid_digits;
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::image::repoint::{write_checked, NewBacking, Patch, PatchLimits, RepointPlan};
use crate::storage::Storage;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: usize = 512;

/// Where a VMDK's descriptor is.
enum Place {
    /// The whole file.
    File,
    /// The embedded area at this byte offset, of this many bytes.
    Embedded { at: u64, len: u64 },
}

/// The descriptor of the VMDK at `path`: where it is, and its text (an
/// embedded area's whole bytes, NUL padding included).
fn locate(file: &dyn Storage, path: &Path) -> Result<(Place, Vec<u8>)> {
    let len = fileio::file_len(file, path)?;
    let mut magic = [0u8; 4];
    if len >= 4 {
        fileio::read_exact_at(file, path, &mut magic, 0, "VMDK magic")?;
    }
    if &magic != sparse::MAGIC {
        return Ok((Place::File, super::read_descriptor_file(file, path, len)?));
    }
    let h = sparse::read_header(file, path, len)?;
    if !h.has_descriptor() || h.desc_size * 512 > descriptor::MAX_DESCRIPTOR_BYTES {
        return Err(ImageError::unsupported(
            path,
            "a sparse extent without a (bounded) embedded descriptor",
        ));
    }
    let (at, text) = sparse::read_descriptor(file, path, &h)?;
    let len = text.len() as u64;
    Ok((Place::Embedded { at, len }, text))
}

/// The text up to its NUL padding.
fn unpadded(text: &[u8]) -> &[u8] {
    &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())]
}

/// The key of a descriptor line (`key=value`), trimmed.
fn key_of(line: &[u8]) -> Option<&[u8]> {
    let eq = line.iter().position(|&b| b == b'=')?;
    Some(line[..eq].trim_ascii())
}

/// `text` with `parentCID` set to `cid` and `parentFileNameHint` to
/// `hint` (removed when `None`), every other byte kept. A missing line is
/// added after `CID` (parentCID) or `createType` (the hint).
pub fn edit_parent(text: &[u8], cid: u32, hint: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 64);
    let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    let has = |key: &[u8]| lines.iter().any(|l| key_of(l) == Some(key));
    // Lines to add are added once, where none is.
    let (mut cid_done, mut hint_done) = (
        has(b"parentCID"),
        hint.is_none() || has(b"parentFileNameHint"),
    );
    let eol = |l: &[u8]| -> &'static [u8] {
        if l.ends_with(b"\r\n") {
            b"\r\n"
        } else {
            b"\n"
        }
    };
    let cid_line = |e: &[u8]| [format!("parentCID={cid:08x}").as_bytes(), e].concat();
    let hint_line =
        |h: &str, e: &[u8]| [format!("parentFileNameHint=\"{h}\"").as_bytes(), e].concat();
    for l in &lines {
        let e = eol(l);
        match key_of(l) {
            Some(b"parentCID") => out.extend(cid_line(e)),
            Some(b"parentFileNameHint") => {
                if let Some(h) = hint {
                    out.extend(hint_line(h, e));
                }
            }
            Some(k) => {
                // A last line without its newline gets one before more
                // lines follow it.
                let mut line = l.to_vec();
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                out.extend(&line);
                if k == b"CID" && !cid_done {
                    out.extend(cid_line(e));
                    cid_done = true;
                }
                if k == b"createType" && !hint_done {
                    out.extend(hint_line(hint.unwrap_or_default(), e));
                    hint_done = true;
                }
            }
            None => out.extend(*l),
        }
    }
    out
}

/// Whether two descriptors describe the same disk but for its parent
/// (`parentCID`, `parentFileNameHint`).
pub fn same_but_parent(a: &Descriptor, b: &Descriptor) -> bool {
    let extents = |d: &Descriptor| -> Vec<_> {
        d.extents
            .iter()
            .map(|e| (e.access, e.sectors, e.kind, e.file.clone(), e.offset))
            .collect()
    };
    a.version == b.version
        && a.cid == b.cid
        && a.create_type == b.create_type
        && a.ddb == b.ddb
        && extents(a) == extents(b)
}

/// The CID of the VMDK at `path` (its parent must be one).
fn parent_cid(path: &Path) -> Result<u32> {
    let f = crate::input::open_input(path, false, crate::input::Accept::Regular)?;
    let len = fileio::file_len(&f, path)?;
    let text = super::driver::descriptor_text(&f, path, len)?;
    Ok(descriptor::parse(path, 0, &text)?.cid)
}

/// A parent name the descriptor can hold between quotes on one line.
fn check_name(child: &Path, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 4096 || name.contains(['"', '\n', '\r', '\0']) {
        return Err(ImageError::invalid(
            child,
            format!("{name:?} cannot be a VMDK parentFileNameHint"),
        ));
    }
    Ok(())
}

/// The new descriptor text of `child` for the backing `to`, checked to
/// parse and to differ from `old` in the parent alone.
fn new_text(child: &Path, at: u64, old: &[u8], to: Option<(&str, u32)>) -> Result<Vec<u8>> {
    let before = descriptor::parse(child, at, old)?;
    let cid = to.map_or(NO_PARENT, |t| t.1);
    let text = edit_parent(unpadded(old), cid, to.map(|t| t.0));
    let after = descriptor::parse(child, at, &text)?;
    if !same_but_parent(&before, &after) || after.parent_cid != cid {
        return Err(ImageError::invalid(
            child,
            "rewriting parentCID/parentFileNameHint would change more of the descriptor",
        ));
    }
    Ok(text)
}

/// The plan that makes `child` name `to` (see the module docs).
pub fn plan(child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan> {
    let target = match to {
        None => None,
        Some(b) => {
            check_name(child, b.name)?;
            let p = b.path.ok_or_else(|| {
                ImageError::invalid(child, "the new parent of a VMDK must be an open VMDK")
            })?;
            check_same_file(child, b.name, p)?;
            Some((b.name, parent_cid(p)?))
        }
    };
    let f = crate::input::open_input(child, false, crate::input::Accept::Regular)?;
    let (place, text) = locate(&f, child)?;
    match place {
        Place::File => {
            new_text(child, 0, &text, target)?;
            Ok(RepointPlan::OneWrite(
                target.map(|(n, _)| (n.to_string(), "vmdk".to_string())),
            ))
        }
        Place::Embedded { at, len } => {
            let new = new_text(child, at, &text, target)?;
            let old = unpadded(&text);
            let span = old.len().max(new.len()).div_ceil(SECTOR) * SECTOR;
            if span as u64 > len {
                return Err(ImageError::invalid(
                    child,
                    format!(
                        "the re-pointed descriptor ({} bytes) does not fit the embedded descriptor area ({len} bytes at offset {at})",
                        new.len()
                    ),
                ));
            }
            let pad = |t: &[u8]| {
                let mut v = t.to_vec();
                v.resize(span, 0);
                v
            };
            // The first write is the area as it is: after the text's NUL,
            // QEMU's own CID update can leave the tail of an older text,
            // which the check must find unchanged.
            Ok(RepointPlan::Journaled(vec![
                Patch::new(at, &pad(&text[..span.min(text.len())])),
                Patch::new(at, &pad(&new)),
            ]))
        }
    }
}

/// The name the child will record must lead to the parent file the CID
/// is read from.
fn check_same_file(child: &Path, name: &str, parent: &Path) -> Result<()> {
    let named = resolve(child, name);
    let same = |p: &Path| p.canonicalize().ok();
    if same(&named).is_none() || same(&named) != same(parent) {
        return Err(ImageError::invalid(
            child,
            format!(
                "the parent name {name:?} does not lead to {}",
                parent.display()
            ),
        ));
    }
    Ok(())
}

/// `name` as the child's descriptor means it: relative to its directory.
fn resolve(child: &Path, name: &str) -> PathBuf {
    match child.parent() {
        Some(d) if !Path::new(name).is_absolute() => d.join(name),
        _ => PathBuf::from(name),
    }
}

/// Carries out `plan` on `child` and makes it durable.
pub fn apply(child: &Path, plan: &RepointPlan) -> Result<()> {
    match plan {
        RepointPlan::OneWrite(to) => replace_file(child, to.as_ref().map(|t| t.0.as_str())),
        RepointPlan::Journaled(patches) => apply_patches(child, patches),
    }
}

/// A descriptor file: new text beside it, synced, renamed over it.
fn replace_file(child: &Path, name: Option<&str>) -> Result<()> {
    let target = match name {
        Some(n) => {
            check_name(child, n)?;
            Some((n, parent_cid(&resolve(child, n))?))
        }
        None => None,
    };
    let f = crate::input::open_input(child, false, crate::input::Accept::Regular)?;
    let (Place::File, text) = locate(&f, child)? else {
        return Err(ImageError::invalid(
            child,
            "an embedded descriptor is re-pointed through the journal, not replaced",
        ));
    };
    let new = new_text(child, 0, &text, target)?;
    let like =
        crate::ownership::Ownership::of(child).map_err(|e| ImageError::io(child, "stat", 0, e))?;
    let file_name = child
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Discovery skips dot files and `.snaptree-tmp`: a crash leaves no
    // second disk behind.
    let tmp = child.with_file_name(format!(".{file_name}.snaptree-tmp"));
    let out = crate::ownership::create_replacing(&tmp, &like)
        .map_err(|e| ImageError::io(&tmp, "create", 0, e))?;
    let written = FileExt::write_all_at(&out, &new, 0)
        .and_then(|()| out.sync_all())
        .and_then(|()| std::fs::rename(&tmp, child));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::io(child, "replace descriptor", 0, e));
    }
    if let Some(dir) = child.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ImageError::io(dir, "fsync", 0, e))?;
    }
    Ok(())
}

/// The journaled writes, in order, inside the file, then synced.
fn apply_patches(child: &Path, patches: &[Patch]) -> Result<()> {
    let file = crate::input::open_input(child, true, crate::input::Accept::Regular)?;
    let limits = PatchLimits {
        what: "descriptor write",
        max_count: 3,
        max_bytes: descriptor::MAX_DESCRIPTOR_BYTES as usize,
    };
    write_checked(&file, child, patches, &limits)
}

/// Checks that `patches`, read back from a merge journal, only re-point
/// the monolithicSparse `child` (see the module docs).
pub fn check(child: &Path, patches: &[Patch]) -> Result<()> {
    let bad = |what: String| Err(ImageError::invalid(child, format!("merge journal: {what}")));
    let f = crate::input::open_input(child, false, crate::input::Accept::Regular)?;
    // The sparse header is never written by re-pointing: it says where
    // the area is even when the area is torn.
    let len = fileio::file_len(&f, child)?;
    let mut magic = [0u8; 4];
    fileio::read_exact_at(&f, child, &mut magic, 0, "VMDK magic")?;
    if &magic != sparse::MAGIC {
        return bad("descriptor writes for a VMDK whose descriptor is a file of its own".into());
    }
    let h = sparse::read_header(&f, child, len)?;
    let (at, area) = (h.desc_offset * 512, h.desc_size * 512);
    let [old, new] = patches else {
        return bad(format!("{} descriptor writes, not two", patches.len()));
    };
    let (Some(o), Some(n)) = (old.bytes(), new.bytes()) else {
        return bad("a descriptor write is not hex".into());
    };
    if old.offset != at
        || new.offset != at
        || o.len() != n.len()
        || o.len() as u64 > area
        || o.len() % SECTOR != 0
    {
        return bad(format!(
            "the writes are not two equal writes of whole sectors at the embedded descriptor area ({area} bytes at offset {at})"
        ));
    }
    let (d_old, d_new) = (
        descriptor::parse(child, at, &o)?,
        descriptor::parse(child, at, &n)?,
    );
    if !same_but_parent(&d_old, &d_new) {
        return bad("the two descriptors differ in more than the parent".into());
    }
    let mut now = vec![0u8; o.len()];
    fileio::read_exact_at(&f, child, &mut now, at, "VMDK embedded descriptor")?;
    let mixed = now
        .chunks(SECTOR)
        .zip(o.chunks(SECTOR).zip(n.chunks(SECTOR)))
        .all(|(c, (a, b))| c == a || c == b);
    if !mixed {
        return bad("the descriptor area holds neither the old nor the new text".into());
    }
    Ok(())
}

/// Gives the VMDK at `path` the CID `id` stands for (`cid_id`), in
/// place and durably, in one write inside one sector (see [`cid_write`]).
pub fn set_cid(path: &Path, id: [u8; 16]) -> Result<()> {
    let (tag, rest) = id.split_at(8);
    if tag != b"VMDK-CID" || rest[4..].iter().any(|&b| b != 0) {
        return Err(ImageError::invalid(path, "not a VMDK CID"));
    }
    let cid = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if cid == NO_PARENT {
        return Err(ImageError::invalid(
            path,
            "CID ffffffff means \"no parent\"",
        ));
    }
    let f = crate::input::open_input(path, true, crate::input::Accept::Regular)?;
    let (place, text) = locate(&f, path)?;
    let base = match place {
        Place::File => 0,
        Place::Embedded { at, .. } => at,
    };
    let (at, bytes) = cid_write(unpadded(&text), base, cid).map_err(|why| {
        ImageError::invalid(
            path,
            format!("cannot give the descriptor CID {cid:08x}: {why}"),
        )
    })?;
    fileio::write_all_at(&f, path, &bytes, base + at as u64)?;
    fileio::sync_data(&f, path)
}

/// The write (offset in `text`, bytes) that sets the `CID=` value of
/// descriptor `text` (found at byte `base` of its file) to `cid`, inside
/// one 512-byte sector so that a crash leaves the old or the new CID.
/// QEMU writes CIDs without leading zeros, so the line may be shorter
/// than the new value: the value is then widened and as many blank lines
/// after it are dropped, so nothing past them moves.
pub fn cid_write(
    text: &[u8],
    base: u64,
    cid: u32,
) -> std::result::Result<(usize, Vec<u8>), String> {
    let (at, digits) = cid_digits(text).ok_or("no CID line")?;
    let value = format!("{cid:x}");
    if value.len() <= digits {
        return Ok((at, format!("{cid:0digits$x}").into_bytes()));
    }
    let extra = value.len() - digits;
    let after = at + digits;
    // A newline right after another is a blank line that can go.
    let blanks: Vec<usize> = (after.max(1)..text.len())
        .filter(|&i| text[i] == b'\n' && text[i - 1] == b'\n')
        .take(extra)
        .collect();
    let Some(&last) = blanks.last().filter(|_| blanks.len() == extra) else {
        return Err(format!(
            "the CID line has {digits} digits and no blank line follows to make room"
        ));
    };
    let end = last + 1;
    if (base + at as u64) / 512 != (base + last as u64) / 512 {
        return Err("the CID line and the next blank line are not in one sector".into());
    }
    let mut out = value.into_bytes();
    out.extend(
        (after..end)
            .filter(|i| !blanks.contains(i))
            .map(|i| text[i]),
    );
    debug_assert_eq!(out.len(), end - at);
    Ok((at, out))
}

#[cfg(test)]
#[path = "reparent_tests.rs"]
mod tests;
