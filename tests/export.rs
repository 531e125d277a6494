//! Export of the adapted trainable layers as a plain ONNX file: every layer written back in
//! the file's own layout, checked by reloading in tract and in onnxruntime.

use std::path::{Path, PathBuf};

use edgemt::checkpoint::{CheckpointStore, Identity};
use edgemt::learn::LearnConfig;
use edgemt::model::export::export_trainable;
use edgemt::model::{Classifier, OutputKind};
use edgemt::nn::Mlp;
use ndarray::Array2;

use crate::util::{self, classifier_with_layers, max_abs_diff, tempdir};

/// `mlp` with `0.01 * sin(i)` added to its i-th parameter: every weight and bias of every
/// layer moves, deterministically.
fn perturbed(mlp: &Mlp) -> Mlp {
    let mut m = mlp.clone();
    for (i, v) in m.params_mut().as_mut_slice().iter_mut().enumerate() {
        *v += 0.01 * (i as f32).sin();
    }
    m
}

/// What the graph should output with `mlp` as its trainable part.
fn outputs(c: &Classifier, mlp: &Mlp, emb: &Array2<f32>) -> Array2<f32> {
    match c.trainable.kind {
        OutputKind::Probabilities => mlp.probs(emb.view()),
        OutputKind::Logits => mlp.logits(emb.view()),
    }
}

fn metadata<'a>(c: &'a Classifier, key: &str) -> Option<&'a str> {
    c.proto()
        .metadata_props
        .iter()
        .find(|p| p.key == key)
        .map(|p| p.value.as_str())
}

/// One exported model and what it must compute.
struct Exported {
    what: String,
    path: PathBuf,
    input_name: String,
    output: String,
    /// `[batch, sample shape...]`.
    shape: Vec<usize>,
    inputs: Vec<f32>,
    expected: Array2<f32>,
}

/// Loads `file` with `layers` trainable layers, perturbs all of them, exports into `dir` and
/// checks the reloaded file in tract: same layers, same metadata, and `run_full` equal to
/// the perturbed network on the backbone's embedding.
fn export_and_reload(file: &str, reference: &str, layers: usize, dir: &Path) -> Exported {
    let what = format!("{file} with {layers} adapted layer(s)");
    let r = util::references_in(reference)
        .into_iter()
        .find(|r| r.file == file)
        .expect("reference inputs");
    let mut c = classifier_with_layers(file, layers);
    let pretrained = c.pretrained();
    let adapted = perturbed(&pretrained);
    let bytes = export_trainable(
        c.proto(),
        &c.trainable,
        &adapted,
        &[
            ("edgemt.adapted_from", format!("{:016x}", c.fingerprint)),
            ("edgemt.teacher_version", "7".into()),
        ],
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let path = dir.join(format!("adapted_{layers}_{}", file.replace('/', "_")));
    std::fs::write(&path, bytes).unwrap();

    let mut reloaded = classifier_with_layers(path.to_str().unwrap(), layers);
    for l in 0..layers {
        let (w, b) = (reloaded.pretrained(), &adapted);
        assert!(
            max_abs_diff(w.weight(l), b.weight(l)) < 1e-6
                && max_abs_diff(w.bias(l), b.bias(l)) < 1e-6,
            "{what}: layer {l} written back"
        );
    }
    assert_eq!(
        metadata(&reloaded, "edgemt.trainable_layers"),
        Some(&*layers.to_string())
    );
    assert_eq!(metadata(&reloaded, "edgemt.teacher_version"), Some("7"));
    assert_eq!(
        metadata(&reloaded, "edgemt.adapted_from"),
        Some(&*format!("{:016x}", c.fingerprint))
    );
    assert_eq!(
        reloaded.class_names, c.class_names,
        "{what}: other metadata kept"
    );

    let batch = r.inputs.len();
    let inputs = r.inputs.concat();
    let emb = c.backbone.embed(&inputs, batch).unwrap();
    assert_eq!(
        reloaded.backbone.embed(&inputs, batch).unwrap(),
        emb,
        "{what}: the backbone is untouched"
    );
    let expected = outputs(&c, &adapted, &emb);
    let before = max_abs_diff(&expected, &outputs(&c, &pretrained, &emb));
    assert!(before > 1e-3, "{what}: the perturbation shows ({before})");
    let full = reloaded.run_full(&inputs, batch).unwrap();
    let diff = max_abs_diff(&full, &expected);
    assert!(diff < 1e-5, "{what}: tract on the export differs by {diff}");

    let mut shape = vec![batch];
    shape.extend(&c.input_shape);
    Exported {
        what,
        path,
        input_name: c.input_name.clone(),
        output: c.trainable.output.clone(),
        shape,
        inputs,
        expected,
    }
}

/// Runs every exported file in onnxruntime (one Python process) and compares within 1e-5.
fn check_in_onnxruntime(exports: &[Exported], dir: &Path) {
    let Some(python) = util::venv_python() else {
        eprintln!(
            "SKIPPED the onnxruntime half: tools/.venv is missing (tools/setup.sh creates it)"
        );
        return;
    };
    let jobs: Vec<_> = exports
        .iter()
        .map(|e| {
            serde_json::json!({
                "model": e.path, "input": e.input_name, "output": e.output,
                "shape": e.shape, "values": e.inputs,
            })
        })
        .collect();
    let job_file = dir.join("jobs.json");
    std::fs::write(&job_file, serde_json::to_string(&jobs).unwrap()).unwrap();
    let script = "import json, sys, numpy as np, onnxruntime as ort\n\
        out = []\n\
        for j in json.load(open(sys.argv[1])):\n\
        \x20   s = ort.InferenceSession(j['model'], providers=['CPUExecutionProvider'])\n\
        \x20   x = np.array(j['values'], dtype=np.float32).reshape(j['shape'])\n\
        \x20   out.append(s.run([j['output']], {j['input']: x})[0].ravel().tolist())\n\
        print(json.dumps(out))\n";
    let ort: Vec<Vec<f32>> = util::python_json(&python, script, &[&job_file]);
    assert_eq!(ort.len(), exports.len());
    for (e, got) in exports.iter().zip(&ort) {
        let diff = max_abs_diff(got, &e.expected);
        assert!(diff < 1e-5, "{}: onnxruntime differs by {diff}", e.what);
    }
}

const REFERENCE: &str = "tests/data/models/reference.json";

#[test]
fn the_shipped_model_exports_two_and_three_adapted_layers_that_tract_and_onnxruntime_reproduce() {
    let dir = tempdir();
    let exports: Vec<_> = [2, 3]
        .into_iter()
        .map(|n| export_and_reload("models/hapt_mlp.onnx", REFERENCE, n, dir.path()))
        .collect();
    check_in_onnxruntime(&exports, dir.path());
}

#[test]
fn the_skl_model_exports_two_adapted_matmul_add_layers_that_tract_and_onnxruntime_reproduce() {
    let dir = tempdir();
    let file = "tests/data/models/skl_mlp_softmax.onnx";
    let exports = [export_and_reload(file, REFERENCE, 2, dir.path())];
    check_in_onnxruntime(&exports, dir.path());
}

#[test]
fn transposed_gemms_with_alpha_and_beta_export_two_adapted_layers_that_tract_and_onnxruntime_reproduce(
) {
    let dir = tempdir();
    let exports = [export_and_reload(
        "tests/data/models/gemm_alpha_beta.onnx",
        "tests/data/models/gemm_alpha_beta.reference.json",
        2,
        dir.path(),
    )];
    check_in_onnxruntime(&exports, dir.path());
}

#[test]
fn one_adapted_layer_exports_for_every_reference_model_including_the_cnn() {
    let dir = tempdir();
    for r in util::references() {
        export_and_reload(&r.file, REFERENCE, 1, dir.path());
    }
}

#[test]
fn an_adapted_network_of_the_wrong_depth_or_shape_is_refused() {
    let c = classifier_with_layers("models/hapt_mlp.onnx", 2);
    let one = classifier_with_layers("models/hapt_mlp.onnx", 1).pretrained();
    let err = export_trainable(c.proto(), &c.trainable, &one, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 1 layer(s) but the model's trainable part has 2"),
        "{err}"
    );

    // Two layers, but the first is narrower than fc2.
    let narrow = Mlp::new(vec![
        (Array2::zeros((64, 100)), ndarray::Array1::zeros(64)),
        (Array2::zeros((6, 64)), ndarray::Array1::zeros(6)),
    ])
    .unwrap();
    let err = export_trainable(c.proto(), &c.trainable, &narrow, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Gemm 'fc2'") && err.contains("(64, 100)") && err.contains("(64, 128)"),
        "{err}"
    );
}

#[test]
fn exported_model_loads_in_onnxruntime_and_matches_within_1e_5() {
    adapt_export_and_compare_in_onnxruntime(1);
}

#[test]
fn two_layers_adapted_by_a_replay_export_and_match_in_onnxruntime_within_1e_5() {
    adapt_export_and_compare_in_onnxruntime(2);
}

/// Replays the target stream training `layers` layers, exports the checkpoint (without a
/// config: the manifest names the model and the layer count) and compares onnxruntime's
/// logits with the adapted teacher's.
fn adapt_export_and_compare_in_onnxruntime(layers: usize) {
    let python = util::venv_python().unwrap_or_else(|| "python3".into());
    let dir = tempdir();
    let (ck, out) = util::replay_then_export(
        dir.path(),
        &format!("trainable_layers = {layers}\n"),
        &["--teacher"],
    );
    // The adapted teacher's logits, from the checkpoint, on real inputs.
    let mut c = classifier_with_layers("models/hapt_mlp.onnx", layers);
    let store = CheckpointStore::open(&ck, 5, Identity::new(&c, &LearnConfig::default())).unwrap();
    let (m, state) = store.latest_valid().unwrap();
    assert_eq!(m.layers, layers);
    for l in 0..layers {
        // Every adapted layer moved away from the pretrained weights.
        let name = format!("{l}.weight");
        let i = state.teacher.index_of(&name).unwrap();
        let moved = state
            .teacher
            .values(i)
            .iter()
            .zip(state.pretrained.values(i))
            .fold(0.0f32, |a, (t, s)| a.max((t - s).abs()));
        assert!(
            moved > 1e-4,
            "layer {l} of {layers} did not adapt ({moved})"
        );
    }
    let r = &util::references()[0];
    let emb = c
        .backbone
        .embed(&r.inputs.concat(), r.inputs.len())
        .unwrap();
    let teacher = c.pretrained().with_params(state.teacher).unwrap();
    let expected = teacher.logits(emb.view());
    assert!((&expected - &c.pretrained().logits(emb.view()))
        .iter()
        .any(|d| d.abs() > 1e-3));

    let inputs = dir.path().join("inputs.json");
    std::fs::write(&inputs, serde_json::to_string(&r.inputs).unwrap()).unwrap();
    let script = "import json, sys, numpy as np, onnxruntime as ort\n\
        s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n\
        x = np.array(json.load(open(sys.argv[2])), dtype=np.float32).reshape(-1, 64, 6)\n\
        print(json.dumps(s.run(['logits'], {'input': x})[0].tolist()))\n";
    let ort: Vec<Vec<f32>> = util::python_json(&python, script, &[&out, &inputs]);
    let diff = max_abs_diff(&ort.concat(), &expected);
    assert!(diff < 1e-5, "onnxruntime vs adapted teacher: {diff}");
}

/// `edgemt export` and the daemon's `export` command write through one function: the file
/// appears whole or not at all, and a failure leaves no temporary file behind.
#[test]
fn a_failed_export_leaves_neither_a_file_nor_a_temporary_one() {
    use edgemt::model::export::{write_adapted, Adapted};
    let dir = tempdir();
    let c = util::shipped_classifier();
    let head = c.pretrained();
    let adapted = Adapted {
        head: &head,
        mounting: None,
        from_fingerprint: c.fingerprint,
        teacher_version: 7,
    };
    let write = |path: &Path, adapted: &Adapted| {
        write_adapted(path, c.proto(), &c.trainable, &c.input_shape, adapted)
    };
    let entries = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    // The rename fails: the output path is a directory.
    let taken = dir.path().join("taken.onnx");
    std::fs::create_dir(&taken).unwrap();
    let err = write(&taken, &adapted).unwrap_err();
    assert!(
        edgemt::report(&err).contains("taken.onnx"),
        "{}",
        edgemt::report(&err)
    );
    assert_eq!(entries(), ["taken.onnx"]);

    // The model cannot be built: a head of the wrong depth.
    let deep = classifier_with_layers("models/hapt_mlp.onnx", 2).pretrained();
    let out = dir.path().join("adapted.onnx");
    write(
        &out,
        &Adapted {
            head: &deep,
            ..adapted
        },
    )
    .unwrap_err();
    assert_eq!(entries(), ["taken.onnx"]);

    write(&out, &adapted).unwrap();
    assert_eq!(entries(), ["adapted.onnx", "taken.onnx"]);
    let exported = classifier_with_layers(out.to_str().unwrap(), 1);
    assert_eq!(metadata(&exported, "edgemt.teacher_version"), Some("7"));
}
