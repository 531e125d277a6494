//! The test broker itself (tests/util/broker.rs): what the daemon tests take for granted
//! about it, checked without a daemon, so that a failing daemon test points at the daemon.

use std::time::Duration;

use crate::util::broker::{on, Broker, BrokerOptions, MqttPeer, PeerOptions};

/// `mosquitto_pub -q 1`: returns once the broker has acknowledged the message.
fn publish_qos1(port: u16, topic: &str, message: &str) {
    let ok = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", topic, "-q", "1", "-m", message])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mosquitto_pub -q 1 {message:?}");
}

#[test]
fn a_persistent_session_survives_a_graceful_broker_restart_with_its_queued_qos1_messages() {
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        unlimited_queues: true,
        ..Default::default()
    });
    let topic = "harness/persisted";
    let persistent = || PeerOptions {
        persistent: true,
        ..Default::default()
    };
    let peer = MqttPeer::connect_with(broker.port, "harness-peer", &[topic], persistent());

    // Connected through the restart: the peer reconnects by itself and the broker restored
    // its subscription from disk.
    broker.stop_gracefully();
    broker.restart();
    publish_qos1(broker.port, topic, "after the restart");
    let got = peer.collect_until(Duration::from_secs(15), |m| on(m, topic).count() > 0);
    assert_eq!(
        on(&got, topic).collect::<Vec<_>>(),
        ["after the restart"],
        "broker log:\n{}",
        broker.log_text()
    );

    // Away during a publish and a restart: the message waits in the saved session.
    peer.disconnect();
    publish_qos1(broker.port, topic, "while away");
    broker.stop_gracefully();
    broker.restart();
    let peer = MqttPeer::connect_with(broker.port, "harness-peer", &[], persistent());
    let got = peer.collect_until(Duration::from_secs(15), |m| on(m, topic).count() > 0);
    assert_eq!(
        on(&got, topic).collect::<Vec<_>>(),
        ["while away"],
        "broker log:\n{}",
        broker.log_text()
    );
}
