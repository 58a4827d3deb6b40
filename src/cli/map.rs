//! `snaptree map`: the allocation of the flattened disk, per range the
//! depth of the layer that provides it, in `qemu-img map`'s JSON shape.

use super::{ChainArgs, CliResult};
use crate::chain::resolve::{Resolved, Source};
use crate::chain::Chain;
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Args, Debug)]
pub struct MapArgs {
    /// The leaf image (its backing chain is followed).
    image: PathBuf,
    /// Output format: `human` (a table) or `json` (as `qemu-img map --output=json`).
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    #[command(flatten)]
    chain: ChainArgs,
}

/// One line of the map, with qemu-img's fields.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl Entry {
    fn from(r: &Resolved) -> Entry {
        let (present, zero, data, compressed, offset) = match r.source {
            Source::Data { host } => (true, false, true, false, Some(host)),
            Source::DataHole { host } => (true, true, true, false, Some(host)),
            Source::Compressed { .. } => (true, false, true, true, None),
            Source::Zero => (true, true, false, false, None),
            Source::Unallocated => (false, true, false, false, None),
        };
        Entry {
            start: r.start,
            length: r.len,
            depth: r.depth,
            present,
            zero,
            data,
            compressed,
            offset,
        }
    }

    /// Whether `next` continues this entry (same attributes, contiguous).
    fn absorbs(&self, next: &Entry) -> bool {
        self.start + self.length == next.start
            && (
                self.depth,
                self.present,
                self.zero,
                self.data,
                self.compressed,
            ) == (
                next.depth,
                next.present,
                next.zero,
                next.data,
                next.compressed,
            )
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Step through big disks in chunks so memory stays bounded.
const CHUNK: u64 = 1 << 30;

/// Prints the map of the chain of `a.image`: one entry per run of equal
/// attributes (adjacent ranges merged as `qemu-img map` merges them).
pub fn run(a: MapArgs) -> CliResult {
    let chain = a.chain.open(&a.image)?;
    // Built in memory and printed only when complete, so a failure never
    // leaves half a JSON document on stdout.
    let mut out: Vec<u8> = Vec::new();
    let mut pending: Option<Entry> = None;
    let mut first = true;
    if let Output::Json = a.output {
        write!(out, "[")?;
    } else {
        writeln!(
            out,
            "{:<18} {:<18} {:>5}  {:<12} {:<18} File",
            "Offset", "Length", "Depth", "Kind", "Host offset"
        )?;
    }
    let mut emit = |e: Entry, out: &mut dyn Write| -> std::io::Result<()> {
        match a.output {
            Output::Json => write_json(out, &e, std::mem::replace(&mut first, false)),
            Output::Human => write_human(out, &e, &chain),
        }
    };
    let mut at = 0;
    while at < chain.size() {
        let len = CHUNK.min(chain.size() - at);
        for r in chain.map(at, len)? {
            let e = Entry::from(&r);
            match &mut pending {
                Some(p) if p.absorbs(&e) => p.length += e.length,
                _ => {
                    if let Some(p) = pending.replace(e) {
                        emit(p, &mut out)?;
                    }
                }
            }
        }
        at += len;
    }
    if let Some(p) = pending {
        emit(p, &mut out)?;
    }
    if let Output::Json = a.output {
        writeln!(out, "]")?;
    }
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    stdout.write_all(&out)?;
    stdout.flush()?;
    Ok(())
}

/// Writes `e` as one object of `qemu-img map --output=json`'s array,
/// after a separating comma unless it is the `first`.
fn write_json(out: &mut dyn Write, e: &Entry, first: bool) -> std::io::Result<()> {
    if !first {
        writeln!(out, ",")?;
    }
    write!(
        out,
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    )?;
    if let Some(o) = e.offset {
        write!(out, ", \"offset\": {o}")?;
    }
    write!(out, "}}")
}

/// Writes `e` as one row of the human table, naming the file of the
/// layer of `chain` that provides it.
fn write_human(out: &mut dyn Write, e: &Entry, chain: &Chain) -> std::io::Result<()> {
    let kind = match (e.present, e.zero, e.compressed) {
        (false, _, _) => "unallocated",
        (true, true, _) => "zero",
        (true, false, true) => "compressed",
        _ => "data",
    };
    let host = e
        .offset
        .map(|o| format!("{o:#x}"))
        .unwrap_or_else(|| "-".into());
    let file = chain
        .layers()
        .get(e.depth as usize)
        .map(|l| l.path().display().to_string())
        .unwrap_or_default();
    writeln!(
        out,
        "{:<#18x} {:<#18x} {:>5}  {:<12} {:<18} {}",
        e.start, e.length, e.depth, kind, host, file
    )
}
