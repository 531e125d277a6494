//! Home Assistant MQTT discovery: what edgemt announces (retained, at every connection) so
//! that Home Assistant shows it as one device with sensors, a "Training" switch, buttons and
//! labelling selects, without any YAML; and what it takes back (an empty retained config) for
//! every entity it could announce but does not under this configuration, so a command no
//! longer allowed or a control an older version had does not linger as a dead entity.
//!
//! Built as plain (topic, JSON) pairs so the messages can be checked against HA's documented
//! schema without a broker. Conventions followed (HA's MQTT docs, and what a real HA 2026.2
//! showed): the device name is prefixed to entity names, so entity names do not repeat it;
//! every numeric sensor has a `state_class` (else HA keeps no long-term statistics) and a
//! `suggested_display_precision` (else HA shows raw floats, or "0 ms" for 0.4 ms); counters are
//! `total_increasing`; internals are `diagnostic`; ratios are shown in %; every entity has an
//! icon; classes are shown by human names ("Walking upstairs"), the raw name staying in the
//! attributes. A metric with no data this interval is `null` in the metrics message: its
//! sensor's template renders an empty string, which HA's MQTT sensor ignores, so the last
//! value stays instead of an "unknown" gap. Which metrics become entities, and how they are
//! shown, is the telemetry table's to say (`telemetry::METRICS`).

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::config::Command;
use super::ingest::Topics;
use super::telemetry::{Entity, HomeAssistant, Metric, Switch, METRICS};

/// What the labelling selects always show: picking a class is an act, not a state, so the
/// select never reads like the current activity, and picking the same class again (still
/// walking) is a change HA's frontend sends.
pub const NEUTRAL_OPTION: &str = "—";

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

    /// The fields every entity shares: device, origin, availability, unique id, icon.
    fn base(&self, key: &str, name: &str, icon: Option<&str>) -> Value {
        let node = self.node();
        let mut c = json!({
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
        });
        if let Some(icon) = icon {
            c["icon"] = json!(icon);
        }
        c
    }

    fn topic(&self, component: &str, key: &str) -> String {
        format!(
            "{}/{component}/{}/{key}/config",
            self.discovery_prefix,
            self.node()
        )
    }

    fn allows(&self, command: Command) -> bool {
        self.commands.contains(&command)
    }

    /// Whether a switch is obeyed both ways (else it is only shown, as a binary sensor).
    fn switchable(&self, s: &Switch) -> bool {
        self.allows(s.on) && self.allows(s.off)
    }

    /// A metric's entity, read off the metrics message.
    fn metric(&self, m: &Metric, ha: &HomeAssistant) -> (String, Value) {
        let key = m.key;
        let mut c = self.base(key, ha.name, ha.icon);
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
            Entity::Switch(s) => {
                c["value_template"] = json!(format!(
                    "{{{{ 'ON' if value_json.{key} == {} else 'OFF' }}}}",
                    s.on_value
                ));
                if !self.switchable(&s) {
                    // Shown, not obeyed: a binary sensor.
                    c["payload_on"] = json!("ON");
                    c["payload_off"] = json!("OFF");
                    return (self.topic("binary_sensor", key), c);
                }
                c["state_on"] = json!("ON");
                c["state_off"] = json!("OFF");
                c["command_topic"] = json!(self.topics.cmd);
                c["payload_on"] = json!(s.on.name());
                c["payload_off"] = json!(s.off.name());
                // The metrics come every few seconds; the switch shows the change at once
                // and the next metrics message confirms it.
                c["optimistic"] = json!(true);
                c["entity_category"] = json!("config");
                return (self.topic("switch", key), c);
            }
            Entity::Sensor(show) => show,
        };
        let expr = match show.scale {
            Some((op, digits)) => format!("(value_json.{key} {op}) | round({digits})"),
            None => format!("value_json.{key}"),
        };
        // A null (no data this interval) renders '', which HA's MQTT sensor ignores: the
        // last value stays, rather than an unknown state and a gap in the history graph.
        c["value_template"] = json!(format!(
            "{{{{ ({expr}) if value_json.{key} is not none else '' }}}}"
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

    /// The class names as people read them, in class order.
    fn shown_names(&self) -> Vec<String> {
        human_names(self.class_names)
    }

    /// A Jinja dict literal from raw to shown class names (`to_shown`), or back.
    fn name_map(&self, to_shown: bool) -> String {
        let pairs = self.class_names.iter().zip(self.shown_names());
        let map: serde_json::Map<String, Value> = pairs
            .map(|(raw, shown)| {
                if to_shown {
                    (raw.clone(), json!(shown))
                } else {
                    (shown, json!(raw))
                }
            })
            .collect();
        // A JSON object is a valid Jinja dict literal.
        Value::Object(map).to_string()
    }

    /// A select that sends a class name (the raw one) to `command_topic` and always shows
    /// [`NEUTRAL_OPTION`]: its state comes from the retained status topic, through a
    /// template that ignores it.
    fn class_select(&self, key: &str, name: &str, icon: &str, command_topic: &str) -> Value {
        let mut c = self.base(key, name, Some(icon));
        c["command_topic"] = json!(command_topic);
        let mut options = vec![NEUTRAL_OPTION.to_string()];
        options.extend(self.shown_names());
        c["options"] = json!(options);
        c["command_template"] = json!(format!(
            "{{{{ {}.get(value, value) }}}}",
            self.name_map(false)
        ));
        c["state_topic"] = json!(self.topics.status);
        c["value_template"] = json!(format!("{{{{ '{NEUTRAL_OPTION}' }}}}"));
        c
    }

    /// Every discovery config this configuration announces, as (config topic, payload).
    pub fn messages(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for m in METRICS {
            if let Some(ha) = &m.home_assistant {
                out.push(self.metric(m, ha));
            }
        }

        // The current activity, from the retained, rate-limited state topic, by its human
        // name; the state's JSON (with the raw `name`) is the attributes.
        let mut c = self.base("class", "Activity", Some("mdi:run"));
        c["state_topic"] = json!(self.topics.state);
        c["value_template"] = json!(format!(
            "{{{{ {}.get(value_json.name, value_json.name) }}}}",
            self.name_map(true)
        ));
        c["device_class"] = json!("enum");
        c["options"] = json!(self.shown_names());
        c["json_attributes_topic"] = json!(self.topics.state);
        out.push((self.topic("sensor", "class"), c));
        let mut c = self.base("confidence", "Activity confidence", Some("mdi:gauge"));
        c["state_topic"] = json!(self.topics.state);
        c["value_template"] = json!("{{ (value_json.confidence * 100) | round(1) }}");
        c["unit_of_measurement"] = json!("%");
        c["state_class"] = json!("measurement");
        c["suggested_display_precision"] = json!(1);
        out.push((self.topic("sensor", "confidence"), c));

        // Buttons for the commands this daemon obeys that no switch covers; each sends the
        // bare command word.
        let switched: Vec<Command> = METRICS
            .iter()
            .filter_map(|m| match m.home_assistant?.entity {
                Entity::Switch(s) if self.switchable(&s) => Some([s.on, s.off]),
                _ => None,
            })
            .flatten()
            .collect();
        for &cmd in self.commands {
            if switched.contains(&cmd) {
                continue;
            }
            let key = cmd.name();
            let mut name = key.replace('_', " ");
            name[..1].make_ascii_uppercase();
            let mut c = self.base(key, &name, Some(button_icon(cmd)));
            c["command_topic"] = json!(self.topics.cmd);
            c["payload_press"] = json!(key);
            c["entity_category"] = json!("config");
            out.push((self.topic("button", key), c));
        }

        // "What I am doing now": picking a class labels the samples of the last seconds.
        let c = self.class_select(
            "label",
            "Label current activity",
            "mdi:tag-plus-outline",
            &self.topics.labels,
        );
        out.push((self.topic("select", "label"), c));

        // The label request: what the device asks about (the served model's guess, or
        // "none"), with the request's details as attributes, and a select that answers it.
        let mut c = self.base("label_request", "Label request", Some("mdi:tag-question"));
        c["state_topic"] = json!(self.topics.label_request);
        c["value_template"] = json!(format!(
            "{{{{ {}.get(value_json.served, value_json.served) if value_json.open else 'none' }}}}",
            self.name_map(true)
        ));
        c["json_attributes_topic"] = json!(self.topics.label_request);
        c["device_class"] = json!("enum");
        let mut options = self.shown_names();
        options.push("none".into());
        c["options"] = json!(options);
        out.push((self.topic("sensor", "label_request"), c));
        let c = self.class_select(
            "label_answer",
            "Answer label request",
            "mdi:tag-arrow-right-outline",
            &self.topics.answer,
        );
        out.push((self.topic("select", "label_answer"), c));
        out
    }

    /// Config topics of entities edgemt could announce but does not under this
    /// configuration, given the `announced` ones: those of any other `[control] allow`. All
    /// commands, none, or any single one cover every entity a command adds (a switch needs
    /// both of its commands; one alone is a button, as the pause and resume buttons of
    /// earlier versions). An empty retained payload on each removes the entity from HA.
    fn removals(&self, announced: &BTreeSet<String>) -> Vec<String> {
        let singles = Command::ALL.iter().map(std::slice::from_ref);
        let possible: BTreeSet<String> = [&Command::ALL[..], &[]]
            .into_iter()
            .chain(singles)
            .flat_map(|commands| Announce { commands, ..*self }.messages())
            .map(|(t, _)| t)
            .collect();
        possible.difference(announced).cloned().collect()
    }

    /// What discovery publishes, retained, at every connection: each config, then an empty
    /// payload for each topic of [`Announce::removals`].
    pub fn retained(&self) -> Vec<(String, Vec<u8>)> {
        let configs = self.messages();
        let announced = configs.iter().map(|(t, _)| t.clone()).collect();
        let removals = self
            .removals(&announced)
            .into_iter()
            .map(|t| (t, Vec::new()));
        let configs = configs
            .into_iter()
            .map(|(t, c)| (t, c.to_string().into_bytes()));
        configs.chain(removals).collect()
    }
}

fn button_icon(cmd: Command) -> &'static str {
    match cmd {
        Command::Pause => "mdi:pause",
        Command::Resume => "mdi:play",
        Command::Checkpoint => "mdi:content-save",
        Command::Export => "mdi:export",
        Command::Reset => "mdi:restore",
        Command::AcceptLabels => "mdi:tag-check-outline",
    }
}

/// Class names as people read them: `WALKING_UPSTAIRS` → "Walking upstairs", `sit_to_stand`
/// → "Sit to stand"; a name with lower-case letters keeps its case. When two names would
/// read the same, or one would read like [`NEUTRAL_OPTION`] or "none", the raw names are
/// shown (a select's options must tell the classes apart).
pub fn human_names(names: &[String]) -> Vec<String> {
    let shown: Vec<String> = names.iter().map(|n| human_name(n)).collect();
    let distinct: BTreeSet<&str> = shown.iter().map(String::as_str).collect();
    let clash = distinct.len() != shown.len()
        || shown
            .iter()
            .any(|s| s == NEUTRAL_OPTION || s.eq_ignore_ascii_case("none") || s.is_empty());
    if clash {
        names.to_vec()
    } else {
        shown
    }
}

fn human_name(name: &str) -> String {
    let spaced = name.replace('_', " ");
    let spaced = spaced.trim();
    let shouting = !spaced.chars().any(char::is_lowercase);
    let mut out = String::with_capacity(spaced.len());
    for (i, ch) in spaced.chars().enumerate() {
        match (i, shouting) {
            (0, _) => out.extend(ch.to_uppercase()),
            (_, true) => out.extend(ch.to_lowercase()),
            (_, false) => out.push(ch),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn class_names_read_as_words_unless_two_would_read_the_same() {
        assert_eq!(
            human_names(&names(&["WALKING_UPSTAIRS", "sit_to_stand", "Lying"])),
            ["Walking upstairs", "Sit to stand", "Lying"]
        );
        assert_eq!(
            human_names(&names(&["WALKING", "Walking"])),
            ["WALKING", "Walking"]
        );
        assert_eq!(human_names(&names(&["NONE", "A"])), ["NONE", "A"]);
    }
}
