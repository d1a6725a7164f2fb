//! Persistent dirty bitmaps for block devices.
#![deny(missing_docs, unsafe_code)]

pub mod error;
pub mod format;

pub use error::{Corruption, Error, Result};
