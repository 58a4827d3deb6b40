//! What a file looks like to a Linux user, decided as ntfs-3g decides it
//! with its default options: the kind (directory, reparse-point symlink or
//! junction, Interix symlink/FIFO/socket/device made by ntfs-3g or SFU,
//! else a regular file), the size `stat` shows, symlink targets, and the
//! xattrs (named data streams as `user.*`, the DOS attributes, reparse
//! data).

use super::data;
use super::mft::Vol;
use super::node::Node;
use super::record::{AT_DATA, AT_REPARSE_POINT};
use crate::guest::{FileKind, GuestResult};

pub const FILE_ATTR_HIDDEN: u32 = 0x2;
pub const FILE_ATTR_SYSTEM: u32 = 0x4;
pub const FILE_ATTR_DIRECTORY: u32 = 0x10;
pub const FILE_ATTR_NORMAL: u32 = 0x80;
pub const FILE_ATTR_REPARSE_POINT: u32 = 0x400;
/// In `$FILE_NAME` keys: the file is a directory.
pub const FILE_ATTR_I30_INDEX_PRESENT: u32 = 0x1000_0000;

pub const TAG_MOUNT_POINT: u32 = 0xA000_0003;
pub const TAG_SYMLINK: u32 = 0xA000_000C;
pub const TAG_LX_SYMLINK: u32 = 0xA000_001D;

/// Longest Interix file read (its target is at most PATH_MAX units).
const INTX_MAX: u64 = 8 + 2 * 4096;

/// The kind of a file and what goes with it.
#[derive(Clone, Debug)]
pub struct Shape {
    pub kind: FileKind,
    /// A symlink's target, before a reparse target is made relative.
    pub target: Option<Target>,
    pub rdev: u32,
}

/// Where a symlink points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Shown as it is (Interix, WSL, relative reparse symlinks).
    Literal(Vec<u8>),
    /// A Windows absolute path (`C:\dir\file` or `\dir\file`), resolved
    /// on this volume when it exists there (see the module docs of ntfs).
    Absolute {
        drive: Option<char>,
        path: Vec<String>,
    },
}

/// The reparse tag and target, if `node` is a reparse point.
pub fn reparse(node: &Node) -> Option<&[u8]> {
    node.stream(AT_REPARSE_POINT, &[])
        .and_then(|s| s.resident())
}

fn utf16(b: &[u8]) -> String {
    let u: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&u)
}

/// The substitute name of a symlink or junction reparse buffer, or `None`
/// for other tags or a malformed buffer.
pub fn reparse_target(r: &[u8]) -> Option<Target> {
    if r.len() < 8 {
        return None;
    }
    let tag = u32::from_le_bytes(r[0..4].try_into().unwrap());
    let body = &r[8..];
    let field = |i: usize| {
        body.get(i..i + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let (buf_at, relative) = match tag {
        TAG_MOUNT_POINT => (8, false),
        TAG_SYMLINK => (12, body.get(8..12).map(|f| f[0] & 1 == 1)?),
        TAG_LX_SYMLINK => {
            let kind = u32::from_le_bytes(body.get(0..4)?.try_into().ok()?);
            return (kind == 2).then(|| Target::Literal(body[4..].to_vec()));
        }
        _ => return None,
    };
    let (off, len) = (field(0)?, field(2)?);
    let name = utf16(body.get(buf_at + off..buf_at + off + len)?);
    // The kinds ntfs-3g tells apart: full (\??\X:\...), absolute
    // (\... or X:\..., only with the relative flag, as ntfs-3g), relative.
    let full = name.starts_with("\\??\\") || name.starts_with("\\\\");
    let abs = !full && (name.starts_with('\\') || name.as_bytes().get(1) == Some(&b':'));
    let rest = if tag == TAG_MOUNT_POINT || full {
        if relative {
            return None;
        }
        name.strip_prefix("\\??\\")?.to_string()
    } else if !relative {
        return None;
    } else if abs {
        name
    } else {
        return Some(Target::Literal(name.replace('\\', "/").into_bytes()));
    };
    let (drive, path) = match rest.as_bytes() {
        [d, b':', b'\\', ..] if d.is_ascii_alphabetic() => {
            (Some(d.to_ascii_uppercase() as char), &rest[3..])
        }
        [b'\\', ..] if !full && tag == TAG_SYMLINK => (None, &rest[1..]),
        _ => return None,
    };
    Some(Target::Absolute {
        drive,
        path: path
            .split('\\')
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// The kind of `node` (see the module docs).
pub fn shape(vol: &Vol, node: &Node) -> GuestResult<Shape> {
    let plain = |kind| {
        Ok(Shape {
            kind,
            target: None,
            rdev: 0,
        })
    };
    let attrs = node.si.attrs;
    if attrs & FILE_ATTR_REPARSE_POINT != 0 {
        if let Some(t) = reparse(node).and_then(reparse_target) {
            return Ok(Shape {
                kind: FileKind::Symlink,
                target: Some(t),
                rdev: 0,
            });
        }
    }
    if node.is_dir {
        return plain(FileKind::Dir);
    }
    if attrs & FILE_ATTR_SYSTEM == 0 {
        return plain(FileKind::File);
    }
    let Some(s) = node.data() else {
        return plain(FileKind::File);
    };
    let size = s.size();
    if attrs & FILE_ATTR_HIDDEN == 0 && size <= 1 {
        return plain(if size == 0 {
            FileKind::Fifo
        } else {
            FileKind::Socket
        });
    }
    if size <= 8 || size > INTX_MAX {
        return plain(FileKind::File);
    }
    let mut b = vec![0u8; size as usize];
    data::read(vol, s, 0, &mut b)?;
    let dev = |kind| {
        let major = u64::from_le_bytes(b[8..16].try_into().unwrap());
        let minor = u64::from_le_bytes(b[16..24].try_into().unwrap());
        let rdev = ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & !0xFF) << 12);
        Ok(Shape {
            kind,
            target: None,
            rdev: rdev as u32,
        })
    };
    match &b[0..8] {
        b"IntxLNK\x01" => Ok(Shape {
            kind: FileKind::Symlink,
            target: Some(Target::Literal(utf16(&b[8..]).into_bytes())),
            rdev: 0,
        }),
        b"IntxBLK\0" if size == 24 => dev(FileKind::BlockDevice),
        b"IntxCHR\0" if size == 24 => dev(FileKind::CharDevice),
        _ => plain(FileKind::File),
    }
}

/// The DOS attributes as ntfs-3g's `system.ntfs_attrib_be` shows them.
pub fn dos_attrs(node: &Node) -> u32 {
    let mut a = node.si.attrs;
    if node.is_dir {
        a |= FILE_ATTR_DIRECTORY;
    } else {
        a &= !FILE_ATTR_DIRECTORY;
    }
    if a == 0 {
        FILE_ATTR_NORMAL
    } else {
        a
    }
}

/// Names of the named data streams (alternate data streams), as UTF-8.
pub fn stream_names(node: &Node) -> Vec<(Vec<u8>, usize)> {
    node.streams
        .iter()
        .enumerate()
        .filter(|(_, s)| s.ty == AT_DATA && !s.name.is_empty())
        .map(|(i, s)| (String::from_utf16_lossy(&s.name).into_bytes(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount_point(sub: &str) -> Vec<u8> {
        let s: Vec<u8> = sub.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
        let mut body = Vec::new();
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(s.len() as u16).to_le_bytes());
        body.extend_from_slice(&(s.len() as u16 + 2).to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&s);
        body.extend_from_slice(&[0, 0, 0, 0]);
        let mut r = TAG_MOUNT_POINT.to_le_bytes().to_vec();
        r.extend_from_slice(&(body.len() as u16).to_le_bytes());
        r.extend_from_slice(&[0, 0]);
        r.extend_from_slice(&body);
        r
    }

    #[test]
    fn junction_targets_parse() {
        let t = reparse_target(&mount_point("\\??\\c:\\Windows\\System32")).unwrap();
        assert_eq!(
            t,
            Target::Absolute {
                drive: Some('C'),
                path: vec!["Windows".into(), "System32".into()]
            }
        );
        assert!(reparse_target(&mount_point("Windows")).is_none());
        let mut short = mount_point("\\??\\C:\\x");
        short.truncate(14);
        assert!(reparse_target(&short).is_none());
    }
}
