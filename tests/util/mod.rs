//! Shared helpers: repository paths, the reference outputs, running the real binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
pub mod broker;

use std::process::{Command, Output};

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn path(rel: &str) -> PathBuf {
    repo().join(rel)
}

/// The `edgemt` binary cargo built for these tests.
pub fn edgemt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgemt"))
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("edgemt runs");
    assert!(
        out.status.success(),
        "edgemt failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, which must fail; returns what it said on stderr.
pub fn run_fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("edgemt runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "edgemt succeeded; stderr:\n{err}");
    err
}

/// One model's entry in tests/data/models/reference.json (outputs computed by onnxruntime).
#[derive(serde::Deserialize)]
pub struct Reference {
    pub file: String,
    pub input_shape: Vec<usize>,
    pub output_name: String,
    pub inputs: Vec<Vec<f32>>,
    pub outputs: Vec<Vec<f32>>,
    #[serde(default)]
    pub embeddings: Vec<Vec<f32>>,
}

pub fn references() -> Vec<Reference> {
    references_in("tests/data/models/reference.json")
}

/// Reference outputs from another file of the same format as reference.json.
pub fn references_in(rel: &str) -> Vec<Reference> {
    #[derive(serde::Deserialize)]
    struct File {
        models: Vec<Reference>,
    }
    let text = std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_json::from_str::<File>(&text)
        .unwrap_or_else(|e| panic!("{rel} parses: {e}"))
        .models
}

/// The model at `rel`, loaded with its last `layers` learned layers trainable.
pub fn classifier_with_layers(rel: &str, layers: usize) -> edgemt::model::Classifier {
    let sel = edgemt::model::HeadSelection {
        trainable_layers: layers,
        ..Default::default()
    };
    edgemt::model::Classifier::load(&path(rel), &sel)
        .unwrap_or_else(|e| panic!("{rel} with {layers} trainable layer(s): {e}"))
}

/// The tools venv's Python (numpy, onnx, onnxruntime), if it is set up (tools/setup.sh).
pub fn venv_python() -> Option<PathBuf> {
    let p = path("tools/.venv/bin/python");
    p.exists().then_some(p)
}

/// Largest absolute difference between two equally long sequences.
pub fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.into_iter().copied().collect(),
        b.into_iter().copied().collect(),
    );
    assert_eq!(a.len(), b.len(), "compared sequences differ in length");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        // NaN must fail a tolerance check, not vanish in `max`.
        .map(|d| if d.is_nan() { f32::INFINITY } else { d })
        .fold(0.0, f32::max)
}

/// The first `n` lines of the shipped target stream (data/target_stream.jsonl), parsed.
pub fn stream(n: usize) -> Vec<serde_json::Value> {
    recording_lines("data/target_stream.jsonl")
        .into_iter()
        .take(n)
        .collect()
}

/// Every line of a JSON-lines file, parsed.
pub fn jsonl(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every line of a recording under the repository, parsed.
pub fn recording_lines(rel: &str) -> Vec<serde_json::Value> {
    jsonl(&path(rel))
}

/// (class, confidence) of a model's pretrained head on each flat sample, from the library:
/// the reference that the daemon's and replay's numbers are held to.
pub fn pretrained_predictions(model: &Path, samples: &[Vec<f32>]) -> Vec<(u64, f64)> {
    let c = edgemt::model::Classifier::load(model, &Default::default()).unwrap();
    let mut predictor = edgemt::session::Predictor::new(c.backbone.clone());
    let mut out = Vec::new();
    let flat: Vec<f32> = samples.concat();
    predictor.embed(&flat, samples.len(), None).unwrap();
    let pretrained = c.pretrained();
    predictor.answer(
        0..samples.len(),
        &edgemt::session::Models::pretrained(&pretrained),
        &mut out,
    );
    out.iter()
        .map(|a| {
            let p = a.expect("a usable embedding").served;
            (p.class as u64, p.confidence as f64)
        })
        .collect()
}

/// The pretrained model's accuracy on a recording's samples that carry a truth (or label).
pub fn pretrained_accuracy(rel: &str, key: &str) -> f64 {
    let lines: Vec<_> = recording_lines(rel)
        .into_iter()
        .filter(|l| l.get(key).is_some())
        .collect();
    let xs: Vec<Vec<f32>> = lines.iter().map(sample_x).collect();
    let predicted = pretrained_predictions(&path("models/hapt_mlp.onnx"), &xs);
    let correct = predicted
        .iter()
        .zip(&lines)
        .filter(|((class, _), l)| Some(*class) == l[key].as_u64())
        .count();
    correct as f64 / lines.len() as f64
}

/// A recording line's `x`, as the model's flat f32 input.
pub fn sample_x(sample: &serde_json::Value) -> Vec<f32> {
    sample["x"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The samples' inputs as the shipped model's sensor sends them: time-major rows of 6
/// channels, one sample after the other.
pub fn rows_of(samples: &[serde_json::Value]) -> Vec<Vec<f32>> {
    samples
        .iter()
        .flat_map(|s| {
            sample_x(s)
                .chunks(6)
                .map(<[f32]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The checkpoint store in `dir` for classifier `c` (default learning config), keeping `keep`.
pub fn checkpoint_store(
    dir: &Path,
    c: &edgemt::model::Classifier,
    keep: usize,
) -> edgemt::checkpoint::CheckpointStore {
    edgemt::checkpoint::CheckpointStore::open(
        dir,
        keep,
        edgemt::checkpoint::Identity::new(c, &Default::default()),
    )
    .unwrap()
}

/// A sample of the shipped stream as a sensor would send it: with `id`, without the truth.
pub fn sample_with_id(sample: &serde_json::Value, id: &str) -> String {
    let mut s = sample.clone();
    s["id"] = serde_json::Value::from(id);
    s.as_object_mut().unwrap().remove("truth");
    s.to_string()
}

/// A scratch directory removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Writes a config holding `[model] path` pointing at the shipped model plus `extra`.
pub fn config_with(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("edgemt.toml");
    let text = format!(
        "[model]\npath = {:?}\n{extra}",
        path("models/hapt_mlp.onnx").display().to_string()
    );
    std::fs::write(&p, text).expect("write config");
    p
}

/// The shipped model, loaded with automatic head detection.
pub fn shipped_classifier() -> edgemt::model::Classifier {
    edgemt::model::Classifier::load(&path("models/hapt_mlp.onnx"), &Default::default())
        .expect("shipped model loads")
}

/// A learner on the shipped model's pretrained head that steps on every sample.
pub fn stepping_learner(c: &edgemt::model::Classifier, ema_every: u64) -> edgemt::learn::Learner {
    learner_with(
        c,
        &edgemt::learn::LearnConfig {
            train_every: 1,
            ema_every,
            ..Default::default()
        },
    )
}

/// A learner on `c`'s pretrained head with `cfg`, default augmentation, gate and seed, and
/// the rollback guard and label trust off (these tests look at single steps, some with
/// labels on noise).
pub fn learner_with(
    c: &edgemt::model::Classifier,
    cfg: &edgemt::learn::LearnConfig,
) -> edgemt::learn::Learner {
    edgemt::learn::Learner::new(
        c.pretrained(),
        edgemt::stream::Layout::for_shape(&c.input_shape, None),
        cfg,
        &Default::default(),
        &edgemt::learn::GuardConfig {
            enabled: false,
            ..Default::default()
        },
        &Default::default(),
        &edgemt::learn::TrustConfig {
            enabled: false,
            ..Default::default()
        },
        0,
    )
}

/// Replays the shipped target stream with a config holding `extra` (after `[model] path`)
/// into a checkpoint directory in `dir`, then runs `edgemt export` on it without a config
/// (the manifest names the model); returns the checkpoint directory and the exported file.
pub fn replay_then_export(dir: &Path, extra: &str, export_args: &[&str]) -> (PathBuf, PathBuf) {
    let (ck, out, _) = replay_then_export_saying(dir, extra, export_args);
    (ck, out)
}

/// [`replay_then_export`], also returning what `edgemt export` printed.
pub fn replay_then_export_saying(
    dir: &Path,
    extra: &str,
    export_args: &[&str],
) -> (PathBuf, PathBuf, String) {
    let ck = dir.join("ck");
    let cfg = config_with(dir, extra);
    run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg(path("data/target_stream.jsonl"))
            .arg("--checkpoint")
            .arg(&ck),
    );
    let out = dir.join("adapted.onnx");
    let run = run_ok(
        edgemt()
            .args(["export", "--checkpoint"])
            .arg(&ck)
            .arg("-o")
            .arg(&out)
            .args(export_args),
    );
    (ck, out, String::from_utf8_lossy(&run.stdout).into_owned())
}

/// Runs `script` with `python` (tools/.venv's, which has numpy and onnxruntime) and `args`,
/// and returns what it printed, parsed as JSON; fails the test with Python's stderr if it
/// does not succeed.
pub fn python_json<T: serde::de::DeserializeOwned>(
    python: &Path,
    script: &str,
    args: &[&Path],
) -> T {
    let result = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        result.status.success(),
        "python (onnxruntime is installed by tools/setup.sh) failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    serde_json::from_slice(&result.stdout).expect("python printed JSON")
}

/// The targeted poisoner's label for line `i` of the shipped control recording (issue 17's
/// attack): every 5th line labeled, SITTING (3) and STANDING (4) swapped, the other classes
/// honest.
pub fn swapped_label(i: usize, truth: u64) -> Option<u64> {
    const SITTING: u64 = 3;
    const STANDING: u64 = 4;
    (i % 5 == 0).then_some(match truth {
        SITTING => STANDING,
        STANDING => SITTING,
        t => t,
    })
}
