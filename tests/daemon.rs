//! `edgemt run` end to end against a real mosquitto broker: the tests act as a sensor and a
//! dashboard would.

use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde_json::Value;

use crate::util::broker::{
    daemon_config, last_metrics, mosquitto_pub, mosquitto_sub_one, num, on, wait_for_log, Broker,
    Daemon, MqttPeer,
};
use crate::util::{self, stream, tempdir};

const METRIC_KEYS: &[&str] = &[
    "samples_total",
    "samples_per_s",
    "latency_p50_us",
    "latency_p99_us",
    "loss_sup",
    "loss_pseudo",
    "loss_consistency",
    "pseudo_acceptance",
    "teacher_version",
    "ema_updates",
    "train_steps",
    "labeled_buffer",
    "unlabeled_buffer",
    "dropped_total",
    "rejected_total",
    "feedback_accuracy",
    "serving_adapted",
    "gate_wins",
    "gate_losses",
    "gate_p",
    "mounting_adopted",
    "rss_bytes",
    "uptime_s",
];

#[test]
fn daemon_predicts_every_sample_and_row_window_publishes_metrics_and_goes_offline_on_sigterm() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/e2e";
    let cfg = daemon_config(dir.path(), &broker, prefix, "");

    // systemd's side of Type=notify: a datagram socket the daemon reports to.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut daemon = Daemon::start(
        &cfg,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut buf = [0u8; 256];
    let mut notes = Vec::new();
    while !notes.iter().any(|n: &String| n.contains("READY=1"))
        || !notes.iter().any(|n| n.contains("WATCHDOG=1"))
    {
        let n = notify.recv(&mut buf).expect("sd_notify messages arrive");
        notes.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }

    let dashboard = MqttPeer::connect(
        broker.port,
        "dashboard",
        &[
            &format!("{prefix}/predictions"),
            &format!("{prefix}/metrics"),
            &format!("{prefix}/status"),
            "homeassistant/#",
        ],
    );
    let sensor = MqttPeer::connect(broker.port, "sensor", &[]);

    // The whole shipped recording as samples (every 20th carries a label).
    let samples = stream(usize::MAX);
    let n = samples.len();
    for (i, s) in samples.iter().enumerate() {
        let mut s = s.clone();
        s["id"] = Value::from(format!("s{i}"));
        s.as_object_mut().unwrap().remove("truth");
        sensor.publish(&format!("{prefix}/samples"), s.to_string());
    }
    // Raw rows: three windows' worth (192 rows of 6 channels) in messages of 16 rows. With
    // window 64 and hop 32 that makes windows at rows 64, 96, 128, 160 and 192.
    let rows = util::rows_of(&samples[..3]);
    for chunk in rows.chunks(16) {
        sensor.publish(
            &format!("{prefix}/rows"),
            serde_json::to_string(chunk).unwrap(),
        );
    }
    let pred_topic = format!("{prefix}/predictions");
    let metrics_topic = format!("{prefix}/metrics");
    let got = dashboard.collect_until(Duration::from_secs(60), |m| {
        on(m, &pred_topic).count() >= n + 5
    });
    // Feedback after the predictions, as an operator confirming them would; one for an id
    // that was never seen counts as late.
    for (i, s) in samples.iter().enumerate().take(10) {
        mosquitto_pub(
            broker.port,
            &format!("{prefix}/labels"),
            &format!("{{\"id\": \"s{i}\", \"label\": {}}}", s["truth"]),
        );
    }
    mosquitto_pub(
        broker.port,
        &format!("{prefix}/labels"),
        r#"{"id": "never-seen", "label": 1}"#,
    );
    let later = dashboard.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics_topic).is_some_and(|v| {
            num(&v, "feedback_total") >= 10.0
                && num(&v, "late_labels_total") >= 1.0
                && num(&v, "train_steps") > 0.0
        })
    });
    let all: Vec<_> = got.iter().chain(later.iter()).cloned().collect();

    let predictions: Vec<Value> = on(&all, &pred_topic)
        .map(|p| serde_json::from_str(&p).unwrap())
        .collect();
    let ids: HashSet<String> = predictions
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    for i in 0..n {
        assert!(ids.contains(&format!("s{i}")), "no prediction for s{i}");
    }
    assert_eq!(
        predictions.len(),
        n + 5,
        "every sample + 5 windows assembled from rows"
    );
    for p in &predictions {
        assert!(p["class"].as_u64().unwrap() < 6);
        assert!(!p["name"].as_str().unwrap().is_empty());
        let c = p["confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c));
        assert!(p["teacher_version"].is_u64());
        assert!(
            p["serving"] == "adapted" || p["serving"] == "pretrained",
            "which model answered: {p}"
        );
    }

    let m = last_metrics(&all, &metrics_topic).expect("metrics arrive");
    for key in METRIC_KEYS {
        assert!(m.get(key).is_some(), "metrics lack {key}: {m}");
    }
    assert!(
        m.as_object()
            .unwrap()
            .values()
            .all(|v| v.is_number() || v.is_null()),
        "metrics are flat numbers (null when an interval had no data): {m}"
    );
    // While samples flowed, an interval measured latency; the last one, idle, says null
    // rather than a 0 that would look measured.
    let busy = on(&all, &metrics_topic)
        .map(|t| serde_json::from_str::<Value>(&t).unwrap())
        .find(|v| v["latency_p50_us"].is_number())
        .expect("an interval with predictions reports their latency");
    assert!(num(&busy, "latency_p99_us") >= num(&busy, "latency_p50_us"));
    assert!(m["latency_p50_us"].is_null(), "idle interval: {m}");
    assert_eq!(num(&m, "samples_total"), (n + 5) as f64);
    assert_eq!(num(&m, "dropped_total"), 0.0);
    assert_eq!(num(&m, "feedback_total"), 10.0);
    assert_eq!(num(&m, "late_labels_total"), 1.0);
    assert!(num(&m, "train_steps") > 0.0 && num(&m, "teacher_version") > 0.0);
    // Feedback is scored against the prediction that was published for its id.
    let served = |id: &str| {
        predictions
            .iter()
            .find(|p| p["id"] == id)
            .map(|p| p["class"].as_u64().unwrap())
            .unwrap()
    };
    let correct = (0..10)
        .filter(|&i| Some(served(&format!("s{i}"))) == samples[i]["truth"].as_u64())
        .count();
    assert_eq!(num(&m, "feedback_accuracy"), correct as f64 / 10.0);
    assert_eq!(num(&m, "teacher_finite"), 1.0);

    let discovery: Vec<&(String, Vec<u8>)> = all
        .iter()
        .filter(|(t, p)| t.starts_with("homeassistant/sensor/") && !p.is_empty())
        .collect();
    // (tests/home_assistant.rs checks every config against HA's schema.)
    assert!(
        !discovery.is_empty(),
        "discovery configs for the main metrics"
    );
    for (_, payload) in &discovery {
        let d: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(d["availability_topic"], format!("{prefix}/status"));
    }
    assert!(discovery.iter().any(|(_, p)| {
        serde_json::from_slice::<Value>(p).unwrap()["state_topic"] == metrics_topic
    }));

    assert_eq!(
        mosquitto_sub_one(broker.port, &format!("{prefix}/status")),
        "online",
        "retained online"
    );
    let (status, took) = daemon.terminate();
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        daemon.log_text()
    );
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    assert_eq!(
        mosquitto_sub_one(broker.port, &format!("{prefix}/status")),
        "offline",
        "retained offline"
    );
    let mut rest = Vec::new();
    while let Ok(n) = notify.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if rest.last().unwrap().contains("STOPPING=1") {
            break;
        }
    }
    assert!(rest.iter().any(|n| n.contains("STOPPING=1")), "{rest:?}");
}

#[test]
fn daemon_recovers_by_itself_when_the_broker_restarts_mid_stream() {
    let dir = tempdir();
    let mut broker = Broker::start();
    let prefix = "edgemt-test/outage";
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let status_topic = format!("{prefix}/status");
    let peer = MqttPeer::connect(
        broker.port,
        "peer1",
        &[&format!("{prefix}/predictions"), &status_topic],
    );
    peer.collect_until(Duration::from_secs(10), |m| {
        on(m, &status_topic).any(|s| s == "online")
    });
    let samples = stream(40);
    let send = |peer: &MqttPeer, range: std::ops::Range<usize>| {
        for i in range {
            let mut s = samples[i].clone();
            s["id"] = Value::from(format!("o{i}"));
            peer.publish(&format!("{prefix}/samples"), s.to_string());
        }
    };
    send(&peer, 0..20);
    let pred = format!("{prefix}/predictions");
    let before = peer.collect_until(Duration::from_secs(15), |m| on(m, &pred).count() >= 20);
    assert_eq!(on(&before, &pred).count(), 20);
    drop(peer);

    broker.stop();
    // The outage is timed from when the daemon noticed it, not from fixed offsets.
    assert!(
        wait_for_log(
            &daemon,
            |log| log.contains("WARN edgemt::daemon::mqtt"),
            Duration::from_secs(30)
        ),
        "the daemon says it lost the broker:\n{}",
        daemon.log_text()
    );
    let noticed = std::time::Instant::now();
    while noticed.elapsed() < Duration::from_secs(1) {
        assert!(daemon.is_running(), "the daemon survives losing the broker");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.is_running(), "the daemon survives losing the broker");
    broker.restart();

    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "peer2", &[&pred, &metrics, &status_topic]);
    let back = peer.collect_until(Duration::from_secs(20), |m| {
        last_metrics(m, &metrics).is_some_and(|v| {
            num(&v, "mqtt_connected") == 1.0 && num(&v, "mqtt_reconnects_total") >= 1.0
        })
    });
    let m = last_metrics(&back, &metrics).expect("metrics after the outage");
    assert!(num(&m, "mqtt_reconnects_total") >= 1.0, "{m}");
    assert!(
        num(&m, "mqtt_disconnected_s_total") >= 1.0,
        "the outage (at least the second after the daemon noticed it) shows: {m}"
    );
    assert_eq!(
        mosquitto_sub_one(broker.port, &status_topic),
        "online",
        "status renewed after reconnect"
    );
    // The restarted broker kept nothing (no persistence): discovery was announced again.
    let config: Value = serde_json::from_str(&mosquitto_sub_one(
        broker.port,
        "homeassistant/sensor/edgemt_edgemt_test_outage/latency_p50_us/config",
    ))
    .expect("discovery re-announced after the reconnect");
    assert_eq!(config["availability_topic"], status_topic);

    send(&peer, 20..40);
    let after = peer.collect_until(Duration::from_secs(15), |m| on(m, &pred).count() >= 20);
    let ids: HashSet<String> = on(&after, &pred)
        .map(|p| {
            serde_json::from_str::<Value>(&p).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for i in 20..40 {
        assert!(
            ids.contains(&format!("o{i}")),
            "no prediction for o{i} after the outage"
        );
    }
    let (status, _) = daemon.terminate();
    assert!(status.success());
}

#[test]
fn garbage_of_every_kind_is_counted_and_never_reaches_the_weights() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/garbage";
    let mut daemon = Daemon::start(
        &daemon_config(dir.path(), &broker, prefix, "[learn]\ntrain_every = 1\n"),
        &[],
    );
    let metrics = format!("{prefix}/metrics");
    let pred = format!("{prefix}/predictions");
    let peer = MqttPeer::connect(broker.port, "fuzzer", &[&metrics, &pred]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);

    let valid: Vec<f32> = vec![0.1; 384];
    let huge: Vec<f64> = vec![1e39; 384];
    let t = |s: &str| format!("{prefix}/{s}");
    let garbage: Vec<(String, Vec<u8>)> = vec![
        (t("samples"), b"not json".to_vec()),
        (t("samples"), br#"{"x": [1, 2, 3]}"#.to_vec()),
        (
            t("samples"),
            serde_json::json!({ "x": huge }).to_string().into_bytes(),
        ),
        (
            t("samples"),
            serde_json::json!({ "x": valid, "label": 7 })
                .to_string()
                .into_bytes(),
        ),
        (
            t("samples"),
            serde_json::json!({ "y": 1 }).to_string().into_bytes(),
        ),
        (t("samples"), vec![0xff, 0xfe, 0x00, 0x80]),
        (t("samples"), vec![b' '; 300_000]),
        (t("rows"), b"[[1, 2]]".to_vec()),
        (t("rows"), b"[[1, 2, 3, 4, 5, \"six\"]]".to_vec()),
        (t("labels"), br#"{"id": 5}"#.to_vec()),
        (t("labels"), br#"{"id": "x", "label": 99}"#.to_vec()),
        (t("labels"), b"zzz".to_vec()),
        (t("cmd"), br#"{"cmd": "explode"}"#.to_vec()),
        (t("cmd"), b"x".to_vec()),
    ];
    for (topic, payload) in &garbage {
        peer.publish(topic, payload.clone());
    }
    // Then a stretch of valid data, with labels, so training runs after the garbage.
    for (i, s) in stream(40).iter().enumerate() {
        let mut s = s.clone();
        s["id"] = Value::from(format!("g{i}"));
        peer.publish(&t("samples"), s.to_string());
    }
    let got = peer.collect_until(Duration::from_secs(20), |m| {
        last_metrics(m, &metrics)
            .is_some_and(|v| num(&v, "samples_total") >= 40.0 && num(&v, "train_steps") >= 30.0)
    });
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(
        num(&m, "rejected_total"),
        garbage.len() as f64,
        "every bad message counted once: {m}"
    );
    assert_eq!(
        num(&m, "samples_total"),
        40.0,
        "nothing malformed became a sample"
    );
    assert_eq!(num(&m, "teacher_finite"), 1.0);
    assert_eq!(num(&m, "skipped_nonfinite"), 0.0);
    assert!(on(&got, &pred).count() >= 40);
    assert!(daemon.is_running());
    let log = daemon.log_text();
    let logged = log.matches("rejected a message").count();
    assert!(
        (1..=5).contains(&logged),
        "rejections are logged at a limited rate ({logged} lines):\n{log}"
    );
    let (status, _) = daemon.terminate();
    assert!(status.success());
}

#[test]
fn raw_f32_samples_are_checked_for_length_and_finiteness() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/f32";
    let mut daemon = Daemon::start(
        &daemon_config(dir.path(), &broker, prefix, "[input]\nformat = \"f32le\"\n"),
        &[],
    );
    let metrics = format!("{prefix}/metrics");
    let pred = format!("{prefix}/predictions");
    let peer = MqttPeer::connect(broker.port, "f32", &[&metrics, &pred]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let mut nan = vec![0.2f32; 384];
    nan[100] = f32::NAN;
    peer.publish(&format!("{prefix}/samples"), bytes(&nan));
    peer.publish(&format!("{prefix}/samples"), bytes(&[0.2; 383]));
    peer.publish(&format!("{prefix}/samples"), vec![1u8, 2, 3]);
    peer.publish(&format!("{prefix}/samples"), bytes(&[0.2; 384]));
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        on(m, &pred).count() >= 1
            && last_metrics(m, &metrics).is_some_and(|v| num(&v, "rejected_total") >= 3.0)
    });
    assert_eq!(on(&got, &pred).count(), 1);
    assert_eq!(
        num(&last_metrics(&got, &metrics).unwrap(), "rejected_total"),
        3.0
    );
    assert!(daemon.terminate().0.success());
}

#[test]
fn commands_pause_and_resume_training_and_reset_the_teacher() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/cmd";
    let state = dir.path().join("state");
    let mut daemon = Daemon::start(
        &daemon_config(
            dir.path(),
            &broker,
            prefix,
            "[learn]\ntrain_every = 1\n[control]\nallow = [\"pause\", \"resume\", \"reset\", \"checkpoint\"]\n",
        ),
        &[("STATE_DIRECTORY", state.to_str().unwrap())],
    );
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "operator", &[&metrics]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    let c = util::shipped_classifier();
    let pretrained = c.pretrained();
    // The newest checkpoint once `checkpoints_total` reaches `n` (none is periodic here:
    // fewer than every_steps steps, well under every_s).
    let checkpoint = |n: f64| {
        let got = peer.collect_until(Duration::from_secs(10), |m| {
            last_metrics(m, &metrics).is_some_and(|v| num(&v, "checkpoints_total") >= n)
        });
        assert_eq!(
            num(&last_metrics(&got, &metrics).unwrap(), "checkpoints_total"),
            n
        );
        util::checkpoint_store(&state, &c, 3)
            .latest_valid()
            .expect("a valid checkpoint")
    };
    let samples = stream(80);
    let send = |r: std::ops::Range<usize>| {
        for s in &samples[r] {
            peer.publish(&format!("{prefix}/samples"), s.to_string());
        }
    };
    peer.publish(&format!("{prefix}/cmd"), r#"{"cmd": "pause"}"#);
    send(0..20);
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| {
            num(&v, "samples_total") >= 20.0 && num(&v, "unlabeled_buffer") >= 19.0
        })
    });
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(num(&m, "paused"), 1.0);
    assert_eq!(
        num(&m, "train_steps"),
        0.0,
        "paused: samples are buffered, not trained on"
    );

    peer.publish(&format!("{prefix}/cmd"), r#"{"cmd": "resume"}"#);
    send(20..40);
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "train_steps") > 0.0)
    });
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(num(&m, "paused"), 0.0);
    let version = num(&m, "teacher_version");
    assert!(version > 0.0);

    // Paused again, so nothing trains between the commands and their checkpoints.
    peer.publish(&format!("{prefix}/cmd"), "pause");
    peer.publish(&format!("{prefix}/cmd"), "checkpoint");
    let (_, learned) = checkpoint(1.0);
    assert!(
        learned.teacher.distance(pretrained.params()) > 0.0,
        "the checkpoint command saved the learned teacher"
    );

    peer.publish(&format!("{prefix}/cmd"), r#"{"cmd": "reset"}"#);
    send(40..41);
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "resets_total") >= 1.0)
    });
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(num(&m, "resets_total"), 1.0, "{m}");
    assert!(
        num(&m, "teacher_version") > version,
        "a reset teacher gets a new version"
    );
    assert_eq!(num(&m, "commands_total"), 5.0);
    // The reset is saved at once, and its weights are the pretrained model's again.
    let (_, reset) = checkpoint(2.0);
    assert_eq!(
        &reset.teacher,
        pretrained.params(),
        "reset returns the teacher"
    );
    assert_eq!(&reset.student, pretrained.params(), "and the student");

    // Training resumes; SIGTERM saves the state it reached.
    peer.publish(&format!("{prefix}/cmd"), "resume");
    send(41..80);
    peer.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics)
            .is_some_and(|v| num(&v, "train_steps") > 0.0 && num(&v, "samples_total") >= 80.0)
    });
    assert!(daemon.terminate().0.success());
    let store = util::checkpoint_store(&state, &c, 3);
    let (last, at_stop) = store.latest_valid().unwrap();
    assert_eq!(store.manifests().len(), 3, "checkpoint, reset, shutdown");
    assert!(last.counters.train_steps > 0);
    assert!(
        at_stop.teacher.distance(pretrained.params()) > 0.0,
        "the shutdown save holds what was learned after the reset"
    );
}

#[test]
fn daemon_checkpoints_to_its_state_directory_exports_on_command_and_resumes_after_restart() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/state";
    let state = dir.path().join("state");
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 20\nmin_interval_s = 0\n",
    );
    let env = [("STATE_DIRECTORY", state.to_str().unwrap())];
    let mut daemon = Daemon::start(&cfg, &env);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "state", &[&metrics]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    for s in stream(120) {
        peer.publish(&format!("{prefix}/samples"), s.to_string());
    }
    let got = peer.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics)
            .is_some_and(|v| num(&v, "train_steps") >= 100.0 && num(&v, "checkpoints_total") >= 1.0)
    });
    assert!(num(&last_metrics(&got, &metrics).unwrap(), "checkpoints_total") >= 1.0);
    peer.publish(&format!("{prefix}/cmd"), r#"{"cmd": "export"}"#);
    peer.publish(&format!("{prefix}/cmd"), r#"{"cmd": "checkpoint"}"#);
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "exports_total") >= 1.0)
    });
    assert_eq!(
        num(&last_metrics(&got, &metrics).unwrap(), "exports_total"),
        1.0
    );
    let adapted = state.join("adapted.onnx");
    edgemt::model::Classifier::load(&adapted, &edgemt::model::HeadSelection::default())
        .expect("the export loads");
    assert!(daemon.terminate().0.success());

    // The final checkpoint holds the last teacher; a new daemon resumes from it.
    let c = util::shipped_classifier();
    let store = util::checkpoint_store(&state, &c, 3);
    let (last, _) = store
        .latest_valid()
        .expect("a valid checkpoint after shutdown");
    assert!(last.counters.train_steps >= 100);
    // Drain what the first daemon said last (its final metrics), then hear the new one.
    peer.collect_until(Duration::from_millis(500), |_| false);
    let mut daemon = Daemon::start(&cfg, &env);
    let got = peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() >= 1);
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(
        num(&m, "teacher_version"),
        last.counters.teacher_version as f64,
        "resumed, not restarted"
    );
    assert!(daemon.log_text().contains("restored checkpoint"));
    assert!(daemon.terminate().0.success());
}

/// The Last Will, not a clean stop: a daemon killed with SIGKILL cannot say `offline`
/// itself, so the broker must.
#[test]
fn a_killed_daemon_is_marked_offline_by_its_last_will_and_sigint_stops_one_cleanly() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/will";
    let status = format!("{prefix}/status");
    let peer = MqttPeer::connect(broker.port, "watcher", &[&status]);
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    let mut daemon = Daemon::start(&cfg, &[]);
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        on(m, &status).any(|s| s == "online")
    });
    assert!(on(&got, &status).any(|s| s == "online"));
    daemon.kill();
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        on(m, &status).any(|s| s == "offline")
    });
    assert_eq!(on(&got, &status).last().as_deref(), Some("offline"));
    assert_eq!(
        mosquitto_sub_one(broker.port, &status),
        "offline",
        "retained"
    );

    // Ctrl-C is a clean stop too: final metrics, `offline`, exit 0. It is sent the moment
    // `online` is seen, which used to be before the handlers were installed (issue 17).
    let mut daemon = Daemon::start(&cfg, &[]);
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        on(m, &status).any(|s| s == "online")
    });
    assert!(
        on(&got, &status).any(|s| s == "online"),
        "{}",
        daemon.log_text()
    );
    let (exit, took) = daemon.interrupt();
    assert!(exit.success(), "{exit}:\n{}", daemon.log_text());
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    assert!(daemon.log_text().contains("stopped"));
    assert_eq!(mosquitto_sub_one(broker.port, &status), "offline");
}

/// What replay measures is what the device answers: the same recording (ids, then labels
/// for every 4th sample after all of them) through `edgemt replay` and through a running
/// daemon. On the control stream the gate never switches, so both answer with the
/// pretrained model whatever the timing, and every class and the accuracy on labels must
/// agree exactly.
#[test]
fn replay_and_the_daemon_publish_the_same_classes_and_agree_on_accuracy_on_labels() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/agree";
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    let lines = util::recording_lines("data/control_stream.jsonl");
    let samples: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| serde_json::json!({"id": format!("c{i}"), "x": l["x"]}))
        .collect();
    let labels: Vec<Value> = lines
        .iter()
        .enumerate()
        .step_by(4)
        .map(|(i, l)| serde_json::json!({"id": format!("c{i}"), "label": l["truth"]}))
        .collect();

    // Replay: the samples, then the labels as feedback lines.
    let recording = dir.path().join("agree.jsonl");
    let text: Vec<String> = samples
        .iter()
        .chain(&labels)
        .map(Value::to_string)
        .collect();
    std::fs::write(&recording, text.join("\n")).unwrap();
    let (report, written) = (dir.path().join("r.json"), dir.path().join("p.jsonl"));
    util::run_ok(
        util::edgemt()
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg(&recording)
            .arg("--report")
            .arg(&report)
            .arg("--predictions")
            .arg(&written),
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["gate"]["switches"].as_array().unwrap().len(), 0);
    assert_eq!(r["feedback"].as_u64(), Some(labels.len() as u64));
    let replayed: Vec<(String, u64)> = util::jsonl(&written)
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().into(),
                p["class"].as_u64().unwrap(),
            )
        })
        .collect();

    // The daemon: the same samples on the samples topic, the labels on the labels topic.
    let mut daemon = Daemon::start(&cfg, &[]);
    let (pred_topic, metrics_topic) =
        (format!("{prefix}/predictions"), format!("{prefix}/metrics"));
    let dashboard = MqttPeer::connect(broker.port, "dashboard", &[&pred_topic, &metrics_topic]);
    assert!(
        wait_for_log(
            &daemon,
            |l| l.contains("connected"),
            Duration::from_secs(20)
        ),
        "{}",
        daemon.log_text()
    );
    let sensor = MqttPeer::connect(broker.port, "sensor", &[]);
    for s in &samples {
        sensor.publish(&format!("{prefix}/samples"), s.to_string());
    }
    let got = dashboard.collect_until(Duration::from_secs(60), |m| {
        on(m, &pred_topic).count() >= samples.len()
    });
    for l in &labels {
        sensor.publish(&format!("{prefix}/labels"), l.to_string());
    }
    let later = dashboard.collect_until(Duration::from_secs(30), |m| {
        last_metrics(m, &metrics_topic)
            .is_some_and(|v| num(&v, "feedback_total") >= labels.len() as f64)
    });
    let metrics = last_metrics(&later, &metrics_topic).expect("metrics arrive");
    assert!(daemon.is_running());

    let published: std::collections::HashMap<String, (u64, String)> = on(&got, &pred_topic)
        .map(|p| {
            let v: Value = serde_json::from_str(&p).unwrap();
            let serving = v["serving"].as_str().unwrap().to_string();
            (
                v["id"].as_str().unwrap().into(),
                (v["class"].as_u64().unwrap(), serving),
            )
        })
        .collect();
    assert_eq!(
        published.len(),
        replayed.len(),
        "every sample answered once"
    );
    for (id, class) in &replayed {
        let (daemon_class, serving) = &published[id];
        assert_eq!(serving, "pretrained", "{id}");
        assert_eq!(daemon_class, class, "sample {id}: daemon vs replay");
    }
    assert_eq!(num(&metrics, "feedback_total"), labels.len() as f64);
    let (daemon_accuracy, replay_accuracy) = (
        num(&metrics, "feedback_accuracy"),
        r["feedback_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (daemon_accuracy - replay_accuracy).abs() < 1e-12,
        "accuracy on labels: daemon {daemon_accuracy} vs replay {replay_accuracy}"
    );
    assert!(replay_accuracy > 0.5, "{replay_accuracy}: a real score");
}
