//! The merge engine: coalesces hidden snapshot points into their only
//! child, so chains get shorter while every visible point keeps reading
//! exactly the bytes it read before (DESIGN.md, "Invariant of every
//! merge").
//!
//! - `plan`: which hidden nodes can go (exactly one child) and which way to
//!   copy (the smaller side).
//! - `copy`: moves allocated ranges between layers in large steps,
//!   throttled, reporting progress.
//! - `run`: one merge from journal entry to commit to cleanup; `stream`
//!   and `commit` are its two directions, whose commit points are a
//!   single header `pwrite` and a single `rename(2)`.
//! - `journal`: what is in flight, so the next open finishes or redoes it.
//! - `gc`: the background merger of a mount (idle trigger, throttle,
//!   back-off while foreground I/O runs).
//!
//! Concurrency: one merge at a time, holding the tree's `ops` lock (tree
//! commands wait; reads and writes of every point go on). Reads of the
//! points being merged stay right throughout because a merge only writes
//! ranges that the reading point takes from elsewhere (see `run`). A leaf
//! being written is copied like live migration copies RAM, and its writers
//! pause only for the last short pass and the commit.

mod commit;
pub mod copy;
pub mod journal;
pub mod plan;
pub mod run;
pub mod stream;

mod gc;
mod status;

pub use gc::spawn_gc;
pub use status::{MergeState, PassReport};

use crate::tree::{Tree, TreeError};
use std::time::Duration;

/// Knobs of the background merge (mount options `gc_idle`, `gc_step`,
/// `gc_pause`), like VMware's mainMem.ioBlockPages / ioWait.
#[derive(Clone, Debug)]
pub struct GcSettings {
    /// Start once no foreground I/O happened for this long; `None` = never
    /// merge in the background.
    pub idle: Option<Duration>,
    /// Bytes copied per step.
    pub step_bytes: u64,
    /// Pause after each step.
    pub pause: Duration,
}

impl Default for GcSettings {
    fn default() -> GcSettings {
        GcSettings {
            idle: Some(Duration::from_secs(10)),
            // Chosen with benches/gc_throttle.sh (see README): about 85%
            // of full speed when idle, 16 MiB/s under load, no measurable
            // cost to foreground latency.
            step_bytes: 16 << 20,
            pause: Duration::from_millis(5),
        }
    }
}

/// How fast a merge may go.
#[derive(Clone, Debug)]
pub struct Throttle {
    pub step_bytes: u64,
    pub pause: Duration,
    /// Back off while foreground I/O runs (background merges).
    pub yield_to_io: bool,
}

impl Throttle {
    /// Full speed: `merge-now`, `ctl merge`, `snaptree merge`.
    pub fn full() -> Throttle {
        Throttle {
            step_bytes: 8 << 20,
            pause: Duration::ZERO,
            yield_to_io: false,
        }
    }
}

/// What one call of [`Tree::merge_all`] did.
#[derive(Debug, Default)]
pub struct Summary {
    pub merged: Vec<String>,
    /// Hidden points left as they are, with the reason.
    pub left: Vec<String>,
    pub bytes_copied: u64,
}

impl Tree {
    /// Coalesces every coalescable hidden point, one after the other,
    /// until none is left. Stops at the first failure.
    pub fn merge_all(&self, throttle: &Throttle) -> Result<Summary, TreeError> {
        if self.read_only() {
            return Err(TreeError::new(libc::EROFS, "mounted read-only (-o ro)"));
        }
        // A foreground merge (merge-now, ctl, CLI) makes a background one
        // give way, as tree commands do.
        let _ops = if throttle.yield_to_io {
            self.lock_ops_yielding()
        } else {
            self.lock_ops()
        };
        // The mount is going away (see `tree::close`): its locks may be
        // released already, so nothing may be written now.
        if self.closing() {
            return Err(TreeError::new(
                libc::ECANCELED,
                "not started: the mount is going away",
            ));
        }
        if let Some(why) = self.merge.broken.lock().clone() {
            return Err(TreeError::new(libc::EIO, why));
        }
        let mut summary = Summary::default();
        loop {
            let (jobs, left) = plan::plan(self);
            summary.left = left;
            let Some(job) = jobs.into_iter().next() else {
                break;
            };
            let what = job.describe();
            match run::run(self, &job, throttle) {
                Ok(bytes) => {
                    summary.bytes_copied += bytes;
                    summary.merged.push(what);
                }
                Err(e) => {
                    let e = TreeError::new(e.errno, format!("merging {what}: {}", e.message));
                    self.merge.finish(Err(e.message.clone()));
                    return Err(e);
                }
            }
        }
        self.merge.finish(Ok(summary.describe()));
        Ok(summary)
    }

    /// `merge` on point `name`'s ctl: delete it, then coalesce now.
    pub fn merge_point(&self, id: u64) -> Result<Summary, TreeError> {
        self.delete(id)?;
        self.merge_all(&Throttle::full())
    }
}

impl Summary {
    pub fn describe(&self) -> String {
        let mut s = if self.merged.is_empty() {
            "nothing to merge".to_string()
        } else {
            format!(
                "merged {} ({} copied)",
                self.merged.join(", "),
                crate::units::human_size(self.bytes_copied)
            )
        };
        for l in &self.left {
            s.push_str("; left hidden: ");
            s.push_str(l);
        }
        s
    }
}
