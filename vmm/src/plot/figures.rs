//! The latency figures (fault-latency buckets, kick and pause CDFs) and what every
//! figure shares: its size, fonts, colours and axis labels.

use std::path::Path;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::{Bucket, CdfSeries, PlotError, Series};

/// A figure's plot size in pixels, readable at the width a README shows it; its keys
/// come on the right of it.
pub const SIZE: (u32, u32) = (760, 500);
/// Where the keys start beside a plot with a caption: level with the plot's top.
const KEY_TOP: i32 = 52;
/// Fonts: the family the SVG names (the viewer picks the face).
pub const FONT: &str = "sans-serif";
// plotters draws text at 1/1.24 of these.
const TITLE_PX: u32 = 26;
const AXIS_PX: u32 = 20;
const LABEL_PX: u32 = 18;
const LEGEND_PX: u32 = 18;

/// Series colours (Tableau's ten with navy for its grey, which the events use).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 128),
];

/// The colour of series `i`.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A plotters error as one of ours, naming the figure.
pub fn draw_error<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        why: format!("{e:?}"),
    }
}

/// `v` with at most three significant digits, without trailing zeros.
fn short(v: f64) -> String {
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A latency axis label: `50 µs`, `2 ms`, `1.5 s`.
pub fn fmt_us(v: f64) -> String {
    if v < 1000.0 {
        format!("{} µs", short(v))
    } else if v < 1e6 {
        format!("{} ms", short(v / 1e3))
    } else {
        format!("{} s", short(v / 1e6))
    }
}

/// A count axis label: `800`, `12k`, `3M`.
pub fn fmt_count(v: f64) -> String {
    if v < 1e3 {
        short(v)
    } else if v < 1e6 {
        format!("{}k", short(v / 1e3))
    } else {
        format!("{}M", short(v / 1e6))
    }
}

/// The power of ten at or below `v` (> 0).
fn decade_below(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

/// The power of ten above `v` (> 0).
fn decade_above(v: f64) -> f64 {
    let d = 10f64.powf(v.log10().ceil());
    if d <= v {
        d * 10.0
    } else {
        d
    }
}

/// `lo..hi` if it is an axis plotters can draw (finite, not empty), else an error
/// naming `path`.
pub fn axis(path: &Path, lo: f64, hi: f64) -> Result<std::ops::Range<f64>, PlotError> {
    if lo.is_finite() && hi.is_finite() && hi > lo {
        Ok(lo..hi)
    } else {
        Err(PlotError::Draw {
            path: path.to_path_buf(),
            why: format!("an axis from {lo} to {hi}"),
        })
    }
}

/// A white drawing area of [`SIZE`] writing to `path`.
pub fn canvas(
    path: &Path,
    size: (u32, u32),
) -> Result<DrawingArea<SVGBackend<'_>, Shift>, PlotError> {
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error(path))?;
    Ok(root)
}

/// Font of the title, axis names, tick labels, legend.
pub fn title_font() -> TextStyle<'static> {
    (FONT, TITLE_PX).into_font().into()
}
/// See [`title_font`].
pub fn axis_font() -> TextStyle<'static> {
    (FONT, AXIS_PX).into_font().into()
}
/// See [`title_font`].
pub fn label_font() -> TextStyle<'static> {
    (FONT, LABEL_PX).into_font().into()
}
/// See [`title_font`].
pub fn legend_font() -> TextStyle<'static> {
    (FONT, LEGEND_PX).into_font().into()
}

/// A key's entry: a series' name and how its line looks.
pub struct Key {
    /// The series' name.
    pub label: String,
    /// Its line.
    pub style: ShapeStyle,
    /// Dashed.
    pub dashed: bool,
}

/// The width of keys beside a plot for these labels: about 8.5 px a character at the
/// key's font, after the swatch.
pub fn key_width<'a>(labels: impl Iterator<Item = &'a str>) -> u32 {
    let longest = labels.map(|l| l.chars().count()).max().unwrap_or(0) as u32;
    (48 + longest * 17 / 2).clamp(160, 600)
}

/// A part of an SVG figure.
pub type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A white canvas of a `plot`-sized plot with `key_w` pixels of keys to its right:
/// the plot's area and the keys'. Keys beside the plot never hide a line.
pub fn canvas_with_keys(
    path: &Path,
    plot: (u32, u32),
    key_w: u32,
) -> Result<(Area<'_>, Area<'_>), PlotError> {
    let root = canvas(path, (plot.0 + key_w, plot.1))?;
    Ok(root.split_horizontally(plot.0))
}

/// Draws `keys` one under the other in `area` from `top` down.
pub fn draw_key(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    top: i32,
    keys: &[Key],
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    for (i, k) in keys.iter().enumerate() {
        let y = top + 26 * i as i32;
        // The swatch sits at the middle of the text's line.
        let at = vec![(6, y + 7), (30, y + 7)];
        if k.dashed {
            area.draw(&DashedPathElement::new(at, 6, 4, k.style))?;
        } else {
            area.draw(&PathElement::new(at, k.style))?;
        }
        area.draw(&Text::new(k.label.clone(), (38, y), legend_font()))?;
    }
    Ok(())
}

/// The fault-latency figure: each series' power-of-two buckets as a step outline
/// (markers at the buckets' middles), counts on a log axis.
pub fn fault_latency(path: &Path, series: &[Series<Vec<Bucket>>]) -> Result<(), PlotError> {
    let err = draw_error(path);
    let buckets = || series.iter().flat_map(|s| s.data.iter());
    // Whole decades: a log axis labels its powers of ten, and one bucket spans less.
    let lo = decade_below(buckets().map(|b| b.from_us).min().unwrap_or(1).max(1) as f64);
    let hi = decade_above(buckets().map(|b| b.to_us).max().unwrap_or(2) as f64);
    let top = buckets().map(|b| b.count).max().unwrap_or(1) as f64;
    // A bucket's outline drops to here: a log axis has no zero.
    let base = 0.7;
    let key_w = key_width(series.iter().map(|s| s.label.as_str()));
    let (root, key) = canvas_with_keys(path, SIZE, key_w)?;
    let mut keys = Vec::new();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Fault latency: a vCPU's wait, or a VMM request, to the page's install",
            title_font(),
        )
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(
            axis(path, lo, hi)?.log_scale(),
            axis(path, base, top * 3.0)?.log_scale(),
        )
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("latency (log scale; power-of-two buckets)")
        .y_desc("faults in the bucket (log scale)")
        .axis_desc_style(axis_font())
        .label_style(label_font())
        .x_label_formatter(&|v| fmt_us(*v))
        .y_label_formatter(&|v| fmt_count(*v))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(&err)?;
    for (i, s) in series.iter().enumerate() {
        let style = color(i).stroke_width(2);
        let mut outline: Vec<(f64, f64)> = Vec::new();
        let mut last_to = None;
        for b in &s.data {
            let (from, to, c) = (b.from_us as f64, b.to_us as f64, b.count as f64);
            if last_to != Some(b.from_us) {
                if let Some(t) = last_to {
                    outline.push((t as f64, base));
                }
                outline.push((from, base));
            }
            outline.push((from, c));
            outline.push((to, c));
            last_to = Some(b.to_us);
        }
        if let Some(t) = last_to {
            outline.push((t as f64, base));
        }
        chart
            .draw_series(LineSeries::new(outline, style))
            .map_err(&err)?;
        keys.push(Key {
            label: s.label.clone(),
            style,
            dashed: false,
        });
        let fill = color(i).filled();
        chart
            .draw_series(s.data.iter().map(|b| {
                let mid = ((b.from_us as f64) * (b.to_us as f64)).sqrt();
                Circle::new((mid, b.count as f64), 3, fill)
            }))
            .map_err(&err)?;
    }
    draw_key(&key, KEY_TOP, &keys).map_err(&err)?;
    root.present().map_err(&err)
}

/// A latency CDF figure: each series a step line on a log latency axis, a floor dashed.
pub fn latency_cdf(path: &Path, title: &str, series: &[CdfSeries]) -> Result<(), PlotError> {
    let err = draw_error(path);
    let points = || series.iter().flat_map(|s| s.points.iter());
    let lo = points().map(|p| p.us).fold(f64::INFINITY, f64::min);
    let hi = points().map(|p| p.us).fold(0.0, f64::max);
    let lo = if lo.is_finite() {
        (lo * 0.8).max(0.5)
    } else {
        1.0
    };
    // At least a decade, so that the axis has a labelled power of ten.
    let hi = (hi * 1.25).max(lo * 10.0);
    let key_w = key_width(series.iter().map(|s| s.label.as_str()));
    let (root, key) = canvas_with_keys(path, SIZE, key_w)?;
    let mut keys = Vec::new();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} (CDF)"), title_font())
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(axis(path, lo, hi)?.log_scale(), 0.0..1.02)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("latency, request to answer (log scale)")
        .x_labels(8)
        .y_desc("fraction answered within it")
        .axis_desc_style(axis_font())
        .label_style(label_font())
        .x_label_formatter(&|v| fmt_us(*v))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(&err)?;
    // Measured series take the colours in turn; a floor, that of the one before it.
    let mut measured = 0usize;
    for s in series {
        if !s.floor || measured == 0 {
            measured += 1;
        }
        let i = measured - 1;
        let mut line = Vec::with_capacity(s.points.len() * 2 + 1);
        let mut below = 0.0;
        for p in &s.points {
            let us = p.us.max(lo);
            line.push((us, below));
            line.push((us, p.fraction));
            below = p.fraction;
        }
        let style = color(i).stroke_width(2);
        if s.floor {
            chart.draw_series(DashedLineSeries::new(line, 7, 5, style))
        } else {
            chart.draw_series(LineSeries::new(line, style))
        }
        .map_err(&err)?;
        keys.push(Key {
            label: s.label.clone(),
            style,
            dashed: s.floor,
        });
    }
    draw_key(&key, KEY_TOP, &keys).map_err(&err)?;
    root.present().map_err(&err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_labels_carry_units() {
        assert_eq!(fmt_us(1.0), "1 µs");
        assert_eq!(fmt_us(50.0), "50 µs");
        assert_eq!(fmt_us(2000.0), "2 ms");
        assert_eq!(fmt_us(1_500_000.0), "1.5 s");
        assert_eq!(fmt_count(800.0), "800");
        assert_eq!(fmt_count(12_000.0), "12k");
        assert_eq!(fmt_count(0.7), "0.7");
    }
}
