//! The daemon's sections of the config file: `[mqtt]` (the broker and topics), `[metrics]`
//! (the metrics message, Prometheus, the retained state), `[daemon]` (seed and systemd
//! readiness), `[control]` (remote commands) and the daemon's keys of `[input]` (payload
//! format, row windows, queues, batches, labels by class name).
//!
//! The core [`Config`] keeps these sections as written; [`DaemonConfig::from_config`] parses
//! them with the same rules as the core's: unknown keys are refused with the right ones
//! listed, values are checked naming the key, relative paths start at the config file's
//! folder.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{cfg_relative, positive, seconds, Config, ConfigError, Section};

/// Largest payload `mqtt.max_payload_bytes` may allow.
pub const MAX_PAYLOAD_BYTES: usize = 256 << 20;

/// Everything `edgemt run` reads beyond the core config.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonConfig {
    pub mqtt: MqttConfig,
    pub input: InputConfig,
    pub metrics: MetricsConfig,
    pub daemon: ServiceConfig,
    pub control: ControlConfig,
}

impl DaemonConfig {
    /// The daemon's sections of `cfg`, parsed and validated.
    pub fn from_config(cfg: &Config) -> Result<DaemonConfig, ConfigError> {
        let file = cfg.file.as_deref();
        let mut d = DaemonConfig {
            mqtt: parse_section(file, "mqtt", &cfg.mqtt)?,
            input: parse_section(file, "input", &cfg.input.daemon)?,
            metrics: parse_section(file, "metrics", &cfg.metrics)?,
            daemon: parse_section(file, "daemon", &cfg.daemon)?,
            control: parse_section(file, "control", &cfg.control)?,
        };
        if let Some(path) = &cfg.file {
            let m = &mut d.mqtt;
            for p in [
                m.password_file.as_mut(),
                m.ca_file.as_mut(),
                m.client_cert.as_mut(),
                m.client_key.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                *p = cfg_relative(path, p);
            }
        }
        d.mqtt.validate()?;
        d.input.validate()?;
        d.metrics.validate()?;
        d.daemon.validate()?;
        d.control.validate()?;
        Ok(d)
    }
}

/// One section from its table, or toml's words for what is wrong (the key, and for an
/// unknown key the ones it could have meant).
fn parse_section<T: DeserializeOwned>(
    file: Option<&Path>,
    section: &str,
    table: &toml::Table,
) -> Result<T, ConfigError> {
    toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: file.map_or_else(|| PathBuf::from("<text>"), Path::to_owned),
            message: format!("[{section}]: {}", e.message().trim_end()),
        })
}

/// `[mqtt]`: the broker connection and topic layout of `edgemt run`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Default: `edgemt-<hostname>`.
    pub client_id: Option<String>,
    /// Topic prefix. Default: `edgemt/<hostname>`.
    pub prefix: Option<String>,
    pub keep_alive_s: u64,
    pub username: Option<String>,
    /// Inline password (prefer `password_file` or `password_env`).
    pub password: Option<String>,
    /// File holding the password (e.g. a systemd credential); trailing newline ignored.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// QoS for subscriptions and publishes: 0 or 1.
    pub qos: u8,
    /// Connect with TLS (rustls, ring provider).
    pub tls: bool,
    /// PEM CA bundle that signs the broker's certificate (required with `tls`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require client authentication.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Home Assistant MQTT discovery prefix; empty disables discovery.
    pub discovery_prefix: String,
    /// Payloads larger than this are rejected (and counted).
    pub max_payload_bytes: usize,
    /// First and largest wait between reconnection attempts.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Capacity of the client's request queue; publishes beyond it are dropped and counted.
    pub request_queue: usize,
    /// With `qos = 1`, how long the broker keeps our session (subscriptions and queued
    /// messages) while we are away; 0 means a clean session on every connect.
    pub session_expiry_s: u32,
    /// How long one connection attempt may take.
    pub connect_timeout_s: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "localhost".into(),
            port: 1883,
            client_id: None,
            prefix: None,
            keep_alive_s: 30,
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            qos: 0,
            tls: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
            discovery_prefix: "homeassistant".into(),
            max_payload_bytes: 262_144,
            reconnect_min_ms: 250,
            reconnect_max_ms: 30_000,
            request_queue: 4096,
            session_expiry_s: 86_400,
            connect_timeout_s: 10,
        }
    }
}

/// How samples arrive on `{prefix}/samples`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// `{"x": [...], "id": "...", "label": k}`
    Json,
    /// Raw little-endian f32, one model input per message.
    F32le,
}

/// The daemon's keys of `[input]`: how samples arrive and queue up (the section's other keys,
/// `max_abs` and `feedback_capacity`, are the core's [`crate::config::InputConfig`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    pub format: InputFormat,
    /// Rows per window on `{prefix}/rows` (default: the model's time steps).
    pub window: Option<usize>,
    /// Rows between window starts (default: half the window).
    pub hop: Option<usize>,
    /// Samples waiting for inference; beyond it the oldest unlabeled one is dropped.
    pub queue_capacity: usize,
    /// Largest batch per backbone pass in the daemon.
    pub max_batch: usize,
    /// A label by class name (`{"class": "SITTING"}` on `{prefix}/labels`) applies to the
    /// samples of this many seconds before it.
    pub label_window_s: f64,
    /// Learn from a `"label"` inside a sample on `{prefix}/samples`. Off by default: whoever
    /// may publish samples (every sensor) could then label, and labels are a privilege (the
    /// shipped ACL gives the labels topic to labelers only). Ignored labels are counted.
    pub inline_labels: bool,
    /// The most samples one label by class name labels (the most recent of its window): one
    /// message must not label thousands of samples, whatever its `"seconds"` say.
    pub class_label_max_samples: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            format: InputFormat::Json,
            window: None,
            hop: None,
            queue_capacity: 1024,
            max_batch: 32,
            label_window_s: 10.0,
            inline_labels: false,
            class_label_max_samples: 64,
        }
    }
}

/// `[metrics]`: the periodic metrics message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub interval_s: f64,
    /// Address of a Prometheus text endpoint (`GET /metrics`), e.g. "127.0.0.1:9898"; off
    /// when unset.
    pub prometheus: Option<String>,
    /// How many of the most recent labels `feedback_accuracy_recent` covers.
    pub recent_labels: usize,
    /// Seconds between updates of the retained `{prefix}/state` (the current class), so a
    /// dashboard sees the activity without a state change per sample.
    pub state_interval_s: f64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            interval_s: 10.0,
            prometheus: None,
            recent_labels: 100,
            state_interval_s: 5.0,
        }
    }
}

/// `[daemon]`: what `edgemt run` needs beyond the broker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Seed for the learner's batch sampling and augmentation in the daemon.
    pub seed: u64,
    /// systemd hears READY=1 at the first broker connection, or after this many seconds
    /// without one (with a STATUS= line saying what is missing), so a missing broker does
    /// not make systemd kill a daemon that would serve once the broker is back.
    pub ready_timeout_s: f64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            seed: 0,
            ready_timeout_s: 30.0,
        }
    }
}

impl Section for ServiceConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        seconds("daemon.ready_timeout_s", self.ready_timeout_s, 0.0)
    }
}

/// A command on `{prefix}/cmd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Checkpoint,
    Export,
    Reset,
    /// Believe the labels label trust holds (a class really changed its meaning).
    AcceptLabels,
}

impl Command {
    pub const ALL: [Command; 6] = [
        Command::Pause,
        Command::Resume,
        Command::Checkpoint,
        Command::Export,
        Command::Reset,
        Command::AcceptLabels,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Checkpoint => "checkpoint",
            Command::Export => "export",
            Command::Reset => "reset",
            Command::AcceptLabels => "accept_labels",
        }
    }
}

/// `[control]`: which commands `{prefix}/cmd` may give. `reset` throws away everything
/// learned and `accept_labels` overrides label trust's defence, so both are opt-in; an empty list turns remote control off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub allow: Vec<Command>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            allow: vec![
                Command::Pause,
                Command::Resume,
                Command::Checkpoint,
                Command::Export,
            ],
        }
    }
}

impl Section for ControlConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

impl Section for MqttConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let m = self;
        if m.host.is_empty() {
            return Err(ConfigError::Invalid {
                key: "mqtt.host",
                message: "must not be empty".into(),
            });
        }
        if m.qos > 1 {
            return Err(ConfigError::Invalid {
                key: "mqtt.qos",
                message: format!("must be 0 or 1, got {}", m.qos),
            });
        }
        if !(5..=65_535).contains(&m.keep_alive_s) {
            return Err(ConfigError::Invalid {
                key: "mqtt.keep_alive_s",
                message: format!("must be between 5 and 65535, got {}", m.keep_alive_s),
            });
        }
        if m.tls && m.ca_file.is_none() {
            return Err(ConfigError::Invalid {
                key: "mqtt.ca_file",
                message: "is required when mqtt.tls = true".into(),
            });
        }
        if m.client_cert.is_some() != m.client_key.is_some() {
            return Err(ConfigError::Invalid {
                key: "mqtt.client_key",
                message: "client_cert and client_key go together".into(),
            });
        }
        if let Some(prefix) = &m.prefix {
            if prefix.is_empty() || prefix.contains(['#', '+']) || prefix.ends_with('/') {
                return Err(ConfigError::Invalid {
                    key: "mqtt.prefix",
                    message: format!(
                        "must be a topic without wildcards or a trailing '/', got {prefix:?}"
                    ),
                });
            }
        }
        if !(1..=MAX_PAYLOAD_BYTES).contains(&m.max_payload_bytes) {
            return Err(ConfigError::Invalid {
                key: "mqtt.max_payload_bytes",
                message: format!(
                    "must be between 1 and {MAX_PAYLOAD_BYTES}, got {}",
                    m.max_payload_bytes
                ),
            });
        }
        positive("mqtt.request_queue", m.request_queue as u64)?;
        if !(1..=600).contains(&m.connect_timeout_s) {
            return Err(ConfigError::Invalid {
                key: "mqtt.connect_timeout_s",
                message: format!("must be between 1 and 600, got {}", m.connect_timeout_s),
            });
        }
        positive("mqtt.reconnect_min_ms", m.reconnect_min_ms)?;
        if m.reconnect_max_ms < m.reconnect_min_ms {
            return Err(ConfigError::Invalid {
                key: "mqtt.reconnect_max_ms",
                message: "must be at least mqtt.reconnect_min_ms".into(),
            });
        }
        Ok(())
    }
}

impl Section for InputConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("input.queue_capacity", self.queue_capacity as u64)?;
        positive("input.max_batch", self.max_batch as u64)?;
        seconds("input.label_window_s", self.label_window_s, 0.1)?;
        positive(
            "input.class_label_max_samples",
            self.class_label_max_samples as u64,
        )?;
        if let Some(w) = self.window {
            positive("input.window", w as u64)?;
        }
        if let Some(h) = self.hop {
            positive("input.hop", h as u64)?;
        }
        Ok(())
    }
}

impl Section for MetricsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        seconds("metrics.interval_s", self.interval_s, 0.1)?;
        seconds("metrics.state_interval_s", self.state_interval_s, 0.1)?;
        positive("metrics.recent_labels", self.recent_labels as u64)?;
        if let Some(addr) = &self.prometheus {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| ConfigError::Invalid {
                    key: "metrics.prometheus",
                    message: format!(
                        "must be an address like \"127.0.0.1:9898\", got {addr:?}: {e}"
                    ),
                })?;
        }
        Ok(())
    }
}
