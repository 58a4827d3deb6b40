//! Inode numbers of the mounted layout, derived from point ids so they
//! never need a table: the top-level files have fixed numbers, and point
//! `p` owns the eight numbers from `FIRST_POINT + p * 8`.

pub const ROOT: u64 = 1;
pub const TREE: u64 = 2;
pub const STATUS: u64 = 3;
pub const MERGE_NOW: u64 = 4;
const FIRST_POINT: u64 = 16;

/// The files each snapshot point directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointFile {
    Dir,
    Disk,
    Info,
    Ctl,
    Parent,
    /// `memory.raw`, when the point has a memory checkpoint.
    Memory,
}

impl PointFile {
    const ALL: [PointFile; 6] = [
        PointFile::Dir,
        PointFile::Disk,
        PointFile::Info,
        PointFile::Ctl,
        PointFile::Parent,
        PointFile::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PointFile::Dir => ".",
            PointFile::Disk => "disk.raw",
            PointFile::Info => "info.json",
            PointFile::Ctl => "ctl",
            PointFile::Parent => "parent",
            PointFile::Memory => "memory.raw",
        }
    }

    pub fn from_name(name: &str) -> Option<PointFile> {
        PointFile::ALL
            .into_iter()
            .skip(1)
            .find(|f| f.name() == name)
    }

    /// The entries of a point directory, in listing order.
    pub fn entries() -> &'static [PointFile] {
        &PointFile::ALL[1..]
    }
}

/// What an inode number stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inode {
    Root,
    Tree,
    Status,
    MergeNow,
    Point(u64, PointFile),
}

pub fn encode(i: Inode) -> u64 {
    match i {
        Inode::Root => ROOT,
        Inode::Tree => TREE,
        Inode::Status => STATUS,
        Inode::MergeNow => MERGE_NOW,
        Inode::Point(p, f) => {
            FIRST_POINT + p * 8 + PointFile::ALL.iter().position(|x| *x == f).unwrap_or(0) as u64
        }
    }
}

pub fn decode(ino: u64) -> Option<Inode> {
    match ino {
        ROOT => Some(Inode::Root),
        TREE => Some(Inode::Tree),
        STATUS => Some(Inode::Status),
        MERGE_NOW => Some(Inode::MergeNow),
        n if n >= FIRST_POINT => {
            let p = (n - FIRST_POINT) / 8;
            let f = *PointFile::ALL.get(((n - FIRST_POINT) % 8) as usize)?;
            Some(Inode::Point(p, f))
        }
        _ => None,
    }
}
