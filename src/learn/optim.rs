//! Optimizers with explicit state, so a checkpoint can save and restore them exactly.

use ndarray::Zip;

use super::head::LinearHead;
use super::loss::Gradients;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

/// SGD-with-momentum or Adam state for one [`LinearHead`].
#[derive(Debug, Clone, PartialEq)]
pub enum Optimizer {
    Sgd {
        momentum: f32,
        velocity: Gradients,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        m: Gradients,
        v: Gradients,
        t: u64,
    },
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, momentum: f32, head: &LinearHead) -> Self {
        match kind {
            OptimizerKind::Sgd => Optimizer::Sgd {
                momentum,
                velocity: Gradients::zeros_like(head),
            },
            OptimizerKind::Adam => Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                m: Gradients::zeros_like(head),
                v: Gradients::zeros_like(head),
                t: 0,
            },
        }
    }

    /// One update of `params` along `grad` with learning rate `lr`.
    pub fn step(&mut self, params: &mut LinearHead, grad: &Gradients, lr: f32) {
        match self {
            Optimizer::Sgd { momentum, velocity } => {
                let mu = *momentum;
                Zip::from(&mut velocity.weight)
                    .and(&mut params.weight)
                    .and(&grad.weight)
                    .for_each(|v, p, &g| {
                        *v = mu * *v + g;
                        *p -= lr * *v;
                    });
                Zip::from(&mut velocity.bias)
                    .and(&mut params.bias)
                    .and(&grad.bias)
                    .for_each(|v, p, &g| {
                        *v = mu * *v + g;
                        *p -= lr * *v;
                    });
            }
            Optimizer::Adam {
                beta1,
                beta2,
                eps,
                m,
                v,
                t,
            } => {
                *t += 1;
                let (b1, b2, e) = (*beta1, *beta2, *eps);
                let c1 = 1.0 - b1.powi(*t as i32);
                let c2 = 1.0 - b2.powi(*t as i32);
                let update = |m: &mut f32, v: &mut f32, p: &mut f32, g: f32| {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= lr * (*m / c1) / ((*v / c2).sqrt() + e);
                };
                Zip::from(&mut m.weight)
                    .and(&mut v.weight)
                    .and(&mut params.weight)
                    .and(&grad.weight)
                    .for_each(|m, v, p, &g| update(m, v, p, g));
                Zip::from(&mut m.bias)
                    .and(&mut v.bias)
                    .and(&mut params.bias)
                    .and(&grad.bias)
                    .for_each(|m, v, p, &g| update(m, v, p, g));
            }
        }
    }
}

/// θ_teacher ← m·θ_teacher + (1−m)·θ_student.
pub fn ema_update(teacher: &mut LinearHead, student: &LinearHead, m: f32) {
    Zip::from(&mut teacher.weight)
        .and(&student.weight)
        .for_each(|t, &s| *t = m * *t + (1.0 - m) * s);
    Zip::from(&mut teacher.bias)
        .and(&student.bias)
        .for_each(|t, &s| *t = m * *t + (1.0 - m) * s);
}

/// EMA decay with Mean Teacher's warm-up: min(m, (1 + t) / (10 + t)) for the t-th update,
/// so early updates follow the student more closely while the average has little history.
pub fn warmed_up_decay(m: f32, t: u64) -> f32 {
    m.min((1.0 + t as f32) / (10.0 + t as f32))
}

/// Sigmoid-shaped ramp from 0 to 1 over `len` steps (Laine & Aila): exp(−5 (1 − t/len)²).
pub fn rampup(step: u64, len: u64) -> f32 {
    if len == 0 || step >= len {
        return 1.0;
    }
    let x = 1.0 - step as f32 / len as f32;
    (-5.0 * x * x).exp()
}
