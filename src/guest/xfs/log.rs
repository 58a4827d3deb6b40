//! Whether the XFS log is clean, without replaying it. The log is a ring
//! of 512-byte basic blocks, each stamped with the cycle (lap) it was
//! written in; the head is where the cycle number drops. The filesystem
//! was cleanly unmounted when the last record before the head is an
//! unmount record (one log operation with the unmount flag) ending exactly
//! at the head. Anything else, or a log that cannot be read, is dirty:
//! the volume is then served as `mount -o ro,norecovery` shows it.

use super::disk::{be32, Disk};
use crate::guest::GuestResult;

const REC_MAGIC: u32 = 0xfeed_babe;
const BB: u64 = 512;
/// The op header flag of an unmount record.
const UNMOUNT_TRANS: u8 = 0x20;
/// How far back from the head a record header is searched (a log record
/// is at most 256 KiB plus its headers).
const MAX_BACK: u64 = 4096;

/// The log's state.
#[derive(Debug, PartialEq, Eq)]
pub enum LogState {
    Clean,
    /// Dirty, with why.
    Dirty(String),
}

struct Log<'a> {
    disk: &'a Disk,
    start: u64,
    bbs: u64,
}

impl Log<'_> {
    fn word(&self, bb: u64) -> GuestResult<u32> {
        let mut w = [0u8; 4];
        self.disk.read_raw(&mut w, self.start + bb * BB)?;
        Ok(u32::from_be_bytes(w))
    }

    /// The cycle a block was written in: its first word, or the header's
    /// cycle field for a record header.
    fn cycle(&self, bb: u64) -> GuestResult<u32> {
        let mut w = [0u8; 8];
        self.disk.read_raw(&mut w, self.start + bb * BB)?;
        Ok(match be32(&w, 0) {
            REC_MAGIC => be32(&w, 4),
            c => c,
        })
    }

    /// The first block of the newest lap (the head), by bisection.
    fn head(&self) -> GuestResult<u64> {
        let first = self.cycle(0)?;
        let last = self.cycle(self.bbs - 1)?;
        if first == last {
            // Every block is of the same lap: the head wrapped to block 0.
            return Ok(0);
        }
        // Invariant: cycle(lo) == first, cycle(hi) != first.
        let (mut lo, mut hi) = (0, self.bbs - 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.cycle(mid)? == first {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(hi)
    }

    fn state(&self) -> GuestResult<LogState> {
        if self.cycle(0)? == 0 {
            return Ok(LogState::Clean); // never written: nothing to recover
        }
        let head = self.head()?;
        let back = MAX_BACK.min(self.bbs);
        for i in 1..=back {
            let bb = (head + self.bbs - i) % self.bbs;
            if self.word(bb)? != REC_MAGIC {
                continue;
            }
            let mut h = vec![0u8; BB as usize];
            self.disk.read_raw(&mut h, self.start + bb * BB)?;
            let (version, len, ops, size) = (
                be32(&h, 8),
                be32(&h, 12) as u64,
                be32(&h, 40),
                be32(&h, 320) as u64,
            );
            let hblks = if version & 2 != 0 && size > 32768 {
                size.div_ceil(32768)
            } else {
                1
            };
            let data = (bb + hblks) % self.bbs;
            let end = (bb + hblks + len.div_ceil(BB)) % self.bbs;
            let mut op = [0u8; 12];
            self.disk.read_raw(&mut op, self.start + data * BB)?;
            if ops == 1 && op[9] & UNMOUNT_TRANS != 0 && end == head {
                return Ok(LogState::Clean);
            }
            return Ok(LogState::Dirty(
                "the last log record is not an unmount record".into(),
            ));
        }
        Ok(LogState::Dirty(
            "no log record found before the head".into(),
        ))
    }
}

/// The state of the internal log at volume byte `start`, `bytes` long.
pub fn state(disk: &Disk, start: u64, bytes: u64) -> LogState {
    let log = Log {
        disk,
        start,
        bbs: bytes / BB,
    };
    if log.bbs < 2 {
        return LogState::Dirty("log too small to hold a record".into());
    }
    log.state()
        .unwrap_or_else(|e| LogState::Dirty(format!("log unreadable ({e})")))
}
