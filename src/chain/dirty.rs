//! The dirty log of a leaf: which ranges were written since the merge
//! engine last asked. A leaf that is being coalesced while it is written
//! is copied the way live migration copies RAM: copy everything, then
//! re-copy what was written meanwhile, until little is left.
//!
//! A range is recorded after the write to the leaf returned, so a pass
//! that takes the log and then re-reads the range sees the written bytes.

use parking_lot::Mutex;
use std::collections::BTreeMap;

#[derive(Default)]
pub struct DirtyLog {
    /// `None` while nobody tracks; otherwise the written ranges, merged as
    /// they come (start -> end), so memory stays bounded by the number of
    /// disjoint ranges, not of writes.
    ranges: Mutex<Option<BTreeMap<u64, u64>>>,
}

impl DirtyLog {
    pub fn start(&self) {
        *self.ranges.lock() = Some(BTreeMap::new());
    }

    pub fn stop(&self) {
        *self.ranges.lock() = None;
    }

    pub fn record(&self, offset: u64, len: u64) {
        let mut g = self.ranges.lock();
        let Some(map) = g.as_mut() else {
            return;
        };
        let (mut s, mut e) = (offset, offset.saturating_add(len));
        // Absorb every range that overlaps or touches [s, e).
        if let Some((&ps, &pe)) = map.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        let inside: Vec<u64> = map.range(s..=e).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some(ke) = map.remove(&k) {
                e = e.max(ke);
            }
        }
        map.insert(s, e);
    }

    /// The ranges written since the last call, sorted and merged; the log
    /// starts empty again.
    pub fn take(&self) -> Vec<(u64, u64)> {
        match self.ranges.lock().as_mut() {
            Some(map) => std::mem::take(map).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

/// Total bytes of a merged range list.
pub fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(s, e)| e - s).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_merges_overlapping_and_touching_ranges() {
        let d = DirtyLog::default();
        d.record(0, 10); // not tracking: dropped
        d.start();
        d.record(100, 10);
        d.record(0, 10);
        d.record(10, 5);
        d.record(105, 20);
        d.record(200, 10);
        d.record(150, 100);
        assert_eq!(d.take(), vec![(0, 15), (100, 125), (150, 250)]);
        assert_eq!(d.take(), vec![]);
        d.stop();
        d.record(0, 1);
        assert_eq!(d.take(), vec![]);
    }
}
