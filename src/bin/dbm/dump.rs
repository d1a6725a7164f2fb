//! `dbm dump`: a bitmap as the rows `nbdinfo --map=qemu:dirty-bitmap:NAME` prints.
//!
//! Text rows are nbdinfo's `%10lu  %10lu  %3u  %s`: offset, length, type (1 dirty,
//! 0 clean) and its description, in decimal, merged runs covering the whole disk. The
//! JSON form is nbdinfo's `--json` array: one `{ "offset": …, "length": …, "type": …,
//! "description": …}` object per row, in nbdinfo's key order.

use dirty_bitmap::format::BitmapName;
use dirty_bitmap::store::triage::triage_bitmaps;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::open::{at, reader, shared_since_error, since_error};
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
    /// Print what changed since this checkpoint instead: the union of it and every other
    /// bitmap of the image (`dbm checkpoint`).
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
/// with the clean gaps between them, produced one at a time as the extents are read, so
/// that a bitmap of millions of runs is printed in constant memory.
pub fn rows<I: IntoIterator<Item = (u64, u64)>>(disk_size: u64, dirty: I) -> Rows<I::IntoIter> {
    Rows {
        disk: disk_size,
        at: 0,
        src: dirty.into_iter(),
        pending: None,
        ready: VecDeque::with_capacity(2),
        done: false,
    }
}

/// The iterator of [`rows`]: each extent read gives at most two finished rows (the clean
/// gap before it and the previous dirty run), so at most two wait in `ready`.
pub struct Rows<I> {
    disk: u64,
    /// Where the next row starts.
    at: u64,
    src: I,
    /// The row being grown: the next piece may extend it.
    pending: Option<Row>,
    ready: VecDeque<Row>,
    done: bool,
}

impl<I> Rows<I> {
    fn feed(&mut self, offset: u64, length: u64, dirty: bool) {
        if length == 0 {
            return;
        }
        match &mut self.pending {
            Some(r) if r.dirty == dirty && r.offset + r.length == offset => r.length += length,
            p => {
                if let Some(done) = p.replace(Row {
                    offset,
                    length,
                    dirty,
                }) {
                    self.ready.push_back(done);
                }
            }
        }
    }
}

impl<I: Iterator<Item = (u64, u64)>> Iterator for Rows<I> {
    type Item = Row;

    fn next(&mut self) -> Option<Row> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Some(r);
            }
            if self.done {
                return None;
            }
            match self.src.next() {
                Some((off, len)) => {
                    let off = off.clamp(self.at, self.disk);
                    let end = off.saturating_add(len).min(self.disk);
                    self.feed(self.at, off - self.at, false);
                    self.feed(off, end - off, true);
                    self.at = end;
                }
                None => {
                    self.done = true;
                    self.feed(self.at, self.disk - self.at, false);
                    if let Some(r) = self.pending.take() {
                        self.ready.push_back(r);
                    }
                }
            }
        }
    }
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

/// One object of nbdinfo's `--json --map` array.
fn json_row(r: &Row) -> String {
    let (t, d) = describe(r.dirty);
    format!(
        "{{ \"offset\": {}, \"length\": {}, \"type\": {t}, \"description\": \"{d}\"}}",
        r.offset, r.length
    )
}

/// Writes `rows` as text rows, or as the JSON array exactly as `nbdinfo --json --map`
/// prints it (one object per line), followed by a newline.
pub fn write_rows(
    out: &mut impl Write,
    rows: impl Iterator<Item = Row>,
    json: bool,
) -> std::io::Result<()> {
    if !json {
        for r in rows {
            writeln!(out, "{}", text_row(&r))?;
        }
        return Ok(());
    }
    out.write_all(b"[\n")?;
    for (i, r) in rows.enumerate() {
        if i > 0 {
            out.write_all(b",\n")?;
        }
        out.write_all(json_row(&r).as_bytes())?;
    }
    out.write_all(b"\n]\n")
}

/// Bytes per type (clean, then dirty), those present: `nbdinfo --totals`.
fn totals(rows: impl Iterator<Item = Row>) -> Vec<(u64, bool)> {
    let (mut clean, mut dirty) = (0u64, 0u64);
    for r in rows {
        let sum = if r.dirty { &mut dirty } else { &mut clean };
        *sum = sum.saturating_add(r.length);
    }
    [(clean, false), (dirty, true)]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .collect()
}

/// C's `%g`: six significant digits, trailing zeros dropped; the exponent form (`e-05`,
/// at least two exponent digits) when the exponent of the value rounded to six digits is
/// below -4 or at least 6, as C chooses.
fn percent_g(v: f64) -> String {
    const P: i32 = 6;
    if v == 0.0 {
        return "0".to_string();
    }
    let trim = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    // Rust's `{:e}` rounds to the precision as C does and prints the exponent bare.
    let e = format!("{:.*e}", (P - 1) as usize, v);
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let x: i32 = exp.parse().unwrap_or(0);
    if (-4..P).contains(&x) {
        trim(&format!("{:.*}", (P - 1 - x) as usize, v))
    } else {
        let sign = if x < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), x.unsigned_abs())
    }
}

/// `nbdinfo --totals` text: `%10lu %5.1f%% %3u %s` per type.
pub fn totals_text(rows: impl Iterator<Item = Row>, disk: u64) -> String {
    let mut out = String::new();
    for (n, dirty) in totals(rows) {
        let (t, d) = describe(dirty);
        let pct = n as f64 * 100.0 / disk.max(1) as f64;
        out.push_str(&format!("{n:>10} {pct:>5.1}% {t:>3} {d}\n"));
    }
    out
}

/// `nbdinfo --json --totals`.
pub fn totals_json(rows: impl Iterator<Item = Row>, disk: u64) -> String {
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
    // A broken bitmap anywhere in the image makes this crate refuse the image (and QEMU
    // too, unless what breaks it is a table past the end of the file, which QEMU reads as
    // clean), and `dbm info` calls every other bitmap inconsistent (not loaded: treat as
    // all dirty): refused here as an inconsistent bitmap is, whichever one is named.
    if let Some(t) = triage_bitmaps(st.image()).map_err(|e| at(&args.image, e))? {
        if let Some(b) = t.bitmaps.iter().find(|b| b.broken.is_some()) {
            let why = if t
                .bitmaps
                .iter()
                .all(|b| b.broken.is_none() || b.table_past_end)
            {
                "its table reaches past the end of the file, which QEMU reads as clean"
            } else {
                "QEMU refuses the image"
            };
            return Err(at(
                &args.image,
                format!(
                    "bitmap {} is broken ({why}), so no bitmap of the image can be trusted: \
                     treat the disk as all dirty (`dbm check -r all` removes the broken \
                     bitmap; then back up in full and start a new chain)",
                    BitmapName::from(b.entry.raw.name.as_slice())
                ),
            )
            .into());
        }
    }
    let r = match (&args.name, &args.since) {
        (Some(n), None) => st.load(BitmapName::parse_escaped(n)),
        (None, Some(x)) => st.changed_since(BitmapName::parse_escaped(x)),
        _ => return Err("give a bitmap NAME or --since CHECKPOINT".into()),
    };
    let bm = r.map_err(|e| {
        if args.force_share {
            shared_since_error(&st, &args.image, e)
        } else {
            since_error(&args.image, e)
        }
    })?;
    let rows = rows(bm.disk_size(), bm.dirty_extents());
    if args.totals {
        let disk = bm.disk_size();
        emit(&if args.json {
            format!("{}\n", totals_json(rows, disk))
        } else {
            totals_text(rows, disk)
        })?;
    } else {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        match write_rows(&mut out, rows, args.json).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(format!("writing to stdout: {e}").into());
            }
            _ => {}
        }
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
        // nbdinfo's `%g` for 64 KiB dirty of 1 TiB, and the edges of the exponent form.
        assert_eq!(
            percent_g(65536.0 * 100.0 / (1u64 << 40) as f64),
            "5.96046e-06"
        );
        assert_eq!(percent_g(0.0001), "0.0001");
        assert_eq!(percent_g(0.00009999995), "0.0001");
        assert_eq!(percent_g(0.0000999999), "9.99999e-05");
        assert_eq!(percent_g(1e-5), "1e-05");
        assert_eq!(percent_g(999999.5), "1e+06");
        assert_eq!(percent_g(123456.0), "123456");
    }

    fn all(disk: u64, dirty: &[(u64, u64)]) -> Vec<Row> {
        rows(disk, dirty.iter().copied()).collect()
    }

    #[test]
    fn rows_cover_the_disk() {
        let r = all(10_000_384, &[(512, 3584), (9_998_848, 1024)]);
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
            all(100, &[]),
            [Row {
                offset: 0,
                length: 100,
                dirty: false
            }]
        );
        assert_eq!(all(0, &[]), []);
        // Adjacent extents merge; the tail is dirty.
        assert_eq!(
            all(100, &[(0, 50), (50, 50)]),
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
        let mut j = Vec::new();
        write_rows(&mut j, rows(1024, [(512, 512)]), true).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&j).unwrap();
        assert_eq!(
            v,
            json!([
                {"offset": 0, "length": 512, "type": 0, "description": "clean"},
                {"offset": 512, "length": 512, "type": 1, "description": "dirty"},
            ])
        );
    }

    /// The rows are never collected before printing: at about 60 bytes each, an alternating
    /// 16 TiB bitmap at 64 KiB would take some 16 GB. The rows are produced as the extents
    /// are read: three rows need at most three extents.
    #[test]
    fn rows_are_produced_as_the_extents_are_read() {
        let pulled = std::cell::Cell::new(0u64);
        let extents = (0u64..1_000_000).map(|k| {
            pulled.set(pulled.get() + 1);
            (2 * k * 512, 512)
        });
        let first: Vec<Row> = rows(u64::MAX, extents).take(3).collect();
        assert_eq!(
            first,
            [
                Row {
                    offset: 0,
                    length: 512,
                    dirty: true
                },
                Row {
                    offset: 512,
                    length: 512,
                    dirty: false
                },
                Row {
                    offset: 1024,
                    length: 512,
                    dirty: true
                },
            ]
        );
        assert!(pulled.get() <= 3, "{} extents read", pulled.get());
    }
}
