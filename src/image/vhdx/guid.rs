//! GUIDs as VHDX stores them (Microsoft's mixed-endian layout: the first
//! three fields little-endian, the last eight bytes as they are), the
//! well-known ones the spec names, and their `{...}` text form (what
//! `parent_linkage` holds).

/// 16 bytes as on disk.
pub type Guid = [u8; 16];

/// A GUID from its textual fields, in on-disk byte order.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub const BAT_REGION: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA_REGION: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub const FILE_PARAMETERS: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub const PAGE83: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub const LOGICAL_SECTOR: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub const PHYSICAL_SECTOR: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub const PARENT_LOCATOR: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// The locator type of a VHDX parent (MS-VHDX 2.6.2.6.1).
pub const VHDX_PARENT_TYPE: Guid = guid(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// The GUID at `at` of `b`.
pub fn at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (upper case, no braces).
pub fn text(g: &Guid) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    let mut s = format!("{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-", g[8], g[9]);
    for b in &g[10..16] {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Parses `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` (braces optional, any
/// case), as `parent_linkage` values are written.
pub fn parse(s: &str) -> Option<Guid> {
    let s = s.trim();
    let s = s
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(s);
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
        return None;
    }
    let hex = |p: &str| -> Option<Vec<u8>> {
        (0..p.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(p.get(i..i + 2)?, 16).ok())
            .collect()
    };
    let d1 = u32::from_str_radix(parts[0], 16).ok()?;
    let d2 = u16::from_str_radix(parts[1], 16).ok()?;
    let d3 = u16::from_str_radix(parts[2], 16).ok()?;
    let mut d4 = [0u8; 8];
    d4[..2].copy_from_slice(&hex(parts[3])?);
    d4[2..].copy_from_slice(&hex(parts[4])?);
    Some(guid(d1, d2, d3, d4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_well_known_bytes_are_mixed_endian() {
        assert_eq!(text(&BAT_REGION), "2DC27766-F623-4200-9D64-115E9BFD4A08");
        assert_eq!(&BAT_REGION[..4], &[0x66, 0x77, 0xc2, 0x2d]);
        let t = format!("{{{}}}", text(&PARENT_LOCATOR).to_lowercase());
        assert_eq!(parse(&t), Some(PARENT_LOCATOR));
        assert_eq!(parse("{1234}"), None);
        assert_eq!(parse("zzzzzzzz-0000-0000-0000-000000000000"), None);
    }
}
