//! Writing the adapted trainable layers back into the original ONNX graph.
//!
//! Only the lifted layers' initializers change: each layer's weights are written in the layout
//! the file used (transposed for `transB = 0` / MatMul) and divided by Gemm's alpha and beta,
//! so the graph computes exactly the adapted network's outputs. Everything else, including
//! opsets and metadata, is kept; a few `edgemt.*` metadata entries record where the weights
//! came from.

use ndarray::{ArrayView1, ArrayView2};
use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};

use super::{LayerSpec, ModelError, TrainableSpec, WeightLayout};
use crate::nn::Mlp;

/// Returns the serialized model with every layer of `adapted` in place of the matching lifted
/// layer of `spec`, plus `metadata` and `edgemt.trainable_layers`.
pub fn export_trainable(
    proto: &ModelProto,
    spec: &TrainableSpec,
    adapted: &Mlp,
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, ModelError> {
    if adapted.layers() != spec.layers.len() {
        return Err(ModelError::Unsupported(format!(
            "the adapted network has {} layer(s) but the model's trainable part has {} ({})",
            adapted.layers(),
            spec.layers.len(),
            spec.path.join(" -> ")
        )));
    }
    let mut proto = proto.clone();
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Unsupported("the file holds no graph".into()))?;
    for (l, layer) in spec.layers.iter().enumerate() {
        write_layer(graph, layer, adapted.weight(l), adapted.bias(l))?;
    }
    let layers = spec.layers.len().to_string();
    for (key, value) in [("edgemt.trainable_layers", layers)]
        .into_iter()
        .chain(metadata.iter().map(|(k, v)| (*k, v.clone())))
    {
        proto.metadata_props.retain(|p| p.key != key);
        proto.metadata_props.push(StringStringEntryProto {
            key: key.to_string(),
            value,
        });
    }
    Ok(proto.encode_to_vec())
}

/// Writes one layer's adapted weight `[out, in]` and bias `[out]` into its initializers.
fn write_layer(
    graph: &mut GraphProto,
    spec: &LayerSpec,
    weight: ArrayView2<f32>,
    bias: ArrayView1<f32>,
) -> Result<(), ModelError> {
    if weight.dim() != spec.weight.dim() || bias.len() != spec.bias.len() {
        return Err(ModelError::Unsupported(format!(
            "adapted layer for {} has weight {:?} and bias [{}], the model's layer {:?} and [{}]",
            spec.label(),
            weight.dim(),
            bias.len(),
            spec.weight.dim(),
            spec.bias.len()
        )));
    }
    let values: Vec<f32> = match spec.weight_layout {
        WeightLayout::OutByIn => weight.iter().map(|w| w / spec.alpha).collect(),
        WeightLayout::InByOut => weight.t().iter().map(|w| w / spec.alpha).collect(),
    };
    replace(graph, &spec.weight_name, &values)?;
    match &spec.bias_name {
        Some(name) => {
            let values: Vec<f32> = bias.iter().map(|b| b / spec.beta).collect();
            replace(graph, name, &values)
        }
        None if bias.iter().any(|b| *b != 0.0) => Err(ModelError::Unsupported(format!(
            "{} has no bias, so the adapted bias cannot be written back",
            spec.label()
        ))),
        None => Ok(()),
    }
}

/// Overwrites an initializer (or Constant value) of the same element count, keeping its dims.
fn replace(graph: &mut GraphProto, name: &str, values: &[f32]) -> Result<(), ModelError> {
    let tensor: Option<&mut TensorProto> = if graph.initializer.iter().any(|t| t.name == name) {
        graph.initializer.iter_mut().find(|t| t.name == name)
    } else {
        graph
            .node
            .iter_mut()
            .find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))
            .and_then(|n| n.attribute.iter_mut().find(|a| a.name == "value"))
            .and_then(|a| a.t.as_mut())
    };
    let t =
        tensor.ok_or_else(|| ModelError::Unsupported(format!("initializer '{name}' not found")))?;
    let count: i64 = t.dims.iter().product();
    if count as usize != values.len() {
        return Err(ModelError::Unsupported(format!(
            "initializer '{name}' has {count} values, the adapted layer {}",
            values.len()
        )));
    }
    t.data_type = 1; // FLOAT
    t.float_data.clear();
    t.double_data.clear();
    t.external_data.clear();
    t.data_location = None;
    t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(())
}
