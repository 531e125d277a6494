//! Durable learner state: checkpoints that survive power loss.
//!
//! A checkpoint is two files in one directory ([`store`]): `ckpt-<seq>.safetensors`, every
//! tensor of a [`LearnerState`] written by [`codec`] with the `safetensors` crate, and
//! `ckpt-<seq>.json`, the [`manifest`] with counters, the model's fingerprint, shapes, the
//! config hash and the SHA-256 of the tensor file. The manifest is written last, so a
//! manifest that exists names a complete tensor file; on start the newest checkpoint that
//! passes every check is restored and anything corrupted, truncated or foreign is refused
//! with the reason. How often saves happen is the session's checkpoint policy (steps, time,
//! a minimum interval); how many bytes a day they may write is [`budget`]'s.
//!
//! [`LearnerState`]: crate::learn::LearnerState

pub mod budget;
pub mod codec;
pub mod lock;
pub mod manifest;
pub mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

// The manifest stores the adopted mounting; calibration owns its type.
pub use crate::calibration::MountingRecord;
pub use budget::{CheckpointWriter, Offered, WriteBudget, WriterTotals};
pub use manifest::{config_hash, Manifest};
pub use store::{CheckpointStore, Restored};

use crate::learn::LearnerState;
use crate::model::export::InputTransform;
use crate::nn::Params;

/// A checkpoint's worth of session state: what the learner learned, the adopted mounting, and
/// how the device's answers fared against the labels so far.
#[derive(Debug, Clone)]
pub struct Saved {
    pub learner: LearnerState,
    pub mounting: Option<MountingRecord>,
    pub label_accuracy: crate::scores::Accuracy,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {name} refused: {reason}")]
    Refused { name: String, reason: String },
    #[error("refusing to write a checkpoint: {0}")]
    Unwritable(String),
}

/// `[checkpoint]`: where, how often, and how many bytes a day (the shipped
/// config/edgemt.toml gives the arithmetic behind the defaults).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory for checkpoints. Default for `edgemt run`: $STATE_DIRECTORY (systemd's
    /// StateDirectory) when set, else no checkpoints. `replay --checkpoint DIR` overrides.
    pub dir: Option<PathBuf>,
    /// Save after this many student steps...
    pub every_steps: u64,
    /// ...or this many seconds (when anything changed), whichever comes first...
    pub every_s: f64,
    /// ...but never sooner than this many seconds after the last save. A `checkpoint`
    /// command and a reset do not wait for it; the final save at shutdown neither.
    pub min_interval_s: f64,
    /// Checkpoint bytes a day at most, in MiB, on average (an hour's worth may go at once).
    /// Every save counts, the final one at shutdown too, which alone may exceed it.
    pub max_mib_per_day: f64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: None,
            every_steps: 100,
            every_s: 3600.0,
            min_interval_s: 600.0,
            max_mib_per_day: 64.0,
            keep: 3,
        }
    }
}

/// What export folds in front of the graph for a mounting the manifest recorded.
impl<'a> From<&'a MountingRecord> for InputTransform<'a> {
    fn from(m: &'a MountingRecord) -> Self {
        InputTransform {
            name: &m.name,
            channel_axis: m.channel_axis,
            channel_matrix: &m.channel_matrix,
        }
    }
}

/// What a checkpoint must match to be restored: the model and the shapes it implies.
#[derive(Debug, Clone)]
pub struct Identity {
    pub model_fingerprint: u64,
    pub model_path: PathBuf,
    pub config_hash: String,
    pub classes: usize,
    pub embedding_dim: usize,
    pub sample_len: usize,
    /// The trainable part's names and shapes (its values are the pretrained weights).
    pub params: Params,
    /// The embedding reference label trust judged with (recorded, not matched: `export`
    /// without a config judges with it too).
    pub reference_path: Option<PathBuf>,
}

impl Identity {
    pub fn new(classifier: &crate::model::Classifier, learn: &crate::learn::LearnConfig) -> Self {
        Identity {
            model_fingerprint: classifier.fingerprint,
            model_path: std::fs::canonicalize(&classifier.path)
                .unwrap_or_else(|_| classifier.path.clone()),
            config_hash: config_hash(learn),
            classes: classifier.classes(),
            embedding_dim: classifier.embedding_dim,
            sample_len: classifier.sample_len(),
            params: classifier.pretrained().params().clone(),
            reference_path: None,
        }
    }

    /// Records the embedding reference (`[model] reference`) in every manifest written.
    pub fn with_reference(mut self, reference: Option<&std::path::Path>) -> Self {
        self.reference_path =
            reference.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned()));
        self
    }
}
