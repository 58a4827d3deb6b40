//! LVM2 logical volumes: finds the PVs among the volumes already found
//! (partitions and whole disks), takes each VG's newest metadata (highest
//! seqno) from its PVs, matches the VG's PVs by UUID, and turns every
//! visible LV into pieces on the disks. Linear LVs (striped segments of one
//! stripe) become readable volumes, and so do striped LVs: one piece per
//! stripe chunk, up to 65536 chunks. Everything else (thin, cache, raid,
//! mirror, snapshot ...) is listed with the reason it cannot be read.
//! Hidden LVs (a thin pool's data and metadata, raid images) are not listed.

use super::lvm_label::{self, Label};
use super::lvm_text::{self, Section, Value};
use super::{Piece, Source, Volume, VolumeBytes};
use crate::guest::ReadBytes;
use std::collections::HashMap;
use std::sync::Arc;

const SECTOR: u64 = 512;
/// More segments than any real LV has; bounds the work of hostile text.
const MAX_SEGMENTS: i64 = 4096;

/// A PV found on a volume.
struct Pv {
    /// Index into the scanned volumes.
    volume: usize,
    label: Label,
}

/// The LVs of every VG whose PVs are among `volumes`.
pub fn find(
    volumes: &[Volume],
    disks: &[Arc<dyn ReadBytes>],
    problems: &mut Vec<String>,
) -> Vec<Volume> {
    let mut pvs = Vec::new();
    for (index, v) in volumes.iter().enumerate() {
        if v.unreadable.is_some() {
            continue;
        }
        let bytes = VolumeBytes::new(v, disks);
        match lvm_label::read(&bytes) {
            Ok(Some(label)) => pvs.push(Pv {
                volume: index,
                label,
            }),
            Ok(None) => {}
            Err(e) => problems.push(format!("{}: {e}", v.name)),
        }
    }
    // A cloned disk attached twice: LVM refuses duplicate PVs; the first
    // copy is used and a problem says so.
    for (i, pv) in pvs.iter().enumerate() {
        if let Some(first) = pvs[..i].iter().find(|p| p.label.uuid == pv.label.uuid) {
            problems.push(format!(
                "{}: PV {} also on {}; using {}",
                volumes[pv.volume].name,
                lvm_label::dashed(&pv.label.uuid),
                volumes[first.volume].name,
                volumes[first.volume].name
            ));
        }
    }
    // Newest metadata per VG id.
    let mut vgs: HashMap<String, (i64, String, Section)> = HashMap::new();
    for pv in &pvs {
        let Some(text) = &pv.label.text else { continue };
        let top = match lvm_text::parse(text) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!(
                    "{}: LVM metadata text: {e}",
                    volumes[pv.volume].name
                ));
                continue;
            }
        };
        let Some((name, vg)) = top.sections().next() else {
            problems.push(format!(
                "{}: LVM metadata text holds no VG",
                volumes[pv.volume].name
            ));
            continue;
        };
        let id = vg.str("id").unwrap_or("").to_string();
        let seqno = vg.int("seqno").unwrap_or(-1);
        if vgs.get(&id).is_none_or(|(s, _, _)| *s < seqno) {
            vgs.insert(id, (seqno, name.to_string(), vg.clone()));
        }
    }
    let mut ids: Vec<&String> = vgs.keys().collect();
    ids.sort_by_key(|id| &vgs[*id].1);
    let mut out = Vec::new();
    for id in ids {
        let (_, name, vg) = &vgs[id];
        out.extend(vg_lvs(name, vg, &pvs, volumes, problems));
    }
    out
}

/// LVM's dash escaping, as device-mapper names show it: `-` becomes `--`.
fn escape(name: &str) -> String {
    name.replace('-', "--")
}

/// The dashless UUID, as the label stores it.
fn bare(uuid: &str) -> String {
    uuid.chars().filter(|&c| c != '-').collect()
}

/// A VG's PV as its metadata describes it, with where it was found.
struct PvPlace<'a> {
    uuid: String,
    found: Option<&'a Volume>,
    pe_start: u64,
    pe_count: u64,
}

fn vg_lvs(
    name: &str,
    vg: &Section,
    pvs: &[Pv],
    volumes: &[Volume],
    problems: &mut Vec<String>,
) -> Vec<Volume> {
    let extent = vg.int("extent_size").unwrap_or(0);
    if !(1..=(1 << 32)).contains(&extent) {
        problems.push(format!("VG {name}: bad extent_size {extent}"));
        return Vec::new();
    }
    let extent = extent as u64 * SECTOR;
    let mut places = HashMap::new();
    for (key, pv) in vg
        .section("physical_volumes")
        .map(|s| s.sections())
        .into_iter()
        .flatten()
    {
        let uuid = bare(pv.str("id").unwrap_or(""));
        let found = pvs
            .iter()
            .find(|p| p.label.uuid == uuid)
            .map(|p| &volumes[p.volume]);
        let place = PvPlace {
            uuid: lvm_label::dashed(&uuid),
            found,
            pe_start: pv.int("pe_start").unwrap_or(-1).max(0) as u64 * SECTOR,
            pe_count: pv.int("pe_count").unwrap_or(0).max(0) as u64,
        };
        if found.is_none() {
            problems.push(format!("VG {name}: PV {} missing", place.uuid));
        }
        places.insert(key.to_string(), place);
    }
    let mut lvs: Vec<(&str, &Section)> = vg
        .section("logical_volumes")
        .map(|s| s.sections().collect())
        .unwrap_or_default();
    // In name order, as `lvs` lists them (the text keeps no useful order).
    lvs.sort_by_key(|(name, _)| *name);
    let first_disk = places
        .values()
        .find_map(|p| p.found.map(|v| v.disk))
        .unwrap_or(0);
    let mut out = Vec::new();
    for (lv_name, lv) in lvs {
        let visible = lv
            .list("status")
            .is_some_and(|s| s.iter().any(|v| *v == Value::Str("VISIBLE".into())));
        if !visible {
            continue;
        }
        let full = format!("{}-{}", escape(name), escape(lv_name));
        let (pieces, size, why) = match layout(lv, extent, &places) {
            Ok((pieces, size)) => (pieces, size, None),
            Err((size, why)) => (Vec::new(), size, Some(why)),
        };
        if let Some(why) = &why {
            if !why.contains("not supported") {
                problems.push(format!("{full}: {why}"));
            }
        }
        out.push(Volume {
            name: full,
            disk: pieces.first().map_or(first_disk, |p: &Piece| p.disk),
            source: Source::Lvm,
            pieces,
            size,
            part_type: None,
            part_type_name: None,
            part_name: None,
            unreadable: why,
        });
    }
    out
}

/// The most pieces an LV may have (striped LVs have one per chunk).
const MAX_PIECES: usize = 1 << 16;

/// The pieces and size of a linear or striped LV; or its declared size and why it
/// cannot be read.
fn layout(
    lv: &Section,
    extent: u64,
    places: &HashMap<String, PvPlace>,
) -> Result<(Vec<Piece>, u64), (u64, String)> {
    let count = lv.int("segment_count").unwrap_or(0);
    if !(1..=MAX_SEGMENTS).contains(&count) {
        return Err((0, format!("segment_count {count} out of range")));
    }
    let mut segments = Vec::new();
    for n in 1..=count {
        match lv.section(&format!("segment{n}")) {
            Some(s) => segments.push(s),
            None => return Err((0, format!("segment{n} missing from the metadata"))),
        }
    }
    let extents: u64 = segments
        .iter()
        .map(|s| s.int("extent_count").unwrap_or(0).max(0) as u64)
        .sum();
    let size = extents.saturating_mul(extent);
    let fail = |why: String| Err((size, why));
    segments.sort_by_key(|s| s.int("start_extent").unwrap_or(0));
    let mut pieces: Vec<Piece> = Vec::new();
    let mut next = 0u64;
    for s in segments {
        let start = s.int("start_extent").unwrap_or(-1);
        let len = s.int("extent_count").unwrap_or(0);
        if start < 0 || start as u64 != next || len <= 0 {
            return fail(format!(
                "segment at extent {start} ({len} extents) does not follow extent {next}"
            ));
        }
        next += len as u64;
        let budget = MAX_PIECES.saturating_sub(pieces.len());
        for piece in segment(s, len as u64, extent, places, budget).map_err(|why| (size, why))? {
            match pieces.last_mut() {
                Some(last) if last.disk == piece.disk && last.offset + last.len == piece.offset => {
                    last.len += piece.len
                }
                _ => pieces.push(piece),
            }
        }
    }
    Ok((pieces, size))
}

/// The pieces of one segment of `len` extents: one run per stripe for a
/// linear segment; for a striped one, its chunks in LV order (chunk `c` is
/// on stripe `c % n`, row `c / n`). At most `budget` pieces.
fn segment(
    s: &Section,
    len: u64,
    extent: u64,
    places: &HashMap<String, PvPlace>,
    budget: usize,
) -> Result<Vec<Piece>, String> {
    let kind = s.str("type").unwrap_or("?");
    if kind != "striped" {
        return Err(format!("{kind} LV: not supported"));
    }
    let n = s.int("stripe_count").unwrap_or(0);
    let list = s.list("stripes").unwrap_or(&[]);
    if !(1..=64).contains(&n) || list.len() != 2 * n as usize || !len.is_multiple_of(n as u64) {
        return Err(format!(
            "striped segment with {n} stripes over {len} extents"
        ));
    }
    let per = len / n as u64;
    let mut runs = Vec::new();
    for pair in list.chunks_exact(2) {
        let (Value::Str(pv), Value::Int(pe)) = (&pair[0], &pair[1]) else {
            return Err("segment with a malformed stripe list".into());
        };
        runs.push(stripe_run(pv, *pe, per, extent, places)?);
    }
    if n == 1 {
        return Ok(runs.pop().unwrap());
    }
    let chunk = s.int("stripe_size").unwrap_or(0).max(0) as u64 * SECTOR;
    if chunk == 0 || !extent.is_multiple_of(chunk) {
        return Err(format!(
            "striped LV with stripe size {chunk}: not supported"
        ));
    }
    let rows = per * (extent / chunk);
    if rows.saturating_mul(n as u64) > budget as u64 {
        return Err(format!(
            "striped LV of more than {MAX_PIECES} chunks: not supported"
        ));
    }
    let mut out = Vec::new();
    for row in 0..rows {
        for run in &runs {
            let piece =
                translate(run, row * chunk, chunk).ok_or("stripe shorter than its extents")?;
            out.extend(piece);
        }
    }
    Ok(out)
}

/// Disk pieces of `count` extents of `pv` from extent `pe`.
fn stripe_run(
    pv: &str,
    pe: i64,
    count: u64,
    extent: u64,
    places: &HashMap<String, PvPlace>,
) -> Result<Vec<Piece>, String> {
    let place = places
        .get(pv)
        .ok_or_else(|| format!("segment names unknown PV {pv}"))?;
    let volume = place
        .found
        .ok_or_else(|| format!("PV {} missing", place.uuid))?;
    if pe < 0 || (pe as u64).saturating_add(count) > place.pe_count {
        return Err(format!(
            "segment extents {pe}+{count} past the {} of PV {}",
            place.pe_count, place.uuid
        ));
    }
    let from = place
        .pe_start
        .saturating_add((pe as u64).saturating_mul(extent));
    translate(&volume.pieces, from, count.saturating_mul(extent)).ok_or_else(|| {
        format!(
            "extents at offset {from} of PV {} lie past its end",
            place.uuid
        )
    })
}

/// `[from, from+len)` of the volume made of `pieces`, as pieces of its
/// disks; `None` if it runs past the volume.
fn translate(pieces: &[Piece], from: u64, len: u64) -> Option<Vec<Piece>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let (mut from, mut left) = (from, len);
    for p in pieces {
        if left == 0 {
            break;
        }
        if from < at + p.len {
            let inside = from - at;
            let take = (p.len - inside).min(left);
            out.push(Piece {
                disk: p.disk,
                offset: p.offset + inside,
                len: take,
            });
            from += take;
            left -= take;
        }
        at += p.len;
    }
    (left == 0).then_some(out)
}
