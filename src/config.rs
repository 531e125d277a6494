//! The TOML configuration: one struct per section, every key defaulted but `[model] path`.
//!
//! Loading rejects unknown keys (toml names them) and `validate` rejects out-of-range values
//! naming the key, so a typo never silently falls back to a default. Relative paths are
//! resolved against the config file's folder, so a config works from any working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::learn::{AugmentConfig, LearnConfig};

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
        if cfg.model.path.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.model.path = dir.join(&cfg.model.path);
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
