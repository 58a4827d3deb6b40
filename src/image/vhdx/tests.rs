//! Unit tests of the VHDX reader on images built in memory: the header
//! choice (sequence numbers, checksums) and the log search (sequences,
//! wrapping, checksums), where a qemu-made file cannot place the bytes.

use super::header::{self, HEADER_AT, HEADER_LEN};
use super::log;
use super::{crc32c_of, MIB};
use crate::storage::{MemStorage, Storage};
use std::path::Path;

fn p() -> &'static Path {
    Path::new("mem.vhdx")
}

/// A file with the identifier and two headers (`seqs`, `None` = torn);
/// the log at 1 MiB, 1 MiB long, GUID `log_guid`.
fn headers(seqs: [Option<u64>; 2], log_guid: [u8; 16]) -> MemStorage {
    let mut b = vec![0u8; 2 * MIB as usize];
    b[0..8].copy_from_slice(b"vhdxfile");
    for (i, s) in seqs.iter().enumerate() {
        let at = HEADER_AT[i] as usize;
        let h = &mut b[at..at + HEADER_LEN];
        h[0..4].copy_from_slice(b"head");
        h[8..16].copy_from_slice(&s.unwrap_or(99).to_le_bytes());
        h[32] = i as u8 + 1; // data write GUID tells the slots apart
        h[48..64].copy_from_slice(&log_guid);
        h[66..68].copy_from_slice(&1u16.to_le_bytes());
        h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes());
        h[72..80].copy_from_slice(&MIB.to_le_bytes());
        let c = crc32c_of(h);
        h[4..8].copy_from_slice(&c.to_le_bytes());
        if s.is_none() {
            h[100] ^= 1;
        }
    }
    MemStorage::from_bytes(b)
}

#[test]
fn current_header_is_the_valid_one_with_the_higher_sequence() {
    let h = header::read_current(&headers([Some(5), Some(7)], [0; 16]), p()).unwrap();
    assert_eq!((h.slot, h.sequence, h.data_write_guid[0]), (1, 7, 2));
    let h = header::read_current(&headers([Some(9), None], [0; 16]), p()).unwrap();
    assert_eq!((h.slot, h.sequence), (0, 9));
    let e = header::read_current(&headers([None, None], [0; 16]), p()).unwrap_err();
    assert!(e.to_string().contains("both VHDX headers are bad"), "{e}");
}

/// A log entry of one data sector at `target`, sequence `seq`, at log
/// sector `slot`.
fn entry(s: &MemStorage, guid: [u8; 16], seq: u64, slot: u64, target: u64, fill: u8) {
    let mut e = vec![0u8; 8192];
    e[0..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&8192u32.to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&1u32.to_le_bytes());
    e[32..48].copy_from_slice(&guid);
    e[48..56].copy_from_slice(&(2 * MIB).to_le_bytes());
    let d = &mut e[64..96];
    d[0..4].copy_from_slice(b"desc");
    d[4..8].copy_from_slice(&[fill; 4]);
    d[8..16].copy_from_slice(&[fill; 8]);
    d[16..24].copy_from_slice(&target.to_le_bytes());
    d[24..32].copy_from_slice(&seq.to_le_bytes());
    let ds = &mut e[4096..];
    ds[0..4].copy_from_slice(b"data");
    ds[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
    ds[8..4092].fill(fill);
    ds[4092..4096].copy_from_slice(&(seq as u32).to_le_bytes());
    let c = crc32c_of(&e);
    e[4..8].copy_from_slice(&c.to_le_bytes());
    for (i, sector) in e.chunks(4096).enumerate() {
        let at = MIB + ((slot + i as u64) % 256) * 4096;
        s.write_all_at(sector, at).unwrap();
    }
}

fn find(s: &MemStorage) -> Option<log::Replay> {
    let h = header::read_current(s, p()).unwrap();
    log::find(s, p(), &h, s.len().unwrap()).unwrap()
}

#[test]
fn log_search_takes_the_highest_consecutive_sequence_even_across_the_end() {
    let g = [7u8; 16];
    let s = headers([Some(1), Some(2)], g);
    assert!(find(&s).is_none(), "an empty log has nothing to replay");
    // An old sequence (3, 4) and the active one (10, 11, 12) wrapping
    // around the end of the buffer; a stale entry of another GUID.
    entry(&s, g, 3, 20, 3 * MIB, 0x33);
    entry(&s, g, 4, 22, 3 * MIB, 0x44);
    entry(&s, g, 10, 253, 3 * MIB, 0xa0);
    entry(&s, g, 11, 255, 3 * MIB, 0xb0);
    entry(&s, g, 12, 1, 3 * MIB + 4096, 0xc0);
    entry(&s, [8; 16], 13, 3, 3 * MIB, 0xff);
    let r = find(&s).expect("a sequence to replay");
    assert_eq!((r.entries, r.head_sequence), (3, 12));
    let sector = |at: u64| match r.writes.iter().rev().find(|w| w.0 == at) {
        Some((_, log::Piece::Data(d))) => d[100],
        other => panic!("{other:?}"),
    };
    assert_eq!((sector(3 * MIB), sector(3 * MIB + 4096)), (0xb0, 0xc0));
    // Read through the overlay: the later entry wins; the file is unchanged.
    let over = log::Replayed::new(Box::new(headers([Some(1), Some(2)], g)), r);
    let mut b = [0u8; 4];
    over.read_exact_at(&mut b, 3 * MIB + 4094).unwrap();
    assert_eq!(b, [0xb0, 0xb0, 0xc0, 0xc0]);
    assert!(over.write_all_at(&[1], 0).is_err());
}

#[test]
fn a_bad_checksum_or_a_sequence_gap_ends_a_sequence() {
    let g = [7u8; 16];
    let s = headers([Some(1), Some(2)], g);
    entry(&s, g, 5, 0, 3 * MIB, 0x55);
    entry(&s, g, 7, 2, 3 * MIB, 0x77); // gap: a sequence of its own
    entry(&s, g, 8, 4, 3 * MIB, 0x88);
    s.write_all_at(&[0xee], MIB + 4 * 4096 + 5000).unwrap(); // breaks 8
    let r = find(&s).expect("sequence");
    assert_eq!((r.entries, r.head_sequence), (1, 7));
}

/// The in-memory overlay keeps ranges: a zeroed MiB is one range, and a
/// later data sector in its middle splits it in three; reads see zeros,
/// the data, zeros.
#[test]
fn overlay_keeps_zeroed_ranges_as_ranges() {
    use std::sync::Arc;
    let s = headers([Some(1), Some(2)], [0; 16]);
    s.write_all_at(&vec![0x77; MIB as usize], MIB).unwrap();
    let r = log::Replay {
        writes: vec![
            (MIB, log::Piece::Zero(MIB)),
            (MIB + 8192, log::Piece::Data(Arc::new(vec![0xab; 4096]))),
        ],
        new_len: 2 * MIB,
        entries: 2,
        head_sequence: 2,
    };
    let over = log::Replayed::new(Box::new(s), r);
    assert_eq!(over.range_count(), 3);
    let mut b = vec![0u8; 3 * 4096];
    over.read_exact_at(&mut b, MIB + 4096).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0));
    assert!(b[4096..8192].iter().all(|&x| x == 0xab));
    assert!(b[8192..].iter().all(|&x| x == 0));
    let mut one = [0u8; 1];
    over.read_exact_at(&mut one, MIB - 1).unwrap();
    assert_eq!(one, [0]);
}
