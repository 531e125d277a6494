//! Writing the adapted head back into the original ONNX graph.
//!
//! Only the head's initializers change: the weights are written in the layout the file used
//! (transposed for `transB = 0` / MatMul) and divided by Gemm's alpha and beta, so the graph
//! computes exactly the adapted teacher's logits. Everything else, including opsets and
//! metadata, is kept; a few `edgemt.*` metadata entries record where the weights came from.

use prost::Message;
use tract_onnx::pb::{ModelProto, StringStringEntryProto, TensorProto};

use super::{HeadSpec, ModelError, WeightLayout};
use crate::nn::Mlp;

/// Returns the serialized model with `head` in place of the original head.
pub fn export_with_head(
    proto: &ModelProto,
    spec: &HeadSpec,
    head: &Mlp,
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, ModelError> {
    if head.layers() != 1 || head.weight(0).dim() != spec.weight.dim() {
        return Err(ModelError::Unsupported(format!(
            "adapted head has shape {:?}, the model's head {:?}",
            head.weight(0).dim(),
            spec.weight.dim()
        )));
    }
    let mut proto = proto.clone();
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Unsupported("the file holds no graph".into()))?;
    let weight: Vec<f32> = match spec.weight_layout {
        WeightLayout::ClassesByEmbedding => head.weight(0).iter().map(|w| w / spec.alpha).collect(),
        WeightLayout::EmbeddingByClasses => {
            head.weight(0).t().iter().map(|w| w / spec.alpha).collect()
        }
    };
    replace(graph, &spec.weight_name, &weight)?;
    match &spec.bias_name {
        Some(name) => {
            let bias: Vec<f32> = head.bias(0).iter().map(|b| b / spec.beta).collect();
            replace(graph, name, &bias)?;
        }
        None if head.bias(0).iter().any(|b| *b != 0.0) => {
            return Err(ModelError::Unsupported(
                "the model's head has no bias, so the adapted bias cannot be written back".into(),
            ))
        }
        None => {}
    }
    for (key, value) in metadata {
        proto.metadata_props.retain(|p| p.key != *key);
        proto.metadata_props.push(StringStringEntryProto {
            key: key.to_string(),
            value: value.clone(),
        });
    }
    Ok(proto.encode_to_vec())
}

/// Overwrites an initializer (or Constant value) of the same element count, keeping its dims.
fn replace(
    graph: &mut tract_onnx::pb::GraphProto,
    name: &str,
    values: &[f32],
) -> Result<(), ModelError> {
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
            "initializer '{name}' has {count} values, the adapted head {}",
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
