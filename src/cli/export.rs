//! `snaptree export`: the flattened disk as a standalone image.
//!
//! Only ranges some layer holds data for are read; holes and zero ranges
//! stay holes in a raw output (and unallocated clusters in a qcow2 one),
//! and so do data blocks that turn out to be all zeros. The output is
//! written under a temporary name and renamed into place at the end, so a
//! failed export never leaves a half-written OUT.

use super::{ChainArgs, CliResult};
use crate::chain::resolve::Source;
use crate::image::qcow2::create::{create, CreateOptions};
use crate::image::{probe, Format, Layer, NoBacking};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutFormat {
    Raw,
    Qcow2,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The leaf image (its backing chain is followed).
    image: PathBuf,
    /// Where to write the flattened disk.
    out: PathBuf,
    /// Output format: raw (sparse) or qcow2 (standalone, no backing file).
    #[arg(long, value_enum, default_value = "raw")]
    format: OutFormat,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// Never show a progress bar (it is shown only on a terminal anyway).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

/// Bytes read and written per step.
const STEP: u64 = 4 << 20;

/// Where exported bytes go.
enum Sink {
    Raw(File, PathBuf),
    Qcow2(Arc<dyn Layer>),
}

impl Sink {
    fn write(&self, offset: u64, data: &[u8]) -> CliResult {
        match self {
            Sink::Raw(f, p) => f
                .write_all_at(data, offset)
                .map_err(|e| format!("{}: write at offset {offset}: {e}", p.display()))?,
            Sink::Qcow2(l) => l.write(offset, data, &NoBacking)?,
        }
        Ok(())
    }

    fn finish(self) -> CliResult {
        match self {
            Sink::Raw(f, p) => f
                .sync_all()
                .map_err(|e| format!("{}: fsync: {e}", p.display()))?,
            Sink::Qcow2(l) => l.flush()?,
        }
        Ok(())
    }
}

pub fn run(a: ExportArgs) -> CliResult {
    if a.out.exists() && !a.force {
        return Err(format!("{} exists; pass --force to replace it", a.out.display()).into());
    }
    let chain = a.chain.open(&a.image)?;
    let size = chain.size();
    let tmp = partial_name(&a.out);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> CliResult {
        let sink = match a.format {
            OutFormat::Raw => {
                let f =
                    File::create(&tmp).map_err(|e| format!("{}: create: {e}", tmp.display()))?;
                f.set_len(size)
                    .map_err(|e| format!("{}: truncate: {e}", tmp.display()))?;
                Sink::Raw(f, tmp.clone())
            }
            OutFormat::Qcow2 => {
                create(&tmp, &CreateOptions::new(size))?;
                Sink::Qcow2(probe::open_layer(&tmp, Some(Format::Qcow2), true)?)
            }
        };
        let bar = progress(size, a.quiet);
        let mut buf = vec![0u8; STEP as usize];
        let mut at = 0;
        while at < size {
            let chunk = (64 * STEP).min(size - at);
            for r in chain.map(at, chunk)? {
                if matches!(
                    r.source,
                    Source::Zero | Source::Unallocated | Source::DataHole { .. }
                ) {
                    continue;
                }
                let mut pos = r.start;
                while pos < r.end() {
                    let n = STEP.min(r.end() - pos) as usize;
                    chain.read_at(&mut buf[..n], pos)?;
                    if buf[..n].iter().any(|&b| b != 0) {
                        sink.write(pos, &buf[..n])?;
                    }
                    pos += n as u64;
                    bar.set_position(pos);
                }
            }
            at += chunk;
            bar.set_position(at);
        }
        sink.finish()?;
        bar.finish_and_clear();
        Ok(())
    })();
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, &a.out)
                .map_err(|e| format!("{}: rename into place: {e}", a.out.display()))?;
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn partial_name(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".snaptree-partial");
    out.with_file_name(name)
}

fn progress(size: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(size);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}
