//! The FUSE adapter: presents a [`Tree`] as the mounted layout of
//! ARCHITECTURE.md ("The mounted layout") with fuser. The layout is declared once,
//! in `layout`; this file answers the kernel's requests from it. It parses
//! no format; every byte of a disk comes from the point's chain.
//!
//! Concurrency: fuser runs several event loops (each with its own
//! `/dev/fuse` fd); all methods take `&self`. Disk I/O holds only the
//! point's I/O read lock (see `tree`), so requests on different points, or
//! reads of one point, never wait for each other. Dynamic files (`tree`,
//! `status`, `info.json`) are rendered at open into the file handle so a
//! reader sees one consistent text.

mod attrs;
mod command;
mod control;
mod disk;
mod guest;
mod handles;
pub mod inodes;
mod layout;
mod listing;
mod memory_files;
mod modes;
mod refuse;
mod session;
mod texts;

pub use layout::reserved_names;
pub use session::{mount, MountConfig, Mounted};

use crate::tree::Tree;
use attrs::TTL;
use fuser::{
    Errno, FileHandle, Filesystem, Generation, INodeNo, KernelConfig, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request,
};
use handles::Handle;
use inodes::{decode, Inode, PointFile};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::SystemTime;

pub struct SnapFs {
    tree: Arc<Tree>,
    /// The merge engine on `tree`: `merge-now`, its lines of `status`,
    /// the idle clock the background merge waits on.
    merge: Arc<crate::merge::Engine>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    mounted_at: SystemTime,
    /// Owners and modes of the host files shown.
    owners: modes::Owners,
    /// Tells the kernel to drop cached entries after `ctl` commands; set
    /// once the session exists.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// The points whose guest views (`fs/`, `volumes/`) are open.
    guest: guest::GuestViews,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl SnapFs {
    pub fn new(
        merge: Arc<crate::merge::Engine>,
        notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    ) -> SnapFs {
        let tree = merge.tree().clone();
        SnapFs {
            owners: modes::Owners::new(tree.dir()),
            tree,
            merge,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            mounted_at: SystemTime::now(),
            notifier,
            guest: guest::GuestViews::new(),
        }
    }
}

impl Filesystem for SnapFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests: fewer round trips per MiB.
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        if let Err(max) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(max);
        }
        // Directory listings with attributes (see `readdirplus`); the
        // kernel picks plain readdir where it would not use them.
        let plus = fuser::InitFlags::FUSE_DO_READDIRPLUS;
        if let Err(unsupported) = config.add_capabilities(plus) {
            let _ = config.add_capabilities(plus - unsupported);
        }
        Ok(())
    }

    /// The session ended (someone ran `umount`, which does not wait for
    /// us): flush and release every image lock now, not at process exit,
    /// so the command after `umount` finds the images free.
    fn destroy(&mut self) {
        if let Err(e) = self.tree.release_for_unmount() {
            tracing::error!("flushing on unmount: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(Inode::Guest(s, g)) = decode(parent.0) {
            use std::os::unix::ffi::OsStrExt;
            return match self.guest_lookup(s, g, name.as_bytes()) {
                Ok((a, ttl)) => reply.entry(&ttl, &a, Generation(0)),
                Err(e) => reply.error(e),
            };
        }
        let found = decode(parent.0)
            .zip(name.to_str())
            .and_then(|(p, n)| self.lookup_in(p, n));
        match found.map(|i| self.getattr_of(i)) {
            Some(Ok(a)) => reply.entry(&listing::entry_ttl(&a), &a, Generation(0)),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(Inode::Guest(s, g)) = decode(ino.0) {
            return match self.guest_getattr(s, g) {
                Ok((a, ttl)) => reply.attr(&ttl, &a),
                Err(e) => reply.error(e),
            };
        }
        match decode(ino.0)
            .ok_or(Errno::ENOENT)
            .and_then(|i| self.getattr_of(i))
        {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(i) = decode(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        // `touch`, `utimensat`: a shown file's times are its image's, not
        // to be set (they would not stick). Times that come with a size
        // are the kernel's own for a truncate (`echo cmd > ctl` opens with
        // O_TRUNC), judged by the size below.
        if size.is_none() && (atime.is_some() || mtime.is_some()) {
            return reply.error(self.refusal(ino.0));
        }
        let current = match self.getattr_of(i) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        if let Some(s) = size {
            let is_ctl = matches!(i, Inode::MergeNow | Inode::Point(_, PointFile::Ctl));
            if !is_ctl && s != current.size {
                let r = Err(crate::tree::TreeError::new(
                    libc::EOPNOTSUPP,
                    format!(
                        "truncate to {s} bytes: a disk keeps its virtual size ({} bytes)",
                        current.size
                    ),
                ));
                self.tree.record("truncate", &r);
                return reply.error(Errno::EOPNOTSUPP);
            }
        }
        reply.attr(&TTL, &current)
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refusal(parent.0))
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refusal(parent.0))
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refusal(parent.0))
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refusal(parent.0))
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refusal(parent.0))
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refusal(newparent.0))
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(self.refusal(parent.0))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match decode(ino.0) {
            Some(Inode::Point(p, PointFile::Parent)) => match self.visible_parent(p) {
                Some(name) => reply.data(format!("../{name}").as_bytes()),
                None => reply.error(Errno::ENOENT),
            },
            Some(Inode::Point(p, PointFile::Files)) => match self.files_target(p) {
                Some(t) => reply.data(t.as_bytes()),
                None => reply.error(Errno::ENOENT),
            },
            Some(Inode::Guest(s, g)) => match self.guest_readlink(s, g) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(e),
            },
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != inodes::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let Some(point) = name.to_str().and_then(|n| self.tree.lookup(n)) else {
            return reply.error(Errno::ENOENT);
        };
        let r = self.tree.delete(point.id);
        self.tree.record(&format!("rmdir {}", point.name), &r);
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e.errno)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(i) = decode(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        match self.open_file(i, wants_write) {
            Ok((h, fl)) => reply.opened(self.new_handle(h), fl),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match h {
            Handle::Disk(p) => match disk::read(&self.tree, &self.merge, &p, offset, size) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(e),
            },
            Handle::Memory(_, m, b) => match disk::read_memory(&self.tree, &m, b, offset, size) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(e),
            },
            Handle::Text(t) => {
                let s = (offset as usize).min(t.len());
                let e = (s + size as usize).min(t.len());
                reply.data(&t[s..e])
            }
            Handle::MergeNow => {
                let t = self.merge.last_text().into_bytes();
                let s = (offset as usize).min(t.len());
                let e = (s + size as usize).min(t.len());
                reply.data(&t[s..e])
            }
            Handle::Ctl(_) | Handle::GuestDir(_) => reply.data(&[]),
            Handle::GuestFile(fs, g) => match guest::read_file(&*fs, g, offset, size) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(e),
            },
            Handle::Volume(b) => match guest::read_volume(&*b, offset, size) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(e),
            },
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let whole = |label: String| control::whole_command(&self.tree, &label, offset, data.len());
        let r = match h {
            Handle::Disk(p) => disk::write(&self.tree, &self.merge, &p, offset, data),
            Handle::Ctl(p) if let Err(e) = whole(format!("{}/ctl", p.name)) => Err(errno(e.errno)),
            Handle::MergeNow if let Err(e) = whole("merge-now".into()) => Err(errno(e.errno)),
            Handle::Ctl(p) => self.ctl_write(&p, data),
            Handle::MergeNow => control::run_merge_now(&self.merge).map_err(|e| errno(e.errno)),
            Handle::Text(_)
            | Handle::Memory(..)
            | Handle::GuestFile(..)
            | Handle::GuestDir(_)
            | Handle::Volume(_) => Err(Errno::EBADF),
        };
        match r {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(p) = self.disk_handle(fh) else {
            return reply.ok();
        };
        match disk::fsync(&p) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// `close(2)` of a disk: what it wrote is made durable before close
    /// returns (a no-op when nothing was written). The kernel waits for
    /// this reply, unlike for `release` or the unmount, so a written
    /// image is clean on disk before `umount` can even start, and the
    /// unmount's `destroy` has only locks left to drop.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let Some(p) = self.disk_handle(fh) else {
            return reply.ok();
        };
        match disk::fsync(&p) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().remove(&fh.0);
        reply.ok()
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.each_entry(ino.0, fh, offset, |e_ino, cookie, kind, name| {
            reply.add(INodeNo(e_ino), cookie, kind, name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// `readdir` with each entry's attributes, so `ls -l`, `find` and
    /// `tar` need no lookup per entry (one round trip per page instead).
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let r = self.each_entry(ino.0, fh, offset, |e_ino, cookie, kind, name| {
            let (attr, ttl) = self.entry_attr(e_ino, kind);
            reply.add(INodeNo(e_ino), cookie, name, &ttl, &attr, Generation(0))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match decode(ino.0) {
            Some(Inode::Guest(s, g)) => match self.guest_opendir(s, g) {
                Ok(h) => reply.opened(self.new_handle(h), fuser::FopenFlags::empty()),
                Err(e) => reply.error(e),
            },
            _ => reply.opened(FileHandle(0), fuser::FopenFlags::empty()),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if fh.0 != 0 {
            self.handles.lock().remove(&fh.0);
        }
        reply.ok()
    }

    fn getxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        use std::os::unix::ffi::OsStrExt;
        let value = match decode(ino.0) {
            Some(Inode::Guest(s, g)) => self.guest_getxattr(s, g, name.as_bytes()),
            _ => Err(errno(libc::ENODATA)),
        };
        reply_xattr(value, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        let names = match decode(ino.0) {
            Some(Inode::Guest(s, g)) => self.guest_listxattr(s, g),
            _ => Ok(Vec::new()),
        };
        reply_xattr(names, size, reply)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match disk::statfs(self.tree.dir()) {
            Ok(s) => reply.statfs(s.0, s.1, s.2, s.3, s.4, s.5, s.6, s.7),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(p) = self.disk_handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match disk::fallocate(&self.tree, &p, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        let r = match self.handle(fh) {
            Some(Handle::Disk(p)) => disk::seek(&p.io.read().chain, offset, whence),
            Some(Handle::Memory(_, m, b)) => disk::seek(disk::memory_chain(&m, b), offset, whence),
            Some(Handle::GuestFile(fs, g)) => guest::seek_file(&*fs, g, offset, whence),
            _ => return reply.error(Errno::EINVAL),
        };
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }
}

/// An xattr reply: the size when asked for it (`size` 0), the bytes when
/// they fit, else ERANGE.
fn reply_xattr(value: Result<Vec<u8>, Errno>, size: u32, reply: fuser::ReplyXattr) {
    match value {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(errno(libc::ERANGE)),
        Err(e) => reply.error(e),
    }
}
