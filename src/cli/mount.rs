//! `snaptree mount`: mounts a snapshot tree with FUSE.
//!
//! By default it runs in the background and returns once the mount is
//! ready, like sshfs: the command re-executes itself in the foreground
//! (`-f`) as a new session and waits for the child to print `ready` on a
//! pipe; if the child fails first, its error is printed and the command
//! exits 1. In the foreground it unmounts cleanly on SIGINT and SIGTERM,
//! and ends when someone runs `umount` or `fusermount3 -u`; either way
//! every image is flushed before it exits.

use super::{ChainArgs, CliResult};
use crate::fs::{mount, MountConfig};
use crate::merge::Engine;
use crate::tree::TreeOptions;
use clap::Args;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// SOURCE and MOUNTPOINT. SOURCE is a directory holding a VM's images
    /// (every qcow2 image in it, and the raw files they use as backing,
    /// make the tree), or one leaf image (its backing chain is the tree).
    /// With a domain (`--domain`, `-o domain=`), SOURCE may be left out;
    /// given (fstab's first field), it is only a label.
    #[arg(value_name = "[SOURCE] MOUNTPOINT", num_args = 1..=2, required = true)]
    paths: Vec<PathBuf>,
    /// Mount libvirt domain NAME: its disks' directory, named and shaped
    /// by libvirt's snapshot records (read, never written; no libvirt
    /// daemon needed).
    #[arg(long, value_name = "NAME")]
    domain: Option<String>,
    /// Where libvirt's directories (`etc/libvirt`, `run/libvirt`,
    /// `var/lib/libvirt`) are found, instead of `/`.
    #[arg(long, value_name = "DIR", default_value = "/")]
    libvirt_root: PathBuf,
    /// Comma-separated mount options: `ro` (everything read-only), `rw`,
    /// `allow_other`, `allow_root`, `novmsd` (ignore a VMware `.vmsd` in
    /// SOURCE: by default its snapshot list names and shapes the tree);
    /// the background merge of hidden points:
    /// `gc_idle=SECONDS` (start after this long without disk I/O; `off`
    /// never; default 10), `gc_step=BYTES` (copied per step, suffixes K M
    /// G; default 16M), `gc_pause=MS` (pause after each step; default 5);
    /// memory imports by `checkpoint SOURCE` on a `ctl`: `ckpt_pages=N`
    /// (pages per step; default 4096), `ckpt_wait=MS` (pause after each
    /// step; default 20).
    /// fstab's `defaults`, `auto`, `noauto`, `user`, `nofail`, `_netdev`
    /// and `x-*` are accepted and ignored.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Stay in the foreground (default: return once mounted).
    #[arg(short = 'f', long = "foreground")]
    foreground: bool,
    /// FUSE event loops, each with its own /dev/fuse descriptor.
    #[arg(long, default_value_t = 4, value_name = "N")]
    threads: usize,
    /// Internal: print `ready` on stdout once mounted (used by the
    /// background mode).
    #[arg(long, hide = true)]
    notify_ready: bool,
    #[command(flatten)]
    chain: ChainArgs,
}

/// Mount options understood from `-o`.
#[derive(Debug)]
struct Options {
    read_only: bool,
    allow_other: bool,
    allow_root: bool,
    background_merge: crate::merge::BackgroundMergeSettings,
    import: crate::memory::checkpoint::Throttle,
    domain: Option<String>,
    /// `novmsd`: ignore a VMware `.vmsd` in the source directory.
    no_vmsd: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            read_only: false,
            allow_other: false,
            allow_root: false,
            background_merge: Default::default(),
            import: crate::memory::checkpoint::Throttle::DEFAULT,
            domain: None,
            no_vmsd: false,
        }
    }
}

/// `4M`, `512K`, `1G`, `65536`.
fn parse_bytes(v: &str) -> Option<u64> {
    let (num, mul) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&v[..i], 1 << 20),
        (i, 'G' | 'g') => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// A tuning option: `gc_*=VALUE` (the background merge; the user-facing
/// names keep "gc") or `ckpt_*=VALUE` (memory imports).
fn parse_tuning(o: &mut Options, key: &str, value: &str) -> CliResult {
    use std::time::Duration;
    let bad = || format!("mount option {key}={value}: not a valid value");
    match key {
        "gc_idle" if value == "off" => o.background_merge.idle = None,
        "gc_idle" => {
            o.background_merge.idle = Some(Duration::from_secs(value.parse().map_err(|_| bad())?))
        }
        "gc_step" => {
            o.background_merge.step_bytes = parse_bytes(value)
                .filter(|b| (64 << 10..=1 << 30).contains(b))
                .ok_or_else(|| format!("{}; gc_step takes 64K..1G", bad()))?
        }
        "gc_pause" => {
            o.background_merge.pause = Duration::from_millis(value.parse().map_err(|_| bad())?)
        }
        "ckpt_pages" => {
            o.import.block_pages = value
                .parse()
                .ok()
                .filter(|n| (1..=1 << 20).contains(n))
                .ok_or_else(|| format!("{}; ckpt_pages takes 1..1048576", bad()))?
        }
        "ckpt_wait" => o.import.wait_ms = value.parse().map_err(|_| bad())?,
        _ => return Err(format!("unknown mount option {key:?}").into()),
    }
    Ok(())
}

fn parse_options(raw: &[String]) -> CliResult<Options> {
    let mut o = Options::default();
    for opt in raw
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match opt {
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "allow_other" => o.allow_other = true,
            "allow_root" => o.allow_root = true,
            "novmsd" => o.no_vmsd = true,
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "nofail" | "_netdev" | "dev"
            | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "async" | "atime" | "noatime"
            | "relatime" => {}
            g if (g.starts_with("gc_") || g.starts_with("ckpt_")) && g.contains('=') => {
                let (k, v) = g.split_once('=').unwrap_or((g, ""));
                parse_tuning(&mut o, k, v)?;
            }
            d if d.starts_with("domain=") => o.domain = Some(d["domain=".len()..].to_string()),
            o if o.starts_with("x-") || o.starts_with("comment=") => {}
            other => {
                return Err(format!(
                    "unknown mount option {other:?} (known: ro, rw, allow_other, allow_root, novmsd, domain=, gc_idle=, gc_step=, gc_pause=, ckpt_pages=, ckpt_wait=)"
                )
                .into())
            }
        }
    }
    Ok(o)
}

/// What to mount where: the tree's directory or image, and a libvirt
/// domain's records when mounting a domain.
struct Target {
    source: PathBuf,
    mountpoint: PathBuf,
    records: Option<Arc<crate::tree::records::Records>>,
    fs_name: String,
}

/// Resolves the positional paths and the domain (`--domain` or
/// `-o domain=`) into a [`Target`], reading libvirt's records.
fn target(a: &MountArgs, o: &Options) -> CliResult<Target> {
    let mountpoint = a.paths.last().cloned().ok_or("no mount point given")?;
    let Some(domain) = a.domain.clone().or_else(|| o.domain.clone()) else {
        if a.paths.len() != 2 {
            return Err("give SOURCE and MOUNTPOINT (or --domain NAME MOUNTPOINT)".into());
        }
        let source = a.paths[0].clone();
        let fs_name = source.canonicalize().unwrap_or(source.clone());
        let fs_name = fs_name.display().to_string();
        let records = (!o.no_vmsd).then(|| vmware_records(&source)).flatten();
        return Ok(Target {
            source,
            mountpoint,
            records,
            fs_name,
        });
    };
    let loaded = crate::libvirt::load(&a.libvirt_root, &domain, &crate::fs::reserved_names())?;
    Ok(Target {
        source: loaded.dir,
        mountpoint,
        records: Some(Arc::new(loaded.records)),
        fs_name: format!("libvirt:{domain}"),
    })
}

/// The snapshot list of a VMware VM directory `source` (one holding a
/// `.vmsd`), if it is one.
fn vmware_records(source: &std::path::Path) -> Option<Arc<crate::tree::records::Records>> {
    let dir = source.canonicalize().ok().filter(|d| d.is_dir())?;
    let records = match crate::vmware::find_vmsd(&dir) {
        Ok(Some(vmsd)) => crate::vmware::load(&dir, &vmsd, &crate::fs::reserved_names()),
        Ok(None) => return None,
        Err(e) => crate::vmware::refused(&e),
    };
    Some(Arc::new(records))
}

pub fn run(a: MountArgs) -> CliResult {
    let opts = parse_options(&a.options)?;
    let mountpoint = a.paths.last().cloned().unwrap_or_default();
    if !mountpoint.is_dir() {
        return Err(format!("{}: mount point is not a directory", mountpoint.display()).into());
    }
    if a.foreground {
        let t = target(&a, &opts)?;
        return run_foreground(&a, &opts, t);
    }
    // Refuse bad records before going to the background.
    target(&a, &opts)?;
    daemonize(&mountpoint)
}

/// Starts `snaptree mount ... -f --notify-ready` as a new session and
/// waits until it is mounted or has failed.
fn daemonize(mountpoint: &std::path::Path) -> CliResult {
    let exe = std::env::current_exe()?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.push("-f".into());
    args.push("--notify-ready".into());
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; the child leaves our terminal
    // session so the mount outlives this shell.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(());
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    let err = err.trim().trim_start_matches("snaptree: error: ");
    Err(format!("mounting {} failed ({status}): {err}", mountpoint.display()).into())
}

fn run_foreground(a: &MountArgs, o: &Options, t: Target) -> CliResult {
    let engine = Engine::open(
        &t.source,
        TreeOptions {
            read_only: o.read_only,
            allow_external_backing: a.chain.allow_external_backing,
            max_depth: a.chain.max_depth,
            import: o.import,
            reserved_names: crate::fs::reserved_names(),
            records: t.records.clone(),
        },
        o.background_merge.clone(),
    )?;
    let engine = Arc::new(engine);
    let config = MountConfig {
        fs_name: t.fs_name.clone(),
        read_only: o.read_only,
        allow_other: o.allow_other,
        allow_root: o.allow_root,
        threads: a.threads,
    };
    let bg = mount(engine, &t.mountpoint, &config).map_err(|e| {
        format!(
            "{}: cannot mount: {e}{}",
            t.mountpoint.display(),
            crate::fdlimit::hint(&e)
        )
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    if a.notify_ready {
        let mut out = std::io::stdout();
        writeln!(out, "ready")?;
        out.flush()?;
        detach_stdio();
    }
    tracing::info!(
        "mounted {} on {}",
        t.source.display(),
        t.mountpoint.display()
    );
    bg.wait(&stop)
        .map_err(|e| format!("{}: {e}", t.mountpoint.display()))?;
    Ok(())
}

/// After `ready`, nobody reads our output: point stdout and stderr at
/// /dev/null so writes cannot fail with EPIPE.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::unix::io::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
            libc::dup2(null.as_raw_fd(), 2);
        }
    }
}
