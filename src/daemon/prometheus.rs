//! The optional Prometheus endpoint (`[metrics] prometheus = "127.0.0.1:9898"`): `GET /metrics`
//! in Prometheus' text format 0.0.4, written by the `prometheus-client` crate, in base units
//! (seconds, bytes) with an `edgemt_` prefix.
//!
//! Counters and gauges are generated from the telemetry table ([`METRICS`]) and read from
//! [`Shared`] at scrape time by a collector, so they and the MQTT metrics message have one
//! source of truth; only the latency histogram is kept here, because percentiles over an
//! interval cannot be aggregated across scrapes. The HTTP side is a few lines on a tokio
//! listener: one small request, one response, a timeout, a cap on what is read and a cap on
//! connections open at once, so stray or idle clients cannot hold memory, the task or the
//! daemon's file descriptors.

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
use super::telemetry::{self, Kind, Metric, Reading, Snapshot, METRICS};

/// The registry served at `/metrics` and the latency histogram the inference thread feeds.
pub struct Exposition {
    registry: Registry,
    pub latency: Histogram,
    /// Where the endpoint counts the connections it refused.
    shared: Arc<Shared>,
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
        registry.register_collector(Box::new(SharedCollector(shared.clone())));
        Exposition {
            registry,
            latency,
            shared,
        }
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

/// Prometheus' unit for a table unit, and the factor to base units.
fn base_unit(unit: telemetry::Unit) -> (Option<Unit>, f64) {
    match unit {
        telemetry::Unit::Seconds => (Some(Unit::Seconds), 1.0),
        telemetry::Unit::Micros => (Some(Unit::Seconds), 1e-6),
        telemetry::Unit::Bytes => (Some(Unit::Bytes), 1.0),
        telemetry::Unit::Ratio => (Some(Unit::Ratios), 1.0),
        telemetry::Unit::None | telemetry::Unit::PerSecond => (None, 1.0),
    }
}

/// The sample name a table row is exposed as (`edgemt_samples_total`), if it is exposed.
pub fn series_name(m: &Metric) -> Option<String> {
    let name = m.prometheus?;
    let mut out = format!("edgemt_{name}");
    if let Some(unit) = base_unit(m.unit).0 {
        out.push('_');
        out.push_str(unit.as_str());
    }
    if m.kind == Kind::Counter {
        out.push_str("_total");
    }
    Some(out)
}

fn encode_metric(e: &mut DescriptorEncoder, m: &Metric, s: &Snapshot) -> fmt::Result {
    let Some(name) = m.prometheus else {
        return Ok(());
    };
    let (unit, factor) = base_unit(m.unit);
    match ((m.read)(s), m.kind) {
        // Series without data are left out rather than reported as 0.
        (Reading::Missing, _) => Ok(()),
        // Integer counters stay integers in the exposition.
        (Reading::Int(v), Kind::Counter) if factor == 1.0 => {
            let c = ConstCounter::new(v);
            c.encode(e.encode_descriptor(name, m.help, unit.as_ref(), c.metric_type())?)
        }
        (value, Kind::Counter) => {
            let c = ConstCounter::new(value.as_f64().unwrap_or_default() * factor);
            c.encode(e.encode_descriptor(name, m.help, unit.as_ref(), c.metric_type())?)
        }
        (value, Kind::Gauge) => {
            let g = ConstGauge::new(value.as_f64().unwrap_or_default() * factor);
            g.encode(e.encode_descriptor(name, m.help, unit.as_ref(), g.metric_type())?)
        }
    }
}

impl Collector for SharedCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let snapshot = self.0.snapshot();
        for m in METRICS {
            encode_metric(&mut e, m, &snapshot)?;
        }
        Ok(())
    }
}

/// Connections served at once. A scraper needs one; beyond these a connection is closed as
/// soon as it is accepted (and counted), so idle clients cannot take the daemon's file
/// descriptors: ~1,100 idle ones used to exhaust its 1,024, and checkpoints then failed with
/// "Too many open files".
pub const MAX_CONNECTIONS: usize = 16;

/// How long one connection may take, request and response; an idle one holds its slot no
/// longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, exposition: Arc<Exposition>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let counters = &exposition.shared.counters;
            counters.prometheus_refused_total.fetch_add(1, Relaxed);
            drop(stream);
            continue;
        };
        let exposition = exposition.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, async {
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
