//! Where the worker stages' output goes: small sink traits, so the stages format and count
//! what they publish without holding a transport (inference: predictions and the current
//! activity; training: the open label request), and the MQTT adapter that implements both.

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

/// Publishes through the MQTT client's request queue (`try_publish`: a full queue is a drop,
/// never a wait).
#[derive(Clone)]
pub struct MqttSink {
    pub client: AsyncClient,
    pub predictions_topic: String,
    pub state_topic: String,
    pub label_request_topic: String,
    pub qos: QoS,
}

impl PredictionSink for MqttSink {
    fn prediction(&mut self, payload: Vec<u8>) -> bool {
        self.client
            .try_publish(&self.predictions_topic, self.qos, false, payload)
            .is_ok()
    }

    fn state(&mut self, payload: Vec<u8>) -> bool {
        self.client
            .try_publish(&self.state_topic, QoS::AtLeastOnce, true, payload)
            .is_ok()
    }
}

impl RequestSink for MqttSink {
    fn label_request(&mut self, payload: Vec<u8>) -> bool {
        self.client
            .try_publish(&self.label_request_topic, QoS::AtLeastOnce, true, payload)
            .is_ok()
    }
}
