//! Loading ONNX classifiers built by different tools, and the backbone / trainable-layers
//! split.

use edgemt::model::{Classifier, HeadSelection, LinearOp, ModelError, OutputKind, WeightLayout};
use ndarray::Array2;
use tract_onnx::pb;

use crate::util::{self, classifier_with_layers, max_abs_diff, references, references_in};

fn load(rel: &str) -> Classifier {
    Classifier::load(&util::path(rel), &HeadSelection::default()).expect("model loads")
}

/// Backbone + the lifted layers as an `nn::Mlp`, the way edgemt serves predictions.
fn split_outputs(c: &mut Classifier, inputs: &[f32], batch: usize) -> Array2<f32> {
    let emb = c.backbone.embed(inputs, batch).expect("backbone runs");
    let mlp = c.pretrained();
    match c.trainable.kind {
        OutputKind::Probabilities => mlp.probs(emb.view()),
        OutputKind::Logits => mlp.logits(emb.view()),
    }
}

/// The reference models and their fixture with transB = 0 and alpha, beta != 1, each with
/// every trainable-layer count it supports.
fn references_with_layer_counts() -> Vec<(util::Reference, Vec<usize>)> {
    let refs = references();
    assert_eq!(
        refs.len(),
        3,
        "reference.json covers three differently built models"
    );
    let mut all: Vec<_> = refs
        .into_iter()
        .chain(references_in(
            "tests/data/models/gemm_alpha_beta.reference.json",
        ))
        .collect();
    all.sort_by(|a, b| a.file.cmp(&b.file));
    let counts = |file: &str| match file {
        "models/hapt_mlp.onnx" => vec![1, 2, 3],
        "tests/data/models/skl_mlp_softmax.onnx" => vec![1, 2],
        "tests/data/models/gemm_alpha_beta.onnx" => vec![1, 2],
        "tests/data/models/cnn_gemm_softmax.onnx" => vec![1],
        other => panic!("unexpected reference model {other}"),
    };
    all.into_iter()
        .map(|r| {
            let n = counts(&r.file);
            (r, n)
        })
        .collect()
}

#[test]
fn backbone_plus_lifted_layers_reproduce_onnxruntime_for_one_two_and_three_trainable_layers() {
    for (r, counts) in references_with_layer_counts() {
        for layers in counts {
            let mut c = classifier_with_layers(&r.file, layers);
            let what = format!("{} with {layers} trainable layer(s)", r.file);
            assert_eq!(c.trainable.layers.len(), layers, "{what}");
            assert_eq!(c.pretrained().layers(), layers, "{what}");
            assert_eq!(c.input_shape, r.input_shape[1..], "{what}: sample shape");
            assert_eq!(c.trainable.output, r.output_name, "{what}: output");
            let batch = r.inputs.len();
            let flat: Vec<f32> = r.inputs.concat();
            let ours = split_outputs(&mut c, &flat, batch);
            let diff = max_abs_diff(&ours, &r.outputs.concat());
            assert!(
                diff < 1e-5,
                "{what}: split differs from onnxruntime by {diff}"
            );

            // The whole graph in tract agrees too, so the split loses nothing.
            let full = c.run_full(&flat, batch).expect("full graph runs");
            let diff = max_abs_diff(&full, &ours);
            assert!(diff < 1e-5, "{what}: split vs full graph differ by {diff}");
        }
    }
}

#[test]
fn the_embedding_is_the_input_of_the_first_lifted_layer() {
    for (file, layers, embedding, width) in [
        ("models/hapt_mlp.onnx", 1, "embedding", 64),
        ("models/hapt_mlp.onnx", 2, "fc1_relu", 128),
        ("models/hapt_mlp.onnx", 3, "flat", 384),
        (
            "tests/data/models/skl_mlp_softmax.onnx",
            2,
            "cast_input",
            384,
        ),
        ("tests/data/models/gemm_alpha_beta.onnx", 2, "h1", 12),
    ] {
        let mut c = classifier_with_layers(file, layers);
        assert_eq!(
            (c.trainable.embedding.as_str(), c.embedding_dim),
            (embedding, width),
            "{file} with {layers} layer(s)"
        );
        assert_eq!(c.pretrained().input_dim(), width);
        let emb = c.backbone.embed(&vec![0.5; c.sample_len()], 1).unwrap();
        assert_eq!(emb.dim(), (1, width), "{file}: the backbone ends there");
    }
}

#[test]
fn every_lifted_layer_records_its_node_layout_and_folded_alpha_and_beta() {
    let mlp = classifier_with_layers("models/hapt_mlp.onnx", 3);
    let nodes: Vec<_> = mlp
        .trainable
        .layers
        .iter()
        .map(|l| l.node.as_str())
        .collect();
    assert_eq!(nodes, ["fc1", "fc2", "head"]);
    assert!(mlp
        .trainable
        .layers
        .iter()
        .all(|l| l.op == LinearOp::Gemm && l.weight_layout == WeightLayout::OutByIn));
    assert_eq!(
        mlp.trainable.path.join(" -> "),
        "Gemm 'fc1' (transB=1) -> Relu -> Gemm 'fc2' (transB=1) -> Relu -> Gemm 'head' (transB=1)"
    );
    let dims: Vec<_> = mlp
        .trainable
        .layers
        .iter()
        .map(|l| l.weight.dim())
        .collect();
    assert_eq!(dims, [(128, 384), (64, 128), (6, 64)]);

    let skl = classifier_with_layers("tests/data/models/skl_mlp_softmax.onnx", 2);
    let layers = &skl.trainable.layers;
    assert_eq!(
        (
            layers[0].weight_name.as_str(),
            layers[1].bias_name.as_deref()
        ),
        ("coefficient", Some("intercepts1"))
    );
    assert!(layers
        .iter()
        .all(|l| l.op == LinearOp::MatMulAdd && l.weight_layout == WeightLayout::InByOut));
    assert_eq!(skl.trainable.path.last().unwrap(), "Identity");

    // Effective weights are alpha * W^T and beta * b of the file's [in, out] initializers.
    let ab = classifier_with_layers("tests/data/models/gemm_alpha_beta.onnx", 2);
    let graph = ab.proto().graph.as_ref().unwrap();
    let init = |name: &str| -> Vec<f32> {
        let t = graph.initializer.iter().find(|t| t.name == name).unwrap();
        t.raw_data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    for (layer, (node, alpha, beta)) in ab
        .trainable
        .layers
        .iter()
        .zip([("fc2", 0.5, 2.0), ("out", 2.0, 0.5)])
    {
        assert_eq!(
            (
                layer.node.as_str(),
                layer.alpha,
                layer.beta,
                layer.weight_layout
            ),
            (node, alpha, beta, WeightLayout::InByOut)
        );
        let (out, inp) = layer.weight.dim();
        let file_w = Array2::from_shape_vec((inp, out), init(&layer.weight_name)).unwrap();
        assert_eq!(layer.weight, file_w.t().mapv(|w| w * alpha), "{node}");
        let file_b = init(layer.bias_name.as_ref().unwrap());
        assert_eq!(
            layer.bias.to_vec(),
            file_b.iter().map(|b| b * beta).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_tail_that_does_not_fit_the_requested_layer_count_is_refused_naming_what_was_found() {
    let refused = |file: &str, layers: usize| -> String {
        let sel = HeadSelection {
            trainable_layers: layers,
            ..Default::default()
        };
        match Classifier::load(&util::path(file), &sel) {
            Err(e @ ModelError::Unsupported(_)) => e.to_string(),
            Err(e) => panic!("{file}: expected Unsupported, got {e}"),
            Ok(_) => panic!("{file} with {layers} trainable layers was accepted"),
        }
    };
    let err = refused("tests/data/models/cnn_gemm_softmax.onnx", 2);
    assert!(
        err.contains(
            "trainable_layers = 2: expected Relu before Gemm '/fc/Gemm', found Flatten '/Flatten'"
        ),
        "{err}"
    );
    let err = refused("models/hapt_mlp.onnx", 4);
    assert!(
        err.contains(
            "trainable_layers = 4: expected Relu before Gemm 'fc1', found Reshape 'flatten'"
        ),
        "{err}"
    );
    let err = refused("tests/data/models/gemm_alpha_beta.onnx", 3);
    assert!(
        err.contains("Gemm 'fc1' reads the graph input 'input' directly"),
        "{err}"
    );
    let err = refused("models/hapt_mlp.onnx", 0);
    assert!(err.contains("trainable_layers = 0"), "{err}");

    let dir = util::tempdir();
    let p = dir.path().join("tail.onnx");
    let two_layers = |act: &str, w2: (i64, i64), extra: Vec<pb::NodeProto>| {
        let mut nodes = vec![
            node("Relu", "r0", &["x"], &["h0"]),
            node("Gemm", "g1", &["h0", "w1", "b1"], &["z1"]),
            node(act, "act", &["z1"], &["h1"]),
            node("Gemm", "g2", &["h1", "w2", "b2"], &["y"]),
        ];
        nodes.extend(extra);
        write_model(
            &p,
            nodes,
            vec![
                init("w1", &[4, 3]),
                init("b1", &[3]),
                init("w2", &[w2.0, w2.1]),
                init("b2", &[w2.1]),
            ],
            4,
            2,
        );
        let sel = HeadSelection {
            trainable_layers: 2,
            ..Default::default()
        };
        Classifier::load(&p, &sel)
            .err()
            .expect("refused")
            .to_string()
    };
    let err = two_layers("Sigmoid", (3, 2), vec![]);
    assert!(
        err.contains("expected Relu before Gemm 'g2', found Sigmoid 'act'"),
        "{err}"
    );
    let err = two_layers("Relu", (5, 2), vec![]);
    assert!(
        err.contains("Gemm 'g1' gives 3 features but Gemm 'g2' takes 5"),
        "{err}"
    );
    let err = two_layers("Relu", (3, 2), vec![node("Neg", "side", &["z1"], &["n"])]);
    assert!(err.contains("tensor 'z1' feeds 2 nodes"), "{err}");
    // The same graph with one trainable layer is fine: only g2 is lifted.
    two_layers("Sigmoid", (3, 2), vec![]);
    let sel = HeadSelection::default();
    let c = Classifier::load(&p, &sel).expect("one layer fits");
    assert_eq!((c.trainable.embedding.as_str(), c.embedding_dim), ("h1", 3));
}

#[test]
fn malformed_nodes_are_errors_naming_the_node_not_panics() {
    let dir = util::tempdir();
    let p = dir.path().join("malformed.onnx");
    let inits = || vec![init("w", &[4, 2]), init("b", &[2])];
    let cases: Vec<(&str, usize, Vec<pb::NodeProto>, &str)> = vec![
        (
            "Softmax without input",
            1,
            vec![
                node("Relu", "r", &["x"], &["h"]),
                node("Gemm", "g", &["h", "w", "b"], &["z"]),
                node("Softmax", "sm", &[], &["y"]),
            ],
            "Softmax 'sm' has 0 input(s), expected at least 1",
        ),
        (
            "Add with one input",
            1,
            vec![
                node("Relu", "r", &["x"], &["h"]),
                node("MatMul", "mm", &["h", "w"], &["m"]),
                node("Add", "add", &["m"], &["y"]),
            ],
            "Add 'add' has 1 input(s), expected at least 2",
        ),
        (
            "Gemm with one input",
            1,
            vec![
                node("Relu", "r", &["x"], &["h"]),
                node("Gemm", "g", &["h"], &["y"]),
            ],
            "Gemm 'g' has 1 input(s), expected at least 2",
        ),
        (
            "MatMul with one input under an Add",
            1,
            vec![
                node("Relu", "r", &["x"], &["h"]),
                node("MatMul", "mm", &["h"], &["m"]),
                node("Add", "add", &["m", "b"], &["y"]),
            ],
            "MatMul 'mm' has 1 input(s), expected at least 2",
        ),
        (
            "Relu without input between two layers",
            2,
            vec![
                node("Relu", "r", &[], &["h"]),
                node("Gemm", "g", &["h", "w", "b"], &["y"]),
            ],
            "Relu 'r' has 0 input(s), expected at least 1",
        ),
        (
            "Identity reading its own output",
            1,
            vec![node("Identity", "loop", &["y"], &["y"])],
            "form a cycle",
        ),
    ];
    for (what, layers, nodes, expected) in cases {
        write_model(&p, nodes, inits(), 4, 2);
        let sel = HeadSelection {
            trainable_layers: layers,
            ..Default::default()
        };
        let result = std::panic::catch_unwind(|| Classifier::load(&p, &sel).err());
        let err = result
            .unwrap_or_else(|_| panic!("{what}: loading panicked"))
            .unwrap_or_else(|| panic!("{what}: loading succeeded"))
            .to_string();
        assert!(err.contains(expected), "{what}: {err}");
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
    let diff = max_abs_diff(&emb, &r.embeddings.concat());
    assert!(diff < 1e-5, "embedding differs by {diff}");
}

#[test]
fn head_detection_handles_gemm_trans_b_matmul_add_and_softmax_outputs() {
    let mlp = load("models/hapt_mlp.onnx");
    assert_eq!(mlp.trainable.kind, OutputKind::Logits);
    assert_eq!(mlp.trainable.last().weight_layout, WeightLayout::OutByIn);
    assert_eq!(
        (
            mlp.trainable.embedding.as_str(),
            mlp.embedding_dim,
            mlp.classes()
        ),
        ("embedding", 64, 6)
    );
    assert_eq!(mlp.class_names[0], "WALKING");

    let skl = load("tests/data/models/skl_mlp_softmax.onnx");
    assert_eq!(skl.trainable.kind, OutputKind::Probabilities);
    assert_eq!(skl.trainable.last().weight_layout, WeightLayout::InByOut);
    assert_eq!(
        skl.input_shape,
        vec![384],
        "flat input with an unnamed batch dimension"
    );
    assert_eq!(
        skl.trainable.output, "probabilities",
        "the int64 label output is passed over"
    );

    let cnn = load("tests/data/models/cnn_gemm_softmax.onnx");
    assert_eq!(cnn.trainable.kind, OutputKind::Probabilities);
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
    assert!(max_abs_diff(one.row(0), five.row(0)) < 1e-6);
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
        ..Default::default()
    };
    let err = Classifier::load(&util::path("models/hapt_mlp.onnx"), &sel)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("'nope'") && err.contains("logits"), "{err}");

    let sel = HeadSelection {
        embedding: Some("features".into()),
        ..Default::default()
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
        ..Default::default()
    };
    let err = Classifier::load(&util::path("models/hapt_mlp.onnx"), &sel)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("found Relu"), "{err}");
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: name.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

/// A float initializer of shape `dims` filled with 0.1.
fn init(name: &str, dims: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        dims: dims.to_vec(),
        data_type: 1,
        float_data: vec![0.1; dims.iter().product::<i64>() as usize],
        name: name.into(),
        ..Default::default()
    }
}

/// Writes a hand-made graph with input "x" [N, inputs] and output "y" [N, outputs].
fn write_model(
    path: &std::path::Path,
    nodes: Vec<pb::NodeProto>,
    initializer: Vec<pb::TensorProto>,
    inputs: i64,
    outputs: i64,
) {
    use prost::Message;
    let tensor_type = |width: i64| pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: 1,
            shape: Some(pb::TensorShapeProto {
                dim: [
                    pb::tensor_shape_proto::dimension::Value::DimParam("N".into()),
                    pb::tensor_shape_proto::dimension::Value::DimValue(width),
                ]
                .into_iter()
                .map(|v| pb::tensor_shape_proto::Dimension {
                    value: Some(v),
                    ..Default::default()
                })
                .collect(),
            }),
        })),
        ..Default::default()
    };
    let value = |name: &str, width| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(tensor_type(width)),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(pb::GraphProto {
            name: "hand_made".into(),
            node: nodes,
            initializer,
            input: vec![value("x", inputs)],
            output: vec![value("y", outputs)],
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
    // input [N, 4] -> MatMul(W) -> Relu -> output: no linear layer at the end.
    write_model(
        &p,
        vec![
            node("MatMul", "mm", &["x", "w"], &["h"]),
            node("Relu", "act", &["h"], &["y"]),
        ],
        vec![init("w", &[4, 3])],
        4,
        3,
    );
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

#[test]
fn inspect_lists_every_lifted_layer_and_the_trainable_parameter_count() {
    let out = util::run_ok(
        util::edgemt()
            .args(["inspect", "--trainable-layers", "2"])
            .arg(util::path("models/hapt_mlp.onnx")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "embedding    'fc1_relu' [N, 128]",
        "layer 0      'fc2' Gemm [64, 128], weights 'fc2.weight' OutByIn, bias 'fc2.bias'",
        "layer 1      'head' Gemm [6, 64], weights 'head.weight' OutByIn, bias 'head.bias'",
        // fc2: 64 * 128 + 64, head: 6 * 64 + 6.
        "8646 trainable in 2 layer(s)",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let out = util::edgemt()
        .args(["inspect", "--trainable-layers", "4"])
        .arg(util::path("models/hapt_mlp.onnx"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("found Reshape 'flatten'"),
        "{err}"
    );
}
