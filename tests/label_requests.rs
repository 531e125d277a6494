//! The daemon's label requests against a real mosquitto: it asks within its budget, one
//! request at a time, announces it retained on `{prefix}/label_request`, takes the answer as
//! a bare class name on `{prefix}/label_request/answer` or by id on the labels topic, refuses
//! answers no request is open for, and lets an unanswered request expire.

use std::time::Duration;

use serde_json::Value;

use crate::util::broker::{num, on, Rig};
use crate::util::{sample_with_id, stream};

/// The label request messages among `msgs`, parsed.
fn requests(msgs: &[(String, Vec<u8>)], topic: &str) -> Vec<Value> {
    on(msgs, topic)
        .map(|p| serde_json::from_str(&p).expect("a label request is JSON"))
        .collect()
}

fn is_open(v: &Value) -> bool {
    v["open"] == true
}

/// How long a test waits for the daemon to get somewhere.
const WAIT: Duration = Duration::from_secs(30);

/// A daemon that may ask about one sample in ten, with nothing saved up for disagreements
/// (so it asks about uncertain samples too), requests open `open_s`.
fn device(prefix: &'static str, open_s: f64) -> Rig {
    Rig::start(
        prefix,
        "user",
        &format!("[requests]\nfraction = 0.1\nburst = 1\nper_hour = 0\nopen_s = {open_s}\n"),
        &["label_request", "metrics"],
    )
}

/// What these tests do with a device: send samples, wait for label requests.
trait Asked {
    fn send_samples(&self, tag: &str, range: std::ops::Range<usize>);
    fn request_where(&self, wanted: impl Fn(&Value) -> bool) -> Value;
}

impl Asked for Rig {
    fn send_samples(&self, tag: &str, range: std::ops::Range<usize>) {
        let samples = stream(range.end);
        for i in range {
            self.peer.publish(
                &self.topic("samples"),
                sample_with_id(&samples[i], &format!("{tag}{i}")),
            );
        }
    }

    /// Waits for the next label request message that `wanted` accepts.
    fn request_where(&self, wanted: impl Fn(&Value) -> bool) -> Value {
        let topic = self.topic("label_request");
        let got = self.peer.collect_until(Duration::from_secs(30), |m| {
            requests(m, &topic).iter().any(&wanted)
        });
        requests(&got, &topic)
            .into_iter()
            .find(|v| wanted(v))
            .unwrap_or_else(|| {
                panic!(
                    "no such label request; the daemon said:\n{}",
                    self.daemon.log_text()
                )
            })
    }
}

#[test]
fn the_daemon_asks_within_its_budget_and_takes_answers_by_class_name_and_by_id() {
    let mut d = device("edgemt-test/requests", 600.0);
    // A fresh start says that nothing is asked (replacing what a previous run left).
    let first = d.request_where(|_| true);
    assert!(!is_open(&first), "{first}");

    d.send_samples("a", 0..200);
    let r1 = d.request_where(is_open);
    let id1 = r1["id"].as_str().unwrap().to_string();
    assert!(id1.starts_with('a'), "asked about a sample sent: {r1}");
    let options = r1["options"].as_array().unwrap();
    assert_eq!(options.len(), 6);
    assert!(options.contains(&r1["served"]), "{r1}");
    assert!(["disagreement", "uncertain"].contains(&r1["reason"].as_str().unwrap()));
    // One request open at a time: the other 199 samples raise none while it waits.
    let m = d.metrics_where(WAIT, |v| {
        num(v, "predictions_total") >= 200.0 && num(v, "requests_total") >= 1.0
    });
    assert_eq!(num(&m, "requests_total"), 1.0, "{m}");
    assert_eq!(num(&m, "requests_open"), 1.0, "{m}");

    // The answer names a class, as Home Assistant's select sends it: the request closes
    // and the sample is labelled.
    d.peer.publish(&d.topic("label_request/answer"), "WALKING");
    let closed = d.request_where(|v| !is_open(v));
    assert!(!is_open(&closed));
    let m = d.metrics_where(WAIT, |v| {
        num(v, "requests_answered_total") == 1.0 && num(v, "feedback_total") == 1.0
    });
    assert_eq!(num(&m, "requests_open"), 0.0, "{m}");

    // With none open, an answer goes nowhere: refused and counted.
    d.peer.publish(&d.topic("label_request/answer"), "SITTING");
    d.metrics_where(WAIT, |v| num(v, "answers_refused_total") == 1.0);

    // A new request, answered by its id on the labels topic.
    d.send_samples("b", 0..200);
    let r2 =
        d.request_where(|v| is_open(v) && v["id"].as_str().is_some_and(|id| id.starts_with('b')));
    let id2 = r2["id"].as_str().unwrap();
    d.peer.publish(
        &d.topic("labels"),
        serde_json::json!({ "id": id2, "label": 3 }).to_string(),
    );
    let m = d.metrics_where(WAIT, |v| num(v, "requests_answered_total") == 2.0);
    assert_eq!(num(&m, "feedback_total"), 2.0, "{m}");

    // An answer naming another request than the open one is refused, and leaves it open.
    d.send_samples("c", 0..100);
    let r3 =
        d.request_where(|v| is_open(v) && v["id"].as_str().is_some_and(|id| id.starts_with('c')));
    d.peer.publish(
        &d.topic("label_request/answer"),
        serde_json::json!({ "label": "LAYING", "id": id1 }).to_string(),
    );
    let m = d.metrics_where(WAIT, |v| num(v, "answers_refused_total") == 2.0);
    assert_eq!(num(&m, "requests_open"), 1.0, "{m}: {r3}");
    assert_eq!(num(&m, "requests_answered_total"), 2.0);
    // Never more than the budget: a tenth of the samples seen.
    assert!(
        num(&m, "requests_total") <= 0.1 * num(&m, "samples_total"),
        "{m}"
    );
    assert!(d.daemon.terminate().0.success());
}

#[test]
fn an_unanswered_request_expires_is_counted_and_its_late_answer_is_refused() {
    let mut d = device("edgemt-test/expiry", 1.0);
    d.send_samples("a", 0..100);
    let r = d.request_where(is_open);
    let id = r["id"].as_str().unwrap().to_string();
    let closed = d.request_where(|v| !is_open(v));
    assert!(!is_open(&closed));
    let m = d.metrics_where(WAIT, |v| num(v, "requests_expired_total") >= 1.0);
    assert_eq!(num(&m, "requests_answered_total"), 0.0);
    d.peer.publish(
        &d.topic("label_request/answer"),
        serde_json::json!({ "label": "WALKING", "id": id }).to_string(),
    );
    let m = d.metrics_where(WAIT, |v| num(v, "answers_refused_total") == 1.0);
    assert_eq!(
        num(&m, "feedback_total"),
        0.0,
        "the expired request's sample was not labelled"
    );
    assert!(d.daemon.terminate().0.success());
}

#[test]
fn answered_requests_make_the_gate_serve_the_adapted_teacher_on_a_shifted_sensor() {
    // The shipped target stream (a sensor mounted differently), no calibration: the adapted
    // teacher becomes better than the pretrained model, and only the answers can show it.
    let d = device("edgemt-test/requests-gate", 600.0);
    let samples = stream(771);
    let truth = |id: &str| -> usize {
        let i: usize = id[1..].parse().unwrap();
        samples[i]["truth"].as_u64().unwrap() as usize
    };
    let topic = d.topic("label_request");
    let mut answered = std::collections::HashSet::new();
    // Twice through the recording (the person repeats their day), so that enough answers
    // fall where the two models disagree.
    let chunks = ["t", "u"].into_iter().flat_map(|pass| {
        samples
            .chunks(10)
            .enumerate()
            .map(move |(round, chunk)| (pass, round, chunk))
    });
    for (pass, round, chunk) in chunks {
        for (j, s) in chunk.iter().enumerate() {
            let i = round * 10 + j;
            // Only the answers label anything.
            let mut s = s.clone();
            s.as_object_mut().unwrap().remove("label");
            d.peer.publish(
                &d.topic("samples"),
                sample_with_id(&s, &format!("{pass}{i}")),
            );
        }
        // Answer the open request, if one came, from the recording's truth: by id on the
        // labels topic and by class name on the answer topic, in turn.
        let got = d.peer.collect_until(Duration::from_millis(300), |m| {
            requests(m, &topic)
                .iter()
                .any(|v| is_open(v) && !answered.contains(v["id"].as_str().unwrap()))
        });
        for r in requests(&got, &topic).into_iter().filter(is_open) {
            let id = r["id"].as_str().unwrap().to_string();
            if !answered.insert(id.clone()) {
                continue;
            }
            let label = truth(&id);
            if answered.len() % 2 == 0 {
                d.peer.publish(
                    &d.topic("labels"),
                    serde_json::json!({ "id": id, "label": label }).to_string(),
                );
            } else {
                let name = r["options"][label].as_str().unwrap();
                d.peer.publish(&d.topic("label_request/answer"), name);
            }
        }
    }
    let m = d.metrics_where(WAIT, |v| num(v, "serving_adapted") == 1.0);
    assert!(num(&m, "gate_switches_total") >= 1.0, "{m}");
    assert!(num(&m, "requests_answered_total") >= 10.0, "{m}");
    assert!(
        num(&m, "requests_total") <= 0.1 * num(&m, "samples_total"),
        "{m}"
    );
    assert_eq!(num(&m, "answers_refused_total"), 0.0, "{m}");
}
