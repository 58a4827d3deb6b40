//! The guest view of one snapshot point: the volumes found on its disks,
//! what each holds, and each browsable volume's filesystem, opened on
//! first use. This is what `volumes/`, `volumes/index.json`, `fs/` and
//! `files` show; the FUSE layer only names and serves it.

use super::probe::{probe, Probe};
use super::volumes::{scan, Volume, VolumeBytes};
use super::{ext, fat, GuestError, GuestFs, ReadBytes};
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
    fs: OnceLock<Result<Arc<dyn GuestFs>, Arc<GuestError>>>,
}

/// The guest view of a point's disks (`disks`: name and bytes, in the
/// point's disk order).
pub struct PointGuest {
    pub volumes: Vec<PointVolume>,
    /// Damage found while scanning (a GPT header that does not check out,
    /// an EBR loop ...): shown in `status` and `index.json`.
    pub problems: Vec<String>,
}

/// The filesystems snaptree reads, by the type probing reports.
fn reader_for(fstype: &str) -> Option<ReaderFn> {
    match fstype {
        "ext2" | "ext3" | "ext4" => Some(ext::open),
        "vfat" => Some(fat::open),
        _ => None,
    }
}

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
                PointVolume {
                    volume,
                    disk_name,
                    bytes,
                    probe,
                    not_browsable,
                    fs: OnceLock::new(),
                }
            })
            .collect();
        PointGuest {
            volumes,
            problems: found.problems,
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
    /// `etc/os-release` (Linux) or `Windows/System32` (Windows).
    pub fn root_volume(&self) -> Option<usize> {
        (0..self.volumes.len()).find(|&i| {
            self.volumes[i].not_browsable.is_none()
                && self.fs(i).is_ok_and(|fs| {
                    has_path(&*fs, &[b"etc", b"os-release"])
                        || has_path(&*fs, &[b"Windows", b"System32"])
                })
        })
    }

    /// What `status` says of this view: scan problems, volumes whose
    /// filesystem did not open, and the readers' notes.
    pub fn status_lines(&self) -> Vec<String> {
        let mut out = self.problems.clone();
        for v in &self.volumes {
            match v.fs.get() {
                Some(Err(e)) => out.push(format!("{}: not browsable: {e}", v.volume.name)),
                Some(Ok(fs)) => {
                    let notes = fs.info().notes;
                    out.extend(notes.into_iter().map(|n| format!("{}: {n}", v.volume.name)));
                }
                None => {}
            }
        }
        out
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
        let open = reader_for(fstype).ok_or(GuestError::NotFound)?;
        open(&self.volume.name, bytes)
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
        let mut notes = Vec::new();
        if let Some(Ok(fs)) = self.fs.get() {
            notes = fs.info().notes;
        }
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
        Some("swap") => Some("swap space holds no files".into()),
        Some("LVM2_member") => Some("LVM physical volume: see its logical volumes".into()),
        Some(t) => Some(format!("snaptree does not read {t} filesystems yet")),
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
