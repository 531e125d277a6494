//! Teacher pseudo-labels, with distribution alignment as the guard against collapse.
//!
//! Online self-training drifts toward whatever class the teacher already favours: its
//! confident predictions become the student's targets, which the EMA feeds back. Distribution
//! alignment (ReMixMatch) divides the teacher's probabilities by their running average over the
//! recent stream and multiplies by a target distribution (uniform unless configured), so a
//! class the teacher over-predicts must be more certain to be accepted. The running average
//! has a long horizon because sensor streams arrive in long single-activity segments.

use ndarray::{Array1, Array2, Axis};

use crate::nn::argmax;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Use the teacher's probabilities as they are.
    None,
    /// Rescale them by target / running average before thresholding.
    DistributionAlignment,
}

#[derive(Debug, Clone)]
pub struct PseudoLabeler {
    pub threshold: f32,
    pub balance: Balance,
    momentum: f32,
    /// Running average of the teacher's class probabilities.
    pub running: Array1<f32>,
    target: Array1<f32>,
}

impl PseudoLabeler {
    pub fn new(classes: usize, threshold: f32, balance: Balance, momentum: f32) -> Self {
        let uniform = Array1::from_elem(classes, 1.0 / classes as f32);
        PseudoLabeler {
            threshold,
            balance,
            momentum,
            running: uniform.clone(),
            target: uniform,
        }
    }

    /// Turns teacher probabilities (modified in place when aligned) into pseudo-labels.
    pub fn label(&mut self, probs: &mut Array2<f32>, out: &mut Vec<Option<usize>>) {
        if self.balance == Balance::DistributionAlignment && probs.nrows() > 0 {
            // A non-finite batch (a poisoned embedding) must never reach the running
            // average: it would make every later pseudo-label, and every checkpoint, NaN.
            if let Some(batch_mean) = probs
                .mean_axis(Axis(0))
                .filter(|m| m.iter().all(|v| v.is_finite()))
            {
                self.running =
                    &self.running * self.momentum + &(batch_mean * (1.0 - self.momentum));
            }
            let ratio = &self.target / &self.running.mapv(|v| v.max(1e-6));
            for mut row in probs.rows_mut() {
                row *= &ratio;
                let sum = row.sum();
                row /= sum;
            }
        }
        out.clear();
        out.extend(probs.rows().into_iter().map(|row| {
            let (class, confidence) = argmax(row);
            (confidence >= self.threshold).then_some(class)
        }));
    }
}
