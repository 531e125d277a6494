//! Mounting calibration: the 48 signed axis permutations, re-orienting polar and axial
//! groups, the information score, the search/adoption state machine on the shipped
//! recordings (the target stream is rotated 90° about x) and folding a mounting into the
//! exported ONNX, checked in tract and onnxruntime.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use edgemt::calibration::{
    infomax, CalibrationConfig, CalibrationEvent, Calibrator, Mounting, SignedPerm,
};
use edgemt::model::export::{export_trainable, fold_input_transform};
use edgemt::model::{Classifier, ModelError};
use edgemt::nn::{Mlp, Workspace};
use edgemt::stream::Layout;
use ndarray::{array, Array2};

use crate::util::{self, classifier_with_layers, max_abs_diff, shipped_classifier, tempdir};

/// 90° about x, as data/README.md applies it to the target users: (x, y, z) -> (x, -z, y).
const ROT_X90: SignedPerm = SignedPerm {
    perm: [0, 2, 1],
    signs: [1, -1, 1],
};

/// The shipped recordings' channels: accelerometer 0..3, gyroscope 3..6.
fn hapt_config() -> CalibrationConfig {
    CalibrationConfig {
        polar: vec![[0, 1, 2]],
        axial: vec![[3, 4, 5]],
        ..Default::default()
    }
}

fn time_major() -> Layout {
    Layout::for_shape(&[64, 6], None)
}

/// `(x, label)` of the first `limit` lines of a shipped recording.
fn stream(name: &str, limit: usize) -> Vec<(Vec<f32>, Option<usize>)> {
    #[derive(serde::Deserialize)]
    struct Line {
        x: Vec<f32>,
        label: Option<usize>,
    }
    let text = std::fs::read_to_string(util::path(&format!("data/{name}.jsonl"))).unwrap();
    text.lines()
        .take(limit)
        .map(|l| {
            let line: Line = serde_json::from_str(l).unwrap();
            (line.x, line.label)
        })
        .collect()
}

/// `R·v` computed from `matrix()` by picking each row's nonzero entry: independent of
/// `apply`, and, like a device rotation, exact in f32.
fn by_matrix(r: &SignedPerm, v: [f32; 3], sign: f32) -> [f32; 3] {
    let m = r.matrix();
    [0, 1, 2].map(|i| {
        let j = (0..3).find(|&j| m[i][j] != 0.0).unwrap();
        sign * m[i][j] * v[j]
    })
}

/// Rotates a time-major `[64, 6]` sample as a device mounted with `r` would record it:
/// `R·acc` and `det(R)·R·gyro` at every step.
fn mount(r: &SignedPerm, x: &[f32]) -> Vec<f32> {
    let det = r.det() as f32;
    x.chunks_exact(6)
        .flat_map(|s| {
            let acc = by_matrix(r, [s[0], s[1], s[2]], 1.0);
            let gyro = by_matrix(r, [s[3], s[4], s[5]], det);
            acc.into_iter().chain(gyro)
        })
        .collect()
}

/// `[steps, channels]` row-major to `[channels, steps]`.
fn transpose(x: &[f32], steps: usize, channels: usize) -> Vec<f32> {
    (0..channels)
        .flat_map(|c| (0..steps).map(move |t| x[t * channels + c]))
        .collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn the_48_candidates_are_distinct_start_with_identity_and_half_are_proper_rotations() {
    let all = SignedPerm::all();
    assert_eq!(all.len(), 48);
    assert_eq!(all[0], SignedPerm::IDENTITY);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 48, "all distinct");
    assert_eq!(
        all.iter().map(|r| r.matrix()).collect::<Vec<_>>().len(),
        all.iter()
            .map(|r| format!("{:?}", r.matrix()))
            .collect::<HashSet<_>>()
            .len(),
        "distinct as matrices too"
    );
    assert!(all.iter().all(|r| r.det() == 1 || r.det() == -1));
    assert_eq!(all.iter().filter(|r| r.det() == 1).count(), 24);
    assert_eq!(SignedPerm::all(), all, "the order is deterministic");
    let names: HashSet<String> = all.iter().map(|r| r.name()).collect();
    assert_eq!(names.len(), 48, "names tell them apart");
}

#[test]
fn a_quarter_turn_about_x_and_a_mirror_have_the_expected_matrices() {
    assert_eq!(
        ROT_X90.matrix(),
        [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    );
    assert_eq!(ROT_X90.det(), 1);
    assert_eq!(ROT_X90.name(), "x,-z,y");
    assert_eq!(ROT_X90.apply([1.0, 2.0, 3.0]), [1.0, -3.0, 2.0]);
    assert_eq!(ROT_X90.inverse().name(), "x,z,-y");
    assert_eq!(SignedPerm::IDENTITY.name(), "x,y,z");

    let mirror_y = SignedPerm {
        perm: [0, 1, 2],
        signs: [1, -1, 1],
    };
    assert_eq!(
        mirror_y.matrix(),
        [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]
    );
    assert_eq!(mirror_y.det(), -1);
    // Swapping two axes is a mirror as well.
    let swap_xy = SignedPerm {
        perm: [1, 0, 2],
        signs: [1, 1, 1],
    };
    assert_eq!(swap_xy.det(), -1);
    assert_eq!(swap_xy.name(), "y,x,z");
}

#[test]
fn every_candidate_composed_with_its_inverse_is_identity_and_apply_agrees_with_matrix() {
    let v = [0.25f32, -1.5, 3.0];
    for r in SignedPerm::all() {
        assert_eq!(r.then(&r.inverse()), SignedPerm::IDENTITY, "{r}");
        assert_eq!(r.inverse().then(&r), SignedPerm::IDENTITY, "{r}");
        assert_eq!(r.inverse().det(), r.det(), "{r}");
        let m = r.matrix();
        let by_product = [0, 1, 2].map(|i| (0..3).map(|j| m[i][j] * v[j]).sum::<f32>());
        assert_eq!(r.apply(v), by_product, "{r}");
        // Rᵀ is the inverse.
        let mt = r.inverse().matrix();
        assert!((0..3).all(|i| (0..3).all(|j| mt[i][j] == m[j][i])), "{r}");
    }
    // `then` applies self first (these two do not commute).
    let mirror_y = SignedPerm {
        perm: [0, 1, 2],
        signs: [1, -1, 1],
    };
    let both = ROT_X90.then(&mirror_y);
    assert_eq!(
        both.apply(v),
        mirror_y.apply(ROT_X90.apply(v)),
        "then = other ∘ self"
    );
    assert_ne!(both.apply(v), ROT_X90.apply(mirror_y.apply(v)));
    assert_eq!(both.apply([1.0, 2.0, 3.0]), [1.0, 3.0, 2.0]);
}

#[test]
fn under_a_mirror_a_gyroscope_turns_the_other_way_while_an_accelerometer_is_only_mirrored() {
    let mirror_y = SignedPerm {
        perm: [0, 1, 2],
        signs: [1, -1, 1],
    };
    // Two time steps of acc (1, 2, 3), gyro (4, 5, 6), then (7, 8, 9), (10, 11, 12).
    let layout = Layout::for_shape(&[2, 6], Some(0));
    let m = Mounting::new(&hapt_config(), layout, mirror_y);
    let x = [
        1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
    ];
    let mut out = [0.0; 12];
    m.apply(&x, &mut out);
    assert_eq!(
        out,
        [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0, 11.0, -12.0]
    );

    // A proper rotation turns both alike.
    let m = Mounting::new(&hapt_config(), layout, ROT_X90);
    m.apply(&x, &mut out);
    assert_eq!(
        out,
        [1.0, -3.0, 2.0, 4.0, -6.0, 5.0, 7.0, -9.0, 8.0, 10.0, -12.0, 11.0]
    );
}

#[test]
fn channels_outside_any_group_are_copied_unchanged() {
    // Seven channels: the last one (say, a barometer) belongs to no group.
    let layout = Layout::for_shape(&[3, 7], Some(0));
    let m = Mounting::new(&hapt_config(), layout, ROT_X90);
    let x: Vec<f32> = (0..21).map(|i| i as f32 + 0.5).collect();
    let mut out = vec![0.0; 21];
    m.apply(&x, &mut out);
    for t in 0..3 {
        assert_eq!(out[t * 7 + 6], x[t * 7 + 6]);
        assert_eq!(out[t * 7 + 1], -x[t * 7 + 2]);
    }
    let cm = m.channel_matrix();
    assert_eq!(cm[[6, 6]], 1.0);
    assert_eq!(cm.row(6).iter().filter(|v| **v != 0.0).count(), 1);
}

#[test]
fn a_rotated_recording_is_undone_bit_for_bit_in_time_major_and_channel_first_layouts() {
    let cfg = hapt_config();
    let lines = stream("control_stream", 50);
    assert_eq!(lines.len(), 50);
    for r in [
        ROT_X90,
        SignedPerm {
            perm: [2, 0, 1],
            signs: [-1, 1, -1],
        }, // a mirror: det −1
    ] {
        let undo_tm = Mounting::new(&cfg, time_major(), r.inverse());
        let undo_cf = Mounting::new(&cfg, Layout::for_shape(&[6, 64], None), r.inverse());
        let mut changed = 0;
        for (x, _) in &lines {
            let rotated = mount(&r, x);
            changed += rotated.iter().zip(x).filter(|(a, b)| a != b).count();
            let mut back = vec![0.0; x.len()];
            undo_tm.apply(&rotated, &mut back);
            assert_eq!(bits(&back), bits(x), "time-major, {r}");

            let rotated_cf = transpose(&rotated, 64, 6);
            let mut back_cf = vec![0.0; x.len()];
            undo_cf.apply(&rotated_cf, &mut back_cf);
            assert_eq!(
                bits(&back_cf),
                bits(&transpose(x, 64, 6)),
                "channel-first, {r}"
            );
        }
        assert!(changed > 10_000, "{r} really moves the data ({changed})");
    }
}

#[test]
fn the_channel_matrix_reproduces_apply_at_every_step_in_both_layouts() {
    let x: Vec<f32> = (0..384).map(|i| (i as f32 * 0.37).sin()).collect();
    for r in SignedPerm::all() {
        for (layout, xs) in [
            (time_major(), x.clone()),
            (Layout::for_shape(&[6, 64], None), transpose(&x, 64, 6)),
        ] {
            let m = Mounting::new(&hapt_config(), layout, r);
            let mut out = vec![0.0; 384];
            m.apply(&xs, &mut out);
            let cm = m.channel_matrix();
            assert_eq!(cm.dim(), (6, 6));
            for t in 0..64 {
                let at = |c: usize| t * layout.step_stride + c * layout.channel_stride;
                for i in 0..6 {
                    let want: f32 = (0..6).map(|j| cm[[i, j]] * xs[at(j)]).sum();
                    assert_eq!(out[at(i)], want, "{r}, step {t}, channel {i}");
                }
            }
        }
    }
}

#[test]
fn infomax_is_ln_k_for_confident_diverse_predictions_and_zero_for_collapsed_or_uniform_ones() {
    let diverse: Array2<f32> = Array2::eye(4);
    assert!((infomax(diverse.view()) - 4f32.ln()).abs() < 1e-6);
    // Twice each class: still ln 4.
    let doubled = ndarray::concatenate![ndarray::Axis(0), diverse, diverse];
    assert!((infomax(doubled.view()) - 4f32.ln()).abs() < 1e-6);

    let collapsed = array![[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]];
    assert_eq!(infomax(collapsed.view()), 0.0);
    let uniform = Array2::from_elem((5, 3), 1.0 / 3.0);
    assert!(infomax(uniform.view()).abs() < 1e-6);

    // Half-confident: two classes, each row (0.75, 0.25) or (0.25, 0.75).
    let soft = array![[0.75, 0.25], [0.25, 0.75]];
    let h = |p: f32| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
    assert!((infomax(soft.view()) - (2f32.ln() - h(0.75))).abs() < 1e-6);
}

/// The scoring closure's model: the shipped backbone and FROZEN pretrained head.
struct Frozen {
    c: Classifier,
    head: Mlp,
    emb: Array2<f32>,
    ws: Workspace,
    calls: usize,
    spent: Duration,
}

impl Frozen {
    fn new() -> Frozen {
        let c = shipped_classifier();
        let head = c.pretrained();
        Frozen {
            c,
            head,
            emb: Array2::zeros((0, 0)),
            ws: Workspace::default(),
            calls: 0,
            spent: Duration::ZERO,
        }
    }

    fn score(&mut self, x: &[f32], n: usize, out: &mut Array2<f32>) -> Result<(), ModelError> {
        let start = Instant::now();
        self.c.backbone.embed_into(x, n, &mut self.emb)?;
        self.head.probs_into(self.emb.view(), &mut self.ws, out);
        self.calls += 1;
        self.spent += start.elapsed();
        Ok(())
    }
}

/// Feeds a whole recording (observe, then its label if any, then a due search) and returns
/// the events with the 0-based sample index they happened at.
fn run_stream(
    name: &str,
    cal: &mut Calibrator,
    model: &mut Frozen,
) -> Vec<(usize, CalibrationEvent)> {
    let mut events = Vec::new();
    for (i, (x, label)) in stream(name, usize::MAX).iter().enumerate() {
        cal.observe(x);
        if let Some(y) = label {
            if let Some(e) = cal
                .label(x, *y, |x, n, out| model.score(x, n, out))
                .unwrap()
            {
                events.push((i, e));
            }
        }
        if cal.search_due() {
            let (calls, start) = (model.calls, Instant::now());
            let e = cal.search(|x, n, out| model.score(x, n, out)).unwrap();
            let scores = cal.last_scores();
            let identity = scores[0].1;
            let inverse = scores.iter().find(|s| s.0 == ROT_X90.inverse()).unwrap().1;
            let mut ranked = scores.to_vec();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top: Vec<String> = ranked[..3]
                .iter()
                .map(|(r, im)| format!("{r} {im:.4}"))
                .collect();
            println!(
                "{name} search at sample {}: IM identity {identity:.4}, x,z,-y {inverse:.4}, \
                 top 3 [{}], lowest {:.4}; {} model calls in {:.2?} -> {e:?}",
                i + 1,
                top.join(", "),
                ranked[47].1,
                model.calls - calls,
                start.elapsed()
            );
            events.extend(e.into_iter().map(|e| (i, e)));
        }
    }
    events
}

#[test]
fn on_the_rotated_target_stream_the_calibrator_proposes_and_labels_adopt_the_inverse_rotation() {
    let mut model = Frozen::new();
    let cfg = hapt_config();
    let mut cal = Calibrator::new(cfg.clone(), time_major());
    let events = run_stream("target_stream", &mut cal, &mut model);
    for e in &events {
        println!("target event at sample {}: {:?}", e.0 + 1, e.1);
    }
    let want = ROT_X90.inverse();
    // The first search (once the ring is full) finds x,z,-y; the labels seen so far, weighed
    // at once, already confirm it.
    let searched = cal.last_scores();
    let score = |r: SignedPerm| searched.iter().find(|s| s.0 == r).unwrap().1;
    assert!(
        score(want) > score(SignedPerm::IDENTITY) + 0.1,
        "{} vs {}",
        score(want),
        score(SignedPerm::IDENTITY)
    );
    assert!(
        searched.iter().all(|s| s.1 <= score(want)),
        "x,z,-y scores best"
    );
    let adopted: Vec<_> = events
        .iter()
        .filter_map(|e| match e.1 {
            CalibrationEvent::Adopted { r, log_ratio } => Some((e.0, r, log_ratio)),
            _ => None,
        })
        .collect();
    assert_eq!(adopted.len(), 1, "{events:?}");
    assert_eq!(adopted[0].1, want);
    // Adopted at once by the labels already seen, but proposed first all the same: the log
    // and the report's proposal count must not show an adoption nobody proposed.
    let i = events
        .iter()
        .position(|e| matches!(e.1, CalibrationEvent::Adopted { .. }))
        .unwrap();
    assert!(
        i > 0 && matches!(events[i - 1].1, CalibrationEvent::Proposed { r, .. } if r == want),
        "{events:?}"
    );
    assert!(adopted[0].2 >= cfg.adopt_log_ratio);
    assert!(
        adopted[0].0 + 1 >= cfg.window,
        "not before the ring is full"
    );
    assert!(!events
        .iter()
        .any(|e| matches!(e.1, CalibrationEvent::Reverted { .. })));
    assert_eq!(cal.adopted(), want);
    assert_eq!(cal.mounting().r(), want);
    assert_eq!(cal.candidate(), None);
}

/// While the session serves a confirmed adapted teacher it holds adoptions: the rotation is
/// proposed and confirmed but not adopted, and the first label after the hold adopts it.
#[test]
fn a_held_adoption_waits_for_the_hold_to_end_and_then_needs_only_one_label() {
    let mut model = Frozen::new();
    let mut cal = Calibrator::new(hapt_config(), time_major());
    cal.hold_adoption(true);
    let events = run_stream("target_stream", &mut cal, &mut model);
    assert!(
        events
            .iter()
            .any(|e| matches!(e.1, CalibrationEvent::Proposed { .. })),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.1, CalibrationEvent::Adopted { .. })),
        "{events:?}"
    );
    assert_eq!(cal.adopted(), SignedPerm::IDENTITY);
    let want = ROT_X90.inverse();
    assert_eq!(cal.candidate(), Some(want));

    cal.hold_adoption(false);
    let (x, y) = stream("target_stream", usize::MAX)
        .into_iter()
        .find_map(|(x, y)| y.map(|y| (x, y)))
        .unwrap();
    let e = cal
        .label(&x, y, |x, n, out| model.score(x, n, out))
        .unwrap();
    assert!(
        matches!(e, Some(CalibrationEvent::Adopted { r, .. }) if r == want),
        "{e:?}"
    );
}

#[test]
fn on_the_unrotated_control_stream_the_calibrator_proposes_no_other_mounting_and_adopts_nothing() {
    let mut model = Frozen::new();
    let mut cal = Calibrator::new(hapt_config(), time_major());
    let events = run_stream("control_stream", &mut cal, &mut model);
    assert!(
        !cal.last_scores().is_empty(),
        "the control stream is long enough to search"
    );
    for e in &events {
        println!("control event at sample {}: {:?}", e.0 + 1, e.1);
    }
    assert!(
        events.iter().all(|e| matches!(
            e.1,
            CalibrationEvent::Proposed {
                r: SignedPerm::IDENTITY,
                ..
            }
        )),
        "{events:?}"
    );
    assert_eq!(cal.adopted(), SignedPerm::IDENTITY);
}

#[test]
fn a_wrong_mounting_restored_on_the_control_stream_is_reverted_by_its_labels() {
    let mut model = Frozen::new();
    let mut cal = Calibrator::new(hapt_config(), time_major());
    cal.set_adopted(ROT_X90);
    assert_eq!(cal.adopted(), ROT_X90);
    let events = run_stream("control_stream", &mut cal, &mut model);
    let reverted = events
        .iter()
        .find_map(|e| match e.1 {
            CalibrationEvent::Reverted { r, log_ratio } => Some((e.0, r, log_ratio)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("reverted: {events:?}"));
    println!("reverted at sample {}: {:?}", reverted.0 + 1, reverted);
    assert_eq!(reverted.1, ROT_X90);
    assert!(reverted.2 <= -3.0);
    assert_eq!(cal.adopted(), SignedPerm::IDENTITY);
}

#[test]
fn searches_are_due_once_the_ring_is_full_then_back_off_when_fruitless_and_are_16_times_rarer_once_adopted(
) {
    let cfg = CalibrationConfig {
        window: 32,
        search_every: 8,
        ..hapt_config()
    };
    let mut cal = Calibrator::new(cfg, time_major());
    let x = vec![0.5; 384];
    let mut calls = 0;
    let mut uniform = |_: &[f32], n: usize, out: &mut Array2<f32>| -> Result<(), Infallible> {
        calls += 1;
        *out = Array2::from_elem((n, 6), 1.0 / 6.0);
        Ok(())
    };
    for _ in 0..31 {
        cal.observe(&x);
        assert!(!cal.search_due());
    }
    cal.observe(&x);
    assert!(cal.search_due(), "the ring is full");
    assert_eq!(
        cal.search(&mut uniform).unwrap(),
        vec![],
        "all tie: identity"
    );
    assert_eq!(cal.last_scores().len(), 48);
    assert!(!cal.search_due());
    // A search that found nothing doubles the wait: 16 samples, not 8.
    for _ in 0..15 {
        cal.observe(&x);
    }
    assert!(!cal.search_due());
    cal.observe(&x);
    assert!(cal.search_due(), "16 more samples");

    cal.set_adopted(ROT_X90);
    for _ in 0..127 {
        cal.observe(&x);
    }
    assert!(!cal.search_due(), "adopted: not after 8, nor 127");
    cal.observe(&x);
    assert!(cal.search_due(), "adopted: after 16 × 8");
    drop(cal);
    assert_eq!(calls, 48, "one batched call per candidate");
}

#[test]
fn a_scoring_error_is_returned_and_the_next_search_waits_for_the_schedule() {
    let cfg = CalibrationConfig {
        window: 32,
        search_every: 8,
        ..hapt_config()
    };
    let mut cal = Calibrator::new(cfg, time_major());
    for _ in 0..32 {
        cal.observe(&[0.0; 384]);
    }
    let err = cal
        .search(|_, _, _| Err::<(), _>("model gone"))
        .unwrap_err();
    assert_eq!(err, "model gone");
    assert!(!cal.search_due());
}

#[test]
fn validate_refuses_out_of_range_and_repeated_channels_naming_them() {
    let ok = hapt_config();
    assert!(ok.enabled());
    assert_eq!(ok.validate(6), Ok(()));
    assert!(!CalibrationConfig::default().enabled());
    assert_eq!(CalibrationConfig::default().validate(6), Ok(()));

    let err = ok.validate(5).unwrap_err();
    assert!(
        err.contains("axial group [3, 4, 5]")
            && err.contains("channel 5")
            && err.contains("5 channels"),
        "{err}"
    );
    let out_of_range = CalibrationConfig {
        polar: vec![[0, 1, 7]],
        ..Default::default()
    };
    let err = out_of_range.validate(6).unwrap_err();
    assert!(
        err.contains("channel 7") && err.contains("6 channels"),
        "{err}"
    );

    let twice = CalibrationConfig {
        polar: vec![[0, 1, 1]],
        ..Default::default()
    };
    let err = twice.validate(6).unwrap_err();
    assert!(err.contains("channel 1 twice"), "{err}");

    let shared = CalibrationConfig {
        polar: vec![[0, 1, 2]],
        axial: vec![[2, 3, 4]],
        ..Default::default()
    };
    let err = shared.validate(6).unwrap_err();
    assert!(
        err.contains("channel 2 is in both polar group [0, 1, 2] and axial group [2, 3, 4]"),
        "{err}"
    );

    let small = CalibrationConfig {
        window: 16,
        ..hapt_config()
    };
    assert!(small.validate(6).unwrap_err().contains("window"));
    let never = CalibrationConfig {
        search_every: 0,
        ..hapt_config()
    };
    assert!(never.validate(6).unwrap_err().contains("search_every"));
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let c = CalibrationConfig {
            adopt_log_ratio: bad,
            ..hapt_config()
        };
        assert!(
            c.validate(6).unwrap_err().contains("adopt_log_ratio"),
            "{bad}"
        );
    }
}

#[test]
fn the_config_section_reads_from_toml_and_refuses_unknown_keys() {
    let cfg: CalibrationConfig =
        toml::from_str("polar = [[0, 1, 2]]\naxial = [[3, 4, 5]]\nwindow = 512\n").unwrap();
    assert_eq!(
        cfg,
        CalibrationConfig {
            window: 512,
            ..hapt_config()
        }
    );
    let err = toml::from_str::<CalibrationConfig>("polar = [[0, 1, 2]]\nwindwo = 3\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("windwo"), "{err}");
}

/// Runs `model` in onnxruntime on `values` shaped `shape`; None (and a note) without the venv.
fn onnxruntime(
    model: &Path,
    input: &str,
    output: &str,
    shape: &[usize],
    values: &[f32],
) -> Option<Vec<f32>> {
    let Some(python) = util::venv_python() else {
        eprintln!("SKIPPED the onnxruntime half: tools/.venv is missing (tools/setup.sh)");
        return None;
    };
    let job = model.with_extension("json");
    std::fs::write(
        &job,
        serde_json::json!({
            "model": model, "input": input, "output": output, "shape": shape, "values": values,
        })
        .to_string(),
    )
    .unwrap();
    let script = "import json, sys, numpy as np, onnxruntime as ort\n\
        j = json.load(open(sys.argv[1]))\n\
        s = ort.InferenceSession(j['model'], providers=['CPUExecutionProvider'])\n\
        x = np.array(j['values'], dtype=np.float32).reshape(j['shape'])\n\
        print(json.dumps(s.run([j['output']], {j['input']: x})[0].ravel().tolist()))\n";
    Some(util::python_json(&python, script, &[&job]))
}

#[test]
fn the_folded_mounting_makes_the_exported_model_take_raw_rotated_data_in_tract_and_onnxruntime() {
    let c = shipped_classifier();
    let r = ROT_X90.inverse();
    let mounting = Mounting::new(&hapt_config(), time_major(), r);
    let folded = fold_input_transform(
        c.proto(),
        mounting.channel_matrix().view(),
        1,
        &c.input_shape,
    )
    .unwrap();
    let bytes = export_trainable(
        &folded,
        &c.trainable,
        &c.pretrained(),
        &[("edgemt.mounting", r.name())],
    )
    .unwrap();
    let dir = tempdir();
    let path = dir.path().join("mounted.onnx");
    std::fs::write(&path, bytes).unwrap();

    // RAW rotated device data, and what the original model says on it once calibrated.
    let raw: Vec<f32> = stream("target_stream", 16)
        .into_iter()
        .flat_map(|(x, _)| x)
        .collect();
    let mut calibrated = vec![0.0; raw.len()];
    for (x, out) in raw.chunks_exact(384).zip(calibrated.chunks_exact_mut(384)) {
        mounting.apply(x, out);
    }
    let expected = c.run_full(&calibrated, 16).unwrap();
    let uncalibrated = c.run_full(&raw, 16).unwrap();
    assert!(
        max_abs_diff(&expected, &uncalibrated) > 0.1,
        "the mounting matters on these samples"
    );

    let reloaded = Classifier::load(&path, &Default::default()).unwrap();
    assert_eq!(
        reloaded.input_name, "input",
        "users' code keeps the input name"
    );
    assert_eq!(reloaded.input_shape, c.input_shape);
    let mounting_entry = reloaded
        .proto()
        .metadata_props
        .iter()
        .find(|p| p.key == "edgemt.mounting")
        .map(|p| p.value.clone());
    assert_eq!(mounting_entry.as_deref(), Some("x,z,-y"));
    let diff = max_abs_diff(&reloaded.run_full(&raw, 16).unwrap(), &expected);
    assert!(diff < 1e-5, "tract on the folded export differs by {diff}");

    if let Some(ort) = onnxruntime(
        &path,
        &c.input_name,
        &c.trainable.output,
        &[16, 64, 6],
        &raw,
    ) {
        let diff = max_abs_diff(&ort, &expected);
        assert!(diff < 1e-5, "onnxruntime on raw data differs by {diff}");
    }
}

#[test]
fn a_channel_first_cnn_folds_a_general_channel_matrix_that_tract_and_onnxruntime_reproduce() {
    let file = "tests/data/models/cnn_gemm_softmax.onnx";
    let c = classifier_with_layers(file, 1);
    assert_eq!(c.input_shape, [6, 64]);
    // Not a signed permutation: every channel mixes into every other.
    let m = Array2::from_shape_fn((6, 6), |(i, j)| {
        (i == j) as u8 as f32 + 0.3 * ((i * 6 + j) as f32).sin()
    });
    let folded = fold_input_transform(c.proto(), m.view(), 0, &c.input_shape).unwrap();
    let r = util::references()
        .into_iter()
        .find(|r| r.file == file)
        .unwrap();
    let batch = r.inputs.len();
    let raw = r.inputs.concat();
    // x' = M · x per sample ([6, 64]).
    let mixed: Vec<f32> = raw
        .chunks_exact(384)
        .flat_map(|x| {
            let x = ndarray::ArrayView2::from_shape((6, 64), x).unwrap();
            m.dot(&x).into_iter()
        })
        .collect();
    let expected = c.run_full(&mixed, batch).unwrap();
    assert!(max_abs_diff(&expected, &c.run_full(&raw, batch).unwrap()) > 1e-3);

    let dir = tempdir();
    let path = dir.path().join("cnn_mounted.onnx");
    std::fs::write(&path, prost::Message::encode_to_vec(&folded)).unwrap();
    let reloaded = Classifier::load(&path, &Default::default()).unwrap();
    assert_eq!(reloaded.input_name, "x");
    let diff = max_abs_diff(&reloaded.run_full(&raw, batch).unwrap(), &expected);
    assert!(diff < 1e-5, "tract on the folded CNN differs by {diff}");
    if let Some(ort) = onnxruntime(&path, "x", &c.trainable.output, &[batch, 6, 64], &raw) {
        let diff = max_abs_diff(&ort, &expected);
        assert!(
            diff < 1e-5,
            "onnxruntime on the folded CNN differs by {diff}"
        );
    }
}

#[test]
fn folding_refuses_samples_that_are_not_rank_2_and_matrices_of_the_wrong_size() {
    let skl = classifier_with_layers("tests/data/models/skl_mlp_softmax.onnx", 1);
    let eye6: Array2<f32> = Array2::eye(6);
    let err = fold_input_transform(skl.proto(), eye6.view(), 0, &skl.input_shape)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 2") && err.contains("[384]"), "{err}");

    let c = shipped_classifier();
    let eye3: Array2<f32> = Array2::eye(3);
    let err = fold_input_transform(c.proto(), eye3.view(), 1, &c.input_shape)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(3, 3)") && err.contains("6 channels"),
        "{err}"
    );
    let err = fold_input_transform(c.proto(), eye6.view(), 0, &[6, 64])
        .unwrap_err()
        .to_string();
    assert!(err.contains("[64, 6]"), "{err}");
}
