//! State shared by the daemon's tasks and threads: counters, the deployed teacher, the queues'
//! depths, and the snapshot of all of them that the telemetry table reads.
//!
//! The teacher is published as an `Arc` behind a lock that is only ever held to clone or swap
//! the pointer, so the inference thread never waits for a training step.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use super::queue::QueueDepth;
use super::ratelimit::RateLimitedLog;
use super::telemetry::{Interval, QueueDepths, Snapshot};
use crate::calibration::Mounting;
use crate::learn::Serving;
use crate::metrics::LatencyWindow;
use crate::nn::Mlp;
use crate::session::Models;

pub use super::telemetry::{Counters, MetricsMessage, TrainStats};

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

/// The pipeline's queues, read for their depths.
pub struct Queues {
    pub raw: Arc<dyn QueueDepth>,
    pub input: Arc<dyn QueueDepth>,
    pub train: Arc<dyn QueueDepth>,
}

/// What the daemon's tasks and threads share. The flags and counters the stages set are public
/// fields; the start time, teacher pointer, queue handles, report window and log limit are
/// reached through methods, so no stage can take the MQTT report's window or swap a teacher
/// around `publish_teacher`.
pub struct Shared {
    started: Instant,
    pub counters: Counters,
    pub latency: Mutex<LatencyWindow>,
    pub train: Mutex<TrainStats>,
    teacher: RwLock<Arc<TeacherSnapshot>>,
    pub paused: AtomicBool,
    pub reset_requested: AtomicBool,
    pub checkpoint_requested: AtomicBool,
    pub export_requested: AtomicBool,
    pub accept_requested: AtomicBool,
    /// Checkpoint directory (also where `export` writes), if any.
    pub state_dir: Option<std::path::PathBuf>,
    /// Set on shutdown: stop taking input.
    pub stopping: AtomicBool,
    pub connected: AtomicBool,
    /// Milliseconds since `started` of each worker's last loop turn (for the watchdog).
    pub inference_beat: AtomicU64,
    pub trainer_beat: AtomicU64,
    queues: Queues,
    /// When the last MQTT report was taken, and `samples_total` then (for the rate).
    last_report: Mutex<(Instant, u64)>,
    /// One limit for every "rejected a message" line, whichever stage rejects it.
    rejections: Mutex<RateLimitedLog>,
    /// The id of the open label request, set by the trainer: where an answer without an id
    /// goes.
    open_request: Mutex<Option<String>>,
    /// What the broker refuses, while it does ("publishes on edgemt/x/predictions
    /// (NotAuthorized)"): every STATUS line that says the daemon is serving says this too.
    refusal: Mutex<Option<String>>,
}

impl Shared {
    pub fn new(teacher: Mlp, state_dir: Option<std::path::PathBuf>, queues: Queues) -> Self {
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
            accept_requested: AtomicBool::new(false),
            state_dir,
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            inference_beat: AtomicU64::new(0),
            trainer_beat: AtomicU64::new(0),
            queues,
            last_report: Mutex::new((now, 0)),
            open_request: Mutex::new(None),
            refusal: Mutex::new(None),
            rejections: Mutex::new(RateLimitedLog::new(5, std::time::Duration::from_secs(10))),
        }
    }

    /// The id of the open label request, if one is open.
    pub fn open_request(&self) -> Option<String> {
        self.open_request
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_open_request(&self, id: Option<String>) {
        *self.open_request.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// The systemd STATUS line for a daemon that serves: `serving` and what the broker
    /// refuses, if it refuses anything.
    pub fn serving_status(&self, serving: &str) -> String {
        match &*self.refusal.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(refused) => format!("{serving}; but the broker refuses {refused}"),
            None => serving.to_owned(),
        }
    }

    pub fn set_refusal(&self, refused: Option<String>) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = refused;
    }

    /// Whether messages are waiting to be parsed or samples to be answered (training yields
    /// to them).
    pub fn inference_backlog(&self) -> bool {
        self.queues.input.depth().items > 0 || self.queues.raw.depth().items > 0
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

    /// The state as it is now, without the interval values (for a Prometheus scrape, which
    /// must not restart the windows the MQTT report is measured over).
    pub fn snapshot(&self) -> Snapshot<'_> {
        let train = self.train.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.snapshot_with(train, None)
    }

    /// The MQTT metrics message; starts a new reporting window.
    pub fn metrics(&self) -> MetricsMessage {
        let samples_total = self.counters.samples_total.load(Relaxed);
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
        let latency_us = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_percentiles();
        let mut t = self.train.lock().unwrap_or_else(|e| e.into_inner());
        let steps = t.interval.take();
        let interval = Interval {
            samples_per_s,
            latency_us,
            loss_sup: steps.mean_sup(),
            loss_pseudo: steps.mean_pseudo(),
            loss_consistency: steps.mean_consistency(),
            pseudo_acceptance: steps.acceptance(),
        };
        let train = t.clone();
        drop(t);
        super::telemetry::message(&self.snapshot_with(train, Some(interval)))
    }

    fn snapshot_with(&self, train: TrainStats, interval: Option<Interval>) -> Snapshot<'_> {
        let served = self.teacher();
        Snapshot {
            counters: &self.counters,
            train,
            teacher_version: served.version,
            serving_adapted: served.serving == Serving::Adapted,
            mounting_adopted: served.mounting.is_some(),
            paused: self.paused.load(Relaxed),
            mqtt_connected: self.connected.load(Relaxed),
            uptime_s: self.started.elapsed().as_secs_f64(),
            queues: QueueDepths {
                raw: self.queues.raw.depth(),
                input: self.queues.input.depth(),
                train: self.queues.train.depth(),
            },
            interval,
        }
    }
}
