//! The ONNX classifier, split into a frozen backbone (tract) and a trainable part: its last
//! `N` learned layers.
//!
//! `Classifier::load` reads the file once: it finds the trainable layers in the raw protobuf
//! ([`head::find_trainable`]), then asks tract for everything before them, optimized once with
//! a symbolic batch dimension so any batch size runs. The layers' weights come out as an
//! [`nn::Mlp`](crate::nn::Mlp) for `learn/` to train. Nothing here knows about training or I/O.

pub mod backbone;
pub mod export;
pub mod head;

use std::path::{Path, PathBuf};

use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;

pub use backbone::Backbone;
pub use head::{LayerSpec, LinearOp, OutputKind, TrainableSpec, WeightLayout};

/// Why a model could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model: {reason}")]
    NotOnnx { path: PathBuf, reason: String },
    #[error("model does not fit edgemt: {0}")]
    Unsupported(String),
    #[error("tract failed on the backbone: {0}")]
    Tract(String),
    #[error(
        "input batch holds {got} values, expected {expected} ({batch} samples of shape {shape:?})"
    )]
    InputSize {
        got: usize,
        expected: usize,
        batch: usize,
        shape: Vec<usize>,
    },
}

/// What a file that fails to decode as ONNX looks like, in words.
fn not_onnx_reason(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(512)];
    let text = head
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    if text {
        "it is a text file, not a binary ONNX (protobuf) file".into()
    } else {
        "its bytes do not decode as an ONNX (protobuf) model".into()
    }
}

fn tract_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tract(format!("{e:#}"))
}

/// What to lift out of the graph, from `[model]` in the config.
#[derive(Debug, Clone)]
pub struct HeadSelection {
    /// Name of the classifier output to use.
    pub output: Option<String>,
    /// Expected name of the embedding tensor; loading fails if the first trainable layer
    /// reads another one.
    pub embedding: Option<String>,
    /// How many learned layers, counted back from the output, become trainable (at least 1).
    pub trainable_layers: usize,
}

impl Default for HeadSelection {
    fn default() -> Self {
        HeadSelection {
            output: None,
            embedding: None,
            trainable_layers: 1,
        }
    }
}

/// A loaded classifier: backbone, pretrained trainable layers and what describes them.
pub struct Classifier {
    pub path: PathBuf,
    pub input_name: String,
    /// Shape of one sample, without the batch dimension.
    pub input_shape: Vec<usize>,
    /// The lifted layers; the backbone ends at `trainable.embedding`.
    pub trainable: TrainableSpec,
    /// Width of the embedding: the first trainable layer's input.
    pub embedding_dim: usize,
    pub class_names: Vec<String>,
    /// FNV-1a hash of the file's bytes, to tell models apart in saved state and reports.
    pub fingerprint: u64,
    pub backbone: Backbone,
    /// Parameter count of the whole graph's initializers (for `inspect`).
    pub parameters: usize,
    proto: ModelProto,
}

impl Classifier {
    pub fn load(path: &Path, selection: &HeadSelection) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| {
                // The decoder's wire-type complaint means nothing to a user; keep it for
                // debugging and say what the file looks like instead.
                tracing::debug!("decoding {} as ONNX: {e:#}", path.display());
                ModelError::NotOnnx {
                    path: path.to_owned(),
                    reason: not_onnx_reason(&bytes),
                }
            })?;
        if proto.graph.is_none() {
            return Err(ModelError::NotOnnx {
                path: path.to_owned(),
                reason: if bytes.is_empty() {
                    "the file is empty".into()
                } else {
                    "it holds no ONNX graph".into()
                },
            });
        }
        let trainable = head::find_trainable(
            &proto,
            selection.output.as_deref(),
            selection.trainable_layers,
            &onnx,
        )?;
        if let Some(want) = &selection.embedding {
            if want != &trainable.embedding {
                return Err(ModelError::Unsupported(format!(
                    "configured embedding '{want}' but the {} trainable layer(s) found before '{}' read '{}'",
                    trainable.layers.len(),
                    trainable.output,
                    trainable.embedding
                )));
            }
        }
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Unsupported("the file holds no graph".into()))?;
        let (input_name, input_shape) = sample_input(graph)?;
        let backbone = Backbone::build(&onnx, &proto, path, &input_shape, &trainable.embedding)?;
        if backbone.embedding_dim() != trainable.input_dim() {
            return Err(ModelError::Unsupported(format!(
                "embedding '{}' has {} features but {} expects {}",
                trainable.embedding,
                backbone.embedding_dim(),
                trainable.layers[0].label(),
                trainable.input_dim()
            )));
        }
        let classes = trainable.classes();
        let class_names = class_names(&proto, classes);
        let parameters = graph
            .initializer
            .iter()
            .map(|t| t.dims.iter().product::<i64>().max(0) as usize)
            .sum();
        Ok(Classifier {
            path: path.to_owned(),
            input_name,
            input_shape,
            embedding_dim: backbone.embedding_dim(),
            trainable,
            class_names,
            fingerprint: fnv1a(&bytes),
            backbone,
            parameters,
            proto,
        })
    }

    /// The pretrained trainable layers as an [`Mlp`](crate::nn::Mlp), first layer first.
    pub fn pretrained(&self) -> crate::nn::Mlp {
        crate::nn::Mlp::new(
            self.trainable
                .layers
                .iter()
                .map(|l| (l.weight.clone(), l.bias.clone()))
                .collect(),
        )
        .expect("layer shapes were checked to chain when the model was loaded")
    }

    pub fn classes(&self) -> usize {
        self.trainable.classes()
    }

    /// Values in one sample (product of the input shape).
    pub fn sample_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// The raw protobuf, for export.
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// Runs the *whole* original graph on a batch and returns its classifier output
    /// `[batch, classes]`. Slow path, for checks and tests, not for serving.
    pub fn run_full(
        &self,
        inputs: &[f32],
        batch: usize,
    ) -> Result<ndarray::Array2<f32>, ModelError> {
        let mut shape = vec![batch];
        shape.extend(&self.input_shape);
        let model = tract_onnx::onnx()
            .model_for_proto_model(&self.proto)
            .and_then(|m| m.with_outputs_by_name([self.trainable.output.as_str()]))
            .and_then(|m| m.with_input_fact(0, f32::fact(&shape).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(tract_err)?;
        let input = Tensor::from_shape(&shape, inputs).map_err(tract_err)?;
        let out = model.run(tvec!(input.into())).map_err(tract_err)?;
        let view = out[0].to_plain_array_view::<f32>().map_err(tract_err)?;
        let classes = self.classes();
        view.to_shape((batch, classes))
            .map(|v| v.to_owned())
            .map_err(tract_err)
    }
}

/// The first real graph input (old IR versions also list initializers as inputs) and its
/// per-sample shape; every dimension but the batch must be fixed.
fn sample_input(graph: &tract_onnx::pb::GraphProto) -> Result<(String, Vec<usize>), ModelError> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
    use tract_onnx::pb::type_proto::Value;
    let input = graph
        .input
        .iter()
        .find(|i| !graph.initializer.iter().any(|t| t.name == i.name))
        .ok_or_else(|| ModelError::Unsupported("the graph has no input".into()))?;
    let Some(Value::TensorType(t)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(ModelError::Unsupported(format!(
            "input '{}' is not a tensor",
            input.name
        )));
    };
    if t.elem_type != 1 {
        return Err(ModelError::Unsupported(format!(
            "input '{}' has element type {}, expected float32",
            input.name, t.elem_type
        )));
    }
    let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    if dims.len() < 2 {
        return Err(ModelError::Unsupported(format!(
            "input '{}' has rank {}, expected a batch dimension and at least one feature dimension",
            input.name,
            dims.len()
        )));
    }
    let shape = dims[1..]
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) if v > 0 => Ok(v as usize),
            _ => Err(ModelError::Unsupported(format!(
                "input '{}' has a non-fixed dimension besides the batch: {:?}",
                input.name, d.value
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((input.name.clone(), shape))
}

/// Class names from the `edgemt.class_names` metadata (a JSON list), else `class_<i>`.
fn class_names(proto: &ModelProto, classes: usize) -> Vec<String> {
    proto
        .metadata_props
        .iter()
        .find(|p| p.key == "edgemt.class_names")
        .and_then(|p| serde_json::from_str::<Vec<String>>(&p.value).ok())
        .filter(|names| names.len() == classes)
        .unwrap_or_else(|| (0..classes).map(|i| format!("class_{i}")).collect())
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
