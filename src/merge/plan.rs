//! Which hidden nodes can be coalesced now, and which way.
//!
//! Coalescable = hidden with exactly one child (per disk: every disk of a
//! multi-disk point is its own node). Of the two ways, the one copying
//! fewer bytes wins:
//! - `Stream`: the hidden node's blocks go into the child where the child
//!   holds nothing; then the child's header names the hidden node's parent.
//! - `Commit`: the child's blocks go into the hidden node; then the hidden
//!   node's file is renamed onto the child's. Only when both have one
//!   format and virtual size, since the file then stands in for the child;
//!   a VHD H first takes the child's unique id when the child has
//!   children (they check it).
//!
//! Which of the two a format allows is its [`MergeCaps`](crate::image::formats::MergeCaps):
//! e.g. a VHD child can take only a VHD parent, so a stream into one needs
//! a hidden node that has a parent; a VHD root is committed into instead.

use crate::tree::{Point, Tree};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Stream,
    Commit,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Stream => "stream",
            Direction::Commit => "commit",
        }
    }
}

/// One merge to do.
pub struct Job {
    pub hidden: Arc<Point>,
    pub child: Arc<Point>,
    pub direction: Direction,
    /// Bytes the copy moves (allocated bytes of the side copied).
    pub bytes: u64,
    pub hidden_image: PathBuf,
    pub child_image: PathBuf,
    /// A commit where the child has children that check its identity (a
    /// VHD's unique id): H's file takes the child's id before it takes the
    /// child's name.
    pub adopt_id: Option<[u8; 16]>,
}

impl Job {
    pub fn describe(&self) -> String {
        let disk = self
            .hidden
            .disk
            .as_deref()
            .map_or(String::new(), |d| format!(" (disk {d})"));
        match self.direction {
            Direction::Stream => format!("{:?} into {:?}{disk}", self.hidden.name, self.child.name),
            Direction::Commit => format!(
                "{:?} into {:?}{disk} (committing the child)",
                self.hidden.name, self.child.name
            ),
        }
    }
}

/// The merges possible now, and the hidden points that must stay, with why.
pub fn plan(tree: &Tree) -> (Vec<Job>, Vec<String>) {
    let candidates = tree.hidden_with_children();
    let mut jobs = Vec::new();
    let mut left = Vec::new();
    for (h, kids) in candidates {
        if kids.len() != 1 {
            left.push(format!(
                "{:?} has {} children ({}); it is merged once only one is left",
                h.name,
                kids.len(),
                kids.iter()
                    .map(|k| format!("{:?}", k.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        }
        let c = kids[0].clone();
        match job_for(tree, h.clone(), c) {
            Ok(j) => jobs.push(j),
            Err(why) => left.push(format!("{:?}: {why}", h.name)),
        }
    }
    (jobs, left)
}

fn job_for(tree: &Tree, h: Arc<Point>, c: Arc<Point>) -> Result<Job, String> {
    if tree.single_chain() {
        return Err("the tree was opened from one leaf image, so images of other chains may use it unseen; open the directory to merge".into());
    }
    let (h_layer, hidden_image) = {
        let io = h.io.read();
        (io.chain.leaf().clone(), io.image.clone())
    };
    let (c_layer, child_image) = {
        let io = c.io.read();
        (io.chain.leaf().clone(), io.image.clone())
    };
    // An image we could not lock at open may be free now: try again.
    tree.retry_image_locks(&[(&hidden_image, &h_layer), (&child_image, &c_layer)])?;
    // Images that are not points of this tree (broken, too deep) may use
    // H too: then it must stay.
    if let Some(user) = super::journal::referenced_by(tree.dir(), &hidden_image, &[&child_image]) {
        return Err(format!(
            "{} also uses it as backing file; it stays",
            user.display()
        ));
    }
    let c_leaf = tree.is_leaf(c.id);
    let h_format = h_layer.format();
    let c_format = c_layer.format();
    // Some formats name a parent only of their own kind, or must keep one
    // (see `MergeCaps`).
    let h_has_parent = h_layer.backing().is_some();
    let stream_ok = c_format.can_stream_into(h_format, h_has_parent);
    let has_snapshots = |l: &Arc<dyn crate::image::Layer>| {
        l.info().map(|i| !i.snapshots.is_empty()).unwrap_or(true)
    };
    if has_snapshots(&c_layer) {
        return Err(format!(
            "its child {} has internal snapshots (or cannot be inspected), which snaptree does not write",
            child_image.display()
        ));
    }
    let h_bytes = h_layer.allocated_bytes().map_err(|e| e.to_string())?;
    let c_bytes = c_layer.allocated_bytes().map_err(|e| e.to_string())?;
    // Committing writes into H and makes H's file the child's: same format,
    // size and directory (H's backing name is relative to it), and
    // writable by us.
    // A file whose children check its identity (a VHD's unique id)
    // takes the child's id first (see `commit`).
    let h_caps = h_format.merge_caps();
    let adopt_id = (h_caps.children_check_id && !c_leaf)
        .then(|| c_layer.unique_id())
        .flatten();
    let commit_ok = h_format == c_format
        && h_caps.can_commit_into
        && (!h_caps.children_check_id || c_leaf || adopt_id.is_some())
        && hidden_image.parent() == child_image.parent()
        && h_layer.virtual_size() == c_layer.virtual_size()
        && !has_snapshots(&h_layer);
    let (direction, bytes) = match (stream_ok, commit_ok) {
        (true, true) if c_bytes < h_bytes => (Direction::Commit, c_bytes),
        (true, _) => (Direction::Stream, h_bytes),
        (false, true) => (Direction::Commit, c_bytes),
        (false, false) => {
            return Err(format!(
                "its child {} ({}) cannot take a new parent in its place, and its data cannot go into {} ({}: another format, size or directory, or internal snapshots)",
                child_image.display(),
                c_format.name(),
                hidden_image.display(),
                h_format.name(),
            ))
        }
    };
    Ok(Job {
        hidden: h,
        child: c,
        direction,
        bytes,
        hidden_image,
        child_image,
        adopt_id: adopt_id.filter(|_| direction == Direction::Commit),
    })
}
