//! The MQTT side: connection options, the event-loop task, subscriptions and discovery.
//!
//! rumqttc's event loop must be polled continuously, so it gets a task that only polls and
//! routes: every publish from here is `try_publish` (never waits on a full queue), the loop
//! backs off between failed reconnects itself (rumqttc does not), and subscriptions, the
//! retained `online` status and discovery configs are renewed on every ConnAck because a
//! clean session forgets them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};

use super::ingest::{Ingest, Topics};
use super::state::{Shared, DISCOVERED};
use super::DaemonError;
use crate::config::MqttConfig;

pub fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "edgemt".into())
}

/// The password from, in order: `password`, `password_file`, `password_env`, or the systemd
/// credential `mqtt-password`.
fn password(cfg: &MqttConfig) -> Result<Option<String>, DaemonError> {
    if let Some(p) = &cfg.password {
        return Ok(Some(p.clone()));
    }
    if let Some(path) = &cfg.password_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DaemonError::Setup(format!("mqtt.password_file {}: {e}", path.display()))
        })?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    if let Some(var) = &cfg.password_env {
        let value = std::env::var(var)
            .map_err(|_| DaemonError::Setup(format!("mqtt.password_env: ${var} is not set")))?;
        return Ok(Some(value));
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        if let Ok(text) = std::fs::read_to_string(std::path::Path::new(&dir).join("mqtt-password"))
        {
            return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
        }
    }
    Ok(None)
}

pub fn options(
    cfg: &MqttConfig,
    client_id: &str,
    topics: &Topics,
) -> Result<MqttOptions, DaemonError> {
    let mut opts = MqttOptions::new(client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    opts.set_clean_session(true);
    // Oversized payloads are ours to reject and count; rumqttc would drop the connection.
    opts.set_max_packet_size(
        cfg.max_payload_bytes.max(1 << 20).saturating_mul(4),
        1 << 20,
    );
    opts.set_request_channel_capacity(cfg.request_queue);
    opts.set_last_will(LastWill::new(&topics.status, "offline", qos(cfg.qos), true));
    if let Some(user) = &cfg.username {
        opts.set_credentials(user, password(cfg)?.unwrap_or_default());
    }
    if cfg.tls {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| DaemonError::Setup(format!("mqtt.{key} {}: {e}", p.display())))
        };
        let ca = read(
            "ca_file",
            cfg.ca_file.as_deref().unwrap_or(std::path::Path::new("")),
        )?;
        let client_auth = match (&cfg.client_cert, &cfg.client_key) {
            (Some(cert), Some(key)) => Some((read("client_cert", cert)?, read("client_key", key)?)),
            _ => None,
        };
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(opts)
}

/// Home Assistant discovery configs (retained) for the main metrics.
fn publish_discovery(client: &AsyncClient, cfg: &MqttConfig, client_id: &str, topics: &Topics) {
    if cfg.discovery_prefix.is_empty() {
        return;
    }
    let node: String = client_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    for (key, unit) in DISCOVERED {
        let mut config = serde_json::json!({
            "name": key.replace('_', " "),
            "unique_id": format!("{node}_{key}"),
            "state_topic": topics.metrics,
            "value_template": format!("{{{{ value_json.{key} }}}}"),
            "availability_topic": topics.status,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": {"identifiers": [node], "name": format!("edgemt {client_id}"), "manufacturer": "edgemt"},
        });
        if !unit.is_empty() {
            config["unit_of_measurement"] = serde_json::Value::from(*unit);
        }
        let topic = format!("{}/sensor/{node}/{key}/config", cfg.discovery_prefix);
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, config.to_string());
    }
}

pub struct PollTask {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub cfg: MqttConfig,
    pub client_id: String,
    pub shared: Arc<Shared>,
    pub ingest: Ingest,
}

impl PollTask {
    /// Polls until a requested disconnect has gone out (or the connection is gone while
    /// stopping). Never returns on broker errors: it backs off and reconnects.
    pub async fn run(mut self) {
        let min = Duration::from_millis(self.cfg.reconnect_min_ms);
        let max = Duration::from_millis(self.cfg.reconnect_max_ms);
        let mut backoff = min;
        let mut down_since = Some(Instant::now());
        let qos = qos(self.cfg.qos);
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = min;
                    self.shared.connected.store(true, Relaxed);
                    if let Some(since) = down_since.take() {
                        let ms = since.elapsed().as_millis() as u64;
                        self.shared
                            .counters
                            .mqtt_disconnected_ms_total
                            .fetch_add(ms, Relaxed);
                    }
                    tracing::info!("connected to mqtt://{}:{}", self.cfg.host, self.cfg.port);
                    for topic in self.ingest.topics.inputs() {
                        if let Err(e) = self.client.try_subscribe(topic, qos) {
                            tracing::error!("subscribing to {topic}: {e}");
                        }
                    }
                    let _ = self.client.try_publish(
                        &self.ingest.topics.status,
                        QoS::AtLeastOnce,
                        true,
                        "online",
                    );
                    publish_discovery(
                        &self.client,
                        &self.cfg,
                        &self.client_id,
                        &self.ingest.topics,
                    );
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.ingest.handle(&p.topic, &p.payload),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    if self.shared.stopping.load(Relaxed) && down_since.is_some() {
                        break;
                    }
                    if self.shared.connected.swap(false, Relaxed) {
                        self.shared
                            .counters
                            .mqtt_reconnects_total
                            .fetch_add(1, Relaxed);
                        down_since = Some(Instant::now());
                        tracing::warn!("lost the broker: {e}; reconnecting with backoff");
                    } else {
                        tracing::debug!("still no broker: {e}; next try in {backoff:?}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }
}
