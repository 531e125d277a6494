//! The serving gate: the exact sign test, and which model it serves as evidence comes in.

use edgemt::learn::gate::{sign_test_p, Gate, GateConfig, Serving};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
}

#[test]
fn the_sign_test_matches_exact_binomial_tails() {
    // P(X ≥ k), X ~ Bin(n, 1/2), by hand: Σ C(n, i) / 2^n.
    assert_eq!(sign_test_p(0, 0), 1.0);
    assert!(close(sign_test_p(1, 0), 0.5));
    assert!(close(sign_test_p(5, 0), 1.0 / 32.0));
    assert!(close(sign_test_p(12, 2), (91.0 + 14.0 + 1.0) / 16384.0));
    assert!(close(
        sign_test_p(7, 3),
        (120.0 + 45.0 + 10.0 + 1.0) / 1024.0
    ));
    assert!(close(sign_test_p(0, 6), 1.0));
    assert!(close(sign_test_p(3, 3), 42.0 / 64.0));
    // Large n stays finite and in range: 600 of 1000 is far in the tail.
    let p = sign_test_p(600, 400);
    assert!(p > 0.0 && p < 1e-9, "{p}");
}

fn gate() -> Gate {
    Gate::new(GateConfig::default())
}

#[test]
fn the_pretrained_model_is_served_until_the_teacher_is_shown_to_be_better() {
    let mut g = gate();
    assert_eq!(g.serving(), Serving::Pretrained);
    // Agreements (both right or both wrong) are no evidence either way.
    for _ in 0..50 {
        assert_eq!(g.record(true, true), None);
        assert_eq!(g.record(false, false), None);
    }
    assert_eq!((g.wins(), g.losses()), (0, 0));
    // Four wins: p = 1/16 > 0.05; the fifth: 1/32.
    for _ in 0..4 {
        assert_eq!(g.record(true, false), None);
    }
    assert_eq!(g.serving(), Serving::Pretrained);
    assert_eq!(g.record(true, false), Some(Serving::Adapted));
    assert!(close(g.p_value(), 1.0 / 32.0));
}

#[test]
fn the_gate_falls_back_when_the_evidence_turns() {
    let mut g = Gate::new(GateConfig {
        window: 10,
        ..GateConfig::default()
    });
    for _ in 0..8 {
        g.record(true, false);
    }
    assert_eq!(g.serving(), Serving::Adapted);
    // Losses push the old wins out of the 10-label window.
    let mut fell_back_at = None;
    for i in 0..10 {
        if g.record(false, true) == Some(Serving::Pretrained) {
            fell_back_at = Some(i);
            break;
        }
    }
    // 8 wins 1 loss: p = 10/512 ≈ 0.02; 8-2: 56/1024 > 0.05.
    assert_eq!(fell_back_at, Some(1));
    assert_eq!(g.switches(), 2);
}

#[test]
fn cleared_evidence_serves_the_pretrained_model_and_restored_evidence_the_same_as_before() {
    let mut g = gate();
    for _ in 0..7 {
        g.record(true, false);
    }
    g.record(false, true);
    assert_eq!(g.serving(), Serving::Adapted, "7 wins, 1 loss: p = 9/256");
    let saved: Vec<bool> = g.outcomes().collect();
    g.clear();
    assert_eq!(g.serving(), Serving::Pretrained);
    g.restore(saved);
    assert_eq!(
        (g.wins(), g.losses(), g.serving()),
        (7, 1, Serving::Adapted)
    );
}

#[test]
fn a_disabled_gate_always_serves_the_adapted_teacher() {
    let mut g = Gate::new(GateConfig {
        enabled: false,
        ..GateConfig::default()
    });
    for _ in 0..20 {
        g.record(false, true);
    }
    assert_eq!(g.serving(), Serving::Adapted);
    assert_eq!(g.switches(), 0);
}
