//! The ext2/3/4 superblock and group descriptors: geometry, the feature
//! flags that decide whether (and how) the volume can be read, and the
//! metadata_csum checks of both. Everything the rest of the reader trusts
//! about the volume's shape is validated here, once, against the volume
//! size, so later code can index with the checked values.

use crate::guest::crc::crc32c;
use crate::guest::{GuestError, GuestResult};

/// Byte offset of the primary superblock.
pub const SB_OFFSET: u64 = 1024;
pub const SB_SIZE: usize = 1024;
pub const MAGIC: u16 = 0xEF53;

pub const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub const COMPAT_DIR_INDEX: u32 = 0x20;

pub const INCOMPAT_COMPRESSION: u32 = 0x1;
pub const INCOMPAT_FILETYPE: u32 = 0x2;
pub const INCOMPAT_RECOVER: u32 = 0x4;
pub const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub const INCOMPAT_META_BG: u32 = 0x10;
pub const INCOMPAT_EXTENTS: u32 = 0x40;
pub const INCOMPAT_64BIT: u32 = 0x80;
pub const INCOMPAT_MMP: u32 = 0x100;
pub const INCOMPAT_FLEX_BG: u32 = 0x200;
pub const INCOMPAT_EA_INODE: u32 = 0x400;
pub const INCOMPAT_DIRDATA: u32 = 0x1000;
pub const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub const INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub const INCOMPAT_CASEFOLD: u32 = 0x20000;

pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Incompat features this reader understands (the rest refuse the volume).
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The parsed, validated superblock.
#[derive(Clone, Debug)]
pub struct Superblock {
    pub inodes_count: u32,
    pub blocks_count: u64,
    pub first_data_block: u64,
    pub block_size: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub inode_size: u64,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub uuid: [u8; 16],
    pub label: Vec<u8>,
    pub journal_inum: u32,
    pub journal_dev: u32,
    pub hash_seed: [u32; 4],
    /// s_flags: 0x1 signed directory hash, 0x2 unsigned.
    pub flags: u32,
    pub desc_size: u64,
    pub first_meta_bg: u64,
    pub group_count: u64,
    /// Seed of every metadata checksum (from the UUID or s_checksum_seed).
    pub csum_seed: u32,
}

fn sb_corrupt(vol: &str, off: usize, what: &str) -> GuestError {
    GuestError::corrupt(vol, SB_OFFSET + off as u64, format!("superblock: {what}"))
}

/// metadata_csum of the superblock itself.
fn check_csum(vol: &str, b: &[u8]) -> GuestResult<()> {
    if b[0x175] != 1 {
        return Err(sb_corrupt(vol, 0x175, "unknown checksum type"));
    }
    let want = le32(b, 0x3FC);
    let got = crc32c(!0, &b[..0x3FC]);
    if want != got {
        let what = format!("checksum mismatch (stored {want:#010x}, computed {got:#010x})");
        return Err(sb_corrupt(vol, 0x3FC, &what));
    }
    Ok(())
}

/// Refuses incompat features this reader cannot honour, naming them.
fn check_features(vol: &str, incompat: u32) -> GuestResult<()> {
    let unknown = incompat & !INCOMPAT_KNOWN;
    if unknown == 0 {
        return Ok(());
    }
    let what = if incompat & INCOMPAT_COMPRESSION != 0 {
        "compression feature".to_string()
    } else if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        "this is an external journal device, not a filesystem".to_string()
    } else if incompat & INCOMPAT_DIRDATA != 0 {
        "dirdata feature".to_string()
    } else {
        format!("incompatible feature bits {unknown:#x}")
    };
    Err(GuestError::unsupported(vol, what))
}

/// The sizes and counts of the superblock, checked against each other and
/// against the volume.
struct Geometry {
    block_size: u64,
    inode_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    bpg: u64,
    ipg: u64,
    group_count: u64,
    inodes_count: u32,
    desc_size: u64,
}

impl Geometry {
    fn parse(vol: &str, b: &[u8], vol_size: u64) -> GuestResult<Geometry> {
        let bad = |off: usize, what: String| sb_corrupt(vol, off, &what);
        let log_bs = le32(b, 0x18);
        if log_bs > 6 {
            return Err(bad(0x18, format!("block size 1024<<{log_bs} out of range")));
        }
        let block_size = 1024u64 << log_bs;
        let (inode_size, first_ino) = if le32(b, 0x4C) == 0 {
            (128, 11)
        } else {
            (le16(b, 0x58) as u64, le32(b, 0x54))
        };
        if inode_size < 128 || inode_size > block_size || !inode_size.is_power_of_two() {
            return Err(bad(0x58, format!("inode size {inode_size} invalid")));
        }
        let is64 = le32(b, 0x60) & INCOMPAT_64BIT != 0;
        let blocks_count = le32(b, 0x4) as u64
            | if is64 {
                (le32(b, 0x150) as u64) << 32
            } else {
                0
            };
        let first_data_block = le32(b, 0x14) as u64;
        let (bpg, ipg) = (le32(b, 0x20) as u64, le32(b, 0x28) as u64);
        // mke2fs never makes groups under 256 blocks; tiny ones would only
        // make a hostile superblock cost millions of descriptors.
        if bpg < 256 || bpg > 8 * block_size {
            return Err(bad(0x20, format!("blocks per group {bpg} invalid")));
        }
        if ipg == 0 || ipg > 8 * block_size {
            return Err(bad(0x28, format!("inodes per group {ipg} invalid")));
        }
        if blocks_count <= first_data_block || first_data_block > 1 {
            return Err(bad(
                0x4,
                format!("block count {blocks_count} / first data block {first_data_block} invalid"),
            ));
        }
        if blocks_count
            .checked_mul(block_size)
            .is_none_or(|n| n > vol_size)
        {
            let what = format!(
                "{blocks_count} blocks of {block_size} bytes exceed the volume ({vol_size} bytes)"
            );
            return Err(bad(0x4, what));
        }
        let group_count = (blocks_count - first_data_block).div_ceil(bpg);
        if group_count >= 1 << 32 {
            return Err(bad(0x4, format!("{group_count} groups (too many)")));
        }
        // As ext4_check_geometry: the inode count is exactly the groups'
        // (so a hostile count of groups also needs as many inodes, < 2^32),
        // and a group holds at least one inode table block.
        let inodes_count = le32(b, 0x0);
        if inodes_count as u64 != group_count * ipg
            || (inodes_count as u64) < (first_ino as u64).max(11)
        {
            return Err(bad(
                0x0,
                format!("inode count {inodes_count} is not {group_count} groups of {ipg} inodes"),
            ));
        }
        if ipg < block_size / inode_size {
            return Err(bad(0x28, format!("inodes per group {ipg} invalid")));
        }
        let desc_size = descriptors(vol, b, is64, block_size, group_count, blocks_count)?;
        Ok(Geometry {
            block_size,
            inode_size,
            blocks_count,
            first_data_block,
            bpg,
            ipg,
            group_count,
            inodes_count,
            desc_size,
        })
    }
}

/// The group descriptor size, checked, and that the descriptor blocks
/// before the first meta group (following the superblock) lie inside the
/// volume.
fn descriptors(
    vol: &str,
    b: &[u8],
    is64: bool,
    block_size: u64,
    group_count: u64,
    blocks_count: u64,
) -> GuestResult<u64> {
    let bad = |off: usize, what: String| sb_corrupt(vol, off, &what);
    let first_data_block = le32(b, 0x14) as u64;
    let desc_size = if is64 { le16(b, 0xFE) as u64 } else { 32 };
    if desc_size < 32
        || desc_size > block_size
        || !desc_size.is_power_of_two()
        || (is64 && desc_size < 64)
    {
        return Err(bad(
            0xFE,
            format!("group descriptor size {desc_size} invalid"),
        ));
    }
    let per_block = block_size / desc_size;
    let gdt_blocks = group_count.div_ceil(per_block);
    let meta_bg = le32(b, 0x60) & INCOMPAT_META_BG != 0;
    let first_meta_bg = le32(b, 0x104) as u64;
    // Descriptor blocks before the first meta group follow the
    // superblock; they must lie inside the volume.
    let in_first = if meta_bg { first_meta_bg } else { gdt_blocks };
    if (meta_bg && first_meta_bg > gdt_blocks) || first_data_block + 1 + in_first > blocks_count {
        let what = format!("{gdt_blocks} group descriptor blocks do not fit the volume");
        return Err(bad(0x104, what));
    }
    Ok(desc_size)
}

impl Superblock {
    /// Parses and validates the 1024 superblock bytes of a volume of
    /// `vol_size` bytes named `vol`.
    pub fn parse(vol: &str, b: &[u8], vol_size: u64) -> GuestResult<Superblock> {
        if b.len() < SB_SIZE || le16(b, 0x38) != MAGIC {
            return Err(sb_corrupt(vol, 0x38, "no ext2/3/4 magic"));
        }
        let incompat = le32(b, 0x60);
        let ro_compat = le32(b, 0x64);
        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            check_csum(vol, b)?;
        }
        let g = Geometry::parse(vol, b, vol_size)?;
        check_features(vol, incompat)?;
        let uuid: [u8; 16] = b[0x68..0x78].try_into().unwrap();
        let csum_seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(b, 0x270)
        } else {
            crc32c(!0, &uuid)
        };
        let label_raw = &b[0x78..0x88];
        let label = label_raw[..label_raw.iter().position(|&c| c == 0).unwrap_or(16)].to_vec();
        Ok(Superblock {
            inodes_count: g.inodes_count,
            blocks_count: g.blocks_count,
            first_data_block: g.first_data_block,
            block_size: g.block_size,
            blocks_per_group: g.bpg,
            inodes_per_group: g.ipg,
            inode_size: g.inode_size,
            compat: le32(b, 0x5C),
            incompat,
            ro_compat,
            uuid,
            label,
            journal_inum: le32(b, 0xE0),
            journal_dev: le32(b, 0xE4),
            hash_seed: [le32(b, 0xEC), le32(b, 0xF0), le32(b, 0xF4), le32(b, 0xF8)],
            flags: le32(b, 0x160),
            desc_size: g.desc_size,
            first_meta_bg: le32(b, 0x104) as u64,
            group_count: g.group_count,
            csum_seed,
        })
    }

    pub fn has_incompat(&self, f: u32) -> bool {
        self.incompat & f != 0
    }

    pub fn has_compat(&self, f: u32) -> bool {
        self.compat & f != 0
    }

    pub fn has_ro_compat(&self, f: u32) -> bool {
        self.ro_compat & f != 0
    }

    pub fn csum(&self) -> bool {
        self.has_ro_compat(RO_COMPAT_METADATA_CSUM)
    }

    /// Whether group `g` holds a superblock backup (and so a GDT copy).
    fn group_has_super(&self, g: u64) -> bool {
        if !self.has_ro_compat(RO_COMPAT_SPARSE_SUPER) || g <= 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&p| {
            let mut n = p;
            while n < g {
                n *= p;
            }
            n == g
        })
    }

    /// The block holding group descriptor block number `i` (meta_bg aware).
    pub fn gdt_block(&self, i: u64) -> u64 {
        let per_block = self.block_size / self.desc_size;
        if !self.has_incompat(INCOMPAT_META_BG) || i < self.first_meta_bg {
            return self.first_data_block + 1 + i;
        }
        let g = i * per_block;
        let mut has_super = self.group_has_super(g) as u64;
        if self.block_size == 1024 && i == 0 && self.first_data_block == 0 {
            has_super += 1;
        }
        self.first_data_block + g * self.blocks_per_group + has_super
    }

    /// "ext4", "ext3" or "ext2", as blkid would name it.
    pub fn fstype(&self) -> &'static str {
        let ext4_only = INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_INLINE_DATA;
        if self.incompat & ext4_only != 0
            || self.ro_compat & (RO_COMPAT_METADATA_CSUM | RO_COMPAT_HUGE_FILE) != 0
        {
            "ext4"
        } else if self.compat & COMPAT_HAS_JOURNAL != 0 {
            "ext3"
        } else {
            "ext2"
        }
    }
}

/// One group's inode table location (all this reader needs of a group).
#[derive(Clone, Copy, Debug)]
pub struct Group {
    pub inode_table: u64,
}

/// Parses group descriptor `g` from its `desc_size` bytes found at volume
/// byte `off`, checking its checksum and where its inode table lies.
pub fn parse_group(vol: &str, sb: &Superblock, g: u64, d: &[u8], off: u64) -> GuestResult<Group> {
    if sb.csum() {
        let want = le16(d, 0x1E);
        let mut c = crc32c(sb.csum_seed, &(g as u32).to_le_bytes());
        c = crc32c(c, &d[..0x1E]);
        c = crc32c(c, &[0, 0]);
        c = crc32c(c, &d[0x20..sb.desc_size as usize]);
        if want != (c & 0xFFFF) as u16 {
            return Err(GuestError::corrupt(
                vol,
                off,
                format!("group descriptor {g}: checksum mismatch (stored {want:#06x}, computed {:#06x})", c & 0xFFFF),
            ));
        }
    }
    let mut table = le32(d, 0x8) as u64;
    if sb.desc_size >= 64 {
        table |= (le32(d, 0x28) as u64) << 32;
    }
    let table_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(sb.block_size);
    if table == 0
        || table
            .checked_add(table_blocks)
            .is_none_or(|end| end > sb.blocks_count)
    {
        return Err(GuestError::corrupt(
            vol,
            off + 0x8,
            format!("group descriptor {g}: inode table at block {table} outside the filesystem"),
        ));
    }
    Ok(Group { inode_table: table })
}
