//! The trainable part as plain data: named parameter tensors ([`Params`]) and a stack of
//! `Linear` layers with `Relu` between them ([`Mlp`]), with its forward and backward pass.
//!
//! This is the leaf both sides meet on: `model/` lifts the last learned layers of an ONNX
//! graph out into an [`Mlp`] and writes them back on export; `learn/` trains one. Neither of
//! those imports the other. Everything that treats parameters as a whole (optimizer, EMA,
//! anchor, clipping, finiteness checks, the checkpoint codec) visits [`Params`] tensor by
//! tensor, so it works for any number of layers.

pub mod mlp;
pub mod params;

pub use mlp::{argmax, softmax_rows, Mlp, MlpError, Trace, Workspace};
pub use params::{Params, ParamsError};
