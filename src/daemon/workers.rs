//! The two worker threads: inference (one batched backbone pass, the served model's answers,
//! predictions out through a [`PredictionSink`]) and training (a [`Session`] driven through
//! [`Session::take`], the loop body replay runs too: learning, EMA, checkpoints, teacher
//! swaps). They are plain threads because both are CPU-bound and synchronous; they meet only
//! through bounded queues and the shared teacher pointer, so inference never waits on
//! training.
//!
//! Items keep their arrival order from the MQTT task to the session: a label sent right
//! after its sample is filed after that sample, even within one batch.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::DaemonConfig;
use super::items::{Incoming, TrainItem};
use super::publish::{PredictionSink, RequestSink, Sinks};
use super::queue::BoundedQueue;
use super::ratelimit::RateLimitedLog;
use super::state::{Shared, TeacherSnapshot};
use crate::calibration::SignedPerm;
use crate::checkpoint::Saved;
use crate::checkpoint::{CheckpointStore, CheckpointWriter, Offered};
use crate::config::Config;
use crate::learn::Serving;
use crate::model::Classifier;
use crate::scores::RecentAccuracy;
use crate::session::{Answer, PredictionMessage, Predictor, Session, SessionError, Taken};

/// The two worker stages, wired to each other through the training queue: what
/// `Daemon::build` puts on threads, and what the equivalence test
/// drives in-process, batch by batch.
pub struct Workers {
    pub inference: InferenceWorker,
    pub trainer: TrainerWorker,
}

impl Workers {
    /// Workers for `classifier` with the core's and the daemon's knobs: inference reads
    /// `input` and publishes predictions through `sinks`; training publishes its label
    /// requests there too and keeps its checkpoints in `checkpoints`, if any.
    pub fn new(
        cfg: &Config,
        wing: &DaemonConfig,
        classifier: &Classifier,
        shared: Arc<Shared>,
        queues: (Arc<BoundedQueue<Incoming>>, Arc<BoundedQueue<TrainItem>>),
        sinks: Sinks,
        checkpoints: Option<CheckpointStore>,
    ) -> Result<Workers, SessionError> {
        let (input, train) = queues;
        let inference = InferenceWorker {
            shared: shared.clone(),
            predictor: Predictor::new(classifier.backbone.clone()),
            input,
            train: train.clone(),
            sink: sinks.predictions,
            class_names: classifier.class_names.clone(),
            max_batch: wing.input.max_batch,
            sample_len: classifier.sample_len(),
            latency_histogram: None,
            state_every: crate::config::duration_s(wing.metrics.state_interval_s),
            scratch: Scratch::default(),
        };
        let trainer = TrainerWorker {
            shared,
            session: Session::new(classifier, cfg, wing.daemon.seed)?,
            queue: train,
            // Every save goes through the write budget ([checkpoint] max_mib_per_day).
            checkpoints: checkpoints.map(|store| {
                CheckpointWriter::new(store, cfg.checkpoint.max_mib_per_day, Instant::now())
            }),
            exporter: Exporter {
                proto: classifier.proto().clone(),
                trainable: classifier.trainable.clone(),
                input_shape: classifier.input_shape.clone(),
                fingerprint: classifier.fingerprint,
            },
            published: (Serving::Pretrained, SignedPerm::IDENTITY),
            recent_feedback: RecentAccuracy::new(wing.metrics.recent_labels),
            writer: None,
            requests: sinks.requests,
            published_request: None,
            class_names: classifier.class_names.clone(),
            owed_steps: 0,
        };
        Ok(Workers { inference, trainer })
    }
}

pub struct InferenceWorker {
    pub shared: Arc<Shared>,
    pub predictor: Predictor,
    pub input: Arc<BoundedQueue<Incoming>>,
    pub train: Arc<BoundedQueue<TrainItem>>,
    pub sink: Box<dyn PredictionSink>,
    pub class_names: Vec<String>,
    pub max_batch: usize,
    pub sample_len: usize,
    /// The Prometheus latency histogram, when the endpoint is on.
    pub latency_histogram: Option<prometheus_client::metrics::histogram::Histogram>,
    /// How often the retained current activity is refreshed.
    pub state_every: Duration,
    pub scratch: Scratch,
}

impl InferenceWorker {
    pub fn run(mut self) {
        let mut items = Vec::with_capacity(self.max_batch);
        self.scratch.reserve(self.max_batch, self.sample_len);
        while self
            .input
            .pop_batch(self.max_batch, Duration::from_millis(100), &mut items)
        {
            self.shared.beat(&self.shared.inference_beat);
            self.answer_batch(&mut items);
        }
    }

    /// One turn of the inference stage: embeds the batch's samples in one backbone pass,
    /// publishes the served model's answers through the sink and hands every item on to
    /// training in arrival order. `items` is left empty.
    pub fn answer_batch(&mut self, items: &mut Vec<Incoming>) {
        let counters = &self.shared.counters;
        let Scratch {
            inputs,
            answers,
            latencies,
            state_at,
        } = &mut self.scratch;
        inputs.clear();
        let mut samples = 0;
        for item in items.iter() {
            if let Incoming::Sample { x, .. } = item {
                inputs.extend_from_slice(x);
                samples += 1;
            }
        }
        let teacher = self.shared.teacher();
        let embedded = samples == 0
            || match self
                .predictor
                .embed(inputs, samples, teacher.mounting.as_ref())
            {
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
        if embedded {
            self.predictor
                .answer(0..samples, &teacher.models(), answers);
        }
        let mut row = 0;
        let mut published = 0;
        // The retained state gets the batch's latest prediction, at most once a period: the
        // payload of that one row is copied, not every row's.
        let state_row = if state_at.is_none_or(|t| t.elapsed() >= self.state_every) && embedded {
            answers.iter().rposition(Option::is_some)
        } else {
            None
        };
        let mut latest: Option<Vec<u8>> = None;
        for item in items.drain(..) {
            let (x, id, label, received) = match item {
                Incoming::Feedback { id, label, source } => {
                    let dropped = self.train.push(TrainItem::Feedback { id, label, source });
                    count_drop(&self.shared, dropped);
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
            let Some(answer) = answers[r] else {
                // The prediction path refused it (its embedding is not usable).
                counters.rejected_total.fetch_add(1, Relaxed);
                counters.unembeddable_total.fetch_add(1, Relaxed);
                continue;
            };
            let message = PredictionMessage {
                id: Some(&id),
                ..PredictionMessage::new(&answer, &self.class_names, teacher.version)
            };
            let payload = serde_json::to_vec(&message).unwrap_or_default();
            if state_row == Some(r) {
                latest = Some(payload.clone());
            }
            if self.sink.prediction(payload) {
                published += 1;
            } else {
                counters.predictions_dropped_total.fetch_add(1, Relaxed);
            }
            latencies.push(received.elapsed().as_micros() as u64);
            let dropped = self.train.push(TrainItem::Sample {
                id,
                x,
                embedding: self.predictor.embeddings().row(r).to_vec(),
                label,
                predicted: answer.served.class,
                mounting: teacher
                    .mounting
                    .as_ref()
                    .map_or(SignedPerm::IDENTITY, |m| m.r()),
            });
            count_drop(&self.shared, dropped);
        }
        if let Some(state) = latest {
            *state_at = Some(Instant::now());
            if !self.sink.state(state) {
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

/// Counts an item the full training queue dropped.
fn count_drop(shared: &Shared, dropped: Option<TrainItem>) {
    if let Some(d) = dropped {
        let c = &shared.counters;
        c.count_drop(&c.train_dropped_total, &d);
    }
}

/// The inference stage's reusable buffers, so a batch allocates nothing of its own beyond
/// the items it hands on.
#[derive(Default)]
pub struct Scratch {
    inputs: Vec<f32>,
    answers: Vec<Option<Answer>>,
    latencies: Vec<u64>,
    /// When the retained state was last refreshed.
    state_at: Option<Instant>,
}

impl Scratch {
    fn reserve(&mut self, max_batch: usize, sample_len: usize) {
        self.inputs.reserve(max_batch * sample_len);
        self.answers.reserve(max_batch);
        self.latencies.reserve(max_batch);
    }
}

pub struct TrainerWorker {
    pub shared: Arc<Shared>,
    pub session: Session,
    pub queue: Arc<BoundedQueue<TrainItem>>,
    /// Where checkpoints go, if anywhere, behind the write budget.
    pub checkpoints: Option<CheckpointWriter>,
    pub exporter: Exporter,
    /// What the inference thread was last handed.
    pub published: (Serving, SignedPerm),
    /// The served model's record on the most recent labels.
    pub recent_feedback: RecentAccuracy,
    /// The checkpoint writer thread's queue, while it runs.
    pub writer: Option<std::sync::mpsc::SyncSender<Saved>>,
    /// Where the open label request is announced.
    pub requests: Box<dyn RequestSink>,
    /// The open request's id last announced (`Some(None)`: that none is open; `None`:
    /// nothing announced yet).
    pub published_request: Option<Option<String>>,
    pub class_names: Vec<String>,
    /// Student steps deferred while inference had a backlog, still to take.
    pub owed_steps: usize,
}

/// Most deferred steps kept owing: after a long overload the trainer catches up at most
/// this many (about a third of a second of CPU here), not every step the burst skipped.
const MAX_OWED_STEPS: usize = 256;

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

    /// Restores the newest checkpoint, if any, and hands inference the model to serve.
    pub fn begin(&mut self) {
        if let Some(writer) = &self.checkpoints {
            self.session.restore(writer.store());
        }
        self.publish_teacher();
        // Replaces whatever request a previous run left retained.
        self.sync_request();
    }

    /// Announces the open label request (retained) and tells ingest where an answer goes,
    /// when it changed. A request the transport could not take is announced next turn.
    fn sync_request(&mut self) {
        let Some(requests) = self.session.requests() else {
            return;
        };
        let open = requests.newest_open();
        let id = open.map(|r| r.id.as_str());
        if self.published_request.as_ref().map(Option::as_deref) == Some(id) {
            return;
        }
        let name = |k: usize| self.class_names.get(k).map_or("?", String::as_str);
        let payload = match open {
            None => serde_json::json!({ "open": false }),
            Some(r) => {
                let age = (self.session.requests_clock_s() - r.asked_s).max(0.0);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                serde_json::json!({
                    "open": true,
                    "id": r.id,
                    "reason": r.reason,
                    "served": name(r.served.class),
                    "confidence": r.served.confidence,
                    "adapted": name(r.adapted.class),
                    "pretrained": name(r.pretrained.class),
                    "asked_at": (now - age).round(),
                    "expires_in_s": (requests.config().open_s - age).max(0.0).round(),
                    "options": self.class_names,
                })
            }
        };
        let id = id.map(str::to_owned);
        self.shared.set_open_request(id.clone());
        if self
            .requests
            .label_request(payload.to_string().into_bytes())
        {
            self.published_request = Some(id);
        }
    }

    pub fn run(mut self) {
        super::priority::lower_current_thread("training");
        self.begin();
        let (writer_tx, writer_thread) = match self.checkpoints.take() {
            Some(writer) => {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Saved>(2);
                let shared = self.shared.clone();
                let handle = std::thread::Builder::new()
                    .name("checkpoints".into())
                    .spawn(move || write_checkpoints(writer, rx, shared))
                    .ok();
                (Some(tx), handle)
            }
            None => (None, None),
        };
        self.writer = writer_tx;
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
            if self.shared.accept_requested.swap(false, Relaxed) {
                let n = self.session.accept_labels();
                tracing::info!("accepted {n} held labels; their class pairs are no longer checked");
            }
            if self.shared.checkpoint_requested.swap(false, Relaxed) {
                if self.writer.is_some() {
                    self.session.request_checkpoint();
                } else {
                    tracing::warn!("checkpoint requested, but no checkpoint directory is configured ([checkpoint] dir or $STATE_DIRECTORY)");
                }
            }
            self.take_batch(&mut items);
            self.session.expire_requests();
            self.sync_request();
            if let Some(tx) = &self.writer {
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
        if let Some(tx) = self.writer.take() {
            // The final state, then wait for the writer to finish it.
            self.session.request_checkpoint();
            if let Some(state) = self.session.take_checkpoint(Instant::now()) {
                let _ = tx.send(state);
            }
            drop(tx);
            if let Some(w) = writer_thread {
                let _ = w.join();
            }
        }
        self.publish_stats();
    }

    /// One turn of the training stage: every item through [`Session::take`] in arrival
    /// order, the served model handed to inference when it changed, checkpoints queued for
    /// the writer when due. `items` is left empty.
    pub fn take_batch(&mut self, items: &mut Vec<TrainItem>) {
        let halted = self.shared.paused.load(Relaxed) || self.shared.stopping.load(Relaxed);
        for item in items.drain(..) {
            // Answers come first: while samples wait for inference, a due step waits too
            // (the item is still filed), so learning only takes CPU that inference leaves.
            let yielding = !halted && self.shared.inference_backlog();
            self.session.set_paused(halted || yielding);
            let result = self.session.take(item.as_item());
            if yielding && self.session.step_due() {
                self.shared
                    .counters
                    .steps_deferred_total
                    .fetch_add(1, Relaxed);
                self.owed_steps = (self.owed_steps + 1).min(MAX_OWED_STEPS);
            }
            self.after_take(result);
            self.hand_over();
        }
        self.catch_up(halted);
    }

    /// After anything that may have changed the session: the served model to inference if
    /// it changed (a gate switch, a rollback, an EMA refresh, a new mounting), a checkpoint to
    /// the writer if one is due.
    fn hand_over(&mut self) {
        if (self.session.serving(), self.session.mounting_r()) != self.published {
            self.publish_teacher();
        }
        if let Some(tx) = &self.writer {
            if let Some(state) = self.session.take_checkpoint(Instant::now()) {
                // A full writer queue means a save is already on its way.
                let _ = tx.try_send(state);
            }
        }
    }

    /// Takes the steps deferred while inference had a backlog, one at a time and only while
    /// it still has none, so learning keeps its pace without ever holding up an answer.
    fn catch_up(&mut self, halted: bool) {
        while self.owed_steps > 0 && !halted && !self.shared.inference_backlog() {
            self.owed_steps -= 1;
            self.session.set_paused(false);
            match self.session.catch_up() {
                Ok(Some(step)) => self.after_step(&step),
                Ok(None) => {}
                Err(e) => tracing::error!("training step failed: {}", crate::report(&e)),
            }
            self.hand_over();
        }
    }

    fn after_take(&mut self, result: Result<Taken, SessionError>) {
        let taken = match result {
            Ok(taken) => taken,
            Err(e) => return tracing::error!("training step failed: {}", crate::report(&e)),
        };
        if let Some(correct) = taken.scored {
            self.recent_feedback.update(correct);
        }
        if taken.request.is_some() || taken.feedback.is_some() {
            self.sync_request();
        }
        if let Some(step) = taken.step {
            self.after_step(&step);
        }
    }

    fn after_step(&mut self, step: &crate::learn::StepReport) {
        self.shared
            .train
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interval
            .add(step);
        if step.ema_updated || step.rollback.is_some() {
            self.publish_teacher();
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
        let path = dir.join("adapted.onnx");
        let mounting = self.session.mounting_record();
        let result = crate::model::export::write_adapted(
            &path,
            &e.proto,
            &e.trainable,
            &e.input_shape,
            // The model the device serves, as `edgemt export` writes by default: a user
            // exporting "the device's model" gets the one that answers.
            &crate::model::export::Adapted {
                head: self.session.served(),
                mounting: mounting.as_ref().map(Into::into),
                from_fingerprint: e.fingerprint,
                teacher_version: version,
            },
        );
        match result {
            Ok(()) => {
                self.shared.counters.exports_total.fetch_add(1, Relaxed);
                tracing::info!(
                    "exported the served model, {}, to {} (teacher_version {version}), because {}",
                    self.session
                        .serving()
                        .describe(mounting.as_ref().map(|m| m.name.as_str())),
                    path.display(),
                    self.session.learner().serving_reason()
                );
            }
            Err(err) => {
                // write_adapted has removed its temporary file; the old export, if any, stays.
                self.shared
                    .counters
                    .export_failures_total
                    .fetch_add(1, Relaxed);
                tracing::error!("export failed: {}", crate::report(&err));
            }
        }
    }

    fn publish_stats(&self) {
        let l = self.session.learner();
        let c = l.counters();
        let s = self.session.stats();
        let counters = &self.shared.counters;
        counters.labels_total.store(s.labels, Relaxed);
        counters.feedback_total.store(s.feedback.total, Relaxed);
        counters.feedback_correct.store(s.feedback.correct, Relaxed);
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
        let trust = l.trust();
        t.trust = trust.counts();
        t.labels_holding = trust.held_len();
        t.labels_disputed = trust.disputed().is_some();
        t.inputs_atypical = trust.inputs_atypical();
        t.calibration_changes = s.calibration_changes;
        if let Some(r) = self.session.requests() {
            t.requests = r.counts();
            t.requests_open = r.open().count();
        }
        t.feedback_accuracy_recent = self.recent_feedback.get();
        t.label_accuracy = self.session.label_accuracy();
    }
}

/// The checkpoint writer thread: saves what it is sent, so the trainer never waits on disk,
/// through the write budget (a deferred state is written when the budget allows, or at the
/// end: the trainer's last state is always written once the channel closes).
fn write_checkpoints(
    mut writer: CheckpointWriter,
    rx: std::sync::mpsc::Receiver<Saved>,
    shared: Arc<Shared>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    super::priority::lower_current_thread("checkpoint writer");
    // A save that fails keeps failing (a full or read-only disk) at every due save or
    // command: the first says why, then one line a minute.
    let mut failures = RateLimitedLog::new(1, Duration::from_secs(60)).about("failed checkpoints");
    // While a state waits for the budget, look again this often.
    let budget_poll = Duration::from_secs(1);
    loop {
        let received = if writer.has_pending() {
            rx.recv_timeout(budget_poll)
        } else {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        let now = Instant::now();
        let (result, last) = match received {
            Ok(state) => match writer.offer(state, now) {
                Ok(Offered::Written(m)) => (Some(Ok(*m)), false),
                Ok(Offered::Deferred { wait_s }) => {
                    tracing::debug!(
                        "checkpoint deferred by the write budget ([checkpoint] max_mib_per_day) for {wait_s:.0} s"
                    );
                    (None, false)
                }
                Err(e) => (Some(Err(e)), false),
            },
            Err(RecvTimeoutError::Timeout) => (writer.poll(now), false),
            Err(RecvTimeoutError::Disconnected) => (writer.finish(None, now), true),
        };
        match result {
            Some(Ok(m)) => tracing::debug!(
                "checkpoint {} written (teacher_version {})",
                m.sequence,
                m.counters.teacher_version
            ),
            Some(Err(e)) => {
                // An alarm, not a shrug: the last good checkpoint stays, but nothing newer
                // will be kept until this is fixed.
                shared
                    .counters
                    .checkpoint_failures_total
                    .fetch_add(1, Relaxed);
                failures.error(format_args!(
                    "checkpoint not written: {}",
                    crate::report(&e)
                ));
            }
            None => {}
        }
        let totals = writer.totals();
        let c = &shared.counters;
        c.checkpoints_total.store(totals.written, Relaxed);
        c.checkpoint_bytes_total.store(totals.bytes, Relaxed);
        c.checkpoints_deferred_total.store(totals.deferred, Relaxed);
        if last {
            break;
        }
    }
}
