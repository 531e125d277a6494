//! The student's combined loss and its hand-written gradient.
//!
//! L_total = L_sup + λ·L_pseudo + α·L_consistency, exactly as in the seed notes:
//! - L_sup: mean cross-entropy of the student on the labeled batch;
//! - L_pseudo: cross-entropy against the teacher's pseudo-labels, summed over the accepted
//!   samples and divided by the whole unlabeled batch size N_u (rejected samples add zero);
//! - L_consistency: (1/N_u) Σ ‖P_s(aug1(x)) − P_s(aug2(x))‖², gradient through both
//!   branches; or, in the Mean Teacher form, ‖P_s(aug1(x)) − P_t(aug2(x))‖² with the teacher
//!   branch held constant.
//!
//! The head is linear, so every term's gradient is `dL/dlogits` pushed back through one
//! matrix product: dW = dZᵀ·E, db = Σ dZ. Tests check it against finite differences.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView2, Axis};

use super::head::LinearHead;

/// Which pair the consistency term compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyMode {
    /// Student vs student on two augmentations (the seed notes' form, default).
    Student,
    /// Student on one augmentation vs teacher on the other (Mean Teacher's form).
    Teacher,
}

/// One training batch, already embedded by the backbone.
pub struct Batch<'a> {
    pub labeled: ArrayView2<'a, f32>,
    pub labels: &'a [usize],
    /// Unlabeled embeddings (clean inputs), for the pseudo-label term.
    pub unlabeled: ArrayView2<'a, f32>,
    /// Teacher pseudo-labels for `unlabeled`; `None` where the teacher was not confident.
    pub pseudo: &'a [Option<usize>],
    /// Embeddings of two augmentations of the same unlabeled samples (same row order).
    pub aug_a: ArrayView2<'a, f32>,
    pub aug_b: ArrayView2<'a, f32>,
}

/// The loss weights in force for one step (after ramp-up).
#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    pub lambda: f32,
    pub alpha: f32,
    pub consistency: ConsistencyMode,
}

/// Loss values of one step (unweighted parts and the weighted total).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LossParts {
    pub sup: f32,
    pub pseudo: f32,
    pub consistency: f32,
    pub total: f32,
}

/// Gradients (or any state) with the shape of a [`LinearHead`].
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    pub weight: Array2<f32>,
    pub bias: Array1<f32>,
}

impl Gradients {
    pub fn zeros_like(head: &LinearHead) -> Self {
        Gradients {
            weight: Array2::zeros(head.weight.raw_dim()),
            bias: Array1::zeros(head.bias.len()),
        }
    }

    pub fn norm(&self) -> f32 {
        self.weight
            .iter()
            .chain(self.bias.iter())
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
    }

    pub fn is_finite(&self) -> bool {
        self.weight
            .iter()
            .chain(self.bias.iter())
            .all(|v| v.is_finite())
    }

    pub fn scale(&mut self, s: f32) {
        self.weight *= s;
        self.bias *= s;
    }
}

/// Reusable buffers for [`loss_and_grad`], so a step allocates nothing once warmed up.
#[derive(Debug, Default)]
pub struct Scratch {
    p: Array2<f32>,
    pa: Array2<f32>,
    pb: Array2<f32>,
    dz: Array2<f32>,
}

/// Computes the loss parts and writes the gradient of the total into `grad`.
pub fn loss_and_grad(
    student: &LinearHead,
    teacher: &LinearHead,
    batch: &Batch,
    w: &LossWeights,
    scratch: &mut Scratch,
    grad: &mut Gradients,
) -> LossParts {
    grad.weight.fill(0.0);
    grad.bias.fill(0.0);
    let mut parts = LossParts::default();

    // Supervised: mean cross-entropy.
    let n_l = batch.labeled.nrows();
    if n_l > 0 {
        student.probs_into(batch.labeled, &mut scratch.p);
        let targets: Vec<Option<usize>> = batch.labels.iter().map(|&y| Some(y)).collect();
        parts.sup = cross_entropy_grad(&scratch.p, &targets, n_l as f32, 1.0, &mut scratch.dz);
        accumulate(grad, &scratch.dz, batch.labeled);
    }

    let n_u = batch.unlabeled.nrows();
    if n_u > 0 && w.lambda > 0.0 && batch.pseudo.iter().any(Option::is_some) {
        student.probs_into(batch.unlabeled, &mut scratch.p);
        parts.pseudo = cross_entropy_grad(
            &scratch.p,
            batch.pseudo,
            n_u as f32,
            w.lambda,
            &mut scratch.dz,
        );
        accumulate(grad, &scratch.dz, batch.unlabeled);
    }

    let n_c = batch.aug_a.nrows();
    if n_c > 0 && w.alpha > 0.0 {
        student.probs_into(batch.aug_a, &mut scratch.pa);
        match w.consistency {
            ConsistencyMode::Student => student.probs_into(batch.aug_b, &mut scratch.pb),
            ConsistencyMode::Teacher => teacher.probs_into(batch.aug_b, &mut scratch.pb),
        }
        // d/dp_a of (1/N)‖p_a − p_b‖² is (2/N)(p_a − p_b); p_b gets the opposite sign.
        let diff = &scratch.pa - &scratch.pb;
        parts.consistency = diff.iter().map(|d| d * d).sum::<f32>() / n_c as f32;
        let g = diff * (2.0 * w.alpha / n_c as f32);
        softmax_backward(&scratch.pa, &g, &mut scratch.dz);
        accumulate(grad, &scratch.dz, batch.aug_a);
        if w.consistency == ConsistencyMode::Student {
            let g = -g;
            softmax_backward(&scratch.pb, &g, &mut scratch.dz);
            accumulate(grad, &scratch.dz, batch.aug_b);
        }
    }
    parts.total = parts.sup + w.lambda * parts.pseudo + w.alpha * parts.consistency;
    parts
}

/// Σ over rows with a target of −log p[target], divided by `denom`; writes
/// `scale · (p − onehot) / denom` (zero rows where there is no target) into `dz`.
fn cross_entropy_grad(
    p: &Array2<f32>,
    targets: &[Option<usize>],
    denom: f32,
    scale: f32,
    dz: &mut Array2<f32>,
) -> f32 {
    if dz.dim() != p.dim() {
        *dz = Array2::zeros(p.dim());
    }
    let mut loss = 0.0f64;
    for ((p_row, mut dz_row), target) in p
        .axis_iter(Axis(0))
        .zip(dz.axis_iter_mut(Axis(0)))
        .zip(targets)
    {
        match target {
            Some(y) => {
                // Clamp so a hopeless sample costs a large but finite loss.
                loss -= (p_row[*y].max(1e-12) as f64).ln();
                dz_row.assign(&p_row);
                dz_row[*y] -= 1.0;
                dz_row *= scale / denom;
            }
            None => dz_row.fill(0.0),
        }
    }
    (loss / denom as f64) as f32
}

/// Back through a row-wise softmax: dz = p ⊙ (g − ⟨g, p⟩).
fn softmax_backward(p: &Array2<f32>, g: &Array2<f32>, dz: &mut Array2<f32>) {
    if dz.dim() != p.dim() {
        *dz = Array2::zeros(p.dim());
    }
    for ((p_row, g_row), mut dz_row) in p
        .axis_iter(Axis(0))
        .zip(g.axis_iter(Axis(0)))
        .zip(dz.axis_iter_mut(Axis(0)))
    {
        let dot = p_row.dot(&g_row);
        for ((d, &pi), &gi) in dz_row.iter_mut().zip(p_row.iter()).zip(g_row.iter()) {
            *d = pi * (gi - dot);
        }
    }
}

fn accumulate(grad: &mut Gradients, dz: &Array2<f32>, emb: ArrayView2<f32>) {
    general_mat_mul(1.0, &dz.t(), &emb, 1.0, &mut grad.weight);
    grad.bias += &dz.sum_axis(Axis(0));
}
