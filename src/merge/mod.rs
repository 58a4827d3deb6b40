//! The merge engine: coalesces hidden snapshot points into their only
//! child, so chains get shorter while every visible point keeps reading
//! exactly the bytes it read before (ARCHITECTURE.md, "The merge
//! invariant").
//!
//! - `plan`: which hidden nodes can go (exactly one child) and which way to
//!   copy (the smaller side).
//! - `copy`: moves allocated ranges between layers in large steps,
//!   throttled, reporting progress.
//! - `run`: one merge from journal entry to commit to cleanup; `stream`
//!   and `commit` are its two directions, whose commit points are a
//!   single header `pwrite` and a single `rename(2)`.
//! - `journal`: what is in flight, so the next open finishes or redoes it.
//! - `memory`: a hidden point's memory delta let go of by its child's,
//!   through the same stream routine, before the disk merge.
//! - `background`: the background merger of a mount (idle trigger,
//!   throttle, back-off while foreground I/O runs).
//! - `status`: the engine's state and its lines of `status`.
//!
//! The engine (`Engine`) owns its state and works on the tree through
//! methods of `Tree` (`tree/coalesce.rs`); the tree never names it
//! (ARCHITECTURE.md, "Layers"). At a read-write open, the tree calls the
//! engine's journal recovery through `tree::Recovery`.
//!
//! Concurrency: one merge at a time, holding the tree's `ops` lock (tree
//! commands wait; reads and writes of every point go on). Reads of the
//! points being merged stay right throughout because a merge only writes
//! ranges that the reading point takes from elsewhere (see `run`). A leaf
//! being written is copied like live migration copies RAM, and its writers
//! pause only for the last short pass and the commit.

mod background;
mod commit;
pub mod copy;
pub mod journal;
mod memory;
pub mod plan;
pub mod run;
mod status;
pub mod stream;

pub use background::spawn_background_merge;
pub use status::{MergeState, PassReport};

use crate::tree::{Tree, TreeError, TreeOptions};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The merge engine of one open tree: the tree it works on, its own state
/// (progress, last result, idle clock, whether an interrupted merge is to
/// be redone) and the settings of the background merge. `fs` and `cli`
/// hold it beside the tree; the tree does not know it.
pub struct Engine {
    tree: Arc<Tree>,
    state: MergeState,
    settings: BackgroundMergeSettings,
}

/// The merge engine's part of opening a tree read-write: under the tree
/// lock and before discovery, finish or redo the merge a crash
/// interrupted (the journal) and remove the garbage it left.
#[derive(Default)]
struct JournalRecovery {
    /// An interrupted merge was found: redo it without waiting.
    resume: bool,
}

impl crate::tree::Recovery for JournalRecovery {
    fn recover(&mut self, dir: &Path, problems: &mut Vec<String>) {
        self.resume = journal::recover(dir, problems);
        journal::reclaim_garbage(dir, problems);
    }
}

impl Engine {
    /// Opens the tree at `source` (see [`Tree::open`]) with the merge
    /// journal's recovery, and the engine on it.
    pub fn open(
        source: &Path,
        opts: TreeOptions,
        settings: BackgroundMergeSettings,
    ) -> Result<Engine, crate::tree::OpenError> {
        let mut recovery = JournalRecovery::default();
        let tree = Tree::open(source, opts, &mut recovery)?;
        let state = MergeState::default();
        state.resume.store(recovery.resume, Ordering::Relaxed);
        Ok(Engine {
            tree: Arc::new(tree),
            state,
            settings,
        })
    }

    pub fn tree(&self) -> &Arc<Tree> {
        &self.tree
    }

    pub fn settings(&self) -> &BackgroundMergeSettings {
        &self.settings
    }

    /// Called on every foreground read and write: the background merge
    /// waits for the mount to be idle.
    pub fn note_io(&self) {
        self.state.note_io();
    }

    /// The running merge: what, bytes done, bytes total.
    pub fn current(&self) -> Option<(String, u64, u64)> {
        self.state.current()
    }

    /// What reading `merge-now` shows: the last result.
    pub fn last_text(&self) -> String {
        self.state.last_text()
    }

    /// The merge engine's lines of `status`: the running merge, its
    /// passes, the last result, the settings, the queue.
    pub fn render_status(&self) -> String {
        let mut out = String::new();
        self.state.render(&mut out, &self.settings);
        status::render_queue(&mut out, self.tree.hidden_child_counts());
        out
    }
}

/// Knobs of the background merge (mount options `gc_idle`, `gc_step`,
/// `gc_pause`), like VMware's mainMem.ioBlockPages / ioWait.
#[derive(Clone, Debug)]
pub struct BackgroundMergeSettings {
    /// Start once no foreground I/O happened for this long; `None` = never
    /// merge in the background.
    pub idle: Option<Duration>,
    /// Bytes copied per step.
    pub step_bytes: u64,
    /// Pause after each step.
    pub pause: Duration,
}

impl Default for BackgroundMergeSettings {
    fn default() -> BackgroundMergeSettings {
        BackgroundMergeSettings {
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

/// What one call of [`Engine::merge_all`] did.
#[derive(Debug, Default)]
pub struct Summary {
    pub merged: Vec<String>,
    /// Hidden points left as they are, with the reason.
    pub left: Vec<String>,
    pub bytes_copied: u64,
}

impl Engine {
    /// Coalesces every coalescable hidden point, one after the other,
    /// until none is left. Stops at the first failure.
    pub fn merge_all(&self, throttle: &Throttle) -> Result<Summary, TreeError> {
        let tree = &*self.tree;
        if tree.read_only() {
            return Err(TreeError::new(libc::EROFS, "mounted read-only (-o ro)"));
        }
        // A foreground merge (merge-now, ctl, CLI) makes a background one
        // give way, as tree commands do.
        let _ops = if throttle.yield_to_io {
            tree.lock_ops_yielding()
        } else {
            tree.lock_ops()
        };
        // The mount is going away (see `tree::close`): its locks may be
        // released already, so nothing may be written now.
        if tree.closing() {
            return Err(TreeError::new(
                libc::ECANCELED,
                "not started: the mount is going away",
            ));
        }
        if let Some(why) = self.state.broken.lock().clone() {
            return Err(TreeError::new(libc::EIO, why));
        }
        let mut summary = Summary::default();
        loop {
            let (jobs, left) = plan::plan(tree);
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
                    self.state.finish(Err(e.message.clone()));
                    return Err(e);
                }
            }
        }
        self.state.finish(Ok(summary.describe()));
        Ok(summary)
    }

    /// `merge` on point `name`'s ctl: delete it, then coalesce now.
    pub fn merge_point(&self, id: u64) -> Result<Summary, TreeError> {
        self.tree.delete(id)?;
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
