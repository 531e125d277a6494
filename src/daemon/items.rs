//! What travels between the daemon's stages, in arrival order: raw input from the ingest
//! thread to inference ([`Incoming`]), and predicted samples and labels from inference to
//! training ([`TrainItem`], the owned form of the session's [`Item`]). Its own module so the
//! stages depend on it and not on each other.

use std::time::Instant;

use ndarray::ArrayView1;

use super::queue::Droppable;
use crate::calibration::SignedPerm;
use crate::session::{Item, LabelSource, Observation};

/// What the ingest thread hands to inference.
pub enum Incoming {
    Sample {
        x: Vec<f32>,
        id: String,
        label: Option<usize>,
        received: Instant,
    },
    Feedback {
        id: String,
        label: usize,
        source: LabelSource,
    },
}

impl Droppable for Incoming {
    fn droppable(&self) -> bool {
        matches!(self, Incoming::Sample { label: None, .. })
    }
    fn is_sample(&self) -> bool {
        matches!(self, Incoming::Sample { .. })
    }
}

/// What inference hands to training, in arrival order.
pub enum TrainItem {
    /// A predicted sample: its input, the embedding it was predicted from, and its label if
    /// known on arrival.
    Sample {
        id: String,
        x: Vec<f32>,
        embedding: Vec<f32>,
        label: Option<usize>,
        /// The class the device answered (the served model's).
        predicted: usize,
        /// The calibration the embedding was computed under.
        mounting: SignedPerm,
    },
    /// A label for an earlier sample.
    Feedback {
        id: String,
        label: usize,
        source: LabelSource,
    },
}

impl TrainItem {
    /// The item as [`crate::session::Session::take`] reads it.
    pub fn as_item(&self) -> Item<'_> {
        match self {
            TrainItem::Sample {
                id,
                x,
                embedding,
                label,
                predicted,
                mounting,
            } => Item::Sample(Observation {
                id: Some(id),
                x,
                embedding: ArrayView1::from(embedding.as_slice()),
                mounting: *mounting,
                label: *label,
                // A label inside a sample is the only kind a sample carries in the daemon.
                source: LabelSource::Inline,
                truth: None,
                predicted: *predicted,
            }),
            TrainItem::Feedback { id, label, source } => Item::Feedback {
                id,
                label: *label,
                source: *source,
            },
        }
    }
}

impl Droppable for TrainItem {
    fn droppable(&self) -> bool {
        matches!(self, TrainItem::Sample { label: None, .. })
    }
    fn is_sample(&self) -> bool {
        matches!(self, TrainItem::Sample { .. })
    }
}
