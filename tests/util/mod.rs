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
    #[derive(serde::Deserialize)]
    struct File {
        models: Vec<Reference>,
    }
    let text =
        std::fs::read_to_string(path("tests/data/models/reference.json")).expect("reference.json");
    serde_json::from_str::<File>(&text)
        .expect("reference.json parses")
        .models
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
    let cfg = edgemt::learn::LearnConfig {
        train_every: 1,
        ema_every,
        ..Default::default()
    };
    edgemt::learn::Learner::new(
        c.pretrained(),
        edgemt::stream::Layout::for_shape(&c.input_shape, None),
        &cfg,
        &Default::default(),
        &edgemt::learn::GuardConfig {
            enabled: false,
            ..Default::default()
        },
        0,
    )
}
