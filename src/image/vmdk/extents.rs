//! Opening the extents a VMDK is made of: the one extent of a
//! monolithicSparse/streamOptimized file, or every extent a descriptor
//! lists, each file checked against its line.
//!
//! Extent files are named by the descriptor, which may come from anyone:
//! [`DirFiles`] opens them only as plain names in the descriptor's
//! directory (no `/`, `openat` on the directory, `O_NOFOLLOW`: no symlink
//! is followed), never a FIFO or directory, so a crafted descriptor cannot
//! read `/etc/shadow` or a device into a disk, and the file opened is the
//! one the name is in that directory (what `shared` compares).

use super::descriptor::{Access, Descriptor, ExtentLine, ExtentType};
use super::tables::GrainTables;
use super::{cowd, descriptor, sesparse, sparse, HOST_SHIFT};
use crate::error::{ImageError, Result};
use crate::fileio;
use crate::input::InputError;
use crate::storage::Storage;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How an extent stores its bytes once open.
pub enum ExtentKind {
    /// Plain bytes from this offset of the file.
    Flat { offset: u64 },
    /// Zeros; no file.
    Zero,
    /// Grains through a grain directory.
    Sparse(GrainTables),
}

/// What a writer needs of a hosted sparse extent beyond its grain map.
pub struct Hosted {
    pub header: sparse::Header,
    /// File offsets of the redundant directory's grain tables (empty
    /// without one); entries are written to both copies.
    pub redundant: Vec<u64>,
}

/// One open extent: guest bytes `[start, start+len)`.
pub struct OpenExtent {
    pub start: u64,
    pub len: u64,
    /// The extent file (errors name it); the image's own path for a
    /// monolithic file.
    pub path: PathBuf,
    pub file: Option<Arc<dyn Storage>>,
    pub kind: ExtentKind,
    /// Grains are deflated with markers (streamOptimized).
    pub compressed: bool,
    pub markers: bool,
    /// What the extent is, for `info`.
    pub label: String,
    /// The extent is the image file itself (monolithic).
    pub same_as_image: bool,
    /// The line says RW (not RDONLY).
    pub read_write: bool,
    /// A hosted sparse (`KDMV`) extent.
    pub hosted: Option<Hosted>,
}

impl OpenExtent {
    /// Grain size of a sparse extent.
    pub fn grain(&self) -> Option<u64> {
        match &self.kind {
            ExtentKind::Sparse(t) => Some(t.grain),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "extent {} at {} ({} bytes)",
            self.label, self.start, self.len
        )
    }
}

/// Opens extent files by the name a descriptor gives.
pub trait ExtentFiles {
    /// The file `name` (as written in the line at descriptor offset `at`)
    /// and the path errors should name.
    fn open(&self, name: &str, at: u64) -> Result<(PathBuf, Arc<dyn Storage>)>;

    /// The directory the files are in, where other disks are looked for
    /// before a writable open (`shared`); `None`: not on a filesystem.
    fn directory(&self) -> Option<&Path> {
        None
    }
}

/// Extent files inside the descriptor's directory, opened for writing
/// when `writable`.
pub struct DirFiles {
    pub descriptor: PathBuf,
    /// The directory's canonical path (for names in errors) and the
    /// directory itself, opened once: names are resolved in it by
    /// `openat`, so a rename of the path cannot redirect them.
    dir_path: PathBuf,
    dir: File,
    pub writable: bool,
}

impl DirFiles {
    pub fn for_descriptor(path: &Path, writable: bool) -> Result<DirFiles> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let fail = |e| ImageError::io(path, "open directory of", 0, e);
        let dir_path = dir.canonicalize().map_err(fail)?;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir_path)
            .map_err(fail)?;
        Ok(DirFiles {
            descriptor: path.to_path_buf(),
            dir_path,
            dir,
            writable,
        })
    }
}

impl ExtentFiles for DirFiles {
    fn open(&self, name: &str, at: u64) -> Result<(PathBuf, Arc<dyn Storage>)> {
        let refuse = |why: String| {
            ImageError::corrupt(
                &self.descriptor,
                at,
                format!("extent file {name:?} refused: {why}"),
            )
        };
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(refuse(
                "outside the descriptor's directory (extent files are plain names there)".into(),
            ));
        }
        let p = self.dir_path.join(name);
        let f = open_in_dir(&self.dir, name, self.writable).map_err(|e| match e {
            InputError::Io(e) if e.raw_os_error() == Some(libc::ELOOP) => refuse(
                "is a symlink; extent files are opened only as files in the descriptor's \
                 directory, never through a link that may lead outside it"
                    .into(),
            ),
            InputError::Io(e) => ImageError::io(&p, "open", 0, e),
            InputError::Kind(kind) => {
                refuse(format!("is {kind}, not a regular file or block device"))
            }
        })?;
        Ok((p, Arc::new(f)))
    }

    fn directory(&self) -> Option<&Path> {
        Some(&self.dir_path)
    }
}

/// `openat(dir, name)` without following a symlink and without blocking
/// on a FIFO; only a regular file or block device is kept.
fn open_in_dir(dir: &File, name: &str, writable: bool) -> std::result::Result<File, InputError> {
    let c = CString::new(name).map_err(|_| InputError::Kind("not a valid name"))?;
    let mode = if writable {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    };
    let flags = mode | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(InputError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    let ft = f.metadata().map_err(InputError::Io)?.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(InputError::Kind(crate::input::kind_name(ft)));
    }
    // Back to blocking mode (O_NONBLOCK was only for the open).
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(InputError::Io(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// A monolithicSparse or streamOptimized file: one sparse extent in the
/// file itself, described by the embedded descriptor (whose extent line,
/// as in QEMU, is not used: a renamed file keeps working).
pub fn open_monolithic(
    path: &Path,
    file: &Arc<dyn Storage>,
    file_len: u64,
) -> Result<(Descriptor, u64, u64, Vec<OpenExtent>)> {
    let h = sparse::read_header(&**file, path, file_len)?;
    if !h.has_descriptor() {
        return Err(ImageError::unsupported(
            path,
            "a sparse extent with no embedded descriptor: open the descriptor file that names it",
        ));
    }
    let (at, text) = sparse::read_descriptor(&**file, path, &h)?;
    if !sparse::descriptor_present(&text) {
        return Err(ImageError::unsupported(
            path,
            "a sparse extent whose descriptor area is empty: open the descriptor file that names it",
        ));
    }
    let desc = descriptor::parse(path, at, &text)?;
    let (tables, redundant) = sparse::open_tables(&**file, path, &h, file_len)?;
    let e = OpenExtent {
        start: 0,
        len: h.capacity * 512,
        path: path.to_path_buf(),
        file: Some(file.clone()),
        kind: ExtentKind::Sparse(tables),
        compressed: h.compressed(),
        markers: h.markers(),
        label: sparse_label(&h, "(this file)"),
        same_as_image: true,
        read_write: true,
        hosted: Some(Hosted {
            header: h,
            redundant,
        }),
    };
    Ok((desc, at, text.len() as u64, vec![e]))
}

fn sparse_label(h: &sparse::Header, name: &str) -> String {
    let mut s = format!(
        "SPARSE {name} v{} grain {}",
        h.version,
        h.grain_sectors * 512
    );
    for (on, what) in [
        (h.compressed(), " compressed"),
        (h.zero_grain(), " zero-grains"),
        (h.has_rgd(), " redundant-GD"),
        (h.unclean, " unclean-shutdown"),
    ] {
        if on {
            s += what;
        }
    }
    s
}

/// Every extent a descriptor file lists, opened and checked.
pub fn open_listed(
    path: &Path,
    desc: &Descriptor,
    files: &dyn ExtentFiles,
) -> Result<Vec<OpenExtent>> {
    let mut out = Vec::with_capacity(desc.extents.len());
    let mut start = 0u64;
    for line in &desc.extents {
        if line.access == Access::NoAccess {
            return Err(ImageError::unsupported(
                path,
                format!(
                    "NOACCESS extent (line at offset {}) cannot be read",
                    line.at
                ),
            ));
        }
        let len = line.sectors * 512;
        let mut e = if line.kind == ExtentType::Zero {
            OpenExtent {
                start,
                len,
                path: path.to_path_buf(),
                file: None,
                kind: ExtentKind::Zero,
                compressed: false,
                markers: false,
                label: "ZERO".into(),
                same_as_image: false,
                read_write: false,
                hosted: None,
            }
        } else {
            let (p, f) = files.open(&line.file, line.at)?;
            open_one(path, line, p, f)?
        };
        e.start = start;
        e.len = len;
        start += len;
        out.push(e);
    }
    Ok(out)
}

/// Opens one extent file as its line says.
fn open_one(
    desc_path: &Path,
    line: &ExtentLine,
    p: PathBuf,
    f: Arc<dyn Storage>,
) -> Result<OpenExtent> {
    let file_len = fileio::file_len(&*f, &p)?;
    let len = line.sectors * 512;
    let mut e = OpenExtent {
        start: 0,
        len,
        path: p.clone(),
        file: None,
        kind: ExtentKind::Zero,
        compressed: false,
        markers: false,
        label: String::new(),
        same_as_image: false,
        read_write: line.access == Access::ReadWrite,
        hosted: None,
    };
    match line.kind {
        ExtentType::Flat | ExtentType::Vmfs => {
            let offset = line
                .offset
                .checked_mul(512)
                .filter(|o| o.checked_add(len).is_some_and(|end| end < 1 << HOST_SHIFT));
            let Some(offset) = offset else {
                return Err(ImageError::corrupt(
                    desc_path,
                    line.at,
                    "flat extent reaches past 2^48 bytes of its file",
                ));
            };
            e.kind = ExtentKind::Flat { offset };
            e.label = format!("{} {:?} at {offset}", line.kind.name(), line.file);
        }
        ExtentType::Sparse | ExtentType::VmfsSparse => {
            // Both kinds of line take either header, as in QEMU.
            let mut magic = [0u8; 4];
            fileio::read_exact_at(&*f, &p, &mut magic, 0, "VMDK extent magic")?;
            if &magic == cowd::MAGIC {
                open_cowd(desc_path, line, &p, &*f, file_len, &mut e)?;
            } else {
                let h = sparse::read_header(&*f, &p, file_len)?;
                check_capacity(desc_path, line, h.capacity)?;
                let (tables, redundant) = sparse::open_tables(&*f, &p, &h, file_len)?;
                e.kind = ExtentKind::Sparse(tables);
                e.compressed = h.compressed();
                e.markers = h.markers();
                e.label = sparse_label(&h, &format!("{:?}", line.file));
                e.hosted = Some(Hosted {
                    header: h,
                    redundant,
                });
            }
        }
        ExtentType::SeSparse => {
            let (capacity, t) = sesparse::open(&*f, &p, file_len)?;
            check_capacity(desc_path, line, capacity)?;
            e.kind = ExtentKind::Sparse(t);
            e.label = format!("SESPARSE {:?}", line.file);
        }
        ExtentType::Zero => unreachable!("no file"),
    }
    e.file = Some(f);
    Ok(e)
}

fn open_cowd(
    desc_path: &Path,
    line: &ExtentLine,
    p: &Path,
    f: &dyn Storage,
    file_len: u64,
    e: &mut OpenExtent,
) -> Result<()> {
    let (capacity, t) = cowd::open(f, p, file_len)?;
    check_capacity(desc_path, line, capacity)?;
    e.kind = ExtentKind::Sparse(t);
    e.label = format!("VMFSSPARSE {:?}", line.file);
    Ok(())
}

/// A sparse extent's header decides its size (QEMU uses it); a line that
/// says otherwise is refused rather than guessed at.
fn check_capacity(desc_path: &Path, line: &ExtentLine, capacity: u64) -> Result<()> {
    if capacity != line.sectors {
        return Err(ImageError::corrupt(
            desc_path,
            line.at,
            format!(
                "extent line says {} sectors, but {:?} holds {capacity}",
                line.sectors, line.file
            ),
        ));
    }
    Ok(())
}
