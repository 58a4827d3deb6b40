//! VHDX files edited at the byte level from MS-VHDX, for what qemu-img
//! cannot make: differencing disks (has-parent, parent locator, partially
//! present blocks with sector bitmaps), 4096-byte logical sectors, and
//! metadata logs left unapplied. Every edit starts from an image qemu-img
//! made, so everything not edited is QEMU's own layout.

#![allow(dead_code)]

use std::path::Path;

pub const MIB: u64 = 1 << 20;

pub const BAT: [u8; 16] = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA: [u8; 16] = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub const FILE_PARAMETERS: [u8; 16] = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub const PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
pub const VHDX_PARENT_TYPE: [u8; 16] = guid(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` of on-disk GUID bytes.
pub fn guid_text(g: &[u8; 16]) -> String {
    let d1 = u32::from_le_bytes(g[0..4].try_into().unwrap());
    let d2 = u16::from_le_bytes(g[4..6].try_into().unwrap());
    let d3 = u16::from_le_bytes(g[6..8].try_into().unwrap());
    let tail: String = g[10..].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{{{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{tail}}}",
        g[8], g[9]
    )
}

/// CRC-32C (bitwise; the tests checksum a few structures).
pub fn crc32c(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Puts the CRC-32C of `b` (checksum field at 4..8 zeroed) into it.
pub fn set_crc(b: &mut [u8]) {
    b[4..8].fill(0);
    let c = crc32c(b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A whole VHDX file in memory.
pub struct Vhdx {
    pub b: Vec<u8>,
}

impl Vhdx {
    pub fn load(p: &Path) -> Vhdx {
        Vhdx {
            b: std::fs::read(p).expect("read vhdx"),
        }
    }

    pub fn save(&self, p: &Path) {
        std::fs::write(p, &self.b).expect("write vhdx");
    }

    /// Offset of the current header (the valid one with the higher sequence).
    pub fn header_at(&self) -> usize {
        let seq = |at: usize| u64_at(&self.b, at + 8);
        let ok = |at: usize| {
            let mut h = self.b[at..at + 4096].to_vec();
            let stored = u32_at(&h, 4);
            h[4..8].fill(0);
            &h[0..4] == b"head" && crc32c(&h) == stored
        };
        match (ok(65536), ok(131072)) {
            (true, true) if seq(131072) > seq(65536) => 131072,
            (true, _) => 65536,
            _ => 131072,
        }
    }

    /// Edits the current header, then re-checksums it.
    pub fn edit_header(&mut self, f: impl FnOnce(&mut [u8])) {
        let at = self.header_at();
        f(&mut self.b[at..at + 4096]);
        set_crc(&mut self.b[at..at + 4096]);
    }

    pub fn data_write_guid(&self) -> [u8; 16] {
        let at = self.header_at();
        self.b[at + 32..at + 48].try_into().unwrap()
    }

    pub fn log_region(&self) -> (u64, u64) {
        let at = self.header_at();
        (u64_at(&self.b, at + 72), u32_at(&self.b, at + 68) as u64)
    }

    pub fn region(&self, id: &[u8; 16]) -> (u64, u64) {
        let t = 196_608;
        for i in 0..u32_at(&self.b, t + 8) as usize {
            let e = t + 16 + i * 32;
            if &self.b[e..e + 16] == id {
                return (u64_at(&self.b, e + 16), u32_at(&self.b, e + 24) as u64);
            }
        }
        panic!("no region");
    }

    /// Moves region `id` in both region tables, re-checksummed.
    pub fn set_region(&mut self, id: &[u8; 16], off: u64, len: u32) {
        for t in [196_608usize, 262_144] {
            for i in 0..u32_at(&self.b, t + 8) as usize {
                let e = t + 16 + i * 32;
                if &self.b[e..e + 16] == id {
                    self.b[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
                    self.b[e + 24..e + 28].copy_from_slice(&len.to_le_bytes());
                }
            }
            set_crc(&mut self.b[t..t + 65536]);
        }
    }

    /// Adds a region entry to both tables, re-checksummed.
    pub fn add_region(&mut self, id: &[u8; 16], off: u64, len: u32, required: bool) {
        for t in [196_608usize, 262_144] {
            let n = u32_at(&self.b, t + 8) as usize;
            let e = t + 16 + n * 32;
            self.b[e..e + 16].copy_from_slice(id);
            self.b[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
            self.b[e + 24..e + 28].copy_from_slice(&len.to_le_bytes());
            self.b[e + 28..e + 32].copy_from_slice(&(required as u32).to_le_bytes());
            self.b[t + 8..t + 12].copy_from_slice(&(n as u32 + 1).to_le_bytes());
            set_crc(&mut self.b[t..t + 65536]);
        }
    }

    /// (absolute offset, length) of metadata item `id`.
    pub fn item(&self, id: &[u8; 16]) -> Option<(usize, usize)> {
        let base = self.region(&METADATA).0 as usize;
        (0..u16_at(&self.b, base + 10) as usize).find_map(|i| {
            let e = base + 32 + i * 32;
            (&self.b[e..e + 16] == id).then(|| {
                (
                    base + u32_at(&self.b, e + 16) as usize,
                    u32_at(&self.b, e + 20) as usize,
                )
            })
        })
    }

    pub fn set_logical_sector(&mut self, n: u32) {
        let (at, _) = self.item(&LOGICAL_SECTOR).expect("logical sector item");
        self.b[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }

    pub fn block_size(&self) -> u64 {
        let (at, _) = self.item(&FILE_PARAMETERS).unwrap();
        u32_at(&self.b, at) as u64
    }

    /// Adds metadata item `id` (flags: 4 required, 2 virtual disk) after
    /// the last item, in both copies of the region table unchanged.
    pub fn add_item(&mut self, id: &[u8; 16], data: &[u8], flags: u32) {
        let base = self.region(&METADATA).0 as usize;
        let n = u16_at(&self.b, base + 10) as usize;
        let mut end = 65536;
        for i in 0..n {
            let e = base + 32 + i * 32;
            end = end.max(u32_at(&self.b, e + 16) as usize + u32_at(&self.b, e + 20) as usize);
        }
        let e = base + 32 + n * 32;
        self.b[e..e + 16].copy_from_slice(id);
        self.b[e + 16..e + 20].copy_from_slice(&(end as u32).to_le_bytes());
        self.b[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.b[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        self.b[base + end..base + end + data.len()].copy_from_slice(data);
        self.b[base + 10..base + 12].copy_from_slice(&(n as u16 + 1).to_le_bytes());
    }

    pub fn bat(&self, i: u64) -> u64 {
        u64_at(&self.b, (self.region(&BAT).0 + i * 8) as usize)
    }

    pub fn set_bat(&mut self, i: u64, v: u64) {
        let at = (self.region(&BAT).0 + i * 8) as usize;
        self.b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Appends `len` bytes (1 MiB aligned) at the end of the file; their offset.
    pub fn append(&mut self, data: &[u8], len: u64) -> u64 {
        let at = (self.b.len() as u64).div_ceil(MIB) * MIB;
        self.b.resize((at + len) as usize, 0);
        self.b[at as usize..at as usize + data.len()].copy_from_slice(data);
        at
    }

    /// Makes this a differencing disk whose locator holds `pairs`.
    pub fn make_differencing(&mut self, pairs: &[(&str, String)]) {
        let (at, _) = self.item(&FILE_PARAMETERS).unwrap();
        let flags = u32_at(&self.b, at + 4) | 2;
        self.b[at + 4..at + 8].copy_from_slice(&flags.to_le_bytes());
        self.add_item(&PARENT_LOCATOR, &locator(pairs), 4);
        // A fresh qemu-img image may mark blocks ZERO: a child holds nothing.
        let (at, len) = self.region(&BAT);
        self.b[at as usize..(at + len) as usize].fill(0);
    }

    /// Writes one log entry with sequence `seq` and GUID `log_guid` at log
    /// sector `slot`: data descriptors for `writes` (4 KiB each), zero
    /// descriptors for `zeros` (offset, length). Sets the header's log GUID.
    pub fn log_entry(
        &mut self,
        log_guid: [u8; 16],
        seq: u64,
        slot: u64,
        writes: &[(u64, Vec<u8>)],
        zeros: &[(u64, u64)],
    ) -> u64 {
        let count = writes.len() + zeros.len();
        let desc_sectors = (count as u64 + 2).div_ceil(128);
        let total = desc_sectors + writes.len() as u64;
        let mut e = vec![0u8; (total * 4096) as usize];
        e[0..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&((total * 4096) as u32).to_le_bytes());
        e[16..24].copy_from_slice(&seq.to_le_bytes());
        e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
        e[32..48].copy_from_slice(&log_guid);
        let len = self.b.len() as u64;
        e[48..56].copy_from_slice(&len.to_le_bytes());
        e[56..64].copy_from_slice(&len.to_le_bytes());
        let mut d = 64;
        for (i, (at, data)) in writes.iter().enumerate() {
            assert_eq!(data.len(), 4096);
            e[d..d + 4].copy_from_slice(b"desc");
            e[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
            e[d + 8..d + 16].copy_from_slice(&data[0..8]);
            e[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            let s = ((desc_sectors + i as u64) * 4096) as usize;
            e[s..s + 4].copy_from_slice(b"data");
            e[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
            e[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
            e[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
            d += 32;
        }
        for (at, len) in zeros {
            e[d..d + 4].copy_from_slice(b"zero");
            e[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
            e[d + 16..d + 24].copy_from_slice(&at.to_le_bytes());
            e[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            d += 32;
        }
        set_crc(&mut e);
        let (log_at, log_len) = self.log_region();
        for (i, s) in e.chunks(4096).enumerate() {
            let at = (log_at + ((slot + i as u64) * 4096) % log_len) as usize;
            self.b[at..at + 4096].copy_from_slice(s);
        }
        self.edit_header(|h| h[48..64].copy_from_slice(&log_guid));
        total
    }
}

/// A VHDX parent locator item of `pairs` (UTF-16LE keys and values).
pub fn locator(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + pairs.len() * 12];
    b[0..16].copy_from_slice(&VHDX_PARENT_TYPE);
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect() };
    for (i, (k, v)) in pairs.iter().enumerate() {
        let (k, v) = (utf16(k), utf16(v));
        let e = 20 + i * 12;
        let ko = b.len();
        b.extend_from_slice(&k);
        let vo = b.len();
        b.extend_from_slice(&v);
        b[e..e + 4].copy_from_slice(&(ko as u32).to_le_bytes());
        b[e + 4..e + 8].copy_from_slice(&(vo as u32).to_le_bytes());
        b[e + 8..e + 10].copy_from_slice(&(k.len() as u16).to_le_bytes());
        b[e + 10..e + 12].copy_from_slice(&(v.len() as u16).to_le_bytes());
    }
    b
}
