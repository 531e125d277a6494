//! edgemt keeps an ONNX classifier accurate on an edge device by learning from the device's
//! own, mostly unlabeled, sensor stream.
//!
//! Data flows: [`stream`] decodes and validates samples -> [`model`] embeds them with the
//! frozen backbone (tract) -> the deployed teacher head predicts -> the sample goes into the
//! [`learn`] buffers -> the student head trains on L_sup + λ·L_pseudo + α·L_consistency ->
//! every k steps the teacher is refreshed by EMA. [`replay`] drives this over a recording,
//! prequentially; [`config`] holds the knobs; [`metrics`] measures the process.

pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod learn;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod replay;
pub mod stream;
