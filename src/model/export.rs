//! Writing the adapted trainable layers back into the original ONNX graph.
//!
//! Only the lifted layers' initializers change: each layer's weights are written in the layout
//! the file used (transposed for `transB = 0` / MatMul) and divided by Gemm's alpha and beta,
//! so the graph computes exactly the adapted network's outputs. Everything else, including
//! opsets and metadata, is kept; a few `edgemt.*` metadata entries record where the weights
//! came from.
//!
//! An adopted sensor mounting is folded in front of the graph by [`fold_input_transform`],
//! so the exported file takes the device's raw data. It arrives here as an
//! [`InputTransform`], plain numbers, so this module needs nothing from calibration.
//! [`write_adapted`] is the one export both `edgemt export` and the daemon's `export`
//! command use: it builds the file and puts it in place atomically. A failed export leaves
//! nothing behind (its temporary file removes itself), and the temporaries of an export that
//! was killed mid-write are removed by the next export to the same file.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{ArrayView1, ArrayView2};
use prost::Message;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, GraphProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

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

/// Returns `proto` taking RAW device data: a `MatMul` with the constant `channel_matrix`
/// (`M`, C×C over the channel axis, e.g. `Mounting::channel_matrix`) runs first, so the
/// original graph sees `x'_t = M · x_t` at every time step.
///
/// The new raw input keeps the original input's name (users' code does not change); the
/// tensor the original graph reads is renamed. `input_shape` is the per-sample shape, which
/// must be rank 2; `channel_axis` is its channel axis: for channels-last samples
/// (`[N, T, C]`) the node computes `x · Mᵀ`, for channels-first (`[N, C, T]`) `M · x`, which
/// ONNX MatMul broadcasts over the batch. Record which mounting this was with an
/// `edgemt.mounting` metadata entry (e.g. through [`export_trainable`]'s `metadata`).
pub fn fold_input_transform(
    proto: &ModelProto,
    channel_matrix: ArrayView2<f32>,
    channel_axis: usize,
    input_shape: &[usize],
) -> Result<ModelProto, ModelError> {
    if input_shape.len() != 2 {
        return Err(ModelError::Unsupported(format!(
            "an input transform folds only into samples of rank 2 (time and channels); this input has shape {input_shape:?}"
        )));
    }
    if channel_axis > 1 {
        return Err(ModelError::Unsupported(format!(
            "channel axis {channel_axis} is not an axis of a rank-2 sample"
        )));
    }
    let channels = input_shape[channel_axis];
    if channel_matrix.dim() != (channels, channels) {
        return Err(ModelError::Unsupported(format!(
            "the channel matrix is {:?} but the input has {channels} channels on axis {channel_axis}",
            channel_matrix.dim()
        )));
    }
    let mut proto = proto.clone();
    let ir_version = proto.ir_version;
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::Unsupported("the file holds no graph".into()))?;
    let (input, declared) = super::sample_input(graph)?;
    if declared != input_shape {
        return Err(ModelError::Unsupported(format!(
            "input '{input}' has samples of shape {declared:?}, not {input_shape:?}"
        )));
    }

    let mut taken = HashSet::new();
    collect_names(graph, &mut taken);
    let mounted = unique(&format!("{input}.mounted"), &taken);
    taken.insert(mounted.clone());
    let matrix = unique("edgemt.mounting_matrix", &taken);

    // Every reader of the input now reads the transformed tensor.
    rename_uses(graph, &input, &mounted);
    for v in graph.value_info.iter_mut().filter(|v| v.name == input) {
        v.name = mounted.clone();
    }

    // Channels-last multiplies from the right by Mᵀ, channels-first from the left by M.
    let (values, inputs): (Vec<f32>, _) = if channel_axis == 1 {
        (
            channel_matrix.t().iter().copied().collect(),
            vec![input.clone(), matrix.clone()],
        )
    } else {
        (
            channel_matrix.iter().copied().collect(),
            vec![matrix.clone(), input.clone()],
        )
    };
    graph.initializer.push(TensorProto {
        name: matrix.clone(),
        dims: vec![channels as i64; 2],
        data_type: 1, // FLOAT
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    });
    if ir_version < 4 {
        // Before IR 4 every initializer must also be listed as a graph input.
        graph.input.push(ValueInfoProto {
            name: matrix.clone(),
            r#type: Some(float_type(&[channels, channels])),
            ..Default::default()
        });
    }
    graph.node.insert(
        0,
        NodeProto {
            name: unique("edgemt.mounting", &taken),
            op_type: "MatMul".into(),
            input: inputs,
            output: vec![mounted],
            ..Default::default()
        },
    );
    Ok(proto)
}

fn float_type(dims: &[usize]) -> TypeProto {
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: 1,
            shape: Some(TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| Dimension {
                        value: Some(dimension::Value::DimValue(d as i64)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

/// Every tensor and node name in the graph and its subgraphs.
fn collect_names(graph: &GraphProto, names: &mut HashSet<String>) {
    let values = graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info);
    names.extend(values.map(|v| v.name.clone()));
    names.extend(graph.initializer.iter().map(|t| t.name.clone()));
    for node in &graph.node {
        names.insert(node.name.clone());
        names.extend(node.input.iter().chain(&node.output).cloned());
        for a in &node.attribute {
            for g in a.g.iter().chain(&a.graphs) {
                collect_names(g, names);
            }
        }
    }
}

/// `base`, or `base_1`, `base_2`, ... if that is already a name in the graph.
fn unique(base: &str, taken: &HashSet<String>) -> String {
    (0..)
        .map(|i| {
            if i == 0 {
                base.to_string()
            } else {
                format!("{base}_{i}")
            }
        })
        .find(|n| !taken.contains(n))
        .expect("some suffix is free")
}

/// Points every node input named `from` at `to`, also inside subgraphs (which may read
/// outer-scope tensors).
fn rename_uses(graph: &mut GraphProto, from: &str, to: &str) {
    for node in &mut graph.node {
        for i in node.input.iter_mut().filter(|i| *i == from) {
            *i = to.to_string();
        }
        for a in &mut node.attribute {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_uses(g, from, to);
            }
        }
    }
}

/// A map over the input's channel axis to fold in front of the graph (an adopted sensor
/// mounting): `x'_t = M · x_t` for every time step t.
#[derive(Debug, Clone, Copy)]
pub struct InputTransform<'a> {
    /// Recorded as `edgemt.mounting`.
    pub name: &'a str,
    /// Axis of the per-sample input shape that holds the channels.
    pub channel_axis: usize,
    /// `M`, row by row.
    pub channel_matrix: &'a [Vec<f32>],
}

/// The adapted model as device users need it: every adapted layer written back and, when a
/// mounting was adopted, its channel matrix folded in front of the graph (`edgemt.mounting`
/// names it), so the file takes raw device data.
pub fn export_adapted(
    proto: &ModelProto,
    spec: &TrainableSpec,
    adapted: &Mlp,
    mounting: Option<&InputTransform<'_>>,
    input_shape: &[usize],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, ModelError> {
    let Some(m) = mounting else {
        return export_trainable(proto, spec, adapted, metadata);
    };
    let c = m.channel_matrix.len();
    let flat: Vec<f32> = m.channel_matrix.iter().flatten().copied().collect();
    let matrix = ndarray::Array2::from_shape_vec((c, flat.len() / c.max(1)), flat)
        .map_err(|e| ModelError::Unsupported(format!("mounting matrix: {e}")))?;
    let folded = fold_input_transform(proto, matrix.view(), m.channel_axis, input_shape)?;
    let mut meta: Vec<(&str, String)> = metadata.to_vec();
    meta.push(("edgemt.mounting", m.name.to_string()));
    export_trainable(&folded, spec, adapted, &meta)
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("building the adapted model")]
    Model(#[from] ModelError),
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an export writes back into the original graph, and where it came from.
#[derive(Debug, Clone, Copy)]
pub struct Adapted<'a> {
    /// The adapted layers (the teacher).
    pub head: &'a Mlp,
    /// The adopted mounting, folded in front of the graph.
    pub mounting: Option<InputTransform<'a>>,
    /// The original model's fingerprint (`edgemt.adapted_from`).
    pub from_fingerprint: u64,
    /// `edgemt.teacher_version`.
    pub teacher_version: u64,
}

/// Writes the adapted model ([`export_adapted`], with the `edgemt.adapted_from` and
/// `edgemt.teacher_version` metadata) to `path` the way durable state is written: a
/// temporary file in the same directory, fsynced, renamed over `path`, then the directory
/// fsynced. A reader of `path` sees the old file or the new one, never half of one, and
/// the temporary file is removed when any step fails.
pub fn write_adapted(
    path: &Path,
    proto: &ModelProto,
    spec: &TrainableSpec,
    input_shape: &[usize],
    adapted: &Adapted<'_>,
) -> Result<(), ExportError> {
    let metadata = [
        (
            "edgemt.adapted_from",
            format!("{:016x}", adapted.from_fingerprint),
        ),
        (
            "edgemt.teacher_version",
            adapted.teacher_version.to_string(),
        ),
    ];
    let bytes = export_adapted(
        proto,
        spec,
        adapted.head,
        adapted.mounting.as_ref(),
        input_shape,
        &metadata,
    )?;
    let io = |source| ExportError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    remove_stale_temporaries(dir, &prefix);
    // A NamedTempFile deletes itself when dropped, so every early return below removes it.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(&bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Removes `{prefix}*.tmp` files in `dir`: what an export killed mid-write (a power cut, a
/// kill -9) left, which no drop will ever remove. Exports to one file are not run
/// concurrently (the daemon runs one at a time), so none of these is in use.
fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
