//! Persistent dirty bitmaps for block devices.
#![deny(missing_docs, unsafe_code)]

pub mod bitmap;
pub mod error;
pub mod format;
pub mod storage;

pub use bitmap::{ChangedRegions, DirtyBitmap, DirtyExtents};
pub use error::{Corruption, Error, Result};
