//! The embedding reference: what the frozen backbone's embeddings look like on the inputs
//! the model was made for, per class the pretrained model gives them.
//!
//! Label trust needs it to tell a swap from a shift. Labels alone cannot: a sensor rotated
//! so far that the pretrained model confidently swaps two classes in earnest is contradicted
//! by honest labels exactly as a poisoner's swap is. The inputs can: many of a rotated
//! sensor's samples sit away from every place the training inputs sat, a poisoner's do not
//! (he relabels inputs the model knows). An embedding's score against a class is its mean
//! squared standardized distance from that class's mean; its *nearest* score is the smallest
//! over the classes. `atypical` is the 95th percentile of the nearest scores on the recording
//! the reference was made from, so about 5 % of the inputs the model was made for score
//! above it, and a stream where many more do shows a sign of shift.
//!
//! A reference is made by `edgemt reference` from a recording of the training distribution
//! (the model vendor's training or validation data) and names the model file it was made
//! for, so that a reference of another model is refused by name instead of silently judging
//! by the wrong yardstick.

use std::path::Path;

use ndarray::{ArrayView1, ArrayView2};

/// Samples of a class needed before the reference describes it (fewer: no score there).
pub const MIN_CLASS_SAMPLES: usize = 8;

/// Smallest standard deviation per dimension: a dimension constant on the reference data
/// (a dead ReLU) must not turn any movement at all into an infinite score.
const SD_FLOOR: f32 = 1e-3;

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("cannot read embedding reference {path}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("embedding reference {path} is not valid JSON for a reference: {reason}")]
    Format {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("embedding reference {path} does not fit the model: {reason}")]
    Mismatch {
        path: std::path::PathBuf,
        reason: String,
    },
}

/// One class's embedding statistics.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassStats {
    pub samples: usize,
    pub mean: Vec<f32>,
    pub sd: Vec<f32>,
}

/// See the module docs.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingReference {
    /// The model's fingerprint (FNV-1a of the file, as `edgemt inspect` prints it), in hex.
    pub model_fingerprint: String,
    /// What it was made from, in words (for the operator).
    pub source: String,
    /// Per class the pretrained model predicts; `None` where it predicted too few samples.
    pub classes: Vec<Option<ClassStats>>,
    /// Nearest score that 95 % of the reference samples stay within ([`ATYPICAL_SHARE`]
    /// score above it).
    pub atypical: f32,
}

/// The share of the reference samples whose nearest score exceeds `atypical`.
pub const ATYPICAL_SHARE: f32 = 0.05;

impl EmbeddingReference {
    /// Statistics of `embeddings` grouped by `predicted` class (of `classes`).
    pub fn build(
        embeddings: ArrayView2<f32>,
        predicted: &[usize],
        classes: usize,
        model_fingerprint: u64,
        source: String,
    ) -> Self {
        let dim = embeddings.ncols();
        let stats: Vec<Option<ClassStats>> = (0..classes)
            .map(|c| {
                let rows: Vec<usize> = (0..predicted.len())
                    .filter(|&i| predicted[i] == c)
                    .collect();
                (rows.len() >= MIN_CLASS_SAMPLES).then(|| {
                    let n = rows.len() as f64;
                    let mut mean = vec![0f64; dim];
                    for &i in &rows {
                        for (m, v) in mean.iter_mut().zip(embeddings.row(i)) {
                            *m += *v as f64 / n;
                        }
                    }
                    let mut var = vec![0f64; dim];
                    for &i in &rows {
                        for ((s, v), m) in var.iter_mut().zip(embeddings.row(i)).zip(&mean) {
                            *s += (*v as f64 - m).powi(2) / n;
                        }
                    }
                    ClassStats {
                        samples: rows.len(),
                        mean: mean.iter().map(|&m| m as f32).collect(),
                        sd: var
                            .iter()
                            .map(|&v| (v.sqrt() as f32).max(SD_FLOOR))
                            .collect(),
                    }
                })
            })
            .collect();
        let mut r = EmbeddingReference {
            model_fingerprint: format!("{model_fingerprint:016x}"),
            source,
            classes: stats,
            atypical: 0.0,
        };
        let mut scores: Vec<f32> = embeddings
            .rows()
            .into_iter()
            .filter_map(|e| r.nearest_score(e))
            .collect();
        r.atypical = quantile(&mut scores, 1.0 - ATYPICAL_SHARE).unwrap_or(0.0);
        r
    }

    /// Reads a reference and checks it against the model it is to judge.
    pub fn read(
        path: &Path,
        model_fingerprint: u64,
        dim: usize,
        classes: usize,
    ) -> Result<Self, ReferenceError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReferenceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let r: EmbeddingReference =
            serde_json::from_str(&text).map_err(|e| ReferenceError::Format {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        r.check(model_fingerprint, dim, classes)
            .map_err(|reason| ReferenceError::Mismatch {
                path: path.to_owned(),
                reason,
            })?;
        Ok(r)
    }

    /// Whether this reference was made for a model with this fingerprint, embedding width
    /// and class count, and holds usable numbers.
    pub fn check(&self, model_fingerprint: u64, dim: usize, classes: usize) -> Result<(), String> {
        let fp = format!("{model_fingerprint:016x}");
        if self.model_fingerprint != fp {
            return Err(format!(
                "it was made for the model with fingerprint {}, this model's is {fp} \
                 (make it again with `edgemt reference`)",
                self.model_fingerprint
            ));
        }
        if self.classes.len() != classes {
            return Err(format!(
                "it describes {} classes, the model has {classes}",
                self.classes.len()
            ));
        }
        for (c, s) in self.classes.iter().enumerate() {
            let Some(s) = s else { continue };
            if s.mean.len() != dim || s.sd.len() != dim {
                return Err(format!(
                    "class {c} has {} means and {} deviations, the embedding has {dim} values \
                     (made at another embedding, e.g. another [model] trainable_layers: make it \
                     again with `edgemt reference`)",
                    s.mean.len(),
                    s.sd.len()
                ));
            }
            if !s.mean.iter().all(|v| v.is_finite()) || !s.sd.iter().all(|v| *v > 0.0) {
                return Err(format!(
                    "class {c} holds a non-finite mean or a deviation <= 0"
                ));
            }
        }
        if !(self.atypical.is_finite() && self.atypical > 0.0) {
            return Err(format!("atypical must be positive, not {}", self.atypical));
        }
        if self.classes.iter().all(Option::is_none) {
            return Err("it describes no class".into());
        }
        Ok(())
    }

    /// Mean squared standardized distance of `embedding` from `class`'s mean, if the
    /// reference describes that class.
    pub fn score(&self, embedding: ArrayView1<f32>, class: usize) -> Option<f32> {
        let s = self.classes.get(class)?.as_ref()?;
        let sum: f32 = embedding
            .iter()
            .zip(&s.mean)
            .zip(&s.sd)
            .map(|((v, m), sd)| ((v - m) / sd).powi(2))
            .sum();
        Some(sum / s.mean.len().max(1) as f32)
    }

    /// The smallest [`score`](Self::score) over the classes the reference describes.
    pub fn nearest_score(&self, embedding: ArrayView1<f32>) -> Option<f32> {
        (0..self.classes.len())
            .filter_map(|c| self.score(embedding, c))
            .min_by(|a, b| a.total_cmp(b))
    }

    /// Whether `embedding` sits farther from every class than 95 % of the reference inputs.
    pub fn is_atypical(&self, embedding: ArrayView1<f32>) -> bool {
        self.nearest_score(embedding)
            .is_some_and(|s| s > self.atypical)
    }
}

/// The `q` quantile of `v` (the nearest rank at or above it); reorders `v`.
pub fn quantile(v: &mut [f32], q: f32) -> Option<f32> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    let k = ((q.clamp(0.0, 1.0) * n as f32).ceil() as usize).clamp(1, n) - 1;
    let (_, &mut x, _) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn two_clusters() -> (Array2<f32>, Vec<usize>) {
        // Class 0 around (0, 0), class 1 around (10, 0); deviations 1 in each dimension.
        let mut e = Array2::zeros((40, 2));
        let mut y = Vec::new();
        for i in 0..40 {
            let c = i % 2;
            let s = if (i / 2) % 2 == 0 { 1.0 } else { -1.0 };
            e[[i, 0]] = 10.0 * c as f32 + s;
            e[[i, 1]] = -s;
            y.push(c);
        }
        (e, y)
    }

    #[test]
    fn an_embedding_where_its_class_sat_scores_typical_and_one_far_away_does_not() {
        let (e, y) = two_clusters();
        let r = EmbeddingReference::build(e.view(), &y, 3, 7, "test".into());
        assert!(
            r.classes[2].is_none(),
            "a class never predicted is not described"
        );
        // Every reference sample scores exactly 1 against its own class.
        assert!((r.atypical - 1.0).abs() < 1e-5, "atypical {}", r.atypical);
        let near = ndarray::arr1(&[10.5, 0.5]);
        let far = ndarray::arr1(&[5.0, 3.0]);
        assert!(r.nearest_score(near.view()).unwrap() < r.atypical);
        assert!(!r.is_atypical(near.view()));
        assert!(r.nearest_score(far.view()).unwrap() > 10.0 * r.atypical);
        assert!(r.is_atypical(far.view()));
        assert_eq!(r.score(ndarray::arr1(&[0.0, 0.0]).view(), 2), None);
    }

    #[test]
    fn a_reference_of_another_model_or_shape_is_refused_by_name() {
        let (e, y) = two_clusters();
        let r = EmbeddingReference::build(e.view(), &y, 2, 7, "test".into());
        assert!(r.check(7, 2, 2).is_ok());
        assert!(r.check(8, 2, 2).unwrap_err().contains("fingerprint"));
        assert!(r.check(7, 3, 2).unwrap_err().contains("embedding has 3"));
        assert!(r.check(7, 2, 4).unwrap_err().contains("4"));
    }
}
