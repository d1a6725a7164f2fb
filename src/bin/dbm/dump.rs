//! `dbm dump`: a bitmap as the rows `nbdinfo --map=qemu:dirty-bitmap:NAME` prints.
//!
//! Text rows are nbdinfo's `%10lu  %10lu  %3u  %s`: offset, length, type (1 dirty,
//! 0 clean) and its description, in decimal, merged runs covering the whole disk. The
//! JSON form is nbdinfo's `--json` array: one `{"description", "length", "offset", "type"}`
//! object per row (keys sorted).

use dirty_bitmap::format::BitmapName;
use std::path::PathBuf;
use std::process::ExitCode;

use dirty_bitmap::Error;

use crate::open::{at, reader};
use crate::out::emit;
use crate::CmdResult;

/// Options of `dbm dump`.
#[derive(Debug, clap::Args)]
pub struct DumpArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// The bitmap.
    #[arg(required_unless_present = "since", conflicts_with = "since")]
    pub name: Option<String>,
    /// Print what changed since this checkpoint instead: the union of it and every bitmap
    /// after it in the image (`dbm checkpoint`).
    #[arg(long, value_name = "CHECKPOINT")]
    pub since: Option<String>,
    /// Print nbdinfo's `--map --json` array instead of text rows.
    #[arg(long)]
    pub json: bool,
    /// Print the bytes of each type (clean, dirty) as `nbdinfo --totals` does.
    #[arg(long)]
    pub totals: bool,
    /// Open with QEMU's force-share locking, as `qemu-img -U`: works beside a running QEMU
    /// writer, but reads an image that may be changing (bitmaps QEMU holds show in use).
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

/// One run of equal granules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// Dirty or clean.
    pub dirty: bool,
}

/// Rows covering `[0, disk_size)`: the dirty extents (sorted, disjoint, within the disk)
/// with the clean gaps between them.
pub fn rows(disk_size: u64, dirty: impl IntoIterator<Item = (u64, u64)>) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    let mut at = 0u64;
    let push = |out: &mut Vec<Row>, offset: u64, length: u64, dirty: bool| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(r) if r.dirty == dirty && r.offset + r.length == offset => r.length += length,
            _ => out.push(Row {
                offset,
                length,
                dirty,
            }),
        }
    };
    for (off, len) in dirty {
        let off = off.clamp(at, disk_size);
        let end = off.saturating_add(len).min(disk_size);
        push(&mut out, at, off - at, false);
        push(&mut out, off, end - off, true);
        at = end;
    }
    push(&mut out, at, disk_size - at, false);
    out
}

fn describe(dirty: bool) -> (u32, &'static str) {
    if dirty {
        (1, "dirty")
    } else {
        (0, "clean")
    }
}

/// One text row, as nbdinfo prints it.
pub fn text_row(r: &Row) -> String {
    let (t, d) = describe(r.dirty);
    format!("{:>10}  {:>10}  {t:>3}  {d}", r.offset, r.length)
}

/// The JSON array exactly as `nbdinfo --json --map` prints it, one object per line.
pub fn json_rows(rows: &[Row]) -> String {
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            let (t, d) = describe(r.dirty);
            format!(
                "{{ \"offset\": {}, \"length\": {}, \"type\": {t}, \"description\": \"{d}\"}}",
                r.offset, r.length
            )
        })
        .collect();
    format!("[\n{}\n]", lines.join(",\n"))
}

/// Bytes per type (clean, then dirty), those present: `nbdinfo --totals`.
fn totals(rows: &[Row]) -> Vec<(u64, bool)> {
    let sum = |dirty: bool| -> u64 {
        rows.iter()
            .filter(|r| r.dirty == dirty)
            .map(|r| r.length)
            .sum()
    };
    [(sum(false), false), (sum(true), true)]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .collect()
}

/// C's `%g`: six significant digits, trailing zeros dropped.
fn percent_g(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string();
    }
    let digits = 6 - 1 - (v.abs().log10().floor() as i32);
    let s = format!("{:.*}", digits.max(0) as usize, v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `nbdinfo --totals` text: `%10lu %5.1f%% %3u %s` per type.
pub fn totals_text(rows: &[Row], disk: u64) -> String {
    let mut out = String::new();
    for (n, dirty) in totals(rows) {
        let (t, d) = describe(dirty);
        let pct = n as f64 * 100.0 / disk.max(1) as f64;
        out.push_str(&format!("{n:>10} {pct:>5.1}% {t:>3} {d}\n"));
    }
    out
}

/// `nbdinfo --json --totals`.
pub fn totals_json(rows: &[Row], disk: u64) -> String {
    let lines: Vec<String> = totals(rows)
        .into_iter()
        .map(|(n, dirty)| {
            let (t, d) = describe(dirty);
            let pct = n as f64 * 100.0 / disk.max(1) as f64;
            format!(
                "{{ \"size\": {n}, \"percent\": {}, \"type\": {t}, \"description\": \"{d}\" }}",
                percent_g(pct)
            )
        })
        .collect();
    format!("[\n{}\n]", lines.join(",\n"))
}

/// Runs `dbm dump`.
pub fn run(args: &DumpArgs) -> CmdResult {
    let st = reader(&args.image, args.force_share)?;
    let r = match (&args.name, &args.since) {
        (Some(n), None) => st.load(BitmapName::parse_escaped(n)),
        (None, Some(x)) => st.changed_since(BitmapName::parse_escaped(x)),
        _ => return Err("give a bitmap NAME or --since CHECKPOINT".into()),
    };
    let bm = r.map_err(|e| match e {
        Error::Inconsistent { name } => at(
            &args.image,
            format!(
                "bitmap {name:?} is inconsistent (in_use was left set, or a program without \
                 bitmap support changed the image): its bits cannot be trusted, so treat the \
                 whole disk as dirty; the only thing to do with it is `dbm bitmap --remove`"
            ),
        ),
        e => at(&args.image, e),
    })?;
    let rows = rows(bm.disk_size(), bm.dirty_extents());
    if args.totals {
        let disk = bm.disk_size();
        emit(&if args.json {
            format!("{}\n", totals_json(&rows, disk))
        } else {
            totals_text(&rows, disk)
        })?;
    } else if args.json {
        emit(&format!("{}\n", json_rows(&rows)))?;
    } else {
        let mut out = String::new();
        for r in &rows {
            out.push_str(&text_row(r));
            out.push('\n');
        }
        emit(&out)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_as_c_g() {
        assert_eq!(percent_g(99.51171875), "99.5117");
        assert_eq!(percent_g(0.48828125), "0.488281");
        assert_eq!(percent_g(100.0), "100");
        assert_eq!(percent_g(0.0), "0");
    }

    #[test]
    fn rows_cover_the_disk() {
        let r = rows(10_000_384, [(512, 3584), (9_998_848, 1024)]);
        let t: Vec<String> = r.iter().map(text_row).collect();
        assert_eq!(
            t,
            [
                "         0         512    0  clean",
                "       512        3584    1  dirty",
                "      4096     9994752    0  clean",
                "   9998848        1024    1  dirty",
                "   9999872         512    0  clean",
            ]
        );
        assert_eq!(
            rows(100, []),
            [Row {
                offset: 0,
                length: 100,
                dirty: false
            }]
        );
        assert_eq!(rows(0, []), []);
        // Adjacent extents merge; the tail is dirty.
        assert_eq!(
            rows(100, [(0, 50), (50, 50)]),
            [Row {
                offset: 0,
                length: 100,
                dirty: true
            }]
        );
    }

    #[test]
    fn json_matches_nbdinfo_shape() {
        use serde_json::json;
        let j = json_rows(&rows(1024, [(512, 512)]));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(
            v,
            json!([
                {"offset": 0, "length": 512, "type": 0, "description": "clean"},
                {"offset": 512, "length": 512, "type": 1, "description": "dirty"},
            ])
        );
    }
}
