//! Prequential replay of a recording through a [`Session`]: answer each sample through the
//! daemon's prediction path ([`Predictor`]: the model the serving gate lets answer, which is
//! what the device would have published), score that answer and, as their own series, the
//! adapted teacher's and the pretrained model's, then hand the sample to [`Session::take`],
//! the same loop body the daemon's training thread runs.
//!
//! The recording is streamed: up to `[replay] batch` lines are read and validated at a time
//! and their samples embedded in one backbone pass, so memory does not grow with the
//! recording's length. The models still answer sample by sample, after every step that came
//! before, which keeps the evaluation strictly prequential. Feedback lines
//! (`{"id": ..., "label": k}`) label an earlier sample after the fact, like the daemon's
//! labels topic, and are scored against the answer the device gave.

use std::path::Path;
use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use crate::calibration::SignedPerm;
use crate::checkpoint::lock::{InstanceError, InstanceLock};
use crate::checkpoint::{CheckpointError, CheckpointStore, CheckpointWriter, Identity};
use crate::config::Config;
use crate::learn::requests::{RequestConfig, RequestCounts};
use crate::learn::trust::TrustCounts;
use crate::learn::{EmbeddingReference, Serving};
use crate::metrics::peak_rss_bytes;
use crate::model::{Classifier, ModelError};
use crate::nn::{Mlp, Workspace};
use crate::scores::{Accuracy, StepTotals};
use crate::session::{
    predict_rows, Answer, Item, LabelSource, Observation, Predictor, Session, SessionError, Taken,
};
use crate::stream::{Line, RecordingError, RecordingReader, Rejected, Sample, SampleDecoder};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Recording(#[from] RecordingError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Lock(#[from] InstanceError),
    #[error("holdout {0} has no samples with \"truth\", so it cannot be scored")]
    NoTruth(String),
    #[error("recording {path} has no valid sample ({rejected} lines rejected)")]
    Empty { path: String, rejected: usize },
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Valid samples read; each was answered, or refused as `unembeddable`.
    pub samples: usize,
    /// Labels learned from: on sample lines, or matched by feedback lines.
    pub labeled: u64,
    /// Feedback lines that found their sample, and those that came too late.
    pub feedback: u64,
    pub late_labels: u64,
    /// Share of the matched feedback labels that the device's answer (the served model's)
    /// got right, as the daemon's `feedback_accuracy` counts it; 0 without feedback.
    pub feedback_accuracy: f64,
    pub scored: usize,
    pub rejected: usize,
    /// Samples whose embedding came out non-finite or absurd: not answered, not scored, not
    /// learned from (the daemon's `unembeddable_total`).
    pub unembeddable: u64,
    pub prequential_accuracy: PrequentialAccuracy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<Eval>,
    pub pseudo_labels: PseudoLabels,
    pub train_steps: u64,
    pub ema_updates: u64,
    pub teacher_version: u64,
    /// Times the rollback guard reverted to the last good teacher.
    pub rollbacks: u64,
    /// The sample counts at which it did, all of this replay's. `rollbacks` is the
    /// learner's own count: it carries a restored checkpoint's and starts again at 0 when a
    /// new mounting is adopted (the learner starts over), so the two can differ.
    pub rollbacks_at: Vec<usize>,
    pub skipped_nonfinite: u64,
    /// The serving gate: which model answers at the end, its evidence and when it switched.
    pub gate: GateReport,
    /// Mounting calibration (with `[calibration]` channels): what was adopted, and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationReport>,
    /// The checkpoint this replay resumed from, if any (`--checkpoint`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    pub checkpoints_written: u64,
    /// Bytes those checkpoints took (tensor files and manifests), against the write budget.
    pub checkpoint_bytes_written: u64,
    pub throughput_samples_per_s: f64,
    pub peak_rss_bytes: u64,
    pub seed: u64,
    pub timeline: Vec<TimelinePoint>,
    /// Label requests and their simulated answers (`--label-budget`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<RequestReport>,
    /// Label trust: labels held (not believed), released, dropped; whether labels are
    /// disputed at the end, and between which classes.
    pub trust: TrustReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrustReport {
    #[serde(flatten)]
    pub counts: TrustCounts,
    /// Labels still held at the end.
    pub holding: usize,
    pub disputed: Option<(usize, usize)>,
    /// Share of the last inputs (up to 1,024) the embedding reference calls atypical, at the
    /// end; none without a reference.
    pub inputs_atypical: Option<f64>,
}

/// Accuracy of each model's answers on the samples with a `truth`, each made before the
/// sample was learned from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrequentialAccuracy {
    /// The adapted teacher's own series (whether or not the gate let it answer).
    pub teacher: f64,
    /// The pretrained model's own series, behind the mounting adopted at the time: the
    /// pretrained model until an adoption, the calibrated model after it.
    pub source: f64,
    /// Of the model the gate served at each sample: what a device's users saw.
    pub served: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Eval {
    pub samples: usize,
    /// The adapted teacher and its student, behind the adopted mounting.
    pub teacher_accuracy: f64,
    pub student_accuracy: f64,
    /// The pretrained model as shipped, on the device's own axes.
    pub source_accuracy: f64,
    /// The calibrated model: the pretrained model behind the adopted mounting (equal to
    /// `source_accuracy` when none is adopted).
    pub calibrated_accuracy: f64,
    /// The model the gate serves at the end of the replay.
    pub served_accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub serving: Serving,
    /// Discordant labels in the gate's window: the teacher alone right / the pretrained
    /// model alone right; and the gate's anytime-valid p-value (1 over its wealth, from all the
    /// evidence since it last began, not only the window).
    pub wins: u64,
    pub losses: u64,
    pub p: f64,
    /// Why it serves that model, in words.
    pub reason: String,
    /// Every change of the served model, at the sample count it happened.
    pub switches: Vec<Switch>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CalibrationReport {
    /// The adopted signed axis permutation, e.g. `x,z,-y` (`x,y,z`: the device's own axes).
    pub adopted: String,
    pub proposals: u64,
    pub changes: u64,
    /// Sample counts at which the adopted mounting changed, and to what.
    pub adoptions: Vec<(usize, String)>,
    /// Samples (or labels) not learned from because a new mounting replaced the one they
    /// were embedded under.
    pub stale: u64,
}

impl Report {
    /// The mounting adopted at the end, unless it is the device's own axes (the summary and
    /// the plot name the calibrated model by it).
    pub fn adopted_mounting(&self) -> Option<&str> {
        let identity = SignedPerm::IDENTITY.name();
        self.calibration
            .as_ref()
            .map(|c| c.adopted.as_str())
            .filter(|&m| m != identity)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Switch {
    pub sample: usize,
    pub serving: Serving,
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

impl From<&StepTotals> for PseudoLabels {
    fn from(t: &StepTotals) -> Self {
        PseudoLabels {
            offered: t.offered,
            accepted: t.accepted,
            accepted_correct: t.accepted_correct,
            accepted_with_truth: t.accepted_with_truth,
        }
    }
}

/// One timeline entry: accuracies over the samples since the previous entry, and the mean
/// losses and acceptance over the steps taken in that span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimelinePoint {
    pub sample: usize,
    /// Samples in the span with a `truth` (the accuracies are 0 when there are none).
    pub scored: usize,
    pub teacher_accuracy: f64,
    pub source_accuracy: f64,
    pub loss_sup: f64,
    pub loss_pseudo: f64,
    pub loss_consistency: f64,
    pub acceptance: f64,
}

/// Accuracy of the three answers a replay scores: the served model's, and the adapted
/// teacher's and the pretrained model's as their own series.
#[derive(Debug, Clone, Copy, Default)]
struct Scored {
    teacher: Accuracy,
    source: Accuracy,
    served: Accuracy,
}

impl Scored {
    fn update(&mut self, a: &Answer, truth: usize) {
        let right = |p: Option<crate::session::Prediction>| p.is_some_and(|p| p.class == truth);
        self.teacher.update(right(a.teacher));
        self.source.update(right(a.pretrained));
        self.served.update(a.served.class == truth);
    }
}

/// The span a timeline point closes: the answers scored and the steps taken since the
/// previous point.
#[derive(Default)]
struct Window {
    scored: Scored,
    steps: StepTotals,
}

impl Window {
    fn point(&self, sample: usize) -> TimelinePoint {
        let s = &self.steps;
        TimelinePoint {
            sample,
            scored: self.scored.served.total as usize,
            teacher_accuracy: self.scored.teacher.or_zero(),
            source_accuracy: self.scored.source.or_zero(),
            loss_sup: s.mean_sup().unwrap_or(0.0),
            loss_pseudo: s.mean_pseudo().unwrap_or(0.0),
            loss_consistency: s.mean_consistency().unwrap_or(0.0),
            acceptance: s.acceptance().unwrap_or(0.0),
        }
    }
}

/// What a replay leaves behind: the report and the session at the end.
pub struct Outcome {
    pub report: Report,
    pub session: Session,
}

/// Options that do not belong in the config file.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Overrides `[replay] seed`.
    pub seed: Option<u64>,
    /// Resume from and save checkpoints in this directory.
    pub checkpoint: Option<std::path::PathBuf>,
    /// Simulate label requests instead of the recording's labels.
    pub label_budget: Option<LabelBudget>,
    /// Ignore fields of the recording's and the holdout's lines that a sample does not have,
    /// instead of refusing those lines.
    pub allow_unknown_fields: bool,
}

/// `--label-budget`: the recording's labels (its `label` fields and feedback lines) are
/// ignored; the session asks for labels under `[requests]` with this `fraction`, and a
/// simulated user answers each request from that sample's `truth`, `delay` samples later.
/// Only samples with a `truth` are asked about, and a request never expires (the simulated
/// user always answers).
#[derive(Debug, Clone, Copy)]
pub struct LabelBudget {
    pub fraction: f64,
    pub delay: usize,
}

impl LabelBudget {
    /// The `[requests]` a simulated user can keep up with: open as long as it takes to
    /// answer, room for every request `delay` samples can raise, no hourly limit.
    fn requests(&self, cfg: &RequestConfig) -> RequestConfig {
        RequestConfig {
            enabled: true,
            fraction: self.fraction,
            per_hour: 0,
            max_open: cfg
                .max_open
                .max((self.fraction * self.delay as f64).ceil() as usize + 1),
            open_s: f64::INFINITY,
            burst: cfg.burst,
            explore: cfg.explore,
        }
    }
}

/// What the label requests came to (`--label-budget`).
#[derive(Debug, Clone, Serialize)]
pub struct RequestReport {
    pub fraction: f64,
    pub delay: usize,
    #[serde(flatten)]
    pub counts: RequestCounts,
    /// Still unanswered at the end (asked less than `delay` samples before it).
    pub open: usize,
}

/// What a replay tells its caller as it goes.
pub enum Progress<'a> {
    /// The device's answer for the `sample`-th sample (0-based), made before it was learned
    /// from: the served model's, saying which model that was.
    Prediction {
        sample: usize,
        id: Option<&'a str>,
        answer: Answer,
        teacher_version: u64,
    },
    /// Bytes of the recording read so far.
    Read { bytes: u64 },
}

/// Up to `batch` lines of a recording, with their samples' inputs back to back.
struct Chunk {
    lines: Vec<Line>,
    inputs: Vec<f32>,
    samples: usize,
}

impl Chunk {
    /// Reads the next lines (samples and feedback count alike, as the daemon's batches do);
    /// rejected lines are handed to `rejected`. False at the end of the recording.
    fn fill<R: std::io::BufRead>(
        &mut self,
        reader: &mut RecordingReader<R>,
        batch: usize,
        mut rejected: impl FnMut(Rejected),
    ) -> Result<bool, RecordingError> {
        self.lines.clear();
        self.inputs.clear();
        self.samples = 0;
        while self.lines.len() < batch {
            match reader.next_line() {
                None => break,
                Some(line) => match line? {
                    Ok(line) => {
                        if let Line::Sample(s) = &line {
                            self.inputs.extend_from_slice(&s.x);
                            self.samples += 1;
                        }
                        self.lines.push(line);
                    }
                    Err(r) => rejected(r),
                },
            }
        }
        Ok(!self.lines.is_empty())
    }
}

/// Replays `recording` through a fresh session and, with `holdout`, scores the final models.
pub fn replay(
    classifier: &Classifier,
    cfg: &Config,
    recording: &Path,
    holdout: Option<&Path>,
    opts: &ReplayOptions,
    mut on_progress: impl FnMut(Progress),
) -> Result<Outcome, ReplayError> {
    let mut decoder = SampleDecoder::new(&classifier.input_shape, classifier.classes())
        .with_max_abs(cfg.input.max_abs);
    decoder.allow_unknown_fields = opts.allow_unknown_fields;
    let seed = opts.seed.unwrap_or(cfg.replay.seed);
    // Nobody answers a replay's requests unless a user is simulated.
    let mut cfg = cfg.clone();
    cfg.requests = match &opts.label_budget {
        Some(budget) => budget.requests(&cfg.requests),
        None => RequestConfig {
            enabled: false,
            ..cfg.requests
        },
    };
    let cfg = &cfg;
    let mut session = Session::new(classifier, cfg, seed)?;
    // The simulated user's answers still to give: when, for which id, which class.
    let mut answers_due: std::collections::VecDeque<(usize, String, usize)> = Default::default();
    let mut lines = Vec::with_capacity(2);
    let mut request_id = String::new();
    // A replay that saves checkpoints is a writer like the daemon: one per directory, and
    // never into a running daemon's (checkpoint::lock). Held until the replay ends.
    let _lock = match &opts.checkpoint {
        Some(dir) => Some(InstanceLock::acquire(dir, "edgemt replay")?),
        None => None,
    };
    // Saves go through the write budget here too: a replay at full speed is the daemon's
    // worst case, and the numbers it shows are the ones a board gets.
    let mut writer = match &opts.checkpoint {
        Some(dir) => Some(CheckpointWriter::new(
            CheckpointStore::open(
                dir,
                cfg.checkpoint.keep,
                Identity::new(classifier, &cfg.learn)
                    .with_reference(cfg.model.reference.as_deref()),
            )?,
            cfg.checkpoint.max_mib_per_day,
            Instant::now(),
        )),
        None => None,
    };
    let restored_from = writer
        .as_ref()
        .and_then(|w| session.restore(w.store()))
        .map(|r| r.name);

    let started = Instant::now();
    let mut predictor = Predictor::new(classifier.backbone.clone());
    let mut reader = RecordingReader::open(recording, &decoder)?;
    let mut chunk = Chunk {
        lines: Vec::with_capacity(cfg.replay.batch),
        inputs: Vec::with_capacity(cfg.replay.batch * classifier.sample_len()),
        samples: 0,
    };
    let mut answers = Vec::with_capacity(1);
    let mut rejected = 0usize;
    let mut samples = 0usize;
    let mut unembeddable = 0u64;
    let mut scored = Scored::default();
    let mut steps = StepTotals::default();
    // The timeline of the served model starts from the pretrained one: a session that
    // serves another from the start (the gate off, a restored checkpoint) switched at 0.
    let mut switches = Vec::new();
    if session.serving() != Serving::Pretrained {
        switches.push(Switch {
            sample: 0,
            serving: session.serving(),
        });
    }
    let mut rollbacks_at = Vec::new();
    let mut adoptions = Vec::new();
    let mut window = Window::default();
    let mut timeline = Vec::new();
    let log_rejected = |r: Rejected, rejected: &mut usize| {
        *rejected += 1;
        if *rejected <= 20 {
            tracing::warn!("{}:{}: skipped: {}", recording.display(), r.line, r.error);
        }
    };
    while chunk.fill(&mut reader, cfg.replay.batch, |r| {
        log_rejected(r, &mut rejected)
    })? {
        let mounting = session.mounting_r();
        predictor.embed(&chunk.inputs, chunk.samples, session.mounting())?;
        let mut row = 0;
        for next in chunk.lines.drain(..) {
            // The simulated user's answers that are due go first, as feedback lines.
            while answers_due.front().is_some_and(|a| a.0 <= samples) {
                let (_, id, label) = answers_due.pop_front().expect("checked");
                lines.push(Line::Feedback { id, label });
            }
            match next {
                Line::Feedback { .. } if opts.label_budget.is_some() => {}
                line => lines.push(line),
            }
            for line in lines.drain(..) {
                let taken = match &line {
                    Line::Sample(s) => {
                        let r = row;
                        row += 1;
                        samples += 1;
                        predictor.answer(r..r + 1, &session.models(), &mut answers);
                        match answers[0] {
                            None => {
                                unembeddable += 1;
                                Taken::default()
                            }
                            Some(answer) => {
                                on_progress(Progress::Prediction {
                                    sample: samples - 1,
                                    id: s.id.as_deref(),
                                    answer,
                                    teacher_version: session.teacher_version(),
                                });
                                if let Some(truth) = s.truth {
                                    scored.update(&answer, truth);
                                    window.scored.update(&answer, truth);
                                }
                                let (id, label) = match (&opts.label_budget, s.truth) {
                                    // Only samples the simulated user can answer are asked
                                    // about; they need an id to be answered by.
                                    (Some(_), Some(_)) => {
                                        request_id.clear();
                                        match &s.id {
                                            Some(id) => request_id.push_str(id),
                                            None => {
                                                use std::fmt::Write;
                                                let _ = write!(request_id, "#{samples}");
                                            }
                                        }
                                        (Some(request_id.as_str()), None)
                                    }
                                    (Some(_), None) => (None, None),
                                    (None, _) => (s.id.as_deref(), s.label),
                                };
                                let taken = session.take(Item::Sample(Observation {
                                    id,
                                    x: &s.x,
                                    embedding: predictor.embeddings().row(r),
                                    mounting,
                                    label,
                                    source: LabelSource::Recording,
                                    truth: s.truth,
                                    predicted: answer.served.class,
                                }))?;
                                if let (Some(budget), Some(request), Some(truth)) =
                                    (&opts.label_budget, &taken.request, s.truth)
                                {
                                    answers_due.push_back((
                                        samples + budget.delay,
                                        request.id.clone(),
                                        truth,
                                    ));
                                }
                                taken
                            }
                        }
                    }
                    Line::Feedback { id, label } => session.take(Item::Feedback {
                        id,
                        label: *label,
                        // With a budget the recording's feedback lines are dropped: these
                        // are the simulated user's answers.
                        source: if opts.label_budget.is_some() {
                            LabelSource::Answer
                        } else {
                            LabelSource::Recording
                        },
                    })?,
                };
                if let Some(step) = &taken.step {
                    window.steps.add(step);
                    steps.add(step);
                    if step.rollback.is_some() {
                        rollbacks_at.push(samples);
                    }
                }
                let mounted = session.mounting_r();
                if adoptions
                    .last()
                    .map_or(SignedPerm::IDENTITY, |a: &(usize, SignedPerm)| a.1)
                    != mounted
                {
                    adoptions.push((samples, mounted));
                }
                let serving = session.serving();
                let before = switches
                    .last()
                    .map_or(Serving::Pretrained, |s: &Switch| s.serving);
                if serving != before {
                    switches.push(Switch {
                        sample: samples,
                        serving,
                    });
                }
                // A timeline point closes after the step its last sample triggered.
                let closed = timeline.last().map_or(0, |p: &TimelinePoint| p.sample);
                if samples % cfg.replay.timeline_every == 0 && samples > closed {
                    timeline.push(window.point(samples));
                    window = Window::default();
                }
                if let Some(writer) = writer.as_mut() {
                    if let Some(state) = session.take_checkpoint(Instant::now()) {
                        writer.offer(state, Instant::now())?;
                    } else if let Some(written) = writer.poll(Instant::now()) {
                        written?;
                    }
                }
            }
        }
        on_progress(Progress::Read {
            bytes: reader.bytes_read(),
        });
    }
    if rejected > 20 {
        tracing::warn!(
            "{}: {} more bad lines skipped",
            recording.display(),
            rejected - 20
        );
    }
    if samples == 0 {
        return Err(ReplayError::Empty {
            path: recording.display().to_string(),
            rejected,
        });
    }
    if timeline.last().map_or(0, |p| p.sample) < samples {
        timeline.push(window.point(samples));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (mut checkpoints_written, mut checkpoint_bytes_written) = (0, 0);
    if let Some(writer) = writer.as_mut() {
        session.request_checkpoint();
        if let Some(written) =
            writer.finish(session.take_checkpoint(Instant::now()), Instant::now())
        {
            written?;
        }
        let totals = writer.totals();
        (checkpoints_written, checkpoint_bytes_written) = (totals.written, totals.bytes);
        if totals.deferred > 0 {
            tracing::info!(
                "the write budget ([checkpoint] max_mib_per_day) deferred {} due checkpoints; {} written ({} bytes)",
                totals.deferred,
                totals.written,
                totals.bytes
            );
        }
    }

    let eval = match holdout {
        Some(path) => Some(evaluate(
            classifier,
            &session,
            path,
            cfg.replay.batch,
            opts.allow_unknown_fields,
        )?),
        None => None,
    };
    let counters = *session.learner().counters();
    let stats = *session.stats();
    let report = Report {
        samples,
        labeled: stats.labels,
        feedback: stats.feedback.total,
        late_labels: stats.late_labels,
        feedback_accuracy: stats.feedback.or_zero(),
        scored: scored.served.total as usize,
        rejected,
        unembeddable,
        prequential_accuracy: PrequentialAccuracy {
            teacher: scored.teacher.or_zero(),
            source: scored.source.or_zero(),
            served: scored.served.or_zero(),
        },
        eval,
        pseudo_labels: PseudoLabels::from(&steps),
        train_steps: counters.train_steps,
        ema_updates: counters.ema_updates,
        teacher_version: counters.teacher_version,
        rollbacks: counters.rollbacks,
        rollbacks_at,
        restored_from,
        checkpoints_written,
        checkpoint_bytes_written,
        skipped_nonfinite: counters.skipped_nonfinite,
        gate: {
            let g = session.learner().gate();
            GateReport {
                serving: session.serving(),
                wins: g.wins(),
                losses: g.losses(),
                p: g.p_value(),
                reason: session.learner().serving_reason(),
                switches,
            }
        },
        calibration: session.calibrator().map(|c| CalibrationReport {
            adopted: c.adopted().name(),
            proposals: stats.calibration_proposals,
            changes: stats.calibration_changes,
            adoptions: adoptions.iter().map(|(n, r)| (*n, r.name())).collect(),
            stale: stats.stale_mounting,
        }),
        throughput_samples_per_s: if elapsed > 0.0 {
            samples as f64 / elapsed
        } else {
            0.0
        },
        peak_rss_bytes: peak_rss_bytes(),
        seed,
        timeline,
        requests: opts.label_budget.map(|b| RequestReport {
            fraction: b.fraction,
            delay: b.delay,
            counts: session.requests().map(|r| r.counts()).unwrap_or_default(),
            open: session.requests().map_or(0, |r| r.open().count()),
        }),
        trust: {
            let t = session.learner().trust();
            TrustReport {
                counts: t.counts(),
                holding: t.held_len(),
                disputed: t.disputed(),
                inputs_atypical: t.inputs_atypical(),
            }
        },
    };
    Ok(Outcome { report, session })
}

/// The model's embedding reference ([`EmbeddingReference`]) from a recording of the inputs
/// it was made for: every sample embedded by the frozen backbone and grouped by the class the
/// pretrained model gives it (labels and truth are not read: the reference describes what the
/// model sees, not what anybody says).
pub fn make_reference(
    classifier: &Classifier,
    path: &Path,
    batch: usize,
    allow_unknown_fields: bool,
) -> Result<EmbeddingReference, ReplayError> {
    let mut batches = Batches::open(classifier, path, batch, allow_unknown_fields)?;
    let pretrained = classifier.pretrained();
    // The device's own prediction path, so the reference sees what the device will.
    let mut predictor = Predictor::new(classifier.backbone.clone());
    let (mut ws, mut probs, mut preds) = (Workspace::default(), Array2::zeros((0, 0)), Vec::new());
    let (mut all, mut predicted) = (Vec::new(), Vec::new());
    while let Some(n) = batches.next(|_| true)? {
        predictor.embed(&batches.inputs, n, None)?;
        predict_rows(
            &pretrained,
            predictor.embeddings(),
            &mut ws,
            &mut probs,
            &mut preds,
        );
        predicted.extend(preds.iter().map(|p| p.class));
        all.extend(predictor.embeddings().iter().copied());
    }
    if predicted.is_empty() {
        return Err(ReplayError::Empty {
            path: path.display().to_string(),
            rejected: batches.rejected,
        });
    }
    let embeddings = Array2::from_shape_vec((predicted.len(), classifier.embedding_dim), all)
        .expect("one embedding row per sample");
    Ok(EmbeddingReference::build(
        embeddings.view(),
        &predicted,
        classifier.classes(),
        classifier.fingerprint,
        format!(
            "{} samples of {}",
            predicted.len(),
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
    ))
}

/// A recording read in batches of samples (their inputs back to back in `inputs`), for the
/// passes over a whole file that `evaluate` and `make_reference` make; rejected lines are
/// counted and skipped.
struct Batches {
    reader: RecordingReader<std::io::BufReader<std::fs::File>>,
    batch: usize,
    inputs: Vec<f32>,
    rejected: usize,
}

impl Batches {
    fn open(
        classifier: &Classifier,
        path: &Path,
        batch: usize,
        allow_unknown_fields: bool,
    ) -> Result<Self, ReplayError> {
        let mut decoder = SampleDecoder::new(&classifier.input_shape, classifier.classes());
        decoder.allow_unknown_fields = allow_unknown_fields;
        Ok(Batches {
            reader: RecordingReader::open(path, &decoder)?,
            batch: batch.max(1),
            inputs: Vec::new(),
            rejected: 0,
        })
    }

    /// The next batch of samples `keep` takes (up to `batch` of them), or `None` at the end.
    fn next(
        &mut self,
        mut keep: impl FnMut(&Sample) -> bool,
    ) -> Result<Option<usize>, ReplayError> {
        self.inputs.clear();
        let mut n = 0;
        while n < self.batch {
            match self.reader.next_line() {
                None => break,
                Some(line) => match line? {
                    Ok(Line::Sample(s)) if keep(&s) => {
                        self.inputs.extend_from_slice(&s.x);
                        n += 1;
                    }
                    Ok(_) => {}
                    Err(_) => self.rejected += 1,
                },
            }
        }
        Ok((n > 0).then_some(n))
    }
}

/// Accuracy of the final teacher, student and pretrained models on a labeled holdout,
/// streamed in batches.
pub fn evaluate(
    classifier: &Classifier,
    session: &Session,
    path: &Path,
    batch: usize,
    allow_unknown_fields: bool,
) -> Result<Eval, ReplayError> {
    let mut batches = Batches::open(classifier, path, batch, allow_unknown_fields)?;
    let l = session.learner();
    // The pretrained baseline sees the raw holdout; the adapted and served models see it
    // through the adopted mounting, as on the device. Grouped by what they see, so each
    // batch is embedded at most twice.
    let heads: [(&Mlp, Option<&crate::calibration::Mounting>); 5] = [
        (l.pretrained(), None),
        (l.pretrained(), session.mounting()),
        (l.teacher(), session.mounting()),
        (l.student(), session.mounting()),
        (l.served(), session.mounting()),
    ];
    let mut predictor = Predictor::new(classifier.backbone.clone());
    let mut correct = [0usize; 5];
    let mut total = 0usize;
    let mut truths = Vec::new();
    let (mut ws, mut probs, mut preds) = (Workspace::default(), Array2::zeros((0, 0)), Vec::new());
    loop {
        truths.clear();
        let scored = |s: &Sample| s.truth.map(|t| truths.push(t)).is_some();
        if batches.next(scored)?.is_none() {
            break;
        }
        let mut embedded = None;
        for (h, (head, mounting)) in heads.iter().enumerate() {
            let r = mounting.map(|m| m.r());
            if embedded != Some(r) {
                predictor.embed(&batches.inputs, truths.len(), *mounting)?;
                embedded = Some(r);
            }
            predict_rows(
                head,
                predictor.embeddings(),
                &mut ws,
                &mut probs,
                &mut preds,
            );
            correct[h] += preds
                .iter()
                .zip(&truths)
                .filter(|(p, &t)| p.class == t)
                .count();
        }
        total += truths.len();
    }
    if total == 0 {
        return Err(ReplayError::NoTruth(path.display().to_string()));
    }
    let n = total as f64;
    Ok(Eval {
        samples: total,
        source_accuracy: correct[0] as f64 / n,
        calibrated_accuracy: correct[1] as f64 / n,
        teacher_accuracy: correct[2] as f64 / n,
        student_accuracy: correct[3] as f64 / n,
        served_accuracy: correct[4] as f64 / n,
    })
}
