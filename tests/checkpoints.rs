//! Durable state: checkpoint round trips, every kind of damaged checkpoint, kill -9 at random
//! moments. (Export of the adapted layers as a plain ONNX file is in export.rs.)

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use edgemt::checkpoint::{CheckpointStore, Identity};
use edgemt::learn::rng::Rng;
use edgemt::learn::{GuardConfig, LearnConfig, Learner};
use edgemt::model::{Classifier, HeadSelection};
use edgemt::stream::{Layout, Recording, SampleDecoder};

use crate::util::{self, edgemt, run_ok, tempdir};

fn classifier(rel: &str) -> Classifier {
    Classifier::load(&util::path(rel), &HeadSelection::default()).unwrap()
}

/// A learner that has trained on the first `n` target samples.
fn trained(c: &mut Classifier, n: usize) -> Learner {
    let cfg = LearnConfig {
        train_every: 1,
        ..LearnConfig::default()
    };
    let mut learner = learner_for(c, &cfg);
    let rec = Recording::read(
        &util::path("data/target_stream.jsonl"),
        &SampleDecoder::new(&c.input_shape, c.classes()),
    )
    .unwrap();
    let mut train_backbone = c.backbone.clone();
    for s in rec.samples.iter().take(n) {
        let emb = c.backbone.embed(&s.x, 1).unwrap();
        learner.observe(&s.x, emb.row(0), s.label, s.truth);
        if learner.due() {
            learner.step(&mut train_backbone).unwrap();
        }
    }
    learner
}

fn learner_for(c: &Classifier, cfg: &LearnConfig) -> Learner {
    let no_guard = GuardConfig {
        enabled: false,
        ..Default::default()
    };
    Learner::new(
        c.pretrained(),
        Layout::for_shape(&c.input_shape, None),
        cfg,
        &Default::default(),
        &no_guard,
        &Default::default(),
        &Default::default(),
        0,
    )
}

fn saved(learner: &Learner) -> edgemt::checkpoint::Saved {
    edgemt::checkpoint::Saved {
        learner: learner.state(),
        mounting: None,
        label_accuracy: Default::default(),
    }
}

fn store(dir: &Path, c: &Classifier) -> CheckpointStore {
    util::checkpoint_store(dir, c, 5)
}

fn fresh(c: &Classifier) -> Learner {
    util::stepping_learner(c, 1)
}

#[test]
fn a_checkpoint_restores_heads_optimizer_counters_and_labeled_buffer_exactly() {
    let mut c = classifier("models/hapt_mlp.onnx");
    let learner = trained(&mut c, 120);
    let dir = tempdir();
    let mut s = store(dir.path(), &c);
    let m = s.save(&saved(&learner)).unwrap();
    assert_eq!(m.counters.train_steps, learner.counters().train_steps);

    let mut back = fresh(&c);
    assert_ne!(back.student(), learner.student(), "a fresh learner differs");
    let restored = s.restore_latest(&mut back).expect("restored");
    assert_eq!(restored.manifest.sequence, m.sequence);
    assert_eq!(back.student(), learner.student());
    assert_eq!(back.teacher(), learner.teacher());
    assert_eq!(back.pretrained(), learner.pretrained());
    assert_eq!(back.state().optimizer, learner.state().optimizer);
    assert_eq!(back.counters(), learner.counters());
    assert_eq!(back.labeled_counts(), learner.labeled_counts());
    assert_eq!(back.running_distribution(), learner.running_distribution());
}

#[test]
fn the_accuracy_on_labels_rides_in_the_manifest_and_an_older_manifest_without_it_still_restores() {
    let mut c = classifier("models/hapt_mlp.onnx");
    let learner = trained(&mut c, 30);
    let dir = tempdir();
    let mut s = store(dir.path(), &c);
    let accuracy = edgemt::scores::Accuracy {
        correct: 7,
        total: 9,
    };
    s.save(&edgemt::checkpoint::Saved {
        label_accuracy: accuracy,
        ..saved(&learner)
    })
    .unwrap();
    let restored = s.restore_latest(&mut fresh(&c)).expect("restored");
    assert_eq!(restored.manifest.label_accuracy, accuracy);

    // A manifest written before the field existed: the checkpoint restores, with 0 of 0.
    let path = s.manifests()[0].clone();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(json
        .as_object_mut()
        .unwrap()
        .remove("label_accuracy")
        .is_some());
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    let restored = s
        .restore_latest(&mut fresh(&c))
        .expect("an older manifest restores");
    assert_eq!(
        restored.manifest.label_accuracy,
        edgemt::scores::Accuracy::default()
    );
}

#[test]
fn only_the_last_k_checkpoints_are_kept() {
    let mut c = classifier("models/hapt_mlp.onnx");
    let learner = trained(&mut c, 30);
    let dir = tempdir();
    let mut s =
        CheckpointStore::open(dir.path(), 2, Identity::new(&c, &LearnConfig::default())).unwrap();
    for _ in 0..5 {
        s.save(&saved(&learner)).unwrap();
    }
    let names: Vec<String> = s
        .manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["ckpt-0000000005.json", "ckpt-0000000004.json"]);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        4,
        "two manifests and two tensor files"
    );
}

/// Two checkpoints (older: 40 samples, newer: 120); `damage` spoils the newer one.
fn damaged_case(damage: impl FnOnce(&Path, &Path)) -> (String, Option<u64>) {
    let mut c = classifier("models/hapt_mlp.onnx");
    let dir = tempdir();
    let mut s = store(dir.path(), &c);
    let older = s.save(&saved(&trained(&mut c, 40))).unwrap();
    let newer = s.save(&saved(&trained(&mut c, 120))).unwrap();
    assert!(newer.counters.teacher_version > older.counters.teacher_version);
    let manifest = dir.path().join(format!("ckpt-{:010}.json", newer.sequence));
    damage(&manifest, &manifest.with_extension("safetensors"));
    let err = s
        .load(&manifest)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let mut back = fresh(&c);
    let restored = s
        .restore_latest(&mut back)
        .map(|r| r.manifest.counters.teacher_version);
    assert_eq!(
        restored,
        Some(older.counters.teacher_version),
        "falls back to the older checkpoint"
    );
    assert_eq!(
        back.counters().teacher_version,
        older.counters.teacher_version
    );
    (err, restored)
}

#[test]
fn a_truncated_tensor_file_is_refused_and_the_older_checkpoint_used() {
    let (err, _) = damaged_case(|_, tensors| {
        let bytes = std::fs::read(tensors).unwrap();
        std::fs::write(tensors, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(
        err.contains("refused") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn a_bit_flip_is_caught_by_the_checksum() {
    let (err, _) = damaged_case(|_, tensors| {
        let mut bytes = std::fs::read(tensors).unwrap();
        let i = bytes.len() - 100;
        bytes[i] ^= 0x10;
        std::fs::write(tensors, &bytes).unwrap();
    });
    assert!(err.contains("checksum"), "{err}");
}

#[test]
fn a_missing_manifest_leaves_the_tensor_file_ignored() {
    let (err, _) = damaged_case(|manifest, _| std::fs::remove_file(manifest).unwrap());
    assert!(err.contains("cannot read manifest"), "{err}");
}

#[test]
fn a_garbled_manifest_is_refused() {
    let (err, _) = damaged_case(|manifest, _| std::fs::write(manifest, b"{\"format\": 3").unwrap());
    assert!(err.contains("manifest is not valid"), "{err}");
}

#[test]
fn a_checkpoint_of_another_model_is_refused_and_the_pretrained_model_used() {
    let other = classifier("tests/data/models/cnn_gemm_softmax.onnx");
    let c = classifier("models/hapt_mlp.onnx");
    let dir = tempdir();
    // Written by a store for the CNN, into the same directory.
    let mut foreign = store(dir.path(), &other);
    let learner = learner_for(&other, &LearnConfig::default());
    foreign.save(&saved(&learner)).unwrap();
    let s = store(dir.path(), &c);
    let err = s.load(&s.manifests()[0]).err().unwrap().to_string();
    assert!(err.contains("another model"), "{err}");
    let mut back = fresh(&c);
    assert!(
        s.restore_latest(&mut back).is_none(),
        "nothing usable: pretrained"
    );
    assert_eq!(back.teacher(), &c.pretrained());
}

#[test]
fn a_checkpoint_with_the_wrong_shapes_is_refused() {
    let skl = classifier("tests/data/models/skl_mlp_softmax.onnx");
    let c = classifier("models/hapt_mlp.onnx");
    let dir = tempdir();
    // The manifest claims this model, but the tensors come from a 32-feature head.
    let mut s = store(dir.path(), &c);
    let learner = learner_for(&skl, &LearnConfig::default());
    s.save(&saved(&learner)).unwrap();
    let err = s.load(&s.manifests()[0]).err().unwrap().to_string();
    assert!(
        err.contains("student")
            && err.contains("0.weight")
            && err.contains("[6, 32]")
            && err.contains("[6, 64]"),
        "{err}"
    );
    let mut back = fresh(&c);
    assert!(s.restore_latest(&mut back).is_none());
}

#[test]
fn replay_reports_a_refused_checkpoint_on_stderr_and_resumes_from_the_older_one() {
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let cfg = util::config_with(
        dir.path(),
        "[checkpoint]\nevery_steps = 50\nmin_interval_s = 0\nkeep = 10\n",
    );
    let replay = |extra: &[&str]| {
        run_ok(
            edgemt()
                .args(["replay", "--config"])
                .arg(&cfg)
                .arg(util::path("data/control_stream.jsonl"))
                .arg("--checkpoint")
                .arg(&ck)
                .args(extra),
        )
    };
    replay(&[]);
    let s = store(&ck, &classifier("models/hapt_mlp.onnx"));
    let newest = s.manifests()[0].clone();
    let second = s.manifests()[1]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let tensors = newest.with_extension("safetensors");
    let len = std::fs::metadata(&tensors).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tensors)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    let out = replay(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("restored checkpoint {second}")),
        "{stderr}"
    );
}

/// kill -9 right after observed events, `rounds` times in a row: every restart resumes from
/// a valid checkpoint, teacher_version never goes back below the last completed checkpoint's,
/// and no checkpoint on disk is ever unreadable. Each kill waits for the restore to be logged
/// and for a new checkpoint to land (so the machine's speed does not decide what is tested),
/// then a random 0-40 ms more, which lands kills inside the next save as well.
fn kill_nine_after_events(rounds: usize) {
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let cfg = util::config_with(
        dir.path(),
        "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 3\nmin_interval_s = 0\nkeep = 3\n",
    );
    let c = classifier("models/hapt_mlp.onnx");
    let mut rng = Rng::new(42);
    let mut last_completed = 0u64;
    let mut restores = 0;
    // A plain listing: opening a store would prune the writer's temporary files.
    let newest = |ck: &std::path::Path| {
        std::fs::read_dir(ck)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ckpt-") && n.ends_with(".json"))
            .max()
    };
    for round in 0..rounds {
        let log = dir.path().join(format!("run{round}.log"));
        let before = newest(&ck);
        let mut child = edgemt()
            .args(["replay", "--config"])
            .arg(&cfg)
            .arg(util::path("data/target_stream.jsonl"))
            .arg("--checkpoint")
            .arg(&ck)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let started =
                text.contains("restored checkpoint") || text.contains("no usable checkpoint");
            if started && newest(&ck) != before {
                break;
            }
            let finished = child.try_wait().unwrap().is_some();
            assert!(
                !finished && std::time::Instant::now() < deadline,
                "round {round}: the replay ended or stalled before a new checkpoint\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.below(40) as u64));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();

        let text = std::fs::read_to_string(&log).unwrap();
        match restored_version(&text) {
            Some(v) => {
                restores += 1;
                assert!(
                    v >= last_completed,
                    "round {round}: resumed at teacher_version {v} < {last_completed}\n{text}"
                );
            }
            None => assert!(
                round == 0 && text.contains("no usable checkpoint"),
                "round {round}: a checkpoint existed but none was restored\n{text}"
            ),
        }
        assert!(
            !text.contains("refused"),
            "round {round}: a checkpoint on disk was unreadable\n{text}"
        );
        // Everything on disk now must be readable; the newest is the last completed one.
        let s = store(&ck, &c);
        for m in s.manifests() {
            s.load(&m).unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let (m, _) = s.latest_valid().expect("a checkpoint landed this round");
        assert!(m.counters.teacher_version >= last_completed);
        last_completed = m.counters.teacher_version;
    }
    assert_eq!(restores, rounds - 1, "every round after the first resumed");
    assert!(last_completed > 0);
}

#[test]
fn kill_nine_after_a_restore_and_a_save_never_leaves_an_unreadable_state() {
    kill_nine_after_events(15);
}

#[test]
#[ignore = "100 rounds; run with: cargo test --test integration -- --ignored kill_nine"]
fn kill_nine_a_hundred_times_never_leaves_an_unreadable_state() {
    kill_nine_after_events(100);
}

fn restored_version(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("restored checkpoint"))?;
    let rest = line.split("teacher_version ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Label trust's memory rides in the checkpoint: a swap disputed before a restart is still
/// disputed after it (not raised again, not forgotten until labels arrive), and the memory
/// comes back as it was saved.
#[test]
fn a_dispute_and_the_label_memory_survive_a_restart() {
    let dir = tempdir();
    let ck = dir.path().join("ck");
    // The shipped control, every 5th line labeled with SITTING (3) and STANDING (4) swapped.
    let swapped = dir.path().join("swapped.jsonl");
    let unlabeled = dir.path().join("unlabeled.jsonl");
    let (mut with_swap, mut without) = (String::new(), String::new());
    for (i, mut line) in util::recording_lines("data/control_stream.jsonl")
        .into_iter()
        .enumerate()
    {
        let o = line.as_object_mut().unwrap();
        let truth = o["truth"].as_u64().unwrap();
        o.remove("label");
        without += &format!("{line}\n");
        if let Some(label) = util::swapped_label(i, truth) {
            line.as_object_mut()
                .unwrap()
                .insert("label".into(), label.into());
        }
        with_swap += &format!("{line}\n");
    }
    std::fs::write(&swapped, with_swap).unwrap();
    std::fs::write(&unlabeled, without).unwrap();
    let cfg = util::config_with(dir.path(), "");
    let replay = |stream: &Path, report: &str| -> serde_json::Value {
        let report = dir.path().join(report);
        run_ok(
            edgemt()
                .args(["replay", "--config"])
                .arg(&cfg)
                .arg(stream)
                .arg("--checkpoint")
                .arg(&ck)
                .arg("--report")
                .arg(&report),
        );
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
    };
    let first = replay(&swapped, "first.json");
    assert_eq!(
        first["trust"]["disputed"],
        serde_json::json!([3, 4]),
        "{first}"
    );
    let second = replay(&unlabeled, "second.json");
    assert_eq!(
        second["trust"]["disputed"],
        serde_json::json!([3, 4]),
        "{second}"
    );
    assert_eq!(second["trust"]["disputes"], 0, "restored, not raised again");
    assert_eq!(second["gate"]["serving"], "pretrained");

    // The memory itself round-trips through the newest checkpoint.
    let c = classifier("models/hapt_mlp.onnx");
    let (_, state) = store(&ck, &c).latest_valid().unwrap();
    assert!(
        state.trust.labels.len() > 50,
        "{}",
        state.trust.labels.len()
    );
    let mut learner = fresh(&c);
    learner.restore(state.clone()).unwrap();
    assert_eq!(learner.state().trust, state.trust);
    assert_eq!(learner.trust().disputed(), Some((3, 4)));
}
