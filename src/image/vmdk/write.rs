//! Writing a VMDK leaf: flat extents in place, hosted sparse extents by
//! allocating grains at the end of the extent file.
//!
//! Crash safety, in the order of the writes (a crash anywhere leaves a
//! disk that reads every grain as before or as written, plus at most some
//! unreferenced space at the end of the file, which QEMU and VMware
//! ignore):
//! 1. a new grain is written whole (the parts the write does not cover
//!    copied from the parent, or zeros) at the end of the file, and synced;
//! 2. only then does a grain table entry point at it: the primary table's
//!    entry, then the redundant table's;
//! 3. a grain table that does not exist yet is written whole (primary and
//!    redundant copies, each already holding the new entry) at the end of
//!    the file and synced before the grain directory entries (primary,
//!    then redundant) name it.
//!
//! The first write after open gives the disk a new `CID` (as QEMU does;
//! just before the first byte changes, so a refused write changes nothing),
//! so a child made before the write no longer matches it ("parent CID
//! mismatch"). The CID's digits are replaced in place, same length, so
//! the descriptor never tears.
//! A merge's writer keeps the CID (`Writer::keep_cid`, through
//! `Writable::keep_identity`): it writes only bytes readers already see,
//! and children must keep matching, through a crash too.
//!
//! Writers are serialised by the writer mutex; readers take none of it.
//! A grain's mapping is published (table cache) only after its data and
//! entry are in the file.

use super::extents::{ExtentKind, OpenExtent};
use super::tables::{Grain, GrainTables};
use super::VmdkLayer;
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::image::{check_range, BackingRead};
use std::sync::atomic::Ordering;

/// The writer's state (behind the layer's writer mutex).
pub struct Writer {
    cid_updated: bool,
    /// Per extent: where the next grain or grain table goes.
    next: Vec<u64>,
    /// Per extent: file offsets of the redundant grain tables.
    redundant: Vec<Vec<u64>>,
    /// Per extent: the metadata ranges of its file (header, descriptor,
    /// directories, tables), sorted; no grain write may touch them, so a
    /// crafted grain entry cannot make a write overwrite a table.
    meta: Vec<Vec<(u64, u64)>>,
}

/// What a grain write puts in: data, or zeros.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Data(&'a [u8]),
    Zeros(u64),
}

impl Fill<'_> {
    fn len(&self) -> u64 {
        match self {
            Fill::Data(d) => d.len() as u64,
            Fill::Zeros(n) => *n,
        }
    }

    fn slice(&self, from: u64, to: u64) -> Fill<'_> {
        match self {
            Fill::Data(d) => Fill::Data(&d[from as usize..to as usize]),
            Fill::Zeros(_) => Fill::Zeros(to - from),
        }
    }
}

/// Why an extent cannot be written, if it cannot.
pub fn refuse_reason(e: &OpenExtent) -> Option<String> {
    if !e.read_write {
        return Some(format!("{} is not a read-write extent", e.label));
    }
    match (&e.kind, &e.hosted) {
        (ExtentKind::Flat { .. }, _) => None,
        (ExtentKind::Sparse(_), Some(h)) if !h.header.compressed() && h.header.version <= 2 => None,
        (ExtentKind::Sparse(_), Some(h)) if h.header.version == 3 && !h.header.compressed() => {
            Some(
                "a version 3 sparse extent (changed block tracking) is read-only, as in QEMU"
                    .into(),
            )
        }
        _ => Some(format!(
            "{}: snaptree writes hosted sparse and flat VMDK extents only",
            e.label
        )),
    }
}

impl Writer {
    /// No new CID on the first write (see `Writable::keep_identity`).
    pub fn keep_cid(&mut self) {
        self.cid_updated = true;
    }

    pub fn new(extents: &[OpenExtent]) -> Result<Writer> {
        let mut next = Vec::new();
        let mut redundant = Vec::new();
        let mut meta = Vec::new();
        for e in extents {
            let m = metadata_ranges(e);
            if let Some(w) = m.windows(2).find(|w| w[1].0 < w[0].1) {
                return Err(ImageError::corrupt(
                    &e.path,
                    w[1].0,
                    format!(
                        "metadata at [{}, {}) overlaps metadata at [{}, {}) (tables shared by both directories?); not writable",
                        w[1].0, w[1].1, w[0].0, w[0].1
                    ),
                ));
            }
            let (n, r) = match (&e.kind, &e.file) {
                (ExtentKind::Sparse(t), Some(f)) => {
                    let len = fileio::file_len(&**f, &e.path)?;
                    let r = e
                        .hosted
                        .as_ref()
                        .map(|h| h.redundant.clone())
                        .unwrap_or_default();
                    let grains = t.allocated(&**f, &e.path)?;
                    let top = check_layout(&e.path, &m, grains, t.grain)?;
                    (len.max(top).div_ceil(t.grain) * t.grain, r)
                }
                _ => (0, Vec::new()),
            };
            meta.push(m);
            next.push(n);
            redundant.push(r);
        }
        Ok(Writer {
            cid_updated: false,
            next,
            redundant,
            meta,
        })
    }
}

impl VmdkLayer {
    pub(super) fn write_guest(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn BackingRead,
    ) -> Result<()> {
        self.write_fill(offset, Fill::Data(data), below)
    }

    pub(super) fn zero_guest(&self, offset: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        self.write_fill(offset, Fill::Zeros(len), below)
    }

    fn write_fill(&self, offset: u64, fill: Fill<'_>, below: &dyn BackingRead) -> Result<()> {
        check_range(&self.path, self.size, offset, fill.len())?;
        let Some(w) = &self.writer else {
            return Err(ImageError::invalid(&self.path, "image is open read-only"));
        };
        let mut w = w.lock();
        let end = offset + fill.len();
        let mut at = offset;
        let mut i = self.extent_at(offset);
        while at < end {
            let e = &self.extents[i];
            let to = (e.start + e.len).min(end);
            let piece = fill.slice(at - offset, to - offset);
            self.write_extent(&mut w, i, at, piece, below)?;
            at = to;
            i += 1;
        }
        Ok(())
    }

    fn write_extent(
        &self,
        w: &mut Writer,
        i: usize,
        at: u64,
        fill: Fill<'_>,
        below: &dyn BackingRead,
    ) -> Result<()> {
        let e = &self.extents[i];
        let file = e.file.as_deref().expect("writable extents have a file");
        match &e.kind {
            ExtentKind::Flat { offset } => {
                self.touch_cid(w)?;
                write_plain(file, &e.path, offset + (at - e.start), fill)
            }
            ExtentKind::Zero => Err(ImageError::invalid(
                &e.path,
                "a ZERO extent cannot be written",
            )),
            ExtentKind::Sparse(t) => {
                let end = at + fill.len();
                let mut g = at;
                while g < end {
                    let index = (g - e.start) / t.grain;
                    let gend = (e.start + (index + 1) * t.grain).min(end);
                    let piece = fill.slice(g - at, gend - at);
                    self.write_grain(w, i, index, g - e.start - index * t.grain, piece, below)?;
                    g = gend;
                }
                Ok(())
            }
        }
    }

    /// Writes `fill` at `within` bytes into grain `index` of extent `i`.
    fn write_grain(
        &self,
        w: &mut Writer,
        i: usize,
        index: u64,
        within: u64,
        fill: Fill<'_>,
        below: &dyn BackingRead,
    ) -> Result<()> {
        let e = &self.extents[i];
        let ExtentKind::Sparse(t) = &e.kind else {
            unreachable!("sparse extents only")
        };
        let file = e.file.as_deref().expect("sparse extents have a file");
        let grain = t.lookup(file, &e.path, index)?;
        if let Grain::At(off) = grain {
            check_not_metadata(&w.meta[i], &e.path, off, t.grain)?;
            self.touch_cid(w)?;
            return write_plain(file, &e.path, off + within, fill);
        }
        let gstart = e.start + index * t.grain;
        let in_disk = (e.start + e.len - gstart).min(t.grain);
        if let Fill::Zeros(n) = fill {
            let whole = within == 0 && n == in_disk;
            // Already zeros: nothing to write.
            if grain == Grain::Zero || self.backing.is_none() {
                return Ok(());
            }
            if whole && zero_grains(e) {
                self.touch_cid(w)?;
                return self.set_entry(w, i, index, 1, Grain::Zero);
            }
        }
        let mut buf = vec![0u8; t.grain as usize];
        if grain == Grain::Unallocated && self.backing.is_some() {
            below.read_below(gstart, &mut buf[..in_disk as usize])?;
        }
        let dst = &mut buf[within as usize..(within + fill.len()) as usize];
        match fill {
            Fill::Data(d) => dst.copy_from_slice(d),
            Fill::Zeros(_) => dst.fill(0),
        }
        let at = w.next[i];
        if at / 512 > u32::MAX as u64 {
            return Err(ImageError::invalid(
                &e.path,
                "sparse extent file is full (2 TiB)",
            ));
        }
        self.touch_cid(w)?;
        fileio::write_all_at(file, &e.path, &buf, at)?;
        fileio::sync_data(file, &e.path)?;
        w.next[i] = at + t.grain;
        t.grow_file(w.next[i]);
        self.set_entry(w, i, index, (at / 512) as u32, Grain::At(at))
    }

    /// Points grain `index` of extent `i` at `value` (a sector, or 1 for
    /// a zero grain) in both tables, making the tables first if needed.
    fn set_entry(
        &self,
        w: &mut Writer,
        i: usize,
        index: u64,
        value: u32,
        grain: Grain,
    ) -> Result<()> {
        let e = &self.extents[i];
        let ExtentKind::Sparse(t) = &e.kind else {
            unreachable!("sparse extents only")
        };
        let file = e.file.as_deref().expect("sparse extents have a file");
        let gt = index / t.gt_entries;
        let slot_at = (index % t.gt_entries) * 4;
        let primary = t.gt_offset(gt).unwrap_or(0);
        if primary == 0 {
            self.new_tables(w, i, t, gt, slot_at, value)?;
        } else {
            fileio::write_all_at(file, &e.path, &value.to_le_bytes(), primary + slot_at)?;
            if let Some(&r) = w.redundant[i].get(gt as usize).filter(|&&r| r != 0) {
                fileio::write_all_at(file, &e.path, &value.to_le_bytes(), r + slot_at)?;
            }
        }
        t.set_grain(index, grain);
        Ok(())
    }

    /// Writes grain table `gt` (and its redundant copy) holding one entry
    /// at the end of the file, syncs, then names them in the directories.
    fn new_tables(
        &self,
        w: &mut Writer,
        i: usize,
        t: &GrainTables,
        gt: u64,
        slot_at: u64,
        value: u32,
    ) -> Result<()> {
        let e = &self.extents[i];
        let file = e.file.as_deref().expect("sparse extents have a file");
        let h = &e.hosted.as_ref().expect("hosted sparse").header;
        let bytes = t.table_bytes().div_ceil(512) * 512;
        let mut table = vec![0u8; bytes as usize];
        table[slot_at as usize..slot_at as usize + 4].copy_from_slice(&value.to_le_bytes());
        let primary = w.next[i];
        let redundant = h.has_rgd().then_some(primary + bytes);
        let end = redundant.unwrap_or(primary) + bytes;
        if end / 512 > u32::MAX as u64 {
            return Err(ImageError::invalid(
                &e.path,
                "sparse extent file is full (2 TiB)",
            ));
        }
        fileio::write_all_at(file, &e.path, &table, primary)?;
        add_range(&mut w.meta[i], primary, primary + bytes);
        if let Some(r) = redundant {
            fileio::write_all_at(file, &e.path, &table, r)?;
            add_range(&mut w.meta[i], r, r + bytes);
        }
        fileio::sync_data(file, &e.path)?;
        w.next[i] = end.div_ceil(t.grain) * t.grain;
        t.grow_file(end);
        let entry = |at: u64| ((at / 512) as u32).to_le_bytes();
        fileio::write_all_at(file, &e.path, &entry(primary), h.gd_offset * 512 + gt * 4)?;
        t.set_gt_offset(gt, primary);
        if let Some(r) = redundant {
            fileio::write_all_at(file, &e.path, &entry(r), h.rgd_offset * 512 + gt * 4)?;
            if let Some(slot) = w.redundant[i].get_mut(gt as usize) {
                *slot = r;
            }
        }
        Ok(())
    }

    /// The first write gives the disk a new CID (see the module docs).
    fn touch_cid(&self, w: &mut Writer) -> Result<()> {
        if w.cid_updated {
            return Ok(());
        }
        let mut text = vec![0u8; self.desc_len as usize];
        fileio::read_exact_at(
            &*self.file,
            &self.path,
            &mut text,
            self.desc_at,
            "VMDK descriptor",
        )?;
        let Some((at, digits)) = cid_digits(&text) else {
            return Err(ImageError::corrupt(
                &self.path,
                self.desc_at,
                "descriptor lost its CID line",
            ));
        };
        let old = self.cid.load(Ordering::Relaxed);
        let new = new_cid(digits, old);
        let s = format!("{new:0digits$x}");
        fileio::write_all_at(
            &*self.file,
            &self.path,
            s.as_bytes(),
            self.desc_at + at as u64,
        )?;
        fileio::sync_data(&*self.file, &self.path)?;
        self.cid.store(new, Ordering::Relaxed);
        w.cid_updated = true;
        Ok(())
    }

    pub(super) fn flush_writes(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        for e in &self.extents {
            if let Some(f) = &e.file {
                fileio::sync_data(&**f, &e.path)?;
            }
        }
        fileio::sync_data(&*self.file, &self.path)
    }
}

/// A disk whose extents share a file (or use the descriptor file) would
/// let writes to one extent change another, or the descriptor: refused
/// for writing. Storage that is no file (memory) has nothing to compare.
pub fn check_distinct_files(
    path: &std::path::Path,
    image: &dyn crate::storage::Storage,
    extents: &[OpenExtent],
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |s: &dyn crate::storage::Storage| {
        s.as_file()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()))
    };
    let mut seen = Vec::new();
    if let Some(i) = id(image) {
        seen.push(i);
    }
    for e in extents.iter().filter(|e| !e.same_as_image) {
        if let Some(i) = e.file.as_deref().and_then(id) {
            if seen.contains(&i) {
                return Err(ImageError::corrupt(
                    path,
                    0,
                    format!("{} is used twice (by two extents, or as descriptor and extent); not writable", e.path.display()),
                ));
            }
            seen.push(i);
        }
    }
    Ok(())
}

/// The metadata ranges of a sparse extent's file, sorted.
fn metadata_ranges(e: &OpenExtent) -> Vec<(u64, u64)> {
    let (ExtentKind::Sparse(t), Some(hosted)) = (&e.kind, &e.hosted) else {
        return Vec::new();
    };
    let h = &hosted.header;
    let dir = h.gd_entries() * 4;
    let mut v = vec![(0, 512), (h.gd_offset * 512, h.gd_offset * 512 + dir)];
    if h.has_descriptor() {
        v.push((h.desc_offset * 512, (h.desc_offset + h.desc_size) * 512));
    }
    if h.has_rgd() {
        v.push((h.rgd_offset * 512, h.rgd_offset * 512 + dir));
    }
    let tb = t.table_bytes();
    for at in t
        .gt_offsets()
        .into_iter()
        .chain(hosted.redundant.iter().copied())
    {
        if at != 0 {
            v.push((at, at + tb));
        }
    }
    v.sort_unstable();
    v
}

/// Refuses a sparse extent whose grains overlap each other or the
/// metadata (a write to one guest grain would change another, or a
/// table); returns the highest end of any of them, below which nothing
/// is appended. `meta` is sorted and free of overlaps.
fn check_layout(
    path: &std::path::Path,
    meta: &[(u64, u64)],
    mut grains: Vec<u64>,
    grain: u64,
) -> Result<u64> {
    grains.sort_unstable();
    let mut all: Vec<(u64, u64, bool)> = meta.iter().map(|&(s, e)| (s, e, false)).collect();
    all.extend(grains.into_iter().map(|o| (o, o + grain, true)));
    all.sort_unstable();
    let what = |g: bool| if g { "grain" } else { "metadata" };
    let mut top: Option<(u64, u64, bool)> = None;
    for &(s, e, g) in &all {
        if let Some((ps, pe, pg)) = top.filter(|t| s < t.1) {
            return Err(ImageError::corrupt(
                path,
                s,
                format!(
                    "{} at [{s}, {e}) overlaps {} at [{ps}, {pe}); not writable",
                    what(g),
                    what(pg)
                ),
            ));
        }
        if top.is_none_or(|t| e > t.1) {
            top = Some((s, e, g));
        }
    }
    Ok(top.map_or(0, |t| t.1))
}

fn add_range(v: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    let i = v.partition_point(|r| r.0 < s);
    v.insert(i, (s, e));
}

/// Refuses a write into the grain at `at` if it overlaps metadata.
fn check_not_metadata(
    meta: &[(u64, u64)],
    path: &std::path::Path,
    at: u64,
    grain: u64,
) -> Result<()> {
    let end = at + grain;
    // The ranges do not overlap each other, so sorted by start they are
    // sorted by end too: the first that ends after `at` is the only
    // candidate.
    let i = meta.partition_point(|r| r.1 <= at);
    match meta.get(i) {
        Some(&(s, e)) if s < end => Err(ImageError::corrupt(
            path,
            at,
            format!("grain at offset {at} overlaps metadata at [{s}, {e}); refusing to write it"),
        )),
        _ => Ok(()),
    }
}

fn zero_grains(e: &OpenExtent) -> bool {
    e.hosted.as_ref().is_some_and(|h| h.header.zero_grain())
}

/// Writes `fill` at `at` of a file, zeros in bounded pieces.
fn write_plain(
    file: &dyn crate::storage::Storage,
    path: &std::path::Path,
    at: u64,
    fill: Fill<'_>,
) -> Result<()> {
    match fill {
        Fill::Data(d) => fileio::write_all_at(file, path, d, at),
        Fill::Zeros(n) => {
            let chunk = vec![0u8; n.min(1 << 20) as usize];
            let mut done = 0;
            while done < n {
                let len = (n - done).min(chunk.len() as u64) as usize;
                fileio::write_all_at(file, path, &chunk[..len], at + done)?;
                done += len as u64;
            }
            Ok(())
        }
    }
}

/// Where the `CID=` value's hex digits are in descriptor text, and how
/// many there are.
pub fn cid_digits(text: &[u8]) -> Option<(usize, usize)> {
    let mut at = 0;
    for line in text.split(|&b| b == b'\n') {
        let trimmed = line
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(line.len());
        if line[trimmed..].starts_with(b"CID=") {
            let start = at + trimmed + 4;
            let n = text[start..]
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            return (1..=8).contains(&n).then_some((start, n));
        }
        at += line.len() + 1;
    }
    None
}

/// A random CID of `digits` hex digits, different from `old`.
pub fn new_cid(digits: usize, old: u32) -> u32 {
    let mask = if digits >= 8 {
        u32::MAX
    } else {
        (1u32 << (4 * digits)) - 1
    };
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    let mut v = if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        t ^ std::process::id().rotate_left(16)
    } & mask;
    // Never the old value, and never "no parent" (ffffffff).
    if v == old || v == super::descriptor::NO_PARENT {
        v = (v ^ 1) & mask;
    }
    v
}
