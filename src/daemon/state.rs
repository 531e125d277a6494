//! State shared by the daemon's tasks and threads: counters, the deployed teacher, and the
//! metrics message built from them.
//!
//! The teacher is published as an `Arc` behind a lock that is only ever held to clone or swap
//! the pointer, so the inference thread never waits for a training step.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;

use super::queue::Droppable;
use crate::calibration::Mounting;
use crate::learn::Serving;
use crate::metrics::LatencyWindow;
use crate::nn::Mlp;
use crate::scores::StepTotals;
use crate::session::Models;

/// The model in service (the adapted teacher or the pretrained model, as the serving gate
/// decides) and the teacher's version.
#[derive(Debug, Clone)]
pub struct TeacherSnapshot {
    pub head: Mlp,
    pub version: u64,
    pub serving: Serving,
    /// The adopted calibration, applied to raw samples before the model.
    pub mounting: Option<Mounting>,
}

impl TeacherSnapshot {
    /// The models the inference thread asks: only the served one (nobody scores the others
    /// on the device).
    pub fn models(&self) -> Models<'_> {
        Models {
            served: &self.head,
            serving: self.serving,
            mounting: self.mounting.as_ref(),
            teacher: None,
            pretrained: None,
        }
    }
}

/// Monotonic counters (atomics, so any thread bumps them without a lock).
#[derive(Debug, Default)]
pub struct Counters {
    /// Valid samples taken in. Each ends in exactly one of: `predictions_total`,
    /// `predictions_dropped_total`, `dropped_total` or `unembeddable_total`.
    pub samples_total: AtomicU64,
    /// Predictions handed to the MQTT client.
    pub predictions_total: AtomicU64,
    /// Predictions made but not published (the client's request queue was full).
    pub predictions_dropped_total: AtomicU64,
    /// Messages on samples/rows/labels dropped unread because the parser was behind.
    pub unread_dropped_total: AtomicU64,
    /// Samples dropped from the full input queue before prediction.
    pub dropped_total: AtomicU64,
    /// Predicted samples dropped from the full training queue before learning.
    pub train_dropped_total: AtomicU64,
    /// Labeled samples and labels dropped from either queue (only when labeled items alone
    /// fill it).
    pub labeled_dropped_total: AtomicU64,
    /// Samples whose embedding came out non-finite or absurd: neither published nor learned.
    pub unembeddable_total: AtomicU64,
    /// Messages refused for any reason (these and the unembeddable samples).
    pub rejected_total: AtomicU64,
    /// Of those: payloads over `mqtt.max_payload_bytes` (or packets over the client's limit).
    pub oversized_total: AtomicU64,
    /// Retained messages on input topics: stale or planted, never acted on.
    pub retained_ignored_total: AtomicU64,
    /// Commands not in `[control] allow`.
    pub commands_refused_total: AtomicU64,
    /// Checkpoints that could not be written (a non-finite state, a full disk).
    pub checkpoint_failures_total: AtomicU64,
    pub labels_total: AtomicU64,
    pub feedback_total: AtomicU64,
    pub feedback_correct: AtomicU64,
    pub late_labels_total: AtomicU64,
    pub publish_dropped_total: AtomicU64,
    pub commands_total: AtomicU64,
    pub checkpoints_total: AtomicU64,
    pub exports_total: AtomicU64,
    pub mqtt_reconnects_total: AtomicU64,
    pub mqtt_disconnected_ms_total: AtomicU64,
}

/// What the trainer thread last reported.
#[derive(Debug, Clone, Default)]
pub struct TrainStats {
    pub train_steps: u64,
    pub ema_updates: u64,
    pub skipped_nonfinite: u64,
    pub labeled_buffer: usize,
    pub unlabeled_buffer: usize,
    pub teacher_finite: bool,
    /// Sums over the steps since the last metrics message.
    pub interval: StepTotals,
    pub resets: u64,
    pub rollbacks: u64,
    pub gate_wins: u64,
    pub gate_losses: u64,
    pub gate_p: f64,
    pub gate_switches: u64,
    pub calibration_changes: u64,
    /// Share of the most recent labels (`[metrics] recent_labels`) the served model got right.
    pub feedback_accuracy_recent: Option<f64>,
}

pub struct Shared {
    pub started: Instant,
    pub counters: Counters,
    pub latency: Mutex<LatencyWindow>,
    pub train: Mutex<TrainStats>,
    teacher: RwLock<Arc<TeacherSnapshot>>,
    pub paused: AtomicBool,
    pub reset_requested: AtomicBool,
    pub checkpoint_requested: AtomicBool,
    pub export_requested: AtomicBool,
    /// Checkpoint directory (also where `export` writes), if any.
    pub state_dir: Option<std::path::PathBuf>,
    /// Set on shutdown: stop taking input.
    pub stopping: AtomicBool,
    pub connected: AtomicBool,
    /// Milliseconds since `started` of each worker's last loop turn (for the watchdog).
    pub inference_beat: AtomicU64,
    pub trainer_beat: AtomicU64,
    last_report: Mutex<(Instant, u64)>,
    /// One limit for every "rejected a message" line, whichever stage rejects it.
    rejections: Mutex<super::ingest::RateLimitedLog>,
}

impl Counters {
    /// Counts an item a full queue dropped: a sample in that queue's own counter, and a
    /// label (a labeled sample or label feedback) in `labeled_dropped_total` as well.
    pub fn count_drop(&self, queue_counter: &AtomicU64, dropped: &impl Droppable) {
        if dropped.is_sample() {
            queue_counter.fetch_add(1, Relaxed);
        }
        if !dropped.droppable() {
            self.labeled_dropped_total.fetch_add(1, Relaxed);
        }
    }
}

impl Shared {
    pub fn new(teacher: Mlp, state_dir: Option<std::path::PathBuf>) -> Self {
        let now = Instant::now();
        Shared {
            started: now,
            counters: Counters::default(),
            latency: Mutex::new(LatencyWindow::new(65_536)),
            train: Mutex::new(TrainStats {
                teacher_finite: true,
                ..Default::default()
            }),
            teacher: RwLock::new(Arc::new(TeacherSnapshot {
                head: teacher,
                version: 0,
                serving: Serving::Pretrained,
                mounting: None,
            })),
            paused: AtomicBool::new(false),
            reset_requested: AtomicBool::new(false),
            checkpoint_requested: AtomicBool::new(false),
            export_requested: AtomicBool::new(false),
            state_dir,
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            inference_beat: AtomicU64::new(0),
            trainer_beat: AtomicU64::new(0),
            last_report: Mutex::new((now, 0)),
            rejections: Mutex::new(super::ingest::RateLimitedLog::new(
                5,
                std::time::Duration::from_secs(10),
            )),
        }
    }

    pub fn teacher(&self) -> Arc<TeacherSnapshot> {
        self.teacher
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn publish_teacher(&self, snapshot: TeacherSnapshot) {
        *self.teacher.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    /// Logs a refused message at warn, at most 5 lines per 10 s.
    pub fn log_rejection(&self, msg: std::fmt::Arguments) {
        self.rejections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warn(msg);
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn beat(&self, which: &AtomicU64) {
        which.store(self.now_ms(), Relaxed);
    }

    /// Builds the flat metrics message and starts a new reporting window.
    pub fn metrics(&self) -> MetricsMessage {
        let c = &self.counters;
        let samples_total = c.samples_total.load(Relaxed);
        let now = Instant::now();
        let samples_per_s = {
            let mut last = self.last_report.lock().unwrap_or_else(|e| e.into_inner());
            let dt = now.duration_since(last.0).as_secs_f64();
            let rate = if dt > 0.0 {
                (samples_total - last.1) as f64 / dt
            } else {
                0.0
            };
            *last = (now, samples_total);
            rate
        };
        // An interval without data reports no value (null), not a zero that looks measured.
        let percentiles = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_percentiles();
        let mut t = self.train.lock().unwrap_or_else(|e| e.into_inner());
        let interval = t.interval.take();
        let feedback = c.feedback_total.load(Relaxed);
        let served = self.teacher();
        let msg = MetricsMessage {
            samples_total,
            samples_per_s,
            predictions_total: c.predictions_total.load(Relaxed),
            predictions_dropped_total: c.predictions_dropped_total.load(Relaxed),
            latency_p50_us: percentiles.map(|p| p.0 as u64),
            latency_p99_us: percentiles.map(|p| p.1 as u64),
            loss_sup: interval.mean_sup(),
            loss_pseudo: interval.mean_pseudo(),
            loss_consistency: interval.mean_consistency(),
            pseudo_acceptance: interval.acceptance(),
            teacher_version: served.version,
            serving_adapted: (served.serving == Serving::Adapted) as u8,
            gate_wins: t.gate_wins,
            gate_losses: t.gate_losses,
            gate_p: Some(t.gate_p).filter(|p| p.is_finite()),
            gate_switches_total: t.gate_switches,
            mounting_adopted: served.mounting.is_some() as u8,
            calibration_changes_total: t.calibration_changes,
            ema_updates: t.ema_updates,
            train_steps: t.train_steps,
            skipped_nonfinite: t.skipped_nonfinite,
            labeled_buffer: t.labeled_buffer as u64,
            unlabeled_buffer: t.unlabeled_buffer as u64,
            unread_dropped_total: c.unread_dropped_total.load(Relaxed),
            dropped_total: c.dropped_total.load(Relaxed),
            train_dropped_total: c.train_dropped_total.load(Relaxed),
            labeled_dropped_total: c.labeled_dropped_total.load(Relaxed),
            unembeddable_total: c.unembeddable_total.load(Relaxed),
            rejected_total: c.rejected_total.load(Relaxed),
            oversized_total: c.oversized_total.load(Relaxed),
            retained_ignored_total: c.retained_ignored_total.load(Relaxed),
            commands_refused_total: c.commands_refused_total.load(Relaxed),
            labels_total: c.labels_total.load(Relaxed),
            feedback_total: feedback,
            feedback_accuracy: (feedback > 0)
                .then(|| c.feedback_correct.load(Relaxed) as f64 / feedback as f64),
            feedback_accuracy_recent: t.feedback_accuracy_recent,
            late_labels_total: c.late_labels_total.load(Relaxed),
            publish_dropped_total: c.publish_dropped_total.load(Relaxed),
            commands_total: c.commands_total.load(Relaxed),
            resets_total: t.resets,
            rollbacks_total: t.rollbacks,
            checkpoints_total: c.checkpoints_total.load(Relaxed),
            checkpoint_failures_total: c.checkpoint_failures_total.load(Relaxed),
            exports_total: c.exports_total.load(Relaxed),
            paused: self.paused.load(Relaxed) as u8,
            teacher_finite: t.teacher_finite as u8,
            mqtt_connected: self.connected.load(Relaxed) as u8,
            mqtt_reconnects_total: c.mqtt_reconnects_total.load(Relaxed),
            mqtt_disconnected_s_total: c.mqtt_disconnected_ms_total.load(Relaxed) as f64 / 1000.0,
            rss_bytes: crate::metrics::rss_bytes(),
            peak_rss_bytes: crate::metrics::peak_rss_bytes(),
            uptime_s: self.started.elapsed().as_secs_f64(),
        };
        drop(t);
        msg
    }
}

/// `{prefix}/metrics`: flat JSON of numbers, as Telegraf's JSON parser and Grafana read it.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsMessage {
    pub samples_total: u64,
    pub samples_per_s: f64,
    pub predictions_total: u64,
    pub predictions_dropped_total: u64,
    /// Receipt to publish over the interval; null when no sample was predicted in it.
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// Means over the interval's steps; null when no step ran in it.
    pub loss_sup: Option<f64>,
    pub loss_pseudo: Option<f64>,
    pub loss_consistency: Option<f64>,
    pub pseudo_acceptance: Option<f64>,
    pub teacher_version: u64,
    /// 1 while the serving gate serves the adapted teacher, 0 while the pretrained model.
    pub serving_adapted: u8,
    pub gate_wins: u64,
    pub gate_losses: u64,
    /// The sign test's p-value; null before it has evidence.
    pub gate_p: Option<f64>,
    pub gate_switches_total: u64,
    /// 1 while calibration has a mounting other than the device's own axes adopted.
    pub mounting_adopted: u8,
    pub calibration_changes_total: u64,
    pub ema_updates: u64,
    pub train_steps: u64,
    pub skipped_nonfinite: u64,
    pub labeled_buffer: u64,
    pub unlabeled_buffer: u64,
    pub unread_dropped_total: u64,
    pub dropped_total: u64,
    pub train_dropped_total: u64,
    pub labeled_dropped_total: u64,
    pub unembeddable_total: u64,
    pub rejected_total: u64,
    pub oversized_total: u64,
    pub retained_ignored_total: u64,
    pub commands_refused_total: u64,
    pub labels_total: u64,
    pub feedback_total: u64,
    /// Since start; null before the first label.
    pub feedback_accuracy: Option<f64>,
    /// Over the most recent labels, so drift shows.
    pub feedback_accuracy_recent: Option<f64>,
    pub late_labels_total: u64,
    pub publish_dropped_total: u64,
    pub commands_total: u64,
    pub resets_total: u64,
    pub rollbacks_total: u64,
    pub checkpoints_total: u64,
    pub checkpoint_failures_total: u64,
    pub exports_total: u64,
    pub paused: u8,
    pub teacher_finite: u8,
    pub mqtt_connected: u8,
    pub mqtt_reconnects_total: u64,
    pub mqtt_disconnected_s_total: f64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub uptime_s: f64,
}
