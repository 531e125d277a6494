//! edgemt keeps an ONNX classifier accurate on an edge device by learning from the device's
//! own, mostly unlabeled, sensor stream.
//!
//! Data flows: [`stream`] decodes and validates samples -> [`model`] embeds them with the
//! frozen backbone (tract) -> the deployed teacher head predicts -> the sample goes into the
//! [`learn`] buffers -> the student head trains on L_sup + λ·L_pseudo + α·L_consistency ->
//! every k steps the teacher is refreshed by EMA. [`replay`] drives this over a recording,
//! prequentially; [`config`] holds the knobs; [`metrics`] measures the process.
//! [`calibration`] undoes a sensor worn rotated or mirrored before the model sees a sample.

pub mod calibration;
pub mod checkpoint;
pub mod config;
pub mod daemon;
pub mod learn;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod replay;
pub mod session;
pub mod stream;

/// An error and its causes, one after the other (`outer: cause: root cause`), for logs: a
/// `tracing` line shows only `Display`, which would drop the OS error behind an I/O failure.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
