//! What `edgemt check` verifies on any build, daemon or not: the checkpoint directory, the
//! session (calibration channels against the model's input, the embedding reference against
//! the model) and one inference. A build with
//! the daemon then builds the daemon, which checks the broker options (password source, TLS
//! files), and prints what it would contact.
//!
//! Each check gives the line `edgemt check` prints for it, or the reason it failed in the
//! operator's words.

use std::path::{Path, PathBuf};

use crate::checkpoint::{CheckpointError, CheckpointStore, Identity};
use crate::config::Config;
use crate::model::{Classifier, ModelError};
use crate::nn::Mlp;
use crate::session::{Models, Predictor, Session, SessionError};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint.dir {dir} is not writable")]
    Unwritable {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the model returned no prediction for a sample")]
    NoPrediction,
    #[error("the model's prediction for an all-zero sample is not finite")]
    NotFinite,
}

/// The core checks, a line each: the checkpoint directory, the session, one inference.
pub fn core(cfg: &Config, classifier: &Classifier) -> Result<Vec<String>, CheckError> {
    let checkpoints = match &cfg.checkpoint.dir {
        Some(dir) => {
            // Created if missing, as the daemon would; then read, not cleaned up: a daemon
            // may be writing a checkpoint here right now.
            std::fs::create_dir_all(dir).map_err(|source| CheckError::Unwritable {
                dir: dir.to_owned(),
                source,
            })?;
            CheckpointStore::open_read_only(
                dir,
                cfg.checkpoint.keep,
                Identity::new(classifier, &cfg.learn)
                    .with_reference(cfg.model.reference.as_deref()),
            )?;
            writable(dir)?
        }
        None => "checkpoints: [checkpoint] dir unset (the daemon uses $STATE_DIRECTORY under \
                 systemd, replay its --checkpoint DIR)"
            .into(),
    };
    // The seed does not matter here: building the session is what checks it (the embedding
    // reference included).
    Session::new(classifier, cfg, cfg.replay.seed)?;
    let reference = match &cfg.model.reference {
        Some(path) => format!(
            "embedding reference {}: made for this model (label trust tells a swap from a shift)",
            path.display()
        ),
        None => "embedding reference: none ([model] reference unset: label trust counts \
                 contradictions from [trust] dispute_confidence only)"
            .into(),
    };
    let mut predictor = Predictor::new(classifier.backbone.clone());
    let inference = one_inference(&mut predictor, &classifier.pretrained(), classifier)?;
    Ok(vec![checkpoints, reference, inference])
}

/// `dir` takes a new file (existing and readable does not say so): a file is created there
/// and removed again.
fn writable(dir: &Path) -> Result<String, CheckError> {
    tempfile::NamedTempFile::new_in(dir).map_err(|source| CheckError::Unwritable {
        dir: dir.to_owned(),
        source,
    })?;
    Ok(format!("checkpoints in {} (writable)", dir.display()))
}

/// One inference of an all-zero sample through `predictor` with `head`: the backbone runs,
/// and the answer is a class with a finite confidence.
fn one_inference(
    predictor: &mut Predictor,
    head: &Mlp,
    classifier: &Classifier,
) -> Result<String, CheckError> {
    let zeros = vec![0.0; classifier.sample_len()];
    let mut out = Vec::with_capacity(1);
    predictor.embed(&zeros, 1, None)?;
    predictor.answer(0..1, &Models::pretrained(head), &mut out);
    // No answer: the embedding came out non-finite, which the prediction path refuses.
    let p = out
        .first()
        .copied()
        .ok_or(CheckError::NoPrediction)?
        .ok_or(CheckError::NotFinite)?
        .served;
    if !p.confidence.is_finite() {
        return Err(CheckError::NotFinite);
    }
    Ok(format!(
        "one inference of an all-zero sample: class {} ({}) at confidence {:.3}",
        p.class,
        classifier
            .class_names
            .get(p.class)
            .map(String::as_str)
            .unwrap_or("?"),
        p.confidence
    ))
}
