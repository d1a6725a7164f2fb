//! `dbm create`: a bitmap-only qcow2 image.

use std::path::PathBuf;
use std::process::ExitCode;

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::BitmapStore;

use crate::open::at;
use crate::{size, CmdResult};

/// Options of `dbm create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The image to create; an existing file is never overwritten.
    pub image: PathBuf,
    /// Virtual disk size (suffixes K, M, G, T), rounded up to 512 bytes as `qemu-img create`
    /// does.
    #[arg(long, value_parser = size::parse_size)]
    pub size: u64,
    /// Cluster size: a power of two from 512 to 2M.
    #[arg(long, default_value = "64K", value_parser = size::parse_size)]
    pub cluster_size: u64,
}

/// Runs `dbm create`.
pub fn run(args: &CreateArgs) -> CmdResult {
    let size = args.size.checked_next_multiple_of(512).ok_or_else(|| {
        format!(
            "size {} does not fit in 64 bits once rounded up to 512",
            args.size
        )
    })?;
    if args.image.symlink_metadata().is_ok() {
        return Err(at(
            &args.image,
            "already exists; dbm create never overwrites a file",
        )
        .into());
    }
    let storage = FileStorage::create(&args.image).map_err(|e| at(&args.image, e))?;
    match BitmapStore::create(storage, size, args.cluster_size) {
        Ok(store) => {
            drop(store);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // The file is ours and holds no image: do not leave it behind.
            let _ = std::fs::remove_file(&args.image);
            Err(at(&args.image, e).into())
        }
    }
}
