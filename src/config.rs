//! The TOML configuration: one struct per section, every key defaulted but `[model] path`.
//!
//! Loading rejects unknown keys (toml names them) and `validate` rejects out-of-range values
//! naming the key, so a typo never silently falls back to a default. Relative paths are
//! resolved against the config file's folder, so a config works from any working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointConfig;
use crate::learn::{AugmentConfig, GuardConfig, LearnConfig};

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
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub guard: GuardConfig,
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
        }
    }
}

/// `[metrics]`: the periodic metrics message.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub interval_s: f64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { interval_s: 10.0 }
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
    /// Samples per timeline entry in the report.
    pub timeline_every: usize,
    /// Seed for sampling and augmentation (`--seed` overrides it).
    pub seed: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            batch: 32,
            timeline_every: 100,
            seed: 0,
        }
    }
}

impl Config {
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

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.learn;
        check("learn.lambda_pseudo", l.lambda_pseudo, 0.0..=1e6)?;
        check("learn.alpha_consistency", l.alpha_consistency, 0.0..=1e6)?;
        check(
            "learn.confidence_threshold",
            l.confidence_threshold,
            0.0..=1.0,
        )?;
        check("learn.learning_rate", l.learning_rate, 1e-9..=10.0)?;
        check("learn.momentum", l.momentum, 0.0..=0.999_999)?;
        check("learn.anchor", l.anchor, 0.0..=1e6)?;
        check("learn.max_grad_norm", l.max_grad_norm, 0.0..=1e9)?;
        check("learn.ema_decay", l.ema_decay, 0.0..=1.0)?;
        check(
            "learn.alignment_momentum",
            l.alignment_momentum,
            0.0..=0.999_999,
        )?;
        positive("learn.ema_every", l.ema_every as usize)?;
        positive("learn.train_every", l.train_every)?;
        positive("learn.batch_labeled", l.batch_labeled)?;
        positive("learn.batch_unlabeled", l.batch_unlabeled)?;
        positive("learn.labeled_per_class", l.labeled_per_class)?;
        if l.unlabeled_capacity < l.batch_unlabeled {
            return Err(ConfigError::Invalid {
                key: "learn.unlabeled_capacity",
                message: format!(
                    "must be at least learn.batch_unlabeled ({}), got {}",
                    l.batch_unlabeled, l.unlabeled_capacity
                ),
            });
        }
        let a = &self.augment;
        check("augment.jitter", a.jitter, 0.0..=10.0)?;
        check("augment.scale", a.scale, 0.0..=10.0)?;
        if let Some(axis) = a.time_axis {
            if axis > 1 {
                return Err(ConfigError::Invalid {
                    key: "augment.time_axis",
                    message: format!("must be 0 or 1 (an axis of a rank-2 sample), got {axis}"),
                });
            }
        }
        positive("replay.batch", self.replay.batch)?;
        positive("replay.timeline_every", self.replay.timeline_every)?;
        let m = &self.mqtt;
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
        if m.keep_alive_s < 5 {
            return Err(ConfigError::Invalid {
                key: "mqtt.keep_alive_s",
                message: format!("must be at least 5, got {}", m.keep_alive_s),
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
        positive("mqtt.max_payload_bytes", m.max_payload_bytes)?;
        positive("mqtt.request_queue", m.request_queue)?;
        positive("mqtt.reconnect_min_ms", m.reconnect_min_ms as usize)?;
        if m.reconnect_max_ms < m.reconnect_min_ms {
            return Err(ConfigError::Invalid {
                key: "mqtt.reconnect_max_ms",
                message: "must be at least mqtt.reconnect_min_ms".into(),
            });
        }
        positive("input.queue_capacity", self.input.queue_capacity)?;
        positive("input.max_batch", self.input.max_batch)?;
        positive("input.feedback_capacity", self.input.feedback_capacity)?;
        if self.input.window == Some(0) {
            return Err(ConfigError::Invalid {
                key: "input.window",
                message: "must be at least 1, got 0".into(),
            });
        }
        if self.input.hop == Some(0) {
            return Err(ConfigError::Invalid {
                key: "input.hop",
                message: "must be at least 1, got 0".into(),
            });
        }
        if !(self.metrics.interval_s.is_finite() && self.metrics.interval_s >= 0.1) {
            return Err(ConfigError::Invalid {
                key: "metrics.interval_s",
                message: format!("must be at least 0.1, got {}", self.metrics.interval_s),
            });
        }
        check("guard.margin", self.guard.margin, 0.0..=1.0)?;
        check("guard.min_agreement", self.guard.min_agreement, 0.0..=1.0)?;
        check("guard.collapse_ratio", self.guard.collapse_ratio, 0.0..=1.0)?;
        positive(
            "guard.check_every_steps",
            self.guard.check_every_steps as usize,
        )?;
        positive("guard.capacity", self.guard.capacity)?;
        positive(
            "checkpoint.every_steps",
            self.checkpoint.every_steps as usize,
        )?;
        positive("checkpoint.keep", self.checkpoint.keep)?;
        if !(self.checkpoint.every_s.is_finite() && self.checkpoint.every_s >= 1.0) {
            return Err(ConfigError::Invalid {
                key: "checkpoint.every_s",
                message: format!("must be at least 1, got {}", self.checkpoint.every_s),
            });
        }
        if !(1..=16).contains(&self.model.trainable_layers) {
            return Err(ConfigError::Invalid {
                key: "model.trainable_layers",
                message: format!("must be in [1, 16], got {}", self.model.trainable_layers),
            });
        }
        if self.model.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "model.path",
                message: "must name an ONNX file".into(),
            });
        }
        Ok(())
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

fn positive(key: &'static str, v: usize) -> Result<(), ConfigError> {
    if v > 0 {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: "must be at least 1, got 0".into(),
        })
    }
}
