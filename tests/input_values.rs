//! What the daemon predicts for assembled inputs, checked by value against the library's
//! own prediction of the same sample: windows assembled from rows in every accepted form,
//! raw f32le samples, and a channel-first model fed time-major rows. A transposed window, a
//! wrong hop or a byte-order bug changes the numbers, not just the counts.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::util::broker::{daemon_config, last_metrics, num, on, Broker, Daemon, MqttPeer};
use crate::util::{self, stream, tempdir};

/// Starts a paused daemon (so the pretrained model answers every sample) on `model` with
/// `extra` config, and a peer subscribed to its predictions.
fn paused_daemon(
    dir: &Path,
    broker: &Broker,
    prefix: &str,
    model: &Path,
    extra: &str,
) -> (Daemon, MqttPeer) {
    let cfg = daemon_config(dir, broker, prefix, extra);
    // Another model: the shipped model's embedding reference does not fit it.
    let text: String = std::fs::read_to_string(&cfg)
        .unwrap()
        .replacen(
            &format!(
                "{:?}",
                util::path("models/hapt_mlp.onnx").display().to_string()
            ),
            &format!("{:?}", model.display().to_string()),
            1,
        )
        .lines()
        .filter(|l| !l.starts_with("reference = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cfg, text).unwrap();
    let metrics = format!("{prefix}/metrics");
    let peer = MqttPeer::connect(
        broker.port,
        &format!("{prefix}-peer"),
        &[&format!("{prefix}/predictions"), &metrics],
    );
    let daemon = Daemon::start(&cfg, &[]);
    peer.collect_until(Duration::from_secs(10), |m| on(m, &metrics).count() > 0);
    peer.publish(&format!("{prefix}/cmd"), "pause");
    let got = peer.collect_until(Duration::from_secs(10), |m| {
        last_metrics(m, &metrics).is_some_and(|v| num(&v, "paused") == 1.0)
    });
    assert_eq!(num(&last_metrics(&got, &metrics).unwrap(), "paused"), 1.0);
    (daemon, peer)
}

/// The predictions received, by id, once `n` have arrived.
fn predictions(peer: &MqttPeer, prefix: &str, n: usize) -> HashMap<String, (u64, f64)> {
    let topic = format!("{prefix}/predictions");
    let got = peer.collect_until(Duration::from_secs(15), |m| on(m, &topic).count() >= n);
    on(&got, &topic)
        .map(|p| {
            let v: Value = serde_json::from_str(&p).unwrap();
            assert_eq!(v["serving"], "pretrained", "{v}");
            (
                v["id"].as_str().unwrap().to_string(),
                (
                    v["class"].as_u64().unwrap(),
                    v["confidence"].as_f64().unwrap(),
                ),
            )
        })
        .collect()
}

fn assert_same(got: &HashMap<String, (u64, f64)>, id: &str, want: (u64, f64), what: &str) {
    let (class, confidence) = got
        .get(id)
        .unwrap_or_else(|| panic!("no prediction {id} for {what}: {got:?}"));
    assert_eq!(*class, want.0, "{what}: class");
    assert!(
        (confidence - want.1).abs() < 1e-5,
        "{what}: confidence {confidence} vs the library's {}",
        want.1
    );
}

#[test]
fn windows_assembled_from_rows_in_every_form_predict_exactly_as_their_samples() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/rows";
    let model = util::path("models/hapt_mlp.onnx");
    // Calibration off and hop = window, so window k is exactly sample k.
    let (mut daemon, peer) =
        paused_daemon(dir.path(), &broker, prefix, &model, "[input]\nhop = 64\n");
    let samples: Vec<Vec<f32>> = stream(3).iter().map(util::sample_x).collect();
    let want = util::pretrained_predictions(&model, &samples);
    let rows = format!("{prefix}/rows");
    let row = |s: &[f32], t: usize| s[t * 6..(t + 1) * 6].to_vec();
    // Sample 0: arrays of 16 rows.
    for chunk in 0..4 {
        let block: Vec<Vec<f32>> = (chunk * 16..(chunk + 1) * 16)
            .map(|t| row(&samples[0], t))
            .collect();
        peer.publish(&rows, serde_json::to_string(&block).unwrap());
    }
    // Sample 1: one row per message.
    for t in 0..64 {
        peer.publish(&rows, serde_json::to_string(&row(&samples[1], t)).unwrap());
    }
    // Sample 2: the {"rows": ...} form, 32 rows at a time.
    for half in 0..2 {
        let block: Vec<Vec<f32>> = (half * 32..(half + 1) * 32)
            .map(|t| row(&samples[2], t))
            .collect();
        peer.publish(&rows, serde_json::json!({ "rows": block }).to_string());
    }
    let got = predictions(&peer, prefix, 3);
    assert_eq!(got.len(), 3, "exactly one window per 64 rows: {got:?}");
    assert_same(&got, "#1", want[0], "rows in blocks");
    assert_same(&got, "#2", want[1], "single rows");
    assert_same(&got, "#3", want[2], "the {\"rows\": ...} form");
    assert!(daemon.terminate().0.success());
}

#[test]
fn raw_f32le_samples_and_rows_predict_exactly_as_the_json_sample() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/f32values";
    let model = util::path("models/hapt_mlp.onnx");
    let (mut daemon, peer) = paused_daemon(
        dir.path(),
        &broker,
        prefix,
        &model,
        "[input]\nformat = \"f32le\"\nhop = 64\n",
    );
    let samples: Vec<Vec<f32>> = stream(3).iter().map(util::sample_x).collect();
    let want = util::pretrained_predictions(&model, &samples);
    let le = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    peer.publish(&format!("{prefix}/samples"), le(&samples[0]));
    peer.publish(&format!("{prefix}/samples"), le(&samples[1]));
    // Sample 2 as f32le rows, 8 rows (48 floats) per message.
    for chunk in samples[2].chunks(48) {
        peer.publish(&format!("{prefix}/rows"), le(chunk));
    }
    let got = predictions(&peer, prefix, 3);
    assert_same(&got, "#1", want[0], "f32le sample 0");
    assert_same(&got, "#2", want[1], "f32le sample 1");
    assert_same(&got, "#3", want[2], "f32le rows of sample 2");
    assert!(daemon.terminate().0.success());
}

#[test]
fn a_channel_first_model_fed_time_major_rows_predicts_its_transposed_window() {
    let dir = tempdir();
    let broker = Broker::start();
    let prefix = "edgemt-test/chfirst";
    let model = util::path("tests/data/models/cnn_gemm_softmax.onnx");
    let (mut daemon, peer) =
        paused_daemon(dir.path(), &broker, prefix, &model, "[input]\nhop = 64\n");
    // Rows as a sensor sends them: time-major, 6 channels a row.
    let rows = util::rows_of(&stream(2));
    // The model reads [6, 64]: channel c's 64 steps, then channel c + 1's.
    let windows: Vec<Vec<f32>> = rows
        .chunks(64)
        .map(|w| (0..6).flat_map(|c| w.iter().map(move |r| r[c])).collect())
        .collect();
    let want = util::pretrained_predictions(&model, &windows);
    for block in rows.chunks(16) {
        peer.publish(
            &format!("{prefix}/rows"),
            serde_json::to_string(block).unwrap(),
        );
    }
    let got = predictions(&peer, prefix, 2);
    assert_same(&got, "#1", want[0], "channel-first window 0");
    assert_same(&got, "#2", want[1], "channel-first window 1");
    assert!(daemon.terminate().0.success());
}

/// Feeds rows 1, 2, 3, … (row r = [r, 10·r]) and returns (row count, window) per window.
fn windows(layout: edgemt::stream::Layout, hop: usize, rows: usize) -> Vec<(usize, Vec<f32>)> {
    let mut w = edgemt::stream::WindowAssembler::new(layout, hop);
    (1..=rows)
        .filter_map(|r| {
            w.push_row(&[r as f32, 10.0 * r as f32])
                .map(|window| (r, window))
        })
        .collect()
}

#[test]
fn a_window_comes_once_it_is_full_then_every_hop_rows_with_the_latest_rows_in_order() {
    let time_major = edgemt::stream::Layout {
        steps: 4,
        channels: 2,
        step_stride: 2,
        channel_stride: 1,
    };
    let got = windows(time_major, 2, 8);
    assert_eq!(
        got,
        vec![
            (4, vec![1., 10., 2., 20., 3., 30., 4., 40.]),
            (6, vec![3., 30., 4., 40., 5., 50., 6., 60.]),
            (8, vec![5., 50., 6., 60., 7., 70., 8., 80.]),
        ]
    );
    // A hop longer than the window skips rows, but the first window still comes when full.
    let at: Vec<usize> = windows(time_major, 6, 16).iter().map(|w| w.0).collect();
    assert_eq!(at, vec![4, 10, 16]);
    // A channel-first model gets the same rows transposed.
    let channel_first = edgemt::stream::Layout {
        steps: 4,
        channels: 2,
        step_stride: 1,
        channel_stride: 4,
    };
    assert_eq!(
        windows(channel_first, 4, 4),
        vec![(4, vec![1., 2., 3., 4., 10., 20., 30., 40.])]
    );
}

#[test]
fn raw_rows_must_be_a_whole_nonzero_number_of_rows() {
    use edgemt::stream::window::rows_from_f32le;
    let bytes: Vec<u8> = [1f32, 10., 2., 20.]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let mut out = Vec::new();
    assert_eq!(rows_from_f32le(&bytes, 2, &mut out).unwrap(), 2);
    assert_eq!(out, vec![1., 10., 2., 20.]);
    assert!(
        rows_from_f32le(&bytes[..12], 2, &mut out).is_err(),
        "1.5 rows"
    );
    assert!(
        matches!(
            rows_from_f32le(&bytes[..6], 2, &mut out),
            Err(edgemt::stream::DecodeError::WrongLength {
                got: 6,
                expected: 4,
                ..
            })
        ),
        "a ragged float: 6 bytes, of which 4 make whole values"
    );
    assert!(rows_from_f32le(&[], 2, &mut out).is_err(), "no row at all");
}
