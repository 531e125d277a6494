//! Where the inference stage's output goes: a small sink trait, so the stage formats and
//! counts predictions without holding a transport, and the MQTT adapter that implements it.

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

/// Publishes through the MQTT client's request queue (`try_publish`: a full queue is a drop,
/// never a wait).
pub struct MqttSink {
    pub client: AsyncClient,
    pub predictions_topic: String,
    pub state_topic: String,
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
