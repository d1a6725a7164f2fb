//! Pure codecs for the qcow2 structures that persistent dirty bitmaps touch.
//!
//! Nothing here does I/O. Decoders take byte slices and return `Result<_, Corruption>`;
//! they never panic, whatever the input (every decoder has a proptest feeding it arbitrary
//! bytes). Encoders produce exactly the bytes QEMU 10 writes and reject caller mistakes with
//! [`InvalidValue`]. Nothing here uses the crate's [`Error`](crate::Error): it is built on
//! these types, not the other way round.
//!
//! | structure | module | where it lives |
//! |---|---|---|
//! | image header | [`header`] | offset 0 of cluster 0 |
//! | header extensions, bitmaps extension | [`extension`] | after the header |
//! | feature bits and the feature name table | [`feature`] | header and extension |
//! | this crate's mode extension ("DBMD") | [`mode`] | after the header |
//! | cluster 0 as QEMU lays it out | [`area`] | all of cluster 0 |
//! | bitmap directory entries | [`directory`] | `bitmap_directory_offset` |
//! | bitmap table entries | [`table`] | each entry's `bitmap_table_offset` |
//! | refcount table entries and refcount blocks | [`refcount`] | `refcount_table_offset` |
//! | the L1/L2 map of a raw external data file | [`guest_map`] | `l1_table_offset` |
//!
//! The byte tables, limits and the places where QEMU is stricter than the specification are
//! in `docs/FORMAT.md`. All integers are big-endian; the only little-endian-like data is the
//! bitmap data itself, whose bit `n` sits in byte `n / 8` at bit `n % 8`
//! (see [`table::bit_location`]).
//!
//! A typical read of an image's bitmaps, from cluster 0 and the directory bytes (the
//! image made here by the store, in memory):
//!
//! ```
//! use dirty_bitmap::format::{decode_directory, HeaderArea};
//! use dirty_bitmap::storage::{MemStorage, StorageExt};
//! use dirty_bitmap::{BitmapStore, Recording};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut store = BitmapStore::create(MemStorage::new(), 1 << 30, 65536)?;
//! store.add("b", 65536, Recording::Enabled)?;
//! let file = store.close()?.into_storage();
//!
//! let area = HeaderArea::decode(&file.read_vec_at(0, 65536)?)?;
//! let ext = area.bitmaps.expect("a bitmaps extension");
//! let directory = file.read_vec_at(ext.directory_offset, ext.directory_size)?;
//! let entries = decode_directory(&directory, ext.nb_bitmaps, &area.header.geometry()?)?;
//! assert_eq!(entries.len(), 1);
//! assert_eq!(entries[0].name, "b");
//! assert!(!entries[0].in_use && entries[0].auto);
//! # Ok(()) }
//! ```

pub mod area;
mod bytes;
mod corruption;
pub mod directory;
pub mod extension;
pub mod feature;
mod frame;
pub mod guest_map;
pub mod header;
pub mod mode;
pub mod refcount;
pub mod table;

pub use area::HeaderArea;
/// The extension-frame walker of the decoder, for the store's in-place writes into cluster 0.
pub(crate) use frame::{Frames, EXTENSION_FRAME_LEN};
pub use corruption::{
    CheckFindings, Corruption, EntryProblem, InvalidValue, RefcountEntryProblem,
    TableEntryProblem,
};
pub use directory::{
    decode_directory, decode_directory_as_qemu_opens, encode_directory, table_size, triage_directory, BitmapName, DirEntry,
    RawDirEntry, Triage, TriagedEntry, DIR_ENTRY_FIXED_LEN,
};
pub use extension::{
    decode_extensions, encode_extensions, BitmapsExtension, CryptoHeaderPointer, Extension,
    UnknownExtension,
};
pub use feature::{qemu_feature_table, FeatureKind, FeatureName};
pub use guest_map::RawGuestMap;
pub use header::{Header, ImageGeometry};
pub use mode::ModeExtension;
pub use refcount::{
    decode_reftable, encode_reftable, entries_per_block, get_refcount, max_refcount, set_refcount,
};
pub use table::{decode_table, encode_table, TableEntry};
