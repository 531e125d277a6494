//! The two worker threads: inference (batched backbone pass, teacher prediction, predictions
//! out) and training (a [`Session`]: learning, EMA, checkpoints, teacher swaps). They are
//! plain threads because both are CPU-bound and synchronous; they meet only through bounded
//! queues and the shared teacher pointer, so inference never waits on training.
//!
//! Items keep their arrival order from the MQTT task to the session: a label sent right
//! after its sample is filed after that sample, even within one batch.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::ArrayView1;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;

use super::queue::{BoundedQueue, Droppable};
use super::state::{Shared, TeacherSnapshot};
use crate::calibration::SignedPerm;
use crate::checkpoint::CheckpointStore;
use crate::checkpoint::Saved;
use crate::learn::{Serving, StepReport};
use crate::session::{embedding_ok, Observation, Prediction, Predictor, Session, SessionError};

/// What the MQTT side hands to inference.
pub enum Incoming {
    Sample {
        x: Vec<f32>,
        id: String,
        label: Option<usize>,
        received: Instant,
    },
    Feedback {
        id: String,
        label: usize,
    },
}

impl Droppable for Incoming {
    fn droppable(&self) -> bool {
        matches!(self, Incoming::Sample { label: None, .. })
    }
    fn is_sample(&self) -> bool {
        matches!(self, Incoming::Sample { .. })
    }
}

/// What inference hands to training, in arrival order.
pub enum TrainItem {
    /// A predicted sample: its input, the embedding it was predicted from, and its label if
    /// known on arrival.
    Sample {
        id: String,
        x: Vec<f32>,
        embedding: Vec<f32>,
        label: Option<usize>,
        predicted: usize,
        /// The calibration the embedding was computed under.
        mounting: SignedPerm,
    },
    /// A label for an earlier sample.
    Feedback { id: String, label: usize },
}

impl Droppable for TrainItem {
    fn droppable(&self) -> bool {
        matches!(self, TrainItem::Sample { label: None, .. })
    }
    fn is_sample(&self) -> bool {
        matches!(self, TrainItem::Sample { .. })
    }
}

/// The training thread's rule for one item, shared with the in-process equivalence test:
/// file it with the session, then step if one is due.
pub fn train_on(
    session: &mut Session,
    item: &TrainItem,
) -> Result<Option<StepReport>, SessionError> {
    match item {
        TrainItem::Sample {
            id,
            x,
            embedding,
            label,
            predicted,
            mounting,
        } => {
            session.observe(Observation {
                id: Some(id),
                x,
                embedding: ArrayView1::from(embedding.as_slice()),
                mounting: *mounting,
                label: *label,
                truth: None,
                predicted: *predicted,
            })?;
        }
        TrainItem::Feedback { id, label } => {
            session.feedback(id, *label)?;
        }
    }
    session.maybe_step()
}

pub struct InferenceWorker {
    pub shared: Arc<Shared>,
    pub predictor: Predictor,
    pub input: Arc<BoundedQueue<Incoming>>,
    pub train: Arc<BoundedQueue<TrainItem>>,
    pub client: AsyncClient,
    pub predictions_topic: String,
    pub class_names: Vec<String>,
    pub qos: QoS,
    pub max_batch: usize,
    pub sample_len: usize,
    /// The Prometheus latency histogram, when the endpoint is on.
    pub latency_histogram: Option<prometheus_client::metrics::histogram::Histogram>,
    /// The retained current-activity topic and how often it is refreshed.
    pub state_topic: String,
    pub state_every: Duration,
}

impl InferenceWorker {
    pub fn run(mut self) {
        let mut items = Vec::with_capacity(self.max_batch);
        let mut inputs: Vec<f32> = Vec::with_capacity(self.max_batch * self.sample_len);
        let mut preds: Vec<Prediction> = Vec::with_capacity(self.max_batch);
        let mut latencies: Vec<u64> = Vec::with_capacity(self.max_batch);
        let counters = &self.shared.counters;
        let mut state_at: Option<Instant> = None;
        while self
            .input
            .pop_batch(self.max_batch, Duration::from_millis(100), &mut items)
        {
            self.shared.beat(&self.shared.inference_beat);
            inputs.clear();
            let mut samples = 0;
            for item in &items {
                if let Incoming::Sample { x, .. } = item {
                    inputs.extend_from_slice(x);
                    samples += 1;
                }
            }
            let teacher = self.shared.teacher();
            let embedded = samples == 0
                || match self.predictor.run(
                    &inputs,
                    samples,
                    teacher.mounting.as_ref(),
                    &teacher.head,
                    &mut preds,
                ) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(
                            "backbone failed on a batch of {samples}: {}",
                            crate::report(&e)
                        );
                        counters.rejected_total.fetch_add(samples as u64, Relaxed);
                        counters
                            .unembeddable_total
                            .fetch_add(samples as u64, Relaxed);
                        false
                    }
                };
            let embeddings = self.predictor.embeddings();
            let mut row = 0;
            let mut published = 0;
            // The retained state gets the batch's latest prediction, at most once a period.
            let state_due = state_at.is_none_or(|t| t.elapsed() >= self.state_every);
            let mut latest: Option<Vec<u8>> = None;
            for item in items.drain(..) {
                let (x, id, label, received) = match item {
                    Incoming::Feedback { id, label } => {
                        let dropped = self.train.push(TrainItem::Feedback { id, label });
                        self.count_drop(dropped);
                        continue;
                    }
                    Incoming::Sample {
                        x,
                        id,
                        label,
                        received,
                    } => (x, id, label, received),
                };
                let r = row;
                row += 1;
                if !embedded {
                    continue;
                }
                let embedding = embeddings.row(r);
                if !embedding_ok(embedding) {
                    // A sample can pass every input check and still drive the backbone to
                    // infinities: it must not be published as a prediction nor learned from.
                    counters.rejected_total.fetch_add(1, Relaxed);
                    counters.unembeddable_total.fetch_add(1, Relaxed);
                    continue;
                }
                let p = preds[r];
                let name = self
                    .class_names
                    .get(p.class)
                    .map(String::as_str)
                    .unwrap_or("");
                let message = PredictionMessage {
                    id: &id,
                    class: p.class,
                    name,
                    confidence: p.confidence,
                    teacher_version: teacher.version,
                    serving: teacher.serving,
                };
                let payload = serde_json::to_vec(&message).unwrap_or_default();
                if state_due {
                    latest = Some(payload.clone());
                }
                if self
                    .client
                    .try_publish(&self.predictions_topic, self.qos, false, payload)
                    .is_ok()
                {
                    published += 1;
                } else {
                    counters.predictions_dropped_total.fetch_add(1, Relaxed);
                }
                latencies.push(received.elapsed().as_micros() as u64);
                let dropped = self.train.push(TrainItem::Sample {
                    id,
                    x,
                    embedding: embedding.to_vec(),
                    label,
                    predicted: p.class,
                    mounting: teacher
                        .mounting
                        .as_ref()
                        .map_or(SignedPerm::IDENTITY, |m| m.r()),
                });
                self.count_drop(dropped);
            }
            if let Some(state) = latest {
                state_at = Some(Instant::now());
                if self
                    .client
                    .try_publish(&self.state_topic, QoS::AtLeastOnce, true, state)
                    .is_err()
                {
                    counters.publish_dropped_total.fetch_add(1, Relaxed);
                }
            }
            // Counters and the latency window once per batch, not per sample.
            counters.predictions_total.fetch_add(published, Relaxed);
            let mut window = self
                .shared
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(h) = &self.latency_histogram {
                latencies
                    .iter()
                    .for_each(|&micros| h.observe(micros as f64 * 1e-6));
            }
            latencies.drain(..).for_each(|micros| window.record(micros));
        }
    }
}

impl InferenceWorker {
    fn count_drop(&self, dropped: Option<TrainItem>) {
        if let Some(d) = dropped {
            let c = &self.shared.counters;
            c.count_drop(&c.train_dropped_total, &d);
        }
    }
}

/// `{prefix}/predictions`, one per sample.
#[derive(serde::Serialize)]
struct PredictionMessage<'a> {
    id: &'a str,
    class: usize,
    name: &'a str,
    confidence: f32,
    teacher_version: u64,
    /// Which model made it: "adapted" or "pretrained" (the serving gate's choice).
    serving: Serving,
}

pub struct TrainerWorker {
    pub shared: Arc<Shared>,
    pub session: Session,
    pub queue: Arc<BoundedQueue<TrainItem>>,
    /// Where checkpoints (and exports) go, if anywhere.
    pub checkpoints: Option<CheckpointStore>,
    pub exporter: Exporter,
    /// What the inference thread was last handed.
    pub published: (Serving, SignedPerm),
    /// Whether each of the most recent labels was predicted right, newest last.
    pub recent_feedback: RecentFeedback,
}

/// The served model's record on the most recent labels, read off the session's counters.
pub struct RecentFeedback {
    outcomes: std::collections::VecDeque<bool>,
    capacity: usize,
    seen: (u64, u64),
}

impl RecentFeedback {
    pub fn new(capacity: usize) -> Self {
        RecentFeedback {
            outcomes: std::collections::VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
            seen: (0, 0),
        }
    }

    /// Takes in the labels matched since the last call (`feedback`, `correct` are totals).
    fn update(&mut self, feedback: u64, correct: u64) {
        let new = feedback.saturating_sub(self.seen.0);
        let new_correct = correct.saturating_sub(self.seen.1);
        self.seen = (feedback, correct);
        for i in 0..new.min(self.capacity as u64) {
            if self.outcomes.len() == self.capacity {
                self.outcomes.pop_front();
            }
            self.outcomes.push_back(i < new_correct);
        }
    }

    fn accuracy(&self) -> Option<f64> {
        (!self.outcomes.is_empty()).then(|| {
            self.outcomes.iter().filter(|&&c| c).count() as f64 / self.outcomes.len() as f64
        })
    }
}

/// What `export` needs to write the teacher back into the original graph.
pub struct Exporter {
    pub proto: tract_onnx::pb::ModelProto,
    pub trainable: crate::model::TrainableSpec,
    pub input_shape: Vec<usize>,
    pub fingerprint: u64,
}

impl TrainerWorker {
    /// Hands the inference thread the model the gate serves, behind the adopted mounting.
    fn publish_teacher(&mut self) {
        self.published = (self.session.serving(), self.session.mounting_r());
        self.shared.publish_teacher(TeacherSnapshot {
            head: self.session.served().clone(),
            version: self.session.teacher_version(),
            serving: self.published.0,
            mounting: self.session.mounting().cloned(),
        });
    }

    pub fn run(mut self) {
        super::priority::lower_current_thread("training");
        if let Some(store) = &self.checkpoints {
            self.session.restore(store);
        }
        self.publish_teacher();
        let (writer_tx, writer) = match self.checkpoints.take() {
            Some(store) => {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Saved>(2);
                let shared = self.shared.clone();
                let handle = std::thread::Builder::new()
                    .name("checkpoints".into())
                    .spawn(move || write_checkpoints(store, rx, shared))
                    .ok();
                (Some(tx), handle)
            }
            None => (None, None),
        };
        let mut items = Vec::with_capacity(64);
        while self
            .queue
            .pop_batch(64, Duration::from_millis(100), &mut items)
        {
            self.shared.beat(&self.shared.trainer_beat);
            if self.shared.reset_requested.swap(false, Relaxed) {
                self.session.reset();
                self.publish_teacher();
                self.shared
                    .train
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .resets += 1;
            }
            if self.shared.checkpoint_requested.swap(false, Relaxed) {
                if writer_tx.is_some() {
                    self.session.request_checkpoint();
                } else {
                    tracing::warn!("checkpoint requested, but no checkpoint directory is configured ([checkpoint] dir or $STATE_DIRECTORY)");
                }
            }
            self.session
                .set_paused(self.shared.paused.load(Relaxed) || self.shared.stopping.load(Relaxed));
            for item in items.drain(..) {
                let result = train_on(&mut self.session, &item);
                if let TrainItem::Feedback { .. } = item {
                    let s = self.session.stats();
                    self.recent_feedback.update(s.feedback, s.feedback_correct);
                }
                self.after_step(result);
                if (self.session.serving(), self.session.mounting_r()) != self.published {
                    self.publish_teacher();
                }
                if let Some(tx) = &writer_tx {
                    if let Some(state) = self.session.take_checkpoint(Instant::now()) {
                        // A full writer queue means a save is already on its way.
                        let _ = tx.try_send(state);
                    }
                }
            }
            if let Some(tx) = &writer_tx {
                // A requested checkpoint is due even when no item arrived with it.
                if let Some(state) = self.session.take_checkpoint(Instant::now()) {
                    let _ = tx.try_send(state);
                }
            }
            if self.shared.export_requested.swap(false, Relaxed) {
                self.export();
            }
            self.publish_stats();
        }
        if let Some(tx) = writer_tx {
            // The final state, then wait for the writer to finish it.
            self.session.request_checkpoint();
            if let Some(state) = self.session.take_checkpoint(Instant::now()) {
                let _ = tx.send(state);
            }
            drop(tx);
            if let Some(w) = writer {
                let _ = w.join();
            }
        }
        self.publish_stats();
    }

    fn after_step(&mut self, result: Result<Option<StepReport>, SessionError>) {
        match result {
            Ok(Some(step)) => {
                let mut t = self.shared.train.lock().unwrap_or_else(|e| e.into_inner());
                t.steps_since += 1;
                t.loss_sup += step.losses.sup as f64;
                t.loss_pseudo += step.losses.pseudo as f64;
                t.loss_consistency += step.losses.consistency as f64;
                t.offered += step.offered as u64;
                t.accepted += step.accepted as u64;
                drop(t);
                if step.ema_updated || step.rollback.is_some() {
                    self.publish_teacher();
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("training step failed: {}", crate::report(&e)),
        }
    }

    fn export(&self) {
        let Some(dir) = &self.shared.state_dir else {
            tracing::warn!(
                "export requested, but no checkpoint directory is configured to write it to"
            );
            return;
        };
        let e = &self.exporter;
        let version = self.session.teacher_version();
        let meta = [
            ("edgemt.adapted_from", format!("{:016x}", e.fingerprint)),
            ("edgemt.teacher_version", version.to_string()),
        ];
        let path = dir.join("adapted.onnx");
        let result = crate::model::export::export_adapted(
            &e.proto,
            &e.trainable,
            self.session.teacher(),
            self.session.mounting_record().as_ref(),
            &e.input_shape,
            &meta,
        )
        .map_err(|err| crate::report(&err))
        .and_then(|bytes| {
            let tmp = dir.join("adapted.onnx.tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|err| err.to_string())
        });
        match result {
            Ok(()) => {
                self.shared.counters.exports_total.fetch_add(1, Relaxed);
                tracing::info!("exported teacher_version {version} to {}", path.display());
            }
            Err(err) => tracing::error!("export to {} failed: {err}", path.display()),
        }
    }

    fn publish_stats(&self) {
        let l = self.session.learner();
        let c = l.counters();
        let s = self.session.stats();
        let counters = &self.shared.counters;
        counters.labels_total.store(s.labels, Relaxed);
        counters.feedback_total.store(s.feedback, Relaxed);
        counters.feedback_correct.store(s.feedback_correct, Relaxed);
        counters.late_labels_total.store(s.late_labels, Relaxed);
        let mut t = self.shared.train.lock().unwrap_or_else(|e| e.into_inner());
        t.train_steps = c.train_steps;
        t.ema_updates = c.ema_updates;
        t.skipped_nonfinite = c.skipped_nonfinite;
        t.rollbacks = c.rollbacks;
        t.labeled_buffer = l.labeled_counts().iter().sum();
        t.unlabeled_buffer = l.unlabeled_len();
        t.teacher_finite = l.teacher().is_finite() && l.student().is_finite();
        let g = l.gate();
        t.gate_wins = g.wins();
        t.gate_losses = g.losses();
        t.gate_p = g.p_value();
        t.gate_switches = g.switches();
        t.calibration_changes = s.calibration_changes;
        t.feedback_accuracy_recent = self.recent_feedback.accuracy();
    }
}

/// The checkpoint writer thread: saves what it is sent, so the trainer never waits on disk.
fn write_checkpoints(
    mut store: CheckpointStore,
    rx: std::sync::mpsc::Receiver<Saved>,
    shared: Arc<Shared>,
) {
    super::priority::lower_current_thread("checkpoint writer");
    while let Ok(state) = rx.recv() {
        match store.save(&state) {
            Ok(m) => {
                shared.counters.checkpoints_total.fetch_add(1, Relaxed);
                tracing::debug!(
                    "checkpoint {} written (teacher_version {})",
                    m.sequence,
                    m.counters.teacher_version
                );
            }
            Err(e) => {
                // An alarm, not a shrug: the last good checkpoint stays, but nothing newer
                // will be kept until this is fixed.
                shared
                    .counters
                    .checkpoint_failures_total
                    .fetch_add(1, Relaxed);
                tracing::error!("checkpoint not written: {}", crate::report(&e));
            }
        }
    }
}
