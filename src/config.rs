//! The TOML configuration of the core: one struct per section, every key defaulted but
//! `[model] path`.
//!
//! Loading rejects unknown keys (toml names them and lists the right ones) and `validate`
//! rejects out-of-range values naming the key, so a typo never silently falls back to a
//! default. Relative paths are resolved against the config file's folder, so a config works
//! from any working directory.
//!
//! The daemon's sections (`[mqtt]`, `[metrics]`, `[daemon]`, `[control]` and the daemon's
//! keys of `[input]`) belong to the daemon (`daemon::config` parses and checks them). The
//! core keeps them as written, so a build without the daemon accepts the same file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::calibration::CalibrationConfig;
use crate::checkpoint::CheckpointConfig;
use crate::learn::{
    AugmentConfig, GateConfig, GuardConfig, LearnConfig, RequestConfig, TrustConfig,
};

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
    pub input: InputConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub guard: GuardConfig,
    #[serde(default)]
    pub gate: GateConfig,
    #[serde(default)]
    pub calibration: CalibrationConfig,
    #[serde(default)]
    pub requests: RequestConfig,
    #[serde(default)]
    pub trust: TrustConfig,
    /// The daemon's sections, as written (see the module docs).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub daemon: toml::Table,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub mqtt: toml::Table,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub control: toml::Table,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub metrics: toml::Table,
    /// The file this config was read from (`None` for text): the daemon resolves its
    /// relative paths against its folder and names it in errors.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[input]`: the keys both drivers use. Replay and the daemon must refuse the same samples
/// and find late labels the same way, so these two are core; the rest of the section (how
/// samples arrive over MQTT and queue up) is the daemon's ([`DAEMON_INPUT_KEYS`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct InputConfig {
    /// Input values beyond ±this are rejected: a finite but absurd value (3e38) would drive
    /// the backbone to infinities. Generous by default, since units differ by sensor.
    pub max_abs: f32,
    /// Recent samples kept so that label feedback can find them by id.
    pub feedback_capacity: usize,
    /// The daemon's keys, as written (checked against [`DAEMON_INPUT_KEYS`]).
    #[serde(flatten)]
    pub daemon: toml::Table,
}

/// The keys of `[input]` only the daemon reads: the payload format and row windows of
/// `{prefix}/samples` and `{prefix}/rows`, its queues and batches, and the time a label by
/// class name reaches back and how many samples it may label.
/// `daemon::config::InputConfig` has exactly these fields (a test checks).
pub const DAEMON_INPUT_KEYS: [&str; 8] = [
    "format",
    "window",
    "hop",
    "queue_capacity",
    "max_batch",
    "label_window_s",
    "class_label_max_samples",
    "inline_labels",
];

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            max_abs: 1e6,
            feedback_capacity: 2048,
            daemon: toml::Table::new(),
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
    /// The model's embedding reference (made by `edgemt reference`; relative paths are
    /// relative to the config file): lets label trust tell a swap from a shift.
    #[serde(default)]
    pub reference: Option<PathBuf>,
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
                reference: None,
            },
            learn: Default::default(),
            augment: Default::default(),
            replay: Default::default(),
            input: Default::default(),
            checkpoint: Default::default(),
            guard: Default::default(),
            gate: Default::default(),
            calibration: Default::default(),
            requests: Default::default(),
            trust: Default::default(),
            daemon: Default::default(),
            mqtt: Default::default(),
            control: Default::default(),
            metrics: Default::default(),
            file: None,
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
        for p in [
            Some(&mut cfg.model.path),
            cfg.model.reference.as_mut(),
            cfg.checkpoint.dir.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *p = cfg_relative(path, p);
        }
        cfg.file = Some(path.to_owned());
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
        self.input.validate()?;
        self.checkpoint.validate()?;
        self.guard.validate()?;
        self.gate.validate()?;
        self.requests.validate()?;
        self.trust.validate()?;
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

impl Section for InputConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("input.feedback_capacity", self.feedback_capacity as u64)?;
        if !(self.max_abs.is_finite() && self.max_abs > 0.0) {
            return Err(ConfigError::Invalid {
                key: "input.max_abs",
                message: format!("must be a positive finite number, got {}", self.max_abs),
            });
        }
        if let Some(key) = self
            .daemon
            .keys()
            .find(|k| !DAEMON_INPUT_KEYS.contains(&k.as_str()))
        {
            // The same words serde uses for the other sections' unknown keys.
            let expected: Vec<String> = ["max_abs", "feedback_capacity"]
                .iter()
                .chain(&DAEMON_INPUT_KEYS)
                .map(|k| format!("`{k}`"))
                .collect();
            return Err(ConfigError::Parse {
                path: PathBuf::from("<text>"),
                message: format!(
                    "[input]: unknown field `{key}`, expected one of {}",
                    expected.join(", ")
                ),
            });
        }
        Ok(())
    }
}

impl Section for CheckpointConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("checkpoint.every_steps", self.every_steps)?;
        positive("checkpoint.keep", self.keep as u64)?;
        seconds("checkpoint.every_s", self.every_s, 1.0)?;
        seconds("checkpoint.min_interval_s", self.min_interval_s, 0.0)?;
        // Below a checkpoint a day nothing would ever be saved but at shutdown; above a
        // TiB it is not a budget.
        check(
            "checkpoint.max_mib_per_day",
            self.max_mib_per_day as f32,
            0.01..=1024.0 * 1024.0,
        )
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

impl Section for RequestConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check("requests.fraction", self.fraction as f32, 0.0..=1.0)?;
        positive("requests.max_open", self.max_open as u64)?;
        check("requests.burst", self.burst as f32, 1.0..=1e6)?;
        check("requests.explore", self.explore as f32, 0.0..=1.0)?;
        seconds("requests.open_s", self.open_s, 1.0)
    }
}

impl Section for TrustConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|message| ConfigError::Invalid {
            key: "trust",
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
        if !(self.fallback > 0.0 && self.fallback <= 1.0) {
            return Err(ConfigError::Invalid {
                key: "gate.fallback",
                message: format!("must be in (0, 1], got {}", self.fallback),
            });
        }
        positive("gate.window", self.window as u64)
    }
}

/// Longest period a config may name (about 115 days): larger values would overflow a
/// `Duration` or, near it, mean "never", which is better said by turning the feature off.
pub const MAX_SECONDS: f64 = 1e7;

/// A validated number of seconds as a `Duration` (saturating, never panicking).
pub fn duration_s(seconds: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(seconds.clamp(0.0, MAX_SECONDS)).unwrap_or_default()
}

/// `path` as written in the config file `file`: relative paths start at the file's folder.
pub fn cfg_relative(file: &Path, path: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_owned(),
    }
}

/// A number of seconds between `min` and [`MAX_SECONDS`], or an error naming `key`.
pub fn seconds(key: &'static str, v: f64, min: f64) -> Result<(), ConfigError> {
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

/// At least 1, or an error naming `key`.
pub fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
    if v > 0 {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: "must be at least 1, got 0".into(),
        })
    }
}
