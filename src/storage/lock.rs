//! QEMU's image locking: open-file-description (OFD) byte-range locks on the image file.
//!
//! QEMU (`block/file-posix.c`) turns the block layer's permissions into shared (`F_RDLCK`)
//! locks on single bytes of the image file:
//!
//! - byte [`PERM_BASE`] + *bit* is locked while the holder **uses** permission *bit*;
//! - byte [`SHARED_BASE`] + *bit* is locked while the holder **refuses to share** it.
//!
//! The bits are QEMU's `BLK_PERM_*` ([`Perm`]). Bytes below 100 belong to libvirt. All the
//! locks are shared locks, so holders never block each other's locking; conflicts are found
//! by *testing*: after taking its own bytes, an opener asks (`F_OFD_GETLK` with `F_WRLCK`)
//! whether any *other* open file description holds byte 200 + *p* for a permission *p* it
//! uses, or byte 100 + *p* for a permission *p* it refuses to share. Either is a conflict and
//! the open fails.
//!
//! Taking before testing is what makes two racing openers safe: whichever tests second sees
//! the other's bytes, and if both test after both took, both fail. Neither can go ahead
//! unseen.
//!
//! What the holders take ([`Access`]), as QEMU 10 takes them on a qcow2 image's file (checked
//! against `/proc/locks` by `tests/locking.rs`):
//!
//! | opener | uses (bytes 100+) | refuses to share (bytes 200+) |
//! |---|---|---|
//! | writer (`qemu-io`, `qemu-nbd`, a VM; [`Access::Write`]) | consistent read, write, resize: 100, 101, 103 | write, resize: 201, 203 |
//! | reader (`qemu-img info`, `qemu-io -r`; [`Access::Read`]) | consistent read: 100 | write, resize: 201, 203 |
//! | force-share reader (`-U`; [`Access::ReadForceShare`]) | consistent read: 100 | nothing |
//!
//! So writers exclude each other and readers, readers coexist with each other, and a
//! force-share reader coexists with everyone (it reads what may be a moving image).
//!
//! OFD locks belong to the open file description, not the process: closing the file (the
//! last descriptor of that description) releases them, two opens inside one process conflict
//! like two processes, and they are never inherited across `exec` (std opens files with
//! `O_CLOEXEC`). Classic POSIX `F_SETLK` locks have none of these properties (they are per
//! process and any `close` of the same file drops them all), so there is no POSIX fallback:
//! where OFD locks are missing the open fails with [`Error::LockUnsupported`], and the caller
//! may choose [`Locking::Off`].

use std::fs::File;
use std::io;
use std::path::Path;

use crate::error::{Error, Result};

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `PERM_BASE + bit` is held while permission `bit` is used.
pub const PERM_BASE: u64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `SHARED_BASE + bit` is held while permission `bit` is
/// not shared.
pub const SHARED_BASE: u64 = 200;

/// One of QEMU's block permissions (`BLK_PERM_*`); the discriminant is its bit number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ` (0x01): the holder's view of the image is consistent.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE` (0x02): the holder changes the contents.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED` (0x04): the holder writes without changing what reads see.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE` (0x08): the holder changes the length.
    Resize = 3,
}

impl Perm {
    /// All permissions, in bit order (`BLK_PERM_ALL` is 0x0f).
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    /// The `BLK_PERM_*` mask.
    #[must_use]
    pub const fn mask(self) -> u8 {
        1 << self as u8
    }

    /// QEMU's name for it (`bdrv_perm_names`), as its lock errors print it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    /// The byte held while this permission is used.
    #[must_use]
    pub const fn perm_byte(self) -> u64 {
        PERM_BASE.saturating_add(self as u64)
    }

    /// The byte held while this permission is not shared.
    #[must_use]
    pub const fn shared_byte(self) -> u64 {
        SHARED_BASE.saturating_add(self as u64)
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether and how a [`FileStorage`](super::FileStorage) locks its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Take QEMU's locks for the open's access ([`Access::Write`] or [`Access::Read`]) and
    /// fail with [`Error::Locked`] when another holder conflicts. The default.
    #[default]
    On,
    /// Read-only opens only: QEMU's force-share (`-U`). Holds the consistent-read byte and
    /// shares everything, so it opens beside a running writer; what it reads may be
    /// changing underneath it (and bitmaps a writer holds are `in_use`, so they read as
    /// inconsistent).
    ForceShare,
    /// No locks at all (QEMU's `locking=off`): nothing stops QEMU and this crate from
    /// writing one image at once. For file systems without lock support.
    Off,
}

/// The permissions an open uses and shares, in QEMU's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A writable open: what QEMU's writable qcow2 open takes on its file.
    Write,
    /// A read-only open: what `qemu-img info` takes.
    Read,
    /// A read-only force-share open: what `qemu-img info -U` takes.
    ReadForceShare,
}

impl Access {
    /// The permissions used (their bytes at 100+ are held).
    #[must_use]
    pub fn used(self) -> &'static [Perm] {
        match self {
            Access::Write => &[Perm::ConsistentRead, Perm::Write, Perm::Resize],
            Access::Read | Access::ReadForceShare => &[Perm::ConsistentRead],
        }
    }

    /// The permissions not shared (their bytes at 200+ are held). A qcow2 open never shares
    /// write or resize: its metadata would change under it.
    #[must_use]
    pub fn unshared(self) -> &'static [Perm] {
        match self {
            Access::Write | Access::Read => &[Perm::Write, Perm::Resize],
            Access::ReadForceShare => &[],
        }
    }

    /// The bytes this access holds, ascending.
    #[must_use]
    pub fn held_bytes(self) -> Vec<u64> {
        let used = self.used().iter().map(|p| p.perm_byte());
        let unshared = self.unshared().iter().map(|p| p.shared_byte());
        used.chain(unshared).collect()
    }

    /// The checks, in QEMU's order (`raw_check_lock_bytes`): for each used permission, its
    /// shared byte (someone refuses to share it: "failed to get lock"); then for each
    /// permission not shared, its perm byte (someone uses it: "failed to get shared lock").
    #[must_use]
    pub fn checks(self) -> Vec<(u64, Perm, bool)> {
        let used = self.used().iter().map(|&p| (p.shared_byte(), p, false));
        let unshared = self.unshared().iter().map(|&p| (p.perm_byte(), p, true));
        used.chain(unshared).collect()
    }
}

/// Takes `access`'s locks on `file`, then tests for conflicting holders.
///
/// On error the caller must close `file` (dropping it), which releases whatever was taken.
///
/// # Errors
///
/// [`Error::Locked`] when another open file description conflicts;
/// [`Error::LockUnsupported`] when the kernel or the file system cannot take OFD locks.
pub(crate) fn lock(file: &File, path: &Path, access: Access) -> Result<()> {
    let r = take_and_test(file, path, access);
    if r.is_err() {
        unlock(file);
    }
    r
}

fn take_and_test(file: &File, path: &Path, access: Access) -> Result<()> {
    // A shared lock is refused (EAGAIN) only by an exclusive lock, which QEMU never takes;
    // report a foreign one as a conflict on that byte's permission.
    for &perm in access.used() {
        sys::set_read_lock(file, perm.perm_byte())
            .map_err(|e| unsupported_or(path, e, Some((perm, false))))?;
    }
    for &perm in access.unshared() {
        sys::set_read_lock(file, perm.shared_byte())
            .map_err(|e| unsupported_or(path, e, Some((perm, true))))?;
    }
    for (byte, perm, shared) in access.checks() {
        let held = sys::held_by_other(file, byte).map_err(|e| unsupported_or(path, e, None))?;
        if held {
            return Err(locked(path, perm, shared));
        }
    }
    Ok(())
}

/// Takes a writer's locks on a file that holds at least a force-share reader's (byte 100),
/// then tests for conflicting holders; on a conflict, releases what it took
/// ([`release_writer`]), so the file keeps only the reader's lock.
///
/// # Errors
///
/// As [`lock`].
pub(crate) fn take_writer(file: &File, path: &Path) -> Result<()> {
    let r = take_and_test(file, path, Access::Write);
    if r.is_err() {
        release_writer(file);
    }
    r
}

/// Releases every lock byte but the consistent-read one (100): what a writer holds beyond
/// a force-share reader (101 to 103 and 201 to 203). Errors are ignored: a lock that
/// stays only makes another opener fail with [`Error::Locked`].
pub(crate) fn release_writer(file: &File) {
    let _ = sys::unlock_range(file, PERM_BASE.saturating_add(1), PERM_BASE.saturating_add(4));
    let _ = sys::unlock_range(file, SHARED_BASE, SHARED_BASE.saturating_add(4));
}

/// Whether another open file description holds the byte of QEMU's write permission (101):
/// a writer has the image open (a running QEMU, `qemu-nbd`, `qemu-io`, a writable store).
/// Locks of this description never count.
pub(crate) fn writer_elsewhere(file: &File) -> io::Result<bool> {
    sys::held_by_other(file, Perm::Write.perm_byte())
}

/// Releases every lock byte (100 to 203) this file's open file description holds.
///
/// Closing the file releases them too, but only once the *last* descriptor of the
/// description is closed: a child forked by any thread of this process shares the
/// description until it execs (or exits), so after a bare close the locks could outlive the
/// handle by as long as the child takes to exec. Unlocking goes through the description
/// itself, so it takes effect at once. Errors are ignored: the close still releases.
pub(crate) fn unlock(file: &File) {
    let _ = sys::unlock_range(file, PERM_BASE, SHARED_BASE.saturating_add(4));
}

/// Asks the kernel to drop the file's clean cached pages (see
/// [`Storage::forget_cached`](super::Storage::forget_cached)): a page whose writeback
/// failed is one, and a read after this comes from the device.
pub(crate) fn drop_clean_pages(file: &File) -> io::Result<()> {
    sys::drop_clean_pages(file)
}

/// Asks the kernel to drop the clean cached pages of `[offset, offset + len)` itself (a
/// folio reaching past it may stay).
pub(crate) fn drop_clean_exactly(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    sys::drop_clean_range(file, offset, len)
}

/// Asks the kernel to drop the clean cached pages around `[offset, offset + len)`: the
/// range widened on both sides to a multiple of [`folio_bound`] bytes, at least the largest
/// page-cache folio. A folio is aligned to its size in the file, so every folio holding a
/// byte of the range lies wholly inside, and the kernel drops it (it keeps a folio that
/// reaches past the range it is given, as a large readahead folio does past a read's own
/// pages).
pub(crate) fn drop_clean_around(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let window = folio_bound(sys::page_size());
    let start = offset & !(window.wrapping_sub(1));
    let end = offset
        .saturating_add(len)
        .checked_next_multiple_of(window)
        .unwrap_or(u64::MAX);
    sys::drop_clean_range(file, start, end.saturating_sub(start))
}

/// Asks the kernel to read `ranges` (offset, length) of `file` into its cache ahead of
/// their reads (`posix_fadvise(POSIX_FADV_WILLNEED)`), each a request the device may serve
/// beside the others. With `fresh`, the clean cached pages around every range are dropped
/// first, as [`drop_clean_around`] drops them before a read, all of them before the first
/// advice (so that no range's drop throws away what another's advice read): what the kernel
/// then holds of the ranges came from the device after this call. False when a drop
/// failed (nothing was advised then).
pub(crate) fn read_ahead(file: &File, ranges: &[(u64, u64)], fresh: bool) -> bool {
    // An empty range is nothing to read (`posix_fadvise` would take its length of 0 as
    // "to the end of the file").
    let ranges: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
    if fresh {
        let window = folio_bound(sys::page_size());
        let mut spans: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(offset, len)| {
                let start = offset & !(window.wrapping_sub(1));
                let end = offset
                    .saturating_add(len)
                    .checked_next_multiple_of(window)
                    .unwrap_or(u64::MAX);
                (start, end)
            })
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        for (start, end) in merged {
            // A span past what an offset can name is not dropped (`sys::drop_clean_range`
            // does nothing there): its ranges are not fresh.
            if i64::try_from(end).is_err()
                || sys::drop_clean_range(file, start, end.saturating_sub(start).max(1)).is_err()
            {
                return false;
            }
        }
    }
    for &(offset, len) in &ranges {
        // A hint: a refused one leaves the read to fetch the range itself.
        let _ = sys::will_need(file, offset, len);
    }
    true
}

/// A power of two at least as large as any page-cache folio with pages of `page` bytes:
/// 2048 pages (`MAX_PAGECACHE_ORDER` is at most 11 since Linux 6.10) and the PMD size
/// (`HPAGE_PMD_ORDER`, the bound before: a page table of `page / 8` entries), whichever is
/// larger. 8 MiB with 4 KiB pages, 32 MiB with 16 KiB, 512 MiB with 64 KiB.
fn folio_bound(page: u64) -> u64 {
    let page = page.max(4096).next_power_of_two();
    page.saturating_mul(2048)
        .max(page.saturating_mul(page / 8))
        .next_power_of_two()
}

fn locked(path: &Path, perm: Perm, shared: bool) -> Error {
    Error::Locked {
        path: path.to_owned(),
        perm: perm.name(),
        shared,
    }
}

/// Maps a failed lock call: `EAGAIN`/`EACCES` mean another holder (QEMU elides them the same
/// way); anything else means locking itself does not work here.
fn unsupported_or(path: &Path, e: io::Error, conflict: Option<(Perm, bool)>) -> Error {
    match (e.raw_os_error(), conflict) {
        (Some(libc::EAGAIN | libc::EACCES), Some((perm, shared))) => locked(path, perm, shared),
        _ => Error::LockUnsupported {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// The two `fcntl` calls and the cache advice ([`drop_clean_pages`]). The only unsafe code
/// in the storage layer: each call passes a descriptor owned by a live `File` and, for
/// `fcntl`, a `struct flock` owned by the caller.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    fn flock(l_type: libc::c_int, byte: u64) -> io::Result<libc::flock> {
        let start = libc::off_t::try_from(byte)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value, and a
        // zero `l_pid` is what F_OFD_* require.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = l_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start;
        fl.l_len = 1;
        Ok(fl)
    }

    /// Takes a shared OFD lock on `byte`, without waiting.
    pub(super) fn set_read_lock(file: &File, byte: u64) -> io::Result<()> {
        let fl = flock(libc::F_RDLCK, byte)?;
        loop {
            // SAFETY: the descriptor is open for the life of `file`, and `fl` is a valid
            // `struct flock` that F_OFD_SETLK only reads.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Releases this description's locks on `start..end`.
    pub(super) fn unlock_range(file: &File, start: u64, end: u64) -> io::Result<()> {
        let mut fl = flock(libc::F_UNLCK, start)?;
        fl.l_len = libc::off_t::try_from(end.saturating_sub(start))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the descriptor is open for the life of `file`, and `fl` is a valid
        // `struct flock` that F_OFD_SETLK only reads.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether another open file description holds a lock on `byte` (one an exclusive lock
    /// would conflict with). Locks of this description never count.
    pub(super) fn held_by_other(file: &File, byte: u64) -> io::Result<bool> {
        let mut fl = flock(libc::F_WRLCK, byte)?;
        // SAFETY: the descriptor is open for the life of `file`, and `fl` is a valid, owned
        // `struct flock` that F_OFD_GETLK overwrites in place.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file.
    pub(super) fn drop_clean_pages(file: &File) -> io::Result<()> {
        drop_clean_range(file, 0, 0)
    }

    /// The size of a memory page.
    pub(super) fn page_size() -> u64 {
        // SAFETY: sysconf takes an integer and touches no memory of ours.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).unwrap_or(4096).max(4096)
    }

    /// `posix_fadvise(POSIX_FADV_DONTNEED)` over `len` bytes from `offset` (0: to the end).
    pub(super) fn drop_clean_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
        fadvise(file, offset, len, libc::POSIX_FADV_DONTNEED)
    }

    /// `posix_fadvise(POSIX_FADV_WILLNEED)` over `len` bytes from `offset`: the kernel
    /// starts reading them into its cache and returns.
    pub(super) fn will_need(file: &File, offset: u64, len: u64) -> io::Result<()> {
        fadvise(file, offset, len, libc::POSIX_FADV_WILLNEED)
    }

    fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            // Past what an offset can name: nothing there is cached, nor can be.
            return Ok(());
        };
        // SAFETY: the descriptor is open for the life of `file`; the call takes integers
        // only and touches no memory of ours.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, advice) };
        // posix_fadvise returns the error number instead of setting errno.
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use std::fs::File;
    use std::io;

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "open file description locks (F_OFD_SETLK) are Linux-only",
        )
    }

    pub(super) fn set_read_lock(_file: &File, _byte: u64) -> io::Result<()> {
        Err(unsupported())
    }

    pub(super) fn held_by_other(_file: &File, _byte: u64) -> io::Result<bool> {
        Err(unsupported())
    }

    pub(super) fn unlock_range(_file: &File, _start: u64, _end: u64) -> io::Result<()> {
        Err(unsupported())
    }

    /// No advice elsewhere: the hazard it answers (Linux marking failed pages clean) is
    /// Linux's.
    pub(super) fn drop_clean_pages(_file: &File) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn page_size() -> u64 {
        4096
    }

    pub(super) fn drop_clean_range(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn will_need(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's constants: `RAW_LOCK_PERM_BASE`, `RAW_LOCK_SHARED_BASE` (block/file-posix.c)
    /// and `BLK_PERM_*` (include/block/block-common.h).
    #[test]
    fn constants_are_qemus() {
        assert_eq!(PERM_BASE, 100);
        assert_eq!(SHARED_BASE, 200);
        let masks: Vec<u8> = Perm::ALL.iter().map(|p| p.mask()).collect();
        assert_eq!(masks, [0x01, 0x02, 0x04, 0x08]);
        assert_eq!(masks.iter().fold(0, |a, m| a | m), 0x0f);
        let names: Vec<&str> = Perm::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            ["consistent read", "write", "write unchanged", "resize"]
        );
    }

    #[test]
    fn the_drop_window_holds_the_largest_folio_of_every_page_size() {
        for (page, window) in [(4096, 8 << 20), (16 << 10, 32 << 20), (64 << 10, 512 << 20)] {
            assert_eq!(folio_bound(page), window, "{page}");
        }
    }

    #[test]
    fn byte_layout() {
        assert_eq!(Access::Write.held_bytes(), [100, 101, 103, 201, 203]);
        assert_eq!(Access::Read.held_bytes(), [100, 201, 203]);
        assert_eq!(Access::ReadForceShare.held_bytes(), [100]);
        assert_eq!(
            Access::Write.checks(),
            [
                (200, Perm::ConsistentRead, false),
                (201, Perm::Write, false),
                (203, Perm::Resize, false),
                (101, Perm::Write, true),
                (103, Perm::Resize, true),
            ]
        );
        assert_eq!(
            Access::Read.checks(),
            [
                (200, Perm::ConsistentRead, false),
                (101, Perm::Write, true),
                (103, Perm::Resize, true),
            ]
        );
        assert_eq!(
            Access::ReadForceShare.checks(),
            [(200, Perm::ConsistentRead, false)]
        );
    }

    /// Holders conflict exactly when one uses what the other does not share, in either
    /// direction: writers exclude everyone but force-share readers.
    #[test]
    fn conflict_matrix() {
        let conflicts = |a: Access, b: Access| {
            let held = b.held_bytes();
            a.checks().iter().any(|(byte, _, _)| held.contains(byte))
        };
        use Access::*;
        let all = [Write, Read, ReadForceShare];
        for a in all {
            for b in all {
                let expected = matches!((a, b), (Write, Write) | (Write, Read) | (Read, Write));
                assert_eq!(conflicts(a, b), expected, "{a:?} opening beside {b:?}");
                assert_eq!(conflicts(a, b), conflicts(b, a), "{a:?} / {b:?} symmetric");
            }
        }
    }

    #[test]
    fn lock_errors_map() {
        let p = Path::new("img");
        let e = unsupported_or(
            p,
            io::Error::from_raw_os_error(libc::EAGAIN),
            Some((Perm::Write, true)),
        );
        assert!(
            matches!(
                e,
                Error::Locked {
                    perm: "write",
                    shared: true,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = unsupported_or(
            p,
            io::Error::from_raw_os_error(libc::ENOLCK),
            Some((Perm::Write, true)),
        );
        assert!(matches!(e, Error::LockUnsupported { .. }), "{e:?}");
        let e = unsupported_or(p, io::Error::from_raw_os_error(libc::EINVAL), None);
        assert!(matches!(e, Error::LockUnsupported { .. }), "{e:?}");
    }
}
