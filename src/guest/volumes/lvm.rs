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
use super::{shown, Piece, Source, Volume, VolumeBytes};
use crate::guest::ReadBytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const SECTOR: u64 = 512;
/// More segments than any real LV has; bounds the work of hostile text.
const MAX_SEGMENTS: i64 = 4096;
/// LVs and PVs per VG beyond any real one; bounds hostile text.
const MAX_LVS: usize = 4096;
const MAX_PVS: usize = 4096;
/// Metadata text read per scan, over all PVs (one real VG's text is a few
/// KiB to a few MiB).
pub const MAX_SCAN_TEXT: u64 = 64 << 20;
/// Pieces over all LVs of one scan (striped LVs have one per chunk).
const MAX_SCAN_PIECES: usize = 1 << 18;

/// A PV found on a volume.
struct Pv {
    /// Index into the scanned volumes.
    volume: usize,
    /// Shared by volumes that start at the same disk offset.
    label: Arc<Label>,
}

/// What may still be made in this scan.
struct Limits {
    /// Volumes.
    room: usize,
    /// LVs left out for want of room.
    left_out: usize,
    /// Pieces.
    pieces: usize,
}

/// The LVs of every VG whose PVs are among `volumes`: at most `room`, and
/// how many more were left out.
pub fn find(
    volumes: &[Volume],
    disks: &[Arc<dyn ReadBytes>],
    room: usize,
    problems: &mut Vec<String>,
) -> (Vec<Volume>, usize) {
    let pvs = labels(volumes, disks, problems);
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
    let vgs = newest(&pvs, volumes, problems);
    let mut ids: Vec<&String> = vgs.keys().collect();
    ids.sort_by_key(|id| &vgs[*id].1);
    let mut limits = Limits {
        room,
        left_out: 0,
        pieces: MAX_SCAN_PIECES,
    };
    let mut out = Vec::new();
    for id in ids {
        let (_, name, vg) = &vgs[id];
        if !valid_name(name) {
            problems.push(format!(
                "VG with id {}: name \"{}\" is not a valid VG name; its LVs are left out",
                shown(id),
                shown(name)
            ));
            continue;
        }
        vg_lvs(name, id, vg, &pvs, volumes, &mut limits, &mut out, problems);
    }
    (out, limits.left_out)
}

/// The LVM labels of `volumes`. A PV is read once per disk offset it starts
/// at (many partition entries may point at one), and all texts together
/// within [`MAX_SCAN_TEXT`].
fn labels(volumes: &[Volume], disks: &[Arc<dyn ReadBytes>], problems: &mut Vec<String>) -> Vec<Pv> {
    let mut read: HashMap<(usize, u64), Option<Arc<Label>>> = HashMap::new();
    let mut budget = MAX_SCAN_TEXT;
    let mut pvs = Vec::new();
    for (index, v) in volumes.iter().enumerate() {
        let Some(first) = v.pieces.first().filter(|_| v.unreadable.is_none()) else {
            continue;
        };
        let label = read
            .entry((first.disk, first.offset))
            .or_insert_with(|| {
                let bytes = VolumeBytes::new(v, disks);
                match lvm_label::read(&bytes, &mut budget) {
                    Ok(label) => label.map(Arc::new),
                    Err(e) => {
                        problems.push(format!("{}: {e}", v.name));
                        None
                    }
                }
            })
            .clone();
        if let Some(label) = label {
            pvs.push(Pv {
                volume: index,
                label,
            });
        }
    }
    pvs
}

/// The newest metadata (highest seqno) per VG id, with the VG's name. Each
/// distinct text is parsed once, however many PVs carry it.
fn newest(
    pvs: &[Pv],
    volumes: &[Volume],
    problems: &mut Vec<String>,
) -> HashMap<String, (i64, String, Section)> {
    let mut vgs: HashMap<String, (i64, String, Section)> = HashMap::new();
    let mut parsed = HashSet::new();
    for pv in pvs {
        let Some(text) = pv.label.text.as_deref() else {
            continue;
        };
        if !parsed.insert(text) {
            continue;
        }
        let where_ = &volumes[pv.volume].name;
        let top = match lvm_text::parse(text) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{where_}: LVM metadata text: {e}"));
                continue;
            }
        };
        let Some((name, vg)) = top.0.into_iter().find_map(|(k, v)| match v {
            Value::Section(s) => Some((k, s)),
            _ => None,
        }) else {
            problems.push(format!("{where_}: LVM metadata text holds no VG"));
            continue;
        };
        let id = vg.str("id").unwrap_or("").to_string();
        let seqno = vg.int("seqno").unwrap_or(-1);
        if vgs.get(&id).is_none_or(|(s, _, _)| *s < seqno) {
            vgs.insert(id, (seqno, name, vg));
        }
    }
    vgs
}

/// LVM's own rule for VG and LV names; it also makes them safe directory
/// entry names (no `/`, NUL, `.` or `..`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
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
    /// Why its extents cannot be placed (a pe_start out of range).
    bad: Option<String>,
    pe_start: u64,
    pe_count: u64,
}

/// Appends the visible LVs of VG `name` (id `id`) to `out`, within `limits`.
#[allow(clippy::too_many_arguments)]
fn vg_lvs(
    name: &str,
    id: &str,
    vg: &Section,
    pvs: &[Pv],
    volumes: &[Volume],
    limits: &mut Limits,
    out: &mut Vec<Volume>,
    problems: &mut Vec<String>,
) {
    let extent = vg.int("extent_size").unwrap_or(0);
    if !(1..=(1 << 32)).contains(&extent) {
        problems.push(format!("VG {name}: bad extent_size {extent}"));
        return;
    }
    let extent = extent as u64 * SECTOR;
    let Some(places) = pv_places(name, vg, pvs, volumes, problems) else {
        return;
    };
    let vg_extents = places
        .values()
        .fold(0u64, |sum, p| sum.saturating_add(p.pe_count));
    let first_disk = places
        .values()
        .find_map(|p| p.found.map(|v| v.disk))
        .unwrap_or(0);
    for (lv_name, lv) in lv_sections(name, id, vg, problems) {
        if out.len() >= limits.room {
            limits.left_out += 1;
            continue;
        }
        let full = format!("{}-{}", escape(name), escape(lv_name));
        if full.len() > super::MAX_NAME - 10 {
            problems.push(format!(
                "VG with id {}: LV {} left out: its name {full} is too long",
                shown(id),
                shown(lv_name)
            ));
            continue;
        }
        let (pieces, size, why) = match layout(lv, extent, &places, vg_extents, &mut limits.pieces)
        {
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
}

/// The PVs of VG `name` by their key in its text, `None` (with a problem)
/// if the text lists more than [`MAX_PVS`].
fn pv_places<'a>(
    name: &str,
    vg: &Section,
    pvs: &[Pv],
    volumes: &'a [Volume],
    problems: &mut Vec<String>,
) -> Option<HashMap<String, PvPlace<'a>>> {
    let sections: Vec<(&str, &Section)> = vg
        .section("physical_volumes")
        .map(|s| s.sections().collect())
        .unwrap_or_default();
    if sections.len() > MAX_PVS {
        problems.push(format!(
            "VG {name}: {} PVs, more than {MAX_PVS}; its LVs are left out",
            sections.len()
        ));
        return None;
    }
    // The first copy of each PV (see the duplicate check in `find`).
    let mut by_uuid: HashMap<&str, &Volume> = HashMap::new();
    for pv in pvs {
        by_uuid
            .entry(pv.label.uuid.as_str())
            .or_insert(&volumes[pv.volume]);
    }
    let mut places = HashMap::new();
    let mut repeated = 0;
    for (key, pv) in sections {
        if places.contains_key(key) {
            repeated += 1;
            continue;
        }
        let uuid = bare(pv.str("id").unwrap_or(""));
        let found = by_uuid.get(uuid.as_str()).copied();
        let uuid = shown(&lvm_label::dashed(&uuid));
        let raw_start = pv.int("pe_start");
        let pe_start = raw_start
            .filter(|&s| s >= 0)
            .and_then(|s| (s as u64).checked_mul(SECTOR));
        let bad = match (found, pe_start) {
            (None, _) => {
                problems.push(format!("VG {name}: PV {uuid} missing"));
                None
            }
            (Some(_), None) => {
                let why = format!("pe_start {raw_start:?} out of range");
                problems.push(format!("VG {name}: PV {uuid}: {why}"));
                Some(why)
            }
            (Some(_), Some(_)) => None,
        };
        let place = PvPlace {
            uuid,
            found,
            bad,
            pe_start: pe_start.unwrap_or(0),
            pe_count: pv.int("pe_count").unwrap_or(0).max(0) as u64,
        };
        places.insert(key.to_string(), place);
    }
    if repeated > 0 {
        problems.push(format!(
            "VG {name}: {repeated} PV sections repeat the name of an earlier one; ignored"
        ));
    }
    Some(places)
}

/// The visible LVs of VG `name`, in name order (as `lvs` lists them; the
/// text keeps no useful order): sections that repeat an earlier LV's name
/// and LVs whose names LVM would refuse are left out, each kind with one
/// problem, and so are those past [`MAX_LVS`].
fn lv_sections<'a>(
    name: &str,
    id: &str,
    vg: &'a Section,
    problems: &mut Vec<String>,
) -> Vec<(&'a str, &'a Section)> {
    let mut seen = HashSet::new();
    let (mut repeated, mut bad, mut first_bad) = (0usize, 0usize, None);
    let mut lvs = Vec::new();
    let all = vg.section("logical_volumes").map(|s| s.sections());
    for (lv_name, lv) in all.into_iter().flatten() {
        if !seen.insert(lv_name) {
            repeated += 1;
            continue;
        }
        let visible = lv
            .list("status")
            .is_some_and(|s| s.iter().any(|v| *v == Value::Str("VISIBLE".into())));
        if !visible {
            continue;
        }
        if !valid_name(lv_name) {
            bad += 1;
            first_bad.get_or_insert(lv_name);
            continue;
        }
        lvs.push((lv_name, lv));
    }
    if repeated > 0 {
        problems.push(format!(
            "VG {name}: {repeated} LV sections repeat the name of an earlier one; ignored"
        ));
    }
    if let Some(first) = first_bad {
        problems.push(format!(
            "VG with id {}: {bad} LV(s) left out whose names are not valid LV names (the first: \"{}\")",
            shown(id),
            shown(first)
        ));
    }
    lvs.sort_by_key(|(name, _)| *name);
    if lvs.len() > MAX_LVS {
        problems.push(format!(
            "VG {name}: {} visible LVs; the first {MAX_LVS} by name are used",
            lvs.len()
        ));
        lvs.truncate(MAX_LVS);
    }
    lvs
}

/// The most pieces an LV may have (striped LVs have one per chunk).
const MAX_PIECES: usize = 1 << 16;

/// The pieces and size of a linear or striped LV; or its declared size and
/// why it cannot be read. `vg_extents`: the extents of all the VG's PVs, more
/// than any striped segment can hold. `left`: pieces this scan may still
/// make; those made are taken from it.
fn layout(
    lv: &Section,
    extent: u64,
    places: &HashMap<String, PvPlace>,
    vg_extents: u64,
    left: &mut usize,
) -> Result<(Vec<Piece>, u64), (u64, String)> {
    let count = lv.int("segment_count").unwrap_or(0);
    if !(1..=MAX_SEGMENTS).contains(&count) {
        return Err((0, format!("segment_count {count} out of range")));
    }
    let mut segments = Vec::new();
    let mut extents = 0u64;
    for n in 1..=count {
        let Some(s) = lv.section(&format!("segment{n}")) else {
            return Err((0, format!("segment{n} missing from the metadata")));
        };
        let len = s.int("extent_count").unwrap_or(0).max(0) as u64;
        extents = extents
            .checked_add(len)
            .ok_or((0, "segment extent counts add up past 2^64".to_string()))?;
        segments.push(s);
    }
    let size = extents.saturating_mul(extent);
    let fail = |why: String| Err((size, why));
    segments.sort_by_key(|s| s.int("start_extent").unwrap_or(0));
    let budget = MAX_PIECES.min(*left);
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
        // `next` stays within the checked sum above.
        next += len as u64;
        if s.str("type") == Some("striped") && len as u64 > vg_extents {
            return fail(format!(
                "segment at extent {start} of {len} extents, more than the VG's {vg_extents}"
            ));
        }
        let room = budget.saturating_sub(pieces.len());
        for piece in segment(s, len as u64, extent, places, room).map_err(|why| (size, why))? {
            match pieces.last_mut() {
                Some(last) if last.disk == piece.disk && last.offset + last.len == piece.offset => {
                    last.len += piece.len
                }
                _ => pieces.push(piece),
            }
        }
        if pieces.len() > budget {
            return fail(format!("LV of more than {budget} pieces: not supported"));
        }
    }
    *left -= pieces.len();
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
        return Err(format!("{} LV: not supported", shown(kind)));
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
            "striped LV of more than {budget} chunks: not supported"
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
        .ok_or_else(|| format!("segment names unknown PV {}", shown(pv)))?;
    let volume = place
        .found
        .ok_or_else(|| format!("PV {} missing", place.uuid))?;
    if let Some(bad) = &place.bad {
        return Err(format!("PV {}: {bad}", place.uuid));
    }
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
