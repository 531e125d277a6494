//! A stack of `Linear` layers with `Relu` between them: the trainable part of the classifier.
//!
//! Layer `l` computes `z = a·Wₗᵀ + bₗ` with `Wₗ` of shape `[out, in]` (stored as tensors
//! `"{l}.weight"` and `"{l}.bias"`); every layer but the last is followed by `Relu`. The last
//! layer's output is the logits. Today's linear head is the one-layer case. Forward and
//! backward are written once, per layer, and reuse the buffers in a [`Trace`], so a step
//! allocates nothing once warmed up.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, Zip};

use super::params::Params;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MlpError {
    #[error("an MLP needs at least one layer")]
    Empty,
    #[error("layer {layer}: weight has shape {weight:?} but bias has {bias} values")]
    Bias {
        layer: usize,
        weight: (usize, usize),
        bias: usize,
    },
    #[error("layer {layer} takes {takes} inputs but the layer before gives {gives}")]
    Chain {
        layer: usize,
        takes: usize,
        gives: usize,
    },
    #[error("parameters do not have this network's names and shapes")]
    Layout,
}

/// See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    params: Params,
    layers: usize,
}

/// Activations of one forward pass, kept for the backward pass (and reused as scratch).
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// `acts[l]`: the output of layer `l` (after Relu, except the last: the logits).
    acts: Vec<Array2<f32>>,
    /// Gradients with respect to each hidden layer's output.
    deltas: Vec<Array2<f32>>,
}

/// Scratch for inference-only forward passes.
pub type Workspace = Trace;

impl Trace {
    /// Logits of the last forward pass.
    pub fn logits(&self) -> &Array2<f32> {
        self.acts.last().expect("forward ran")
    }

    /// Output of layer `l` in the last forward pass (after Relu for hidden layers).
    pub fn layer_output(&self, l: usize) -> &Array2<f32> {
        &self.acts[l]
    }
}

impl Mlp {
    /// Builds from `(weight [out, in], bias [out])` per layer, first layer first.
    pub fn new(layers: Vec<(Array2<f32>, Array1<f32>)>) -> Result<Mlp, MlpError> {
        if layers.is_empty() {
            return Err(MlpError::Empty);
        }
        for (l, (w, b)) in layers.iter().enumerate() {
            if w.nrows() != b.len() {
                return Err(MlpError::Bias {
                    layer: l,
                    weight: w.dim(),
                    bias: b.len(),
                });
            }
            if l > 0 && layers[l - 1].0.nrows() != w.ncols() {
                return Err(MlpError::Chain {
                    layer: l,
                    takes: w.ncols(),
                    gives: layers[l - 1].0.nrows(),
                });
            }
        }
        let owned: Vec<(Vec<f32>, Vec<f32>)> = layers
            .iter()
            .map(|(w, b)| (w.iter().copied().collect(), b.to_vec()))
            .collect();
        let params = Params::from_tensors(layers.iter().zip(&owned).enumerate().flat_map(
            |(l, ((w, _), (wv, bv)))| {
                [
                    (
                        format!("{l}.weight"),
                        vec![w.nrows(), w.ncols()],
                        wv.as_slice(),
                    ),
                    (format!("{l}.bias"), vec![w.nrows()], bv.as_slice()),
                ]
            },
        ))
        .expect("shapes checked above");
        Ok(Mlp {
            params,
            layers: layers.len(),
        })
    }

    /// The same network with other values (same names and shapes).
    pub fn with_params(&self, params: Params) -> Result<Mlp, MlpError> {
        if !self.params.same_layout(&params) {
            return Err(MlpError::Layout);
        }
        Ok(Mlp {
            params,
            layers: self.layers,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }

    /// Layer `l`'s weight, `[out, in]`.
    pub fn weight(&self, l: usize) -> ArrayView2<'_, f32> {
        self.params.matrix(2 * l)
    }

    /// Layer `l`'s bias, `[out]`.
    pub fn bias(&self, l: usize) -> ArrayView1<'_, f32> {
        self.params.vector(2 * l + 1)
    }

    /// Width of the input (the embedding the backbone produces).
    pub fn input_dim(&self) -> usize {
        self.weight(0).ncols()
    }

    pub fn classes(&self) -> usize {
        self.weight(self.layers - 1).nrows()
    }

    pub fn is_finite(&self) -> bool {
        self.params.is_finite()
    }

    /// Runs every layer on `x` (`[batch, input_dim]`), keeping activations in `trace`.
    pub fn forward(&self, x: ArrayView2<f32>, trace: &mut Trace) {
        trace.acts.resize_with(self.layers, Default::default);
        for l in 0..self.layers {
            let (done, rest) = trace.acts.split_at_mut(l);
            let input = if l == 0 { x } else { done[l - 1].view() };
            let out = &mut rest[0];
            let w = self.weight(l);
            resize(out, input.nrows(), w.nrows());
            general_mat_mul(1.0, &input, &w.t(), 0.0, out);
            let b = self.bias(l);
            out.rows_mut().into_iter().for_each(|mut row| row += &b);
            if l + 1 < self.layers {
                out.mapv_inplace(|v| v.max(0.0));
            }
        }
    }

    /// Writes `[batch, classes]` logits into `out`.
    pub fn logits_into(&self, x: ArrayView2<f32>, ws: &mut Workspace, out: &mut Array2<f32>) {
        self.forward(x, ws);
        let logits = ws.logits();
        resize(out, logits.nrows(), logits.ncols());
        out.assign(logits);
    }

    /// Writes `[batch, classes]` class probabilities into `out`.
    pub fn probs_into(&self, x: ArrayView2<f32>, ws: &mut Workspace, out: &mut Array2<f32>) {
        self.logits_into(x, ws, out);
        softmax_rows(out);
    }

    /// Allocating convenience over [`Mlp::probs_into`] (tests, tools).
    pub fn probs(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut out = Array2::zeros((0, 0));
        self.probs_into(x, &mut Trace::default(), &mut out);
        out
    }

    /// Allocating convenience over [`Mlp::logits_into`].
    pub fn logits(&self, x: ArrayView2<f32>) -> Array2<f32> {
        let mut out = Array2::zeros((0, 0));
        self.logits_into(x, &mut Trace::default(), &mut out);
        out
    }

    /// Back-propagates `dlogits` (`dL/dlogits` for the forward pass in `trace`, which ran on
    /// `x`) and *adds* the parameter gradients to `grad`.
    pub fn backward(
        &self,
        x: ArrayView2<f32>,
        trace: &mut Trace,
        dlogits: ArrayView2<f32>,
        grad: &mut Params,
    ) {
        debug_assert!(grad.same_layout(&self.params));
        let layers = self.layers;
        trace.deltas.resize_with(layers, Default::default);
        for l in (0..layers).rev() {
            let (lower, upper) = trace.deltas.split_at_mut(l);
            let upstream = if l + 1 == layers {
                dlogits
            } else {
                upper[0].view()
            };
            let input = if l == 0 { x } else { trace.acts[l - 1].view() };
            general_mat_mul(1.0, &upstream.t(), &input, 1.0, &mut grad.matrix_mut(2 * l));
            let mut db = grad.vector_mut(2 * l + 1);
            for row in upstream.axis_iter(Axis(0)) {
                db += &row;
            }
            if l > 0 {
                let below = &mut lower[l - 1];
                resize(below, upstream.nrows(), input.ncols());
                general_mat_mul(1.0, &upstream, &self.weight(l), 0.0, below);
                // Relu passes the gradient only where its output was positive.
                Zip::from(below).and(&trace.acts[l - 1]).for_each(|d, &a| {
                    if a <= 0.0 {
                        *d = 0.0
                    }
                });
            }
        }
    }
}

fn resize(a: &mut Array2<f32>, rows: usize, cols: usize) {
    if a.dim() != (rows, cols) {
        *a = Array2::zeros((rows, cols));
    }
}

/// Numerically stable softmax over each row, in place.
pub fn softmax_rows(a: &mut Array2<f32>) {
    for mut row in a.axis_iter_mut(Axis(0)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        row.mapv_inplace(|v| {
            let e = (v - max).exp();
            sum += e;
            e
        });
        row /= sum;
    }
}

/// Index and value of the largest entry of a row.
pub fn argmax(row: ArrayView1<f32>) -> (usize, f32) {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
}
