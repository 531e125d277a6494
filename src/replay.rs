//! Prequential replay of a recording: predict each sample with the deployed teacher (and the
//! frozen pretrained head, for comparison), then hand it to the learner.
//!
//! The backbone is frozen, so a chunk of samples is embedded in one batched pass up front; the
//! teacher still predicts sample by sample, after every step that came before, which keeps
//! the evaluation strictly prequential.

use std::path::Path;
use std::time::Instant;

use ndarray::{s, Array2};
use serde::Serialize;

use crate::checkpoint::{CheckpointStore, Identity, Snapshot};
use crate::config::Config;
use crate::learn::head::argmax;
use crate::learn::{LearnError, Learner};
use crate::metrics::peak_rss_bytes;
use crate::model::{Classifier, ModelError};
use crate::stream::{Recording, RecordingError, Sample, SampleDecoder};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Recording(#[from] RecordingError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Learn(#[from] LearnError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("holdout {0} has no samples with \"truth\", so it cannot be scored")]
    NoTruth(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub samples: usize,
    pub labeled: usize,
    pub scored: usize,
    pub rejected: usize,
    pub prequential_accuracy: Accuracy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<Eval>,
    pub pseudo_labels: PseudoLabels,
    pub train_steps: u64,
    pub ema_updates: u64,
    pub teacher_version: u64,
    /// Times the rollback guard reverted to the last good teacher.
    pub rollbacks: u64,
    pub skipped_nonfinite: u64,
    /// The checkpoint this replay resumed from, if any (`--checkpoint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    pub checkpoints_written: u64,
    pub throughput_samples_per_s: f64,
    pub peak_rss_bytes: u64,
    pub seed: u64,
    pub timeline: Vec<TimelinePoint>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Accuracy {
    pub teacher: f64,
    pub source: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Eval {
    pub samples: usize,
    pub teacher_accuracy: f64,
    pub student_accuracy: f64,
    pub source_accuracy: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PseudoLabels {
    pub offered: u64,
    pub accepted: u64,
    /// Accepted pseudo-labels whose sample's truth was known and matched.
    pub accepted_correct: u64,
    /// Accepted pseudo-labels whose sample had a known truth.
    pub accepted_with_truth: u64,
}

/// One timeline entry: accuracies over the samples since the previous entry, and the mean
/// losses and acceptance over the steps taken in that span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimelinePoint {
    pub sample: usize,
    pub teacher_accuracy: f64,
    pub source_accuracy: f64,
    pub loss_sup: f64,
    pub loss_pseudo: f64,
    pub loss_consistency: f64,
    pub acceptance: f64,
}

#[derive(Default)]
struct Window {
    scored: usize,
    teacher_correct: usize,
    source_correct: usize,
    steps: usize,
    sup: f64,
    pseudo: f64,
    consistency: f64,
    offered: usize,
    accepted: usize,
}

impl Window {
    fn point(&self, sample: usize) -> TimelinePoint {
        let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mean = |v: f64| {
            if self.steps == 0 {
                0.0
            } else {
                v / self.steps as f64
            }
        };
        TimelinePoint {
            sample,
            teacher_accuracy: frac(self.teacher_correct, self.scored),
            source_accuracy: frac(self.source_correct, self.scored),
            loss_sup: mean(self.sup),
            loss_pseudo: mean(self.pseudo),
            loss_consistency: mean(self.consistency),
            acceptance: frac(self.accepted, self.offered),
        }
    }
}

/// The deployed teacher's prediction for one replayed sample, made before it learned from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub class: usize,
    pub confidence: f32,
}

/// What a replay leaves behind: the report, the final learner, and every prediction in order.
pub struct Outcome {
    pub report: Report,
    pub learner: Learner,
    pub predictions: Vec<Prediction>,
}

/// Options that do not belong in the config file.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Overrides `[replay] seed`.
    pub seed: Option<u64>,
    /// Resume from and save checkpoints in this directory.
    pub checkpoint: Option<std::path::PathBuf>,
}

/// Replays `recording` through a fresh learner and, with `holdout`, scores the final heads.
pub fn replay(
    classifier: &mut Classifier,
    cfg: &Config,
    recording: &Path,
    holdout: Option<&Path>,
    opts: &ReplayOptions,
    mut on_progress: impl FnMut(usize, usize),
) -> Result<Outcome, ReplayError> {
    let decoder = SampleDecoder::new(&classifier.input_shape, classifier.classes());
    let rec = Recording::read(recording, &decoder)?;
    for r in rec.rejected.iter().take(20) {
        tracing::warn!("{}:{}: skipped: {}", recording.display(), r.line, r.error);
    }
    if rec.rejected.len() > 20 {
        tracing::warn!(
            "{}: {} more bad lines skipped",
            recording.display(),
            rec.rejected.len() - 20
        );
    }
    let seed = opts.seed.unwrap_or(cfg.replay.seed);
    let pretrained = classifier.pretrained_head();
    let mut learner = Learner::new(
        pretrained,
        &classifier.input_shape,
        cfg.learn.clone(),
        cfg.augment.clone(),
        seed,
    )
    .with_guard(cfg.guard.clone());
    let mut train_backbone = classifier.backbone.clone();
    let mut store = match &opts.checkpoint {
        Some(dir) => Some(CheckpointStore::open(
            dir,
            cfg.checkpoint.keep,
            Identity::new(classifier, &cfg.learn),
        )?),
        None => None,
    };
    let restored_from = store
        .as_ref()
        .and_then(|s| s.restore_latest(&mut learner))
        .map(|r| r.name);
    let mut checkpoints_written = 0;

    let started = Instant::now();
    let n = rec.samples.len();
    let len = classifier.sample_len();
    let mut inputs = Vec::with_capacity(cfg.replay.batch * len);
    let mut emb = Array2::zeros((0, classifier.embedding_dim));
    let mut source_logits = Array2::zeros((0, classifier.classes()));
    let mut one = Array2::zeros((1, classifier.classes()));
    let mut predictions = Vec::with_capacity(n);

    let (mut scored, mut teacher_correct, mut source_correct) = (0usize, 0usize, 0usize);
    let mut pseudo = PseudoLabels::default();
    let mut window = Window::default();
    let mut timeline = Vec::new();
    for (chunk_index, chunk) in rec.samples.chunks(cfg.replay.batch).enumerate() {
        inputs.clear();
        chunk.iter().for_each(|s| inputs.extend_from_slice(&s.x));
        classifier
            .backbone
            .embed_into(&inputs, chunk.len(), &mut emb)?;
        learner.source.logits_into(emb.view(), &mut source_logits);
        for (i, sample) in chunk.iter().enumerate() {
            let done = chunk_index * cfg.replay.batch + i + 1;
            let row = emb.slice(s![i..i + 1, ..]);
            learner.teacher.probs_into(row, &mut one);
            let (teacher_class, confidence) = argmax(one.row(0));
            predictions.push(Prediction {
                class: teacher_class,
                confidence,
            });
            let source_class = argmax(source_logits.row(i)).0;
            if let Some(truth) = sample.truth {
                scored += 1;
                window.scored += 1;
                teacher_correct += (teacher_class == truth) as usize;
                source_correct += (source_class == truth) as usize;
                window.teacher_correct += (teacher_class == truth) as usize;
                window.source_correct += (source_class == truth) as usize;
            }
            learner.observe(&sample.x, emb.row(i), sample.label, sample.truth);
            if learner.due() {
                if let Some(step) = learner.step(&mut train_backbone)? {
                    if let Some(store) = store.as_mut() {
                        if learner.counters.train_steps % cfg.checkpoint.every_steps == 0 {
                            store.save(&Snapshot::of(&learner))?;
                            checkpoints_written += 1;
                        }
                    }
                    window.steps += 1;
                    window.sup += step.losses.sup as f64;
                    window.pseudo += step.losses.pseudo as f64;
                    window.consistency += step.losses.consistency as f64;
                    window.offered += step.offered;
                    window.accepted += step.accepted;
                    pseudo.offered += step.offered as u64;
                    pseudo.accepted += step.accepted as u64;
                    pseudo.accepted_correct += step.accepted_correct as u64;
                    pseudo.accepted_with_truth += step.accepted_with_truth as u64;
                }
            }
            if done % cfg.replay.timeline_every == 0 || done == n {
                timeline.push(window.point(done));
                window = Window::default();
            }
        }
        on_progress(chunk_index * cfg.replay.batch + chunk.len(), n);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(store) = store.as_mut() {
        store.save(&Snapshot::of(&learner))?;
        checkpoints_written += 1;
    }

    let eval = match holdout {
        Some(path) => Some(evaluate(classifier, &learner, path, cfg.replay.batch)?),
        None => None,
    };
    let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let report = Report {
        samples: n,
        labeled: rec.samples.iter().filter(|s| s.label.is_some()).count(),
        scored,
        rejected: rec.rejected.len(),
        prequential_accuracy: Accuracy {
            teacher: frac(teacher_correct, scored),
            source: frac(source_correct, scored),
        },
        eval,
        pseudo_labels: pseudo,
        train_steps: learner.counters.train_steps,
        ema_updates: learner.counters.ema_updates,
        teacher_version: learner.counters.teacher_version,
        rollbacks: learner.counters.rollbacks,
        restored_from,
        checkpoints_written,
        skipped_nonfinite: learner.counters.skipped_nonfinite,
        throughput_samples_per_s: if elapsed > 0.0 {
            n as f64 / elapsed
        } else {
            0.0
        },
        peak_rss_bytes: peak_rss_bytes(),
        seed,
        timeline,
    };
    Ok(Outcome {
        report,
        learner,
        predictions,
    })
}

/// Accuracy of the final teacher, student and pretrained heads on a labeled holdout.
pub fn evaluate(
    classifier: &mut Classifier,
    learner: &Learner,
    path: &Path,
    batch: usize,
) -> Result<Eval, ReplayError> {
    let decoder = SampleDecoder::new(&classifier.input_shape, classifier.classes());
    let rec = Recording::read(path, &decoder)?;
    let samples: Vec<&Sample> = rec.samples.iter().filter(|s| s.truth.is_some()).collect();
    if samples.is_empty() {
        return Err(ReplayError::NoTruth(path.display().to_string()));
    }
    let heads = [&learner.teacher, &learner.student, &learner.source];
    let mut correct = [0usize; 3];
    let mut inputs = Vec::new();
    let mut emb = Array2::zeros((0, classifier.embedding_dim));
    let mut logits = Array2::zeros((0, classifier.classes()));
    for chunk in samples.chunks(batch) {
        inputs.clear();
        chunk.iter().for_each(|s| inputs.extend_from_slice(&s.x));
        classifier
            .backbone
            .embed_into(&inputs, chunk.len(), &mut emb)?;
        for (h, head) in heads.iter().enumerate() {
            head.logits_into(emb.view(), &mut logits);
            for (row, s) in logits.rows().into_iter().zip(chunk) {
                correct[h] += (Some(argmax(row).0) == s.truth) as usize;
            }
        }
    }
    let n = samples.len() as f64;
    Ok(Eval {
        samples: samples.len(),
        teacher_accuracy: correct[0] as f64 / n,
        student_accuracy: correct[1] as f64 / n,
        source_accuracy: correct[2] as f64 / n,
    })
}
