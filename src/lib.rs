//! edgemt keeps an ONNX classifier accurate on an edge device by learning from the device's
//! own, mostly unlabeled, sensor stream, and never serves a model the evidence shows worse
//! than the pretrained one.
//!
//! Data flows: [`stream`] decodes and validates samples -> [`calibration`] re-orients the
//! sensor axes once labels confirm a mounting -> [`model`] embeds them with the frozen
//! backbone (tract) -> the model the serving gate chooses predicts -> the sample goes into the
//! [`learn`] buffers -> the student ([`nn::Mlp`], the lifted last layers) trains on
//! L_sup + λ·L_pseudo + α·L_consistency (+ do-no-harm terms) -> every k steps the teacher is
//! refreshed by EMA. One [`session::Session`] holds these rules; [`replay`] drives it over a
//! recording, prequentially, and `daemon` drives it from MQTT. [`plot`] draws a replay's
//! report, [`checkpoint`] makes the state durable, [`config`] holds the knobs, [`metrics`]
//! measures the process, [`check`] verifies a config and its model without running.
//!
//! Layers: a module uses only modules on lower lines (`cargo build --no-default-features`
//! builds everything but the daemon).
//!
//! ```text
//! app      main (the CLI), plot, logging
//! drivers  replay, check, daemon (cargo feature `daemon`: tokio, MQTT, systemd, Prometheus)
//! core     session
//!          config
//!          checkpoint
//!          model, learn
//!          calibration
//!          nn, stream, metrics
//! ```

pub mod calibration;
pub mod check;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod learn;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod plot;
pub mod replay;
pub mod scores;
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
