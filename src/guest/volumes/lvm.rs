//! LVM2 logical volumes: finds the PVs among the volumes already found
//! (partitions and whole disks), takes each VG's newest metadata (highest
//! seqno) from its PVs, matches the VG's PVs by UUID, and turns every
//! visible LV into pieces on the disks. Linear LVs (striped segments of one
//! stripe) become readable volumes; everything else (striped over several
//! stripes, thin, cache, raid, mirror, snapshot ...) is listed with the
//! reason it cannot be read.

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
    let first_disk = places
        .values()
        .find_map(|p| p.found.map(|v| v.disk))
        .unwrap_or(0);
    let mut out = Vec::new();
    for (lv_name, lv) in vg
        .section("logical_volumes")
        .map(|s| s.sections())
        .into_iter()
        .flatten()
    {
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

/// The pieces and size of a linear LV; or its declared size and why it
/// cannot be read.
fn layout(
    lv: &Section,
    extent: u64,
    places: &HashMap<String, PvPlace>,
) -> Result<(Vec<Piece>, u64), (u64, String)> {
    let count = lv.int("segment_count").unwrap_or(0);
    let mut segments = Vec::new();
    for n in 1..=count.clamp(0, MAX_SEGMENTS) {
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
        let kind = s.str("type").unwrap_or("?");
        let stripes = s.int("stripe_count").unwrap_or(0);
        if kind != "striped" {
            return fail(format!("{kind} LV: not supported"));
        }
        if stripes != 1 {
            return fail(format!("striped LV ({stripes} stripes): not supported"));
        }
        let start = s.int("start_extent").unwrap_or(-1);
        let len = s.int("extent_count").unwrap_or(0);
        if start < 0 || start as u64 != next || len <= 0 {
            return fail(format!(
                "segment at extent {start} ({len} extents) does not follow extent {next}"
            ));
        }
        next += len as u64;
        let list = s.list("stripes").unwrap_or(&[]);
        let (Some(Value::Str(pv)), Some(Value::Int(pe))) = (list.first(), list.get(1)) else {
            return fail("segment without a stripe".into());
        };
        let Some(place) = places.get(pv.as_str()) else {
            return fail(format!("segment names unknown PV {pv}"));
        };
        let Some(volume) = place.found else {
            return fail(format!("PV {} missing", place.uuid));
        };
        if *pe < 0 {
            return fail(format!("segment starts at negative extent {pe}"));
        }
        let (pe, len) = (*pe as u64, len as u64);
        if pe.saturating_add(len) > place.pe_count {
            return fail(format!(
                "segment extents {pe}+{len} past the {} of PV {}",
                place.pe_count, place.uuid
            ));
        }
        let from = place.pe_start.saturating_add(pe.saturating_mul(extent));
        let bytes = len.saturating_mul(extent);
        for piece in translate(volume, from, bytes).ok_or_else(|| {
            (
                size,
                format!(
                    "extents at offset {from} of PV {} lie past its end",
                    place.uuid
                ),
            )
        })? {
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

/// `[from, from+len)` of `volume` as pieces of its disks; `None` if it runs
/// past the volume.
fn translate(volume: &Volume, from: u64, len: u64) -> Option<Vec<Piece>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let (mut from, mut left) = (from, len);
    for p in &volume.pieces {
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
