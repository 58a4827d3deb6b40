//! Extended attributes: the in-inode area (after i_extra_isize) and the
//! shared xattr block, with name prefixes decoded. POSIX ACLs, which ext4
//! stores in a compact form, are converted to the `system.posix_acl_*`
//! xattr format `getfattr` sees from the kernel; `system.data` (the
//! inline-data area) is hidden, as the kernel hides it.

use super::inode::Inode;
use super::sb::{le16, le32};
use crate::guest::crc::crc32c;
use crate::guest::{GuestError, GuestResult};

const MAGIC: u32 = 0xEA02_0000;
/// The kernel's limit on one xattr value.
const MAX_VALUE: u32 = 65536;

/// Reads the value of an xattr stored in its own inode (ea_inode).
pub type EaInodeReader<'a> = &'a dyn Fn(u32, u32) -> GuestResult<Vec<u8>>;

fn prefix(index: u8) -> Option<&'static [u8]> {
    Some(match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        6 => b"security.",
        _ => return None,
    })
}

/// ext4's compact ACL (version 1, short entries for the owner/group/
/// mask/other tags) -> the POSIX ACL xattr format (version 2).
fn acl_to_posix(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 || le32(v, 0) != 1 {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut p = 4;
    while p < v.len() {
        if p + 4 > v.len() {
            return None;
        }
        let tag = le16(v, p);
        let perm = le16(v, p + 2);
        let id = match tag {
            // ACL_USER and ACL_GROUP carry an id.
            2 | 8 => {
                if p + 8 > v.len() {
                    return None;
                }
                let id = le32(v, p + 4);
                p += 8;
                id
            }
            1 | 4 | 0x10 | 0x20 => {
                p += 4;
                u32::MAX
            }
            _ => return None,
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

/// Parses the entries in `area[start..]`; values lie at e_value_offs
/// inside `area`. `off` is the area's volume byte offset.
fn parse_entries(
    vol: &str,
    ino: u64,
    area: &[u8],
    start: usize,
    off: u64,
    ea_inode: EaInodeReader,
    out: &mut Vec<(u8, Vec<u8>, Vec<u8>)>,
) -> GuestResult<()> {
    let bad = |at: usize, what: &str| {
        GuestError::corrupt(vol, off + at as u64, format!("inode {ino}: xattr {what}"))
    };
    let mut pos = start;
    while pos + 4 <= area.len() && le32(area, pos) != 0 {
        if pos + 16 > area.len() {
            return Err(bad(pos, "entry truncated"));
        }
        let name_len = area[pos] as usize;
        let index = area[pos + 1];
        let voff = le16(area, pos + 2) as usize;
        let vinum = le32(area, pos + 4);
        let vsize = le32(area, pos + 8);
        let name_end = pos + 16 + name_len;
        if name_end > area.len() {
            return Err(bad(pos, "name runs past the area"));
        }
        let name = &area[pos + 16..name_end];
        if vsize > MAX_VALUE {
            return Err(bad(pos, &format!("value size {vsize} too large")));
        }
        let value = if vinum != 0 {
            ea_inode(vinum, vsize)?
        } else {
            let vstart = voff;
            match vstart.checked_add(vsize as usize) {
                Some(vend) if vend <= area.len() => area[vstart..vend].to_vec(),
                _ => return Err(bad(pos, "value runs past the area")),
            }
        };
        out.push((index, name.to_vec(), value));
        pos = (name_end + 3) & !3;
    }
    Ok(())
}

/// Every xattr of `inode`: in-inode ones, then the xattr block's (`block`
/// is that block's bytes and number, already read by the caller).
pub fn all(
    vol: &str,
    csum_seed: Option<u32>,
    inode: &Inode,
    block: Option<(&[u8], u64)>,
    ea_inode: EaInodeReader,
) -> GuestResult<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    in_inode(vol, inode, ea_inode, &mut out)?;
    if let Some((b, blk)) = block {
        let off = blk * b.len() as u64;
        if le32(b, 0) != MAGIC || le32(b, 8) != 1 {
            return Err(GuestError::corrupt(
                vol,
                off,
                format!("inode {}: xattr block has a bad header", inode.ino),
            ));
        }
        if let Some(seed) = csum_seed {
            let mut c = crc32c(seed, &blk.to_le_bytes());
            c = crc32c(c, &b[..0x10]);
            c = crc32c(c, &[0; 4]);
            c = crc32c(c, &b[0x14..]);
            let want = le32(b, 0x10);
            if c != want {
                return Err(GuestError::corrupt(
                    vol,
                    off,
                    format!("inode {}: xattr block checksum mismatch (stored {want:#x}, computed {c:#x})", inode.ino),
                ));
            }
        }
        parse_entries(vol, inode.ino, b, 0x20, off, ea_inode, &mut out)?;
    }
    let mut named = Vec::new();
    for (index, name, value) in out {
        let Some(p) = prefix(index) else { continue };
        let mut full = p.to_vec();
        if index == 2 || index == 3 {
            let v = acl_to_posix(&value).ok_or_else(|| {
                GuestError::corrupt(
                    vol,
                    inode.offset,
                    format!("inode {}: ACL xattr malformed", inode.ino),
                )
            })?;
            named.push((full, v));
        } else {
            full.extend_from_slice(&name);
            named.push((full, value));
        }
    }
    Ok(named)
}

fn in_inode(
    vol: &str,
    inode: &Inode,
    ea_inode: EaInodeReader,
    out: &mut Vec<(u8, Vec<u8>, Vec<u8>)>,
) -> GuestResult<()> {
    let raw = &inode.raw;
    let s = inode.extra_end;
    if raw.len() >= s + 4 && le32(raw, s) == MAGIC {
        // Value offsets count from the first entry, right after the magic.
        let off = inode.offset + s as u64 + 4;
        parse_entries(vol, inode.ino, &raw[s + 4..], 0, off, ea_inode, out)?;
    }
    Ok(())
}

/// The `system.data` xattr (index 7, name "data"): the part of an inline
/// file or directory beyond the 60 bytes of i_block. Always in the inode.
pub fn system_data(vol: &str, inode: &Inode) -> GuestResult<Vec<u8>> {
    let mut out = Vec::new();
    let no_ea = |_: u32, _: u32| -> GuestResult<Vec<u8>> {
        Err(GuestError::corrupt(
            vol,
            inode.offset,
            format!("inode {}: inline data in an xattr inode", inode.ino),
        ))
    };
    in_inode(vol, inode, &no_ea, &mut out)?;
    Ok(out
        .into_iter()
        .find(|(i, n, _)| *i == 7 && n == b"data")
        .map(|(_, _, v)| v)
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_conversion() {
        // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
        let mut v = 1u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, None),
            (2, 4, Some(1000u32)),
            (4, 4, None),
            (0x10, 4, None),
            (0x20, 0, None),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            if let Some(id) = id {
                v.extend_from_slice(&id.to_le_bytes());
            }
        }
        let p = acl_to_posix(&v).unwrap();
        assert_eq!(p.len(), 4 + 5 * 8);
        assert_eq!(le32(&p, 0), 2);
        assert_eq!(le32(&p, 4 + 8 + 4), 1000);
        assert_eq!(le32(&p, 4 + 4), u32::MAX);
        assert!(acl_to_posix(&[1, 0, 0, 0, 9, 0]).is_none());
    }
}
