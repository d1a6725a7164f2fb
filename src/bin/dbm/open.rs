//! Opening images, with the path in every error message.

use std::path::Path;

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, Image};

/// Prefixes an error with the image path.
pub fn at(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Opens the bitmaps of the image at `path`.
pub fn store(path: &Path, writable: bool) -> Result<BitmapStore<FileStorage>, String> {
    let storage = FileStorage::open(path, writable).map_err(|e| at(path, e))?;
    BitmapStore::open(storage, writable).map_err(|e| at(path, e))
}

/// Opens the image at `path` read-only, without reading the bitmap directory.
pub fn image(path: &Path) -> Result<Image<FileStorage>, String> {
    let storage = FileStorage::open(path, false).map_err(|e| at(path, e))?;
    Image::open(storage, false).map_err(|e| at(path, e))
}
