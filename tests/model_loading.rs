//! Loading ONNX classifiers built by different tools, and the head/backbone split.

use edgemt::model::{Classifier, HeadSelection, OutputKind, WeightLayout};
use edgemt::nn::softmax_rows;
use ndarray::Array2;
use tract_onnx::pb;

use crate::util::{self, references};

fn load(rel: &str) -> Classifier {
    Classifier::load(&util::path(rel), &HeadSelection::default()).expect("model loads")
}

/// Backbone + extracted head, the way edgemt serves predictions.
fn split_outputs(c: &mut Classifier, inputs: &[f32], batch: usize) -> Array2<f32> {
    let emb = c.backbone.embed(inputs, batch).expect("backbone runs");
    let mut out = c.pretrained().logits(emb.view());
    if c.head.kind == OutputKind::Probabilities {
        softmax_rows(&mut out);
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn backbone_plus_extracted_head_reproduce_onnxruntime_outputs_for_every_reference_model() {
    let refs = references();
    assert_eq!(
        refs.len(),
        3,
        "reference.json covers three differently built models"
    );
    for r in refs {
        let mut c = load(&r.file);
        assert_eq!(
            c.input_shape,
            r.input_shape[1..],
            "{}: per-sample input shape",
            r.file
        );
        assert_eq!(
            c.head.output, r.output_name,
            "{}: classifier output",
            r.file
        );
        let batch = r.inputs.len();
        let flat: Vec<f32> = r.inputs.concat();
        let ours = split_outputs(&mut c, &flat, batch);
        let expected: Vec<f32> = r.outputs.concat();
        let diff = max_abs_diff(ours.as_slice().unwrap(), &expected);
        assert!(
            diff < 1e-5,
            "{}: split model differs from onnxruntime by {diff}",
            r.file
        );

        // The whole graph in tract agrees too, so the split loses nothing.
        let full = c.run_full(&flat, batch).expect("full graph runs");
        let diff = max_abs_diff(full.as_slice().unwrap(), ours.as_slice().unwrap());
        assert!(
            diff < 1e-5,
            "{}: split vs full graph differ by {diff}",
            r.file
        );
    }
}

#[test]
fn embeddings_match_the_graphs_own_embedding_output() {
    let r = references()
        .into_iter()
        .find(|r| !r.embeddings.is_empty())
        .expect("hapt reference has embeddings");
    let mut c = load(&r.file);
    let emb = c
        .backbone
        .embed(&r.inputs.concat(), r.inputs.len())
        .unwrap();
    let diff = max_abs_diff(emb.as_slice().unwrap(), &r.embeddings.concat());
    assert!(diff < 1e-5, "embedding differs by {diff}");
}

#[test]
fn head_detection_handles_gemm_trans_b_matmul_add_and_softmax_outputs() {
    let mlp = load("models/hapt_mlp.onnx");
    assert_eq!(mlp.head.kind, OutputKind::Logits);
    assert_eq!(mlp.head.weight_layout, WeightLayout::ClassesByEmbedding);
    assert_eq!(
        (
            mlp.head.embedding.as_str(),
            mlp.embedding_dim,
            mlp.classes()
        ),
        ("embedding", 64, 6)
    );
    assert_eq!(mlp.class_names[0], "WALKING");

    let skl = load("tests/data/models/skl_mlp_softmax.onnx");
    assert_eq!(skl.head.kind, OutputKind::Probabilities);
    assert_eq!(skl.head.weight_layout, WeightLayout::EmbeddingByClasses);
    assert_eq!(
        skl.input_shape,
        vec![384],
        "flat input with an unnamed batch dimension"
    );
    assert_eq!(
        skl.head.output, "probabilities",
        "the int64 label output is passed over"
    );

    let cnn = load("tests/data/models/cnn_gemm_softmax.onnx");
    assert_eq!(cnn.head.kind, OutputKind::Probabilities);
    assert_eq!(cnn.input_shape, vec![6, 64]);
    assert_eq!(cnn.embedding_dim, 16);
}

#[test]
fn backbone_runs_any_batch_size_including_one_and_odd_sizes() {
    let r = &references()[0];
    let mut c = load(&r.file);
    let one = c.backbone.embed(&r.inputs[0], 1).unwrap();
    let five = c.backbone.embed(&r.inputs[..5].concat(), 5).unwrap();
    assert_eq!(five.dim(), (5, 64));
    assert!(
        max_abs_diff(
            one.row(0).as_slice().unwrap(),
            five.row(0).as_slice().unwrap()
        ) < 1e-6
    );
}

#[test]
fn a_batch_of_the_wrong_size_is_an_error_naming_the_expected_shape() {
    let mut c = load("models/hapt_mlp.onnx");
    let err = c.backbone.embed(&[0.0; 100], 1).unwrap_err().to_string();
    assert!(
        err.contains("100") && err.contains("384") && err.contains("[64, 6]"),
        "{err}"
    );
}

#[test]
fn configured_output_and_embedding_names_are_checked() {
    let sel = HeadSelection {
        output: Some("nope".into()),
        embedding: None,
    };
    let err = Classifier::load(&util::path("models/hapt_mlp.onnx"), &sel)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("'nope'") && err.contains("logits"), "{err}");

    let sel = HeadSelection {
        output: None,
        embedding: Some("features".into()),
    };
    let err = Classifier::load(&util::path("models/hapt_mlp.onnx"), &sel)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("'features'") && err.contains("'embedding'"),
        "{err}"
    );

    // The shipped model also exposes "embedding" as an output; picking it is refused because
    // a Relu, not a linear layer, produces it.
    let sel = HeadSelection {
        output: Some("embedding".into()),
        embedding: None,
    };
    let err = Classifier::load(&util::path("models/hapt_mlp.onnx"), &sel)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("found Relu"), "{err}");
}

/// A hand-made graph: input [N, 4] -> MatMul(W) -> Relu -> output. No linear head at the end.
fn relu_model(path: &std::path::Path) {
    use prost::Message;
    let tensor_type = |dims: &[i64]| pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: 1,
            shape: Some(pb::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| pb::tensor_shape_proto::Dimension {
                        value: Some(if d < 0 {
                            pb::tensor_shape_proto::dimension::Value::DimParam("N".into())
                        } else {
                            pb::tensor_shape_proto::dimension::Value::DimValue(d)
                        }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "relu_end".into(),
            node: vec![
                pb::NodeProto {
                    input: vec!["x".into(), "w".into()],
                    output: vec!["h".into()],
                    name: "mm".into(),
                    op_type: "MatMul".into(),
                    ..Default::default()
                },
                pb::NodeProto {
                    input: vec!["h".into()],
                    output: vec!["y".into()],
                    name: "act".into(),
                    op_type: "Relu".into(),
                    ..Default::default()
                },
            ],
            initializer: vec![pb::TensorProto {
                dims: vec![4, 3],
                data_type: 1,
                float_data: vec![0.1; 12],
                name: "w".into(),
                ..Default::default()
            }],
            input: vec![pb::ValueInfoProto {
                name: "x".into(),
                r#type: Some(tensor_type(&[-1, 4])),
                ..Default::default()
            }],
            output: vec![pb::ValueInfoProto {
                name: "y".into(),
                r#type: Some(tensor_type(&[-1, 3])),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

#[test]
fn a_model_without_a_linear_head_is_refused_naming_what_was_found() {
    let dir = util::tempdir();
    let p = dir.path().join("relu_end.onnx");
    relu_model(&p);
    let err = Classifier::load(&p, &HeadSelection::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("found Relu 'act'") && err.contains("output 'y'"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_onnx_is_refused_with_its_path() {
    let dir = util::tempdir();
    let p = dir.path().join("garbage.onnx");
    std::fs::write(&p, b"this is not a protobuf at all \xff\xfe").unwrap();
    let err = Classifier::load(&p, &HeadSelection::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("garbage.onnx"), "{err}");
    let err = Classifier::load(&dir.path().join("missing.onnx"), &HeadSelection::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.onnx"), "{err}");
}
