//! Label trust: which labels the learner believes, and when labels are *disputed*.
//!
//! Authorization decides who may send a label; it cannot tell an honest label from a well
//! placed lie. The lie that hurts is targeted: swap two similar classes on a fraction of the
//! samples, honest elsewhere. The honest majority hides it from the guard, and every swapped
//! label looks to the serving gate like a win for the adapted teacher, which has learned the
//! swap. What gives it away is that the backbone is frozen: a swapped label sits among honest
//! labels of the other class on inputs the backbone cannot tell apart, so no head can learn it
//! without unlearning them. An honest label that contradicts the pretrained model does so
//! because the input moved (another mounting, another person, an aging sensor), and the labels
//! around a moved input say the same as it.
//!
//! So a label that contradicts a *confident* pretrained model is believed only when the
//! labels of its nearest neighbours in embedding space side with it more than with the
//! pretrained model's class (the deep k-NN defence against clean-label poisoning, Peri et al.
//! 2020, restricted to the labels that would move the gate). Until then it is *held*: neither
//! learned from nor counted by the gate, and looked at again as more labels arrive, so the
//! first honest labels of a real shift are released once their neighbours agree.
//!
//! A swap needs no neighbours to hide if the attacker labels every sample of the pair; then
//! its signature is the pair itself: the pretrained model, at least `dispute_confidence`
//! sure, contradicted in *both* directions, a→b and b→a, on a steady share of the pair's
//! labels. Honest shifts mostly move inputs one way (a rotated sensor makes STANDING look like
//! SITTING, not both at once). When both directions reach `dispute_after` labels and
//! `dispute_share` of the labels the pretrained model gives each of the two classes at that
//! confidence, the labels are *disputed*: the gate's evidence starts over, the pretrained
//! model is served, and the pair's contradicting labels are held, until the contradictions
//! age out of the memory or an operator who knows a class really changed its meaning accepts
//! them (`accept`), which releases the held labels and stops checking their pairs.
//!
//! The default `dispute_confidence` is `confidence` (0.9). That names the swap only where the
//! model is sure of both classes of the pair; many models are only fairly sure of one of two
//! similar classes. Counting from a lower confidence names those swaps too, but a sensor
//! rotated so far that the pretrained model swaps two classes in earnest is then disputed as
//! well: label statistics alone cannot tell the two apart, and neither can the model's
//! agreement outside the pair. The inputs can. With an embedding reference of the model
//! ([`EmbeddingReference`], `[model] reference`), every input (labeled or not) is scored
//! against it, and while the share of recent inputs that sit farther from every class than
//! 95 % of the model's own inputs stays at most `shift_share` (0.10: twice what the model's
//! own inputs show; a sign of shift clears only under [`SHIFT_HYSTERESIS`] of it), the inputs
//! show no sign of shift and contradictions count from `unshifted_dispute_confidence` (0.8). A rotated sensor moves many inputs away from where
//! any training input sat (a quarter of them on the shipped rotated stream); a poisoner
//! relabels inputs the model knows. Without a reference, or on shifted inputs, only
//! contradictions at `dispute_confidence` count. The share is over all inputs, not the
//! labeled ones: requested labels are chosen where the models disagree, which on a rotated
//! sensor is where its inputs happen to look like a training class.
//!
//! Everything here is bounded: the neighbours come from the last `memory` labels, at most
//! `quarantine` labels are held (the oldest is dropped, and counted, first).

use std::collections::VecDeque;
use std::sync::Arc;

use ndarray::{Array2, ArrayView1};

use super::reference::EmbeddingReference;

/// Inputs the atypical share averages over (a plain mean until there are this many, then
/// exponentially weighted): about a quarter of an hour of windows at 1 Hz, so a single
/// activity segment does not decide it.
pub const SHIFT_WINDOW: u64 = 1024;

/// Inputs scored before the reference may say the inputs show no sign of shift.
pub const MIN_INPUTS: u64 = 128;

/// A sign of shift is cleared only once the atypical share is back under this fraction of
/// `shift_share`.
pub const SHIFT_HYSTERESIS: f32 = 0.8;

#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// Off: every label is believed (the behaviour before label trust).
    pub enabled: bool,
    /// Pretrained confidence from which a label that contradicts the pretrained model needs
    /// the support of its neighbours.
    pub confidence: f32,
    /// Neighbours (most recent labels, nearest in embedding space) consulted per label.
    pub neighbours: usize,
    /// Labels remembered for the neighbourhoods.
    pub memory: usize,
    /// Labels held at most (the oldest goes first, counted).
    pub quarantine: usize,
    /// Pretrained confidence from which a contradicting label counts toward a dispute (and,
    /// while its pair is disputed, is held); see the module docs before lowering it.
    pub dispute_confidence: f32,
    /// Contradicting labels needed in each direction of a pair to dispute it.
    pub dispute_after: usize,
    /// ... and the share of the labels the pretrained model gives each class of the pair (at
    /// `dispute_confidence`) that they must make up.
    pub dispute_share: f32,
    /// With an embedding reference showing no sign of shift, contradictions count toward a
    /// dispute from this pretrained confidence (the lower of it and `dispute_confidence`).
    pub unshifted_dispute_confidence: f32,
    /// The inputs show a sign of shift when more than this share of the recent ones sit
    /// farther from every class than 95 % of the model's own inputs (embedding reference).
    pub shift_share: f32,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            enabled: true,
            confidence: 0.9,
            neighbours: 7,
            memory: 256,
            quarantine: 64,
            dispute_confidence: 0.9,
            dispute_after: 4,
            dispute_share: 0.25,
            unshifted_dispute_confidence: 0.8,
            shift_share: 0.1,
        }
    }
}

impl TrustConfig {
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("confidence", self.confidence),
            ("dispute_confidence", self.dispute_confidence),
            (
                "unshifted_dispute_confidence",
                self.unshifted_dispute_confidence,
            ),
            ("shift_share", self.shift_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("trust.{name} must be within [0, 1], not {v}"));
            }
        }
        for (name, v) in [
            ("neighbours", self.neighbours),
            ("memory", self.memory),
            ("quarantine", self.quarantine),
            ("dispute_after", self.dispute_after),
        ] {
            if v == 0 {
                return Err(format!("trust.{name} must be at least 1"));
            }
        }
        if !(0.0..=1.0).contains(&self.dispute_share) {
            return Err(format!(
                "trust.dispute_share must be within [0, 1], not {}",
                self.dispute_share
            ));
        }
        if self.neighbours > self.memory {
            return Err(format!(
                "trust.neighbours ({}) cannot exceed trust.memory ({})",
                self.neighbours, self.memory
            ));
        }
        Ok(())
    }
}

/// Where a label came from: counted for every judged and every held label, so that an
/// operator who sees a dispute knows which door the labels came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// A recording's `label` field or feedback line (replay).
    Recording,
    /// A `label` inside a sample on the samples topic (`[input] inline_labels`).
    Inline,
    /// `{"id", "label"}` on the labels topic.
    ById,
    /// A class name on the labels topic ("what I am doing now").
    ByClass,
    /// An answer to a label request (or, in replay, the simulated user's).
    Answer,
}

impl LabelSource {
    pub const ALL: [LabelSource; 5] = [
        LabelSource::Recording,
        LabelSource::Inline,
        LabelSource::ById,
        LabelSource::ByClass,
        LabelSource::Answer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LabelSource::Recording => "recording",
            LabelSource::Inline => "inline",
            LabelSource::ById => "by_id",
            LabelSource::ByClass => "by_class",
            LabelSource::Answer => "answer",
        }
    }
}

/// Counts per [`LabelSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BySource([u64; LabelSource::ALL.len()]);

impl BySource {
    pub fn add(&mut self, source: LabelSource) {
        self.0[source as usize] += 1;
    }

    pub fn get(&self, source: LabelSource) -> u64 {
        self.0[source as usize]
    }

    /// "by_id 12, inline 3": the sources with a count.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = LabelSource::ALL
            .iter()
            .filter(|s| self.get(**s) > 0)
            .map(|s| format!("{} {}", s.name(), self.get(*s)))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

impl serde::Serialize for BySource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for source in LabelSource::ALL {
            if self.get(source) > 0 {
                m.serialize_entry(source.name(), &self.get(source))?;
            }
        }
        m.end()
    }
}

/// A label that is not believed (yet), with what filing it later needs.
#[derive(Debug, Clone)]
pub struct Held {
    pub input: Vec<f32>,
    pub embedding: Vec<f32>,
    pub label: usize,
    /// The pretrained model's class for the input (what the label contradicts).
    pub pretrained: usize,
    /// Its entry in the memory (so it is not its own neighbour).
    seq: u64,
}

/// What became of one label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Believed,
    Held,
}

/// A verdict, and whether the label raised the disputed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub verdict: Verdict,
    pub raised: bool,
}

impl Judged {
    fn believed() -> Self {
        Judged {
            verdict: Verdict::Believed,
            raised: false,
        }
    }
}

/// Counts for reports and telemetry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrustCounts {
    /// Labels held when they arrived.
    pub held: u64,
    /// Held labels released because their neighbours came to agree.
    pub released: u64,
    /// Held labels dropped unlearned (the quarantine was full).
    pub dropped: u64,
    /// Held labels an operator accepted.
    pub accepted: u64,
    /// Times the disputed state was raised.
    pub disputes: u64,
    /// Labels judged, and labels held, by where they came from.
    pub judged_from: BySource,
    pub held_from: BySource,
}

/// What label trust keeps across a restart (in the checkpoint): the memory, oldest first,
/// and the pairs an operator accepted, so neither the neighbourhoods nor a dispute nor the
/// operator's word start over. Held labels are not kept: they were not believed (an honest
/// one is released by its neighbours if sent again).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustMemory {
    /// `[labels.len(), embedding dim]`, row-major.
    pub embeddings: Vec<f32>,
    pub labels: Vec<usize>,
    /// The pretrained model's class and confidence on each.
    pub pretrained: Vec<(usize, f32)>,
    pub accepted_pairs: Vec<(usize, usize)>,
    /// The share of recent inputs the embedding reference called atypical, how many inputs it
    /// was over (0 without a reference), and whether they showed no sign of shift.
    pub inputs: (f32, u64, bool),
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct LabelTrust {
    cfg: TrustConfig,
    /// Ring of the last `memory` labels: embedding rows, label, sequence number, and the
    /// pretrained model's class and confidence there.
    embeddings: Array2<f32>,
    labels: Vec<usize>,
    seqs: Vec<u64>,
    pretrained: Vec<(usize, f32)>,
    next_seq: u64,
    held: VecDeque<Held>,
    /// Unordered class pairs an operator accepted (smaller class first).
    accepted_pairs: Vec<(usize, usize)>,
    disputed: Option<(usize, usize)>,
    counts: TrustCounts,
    classes: usize,
    // Reused per label by the dispute check: per class a, the labels where the pretrained
    // model said a with at least `dispute_confidence`; per (a, b), row-major, those of them labeled b ≠ a.
    given: Vec<usize>,
    against: Vec<usize>,
    // Reused per label: (squared distance, label) of the nearest neighbours so far.
    nearest: Vec<(f32, usize)>,
    /// What the model's inputs look like (see the module docs), if the model has one.
    reference: Option<Arc<EmbeddingReference>>,
    /// The share of recent inputs the reference calls atypical, and inputs scored (capped at
    /// [`SHIFT_WINDOW`]).
    atypical_share: f32,
    inputs_scored: u64,
    /// Whether the reference says the inputs show no sign of shift.
    unshifted: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl LabelTrust {
    pub fn new(cfg: TrustConfig, dim: usize, classes: usize) -> Self {
        LabelTrust {
            embeddings: Array2::zeros((cfg.memory.max(1), dim)),
            labels: Vec::with_capacity(cfg.memory),
            seqs: Vec::with_capacity(cfg.memory),
            pretrained: Vec::with_capacity(cfg.memory),
            next_seq: 0,
            held: VecDeque::new(),
            accepted_pairs: Vec::new(),
            disputed: None,
            counts: TrustCounts::default(),
            classes,
            given: vec![0; classes],
            against: vec![0; classes * classes],
            nearest: Vec::with_capacity(cfg.neighbours + 1),
            reference: None,
            atypical_share: 0.0,
            inputs_scored: 0,
            unshifted: false,
            cfg,
        }
    }

    /// Judges with `reference`'s view of the inputs (see the module docs).
    pub fn with_reference(mut self, reference: Option<Arc<EmbeddingReference>>) -> Self {
        self.reference = reference;
        self
    }

    /// Whether an embedding reference says the inputs show no sign of shift (false without a
    /// reference).
    pub fn unshifted(&self) -> bool {
        self.unshifted
    }

    /// The share of recent inputs the embedding reference calls atypical, if there is one
    /// (what the metric and the replay report show).
    pub fn inputs_atypical(&self) -> Option<f64> {
        self.reference
            .is_some()
            .then_some(f64::from(self.atypical_share))
    }

    /// Scores one input (every sample the device sees, labeled or not) against the embedding
    /// reference, if there is one.
    pub fn observe_input(&mut self, embedding: ArrayView1<f32>) {
        if !self.cfg.enabled {
            return;
        }
        let Some(r) = &self.reference else {
            return;
        };
        let atypical = if r.is_atypical(embedding) { 1.0 } else { 0.0 };
        self.inputs_scored = (self.inputs_scored + 1).min(SHIFT_WINDOW);
        self.atypical_share += (atypical - self.atypical_share) / self.inputs_scored as f32;
        let was = self.unshifted;
        self.unshifted = self.shows_no_shift(was);
        if self.unshifted != was {
            tracing::info!(
                "label trust: the inputs {} ({:.0} % of the last {} beyond the embedding \
                 reference's 95th percentile, a sign of shift above {:.0} %); contradictions \
                 count toward a dispute from pretrained confidence {}",
                if self.unshifted {
                    "show no sign of shift"
                } else {
                    "show a sign of shift"
                },
                100.0 * self.atypical_share,
                self.inputs_scored,
                100.0 * self.cfg.shift_share,
                self.counting_confidence()
            );
        }
    }

    /// Whether the inputs show no sign of shift, given whether they did until now: a share
    /// above `shift_share` is a sign of shift, and only one back under
    /// [`SHIFT_HYSTERESIS`]·`shift_share` clears it, so a share hovering at the line does not
    /// flip the counting confidence (and raise and lower a dispute) from one input to the next.
    fn shows_no_shift(&self, until_now: bool) -> bool {
        let line = if until_now {
            self.cfg.shift_share
        } else {
            SHIFT_HYSTERESIS * self.cfg.shift_share
        };
        self.reference.is_some() && self.inputs_scored >= MIN_INPUTS && self.atypical_share <= line
    }

    /// The pretrained confidence from which a contradicting label counts toward a dispute now.
    fn counting_confidence(&self) -> f32 {
        if self.unshifted {
            self.cfg
                .dispute_confidence
                .min(self.cfg.unshifted_dispute_confidence)
        } else {
            self.cfg.dispute_confidence
        }
    }

    /// The pair of classes whose held labels raised the disputed state, if raised.
    pub fn disputed(&self) -> Option<(usize, usize)> {
        self.disputed
    }

    pub fn counts(&self) -> TrustCounts {
        self.counts
    }

    /// Labels held now.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Judges one label on `embedding`; `pretrained` is the pretrained model's class and
    /// confidence there. A held label is kept (with `input`) until released or accepted.
    /// `raised` is set when this label raised the disputed state.
    pub fn judge(
        &mut self,
        input: &[f32],
        embedding: ArrayView1<f32>,
        label: usize,
        source: LabelSource,
        pretrained: (usize, f32),
    ) -> Judged {
        if !self.cfg.enabled {
            return Judged::believed();
        }
        self.counts.judged_from.add(source);
        let (class, confidence) = pretrained;
        tracing::debug!(
            label,
            class,
            confidence,
            source = source.name(),
            "label judged"
        );
        let seq = self.remember(embedding, label, pretrained);
        let raised = self.update_dispute();
        let counted = confidence >= self.counting_confidence();
        let p = pair(class, label);
        // While its pair is disputed, a contradiction the dispute counts is held too.
        let confident = confidence >= self.cfg.confidence || (counted && self.disputed == Some(p));
        if class == label || !confident || self.accepted_pairs.contains(&p) {
            return Judged {
                verdict: Verdict::Believed,
                raised,
            };
        }
        if self.disputed != Some(p) && self.supported(embedding, label, class, seq) {
            return Judged {
                verdict: Verdict::Believed,
                raised,
            };
        }
        self.counts.held += 1;
        self.counts.held_from.add(source);
        if self.held.len() >= self.cfg.quarantine {
            self.held.pop_front();
            self.counts.dropped += 1;
        }
        self.held.push_back(Held {
            input: input.to_vec(),
            embedding: embedding.to_vec(),
            label,
            pretrained: class,
            seq,
        });
        Judged {
            verdict: Verdict::Held,
            raised,
        }
    }

    /// Held labels whose neighbours now side with them, taken out of the quarantine.
    pub fn release(&mut self) -> Vec<Held> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            let h = &mut self.held[i];
            let (label, class, seq) = (h.label, h.pretrained, h.seq);
            // Borrowed out for the look-up (which needs `&mut self` for its scratch), not copied.
            let emb = std::mem::take(&mut h.embedding);
            let supported = self.disputed != Some(pair(label, class))
                && self.supported(ArrayView1::from(emb.as_slice()), label, class, seq);
            self.held[i].embedding = emb;
            if supported {
                out.extend(self.held.remove(i));
            } else {
                i += 1;
            }
        }
        self.counts.released += out.len() as u64;
        out
    }

    /// An operator's word that the held labels are right (a class changed its meaning): all
    /// are released and their pairs are no longer checked.
    pub fn accept(&mut self) -> Vec<Held> {
        let out: Vec<Held> = self.held.drain(..).collect();
        if let Some(p) = self.disputed {
            self.accepted_pairs.push(p);
        }
        for h in &out {
            let p = pair(h.label, h.pretrained);
            if !self.accepted_pairs.contains(&p) {
                self.accepted_pairs.push(p);
            }
        }
        self.counts.accepted += out.len() as u64;
        self.disputed = None;
        out
    }

    /// Forgets the memory, the held labels (counted as dropped) and a dispute, keeping the
    /// accepted pairs and the totals: the inputs are now seen through another mounting.
    pub fn new_frame(&mut self) {
        self.counts.dropped += self.held.len() as u64;
        self.forget();
        if self.disputed.take().is_some() {
            tracing::info!(
                "labels no longer disputed: a new mounting starts label trust's memory over"
            );
        }
    }

    /// The memory and the accepted pairs, for a checkpoint.
    pub fn memory(&self) -> TrustMemory {
        let mut order: Vec<usize> = (0..self.labels.len()).collect();
        order.sort_by_key(|&i| self.seqs[i]);
        TrustMemory {
            embeddings: order
                .iter()
                .flat_map(|&i| self.embeddings.row(i).to_vec())
                .collect(),
            labels: order.iter().map(|&i| self.labels[i]).collect(),
            pretrained: order.iter().map(|&i| self.pretrained[i]).collect(),
            accepted_pairs: self.accepted_pairs.clone(),
            inputs: (self.atypical_share, self.inputs_scored, self.unshifted),
        }
    }

    /// Puts back a checkpoint's [`TrustMemory`] (its newest `memory` labels) and the dispute
    /// it implies, without counting or logging it again; held labels start empty. Refused,
    /// changing nothing, if it does not fit this model (the reason is returned).
    pub fn restore_memory(&mut self, m: &TrustMemory) -> Result<(), String> {
        let (n, dim, classes) = (m.labels.len(), self.embeddings.ncols(), self.classes);
        if m.embeddings.len() != n * dim || m.pretrained.len() != n {
            return Err(format!(
                "label trust memory has {} labels, {} pretrained answers and {} embedding values \
                 (dimension {dim})",
                n,
                m.pretrained.len(),
                m.embeddings.len()
            ));
        }
        let class_ok = |c: usize| c < classes;
        if !m.labels.iter().all(|&l| class_ok(l))
            || !m
                .pretrained
                .iter()
                .all(|&(c, p)| class_ok(c) && (0.0..=1.0).contains(&p))
            || !m.accepted_pairs.iter().all(|&(a, b)| a < b && class_ok(b))
            || !m.embeddings.iter().all(|v| v.is_finite())
            || !(0.0..=1.0).contains(&m.inputs.0)
        {
            return Err(format!(
                "label trust memory names a class outside 0..{classes} or holds an invalid value"
            ));
        }
        self.forget();
        for i in n.saturating_sub(self.cfg.memory)..n {
            let row = ArrayView1::from(&m.embeddings[i * dim..(i + 1) * dim]);
            self.remember(row, m.labels[i], m.pretrained[i]);
        }
        self.accepted_pairs = m.accepted_pairs.clone();
        self.atypical_share = m.inputs.0;
        self.inputs_scored = m.inputs.1.min(SHIFT_WINDOW);
        self.unshifted = self.shows_no_shift(m.inputs.2);
        self.disputed = self.find_dispute();
        Ok(())
    }

    /// Empties the memory ring and the quarantine.
    fn forget(&mut self) {
        self.labels.clear();
        self.seqs.clear();
        self.pretrained.clear();
        self.held.clear();
        self.next_seq = 0;
        self.atypical_share = 0.0;
        self.inputs_scored = 0;
        self.unshifted = false;
    }

    /// Files a label in the memory ring; returns its sequence number.
    fn remember(
        &mut self,
        embedding: ArrayView1<f32>,
        label: usize,
        pretrained: (usize, f32),
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = (seq % self.cfg.memory as u64) as usize;
        self.embeddings.row_mut(slot).assign(&embedding);
        if slot < self.labels.len() {
            self.labels[slot] = label;
            self.seqs[slot] = seq;
            self.pretrained[slot] = pretrained;
        } else {
            self.labels.push(label);
            self.seqs.push(seq);
            self.pretrained.push(pretrained);
        }
        seq
    }

    /// Whether the labels nearest `embedding` (itself excluded) name `label` more often than
    /// `against`. Ties go against the label: a confident model and a split neighbourhood
    /// are not evidence that the input moved.
    fn supported(
        &mut self,
        embedding: ArrayView1<f32>,
        label: usize,
        against: usize,
        seq: u64,
    ) -> bool {
        let k = self.cfg.neighbours;
        self.nearest.clear();
        for (slot, (&l, &s)) in self.labels.iter().zip(&self.seqs).enumerate() {
            if s == seq {
                continue;
            }
            let row = self.embeddings.row(slot);
            let d: f32 = row
                .iter()
                .zip(embedding.iter())
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            if self.nearest.len() < k {
                self.nearest.push((d, l));
            } else if let Some(worst) = self
                .nearest
                .iter_mut()
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .filter(|w| d < w.0)
            {
                *worst = (d, l);
            }
        }
        let support = self.nearest.iter().filter(|n| n.1 == label).count();
        let opposed = self.nearest.iter().filter(|n| n.1 == against).count();
        support > opposed
    }

    /// Looks for the swap signature in the memory (see the module docs); returns true when
    /// it raised the disputed state.
    fn update_dispute(&mut self) -> bool {
        let now = self.find_dispute();
        let n = self.classes;
        let raised = now.is_some() && self.disputed.is_none();
        self.counts.disputes += raised as u64;
        if now != self.disputed {
            match now {
                Some((a, b)) => tracing::warn!(
                    "labels disputed: labels contradict the confident pretrained model both ways \
                     between classes {a} and {b} ({} and {} of the last {} labels; labels held \
                     so far came from: {}); serving the pretrained model until they age out or \
                     an operator accepts them",
                    self.against[a * n + b],
                    self.against[b * n + a],
                    self.labels.len(),
                    self.counts.held_from.describe()
                ),
                None => tracing::info!("labels no longer disputed"),
            }
        }
        self.disputed = now;
        raised
    }

    /// The pair the memory shows the swap signature on (the most contradicted, if several).
    fn find_dispute(&mut self) -> Option<(usize, usize)> {
        let n = self.classes;
        let counting = self.counting_confidence();
        let (given, against) = (&mut self.given, &mut self.against);
        given.fill(0);
        against.fill(0);
        for (&label, &(a, confidence)) in self.labels.iter().zip(&self.pretrained) {
            if confidence >= counting {
                given[a] += 1;
                if a != label {
                    against[a * n + label] += 1;
                }
            }
        }
        let (given, against) = (&self.given, &self.against);
        let strong = |a: usize, b: usize| {
            let k = against[a * n + b];
            k >= self.cfg.dispute_after && k as f32 >= self.cfg.dispute_share * given[a] as f32
        };
        let mut now = None;
        let mut worst = 0;
        let pairs = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b)));
        for (a, b) in pairs {
            let both = against[a * n + b].min(against[b * n + a]);
            if strong(a, b)
                && strong(b, a)
                && both > worst
                && !self.accepted_pairs.contains(&(a, b))
            {
                now = Some((a, b));
                worst = both;
            }
        }
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    fn trust() -> LabelTrust {
        LabelTrust::new(
            TrustConfig {
                neighbours: 3,
                ..TrustConfig::default()
            },
            2,
            2,
        )
    }

    /// Forty labels of classes 0 and 1 in turn, every third one swapped and placed far from
    /// the others (so the neighbours cannot tell): only the pair's signature can. `sure` is
    /// the pretrained model's confidence in each class. Returns how many raised the dispute.
    fn swap(t: &mut LabelTrust, sure: [f32; 2]) -> usize {
        (0..40)
            .map(|i| {
                let y = i % 2;
                let (label, at) = if i % 3 == 2 { (1 - y, 9.0) } else { (y, 0.0) };
                let e = [at, y as f32];
                let j = t.judge(&[], arr1(&e).view(), label, LabelSource::ById, (y, sure[y]));
                j.raised as usize
            })
            .sum()
    }

    fn judge(t: &mut LabelTrust, e: [f32; 2], label: usize, pretrained: usize) -> Judged {
        judge_sure(t, e, label, (pretrained, 0.99))
    }

    /// A label on `e` where the pretrained model says `pretrained` (class, confidence).
    fn judge_sure(
        t: &mut LabelTrust,
        e: [f32; 2],
        label: usize,
        pretrained: (usize, f32),
    ) -> Judged {
        t.judge(&[], arr1(&e).view(), label, LabelSource::ById, pretrained)
    }

    #[test]
    fn a_label_contradicting_a_confident_model_among_labels_of_its_class_is_held() {
        let mut t = trust();
        for i in 0..5 {
            let j = judge(&mut t, [0.0, i as f32 * 0.01], 0, 0);
            assert_eq!(j.verdict, Verdict::Believed);
        }
        assert_eq!(judge(&mut t, [0.0, 0.02], 1, 0).verdict, Verdict::Held);
        assert_eq!(t.held_len(), 1);
        assert_eq!(t.disputed(), None);
    }

    #[test]
    fn labels_on_moved_inputs_support_each_other_and_are_released() {
        let mut t = trust();
        for i in 0..5 {
            judge(&mut t, [0.0, i as f32 * 0.01], 0, 0);
        }
        // The inputs moved far from the class-0 labels: the first are held (no neighbour
        // of their own label yet), the next ones are supported and release them.
        let far = |i: usize| [5.0, i as f32 * 0.01];
        assert_eq!(judge(&mut t, far(0), 1, 0).verdict, Verdict::Held);
        assert_eq!(judge(&mut t, far(1), 1, 0).verdict, Verdict::Held);
        assert_eq!(judge(&mut t, far(2), 1, 0).verdict, Verdict::Believed);
        assert_eq!(t.release().len(), 2);
        assert_eq!(t.held_len(), 0);
        // One direction only: a shift, not a swap.
        assert_eq!(t.disputed(), None);
    }

    #[test]
    fn contradictions_both_ways_in_one_pair_raise_the_dispute_and_an_operator_accepts_them() {
        let mut t = trust();
        assert_eq!(swap(&mut t, [0.99, 0.99]), 1);
        assert_eq!(t.disputed(), Some((0, 1)));
        // While disputed, the pair's contradicting labels are held even with support.
        assert_eq!(judge(&mut t, [9.0, 0.0], 1, 0).verdict, Verdict::Held);
        assert!(!t.accept().is_empty());
        assert_eq!(t.disputed(), None);
        // The pair is no longer checked.
        assert_eq!(judge(&mut t, [0.0, 0.0], 1, 0).verdict, Verdict::Believed);
        assert_eq!(t.disputed(), None);
    }

    #[test]
    fn a_swap_is_named_where_the_model_is_only_fairly_sure_of_one_class_of_the_pair() {
        let mut t = LabelTrust::new(
            TrustConfig {
                neighbours: 3,
                dispute_confidence: 0.8,
                ..TrustConfig::default()
            },
            2,
            2,
        );
        // Sure of class 0, only fairly sure (0.85) of class 1.
        swap(&mut t, [0.99, 0.85]);
        assert_eq!(t.disputed(), Some((0, 1)));
        // Held while disputed, though below `confidence`.
        let j = judge_sure(&mut t, [9.0, 1.0], 0, (1, 0.85));
        assert_eq!(j.verdict, Verdict::Held);
        // Below `dispute_confidence` the model is not defended, disputed or not.
        let j = judge_sure(&mut t, [9.0, 1.0], 0, (1, 0.7));
        assert_eq!(j.verdict, Verdict::Believed);
    }

    /// A reference of inputs around (0, 0) for class 0 and (0, 1) for class 1.
    fn reference() -> Arc<EmbeddingReference> {
        let e = Array2::from_shape_fn((200, 2), |(i, d)| {
            let wobble = ((i * 7 + d * 3) % 11) as f32 / 10.0 - 0.5;
            if d == 1 {
                (i % 2) as f32 + 0.3 * wobble
            } else {
                0.3 * wobble
            }
        });
        let y: Vec<usize> = (0..200).map(|i| i % 2).collect();
        Arc::new(EmbeddingReference::build(e.view(), &y, 2, 1, "test".into()))
    }

    #[test]
    fn a_fairly_sure_model_is_defended_only_while_its_inputs_show_no_sign_of_shift() {
        // Sure of class 0, only fairly sure (0.85) of class 1: below `dispute_confidence`.
        let mut plain = trust();
        swap(&mut plain, [0.99, 0.85]);
        assert_eq!(
            plain.disputed(),
            None,
            "without a reference only 0.9 counts"
        );

        let mut known = trust().with_reference(Some(reference()));
        for i in 0..MIN_INPUTS {
            known.observe_input(arr1(&[0.0, (i % 2) as f32]).view());
        }
        assert!(known.unshifted());
        assert_eq!(swap(&mut known, [0.99, 0.85]), 1);
        assert_eq!(known.disputed(), Some((0, 1)));

        // The same labels on a stream a quarter of whose inputs sit far from every class.
        let mut moved = trust().with_reference(Some(reference()));
        for i in 0..MIN_INPUTS {
            let far = if i % 4 == 0 { 6.0 } else { 0.0 };
            moved.observe_input(arr1(&[far, (i % 2) as f32]).view());
        }
        assert!(!moved.unshifted());
        assert!((moved.atypical_share - 0.25).abs() < 0.01);
        swap(&mut moved, [0.99, 0.85]);
        assert_eq!(moved.disputed(), None);
    }

    #[test]
    fn a_share_hovering_at_the_line_does_not_flip_the_judgement_back_and_forth() {
        let mut t = trust().with_reference(Some(reference()));
        let typical = arr1(&[0.0, 0.0]);
        let far = arr1(&[6.0, 0.0]);
        // One input in twenty atypical: what the model's own inputs show.
        for i in 0..200 {
            t.observe_input(if i % 20 == 0 {
                far.view()
            } else {
                typical.view()
            });
        }
        assert!(t.unshifted(), "{}", t.atypical_share);
        // Atypical inputs push it over the line: a sign of shift.
        while t.unshifted() {
            t.observe_input(far.view());
        }
        // Typical inputs bring it back under the line, but not yet under 0.8 of it.
        let mut flips = 0;
        while t.atypical_share > 0.09 {
            t.observe_input(typical.view());
            flips += t.unshifted() as usize;
        }
        assert_eq!(flips, 0, "cleared at {}", t.atypical_share);
        while !t.unshifted() {
            t.observe_input(typical.view());
        }
        assert!(t.atypical_share <= SHIFT_HYSTERESIS * 0.1 + 1e-6);
    }

    #[test]
    fn too_few_inputs_show_nothing_and_the_share_survives_a_checkpoint() {
        let mut t = trust().with_reference(Some(reference()));
        for _ in 0..MIN_INPUTS - 1 {
            t.observe_input(arr1(&[0.0, 0.0]).view());
        }
        assert!(!t.unshifted(), "{} inputs are not enough", MIN_INPUTS - 1);
        t.observe_input(arr1(&[0.0, 1.0]).view());
        assert!(t.unshifted());
        let mut back = trust().with_reference(Some(reference()));
        back.restore_memory(&t.memory()).unwrap();
        assert!(back.unshifted());
        assert_eq!(back.memory().inputs, (0.0, MIN_INPUTS, true));
        // A new mounting starts the share over with the memory.
        back.new_frame();
        assert!(!back.unshifted());
    }

    #[test]
    fn the_memory_comes_back_with_its_dispute_and_a_foreign_one_changes_nothing() {
        let mut t = trust();
        swap(&mut t, [0.99, 0.99]);
        assert_eq!(t.disputed(), Some((0, 1)));
        let saved = t.memory();
        assert_eq!(saved.labels.len(), 40);
        let mut back = trust();
        back.restore_memory(&saved).unwrap();
        assert_eq!(back.disputed(), Some((0, 1)));
        assert_eq!(back.counts().disputes, 0, "restored, not raised");
        assert_eq!(back.memory(), saved);
        let mut foreign = saved.clone();
        foreign.labels[0] = 7;
        assert!(back.restore_memory(&foreign).is_err());
        assert_eq!(back.memory(), saved, "a refused memory changes nothing");
    }

    #[test]
    fn an_unsure_pretrained_model_is_not_defended() {
        let mut t = trust();
        for i in 0..5 {
            judge(&mut t, [0.0, i as f32], 0, 0);
        }
        let j = judge_sure(&mut t, [0.0, 0.0], 1, (0, 0.6));
        assert_eq!(j.verdict, Verdict::Believed);
    }

    #[test]
    fn the_quarantine_is_bounded_and_counts_what_it_drops() {
        let mut t = LabelTrust::new(
            TrustConfig {
                quarantine: 2,
                neighbours: 1,
                ..TrustConfig::default()
            },
            1,
            2,
        );
        for _ in 0..3 {
            t.judge(&[], arr1(&[0.0]).view(), 0, LabelSource::Inline, (0, 0.99));
        }
        for _ in 0..3 {
            t.judge(&[], arr1(&[0.0]).view(), 1, LabelSource::Inline, (0, 0.99));
        }
        // All three are held (their one neighbour is a class-0 label or a held one at the
        // same place), so the third pushes the first out.
        assert_eq!(t.held_len(), 2);
        assert_eq!(t.counts().dropped, 1);
        assert_eq!(t.counts().held, t.held_len() as u64 + t.counts().dropped);
        assert_eq!(
            t.counts().held_from.get(LabelSource::Inline),
            t.counts().held
        );
        assert_eq!(t.counts().judged_from.get(LabelSource::Inline), 6);
    }
}
