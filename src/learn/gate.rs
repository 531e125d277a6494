//! The serving gate: which model answers, decided from test-then-train evidence.
//!
//! Every label that arrives is first a clean test of the deployed teacher against the
//! pretrained model (neither has trained on it yet); only then is it learned from. Labels on
//! which the two disagree about being right are the evidence: a *win* when only the teacher is
//! right, a *loss* when only the pretrained model is. The adapted teacher is served only while
//! a one-sided exact sign test (McNemar's test on the discordant pairs) over the most recent
//! `window` of them says it is better at level `alpha`; otherwise the pretrained model is
//! served and learning goes on. Because the test is re-run at every label, the nominal level
//! is not the true false-switch rate; it is kept small by default, and a teacher that is
//! truly worse rarely passes it. When the evidence turns, the gate falls back by itself.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Off: always serve the adapted teacher (the behaviour before the gate).
    pub enabled: bool,
    /// One-sided level of the sign test.
    pub alpha: f64,
    /// Most recent discordant labels the test looks at (older evidence expires, so a teacher
    /// that got worse is caught).
    pub window: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            enabled: true,
            alpha: 0.05,
            window: 200,
        }
    }
}

/// Which model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Serving {
    /// The pretrained model (behind any adopted calibration).
    Pretrained,
    /// The adapted teacher.
    Adapted,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Gate {
    cfg: GateConfig,
    /// Discordant outcomes, oldest first: `true` = the teacher alone was right.
    outcomes: VecDeque<bool>,
    wins: u64,
    losses: u64,
    serving: Serving,
    switches: u64,
}

impl Gate {
    pub fn new(cfg: GateConfig) -> Self {
        let serving = if cfg.enabled {
            Serving::Pretrained
        } else {
            Serving::Adapted
        };
        Gate {
            outcomes: VecDeque::with_capacity(cfg.window.max(1)),
            cfg,
            wins: 0,
            losses: 0,
            serving,
            switches: 0,
        }
    }

    pub fn serving(&self) -> Serving {
        self.serving
    }

    /// Discordant labels in the window: the teacher alone right, the pretrained model alone.
    pub fn wins(&self) -> u64 {
        self.wins
    }

    pub fn losses(&self) -> u64 {
        self.losses
    }

    /// Times the served model changed.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// p-value of "the teacher is no better than the pretrained model" on the window.
    pub fn p_value(&self) -> f64 {
        sign_test_p(self.wins, self.losses)
    }

    /// The window's outcomes, oldest first (for checkpoints).
    pub fn outcomes(&self) -> impl Iterator<Item = bool> + '_ {
        self.outcomes.iter().copied()
    }

    /// One tested label: was the teacher right, was the pretrained model right. Returns the
    /// newly served model when this label changed it.
    pub fn record(&mut self, teacher_right: bool, pretrained_right: bool) -> Option<Serving> {
        if teacher_right != pretrained_right {
            self.push(teacher_right);
        }
        self.decide()
    }

    /// Puts back saved outcomes (oldest first).
    pub fn restore(&mut self, outcomes: impl IntoIterator<Item = bool>) {
        self.clear();
        outcomes.into_iter().for_each(|o| self.push(o));
        self.decide();
    }

    /// Forgets the evidence (the models it was about changed) and serves the pretrained model.
    pub fn clear(&mut self) {
        self.outcomes.clear();
        self.wins = 0;
        self.losses = 0;
        self.decide();
    }

    fn push(&mut self, win: bool) {
        if self.outcomes.len() == self.cfg.window.max(1) {
            match self.outcomes.pop_front() {
                Some(true) => self.wins -= 1,
                Some(false) => self.losses -= 1,
                None => {}
            }
        }
        self.outcomes.push_back(win);
        if win {
            self.wins += 1;
        } else {
            self.losses += 1;
        }
    }

    fn decide(&mut self) -> Option<Serving> {
        let now = if !self.cfg.enabled || self.p_value() <= self.cfg.alpha {
            Serving::Adapted
        } else {
            Serving::Pretrained
        };
        if now == self.serving {
            return None;
        }
        self.serving = now;
        self.switches += 1;
        Some(now)
    }
}

/// One-sided exact sign test: P(X ≥ wins) for X ~ Binomial(wins + losses, 1/2), i.e. the
/// chance of at least this many wins if wins and losses were equally likely (1 with no
/// discordant pair).
pub fn sign_test_p(wins: u64, losses: u64) -> f64 {
    let n = wins + losses;
    if n == 0 {
        return 1.0;
    }
    // Σ_{k ≥ wins} C(n, k) / 2^n, summed in log space so large n cannot overflow.
    let ln_fact = |m: u64| (1..=m).map(|i| (i as f64).ln()).sum::<f64>();
    let ln_n = ln_fact(n);
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_k = ln_fact(wins);
    let mut ln_nk = ln_fact(n - wins);
    let mut p = 0.0;
    for k in wins..=n {
        p += (ln_n - ln_k - ln_nk + ln_half_n).exp();
        // Move from k to k + 1: ln k! gains ln(k+1), ln (n−k)! loses ln(n−k).
        ln_k += ((k + 1) as f64).ln();
        if n > k {
            ln_nk -= ((n - k) as f64).ln();
        }
    }
    p.min(1.0)
}
