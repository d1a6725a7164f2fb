//! [`MemStorage`]: bytes in memory, and the slice helpers the in-memory storages share.

use std::fmt;
use std::io;
use std::ops::Range;

use parking_lot::RwLock;

use super::{check_new_len, checked_buf_end, read_past_end, write_past_end, Storage};
use crate::error::{Error, Result};

/// A storage held in a vector of bytes.
///
/// Nothing is ever lost: [`sync_data`](Storage::sync_data) does nothing. Reads take a shared
/// lock and writes an exclusive one, so every call is atomic with respect to the others.
#[derive(Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage holding `bytes`.
    #[must_use]
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            bytes: RwLock::new(bytes.into()),
        }
    }

    /// A copy of the current contents.
    #[must_use]
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }

    /// The contents, consuming the storage.
    #[must_use]
    pub fn into_vec(self) -> Vec<u8> {
        self.bytes.into_inner()
    }
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage")
            .field("len", &self.bytes.read().len())
            .finish()
    }
}

impl Storage for MemStorage {
    fn len(&self) -> Result<u64> {
        Ok(self.bytes.read().len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_slice(&self.bytes.read(), buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        write_slice(&mut self.bytes.write(), buf, offset)
    }

    fn set_len(&self, new_len: u64) -> Result<()> {
        resize(&mut self.bytes.write(), new_len)
    }

    fn sync_data(&self) -> Result<()> {
        Ok(())
    }
}

/// The index range of `offset..offset + len` inside a slice of `size` bytes, if it fits.
fn slice_range(offset: u64, len: usize, size: usize) -> Option<Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= size).then_some(start..end)
}

/// [`Storage::read_exact_at`] on a byte slice.
pub(super) fn read_slice(data: &[u8], buf: &mut [u8], offset: u64) -> Result<()> {
    checked_buf_end(offset, buf.len())?;
    let src = slice_range(offset, buf.len(), data.len())
        .and_then(|r| data.get(r))
        .ok_or_else(|| read_past_end(offset, buf.len() as u64, data.len() as u64))?;
    buf.copy_from_slice(src);
    Ok(())
}

/// [`Storage::write_all_at`] on a byte slice; touches nothing when the range does not fit.
pub(super) fn write_slice(data: &mut [u8], buf: &[u8], offset: u64) -> Result<()> {
    checked_buf_end(offset, buf.len())?;
    let size = data.len() as u64;
    let dst = slice_range(offset, buf.len(), data.len())
        .and_then(|r| data.get_mut(r))
        .ok_or_else(|| write_past_end(offset, buf.len() as u64, size))?;
    dst.copy_from_slice(buf);
    Ok(())
}

/// [`Storage::set_len`] on a vector: zero-fills when growing. An allocation failure is an
/// `OutOfMemory` [`Error::Io`] and leaves the vector unchanged.
pub(super) fn resize(data: &mut Vec<u8>, new_len: u64) -> Result<()> {
    check_new_len(new_len)?;
    let out_of_memory = || {
        Error::Io(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("cannot hold {new_len} bytes in memory"),
        ))
    };
    let new_len = usize::try_from(new_len).map_err(|_| out_of_memory())?;
    if let Some(extra) = new_len.checked_sub(data.len()) {
        data.try_reserve_exact(extra).map_err(|_| out_of_memory())?;
    }
    data.resize(new_len, 0);
    Ok(())
}

/// Copies `data` into `image` at `offset`, dropping whatever falls past the image's end.
///
/// Crash replay uses this: a write that landed after a length change that did not is cut
/// at the end of the image, so a crash image's length is always one its `set_len`s chose.
#[cfg(any(test, feature = "testing"))]
pub(super) fn write_clipped(image: &mut [u8], offset: u64, data: &[u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(dst) = image.get_mut(start..) else {
        return;
    };
    let n = dst.len().min(data.len());
    if let (Some(dst), Some(src)) = (dst.get_mut(..n), data.get(..n)) {
        dst.copy_from_slice(src);
    }
}
