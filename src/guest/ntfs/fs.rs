//! [`GuestFs`] over an open NTFS volume: inodes are MFT record numbers,
//! parsed files, directory indexes and index blocks are kept in bounded
//! LRUs, and every answer is shaped as `meta` decides (see the module docs
//! of `ntfs` for what a user sees and why).

use super::index::{self, Blocks, Dir, Entry};
use super::meta::{self, Shape, Target};
use super::mft::Vol;
use super::node::{self, mref_no, Data, Node};
use super::record::{AT_FILE_NAME, AT_INDEX_ALLOCATION, AT_INDEX_ROOT};
use super::upcase::Upcase;
use super::{boot, volume, ROOT};
use crate::guest::{Attr, DirEntry, FileKind, FsInfo, GuestError, GuestFs, GuestResult, ReadBytes};
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::Arc;

const NODES: usize = 8192;
const DIRS: usize = 1024;
const BLOCKS: usize = 4096;
/// Deeper than any real path (for a junction's own depth).
const MAX_PATH_DEPTH: usize = 256;

type Lru<K, V> = Mutex<LruCache<K, V>>;

fn lru<K: std::hash::Hash + Eq, V>(n: usize) -> Lru<K, V> {
    Mutex::new(LruCache::new(NonZeroUsize::new(n).unwrap()))
}

pub struct NtfsFs {
    vol: Vol,
    up: Upcase,
    label: Option<String>,
    notes: Vec<String>,
    /// A log not replayed or the dirty flag (see `volume::state`).
    unclean: bool,
    serial: u64,
    nodes: Lru<u64, Arc<Node>>,
    dirs: Lru<u64, Arc<Dir>>,
    blocks: Lru<(u64, u64), Arc<Vec<Entry>>>,
}

impl Blocks for NtfsFs {
    fn get(&self, dir: u64, vcn: u64) -> Option<Arc<Vec<Entry>>> {
        self.blocks.lock().get(&(dir, vcn)).cloned()
    }

    fn put(&self, dir: u64, vcn: u64, e: Arc<Vec<Entry>>) {
        self.blocks.lock().put((dir, vcn), e);
    }
}

impl NtfsFs {
    pub fn open(name: &str, bytes: Arc<dyn ReadBytes>) -> GuestResult<NtfsFs> {
        let mut b = [0u8; 512];
        bytes
            .read_exact_at(&mut b, 0)
            .map_err(|e| GuestError::io(name, 0, 512, e))?;
        let boot = boot::parse(name, &b, bytes.size())?;
        let serial = boot.serial;
        let mut vol = Vol::new(name, bytes, boot);
        volume::locate_mft(&mut vol)?;
        let up = volume::upcase(&vol)?;
        let volume::State {
            label,
            notes,
            unclean,
        } = volume::state(&vol)?;
        let fs = NtfsFs {
            vol,
            up,
            label,
            notes,
            unclean,
            serial,
            nodes: lru(NODES),
            dirs: lru(DIRS),
            blocks: lru(BLOCKS),
        };
        fs.dir(ROOT)?;
        Ok(fs)
    }

    /// File `ino` (a base record in use).
    fn node(&self, ino: u64) -> GuestResult<Arc<Node>> {
        if let Some(n) = self.nodes.lock().get(&ino) {
            return Ok(n.clone());
        }
        if ino >> 48 != 0 {
            return Err(GuestError::NotFound);
        }
        let n = Arc::new(node::load(&self.vol, ino)?);
        self.nodes.lock().put(ino, n.clone());
        Ok(n)
    }

    fn dir(&self, ino: u64) -> GuestResult<Arc<Dir>> {
        if let Some(d) = self.dirs.lock().get(&ino) {
            return Ok(d.clone());
        }
        let n = self.node(ino)?;
        if !n.is_dir || self.shape(&n)?.kind != FileKind::Dir {
            return Err(GuestError::NotDir);
        }
        let d = Arc::new(Dir::open(&self.vol, &n)?);
        self.dirs.lock().put(ino, d.clone());
        Ok(d)
    }

    fn shape(&self, n: &Node) -> GuestResult<Shape> {
        meta::shape(&self.vol, n)
    }

    /// The entry spelled exactly `name` in directory `dir`, if shown; else
    /// a DOS (8.3) name spelled exactly so: listings hide those, but
    /// ntfs-3g resolves them, and so do we.
    fn find(&self, dir: u64, name: &[u16]) -> GuestResult<Option<Entry>> {
        let d = self.dir(dir)?;
        let all = d.find(&self.vol, self, &self.up, name)?;
        let exact = |e: &&Entry| e.name == name;
        let dos = |e: &&Entry| e.namespace == index::NS_DOS && index::is_file(e);
        let hit = all.iter().filter(exact).find(|e| index::shown(e));
        let hit = hit.or_else(|| all.iter().filter(exact).find(dos));
        Ok(hit.cloned())
    }

    /// The kind a listing shows for `e`, as ntfs-3g decides it: from the
    /// key's attributes, opening the file only for reparse/system ones.
    fn entry_kind(&self, e: &Entry) -> GuestResult<FileKind> {
        if e.file_attrs & (meta::FILE_ATTR_REPARSE_POINT | meta::FILE_ATTR_SYSTEM) != 0 {
            let n = self.node(mref_no(e.mref))?;
            return Ok(self.shape(&n)?.kind);
        }
        Ok(if e.file_attrs & meta::FILE_ATTR_I30_INDEX_PRESENT != 0 {
            FileKind::Dir
        } else {
            FileKind::File
        })
    }

    /// Number of directories between the root and `n` (via the first
    /// shown name of each).
    fn depth(&self, n: &Node) -> GuestResult<usize> {
        let mut cur = n.no;
        for depth in 0..MAX_PATH_DEPTH {
            let node = self.node(cur)?;
            let parent = node
                .streams
                .iter()
                .filter(|s| s.ty == AT_FILE_NAME)
                .filter_map(|s| s.resident())
                .find(|v| v.len() >= 0x42 && v[0x41] != index::NS_DOS)
                .map(|v| mref_no(u64::from_le_bytes(v[0..8].try_into().unwrap())));
            match parent {
                Some(ROOT) => return Ok(depth),
                Some(p) => cur = p,
                None => break,
            }
        }
        Err(self
            .vol
            .corrupt(n.offset, format!("record {}: no path to the root", n.no)))
    }

    /// An absolute Windows path as the names stored on this volume, if
    /// every component exists (matched ignoring case, as ntfs-3g).
    fn resolve(&self, path: &[String]) -> GuestResult<Option<Vec<String>>> {
        let mut cur = ROOT;
        let mut out = Vec::new();
        for c in path {
            let name: Vec<u16> = c.encode_utf16().collect();
            let d = match self.dir(cur) {
                Ok(d) => d,
                Err(GuestError::NotDir) => return Ok(None),
                Err(e) => return Err(e),
            };
            let all = d.find(&self.vol, self, &self.up, &name)?;
            let shown: Vec<&Entry> = all.iter().filter(|e| index::shown(e)).collect();
            let Some(e) = shown.iter().find(|e| e.name == name).or(shown.first()) else {
                return Ok(None);
            };
            out.push(String::from_utf16_lossy(&e.name));
            cur = mref_no(e.mref);
        }
        Ok(Some(out))
    }

    fn target(&self, n: &Node, t: &Target) -> GuestResult<Vec<u8>> {
        match t {
            Target::Literal(b) => Ok(b.clone()),
            Target::Absolute { drive, path } => {
                let up = "../".repeat(self.depth(n)?);
                let s = match self.resolve(path)? {
                    Some(p) => format!("{up}{}", p.join("/")),
                    None => {
                        let d = drive.map(|d| format!("{d}:/")).unwrap_or_default();
                        format!("{up}.NTFS-3G/{d}{}", path.join("/"))
                    }
                };
                Ok(s.into_bytes())
            }
        }
    }

    /// Bytes allocated to a stream on the volume.
    fn allocated(&self, n: &Node) -> u64 {
        let cs = self.vol.boot.cluster;
        let s = if n.is_dir {
            n.stream(AT_INDEX_ALLOCATION, &i30())
        } else {
            n.data()
        };
        match s.map(|s| &s.data) {
            Some(Data::NonResident { map, .. }) => map
                .runs
                .iter()
                .filter(|r| r.lcn.is_some())
                .map(|r| r.len * cs)
                .sum(),
            Some(Data::Resident(v)) => (v.len() as u64).next_multiple_of(8),
            None => 0,
        }
    }

    /// Data extents of `n`'s unnamed stream in bytes, merged; compressed
    /// units count whole.
    fn data_extents(&self, n: &Node) -> Vec<(u64, u64)> {
        let cs = self.vol.boot.cluster;
        let Some(s) = n.data() else { return Vec::new() };
        let size = s.size();
        let Data::NonResident { map, cu, .. } = &s.data else {
            return vec![(0, size)];
        };
        // `node::join` refuses units over 2^16 clusters.
        let unit = 1u64 << cu;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in map.runs.iter().filter(|r| r.lcn.is_some()) {
            let (a, b) = (r.vcn / unit * unit, (r.vcn + r.len).div_ceil(unit) * unit);
            let (a, b) = (
                a.saturating_mul(cs).min(size),
                b.saturating_mul(cs).min(size),
            );
            match out.last_mut() {
                Some(l) if l.1 >= a => l.1 = l.1.max(b),
                _ if a < b => out.push((a, b)),
                _ => {}
            }
        }
        out
    }
}

fn i30() -> Vec<u16> {
    "$I30".encode_utf16().collect()
}

impl GuestFs for NtfsFs {
    fn root(&self) -> u64 {
        ROOT
    }

    fn info(&self) -> FsInfo {
        FsInfo {
            fstype: "ntfs".into(),
            label: self.label.clone(),
            uuid: Some(format!("{:016X}", self.serial)),
            notes: self.notes.clone(),
            unclean: self.unclean,
        }
    }

    fn getattr(&self, ino: u64) -> GuestResult<Attr> {
        let n = self.node(ino)?;
        let sh = self.shape(&n)?;
        let size = match sh.kind {
            FileKind::Symlink => self.readlink(ino)?.len() as u64,
            FileKind::Dir => n
                .stream(AT_INDEX_ALLOCATION, &i30())
                .or_else(|| n.stream(AT_INDEX_ROOT, &i30()))
                .map_or(0, |s| s.size()),
            _ => n.data().map_or(0, |s| s.size()),
        };
        Ok(Attr {
            ino,
            kind: sh.kind,
            perm: 0o777,
            uid: 0,
            gid: 0,
            size,
            nlink: if sh.kind == FileKind::Dir {
                1
            } else {
                u32::from(n.link_count.max(1))
            },
            allocated: self.allocated(&n),
            atime: n.si.atime,
            mtime: n.si.mtime,
            ctime: n.si.ctime,
            crtime: n.si.crtime,
            rdev: sh.rdev,
        })
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> GuestResult<u64> {
        let Ok(s) = std::str::from_utf8(name) else {
            return Err(GuestError::NotFound);
        };
        let w: Vec<u16> = s.encode_utf16().collect();
        let e = self.find(dir, &w)?.ok_or(GuestError::NotFound)?;
        let no = mref_no(e.mref);
        let seq = (e.mref >> 48) as u16;
        let n = self.node(no)?;
        if seq != 0 && n.seq != seq {
            return Err(self.vol.corrupt(n.offset, format!("directory {dir}: entry {s:?} names record {no} sequence {seq}, the record has {}", n.seq)));
        }
        Ok(no)
    }

    fn readdir(&self, dir: u64) -> GuestResult<Vec<DirEntry>> {
        let d = self.dir(dir)?;
        let mut out = Vec::new();
        for e in d.list(&self.vol, self)? {
            if !index::shown(&e) {
                continue;
            }
            let Ok(name) = String::from_utf16(&e.name) else {
                continue;
            };
            if name.contains(['/', '\0']) {
                continue;
            }
            out.push(DirEntry {
                name: name.into_bytes(),
                ino: mref_no(e.mref),
                kind: self.entry_kind(&e)?,
            });
        }
        Ok(out)
    }

    fn read(&self, ino: u64, offset: u64, buf: &mut [u8]) -> GuestResult<usize> {
        let n = self.node(ino)?;
        match self.shape(&n)?.kind {
            FileKind::Dir => return Err(GuestError::IsDir),
            FileKind::File => {}
            _ => return Err(GuestError::Invalid),
        }
        match n.data() {
            Some(s) => super::data::read(&self.vol, s, offset, buf),
            None => Ok(0),
        }
    }

    fn readlink(&self, ino: u64) -> GuestResult<Vec<u8>> {
        let n = self.node(ino)?;
        match self.shape(&n)?.target {
            Some(t) => self.target(&n, &t),
            None => Err(GuestError::Invalid),
        }
    }

    fn listxattr(&self, ino: u64) -> GuestResult<Vec<Vec<u8>>> {
        let n = self.node(ino)?;
        let mut out: Vec<Vec<u8>> = meta::stream_names(&n)
            .into_iter()
            .map(|(s, _)| [b"user.".as_slice(), &s].concat())
            .collect();
        out.push(b"system.ntfs_attrib_be".to_vec());
        if meta::reparse(&n).is_some() {
            out.push(b"system.ntfs_reparse_data".to_vec());
        }
        Ok(out)
    }

    fn getxattr(&self, ino: u64, name: &[u8]) -> GuestResult<Vec<u8>> {
        let n = self.node(ino)?;
        if name == b"system.ntfs_attrib_be" {
            return Ok(meta::dos_attrs(&n).to_be_bytes().to_vec());
        }
        if name == b"system.ntfs_reparse_data" {
            return meta::reparse(&n)
                .map(|r| r.to_vec())
                .ok_or(GuestError::NotFound);
        }
        let stream = name.strip_prefix(b"user.").ok_or(GuestError::NotFound)?;
        let (_, i) = meta::stream_names(&n)
            .into_iter()
            .find(|(s, _)| s == stream)
            .ok_or(GuestError::NotFound)?;
        let s = &n.streams[i];
        if s.size() > 64 << 20 {
            return Err(GuestError::unsupported(
                &self.vol.name,
                format!("stream of {} bytes as an xattr", s.size()),
            ));
        }
        let mut v = vec![0u8; s.size() as usize];
        let got = super::data::read(&self.vol, s, 0, &mut v)?;
        v.truncate(got);
        Ok(v)
    }

    fn next_data(&self, ino: u64, offset: u64) -> GuestResult<Option<u64>> {
        let n = self.node(ino)?;
        Ok(self
            .data_extents(&n)
            .iter()
            .find(|e| e.1 > offset)
            .map(|e| e.0.max(offset)))
    }

    fn next_hole(&self, ino: u64, offset: u64) -> GuestResult<u64> {
        let n = self.node(ino)?;
        let size = n.data().map_or(0, |s| s.size());
        for (a, b) in self.data_extents(&n) {
            if offset < a {
                return Ok(offset);
            }
            if offset < b {
                return Ok(b.min(size).max(offset));
            }
        }
        Ok(offset.max(size).min(offset.max(size)))
    }
}
