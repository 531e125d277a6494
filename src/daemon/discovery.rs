//! Home Assistant MQTT discovery: what edgemt announces (retained, at every connection) so
//! that Home Assistant shows it as one device with sensors, buttons and a labelling select,
//! without any YAML.
//!
//! Built as plain (topic, JSON) pairs so the messages can be checked against HA's documented
//! schema without a broker. Conventions followed (HA's MQTT docs): the device name is
//! prefixed to entity names, so entity names do not repeat it; every numeric sensor has a
//! `state_class` (else HA keeps no long-term statistics); counters are `total_increasing`;
//! internals (losses, counters, memory) are `diagnostic`; ratios are shown in %; a JSON null
//! renders as `None`, which HA shows as unknown. Which metrics become entities, and how they
//! are shown, is the telemetry table's to say (`telemetry::METRICS`).

use serde_json::{json, Value};

use super::config::Command;
use super::ingest::Topics;
use super::telemetry::{Entity, HomeAssistant, Metric, METRICS};

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

    /// A metric's sensor or binary sensor, read off the metrics message.
    fn metric(&self, m: &Metric, ha: &HomeAssistant) -> (String, Value) {
        let key = m.key;
        let mut c = self.base(key, ha.name);
        c["state_topic"] = json!(self.topics.metrics);
        if ha.diagnostic {
            c["entity_category"] = json!("diagnostic");
        }
        let show = match ha.entity {
            Entity::BinarySensor => {
                c["value_template"] = json!(format!("{{{{ value_json.{key} }}}}"));
                c["payload_on"] = json!("1");
                c["payload_off"] = json!("0");
                return (self.topic("binary_sensor", key), c);
            }
            Entity::Sensor(show) => show,
        };
        let expr = match show.scale {
            Some((op, digits)) => format!("(value_json.{key} {op}) | round({digits})"),
            None => format!("value_json.{key}"),
        };
        // `is not none` keeps a null (no data this interval) an unknown state.
        c["value_template"] = json!(format!(
            "{{{{ ({expr}) if value_json.{key} is not none else none }}}}"
        ));
        c["state_class"] = json!(m.ha_state_class().as_str());
        if let Some(unit) = show.unit {
            c["unit_of_measurement"] = json!(unit);
        }
        if let Some(class) = show.device_class {
            c["device_class"] = json!(class);
        }
        if let Some(digits) = show.precision {
            c["suggested_display_precision"] = json!(digits);
        }
        (self.topic("sensor", key), c)
    }

    /// Every discovery message, as (config topic, payload).
    pub fn messages(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for m in METRICS {
            if let Some(ha) = &m.home_assistant {
                out.push(self.metric(m, ha));
            }
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
        c["suggested_display_precision"] = json!(1);
        out.push((self.topic("sensor", "confidence"), c));

        // Buttons for the commands this daemon obeys; each sends the bare command word.
        for cmd in self.commands {
            let key = cmd.name();
            let mut name = key.replace('_', " ");
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

        // The label request: what the device asks about (the served model's guess, or
        // "none"), with the request's details as attributes, and a select that answers it.
        let mut c = self.base("label_request", "Label request");
        c["state_topic"] = json!(self.topics.label_request);
        c["value_template"] = json!("{{ value_json.served if value_json.open else 'none' }}");
        c["json_attributes_topic"] = json!(self.topics.label_request);
        c["device_class"] = json!("enum");
        let mut options = self.class_names.to_vec();
        options.push("none".into());
        c["options"] = json!(options);
        c["icon"] = json!("mdi:tag-question");
        out.push((self.topic("sensor", "label_request"), c));
        let mut c = self.base("label_answer", "Answer label request");
        c["command_topic"] = json!(self.topics.answer);
        c["options"] = json!(self.class_names);
        c["optimistic"] = json!(true);
        out.push((self.topic("select", "label_answer"), c));
        out
    }
}
