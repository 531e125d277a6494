//! MQTT-to-prediction benchmark of the real daemon (release build) against a real mosquitto:
//! what learning on the device costs inference. Run with `cargo bench --bench daemon`.
//!
//! The same load runs with training on and with training off, each time on a fresh daemon
//! with the default config. Training is switched off with the daemon's own `pause` command on
//! `{prefix}/cmd` (the config has no key that turns learning off): a paused daemon still
//! parses, predicts, publishes and files every sample with its session, and only skips the
//! student steps (and so the EMA refreshes). The on side is sent `resume`, a no-op, so both
//! sides get the same command and the same wait for the metrics to confirm it. The sides
//! alternate (on, off, then off, on, ...) so a neighbour's burst of CPU does not land on one
//! side only.
//!
//! Each run: phase 1 publishes samples as fast as one client can and reports the sustained
//! rate of predictions coming back. Phase 2 paces samples at a fixed rate below saturation and
//! reports publish-to-prediction latency as a client sees it (two broker hops included).
//! Peak RSS is the daemon's VmHWM at the end. Then per side: the median saturated rate, p50
//! and p99 over all that side's paced samples, the largest peak RSS; and the on/off ratios.
//!
//! EDGEMT_BENCH_SAMPLES (10,000), EDGEMT_BENCH_RATE (500/s) and EDGEMT_BENCH_ROUNDS (6; each
//! round is one run per side) override the sizes; EDGEMT_TEST_BIN runs another build.

#[path = "../tests/util/broker.rs"]
#[allow(dead_code)]
mod broker;

mod util {
    pub fn path(rel: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

use std::collections::HashMap;
use std::time::{Duration, Instant};

use broker::{daemon_config, Broker, Daemon, MqttPeer};
use serde_json::Value;

/// The acceptance target: learning may cost inference at most this much.
const P99_RATIO_MAX: f64 = 1.10;
const RATE_RATIO_MIN: f64 = 0.90;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Training {
    On,
    Off,
}

impl Training {
    fn name(self) -> &'static str {
        match self {
            Training::On => "on",
            Training::Off => "off",
        }
    }

    /// What `{prefix}/cmd` is sent before the load, and the `paused` metric that confirms it.
    fn command(self) -> (&'static str, u64) {
        match self {
            Training::On => ("resume", 0),
            Training::Off => ("pause", 1),
        }
    }
}

/// What one daemon did under the load.
struct Run {
    training: Training,
    published_s: f64,
    sustained: f64,
    predicted: usize,
    /// Paced publish -> prediction latencies, µs, sorted.
    latencies: Vec<f64>,
    peak_rss_bytes: u64,
    /// The daemon's last metrics message.
    metrics: Value,
}

/// The shipped target stream as sample payloads (ids replaced, truth removed).
struct Load {
    lines: Vec<Value>,
}

impl Load {
    fn read() -> Load {
        let lines = std::fs::read_to_string(util::path("data/target_stream.jsonl"))
            .expect("data/target_stream.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON sample"))
            .collect();
        Load { lines }
    }

    fn payload(&self, i: usize, id: String) -> String {
        let mut s = self.lines[i % self.lines.len()].clone();
        s["id"] = Value::from(id);
        if let Some(o) = s.as_object_mut() {
            o.remove("truth");
        }
        s.to_string()
    }
}

/// Runs phase 1 and phase 2 against a fresh daemon with `training` on or off.
fn run_once(
    broker: &Broker,
    dir: &std::path::Path,
    load: &Load,
    index: usize,
    training: Training,
    n: usize,
    rate: usize,
) -> Run {
    let prefix = format!("edgemt-bench-{index}");
    let cfg = daemon_config(dir, broker, &prefix, "[input]\nqueue_capacity = 4096\n");
    let mut daemon = Daemon::start(&cfg, &[("RUST_LOG", "warn")]);
    let pred = format!("{prefix}/predictions");
    let metrics_topic = format!("{prefix}/metrics");
    let samples = format!("{prefix}/samples");
    let dashboard = MqttPeer::connect(
        broker.port,
        &format!("bench-dashboard-{index}"),
        &[&pred, &metrics_topic],
    );
    let sensor = MqttPeer::connect(broker.port, &format!("bench-sensor-{index}"), &[]);
    // Up (its first metrics message), then training switched as wanted and confirmed by the
    // metrics, so the load never meets the other state.
    while dashboard
        .recv(Duration::from_secs(10))
        .is_none_or(|(t, _)| t != metrics_topic)
    {}
    let (command, paused) = training.command();
    sensor.publish(&format!("{prefix}/cmd"), command);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "the daemon did not confirm `{command}` within 10 s:\n{}",
            daemon.log_text()
        );
        if let Some((t, m)) = dashboard.recv(Duration::from_millis(200)) {
            let m: Value = serde_json::from_slice(&m).unwrap_or_default();
            if t == metrics_topic && m["paused"].as_u64() == Some(paused) {
                break;
            }
        }
    }

    // Phase 1: saturation.
    let payloads: Vec<String> = (0..n).map(|i| load.payload(i, i.to_string())).collect();
    let start = Instant::now();
    for p in &payloads {
        sensor.publish(&samples, p.as_bytes());
    }
    let published = start.elapsed();
    let (mut got, mut last) = (0usize, start);
    let mut last_metrics = None;
    // Until every sample is predicted, or none has been for 3 s (the rest were dropped by
    // the overload policy; metrics keep arriving, so time is what ends the wait).
    while got < n && last.elapsed() < Duration::from_secs(3) {
        match dashboard.recv(Duration::from_millis(200)) {
            Some((t, _)) if t == pred => {
                got += 1;
                last = Instant::now();
            }
            Some((_, m)) => last_metrics = Some(m),
            None => {}
        }
    }
    let sustained = got as f64 / last.duration_since(start).as_secs_f64();

    // Phase 2: paced latency. Between sends the client sleeps on its inbox until the next
    // send is due, so its own CPU use stays small (on 2 cores it competes with the daemon).
    let m = (rate * 6).min(n);
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(m);
    let mut latencies = Vec::with_capacity(m);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let t0 = Instant::now();
    for i in 0..m {
        let due = t0 + period * i as u32;
        loop {
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(msg) = dashboard.recv(left) {
                take(msg, &pred, &mut sent, &mut latencies, &mut last_metrics);
            }
        }
        let id = format!("p{i}");
        let payload = load.payload(i, id.clone());
        sent.insert(id, Instant::now());
        sensor.publish(&samples, payload);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sent.is_empty() && Instant::now() < deadline {
        if let Some(msg) = dashboard.recv(Duration::from_millis(100)) {
            take(msg, &pred, &mut sent, &mut latencies, &mut last_metrics);
        }
    }
    // One metrics message from after the load, so the counters are final.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match dashboard.recv(Duration::from_millis(100)) {
            Some((t, p)) if t == metrics_topic => {
                last_metrics = Some(p);
                break;
            }
            _ => {}
        }
    }
    latencies.sort_by(f64::total_cmp);
    let peak_rss_bytes = daemon.peak_rss_bytes();
    daemon.terminate();
    let metrics: Value = last_metrics
        .and_then(|m| serde_json::from_slice(&m).ok())
        .unwrap_or_default();
    let steps = metrics["train_steps"].as_u64().unwrap_or(0);
    match training {
        Training::On => assert!(steps > 0, "training on, but no train step ran"),
        Training::Off => assert_eq!(steps, 0, "training off, but {steps} train steps ran"),
    }
    Run {
        training,
        published_s: published.as_secs_f64(),
        sustained,
        predicted: got,
        latencies,
        peak_rss_bytes,
        metrics,
    }
}

/// A message during phase 2: a prediction's latency, or the latest metrics.
fn take(
    (topic, payload): (String, Vec<u8>),
    pred: &str,
    sent: &mut HashMap<String, Instant>,
    latencies: &mut Vec<f64>,
    last_metrics: &mut Option<Vec<u8>>,
) {
    if topic == pred {
        let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
        if let Some(s) = sent.remove(v["id"].as_str().unwrap_or("")) {
            latencies.push(s.elapsed().as_secs_f64() * 1e6);
        }
    } else {
        *last_metrics = Some(payload);
    }
}

/// One side's numbers over its runs.
struct Side {
    sustained: f64,
    p50: f64,
    p99: f64,
    peak_rss_mib: f64,
}

impl Side {
    fn of(runs: &[Run], training: Training) -> Side {
        let runs: Vec<&Run> = runs.iter().filter(|r| r.training == training).collect();
        let mut all: Vec<f64> = runs.iter().flat_map(|r| r.latencies.clone()).collect();
        all.sort_by(f64::total_cmp);
        Side {
            sustained: median(runs.iter().map(|r| r.sustained).collect()),
            p50: percentile(&all, 0.5),
            p99: percentile(&all, 0.99),
            peak_rss_mib: runs
                .iter()
                .map(|r| r.peak_rss_bytes as f64 / (1 << 20) as f64)
                .fold(0.0, f64::max),
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let n = env_or("EDGEMT_BENCH_SAMPLES", 10_000);
    let rate = env_or("EDGEMT_BENCH_RATE", 500);
    // Six rounds: on this shared 2-core machine one side's saturated rate varies by a
    // quarter between runs (15,000 to 19,000/s with training off), so medians of two per side
    // left the on/off ratios to chance; of six they held both targets.
    let rounds = env_or("EDGEMT_BENCH_ROUNDS", 6).max(1);
    let load = Load::read();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = Broker::start();

    println!(
        "daemon bench: {rounds} round(s) of one run per side (on, off / off, on, ...), fresh daemon each run; \
         {n} samples saturated, then {} paced at {rate}/s",
        (rate * 6).min(n)
    );
    let mut runs = Vec::with_capacity(2 * rounds);
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Training::On, Training::Off]
        } else {
            [Training::Off, Training::On]
        };
        for training in order {
            let r = run_once(&broker, dir.path(), &load, runs.len(), training, n, rate);
            println!(
                "  run {} training {:>3}: published in {:.2} s, sustained {:.0}/s ({}/{n} predicted, \
                 dropped_total {}, train_dropped_total {}), paced p50 {:.0} us p99 {:.0} us ({} samples), \
                 train_steps {}, teacher_version {}, peak RSS {:.1} MiB",
                runs.len() + 1,
                r.training.name(),
                r.published_s,
                r.sustained,
                r.predicted,
                r.metrics["dropped_total"],
                r.metrics["train_dropped_total"],
                percentile(&r.latencies, 0.5),
                percentile(&r.latencies, 0.99),
                r.latencies.len(),
                r.metrics["train_steps"],
                r.metrics["teacher_version"],
                r.peak_rss_bytes as f64 / (1 << 20) as f64,
            );
            runs.push(r);
        }
    }

    let on = Side::of(&runs, Training::On);
    let off = Side::of(&runs, Training::Off);
    println!("                                training on   training off   on/off");
    let row = |what: &str, a: f64, b: f64, digits: usize| {
        println!(
            "  {what:<28} {a:>11.digits$}   {b:>12.digits$}   {:>6.3}",
            a / b
        );
    };
    row(
        "saturated rate (median, /s)",
        on.sustained,
        off.sustained,
        0,
    );
    row("paced latency p50 (us)", on.p50, off.p50, 0);
    row("paced latency p99 (us)", on.p99, off.p99, 0);
    row(
        "peak RSS (largest, MiB)",
        on.peak_rss_mib,
        off.peak_rss_mib,
        1,
    );
    let p99_ok = on.p99 <= P99_RATIO_MAX * off.p99;
    let rate_ok = on.sustained >= RATE_RATIO_MIN * off.sustained;
    println!(
        "  target: p99 on/off <= {P99_RATIO_MAX:.2} {}, saturated on/off >= {RATE_RATIO_MIN:.2} {}",
        if p99_ok { "met" } else { "MISSED" },
        if rate_ok { "met" } else { "MISSED" },
    );
}
