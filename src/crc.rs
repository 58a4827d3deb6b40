//! The two reflected CRC-32s on-disk structures carry, over one table
//! builder: CRC-32 (IEEE 802.3, polynomial 0xedb88320) for GPT headers and
//! entry arrays and LVM2 labels and metadata, and CRC-32C (Castagnoli,
//! 0x82f63b78) for ext4's metadata_csum, jbd2, XFS v5 and VHDX (headers,
//! region table, log). Top-level because both `guest` and `image` use it. Table driven: only
//! metadata is checked, so a few hundred MB/s is plenty.
//!
//! The update functions neither invert the start nor the result: each
//! format says its own convention (GPT inverts both, LVM2 starts from its
//! seed, ext4 starts from `!0` and never inverts), in its wrapper below or
//! at its caller.

const fn reflected_table(poly: u32) -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ poly } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32: [u32; 256] = reflected_table(0xedb8_8320);
static CRC32C: [u32; 256] = reflected_table(0x82f6_3b78);

fn update(table: &[u32; 256], mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// Continues a CRC-32 (IEEE) register over `data`.
pub fn crc32(crc: u32, data: &[u8]) -> u32 {
    update(&CRC32, crc, data)
}

/// CRC-32C tables for slicing by 8: table `k` advances a byte `k` places
/// further. XFS checks every inode and directory block a tree walk reads,
/// and the byte-at-a-time update was a third of such a walk's CPU time.
static CRC32C_SLICE8: [[u32; 256]; 8] = slice8_tables(&CRC32C);

const fn slice8_tables(t0: &[u32; 256]) -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    t[0] = *t0;
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let p = t[k - 1][i];
            t[k][i] = (p >> 8) ^ t[0][(p & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

/// Continues a CRC-32C register over `data` (Linux's `crc32c(seed, data)`:
/// the caller passes `!0` to start, and the result is not inverted),
/// eight bytes per step.
pub fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    let t = &CRC32C_SLICE8;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let lo = crc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        let hi = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    update(&CRC32C, crc, words.remainder())
}

/// CRC-32 as GPT headers and entry arrays carry it.
pub fn gpt(data: &[u8]) -> u32 {
    !crc32(!0, data)
}

/// The seed of LVM2's checksums (label, mda header, metadata text).
pub const LVM_SEED: u32 = 0xf597_a6cf;

/// LVM2's checksum of `data`.
pub fn lvm(data: &[u8]) -> u32 {
    crc32(LVM_SEED, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_check_values() {
        assert_eq!(gpt(b"123456789"), 0xcbf4_3926);
        // CRC-32C's check value is with the standard final inversion.
        assert_eq!(!crc32c(!0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn chaining_equals_one_pass() {
        let a = crc32c(crc32c(!0, b"hello "), b"world");
        assert_eq!(a, crc32c(!0, b"hello world"));
    }

    #[test]
    fn sliced_crc32c_matches_the_bytewise_one() {
        let data: Vec<u8> = (0..1031u32).map(|i| (i * 131 + i / 7) as u8).collect();
        for len in [0, 1, 7, 8, 9, 63, 512, 1031] {
            for seed in [0u32, !0, 0x1234_5678] {
                assert_eq!(
                    crc32c(seed, &data[..len]),
                    update(&CRC32C, seed, &data[..len]),
                    "len {len} seed {seed:x}"
                );
            }
        }
    }
}
