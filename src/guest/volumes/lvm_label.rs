//! The on-disk part of an LVM2 physical volume: the label ("LABELONE" in
//! one of the first four sectors), the pv_header behind it (PV UUID, data
//! and metadata areas), the mda_header of each metadata area and the
//! metadata text its first raw_locn points to, in a circular buffer. Every
//! structure carries LVM2's CRC (seed 0xf597a6cf); each is checked.

use super::{le32, le64};
use crate::guest::crc;
use crate::guest::ReadBytes;

const SECTOR: usize = 512;
/// Bytes of the mda_header; the circular text buffer starts after it.
const MDA_HEADER: u64 = 512;
const MDA_MAGIC: &[u8; 16] = b"\x20LVM2\x20x[5A%r0N*>";
/// More than any real VG's metadata text.
const MAX_TEXT: u64 = 16 << 20;
/// Bounds on the area lists of a pv_header (LVM writes one or two).
const MAX_AREAS: usize = 8;

/// What the label of one PV says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Label {
    /// The 32 characters of the PV UUID, without dashes.
    pub uuid: String,
    /// Metadata text of the first metadata area that passed its checks,
    /// `None` if there was none (a PV may carry no metadata area).
    pub text: Option<String>,
}

/// The label on `pv`, if it has one. `Err` names what is damaged.
/// `budget`: bytes of metadata text this scan may still read; each text
/// read is taken from it, and a text larger than what is left is not read.
pub fn read(pv: &dyn ReadBytes, budget: &mut u64) -> Result<Option<Label>, String> {
    let Some((sector, at)) = find_label(pv)? else {
        return Ok(None);
    };
    let offset = le32(&sector, 20) as usize;
    if !(32..SECTOR - 40).contains(&offset) {
        return Err(format!(
            "LVM label at offset {at}: pv_header offset {offset} out of the sector"
        ));
    }
    let h = &sector[offset..];
    let raw_uuid = &h[..32];
    if !raw_uuid.iter().all(|b| b.is_ascii_graphic()) {
        return Err(format!("LVM label at offset {at}: PV UUID is not text"));
    }
    let uuid = String::from_utf8_lossy(raw_uuid).into_owned();
    // device_size at 32, then two zero-terminated lists of (offset, size).
    let mut pos = 40;
    let mut lists = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            if pos + 16 > h.len() || list.len() > MAX_AREAS {
                return Err(format!(
                    "LVM label at offset {at}: area list runs off the sector"
                ));
            }
            let (o, s) = (le64(h, pos), le64(h, pos + 8));
            pos += 16;
            if o == 0 {
                break;
            }
            list.push((o, s));
        }
    }
    let mut text = None;
    let mut fault = None;
    for &(offset, size) in &lists[1] {
        match metadata(pv, offset, size, budget) {
            Ok(Some(t)) => {
                text = Some(t);
                break;
            }
            Ok(None) => {}
            Err(e) => fault = Some(e),
        }
    }
    if text.is_none() {
        if let Some(e) = fault {
            return Err(e);
        }
    }
    Ok(Some(Label { uuid, text }))
}

/// The sector (of the first four) holding a valid "LABELONE".
fn find_label(pv: &dyn ReadBytes) -> Result<Option<([u8; SECTOR], u64)>, String> {
    for index in 0..4u64 {
        let mut s = [0u8; SECTOR];
        let at = index * SECTOR as u64;
        if pv.read_exact_at(&mut s, at).is_err() {
            return Ok(None);
        }
        if &s[..8] != b"LABELONE" {
            continue;
        }
        if le64(&s, 8) != index {
            return Err(format!(
                "LVM label at offset {at} names sector {}",
                le64(&s, 8)
            ));
        }
        if crc::lvm(&s[20..]) != le32(&s, 16) {
            return Err(format!("LVM label at offset {at}: CRC mismatch"));
        }
        if &s[24..32] != b"LVM2 001" {
            return Err(format!("LVM label at offset {at}: type is not LVM2 001"));
        }
        return Ok(Some((s, at)));
    }
    Ok(None)
}

/// The current metadata text of the metadata area at `start` (`size`
/// bytes), `None` if the area holds none (or is marked ignored).
fn metadata(
    pv: &dyn ReadBytes,
    start: u64,
    size: u64,
    budget: &mut u64,
) -> Result<Option<String>, String> {
    let mut h = [0u8; SECTOR];
    pv.read_exact_at(&mut h, start)
        .map_err(|e| format!("LVM metadata area header at offset {start} unreadable: {e}"))?;
    if crc::lvm(&h[4..]) != le32(&h, 0) {
        return Err(format!(
            "LVM metadata area header at offset {start}: CRC mismatch"
        ));
    }
    if &h[4..20] != MDA_MAGIC || le32(&h, 20) != 1 {
        return Err(format!(
            "LVM metadata area header at offset {start}: bad magic or version"
        ));
    }
    if le64(&h, 24) != start {
        return Err(format!(
            "LVM metadata area header at offset {start}: names offset {}",
            le64(&h, 24)
        ));
    }
    let area = le64(&h, 32);
    if area <= MDA_HEADER
        || area > size.max(MDA_HEADER + 1)
        || start.checked_add(area).is_none_or(|e| e > pv.size())
    {
        return Err(format!(
            "LVM metadata area at offset {start}: size {area} does not fit"
        ));
    }
    // The first raw_locn at 40: offset, size, checksum, flags.
    let (offset, len, sum, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if offset == 0 || flags & 1 != 0 {
        return Ok(None);
    }
    if offset < MDA_HEADER || offset >= area || len > area - MDA_HEADER || len > MAX_TEXT {
        return Err(format!(
            "LVM metadata area at offset {start}: text at {offset} of {len} bytes outside the area"
        ));
    }
    if len > *budget {
        return Err(format!(
            "LVM metadata text at offset {}: {len} bytes, past what is left of the {} MiB read per scan; not read",
            start + offset,
            super::lvm::MAX_SCAN_TEXT >> 20
        ));
    }
    *budget -= len;
    let mut text = vec![0u8; len as usize];
    let first = (area - offset).min(len) as usize;
    let read = |buf: &mut [u8], at: u64| {
        pv.read_exact_at(buf, start + at)
            .map_err(|e| format!("LVM metadata text at offset {}: {e}", start + at))
    };
    read(&mut text[..first], offset)?;
    // The buffer is circular: the rest continues after the header.
    read(&mut text[first..], MDA_HEADER)?;
    if crc::lvm(&text) != sum {
        return Err(format!(
            "LVM metadata text at offset {}: checksum mismatch",
            start + offset
        ));
    }
    while text.last() == Some(&0) {
        text.pop();
    }
    String::from_utf8(text)
        .map(Some)
        .map_err(|_| format!("LVM metadata text at offset {}: not UTF-8", start + offset))
}

/// A PV UUID in LVM's dashed form (6-4-4-4-4-4-6), as `pvs` and blkid print it.
pub fn dashed(uuid: &str) -> String {
    let mut out = String::new();
    let mut rest = uuid;
    for n in [6, 4, 4, 4, 4, 4] {
        if rest.len() <= n || !rest.is_char_boundary(n) {
            break;
        }
        out.push_str(&rest[..n]);
        out.push('-');
        rest = &rest[n..];
    }
    out.push_str(rest);
    out
}
