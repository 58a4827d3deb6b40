//! The boot sector's BIOS parameter block: where the FATs, the root
//! directory and the data clusters are, and which FAT type the volume is.
//! Every field is checked here once, so the rest of the reader can compute
//! offsets from a [`Geometry`] without re-validating.

use crate::guest::{GuestError, GuestResult};

/// FAT entry width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

impl FatType {
    pub fn name(self) -> &'static str {
        match self {
            FatType::Fat12 => "FAT12",
            FatType::Fat16 => "FAT16",
            FatType::Fat32 => "FAT32",
        }
    }
}

/// Where the root directory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootDir {
    /// FAT12/16: a fixed region of `entries` 32-byte entries at `offset`.
    Fixed { offset: u64, entries: u32 },
    /// FAT32: a cluster chain like any directory.
    Cluster(u32),
}

/// The validated layout of a FAT volume, all in bytes.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub fat_type: FatType,
    pub bytes_per_sector: u32,
    pub cluster_size: u32,
    /// Byte offset of the first FAT.
    pub fat_offset: u64,
    /// Length of one FAT in bytes.
    pub fat_len: u64,
    pub root: RootDir,
    /// Byte offset of cluster 2.
    pub data_offset: u64,
    /// Number of data clusters; valid cluster numbers are 2..cluster_count+2.
    pub cluster_count: u32,
    /// Bytes the boot sector says the volume has.
    pub volume_bytes: u64,
    /// Volume serial number, if the extended boot signature is present.
    pub volume_id: Option<u32>,
    /// Volume label from the BPB (trailing spaces trimmed; "NO NAME" dropped).
    pub bpb_label: Option<Vec<u8>>,
}

impl Geometry {
    /// Byte offset of data cluster `c` (caller checked `c` is in range).
    pub fn cluster_offset(&self, c: u32) -> u64 {
        self.data_offset + u64::from(c - 2) * u64::from(self.cluster_size)
    }

    /// True if `c` names a data cluster of this volume.
    pub fn valid_cluster(&self, c: u32) -> bool {
        c >= 2 && u64::from(c) < u64::from(self.cluster_count) + 2
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The raw BPB fields the layout is computed from, each checked on its own.
struct Fields {
    bps: u32,
    spc: u32,
    reserved: u64,
    nfats: u64,
    root_entries: u32,
    total_sectors: u64,
    fat_sectors: u64,
    /// A FAT32-layout BPB: a zero 16-bit FAT size (and the 32-bit fields).
    fat32_layout: bool,
}

fn fields(volume: &str, b: &[u8; 512]) -> GuestResult<Fields> {
    let bad = |off: u64, what: String| Err(GuestError::corrupt(volume, off, what));
    // Jump instruction: EB xx 90 or E9 xx xx (Microsoft FAT spec, BS_jmpBoot).
    if !(b[0] == 0xEB && b[2] == 0x90 || b[0] == 0xE9) {
        return bad(
            0,
            format!("boot sector: no jump instruction ({:02x})", b[0]),
        );
    }
    let bps = u32::from(u16_at(b, 11));
    if !(512..=4096).contains(&bps) || !bps.is_power_of_two() {
        return bad(11, format!("boot sector: {bps} bytes per sector"));
    }
    let spc = u32::from(b[13]);
    if spc == 0 || !spc.is_power_of_two() {
        return bad(13, format!("boot sector: {spc} sectors per cluster"));
    }
    let reserved = u64::from(u16_at(b, 14));
    if reserved == 0 {
        return bad(14, "boot sector: no reserved sectors".into());
    }
    let nfats = u64::from(b[16]);
    if nfats == 0 {
        return bad(16, "boot sector: no FATs".into());
    }
    let tot16 = u64::from(u16_at(b, 19));
    let total_sectors = if tot16 != 0 {
        tot16
    } else {
        u64::from(u32_at(b, 32))
    };
    if total_sectors == 0 {
        return bad(19, "boot sector: zero total sectors".into());
    }
    let fat16_len = u64::from(u16_at(b, 22));
    let fat32_layout = fat16_len == 0;
    let fat_sectors = if fat32_layout {
        u64::from(u32_at(b, 36))
    } else {
        fat16_len
    };
    if fat_sectors == 0 {
        return bad(36, "boot sector: zero sectors per FAT".into());
    }
    Ok(Fields {
        bps,
        spc,
        reserved,
        nfats,
        root_entries: u32::from(u16_at(b, 17)),
        total_sectors,
        fat_sectors,
        fat32_layout,
    })
}

/// The FAT type and cluster count, as the Microsoft spec derives them
/// (a FAT32-layout BPB is FAT32 whatever its count, as Linux reads it).
fn clusters(volume: &str, f: &Fields, root_sectors: u64) -> GuestResult<(FatType, u32)> {
    let bad = |off: u64, what: String| Err(GuestError::corrupt(volume, off, what));
    let meta = f.reserved + f.nfats * f.fat_sectors + root_sectors;
    let Some(data_sectors) = f.total_sectors.checked_sub(meta).filter(|&d| d > 0) else {
        return bad(
            19,
            format!(
                "boot sector: {} sectors leave no data area after {meta} metadata sectors",
                f.total_sectors
            ),
        );
    };
    let count = data_sectors / u64::from(f.spc);
    let fat_type = if f.fat32_layout {
        FatType::Fat32
    } else if count < 4085 {
        FatType::Fat12
    } else if count < 65525 {
        FatType::Fat16
    } else {
        return bad(22, format!("boot sector: FAT12/16 layout with {count} clusters (FAT32 needs the FAT32 boot sector)"));
    };
    if count > 0x0FFF_FFF5 {
        return bad(
            32,
            format!("boot sector: {count} clusters is more than FAT32 can address"),
        );
    }
    let fat_len = f.fat_sectors * u64::from(f.bps);
    let bits = match fat_type {
        FatType::Fat12 => 12,
        FatType::Fat16 => 16,
        FatType::Fat32 => 32,
    };
    if ((count + 2) * bits).div_ceil(8) > fat_len {
        return bad(
            22,
            format!("boot sector: a FAT of {fat_len} bytes is too small for {count} clusters"),
        );
    }
    Ok((fat_type, count as u32))
}

/// Where the root directory is: FAT32's root cluster, or FAT12/16's
/// fixed region at `root_offset`.
fn root_dir(
    volume: &str,
    b: &[u8; 512],
    f: &Fields,
    fat_type: FatType,
    count: u32,
    root_offset: u64,
) -> GuestResult<RootDir> {
    let bad = |off: u64, what: String| Err(GuestError::corrupt(volume, off, what));
    let root_entries = f.root_entries;
    if fat_type != FatType::Fat32 {
        if root_entries == 0 {
            return bad(
                17,
                "boot sector: FAT12/16 with no root directory entries".into(),
            );
        }
        return Ok(RootDir::Fixed {
            offset: root_offset,
            entries: root_entries,
        });
    }
    if root_entries != 0 {
        return bad(
            17,
            format!("boot sector: FAT32 with {root_entries} fixed root entries"),
        );
    }
    let rc = u32_at(b, 44);
    if rc < 2 || u64::from(rc) >= u64::from(count) + 2 {
        return bad(
            44,
            format!(
                "boot sector: root cluster {rc} outside 2..{}",
                u64::from(count) + 2
            ),
        );
    }
    Ok(RootDir::Cluster(rc))
}

/// Parses and validates the first 512 bytes of a volume. `volume` names it
/// in errors.
pub fn parse(volume: &str, b: &[u8; 512]) -> GuestResult<Geometry> {
    let f = fields(volume, b)?;
    let bps64 = u64::from(f.bps);
    let root_sectors = (u64::from(f.root_entries) * 32).div_ceil(bps64);
    let (fat_type, count) = clusters(volume, &f, root_sectors)?;
    let fat_len = f.fat_sectors * bps64;
    let fat_offset = f.reserved * bps64;
    let root_offset = fat_offset + f.nfats * fat_len;
    let root = root_dir(volume, b, &f, fat_type, count, root_offset)?;
    // The extended boot record sits after the FAT32 fields on FAT32.
    let ext = if fat_type == FatType::Fat32 { 64 } else { 36 };
    let (volume_id, bpb_label) = if b[ext + 2] == 0x29 || b[ext + 2] == 0x28 {
        let id = u32_at(b, ext + 3);
        let label = if b[ext + 2] == 0x29 {
            trim_label(&b[ext + 7..ext + 18])
        } else {
            None
        };
        (Some(id), label.filter(|l| l.as_slice() != b"NO NAME"))
    } else {
        (None, None)
    };
    Ok(Geometry {
        fat_type,
        bytes_per_sector: f.bps,
        cluster_size: f.bps * f.spc,
        fat_offset,
        fat_len,
        root,
        data_offset: root_offset + root_sectors * bps64,
        cluster_count: count,
        volume_bytes: f.total_sectors * bps64,
        volume_id,
        bpb_label,
    })
}

/// An 11-byte label with trailing spaces (and NULs) removed; `None` if empty.
pub fn trim_label(raw: &[u8]) -> Option<Vec<u8>> {
    let end = raw.iter().rposition(|&c| c != b' ' && c != 0)? + 1;
    Some(raw[..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FAT16 boot sector as mkfs.vfat would write for a 16 MiB volume.
    fn fat16() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0] = 0xEB;
        b[2] = 0x90;
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = 4;
        b[14..16].copy_from_slice(&4u16.to_le_bytes());
        b[16] = 2;
        b[17..19].copy_from_slice(&512u16.to_le_bytes());
        b[19..21].copy_from_slice(&32768u16.to_le_bytes());
        b[22..24].copy_from_slice(&32u16.to_le_bytes());
        b[38] = 0x29;
        b[39..43].copy_from_slice(&0x1234_ABCDu32.to_le_bytes());
        b[43..54].copy_from_slice(b"MYDISK     ");
        b
    }

    #[test]
    fn fat16_geometry() {
        let g = parse("v", &fat16()).unwrap();
        assert_eq!(g.fat_type, FatType::Fat16);
        assert_eq!(g.cluster_size, 2048);
        assert_eq!(g.fat_offset, 2048);
        assert_eq!(
            g.root,
            RootDir::Fixed {
                offset: 2048 + 2 * 32 * 512,
                entries: 512
            }
        );
        assert_eq!(g.data_offset, 2048 + 2 * 32 * 512 + 512 * 32);
        assert_eq!(g.cluster_count, (32768 - 4 - 64 - 32) / 4);
        assert_eq!(g.volume_id, Some(0x1234_ABCD));
        assert_eq!(g.bpb_label.as_deref(), Some(&b"MYDISK"[..]));
    }

    #[test]
    fn rejects_bad_fields() {
        for (off, val) in [(11usize, 1u8), (12, 3), (13, 3), (16, 0), (22, 0)] {
            let mut b = fat16();
            b[off] = val;
            if off == 22 {
                b[23] = 0;
            }
            let e = parse("vol9", &b).unwrap_err().to_string();
            assert!(e.starts_with("vol9: corrupt"), "{off}: {e}");
        }
        // A FAT too small for the clusters.
        let mut b = fat16();
        b[22] = 2;
        assert!(parse("v", &b)
            .unwrap_err()
            .to_string()
            .contains("too small"));
    }
}
