//! `dbm bitmap`: `qemu-img bitmap`'s verbs on a qcow2 image.

use dirty_bitmap::format::BitmapName;
use dirty_bitmap::{OpenMode, Recording};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ArgGroup;

use crate::open::{at, store};
use crate::{size, CmdResult};

/// Default granularity of `--add`, as QEMU's.
const DEFAULT_GRANULARITY: u64 = 64 << 10;

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
    /// Remove the bitmap (also an inconsistent one) and free its clusters.
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
    #[arg(short = 'b', value_name = "SRC_IMAGE", requires = "merge")]
    pub source_image: Option<PathBuf>,
    /// Granularity of `--add` (default 64K): a power of two from 512 to 2G.
    #[arg(short = 'g', long, value_parser = size::parse_size, requires = "add")]
    pub granularity: Option<u64>,
}

/// One change to a bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    /// Add with this granularity, enabled or not.
    Add {
        /// Bytes per bit.
        granularity: u64,
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
    /// The one change asked for. Only `--add --disable` combine.
    pub fn verb(&self) -> Result<Verb, String> {
        let given = [
            self.add,
            self.remove,
            self.clear,
            self.enable,
            self.disable,
            self.merge.is_some(),
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if self.add && given <= 2 && (given == 1 || self.disable) {
            return Ok(Verb::Add {
                granularity: self.granularity.unwrap_or(DEFAULT_GRANULARITY),
                enabled: !self.disable,
            });
        }
        if given != 1 {
            return Err(
                "give exactly one of --add, --remove, --clear, --enable, --disable, --merge \
                 (only --add --disable combine)"
                    .to_string(),
            );
        }
        Ok(if self.remove {
            Verb::Remove
        } else if self.clear {
            Verb::Clear
        } else if self.enable {
            Verb::SetEnabled(true)
        } else if self.disable {
            Verb::SetEnabled(false)
        } else {
            Verb::Merge {
                src: self.merge.clone().unwrap_or_default(),
                image: self.source_image.clone(),
            }
        })
    }
}

/// Runs `dbm bitmap`.
pub fn run(args: &BitmapArgs) -> CmdResult {
    let verb = args.verb()?;
    let mut st = store(&args.image, OpenMode::ReadWrite)?;
    // Existing bitmaps are named in the escaped form `dbm info` shows (`\xNN` for a byte
    // that is not UTF-8), so every name on disk can be typed; a new one is taken as given.
    let name = BitmapName::parse_escaped(&args.name);
    let r = match &verb {
        Verb::Add {
            granularity,
            enabled,
        } => st.add(
            &args.name,
            *granularity,
            if *enabled {
                Recording::Enabled
            } else {
                Recording::Disabled
            },
        ),
        Verb::Remove => st.remove(&name),
        Verb::Clear => st.clear(&name),
        Verb::SetEnabled(on) => st.set_enabled(&name, *on),
        Verb::Merge { src, image: None } => st.merge(BitmapName::parse_escaped(src), &name),
        Verb::Merge {
            src,
            image: Some(path),
        } => {
            let other = store(path, OpenMode::ReadOnly)?;
            st.merge_from(&other, BitmapName::parse_escaped(src), &name)
                .map_err(|e| format!("merging {}: {src:?}: {e}", path.display()))?;
            Ok(())
        }
    };
    r.map_err(|e| at(&args.image, e))?;
    Ok(ExitCode::SUCCESS)
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

    fn verb(args: &[&str]) -> Result<Verb, String> {
        let t = T::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        t.a.verb()
    }

    #[test]
    fn verbs() {
        assert_eq!(
            verb(&["img", "b", "--add"]),
            Ok(Verb::Add {
                granularity: 65536,
                enabled: true
            })
        );
        assert_eq!(
            verb(&["img", "--add", "--disable", "-g", "512", "b"]),
            Ok(Verb::Add {
                granularity: 512,
                enabled: false
            })
        );
        assert_eq!(
            verb(&["img", "b", "--disable"]),
            Ok(Verb::SetEnabled(false))
        );
        assert_eq!(
            verb(&["img", "b", "--merge", "s", "-b", "o"]),
            Ok(Verb::Merge {
                src: "s".into(),
                image: Some("o".into())
            })
        );
        assert!(verb(&["img", "b"]).is_err());
        assert!(verb(&["img", "b", "--add", "--remove"]).is_err());
        assert!(verb(&["img", "b", "--enable", "--disable"]).is_err());
        assert!(verb(&["img", "b", "--remove", "-g", "512"]).is_err());
        assert!(verb(&["img", "b", "--add", "-g", "12Q"]).is_err());
    }
}
