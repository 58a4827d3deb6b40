//! `$UpCase`: the volume's own table mapping each UTF-16 unit to its upper
//! case. Directory indexes are sorted by it (collation FILE_NAME), so a
//! B+ tree lookup must compare names exactly as the volume's writer did,
//! with this table rather than today's Unicode rules.

use std::cmp::Ordering;

pub struct Upcase {
    table: Vec<u16>,
}

impl Upcase {
    /// From `$UpCase`'s bytes (65,536 little-endian units; a short table
    /// maps the units it lacks to themselves).
    pub fn new(raw: &[u8]) -> Upcase {
        Upcase {
            table: raw
                .chunks_exact(2)
                .take(65536)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        }
    }

    pub fn up(&self, c: u16) -> u16 {
        self.table.get(usize::from(c)).copied().unwrap_or(c)
    }

    /// Upper-cased comparison, then by length: the order of `$I30`
    /// indexes, up to names that differ only in case (those compare
    /// equal here; a lookup visits all of them).
    pub fn cmp(&self, a: &[u16], b: &[u16]) -> Ordering {
        for (x, y) in a.iter().zip(b) {
            match self.up(*x).cmp(&self.up(*y)) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        a.len().cmp(&b.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collates_ignoring_case_then_length() {
        let mut raw = Vec::new();
        for c in 0..=0xFFFFu32 {
            let u = if (0x61..=0x7A).contains(&c) {
                c - 32
            } else {
                c
            };
            raw.extend_from_slice(&(u as u16).to_le_bytes());
        }
        let up = Upcase::new(&raw);
        let w = |s: &str| s.encode_utf16().collect::<Vec<_>>();
        assert_eq!(up.cmp(&w("abc"), &w("ABC")), Ordering::Equal);
        assert_eq!(up.cmp(&w("ab"), &w("ABC")), Ordering::Less);
        assert_eq!(up.cmp(&w("b"), &w("AC")), Ordering::Greater);
    }
}
