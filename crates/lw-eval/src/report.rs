//! `eval report`: one Markdown report over one or more runs, with charts as
//! PNG and SVG — required against produced length on log-log axes with the
//! y = x line, S_l by length bucket, S_q by dimension (when a run has been
//! judged), and repetition by required length. Several runs are drawn side
//! by side, to compare models or modes.

use std::path::{Path, PathBuf};
use std::sync::Once;

use lw_core::Counter;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::items::Prediction;
use crate::judge::{quality_scores, Judgement, DIMENSIONS};
use crate::length::{LengthReport, BUCKETS};
use crate::repetition::Repetition;

/// The one font the charts use, shipped with the binary (DejaVu Sans; its
/// licence is in assets/DejaVuSans-LICENSE.txt): charts look the same on
/// every machine and need no system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    #[error("no runs to report")]
    NoRuns,
}

/// One run as the report sees it.
pub struct RunData {
    pub name: String,
    pub preds: Vec<Prediction>,
    /// Judgements by prediction index, when the run was judged.
    pub judgements: Option<Vec<Option<Judgement>>>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type DrawResult = Result<(), String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn scatter_loglog<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    diagonal: bool,
    y_log: bool,
) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let mut xmax = all.iter().map(|p| p.0).fold(10.0, f64::max) * 1.5;
    let mut xmin = all.iter().map(|p| p.0).fold(xmax, f64::min).max(1.0) / 1.5;
    let top = all.iter().map(|p| p.1).fold(0.0, f64::max);
    if diagonal {
        // The same range on both axes, so y = x is the diagonal.
        xmax = xmax.max(top * 1.5);
        xmin = xmin.min(all.iter().map(|p| p.1.max(1.0)).fold(xmin, f64::min) / 1.5);
    }
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64);
    // The axes differ in type between the branches; the styling does not.
    macro_rules! mesh {
        ($chart:expr, $y_fmt:expr) => {
            $chart
                .configure_mesh()
                .x_desc("required length (words)")
                .y_desc(y_desc)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter($y_fmt)
                .light_line_style(RGBColor(238, 238, 238))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)
        };
    }
    if y_log {
        let (ymin, ymax) = if diagonal {
            (xmin, xmax)
        } else {
            (1.0, (top * 1.5).max(10.0))
        };
        let mut chart = builder
            .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
            .map_err(err)?;
        mesh!(chart, &|v| format!("{v:.0}"))?;
        if diagonal {
            chart
                .draw_series(LineSeries::new(
                    vec![(xmin, xmin), (xmax, xmax)],
                    BLACK.stroke_width(1),
                ))
                .map_err(err)?
                .label("y = x")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        }
        points(&mut chart, series, ymin)
    } else {
        let mut chart = builder
            .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..(top * 1.2).max(0.05))
            .map_err(err)?;
        mesh!(chart, &|v| format!("{v:.2}"))?;
        points(&mut chart, series, f64::MIN)
    }?;
    root.present().map_err(err)
}

/// One colour per run; values below `floor` are drawn at it (log axes).
fn points<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[(String, Vec<(f64, f64)>)],
    floor: f64,
) -> DrawResult
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y.max(floor)), 4, c.mix(0.8).filled())),
            )
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Circle::new((x + 9, y), 4, c.filled()));
    }
    legend(chart)
}

/// The series legend, top left.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> DrawResult {
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)
}

/// Grouped bars: one group per category, one bar per run, values 0–100.
fn grouped_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    groups: &[String],
    runs: &[(String, Vec<Option<f64>>)],
) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let per = runs.len() + 1; // one empty slot between groups
    let slots = groups.len() * per;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((0..slots).into_segmented(), 0.0..105.0)
        .map_err(err)?;
    let middle = runs.len().saturating_sub(1) / 2;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(slots)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(k) if k % per == middle => {
                groups.get(k / per).cloned().unwrap_or_default()
            }
            _ => String::new(),
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (r, (name, values)) in runs.iter().enumerate() {
        let c = PALETTE[r % PALETTE.len()];
        chart
            .draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                let v = (*v)?;
                let k = g * per + r;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(k), 0.0),
                        (SegmentValue::Exact(k + 1), v),
                    ],
                    c.filled(),
                );
                bar.set_margin(0, 0, 3, 3);
                Some(bar)
            }))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

const SIZE: (u32, u32) = (960, 600);

/// A chart's data, drawn the same way on any backend.
enum Chart {
    Scatter {
        title: String,
        y_desc: String,
        series: Vec<(String, Vec<(f64, f64)>)>,
        diagonal: bool,
        y_log: bool,
    },
    Bars {
        title: String,
        y_desc: String,
        groups: Vec<String>,
        runs: Vec<(String, Vec<Option<f64>>)>,
    },
    Lines {
        title: String,
        x_desc: String,
        y_desc: String,
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
}

/// Line series on linear axes (loss curves).
fn lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    root.fill(&WHITE).map_err(err)?;
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let xmin = all.iter().map(|p| p.0).fold(xmax, f64::min).min(xmax - 1.0);
    let ymax = all
        .iter()
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xmin..xmax, 0.0..(ymax * 1.05).max(0.05))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = color.stroke_width(2);
        if pts.len() == 1 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), style))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Writes `dir/NAME.png` and `dir/NAME.svg`: one line per series.
pub fn line_chart(
    dir: &Path,
    name: &str,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), ReportError> {
    let chart = Chart::Lines {
        title: title.into(),
        x_desc: x_desc.into(),
        y_desc: y_desc.into(),
        series: series.to_vec(),
    };
    save(&chart, dir, name)
}

fn render<DB: DrawingBackend>(chart: &Chart, root: &DrawingArea<DB, Shift>) -> DrawResult {
    match chart {
        Chart::Scatter {
            title,
            y_desc,
            series,
            diagonal,
            y_log,
        } => scatter_loglog(root, title, y_desc, series, *diagonal, *y_log),
        Chart::Bars {
            title,
            y_desc,
            groups,
            runs,
        } => grouped_bars(root, title, y_desc, groups, runs),
        Chart::Lines {
            title,
            x_desc,
            y_desc,
            series,
        } => lines(root, title, x_desc, y_desc, series),
    }
}

/// Writes `NAME.svg` and `NAME.png` into `dir`.
fn save(chart: &Chart, dir: &Path, name: &str) -> Result<(), ReportError> {
    register_font();
    let fail = |path: &Path, reason: String| ReportError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let svg_path = dir.join(format!("{name}.svg"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        render(chart, &root).map_err(|e| fail(&svg_path, e))?;
    }
    lw_core::write_atomic(&svg_path, svg.as_bytes())
        .map_err(|e| fail(&svg_path, e.source.to_string()))?;
    let png_path = dir.join(format!("{name}.png"));
    let mut rgb = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        render(chart, &root).map_err(|e| fail(&png_path, e))?;
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, SIZE.0, SIZE.1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| fail(&png_path, e.to_string()))?;
        w.write_image_data(&rgb)
            .map_err(|e| fail(&png_path, e.to_string()))?;
    }
    lw_core::write_atomic(&png_path, &bytes).map_err(|e| fail(&png_path, e.source.to_string()))
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.1}"))
}

/// Writes `report.md` and the charts into `out`; returns the report's path.
pub fn write_report(
    runs: &[RunData],
    counter: Counter,
    out: &Path,
) -> Result<PathBuf, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    std::fs::create_dir_all(out).map_err(|e| ReportError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let lengths: Vec<LengthReport> = runs
        .iter()
        .map(|r| LengthReport::new(&r.preds, counter))
        .collect();
    let reps: Vec<Vec<Repetition>> = runs
        .iter()
        .map(|r| {
            r.preds
                .iter()
                .map(|p| Repetition::of(&p.response))
                .collect()
        })
        .collect();
    let quality: Vec<Option<([f64; 6], f64, usize)>> = runs
        .iter()
        .map(|r| {
            let j = r.judgements.as_ref()?;
            let ok: Vec<Judgement> = j.iter().flatten().cloned().collect();
            let unparsed = j.iter().filter(|x| x.is_none()).count();
            quality_scores(&ok).map(|(d, o)| (d, o, unparsed))
        })
        .collect();

    save(
        &Chart::Scatter {
            title: "Produced against required length".into(),
            y_desc: format!("produced length ({} words)", counter.name()),
            series: runs
                .iter()
                .zip(&lengths)
                .map(|(r, l)| {
                    (
                        r.name.clone(),
                        l.items
                            .iter()
                            .map(|i| (i.required as f64, i.produced as f64))
                            .collect(),
                    )
                })
                .collect(),
            diagonal: true,
            y_log: true,
        },
        out,
        "length",
    )?;
    let buckets: Vec<&str> = BUCKETS
        .iter()
        .copied()
        .filter(|b| lengths.iter().any(|l| l.by_bucket.contains_key(b)))
        .collect();
    save(
        &Chart::Bars {
            title: "Length score S_l by required length".into(),
            y_desc: "S_l".into(),
            groups: buckets.iter().map(|b| b.to_string()).collect(),
            runs: runs
                .iter()
                .zip(&lengths)
                .map(|(r, l)| {
                    (
                        r.name.clone(),
                        buckets
                            .iter()
                            .map(|b| l.by_bucket.get(b).map(|g| g.score))
                            .collect(),
                    )
                })
                .collect(),
        },
        out,
        "length-score",
    )?;
    let judged = quality.iter().any(Option::is_some);
    if judged {
        save(
            &Chart::Bars {
                title: "Quality S_q by dimension".into(),
                y_desc: "S_q".into(),
                groups: DIMENSIONS.iter().map(|d| d.to_string()).collect(),
                runs: runs
                    .iter()
                    .zip(&quality)
                    .map(|(r, q)| (r.name.clone(), (0..6).map(|i| q.map(|q| q.0[i])).collect()))
                    .collect(),
            },
            out,
            "quality",
        )?;
    }
    save(
        &Chart::Scatter {
            title: "Repetition (seq-rep-4) by required length".into(),
            y_desc: "seq-rep-4".into(),
            series: runs
                .iter()
                .zip(&reps)
                .map(|(r, reps)| {
                    (
                        r.name.clone(),
                        r.preds
                            .iter()
                            .zip(reps)
                            .map(|(p, x)| (p.length as f64, x.seq_rep_4))
                            .collect(),
                    )
                })
                .collect(),
            diagonal: false,
            y_log: false,
        },
        out,
        "repetition",
    )?;

    let mut md = String::from("# Evaluation report\n\n");
    md.push_str(&format!(
        "Lengths counted with the `{}` counter.\n\n",
        counter.name()
    ));
    md.push_str("| run | items | failed | S_l | S_q | (S_l + S_q)/2 | degenerate |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for (i, r) in runs.iter().enumerate() {
        let q = quality[i].map(|q| q.1);
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} | {} |\n",
            r.name,
            lengths[i].items_scored,
            lengths[i].failed,
            lengths[i].overall,
            fmt(q),
            fmt(q.map(|q| (q + lengths[i].overall) / 2.0)),
            reps[i].iter().filter(|x| x.degenerate).count()
        ));
    }
    md.push_str("\n![Produced against required length](length.png)\n\n## S_l by required length\n\n| bucket |");
    for r in runs {
        md.push_str(&format!(" {} |", r.name));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(runs.len()));
    md.push('\n');
    for b in &buckets {
        md.push_str(&format!("| {b} |"));
        for l in &lengths {
            md.push_str(&format!(" {} |", fmt(l.by_bucket.get(b).map(|g| g.score))));
        }
        md.push('\n');
    }
    md.push_str("\n![S_l by bucket](length-score.png)\n\n");
    let mut types: Vec<&String> = lengths.iter().flat_map(|l| l.by_type.keys()).collect();
    types.sort();
    types.dedup();
    md.push_str("## S_l by type\n\n| type |");
    for r in runs {
        md.push_str(&format!(" {} |", r.name));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(runs.len()));
    md.push('\n');
    for t in types {
        md.push_str(&format!("| {t} |"));
        for l in &lengths {
            md.push_str(&format!(" {} |", fmt(l.by_type.get(t).map(|g| g.score))));
        }
        md.push('\n');
    }
    if judged {
        md.push_str("\n## Quality\n\n| dimension |");
        for r in runs {
            md.push_str(&format!(" {} |", r.name));
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(runs.len()));
        md.push('\n');
        for (d, dim) in DIMENSIONS.iter().enumerate() {
            md.push_str(&format!("| {dim} |"));
            for q in &quality {
                md.push_str(&format!(" {} |", fmt(q.map(|q| q.0[d]))));
            }
            md.push('\n');
        }
        for (r, q) in runs.iter().zip(&quality) {
            if let Some((_, _, unparsed)) = q {
                if *unparsed > 0 {
                    md.push_str(&format!(
                        "\n{}: {unparsed} items had no usable judgement and are not in S_q.\n",
                        r.name
                    ));
                }
            }
        }
        md.push_str("\n![Quality by dimension](quality.png)\n");
    }
    md.push_str("\n## Repetition\n\n| run | mean seq-rep-4 | mean distinct-2 | longest repeat | degenerate items |\n|---|---:|---:|---:|---|\n");
    for (r, reps) in runs.iter().zip(&reps) {
        let n = reps.len().max(1) as f64;
        let deg: Vec<&str> = r
            .preds
            .iter()
            .zip(reps)
            .filter(|(_, x)| x.degenerate)
            .map(|(p, _)| p.id.as_str())
            .collect();
        md.push_str(&format!(
            "| {} | {:.3} | {:.3} | {} | {} |\n",
            r.name,
            reps.iter().map(|x| x.seq_rep_4).sum::<f64>() / n,
            reps.iter().map(|x| x.distinct_2).sum::<f64>() / n,
            reps.iter().map(|x| x.longest_repeat).max().unwrap_or(0),
            if deg.is_empty() {
                "none".to_string()
            } else {
                deg.join(", ")
            }
        ));
    }
    md.push_str("\n![Repetition by required length](repetition.png)\n");
    let path = out.join("report.md");
    lw_core::write_atomic(&path, md.as_bytes()).map_err(|e| ReportError::Write {
        path: e.path,
        reason: e.source.to_string(),
    })?;
    Ok(path)
}
