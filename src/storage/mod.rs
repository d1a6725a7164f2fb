//! The storage layer: a tiny positional-I/O trait and the backends and wrappers built on it.
//!
//! [`Storage`] is the whole contract the qcow2 image relies on. Its five required methods,
//! each taking `&self` so one handle can be shared between threads, are these (the others
//! have defaults: dropping the cache, reading ahead, the writer's locks, an external data
//! file's locks):
//!
//! | method | contract |
//! |---|---|
//! | [`len`](Storage::len) | the current length in bytes |
//! | [`read_exact_at`](Storage::read_exact_at) | fills the whole buffer; a range past the end is an error, never a short read |
//! | [`write_all_at`](Storage::write_all_at) | writes the whole buffer inside the current length; never grows |
//! | [`set_len`](Storage::set_len) | the only way to grow (with zeroes) or shrink |
//! | [`sync_data`](Storage::sync_data) | the only ordering barrier: what was written before it is durable after it |
//!
//! Policy and conveniences live in [`StorageExt`], which every `Storage` gets for free.
//!
//! Backends: [`FileStorage`] (a file through `pread`/`pwrite`/`fdatasync`, holding QEMU's
//! image locks, see [`lock`]) and [`MemStorage`] (a byte vector). Wrappers, which stack on any `Storage` and are meant for tests and
//! fuzzing: [`LatchingStorage`] (fails closed after the first I/O error, for a caller that
//! stacks it; the image has its own latch, `Image`'s poisoned flag), [`FaultStorage`]
//! (fails chosen operations) and [`CrashStorage`] (an in-memory storage that records every
//! operation and builds the images a crash could leave behind).
//!
//! A crash test runs an operation once on a [`CrashStorage`] and then checks the image every
//! crash point could leave:
//!
//! ```
//! use dirty_bitmap::storage::{CrashMode, CrashStorage, LatchingStorage, Storage, StorageExt};
//!
//! let crash = CrashStorage::new();
//! let storage = LatchingStorage::new(&crash);
//! storage.set_len(4096)?;
//! storage.write_u32_be_at(0, 0x5146_49fb)?; // "QFI\xfb"
//! storage.sync_data()?;
//! storage.write_u64_be_at(8, 42)?; // not yet synced
//!
//! for point in crash.crash_points() {
//!     for mode in [CrashMode::Dropped, CrashMode::Kept, CrashMode::Torn { seed: 1 }] {
//!         let image = crash.crash_image(point, mode)?;
//!         // Reopen `image` here and check what it promises.
//!         assert!(image.is_empty() || image.len() == 4096);
//!     }
//! }
//! let end = crash.op_count();
//! assert_eq!(crash.crash_image(end, CrashMode::Dropped)?[8..16], [0; 8]);
//! assert_eq!(crash.crash_image(end, CrashMode::Kept)?[15], 42);
//! # Ok::<(), dirty_bitmap::Error>(())
//! ```
//!
//! # Errors, uniformly across backends
//!
//! - A range whose end overflows `u64` or exceeds [`MAX_STORAGE_LEN`] is
//!   [`Error::InvalidInput`].
//! - A read that does not fit inside [`len`](Storage::len) is an [`Error::Io`]
//!   of kind [`UnexpectedEof`](std::io::ErrorKind::UnexpectedEof), like
//!   [`std::io::Read::read_exact`].
//! - A write that does not fit inside `len` is [`Error::InvalidInput`].
//! - **[`Error::InvalidInput`] or [`Error::WrongState`] from `write_all_at` or `set_len`
//!   guarantees that the storage was not touched** (a range past the end, a read-only
//!   handle; a [`FileStorage`] whose writer locks are released during a hand-over, which
//!   refuses before it touches the file). Any other error from a mutating method leaves
//!   the storage in an unknown state; [`LatchingStorage`] relies on this distinction, and
//!   a backend must not return either of those two after it touched anything.

#[cfg(any(test, feature = "testing"))]
mod crash;
#[cfg(any(test, feature = "testing"))]
mod fault;
mod file;
mod latch;
pub mod lock;
mod memory;
mod mode;

use std::fmt::Debug;
use std::io;
use std::sync::Arc;

use byteorder::{BigEndian, ByteOrder};

use crate::error::{invalid_input, Error, Result};

#[cfg(any(test, feature = "testing"))]
pub use crash::{CrashImages, CrashMode, CrashStorage, Op};
#[cfg(any(test, feature = "testing"))]
pub use fault::{FaultPlan, FaultStorage, Landed, Trigger};
pub use file::FileStorage;
pub use latch::LatchingStorage;
pub use lock::Locking;
pub use memory::MemStorage;
pub use mode::OpenMode;

/// The crash model's unit of atomicity: the bytes of one aligned 512-byte sector reach the
/// medium together or not at all (a torn write tears between sectors, never inside one).
/// The in-place flags write and the header commit rely on it (`docs/CRASH-CONSISTENCY.md`);
/// `CrashStorage`'s torn crashes tear at it.
pub const SECTOR_SIZE: u64 = 512;

/// The largest length, and the largest end of a range, that any backend accepts.
///
/// `off_t` is signed, so no file can be longer than `i64::MAX` bytes; every backend enforces
/// the same limit so that they all fail the same way.
pub const MAX_STORAGE_LEN: u64 = i64::MAX as u64;

/// Positional byte storage underneath a qcow2 image.
///
/// Object-safe: the image holds a `Box<dyn Storage>` or an `Arc<dyn Storage>`. Every method
/// takes `&self`; implementations synchronize internally. Concurrent writes to overlapping
/// ranges land in an unspecified order, as with `pwrite`.
///
/// See the [module documentation](self) for how errors are reported.
#[expect(
    clippy::len_without_is_empty,
    reason = "the trait stays minimal; is_empty is a convenience in StorageExt"
)]
pub trait Storage: Send + Sync + Debug {
    /// The current length in bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the backend cannot tell (for a file, seeking to its end failed).
    fn len(&self) -> Result<u64>;

    /// Fills `buf` with the bytes at `offset..offset + buf.len()`.
    ///
    /// A zero-length read at any offset up to `len()` succeeds.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the range's end overflows or exceeds [`MAX_STORAGE_LEN`];
    /// [`Error::Io`] of kind `UnexpectedEof` when the range ends past `len()`; [`Error::Io`]
    /// when the backend fails. The contents of `buf` are unspecified after an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`. Never changes the length.
    ///
    /// The bytes are visible to later reads at once but durable only after a successful
    /// [`sync_data`](Storage::sync_data).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the range ends past `len()` (or overflows), in which case
    /// nothing was written; [`Error::Io`] when the backend fails, in which case any part of
    /// `buf` may or may not have landed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Grows (with zero bytes) or shrinks the storage to exactly `new_len` bytes.
    ///
    /// The new length is durable only after a successful [`sync_data`](Storage::sync_data).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `new_len` exceeds [`MAX_STORAGE_LEN`] (nothing changed);
    /// [`Error::Io`] when the backend fails, for example when the disk is full.
    fn set_len(&self, new_len: u64) -> Result<()>;

    /// Makes every completed write and length change durable.
    ///
    /// This is the only ordering barrier: writes issued before it reach stable storage
    /// before it returns, and writes issued after it may land in any order relative to each
    /// other until the next one.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the data may not be durable. **Never retry a failed sync**: the
    /// kernel may already have dropped the dirty pages it failed to write, so a second sync
    /// can succeed without the data being on disk. Wrap the storage in a
    /// [`LatchingStorage`] to enforce this.
    fn sync_data(&self) -> Result<()>;

    /// Takes (`true`) or releases (`false`) a writer's image locks while the handle stays
    /// open, as QEMU does when it activates or inactivates an image around a migration:
    /// released, the handle keeps only a force-share reader's lock (see
    /// [`lock`]), so another process may open the image writable; taken again,
    /// it fails with [`Error::Locked`] while such a process holds it, and then keeps only
    /// the reader's lock. Taking them while they are held does nothing (and cannot fail on
    /// a conflict, so it never gives them up). Storage without locks, and the default, do
    /// nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Locked`] when another holder conflicts; [`Error::LockUnsupported`] when
    /// the locks cannot be taken.
    fn set_writer_locks(&self, held: bool) -> Result<()> {
        let _ = held;
        Ok(())
    }

    /// Holds, beside the image's own, the locks a QEMU writer of this image holds on its
    /// external data file `name` (the image's `data_file` extension; a relative name is
    /// opened from the working directory, as QEMU opens it): so that while this handle may
    /// write the image, no other program that honours QEMU's locks writes the raw disk
    /// unseen by its bitmaps, and this fails while one does.
    /// [`set_writer_locks`](Self::set_writer_locks) releases and takes them with the
    /// image's. Storage without locks, a read-only handle, and the default, do nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the data file cannot be opened (QEMU refuses such an image too);
    /// [`Error::Locked`] when another holder conflicts; [`Error::LockUnsupported`] when the
    /// locks cannot be taken.
    fn hold_data_file(&self, name: &[u8]) -> Result<()> {
        let _ = name;
        Ok(())
    }

    /// Says that the byte ranges `ranges` (offset, length) will be read soon, so that the
    /// backend may start reading them all at once: a device serves many requests together
    /// where reads one after another each wait for the last. A hint, which reads nothing
    /// into the caller's memory and cannot fail: the reads still go through
    /// [`read_exact_at`](Storage::read_exact_at). File storage asks the kernel to read the
    /// ranges into its cache (`posix_fadvise(POSIX_FADV_WILLNEED)`); one that reads the
    /// device ([`FileStorage::reading_the_device`](crate::storage::FileStorage::reading_the_device))
    /// drops what it cached around them first, and a read of exactly one of them, while
    /// the handle read nothing but this call's ranges since, returns what the device held
    /// at some moment after this call, not necessarily at the read (as for its reads
    /// without one, pages this host dirtied, or another process maps or holds at the
    /// drop, stay). The default does nothing.
    fn prefetch(&self, ranges: &[(u64, u64)]) {
        let _ = ranges;
    }

    /// Drops what the operating system caches of the file's contents, so that later reads
    /// come from the device. After a barrier of some writer failed, Linux keeps the pages it
    /// could not write in its cache, marked clean: reads return bytes the disk does not
    /// hold, and no later barrier of anyone writes them. A writer calls this before it reads
    /// an image whose contents it will vouch for (`Image::open` when writable, and a store
    /// taking its writer locks back). Dirty pages (writes not yet synced) stay, and the
    /// next barrier writes them. File storage asks the kernel to drop the file's clean
    /// pages (`posix_fadvise(POSIX_FADV_DONTNEED)`; elsewhere than Linux it does nothing);
    /// storage with no cache, and the default, do nothing. A storage of your own that
    /// caches what it reads must implement it: the durable mode vouches for what a writer
    /// reads, and is sound only if that is what the device holds.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the kernel refuses the advice.
    fn forget_cached(&self) -> Result<()> {
        Ok(())
    }
}

/// Conveniences for every [`Storage`]; implemented for all of them.
///
/// Everything here is built on the five [`Storage`] methods, so wrappers see (and count,
/// fail or log) the underlying calls.
pub trait StorageExt: Storage {
    /// Whether the storage is zero bytes long.
    ///
    /// # Errors
    ///
    /// As [`Storage::len`].
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads `len` bytes at `offset` into a new vector.
    ///
    /// The range is checked against [`Storage::len`] *before* allocating, so a corrupt
    /// length read from an image cannot make this allocate more than the storage holds.
    ///
    /// # Errors
    ///
    /// As [`Storage::read_exact_at`]; an `UnexpectedEof` [`Error::Io`] when the range ends
    /// past the end, before any allocation; [`Error::Unsupported`] when `len` does not fit
    /// a `usize`.
    fn read_vec_at(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = checked_end(offset, len)?;
        let size = self.len()?;
        if end > size {
            return Err(read_past_end(offset, len, size));
        }
        let n = usize::try_from(len)
            .map_err(|_| Error::Unsupported(format!("read of {len} bytes does not fit in memory")))?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(n)
            .map_err(|e| Error::Io(io::Error::new(io::ErrorKind::OutOfMemory, e)))?;
        buf.resize(n, 0);
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Writes `len` zero bytes at `offset`, in chunks of at most 64 KiB. Never grows.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the range ends past [`Storage::len`] (nothing written);
    /// otherwise as [`Storage::write_all_at`]. A failure part-way leaves a prefix of the
    /// range zeroed.
    fn write_zeroes_at(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: usize = 64 * 1024;
        static ZEROES: [u8; CHUNK] = [0; CHUNK];
        let end = checked_end(offset, len)?;
        let size = self.len()?;
        if end > size {
            return Err(write_past_end(offset, len, size));
        }
        let mut pos = offset;
        while pos < end {
            let n = usize::try_from(end.saturating_sub(pos)).map_or(CHUNK, |left| left.min(CHUNK));
            let chunk = ZEROES.get(..n).unwrap_or(&ZEROES);
            self.write_all_at(chunk, pos)?;
            pos = pos.saturating_add(chunk.len() as u64);
        }
        Ok(())
    }

    /// Reads a big-endian `u64` at `offset`.
    ///
    /// # Errors
    ///
    /// As [`Storage::read_exact_at`].
    fn read_u64_be_at(&self, offset: u64) -> Result<u64> {
        let mut buf = [0u8; 8];
        self.read_exact_at(&mut buf, offset)?;
        Ok(BigEndian::read_u64(&buf))
    }

    /// Writes `value` as a big-endian `u64` at `offset`.
    ///
    /// # Errors
    ///
    /// As [`Storage::write_all_at`].
    fn write_u64_be_at(&self, offset: u64, value: u64) -> Result<()> {
        let mut buf = [0u8; 8];
        BigEndian::write_u64(&mut buf, value);
        self.write_all_at(&buf, offset)
    }

    /// Reads a big-endian `u32` at `offset`.
    ///
    /// # Errors
    ///
    /// As [`Storage::read_exact_at`].
    fn read_u32_be_at(&self, offset: u64) -> Result<u32> {
        let mut buf = [0u8; 4];
        self.read_exact_at(&mut buf, offset)?;
        Ok(BigEndian::read_u32(&buf))
    }

    /// Writes `value` as a big-endian `u32` at `offset`.
    ///
    /// # Errors
    ///
    /// As [`Storage::write_all_at`].
    fn write_u32_be_at(&self, offset: u64, value: u32) -> Result<()> {
        let mut buf = [0u8; 4];
        BigEndian::write_u32(&mut buf, value);
        self.write_all_at(&buf, offset)
    }

    /// Grows the storage to at least `min_len` bytes; never shrinks it.
    ///
    /// # Errors
    ///
    /// As [`Storage::len`] and [`Storage::set_len`].
    fn grow_to(&self, min_len: u64) -> Result<()> {
        if self.len()? < min_len {
            self.set_len(min_len)?;
        }
        Ok(())
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}

macro_rules! forward_storage {
    () => {
        fn len(&self) -> Result<u64> {
            (**self).len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            (**self).read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            (**self).write_all_at(buf, offset)
        }
        fn set_len(&self, new_len: u64) -> Result<()> {
            (**self).set_len(new_len)
        }
        fn sync_data(&self) -> Result<()> {
            (**self).sync_data()
        }
        fn set_writer_locks(&self, held: bool) -> Result<()> {
            (**self).set_writer_locks(held)
        }
        fn hold_data_file(&self, name: &[u8]) -> Result<()> {
            (**self).hold_data_file(name)
        }
        fn forget_cached(&self) -> Result<()> {
            (**self).forget_cached()
        }
        fn prefetch(&self, ranges: &[(u64, u64)]) {
            (**self).prefetch(ranges)
        }
    };
}

impl<S: Storage + ?Sized> Storage for &S {
    forward_storage!();
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    forward_storage!();
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    forward_storage!();
}

/// The end of `offset..offset + len`, or `InvalidInput` when it overflows or exceeds
/// [`MAX_STORAGE_LEN`].
pub(crate) fn checked_end(offset: u64, len: u64) -> Result<u64> {
    offset
        .checked_add(len)
        .filter(|&end| end <= MAX_STORAGE_LEN)
        .ok_or_else(|| {
            invalid_input!(
                "range at offset {offset:#x} of {len} bytes ends beyond the largest storage length"
            )
        })
}

/// [`checked_end`] for a buffer length.
pub(crate) fn checked_buf_end(offset: u64, len: usize) -> Result<u64> {
    checked_end(offset, len as u64)
}

/// The error for a read that does not fit inside the storage.
pub(crate) fn read_past_end(offset: u64, len: u64, size: u64) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at offset {offset:#x} ends past the end ({size:#x})"),
    ))
}

/// The error for a write that does not fit inside the storage.
pub(crate) fn write_past_end(offset: u64, len: u64, size: u64) -> Error {
    invalid_input!(
        "write of {len} bytes at offset {offset:#x} ends past the end ({size:#x}); \
         grow the storage with set_len first"
    )
}

/// The error for a length above [`MAX_STORAGE_LEN`].
pub(crate) fn check_new_len(new_len: u64) -> Result<()> {
    if new_len > MAX_STORAGE_LEN {
        return Err(invalid_input!(
            "length {new_len} exceeds the largest storage length {MAX_STORAGE_LEN}"
        ));
    }
    Ok(())
}
