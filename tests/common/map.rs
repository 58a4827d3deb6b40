//! Maps: what `qemu-img map --output=json` and `snaptree map --output json`
//! say about every byte of a disk, and how two of them are compared.
//!
//! Why compare extents rather than entries: the two tools may split the
//! same facts into different entries, so [`extents`] validates a map
//! (entries in order, contiguous, covering the disk) and merges equal
//! neighbours, and [`diff_extents`] compares two maps over the union of
//! their boundaries. Parsing is strict about types so that a shape error is
//! reported, not misread.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::path::Path;

use serde_json::Value;

use super::chain::{Chain, Layer};
use super::run::qemu_img;

/// One entry of `qemu-img map --output=json` (and of `snaptree map --output
/// json`, which has the same shape).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer answering for these bytes, 0 = the mapped image itself.
    pub depth: u64,
    /// Allocated (data or zero) in that layer; false = fell through.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data in the layer's file.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the layer's file, where there is one.
    pub offset: Option<u64>,
}

/// The attributes compared between two maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attrs {
    /// See [`MapEntry::depth`].
    pub depth: u64,
    /// See [`MapEntry::present`].
    pub present: bool,
    /// See [`MapEntry::zero`].
    pub zero: bool,
    /// See [`MapEntry::data`].
    pub data: bool,
}

impl fmt::Display for Attrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{depth:{}, present:{}, zero:{}, data:{}}}",
            self.depth, self.present, self.zero, self.data
        )
    }
}

impl MapEntry {
    /// The compared attributes of this entry.
    pub fn attrs(&self) -> Attrs {
        Attrs {
            depth: self.depth,
            present: self.present,
            zero: self.zero,
            data: self.data,
        }
    }
}

/// Parses a `map --output json` document: a JSON array of objects each with
/// integer `start`, `length`, `depth`, booleans `present`, `zero`, `data`,
/// `compressed`, and optionally integer `offset`. Strict about types so a
/// shape error is reported, not misread.
pub fn parse_map(json: &str) -> Result<Vec<MapEntry>, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| {
        format!(
            "not JSON ({e}); text starts: {:?}",
            json.chars().take(200).collect::<String>()
        )
    })?;
    let items = value
        .as_array()
        .ok_or_else(|| format!("top level is not an array: {}", short(&value)))?;
    let mut entries = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item
            .as_object()
            .ok_or_else(|| format!("entry {i} is not an object: {}", short(item)))?;
        let int = |key: &str| -> Result<u64, String> {
            obj.get(key)
                .ok_or_else(|| format!("entry {i} has no \"{key}\": {}", short(item)))?
                .as_u64()
                .ok_or_else(|| {
                    format!(
                        "entry {i}: \"{key}\" is not an unsigned integer: {}",
                        short(item)
                    )
                })
        };
        let boolean = |key: &str| -> Result<bool, String> {
            obj.get(key)
                .ok_or_else(|| format!("entry {i} has no \"{key}\": {}", short(item)))?
                .as_bool()
                .ok_or_else(|| format!("entry {i}: \"{key}\" is not a boolean: {}", short(item)))
        };
        let offset = match obj.get("offset") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                format!(
                    "entry {i}: \"offset\" is not an unsigned integer: {}",
                    short(item)
                )
            })?),
        };
        entries.push(MapEntry {
            start: int("start")?,
            length: int("length")?,
            depth: int("depth")?,
            present: boolean("present")?,
            zero: boolean("zero")?,
            data: boolean("data")?,
            compressed: boolean("compressed")?,
            offset,
        });
    }
    Ok(entries)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}...", &s[..300])
    } else {
        s
    }
}

/// A byte interval `[start, end)` with the attributes of every byte in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Attributes of every byte in the interval.
    pub attrs: Attrs,
}

/// Expands map entries into per-byte attribute intervals covering exactly
/// `[0, size)`. Checks that entries are non-empty, in order, contiguous and
/// cover the whole disk; merges neighbours with equal attributes, so two maps
/// that split the same facts differently yield the same extents.
pub fn extents(entries: &[MapEntry], size: u64) -> Result<Vec<Extent>, String> {
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = 0u64;
    for (i, e) in entries.iter().enumerate() {
        if e.length == 0 {
            return Err(format!("entry {i} has length 0: {e:?}"));
        }
        if e.start != pos {
            return Err(format!(
                "entry {i} starts at {} but the previous one ended at {pos} ({}): {e:?}",
                e.start,
                if e.start > pos { "gap" } else { "overlap" }
            ));
        }
        let end = e
            .start
            .checked_add(e.length)
            .ok_or_else(|| format!("entry {i} overflows: {e:?}"))?;
        match out.last_mut() {
            Some(last) if last.attrs == e.attrs() => last.end = end,
            _ => out.push(Extent {
                start: e.start,
                end,
                attrs: e.attrs(),
            }),
        }
        pos = end;
    }
    if pos != size {
        return Err(format!(
            "entries cover [0, {pos}) but the virtual size is {size}"
        ));
    }
    Ok(out)
}

/// A byte interval where two maps disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Attributes in the expected (reference) map.
    pub expected: Attrs,
    /// Attributes in the map under test.
    pub got: Attrs,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) = [{}, {}) ({} bytes): expected {}, got {}",
            self.start,
            self.end,
            self.start,
            self.end,
            self.end - self.start,
            self.expected,
            self.got
        )
    }
}

/// Compares two extent lists (as from [`extents`], both covering the same
/// range) over the union of their boundaries. Returns the maximal intervals
/// where the attributes differ; empty = the maps agree on every byte.
pub fn diff_extents(expected: &[Extent], got: &[Extent]) -> Vec<Mismatch> {
    let mut bounds = BTreeSet::new();
    for e in expected.iter().chain(got) {
        bounds.insert(e.start);
        bounds.insert(e.end);
    }
    let bounds: Vec<u64> = bounds.into_iter().collect();
    let (mut i, mut j) = (0, 0);
    let mut out: Vec<Mismatch> = Vec::new();
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        while i < expected.len() && expected[i].end <= s {
            i += 1;
        }
        while j < got.len() && got[j].end <= s {
            j += 1;
        }
        let (Some(a), Some(b)) = (expected.get(i), got.get(j)) else {
            break;
        };
        if a.attrs != b.attrs {
            match out.last_mut() {
                Some(m) if m.end == s && m.expected == a.attrs && m.got == b.attrs => m.end = e,
                _ => out.push(Mismatch {
                    start: s,
                    end: e,
                    expected: a.attrs,
                    got: b.attrs,
                }),
            }
        }
    }
    out
}

/// Formats mismatches for a failure message (at most 25 shown).
pub fn format_mismatches(mismatches: &[Mismatch]) -> String {
    let mut s = String::new();
    let total: u64 = mismatches.iter().map(|m| m.end - m.start).sum();
    let _ = writeln!(
        s,
        "{} mismatching ranges, {total} bytes in all",
        mismatches.len()
    );
    for m in mismatches.iter().take(25) {
        let _ = writeln!(s, "  {m}");
    }
    if mismatches.len() > 25 {
        let _ = writeln!(s, "  ...");
    }
    s
}

/// Runs `qemu-img map --output=json` on `layer` (in `dir`, the chain
/// directory) and returns its JSON text and the parsed entries.
pub fn qemu_layer_map(dir: &Path, layer: &Layer) -> (String, Vec<MapEntry>) {
    let out = qemu_img(
        dir,
        args![
            "map",
            "--output=json",
            "-f",
            layer.format.as_str(),
            layer.path
        ],
    );
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    let entries = parse_map(&json)
        .unwrap_or_else(|e| panic!("cannot parse qemu-img map of {}: {e}", layer.name));
    (json, entries)
}

/// `qemu-img map --output=json` of layer `idx` (base first) of `chain`,
/// parsed. Useful to assert that a case really contains what it is meant to
/// test (compressed clusters, zero clusters, ...).
pub fn qemu_map(chain: &Chain, idx: usize) -> Vec<MapEntry> {
    qemu_layer_map(chain.dir(), &chain.layers()[idx]).1
}

/// Panics unless some entry of `entries` satisfies `pred`: guards a test
/// against silently not covering what it claims to (`what` names it).
pub fn assert_map_has(entries: &[MapEntry], what: &str, pred: impl Fn(&MapEntry) -> bool) {
    assert!(
        entries.iter().any(pred),
        "test setup error: the image has no {what}; map: {entries:#?}"
    );
}
