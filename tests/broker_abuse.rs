//! `edgemt run` against a broker it shares with hostile or careless clients: poisoned
//! samples, retained commands, oversized retained messages, huge ids, label floods, a
//! daemon that is away while QoS 1 samples arrive, labels hot on the heels of their sample,
//! and a client queue too small for the prediction rate. One test per way it used to fail.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::util::broker::{
    daemon_config, daemon_config_mqtt, last_metrics, num, on, predicted_ids, Broker, Daemon,
    MqttPeer,
};
use crate::util::tempdir;
use crate::util::{sample_with_id, stream};

/// Receives until the newest metrics message satisfies `done`; returns it.
fn metrics_when(
    peer: &MqttPeer,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let got = peer.collect_until(timeout, |m| {
        last_metrics(m, topic).is_some_and(|v| done(&v))
    });
    let m = last_metrics(&got, topic).expect("metrics arrive");
    assert!(done(&m), "condition not reached within {timeout:?}: {m}");
    m
}

fn poison(label: Option<usize>) -> String {
    let mut v = serde_json::json!({ "x": vec![3e38_f64; 384] });
    if let Some(k) = label {
        v["label"] = Value::from(k);
    }
    v.to_string()
}

/// Failure 1: `{"x": [3e38, ...]}` fits in f32, yet the backbone turns it into infinities.
#[test]
fn a_sample_that_drives_the_backbone_to_infinity_is_counted_and_never_reaches_a_checkpoint() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/poison";
    let state = dir.path().join("state");
    // max_abs raised to f32's range, so the poison passes the input check and only the
    // embedding check stands between it and the learner.
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 10\nmin_interval_s = 0\n[input]\nmax_abs = 3.4e38\n",
    );
    let env = [("STATE_DIRECTORY", state.to_str().unwrap())];
    let mut daemon = Daemon::start(&cfg, &env);
    let metrics = format!("{prefix}/metrics");
    let samples_topic = format!("{prefix}/samples");
    let peer = MqttPeer::connect(broker.port, "poisoner", &[&metrics]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    let clean = stream(80);
    for (i, s) in clean.iter().enumerate() {
        if i % 10 == 0 {
            peer.publish(&samples_topic, poison(Some(i % 6)));
            peer.publish(&samples_topic, poison(None));
        }
        peer.publish(&samples_topic, sample_with_id(s, &format!("c{i}")));
    }
    let m = metrics_when(&peer, &metrics, Duration::from_secs(20), |v| {
        num(v, "samples_total") >= 96.0 && num(v, "checkpoints_total") >= 2.0
    });
    assert_eq!(num(&m, "unembeddable_total"), 16.0, "{m}");
    assert_eq!(num(&m, "predictions_total"), 80.0, "{m}");
    assert_eq!(num(&m, "teacher_finite"), 1.0, "{m}");
    assert_eq!(num(&m, "skipped_nonfinite"), 0.0, "{m}");
    assert_eq!(num(&m, "checkpoint_failures_total"), 0.0, "{m}");
    assert!(daemon.terminate().0.success());

    // A restart restores the learned state instead of refusing a poisoned checkpoint; a
    // tensor file orphaned by a kill between tensors and manifest is pruned on the way.
    let orphan = state.join("ckpt-0099999999.safetensors");
    std::fs::write(&orphan, b"left by a kill -9").unwrap();
    peer.collect_until(Duration::from_millis(300), |_| false);
    let mut daemon = Daemon::start(&cfg, &env);
    let m = metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    let log = daemon.log_text();
    assert!(log.contains("restored checkpoint"), "{log}");
    assert!(!log.contains("non-finite"), "{log}");
    assert!(
        num(&m, "teacher_version") > 0.0,
        "resumed, not restarted: {m}"
    );
    assert!(
        !orphan.exists(),
        "the orphan tensor file is pruned on start"
    );
    assert!(daemon.terminate().0.success());
}

/// With the default `[input] max_abs` the same poison is refused at the door, by name.
#[test]
fn inputs_beyond_max_abs_are_rejected_with_the_reason() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/maxabs";
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "big", &[&metrics]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    peer.publish(&format!("{prefix}/samples"), poison(None));
    peer.publish(&format!("{prefix}/rows"), "[[1e30, 0, 0, 0, 0, 0]]");
    let m = metrics_when(&peer, &metrics, Duration::from_secs(10), |v| {
        num(v, "rejected_total") >= 2.0
    });
    assert_eq!(num(&m, "samples_total"), 0.0, "{m}");
    assert!(
        daemon.log_text().contains("max_abs"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().0.success());
}

/// Failure 2: a retained `reset` reset the model at every start; `reset` is now opt-in and
/// retained messages on input topics are ignored.
#[test]
fn retained_commands_and_labels_are_ignored_and_reset_needs_opting_in() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/retained";
    let cmd = format!("{prefix}/cmd");
    let publisher = MqttPeer::connect(broker.port, "prankster", &[]);
    publisher
        .client
        .publish(&cmd, rumqttc::QoS::AtLeastOnce, true, r#"{"cmd": "pause"}"#)
        .unwrap();
    publisher
        .client
        .publish(
            format!("{prefix}/labels"),
            rumqttc::QoS::AtLeastOnce,
            true,
            r#"{"id": "1", "label": 2}"#,
        )
        .unwrap();
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "operator", &[&metrics]);
    // The retained messages are on the broker before the daemon subscribes.
    assert_eq!(
        crate::util::broker::mosquitto_sub_one(broker.port, &cmd),
        r#"{"cmd": "pause"}"#
    );
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let m = metrics_when(&peer, &metrics, Duration::from_secs(10), |v| {
        num(v, "retained_ignored_total") >= 2.0
    });
    assert_eq!(
        num(&m, "paused"),
        0.0,
        "a retained pause is not obeyed: {m}"
    );
    assert_eq!(num(&m, "commands_total"), 0.0, "{m}");

    // Live: reset is refused by default, pause is obeyed, also as a bare word.
    peer.publish(&cmd, r#"{"cmd": "reset"}"#);
    peer.publish(&cmd, "pause");
    let m = metrics_when(&peer, &metrics, Duration::from_secs(10), |v| {
        num(v, "commands_refused_total") >= 1.0 && num(v, "paused") == 1.0
    });
    assert_eq!(num(&m, "commands_total"), 1.0, "{m}");
    assert_eq!(num(&m, "resets_total"), 0.0, "{m}");
    assert!(daemon.log_text().contains("not in [control] allow"));
    assert!(daemon.terminate().0.success());
}

/// Failure 3: a retained message over the client's packet limit made the client reconnect
/// four times a second, forever, predicting nothing.
#[test]
fn a_retained_message_over_the_packet_limit_neither_loops_reconnects_nor_stops_predictions() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/oversized";
    let samples_topic = format!("{prefix}/samples");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; 5 << 20]).unwrap();
    let ok = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", &samples_topic, "-r", "-f"])
        .arg(&big)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let metrics = format!("{prefix}/metrics");
    let pred = format!("{prefix}/predictions");
    let peer = MqttPeer::connect(broker.port, "sensor", &[&metrics, &pred]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |v| {
        num(v, "mqtt_connected") == 1.0
    });
    for (i, s) in stream(20).iter().enumerate() {
        peer.publish(&samples_topic, sample_with_id(s, &format!("o{i}")));
    }
    let got = peer.collect_until(Duration::from_secs(15), |m| on(m, &pred).count() >= 20);
    assert_eq!(on(&got, &pred).count(), 20);
    // Several seconds connected, and not one reconnect.
    let m = metrics_when(&peer, &metrics, Duration::from_secs(10), |v| {
        num(v, "uptime_s") >= 4.0
    });
    assert_eq!(num(&m, "mqtt_reconnects_total"), 0.0, "{m}");
    assert_eq!(num(&m, "mqtt_connected"), 1.0, "{m}");
    assert!(daemon.terminate().0.success());
}

/// Failure 4: every client-supplied id was kept (twice), so RSS grew with id length.
#[test]
fn samples_with_huge_ids_are_rejected_so_memory_does_not_grow_with_them() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/ids";
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "ids", &[&metrics]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    let sample = &stream(1)[0];
    let n = 400;
    for i in 0..n {
        let id = format!("{i:06}{}", "i".repeat(200_000));
        peer.publish(&format!("{prefix}/samples"), sample_with_id(sample, &id));
    }
    // Each is parsed and rejected, or, when they come faster than the parser, dropped unread
    // (4 MiB of raw queue holds about 20 of them); either way none is kept.
    let m = metrics_when(&peer, &metrics, Duration::from_secs(30), |v| {
        num(v, "rejected_total") + num(v, "unread_dropped_total") >= n as f64
    });
    assert_eq!(
        num(&m, "rejected_total") + num(&m, "unread_dropped_total"),
        n as f64,
        "{m}"
    );
    assert!(num(&m, "rejected_total") > 0.0);
    assert_eq!(num(&m, "samples_total"), 0.0, "{m}");
    // 400 × 200 KB would be 80 MB kept once; the daemon stays far below that.
    assert!(
        num(&m, "peak_rss_bytes") < 64.0 * 1024.0 * 1024.0,
        "peak RSS {} MiB",
        num(&m, "peak_rss_bytes") / 1048576.0
    );
    assert!(daemon.log_text().contains("bytes long"));
    assert!(daemon.terminate().0.success());
}

/// Failure 5: labeled items were never dropped, so a labeled flood grew memory without bound.
#[test]
fn a_flood_of_labeled_samples_drops_the_oldest_labeled_counts_it_and_accounts_for_every_sample() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/labelflood";
    let mut daemon = Daemon::start(
        &daemon_config(
            dir.path(),
            &broker,
            prefix,
            "[learn]\ntrain_every = 1\n[input]\nqueue_capacity = 16\ninline_labels = true\n",
        ),
        &[],
    );
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "labeler", &[&metrics]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    let samples = stream(771);
    let n = 3 * samples.len();
    for i in 0..n {
        let mut s = samples[i % samples.len()].clone();
        s["label"] = s["truth"].clone();
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(&s, &format!("l{i}")),
        );
    }
    // Wait until every sample is accounted for. A slow machine may also shed some unread
    // from the raw queue (`unread_dropped_total`): those never reach `samples_total`.
    let unread = |v: &Value| num(v, "unread_dropped_total");
    let identity = |v: &Value| {
        num(v, "predictions_total")
            + num(v, "predictions_dropped_total")
            + num(v, "dropped_total")
            + num(v, "unembeddable_total")
    };
    let m = metrics_when(&peer, &metrics, Duration::from_secs(60), |v| {
        num(v, "samples_total") + unread(v) == n as f64 && identity(v) == num(v, "samples_total")
    });
    assert!(
        num(&m, "labeled_dropped_total") > 0.0,
        "the training queue overflowed with labels and dropped the oldest: {m}"
    );
    assert!(
        num(&m, "labeled_dropped_total")
            <= num(&m, "dropped_total") + num(&m, "train_dropped_total") + unread(&m),
        "{m}"
    );
    assert!(
        num(&m, "peak_rss_bytes") < 64.0 * 1024.0 * 1024.0,
        "peak RSS {} MiB",
        num(&m, "peak_rss_bytes") / 1048576.0
    );
    assert!(daemon.terminate().0.success());
}

/// Failure 7: with a clean session, QoS 1 samples sent while the daemon was away were lost.
#[test]
fn qos1_samples_sent_while_the_daemon_is_away_are_predicted_when_it_is_back() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/persistent";
    let cfg = daemon_config_mqtt(dir.path(), &broker, prefix, "qos = 1\n", "");
    let pred = format!("{prefix}/predictions");
    let status = format!("{prefix}/status");
    let peer = MqttPeer::connect(broker.port, "sensor", &[&pred, &status]);
    let mut daemon = Daemon::start(&cfg, &[]);
    peer.collect_until(Duration::from_secs(10), |m| {
        on(m, &status).any(|s| s == "online")
    });
    let samples = stream(40);
    for (i, s) in samples[..10].iter().enumerate() {
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("a{i}")),
        );
    }
    let got = peer.collect_until(Duration::from_secs(10), |m| on(m, &pred).count() >= 10);
    assert_eq!(on(&got, &pred).count(), 10);
    assert!(daemon.terminate().0.success());
    peer.collect_until(Duration::from_secs(5), |m| {
        on(m, &status).any(|s| s == "offline")
    });

    // Away: the broker queues these for the daemon's session.
    for (i, s) in samples[10..].iter().enumerate() {
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("b{i}")),
        );
    }
    let mut daemon = Daemon::start(&cfg, &[]);
    let got = peer.collect_until(Duration::from_secs(15), |m| on(m, &pred).count() >= 30);
    let ids: HashSet<String> = predicted_ids(&got, &pred).into_iter().collect();
    let missing: Vec<String> = (0..30)
        .map(|i| format!("b{i}"))
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(missing.is_empty(), "lost while away: {missing:?}");
    assert!(daemon.log_text().contains("resumed the broker's session"));
    assert!(daemon.terminate().0.success());
}

/// Failure 8: a label sent right after its sample arrived in the same batch and was
/// matched before the sample was filed, so it counted as late and was lost.
#[test]
fn a_label_sent_right_after_its_sample_finds_it() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/hotlabels";
    let mut daemon = Daemon::start(&daemon_config(dir.path(), &broker, prefix, ""), &[]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "labeler", &[&metrics]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    let samples = stream(200);
    for (i, s) in samples.iter().enumerate() {
        let id = format!("h{i}");
        peer.publish(&format!("{prefix}/samples"), sample_with_id(s, &id));
        let truth = &s["truth"];
        peer.publish(
            &format!("{prefix}/labels"),
            serde_json::json!({ "id": id, "label": truth }).to_string(),
        );
    }
    let m = metrics_when(&peer, &metrics, Duration::from_secs(20), |v| {
        num(v, "feedback_total") + num(v, "late_labels_total") >= 200.0
    });
    assert_eq!(num(&m, "late_labels_total"), 0.0, "{m}");
    assert_eq!(num(&m, "feedback_total"), 200.0, "{m}");
    assert!(daemon.terminate().0.success());
}

/// Failure 9: `predictions_total` counted predictions the client never published.
#[test]
fn predictions_total_counts_published_predictions_and_the_rest_are_counted_as_dropped() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/pubdrop";
    let cfg = daemon_config_mqtt(
        dir.path(),
        &broker,
        prefix,
        "qos = 1\nrequest_queue = 2\n",
        "",
    );
    let mut daemon = Daemon::start(&cfg, &[]);
    let metrics = format!("{prefix}/metrics");
    let pred = format!("{prefix}/predictions");
    let peer = MqttPeer::connect(broker.port, "counter", &[&metrics, &pred]);
    metrics_when(&peer, &metrics, Duration::from_secs(10), |_| true);
    let samples = stream(771);
    for (i, s) in samples.iter().enumerate() {
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("p{i}")),
        );
    }
    let got = peer.collect_until(Duration::from_secs(30), |m| {
        last_metrics(m, &metrics).is_some_and(|v| {
            num(&v, "predictions_total") + num(&v, "predictions_dropped_total") >= 771.0
        })
    });
    // Whatever was published arrives (QoS 1 both ways); let the tail come in.
    let tail = peer.collect_until(Duration::from_secs(2), |_| false);
    let received = on(&got, &pred).count() + on(&tail, &pred).count();
    let m = last_metrics(&got, &metrics).unwrap();
    assert!(num(&m, "predictions_dropped_total") > 0.0, "{m}");
    assert_eq!(num(&m, "predictions_total"), received as f64, "{m}");
    assert!(daemon.terminate().0.success());
}
