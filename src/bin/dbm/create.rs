//! `dbm create`: a bitmap-only qcow2 image, or one whose guest data is an existing raw file.

use std::path::{Path, PathBuf};
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
    /// does. With `--data-file`, the raw file's size, which is the default there.
    #[arg(long, value_parser = size::parse_size, allow_negative_numbers = true)]
    pub size: Option<u64>,
    /// Cluster size: a power of two from 512 to 2M.
    #[arg(long, default_value = "64K", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub cluster_size: u64,
    /// An existing raw file that holds the guest data: the image maps every guest cluster
    /// to the same offset of it (`data_file_raw`), so QEMU's tools serve the raw disk and
    /// its bitmaps together. The raw file is never written.
    #[arg(long, value_name = "RAW")]
    pub data_file: Option<PathBuf>,
}

/// Runs `dbm create`.
pub fn run(args: &CreateArgs) -> CmdResult {
    if args.image.symlink_metadata().is_ok() {
        return Err(at(
            &args.image,
            "already exists; dbm create never overwrites a file",
        )
        .into());
    }
    let (size, name) = match &args.data_file {
        None => {
            let size = args.size.ok_or("--size is required without --data-file")?;
            (round_up(size)?, None)
        }
        Some(raw) => {
            let (size, name) = attach(raw, args.size)?;
            (size, Some(name))
        }
    };
    // Made under a temporary name beside IMAGE and linked to IMAGE once complete, so IMAGE
    // never names a half-made file (a SIGKILL or a crash may leave the temporary one);
    // SIGINT, SIGTERM and SIGHUP remove it first.
    let tmp = temporary_name(&args.image)?;
    let _guard = crate::signals::remove_on_signal(&tmp);
    let storage = FileStorage::create(&tmp).map_err(|e| at(&tmp, e))?;
    let r = match &name {
        None => BitmapStore::create(storage, size, args.cluster_size),
        Some(n) => BitmapStore::create_with_data_file(storage, size, args.cluster_size, n),
    }
    .map_err(|e| at(&args.image, e))
    .and_then(|store| {
        drop(store);
        publish(&tmp, &args.image)
    });
    // The file is ours: do not leave it behind (after a link, IMAGE names it too).
    let _ = std::fs::remove_file(&tmp);
    r?;
    // IMAGE's name on disk before success is reported: `FileStorage::create` made the
    // temporary name durable, not this one.
    sync_directory_of(&args.image).map_err(|e| at(&args.image, e))?;
    Ok(ExitCode::SUCCESS)
}

/// `.NAME.dbm-create-PID-R` beside `image` (named NAME), R random: a name no earlier
/// create that was killed left behind (a container's `dbm` may run with the same PID each
/// time).
fn temporary_name(image: &Path) -> Result<PathBuf, String> {
    let name = image
        .file_name()
        .ok_or_else(|| at(image, "is not a file name"))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(
        ".dbm-create-{}-{:016x}",
        std::process::id(),
        dirty_bitmap::rng::unique_u64()
    ));
    Ok(image.with_file_name(tmp))
}

/// Syncs the directory that holds `path`, so that a name made or removed in it lasts.
fn sync_directory_of(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Gives the complete image at `tmp` the name `image`, never replacing a file there: a
/// hard link (which fails if `image` exists), or on a filesystem without them a rename
/// after a check.
fn publish(tmp: &Path, image: &Path) -> Result<(), String> {
    match std::fs::hard_link(tmp, image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(at(
            image,
            "already exists; dbm create never overwrites a file",
        )),
        Err(_) if image.symlink_metadata().is_err() => {
            std::fs::rename(tmp, image).map_err(|e| at(image, e))
        }
        Err(e) => Err(at(image, e)),
    }
}

fn round_up(size: u64) -> Result<u64, String> {
    size.checked_next_multiple_of(512)
        .ok_or_else(|| format!("size {size} does not fit in 64 bits once rounded up to 512"))
}

/// The disk size and the name the image records for the raw file `raw`: its absolute
/// path, since QEMU 10 opens a relative data file name against its own working directory,
/// not the image's.
fn attach(raw: &Path, size: Option<u64>) -> Result<(u64, String), String> {
    let meta = std::fs::metadata(raw).map_err(|e| at(raw, e))?;
    if !meta.is_file() {
        return Err(at(raw, "is not a regular file"));
    }
    let len = meta.len();
    if len == 0 || len % 512 != 0 {
        return Err(at(
            raw,
            format!("is {len} bytes; a raw disk must be a non-zero multiple of 512 bytes"),
        ));
    }
    if let Some(s) = size {
        if s != len {
            return Err(at(
                raw,
                format!(
                    "is {len} bytes, not the --size {s}; the image maps the raw file as it \
                     is (leave --size out)"
                ),
            ));
        }
    }
    let abs = std::fs::canonicalize(raw).map_err(|e| at(raw, e))?;
    let name = abs
        .to_str()
        .ok_or_else(|| at(raw, "the path is not UTF-8"))?
        .to_string();
    Ok((len, name))
}

#[cfg(test)]
mod tests {
    /// Two creates of one IMAGE in one process (or in two with the same PID, as in a
    /// container) use different temporary names: a leftover of one blocks no other.
    #[test]
    fn temporary_names_differ() {
        let image = std::path::Path::new("/d/k.qcow2");
        let a = super::temporary_name(image).unwrap();
        let b = super::temporary_name(image).unwrap();
        assert_ne!(a, b);
        for t in [a, b] {
            assert_eq!(t.parent(), image.parent());
            let name = t.file_name().unwrap().to_string_lossy().into_owned();
            let prefix = format!(".k.qcow2.dbm-create-{}-", std::process::id());
            assert!(name.starts_with(&prefix), "{name}");
        }
    }
}
