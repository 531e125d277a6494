//! Routing of incoming MQTT messages: samples, raw rows, label feedback and commands.
//!
//! Runs on the MQTT task, so everything here is quick and never blocks: a message is
//! validated (size, JSON, length, finiteness, class range), turned into queue items, and
//! pushed with the drop-oldest-unlabeled policy. Anything malformed is counted, logged at a
//! limited rate, and goes no further.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::BoundedQueue;
use super::state::Shared;
use super::workers::Incoming;
use crate::config::InputFormat;
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
        }
    }

    pub fn inputs(&self) -> [&str; 4] {
        [&self.samples, &self.rows, &self.labels, &self.cmd]
    }
}

/// At most `burst` log lines per `period`; the rest are counted and summarised.
pub struct RateLimitedLog {
    period: Duration,
    burst: u32,
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(burst: u32, period: Duration) -> Self {
        RateLimitedLog {
            period,
            burst,
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }

    pub fn warn(&mut self, msg: std::fmt::Arguments) {
        if self.window_start.elapsed() >= self.period {
            if self.suppressed > 0 {
                tracing::warn!("{} more rejected messages were not logged", self.suppressed);
            }
            self.window_start = Instant::now();
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            tracing::warn!("{msg}");
        } else {
            self.suppressed += 1;
        }
    }
}

pub struct Ingest {
    pub topics: Topics,
    shared: Arc<Shared>,
    queue: Arc<BoundedQueue<Incoming>>,
    decoder: SampleDecoder,
    format: InputFormat,
    windows: WindowAssembler,
    max_payload: usize,
    next_id: u64,
    rows: Vec<f32>,
    log: RateLimitedLog,
}

#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("payload of {0} bytes is over the limit of {1}")]
    Oversized(usize, usize),
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
        max_payload: usize,
    ) -> Self {
        Ingest {
            topics,
            shared,
            queue,
            decoder,
            format,
            windows,
            max_payload,
            next_id: 0,
            rows: Vec::new(),
            log: RateLimitedLog::new(5, Duration::from_secs(10)),
        }
    }

    /// Handles one message; never panics, never blocks.
    pub fn handle(&mut self, topic: &str, payload: &[u8]) {
        if self.shared.stopping.load(Relaxed) {
            return;
        }
        let result = if payload.len() > self.max_payload {
            Err(Rejection::Oversized(payload.len(), self.max_payload))
        } else if topic == self.topics.samples {
            self.sample(payload)
        } else if topic == self.topics.rows {
            self.rows(payload)
        } else if topic == self.topics.labels {
            self.feedback(payload)
        } else if topic == self.topics.cmd {
            self.command(payload)
        } else {
            return;
        };
        if let Err(e) = result {
            self.shared.counters.rejected_total.fetch_add(1, Relaxed);
            self.log
                .warn(format_args!("rejected a message on {topic}: {e}"));
        }
    }

    fn assign_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    fn enqueue(&mut self, x: Vec<f32>, id: Option<String>, label: Option<usize>) {
        let id = id.unwrap_or_else(|| self.assign_id());
        self.shared.counters.samples_total.fetch_add(1, Relaxed);
        let dropped = self.queue.push(Incoming::Sample {
            x,
            id,
            label,
            received: Instant::now(),
        });
        self.shared
            .counters
            .dropped_total
            .fetch_add(dropped as u64, Relaxed);
    }

    fn sample(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        match self.format {
            InputFormat::Json => {
                let text = std::str::from_utf8(payload).map_err(|_| Rejection::NotText)?;
                let s = self.decoder.decode_json(text)?;
                self.enqueue(s.x, s.id, s.label);
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
        let v: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let id = id_of(v.get("id"))?
            .ok_or_else(|| Rejection::Other("label feedback needs an \"id\"".into()))?;
        let label = self
            .decoder
            .class(v.get("label"), "label")?
            .ok_or_else(|| Rejection::Other("label feedback needs a \"label\"".into()))?;
        self.queue.push(Incoming::Feedback { id, label });
        Ok(())
    }

    fn command(&mut self, payload: &[u8]) -> Result<(), Rejection> {
        let v: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let cmd = v.get("cmd").and_then(|c| c.as_str()).unwrap_or("");
        let s = &self.shared;
        match cmd {
            "pause" => s.paused.store(true, Relaxed),
            "resume" => s.paused.store(false, Relaxed),
            "reset" => s.reset_requested.store(true, Relaxed),
            "checkpoint" => s.checkpoint_requested.store(true, Relaxed),
            "export" => s.export_requested.store(true, Relaxed),
            other => {
                return Err(Rejection::Other(format!(
                    "unknown command {other:?}; expected pause, resume, reset, checkpoint, export"
                )))
            }
        }
        s.counters.commands_total.fetch_add(1, Relaxed);
        tracing::info!("command: {cmd}");
        Ok(())
    }
}
