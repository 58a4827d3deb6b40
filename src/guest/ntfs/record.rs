//! MFT records ("FILE") and index blocks ("INDX") as read from disk: the
//! update sequence array (fixups) that protects every 512-byte stride is
//! checked and undone, then a record's attributes are split into owned
//! headers. Nothing here follows a pointer off the record; offsets inside
//! the record are checked against its used size.

use crate::guest::{GuestError, GuestResult};

pub const AT_STANDARD_INFORMATION: u32 = 0x10;
pub const AT_ATTRIBUTE_LIST: u32 = 0x20;
pub const AT_FILE_NAME: u32 = 0x30;
pub const AT_VOLUME_NAME: u32 = 0x60;
pub const AT_VOLUME_INFORMATION: u32 = 0x70;
pub const AT_DATA: u32 = 0x80;
pub const AT_INDEX_ROOT: u32 = 0x90;
pub const AT_INDEX_ALLOCATION: u32 = 0xA0;
pub const AT_REPARSE_POINT: u32 = 0xC0;
const AT_END: u32 = 0xFFFF_FFFF;

/// Attribute flags.
pub const ATTR_COMPRESSED: u16 = 0x0001;
pub const ATTR_ENCRYPTED: u16 = 0x4000;

/// Record header flags.
pub const REC_IN_USE: u16 = 0x0001;
pub const REC_DIRECTORY: u16 = 0x0002;

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks the magic and undoes the fixups of a multi-sector structure read
/// at volume offset `off`. A torn write (a stride whose last two bytes do
/// not carry the sequence number) is corrupt.
pub fn fixup(volume: &str, buf: &mut [u8], off: u64, magic: &[u8; 4]) -> GuestResult<()> {
    let name = String::from_utf8_lossy(magic).into_owned();
    let bad = |at: usize, what: String| {
        GuestError::corrupt(volume, off + at as u64, format!("{name} record: {what}"))
    };
    if &buf[0..4] != magic {
        return Err(bad(0, format!("magic {:02x?}", &buf[0..4])));
    }
    // Strides are whole 512-byte sectors, as ntfs-3g requires; the
    // sequence array must fit the first one (and the buffer).
    if buf.len() < 512 || !buf.len().is_multiple_of(512) {
        return Err(bad(
            0,
            format!("size {} is no whole number of sectors", buf.len()),
        ));
    }
    let usa = usize::from(le16(buf, 4));
    let count = usize::from(le16(buf, 6));
    let strides = buf.len() / 512;
    if count != strides + 1 || usa < 8 || usa % 2 != 0 || usa + 2 * count > 512 {
        return Err(bad(
            4,
            format!(
                "update sequence at {usa} with {count} entries for {} bytes",
                buf.len()
            ),
        ));
    }
    let usn = [buf[usa], buf[usa + 1]];
    for i in 0..strides {
        let end = (i + 1) * 512 - 2;
        if buf[end..end + 2] != usn {
            return Err(bad(
                end,
                format!("torn write: stride {i} lacks the update sequence number"),
            ));
        }
        let src = usa + 2 + 2 * i;
        buf[end] = buf[src];
        buf[end + 1] = buf[src + 1];
    }
    Ok(())
}

/// An MFT record, fixed up.
pub struct Record {
    pub no: u64,
    /// Volume offset of the record (for error messages).
    pub offset: u64,
    pub data: Vec<u8>,
    pub seq: u16,
    pub link_count: u16,
    pub flags: u16,
    /// The base record's reference, 0 for a base record.
    pub base: u64,
}

/// Where an attribute's value lives.
#[derive(Clone, Debug)]
pub enum Body {
    Resident(Vec<u8>),
    NonResident(NonRes),
}

#[derive(Clone, Debug)]
pub struct NonRes {
    pub lowest_vcn: u64,
    pub highest_vcn: u64,
    /// The mapping pairs, raw (decoded by `runlist`).
    pub pairs: Vec<u8>,
    /// Volume offset of the mapping pairs (for error messages).
    pub pairs_offset: u64,
    /// log2 of the compression unit in clusters (0: none).
    pub compression_unit: u8,
    pub size: u64,
    pub initialized: u64,
}

/// One attribute of a record.
#[derive(Clone, Debug)]
pub struct Attribute {
    pub ty: u32,
    pub name: Vec<u16>,
    pub flags: u16,
    pub body: Body,
    /// Volume offset of the attribute header.
    pub offset: u64,
}

impl Record {
    /// Parses the record `no` read (raw) at volume offset `off`.
    pub fn parse(volume: &str, no: u64, mut data: Vec<u8>, off: u64) -> GuestResult<Record> {
        fixup(volume, &mut data, off, b"FILE")?;
        let bad = |at: usize, what: String| {
            GuestError::corrupt(volume, off + at as u64, format!("MFT record {no}: {what}"))
        };
        let used = le32(&data, 0x18) as usize;
        if used > data.len() || used < 0x30 {
            return Err(bad(0x18, format!("bytes in use {used}")));
        }
        let flags = le16(&data, 0x16);
        if flags & REC_IN_USE == 0 {
            return Err(bad(0x16, "not in use".into()));
        }
        Ok(Record {
            no,
            offset: off,
            seq: le16(&data, 0x10),
            link_count: le16(&data, 0x12),
            flags,
            base: le64(&data, 0x20),
            data,
        })
    }

    fn bad(&self, volume: &str, at: usize, what: impl Into<String>) -> GuestError {
        GuestError::corrupt(
            volume,
            self.offset + at as u64,
            format!("MFT record {}: {}", self.no, what.into()),
        )
    }

    /// The attributes, in record order.
    pub fn attributes(&self, volume: &str) -> GuestResult<Vec<Attribute>> {
        let d = &self.data;
        let used = le32(d, 0x18) as usize;
        let mut at = usize::from(le16(d, 0x14));
        let mut out = Vec::new();
        loop {
            if at % 8 != 0 || at + 4 > used {
                return Err(self.bad(
                    volume,
                    at,
                    format!("attribute at {at} past the used size {used}"),
                ));
            }
            let ty = le32(d, at);
            if ty == AT_END {
                return Ok(out);
            }
            if at + 0x18 > used {
                return Err(self.bad(volume, at, "attribute header past the used size"));
            }
            let len = le32(d, at + 4) as usize;
            if len < 0x18 || !len.is_multiple_of(8) || at + len > used {
                return Err(self.bad(volume, at + 4, format!("attribute length {len}")));
            }
            out.push(self.attribute(volume, &d[at..at + len], at)?);
            at += len;
        }
    }

    /// Parses one attribute `a` found at record offset `at`.
    fn attribute(&self, volume: &str, a: &[u8], at: usize) -> GuestResult<Attribute> {
        let name_len = usize::from(a[9]);
        let name_off = usize::from(le16(a, 0x0a));
        if name_len > 0 && name_off + 2 * name_len > a.len() {
            return Err(self.bad(volume, at + 9, "attribute name outside the attribute"));
        }
        let name = (0..name_len).map(|i| le16(a, name_off + 2 * i)).collect();
        let body = if a[8] == 0 {
            let vlen = le32(a, 0x10) as usize;
            let voff = usize::from(le16(a, 0x14));
            if voff.checked_add(vlen).is_none_or(|e| e > a.len()) {
                return Err(self.bad(
                    volume,
                    at + 0x10,
                    format!("resident value {voff}+{vlen} outside the attribute"),
                ));
            }
            Body::Resident(a[voff..voff + vlen].to_vec())
        } else {
            if a.len() < 0x40 {
                return Err(self.bad(volume, at + 4, "non-resident attribute header too short"));
            }
            let pairs_at = usize::from(le16(a, 0x20));
            if pairs_at < 0x40 || pairs_at > a.len() {
                return Err(self.bad(
                    volume,
                    at + 0x20,
                    format!("mapping pairs offset {pairs_at}"),
                ));
            }
            let nr = NonRes {
                lowest_vcn: le64(a, 0x10),
                highest_vcn: le64(a, 0x18),
                pairs: a[pairs_at..].to_vec(),
                pairs_offset: self.offset + (at + pairs_at) as u64,
                compression_unit: a[0x22],
                size: le64(a, 0x30),
                initialized: le64(a, 0x38),
            };
            // An empty attribute has highest VCN -1.
            let empty = nr.highest_vcn == u64::MAX && nr.lowest_vcn == 0;
            if !empty && (nr.highest_vcn >= 1 << 62 || nr.highest_vcn + 1 < nr.lowest_vcn) {
                return Err(self.bad(
                    volume,
                    at + 0x10,
                    format!("vcn range {}..={}", nr.lowest_vcn, nr.highest_vcn),
                ));
            }
            Body::NonResident(nr)
        };
        Ok(Attribute {
            ty: le32(a, 0),
            name,
            flags: le16(a, 0x0c),
            body,
            offset: self.offset + at as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixups_restore_and_detect_tears() {
        let mut b = vec![0u8; 1024];
        b[0..4].copy_from_slice(b"FILE");
        b[4..6].copy_from_slice(&48u16.to_le_bytes());
        b[6..8].copy_from_slice(&3u16.to_le_bytes());
        b[48..50].copy_from_slice(&[7, 7]);
        b[50..52].copy_from_slice(&[1, 2]);
        b[52..54].copy_from_slice(&[3, 4]);
        b[510..512].copy_from_slice(&[7, 7]);
        b[1022..1024].copy_from_slice(&[7, 7]);
        let mut ok = b.clone();
        fixup("v", &mut ok, 0, b"FILE").unwrap();
        assert_eq!(
            (&ok[510..512], &ok[1022..1024]),
            (&[1u8, 2][..], &[3u8, 4][..])
        );
        b[1023] = 9;
        assert!(fixup("v", &mut b, 0, b"FILE").is_err());
    }
}
