//! CRC-32 (IEEE 802.3, reflected polynomial 0xedb88320) as GPT and LVM2
//! use it. GPT takes the usual form (initial and final value inverted);
//! LVM2 starts from its own seed 0xf597a6cf and inverts nothing.

const TABLE: [u32; 256] = table();

const fn table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// The raw register update, no inversion.
pub fn update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32 as GPT headers and entry arrays carry it.
pub fn gpt(data: &[u8]) -> u32 {
    !update(!0, data)
}

/// The seed of LVM2's checksums (label, mda header, metadata text).
pub const LVM_SEED: u32 = 0xf597_a6cf;

/// LVM2's checksum of `data`.
pub fn lvm(data: &[u8]) -> u32 {
    update(LVM_SEED, data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn standard_check_value() {
        assert_eq!(super::gpt(b"123456789"), 0xcbf4_3926);
    }
}
