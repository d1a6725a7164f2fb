//! A small dependency-free SVG line chart for the `dbm bench` commands: named series of
//! `(x, y)` points, linear or logarithmic axes, ticks, a legend. The output is a complete,
//! well-formed SVG document (every text is XML-escaped).

use std::fmt::Write as _;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points, drawn in the given order. On a log axis, points with a value ≤ 0 are left out.
    pub points: Vec<(f64, f64)>,
    /// Dashed instead of solid.
    pub dashed: bool,
    /// Index into the palette (so that related series can share a colour); `None`: the
    /// series' own index.
    pub colour: Option<usize>,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Label under the x axis.
    pub x_label: String,
    /// Label beside the y axis.
    pub y_label: String,
    /// Logarithmic x axis (decades).
    pub x_log: bool,
    /// Logarithmic y axis (decades).
    pub y_log: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const W: f64 = 960.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 330.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// Colours for the series, in order (then repeated).
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// Escapes `s` for XML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// One axis: maps data values to pixels.
#[derive(Debug, Clone, Copy)]
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    /// Pixel of `lo` and of `hi`.
    p0: f64,
    p1: f64,
}

impl Axis {
    fn new(log: bool, values: impl Iterator<Item = f64>, p0: f64, p1: f64) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (1.0, 10.0);
        }
        if log {
            // Whole decades around the data.
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            lo = lo.min(0.0);
            if hi <= lo {
                hi = lo + 1.0;
            }
            let step = nice_step((hi - lo) / 5.0);
            hi = (hi / step).ceil() * step;
        }
        Self {
            log,
            lo,
            hi,
            p0,
            p1,
        }
    }

    fn t(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn px(&self, v: f64) -> f64 {
        self.p0 + self.t(v) * (self.p1 - self.p0)
    }

    fn shows(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.lo.log10().round() as i32,
                self.hi.log10().round() as i32,
            );
            (a..=b).map(|e| 10f64.powi(e)).collect()
        } else {
            let step = nice_step((self.hi - self.lo) / 5.0);
            let mut out = Vec::new();
            let mut v = self.lo;
            while v <= self.hi + step * 1e-9 {
                out.push(v);
                v += step;
            }
            out
        }
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * p)
}

/// A tick label: plain digits, no exponent, trailing zeros dropped.
pub fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1.0 {
        return format!("{v:.0}");
    }
    let digits = (-v.abs().log10().floor()) as usize + 1;
    let s = format!("{v:.digits$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Chart {
    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let x = Axis::new(self.x_log, pts().map(|p| p.0), LEFT, W - RIGHT);
        let y = Axis::new(self.y_log, pts().map(|p| p.1), H - BOTTOM, TOP);
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{:.1}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            escape(&self.title)
        );
        // Grid, ticks and labels.
        for v in x.ticks() {
            let px = x.px(v);
            let _ = writeln!(
                o,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/>
<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                H - BOTTOM,
                H - BOTTOM + 16.0,
                escape(&tick_label(v))
            );
        }
        for v in y.ticks() {
            let py = y.px(v);
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/>
<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                py + 4.0,
                escape(&tick_label(v))
            );
        }
        let _ = writeln!(
            o,
            r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"##,
            W - RIGHT - LEFT,
            H - BOTTOM - TOP,
            (LEFT + W - RIGHT) / 2.0,
            H - 18.0,
            escape(&self.x_label),
            (TOP + H - BOTTOM) / 2.0,
            (TOP + H - BOTTOM) / 2.0,
            escape(&self.y_label)
        );
        // Lines, markers and the legend.
        for (i, s) in self.series.iter().enumerate() {
            let colour = COLOURS[s.colour.unwrap_or(i) % COLOURS.len()];
            let dash = if s.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let shown: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|(a, b)| x.shows(*a) && y.shows(*b))
                .map(|&(a, b)| (x.px(a), y.px(b)))
                .collect();
            let path: Vec<String> = shown
                .iter()
                .map(|(a, b)| format!("{a:.1},{b:.1}"))
                .collect();
            let _ = writeln!(
                o,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for (a, b) in &shown {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{a:.1}" cy="{b:.1}" r="3" fill="{colour}"/>"#
                );
            }
            let ly = TOP + 10.0 + 20.0 * i as f64;
            let lx = W - RIGHT + 15.0;
            let _ = writeln!(
                o,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/>
<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 25.0,
                lx + 31.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        o.push_str("</svg>\n");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_labels() {
        let a = Axis::new(true, [0.003, 42.0].into_iter(), 0.0, 100.0);
        assert_eq!(a.ticks(), vec![0.001, 0.01, 0.1, 1.0, 10.0, 100.0]);
        assert!((a.px(0.001) - 0.0).abs() < 1e-9 && (a.px(100.0) - 100.0).abs() < 1e-9);
        assert_eq!(tick_label(0.001), "0.001");
        assert_eq!(tick_label(100.0), "100");
        let l = Axis::new(false, [0.0, 7.3].into_iter(), 0.0, 1.0);
        assert_eq!(l.ticks(), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(nice_step(0.3), 0.5);
    }

    #[test]
    fn escapes_text_and_skips_non_positive_log_points() {
        let c = Chart {
            title: "a < b & \"c\"".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            y_log: true,
            series: vec![Series {
                name: "s<1>".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0), (10.0, 20.0)],
                dashed: true,
                colour: None,
            }],
        };
        let svg = c.to_svg();
        assert!(svg.contains("a &lt; b &amp; &quot;c&quot;"));
        assert!(svg.contains("s&lt;1&gt;"));
        assert_eq!(svg.matches("<circle").count(), 2, "x = 0 left out");
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
