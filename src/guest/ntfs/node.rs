//! One file (an MFT base record and its extension records) with its
//! attributes gathered: the `$ATTRIBUTE_LIST`, when present, names the
//! records holding the rest, and a non-resident attribute split over
//! several records is joined into one runlist. What the rest of the reader
//! needs is kept: standard information, streams, the index root, the
//! reparse data.

use super::mft::Vol;
use super::record::*;
use super::runlist::{self, Map};
use crate::guest::{GuestError, GuestResult, Timestamp};
use std::collections::BTreeMap;

/// Largest attribute list read (a file fragmented into some 100,000
/// extents; Windows stops far below).
const MAX_ATTR_LIST: u64 = 4 << 20;
/// Most records one file may span.
const MAX_EXTENSIONS: usize = 8192;

/// The low 48 bits of a file reference: the record number.
pub fn mref_no(r: u64) -> u64 {
    r & 0x0000_FFFF_FFFF_FFFF
}

/// An attribute's value: in the record, or in clusters.
#[derive(Clone, Debug)]
pub enum Data {
    Resident(Vec<u8>),
    NonResident {
        map: Map,
        size: u64,
        initialized: u64,
        /// log2 clusters per compression unit; 0 when not compressed.
        cu: u8,
        /// Volume offset of the first extent's header (for errors).
        at: u64,
    },
}

/// One attribute (type, name) with all its extents joined.
#[derive(Clone, Debug)]
pub struct Stream {
    /// Volume offset of the (first) attribute header, for errors.
    pub at: u64,
    pub ty: u32,
    pub name: Vec<u16>,
    pub flags: u16,
    pub data: Data,
}

impl Stream {
    pub fn size(&self) -> u64 {
        match &self.data {
            Data::Resident(v) => v.len() as u64,
            Data::NonResident { size, .. } => *size,
        }
    }

    pub fn resident(&self) -> Option<&[u8]> {
        match &self.data {
            Data::Resident(v) => Some(v),
            _ => None,
        }
    }
}

/// `$STANDARD_INFORMATION`: the times and DOS attributes shown.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdInfo {
    pub crtime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub atime: Timestamp,
    pub attrs: u32,
}

/// NTFS time (100 ns since 1601-01-01 UTC) as Unix time.
pub fn ntfs_time(t: u64) -> Timestamp {
    const EPOCH_DIFF: i128 = 116_444_736_000_000_000;
    let t = t as i128 - EPOCH_DIFF;
    Timestamp {
        secs: t.div_euclid(10_000_000) as i64,
        nsecs: (t.rem_euclid(10_000_000) * 100) as u32,
    }
}

pub struct Node {
    pub no: u64,
    /// Volume offset of the base record, for errors.
    pub offset: u64,
    pub seq: u16,
    pub link_count: u16,
    pub is_dir: bool,
    pub si: StdInfo,
    pub streams: Vec<Stream>,
}

impl Node {
    pub fn stream(&self, ty: u32, name: &[u16]) -> Option<&Stream> {
        self.streams.iter().find(|s| s.ty == ty && s.name == name)
    }

    pub fn data(&self) -> Option<&Stream> {
        self.stream(AT_DATA, &[])
    }
}

/// Loads file `no` (a base record).
pub fn load(vol: &Vol, no: u64) -> GuestResult<Node> {
    let base = vol.record(no)?;
    if base.base != 0 {
        // An extension record is no file of its own.
        return Err(GuestError::NotFound);
    }
    let mut attrs = base.attributes(&vol.name)?;
    if let Some(list) = attrs.iter().find(|a| a.ty == AT_ATTRIBUTE_LIST).cloned() {
        let raw = list_value(vol, &list)?;
        let mut seen = vec![no];
        for r in list_refs(vol, &raw, list.offset)? {
            let rno = mref_no(r);
            if seen.contains(&rno) {
                continue;
            }
            if seen.len() >= MAX_EXTENSIONS {
                return Err(vol.corrupt(
                    list.offset,
                    format!("attribute list of record {no} names over {MAX_EXTENSIONS} records"),
                ));
            }
            seen.push(rno);
            let ext = vol.record(rno).map_err(|e| match e {
                GuestError::NotFound => vol.corrupt(
                    list.offset,
                    format!("attribute list names record {rno} past $MFT"),
                ),
                e => e,
            })?;
            if mref_no(ext.base) != no {
                return Err(vol.corrupt(
                    ext.offset + 0x20,
                    format!(
                        "record {rno} in the attribute list of {no} belongs to {}",
                        mref_no(ext.base)
                    ),
                ));
            }
            attrs.extend(
                ext.attributes(&vol.name)?
                    .into_iter()
                    .filter(|a| a.ty != AT_ATTRIBUTE_LIST),
            );
        }
    }
    let streams = join(vol, attrs)?;
    let si = streams
        .iter()
        .find(|s| s.ty == AT_STANDARD_INFORMATION)
        .and_then(|s| s.resident())
        .filter(|v| v.len() >= 0x24)
        .map(|v| StdInfo {
            crtime: ntfs_time(le64(v, 0)),
            mtime: ntfs_time(le64(v, 8)),
            ctime: ntfs_time(le64(v, 0x10)),
            atime: ntfs_time(le64(v, 0x18)),
            attrs: le32(v, 0x20),
        })
        .ok_or_else(|| {
            vol.corrupt(
                base.offset,
                format!("MFT record {no}: no $STANDARD_INFORMATION"),
            )
        })?;
    Ok(Node {
        no,
        offset: base.offset,
        seq: base.seq,
        link_count: base.link_count,
        is_dir: base.flags & REC_DIRECTORY != 0,
        si,
        streams,
    })
}

/// The attribute list's bytes (resident, or read through its runs).
fn list_value(vol: &Vol, a: &Attribute) -> GuestResult<Vec<u8>> {
    match &a.body {
        Body::Resident(v) => Ok(v.clone()),
        Body::NonResident(nr) => {
            if nr.size > MAX_ATTR_LIST || nr.lowest_vcn != 0 {
                return Err(vol.corrupt(a.offset, format!("attribute list of {} bytes", nr.size)));
            }
            let runs = runlist::decode(
                &vol.name,
                &nr.pairs,
                nr.pairs_offset,
                0,
                (vol.boot.clusters, vol.boot.cluster),
            )?;
            let s = Stream {
                at: a.offset,
                ty: a.ty,
                name: Vec::new(),
                flags: 0,
                data: Data::NonResident {
                    map: Map::join(&vol.name, a.offset, vec![runs])?,
                    size: nr.size,
                    initialized: nr.initialized.min(nr.size),
                    cu: 0,
                    at: a.offset,
                },
            };
            let mut buf = vec![0u8; nr.size as usize];
            let n = super::data::read(vol, &s, 0, &mut buf)?;
            buf.truncate(n);
            Ok(buf)
        }
    }
}

/// The record references an attribute list holds, in order.
fn list_refs(vol: &Vol, raw: &[u8], at: u64) -> GuestResult<Vec<u64>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 0x1A <= raw.len() {
        let len = usize::from(le16(raw, i + 4));
        if len < 0x1A || i + len > raw.len() {
            return Err(vol.corrupt(at, format!("attribute list entry at {i} has length {len}")));
        }
        out.push(le64(raw, i + 0x10));
        i += len;
    }
    Ok(out)
}

/// One non-resident extent: its header, attribute flags, volume offset.
type Extent = (NonRes, u16, u64);

/// Joins attributes into streams: resident ones as they are, non-resident
/// extents of one (type, name) by lowest VCN.
fn join(vol: &Vol, attrs: Vec<Attribute>) -> GuestResult<Vec<Stream>> {
    let mut out = Vec::new();
    let mut extents: BTreeMap<(u32, Vec<u16>), Vec<Extent>> = BTreeMap::new();
    for a in attrs {
        match a.body {
            Body::Resident(v) => out.push(Stream {
                at: a.offset,
                ty: a.ty,
                name: a.name,
                flags: a.flags,
                data: Data::Resident(v),
            }),
            Body::NonResident(nr) => extents
                .entry((a.ty, a.name))
                .or_default()
                .push((nr, a.flags, a.offset)),
        }
    }
    for ((ty, name), mut ex) in extents {
        ex.sort_by_key(|e| e.0.lowest_vcn);
        let (first, flags, at) = (&ex[0].0, ex[0].1, ex[0].2);
        if first.lowest_vcn != 0 {
            return Err(vol.corrupt(at, "non-resident attribute has no extent at VCN 0"));
        }
        let (size, initialized, cu) = (
            first.size,
            first.initialized.min(first.size),
            first.compression_unit,
        );
        let mut pieces = Vec::new();
        for (nr, _, at) in &ex {
            let runs = runlist::decode(
                &vol.name,
                &nr.pairs,
                nr.pairs_offset,
                nr.lowest_vcn,
                (vol.boot.clusters, vol.boot.cluster),
            )?;
            let end = runs.last().map_or(nr.lowest_vcn, |r| r.vcn + r.len);
            if end != nr.highest_vcn.wrapping_add(1)
                && !(runs.is_empty() && nr.highest_vcn == u64::MAX)
            {
                return Err(vol.corrupt(
                    *at,
                    format!(
                        "runlist ends at VCN {end}, header says {}",
                        nr.highest_vcn.wrapping_add(1)
                    ),
                ));
            }
            pieces.push(runs);
        }
        let map = Map::join(&vol.name, at, pieces)?;
        let cu = if flags & ATTR_COMPRESSED != 0 { cu } else { 0 };
        // Units beyond 2^16 clusters or 1 MiB are no NTFS (it uses 16
        // clusters); refused here so no reader shifts by a wild count.
        let unit = vol.boot.cluster.checked_shl(u32::from(cu));
        if cu > 16 || unit.is_none_or(|u| u > super::data::MAX_UNIT) {
            return Err(vol.corrupt(at, format!("compression unit of 2^{cu} clusters")));
        }
        out.push(Stream {
            at,
            ty,
            name,
            flags,
            data: Data::NonResident {
                map,
                size,
                initialized,
                cu,
                at,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_convert_from_1601() {
        assert_eq!(
            ntfs_time(116_444_736_000_000_000),
            Timestamp { secs: 0, nsecs: 0 }
        );
        assert_eq!(
            ntfs_time(116_444_736_000_000_001),
            Timestamp {
                secs: 0,
                nsecs: 100
            }
        );
        assert_eq!(ntfs_time(0).secs, -11_644_473_600);
    }
}
