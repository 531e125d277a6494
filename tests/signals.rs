//! Signals and instances: every signal that would kill `edgemt run` stops it cleanly instead
//! (a final checkpoint, `offline`), from right after start-up on; one daemon per state
//! directory; and two daemons with one client id say so in their logs. Against a real
//! mosquitto and the real binary.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::broker::{
    daemon_config, last_metrics, mosquitto_sub_one, num, on, wait_for_log, warn_line, Broker,
    Daemon, MqttPeer,
};
use crate::util::{self, edgemt, path, stream, tempdir};

/// The newest valid checkpoint's sequence number and train steps in `dir`, if any.
fn newest_checkpoint(dir: &std::path::Path) -> Option<(u64, u64)> {
    let c = util::shipped_classifier();
    let store = util::checkpoint_store(dir, &c, 3);
    store
        .latest_valid()
        .map(|(m, _)| (m.sequence, m.counters.train_steps))
}

/// Waits until the daemon has its handler for `signo` installed (panics after 10 s).
fn wait_until_it_catches(daemon: &Daemon, signo: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.catches(signo as u32) {
        assert!(
            Instant::now() < deadline,
            "no handler for signal {signo} after 10 s:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGHUP as soon as the daemon catches it: before the model is loaded and before the broker
/// connection, the window in which a signal used to kill it. It must still end with a final
/// checkpoint and the retained `offline`.
#[test]
fn sighup_right_after_start_up_stops_cleanly_with_a_final_checkpoint_and_offline() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/hup-early";
    let status = format!("{prefix}/status");
    let state = dir.path().join("state");
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    let mut daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    wait_until_it_catches(&daemon, libc::SIGHUP);
    let before_connecting = !daemon.log_text().contains("connecting to broker");
    let (exit, took) = daemon.stop_with_signal("-HUP");
    let log = daemon.log_text();
    assert!(exit.success(), "{exit}:\n{log}");
    assert!(took < Duration::from_secs(5), "stopped in {took:?}:\n{log}");
    assert!(
        warn_line(&log, &["SIGHUP received"]).is_some(),
        "names the signal:\n{log}"
    );
    assert!(log.contains("stopped"), "{log}");
    assert!(
        newest_checkpoint(&state).is_some(),
        "a final checkpoint in {}:\n{log}",
        state.display()
    );
    assert_eq!(
        mosquitto_sub_one(broker.port, &status),
        "offline",
        "retained"
    );
    // The point of this test is the window before the connection; say if it was missed.
    assert!(
        before_connecting,
        "SIGHUP was sent only after the daemon connected:\n{log}"
    );
}

/// SIGHUP while samples stream in and the learner steps: a clean stop, and the final
/// checkpoint holds at least every step the last metrics message reported.
#[test]
fn sighup_during_a_stream_stops_cleanly_with_a_final_checkpoint_holding_what_was_learned() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/hup-stream";
    let (status, metrics) = (format!("{prefix}/status"), format!("{prefix}/metrics"));
    let state = dir.path().join("state");
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 1000000\nevery_s = 3600\n",
    );
    let mut daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    let watcher = MqttPeer::connect(broker.port, "hup-watcher", &[&status, &metrics]);
    let got = watcher.collect_until(Duration::from_secs(20), |m| {
        on(m, &status).any(|s| s == "online")
    });
    assert!(
        on(&got, &status).any(|s| s == "online"),
        "{}",
        daemon.log_text()
    );

    // A sensor that keeps sending, 2 ms apart, on its own thread: the signal lands mid-stream.
    let sensor = MqttPeer::connect(broker.port, "hup-sensor", &[]);
    let samples_topic = format!("{prefix}/samples");
    let sending = std::thread::spawn(move || {
        for s in stream(usize::MAX) {
            sensor.publish(&samples_topic, s.to_string());
            std::thread::sleep(Duration::from_millis(2));
        }
        sensor
    });
    let got = watcher.collect_until(Duration::from_secs(20), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "train_steps") >= 20.0)
    });
    let seen: Value = last_metrics(&got, &metrics).expect("metrics arrive");
    assert!(num(&seen, "train_steps") >= 20.0, "learning: {seen}");
    assert!(!sending.is_finished(), "the stream was over before SIGHUP");
    let (exit, took) = daemon.stop_with_signal("-HUP");
    let log = daemon.log_text();
    assert!(exit.success(), "{exit}:\n{log}");
    assert!(took < Duration::from_secs(5), "stopped in {took:?}:\n{log}");
    assert!(warn_line(&log, &["SIGHUP received"]).is_some(), "{log}");
    let (_, steps) = newest_checkpoint(&state).expect("a final checkpoint");
    assert!(
        steps as f64 >= num(&seen, "train_steps"),
        "the final checkpoint has {steps} steps, the metrics said {seen}"
    );
    assert_eq!(
        mosquitto_sub_one(broker.port, &status),
        "offline",
        "retained"
    );
    let _ = sending.join();
}

/// The signals nobody should send edgemt, each to a daemon of its own on one state directory:
/// every one ends in a clean stop with a new final checkpoint and `offline`.
#[test]
fn sigusr1_sigusr2_sigquit_and_sigalrm_each_stop_cleanly_with_a_final_checkpoint() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/signals";
    let status = format!("{prefix}/status");
    let state = dir.path().join("state");
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    let watcher = MqttPeer::connect(broker.port, "signals-watcher", &[&status]);
    let mut last_sequence = None;
    for (kill_name, name) in [
        ("-USR1", "SIGUSR1"),
        ("-USR2", "SIGUSR2"),
        ("-QUIT", "SIGQUIT"),
        ("-ALRM", "SIGALRM"),
    ] {
        let mut daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
        let got = watcher.collect_until(Duration::from_secs(20), |m| {
            on(m, &status).any(|s| s == "online")
        });
        assert!(on(&got, &status).any(|s| s == "online"), "{name}: online");
        let (exit, took) = daemon.stop_with_signal(kill_name);
        let log = daemon.log_text();
        assert!(exit.success(), "{name}: {exit}:\n{log}");
        assert!(took < Duration::from_secs(5), "{name}: stopped in {took:?}");
        assert!(
            warn_line(&log, &[&format!("{name} received")]).is_some(),
            "{name} named:\n{log}"
        );
        let (sequence, _) = newest_checkpoint(&state).expect("a final checkpoint");
        assert!(
            last_sequence.is_none_or(|last| sequence > last),
            "{name}: a new checkpoint ({sequence} after {last_sequence:?})"
        );
        last_sequence = Some(sequence);
        let got = watcher.collect_until(Duration::from_secs(5), |m| {
            on(m, &status).any(|s| s == "offline")
        });
        assert!(on(&got, &status).any(|s| s == "offline"), "{name}: offline");
        assert_eq!(mosquitto_sub_one(broker.port, &status), "offline");
    }
}

/// One daemon per state directory: a second on the same directory (same config) exits
/// non-zero before it connects, naming the first's pid, and leaves the first serving. Once
/// the first is killed (SIGKILL: the lock file stays behind), the next one starts.
#[test]
fn a_second_instance_on_the_same_state_directory_refuses_to_start_naming_the_first() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/twice";
    let status = format!("{prefix}/status");
    let state = dir.path().join("state");
    let env = [("STATE_DIRECTORY", state.to_str().unwrap())];
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    let watcher = MqttPeer::connect(broker.port, "twice-watcher", &[&status]);
    let mut first = Daemon::start(&cfg, &env);
    let got = watcher.collect_until(Duration::from_secs(20), |m| {
        on(m, &status).any(|s| s == "online")
    });
    assert!(on(&got, &status).any(|s| s == "online"));

    let second_dir = tempdir();
    let second_cfg = second_dir.path().join("edgemt.toml");
    std::fs::copy(&cfg, &second_cfg).unwrap();
    let mut second = Daemon::start(&second_cfg, &env);
    let exit = second
        .wait_exit(Duration::from_secs(10))
        .expect("the second daemon exits by itself");
    let said = second.log_text();
    assert!(!exit.success(), "{exit}:\n{said}");
    assert!(
        said.contains(&format!("pid {}", first.pid())) && said.contains("in use"),
        "names the first: {said}"
    );
    assert!(!said.contains("connecting to broker"), "{said}");
    // The broker saw one connection with that client id, and the first never went offline.
    let client_id = "edgemt-edgemt-test-twice";
    assert_eq!(
        broker
            .log_text()
            .matches(&format!(" as {client_id} "))
            .count(),
        1,
        "{}",
        broker.log_text()
    );
    // A replay that would save checkpoints into it is a second writer too.
    let replay = edgemt()
        .args(["replay", "--config"])
        .arg(&cfg)
        .arg(path("data/control_stream.jsonl"))
        .arg("--checkpoint")
        .arg(&state)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&replay.stderr);
    assert!(!replay.status.success(), "{said}");
    assert!(
        said.contains(&format!("pid {}", first.pid())) && said.contains("in use"),
        "names the daemon: {said}"
    );
    let later = watcher.collect_until(Duration::from_secs(1), |_| false);
    assert!(!on(&later, &status).any(|s| s == "offline"));
    assert!(first.is_running());

    let first_pid = first.pid();
    first.kill();
    let lock = std::fs::read_to_string(state.join("edgemt.lock")).unwrap();
    assert!(lock.contains(&format!("pid {first_pid}")), "{lock}");
    let mut third = Daemon::start(&second_cfg, &env);
    let got = watcher.collect_until(Duration::from_secs(20), |m| {
        on(m, &status).any(|s| s == "online")
    });
    assert!(
        on(&got, &status).any(|s| s == "online"),
        "a stale lock file does not block:\n{}",
        third.log_text()
    );
    let lock = std::fs::read_to_string(state.join("edgemt.lock")).unwrap();
    assert!(lock.contains(&format!("pid {}", third.pid())), "{lock}");
    assert!(third.terminate().0.success());
}

/// Outside systemd, with no `[checkpoint] dir`, the daemon would save no checkpoints: it warns
/// at start (before it connects), naming both ways to give it a directory. With
/// $STATE_DIRECTORY it does not.
#[test]
fn a_daemon_without_a_checkpoint_directory_warns_at_start_that_it_saves_none() {
    let dir = tempdir();
    let broker = Broker::start();
    let cfg = daemon_config(dir.path(), &broker, "edgemt-test/no-state", "");
    let mut daemon = Daemon::start(&cfg, &[]);
    assert!(
        wait_for_log(
            &daemon,
            |log| log.contains("connecting to broker"),
            Duration::from_secs(20)
        ),
        "{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    let line = warn_line(&log, &["NO checkpoints"]).unwrap_or_else(|| panic!("a warning:\n{log}"));
    assert!(
        line.contains("[checkpoint] dir") && line.contains("StateDirectory="),
        "{line}"
    );
    let (warned, connecting) = (
        log.find("NO checkpoints").unwrap(),
        log.find("connecting to broker").unwrap(),
    );
    assert!(warned < connecting, "at start, before connecting:\n{log}");
    assert!(daemon.terminate().0.success());

    let state = dir.path().join("state");
    let cfg = daemon_config(dir.path(), &broker, "edgemt-test/with-state", "");
    let mut daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    assert!(wait_for_log(
        &daemon,
        |log| log.contains("connecting to broker"),
        Duration::from_secs(20)
    ));
    assert!(!daemon.log_text().contains("NO checkpoints"));
    assert!(daemon.terminate().0.success());
}

/// Two daemons with one client id (and no state directory, so no lock) take the broker
/// session from each other over and over; each says so, naming the client id, once.
#[test]
fn two_daemons_with_one_client_id_name_the_session_taken_over_once_not_at_every_takeover() {
    let dir = tempdir();
    let broker = Broker::start();
    let cfg = |prefix: &str| {
        let p = daemon_config(dir.path(), &broker, prefix, "");
        let text = std::fs::read_to_string(&p).unwrap().replace(
            &format!("client_id = \"edgemt-{}\"", prefix.replace('/', "-")),
            "client_id = \"edgemt-shared\"",
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    let (a_cfg, b_cfg) = (cfg("edgemt-test/same-a"), cfg("edgemt-test/same-b"));
    let status_a = "edgemt-test/same-a/status";
    let watcher = MqttPeer::connect(broker.port, "same-watcher", &[status_a]);
    let mut a = Daemon::start(&a_cfg, &[]);
    watcher.collect_until(Duration::from_secs(20), |m| {
        on(m, status_a).any(|s| s == "online")
    });
    let mut b = Daemon::start(&b_cfg, &[]);
    let takeover = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains("session taken over"))
            .count()
    };
    let connections = |d: &Daemon| d.log_text().matches("connected to mqtt://").count();
    for (who, d) in [("first", &a), ("second", &b)] {
        assert!(
            wait_for_log(d, |log| takeover(log) >= 1, Duration::from_secs(30)),
            "the {who} daemon names the takeover:\n{}",
            d.log_text()
        );
    }
    // Several more rounds of taking the session back (reconnects at most 1 s apart here).
    let so_far = connections(&a);
    assert!(
        wait_for_log(
            &a,
            |log| log.matches("connected to mqtt://").count() >= so_far + 4,
            Duration::from_secs(30)
        ),
        "the first daemon kept reconnecting:\n{}",
        a.log_text()
    );
    for (who, log) in [("first", a.log_text()), ("second", b.log_text())] {
        assert_eq!(takeover(&log), 1, "once, in the {who} daemon's log:\n{log}");
        let line = warn_line(&log, &["session taken over"]).unwrap();
        assert!(
            line.contains("client id edgemt-shared") && line.contains("another client"),
            "{line}"
        );
        // Before the pattern is clear, at most two closes are told as plain closes.
        let plain = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("closed by peer"))
            .count();
        assert!(plain <= 2, "{who}: {plain} plain lines:\n{log}");
    }
    assert!(a.terminate().0.success());
    assert!(b.terminate().0.success());
}
