//! `dbm mark`: mark a byte range dirty and store the bitmap (load, mark, store).

use dirty_bitmap::format::BitmapName;
use dirty_bitmap::OpenMode;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::open::{at, store};
use crate::{size, CmdResult};

/// Options of `dbm mark`.
#[derive(Debug, clap::Args)]
pub struct MarkArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// The bitmap.
    pub name: String,
    /// First byte (suffixes K, M, G, T).
    #[arg(value_parser = size::parse_size, allow_negative_numbers = true)]
    pub offset: u64,
    /// Bytes, at least 1 (suffixes K, M, G, T).
    #[arg(value_parser = size::parse_size, allow_negative_numbers = true)]
    pub len: u64,
}

/// Checks that `[offset, offset + len)` is a non-empty range inside a disk of `disk` bytes.
pub fn check_range(offset: u64, len: u64, disk: u64) -> Result<(), String> {
    if len == 0 {
        return Err("LEN must be at least 1 byte".to_string());
    }
    match offset.checked_add(len) {
        Some(end) if end <= disk => Ok(()),
        _ => Err(format!(
            "range {offset}+{len} ends past the end of the {disk}-byte disk"
        )),
    }
}

/// Runs `dbm mark`. A disabled bitmap is marked too: the mark is explicit, and the bitmap
/// stays disabled.
pub fn run(args: &MarkArgs) -> CmdResult {
    let mut st = store(&args.image, OpenMode::ReadWrite)?;
    check_range(args.offset, args.len, st.disk_size()).map_err(|e| at(&args.image, e))?;
    let bm = st
        .load(BitmapName::parse_escaped(&args.name))
        .map_err(|e| at(&args.image, e))?;
    bm.set_enabled(true);
    bm.mark_dirty(args.offset, args.len);
    st.store(BitmapName::parse_escaped(&args.name), &bm)
        .map_err(|e| at(&args.image, e))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::check_range;

    #[test]
    fn ranges() {
        assert!(check_range(0, 1, 1).is_ok());
        assert!(check_range(0, 2, 1).is_err());
        assert!(check_range(1, 0, 2).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}
