//! The student's combined loss and its hand-written gradient.
//!
//! L_total = L_sup + λ·L_pseudo + α·L_consistency (the README's "How it works" states the same):
//! - L_sup: mean cross-entropy of the student on the labeled batch;
//! - L_pseudo: cross-entropy against the teacher's pseudo-labels, summed over the accepted
//!   samples and divided by the whole unlabeled batch size N_u (rejected samples add zero);
//! - L_consistency: (1/N_u) Σ ‖P_s(aug1(x)) − P_s(aug2(x))‖², gradient through both
//!   branches; or, in the Mean Teacher form, ‖P_s(aug1(x)) − P_t(aug2(x))‖² with the teacher
//!   branch held constant.
//!
//! Two do-no-harm terms keep a head that sits on a knife-edge between similar classes from
//! merging them (any update, supervised or not, tends to): the diversity term
//! β·Σ_k p̄_k log p̄_k on the student's mean prediction p̄ over the unlabeled batch, which keeps
//! every class present, and masking the classes absent from the labeled buffer out of
//! L_sup's softmax, so a few labels of three classes do not push the others down.
//!
//! Each term's gradient is `dL/dlogits`, pushed back through the student's layers by
//! [`Mlp::backward`]. Tests check it against finite differences for 1, 2 and 3 layers.

use ndarray::{Array2, ArrayView2, Axis};

use crate::nn::{softmax_rows, Mlp, Params, Trace};

/// Which pair the consistency term compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyMode {
    /// Student vs student on two augmentations (the method's own form, and the default).
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
    /// Classes L_sup's softmax ranges over (`true` = kept); empty = all classes.
    pub present: &'a [bool],
}

/// The loss weights in force for one step (after ramp-up).
#[derive(Debug, Clone, Copy)]
pub struct LossWeights {
    pub lambda: f32,
    pub alpha: f32,
    /// β, weight of the diversity term.
    pub beta: f32,
    pub consistency: ConsistencyMode,
}

/// Loss values of one step (unweighted parts and the weighted total).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LossParts {
    pub sup: f32,
    pub pseudo: f32,
    pub consistency: f32,
    /// Σ_k p̄_k log p̄_k (−ln K when every class is equally present).
    pub diversity: f32,
    pub total: f32,
}

/// Reusable buffers for [`loss_and_grad`], so a step allocates nothing once warmed up.
#[derive(Debug, Default)]
pub struct Scratch {
    p: Array2<f32>,
    pb: Array2<f32>,
    dz: Array2<f32>,
    dz_div: Array2<f32>,
    mean: Vec<f32>,
    trace_a: Trace,
    trace_b: Trace,
}

/// Computes the loss parts and writes the gradient of the total into `grad`.
pub fn loss_and_grad(
    student: &Mlp,
    teacher: &Mlp,
    batch: &Batch,
    w: &LossWeights,
    s: &mut Scratch,
    grad: &mut Params,
) -> LossParts {
    grad.fill(0.0);
    let mut parts = LossParts::default();

    // Supervised: mean cross-entropy.
    let n_l = batch.labeled.nrows();
    if n_l > 0 {
        student.forward(batch.labeled, &mut s.trace_a);
        masked_softmax(s.trace_a.logits(), batch.present, &mut s.p);
        parts.sup = cross_entropy_grad(&s.p, |i| Some(batch.labels[i]), n_l as f32, 1.0, &mut s.dz);
        student.backward(batch.labeled, &mut s.trace_a, s.dz.view(), grad);
    }

    // Pseudo-labels and diversity share one forward and one backward pass.
    let n_u = batch.unlabeled.nrows();
    let pseudo = n_u > 0 && w.lambda > 0.0 && batch.pseudo.iter().any(Option::is_some);
    let diverse = n_u > 0 && w.beta > 0.0;
    if pseudo || diverse {
        probs(student, batch.unlabeled, &mut s.trace_a, &mut s.p);
        let targets = |i: usize| if pseudo { batch.pseudo[i] } else { None };
        let ce = cross_entropy_grad(&s.p, targets, n_u as f32, w.lambda, &mut s.dz);
        if pseudo {
            parts.pseudo = ce;
        }
        if diverse {
            parts.diversity = diversity_grad(&s.p, w.beta, &mut s.mean, &mut s.dz_div);
            s.dz += &s.dz_div;
        }
        student.backward(batch.unlabeled, &mut s.trace_a, s.dz.view(), grad);
    }

    let n_c = batch.aug_a.nrows();
    if n_c > 0 && w.alpha > 0.0 {
        probs(student, batch.aug_a, &mut s.trace_a, &mut s.p);
        let other = match w.consistency {
            ConsistencyMode::Student => student,
            ConsistencyMode::Teacher => teacher,
        };
        probs(other, batch.aug_b, &mut s.trace_b, &mut s.pb);
        // d/dp_a of (1/N)‖p_a − p_b‖² is (2/N)(p_a − p_b); p_b gets the opposite sign.
        let scale = 2.0 * w.alpha / n_c as f32;
        parts.consistency =
            s.p.iter()
                .zip(s.pb.iter())
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / n_c as f32;
        consistency_backward(&s.p, &s.pb, scale, &mut s.dz);
        student.backward(batch.aug_a, &mut s.trace_a, s.dz.view(), grad);
        if w.consistency == ConsistencyMode::Student {
            consistency_backward(&s.pb, &s.p, scale, &mut s.dz);
            student.backward(batch.aug_b, &mut s.trace_b, s.dz.view(), grad);
        }
    }
    parts.total = parts.sup
        + w.lambda * parts.pseudo
        + w.alpha * parts.consistency
        + w.beta * parts.diversity;
    parts
}

/// Softmax of each row over the classes `keep` marks (all when `keep` is empty); the others
/// get probability 0, so they take no loss and no gradient.
fn masked_softmax(logits: &Array2<f32>, keep: &[bool], out: &mut Array2<f32>) {
    if out.dim() != logits.dim() {
        *out = Array2::zeros(logits.dim());
    }
    out.assign(logits);
    if keep.is_empty() || keep.iter().all(|&k| k) {
        softmax_rows(out);
        return;
    }
    for mut row in out.axis_iter_mut(Axis(0)) {
        let max = row
            .iter()
            .zip(keep)
            .filter(|(_, &k)| k)
            .map(|(v, _)| *v)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (v, &k) in row.iter_mut().zip(keep) {
            *v = if k { (*v - max).exp() } else { 0.0 };
            sum += *v;
        }
        row /= sum;
    }
}

/// Σ_k p̄_k log p̄_k of the rows' mean `p̄`; writes β·dL/dlogits into `dz`. With
/// g_k = (log p̄_k + 1)/N for every row, back through each row's softmax:
/// dz = β·p ⊙ (g − ⟨g, p⟩).
fn diversity_grad(p: &Array2<f32>, beta: f32, mean: &mut Vec<f32>, dz: &mut Array2<f32>) -> f32 {
    let (n, k) = p.dim();
    if dz.dim() != p.dim() {
        *dz = Array2::zeros(p.dim());
    }
    mean.clear();
    mean.resize(k, 0.0);
    for row in p.axis_iter(Axis(0)) {
        mean.iter_mut().zip(row.iter()).for_each(|(m, v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= n as f32);
    let loss = mean.iter().map(|&m| m * m.max(1e-12).ln()).sum();
    // The constant +1 of d(p log p)/dp cancels in the softmax backward; keep it for clarity.
    mean.iter_mut()
        .for_each(|m| *m = beta * (m.max(1e-12).ln() + 1.0) / n as f32);
    for (p_row, mut dz_row) in p.axis_iter(Axis(0)).zip(dz.axis_iter_mut(Axis(0))) {
        let dot: f32 = p_row.iter().zip(mean.iter()).map(|(pi, gi)| pi * gi).sum();
        for ((d, &pi), &gi) in dz_row.iter_mut().zip(p_row.iter()).zip(mean.iter()) {
            *d = pi * (gi - dot);
        }
    }
    loss
}

/// Forward pass kept in `trace` for the backward pass, softmax of the logits into `out`.
fn probs(mlp: &Mlp, x: ArrayView2<f32>, trace: &mut Trace, out: &mut Array2<f32>) {
    mlp.forward(x, trace);
    let logits = trace.logits();
    if out.dim() != logits.dim() {
        *out = Array2::zeros(logits.dim());
    }
    out.assign(logits);
    softmax_rows(out);
}

/// Σ over rows with a target of −log p[target], divided by `denom`; writes
/// `scale · (p − onehot) / denom` (zero rows where there is no target) into `dz`.
fn cross_entropy_grad(
    p: &Array2<f32>,
    target: impl Fn(usize) -> Option<usize>,
    denom: f32,
    scale: f32,
    dz: &mut Array2<f32>,
) -> f32 {
    if dz.dim() != p.dim() {
        *dz = Array2::zeros(p.dim());
    }
    let mut loss = 0.0f64;
    for (i, (p_row, mut dz_row)) in p
        .axis_iter(Axis(0))
        .zip(dz.axis_iter_mut(Axis(0)))
        .enumerate()
    {
        match target(i) {
            Some(y) => {
                // Clamp so a hopeless sample costs a large but finite loss.
                loss -= (p_row[y].max(1e-12) as f64).ln();
                dz_row.assign(&p_row);
                dz_row[y] -= 1.0;
                dz_row *= scale / denom;
            }
            None => dz_row.fill(0.0),
        }
    }
    (loss / denom as f64) as f32
}

/// `dL/dlogits` of `scale/2 · ‖p − q‖²` with respect to the logits behind `p`:
/// back through the row-wise softmax, dz = p ⊙ (g − ⟨g, p⟩) with g = scale·(p − q).
fn consistency_backward(p: &Array2<f32>, q: &Array2<f32>, scale: f32, dz: &mut Array2<f32>) {
    if dz.dim() != p.dim() {
        *dz = Array2::zeros(p.dim());
    }
    for ((p_row, q_row), mut dz_row) in p
        .axis_iter(Axis(0))
        .zip(q.axis_iter(Axis(0)))
        .zip(dz.axis_iter_mut(Axis(0)))
    {
        let dot: f32 = p_row
            .iter()
            .zip(q_row.iter())
            .map(|(&pi, &qi)| scale * (pi - qi) * pi)
            .sum();
        for ((d, &pi), &qi) in dz_row.iter_mut().zip(p_row.iter()).zip(q_row.iter()) {
            *d = pi * (scale * (pi - qi) - dot);
        }
    }
}
