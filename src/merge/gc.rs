//! The background merge of a mount: once the mount has been idle for the
//! configured time (no foreground read or write), coalesce what can be,
//! throttled (bytes per step, pause between steps) and backing off while
//! foreground I/O runs. An interrupted merge found at open is redone at
//! once, without waiting for idleness.

use super::Throttle;
use crate::tree::Tree;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Starts the background merger; it ends when `stop` is set.
pub fn spawn_gc(tree: Arc<Tree>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("snaptree-gc".into())
        .spawn(move || run(&tree, &stop))
        .expect("spawning the merge thread")
}

fn run(tree: &Tree, stop: &AtomicBool) {
    let settings = tree.gc_settings().clone();
    let throttle = Throttle {
        step_bytes: settings.step_bytes,
        pause: settings.pause,
        yield_to_io: true,
    };
    // After a failure, wait before trying again rather than spin.
    let mut backoff = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        if tree.read_only() {
            continue;
        }
        if !backoff.is_zero() {
            backoff = backoff.saturating_sub(Duration::from_millis(250));
            continue;
        }
        let resume = tree.merge.resume.swap(false, Ordering::Relaxed);
        let idle_enough = settings
            .idle
            .is_some_and(|idle| tree.merge.idle_for() >= idle);
        if !(resume || idle_enough) || !tree.has_coalescable() {
            continue;
        }
        let t = if resume {
            Throttle::full()
        } else {
            throttle.clone()
        };
        match tree.merge_all(&t) {
            Err(e) if e.errno == libc::EAGAIN => {
                // Gave way to a tree command: try again once idle.
                tree.merge.note_io();
            }
            Err(e) => {
                tracing::warn!("background merge: {e}");
                backoff = Duration::from_secs(30);
            }
            Ok(_) => {}
        }
    }
}
