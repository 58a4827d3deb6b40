//! Printing: every run of every tool (the spread is part of the result),
//! then per layout a summary of medians, snaptree's time breakdown, and
//! depth 64 against depth 1.

use crate::measure::Target;
use crate::util::median;

/// The chains of one layout, measured.
pub struct Layout {
    pub title: &'static str,
    /// What the layout is, for the summary.
    pub note: String,
    /// Whether its depth 64 vs depth 1 is the goal's measure.
    pub goal: bool,
    /// Virtual disk size, bytes.
    pub size: u64,
    pub targets: Vec<Target>,
}

/// Prints every run of every tool, per chain.
pub fn print_runs(layout: &Layout) {
    println!("{}: every run, MB/s", layout.title);
    for t in &layout.targets {
        let s = &t.samples;
        for (what, v) in [
            ("snaptree cold", &s.snap_cold),
            ("snaptree warm", &s.snap_warm),
            ("pread replay cold", &s.replay_cold),
            ("pread replay warm", &s.replay_warm),
            ("qemu-img bench", &s.qimg_bench),
            ("qemu-img convert", &s.qimg_convert),
            ("qsd fuse", &s.qsd),
        ] {
            if v.is_empty() {
                continue;
            }
            let runs: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
            println!("  depth {:>2}: {what:<18} {}", t.depth, runs.join(" "));
        }
    }
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

/// `b` as a percentage of `a`.
fn pct(a: f64, b: f64) -> String {
    format!("{:.1} %", 100.0 * b / a)
}

/// Prints the summary of one layout; `qsd` says whether qsd ran.
pub fn print_summary(layout: &Layout, qsd: bool) {
    println!();
    println!("== {} ==", layout.title);
    println!("{}", layout.note);
    let qsd_of = |t: &Target| qsd.then(|| median(&t.samples.qsd));
    println!(
        "{:>5} | {:>10} {:>10} | {:>10} {:>12} | {:>8} | {:>11} {:>9} {:>13}",
        "depth",
        "snap cold",
        "snap warm",
        "qimg bench",
        "qimg convert",
        "qsd",
        "snap/qbench",
        "snap/qsd",
        "snap/qconvert"
    );
    for t in &layout.targets {
        let s = &t.samples;
        let cold = median(&s.snap_cold);
        println!(
            "{:>5} | {:>10.0} {:>10.0} | {:>10.0} {:>12.0} | {:>8} | {:>11} {:>9} {:>13}",
            t.depth,
            cold,
            median(&s.snap_warm),
            median(&s.qimg_bench),
            median(&s.qimg_convert),
            qsd_of(t).map_or("skip".into(), |v| format!("{v:.0}")),
            ratio(cold, Some(median(&s.qimg_bench))),
            ratio(cold, qsd_of(t)),
            ratio(cold, Some(median(&s.qimg_convert))),
        );
    }
    println!(
        "{:>5} | {:>7} {:>12} {:>12} | {:>10} {:>10} | {:>11} {:>11}",
        "depth",
        "open ms",
        "resolve cold",
        "resolve warm",
        "idx cold",
        "idx warm",
        "replay cold",
        "replay warm"
    );
    for t in &layout.targets {
        let (s, p) = (&t.samples, &t.parts);
        println!(
            "{:>5} | {:>7.1} {:>12.1} {:>12.1} | {:>10.0} {:>10.0} | {:>11.0} {:>11.0}",
            t.depth,
            p.open_ms,
            p.resolve_cold_ms,
            p.resolve_ms,
            p.cold_index,
            median(&s.snap_warm),
            median(&s.replay_cold),
            median(&s.replay_warm),
        );
    }
    let first = layout.targets.iter().find(|t| t.depth == 1);
    let last = layout.targets.iter().find(|t| t.depth == 64);
    let (Some(a), Some(b)) = (first, last) else {
        return;
    };
    let (sa, sb) = (&a.samples, &b.samples);
    let cold = 100.0 * median(&sb.snap_cold) / median(&sa.snap_cold);
    let warm = 100.0 * median(&sb.snap_warm) / median(&sa.snap_warm);
    // Every run measures all depths one after another, so the ratio within
    // a run is the least disturbed by drifting load.
    let paired: Vec<f64> = sa
        .snap_cold
        .iter()
        .zip(&sb.snap_cold)
        .map(|(x, y)| 100.0 * y / x)
        .collect();
    let runs: Vec<String> = paired.iter().map(|p| format!("{p:.0}")).collect();
    println!(
        "depth 64 vs depth 1: {cold:.1} % (snaptree cold; per run {} %, median {:.1} %; warm {warm:.1} %)",
        runs.join(" "),
        median(&paired)
    );
    let of = |f: fn(&Target) -> &Vec<f64>| pct(median(f(a)), median(f(b)));
    let mut peers = format!(
        "  same for the peers: pread replay cold {}, warm {}; qemu-img bench {}, convert {}",
        of(|t| &t.samples.replay_cold),
        of(|t| &t.samples.replay_warm),
        of(|t| &t.samples.qimg_bench),
        of(|t| &t.samples.qimg_convert),
    );
    if qsd {
        peers += &format!("; qsd {}", of(|t| &t.samples.qsd));
    }
    println!("{peers}");
    if layout.goal {
        let verdict = |v: f64| if v >= 95.0 { "met" } else { "NOT met" };
        println!(
            "  goal depth 64 >= 95 % of depth 1 (same bytes): cold {}, warm {}",
            verdict(cold),
            verdict(warm)
        );
        if layout.size < 1 << 30 {
            println!(
                "  (the goal is stated for 1 GiB; on {} MiB the fixed cost of opening and \
                 resolving 64 layers weighs more)",
                layout.size >> 20
            );
        }
    }
}

/// What the columns mean, once after the summaries.
pub fn print_legend() {
    println!();
    for line in [
        "MB/s = 10^6 bytes/s, medians over the runs; cold = page cache dropped; ratios use",
        "snaptree cold. open ms: Chain::open, page cache dropped. resolve cold/warm: ms to",
        "resolve every 2 MiB region afresh (a cold index's work over one pass), with the L2",
        "tables read from disk / from the page cache. idx cold/warm: snaptree MB/s with a",
        "fresh / a warm index, page cache warm (warm: fastest of 3 passes per run). replay:",
        "snaptree's own preads issued by a bare loop (cold = page cache dropped): the kernel's",
        "and the disk's share of the time.",
    ] {
        println!("{line}");
    }
}
