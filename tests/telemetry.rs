//! The telemetry table is the one description of every metric: each row reaches the MQTT
//! metrics message, the Prometheus exposition and (when it says so) Home Assistant's
//! discovery of a running daemon, nothing reaches them around it, Home Assistant shows
//! fractions with a sensible precision, and the README lists exactly the table's metrics.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::time::Duration;

use edgemt::daemon::discovery::Announce;
use edgemt::daemon::ingest::Topics;
use edgemt::daemon::prometheus::series_name;
use edgemt::daemon::queue::{BoundedQueue, Depth, Droppable};
use edgemt::daemon::telemetry::{Entity, Kind, Metric, METRICS};
use serde_json::Value;

use crate::util::broker::{
    daemon_config, free_port, last_metrics, num, on, Broker, Daemon, MqttPeer,
};
use crate::util::{sample_with_id, stream, tempdir};

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    body.to_string()
}

/// Sample name -> value, and family name -> type, of a text exposition.
fn parse_exposition(body: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (name, value) = line.rsplit_once(' ').unwrap();
            samples.insert(name.to_string(), value.parse().unwrap());
        }
    }
    (samples, types)
}

/// The discovery config announced for a metric, by component and object id.
fn discovery_for<'a>(
    configs: &'a HashMap<String, Value>,
    component: &str,
    key: &str,
) -> Option<&'a Value> {
    configs.iter().find_map(|(topic, c)| {
        let parts: Vec<&str> = topic.split('/').collect();
        (parts.get(1) == Some(&component) && parts.get(3) == Some(&key)).then_some(c)
    })
}

#[test]
fn every_metric_of_the_telemetry_table_reaches_mqtt_prometheus_and_home_assistant() {
    let dir = tempdir();
    let broker = Broker::start();
    let port = free_port();
    let prefix = "edgemt-test/telemetry";
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        &format!("prometheus = \"127.0.0.1:{port}\"\n"),
    );
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "telemetry", &["homeassistant/#", &metrics]);
    let mut daemon = Daemon::start(&cfg, &[]);
    let mut got = peer.collect_until(Duration::from_secs(15), |m| on(m, &metrics).count() > 0);

    // Predictions, then "I have been sitting": every sample gets a label, so the accuracies
    // and the gate have data and no row is left without a value.
    for (i, s) in stream(60).iter().enumerate() {
        peer.publish(
            &format!("{prefix}/samples"),
            sample_with_id(s, &format!("t{i}")),
        );
    }
    got.extend(peer.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "predictions_total") >= 60.0)
    }));
    peer.publish(&format!("{prefix}/labels"), "SITTING");
    got.extend(peer.collect_until(Duration::from_secs(15), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "feedback_total") >= 60.0)
    }));
    let message = last_metrics(&got, &metrics).expect("metrics arrive");
    let exposition = scrape(port);
    let (samples, types) = parse_exposition(&exposition);
    // (An empty payload takes back an entity this configuration does not announce.)
    let configs: HashMap<String, Value> = got
        .iter()
        .filter(|(t, p)| t.starts_with("homeassistant/") && !p.is_empty())
        .map(|(t, p)| (t.clone(), serde_json::from_slice(p).unwrap()))
        .collect();
    assert!(daemon.terminate().0.success());

    let object = message.as_object().unwrap();
    for m in METRICS {
        // MQTT: every row but the Prometheus-only ones, as a number or null.
        match object.get(m.key) {
            Some(v) => {
                assert!(m.mqtt, "{} is Prometheus-only but in MQTT", m.key);
                assert!(v.is_number() || v.is_null(), "{}: {v}", m.key);
            }
            None => assert!(!m.mqtt, "the metrics message lacks {}: {message}", m.key),
        }
        // Prometheus: the series, of the row's type.
        if let Some(series) = series_name(m) {
            assert!(
                samples.contains_key(&series),
                "no {series} for {} in the exposition:\n{exposition}",
                m.key
            );
            let kind = match m.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            // A collector's counter is typed under its sample name (`..._total`).
            assert_eq!(
                types.get(&series).map(String::as_str),
                Some(kind),
                "{series}"
            );
        }
        // Home Assistant: the entity the row describes, reading this key.
        if let Some(ha) = &m.home_assistant {
            let component = match ha.entity {
                Entity::Sensor(_) => "sensor",
                Entity::BinarySensor => "binary_sensor",
                // The daemon's default `[control] allow` has both of the switch's commands.
                Entity::Switch(_) => "switch",
            };
            let c = discovery_for(&configs, component, m.key)
                .unwrap_or_else(|| panic!("no {component} announced for {}", m.key));
            assert_eq!(c["name"], ha.name);
            assert_eq!(c["state_topic"], metrics.as_str());
            let template = c["value_template"].as_str().unwrap();
            assert!(
                template.contains(&format!("value_json.{} ", m.key)),
                "{}: {template}",
                m.key
            );
            // (A switch is a control: HA's config category.)
            assert_eq!(c["entity_category"] == "diagnostic", ha.diagnostic, "{c}");
        }
    }

    // Nothing reaches the outputs around the table.
    let table: BTreeSet<&str> = METRICS.iter().filter(|m| m.mqtt).map(|m| m.key).collect();
    let sent: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(
        sent, table,
        "the metrics message holds exactly the table's rows"
    );
    let exposed: BTreeSet<String> = METRICS.iter().filter_map(series_name).collect();
    for name in samples.keys() {
        assert!(
            exposed.contains(name) || name.starts_with("edgemt_prediction_latency_seconds"),
            "{name} is exposed but not in the table"
        );
    }
    let metric_entities = configs
        .values()
        .filter(|c| c["state_topic"] == metrics.as_str())
        .count();
    let table_entities = METRICS
        .iter()
        .filter(|m| m.home_assistant.is_some())
        .count();
    assert_eq!(metric_entities, table_entities);
}

/// Discovery for a daemon with the usual names, without a broker.
fn discovery() -> HashMap<String, Value> {
    let topics = Topics::new("edgemt/pi");
    Announce {
        discovery_prefix: "homeassistant",
        client_id: "edgemt-pi",
        topics: &topics,
        class_names: &["WALKING".to_string(), "SITTING".to_string()],
        commands: &[],
        model: "hapt_mlp.onnx",
    }
    .messages()
    .into_iter()
    .collect()
}

#[test]
fn home_assistant_shows_rates_losses_ratios_latency_and_memory_with_a_display_precision() {
    let configs = discovery();
    let sensor = |key: &str| discovery_for(&configs, "sensor", key).unwrap().clone();
    let precision = |key: &str| sensor(key)["suggested_display_precision"].as_u64();
    assert_eq!(precision("samples_per_s"), Some(1));
    for key in ["loss_sup", "loss_pseudo", "loss_consistency", "gate_p"] {
        assert_eq!(precision(key), Some(3), "{key}");
    }
    for key in [
        "feedback_accuracy",
        "feedback_accuracy_recent",
        "pseudo_acceptance",
    ] {
        assert_eq!(sensor(key)["unit_of_measurement"], "%", "{key}");
        assert_eq!(precision(key), Some(1), "{key}");
    }
    // 0.4 ms must not read "0 ms".
    for key in ["latency_p50_us", "latency_p99_us"] {
        assert_eq!(sensor(key)["unit_of_measurement"], "ms");
        assert_eq!(precision(key), Some(1), "{key}");
    }
    let memory = sensor("rss_bytes");
    assert_eq!(memory["unit_of_measurement"], "MiB");
    assert_eq!(memory["device_class"], "data_size");
    assert!(memory["value_template"]
        .as_str()
        .unwrap()
        .contains("/ 1048576"));
    assert_eq!(precision("rss_bytes"), Some(1));
}

struct Item(usize);

impl Droppable for Item {
    fn droppable(&self) -> bool {
        true
    }
    fn weight(&self) -> usize {
        self.0
    }
}

#[test]
fn a_queue_reports_its_depth_in_items_and_in_its_budget() {
    let q = BoundedQueue::new(100);
    assert_eq!(q.depth(), Depth::default());
    q.push(Item(30));
    q.push(Item(50));
    assert_eq!(q.depth(), Depth { items: 2, load: 80 });
    // A third item overflows the budget: the oldest goes.
    q.push(Item(40));
    assert_eq!(q.depth(), Depth { items: 2, load: 90 });
    let mut out = Vec::new();
    q.pop_batch(1, Duration::from_millis(10), &mut out);
    assert_eq!(q.depth(), Depth { items: 1, load: 40 });
}

/// The README's metrics table, as the telemetry table renders it.
fn readme_table() -> String {
    let mut out =
        String::from("| MQTT key | Prometheus | Home Assistant | meaning |\n|---|---|---|---|\n");
    for m in METRICS {
        let mqtt = if m.mqtt {
            format!("`{}`", m.key)
        } else {
            "–".to_string()
        };
        let prometheus = series_name(m).map_or("–".to_string(), |s| format!("`{s}`"));
        let ha = match &m.home_assistant {
            None => "–".to_string(),
            Some(ha) => format!(
                "{}{}",
                ha.name,
                if ha.diagnostic { " (diagnostic)" } else { "" }
            ),
        };
        out.push_str(&format!("| {mqtt} | {prometheus} | {ha} | {} |\n", m.help));
    }
    out
}

#[test]
fn the_readme_lists_exactly_the_metrics_of_the_telemetry_table() {
    let readme = std::fs::read_to_string(crate::util::path("README.md")).unwrap();
    let expected = readme_table();
    assert!(
        readme.contains(&expected),
        "README.md's metrics table differs from src/daemon/telemetry.rs; it should read:\n\n{expected}"
    );
    // Every row is told apart by its key.
    let keys: BTreeSet<&str> = METRICS.iter().map(|m: &Metric| m.key).collect();
    assert_eq!(keys.len(), METRICS.len(), "keys are unique");
}
