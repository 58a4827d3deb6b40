//! The mounted layout, declared once as data: the entries at the root of
//! the mount ([`ROOT_ENTRIES`], then one directory per visible snapshot
//! point, [`POINT_DIR`]) and the entries of each point directory
//! ([`POINT_ENTRIES`]): name, kind, owner and mode, size, and when each is
//! present. `lookup`, `readdir` and `getattr` derive from these tables, so
//! a new per-point view is one [`PointEntry`] plus the handler of its
//! [`Contents`]. Inode numbers come from `inodes`, owners and modes from
//! `modes`.
//!
//! The root entries' names are reserved: the tree refuses them as point
//! names ([`reserved_names`] reaches it through `TreeOptions`).

use super::attrs::{attr, epoch};
use super::inodes::{encode, Inode, PointFile};
use super::{guest, memory_files, modes, SnapFs};
use crate::ownership::Ownership;
use crate::tree::{DiskView, PointDisk};
use fuser::{Errno, FileAttr, FileType};

/// One listed directory entry: inode number, kind, name.
pub(super) type Listed = (u64, FileType, String);

/// A file at the root of the mount, besides the point directories.
pub(super) struct RootEntry {
    pub name: &'static str,
    pub inode: Inode,
    pub kind: FileType,
    pub mode: fn(&SnapFs) -> Ownership,
    pub size: fn(&SnapFs) -> u64,
}

/// The mount's own files at its root, in inode order.
pub(super) static ROOT_ENTRIES: &[RootEntry] = &[
    RootEntry {
        name: "tree",
        inode: Inode::Tree,
        kind: FileType::RegularFile,
        mode: |fs| modes::text(fs.owners.tree_dir()),
        size: |fs| text_len(fs, Inode::Tree),
    },
    RootEntry {
        name: "status",
        inode: Inode::Status,
        kind: FileType::RegularFile,
        mode: |fs| modes::text(fs.owners.tree_dir()),
        size: |fs| text_len(fs, Inode::Status),
    },
    RootEntry {
        name: "merge-now",
        inode: Inode::MergeNow,
        kind: FileType::RegularFile,
        mode: |fs| modes::control(fs.owners.tree_dir(), fs.tree.read_only()),
        size: |_| 0,
    },
];

/// The names no snapshot point may take: those of [`ROOT_ENTRIES`].
pub fn reserved_names() -> Vec<String> {
    ROOT_ENTRIES.iter().map(|e| e.name.to_string()).collect()
}

/// How the entries of one [`PointEntry`] are named.
pub(super) enum Names {
    /// One entry of this name.
    Fixed(&'static str),
    /// One entry per disk of the snapshot point, [`disk_file`], whose
    /// inode is that disk's.
    PerDisk,
    /// Named after the point (its directory, at the root).
    Point,
}

/// The handler of a directory entry whose contents are not a table (a
/// point's `memory/`): `None` when the point has none now. The entries
/// it finds have inode numbers of their own (`Inode::MemoryBlock`), whose
/// attributes `getattr_of` asks the handler's module for.
pub(super) struct Contents {
    pub lookup: fn(&SnapFs, u64, &str) -> Option<Inode>,
    pub list: fn(&SnapFs, u64) -> Option<Vec<Listed>>,
}

/// An entry of a snapshot point's directory (or the directory itself).
/// Its functions get the point the inode belongs to (for a disk, that
/// disk's own point).
pub(super) struct PointEntry {
    pub names: Names,
    /// Its inode slot within the point's numbers.
    pub file: PointFile,
    pub kind: FileType,
    /// Owner and mode; `None` if the entry went away meanwhile.
    pub mode: fn(&SnapFs, &DiskView) -> Option<Ownership>,
    /// Size in bytes; `None` if the entry went away meanwhile.
    pub size: fn(&SnapFs, &DiskView) -> Option<u64>,
    /// Whether visible point `p` has the entry now.
    pub present: fn(&SnapFs, u64) -> bool,
    /// For a directory that is not a point's: its handler.
    pub contents: Option<Contents>,
}

/// The file name of `disk` in its snapshot point's directory.
pub fn disk_file(disk: &PointDisk) -> String {
    format!("{}.raw", disk.disk.as_deref().unwrap_or("disk"))
}

/// The file name of a point's memory.
pub const MEMORY_FILE: &str = "memory.raw";

/// A snapshot point's directory, listed at the root.
pub(super) static POINT_DIR: PointEntry = PointEntry {
    names: Names::Point,
    file: PointFile::Dir,
    kind: FileType::Directory,
    mode: |fs, _| Some(modes::directory(fs.owners.tree_dir())),
    size: |_, _| Some(0),
    present: |_, _| true,
    contents: None,
};

/// The entries of a snapshot point's directory. A lookup takes the first
/// that matches, so a disk called `memory` hides `memory.raw`.
pub(super) static POINT_ENTRIES: &[PointEntry] = &[
    PointEntry {
        names: Names::PerDisk,
        file: PointFile::Disk,
        kind: FileType::RegularFile,
        mode: |fs, v| Some(disk_mode(fs, v)),
        size: |_, v| Some(v.point.io.read().chain.size()),
        present: |_, _| true,
        contents: None,
    },
    PointEntry {
        names: Names::Fixed("info.json"),
        file: PointFile::Info,
        kind: FileType::RegularFile,
        mode: |fs, v| Some(modes::info(disk_mode(fs, v))),
        size: |fs, v| Some(text_len(fs, Inode::Point(v.point.id, PointFile::Info))),
        present: |_, _| true,
        contents: None,
    },
    PointEntry {
        names: Names::Fixed("ctl"),
        file: PointFile::Ctl,
        kind: FileType::RegularFile,
        mode: |fs, _| Some(modes::control(fs.owners.tree_dir(), fs.tree.read_only())),
        size: |_, _| Some(0),
        present: |_, _| true,
        contents: None,
    },
    PointEntry {
        names: Names::Fixed("parent"),
        file: PointFile::Parent,
        kind: FileType::Symlink,
        mode: |fs, _| Some(modes::link(fs.owners.tree_dir())),
        // The target is `../NAME`.
        size: |fs, v| Some(fs.visible_parent(v.point.id)?.len() as u64 + 3),
        present: |fs, p| fs.visible_parent(p).is_some(),
        contents: None,
    },
    PointEntry {
        names: Names::Fixed(MEMORY_FILE),
        file: PointFile::Memory,
        kind: FileType::RegularFile,
        mode: |fs, v| Some(modes::memory(fs.owners.of(&fs.memory_of(v.point.id)?.path))),
        size: |fs, v| Some(fs.memory_of(v.point.id)?.chain.size()),
        present: |fs, p| fs.memory_of(p).is_some(),
        contents: None,
    },
    PointEntry {
        names: Names::Fixed("memory"),
        file: PointFile::MemoryDir,
        kind: FileType::Directory,
        mode: |fs, v| {
            let m = fs.memory_blocks_of(v.point.id)?;
            Some(modes::memory_dir(fs.owners.of(&m.path)))
        },
        size: |_, _| Some(0),
        present: |fs, p| fs.memory_blocks_of(p).is_some(),
        contents: Some(Contents {
            lookup: memory_files::lookup_block,
            list: memory_files::list_blocks,
        }),
    },
    PointEntry {
        names: Names::Fixed("files"),
        file: PointFile::Files,
        kind: FileType::Symlink,
        mode: |fs, _| Some(modes::link(fs.owners.tree_dir())),
        size: |fs, v| Some(fs.files_target(v.point.id)?.len() as u64),
        present: |fs, p| fs.files_target(p).is_some(),
        contents: None,
    },
    PointEntry {
        names: Names::Fixed("fs"),
        file: PointFile::FsDir,
        kind: FileType::Directory,
        mode: |fs, v| Some(modes::guest_dir(fs.disks_mode(v.point.id, None)?)),
        size: |_, _| Some(0),
        present: |_, _| true,
        contents: Some(Contents {
            lookup: guest::lookup_fs,
            list: guest::list_fs,
        }),
    },
    PointEntry {
        names: Names::Fixed("volumes"),
        file: PointFile::VolumesDir,
        kind: FileType::Directory,
        mode: |fs, v| Some(modes::guest_dir(fs.disks_mode(v.point.id, None)?)),
        size: |_, _| Some(0),
        present: |_, _| true,
        contents: Some(Contents {
            lookup: guest::lookup_volumes,
            list: guest::list_volumes,
        }),
    },
];

/// Owner and mode of a disk, writable when its image is and the mount is.
pub(super) fn disk_mode(fs: &SnapFs, v: &DiskView) -> Ownership {
    let io = v.point.io.read();
    modes::disk(fs.owners.of(&io.image), io.writable && !fs.tree.read_only())
}

/// The length of a dynamic file's text, rendered now.
fn text_len(fs: &SnapFs, ino: Inode) -> u64 {
    fs.text(ino).map_or(0, |t| t.len() as u64)
}

/// The table entry of inode slot `f`.
fn point_entry(f: PointFile) -> Option<&'static PointEntry> {
    std::iter::once(&POINT_DIR)
        .chain(POINT_ENTRIES)
        .find(|e| e.file == f)
}

impl SnapFs {
    /// The attributes of `ino`, from the tables.
    pub(super) fn getattr_of(&self, ino: Inode) -> Result<FileAttr, Errno> {
        let t0 = self.mounted_at;
        match ino {
            Inode::Root => Ok(attr(
                ino,
                FileType::Directory,
                modes::directory(self.owners.tree_dir()),
                0,
                t0,
            )),
            Inode::MemoryBlock(p, i) => self.memory_block_attr(p, i),
            Inode::Volume(p, i) => self.volume_attr(p, i).ok_or(Errno::ENOENT),
            Inode::Guest(s, g) => self.guest_getattr(s, g).map(|a| a.0),
            Inode::Point(p, f) => {
                let e = point_entry(f).ok_or(Errno::ENOENT)?;
                let v = self
                    .tree
                    .view(p)
                    .filter(|v| !v.hidden)
                    .ok_or(Errno::ENOENT)?;
                if !(e.present)(self, p) {
                    return Err(Errno::ENOENT);
                }
                let own = (e.mode)(self, &v).ok_or(Errno::ENOENT)?;
                let size = (e.size)(self, &v).ok_or(Errno::ENOENT)?;
                Ok(attr(ino, e.kind, own, size, epoch(v.point.created)))
            }
            _ => {
                let e = ROOT_ENTRIES.iter().find(|e| e.inode == ino);
                let e = e.ok_or(Errno::ENOENT)?;
                Ok(attr(ino, e.kind, (e.mode)(self), (e.size)(self), t0))
            }
        }
    }

    /// The entry called `name` in directory `parent`.
    pub(super) fn lookup_in(&self, parent: Inode, name: &str) -> Option<Inode> {
        match parent {
            Inode::Root => ROOT_ENTRIES
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.inode)
                .or_else(|| {
                    let p = self.tree.lookup(name)?;
                    Some(Inode::Point(p.id, POINT_DIR.file))
                }),
            Inode::Point(p, PointFile::Dir) => POINT_ENTRIES
                .iter()
                .find_map(|e| self.point_entry_named(e, p, name)),
            Inode::Point(p, f) => {
                let contents = point_entry(f)?.contents.as_ref()?;
                (contents.lookup)(self, p, name)
            }
            _ => None,
        }
    }

    /// The inode of entry `e` of point `p` if it is called `name` there.
    fn point_entry_named(&self, e: &PointEntry, p: u64, name: &str) -> Option<Inode> {
        match e.names {
            Names::Fixed(n) => {
                (n == name && (e.present)(self, p)).then_some(Inode::Point(p, e.file))
            }
            Names::PerDisk => {
                let members = self.tree.members(p);
                let m = members.into_iter().find(|m| disk_file(m) == name)?;
                Some(Inode::Point(m.id, e.file))
            }
            Names::Point => None,
        }
    }

    /// The entries of directory `dir` other than `.` and `..`, in no
    /// particular order.
    pub(super) fn list(&self, dir: Inode) -> Result<Vec<Listed>, Errno> {
        let mut out = Vec::new();
        match dir {
            Inode::Root => {
                for e in ROOT_ENTRIES {
                    out.push((encode(e.inode), e.kind, e.name.to_string()));
                }
                let mut points = self.tree.visible();
                points.sort_by_key(|p| p.id);
                for p in points {
                    let ino = encode(Inode::Point(p.id, POINT_DIR.file));
                    out.push((ino, POINT_DIR.kind, p.name.clone()));
                }
            }
            Inode::Point(p, PointFile::Dir) => {
                if self.tree.view(p).is_none_or(|v| v.hidden) {
                    // A point deleted since the kernel looked it up.
                    return Err(Errno::ENOENT);
                }
                for e in POINT_ENTRIES.iter().filter(|e| (e.present)(self, p)) {
                    match e.names {
                        Names::Fixed(n) => {
                            out.push((encode(Inode::Point(p, e.file)), e.kind, n.into()))
                        }
                        Names::PerDisk => {
                            for m in self.tree.members(p) {
                                let ino = encode(Inode::Point(m.id, e.file));
                                out.push((ino, e.kind, disk_file(&m)));
                            }
                        }
                        Names::Point => {}
                    }
                }
            }
            Inode::Point(p, f) => {
                let e = point_entry(f).ok_or(Errno::ENOTDIR)?;
                let contents = e.contents.as_ref().ok_or(Errno::ENOTDIR)?;
                return (contents.list)(self, p).ok_or(Errno::ENOENT);
            }
            _ => return Err(Errno::ENOTDIR),
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_files_are_reserved_names() {
        assert_eq!(reserved_names(), ["tree", "status", "merge-now"]);
    }

    #[test]
    fn every_point_slot_has_one_entry() {
        let slots: Vec<PointFile> = std::iter::once(&POINT_DIR)
            .chain(POINT_ENTRIES)
            .map(|e| e.file)
            .collect();
        for (i, f) in slots.iter().enumerate() {
            assert!(!slots[i + 1..].contains(f), "{f:?} twice");
            // Each slot has its own inode number within a point.
            assert_eq!(
                super::super::inodes::decode(encode(Inode::Point(3, *f))),
                Some(Inode::Point(3, *f))
            );
        }
    }
}
