//! Disk contents: reproducible patterns, the seed of randomised tests, and
//! a byte comparison that names every differing range instead of dumping
//! two multi-megabyte buffers.

use super::test_name;

/// Every range where `got` and `want` differ, as text (at most 10 ranges
/// spelled out), or `None` when they are equal.
pub fn diff_bytes(got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    let mut s = String::new();
    if got.len() != want.len() {
        s.push_str(&format!("length {} instead of {}; ", got.len(), want.len()));
    }
    let n = got.len().min(want.len());
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < n {
        if got[i] != want[i] {
            let start = i;
            while i < n && got[i] != want[i] {
                i += 1;
            }
            ranges.push((start, i));
        } else {
            i += 1;
        }
    }
    let total: usize = ranges.iter().map(|(a, b)| b - a).sum();
    s.push_str(&format!("{total} bytes differ in {} ranges:", ranges.len()));
    for (a, b) in ranges.iter().take(10) {
        s.push_str(&format!(
            " [{a:#x}, {b:#x}) got {:02x?}.. want {:02x?}..;",
            &got[*a..(*a + 4).min(*b)],
            &want[*a..(*a + 4).min(*b)]
        ));
    }
    Some(s)
}

/// Panics, naming `what` and every differing range, unless equal.
#[track_caller]
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if let Some(d) = diff_bytes(got, want) {
        panic!("{what}: wrong bytes: {d}");
    }
}

/// `len` bytes from a small fast generator seeded by `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The seed for a randomised test: `SNAPTREE_TEST_SEED` if set, else the
/// clock. Printed so a failure can be replayed.
pub fn seed() -> u64 {
    let s = std::env::var("SNAPTREE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!(
        "{}: seed {s} (replay with SNAPTREE_TEST_SEED={s})",
        test_name()
    );
    s
}
