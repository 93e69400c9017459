//! The migration timeline figure: pages/s moved by kind over time (top), vCPUs waiting
//! for pages (below, destinations only), and the migration's events as vertical lines
//! on both.
//!
//! The report's samples carry cumulative page counts (`migration.timeline`), so a rate
//! is the difference of two samples over their distance, drawn as a step across it; a
//! rate of zero ends a line (a log axis has no zero), so a stall shows as a gap.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

use super::figures::{
    axis, axis_font, canvas, color, draw_error, draw_key, fmt_count, key_width, label_font,
    title_font, Key,
};
use super::{PlotError, Series};

/// One sample of a migration: cumulative pages so far, and vCPUs waiting now.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Sample {
    /// Milliseconds since the migration began.
    pub t_ms: f64,
    /// Pages moved before the switch-over.
    pub precopy: u64,
    /// Pages moved because the destination asked.
    pub urgent: u64,
    /// Pages moved by the background stream after it.
    pub background: u64,
    /// vCPUs waiting for a page (destination only).
    #[serde(default)]
    pub waiting: Option<u64>,
}

/// One event of a migration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TimelineEvent {
    /// Milliseconds since the migration began.
    pub t_ms: f64,
    /// `switchover`, `postcopy`, `break`, `recovery`, `completed`, `failed`, ...
    pub kind: String,
}

/// A migration's time series, as a report gives it.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// From a source (pages sent), not a destination (pages received).
    pub sent: bool,
    /// In time order.
    pub samples: Vec<Sample>,
    /// In the order they happened.
    pub events: Vec<TimelineEvent>,
}

/// The figure's size: taller than the others, for two panels.
/// The figure's plot width and height; the keys' width comes on top.
const PLOT: (u32, u32) = (810, 640);
/// The kinds of pages drawn, how each gets its count, and its legend name.
type Kind = (&'static str, fn(&Sample) -> u64);
const KINDS: [Kind; 3] = [
    ("precopy", |s| s.precopy),
    ("urgent (asked for)", |s| s.urgent),
    ("background", |s| s.background),
];

/// The events marked, their legend names and colours (none of the series' colours),
/// dashed or not; other events are not drawn.
const EVENTS: [(&str, &str, RGBColor, bool); 5] = [
    ("switchover", "switch-over", RGBColor(0, 0, 0), false),
    ("break", "connection break", RGBColor(200, 0, 160), true),
    ("recovery", "recovery", RGBColor(0, 110, 0), true),
    (
        "completed",
        "all pages here",
        RGBColor(120, 120, 120),
        false,
    ),
    ("failed", "failed", RGBColor(90, 0, 140), false),
];

/// The waiting line's colour with one run (with several, the run's).
const WAITING: RGBColor = RGBColor(70, 70, 70);

/// Runs of step points, split at gaps.
type Steps = Vec<Vec<(f64, f64)>>;

/// The steps of one kind's rate: runs of `(t_s, pages/s)` points, split where the
/// rate is zero.
fn rate_steps(t: &Timeline, count: fn(&Sample) -> u64) -> Steps {
    let mut runs = Vec::new();
    let mut cur: Vec<(f64, f64)> = Vec::new();
    for w in t.samples.windows(2) {
        let dt = (w[1].t_ms - w[0].t_ms) / 1000.0;
        let n = count(&w[1]).saturating_sub(count(&w[0]));
        // Samples closer than 0.05 ms say nothing about a rate (and could make it
        // infinite); ufvmm's are 100 ms apart.
        if dt < 0.000_05 {
            continue;
        }
        if n == 0 {
            if !cur.is_empty() {
                runs.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let r = n as f64 / dt;
        cur.push((w[0].t_ms / 1000.0, r));
        cur.push((w[1].t_ms / 1000.0, r));
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs
}

/// vCPUs waiting as a step line, if the timeline has them.
fn waiting_steps(t: &Timeline) -> Vec<(f64, f64)> {
    let mut line = Vec::new();
    let mut last: Option<f64> = None;
    for s in &t.samples {
        let Some(w) = s.waiting else { continue };
        let x = s.t_ms / 1000.0;
        if let Some(prev) = last {
            line.push((x, prev));
        }
        line.push((x, w as f64));
        last = Some(w as f64);
    }
    line
}

/// Draws `runs`' timelines into `path`.
pub fn draw(path: &Path, runs: &[Series<&Timeline>]) -> Result<(), PlotError> {
    let err = draw_error(path);
    let several = runs.len() > 1;
    let t_max = runs
        .iter()
        .flat_map(|r| {
            let s = r.data.samples.iter().map(|s| s.t_ms);
            s.chain(r.data.events.iter().map(|e| e.t_ms))
        })
        .fold(0.0, f64::max)
        / 1000.0;
    // A little room left of 0: a switch-over at the very start is not hidden by the axis.
    let span = t_max.max(0.1);
    let x = axis(path, -span * 0.015, span * 1.02)?;
    let rates: Vec<Vec<Steps>> = runs
        .iter()
        .map(|r| KINDS.iter().map(|(_, c)| rate_steps(r.data, *c)).collect())
        .collect();
    let top = rates
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .map(|p| p.1)
        .fold(1.0, f64::max);
    let waiting: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| waiting_steps(r.data)).collect();
    let has_waiting = waiting.iter().any(|w| !w.is_empty());
    let verb = match (
        runs.iter().all(|r| r.data.sent),
        runs.iter().any(|r| r.data.sent),
    ) {
        (true, _) => "sent",
        (false, false) => "received",
        _ => "moved",
    };

    // The longest key: a run's label and the longest kind's name.
    let prefix = if several {
        runs.iter()
            .map(|r| r.label.chars().count() + 2)
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let key_w = key_width(std::iter::once(" ".repeat(prefix).as_str())).max(key_width(
        std::iter::once(format!("{}vCPUs waiting for a page", " ".repeat(prefix)).as_str()),
    ));
    let root = canvas(path, (PLOT.0 + key_w, PLOT.1))?;
    let root = root
        .titled(&format!("Migration over time: pages {verb}"), title_font())
        .map_err(&err)?;
    let (upper, lower) = if has_waiting {
        let (u, l) = root.split_vertically(PLOT.1 * 62 / 100);
        (u, Some(l))
    } else {
        (root, None)
    };

    let (upper, upper_key) = upper.split_horizontally(PLOT.0);
    let mut keys = Vec::new();
    let mut chart = ChartBuilder::on(&upper)
        .margin(14)
        .x_label_area_size(if has_waiting { 30 } else { 48 })
        .y_label_area_size(74)
        .build_cartesian_2d(x.clone(), axis(path, 0.7, top * 3.0)?.log_scale())
        .map_err(&err)?;
    let mut mesh = chart.configure_mesh();
    mesh.y_desc(format!("pages/s {verb} (log scale)"))
        .axis_desc_style(axis_font())
        .label_style(label_font())
        .y_label_formatter(&|v| fmt_count(*v))
        .x_label_formatter(&|v| format!("{v:.1}"))
        .light_line_style(RGBColor(238, 238, 238));
    if !has_waiting {
        mesh.x_desc("time since the migration began (s)");
    }
    mesh.draw().map_err(&err)?;
    for (ri, run) in runs.iter().enumerate() {
        for (ki, (name, _)) in KINDS.iter().enumerate() {
            // One run: a colour per kind. Several: a colour per run, a line per kind.
            let (c, width, dashed) = if several {
                (color(ri), [1, 3, 1][ki], ki == 0)
            } else {
                (color(ki), 2, false)
            };
            let style = c.stroke_width(width);
            let label = if several {
                format!("{}: {name}", run.label)
            } else {
                (*name).to_string()
            };
            for steps in &rates[ri][ki] {
                if dashed {
                    chart.draw_series(DashedLineSeries::new(steps.clone(), 7, 4, style))
                } else {
                    chart.draw_series(LineSeries::new(steps.clone(), style))
                }
                .map_err(&err)?;
            }
            if !rates[ri][ki].is_empty() {
                keys.push(Key {
                    label,
                    style,
                    dashed,
                });
            }
        }
    }
    keys.extend(draw_events(&mut chart, runs, (0.7, top * 3.0)).map_err(&err)?);
    draw_key(&upper_key, 20, &keys).map_err(&err)?;

    if let Some(lower) = lower {
        draw_waiting(&lower, runs, &waiting, x).map_err(&err)?;
    }
    upper.present().map_err(&err)
}

/// The lower panel: vCPUs waiting for pages.
fn draw_waiting(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    runs: &[Series<&Timeline>],
    waiting: &[Vec<(f64, f64)>],
    x: std::ops::Range<f64>,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let most = waiting.iter().flatten().map(|p| p.1).fold(1.0, f64::max);
    let (area, key) = area.split_horizontally(PLOT.0);
    let mut keys = Vec::new();
    let mut chart = ChartBuilder::on(&area)
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(74)
        .build_cartesian_2d(x, 0.0..most + 0.5)?;
    chart
        .configure_mesh()
        .x_desc("time since the migration began (s)")
        .y_desc("vCPUs waiting")
        .axis_desc_style(axis_font())
        .label_style(label_font())
        .x_label_formatter(&|v| format!("{v:.1}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_labels((most as usize).saturating_add(2).min(10))
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    for (i, (run, line)) in runs.iter().zip(waiting).enumerate() {
        if line.is_empty() {
            continue;
        }
        let c = if runs.len() > 1 { color(i) } else { WAITING };
        let style = c.stroke_width(2);
        let label = if runs.len() > 1 {
            format!("{}: vCPUs waiting for a page", run.label)
        } else {
            "vCPUs waiting for a page".to_string()
        };
        chart.draw_series(LineSeries::new(line.clone(), style))?;
        keys.push(Key {
            label,
            style,
            dashed: false,
        });
    }
    draw_events(&mut chart, runs, (0.0, most + 0.5))?;
    draw_key(&key, 20, &keys)
}

/// Vertical lines at the runs' events; a key for each kind seen.
fn draw_events<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    runs: &[Series<&Timeline>],
    (y0, y1): (f64, f64),
) -> Result<Vec<Key>, DrawingAreaErrorKind<std::io::Error>>
where
    Y: Ranged<ValueType = f64>,
{
    let mut keys = Vec::new();
    for (kind, name, c, dashed) in EVENTS {
        let at: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.data.events.iter())
            .filter(|e| e.kind == kind)
            .map(|e| e.t_ms / 1000.0)
            .collect();
        let style = c.stroke_width(if dashed { 1 } else { 2 });
        for t in &at {
            let line = vec![(*t, y0), (*t, y1)];
            if dashed {
                chart.draw_series(DashedLineSeries::new(line, 6, 4, style))?;
            } else {
                chart.draw_series(LineSeries::new(line, style))?;
            }
        }
        if !at.is_empty() {
            keys.push(Key {
                label: name.to_string(),
                style,
                dashed,
            });
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_ms: f64, precopy: u64, urgent: u64) -> Sample {
        Sample {
            t_ms,
            precopy,
            urgent,
            background: 0,
            waiting: Some(urgent % 2),
        }
    }

    #[test]
    fn rates_are_steps_and_a_stall_is_a_gap() {
        let t = Timeline {
            sent: false,
            samples: vec![
                s(0.0, 0, 0),
                s(100.0, 0, 10),
                s(200.0, 0, 10),
                s(300.0, 0, 40),
            ],
            events: Vec::new(),
        };
        let r = rate_steps(&t, |s| s.urgent);
        assert_eq!(
            r,
            vec![
                vec![(0.0, 100.0), (0.1, 100.0)],
                vec![(0.2, 300.0), (0.3, 300.0)]
            ]
        );
        assert!(rate_steps(&t, |s| s.precopy).is_empty());
        let w = waiting_steps(&t);
        assert_eq!(w.first(), Some(&(0.0, 0.0)));
        assert_eq!(w.last(), Some(&(0.3, 0.0)));
        assert_eq!(w.len(), 7);
    }
}
