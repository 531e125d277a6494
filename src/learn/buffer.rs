//! Bounded buffers of recent samples, preallocated so the stream never allocates per sample.
//!
//! Each slot keeps a sample's raw input (augmentations need it) and its clean embedding
//! (the backbone is frozen, so the embedding computed for the prediction is reused for
//! training). The unlabeled buffer is one ring: the newest sample overwrites the oldest. The
//! labeled buffer is one ring per class, so a class that is labeled often cannot push a rare
//! class out, and batches can be drawn class-balanced.

use ndarray::{Array2, ArrayView1, ArrayViewMut1};

use super::rng::Rng;

/// Sentinel for "no ground truth known" in a slot.
pub const NO_TRUTH: usize = usize::MAX;

/// A fixed-capacity ring of (input, embedding, truth) slots.
#[derive(Debug, Clone)]
pub struct SampleRing {
    inputs: Array2<f32>,
    embeddings: Array2<f32>,
    truth: Vec<usize>,
    len: usize,
    next: usize,
}

impl SampleRing {
    pub fn new(capacity: usize, sample_len: usize, embedding_dim: usize) -> Self {
        SampleRing {
            inputs: Array2::zeros((capacity, sample_len)),
            embeddings: Array2::zeros((capacity, embedding_dim)),
            truth: vec![NO_TRUTH; capacity],
            len: 0,
            next: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.truth.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores a sample; returns true if an older one was overwritten.
    pub fn push(
        &mut self,
        input: &[f32],
        embedding: ArrayView1<f32>,
        truth: Option<usize>,
    ) -> bool {
        if self.capacity() == 0 {
            return true;
        }
        let slot = self.next;
        self.inputs
            .row_mut(slot)
            .as_slice_mut()
            .expect("rows are contiguous")
            .copy_from_slice(input);
        self.embeddings.row_mut(slot).assign(&embedding);
        self.truth[slot] = truth.unwrap_or(NO_TRUTH);
        self.next = (slot + 1) % self.capacity();
        let evicted = self.len == self.capacity();
        self.len = (self.len + 1).min(self.capacity());
        evicted
    }

    pub fn input(&self, i: usize) -> &[f32] {
        self.inputs.row(i).to_slice().expect("rows are contiguous")
    }

    pub fn embedding(&self, i: usize) -> ArrayView1<'_, f32> {
        self.embeddings.row(i)
    }

    pub fn truth(&self, i: usize) -> Option<usize> {
        (self.truth[i] != NO_TRUTH).then_some(self.truth[i])
    }

    /// Copies slot `i` into a batch row.
    pub fn copy_embedding(&self, i: usize, mut out: ArrayViewMut1<f32>) {
        out.assign(&self.embeddings.row(i));
    }

    /// Slot indices from the oldest held sample to the newest.
    pub fn oldest_first(&self) -> impl Iterator<Item = usize> + '_ {
        let start = if self.len == self.capacity() {
            self.next
        } else {
            0
        };
        (0..self.len).map(move |k| (start + k) % self.capacity().max(1))
    }

    pub fn sample_len(&self) -> usize {
        self.inputs.ncols()
    }
}

/// Class-balanced store of the most recent labeled samples.
#[derive(Debug, Clone)]
pub struct LabeledBuffer {
    per_class: Vec<SampleRing>,
}

impl LabeledBuffer {
    pub fn new(classes: usize, per_class: usize, sample_len: usize, embedding_dim: usize) -> Self {
        LabeledBuffer {
            per_class: (0..classes)
                .map(|_| SampleRing::new(per_class, sample_len, embedding_dim))
                .collect(),
        }
    }

    pub fn push(&mut self, input: &[f32], embedding: ArrayView1<f32>, label: usize) {
        self.per_class[label].push(input, embedding, Some(label));
    }

    pub fn len(&self) -> usize {
        self.per_class.iter().map(SampleRing::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when at least one sample of `class` is held.
    pub fn has(&self, class: usize) -> bool {
        !self.per_class[class].is_empty()
    }

    /// Number of labeled samples held per class.
    pub fn class_counts(&self) -> Vec<usize> {
        self.per_class.iter().map(SampleRing::len).collect()
    }

    /// Draws `n` (class, slot) pairs: a class uniformly among those present, then a slot in it.
    pub fn sample(&self, n: usize, rng: &mut Rng, out: &mut Vec<(usize, usize)>) {
        out.clear();
        let present: usize = self.per_class.iter().filter(|r| !r.is_empty()).count();
        if present == 0 {
            return;
        }
        for _ in 0..n {
            let mut k = rng.below(present);
            let class = self
                .per_class
                .iter()
                .position(|r| {
                    if r.is_empty() {
                        return false;
                    }
                    if k == 0 {
                        return true;
                    }
                    k -= 1;
                    false
                })
                .expect("k < number of non-empty classes");
            out.push((class, rng.below(self.per_class[class].len())));
        }
    }

    pub fn ring(&self, class: usize) -> &SampleRing {
        &self.per_class[class]
    }

    pub fn classes(&self) -> usize {
        self.per_class.len()
    }
}
