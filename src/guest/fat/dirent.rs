//! 32-byte directory entries: short (8.3) entries with their times and
//! first cluster, VFAT long-name slots, and the parser that joins slots to
//! the short entry they name. Names come out the way Linux vfat shows them
//! (default `shortname=mixed`, `codepage=437`, `iocharset=utf8`).

use crate::guest::Timestamp;

pub const ATTR_RO: u8 = 0x01;
pub const ATTR_VOLUME: u8 = 0x08;
pub const ATTR_DIR: u8 = 0x10;
/// The attribute value (of the low six bits) marking a long-name slot.
pub const ATTR_LFN: u8 = 0x0F;

/// A short directory entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Short {
    pub raw_name: [u8; 11],
    pub attr: u8,
    /// NT lowercase flags (0x08 base, 0x10 extension).
    pub case: u8,
    pub ctime_cs: u8,
    pub ctime: u16,
    pub cdate: u16,
    pub adate: u16,
    pub first_cluster: u32,
    pub wtime: u16,
    pub wdate: u16,
    pub size: u32,
}

impl Short {
    pub fn parse(e: &[u8; 32]) -> Short {
        let u16_at = |o: usize| u16::from_le_bytes([e[o], e[o + 1]]);
        let mut raw_name = [0u8; 11];
        raw_name.copy_from_slice(&e[..11]);
        Short {
            raw_name,
            attr: e[11],
            case: e[12],
            ctime_cs: e[13],
            ctime: u16_at(14),
            cdate: u16_at(16),
            adate: u16_at(18),
            first_cluster: u32::from(u16_at(20)) << 16 | u32::from(u16_at(26)),
            wtime: u16_at(22),
            wdate: u16_at(24),
            size: u32::from_le_bytes([e[28], e[29], e[30], e[31]]),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.attr & ATTR_DIR != 0
    }

    /// The short name as Linux shows it: trailing spaces dropped, the NT
    /// lowercase flags applied, 0x05 read as 0xE5, bytes >= 0x80 as CP437.
    pub fn display_name(&self) -> Vec<u8> {
        let mut n = self.raw_name;
        if n[0] == 0x05 {
            n[0] = 0xE5;
        }
        let part = |bytes: &[u8], lower: bool| -> String {
            let end = bytes.iter().rposition(|&c| c != b' ').map_or(0, |p| p + 1);
            bytes[..end]
                .iter()
                .map(|&c| {
                    let ch = cp437(c);
                    if lower {
                        ch.to_ascii_lowercase()
                    } else {
                        ch
                    }
                })
                .collect()
        };
        let mut s = part(&n[..8], self.case & 0x08 != 0);
        let ext = part(&n[8..], self.case & 0x10 != 0);
        if !ext.is_empty() {
            s.push('.');
            s.push_str(&ext);
        }
        s.into_bytes()
    }

    /// Write (modification) time.
    pub fn mtime(&self) -> Timestamp {
        fat_time(self.wdate, self.wtime, 0)
    }

    /// Creation time, with its 10 ms field.
    pub fn crtime(&self) -> Timestamp {
        fat_time(self.cdate, self.ctime, self.ctime_cs)
    }

    /// Last access date (FAT keeps no access time of day).
    pub fn atime(&self) -> Timestamp {
        fat_time(self.adate, 0, 0)
    }
}

/// The checksum of an 11-byte short name that its long-name slots carry.
pub fn lfn_checksum(name: &[u8; 11]) -> u8 {
    name.iter().fold(0u8, |s, &c| {
        ((s & 1) << 7).wrapping_add(s >> 1).wrapping_add(c)
    })
}

/// A DOS date and time as seconds since the epoch, read as UTC (Linux vfat
/// with `tz=UTC`). Fields are not range-checked, as in Linux: a day or month
/// of 0 counts as 1, seconds/minutes/hours are summed as stored.
pub fn fat_time(date: u16, time: u16, cs: u8) -> Timestamp {
    // Days before each month in a common year; months 13-15 (invalid)
    // count as 0 as Linux counts them.
    const BEFORE: [i64; 16] = [
        0, 0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334, 0, 0, 0,
    ];
    let year = i64::from(date >> 9); // since 1980
    let month = usize::from((date >> 5) & 0xF).max(1);
    let day = i64::from(date & 0x1F).max(1) - 1;
    // Leap days in the years before `year`; 2100 (year 120) is not leap.
    let mut leap = (year + 3) / 4;
    if year > 120 {
        leap -= 1;
    }
    if year % 4 == 0 && year != 120 && month > 2 {
        leap += 1;
    }
    let days = year * 365 + leap + BEFORE[month] + day + 3652; // 1970..1980
    let secs = i64::from(time & 0x1F) * 2
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time >> 11) * 3600;
    let cs = i64::from(cs);
    Timestamp {
        secs: days * 86400 + secs + cs / 100,
        nsecs: ((cs % 100) * 10_000_000) as u32,
    }
}

/// CP437 (Linux vfat's default codepage) for a short-name byte.
fn cp437(c: u8) -> char {
    const HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐\
                        └┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";
    if c < 0x80 {
        char::from(c)
    } else {
        HIGH.chars()
            .nth(usize::from(c - 0x80))
            .unwrap_or('\u{fffd}')
    }
}

/// False for a name no path can carry: such entries are left out rather
/// than shown mangled.
pub fn usable(name: &[u8]) -> bool {
    !(name.is_empty() || name.contains(&b'/') || name.contains(&0) || name == b"." || name == b"..")
}

/// One listed entry of a directory.
#[derive(Clone, Debug)]
pub struct Parsed {
    pub name: Vec<u8>,
    /// Byte offset of the short entry on the volume.
    pub offset: u64,
    pub short: Short,
}

/// Joins long-name slots with short entries across a directory's clusters.
#[derive(Default)]
pub struct Parser {
    /// UTF-16 units of the pending long name, slot by slot (slot 1 first).
    slots: Vec<[u16; 13]>,
    /// The next slot number expected (counting down to 1), 0 if none.
    expect: u8,
    checksum: u8,
    /// Set at the end-of-directory mark; later entries are ignored.
    pub ended: bool,
    pub entries: Vec<Parsed>,
    /// The root directory's volume label entry, if seen.
    pub label: Option<Vec<u8>>,
}

impl Parser {
    /// Feeds `data` (whole 32-byte entries) that sits at volume offset `base`.
    pub fn feed(&mut self, data: &[u8], base: u64) {
        for (i, e) in data.chunks_exact(32).enumerate() {
            if self.ended {
                return;
            }
            let e: &[u8; 32] = e.try_into().expect("chunks_exact(32)");
            self.entry(e, base + 32 * i as u64);
        }
    }

    fn entry(&mut self, e: &[u8; 32], offset: u64) {
        match e[0] {
            0x00 => {
                self.ended = true;
                return;
            }
            0xE5 => {
                self.slots.clear();
                self.expect = 0;
                return;
            }
            _ => {}
        }
        if e[11] & 0x3F == ATTR_LFN {
            self.slot(e);
            return;
        }
        let short = Short::parse(e);
        let long = self.take_long(&short.raw_name);
        if short.attr & ATTR_VOLUME != 0 {
            if self.label.is_none() {
                self.label = super::bpb::trim_label(&short.raw_name);
            }
            return;
        }
        if &short.raw_name == b".          " || &short.raw_name == b"..         " {
            return;
        }
        // A long name no path component can carry (over 255 bytes) shows
        // as the short name, so the entry can still be looked up.
        let name = long
            .filter(|n| n.len() <= 255)
            .unwrap_or_else(|| short.display_name());
        if !usable(&name) {
            return;
        }
        self.entries.push(Parsed {
            name,
            offset,
            short,
        });
    }

    /// A long-name slot: the last one (0x40 flag) comes first on disk.
    fn slot(&mut self, e: &[u8; 32]) {
        let seq = e[0] & 0x1F;
        let mut units = [0u16; 13];
        for (k, o) in [1usize, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
            .into_iter()
            .enumerate()
        {
            units[k] = u16::from_le_bytes([e[o], e[o + 1]]);
        }
        if e[0] & 0x40 != 0 && (1..=20).contains(&seq) {
            self.slots = vec![[0; 13]; usize::from(seq)];
            self.slots[usize::from(seq) - 1] = units;
            self.checksum = e[13];
            self.expect = seq - 1;
        } else if self.expect != 0 && seq == self.expect && e[13] == self.checksum {
            self.slots[usize::from(seq) - 1] = units;
            self.expect -= 1;
        } else {
            self.slots.clear();
            self.expect = 0;
        }
    }

    /// The pending long name, if complete and its checksum matches `raw`.
    fn take_long(&mut self, raw: &[u8; 11]) -> Option<Vec<u8>> {
        let slots = std::mem::take(&mut self.slots);
        let complete = !slots.is_empty() && self.expect == 0;
        self.expect = 0;
        if !complete || lfn_checksum(raw) != self.checksum {
            return None;
        }
        let units: Vec<u16> = slots
            .iter()
            .flatten()
            .copied()
            .take_while(|&u| u != 0)
            .collect();
        Some(String::from_utf16_lossy(&units).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(name: &[u8; 11], attr: u8, case: u8) -> [u8; 32] {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(name);
        e[11] = attr;
        e[12] = case;
        e
    }

    fn lfn(seq: u8, sum: u8, chars: &[u16]) -> [u8; 32] {
        let mut e = [0u8; 32];
        e[0] = seq;
        e[11] = 0x0F;
        e[13] = sum;
        let mut units = [0xFFFFu16; 13];
        for (i, u) in units.iter_mut().enumerate() {
            if i < chars.len() {
                *u = chars[i];
            } else if i == chars.len() {
                *u = 0;
            }
        }
        for (k, o) in [1usize, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
            .into_iter()
            .enumerate()
        {
            e[o..o + 2].copy_from_slice(&units[k].to_le_bytes());
        }
        e
    }

    #[test]
    fn short_names_with_case_flags() {
        let s = Short::parse(&short(b"README  TXT", 0x20, 0x08));
        assert_eq!(s.display_name(), b"readme.TXT");
        let s = Short::parse(&short(b"MAKEFILE   ", 0x20, 0x18));
        assert_eq!(s.display_name(), b"makefile");
        let s = Short::parse(&short(b"\x05BC     TXT", 0x20, 0x10));
        assert_eq!(s.display_name(), "σBC.txt".as_bytes());
    }

    #[test]
    fn long_names_join_and_checksum_fallback() {
        let raw = *b"LONGNA~1TXT";
        let sum = lfn_checksum(&raw);
        let name: Vec<u16> = "Long name ünïcode ☃.txt".encode_utf16().collect();
        let mut data = Vec::new();
        data.extend_from_slice(&lfn(0x42, sum, &name[13..]));
        data.extend_from_slice(&lfn(0x01, sum, &name[..13]));
        data.extend_from_slice(&short(&raw, 0x20, 0));
        // Same slots, wrong checksum: the short name shows.
        data.extend_from_slice(&lfn(0x42, sum ^ 1, &name[13..]));
        data.extend_from_slice(&lfn(0x01, sum ^ 1, &name[..13]));
        data.extend_from_slice(&short(&raw, 0x20, 0));
        data.extend_from_slice(&short(b".          ", 0x10, 0));
        data.extend_from_slice(&short(b"\xE5ELETED TXT", 0x20, 0));
        data.extend_from_slice(&short(b"MYLABEL    ", 0x08, 0));
        data.extend_from_slice(&[0u8; 32]);
        data.extend_from_slice(&short(b"AFTEREND   ", 0x20, 0));
        let mut p = Parser::default();
        p.feed(&data, 1000);
        let names: Vec<_> = p
            .entries
            .iter()
            .map(|e| String::from_utf8(e.name.clone()).unwrap())
            .collect();
        assert_eq!(names, ["Long name ünïcode ☃.txt", "LONGNA~1.TXT"]);
        assert_eq!(p.entries[0].offset, 1000 + 64);
        assert_eq!(p.label.as_deref(), Some(&b"MYLABEL"[..]));
        assert!(p.ended);
    }

    #[test]
    fn long_names_over_255_bytes_show_the_short_name() {
        let raw = *b"TOOLON~1TXT";
        let sum = lfn_checksum(&raw);
        // 20 slots of 'é' (2 bytes each in UTF-8): 260 units, 520 bytes.
        let name: Vec<u16> = vec![0xE9; 260];
        let mut data = Vec::new();
        for seq in (1..=20u8).rev() {
            let flag = if seq == 20 { 0x40 } else { 0 };
            let k = usize::from(seq - 1) * 13;
            data.extend_from_slice(&lfn(seq | flag, sum, &name[k..k + 13]));
        }
        data.extend_from_slice(&short(&raw, 0x20, 0));
        // 127 units of 'é' plus 'x': 255 bytes, kept.
        let raw2 = *b"JUSTFI~1TXT";
        let sum2 = lfn_checksum(&raw2);
        let mut fits: Vec<u16> = vec![0xE9; 127];
        fits.push(u16::from(b'x'));
        for seq in (1..=10u8).rev() {
            let flag = if seq == 10 { 0x40 } else { 0 };
            let k = usize::from(seq - 1) * 13;
            data.extend_from_slice(&lfn(seq | flag, sum2, &fits[k..(k + 13).min(128)]));
        }
        data.extend_from_slice(&short(&raw2, 0x20, 0));
        let mut p = Parser::default();
        p.feed(&data, 0);
        assert_eq!(p.entries.len(), 2);
        assert_eq!(p.entries[0].name, b"TOOLON~1.TXT");
        assert_eq!(p.entries[1].name.len(), 255);
        assert_eq!(
            p.entries[1].name,
            String::from_utf16(&fits).unwrap().into_bytes()
        );
    }

    #[test]
    fn dos_times_as_utc() {
        // 2024-02-29 13:45:58, 1.5 s of centiseconds.
        let date = (44 << 9) | (2 << 5) | 29;
        let time = (13 << 11) | (45 << 5) | 29;
        let t = fat_time(date, time, 150);
        assert_eq!(t.secs, 1_709_214_358 + 1);
        assert_eq!(t.nsecs, 500_000_000);
        // 1980-01-01 and a zero date read as 1980-01-01.
        assert_eq!(fat_time(0x21, 0, 0).secs, 315_532_800);
        assert_eq!(fat_time(0, 0, 0).secs, 315_532_800);
        // 2100-03-01: 2100 is no leap year.
        assert_eq!(
            fat_time((120 << 9) | (3 << 5) | 1, 0, 0).secs,
            4_107_542_400
        );
    }
}
