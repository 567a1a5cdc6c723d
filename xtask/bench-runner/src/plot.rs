//! SVG plots of a report: throughput by implementation (`throughput.svg`) and speedup
//! against `n_jobs` (`speedup.svg`).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::measure::Group;
use crate::report::{Row, Status};
use crate::rules::{SLEEP_MS, SLEEP_TASKS, n_jobs_of};

/// One bar: implementation, value, group.
type Bar = (String, f64, Group);
/// One line: implementation, group, points `(n_jobs, speedup)`.
type Line = (String, Group, Vec<(f64, f64)>);

/// Plotters' error, with the file it was drawing.
fn fail(path: &Path) -> impl Fn(Box<dyn std::error::Error>) -> String + '_ {
    move |e| format!("cannot draw {}: {e}", path.display())
}

/// Draws every plot the rows allow into `dir`; returns the files written.
///
/// # Errors
/// A file cannot be written.
pub fn write_all(rows: &[Row], dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    let path = dir.join("throughput.svg");
    if throughput(rows, &path).map_err(fail(&path))? {
        written.push(path);
    }
    let path = dir.join("speedup.svg");
    if speedup(rows, &path).map_err(fail(&path))? {
        written.push(path);
    }
    Ok(written)
}

fn color(group: Group, i: usize) -> RGBColor {
    match group {
        Group::Parjob => [
            RGBColor(31, 119, 180),
            RGBColor(44, 160, 44),
            RGBColor(23, 190, 207),
        ][i % 3],
        Group::Reference => RGBColor(127, 127, 127),
        Group::Peer => RGBColor(255, 127, 14),
    }
}

/// The rows of one scenario (and variant) that have a throughput, as bars.
fn bars(rows: &[Row], scenario: &str, variant: &str) -> Vec<Bar> {
    rows.iter()
        .filter(|r| r.measurement.scenario == scenario && r.measurement.variant == variant)
        .filter_map(|r| {
            Some((
                r.measurement.implementation.clone(),
                r.rate?,
                r.measurement.group,
            ))
        })
        .collect()
}

/// Horizontal bars of throughput on a log scale, one panel per throughput scenario.
fn throughput(rows: &[Row], path: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    // The number of calls as the rows ran them (a quick run makes fewer).
    let calls = |scenario: &str| {
        rows.iter()
            .find(|r| r.measurement.scenario == scenario && r.measurement.group != Group::Peer)
            .map_or(0.0, |r| r.measurement.work)
    };
    let panels: Vec<(String, &str, Vec<Bar>)> = [
        (
            "small",
            "",
            format!("small: {:.0e} calls of ~1 us", calls("small")),
            "tasks/s",
        ),
        (
            "tiny",
            "",
            format!("tiny: {:.0e} calls of x * x", calls("tiny")),
            "tasks/s",
        ),
        (
            "big_input",
            "warm pool",
            "big_input: 100 MB of f64 to 2 workers as owned Vecs (warm pool)".to_string(),
            "GB/s",
        ),
        (
            "big_input",
            "shared, reused",
            "big_input: 100 MB of f64 to 2 workers as a SharedSlice (reused)".to_string(),
            "GB/s",
        ),
    ]
    .into_iter()
    .map(|(s, v, title, unit)| {
        (
            format!("{title}, {unit} (log scale)"),
            unit,
            bars(rows, s, v),
        )
    })
    .filter(|(_, _, b)| !b.is_empty())
    .collect();
    if panels.is_empty() {
        return Ok(false);
    }
    let height: u32 = panels
        .iter()
        .map(|(_, _, b)| 90 + 28 * b.len() as u32)
        .sum();
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let sizes: Vec<u32> = panels
        .iter()
        .map(|(_, _, b)| 90 + 28 * b.len() as u32)
        .collect();
    let mut rest = root;
    for ((title, unit, bars), h) in panels.iter().zip(sizes) {
        let (area, below) = rest.split_vertically(h);
        rest = below;
        let max = bars.iter().map(|b| b.1).fold(f64::MIN, f64::max);
        let min = bars.iter().map(|b| b.1).fold(f64::MAX, f64::min);
        let lo = min / 3.0;
        let hi = max * 6.0;
        let n = bars.len() as i32;
        let names: Vec<String> = bars.iter().rev().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&area)
            .caption(title.as_str(), ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(240)
            .build_cartesian_2d((lo..hi).log_scale(), (0..n).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(bars.len())
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|v| format!("{v:.0e}"))
            .label_style(("sans-serif", 13))
            .draw()?;
        let mut parjob_seen = 0;
        for (i, (_, value, group)) in bars.iter().enumerate() {
            let y = n - 1 - i as i32;
            let c = color(*group, parjob_seen);
            if *group == Group::Parjob {
                parjob_seen += 1;
            }
            let mut bar = Rectangle::new(
                [
                    (lo, SegmentValue::Exact(y)),
                    (*value, SegmentValue::Exact(y + 1)),
                ],
                c.filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            chart.draw_series(std::iter::once(bar))?;
            let label = match *unit {
                "GB/s" => format!(" {value:.2} GB/s"),
                _ => format!(" {value:.2e}/s"),
            };
            chart.draw_series(std::iter::once(Text::new(
                label,
                (*value, SegmentValue::CenterOf(y)),
                TextStyle::from(("sans-serif", 12).into_font())
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )))?;
        }
    }
    Ok(true)
}

/// Speedup against n_jobs: `sleep_io` (against the serial sleep time) and `cpu_halves`
/// (against the same implementation on one worker), with the ideal line.
fn speedup(rows: &[Row], path: &Path) -> Result<bool, Box<dyn std::error::Error>> {
    let serial = (SLEEP_TASKS * SLEEP_MS) as f64 / 1000.0;
    let series = |scenario: &str, value: &dyn Fn(&Row) -> Option<f64>| {
        let mut out: Vec<Line> = Vec::new();
        for r in rows.iter().filter(|r| r.measurement.scenario == scenario) {
            let (Some(n), Some(v)) = (n_jobs_of(&r.measurement.variant), value(r)) else {
                continue;
            };
            if r.measurement.status != Status::Measured {
                continue;
            }
            let name = &r.measurement.implementation;
            match out.iter_mut().find(|(s, _, _)| s == name) {
                Some((_, _, points)) => points.push((n as f64, v)),
                None => out.push((name.clone(), r.measurement.group, vec![(n as f64, v)])),
            }
        }
        for (_, _, points) in &mut out {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        out
    };
    let sleep = series("sleep_io", &|r| r.median.map(|m| serial / m));
    let halves = series("cpu_halves", &|r| match n_jobs_of(&r.measurement.variant) {
        Some(1) => r.median.map(|_| 1.0),
        _ => r.ratio,
    });
    if sleep.is_empty() && halves.is_empty() {
        return Ok(false);
    }
    let root = SVGBackend::new(path, (1000, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(560);

    let mut chart = ChartBuilder::on(&left)
        .caption("sleep_io: 100 sleeps of 10 ms", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d((0.8f64..130.0).log_scale(), (0.5f64..130.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("n_jobs")
        .y_desc("speedup over 1 s of serial sleeps")
        .label_style(("sans-serif", 13))
        .draw()?;
    let ideal: Vec<(f64, f64)> = [1u64, 2, 5, 10, 20, 50, 100]
        .iter()
        .map(|&n| {
            (
                n as f64,
                SLEEP_TASKS as f64 / SLEEP_TASKS.div_ceil(n) as f64,
            )
        })
        .collect();
    draw_lines(&mut chart, ideal, &sleep)?;

    let mut chart = ChartBuilder::on(&right)
        .caption("cpu_halves: 10^7 squares in 2 halves", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0.9f64..2.1, 0.0f64..2.5)?;
    chart
        .configure_mesh()
        .x_labels(3)
        .x_desc("n_jobs")
        .y_desc("speedup over n_jobs = 1")
        .label_style(("sans-serif", 13))
        .draw()?;
    draw_lines(&mut chart, vec![(1.0, 1.0), (2.0, 2.0)], &halves)?;
    root.present()?;
    Ok(true)
}

/// The `ideal` line in black, then one line per implementation that has more than one point
/// (parjob's thick with dots, the Rust references thin, the Python peers with triangles), and
/// the legend.
fn draw_lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    ideal: Vec<(f64, f64)>,
    series: &[Line],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(ideal, BLACK.stroke_width(1)))?
        .label("ideal")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK));
    let lines = series.iter().filter(|(_, _, points)| points.len() > 1);
    for (i, (name, group, points)) in lines.enumerate() {
        let c = Palette99::pick(i).to_rgba();
        let width = match group {
            Group::Parjob => 3,
            Group::Reference => 1,
            Group::Peer => 2,
        };
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(width)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(width)));
        if *group == Group::Peer {
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| TriangleMarker::new(p, 5, c.filled())),
            )?;
        } else {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}
