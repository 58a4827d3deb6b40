//! The GUID partition table (UEFI spec, chapter 5): a header at LBA 1 and
//! an array of entries, each checked by CRC-32, with a backup copy at the
//! end of the disk. The sector size is not known from a disk image, so the
//! header is looked for at 512 and at 4096 bytes. A damaged primary falls
//! back to the backup, and a problem says so.

use super::{le32, le64, partition, Source, Volume};
use crate::guest::crc;
use crate::guest::ReadBytes;

const SIZES: [u64; 2] = [512, 4096];
/// Entry arrays larger than this are refused (the spec's minimum is 16 KiB;
/// tools make 16 KiB).
const MAX_ARRAY: u64 = 1 << 20;

/// A header that passed its checks.
struct Header {
    sector: u64,
    offset: u64,
    alternate: u64,
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// The partitions of a GPT disk, or `None` if there is no usable GPT.
/// `protective`: sector 0 has a 0xEE entry, so a backup is looked for even
/// when the primary's signature is gone.
pub fn read(
    name: &str,
    disk: &dyn ReadBytes,
    index: usize,
    protective: bool,
    problems: &mut Vec<String>,
) -> Option<Vec<Volume>> {
    let mut primary_fault = None;
    let mut alternates = Vec::new();
    for sector in SIZES {
        match header(disk, sector, 1) {
            Ok(h) => match entries(name, disk, index, &h) {
                Ok((parts, found)) => {
                    problems.extend(found);
                    return Some(parts);
                }
                Err(why) => {
                    alternates.push((sector, h.alternate));
                    primary_fault = Some(why);
                }
            },
            Err(Fault::Absent) => {}
            Err(Fault::Bad(why, alternate)) => {
                alternates.push((sector, alternate));
                primary_fault.get_or_insert(why);
            }
        }
    }
    if primary_fault.is_none() && !protective {
        return None;
    }
    for sector in SIZES {
        let last = disk.size() / sector;
        if last >= 2 {
            alternates.push((sector, last - 1));
        }
    }
    let why = primary_fault.unwrap_or_else(|| "no GPT header at offset 512 or 4096".to_string());
    for (sector, lba) in alternates {
        let Ok(h) = header(disk, sector, lba) else {
            continue;
        };
        if let Ok((parts, found)) = entries(name, disk, index, &h) {
            problems.push(format!(
                "{name}: primary GPT header corrupt ({why}); using the backup at offset {}",
                h.offset
            ));
            problems.extend(found);
            return Some(parts);
        }
    }
    problems.push(format!(
        "{name}: GPT unusable ({why}) and no valid backup header"
    ));
    None
}

enum Fault {
    /// No "EFI PART" signature there.
    Absent,
    /// A header that fails a check, with the alternate LBA it names (a
    /// candidate for the backup; the backup is checked on its own).
    Bad(String, u64),
}

/// The header at `lba` for sector size `sector`, checked.
fn header(disk: &dyn ReadBytes, sector: u64, lba: u64) -> Result<Header, Fault> {
    let offset = lba.checked_mul(sector).ok_or(Fault::Absent)?;
    let mut b = vec![0u8; sector as usize];
    disk.read_exact_at(&mut b, offset)
        .map_err(|_| Fault::Absent)?;
    if &b[0..8] != b"EFI PART" {
        return Err(Fault::Absent);
    }
    let alternate = le64(&b, 32);
    let bad = |what: String| Fault::Bad(format!("{what} at offset {offset}"), alternate);
    let size = le32(&b, 12) as u64;
    if !(92..=sector).contains(&size) {
        return Err(bad(format!("header size {size}")));
    }
    let stored = le32(&b, 16);
    let mut copy = b[..size as usize].to_vec();
    copy[16..20].fill(0);
    if crc::gpt(&copy) != stored {
        return Err(bad("header CRC mismatch".into()));
    }
    if le64(&b, 24) != lba {
        return Err(bad(format!(
            "header names itself LBA {} instead of {lba}",
            le64(&b, 24)
        )));
    }
    let h = Header {
        sector,
        offset,
        alternate,
        entries_lba: le64(&b, 72),
        count: le32(&b, 80),
        entry_size: le32(&b, 84),
        entries_crc: le32(&b, 88),
    };
    if h.entry_size < 128 || !h.entry_size.is_multiple_of(8) || h.entry_size as u64 > sector {
        return Err(bad(format!("entry size {}", h.entry_size)));
    }
    if h.count as u64 * h.entry_size as u64 > MAX_ARRAY {
        return Err(bad(format!("entry array of {} entries", h.count)));
    }
    Ok(h)
}

/// Reads and checks the entry array of `h`; the partitions it lists, with
/// the problems of single entries (reported only if this table is used).
fn entries(
    name: &str,
    disk: &dyn ReadBytes,
    index: usize,
    h: &Header,
) -> Result<(Vec<Volume>, Vec<String>), String> {
    let len = h.count as u64 * h.entry_size as u64;
    let at = h
        .entries_lba
        .checked_mul(h.sector)
        .filter(|at| at.checked_add(len).is_some_and(|end| end <= disk.size()))
        .ok_or_else(|| format!("entry array at LBA {} outside the disk", h.entries_lba))?;
    let mut array = vec![0u8; len as usize];
    disk.read_exact_at(&mut array, at)
        .map_err(|e| format!("entry array at offset {at} unreadable: {e}"))?;
    if crc::gpt(&array) != h.entries_crc {
        return Err(format!("entry array CRC mismatch at offset {at}"));
    }
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (i, e) in array.chunks_exact(h.entry_size as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let number = i as u32 + 1;
        if last < first {
            problems.push(format!("{name}: GPT entry {number} ends (LBA {last}) before it starts (LBA {first}); skipped"));
            continue;
        }
        let start = first.saturating_mul(h.sector);
        let len = (last - first).saturating_add(1).saturating_mul(h.sector);
        let mut v = partition(
            name,
            index,
            disk.size(),
            Source::Gpt,
            number,
            start,
            len,
            &mut problems,
        );
        let kind = guid(&e[..16]);
        v.part_type_name = type_name(&kind).map(str::to_string);
        v.part_type = Some(kind);
        v.part_name = Some(utf16_name(&e[56..128])).filter(|n| !n.is_empty());
        out.push(v);
    }
    Ok((out, problems))
}

/// A GUID in its textual form (first three fields little-endian).
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

fn utf16_name(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Friendly names of well-known partition type GUIDs.
fn type_name(guid: &str) -> Option<&'static str> {
    Some(match guid {
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" => "efi system",
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "linux filesystem",
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => "linux lvm",
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "linux swap",
        "a19d880f-05fc-4d3b-a006-743f0f84911e" => "linux raid",
        "ca7d7ccb-63ed-4c53-861c-1742536059cc" => "linux luks",
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "linux root (x86-64)",
        "933ac7e1-2eb4-4f13-b844-0e14e2aef915" => "linux home",
        "bc13c2ff-59e6-4262-a352-b275fd6f7172" => "linux extended boot",
        "21686148-6449-6e6f-744e-656564454649" => "bios boot",
        "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7" => "microsoft basic data",
        "e3c9e316-0b5c-4db8-817d-f92df00215ae" => "microsoft reserved",
        "de94bba4-06d1-4d40-a16a-bfd50179d6ac" => "windows recovery",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn guid_text_is_mixed_endian() {
        let raw = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(super::guid(&raw), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    }
}
