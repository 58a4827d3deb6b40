//! Volume discovery: which byte ranges of a snapshot point's disks hold a
//! guest volume (a GPT or MBR partition, an LVM2 logical volume, or the
//! whole disk), under the names the guest itself would use (`p1`, `p5`,
//! `vg-lv`, `disk`). The `volumes/` directory and the filesystem readers sit
//! on top of this; nothing here looks inside a filesystem.
//!
//! Everything read from the disks is untrusted. A damaged table never
//! panics or loops: what can be salvaged is listed, and what is wrong goes
//! into [`Scan::problems`] with the disk, the byte offset and the reason.
//!
//! Names follow the guest: GPT entries keep their entry number (empty
//! entries leave gaps), MBR primaries are 1–4 and logical partitions count
//! from 5 in chain order. The extended partition itself (the container of
//! the logical ones) is not listed: its bytes are those of the logical
//! partitions and their EBRs. On points with several disks, partition and
//! whole-disk names get the disk name in front (`vda-p1`); LVs do not, as a
//! VG may span disks.

mod gpt;
mod lvm;
mod lvm_label;
mod lvm_text;
mod mbr;

use super::ReadBytes;
use std::io;
use std::sync::Arc;

/// Where a volume was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Gpt,
    Mbr,
    Lvm,
    Disk,
}

impl Source {
    /// `gpt`, `mbr`, `lvm` or `disk`, as `index.json` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Gpt => "gpt",
            Source::Mbr => "mbr",
            Source::Lvm => "lvm",
            Source::Disk => "disk",
        }
    }
}

/// A byte range `[offset, offset+len)` on disk number `disk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Piece {
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
}

/// One guest volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// `p1`, `vda-p1`, `disk`, `vg-lv` ...
    pub name: String,
    /// The disk it lies on (for an LV: the disk of its first extent, or of
    /// its first PV when it has none readable).
    pub disk: usize,
    pub source: Source,
    /// Its bytes, in order. Empty when [`Volume::unreadable`] is set.
    pub pieces: Vec<Piece>,
    /// The size the guest declares (partition length, LV extents). For a
    /// readable volume this is the sum of the pieces.
    pub size: u64,
    /// GPT type GUID (lowercase) or MBR type byte as `0x83`.
    pub part_type: Option<String>,
    /// A friendly name of the type where known: `linux filesystem`,
    /// `efi system`, `linux lvm` ...
    pub part_type_name: Option<String>,
    /// GPT partition name.
    pub part_name: Option<String>,
    /// Why this volume cannot be read as bytes at all (`thin LV: not
    /// supported`, `PV ... missing` ...).
    pub unreadable: Option<String>,
}

/// What [`scan`] found on a point's disks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub volumes: Vec<Volume>,
    /// Damage and oddities, each naming the disk or volume, e.g. `vda:
    /// primary GPT header corrupt (header CRC mismatch at offset 512);
    /// using the backup at offset 1073741312`.
    pub problems: Vec<String>,
}

/// Volumes listed per scan; past that a problem says how many were left
/// out. Real guests have a handful; this bounds the work and memory a
/// hostile table (8192 GPT entries, thousands of LVs) can cause.
pub const MAX_VOLUMES: usize = 256;
/// Longest volume name before a `~N` suffix; with one, names stay within
/// [`MAX_NAME`] bytes.
const MAX_BASE: usize = 190;
/// Longest volume name: each is a directory entry name.
pub const MAX_NAME: usize = 200;
/// Bytes of a disk name put in front of its volumes' names.
const MAX_PREFIX: usize = 64;
/// Problem lines kept per scan; the rest are counted in a last line.
const MAX_PROBLEMS: usize = 1000;

/// Finds every volume on `disks` (name, bytes). Never fails: what cannot be
/// read becomes a problem.
pub fn scan(disks: &[(String, Arc<dyn ReadBytes>)]) -> Scan {
    let mut scan = Scan::default();
    let several = disks.len() > 1;
    for (index, (disk_name, disk)) in disks.iter().enumerate() {
        let prefix = if several {
            format!("{}-", safe_name(disk_name, MAX_PREFIX))
        } else {
            String::new()
        };
        let found = partitions(disk_name, disk.as_ref(), index, &mut scan.problems);
        match found {
            Some(mut parts) => {
                for volume in &mut parts {
                    volume.name = format!("{prefix}{}", volume.name);
                }
                scan.volumes.extend(parts);
            }
            None => scan.volumes.push(whole_disk(&prefix, index, disk.size())),
        }
    }
    let mut left_out = scan.volumes.len().saturating_sub(MAX_VOLUMES);
    scan.volumes.truncate(MAX_VOLUMES);
    unique_names(&mut scan.volumes, &mut scan.problems);
    // Before LVM looks for PVs, so one PV's bytes are read once.
    same_bytes(&mut scan.volumes);
    let all: Vec<Arc<dyn ReadBytes>> = disks.iter().map(|(_, d)| d.clone()).collect();
    let room = MAX_VOLUMES - scan.volumes.len();
    let (lvs, more) = lvm::find(&scan.volumes, &all, room, &mut scan.problems);
    left_out += more;
    scan.volumes.extend(lvs);
    unique_names(&mut scan.volumes, &mut scan.problems);
    same_bytes(&mut scan.volumes);
    if left_out > 0 {
        scan.problems.push(format!(
            "{left_out} more volumes left out: at most {MAX_VOLUMES} are listed"
        ));
    }
    tidy_problems(&mut scan.problems);
    scan
}

/// Two VGs of the same name (a cloned disk attached twice) would give two
/// volumes one name: later ones get `~2`, `~3` ... and a problem says so.
/// A counter per name keeps this linear however many share one. Names are
/// also made safe as directory entries here (no `/`, NUL or control
/// characters, at most [`MAX_NAME`] bytes).
fn unique_names(volumes: &mut [Volume], problems: &mut Vec<String>) {
    let mut taken = std::collections::HashSet::new();
    let mut next: std::collections::HashMap<String, u64> = Default::default();
    for v in volumes {
        let base = safe_name(&v.name, MAX_BASE);
        if taken.insert(base.clone()) {
            v.name = base;
            continue;
        }
        let n = next.entry(base.clone()).or_insert(2);
        let name = loop {
            let candidate = format!("{base}~{n}");
            *n += 1;
            if !taken.contains(&candidate) {
                break candidate;
            }
        };
        taken.insert(name.clone());
        problems.push(format!(
            "{base}: name taken by another volume; listed as {name}"
        ));
        v.name = name;
    }
}

/// `name` with `/`, NUL and control characters replaced by `_` and cut to
/// at most `max` bytes (on a character boundary).
fn safe_name(name: &str, max: usize) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = if c == '/' || c.is_control() { '_' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Volumes whose pieces are those of an earlier volume (N GPT entries over
/// one byte range) are listed, but unreadable, naming the first: the same
/// bytes are then never opened (and cached) twice.
fn same_bytes(volumes: &mut [Volume]) {
    let mut first: std::collections::HashMap<Vec<Piece>, String> = Default::default();
    for v in volumes {
        if v.unreadable.is_some() || v.pieces.is_empty() {
            continue;
        }
        match first.get(&v.pieces) {
            Some(name) => {
                v.unreadable = Some(format!("same bytes as {name}"));
                v.pieces.clear();
            }
            None => {
                first.insert(v.pieces.clone(), v.name.clone());
            }
        }
    }
}

/// Guest text as a problem line may show it: control characters escaped,
/// at most 64 characters.
pub(crate) fn shown(text: &str) -> String {
    let mut out = escaped(text.chars().take(64));
    if text.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out
}

fn escaped(chars: impl Iterator<Item = char>) -> String {
    let mut out = String::new();
    for c in chars {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Escapes control characters left in any problem line and keeps at most
/// [`MAX_PROBLEMS`] lines.
fn tidy_problems(problems: &mut Vec<String>) {
    if problems.len() > MAX_PROBLEMS {
        let more = problems.len() - MAX_PROBLEMS;
        problems.truncate(MAX_PROBLEMS);
        problems.push(format!("{more} more problems not listed"));
    }
    for p in problems {
        if p.chars().any(char::is_control) {
            *p = escaped(p.chars());
        }
    }
}

/// The partitions of one disk, `None` if it has no partition table.
fn partitions(
    name: &str,
    disk: &dyn ReadBytes,
    index: usize,
    problems: &mut Vec<String>,
) -> Option<Vec<Volume>> {
    let mbr = mbr::read_sector0(name, disk, problems);
    let protective = mbr.as_ref().is_some_and(|m| m.has_protective());
    if let Some(parts) = gpt::read(name, disk, index, protective, problems) {
        return Some(parts);
    }
    let mbr = mbr?;
    let parts = mbr::partitions(name, disk, index, &mbr, problems);
    if parts.is_empty() && !protective {
        return None;
    }
    Some(parts)
}

fn whole_disk(prefix: &str, disk: usize, size: u64) -> Volume {
    Volume {
        name: format!("{prefix}disk"),
        disk,
        source: Source::Disk,
        pieces: vec![Piece {
            disk,
            offset: 0,
            len: size,
        }],
        size,
        part_type: None,
        part_type_name: None,
        part_name: None,
        unreadable: None,
    }
}

/// A partition volume of `[start, start+len)` on `disk`, clipped to the
/// disk's size (a problem says so when it had to be).
#[allow(clippy::too_many_arguments)]
fn partition(
    disk_name: &str,
    disk: usize,
    disk_size: u64,
    source: Source,
    number: u32,
    start: u64,
    len: u64,
    problems: &mut Vec<String>,
) -> Volume {
    let name = format!("p{number}");
    let mut unreadable = None;
    let mut pieces = Vec::new();
    if start >= disk_size {
        problems.push(format!(
            "{disk_name}: {name} starts at offset {start}, past the end of the disk ({disk_size} bytes)"
        ));
        unreadable = Some(format!("starts past the end of the disk (offset {start})"));
    } else {
        let end = start.saturating_add(len);
        let clipped = end.min(disk_size);
        if clipped < end {
            problems.push(format!(
                "{disk_name}: {name} ends at offset {end}, past the end of the disk ({disk_size} bytes); cut to the disk"
            ));
        }
        pieces.push(Piece {
            disk,
            offset: start,
            len: clipped - start,
        });
    }
    Volume {
        name,
        disk,
        source,
        pieces,
        size: len,
        part_type: None,
        part_type_name: None,
        part_name: None,
        unreadable,
    }
}

/// The bytes of one volume: its pieces read one after the other. Reads
/// never leave the pieces.
pub struct VolumeBytes {
    /// (disk, offset on the disk, length), with the volume offset each
    /// piece starts at.
    pieces: Vec<(u64, Piece)>,
    disks: Vec<Arc<dyn ReadBytes>>,
    size: u64,
}

impl VolumeBytes {
    /// `disks` is indexed by [`Piece::disk`]. Pieces naming a disk that is
    /// not there are dropped (the volume ends before them).
    pub fn new(volume: &Volume, disks: &[Arc<dyn ReadBytes>]) -> Self {
        let mut pieces = Vec::new();
        let mut at = 0u64;
        for piece in &volume.pieces {
            if piece.disk >= disks.len() || piece.len == 0 {
                if piece.disk >= disks.len() {
                    break;
                }
                continue;
            }
            pieces.push((at, *piece));
            at += piece.len;
        }
        VolumeBytes {
            pieces,
            disks: disks.to_vec(),
            size: at,
        }
    }
}

impl ReadBytes for VolumeBytes {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        super::check_range(self.size, buf.len(), offset)?;
        // The first piece that ends after `offset`.
        let mut index = self.pieces.partition_point(|(at, p)| at + p.len <= offset);
        let mut done = 0usize;
        let mut pos = offset;
        while done < buf.len() {
            let (at, piece) = self.pieces[index];
            let inside = pos - at;
            let take = ((piece.len - inside) as usize).min(buf.len() - done);
            self.disks[piece.disk]
                .read_exact_at(&mut buf[done..done + take], piece.offset + inside)?;
            done += take;
            pos += take as u64;
            index += 1;
        }
        Ok(())
    }
}

/// A PV UUID (32 characters as the label stores them) in LVM's dashed
/// form, as `pvs` and `blkid` print it.
pub fn pv_uuid(raw: &str) -> String {
    lvm_label::dashed(raw)
}

/// Little-endian integers at an offset of a buffer the caller sized.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(pieces: Vec<Piece>) -> Volume {
        let size = pieces.iter().map(|p| p.len).sum();
        Volume {
            name: "t".into(),
            disk: 0,
            source: Source::Lvm,
            pieces,
            size,
            part_type: None,
            part_type_name: None,
            part_name: None,
            unreadable: None,
        }
    }

    #[test]
    fn unique_names_number_repeats_past_names_already_taken() {
        let mut vs: Vec<Volume> = ["a", "a~3", "a", "a", "a", "b/c\0"]
            .iter()
            .map(|n| Volume {
                name: n.to_string(),
                ..vol(Vec::new())
            })
            .collect();
        vs.extend((0..3000).map(|_| Volume {
            name: "x".repeat(300),
            ..vol(Vec::new())
        }));
        let mut problems = Vec::new();
        unique_names(&mut vs, &mut problems);
        let names: Vec<&str> = vs.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names[..6], ["a", "a~3", "a~2", "a~4", "a~5", "b_c_"]);
        let base = "x".repeat(MAX_BASE);
        assert_eq!(names[6], base);
        assert_eq!(names[3005], format!("{base}~3000"));
        let all: std::collections::HashSet<&str> = names.iter().copied().collect();
        assert_eq!(all.len(), names.len());
        assert!(names.iter().all(|n| n.len() <= MAX_NAME));
        assert_eq!(problems.len(), 3 + 2999);
    }

    #[test]
    fn volume_bytes_crosses_pieces_and_disks() {
        let a: Vec<u8> = (0..100u8).collect();
        let b: Vec<u8> = (100..200u8).collect();
        let disks: Vec<Arc<dyn ReadBytes>> = vec![Arc::new(a), Arc::new(b)];
        let v = vol(vec![
            Piece {
                disk: 1,
                offset: 90,
                len: 10,
            },
            Piece {
                disk: 0,
                offset: 5,
                len: 3,
            },
            Piece {
                disk: 1,
                offset: 0,
                len: 4,
            },
        ]);
        let bytes = VolumeBytes::new(&v, &disks);
        assert_eq!(bytes.size(), 17);
        let mut buf = [0u8; 17];
        bytes.read_exact_at(&mut buf, 0).unwrap();
        let want: Vec<u8> = (190..200).chain(5..8).chain(100..104).collect();
        assert_eq!(buf.to_vec(), want);
        let mut two = [0u8; 2];
        bytes.read_exact_at(&mut two, 12).unwrap();
        assert_eq!(two, [7, 100]);
        assert!(bytes.read_exact_at(&mut two, 16).is_err());
        assert!(bytes.read_exact_at(&mut two, u64::MAX).is_err());
    }
}
