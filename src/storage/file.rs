//! [`FileStorage`]: a file through `pread`, `pwrite` and `fdatasync`, locked as QEMU locks
//! its images.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::lock::{self, Access, Locking};
use super::mode::OpenMode;
use super::{check_new_len, checked_buf_end, read_past_end, write_past_end, Storage};
use crate::error::{invalid_input, Error, Result, StateProblem};

/// A storage backed by a file.
///
/// Reads and writes are positional (`pread`/`pwrite`), so the handle needs no lock and
/// threads can share it. [`write_all_at`](Storage::write_all_at) checks the range against
/// the file's current length (one `lseek`) before writing, so it never grows the file;
/// another process or thread changing the length concurrently can defeat that check.
/// [`sync_data`](Storage::sync_data) is `fdatasync`, called once per request and never
/// retried after an error it reports (std retries an interrupted call, `EINTR`, which
/// reports no writeback error).
///
/// [`open`](Self::open) and [`create`](Self::create) take QEMU's image locks (see
/// [`lock`](super::lock)): a writable open holds what a QEMU writer holds, a read-only open
/// what `qemu-img info` holds, so neither opens beside a QEMU writer, and QEMU cannot open
/// the image writable (nor `qemu-img info` it without `-U`) while a writable `FileStorage`
/// is open. The locks belong to this handle's open file description and are released when
/// it is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    locking: Locking,
    /// The writer's lock bytes were released ([`set_writer_locks`](Storage::set_writer_locks))
    /// and not taken back: every write and `set_len` is refused, as QEMU asserts that
    /// nothing writes an inactive node.
    released: AtomicBool,
    /// The image's external data file and its path, locked as a QEMU writer of the image
    /// locks it ([`hold_data_file`](Storage::hold_data_file)).
    data: Mutex<Option<(File, PathBuf)>>,
    /// The next [`forget_cached`](Storage::forget_cached) does nothing, once: an earlier
    /// handle on this host already dropped the file's cache since anyone here last wrote it
    /// ([`keeping_cache`](FileStorage::keeping_cache)). Later calls drop it as usual.
    keep_cache: AtomicBool,
    /// Every read drops the file's clean cached pages first
    /// ([`reading_the_device`](FileStorage::reading_the_device)).
    device_reads: bool,
    /// With `device_reads`: the ranges of the last [`prefetch`](Storage::prefetch) not
    /// read since, whose cached pages came from the device after that call dropped them;
    /// a read of exactly one of them takes them as they are (once), until the handle
    /// reads anything else.
    fresh: Mutex<Vec<(u64, u64)>>,
}


impl FileStorage {
    /// Whether `(offset, len)` is a range of the last prefetch not read since; it is not
    /// any more. A read of anything else ends the others too.
    fn take_fresh(&self, offset: u64, len: u64) -> bool {
        let mut fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        match fresh.iter().position(|&r| r == (offset, len)) {
            Some(i) => {
                fresh.swap_remove(i);
                true
            }
            None => {
                fresh.clear();
                false
            }
        }
    }

    /// Opens an existing file, for reading and also writing when `mode` is
    /// [`OpenMode::ReadWrite`], with QEMU's image locks ([`Locking::On`]).
    ///
    /// # Errors
    ///
    /// As [`open_with`](Self::open_with).
    pub fn open(path: impl AsRef<Path>, mode: OpenMode) -> Result<Self> {
        Self::open_with(path, mode, Locking::On)
    }

    /// This handle's next [`forget_cached`](Storage::forget_cached) (the one a writable
    /// [`Image::open`](crate::Image::open) makes before its first read) does nothing; later
    /// ones (a store taking its writer locks back, after another writer may have had the
    /// image) drop the cache as usual. For a writer that knows an earlier handle on this
    /// host dropped the file's cache, that no other host writes it, and that nothing here
    /// wrote the file since, or only a writer whose failed barrier fails what this writer
    /// is for (a migration's mirror on this host, whose failed job fails the migration; a
    /// failed writeback nobody saw is reported to this handle's first barrier). Any other
    /// writer keeps the default: after a failed barrier on this host, the cache may hold
    /// pages the disk lacks.
    #[must_use]
    pub fn keeping_cache(self) -> Self {
        self.keep_cache.store(true, Ordering::SeqCst);
        self
    }

    /// Every read of this handle comes from the device, not from what this host cached
    /// before its call (for a range it was told to [`prefetch`](Storage::prefetch), before
    /// that call, when this handle read nothing but that call's ranges between): for a
    /// reader on one host of an image another host writes, on shared storage
    /// whose page caches are not coherent (a LUN or logical volume several hosts see, two
    /// loop devices over one file). A migration destination reads the bitmaps the source
    /// writes that way (`SharedDiskDest::file`); QEMU drops the whole cache at the
    /// activation for the same reason (`raw_co_invalidate_cache`). Each read first asks
    /// the kernel to drop the clean cached pages around its range
    /// (`posix_fadvise(POSIX_FADV_DONTNEED)`, the range widened on each side to the largest
    /// page-cache folio, 8 MiB with 4 KiB pages: over the read's range alone it would leave a large
    /// readahead folio that reaches past it; over the whole file, each read would cost
    /// as much as the file's cached pages, measured far slower beside a writer on the same
    /// host), then reads through the cache. Pages this host's writers dirtied stay (they
    /// are newer than the device), as does a page another process maps or holds at that
    /// instant. Elsewhere than Linux it does nothing.
    #[must_use]
    pub fn reading_the_device(mut self) -> Self {
        self.device_reads = true;
        self
    }

    /// Opens an existing file read-only with QEMU's force-share locking
    /// ([`Locking::ForceShare`], `qemu-img -U`): it opens beside a running QEMU writer,
    /// whose image may change while it is read.
    ///
    /// # Errors
    ///
    /// As [`open_with`](Self::open_with).
    pub fn open_shared(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, OpenMode::ReadOnly, Locking::ForceShare)
    }

    /// Opens an existing file, for reading and also writing when `mode` is
    /// [`OpenMode::ReadWrite`], locked as `locking` says.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) when the file cannot be opened, or is neither a
    /// regular file nor a block device (a FIFO is refused without waiting for its other
    /// end; a directory or a character device holds no image);
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a writable
    /// [`Locking::ForceShare`] open (as QEMU, force-share is for read-only opens);
    /// [`Error::Locked`](crate::Error::Locked) when another holder's locks conflict;
    /// [`Error::LockUnsupported`](crate::Error::LockUnsupported) when the locks cannot be
    /// taken here. The file is closed again on every error.
    pub fn open_with(path: impl AsRef<Path>, mode: OpenMode, locking: Locking) -> Result<Self> {
        let path = path.as_ref();
        let writable = mode.is_writable();
        if writable && locking == Locking::ForceShare {
            return Err(invalid_input!(
                "{}: force-share is for read-only opens only",
                path.display()
            ));
        }
        let file = open_storage_file(path, writable, "the image")?;
        let access = match (locking, writable) {
            (Locking::Off, _) => None,
            (Locking::ForceShare, _) => Some(Access::ReadForceShare),
            (Locking::On, true) => Some(Access::Write),
            (Locking::On, false) => Some(Access::Read),
        };
        if let Some(access) = access {
            // On error `file` drops here, closing the description and its locks.
            lock::lock(&file, path, access)?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            writable,
            locking,
            released: AtomicBool::new(false),
            data: Mutex::new(None),
            keep_cache: AtomicBool::new(false),
            device_reads: false,
            fresh: Mutex::new(Vec::new()),
        })
    }

    /// Creates a new, empty, writable file, holding a writer's image locks; fails if `path`
    /// exists.
    ///
    /// The parent directory is synced after the file is created, so once the file's own
    /// data is synced a crash cannot lose the file itself.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) when the file exists or cannot be created, or when
    /// syncing the parent directory fails; [`Error::Locked`](crate::Error::Locked) when
    /// another process opened the new file before the locks were taken;
    /// [`Error::LockUnsupported`](crate::Error::LockUnsupported) when they cannot be taken
    /// here. On an error after the file was created other than `Locked`, it is removed
    /// when the path still names it and it is empty, so that nothing of this call's is
    /// left behind; a file another process opened or wrote meanwhile is never removed.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Self::create_with(path, Locking::On)
    }

    /// [`create`](Self::create), locked as `locking` says ([`Locking::On`] or
    /// [`Locking::Off`]).
    ///
    /// # Errors
    ///
    /// As [`create`](Self::create);
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for [`Locking::ForceShare`],
    /// before anything is created.
    pub fn create_with(path: impl AsRef<Path>, locking: Locking) -> Result<Self> {
        let path = path.as_ref();
        if locking == Locking::ForceShare {
            return Err(invalid_input!(
                "{}: force-share is for read-only opens only",
                path.display()
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let finish = || -> Result<()> {
            if locking == Locking::On {
                lock::lock(&file, path, Access::Write)?;
            }
            File::open(parent)?.sync_all()?;
            Ok(())
        };
        if let Err(e) = finish() {
            // Removed only while it is still this call's: not when another process took
            // its locks first (it opened the file, and may have written it), and only when
            // the path still names this empty file. Best effort: the error returned is the
            // one that stopped the creation.
            discard_new_file(&file, path, &e);
            return Err(e);
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            writable: true,
            locking,
            released: AtomicBool::new(false),
            data: Mutex::new(None),
            keep_cache: AtomicBool::new(false),
            device_reads: false,
            fresh: Mutex::new(Vec::new()),
        })
    }

    /// Wraps an already open file. `mode` must say whether it was opened for writing.
    ///
    /// Takes no locks ([`locking`](Self::locking) is [`Locking::Off`]): the caller owns the
    /// file's locking.
    #[must_use]
    pub fn from_file(file: File, path: impl Into<PathBuf>, mode: OpenMode) -> Self {
        Self {
            file,
            path: path.into(),
            writable: mode.is_writable(),
            locking: Locking::Off,
            released: AtomicBool::new(false),
            data: Mutex::new(None),
            keep_cache: AtomicBool::new(false),
            device_reads: false,
            fresh: Mutex::new(Vec::new()),
        }
    }

    /// How the file is locked.
    #[must_use]
    pub fn locking(&self) -> Locking {
        self.locking
    }

    /// The path the file was opened at.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether another holder has the file open for writing now: it holds QEMU's lock byte
    /// of the write permission (a running QEMU, `qemu-nbd` or `qemu-io`, a writable
    /// `FileStorage` elsewhere), tested as QEMU tests a conflict. For a force-share reader
    /// ([`Locking::ForceShare`]): a bitmap `in_use` may then be in use because that writer
    /// records it (its bits on disk not current), or have been left in use by a writer that
    /// crashed before it; the disk does not say which. This handle's own locks never count;
    /// a writer that takes no locks is not seen.
    ///
    /// # Errors
    ///
    /// [`Error::LockUnsupported`](crate::Error::LockUnsupported) where OFD locks cannot be
    /// tested.
    pub fn has_writer_elsewhere(&self) -> Result<bool> {
        lock::writer_elsewhere(&self.file).map_err(|source| crate::Error::LockUnsupported {
            path: self.path.clone(),
            source,
        })
    }

    /// Whether writes are allowed.
    #[must_use]
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_writable(&self) -> Result<()> {
        if self.released.load(Ordering::Acquire) {
            Err(Error::WrongState(StateProblem::WriterLocksReleased))
        } else if self.writable {
            Ok(())
        } else {
            Err(invalid_input!(
                "{} is opened read-only",
                self.path.display()
            ))
        }
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Unlock through the description before the close: see `lock::unlock`.
        if self.locking != Locking::Off {
            lock::unlock(&self.file);
            if let Some((data, _)) = self.data.get_mut().ok().and_then(|d| d.as_ref()) {
                lock::unlock(data);
            }
        }
    }
}

impl Storage for FileStorage {
    fn len(&self) -> Result<u64> {
        // `lseek(SEEK_END)`, not `fstat`: a stat reads the timestamps, and on kernels with
        // multigrain timestamps (Linux 6.13 and later) a write after a query of the
        // timestamps stamps the inode at fine granularity, dirtying it, so that the next
        // `fdatasync` commits the filesystem's journal as well. With a stat before every
        // write (the range check), a 4 KiB write and its `fdatasync` took 190 µs on this
        // project's machine instead of 130 µs. The seek moves this description's file
        // position, which nothing here uses (all I/O is positional), and it gives a block
        // device's size where `fstat` gives 0.
        let mut f = &self.file;
        Ok(f.seek(SeekFrom::End(0))?)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = checked_buf_end(offset, buf.len())?;
        if buf.is_empty() {
            // pread would accept any offset; keep the "up to len()" rule of the other backends.
            let size = self.len()?;
            if end > size {
                return Err(read_past_end(offset, 0, size));
            }
            return Ok(());
        }
        // Any other read ends what the last prefetch left fresh: it holds only for the
        // reads that follow that prefetch.
        let fresh = self.device_reads && self.take_fresh(offset, buf.len() as u64);
        if self.device_reads && !fresh {
            lock::drop_clean_around(&self.file, offset, buf.len() as u64)?;
        }
        // std's read_exact_at retries EINTR and turns a short read into UnexpectedEof.
        self.file.read_exact_at(buf, offset)?;
        if fresh {
            // What a prefetch read ahead is read once (a walk's tables): dropped now, in
            // the reader's time, so that it does not weigh on a later drop of the whole file's
            // cache (a writable open's, inside a migration's downtime: docs/BENCHMARKS.md,
            // session 35). Only the whole pages of the range itself: the pages around it
            // may be the next prefetched ranges.
            let _ = lock::drop_clean_exactly(&self.file, offset, buf.len() as u64);
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let end = checked_buf_end(offset, buf.len())?;
        let size = self.len()?;
        if end > size {
            return Err(write_past_end(offset, buf.len() as u64, size));
        }
        Ok(self.file.write_all_at(buf, offset)?)
    }

    fn set_len(&self, new_len: u64) -> Result<()> {
        self.check_writable()?;
        check_new_len(new_len)?;
        Ok(self.file.set_len(new_len)?)
    }

    fn sync_data(&self) -> Result<()> {
        // One fdatasync. After a failure the kernel may have marked the failed pages clean,
        // so a retry could report success for data that never reached the disk: the error
        // goes to the caller, who must not call this again (LatchingStorage enforces it).
        Ok(self.file.sync_data()?)
    }

    /// Asks the kernel to read the ranges ahead, all at once
    /// (`posix_fadvise(POSIX_FADV_WILLNEED)`). Reading the device, it first drops the
    /// clean cached pages around each range as a read would, all before the first
    /// advice; then a read of exactly one of the ranges, while this handle read nothing
    /// but these ranges since, skips its own drop (what it reads came from the device
    /// after this call), and drops the whole pages of its range once read. Any other
    /// read, or the next call, ends that for the ranges not yet read (their reads drop
    /// as usual).
    fn prefetch(&self, ranges: &[(u64, u64)]) {
        let mut fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        fresh.clear();
        if lock::read_ahead(&self.file, ranges, self.device_reads) && self.device_reads {
            for &r in ranges {
                if !fresh.contains(&r) {
                    fresh.push(r);
                }
            }
        }
    }

    fn forget_cached(&self) -> Result<()> {
        if self.keep_cache.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        Ok(super::lock::drop_clean_pages(&self.file)?)
    }

    /// With [`Locking::On`] on a writable handle: releases the writer's lock bytes (the
    /// consistent-read byte stays, as a force-share reader's), or takes them back and
    /// tests for a conflicting holder. Otherwise nothing: a read-only handle holds no
    /// writer's locks, and [`Locking::Off`] none at all.
    ///
    /// Taking them while they are held does nothing: no test, so no conflict can drop
    /// them. (Another opener's bytes, seen between its take and its test, would otherwise
    /// fail the test here, and the failure would give up bytes this handle writes under;
    /// QEMU's `raw_handle_perm_lock` likewise goes back to the bytes the holder had.) A
    /// failed take leaves exactly what was held before it, the reader's byte, on the image
    /// and on the data file.
    fn set_writer_locks(&self, held: bool) -> Result<()> {
        if self.locking != Locking::On || !self.writable {
            return Ok(());
        }
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        if held {
            if !self.released.load(Ordering::Acquire) {
                return Ok(());
            }
            // Both files hold only the reader's byte here (`released`), and that is what
            // `take_writer` leaves on a conflict: the image's writer bytes are released
            // again when the data file's take fails.
            lock::take_writer(&self.file, &self.path)?;
            if let Some((file, path)) = data.as_ref() {
                if let Err(e) = lock::take_writer(file, path) {
                    lock::release_writer(&self.file);
                    return Err(e);
                }
            }
            self.released.store(false, Ordering::Release);
        } else {
            self.released.store(true, Ordering::Release);
            lock::release_writer(&self.file);
            if let Some((file, _)) = data.as_ref() {
                lock::release_writer(file);
            }
        }
        Ok(())
    }

    /// Opens the data file read-only (the locks are shared locks on single bytes, which a
    /// read-only description may take) and takes a writer's locks on it: QEMU's data child
    /// of a writable image uses write and unshares it, so neither a QEMU writer of the raw
    /// file nor a second image over it opens beside this handle. A relative name is opened
    /// from the working directory, as QEMU 10 opens it. Only a regular file or a block
    /// device is taken, as QEMU's `file` and `host_device` drivers take them, and the type
    /// is checked before the open, so a name an image gives to a FIFO or a terminal is
    /// refused instead of blocking the open for good.
    fn hold_data_file(&self, name: &[u8]) -> Result<()> {
        if self.locking != Locking::On || !self.writable {
            return Ok(());
        }
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(name));
        let file = open_storage_file(&path, false, "the data file")?;
        {
            // The file this handle holds already (a store opened again over the same
            // storage): its description keeps its locks. A second description would see
            // them as another holder's and report a conflict with ourselves.
            let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((held, held_path)) = data.as_mut() {
                if same_file(held, &file)? {
                    *held_path = path;
                    return Ok(());
                }
            }
        }
        // On error `file` drops here, closing the description and its locks.
        lock::lock(&file, &path, Access::Write)?;
        if self.released.load(Ordering::Acquire) {
            lock::release_writer(&file);
        }
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((old, _)) = data.replace((file, path)) {
            lock::unlock(&old);
        }
        Ok(())
    }
}

/// Whether `a` and `b` are descriptions of one file (device and inode).
///
/// # Errors
/// I/O from `fstat`.
fn same_file(a: &File, b: &File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Opens `path` (`what` names it in an error), for writing too when `writable`, only if it
/// is a regular file or a block device: anything else is refused with [`Error::Io`] of
/// kind `InvalidInput` before it is opened (opening a FIFO would wait for its other end
/// for good; opening a device can act: a watchdog arms itself), and again on the open file
/// (a name changed in between to another kind of file that opens at once is caught; one
/// renamed to a FIFO in that instant still blocks, as any open of a path would). The open
/// takes no controlling terminal. It is
/// not `O_NONBLOCK`: with it, the open of a file another process holds a lease on (Samba's
/// oplocks, an NFS server's delegations) fails at once instead of waiting for the lease.
fn open_storage_file(path: &Path, writable: bool, what: &str) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let refuse = |kind: std::fs::FileType| -> Result<()> {
        if kind.is_file() || kind.is_block_device() {
            return Ok(());
        }
        Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{what} {} is neither a regular file nor a block device",
                path.display()
            ),
        )))
    };
    refuse(std::fs::metadata(path)?.file_type())?;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    refuse(file.metadata()?.file_type())?;
    Ok(file)
}

/// Removes the file [`FileStorage::create_with`] just made at `path`, after `e` stopped the
/// creation, while it is still that call's: not after [`Error::Locked`] (another process
/// opened it first, and may have written it), and only when `path` still names `file`
/// (the same device and inode) and it is empty.
fn discard_new_file(file: &File, path: &Path, e: &Error) {
    use std::os::unix::fs::MetadataExt;
    if matches!(e, Error::Locked { .. }) {
        return;
    }
    let ours = match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(f), Ok(p)) => f.dev() == p.dev() && f.ino() == p.ino() && f.len() == 0,
        _ => false,
    };
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> Error {
        Error::Io(std::io::Error::other("the directory's sync failed"))
    }

    /// A creation stopped after its file was made removes only its own empty file, not
    /// whatever the path names by then: a file another process has opened (its locks taken
    /// first) and written, or one renamed over it.
    #[test]
    fn a_stopped_creation_removes_only_its_own_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let made = |name: &str| {
            let path = dir.path().join(name);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            (path, file)
        };
        // Its own, empty: removed.
        let (path, file) = made("own");
        discard_new_file(&file, &path, &io());
        assert!(!path.exists(), "its own empty file was left");
        // Another process took the locks first: kept, written or not.
        let (path, file) = made("locked");
        let locked = Error::Locked {
            path: path.clone(),
            perm: "write",
            shared: false,
        };
        discard_new_file(&file, &path, &locked);
        assert!(path.exists(), "a file another process holds was removed");
        // Written meanwhile: kept.
        let (path, file) = made("written");
        std::fs::write(&path, b"QFI\xfb").unwrap();
        discard_new_file(&file, &path, &io());
        assert!(path.exists(), "a written file was removed");
        // Renamed over: the path names another file, kept.
        let (path, file) = made("renamed");
        let other = dir.path().join("other");
        std::fs::write(&other, b"").unwrap();
        std::fs::rename(&other, &path).unwrap();
        discard_new_file(&file, &path, &io());
        assert!(path.exists(), "a file renamed over it was removed");
    }
}
