//! LZNT1, the compression of NTFS compressed files, decoded from its
//! documented format ([MS-XCA] 2.5): a compression unit is a sequence of
//! chunks, each of at most 4096 output bytes, with a 16-bit header (low 12
//! bits: stored size - 1; bits 12..14: signature 3; bit 15: compressed). A compressed chunk is
//! groups of one flag byte and eight items, each a literal byte or a
//! 16-bit back reference whose split between offset and length bits
//! depends on how far into the chunk the output is. Every reference is
//! checked; a bad one is an error (the caller names the volume offset),
//! never a guess.

const CHUNK: usize = 4096;

/// Decompresses `src` into `out` (the compression unit's size). Output
/// the stream does not cover stays zero, as Windows leaves it. `Err`
/// carries the input offset and what is wrong.
pub fn decompress(src: &[u8], out: &mut [u8]) -> Result<(), (usize, String)> {
    let mut i = 0;
    let mut o = 0;
    while i + 2 <= src.len() && o < out.len() {
        let h = u16::from_le_bytes([src[i], src[i + 1]]);
        if h == 0 {
            break;
        }
        // Bits 12..14 are a signature, always 3.
        if h & 0x7000 != 0x3000 {
            return Err((i, format!("chunk header {h:#06x} lacks the signature")));
        }
        let size = usize::from(h & 0x0FFF) + 1;
        let start = i + 2;
        let end = start + size;
        if end > src.len() {
            return Err((i, format!("chunk of {size} bytes past the compressed data")));
        }
        let room = (out.len() - o).min(CHUNK);
        let dst = &mut out[o..o + room];
        if h & 0x8000 == 0 {
            // Stored chunk: the bytes as they are, a whole chunk (or what
            // is left of the unit); a shorter one would leave a gap of
            // guessed zeros (ntfs-3g refuses it too).
            if size != room {
                return Err((i, format!("stored chunk of {size} bytes, not {room}")));
            }
            dst.copy_from_slice(&src[start..end]);
        } else {
            chunk(&src[start..end], dst).map_err(|(at, w)| (start + at, w))?;
        }
        // Every chunk but the last holds 4096 output bytes.
        o += room;
        i = end;
    }
    Ok(())
}

/// One compressed chunk into `dst` (at most 4096 bytes).
fn chunk(src: &[u8], dst: &mut [u8]) -> Result<usize, (usize, String)> {
    let mut i = 0;
    let mut o = 0;
    while i < src.len() {
        let flags = src[i];
        i += 1;
        for bit in 0..8 {
            if i >= src.len() {
                return Ok(o);
            }
            if flags & (1 << bit) == 0 {
                if o >= dst.len() {
                    return Err((i, "literal past the chunk's end".into()));
                }
                dst[o] = src[i];
                o += 1;
                i += 1;
                continue;
            }
            if i + 2 > src.len() {
                return Err((i, "truncated back reference".into()));
            }
            let t = usize::from(u16::from_le_bytes([src[i], src[i + 1]]));
            if o == 0 {
                return Err((i, "back reference at the chunk's start".into()));
            }
            // Offset bits grow with the position: 4 bits up to 16 bytes out, ...
            let mut len_bits = 12;
            let mut p = o - 1;
            while p >= 0x10 {
                p >>= 1;
                len_bits -= 1;
            }
            let back = (t >> len_bits) + 1;
            let len = (t & ((1 << len_bits) - 1)) + 3;
            if back > o || o + len > dst.len() {
                return Err((
                    i,
                    format!("back reference {back} bytes back, {len} long, at output {o}"),
                ));
            }
            // Byte by byte: a reference may overlap what it writes.
            for k in 0..len {
                dst[o + k] = dst[o + k - back];
            }
            o += len;
            i += 2;
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_overlapping_reference() {
        // "abc" then a reference 3 back, 9 long -> "abcabcabcabc".
        // At o=3 offset bits are 4 (len_bits 12): token = (3-1)<<12 | (9-3).
        let t: u16 = (2 << 12) | 6;
        let mut body = vec![0b0000_1000, b'a', b'b', b'c'];
        body.extend_from_slice(&t.to_le_bytes());
        let mut src = (0xB000u16 | (body.len() as u16 - 1)).to_le_bytes().to_vec();
        src.extend_from_slice(&body);
        let mut out = vec![0u8; 16];
        decompress(&src, &mut out).unwrap();
        assert_eq!(&out[..12], b"abcabcabcabc");
        assert_eq!(&out[12..], &[0; 4]);
    }

    #[test]
    fn bad_references_fail() {
        let mut out = vec![0u8; 4096];
        // A reference first thing in the chunk.
        let src = [0x02, 0xB0, 0x01, 0x00, 0x00];
        assert!(decompress(&src, &mut out).is_err());
        // A chunk longer than the input.
        assert!(decompress(&[0xFF, 0xBF, 0x00], &mut out).is_err());
        // A header without the signature bits.
        let mut body = vec![0x00, b'a', b'b'];
        let mut src = (0x8000u16 | 2).to_le_bytes().to_vec();
        src.append(&mut body);
        assert!(decompress(&src, &mut out).is_err());
        // A stored chunk shorter than the 4096 bytes the unit has room for.
        let mut src = (0x3000u16 | 99).to_le_bytes().to_vec();
        src.extend_from_slice(&[7; 100]);
        assert!(decompress(&src, &mut out).is_err());
        // A whole stored chunk is fine.
        let mut src = (0x3000u16 | 4095).to_le_bytes().to_vec();
        src.extend_from_slice(&[7; 4096]);
        decompress(&src, &mut out).unwrap();
        assert_eq!(out, [7; 4096]);
    }
}
