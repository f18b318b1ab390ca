//! A small SVG chart writer for the bench results: points joined by lines per series, an
//! optional [min, max] whisker on every point, linear or log axes, a legend. No dependencies;
//! the output is plain SVG 1.1 that browsers and GitHub render.

use std::fmt::Write as _;

/// One point: `y` is the median, `lo`/`hi` the range drawn as a whisker.
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

/// A named line of points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
    /// An SVG colour; `None` takes the next one of the palette.
    pub colour: Option<String>,
    /// A dashed line (and legend key): the same system reached another way.
    pub dashed: bool,
}

/// A chart. `x_labels`, when given, replaces the numeric x ticks with names at those x
/// values (categorical axes: queue depths, jobs, block sizes).
#[derive(Clone, Debug, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    pub x_labels: Option<Vec<(f64, String)>>,
    pub series: Vec<Series>,
}

const W: f64 = 760.0;
const H: f64 = 440.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;

/// Colour-blind-safe palette (Okabe–Ito), then greys.
const COLOURS: [&str; 10] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
    "#777777", "#AAAAAA",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A tick label: 1k, 2.5M, 0.01 …
pub fn short_num(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let t = if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    };
    let t = if t.contains('.') {
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        t
    };
    format!("{t}{suffix}")
}

struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() {
            (lo, hi) = (1.0, 10.0);
        }
        if log {
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            if lo > 0.0 {
                lo = 0.0;
            }
            if hi <= lo {
                hi = lo + 1.0;
            }
            hi *= 1.05;
        }
        Axis { lo, hi, log }
    }

    /// 0..1 along the axis.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.lo * 1e-3);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let mut t = Vec::new();
            let mut v = self.lo;
            while v <= self.hi * 1.0001 {
                t.push(v);
                v *= 10.0;
            }
            t
        } else {
            let span = self.hi - self.lo;
            let raw = span / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * mag)
                .find(|s| span / s <= 6.0)
                .unwrap_or(mag * 10.0);
            let mut t = Vec::new();
            let mut v = (self.lo / step).ceil() * step;
            while v <= self.hi {
                t.push(v);
                v += step;
            }
            t
        }
    }
}

impl Chart {
    /// The chart as an SVG document.
    pub fn render(&self) -> String {
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        let xa = Axis::new(pts().map(|p| p.x), self.x_log);
        let ya = Axis::new(
            pts().flat_map(|p| [p.y, p.lo, p.hi].into_iter()),
            self.y_log,
        );
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        // Categorical axes get half a slot of room at each end.
        let (xa, x_pad) = match &self.x_labels {
            Some(l) if !l.is_empty() => {
                let lo = l.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
                let hi = l.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
                (
                    Axis {
                        lo,
                        hi: if hi > lo { hi } else { lo + 1.0 },
                        log: self.x_log,
                    },
                    0.06,
                )
            }
            _ => (xa, 0.0),
        };
        let sx = |v: f64| LEFT + pw * (x_pad + (1.0 - 2.0 * x_pad) * xa.frac(v));
        let sy = |v: f64| TOP + ph * (1.0 - ya.frac(v));

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            LEFT + pw / 2.0,
            esc(&self.title)
        );
        // Grid and ticks.
        for t in ya.ticks() {
            let y = sy(t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                short_num(t)
            );
        }
        let xticks: Vec<(f64, String)> = match &self.x_labels {
            Some(l) => l.clone(),
            None => xa.ticks().into_iter().map(|t| (t, short_num(t))).collect(),
        };
        for (t, label) in &xticks {
            let x = sx(*t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 18.0,
                esc(label)
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            H - 12.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            esc(&self.y_label)
        );
        // Series.
        for (i, series) in self.series.iter().enumerate() {
            let c = series
                .colour
                .as_deref()
                .unwrap_or(COLOURS[i % COLOURS.len()]);
            let mut pts: Vec<Point> = series
                .points
                .iter()
                .copied()
                .filter(|p| p.y.is_finite() && (!self.y_log || p.y > 0.0))
                .collect();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            if pts.len() > 1 {
                let path: Vec<String> = pts
                    .iter()
                    .map(|p| format!("{:.1},{:.1}", sx(p.x), sy(p.y)))
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{}"/>"#,
                    path.join(" ")
                );
            }
            for p in &pts {
                let (x, y) = (sx(p.x), sy(p.y));
                if p.hi > p.lo {
                    let _ = writeln!(
                        s,
                        r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{c}"/>"#,
                        sy(p.lo),
                        sy(p.hi)
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{c}"><title>{}: {}</title></circle>"#,
                    esc(&series.name),
                    short_num(p.y)
                );
            }
            let ly = TOP + 10.0 + 20.0 * i as f64;
            let lx = LEFT + pw + 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
                lx + 22.0,
                lx + 28.0,
                ly + 4.0,
                esc(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(x: f64, y: f64) -> Point {
        Point {
            x,
            y,
            lo: y * 0.9,
            hi: y * 1.1,
        }
    }

    #[test]
    fn a_log_chart_has_every_series_and_point() {
        let chart = Chart {
            title: "first write <cold>".into(),
            x_label: "file size".into(),
            y_label: "ms".into(),
            x_log: true,
            y_log: true,
            x_labels: None,
            series: vec![
                Series {
                    name: "overlay".into(),
                    points: vec![p(64.0, 100.0), p(1024.0, 1800.0)],
                    colour: None,
                    dashed: true,
                },
                Series {
                    name: "thin".into(),
                    points: vec![p(64.0, 0.5), p(1024.0, 0.6)],
                    colour: Some("#123456".into()),
                    dashed: false,
                },
            ],
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(svg.matches("<polyline").count(), 2);
        // The dashed series: its line and its legend key.
        assert_eq!(svg.matches("stroke-dasharray").count(), 2);
        assert!(svg.contains("first write &lt;cold&gt;"));
        assert!(svg.contains("#123456"));
        // Log ticks span the decades of the data: 0.1 .. 10000.
        assert!(svg.contains(">0.1<") && svg.contains(">10k<"));
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short_num(1500.0), "1500");
        assert_eq!(short_num(25_000.0), "25k");
        assert_eq!(short_num(2.5e6), "2.5M");
        assert_eq!(short_num(0.25), "0.25");
        assert_eq!(short_num(10.0), "10");
    }
}
