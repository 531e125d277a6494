//! Where the worker stages' output goes: small sink traits, so the stages format and count
//! what they publish without holding a transport (inference: predictions and the current
//! activity; training: the open label request), the MQTT adapter that implements both, and
//! the [`Outbox`] every publish of the daemon goes through.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;

/// Takes what inference publishes. Both calls hand the payload over without waiting and
/// return false when the transport could not take it (the caller counts the drop).
pub trait PredictionSink: Send {
    /// One prediction (`{prefix}/predictions`).
    fn prediction(&mut self, payload: Vec<u8>) -> bool;
    /// The current activity, retained (`{prefix}/state`).
    fn state(&mut self, payload: Vec<u8>) -> bool;
}

/// Takes what the training stage publishes.
pub trait RequestSink: Send {
    /// The open label request, or that none is open, retained (`{prefix}/label_request`).
    fn label_request(&mut self, payload: Vec<u8>) -> bool;
}

/// Where each worker stage publishes.
pub struct Sinks {
    pub predictions: Box<dyn PredictionSink>,
    pub requests: Box<dyn RequestSink>,
}

/// The one way the daemon publishes: into the client's request queue without waiting
/// (`try_publish`: a full queue is a drop, never a wait), and for QoS 1 noting the topic in
/// the order the requests enter that queue. rumqttc numbers a QoS 1 packet when it takes it
/// from the queue and reports the broker's answer (a PubAck, which may be a refusal) by that
/// number alone; the MQTT task matches the numbers to these topics in the same order
/// (the ledger in `refusals.rs`).
pub struct Outbox {
    client: AsyncClient,
    /// Topics of the QoS 1 publishes queued and not yet numbered, oldest first.
    unnumbered: Mutex<VecDeque<Arc<str>>>,
    /// A bound on `unnumbered`: the request queue's capacity plus every packet id, more than
    /// rumqttc can hold unnumbered; beyond it the list has lost step and the oldest go.
    limit: usize,
}

impl Outbox {
    pub fn new(client: AsyncClient, request_queue: usize) -> Self {
        Outbox {
            client,
            unnumbered: Mutex::new(VecDeque::new()),
            limit: request_queue.saturating_add(usize::from(u16::MAX)),
        }
    }

    /// Queues a publish; false when the request queue is full (nothing was queued).
    pub fn publish(&self, topic: &Arc<str>, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        if qos == QoS::AtMostOnce {
            return self
                .client
                .try_publish(&**topic, qos, retain, payload)
                .is_ok();
        }
        // Held across the queueing, so the list's order is the queue's order.
        let mut unnumbered = self.unnumbered.lock().unwrap_or_else(|e| e.into_inner());
        let queued = self
            .client
            .try_publish(&**topic, qos, retain, payload)
            .is_ok();
        if queued {
            if unnumbered.len() >= self.limit {
                unnumbered.pop_front();
            }
            unnumbered.push_back(topic.clone());
        }
        queued
    }

    /// The topic of the oldest QoS 1 publish not yet numbered: rumqttc has just numbered it.
    pub fn numbered(&self) -> Option<Arc<str>> {
        self.unnumbered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Forgets the `n` oldest unnumbered publishes: rumqttc dropped them (a new session).
    pub fn forget_oldest(&self, n: usize) {
        let mut unnumbered = self.unnumbered.lock().unwrap_or_else(|e| e.into_inner());
        let n = n.min(unnumbered.len());
        unnumbered.drain(..n);
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

/// Publishes the stages' output through the [`Outbox`].
#[derive(Clone)]
pub struct MqttSink {
    pub outbox: Arc<Outbox>,
    pub predictions_topic: Arc<str>,
    pub state_topic: Arc<str>,
    pub label_request_topic: Arc<str>,
    pub qos: QoS,
}

impl PredictionSink for MqttSink {
    fn prediction(&mut self, payload: Vec<u8>) -> bool {
        self.outbox
            .publish(&self.predictions_topic, self.qos, false, payload)
    }

    fn state(&mut self, payload: Vec<u8>) -> bool {
        self.outbox
            .publish(&self.state_topic, QoS::AtLeastOnce, true, payload)
    }
}

impl RequestSink for MqttSink {
    fn label_request(&mut self, payload: Vec<u8>) -> bool {
        self.outbox
            .publish(&self.label_request_topic, QoS::AtLeastOnce, true, payload)
    }
}
