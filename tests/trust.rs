//! Label trust in the daemon, against a real mosquitto: the targeted swap (SITTING and
//! STANDING swapped on every 5th sample of the shipped control, honest elsewhere) sent on the
//! labels topic and inline on the samples topic is disputed, the pretrained model stays
//! served, and an operator's `accept_labels` releases what was held; inline labels are not
//! learned from at all unless `[input] inline_labels` says so.

use std::time::Duration;

use serde_json::Value;

use crate::util::broker::{num, Rig};
use crate::util::{recording_lines, sample_with_id, swapped_label};

/// How long a test waits for the daemon to get somewhere.
const WAIT: Duration = Duration::from_secs(60);

fn device(prefix: &'static str, extra: &str) -> Rig {
    Rig::start(
        prefix,
        "operator",
        &format!(
            "[control]\nallow = [\"pause\", \"resume\", \"accept_labels\", \"reset\"]\n[requests]\nenabled = false\n{extra}"
        ),
        &["metrics"],
    )
}

/// What these tests send a device.
trait Swapped {
    fn send_swapped_control(&self, inline: bool);
}

impl Swapped for Rig {
    /// The shipped control recording, twice, with the swap: on the labels topic by id, or
    /// inline in the samples.
    fn send_swapped_control(&self, inline: bool) {
        let lines = recording_lines("data/control_stream.jsonl");
        for pass in 0..2 {
            for (i, line) in lines.iter().enumerate() {
                let mut s = line.clone();
                s.as_object_mut().unwrap().remove("label");
                let truth = s["truth"].as_u64().unwrap();
                let label = swapped_label(i, truth);
                let id = format!("p{pass}-{i}");
                if inline {
                    if let Some(l) = label {
                        s["label"] = Value::from(l);
                    }
                }
                self.peer
                    .publish(&self.topic("samples"), sample_with_id(&s, &id));
                if let (false, Some(l)) = (inline, label) {
                    self.peer.publish(
                        &self.topic("labels"),
                        serde_json::json!({ "id": id, "label": l }).to_string(),
                    );
                }
                if i % 50 == 0 {
                    // Paced a little, so the labels meet their samples in the daemon's memory.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn swap_is_disputed_and_the_pretrained_model_stays_served(prefix: &'static str, inline: bool) {
    let extra = if inline {
        "[input]\ninline_labels = true\n"
    } else {
        ""
    };
    let mut d = device(prefix, extra);
    d.send_swapped_control(inline);
    // Everything taken in and learned from (so nothing arrives after the operator's word).
    let m = d.metrics_where(WAIT, |v| {
        num(v, "samples_total") >= 2.0 * 545.0
            && num(v, "input_queue") == 0.0
            && num(v, "train_queue") == 0.0
            && num(v, "labels_disputed") == 1.0
    });
    assert!(num(&m, "labels_disputes_total") >= 1.0, "{m}");
    assert!(num(&m, "labels_held_total") >= 5.0, "{m}");
    assert_eq!(num(&m, "serving_adapted"), 0.0, "{m}");
    let log = d.daemon.log_text();
    let dispute = log
        .lines()
        .find(|l| l.contains("labels disputed"))
        .expect("the log names the dispute");
    // ... and the door the held labels came through.
    let door = if inline { "inline" } else { "by_id" };
    assert!(
        dispute.contains(&format!("came from: {door} ")),
        "{dispute}"
    );
    // A reset goes back to the pretrained model but lowers nothing: the dispute stands and
    // the totals do not count down.
    d.peer.publish(&d.topic("cmd"), "reset");
    let after = d.metrics_where(WAIT, |v| num(v, "resets_total") >= 1.0);
    assert_eq!(num(&after, "labels_disputed"), 1.0, "{after}");
    assert!(
        num(&after, "labels_held_total") >= num(&m, "labels_held_total"),
        "{after}"
    );
    // The operator says the classes really changed their meaning: the held labels are
    // released and the dispute lowered.
    d.peer.publish(&d.topic("cmd"), "accept_labels");
    let m = d.metrics_where(WAIT, |v| num(v, "labels_disputed") == 0.0);
    assert!(num(&m, "labels_released_total") >= 5.0, "{m}");
    assert_eq!(num(&m, "labels_holding"), 0.0, "{m}");
    assert!(d.daemon.terminate().0.success());
}

#[test]
fn a_swap_of_two_classes_on_the_labels_topic_is_disputed_and_the_pretrained_model_stays_served() {
    swap_is_disputed_and_the_pretrained_model_stays_served("edgemt-test/trust-topic", false);
}

#[test]
fn a_swap_inline_on_the_samples_topic_is_disputed_when_inline_labels_are_enabled() {
    swap_is_disputed_and_the_pretrained_model_stays_served("edgemt-test/trust-inline", true);
}

#[test]
fn inline_labels_are_ignored_and_counted_by_default() {
    let mut d = device("edgemt-test/trust-inline-off", "");
    d.send_swapped_control(true);
    let m = d.metrics_where(WAIT, |v| num(v, "samples_total") >= 2.0 * 545.0);
    // 2 passes × 109 labeled lines.
    assert_eq!(num(&m, "inline_labels_ignored_total"), 218.0, "{m}");
    assert_eq!(num(&m, "labels_total"), 0.0, "{m}");
    assert_eq!(num(&m, "labels_disputed"), 0.0, "{m}");
    assert!(d.daemon.terminate().0.success());
}
