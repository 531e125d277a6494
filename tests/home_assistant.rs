//! edgemt as Home Assistant and Prometheus see it, against a real mosquitto: every discovery
//! message checked against HA's documented MQTT schema, the buttons and the labelling select
//! steering the daemon, the retained current-activity topic, and the Prometheus endpoint read
//! by the official Python client's text-format parser.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::time::Duration;

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
    match component {
        "sensor" => check_sensor(topic, c),
        "button" => {
            assert!(c["command_topic"].is_string() && c["payload_press"].is_string());
        }
        "select" => {
            assert!(c["command_topic"].is_string() && c["options"].is_array());
        }
        "binary_sensor" => assert!(c["state_topic"].is_string()),
        _ => {}
    }
}

#[test]
fn home_assistant_discovery_follows_its_schema_and_its_buttons_and_select_steer_the_daemon() {
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
    let got = ha.collect_until(Duration::from_secs(15), |m| {
        m.iter()
            .filter(|(t, _)| t.starts_with("homeassistant/"))
            .count()
            >= 31
            && last_metrics(m, &metrics).is_some()
    });
    let configs: HashMap<String, Value> = got
        .iter()
        .filter(|(t, _)| t.starts_with("homeassistant/"))
        .map(|(t, p)| {
            (
                t.clone(),
                serde_json::from_slice(p).expect("discovery is JSON"),
            )
        })
        .collect();
    let device_name = "edgemt-edgemt-test-ha";
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
    assert!(last_metrics(&m, &metrics).is_some());
    let state: Value = serde_json::from_str(&mosquitto_sub_one(broker.port, state_topic)).unwrap();
    assert!(
        class_names.contains(&state["name"].as_str().unwrap().to_string()),
        "{state}"
    );

    // Pressing the pause button sends its payload to its command topic: the daemon pauses.
    let buttons = by_component("button");
    let names: HashSet<&str> = buttons
        .iter()
        .map(|b| b["payload_press"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["pause", "resume", "checkpoint", "export"]),
        "reset is opt-in"
    );
    let pause = buttons
        .iter()
        .find(|b| b["payload_press"] == "pause")
        .unwrap();
    ha.publish(
        pause["command_topic"].as_str().unwrap(),
        pause["payload_press"].as_str().unwrap(),
    );
    let got = ha.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "paused") == 1.0)
    });
    assert_eq!(num(&last_metrics(&got, &metrics).unwrap(), "paused"), 1.0);

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
    assert_eq!(answer["options"].as_array().unwrap().len(), 6);

    // Picking a class in the select labels the samples of the last seconds by name.
    let select = selects
        .iter()
        .find(|c| c["command_topic"] == format!("{prefix}/labels"))
        .expect("a select that labels the current activity");
    assert_eq!(select["options"].as_array().unwrap().len(), 6);
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
