//! `dbm checkpoint`: start a checkpoint of an image's chain, or export what changed since
//! one (`BitmapStore::checkpoint`, `BitmapStore::export_since`).

use std::path::PathBuf;
use std::process::ExitCode;

use dirty_bitmap::format::BitmapName;
use dirty_bitmap::OpenMode;

use crate::open::{at, new_bitmap_name, since_error, store};
use crate::out::{emit_done, warn_done};
use crate::CmdResult;

/// Options of `dbm checkpoint`.
#[derive(Debug, clap::Args)]
pub struct CheckpointArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// The new checkpoint (a bitmap): in one commit the recording bitmap is disabled and
    /// this one added, recording, at the same granularity.
    #[arg(required_unless_present = "since", conflicts_with_all = ["since", "into"])]
    pub name: Option<String>,
    /// Export what changed since this checkpoint (it and every other bitmap of the image,
    /// which cannot tell which are later) ...
    #[arg(long, requires = "into", value_name = "CHECKPOINT")]
    pub since: Option<String>,
    /// ... into this new disabled bitmap, for `qemu-nbd -B INTO` (remove it afterwards).
    #[arg(long, requires = "since", value_name = "INTO")]
    pub into: Option<String>,
}

/// Runs `dbm checkpoint`.
pub fn run(args: &CheckpointArgs) -> CmdResult {
    for new in [&args.name, &args.into].into_iter().flatten() {
        new_bitmap_name(new)?;
    }
    let mut st = store(&args.image, OpenMode::ReadWrite)?;
    match (&args.name, &args.since, &args.into) {
        (Some(new), None, None) => {
            let old = st
                .checkpoint(new)
                .map_err(|e| since_error(&args.image, e))?;
            let new = BitmapName::from(new.as_bytes());
            match old {
                Some(old) => emit_done(&format!(
                    "checkpoint {new}: started; {old} no longer records\n"
                )),
                None => emit_done(&format!("checkpoint {new}: started a new chain\n")),
            }
        }
        (None, Some(since), Some(into)) => {
            st.export_since(BitmapName::parse_escaped(since), into)
                .map_err(|e| since_error(&args.image, e))?;
            // Committed: a failed count is a lost report, not a failed command.
            match st.load(into) {
                Ok(bm) => emit_done(&format!(
                    "bitmap {}: what changed since {}, {} dirty bytes\n",
                    BitmapName::from(into.as_bytes()),
                    BitmapName::parse_escaped(since),
                    bm.dirty_bytes()
                )),
                Err(e) => warn_done(&at(&args.image, e)),
            }
        }
        _ => return Err("give NAME, or --since CHECKPOINT --into BITMAP".into()),
    }
    Ok(ExitCode::SUCCESS)
}
