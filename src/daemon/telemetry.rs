//! The daemon's telemetry, described once. Every metric is one row of [`METRICS`]: its key in
//! the MQTT metrics message, help text, kind and unit, its Prometheus series, whether and how
//! Home Assistant shows it, and how it is read from a [`Snapshot`] of the daemon's state. The
//! MQTT message ([`message`]), the Prometheus collector (`prometheus.rs`) and the discovery
//! sensors (`discovery.rs`) are generated from the table, the way Home Assistant's own
//! integrations list `SensorEntityDescription`s. Adding a metric is one row, plus, for a new
//! quantity, the code that measures it (a counter in [`Counters`], a field of [`TrainStats`]).
//!
//! The measured quantities live here too, below the shared state that holds them, so the
//! table reads them without importing the module that shares them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::config::Command;
use super::queue::{Depth, Droppable};
use crate::scores::StepTotals;

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
    /// Items after which a due student step waited because samples were queued for
    /// inference (learning yields the CPU to answers).
    pub steps_deferred_total: AtomicU64,
    /// Answers on the answer topic with no open request to go to (none open, or another id).
    pub answers_refused_total: AtomicU64,
    /// Labels inside samples on the samples topic, not learned from (`[input] inline_labels`
    /// is off); the samples themselves are.
    pub inline_labels_ignored_total: AtomicU64,
    pub labels_total: AtomicU64,
    pub feedback_total: AtomicU64,
    pub feedback_correct: AtomicU64,
    pub late_labels_total: AtomicU64,
    pub publish_dropped_total: AtomicU64,
    /// QoS 1 publishes the broker refused (a PubAck with a reason such as NotAuthorized).
    pub publish_denied_total: AtomicU64,
    /// Subscriptions the broker refused (a SubAck with a failure code).
    pub subscribe_denied_total: AtomicU64,
    /// Connections to the Prometheus endpoint closed at once: all its slots were taken.
    pub prometheus_refused_total: AtomicU64,
    /// Samples a label by class name reached but did not label (over its cap).
    pub class_label_excess_total: AtomicU64,
    pub commands_total: AtomicU64,
    pub checkpoints_total: AtomicU64,
    /// Bytes the checkpoints took on disk (tensor files and manifests): the SD card's wear.
    pub checkpoint_bytes_total: AtomicU64,
    /// Due checkpoints the write budget deferred (the newest is written when it allows).
    pub checkpoints_deferred_total: AtomicU64,
    pub exports_total: AtomicU64,
    /// Exports that failed (their temporary file removed).
    pub export_failures_total: AtomicU64,
    pub mqtt_reconnects_total: AtomicU64,
    pub mqtt_disconnected_ms_total: AtomicU64,
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
    /// Label trust: what it held and released, what it holds now, whether labels are disputed.
    pub trust: crate::learn::trust::TrustCounts,
    pub labels_holding: usize,
    pub labels_disputed: bool,
    /// Share of the recent inputs the embedding reference calls atypical (none without one).
    pub inputs_atypical: Option<f64>,
    pub calibration_changes: u64,
    /// What the label requests came to, and how many are open.
    pub requests: crate::learn::requests::RequestCounts,
    pub requests_open: usize,
    /// Share of the most recent labels (`[metrics] recent_labels`) the served model got right.
    pub feedback_accuracy_recent: Option<f64>,
    /// Every label so far against the served model's answer (restored from the checkpoint).
    pub label_accuracy: crate::scores::Accuracy,
}

/// The daemon's state read once for one report, so that every metric of the report comes from
/// the same moment (the counters are atomics, read as each metric is).
pub struct Snapshot<'a> {
    pub counters: &'a Counters,
    pub train: TrainStats,
    pub teacher_version: u64,
    pub serving_adapted: bool,
    pub mounting_adopted: bool,
    pub paused: bool,
    pub mqtt_connected: bool,
    pub uptime_s: f64,
    pub queues: QueueDepths,
    /// Only the periodic MQTT report has one: it owns the interval windows (rate, latency
    /// percentiles, loss means) and starts new ones; a Prometheus scrape must not take them.
    pub interval: Option<Interval>,
}

/// The pipeline's queues, front to back.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueDepths {
    /// Raw messages waiting for the ingest parser (a byte budget).
    pub raw: Depth,
    /// Samples and labels waiting for inference.
    pub input: Depth,
    /// Predicted samples and labels waiting for the trainer.
    pub train: Depth,
}

/// What happened since the last MQTT report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Interval {
    pub samples_per_s: f64,
    /// (p50, p99) receipt-to-publish latency in µs; none when nothing was predicted.
    pub latency_us: Option<(u32, u32)>,
    /// Means over the interval's steps; none when no step ran.
    pub loss_sup: Option<f64>,
    pub loss_pseudo: Option<f64>,
    pub loss_consistency: Option<f64>,
    pub pseudo_acceptance: Option<f64>,
}

/// One metric's value: an integer stays an integer in JSON, and a value with no data this
/// time is `null` in JSON and absent from Prometheus (rather than a 0 that looks measured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    Int(u64),
    Float(f64),
    Missing,
}

impl Reading {
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Reading::Int(v) => Some(v as f64),
            Reading::Float(v) => Some(v),
            Reading::Missing => None,
        }
    }
}

impl From<u64> for Reading {
    fn from(v: u64) -> Self {
        Reading::Int(v)
    }
}

impl From<usize> for Reading {
    fn from(v: usize) -> Self {
        Reading::Int(v as u64)
    }
}

impl From<u32> for Reading {
    fn from(v: u32) -> Self {
        Reading::Int(v.into())
    }
}

/// A flag is 1 or 0, as Telegraf and Grafana read numbers only.
impl From<bool> for Reading {
    fn from(v: bool) -> Self {
        Reading::Int(v as u64)
    }
}

impl From<f64> for Reading {
    fn from(v: f64) -> Self {
        Reading::Float(v)
    }
}

impl<T: Into<Reading>> From<Option<T>> for Reading {
    fn from(v: Option<T>) -> Self {
        v.map_or(Reading::Missing, Into::into)
    }
}

impl Serialize for Reading {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Reading::Int(v) => s.serialize_u64(v),
            // serde_json writes a non-finite float as null, as it did for the old struct.
            Reading::Float(v) => s.serialize_f64(v),
            Reading::Missing => s.serialize_none(),
        }
    }
}

/// Prometheus' two kinds; Home Assistant's state class follows from it unless a row says
/// otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (back to 0 at a restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// The unit of the value as the MQTT message carries it. Prometheus gets base units
/// (seconds, bytes, ratios) with the unit's suffix on the series name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A count, a flag or a dimensionless number.
    None,
    Seconds,
    Micros,
    Bytes,
    /// A share between 0 and 1.
    Ratio,
    /// Events per second.
    PerSecond,
}

/// Home Assistant's state classes that edgemt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateClass {
    Measurement,
    /// For counters: HA takes a decrease as a restart of the meter.
    TotalIncreasing,
}

impl StateClass {
    pub fn as_str(self) -> &'static str {
        match self {
            StateClass::Measurement => "measurement",
            StateClass::TotalIncreasing => "total_increasing",
        }
    }
}

/// How a Home Assistant sensor shows a value.
#[derive(Debug, Clone, Copy)]
pub struct Show {
    /// A Jinja operation applied to the value before HA stores it (`* 100`), and the digits
    /// to round the result to, so HA's statistics hold the shown value.
    pub scale: Option<(&'static str, u8)>,
    pub unit: Option<&'static str>,
    pub device_class: Option<&'static str>,
    /// Decimals HA shows (`suggested_display_precision`); the user can change it.
    pub precision: Option<u8>,
}

impl Show {
    /// A count: no unit, no decimals.
    pub const COUNT: Show = Show {
        scale: None,
        unit: None,
        device_class: None,
        precision: Some(0),
    };
    /// A 0..1 ratio shown in %.
    pub const PERCENT: Show = Show {
        scale: Some(("* 100", 1)),
        unit: Some("%"),
        device_class: None,
        precision: Some(1),
    };
    /// Microseconds shown as milliseconds; one decimal, so 0.4 ms does not read "0 ms".
    pub const MILLIS: Show = Show {
        scale: Some(("/ 1000", 2)),
        unit: Some("ms"),
        device_class: Some("duration"),
        precision: Some(1),
    };
    /// Bytes shown in MiB. (HA's MQTT sensor takes no `suggested_unit_of_measurement`: its
    /// discovery schema drops unknown keys, so the conversion is done in the template.)
    pub const MEBIBYTES: Show = Show {
        scale: Some(("/ 1048576", 2)),
        unit: Some("MiB"),
        device_class: Some("data_size"),
        precision: Some(1),
    };
    /// Bytes shown in KiB, for quantities that are small next to a MiB.
    pub const KIBIBYTES: Show = Show {
        scale: Some(("/ 1024", 1)),
        unit: Some("KiB"),
        device_class: Some("data_size"),
        precision: Some(0),
    };

    pub const fn unit(unit: &'static str) -> Show {
        Show {
            unit: Some(unit),
            ..Show::COUNT
        }
    }
}

/// Which Home Assistant entity shows a metric.
#[derive(Debug, Clone, Copy)]
pub enum Entity {
    Sensor(Show),
    /// A 0/1 metric as a binary sensor.
    BinarySensor,
    /// A 0/1 metric that two commands set: a switch when `[control] allow`s both, else a
    /// binary sensor with the same name (it is read-only then).
    Switch(Switch),
}

/// The commands behind a switch, and which value of the metric reads "on".
#[derive(Debug, Clone, Copy)]
pub struct Switch {
    pub on: Command,
    pub off: Command,
    pub on_value: u64,
}

/// Whether and how Home Assistant's discovery announces a metric.
#[derive(Debug, Clone, Copy)]
pub struct HomeAssistant {
    /// The entity's name; HA puts the device name in front of it.
    pub name: &'static str,
    pub entity: Entity,
    /// Internals go in the diagnostic category, off the device's main card.
    pub diagnostic: bool,
    /// When the kind's state class is wrong for HA.
    pub state_class: Option<StateClass>,
    /// A Material Design icon (`mdi:...`).
    pub icon: Option<&'static str>,
}

/// One metric, described once.
#[derive(Clone, Copy)]
pub struct Metric {
    /// Its key in the MQTT metrics message, and the object id of its HA entity.
    pub key: &'static str,
    /// Prometheus' HELP text, and the README's description.
    pub help: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    /// In the MQTT metrics message (all but Prometheus-only series).
    pub mqtt: bool,
    /// Its Prometheus name, before the `edgemt_` prefix, the unit suffix and a counter's
    /// `_total`; none when Prometheus has it another way (a rate, the latency histogram) or
    /// when it is an interval mean that a scrape cannot read without taking it from MQTT.
    pub prometheus: Option<&'static str>,
    pub home_assistant: Option<HomeAssistant>,
    /// Reads it from a snapshot.
    pub read: fn(&Snapshot) -> Reading,
}

impl Metric {
    const fn new(key: &'static str, kind: Kind, help: &'static str, read: Read) -> Self {
        Metric {
            key,
            help,
            kind,
            unit: Unit::None,
            mqtt: true,
            prometheus: None,
            home_assistant: None,
            read,
        }
    }

    const fn counter(key: &'static str, help: &'static str, read: Read) -> Self {
        Metric::new(key, Kind::Counter, help, read)
    }

    const fn gauge(key: &'static str, help: &'static str, read: Read) -> Self {
        Metric::new(key, Kind::Gauge, help, read)
    }

    const fn unit(mut self, unit: Unit) -> Self {
        self.unit = unit;
        self
    }

    const fn prometheus(mut self, name: &'static str) -> Self {
        self.prometheus = Some(name);
        self
    }

    const fn prometheus_only(mut self) -> Self {
        self.mqtt = false;
        self
    }

    /// A Home Assistant entity named `name` (its other traits follow from the builders below).
    const fn entity(mut self, name: &'static str, entity: Entity) -> Self {
        self.home_assistant = Some(HomeAssistant {
            name,
            entity,
            diagnostic: false,
            state_class: None,
            icon: None,
        });
        self
    }

    const fn sensor(self, name: &'static str, show: Show) -> Self {
        self.entity(name, Entity::Sensor(show))
    }

    const fn binary_sensor(self, name: &'static str) -> Self {
        self.entity(name, Entity::BinarySensor)
    }

    const fn switch(self, name: &'static str, switch: Switch) -> Self {
        self.entity(name, Entity::Switch(switch))
    }

    const fn icon(mut self, icon: &'static str) -> Self {
        if let Some(ha) = &mut self.home_assistant {
            ha.icon = Some(icon);
        }
        self
    }

    const fn diagnostic(mut self) -> Self {
        if let Some(ha) = &mut self.home_assistant {
            ha.diagnostic = true;
        }
        self
    }

    const fn precision(mut self, digits: u8) -> Self {
        if let Some(HomeAssistant {
            entity: Entity::Sensor(show),
            ..
        }) = &mut self.home_assistant
        {
            show.precision = Some(digits);
        }
        self
    }

    const fn state_class(mut self, class: StateClass) -> Self {
        if let Some(ha) = &mut self.home_assistant {
            ha.state_class = Some(class);
        }
        self
    }

    /// Home Assistant's state class for this metric.
    pub fn ha_state_class(&self) -> StateClass {
        match (self.home_assistant.and_then(|h| h.state_class), self.kind) {
            (Some(class), _) => class,
            (None, Kind::Counter) => StateClass::TotalIncreasing,
            (None, Kind::Gauge) => StateClass::Measurement,
        }
    }
}

type Read = fn(&Snapshot) -> Reading;

fn count(counter: &AtomicU64) -> Reading {
    counter.load(Relaxed).into()
}

/// A value of the interval, or none outside the periodic report.
fn interval<T: Into<Reading>>(s: &Snapshot, f: impl FnOnce(&Interval) -> T) -> Reading {
    s.interval.as_ref().map(f).into()
}

/// Every metric the daemon reports, in the MQTT message's order.
pub static METRICS: &[Metric] = &[
    Metric::counter("samples_total", "Valid samples taken in", |s| {
        count(&s.counters.samples_total)
    })
    .prometheus("samples"),
    // Prometheus computes rates itself: rate(edgemt_samples_total[1m]).
    Metric::gauge(
        "samples_per_s",
        "Samples taken in per second over the interval",
        |s| interval(s, |i| i.samples_per_s),
    )
    .unit(Unit::PerSecond)
    .sensor("Sample rate", Show::unit("samples/s"))
    .icon("mdi:speedometer")
    .precision(1),
    Metric::counter("predictions_total", "Predictions published", |s| {
        count(&s.counters.predictions_total)
    })
    .prometheus("predictions")
    .sensor("Predictions", Show::COUNT)
    .icon("mdi:counter")
    .diagnostic(),
    Metric::counter(
        "predictions_dropped_total",
        "Predictions made but not published (client queue full)",
        |s| count(&s.counters.predictions_dropped_total),
    )
    .prometheus("predictions_dropped"),
    // Prometheus has the latency histogram instead (edgemt_prediction_latency_seconds).
    Metric::gauge(
        "latency_p50_us",
        "Median time from a sample's receipt to its prediction's publication over the interval",
        |s| interval(s, |i| i.latency_us.map(|p| p.0)),
    )
    .unit(Unit::Micros)
    .sensor("Latency p50", Show::MILLIS)
    .icon("mdi:timer-outline"),
    Metric::gauge(
        "latency_p99_us",
        "99th percentile of the time from receipt to publication over the interval",
        |s| interval(s, |i| i.latency_us.map(|p| p.1)),
    )
    .unit(Unit::Micros)
    .sensor("Latency p99", Show::MILLIS)
    .icon("mdi:timer-alert-outline"),
    Metric::gauge(
        "loss_sup",
        "Mean supervised loss over the interval's steps",
        |s| interval(s, |i| i.loss_sup),
    )
    .sensor("Supervised loss", Show::COUNT)
    .icon("mdi:chart-line")
    .precision(3)
    .diagnostic(),
    Metric::gauge(
        "loss_pseudo",
        "Mean pseudo-label loss over the interval's steps",
        |s| interval(s, |i| i.loss_pseudo),
    )
    .sensor("Pseudo-label loss", Show::COUNT)
    .icon("mdi:chart-line")
    .precision(3)
    .diagnostic(),
    Metric::gauge(
        "loss_consistency",
        "Mean consistency loss over the interval's steps",
        |s| interval(s, |i| i.loss_consistency),
    )
    .sensor("Consistency loss", Show::COUNT)
    .icon("mdi:chart-line")
    .precision(3)
    .diagnostic(),
    Metric::gauge(
        "pseudo_acceptance",
        "Share of the interval's pseudo-label candidates that were accepted",
        |s| interval(s, |i| i.pseudo_acceptance),
    )
    .unit(Unit::Ratio)
    .sensor("Pseudo-label acceptance", Show::PERCENT)
    .icon("mdi:tag-check-outline")
    .diagnostic(),
    Metric::gauge(
        "teacher_version",
        "Version of the teacher (EMA refreshes since start or reset)",
        |s| s.teacher_version.into(),
    )
    .prometheus("teacher_version")
    .sensor("Teacher version", Show::COUNT)
    .icon("mdi:source-commit")
    // A version, not an amount: a total's "sum" statistic would mean nothing (and it goes
    // back to 0 at a reset).
    .state_class(StateClass::Measurement)
    .diagnostic(),
    Metric::gauge(
        "serving_adapted",
        "1 while the adapted teacher answers, 0 while the pretrained model",
        |s| s.serving_adapted.into(),
    )
    .prometheus("serving_adapted")
    .binary_sensor("Serving the adapted model")
    .icon("mdi:school"),
    Metric::gauge(
        "labels_disputed",
        "1 while labels are disputed (they contradict the confident pretrained model both ways in one class pair): the pretrained model is served until they age out or accept_labels",
        |s| s.train.labels_disputed.into(),
    )
    .prometheus("labels_disputed")
    .binary_sensor("Disputed labels")
    .icon("mdi:tag-off-outline"),
    Metric::counter(
        "labels_disputes_total",
        "Times labels became disputed",
        |s| s.train.trust.disputes.into(),
    )
    .prometheus("labels_disputes"),
    Metric::counter(
        "labels_held_total",
        "Labels not believed on arrival (they contradict a confident pretrained model and their neighbours' labels)",
        |s| s.train.trust.held.into(),
    )
    .prometheus("labels_held"),
    Metric::counter(
        "labels_released_total",
        "Held labels believed later (their neighbours came to agree) or accepted by accept_labels",
        |s| (s.train.trust.released + s.train.trust.accepted).into(),
    )
    .prometheus("labels_released"),
    Metric::counter(
        "inline_labels_ignored_total",
        "Labels inside samples on the samples topic, ignored because [input] inline_labels is off (the samples are used)",
        |s| count(&s.counters.inline_labels_ignored_total),
    )
    .prometheus("inline_labels_ignored"),
    Metric::gauge("labels_holding", "Labels held now", |s| {
        s.train.labels_holding.into()
    })
    .prometheus("labels_holding"),
    Metric::gauge(
        "inputs_atypical",
        "Share of the last 1,024 inputs farther from every class than 95 % of the model's own inputs (with [model] reference; above [trust] shift_share the inputs show a sign of shift)",
        |s| s.train.inputs_atypical.into(),
    )
    .unit(Unit::Ratio)
    .prometheus("inputs_atypical")
    .sensor("Atypical inputs", Show::PERCENT)
    .icon("mdi:chart-bell-curve")
    .diagnostic(),
    Metric::gauge(
        "gate_wins",
        "Labels in the serving gate's window only the teacher got right",
        |s| s.train.gate_wins.into(),
    )
    .prometheus("gate_wins"),
    Metric::gauge(
        "gate_losses",
        "Labels in the serving gate's window only the pretrained model got right",
        |s| s.train.gate_losses.into(),
    )
    .prometheus("gate_losses"),
    Metric::gauge("gate_p", "The serving gate's anytime-valid p-value (1 / its wealth)", |s| {
        Some(s.train.gate_p).filter(|p| p.is_finite()).into()
    })
    .prometheus("gate_p")
    .sensor("Serving gate p-value", Show::COUNT)
    .icon("mdi:scale-balance")
    .precision(3)
    .diagnostic(),
    Metric::counter("gate_switches_total", "Changes of the served model", |s| {
        s.train.gate_switches.into()
    })
    .prometheus("gate_switches"),
    Metric::counter("requests_total", "Label requests made", |s| {
        s.train.requests.made.into()
    })
    .prometheus("label_requests")
    .sensor("Label requests", Show::COUNT)
    .icon("mdi:tag-question")
    .diagnostic(),
    Metric::counter(
        "requests_answered_total",
        "Label requests answered in time",
        |s| s.train.requests.answered.into(),
    )
    .prometheus("label_requests_answered")
    .sensor("Label requests answered", Show::COUNT)
    .icon("mdi:tag-check")
    .diagnostic(),
    Metric::counter(
        "requests_discordant_total",
        "Answered label requests on which exactly one of the adapted and the pretrained model was right",
        |s| s.train.requests.discordant.into(),
    )
    .prometheus("label_requests_discordant"),
    Metric::counter(
        "requests_expired_total",
        "Label requests that expired unanswered",
        |s| s.train.requests.expired.into(),
    )
    .prometheus("label_requests_expired"),
    Metric::gauge("requests_open", "Label requests waiting for an answer", |s| {
        s.train.requests_open.into()
    })
    .prometheus("label_requests_open"),
    Metric::counter(
        "answers_refused_total",
        "Answers that found no open label request (none open, or another id)",
        |s| count(&s.counters.answers_refused_total),
    )
    .prometheus("label_answers_refused"),
    Metric::gauge(
        "mounting_adopted",
        "1 while a calibrated mounting is applied",
        |s| s.mounting_adopted.into(),
    )
    .prometheus("mounting_adopted"),
    Metric::counter(
        "calibration_changes_total",
        "Changes of the adopted mounting",
        |s| s.train.calibration_changes.into(),
    )
    .prometheus("calibration_changes"),
    Metric::counter("ema_updates", "EMA refreshes of the teacher", |s| {
        s.train.ema_updates.into()
    })
    .prometheus("ema_updates"),
    Metric::counter("train_steps", "Student steps taken", |s| {
        s.train.train_steps.into()
    })
    .prometheus("train_steps"),
    Metric::counter(
        "skipped_nonfinite",
        "Steps skipped for a non-finite loss or gradient",
        |s| s.train.skipped_nonfinite.into(),
    )
    .prometheus("skipped_nonfinite"),
    Metric::gauge(
        "labeled_buffer",
        "Labeled samples in the learner's buffer",
        |s| s.train.labeled_buffer.into(),
    )
    .prometheus("labeled_buffer"),
    Metric::gauge(
        "unlabeled_buffer",
        "Unlabeled samples in the learner's buffer",
        |s| s.train.unlabeled_buffer.into(),
    )
    .prometheus("unlabeled_buffer"),
    Metric::gauge(
        "raw_queue_messages",
        "Messages waiting for the ingest parser",
        |s| s.queues.raw.items.into(),
    )
    .prometheus("raw_queue_messages")
    .sensor("Unparsed messages", Show::COUNT)
    .icon("mdi:tray-full")
    .diagnostic(),
    Metric::gauge(
        "raw_queue_bytes",
        "Bytes of the messages waiting for the ingest parser, as its budget counts them",
        |s| s.queues.raw.load.into(),
    )
    .unit(Unit::Bytes)
    .prometheus("raw_queue")
    .sensor("Unparsed bytes", Show::KIBIBYTES)
    .icon("mdi:tray-full")
    .diagnostic(),
    Metric::gauge(
        "input_queue",
        "Samples and labels waiting for inference",
        |s| s.queues.input.items.into(),
    )
    .prometheus("input_queue")
    .sensor("Input queue", Show::COUNT)
    .icon("mdi:tray-arrow-down")
    .diagnostic(),
    Metric::gauge(
        "train_queue",
        "Predicted samples and labels waiting for the trainer",
        |s| s.queues.train.items.into(),
    )
    .prometheus("train_queue")
    .sensor("Training queue", Show::COUNT)
    .icon("mdi:tray-arrow-up")
    .diagnostic(),
    Metric::counter(
        "unread_dropped_total",
        "Messages dropped unread because the parser was behind",
        |s| count(&s.counters.unread_dropped_total),
    )
    .prometheus("unread_dropped"),
    Metric::counter(
        "dropped_total",
        "Samples dropped from the full input queue",
        |s| count(&s.counters.dropped_total),
    )
    .prometheus("dropped")
    .sensor("Dropped samples", Show::COUNT)
    .icon("mdi:delete-outline")
    .diagnostic(),
    Metric::counter(
        "train_dropped_total",
        "Predicted samples dropped from the full training queue",
        |s| count(&s.counters.train_dropped_total),
    )
    .prometheus("train_dropped"),
    Metric::counter(
        "steps_deferred_total",
        "Due student steps that waited because samples were queued for inference",
        |s| count(&s.counters.steps_deferred_total),
    )
    .prometheus("steps_deferred"),
    Metric::counter(
        "labeled_dropped_total",
        "Labeled samples and labels dropped from either queue",
        |s| count(&s.counters.labeled_dropped_total),
    )
    .prometheus("labeled_dropped"),
    Metric::counter(
        "unembeddable_total",
        "Samples whose embedding was non-finite or absurd",
        |s| count(&s.counters.unembeddable_total),
    )
    .prometheus("unembeddable"),
    Metric::counter("rejected_total", "Messages refused", |s| {
        count(&s.counters.rejected_total)
    })
    .prometheus("rejected")
    .sensor("Rejected messages", Show::COUNT)
    .icon("mdi:message-alert-outline")
    .diagnostic(),
    Metric::counter("oversized_total", "Payloads over the size limit", |s| {
        count(&s.counters.oversized_total)
    })
    .prometheus("oversized"),
    Metric::counter(
        "retained_ignored_total",
        "Retained messages on input topics, ignored",
        |s| count(&s.counters.retained_ignored_total),
    )
    .prometheus("retained_ignored"),
    Metric::counter(
        "commands_refused_total",
        "Commands not in [control] allow",
        |s| count(&s.counters.commands_refused_total),
    )
    .prometheus("commands_refused")
    .sensor("Refused commands", Show::COUNT)
    .icon("mdi:cancel")
    .diagnostic(),
    Metric::counter("labels_total", "Labels learned from", |s| {
        count(&s.counters.labels_total)
    })
    .prometheus("labels"),
    Metric::counter(
        "feedback_total",
        "Labels matched to an earlier prediction",
        |s| count(&s.counters.feedback_total),
    )
    .prometheus("feedback"),
    // Prometheus only: with feedback_total it gives the share over matched labels, as replay
    // reports it; feedback_accuracy (MQTT too) is over every label, inline ones included.
    Metric::counter(
        "feedback_correct",
        "Matched labels the served model had predicted",
        |s| count(&s.counters.feedback_correct),
    )
    .prometheus("feedback_correct")
    .prometheus_only(),
    Metric::gauge(
        "feedback_accuracy",
        "Share of the labels (in samples, after them, answers) the served model had predicted, over the checkpointed history",
        |s| s.train.label_accuracy.get().into(),
    )
    .unit(Unit::Ratio)
    .prometheus("feedback_accuracy")
    .sensor("Accuracy on labels", Show::PERCENT)
    .icon("mdi:bullseye-arrow"),
    Metric::gauge(
        "feedback_accuracy_recent",
        "Share of the most recent labels (in samples, after them, answers) the served model predicted",
        |s| s.train.feedback_accuracy_recent.into(),
    )
    .unit(Unit::Ratio)
    .prometheus("feedback_accuracy_recent")
    .sensor("Accuracy on recent labels", Show::PERCENT)
    .icon("mdi:bullseye"),
    Metric::counter(
        "late_labels_total",
        "Labels whose sample was no longer kept",
        |s| count(&s.counters.late_labels_total),
    )
    .prometheus("late_labels"),
    Metric::counter(
        "publish_dropped_total",
        "Other publishes dropped (client queue full)",
        |s| count(&s.counters.publish_dropped_total),
    )
    .prometheus("publish_dropped"),
    // At QoS 0 a refusal is silent: MQTT gives the client no way to see it.
    Metric::counter(
        "publish_denied_total",
        "QoS 1 publishes the broker refused (its ACL, a quota); the log names the topic",
        |s| count(&s.counters.publish_denied_total),
    )
    .prometheus("publish_denied")
    .sensor("Publishes refused by the broker", Show::COUNT)
    .icon("mdi:shield-alert-outline")
    .diagnostic(),
    Metric::counter(
        "subscribe_denied_total",
        "Subscriptions the broker refused (its ACL); the log names the topic",
        |s| count(&s.counters.subscribe_denied_total),
    )
    .prometheus("subscribe_denied"),
    Metric::counter(
        "prometheus_refused_total",
        "Connections to the Prometheus endpoint closed at once because 16 were open",
        |s| count(&s.counters.prometheus_refused_total),
    )
    .prometheus("http_connections_refused"),
    Metric::counter(
        "class_label_excess_total",
        "Samples a label by class name reached but left unlabeled ([input] class_label_max_samples)",
        |s| count(&s.counters.class_label_excess_total),
    )
    .prometheus("class_label_excess"),
    Metric::counter("commands_total", "Commands obeyed", |s| {
        count(&s.counters.commands_total)
    })
    .prometheus("commands"),
    Metric::counter("resets_total", "Resets to the pretrained model", |s| {
        s.train.resets.into()
    })
    .prometheus("resets"),
    Metric::counter("rollbacks_total", "Rollbacks by the guard", |s| {
        s.train.rollbacks.into()
    })
    .prometheus("rollbacks")
    .sensor("Rollbacks", Show::COUNT)
    .icon("mdi:undo-variant")
    .diagnostic(),
    Metric::counter("checkpoints_total", "Checkpoints written", |s| {
        count(&s.counters.checkpoints_total)
    })
    .prometheus("checkpoints")
    .sensor("Checkpoints", Show::COUNT)
    .icon("mdi:content-save")
    .diagnostic(),
    Metric::counter(
        "checkpoint_failures_total",
        "Checkpoints that could not be written",
        |s| count(&s.counters.checkpoint_failures_total),
    )
    .prometheus("checkpoint_failures"),
    Metric::counter(
        "checkpoint_bytes_total",
        "Bytes written by checkpoints",
        |s| count(&s.counters.checkpoint_bytes_total),
    )
    .unit(Unit::Bytes)
    .prometheus("checkpoint")
    .sensor("Checkpoint writes", Show::MEBIBYTES)
    .icon("mdi:harddisk")
    .diagnostic(),
    Metric::counter(
        "checkpoints_deferred_total",
        "Due checkpoints the write budget deferred",
        |s| count(&s.counters.checkpoints_deferred_total),
    )
    .prometheus("checkpoints_deferred"),
    Metric::counter("exports_total", "Adapted models exported", |s| {
        count(&s.counters.exports_total)
    })
    .prometheus("exports")
    .sensor("Exports", Show::COUNT)
    .icon("mdi:export")
    .diagnostic(),
    Metric::counter("export_failures_total", "Exports that failed", |s| {
        count(&s.counters.export_failures_total)
    })
    .prometheus("export_failures"),
    // On while training runs; the switch sends `resume` and `pause` to the command topic.
    Metric::gauge("paused", "1 while training is paused", |s| s.paused.into())
        .prometheus("paused")
        .switch(
            "Training",
            Switch {
                on: Command::Resume,
                off: Command::Pause,
                on_value: 0,
            },
        )
        .icon("mdi:school-outline"),
    Metric::gauge(
        "teacher_finite",
        "1 while the student and teacher weights are finite",
        |s| s.train.teacher_finite.into(),
    )
    .prometheus("teacher_finite")
    .binary_sensor("Weights finite")
    .icon("mdi:check-decagram-outline")
    .diagnostic(),
    Metric::gauge("mqtt_connected", "1 while connected to the broker", |s| {
        s.mqtt_connected.into()
    })
    .prometheus("mqtt_connected"),
    Metric::counter("mqtt_reconnects_total", "Broker connections lost", |s| {
        count(&s.counters.mqtt_reconnects_total)
    })
    .prometheus("mqtt_reconnects")
    .sensor("Broker reconnects", Show::COUNT)
    .icon("mdi:lan-disconnect")
    .diagnostic(),
    Metric::counter(
        "mqtt_disconnected_s_total",
        "Time without a broker connection",
        |s| (s.counters.mqtt_disconnected_ms_total.load(Relaxed) as f64 / 1000.0).into(),
    )
    .unit(Unit::Seconds)
    .prometheus("mqtt_disconnected"),
    Metric::gauge("rss_bytes", "Resident set size", |_| {
        crate::metrics::rss_bytes().into()
    })
    .unit(Unit::Bytes)
    .prometheus("resident_memory")
    .sensor("Memory", Show::MEBIBYTES)
    .icon("mdi:memory")
    .diagnostic(),
    Metric::gauge(
        "peak_rss_bytes",
        "Peak resident set size since start",
        |_| crate::metrics::peak_rss_bytes().into(),
    )
    .unit(Unit::Bytes)
    .prometheus("peak_resident_memory"),
    Metric::gauge("uptime_s", "Time since start", |s| s.uptime_s.into())
        .unit(Unit::Seconds)
        .prometheus("uptime"),
];

/// `{prefix}/metrics`: flat JSON of numbers in the table's order, as Telegraf's JSON parser
/// and Grafana read it; `null` where the interval had no data.
#[derive(Debug, Clone)]
pub struct MetricsMessage(Vec<(&'static str, Reading)>);

impl MetricsMessage {
    pub fn get(&self, key: &str) -> Option<Reading> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

impl Serialize for MetricsMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The MQTT metrics message of a snapshot.
pub fn message(s: &Snapshot) -> MetricsMessage {
    MetricsMessage(
        METRICS
            .iter()
            .filter(|m| m.mqtt)
            .map(|m| (m.key, (m.read)(s)))
            .collect(),
    )
}
