//! edgemt as Home Assistant and Prometheus see it, against a real mosquitto: every discovery
//! message checked against HA's documented MQTT schema (and what makes a device page read
//! well: a display precision on every number, units, icons, human class names), the
//! "Training" switch, the buttons and the labelling select steering the daemon, the command
//! counters, entities taken back when a restart announces fewer, accuracy on labels counting
//! labels inside samples and surviving a restart, the retained current-activity topic, and
//! the Prometheus endpoint read by the official Python client's text-format parser.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::Duration;

use edgemt::daemon::config::ControlConfig;
use edgemt::daemon::discovery::{human_names, Announce, NEUTRAL_OPTION};
use edgemt::daemon::ingest::Topics;
use serde_json::Value;

use crate::util::broker::{
    daemon_config, free_port, last_metrics, mosquitto_sub_one, num, on, Broker, Daemon, MqttPeer,
};
use crate::util::{self, sample_with_id, stream, tempdir};

/// Adds keys to a table `daemon_config` wrote.
fn table_keys(cfg: &std::path::Path, table: &str, keys: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let head = format!("[{table}]\n");
    assert!(text.contains(&head), "{table} in {text}");
    std::fs::write(cfg, text.replacen(&head, &format!("{head}{keys}"), 1)).unwrap();
}

/// Keys HA's MQTT integration documents for each platform (full names, no abbreviations).
fn allowed_keys(component: &str) -> HashSet<&'static str> {
    let common = [
        "name",
        "unique_id",
        "availability_topic",
        "payload_available",
        "payload_not_available",
        "device",
        "origin",
        "entity_category",
        "icon",
        "qos",
        "enabled_by_default",
        "json_attributes_topic",
        "json_attributes_template",
    ];
    let specific: &[&str] = match component {
        "sensor" => &[
            "state_topic",
            "value_template",
            "unit_of_measurement",
            "device_class",
            "state_class",
            "options",
            "expire_after",
            "force_update",
            "suggested_display_precision",
        ],
        "binary_sensor" => &[
            "state_topic",
            "value_template",
            "payload_on",
            "payload_off",
            "device_class",
            "expire_after",
            "force_update",
            "off_delay",
        ],
        "button" => &[
            "command_topic",
            "payload_press",
            "device_class",
            "retain",
            "command_template",
        ],
        "select" => &[
            "command_topic",
            "options",
            "state_topic",
            "value_template",
            "command_template",
            "optimistic",
            "retain",
        ],
        "switch" => &[
            "command_topic",
            "state_topic",
            "value_template",
            "command_template",
            "payload_on",
            "payload_off",
            "state_on",
            "state_off",
            "optimistic",
            "retain",
            "device_class",
        ],
        other => panic!("edgemt announced an unexpected component {other}"),
    };
    common.into_iter().chain(specific.iter().copied()).collect()
}

/// HA's sensor rules that reject a config (homeassistant/components/sensor: device classes,
/// their units, state classes; mqtt/sensor: enum sensors).
fn check_sensor(topic: &str, c: &Value) {
    let state_class = c.get("state_class").and_then(Value::as_str);
    let unit = c.get("unit_of_measurement").and_then(Value::as_str);
    match c.get("device_class").and_then(Value::as_str) {
        Some("enum") => {
            assert!(
                state_class.is_none(),
                "{topic}: an enum sensor has no state_class"
            );
            assert!(unit.is_none(), "{topic}: an enum sensor has no unit");
            let options = c["options"]
                .as_array()
                .expect("an enum sensor lists options");
            assert!(!options.is_empty(), "{topic}");
        }
        Some("duration") => assert!(
            ["d", "h", "min", "s", "ms", "μs"].contains(&unit.unwrap_or("")),
            "{topic}: a duration's unit is one HA knows, got {unit:?}"
        ),
        Some("data_size") => assert!(
            ["bit", "kbit", "Mbit", "B", "kB", "MB", "KiB", "MiB"].contains(&unit.unwrap_or("")),
            "{topic}: data_size unit {unit:?}"
        ),
        Some(other) => panic!("{topic}: device_class {other} not expected from edgemt"),
        None => {}
    }
    if c.get("device_class").and_then(Value::as_str) != Some("enum") {
        assert!(
            matches!(
                state_class,
                Some("measurement") | Some("total") | Some("total_increasing")
            ),
            "{topic}: every numeric sensor has a state_class (else HA keeps no statistics)"
        );
    }
    if c.get("device_class").and_then(Value::as_str) != Some("enum") {
        assert!(
            c["suggested_display_precision"].is_u64(),
            "{topic}: a number without a display precision shows raw floats"
        );
        // A metric may be null (no data this interval): it renders '', which HA ignores, so
        // the last value stays.
        let t = c["value_template"].as_str().unwrap();
        if c["state_topic"]
            .as_str()
            .is_some_and(|s| s.ends_with("/metrics"))
        {
            assert!(
                t.contains("is not none") && t.ends_with("else '' }}"),
                "{topic}: {t}"
            );
        }
    }
    if unit == Some("%") {
        let t = c["value_template"].as_str().unwrap();
        assert!(t.contains("* 100"), "{topic}: ratios are shown in %: {t}");
    }
    assert!(
        c.get("options").is_none() || c["device_class"] == "enum",
        "{topic}: options only on enum sensors"
    );
    if let Some(cat) = c.get("entity_category") {
        assert_eq!(
            cat, "diagnostic",
            "{topic}: a sensor's category can only be diagnostic"
        );
    }
}

/// One discovery message against the documented schema.
fn check_discovery(topic: &str, c: &Value, device_name: &str) {
    let parts: Vec<&str> = topic.split('/').collect();
    assert_eq!(
        parts.len(),
        5,
        "<prefix>/<component>/<node_id>/<object_id>/config: {topic}"
    );
    assert_eq!(parts[4], "config");
    let component = parts[1];
    let allowed = allowed_keys(component);
    for key in c.as_object().unwrap().keys() {
        assert!(
            allowed.contains(key.as_str()),
            "{topic}: {key} is not a {component} option"
        );
    }
    for key in [
        "name",
        "unique_id",
        "device",
        "origin",
        "availability_topic",
    ] {
        assert!(c.get(key).is_some(), "{topic} lacks {key}");
    }
    let device = &c["device"];
    assert!(device["identifiers"]
        .as_array()
        .is_some_and(|a| !a.is_empty()));
    assert_eq!(device["name"], device_name);
    assert_eq!(device["sw_version"], env!("CARGO_PKG_VERSION"));
    assert!(device["model"].as_str().unwrap().contains("hapt_mlp.onnx"));
    assert_eq!(c["origin"]["name"], "edgemt");
    assert!(c["origin"]["sw_version"].is_string());
    let name = c["name"].as_str().unwrap();
    assert!(
        !name.to_lowercase().contains("edgemt"),
        "{topic}: HA prefixes the device name; the entity name must not repeat it: {name}"
    );
    if let Some(cat) = c.get("entity_category") {
        assert!(cat == "diagnostic" || cat == "config", "{topic}: {cat}");
    }
    assert!(
        c["icon"].as_str().is_some_and(|i| i.starts_with("mdi:")),
        "{topic}: every entity has an icon"
    );
    match component {
        "sensor" => check_sensor(topic, c),
        "button" => {
            assert!(c["command_topic"].is_string() && c["payload_press"].is_string());
        }
        "select" => {
            assert!(c["command_topic"].is_string() && c["options"].is_array());
        }
        "switch" => {
            assert!(c["command_topic"].is_string() && c["state_topic"].is_string());
            assert!(c["payload_on"].is_string() && c["payload_off"].is_string());
        }
        "binary_sensor" => assert!(c["state_topic"].is_string()),
        _ => {}
    }
}

/// The discovery topics (configs and removals) a daemon of the test config publishes.
fn expected_discovery(prefix: &str, commands: &[edgemt::daemon::config::Command]) -> usize {
    let topics = Topics::new(prefix);
    let client_id = format!("edgemt-{}", prefix.replace('/', "-"));
    Announce {
        discovery_prefix: "homeassistant",
        client_id: &client_id,
        topics: &topics,
        class_names: &["A".to_string()],
        commands,
        model: "hapt_mlp.onnx",
    }
    .retained()
    .len()
}

/// Discovery messages by topic: configs, and the topics of empty (removing) payloads.
fn discovery_of(got: &[(String, Vec<u8>)]) -> (HashMap<String, Value>, HashSet<String>) {
    let ha = got.iter().filter(|(t, _)| t.starts_with("homeassistant/"));
    let configs = ha
        .clone()
        .filter(|(_, p)| !p.is_empty())
        .map(|(t, p)| {
            let c = serde_json::from_slice(p).expect("discovery is JSON");
            (t.clone(), c)
        })
        .collect();
    let removed = ha.filter(|(_, p)| p.is_empty()).map(|(t, _)| t.clone());
    (configs, removed.collect())
}

#[test]
fn home_assistant_discovery_follows_its_schema_and_its_switch_buttons_and_select_steer_the_daemon()
{
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/ha";
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    table_keys(&cfg, "metrics", "state_interval_s = 0.2\n");
    let metrics = format!("{prefix}/metrics");
    let ha = MqttPeer::connect(
        broker.port,
        "home-assistant",
        &["homeassistant/#", &metrics],
    );
    let mut daemon = Daemon::start(&cfg, &[]);
    let expected = expected_discovery(prefix, &ControlConfig::default().allow);
    let got = ha.collect_until(Duration::from_secs(15), |m| {
        m.iter()
            .filter(|(t, _)| t.starts_with("homeassistant/"))
            .count()
            >= expected
            && last_metrics(m, &metrics).is_some()
    });
    let (configs, removed) = discovery_of(&got);
    assert_eq!(configs.len() + removed.len(), expected);
    let device_name = "edgemt-edgemt-test-ha";
    let node = "homeassistant/{}/edgemt_edgemt_test_ha/{}/config";
    let topic =
        |component: &str, key: &str| node.replacen("{}", component, 1).replacen("{}", key, 1);
    // Taken back: the opt-in commands' buttons, the read-only "Training" (the switch is
    // announced), and the pause and resume buttons of earlier versions.
    assert_eq!(
        removed,
        HashSet::from([
            topic("button", "reset"),
            topic("button", "accept_labels"),
            topic("button", "pause"),
            topic("button", "resume"),
            topic("binary_sensor", "paused"),
        ])
    );
    for (topic, c) in &configs {
        check_discovery(topic, c, device_name);
    }
    let by_component = |component: &str| -> Vec<&Value> {
        configs
            .iter()
            .filter(|(t, _)| t.split('/').nth(1) == Some(component))
            .map(|(_, c)| c)
            .collect()
    };
    let sensors = by_component("sensor");
    assert!(sensors.len() >= 17, "{} sensors", sensors.len());
    let class_sensor = sensors
        .iter()
        .find(|c| c["device_class"] == "enum" && c["state_topic"] == format!("{prefix}/state"))
        .expect("a sensor for the current predicted class");
    let class_names: Vec<String> = class_sensor["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(class_names.len(), 6);
    // Human names; the state topic (with the raw name) is the attributes.
    assert!(
        class_names.contains(&"Walking upstairs".to_string()),
        "{class_names:?}"
    );
    assert_eq!(
        class_sensor["json_attributes_topic"],
        format!("{prefix}/state")
    );
    assert!(class_sensor["value_template"]
        .as_str()
        .unwrap()
        .contains(r#""WALKING_UPSTAIRS":"Walking upstairs""#));

    // Units and display precision where a device page showed raw floats, "0 ms" and bytes.
    let sensor_of = |key: &str| &configs[&topic("sensor", key)];
    let precision = |key: &str| sensor_of(key)["suggested_display_precision"].as_u64();
    assert_eq!(precision("samples_per_s"), Some(1));
    assert_eq!(
        sensor_of("samples_per_s")["unit_of_measurement"],
        "samples/s"
    );
    for key in ["loss_sup", "loss_pseudo", "loss_consistency", "gate_p"] {
        assert_eq!(precision(key), Some(3), "{key}");
    }
    for key in ["latency_p50_us", "latency_p99_us"] {
        assert_eq!(sensor_of(key)["unit_of_measurement"], "ms", "{key}");
        assert_eq!(precision(key), Some(1), "{key}");
    }
    assert_eq!(sensor_of("rss_bytes")["unit_of_measurement"], "MiB");
    assert_eq!(sensor_of("teacher_version")["state_class"], "measurement");
    // Counters for what the commands did, and the queues operators asked for.
    for key in [
        "checkpoints_total",
        "exports_total",
        "commands_refused_total",
    ] {
        let c = sensor_of(key);
        assert_eq!(c["state_class"], "total_increasing", "{key}");
        assert_eq!(precision(key), Some(0), "{key}");
    }
    for key in ["input_queue", "train_queue", "raw_queue_messages"] {
        assert_eq!(sensor_of(key)["entity_category"], "diagnostic", "{key}");
        assert_eq!(sensor_of(key)["state_class"], "measurement", "{key}");
    }
    let unique: HashSet<&str> = configs
        .values()
        .map(|c| c["unique_id"].as_str().unwrap())
        .collect();
    assert_eq!(unique.len(), configs.len(), "unique ids are unique");

    // Samples flow; the retained state topic names the current class, one of the options.
    let samples = stream(60);
    for (i, s) in samples.iter().enumerate() {
        ha.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("h{i}")),
        );
    }
    let state_topic = class_sensor["state_topic"].as_str().unwrap();
    let m = ha.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "predictions_total") >= 60.0)
    });
    let m = last_metrics(&m, &metrics).expect("metrics");
    assert!(num(&m, "predictions_total") >= 60.0, "{m}");
    let state: Value = serde_json::from_str(&mosquitto_sub_one(broker.port, state_topic)).unwrap();
    let raw = state["name"].as_str().unwrap().to_string();
    assert!(class_names.contains(&human_names(&[raw])[0]), "{state}");

    // The "Training" switch: off sends `pause`, on sends `resume`, and its state is read off
    // the `paused` metric (shown at once, optimistically, until the metrics confirm it).
    let buttons = by_component("button");
    let names: HashSet<&str> = buttons
        .iter()
        .map(|b| b["payload_press"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["checkpoint", "export"]),
        "reset is opt-in; pause and resume are the switch"
    );
    let switches = by_component("switch");
    assert_eq!(switches.len(), 1);
    let training = switches[0];
    assert_eq!(training["name"], "Training");
    assert_eq!(training["state_topic"], metrics.as_str());
    assert_eq!(
        training["value_template"],
        "{{ 'ON' if value_json.paused == 0 else 'OFF' }}"
    );
    assert_eq!(training["optimistic"], true);
    let command = training["command_topic"].as_str().unwrap();
    ha.publish(command, training["payload_off"].as_str().unwrap());
    let got = ha.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "paused") == 1.0)
    });
    assert_eq!(num(&last_metrics(&got, &metrics).unwrap(), "paused"), 1.0);
    ha.publish(command, training["payload_on"].as_str().unwrap());
    let got = ha.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "paused") == 0.0)
    });
    assert_eq!(num(&last_metrics(&got, &metrics).unwrap(), "paused"), 0.0);
    // A command `[control] allow` does not list is refused, and now counted where HA shows it.
    ha.publish(command, "reset");
    let got = ha.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "commands_refused_total") == 1.0)
    });
    let m = last_metrics(&got, &metrics).expect("metrics");
    assert_eq!(num(&m, "commands_refused_total"), 1.0, "{m}");

    // The label request's sensor says "none" or the served model's guess; its select
    // answers it with a class name.
    let request = sensors
        .iter()
        .find(|c| c["state_topic"] == format!("{prefix}/label_request"))
        .expect("a sensor for the open label request");
    assert_eq!(request["options"].as_array().unwrap().len(), 7, "{request}");
    let selects = by_component("select");
    let answer = selects
        .iter()
        .find(|c| c["command_topic"] == format!("{prefix}/label_request/answer"))
        .expect("a select that answers the label request");
    assert_eq!(answer["options"].as_array().unwrap().len(), 7);

    // Picking a class in the select labels the samples of the last seconds by name. The
    // selects always show a neutral option (their state is the status topic, through a
    // constant template), so they never read like the current activity, and picking the
    // same class again is a change HA's frontend sends.
    let select = selects
        .iter()
        .find(|c| c["command_topic"] == format!("{prefix}/labels"))
        .expect("a select that labels the current activity");
    for s in [select, answer] {
        let options = s["options"].as_array().unwrap();
        assert_eq!(options.len(), 7);
        assert_eq!(options[0], NEUTRAL_OPTION);
        assert_eq!(&options[1..], class_sensor["options"].as_array().unwrap());
        assert_eq!(s["state_topic"], format!("{prefix}/status"));
        assert_eq!(s["value_template"], format!("{{{{ '{NEUTRAL_OPTION}' }}}}"));
        assert!(s.get("optimistic").is_none(), "{s}");
        // The human name picked goes out as the raw one.
        assert!(s["command_template"]
            .as_str()
            .unwrap()
            .contains(r#""Sitting":"SITTING""#));
    }
    ha.publish(select["command_topic"].as_str().unwrap(), "SITTING");
    let got = ha.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "feedback_total") >= 60.0)
    });
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(
        num(&m, "feedback_total"),
        60.0,
        "all 60 recent samples labelled: {m}"
    );
    let recent = num(&m, "feedback_accuracy_recent");
    assert!((0.0..=1.0).contains(&recent), "{m}");
    assert!(daemon.terminate().0.success());
}

#[test]
fn a_restart_with_fewer_commands_allowed_takes_back_the_entities_it_no_longer_announces() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/fewer";
    let topic = |component: &str, key: &str| {
        format!("homeassistant/{component}/edgemt_edgemt_test_fewer/{key}/config")
    };
    let all = daemon_config(dir.path(), &broker, prefix, "");
    let ha = MqttPeer::connect(broker.port, "home-assistant", &["homeassistant/#"]);
    let mut daemon = Daemon::start(&all, &[]);
    let expected = expected_discovery(prefix, &ControlConfig::default().allow);
    let got = ha.collect_until(Duration::from_secs(15), |m| m.len() >= expected);
    let (configs, _) = discovery_of(&got);
    for t in [topic("switch", "paused"), topic("button", "export")] {
        assert!(configs.contains_key(&t), "{t} announced at first");
    }
    assert!(daemon.terminate().0.success());

    // The same daemon, now allowed only `checkpoint`.
    let dir2 = tempdir();
    let fewer = daemon_config(
        dir2.path(),
        &broker,
        prefix,
        "[control]\nallow = [\"checkpoint\"]\n",
    );
    let mut daemon = Daemon::start(&fewer, &[]);
    let gone = [
        topic("switch", "paused"),
        topic("button", "export"),
        topic("button", "pause"),
        topic("button", "resume"),
    ];
    let got = ha.collect_until(Duration::from_secs(15), |m| {
        gone.iter()
            .all(|t| m.iter().any(|(topic, p)| topic == t && p.is_empty()))
    });
    let (_, removed) = discovery_of(&got);
    for t in &gone {
        assert!(removed.contains(t), "an empty config for {t}: {removed:?}");
    }

    // What Home Assistant finds retained now: the read-only "Training" and the checkpoint
    // button, and nothing of the switch or the export button.
    let late = MqttPeer::connect(broker.port, "home-assistant-2", &["homeassistant/#"]);
    let expected = expected_discovery(prefix, &[edgemt::daemon::config::Command::Checkpoint]);
    let got = late.collect_until(Duration::from_secs(10), |m| m.len() >= expected);
    let (retained, _) = discovery_of(&got);
    let training = &retained[&topic("binary_sensor", "paused")];
    assert_eq!(training["name"], "Training");
    assert!(training.get("command_topic").is_none());
    assert!(retained.contains_key(&topic("button", "checkpoint")));
    for t in &gone {
        assert!(!retained.contains_key(t), "{t} still retained");
    }
    assert!(daemon.terminate().0.success());
}

#[test]
fn accuracy_on_labels_counts_labels_inside_samples_and_survives_a_restart() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/accuracy";
    let ck = dir.path().join("ck");
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        &format!("[input]\ninline_labels = true\n[checkpoint]\ndir = {ck:?}\nmin_interval_s = 0\n"),
    );
    let metrics = format!("{prefix}/metrics");
    let predictions = format!("{prefix}/predictions");
    let peer = MqttPeer::connect(broker.port, "labeller", &[&metrics, &predictions]);
    let mut daemon = Daemon::start(&cfg, &[]);
    peer.collect_until(Duration::from_secs(15), |m| on(m, &metrics).count() > 0);
    // 60 samples; every 20th carries its label inside the sample.
    let samples = stream(60);
    for (i, s) in samples.iter().enumerate() {
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("a{i}")),
        );
    }
    let got = peer.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics).is_some_and(|v| {
            // Scored by the trainer, which may lag the predictions: all three labels in.
            num(&v, "predictions_total") >= 60.0
                && num(&v, "labels_total") >= 3.0
                && v["feedback_accuracy"].is_number()
        })
    });
    let labeled: Vec<usize> = (0..60)
        .filter(|&i| samples[i].get("label").is_some())
        .collect();
    assert_eq!(labeled.len(), 3);
    let answered = |id: &str| -> u64 {
        on(&got, &predictions)
            .map(|p| serde_json::from_str::<Value>(&p).unwrap())
            .find(|p| p["id"] == id)
            .map(|p| p["class"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no prediction for {id}"))
    };
    let right = labeled
        .iter()
        .filter(|&&i| Some(answered(&format!("a{i}"))) == samples[i]["label"].as_u64())
        .count();
    let m = last_metrics(&got, &metrics).unwrap();
    assert!(
        num(&m, "labels_total") >= 3.0,
        "all three labels scored: {m}"
    );
    assert_eq!(num(&m, "feedback_accuracy"), right as f64 / 3.0, "{m}");
    assert_eq!(
        num(&m, "feedback_total"),
        0.0,
        "no label came after its sample"
    );
    assert!(daemon.terminate().0.success());

    // Restarted from the final checkpoint: the same accuracy before any new label.
    let mut daemon = Daemon::start(&cfg, &[]);
    let got = peer.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics).is_some_and(|v| {
            num(&v, "predictions_total") == 0.0 && v["feedback_accuracy"].is_number()
        })
    });
    let m = last_metrics(&got, &metrics).unwrap();
    assert_eq!(num(&m, "feedback_accuracy"), right as f64 / 3.0, "{m}");
    assert!(daemon.terminate().0.success());
}

/// `GET path` on 127.0.0.1:`port`; returns (status line, body).
fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn the_prometheus_endpoint_serves_edgemt_series_that_the_official_parser_accepts() {
    let Some(python) = util::venv_python() else {
        panic!("tools/.venv is missing: run tools/setup.sh");
    };
    let dir = tempdir();
    let broker = Broker::start();
    let port = free_port();
    let prefix = "edgemt-test/prom";
    let cfg = daemon_config(dir.path(), &broker, prefix, "");
    table_keys(
        &cfg,
        "metrics",
        &format!("prometheus = \"127.0.0.1:{port}\"\n"),
    );
    let mut daemon = Daemon::start(&cfg, &[]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "scraper", &[&metrics]);
    // The daemon is subscribed once it publishes metrics.
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    for (i, s) in stream(40).iter().enumerate() {
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("p{i}")),
        );
    }
    peer.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "predictions_total") >= 40.0)
    });
    let (status, body) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(http_get(port, "/other").0.split(' ').nth(1), Some("404"));

    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out[s.name + json.dumps(s.labels, sort_keys=True)] = [fam.type, s.value]
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser rejected the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: HashMap<String, (String, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        parsed.keys().all(|k| k.starts_with("edgemt_")),
        "{parsed:?}"
    );
    let value = |k: &str| {
        parsed
            .get(&format!("{k}{{}}"))
            .unwrap_or_else(|| panic!("no {k}"))
            .1
    };
    assert_eq!(value("edgemt_samples_total"), 40.0);
    assert_eq!(value("edgemt_predictions_total"), 40.0);
    assert_eq!(value("edgemt_prediction_latency_seconds_count"), 40.0);
    assert!(value("edgemt_resident_memory_bytes") > 1e6);
    assert!(value("edgemt_uptime_seconds") > 0.0);
    assert_eq!(parsed["edgemt_samples_total{}"].0, "counter");
    assert_eq!(
        parsed["edgemt_prediction_latency_seconds_count{}"].0,
        "histogram"
    );
    assert!(daemon.terminate().0.success());
}
