//! Block maps of XFS forks: packed 128-bit extent records (in the inode
//! or in bmbt leaves), the bmbt (a B+tree of extent records rooted in the
//! inode), and the lookup from a file block to a volume block. Extents are
//! checked on parse (length, AG bounds, ascending non-overlapping file
//! offsets), so every later read stays inside the filesystem.

use super::disk::{be16, be64, verify_crc, Disk};
use super::sb::Superblock;
use crate::guest::{GuestError, GuestResult};

/// More extents than this in one fork are refused (memory bound: 32 bytes
/// each, 128 MiB).
pub const MAX_EXTENTS: u64 = 4 << 20;
const BMAP_MAGIC: u32 = 0x424d_4150; // "BMAP"
const BMA3_MAGIC: u32 = 0x424d_4133; // "BMA3"
/// The v5 long btree block's CRC field.
const LBLOCK_CRC_OFF: usize = 64;
/// Deeper bmbts than this are refused (the format allows far fewer).
const MAX_LEVELS: u16 = 12;

/// One extent: `len` file blocks from file block `off` at volume block
/// `block`; unwritten (preallocated) extents read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub off: u64,
    pub block: u64,
    pub len: u64,
    pub unwritten: bool,
}

/// What a file block maps to: `len` blocks from it are at `phys` (None:
/// a hole or unwritten, reading as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub phys: Option<u64>,
    pub len: u64,
}

/// Parses packed extent records, checking each and their order. `at` is
/// the volume offset of `recs` (error messages).
pub fn parse_extents(
    vol: &str,
    sb: &Superblock,
    recs: &[u8],
    at: u64,
    owner: &dyn std::fmt::Display,
) -> GuestResult<Vec<Extent>> {
    let mut out = Vec::with_capacity(recs.len() / 16);
    let mut next_off = 0u64;
    for (i, r) in recs.chunks_exact(16).enumerate() {
        let (l0, l1) = (be64(r, 0), be64(r, 8));
        let off = (l0 & !(1 << 63)) >> 9;
        let fsb = ((l0 & 0x1ff) << 43) | (l1 >> 21);
        let len = l1 & 0x1f_ffff;
        let bad = |what: &str| {
            GuestError::corrupt(
                vol,
                at + i as u64 * 16,
                format!("{owner}: extent {i} {what}"),
            )
        };
        if len == 0 {
            return Err(bad("has length 0"));
        }
        if off < next_off {
            return Err(bad("overlaps or is out of order"));
        }
        let agbno = fsb & ((1u64 << sb.agblklog) - 1);
        let block = match sb.fsb_to_block(fsb) {
            Some(b) if agbno + len <= sb.agblocks && b + len <= sb.dblocks => b,
            _ => {
                return Err(bad(&format!(
                    "at block {fsb}+{len} lies outside the filesystem"
                )))
            }
        };
        next_off = off + len;
        out.push(Extent {
            off,
            block,
            len,
            unwritten: l0 >> 63 != 0,
        });
    }
    Ok(out)
}

/// Where file block `fblk` lies in a sorted extent list.
pub fn lookup(extents: &[Extent], fblk: u64) -> Run {
    let i = extents.partition_point(|e| e.off + e.len <= fblk);
    match extents.get(i) {
        Some(e) if e.off <= fblk => Run {
            phys: (!e.unwritten).then_some(e.block + (fblk - e.off)),
            len: e.off + e.len - fblk,
        },
        Some(e) => Run {
            phys: None,
            len: e.off - fblk,
        },
        None => Run {
            phys: None,
            len: u64::MAX / 2,
        },
    }
}

/// Context of one bmbt walk.
pub struct Walk<'a> {
    pub disk: &'a Disk,
    pub sb: &'a Superblock,
    pub ino: u64,
    /// Records the inode says the fork holds (an upper bound here).
    pub nextents: u64,
    pub out: Vec<Extent>,
}

impl Walk<'_> {
    /// Collects every extent of a bmbt whose root (`xfs_bmdr_block`) is
    /// `root`, the fork's bytes in the inode at volume offset `at`.
    pub fn run(&mut self, root: &[u8], at: u64) -> GuestResult<()> {
        let vol = &self.disk.name;
        let level = be16(root, 0);
        let numrecs = be16(root, 2) as usize;
        let maxrecs = root.len().saturating_sub(4) / 16;
        if level == 0 || level > MAX_LEVELS || numrecs == 0 || numrecs > maxrecs {
            return Err(GuestError::corrupt(
                vol,
                at,
                format!(
                    "inode {}: bmbt root level {level} with {numrecs} records",
                    self.ino
                ),
            ));
        }
        if self.nextents > MAX_EXTENTS {
            return Err(GuestError::unsupported(
                vol,
                format!(
                    "inode {}: {} extents (more than {MAX_EXTENTS})",
                    self.ino, self.nextents
                ),
            ));
        }
        for i in 0..numrecs {
            let ptr = be64(root, 4 + maxrecs * 8 + i * 8);
            self.block(ptr, level - 1, at)?;
        }
        Ok(())
    }

    fn block(&mut self, fsb: u64, level: u16, from: u64) -> GuestResult<()> {
        let vol = self.disk.name.clone();
        let bs = self.sb.block_size as usize;
        let Some(blk) = self.sb.fsb_to_block(fsb) else {
            return Err(GuestError::corrupt(
                &vol,
                from,
                format!(
                    "inode {}: bmbt pointer {fsb} outside the filesystem",
                    self.ino
                ),
            ));
        };
        let b = self.disk.block(blk)?;
        let at = blk * bs as u64;
        let bad = |what: String| {
            GuestError::corrupt(&vol, at, format!("inode {} bmbt block: {what}", self.ino))
        };
        let hdr = if self.sb.v5 { 72 } else { 24 };
        let magic = if self.sb.v5 { BMA3_MAGIC } else { BMAP_MAGIC };
        if super::disk::be32(&b, 0) != magic {
            return Err(bad("bad magic".into()));
        }
        if self.sb.v5 {
            if !verify_crc(&b, LBLOCK_CRC_OFF) {
                return Err(bad("CRC mismatch".into()));
            }
            if be64(&b, 24) != at / 512
                || be64(&b, 56) != self.ino
                || b[40..56] != self.sb.meta_uuid()[..]
            {
                return Err(bad("header names another block, owner or filesystem".into()));
            }
        }
        let numrecs = be16(&b, 6) as usize;
        let maxrecs = (bs - hdr) / 16;
        if be16(&b, 4) != level || numrecs == 0 || numrecs > maxrecs {
            return Err(bad(format!(
                "level {} (expected {level}) with {numrecs} records",
                be16(&b, 4)
            )));
        }
        if level == 0 {
            if self.out.len() as u64 + numrecs as u64 > self.nextents {
                return Err(bad(format!(
                    "more records than the inode's {} extents",
                    self.nextents
                )));
            }
            let recs = &b[hdr..hdr + numrecs * 16];
            let owner = format!("inode {} bmbt", self.ino);
            let ext = parse_extents(&vol, self.sb, recs, at + hdr as u64, &owner)?;
            if let (Some(last), Some(first)) = (self.out.last(), ext.first()) {
                if first.off < last.off + last.len {
                    return Err(bad("extents out of order across leaves".into()));
                }
            }
            self.out.extend(ext);
            return Ok(());
        }
        for i in 0..numrecs {
            let ptr = be64(&b, hdr + maxrecs * 8 + i * 8);
            self.block(ptr, level - 1, at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_runs() {
        let e = [
            Extent {
                off: 2,
                block: 100,
                len: 3,
                unwritten: false,
            },
            Extent {
                off: 10,
                block: 200,
                len: 1,
                unwritten: true,
            },
        ];
        assert_eq!(lookup(&e, 0), Run { phys: None, len: 2 });
        assert_eq!(
            lookup(&e, 3),
            Run {
                phys: Some(101),
                len: 2
            }
        );
        assert_eq!(lookup(&e, 5), Run { phys: None, len: 5 });
        assert_eq!(lookup(&e, 10), Run { phys: None, len: 1 });
        assert_eq!(lookup(&e, 11).phys, None);
    }
}
