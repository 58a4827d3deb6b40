//! XFS directory contents: shortform directories (entries in the inode)
//! and directory data blocks (the single block of a block directory, and
//! the data blocks of leaf, node and btree directories), read entry by
//! entry with every length and tag checked. Listing a directory reads only
//! its data blocks; name lookups through the hash index are in `dabtree`.

use super::disk::{be16, be32, be64, V5Hdr};
use super::inode::{Fork, Inode, FMT_LOCAL};
use super::XfsFs;
use crate::guest::{GuestError, GuestResult};
use std::collections::HashSet;

const XD2B: u32 = 0x5844_3242; // v4 block directory
const XD2D: u32 = 0x5844_3244; // v4 data block
const XDB3: u32 = 0x5844_4233; // v5 block directory
const XDD3: u32 = 0x5844_4433; // v5 data block
/// Directory data lives below this byte offset; leaf blocks start here.
pub const LEAF_OFFSET: u64 = 1 << 35;
const DATA_V5: V5Hdr = V5Hdr {
    crc: 4,
    blkno: 8,
    uuid: 24,
    owner: Some(40),
};

/// One raw directory entry.
pub struct Ent<'a> {
    pub name: &'a [u8],
    pub ino: u64,
    /// The ftype byte (0 if the filesystem has none).
    pub ftype: u8,
}

impl XfsFs {
    /// Calls `f` for every entry of a shortform directory (".." first, as
    /// its parent field); `f` returns true to stop.
    pub(super) fn sf_entries(&self, d: &Inode, f: &mut dyn FnMut(Ent) -> bool) -> GuestResult<()> {
        let b = d.fork(Fork::Data);
        let at = d.fork_offset(Fork::Data);
        let bad = |off: usize, what: &str| {
            GuestError::corrupt(
                &self.disk.name,
                at + off as u64,
                format!("directory {}: shortform {what}", d.ino),
            )
        };
        // The header (count, i8count, a 4-byte parent) needs 6 bytes.
        if d.size < 6 || d.size > b.len() as u64 {
            return Err(bad(0, "size outside 6 bytes .. the inode's fork"));
        }
        let b = &b[..d.size as usize];
        let count = b[0] as usize;
        let wide = b[1] != 0;
        let isz = if wide { 8 } else { 4 };
        let rd = |p: usize| if wide { be64(b, p) } else { be32(b, p) as u64 };
        if b.len() < 2 + isz {
            return Err(bad(0, "header truncated"));
        }
        if f(Ent {
            name: b"..",
            ino: rd(2),
            ftype: 2,
        }) {
            return Ok(());
        }
        let extra = self.sb.ftype as usize;
        let mut p = 2 + isz;
        for _ in 0..count {
            let len = *b.get(p).ok_or_else(|| bad(p, "entry past its end"))? as usize;
            let end = p + 3 + len + extra + isz;
            if len == 0 || end > b.len() {
                return Err(bad(p, "entry past its end"));
            }
            let name = &b[p + 3..p + 3 + len];
            let ftype = if extra == 1 { b[p + 3 + len] } else { 0 };
            if f(Ent {
                name,
                ino: rd(p + 3 + len + extra),
                ftype,
            }) {
                return Ok(());
            }
            p = end;
        }
        Ok(())
    }

    /// Checks a directory data block's header; returns where entries start
    /// and end (a block directory's leaf and tail at the end are excluded).
    pub(super) fn data_block_bounds(
        &self,
        d: &Inode,
        b: &[u8],
        at: u64,
        block_form: bool,
    ) -> GuestResult<(usize, usize)> {
        let v5 = self.sb.v5;
        let want = match (v5, block_form) {
            (false, true) => XD2B,
            (false, false) => XD2D,
            (true, true) => XDB3,
            (true, false) => XDD3,
        };
        let bad = |what: String| {
            GuestError::corrupt(
                &self.disk.name,
                at,
                format!("directory {} data block: {what}", d.ino),
            )
        };
        if be32(b, 0) != want {
            return Err(bad("bad magic".into()));
        }
        if v5 {
            if let Some(w) = DATA_V5.check(b, at, self.sb.meta_uuid(), d.ino) {
                return Err(bad(w.into()));
            }
        }
        let start = if v5 { 64 } else { 16 };
        let mut end = b.len();
        if block_form {
            let count = be32(b, b.len() - 8) as usize;
            match (count.checked_mul(8)).map(|c| c + 8) {
                Some(t) if start + t <= b.len() => end = b.len() - t,
                _ => return Err(bad(format!("block tail counts {count} leaf entries"))),
            }
        }
        Ok((start, end))
    }

    /// Calls `f(entry, offset in block)` for every entry of one data block;
    /// `f` returns true to stop. Returns whether it stopped.
    pub(super) fn data_entries(
        &self,
        d: &Inode,
        b: &[u8],
        at: u64,
        block_form: bool,
        f: &mut dyn FnMut(Ent, usize) -> bool,
    ) -> GuestResult<bool> {
        let (mut p, end) = self.data_block_bounds(d, b, at, block_form)?;
        let extra = self.sb.ftype as usize;
        while p < end {
            let bad = |what: &str| {
                GuestError::corrupt(
                    &self.disk.name,
                    at + p as u64,
                    format!("directory {}: {what}", d.ino),
                )
            };
            if p + 8 > end {
                return Err(bad("entry past the block's end"));
            }
            if be16(b, p) == 0xffff {
                let len = be16(b, p + 2) as usize;
                if len < 8
                    || !len.is_multiple_of(8)
                    || p + len > end
                    || be16(b, p + len - 2) as usize != p
                {
                    return Err(bad("bad free region"));
                }
                p += len;
                continue;
            }
            // The smallest entry (ino, namelen, one name byte, tag) takes
            // 16 bytes; less room than that left is no entry.
            if p + 16 > end {
                return Err(bad("entry past the block's end"));
            }
            let nlen = b[p + 8] as usize;
            let size = (11 + nlen + extra).next_multiple_of(8);
            if nlen == 0 || p + size > end || be16(b, p + size - 2) as usize != p {
                return Err(bad("bad entry length or tag"));
            }
            let ent = Ent {
                name: &b[p + 9..p + 9 + nlen],
                ino: be64(b, p),
                ftype: if extra == 1 { b[p + 9 + nlen] } else { 0 },
            };
            if f(ent, p) {
                return Ok(true);
            }
            p += size;
        }
        Ok(false)
    }

    /// Whether `d` (not shortform) is a block directory: one directory
    /// block of data, its leaf inside it. Decided as the kernel decides
    /// it, by where the data fork's mapping ends (exactly one directory
    /// block), not by the size: a leaf directory whose entries fit one
    /// data block has that same size, its leaf block mapped far beyond.
    pub(super) fn is_block_dir(&self, d: &Inode) -> GuestResult<bool> {
        if d.size != self.sb.dir_block_size() {
            return Ok(false);
        }
        let end = self
            .extents(d, Fork::Data)?
            .iter()
            .map(|e| e.off.saturating_add(e.len))
            .max();
        Ok(end == Some(1 << self.sb.dirblklog))
    }

    /// Calls `f` for every entry of directory `d` (including "." and "..");
    /// `f` returns true to stop.
    pub(super) fn dir_entries(&self, d: &Inode, f: &mut dyn FnMut(Ent) -> bool) -> GuestResult<()> {
        if d.format == FMT_LOCAL {
            return self.sf_entries(d, f);
        }
        let fsbs = 1u64 << self.sb.dirblklog;
        let leaf_fblk = LEAF_OFFSET >> self.sb.blocklog;
        if d.size > LEAF_OFFSET {
            return Err(GuestError::corrupt(
                &self.disk.name,
                d.offset + 0x38,
                format!("directory {}: size {} beyond the data space", d.ino, d.size),
            ));
        }
        let block_form = self.is_block_dir(d)?;
        let extents = self.extents(d, Fork::Data)?;
        let mut last = None;
        // Physical blocks listed so far: two logical blocks mapped onto one
        // would list its entries twice (and a crafted fork could repeat one
        // block until the listing outgrows the volume).
        let mut seen = HashSet::new();
        for e in extents.iter() {
            let mut fblk = e.off - e.off % fsbs;
            while fblk < (e.off + e.len).min(leaf_fblk) {
                let db = fblk / fsbs;
                if last != Some(db) && !e.unwritten {
                    last = Some(db);
                    if let Some((b, at)) = self.dir_block(d, fblk)? {
                        if !seen.insert(at) {
                            return Err(GuestError::corrupt(
                                &self.disk.name,
                                at,
                                format!(
                                    "directory {}: data block {fblk} maps a block listed before",
                                    d.ino
                                ),
                            ));
                        }
                        if self.data_entries(d, &b, at, block_form, &mut |ent, _| f(ent))? {
                            return Ok(());
                        }
                    }
                }
                fblk += fsbs;
            }
        }
        Ok(())
    }
}
