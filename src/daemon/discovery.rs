//! Home Assistant MQTT discovery: what edgemt announces (retained, at every connection) so
//! that Home Assistant shows it as one device with sensors, buttons and a labelling select,
//! without any YAML.
//!
//! Built as plain (topic, JSON) pairs so the messages can be checked against HA's documented
//! schema without a broker. Conventions followed (HA's MQTT docs): the device name is
//! prefixed to entity names, so entity names do not repeat it; every numeric sensor has a
//! `state_class` (else HA keeps no long-term statistics); counters are `total_increasing`;
//! internals (losses, counters, memory) are `diagnostic`; ratios are shown in %; a JSON null
//! renders as `None`, which HA shows as unknown.

use serde_json::{json, Value};

use super::config::Command;
use super::ingest::Topics;

/// What discovery needs to know about this daemon.
pub struct Announce<'a> {
    pub discovery_prefix: &'a str,
    pub client_id: &'a str,
    pub topics: &'a Topics,
    pub class_names: &'a [String],
    pub commands: &'a [Command],
    /// The model file's name, shown as the device's model.
    pub model: &'a str,
}

/// A sensor read off the metrics message.
struct Metric {
    key: &'static str,
    name: &'static str,
    kind: Kind,
}

enum Kind {
    /// A gauge, with its unit and device class if any.
    Gauge(Option<&'static str>, Option<&'static str>),
    /// A 0..1 ratio shown in %.
    Percent,
    /// A monotonic counter (resets on restart are fine for `total_increasing`).
    Counter,
    /// Microseconds shown as milliseconds (a `duration`).
    Millis,
}

const METRICS: &[(Metric, bool)] = &[
    // (metric, diagnostic)
    (
        m(
            "samples_per_s",
            "Sample rate",
            Kind::Gauge(Some("samples/s"), None),
        ),
        false,
    ),
    (m("latency_p50_us", "Latency p50", Kind::Millis), false),
    (m("latency_p99_us", "Latency p99", Kind::Millis), false),
    (
        m("feedback_accuracy", "Accuracy on labels", Kind::Percent),
        false,
    ),
    (
        m(
            "feedback_accuracy_recent",
            "Accuracy on recent labels",
            Kind::Percent,
        ),
        false,
    ),
    (
        m(
            "pseudo_acceptance",
            "Pseudo-label acceptance",
            Kind::Percent,
        ),
        true,
    ),
    (m("teacher_version", "Teacher version", Kind::Counter), true),
    (
        m("gate_p", "Serving gate p-value", Kind::Gauge(None, None)),
        true,
    ),
    (
        m("loss_sup", "Supervised loss", Kind::Gauge(None, None)),
        true,
    ),
    (
        m("loss_pseudo", "Pseudo-label loss", Kind::Gauge(None, None)),
        true,
    ),
    (
        m(
            "loss_consistency",
            "Consistency loss",
            Kind::Gauge(None, None),
        ),
        true,
    ),
    (m("predictions_total", "Predictions", Kind::Counter), true),
    (m("dropped_total", "Dropped samples", Kind::Counter), true),
    (
        m("rejected_total", "Rejected messages", Kind::Counter),
        true,
    ),
    (
        m("mqtt_reconnects_total", "Broker reconnects", Kind::Counter),
        true,
    ),
    (m("rollbacks_total", "Rollbacks", Kind::Counter), true),
    (
        m(
            "rss_bytes",
            "Memory",
            Kind::Gauge(Some("B"), Some("data_size")),
        ),
        true,
    ),
];

const fn m(key: &'static str, name: &'static str, kind: Kind) -> Metric {
    Metric { key, name, kind }
}

/// 0/1 metrics shown as binary sensors: (key, name, diagnostic).
const FLAGS: &[(&str, &str, bool)] = &[
    ("serving_adapted", "Serving the adapted model", false),
    ("paused", "Training paused", false),
    ("teacher_finite", "Weights finite", true),
];

impl Announce<'_> {
    fn node(&self) -> String {
        self.client_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    }

    /// The fields every entity shares: device, origin, availability, unique id.
    fn base(&self, key: &str, name: &str) -> Value {
        let node = self.node();
        json!({
            "name": name,
            "unique_id": format!("{node}_{key}"),
            "availability_topic": self.topics.status,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {
                "identifiers": [node],
                "name": self.client_id,
                "manufacturer": "edgemt",
                "model": format!("edgemt adaptive classifier ({})", self.model),
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
            "origin": {
                "name": "edgemt",
                "sw_version": env!("CARGO_PKG_VERSION"),
            },
        })
    }

    fn topic(&self, component: &str, key: &str) -> String {
        format!(
            "{}/{component}/{}/{key}/config",
            self.discovery_prefix,
            self.node()
        )
    }

    /// Every discovery message, as (config topic, payload).
    pub fn messages(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for (metric, diagnostic) in METRICS {
            let key = metric.key;
            let mut c = self.base(key, metric.name);
            c["state_topic"] = json!(self.topics.metrics);
            // `is not none` keeps a null (no data this interval) an unknown state.
            let value = |expr: &str| {
                format!("{{{{ ({expr}) if value_json.{key} is not none else none }}}}")
            };
            match metric.kind {
                Kind::Gauge(unit, device_class) => {
                    c["value_template"] = json!(value(&format!("value_json.{key}")));
                    c["state_class"] = json!("measurement");
                    if let Some(u) = unit {
                        c["unit_of_measurement"] = json!(u);
                    }
                    if let Some(d) = device_class {
                        c["device_class"] = json!(d);
                    }
                }
                Kind::Percent => {
                    c["value_template"] =
                        json!(value(&format!("(value_json.{key} * 100) | round(1)")));
                    c["state_class"] = json!("measurement");
                    c["unit_of_measurement"] = json!("%");
                }
                Kind::Counter => {
                    c["value_template"] = json!(value(&format!("value_json.{key}")));
                    c["state_class"] = json!("total_increasing");
                }
                Kind::Millis => {
                    c["value_template"] =
                        json!(value(&format!("(value_json.{key} / 1000) | round(2)")));
                    c["state_class"] = json!("measurement");
                    c["device_class"] = json!("duration");
                    c["unit_of_measurement"] = json!("ms");
                }
            }
            if *diagnostic {
                c["entity_category"] = json!("diagnostic");
            }
            out.push((self.topic("sensor", key), c));
        }
        for (key, name, diagnostic) in FLAGS {
            let mut c = self.base(key, name);
            c["state_topic"] = json!(self.topics.metrics);
            c["value_template"] = json!(format!("{{{{ value_json.{key} }}}}"));
            c["payload_on"] = json!("1");
            c["payload_off"] = json!("0");
            if *diagnostic {
                c["entity_category"] = json!("diagnostic");
            }
            out.push((self.topic("binary_sensor", key), c));
        }

        // The current activity, from the retained, rate-limited state topic.
        let mut c = self.base("class", "Activity");
        c["state_topic"] = json!(self.topics.state);
        c["value_template"] = json!("{{ value_json.name }}");
        c["device_class"] = json!("enum");
        c["options"] = json!(self.class_names);
        c["json_attributes_topic"] = json!(self.topics.state);
        out.push((self.topic("sensor", "class"), c));
        let mut c = self.base("confidence", "Activity confidence");
        c["state_topic"] = json!(self.topics.state);
        c["value_template"] = json!("{{ (value_json.confidence * 100) | round(1) }}");
        c["unit_of_measurement"] = json!("%");
        c["state_class"] = json!("measurement");
        out.push((self.topic("sensor", "confidence"), c));

        // Buttons for the commands this daemon obeys; each sends the bare command word.
        for cmd in self.commands {
            let key = cmd.name();
            let mut name = key.to_string();
            name[..1].make_ascii_uppercase();
            let mut c = self.base(key, &name);
            c["command_topic"] = json!(self.topics.cmd);
            c["payload_press"] = json!(key);
            c["entity_category"] = json!("config");
            out.push((self.topic("button", key), c));
        }

        // "What I am doing now": picking a class labels the samples of the last seconds.
        let mut c = self.base("label", "Label current activity");
        c["command_topic"] = json!(self.topics.labels);
        c["options"] = json!(self.class_names);
        c["optimistic"] = json!(true);
        out.push((self.topic("select", "label"), c));
        out
    }
}
