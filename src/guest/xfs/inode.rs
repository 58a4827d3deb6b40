//! XFS inodes (`xfs_dinode`): the core (mode, owners, times in the old and
//! the bigtime encodings, sizes, extent counts in the old and the nrext64
//! layouts) and the two forks in the literal area after it. Checked on
//! parse: magic, version, the v5 CRC, the number and UUID a v5 inode
//! carries (so a directory entry pointing at the wrong place, or at an
//! unused slot of a sparse inode chunk, fails), fork formats and sizes.

use super::bmap::{parse_extents, Extent};
use super::disk::{be16, be32, be64, verify_crc};
use super::sb::Superblock;
use crate::guest::fsapi::Ino;
use crate::guest::{Attr, FileKind, GuestError, GuestResult, Timestamp};

const MAGIC: u16 = 0x494e; // "IN"
/// Fork formats (di_format, di_aformat).
pub const FMT_DEV: u8 = 0;
pub const FMT_LOCAL: u8 = 1;
pub const FMT_EXTENTS: u8 = 2;
pub const FMT_BTREE: u8 = 3;
/// di_flags: the file's data lives on the realtime device.
const DIFLAG_REALTIME: u16 = 0x1;
// di_flags2.
const DIFLAG2_BIGTIME: u64 = 0x8;
const DIFLAG2_NREXT64: u64 = 0x10;
/// The v5 inode's CRC field.
const CRC_OFF: usize = 0x64;

/// Which fork of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fork {
    Data,
    Attr,
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: Ino,
    /// Byte offset of the inode on the volume (for error messages).
    pub offset: u64,
    pub kind: FileKind,
    pub format: u8,
    pub aformat: u8,
    pub size: u64,
    pub flags: u16,
    pub nextents: u64,
    pub anextents: u64,
    raw: Vec<u8>,
    core: usize,
    forkoff: usize,
    attr: Attr,
    /// The data fork's extents, when it is in extents format.
    pub extents: Option<Vec<Extent>>,
    /// The attr fork's extents, when it is in extents format.
    pub aextents: Option<Vec<Extent>>,
}

fn kind_of(mode: u16) -> Option<FileKind> {
    Some(match mode & 0o170000 {
        0o100000 => FileKind::File,
        0o040000 => FileKind::Dir,
        0o120000 => FileKind::Symlink,
        0o020000 => FileKind::CharDevice,
        0o060000 => FileKind::BlockDevice,
        0o010000 => FileKind::Fifo,
        0o140000 => FileKind::Socket,
        _ => return None,
    })
}

fn time(raw: &[u8], off: usize, bigtime: bool) -> Timestamp {
    if bigtime {
        // Nanoseconds since 1901-12-13 (the old encoding's minimum).
        let t = be64(raw, off);
        let secs = (t / 1_000_000_000) as i64 - (1i64 << 31);
        return Timestamp {
            secs,
            nsecs: (t % 1_000_000_000) as u32,
        };
    }
    Timestamp {
        secs: be32(raw, off) as i32 as i64,
        nsecs: be32(raw, off + 4).min(999_999_999),
    }
}

/// Linux new_encode_dev of XFS's on-disk device number (sysv layout:
/// major in the top 14 bits, minor in the low 18).
fn rdev(d: u32) -> u32 {
    let major = (d >> 18) & 0x1ff;
    let minor = d & 0x3ffff;
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Where an inode being parsed lives, so its checks (split over several
/// functions) word errors the same way: volume, byte offset, "inode N: ...".
struct Where<'a> {
    vol: &'a str,
    ino: Ino,
    offset: u64,
}

impl Where<'_> {
    /// A corruption error at byte `at` of the inode.
    fn bad(&self, at: usize, what: String) -> GuestError {
        GuestError::corrupt(
            self.vol,
            self.offset + at as u64,
            format!("inode {}: {what}", self.ino),
        )
    }
}

/// Checks the magic, the version against the superblock's, and on v5 the
/// CRC, self-number and UUID; returns the inode version. Separate because
/// it decides whether the rest of the bytes are this inode at all.
fn check_header(at: &Where, sb: &Superblock, raw: &[u8]) -> GuestResult<u8> {
    if be16(raw, 0) != MAGIC {
        return Err(at.bad(0, "bad magic".into()));
    }
    let version = raw[4];
    let ok_version = if sb.v5 {
        version == 3
    } else {
        version == 1 || version == 2
    };
    if !ok_version {
        return Err(at.bad(4, format!("version {version}")));
    }
    if sb.v5 {
        if !verify_crc(raw, CRC_OFF) {
            return Err(at.bad(CRC_OFF, "CRC mismatch".into()));
        }
        if be64(raw, 0x98) != at.ino {
            return Err(at.bad(0x98, format!("carries inode number {}", be64(raw, 0x98))));
        }
        if raw[0xa0..0xb0] != sb.meta_uuid()[..] {
            return Err(at.bad(0xa0, "UUID is not this filesystem's".into()));
        }
    }
    Ok(version)
}

/// Checks the data fork format against the file kind, the size, and the
/// attr fork format (when there is an attr fork); returns (data format,
/// size, attr format).
fn check_formats(
    at: &Where,
    raw: &[u8],
    kind: FileKind,
    forkoff: usize,
) -> GuestResult<(u8, u64, u8)> {
    let format = raw[5];
    let fmt_ok = match kind {
        FileKind::File => format == FMT_EXTENTS || format == FMT_BTREE,
        FileKind::Dir | FileKind::Symlink => {
            matches!(format, FMT_LOCAL | FMT_EXTENTS | FMT_BTREE)
        }
        _ => format == FMT_DEV,
    };
    if !fmt_ok {
        return Err(at.bad(5, format!("data fork format {format} for a {kind:?}")));
    }
    let size = be64(raw, 0x38);
    if size > i64::MAX as u64 {
        return Err(at.bad(0x38, format!("size {size}")));
    }
    let aformat = raw[0x53];
    if forkoff != 0 && !matches!(aformat, FMT_LOCAL | FMT_EXTENTS | FMT_BTREE) {
        return Err(at.bad(0x53, format!("attr fork format {aformat}")));
    }
    Ok((format, size, aformat))
}

/// Decodes the core's stat fields (owners, link count, times in either
/// encoding, device number) into an Attr. Separate because it only reads
/// already-checked bytes and cannot fail.
fn core_attr(
    sb: &Superblock,
    ino: Ino,
    raw: &[u8],
    kind: FileKind,
    version: u8,
    bigtime: bool,
    core: usize,
) -> Attr {
    let nlink = if version == 1 {
        be16(raw, 6) as u32
    } else {
        be32(raw, 0x10)
    };
    let nblocks = be64(raw, 0x40);
    Attr {
        ino,
        kind,
        perm: be16(raw, 2) & 0o7777,
        uid: be32(raw, 8),
        gid: be32(raw, 0xc),
        size: be64(raw, 0x38),
        nlink,
        allocated: nblocks.saturating_mul(sb.block_size),
        atime: time(raw, 0x20, bigtime),
        mtime: time(raw, 0x28, bigtime),
        ctime: time(raw, 0x30, bigtime),
        crtime: if version == 3 {
            time(raw, 0x90, bigtime)
        } else {
            Timestamp::default()
        },
        rdev: match kind {
            FileKind::CharDevice | FileKind::BlockDevice => rdev(be32(raw, core)),
            _ => 0,
        },
    }
}

impl Inode {
    /// Parses inode `ino` from its `raw` bytes (inode size) at `offset`.
    pub fn parse(
        vol: &str,
        sb: &Superblock,
        ino: Ino,
        raw: &[u8],
        offset: u64,
    ) -> GuestResult<Inode> {
        let at = Where { vol, ino, offset };
        let version = check_header(&at, sb, raw)?;
        let mode = be16(raw, 2);
        let Some(kind) = kind_of(mode) else {
            return Err(at.bad(2, format!("mode {mode:#o} (free or unknown type)")));
        };
        let core = if version == 3 { 0xb0 } else { 0x64 };
        let lit = raw.len() - core;
        let forkoff = raw[0x52] as usize * 8;
        if forkoff >= lit {
            return Err(at.bad(0x52, format!("attr fork offset {forkoff} beyond the inode")));
        }
        let flags2 = if version == 3 { be64(raw, 0x78) } else { 0 };
        let (nextents, anextents) = if flags2 & DIFLAG2_NREXT64 != 0 {
            (be64(raw, 0x18), be32(raw, 0x4c) as u64)
        } else {
            (be32(raw, 0x4c) as u64, be16(raw, 0x50) as u64)
        };
        let (format, size, aformat) = check_formats(&at, raw, kind, forkoff)?;
        let bigtime = flags2 & DIFLAG2_BIGTIME != 0;
        let attr = core_attr(sb, ino, raw, kind, version, bigtime, core);
        let mut inode = Inode {
            ino,
            offset,
            kind,
            format,
            aformat: if forkoff != 0 { aformat } else { FMT_LOCAL },
            size,
            flags: be16(raw, 0x5a),
            nextents,
            anextents,
            raw: raw.to_vec(),
            core,
            forkoff,
            attr,
            extents: None,
            aextents: None,
        };
        if format == FMT_EXTENTS {
            inode.extents = Some(inode.fork_extents(vol, sb, Fork::Data, nextents)?);
        }
        if forkoff != 0 && aformat == FMT_EXTENTS {
            inode.aextents = Some(inode.fork_extents(vol, sb, Fork::Attr, anextents)?);
        }
        Ok(inode)
    }

    fn fork_extents(
        &self,
        vol: &str,
        sb: &Superblock,
        fork: Fork,
        n: u64,
    ) -> GuestResult<Vec<Extent>> {
        let (start, bytes) = self.fork_range(fork);
        if n.saturating_mul(16) > bytes.len() as u64 {
            return Err(GuestError::corrupt(
                vol,
                self.offset + start as u64,
                format!(
                    "inode {}: {n} {fork:?} extents do not fit the fork",
                    self.ino
                ),
            ));
        }
        let at = self.offset + start as u64;
        parse_extents(
            vol,
            sb,
            &bytes[..n as usize * 16],
            at,
            // Formatted only for an error: this runs for every inode.
            &format_args!("inode {}", self.ino),
        )
    }

    /// Where a fork lies in the inode, and its bytes.
    fn fork_range(&self, fork: Fork) -> (usize, &[u8]) {
        let lit = &self.raw[self.core..];
        match (fork, self.forkoff) {
            (Fork::Data, 0) => (self.core, lit),
            (Fork::Data, f) => (self.core, &lit[..f]),
            (Fork::Attr, 0) => (self.raw.len(), &[]),
            (Fork::Attr, f) => (self.core + f, &lit[f..]),
        }
    }

    /// A fork's bytes in the inode (local data, extent records or bmbt root).
    pub fn fork(&self, fork: Fork) -> &[u8] {
        self.fork_range(fork).1
    }

    /// Byte offset of a fork on the volume (error messages).
    pub fn fork_offset(&self, fork: Fork) -> u64 {
        self.offset + self.fork_range(fork).0 as u64
    }

    pub fn has_attr_fork(&self) -> bool {
        self.forkoff != 0
    }

    pub fn realtime(&self) -> bool {
        self.flags & DIFLAG_REALTIME != 0
    }

    pub fn attr(&self) -> Attr {
        self.attr.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigtime_and_old_times() {
        let mut raw = [0u8; 8];
        raw[..8].copy_from_slice(&((1i64 << 31) as u64 * 1_000_000_000 + 5).to_be_bytes());
        assert_eq!(time(&raw, 0, true), Timestamp { secs: 0, nsecs: 5 });
        raw[..4].copy_from_slice(&(-5i32).to_be_bytes());
        raw[4..].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(time(&raw, 0, false), Timestamp { secs: -5, nsecs: 7 });
    }

    #[test]
    fn device_numbers() {
        // major 8, minor 1 -> Linux 0x801; major 300, minor 70000.
        assert_eq!(rdev((8 << 18) | 1), 0x801);
        let (ma, mi) = (300u32, 70000u32);
        assert_eq!(
            rdev((ma << 18) | mi),
            (mi & 0xff) | (ma << 8) | ((mi & !0xff) << 12)
        );
    }
}
