//! The serving gate: which model answers, decided from test-then-train evidence.
//!
//! Every label that arrives is first a clean test of the deployed teacher against the
//! pretrained model (neither has trained on it yet); only then is it learned from. Labels on
//! which the two disagree about being right are the evidence the gate owns: a *win* when only
//! the teacher is right, a *loss* when only the pretrained model is. The gate bets against
//! "the teacher is no better" (P(win) ≤ 1/2 at every label) with a few fixed stakes, starting
//! a new bet at the j-th discordant label with weight 1/(j(j+1)), so a gain that appears late
//! needs only about 2·ln j nats more evidence instead of being outweighed by the early labels.
//! While the teacher is no better, the wealth (plus the weight of bets not yet started) is a
//! nonnegative supermartingale from 1, so by Ville's inequality it ever reaches 1/`alpha` with
//! probability at most `alpha`, however long the stream. The adapted teacher is served once
//! the wealth reaches 1/`alpha`, and while it stays at least `fallback`/`alpha` (the same
//! level by default); looking at every label does not raise that level. Each
//! bet's wealth is capped, so a teacher that turns worse loses the gate within a few losses.
//! The guarantee is per run of evidence: [`Gate::clear`] (a rollback) and [`Gate::restore`] (a
//! restart, replaying the saved window) each begin a new one.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Off: always serve the adapted teacher (the behaviour before the gate).
    pub enabled: bool,
    /// Largest chance that a teacher no better than the pretrained model is ever served (the
    /// wealth must reach 1/alpha).
    pub alpha: f64,
    /// Most recent discordant labels kept for checkpoints and telemetry; a restart recomputes
    /// the wealth from them.
    pub window: usize,
    /// Once the teacher is served, it stays served until the wealth falls below
    /// `fallback`/`alpha` (1: no hysteresis). Switching still needs 1/`alpha`, so the chance
    /// that a teacher no better than the pretrained model is ever served stays `alpha`; what
    /// a lower value costs is a slower fall-back from a teacher that turns worse (tests/gate.rs
    /// measures both sides).
    pub fallback: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            enabled: true,
            alpha: 0.05,
            window: 200,
            fallback: 1.0,
        }
    }
}

/// Fractions of its wealth each bet stakes on a win, with equal prior weight. The best stake
/// is 2·P(win) − 1: 0.1 finds a teacher right on 55 % of discordant labels, 0.5 one right on
/// 75 %, 0.9 one that is nearly always right. The two large stakes are for short evidence:
/// with a budget of a few dozen labels, eight straight wins serve the teacher (eleven with
/// stakes up to 0.5 only); one loss costs them most of their wealth, so they add nothing
/// once the evidence is mixed. Mixing six costs at most ln 6 nats against the best of them
/// in hindsight; simulated, the median delay for P(win) = 0.7 stays at 37 labels.
pub const BETS: [f64; 6] = [0.1, 0.2, 0.35, 0.5, 0.7, 0.9];

/// Each bet's wealth is capped at this many times the serving threshold 1/alpha (the minimum
/// with a constant is concave, so the wealth stays a supermartingale). The cap bounds what a
/// long good run can buy: once P(win) drops to 0.25, the wealth falls under the threshold
/// after a median 7 discordant labels (90 % within 12; simulated, 2,000 streams). A lower
/// cap falls back faster but makes a good teacher (P(win) = 0.7) drop out of service on
/// short runs of losses more often (tests/gate.rs measures this constant).
pub const CAP_OVER_THRESHOLD: f64 = 5.0;

/// Which model answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Serving {
    /// The pretrained model (behind any adopted calibration).
    Pretrained,
    /// The adapted teacher.
    Adapted,
}

impl Serving {
    /// The served model in words, with the one name each model has everywhere (the replay's
    /// summary and plot, `edgemt export`, the README): "the adapted teacher"; "the calibrated
    /// model" for the pretrained model behind an adopted `mounting` (e.g. `x,z,-y`); "the
    /// pretrained model" on the device's own axes.
    pub fn describe(self, mounting: Option<&str>) -> String {
        match (self, mounting.filter(|m| *m != "x,y,z")) {
            (Serving::Adapted, _) => "the adapted teacher".to_string(),
            (Serving::Pretrained, Some(m)) => {
                format!("the calibrated model (the pretrained model behind mounting {m})")
            }
            (Serving::Pretrained, None) => "the pretrained model".to_string(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Gate {
    cfg: GateConfig,
    /// Discordant outcomes, oldest first: `true` = the teacher alone was right.
    outcomes: VecDeque<bool>,
    wins: u64,
    losses: u64,
    /// Discordant labels since the evidence began: the next one starts bet number `started + 1`.
    started: u64,
    /// Per bet size, the capped wealth of all its bets started so far.
    wealth: [f64; BETS.len()],
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
            started: 0,
            wealth: [0.0; BETS.len()],
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

    /// Why the gate serves what it serves, in an operator's words (the replay's summary, its
    /// report and `edgemt export` say it).
    pub fn reason(&self) -> String {
        let (wins, losses, p, alpha) = (self.wins, self.losses, self.p_value(), self.cfg.alpha);
        let evidence = format!(
            "{wins} win(s), {losses} loss(es) on labels where only one of the two was right"
        );
        match (self.cfg.enabled, self.serving) {
            (false, _) => "the serving gate is off ([gate] enabled = false)".to_string(),
            (true, Serving::Adapted) if self.cfg.fallback < 1.0 => format!(
                "the serving gate confirmed that the adapted teacher is better, and it stays served while p <= {} (p = {p:.4}; {evidence})",
                1.0 / self.threshold()
            ),
            (true, Serving::Adapted) => format!(
                "the serving gate confirmed that the adapted teacher is better (p = {p:.4} <= alpha {alpha}; {evidence})"
            ),
            (true, Serving::Pretrained) => format!(
                "the serving gate has not confirmed that the adapted teacher is better (p = {p:.4}, it needs <= {alpha}; {evidence})"
            ),
        }
    }

    /// Times the served model changed.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// The evidence against "the teacher is no better": the mixture's wealth (0 before any
    /// discordant label; at most `CAP_OVER_THRESHOLD / alpha`).
    pub fn e_value(&self) -> f64 {
        self.wealth.iter().sum::<f64>() / BETS.len() as f64
    }

    /// Anytime-valid p-value of "the teacher is no better than the pretrained model": 1 over
    /// the wealth, so it can be watched at every label. The cap floors it at
    /// `alpha / CAP_OVER_THRESHOLD`.
    pub fn p_value(&self) -> f64 {
        (1.0 / self.e_value()).min(1.0)
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

    /// Puts back saved outcomes (oldest first). The wealth is not saved: it is recomputed by
    /// betting on these outcomes from the start, so a restart is a new run of evidence on the
    /// saved window, not a continuation of the old one.
    pub fn restore(&mut self, outcomes: impl IntoIterator<Item = bool>) {
        self.clear();
        outcomes.into_iter().for_each(|o| self.push(o));
        self.decide();
    }

    /// Forgets the evidence (the models it was about changed) and serves the pretrained model:
    /// no wealth, and the next discordant label starts bet number 1 again.
    pub fn clear(&mut self) {
        self.outcomes.clear();
        self.wins = 0;
        self.losses = 0;
        self.started = 0;
        self.wealth = [0.0; BETS.len()];
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
        self.bet(win);
    }

    /// Starts bet number j = `started + 1` with weight 1/(j(j+1)) (these sum to 1 over all j),
    /// then settles every bet on this outcome.
    fn bet(&mut self, win: bool) {
        self.started += 1;
        let j = self.started as f64;
        let weight = 1.0 / (j * (j + 1.0));
        let cap = CAP_OVER_THRESHOLD / self.cfg.alpha;
        let sign = if win { 1.0 } else { -1.0 };
        for (w, bet) in self.wealth.iter_mut().zip(&BETS) {
            *w = ((*w + weight) * (1.0 + sign * bet)).min(cap);
        }
    }

    /// The wealth the teacher needs now: 1/`alpha` to be served, `fallback`/`alpha` to stay.
    fn threshold(&self) -> f64 {
        match self.serving {
            Serving::Adapted => self.cfg.fallback / self.cfg.alpha,
            Serving::Pretrained => 1.0 / self.cfg.alpha,
        }
    }

    fn decide(&mut self) -> Option<Serving> {
        let now = if !self.cfg.enabled || self.e_value() >= self.threshold() {
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
