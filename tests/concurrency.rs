//! Concurrent readers and one writer on one chain: readers of ranges the
//! writer never touches must always read exact bytes, and readers of
//! ranges being written must see, per byte, either the old or the new
//! value — never anything else (a stale index, a half-linked cluster).

use snaptree::chain::{Chain, OpenOptions};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

#[test]
fn readers_and_a_writer() {
    if !Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("SKIP: qemu-img not found; install qemu-utils");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sh = |args: &[&str]| {
        let o = Command::new(args[0])
            .args(&args[1..])
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // Base: 0x11 everywhere; middle layer: 0x22 on odd MiBs; leaf empty.
    sh(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "base.qcow2",
        "16M",
    ]);
    sh(&["qemu-io", "-c", "write -P 0x11 0 16M", "base.qcow2"]);
    sh(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
    ]);
    let cmds: Vec<String> = (0..16)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("write -P 0x22 {i}M 1M"))
        .collect();
    let mut args = vec!["qemu-io"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push("mid.qcow2");
    sh(&args);
    sh(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "leaf.qcow2",
    ]);

    let expect = |off: u64| -> u8 {
        if (off / MIB) % 2 == 1 {
            0x22
        } else {
            0x11
        }
    };
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let chain = Arc::new(Chain::open(d.path().join("leaf.qcow2"), &opts).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for t in 0..4u64 {
        let (chain, stop) = (chain.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let mut buf = vec![0u8; 300_000];
            while !stop.load(Ordering::Relaxed) || n < 50 {
                // Untouched half: 8..16 MiB, exact bytes.
                let off = 8 * MIB + (n * 7919 * (t + 1)) % (8 * MIB - buf.len() as u64);
                chain.read_at(&mut buf, off).unwrap();
                for (i, &b) in buf.iter().enumerate() {
                    assert_eq!(
                        b,
                        expect(off + i as u64),
                        "untouched byte {} changed",
                        off + i as u64
                    );
                }
                // Written half: old or new (0x5a) per byte.
                let off = (n * 104_729 * (t + 3)) % (8 * MIB - buf.len() as u64);
                chain.read_at(&mut buf, off).unwrap();
                for (i, &b) in buf.iter().enumerate() {
                    let o = off + i as u64;
                    assert!(b == expect(o) || b == 0x5a, "byte {o} reads {b:#x}");
                }
                n += 1;
            }
        }));
    }
    // The writer: odd-sized writes of 0x5a across clusters in 0..8 MiB.
    let data = vec![0x5au8; 100_003];
    let mut off = 4321u64;
    while off + data.len() as u64 <= 8 * MIB {
        chain.write_at(&data, off).unwrap();
        off += data.len() as u64 + 77_777;
    }
    chain.flush().unwrap();
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    drop(chain);
    let o = Command::new("qemu-img")
        .args(["check", "leaf.qcow2"])
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
