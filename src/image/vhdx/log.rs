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
//! them over the file in memory ([`Replayed`]); a read-write open that
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
/// Zero descriptors may not make the overlay larger than this.
const MAX_ZERO_SECTORS: u64 = 1 << 18;

/// One 4 KiB write of a replay: its file offset and bytes (`None`: zeros).
pub type Write = (u64, Option<Arc<Vec<u8>>>);

/// What a log sequence writes: 4 KiB sectors by file offset (`None` is a
/// sector of zeros), and the length the file grows to.
#[derive(Debug, Default)]
pub struct Replay {
    pub sectors: BTreeMap<u64, Option<Arc<Vec<u8>>>>,
    /// Writes in log order (file replay applies these).
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
    let mut zero_sectors = 0u64;
    for i in 0..count as usize {
        let d = &e[64 + i * 32..96 + i * 32];
        let at = le_u64(d, 16);
        if le_u64(d, 24) != sequence || !at.is_multiple_of(SECTOR) {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let len = le_u64(d, 8);
                zero_sectors = zero_sectors.checked_add(len / SECTOR)?;
                if !len.is_multiple_of(SECTOR) || zero_sectors > MAX_ZERO_SECTORS {
                    return None;
                }
                for s in 0..len / SECTOR {
                    out.push((at.checked_add(s * SECTOR)?, None));
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
                out.push((at, Some(Arc::new(b))));
                data += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Finds the active log sequence of a file whose current header is
/// `header`; `None` when there is nothing to replay. `forbidden` are the
/// ranges the log must not overlap (headers, region tables).
pub fn find(
    file: &dyn Storage,
    path: &Path,
    header: &Header,
    file_len: u64,
) -> Result<Option<Replay>> {
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
    let mut buf = vec![0u8; len as usize];
    read_exact_at(file, path, &mut buf, off, "VHDX log")?;
    let mut log = Log {
        path,
        offset: off,
        buf,
        guid: header.log_guid,
        budget: 16 * len + 64 * MIB,
    };
    let mut best: Option<Vec<Entry>> = None;
    let n = log.sectors();
    let mut at = 0;
    while at < n {
        let Some(first) = log.entry(at)? else {
            at += 1;
            continue;
        };
        let mut used = first.sectors;
        let mut seq = vec![first];
        // Consecutive sequence numbers; never more than the whole buffer,
        // so a log that wraps onto itself ends.
        while used < n {
            match log.entry((at + used) % n)? {
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
        // The highest head wins; for the same head (a sequence that wraps
        // past the end of the buffer is also seen from its last part at
        // the start) the longer, complete one.
        let key = |s: &[Entry]| (s.last().expect("one").sequence, s.len());
        if best.as_deref().is_none_or(|b| key(b) < key(&seq)) {
            best = Some(seq);
        }
        at += used;
    }
    let Some(seq) = best else {
        return Ok(None);
    };
    build(path, off, file_len, seq).map(Some)
}

fn build(path: &Path, log_at: u64, file_len: u64, seq: Vec<Entry>) -> Result<Replay> {
    let mut r = Replay {
        new_len: file_len,
        entries: seq.len(),
        ..Replay::default()
    };
    r.head_sequence = seq.last().map_or(0, |e| e.sequence);
    for e in seq {
        if e.flushed > file_len {
            return Err(ImageError::corrupt(
                path,
                log_at,
                format!("log entry {} was written to a file of {} bytes; this one has {file_len} (truncated?)", e.sequence, e.flushed),
            ));
        }
        // A file shorter than the entry's last offset grows to a whole MiB.
        if e.last > r.new_len {
            if e.last > super::metadata::MAX_DISK_SIZE * 2 {
                return Err(ImageError::corrupt(
                    path,
                    log_at,
                    format!(
                        "log entry {} grows the file to {} bytes",
                        e.sequence, e.last
                    ),
                ));
            }
            r.new_len = e.last.div_ceil(MIB) * MIB;
        }
        for (at, data) in e.writes {
            if at > super::metadata::MAX_DISK_SIZE * 2 {
                return Err(ImageError::corrupt(
                    path,
                    log_at,
                    format!("log entry {} writes at {at}, past any VHDX", e.sequence),
                ));
            }
            if at < HEADER_AT[1] + 64 * 1024 {
                return Err(ImageError::corrupt(
                    path,
                    log_at,
                    format!(
                        "log entry {} writes the file identifier or headers at {at}",
                        e.sequence
                    ),
                ));
            }
            r.sectors.insert(at, data.clone());
            r.writes.push((at, data));
        }
    }
    if let Some((&last, _)) = r.sectors.last_key_value() {
        r.new_len = r.new_len.max(last + SECTOR);
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
    let zeros = vec![0u8; SECTOR as usize];
    if fileio::file_len(file, path)? < r.new_len {
        file.set_len(r.new_len)
            .map_err(|e| ImageError::io(path, "extend", r.new_len, e))?;
    }
    for (at, data) in &r.writes {
        let b = data.as_ref().map_or(&zeros[..], |d| &d[..]);
        fileio::write_all_at(file, path, b, *at)?;
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

/// The file with a replay laid over it, read-only: what a read-only open
/// reads instead of the file.
pub struct Replayed {
    pub inner: Box<dyn Storage>,
    pub replay: Replay,
}

impl Storage for Replayed {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.replay.new_len.max(self.inner.len()?);
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
        let from = offset / SECTOR * SECTOR;
        for (&at, data) in self.replay.sectors.range(from..end) {
            let s = at.max(offset);
            let e = (at + SECTOR).min(end);
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
        Ok(self.replay.new_len.max(self.inner.len()?))
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
