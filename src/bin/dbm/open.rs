//! Opening images, with the path in every error message.

use std::path::Path;

use dirty_bitmap::storage::{FileStorage, Locking};
use dirty_bitmap::{BitmapStore, Image, OpenMode};

/// `text` as the name of a new bitmap, refused when it holds a backslash: an existing
/// bitmap is named in the escaped form `dbm info` shows (docs/CLI.md), in which `\`
/// starts an escape, so a new `x\x41` would be a bitmap that a later `--remove x\x41`
/// does not name (it names `xA`). Refused before the image is opened.
pub fn new_bitmap_name(text: &str) -> Result<&str, String> {
    if text.contains('\\') {
        return Err(format!(
            "bitmap name {text:?}: a new name may not hold a backslash, which starts an \
             escape in the names of existing bitmaps (\\xNN, \\\\)"
        ));
    }
    Ok(text)
}

/// Prefixes an error with the image path.
pub fn at(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// An error of a command over a checkpoint chain (`dbm dump`, `dbm checkpoint`), with the
/// path: an inconsistent bitmap among the chain's says what to do, remove the bitmaps and
/// start a new chain, then back up in full (in that order: a write between a full backup
/// and a later new chain would be in neither), and never to remove it alone (it may be a
/// later checkpoint, holding writes no other has: its removal leaves the other bitmaps all
/// dirty, and a full backup is due anyway).
pub fn since_error(path: &Path, e: dirty_bitmap::Error) -> String {
    match e {
        dirty_bitmap::Error::Inconsistent { name } => at(
            path,
            format!(
                "bitmap {name:?} is inconsistent (in_use was left set, or a program without \
                 bitmap support changed the image): its bits cannot be trusted, so what \
                 changed since any checkpoint is the whole disk; remove the bitmaps and start \
                 a new chain, then back up in full (`dbm checkpoint IMAGE NEW` starts one; \
                 removing it alone leaves every other bitmap all dirty)"
            ),
        ),
        e => at(path, e),
    }
}

/// [`since_error`] for a read that may be beside a writer (`dbm dump -U`): a bitmap `in_use`
/// in an image another program has open for writing may be in use because that writer
/// records it (QEMU keeps `in_use` set while it runs), and the advice to remove the chain
/// would then throw a healthy one away; or it was left in use by a writer that crashed
/// before this one opened the image, and is inconsistent there too. The disk cannot tell
/// the two apart, so the message gives both, and how to tell (QEMU's `query-block`).
/// Without a writer, without `in_use` (a program without bitmap support changed the
/// image), or when the test fails, the advice is [`since_error`]'s.
pub fn shared_since_error(
    st: &BitmapStore<FileStorage>,
    path: &Path,
    e: dirty_bitmap::Error,
) -> String {
    match e {
        dirty_bitmap::Error::Inconsistent { name }
            if st.list().iter().any(|b| b.name == name && b.in_use)
                && st.image().storage().has_writer_elsewhere().unwrap_or(false) =>
        {
            at(
                path,
                format!(
                    "bitmap {name:?} is in_use, and another program holds the image's write \
                     lock (a running QEMU, or another writer). If that program records the \
                     bitmap, its bits on disk are not current: read it through that program \
                     (QEMU: export it over NBD, `qemu-nbd -B` or `block-export-add`), or here \
                     once it stopped and saved it. If the bitmap was already in use when that \
                     program opened the image (a writer that crashed before it), it is \
                     inconsistent there too (QEMU's `query-block` says \"inconsistent\": true): \
                     then remove the bitmaps and start a new chain, then back up in full"
                ),
            )
        }
        e => since_error(path, e),
    }
}

/// The locking of a read-only open: QEMU's force-share (`-U`) or `qemu-img info`'s.
fn read_locking(force_share: bool) -> Locking {
    if force_share {
        Locking::ForceShare
    } else {
        Locking::On
    }
}

/// Opens the bitmaps of the image at `path`, holding QEMU's image locks for the access.
pub fn store(path: &Path, mode: OpenMode) -> Result<BitmapStore<FileStorage>, String> {
    let storage = FileStorage::open(path, mode).map_err(|e| at(path, e))?;
    BitmapStore::open(storage, mode).map_err(|e| at(path, e))
}

/// Opens the bitmaps of the image at `path` read-only, force-sharing when asked (`-U`).
pub fn reader(path: &Path, force_share: bool) -> Result<BitmapStore<FileStorage>, String> {
    let storage = FileStorage::open_with(path, OpenMode::ReadOnly, read_locking(force_share))
        .map_err(|e| at(path, e))?;
    BitmapStore::open(storage, OpenMode::ReadOnly).map_err(|e| at(path, e))
}

/// Opens the image at `path` read-only with its bitmaps extension untrusted when QEMU would
/// refuse the extension itself ([`Image::open_untrusting_bitmaps`]), and that problem.
pub fn image_untrusting_bitmaps(
    path: &Path,
    force_share: bool,
) -> Result<(Image<FileStorage>, Option<dirty_bitmap::Corruption>), String> {
    let storage = FileStorage::open_with(path, OpenMode::ReadOnly, read_locking(force_share))
        .map_err(|e| at(path, e))?;
    Image::open_untrusting_bitmaps(storage, OpenMode::ReadOnly).map_err(|e| at(path, e))
}
