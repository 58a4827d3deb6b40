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
//! Some kinds of a format take part in no merge (a flat VMDK): its driver
//! says why (`Driver::merge_refusal`), and that reason is shown. A child
//! with extent files of its own (a twoGbMaxExtentSparse VMDK) is streamed
//! into, never replaced by a commit (its extents would stay behind).

use crate::image::formats;
use crate::image::Format;
use crate::tree::{PointDisk, Tree};
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
    pub hidden: Arc<PointDisk>,
    pub child: Arc<PointDisk>,
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

/// Why a hidden node cannot be coalesced now (shown in `status`).
#[derive(Debug, thiserror::Error)]
pub enum Blocked {
    #[error("the tree was opened from one leaf image, so images of other chains may use it unseen; open the directory to merge")]
    SingleChain,
    #[error(transparent)]
    Locked(#[from] crate::tree::StillLocked),
    #[error("{} also uses it as backing file; it stays", .0.display())]
    Referenced(PathBuf),
    #[error("its child {} has internal snapshots (or cannot be inspected), which snaptree does not write", .0.display())]
    ChildHasSnapshots(PathBuf),
    #[error(transparent)]
    Image(#[from] crate::error::ImageError),
    /// A kind of image its format's merges do not handle (see
    /// `Driver::merge_refusal`).
    #[error("{0}")]
    Refused(String),
    #[error("its child {} ({child_format}) cannot take a new parent in its place, and its data cannot go into {} ({hidden_format}: another format, size or directory, or internal snapshots)", child.display(), hidden.display())]
    NoDirection {
        child: PathBuf,
        child_format: &'static str,
        hidden: PathBuf,
        hidden_format: &'static str,
    },
}

/// What the choice of direction depends on, read from the two images.
#[derive(Clone, Debug)]
struct Facts {
    h_format: Format,
    c_format: Format,
    h_has_parent: bool,
    h_has_snapshots: bool,
    /// The child is a leaf (nothing checks its identity).
    c_leaf: bool,
    c_id: Option<[u8; 16]>,
    same_dir: bool,
    same_size: bool,
    /// The child's file has no companions (extent files) a commit's
    /// rename would leave behind.
    c_replaceable: bool,
    h_bytes: u64,
    c_bytes: u64,
}

/// The direction, the bytes it copies and the id H's file adopts; `None`
/// when neither way is possible. Pure, so the rules are unit-tested.
fn choose(f: &Facts) -> Option<(Direction, u64, Option<[u8; 16]>)> {
    // Some formats name a parent only of their own kind, or must keep one
    // (see `MergeCaps`).
    let stream_ok = f.c_format.can_stream_into(f.h_format, f.h_has_parent);
    // Committing writes into H and makes H's file the child's: same
    // format, size and directory (H's backing name is relative to it). A
    // file whose children check its identity (a VHD's unique id) takes
    // the child's id first (see `commit`).
    let h_caps = f.h_format.merge_caps();
    let adopt_id = (h_caps.children_check_id && !f.c_leaf)
        .then_some(f.c_id)
        .flatten();
    let commit_ok = f.h_format == f.c_format
        && h_caps.can_commit_into
        && (!h_caps.children_check_id || f.c_leaf || adopt_id.is_some())
        && f.same_dir
        && f.same_size
        && f.c_replaceable
        && !f.h_has_snapshots;
    let (direction, bytes) = match (stream_ok, commit_ok) {
        (true, true) if f.c_bytes < f.h_bytes => (Direction::Commit, f.c_bytes),
        (true, _) => (Direction::Stream, f.h_bytes),
        (false, true) => (Direction::Commit, f.c_bytes),
        (false, false) => return None,
    };
    Some((
        direction,
        bytes,
        adopt_id.filter(|_| direction == Direction::Commit),
    ))
}

fn job_for(tree: &Tree, h: Arc<PointDisk>, c: Arc<PointDisk>) -> Result<Job, Blocked> {
    if tree.single_chain() {
        return Err(Blocked::SingleChain);
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
        return Err(Blocked::Referenced(user));
    }
    let has_snapshots = |l: &Arc<dyn crate::image::Layer>| {
        l.info().map(|i| !i.snapshots.is_empty()).unwrap_or(true)
    };
    if has_snapshots(&c_layer) {
        return Err(Blocked::ChildHasSnapshots(child_image));
    }
    for (layer, image) in [(&h_layer, &hidden_image), (&c_layer, &child_image)] {
        if let Some(why) = formats::merge_refusal(layer.format(), image) {
            return Err(Blocked::Refused(why));
        }
    }
    let facts = Facts {
        h_format: h_layer.format(),
        c_format: c_layer.format(),
        h_has_parent: h_layer.backing().is_some(),
        h_has_snapshots: has_snapshots(&h_layer),
        c_leaf: tree.is_leaf(c.id),
        c_id: c_layer.unique_id(),
        same_dir: hidden_image.parent() == child_image.parent(),
        same_size: h_layer.virtual_size() == c_layer.virtual_size(),
        c_replaceable: formats::companions(&child_image).is_empty(),
        h_bytes: h_layer.allocated_bytes()?,
        c_bytes: c_layer.allocated_bytes()?,
    };
    let Some((direction, bytes, adopt_id)) = choose(&facts) else {
        return Err(Blocked::NoDirection {
            child: child_image,
            child_format: facts.c_format.name(),
            hidden: hidden_image,
            hidden_format: facts.h_format.name(),
        });
    };
    Ok(Job {
        hidden: h,
        child: c,
        direction,
        bytes,
        hidden_image,
        child_image,
        adopt_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format(name: &str) -> Format {
        Format::from_name(name).expect("registered format")
    }

    /// A hidden qcow2 with a parent over a qcow2 leaf child, side by side.
    fn qcow2_pair() -> Facts {
        Facts {
            h_format: format("qcow2"),
            c_format: format("qcow2"),
            h_has_parent: true,
            h_has_snapshots: false,
            c_leaf: true,
            c_id: None,
            same_dir: true,
            same_size: true,
            c_replaceable: true,
            h_bytes: 100,
            c_bytes: 10,
        }
    }

    #[test]
    fn the_direction_copying_fewer_bytes_wins() {
        let f = qcow2_pair();
        assert_eq!(choose(&f), Some((Direction::Commit, 10, None)));
        let f = Facts {
            c_bytes: 500,
            ..qcow2_pair()
        };
        assert_eq!(choose(&f), Some((Direction::Stream, 100, None)));
        // A tie streams: a commit must copy strictly fewer bytes.
        let f = Facts {
            c_bytes: 100,
            ..qcow2_pair()
        };
        assert_eq!(choose(&f), Some((Direction::Stream, 100, None)));
    }

    #[test]
    fn commit_needs_one_directory_size_and_no_internal_snapshots() {
        for f in [
            Facts {
                same_dir: false,
                ..qcow2_pair()
            },
            Facts {
                same_size: false,
                ..qcow2_pair()
            },
            Facts {
                h_has_snapshots: true,
                ..qcow2_pair()
            },
            Facts {
                c_replaceable: false,
                ..qcow2_pair()
            },
            Facts {
                h_format: format("raw"),
                h_has_parent: false,
                ..qcow2_pair()
            },
        ] {
            assert_eq!(choose(&f).map(|c| c.0), Some(Direction::Stream), "{f:?}");
        }
    }

    /// A VHD names only VHD parents and never none: a root VHD is
    /// committed into, adopting the child's id when the child has children.
    #[test]
    fn vhd_rules() {
        let vhd = Facts {
            h_format: format("vpc"),
            c_format: format("vpc"),
            h_has_parent: false,
            ..qcow2_pair()
        };
        let f = Facts {
            c_bytes: 500,
            ..vhd.clone()
        };
        assert_eq!(choose(&f), Some((Direction::Commit, 500, None)));
        let id = [7u8; 16];
        let f = Facts {
            c_leaf: false,
            c_id: Some(id),
            ..vhd.clone()
        };
        assert_eq!(choose(&f), Some((Direction::Commit, 10, Some(id))));
        // Children check the id, and the child has none to give: no way.
        let f = Facts {
            c_leaf: false,
            c_id: None,
            ..vhd.clone()
        };
        assert_eq!(choose(&f), None);
        // With a parent above H, the child can be re-pointed at it; a
        // stream adopts no id.
        let f = Facts {
            h_has_parent: true,
            c_leaf: false,
            c_id: Some(id),
            c_bytes: 500,
            ..vhd
        };
        assert_eq!(choose(&f), Some((Direction::Stream, 100, None)));
    }

    #[test]
    fn a_vhd_child_cannot_be_pointed_at_a_qcow2() {
        let f = Facts {
            c_format: format("vpc"),
            ..qcow2_pair()
        };
        assert_eq!(choose(&f), None);
    }
}
