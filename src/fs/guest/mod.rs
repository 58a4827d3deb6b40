//! A point's guest views in the mounted layout: `files` (symlink to the
//! volume holding the guest's root), `fs/<vol>/` (each browsable volume's
//! files) and `volumes/` (each volume as `<vol>.raw`, and `index.json`).
//! Read-only everywhere, also on leaves. The parsing is `crate::guest`'s;
//! this module names, numbers and serves what it finds. See
//! ARCHITECTURE.md ("Guest files").

mod bytes;
mod serve;
mod views;

pub(super) use serve::{read_file, read_volume, seek_file, GuestListing};
pub(super) use views::GuestViews;

use super::attrs::epoch;
use super::inodes::{encode, Inode, MAX_VOLUMES};
use super::layout::Listed;
use super::SnapFs;
use crate::guest::{Attr, FileKind, GuestFs};
use crate::ownership::Ownership;
use fuser::{FileAttr, FileType, INodeNo};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// `volumes/index.json`'s slot among a point's volume numbers.
pub(super) const INDEX_SLOT: u64 = MAX_VOLUMES - 1;
pub(super) const INDEX_FILE: &str = "index.json";
/// The suffix of a volume's raw file in `volumes/`.
const RAW: &str = ".raw";

/// How long the kernel may cache guest entries and attributes: points
/// that cannot change keep them long (and the page cache); a leaf's are
/// checked again after a second.
pub(super) fn ttl(changes: bool) -> Duration {
    if changes {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3600)
    }
}

pub(super) fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

/// The mount's attributes of guest inode `a` in slot `slot`.
pub(super) fn guest_attr(slot: u64, a: &Attr) -> FileAttr {
    let t = |t: crate::guest::Timestamp| {
        let d = Duration::new(t.secs.unsigned_abs(), t.nsecs.min(999_999_999));
        if t.secs >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
        }
    };
    FileAttr {
        ino: INodeNo(encode(Inode::Guest(slot, a.ino))),
        size: a.size,
        blocks: a.allocated.div_ceil(512),
        atime: t(a.atime),
        mtime: t(a.mtime),
        ctime: t(a.ctime),
        crtime: t(a.crtime),
        kind: kind(a.kind),
        perm: a.perm & 0o7777,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        flags: 0,
        blksize: 4096,
    }
}

impl SnapFs {
    /// The filesystem behind slot `slot`, and whether it can change.
    /// `recheck`: first look whether a leaf's disk changed (lookup,
    /// opendir; see `views`).
    pub(super) fn guest_fs(&self, slot: u64, recheck: bool) -> Option<(Arc<dyn GuestFs>, bool)> {
        let (p, vol) = self.guest.slot_key(slot)?;
        let o = self.guest.get(&self.tree, p, recheck)?;
        let (i, _) = o.guest.volume(&vol)?;
        Some((o.guest.fs(i).ok()?, o.changes))
    }

    /// The target of point `p`'s `files` link: `fs/<vol>`.
    pub(super) fn files_target(&self, p: u64) -> Option<String> {
        let o = self.guest.get(&self.tree, p, false)?;
        let i = o.guest.root_volume()?;
        Some(format!("fs/{}", o.guest.volumes[i].volume.name))
    }

    /// The bytes of volume `i` of point `p`, as the view has them now.
    pub(super) fn volume_bytes(&self, p: u64, i: u64) -> Option<Arc<dyn crate::guest::ReadBytes>> {
        let o = self.guest.get(&self.tree, p, false)?;
        o.guest.volumes.get(i as usize)?.bytes.clone()
    }

    /// Owner and mode of what shows bytes of the point's disks `disks`
    /// (positions among its members; all of them if `None`): no more open
    /// than any of those disks.
    pub(super) fn disks_mode(&self, p: u64, disks: Option<&[usize]>) -> Option<Ownership> {
        let members = self.tree.members(p);
        let mut own: Option<Ownership> = None;
        for (k, m) in members.iter().enumerate() {
            if disks.is_some_and(|d| !d.contains(&k)) {
                continue;
            }
            let v = self.tree.view(m.id)?;
            let o = super::layout::disk_mode(self, &v);
            own = Some(own.map_or(o, |a| super::modes::both(a, o)));
        }
        own
    }

    /// `volumes/<vol>.raw` (volume `i`) or `volumes/index.json` of point
    /// `p`: its size from the view, its mode from the disks it shows.
    pub(super) fn volume_attr(&self, p: u64, i: u64) -> Option<FileAttr> {
        let o = self.guest.get(&self.tree, p, false)?;
        let (size, disks) = if i == INDEX_SLOT {
            (o.guest.index_json().len() as u64, None)
        } else {
            let vol = o.guest.volumes.get(i as usize)?;
            (vol.bytes.as_ref()?.size(), Some(vol.disks()))
        };
        let v = self.tree.view(p).filter(|v| !v.hidden)?;
        let own = super::modes::info(self.disks_mode(p, disks.as_deref())?);
        Some(super::attrs::attr(
            Inode::Volume(p, i),
            FileType::RegularFile,
            own,
            size,
            epoch(v.point.created),
        ))
    }
}

/// The root inode of browsable volume `i`, if the mount can number it
/// (see `inodes::guest_fits`).
fn numbered_root(g: &crate::guest::point::PointGuest, i: usize) -> Option<u64> {
    g.root_ino(i).filter(|r| super::inodes::guest_fits(*r))
}

/// `fs/`: the browsable volumes, by name.
pub(super) fn lookup_fs(fs: &SnapFs, p: u64, name: &str) -> Option<Inode> {
    let o = fs.guest.get(&fs.tree, p, true)?;
    let (i, _) = o.guest.volume(name)?;
    let root = numbered_root(&o.guest, i)?;
    Some(Inode::Guest(fs.guest.slot(p, name)?, root))
}

pub(super) fn list_fs(fs: &SnapFs, p: u64) -> Option<Vec<Listed>> {
    let o = fs.guest.get(&fs.tree, p, true)?;
    let mut out = Vec::new();
    for (i, v) in o.guest.volumes.iter().enumerate() {
        let Some(root) = numbered_root(&o.guest, i) else {
            continue;
        };
        let Some(slot) = fs.guest.slot(p, &v.volume.name) else {
            continue;
        };
        let ino = encode(Inode::Guest(slot, root));
        out.push((ino, FileType::Directory, v.volume.name.clone()));
    }
    Some(out)
}

/// `volumes/`: `<vol>.raw` for every volume that has bytes, `index.json`.
pub(super) fn lookup_volumes(fs: &SnapFs, p: u64, name: &str) -> Option<Inode> {
    if name == INDEX_FILE {
        return Some(Inode::Volume(p, INDEX_SLOT));
    }
    let o = fs.guest.get(&fs.tree, p, true)?;
    let (i, v) = o.guest.volume(name.strip_suffix(RAW)?)?;
    (v.bytes.is_some() && (i as u64) < INDEX_SLOT).then_some(Inode::Volume(p, i as u64))
}

pub(super) fn list_volumes(fs: &SnapFs, p: u64) -> Option<Vec<Listed>> {
    let o = fs.guest.get(&fs.tree, p, true)?;
    let mut out = vec![(
        encode(Inode::Volume(p, INDEX_SLOT)),
        FileType::RegularFile,
        INDEX_FILE.to_string(),
    )];
    for (i, v) in o.guest.volumes.iter().enumerate() {
        if v.bytes.is_some() && (i as u64) < INDEX_SLOT {
            let ino = encode(Inode::Volume(p, i as u64));
            out.push((
                ino,
                FileType::RegularFile,
                format!("{}{RAW}", v.volume.name),
            ));
        }
    }
    Some(out)
}
