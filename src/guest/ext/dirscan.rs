//! Walking a directory's entries in block order: every leaf block of a
//! linear or htree directory (index blocks skipped), or the two areas of
//! an inline_data directory. Used by readdir and by lookups the index
//! cannot answer.

use super::inode::{Inode, FL_INDEX, FL_INLINE_DATA};
use super::{dir, map, xattr, ExtFs};
use crate::guest::GuestResult;

impl ExtFs {
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
        let indexed = dir.flags & FL_INDEX != 0;
        let mut lblk = 0;
        let mut err = None;
        while lblk < nblocks {
            let run = map::map(&self.disk, self.csum(), dir, lblk)?;
            let Some(p) = run.phys else {
                lblk = lblk.saturating_add(run.len);
                continue;
            };
            for k in 0..run.len.min(nblocks - lblk) {
                let block = self.disk.block(p + k)?;
                if (indexed && lblk + k == 0) || dir::is_dx_node(&block) {
                    continue;
                }
                let mut stop = false;
                dir::parse_leaf(
                    &self.disk.name,
                    dir,
                    self.csum(),
                    &block,
                    (p + k) * bs,
                    |e| {
                        match f(e) {
                            Ok(s) => stop = s,
                            Err(e) => {
                                err = Some(e);
                                stop = true;
                            }
                        }
                        stop
                    },
                )?;
                if let Some(e) = err.take() {
                    return Err(e);
                }
                if stop {
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
            let mut stop = false;
            let mut err = None;
            dir::parse_leaf(&self.disk.name, dir, false, region, off, |e| {
                match f(e) {
                    Ok(s) => stop = s,
                    Err(e) => {
                        err = Some(e);
                        stop = true;
                    }
                }
                stop
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            if stop {
                break;
            }
        }
        Ok(())
    }
}
