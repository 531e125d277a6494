//! The daemon's small caps, each against the attack that found it missing: idle connections
//! to the Prometheus endpoint, 320 KB commands echoed into the log, a burst of commands
//! logged one line each, ids the daemon gives that a client's label could name by accident,
//! and one label by class name that reaches back an hour.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::broker::{daemon_config, free_port, num, on, predicted_ids, Broker, Daemon, Rig};
use crate::util::{self, sample_with_id, stream, tempdir};

/// How long a test waits for the daemon's metrics to get somewhere.
const WAIT: Duration = Duration::from_secs(20);

/// A daemon and a peer that sends it commands and reads its metrics, once the first metrics
/// came (the daemon is up); with the command topic.
fn commander(prefix: &'static str) -> (Rig, String) {
    let rig = Rig::start(prefix, "commander", "", &["metrics"]);
    let _ = rig.metrics_where(WAIT, |_| true);
    let cmd = rig.topic("cmd");
    (rig, cmd)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// One `GET /metrics`; the body, or none when the connection was closed without an answer.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn series(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn idle_connections_beyond_the_prometheus_cap_are_closed_at_once_and_a_scrape_still_answers() {
    let dir = tempdir();
    let broker = Broker::start();
    let port = free_port();
    let cfg = daemon_config(
        dir.path(),
        &broker,
        "edgemt-test/http-cap",
        &format!("prometheus = \"127.0.0.1:{port}\"\n"),
    );
    let mut daemon = Daemon::start(&cfg, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while scrape(port).is_none() {
        assert!(
            Instant::now() < deadline,
            "no scrape:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = open_fds(daemon.pid());

    // 300 clients that connect and say nothing.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let during = open_fds(daemon.pid());
    assert!(
        during <= before + 16 + 4,
        "the daemon holds {during} fds with 300 idle clients (before: {before})"
    );
    // The excess were closed by the daemon: reading them ends at once.
    let closed = idle
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            matches!((&mut &**s).read(&mut [0u8; 1]), Ok(0))
        })
        .count();
    assert!(closed >= 300 - 16, "only {closed} of 300 were closed");
    drop(idle);

    // Once they are gone, a scrape is answered and the refusals are in it.
    std::thread::sleep(Duration::from_millis(300));
    let body = scrape(port).expect("a scrape after the idle clients left");
    let refused = series(&body, "edgemt_http_connections_refused_total").expect(&body);
    assert!(refused >= (300 - 16) as f64, "{refused}");
    assert!(daemon.terminate().0.success());
}

#[test]
fn a_320_kb_command_is_refused_unread_and_the_log_keeps_only_bounded_lines() {
    let (mut rig, cmd) = commander("edgemt-test/big-cmd");
    let peer = &rig.peer;

    // Under mqtt.max_payload_bytes' packet limit, so the broker delivers them; 20 of them
    // used to put 6.4 MB into the log.
    let huge = format!("{{\"cmd\": \"pause{}\"}}", "x".repeat(320 * 1024));
    for _ in 0..20 {
        peer.publish(&cmd, huge.clone());
    }
    // An unknown command under the cap is named, but only its first characters.
    peer.publish(&cmd, format!("dance{}", "y".repeat(200)));
    let m = rig.metrics_where(WAIT, |v| num(v, "rejected_total") >= 21.0);
    assert_eq!(num(&m, "oversized_total"), 20.0, "{m}");
    assert_eq!(num(&m, "paused"), 0.0, "{m}");
    let log = rig.daemon.log_text();
    assert!(log.len() < 16 * 1024, "{} bytes of log", log.len());
    assert!(
        log.lines().all(|l| l.len() < 700),
        "a line over 700 bytes:\n{log}"
    );
    assert!(log.contains("commands are at most 256 bytes"), "{log}");
    assert!(!log.contains(&"y".repeat(41)), "{log}");
    assert!(rig.daemon.terminate().0.success());
}

#[test]
fn a_burst_of_commands_is_obeyed_but_logged_a_few_lines_at_a_time() {
    let (mut rig, cmd) = commander("edgemt-test/cmd-burst");
    let peer = &rig.peer;
    for i in 0..1000 {
        peer.publish(&cmd, if i % 2 == 0 { "pause" } else { "resume" });
    }
    let m = rig.metrics_where(WAIT, |v| num(v, "commands_total") >= 1000.0);
    assert_eq!(num(&m, "commands_total"), 1000.0, "{m}");
    assert_eq!(num(&m, "paused"), 0.0, "the last word was resume: {m}");
    let log = rig.daemon.log_text();
    let lines = log.lines().filter(|l| l.contains("command: ")).count();
    assert!((1..=10).contains(&lines), "{lines} command lines:\n{log}");
    assert!(rig.daemon.terminate().0.success());
}

#[test]
fn a_label_for_a_clients_sample_1_never_lands_on_a_sample_the_daemon_numbered() {
    let mut rig = Rig::start(
        "edgemt-test/ids",
        "sensors",
        "",
        &["metrics", "predictions"],
    );
    let _ = rig.metrics_where(WAIT, |_| true);
    let (peer, predictions, samples) = (&rig.peer, rig.topic("predictions"), rig.topic("samples"));

    // Two samples the pretrained model (served at first) tells apart.
    let model = util::path("models/hapt_mlp.onnx");
    let all = stream(60);
    let xs: Vec<Vec<f32>> = all.iter().map(util::sample_x).collect();
    let predicted = util::pretrained_predictions(&model, &xs);
    let a = 0;
    let b = (1..all.len())
        .find(|&i| predicted[i].0 != predicted[a].0)
        .expect("two predicted classes");

    // Sensor A names its sample "1"; sensor B sends one without an id, and then tries to
    // take an id in the daemon's own namespace.
    peer.publish(&samples, sample_with_id(&all[a], "1"));
    let mut unnamed = all[b].clone();
    unnamed.as_object_mut().unwrap().remove("truth");
    peer.publish(&samples, unnamed.to_string());
    peer.publish(&samples, sample_with_id(&all[b], "#7"));
    let got = peer.collect_until(Duration::from_secs(15), |m| {
        on(m, &predictions).count() >= 2
    });
    let ids = predicted_ids(&got, &predictions);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], "1");
    assert!(
        ids[1].starts_with('#') && ids[1] != "1",
        "the daemon's id is in its own namespace: {ids:?}"
    );

    // A's label for "1", the class the model gave A's sample: correct only on A's sample.
    peer.publish(
        &rig.topic("labels"),
        format!("{{\"id\": \"1\", \"label\": {}}}", predicted[a].0),
    );
    let m = rig.metrics_where(WAIT, |v| num(v, "feedback_total") >= 1.0);
    assert_eq!(num(&m, "feedback_total"), 1.0, "{m}");
    assert_eq!(
        num(&m, "feedback_accuracy"),
        1.0,
        "the label landed on sensor A's sample: {m}"
    );
    assert_eq!(
        num(&m, "rejected_total"),
        1.0,
        "the sample claiming #7: {m}"
    );
    assert!(rig.daemon.log_text().contains("are the daemon's own"));
    assert!(rig.daemon.terminate().0.success());
}

#[test]
fn one_label_by_class_name_labels_at_most_its_cap_of_recent_samples_and_counts_the_rest() {
    let mut rig = Rig::start(
        "edgemt-test/class-cap",
        "labeler",
        "[input]\nclass_label_max_samples = 10\n",
        &["metrics"],
    );
    let _ = rig.metrics_where(WAIT, |_| true);
    for (i, s) in stream(50).iter().enumerate() {
        rig.peer
            .publish(&rig.topic("samples"), sample_with_id(s, &format!("c{i}")));
    }
    let _ = rig.metrics_where(WAIT, |v| num(v, "predictions_total") >= 50.0);
    rig.peer.publish(
        &rig.topic("labels"),
        r#"{"class": "SITTING", "seconds": 3600}"#,
    );
    let m = rig.metrics_where(WAIT, |v| {
        num(v, "class_label_excess_total") >= 40.0 && num(v, "feedback_total") >= 10.0
    });
    // One more metrics message, so a late label would show.
    let m = rig.metrics_where(WAIT, |v| num(v, "uptime_s") > num(&m, "uptime_s"));
    assert_eq!(num(&m, "feedback_total"), 10.0, "{m}");
    assert_eq!(num(&m, "class_label_excess_total"), 40.0, "{m}");
    assert!(rig.daemon.terminate().0.success());
}
