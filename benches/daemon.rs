//! MQTT-to-prediction benchmark of the real daemon (release build) against a real mosquitto,
//! with adaptation on (default config). Run with `cargo bench --bench daemon`.
//!
//! Phase 1 publishes samples as fast as one client can and reports the sustained rate of
//! predictions coming back. Phase 2 paces samples at a fixed rate below saturation and
//! reports publish-to-prediction latency p50/p99 as a client sees it. Peak RSS is the
//! daemon's VmHWM at the end. EDGEMT_BENCH_SAMPLES and EDGEMT_BENCH_RATE override the sizes.

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

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let n = env_or("EDGEMT_BENCH_SAMPLES", 10_000);
    let rate = env_or("EDGEMT_BENCH_RATE", 500);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(util::path("data/target_stream.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let payload = |i: usize| {
        let mut s = lines[i % lines.len()].clone();
        s["id"] = serde_json::Value::from(i.to_string());
        s.as_object_mut().unwrap().remove("truth");
        s.to_string()
    };

    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    let prefix = "edgemt-bench";
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        "[input]\nqueue_capacity = 4096\n",
    );
    let mut daemon = Daemon::start(&cfg, &[("RUST_LOG", "warn")]);
    let pred = format!("{prefix}/predictions");
    let metrics = format!("{prefix}/metrics");
    let dashboard = MqttPeer::connect(broker.port, "bench-dashboard", &[&pred, &metrics]);
    let sensor = MqttPeer::connect(broker.port, "bench-sensor", &[]);
    // Wait for the daemon to be up (its first metrics message).
    while dashboard
        .recv(Duration::from_secs(10))
        .is_none_or(|(t, _)| t != metrics)
    {}

    // Phase 1: saturation.
    let payloads: Vec<String> = (0..n).map(payload).collect();
    let start = Instant::now();
    for p in &payloads {
        sensor.publish(&format!("{prefix}/samples"), p.as_bytes());
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

    // Phase 2: paced latency.
    let m = (rate * 6).min(n);
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(m);
    let mut latencies = Vec::with_capacity(m);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let t0 = Instant::now();
    for i in 0..m {
        let due = t0 + period * i as u32;
        while Instant::now() < due {
            while let Some((t, p)) = dashboard.recv(Duration::from_micros(50)) {
                if t == pred {
                    let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                    if let Some(s) = sent.remove(v["id"].as_str().unwrap_or("")) {
                        latencies.push(s.elapsed().as_secs_f64() * 1e6);
                    }
                }
            }
        }
        let id = format!("p{i}");
        let mut s = lines[i % lines.len()].clone();
        s["id"] = serde_json::Value::from(id.clone());
        sent.insert(id, Instant::now());
        sensor.publish(&format!("{prefix}/samples"), s.to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sent.is_empty() && Instant::now() < deadline {
        if let Some((t, p)) = dashboard.recv(Duration::from_millis(100)) {
            if t == pred {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                if let Some(s) = sent.remove(v["id"].as_str().unwrap_or("")) {
                    latencies.push(s.elapsed().as_secs_f64() * 1e6);
                }
            } else {
                last_metrics = Some(p);
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap_or_default();
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let metrics: serde_json::Value = last_metrics
        .map(|m| serde_json::from_slice(&m).unwrap())
        .unwrap_or_default();
    daemon.terminate();

    println!(
        "daemon bench: {n} samples published in {:.2} s by one client",
        published.as_secs_f64()
    );
    println!("  sustained MQTT -> prediction: {sustained:.0} samples/s ({got}/{n} predicted, dropped_total {})", metrics["dropped_total"]);
    println!(
        "  paced at {rate}/s: publish -> prediction latency p50 {:.0} us, p99 {:.0} us over {} samples",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.len()
    );
    println!(
        "  adaptation: train_steps {}, teacher_version {}, pseudo_acceptance {}",
        metrics["train_steps"], metrics["teacher_version"], metrics["pseudo_acceptance"]
    );
    println!("  daemon peak RSS {:.1} MiB", hwm_kb as f64 / 1024.0);
}
