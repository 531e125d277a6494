//! Label requests: the budget is never exceeded, disagreements are asked about first,
//! uncertain samples only with a budget saved up, and every limit (open, hourly, expiry)
//! holds; replay's simulated user answers them instead of the recording's labels.

use edgemt::learn::requests::{Candidate, Opinion, Reason, RequestConfig, Requests};
use edgemt::learn::rng::Rng;

use crate::replay_cli::replay;

fn opinion(class: usize, confidence: f32) -> Opinion {
    Opinion { class, confidence }
}

/// A sample on which the adapted model says `adapted` and the pretrained one `pretrained`.
fn candidate(id: &str, adapted: Opinion, pretrained: Opinion) -> Candidate<'_> {
    Candidate {
        id,
        served: pretrained,
        adapted,
        pretrained,
    }
}

fn disagreement(id: &str) -> Candidate<'_> {
    candidate(id, opinion(1, 0.9), opinion(2, 0.9))
}

/// Both models answer 0, the adapted one with `confidence`.
fn agreement(id: &str, confidence: f32) -> Candidate<'_> {
    candidate(id, opinion(0, confidence), opinion(0, 0.9))
}

/// Requests chosen by the models' outputs only (no `explore` share), no hourly limit.
fn requests(cfg: RequestConfig) -> Requests {
    Requests::new(RequestConfig {
        per_hour: 0,
        max_open: 1000,
        explore: 0.0,
        ..cfg
    })
}

#[test]
fn requests_never_exceed_the_budget_share_of_the_samples_seen_so_far() {
    let fraction = 0.02;
    let mut r = requests(RequestConfig {
        fraction,
        burst: 5.0,
        ..Default::default()
    });
    let mut rng = Rng::new(7);
    for seen in 1..=20_000u64 {
        r.seen();
        let id = format!("s{seen}");
        // Every kind of sample, disagreements a third of the time.
        let c = match rng.below(3) {
            0 => disagreement(&id),
            _ => agreement(&id, rng.uniform()),
        };
        if r.consider(seen as f64, c).is_some() {
            r.answer(&id, 0);
        }
        assert!(
            r.counts().made as f64 <= fraction * seen as f64 + 1e-9,
            "{} requests after {seen} samples",
            r.counts().made
        );
    }
    // And the budget is used, not hoarded.
    assert!(r.counts().made as f64 >= 0.95 * fraction * 20_000.0);
}

#[test]
fn a_disagreement_is_asked_about_as_soon_as_one_request_is_saved_and_an_agreement_only_with_a_full_budget(
) {
    let mut r = requests(RequestConfig {
        fraction: 0.5,
        burst: 3.0,
        ..Default::default()
    });
    r.seen();
    assert!(
        r.consider(0.0, disagreement("a")).is_none(),
        "half a request saved"
    );
    r.seen();
    // One request saved: an uncertain agreement waits, a disagreement is asked.
    assert!(r.consider(0.0, agreement("b", 0.01)).is_none());
    let asked = r.consider(0.0, disagreement("c")).expect("asked").clone();
    assert_eq!(
        (asked.id.as_str(), asked.reason),
        ("c", Reason::Disagreement)
    );
    // Saved up in full (3): the most uncertain agreement is asked about too.
    for _ in 0..6 {
        r.seen();
    }
    let asked = r
        .consider(0.0, agreement("d", 0.01))
        .expect("asked")
        .clone();
    assert_eq!((asked.id.as_str(), asked.reason), ("d", Reason::Uncertain));
    assert_eq!(r.counts().disagreement, 1);
    assert_eq!(r.counts().uncertain, 1);
}

#[test]
fn an_agreement_more_confident_than_most_of_the_stream_is_never_asked_about() {
    let mut r = requests(RequestConfig {
        fraction: 1.0,
        ..Default::default()
    });
    let mut rng = Rng::new(3);
    for i in 0..5000 {
        r.seen();
        // Most samples are uncertain; one in ten is sure.
        let sure = i % 10 == 0;
        let confidence = if sure {
            0.99
        } else {
            0.2 + 0.6 * rng.uniform()
        };
        let asked = r.consider(i as f64, agreement("x", confidence)).is_some();
        assert!(!(sure && asked), "asked about a sure sample at {i}");
        if asked {
            r.answer("x", 0);
        }
    }
    // The uncertain ones are asked about with the budget saved up in full.
    assert!(r.counts().uncertain > 100, "{:?}", r.counts());
}

#[test]
fn the_explore_share_asks_about_every_kth_sample_whatever_the_models_say() {
    let mut r = Requests::new(RequestConfig {
        fraction: 0.1,
        explore: 0.5,
        per_hour: 0,
        max_open: 1000,
        // Never full, so nothing is asked for uncertainty.
        burst: 1000.0,
        ..Default::default()
    });
    let mut sampled = Vec::new();
    for i in 0..1000u32 {
        r.seen();
        let id = i.to_string();
        // Confident agreements: nothing the models say would ask about them.
        if let Some(q) = r.consider(i as f64, agreement(&id, 0.999)) {
            assert_eq!(q.reason, Reason::Sampled);
            sampled.push(i);
        }
    }
    // Half of a tenth: one sample in twenty, evenly spaced.
    assert_eq!(sampled.len(), 50, "{sampled:?}");
    assert!(sampled.windows(2).all(|w| w[1] - w[0] == 20), "{sampled:?}");
    assert_eq!(r.counts().sampled, 50);
}

#[test]
fn while_clean_evidence_is_wanted_the_whole_budget_asks_regardless_of_the_models() {
    let mut r = requests(RequestConfig {
        fraction: 0.1,
        ..Default::default()
    });
    for i in 0..200u32 {
        r.seen_wanting(true);
        // Disagreements, which would otherwise be asked about first.
        if let Some(q) = r.consider(i as f64, disagreement("x")) {
            assert_eq!(q.reason, Reason::Sampled);
            r.answer("x", 0);
        }
    }
    let c = r.counts();
    // A tenth of 200, give or take the bucket's rounding.
    assert!(c.made >= 19 && c.made <= 20, "{c:?}");
    assert_eq!((c.sampled, c.disagreement), (c.made, 0));
}

#[test]
fn no_more_requests_are_open_than_max_open_and_an_answer_makes_room() {
    let mut r = Requests::new(RequestConfig {
        fraction: 1.0,
        max_open: 2,
        per_hour: 0,
        explore: 0.0,
        ..Default::default()
    });
    for id in ["a", "b", "c", "d"] {
        r.seen();
        r.consider(0.0, disagreement(id));
    }
    let open: Vec<_> = r.open().map(|q| q.id.clone()).collect();
    assert_eq!(open, ["a", "b"]);
    assert_eq!(r.newest_open().unwrap().id, "b");
    assert!(r.answer("a", 1).is_some());
    r.seen();
    assert!(r.consider(0.0, disagreement("e")).is_some());
    assert_eq!(r.newest_open().unwrap().id, "e");
}

#[test]
fn no_more_than_per_hour_requests_are_made_in_any_hour() {
    let mut r = Requests::new(RequestConfig {
        fraction: 1.0,
        per_hour: 3,
        max_open: 100,
        explore: 0.0,
        ..Default::default()
    });
    let ask = |r: &mut Requests, t: f64, id: &str| {
        r.seen();
        r.consider(t, disagreement(id)).is_some()
    };
    assert!(ask(&mut r, 0.0, "a"));
    assert!(ask(&mut r, 10.0, "b"));
    assert!(ask(&mut r, 20.0, "c"));
    assert!(!ask(&mut r, 3599.0, "d"), "a fourth within the hour");
    assert!(ask(&mut r, 3600.0, "e"), "the first has left the hour");
    assert!(!ask(&mut r, 3605.0, "f"));
}

#[test]
fn a_request_left_open_too_long_expires_is_counted_and_its_late_answer_changes_nothing() {
    let mut r = Requests::new(RequestConfig {
        fraction: 1.0,
        open_s: 60.0,
        explore: 0.0,
        ..Default::default()
    });
    r.seen();
    r.consider(100.0, disagreement("a")).unwrap();
    assert_eq!(r.expire(159.0), 0);
    assert_eq!(r.expire(160.0), 1);
    assert!(r.newest_open().is_none());
    assert!(r.answer("a", 1).is_none());
    let c = r.counts();
    assert_eq!((c.made, c.expired, c.answered), (1, 1, 0));
}

#[test]
fn an_answer_is_counted_once_and_discordant_when_exactly_one_model_was_right() {
    let mut r = requests(RequestConfig {
        fraction: 1.0,
        burst: 1.0,
        ..Default::default()
    });
    // adapted says 1, pretrained 2.
    for (id, label) in [("a", 1), ("b", 2), ("c", 0)] {
        r.seen();
        r.consider(0.0, disagreement(id)).unwrap();
        assert_eq!(r.answer(id, label).unwrap().id, id);
        assert!(r.answer(id, label).is_none(), "answered twice");
    }
    assert!(r.answer("never-asked", 1).is_none());
    let c = r.counts();
    // "c": both wrong, so it cannot move the gate.
    assert_eq!((c.answered, c.discordant), (3, 2));
}

#[test]
fn replay_with_a_label_budget_learns_only_the_answers_to_its_requests() {
    let plain = replay("data/target_stream.jsonl", "data/target_holdout.jsonl", &[]);
    let r = replay(
        "data/target_stream.jsonl",
        "data/target_holdout.jsonl",
        &["--label-budget", "0.01", "--label-delay", "5"],
    );
    let n = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_f64()).unwrap();
    let samples = n(&r, "/samples");
    let made = n(&r, "/requests/made");
    assert!(made >= 1.0 && made <= 0.01 * samples, "{made} of {samples}");
    assert_eq!(
        n(&r, "/requests/answered") + n(&r, "/requests/open"),
        made,
        "the simulated user answers every request"
    );
    // The recording's own labels (more than the budget) are not read: every label learned
    // answered a request.
    assert!(n(&plain, "/labeled") > made);
    assert!(n(&r, "/labeled") <= n(&r, "/requests/answered"));
    assert!(plain.get("requests").is_none_or(|v| v.is_null()));
    // Within the budget, the promise still holds.
    assert!(n(&r, "/eval/served_accuracy") >= n(&r, "/eval/source_accuracy"));
}
