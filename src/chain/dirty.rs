//! The dirty log of a leaf: which ranges were written since the merge
//! engine last asked. A leaf that is being coalesced while it is written
//! is copied the way live migration copies RAM: copy everything, then
//! re-copy what was written meanwhile, until little is left.
//!
//! A range is recorded after the write to the leaf returned, so a pass
//! that takes the log and then re-reads the range sees the written bytes.

use parking_lot::Mutex;

#[derive(Default)]
pub struct DirtyLog {
    /// `None` while nobody tracks; otherwise the written ranges (start, end).
    ranges: Mutex<Option<Vec<(u64, u64)>>>,
}

impl DirtyLog {
    pub fn start(&self) {
        *self.ranges.lock() = Some(Vec::new());
    }

    pub fn stop(&self) {
        *self.ranges.lock() = None;
    }

    pub fn record(&self, offset: u64, len: u64) {
        if let Some(v) = self.ranges.lock().as_mut() {
            v.push((offset, offset.saturating_add(len)));
        }
    }

    /// The ranges written since the last call, sorted and merged; the log
    /// starts empty again.
    pub fn take(&self) -> Vec<(u64, u64)> {
        let mut v = match self.ranges.lock().as_mut() {
            Some(v) => std::mem::take(v),
            None => return Vec::new(),
        };
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        out
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
        assert_eq!(d.take(), vec![(0, 15), (100, 125)]);
        assert_eq!(d.take(), vec![]);
        d.stop();
        d.record(0, 1);
        assert_eq!(d.take(), vec![]);
    }
}
