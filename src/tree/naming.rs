//! Names of snapshot points and disks: the one check every name passes,
//! whether a `ctl` command or the manifest supplies it, and how the images
//! found at open get their names (the manifest's if valid and unique, else
//! the file stem made valid and unique).
//!
//! A name becomes a directory entry of the mount and a part of new image
//! file names, and it is printed in `status` and `tree`; so it must be
//! one path component, not clash with the mount's own files (the
//! reserved names, which the mount's layout owns and `TreeOptions`
//! brings here), and not be able to disguise itself on a terminal
//! (control characters, bidi overrides).

use super::manifest::ManifestPoint;
use crate::confine::shown;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Longest name, in bytes (file names get a suffix; 255 is the limit).
const MAX_LEN: usize = 200;

/// Why `name` cannot name a point or a disk, or `None` if it can.
/// `reserved` are the mount's own entries at its root.
pub fn name_problem(name: &str, reserved: &[String]) -> Option<Cow<'static, str>> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_LEN {
        "is longer than 200 bytes"
    } else if name.starts_with('.') {
        "starts with '.'"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        "contains a control or bidirectional-override character"
    } else if name.contains('\u{fffd}') {
        "contains U+FFFD (it was not valid UTF-8)"
    } else if reserved.iter().any(|r| r == name) {
        return Some(Cow::Owned(format!(
            "is one of the mount's own files ({})",
            reserved.join(", ")
        )));
    } else {
        return None;
    };
    Some(Cow::Borrowed(why))
}

/// Whether `name` can name a point or a disk (`reserved` as for
/// [`name_problem`]).
pub fn valid_name(name: &str, reserved: &[String]) -> bool {
    name_problem(name, reserved).is_none()
}

/// Characters that reorder how a terminal shows text (U+202E shows
/// `exe.txt` as `txt.exe`).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A valid name made from a file stem: characters a name may not hold
/// become `_`, a leading dot goes, long stems are cut.
pub(crate) fn name_from_stem(stem: &str, reserved: &[String]) -> String {
    let mut name: String = stem
        .trim_start_matches('.')
        .chars()
        .map(|c| {
            if c == '/' || c.is_control() || is_bidi_control(c) || c == '\u{fffd}' {
                '_'
            } else {
                c
            }
        })
        .collect();
    while name.len() > MAX_LEN - 16 {
        name.pop();
    }
    if name.is_empty() || reserved.contains(&name) {
        name.insert_str(0, "image-");
    }
    name
}

/// The names chosen for the images of a tree at open.
#[derive(Default)]
pub(super) struct Names {
    pub names: HashMap<PathBuf, String>,
    pub disks: HashMap<PathBuf, Option<String>>,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Names `images` (sorted): the manifest entry's name (`by_image`) when it
/// is valid and no other image took that name and disk, else the file
/// stem (or the short name `stems` gives a file, as Hyper-V's GUID-named
/// checkpoints get), made valid and unique. `foreign` are manifest entries
/// of images this tree does not hold; their names stay taken. `reserved`
/// as for [`name_problem`]. Every name the manifest gives that is not used
/// is reported in `problems`.
pub(super) fn assign(
    images: &[&PathBuf],
    by_image: &HashMap<String, &ManifestPoint>,
    foreign: &[ManifestPoint],
    stems: &HashMap<PathBuf, String>,
    reserved: &[String],
    problems: &mut Vec<String>,
) -> Names {
    let mut out = Names::default();
    let mut taken: HashSet<String> = foreign.iter().map(|m| m.name.clone()).collect();
    let mut taken_disks: HashSet<(String, Option<String>)> = foreign
        .iter()
        .map(|m| (m.name.clone(), m.disk.clone()))
        .collect();
    for p in images {
        let Some(m) = by_image.get(&file_name(p)) else {
            continue;
        };
        if let Some(why) = name_problem(&m.name, reserved) {
            problems.push(format!(
                "manifest: the name {} of {} {why}; named after its file instead",
                shown(&m.name),
                shown(&m.image)
            ));
            continue;
        }
        let disk = m.disk.clone().filter(|d| {
            let why = name_problem(d, reserved);
            if let Some(why) = &why {
                problems.push(format!(
                    "manifest: the disk name {} of point {} {why}; ignored",
                    shown(d),
                    shown(&m.name)
                ));
            }
            why.is_none()
        });
        if taken_disks.insert((m.name.clone(), disk.clone())) {
            taken.insert(m.name.clone());
            out.names.insert((*p).clone(), m.name.clone());
            out.disks.insert((*p).clone(), disk);
        } else {
            problems.push(format!(
                "manifest: {} is named {}{}, as another image is; named after its file instead",
                shown(&m.image),
                shown(&m.name),
                disk.map_or(String::new(), |d| format!(" (disk {d:?})"))
            ));
        }
    }
    for p in images {
        if out.names.contains_key(*p) {
            continue;
        }
        let stem = match stems.get(*p) {
            Some(s) => name_from_stem(s, reserved),
            None => name_from_stem(
                &p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                reserved,
            ),
        };
        let mut name = stem.clone();
        let mut n = 1;
        while !taken.insert(name.clone()) {
            name = format!("{stem}-{n}");
            n += 1;
        }
        out.names.insert((*p).clone(), name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mount's root files (the list `fs` gives at open).
    fn reserved() -> Vec<String> {
        ["tree", "status", "merge-now"].map(String::from).to_vec()
    }

    #[test]
    fn names_are_one_safe_component() {
        for ok in ["base", "monday-2026", "snap 1", "été", "a.b"] {
            assert!(valid_name(ok, &reserved()), "{ok:?}");
        }
        let long = "x".repeat(201);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../../etc",
            "tree",
            "status",
            "merge-now",
            "a\nb",
            "a\u{202e}b",
            "a\u{2066}b",
            "bad\u{fffd}",
            &long,
        ] {
            assert!(!valid_name(bad, &reserved()), "{bad:?} accepted");
        }
    }

    #[test]
    fn stems_become_valid_names() {
        for stem in [
            "",
            ".",
            "..x",
            "tree",
            "a\nb",
            "a\u{202e}b",
            &"é".repeat(300),
        ] {
            let n = name_from_stem(stem, &reserved());
            assert!(valid_name(&n, &reserved()), "{stem:?} gave {n:?}");
            assert!(
                valid_name(&format!("{n}-12345"), &reserved()),
                "{stem:?} gave {n:?}"
            );
        }
    }

    fn entry(name: &str, image: &str) -> ManifestPoint {
        ManifestPoint {
            name: name.into(),
            image: image.into(),
            parent: None,
            created: 0,
            hidden: false,
            format: None,
            disk: None,
            garbage: false,
            memory: None,
        }
    }

    #[test]
    fn bad_and_duplicate_manifest_names_fall_back_to_stems() {
        let entries = [
            entry("base", "a.qcow2"),
            entry("base", "b.qcow2"),
            entry("../../etc", "c.qcow2"),
            entry("tree", "d.qcow2"),
        ];
        let by_image: HashMap<String, &ManifestPoint> =
            entries.iter().map(|m| (m.image.clone(), m)).collect();
        let paths: Vec<PathBuf> = [
            "/t/a.qcow2",
            "/t/b.qcow2",
            "/t/c.qcow2",
            "/t/d.qcow2",
            "/t/tree.qcow2",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let refs: Vec<&PathBuf> = paths.iter().collect();
        let mut problems = Vec::new();
        let n = assign(
            &refs,
            &by_image,
            &[],
            &HashMap::new(),
            &reserved(),
            &mut problems,
        );
        let got: Vec<&str> = paths.iter().map(|p| n.names[p].as_str()).collect();
        assert_eq!(got, ["base", "b", "c", "d", "image-tree"]);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}
