//! `edgemt replay --plot`: the SVG is well-formed XML, and what it draws is the report's
//! numbers, placed on the axes it labels.

use std::path::Path;
use std::sync::OnceLock;

use edgemt::learn::Serving;
use edgemt::replay::{
    GateReport, PrequentialAccuracy, PseudoLabels, Report, Switch, TimelinePoint,
};
use roxmltree::{Document, Node};
use serde_json::Value;

use crate::util::{self, edgemt, run_ok};

struct Replayed {
    report: Value,
    svg: String,
}

fn replay_with_plot(recording: &Path, holdout: Option<&str>) -> Replayed {
    let dir = util::tempdir();
    let (report, plot) = (dir.path().join("r.json"), dir.path().join("timeline.svg"));
    let mut cmd = edgemt();
    cmd.args(["replay", "--config"])
        .arg(util::path("config/edgemt.toml"))
        .arg(recording)
        .arg("--report")
        .arg(&report)
        .arg("--plot")
        .arg(&plot);
    if let Some(holdout) = holdout {
        cmd.arg("--eval").arg(util::path(holdout));
    }
    run_ok(&mut cmd);
    Replayed {
        report: serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap(),
        svg: std::fs::read_to_string(&plot).expect("--plot wrote the SVG"),
    }
}

/// The shipped target stream with its holdout, replayed once for the tests that read it.
fn target() -> &'static Replayed {
    static TARGET: OnceLock<Replayed> = OnceLock::new();
    TARGET.get_or_init(|| {
        replay_with_plot(
            &util::path("data/target_stream.jsonl"),
            Some("data/target_holdout.jsonl"),
        )
    })
}

fn parse(svg: &str) -> Document<'_> {
    Document::parse(svg).expect("the plot is well-formed XML")
}

fn text<'a>(n: Node<'a, '_>) -> &'a str {
    n.text().unwrap_or("").trim()
}

fn texts<'a, 'i>(doc: &'a Document<'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    doc.descendants().filter(|n| n.has_tag_name("text"))
}

fn attr(n: Node, name: &str) -> f64 {
    n.attribute(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("<{}> has no number {name}", n.tag_name().name()))
}

fn pct(v: f64) -> String {
    format!("{:.1} %", 100.0 * v)
}

fn num(v: &Value) -> f64 {
    v.as_f64().expect("a number in the report")
}

/// The colour of the legend entry whose label starts with `name`: its sample mark comes
/// right before the label.
fn legend_color(doc: &Document, name: &str) -> String {
    let label = texts(doc)
        .find(|t| text(*t).starts_with(name))
        .unwrap_or_else(|| panic!("the legend names {name:?}"));
    let mark = label
        .prev_sibling_element()
        .expect("a mark before the label");
    mark.attribute("stroke")
        .filter(|&s| s != "none")
        .or(mark.attribute("fill"))
        .expect("a coloured mark")
        .to_string()
}

fn points(polyline: Node) -> Vec<(f64, f64)> {
    polyline
        .attribute("points")
        .expect("points")
        .split_whitespace()
        .map(|p| {
            let (x, y) = p.split_once(',').expect("x,y");
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect()
}

/// The curve drawn in the colour of the legend entry `name` (the legend's own mark is a
/// two-point line).
fn curve(doc: &Document, name: &str) -> Vec<(f64, f64)> {
    let color = legend_color(doc, name);
    let curves: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(&color))
        .map(points)
        .filter(|p| p.len() > 2)
        .collect();
    assert_eq!(curves.len(), 1, "one curve for {name}");
    curves.into_iter().next().unwrap()
}

/// A linear axis, from two of its labelled ticks.
struct Axis {
    value: (f64, f64),
    px: (f64, f64),
}

impl Axis {
    fn px(&self, v: f64) -> f64 {
        self.px.0 + (v - self.value.0) * (self.px.1 - self.px.0) / (self.value.1 - self.value.0)
    }
}

fn tick<'a, 'i>(doc: &'a Document<'i>, label: &str, anchor: &str) -> Node<'a, 'i> {
    let found: Vec<_> = texts(doc)
        .filter(|t| text(*t) == label && t.attribute("text-anchor") == Some(anchor))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one tick labelled {label:?} anchored {anchor}"
    );
    found[0]
}

/// The timeline's vertical axis: percent labels right-aligned at their tick's height.
fn timeline_y(doc: &Document) -> Axis {
    let (zero, full) = (tick(doc, "0 %", "end"), tick(doc, "100 %", "end"));
    Axis {
        value: (0.0, 1.0),
        px: (attr(zero, "y"), attr(full, "y")),
    }
}

/// The timeline's horizontal axis: sample counts centred under their tick.
fn timeline_x(doc: &Document) -> Axis {
    let samples: Vec<(f64, f64)> = texts(doc)
        .filter(|t| t.attribute("text-anchor") == Some("middle"))
        .filter_map(|t| text(t).parse::<f64>().ok().map(|v| (v, attr(t, "x"))))
        .collect();
    let first = samples
        .iter()
        .copied()
        .find(|s| s.0 == 0.0)
        .expect("tick 0");
    let last = samples
        .iter()
        .copied()
        .fold(first, |a, s| if s.0 > a.0 { s } else { a });
    Axis {
        value: (first.0, last.0),
        px: (first.1, last.1),
    }
}

fn assert_near(px: f64, want: f64, what: &str) {
    assert!(
        (px - want).abs() <= 1.0,
        "{what}: drawn at {px}, the report puts it at {want:.1}"
    );
}

#[test]
fn the_default_timeline_has_a_point_every_25_samples_and_one_at_the_end() {
    let timeline = target().report["timeline"].as_array().unwrap();
    let samples: Vec<u64> = timeline
        .iter()
        .map(|p| p["sample"].as_u64().unwrap())
        .collect();
    let mut expected: Vec<u64> = (1..=30).map(|k| 25 * k).collect();
    expected.push(771);
    assert_eq!(samples, expected);
    assert!(timeline.iter().all(|p| p["scored"].as_u64().unwrap() > 0));
}

/// The report's `key` at timeline point `i`, averaged over the windows of the 100 samples up
/// to it, each weighted by the samples it scored (accuracies) or equally (acceptance).
fn smoothed_at(timeline: &[Value], i: usize, key: &str) -> f64 {
    let at = num(&timeline[i]["sample"]);
    let (mut sum, mut total) = (0.0, 0.0);
    for p in &timeline[..=i] {
        if num(&p["sample"]) + 100.0 > at {
            let w = if key == "acceptance" {
                1.0
            } else {
                num(&p["scored"])
            };
            sum += w * num(&p[key]);
            total += w;
        }
    }
    sum / total
}

#[test]
fn the_plot_draws_each_timeline_window_smoothed_over_100_samples_where_the_report_puts_it() {
    let r = target();
    let doc = parse(&r.svg);
    let timeline = r.report["timeline"].as_array().unwrap();
    let (x, y) = (timeline_x(&doc), timeline_y(&doc));
    for (name, key) in [
        ("adapted teacher", "teacher_accuracy"),
        ("pretrained, then calibrated", "source_accuracy"),
        ("pseudo-label acceptance", "acceptance"),
    ] {
        let curve = curve(&doc, name);
        assert_eq!(curve.len(), timeline.len(), "{name}: one point per window");
        for (i, (&(px, py), p)) in curve.iter().zip(timeline).enumerate() {
            let what = format!("{name} at sample {}", p["sample"]);
            assert_near(px, x.px(num(&p["sample"])), &what);
            assert_near(py, y.px(smoothed_at(timeline, i, key)), &what);
        }
    }
    // Smoothing shows: a raw window differs from its smoothed point somewhere by over 5 points.
    assert!((0..timeline.len()).any(|i| {
        (smoothed_at(timeline, i, "teacher_accuracy") - num(&timeline[i]["teacher_accuracy"])).abs()
            > 0.05
    }));
    let last = timeline.len() - 1;
    let teacher_end = *curve(&doc, "adapted teacher").last().unwrap();
    assert_near(
        teacher_end.1,
        y.px(smoothed_at(timeline, last, "teacher_accuracy")),
        "the teacher's last point",
    );
    assert_near(
        teacher_end.0,
        x.px(num(&r.report["samples"])),
        "the last sample",
    );
}

#[test]
fn the_plot_is_titled_with_the_recording_and_the_reports_accuracies() {
    let r = target();
    let doc = parse(&r.svg);
    let lines: Vec<&str> = texts(&doc).map(text).collect();
    assert!(
        lines[0].starts_with("edgemt replay of target_stream.jsonl: 771 samples, 38 labeled"),
        "{}",
        lines[0]
    );
    let a = &r.report["prequential_accuracy"];
    // The shipped config adopts x,z,-y at sample 256: the baseline is the calibrated model.
    let prequential = format!(
        "prequential accuracy: adapted teacher {} vs calibrated {} (the pretrained model, behind mounting x,z,-y from sample 256)",
        pct(num(&a["teacher"])),
        pct(num(&a["source"]))
    );
    assert!(lines[1].starts_with(&prequential), "{}", lines[1]);
    let e = &r.report["eval"];
    let holdout = format!(
        "holdout: served {} vs pretrained {}",
        pct(num(&e["served_accuracy"])),
        pct(num(&e["source_accuracy"]))
    );
    assert!(lines[2].starts_with(&holdout), "{}", lines[2]);
    assert!(lines[2].contains("0 rollback(s)"), "{}", lines[2]);
    assert!(
        lines[2].ends_with("gate ends serving the calibrated model"),
        "{}",
        lines[2]
    );
}

/// The event behind the calibrated model's gain is on the timeline: a line at the sample the
/// report says, labelled with the mounting.
#[test]
fn the_adopted_mounting_is_marked_where_the_report_says_it_was_adopted() {
    let r = target();
    let doc = parse(&r.svg);
    let adoptions = r.report["calibration"]["adoptions"].as_array().unwrap();
    assert_eq!(adoptions.len(), 1, "{adoptions:?}");
    let (sample, mounting) = (num(&adoptions[0][0]), adoptions[0][1].as_str().unwrap());
    let label = format!("mounting {mounting} adopted at sample {sample}");
    let found = texts(&doc)
        .find(|t| text(*t) == label)
        .unwrap_or_else(|| panic!("a label {label:?}"));
    let x = timeline_x(&doc);
    assert_near(
        attr(found, "x"),
        x.px(sample),
        "the label starts at the line",
    );
    let color = found
        .attribute("fill")
        .or(found.attribute("color"))
        .unwrap();
    let y = timeline_y(&doc);
    let lines: Vec<Vec<(f64, f64)>> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(color))
        .map(points)
        .filter(|p| p.len() == 2 && p[0].0 == p[1].0)
        .collect();
    assert_eq!(lines.len(), 1, "one line per adoption");
    assert_near(lines[0][0].0, x.px(sample), "the adoption's line");
    assert_near(lines[0][0].1, y.px(0.0), "from 0");
    assert_near(lines[0][1].1, y.px(1.0), "to 100 %");
}

#[test]
fn the_holdout_panel_has_a_bar_per_model_as_long_as_its_accuracy() {
    let r = target();
    let doc = parse(&r.svg);
    let e = &r.report["eval"];
    let x = Axis {
        value: (0.0, 1.0),
        px: (
            attr(tick(&doc, "0 %", "middle"), "x"),
            attr(tick(&doc, "100 %", "middle"), "x"),
        ),
    };
    // Solid bars, top to bottom; the other rectangles are the background and light bands.
    let mut bars: Vec<Node> = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("opacity") == Some("1"))
        .filter(|n| n.attribute("fill") != Some("#FFFFFF"))
        .collect();
    bars.sort_by(|a, b| attr(*a, "y").total_cmp(&attr(*b, "y")));
    // The served model, and the mounting it sees the holdout through when that is not the
    // device's own axes.
    assert_eq!(r.report["calibration"]["adopted"], "x,z,-y");
    assert_eq!(r.report["gate"]["serving"], "pretrained");
    let expected = [
        ("pretrained model", "source_accuracy"),
        ("calibrated model (axes x,z,-y)", "calibrated_accuracy"),
        ("adapted teacher", "teacher_accuracy"),
        ("served: calibrated model", "served_accuracy"),
    ];
    assert_eq!(bars.len(), expected.len());
    let labels: Vec<&str> = texts(&doc).map(text).collect();
    for (bar, (name, key)) in bars.iter().zip(expected) {
        let v = num(&e[key]);
        assert!(labels.contains(&name), "a bar labelled {name:?}");
        assert!(labels.contains(&pct(v).as_str()), "{name} reads {}", pct(v));
        assert_near(attr(*bar, "x"), x.px(0.0), name);
        assert_near(attr(*bar, "x") + attr(*bar, "width"), x.px(v), name);
    }
    for (bar, name) in bars
        .iter()
        .zip([
            "pretrained, then calibrated",
            "calibrated model",
            "adapted teacher",
        ])
        .filter(|(_, name)| *name != "calibrated model")
    {
        assert_eq!(
            bar.attribute("fill"),
            Some(legend_color(&doc, name).as_str())
        );
    }
}

#[test]
fn rollbacks_are_drawn_where_the_report_says_they_happened_and_no_holdout_without_eval() {
    let dir = util::tempdir();
    let misleading = dir.path().join("misleading.jsonl");
    crate::rollback::misleading_recording(&misleading);
    let r = replay_with_plot(&misleading, None);
    let at: Vec<f64> = r.report["rollbacks_at"]
        .as_array()
        .unwrap()
        .iter()
        .map(num)
        .collect();
    assert!(
        !at.is_empty(),
        "the misleading stretch makes the guard roll back"
    );
    let doc = parse(&r.svg);
    let (x, y) = (timeline_x(&doc), timeline_y(&doc));
    let color = legend_color(&doc, "rollback");
    let lines: Vec<Vec<(f64, f64)>> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some(&color))
        .map(points)
        .filter(|p| p.len() == 2 && p[0].0 == p[1].0 && p[0].1 == y.px(0.0).round())
        .collect();
    assert_eq!(lines.len(), at.len(), "one line per rollback");
    for (line, sample) in lines.iter().zip(&at) {
        let what = format!("rollback at {sample}");
        assert_near(line[0].0, x.px(*sample), &what);
        assert_near(line[1].1, y.px(1.0), &what);
    }
    let labels: Vec<&str> = texts(&doc).map(text).collect();
    assert!(labels.contains(&format!("rollback ({})", at.len()).as_str()));
    assert!(labels[2].contains(&format!("{} rollback(s)", at.len())));
    assert!(!labels.iter().any(|l| l.contains("holdout")));
}

/// A report of 100 samples with 10-sample windows, the 5th without truth.
fn synthetic_report(switches: &[(usize, Serving)], rollbacks_at: Vec<usize>) -> Report {
    let timeline = (1..=10)
        .map(|k| TimelinePoint {
            sample: 10 * k,
            scored: if k == 5 { 0 } else { 10 },
            teacher_accuracy: if k == 5 { 0.0 } else { 0.5 + 0.04 * k as f64 },
            source_accuracy: if k == 5 { 0.0 } else { 0.5 },
            acceptance: 0.08 * k as f64,
            ..TimelinePoint::default()
        })
        .collect();
    Report {
        samples: 100,
        labeled: 5,
        feedback: 0,
        late_labels: 0,
        feedback_accuracy: 0.0,
        scored: 90,
        rejected: 0,
        unembeddable: 0,
        prequential_accuracy: PrequentialAccuracy::default(),
        eval: None,
        pseudo_labels: PseudoLabels::default(),
        train_steps: 20,
        ema_updates: 20,
        teacher_version: 20,
        rollbacks: rollbacks_at.len() as u64,
        rollbacks_at,
        skipped_nonfinite: 0,
        gate: GateReport {
            serving: switches.last().map_or(Serving::Pretrained, |s| s.1),
            wins: 0,
            losses: 0,
            p: 1.0,
            reason: String::new(),
            switches: switches
                .iter()
                .map(|&(sample, serving)| Switch { sample, serving })
                .collect(),
        },
        calibration: None,
        restored_from: None,
        checkpoints_written: 0,
        checkpoint_bytes_written: 0,
        throughput_samples_per_s: 0.0,
        peak_rss_bytes: 0,
        seed: 0,
        timeline,
        requests: None,
        trust: edgemt::replay::TrustReport {
            counts: Default::default(),
            holding: 0,
            disputed: None,
            inputs_atypical: None,
        },
    }
}

#[test]
fn windows_without_truth_have_no_accuracy_point_but_keep_their_acceptance() {
    let svg = edgemt::plot::render_svg(&synthetic_report(&[], vec![]), "synthetic.jsonl").unwrap();
    let doc = parse(&svg);
    let (x, y) = (timeline_x(&doc), timeline_y(&doc));
    let teacher = curve(&doc, "adapted teacher");
    assert_eq!(teacher.len(), 9);
    assert!(teacher.iter().all(|p| (p.0 - x.px(50.0)).abs() > 1.0));
    // Smoothed over 100 samples, i.e. every window so far here, weighted by what each
    // scored: windows 1-4 and 6 (the 5th scored nothing).
    assert_near(
        teacher[4].1,
        y.px(0.5 + 0.04 * (1.0 + 2.0 + 3.0 + 4.0 + 6.0) / 5.0),
        "the window after the gap",
    );
    assert_eq!(curve(&doc, "pretrained model").len(), 9);
    assert_eq!(curve(&doc, "pseudo-label acceptance").len(), 10);
}

#[test]
fn spans_in_which_the_gate_served_the_adapted_teacher_are_shaded() {
    let report = synthetic_report(
        &[
            (30, Serving::Adapted),
            (60, Serving::Pretrained),
            (85, Serving::Adapted),
        ],
        vec![],
    );
    let svg = edgemt::plot::render_svg(&report, "synthetic.jsonl").unwrap();
    let doc = parse(&svg);
    let x = timeline_x(&doc);
    let color = legend_color(&doc, "gate serves the adapted teacher");
    let legend_mark = texts(&doc)
        .find(|t| text(*t) == "gate serves the adapted teacher")
        .and_then(|t| t.prev_sibling_element())
        .unwrap();
    let bands: Vec<(f64, f64)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(&color))
        .filter(|n| *n != legend_mark)
        .map(|n| (attr(n, "x"), attr(n, "x") + attr(n, "width")))
        .collect();
    assert_eq!(bands.len(), 2, "{bands:?}");
    for ((from, to), (a, b)) in bands.iter().zip([(30.0, 60.0), (85.0, 100.0)]) {
        assert_near(*from, x.px(a), "band start");
        assert_near(*to, x.px(b), "band end");
    }
}
