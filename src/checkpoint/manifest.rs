//! The manifest: a checkpoint's small JSON description, written after its tensor file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::learn::optim::Optimizer;
use crate::learn::Counters;

/// Bumped when the tensor names or meanings change; older checkpoints are refused.
pub const FORMAT: &str = "edgemt-checkpoint/2";

/// What the manifest records besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub sequence: u64,
    pub created_unix_s: f64,
    pub model_fingerprint: String,
    pub model_path: PathBuf,
    pub config_hash: String,
    pub tensors: String,
    pub tensors_bytes: u64,
    pub tensors_sha256: String,
    pub classes: usize,
    pub embedding_dim: usize,
    pub sample_len: usize,
    /// Layers in the trainable part.
    pub layers: usize,
    pub counters: Counters,
    pub optimizer: OptimizerMeta,
    /// The mounting calibration had adopted (none: the device's own axes).
    #[serde(default)]
    pub mounting: Option<super::MountingRecord>,
    /// Every label scored against the device's answer (older checkpoints: none yet).
    #[serde(default)]
    pub label_accuracy: crate::scores::Accuracy,
    /// The embedding reference label trust judged with (none, or an older checkpoint).
    #[serde(default)]
    pub reference_path: Option<PathBuf>,
}

/// The optimizer's scalars (its tensors are in the tensor file).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerMeta {
    Sgd {
        momentum: f32,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        t: u64,
    },
}

impl OptimizerMeta {
    pub fn of(o: &Optimizer) -> Self {
        match o {
            Optimizer::Sgd { momentum, .. } => OptimizerMeta::Sgd {
                momentum: *momentum,
            },
            Optimizer::Adam {
                beta1,
                beta2,
                eps,
                t,
                ..
            } => OptimizerMeta::Adam {
                beta1: *beta1,
                beta2: *beta2,
                eps: *eps,
                t: *t,
            },
        }
    }
}

/// Hash of the learning config, to tell in a log that a checkpoint was made with other knobs.
pub fn config_hash(learn: &crate::learn::LearnConfig) -> String {
    let text = toml::to_string(learn).unwrap_or_default();
    hex(&Sha256::digest(text.as_bytes()))[..16].to_string()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
