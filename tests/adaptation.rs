//! Adaptation you can trust, end to end through replay: mounting calibration undoes a
//! rotated or mirrored sensor exactly, adopts nothing on unshifted data, and its export
//! takes raw device data; the serving gate never serves a model that labels show worse.

use std::io::Write;
use std::path::{Path, PathBuf};

use edgemt::config::Config;
use edgemt::replay::{replay, ReplayOptions};
use serde_json::Value;

use crate::util::{self, tempdir, venv_python};

/// `rel` with every step's accelerometer turned by `r` and its gyroscope by det(r)·r
/// (an axial vector), as a sensor mounted that way would record it.
fn remounted(rel: &str, r: [[f32; 3]; 3], out: &Path) -> PathBuf {
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let text = std::fs::read_to_string(util::path(rel)).unwrap();
    let mut f = std::fs::File::create(out).unwrap();
    for line in text.lines() {
        let mut v: Value = serde_json::from_str(line).unwrap();
        let x: Vec<f32> = v["x"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_f64().unwrap() as f32)
            .collect();
        let mut y = x.clone();
        for (step, out) in x.chunks(6).zip(y.chunks_mut(6)) {
            for (group, sign) in [(0usize, 1.0f32), (3, det)] {
                for i in 0..3 {
                    out[group + i] = sign * (0..3).map(|j| r[i][j] * step[group + j]).sum::<f32>();
                }
            }
        }
        v["x"] = y.into();
        writeln!(f, "{v}").unwrap();
    }
    out.to_owned()
}

fn calibrated_config() -> Config {
    let mut cfg = Config::from_toml(
        "[model]\npath = \"m.onnx\"\n[calibration]\npolar = [[0, 1, 2]]\naxial = [[3, 4, 5]]\n",
    )
    .unwrap();
    cfg.model.path = util::path("models/hapt_mlp.onnx");
    cfg
}

fn run(cfg: &Config, stream: &Path, holdout: &Path, seed: u64) -> edgemt::replay::Report {
    let c = util::shipped_classifier();
    replay(
        &c,
        cfg,
        stream,
        Some(holdout),
        &ReplayOptions {
            seed: Some(seed),
            ..Default::default()
        },
        |_| {},
    )
    .unwrap()
    .report
}

const MIRROR_Y: [[f32; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]];

#[test]
fn a_mirrored_sensor_is_undone_exactly_by_the_adopted_mounting() {
    let dir = tempdir();
    let stream = remounted(
        "data/control_stream.jsonl",
        MIRROR_Y,
        &dir.path().join("s.jsonl"),
    );
    let holdout = remounted(
        "data/control_holdout.jsonl",
        MIRROR_Y,
        &dir.path().join("h.jsonl"),
    );
    let cfg = calibrated_config();
    let mirrored = run(&cfg, &stream, &holdout, 0);
    let unshifted = run(
        &cfg,
        &util::path("data/control_stream.jsonl"),
        &util::path("data/control_holdout.jsonl"),
        0,
    );
    let cal = mirrored.calibration.as_ref().expect("calibration report");
    // The mirror is its own inverse; the gyroscope's sign flip is what det(R) undoes.
    assert_eq!(cal.adopted, "x,-y,z", "{cal:?}");
    let (m, u) = (mirrored.eval.unwrap(), unshifted.eval.unwrap());
    assert!(
        m.source_accuracy < u.source_accuracy - 0.2,
        "the mirror hurts: {m:?}"
    );
    // Behind the adopted mounting the pretrained model sees exactly the unmirrored data.
    assert_eq!(mirrored.gate.serving, edgemt::learn::Serving::Pretrained);
    assert_eq!(m.served_accuracy, u.source_accuracy, "{m:?} vs {u:?}");
}

#[test]
fn on_unshifted_data_calibration_adopts_nothing_and_the_pretrained_model_is_kept() {
    let cfg = calibrated_config();
    for seed in [0, 1] {
        let r = run(
            &cfg,
            &util::path("data/control_stream.jsonl"),
            &util::path("data/control_holdout.jsonl"),
            seed,
        );
        let cal = r.calibration.as_ref().unwrap();
        assert_eq!((cal.adopted.as_str(), cal.changes), ("x,y,z", 0), "{cal:?}");
        let e = r.eval.unwrap();
        assert!(r.train_steps > 100, "the learner still trains");
        assert!(
            e.served_accuracy >= e.source_accuracy - 0.01,
            "seed {seed}: served {} vs pretrained {}",
            e.served_accuracy,
            e.source_accuracy
        );
    }
}

#[test]
fn on_the_shipped_rotated_target_the_served_model_beats_todays_adapted_teacher() {
    let cfg = calibrated_config();
    let r = run(
        &cfg,
        &util::path("data/target_stream.jsonl"),
        &util::path("data/target_holdout.jsonl"),
        0,
    );
    let cal = r.calibration.as_ref().unwrap();
    assert_eq!(
        cal.adopted, "x,z,-y",
        "undoes the 90° turn about x: {cal:?}"
    );
    assert!(
        cal.proposals >= cal.changes,
        "every adoption was proposed: {cal:?}"
    );
    let e = r.eval.unwrap();
    assert!(e.served_accuracy >= 0.833, "{e:?}");
    assert!(e.served_accuracy > e.source_accuracy + 0.2, "{e:?}");
}

#[test]
fn a_calibrated_export_takes_raw_device_data_and_matches_in_onnxruntime() {
    let said = calibrated_export_matches_in_onnxruntime(&["--teacher"], true);
    assert!(
        said.contains("the adapted teacher (--teacher; the device serves the calibrated model"),
        "{said}"
    );
}

/// On the target stream the gate ends serving the pretrained model behind the adopted
/// mounting (the few labels left do not confirm the teacher): that is what `edgemt export`
/// writes by default, and it says so.
#[test]
fn an_export_where_the_gate_serves_the_pretrained_model_writes_the_calibrated_model_and_says_so() {
    let said = calibrated_export_matches_in_onnxruntime(&[], false);
    assert!(
        said.contains(
            "the served model, the calibrated model (the pretrained model behind mounting x,z,-y), \
             because the serving gate has not confirmed that the adapted teacher is better"
        ),
        "{said}"
    );
    assert!(
        said.contains("--teacher writes the adapted teacher"),
        "{said}"
    );
}

/// Replays the target stream with calibration, exports with `export_args`, and checks in
/// onnxruntime on raw (rotated) samples that the file is the checkpoint's teacher (or, with
/// `teacher` false, the pretrained model) behind the adopted mounting. Returns what
/// `edgemt export` printed.
fn calibrated_export_matches_in_onnxruntime(export_args: &[&str], teacher: bool) -> String {
    let dir = tempdir();
    let (ck, out, said) = util::replay_then_export_saying(
        dir.path(),
        "[calibration]\npolar = [[0, 1, 2]]\naxial = [[3, 4, 5]]\n",
        export_args,
    );
    // In memory: the checkpoint's model behind its mounting, on raw (rotated) samples.
    let mut c = util::shipped_classifier();
    let store = util::checkpoint_store(&ck, &c, 5);
    let (m, state) = store.latest_valid().unwrap();
    let rec = m.mounting.expect("a mounting was adopted");
    assert_eq!(rec.name, "x,z,-y");
    let adapted = c.pretrained().with_params(state.teacher).unwrap();
    let other = if teacher {
        c.pretrained()
    } else {
        adapted.clone()
    };
    let model = if teacher { adapted } else { c.pretrained() };
    let mounting = edgemt::calibration::Mounting::new(
        &calibrated_config().calibration,
        edgemt::stream::Layout::for_shape(&c.input_shape, None),
        rec.r,
    );
    let text = std::fs::read_to_string(util::path("data/target_stream.jsonl")).unwrap();
    let raw: Vec<Vec<f32>> = text
        .lines()
        .take(16)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["x"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let mut mounted = vec![0.0; raw.len() * 384];
    for (x, o) in raw.iter().zip(mounted.chunks_mut(384)) {
        mounting.apply(x, o);
    }
    let emb = c.backbone.embed(&mounted, raw.len()).unwrap();
    let expected = model.logits(emb.view());

    let python = venv_python().expect("tools/.venv (tools/setup.sh makes it)");
    let inputs = dir.path().join("raw.json");
    std::fs::write(&inputs, serde_json::to_string(&raw).unwrap()).unwrap();
    let script = "import json, sys, numpy as np, onnxruntime as ort\n\
        s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
        x = np.array(json.load(open(sys.argv[2])), dtype=np.float32).reshape(-1, 64, 6)\n\
        meta = s.get_modelmeta().custom_metadata_map\n\
        print(json.dumps({'logits': s.run(['logits'], {'input': x})[0].tolist(), 'mounting': meta.get('edgemt.mounting')}))\n";
    let got: Value = util::python_json(&python, script, &[&out, &inputs]);
    assert_eq!(got["mounting"], "x,z,-y");
    let ort: Vec<f32> = got["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let diff = ort
        .iter()
        .zip(expected.iter())
        .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        diff < 1e-5,
        "onnxruntime on raw data vs the expected model behind the mounting: {diff}"
    );
    // And the mounting matters: without it the model's answers differ.
    let plain = model.logits(c.backbone.embed(&raw.concat(), raw.len()).unwrap().view());
    assert!(plain
        .iter()
        .zip(expected.iter())
        .any(|(a, b)| (a - b).abs() > 1e-2));
    // And the choice matters: the other model's answers differ too.
    let others = other.logits(emb.view());
    assert!(others
        .iter()
        .zip(expected.iter())
        .any(|(a, b)| (a - b).abs() > 1e-2));
    said
}
