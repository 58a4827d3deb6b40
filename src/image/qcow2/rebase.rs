//! Switching a qcow2 image to another backing file: the commit point of a
//! "stream" merge.
//!
//! A stream merge removes a hidden image H from a chain `P <- H <- C` by
//! copying H's clusters into C wherever C has none, flushing C, and then
//! pointing C at P instead of H (or at nothing when H was a root). Until
//! that last step C still names H and reads exactly as before; after it C
//! names P and, since it now holds all of H's data itself, still reads
//! exactly as before. The switch has to be one atomic step (ARCHITECTURE.md,
//! "The merge invariant"), and [`set_backing`] is that step.
//!
//! Why one `pwrite` is the commit point: the backing file name, its offset
//! and size, and the backing-format extension all live in the first
//! cluster, so the whole new header (fixed fields, extensions, end marker,
//! name) is laid out in memory and written with a single `pwrite` of at
//! most one 4096-byte block at file offset 0 (never more than the cluster
//! size, so it stays inside the header cluster), followed by `fdatasync`.
//! Offset 0 is page aligned, so that write covers exactly one page of the
//! page cache. The kernel copies a write into the page cache page by page
//! and only acts on a fatal signal between pages, so a process killed at
//! any instant (SIGKILL included) leaves either the old header or the new
//! one, never a mix: the old name with the new offset, or half a name.
//! Against power loss the guarantee is the one QEMU's own header updates
//! rely on: the storage writes an aligned 4 KiB block atomically (512-byte
//! clusters make the block one sector).
//!
//! Nothing else is written: the fields we do not change keep their exact
//! bytes, as do all other header extensions (in their order), and refcounts
//! are untouched because the header cluster stays the header cluster.
//!
//! The caller is responsible for everything around the commit: C's data
//! must already be complete and flushed, the new backing file must exist
//! (named relative to C's directory, or absolute), and nobody else may be
//! writing C's header (the caller holds the image's write lock; this
//! function takes no lock of its own, so it does not conflict with the
//! caller's). Open [`super::Qcow2Layer`]s of C keep the old backing in
//! memory and must be reopened; our writer only ever rewrites single header
//! fields in place, never the backing-file region, so it cannot undo this
//! change.

use super::header::{
    Header, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_END, INCOMPAT_DIRTY, V2_HEADER_LEN,
};
use crate::error::{ImageError, Result};
use crate::fileio::{be_u32, be_u64, file_len, read_exact_at, sync_data, write_all_at};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Most bytes the commit write may cover: one page.
pub const COMMIT_BLOCK: u64 = 4096;
/// QEMU refuses backing file names longer than this.
pub const MAX_BACKING_NAME: usize = 1023;
/// QEMU keeps the backing format in a 16-byte C string, so it refuses
/// backing-format extensions of 16 bytes or more.
pub const MAX_BACKING_FORMAT: usize = 15;

/// Points the qcow2 image at `path` to the backing file `backing` =
/// (name as stored: relative to the image's directory or absolute; format
/// name such as `"qcow2"` or `"raw"`), or to no backing file with `None`.
///
/// The change is committed by ONE `pwrite` at file offset 0 of at most
/// `min(4096, cluster size)` bytes, then `fdatasync`: a process killed at
/// any point (even by SIGKILL, which cannot tear a single one-page
/// `pwrite`) leaves the image with either its old backing or its new one.
/// See the module documentation.
///
/// Refuses, without writing anything: an invalid name (empty, over 1023
/// bytes, or containing NUL) or format (empty, over 15 bytes, or containing
/// NUL); an image whose header does not parse ([`Header::read`]); an image
/// with the dirty bit set; an image where the L1 table, refcount table,
/// snapshot table or bitmap directory starts in the header cluster; and a
/// new header (fixed part, extensions, end marker, name) that does not fit
/// in `min(4096, cluster size)` bytes.
pub fn set_backing(path: &Path, backing: Option<(&str, &str)>) -> Result<()> {
    if let Some((name, format)) = backing {
        check_name(path, name, format)?;
    }
    let file = crate::input::open_input(path, true, crate::input::Accept::RegularOrBlock)?;
    let header = Header::read(&file, path)?;
    if header.incompatible_features & INCOMPAT_DIRTY != 0 {
        return Err(ImageError::invalid(
            path,
            "the dirty bit is set (offset 72): the image was not closed cleanly; \
             repair it with `qemu-img check -r all` before changing its backing file",
        ));
    }
    let cs = header.cluster_size();
    check_header_cluster_free(path, &header)?;

    let len = file_len(&file, path)?;
    let mut cluster = vec![0u8; cs.min(len) as usize];
    read_exact_at(&file, path, &mut cluster, 0, "header cluster")?;
    let block = relayout(path, &header, &cluster, backing)?;

    // The commit: one pwrite of the whole block. A short write cannot
    // happen for an overwrite of one page of a regular file; should it
    // anyway, finish the block so the header is whole again.
    let written = file
        .write_at(&block, 0)
        .map_err(|e| ImageError::io(path, "write header", 0, e))?;
    if written < block.len() {
        tracing::warn!(
            "{}: header write stopped after {written} of {} bytes; writing the rest",
            path.display(),
            block.len()
        );
        write_all_at(&file, path, &block[written..], written as u64)?;
    }
    sync_data(&file, path)
}

fn check_name(path: &Path, name: &str, format: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_BACKING_NAME || name.contains('\0') {
        return Err(ImageError::invalid(
            path,
            format!(
                "backing file name {name:?} ({} bytes) must be 1..={MAX_BACKING_NAME} bytes without NUL",
                name.len()
            ),
        ));
    }
    if format.is_empty() || format.len() > MAX_BACKING_FORMAT || format.contains('\0') {
        return Err(ImageError::invalid(
            path,
            format!(
                "backing format name {format:?} ({} bytes) must be 1..={MAX_BACKING_FORMAT} bytes without NUL",
                format.len()
            ),
        ));
    }
    Ok(())
}

/// Refuses images where a metadata table starts in cluster 0: the rewrite
/// zeroes the header block after the new name, which must hurt nothing.
fn check_header_cluster_free(path: &Path, h: &Header) -> Result<()> {
    let cs = h.cluster_size();
    let mut tables = vec![("refcount table", 48, h.refcount_table_offset)];
    if h.l1_size > 0 {
        tables.push(("L1 table", 40, h.l1_table_offset));
    }
    if h.nb_snapshots > 0 {
        tables.push(("snapshot table", 64, h.snapshots_offset));
    }
    for (what, field_at, offset) in tables {
        if offset < cs {
            return Err(ImageError::corrupt(
                path,
                field_at,
                format!("{what} starts at offset {offset}, inside the header cluster ({cs} bytes)"),
            ));
        }
    }
    Ok(())
}

/// One header extension as found: its type and data (without padding).
struct Extension {
    ty: u32,
    at: usize,
    data: Vec<u8>,
}

/// Where the extensions start: byte 72 for version 2, `header_length` for
/// version 3.
fn extensions_start(h: &Header) -> usize {
    if h.version == 2 {
        V2_HEADER_LEN
    } else {
        h.header_length as usize
    }
}

/// The header extensions of `cluster`, in order, read the way
/// [`Header::read`] and QEMU read them: up to the end marker, the backing
/// file name or the end of the cluster, whichever comes first.
fn read_extensions(path: &Path, h: &Header, cluster: &[u8]) -> Result<Vec<Extension>> {
    let mut end = cluster.len();
    if h.backing_file_offset != 0 {
        end = end.min(h.backing_file_offset as usize);
    }
    let mut out = Vec::new();
    let mut at = extensions_start(h);
    while at + 8 <= end {
        let ty = be_u32(cluster, at);
        let len = be_u32(cluster, at + 4) as usize;
        if ty == EXT_END {
            break;
        }
        if at + 8 + len > end {
            return Err(ImageError::corrupt(
                path,
                at as u64,
                format!("header extension 0x{ty:08x} of {len} bytes runs past the header"),
            ));
        }
        out.push(Extension {
            ty,
            at,
            data: cluster[at + 8..at + 8 + len].to_vec(),
        });
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Builds the new header block: the old bytes up to the extensions with
/// the backing name's offset and size replaced, the extensions (backing
/// format added, replaced or dropped), the end marker, the name, zeros.
fn relayout(
    path: &Path,
    h: &Header,
    cluster: &[u8],
    backing: Option<(&str, &str)>,
) -> Result<Vec<u8>> {
    let cs = h.cluster_size();
    let limit = COMMIT_BLOCK.min(cs) as usize;
    let start = extensions_start(h);
    let old = read_extensions(path, h, cluster)?;
    check_bitmap_directory(path, cs, &old)?;
    let exts = new_extensions(&old, backing);
    check_fits(path, backing, start, &exts, limit)?;
    Ok(encode_block(cluster, start, &exts, backing, limit))
}

/// Refuses a bitmap directory inside the header cluster: the bitmap
/// directory lives elsewhere, and `relayout` zeros part of that cluster.
fn check_bitmap_directory(path: &Path, cs: u64, old: &[Extension]) -> Result<()> {
    for e in old {
        // The bitmap directory lives elsewhere; make sure it is not in the
        // part of the header cluster we zero.
        if e.ty == EXT_BITMAPS && e.data.len() >= 24 {
            let dir = be_u64(&e.data, 16);
            if dir < cs {
                return Err(ImageError::corrupt(
                    path,
                    (e.at + 8 + 16) as u64,
                    format!("bitmap directory starts at offset {dir}, inside the header cluster ({cs} bytes)"),
                ));
            }
        }
    }

    Ok(())
}

/// The new extension list, as (type, data): the old one with the backing
/// format replaced (or dropped without a backing file, or added first).
fn new_extensions<'a>(
    old: &'a [Extension],
    backing: Option<(&'a str, &'a str)>,
) -> Vec<(u32, &'a [u8])> {
    let mut exts: Vec<(u32, &[u8])> = Vec::with_capacity(old.len() + 1);
    let mut format_placed = false;
    for e in old {
        if e.ty != EXT_BACKING_FORMAT {
            exts.push((e.ty, &e.data));
        } else if let (Some((_, format)), false) = (backing, format_placed) {
            // Replaced where the old one stood, keeping the order.
            exts.push((EXT_BACKING_FORMAT, format.as_bytes()));
            format_placed = true;
        }
    }
    if let (Some((_, format)), false) = (backing, format_placed) {
        // Added first, where QEMU puts it.
        exts.insert(0, (EXT_BACKING_FORMAT, format.as_bytes()));
    }
    exts
}

/// Refuses a header that does not fit the one block that is rewritten
/// atomically, before anything is written.
fn check_fits(
    path: &Path,
    backing: Option<(&str, &str)>,
    start: usize,
    exts: &[(u32, &[u8])],
    limit: usize,
) -> Result<()> {
    let exts_len: usize = exts.iter().map(|(_, d)| 8 + d.len().div_ceil(8) * 8).sum();
    let name = backing.map_or(&[][..], |(n, _)| n.as_bytes());
    let needed = start + exts_len + 8 + name.len();
    if needed > limit {
        let what = match backing {
            Some((n, _)) => format!("backing file name {n:?} ({} bytes)", n.len()),
            None => "the header without a backing file".to_string(),
        };
        return Err(ImageError::invalid(
            path,
            format!(
                "{what} does not fit in the header: the fixed header ({start} bytes), \
                 {} header extensions ({exts_len} bytes), the end marker (8 bytes) and the \
                 name need {needed} bytes, but the header must be rewritten in one \
                 {limit}-byte block (4096 bytes or the cluster size, whichever is smaller); \
                 nothing was written",
                exts.len()
            ),
        ));
    }

    Ok(())
}

/// The new first `limit` bytes of the header cluster: the fixed header,
/// the extensions, the end marker and the backing name, zero-padded.
fn encode_block(
    cluster: &[u8],
    start: usize,
    exts: &[(u32, &[u8])],
    backing: Option<(&str, &str)>,
    limit: usize,
) -> Vec<u8> {
    let name = backing.map_or(&[][..], |(n, _)| n.as_bytes());
    let mut block = Vec::with_capacity(limit);
    block.extend_from_slice(&cluster[..start]);
    for (ty, data) in exts {
        block.extend_from_slice(&ty.to_be_bytes());
        block.extend_from_slice(&(data.len() as u32).to_be_bytes());
        block.extend_from_slice(data);
        block.resize(block.len().div_ceil(8) * 8, 0);
    }
    block.extend_from_slice(&EXT_END.to_be_bytes());
    block.extend_from_slice(&0u32.to_be_bytes());
    let (name_offset, name_size) = if name.is_empty() {
        (0u64, 0u32)
    } else {
        (block.len() as u64, name.len() as u32)
    };
    block.extend_from_slice(name);
    // Zeros to the end of the block, so no byte of an older, longer name
    // or extension list is left behind.
    block.resize(limit, 0);
    block[8..16].copy_from_slice(&name_offset.to_be_bytes());
    block[16..20].copy_from_slice(&name_size.to_be_bytes());
    block
}
