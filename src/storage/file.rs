//! [`FileStorage`]: a file through `pread`, `pwrite` and `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{check_new_len, checked_buf_end, read_past_end, write_past_end, Storage};
use crate::error::{invalid_input, Result};

/// A storage backed by a file.
///
/// Reads and writes are positional (`pread`/`pwrite`), so the handle needs no lock and
/// threads can share it. [`write_all_at`](Storage::write_all_at) checks the range against
/// the file's current length (one `fstat`) before writing, so it never grows the file;
/// another process or thread changing the length concurrently can defeat that check.
/// [`sync_data`](Storage::sync_data) is `fdatasync`, called once per request and never
/// retried.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
}

impl FileStorage {
    /// Opens an existing file, for reading and also writing when `writable`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) when the file cannot be opened.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            writable,
        })
    }

    /// Creates a new, empty, writable file; fails if `path` exists.
    ///
    /// The parent directory is synced after the file is created, so once the file's own
    /// data is synced a crash cannot lose the file itself.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) when the file exists or cannot be created, or when
    /// syncing the parent directory fails (the file is then left behind).
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(parent)?.sync_all()?;
        Ok(Self {
            file,
            path: path.to_owned(),
            writable: true,
        })
    }

    /// Wraps an already open file. `writable` must say whether it was opened for writing.
    #[must_use]
    pub fn from_file(file: File, path: impl Into<PathBuf>, writable: bool) -> Self {
        Self {
            file,
            path: path.into(),
            writable,
        }
    }

    /// The path the file was opened at.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes are allowed.
    #[must_use]
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(invalid_input!(
                "{} is opened read-only",
                self.path.display()
            ))
        }
    }
}

impl Storage for FileStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata()?.len())
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
        // std's read_exact_at retries EINTR and turns a short read into UnexpectedEof.
        Ok(self.file.read_exact_at(buf, offset)?)
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
}
