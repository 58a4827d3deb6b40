//! Byte-flip fuzz of the NTFS reader: bytes flipped in MFT records
//! (headers, attributes, runlists), in INDX blocks of a large directory
//! and in the boot sector. Each round opens the volume and walks it with
//! a deadline: no panic, no hang, no read outside the volume, only Ok or
//! errors naming the volume.

use snaptree::guest::{ntfs, GuestError, GuestFs, ReadBytes};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

struct Flipped {
    base: Arc<Vec<u8>>,
    flips: Vec<(u64, u8)>,
    outside: Arc<AtomicBool>,
}

impl ReadBytes for Flipped {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size())
        {
            self.outside.store(true, Ordering::SeqCst);
        }
        self.base.read_exact_at(buf, offset)?;
        for &(o, x) in &self.flips {
            if o >= offset && o < offset + buf.len() as u64 {
                buf[(o - offset) as usize] ^= x;
            }
        }
        Ok(())
    }
}

/// Regions worth flipping: the first 64 MFT records and every INDX block.
fn regions(b: &[u8]) -> Vec<(u64, u64)> {
    let cs = u64::from(u16::from_le_bytes([b[0x0b], b[0x0c]])) * u64::from(b[0x0d]);
    let mft = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap()) * cs;
    let mut r = vec![(0, 512), (mft, mft + 64 * 1024)];
    for off in (0..b.len() as u64).step_by(cs as usize) {
        if &b[off as usize..off as usize + 4] == b"INDX" {
            r.push((off, off + 4096));
        }
    }
    assert!(r.len() > 3, "no INDX blocks found");
    r
}

fn walk(fs: &dyn GuestFs) {
    let mut todo = vec![fs.root()];
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = todo.pop() {
        if !seen.insert(d) {
            continue;
        }
        let Ok(list) = fs.readdir(d) else { continue };
        for e in list {
            let _ = fs.lookup(d, &e.name);
            if let Ok(a) = fs.getattr(e.ino) {
                let mut buf = vec![0u8; 65536];
                let _ = fs.read(e.ino, 0, &mut buf);
                let _ = fs.readlink(e.ino);
                if let Ok(xs) = fs.listxattr(e.ino) {
                    for x in xs {
                        let _ = fs.getxattr(e.ino, &x);
                    }
                }
                let _ = fs.next_hole(e.ino, 0);
                if a.kind == snaptree::guest::FileKind::Dir {
                    todo.push(e.ino);
                }
            }
        }
    }
}

fn named(e: &GuestError) -> bool {
    match e {
        GuestError::Corrupt { volume, .. }
        | GuestError::Io { volume, .. }
        | GuestError::Unsupported { volume, .. } => volume == "fuzz",
        _ => true,
    }
}

pub fn run(img: &Path, iters: usize) {
    let base = Arc::new(std::fs::read(img).unwrap());
    let regions = regions(&base);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..iters {
        let (a, b) = regions[(rnd() % regions.len() as u64) as usize];
        let flips: Vec<(u64, u8)> = (0..1 + rnd() % 4)
            .map(|_| (a + rnd() % (b - a), (rnd() % 255 + 1) as u8))
            .collect();
        let outside = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(Flipped {
            base: base.clone(),
            flips: flips.clone(),
            outside: outside.clone(),
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            match ntfs::open("fuzz", bytes) {
                Ok(fs) => walk(&*fs),
                Err(e) => assert!(named(&e), "{e}"),
            }
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("round {i} hangs with flips {flips:?}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("round {i} panicked with flips {flips:?}")
            }
        }
        assert!(
            !outside.load(Ordering::SeqCst),
            "round {i} read outside the volume with flips {flips:?}"
        );
    }
}
