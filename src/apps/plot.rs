//! A minimal SVG line chart (objective against time), so that `--plot`
//! needs no plotting library.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `points` (x, y) as an SVG line chart with labelled axes.
pub fn write_svg(path: &Path, title: &str, x_label: &str, y_label: &str, points: &[(f64, f64)]) -> Result<()> {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let finite: Vec<(f64, f64)> = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let (x0, x1) = bounds(finite.iter().map(|p| p.0));
    let (y0, y1) = bounds(finite.iter().map(|p| p.1));
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#, w / 2.0, escape(title));
    let _ = writeln!(s, r#"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - m, w - m, h - m);
    let _ = writeln!(s, r#"<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>"#, h - m);
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, sx(xv), h - m + 18.0, num(xv));
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, m - 6.0, sy(yv) + 4.0, num(yv));
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, w / 2.0, h - 15.0, escape(x_label));
    let _ = writeln!(
        s,
        r#"<text x="15" y="{}" text-anchor="middle" transform="rotate(-90 15 {})">{}</text>"#,
        h / 2.0,
        h / 2.0,
        escape(y_label)
    );
    let pts: Vec<String> = finite.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
    let _ = writeln!(s, r#"<polyline fill="none" stroke="steelblue" stroke-width="2" points="{}"/>"#, pts.join(" "));
    for &(x, y) in &finite {
        let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="steelblue"/>"#, sx(x), sy(y));
    }
    s.push_str("</svg>\n");
    std::fs::write(path, s).map_err(|e| Error::io(format!("writing the plot {}", path.display()), e))
}

fn bounds(it: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in it {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        return (lo - 1.0, hi + 1.0);
    }
    (lo, hi)
}

fn num(v: f64) -> String {
    if v.abs() >= 1e5 || (v != 0.0 && v.abs() < 1e-2) { format!("{v:.2e}") } else { format!("{v:.3}") }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_a_well_formed_chart() {
        let p = std::env::temp_dir().join(format!("pserver-plot-{}.svg", std::process::id()));
        super::write_svg(&p, "a <b>", "s", "obj", &[(0.0, 10.0), (1.0, 5.0), (2.0, 4.0), (3.0, f64::NAN)]).unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>") && s.contains("a &lt;b&gt;"));
        assert_eq!(s.matches("<circle").count(), 3);
        std::fs::remove_file(&p).unwrap();
    }
}
