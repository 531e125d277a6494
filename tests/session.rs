//! The adaptation session that replay and the daemon share: one code path (bit-identical
//! teachers), feedback by id, the checkpoint policy, and the defects found on the way.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use edgemt::checkpoint::{CheckpointStore, Identity};
use edgemt::config::Config;
use edgemt::daemon::items::Incoming;
use edgemt::daemon::publish::{PredictionSink, RequestSink, Sinks};
use edgemt::daemon::queue::BoundedQueue;
use edgemt::daemon::state::{Queues, Shared};
use edgemt::daemon::workers::Workers;
use edgemt::daemon::DaemonConfig;
use edgemt::replay::{replay, ReplayOptions};
use edgemt::session::{Feedback, Item, LabelSource, Observation, Predictor, Session};
use edgemt::stream::{Line, RecordingReader, SampleDecoder};

use crate::util::{self, edgemt, run_ok, tempdir};

/// The shipped target stream with an id on every sample, where every labeled sample loses
/// its label and a feedback line `{"id", "label"}` carries it `delay` lines later.
fn with_late_feedback(path: &Path, delay: usize) -> usize {
    let text = std::fs::read_to_string(util::path("data/target_stream.jsonl")).unwrap();
    let mut out = std::fs::File::create(path).unwrap();
    let mut pending: Vec<(usize, String)> = Vec::new();
    let mut feedback = 0;
    for (i, line) in text.lines().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = format!("s{i}");
        v["id"] = id.clone().into();
        if let Some(label) = v.as_object_mut().unwrap().remove("label") {
            pending.push((
                i + delay,
                serde_json::json!({"id": id, "label": label}).to_string(),
            ));
            feedback += 1;
        }
        writeln!(out, "{v}").unwrap();
        while pending.first().is_some_and(|(at, _)| *at <= i) {
            writeln!(out, "{}", pending.remove(0).1).unwrap();
        }
    }
    for (_, line) in pending {
        writeln!(out, "{line}").unwrap();
    }
    feedback
}

/// Keeps what the inference stage publishes: the payloads, in order.
#[derive(Default)]
struct Published(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl PredictionSink for Published {
    fn prediction(&mut self, payload: Vec<u8>) -> bool {
        self.0.lock().unwrap().push(payload);
        true
    }
    fn state(&mut self, _: Vec<u8>) -> bool {
        true
    }
}

/// Nobody answers label requests here: they are dropped.
struct Unasked;

impl RequestSink for Unasked {
    fn label_request(&mut self, _: Vec<u8>) -> bool {
        true
    }
}

/// The recording through the daemon's own two stages (not threads: batch by batch, so the
/// run is deterministic): the inference stage answers each batch of `[input] max_batch`
/// lines and hands its items to the training queue, the training stage takes them in
/// arrival order. Returns the trainer's session and the published predictions.
fn through_the_daemons_stages(
    cfg: &Config,
    recording: &Path,
    seed: u64,
) -> (Session, Vec<serde_json::Value>) {
    let c = util::shipped_classifier();
    let mut wing = DaemonConfig::from_config(cfg).unwrap();
    wing.daemon.seed = seed;
    // Batches as replay's chunks, so both embed the same samples together.
    wing.input.max_batch = cfg.replay.batch;
    let train = std::sync::Arc::new(BoundedQueue::new(1 << 20));
    let input = std::sync::Arc::new(BoundedQueue::<Incoming>::new(1));
    let queues = Queues {
        raw: input.clone(),
        input: input.clone(),
        train: train.clone(),
    };
    let shared = std::sync::Arc::new(Shared::new(c.pretrained(), None, queues));
    let published = Published::default();
    let out = published.0.clone();
    let Workers {
        mut inference,
        mut trainer,
    } = Workers::new(
        cfg,
        &wing,
        &c,
        shared,
        (input, train.clone()),
        Sinks {
            predictions: Box::new(published),
            requests: Box::new(Unasked),
        },
        None,
    )
    .unwrap();
    trainer.begin();
    let decoder = SampleDecoder::new(&c.input_shape, c.classes());
    let mut reader = RecordingReader::open(recording, &decoder).unwrap();
    let (mut items, mut trained) = (Vec::new(), Vec::new());
    loop {
        while items.len() < wing.input.max_batch {
            match reader.next_line() {
                None => break,
                Some(l) => items.push(match l.unwrap().expect("valid line") {
                    Line::Sample(s) => Incoming::Sample {
                        x: s.x,
                        id: s.id.unwrap(),
                        label: s.label,
                        received: Instant::now(),
                    },
                    Line::Feedback { id, label } => Incoming::Feedback {
                        id,
                        label,
                        source: LabelSource::ById,
                    },
                }),
            }
        }
        if items.is_empty() {
            let predictions = out
                .lock()
                .unwrap()
                .iter()
                .map(|p| serde_json::from_slice(p).unwrap())
                .collect();
            return (trainer.session, predictions);
        }
        inference.answer_batch(&mut items);
        train.pop_batch(usize::MAX, Duration::ZERO, &mut trained);
        trainer.take_batch(&mut trained);
    }
}

#[test]
fn replay_and_the_daemons_session_end_with_bit_identical_teacher_weights() {
    let dir = tempdir();
    let recording = dir.path().join("late.jsonl");
    let feedback = with_late_feedback(&recording, 5);
    assert!(feedback > 30, "{feedback} feedback lines");
    let cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    let c = util::shipped_classifier();
    let seed = 3;
    let replayed = replay(
        &c,
        &cfg,
        &recording,
        None,
        &ReplayOptions {
            seed: Some(seed),
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(
        replayed.report.feedback as usize, feedback,
        "every label found its sample"
    );
    assert_eq!(replayed.report.late_labels, 0);

    let (daemon, published) = through_the_daemons_stages(&cfg, &recording, seed);
    assert_eq!(
        published.len(),
        replayed.report.samples,
        "one prediction a sample"
    );
    let (r, d) = (replayed.session.learner(), daemon.learner());
    assert!(r.counters().train_steps > 100, "the learner trained");
    assert_ne!(r.teacher(), r.pretrained(), "the teacher moved");
    assert_eq!(r.counters(), d.counters());
    assert_eq!(
        r.teacher().params().as_slice(),
        d.teacher().params().as_slice(),
        "bit-identical teacher weights"
    );
    assert_eq!(r.student(), d.student());
    // The served model may answer differently around a gate switch (replay asks after
    // every step, the daemon once per batch), so feedback scores may differ there. What was
    // learned from must not.
    let (rs, ds) = (replayed.session.stats(), daemon.stats());
    assert_eq!(
        (rs.labels, rs.feedback.total, rs.late_labels),
        (ds.labels, ds.feedback.total, ds.late_labels)
    );
}

/// The embedding of one raw sample, on the device's own axes.
fn embedding_of(predictor: &mut Predictor, x: &[f32]) -> ndarray::Array1<f32> {
    predictor.embed(x, 1, None).unwrap();
    predictor.embeddings().row(0).to_owned()
}

/// Hands `session` one sample (no id, no truth) through its loop body.
fn take_sample(session: &mut Session, predictor: &mut Predictor, x: &[f32], label: Option<usize>) {
    let e = embedding_of(predictor, x);
    session
        .take(Item::Sample(Observation {
            id: None,
            x,
            embedding: e.view(),
            mounting: Default::default(),
            label,
            source: LabelSource::Recording,
            truth: None,
            predicted: 0,
        }))
        .unwrap();
}

/// A session on the shipped model with the first `n` target samples taken (stepping).
fn session_with(cfg: &Config, n: usize) -> (Session, Vec<edgemt::stream::Sample>, Predictor) {
    let c = util::shipped_classifier();
    let mut session = Session::new(&c, cfg, 0).unwrap();
    let mut predictor = Predictor::new(c.backbone.clone());
    let rec = edgemt::stream::Recording::read(
        &util::path("data/target_stream.jsonl"),
        &SampleDecoder::new(&c.input_shape, c.classes()),
    )
    .unwrap();
    for s in rec.samples.iter().take(n) {
        take_sample(&mut session, &mut predictor, &s.x, s.label);
    }
    (session, rec.samples, predictor)
}

#[test]
fn periodic_checkpoints_continue_after_a_reset() {
    let mut cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    cfg.learn.train_every = 1;
    cfg.checkpoint.every_steps = 20;
    cfg.checkpoint.min_interval_s = 0.0;
    let (mut session, samples, mut predictor) = session_with(&cfg, 130);
    let now = Instant::now();
    let before = session
        .take_checkpoint(now)
        .expect("130 steps: a checkpoint is due");
    assert!(before.learner.counters.train_steps >= 120);
    assert!(session.take_checkpoint(now).is_none(), "nothing new since");

    session.reset();
    let reset = session
        .take_checkpoint(now)
        .expect("the reset is saved at once");
    assert_eq!(reset.learner.counters.train_steps, 0);
    assert_eq!(
        reset.learner.teacher,
        *session.learner().pretrained().params()
    );
    // Steps count from zero again, and the periodic saves go on from there.
    let mut saved_at = Vec::new();
    for s in samples.iter().take(50) {
        take_sample(&mut session, &mut predictor, &s.x, s.label);
        if let Some(state) = session.take_checkpoint(now) {
            saved_at.push(state.learner.counters.train_steps);
        }
    }
    assert_eq!(
        saved_at,
        vec![20, 40],
        "periodic checkpoints after the reset"
    );
}

#[test]
fn checkpoints_are_also_due_by_time_but_only_when_something_changed() {
    let mut cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    cfg.learn.train_every = 1;
    cfg.checkpoint.every_steps = 1000;
    cfg.checkpoint.every_s = 1.0;
    cfg.checkpoint.min_interval_s = 0.0;
    let (mut session, _, _) = session_with(&cfg, 10);
    assert!(session.take_checkpoint(Instant::now()).is_none());
    let later = Instant::now() + Duration::from_secs(2);
    assert!(session.take_checkpoint(later).is_some(), "10 steps and 2 s");
    assert!(
        session
            .take_checkpoint(later + Duration::from_secs(5))
            .is_none(),
        "no step since the last save"
    );
}

#[test]
fn feedback_scores_the_prediction_made_for_the_sample_and_then_learns_the_label() {
    let cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    let c = util::shipped_classifier();
    let mut session = Session::new(&c, &cfg, 0).unwrap();
    let x = vec![0.1f32; c.sample_len()];
    let e = embedding_of(&mut Predictor::new(c.backbone.clone()), &x);
    for (id, predicted) in [("a", 2), ("b", 4)] {
        session
            .take(Item::Sample(Observation {
                id: Some(id),
                x: &x,
                embedding: e.view(),
                mounting: Default::default(),
                label: None,
                source: LabelSource::Recording,
                truth: Some(5),
                predicted,
            }))
            .unwrap();
    }
    let mut label = |id, label| {
        session
            .take(Item::Feedback {
                id,
                label,
                source: LabelSource::ById,
            })
            .unwrap()
            .feedback
            .expect("a label gets a verdict")
    };
    // Scored against what was predicted for each id, not against anything else stored.
    assert_eq!(label("a", 2), Feedback::Matched { correct: true });
    assert_eq!(label("b", 2), Feedback::Matched { correct: false });
    assert_eq!(label("a", 2), Feedback::Late, "labeled once");
    assert_eq!(label("zzz", 1), Feedback::Late);
    let s = session.stats();
    assert_eq!(
        (
            s.feedback.total,
            s.feedback.correct,
            s.late_labels,
            s.labels
        ),
        (2, 1, 2, 2)
    );
    assert_eq!(
        session.learner().labeled_counts()[2],
        2,
        "both labels learned as class 2"
    );
}

#[test]
fn an_embedding_that_is_not_finite_is_refused_and_counted() {
    let cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    let c = util::shipped_classifier();
    let mut session = Session::new(&c, &cfg, 0).unwrap();
    let x = vec![0.1f32; c.sample_len()];
    let mut bad = ndarray::Array1::zeros(c.embedding_dim);
    bad[5] = f32::NAN;
    session
        .take(Item::Sample(Observation {
            id: Some("p"),
            x: &x,
            embedding: bad.view(),
            mounting: Default::default(),
            label: Some(1),
            source: LabelSource::Recording,
            truth: None,
            predicted: 0,
        }))
        .unwrap();
    assert_eq!(session.stats().rejected_embeddings, 1);
    assert_eq!(session.learner().labeled_counts().iter().sum::<usize>(), 0);
    let later = session
        .take(Item::Feedback {
            id: "p",
            label: 1,
            source: LabelSource::ById,
        })
        .unwrap();
    assert_eq!(
        later.feedback,
        Some(Feedback::Late),
        "not remembered either"
    );
}

#[test]
fn a_replay_reads_feedback_lines_and_reports_labels_that_came_too_late() {
    let dir = tempdir();
    let rec = dir.path().join("r.jsonl");
    let text = std::fs::read_to_string(util::path("data/control_stream.jsonl")).unwrap();
    let mut out = String::new();
    for (i, line) in text.lines().take(40).enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["id"] = format!("c{i}").into();
        out.push_str(&format!("{v}\n"));
    }
    out.push_str("{\"id\": \"c3\", \"label\": 2}\n{\"id\": \"nope\", \"label\": 2}\n");
    out.push_str("{\"id\": \"c4\"}\n");
    std::fs::write(&rec, out).unwrap();
    let cfg = util::config_with(dir.path(), "");
    let report = dir.path().join("report.json");
    let run = run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg(&rec)
            .arg("--report")
            .arg(&report),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains(":43: skipped"), "{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["samples"], 40);
    assert_eq!(r["feedback"], 1);
    assert_eq!(r["late_labels"], 1);
    assert_eq!(r["rejected"], 1);
}

#[test]
fn a_recording_without_a_valid_sample_is_an_error() {
    let dir = tempdir();
    let rec = dir.path().join("empty.jsonl");
    std::fs::write(&rec, "{\"x\": [1, 2]}\n\n").unwrap();
    let cfg = util::config_with(dir.path(), "");
    let out = edgemt()
        .args(["replay", "--config"])
        .arg(&cfg)
        .arg(&rec)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no valid sample"), "{stderr}");
}

#[test]
fn huge_periods_and_payload_limits_are_refused_instead_of_panicking() {
    for (text, key) in [
        ("[checkpoint]\nevery_s = 1e300", "checkpoint.every_s"),
        ("[metrics]\ninterval_s = 1e300", "metrics.interval_s"),
        (
            "[mqtt]\nmax_payload_bytes = 9223372036854775807",
            "mqtt.max_payload_bytes",
        ),
        ("[mqtt]\nkeep_alive_s = 100000", "mqtt.keep_alive_s"),
    ] {
        let err = Config::from_toml(&format!("[model]\npath = \"m.onnx\"\n{text}\n"))
            .and_then(|c| edgemt::daemon::DaemonConfig::from_config(&c))
            .unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
    // The conversion itself saturates rather than panicking.
    assert_eq!(
        edgemt::config::duration_s(1e300),
        Duration::from_secs_f64(edgemt::config::MAX_SECONDS)
    );
    assert_eq!(edgemt::config::duration_s(f64::NAN), Duration::ZERO);
}

#[test]
fn a_label_beyond_32_bits_is_refused_not_wrapped_to_a_small_class() {
    // On a 32-bit board `4294967297 as usize` is 1; the decoder must refuse it everywhere.
    let d = SampleDecoder::new(&[2], 6);
    for text in [
        "{\"x\": [1, 2], \"label\": 4294967297}",
        "{\"id\": \"a\", \"label\": 4294967297}",
    ] {
        let err = d.decode_line(text).unwrap_err();
        assert!(err.to_string().contains("4294967297"), "{err}");
    }
}

#[test]
fn io_errors_keep_their_cause_in_the_message() {
    let dir = tempdir();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let c = util::shipped_classifier();
    let err = CheckpointStore::open(&file.join("ck"), 3, Identity::new(&c, &Default::default()))
        .err()
        .expect("a file where a directory should be");
    let text = edgemt::report(&err);
    assert!(text.contains("checkpoint I/O on"), "{text}");
    assert!(
        text.contains("Not a directory") || text.contains("File exists"),
        "{text}"
    );
}

#[test]
fn export_without_a_config_works_for_any_model_path() {
    // A path Debug-escaping would turn into invalid TOML (\u{7} is not a TOML escape).
    let dir = tempdir();
    let odd = dir.path().join("bell\u{7}dir");
    std::fs::create_dir(&odd).unwrap();
    let model = odd.join("model.onnx");
    std::fs::copy(util::path("models/hapt_mlp.onnx"), &model).unwrap();
    let cfg = dir.path().join("edgemt.toml");
    let path = toml::Value::String(model.display().to_string());
    std::fs::write(&cfg, format!("[model]\npath = {path}\n")).unwrap();
    let ck = dir.path().join("ck");
    let rec = dir.path().join("r.jsonl");
    let text = std::fs::read_to_string(util::path("data/target_stream.jsonl")).unwrap();
    std::fs::write(&rec, text.lines().take(60).collect::<Vec<_>>().join("\n")).unwrap();
    run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg(&rec)
            .arg("--checkpoint")
            .arg(&ck),
    );
    let out = dir.path().join("adapted.onnx");
    let run = run_ok(
        edgemt()
            .args(["export", "--checkpoint"])
            .arg(&ck)
            .arg("-o")
            .arg(&out),
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("wrote"));
    assert!(std::fs::metadata(&out).unwrap().len() > 100_000);
}

#[test]
fn a_tensor_file_left_without_its_manifest_is_removed_on_open() {
    let dir = tempdir();
    let c = util::shipped_classifier();
    let id = || Identity::new(&c, &Default::default());
    let cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    let session = Session::new(&c, &cfg, 0).unwrap();
    let mut store = CheckpointStore::open(dir.path(), 3, id()).unwrap();
    store
        .save(&edgemt::checkpoint::Saved {
            learner: session.learner().state(),
            mounting: None,
            label_accuracy: Default::default(),
        })
        .unwrap();
    // A kill between the tensor file and its manifest leaves an orphan.
    let orphan = dir.path().join("ckpt-0000000002.safetensors");
    std::fs::write(&orphan, b"partial").unwrap();
    let store = CheckpointStore::open(dir.path(), 3, id()).unwrap();
    assert!(!orphan.exists(), "orphan pruned");
    assert_eq!(store.manifests().len(), 1);
    assert!(dir.path().join("ckpt-0000000001.safetensors").exists());
}

#[test]
fn two_trainable_layers_adapt_on_a_matmul_add_model_as_well() {
    let rel = "tests/data/models/skl_mlp_softmax.onnx";
    let c = util::classifier_with_layers(rel, 2);
    let mut cfg = Config::for_model(&util::path(rel));
    cfg.model.trainable_layers = 2;
    let out = replay(
        &c,
        &cfg,
        &util::path("data/target_stream.jsonl"),
        Some(&util::path("data/target_holdout.jsonl")),
        &ReplayOptions::default(),
        |_| {},
    )
    .unwrap();
    let l = out.session.learner();
    assert_eq!(l.teacher().layers(), 2);
    assert!(l.counters().train_steps > 100);
    for layer in 0..2 {
        let moved = (&l.teacher().weight(layer) - &l.pretrained().weight(layer))
            .iter()
            .fold(0.0f32, |a, d| a.max(d.abs()));
        assert!(moved > 1e-4, "layer {layer} did not adapt ({moved})");
    }
    let eval = out.report.eval.unwrap();
    assert!(
        eval.teacher_accuracy > 0.3 && eval.source_accuracy > 0.3,
        "{eval:?}"
    );
}

#[test]
fn a_mounting_adopted_by_calibration_keeps_the_labels_learned_in_the_old_frame() {
    let mut cfg = Config::for_model(&util::path("models/hapt_mlp.onnx"));
    cfg.calibration.polar = vec![[0, 1, 2]];
    cfg.calibration.axial = vec![[3, 4, 5]];
    let c = util::shipped_classifier();
    let mut session = Session::new(&c, &cfg, 0).unwrap();
    let mut predictor = Predictor::new(c.backbone.clone());
    let rec = edgemt::stream::Recording::read(
        &util::path("data/target_stream.jsonl"),
        &SampleDecoder::new(&c.input_shape, c.classes()),
    )
    .unwrap();
    let held = |s: &Session| -> usize { s.learner().labeled_counts().iter().sum() };
    let mut adoption = None;
    for (i, s) in rec.samples.iter().enumerate() {
        // Embedded the way the session mounts now, as a driver does.
        predictor.embed(&s.x, 1, session.mounting()).unwrap();
        let (before, mounting) = (held(&session), session.mounting_r());
        session
            .take(Item::Sample(Observation {
                id: None,
                x: &s.x,
                embedding: predictor.embeddings().row(0),
                mounting,
                label: s.truth.filter(|_| i % 5 == 0),
                source: LabelSource::Recording,
                truth: None,
                predicted: 0,
            }))
            .unwrap();
        if session.mounting_r() != mounting {
            adoption = Some((i, before, held(&session)));
            break;
        }
    }
    let (at, before, after) = adoption.expect("the shipped target stream's mounting is adopted");
    assert!(
        before >= 10,
        "labels were learned before sample {at}: {before}"
    );
    // The sample that confirmed the mounting was embedded the old way and is not learned;
    // every label learned before it is kept, re-embedded.
    assert_eq!(after, before);
    assert_eq!(
        session.learner().counters().train_steps,
        0,
        "the weights start again"
    );
}
