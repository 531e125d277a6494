//! Label requests: which samples the device asks a person to label, and how many.
//!
//! A label decides most where the adapted teacher and the pretrained model disagree: only
//! such labels move the serving gate, and they are the most informative ones for the
//! learner too. So a disagreement is asked about first; when the budget is saved up and no
//! disagreement comes, the adapted model's most uncertain samples are asked about instead,
//! which spreads the requests over time. The choice reads model outputs only, never an
//! answer, so the gate's test on the answers stays valid.
//!
//! A share `explore` of the budget asks about samples picked regardless of what the models
//! say (every so many samples): labels chosen by model outputs are biased evidence for
//! anything that compares the pretrained model with an alternative (calibration adopts a
//! mounting on labels, and a label asked for because the pretrained model disagreed is more
//! often one it gets wrong), and they cluster on a few confused classes. The sampled ones
//! are clean evidence and cover every class.
//!
//! The budget is a token bucket: every sample seen adds `fraction` of a request, a request
//! spends one, and at most `burst` are saved up, so requests never exceed `fraction` of the
//! samples seen so far. On top: at most `per_hour` in any hour, at most `max_open`
//! unanswered at once, and a request not answered within `open_s` seconds expires. Time is
//! whatever clock the caller passes (seconds); the answers themselves come back by id
//! through the session.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestConfig {
    /// Whether the daemon asks at all (replay asks only with `--label-budget`).
    pub enabled: bool,
    /// At most this share of the samples seen so far is asked about.
    pub fraction: f64,
    /// At most this many requests in any hour (0: no hourly limit).
    pub per_hour: u32,
    /// At most this many unanswered requests at once.
    pub max_open: usize,
    /// Seconds a request stays open before it expires.
    pub open_s: f64,
    /// Requests the budget may save up for disagreements to come.
    pub burst: f64,
    /// Share of the requests made about samples picked regardless of the models' outputs.
    pub explore: f64,
}

impl Default for RequestConfig {
    fn default() -> Self {
        RequestConfig {
            enabled: true,
            fraction: 0.01,
            per_hour: 30,
            max_open: 1,
            open_s: 600.0,
            burst: 5.0,
            explore: 0.25,
        }
    }
}

/// One model's answer on a sample: its class and its probability.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Opinion {
    pub class: usize,
    pub confidence: f32,
}

/// Why a sample was asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The adapted teacher and the pretrained model answer differently.
    Disagreement,
    /// They agree, but the adapted teacher is unsure.
    Uncertain,
    /// Picked regardless of the models' outputs (`explore`).
    Sampled,
}

/// What the models said about a sample that could be asked about.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a str,
    /// The model that answered the device's user.
    pub served: Opinion,
    pub adapted: Opinion,
    pub pretrained: Opinion,
}

/// An open request.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Request {
    /// The sample's id: the answer names it (or answers "the open request").
    pub id: String,
    /// When it was asked, on the caller's clock (seconds).
    pub asked_s: f64,
    pub served: Opinion,
    pub adapted: Opinion,
    pub pretrained: Opinion,
    pub reason: Reason,
}

/// What the requests came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RequestCounts {
    /// Requests made.
    pub made: u64,
    /// Of those: at a disagreement, or at an uncertain sample.
    pub disagreement: u64,
    pub uncertain: u64,
    pub sampled: u64,
    pub answered: u64,
    /// Answers on which exactly one of the adapted and the pretrained model was right (the
    /// ones that move the serving gate).
    pub discordant: u64,
    pub expired: u64,
}

/// Share of recent samples whose uncertainty counts as "most uncertain".
const UNCERTAIN_SHARE: f32 = 0.2;
/// Step of the running quantile estimate of the uncertainty.
const QUANTILE_STEP: f32 = 0.01;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Requests {
    cfg: RequestConfig,
    tokens: f64,
    /// The `explore` share of the budget: when it holds a whole request, the next candidate
    /// is asked about whatever the models say.
    explore_tokens: f64,
    open: VecDeque<Request>,
    /// When the requests of the last hour were made, oldest first.
    last_hour: VecDeque<f64>,
    /// Running estimate of the uncertainty above which a sample is among the most
    /// uncertain `UNCERTAIN_SHARE` of the stream.
    threshold: f32,
    counts: RequestCounts,
}

impl Requests {
    pub fn new(cfg: RequestConfig) -> Self {
        Requests {
            open: VecDeque::with_capacity(cfg.max_open),
            last_hour: VecDeque::new(),
            cfg,
            tokens: 0.0,
            explore_tokens: 0.0,
            threshold: 0.5,
            counts: RequestCounts::default(),
        }
    }

    pub fn config(&self) -> &RequestConfig {
        &self.cfg
    }

    pub fn counts(&self) -> RequestCounts {
        self.counts
    }

    /// Unanswered requests, oldest first.
    pub fn open(&self) -> impl Iterator<Item = &Request> {
        self.open.iter()
    }

    /// The newest unanswered request: the one an answer without an id is for.
    pub fn newest_open(&self) -> Option<&Request> {
        self.open.back()
    }

    /// One sample seen (labeled or not): adds to the budget.
    pub fn seen(&mut self) {
        self.seen_wanting(false);
    }

    /// [`Requests::seen`], when `clean_wanted`: something waits for clean evidence (a
    /// mounting that calibration proposed and only unselected labels may confirm), so the
    /// whole budget goes to samples picked regardless of the models while it waits.
    pub fn seen_wanting(&mut self, clean_wanted: bool) {
        let share = if clean_wanted { 1.0 } else { self.cfg.explore };
        self.tokens = (self.tokens + self.cfg.fraction).min(self.cfg.burst.max(1.0));
        self.explore_tokens = (self.explore_tokens + self.cfg.fraction * share).min(1.0);
    }

    /// A sample that could be asked about (unlabeled, with an id). Returns the request when
    /// it is asked about.
    pub fn consider(&mut self, now_s: f64, c: Candidate) -> Option<&Request> {
        let uncertainty = 1.0 - c.adapted.confidence;
        let above = uncertainty > self.threshold;
        // Stochastic quantile tracking: the threshold settles where UNCERTAIN_SHARE of the
        // samples lie above it, whatever the model's confidence scale.
        self.threshold += QUANTILE_STEP
            * if above {
                UNCERTAIN_SHARE
            } else {
                -(1.0 - UNCERTAIN_SHARE)
            };
        let reason = if self.explore_tokens >= 1.0 - 1e-9 {
            Reason::Sampled
        } else if c.adapted.class != c.pretrained.class {
            Reason::Disagreement
        } else if above && self.tokens >= self.cfg.burst.max(1.0) - 1e-9 {
            // Only a budget saved up in full goes to uncertain samples: the rest waits for
            // disagreements.
            Reason::Uncertain
        } else {
            return None;
        };
        if self.tokens < 1.0 || self.open.len() >= self.cfg.max_open {
            return None;
        }
        while self.last_hour.front().is_some_and(|&t| now_s - t >= 3600.0) {
            self.last_hour.pop_front();
        }
        if self.cfg.per_hour > 0 && self.last_hour.len() >= self.cfg.per_hour as usize {
            return None;
        }
        if self.cfg.per_hour > 0 {
            self.last_hour.push_back(now_s);
        }
        self.tokens -= 1.0;
        self.counts.made += 1;
        match reason {
            Reason::Disagreement => self.counts.disagreement += 1,
            Reason::Uncertain => self.counts.uncertain += 1,
            Reason::Sampled => {
                self.explore_tokens -= 1.0;
                self.counts.sampled += 1;
            }
        }
        self.open.push_back(Request {
            id: c.id.to_owned(),
            asked_s: now_s,
            served: c.served,
            adapted: c.adapted,
            pretrained: c.pretrained,
            reason,
        });
        self.open.back()
    }

    /// A label arrived for `id`: when it answers an open request, that request is closed and
    /// returned.
    pub fn answer(&mut self, id: &str, label: usize) -> Option<Request> {
        let i = self.open.iter().position(|r| r.id == id)?;
        let r = self.open.remove(i)?;
        self.counts.answered += 1;
        if (r.adapted.class == label) != (r.pretrained.class == label) {
            self.counts.discordant += 1;
        }
        Some(r)
    }

    /// Closes the requests open longer than `open_s`; returns how many.
    pub fn expire(&mut self, now_s: f64) -> usize {
        let before = self.open.len();
        self.open.retain(|r| now_s - r.asked_s < self.cfg.open_s);
        let expired = before - self.open.len();
        self.counts.expired += expired as u64;
        expired
    }

    /// Forgets the open requests (the samples they were about are gone), counting them as
    /// expired.
    pub fn clear_open(&mut self) {
        self.counts.expired += self.open.len() as u64;
        self.open.clear();
    }
}
