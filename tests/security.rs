//! The daemon behind a locked-down broker: the example ACL in packaging/mosquitto with
//! password users, TLS with a password, and what the daemon says (log at WARN, sd_notify)
//! when it cannot get in: a wrong password, a broker certificate from a CA it does not trust,
//! nothing listening. Each failure test then fixes the broker and expects READY=1.

use std::time::{Duration, Instant};

use crate::util::broker::{
    daemon_config_mqtt, has_line, last_metrics, num, on, predicted_ids, users, wait_for_log,
    warn_line, Broker, BrokerOptions, Daemon, MqttPeer, Notifications, PeerOptions,
};
use crate::util::{self, sample_with_id, stream, tempdir};

fn login(user: &str, password: &str) -> PeerOptions {
    PeerOptions {
        credentials: Some((user.into(), password.into())),
        ..Default::default()
    }
}

#[test]
fn the_example_acl_lets_the_sensor_feed_and_the_operator_command_while_an_intruder_is_ignored() {
    let dir = tempdir();
    let broker = Broker::start_with(BrokerOptions {
        users: users(&[
            ("edgemt", "daemon-pw"),
            ("sensor", "sensor-pw"),
            ("operator", "operator-pw"),
            ("intruder", "intruder-pw"),
        ]),
        acl_file: Some(util::path("packaging/mosquitto/edgemt.acl")),
        ..Default::default()
    });
    // The ACL covers edgemt/<device>/..., so the test device lives there.
    let prefix = "edgemt/acl-test";
    let t = |s: &str| format!("{prefix}/{s}");
    let cfg = daemon_config_mqtt(
        dir.path(),
        &broker,
        prefix,
        "username = \"edgemt\"\npassword = \"daemon-pw\"\n",
        "",
    );
    let mut daemon = Daemon::start(&cfg, &[]);
    let operator = MqttPeer::connect_with(
        broker.port,
        "operator",
        &[&t("predictions"), &t("metrics"), &t("status")],
        login("operator", "operator-pw"),
    );
    // The intruder also tries to listen; it must hear nothing at all.
    let intruder = MqttPeer::connect_with(
        broker.port,
        "intruder",
        &["edgemt/#", "#"],
        login("intruder", "intruder-pw"),
    );
    let sensor = MqttPeer::connect_with(broker.port, "sensor", &[], login("sensor", "sensor-pw"));
    let got = operator.collect_until(Duration::from_secs(15), |m| {
        on(m, &t("metrics")).count() > 0
    });
    assert!(
        on(&got, &t("metrics")).count() > 0,
        "the operator reads the daemon's metrics (the daemon got in as edgemt):\n{}",
        daemon.log_text()
    );

    let samples = stream(11);
    for (i, s) in samples[..10].iter().enumerate() {
        sensor.publish(&t("samples"), sample_with_id(s, &format!("acl{i}")));
    }
    let got = operator.collect_until(Duration::from_secs(15), |m| {
        on(m, &t("predictions")).count() >= 10
    });
    let ids = predicted_ids(&got, &t("predictions"));
    for i in 0..10 {
        assert!(
            ids.contains(&format!("acl{i}")),
            "the sensor's sample acl{i} was predicted and the operator read it: {ids:?}"
        );
    }

    // Commands from users the ACL does not let write cmd: mosquitto acknowledges and drops
    // them, so the PUBACKs say the broker has dealt with them.
    intruder.publish(&t("cmd"), r#"{"cmd": "pause"}"#);
    intruder.publish(&t("cmd"), r#"{"cmd": "reset"}"#);
    intruder.publish(&t("samples"), sample_with_id(&samples[0], "from-intruder"));
    sensor.publish(&t("cmd"), r#"{"cmd": "pause"}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while intruder.acked() < 3 || sensor.acked() < 11 {
        assert!(
            Instant::now() < deadline,
            "the broker acknowledged the publishes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // One more sample from the sensor, sent after the broker dropped the others: once the
    // daemon has counted it, anything forwarded before it would have been counted too.
    sensor.publish(&t("samples"), sample_with_id(&samples[10], "acl10"));
    let got = operator.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &t("metrics")).is_some_and(|v| num(&v, "samples_total") >= 11.0)
    });
    let m = last_metrics(&got, &t("metrics")).expect("metrics");
    assert_eq!(
        num(&m, "samples_total"),
        11.0,
        "only the sensor's samples: {m}"
    );
    assert_eq!(
        num(&m, "commands_total"),
        0.0,
        "no command got through: {m}"
    );
    assert_eq!(num(&m, "paused"), 0.0, "{m}");
    assert_eq!(num(&m, "resets_total"), 0.0, "{m}");

    operator.publish(&t("cmd"), r#"{"cmd": "pause"}"#);
    let got = operator.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &t("metrics")).is_some_and(|v| num(&v, "paused") == 1.0)
    });
    let m = last_metrics(&got, &t("metrics")).expect("metrics");
    assert_eq!(num(&m, "paused"), 1.0, "the operator may pause: {m}");
    assert_eq!(num(&m, "commands_total"), 1.0, "{m}");

    let heard = intruder.collect_until(Duration::ZERO, |_| false);
    assert!(
        heard.is_empty(),
        "the intruder read nothing, got {:?}",
        heard.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    assert!(daemon.terminate().0.success());
}

#[test]
fn the_daemon_connects_over_tls_with_a_password_and_predicts_for_a_tls_sensor() {
    let dir = tempdir();
    let broker = Broker::start_with(BrokerOptions {
        tls: true,
        users: users(&[("edgemt", "daemon-pw"), ("sensor", "sensor-pw")]),
        ..Default::default()
    });
    let prefix = "edgemt-test/tls";
    let t = |s: &str| format!("{prefix}/{s}");
    // The password from a file, as a systemd credential or a root-only file would hold it.
    let password_file = dir.path().join("mqtt-password");
    std::fs::write(&password_file, "daemon-pw\n").unwrap();
    let cfg = daemon_config_mqtt(
        dir.path(),
        &broker,
        prefix,
        &format!(
            "tls = true\nca_file = {:?}\nusername = \"edgemt\"\npassword_file = {:?}\n",
            broker.ca_file(),
            password_file
        ),
        "",
    );
    let mut daemon = Daemon::start(&cfg, &[]);
    let tls_login = PeerOptions {
        ca_file: Some(broker.ca_file()),
        ..login("sensor", "sensor-pw")
    };
    let sensor = MqttPeer::connect_with(
        broker.port,
        "tls-sensor",
        &[&t("predictions"), &t("status")],
        tls_login,
    );
    let got = sensor.collect_until(Duration::from_secs(15), |m| {
        on(m, &t("status")).any(|s| s == "online")
    });
    assert!(
        on(&got, &t("status")).any(|s| s == "online"),
        "the daemon's status reads online over TLS:\n{}",
        daemon.log_text()
    );
    let samples = stream(20);
    for (i, s) in samples.iter().enumerate() {
        sensor.publish(&t("samples"), sample_with_id(s, &format!("tls{i}")));
    }
    let got = sensor.collect_until(Duration::from_secs(15), |m| {
        on(m, &t("predictions")).count() >= 20
    });
    let ids = predicted_ids(&got, &t("predictions"));
    for i in 0..20 {
        assert!(ids.contains(&format!("tls{i}")), "no prediction for tls{i}");
    }
    assert!(daemon.terminate().0.success());
}

/// Starts a daemon that cannot get into `broker` with `mqtt_extra`, and checks the contract
/// for that situation: within 10 s a WARN line with one of `words` explains it; the daemon
/// keeps running; sd_notify carries a STATUS= about the broker but no READY=1 in the first
/// seconds. Then `fix` repairs the broker and READY=1 must follow. Every check is made and
/// all failures are reported together, so one run shows the whole picture.
fn failure_is_explained_and_readiness_waits_for_the_broker(
    mut broker: Broker,
    prefix: &str,
    mqtt_extra: &str,
    words: &[&str],
    fix: impl FnOnce(&mut Broker),
) {
    let dir = tempdir();
    let cfg = daemon_config_mqtt(dir.path(), &broker, prefix, mqtt_extra, "");
    let mut notes = Notifications::bind(dir.path());
    let started = Instant::now();
    let mut daemon = Daemon::start(&cfg, &[notes.env()]);
    let mut failures = Vec::new();

    if !wait_for_log(
        &daemon,
        |log| warn_line(log, words).is_some(),
        Duration::from_secs(10),
    ) {
        failures.push(format!(
            "no WARN line containing any of {words:?} within 10 s"
        ));
    }
    if !daemon.is_running() {
        failures.push("the daemon exited instead of retrying".into());
    }
    let about_the_broker = |n: &str| n.contains("STATUS=") && n.to_lowercase().contains("broker");
    if !notes.wait_for(about_the_broker, Duration::from_secs(5)) {
        failures.push("no sd_notify STATUS= mentioning the broker".into());
    }
    // READY=1 must not come while the daemon has never been connected: listen until 2 s after
    // the start, by when it has failed four times (backoff 250 ms, doubling).
    let first_seconds = Duration::from_secs(2).saturating_sub(started.elapsed());
    let ready = |n: &str| has_line(n, "READY=1");
    if notes.wait_for(ready, first_seconds) {
        failures.push("READY=1 was sent before the daemon ever connected".into());
    }

    let before_fix = notes.seen.len();
    fix(&mut broker);
    if !notes.wait_for_after(before_fix, ready, Duration::from_secs(20)) {
        failures.push("no READY=1 within 20 s of fixing the broker".into());
    }
    if !daemon.is_running() {
        failures.push("the daemon is not running after the fix".into());
    }
    assert!(
        failures.is_empty(),
        "{}\nsd_notify messages (arrival since start, text): {:?}\ndaemon log:\n{}",
        failures.join("\n"),
        notes.seen,
        daemon.log_text()
    );
    assert!(daemon.terminate().0.success());
}

#[test]
fn a_wrong_password_is_logged_at_warn_and_the_daemon_is_ready_only_once_the_broker_accepts_it() {
    let broker = Broker::start_with(BrokerOptions {
        users: users(&[("edgemt", "the-right-one")]),
        ..Default::default()
    });
    failure_is_explained_and_readiness_waits_for_the_broker(
        broker,
        "edgemt-test/wrong-password",
        "username = \"edgemt\"\npassword = \"a-wrong-one\"\n",
        &["password", "not authori"],
        // The administrator sets the password the device has.
        |b| b.reconfigure(|o| o.users = users(&[("edgemt", "a-wrong-one")])),
    );
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_is_logged_at_warn_and_the_daemon_is_ready_once_it_verifies(
) {
    let broker = Broker::start_with(BrokerOptions {
        tls: true,
        ..Default::default()
    });
    let mqtt = format!("tls = true\nca_file = {:?}\n", broker.other_ca_file());
    failure_is_explained_and_readiness_waits_for_the_broker(
        broker,
        "edgemt-test/bad-ca",
        &mqtt,
        &["certificate", "tls"],
        // The broker gets a certificate from the CA the device trusts.
        |b| b.reconfigure(|o| o.tls_cert_from_other_ca = true),
    );
}

#[test]
fn a_refused_connection_is_logged_at_warn_and_the_daemon_is_ready_once_the_broker_listens() {
    let broker = Broker::unstarted(BrokerOptions::default());
    failure_is_explained_and_readiness_waits_for_the_broker(
        broker,
        "edgemt-test/refused",
        "",
        &["refused"],
        Broker::restart,
    );
}
