//! Comparing bytes: flattened exports against qemu's, map offsets against
//! the layer files.
//!
//! Why not `assert_eq!` on two buffers: a failure must say *where* the
//! bytes differ (every differing range, with samples), not dump megabytes
//! or stop at the first byte. And disks are sparse, some of them larger
//! than 4 GiB, so files are compared only where either holds data
//! ([`data_ranges`], via `SEEK_DATA`/`SEEK_HOLE`); holes read as zeros.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::MIB;

/// Reads a whole file, panicking with its path on error.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Collects differing byte ranges (with sample bytes) while two byte streams
/// are compared piece by piece; renders the report of [`diff_bytes`] and
/// [`diff_files`].
#[derive(Default)]
pub(super) struct DiffReport {
    /// `(start, end, expected sample, got sample)`, merged when adjacent.
    ranges: Vec<(u64, u64, Vec<u8>, Vec<u8>)>,
}

impl DiffReport {
    const SHOW: usize = 12;
    const SAMPLE: usize = 8;

    /// Compares two equally long pieces that start at guest offset `base`.
    pub(super) fn compare(&mut self, base: u64, expected: &[u8], got: &[u8]) {
        const CHUNK: usize = 4096;
        for (c, (e, g)) in expected.chunks(CHUNK).zip(got.chunks(CHUNK)).enumerate() {
            if e == g {
                continue;
            }
            for (i, (a, b)) in e.iter().zip(g).enumerate() {
                if a == b {
                    continue;
                }
                let at = base + (c * CHUNK + i) as u64;
                match self.ranges.last_mut() {
                    Some(last) if last.1 == at => {
                        last.1 = at + 1;
                        if last.2.len() < Self::SAMPLE {
                            last.2.push(*a);
                            last.3.push(*b);
                        }
                    }
                    _ => self.ranges.push((at, at + 1, vec![*a], vec![*b])),
                }
            }
        }
    }

    /// The report for streams of these lengths; `None` if they are equal.
    pub(super) fn render(&self, expected_len: u64, got_len: u64) -> Option<String> {
        let mut report = String::new();
        if expected_len != got_len {
            let _ = writeln!(
                report,
                "length: expected {expected_len} bytes, got {got_len}"
            );
        }
        if self.ranges.is_empty() {
            if report.is_empty() {
                return None;
            }
            let _ = writeln!(
                report,
                "the first {} bytes are identical",
                expected_len.min(got_len)
            );
            return Some(report);
        }
        let total: u64 = self.ranges.iter().map(|r| r.1 - r.0).sum();
        let _ = writeln!(
            report,
            "{total} differing bytes in {} ranges{}",
            self.ranges.len(),
            if self.ranges.len() > Self::SHOW {
                format!(" (first {} shown)", Self::SHOW)
            } else {
                String::new()
            }
        );
        for (s, e, exp, got) in self.ranges.iter().take(Self::SHOW) {
            let _ = writeln!(
                report,
                "  [{s:#x}, {e:#x}) = [{s}, {e}) {} bytes: expected {exp:02x?}.., got {got:02x?}..",
                e - s,
            );
        }
        Some(report)
    }
}

/// Compares `expected` and `got`; `None` if identical, else a description of
/// the length difference and of every differing byte range (the first ones
/// with sample bytes).
pub fn diff_bytes(expected: &[u8], got: &[u8]) -> Option<String> {
    let mut report = DiffReport::default();
    let common = expected.len().min(got.len());
    report.compare(0, &expected[..common], &got[..common]);
    report.render(expected.len() as u64, got.len() as u64)
}

/// The data ranges of `file` (of length `len`) per `SEEK_DATA`/`SEEK_HOLE`,
/// sorted; everything else reads as zeros. Falls back to one range covering
/// the whole file if the filesystem cannot tell.
pub fn data_ranges(file: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let whole = if len == 0 { vec![] } else { vec![(0, len)] };
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let Ok(at) = libc::off_t::try_from(pos) else {
            return whole;
        };
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole up to the end
            }
            return whole;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return whole;
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if data >= len {
            break;
        }
        out.push((data, hole));
        pos = hole;
    }
    out
}

/// Compares two files like [`diff_bytes`], but reads only the ranges where
/// either file holds data ([`data_ranges`]; holes read as zeros), so sparse
/// multi-GiB disks compare in milliseconds. `None` if identical.
pub fn diff_files(expected: &Path, got: &Path) -> Result<Option<String>, String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (fe, fg) = (open(expected)?, open(got)?);
    let len = |f: &File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("stat {}: {e}", p.display()))
    };
    let (le, lg) = (len(&fe, expected)?, len(&fg, got)?);
    let common = le.min(lg);
    // Union of both files' data ranges within the common length.
    let mut ranges = data_ranges(&fe, common);
    ranges.extend(data_ranges(&fg, common));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut report = DiffReport::default();
    const PIECE: u64 = 4 * MIB;
    let (mut be, mut bg) = (Vec::new(), Vec::new());
    for (s, e) in merged {
        let mut pos = s;
        while pos < e {
            let n = (e - pos).min(PIECE) as usize;
            be.resize(n, 0);
            bg.resize(n, 0);
            fe.read_exact_at(&mut be, pos)
                .map_err(|err| format!("read {} at {pos}: {err}", expected.display()))?;
            fg.read_exact_at(&mut bg, pos)
                .map_err(|err| format!("read {} at {pos}: {err}", got.display()))?;
            report.compare(pos, &be, &bg);
            pos += n as u64;
        }
    }
    Ok(report.render(le, lg))
}

/// Panics with a [`diff_files`] report unless the two files are identical.
pub fn assert_same_file(expected: &Path, got: &Path) {
    match diff_files(expected, got) {
        Ok(None) => {}
        Ok(Some(diff)) => panic!(
            "{} differs from {}:\n{diff}",
            got.display(),
            expected.display()
        ),
        Err(e) => panic!("cannot compare files: {e}"),
    }
}
