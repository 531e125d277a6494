//! The rollback guard on a recording with a misleading stretch: without the guard the
//! teacher's accuracy drops; with it the drop is reverted.

use edgemt::learn::guard::{GuardConfig, RollbackGuard, Verdict};
use edgemt::nn::Mlp;
use ndarray::{array, Array2};
use serde_json::Value;

use crate::util::{self, edgemt, run_ok, tempdir};

/// The target stream, then its first 400 samples again with every 2nd labeled with a
/// consistently wrong class (the same recording tools/model/make_misleading.py writes).
pub(crate) fn misleading_recording(path: &std::path::Path) {
    let wrong = [1, 2, 0, 4, 3, 3];
    let text = std::fs::read_to_string(util::path("data/target_stream.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut out: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
    for (i, s) in lines.iter().take(400).enumerate() {
        let mut s = s.clone();
        let obj = s.as_object_mut().unwrap();
        obj.remove("label");
        if i % 2 == 0 {
            let truth = obj["truth"].as_u64().unwrap() as usize;
            obj.insert("label".into(), Value::from(wrong[truth]));
        }
        out.push(s.to_string());
    }
    std::fs::write(path, out.join("\n")).unwrap();
}

fn replay(dir: &std::path::Path, recording: &std::path::Path, guard: bool) -> Value {
    let cfg = util::config_with(dir, &format!("[guard]\nenabled = {guard}\n"));
    let report = dir.join(format!("r-{guard}.json"));
    run_ok(
        edgemt()
            .args(["replay", "--config"])
            .arg(cfg)
            .arg(recording)
            .arg("--eval")
            .arg(util::path("data/target_holdout.jsonl"))
            .arg("--report")
            .arg(&report),
    );
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

/// Two classes on x₀'s sign: class 0 where x₀ is (roughly) past `shift`, whichever way the
/// weights are read.
fn sign_head(shift: f32) -> Mlp {
    Mlp::new(vec![(array![[1.0, 0.0], [-1.0, 0.0]], array![-shift, 0.0])]).unwrap()
}

/// Class 1 for every input.
fn one_class_head() -> Mlp {
    Mlp::new(vec![(array![[0.0, 0.0], [0.0, 0.0]], array![0.0, 5.0])]).unwrap()
}

#[test]
fn the_guard_reverts_the_damage_of_a_stretch_of_mislabeled_feedback() {
    let dir = tempdir();
    let misleading = dir.path().join("misleading.jsonl");
    misleading_recording(&misleading);
    let clean = replay(dir.path(), &util::path("data/target_stream.jsonl"), true);
    let unguarded = replay(dir.path(), &misleading, false);
    let guarded = replay(dir.path(), &misleading, true);
    let acc = |r: &Value| r["eval"]["teacher_accuracy"].as_f64().unwrap();
    let source = clean["eval"]["source_accuracy"].as_f64().unwrap();
    assert!(
        acc(&unguarded) < acc(&clean) - 0.08,
        "without the guard the teacher drops: {} vs {}",
        acc(&unguarded),
        acc(&clean)
    );
    assert!(
        acc(&guarded) >= acc(&clean) - 0.02,
        "with the guard the drop is reverted: {} vs {}",
        acc(&guarded),
        acc(&clean)
    );
    assert!(acc(&guarded) > source + 0.05);
    assert!(guarded["rollbacks"].as_u64().unwrap() >= 1);
    assert_eq!(unguarded["rollbacks"].as_u64().unwrap(), 0);
}

#[test]
fn a_teacher_that_predicts_one_class_for_everything_is_judged_collapsed() {
    let source = sign_head(0.0);
    let collapsed = one_class_head();
    // Recent embeddings on both sides of the source's boundary.
    let recent = Array2::from_shape_fn((64, 2), |(i, j)| {
        if j == 0 {
            if i % 2 == 0 {
                1.0
            } else {
                -1.0
            }
        } else {
            0.0
        }
    });
    let mut guard = RollbackGuard::new(GuardConfig::default());
    match guard.judge(&collapsed, &source, &source, recent.view()) {
        Verdict::Collapsed {
            teacher_entropy,
            source_entropy,
        } => {
            assert_eq!(teacher_entropy, 0.0);
            assert!((source_entropy - 2f32.ln()).abs() < 1e-6);
        }
        other => panic!("expected a collapse, got {other:?}"),
    }
    assert!(matches!(
        guard.judge(&source, &source, &source, recent.view()),
        Verdict::Pass { .. }
    ));
}

#[test]
fn labels_the_last_good_teacher_almost_never_agrees_with_are_judged_misleading() {
    let good = sign_head(0.0);
    let mut guard = RollbackGuard::new(GuardConfig {
        min_trusted: 2,
        min_pending: 3,
        ..GuardConfig::default()
    });
    // Trusted: labels that agree with the good teacher.
    for (x, y) in [(1.0, 0), (-1.0, 1)] {
        guard.hold_out(array![x, 0.0].view(), y);
    }
    guard.promote();
    assert_eq!(guard.trusted.len(), 2);
    // Pending: the same inputs, labeled the other way round.
    for (x, y) in [(1.0, 1), (-1.0, 0), (2.0, 1)] {
        guard.hold_out(array![x, 0.0].view(), y);
    }
    let empty = Array2::zeros((0, 2));
    match guard.judge(&good, &good, &good, empty.view()) {
        Verdict::Misleading { agreement, pending } => assert_eq!((agreement, pending), (0.0, 3)),
        other => panic!("expected misleading labels, got {other:?}"),
    }
    guard.discard_pending();
    assert!(guard.pending.is_empty() && guard.rollbacks == 1);
}

/// Eight labels (x₀, class) the good head gets all right and the moved teacher 6 of.
const EIGHT_LABELS: [(f32, usize); 8] = [
    (0.5, 0),
    (0.6, 0),
    (2.0, 0),
    (3.0, 0),
    (-1.0, 1),
    (-2.0, 1),
    (-3.0, 1),
    (-4.0, 1),
];

/// A guard whose trusted labels are `labeled` (x₀ and class; x₁ = 0).
fn guard_trusting(labeled: &[(f32, usize)], margin: f32) -> RollbackGuard {
    let mut guard = RollbackGuard::new(GuardConfig {
        min_trusted: 2,
        min_pending: 1,
        margin,
        ..GuardConfig::default()
    });
    for &(x, y) in labeled {
        guard.hold_out(array![x, 0.0].view(), y);
    }
    guard.promote();
    assert_eq!(guard.trusted.len(), labeled.len());
    guard
}

#[test]
fn a_teacher_that_gets_two_more_trusted_labels_wrong_than_the_last_good_one_is_judged_worse() {
    // The good head says class 0 for x₀ > 0; the teacher has moved its boundary to the right
    // (past 0.75 whichever way the weights are read), so it misses 0.5 and 0.6.
    let good = sign_head(0.0);
    let teacher = sign_head(1.5);
    let two_misses = EIGHT_LABELS;
    let mut guard = guard_trusting(&two_misses, 0.1);
    let empty = Array2::zeros((0, 2));
    match guard.judge(&teacher, &good, &good, empty.view()) {
        Verdict::Worse { teacher, good } => assert_eq!((teacher, good), (0.75, 1.0)),
        other => panic!("expected a regression, got {other:?}"),
    }
    // The same teacher against itself passes, with its accuracy reported.
    match guard.judge(&teacher, &teacher, &good, empty.view()) {
        Verdict::Pass { teacher, good } => assert_eq!((teacher, good), (0.75, 0.75)),
        other => panic!("expected a pass, got {other:?}"),
    }

    // One miss is over a small margin but is a single sample: not enough to roll back.
    let one_miss = &two_misses[1..];
    let mut guard = guard_trusting(one_miss, 0.05);
    match guard.judge(&teacher, &good, &good, empty.view()) {
        Verdict::Pass { teacher, good } => {
            assert_eq!(good, 1.0);
            assert!((teacher - 6.0 / 7.0).abs() < 1e-6, "{teacher}");
        }
        other => panic!("one sample is not a regression, got {other:?}"),
    }
}

#[test]
fn the_guard_withholds_every_nth_label_keeps_at_most_its_capacity_and_is_due_every_k_steps() {
    let mut guard = RollbackGuard::new(GuardConfig {
        holdout_every: 3,
        capacity: 4,
        check_every_steps: 10,
        ..GuardConfig::default()
    });
    let withheld: Vec<bool> = (0..7)
        .map(|i| guard.hold_out(array![i as f32, 0.0].view(), i % 2))
        .collect();
    assert_eq!(
        withheld,
        [false, false, true, false, false, true, false],
        "the 3rd and 6th labels are withheld from training"
    );
    // Capacity 4: the three oldest of the seven went.
    assert_eq!(guard.pending.len(), 4);
    assert!(!guard.pending.is_empty());
    assert_eq!(guard.pending.embeddings[0], vec![3.0, 0.0]);
    assert_eq!(Vec::from(guard.pending.labels.clone()), vec![1, 0, 1, 0]);
    let due: Vec<u64> = (1..=30).filter(|&s| guard.due(s)).collect();
    assert_eq!(due, vec![10, 20, 30]);

    // With holdout_every = 0 every label also trains; a disabled guard files nothing.
    let mut every = RollbackGuard::new(GuardConfig::default());
    assert!((0..6).all(|i| !every.hold_out(array![i as f32, 0.0].view(), 0)));
    let mut off = RollbackGuard::new(GuardConfig {
        enabled: false,
        holdout_every: 1,
        ..GuardConfig::default()
    });
    assert!(!off.hold_out(array![1.0, 0.0].view(), 0));
    assert!(off.pending.is_empty() && !off.due(10));
}

#[test]
fn the_guards_thresholds_are_strict_where_it_says_below_and_inclusive_where_it_says_at_least() {
    let good = sign_head(0.0);
    let teacher = sign_head(1.5);
    let empty = Array2::zeros((0, 2));
    // Exactly min_trusted (8) trusted labels are enough to judge; the teacher misses two:
    // 0.75 against 1.0.
    let eight = EIGHT_LABELS;
    let judged = |margin: f32| {
        let mut guard = guard_trusting(&eight, margin);
        guard.cfg.min_trusted = 8;
        let verdict = guard.judge(&teacher, &good, &good, empty.view());
        assert_eq!(guard.checks, 1);
        verdict
    };
    assert!(matches!(judged(0.1), Verdict::Worse { .. }));
    // Worse only when the teacher is more than the margin below: 0.75 + 0.25 is not < 1.0,
    // nor is 0.75 + 0.3.
    assert!(matches!(judged(0.25), Verdict::Pass { .. }));
    assert!(matches!(judged(0.3), Verdict::Pass { .. }));

    // Pending labels the good teacher agrees with exactly at min_agreement are not
    // misleading (two of four, min_agreement 0.5).
    let mut guard = guard_trusting(&eight, 0.1);
    guard.cfg.min_pending = 4;
    guard.cfg.min_agreement = 0.5;
    for (x, y) in [(1.0, 0), (-1.0, 1), (1.0, 1), (-1.0, 0)] {
        guard.hold_out(array![x, 0.0].view(), y);
    }
    assert!(matches!(
        guard.judge(&good, &good, &good, empty.view()),
        Verdict::Pass { .. }
    ));

    // A collapse needs at least 32 recent samples, and collapse_ratio 0 turns it off.
    let collapsed = one_class_head();
    let recent = |n: usize| {
        Array2::from_shape_fn((n, 2), |(i, j)| [1.0, -1.0][i % 2] * (j == 0) as u8 as f32)
    };
    let mut guard = RollbackGuard::new(GuardConfig::default());
    assert!(matches!(
        guard.judge(&collapsed, &good, &good, recent(31).view()),
        Verdict::Pass { .. }
    ));
    assert!(matches!(
        guard.judge(&collapsed, &good, &good, recent(32).view()),
        Verdict::Collapsed { .. }
    ));
    // A stretch of one activity (all recent samples on one side): the pretrained model sees
    // one class too, so a teacher that does the same has not collapsed (0 is not below 0).
    let one_sided = Array2::from_shape_fn((64, 2), |(_, j)| (j == 0) as u8 as f32);
    assert!(matches!(
        guard.judge(&good, &good, &good, one_sided.view()),
        Verdict::Pass { .. }
    ));
    let mut off = RollbackGuard::new(GuardConfig {
        collapse_ratio: 0.0,
        ..GuardConfig::default()
    });
    assert!(matches!(
        off.judge(&collapsed, &good, &good, recent(64).view()),
        Verdict::Pass { .. }
    ));
}

#[test]
fn pending_labels_are_promoted_while_the_trusted_set_is_being_built_then_only_in_full_batches() {
    let mut guard = RollbackGuard::new(GuardConfig {
        min_trusted: 2,
        min_pending: 3,
        ..GuardConfig::default()
    });
    let file = |guard: &mut RollbackGuard, n: usize| {
        for i in 0..n {
            guard.hold_out(array![i as f32, 0.0].view(), 0);
        }
        guard.promote();
        (guard.trusted.len(), guard.pending.len())
    };
    assert_eq!(file(&mut guard, 1), (1, 0), "building: promoted at once");
    assert_eq!(file(&mut guard, 1), (2, 0), "building: promoted at once");
    assert_eq!(file(&mut guard, 2), (2, 2), "built: two of three wait");
    assert_eq!(file(&mut guard, 1), (5, 0), "three pending: promoted");
}
