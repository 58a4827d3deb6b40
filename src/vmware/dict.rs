//! VMware's "dictionary" text files (`.vmx`, `.vmsd`), read strictly.
//!
//! The syntax, as open-vm-tools' `lib/dict/dictll.c` reads and writes it
//! (`DictLL_UnmarshalLine`, `DictLL_MarshalLine`): one `name = "value"`
//! per line; the value may also stand unquoted (up to whitespace); a `#`
//! starts a comment; a UTF-8 byte order mark may lead the file. Inside a
//! value, `"`, `|`, 0x7F and control characters other than tab are
//! written as `|` and two hex digits (`|22` is a quote, `|0A` a newline).
//!
//! VMware keeps a line it cannot parse verbatim; snaptree refuses the whole
//! file instead (a line it does not understand could be the one that
//! names a disk), with the line number, as it refuses a duplicated name.
//! Files are read whole but at most [`MAX_DICT`] bytes.

use super::VmwareError;
use std::collections::BTreeMap;
use std::path::Path;

/// Largest dictionary file read: a `.vmx` is a few KiB, a `.vmsd` about
/// 600 bytes per snapshot, and VMware keeps at most a few hundred.
pub const MAX_DICT: u64 = 1 << 20;

/// The names and values of a dictionary file, names as written (VMware
/// matches them case-insensitively on Windows, so lookups fold case).
#[derive(Debug, Default)]
pub struct Dict {
    entries: BTreeMap<String, String>,
}

impl Dict {
    /// The value of `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Every `(name, value)`, names lower-cased, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Reads and parses the dictionary file at `path`.
pub fn read(path: &Path) -> Result<Dict, VmwareError> {
    let bytes = crate::input::read_input(path, MAX_DICT).map_err(|source| VmwareError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() as u64 > MAX_DICT {
        return Err(VmwareError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_DICT,
        });
    }
    parse(path, &bytes)
}

/// Parses the bytes of dictionary file `path`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Dict, VmwareError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| VmwareError::Malformed {
        path: path.to_path_buf(),
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count(),
        why: "not UTF-8".into(),
    })?;
    let mut dict = Dict::default();
    for (i, raw) in text.split('\n').enumerate() {
        let bad = |why: String| VmwareError::Malformed {
            path: path.to_path_buf(),
            line: i + 1,
            why,
        };
        let Some((name, value)) = line(raw.strip_suffix('\r').unwrap_or(raw)).map_err(bad)? else {
            continue;
        };
        let key = name.to_ascii_lowercase();
        if dict.entries.contains_key(&key) {
            return Err(bad(format!("{name:?} is set twice")));
        }
        dict.entries.insert(key, value);
    }
    Ok(dict)
}

fn ws(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// One line: `None` when blank or a comment, else its name and value.
fn line(l: &str) -> Result<Option<(&str, String)>, String> {
    let l = l.trim_start_matches(ws);
    if l.is_empty() || l.starts_with('#') {
        return Ok(None);
    }
    let end = l
        .find(|c: char| ws(c) || c == '=' || c == '#')
        .unwrap_or(l.len());
    let (name, rest) = l.split_at(end);
    let rest = rest.trim_start_matches(ws);
    let Some(rest) = rest.strip_prefix('=') else {
        return Err("no '=' after the name".into());
    };
    let rest = rest.trim_start_matches(ws);
    let (value, after) = match rest.strip_prefix('"') {
        Some(q) => {
            let close = q.find('"').ok_or("the value's closing quote is missing")?;
            (&q[..close], &q[close + 1..])
        }
        None => {
            let e = rest.find(|c: char| ws(c) || c == '#').unwrap_or(rest.len());
            rest.split_at(e)
        }
    };
    let after = after.trim_start_matches(ws);
    if !(after.is_empty() || after.starts_with('#')) {
        return Err("text after the value".into());
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err("a raw control character in the value (VMware escapes them)".into());
    }
    Ok(Some((name, unescape(value)?)))
}

/// Undoes VMware's `|XX` escapes.
fn unescape(v: &str) -> Result<String, String> {
    if !v.contains('|') {
        return Ok(v.to_string());
    }
    let mut out = Vec::with_capacity(v.len());
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'|' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        let byte = hex
            .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or("'|' not followed by two hex digits")?;
        out.push(byte);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| "an escape makes the value invalid UTF-8".into())
}
