//! In-memory replay of the internal jbd2 journal. A snapshot of a running
//! VM is crash-consistent, so its ext3/4 usually has committed
//! transactions that were never checkpointed. This scans the log from
//! s_start (descriptor, commit and revoke blocks; v2/v3 checksums; 64-bit
//! block numbers), keeps only committed transactions, applies revokes,
//! and returns a map fs block -> newest journal copy. The volume is never
//! written: every later read goes through that map instead.

use super::disk::{Disk, JournalCopy, JBD2_MAGIC};
use super::inode::Inode;
use super::map::map;
use crate::guest::crc::crc32c;
use crate::guest::{GuestError, GuestResult};
use std::collections::{BTreeMap, HashMap, HashSet};

const BT_DESCRIPTOR: u32 = 1;
const BT_COMMIT: u32 = 2;
const BT_SB_V1: u32 = 3;
const BT_SB_V2: u32 = 4;
const BT_REVOKE: u32 = 5;

const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;

const TAG_ESCAPE: u32 = 0x1;
const TAG_SAME_UUID: u32 = 0x2;
const TAG_LAST: u32 = 0x8;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// What replay found.
#[derive(Debug, Default)]
pub struct Replay {
    pub overlay: BTreeMap<u64, JournalCopy>,
    pub transactions: usize,
    /// Journal copies skipped because their checksum did not match.
    pub bad_blocks: usize,
}

/// Log records (block tags plus revoke records) one replay may handle. A
/// full 1 GiB journal of 4 KiB blocks holds 262,144 tags; revoke records
/// are fewer in practice. The bound keeps a hostile log's maps small.
const MAX_RECORDS: u64 = 1 << 22;

/// Extents / block-map runs of the journal inode checked for overlap.
const MAX_RUNS: usize = 1 << 20;

/// One block tag: (fs block, journal logical block with bit 63 set if its
/// checksum failed, escaped).
type Tag = (u64, u64, bool);

/// The committed copies of one filesystem block that matter for replay.
#[derive(Default)]
struct Copies {
    /// The newest copy whose checksum holds: (transaction, journal block,
    /// escaped).
    good: Option<(u32, u64, bool)>,
    /// Transactions of copies whose checksum failed (each is counted
    /// unless revoked).
    bad: Vec<u32>,
}

/// What the scan of the log found: the copies of every block written by a
/// committed transaction, the newest revoking transaction of every revoked
/// block, and how many transactions committed.
#[derive(Default)]
struct Scan {
    writes: HashMap<u64, Copies>,
    revokes: HashMap<u64, u32>,
    transactions: usize,
    /// Tags and revoke records seen (bounded by MAX_RECORDS).
    records: u64,
}

struct Log<'a> {
    disk: &'a Disk,
    csum: bool,
    inode: &'a Inode,
    bs: usize,
    first: u64,
    maxlen: u64,
    incompat: u32,
    seed: u32,
    /// Bytes i_blocks says the journal inode owns.
    allocated: u64,
}

impl Log<'_> {
    fn phys(&self, lblk: u64) -> GuestResult<u64> {
        let r = map(self.disk, self.csum, self.inode, lblk)?;
        r.phys.ok_or_else(|| {
            GuestError::corrupt(
                &self.disk.name,
                self.inode.offset,
                format!("journal block {lblk} is a hole"),
            )
        })
    }

    fn read(&self, lblk: u64) -> GuestResult<(Vec<u8>, u64)> {
        let p = self.phys(lblk)?;
        let mut b = vec![0u8; self.bs];
        self.disk.read_raw(&mut b, p * self.bs as u64)?;
        Ok((b, p * self.bs as u64))
    }

    fn next(&self, pos: u64) -> u64 {
        if pos + 1 >= self.maxlen {
            self.first
        } else {
            pos + 1
        }
    }

    fn has(&self, f: u32) -> bool {
        self.incompat & f != 0
    }

    fn csum_v23(&self) -> bool {
        self.has(INCOMPAT_CSUM_V2) || self.has(INCOMPAT_CSUM_V3)
    }

    /// Checksum of a whole block with the 4 bytes at `at` zeroed.
    fn block_csum(&self, b: &[u8], at: usize) -> (u32, u32) {
        let mut c = crc32c(self.seed, &b[..at]);
        c = crc32c(c, &[0; 4]);
        c = crc32c(c, &b[at + 4..]);
        (be32(b, at), c)
    }

    /// Records the tags of descriptor block `b` (and steps `pos` over the
    /// data blocks they describe). False if the block's checksum fails,
    /// which ends the log.
    fn descriptor(
        &self,
        b: &[u8],
        seq: u32,
        pos: &mut u64,
        visited: &mut u64,
        writes: &mut Vec<Tag>,
    ) -> GuestResult<bool> {
        let bs = self.bs;
        let tail = if self.csum_v23() { 4 } else { 0 };
        if tail > 0 {
            let (want, got) = self.block_csum(b, bs - 4);
            if want != got {
                return Ok(false);
            }
        }
        let tb = self.tag_bytes();
        let mut t = 12;
        while t + tb <= bs - tail {
            let (lo, flags, hi, tcsum) = if self.has(INCOMPAT_CSUM_V3) {
                (be32(b, t), be32(b, t + 4), be32(b, t + 8), be32(b, t + 12))
            } else {
                let hi = if self.has(INCOMPAT_64BIT) {
                    be32(b, t + 8)
                } else {
                    0
                };
                (be32(b, t), be16(b, t + 6) as u32, hi, be16(b, t + 4) as u32)
            };
            let fsblk = lo as u64
                | if self.has(INCOMPAT_64BIT) {
                    (hi as u64) << 32
                } else {
                    0
                };
            *pos = self.next(*pos);
            *visited += 1;
            let mut jl = *pos;
            if self.csum_v23() {
                let (data, _) = self.read(*pos)?;
                let mut c = crc32c(self.seed, &seq.to_be_bytes());
                c = crc32c(c, &data);
                let ok = if self.has(INCOMPAT_CSUM_V3) {
                    c == tcsum
                } else {
                    (c & 0xFFFF) == tcsum
                };
                if !ok {
                    // Marked: counted and skipped at replay, as the kernel does.
                    jl |= 1 << 63;
                }
            }
            writes.push((fsblk, jl, flags & TAG_ESCAPE != 0));
            t += tb;
            if flags & TAG_SAME_UUID == 0 {
                t += 16;
            }
            if flags & TAG_LAST != 0 {
                break;
            }
        }
        Ok(true)
    }

    fn tag_bytes(&self) -> usize {
        if self.has(INCOMPAT_CSUM_V3) {
            return 16;
        }
        let mut sz = 12;
        if self.has(INCOMPAT_CSUM_V2) {
            sz += 2;
        }
        if self.has(INCOMPAT_64BIT) {
            sz
        } else {
            sz - 4
        }
    }
}

/// Replays the journal held by inode `jinode` (owning `allocated` bytes by
/// its i_blocks) if its superblock says the log is not empty. `fs_csum`
/// says whether metadata_csum is on (for the journal inode's extent
/// blocks).
pub fn replay(disk: &Disk, fs_csum: bool, jinode: &Inode, allocated: u64) -> GuestResult<Replay> {
    let bs = disk.block_size as usize;
    let mut log = Log {
        disk,
        csum: fs_csum,
        inode: jinode,
        bs,
        first: 0,
        maxlen: 1,
        incompat: 0,
        seed: 0,
        allocated,
    };
    let Some((start, seq)) = open_log(&mut log)? else {
        return Ok(Replay::default());
    };
    let found = scan(&log, start, seq)?;
    let mut out = Replay {
        transactions: found.transactions,
        ..Default::default()
    };
    for (&fsblk, copies) in &found.writes {
        // A revoke applies to copies of its transaction and older ones.
        let revoked = |seq: u32| found.revokes.get(&fsblk).is_some_and(|&r| seq_ge(r, seq));
        out.bad_blocks += copies.bad.iter().filter(|&&s| !revoked(s)).count();
        let Some((seq, jl, escaped)) = copies.good else {
            continue;
        };
        if revoked(seq) {
            continue;
        }
        let p = log.phys(jl)?;
        out.overlay.insert(
            fsblk,
            JournalCopy {
                offset: p * bs as u64,
                escaped,
            },
        );
    }
    Ok(out)
}

/// Reads and checks the journal superblock into `log`; returns the log
/// start and its first sequence number, or None if the log is empty.
fn open_log(log: &mut Log) -> GuestResult<Option<(u64, u32)>> {
    let vol = &log.disk.name;
    let bs = log.bs;
    let (sb, sb_off) = log.read(0)?;
    let bad = |off: u64, what: String| GuestError::corrupt(vol, off, format!("journal: {what}"));
    let btype = be32(&sb, 4);
    if be32(&sb, 0) != JBD2_MAGIC || (btype != BT_SB_V1 && btype != BT_SB_V2) {
        return Err(bad(sb_off, "bad superblock magic".into()));
    }
    if be32(&sb, 0xC) as usize != bs {
        return Err(bad(
            sb_off + 0xC,
            format!(
                "block size {} differs from the filesystem's",
                be32(&sb, 0xC)
            ),
        ));
    }
    // The blocks the inode really owns (i_blocks) bound the log too, not
    // only i_size: a block map can send every logical block to one block.
    let jblocks = (log.inode.size / bs as u64)
        .min(log.allocated / bs as u64)
        .min(log.disk.blocks_count);
    let maxlen = be32(&sb, 0x10) as u64;
    let first = be32(&sb, 0x14) as u64;
    if maxlen > jblocks || first == 0 || first >= maxlen {
        return Err(bad(
            sb_off + 0x10,
            format!("length {maxlen} / first {first} invalid for {jblocks} blocks"),
        ));
    }
    log.maxlen = maxlen;
    log.first = first;
    check_distinct(log)?;
    if btype == BT_SB_V2 {
        log.incompat = be32(&sb, 0x28);
    }
    let start = be32(&sb, 0x1C) as u64;
    if start == 0 {
        return Ok(None);
    }
    if log.has(INCOMPAT_FAST_COMMIT) {
        return Err(GuestError::unsupported(
            vol,
            "journal with fast_commit blocks to replay",
        ));
    }
    let known = INCOMPAT_REVOKE
        | INCOMPAT_64BIT
        | INCOMPAT_ASYNC_COMMIT
        | INCOMPAT_CSUM_V2
        | INCOMPAT_CSUM_V3;
    if log.incompat & !known != 0 {
        return Err(GuestError::unsupported(
            vol,
            format!("journal feature bits {:#x}", log.incompat & !known),
        ));
    }
    if log.csum_v23() {
        log.seed = crc32c(!0, &sb[0x30..0x40]);
        let mut c = crc32c(!0, &sb[..0xFC]);
        c = crc32c(c, &[0; 4]);
        c = crc32c(c, &sb[0x100..1024]);
        if c != be32(&sb, 0xFC) {
            return Err(bad(sb_off + 0xFC, "superblock checksum mismatch".into()));
        }
    }
    if start < first || start >= maxlen {
        return Err(bad(
            sb_off + 0x1C,
            format!("log start {start} outside the log"),
        ));
    }
    Ok(Some((start, be32(&sb, 0x18))))
}

/// `a` is the same transaction as or newer than `b` (wrapping ids).
fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// Fails unless the journal's blocks 0..maxlen map to distinct physical
/// blocks (a hostile map could otherwise replay one block many times).
fn check_distinct(log: &Log) -> GuestResult<()> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut lblk = 0;
    while lblk < log.maxlen {
        let r = map(log.disk, log.csum, log.inode, lblk)?;
        let len = r.len.min(log.maxlen - lblk);
        if let Some(p) = r.phys {
            if runs.len() >= MAX_RUNS {
                let what = format!("journal: more than {MAX_RUNS} fragments");
                return Err(GuestError::corrupt(&log.disk.name, log.inode.offset, what));
            }
            runs.push((p, len));
        }
        lblk += len;
    }
    runs.sort_unstable();
    for w in runs.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            let what = format!("journal: block {} mapped twice", w[1].0);
            return Err(GuestError::corrupt(&log.disk.name, log.inode.offset, what));
        }
    }
    Ok(())
}

impl Scan {
    /// Counts `n` more records of the block at volume byte `off`.
    fn count(&mut self, vol: &str, n: u64, off: u64) -> GuestResult<()> {
        self.records += n;
        if self.records > MAX_RECORDS {
            let what = format!("journal: more than {MAX_RECORDS} tags and revoke records");
            return Err(GuestError::corrupt(vol, off, what));
        }
        Ok(())
    }

    /// Merges the tags of committed transaction `seq`.
    fn commit(&mut self, log: &Log, seq: u32, tags: &mut Vec<Tag>, off: u64) -> GuestResult<()> {
        for (fsblk, jl, escaped) in tags.drain(..) {
            log.disk.check_block(fsblk, 1, off, "journal tag")?;
            let c = self.writes.entry(fsblk).or_default();
            if log.csum_v23() && jl & (1 << 63) != 0 {
                // Marked: counted and skipped at replay, as the kernel does.
                c.bad.push(seq);
            } else {
                c.good = Some((seq, jl, escaped));
            }
        }
        self.transactions += 1;
        Ok(())
    }
}

/// Walks the log from `start`; returns what its committed transactions
/// write and revoke.
fn scan(log: &Log, start: u64, mut seq: u32) -> GuestResult<Scan> {
    let vol = &log.disk.name;
    let mut out = Scan::default();
    let mut tags: Vec<Tag> = Vec::new();
    // Revokes of the open transaction, deduplicated.
    let mut pending_revokes: HashSet<u64> = HashSet::new();
    let mut pos = start;
    let mut visited = 0u64;
    let bs = log.bs;
    let tail = if log.csum_v23() { 4 } else { 0 };
    while visited < log.maxlen {
        let (b, off) = log.read(pos)?;
        visited += 1;
        if be32(&b, 0) != JBD2_MAGIC || be32(&b, 8) != seq {
            break;
        }
        match be32(&b, 4) {
            BT_DESCRIPTOR => {
                let before = tags.len();
                if !log.descriptor(&b, seq, &mut pos, &mut visited, &mut tags)? {
                    break;
                }
                out.count(vol, (tags.len() - before) as u64, off)?;
            }
            BT_COMMIT => {
                if tail > 0 {
                    let (want, got) = log.block_csum(&b, 16);
                    if want != got {
                        break;
                    }
                }
                for blk in pending_revokes.drain() {
                    let e = out.revokes.entry(blk).or_insert(seq);
                    if seq_ge(seq, *e) {
                        *e = seq;
                    }
                }
                out.commit(log, seq, &mut tags, off)?;
                seq = seq.wrapping_add(1);
            }
            BT_REVOKE => {
                if tail > 0 {
                    let (want, got) = log.block_csum(&b, bs - 4);
                    if want != got {
                        break;
                    }
                }
                let count = (be32(&b, 12) as usize).min(bs - tail);
                let rec = if log.has(INCOMPAT_64BIT) { 8 } else { 4 };
                out.count(vol, (count.saturating_sub(16) / rec) as u64, off)?;
                let mut r = 16;
                while r + rec <= count {
                    let blk = if rec == 8 {
                        (be32(&b, r) as u64) << 32 | be32(&b, r + 4) as u64
                    } else {
                        be32(&b, r) as u64
                    };
                    // A block outside the filesystem has nothing to revoke.
                    if blk < log.disk.blocks_count {
                        pending_revokes.insert(blk);
                    }
                    r += rec;
                }
            }
            _ => break,
        }
        pos = log.next(pos);
    }
    Ok(out)
}
