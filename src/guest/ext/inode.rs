//! ext inodes: locating one in its group's inode table, checking its
//! metadata_csum, and turning its fields into an [`Attr`] (32-bit ids from
//! the high halves, 64-bit sizes, nanosecond times with epoch bits, both
//! device number encodings).

use super::sb::{le16, le32, Superblock, RO_COMPAT_HUGE_FILE};
use crate::guest::crc::crc32c;
use crate::guest::{Attr, FileKind, GuestError, GuestResult, Timestamp};

pub const FL_ENCRYPT: u32 = 0x800;
pub const FL_INDEX: u32 = 0x1000;
pub const FL_HUGE_FILE: u32 = 0x40000;
pub const FL_EXTENTS: u32 = 0x80000;
pub const FL_EA_INODE: u32 = 0x200000;
pub const FL_INLINE_DATA: u32 = 0x1000_0000;
pub const FL_CASEFOLD: u32 = 0x4000_0000;

/// The inode size of ext2 revision 0 ("good old" inodes); extra fields follow.
pub const GOOD_OLD_SIZE: usize = 128;

/// One inode as read from disk (bytes kept for extents, xattrs, symlinks).
#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: u64,
    /// Byte offset of the inode on the volume (for error messages).
    pub offset: u64,
    pub raw: Vec<u8>,
    pub mode: u16,
    pub flags: u32,
    pub size: u64,
    /// Seed for checksums of blocks this inode owns (extent, dir blocks).
    pub csum_seed: u32,
    /// 128 + i_extra_isize, validated to fit the inode.
    pub extra_end: usize,
}

impl Inode {
    /// Parses inode `ino` from `raw` (s_inode_size bytes at `offset`).
    pub fn parse(
        vol: &str,
        sb: &Superblock,
        ino: u64,
        raw: &[u8],
        offset: u64,
    ) -> GuestResult<Inode> {
        let isz = raw.len();
        let extra_end = if isz > GOOD_OLD_SIZE {
            let e = GOOD_OLD_SIZE + le16(raw, 0x80) as usize;
            if e > isz || !e.is_multiple_of(4) {
                return Err(GuestError::corrupt(
                    vol,
                    offset + 0x80,
                    format!("inode {ino}: i_extra_isize too large"),
                ));
            }
            e
        } else {
            GOOD_OLD_SIZE
        };
        let generation = le32(raw, 0x64);
        let mut seed = 0;
        if sb.csum() {
            seed = crc32c(sb.csum_seed, &(ino as u32).to_le_bytes());
            seed = crc32c(seed, &generation.to_le_bytes());
            let has_hi = extra_end >= 0x84;
            let mut c = crc32c(seed, &raw[..0x7C]);
            c = crc32c(c, &[0, 0]);
            c = crc32c(c, &raw[0x7E..GOOD_OLD_SIZE]);
            if isz > GOOD_OLD_SIZE {
                c = crc32c(c, &raw[GOOD_OLD_SIZE..0x82]);
                if has_hi {
                    c = crc32c(c, &[0, 0]);
                    c = crc32c(c, &raw[0x84..]);
                } else {
                    c = crc32c(c, &raw[0x82..]);
                }
            }
            let stored = le16(raw, 0x7C) as u32
                | if has_hi {
                    (le16(raw, 0x82) as u32) << 16
                } else {
                    0
                };
            let computed = if has_hi { c } else { c & 0xFFFF };
            if stored != computed {
                return Err(GuestError::corrupt(
                    vol,
                    offset,
                    format!("inode {ino}: checksum mismatch (stored {stored:#x}, computed {computed:#x})"),
                ));
            }
        }
        let mode = le16(raw, 0);
        let size = le32(raw, 0x4) as u64 | (le32(raw, 0x6C) as u64) << 32;
        if size > i64::MAX as u64 {
            // As ext4_iget ("bad i_size value"): sizes are loff_t.
            return Err(GuestError::corrupt(
                vol,
                offset + 0x4,
                format!("inode {ino}: size {size:#x} out of range"),
            ));
        }
        Ok(Inode {
            ino,
            offset,
            raw: raw.to_vec(),
            mode,
            flags: le32(raw, 0x20),
            size,
            csum_seed: seed,
            extra_end,
        })
    }

    pub fn kind(&self) -> Option<FileKind> {
        Some(match self.mode & 0xF000 {
            0x8000 => FileKind::File,
            0x4000 => FileKind::Dir,
            0xA000 => FileKind::Symlink,
            0x2000 => FileKind::CharDevice,
            0x6000 => FileKind::BlockDevice,
            0x1000 => FileKind::Fifo,
            0xC000 => FileKind::Socket,
            _ => return None,
        })
    }

    /// The 60 bytes of i_block (extent root, block map or inline data).
    pub fn i_block(&self) -> &[u8] {
        &self.raw[0x28..0x28 + 60]
    }

    pub fn links(&self) -> u32 {
        le16(&self.raw, 0x1A) as u32
    }

    /// The xattr block, if any.
    pub fn file_acl(&self) -> u64 {
        le32(&self.raw, 0x68) as u64 | (le16(&self.raw, 0x76) as u64) << 32
    }

    /// An extra (large-inode) field at `off`, if i_extra_isize covers it.
    fn extra32(&self, off: usize) -> Option<u32> {
        (off + 4 <= self.extra_end).then(|| le32(&self.raw, off))
    }

    fn time(&self, lo_off: usize, extra_off: Option<usize>) -> Timestamp {
        let mut secs = le32(&self.raw, lo_off) as i32 as i64;
        let mut nsecs = 0;
        if let Some(extra) = extra_off.and_then(|o| self.extra32(o)) {
            secs += ((extra & 3) as i64) << 32;
            nsecs = extra >> 2;
            if nsecs >= 1_000_000_000 {
                nsecs = 0;
            }
        }
        Timestamp { secs, nsecs }
    }

    fn rdev(&self) -> u32 {
        let b = self.i_block();
        let old = le32(b, 0);
        if old != 0 {
            // Old encoding: major in bits 8..16, minor in 0..8.
            return old & 0xFFFF;
        }
        // New encoding (huge_encode_dev): minor low 8 bits, major 12 bits,
        // minor high 12 bits; re-encoded as Linux new_encode_dev does.
        let new = le32(b, 4);
        let major = (new >> 8) & 0xFFF;
        let minor = (new & 0xFF) | ((new >> 12) & 0xFFF00);
        (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12)
    }

    /// Bytes allocated to the inode (i_blocks, in 512-byte units or, for
    /// huge_file inodes, filesystem blocks), saturating.
    pub fn allocated_bytes(&self, sb: &Superblock) -> u64 {
        let r = &self.raw;
        let mut blocks = le32(r, 0x1C) as u64;
        if sb.has_ro_compat(RO_COMPAT_HUGE_FILE) {
            blocks |= (le16(r, 0x74) as u64) << 32;
            if self.flags & FL_HUGE_FILE != 0 {
                return blocks.saturating_mul(sb.block_size);
            }
        }
        blocks.saturating_mul(512)
    }

    pub fn attr(&self, sb: &Superblock) -> Attr {
        let r = &self.raw;
        let kind = self.kind().unwrap_or(FileKind::File);
        let mut allocated = self.allocated_bytes(sb);
        if self.flags & FL_INLINE_DATA != 0 && kind == FileKind::File {
            // As the kernel reports regular files: at least the sectors the
            // inline bytes would fill, so tools do not think it is sparse.
            allocated = allocated.saturating_add(self.size.div_ceil(512).saturating_mul(512));
        }
        let rdev = match kind {
            FileKind::CharDevice | FileKind::BlockDevice => self.rdev(),
            _ => 0,
        };
        Attr {
            ino: self.ino,
            kind,
            perm: self.mode & 0o7777,
            uid: le16(r, 0x2) as u32 | (le16(r, 0x78) as u32) << 16,
            gid: le16(r, 0x18) as u32 | (le16(r, 0x7A) as u32) << 16,
            size: self.size,
            nlink: self.links(),
            allocated,
            atime: self.time(0x8, Some(0x8C)),
            mtime: self.time(0x10, Some(0x88)),
            ctime: self.time(0xC, Some(0x84)),
            crtime: if self.extra_end >= 0x94 {
                self.time(0x90, Some(0x94))
            } else {
                Timestamp::default()
            },
            rdev,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode_with_block(words: [u32; 2]) -> Inode {
        let mut raw = vec![0u8; 128];
        raw[0] = 0x00;
        raw[1] = 0x20; // char device
        raw[0x28..0x2C].copy_from_slice(&words[0].to_le_bytes());
        raw[0x2C..0x30].copy_from_slice(&words[1].to_le_bytes());
        Inode {
            ino: 12,
            offset: 0,
            raw,
            mode: 0x2000,
            flags: 0,
            size: 0,
            csum_seed: 0,
            extra_end: 128,
        }
    }

    #[test]
    fn device_numbers_both_encodings() {
        // Old: major 1, minor 3 (/dev/null).
        assert_eq!(inode_with_block([0x0103, 0]).rdev(), 0x0103);
        // New: major 259, minor 300000 -> Linux new_encode_dev.
        let (major, minor) = (259u32, 300_000u32);
        let disk = (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12);
        let linux = (minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & !0xFF) << 12);
        assert_eq!(inode_with_block([0, disk]).rdev(), linux);
    }
}
