//! The background merge of a mount: once the mount has been idle for the
//! configured time (no foreground read or write), coalesce what can be,
//! throttled (bytes per step, pause between steps) and backing off while
//! foreground I/O runs. An interrupted merge found at open is redone at
//! once, without waiting for idleness.

use super::{Engine, Throttle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Starts the background merger; it ends when `stop` is set.
pub fn spawn_background_merge(
    engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("snaptree-merge".into())
        .spawn(move || run(&engine, &stop))
        .expect("spawning the merge thread")
}

fn run(engine: &Engine, stop: &AtomicBool) {
    let tree = engine.tree();
    let settings = engine.settings().clone();
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
        let resume = engine.state.resume.swap(false, Ordering::Relaxed);
        let idle_enough = settings
            .idle
            .is_some_and(|idle| engine.state.idle_for() >= idle);
        if !(resume || idle_enough) || !tree.has_coalescable() {
            continue;
        }
        let t = if resume {
            Throttle::full()
        } else {
            throttle.clone()
        };
        match engine.merge_all(&t) {
            Err(e) if e.errno == libc::EAGAIN => {
                // Gave way to a tree command: try again once idle.
                engine.state.note_io();
            }
            Err(e) => {
                tracing::warn!("background merge: {e}");
                backoff = Duration::from_secs(30);
            }
            Ok(_) => {}
        }
    }
}
