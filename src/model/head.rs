//! Finding the classifier's trainable layers in an ONNX graph.
//!
//! edgemt trains the last `N` learned layers, so it has to know exactly where they are: which
//! tensor feeds the first of them (the embedding, where the frozen backbone ends), which
//! initializers hold each layer's weights and in what layout, and whether a Softmax follows
//! the last one. This module reads the raw ONNX protobuf (not tract's graph, which fuses and
//! renames nodes). It walks back from the classifier output through output-only ops (Softmax,
//! Identity, ...) to a Gemm, a MatMul + Add or a bare MatMul, then, for `N > 1`, over `Relu` to
//! the linear layer before it, `N` layers in all. The layouts it records are what export needs
//! to write adapted weights back.

use std::collections::HashMap;
use std::fmt;

use ndarray::{Array1, Array2};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};

use super::ModelError;

/// Whether the graph's output is raw class scores or a probability distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// The last layer's output is the graph output (logits).
    Logits,
    /// A Softmax over the class axis follows the last layer.
    Probabilities,
}

/// How a layer's weight initializer is laid out in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// `[out, in]` (Gemm with transB = 1, as PyTorch exports).
    OutByIn,
    /// `[in, out]` (Gemm with transB = 0, or MatMul).
    InByOut,
}

/// Which ONNX ops make up one linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearOp {
    Gemm,
    /// `Add(MatMul(x, W), b)`, the bias on either side of the Add.
    MatMulAdd,
    /// A MatMul without bias.
    MatMul,
}

impl fmt::Display for LinearOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinearOp::Gemm => "Gemm",
            LinearOp::MatMulAdd => "MatMul + Add",
            LinearOp::MatMul => "MatMul",
        })
    }
}

/// One lifted linear layer: where it sits in the file and its effective parameters.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Name of the Gemm or MatMul node.
    pub node: String,
    pub op: LinearOp,
    /// Tensor the layer reads.
    pub input: String,
    /// Tensor the layer produces (the Gemm's or the Add's output).
    pub output: String,
    /// Initializer (or Constant) holding the weights.
    pub weight_name: String,
    pub weight_layout: WeightLayout,
    /// Initializer holding the bias, if the layer has one.
    pub bias_name: Option<String>,
    /// Gemm's alpha and beta (1 for MatMul), folded into `weight` and `bias` below.
    pub alpha: f32,
    pub beta: f32,
    /// Effective weights, always `[out, in]`.
    pub weight: Array2<f32>,
    /// Effective bias, `[out]` (zeros when the layer has none).
    pub bias: Array1<f32>,
}

impl LayerSpec {
    /// E.g. `Gemm 'fc2' (transB=1)` or `MatMul 'MatMul1' + Add`.
    pub fn describe(&self) -> String {
        match self.op {
            LinearOp::Gemm => format!(
                "Gemm '{}' (transB={})",
                self.node,
                (self.weight_layout == WeightLayout::OutByIn) as i32
            ),
            LinearOp::MatMulAdd => format!("MatMul '{}' + Add", self.node),
            LinearOp::MatMul => format!("MatMul '{}'", self.node),
        }
    }

    /// E.g. `Gemm 'fc2'` or `MatMul 'MatMul1'`, for errors.
    pub fn label(&self) -> String {
        let op = match self.op {
            LinearOp::Gemm => "Gemm",
            LinearOp::MatMulAdd | LinearOp::MatMul => "MatMul",
        };
        format!("{op} '{}'", self.node)
    }

    /// Parameters in this layer (weights and bias as trained, bias counted even if absent).
    pub fn parameters(&self) -> usize {
        self.weight.len() + self.bias.len()
    }
}

/// Everything edgemt knows about the trainable part it found.
#[derive(Debug, Clone)]
pub struct TrainableSpec {
    /// Tensor feeding the first lifted layer: where the backbone now ends.
    pub embedding: String,
    /// The classifier output the last layer drives.
    pub output: String,
    pub kind: OutputKind,
    /// The lifted layers, first layer first; `Relu` sits between consecutive ones.
    pub layers: Vec<LayerSpec>,
    /// Ops from the first lifted layer to the output, e.g.
    /// `["Gemm 'fc2' (transB=1)", "Relu", "Gemm 'head' (transB=1)", "Softmax"]`.
    pub path: Vec<String>,
}

impl TrainableSpec {
    /// The layer that produces the class scores.
    pub fn last(&self) -> &LayerSpec {
        self.layers
            .last()
            .expect("a trainable part has at least one layer")
    }

    pub fn classes(&self) -> usize {
        self.last().weight.nrows()
    }

    /// Width of the embedding (the first layer's input).
    pub fn input_dim(&self) -> usize {
        self.layers[0].weight.ncols()
    }

    /// Parameters in all lifted layers.
    pub fn parameters(&self) -> usize {
        self.layers.iter().map(LayerSpec::parameters).sum()
    }
}

/// Ops that may sit between the last layer and the classifier output without changing which
/// class wins, so the layer's pre-activation values can stand for the model's scores.
const PASS_THROUGH: &[&str] = &["Identity", "Dropout", "Flatten", "Squeeze", "Reshape"];

/// Ops that can produce a linear layer's output.
const LINEAR: &[&str] = &["Gemm", "Add", "MatMul"];

/// The graph plus the indexes the walk needs.
struct Walk<'a> {
    graph: &'a GraphProto,
    onnx: &'a tract_onnx::Onnx,
    producers: HashMap<&'a str, &'a NodeProto>,
    /// How many node inputs read each tensor.
    readers: HashMap<&'a str, usize>,
}

/// Finds the last `layers` learned layers of `proto`.
///
/// `output` selects the classifier output by name; without it the first graph output with a
/// floating-point element type is used (skl2onnx graphs also output an int64 label first).
pub fn find_trainable(
    proto: &ModelProto,
    output: Option<&str>,
    layers: usize,
    onnx: &tract_onnx::Onnx,
) -> Result<TrainableSpec, ModelError> {
    if layers == 0 {
        return Err(ModelError::Unsupported(
            "trainable_layers = 0: at least one layer must be trainable".into(),
        ));
    }
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Unsupported("the file holds no graph".into()))?;
    let output = pick_output(graph, output)?;
    let walk = Walk {
        graph,
        onnx,
        producers: graph
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
            .collect(),
        readers: graph
            .node
            .iter()
            .flat_map(|n| n.input.iter())
            .fold(HashMap::new(), |mut m, i| {
                *m.entry(i.as_str()).or_insert(0) += 1;
                m
            }),
    };

    let mut tail = Vec::new();
    let mut kind = OutputKind::Logits;
    let mut tensor = output.as_str();
    // Walk back over output-only ops to the last layer (each node at most once, so a
    // malformed graph with a cycle ends in an error, not an endless loop).
    let last = loop {
        if tail.len() > graph.node.len() {
            return Err(ModelError::Unsupported(format!(
                "the nodes before output '{output}' form a cycle"
            )));
        }
        let node = walk.producers.get(tensor).ok_or_else(|| {
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
                tail.push("Softmax".to_string());
                tensor = input(node, 0)?;
            }
            op if PASS_THROUGH.contains(&op) => {
                tail.push(op.to_string());
                tensor = input(node, 0)?;
            }
            op if LINEAR.contains(&op) => break walk.layer(node)?,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "expected a linear layer (Gemm, or MatMul + Add, optionally followed by Softmax) before output '{output}', found {other} '{}'",
                    node.name
                )))
            }
        }
    };
    tail.reverse();

    // Then over Relu to the layer before, until `layers` are lifted (collected last first).
    let mut lifted = vec![last];
    while lifted.len() < layers {
        let above = lifted.last().expect("starts with one layer");
        let relu = walk.producer(layers, &above.input, &above.label(), "Relu", |op| {
            op == "Relu"
        })?;
        walk.read_only_by(layers, &above.input, &above.label())?;
        let relu_label = label(relu);
        let node = walk.producer(
            layers,
            input(relu, 0)?,
            &relu_label,
            "a linear layer (Gemm, MatMul + Add or MatMul)",
            |op| LINEAR.contains(&op),
        )?;
        let layer = walk.layer(node)?;
        walk.read_only_by(layers, &layer.output, &relu_label)?;
        if layer.weight.nrows() != above.weight.ncols() {
            return Err(ModelError::Unsupported(format!(
                "trainable_layers = {layers}: {} gives {} features but {} takes {}",
                layer.label(),
                layer.weight.nrows(),
                above.label(),
                above.weight.ncols()
            )));
        }
        lifted.push(layer);
    }
    lifted.reverse();

    let embedding = lifted[0].input.clone();
    if graph.input.iter().any(|i| i.name == embedding) {
        return Err(ModelError::Unsupported(format!(
            "trainable_layers = {layers}: {} reads the graph input '{embedding}' directly, so there is no backbone to freeze",
            lifted[0].label()
        )));
    }
    let mut path: Vec<String> = lifted
        .iter()
        .flat_map(|l| [l.describe(), "Relu".to_string()])
        .collect();
    path.pop();
    path.extend(tail);
    Ok(TrainableSpec {
        embedding,
        output,
        kind,
        layers: lifted,
        path,
    })
}

impl<'a> Walk<'a> {
    /// The node producing `tensor`, which must be `wanted` (checked by `fits` on its op);
    /// `below` names the node reading `tensor`, for the error.
    fn producer(
        &self,
        layers: usize,
        tensor: &str,
        below: &str,
        wanted: &str,
        fits: impl Fn(&str) -> bool,
    ) -> Result<&'a NodeProto, ModelError> {
        let found = match self.producers.get(tensor) {
            Some(node) if fits(&node.op_type) => return Ok(node),
            Some(node) => label(node),
            None if self.graph.input.iter().any(|i| i.name == tensor) => {
                format!("the graph input '{tensor}'")
            }
            None => format!("the constant '{tensor}'"),
        };
        Err(ModelError::Unsupported(format!(
            "trainable_layers = {layers}: expected {wanted} before {below}, found {found}"
        )))
    }

    /// Refuses a tensor inside the trainable part that other nodes read too: adapting the
    /// layers would silently change what those nodes compute.
    fn read_only_by(&self, layers: usize, tensor: &str, reader: &str) -> Result<(), ModelError> {
        match self.readers.get(tensor).copied().unwrap_or(0) {
            1 => Ok(()),
            n => Err(ModelError::Unsupported(format!(
                "trainable_layers = {layers}: tensor '{tensor}' feeds {n} nodes, not only {reader}, so the layers before it cannot be trained apart from the rest of the graph"
            ))),
        }
    }

    fn constant(&self, name: &str) -> Option<(Vec<f32>, Vec<usize>)> {
        constant(self.graph, name, self.onnx)
    }

    /// Reads one linear layer whose output `node` produces: a Gemm, `Add(MatMul, bias)` or a
    /// bare MatMul.
    fn layer(&self, node: &'a NodeProto) -> Result<LayerSpec, ModelError> {
        let output = node
            .output
            .first()
            .cloned()
            .ok_or_else(|| ModelError::Unsupported(format!("{} has no output", label(node))))?;
        let (matmul, op, bias_name, trans_b, alpha, beta) = match node.op_type.as_str() {
            "Gemm" => {
                if int_attr(node, "transA").unwrap_or(0) != 0 {
                    return Err(ModelError::Unsupported(format!(
                        "Gemm '{}' has transA = 1",
                        node.name
                    )));
                }
                (
                    node,
                    LinearOp::Gemm,
                    optional_input(node, 2),
                    int_attr(node, "transB").unwrap_or(0) != 0,
                    float_attr(node, "alpha").unwrap_or(1.0),
                    float_attr(node, "beta").unwrap_or(1.0),
                )
            }
            "Add" => {
                let is_matmul =
                    |t: &str| self.producers.get(t).is_some_and(|n| n.op_type == "MatMul");
                let (a, b) = (input(node, 0)?, input(node, 1)?);
                let (mm, bias) = if is_matmul(a) {
                    (a, b)
                } else if is_matmul(b) {
                    (b, a)
                } else {
                    return Err(ModelError::Unsupported(format!(
                        "Add '{}' is not fed by a MatMul, so it is not a linear layer",
                        node.name
                    )));
                };
                if self.readers.get(mm).copied().unwrap_or(0) != 1 {
                    return Err(ModelError::Unsupported(format!(
                        "MatMul output '{mm}' feeds other nodes besides Add '{}'",
                        node.name
                    )));
                }
                let matmul = self.producers[mm];
                (
                    matmul,
                    LinearOp::MatMulAdd,
                    Some(bias.to_string()),
                    false,
                    1.0,
                    1.0,
                )
            }
            _ => (node, LinearOp::MatMul, None, false, 1.0, 1.0),
        };
        let layer_input = input(matmul, 0)?.to_string();
        let weight_name = input(matmul, 1)?.to_string();
        let (w, dims) = self.constant(&weight_name).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "{} takes its weights '{weight_name}' from a computed tensor, not an initializer",
                label(matmul)
            ))
        })?;
        let layout = if trans_b {
            WeightLayout::OutByIn
        } else {
            WeightLayout::InByOut
        };
        let weight = weights_out_by_in(&w, &dims, layout, &weight_name)? * alpha;
        let bias = match &bias_name {
            Some(name) => bias_vector(self.constant(name), name, weight.nrows())? * beta,
            None => Array1::zeros(weight.nrows()),
        };
        Ok(LayerSpec {
            node: matmul.name.clone(),
            op,
            input: layer_input,
            output,
            weight_name,
            weight_layout: layout,
            bias_name,
            alpha,
            beta,
            weight,
            bias,
        })
    }
}

/// `op 'name'`, for errors.
fn label(node: &NodeProto) -> String {
    format!("{} '{}'", node.op_type, node.name)
}

/// The `i`-th input of `node`, which the op requires: a malformed node is an error naming it.
fn input(node: &NodeProto, i: usize) -> Result<&str, ModelError> {
    match node.input.get(i) {
        Some(name) if !name.is_empty() => Ok(name),
        _ => Err(ModelError::Unsupported(format!(
            "{} has {} input(s), expected at least {}",
            label(node),
            node.input.iter().filter(|s| !s.is_empty()).count(),
            i + 1
        ))),
    }
}

/// The `i`-th input of `node` if present (ONNX marks a skipped optional input with "").
fn optional_input(node: &NodeProto, i: usize) -> Option<String> {
    node.input.get(i).filter(|s| !s.is_empty()).cloned()
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

fn weights_out_by_in(
    w: &[f32],
    dims: &[usize],
    layout: WeightLayout,
    name: &str,
) -> Result<Array2<f32>, ModelError> {
    if dims.len() != 2 {
        return Err(ModelError::Unsupported(format!(
            "weights '{name}' have shape {dims:?}, expected a matrix"
        )));
    }
    let m = Array2::from_shape_vec((dims[0], dims[1]), w.to_vec())
        .map_err(|e| ModelError::Unsupported(format!("weights '{name}': {e}")))?;
    Ok(match layout {
        WeightLayout::OutByIn => m,
        WeightLayout::InByOut => m.t().to_owned(),
    })
}

fn bias_vector(
    found: Option<(Vec<f32>, Vec<usize>)>,
    name: &str,
    outputs: usize,
) -> Result<Array1<f32>, ModelError> {
    let (values, dims) = found.ok_or_else(|| {
        ModelError::Unsupported(format!(
            "bias '{name}' is a computed tensor, not an initializer"
        ))
    })?;
    match values.len() {
        n if n == outputs => Ok(Array1::from(values)),
        1 => Ok(Array1::from_elem(outputs, values[0])),
        _ => Err(ModelError::Unsupported(format!(
            "bias '{name}' has shape {dims:?}, which does not broadcast to {outputs} outputs"
        ))),
    }
}
