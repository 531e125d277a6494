//! The two worker threads: inference (batched backbone pass, teacher head, predictions out)
//! and training (learner steps, EMA, teacher swaps). They are plain threads because both are
//! CPU-bound and synchronous; they meet only through bounded queues and the shared teacher
//! pointer, so inference never waits on training.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView1};
use rumqttc::{AsyncClient, QoS};

use super::queue::{BoundedQueue, Droppable};
use super::state::{Shared, TeacherSnapshot};
use crate::checkpoint::{CheckpointStore, Snapshot};
use crate::learn::buffer::SampleRing;
use crate::learn::head::argmax;
use crate::learn::{AugmentConfig, GuardConfig, LearnConfig, Learner, LinearHead};
use crate::model::Backbone;

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
}

/// What inference hands to training: the input, its embedding, and a label if known.
pub struct TrainItem {
    pub x: Vec<f32>,
    pub embedding: Vec<f32>,
    pub label: Option<usize>,
}

impl Droppable for TrainItem {
    fn droppable(&self) -> bool {
        self.label.is_none()
    }
}

/// Recently predicted samples by id, so label feedback can find them (fixed memory).
struct RecentSamples {
    ring: SampleRing,
    ids: Vec<Option<String>>,
    index: HashMap<String, usize>,
    next: usize,
}

impl RecentSamples {
    fn new(capacity: usize, sample_len: usize, dim: usize) -> Self {
        RecentSamples {
            ring: SampleRing::new(capacity, sample_len, dim),
            ids: vec![None; capacity],
            index: HashMap::with_capacity(capacity),
            next: 0,
        }
    }

    fn insert(&mut self, id: &str, x: &[f32], embedding: ArrayView1<f32>, predicted: usize) {
        if self.ids.is_empty() {
            return;
        }
        let slot = self.next;
        if let Some(old) = self.ids[slot].take() {
            self.index.remove(&old);
        }
        self.ring.push(x, embedding, Some(predicted));
        self.index.insert(id.to_string(), slot);
        self.ids[slot] = Some(id.to_string());
        self.next = (slot + 1) % self.ids.len();
    }
}

pub struct InferenceWorker {
    pub shared: Arc<Shared>,
    pub backbone: Backbone,
    pub input: Arc<BoundedQueue<Incoming>>,
    pub train: Arc<BoundedQueue<TrainItem>>,
    pub client: AsyncClient,
    pub predictions_topic: String,
    pub class_names: Vec<String>,
    pub qos: QoS,
    pub max_batch: usize,
    pub feedback_capacity: usize,
}

impl InferenceWorker {
    pub fn run(mut self) {
        let len: usize = self.backbone.input_shape().iter().product();
        let dim = self.backbone.embedding_dim();
        let mut recent = RecentSamples::new(self.feedback_capacity, len, dim);
        let mut items = Vec::with_capacity(self.max_batch);
        let mut inputs: Vec<f32> = Vec::with_capacity(self.max_batch * len);
        let mut emb = Array2::zeros((0, dim));
        let mut probs = Array2::zeros((0, 0));
        let mut latencies: Vec<u64> = Vec::with_capacity(self.max_batch);
        while self
            .input
            .pop_batch(self.max_batch, Duration::from_millis(100), &mut items)
        {
            self.shared.beat(&self.shared.inference_beat);
            inputs.clear();
            let mut samples = 0;
            for item in &items {
                match item {
                    Incoming::Sample { x, .. } => {
                        inputs.extend_from_slice(x);
                        samples += 1;
                    }
                    Incoming::Feedback { id, label } => self.feedback(&recent, id, *label),
                }
            }
            if samples == 0 {
                continue;
            }
            if let Err(e) = self.backbone.embed_into(&inputs, samples, &mut emb) {
                tracing::error!("backbone failed on a batch of {samples}: {e}");
                self.shared
                    .counters
                    .rejected_total
                    .fetch_add(samples as u64, Relaxed);
                continue;
            }
            let teacher = self.shared.teacher();
            teacher.head.probs_into(emb.view(), &mut probs);
            let mut row = 0;
            for item in items.drain(..) {
                let Incoming::Sample {
                    x,
                    id,
                    label,
                    received,
                } = item
                else {
                    continue;
                };
                let (class, confidence) = argmax(probs.row(row));
                let name = self
                    .class_names
                    .get(class)
                    .map(String::as_str)
                    .unwrap_or("");
                let message = PredictionMessage {
                    id: &id,
                    class,
                    name,
                    confidence,
                    teacher_version: teacher.version,
                };
                let payload = serde_json::to_vec(&message).unwrap_or_default();
                if self
                    .client
                    .try_publish(&self.predictions_topic, self.qos, false, payload)
                    .is_err()
                {
                    self.shared
                        .counters
                        .publish_dropped_total
                        .fetch_add(1, Relaxed);
                }
                latencies.push(received.elapsed().as_micros() as u64);
                recent.insert(&id, &x, emb.row(row), class);
                let dropped = self.train.push(TrainItem {
                    x,
                    embedding: emb.row(row).to_vec(),
                    label,
                });
                self.shared
                    .counters
                    .dropped_total
                    .fetch_add(dropped as u64, Relaxed);
                row += 1;
            }
            // Counters and the latency window once per batch, not per sample.
            self.shared
                .counters
                .predictions_total
                .fetch_add(latencies.len() as u64, Relaxed);
            let mut window = self
                .shared
                .latency
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            latencies.drain(..).for_each(|micros| window.record(micros));
        }
    }

    /// A label for a recently predicted sample: score the prediction, then learn from it.
    fn feedback(&self, recent: &RecentSamples, id: &str, label: usize) {
        let c = &self.shared.counters;
        let Some(&slot) = recent.index.get(id) else {
            c.late_labels_total.fetch_add(1, Relaxed);
            return;
        };
        c.feedback_total.fetch_add(1, Relaxed);
        if recent.ring.truth(slot) == Some(label) {
            c.feedback_correct.fetch_add(1, Relaxed);
        }
        let item = TrainItem {
            x: recent.ring.input(slot).to_vec(),
            embedding: recent.ring.embedding(slot).to_vec(),
            label: Some(label),
        };
        self.train.push(item);
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
}

pub struct TrainerWorker {
    pub shared: Arc<Shared>,
    pub backbone: Backbone,
    pub queue: Arc<BoundedQueue<TrainItem>>,
    pub pretrained: LinearHead,
    pub sample_shape: Vec<usize>,
    pub learn: LearnConfig,
    pub augment: AugmentConfig,
    pub guard: GuardConfig,
    pub seed: u64,
    /// Where checkpoints (and exports) go, if anywhere.
    pub checkpoints: Option<CheckpointStore>,
    pub checkpoint_every_steps: u64,
    pub checkpoint_every: Duration,
    pub exporter: Exporter,
}

/// What `export` needs to write the teacher back into the original graph.
pub struct Exporter {
    pub proto: tract_onnx::pb::ModelProto,
    pub head: crate::model::TrainableSpec,
    pub fingerprint: u64,
}

impl TrainerWorker {
    fn fresh_learner(&self) -> Learner {
        Learner::new(
            self.pretrained.clone(),
            &self.sample_shape,
            self.learn.clone(),
            self.augment.clone(),
            self.seed,
        )
        .with_guard(self.guard.clone())
    }

    pub fn run(mut self) {
        let mut learner = self.fresh_learner();
        if let Some(store) = &self.checkpoints {
            store.restore_latest(&mut learner);
        }
        self.shared.publish_teacher(TeacherSnapshot {
            head: learner.teacher.clone(),
            version: learner.counters.teacher_version,
        });
        let store = self.checkpoints.take();
        let (writer_tx, writer) = match store {
            Some(store) => {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Snapshot>(2);
                let shared = self.shared.clone();
                let handle = std::thread::Builder::new()
                    .name("checkpoints".into())
                    .spawn(move || write_checkpoints(store, rx, shared))
                    .ok();
                (Some(tx), handle)
            }
            None => (None, None),
        };
        let mut last_saved = (learner.counters.train_steps, Instant::now());
        let mut items = Vec::with_capacity(64);
        while self
            .queue
            .pop_batch(64, Duration::from_millis(100), &mut items)
        {
            self.shared.beat(&self.shared.trainer_beat);
            if self.shared.reset_requested.swap(false, Relaxed) {
                // Back to the pretrained head; the version keeps counting up so dashboards
                // and clients can tell a reset teacher from an old one.
                let version = learner.counters.teacher_version + 1;
                learner = self.fresh_learner();
                learner.counters.teacher_version = version;
                self.shared.publish_teacher(TeacherSnapshot {
                    head: learner.teacher.clone(),
                    version,
                });
                self.shared
                    .train
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .resets += 1;
            }
            for item in items.drain(..) {
                learner.observe(&item.x, ArrayView1::from(&item.embedding), item.label, None);
                if item.label.is_some() {
                    self.shared.counters.labels_total.fetch_add(1, Relaxed);
                }
                if self.shared.paused.load(Relaxed)
                    || self.shared.stopping.load(Relaxed)
                    || !learner.due()
                {
                    continue;
                }
                self.step(&mut learner);
            }
            let steps = learner.counters.train_steps;
            let periodic = steps >= last_saved.0 + self.checkpoint_every_steps
                || (steps > last_saved.0 && last_saved.1.elapsed() >= self.checkpoint_every);
            let asked = self.shared.checkpoint_requested.swap(false, Relaxed);
            if let Some(tx) = &writer_tx {
                if periodic || asked {
                    // A full writer queue means a save is already on its way; skip this one.
                    let _ = tx.try_send(Snapshot::of(&learner));
                    last_saved = (steps, Instant::now());
                }
            } else if asked {
                tracing::warn!("checkpoint requested, but no checkpoint directory is configured ([checkpoint] dir or $STATE_DIRECTORY)");
            }
            if self.shared.export_requested.swap(false, Relaxed) {
                self.export(&learner);
            }
            self.publish_stats(&learner);
        }
        if let Some(tx) = writer_tx {
            // The final state, then wait for the writer to finish it.
            let _ = tx.send(Snapshot::of(&learner));
            drop(tx);
            if let Some(w) = writer {
                let _ = w.join();
            }
        }
        self.publish_stats(&learner);
    }

    fn step(&mut self, learner: &mut Learner) {
        match learner.step(&mut self.backbone) {
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
                    self.shared.publish_teacher(TeacherSnapshot {
                        head: learner.teacher.clone(),
                        version: learner.counters.teacher_version,
                    });
                }
            }
            Ok(None) => {
                tracing::warn!("skipped a training step with a non-finite loss or gradient")
            }
            Err(e) => tracing::error!("training step failed: {e}"),
        }
    }

    fn export(&self, learner: &Learner) {
        let Some(dir) = &self.shared.state_dir else {
            tracing::warn!(
                "export requested, but no checkpoint directory is configured to write it to"
            );
            return;
        };
        let e = &self.exporter;
        let meta = [
            ("edgemt.adapted_from", format!("{:016x}", e.fingerprint)),
            (
                "edgemt.teacher_version",
                learner.counters.teacher_version.to_string(),
            ),
        ];
        let path = dir.join("adapted.onnx");
        let result =
            crate::model::export::export_with_head(&e.proto, &e.head, &learner.teacher, &meta)
                .map_err(|err| err.to_string())
                .and_then(|bytes| {
                    let tmp = dir.join("adapted.onnx.tmp");
                    std::fs::write(&tmp, bytes)
                        .and_then(|_| std::fs::rename(&tmp, &path))
                        .map_err(|err| err.to_string())
                });
        match result {
            Ok(()) => {
                self.shared.counters.exports_total.fetch_add(1, Relaxed);
                tracing::info!(
                    "exported teacher_version {} to {}",
                    learner.counters.teacher_version,
                    path.display()
                );
            }
            Err(err) => tracing::error!("export to {} failed: {err}", path.display()),
        }
    }

    fn publish_stats(&self, learner: &Learner) {
        let mut t = self.shared.train.lock().unwrap_or_else(|e| e.into_inner());
        t.train_steps = learner.counters.train_steps;
        t.ema_updates = learner.counters.ema_updates;
        t.skipped_nonfinite = learner.counters.skipped_nonfinite;
        t.rollbacks = learner.counters.rollbacks;
        t.labeled_buffer = learner.labeled.len();
        t.unlabeled_buffer = learner.unlabeled.len();
        t.teacher_finite = learner.teacher.is_finite() && learner.student.is_finite();
    }
}

/// The checkpoint writer thread: saves what it is sent, so the trainer never waits on disk.
fn write_checkpoints(
    mut store: CheckpointStore,
    rx: std::sync::mpsc::Receiver<Snapshot>,
    shared: Arc<Shared>,
) {
    while let Ok(snapshot) = rx.recv() {
        match store.save(&snapshot) {
            Ok(m) => {
                shared.counters.checkpoints_total.fetch_add(1, Relaxed);
                tracing::debug!(
                    "checkpoint {} written (teacher_version {})",
                    m.sequence,
                    m.counters.teacher_version
                );
            }
            Err(e) => tracing::error!("{e}"),
        }
    }
}
