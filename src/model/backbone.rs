//! The frozen backbone: the original graph cut at the embedding tensor, run by tract.
//!
//! Built once at start-up (load, cut, optimize with a symbolic batch dimension, plan). Each
//! `Backbone` keeps its own tract state so repeated calls reuse tract's scratch buffers;
//! clone it to give another thread its own.

use std::path::Path;
use std::sync::Arc;

use ndarray::Array2;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;

use super::{tract_err, ModelError};

type Plan = TypedRunnableModel;

pub struct Backbone {
    plan: Arc<Plan>,
    state: TypedSimpleState,
    input_shape: Vec<usize>,
    embedding_dim: usize,
    shape_buf: Vec<usize>,
}

impl Clone for Backbone {
    fn clone(&self) -> Self {
        Backbone {
            plan: self.plan.clone(),
            state: self
                .plan
                .spawn()
                .expect("spawning a state on a plan that already spawned one"),
            input_shape: self.input_shape.clone(),
            embedding_dim: self.embedding_dim,
            shape_buf: self.shape_buf.clone(),
        }
    }
}

impl Backbone {
    pub(crate) fn build(
        onnx: &tract_onnx::Onnx,
        proto: &ModelProto,
        path: &Path,
        input_shape: &[usize],
        embedding: &str,
    ) -> Result<Self, ModelError> {
        let dir = path.parent().and_then(|p| p.to_str());
        let parsed = onnx.parse(proto, dir).map_err(tract_err)?;
        let mut model = parsed.model;
        let batch = model.sym("N");
        let mut dims: TVec<TDim> = tvec![batch.into()];
        dims.extend(input_shape.iter().map(|&d| TDim::from(d)));
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), dims))
            .map_err(tract_err)?;
        let model = model.with_outputs_by_name([embedding]).map_err(tract_err)?;
        let typed = model.into_optimized().map_err(tract_err)?;
        let fact = typed.output_fact(0).map_err(tract_err)?;
        let out_dims: Vec<TDim> = fact.shape.iter().cloned().collect();
        if out_dims.len() != 2 {
            return Err(ModelError::Unsupported(format!(
                "embedding '{embedding}' has shape {out_dims:?}, expected [batch, features]"
            )));
        }
        let embedding_dim = out_dims[1].as_usize().ok_or_else(|| {
            ModelError::Unsupported(format!(
                "embedding '{embedding}' has a non-fixed width {}",
                out_dims[1]
            ))
        })?;
        let plan = typed.into_runnable().map_err(tract_err)?;
        let state = plan.spawn().map_err(tract_err)?;
        Ok(Backbone {
            plan,
            state,
            input_shape: input_shape.to_vec(),
            embedding_dim,
            shape_buf: Vec::with_capacity(input_shape.len() + 1),
        })
    }

    pub fn embedding_dim(&self) -> usize {
        self.embedding_dim
    }

    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Embeds `batch` samples laid out back to back in `inputs` (row-major, each of the
    /// model's input shape) and writes `[batch, embedding_dim]` into `out`, which is resized
    /// only when its shape differs.
    pub fn embed_into(
        &mut self,
        inputs: &[f32],
        batch: usize,
        out: &mut Array2<f32>,
    ) -> Result<(), ModelError> {
        let per = self.input_shape.iter().product::<usize>();
        if inputs.len() != per * batch {
            return Err(ModelError::InputSize {
                got: inputs.len(),
                expected: per * batch,
                batch,
                shape: self.input_shape.clone(),
            });
        }
        if out.dim() != (batch, self.embedding_dim) {
            *out = Array2::zeros((batch, self.embedding_dim));
        }
        if batch == 0 {
            return Ok(());
        }
        self.shape_buf.clear();
        self.shape_buf.push(batch);
        self.shape_buf.extend(&self.input_shape);
        let input = Tensor::from_shape(&self.shape_buf, inputs).map_err(tract_err)?;
        let result = self.state.run(tvec!(input.into())).map_err(tract_err)?;
        let view = result[0].to_plain_array_view::<f32>().map_err(tract_err)?;
        let view = view
            .into_shape_with_order((batch, self.embedding_dim))
            .map_err(tract_err)?;
        out.assign(&view);
        Ok(())
    }

    /// Allocating convenience over [`Backbone::embed_into`].
    pub fn embed(&mut self, inputs: &[f32], batch: usize) -> Result<Array2<f32>, ModelError> {
        let mut out = Array2::zeros((batch, self.embedding_dim));
        self.embed_into(inputs, batch, &mut out)?;
        Ok(out)
    }
}
