//! The XFS superblock (sector 0 of allocation group 0): geometry, feature
//! bits and the numbers every other module converts with (inode numbers to
//! byte offsets, AG-relative block numbers to volume blocks). Everything
//! read is checked against the volume and against itself before any other
//! structure is located through it, so a flipped byte fails here with a
//! named reason rather than as a wild read later.

use super::disk::{be16, be32, be64, verify_crc};
use crate::guest::{GuestError, GuestResult};

pub const MAGIC: u32 = 0x5846_5342; // "XFSB"

// sb_versionnum bits (v4 feature flags live here).
const VERSION_NUMBITS: u16 = 0x000f;
const VERSION_DIRV2BIT: u16 = 0x2000;
const VERSION_MOREBITSBIT: u16 = 0x8000;
// sb_features2 (v4 only; v5 has them implied).
const F2_FTYPE: u32 = 0x0200;
// v5 incompat features.
pub const INCOMPAT_FTYPE: u32 = 0x01;
pub const INCOMPAT_SPINODES: u32 = 0x02;
pub const INCOMPAT_META_UUID: u32 = 0x04;
pub const INCOMPAT_BIGTIME: u32 = 0x08;
pub const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
pub const INCOMPAT_NREXT64: u32 = 0x20;
pub const INCOMPAT_EXCHRANGE: u32 = 0x40;
pub const INCOMPAT_PARENT: u32 = 0x80;
/// Incompat bits this reader understands; anything else is refused.
const INCOMPAT_KNOWN: u32 = INCOMPAT_FTYPE
    | INCOMPAT_SPINODES
    | INCOMPAT_META_UUID
    | INCOMPAT_BIGTIME
    | INCOMPAT_NEEDSREPAIR
    | INCOMPAT_NREXT64
    | INCOMPAT_EXCHRANGE
    | INCOMPAT_PARENT;
/// The ASCII case-insensitive directory hash (mkfs -n version=ci).
const VERSION_BORGBIT: u16 = 0x4000;

/// Bytes of the superblock that are parsed.
pub const SB_READ: usize = 512;
/// The superblock CRC field's offset (v5).
const SB_CRC_OFF: usize = 0xe0;

/// The parsed superblock.
#[derive(Clone, Debug)]
pub struct Superblock {
    pub block_size: u64,
    pub dblocks: u64,
    pub uuid: [u8; 16],
    pub meta_uuid: [u8; 16],
    pub logstart: u64,
    pub rootino: u64,
    pub agblocks: u64,
    pub agcount: u64,
    pub logblocks: u64,
    pub inode_size: u64,
    pub label: Vec<u8>,
    pub blocklog: u32,
    pub inopblog: u32,
    pub agblklog: u32,
    pub dirblklog: u32,
    /// v5 (CRC) filesystem: metadata blocks carry headers and CRCs.
    pub v5: bool,
    /// Directory entries carry a file type byte.
    pub ftype: bool,
    pub incompat: u32,
}

impl Superblock {
    /// Parses and checks the superblock (`raw` holds at least one sector:
    /// the v5 CRC covers `sb_sectsize` bytes). The checks run in a fixed
    /// order (each step below), so a given corruption always names the
    /// same field.
    pub fn parse(vol: &str, raw: &[u8], vol_size: u64) -> GuestResult<Superblock> {
        if be32(raw, 0) != MAGIC {
            return Err(bad(vol, 0, "bad magic (not XFS)".into()));
        }
        let (version, v5) = check_version(vol, raw)?;
        let sect_size = check_sector(vol, raw, v5)?;
        let (block_size, blocklog) = check_block(vol, raw, sect_size)?;
        let (inode_size, inopblog) = check_inodes(vol, raw, v5, block_size, blocklog)?;
        let ag = check_ags(vol, raw, vol_size, block_size)?;
        let (ftype, incompat) = check_features(vol, raw, version, v5)?;
        let dirblklog = raw[0xc0] as u32;
        if blocklog + dirblklog > 16 {
            return Err(bad(vol, 0xc0, format!("directory block log {dirblklog}")));
        }
        let logstart = be64(raw, 0x30);
        let logblocks = be32(raw, 0x60) as u64;
        if logstart != 0 && logblocks == 0 {
            return Err(bad(vol, 0x60, "internal log of 0 blocks".into()));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[0x20..0x30]);
        let mut meta_uuid = uuid;
        if incompat & INCOMPAT_META_UUID != 0 {
            meta_uuid.copy_from_slice(&raw[0xf8..0x108]);
        }
        let label: Vec<u8> = raw[0x6c..0x78]
            .iter()
            .copied()
            .take_while(|&b| b != 0)
            .collect();
        let sb = Superblock {
            block_size,
            dblocks: ag.dblocks,
            uuid,
            meta_uuid,
            logstart,
            rootino: be64(raw, 0x38),
            agblocks: ag.agblocks,
            agcount: ag.agcount,
            logblocks,
            inode_size,
            label,
            blocklog,
            inopblog,
            agblklog: ag.agblklog,
            dirblklog,
            v5,
            ftype,
            incompat,
        };
        sb.check_placement(vol)?;
        Ok(sb)
    }

    /// Checks that the internal log and the root inode, located through the
    /// geometry just parsed, lie inside the filesystem. Separate because it
    /// needs the finished superblock's number conversions.
    fn check_placement(&self, vol: &str) -> GuestResult<()> {
        let (logstart, logblocks) = (self.logstart, self.logblocks);
        if logstart != 0
            && self
                .fsb_to_block(logstart)
                .and_then(|b| b.checked_add(logblocks))
                .is_none_or(|e| e > self.dblocks)
        {
            return Err(bad(
                vol,
                0x30,
                format!("internal log at {logstart}+{logblocks} outside the filesystem"),
            ));
        }
        if self.ino_location(self.rootino).is_none() {
            return Err(bad(
                vol,
                0x38,
                format!("root inode {} out of range", self.rootino),
            ));
        }
        Ok(())
    }

    /// Directory block size in bytes.
    pub fn dir_block_size(&self) -> u64 {
        self.block_size << self.dirblklog
    }

    /// The UUID v5 metadata headers carry (meta_uuid if set).
    pub fn meta_uuid(&self) -> &[u8; 16] {
        &self.meta_uuid
    }

    /// A volume block number for the filesystem block number `fsb`
    /// (AG number in the bits above agblklog), or None if out of range.
    pub fn fsb_to_block(&self, fsb: u64) -> Option<u64> {
        let agno = fsb >> self.agblklog;
        let agbno = fsb & ((1u64 << self.agblklog) - 1);
        if agno >= self.agcount || agbno >= self.agblocks {
            return None;
        }
        let b = agno * self.agblocks + agbno;
        (b < self.dblocks).then_some(b)
    }

    /// The byte offset of inode `ino` and its AG number and AG inode number.
    pub fn ino_location(&self, ino: u64) -> Option<(u64, u64, u64)> {
        let agino_bits = self.agblklog + self.inopblog;
        if agino_bits >= 64 {
            return None;
        }
        let agno = ino >> agino_bits;
        let agino = ino & ((1u64 << agino_bits) - 1);
        let agbno = agino >> self.inopblog;
        let idx = agino & ((1u64 << self.inopblog) - 1);
        if agno >= self.agcount || agbno >= self.agblocks || agino == 0 {
            return None;
        }
        let blk = agno * self.agblocks + agbno;
        if blk >= self.dblocks {
            return None;
        }
        Some((blk * self.block_size + idx * self.inode_size, agno, agino))
    }

    pub fn fstype(&self) -> &'static str {
        "xfs"
    }
}

/// A corruption error at superblock byte `off`; one place so every check
/// words its message the same way ("superblock: ...").
fn bad(vol: &str, off: usize, what: String) -> GuestError {
    GuestError::corrupt(vol, off as u64, format!("superblock: {what}"))
}

/// The AG geometry fields, checked together because each bounds the others.
struct AgGeometry {
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    dblocks: u64,
}

/// Reads `sb_versionnum` and refuses versions other than 4 and 5; returns
/// the raw version word (its high bits are v4 feature flags) and whether
/// this is a v5 (CRC) filesystem. Separate because everything after it
/// depends on v5.
fn check_version(vol: &str, raw: &[u8]) -> GuestResult<(u16, bool)> {
    let version = be16(raw, 0x64);
    let vnum = version & VERSION_NUMBITS;
    if vnum != 4 && vnum != 5 {
        return Err(GuestError::unsupported(
            vol,
            format!("XFS superblock version {vnum}"),
        ));
    }
    Ok((version, vnum == 5))
}

/// Checks the sector size (and, on v5, the CRC over one sector); returns
/// the sector size. Separate because the CRC must pass before any other
/// field is trusted.
fn check_sector(vol: &str, raw: &[u8], v5: bool) -> GuestResult<u64> {
    let sect_size = be16(raw, 0x66) as u64;
    let sectlog = raw[0x79] as u32;
    if !(9..=15).contains(&sectlog) || sect_size != 1 << sectlog || sect_size as usize > raw.len() {
        return Err(bad(
            vol,
            0x66,
            format!("sector size {sect_size} (log {sectlog})"),
        ));
    }
    if v5 && !verify_crc(&raw[..sect_size as usize], SB_CRC_OFF) {
        return Err(bad(vol, SB_CRC_OFF, "CRC mismatch".into()));
    }
    Ok(sect_size)
}

/// Checks the block size against its log and the sector size; returns
/// (block size, block log).
fn check_block(vol: &str, raw: &[u8], sect_size: u64) -> GuestResult<(u64, u32)> {
    let block_size = be32(raw, 4) as u64;
    let blocklog = raw[0x78] as u32;
    if !(9..=16).contains(&blocklog) || block_size != 1 << blocklog || block_size < sect_size {
        return Err(bad(
            vol,
            4,
            format!("block size {block_size} (log {blocklog})"),
        ));
    }
    Ok((block_size, blocklog))
}

/// Checks the inode size and inodes-per-block fields against each other
/// and the block size; returns (inode size, inodes-per-block log).
fn check_inodes(
    vol: &str,
    raw: &[u8],
    v5: bool,
    block_size: u64,
    blocklog: u32,
) -> GuestResult<(u64, u32)> {
    let inode_size = be16(raw, 0x68) as u64;
    let inodelog = raw[0x7a] as u32;
    let inopblock = be16(raw, 0x6a) as u64;
    let inopblog = raw[0x7b] as u32;
    if !(8..=11).contains(&inodelog)
        || inode_size != 1 << inodelog
        || inode_size > block_size
        || (v5 && inode_size < 512)
        || inopblog != blocklog - inodelog
        || inopblock != 1 << inopblog
    {
        return Err(bad(
            vol,
            0x68,
            format!("inode size {inode_size} / {inopblock} per block"),
        ));
    }
    Ok((inode_size, inopblog))
}

/// Checks the AG size and count and the data block count against each
/// other and the volume size, so every later block number can be bounded
/// by them.
fn check_ags(vol: &str, raw: &[u8], vol_size: u64, block_size: u64) -> GuestResult<AgGeometry> {
    let agblocks = be32(raw, 0x54) as u64;
    let agcount = be32(raw, 0x58) as u64;
    let agblklog = raw[0x7c] as u32;
    if !(16..=1 << 31).contains(&agblocks) || agblklog != 64 - (agblocks - 1).leading_zeros() {
        return Err(bad(
            vol,
            0x54,
            format!("AG size {agblocks} blocks (log {agblklog})"),
        ));
    }
    let dblocks = be64(raw, 0x08);
    let vol_blocks = vol_size / block_size;
    if agcount == 0
        || dblocks > vol_blocks
        || dblocks > agcount * agblocks
        || dblocks <= (agcount - 1) * agblocks
    {
        return Err(bad(
            vol,
            0x08,
            format!("{dblocks} blocks in {agcount} AGs of {agblocks} (volume holds {vol_blocks})"),
        ));
    }
    Ok(AgGeometry {
        agblocks,
        agcount,
        agblklog,
        dblocks,
    })
}

/// Refuses what this reader does not handle (realtime section, v1 or
/// ASCII-CI directories, unknown incompat bits); returns (dirents carry a
/// file type, v5 incompat bits). Separate because these are "unsupported",
/// not "corrupt", answers.
fn check_features(vol: &str, raw: &[u8], version: u16, v5: bool) -> GuestResult<(bool, u32)> {
    let rblocks = be64(raw, 0x10);
    if rblocks != 0 {
        return Err(GuestError::unsupported(
            vol,
            format!("XFS realtime section ({rblocks} blocks on a separate device, which a snapshot volume does not include)"),
        ));
    }
    let features2 = if version & VERSION_MOREBITSBIT != 0 {
        be32(raw, 0xc8)
    } else {
        0
    };
    if !v5 && version & VERSION_DIRV2BIT == 0 {
        return Err(GuestError::unsupported(vol, "XFS v1 directories"));
    }
    if version & VERSION_BORGBIT != 0 {
        return Err(GuestError::unsupported(
            vol,
            "XFS ASCII case-insensitive directories",
        ));
    }
    let incompat = if v5 { be32(raw, 0xd8) } else { 0 };
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(GuestError::unsupported(
            vol,
            format!(
                "XFS incompatible features {:#x}",
                incompat & !INCOMPAT_KNOWN
            ),
        ));
    }
    let ftype = if v5 {
        incompat & INCOMPAT_FTYPE != 0
    } else {
        features2 & F2_FTYPE != 0
    };
    Ok((ftype, incompat))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake() -> Superblock {
        Superblock {
            block_size: 4096,
            dblocks: 4 * 1000,
            uuid: [0; 16],
            meta_uuid: [0; 16],
            logstart: 0,
            rootino: 128,
            agblocks: 1000,
            agcount: 4,
            logblocks: 0,
            inode_size: 512,
            label: vec![],
            blocklog: 12,
            inopblog: 3,
            agblklog: 10,
            dirblklog: 0,
            v5: true,
            ftype: true,
            incompat: 0,
        }
    }

    #[test]
    fn numbers_convert() {
        let sb = fake();
        assert_eq!(sb.fsb_to_block((2 << 10) | 5), Some(2005));
        assert_eq!(sb.fsb_to_block((2 << 10) | 1000), None);
        assert_eq!(sb.fsb_to_block(4 << 10), None);
        let ino = (1 << 13) | (7 << 3) | 2;
        assert_eq!(
            sb.ino_location(ino),
            Some((1007 * 4096 + 2 * 512, 1, (7 << 3) | 2))
        );
        assert_eq!(sb.ino_location(0), None);
    }
}
