//! A paused QEMU VM whose RAM is a file of known content, driven over QMP,
//! for tests that need real memory sources (migration streams, ELF cores)
//! made by the real peer.
//!
//! The VM never runs guest code (`-S`, no firmware ever executes): its
//! RAM is a `memory-backend-file` shared with the test, so the test knows
//! every byte QEMU will save. To change guest RAM the way a running guest
//! would (so migration's dirty tracking sees it and sends the page again),
//! the VM can also be started with a qtest channel: qtest's `write` goes
//! through QEMU's memory API, exactly like a device or CPU store.
//!
//! Every socket read has a deadline and the QEMU process is killed when the
//! [`Vm`] is dropped, so a test never hangs on a VM that went wrong.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long one QMP or qtest answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

pub const QEMU: &str = "qemu-system-x86_64";

/// Why a VM could not be used: `Missing` and `NoStart` mean skip the test
/// (the peer is not there or cannot run here); anything later is a failure.
#[derive(Debug)]
pub enum VmError {
    Missing(String),
    NoStart(String),
}

pub struct Vm {
    child: Child,
    qmp: BufReader<UnixStream>,
    qtest: Option<BufReader<UnixStream>>,
    pub ram: PathBuf,
    pub ram_size: u64,
    log: PathBuf,
}

struct Line<'a>(&'a mut BufReader<UnixStream>);

impl Line<'_> {
    fn read(&mut self, what: &str) -> Result<String, String> {
        let mut line = String::new();
        match self.0.read_line(&mut line) {
            Ok(0) => Err(format!("{what}: QEMU closed the connection")),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }
}

impl Vm {
    /// Starts `qemu-system-x86_64 -S` (TCG, i440fx, no devices) with `ram`
    /// (an existing file of `ram_size` bytes) as its memory backend, QMP on
    /// a socket in `dir`, and with `qtest` a qtest channel.
    pub fn start(dir: &Path, ram: &Path, ram_size: u64, qtest: bool) -> Result<Vm, VmError> {
        match Command::new(QEMU).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                return Err(VmError::Missing(format!(
                    "`{QEMU} --version` failed: {}",
                    o.status
                )))
            }
            Err(e) => {
                return Err(VmError::Missing(format!(
                    "`{QEMU}` is not usable ({e}); install qemu-system-x86 from the same suite \
                     as qemu-utils (bookworm-backports)"
                )))
            }
        }
        let qmp_path = dir.join("qmp.sock");
        let qtest_path = dir.join("qtest.sock");
        let log = dir.join("qemu.log");
        let _ = std::fs::remove_file(&qmp_path);
        let _ = std::fs::remove_file(&qtest_path);
        let listener = if qtest {
            Some(
                UnixListener::bind(&qtest_path)
                    .map_err(|e| VmError::NoStart(format!("bind qtest socket: {e}")))?,
            )
        } else {
            None
        };
        let mb = ram_size >> 20;
        let mut cmd = Command::new(QEMU);
        cmd.args(["-S", "-machine", "pc,accel=tcg", "-m"])
            .arg(format!("{mb}M"))
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={mb}M,mem-path={},share=on",
                ram.display()
            ))
            .args(["-machine", "memory-backend=mem", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-display", "none", "-nodefaults", "-no-user-config"]);
        if qtest {
            cmd.arg("-qtest")
                .arg(format!("unix:{}", qtest_path.display()));
        }
        let logf = std::fs::File::create(&log).map_err(|e| VmError::NoStart(e.to_string()))?;
        let errf = logf
            .try_clone()
            .map_err(|e| VmError::NoStart(e.to_string()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .spawn()
            .map_err(|e| VmError::NoStart(format!("spawn {QEMU}: {e}")))?;
        let log_path = log.clone();
        let fail = move |child: &mut Child, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            let out = std::fs::read_to_string(&log_path).unwrap_or_default();
            VmError::NoStart(format!("{why}; QEMU said: {}", out.trim()))
        };
        let qtest = match listener {
            Some(l) => {
                let _ = l.set_nonblocking(true);
                let t0 = Instant::now();
                loop {
                    match l.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(ANSWER_TIMEOUT));
                            break Some(BufReader::new(s));
                        }
                        Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                            if let Ok(Some(st)) = child.try_wait() {
                                return Err(fail(&mut child, format!("QEMU exited ({st})")));
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            return Err(fail(&mut child, format!("no qtest connection: {e}")))
                        }
                    }
                }
            }
            None => None,
        };
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(20) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(fail(&mut child, format!("QEMU exited ({st})")));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(&mut child, format!("cannot connect to QMP: {e}"))),
            }
        };
        let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
        let mut vm = Vm {
            child,
            qmp: BufReader::new(stream),
            qtest,
            ram: ram.to_path_buf(),
            ram_size,
            log,
        };
        let greeting = Line(&mut vm.qmp).read("QMP greeting");
        if let Err(why) = greeting.and_then(|_| vm.qmp("qmp_capabilities", json!({}))) {
            return Err(fail(&mut vm.child, why));
        }
        Ok(vm)
    }

    /// Runs one QMP command; its `return` value, or the error it gave.
    pub fn qmp(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({ "execute": cmd, "arguments": args });
        let stream = self.qmp.get_mut();
        writeln!(stream, "{msg}").map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let line = Line(&mut self.qmp).read(cmd)?;
            let v: Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP {cmd}: {e}: {line}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(format!("QMP {cmd} {args}: {}", v["error"]));
        }
    }

    /// Like [`Vm::qmp`], panicking with the VM's log on error.
    pub fn must(&mut self, cmd: &str, args: Value) -> Value {
        match self.qmp(cmd, args) {
            Ok(v) => v,
            Err(why) => panic!("{why}\nQEMU log: {}", self.log_text()),
        }
    }

    /// One qtest command (e.g. `write 0x1000 0x10 0xabcd...`); its answer.
    pub fn qtest(&mut self, line: &str) -> String {
        let q = self.qtest.as_mut().expect("VM started without qtest");
        writeln!(q.get_mut(), "{line}").expect("qtest write");
        loop {
            let answer = Line(q).read("qtest").expect("qtest answer");
            // Interrupt notifications may come between answers.
            if !answer.starts_with("IRQ") {
                return answer.trim().to_string();
            }
        }
    }

    /// Writes `data` to guest-physical `addr` through qtest.
    pub fn write_guest(&mut self, addr: u64, data: &[u8]) {
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        let answer = self.qtest(&format!("write 0x{addr:x} 0x{:x} 0x{hex}", data.len()));
        assert_eq!(answer, "OK", "qtest write at 0x{addr:x}");
    }

    /// Starts `migrate` to the file `to`.
    pub fn start_migration(&mut self, to: &Path) {
        self.must(
            "migrate",
            json!({ "uri": format!("file:{}", to.display()) }),
        );
    }

    /// `query-migrate` until the migration completes; its final answer.
    pub fn wait_migration(&mut self) -> Value {
        let t0 = Instant::now();
        loop {
            let r = self.must("query-migrate", json!({}));
            match r["status"].as_str() {
                Some("completed") => return r,
                Some("failed") | Some("cancelled") => {
                    panic!("migration failed: {r}\nQEMU log: {}", self.log_text())
                }
                _ if t0.elapsed() > ANSWER_TIMEOUT => panic!("migration did not finish: {r}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Migrates to the file `to` and waits for the end.
    pub fn migrate_to_file(&mut self, to: &Path) -> Value {
        self.start_migration(to);
        self.wait_migration()
    }

    pub fn set_capability(&mut self, name: &str, on: bool) {
        self.must(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": name, "state": on }] }),
        );
    }

    /// `dump-guest-memory` (ELF, physical addresses, no paging) to `to`.
    pub fn dump_guest_memory(&mut self, to: &Path) {
        self.must(
            "dump-guest-memory",
            json!({ "paging": false, "protocol": format!("file:{}", to.display()) }),
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Quits QEMU and waits for it.
    pub fn quit(mut self) {
        let _ = self.qmp("quit", json!({}));
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
