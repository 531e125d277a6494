//! `edgemt replay --plot`: draws a replay's [`Report`] as one SVG file. It owns the picture
//! and nothing else: every number it shows is read from the report (the timeline's
//! per-window accuracies and acceptance, smoothed over [`SMOOTHING_SAMPLES`], the sample
//! counts of rollbacks, gate switches and mounting adoptions, the holdout scores), so the plot
//! and the JSON cannot disagree. Models have the names the replay's summary gives them:
//! "pretrained model" (as shipped), "calibrated model" (the pretrained model behind the
//! adopted mounting), "adapted teacher". It uses plotters' SVG
//! backend without a font backend: text goes out as SVG `<text>` elements that the viewer
//! renders, and label sizes are estimated from the character count, so no system font is
//! read when drawing.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::learn::Serving;
use crate::replay::{Report, TimelinePoint};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing the plot")]
    Draw(#[from] DrawingAreaErrorKind<std::io::Error>),
    #[error("writing plot {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The plot's size in pixels: it fits a 1200 x 800 browser window.
pub const SIZE: (u32, u32) = (1200, 760);

/// Names of the curves and marks, as the legend and the holdout panel write them.
pub const TEACHER: &str = "adapted teacher";
pub const PRETRAINED: &str = "pretrained model";
/// The pretrained model behind the adopted mounting.
pub const CALIBRATED: &str = "calibrated model";
/// The pretrained curve's legend once a mounting is adopted: from the adoption's mark (a
/// line labelled in place, "mounting x,z,-y adopted at sample 256") the same series is the
/// calibrated model.
pub const PRETRAINED_THEN_CALIBRATED: &str = "pretrained, then calibrated";
pub const ACCEPTANCE: &str = "pseudo-label acceptance";
pub const ROLLBACK: &str = "rollback";
pub const SERVED_ADAPTED: &str = "gate serves the adapted teacher";

const TEACHER_COLOR: RGBColor = RGBColor(31, 119, 180);
const PRETRAINED_COLOR: RGBColor = RGBColor(255, 127, 14);
const ACCEPTANCE_COLOR: RGBColor = RGBColor(44, 160, 44);
const ROLLBACK_COLOR: RGBColor = RGBColor(214, 39, 40);
const SERVED_COLOR: RGBColor = RGBColor(148, 103, 189);
const MOUNTING_COLOR: RGBColor = RGBColor(140, 86, 75);
const CALIBRATED_COLOR: RGBColor = RGBColor(227, 119, 194);

/// Samples each plotted point averages over. One timeline window (25 samples by default)
/// holds one or two labels and a stretch of one activity, so its accuracy jumps by tens of
/// points from window to window; four windows show the trend.
pub const SMOOTHING_SAMPLES: usize = 100;
const FONT: &str = "sans-serif";

const TITLE_HEIGHT: u32 = 86;
const LEGEND_HEIGHT: u32 = 30;
const HOLDOUT_HEIGHT: u32 = 220;

/// Draws `report` (of a replay of the recording named `recording`) and writes it to `out`.
pub fn write_svg(report: &Report, recording: &str, out: &Path) -> Result<(), PlotError> {
    let svg = render_svg(report, recording)?;
    std::fs::write(out, svg).map_err(|source| PlotError::Write {
        path: out.display().to_string(),
        source,
    })
}

/// The plot of `report` as an SVG document.
pub fn render_svg(report: &Report, recording: &str) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let (title, rest) = root.split_vertically(TITLE_HEIGHT);
        draw_title(&title, report, recording)?;
        let (legend, rest) = rest.split_vertically(LEGEND_HEIGHT);
        draw_legend(&legend, report)?;
        match &report.eval {
            Some(eval) => {
                let height = rest.dim_in_pixel().1;
                let (timeline, holdout) = rest.split_vertically(height - HOLDOUT_HEIGHT);
                draw_timeline(&timeline, report)?;
                draw_holdout(&holdout, report, eval)?;
            }
            None => draw_timeline(&rest, report)?,
        }
        root.present()?;
    }
    Ok(svg)
}

fn pct(v: f64) -> String {
    format!("{:.1} %", 100.0 * v)
}

fn points(v: f64) -> String {
    format!("{:+.1} points", 100.0 * v)
}

fn text_style(size: u32, color: &RGBColor) -> TextStyle<'_> {
    (FONT, size).into_font().color(color)
}

fn draw_title<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    r: &Report,
    recording: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let a = &r.prequential_accuracy;
    let adopted = r.adopted_mounting();
    let baseline = match (adopted, first_adoption(r)) {
        (Some(m), Some(at)) => format!(
            "calibrated {} (the pretrained model, behind mounting {m} from sample {at})",
            pct(a.source)
        ),
        _ => format!("pretrained {}", pct(a.source)),
    };
    let mut lines = vec![
        (
            format!(
                "edgemt replay of {recording}: {} samples, {} labeled, seed {}",
                r.samples, r.labeled, r.seed
            ),
            22,
        ),
        (
            format!(
                "prequential accuracy: adapted teacher {} vs {baseline} ({}), served {}",
                pct(a.teacher),
                points(a.teacher - a.source),
                pct(a.served)
            ),
            16,
        ),
    ];
    let accepted = if r.pseudo_labels.offered > 0 {
        r.pseudo_labels.accepted as f64 / r.pseudo_labels.offered as f64
    } else {
        0.0
    };
    let serving = match (r.gate.serving, adopted) {
        (Serving::Pretrained, Some(_)) => "the calibrated model".to_string(),
        (serving, _) => serving.describe(None),
    };
    let mut third = format!(
        "pseudo-labels accepted {}, {} rollback(s), gate ends serving {serving}",
        pct(accepted),
        r.rollbacks_at.len()
    );
    if let Some(e) = &r.eval {
        third = format!(
            "holdout: served {} vs pretrained {} ({}); {third}",
            pct(e.served_accuracy),
            pct(e.source_accuracy),
            points(e.served_accuracy - e.source_accuracy)
        );
    }
    lines.push((third, 16));
    let mut y = 8;
    for (text, size) in lines {
        area.draw(&Text::new(text, (14, y), text_style(size, &BLACK)))?;
        y += size as i32 + 8;
    }
    Ok(())
}

/// What a legend entry's sample looks like.
enum Mark {
    Line(RGBColor),
    VerticalLine(RGBColor),
    Band(RGBColor),
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    r: &Report,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let rollbacks = format!("{ROLLBACK} ({})", r.rollbacks_at.len());
    let adopting = !adoptions(r).is_empty();
    let entries = [
        (Mark::Line(TEACHER_COLOR), TEACHER),
        (
            Mark::Line(PRETRAINED_COLOR),
            if adopting {
                PRETRAINED_THEN_CALIBRATED
            } else {
                PRETRAINED
            },
        ),
        (Mark::Line(ACCEPTANCE_COLOR), ACCEPTANCE),
        (Mark::VerticalLine(ROLLBACK_COLOR), rollbacks.as_str()),
        (Mark::Band(SERVED_COLOR), SERVED_ADAPTED),
    ];
    let style = text_style(15, &BLACK).pos(Pos::new(HPos::Left, VPos::Center));
    let (mut x, y) = (if adopting { 40 } else { 84 }, LEGEND_HEIGHT as i32 / 2);
    for (mark, label) in entries {
        // Each sample mark comes right before its label in the document.
        match mark {
            Mark::Line(c) => area.draw(&PathElement::new(
                vec![(x, y), (x + 26, y)],
                c.stroke_width(3),
            ))?,
            Mark::VerticalLine(c) => area.draw(&PathElement::new(
                vec![(x + 13, y - 9), (x + 13, y + 9)],
                c.stroke_width(2),
            ))?,
            Mark::Band(c) => area.draw(&Rectangle::new([(x, y - 8), (x + 26, y + 8)], band(c)))?,
        }
        area.draw(&Text::new(label, (x + 32, y), style.clone()))?;
        let (width, _) = area.estimate_text_size(label, &style)?;
        x += 32 + width as i32 + 22;
    }
    Ok(())
}

/// Changes of the adopted mounting: at which sample, to what.
fn adoptions(r: &Report) -> &[(usize, String)] {
    r.calibration
        .as_ref()
        .map_or(&[], |c| c.adoptions.as_slice())
}

fn first_adoption(r: &Report) -> Option<usize> {
    adoptions(r).first().map(|a| a.0)
}

/// `value` of each timeline point averaged, with `weight`, over the points of the
/// [`SMOOTHING_SAMPLES`] samples up to it; points of weight 0 (no truth in their window)
/// are left out, as their own values are not measurements.
fn smoothed(
    r: &Report,
    value: impl Fn(&TimelinePoint) -> f64,
    weight: impl Fn(&TimelinePoint) -> f64,
) -> Vec<(f64, f64)> {
    let t = &r.timeline;
    let mut out = Vec::with_capacity(t.len());
    let mut from = 0;
    for (i, p) in t.iter().enumerate() {
        if weight(p) <= 0.0 {
            continue;
        }
        while t[from].sample + SMOOTHING_SAMPLES <= p.sample {
            from += 1;
        }
        let (mut sum, mut total) = (0.0, 0.0);
        for q in &t[from..=i] {
            sum += weight(q) * value(q);
            total += weight(q);
        }
        out.push((p.sample as f64, sum / total));
    }
    out
}

fn band(c: RGBColor) -> ShapeStyle {
    c.mix(0.15).filled()
}

/// Spans of samples in which the gate served the adapted teacher.
fn adapted_spans(r: &Report) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut since = None;
    for switch in &r.gate.switches {
        match (switch.serving, since) {
            (Serving::Adapted, None) => since = Some(switch.sample),
            (Serving::Pretrained, Some(from)) => {
                spans.push((from, switch.sample));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(from) = since {
        spans.push((from, r.samples));
    }
    spans
}

fn draw_timeline<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    r: &Report,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let n = r.samples.max(1) as f64;
    let window = r.timeline.first().map_or(r.samples, |p| p.sample);
    let smoothing = SMOOTHING_SAMPLES.max(window);
    let mut chart = ChartBuilder::on(area)
        .margin_left(14)
        .margin_right(36)
        .margin_top(10)
        .margin_bottom(6)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .build_cartesian_2d(0.0..n, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "samples (each point: accuracy over the {smoothing} samples up to it, acceptance over their training steps; windows of {window})"
        ))
        .y_desc("accuracy, acceptance")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{:.0} %", 100.0 * v))
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;

    chart.draw_series(adapted_spans(r).into_iter().map(|(from, to)| {
        Rectangle::new([(from as f64, 0.0), (to as f64, 1.0)], band(SERVED_COLOR))
    }))?;
    chart.draw_series(LineSeries::new(
        smoothed(r, |p| p.acceptance, |_| 1.0),
        ACCEPTANCE_COLOR.stroke_width(2),
    ))?;
    // Spans without a `truth` have no accuracy (the report writes 0 there): left out, and
    // each window weighs by how many samples it scored.
    let scored = |p: &TimelinePoint| p.scored as f64;
    // Markers while the points are some 9 pixels apart or more; past that they only blur.
    let marker = if r.timeline.len() <= 120 { 4 } else { 0 };
    // The teacher's wider line goes under the pretrained one, so both show where they agree.
    chart.draw_series(
        LineSeries::new(
            smoothed(r, |p| p.teacher_accuracy, scored),
            TEACHER_COLOR.stroke_width(3),
        )
        .point_size(marker),
    )?;
    chart.draw_series(
        LineSeries::new(
            smoothed(r, |p| p.source_accuracy, scored),
            PRETRAINED_COLOR.stroke_width(2),
        )
        .point_size(marker.saturating_sub(1)),
    )?;
    chart.draw_series(r.rollbacks_at.iter().map(|&s| {
        PathElement::new(
            vec![(s as f64, 0.0), (s as f64, 1.0)],
            ROLLBACK_COLOR.stroke_width(2),
        )
    }))?;
    // The event behind a calibrated model's gain: where the mounting changed, named.
    let label = text_style(13, &MOUNTING_COLOR).pos(Pos::new(HPos::Left, VPos::Top));
    for (sample, mounting) in adoptions(r) {
        let x = *sample as f64;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, 0.0), (x, 1.0)],
            MOUNTING_COLOR.stroke_width(2),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!(" mounting {mounting} adopted at sample {sample}"),
            (x, 0.08),
            label.clone(),
        )))?;
    }
    Ok(())
}

fn draw_holdout<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    r: &Report,
    e: &crate::replay::Eval,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    // The served and adapted models see the holdout through the adopted mounting, the
    // pretrained baseline sees the device's own axes: say so when they differ.
    let mounting = r.adopted_mounting();
    let served = match (r.gate.serving, mounting) {
        (Serving::Adapted, _) => format!("served: {TEACHER}"),
        (Serving::Pretrained, None) => format!("served: {PRETRAINED}"),
        (Serving::Pretrained, Some(_)) => format!("served: {CALIBRATED}"),
    };
    let calibrated = mounting.map(|m| format!("{CALIBRATED} (axes {m})"));
    // Bottom to top.
    let mut bars = vec![
        (served.as_str(), e.served_accuracy, SERVED_COLOR),
        (TEACHER, e.teacher_accuracy, TEACHER_COLOR),
    ];
    if let Some(name) = &calibrated {
        bars.push((name.as_str(), e.calibrated_accuracy, CALIBRATED_COLOR));
    }
    bars.push((PRETRAINED, e.source_accuracy, PRETRAINED_COLOR));
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "holdout ({} samples): accuracy of the models at the end of the replay",
                e.samples
            ),
            (FONT, 16),
        )
        .margin_left(14)
        .margin_right(36)
        .margin_bottom(8)
        .x_label_area_size(28)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..1.0, (0..bars.len() - 1).into_segmented())?;
    let name = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => bars.get(*i).map_or("", |b| b.0).to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_label_formatter(&name)
        .x_label_formatter(&|v| format!("{:.0} %", 100.0 * v))
        .light_line_style(TRANSPARENT)
        .label_style((FONT, 14))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, v, c))| {
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (v, SegmentValue::Exact(i + 1)),
            ],
            c.filled(),
        );
        bar.set_margin(7, 7, 0, 0);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, &(_, v, _))| {
        // Inside the bar's end, or just past it when the bar is too short to hold it.
        let (dx, style) = if v >= 0.15 {
            (
                -8,
                text_style(15, &WHITE).pos(Pos::new(HPos::Right, VPos::Center)),
            )
        } else {
            (
                8,
                text_style(15, &BLACK).pos(Pos::new(HPos::Left, VPos::Center)),
            )
        };
        EmptyElement::at((v, SegmentValue::CenterOf(i))) + Text::new(pct(v), (dx, 0), style)
    }))?;
    Ok(())
}
