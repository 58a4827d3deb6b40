//! Walking a directory's entries in block order: every leaf block of a
//! linear or htree directory (index blocks skipped), or the two areas of
//! an inline_data directory. Used by readdir and by lookups the index
//! cannot answer.

use super::inode::{Inode, FL_INDEX, FL_INLINE_DATA};
use super::{dir, map, sb, xattr, ExtFs};
use crate::guest::{GuestError, GuestResult};
use std::collections::HashSet;

/// Entries one directory listing may hold (the kernel has no such limit,
/// but a directory this large is far beyond real ones and its listing
/// would take gigabytes).
pub(super) const MAX_ENTRIES: u64 = 10_000_000;
/// Bytes of names one listing may hold.
pub(super) const MAX_NAME_BYTES: u64 = 1 << 30;
/// Blocks one directory scan reads (16 GiB of 4 KiB blocks).
const MAX_BLOCKS: u64 = 1 << 22;

/// The physical blocks a scan has read.
#[derive(Default)]
struct Budget {
    blocks: HashSet<u64>,
}

impl ExtFs {
    /// Counts physical block `p` of `dir`: each may appear once (a block
    /// map sending many logical blocks to one block would list its entries
    /// over and over), and a scan reads at most MAX_BLOCKS.
    fn budget_block(&self, dir: &Inode, b: &mut Budget, p: u64) -> GuestResult<()> {
        let what = if b.blocks.len() as u64 >= MAX_BLOCKS {
            format!("directory {}: more than {MAX_BLOCKS} blocks", dir.ino)
        } else if !b.blocks.insert(p) {
            format!("directory {}: block {p} appears twice", dir.ino)
        } else {
            return Ok(());
        };
        Err(GuestError::corrupt(&self.disk.name, dir.offset, what))
    }

    /// Whether block 0 of `dir` is an htree root to skip in a listing: the
    /// filesystem has dir_index, the inode the INDEX flag, and the block a
    /// sound root (the kernel otherwise reads the directory linearly).
    fn skips_block0(&self, dir: &Inode, block: &[u8], off: u64) -> bool {
        dir.flags & FL_INDEX != 0
            && self.sb.has_compat(sb::COMPAT_DIR_INDEX)
            && dir::is_dx_root(&self.disk.name, &self.sb, dir, block, off)
    }

    /// Calls `f` on every entry of `dir` in block order (index blocks
    /// skipped); stops when `f` returns true.
    pub(super) fn scan_dir(
        &self,
        dir: &Inode,
        mut f: impl FnMut(dir::Raw) -> GuestResult<bool>,
    ) -> GuestResult<()> {
        if dir.flags & FL_INLINE_DATA != 0 {
            return self.scan_inline_dir(dir, f);
        }
        let bs = self.sb.block_size;
        let nblocks = dir.size.div_ceil(bs);
        let mut lblk = 0;
        let (mut entries, mut names) = (0u64, 0u64);
        let vol = &self.disk.name;
        let mut f = |e: dir::Raw| -> GuestResult<bool> {
            entries += 1;
            names += e.name.len() as u64;
            if entries > MAX_ENTRIES || names > MAX_NAME_BYTES {
                let what = format!(
                    "directory {}: more than {MAX_ENTRIES} entries or {MAX_NAME_BYTES} bytes of names",
                    dir.ino
                );
                return Err(GuestError::unsupported(vol, what));
            }
            f(e)
        };
        let mut seen = Budget::default();
        while lblk < nblocks {
            let run = map::map(&self.disk, self.csum(), dir, lblk)?;
            let Some(p) = run.phys else {
                lblk = lblk.saturating_add(run.len);
                continue;
            };
            for k in 0..run.len.min(nblocks - lblk) {
                self.budget_block(dir, &mut seen, p + k)?;
                let block = self.disk.block(p + k)?;
                let at = (p + k) * bs;
                if (lblk + k == 0 && self.skips_block0(dir, &block, at)) || dir::is_dx_node(&block)
                {
                    continue;
                }
                if leaf_entries(vol, dir, self.csum(), &block, at, &mut f)? {
                    return Ok(());
                }
            }
            lblk += run.len;
        }
        Ok(())
    }

    /// An inline directory: the parent's inode number in the first 4
    /// bytes of i_block, entries in the other 56, more in system.data.
    fn scan_inline_dir(
        &self,
        dir: &Inode,
        mut f: impl FnMut(dir::Raw) -> GuestResult<bool>,
    ) -> GuestResult<()> {
        let extra = xattr::system_data(&self.disk.name, dir)?;
        let regions: [(&[u8], u64); 2] = [
            (&dir.i_block()[4..], dir.offset + 0x2C),
            (&extra, dir.offset),
        ];
        for (region, off) in regions {
            if region.is_empty() {
                continue;
            }
            if leaf_entries(&self.disk.name, dir, false, region, off, &mut f)? {
                break;
            }
        }
        Ok(())
    }
}

/// `dir::parse_leaf` with a callback that may fail: the callback's first
/// error ends the parse and is returned; `Ok(true)` when the callback
/// asked to stop.
fn leaf_entries(
    vol: &str,
    dir: &Inode,
    csum: bool,
    block: &[u8],
    off: u64,
    f: &mut impl FnMut(dir::Raw) -> GuestResult<bool>,
) -> GuestResult<bool> {
    let mut err = None;
    let mut stop = false;
    dir::parse_leaf(vol, dir, csum, block, off, |e| {
        match f(e) {
            Ok(s) => stop = s,
            Err(e) => {
                err = Some(e);
                stop = true;
            }
        }
        stop
    })?;
    err.map_or(Ok(stop), Err)
}
