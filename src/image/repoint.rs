//! Re-pointing a child image at another backing file in one atomic step:
//! the capability a stream merge (and the memory-delta merge) commits
//! with.
//!
//! Two shapes exist. qcow2 names its backing file in one header sector, so
//! one `pwrite` is the commit point ([`RepointPlan::OneWrite`]). A
//! differencing VHD needs several writes (header and parent locators), so
//! its plan is a list of [`Patch`]es ([`RepointPlan::Journaled`]): the
//! caller stores them in its journal (that atomic rename is the commit
//! point), then applies them; recovery applies them again after checking,
//! through the same format, that they only re-point that file. A format
//! adds its own shape by implementing [`Repoint`] in its module and
//! returning it from its [`Driver`](super::formats::Driver).

use crate::error::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One write of a re-pointing: `bytes` at `offset` of the child's file.
/// Stored as is in the merge journal (`patches`), so the field names stay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub offset: u64,
    /// The bytes, as lower-case hex (the journal is JSON).
    pub hex: String,
}

impl Patch {
    pub fn new(offset: u64, bytes: &[u8]) -> Patch {
        Patch {
            offset,
            hex: hex(bytes),
        }
    }

    /// The bytes; `None` when `hex` is not hex.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        unhex(&self.hex)
    }
}

/// Bytes as lower-case hex, for JSON.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of [`hex`] text; `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let h = text.as_bytes();
    if !h.len().is_multiple_of(2) {
        return None;
    }
    h.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// The backing reference a re-pointed child gets.
#[derive(Clone, Copy, Debug)]
pub struct NewBacking<'a> {
    /// The name as the child records it (relative to its directory, or
    /// absolute).
    pub name: &'a str,
    /// The backing format as the child records it.
    pub format: &'a str,
    /// The new parent's file, for formats that record facts about it
    /// (a VHD its unique id and time stamp); `None` when not open.
    pub path: Option<&'a Path>,
}

/// What re-points one child: computed first (nothing written), then
/// applied; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepointPlan {
    /// One write switches the child: applying the plan is the commit point.
    /// The backing reference as (name, format); `None` for no backing.
    OneWrite(Option<(String, String)>),
    /// Several writes: the caller stores them at its commit point, then
    /// applies them (again, after a crash).
    Journaled(Vec<Patch>),
}

impl RepointPlan {
    /// The writes a journal must store before applying them, if any.
    pub fn patches(&self) -> Option<&[Patch]> {
        match self {
            RepointPlan::OneWrite(_) => None,
            RepointPlan::Journaled(p) => Some(p),
        }
    }
}

/// Re-pointing a child of this format (see the module docs).
pub trait Repoint: Sync {
    /// The plan that makes `child` name `to` (`None`: no backing file).
    /// Writes nothing.
    fn plan(&self, child: &Path, to: Option<NewBacking<'_>>) -> Result<RepointPlan>;

    /// Carries out `plan` and makes it durable.
    fn apply(&self, child: &Path, plan: &RepointPlan) -> Result<()>;

    /// Checks that `patches`, read back from a journal and so not to be
    /// trusted, only re-point `child`.
    fn check(&self, child: &Path, patches: &[Patch]) -> Result<()>;
}
