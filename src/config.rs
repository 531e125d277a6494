//! The TOML configuration: one struct per section, every key defaulted but `[model] path`.
//!
//! Loading rejects unknown keys (toml names them) and `validate` rejects out-of-range values
//! naming the key, so a typo never silently falls back to a default. Relative paths are
//! resolved against the config file's folder, so a config works from any working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::calibration::CalibrationConfig;
use crate::checkpoint::CheckpointConfig;
use crate::learn::{AugmentConfig, GateConfig, GuardConfig, LearnConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub learn: LearnConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default)]
    pub replay: ReplayConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub gate: GateConfig,
    #[serde(default)]
    pub calibration: CalibrationConfig,
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

/// `[input]`: sample decoding, window assembly and queueing.
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
    /// Recent samples kept so that label feedback can find them by id.
    pub feedback_capacity: usize,
    /// Input values beyond ±this are rejected: a finite but absurd value (3e38) would drive
    /// the backbone to infinities. Generous by default, since units differ by sensor.
    pub max_abs: f32,
    /// A label by class name (`{"class": "SITTING"}` on `{prefix}/labels`) applies to the
    /// samples of this many seconds before it.
    pub label_window_s: f64,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            format: InputFormat::Json,
            window: None,
            hop: None,
            queue_capacity: 1024,
            max_batch: 32,
            feedback_capacity: 2048,
            max_abs: 1e6,
            label_window_s: 10.0,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The ONNX classifier (relative paths are relative to the config file).
    pub path: PathBuf,
    /// Which graph output holds the class scores (default: the first float output).
    #[serde(default)]
    pub output: Option<String>,
    /// Expected embedding tensor (the head's input); loading fails if it differs.
    #[serde(default)]
    pub embedding: Option<String>,
    /// Class names (default: the model's `edgemt.class_names` metadata, else class_<i>).
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// How many learned layers, counted back from the output, are trained on the device.
    #[serde(default = "one")]
    pub trainable_layers: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Samples per backbone pass while replaying.
    pub batch: usize,
    /// Samples per timeline entry in the report (and point of `--plot`'s curves).
    pub timeline_every: usize,
    /// Seed for sampling and augmentation (`--seed` overrides it).
    pub seed: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            batch: 32,
            timeline_every: 25,
            seed: 0,
        }
    }
}

/// `[daemon]`: what `edgemt run` needs beyond the broker.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Seed for the learner's batch sampling and augmentation in the daemon.
    pub seed: u64,
    /// systemd hears READY=1 at the first broker connection, or after this many seconds
    /// without one (with a STATUS= line saying what is missing), so a missing broker does
    /// not make systemd kill a daemon that would serve once the broker is back.
    pub ready_timeout_s: f64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            seed: 0,
            ready_timeout_s: 30.0,
        }
    }
}

impl Config {
    /// A config with only `[model] path` set (every other key at its default), built
    /// directly rather than through TOML text, so any path works.
    pub fn for_model(path: &Path) -> Config {
        Config {
            model: ModelConfig {
                path: path.to_owned(),
                output: None,
                embedding: None,
                class_names: None,
                trainable_layers: 1,
            },
            learn: Default::default(),
            augment: Default::default(),
            replay: Default::default(),
            daemon: Default::default(),
            mqtt: Default::default(),
            control: Default::default(),
            input: Default::default(),
            metrics: Default::default(),
            checkpoint: Default::default(),
            guard: Default::default(),
            gate: Default::default(),
            calibration: Default::default(),
        }
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        if let Some(dir) = path.parent() {
            for p in [
                Some(&mut cfg.model.path),
                cfg.mqtt.password_file.as_mut(),
                cfg.mqtt.ca_file.as_mut(),
                cfg.mqtt.client_cert.as_mut(),
                cfg.mqtt.client_key.as_mut(),
                cfg.checkpoint.dir.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text (paths stay as written).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Validates every section, then what spans sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.learn.validate()?;
        self.augment.validate()?;
        self.replay.validate()?;
        self.daemon.validate()?;
        self.mqtt.validate()?;
        self.control.validate()?;
        self.input.validate()?;
        self.metrics.validate()?;
        self.checkpoint.validate()?;
        self.guard.validate()?;
        self.gate.validate()?;
        self.calibration.validate_section()
    }
}

/// A config section that checks its own values, naming the key that is wrong.
pub trait Section {
    fn validate(&self) -> Result<(), ConfigError>;
}

impl Section for ModelConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=16).contains(&self.trainable_layers) {
            return Err(ConfigError::Invalid {
                key: "model.trainable_layers",
                message: format!("must be in [1, 16], got {}", self.trainable_layers),
            });
        }
        if self.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "model.path",
                message: "must name an ONNX file".into(),
            });
        }
        Ok(())
    }
}

impl Section for LearnConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let l = self;
        check("learn.lambda_pseudo", l.lambda_pseudo, 0.0..=1e6)?;
        check("learn.alpha_consistency", l.alpha_consistency, 0.0..=1e6)?;
        check(
            "learn.confidence_threshold",
            l.confidence_threshold,
            0.0..=1.0,
        )?;
        check("learn.learning_rate", l.learning_rate, 1e-9..=10.0)?;
        check("learn.momentum", l.momentum, 0.0..=0.999_999)?;
        check("learn.adam_beta1", l.adam_beta1, 0.0..=0.999_999)?;
        check("learn.adam_beta2", l.adam_beta2, 0.0..=0.999_999_9)?;
        check("learn.adam_eps", l.adam_eps, 1e-12..=1.0)?;
        check("learn.anchor", l.anchor, 0.0..=1e6)?;
        check("learn.diversity", l.diversity, 0.0..=1e6)?;
        check("learn.max_grad_norm", l.max_grad_norm, 0.0..=1e9)?;
        check("learn.ema_decay", l.ema_decay, 0.0..=1.0)?;
        check(
            "learn.alignment_momentum",
            l.alignment_momentum,
            0.0..=0.999_999,
        )?;
        positive("learn.ema_every", l.ema_every)?;
        positive("learn.train_every", l.train_every as u64)?;
        positive("learn.batch_labeled", l.batch_labeled as u64)?;
        positive("learn.batch_unlabeled", l.batch_unlabeled as u64)?;
        positive("learn.labeled_per_class", l.labeled_per_class as u64)?;
        if l.unlabeled_capacity < l.batch_unlabeled {
            return Err(ConfigError::Invalid {
                key: "learn.unlabeled_capacity",
                message: format!(
                    "must be at least learn.batch_unlabeled ({}), got {}",
                    l.batch_unlabeled, l.unlabeled_capacity
                ),
            });
        }
        Ok(())
    }
}

impl Section for AugmentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check("augment.jitter", self.jitter, 0.0..=10.0)?;
        check("augment.scale", self.scale, 0.0..=10.0)?;
        if let Some(axis) = self.time_axis {
            if axis > 1 {
                return Err(ConfigError::Invalid {
                    key: "augment.time_axis",
                    message: format!("must be 0 or 1 (an axis of a rank-2 sample), got {axis}"),
                });
            }
        }
        Ok(())
    }
}

impl Section for ReplayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("replay.batch", self.batch as u64)?;
        positive("replay.timeline_every", self.timeline_every as u64)
    }
}

impl Section for DaemonConfig {
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
}

impl Command {
    pub const ALL: [Command; 5] = [
        Command::Pause,
        Command::Resume,
        Command::Checkpoint,
        Command::Export,
        Command::Reset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Checkpoint => "checkpoint",
            Command::Export => "export",
            Command::Reset => "reset",
        }
    }
}

/// `[control]`: which commands `{prefix}/cmd` may give. `reset` throws away everything
/// learned, so it is opt-in; an empty list turns remote control off.
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
        positive("input.feedback_capacity", self.feedback_capacity as u64)?;
        seconds("input.label_window_s", self.label_window_s, 0.1)?;
        if !(self.max_abs.is_finite() && self.max_abs > 0.0) {
            return Err(ConfigError::Invalid {
                key: "input.max_abs",
                message: format!("must be a positive finite number, got {}", self.max_abs),
            });
        }

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

impl Section for CheckpointConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("checkpoint.every_steps", self.every_steps)?;
        positive("checkpoint.keep", self.keep as u64)?;
        seconds("checkpoint.every_s", self.every_s, 1.0)
    }
}

impl Section for GuardConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check("guard.margin", self.margin, 0.0..=1.0)?;
        check("guard.min_agreement", self.min_agreement, 0.0..=1.0)?;
        check("guard.collapse_ratio", self.collapse_ratio, 0.0..=1.0)?;
        positive("guard.check_every_steps", self.check_every_steps)?;
        positive("guard.capacity", self.capacity as u64)
    }
}

impl CalibrationConfig {
    /// What can be checked without the model (channel indices are checked against the
    /// model's input when the session starts).
    fn validate_section(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let most = self
            .polar
            .iter()
            .chain(&self.axial)
            .flatten()
            .copied()
            .max()
            .unwrap_or(0);
        self.validate(most + 1)
            .map_err(|message| ConfigError::Invalid {
                key: "calibration",
                message,
            })
    }
}

impl Section for GateConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(ConfigError::Invalid {
                key: "gate.alpha",
                message: format!("must be in (0, 1), got {}", self.alpha),
            });
        }
        positive("gate.window", self.window as u64)
    }
}

/// Longest period a config may name (about 115 days): larger values would overflow a
/// `Duration` or, near it, mean "never", which is better said by turning the feature off.
pub const MAX_SECONDS: f64 = 1e7;

/// Largest payload `mqtt.max_payload_bytes` may allow.
pub const MAX_PAYLOAD_BYTES: usize = 256 << 20;

/// A validated number of seconds as a `Duration` (saturating, never panicking).
pub fn duration_s(seconds: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(seconds.clamp(0.0, MAX_SECONDS)).unwrap_or_default()
}

fn seconds(key: &'static str, v: f64, min: f64) -> Result<(), ConfigError> {
    if v.is_finite() && (min..=MAX_SECONDS).contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: format!("must be between {min} and {MAX_SECONDS} seconds, got {v}"),
        })
    }
}

fn check(
    key: &'static str,
    v: f32,
    range: std::ops::RangeInclusive<f32>,
) -> Result<(), ConfigError> {
    if v.is_finite() && range.contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: format!("must be in [{}, {}], got {v}", range.start(), range.end()),
        })
    }
}

fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
    if v > 0 {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: "must be at least 1, got 0".into(),
        })
    }
}
