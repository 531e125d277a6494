//! Optimizers with explicit per-tensor state, so a checkpoint can save and restore them
//! exactly; the EMA teacher update and the ramps.

use crate::nn::Params;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

/// The optimizer's constants (from `[learn]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    /// SGD momentum.
    pub momentum: f32,
    /// Adam's β₁, β₂ and ε.
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// SGD-with-momentum or Adam, with state shaped like the parameters it updates.
#[derive(Debug, Clone, PartialEq)]
pub enum Optimizer {
    Sgd {
        momentum: f32,
        velocity: Params,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
        m: Params,
        v: Params,
        t: u64,
    },
}

impl Optimizer {
    pub fn new(s: OptimizerSettings, params: &Params) -> Self {
        match s.kind {
            OptimizerKind::Sgd => Optimizer::Sgd {
                momentum: s.momentum,
                velocity: params.zeros_like(),
            },
            OptimizerKind::Adam => Optimizer::Adam {
                beta1: s.beta1,
                beta2: s.beta2,
                eps: s.eps,
                m: params.zeros_like(),
                v: params.zeros_like(),
                t: 0,
            },
        }
    }

    /// The state tensors with their role (`velocity`, or `m` and `v`), for checkpoints.
    pub fn state(&self) -> Vec<(&'static str, &Params)> {
        match self {
            Optimizer::Sgd { velocity, .. } => vec![("velocity", velocity)],
            Optimizer::Adam { m, v, .. } => vec![("m", m), ("v", v)],
        }
    }

    /// Mutable access to the same tensors, in the same order as [`Optimizer::state`].
    pub fn state_mut(&mut self) -> Vec<(&'static str, &mut Params)> {
        match self {
            Optimizer::Sgd { velocity, .. } => vec![("velocity", velocity)],
            Optimizer::Adam { m, v, .. } => vec![("m", m), ("v", v)],
        }
    }

    /// One update of `params` along `grad` with learning rate `lr`.
    pub fn step(&mut self, params: &mut Params, grad: &Params, lr: f32) {
        let (p, g) = (params.as_mut_slice(), grad.as_slice());
        match self {
            Optimizer::Sgd { momentum, velocity } => {
                let mu = *momentum;
                for ((v, p), &g) in velocity.as_mut_slice().iter_mut().zip(p).zip(g) {
                    *v = mu * *v + g;
                    *p -= lr * *v;
                }
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
                for (((m, v), p), &g) in m
                    .as_mut_slice()
                    .iter_mut()
                    .zip(v.as_mut_slice())
                    .zip(p)
                    .zip(g)
                {
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= lr * (*m / c1) / ((*v / c2).sqrt() + e);
                }
            }
        }
    }
}

/// θ_teacher ← m·θ_teacher + (1−m)·θ_student.
pub fn ema_update(teacher: &mut Params, student: &Params, m: f32) {
    teacher.lerp_toward(student, m);
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
