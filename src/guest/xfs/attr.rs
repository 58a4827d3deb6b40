//! Extended attributes of XFS inodes: the attr fork in shortform (in the
//! inode), leaf form (one block) and node form (a dabtree whose leaves
//! are chained left to right), with values stored locally in the leaf or
//! remotely in their own blocks (v5 remote blocks carry a header and CRC
//! per filesystem block). Names get the namespace prefix the kernel shows
//! (`user.`, `trusted.`, `security.`); POSIX ACLs, stored as XFS ACLs under
//! SGI_ACL_FILE / SGI_ACL_DEFAULT, are shown as `system.posix_acl_*` in the
//! kernel's xattr format.

use super::dabtree::DA3_HDR;
use super::disk::{be16, be32, V5Hdr};
use super::inode::{Fork, Inode, FMT_LOCAL};
use super::XfsFs;
use crate::guest::{GuestError, GuestResult};
use std::collections::HashSet;

const LEAF_MAGIC: u16 = 0xfbee;
const LEAF3_MAGIC: u16 = 0x3bee;
const RMT_MAGIC: u32 = 0x5841_524d; // "XARM"
const RMT_HDR: u64 = 56;
const RMT_V5: V5Hdr = V5Hdr {
    crc: 12,
    blkno: 40,
    uuid: 16,
    owner: Some(32),
};
// Entry flags.
const F_LOCAL: u8 = 0x01;
const F_ROOT: u8 = 0x02;
const F_SECURE: u8 = 0x04;
const F_PARENT: u8 = 0x08;
const F_INCOMPLETE: u8 = 0x80;
/// Values larger than the kernel's XATTR_SIZE_MAX are corrupt.
const MAX_VALUE: u64 = 65536;
/// Leaves of one attr fork that are followed (a loop bound).
const MAX_LEAVES: usize = 1 << 16;

/// The name the kernel shows for an attr with `flags` and raw `name`, and
/// whether its value is an XFS ACL to convert. None: not shown.
fn shown_name(flags: u8, name: &[u8]) -> Option<(Vec<u8>, bool)> {
    if flags & (F_PARENT | F_INCOMPLETE) != 0 {
        return None;
    }
    let prefix: &[u8] = if flags & F_ROOT != 0 {
        match name {
            b"SGI_ACL_FILE" => return Some((b"system.posix_acl_access".to_vec(), true)),
            b"SGI_ACL_DEFAULT" => return Some((b"system.posix_acl_default".to_vec(), true)),
            _ => b"trusted.",
        }
    } else if flags & F_SECURE != 0 {
        b"security."
    } else {
        b"user."
    };
    Some(([prefix, name].concat(), false))
}

/// An XFS ACL (big-endian count, then tag, id, perm of 12 bytes each) in
/// the kernel's POSIX ACL xattr format (version 2, little-endian tag,
/// perm, id; id undefined for the owner/group/mask/other entries).
fn acl_to_posix(v: &[u8]) -> Option<Vec<u8>> {
    let n = be32(v, 0) as usize;
    if v.len() < 4 + n.checked_mul(12)? {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    for i in 0..n {
        let e = &v[4 + i * 12..];
        let tag = be32(e, 0);
        let id = if tag == 0x02 || tag == 0x08 {
            be32(e, 4)
        } else {
            u32::MAX
        };
        out.extend_from_slice(&(tag as u16).to_le_bytes());
        out.extend_from_slice(&be16(e, 8).to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

/// A raw attr value: in its entry, or in remote blocks read only when
/// the value is asked for (a listing needs names alone).
enum Val {
    Local(Vec<u8>),
    Remote { fblk: u64, len: u64, from: u64 },
}

/// One raw attr entry: flags, on-disk name, value.
type Raw = (u8, Vec<u8>, Val);

/// Bytes of names and local values one inode's attrs may add up to: a
/// crafted fork cannot make a listing outgrow this.
const MAX_ATTR_BYTES: usize = 64 << 20;

impl XfsFs {
    /// The shown names of `d`'s xattrs (no value is read).
    pub(super) fn xattr_names(&self, d: &Inode) -> GuestResult<Vec<Vec<u8>>> {
        Ok(self
            .raw_attrs(d)?
            .into_iter()
            .filter_map(|(flags, name, _)| shown_name(flags, &name).map(|s| s.0))
            .collect())
    }

    /// The value of `d`'s xattr shown as `want`, if there is one.
    pub(super) fn xattr(&self, d: &Inode, want: &[u8]) -> GuestResult<Option<Vec<u8>>> {
        for (flags, name, val) in self.raw_attrs(d)? {
            let Some((shown, acl)) = shown_name(flags, &name) else {
                continue;
            };
            if shown != want {
                continue;
            }
            let value = match val {
                Val::Local(v) => v,
                Val::Remote { fblk, len, from } => self.remote_value(d, fblk, len, from)?,
            };
            if !acl {
                return Ok(Some(value));
            }
            return acl_to_posix(&value).map(Some).ok_or_else(|| {
                GuestError::corrupt(
                    &self.disk.name,
                    d.offset,
                    format!("inode {}: bad ACL", d.ino),
                )
            });
        }
        Ok(None)
    }

    /// Every raw attr entry of `d`, remote values not read.
    fn raw_attrs(&self, d: &Inode) -> GuestResult<Vec<Raw>> {
        let mut raw = Vec::new();
        // An attr fork in extents format without extents holds nothing
        // (the kernel leaves one behind when the last attr goes).
        if !d.has_attr_fork() || (d.aformat == super::inode::FMT_EXTENTS && d.anextents == 0) {
            return Ok(raw);
        }
        if d.aformat == FMT_LOCAL {
            self.sf_attrs(d, &mut raw)?;
        } else {
            self.leaf_attrs(d, &mut raw)?;
        }
        Ok(raw)
    }

    fn sf_attrs(&self, d: &Inode, out: &mut Vec<Raw>) -> GuestResult<()> {
        let b = d.fork(Fork::Attr);
        let at = d.fork_offset(Fork::Attr);
        let total = be16(b, 0) as usize;
        let bad = |p: usize| {
            GuestError::corrupt(
                &self.disk.name,
                at + p as u64,
                format!("inode {}: shortform attr entry past its end", d.ino),
            )
        };
        if total < 4 || total > b.len() {
            return Err(bad(0));
        }
        let b = &b[..total];
        let mut p = 4;
        for _ in 0..b[2] {
            if p + 3 > b.len() {
                return Err(bad(p));
            }
            let (nl, vl, flags) = (b[p] as usize, b[p + 1] as usize, b[p + 2]);
            let end = p + 3 + nl + vl;
            if end > b.len() {
                return Err(bad(p));
            }
            out.push((
                flags,
                b[p + 3..p + 3 + nl].to_vec(),
                Val::Local(b[p + 3 + nl..end].to_vec()),
            ));
            p = end;
        }
        Ok(())
    }

    /// The entries of every leaf, leftmost first along the forward links.
    /// A link back to a leaf already read, or a leaf whose back link does
    /// not name the one before, is corrupt (a loop would re-read leaves).
    fn leaf_attrs(&self, d: &Inode, out: &mut Vec<Raw>) -> GuestResult<()> {
        let mut leaf = self.da_descend(d, Fork::Attr, 0, 0)?;
        let v5 = self.sb.v5;
        let mut seen = HashSet::from([leaf.fblk]);
        let mut prev: Option<u64> = None;
        let mut bytes = 0usize;
        for _ in 0..MAX_LEAVES {
            if leaf.magic != if v5 { LEAF3_MAGIC } else { LEAF_MAGIC } {
                return Err(self.da_bad(d, leaf.at, "bad attr leaf magic"));
            }
            if v5 {
                if let Some(w) = DA3_HDR.check(&leaf.b, leaf.at, self.sb.meta_uuid(), d.ino) {
                    return Err(self.da_bad(d, leaf.at, w));
                }
            }
            if let Some(p) = prev {
                if u64::from(be32(&leaf.b, 4)) != p {
                    return Err(self.da_bad(d, leaf.at, "attr leaf back link"));
                }
            }
            self.leaf_entries(d, &leaf.b, leaf.at, out, &mut bytes)?;
            let forw = be32(&leaf.b, 0) as u64;
            if forw == 0 {
                return Ok(());
            }
            if !seen.insert(forw) {
                return Err(self.da_bad(d, leaf.at, "attr leaf chain loops"));
            }
            let (b, at) = self.da_block(d, Fork::Attr, forw, leaf.at)?;
            prev = Some(leaf.fblk);
            leaf = super::dabtree::Leaf {
                magic: be16(&b, 8),
                b,
                at,
                fblk: forw,
            };
        }
        Err(self.da_bad(d, leaf.at, "attr leaf chain too long (loop?)"))
    }

    /// One leaf's entries; `bytes` counts names and local values so far.
    fn leaf_entries(
        &self,
        d: &Inode,
        b: &[u8],
        at: u64,
        out: &mut Vec<Raw>,
        bytes: &mut usize,
    ) -> GuestResult<()> {
        let hdr = if self.sb.v5 { 80 } else { 32 };
        let count = be16(b, if self.sb.v5 { 56 } else { 12 }) as usize;
        if hdr + count * 8 > b.len() {
            return Err(self.da_bad(d, at, "attr leaf count"));
        }
        for i in 0..count {
            let e = hdr + i * 8;
            let idx = be16(b, e + 4) as usize;
            let flags = b[e + 6];
            let bad = || self.da_bad(d, at + e as u64, "attr entry outside its leaf");
            let entry = if flags & F_LOCAL != 0 {
                let vl = be16(b, idx) as usize;
                let nl = *b.get(idx + 2).ok_or_else(bad)? as usize;
                let end = idx + 3 + nl + vl;
                if idx < hdr || end > b.len() {
                    return Err(bad());
                }
                (
                    flags,
                    b[idx + 3..idx + 3 + nl].to_vec(),
                    Val::Local(b[idx + 3 + nl..end].to_vec()),
                )
            } else {
                let nl = *b.get(idx + 8).ok_or_else(bad)? as usize;
                if idx < hdr || idx + 9 + nl > b.len() {
                    return Err(bad());
                }
                if flags & (F_INCOMPLETE | F_PARENT) != 0 {
                    continue;
                }
                let val = Val::Remote {
                    fblk: be32(b, idx) as u64,
                    len: be32(b, idx + 4) as u64,
                    from: at + idx as u64,
                };
                (flags, b[idx + 9..idx + 9 + nl].to_vec(), val)
            };
            *bytes += entry.1.len()
                + match &entry.2 {
                    Val::Local(v) => v.len(),
                    Val::Remote { .. } => 0,
                };
            if *bytes > MAX_ATTR_BYTES {
                return Err(self.da_bad(d, at, "attrs add up to more than 64 MiB"));
            }
            out.push(entry);
        }
        Ok(())
    }

    /// A remote value of `len` bytes from attr fork block `fblk`.
    fn remote_value(&self, d: &Inode, fblk: u64, len: u64, from: u64) -> GuestResult<Vec<u8>> {
        if len > MAX_VALUE {
            return Err(self.da_bad(d, from, "remote value too large"));
        }
        let bs = self.sb.block_size;
        let per = if self.sb.v5 { bs - RMT_HDR } else { bs };
        let mut v = Vec::with_capacity(len as usize);
        let mut blk = fblk;
        while (v.len() as u64) < len {
            let Some((b, at)) = self.fork_block(d, Fork::Attr, blk, 1)? else {
                return Err(self.da_bad(d, from, "remote value in a hole"));
            };
            let chunk = per.min(len - v.len() as u64) as usize;
            if self.sb.v5 {
                let bad = be32(&b, 0) != RMT_MAGIC
                    || be32(&b, 4) as usize != v.len()
                    || be32(&b, 8) as usize != chunk;
                if bad {
                    return Err(self.da_bad(d, at, "remote value block header"));
                }
                if let Some(w) = RMT_V5.check(&b, at, self.sb.meta_uuid(), d.ino) {
                    return Err(self.da_bad(d, at, w));
                }
                v.extend_from_slice(&b[RMT_HDR as usize..RMT_HDR as usize + chunk]);
            } else {
                v.extend_from_slice(&b[..chunk]);
            }
            blk += 1;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_acls() {
        assert_eq!(shown_name(0, b"x"), Some((b"user.x".to_vec(), false)));
        assert_eq!(
            shown_name(F_SECURE, b"selinux").unwrap().0,
            b"security.selinux"
        );
        assert!(shown_name(F_ROOT, b"SGI_ACL_FILE").unwrap().1);
        assert_eq!(shown_name(F_INCOMPLETE, b"x"), None);
        let mut acl = 1u32.to_be_bytes().to_vec();
        acl.extend_from_slice(&[0, 0, 0, 2, 0, 0, 3, 0xe8, 0, 6, 0, 0]);
        assert_eq!(
            acl_to_posix(&acl).unwrap(),
            [2, 0, 0, 0, 2, 0, 6, 0, 0xe8, 3, 0, 0]
        );
        assert_eq!(acl_to_posix(&[0, 0, 0, 9]), None);
    }
}
