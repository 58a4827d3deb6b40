//! The guest view of one snapshot point: the volumes found on its disks,
//! what each holds, and each browsable volume's filesystem, opened on
//! first use. This is what `volumes/`, `volumes/index.json`, `fs/` and
//! `files` show; the FUSE layer only names and serves it.

use super::probe::{probe, Probe};
use super::volumes::{scan, Volume, VolumeBytes};
use super::{ext, fat, ntfs, xfs, GuestError, GuestFs, ReadBytes};
use std::sync::{Arc, OnceLock};

/// One volume of a point, with what probing found and, once asked for,
/// its filesystem.
pub struct PointVolume {
    pub volume: Volume,
    /// Names of the disks, for `index.json`.
    pub disk_name: String,
    pub bytes: Option<Arc<dyn ReadBytes>>,
    pub probe: Probe,
    /// Why the volume cannot be browsed (`None`: it can, or may).
    pub not_browsable: Option<String>,
    /// Its root directory's inode, found when probing (`None`: not
    /// browsable, or a superblock that names none).
    root: Option<u64>,
    fs: OnceLock<Result<Arc<dyn GuestFs>, Arc<GuestError>>>,
}

/// The guest view of a point's disks (`disks`: name and bytes, in the
/// point's disk order).
pub struct PointGuest {
    pub volumes: Vec<PointVolume>,
    /// Damage found while scanning (a GPT header that does not check out,
    /// an EBR loop ...): shown in `index.json` (and counted in `status`).
    pub problems: Vec<String>,
    root: OnceLock<Option<usize>>,
}

/// The filesystems snaptree reads, by the type probing reports: how to
/// open one, and how to find its root directory's inode without opening
/// it (a constant but for XFS, whose superblock names it), so listing
/// `fs/` opens nothing.
fn reader_for(fstype: &str) -> Option<(ReaderFn, RootFn)> {
    match fstype {
        "ext2" | "ext3" | "ext4" => Some((ext::open, |_| Some(2))),
        "vfat" => Some((fat::open, |_| Some(1))),
        // MFT record 5 is the root directory.
        "ntfs" => Some((ntfs::open, |_| Some(5))),
        "xfs" => Some((xfs::open, xfs::root_ino)),
        _ => None,
    }
}

type RootFn = fn(&dyn ReadBytes) -> Option<u64>;

/// Volumes looked at for the guest's root (`files`), in order: a guest's
/// root is among its first few volumes, and each one looked at is opened.
const ROOT_CANDIDATES: usize = 16;

type ReaderFn = fn(&str, Arc<dyn ReadBytes>) -> super::GuestResult<Arc<dyn GuestFs>>;

impl PointGuest {
    /// Scans the disks for volumes and probes each (reads a few sectors
    /// per volume; filesystems are opened later, on first access).
    pub fn scan(disks: Vec<(String, Arc<dyn ReadBytes>)>) -> PointGuest {
        let found = scan(&disks);
        let all: Vec<Arc<dyn ReadBytes>> = disks.iter().map(|(_, b)| b.clone()).collect();
        let volumes = found
            .volumes
            .into_iter()
            .map(|volume| {
                let disk_name = disks
                    .get(volume.disk)
                    .map(|d| d.0.clone())
                    .unwrap_or_default();
                let bytes = volume
                    .unreadable
                    .is_none()
                    .then(|| Arc::new(VolumeBytes::new(&volume, &all)) as Arc<dyn ReadBytes>);
                let probe = bytes.as_deref().map(probe).unwrap_or_default();
                let not_browsable = why_not_browsable(&volume, &probe);
                let root = match (&bytes, probe.fstype.as_deref().and_then(reader_for)) {
                    (Some(b), Some((_, root))) => root(&**b),
                    _ => None,
                };
                PointVolume {
                    volume,
                    disk_name,
                    bytes,
                    probe,
                    not_browsable,
                    root,
                    fs: OnceLock::new(),
                }
            })
            .collect();
        PointGuest {
            volumes,
            problems: found.problems,
            root: OnceLock::new(),
        }
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<(usize, &PointVolume)> {
        self.volumes
            .iter()
            .enumerate()
            .find(|(_, v)| v.volume.name == name)
    }

    /// The filesystem of volume `i`, opened now if it was not yet.
    pub fn fs(&self, i: usize) -> Result<Arc<dyn GuestFs>, Arc<GuestError>> {
        let v = self.volumes.get(i).ok_or(Arc::new(GuestError::NotFound))?;
        v.fs.get_or_init(|| v.open_fs().map_err(Arc::new)).clone()
    }

    /// The volume holding the guest's root: the first browsable one with
    /// `etc/os-release` (Linux) or `Windows/System32` (Windows), among the
    /// first [`ROOT_CANDIDATES`] browsable ones. Found once per view.
    pub fn root_volume(&self) -> Option<usize> {
        *self.root.get_or_init(|| {
            (0..self.volumes.len())
                .filter(|&i| self.volumes[i].not_browsable.is_none())
                .take(ROOT_CANDIDATES)
                .find(|&i| {
                    self.fs(i).is_ok_and(|fs| {
                        has_path(&*fs, &[b"etc", b"os-release"])
                            || has_path(&*fs, &[b"Windows", b"System32"])
                    })
                })
        })
    }

    /// The root directory's inode of browsable volume `i`.
    pub fn root_ino(&self, i: usize) -> Option<u64> {
        let v = self.volumes.get(i)?;
        if !v.browsable() {
            return None;
        }
        v.root
    }

    /// What `status` says of this view, as counts only: `status` is open
    /// to whoever may read the tree directory, the guest's texts (volume
    /// names, labels, errors) only to whoever may read its disk, in
    /// `volumes/index.json`. `None` when nothing went wrong.
    pub fn status_line(&self) -> Option<String> {
        let failed = self
            .volumes
            .iter()
            .filter(|v| matches!(v.fs.get(), Some(Err(_))))
            .count();
        let notes: usize = self
            .volumes
            .iter()
            .filter_map(|v| match v.fs.get() {
                Some(Ok(fs)) => Some(fs.info().notes.len()),
                _ => None,
            })
            .sum();
        let problems = self.problems.len();
        let unclean = self
            .volumes
            .iter()
            .filter(|v| matches!(v.fs.get(), Some(Ok(fs)) if fs.info().unclean))
            .count();
        // Notes alone (a FAT's geometry, a journal replayed) are no reason
        // to look; they ride along when something else is. A volume served
        // without its log replayed is: its files are what a crash left.
        (failed + problems + unclean > 0).then(|| {
            format!(
                "{problems} scan problems, {failed} volumes that did not open, {unclean} volumes served unclean (log not replayed), {notes} notes (see volumes/index.json)"
            )
        })
    }

    /// `volumes/index.json`: per volume, where it lies and what it holds.
    pub fn index_json(&self) -> String {
        let vols: Vec<_> = self.volumes.iter().map(PointVolume::json).collect();
        let doc = serde_json::json!({ "volumes": vols, "problems": self.problems });
        let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
        s.push('\n');
        s
    }
}

impl PointVolume {
    fn open_fs(&self) -> super::GuestResult<Arc<dyn GuestFs>> {
        if let Some(why) = &self.not_browsable {
            return Err(GuestError::unsupported(&self.volume.name, why.clone()));
        }
        let bytes = self.bytes.clone().ok_or(GuestError::NotFound)?;
        let fstype = self.probe.fstype.as_deref().unwrap_or_default();
        let (open, _) = reader_for(fstype).ok_or(GuestError::NotFound)?;
        let root = self.root.ok_or(GuestError::NotFound)?;
        let fs = open(&self.volume.name, bytes)?;
        // `fs/` numbered the volume's root before opening it.
        if fs.root() != root {
            return Err(GuestError::corrupt(
                &self.volume.name,
                0,
                format!("root inode {} where {root} was expected", fs.root()),
            ));
        }
        Ok(fs)
    }

    /// The disks (positions in the point's disk order) the volume's bytes
    /// lie on.
    pub fn disks(&self) -> Vec<usize> {
        let mut d: Vec<usize> = self.volume.pieces.iter().map(|p| p.disk).collect();
        d.push(self.volume.disk);
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Whether `fs/` shows the volume: it has a filesystem snaptree reads
    /// and that filesystem opened (or has not been tried yet).
    pub fn browsable(&self) -> bool {
        self.not_browsable.is_none() && !matches!(self.fs.get(), Some(Err(_)))
    }

    fn json(&self) -> serde_json::Value {
        let v = &self.volume;
        let why = self.not_browsable.clone().or_else(|| match self.fs.get() {
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        });
        // Known once the filesystem was opened (`clean` is `null` before).
        let info = match self.fs.get() {
            Some(Ok(fs)) => Some(fs.info()),
            _ => None,
        };
        let clean = info.as_ref().map(|i| !i.unclean);
        let notes = info.map(|i| i.notes).unwrap_or_default();
        serde_json::json!({
            "name": v.name,
            "disk": self.disk_name,
            "source": v.source.as_str(),
            "ranges": v.pieces.iter().map(|p| serde_json::json!({
                "offset": p.offset, "length": p.len,
            })).collect::<Vec<_>>(),
            "size": v.size,
            "partition_type": v.part_type,
            "partition_type_name": v.part_type_name,
            "partition_name": v.part_name,
            "filesystem": self.probe.fstype,
            "label": self.probe.label,
            "uuid": self.probe.uuid,
            "browsable": why.is_none(),
            "why_not": why,
            "clean": clean,
            "notes": notes,
        })
    }
}

fn why_not_browsable(v: &Volume, p: &Probe) -> Option<String> {
    if let Some(why) = &v.unreadable {
        return Some(why.clone());
    }
    match p.fstype.as_deref() {
        None => Some("no filesystem recognised".into()),
        Some(t) if reader_for(t).is_some() => None,
        Some("crypto_LUKS") => Some("LUKS-encrypted: snaptree does not decrypt".into()),
        Some("BitLocker") => Some("BitLocker-encrypted: snaptree does not decrypt".into()),
        Some("swap") => Some("swap space holds no files".into()),
        Some("LVM2_member") => Some("LVM physical volume: see its logical volumes".into()),
        Some(t) => Some(format!(
            "snaptree does not read {t} volumes (it reads ext2/3/4, FAT, NTFS and XFS)"
        )),
    }
}

fn has_path(fs: &dyn GuestFs, path: &[&[u8]]) -> bool {
    let mut ino = fs.root();
    for name in path {
        match fs.lookup(ino, name) {
            Ok(i) => ino = i,
            Err(_) => return false,
        }
    }
    true
}
