//! The rollback guard: revert to the last good teacher when adaptation goes wrong.
//!
//! Long-running pseudo-label methods can end worse than no adaptation (a stretch of wrong
//! feedback, a sensor fault). Every labeled sample is also filed with the guard as *pending*:
//! fresh labels that the last good teacher has never trained on, so they are held out with
//! respect to it. Every `check_every_steps` steps the guard judges:
//! - collapse: the teacher's prediction entropy on the recent stream is far below the
//!   pretrained model's on the same samples;
//! - misleading labels: once enough labels are trusted, neither the last good teacher nor the
//!   pretrained model agrees with `min_agreement` of the pending ones (a systematic
//!   relabeling, not drift: the good teacher already learned the domain from the trusted
//!   labels; the pretrained model counts too because labels asked for where the two
//!   disagree are, by design, often ones the teacher gets wrong);
//! - regression: the deployed teacher's accuracy on the trusted labels is more than `margin`
//!   below the last good teacher's.
//!
//! On any of these the learner reverts to the last good state, labeled buffer included, so the
//! labels that caused the damage are dropped with it, and the pending labels are discarded.
//! Otherwise pending labels become trusted, and a teacher at least as good as the last good
//! one becomes it. Promoting labels only after a check keeps a burst of wrong labels from
//! outvoting the labels already verified. With `holdout_every = n > 0` every n-th label is
//! additionally withheld from training (a stricter holdout; it costs accuracy when labels
//! are as scarce as 5 %, so it is off by default).

use std::collections::VecDeque;

use ndarray::{Array2, ArrayView2};

use crate::nn::{argmax, Mlp};

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    pub enabled: bool,
    /// Every n-th labeled sample is withheld from training for the guard (0: none; every
    /// label still serves the guard while it is pending).
    pub holdout_every: usize,
    /// Pending labels needed before they are judged and promoted.
    pub min_pending: usize,
    /// Least share of pending labels the last good teacher or the pretrained model must
    /// agree with.
    pub min_agreement: f32,
    /// Student steps between checks.
    pub check_every_steps: u64,
    /// Roll back when the teacher's accuracy on trusted labels is this much below the last
    /// good teacher's (and it gets at least two more of them wrong).
    pub margin: f32,
    /// Trusted labels needed before accuracy checks start (until then every check passes).
    pub min_trusted: usize,
    /// Most trusted labels kept (oldest dropped).
    pub capacity: usize,
    /// Roll back when the teacher's prediction entropy on the recent stream is below this
    /// fraction of the pretrained model's (0 disables the collapse check).
    pub collapse_ratio: f32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            holdout_every: 0,
            min_pending: 5,
            min_agreement: 0.2,
            check_every_steps: 10,
            margin: 0.1,
            min_trusted: 8,
            capacity: 256,
            collapse_ratio: 0.5,
        }
    }
}

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Pass {
        teacher: f32,
        good: f32,
    },
    Worse {
        teacher: f32,
        good: f32,
    },
    Misleading {
        agreement: f32,
        pending: usize,
    },
    Collapsed {
        teacher_entropy: f32,
        source_entropy: f32,
    },
}

#[derive(Debug, Clone)]
pub struct HeldOut {
    pub embeddings: VecDeque<Vec<f32>>,
    pub labels: VecDeque<usize>,
}

impl HeldOut {
    fn new() -> Self {
        HeldOut {
            embeddings: VecDeque::new(),
            labels: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn push(&mut self, emb: Vec<f32>, label: usize, capacity: usize) {
        self.embeddings.push_back(emb);
        self.labels.push_back(label);
        while self.labels.len() > capacity.max(1) {
            self.embeddings.pop_front();
            self.labels.pop_front();
        }
    }

    fn matrix(&self, dim: usize) -> Array2<f32> {
        let mut m = Array2::zeros((self.len(), dim));
        for (mut row, e) in m.rows_mut().into_iter().zip(&self.embeddings) {
            row.assign(&ndarray::ArrayView1::from(e.as_slice()));
        }
        m
    }
}

#[derive(Debug, Clone)]
pub struct RollbackGuard {
    pub cfg: GuardConfig,
    pub trusted: HeldOut,
    pub pending: HeldOut,
    labels_seen: u64,
    pub rollbacks: u64,
    pub checks: u64,
}

impl RollbackGuard {
    pub fn new(cfg: GuardConfig) -> Self {
        RollbackGuard {
            cfg,
            trusted: HeldOut::new(),
            pending: HeldOut::new(),
            labels_seen: 0,
            rollbacks: 0,
            checks: 0,
        }
    }

    /// Files a labeled sample with the guard; true if it must also be withheld from training.
    pub fn hold_out(&mut self, embedding: ndarray::ArrayView1<f32>, label: usize) -> bool {
        if !self.cfg.enabled {
            return false;
        }
        self.labels_seen += 1;
        self.pending
            .push(embedding.to_vec(), label, self.cfg.capacity);
        self.cfg.holdout_every > 0 && self.labels_seen % self.cfg.holdout_every as u64 == 0
    }

    pub fn due(&self, train_steps: u64) -> bool {
        self.cfg.enabled && train_steps % self.cfg.check_every_steps.max(1) == 0
    }

    /// Judges `teacher` against `good` on the trusted labels and `recent` unlabeled embeddings.
    pub fn judge(
        &mut self,
        teacher: &Mlp,
        good: &Mlp,
        source: &Mlp,
        recent: ArrayView2<f32>,
    ) -> Verdict {
        self.checks += 1;
        if self.cfg.collapse_ratio > 0.0 && recent.nrows() >= 32 {
            let (t, s) = (
                prediction_entropy(teacher, recent),
                prediction_entropy(source, recent),
            );
            if t < self.cfg.collapse_ratio * s {
                return Verdict::Collapsed {
                    teacher_entropy: t,
                    source_entropy: s,
                };
            }
        }
        if self.trusted.len() < self.cfg.min_trusted {
            return Verdict::Pass {
                teacher: f32::NAN,
                good: f32::NAN,
            };
        }
        if self.pending.len() >= self.cfg.min_pending {
            let m = self.pending.matrix(good.input_dim());
            let agreement = agreement(good, source, m.view(), &self.pending.labels);
            if agreement < self.cfg.min_agreement {
                return Verdict::Misleading {
                    agreement,
                    pending: self.pending.len(),
                };
            }
        }
        let m = self.trusted.matrix(teacher.input_dim());
        let (t, g) = (
            accuracy(teacher, m.view(), &self.trusted.labels),
            accuracy(good, m.view(), &self.trusted.labels),
        );
        // On a few labels one sample is already over the margin; ask for at least two.
        let fewer_correct = ((g - t) * self.trusted.len() as f32).round();
        if t + self.cfg.margin < g && fewer_correct >= 2.0 {
            Verdict::Worse {
                teacher: t,
                good: g,
            }
        } else {
            Verdict::Pass {
                teacher: t,
                good: g,
            }
        }
    }

    /// After a pass: pending labels become trusted (once there are enough to have been judged,
    /// or while the trusted set is still being built).
    pub fn promote(&mut self) {
        if self.pending.len() < self.cfg.min_pending && self.trusted.len() >= self.cfg.min_trusted {
            return;
        }
        while let (Some(e), Some(l)) = (
            self.pending.embeddings.pop_front(),
            self.pending.labels.pop_front(),
        ) {
            self.trusted.push(e, l, self.cfg.capacity);
        }
    }

    /// After a rollback: the unverified labels go.
    pub fn discard_pending(&mut self) {
        self.pending = HeldOut::new();
        self.rollbacks += 1;
    }
}

/// Share of `labels` that the last good teacher or the pretrained model predicts. Either
/// counts: labels asked for where the two disagree are right for one of them, and by design
/// often not for the teacher; a systematic relabeling matches neither.
fn agreement(
    good: &Mlp,
    source: &Mlp,
    embeddings: ArrayView2<f32>,
    labels: &VecDeque<usize>,
) -> f32 {
    let (g, s) = (good.logits(embeddings), source.logits(embeddings));
    let agreed = g
        .rows()
        .into_iter()
        .zip(s.rows())
        .zip(labels)
        .filter(|((g, s), &y)| argmax(*g).0 == y || argmax(*s).0 == y)
        .count();
    agreed as f32 / labels.len().max(1) as f32
}

fn accuracy(head: &Mlp, embeddings: ArrayView2<f32>, labels: &VecDeque<usize>) -> f32 {
    let logits = head.logits(embeddings);
    let correct = logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, &y)| argmax(*row).0 == y)
        .count();
    correct as f32 / labels.len().max(1) as f32
}

/// Entropy (nats) of the histogram of a head's predicted classes over `embeddings`.
pub fn prediction_entropy(head: &Mlp, embeddings: ArrayView2<f32>) -> f32 {
    let logits = head.logits(embeddings);
    let mut counts = vec![0usize; head.classes()];
    for row in logits.rows() {
        counts[argmax(row).0] += 1;
    }
    let n = embeddings.nrows().max(1) as f32;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| c as f32 / n)
        .map(|p| -p * p.ln())
        .sum()
}
