//! `edgemt replay` end to end on the shipped model and recordings.

use std::path::Path;

use serde_json::Value;

use crate::util::{self, edgemt, run_ok};

pub(crate) fn replay(stream: &str, holdout: &str, extra_args: &[&str]) -> Value {
    let dir = util::tempdir();
    let report = dir.path().join("r.json");
    run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(util::path("config/edgemt.toml"))
            .arg(util::path(stream))
            .arg("--eval")
            .arg(util::path(holdout))
            .arg("--report")
            .arg(&report)
            .args(extra_args),
    );
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("report has no number at {path}"))
}

/// Measured (tools/eval/seeds.sh): the teacher +26.9 points (+26.6 ... +27.2 over seeds 0-9),
/// the served model +22.6 on every seed; fifteen points leaves room for other machines' float
/// order only.
#[test]
fn adaptation_on_the_shifted_target_beats_the_pretrained_model_by_fifteen_points() {
    let r = replay("data/target_stream.jsonl", "data/target_holdout.jsonl", &[]);
    let (teacher, served, source) = (
        f(&r, "/eval/teacher_accuracy"),
        f(&r, "/eval/served_accuracy"),
        f(&r, "/eval/source_accuracy"),
    );
    // The baseline itself is held to the library's prediction of each holdout sample.
    let pretrained = util::pretrained_accuracy("data/target_holdout.jsonl", "truth");
    assert!(
        (source - pretrained).abs() < 1e-6,
        "{source} vs {pretrained}"
    );
    assert!(
        teacher >= source + 0.15,
        "teacher {teacher} vs pretrained {source}"
    );
    assert!(
        served >= source + 0.15,
        "served {served} vs pretrained {source}"
    );
    // Calibration alone gives the served model its gain (the pretrained head on the adopted
    // axes); learning must add to it.
    assert!(teacher > served, "teacher {teacher} vs served {served}");
    assert!(f(&r, "/labeled") <= 0.05 * f(&r, "/samples"));
    assert!(f(&r, "/prequential_accuracy/teacher") > f(&r, "/prequential_accuracy/source"));
}

#[test]
fn adaptation_on_the_no_shift_control_costs_at_most_one_point() {
    let r = replay(
        "data/control_stream.jsonl",
        "data/control_holdout.jsonl",
        &[],
    );
    let (teacher, served, source) = (
        f(&r, "/eval/teacher_accuracy"),
        f(&r, "/eval/served_accuracy"),
        f(&r, "/eval/source_accuracy"),
    );
    assert!(
        teacher >= source - 0.01,
        "teacher {teacher} vs pretrained {source}"
    );
    assert!(served >= source, "served {served} vs pretrained {source}");
    // Not by doing nothing: the learner trained, its teacher moved away from the pretrained
    // model (the gate saw labels on which the two disagree) and the gate decided.
    assert!(f(&r, "/train_steps") > 100.0 && f(&r, "/teacher_version") > 100.0);
    assert!(
        f(&r, "/gate/wins") + f(&r, "/gate/losses") > 0.0,
        "the teacher and the pretrained model disagreed on some label"
    );
    assert_eq!(
        r["gate"]["serving"], "pretrained",
        "and the gate kept the safe one"
    );
}

#[test]
fn the_report_has_every_documented_field_with_sane_values() {
    let r = replay(
        "data/control_stream.jsonl",
        "data/control_holdout.jsonl",
        &["--seed", "3"],
    );
    for key in [
        "/samples",
        "/labeled",
        "/scored",
        "/rejected",
        "/prequential_accuracy/teacher",
        "/prequential_accuracy/source",
        "/eval/samples",
        "/eval/teacher_accuracy",
        "/eval/student_accuracy",
        "/eval/source_accuracy",
        "/pseudo_labels/offered",
        "/pseudo_labels/accepted",
        "/pseudo_labels/accepted_correct",
        "/train_steps",
        "/ema_updates",
        "/throughput_samples_per_s",
        "/peak_rss_bytes",
    ] {
        f(&r, key);
    }
    // Counts and the pretrained model's accuracies, held to the recordings themselves and to
    // the library's own prediction of each sample.
    let stream = util::recording_lines("data/control_stream.jsonl");
    let labeled = stream.iter().filter(|l| l.get("label").is_some()).count();
    let holdout = util::recording_lines("data/control_holdout.jsonl");
    assert_eq!(f(&r, "/samples"), stream.len() as f64);
    assert_eq!(f(&r, "/labeled"), labeled as f64);
    assert_eq!(f(&r, "/rejected"), 0.0);
    assert_eq!(f(&r, "/eval/samples"), holdout.len() as f64);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    let source = util::pretrained_accuracy("data/control_holdout.jsonl", "truth");
    assert!(close(f(&r, "/eval/source_accuracy"), source), "{source}");
    let prequential = util::pretrained_accuracy("data/control_stream.jsonl", "truth");
    assert!(
        close(f(&r, "/prequential_accuracy/source"), prequential),
        "{prequential}"
    );
    for acc in ["/prequential_accuracy/teacher", "/eval/teacher_accuracy"] {
        assert!((0.0..=1.0).contains(&f(&r, acc)), "{acc}");
    }
    assert_eq!(f(&r, "/samples"), f(&r, "/scored"));
    assert!(f(&r, "/pseudo_labels/accepted") <= f(&r, "/pseudo_labels/offered"));
    assert!(f(&r, "/pseudo_labels/accepted_correct") <= f(&r, "/pseudo_labels/accepted"));
    assert!(f(&r, "/train_steps") > 0.0 && f(&r, "/ema_updates") > 0.0);
    assert!(f(&r, "/peak_rss_bytes") > 1e6);
    let timeline = r["timeline"].as_array().expect("timeline");
    assert!(timeline.len() >= 5);
    // One point every `timeline_every` samples, and a last one at the end of the stream.
    let at: Vec<f64> = timeline.iter().map(|p| f(p, "/sample")).collect();
    let (every, last) = (at[0], at[at.len() - 1]);
    let regular = &at[..at.len() - 1];
    assert!(
        regular
            .iter()
            .enumerate()
            .all(|(i, &s)| s == every * (i + 1) as f64),
        "{at:?}"
    );
    assert_eq!(last, stream.len() as f64, "{at:?}");
    for key in [
        "/sample",
        "/teacher_accuracy",
        "/source_accuracy",
        "/loss_sup",
        "/loss_pseudo",
        "/loss_consistency",
        "/acceptance",
    ] {
        f(&timeline[0], key);
    }
}

/// Every field a report can carry, as dotted paths (`gate.p`, `timeline[].scored`); objects
/// inside arrays (`gate.switches`) and pairs are one field.
fn field_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    let Value::Object(map) = v else { return };
    for (k, v) in map {
        let path = format!("{prefix}{k}");
        match v {
            Value::Object(_) => field_paths(v, &format!("{path}."), out),
            Value::Array(items) if k == "timeline" => {
                field_paths(&items[0], &format!("{path}[]."), out)
            }
            _ => out.push(path),
        }
    }
}

/// The README's report-field table names every field of a report with every optional part
/// present (`--eval`, calibration, `--label-budget`, `--checkpoint` resumed from).
#[test]
fn the_readme_lists_every_field_of_the_replay_report() {
    let dir = util::tempdir();
    let ck = dir.path().join("ck");
    let args = [
        "--label-budget",
        "0.05",
        "--checkpoint",
        ck.to_str().unwrap(),
    ];
    replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &args,
    );
    let r = replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &args,
    );
    for optional in ["eval", "calibration", "requests", "restored_from"] {
        assert!(r.get(optional).is_some(), "{optional} is in this report");
    }
    let mut paths = Vec::new();
    field_paths(&r, "", &mut paths);
    let readme = std::fs::read_to_string(util::path("README.md")).unwrap();
    let table = readme
        .split("Report fields (`--report`")
        .nth(1)
        .and_then(|t| t.split("\n\n").nth(1))
        .expect("the README's report-field table");
    let missing: Vec<_> = paths
        .iter()
        .filter(|p| !table.contains(&format!("`{p}`")))
        .collect();
    assert!(missing.is_empty(), "not in the README's table: {missing:?}");
    assert!(paths.len() > 60, "{paths:?}");
}

#[test]
fn the_same_seed_gives_the_same_report_and_another_seed_a_different_run() {
    let a = replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &["--seed", "5"],
    );
    let b = replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &["--seed", "5"],
    );
    let c = replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &["--seed", "6"],
    );
    assert_eq!(a["timeline"], b["timeline"]);
    assert_eq!(a["eval"], b["eval"]);
    assert_ne!(a["timeline"], c["timeline"]);
}

#[test]
fn bad_lines_in_a_recording_are_counted_and_the_rest_replayed() {
    let dir = util::tempdir();
    let good = std::fs::read_to_string(util::path("data/control_stream.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(60).collect();
    lines.insert(10, "{not json");
    lines.insert(20, r#"{"x": [1, 2, 3]}"#);
    lines.insert(30, "");
    let rec = dir.path().join("damaged.jsonl");
    std::fs::write(&rec, lines.join("\n")).unwrap();
    let report = dir.path().join("r.json");
    let out = run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(util::config_with(dir.path(), ""))
            .arg(&rec)
            .arg("--report")
            .arg(&report),
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(f(&r, "/samples"), 60.0);
    assert_eq!(f(&r, "/rejected"), 2.0);
    assert!(r.get("eval").is_none(), "no --eval, no eval section");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("damaged.jsonl:11") && stderr.contains("damaged.jsonl:21"),
        "{stderr}"
    );
}

#[test]
fn a_bad_config_fails_with_the_key_in_the_message() {
    let dir = util::tempdir();
    let cfg = util::config_with(dir.path(), "[learn]\nema_decay = 2.0\n");
    let out = edgemt()
        .args(["replay", "--config"])
        .arg(cfg)
        .arg(util::path("data/control_stream.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("learn.ema_decay"), "{stderr}");
}

#[test]
fn replay_writes_one_prediction_per_sample_that_scores_as_the_report_says() {
    let dir = util::tempdir();
    let out = dir.path().join("p.jsonl");
    let predictions = out.to_str().unwrap().to_string();
    let r = replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &["--predictions", &predictions],
    );
    let truth: Vec<u64> = util::recording_lines("data/target_stream.jsonl")
        .iter()
        .map(|l| l["truth"].as_u64().unwrap())
        .collect();
    let lines = util::jsonl(&out);
    assert_eq!(lines.len() as f64, f(&r, "/samples"));
    let mut right = 0;
    for (i, p) in lines.iter().enumerate() {
        assert_eq!(p["sample"].as_u64(), Some(i as u64), "in stream order");
        let c = p["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c));
        right += (p["class"].as_u64().unwrap() == truth[i]) as usize;
    }
    let accuracy = right as f64 / lines.len() as f64;
    assert!(
        (accuracy - f(&r, "/prequential_accuracy/served")).abs() < 1e-9,
        "the written predictions are the served model's: {accuracy} vs {}",
        f(&r, "/prequential_accuracy/served")
    );
}

/// Replays `stream` with the shipped config plus `extra` TOML, writing predictions; returns
/// the report and the prediction lines.
fn replay_predictions(stream: &Path, extra: &str) -> (Value, Vec<Value>) {
    let dir = util::tempdir();
    let shipped = std::fs::read_to_string(util::path("config/edgemt.toml")).unwrap();
    let mut cfg: toml::Table = shipped.parse().unwrap();
    let overrides: toml::Table = extra.parse().unwrap();
    for (section, keys) in overrides {
        let table = cfg[&section].as_table_mut().unwrap();
        table.extend(keys.as_table().unwrap().clone());
    }
    for (key, file) in [
        ("path", "models/hapt_mlp.onnx"),
        ("reference", "models/hapt_mlp.embeddings.json"),
    ] {
        cfg["model"][key] = toml::Value::String(util::path(file).display().to_string());
    }
    let config = dir.path().join("edgemt.toml");
    std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
    let (report, out) = (dir.path().join("r.json"), dir.path().join("p.jsonl"));
    run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(&config)
            .arg(stream)
            .arg("--report")
            .arg(&report)
            .arg("--predictions")
            .arg(&out),
    );
    let r = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (r, util::jsonl(&out))
}

/// Which model the report says answered at 0-based sample `i`: a switch recorded at sample
/// count n takes effect from the n-th sample on.
fn serving_at(report: &Value, i: u64) -> String {
    report["gate"]["switches"]
        .as_array()
        .unwrap()
        .iter()
        .take_while(|s| s["sample"].as_u64().unwrap() <= i)
        .last()
        .map_or("pretrained".into(), |s| {
            s["serving"].as_str().unwrap().into()
        })
}

#[test]
fn where_the_gate_never_switches_every_written_prediction_is_the_pretrained_models_class_in_onnxruntime(
) {
    let stream = util::path("data/control_stream.jsonl");
    let (r, lines) = replay_predictions(&stream, "");
    assert_eq!(r["gate"]["switches"].as_array().unwrap().len(), 0);
    assert_eq!(r["calibration"]["adopted"], "x,y,z", "no mounting adopted");
    assert!(
        f(&r, "/train_steps") > 100.0,
        "the learner trained meanwhile"
    );

    // The same samples through onnxruntime: the pretrained model's own class, computed
    // without any of edgemt's code.
    let python = util::venv_python().unwrap_or_else(|| "python3".into());
    let inputs = util::tempdir();
    let xs: Vec<Value> = util::recording_lines("data/control_stream.jsonl")
        .into_iter()
        .map(|l| l["x"].clone())
        .collect();
    let file = inputs.path().join("x.json");
    std::fs::write(&file, serde_json::to_string(&xs).unwrap()).unwrap();
    let script = "import json, sys, numpy as np, onnxruntime as ort\n\
        s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
        x = np.array(json.load(open(sys.argv[2])), dtype=np.float32).reshape(-1, 64, 6)\n\
        print(json.dumps(s.run(['logits'], {'input': x})[0].argmax(axis=1).tolist()))\n";
    let model = util::path("models/hapt_mlp.onnx");
    let ort: Vec<u64> = util::python_json(&python, script, &[&model, &file]);

    assert_eq!(lines.len(), ort.len(), "one line per sample");
    for (i, (p, class)) in lines.iter().zip(&ort).enumerate() {
        assert_eq!(p["sample"].as_u64(), Some(i as u64));
        assert_eq!(p["serving"], "pretrained", "line {i}: {p}");
        assert_eq!(p["class"].as_u64(), Some(*class), "line {i}: {p}");
    }
}

#[test]
fn every_written_prediction_says_which_model_answered_and_the_served_model_is_what_was_written() {
    let stream = util::path("data/target_stream.jsonl");
    let truths: Vec<Value> = util::jsonl(&stream)
        .into_iter()
        .map(|l| l["truth"].clone())
        .collect();
    // As shipped (the gate decides), and with the gate off (the adapted teacher answers).
    let mut seen = std::collections::HashSet::new();
    for extra in ["", "[gate]\nenabled = false\n"] {
        let (report, lines) = replay_predictions(&stream, extra);
        assert_eq!(lines.len() as f64, f(&report, "/samples"));
        let mut right = 0;
        for (i, p) in lines.iter().enumerate() {
            let serving = p["serving"].as_str().expect("each line names its model");
            assert_eq!(serving, serving_at(&report, i as u64), "{extra} line {i}");
            seen.insert(serving.to_string());
            right += (p["class"] == truths[i]) as usize;
        }
        let served = right as f64 / lines.len() as f64;
        assert!(
            (served - f(&report, "/prequential_accuracy/served")).abs() < 1e-9,
            "{extra}: the written classes score as the served series"
        );
    }
    assert!(
        seen.contains("adapted") && seen.contains("pretrained"),
        "{seen:?}"
    );
}

#[test]
fn a_sample_the_device_would_refuse_is_refused_by_replay_too() {
    // 3e38 fits in f32 and passes max_abs raised to f32's range, yet the backbone turns it
    // into infinities: the daemon publishes nothing for it and learns nothing from it.
    let dir = util::tempdir();
    let rec = dir.path().join("r.jsonl");
    let mut text = String::new();
    for (i, line) in util::recording_lines("data/control_stream.jsonl")
        .into_iter()
        .take(60)
        .enumerate()
    {
        text.push_str(&format!("{line}\n"));
        if i % 20 == 0 {
            text.push_str(&format!(
                "{}\n",
                serde_json::json!({"x": vec![3e38_f64; 384], "truth": 1, "label": 1})
            ));
        }
    }
    std::fs::write(&rec, text).unwrap();
    let (r, lines) = replay_predictions(&rec, "[input]\nmax_abs = 3.4e38\n");
    assert_eq!(f(&r, "/samples"), 63.0);
    assert_eq!(f(&r, "/unembeddable"), 3.0);
    assert_eq!(lines.len(), 60, "no prediction for a refused sample");
    assert_eq!(f(&r, "/scored"), 60.0, "nor a score");
    assert_eq!(f(&r, "/skipped_nonfinite"), 0.0);
    let samples: Vec<u64> = lines
        .iter()
        .map(|p| p["sample"].as_u64().unwrap())
        .collect();
    for refused in [1, 22, 43] {
        assert!(!samples.contains(&refused), "sample {refused} was answered");
    }
}
