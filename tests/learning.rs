//! The learner's arithmetic: losses against hand computation, gradients against finite
//! differences, optimizer and EMA updates, buffers, augmentations and the non-finite guard.

use edgemt::learn::augment::{Augmenter, Layout};
use edgemt::learn::buffer::{LabeledBuffer, SampleRing};
use edgemt::learn::loss::{loss_and_grad, Batch, Gradients, LossWeights, Scratch};
use edgemt::learn::optim::{ema_update, rampup, warmed_up_decay, Optimizer, OptimizerKind};
use edgemt::learn::pseudo::{Balance, PseudoLabeler};
use edgemt::learn::rng::Rng;
use edgemt::learn::{AugmentConfig, ConsistencyMode, LinearHead};
use ndarray::{array, Array1, Array2};

use crate::util;

fn identity_head() -> LinearHead {
    LinearHead::new(array![[1.0, 0.0], [0.0, 1.0]], array![0.0, 0.0])
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn loss_parts_match_hand_computed_values() {
    let ln3 = 3f32.ln();
    let labeled = array![[ln3, 0.0]]; // p = [3/4, 1/4], label 0: CE = -ln(3/4)
    let unlabeled = array![[0.0, 0.0], [ln3, 0.0]]; // row 0: p = [1/2, 1/2], pseudo 1: CE = ln 2
    let aug_a = array![[ln3, 0.0], [0.0, 0.0]];
    let aug_b = array![[0.0, 0.0], [0.0, 0.0]];
    let batch = Batch {
        labeled: labeled.view(),
        labels: &[0],
        unlabeled: unlabeled.view(),
        pseudo: &[Some(1), None],
        aug_a: aug_a.view(),
        aug_b: aug_b.view(),
    };
    let w = LossWeights {
        lambda: 2.0,
        alpha: 4.0,
        consistency: ConsistencyMode::Student,
    };
    let head = identity_head();
    let mut grad = Gradients::zeros_like(&head);
    let parts = loss_and_grad(&head, &head, &batch, &w, &mut Scratch::default(), &mut grad);

    let sup = -(0.75f32).ln(); // 0.287682
    let pseudo = 2f32.ln() / 2.0; // summed over accepted, divided by N_u = 2
    let consistency = (0.25f32.powi(2) * 2.0) / 2.0; // ‖[.25, -.25]‖² on row 0, 0 on row 1, / 2
    assert!(close(parts.sup, sup, 1e-6), "sup {}", parts.sup);
    assert!(close(parts.pseudo, pseudo, 1e-6), "pseudo {}", parts.pseudo);
    assert!(
        close(parts.consistency, consistency, 1e-6),
        "consistency {}",
        parts.consistency
    );
    assert!(
        close(parts.total, sup + 2.0 * pseudo + 4.0 * consistency, 1e-5),
        "total {}",
        parts.total
    );
    assert!(close(parts.total, 1.230829, 1e-5));
}

/// A random problem: 3 classes, 5 features, every term active.
struct Problem {
    labeled: Array2<f32>,
    labels: Vec<usize>,
    unlabeled: Array2<f32>,
    pseudo: Vec<Option<usize>>,
    aug_a: Array2<f32>,
    aug_b: Array2<f32>,
}

fn random(rng: &mut Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.normal())
}

fn problem(seed: u64) -> (LinearHead, LinearHead, Problem) {
    let mut rng = Rng::new(seed);
    let student = LinearHead::new(
        random(&mut rng, 3, 5) * 0.5,
        Array1::from_shape_fn(3, |_| rng.normal() * 0.1),
    );
    let teacher = LinearHead::new(random(&mut rng, 3, 5) * 0.5, Array1::zeros(3));
    let p = Problem {
        labeled: random(&mut rng, 4, 5),
        labels: vec![0, 2, 1, 2],
        unlabeled: random(&mut rng, 6, 5),
        pseudo: vec![Some(1), None, Some(0), Some(2), None, Some(1)],
        aug_a: random(&mut rng, 6, 5),
        aug_b: random(&mut rng, 6, 5),
    };
    (student, teacher, p)
}

impl Problem {
    fn batch(&self) -> Batch<'_> {
        Batch {
            labeled: self.labeled.view(),
            labels: &self.labels,
            unlabeled: self.unlabeled.view(),
            pseudo: &self.pseudo,
            aug_a: self.aug_a.view(),
            aug_b: self.aug_b.view(),
        }
    }
}

fn total(student: &LinearHead, teacher: &LinearHead, p: &Problem, w: &LossWeights) -> f32 {
    let batch = p.batch();
    let mut g = Gradients::zeros_like(student);
    loss_and_grad(student, teacher, &batch, w, &mut Scratch::default(), &mut g).total
}

fn check_gradient(mode: ConsistencyMode) {
    let (student, teacher, p) = problem(7);
    let w = LossWeights {
        lambda: 0.7,
        alpha: 3.0,
        consistency: mode,
    };
    let batch = p.batch();
    let mut grad = Gradients::zeros_like(&student);
    let parts = loss_and_grad(
        &student,
        &teacher,
        &batch,
        &w,
        &mut Scratch::default(),
        &mut grad,
    );
    assert!(parts.consistency > 0.0 && parts.pseudo > 0.0 && parts.sup > 0.0);

    let eps = 1e-2f32;
    let mut worst = 0.0f32;
    for i in 0..3 {
        for j in 0..6 {
            // j == 5 stands for the bias of class i.
            let mut plus = student.clone();
            let mut minus = student.clone();
            if j < 5 {
                plus.weight[[i, j]] += eps;
                minus.weight[[i, j]] -= eps;
            } else {
                plus.bias[i] += eps;
                minus.bias[i] -= eps;
            }
            let numeric =
                (total(&plus, &teacher, &p, &w) - total(&minus, &teacher, &p, &w)) / (2.0 * eps);
            let analytic = if j < 5 {
                grad.weight[[i, j]]
            } else {
                grad.bias[i]
            };
            let err = (numeric - analytic).abs() / (1e-2 + numeric.abs().max(analytic.abs()));
            worst = worst.max(err);
        }
    }
    assert!(
        worst < 1e-2,
        "{mode:?}: worst relative gradient error {worst}"
    );
}

#[test]
fn gradients_match_finite_differences_with_student_consistency() {
    check_gradient(ConsistencyMode::Student);
}

#[test]
fn gradients_match_finite_differences_with_mean_teacher_consistency() {
    check_gradient(ConsistencyMode::Teacher);
}

#[test]
fn rejected_pseudo_labels_add_no_loss_but_still_count_in_the_denominator() {
    let (student, teacher, mut p) = problem(3);
    let w = LossWeights {
        lambda: 1.0,
        alpha: 0.0,
        consistency: ConsistencyMode::Student,
    };
    let with_all = total(&student, &teacher, &p, &w);
    p.pseudo = vec![None; 6];
    let none = total(&student, &teacher, &p, &w);
    assert!(with_all > none, "accepted pseudo-labels add loss");
    // Keeping only one accepted sample: its CE divided by the full N_u = 6.
    p.pseudo = vec![Some(1), None, None, None, None, None];
    let one = total(&student, &teacher, &p, &w) - none;
    let probs = student.probs(p.unlabeled.view());
    assert!(close(one, -probs[[0, 1]].ln() / 6.0, 1e-5), "{one}");
}

#[test]
fn ema_moves_the_teacher_a_fraction_one_minus_m_toward_the_student() {
    let mut teacher = LinearHead::new(array![[1.0, 2.0]], array![0.0]);
    let student = LinearHead::new(array![[3.0, -2.0]], array![4.0]);
    ema_update(&mut teacher, &student, 0.75);
    assert_eq!(teacher.weight, array![[1.5, 1.0]]);
    assert_eq!(teacher.bias, array![1.0]);
    ema_update(&mut teacher, &student, 1.0);
    assert_eq!(
        teacher.weight,
        array![[1.5, 1.0]],
        "m = 1 freezes the teacher"
    );
}

#[test]
fn ema_decay_warms_up_and_ramp_reaches_one() {
    assert!(close(warmed_up_decay(0.99, 0), 0.1, 1e-7));
    assert!(close(warmed_up_decay(0.99, 10), 11.0 / 20.0, 1e-7));
    assert!(close(warmed_up_decay(0.99, 10_000), 0.99, 1e-7));
    assert!(close(rampup(0, 100), (-5f32).exp(), 1e-7));
    assert!(rampup(50, 100) < rampup(90, 100));
    assert_eq!(rampup(100, 100), 1.0);
    assert_eq!(rampup(3, 0), 1.0);
}

#[test]
fn adam_first_step_moves_each_parameter_by_the_learning_rate_against_its_gradient() {
    let mut head = LinearHead::new(array![[0.0, 0.0]], array![0.0]);
    let mut opt = Optimizer::new(OptimizerKind::Adam, 0.0, &head);
    let grad = Gradients {
        weight: array![[2.0, -0.5]],
        bias: array![0.0],
    };
    opt.step(&mut head, &grad, 0.01);
    assert!(close(head.weight[[0, 0]], -0.01, 1e-6) && close(head.weight[[0, 1]], 0.01, 1e-6));
    assert_eq!(head.bias[0], 0.0);
}

#[test]
fn sgd_with_momentum_accumulates_velocity() {
    let mut head = LinearHead::new(array![[1.0]], array![0.0]);
    let mut opt = Optimizer::new(OptimizerKind::Sgd, 0.5, &head);
    let grad = Gradients {
        weight: array![[1.0]],
        bias: array![0.0],
    };
    opt.step(&mut head, &grad, 0.1); // v = 1, w = 0.9
    opt.step(&mut head, &grad, 0.1); // v = 1.5, w = 0.75
    assert!(close(head.weight[[0, 0]], 0.75, 1e-6));
}

#[test]
fn labeled_buffer_keeps_classes_balanced_and_bounded() {
    let mut buf = LabeledBuffer::new(3, 2, 1, 1);
    for _ in 0..10 {
        buf.push(&[0.0], array![0.0].view(), 0);
    }
    buf.push(&[1.0], array![1.0].view(), 2);
    assert_eq!(
        buf.class_counts(),
        vec![2, 0, 1],
        "class 0 is capped, class 2 kept"
    );
    let mut rng = Rng::new(1);
    let mut picks = Vec::new();
    buf.sample(1000, &mut rng, &mut picks);
    let rare = picks.iter().filter(|(c, _)| *c == 2).count();
    assert!(
        (400..600).contains(&rare),
        "the single class-2 sample is drawn about half the time: {rare}"
    );
}

#[test]
fn unlabeled_ring_overwrites_the_oldest_sample() {
    let mut ring = SampleRing::new(2, 1, 1);
    assert!(!ring.push(&[1.0], array![1.0].view(), None));
    assert!(!ring.push(&[2.0], array![2.0].view(), Some(0)));
    assert!(
        ring.push(&[3.0], array![3.0].view(), None),
        "third push evicts"
    );
    assert_eq!(ring.len(), 2);
    assert_eq!(ring.input(0), &[3.0]);
    assert_eq!(ring.truth(1), Some(0));
}

#[test]
fn augmentations_are_seeded_and_shift_along_time() {
    let shape = [8usize, 2];
    let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let cfg = AugmentConfig {
        jitter: 0.05,
        scale: 0.1,
        max_shift: 2,
        time_axis: None,
    };
    let mut a = Augmenter::new(cfg.clone(), &shape);
    let (mut out1, mut out2) = (vec![0.0; 16], vec![0.0; 16]);
    a.apply(&x, &mut out1, &mut Rng::new(5));
    a.apply(&x, &mut out2, &mut Rng::new(5));
    assert_eq!(out1, out2, "same seed, same augmentation");
    a.apply(&x, &mut out2, &mut Rng::new(6));
    assert_ne!(out1, out2);

    // Shift only: the output is the input moved along time with edges repeated.
    let mut shift_only = Augmenter::new(
        AugmentConfig {
            jitter: 0.0,
            scale: 0.0,
            max_shift: 3,
            time_axis: None,
        },
        &shape,
    );
    let mut out = vec![0.0; 16];
    shift_only.apply(&x, &mut out, &mut Rng::new(11));
    let channel0: Vec<f32> = out.iter().step_by(2).copied().collect();
    let steps: Vec<f32> = channel0.iter().map(|v| v / 2.0).collect();
    assert!(
        steps
            .windows(2)
            .all(|w| w[1] - w[0] == 0.0 || w[1] - w[0] == 1.0),
        "{steps:?}"
    );

    assert_eq!(Layout::for_shape(&[64, 6], None).channels, 6);
    assert_eq!(Layout::for_shape(&[6, 64], None).steps, 64);
    assert_eq!(Layout::for_shape(&[384], None).channels, 1);
}

#[test]
fn distribution_alignment_makes_an_over_predicted_class_harder_to_accept() {
    let mut aligned = PseudoLabeler::new(2, 0.9, Balance::DistributionAlignment, 0.0);
    let mut plain = PseudoLabeler::new(2, 0.9, Balance::None, 0.0);
    // The teacher says class 0 for everything, with 0.92 confidence.
    let probs = Array2::from_shape_fn((8, 2), |(_, j)| if j == 0 { 0.92 } else { 0.08 });
    let (mut a, mut b) = (Vec::new(), Vec::new());
    plain.label(&mut probs.clone(), &mut b);
    aligned.label(&mut probs.clone(), &mut a);
    assert!(b.iter().all(|p| *p == Some(0)));
    assert!(
        a.iter().all(Option::is_none),
        "aligned: class 0 is what it always says, so not accepted"
    );
}

#[test]
fn a_non_finite_embedding_never_reaches_the_weights() {
    let mut c = util::shipped_classifier();
    let mut learner = util::stepping_learner(&c, 1);
    let x = vec![0.5f32; c.sample_len()];
    let mut emb = c.backbone.embed(&x, 1).unwrap();
    emb[[0, 3]] = f32::INFINITY;
    learner.observe(&x, emb.row(0), Some(2), None);
    let before = learner.student.clone();
    let report = learner.step(&mut c.backbone).unwrap();
    assert!(report.is_none(), "the step is skipped");
    assert_eq!(learner.counters.skipped_nonfinite, 1);
    assert_eq!(learner.counters.train_steps, 0);
    assert_eq!(learner.student, before);
    assert!(learner.student.is_finite() && learner.teacher.is_finite());
}

#[test]
fn a_step_refreshes_the_teacher_and_counts_versions() {
    let mut c = util::shipped_classifier();
    let head = c.pretrained_head();
    let mut learner = util::stepping_learner(&c, 2);
    let mut rng = Rng::new(2);
    for i in 0..8 {
        let x: Vec<f32> = (0..c.sample_len()).map(|_| rng.normal()).collect();
        let emb = c.backbone.embed(&x, 1).unwrap();
        learner.observe(&x, emb.row(0), (i % 3 == 0).then_some(i % 6), None);
        assert!(learner.due());
        learner.step(&mut c.backbone).unwrap().expect("finite step");
    }
    assert_eq!(learner.counters.train_steps, 8);
    assert_eq!(learner.counters.ema_updates, 4, "every second step");
    assert_eq!(learner.counters.teacher_version, 4);
    assert!(learner.student.distance(&head) > 0.0 && learner.teacher.distance(&head) > 0.0);
    assert_eq!(learner.source, head, "the pretrained head is never trained");
}
