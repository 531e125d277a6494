//! A broker that refuses: the shipped ACL lets the daemon write and read every topic it uses
//! (checked as text against the daemon's own topic list, and against a real mosquitto), and an
//! ACL that denies the daemon topics at QoS 1 is counted (`publish_denied_total`), told once
//! per topic per minute in the log and as the systemd STATUS line, and does not stall the
//! daemon's other outputs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgemt::daemon::ingest::Topics;

use crate::util::broker::{
    daemon_config_mqtt, last_metrics, num, on, users, Broker, BrokerOptions, Daemon, MqttPeer,
    Notifications, PeerOptions,
};
use crate::util::{self, sample_with_id, stream, tempdir};

fn login(user: &str, password: &str) -> PeerOptions {
    PeerOptions {
        credentials: Some((user.into(), password.into())),
        ..Default::default()
    }
}

/// The `topic` rules of one user of an acl_file: (access, topic pattern).
fn acl_rules(acl: &str, user: &str) -> Vec<(String, String)> {
    let mut current = None;
    let mut rules = Vec::new();
    for line in acl.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["user", name] => current = Some(*name),
            ["topic", access, pattern] if current == Some(user) => {
                rules.push((access.to_string(), pattern.to_string()))
            }
            _ => {}
        }
    }
    rules
}

/// MQTT topic matching: `+` one level, `#` the rest.
fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('/');
    let mut t = topic.split('/');
    loop {
        match (p.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn allows(rules: &[(String, String)], access: &str, topic: &str) -> bool {
    rules
        .iter()
        .any(|(a, p)| (a == access || a == "readwrite") && matches(p, topic))
}

#[test]
fn the_shipped_acl_lets_the_daemon_write_every_topic_it_publishes_and_read_every_one_it_reads() {
    let acl = std::fs::read_to_string(util::path("packaging/mosquitto/edgemt.acl")).unwrap();
    let rules = acl_rules(&acl, "edgemt");
    let topics = Topics::new("edgemt/some-device");
    let mut missing = Vec::new();
    for topic in topics.outputs() {
        if !allows(&rules, "write", topic) {
            missing.push(format!("write {topic}"));
        }
    }
    for topic in topics.inputs() {
        if !allows(&rules, "read", topic) {
            missing.push(format!("read {topic}"));
        }
    }
    // Home Assistant discovery under the default discovery prefix.
    if !allows(
        &rules,
        "write",
        "homeassistant/sensor/edgemt_x/rss_bytes/config",
    ) {
        missing.push("write homeassistant/#".into());
    }
    assert!(
        missing.is_empty(),
        "packaging/mosquitto/edgemt.acl denies the daemon: {missing:?}"
    );
    // The sensor feeds samples but may not label or command.
    let sensor = acl_rules(&acl, "sensor");
    assert!(allows(&sensor, "write", &topics.samples));
    assert!(!allows(&sensor, "write", &topics.cmd));
}

/// A broker with the three users of the shipped ACL and `acl` as its acl_file.
fn broker_with_acl(dir: &std::path::Path, acl: &str) -> Broker {
    let file = dir.join("edgemt.acl");
    std::fs::write(&file, acl).unwrap();
    Broker::start_with(BrokerOptions {
        users: users(&[
            ("edgemt", "daemon-pw"),
            ("sensor", "sensor-pw"),
            ("operator", "operator-pw"),
        ]),
        acl_file: Some(file),
        ..Default::default()
    })
}

const DAEMON_LOGIN: &str = "username = \"edgemt\"\npassword = \"daemon-pw\"\nqos = 1\n";

/// A broker under `acl` and the config of a daemon logged in as `edgemt` at QoS 1 under
/// `prefix`, publishing its state every 0.2 s.
fn under_acl(dir: &Path, acl: &str, prefix: &str) -> (Broker, PathBuf) {
    let broker = broker_with_acl(dir, acl);
    let cfg = daemon_config_mqtt(
        dir,
        &broker,
        prefix,
        DAEMON_LOGIN,
        "state_interval_s = 0.2\n",
    );
    (broker, cfg)
}

/// The operator (reading `topics` under `prefix`) and the sensor, logged in.
fn operator_and_sensor(port: u16, topics: &[&str]) -> (MqttPeer, MqttPeer) {
    let operator =
        MqttPeer::connect_with(port, "operator", topics, login("operator", "operator-pw"));
    let sensor = MqttPeer::connect_with(port, "sensor", &[], login("sensor", "sensor-pw"));
    (operator, sensor)
}

#[test]
fn under_the_shipped_acl_at_qos_1_the_broker_refuses_nothing_and_the_state_topic_gets_through() {
    let dir = tempdir();
    let acl = std::fs::read_to_string(util::path("packaging/mosquitto/edgemt.acl")).unwrap();
    let prefix = "edgemt/shipped-acl";
    let t = |s: &str| format!("{prefix}/{s}");
    let (broker, cfg) = under_acl(dir.path(), &acl, prefix);
    let mut daemon = Daemon::start(&cfg, &[]);
    let (operator, sensor) = operator_and_sensor(
        broker.port,
        &[&t("metrics"), &t("state"), &t("label_request")],
    );
    let _ = operator.collect_until(Duration::from_secs(15), |m| {
        on(m, &t("metrics")).count() > 0
    });
    for (i, s) in stream(40).iter().enumerate() {
        sensor.publish(&t("samples"), sample_with_id(s, &format!("s{i}")));
    }
    let got = operator.collect_until(Duration::from_secs(20), |m| {
        on(m, &t("state")).count() > 0
            && last_metrics(m, &t("metrics")).is_some_and(|v| num(&v, "predictions_total") >= 40.0)
    });
    let m = last_metrics(&got, &t("metrics")).expect("metrics");
    assert!(
        on(&got, &t("state")).count() > 0,
        "the operator reads {prefix}/state under the shipped ACL:\n{}",
        daemon.log_text()
    );
    assert_eq!(num(&m, "predictions_total"), 40.0, "{m}");
    assert_eq!(num(&m, "publish_denied_total"), 0.0, "{m}");
    assert_eq!(num(&m, "subscribe_denied_total"), 0.0, "{m}");
    assert!(
        !daemon.log_text().contains("refused"),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.terminate().0.success());
}

#[test]
fn an_acl_that_denies_predictions_at_qos_1_is_counted_told_once_a_minute_and_in_status_and_stalls_nothing(
) {
    let dir = tempdir();
    // The shipped ACL without the daemon's right to write predictions, label requests and
    // Home Assistant discovery, as an administrator's older copy might read. (A refused
    // discovery config at start-up almost always left rumqttc holding every later publish
    // back: 5 of 6 runs of the old daemon stalled.)
    let denied = [
        "topic write edgemt/+/predictions",
        "topic write edgemt/+/label_request",
        "topic write homeassistant/#",
    ];
    let acl: String = std::fs::read_to_string(util::path("packaging/mosquitto/edgemt.acl"))
        .unwrap()
        .lines()
        .filter(|l| !denied.contains(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let prefix = "edgemt/denied";
    let t = |s: &str| format!("{prefix}/{s}");
    let (broker, cfg) = under_acl(dir.path(), &acl, prefix);
    let mut notes = Notifications::bind(dir.path());
    let mut daemon = Daemon::start(&cfg, &[notes.env()]);
    let (operator, sensor) = operator_and_sensor(
        broker.port,
        &[&t("metrics"), &t("state"), &t("predictions")],
    );
    let _ = operator.collect_until(Duration::from_secs(15), |m| {
        on(m, &t("metrics")).count() > 0
    });
    let n = 200;
    for (i, s) in stream(n).iter().enumerate() {
        sensor.publish(&t("samples"), sample_with_id(s, &format!("d{i}")));
    }
    let got = operator.collect_until(Duration::from_secs(30), |m| {
        last_metrics(m, &t("metrics")).is_some_and(|v| num(&v, "publish_denied_total") >= n as f64)
    });
    let m = last_metrics(&got, &t("metrics")).expect("metrics");
    let log = daemon.log_text();
    assert_eq!(num(&m, "predictions_total"), n as f64, "{m}");
    assert!(
        num(&m, "publish_denied_total") >= n as f64,
        "every refused prediction is counted: {m}\n{log}"
    );
    assert_eq!(
        on(&got, &t("predictions")).count(),
        0,
        "the broker dropped them"
    );

    // Still flowing after the refusals: the state topic and the metrics (a refused PubAck
    // used to leave rumqttc holding every later publish back).
    for (i, s) in stream(20).iter().enumerate() {
        sensor.publish(&t("samples"), sample_with_id(s, &format!("later{i}")));
    }
    let later = operator.collect_until(Duration::from_secs(10), |m| {
        on(m, &t("state")).count() > 0 && on(m, &t("metrics")).count() > 1
    });
    assert!(
        on(&later, &t("state")).count() > 0 && on(&later, &t("metrics")).count() > 1,
        "state and metrics keep coming after the refusals:\n{log}"
    );

    // Told once per topic (well within a minute), naming topic, reason and what to check.
    let told = |topic: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("refused a publish on {topic}:")))
            .count()
    };
    assert_eq!(told(&t("predictions")), 1, "{log}");
    assert_eq!(told(&t("label_request")), 1, "{log}");
    // The discovery configs, one line for all of them.
    assert_eq!(told("homeassistant/#"), 1, "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("refused a publish"))
            .count(),
        3,
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains(&format!("refused a publish on {}:", t("predictions"))))
        .unwrap();
    assert!(
        line.contains("NotAuthorized") && line.contains("ACL") && line.contains("user edgemt"),
        "{line}"
    );
    // rumqttc's own line per refused packet stays out of the log.
    assert!(
        !log.contains("PubAck") && !log.contains("Collision"),
        "rumqttc's per-packet lines: {log}"
    );
    let status = |n: &str| {
        n.contains("STATUS=")
            && n.contains(&format!("refuses publishes on {}", t("predictions")))
            && n.contains("NotAuthorized")
    };
    assert!(
        notes.wait_for(status, Duration::from_secs(5)),
        "a STATUS= line names the refused topic: {:?}",
        notes.seen
    );

    // The administrator installs the shipped ACL: once a prediction gets through, the log
    // says so and the STATUS line no longer speaks of refusals.
    let shipped = std::fs::read_to_string(util::path("packaging/mosquitto/edgemt.acl")).unwrap();
    std::fs::write(dir.path().join("edgemt.acl"), shipped).unwrap();
    let mut broker = broker;
    broker.reconfigure(|_| {});
    let before_fix = notes.seen.len();
    let operator = MqttPeer::connect_with(
        broker.port,
        "operator",
        &[&t("predictions")],
        login("operator", "operator-pw"),
    );
    let sensor = MqttPeer::connect_with(broker.port, "sensor", &[], login("sensor", "sensor-pw"));
    let mut got = Vec::new();
    for (i, s) in stream(100).iter().enumerate() {
        sensor.publish(&t("samples"), sample_with_id(s, &format!("fixed{i}")));
        got.extend(operator.collect_until(Duration::from_millis(20), |_| false));
        if on(&got, &t("predictions")).count() > 0 {
            break;
        }
    }
    got.extend(operator.collect_until(Duration::from_secs(10), |m| {
        on(m, &t("predictions")).count() > 0
    }));
    assert!(
        on(&got, &t("predictions")).count() > 0,
        "predictions arrive under the fixed ACL:\n{}",
        daemon.log_text()
    );
    let cleared = |n: &str| n.contains("STATUS=serving: connected") && !n.contains("refuses");
    assert!(
        notes.wait_for_after(before_fix, cleared, Duration::from_secs(5)),
        "a STATUS= line without the refusal once predictions get through: {:?}",
        &notes.seen[before_fix..]
    );
    assert!(daemon
        .log_text()
        .contains(&format!("accepts publishes on {} again", t("predictions"))));
    assert!(daemon.terminate().0.success());
}
