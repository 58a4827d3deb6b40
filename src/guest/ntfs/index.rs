//! `$I30` directory indexes: the B+ tree of `$FILE_NAME` keys kept in the
//! directory's `$INDEX_ROOT` and, for larger directories, in INDX blocks of
//! its `$INDEX_ALLOCATION`. Lookups descend the tree by `$UpCase`
//! collation (never a linear scan); listings walk it in order. Blocks are
//! checked (fixups, their own VCN, entry bounds) and a walk that meets a
//! block twice or goes deeper than any real tree is corrupt.

use super::data;
use super::mft::Vol;
use super::node::{mref_no, Node, Stream};
use super::record::*;
use super::upcase::Upcase;
use crate::guest::{GuestError, GuestResult};
use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::Arc;

/// Deeper than any real index (a 4 KiB block holds >= 10 entries).
const MAX_DEPTH: usize = 24;

pub const NS_POSIX: u8 = 0;
pub const NS_DOS: u8 = 2;

/// One index entry (a name of a file in this directory).
#[derive(Clone, Debug)]
pub struct Entry {
    pub mref: u64,
    pub name: Vec<u16>,
    pub namespace: u8,
    /// The DOS attributes copied into the `$FILE_NAME` key.
    pub file_attrs: u32,
    /// VCN of the block below this entry (before it in order).
    pub child: Option<u64>,
    /// The last entry of a node carries no key.
    pub last: bool,
}

/// Parses the entries of one node whose index header sits at `hdr` in
/// `b`; `off` is the volume offset of `b` (for errors).
pub fn entries(vol: &Vol, b: &[u8], hdr: usize, off: u64) -> GuestResult<Vec<Entry>> {
    let bad = |at: usize, what: String| vol.corrupt(off + at as u64, format!("index node: {what}"));
    if hdr + 16 > b.len() {
        return Err(bad(hdr, "header past the node".into()));
    }
    let first = hdr + le32(b, hdr) as usize;
    let end = hdr + le32(b, hdr + 4) as usize;
    if end > b.len() || first > end {
        return Err(bad(
            hdr,
            format!("entries {first}..{end} outside {} bytes", b.len()),
        ));
    }
    let mut out = Vec::new();
    let mut at = first;
    loop {
        if at + 16 > end {
            return Err(bad(at, "no last entry".into()));
        }
        let len = usize::from(le16(b, at + 8));
        let key_len = usize::from(le16(b, at + 10));
        let flags = le16(b, at + 12);
        if len < 16 || len % 8 != 0 || at + len > end || 16 + key_len > len {
            return Err(bad(at, format!("entry length {len}, key {key_len}")));
        }
        let child = if flags & 1 != 0 {
            if len < 24 + key_len {
                return Err(bad(at, "no room for the child VCN".into()));
            }
            Some(le64(b, at + len - 8))
        } else {
            None
        };
        let last = flags & 2 != 0;
        let (name, namespace, file_attrs) = if last {
            (Vec::new(), NS_POSIX, 0)
        } else {
            let k = &b[at + 16..at + 16 + key_len];
            if k.len() < 0x42 || k.len() < 0x42 + 2 * usize::from(k[0x40]) {
                return Err(bad(at + 16, format!("file name key of {} bytes", k.len())));
            }
            let n = usize::from(k[0x40]);
            (
                (0..n).map(|i| le16(k, 0x42 + 2 * i)).collect(),
                k[0x41],
                le32(k, 0x38),
            )
        };
        out.push(Entry {
            mref: le64(b, at),
            name,
            namespace,
            file_attrs,
            child,
            last,
        });
        if last {
            return Ok(out);
        }
        at += len;
    }
}

/// A directory's index, ready to read.
pub struct Dir {
    pub no: u64,
    /// Volume offset of the `$INDEX_ROOT` header, for errors.
    at: u64,
    root: Vec<Entry>,
    alloc: Option<Stream>,
    block_size: u32,
    /// log2 of the bytes a child VCN counts.
    vcn_shift: u32,
}

/// Block-level cache the caller provides: (dir, vcn) -> entries.
pub trait Blocks {
    fn get(&self, dir: u64, vcn: u64) -> Option<Arc<Vec<Entry>>>;
    fn put(&self, dir: u64, vcn: u64, e: Arc<Vec<Entry>>);
}

impl Dir {
    /// The `$I30` index of directory `node`.
    pub fn open(vol: &Vol, node: &Node) -> GuestResult<Dir> {
        let i30: Vec<u16> = "$I30".encode_utf16().collect();
        let root = node.stream(AT_INDEX_ROOT, &i30).ok_or(GuestError::NotDir)?;
        let Some(r) = root.resident() else {
            return Err(vol.corrupt(
                root.at,
                format!("record {}: non-resident $INDEX_ROOT", node.no),
            ));
        };
        if r.len() < 0x20 || le32(r, 0) != AT_FILE_NAME {
            return Err(vol.corrupt(
                root.at,
                format!("record {}: $INDEX_ROOT does not index file names", node.no),
            ));
        }
        let block_size = le32(r, 8);
        if !(256..=65536).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(vol.corrupt(
                root.at,
                format!("record {}: index block size {block_size}", node.no),
            ));
        }
        let vcn_shift = if u64::from(block_size) >= vol.boot.cluster {
            vol.boot.cluster.trailing_zeros()
        } else {
            9
        };
        Ok(Dir {
            no: node.no,
            at: root.at,
            root: entries(vol, r, 0x10, root.at)?,
            alloc: node.stream(AT_INDEX_ALLOCATION, &i30).cloned(),
            block_size,
            vcn_shift,
        })
    }

    /// The entries of the block at `vcn`.
    fn block(&self, vol: &Vol, cache: &dyn Blocks, vcn: u64) -> GuestResult<Arc<Vec<Entry>>> {
        if let Some(e) = cache.get(self.no, vcn) {
            return Ok(e);
        }
        let bad = |what: String| vol.corrupt(self.at, format!("directory {}: {what}", self.no));
        let alloc = self
            .alloc
            .as_ref()
            .ok_or_else(|| bad(format!("child block {vcn} but no $INDEX_ALLOCATION")))?;
        let pos = vcn
            .checked_shl(self.vcn_shift)
            .filter(|p| p >> self.vcn_shift == vcn);
        let pos = pos.filter(|p| {
            p.checked_add(u64::from(self.block_size))
                .is_some_and(|e| e <= alloc.size())
        });
        let pos = pos.ok_or_else(|| bad(format!("index block VCN {vcn} past the allocation")))?;
        let mut b = vec![0u8; self.block_size as usize];
        data::read(vol, alloc, pos, &mut b)?;
        let off = volume_offset(vol, alloc, pos);
        fixup(&vol.name, &mut b, off, b"INDX")?;
        if le64(&b, 0x10) != vcn {
            return Err(vol.corrupt(
                off + 0x10,
                format!("index block at VCN {vcn} says VCN {}", le64(&b, 0x10)),
            ));
        }
        let e = Arc::new(entries(vol, &b, 0x18, off)?);
        cache.put(self.no, vcn, e.clone());
        Ok(e)
    }

    /// Every entry whose name equals `name` ignoring case (by `$UpCase`),
    /// found by descending the tree.
    pub fn find(
        &self,
        vol: &Vol,
        cache: &dyn Blocks,
        up: &Upcase,
        name: &[u16],
    ) -> GuestResult<Vec<Entry>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        self.find_in(vol, cache, up, name, &self.root, 0, &mut seen, &mut out)?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn find_in(
        &self,
        vol: &Vol,
        cache: &dyn Blocks,
        up: &Upcase,
        name: &[u16],
        node: &[Entry],
        depth: usize,
        seen: &mut HashSet<u64>,
        out: &mut Vec<Entry>,
    ) -> GuestResult<()> {
        for e in node {
            let ord = if e.last {
                Ordering::Less
            } else {
                up.cmp(name, &e.name)
            };
            if ord != Ordering::Greater {
                if let Some(vcn) = e.child {
                    let b = self.descend(vol, cache, vcn, depth, seen)?;
                    self.find_in(vol, cache, up, name, &b, depth + 1, seen, out)?;
                }
            }
            match ord {
                Ordering::Less => return Ok(()),
                Ordering::Equal => out.push(e.clone()),
                Ordering::Greater => {}
            }
        }
        Ok(())
    }

    /// The block below an entry, checked against loops and depth.
    fn descend(
        &self,
        vol: &Vol,
        cache: &dyn Blocks,
        vcn: u64,
        depth: usize,
        seen: &mut HashSet<u64>,
    ) -> GuestResult<Arc<Vec<Entry>>> {
        if depth >= MAX_DEPTH || !seen.insert(vcn) {
            return Err(vol.corrupt(
                self.at,
                format!(
                    "directory {}: index block {vcn} reached twice or too deep",
                    self.no
                ),
            ));
        }
        self.block(vol, cache, vcn)
    }

    /// Every entry in index order.
    pub fn list(&self, vol: &Vol, cache: &dyn Blocks) -> GuestResult<Vec<Entry>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        self.list_in(vol, cache, &self.root, 0, &mut seen, &mut out)?;
        Ok(out)
    }

    fn list_in(
        &self,
        vol: &Vol,
        cache: &dyn Blocks,
        node: &[Entry],
        depth: usize,
        seen: &mut HashSet<u64>,
        out: &mut Vec<Entry>,
    ) -> GuestResult<()> {
        for e in node {
            if let Some(vcn) = e.child {
                let b = self.descend(vol, cache, vcn, depth, seen)?;
                self.list_in(vol, cache, &b, depth + 1, seen, out)?;
            }
            if !e.last {
                out.push(e.clone());
            }
        }
        Ok(())
    }
}

/// The volume offset of byte `pos` of a non-resident value (for errors).
fn volume_offset(vol: &Vol, s: &Stream, pos: u64) -> u64 {
    match &s.data {
        super::node::Data::NonResident { map, .. } => {
            let cs = vol.boot.cluster;
            map.find(pos / cs)
                .and_then(|r| r.lcn.map(|l| (l + pos / cs - r.vcn) * cs + pos % cs))
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// Whether an entry names a file this directory shows (see the module
/// docs of `ntfs`): not a DOS-only name, not the root's self entry, not a
/// metafile.
pub fn shown(e: &Entry) -> bool {
    e.namespace != NS_DOS && is_file(e)
}

/// Whether an entry names a user file at all (any namespace): not the
/// root's self entry, not a metafile.
pub fn is_file(e: &Entry) -> bool {
    mref_no(e.mref) >= 16 && !e.name.is_empty()
}
