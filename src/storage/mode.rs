//! [`OpenMode`]: whether a file, an image or a bitmap store is opened for writing.

/// Whether a file, an image or a bitmap store is opened for reading only or for reading and
/// writing. The same mode passes down the layers: [`BitmapStore::open`](crate::BitmapStore::open)
/// opens its [`Image`](crate::Image) with it, and a [`FileStorage`](super::FileStorage)
/// opened with it takes the matching image locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenMode {
    /// Reads only: every write is refused ([`Error::ReadOnly`](crate::Error::ReadOnly) from
    /// an image or a store).
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

impl OpenMode {
    /// Whether this mode allows writes.
    #[must_use]
    pub const fn is_writable(self) -> bool {
        matches!(self, OpenMode::ReadWrite)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_read_write_writes() {
        assert!(super::OpenMode::ReadWrite.is_writable());
        assert!(!super::OpenMode::ReadOnly.is_writable());
    }
}
