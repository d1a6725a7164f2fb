//! `dbm bitmap`: `qemu-img bitmap`'s verbs on a qcow2 image.

use dirty_bitmap::format::BitmapName;
use dirty_bitmap::{BitmapState, DirtyBitmap, OpenMode, Recording};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ArgGroup;

use crate::open::{at, new_bitmap_name, store};
use crate::out::emit_done;
use crate::{size, CmdResult};

/// Options of `dbm bitmap`.
#[derive(Debug, clap::Args)]
#[command(group(
    ArgGroup::new("verb")
        .required(true)
        .multiple(true)
        .args(["add", "remove", "clear", "enable", "disable", "merge"])
))]
pub struct BitmapArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// The bitmap to change.
    pub name: String,
    /// Add an empty bitmap, enabled unless `--disable` is given too.
    #[arg(long)]
    pub add: bool,
    /// Remove the bitmap (also an inconsistent one, whose removal leaves every other
    /// consistent bitmap all dirty) and free its clusters.
    #[arg(long)]
    pub remove: bool,
    /// Clear every bit.
    #[arg(long)]
    pub clear: bool,
    /// Set the `auto` flag: QEMU records guest writes in it.
    #[arg(long)]
    pub enable: bool,
    /// Clear the `auto` flag (with `--add`: add the bitmap disabled).
    #[arg(long)]
    pub disable: bool,
    /// OR bitmap SRC into NAME.
    #[arg(long, value_name = "SRC")]
    pub merge: Option<String>,
    /// The image holding the `--merge` source (default: IMAGE itself).
    #[arg(
        short = 'b',
        long = "source-file",
        value_name = "SRC_IMAGE",
        requires = "merge"
    )]
    pub source_image: Option<PathBuf>,
    /// The format of the `-b` image: only `qcow2` (`qemu-img bitmap -F`).
    #[arg(short = 'F', long = "source-format", value_parser = ["qcow2"], requires = "source_image")]
    pub source_format: Option<String>,
    /// The image format: only `qcow2` (accepted for `qemu-img bitmap -f qcow2`).
    #[arg(short = 'f', long = "format", value_parser = ["qcow2"])]
    pub format: Option<String>,
    /// Granularity of `--add`: a power of two from 512 to 2G (default, and with `-g 0`,
    /// QEMU's: the image's cluster size, kept within 4K to 64K).
    #[arg(short = 'g', long, value_parser = size::parse_size, allow_negative_numbers = true, requires = "add")]
    pub granularity: Option<u64>,
}

/// One change to a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// Add with this granularity, enabled or not.
    Add {
        /// Bytes per bit (`None`: the image's default, as QEMU's).
        granularity: Option<u64>,
        /// The `auto` flag.
        enabled: bool,
    },
    /// Remove.
    Remove,
    /// Clear every bit.
    Clear,
    /// Set or clear `auto`.
    SetEnabled(bool),
    /// Merge this bitmap, from this image or the current one.
    Merge {
        /// Source bitmap.
        src: String,
        /// Source image (`None`: the same image).
        image: Option<PathBuf>,
    },
}

impl BitmapArgs {
    /// The changes asked for, in the order they are made: add, clear, merge, enable or
    /// disable, remove (`qemu-img bitmap` takes several verbs in one call too). `--add
    /// --disable` adds the bitmap disabled.
    pub fn verbs(&self) -> Result<Vec<Verb>, String> {
        if self.enable && self.disable {
            return Err("--enable and --disable contradict each other".to_string());
        }
        if self.remove && (self.add || self.clear || self.merge.is_some() || self.enable) {
            return Err(
                "--remove cannot be combined with --add, --clear, --merge or --enable".to_string(),
            );
        }
        let mut out = Vec::new();
        if self.add {
            out.push(Verb::Add {
                granularity: self.granularity.filter(|&g| g != 0),
                enabled: !self.disable,
            });
        }
        if self.clear {
            out.push(Verb::Clear);
        }
        if let Some(src) = &self.merge {
            out.push(Verb::Merge {
                src: src.clone(),
                image: self.source_image.clone(),
            });
        }
        if self.enable {
            out.push(Verb::SetEnabled(true));
        }
        // Disabling a bitmap about to be removed changes nothing, and would refuse an
        // inconsistent one, which removal is the only thing to do with.
        if self.disable && !self.add && !self.remove {
            out.push(Verb::SetEnabled(false));
        }
        if self.remove {
            out.push(Verb::Remove);
        }
        if out.is_empty() {
            return Err(
                "give --add, --remove, --clear, --enable, --disable or --merge".to_string(),
            );
        }
        Ok(out)
    }
}

/// Runs `dbm bitmap`.
///
/// A merge's source is read whole before the first write, and each verb is one commit; a
/// merge is one commit with what it ORs into: `--add` writes the new bitmap holding the
/// source's bits (`BitmapStore::add_from`), `--clear --merge` replaces the bitmap by them,
/// a plain `--merge` by its own bits and them (`BitmapStore::store`). So no crash, signal
/// or failure between verbs leaves a bitmap on disk empty and consistent that the merge
/// was to fill, which a backup would read as "nothing changed".
pub fn run(args: &BitmapArgs) -> CmdResult {
    let verbs = args.verbs()?;
    if args.add {
        new_bitmap_name(&args.name)?;
    }
    let mut st = store(&args.image, OpenMode::ReadWrite)?;
    // Existing bitmaps are named in the escaped form `dbm info` shows (`\xNN` for a byte
    // that is not UTF-8), so every name on disk can be typed; a new one (which holds no
    // backslash, so no escape) is taken as given, and the verbs after `--add` name it so too.
    let name = if args.add {
        BitmapName::from(args.name.as_bytes())
    } else {
        BitmapName::parse_escaped(&args.name)
    };
    preflight(&st, args, &name, &verbs)?;
    let clear = verbs.contains(&Verb::Clear);
    let source = merge_source(&st, args, &name, &verbs, clear)?;
    for verb in &verbs {
        let img = |e| at(&args.image, e);
        match verb {
            Verb::Add {
                granularity,
                enabled,
            } => add(&mut st, args, *granularity, *enabled, source.as_ref())?,
            // The add holds the source's bits; a merge into an existing bitmap makes the
            // clear in its own commit.
            Verb::Clear if source.is_some() => {}
            Verb::Merge { .. } => match &source {
                Some(bits) if !args.add => merge(&mut st, args, &name, bits, clear)?,
                _ => {}
            },
            Verb::Clear => st.clear(&name).map_err(img)?,
            Verb::SetEnabled(on) => st.set_enabled(&name, *on).map_err(img)?,
            Verb::Remove => {
                let inconsistent = st
                    .list()
                    .iter()
                    .any(|b| b.name == name && b.state == BitmapState::Inconsistent);
                let why = if inconsistent {
                    "the removed bitmap was inconsistent and may have held writes it lacks"
                } else {
                    "the removed bitmap recorded, and no bitmap kept records the writes it \
                     held or any made from now on"
                };
                // An untrusted extension goes whole (as QEMU drops it at its first header
                // write): every bitmap it lists goes with the one named.
                let with_it: Vec<BitmapName> = if st.image().stale_bitmaps().is_some() {
                    st.list()
                        .into_iter()
                        .map(|b| b.name)
                        .filter(|n| *n != name)
                        .collect()
                } else {
                    Vec::new()
                };
                for kept in st.remove(&name).map_err(img)? {
                    emit_done(&format!("Made bitmap {kept} all dirty: {why}\n"));
                }
                for gone in with_it {
                    emit_done(&format!("Removed bitmap {gone} too: {UNTRUSTED_GOES}\n"));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The bits a `--merge` in `verbs` ORs in, read whole before the first write: the source
/// bitmap of this image or of its `-b` image (refused if missing or inconsistent, as every
/// load refuses), of this image's disk size. `None` without a merge.
fn merge_source(
    st: &dirty_bitmap::BitmapStore<dirty_bitmap::storage::FileStorage>,
    args: &BitmapArgs,
    name: &BitmapName,
    verbs: &[Verb],
    clear: bool,
) -> Result<Option<DirtyBitmap>, String> {
    let Some((src, image)) = verbs.iter().find_map(|v| match v {
        Verb::Merge { src, image } => Some((src, image)),
        _ => None,
    }) else {
        return Ok(None);
    };
    let src_name = BitmapName::parse_escaped(src);
    let bits = match image {
        None => st.load(&src_name).map_err(|e| at(&args.image, e))?,
        Some(path) => store(path, OpenMode::ReadOnly)?
            .load(&src_name)
            .map_err(|e| format!("merging {}: {e}", path.display()))?,
    };
    if bits.disk_size() != st.disk_size() {
        return Err(at(
            &args.image,
            format!(
                "cannot merge {src:?}, a bitmap of a {}-byte disk, into one of {} bytes",
                bits.disk_size(),
                st.disk_size()
            ),
        ));
    }
    // `--clear --merge NAME` within one image clears NAME first: nothing is left to merge.
    if clear && image.is_none() && &src_name == name {
        return DirtyBitmap::new(bits.disk_size(), bits.granularity())
            .map(Some)
            .map_err(|e| at(&args.image, e));
    }
    Ok(Some(bits))
}

/// `--add`, holding the merge source's bits if there is one, in one commit.
fn add(
    st: &mut dirty_bitmap::BitmapStore<dirty_bitmap::storage::FileStorage>,
    args: &BitmapArgs,
    granularity: Option<u64>,
    enabled: bool,
    bits: Option<&DirtyBitmap>,
) -> Result<(), String> {
    let g = granularity.unwrap_or_else(|| st.default_granularity());
    let recording = if enabled {
        Recording::Enabled
    } else {
        Recording::Disabled
    };
    // An untrusted extension goes whole with the add's commit (as QEMU drops it at its
    // first header write): every bitmap it lists goes.
    let dropped: Vec<BitmapName> = if st.image().stale_bitmaps().is_some() {
        st.list().into_iter().map(|b| b.name).collect()
    } else {
        Vec::new()
    };
    match bits {
        Some(b) => st.add_from(&args.name, g, recording, b),
        None => st.add(&args.name, g, recording),
    }
    .map_err(|e| at(&args.image, e))?;
    for gone in dropped {
        emit_done(&format!("Removed bitmap {gone}: {UNTRUSTED_GOES}\n"));
    }
    Ok(())
}

/// Why the bitmaps of an untrusted extension go with a commit.
const UNTRUSTED_GOES: &str = "the image's bitmaps extension is untrusted (written by a \
                              program without bitmap support), and it goes whole";

/// `--merge` into the existing bitmap `name` (after `--clear` if `clear`): its new content,
/// the source's bits at its granularity ORed into what it held (or into nothing), stored
/// in one commit.
fn merge(
    st: &mut dirty_bitmap::BitmapStore<dirty_bitmap::storage::FileStorage>,
    args: &BitmapArgs,
    name: &BitmapName,
    bits: &DirtyBitmap,
    clear: bool,
) -> Result<(), String> {
    let e = |e| at(&args.image, e);
    let target = if clear {
        let g = st
            .list()
            .into_iter()
            .find(|b| &b.name == name)
            .map(|b| b.granularity)
            .ok_or_else(|| e(dirty_bitmap::Error::NotFound { name: name.clone() }))?;
        DirtyBitmap::new(st.disk_size(), g).map_err(e)?
    } else {
        st.load(name).map_err(e)?
    };
    // A merge takes the source's bits at any granularity, into a bitmap that does not
    // record (`auto` clear) too.
    target.merge_from(bits).map_err(e)?;
    st.store(name, &target).map_err(e)
}

/// Every refusal the verbs would meet on the bitmap they name, before the first of them
/// writes: it exists (unless `--add` makes it) and is consistent for any verb but
/// `--remove`. A merge's source is read, and refused, by [`merge_source`], also before the
/// first write. What is left to fail is I/O and the store's own limits, which `--add`, the
/// first verb, meets before it writes.
fn preflight(
    st: &dirty_bitmap::BitmapStore<dirty_bitmap::storage::FileStorage>,
    args: &BitmapArgs,
    name: &BitmapName,
    verbs: &[Verb],
) -> Result<(), String> {
    let find = |st: &dirty_bitmap::BitmapStore<_>, n: &BitmapName| {
        st.list()
            .into_iter()
            .find(|b| b.name.as_bytes() == n.as_bytes())
    };
    if !args.add {
        let b = find(st, name).ok_or_else(|| {
            at(
                &args.image,
                dirty_bitmap::Error::NotFound { name: name.clone() },
            )
        })?;
        let changes = verbs.iter().any(|v| !matches!(v, Verb::Remove));
        if changes && b.state == BitmapState::Inconsistent {
            return Err(at(
                &args.image,
                dirty_bitmap::Error::Inconsistent { name: name.clone() },
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: BitmapArgs,
    }

    fn verb(args: &[&str]) -> Result<Vec<Verb>, String> {
        let t = T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        t.a.verbs()
    }

    #[test]
    fn verbs() {
        assert_eq!(
            verb(&["img", "b", "--add"]),
            Ok(vec![Verb::Add {
                granularity: None,
                enabled: true
            }])
        );
        assert_eq!(
            verb(&["img", "--add", "--disable", "-g", "512", "b"]),
            Ok(vec![Verb::Add {
                granularity: Some(512),
                enabled: false
            }])
        );
        assert_eq!(
            verb(&["img", "b", "--add", "-g", "0"]),
            Ok(vec![Verb::Add {
                granularity: None,
                enabled: true
            }])
        );
        assert_eq!(
            verb(&["img", "b", "--disable", "--clear"]),
            Ok(vec![Verb::Clear, Verb::SetEnabled(false)])
        );
        assert_eq!(
            verb(&[
                "img",
                "b",
                "--merge",
                "s",
                "--source-file",
                "o",
                "--source-format",
                "qcow2",
                "--format",
                "qcow2"
            ]),
            Ok(vec![Verb::Merge {
                src: "s".into(),
                image: Some("o".into())
            }])
        );
        assert!(verb(&["img", "b"]).is_err());
        assert!(verb(&["img", "b", "--add", "--remove"]).is_err());
        assert!(verb(&["img", "b", "--enable", "--disable"]).is_err());
        assert!(verb(&["img", "b", "--remove", "-g", "512"]).is_err());
        assert!(verb(&["img", "b", "--add", "-g", "12Q"]).is_err());
        assert!(verb(&["img", "b", "--add", "-f", "raw"]).is_err());
    }
}
