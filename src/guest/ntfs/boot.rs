//! The NTFS boot sector: the geometry every other structure is found by
//! (sector and cluster size, where `$MFT` starts, the size of MFT records
//! and index blocks) and the volume serial. Every field is checked here so
//! the rest of the reader can trust these numbers.

use crate::guest::{GuestError, GuestResult};

/// What the boot sector says, checked.
#[derive(Clone, Debug)]
pub struct Boot {
    /// Bytes per cluster (a power of two, 256 B .. 2 MiB).
    pub cluster: u64,
    /// Clusters in the volume (as the boot sector counts them, capped at
    /// the bytes actually present).
    pub clusters: u64,
    /// First cluster of `$MFT`.
    pub mft_lcn: u64,
    /// Bytes per MFT record (a power of two, 256 B .. 64 KiB).
    pub record_size: u32,
    /// The 64-bit volume serial number.
    pub serial: u64,
}

/// Decodes a "clusters per record" byte: positive means that many
/// clusters, negative `-n` means `2^n` bytes.
fn per_record(v: u8, cluster: u64) -> Option<u64> {
    let v = v as i8;
    if v > 0 {
        (v as u64).checked_mul(cluster)
    } else {
        let shift = -(v as i32);
        (0..=31).contains(&shift).then(|| 1u64 << shift)
    }
}

/// Parses the 512-byte boot sector of a volume of `size` bytes.
pub fn parse(volume: &str, b: &[u8], size: u64) -> GuestResult<Boot> {
    let bad =
        |off: u64, what: String| GuestError::corrupt(volume, off, format!("boot sector: {what}"));
    if b.len() < 512 || &b[3..11] != b"NTFS    " {
        return Err(bad(3, "no NTFS signature".into()));
    }
    let sector = u64::from(u16::from_le_bytes([b[0x0b], b[0x0c]]));
    if !(256..=4096).contains(&sector) || !sector.is_power_of_two() {
        return Err(bad(0x0b, format!("bytes per sector {sector}")));
    }
    let spc = b[0x0d];
    // Above 0x80 the byte is a negative shift (clusters over 64 KiB).
    let spc = if spc > 0x80 {
        let shift = 256 - u32::from(spc);
        if shift > 12 {
            return Err(bad(0x0d, format!("sectors per cluster byte {spc:#x}")));
        }
        1u64 << shift
    } else {
        u64::from(spc)
    };
    if spc == 0 || !spc.is_power_of_two() {
        return Err(bad(0x0d, format!("sectors per cluster {spc}")));
    }
    let cluster = sector * spc;
    if cluster > 2 << 20 {
        return Err(bad(0x0d, format!("cluster size {cluster}")));
    }
    let total_sectors = u64::from_le_bytes(b[0x28..0x30].try_into().unwrap());
    let clusters = (total_sectors / spc).min(size / cluster);
    let mft_lcn = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap());
    if mft_lcn == 0 || mft_lcn >= clusters {
        return Err(bad(
            0x30,
            format!("$MFT cluster {mft_lcn} outside the volume ({clusters} clusters)"),
        ));
    }
    let sizes = |at: usize, what: &str| -> GuestResult<u32> {
        match per_record(b[at], cluster) {
            Some(s) if (256..=65536).contains(&s) && s.is_power_of_two() => Ok(s as u32),
            _ => Err(bad(at as u64, format!("{what} size byte {:#x}", b[at]))),
        }
    };
    let record_size = sizes(0x40, "MFT record")?;
    // Each directory's index root names its own block size; this one is
    // only checked.
    sizes(0x44, "index block")?;
    Ok(Boot {
        cluster,
        clusters,
        mft_lcn,
        record_size,
        serial: u64::from_le_bytes(b[0x48..0x50].try_into().unwrap()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[3..11].copy_from_slice(b"NTFS    ");
        b[0x0b..0x0d].copy_from_slice(&512u16.to_le_bytes());
        b[0x0d] = 8;
        b[0x28..0x30].copy_from_slice(&(1u64 << 20).to_le_bytes());
        b[0x30..0x38].copy_from_slice(&4u64.to_le_bytes());
        b[0x40] = 0xF6; // 2^10
        b[0x44] = 1;
        b
    }

    #[test]
    fn geometry() {
        let g = parse("v", &sector(), 1 << 29).unwrap();
        assert_eq!((g.cluster, g.record_size), (4096, 1024));
        assert_eq!(g.clusters, (1 << 20) / 8);
    }

    #[test]
    fn bad_fields_are_named() {
        for (at, v) in [(0x0d, 0u8), (0x0d, 3), (0x40, 0x80), (0x44, 0), (0x0b, 7)] {
            let mut b = sector();
            b[at] = v;
            assert!(parse("v", &b, 1 << 29).is_err(), "{at:#x}={v}");
        }
    }
}
