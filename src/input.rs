//! Opening files whose names come from input: a tree directory's entries,
//! backing references, the manifest, a `memory` or `checkpoint` command.
//!
//! Why this exists: `open(2)` on a FIFO blocks until a writer shows up,
//! and opening some character devices has side effects (a watchdog starts
//! counting, a tape rewinds). A name from input may be any of these, and a
//! blocked open in `mount` or in a FUSE thread is a hang nobody can kill.
//! So every such open goes through [`open_input`]: the path is checked
//! before the open (no open at all of a device or FIFO named there), the
//! open itself is `O_NONBLOCK` (a FIFO swapped in after the check cannot
//! block it), and the opened descriptor is checked again with `fstat`, so
//! what is used is exactly what was checked.

use crate::error::{ImageError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Which kinds of file an input may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (manifests, journals, memory sources, caches).
    Regular,
    /// Regular files and block devices (disk images: a raw base may be a
    /// whole disk or an LVM volume).
    RegularOrBlock,
}

/// Why an input was refused: the OS said no, or it names the wrong kind
/// of file.
#[derive(Debug)]
pub enum InputError {
    Io(std::io::Error),
    /// A FIFO, socket, directory or character device: the words say which.
    Kind(&'static str),
}

impl Accept {
    fn allows(self, ft: std::fs::FileType) -> bool {
        ft.is_file() || (self == Accept::RegularOrBlock && ft.is_block_device())
    }

    fn wanted(self) -> &'static str {
        match self {
            Accept::Regular => "a regular file",
            Accept::RegularOrBlock => "a regular file or block device",
        }
    }
}

/// Names the kind of a refused file, for the message.
pub(crate) fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Opens `path` (following symlinks) for reading, and writing when
/// `writable`, refusing without blocking anything `accept` does not allow.
pub fn open_checked(path: &Path, writable: bool, accept: Accept) -> Result<File, InputError> {
    let check = |ft: std::fs::FileType| {
        if accept.allows(ft) {
            Ok(())
        } else {
            Err(InputError::Kind(kind_name(ft)))
        }
    };
    check(std::fs::metadata(path).map_err(InputError::Io)?.file_type())?;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(InputError::Io)?;
    check(file.metadata().map_err(InputError::Io)?.file_type())?;
    // Back to blocking mode: O_NONBLOCK was only for the open, and it must
    // not leak into reads of a block device.
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(InputError::Io(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// [`open_checked`] with the image layer's error: the path, and EINVAL for
/// a file of the wrong kind.
pub fn open_input(path: &Path, writable: bool, accept: Accept) -> Result<File> {
    open_checked(path, writable, accept).map_err(|e| match e {
        InputError::Io(e) => ImageError::io(path, "open", 0, e),
        InputError::Kind(kind) => {
            ImageError::invalid(path, format!("is {kind}, not {}: refused", accept.wanted()))
        }
    })
}

/// Reads a small regular file named by input whole, at most `max + 1`
/// bytes (so a caller can tell "too large" without reading it all).
/// The error keeps its [`std::io::ErrorKind`] (`NotFound` stays
/// `NotFound`); a wrong kind of file is `InvalidInput`.
pub fn read_input(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_checked(path, false, Accept::Regular).map_err(|e| match e {
        InputError::Io(e) => e,
        InputError::Kind(kind) => std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {kind}, not a regular file: refused"),
        ),
    })?;
    let mut out = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("snaptree-input-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let d = tmpdir("fifo");
        let fifo = d.join("pipe");
        mkfifo(&fifo);
        let e = open_input(&fifo, false, Accept::RegularOrBlock).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        let msg = e.to_string();
        assert!(msg.contains("pipe") && msg.contains("FIFO"), "{msg}");
        let e = read_input(&fifo, 10).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        // A symlink to the FIFO is the FIFO.
        std::os::unix::fs::symlink(&fifo, d.join("link")).unwrap();
        assert!(open_input(&d.join("link"), false, Accept::Regular).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn directory_and_char_device_are_refused() {
        let d = tmpdir("dir");
        let e = open_input(&d, false, Accept::Regular).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_input(Path::new("/dev/null"), false, Accept::RegularOrBlock).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn regular_file_opens_blocking_and_reads_are_capped() {
        let d = tmpdir("reg");
        let p = d.join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let f = open_input(&p, true, Accept::Regular).unwrap();
        // SAFETY: fcntl on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        assert_eq!(read_input(&p, 4).unwrap(), b"01234");
        assert_eq!(read_input(&p, 100).unwrap(), b"0123456789");
        assert_eq!(
            read_input(&d.join("missing"), 4).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
