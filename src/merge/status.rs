//! What `status` shows of the merge engine: the merge running now (which
//! node into which, bytes done/total, rate, ETA, pass), the passes of a
//! leaf coalesce with the writer pause, and the last result. Also the
//! clock of the last foreground I/O, which the background merge waits on.

use parking_lot::Mutex;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// One pass of copying a leaf that is being written.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub pass: u32,
    pub copied: u64,
    /// Bytes written to the leaf while the pass ran.
    pub dirtied: u64,
    pub millis: u64,
}

struct Running {
    what: String,
    done: u64,
    total: u64,
    pass: u32,
    started: Instant,
}

#[derive(Default)]
struct Inner {
    running: Option<Running>,
    passes: Vec<PassReport>,
    pause_ms: Option<f64>,
    last: Option<Result<String, String>>,
}

pub struct MergeState {
    inner: Mutex<Inner>,
    started: Instant,
    /// Milliseconds since `started` of the last foreground read or write.
    last_io: AtomicU64,
    /// An interrupted merge was found at open: merge without waiting for
    /// the idle time.
    pub resume: AtomicBool,
    /// A merge committed but could not finish its cleanup: the tree in
    /// memory is behind the files, so no merge runs until a remount.
    pub broken: Mutex<Option<String>>,
}

impl Default for MergeState {
    fn default() -> MergeState {
        MergeState {
            inner: Mutex::default(),
            started: Instant::now(),
            last_io: AtomicU64::new(0),
            resume: AtomicBool::new(false),
            broken: Mutex::new(None),
        }
    }
}

impl MergeState {
    /// Called on every foreground read and write.
    pub fn note_io(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_io.store(now, Ordering::Relaxed);
    }

    /// How long since the last foreground I/O.
    pub fn idle_for(&self) -> std::time::Duration {
        let now = self.started.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_io.load(Ordering::Relaxed)))
    }

    pub fn begin(&self, what: String, total: u64) {
        let mut g = self.inner.lock();
        g.running = Some(Running {
            what,
            done: 0,
            total,
            pass: 1,
            started: Instant::now(),
        });
        g.passes.clear();
        g.pause_ms = None;
    }

    pub fn progress(&self, bytes: u64) {
        if let Some(r) = self.inner.lock().running.as_mut() {
            r.done += bytes;
        }
    }

    /// A leaf pass ended; the next one copies `next_total` bytes.
    pub fn pass_done(&self, report: PassReport, next_total: u64) {
        let mut g = self.inner.lock();
        if let Some(r) = g.running.as_mut() {
            r.pass = report.pass + 1;
            r.total += next_total;
        }
        g.passes.push(report);
    }

    pub fn writer_pause(&self, ms: f64) {
        self.inner.lock().pause_ms = Some(ms);
    }

    /// The passes and the writer pause of the last leaf coalesce.
    pub fn passes(&self) -> (Vec<PassReport>, Option<f64>) {
        let g = self.inner.lock();
        (g.passes.clone(), g.pause_ms)
    }

    /// The running merge: what, bytes done, bytes total.
    pub fn current(&self) -> Option<(String, u64, u64)> {
        let g = self.inner.lock();
        g.running
            .as_ref()
            .map(|r| (r.what.clone(), r.done, r.total))
    }

    pub fn end_one(&self) {
        self.inner.lock().running = None;
    }

    pub fn finish(&self, result: Result<String, String>) {
        let mut g = self.inner.lock();
        g.running = None;
        g.last = Some(result);
    }

    /// What reading `merge-now` shows: the last result.
    pub fn last_text(&self) -> String {
        match &self.inner.lock().last {
            None => "none\n".into(),
            Some(Ok(s)) => format!("ok: {s}\n"),
            Some(Err(e)) => format!("error: {e}\n"),
        }
    }

    /// The merge lines of `status`.
    pub fn render(&self, out: &mut String, settings: &super::BackgroundMergeSettings) {
        let g = self.inner.lock();
        match &g.running {
            Some(r) => {
                let secs = r.started.elapsed().as_secs_f64().max(1e-3);
                let rate = r.done as f64 / secs;
                let left = r.total.saturating_sub(r.done);
                let eta = if rate > 0.0 {
                    format!("{:.0} s", left as f64 / rate)
                } else {
                    "unknown".into()
                };
                let _ = writeln!(
                    out,
                    "merge: running {} pass {}: {} of {} done, {}/s, ETA {eta}",
                    r.what,
                    r.pass,
                    crate::units::human_size(r.done),
                    crate::units::human_size(r.total),
                    crate::units::human_size(rate as u64),
                );
            }
            None if self.resume.load(Ordering::Relaxed) => {
                let _ = writeln!(out, "merge: pending (an interrupted merge is redone)");
            }
            None => {
                let _ = writeln!(out, "merge: idle");
            }
        }
        for p in &g.passes {
            let _ = writeln!(
                out,
                "merge pass {}: copied {}, dirtied meanwhile {}, {} ms",
                p.pass,
                crate::units::human_size(p.copied),
                crate::units::human_size(p.dirtied),
                p.millis
            );
        }
        if let Some(ms) = g.pause_ms {
            let _ = writeln!(out, "merge writer pause: {ms:.1} ms");
        }
        match &g.last {
            None => {
                let _ = writeln!(out, "last merge: none");
            }
            Some(Ok(s)) => {
                let _ = writeln!(out, "last merge: ok: {s}");
            }
            Some(Err(e)) => {
                let _ = writeln!(out, "last merge: error: {e}");
            }
        }
        let when = settings
            .idle
            .map_or("background merge off".to_string(), |d| {
                format!("background merge after {} s idle", d.as_secs())
            });
        let _ = writeln!(
            out,
            "merge settings: {when}, {} per step, {} ms pause",
            crate::units::human_size(settings.step_bytes),
            settings.pause.as_millis()
        );
    }
}

/// The merge queue lines of `status`: hidden points with one child (to be
/// merged) and those with several (waiting), from `hidden` (each hidden
/// point's name and number of children).
pub fn render_queue(out: &mut String, hidden: Vec<(String, usize)>) {
    let (ready, blocked): (Vec<_>, Vec<_>) = hidden.into_iter().partition(|(_, kids)| *kids == 1);
    let names = |v: &[(String, usize)]| {
        v.iter()
            .map(|(n, _)| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if ready.is_empty() {
        let _ = writeln!(out, "merge queue: empty");
    } else {
        let _ = writeln!(out, "merge queue: {}", names(&ready));
    }
    if !blocked.is_empty() {
        let _ = writeln!(
            out,
            "merge waiting: {} (hidden with several children; merged once one is left)",
            names(&blocked)
        );
    }
}
