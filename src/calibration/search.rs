//! Finding the mounting: the label-free score ([`infomax`]) and the search/adoption state
//! machine ([`Calibrator`]) that proposes a candidate from the stream and lets labels adopt
//! or revert it.
//!
//! The calibrator never runs a model: the caller hands [`Calibrator::search`] and
//! [`Calibrator::label`] a closure that predicts a batch with the *frozen pretrained* model,
//! so the score measures the mounting and not whatever the adapting head has learned.

use ndarray::{Array2, ArrayView2};

use super::mounting::{groups_of, transform, Group, Mounting, SignedPerm};
use super::CalibrationConfig;
use crate::stream::Layout;

/// Once a mounting is adopted, searches (which only watch for a re-mounted device) run this
/// many times less often than `search_every`: a search costs 48 × `window` backbone runs.
pub const ADOPTED_SEARCH_SLOWDOWN: usize = 16;

/// Labeled samples kept so that a newly proposed mounting is weighed on past labels too.
pub const LABELED_KEPT: usize = 64;

/// Probabilities are clamped here before a logarithm, so one confident mistake costs at most
/// ln(1e7) ≈ 16 of evidence instead of infinity.
const PROB_FLOOR: f32 = 1e-7;

/// -p·ln p, with 0·ln 0 = 0.
fn neg_plogp(p: f64) -> f64 {
    if p > 0.0 {
        -p * p.ln()
    } else {
        0.0
    }
}

/// H(mean p) − mean H(p) over the rows of a probability matrix (natural log; 0·log 0 = 0).
/// High when each prediction is confident *and* the predictions differ between samples.
pub fn infomax(probs: ArrayView2<f32>) -> f32 {
    let n = probs.nrows();
    if n == 0 {
        return 0.0;
    }
    let marginal: f64 = probs
        .columns()
        .into_iter()
        .map(|col| neg_plogp(col.iter().map(|&p| p as f64).sum::<f64>() / n as f64))
        .sum();
    let conditional: f64 = probs.iter().map(|&p| neg_plogp(p as f64)).sum::<f64>() / n as f64;
    (marginal - conditional) as f32
}

/// What happened in [`Calibrator::search`] or [`Calibrator::label`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CalibrationEvent {
    /// A search found `r` more informative than the adopted mounting; labels decide.
    Proposed {
        r: SignedPerm,
        infomax: f32,
        identity_infomax: f32,
    },
    /// Labels confirmed `r` by `log_ratio` nats over the mounting it replaces.
    Adopted { r: SignedPerm, log_ratio: f32 },
    /// Labels since adoption made `r` worse than identity by `-log_ratio` nats.
    Reverted { r: SignedPerm, log_ratio: f32 },
}

/// A proposed mounting and the label evidence gathered since it was proposed.
#[derive(Debug, Clone, Copy)]
struct Pending {
    r: SignedPerm,
    /// Σ log p_r(y|x) − log p_adopted(y|x).
    vs_adopted: f64,
    /// Σ log p_r(y|x) − log p_identity(y|x): carried over on adoption as the revert statistic.
    vs_identity: f64,
}

/// The search/adoption state machine (see the module docs). It never runs a model itself:
/// the caller passes a scoring closure that embeds and predicts a batch with the FROZEN
/// pretrained model.
///
/// Schedule: a search is due once the ring holds `window` samples and `search_every` samples
/// arrived since the last one; after adoption only every
/// [`ADOPTED_SEARCH_SLOWDOWN`]` × search_every`, to notice a device that was re-mounted.
/// A search that proposes the pending candidate again keeps its evidence; one that proposes
/// another resets it; one that finds nothing better than the adopted mounting drops it.
pub struct Calibrator {
    cfg: CalibrationConfig,
    layout: Layout,
    groups: Vec<Group>,
    candidates: Vec<SignedPerm>,
    /// The last `window` raw samples, back to back, oldest overwritten first.
    ring: Vec<f32>,
    ring_len: usize,
    ring_next: usize,
    since_search: usize,
    /// Searches that found nothing double the wait for the next one (up to
    /// [`ADOPTED_SEARCH_SLOWDOWN`]), so a well-mounted device stops paying for them.
    backoff: usize,
    /// The ring transformed by one candidate: what the scoring closure sees.
    batch: Vec<f32>,
    probs: Array2<f32>,
    /// Up to three transforms of one labelled sample.
    label_batch: Vec<f32>,
    label_probs: Array2<f32>,
    /// The last [`LABELED_KEPT`] labeled raw samples: the frozen model's answer on them does
    /// not change with time, so a candidate proposed later is weighed on them at once.
    labeled: Vec<f32>,
    labeled_y: Vec<usize>,
    labeled_next: usize,
    scores: Vec<(SignedPerm, f32)>,
    adopted: SignedPerm,
    candidate: Option<Pending>,
    /// Σ log p_adopted(y|x) − log p_identity(y|x), from the labels that adopted it on.
    adopted_vs_identity: f64,
    /// While set, a candidate the labels confirm is not adopted yet (its evidence is kept):
    /// see [`Calibrator::hold_adoption`].
    hold: bool,
}

impl Calibrator {
    /// Panics if a group names a channel the layout does not have (see
    /// [`CalibrationConfig::validate`]).
    pub fn new(cfg: CalibrationConfig, layout: Layout) -> Self {
        let groups = groups_of(&cfg, &layout);
        let len = layout.sample_len();
        let window = cfg.window.max(1);
        Calibrator {
            groups,
            layout,
            candidates: SignedPerm::all(),
            ring: vec![0.0; window * len],
            ring_len: 0,
            ring_next: 0,
            since_search: 0,
            backoff: 1,
            batch: vec![0.0; window * len],
            probs: Array2::zeros((0, 0)),
            label_batch: vec![0.0; 3 * len],
            label_probs: Array2::zeros((0, 0)),
            labeled: Vec::with_capacity(LABELED_KEPT * len),
            labeled_y: Vec::with_capacity(LABELED_KEPT),
            labeled_next: 0,
            scores: Vec::with_capacity(48),
            adopted: SignedPerm::IDENTITY,
            candidate: None,
            adopted_vs_identity: 0.0,
            hold: false,
            cfg,
        }
    }

    pub fn config(&self) -> &CalibrationConfig {
        &self.cfg
    }

    /// IDENTITY until labels confirm a candidate.
    pub fn adopted(&self) -> SignedPerm {
        self.adopted
    }

    /// Proposed by a search, not yet adopted.
    pub fn candidate(&self) -> Option<SignedPerm> {
        self.candidate.map(|p| p.r)
    }

    /// Every candidate's information score in the last search (empty before the first).
    pub fn last_scores(&self) -> &[(SignedPerm, f32)] {
        &self.scores
    }

    /// The adopted mounting, to apply to every sample before the model.
    pub fn mounting(&self) -> Mounting {
        Mounting {
            groups: self.groups.clone(),
            layout: self.layout,
            r: self.adopted,
        }
    }

    /// A new raw (uncalibrated) sample: kept in a ring of `window` samples (preallocated).
    /// Panics if its length is not the layout's sample length.
    pub fn observe(&mut self, raw: &[f32]) {
        let len = self.layout.sample_len();
        assert_eq!(raw.len(), len, "calibration sample length");
        let window = self.ring.len() / len.max(1);
        if window == 0 {
            return;
        }
        let at = self.ring_next * len;
        self.ring[at..at + len].copy_from_slice(raw);
        self.ring_next = (self.ring_next + 1) % window;
        self.ring_len = (self.ring_len + 1).min(window);
        self.since_search = self.since_search.saturating_add(1);
    }

    fn search_interval(&self) -> usize {
        if self.adopted == SignedPerm::IDENTITY {
            self.cfg.search_every.saturating_mul(self.backoff)
        } else {
            self.cfg
                .search_every
                .saturating_mul(ADOPTED_SEARCH_SLOWDOWN)
        }
    }

    /// The ring is full and the schedule says so (see the type docs).
    pub fn search_due(&self) -> bool {
        self.ring_len >= self.cfg.window && self.since_search >= self.search_interval()
    }

    /// Scores every candidate on the ring with `score(inputs, n, probs_out)` (inputs: n
    /// transformed samples back to back; fills probs_out `[n, classes]`), one batched call
    /// per candidate, and proposes the best if it beats the adopted mounting's score. The
    /// events, in order: the proposal, and Adopted when the labels already seen confirm it.
    ///
    /// The schedule restarts before scoring, so a failing model is retried at the next
    /// scheduled search, not on every sample.
    pub fn search<E>(
        &mut self,
        mut score: impl FnMut(&[f32], usize, &mut Array2<f32>) -> Result<(), E>,
    ) -> Result<Vec<CalibrationEvent>, E> {
        self.since_search = 0;
        self.scores.clear();
        let len = self.layout.sample_len();
        let n = self.ring_len;
        if n == 0 {
            return Ok(Vec::new());
        }
        for r in &self.candidates {
            for (x, out) in self.ring[..n * len]
                .chunks_exact(len)
                .zip(self.batch.chunks_exact_mut(len))
            {
                transform(&self.groups, &self.layout, r, x, out);
            }
            score(&self.batch[..n * len], n, &mut self.probs)?;
            self.scores.push((*r, infomax(self.probs.view())));
        }
        let find = |want: SignedPerm| {
            self.scores
                .iter()
                .find(|(r, _)| *r == want)
                .map_or(0.0, |s| s.1)
        };
        let identity_infomax = find(SignedPerm::IDENTITY);
        let adopted_infomax = find(self.adopted);
        // First strictly best: identity (listed first) wins ties.
        let (best, best_infomax) =
            self.scores
                .iter()
                .copied()
                .fold((SignedPerm::IDENTITY, f32::NEG_INFINITY), |b, s| {
                    if s.1 > b.1 {
                        s
                    } else {
                        b
                    }
                });
        if best == self.adopted || best_infomax <= adopted_infomax {
            self.candidate = None;
            self.backoff = (self.backoff * 2).min(ADOPTED_SEARCH_SLOWDOWN);
            return Ok(Vec::new());
        }
        self.backoff = 1;
        let proposed = CalibrationEvent::Proposed {
            r: best,
            infomax: best_infomax,
            identity_infomax,
        };
        if self.candidate.map(|p| p.r) != Some(best) {
            self.candidate = Some(Pending {
                r: best,
                vs_adopted: 0.0,
                vs_identity: 0.0,
            });
            // Labels that came before the proposal are as clean a test of a frozen model
            // as the ones after it.
            let len = self.layout.sample_len();
            let past = std::mem::take(&mut self.labeled);
            let past_y = std::mem::take(&mut self.labeled_y);
            let mut adopted = Ok(None);
            for (x, &y) in past.chunks_exact(len).zip(&past_y) {
                adopted = self.weigh(x, y, false, &mut score);
                if !matches!(adopted, Ok(None)) {
                    break;
                }
            }
            self.labeled = past;
            self.labeled_y = past_y;
            // Proposed first, also when the labels adopt it at once: the proposal happened,
            // and the operator's log and the report's count say so.
            if let Some(event) = adopted? {
                return Ok(vec![proposed, event]);
            }
        }
        Ok(vec![proposed])
    }

    /// A label for raw sample `raw`: adds log p_cand(y|x) − log p_adopted(y|x) to the
    /// candidate's evidence (and log p_adopted − log p_identity to the revert statistic),
    /// scoring up to three transforms of the sample in one call. Returns Adopted/Reverted
    /// when a threshold is crossed. Labels outside the scored classes are ignored.
    pub fn label<E>(
        &mut self,
        raw: &[f32],
        label: usize,
        mut score: impl FnMut(&[f32], usize, &mut Array2<f32>) -> Result<(), E>,
    ) -> Result<Option<CalibrationEvent>, E> {
        let len = self.layout.sample_len();
        if self.labeled_y.len() < LABELED_KEPT {
            self.labeled.extend_from_slice(raw);
            self.labeled_y.push(label);
        } else {
            let at = self.labeled_next;
            self.labeled[at * len..(at + 1) * len].copy_from_slice(raw);
            self.labeled_y[at] = label;
        }
        self.labeled_next = (self.labeled_next + 1) % LABELED_KEPT;
        self.weigh(raw, label, true, &mut score)
    }

    /// One label's evidence (see [`Calibrator::label`]); `fresh` labels also count toward
    /// reverting the adopted mounting (past ones already did).
    fn weigh<E>(
        &mut self,
        raw: &[f32],
        label: usize,
        fresh: bool,
        mut score: impl FnMut(&[f32], usize, &mut Array2<f32>) -> Result<(), E>,
    ) -> Result<Option<CalibrationEvent>, E> {
        let identity = SignedPerm::IDENTITY;
        let watch_adopted = self.adopted != identity;
        if self.candidate.is_none() && !watch_adopted {
            return Ok(None);
        }
        // Slot 0: adopted; then the candidate and identity, where they apply.
        let mut rs = [self.adopted; 3];
        let mut n = 1;
        let cand_slot = self.candidate.map(|p| {
            rs[n] = p.r;
            n += 1;
            n - 1
        });
        let ident_slot = if watch_adopted {
            rs[n] = identity;
            n += 1;
            n - 1
        } else {
            0
        };
        let len = self.layout.sample_len();
        for (r, out) in rs[..n].iter().zip(self.label_batch.chunks_exact_mut(len)) {
            transform(&self.groups, &self.layout, r, raw, out);
        }
        score(&self.label_batch[..n * len], n, &mut self.label_probs)?;
        if label >= self.label_probs.ncols() || self.label_probs.nrows() < n {
            return Ok(None);
        }
        let logp = |i: usize| (self.label_probs[[i, label]].max(PROB_FLOOR) as f64).ln();
        let (adopted, ident) = (logp(0), logp(ident_slot));
        let cand = cand_slot.map(logp);
        let threshold = self.cfg.adopt_log_ratio as f64;

        // One label moves the evidence by at most half the threshold: at least two labels
        // must agree before a mounting is adopted or reverted.
        let cap = |d: f64| d.clamp(-threshold / 2.0, threshold / 2.0);
        if let (Some(p), Some(cand)) = (self.candidate.as_mut(), cand) {
            p.vs_adopted += cap(cand - adopted);
            p.vs_identity += cap(cand - ident);
            if p.vs_adopted >= threshold && !self.hold {
                let p = *p;
                self.adopted = p.r;
                self.candidate = None;
                // The revert statistic continues from the labels that adopted it, so
                // reverting needs the evidence to swing by 2× the threshold.
                self.adopted_vs_identity = p.vs_identity;
                self.since_search = 0;
                return Ok(Some(CalibrationEvent::Adopted {
                    r: p.r,
                    log_ratio: p.vs_adopted as f32,
                }));
            }
        }
        if watch_adopted && fresh {
            self.adopted_vs_identity += cap(adopted - ident);
            if self.adopted_vs_identity <= -threshold {
                let r = self.adopted;
                let log_ratio = self.adopted_vs_identity as f32;
                self.adopted = identity;
                self.candidate = None;
                self.adopted_vs_identity = 0.0;
                self.since_search = 0;
                return Ok(Some(CalibrationEvent::Reverted { r, log_ratio }));
            }
        }
        Ok(None)
    }

    /// Holds adoptions back (`hold`) or lets them through again. The session holds them while
    /// the serving gate serves the adapted teacher: the labels have shown that teacher better
    /// than the pretrained model, and a candidate mounting only the pretrained model behind
    /// it, while adopting starts the learner and the gate's evidence over. Reverting is never
    /// held. A candidate confirmed meanwhile is adopted at the first label after the hold.
    pub fn hold_adoption(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Restore an adopted R (from a checkpoint).
    pub fn set_adopted(&mut self, r: SignedPerm) {
        self.adopted = r;
        self.candidate = None;
        // Its evidence is not stored: it starts from zero, so labels that contradict it
        // revert it after a swing of one threshold.
        self.adopted_vs_identity = 0.0;
        self.since_search = 0;
    }
}
