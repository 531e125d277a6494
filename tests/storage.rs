//! Storage an SD card survives: a disk that holds `keep` checkpoints but not one more, a state
//! directory deleted while the daemon runs, another model tried on the same directory, failed
//! and killed exports, and the write budget (a minimum interval between saves and bytes a
//! day) with a learner at full speed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use edgemt::checkpoint::{CheckpointWriter, Offered, Saved};
use edgemt::model::{Classifier, HeadSelection};
use edgemt::session::CheckpointPolicy;

use crate::util::broker::{daemon_config, last_metrics, num, on, Broker, Daemon, MqttPeer};
use crate::util::{self, edgemt, run_ok, tempdir};

/// Saves as often as the learner steps, with no interval and a budget that never binds: the
/// worst case for a disk.
// Label trust off: it holds some labels back in the first replay and releases them in the
// second, so the second replay's checkpoints would outgrow the size measured on the first.
const EVERY_THIRD_STEP: &str = "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 3\n\
    min_interval_s = 0\nmax_mib_per_day = 100000\nkeep = 3\n[trust]\nenabled = false\n";

fn saved(learner: &edgemt::learn::Learner) -> Saved {
    Saved {
        learner: learner.state(),
        mounting: None,
        label_accuracy: Default::default(),
    }
}

fn names(dir: &Path, ext: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    names.sort();
    names
}

/// `edgemt replay` of the shipped target stream with `cfg` into checkpoint directory `ck`;
/// its JSON report and how long it took.
fn replay(cfg: &Path, ck: &Path, report: &Path) -> (Value, Duration) {
    let started = Instant::now();
    run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(cfg)
            .arg(util::path("data/target_stream.jsonl"))
            .arg("--checkpoint")
            .arg(ck)
            .arg("--report")
            .arg(report),
    );
    let took = started.elapsed();
    let report = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    (report, took)
}

/// Whether this machine lets us mount a tmpfs in a private user and mount namespace.
fn private_mounts_work() -> bool {
    Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Mounts a tmpfs with `options` in a private user and mount namespace and replays the target
/// stream twice with `cfg` into a checkpoint directory on it (the tmpfs and its files go with
/// the namespace): `first.*` and `second.*` reports and logs, the first run's listing
/// (`first.ls`) and the space left after it (`first.avail`), in `out`. Whether both ran.
fn two_replays_on_a_tmpfs(options: &str, cfg: &Path, out: &Path) -> bool {
    let mnt = out.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let script = r#"set -e
mount -t tmpfs -o "$OPTIONS" tmpfs "$MNT"
"$EDGEMT" replay --config "$CFG" "$REC" --checkpoint "$MNT/ck" --report "$OUT/first.json" >/dev/null 2>"$OUT/first.log"
ls "$MNT/ck" > "$OUT/first.ls"
df -B1 --output=avail "$MNT" | tail -n 1 > "$OUT/first.avail"
"$EDGEMT" replay --config "$CFG" "$REC" --checkpoint "$MNT/ck" --report "$OUT/second.json" >/dev/null 2>"$OUT/second.log"
"#;
    Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
        .env("OPTIONS", options)
        .env("MNT", &mnt)
        .env("EDGEMT", env!("CARGO_BIN_EXE_edgemt"))
        .env("CFG", cfg)
        .env("REC", util::path("data/target_stream.jsonl"))
        .env("OUT", out)
        .env("RUST_LOG", "info")
        .status()
        .unwrap()
        .success()
}

/// What the first replay's restart restored: the checkpoint's name and its train_steps.
fn restored(log: &str) -> Option<(String, u64)> {
    let line = log.lines().find(|l| l.contains("restored checkpoint "))?;
    let rest = line.split("restored checkpoint ").nth(1)?;
    let name = rest.split_whitespace().next()?.to_string();
    let steps = rest.split("train_steps ").nth(1)?;
    let steps = steps.trim_end_matches(')').trim().parse().ok()?;
    Some((name, steps))
}

fn skip_without_private_mounts() -> bool {
    if private_mounts_work() {
        return false;
    }
    eprintln!(
        "SKIPPED: `unshare --user --map-root-user --mount` is not permitted here, so no small \
         tmpfs can be mounted without root"
    );
    true
}

#[test]
fn a_disk_that_holds_keep_checkpoints_but_not_one_more_keeps_saving_and_a_restart_restores_the_newest(
) {
    if skip_without_private_mounts() {
        return;
    }
    let dir = tempdir();
    let out = dir.path();
    let cfg = util::config_with(out, EVERY_THIRD_STEP);
    // A real checkpoint's size, from the same replay on an ordinary disk. The labeled buffer
    // only grows over the stream, so the last checkpoint is the largest.
    let measured = out.join("measured");
    let (full, _) = replay(&cfg, &measured, &out.join("measured.json"));
    let newest = measured.join(names(&measured, ".json").pop().unwrap());
    const PAGE: u64 = 4096;
    let on_disk = |p: &Path| std::fs::metadata(p).unwrap().len().div_ceil(PAGE) * PAGE;
    let one = on_disk(&newest) + on_disk(&newest.with_extension("safetensors"));
    // Room for `keep` = 3 of them and half of a fourth, and the page of the lock file a
    // replay that saves checkpoints holds there (checkpoint::lock).
    let size = (3 * one + one / 2 + PAGE).div_ceil(PAGE) * PAGE;

    let ran = two_replays_on_a_tmpfs(&format!("size={size}"), &cfg, out);
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let first_log = read("first.log");
    let second_log = read("second.log");
    assert!(
        ran,
        "a replay failed on the small disk ({size} bytes, one checkpoint {one}):\nfirst:\n{first_log}\nsecond:\n{second_log}"
    );
    let first: Value = serde_json::from_str(&read("first.json")).unwrap();
    assert_eq!(
        first["checkpoints_written"], full["checkpoints_written"],
        "every due checkpoint was written, as on a big disk\n{first_log}"
    );
    assert!(
        first_log.contains("needed: removed"),
        "the disk was tight: old checkpoints were removed to make room\n{first_log}"
    );
    let avail: u64 = read("first.avail").trim().parse().unwrap();
    assert!(
        avail < one,
        "at the end a fourth checkpoint ({one} bytes) would not fit in {avail}"
    );
    let listing = read("first.ls");
    let manifests: Vec<&str> = listing.lines().filter(|n| n.ends_with(".json")).collect();
    assert!(
        (1..=3).contains(&manifests.len()),
        "{listing}: never more than keep, never none"
    );
    let newest = manifests.iter().max().unwrap().trim_end_matches(".json");
    assert_eq!(
        restored(&second_log),
        Some((newest.to_string(), first["train_steps"].as_u64().unwrap())),
        "the restart resumes from the newest checkpoint, {newest}, holding every step:\n{second_log}"
    );
    assert!(!second_log.contains("refused"), "{second_log}");
}

#[test]
fn a_save_that_runs_out_of_space_after_writing_cleans_up_prunes_and_succeeds_on_its_retry() {
    if skip_without_private_mounts() {
        return;
    }
    let dir = tempdir();
    let out = dir.path();
    let cfg = util::config_with(out, EVERY_THIRD_STEP);
    // Space enough, but 9 inodes: the root, the checkpoint directory, three checkpoints of two
    // files, and one temporary file. The free-space check passes; the fourth checkpoint's
    // manifest finds no inode after its tensor file was written.
    let ran = two_replays_on_a_tmpfs("size=50m,nr_inodes=9", &cfg, out);
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let first_log = read("first.log");
    assert!(ran, "{first_log}\n{}", read("second.log"));
    assert!(
        first_log.contains("No space left on device") && first_log.contains("to retry"),
        "{first_log}"
    );
    let first: Value = serde_json::from_str(&read("first.json")).unwrap();
    let listing = read("first.ls");
    assert!(!listing.contains(".tmp"), "{listing}");
    let newest = listing
        .lines()
        .filter(|n| n.ends_with(".json"))
        .max()
        .unwrap()
        .trim_end_matches(".json");
    assert_eq!(
        restored(&read("second.log")),
        Some((newest.to_string(), first["train_steps"].as_u64().unwrap()))
    );
}

#[test]
fn another_models_saves_leave_the_first_models_newest_checkpoint() {
    let hapt = util::shipped_classifier();
    let cnn = Classifier::load(
        &util::path("tests/data/models/cnn_gemm_softmax.onnx"),
        &HeadSelection::default(),
    )
    .unwrap();
    let dir = tempdir();
    let mut first = util::checkpoint_store(dir.path(), &hapt, 2);
    let learner = util::stepping_learner(&hapt, 1);
    for _ in 0..3 {
        first.save(&saved(&learner)).unwrap();
    }
    // A trial of another model on the same directory, keeping one of its own.
    let mut trial = util::checkpoint_store(dir.path(), &cnn, 1);
    let other = util::stepping_learner(&cnn, 1);
    for _ in 0..5 {
        trial.save(&saved(&other)).unwrap();
    }
    assert_eq!(
        names(dir.path(), ".json"),
        [
            "ckpt-0000000002.json",
            "ckpt-0000000003.json",
            "ckpt-0000000008.json"
        ],
        "the trial pruned its own checkpoints only"
    );
    // Switching back resumes the first model's adaptation.
    let back = util::checkpoint_store(dir.path(), &hapt, 2);
    let mut resumed = util::stepping_learner(&hapt, 1);
    let restored = back.restore_latest(&mut resumed).expect("restored");
    assert_eq!(restored.manifest.sequence, 3);
}

#[test]
fn a_deleted_checkpoint_directory_is_created_again_by_the_next_save() {
    let c = util::shipped_classifier();
    let dir = tempdir();
    let ck = dir.path().join("ck");
    let mut store = util::checkpoint_store(&ck, &c, 3);
    let learner = util::stepping_learner(&c, 1);
    store.save(&saved(&learner)).unwrap();
    std::fs::remove_dir_all(&ck).unwrap();
    let m = store.save(&saved(&learner)).unwrap();
    assert_eq!(m.sequence, 2);
    assert_eq!(names(&ck, ".json"), ["ckpt-0000000002.json"]);
    assert!(store.latest_valid().is_some());
}

/// A daemon with its state directory in `dir`, obeying `checkpoint` and `export`, and a peer
/// watching its metrics.
fn daemon_with_commands(
    dir: &Path,
    broker: &Broker,
    prefix: &str,
) -> (Daemon, MqttPeer, PathBuf, String) {
    let state = dir.join("state");
    let cfg = daemon_config(
        dir,
        broker,
        prefix,
        "[control]\nallow = [\"checkpoint\", \"export\"]\n",
    );
    let daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "storage", &[&metrics]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    (daemon, peer, state, metrics)
}

/// The newest metrics message once `done` holds for it (panics after 30 s: a debug build
/// sharing two cores with other tests is slow).
fn metrics_when(peer: &MqttPeer, metrics: &str, done: impl Fn(&Value) -> bool) -> Value {
    let got = peer.collect_until(Duration::from_secs(30), |m| {
        last_metrics(m, metrics).is_some_and(|v| done(&v))
    });
    let m = last_metrics(&got, metrics).expect("metrics arrive");
    assert!(done(&m), "not reached within 30 s: {m}");
    m
}

#[test]
fn the_daemon_keeps_saving_after_its_state_directory_is_deleted() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/storage-rm";
    let (mut daemon, peer, state, metrics) = daemon_with_commands(dir.path(), &broker, prefix);
    let cmd = format!("{prefix}/cmd");
    peer.publish(&cmd, "checkpoint");
    metrics_when(&peer, &metrics, |v| num(v, "checkpoints_total") >= 1.0);
    std::fs::remove_dir_all(&state).unwrap();
    peer.publish(&cmd, "checkpoint");
    let m = metrics_when(&peer, &metrics, |v| num(v, "checkpoints_total") >= 2.0);
    assert_eq!(num(&m, "checkpoint_failures_total"), 0.0, "{m}");
    assert!(num(&m, "checkpoint_bytes_total") > 0.0, "{m}");
    let c = util::shipped_classifier();
    let (saved, _) = util::checkpoint_store(&state, &c, 3)
        .latest_valid()
        .expect("a valid checkpoint in the recreated directory");
    assert_eq!(saved.sequence, 2);
    assert!(daemon.terminate().0.success());
    let log = daemon.log_text();
    assert!(log.contains("was gone; created it again"), "{log}");
}

#[test]
fn a_failed_export_is_counted_and_leaves_no_temporary_file() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/storage-export";
    let (mut daemon, peer, state, metrics) = daemon_with_commands(dir.path(), &broker, prefix);
    // adapted.onnx cannot be replaced: a directory is in the way.
    std::fs::create_dir_all(state.join("adapted.onnx")).unwrap();
    std::fs::write(state.join("adapted.onnx").join("keep"), b"").unwrap();
    peer.publish(&format!("{prefix}/cmd"), "export");
    let m = metrics_when(&peer, &metrics, |v| num(v, "export_failures_total") >= 1.0);
    assert_eq!(num(&m, "export_failures_total"), 1.0, "{m}");
    assert_eq!(num(&m, "exports_total"), 0.0, "{m}");
    assert_eq!(names(&state, ".tmp"), Vec::<String>::new());
    assert!(daemon.terminate().0.success());
    let log = daemon.log_text();
    assert!(log.contains("export failed"), "{log}");
}

#[test]
fn a_save_that_keeps_failing_logs_one_error_a_minute_and_counts_every_failure() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/storage-fail";
    let state = dir.path().join("state");
    let cfg = daemon_config(
        dir.path(),
        &broker,
        prefix,
        "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 1\nmin_interval_s = 0\n\
         max_mib_per_day = 100000\n",
    );
    let mut daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "storage", &[&metrics]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    // A file where the directory was: no save can create it again.
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::write(&state, b"").unwrap();
    for s in util::stream(60) {
        peer.publish(&format!("{prefix}/samples"), s.to_string());
    }
    let m = metrics_when(&peer, &metrics, |v| {
        num(v, "checkpoint_failures_total") >= 10.0
    });
    assert_eq!(num(&m, "checkpoints_total"), 0.0, "{m}");
    assert!(daemon.terminate().0.success());
    let log = daemon.log_text();
    let errors = log
        .lines()
        .filter(|l| l.contains("checkpoint not written"))
        .count();
    assert_eq!(errors, 1, "one line for a minute of failures:\n{log}");
}

#[test]
fn a_daemon_learning_at_full_speed_under_the_default_budget_writes_only_its_final_checkpoint() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/storage-default";
    let state = dir.path().join("state");
    // Every sample a step: 200 steps were two checkpoints under the old step-based policy
    // (every_steps = 100), a checkpoint every 1.3 s at 300 samples/s.
    let cfg = daemon_config(dir.path(), &broker, prefix, "[learn]\ntrain_every = 1\n");
    let mut daemon = Daemon::start(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(broker.port, "storage", &[&metrics]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    for s in util::stream(200) {
        peer.publish(&format!("{prefix}/samples"), s.to_string());
    }
    // Steps deferred while inference was busy are owed, at most 256 of them: wait for the
    // queues to empty, with well over every_steps taken.
    let m = metrics_when(&peer, &metrics, |v| {
        num(v, "samples_total") >= 200.0
            && num(v, "train_queue") == 0.0
            && num(v, "train_steps") >= 150.0
    });
    assert_eq!(
        num(&m, "checkpoints_total"),
        0.0,
        "min_interval_s = 600 holds: {m}"
    );
    assert!(daemon.terminate().0.success());
    assert_eq!(
        names(&state, ".json").len(),
        1,
        "the final save at shutdown does not wait for the interval"
    );
    let (saved, _) = util::checkpoint_store(&state, &util::shipped_classifier(), 3)
        .latest_valid()
        .unwrap();
    assert!(saved.counters.train_steps >= num(&m, "train_steps") as u64);
}

/// A checkpoint directory holding one checkpoint of the shipped model.
fn one_checkpoint(dir: &Path) -> PathBuf {
    let c = util::shipped_classifier();
    let ck = dir.join("ck");
    util::checkpoint_store(&ck, &c, 3)
        .save(&saved(&util::stepping_learner(&c, 1)))
        .unwrap();
    ck
}

#[test]
fn a_failed_export_from_the_command_line_leaves_no_temporary_file() {
    let dir = tempdir();
    let ck = one_checkpoint(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("adapted.onnx").join("in-the-way")).unwrap();
    let result = edgemt()
        .args(["export", "--checkpoint"])
        .arg(&ck)
        .arg("-o")
        .arg(out.join("adapted.onnx"))
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert_eq!(names(&out, ".tmp"), Vec::<String>::new());
}

#[test]
fn an_export_removes_the_temporary_file_a_killed_export_left() {
    let dir = tempdir();
    let ck = one_checkpoint(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let stale = out.join(".adapted.onnx.Xy12ab.tmp");
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    run_ok(
        edgemt()
            .args(["export", "--checkpoint"])
            .arg(&ck)
            .arg("-o")
            .arg(out.join("adapted.onnx")),
    );
    assert!(!stale.exists());
    assert_eq!(names(&out, ".tmp"), Vec::<String>::new());
    assert!(out.join("adapted.onnx").exists());
}

#[test]
fn a_busy_learner_saves_no_sooner_than_the_minimum_interval_but_a_request_does_not_wait() {
    let t0 = Instant::now();
    let min = Duration::from_secs(600);
    let mut policy = CheckpointPolicy::new(20, Duration::from_secs(3600), min, t0);
    let soon = t0 + Duration::from_secs(30);
    assert!(!policy.due(1000, soon), "1000 steps, but 30 s after start");
    assert!(policy.due(1000, t0 + min));
    policy.saved(1000, t0 + min);
    policy.request();
    assert!(policy.due(1000, t0 + min), "a request is saved at once");
    policy.saved(1000, t0 + min);
    assert!(!policy.due(1019, t0 + 2 * min), "19 steps: not yet");
    assert!(policy.due(1020, t0 + 2 * min));
    assert!(
        policy.due(1001, t0 + min + Duration::from_secs(3600)),
        "an hour and anything changed"
    );
}

#[test]
fn the_writer_defers_what_the_budget_does_not_allow_and_writes_the_newest_deferred_state_later() {
    let c = util::shipped_classifier();
    let dir = tempdir();
    let learner = util::stepping_learner(&c, 1);
    let at_step = |steps: u64| {
        let mut state = saved(&learner);
        state.learner.counters.train_steps = steps;
        state
    };
    // One checkpoint on disk tells the next writer the size to expect.
    util::checkpoint_store(dir.path(), &c, 3)
        .save(&at_step(0))
        .unwrap();
    let store = util::checkpoint_store(dir.path(), &c, 3);
    let one = store.last_bytes().unwrap() as f64;
    // A bucket of one and a half checkpoints (an hour's worth of the daily budget).
    let mib_per_day = 1.5 * one * 24.0 / (1024.0 * 1024.0);
    let t0 = Instant::now();
    let mut writer = CheckpointWriter::new(store, mib_per_day, t0);
    assert!(matches!(
        writer.offer(at_step(1), t0).unwrap(),
        Offered::Written(_)
    ));
    for steps in [2, 3] {
        match writer.offer(at_step(steps), t0).unwrap() {
            // Half a checkpoint missing, refilled at 1.5 checkpoints an hour: 20 minutes.
            Offered::Deferred { wait_s } => assert!((wait_s - 1200.0).abs() < 1.0, "{wait_s}"),
            Offered::Written(m) => panic!("written beyond the budget: {}", m.sequence),
        }
    }
    assert!(writer.poll(t0 + Duration::from_secs(1100)).is_none());
    let m = writer
        .poll(t0 + Duration::from_secs(1300))
        .expect("the budget allows it now")
        .unwrap();
    assert_eq!(m.counters.train_steps, 3, "the newest deferred state");
    assert!(!writer.has_pending());
    // Deferred again, and written at the end whatever the budget says.
    let later = t0 + Duration::from_secs(1301);
    assert!(matches!(
        writer.offer(at_step(4), later).unwrap(),
        Offered::Deferred { .. }
    ));
    let last = writer.finish(None, later).unwrap().unwrap();
    assert_eq!(last.counters.train_steps, 4);
    let totals = writer.totals();
    assert_eq!((totals.written, totals.deferred), (3, 3));
    assert!(totals.bytes as f64 >= 3.0 * one * 0.99);
}

#[test]
fn replay_at_full_speed_saves_no_more_often_than_the_minimum_interval() {
    let dir = tempdir();
    let cfg = util::config_with(
        dir.path(),
        "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 1\nmin_interval_s = 1\n\
         max_mib_per_day = 100000\n",
    );
    let (report, took) = replay(&cfg, &dir.path().join("ck"), &dir.path().join("r.json"));
    let written = report["checkpoints_written"].as_u64().unwrap();
    // One a second at most, plus the final one.
    let most = took.as_secs() + 1;
    assert!(
        (1..=most).contains(&written),
        "{written} checkpoints in {took:?} (every step was due)"
    );
}

#[test]
fn replay_at_full_speed_writes_no_more_bytes_than_the_daily_budget_allows() {
    let dir = tempdir();
    // 2.4 MiB a day: a bucket of 0.1 MiB, refilled at 29 bytes a second.
    let mib_per_day = 2.4;
    let cfg = util::config_with(
        dir.path(),
        &format!(
            "[learn]\ntrain_every = 1\n[checkpoint]\nevery_steps = 1\nmin_interval_s = 0\n\
             max_mib_per_day = {mib_per_day}\n"
        ),
    );
    let ck = dir.path().join("ck");
    let (report, took) = replay(&cfg, &ck, &dir.path().join("r.json"));
    let written = report["checkpoints_written"].as_u64().unwrap();
    let bytes = report["checkpoint_bytes_written"].as_u64().unwrap() as f64;
    let newest = ck.join(names(&ck, ".json").pop().unwrap());
    let largest = (std::fs::metadata(&newest).unwrap().len()
        + std::fs::metadata(newest.with_extension("safetensors"))
            .unwrap()
            .len()) as f64;
    let per_day = mib_per_day * 1024.0 * 1024.0;
    // The bucket, its refill while the replay ran, one save that outgrew the estimate and the
    // final save, which the budget does not stop.
    let allowed = per_day / 24.0 + per_day / 86_400.0 * took.as_secs_f64() + 2.0 * largest;
    assert!(
        bytes <= allowed,
        "{bytes} bytes in {written} checkpoints over {took:?}, budget {allowed}"
    );
    assert!(written >= 2, "{written}");
    // The final state is written whatever the budget: the newest checkpoint has every step.
    let store = util::checkpoint_store(&ck, &util::shipped_classifier(), 3);
    let (m, _) = store.latest_valid().unwrap();
    assert_eq!(
        Some(m.counters.train_steps),
        report["train_steps"].as_u64(),
        "{report}"
    );
}
