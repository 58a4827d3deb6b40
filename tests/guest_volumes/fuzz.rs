//! Byte flips over the structures volume discovery parses: MBR and EBRs,
//! GPT headers and entry arrays (both copies), LVM labels, metadata area
//! headers and metadata text (with its checksums fixed up after the flip,
//! so the text parser and the LV layout see hostile text, not just a
//! checksum error). Each round must end without panic or hang, and every
//! volume must lie inside its disk. Rounds: SNAPTREE_VOL_FUZZ (default 240).

use super::tools::*;
use snaptree::guest::probe::probe;
use snaptree::guest::volumes::{scan, VolumeBytes};
use snaptree::guest::{check_range, ReadBytes};
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;

/// An image in memory with some bytes replaced.
struct Patched {
    base: Arc<Vec<u8>>,
    patches: BTreeMap<u64, u8>,
}

impl ReadBytes for Patched {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), buf.len(), offset)?;
        let start = offset as usize;
        buf.copy_from_slice(&self.base[start..start + buf.len()]);
        for (&at, &b) in self.patches.range(offset..offset + buf.len() as u64) {
            buf[(at - offset) as usize] = b;
        }
        Ok(())
    }
}

fn lvm_crc(data: &[u8]) -> u32 {
    let mut crc = 0xf597_a6cfu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                0xedb8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// A disk under test: its bytes and the ranges worth flipping.
struct Target {
    bytes: Arc<Vec<u8>>,
    regions: Vec<Range<u64>>,
    /// Offsets of PVs, whose metadata text is fuzzed with checksums fixed.
    pvs: Vec<u64>,
}

fn sectors_with_signature(b: &[u8]) -> Vec<Range<u64>> {
    (0..b.len() / 512)
        .filter(|i| b[i * 512 + 510] == 0x55 && b[i * 512 + 511] == 0xaa)
        .map(|i| (i as u64 * 512)..(i as u64 * 512 + 512))
        .collect()
}

fn rounds() -> usize {
    std::env::var("SNAPTREE_VOL_FUZZ")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(240)
}

/// Flips one byte of the metadata text of the PV at `pv` and fixes the
/// text checksum and the mda header checksum to match.
fn flip_text(t: &Target, pv: u64, rng: &mut u64, patches: &mut BTreeMap<u64, u8>) {
    let b = &t.bytes;
    let mda = pv as usize + 4096;
    let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (off, len) = (le64(mda + 40) as usize, le64(mda + 48) as usize);
    if len == 0 || mda + off + len > b.len() {
        return;
    }
    let mut text = b[mda + off..mda + off + len].to_vec();
    let flips = 1 + next(rng) % 3;
    for _ in 0..flips {
        let at = next(rng) as usize % len;
        text[at] = match next(rng) % 4 {
            0 => b"{}[]=\"#-"[next(rng) as usize % 8],
            1 => b'0' + (next(rng) % 10) as u8,
            _ => text[at] ^ (1 << (next(rng) % 8)),
        };
    }
    for (i, &c) in text.iter().enumerate() {
        patches.insert((mda + off + i) as u64, c);
    }
    let mut header = b[mda..mda + 512].to_vec();
    header[56..60].copy_from_slice(&lvm_crc(&text).to_le_bytes());
    let sum = lvm_crc(&header[4..]);
    header[0..4].copy_from_slice(&sum.to_le_bytes());
    for (i, &c) in header.iter().enumerate().take(60) {
        patches.insert((mda + i) as u64, c);
    }
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn targets(dir: &std::path::Path) -> Option<Vec<Vec<Target>>> {
    if !have(&["sgdisk", "sfdisk", "mkfs.vfat", "mkfs.ext4", "mkswap"]) {
        return None;
    }
    let (gpt, _) = crate::make_gpt(dir);
    let gpt = Arc::new(std::fs::read(&gpt).unwrap());
    let n = gpt.len() as u64;
    let gpt_regions = vec![
        0..512,
        512..1024,
        1024..1024 + 16384,
        n - 512..n,
        n - 512 - 16384..n - 512,
    ];
    let mbr = image(dir, "mbr.img", 32);
    sfdisk(
        &mbr,
        "label: dos\nstart=2048, size=4096, type=83\nstart=8192, type=5\n\
         start=10240, size=2048, type=83\nstart=14336, size=2048, type=82\n\
         start=18432, size=2048, type=83\n",
    );
    let mbr = Arc::new(std::fs::read(&mbr).unwrap());
    let mbr_regions = sectors_with_signature(&mbr);
    let mut out = vec![
        vec![Target {
            bytes: gpt,
            regions: gpt_regions,
            pvs: vec![],
        }],
        vec![Target {
            bytes: mbr,
            regions: mbr_regions,
            pvs: vec![],
        }],
    ];
    if let Some(setup) = super::lvm::build(dir) {
        let a = Arc::new(std::fs::read(&setup.a).unwrap());
        let b = Arc::new(std::fs::read(&setup.b).unwrap());
        let p = setup.pvs.values().find(|p| p.0 == setup.a).unwrap().1;
        let lvm = |pv: u64| vec![pv + 512..pv + 1024, pv + 4096..pv + 4096 + 512];
        let mut a_regions = lvm(p);
        a_regions.extend([0..512, 512..1024, 1024..1024 + 16384]);
        out.push(vec![
            Target {
                bytes: a,
                regions: a_regions,
                pvs: vec![p],
            },
            Target {
                bytes: b,
                regions: lvm(0),
                pvs: vec![0],
            },
        ]);
    }
    Some(out)
}

#[test]
fn byte_flips_in_tables_and_lvm_metadata_neither_panic_nor_escape_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let Some(sets) = targets(dir.path()) else {
        return;
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    // Rounds of each set that reported a problem: the flips must reach
    // the parsers, not just land where nothing is read.
    let mut noticed = vec![0usize; sets.len()];
    for round in 0..rounds() {
        let set = &sets[round % sets.len()];
        let mut disks: Vec<(String, Arc<dyn ReadBytes>)> = Vec::new();
        for (i, t) in set.iter().enumerate() {
            let mut patches = BTreeMap::new();
            if !t.pvs.is_empty() && next(&mut rng).is_multiple_of(2) {
                let pv = t.pvs[next(&mut rng) as usize % t.pvs.len()];
                flip_text(t, pv, &mut rng, &mut patches);
            } else {
                for _ in 0..1 + next(&mut rng) % 4 {
                    let r = &t.regions[next(&mut rng) as usize % t.regions.len()];
                    let at = r.start + next(&mut rng) % (r.end - r.start);
                    let old = *patches.get(&at).unwrap_or(&t.bytes[at as usize]);
                    patches.insert(at, old ^ (1 << (next(&mut rng) % 8)));
                }
            }
            let d = Patched {
                base: t.bytes.clone(),
                patches,
            };
            disks.push((format!("vd{i}"), Arc::new(d)));
        }
        let found = scan(&disks);
        if !found.problems.is_empty() {
            noticed[round % sets.len()] += 1;
        }
        let plain: Vec<Arc<dyn ReadBytes>> = disks.iter().map(|d| d.1.clone()).collect();
        for v in &found.volumes {
            for p in &v.pieces {
                let size = plain[p.disk].size();
                assert!(
                    p.offset + p.len <= size,
                    "round {round}: {} leaves disk {}: {p:?}",
                    v.name,
                    p.disk
                );
            }
            let bytes = VolumeBytes::new(v, &plain);
            let n = bytes.size().min(4096) as usize;
            let mut buf = vec![0u8; n];
            bytes.read_exact_at(&mut buf, 0).unwrap();
            bytes
                .read_exact_at(&mut buf, bytes.size() - n as u64)
                .unwrap();
            let _ = probe(&bytes);
        }
    }
    if rounds() >= 30 * sets.len() {
        assert!(
            noticed.iter().all(|&n| n > 0),
            "flips never noticed: {noticed:?}"
        );
    }
}
