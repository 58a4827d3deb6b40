//! Hash lookups in XFS directories and the dabtree (directory/attribute
//! B+tree) both directory formats above "block" and attribute forks use:
//! the name hash, the descent through node blocks to the leaf that holds
//! a hash, and the directory's hash-ordered leaf entries, so a lookup in
//! a directory of any size reads a handful of blocks, never all of them.

use super::dir::{Ent, LEAF_OFFSET};
use super::disk::{be16, be32, V5Hdr};
use super::inode::{Fork, Inode};
use super::XfsFs;
use crate::guest::{GuestError, GuestResult};
use std::sync::Arc;

const NODE_MAGIC: u16 = 0xfebe;
const NODE3_MAGIC: u16 = 0x3ebe;
const LEAF1_MAGIC: u16 = 0xd2f1;
const LEAFN_MAGIC: u16 = 0xd2ff;
const LEAF1_3_MAGIC: u16 = 0x3df1;
const LEAFN_3_MAGIC: u16 = 0x3dff;
/// The dabtree is at most 5 levels deep; a little slack.
const MAX_DEPTH: usize = 8;
/// Leaves one hash value may span (hash collisions); a bound on loops.
const MAX_HOPS: usize = 1024;
/// Every dabtree block's v5 header (`xfs_da3_blkinfo`).
pub const DA3_HDR: V5Hdr = V5Hdr {
    crc: 12,
    blkno: 16,
    uuid: 32,
    owner: Some(48),
};

/// The XFS name hash (`xfs_da_hashname`): 7-bit rotations over 4-byte
/// groups, then the 0-3 remaining bytes.
pub fn hash(name: &[u8]) -> u32 {
    let mut h: u32 = 0;
    let mut chunks = name.chunks_exact(4);
    for c in &mut chunks {
        h = (c[0] as u32) << 21
            ^ (c[1] as u32) << 14
            ^ (c[2] as u32) << 7
            ^ c[3] as u32
            ^ h.rotate_left(28);
    }
    match *chunks.remainder() {
        [a, b, c] => (a as u32) << 14 ^ (b as u32) << 7 ^ c as u32 ^ h.rotate_left(21),
        [a, b] => (a as u32) << 7 ^ b as u32 ^ h.rotate_left(14),
        [a] => a as u32 ^ h.rotate_left(7),
        _ => h,
    }
}

/// A leaf block reached by a descent.
pub struct Leaf {
    pub b: Arc<Vec<u8>>,
    pub at: u64,
    /// Its block in the fork (what a neighbour's forw/back link names).
    pub fblk: u64,
    pub magic: u16,
}

impl XfsFs {
    /// Size of a dabtree block of `fork` in filesystem blocks.
    fn da_fsbs(&self, fork: Fork) -> u64 {
        match fork {
            Fork::Data => 1 << self.sb.dirblklog,
            Fork::Attr => 1,
        }
    }

    /// The dabtree block at fork block `fblk` (a hole is corruption).
    pub(super) fn da_block(
        &self,
        d: &Inode,
        fork: Fork,
        fblk: u64,
        from: u64,
    ) -> GuestResult<(Arc<Vec<u8>>, u64)> {
        match self.fork_block(d, fork, fblk, self.da_fsbs(fork))? {
            Some(x) => Ok(x),
            None => Err(GuestError::corrupt(
                &self.disk.name,
                from,
                format!("inode {}: dabtree points to unmapped block {fblk}", d.ino),
            )),
        }
    }

    /// Descends from the root at fork block `root` to the leftmost leaf
    /// that may hold `hash` (hash 0: the leftmost leaf).
    pub(super) fn da_descend(
        &self,
        d: &Inode,
        fork: Fork,
        root: u64,
        hash: u32,
    ) -> GuestResult<Leaf> {
        let mut fblk = root;
        let mut from = d.offset;
        let mut want_level = None;
        for _ in 0..MAX_DEPTH {
            let (b, at) = self.da_block(d, fork, fblk, from)?;
            let magic = be16(&b, 8);
            let v5 = self.sb.v5;
            if magic != if v5 { NODE3_MAGIC } else { NODE_MAGIC } {
                if want_level.is_some_and(|l| l != 0) {
                    return Err(self.da_bad(d, at, "node points to a leaf at the wrong level"));
                }
                return Ok(Leaf { b, at, fblk, magic });
            }
            if v5 {
                if let Some(w) = DA3_HDR.check(&b, at, self.sb.meta_uuid(), d.ino) {
                    return Err(self.da_bad(d, at, w));
                }
            }
            let hdr = if v5 { 64 } else { 16 };
            let count = be16(&b, hdr - if v5 { 8 } else { 4 }) as usize;
            let level = be16(&b, hdr - if v5 { 6 } else { 2 }) as u32;
            if count == 0
                || hdr + count * 8 > b.len()
                || level == 0
                || want_level.is_some_and(|l| l != level)
            {
                return Err(self.da_bad(d, at, "node count or level"));
            }
            // The first entry whose hash (the largest below it) is >= the
            // one sought; past the last, the last (nothing there matches).
            let (mut lo, mut hi) = (0, count);
            while lo < hi {
                let mid = (lo + hi) / 2;
                if be32(&b, hdr + mid * 8) < hash {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let i = lo.min(count - 1);
            fblk = be32(&b, hdr + i * 8 + 4) as u64;
            from = at;
            want_level = Some(level - 1);
        }
        Err(self.da_bad(d, from, "dabtree deeper than the format allows"))
    }

    pub(super) fn da_bad(&self, d: &Inode, at: u64, what: &str) -> GuestError {
        GuestError::corrupt(
            &self.disk.name,
            at,
            format!("inode {} dabtree block: {what}", d.ino),
        )
    }

    /// Looks `name` up in a non-shortform directory through its hash
    /// index: the leaf inside a block directory, or the leaf blocks
    /// (found through the node blocks of node and btree directories).
    pub(super) fn dir_hash_lookup(&self, d: &Inode, name: &[u8]) -> GuestResult<Option<u64>> {
        let h = hash(name);
        if self.is_block_dir(d)? {
            let Some((b, at)) = self.dir_block(d, 0)? else {
                return Err(self.da_bad(d, d.offset, "block directory has no block"));
            };
            self.data_block_bounds(d, &b, at, true)?;
            let count = be32(&b, b.len() - 8) as usize;
            let start = b.len() - 8 - count * 8;
            let ents: Vec<(u32, u32)> = (0..count)
                .map(|i| (be32(&b, start + i * 8), be32(&b, start + i * 8 + 4)))
                .collect();
            let (found, _) = self.match_leaf_ents(d, &ents, h, name)?;
            return Ok(found);
        }
        let root = LEAF_OFFSET >> self.sb.blocklog;
        let mut leaf = self.da_descend(d, Fork::Data, root, h)?;
        for _ in 0..MAX_HOPS {
            let v5 = self.sb.v5;
            let ok = if v5 {
                [LEAF1_3_MAGIC, LEAFN_3_MAGIC]
            } else {
                [LEAF1_MAGIC, LEAFN_MAGIC]
            };
            if !ok.contains(&leaf.magic) {
                return Err(self.da_bad(d, leaf.at, "bad directory leaf magic"));
            }
            let b = &leaf.b;
            if v5 {
                if let Some(w) = DA3_HDR.check(b, leaf.at, self.sb.meta_uuid(), d.ino) {
                    return Err(self.da_bad(d, leaf.at, w));
                }
            }
            let hdr = if v5 { 64 } else { 16 };
            let count = be16(b, hdr - if v5 { 8 } else { 4 }) as usize;
            if hdr + count * 8 > b.len() {
                return Err(self.da_bad(d, leaf.at, "leaf count"));
            }
            let ents: Vec<(u32, u32)> = (0..count)
                .map(|i| (be32(b, hdr + i * 8), be32(b, hdr + i * 8 + 4)))
                .collect();
            let (found, more) = self.match_leaf_ents(d, &ents, h, name)?;
            let forw = be32(b, 0) as u64;
            if found.is_some() || !more || forw == 0 {
                return Ok(found);
            }
            let (nb, at) = self.da_block(d, Fork::Data, forw, leaf.at)?;
            leaf = Leaf {
                magic: be16(&nb, 8),
                b: nb,
                at,
                fblk: forw,
            };
        }
        Err(self.da_bad(d, leaf.at, "too many leaves with one hash"))
    }

    /// Checks the entries hashed `h` among sorted leaf entries (hash,
    /// address); returns the inode if one is `name`, and whether entries
    /// with this hash may continue in the next leaf.
    fn match_leaf_ents(
        &self,
        d: &Inode,
        ents: &[(u32, u32)],
        h: u32,
        name: &[u8],
    ) -> GuestResult<(Option<u64>, bool)> {
        let mut i = ents.partition_point(|e| e.0 < h);
        while i < ents.len() && ents[i].0 == h {
            let addr = ents[i].1;
            if addr != 0 {
                if let Some(ino) = self.entry_at(d, addr as u64 * 8, name)? {
                    return Ok((Some(ino), false));
                }
            }
            i += 1;
        }
        Ok((None, i == ents.len()))
    }

    /// The inode of the data entry at directory byte `byte` if its name is
    /// `name`.
    fn entry_at(&self, d: &Inode, byte: u64, name: &[u8]) -> GuestResult<Option<u64>> {
        let dbs = self.sb.dir_block_size();
        let fblk = (byte / dbs) << self.sb.dirblklog;
        let off = (byte % dbs) as usize;
        if byte >= LEAF_OFFSET {
            return Err(self.da_bad(d, d.offset, "leaf entry points outside the data space"));
        }
        let Some((b, at)) = self.dir_block(d, fblk)? else {
            return Err(self.da_bad(d, d.offset, "leaf entry points to a hole"));
        };
        let mut found = None;
        let mut seen = false;
        // The block's entries are walked (checking each) up to `off`, so
        // an address into the middle of an entry is caught.
        let block_form = self.is_block_dir(d)?;
        self.data_entries(d, &b, at, block_form, &mut |e: Ent, p| {
            if p == off {
                seen = true;
                if e.name == name {
                    found = Some(e.ino);
                }
            }
            p >= off
        })?;
        if !seen {
            return Err(self.da_bad(d, at + off as u64, "leaf entry points to no entry"));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_shapes() {
        assert_eq!(hash(b""), 0);
        assert_eq!(hash(b"a"), 0x61);
        assert_eq!(hash(b"ab"), (0x61 << 7) ^ 0x62);
        let four = (0x61u32 << 21) ^ (0x62 << 14) ^ (0x63 << 7) ^ 0x64;
        assert_eq!(hash(b"abcd"), four);
        assert_eq!(hash(b"abcde"), 0x65 ^ four.rotate_left(7));
    }
}
