//! Incoming MQTT messages, in two stages so the MQTT task never falls behind the broker.
//!
//! [`Router`] runs on the MQTT task and only does what is cheap: it ignores retained
//! messages on input topics (stale or planted: a retained `reset` would act at every
//! reconnect) and counts them, refuses oversized payloads, obeys the commands `[control]
//! allow`s, and hands samples, rows and labels to a byte-bounded queue of raw payloads. When
//! that queue is full the oldest unread unlabeled message is dropped and counted
//! (`unread_dropped_total`): under a flood the daemon sheds load it can count, instead of
//! falling so far behind that its keepalive fails and the broker discards what it had queued.
//!
//! [`Ingest`] runs on its own thread and does the parsing: validation (JSON, length,
//! finiteness, magnitude, id length, class range), window assembly, labels by id or by class
//! name, then pushes queue items with the queue's overload policy. Anything malformed is
//! counted, logged at a limited rate, and goes no further.

use std::sync::atomic::Ordering::Relaxed;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{Command, InputFormat};
use super::items::Incoming;
use super::queue::{BoundedQueue, Droppable};
use super::ratelimit::RateLimitedLog;
use super::state::Shared;
use crate::session::LabelSource;
use crate::stream::sample::id_of;
use crate::stream::window::{decode_f32le, rows_from_f32le, rows_from_json};
use crate::stream::{DecodeError, SampleDecoder, WindowAssembler};

/// The topic layout under a prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    pub samples: String,
    pub rows: String,
    pub labels: String,
    pub cmd: String,
    pub predictions: String,
    pub metrics: String,
    pub status: String,
    /// The current activity, retained and rate-limited (`[metrics] state_interval_s`).
    pub state: String,
    /// The open label request, retained (or `{"open": false}`).
    pub label_request: String,
    /// Answers to the open label request: a class name.
    pub answer: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        let t = |s: &str| format!("{prefix}/{s}");
        Topics {
            samples: t("samples"),
            rows: t("rows"),
            labels: t("labels"),
            cmd: t("cmd"),
            predictions: t("predictions"),
            metrics: t("metrics"),
            status: t("status"),
            state: t("state"),
            label_request: t("label_request"),
            answer: t("label_request/answer"),
        }
    }

    /// What the daemon publishes under the prefix (beyond Home Assistant's discovery
    /// configs): a broker's ACL must let it write all of these (a test checks the shipped
    /// one). Spelled out field by field, so a new topic does not compile until it is
    /// placed here or in [`Topics::inputs`].
    pub fn outputs(&self) -> [&str; 5] {
        let Topics {
            samples: _,
            rows: _,
            labels: _,
            cmd: _,
            answer: _,
            predictions,
            metrics,
            status,
            state,
            label_request,
        } = self;
        [predictions, state, label_request, metrics, status]
    }

    /// What the daemon subscribes to: a broker's ACL must let it read all of these.
    pub fn inputs(&self) -> [&str; 5] {
        let Topics {
            samples,
            rows,
            labels,
            cmd,
            answer,
            predictions: _,
            metrics: _,
            status: _,
            state: _,
            label_request: _,
        } = self;
        [samples, rows, labels, answer, cmd]
    }
}

/// Which input a raw message came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Samples,
    Rows,
    Labels,
    /// An answer to the open label request.
    Answer,
}

/// A message as received, waiting to be parsed.
pub struct Raw {
    pub input: Input,
    /// A copy: holding rumqttc's `Bytes` would pin its whole read buffer, so the byte budget
    /// would not bound memory.
    pub payload: Vec<u8>,
    /// Labels, and samples that carry one, are kept longest under overload.
    pub labeled: bool,
    pub received: Instant,
}

impl Raw {
    pub fn new(input: Input, payload: &[u8]) -> Self {
        // A byte search, since parsing is what the raw queue exists to defer.
        let labeled = matches!(input, Input::Labels | Input::Answer)
            || memchr::memmem::find(payload, LABEL_KEY).is_some();
        Raw {
            input,
            payload: payload.to_vec(),
            labeled,
            received: Instant::now(),
        }
    }
}

impl Droppable for Raw {
    fn droppable(&self) -> bool {
        !self.labeled
    }

    fn weight(&self) -> usize {
        self.payload.len() + RAW_OVERHEAD
    }
}

const LABEL_KEY: &[u8] = b"\"label\"";
/// Bytes a queued raw message costs beyond its payload (the struct and the queue slot).
const RAW_OVERHEAD: usize = 64;

/// The raw queue's byte budget: a few MiB, and room for several of the largest payloads.
pub fn raw_budget(max_payload: usize) -> usize {
    (4 << 20).max(max_payload.saturating_add(RAW_OVERHEAD).saturating_mul(4))
}

/// The largest command payload: `{"cmd": "checkpoint"}` is 21 bytes, so this leaves room
/// for whitespace and nothing else; a larger one is refused unread, whatever
/// `mqtt.max_payload_bytes` allows the data topics.
pub const MAX_COMMAND_BYTES: usize = 256;

/// Samples without an id get one of the daemon's: this prefix and a number (`#17`). A client
/// may not give its own samples ids with this prefix, so a label for a client's sample "17"
/// can never land on the daemon's `#17` (or the other way round), while a label or answer
/// may still name `#17`, as the prediction of that sample did.
pub const ASSIGNED_ID_PREFIX: char = '#';

/// The MQTT task's side: cheap checks and routing, never parsing.
pub struct Router {
    pub topics: Topics,
    shared: Arc<Shared>,
    raw: Arc<BoundedQueue<Raw>>,
    max_payload: usize,
    allow: Vec<Command>,
    /// One line per command obeyed, but a burst of commands must not become a burst of lines.
    commands_log: RateLimitedLog,
}

impl Router {
    pub fn new(
        topics: Topics,
        shared: Arc<Shared>,
        raw: Arc<BoundedQueue<Raw>>,
        max_payload: usize,
        allow: Vec<Command>,
    ) -> Self {
        Router {
            topics,
            shared,
            raw,
            max_payload,
            allow,
            commands_log: RateLimitedLog::new(5, Duration::from_secs(10)).about("commands"),
        }
    }

    /// Routes one message; never parses a sample, never blocks.
    pub fn route(&mut self, topic: &str, payload: &[u8], retained: bool) {
        if self.shared.stopping.load(Relaxed) {
            return;
        }
        // One comparison chain: `None` is the command topic, anything else is not ours.
        let input = if topic == self.topics.samples {
            Some(Input::Samples)
        } else if topic == self.topics.rows {
            Some(Input::Rows)
        } else if topic == self.topics.labels {
            Some(Input::Labels)
        } else if topic == self.topics.answer {
            Some(Input::Answer)
        } else if topic == self.topics.cmd {
            None
        } else {
            return;
        };
        if retained {
            self.ignore_retained(topic);
            return;
        }
        let Some(input) = input else {
            let limit = MAX_COMMAND_BYTES.min(self.max_payload);
            let result = if payload.len() > limit {
                Err(Rejection::OversizedCommand(payload.len(), limit))
            } else {
                self.command(payload)
            };
            if let Err(e) = result {
                self.reject(topic, e);
            }
            return;
        };
        if payload.len() > self.max_payload {
            self.reject(topic, Rejection::Oversized(payload.len(), self.max_payload));
            return;
        }
        let c = &self.shared.counters;
        self.raw.push_with(Raw::new(input, payload), |dropped| {
            c.count_drop(&c.unread_dropped_total, &dropped)
        });
    }

    fn ignore_retained(&mut self, topic: &str) {
        self.shared
            .counters
            .retained_ignored_total
            .fetch_add(1, Relaxed);
        self.shared.log_rejection(format_args!(
            "ignored a retained message on {topic}: input topics take live messages only \
             (clear it with: mosquitto_pub -r -n -t {topic})"
        ));
    }

    fn reject(&mut self, topic: &str, e: Rejection) {
        let c = &self.shared.counters;
        match e {
            Rejection::Oversized(..) | Rejection::OversizedCommand(..) => {
                c.oversized_total.fetch_add(1, Relaxed);
            }
            Rejection::NotAllowed(_) => {
                c.commands_refused_total.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        c.rejected_total.fetch_add(1, Relaxed);
        self.shared
            .log_rejection(format_args!("rejected a message on {topic}: {e}"));
    }

    /// `{"cmd": "pause"}` or the bare word (`pause`, as a Home Assistant button sends it).
    fn command(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        let text = std::str::from_utf8(payload).map_err(|_| Rejection::NotText)?;
        let word = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => v
                .get("cmd")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string(),
            Err(_) => text.trim().to_string(),
        };
        let Some(cmd) = Command::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(&word))
        else {
            let word: String = word.chars().take(40).collect();
            return Err(Rejection::Other(format!(
                "unknown command {word:?}; expected pause, resume, checkpoint, export, reset or accept_labels"
            )));
        };
        if !self.allow.contains(&cmd) {
            return Err(Rejection::NotAllowed(cmd.name()));
        }
        let s = &self.shared;
        match cmd {
            Command::Pause => s.paused.store(true, Relaxed),
            Command::Resume => s.paused.store(false, Relaxed),
            Command::Reset => s.reset_requested.store(true, Relaxed),
            Command::Checkpoint => s.checkpoint_requested.store(true, Relaxed),
            Command::Export => s.export_requested.store(true, Relaxed),
            Command::AcceptLabels => s.accept_requested.store(true, Relaxed),
        }
        s.counters.commands_total.fetch_add(1, Relaxed);
        self.commands_log
            .info(format_args!("command: {}", cmd.name()));
        Ok(())
    }
}

/// The parsing side, on its own thread.
pub struct Ingest {
    topics: Topics,
    shared: Arc<Shared>,
    queue: Arc<BoundedQueue<Incoming>>,
    decoder: SampleDecoder,
    format: InputFormat,
    windows: WindowAssembler,
    next_id: u64,
    rows: Vec<f32>,
    /// When the message being parsed arrived (latency is measured from there).
    received: Instant,
    /// Class names, for labels given by name.
    class_names: Vec<String>,
    /// Ids of the most recent samples with their arrival, for "label the last N seconds".
    recent: std::collections::VecDeque<(Instant, String)>,
    recent_capacity: usize,
    label_window: Duration,
    inline_labels: bool,
    /// The most samples one label by class name labels.
    class_label_max: usize,
    /// One line per label by class name, limited like the rest.
    labels_log: RateLimitedLog,
}

/// Where labels by class name reach back to, and how far.
pub struct LabelWindow {
    pub class_names: Vec<String>,
    /// Samples remembered (the session keeps no more for feedback either).
    pub capacity: usize,
    pub seconds: Duration,
    /// Labels inside samples are learned from (`[input] inline_labels`).
    pub inline: bool,
    /// The most samples one label labels (the most recent ones); the rest are counted.
    pub max_samples: usize,
}

#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("payload of {0} bytes is over the limit of {1} (mqtt.max_payload_bytes)")]
    Oversized(usize, usize),
    #[error("a command of {0} bytes; commands are at most {1} bytes")]
    OversizedCommand(usize, usize),
    #[error("command {0:?} is not in [control] allow")]
    NotAllowed(&'static str),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("not UTF-8 text")]
    NotText,
    #[error("{0}")]
    Other(String),
}

impl Ingest {
    pub fn new(
        topics: Topics,
        shared: Arc<Shared>,
        queue: Arc<BoundedQueue<Incoming>>,
        decoder: SampleDecoder,
        format: InputFormat,
        windows: WindowAssembler,
        labels: LabelWindow,
    ) -> Self {
        Ingest {
            topics,
            shared,
            queue,
            decoder,
            format,
            windows,
            next_id: 0,
            rows: Vec::new(),
            received: Instant::now(),
            class_names: labels.class_names,
            recent: std::collections::VecDeque::with_capacity(labels.capacity.min(4096)),
            recent_capacity: labels.capacity.max(1),
            label_window: labels.seconds,
            inline_labels: labels.inline,
            class_label_max: labels.max_samples.max(1),
            labels_log: RateLimitedLog::new(5, Duration::from_secs(10))
                .about("labels by class name"),
        }
    }

    /// Parses what the router queued until `raw` is closed and empty, then closes the input
    /// queue behind it.
    pub fn run(mut self, raw: Arc<BoundedQueue<Raw>>) {
        let mut batch = Vec::with_capacity(64);
        while raw.pop_batch(64, Duration::from_millis(100), &mut batch) {
            for m in batch.drain(..) {
                self.handle(m);
            }
        }
        self.queue.close();
    }

    /// Parses one message; never panics.
    pub fn handle(&mut self, m: Raw) {
        self.received = m.received;
        let payload = &m.payload[..];
        let result = match m.input {
            Input::Samples => self.sample(payload),
            Input::Rows => self.rows(payload),
            Input::Labels => self.feedback(payload),
            Input::Answer => self.answer(payload),
        };
        if let Err(e) = result {
            self.shared.counters.rejected_total.fetch_add(1, Relaxed);
            let topic = match m.input {
                Input::Samples => &self.topics.samples,
                Input::Rows => &self.topics.rows,
                Input::Labels => &self.topics.labels,
                Input::Answer => &self.topics.answer,
            };
            self.shared
                .log_rejection(format_args!("rejected a message on {topic}: {e}"));
        }
    }

    fn assign_id(&mut self) -> String {
        self.next_id += 1;
        format!("{ASSIGNED_ID_PREFIX}{}", self.next_id)
    }

    fn enqueue(&mut self, x: Vec<f32>, id: Option<String>, label: Option<usize>) {
        let id = id.unwrap_or_else(|| self.assign_id());
        self.shared.counters.samples_total.fetch_add(1, Relaxed);
        if self.recent.len() == self.recent_capacity {
            self.recent.pop_front();
        }
        self.recent.push_back((Instant::now(), id.clone()));
        let dropped = self.queue.push(Incoming::Sample {
            x,
            id,
            label,
            received: self.received,
        });
        self.count_drop(dropped);
    }

    fn count_drop(&self, dropped: Option<Incoming>) {
        if let Some(d) = dropped {
            let c = &self.shared.counters;
            c.count_drop(&c.dropped_total, &d);
        }
    }

    fn sample(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        match self.format {
            InputFormat::Json => {
                let text = std::str::from_utf8(payload).map_err(|_| Rejection::NotText)?;
                let s = self.decoder.decode_json(text)?;
                if s.id
                    .as_ref()
                    .is_some_and(|id| id.starts_with(ASSIGNED_ID_PREFIX))
                {
                    return Err(Rejection::Other(format!(
                        "ids starting with '{ASSIGNED_ID_PREFIX}' are the daemon's own (it gives \
                         them to samples without an id); choose another id"
                    )));
                }
                let label = s.label.filter(|_| {
                    self.inline_labels || {
                        self.shared
                            .counters
                            .inline_labels_ignored_total
                            .fetch_add(1, Relaxed);
                        false
                    }
                });
                self.enqueue(s.x, s.id, label);
            }
            InputFormat::F32le => {
                let mut x = Vec::with_capacity(self.decoder.sample_len());
                decode_f32le(payload, &mut x)?;
                self.decoder.check_values(&x)?;
                self.enqueue(x, None, None);
            }
        }
        Ok(())
    }

    fn rows(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        let channels = self.windows.channels();
        let mut rows = std::mem::take(&mut self.rows);
        let decoded = match self.format {
            InputFormat::Json => match std::str::from_utf8(payload) {
                Ok(text) => rows_from_json(text, channels, &mut rows),
                Err(_) => {
                    self.rows = rows;
                    return Err(Rejection::NotText);
                }
            },
            InputFormat::F32le => rows_from_f32le(payload, channels, &mut rows),
        };
        let decoded = decoded.and_then(|n| {
            self.decoder
                .check_magnitude(&rows[..n * channels])
                .map(|()| n)
        });
        let result = decoded.map(|n| {
            for r in 0..n {
                if let Some(window) = self
                    .windows
                    .push_row(&rows[r * channels..(r + 1) * channels])
                {
                    self.enqueue(window, None, None);
                }
            }
        });
        self.rows = rows;
        Ok(result?)
    }

    fn feedback(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        let v: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            // A bare class name, as a Home Assistant select sends it.
            Err(e) => match std::str::from_utf8(payload) {
                Ok(text) if self.class_index(text.trim()).is_some() => {
                    serde_json::json!({ "class": text.trim() })
                }
                _ => return Err(DecodeError::NotJson(e.to_string()).into()),
            },
        };
        if let Some(name) = v.get("class") {
            return self.label_recent(name, v.get("seconds"));
        }
        let serde_json::Value::Object(obj) = &v else {
            return Err(DecodeError::NotAnObject.into());
        };
        let (id, label) = self.decoder.decode_feedback(obj)?;
        let dropped = self.queue.push(Incoming::Feedback {
            id,
            label,
            source: LabelSource::ById,
        });
        self.count_drop(dropped);
        Ok(())
    }

    /// An answer to the open label request: the class name (as a Home Assistant select or
    /// an actionable notification sends it), or `{"label": name or index}`, optionally with
    /// the request's `"id"` (then it must be the open one, so a late answer to an expired
    /// request cannot land on a newer sample).
    fn answer(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        let text = std::str::from_utf8(payload).map_err(|_| Rejection::NotText)?;
        let (label, id) = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(obj)) => {
                let label = obj.get("label").ok_or_else(|| {
                    Rejection::Other("an answer needs \"label\": a class name or index".into())
                })?;
                let label = match label {
                    serde_json::Value::String(name) => self.class_index(name),
                    v => self.decoder.class(Some(v), "label")?,
                };
                (label, id_of(obj.get("id"))?)
            }
            _ => (self.class_index(text.trim().trim_matches('"')), None),
        };
        let label = label.ok_or_else(|| {
            Rejection::Other(format!(
                "the answer {:?} names no class; expected one of {:?}",
                text.chars().take(40).collect::<String>(),
                self.class_names
            ))
        })?;
        let id = match (self.shared.open_request(), id) {
            (Some(open), None) => open,
            (Some(open), Some(id)) if open == id => open,
            (None, _) => return Err(self.refuse_answer("no label request is open".into())),
            (Some(open), Some(id)) => {
                return Err(self.refuse_answer(format!(
                    "the answer is for request {id:?}, but the open one is {open:?}"
                )))
            }
        };
        let dropped = self.queue.push(Incoming::Feedback {
            id,
            label,
            source: LabelSource::Answer,
        });
        self.count_drop(dropped);
        Ok(())
    }

    /// An answer that has no open request to go to: counted apart from malformed ones.
    fn refuse_answer(&self, why: String) -> Rejection {
        self.shared
            .counters
            .answers_refused_total
            .fetch_add(1, Relaxed);
        Rejection::Other(why)
    }

    fn class_index(&self, name: &str) -> Option<usize> {
        self.class_names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
    }

    /// `{"class": "SITTING"}` (optionally `"seconds": s`): "this is what I have been doing",
    /// a label for every sample of the last `seconds` (default `[input] label_window_s`).
    fn label_recent(
        &mut self,
        name: &serde_json::Value,
        seconds: Option<&serde_json::Value>,
    ) -> Result<(), Rejection> {
        let label = name
            .as_str()
            .and_then(|n| self.class_index(n))
            .ok_or_else(|| {
                let name: String = name.to_string().chars().take(40).collect();
                Rejection::Other(format!(
                    "\"class\" is {name}, expected one of {:?}",
                    self.class_names
                ))
            })?;
        let window = match seconds {
            None => self.label_window,
            Some(s) => s
                .as_f64()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    Rejection::Other(format!("\"seconds\" is {s}, expected 0 < s <= 3600"))
                })?,
        };
        let since = Instant::now().checked_sub(window);
        // `recent` is in arrival order. Over the cap, the most recent samples are labeled:
        // the ones nearest the label are those it most likely describes.
        let within = self
            .recent
            .iter()
            .rev()
            .take_while(|(at, _)| since.is_none_or(|t| *at >= t))
            .count();
        let labeled = within.min(self.class_label_max);
        self.shared
            .counters
            .class_label_excess_total
            .fetch_add((within - labeled) as u64, Relaxed);
        let ids: Vec<String> = self
            .recent
            .iter()
            .skip(self.recent.len() - labeled)
            .map(|(_, id)| id.clone())
            .collect();
        let class = &self.class_names[label];
        self.labels_log.info(format_args!(
            "labelled the last {} sample(s) ({window:?}) as {class}",
            ids.len(),
        ));
        for id in ids {
            let dropped = self.queue.push(Incoming::Feedback {
                id,
                label,
                source: LabelSource::ByClass,
            });
            self.count_drop(dropped);
        }
        Ok(())
    }
}
