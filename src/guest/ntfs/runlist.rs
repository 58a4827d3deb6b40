//! Runlists (mapping pairs): how a non-resident attribute's virtual
//! clusters (VCNs) map to volume clusters (LCNs), with sparse runs (no
//! LCN) for holes and for the unused tail of compression units. Decoded
//! pieces (one per attribute extent, spread over records by an attribute
//! list) are joined into one sorted map and checked: no gap, no overlap,
//! every LCN inside the volume.

use crate::guest::{GuestError, GuestResult};

/// One run of clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub vcn: u64,
    pub len: u64,
    /// `None`: sparse (reads as zeros).
    pub lcn: Option<u64>,
}

/// Byte offsets within an attribute stay below this (NTFS sizes are
/// signed 64-bit): a VCN times the cluster size never overflows.
const MAX_BYTES: u64 = i64::MAX as u64;

/// Decodes the mapping pairs `p` of an extent starting at `lowest_vcn`,
/// located at volume offset `at`; LCNs must lie below `clusters`, and
/// VCNs end at or below `MAX_BYTES` / `cluster` (the cluster size).
pub fn decode(
    volume: &str,
    p: &[u8],
    at: u64,
    lowest_vcn: u64,
    (clusters, cluster): (u64, u64),
) -> GuestResult<Vec<Run>> {
    let max_vcn = MAX_BYTES / cluster.max(1);
    let bad = |i: usize, what: String| {
        GuestError::corrupt(volume, at + i as u64, format!("runlist: {what}"))
    };
    let mut runs = Vec::new();
    let mut i = 0;
    let mut vcn = lowest_vcn;
    let mut lcn: i64 = 0;
    loop {
        let Some(&h) = p.get(i) else {
            return Err(bad(i, "no terminator".into()));
        };
        if h == 0 {
            return Ok(runs);
        }
        let (nl, no) = (usize::from(h & 0x0F), usize::from(h >> 4));
        if nl == 0 || nl > 8 || no > 8 || i + 1 + nl + no > p.len() {
            return Err(bad(i, format!("header byte {h:#04x}")));
        }
        let len = signed(&p[i + 1..i + 1 + nl]);
        if len <= 0 {
            return Err(bad(i, format!("run length {len}")));
        }
        let len = len as u64;
        let run_lcn = if no == 0 {
            None
        } else {
            lcn = lcn
                .checked_add(signed(&p[i + 1 + nl..i + 1 + nl + no]))
                .ok_or_else(|| bad(i, "LCN overflows".into()))?;
            match (lcn as u64).checked_add(len) {
                Some(end) if lcn >= 0 && end <= clusters => Some(lcn as u64),
                _ => return Err(bad(i, format!("run of {len} clusters at LCN {lcn} outside the volume ({clusters} clusters)"))),
            }
        };
        runs.push(Run {
            vcn,
            len,
            lcn: run_lcn,
        });
        vcn = vcn
            .checked_add(len)
            .filter(|v| *v <= max_vcn)
            .ok_or_else(|| bad(i, "VCN overflows".into()))?;
        i += 1 + nl + no;
    }
}

/// A little-endian two's complement integer of 1..=8 bytes.
fn signed(b: &[u8]) -> i64 {
    let mut v: i64 = if b.last().is_some_and(|&x| x & 0x80 != 0) {
        -1
    } else {
        0
    };
    for &x in b.iter().rev() {
        v = (v << 8) | i64::from(x);
    }
    v
}

/// A whole attribute's runs, sorted by VCN and contiguous from VCN 0.
#[derive(Clone, Debug, Default)]
pub struct Map {
    pub runs: Vec<Run>,
}

impl Map {
    /// Joins the extents' runs (each list sorted by its lowest VCN);
    /// `at` names the attribute for errors.
    pub fn join(volume: &str, at: u64, pieces: Vec<Vec<Run>>) -> GuestResult<Map> {
        let mut runs: Vec<Run> = Vec::new();
        for piece in pieces {
            for r in piece {
                let next = runs.last().map_or(0, |l| l.vcn + l.len);
                if r.vcn != next {
                    return Err(GuestError::corrupt(
                        volume,
                        at,
                        format!("runlist: VCN {} follows VCN {next}", r.vcn),
                    ));
                }
                runs.push(r);
            }
        }
        Ok(Map { runs })
    }

    /// Clusters mapped (data or sparse).
    pub fn clusters(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.vcn + r.len)
    }

    /// The run holding `vcn`, if mapped.
    pub fn find(&self, vcn: u64) -> Option<Run> {
        let i = self.runs.partition_point(|r| r.vcn + r.len <= vcn);
        self.runs.get(i).copied().filter(|r| r.vcn <= vcn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_relative_lcns_and_sparse_runs() {
        // 0x21: 1-byte length, 2-byte LCN; 0x01: sparse; then a negative delta.
        let p = [0x21, 0x10, 0x00, 0x01, 0x01, 0x08, 0x11, 0x04, 0xF0, 0x00];
        let r = decode("v", &p, 0, 0, (1 << 20, 4096)).unwrap();
        assert_eq!(
            r,
            vec![
                Run {
                    vcn: 0,
                    len: 16,
                    lcn: Some(256)
                },
                Run {
                    vcn: 16,
                    len: 8,
                    lcn: None
                },
                Run {
                    vcn: 24,
                    len: 4,
                    lcn: Some(240)
                },
            ]
        );
        let m = Map::join("v", 0, vec![r]).unwrap();
        assert_eq!(m.find(20).unwrap().lcn, None);
        assert_eq!(m.find(27).unwrap().lcn, Some(240));
        assert!(m.find(28).is_none());
    }

    #[test]
    fn rejects_out_of_volume_and_unterminated() {
        assert!(decode("v", &[0x21, 0x10, 0x00, 0x01], 0, 0, (200, 4096)).is_err());
        assert!(decode("v", &[0x11, 0x01, 0x01], 0, 0, (200, 4096)).is_err());
        assert!(decode("v", &[0x11, 0x01, 0xFF, 0x00], 0, 0, (200, 4096)).is_err());
        // A sparse run whose end in bytes would overflow.
        let huge = [0x08, 0, 0, 0, 0, 0, 0, 0, 0x10, 0x00];
        assert!(decode("v", &huge, 0, 0, (200, 4096)).is_err());
        let fits = [0x08, 0, 0, 0, 0, 0, 0, 0x07, 0x00, 0x00];
        assert!(decode("v", &fits, 0, 0, (200, 4096)).is_ok());
    }
}
