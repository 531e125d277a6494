//! Metric objects that both drivers update, River-style: one accumulator per quantity, fed
//! one outcome at a time. Replay's report and the daemon's metrics are computed by these same
//! objects, so "accuracy on labels" or "mean supervised loss" cannot mean two things.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::learn::StepReport;

/// Share of outcomes that were right, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accuracy {
    pub correct: u64,
    pub total: u64,
}

impl Accuracy {
    pub fn update(&mut self, correct: bool) {
        self.total += 1;
        self.correct += correct as u64;
    }

    /// `None` before the first outcome: no value is better than a zero that looks measured.
    pub fn get(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }

    /// For reports that always carry a number.
    pub fn or_zero(&self) -> f64 {
        self.get().unwrap_or(0.0)
    }
}

/// Share of the most recent `capacity` outcomes that were right, so drift shows.
#[derive(Debug, Clone)]
pub struct RecentAccuracy {
    outcomes: VecDeque<bool>,
    capacity: usize,
}

impl RecentAccuracy {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecentAccuracy {
            outcomes: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn update(&mut self, correct: bool) {
        if self.outcomes.len() == self.capacity {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(correct);
    }

    pub fn get(&self) -> Option<f64> {
        (!self.outcomes.is_empty()).then(|| {
            self.outcomes.iter().filter(|&&c| c).count() as f64 / self.outcomes.len() as f64
        })
    }
}

/// Sums over training steps: losses, and what the pseudo-labeler offered and accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTotals {
    pub steps: u64,
    pub sup: f64,
    pub pseudo: f64,
    pub consistency: f64,
    pub offered: u64,
    pub accepted: u64,
    /// Accepted pseudo-labels whose sample had a known truth, and how many of them matched.
    pub accepted_with_truth: u64,
    pub accepted_correct: u64,
}

impl StepTotals {
    pub fn add(&mut self, step: &StepReport) {
        self.steps += 1;
        self.sup += step.losses.sup as f64;
        self.pseudo += step.losses.pseudo as f64;
        self.consistency += step.losses.consistency as f64;
        self.offered += step.offered as u64;
        self.accepted += step.accepted as u64;
        self.accepted_with_truth += step.accepted_with_truth as u64;
        self.accepted_correct += step.accepted_correct as u64;
    }

    fn mean(&self, sum: f64) -> Option<f64> {
        (self.steps > 0).then(|| sum / self.steps as f64)
    }

    /// Mean losses per step (`None` when no step ran).
    pub fn mean_sup(&self) -> Option<f64> {
        self.mean(self.sup)
    }

    pub fn mean_pseudo(&self) -> Option<f64> {
        self.mean(self.pseudo)
    }

    pub fn mean_consistency(&self) -> Option<f64> {
        self.mean(self.consistency)
    }

    /// Accepted share of the offered pseudo-labels (`None` when none was offered).
    pub fn acceptance(&self) -> Option<f64> {
        (self.offered > 0).then(|| self.accepted as f64 / self.offered as f64)
    }

    /// The totals so far, and a fresh start (one reporting interval closes).
    pub fn take(&mut self) -> StepTotals {
        std::mem::take(self)
    }
}
