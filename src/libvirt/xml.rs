//! Reading one libvirt XML file safely: at most [`MAX_XML`] bytes (a
//! larger file is refused after reading one byte past the limit, never
//! read whole), opened read-only without following a FIFO
//! (`input::read_input`), no `<!DOCTYPE` at all (so no entities, internal
//! or external), then parsed by `roxmltree`.
//!
//! Why `roxmltree`: small, widely used, read-only (a tree over the text,
//! no writer), no I/O of its own, and it never expands external entities;
//! with `allow_dtd` off (its default) it refuses any DTD too. libvirt
//! writes none of these, so refusing them costs nothing.

use super::LibvirtError;
use std::path::Path;

/// Largest XML file read (libvirt's records are a few KiB).
pub const MAX_XML: u64 = 4 << 20;

/// The text of the XML file at `path`, checked as the module docs say.
pub fn read(path: &Path) -> Result<String, LibvirtError> {
    let bytes = crate::input::read_input(path, MAX_XML).map_err(|source| LibvirtError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() as u64 > MAX_XML {
        return Err(LibvirtError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_XML,
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| LibvirtError::Malformed {
        path: path.to_path_buf(),
        why: "not UTF-8".into(),
    })?;
    if text.contains("<!DOCTYPE") || text.contains("<!ENTITY") {
        return Err(LibvirtError::Doctype {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Parses `text` (read from `path`).
pub fn parse<'a>(path: &Path, text: &'a str) -> Result<roxmltree::Document<'a>, LibvirtError> {
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 1 << 16,
    };
    roxmltree::Document::parse_with_options(text, opts).map_err(|e| match e {
        roxmltree::Error::DtdDetected => LibvirtError::Doctype {
            path: path.to_path_buf(),
        },
        e => LibvirtError::Malformed {
            path: path.to_path_buf(),
            why: e.to_string(),
        },
    })
}

/// The first child element of `node` called `tag`.
pub fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(tag))
}

/// The text of `node`'s child element `tag`, trimmed.
pub fn child_text(node: roxmltree::Node, tag: &str) -> Option<String> {
    child(node, tag)
        .and_then(|c| c.text())
        .map(|t| t.trim().to_string())
}
