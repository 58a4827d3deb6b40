//! The page index of a plain stream: for each RAM block, the latest
//! piece (file offset of the data, or zero) of every page the records
//! sent, kept as runs of pages so that zero runs and re-sent pages cost
//! one map entry each, not one per page. Its size grows with the number
//! of records in the file (a record adds at most two entries), never
//! with the block size a record claims.

use super::super::{Piece, Run};
use std::collections::BTreeMap;

/// `piece` moved `bytes` into its run.
fn advance(piece: Piece, bytes: u64) -> Piece {
    match piece {
        Piece::Data { file_offset } => Piece::Data {
            file_offset: file_offset + bytes,
        },
        Piece::Zero => Piece::Zero,
    }
}

/// The pages of one block as the records send them, the latest piece of
/// each page, kept as runs: start page -> (pages, piece of the first).
#[derive(Default)]
pub(super) struct PageMap(BTreeMap<u64, (u64, Piece)>);

impl PageMap {
    /// Records `piece` for `page`, replacing what an earlier record sent.
    /// Returns whether the page had been sent before.
    pub(super) fn set(&mut self, page: u64, piece: Piece, ps: u64) -> bool {
        if let Some((&start, &(len, first))) = self.0.range(..=page).next_back() {
            if page < start + len {
                if advance(first, (page - start) * ps) != piece {
                    self.0.remove(&start);
                    if page > start {
                        self.0.insert(start, (page - start, first));
                    }
                    if page + 1 < start + len {
                        let rest = advance(first, (page + 1 - start) * ps);
                        self.0.insert(page + 1, (start + len - page - 1, rest));
                    }
                    self.0.insert(page, (1, piece));
                }
                return true;
            }
            if page == start + len && advance(first, len * ps) == piece {
                self.0.insert(start, (len + 1, first));
                return false;
            }
        }
        self.0.insert(page, (1, piece));
        false
    }

    /// The runs in bytes, neighbours whose pieces continue merged. `ps`
    /// must be the page size the pages were set with; the parser checks
    /// every page against `block_size` in that unit, and the clamp only
    /// keeps a run from ever reaching past the block.
    pub(super) fn into_runs(self, ps: u64, block_size: u64) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for (page, (pages, piece)) in self.0 {
            let start = page.saturating_mul(ps);
            let len = pages
                .saturating_mul(ps)
                .min(block_size.saturating_sub(start));
            if len == 0 {
                continue;
            }
            match out.last_mut() {
                Some(l) if l.start + l.len == start && advance(l.piece, l.len) == piece => {
                    l.len += len
                }
                _ => out.push(Run { start, len, piece }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    fn run(page: u64, pages: u64, piece: Piece) -> Run {
        Run {
            start: page * PS,
            len: pages * PS,
            piece,
        }
    }
    fn data(o: u64) -> Piece {
        Piece::Data { file_offset: o }
    }

    /// The later-copy rule on its own, through every split of a run it can
    /// cause. (tests/memory_sources.rs makes QEMU re-send pages for real.)
    #[test]
    fn a_later_record_replaces_an_earlier_one() {
        let mut m = PageMap::default();
        for p in 0..8 {
            assert!(!m.set(p, Piece::Zero, PS));
        }
        assert!(!m.set(8, data(10_000), PS));
        assert!(!m.set(9, data(10_000 + PS), PS)); // continues: one run
        assert!(m.set(3, data(50_000), PS)); // splits the zero run
        assert!(m.set(9, Piece::Zero, PS)); // the tail of a data run
        assert!(m.set(3, data(60_000), PS)); // a third copy
        assert!(m.set(0, Piece::Zero, PS)); // the same again: no change
        assert!(!m.set(12, Piece::Zero, PS));
        let want = vec![
            run(0, 3, Piece::Zero),
            run(3, 1, data(60_000)),
            run(4, 4, Piece::Zero),
            run(8, 1, data(10_000)),
            run(9, 1, Piece::Zero),
            run(12, 1, Piece::Zero),
        ];
        assert_eq!(m.into_runs(PS, 16 * PS), want);
    }
}
