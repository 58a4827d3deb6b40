//! The MBR partition table and its extended partitions (a chain of EBRs,
//! each holding one logical partition and a link to the next). MBR sectors
//! are 512 bytes. Chains are capped and loops detected, so a hostile EBR
//! chain ends with a problem, never a hang.

use super::{le32, partition, Source, Volume};
use crate::guest::ReadBytes;
use std::collections::HashSet;

const SECTOR: u64 = 512;
/// More logical partitions than any partitioning tool makes.
const MAX_LOGICAL: usize = 128;

/// One of the four slots of an MBR or EBR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: u8,
    pub start: u32,
    pub sectors: u32,
}

impl Entry {
    fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0f | 0x85)
    }
}

/// Sector 0 read as an MBR.
pub struct Mbr {
    pub entries: [Entry; 4],
}

impl Mbr {
    /// A 0xEE entry: the disk has a GPT (protective or hybrid MBR).
    pub fn has_protective(&self) -> bool {
        self.entries.iter().any(|e| e.kind == 0xee)
    }
}

/// The four entries of a sector, if it looks like a partition table: the
/// 0x55AA signature and boot flags of 0x00 or 0x80 (a FAT or NTFS boot
/// sector has the signature too, but boot code where the flags are).
fn entries(sector: &[u8]) -> Option<[Entry; 4]> {
    if sector[510] != 0x55 || sector[511] != 0xaa || is_boot_sector(sector) {
        return None;
    }
    let mut out = [Entry {
        kind: 0,
        start: 0,
        sectors: 0,
    }; 4];
    for (i, slot) in out.iter_mut().enumerate() {
        let at = 446 + 16 * i;
        if sector[at] & 0x7f != 0 {
            return None;
        }
        *slot = Entry {
            kind: sector[at + 4],
            start: le32(sector, at + 8),
            sectors: le32(sector, at + 12),
        };
        // A used entry starting at sector 0 would overlap the table itself.
        if slot.kind != 0 && slot.sectors != 0 && slot.start == 0 {
            return None;
        }
    }
    Some(out)
}

/// A filesystem's boot sector (NTFS, exFAT, FAT): it ends in 0x55AA too,
/// with boot code where an MBR has its table.
fn is_boot_sector(sector: &[u8]) -> bool {
    matches!(&sector[3..11], b"NTFS    " | b"EXFAT   ")
        || matches!(&sector[54..62], b"FAT12   " | b"FAT16   ")
        || &sector[82..90] == b"FAT32   "
}

/// Sector 0 as an MBR, `None` if it is none.
pub fn read_sector0(name: &str, disk: &dyn ReadBytes, problems: &mut Vec<String>) -> Option<Mbr> {
    let mut sector = [0u8; 512];
    if disk.size() < SECTOR {
        return None;
    }
    if let Err(e) = disk.read_exact_at(&mut sector, 0) {
        problems.push(format!("{name}: cannot read the MBR at offset 0: {e}"));
        return None;
    }
    entries(&sector).map(|entries| Mbr { entries })
}

/// The partitions an MBR describes: primaries 1–4, logical ones from 5.
/// 0xEE entries (a GPT that could not be read) are left out.
pub fn partitions(
    name: &str,
    disk: &dyn ReadBytes,
    index: usize,
    mbr: &Mbr,
    problems: &mut Vec<String>,
) -> Vec<Volume> {
    let size = disk.size();
    let mut out = Vec::new();
    let mut extended_seen = false;
    let mut logical = Vec::new();
    for (i, e) in mbr.entries.iter().enumerate() {
        if e.kind == 0 || e.kind == 0xee || e.sectors == 0 {
            continue;
        }
        if e.is_extended() {
            if extended_seen {
                problems.push(format!(
                    "{name}: MBR entry {} is a second extended partition; ignored",
                    i + 1
                ));
                continue;
            }
            extended_seen = true;
            logical = chain(name, disk, e, problems);
            continue;
        }
        let start = e.start as u64 * SECTOR;
        let len = e.sectors as u64 * SECTOR;
        out.push(typed(
            partition(
                name,
                index,
                size,
                Source::Mbr,
                i as u32 + 1,
                start,
                len,
                problems,
            ),
            e.kind,
        ));
    }
    for (n, e, ebr) in logical
        .into_iter()
        .zip(5u32..)
        .map(|((e, ebr), n)| (n, e, ebr))
    {
        let start = (ebr + e.start as u64) * SECTOR;
        let len = e.sectors as u64 * SECTOR;
        out.push(typed(
            partition(name, index, size, Source::Mbr, n, start, len, problems),
            e.kind,
        ));
    }
    out
}

fn typed(mut v: Volume, kind: u8) -> Volume {
    v.part_type = Some(format!("0x{kind:02x}"));
    v.part_type_name = type_name(kind).map(str::to_string);
    v
}

/// Friendly names of common MBR types.
fn type_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        0x01 => "fat12",
        0x04 | 0x06 | 0x0e => "fat16",
        0x07 => "ntfs/exfat",
        0x0b | 0x0c => "fat32",
        0x82 => "linux swap",
        0x83 => "linux",
        0x8e => "linux lvm",
        0xef => "efi system",
        0xfd => "linux raid",
        _ => return None,
    })
}

/// Follows the EBR chain of extended partition `ext`: each logical entry
/// with the LBA of the EBR it is relative to.
fn chain(
    name: &str,
    disk: &dyn ReadBytes,
    ext: &Entry,
    problems: &mut Vec<String>,
) -> Vec<(Entry, u64)> {
    let base = ext.start as u64;
    let end = base + ext.sectors as u64;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut ebr = base;
    loop {
        let offset = ebr * SECTOR;
        if !seen.insert(ebr) {
            problems.push(format!(
                "{name}: EBR chain loops back to offset {offset}; chain ends"
            ));
            break;
        }
        if out.len() >= MAX_LOGICAL {
            problems.push(format!(
                "{name}: more than {MAX_LOGICAL} logical partitions; chain cut at offset {offset}"
            ));
            break;
        }
        if ebr >= end {
            problems.push(format!(
                "{name}: EBR at offset {offset} lies outside the extended partition; chain ends"
            ));
            break;
        }
        let mut sector = [0u8; 512];
        if let Err(e) = disk.read_exact_at(&mut sector, offset) {
            problems.push(format!(
                "{name}: cannot read the EBR at offset {offset}: {e}"
            ));
            break;
        }
        let Some(entries) = entries(&sector) else {
            problems.push(format!(
                "{name}: corrupt EBR at offset {offset} (no 0x55AA signature or bad boot flags)"
            ));
            break;
        };
        let logical = entries[0];
        if logical.kind != 0 && logical.sectors != 0 {
            if ebr + logical.start as u64 + logical.sectors as u64 > end {
                problems.push(format!(
                    "{name}: logical partition of the EBR at offset {offset} runs past the extended partition"
                ));
            }
            out.push((logical, ebr));
        }
        let next = entries[1];
        if next.kind == 0 || next.sectors == 0 || !next.is_extended() {
            break;
        }
        ebr = base + next.start as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(sector: &mut [u8], slot: usize, kind: u8, start: u32, sectors: u32) {
        let at = 446 + 16 * slot;
        sector[at + 4] = kind;
        sector[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        sector[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
        sector[510] = 0x55;
        sector[511] = 0xaa;
    }

    #[test]
    fn looping_ebr_chain_ends_with_a_problem() {
        let mut disk = vec![0u8; 64 * 512];
        put(&mut disk[..512], 0, 0x05, 10, 40);
        // EBR at 10 -> EBR at 30 -> EBR at 30 again (a loop).
        put(&mut disk[10 * 512..11 * 512], 0, 0x83, 1, 4);
        put(&mut disk[10 * 512..11 * 512], 1, 0x05, 20, 8);
        put(&mut disk[30 * 512..31 * 512], 0, 0x83, 2, 4);
        put(&mut disk[30 * 512..31 * 512], 1, 0x05, 20, 8);
        let mut problems = Vec::new();
        let mbr = read_sector0("d", &disk, &mut problems).unwrap();
        let parts = partitions("d", &disk, 0, &mbr, &mut problems);
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["p5", "p6"]);
        assert_eq!(parts[0].pieces[0].offset, 11 * 512);
        assert_eq!(parts[1].pieces[0].offset, 32 * 512);
        assert!(problems.iter().any(|p| p.contains("loops")), "{problems:?}");
    }
}
