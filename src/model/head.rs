//! Finding the classifier's linear head in an ONNX graph.
//!
//! edgemt trains only the last learned layer, so it has to know exactly where that layer is:
//! which tensor feeds it (the embedding, where the frozen backbone ends), which initializers
//! hold its weights and in what layout, and whether a Softmax follows it. This module reads
//! the raw ONNX protobuf (not tract's graph, which fuses and renames nodes) and walks back
//! from the classifier output through output-only ops (Softmax, Identity, ...) to a Gemm or a
//! MatMul + Add. The layout it records is what export needs to write adapted weights back.

use std::collections::HashMap;

use ndarray::{Array1, Array2};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};

use super::ModelError;

/// Whether the graph's output is raw class scores or a probability distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// The head's output is the graph output (logits).
    Logits,
    /// A Softmax over the class axis follows the head.
    Probabilities,
}

/// How the head's weight initializer is laid out in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// `[classes, embedding]` (Gemm with transB = 1, as PyTorch exports).
    ClassesByEmbedding,
    /// `[embedding, classes]` (Gemm with transB = 0, or MatMul).
    EmbeddingByClasses,
}

/// Everything edgemt knows about the head it found.
#[derive(Debug, Clone)]
pub struct HeadSpec {
    /// Tensor feeding the head: the backbone's output.
    pub embedding: String,
    /// The classifier output the head drives.
    pub output: String,
    pub kind: OutputKind,
    /// Initializer (or Constant) holding the weights.
    pub weight_name: String,
    pub weight_layout: WeightLayout,
    /// Initializer holding the bias, if the head has one.
    pub bias_name: Option<String>,
    /// Gemm's alpha and beta, folded into `weight` and `bias` below.
    pub alpha: f32,
    pub beta: f32,
    /// Ops from the head to the output, e.g. `["Gemm 'fc3' (transB=1)", "Softmax"]`.
    pub path: Vec<String>,
    /// Effective weights, always `[classes, embedding]`.
    pub weight: Array2<f32>,
    /// Effective bias, `[classes]` (zeros when the head has none).
    pub bias: Array1<f32>,
}

/// Ops that may sit between the head and the classifier output without changing which class
/// wins, so the head's pre-activation values can stand for the model's scores.
const PASS_THROUGH: &[&str] = &["Identity", "Dropout", "Flatten", "Squeeze", "Reshape"];

/// Finds the head in `proto`.
///
/// `output` selects the classifier output by name; without it the first graph output with a
/// floating-point element type is used (skl2onnx graphs also output an int64 label first).
pub fn find_head(
    proto: &ModelProto,
    output: Option<&str>,
    onnx: &tract_onnx::Onnx,
) -> Result<HeadSpec, ModelError> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Unsupported("the file holds no graph".into()))?;
    let output = pick_output(graph, output)?;
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();

    let mut path = Vec::new();
    let mut kind = OutputKind::Logits;
    let mut tensor = output.clone();
    // Walk back over output-only ops to the head itself.
    let head = loop {
        let node = producers.get(tensor.as_str()).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "output '{output}' is not produced by any node before a linear layer was found"
            ))
        })?;
        match node.op_type.as_str() {
            "Softmax" => {
                let axis = int_attr(node, "axis").unwrap_or(-1);
                if axis != -1 && axis != 1 {
                    return Err(ModelError::Unsupported(format!(
                        "Softmax '{}' normalizes axis {axis}, not the class axis",
                        node.name
                    )));
                }
                kind = OutputKind::Probabilities;
                path.push("Softmax".to_string());
                tensor = node.input[0].clone();
            }
            op if PASS_THROUGH.contains(&op) => {
                path.push(op.to_string());
                tensor = node.input[0].clone();
            }
            "Gemm" | "Add" | "MatMul" => break *node,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "expected a linear head (Gemm, or MatMul + Add, optionally followed by Softmax) before output '{output}', found {other} '{}'",
                    node.name
                )))
            }
        }
    };
    path.reverse();

    let init = |name: &str| constant(graph, name, onnx);
    let spec = match head.op_type.as_str() {
        "Gemm" => {
            if int_attr(head, "transA").unwrap_or(0) != 0 {
                return Err(ModelError::Unsupported(format!(
                    "Gemm '{}' has transA = 1",
                    head.name
                )));
            }
            let trans_b = int_attr(head, "transB").unwrap_or(0) != 0;
            let alpha = float_attr(head, "alpha").unwrap_or(1.0);
            let beta = float_attr(head, "beta").unwrap_or(1.0);
            let weight_name = head.input.get(1).cloned().unwrap_or_default();
            let (w, dims) = init(&weight_name).ok_or_else(|| {
                ModelError::Unsupported(format!("Gemm '{}' takes its weights '{weight_name}' from a computed tensor, not an initializer", head.name))
            })?;
            let layout = if trans_b {
                WeightLayout::ClassesByEmbedding
            } else {
                WeightLayout::EmbeddingByClasses
            };
            let weight = weights_to_classes_by_embedding(&w, &dims, layout, &weight_name)? * alpha;
            let bias_name = head.input.get(2).filter(|s| !s.is_empty()).cloned();
            let bias = match &bias_name {
                Some(name) => bias_vector(init(name), name, weight.nrows())? * beta,
                None => Array1::zeros(weight.nrows()),
            };
            path.insert(
                0,
                format!("Gemm '{}' (transB={})", head.name, trans_b as i32),
            );
            HeadSpec {
                embedding: head.input[0].clone(),
                output,
                kind,
                weight_name,
                weight_layout: layout,
                bias_name,
                alpha,
                beta,
                path,
                weight,
                bias,
            }
        }
        op => {
            // MatMul, or Add(MatMul(e, W), b) with the bias on either side.
            let (matmul, bias_name) = if op == "Add" {
                let (mm_in, b_in) = if producers
                    .get(head.input[0].as_str())
                    .is_some_and(|n| n.op_type == "MatMul")
                {
                    (&head.input[0], &head.input[1])
                } else if producers
                    .get(head.input[1].as_str())
                    .is_some_and(|n| n.op_type == "MatMul")
                {
                    (&head.input[1], &head.input[0])
                } else {
                    return Err(ModelError::Unsupported(format!(
                        "Add '{}' before the output is not fed by a MatMul, so it is not a linear head",
                        head.name
                    )));
                };
                (producers[mm_in.as_str()], Some(b_in.clone()))
            } else {
                (head, None)
            };
            let weight_name = matmul.input.get(1).cloned().unwrap_or_default();
            let (w, dims) = init(&weight_name).ok_or_else(|| {
                ModelError::Unsupported(format!("MatMul '{}' takes its weights '{weight_name}' from a computed tensor, not an initializer", matmul.name))
            })?;
            let weight = weights_to_classes_by_embedding(
                &w,
                &dims,
                WeightLayout::EmbeddingByClasses,
                &weight_name,
            )?;
            let bias = match &bias_name {
                Some(name) => bias_vector(init(name), name, weight.nrows())?,
                None => Array1::zeros(weight.nrows()),
            };
            if bias_name.is_some() {
                path.insert(0, "Add".to_string());
            }
            path.insert(0, format!("MatMul '{}'", matmul.name));
            HeadSpec {
                embedding: matmul.input[0].clone(),
                output,
                kind,
                weight_name,
                weight_layout: WeightLayout::EmbeddingByClasses,
                bias_name,
                alpha: 1.0,
                beta: 1.0,
                path,
                weight,
                bias,
            }
        }
    };
    if graph.input.iter().any(|i| i.name == spec.embedding) {
        return Err(ModelError::Unsupported(format!(
            "the head reads the graph input '{}' directly: there is no backbone to freeze",
            spec.embedding
        )));
    }
    Ok(spec)
}

fn pick_output(graph: &GraphProto, wanted: Option<&str>) -> Result<String, ModelError> {
    let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    if let Some(w) = wanted {
        return if names.contains(&w) {
            Ok(w.to_string())
        } else {
            Err(ModelError::Unsupported(format!(
                "configured output '{w}' is not a graph output; outputs are {names:?}"
            )))
        };
    }
    graph
        .output
        .iter()
        .find(|o| elem_type(o).is_none_or(|t| t == 1 || t == 10 || t == 11))
        .map(|o| o.name.clone())
        .ok_or_else(|| ModelError::Unsupported(format!("no floating-point output among {names:?}")))
}

fn elem_type(v: &tract_onnx::pb::ValueInfoProto) -> Option<i32> {
    use tract_onnx::pb::type_proto::Value;
    let Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    Some(t.elem_type)
}

fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn float_attr(node: &NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// The values and dims of an initializer or of a Constant node's output.
pub(crate) fn constant(
    graph: &GraphProto,
    name: &str,
    onnx: &tract_onnx::Onnx,
) -> Option<(Vec<f32>, Vec<usize>)> {
    let proto: Option<&TensorProto> =
        graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .or_else(|| {
                graph
                    .node
                    .iter()
                    .find(|n| {
                        n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name)
                    })
                    .and_then(|n| n.attribute.iter().find(|a| a.name == "value"))
                    .and_then(|a| a.t.as_ref())
            });
    let tensor = tract_onnx::tensor::load_tensor(&*onnx.provider, proto?, None).ok()?;
    let tensor = tensor.cast_to::<f32>().ok()?;
    let dims = tensor.shape().to_vec();
    let values = tensor
        .to_plain_array_view::<f32>()
        .ok()?
        .iter()
        .copied()
        .collect();
    Some((values, dims))
}

fn weights_to_classes_by_embedding(
    w: &[f32],
    dims: &[usize],
    layout: WeightLayout,
    name: &str,
) -> Result<Array2<f32>, ModelError> {
    if dims.len() != 2 {
        return Err(ModelError::Unsupported(format!(
            "head weights '{name}' have shape {dims:?}, expected a matrix"
        )));
    }
    let m = Array2::from_shape_vec((dims[0], dims[1]), w.to_vec())
        .map_err(|e| ModelError::Unsupported(format!("head weights '{name}': {e}")))?;
    Ok(match layout {
        WeightLayout::ClassesByEmbedding => m,
        WeightLayout::EmbeddingByClasses => m.t().to_owned(),
    })
}

fn bias_vector(
    found: Option<(Vec<f32>, Vec<usize>)>,
    name: &str,
    classes: usize,
) -> Result<Array1<f32>, ModelError> {
    let (values, dims) = found.ok_or_else(|| {
        ModelError::Unsupported(format!(
            "head bias '{name}' is a computed tensor, not an initializer"
        ))
    })?;
    match values.len() {
        n if n == classes => Ok(Array1::from(values)),
        1 => Ok(Array1::from_elem(classes, values[0])),
        _ => Err(ModelError::Unsupported(format!(
            "head bias '{name}' has shape {dims:?}, which does not broadcast to {classes} classes"
        ))),
    }
}
