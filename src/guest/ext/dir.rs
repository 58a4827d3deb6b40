//! Directory blocks: linear entry parsing (with the metadata_csum tail),
//! and the htree (dx_root / dx_node) index walk that finds the one leaf
//! block a name can be in, so lookups in a 50,000-entry directory read a
//! handful of blocks. Index blocks met during a linear listing are
//! recognised and skipped.

use super::hash::dx_hash;
use super::inode::Inode;
use super::sb::{le16, le32, Superblock};
use crate::guest::crc::crc32c;
use crate::guest::{GuestError, GuestResult};
use std::sync::Arc;

/// s_flags bit: the directory hash treats chars as unsigned.
const FLAG_UNSIGNED_HASH: u32 = 0x2;

/// A parsed directory entry (before "." / ".." filtering).
pub struct Raw<'a> {
    pub ino: u32,
    pub name: &'a [u8],
    pub ftype: u8,
}

fn rec_len(raw: u16, bs: usize) -> usize {
    if bs >= 65536 && (raw == 65535 || raw == 0) {
        return bs;
    }
    (raw as usize & 65532) | ((raw as usize & 3) << 16)
}

/// Whether the block is an htree interior node (a fake empty entry
/// spanning the whole block).
pub fn is_dx_node(block: &[u8]) -> bool {
    le32(block, 0) == 0 && rec_len(le16(block, 4), block.len()) == block.len()
}

/// Calls `f` for each live entry of leaf block `block` (at volume byte
/// `off`), after checking its checksum tail when `csum`; stops early when
/// `f` returns true.
pub fn parse_leaf(
    vol: &str,
    dir: &Inode,
    csum: bool,
    block: &[u8],
    off: u64,
    mut f: impl FnMut(Raw) -> bool,
) -> GuestResult<()> {
    let bs = block.len();
    let mut end = bs;
    if csum {
        let t = bs - 12;
        if le32(block, t) != 0
            || le16(block, t + 4) != 12
            || block[t + 6] != 0
            || block[t + 7] != 0xDE
        {
            return Err(GuestError::corrupt(
                vol,
                off,
                format!("directory {}: block has no checksum tail", dir.ino),
            ));
        }
        let want = le32(block, bs - 4);
        let got = crc32c(dir.csum_seed, &block[..t]);
        if want != got {
            return Err(GuestError::corrupt(
                vol,
                off,
                format!(
                    "directory {}: block checksum mismatch (stored {want:#x}, computed {got:#x})",
                    dir.ino
                ),
            ));
        }
        end = t;
    }
    let mut pos = 0;
    while pos < end {
        if pos + 8 > end {
            return Err(GuestError::corrupt(
                vol,
                off + pos as u64,
                format!("directory {}: truncated entry", dir.ino),
            ));
        }
        let ino = le32(block, pos);
        let rl = rec_len(le16(block, pos + 4), bs);
        let name_len = block[pos + 6] as usize;
        if rl < 8 || !rl.is_multiple_of(4) || pos + rl > end || 8 + name_len > rl {
            return Err(GuestError::corrupt(
                vol,
                off + pos as u64,
                format!(
                    "directory {}: bad entry (rec_len {rl}, name_len {name_len})",
                    dir.ino
                ),
            ));
        }
        if ino != 0
            && name_len > 0
            && f(Raw {
                ino,
                name: &block[pos + 8..pos + 8 + name_len],
                ftype: block[pos + 7],
            })
        {
            return Ok(());
        }
        pos += rl;
    }
    Ok(())
}

/// Reads a directory's logical block (through the caller's mapping).
pub trait DirBlocks {
    /// The block's bytes and its volume byte offset; `None` for a hole.
    fn dir_block(
        &self,
        dir: &Inode,
        lblk: u64,
    ) -> GuestResult<Option<(std::sync::Arc<Vec<u8>>, u64)>>;
}

/// One level of the index: where its entries start and how many.
struct DxNode {
    count_off: usize,
    count: usize,
}

fn dx_node(
    vol: &str,
    dir: &Inode,
    csum: bool,
    b: &[u8],
    off: u64,
    count_off: usize,
) -> GuestResult<DxNode> {
    let bs = b.len();
    let bad = |what: &str| {
        GuestError::corrupt(
            vol,
            off + count_off as u64,
            format!("directory {} htree: {what}", dir.ino),
        )
    };
    let limit = le16(b, count_off) as usize;
    let count = le16(b, count_off + 2) as usize;
    let tail = if csum { 8 } else { 0 };
    if limit != (bs - count_off - tail) / 8 {
        return Err(bad(&format!("limit {limit} does not match the block")));
    }
    if count == 0 || count > limit {
        return Err(bad(&format!("count {count} out of range")));
    }
    if csum {
        let t = count_off + limit * 8;
        let c = crc32c(dir.csum_seed, &b[..count_off + count * 8]);
        let c = crc32c(c, &b[t..t + 4]);
        // The checksum field itself counts as zeros.
        let c = crc32c(c, &[0; 4]);
        let want = le32(b, t + 4);
        if c != want {
            return Err(bad(&format!(
                "checksum mismatch (stored {want:#x}, computed {c:#x})"
            )));
        }
    }
    Ok(DxNode { count_off, count })
}

/// Hash at entry `i` (entry 0 has none: it covers everything below).
fn dx_hash_at(b: &[u8], n: &DxNode, i: usize) -> u32 {
    if i == 0 {
        0
    } else {
        le32(b, n.count_off + 8 * i)
    }
}

fn dx_block_at(b: &[u8], n: &DxNode, i: usize) -> u64 {
    (le32(b, n.count_off + 8 * i + 4) & 0x0FFF_FFFF) as u64
}

/// Outcome of an htree lookup.
pub enum DxResult {
    Found(u32),
    NotFound,
    /// The index cannot answer (a hash this reader does not know): scan
    /// linearly.
    Linear,
}

/// One index node on the path from the root: its bytes, entries, and the
/// entry followed.
struct Step {
    buf: Arc<Vec<u8>>,
    node: DxNode,
    at: usize,
}

/// Where lookups start: the hash of `name` under the root's hash version.
fn root_hash(
    vol: &str,
    sb: &Superblock,
    dir: &Inode,
    root: &[u8],
    root_off: u64,
    name: &[u8],
) -> GuestResult<Option<(u32, usize)>> {
    let info_len = root[0x1D] as usize;
    let levels = root[0x1E] as usize;
    let max_levels = if sb.has_incompat(super::sb::INCOMPAT_LARGEDIR) {
        3
    } else {
        2
    };
    if le32(root, 0x18) != 0 || info_len != 8 || levels >= max_levels {
        let what = format!(
            "directory {} htree root: bad info (info length {info_len}, {levels} levels)",
            dir.ino
        );
        return Err(GuestError::corrupt(vol, root_off + 0x18, what));
    }
    let mut version = root[0x1C];
    if version <= 2 && sb.flags & FLAG_UNSIGNED_HASH != 0 {
        version += 3;
    }
    Ok(dx_hash(name, version, sb.hash_seed).map(|h| (h, levels)))
}

/// Reads index node `lblk` (below the root) and checks it.
fn read_node(
    vol: &str,
    csum: bool,
    dir: &Inode,
    blocks: &dyn DirBlocks,
    lblk: u64,
) -> GuestResult<(Arc<Vec<u8>>, DxNode)> {
    let Some((b, off)) = blocks.dir_block(dir, lblk)? else {
        let what = format!(
            "directory {} htree: index points to a hole at block {lblk}",
            dir.ino
        );
        return Err(GuestError::corrupt(vol, dir.offset, what));
    };
    if !is_dx_node(&b) {
        return Err(GuestError::corrupt(
            vol,
            off,
            format!("directory {}: htree node expected", dir.ino),
        ));
    }
    let n = dx_node(vol, dir, csum, &b, off, 8)?;
    Ok((b, n))
}

/// Whether `b` (block 0 of `dir`, at volume byte `off`) is a sound htree
/// root: "." and a ".." spanning the rest of the block, valid root info and
/// entry limits (and their checksum with metadata_csum).
pub fn is_dx_root(vol: &str, sb: &Superblock, dir: &Inode, b: &[u8], off: u64) -> bool {
    let bs = b.len();
    rec_len(le16(b, 4), bs) == 12
        && rec_len(le16(b, 16), bs) == bs - 12
        && root_hash(vol, sb, dir, b, off, b"").is_ok()
        && dx_node(vol, dir, sb.csum(), b, off, 0x20).is_ok()
}

/// Looks `name` up through the htree index of `dir`.
pub fn dx_lookup(
    vol: &str,
    sb: &Superblock,
    dir: &Inode,
    blocks: &dyn DirBlocks,
    name: &[u8],
) -> GuestResult<DxResult> {
    let csum = sb.csum();
    let Some((root, root_off)) = blocks.dir_block(dir, 0)? else {
        return Err(GuestError::corrupt(
            vol,
            dir.offset,
            format!("directory {}: htree root is a hole", dir.ino),
        ));
    };
    let Some((hash, levels)) = root_hash(vol, sb, dir, &root, root_off, name)? else {
        return Ok(DxResult::Linear);
    };
    let n = dx_node(vol, dir, csum, &root, root_off, 0x20)?;
    let mut path = vec![Step {
        buf: root,
        node: n,
        at: 0,
    }];
    for level in 0..=levels {
        let s = &mut path[level];
        while s.at + 1 < s.node.count && dx_hash_at(&s.buf, &s.node, s.at + 1) <= hash {
            s.at += 1;
        }
        if level < levels {
            let (buf, node) =
                read_node(vol, csum, dir, blocks, dx_block_at(&s.buf, &s.node, s.at))?;
            path.push(Step { buf, node, at: 0 });
        }
    }
    dx_leaves(vol, csum, dir, blocks, &mut path, hash, name)
}

/// Searches the leaf the path ends at, then the following leaves while
/// the index says the hash continues there (collisions), also across
/// index nodes, as the kernel's htree walk does.
fn dx_leaves(
    vol: &str,
    csum: bool,
    dir: &Inode,
    blocks: &dyn DirBlocks,
    path: &mut [Step],
    hash: u32,
    name: &[u8],
) -> GuestResult<DxResult> {
    // Each step moves to a later index entry, so this ends; the bound is a
    // second guard against a corrupt index.
    for _ in 0..1 << 20 {
        let last = path.last().expect("the root is on the path");
        let lblk = dx_block_at(&last.buf, &last.node, last.at);
        let Some((leaf, off)) = blocks.dir_block(dir, lblk)? else {
            let what = format!(
                "directory {} htree: index points to a hole at block {lblk}",
                dir.ino
            );
            return Err(GuestError::corrupt(vol, dir.offset, what));
        };
        let mut found = None;
        parse_leaf(vol, dir, csum, &leaf, off, |e| {
            if e.name == name {
                found = Some(e.ino);
            }
            found.is_some()
        })?;
        if let Some(ino) = found {
            return Ok(DxResult::Found(ino));
        }
        // The next entry at the lowest level that has one.
        let Some(lvl) = (0..path.len())
            .rev()
            .find(|&l| path[l].at + 1 < path[l].node.count)
        else {
            return Ok(DxResult::NotFound);
        };
        path[lvl].at += 1;
        if dx_hash_at(&path[lvl].buf, &path[lvl].node, path[lvl].at) & !1 != hash {
            return Ok(DxResult::NotFound);
        }
        for l in lvl + 1..path.len() {
            let child = dx_block_at(&path[l - 1].buf, &path[l - 1].node, path[l - 1].at);
            let (buf, node) = read_node(vol, csum, dir, blocks, child)?;
            path[l] = Step { buf, node, at: 0 };
        }
    }
    Err(GuestError::corrupt(
        vol,
        dir.offset,
        format!("directory {}: htree walk does not end", dir.ino),
    ))
}
