//! Long hostile runs against the real daemon and broker: a minute-long flood of valid and
//! malicious input, and twenty broker restarts under QoS 1. They take minutes, so they are
//! `#[ignore]`d and kept out of CI; run them with
//! `cargo test --test integration -- --ignored hostile`. Each prints the numbers it measured
//! (eprintln) so that they can be quoted, and reports every failed check at once.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;

use crate::util::broker::{
    daemon_config, daemon_config_mqtt, last_metrics, num, on, Broker, BrokerOptions, Daemon,
    MqttPeer, PeerOptions,
};
use crate::util::{sample_with_id, stream, tempdir};

/// A small deterministic generator (xorshift64*), so a flood is the same every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// What the flood sends; the first three reach the daemon's sample counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ValidUnlabeled,
    ValidLabeled,
    /// Valid input whose values (3e38) are finite but drive the backbone to infinities.
    Extreme,
    Feedback,
    Garbage,
    /// 300 KB, over the default max_payload_bytes of 256 KiB.
    Oversized,
    /// 5 MB.
    Huge,
    /// A valid sample but with a 200 KB id.
    LongId,
}

impl Kind {
    /// Valid under the default config: the 3e38 ones are beyond `[input] max_abs`.
    fn is_sample(self) -> bool {
        matches!(self, Kind::ValidUnlabeled | Kind::ValidLabeled)
    }
}

/// The sent messages per kind, shared by the publisher threads.
#[derive(Default)]
struct Sent(Mutex<BTreeMap<Kind, u64>>);

impl Sent {
    fn add(&self, kind: Kind) {
        *self.0.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn samples(&self) -> u64 {
        let sent = self.0.lock().unwrap();
        sent.iter()
            .filter(|(k, _)| k.is_sample())
            .map(|(_, n)| n)
            .sum()
    }
}

/// Garbage of several kinds, picked by `n`.
fn garbage(n: u64, prefix: &str) -> (String, Vec<u8>) {
    let t = |s: &str| format!("{prefix}/{s}");
    let nan: Vec<&str> = vec!["NaN"; 384];
    let huge: Vec<f64> = vec![1e300; 384];
    let short: Vec<f32> = vec![0.1; 383];
    match n % 9 {
        0 => (t("samples"), b"not json at all".to_vec()),
        1 => (t("samples"), br#"{"x": [1, 2, 3]}"#.to_vec()),
        2 => (
            t("samples"),
            serde_json::json!({ "x": short }).to_string().into(),
        ),
        3 => (
            t("samples"),
            serde_json::json!({ "x": nan }).to_string().into(),
        ),
        4 => (
            t("samples"),
            serde_json::json!({ "x": huge }).to_string().into(),
        ),
        5 => (t("samples"), vec![0xff, 0xfe, 0x00, 0x80, 0x7b]),
        6 => (t("rows"), b"[[1, 2]]".to_vec()),
        7 => (t("labels"), br#"{"id": "x", "label": 99}"#.to_vec()),
        _ => (t("cmd"), br#"{"cmd": "explode"}"#.to_vec()),
    }
}

/// One flooding publisher: its own connection, sending as fast as the connection takes it
/// until `until`; the heavy kinds are paced (one 300 KB message per 50 ms, one 5 MB message
/// per second) so that the broker, which queues without limit here, stays within memory.
/// The last message is a QoS 1 sample: once it is acknowledged, everything this connection
/// sent before it is with the broker. Returns how many QoS 1 messages it sent.
fn flood(
    peer: &MqttPeer,
    seed: u64,
    qos: &[QoS],
    prefix: &str,
    until: Instant,
    sent: &Sent,
) -> u64 {
    let samples = stream(500);
    let mut rng = Rng(seed);
    let mut ids: Vec<String> = Vec::new();
    let mut qos1 = 0;
    let (mut last_oversized, mut last_huge) = (Instant::now(), Instant::now());
    let topic = format!("{prefix}/samples");
    let mut n = 0u64;
    let mut send = |peer: &MqttPeer, topic: &str, payload: Vec<u8>, kind: Kind, n: u64| {
        let q = qos[(n % qos.len() as u64) as usize];
        if q == QoS::AtLeastOnce {
            qos1 += 1;
        }
        peer.publish_qos(topic, q, payload);
        sent.add(kind);
    };
    while Instant::now() < until {
        n += 1;
        let s = &samples[rng.below(samples.len() as u64) as usize];
        let id = format!("f{seed}-{n}");
        let roll = rng.below(20);
        let kind = if last_huge.elapsed() > Duration::from_secs(1) && seed == 1 {
            last_huge = Instant::now();
            Kind::Huge
        } else if last_oversized.elapsed() > Duration::from_millis(50) {
            last_oversized = Instant::now();
            if roll % 2 == 0 {
                Kind::Oversized
            } else {
                Kind::LongId
            }
        } else {
            match roll {
                0..=8 => Kind::ValidUnlabeled,
                9..=11 => Kind::ValidLabeled,
                12 => Kind::Extreme,
                13..=15 if !ids.is_empty() => Kind::Feedback,
                _ => Kind::Garbage,
            }
        };
        match kind {
            Kind::ValidUnlabeled => {
                let mut v: Value = serde_json::from_str(&sample_with_id(s, &id)).unwrap();
                v.as_object_mut().unwrap().remove("label");
                send(peer, &topic, v.to_string().into(), kind, n);
                ids.push(id);
            }
            Kind::ValidLabeled => {
                let mut v: Value = serde_json::from_str(&sample_with_id(s, &id)).unwrap();
                v["label"] = s["truth"].clone();
                send(peer, &topic, v.to_string().into(), kind, n);
                ids.push(id);
            }
            Kind::Extreme => {
                let x = vec![3e38f32; 384];
                let v = serde_json::json!({ "x": x, "id": id });
                send(peer, &topic, v.to_string().into(), kind, n);
            }
            Kind::Feedback => {
                let earlier = &ids[rng.below(ids.len() as u64) as usize];
                let v = serde_json::json!({ "id": earlier, "label": rng.below(6) });
                send(
                    peer,
                    &format!("{prefix}/labels"),
                    v.to_string().into(),
                    kind,
                    n,
                );
            }
            Kind::Garbage => {
                let (t, payload) = garbage(n, prefix);
                send(peer, &t, payload, kind, n);
            }
            Kind::Oversized | Kind::Huge => {
                let pad = if kind == Kind::Huge {
                    5_000_000
                } else {
                    300_000
                };
                let v = serde_json::json!({ "x": s["x"], "id": id, "pad": "p".repeat(pad) });
                send(peer, &topic, v.to_string().into(), kind, n);
            }
            Kind::LongId => {
                let v = serde_json::json!({ "x": s["x"], "id": "i".repeat(200_000) });
                send(peer, &topic, v.to_string().into(), kind, n);
            }
        }
        if ids.len() > 10_000 {
            ids.drain(..5_000);
        }
    }
    let last = sample_with_id(&samples[0], &format!("f{seed}-last"));
    peer.publish_qos(&topic, QoS::AtLeastOnce, last);
    sent.add(Kind::ValidUnlabeled);
    qos1 + 1
}

/// Counters that change while the daemon still works through its input.
const MOVING: &[&str] = &[
    "samples_total",
    "predictions_total",
    "dropped_total",
    "rejected_total",
    "feedback_total",
    "late_labels_total",
    "train_steps",
];

/// The numbers in `m` under `MOVING`, to tell whether anything still changes.
fn moving(m: &Value) -> Vec<Option<f64>> {
    MOVING
        .iter()
        .map(|k| m.get(*k).and_then(Value::as_f64))
        .collect()
}

#[test]
#[ignore = "a minute of flooding; run with: cargo test --test integration -- --ignored hostile"]
fn a_60_second_flood_keeps_memory_under_64_mib_and_accounts_for_every_valid_sample() {
    let dir = tempdir();
    // Unlimited queues: the broker drops nothing, so every sample a publisher got accepted
    // reaches the daemon unless the daemon loses its connection.
    let broker = Broker::start_with(BrokerOptions {
        unlimited_queues: true,
        ..Default::default()
    });
    let prefix = "edgemt-test/flood";
    let metrics = format!("{prefix}/metrics");
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let watcher = MqttPeer::connect(broker.port, "flood-watcher", &[&metrics]);
    watcher.collect_until(Duration::from_secs(15), |m| on(m, &metrics).count() > 0);

    let sent = Arc::new(Sent::default());
    let until = Instant::now() + Duration::from_secs(60);
    // QoS 1, QoS 0, and both alternating.
    let modes: [&[QoS]; 3] = [
        &[QoS::AtLeastOnce],
        &[QoS::AtMostOnce],
        &[QoS::AtMostOnce, QoS::AtLeastOnce],
    ];
    let publishers: Vec<_> = modes
        .into_iter()
        .enumerate()
        .map(|(i, qos)| {
            let sent = sent.clone();
            let port = broker.port;
            std::thread::spawn(move || {
                let peer = MqttPeer::connect_with(
                    port,
                    &format!("flooder{i}"),
                    &[],
                    PeerOptions {
                        max_packet_bytes: Some(8 << 20),
                        ..Default::default()
                    },
                );
                let qos1 = flood(&peer, i as u64 + 1, qos, prefix, until, &sent);
                let deadline = Instant::now() + Duration::from_secs(300);
                while peer.acked() < qos1 {
                    assert!(
                        Instant::now() < deadline,
                        "flooder{i}: {} of {qos1} QoS 1 messages acknowledged",
                        peer.acked()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    // Watch the daemon's metrics meanwhile (the channel would otherwise fill up).
    let mut last: Option<Value> = None;
    while Instant::now() < until {
        let got = watcher.collect_until(Duration::from_secs(1), |_| false);
        last = last_metrics(&got, &metrics).or(last);
    }
    for p in publishers {
        p.join().expect("a publisher failed");
    }
    let flooded = Instant::now();

    // Drained: the counters stay the same for three seconds.
    let mut stable_since = Instant::now();
    let drain_deadline = Instant::now() + Duration::from_secs(180);
    while stable_since.elapsed() < Duration::from_secs(3) && Instant::now() < drain_deadline {
        let got = watcher.collect_until(Duration::from_millis(600), |_| false);
        if let Some(m) = last_metrics(&got, &metrics) {
            if last.as_ref().map(moving) != Some(moving(&m)) {
                stable_since = Instant::now();
            }
            last = Some(m);
        }
    }
    let drained_in = flooded.elapsed();
    let m = last.expect("metrics during the flood");
    let mut failures = Vec::new();
    if stable_since.elapsed() < Duration::from_secs(3) {
        failures.push("the counters were still changing after 180 s".to_string());
    }
    let running = daemon.is_running();
    let vm_hwm = running.then(|| daemon.peak_rss_bytes());

    // A fresh sample after all that is still predicted.
    let pred = format!("{prefix}/predictions");
    let checker = MqttPeer::connect(broker.port, "flood-checker", &[&pred]);
    checker.publish(
        &format!("{prefix}/samples"),
        sample_with_id(&stream(1)[0], "fresh"),
    );
    let got = checker.collect_until(Duration::from_secs(20), |msgs| {
        on(msgs, &pred).any(|p| p.contains("\"fresh\""))
    });
    let fresh = on(&got, &pred).any(|p| p.contains("\"fresh\""));

    let sent_per_kind = sent.0.lock().unwrap().clone();
    let get = |k: &str| m.get(k).and_then(Value::as_f64);
    eprintln!("flood: sent per kind {sent_per_kind:?}");
    eprintln!(
        "flood: valid samples sent {}; drained {drained_in:?} after the flood",
        sent.samples()
    );
    for k in [
        "samples_total",
        "unread_dropped_total",
        "predictions_total",
        "predictions_dropped_total",
        "dropped_total",
        "train_dropped_total",
        "labeled_dropped_total",
        "unembeddable_total",
        "rejected_total",
        "oversized_total",
        "publish_dropped_total",
        "feedback_total",
        "late_labels_total",
        "train_steps",
        "mqtt_reconnects_total",
        "peak_rss_bytes",
    ] {
        eprintln!("flood: {k} = {:?}", get(k));
    }
    eprintln!(
        "flood: VmHWM {:?} MiB, fresh sample predicted: {fresh}",
        vm_hwm.map(|b| b as f64 / (1 << 20) as f64)
    );

    if !running {
        failures.push(format!("the daemon exited:\n{}", daemon.log_text()));
    }
    if let Some(peak) = vm_hwm {
        if peak >= 64 << 20 {
            failures.push(format!(
                "peak RSS (VmHWM) {:.1} MiB is not under 64 MiB",
                peak as f64 / (1 << 20) as f64
            ));
        }
    }
    if let Some(peak) = get("peak_rss_bytes").filter(|p| *p >= (64 << 20) as f64) {
        failures.push(format!(
            "the daemon's own peak_rss_bytes {:.1} MiB is not under 64 MiB",
            peak / (1 << 20) as f64
        ));
    }
    if !fresh {
        failures.push("a fresh sample after the flood was not predicted".into());
    }
    let identity = [
        "samples_total",
        "predictions_total",
        "predictions_dropped_total",
        "dropped_total",
        "unembeddable_total",
    ];
    let missing: Vec<&str> = identity
        .iter()
        .copied()
        .filter(|k| get(k).is_none())
        .collect();
    if !missing.is_empty() {
        failures.push(format!(
            "the metrics lack {missing:?}, needed for samples_total == predictions_total + \
             predictions_dropped_total + dropped_total + unembeddable_total"
        ));
    } else {
        let v: Vec<f64> = identity.iter().map(|k| num(&m, k)).collect();
        if v[0] != v[1] + v[2] + v[3] + v[4] {
            failures.push(format!(
                "samples_total {} != predictions_total {} + predictions_dropped_total {} + \
                 dropped_total {} + unembeddable_total {} (= {})",
                v[0],
                v[1],
                v[2],
                v[3],
                v[4],
                v[1] + v[2] + v[3] + v[4]
            ));
        }
    }
    // The broker queues without limit, so every valid sample that was sent reached the
    // daemon, which either parsed it (samples_total) or, being behind, dropped it unread and
    // counted it (unread_dropped_total, which also holds garbage dropped unread).
    let counted = get("samples_total").unwrap_or(0.0);
    let unread = get("unread_dropped_total").unwrap_or(0.0);
    if counted + unread < sent.samples() as f64 {
        failures.push(format!(
            "{} valid samples were sent (all accepted by the broker) but samples_total {counted} \
             + unread_dropped_total {unread} is less; mqtt_reconnects_total = {:?}",
            sent.samples(),
            get("mqtt_reconnects_total")
        ));
    }
    if get("mqtt_reconnects_total") != Some(0.0) {
        failures.push(format!(
            "the flood cost the connection: mqtt_reconnects_total = {:?}",
            get("mqtt_reconnects_total")
        ));
    }
    let log = daemon.log_text();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    assert!(
        failures.is_empty(),
        "{}\nlast metrics: {m}\ndaemon log (last lines, newest first):\n{}",
        failures.join("\n"),
        tail.join("\n")
    );
    assert!(daemon.terminate().0.success());
}

/// Numbered samples `r0, r1, ..` published one `mosquitto_pub -q 1` each, at about 70 a
/// second, until `stop`; the ids of those whose `mosquitto_pub` exited 0 (the broker sent
/// PUBACK) go to `accepted`.
fn publish_numbered(
    port: u16,
    topic: String,
    next: Arc<AtomicU64>,
    accepted: Arc<Mutex<Vec<u64>>>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let samples = stream(usize::MAX);
    while !stop.load(Relaxed) {
        let started = Instant::now();
        let n = next.fetch_add(1, Relaxed);
        let payload = sample_with_id(&samples[n as usize % samples.len()], &format!("r{n}"));
        // `timeout`: a publish caught by a broker going down must not hang the run.
        let ok = Command::new("timeout")
            .args(["10", "mosquitto_pub", "-h", "127.0.0.1", "-q", "1"])
            .args(["-p", &port.to_string(), "-t", &topic, "-m", &payload])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mosquitto_pub runs")
            .success();
        if ok {
            accepted.lock().unwrap().push(n);
        } else {
            failed.fetch_add(1, Relaxed);
        }
        std::thread::sleep(Duration::from_millis(14).saturating_sub(started.elapsed()));
    }
}

/// The numeric part of a prediction's id `r<n>`.
fn predicted_number(payload: &str) -> Option<u64> {
    let v: Value = serde_json::from_str(payload).ok()?;
    v["id"].as_str()?.strip_prefix('r')?.parse().ok()
}

#[test]
#[ignore = "twenty broker restarts take a minute; run with: cargo test --test integration -- --ignored hostile"]
fn twenty_broker_restarts_with_qos1_lose_no_sample_the_broker_accepted() {
    let dir = tempdir();
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        unlimited_queues: true,
        ..Default::default()
    });
    let prefix = "edgemt-test/restarts";
    let pred = format!("{prefix}/predictions");
    let status = format!("{prefix}/status");
    let cfg = daemon_config_mqtt(dir.path(), &broker, prefix, "qos = 1\n", "");
    let mut daemon = Daemon::start(&cfg, &[]);
    // A dashboard that keeps its session across restarts: the broker saves its subscription
    // and the predictions queued for it.
    let dashboard = MqttPeer::connect_with(
        broker.port,
        "restart-dashboard",
        &[&pred, &status],
        PeerOptions {
            persistent: true,
            ..Default::default()
        },
    );
    let got = dashboard.collect_until(Duration::from_secs(15), |m| {
        on(m, &status).any(|s| s == "online")
    });
    assert!(
        on(&got, &status).any(|s| s == "online"),
        "the daemon came online:\n{}",
        daemon.log_text()
    );

    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (next, accepted, failed, stop) =
            (next.clone(), accepted.clone(), failed.clone(), stop.clone());
        let (port, topic) = (broker.port, format!("{prefix}/samples"));
        std::thread::spawn(move || publish_numbered(port, topic, next, accepted, failed, stop))
    };

    let mut predicted: HashSet<u64> = HashSet::new();
    let mut predictions = 0u64;
    let mut take = |msgs: Vec<(String, Vec<u8>)>, predicted: &mut HashSet<u64>| {
        for p in on(&msgs, &pred) {
            if let Some(n) = predicted_number(&p) {
                predicted.insert(n);
                predictions += 1;
            }
        }
    };
    // Each restart comes once a sample published after the previous one has been predicted
    // (the whole path works again), then a second or two later.
    let mut restarted_at: Vec<u64> = Vec::new();
    let mut failures = Vec::new();
    for round in 0..20 {
        let mark = next.load(Relaxed);
        let got = dashboard.collect_until(Duration::from_secs(30), |m| {
            on(m, &pred).any(|p| predicted_number(&p).is_some_and(|n| n >= mark))
        });
        let recovered = on(&got, &pred).any(|p| predicted_number(&p).is_some_and(|n| n >= mark));
        take(got, &mut predicted);
        if !recovered {
            failures.push(format!(
                "round {round}: no sample published after the last restart was predicted \
                 within 30 s"
            ));
            break;
        }
        let pause = Duration::from_millis(1000 + 300 * (round % 4));
        take(dashboard.collect_until(pause, |_| false), &mut predicted);
        restarted_at.push(next.load(Relaxed));
        broker.stop_gracefully();
        std::thread::sleep(Duration::from_millis(300));
        broker.restart();
    }
    // Some more traffic after the last restart, then stop publishing.
    take(
        dashboard.collect_until(Duration::from_secs(2), |_| false),
        &mut predicted,
    );
    stop.store(true, Relaxed);
    publisher.join().unwrap();
    let accepted: Vec<u64> = accepted.lock().unwrap().clone();
    let missing = |predicted: &HashSet<u64>| -> Vec<u64> {
        accepted
            .iter()
            .copied()
            .filter(|n| !predicted.contains(n))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing(&predicted).is_empty() && Instant::now() < deadline {
        take(
            dashboard.collect_until(Duration::from_millis(500), |_| false),
            &mut predicted,
        );
    }
    let missing = missing(&predicted);
    eprintln!(
        "restarts: {} restarts; {} samples published, {} accepted by the broker, {} refused \
         (broker down); {} predictions received for {} distinct ids ({} duplicates); {} \
         accepted ids never predicted",
        restarted_at.len(),
        next.load(Relaxed),
        accepted.len(),
        failed.load(Relaxed),
        predictions,
        predicted.len(),
        predictions - predicted.len() as u64,
        missing.len()
    );
    // Where the losses fall: the last restart at or before each missing id (ids were numbered
    // in publishing order, `restarted_at` holds the next id at each restart).
    let mut by_restart: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    for n in &missing {
        let k = restarted_at.iter().filter(|r| **r <= *n).count();
        by_restart.entry(k).or_default().push(*n);
    }
    for (k, ids) in &by_restart {
        eprintln!(
            "restarts: {} missing after restart {k} (next id then {:?}): {:?}",
            ids.len(),
            k.checked_sub(1).map(|i| restarted_at[i]),
            &ids[..ids.len().min(20)]
        );
    }
    if !missing.is_empty() {
        failures.push(format!(
            "{} of {} accepted samples were never predicted, first ones: {:?}",
            missing.len(),
            accepted.len(),
            &missing[..missing.len().min(50)]
        ));
    }
    if !daemon.is_running() {
        failures.push("the daemon exited".into());
    }
    assert!(
        failures.is_empty(),
        "{}\ndaemon log:\n{}",
        failures.join("\n"),
        daemon.log_text()
    );
    assert!(daemon.terminate().0.success());
}
