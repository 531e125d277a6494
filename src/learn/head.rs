//! The trainable linear head: `logits = embedding · Wᵀ + b`, and the softmax over it.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2, Axis, Zip};

/// A linear classifier head. `weight` is `[classes, embedding]`, `bias` is `[classes]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearHead {
    pub weight: Array2<f32>,
    pub bias: Array1<f32>,
}

impl LinearHead {
    pub fn new(weight: Array2<f32>, bias: Array1<f32>) -> Self {
        assert_eq!(
            weight.nrows(),
            bias.len(),
            "head weight rows and bias length differ"
        );
        LinearHead { weight, bias }
    }

    pub fn classes(&self) -> usize {
        self.weight.nrows()
    }

    pub fn embedding_dim(&self) -> usize {
        self.weight.ncols()
    }

    /// Writes `[batch, classes]` logits into `out` (resized only if its shape is wrong).
    pub fn logits_into(&self, embeddings: ArrayView2<f32>, out: &mut Array2<f32>) {
        let shape = (embeddings.nrows(), self.classes());
        if out.dim() != shape {
            *out = Array2::zeros(shape);
        }
        general_mat_mul(1.0, &embeddings, &self.weight.t(), 0.0, out);
        out.rows_mut()
            .into_iter()
            .for_each(|mut row| row += &self.bias);
    }

    /// Writes `[batch, classes]` class probabilities into `out`.
    pub fn probs_into(&self, embeddings: ArrayView2<f32>, out: &mut Array2<f32>) {
        self.logits_into(embeddings, out);
        softmax_rows(out);
    }

    pub fn probs(&self, embeddings: ArrayView2<f32>) -> Array2<f32> {
        let mut out = Array2::zeros((0, 0));
        self.probs_into(embeddings, &mut out);
        out
    }

    pub fn is_finite(&self) -> bool {
        self.weight
            .iter()
            .chain(self.bias.iter())
            .all(|v| v.is_finite())
    }

    /// Euclidean distance between two heads' parameters.
    pub fn distance(&self, other: &LinearHead) -> f32 {
        let w: f32 = Zip::from(&self.weight)
            .and(&other.weight)
            .fold(0.0, |acc, a, b| acc + (a - b).powi(2));
        let b: f32 = Zip::from(&self.bias)
            .and(&other.bias)
            .fold(0.0, |acc, a, b| acc + (a - b).powi(2));
        (w + b).sqrt()
    }
}

/// Numerically stable softmax over each row, in place.
pub fn softmax_rows(a: &mut Array2<f32>) {
    for mut row in a.axis_iter_mut(Axis(0)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        row.mapv_inplace(|v| {
            let e = (v - max).exp();
            sum += e;
            e
        });
        row /= sum;
    }
}

/// Index and value of the largest entry of a row.
pub fn argmax(row: ndarray::ArrayView1<f32>) -> (usize, f32) {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
}
