//! The learner's arithmetic: losses against hand computation, gradients against finite
//! differences (1, 2 and 3 layers), optimizer and EMA updates, buffers, augmentations and the
//! non-finite guard.

use edgemt::learn::augment::Augmenter;
use edgemt::learn::buffer::{LabeledBuffer, SampleRing};
use edgemt::learn::loss::{loss_and_grad, Batch, LossWeights, Scratch};
use edgemt::learn::optim::{
    ema_update, rampup, warmed_up_decay, Optimizer, OptimizerKind, OptimizerSettings,
};
use edgemt::learn::pseudo::{Balance, PseudoLabeler};
use edgemt::learn::rng::Rng;
use edgemt::learn::{AugmentConfig, ConsistencyMode};
use edgemt::nn::{Mlp, Params};
use edgemt::stream::Layout;
use ndarray::{array, Array1, Array2};

use crate::util;

fn linear(w: Array2<f32>, b: Array1<f32>) -> Mlp {
    Mlp::new(vec![(w, b)]).unwrap()
}

fn identity_head() -> Mlp {
    linear(array![[1.0, 0.0], [0.0, 1.0]], array![0.0, 0.0])
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol
}

fn grad_of(student: &Mlp, teacher: &Mlp, batch: &Batch, w: &LossWeights) -> (f32, Params) {
    let mut grad = student.params().zeros_like();
    let parts = loss_and_grad(
        student,
        teacher,
        batch,
        w,
        &mut Scratch::default(),
        &mut grad,
    );
    (parts.total, grad)
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
        present: &[],
    };
    let w = LossWeights {
        lambda: 2.0,
        alpha: 4.0,
        beta: 0.0,
        consistency: ConsistencyMode::Student,
    };
    let head = identity_head();
    let mut grad = head.params().zeros_like();
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

#[test]
fn the_mean_teacher_consistency_compares_the_student_with_the_teacher_by_hand() {
    // The same augmentation on both sides: the student form sees no difference at all,
    // while a teacher with zero weights says [1/2, 1/2] where the student says [3/4, 1/4].
    let ln3 = 3f32.ln();
    let aug = array![[ln3, 0.0], [0.0, 0.0]];
    let empty = Array2::<f32>::zeros((0, 2));
    let batch = Batch {
        labeled: empty.view(),
        labels: &[],
        unlabeled: empty.view(),
        pseudo: &[],
        aug_a: aug.view(),
        aug_b: aug.view(),
        present: &[],
    };
    let student = identity_head();
    let teacher = linear(Array2::zeros((2, 2)), array![0.0, 0.0]);
    let w = |consistency| LossWeights {
        lambda: 0.0,
        alpha: 1.0,
        beta: 0.0,
        consistency,
    };
    let (own, _) = grad_of(&student, &teacher, &batch, &w(ConsistencyMode::Student));
    let (mean_teacher, grad) = grad_of(&student, &teacher, &batch, &w(ConsistencyMode::Teacher));
    assert_eq!(own, 0.0, "student vs itself on identical inputs");
    // Row 0: ‖[3/4, 1/4] − [1/2, 1/2]‖² = 0.125; row 1: 0; mean over 2 rows.
    assert!(close(mean_teacher, 0.0625, 1e-6), "{mean_teacher}");
    // d/dz of (1/2)‖p − q‖² through the softmax at p = [3/4, 1/4], q = [1/2, 1/2]:
    // g = (2/2)(p − q) = [1/4, −1/4]; dz = p ⊙ (g − ⟨g, p⟩) = [3/32, −3/32]; dW row 0 = dz·x.
    let dw = grad.matrix(0);
    assert!(close(dw[[0, 0]], 3.0 / 32.0 * ln3, 1e-6), "{dw:?}");
    assert!(close(dw[[1, 0]], -3.0 / 32.0 * ln3, 1e-6), "{dw:?}");
    assert!(close(grad.values(1)[0], 3.0 / 32.0, 1e-6));
}

/// A random problem: 3 classes, 5 features, every term active.
struct Problem {
    labeled: Array2<f32>,
    labels: Vec<usize>,
    unlabeled: Array2<f32>,
    pseudo: Vec<Option<usize>>,
    aug_a: Array2<f32>,
    aug_b: Array2<f32>,
    present: Vec<bool>,
}

fn random(rng: &mut Rng, rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.normal())
}

/// A random network 5 -> (hidden 7, 4, ...) -> 3 with `layers` layers.
fn random_mlp(rng: &mut Rng, layers: usize, bias_scale: f32) -> Mlp {
    let widths: Vec<usize> = [5usize]
        .into_iter()
        .chain([7usize, 4].into_iter().cycle().take(layers - 1))
        .chain([3])
        .collect();
    Mlp::new(
        widths
            .windows(2)
            .map(|d| {
                (
                    random(rng, d[1], d[0]) * (1.0 / (d[0] as f32).sqrt()),
                    Array1::from_shape_fn(d[1], |_| rng.normal() * bias_scale),
                )
            })
            .collect(),
    )
    .unwrap()
}

fn problem(seed: u64, layers: usize) -> (Mlp, Mlp, Problem) {
    let mut rng = Rng::new(seed);
    let student = random_mlp(&mut rng, layers, 0.3);
    let teacher = random_mlp(&mut rng, layers, 0.0);
    let p = Problem {
        labeled: random(&mut rng, 4, 5),
        labels: vec![0, 2, 1, 2],
        unlabeled: random(&mut rng, 6, 5),
        pseudo: vec![Some(1), None, Some(0), Some(2), None, Some(1)],
        aug_a: random(&mut rng, 6, 5),
        aug_b: random(&mut rng, 6, 5),
        present: Vec::new(),
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
            present: &self.present,
        }
    }
}

fn total(student: &Mlp, teacher: &Mlp, p: &Problem, w: &LossWeights) -> f32 {
    grad_of(student, teacher, &p.batch(), w).0
}

fn check_gradient(layers: usize, mode: ConsistencyMode) {
    check_gradient_with(layers, mode, 0.0, &[]);
}

/// Finite differences of the whole loss, with diversity weight `beta` and the L_sup softmax
/// restricted to `present` classes.
fn check_gradient_with(layers: usize, mode: ConsistencyMode, beta: f32, present: &[bool]) {
    let (student, teacher, mut p) = problem(7, layers);
    p.present = present.to_vec();
    // A masked class is one the labeled buffer has no sample of: relabel its rows.
    for y in p.labels.iter_mut() {
        if !present.is_empty() && !present[*y] {
            *y = 0;
        }
    }
    let w = LossWeights {
        lambda: 0.7,
        alpha: 3.0,
        beta,
        consistency: mode,
    };
    let mut grad = student.params().zeros_like();
    let parts = loss_and_grad(
        &student,
        &teacher,
        &p.batch(),
        &w,
        &mut Scratch::default(),
        &mut grad,
    );
    assert!(parts.consistency > 0.0 && parts.pseudo > 0.0 && parts.sup > 0.0);
    if beta > 0.0 {
        assert!(parts.diversity < 0.0 && parts.diversity >= -(3f32.ln()) - 1e-6);
    }

    // Central differences in f32 with a step of 2e-3. Where a nudge moves some hidden
    // pre-activation across Relu's kink the loss is not differentiable along it, so those
    // parameters are skipped (and counted: they must stay rare).
    let eps = 2e-3f32;
    let inputs = [&p.labeled, &p.unlabeled, &p.aug_a, &p.aug_b];
    let pattern = |m: &Mlp| -> Vec<bool> {
        let mut trace = edgemt::nn::Trace::default();
        let mut signs = Vec::new();
        for x in inputs {
            m.forward(x.view(), &mut trace);
            for l in 0..m.layers() - 1 {
                signs.extend(trace.layer_output(l).iter().map(|v| *v > 0.0));
            }
        }
        signs
    };
    let here = pattern(&student);
    let mut worst = 0.0f32;
    let (mut checked, mut kinks) = (0, 0);
    for k in 0..student.params().count() {
        let nudged = |d: f32| {
            let mut params = student.params().clone();
            params.as_mut_slice()[k] += d;
            student.with_params(params).unwrap()
        };
        let (plus, minus) = (nudged(eps), nudged(-eps));
        if pattern(&plus) != here || pattern(&minus) != here {
            kinks += 1;
            continue;
        }
        let numeric =
            (total(&plus, &teacher, &p, &w) - total(&minus, &teacher, &p, &w)) / (2.0 * eps);
        let analytic = grad.as_slice()[k];
        let err = (numeric - analytic).abs() / (1e-2 + numeric.abs().max(analytic.abs()));
        worst = worst.max(err);
        checked += 1;
    }
    assert!(
        kinks * 10 <= student.params().count(),
        "{kinks} of {} parameters sit at a kink",
        student.params().count()
    );
    assert_eq!(checked + kinks, student.params().count());
    assert!(
        worst < 2e-2,
        "{layers} layers, {mode:?}: worst relative gradient error {worst}"
    );
}

#[test]
fn gradients_match_finite_differences_with_student_consistency() {
    check_gradient(1, ConsistencyMode::Student);
}

#[test]
fn gradients_match_finite_differences_with_mean_teacher_consistency() {
    check_gradient(1, ConsistencyMode::Teacher);
}

#[test]
fn the_diversity_gradient_matches_finite_differences() {
    for layers in [1, 2] {
        check_gradient_with(layers, ConsistencyMode::Student, 0.8, &[]);
    }
}

#[test]
fn masking_absent_classes_keeps_the_gradient_exact() {
    // Class 1 is declared absent, as if the buffer held none of it.
    check_gradient_with(1, ConsistencyMode::Student, 0.5, &[true, true, true]);
    check_gradient_with(2, ConsistencyMode::Teacher, 0.5, &[true, false, true]);
}

#[test]
fn the_diversity_term_is_the_negative_entropy_of_the_mean_prediction_by_hand() {
    // Two unlabeled rows with probabilities [3/4, 1/4] and [1/4, 3/4]: p̄ = [1/2, 1/2], so
    // Σ p̄ log p̄ = −ln 2, and the gradient vanishes (uniform is the optimum).
    let ln3 = 3f32.ln();
    let unlabeled = array![[ln3, 0.0], [0.0, ln3]];
    let empty = Array2::<f32>::zeros((0, 2));
    let batch = Batch {
        labeled: empty.view(),
        labels: &[],
        unlabeled: unlabeled.view(),
        pseudo: &[None, None],
        aug_a: empty.view(),
        aug_b: empty.view(),
        present: &[],
    };
    let w = LossWeights {
        lambda: 1.0,
        alpha: 0.0,
        beta: 2.0,
        consistency: ConsistencyMode::Student,
    };
    let head = identity_head();
    let mut grad = head.params().zeros_like();
    let parts = loss_and_grad(&head, &head, &batch, &w, &mut Scratch::default(), &mut grad);
    assert!(
        close(parts.diversity, -(2f32.ln()), 1e-6),
        "{}",
        parts.diversity
    );
    assert!(close(parts.total, -2.0 * 2f32.ln(), 1e-6));
    assert!(grad.norm() < 1e-6, "{grad:?}");
    // Both rows favouring class 0: p̄ = [3/4, 1/4]; the gradient pushes class 0 down.
    let skewed = array![[ln3, 0.0], [ln3, 0.0]];
    let batch = Batch {
        unlabeled: skewed.view(),
        ..batch
    };
    let parts = loss_and_grad(&head, &head, &batch, &w, &mut Scratch::default(), &mut grad);
    let expected = 0.75f32 * 0.75f32.ln() + 0.25 * 0.25f32.ln();
    assert!(close(parts.diversity, expected, 1e-6));
    assert!(
        grad.values(1)[0] > 0.0 && grad.values(1)[1] < 0.0,
        "{grad:?}"
    );
}

#[test]
fn a_masked_class_takes_no_supervised_loss() {
    // Label 0 with logits [ln 3, 0, 5]: unmasked p_0 is tiny; with class 2 masked out
    // p = [3/4, 1/4, 0] and L_sup = −ln(3/4), and class 2 gets no gradient. The second row
    // is the first shifted by 80, which a stable softmax must not notice (e^160 overflows
    // f32).
    let ln3 = 3f32.ln();
    let labeled = array![[ln3, 0.0, 5.0], [80.0 + ln3, 80.0, 85.0]];
    let empty = Array2::<f32>::zeros((0, 3));
    let head = linear(Array2::eye(3), Array1::zeros(3));
    let batch = Batch {
        labeled: labeled.view(),
        labels: &[0, 0],
        unlabeled: empty.view(),
        pseudo: &[],
        aug_a: empty.view(),
        aug_b: empty.view(),
        present: &[true, true, false],
    };
    // Every unlabeled term is weighted in, but with no unlabeled rows they add nothing (not
    // a NaN from a mean over zero rows).
    let w = LossWeights {
        lambda: 1.0,
        alpha: 1.0,
        beta: 1.0,
        consistency: ConsistencyMode::Student,
    };
    let mut grad = head.params().zeros_like();
    let parts = loss_and_grad(&head, &head, &batch, &w, &mut Scratch::default(), &mut grad);
    assert!(close(parts.sup, -(0.75f32.ln()), 1e-6), "{}", parts.sup);
    assert_eq!(parts.total, parts.sup, "{parts:?}");
    assert_eq!(
        grad.matrix(0).row(2).iter().map(|v| v.abs()).sum::<f32>(),
        0.0
    );
    assert_eq!(grad.values(1)[2], 0.0);
}

#[test]
fn gradients_of_two_layers_match_finite_differences() {
    check_gradient(2, ConsistencyMode::Student);
    check_gradient(2, ConsistencyMode::Teacher);
}

#[test]
fn gradients_of_three_layers_match_finite_differences() {
    check_gradient(3, ConsistencyMode::Student);
    check_gradient(3, ConsistencyMode::Teacher);
}

#[test]
fn rejected_pseudo_labels_add_no_loss_but_still_count_in_the_denominator() {
    let (student, teacher, mut p) = problem(3, 1);
    let w = LossWeights {
        lambda: 1.0,
        alpha: 0.0,
        beta: 0.0,
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
    let mut teacher = linear(array![[1.0, 2.0]], array![0.0]);
    let student = linear(array![[3.0, -2.0]], array![4.0]);
    ema_update(teacher.params_mut(), student.params(), 0.75);
    assert_eq!(teacher.weight(0), array![[1.5, 1.0]]);
    assert_eq!(teacher.bias(0), array![1.0]);
    ema_update(teacher.params_mut(), student.params(), 1.0);
    assert_eq!(
        teacher.weight(0),
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

fn settings(kind: OptimizerKind, momentum: f32) -> OptimizerSettings {
    OptimizerSettings {
        kind,
        momentum,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    }
}

#[test]
fn adam_first_step_moves_each_parameter_by_the_learning_rate_against_its_gradient() {
    let mut head = linear(array![[0.0, 0.0]], array![0.0]);
    let mut opt = Optimizer::new(settings(OptimizerKind::Adam, 0.0), head.params());
    let mut grad = head.params().zeros_like();
    grad.as_mut_slice().copy_from_slice(&[2.0, -0.5, 0.0]);
    opt.step(head.params_mut(), &grad, 0.01);
    let w = head.weight(0);
    assert!(close(w[[0, 0]], -0.01, 1e-6) && close(w[[0, 1]], 0.01, 1e-6));
    assert_eq!(head.bias(0)[0], 0.0);
}

#[test]
fn adam_uses_the_configured_betas() {
    // After two steps with gradients 1 then 0, m/(1−β₁²) depends on β₁: compare two β₁.
    let run = |beta1: f32| {
        let mut head = linear(array![[0.0]], array![0.0]);
        let mut s = settings(OptimizerKind::Adam, 0.0);
        s.beta1 = beta1;
        let mut opt = Optimizer::new(s, head.params());
        let mut g = head.params().zeros_like();
        g.as_mut_slice()[0] = 1.0;
        opt.step(head.params_mut(), &g, 0.1);
        g.as_mut_slice()[0] = 0.0;
        opt.step(head.params_mut(), &g, 0.1);
        head.weight(0)[[0, 0]]
    };
    // Step 2 with β₁ = 0: m = 0, so the weight stays at −0.1 after the first step.
    assert!(close(run(0.0), -0.1, 1e-6), "{}", run(0.0));
    assert!(run(0.9) < -0.15, "with momentum the second step moves too");
}

#[test]
fn sgd_with_momentum_accumulates_velocity() {
    let mut head = linear(array![[1.0]], array![0.0]);
    let mut opt = Optimizer::new(settings(OptimizerKind::Sgd, 0.5), head.params());
    let mut grad = head.params().zeros_like();
    grad.as_mut_slice()[0] = 1.0;
    opt.step(head.params_mut(), &grad, 0.1); // v = 1, w = 0.9
    opt.step(head.params_mut(), &grad, 0.1); // v = 1.5, w = 0.75
    assert!(close(head.weight(0)[[0, 0]], 0.75, 1e-6));
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
    let mut a = Augmenter::new(cfg.clone(), Layout::for_shape(&shape, None));
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
        Layout::for_shape(&shape, None),
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
fn distribution_alignment_divides_by_a_running_mean_of_the_teachers_predictions_by_hand() {
    // Momentum 0.5 from the uniform prior: after a batch of [0.92, 0.08] the running mean is
    // [0.71, 0.29], so each row becomes [0.92/0.71, 0.08/0.29] renormalised, [0.82447,
    // 0.17553], accepted at 0.8. The same batch again: running [0.815, 0.185], rows
    // [0.72302, 0.27698], rejected.
    let mut aligned = PseudoLabeler::new(2, 0.8, Balance::DistributionAlignment, 0.5);
    let batch = Array2::from_shape_fn((4, 2), |(_, j)| if j == 0 { 0.92 } else { 0.08 });
    let mut out = Vec::new();
    for (want, verdict) in [
        ([0.824_474_6, 0.175_525_3], Some(0)),
        ([0.723_024_7, 0.276_975_4], None),
    ] {
        let mut probs = batch.clone();
        aligned.label(&mut probs, &mut out);
        assert_eq!(out, vec![verdict; 4]);
        for row in probs.rows() {
            assert!(
                close(row[0], want[0], 1e-5) && close(row[1], want[1], 1e-5),
                "{row} vs {want:?}"
            );
        }
    }
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
    assert_eq!((a.len(), b.len()), (8, 8), "one verdict per row");
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
    learner.observe(&x, emb.row(0), None, None);
    let mut poisoned_input = x.clone();
    poisoned_input[7] = f32::NAN;
    let clean = c.backbone.embed(&x, 1).unwrap();
    learner.observe(&poisoned_input, clean.row(0), None, None);
    assert_eq!(
        learner.labeled_counts().iter().sum::<usize>() + learner.unlabeled_len(),
        0,
        "no buffer takes a non-finite value"
    );
    assert_eq!(learner.counters().samples_seen, 0);
    assert!(!learner.due(), "nothing to learn from");
    assert!(learner.student().is_finite() && learner.teacher().is_finite());
}

#[test]
fn a_step_refreshes_the_teacher_and_counts_versions() {
    let mut c = util::shipped_classifier();
    let head = c.pretrained();
    let mut learner = util::stepping_learner(&c, 2);
    let mut rng = Rng::new(2);
    for i in 0..8 {
        let x: Vec<f32> = (0..c.sample_len()).map(|_| rng.normal()).collect();
        let emb = c.backbone.embed(&x, 1).unwrap();
        learner.observe(&x, emb.row(0), (i % 3 == 0).then_some(i % 6), None);
        assert!(learner.due());
        learner.step(&mut c.backbone).unwrap().expect("finite step");
    }
    let n = learner.counters();
    assert_eq!(n.train_steps, 8);
    assert_eq!(n.ema_updates, 4, "every second step");
    assert_eq!(n.teacher_version, 4);
    assert!(learner.student().params().distance(head.params()) > 0.0);
    assert!(learner.teacher().params().distance(head.params()) > 0.0);
    assert_eq!(
        learner.pretrained(),
        &head,
        "the pretrained model is never trained"
    );
}

#[test]
fn gradient_clipping_bounds_each_plain_sgd_step_by_learning_rate_times_max_norm() {
    let c = util::shipped_classifier();
    let step_size = |max_grad_norm: f32| {
        let cfg = edgemt::learn::LearnConfig {
            train_every: 1,
            optimizer: edgemt::learn::optim::OptimizerKind::Sgd,
            momentum: 0.0,
            learning_rate: 0.5,
            anchor: 0.0,
            max_grad_norm,
            ..Default::default()
        };
        let mut learner = util::learner_with(&c, &cfg);
        // Wrong labels on confident samples: a large gradient.
        let mut backbone = c.backbone.clone();
        for (i, s) in util::stream(16).iter().enumerate() {
            let x = util::sample_x(s);
            let emb = backbone.embed(&x, 1).unwrap();
            let wrong = (s["truth"].as_u64().unwrap() as usize + 1 + i % 4) % 6;
            learner.observe(&x, emb.row(0), Some(wrong), None);
        }
        let before = learner.student().clone();
        learner.step(&mut backbone).unwrap().expect("a finite step");
        learner.student().params().distance(before.params())
    };
    let clipped = step_size(0.01);
    let free = step_size(0.0);
    assert!(clipped <= 0.5 * 0.01 * 1.0001, "clipped step {clipped}");
    assert!(free > 10.0 * clipped, "unclipped step {free} vs {clipped}");
}
