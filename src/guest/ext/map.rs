//! File block mapping: logical block -> physical block runs, from the
//! extent tree (ext4: index nodes, leaves, uninitialized extents) or the
//! classic block map (ext2/3: direct, indirect, double and triple
//! indirect). Reads, SEEK_DATA/SEEK_HOLE and directory walks all go
//! through [`map`], so holes and unwritten extents read as zeros and
//! every pointer is checked against the filesystem before use.

use super::disk::Disk;
use super::inode::{Inode, FL_EXTENTS};
use super::sb::{le16, le32};
use crate::guest::crc::crc32c;
use crate::guest::{GuestError, GuestResult};

/// The kernel's limit on extent tree depth; deeper trees are corrupt.
const MAX_DEPTH: u16 = 5;
const EXT_MAGIC: u16 = 0xF30A;
/// Logical block numbers are 32-bit.
const LBLK_END: u64 = 1 << 32;

/// A run of `len` logical blocks starting at the asked block: mapped
/// contiguously from `phys`, or a hole (also unwritten extents) if `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub phys: Option<u64>,
    pub len: u64,
}

/// Maps logical block `lblk` of `inode`.
pub fn map(disk: &Disk, csum: bool, inode: &Inode, lblk: u64) -> GuestResult<Run> {
    if lblk >= LBLK_END {
        return Ok(Run {
            phys: None,
            len: u64::MAX - lblk,
        });
    }
    if inode.flags & FL_EXTENTS != 0 {
        map_extent(disk, csum, inode, lblk)
    } else {
        map_blockmap(disk, inode, lblk)
    }
}

fn map_extent(disk: &Disk, csum: bool, inode: &Inode, lblk: u64) -> GuestResult<Run> {
    let mut holder;
    let mut node: &[u8] = inode.i_block();
    let mut node_off = inode.offset + 0x28;
    // The logical range [lower, upper) the current node may cover (its
    // parent index entry up to the next one).
    let mut lower = 0;
    let mut upper = LBLK_END;
    let mut want_depth: Option<u16> = None;
    loop {
        let (entries, depth) = header(disk, inode, node, node_off, want_depth)?;
        if depth == 0 {
            return leaf_run(disk, inode, node, node_off, entries, lblk, (lower, upper));
        }
        let entry = |i: usize| &node[12 + 12 * i..24 + 12 * i];
        // Index node: the last entry starting at or before lblk.
        let Some(i) = (0..entries)
            .take_while(|&i| le32(entry(i), 0) as u64 <= lblk)
            .last()
        else {
            let first = if entries > 0 {
                le32(entry(0), 0) as u64
            } else {
                upper
            };
            return Ok(Run {
                phys: None,
                len: first.saturating_sub(lblk).max(1),
            });
        };
        let e = entry(i);
        let start = le32(e, 0) as u64;
        let next = if i + 1 < entries {
            le32(entry(i + 1), 0) as u64
        } else {
            upper
        };
        if start < lower || next > upper || next <= start {
            let what = format!(
                "inode {}: extent index entry {i} outside its node's blocks {lower}..{upper}",
                inode.ino
            );
            return Err(GuestError::corrupt(&disk.name, node_off, what));
        }
        (lower, upper) = (start, next);
        let child = le32(e, 4) as u64 | (le16(e, 8) as u64) << 32;
        let at = node_off + 12 + 12 * i as u64;
        disk.check_block(child, 1, at, &format!("inode {} extent index", inode.ino))?;
        holder = disk.block(child)?;
        node = &holder[..];
        node_off = child * disk.block_size;
        if csum {
            check_block_csum(disk, inode, node, node_off)?;
        }
        want_depth = Some(depth - 1);
    }
}

/// Validates a node header; returns (entries, depth).
fn header(
    disk: &Disk,
    inode: &Inode,
    node: &[u8],
    off: u64,
    want: Option<u16>,
) -> GuestResult<(usize, u16)> {
    let bad = |what: String| {
        GuestError::corrupt(
            &disk.name,
            off,
            format!("inode {}: extent tree: {what}", inode.ino),
        )
    };
    if le16(node, 0) != EXT_MAGIC {
        return Err(bad("bad extent header magic".into()));
    }
    let entries = le16(node, 2) as usize;
    let max = le16(node, 4) as usize;
    let depth = le16(node, 6);
    if entries > max || 12 + 12 * max > node.len() {
        return Err(bad(format!(
            "{entries} entries / {max} max do not fit the node"
        )));
    }
    match want {
        None if depth > MAX_DEPTH => Err(bad(format!("depth {depth} exceeds {MAX_DEPTH}"))),
        Some(d) if d != depth => Err(bad(format!("node depth {depth}, expected {d}"))),
        _ => Ok((entries, depth)),
    }
}

/// The run at `lblk` in a leaf node covering logical blocks
/// [`lower`, `upper`) (from its parent index entry and the next one). An
/// extent reaching outside that range is corrupt: the next leaf owns those
/// blocks.
fn leaf_run(
    disk: &Disk,
    inode: &Inode,
    node: &[u8],
    off: u64,
    entries: usize,
    lblk: u64,
    (lower, upper): (u64, u64),
) -> GuestResult<Run> {
    let mut prev_end = lower;
    for i in 0..entries {
        let e = &node[12 + 12 * i..24 + 12 * i];
        let start = le32(e, 0) as u64;
        let raw_len = le16(e, 4) as u64;
        // Lengths above 32768 mark unwritten extents (read as zeros).
        let (len, uninit) = if raw_len > 32768 {
            (raw_len - 32768, true)
        } else {
            (raw_len, false)
        };
        if start < prev_end || len == 0 || start + len > upper {
            let what = format!(
                "inode {}: extent tree: extent {i} overlaps, is empty or lies outside \
                 its node's blocks {lower}..{upper}",
                inode.ino
            );
            return Err(GuestError::corrupt(&disk.name, off, what));
        }
        prev_end = start + len;
        if lblk < start {
            return Ok(Run {
                phys: None,
                len: start - lblk,
            });
        }
        if lblk < start + len {
            let pstart = le32(e, 8) as u64 | (le16(e, 6) as u64) << 32;
            let at = off + 12 + 12 * i as u64;
            disk.check_block(pstart, len, at, &format!("inode {} extent", inode.ino))?;
            let phys = (!uninit).then_some(pstart + (lblk - start));
            return Ok(Run {
                phys,
                len: start + len - lblk,
            });
        }
    }
    Ok(Run {
        phys: None,
        len: upper.saturating_sub(lblk).max(1),
    })
}

/// metadata_csum of an extent block: the tail after eh_max entries.
fn check_block_csum(disk: &Disk, inode: &Inode, node: &[u8], off: u64) -> GuestResult<()> {
    let nmax = le16(node, 4) as usize;
    let tail = 12 + 12 * nmax;
    if tail + 4 > node.len() {
        let what = format!("inode {}: extent block max {nmax} too large", inode.ino);
        return Err(GuestError::corrupt(&disk.name, off, what));
    }
    let got = crc32c(inode.csum_seed, &node[..tail]);
    let want = le32(node, tail);
    if got != want {
        let what = format!(
            "inode {}: extent block checksum mismatch (stored {want:#x}, computed {got:#x})",
            inode.ino
        );
        return Err(GuestError::corrupt(&disk.name, off, what));
    }
    Ok(())
}

fn map_blockmap(disk: &Disk, inode: &Inode, lblk: u64) -> GuestResult<Run> {
    let p = disk.block_size / 4;
    let ib = inode.i_block();
    if lblk < 12 {
        return run_in_table(disk, inode, ib, inode.offset + 0x28, lblk as usize, 12);
    }
    // (root slot, depth, first logical block the root covers)
    let mut first = 12;
    let mut span = p; // blocks covered by the whole subtree
    let mut found = None;
    for (slot, depth) in [(12usize, 1u32), (13, 2), (14, 3)] {
        if lblk < first + span {
            found = Some((slot, depth));
            break;
        }
        first += span;
        span = span.saturating_mul(p);
    }
    let Some((slot, depth)) = found else {
        return Ok(Run {
            phys: None,
            len: LBLK_END.saturating_sub(lblk).max(1),
        });
    };
    let mut rel = lblk - first;
    let mut ptr = le32(ib, slot * 4) as u64;
    let mut ptr_at = inode.offset + 0x28 + slot as u64 * 4;
    let mut per = span / p; // blocks per entry of the current table
    if ptr == 0 {
        return Ok(Run {
            phys: None,
            len: span - rel,
        });
    }
    for level in 0..depth {
        disk.check_block(
            ptr,
            1,
            ptr_at,
            &format!("inode {} indirect block", inode.ino),
        )?;
        let table = disk.block(ptr)?;
        let table_off = ptr * disk.block_size;
        let idx = (rel / per) as usize;
        if level + 1 == depth {
            return run_in_table(disk, inode, &table, table_off, idx, p as usize);
        }
        ptr = le32(&table, idx * 4) as u64;
        ptr_at = table_off + idx as u64 * 4;
        rel %= per;
        if ptr == 0 {
            return Ok(Run {
                phys: None,
                len: per - rel,
            });
        }
        per /= p;
    }
    unreachable!("the last level returns")
}

/// The run starting at entry `idx` of a table of `n` block pointers:
/// consecutive physical blocks, or consecutive zero (hole) entries.
fn run_in_table(
    disk: &Disk,
    inode: &Inode,
    table: &[u8],
    table_off: u64,
    idx: usize,
    n: usize,
) -> GuestResult<Run> {
    let at = |i: usize| le32(table, i * 4) as u64;
    let first = at(idx);
    let mut len = 1;
    if first == 0 {
        while idx + len < n && at(idx + len) == 0 {
            len += 1;
        }
        return Ok(Run {
            phys: None,
            len: len as u64,
        });
    }
    while idx + len < n && at(idx + len) == first + len as u64 {
        len += 1;
    }
    disk.check_block(
        first,
        len as u64,
        table_off + idx as u64 * 4,
        &format!("inode {} block pointer", inode.ino),
    )?;
    Ok(Run {
        phys: Some(first),
        len: len as u64,
    })
}
