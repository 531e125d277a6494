//! The learner: buffers, the student step, the EMA teacher, the rollback guard and their
//! counters.
//!
//! `observe` files each sample (already embedded for its prediction) into a buffer; `step`
//! draws a batch, embeds two augmentations of the unlabeled part in one backbone pass (through
//! the [`Embed`] seam, so this module never sees the backbone), takes one optimizer step on
//! the student and refreshes the teacher by EMA every k steps. A step whose loss or gradient
//! is not finite is skipped and counted, so nothing non-finite ever reaches the weights.

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use super::augment::{AugmentConfig, Augmenter};
use super::buffer::{LabeledBuffer, SampleRing};
use super::gate::{Gate, GateConfig, Serving};
use super::guard::{GuardConfig, RollbackGuard, Verdict};
use super::loss::{loss_and_grad, Batch, ConsistencyMode, LossParts, LossWeights, Scratch};
use super::optim::{
    ema_update, rampup, warmed_up_decay, Optimizer, OptimizerKind, OptimizerSettings,
};
use super::pseudo::{Balance, PseudoLabeler};
use super::reference::EmbeddingReference;
use super::requests::Opinion;
use super::rng::Rng;
use super::trust::{
    Held, LabelSource, LabelTrust, TrustConfig, TrustMemory, Verdict as TrustVerdict,
};
use crate::nn::{argmax, Mlp, Params, Workspace};
use crate::stream::Layout;

/// `[learn]`: the method's knobs. Defaults are the ones the README's numbers were made with.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearnConfig {
    /// λ, weight of the pseudo-label loss.
    pub lambda_pseudo: f32,
    /// α, weight of the consistency loss.
    pub alpha_consistency: f32,
    /// Teacher confidence needed to accept a pseudo-label.
    pub confidence_threshold: f32,
    pub consistency: ConsistencyMode,
    /// Steps over which λ and α ramp up from 0.
    pub rampup_steps: u64,
    pub optimizer: OptimizerKind,
    pub learning_rate: f32,
    /// SGD momentum (ignored by Adam).
    pub momentum: f32,
    /// Adam's β₁, β₂ and ε (ignored by SGD).
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    /// L2 pull of the student toward the pretrained weights (0 = off). Small, but it keeps an
    /// update that the labels do not ask for from drifting far from a good model.
    pub anchor: f32,
    /// β, weight of the diversity term Σ_k p̄_k log p̄_k on the student's mean prediction over
    /// the unlabeled batch (ramped like λ; 0 = off): what stops updates from merging classes.
    pub diversity: f32,
    /// Leave classes with no label in the buffer out of L_sup's softmax, so labels of a few
    /// classes do not push the others' scores down.
    pub mask_absent_classes: bool,
    /// Gradients with a larger global norm are scaled down to it (0 = no clipping).
    pub max_grad_norm: f32,
    /// EMA decay m.
    pub ema_decay: f32,
    /// Refresh the teacher every k student steps.
    pub ema_every: u64,
    /// Mean Teacher's warm-up of m over the first updates.
    pub ema_warmup: bool,
    /// One student step per this many new samples.
    pub train_every: usize,
    pub batch_labeled: usize,
    pub batch_unlabeled: usize,
    pub labeled_per_class: usize,
    pub unlabeled_capacity: usize,
    pub balance: Balance,
    /// Momentum of the running class distribution used by distribution alignment.
    pub alignment_momentum: f32,
}

impl Default for LearnConfig {
    fn default() -> Self {
        LearnConfig {
            lambda_pseudo: 1.0,
            alpha_consistency: 1.0,
            confidence_threshold: 0.9,
            consistency: ConsistencyMode::Student,
            rampup_steps: 50,
            optimizer: OptimizerKind::Adam,
            learning_rate: 0.003,
            momentum: 0.9,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            anchor: 0.1,
            diversity: 1.0,
            mask_absent_classes: true,
            max_grad_norm: 5.0,
            ema_decay: 0.99,
            ema_every: 1,
            ema_warmup: true,
            train_every: 4,
            batch_labeled: 16,
            batch_unlabeled: 32,
            labeled_per_class: 32,
            unlabeled_capacity: 512,
            balance: Balance::DistributionAlignment,
            alignment_momentum: 0.99,
        }
    }
}

impl LearnConfig {
    pub fn optimizer_settings(&self) -> OptimizerSettings {
        OptimizerSettings {
            kind: self.optimizer,
            momentum: self.momentum,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    pub losses: LossParts,
    pub offered: usize,
    pub accepted: usize,
    /// Accepted pseudo-labels whose sample had a known truth, and how many of them matched.
    pub accepted_with_truth: usize,
    pub accepted_correct: usize,
    /// True when the teacher was refreshed by this step.
    pub ema_updated: bool,
    /// Set when the rollback guard reverted the learner after this step.
    pub rollback: Option<Verdict>,
}

/// Counters that describe the learner's progress (and go into checkpoints and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub train_steps: u64,
    pub ema_updates: u64,
    pub teacher_version: u64,
    pub skipped_nonfinite: u64,
    pub samples_seen: u64,
    #[serde(default)]
    pub rollbacks: u64,
}

/// Everything a learner has learned, copied out (for checkpoints and the guard's last good
/// state). Only what data changed is here; configuration and scratch are not.
#[derive(Debug, Clone)]
pub struct LearnerState {
    pub student: Params,
    pub teacher: Params,
    /// The pretrained weights (the anchor and what `reset` returns to).
    pub pretrained: Params,
    pub optimizer: Optimizer,
    pub counters: Counters,
    pub labeled: LabeledBuffer,
    /// Distribution alignment's running class distribution.
    pub running: Array1<f32>,
    /// The serving gate's discordant outcomes, oldest first (`true`: the teacher alone was
    /// right).
    pub gate: Vec<bool>,
    /// Label trust's memory and the pairs an operator accepted.
    pub trust: TrustMemory,
}

/// What the learner needs from the frozen backbone: embeddings of augmented inputs.
pub trait Embed {
    /// Embeds `batch` samples laid out back to back in `inputs` into `out`
    /// (`[batch, embedding_dim]`, resized when needed).
    fn embed_into(
        &mut self,
        inputs: &[f32],
        batch: usize,
        out: &mut Array2<f32>,
    ) -> Result<(), EmbedError>;
}

/// The backbone's failure, carried through the learner with its cause.
#[derive(Debug, thiserror::Error)]
#[error("embedding augmented samples failed")]
pub struct EmbedError(#[source] pub Box<dyn std::error::Error + Send + Sync>);

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("learner state does not fit this learner: {0}")]
    State(String),
}

pub struct Learner {
    cfg: LearnConfig,
    augment: AugmentConfig,
    guard_cfg: GuardConfig,
    layout: Layout,
    seed: u64,
    student: Mlp,
    teacher: Mlp,
    /// The pretrained weights, kept for comparison, the anchor and `reset`.
    pretrained: Mlp,
    optimizer: Optimizer,
    labeled: LabeledBuffer,
    unlabeled: SampleRing,
    pseudo: PseudoLabeler,
    counters: Counters,
    guard: RollbackGuard,
    gate: Gate,
    gate_cfg: GateConfig,
    trust: LabelTrust,
    trust_cfg: TrustConfig,
    /// The last state the rollback guard accepted (weights, optimizer, labels, alignment
    /// are what a rollback puts back).
    good: Option<LearnerState>,
    augmenter: Augmenter,
    rng: Rng,
    since_step: usize,
    // Reused per-step buffers.
    picks: Vec<(usize, usize)>,
    order: Vec<usize>,
    labels: Vec<usize>,
    emb_l: Array2<f32>,
    emb_u: Array2<f32>,
    aug_inputs: Vec<f32>,
    aug_emb: Array2<f32>,
    teacher_probs: Array2<f32>,
    ws: Workspace,
    test_logits: Array2<f32>,
    pseudo_labels: Vec<Option<usize>>,
    present: Vec<bool>,
    grad: Params,
    scratch: Scratch,
}

impl Learner {
    /// A learner whose student and teacher start as `pretrained`, on samples of `layout`.
    // One argument per config section it owns (they are read from one `Config` by the
    // session), plus the two that are not config.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pretrained: Mlp,
        layout: Layout,
        cfg: &LearnConfig,
        augment: &AugmentConfig,
        guard: &GuardConfig,
        gate: &GateConfig,
        trust: &TrustConfig,
        seed: u64,
    ) -> Self {
        let classes = pretrained.classes();
        let dim = pretrained.input_dim();
        let sample_len = layout.sample_len();
        Learner {
            optimizer: Optimizer::new(cfg.optimizer_settings(), pretrained.params()),
            labeled: LabeledBuffer::new(classes, cfg.labeled_per_class, sample_len, dim),
            unlabeled: SampleRing::new(cfg.unlabeled_capacity, sample_len, dim),
            pseudo: PseudoLabeler::new(
                classes,
                cfg.confidence_threshold,
                cfg.balance,
                cfg.alignment_momentum,
            ),
            augmenter: Augmenter::new(augment.clone(), layout),
            rng: Rng::new(seed),
            grad: pretrained.params().zeros_like(),
            student: pretrained.clone(),
            teacher: pretrained.clone(),
            pretrained,
            counters: Counters::default(),
            guard: RollbackGuard::new(guard.clone()),
            gate: Gate::new(gate.clone()),
            gate_cfg: gate.clone(),
            trust: LabelTrust::new(trust.clone(), dim, classes),
            trust_cfg: trust.clone(),
            good: None,
            since_step: 0,
            picks: Vec::new(),
            order: Vec::new(),
            labels: Vec::new(),
            emb_l: Array2::zeros((0, dim)),
            emb_u: Array2::zeros((0, dim)),
            aug_inputs: Vec::new(),
            aug_emb: Array2::zeros((0, dim)),
            teacher_probs: Array2::zeros((0, classes)),
            ws: Workspace::default(),
            test_logits: Array2::zeros((1, classes)),
            pseudo_labels: Vec::new(),
            present: Vec::with_capacity(classes),
            scratch: Scratch::default(),
            cfg: cfg.clone(),
            augment: augment.clone(),
            guard_cfg: guard.clone(),
            layout,
            seed,
        }
    }

    pub fn config(&self) -> &LearnConfig {
        &self.cfg
    }

    pub fn student(&self) -> &Mlp {
        &self.student
    }

    pub fn teacher(&self) -> &Mlp {
        &self.teacher
    }

    pub fn pretrained(&self) -> &Mlp {
        &self.pretrained
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Which model the gate serves.
    /// The pretrained model while labels are disputed (see `learn::trust`), whatever the
    /// gate's evidence says.
    pub fn serving(&self) -> Serving {
        if self.trust.disputed().is_some() {
            Serving::Pretrained
        } else {
            self.gate.serving()
        }
    }

    /// Why [`Learner::serving`] chose its model, in an operator's words.
    pub fn serving_reason(&self) -> String {
        match self.trust.disputed() {
            Some((a, b)) => format!(
                "labels are disputed between classes {a} and {b}, so the pretrained model answers whatever the gate's evidence"
            ),
            None => self.gate.reason(),
        }
    }

    /// The model that should answer: the adapted teacher or the pretrained model.
    pub fn served(&self) -> &Mlp {
        match self.serving() {
            Serving::Adapted => &self.teacher,
            Serving::Pretrained => &self.pretrained,
        }
    }

    /// The labeled buffer's inputs (concatenated) and labels, oldest first per class: what a
    /// new mounting keeps (see `Session::adopt`).
    pub fn labeled_inputs(&self) -> (Vec<f32>, Vec<usize>) {
        let (mut inputs, mut labels) = (Vec::new(), Vec::new());
        for class in 0..self.labeled.classes() {
            let ring = self.labeled.ring(class);
            for i in ring.oldest_first() {
                inputs.extend_from_slice(ring.input(i));
                labels.push(class);
            }
        }
        (inputs, labels)
    }

    /// Files labels that were already believed (and tested) once, re-embedded for a new
    /// mounting: into the labeled buffer, and pending with the guard, without another test
    /// for the gate (the models they would test have not seen them in this frame, but they
    /// were chosen as evidence before) or another judgement by label trust.
    pub fn refile_labels(&mut self, inputs: &[f32], embeddings: ArrayView2<f32>, labels: &[usize]) {
        let len = self.layout.sample_len();
        for ((x, e), &y) in inputs.chunks_exact(len).zip(embeddings.rows()).zip(labels) {
            self.keep_label(x, e, y);
        }
    }

    /// Labeled samples held, per class.
    pub fn labeled_counts(&self) -> Vec<usize> {
        self.labeled.class_counts()
    }

    pub fn unlabeled_len(&self) -> usize {
        self.unlabeled.len()
    }

    /// Distribution alignment's running class distribution.
    pub fn running_distribution(&self) -> &Array1<f32> {
        &self.pseudo.running
    }

    /// Files one sample. A label is first a test of the teacher against the pretrained model
    /// for the serving gate (test-then-train), then learned from. `truth` is kept only to
    /// score pseudo-labels, never to learn.
    pub fn observe(
        &mut self,
        input: &[f32],
        embedding: ArrayView1<f32>,
        label: Option<usize>,
        truth: Option<usize>,
    ) {
        self.observe_from(input, embedding, label, LabelSource::Recording, truth)
    }

    /// [`Learner::observe`] with where the label came from (kept by label trust).
    pub fn observe_from(
        &mut self,
        input: &[f32],
        embedding: ArrayView1<f32>,
        label: Option<usize>,
        source: LabelSource,
        truth: Option<usize>,
    ) {
        // Buffers are learner state: a non-finite value filed here would turn every later
        // batch that draws it into a skipped step. Callers check first (and count); this is
        // the last line.
        if !(input.iter().all(|v| v.is_finite()) && embedding.iter().all(|v| v.is_finite())) {
            return;
        }
        self.counters.samples_seen += 1;
        self.since_step += 1;
        self.trust.observe_input(embedding);
        match label {
            Some(y) => {
                let row = embedding.insert_axis(ndarray::Axis(0));
                self.pretrained
                    .probs_into(row, &mut self.ws, &mut self.test_logits);
                let pretrained = argmax(self.test_logits.row(0));
                let judged = self.trust.judge(input, embedding, y, source, pretrained);
                if judged.raised {
                    // The evidence so far may be the swap's own wins: it starts over.
                    self.gate.clear();
                }
                if judged.verdict == TrustVerdict::Held {
                    return;
                }
                self.file_label(input, embedding, y);
                for held in self.trust.release() {
                    self.file_held(held);
                }
            }
            None => {
                self.unlabeled.push(input, embedding, truth);
            }
        }
    }

    /// A believed label: a clean test for the gate, then the guard's and the buffer's.
    fn file_label(&mut self, input: &[f32], embedding: ArrayView1<f32>, y: usize) {
        self.test_label(embedding, y);
        self.keep_label(input, embedding, y);
    }

    /// Pending with the guard, and into the labeled buffer unless the guard withholds it.
    fn keep_label(&mut self, input: &[f32], embedding: ArrayView1<f32>, y: usize) {
        if !self.guard.hold_out(embedding, y) {
            self.labeled.push(input, embedding, y)
        }
    }

    fn file_held(&mut self, held: Held) {
        let embedding = ndarray::ArrayView1::from(held.embedding.as_slice());
        self.file_label(&held.input, embedding, held.label);
    }

    /// Label trust: whether labels are disputed, and its counts.
    pub fn trust(&self) -> &LabelTrust {
        &self.trust
    }

    /// An operator accepts the held labels (a class changed its meaning): they are filed as
    /// believed labels and their class pairs no longer checked. Returns how many.
    pub fn accept_held_labels(&mut self) -> usize {
        let held = self.trust.accept();
        let n = held.len();
        for h in held {
            self.file_held(h);
        }
        n
    }

    /// Scores one label against the current teacher and the pretrained model.
    fn test_label(&mut self, embedding: ArrayView1<f32>, label: usize) {
        let row = embedding.insert_axis(ndarray::Axis(0));
        self.teacher
            .logits_into(row, &mut self.ws, &mut self.test_logits);
        let teacher = argmax(self.test_logits.row(0)).0;
        self.pretrained
            .logits_into(row, &mut self.ws, &mut self.test_logits);
        let source = argmax(self.test_logits.row(0)).0;
        if let Some(now) = self.gate.record(teacher == label, source == label) {
            tracing::info!(
                "serving gate: now serving the {} model (wins {}, losses {}, p = {:.4})",
                match now {
                    Serving::Adapted => "adapted",
                    Serving::Pretrained => "pretrained",
                },
                self.gate.wins(),
                self.gate.losses(),
                self.gate.p_value()
            );
        }
    }

    /// The adapted teacher's and the pretrained model's class and confidence on one
    /// embedding (what a label request is chosen from).
    pub fn opinions(&mut self, embedding: ArrayView1<f32>) -> (Opinion, Opinion) {
        let row = embedding.insert_axis(ndarray::Axis(0));
        let opinion = |m: &Mlp, ws: &mut Workspace, out: &mut Array2<f32>| {
            m.probs_into(row, ws, out);
            let (class, confidence) = argmax(out.row(0));
            Opinion { class, confidence }
        };
        let teacher = opinion(&self.teacher, &mut self.ws, &mut self.test_logits);
        let pretrained = opinion(&self.pretrained, &mut self.ws, &mut self.test_logits);
        (teacher, pretrained)
    }

    /// True when enough new samples arrived for the next step and there is data to learn from.
    pub fn due(&self) -> bool {
        self.since_step >= self.cfg.train_every.max(1) && self.has_data()
    }

    /// True when there is something to learn from.
    pub fn has_data(&self) -> bool {
        !self.labeled.is_empty() || !self.unlabeled.is_empty()
    }

    /// One student step (and EMA refresh when due). Returns `None` if it was skipped because
    /// the loss or gradient was not finite.
    pub fn step<E: Embed + ?Sized>(
        &mut self,
        embed: &mut E,
    ) -> Result<Option<StepReport>, LearnError> {
        self.since_step = 0;
        let dim = self.student.input_dim();
        let sample_len = self.layout.sample_len();

        // Labeled batch, class-balanced.
        self.labeled
            .sample(self.cfg.batch_labeled, &mut self.rng, &mut self.picks);
        resize_rows(&mut self.emb_l, self.picks.len(), dim);
        self.labels.clear();
        for (row, &(class, slot)) in self.picks.iter().enumerate() {
            self.labeled
                .ring(class)
                .copy_embedding(slot, self.emb_l.row_mut(row));
            self.labels.push(class);
        }

        // Unlabeled batch, drawn without replacement from the ring.
        let n_u = self.cfg.batch_unlabeled.min(self.unlabeled.len());
        self.order.clear();
        self.order.extend(0..self.unlabeled.len());
        for i in 0..n_u {
            let j = i + self.rng.below(self.order.len() - i);
            self.order.swap(i, j);
        }
        resize_rows(&mut self.emb_u, n_u, dim);
        for (row, &slot) in self.order[..n_u].iter().enumerate() {
            self.unlabeled.copy_embedding(slot, self.emb_u.row_mut(row));
        }

        // Pseudo-labels from the teacher on the clean samples.
        self.teacher
            .probs_into(self.emb_u.view(), &mut self.ws, &mut self.teacher_probs);
        self.pseudo
            .label(&mut self.teacher_probs, &mut self.pseudo_labels);

        let ramp = rampup(self.counters.train_steps, self.cfg.rampup_steps);
        let weights = LossWeights {
            lambda: self.cfg.lambda_pseudo * ramp,
            alpha: self.cfg.alpha_consistency * ramp,
            beta: self.cfg.diversity * ramp,
            consistency: self.cfg.consistency,
        };
        self.present.clear();
        if self.cfg.mask_absent_classes {
            let labeled = &self.labeled;
            self.present
                .extend((0..labeled.classes()).map(|k| labeled.has(k)));
        }

        // Two augmentations of each unlabeled sample, embedded in one backbone pass.
        let n_aug = if weights.alpha > 0.0 { n_u } else { 0 };
        self.aug_inputs.resize(2 * n_aug * sample_len, 0.0);
        for (k, &slot) in self.order[..n_aug].iter().enumerate() {
            let x = self.unlabeled.input(slot);
            let (a, b) = (k * sample_len, (n_aug + k) * sample_len);
            self.augmenter
                .apply(x, &mut self.aug_inputs[a..a + sample_len], &mut self.rng);
            self.augmenter
                .apply(x, &mut self.aug_inputs[b..b + sample_len], &mut self.rng);
        }
        embed.embed_into(&self.aug_inputs, 2 * n_aug, &mut self.aug_emb)?;
        let (aug_a, aug_b) = self.aug_emb.view().split_at(ndarray::Axis(0), n_aug);

        let batch = Batch {
            labeled: self.emb_l.view(),
            labels: &self.labels,
            unlabeled: self.emb_u.view(),
            pseudo: &self.pseudo_labels,
            aug_a,
            aug_b,
            present: &self.present,
        };
        let mut losses = loss_and_grad(
            &self.student,
            &self.teacher,
            &batch,
            &weights,
            &mut self.scratch,
            &mut self.grad,
        );
        if self.cfg.anchor > 0.0 {
            let a = self.cfg.anchor;
            let pull = self
                .grad
                .add_pull(self.student.params(), self.pretrained.params(), a);
            losses.total += 0.5 * a * pull;
        }

        let mut report = StepReport {
            losses,
            offered: n_u,
            ..Default::default()
        };
        for (k, pseudo) in self.pseudo_labels.iter().enumerate() {
            if let Some(class) = pseudo {
                report.accepted += 1;
                if let Some(truth) = self.unlabeled.truth(self.order[k]) {
                    report.accepted_with_truth += 1;
                    report.accepted_correct += (truth == *class) as usize;
                }
            }
        }

        if !losses.total.is_finite() || !self.grad.is_finite() {
            self.counters.skipped_nonfinite += 1;
            return Ok(None);
        }
        let norm = self.grad.norm();
        if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            self.grad.scale(self.cfg.max_grad_norm / norm);
        }
        self.optimizer.step(
            self.student.params_mut(),
            &self.grad,
            self.cfg.learning_rate,
        );
        self.counters.train_steps += 1;
        if self.counters.train_steps % self.cfg.ema_every.max(1) == 0 {
            let m = if self.cfg.ema_warmup {
                warmed_up_decay(self.cfg.ema_decay, self.counters.ema_updates)
            } else {
                self.cfg.ema_decay
            };
            ema_update(self.teacher.params_mut(), self.student.params(), m);
            self.counters.ema_updates += 1;
            self.counters.teacher_version += 1;
            report.ema_updated = true;
        }
        if self.guard.due(self.counters.train_steps) {
            report.rollback = self.check_guard();
        }
        Ok(Some(report))
    }

    /// Runs one guard check; returns the verdict when it rolled back.
    fn check_guard(&mut self) -> Option<Verdict> {
        if self.good.is_none() {
            // Until a check passes, the pretrained model is the last good state.
            let mut first = self.snapshot();
            first.student = self.pretrained.params().clone();
            first.teacher = self.pretrained.params().clone();
            first.optimizer =
                Optimizer::new(self.cfg.optimizer_settings(), self.pretrained.params());
            self.good = Some(first);
        }
        let good = self.good.as_ref().expect("set above");
        let good_teacher = self
            .teacher
            .with_params(good.teacher.clone())
            .expect("same layout");
        let recent = self.unlabeled_embeddings();
        let verdict = self.guard.judge(
            &self.teacher,
            &good_teacher,
            &self.pretrained,
            recent.view(),
        );
        match verdict {
            Verdict::Pass { teacher, good } => {
                self.guard.promote();
                // NaN (no trusted labels yet) counts as "at least as good".
                if teacher.is_nan() || good.is_nan() || teacher >= good {
                    self.good = Some(self.snapshot());
                }
                None
            }
            Verdict::Worse { .. } | Verdict::Collapsed { .. } | Verdict::Misleading { .. } => {
                let good = self.good.clone().expect("set above");
                tracing::warn!("rollback guard: {verdict:?}; reverting to the last good teacher");
                self.student.params_mut().assign(&good.student);
                self.teacher.params_mut().assign(&good.teacher);
                self.optimizer = good.optimizer;
                self.labeled = good.labeled;
                self.pseudo.running = good.running;
                self.guard.discard_pending();
                // The evidence was about the teacher that was just thrown away.
                self.gate.clear();
                self.counters.rollbacks += 1;
                self.counters.teacher_version += 1;
                Some(verdict)
            }
        }
    }

    fn unlabeled_embeddings(&self) -> Array2<f32> {
        let n = self.unlabeled.len();
        let mut m = Array2::zeros((n, self.student.input_dim()));
        for (row, i) in (0..n).enumerate() {
            self.unlabeled.copy_embedding(i, m.row_mut(row));
        }
        m
    }

    /// Back to the pretrained model with empty buffers, as if just started with the same
    /// seed; the teacher version keeps counting up so a reset teacher is told from an old one.
    ///
    /// Label trust is kept: what it knows is about the labels and the pretrained model, which
    /// a reset does not change, and a reset must not lower a dispute or forget an operator's
    /// word (nor count its totals down). A new mounting starts its memory over instead
    /// ([`Learner::new_frame`]).
    pub fn reset(&mut self) {
        let version = self.counters.teacher_version + 1;
        let fresh = Learner::new(
            self.pretrained.clone(),
            self.layout,
            &self.cfg,
            &self.augment,
            &self.guard_cfg,
            &self.gate_cfg,
            &self.trust_cfg,
            self.seed,
        );
        let old = std::mem::replace(self, fresh);
        self.trust = old.trust;
        self.counters.teacher_version = version;
    }

    /// [`Learner::reset`] for a new mounting: the embeddings and the pretrained model's answers
    /// label trust remembers belong to the old one, so its memory starts over (the pairs an
    /// operator accepted stay).
    pub fn new_frame(&mut self) {
        self.reset();
        self.trust.new_frame();
    }

    /// Label trust judges with the model's embedding reference (see [`LabelTrust`]).
    pub fn with_reference(mut self, reference: Option<Arc<EmbeddingReference>>) -> Self {
        self.trust = self.trust.with_reference(reference);
        self
    }

    /// A copy of what the learner has learned.
    pub fn state(&self) -> LearnerState {
        LearnerState {
            gate: self.gate.outcomes().collect(),
            trust: self.trust.memory(),
            ..self.snapshot()
        }
    }

    /// What a rollback puts back (weights, optimizer, labeled buffer, running averages): the
    /// state without the gate's window and label trust's memory, which a rollback never reads
    /// and the guard would otherwise copy at every passing check.
    fn snapshot(&self) -> LearnerState {
        LearnerState {
            student: self.student.params().clone(),
            teacher: self.teacher.params().clone(),
            pretrained: self.pretrained.params().clone(),
            optimizer: self.optimizer.clone(),
            counters: self.counters,
            labeled: self.labeled.clone(),
            running: self.pseudo.running.clone(),
            gate: Vec::new(),
            trust: TrustMemory::default(),
        }
    }

    /// Puts back a state saved from a learner of the same shapes (see `checkpoint`); the
    /// labeled buffer is refilled oldest first into this learner's configured capacity.
    pub fn restore(&mut self, state: LearnerState) -> Result<(), LearnError> {
        let fits = |p: &Params| p.same_layout(self.student.params());
        if !(fits(&state.student) && fits(&state.teacher) && fits(&state.pretrained)) {
            return Err(LearnError::State(
                "weights have other names or shapes".into(),
            ));
        }
        if state.optimizer.state().iter().any(|(_, p)| !fits(p)) {
            return Err(LearnError::State(
                "optimizer state has other names or shapes".into(),
            ));
        }
        if state.running.len() != self.pseudo.running.len()
            || state.labeled.classes() != self.labeled.classes()
        {
            return Err(LearnError::State("class count differs".into()));
        }
        let mut labeled = LabeledBuffer::new(
            self.labeled.classes(),
            self.cfg.labeled_per_class,
            self.layout.sample_len(),
            self.student.input_dim(),
        );
        for class in 0..state.labeled.classes() {
            let ring = state.labeled.ring(class);
            if ring.sample_len() != self.layout.sample_len() {
                return Err(LearnError::State(
                    "labeled samples have another length".into(),
                ));
            }
            for i in ring.oldest_first() {
                labeled.push(ring.input(i), ring.embedding(i), class);
            }
        }
        // Last of the checks, first of the changes: refused, it changes nothing.
        self.trust
            .restore_memory(&state.trust)
            .map_err(LearnError::State)?;
        self.student.params_mut().assign(&state.student);
        self.teacher.params_mut().assign(&state.teacher);
        self.pretrained.params_mut().assign(&state.pretrained);
        self.optimizer = state.optimizer;
        self.counters = state.counters;
        self.labeled = labeled;
        self.pseudo.running = state.running;
        self.gate.restore(state.gate);
        self.good = None;
        Ok(())
    }
}

fn resize_rows(a: &mut Array2<f32>, rows: usize, cols: usize) {
    if a.dim() != (rows, cols) {
        *a = Array2::zeros((rows, cols));
    }
}
