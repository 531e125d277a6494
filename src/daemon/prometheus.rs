//! The optional Prometheus endpoint (`[metrics] prometheus = "127.0.0.1:9898"`): `GET /metrics`
//! in Prometheus' text format 0.0.4, written by the `prometheus-client` crate, in base units
//! (seconds, bytes) with an `edgemt_` prefix.
//!
//! Counters and gauges are read from [`Shared`] at scrape time by a collector, so there is
//! one source of truth for them and the MQTT metrics message; only the latency histogram is
//! kept here, because percentiles over an interval cannot be aggregated across scrapes. The
//! HTTP side is a few lines on a tokio listener: one small request, one response, a timeout,
//! and a cap on what is read, so a stray client cannot hold memory or the task.

use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::state::Shared;
use crate::learn::Serving;

/// The registry served at `/metrics` and the latency histogram the inference thread feeds.
pub struct Exposition {
    registry: Registry,
    pub latency: Histogram,
}

impl Exposition {
    pub fn new(shared: Arc<Shared>) -> Self {
        let mut registry = Registry::with_prefix("edgemt");
        // 100 µs to ~3.3 s, doubling: a prediction is a batch away, a backlog is seconds.
        let latency = Histogram::new(exponential_buckets(1e-4, 2.0, 16));
        registry.register_with_unit(
            "prediction_latency",
            "Time from a sample's receipt to its prediction's publication",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register_collector(Box::new(SharedCollector(shared)));
        Exposition { registry, latency }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

struct SharedCollector(Arc<Shared>);

impl fmt::Debug for SharedCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let m = ConstCounter::new(value);
    m.encode(e.encode_descriptor(name, help, None, m.metric_type())?)
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> fmt::Result {
    let m = ConstGauge::new(value);
    m.encode(e.encode_descriptor(name, help, unit, m.metric_type())?)
}

impl Collector for SharedCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let c = &s.counters;
        let counters: [(&str, &str, u64); 22] = [
            (
                "unread_dropped",
                "Messages dropped unread because the parser was behind",
                c.unread_dropped_total.load(Relaxed),
            ),
            (
                "samples",
                "Valid samples taken in",
                c.samples_total.load(Relaxed),
            ),
            (
                "predictions",
                "Predictions published",
                c.predictions_total.load(Relaxed),
            ),
            (
                "predictions_dropped",
                "Predictions made but not published (client queue full)",
                c.predictions_dropped_total.load(Relaxed),
            ),
            (
                "dropped",
                "Samples dropped from the full input queue",
                c.dropped_total.load(Relaxed),
            ),
            (
                "train_dropped",
                "Predicted samples dropped from the full training queue",
                c.train_dropped_total.load(Relaxed),
            ),
            (
                "labeled_dropped",
                "Labeled samples and labels dropped from either queue",
                c.labeled_dropped_total.load(Relaxed),
            ),
            (
                "unembeddable",
                "Samples whose embedding was non-finite or absurd",
                c.unembeddable_total.load(Relaxed),
            ),
            (
                "rejected",
                "Messages refused",
                c.rejected_total.load(Relaxed),
            ),
            (
                "oversized",
                "Payloads over the size limit",
                c.oversized_total.load(Relaxed),
            ),
            (
                "retained_ignored",
                "Retained messages on input topics, ignored",
                c.retained_ignored_total.load(Relaxed),
            ),
            (
                "commands",
                "Commands obeyed",
                c.commands_total.load(Relaxed),
            ),
            (
                "commands_refused",
                "Commands not in [control] allow",
                c.commands_refused_total.load(Relaxed),
            ),
            (
                "labels",
                "Labels learned from",
                c.labels_total.load(Relaxed),
            ),
            (
                "feedback",
                "Labels matched to an earlier prediction",
                c.feedback_total.load(Relaxed),
            ),
            (
                "feedback_correct",
                "Matched labels the served model had predicted",
                c.feedback_correct.load(Relaxed),
            ),
            (
                "late_labels",
                "Labels whose sample was no longer kept",
                c.late_labels_total.load(Relaxed),
            ),
            (
                "publish_dropped",
                "Other publishes dropped (client queue full)",
                c.publish_dropped_total.load(Relaxed),
            ),
            (
                "checkpoints",
                "Checkpoints written",
                c.checkpoints_total.load(Relaxed),
            ),
            (
                "checkpoint_failures",
                "Checkpoints that could not be written",
                c.checkpoint_failures_total.load(Relaxed),
            ),
            (
                "exports",
                "Adapted models exported",
                c.exports_total.load(Relaxed),
            ),
            (
                "mqtt_reconnects",
                "Broker connections lost",
                c.mqtt_reconnects_total.load(Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut e, name, help, value)?;
        }
        let down = ConstCounter::new(c.mqtt_disconnected_ms_total.load(Relaxed) as f64 / 1000.0);
        down.encode(e.encode_descriptor(
            "mqtt_disconnected",
            "Time without a broker connection",
            Some(&Unit::Seconds),
            down.metric_type(),
        )?)?;
        let t = s.train.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (name, help, value) in [
            ("train_steps", "Student steps taken", t.train_steps),
            ("ema_updates", "EMA refreshes of the teacher", t.ema_updates),
            (
                "skipped_nonfinite",
                "Steps skipped for a non-finite loss or gradient",
                t.skipped_nonfinite,
            ),
            ("rollbacks", "Rollbacks by the guard", t.rollbacks),
            ("resets", "Resets to the pretrained model", t.resets),
            (
                "gate_switches",
                "Changes of the served model",
                t.gate_switches,
            ),
            (
                "calibration_changes",
                "Changes of the adopted mounting",
                t.calibration_changes,
            ),
        ] {
            counter(&mut e, name, help, value)?;
        }
        let served = s.teacher();
        let bool_gauge = |v: bool| if v { 1.0 } else { 0.0 };
        let mut gauges: Vec<(&str, &str, Option<&Unit>, f64)> = vec![
            (
                "teacher_version",
                "Version of the teacher (EMA refreshes since start or reset)",
                None,
                served.version as f64,
            ),
            (
                "serving_adapted",
                "1 while the adapted teacher answers, 0 while the pretrained model",
                None,
                bool_gauge(served.serving == Serving::Adapted),
            ),
            (
                "mounting_adopted",
                "1 while a calibrated mounting is applied",
                None,
                bool_gauge(served.mounting.is_some()),
            ),
            (
                "paused",
                "1 while training is paused",
                None,
                bool_gauge(s.paused.load(Relaxed)),
            ),
            (
                "teacher_finite",
                "1 while the student and teacher weights are finite",
                None,
                bool_gauge(t.teacher_finite),
            ),
            (
                "mqtt_connected",
                "1 while connected to the broker",
                None,
                bool_gauge(s.connected.load(Relaxed)),
            ),
            (
                "labeled_buffer",
                "Labeled samples in the learner's buffer",
                None,
                t.labeled_buffer as f64,
            ),
            (
                "unlabeled_buffer",
                "Unlabeled samples in the learner's buffer",
                None,
                t.unlabeled_buffer as f64,
            ),
            (
                "resident_memory",
                "Resident set size",
                Some(&Unit::Bytes),
                crate::metrics::rss_bytes() as f64,
            ),
            (
                "uptime",
                "Time since start",
                Some(&Unit::Seconds),
                s.started.elapsed().as_secs_f64(),
            ),
        ];
        // Gauges without data are left out rather than reported as 0.
        if t.gate_p.is_finite() {
            gauges.push((
                "gate_p",
                "The serving gate's sign-test p-value",
                None,
                t.gate_p,
            ));
        }
        if let Some(a) = t.feedback_accuracy_recent {
            gauges.push((
                "feedback_accuracy_recent",
                "Share of the most recent labels the served model predicted",
                Some(&Unit::Ratios),
                a,
            ));
        }
        for (name, help, unit, value) in gauges {
            gauge(&mut e, name, help, unit, value)?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exposition: Arc<Exposition>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let mut request = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                // The request line and headers only: nothing a scraper sends is larger.
                while request.len() < 8192 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
                let (status, kind, body) =
                    if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
                        (
                            "200 OK",
                            "text/plain; version=0.0.4; charset=utf-8",
                            exposition.encode(),
                        )
                    } else {
                        (
                            "404 Not Found",
                            "text/plain; charset=utf-8",
                            "edgemt serves GET /metrics only\n".to_string(),
                        )
                    };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}
