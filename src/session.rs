//! One adaptation session: the rules that replay and the daemon share.
//!
//! A [`Session`] owns the learner, the backbone it trains through, the feedback bookkeeping
//! (recent samples by id, so a label that arrives later finds its sample) and the checkpoint
//! policy. Its one loop body is [`Session::take`]: replay, the daemon's training thread and
//! the equivalence test hand it every [`Item`] in arrival order. Its one prediction path is
//! [`Predictor`]: a batched backbone pass, then the answer of the model the serving gate
//! lets answer (with the adapted teacher's and the pretrained model's answers for whoever
//! scores them). A sample whose embedding cannot be used gets no answer in either driver.
//! So what replay measures is what the device answers; what differs is only when a driver
//! asks (replay after every step, the daemon once per batch with a snapshot).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::calibration::{CalibrationEvent, Calibrator, Mounting, SignedPerm};
use crate::checkpoint::{CheckpointStore, MountingRecord, Restored, Saved};
use crate::config::{duration_s, Config};
use crate::learn::reference::{EmbeddingReference, ReferenceError};
use crate::learn::requests::{Candidate, Reason, Request, Requests};
pub use crate::learn::trust::LabelSource;
use crate::learn::{Embed, EmbedError, LearnError, Learner, Serving, StepReport};
use crate::model::{Backbone, Classifier, ModelError};
use crate::nn::{argmax, Mlp, Workspace};
use crate::scores::Accuracy;
use crate::stream::Layout;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("config key calibration: {0}")]
    Calibration(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Learn(#[from] LearnError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

impl Embed for Backbone {
    fn embed_into(
        &mut self,
        inputs: &[f32],
        batch: usize,
        out: &mut Array2<f32>,
    ) -> Result<(), EmbedError> {
        Backbone::embed_into(self, inputs, batch, out).map_err(|e| EmbedError(Box::new(e)))
    }
}

/// A model's prediction for one sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Prediction {
    pub class: usize,
    pub confidence: f32,
}

/// True when an embedding can be learned from: finite, and not absurdly large (a sample
/// that fits in f32 can still drive the backbone to infinities or to values whose squares
/// overflow in the loss).
pub fn embedding_ok(e: ArrayView1<f32>) -> bool {
    e.iter().all(|v| v.is_finite() && v.abs() < 1e15)
}

/// Predictions of `head` for each row of `embeddings`, into `out` (cleared first).
pub fn predict_rows(
    head: &Mlp,
    embeddings: ArrayView2<f32>,
    ws: &mut Workspace,
    probs: &mut Array2<f32>,
    out: &mut Vec<Prediction>,
) {
    head.probs_into(embeddings, ws, probs);
    out.clear();
    out.extend(probs.rows().into_iter().map(|row| {
        let (class, confidence) = argmax(row);
        Prediction { class, confidence }
    }));
}

/// The models a prediction can be asked of: the one the serving gate lets answer (always),
/// and the adapted teacher and the pretrained model when a caller scores them. All three
/// see the sample through `mounting`, as the device does.
#[derive(Debug, Clone, Copy)]
pub struct Models<'a> {
    pub served: &'a Mlp,
    pub serving: Serving,
    pub mounting: Option<&'a Mounting>,
    pub teacher: Option<&'a Mlp>,
    pub pretrained: Option<&'a Mlp>,
}

impl<'a> Models<'a> {
    /// Only the pretrained model, on the device's own axes (before any adaptation).
    pub fn pretrained(head: &'a Mlp) -> Self {
        Models {
            served: head,
            serving: Serving::Pretrained,
            mounting: None,
            teacher: None,
            pretrained: None,
        }
    }
}

/// What the device answers for one sample, which model answered, and (when asked) what the
/// adapted teacher and the pretrained model would have answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    pub served: Prediction,
    pub serving: Serving,
    pub teacher: Option<Prediction>,
    pub pretrained: Option<Prediction>,
}

/// One prediction as the device publishes it: the daemon's `{prefix}/predictions` message
/// and replay's `--predictions` line (which adds the sample's position in the recording).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictionMessage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    pub class: usize,
    pub name: &'a str,
    pub confidence: f32,
    pub teacher_version: u64,
    /// Which model answered: "adapted" or "pretrained" (the serving gate's choice).
    pub serving: Serving,
}

impl<'a> PredictionMessage<'a> {
    pub fn new(answer: &Answer, class_names: &'a [String], teacher_version: u64) -> Self {
        let p = answer.served;
        PredictionMessage {
            sample: None,
            id: None,
            class: p.class,
            name: class_names.get(p.class).map(String::as_str).unwrap_or(""),
            confidence: p.confidence,
            teacher_version,
            serving: answer.serving,
        }
    }
}

/// The one prediction path: a backbone of its own and scratch. It embeds a batch in one
/// backbone pass, then answers rows of it with whatever models it is handed (the daemon's
/// inference thread holds a snapshot that training swaps; replay asks after every step).
pub struct Predictor {
    backbone: Backbone,
    calibrated: Vec<f32>,
    emb: Array2<f32>,
    probs: Array2<f32>,
    ws: Workspace,
    preds: [Vec<Prediction>; 3],
}

impl Predictor {
    pub fn new(backbone: Backbone) -> Self {
        let dim = backbone.embedding_dim();
        Predictor {
            backbone,
            calibrated: Vec::new(),
            emb: Array2::zeros((0, dim)),
            probs: Array2::zeros((0, 0)),
            ws: Workspace::default(),
            preds: Default::default(),
        }
    }

    /// Embeds `n` raw samples (back to back) through `mounting` (the adopted calibration, if
    /// any) in one backbone pass; the embeddings stay readable through
    /// [`Predictor::embeddings`] until the next call.
    pub fn embed(
        &mut self,
        inputs: &[f32],
        n: usize,
        mounting: Option<&Mounting>,
    ) -> Result<(), ModelError> {
        let inputs = mount_batch(mounting, inputs, &mut self.calibrated);
        self.backbone.embed_into(inputs, n, &mut self.emb)
    }

    pub fn embeddings(&self) -> ArrayView2<'_, f32> {
        self.emb.view()
    }

    /// Answers rows `rows` of the last embedded batch with `models`, into `out` (cleared
    /// first). A row whose embedding cannot be used ([`embedding_ok`]) gets `None`: a sample
    /// can pass every input check and still drive the backbone to infinities, and then it
    /// must be neither published nor scored nor learned from.
    pub fn answer(
        &mut self,
        rows: std::ops::Range<usize>,
        models: &Models,
        out: &mut Vec<Option<Answer>>,
    ) {
        let emb = self.emb.slice(ndarray::s![rows.clone(), ..]);
        // The served model is always one of the other two when they are asked for too
        // (the gate serves the teacher or the pretrained model): it is computed once.
        let same = |h: Option<&Mlp>| h.is_some_and(|h| std::ptr::eq(h, models.served));
        let served_slot = [models.teacher, models.pretrained]
            .iter()
            .position(|h| same(*h))
            .map_or(0, |i| i + 1);
        let heads = [
            (served_slot == 0).then_some(models.served),
            models.teacher,
            models.pretrained,
        ];
        for (head, preds) in heads.iter().zip(self.preds.iter_mut()) {
            match head {
                Some(h) => predict_rows(h, emb, &mut self.ws, &mut self.probs, preds),
                None => preds.clear(),
            }
        }
        out.clear();
        out.extend(emb.rows().into_iter().enumerate().map(|(r, e)| {
            embedding_ok(e).then(|| Answer {
                served: self.preds[served_slot][r],
                serving: models.serving,
                teacher: self.preds[1].get(r).copied(),
                pretrained: self.preds[2].get(r).copied(),
            })
        }));
    }
}

/// `inputs` (samples back to back) through `mounting` into `scratch`, or `inputs` itself
/// when there is no mounting.
fn mount_batch<'a>(
    mounting: Option<&Mounting>,
    inputs: &'a [f32],
    scratch: &'a mut Vec<f32>,
) -> &'a [f32] {
    let Some(m) = mounting else {
        return inputs;
    };
    scratch.resize(inputs.len(), 0.0);
    let len = m.sample_len();
    for (x, out) in inputs.chunks_exact(len).zip(scratch.chunks_exact_mut(len)) {
        m.apply(x, out);
    }
    scratch
}

/// When to save: every `every_steps` student steps or `every` of wall time (whichever comes
/// first, and only when something changed) but never sooner than `min_interval` after the
/// last save, and at once after a reset or on request. The interval bounds how often a
/// saturated learner writes (its steps come far faster than a disk should take them); a
/// request or a reset is an operator's or a correctness matter and does not wait for it (the
/// write budget still paces them).
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    every_steps: u64,
    every: Duration,
    min_interval: Duration,
    last_steps: u64,
    last_at: Instant,
    forced: bool,
}

impl CheckpointPolicy {
    pub fn new(every_steps: u64, every: Duration, min_interval: Duration, now: Instant) -> Self {
        CheckpointPolicy {
            every_steps: every_steps.max(1),
            every,
            min_interval,
            last_steps: 0,
            last_at: now,
            forced: false,
        }
    }

    pub fn due(&self, steps: u64, now: Instant) -> bool {
        let since = now.saturating_duration_since(self.last_at);
        self.forced
            || (since >= self.min_interval
                && (steps >= self.last_steps.saturating_add(self.every_steps)
                    || (steps > self.last_steps && since >= self.every)))
    }

    pub fn saved(&mut self, steps: u64, now: Instant) {
        self.last_steps = steps;
        self.last_at = now;
        self.forced = false;
    }

    /// The step count restarted (reset, restore): count from there, and save soon.
    pub fn restart(&mut self, steps: u64) {
        self.last_steps = steps;
        self.forced = true;
    }

    pub fn request(&mut self) {
        self.forced = true;
    }
}

/// What became of a label that arrived after its sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    /// The sample was found: it is learned from now, and the deployed model's prediction
    /// for it was `correct` or not.
    Matched { correct: bool },
    /// No recent sample has that id (too old, never seen, or already labeled).
    Late,
}

/// Counters of what the session took in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    /// Labels learned from: on arrival, or matched by feedback.
    pub labels: u64,
    /// Labels that found their sample, scored against the answer the device gave for it
    /// (the served model's).
    pub feedback: Accuracy,
    pub late_labels: u64,
    /// Samples refused because their embedding was not finite or absurd.
    pub rejected_embeddings: u64,
    /// Samples (or labels) not learned from because they were embedded under a mounting that
    /// calibration has since replaced.
    pub stale_mounting: u64,
    /// Mountings proposed by calibration searches, and changes of the adopted one.
    pub calibration_proposals: u64,
    pub calibration_changes: u64,
}

/// Recently observed samples by id, in fixed memory: a ring of slots, with each id stored
/// once (shared by the slot and the index).
struct RecentSamples {
    inputs: Array2<f32>,
    embeddings: Array2<f32>,
    predicted: Vec<usize>,
    mountings: Vec<SignedPerm>,
    ids: Vec<Option<Arc<str>>>,
    index: HashMap<Arc<str>, usize>,
    next: usize,
}

impl RecentSamples {
    fn new(capacity: usize, sample_len: usize, dim: usize) -> Self {
        RecentSamples {
            inputs: Array2::zeros((capacity, sample_len)),
            embeddings: Array2::zeros((capacity, dim)),
            predicted: vec![0; capacity],
            mountings: vec![SignedPerm::IDENTITY; capacity],
            ids: vec![None; capacity],
            index: HashMap::with_capacity(capacity),
            next: 0,
        }
    }

    fn insert(&mut self, id: &str, o: &Observation) {
        let (x, embedding, predicted) = (o.x, o.embedding, o.predicted);
        if self.ids.is_empty() {
            return;
        }
        let slot = self.next;
        if let Some(old) = self.ids[slot].take() {
            self.index.remove(&old);
        }
        let id: Arc<str> = Arc::from(id);
        if let Some(previous) = self.index.insert(id.clone(), slot) {
            // The same id again: the newer sample is the one a label means.
            self.ids[previous] = None;
        }
        self.inputs.row_mut(slot).assign(&ArrayView1::from(x));
        self.embeddings.row_mut(slot).assign(&embedding);
        self.predicted[slot] = predicted;
        self.mountings[slot] = o.mounting;
        self.ids[slot] = Some(id);
        self.next = (slot + 1) % self.ids.len();
    }

    /// Takes the slot of `id` out of the index (a sample is labeled at most once).
    fn take(&mut self, id: &str) -> Option<usize> {
        let slot = self.index.remove(id)?;
        self.ids[slot] = None;
        Some(slot)
    }
}

/// One sample for the session: its input, the embedding its prediction was made from, and
/// what is known about it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub id: Option<&'a str>,
    /// The raw input, as the device sent it (before any calibration).
    pub x: &'a [f32],
    /// Its embedding, computed through `mounting`.
    pub embedding: ArrayView1<'a, f32>,
    /// The calibration the embedding was computed under ([`Session::mounting_r`] then).
    pub mounting: SignedPerm,
    /// Supervision known on arrival, and where it came from.
    pub label: Option<usize>,
    pub source: LabelSource,
    /// Ground truth for scoring only (recordings), never learned from.
    pub truth: Option<usize>,
    /// The class the device answered for it (the served model's), scored when feedback
    /// arrives.
    pub predicted: usize,
}

/// What a driver hands the session, in arrival order.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// A predicted sample.
    Sample(Observation<'a>),
    /// A label for an earlier sample, by id, and where it came from.
    Feedback {
        id: &'a str,
        label: usize,
        source: LabelSource,
    },
}

/// What [`Session::take`] did with an item.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    /// For a label: whether it found its sample, and whether the device's answer was right.
    pub feedback: Option<Feedback>,
    /// For a label, in the sample or after it: whether the device's answer for its sample was
    /// right (none for a label that found no sample).
    pub scored: Option<bool>,
    /// The student step the item made due, if one ran.
    pub step: Option<StepReport>,
    /// For a sample: the label request it raised, if the device asks about it.
    pub request: Option<Request>,
}

/// See the module docs.
pub struct Session {
    learner: Learner,
    backbone: Backbone,
    layout: Layout,
    calibrator: Option<Calibrator>,
    /// The adopted mounting; `None` while it is the identity (or calibration is off).
    mounting: Option<Mounting>,
    /// One raw sample, or a batch, through the mounting.
    mounted: Vec<f32>,
    cal_emb: Array2<f32>,
    cal_ws: Workspace,
    recent: RecentSamples,
    policy: CheckpointPolicy,
    paused: bool,
    stats: SessionStats,
    /// Every label (in a sample or after it) against the device's answer for its sample; kept
    /// in checkpoints, so it survives a restart.
    label_accuracy: Accuracy,
    /// Label requests, when the device asks (`[requests] enabled`).
    requests: Option<Requests>,
    /// The requests' clock.
    started: Instant,
}

/// A fresh learner on `classifier`'s pretrained trainable part with `cfg`'s sections and
/// the model's embedding reference (`[model] reference`): the session's, and the one
/// `edgemt export` restores a checkpoint into. Fails when the reference cannot be read or
/// was made for another model.
pub fn learner_for(
    classifier: &Classifier,
    cfg: &Config,
    seed: u64,
) -> Result<Learner, SessionError> {
    let reference = match &cfg.model.reference {
        Some(path) => Some(Arc::new(EmbeddingReference::read(
            path,
            classifier.fingerprint,
            classifier.embedding_dim,
            classifier.classes(),
        )?)),
        None => None,
    };
    Ok(Learner::new(
        classifier.pretrained(),
        Layout::for_shape(&classifier.input_shape, cfg.augment.time_axis),
        &cfg.learn,
        &cfg.augment,
        &cfg.guard,
        &cfg.gate,
        &cfg.trust,
        seed,
    )
    .with_reference(reference))
}

impl Session {
    /// A session on `classifier`'s pretrained trainable part, with `cfg`'s knobs and `seed`.
    /// Fails when `[calibration]` names channels the model's input does not have.
    pub fn new(classifier: &Classifier, cfg: &Config, seed: u64) -> Result<Self, SessionError> {
        let layout = Layout::for_shape(&classifier.input_shape, cfg.augment.time_axis);
        let calibrator = if cfg.calibration.enabled() {
            cfg.calibration
                .validate(layout.channels)
                .map_err(SessionError::Calibration)?;
            Some(Calibrator::new(cfg.calibration.clone(), layout))
        } else {
            None
        };
        let learner = learner_for(classifier, cfg, seed)?;
        Ok(Session {
            learner,
            backbone: classifier.backbone.clone(),
            layout,
            calibrator,
            mounting: None,
            mounted: Vec::new(),
            cal_emb: Array2::zeros((0, 0)),
            cal_ws: Workspace::default(),
            recent: RecentSamples::new(
                cfg.input.feedback_capacity,
                layout.sample_len(),
                classifier.embedding_dim,
            ),
            policy: CheckpointPolicy::new(
                cfg.checkpoint.every_steps,
                duration_s(cfg.checkpoint.every_s),
                duration_s(cfg.checkpoint.min_interval_s),
                Instant::now(),
            ),
            paused: false,
            stats: SessionStats::default(),
            label_accuracy: Accuracy::default(),
            requests: cfg
                .requests
                .enabled
                .then(|| Requests::new(cfg.requests.clone())),
            started: Instant::now(),
        })
    }

    pub fn learner(&self) -> &Learner {
        &self.learner
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// The served model's answers scored against every label so far, restored from the
    /// checkpoint when there was one.
    pub fn label_accuracy(&self) -> Accuracy {
        self.label_accuracy
    }

    pub fn teacher(&self) -> &Mlp {
        self.learner.teacher()
    }

    /// Which model the serving gate lets answer.
    pub fn serving(&self) -> Serving {
        self.learner.serving()
    }

    /// The model that answers (the adapted teacher or the pretrained model).
    pub fn served(&self) -> &Mlp {
        self.learner.served()
    }

    pub fn teacher_version(&self) -> u64 {
        self.learner.counters().teacher_version
    }

    /// The adopted mounting, applied to every raw sample before the model (`None`: identity).
    pub fn mounting(&self) -> Option<&Mounting> {
        self.mounting.as_ref()
    }

    /// The adopted mounting's signed permutation (identity when none).
    pub fn mounting_r(&self) -> SignedPerm {
        self.mounting
            .as_ref()
            .map_or(SignedPerm::IDENTITY, Mounting::r)
    }

    /// The adopted mounting as a checkpoint and export record.
    pub fn mounting_record(&self) -> Option<MountingRecord> {
        self.mounting
            .as_ref()
            .map(|m| MountingRecord::of(m, &self.layout))
    }

    /// The calibrator, when `[calibration]` declares channels.
    pub fn calibrator(&self) -> Option<&Calibrator> {
        self.calibrator.as_ref()
    }

    /// The models a prediction can be asked of now: the served one, the adapted teacher and
    /// the pretrained model, behind the adopted mounting.
    pub fn models(&self) -> Models<'_> {
        Models {
            served: self.learner.served(),
            serving: self.learner.serving(),
            mounting: self.mounting.as_ref(),
            teacher: Some(self.learner.teacher()),
            pretrained: Some(self.learner.pretrained()),
        }
    }

    /// The loop body of every driver: files `item` (a sample, or a label for an earlier one),
    /// then takes a student step if one is due.
    pub fn take(&mut self, item: Item) -> Result<Taken, SessionError> {
        let (feedback, request, scored) = match item {
            Item::Sample(o) => {
                let scored = o.label.map(|label| label == o.predicted);
                let request = self.observe(o)?;
                // A refused embedding was never answered, so there is nothing to score.
                let scored = scored.filter(|_| embedding_ok(o.embedding));
                (None, request, scored)
            }
            Item::Feedback { id, label, source } => {
                let feedback = self.feedback(id, label, source)?;
                let scored = match feedback {
                    Feedback::Matched { correct } => Some(correct),
                    Feedback::Late => None,
                };
                (Some(feedback), None, scored)
            }
        };
        if let Some(correct) = scored {
            self.label_accuracy.update(correct);
        }
        Ok(Taken {
            feedback,
            scored,
            step: self.maybe_step()?,
            request,
        })
    }

    /// Files a sample: shown to calibration, remembered by id for later feedback, and given
    /// to the learner. A sample whose embedding is not usable is refused (and counted) so it
    /// cannot poison the buffers; one embedded under a mounting calibration has since
    /// replaced is not learned from. Returns the label request it raised, if any.
    fn observe(&mut self, o: Observation) -> Result<Option<Request>, SessionError> {
        if !embedding_ok(o.embedding) {
            self.stats.rejected_embeddings += 1;
            return Ok(None);
        }
        self.calibrate(o.x, o.label, true)?;
        if o.mounting != self.mounting_r() {
            self.stats.stale_mounting += 1;
            return Ok(None);
        }
        if let Some(id) = o.id {
            self.recent.insert(id, &o);
        }
        if o.label.is_some() {
            self.stats.labels += 1;
        }
        let x = mount_batch(self.mounting.as_ref(), o.x, &mut self.mounted);
        self.learner
            .observe_from(x, o.embedding, o.label, o.source, o.truth);
        Ok(self.consider_request(&o))
    }

    /// Asks for a label on an unlabeled sample with an id when the requests' policy says so.
    /// The choice reads the models' outputs only (see `learn::requests`).
    fn consider_request(&mut self, o: &Observation) -> Option<Request> {
        let now = self.requests_clock_s();
        let requests = self.requests.as_mut()?;
        requests.seen_wanting(
            self.calibrator
                .as_ref()
                .is_some_and(|c| c.candidate().is_some()),
        );
        let id = o.id.filter(|_| o.label.is_none())?;
        let (adapted, pretrained) = self.learner.opinions(o.embedding);
        let served = match self.learner.serving() {
            Serving::Adapted => adapted,
            Serving::Pretrained => pretrained,
        };
        requests
            .consider(
                now,
                Candidate {
                    id,
                    served,
                    adapted,
                    pretrained,
                },
            )
            .cloned()
    }

    /// The label requests, when the device asks.
    pub fn requests(&self) -> Option<&Requests> {
        self.requests.as_ref()
    }

    /// Now on the requests' clock (seconds since the session began).
    pub fn requests_clock_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Closes the label requests that stayed open too long; returns how many.
    pub fn expire_requests(&mut self) -> usize {
        let now = self.requests_clock_s();
        self.requests.as_mut().map_or(0, |r| r.expire(now))
    }

    /// A label for an earlier sample, by id: scored against the prediction made for it, then
    /// (a clean test for calibration as well) learned from.
    fn feedback(
        &mut self,
        id: &str,
        label: usize,
        source: LabelSource,
    ) -> Result<Feedback, SessionError> {
        // A label asked for because of what the models said is biased evidence about the
        // pretrained model (see `learn::requests`): calibration does not take it.
        let clean = match self.requests.as_mut().and_then(|r| r.answer(id, label)) {
            Some(request) => request.reason == Reason::Sampled,
            None => true,
        };
        let Some(slot) = self.recent.take(id) else {
            self.stats.late_labels += 1;
            return Ok(Feedback::Late);
        };
        let correct = self.recent.predicted[slot] == label;
        self.stats.feedback.update(correct);
        let raw = self.recent.inputs.row(slot).to_vec();
        self.calibrate(&raw, clean.then_some(label), false)?;
        if self.recent.mountings[slot] != self.mounting_r() {
            self.stats.stale_mounting += 1;
            return Ok(Feedback::Matched { correct });
        }
        self.stats.labels += 1;
        let x = mount_batch(self.mounting.as_ref(), &raw, &mut self.mounted);
        self.learner.observe_from(
            x,
            self.recent.embeddings.row(slot),
            Some(label),
            source,
            None,
        );
        Ok(Feedback::Matched { correct })
    }

    /// Calibration's share of a raw sample: into its ring (`fresh`), its label as evidence,
    /// and a search when one is due. Scoring uses the frozen pretrained model.
    fn calibrate(
        &mut self,
        raw: &[f32],
        label: Option<usize>,
        fresh: bool,
    ) -> Result<(), SessionError> {
        let Session {
            calibrator,
            backbone,
            learner,
            cal_emb,
            cal_ws,
            ..
        } = self;
        let Some(cal) = calibrator.as_mut() else {
            return Ok(());
        };
        if fresh {
            cal.observe(raw);
        }
        // A confirmed adapted teacher is not thrown away for a mounting that only the
        // pretrained model has been tested behind (see `Calibrator::hold_adoption`).
        cal.hold_adoption(learner.serving() == Serving::Adapted);
        let pretrained = learner.pretrained();
        let mut score = |x: &[f32], n: usize, out: &mut Array2<f32>| -> Result<(), ModelError> {
            backbone.embed_into(x, n, cal_emb)?;
            pretrained.probs_into(cal_emb.view(), cal_ws, out);
            Ok(())
        };
        let mut events = Vec::new();
        if let Some(y) = label {
            events.extend(cal.label(raw, y, &mut score)?);
        }
        if fresh && cal.search_due() {
            events.extend(cal.search(&mut score)?);
        }
        for event in events {
            match event {
                CalibrationEvent::Proposed {
                    r,
                    infomax,
                    identity_infomax,
                } => {
                    self.stats.calibration_proposals += 1;
                    tracing::info!(
                        "calibration: proposing mounting {r} (information {infomax:.3} vs {identity_infomax:.3} as mounted); waiting for labels to confirm"
                    );
                }
                CalibrationEvent::Adopted { r, log_ratio } => {
                    tracing::info!(
                        "calibration: labels confirm mounting {r} (log-likelihood ratio {log_ratio:.2}); adopting it"
                    );
                    self.adopt(r)?;
                }
                CalibrationEvent::Reverted { r, log_ratio } => {
                    tracing::warn!(
                        "calibration: labels contradict mounting {r} (log-likelihood ratio {log_ratio:.2}); back to the device's own axes"
                    );
                    self.adopt(SignedPerm::IDENTITY)?;
                }
            }
        }
        Ok(())
    }

    /// Serves `r` from now on. The weights learned in the old frame do not carry over, so the
    /// learner starts again from the pretrained model (which the gate serves behind the new
    /// mounting) and the change is checkpointed at once. The labels do: each kept labeled
    /// sample is taken back to the device's axes, mounted the new way and embedded again, so
    /// what the user told the device is not lost with the frame it was told in.
    fn adopt(&mut self, r: SignedPerm) -> Result<(), SessionError> {
        let (kept, labels) = self.learner.labeled_inputs();
        // The kept samples are seen through the old mounting: one signed permutation takes
        // them back to the device's axes and on through `r`.
        let old = self
            .mounting
            .as_ref()
            .map_or(SignedPerm::IDENTITY, Mounting::r);
        self.set_mounting(r);
        self.learner.new_frame();
        if !labels.is_empty() {
            let cfg = self
                .calibrator
                .as_ref()
                .expect("a mounting implies a calibrator")
                .config();
            let change = Mounting::new(cfg, self.layout, old.inverse().then(&r));
            let x = mount_batch(Some(&change), &kept, &mut self.mounted);
            let mut emb = Array2::zeros((0, 0));
            self.backbone.embed_into(x, labels.len(), &mut emb)?;
            self.learner.refile_labels(x, emb.view(), &labels);
            tracing::info!(
                "calibration: {} kept labels re-embedded under mounting {}",
                labels.len(),
                r.name()
            );
        }
        self.policy.restart(0);
        self.stats.calibration_changes += 1;
        Ok(())
    }

    fn set_mounting(&mut self, r: SignedPerm) {
        self.mounting = match &self.calibrator {
            Some(cal) if r != SignedPerm::IDENTITY => {
                Some(Mounting::new(cal.config(), self.layout, r))
            }
            _ => None,
        };
        if let Some(cal) = self.calibrator.as_mut() {
            if cal.adopted() != r {
                cal.set_adopted(r);
            }
        }
    }

    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether enough new samples arrived for a student step (paused or not).
    pub fn step_due(&self) -> bool {
        self.learner.due()
    }

    /// One student step if enough new samples arrived (and training is not paused).
    fn maybe_step(&mut self) -> Result<Option<StepReport>, SessionError> {
        if !self.learner.due() {
            return Ok(None);
        }
        self.catch_up()
    }

    /// A student step a driver deferred (the daemon's trainer yields to inference while
    /// samples wait), taken now; nothing while paused or with nothing to learn from.
    pub fn catch_up(&mut self) -> Result<Option<StepReport>, SessionError> {
        if self.paused || !self.learner.has_data() {
            return Ok(None);
        }
        Ok(self.learner.step(&mut self.backbone)?)
    }

    /// The state to save when the checkpoint policy says it is time (`None` otherwise).
    pub fn take_checkpoint(&mut self, now: Instant) -> Option<Saved> {
        let steps = self.learner.counters().train_steps;
        if !self.policy.due(steps, now) {
            return None;
        }
        self.policy.saved(steps, now);
        Some(Saved {
            learner: self.learner.state(),
            mounting: self.mounting_record(),
            label_accuracy: self.label_accuracy,
        })
    }

    /// Ask for a checkpoint at the next [`Session::take_checkpoint`].
    pub fn request_checkpoint(&mut self) {
        self.policy.request();
    }

    /// An operator believes the labels label trust holds; returns how many it released.
    pub fn accept_labels(&mut self) -> usize {
        self.learner.accept_held_labels()
    }

    /// Back to the pretrained model (behind the adopted mounting); the reset state is
    /// checkpointed at the next chance, so a crash after a reset never brings back the
    /// teacher from before it.
    pub fn reset(&mut self) {
        self.learner.reset();
        self.policy.restart(0);
    }

    /// Restores the newest valid checkpoint in `store`, if any, with its mounting.
    pub fn restore(&mut self, store: &CheckpointStore) -> Option<Restored> {
        let restored = store.restore_latest(&mut self.learner)?;
        self.label_accuracy = restored.manifest.label_accuracy;
        let r = restored
            .manifest
            .mounting
            .as_ref()
            .map_or(SignedPerm::IDENTITY, |m| m.r);
        if r != SignedPerm::IDENTITY && self.calibrator.is_none() {
            tracing::warn!(
                "checkpoint {} adopted mounting {r}, but [calibration] declares no channels now; ignoring it",
                restored.name
            );
        } else {
            self.set_mounting(r);
        }
        self.policy
            .saved(self.learner.counters().train_steps, Instant::now());
        Some(restored)
    }
}
