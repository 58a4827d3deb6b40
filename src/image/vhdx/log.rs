//! The metadata log (MS-VHDX 2.3): a circular buffer of 4 KiB sectors
//! holding entries (header, descriptors, data sectors), each checksummed
//! with CRC-32C and tagged with the header's log GUID and a sequence
//! number. A file whose current header names a non-zero log GUID may hold
//! metadata updates that never reached their place (a crash, or a copy
//! taken while Hyper-V had the disk open); they must be applied before
//! anything else is read, as QEMU does on open.
//!
//! [`find`] searches the buffer for the active sequence (consecutive
//! sequence numbers, every entry valid, the highest head wins) and turns
//! it into the 4 KiB sectors it writes, in order. A read-only open lays
//! them over the file in memory ([`Replayed`], which keeps each written
//! range once, zeroed ranges as ranges); a read-write open that
//! holds the write lock writes them into the file ([`apply_to_file`]) and
//! then clears the log GUID in the headers, as QEMU's replay does. Nothing
//! is written when any check fails.

use super::header::{Header, HEADER_AT};
use super::{crc32c_of, le_u32, le_u64, MIB};
use crate::error::{ImageError, Result};
use crate::fileio::{self, read_exact_at};
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

const SECTOR: u64 = 4096;
/// The largest log snaptree reads into memory to search (Hyper-V and
/// QEMU make 1 MiB logs).
const MAX_LOG: u64 = 64 * MIB;
/// The most bytes the zero descriptors of the whole replayed sequence may
/// zero (a file replay writes them all): 1 GiB, four of Hyper-V's
/// largest blocks.
const MAX_ZERO_BYTES: u64 = 1 << 30;
/// The most data sectors' bytes a replayed sequence may hold (they are
/// kept in memory); a sequence never holds more than the log anyway.
const MAX_DATA_BYTES: u64 = MAX_LOG;

/// One write of a replay: its file offset, and 4 KiB of data or `len`
/// bytes of zeros.
#[derive(Clone, Debug)]
pub enum Piece {
    Data(Arc<Vec<u8>>),
    Zero(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(_) => SECTOR,
            Piece::Zero(n) => *n,
        }
    }
}

pub type Write = (u64, Piece);

/// What a log sequence writes, in log order (a file replay applies them
/// in that order; [`Replayed`] lays them over the file), and the length
/// the file grows to.
#[derive(Debug, Default)]
pub struct Replay {
    pub writes: Vec<Write>,
    pub new_len: u64,
    pub entries: usize,
    pub head_sequence: u64,
}

struct Log<'a> {
    path: &'a Path,
    offset: u64,
    buf: Vec<u8>,
    guid: [u8; 16],
    /// Bytes checksummed so far: a bound on the search's work.
    budget: u64,
}

/// One valid entry.
struct Entry {
    /// Its log sector (for messages).
    at: u64,
    sectors: u64,
    sequence: u64,
    flushed: u64,
    last: u64,
    writes: Vec<Write>,
}

impl Log<'_> {
    fn sectors(&self) -> u64 {
        self.buf.len() as u64 / SECTOR
    }

    /// Log sector `i` (wrapping).
    fn sector(&self, i: u64) -> &[u8] {
        let i = (i % self.sectors()) as usize * SECTOR as usize;
        &self.buf[i..i + SECTOR as usize]
    }

    /// The entry starting at log sector `at`, if it is valid.
    fn entry(&mut self, at: u64) -> Result<Option<Entry>> {
        let h = self.sector(at);
        let len = le_u32(h, 8) as u64;
        let count = le_u32(h, 24) as u64;
        let sequence = le_u64(h, 16);
        if &h[0..4] != b"loge"
            || len == 0
            || !len.is_multiple_of(SECTOR)
            || len > self.buf.len() as u64
            || sequence == 0
            || h[32..48] != self.guid
        {
            return Ok(None);
        }
        let n = len / SECTOR;
        let desc_sectors = (count + 2).div_ceil(128);
        if desc_sectors > n {
            return Ok(None);
        }
        let (flushed, last) = (le_u64(h, 48), le_u64(h, 56));
        let stored = le_u32(h, 4);
        self.budget = self.budget.saturating_sub(len);
        if self.budget == 0 {
            return Err(ImageError::corrupt(
                self.path,
                self.offset + at * SECTOR,
                "log: too many entries with valid headers and bad checksums (search abandoned)",
            ));
        }
        let mut whole = Vec::with_capacity(len as usize);
        for i in 0..n {
            whole.extend_from_slice(self.sector(at + i));
        }
        whole[4..8].fill(0);
        if crc32c_of(&whole) != stored {
            return Ok(None);
        }
        let writes = descriptors(&whole, count, desc_sectors, sequence);
        Ok(writes.map(|writes| Entry {
            at,
            sectors: n,
            sequence,
            flushed,
            last,
            writes,
        }))
    }
}

/// The writes an entry's descriptors make, or `None` if one is invalid.
fn descriptors(e: &[u8], count: u64, desc_sectors: u64, sequence: u64) -> Option<Vec<Write>> {
    let mut out = Vec::new();
    let mut data = desc_sectors;
    for i in 0..count as usize {
        let d = &e[64 + i * 32..96 + i * 32];
        let at = le_u64(d, 16);
        if le_u64(d, 24) != sequence || !at.is_multiple_of(SECTOR) {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let len = le_u64(d, 8);
                if !len.is_multiple_of(SECTOR) {
                    return None;
                }
                at.checked_add(len)?;
                if len > 0 {
                    out.push((at, Piece::Zero(len)));
                }
            }
            b"desc" => {
                let s = e.get((data * SECTOR) as usize..((data + 1) * SECTOR) as usize)?;
                let seq = (le_u32(s, 4) as u64) << 32 | le_u32(s, 4092) as u64;
                if &s[0..4] != b"data" || seq != sequence {
                    return None;
                }
                let mut b = Vec::with_capacity(SECTOR as usize);
                b.extend_from_slice(&d[8..16]);
                b.extend_from_slice(&s[8..4092]);
                b.extend_from_slice(&d[4..8]);
                out.push((at, Piece::Data(Arc::new(b))));
                data += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Finds the active log sequence of a file whose current header is
/// `header`; `None` when there is nothing to replay. (The ranges a
/// replay must not write, headers and region tables, are checked by the
/// caller, `VhdxLayer::open_with`.)
pub fn find(
    file: &dyn Storage,
    path: &Path,
    header: &Header,
    file_len: u64,
) -> Result<Option<Replay>> {
    let Some((off, len)) = log_region(path, header, file_len)? else {
        return Ok(None);
    };
    let mut buf = vec![0u8; len as usize];
    read_exact_at(file, path, &mut buf, off, "VHDX log")?;
    let mut log = Log {
        path,
        offset: off,
        buf,
        guid: header.log_guid,
        budget: 16 * len + 64 * MIB,
    };
    let Some(seq) = log.best_sequence()? else {
        return Ok(None);
    };
    build(path, off, file_len, seq).map(Some)
}

/// The log's (file offset, length) from the header, checked (version,
/// 1 MiB alignment, inside the file, at most MAX_LOG); `None` when the
/// header names no log GUID or an empty log, so there is nothing to
/// replay. Separate because it needs only the header, not the log bytes.
fn log_region(path: &Path, header: &Header, file_len: u64) -> Result<Option<(u64, u64)>> {
    let hat = HEADER_AT[header.slot];
    let (off, len) = (header.log_offset, header.log_length as u64);
    if header.log_version != 0 {
        return Err(ImageError::corrupt(
            path,
            hat + 64,
            format!("log version {} (only 0 exists)", header.log_version),
        ));
    }
    if off < MIB || off % MIB != 0 || len % MIB != 0 {
        return Err(ImageError::corrupt(
            path,
            hat + 68,
            format!("log at {off}, length {len}: not 1 MiB aligned past the headers"),
        ));
    }
    if header.log_guid == [0; 16] || len == 0 {
        return Ok(None);
    }
    if off.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(ImageError::corrupt(
            path,
            hat + 68,
            format!("log at {off}, length {len} ends past the end of the file ({file_len})"),
        ));
    }
    if len > MAX_LOG {
        return Err(ImageError::unsupported(
            path,
            format!("a {len}-byte log to replay (snaptree replays logs up to {MAX_LOG} bytes)"),
        ));
    }
    Ok(Some((off, len)))
}

impl Log<'_> {
    /// Searches the whole buffer for the active sequence: from each valid
    /// entry, the run of consecutive ones after it; the highest head wins.
    /// `None` when no entry is valid.
    fn best_sequence(&mut self) -> Result<Option<Vec<Entry>>> {
        let mut best: Option<Vec<Entry>> = None;
        let n = self.sectors();
        let mut at = 0;
        while at < n {
            let Some(first) = self.entry(at)? else {
                at += 1;
                continue;
            };
            let (seq, used) = self.sequence_from(at, first)?;
            // The highest head wins; for the same head (a sequence that wraps
            // past the end of the buffer is also seen from its last part at
            // the start) the longer, complete one.
            let key = |s: &[Entry]| (s.last().expect("one").sequence, s.len());
            if best.as_deref().is_none_or(|b| key(b) < key(&seq)) {
                best = Some(seq);
            }
            at += used;
        }
        Ok(best)
    }

    /// The sequence starting with `first` (the valid entry at log sector
    /// `at`) and the log sectors it uses: the entries that follow it with
    /// consecutive sequence numbers. Separate so the wrap-around bound
    /// sits beside the loop it bounds.
    fn sequence_from(&mut self, at: u64, first: Entry) -> Result<(Vec<Entry>, u64)> {
        let n = self.sectors();
        let mut used = first.sectors;
        let mut seq = vec![first];
        // Consecutive sequence numbers; never more than the whole buffer,
        // so a log that wraps onto itself ends.
        while used < n {
            match self.entry((at + used) % n)? {
                // An entry numbered 2^64 - 1 has no successor: it ends
                // its sequence.
                Some(e)
                    if seq.last().expect("one").sequence.checked_add(1) == Some(e.sequence)
                        && used + e.sectors <= n =>
                {
                    used += e.sectors;
                    seq.push(e);
                }
                _ => break,
            }
        }
        Ok((seq, used))
    }
}

fn build(path: &Path, log_at: u64, file_len: u64, seq: Vec<Entry>) -> Result<Replay> {
    let mut r = Replay {
        new_len: file_len,
        entries: seq.len(),
        ..Replay::default()
    };
    r.head_sequence = seq.last().map_or(0, |e| e.sequence);
    let (mut zero_bytes, mut data_bytes) = (0u64, 0u64);
    let limit = super::metadata::MAX_DISK_SIZE * 2;
    for e in seq {
        let here = log_at + e.at * SECTOR;
        if e.flushed > file_len {
            return Err(ImageError::corrupt(
                path,
                here,
                format!("log entry {} was written to a file of {} bytes; this one has {file_len} (truncated?)", e.sequence, e.flushed),
            ));
        }
        // A file shorter than the entry's last offset grows to a whole MiB.
        if e.last > r.new_len {
            if e.last > limit {
                return Err(ImageError::corrupt(
                    path,
                    here,
                    format!(
                        "log entry {} grows the file to {} bytes",
                        e.sequence, e.last
                    ),
                ));
            }
            r.new_len = e.last.div_ceil(MIB) * MIB;
        }
        for (at, piece) in e.writes {
            let end = at.saturating_add(piece.len());
            if end > limit {
                return Err(ImageError::corrupt(
                    path,
                    here,
                    format!("log entry {} writes at {at}, past any VHDX", e.sequence),
                ));
            }
            if at < HEADER_AT[1] + 64 * 1024 {
                return Err(ImageError::corrupt(
                    path,
                    here,
                    format!(
                        "log entry {} writes the file identifier or headers at {at}",
                        e.sequence
                    ),
                ));
            }
            // Caps over the whole sequence, not per entry: many entries
            // each under a per-entry cap add up.
            match &piece {
                Piece::Zero(n) => zero_bytes += n,
                Piece::Data(_) => data_bytes += SECTOR,
            }
            if zero_bytes > MAX_ZERO_BYTES || data_bytes > MAX_DATA_BYTES {
                return Err(ImageError::corrupt(
                    path,
                    here,
                    format!(
                        "log sequence ending at entry {} zeroes {zero_bytes} bytes and writes {data_bytes} (snaptree replays at most {MAX_ZERO_BYTES} and {MAX_DATA_BYTES})",
                        r.head_sequence
                    ),
                ));
            }
            r.new_len = r.new_len.max(end);
            r.writes.push((at, piece));
        }
    }
    Ok(r)
}

/// Writes a replay into the file (the caller holds the write lock), then
/// clears the log GUID in both headers, the current one last.
pub fn apply_to_file(file: &dyn Storage, path: &Path, header: &Header, r: &Replay) -> Result<()> {
    // Both new headers' numbers before anything is written.
    let sequences = [
        header.next_sequence(path, 1)?,
        header.next_sequence(path, 2)?,
    ];
    let zeros = vec![0u8; MIB as usize];
    if fileio::file_len(file, path)? < r.new_len {
        file.set_len(r.new_len)
            .map_err(|e| ImageError::io(path, "extend", r.new_len, e))?;
    }
    for (at, piece) in &r.writes {
        match piece {
            Piece::Data(d) => fileio::write_all_at(file, path, d, *at)?,
            Piece::Zero(n) => {
                let mut done = 0;
                while done < *n {
                    let k = (*n - done).min(MIB);
                    fileio::write_all_at(file, path, &zeros[..k as usize], at + done)?;
                    done += k;
                }
            }
        }
    }
    fileio::sync_data(file, path)?;
    // As QEMU: the other slot first, with the next sequence number, so
    // the current header stays valid until the new one is durable.
    for (sequence, slot) in sequences.into_iter().zip([1 - header.slot, header.slot]) {
        let b = header.encode_with(sequence, &[0; 16]);
        fileio::write_all_at(file, path, &b, HEADER_AT[slot])?;
        fileio::sync_data(file, path)?;
    }
    Ok(())
}

/// Start -> (end, data; `None` is zeros).
type Ranges = BTreeMap<u64, (u64, Option<Arc<Vec<u8>>>)>;

/// The file with a replay laid over it, read-only: what a read-only open
/// reads instead of the file. It keeps only the final content of each
/// written range (later writes replace earlier ones): `ranges` maps a
/// start to its end and data (`None`: zeros), no two overlapping; the
/// replay's own list is not kept.
pub struct Replayed {
    inner: Box<dyn Storage>,
    ranges: Ranges,
    new_len: u64,
}

impl Replayed {
    pub fn new(inner: Box<dyn Storage>, replay: Replay) -> Replayed {
        let mut ranges = BTreeMap::new();
        for (at, piece) in replay.writes {
            let end = at + piece.len();
            let data = match piece {
                Piece::Data(d) => Some(d),
                Piece::Zero(_) => None,
            };
            cut(&mut ranges, at, end);
            ranges.insert(at, (end, data));
        }
        Replayed {
            inner,
            ranges,
            new_len: replay.new_len,
        }
    }

    /// How many ranges the overlay holds.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }
}

/// Removes `[s, e)` from `ranges`, keeping the parts of ranges outside
/// it. Every offset is a multiple of 4 KiB and data ranges are one 4 KiB
/// sector, so only zero ranges are ever split.
fn cut(ranges: &mut Ranges, s: u64, e: u64) {
    let first = ranges
        .range(..s)
        .next_back()
        .filter(|(_, (end, _))| *end > s)
        .map(|(&a, _)| a)
        .unwrap_or(s);
    let hit: Vec<u64> = ranges.range(first..e).map(|(&a, _)| a).collect();
    for a in hit {
        let (end, data) = ranges.remove(&a).expect("listed");
        if a < s {
            ranges.insert(a, (s, data.clone()));
        }
        if end > e {
            ranges.insert(e, (end, data));
        }
    }
}

impl Storage for Replayed {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.new_len.max(self.inner.len()?);
        if offset >= len {
            return Ok(0);
        }
        let n = buf.len().min((len - offset) as usize);
        let buf = &mut buf[..n];
        let mut done = 0;
        while done < n {
            match self.inner.read_at(&mut buf[done..], offset + done as u64)? {
                0 => {
                    buf[done..].fill(0);
                    break;
                }
                k => done += k,
            }
        }
        let end = offset + n as u64;
        let from = self
            .ranges
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&a, _)| a);
        for (&at, (stop, data)) in self.ranges.range(from..end) {
            let s = at.max(offset);
            let e = (*stop).min(end);
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - at) as usize..(e - at) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(n)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "VHDX log replayed in memory: read-only",
        ))
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.new_len.max(self.inner.len()?))
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "VHDX log replayed in memory: read-only",
        ))
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }

    fn as_file(&self) -> Option<&std::fs::File> {
        self.inner.as_file()
    }
}
