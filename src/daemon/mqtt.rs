//! The MQTT side: connection options, the event-loop task, subscriptions and discovery.
//!
//! MQTT 5 (rumqttc's v5 client), for what 3.1.1 cannot say: the largest packet we take
//! (so a huge retained message cannot drop the connection forever) and a session that
//! outlives a reconnect (so QoS 1 messages sent meanwhile are queued, not lost).
//!
//! rumqttc's event loop must be polled continuously, so it gets a task that only polls and
//! routes: every publish from here is `try_publish` (never waits on a full queue), the loop
//! backs off between failed reconnects itself (rumqttc does not) and tells the operator
//! why, and subscriptions, the retained `online` status and discovery configs are renewed on
//! every ConnAck. It also reads the broker's answers: refused publishes and subscriptions are
//! matched to their topics, counted and told ([`super::refusals`]).
//!
//! rumqttc 0.25 stalls on a refused PubAck. When its next packet id catches up with a
//! publish still waiting for its PubAck (a "collision"), it holds every later request until
//! that PubAck comes; but a PubAck with a refusal skips the code that lets the held publish
//! go, so every output stops until the keepalive drops the connection, and since the held
//! publish outlives reconnects, for good. [`PollTask::release_collision`] lets it go.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{ConnectionError, Event, EventLoop, MqttOptions, Request, StateError};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use super::config::MqttConfig;
use super::error::DaemonError;
use super::ingest::{Router, Topics};
use super::publish::Outbox;
use super::refusals::{self, Ledger, Refusals};
use super::state::Shared;

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

/// Bytes an MQTT PUBLISH may carry beyond its payload: fixed header, a topic of up to 65,535
/// bytes, packet id and properties.
const PACKET_OVERHEAD: usize = 70_000;

/// How long a connection must last before a later failure starts the backoff from the
/// bottom again: a connection the broker drops at once (a message the client cannot take,
/// a kicked duplicate client id) must not turn into a reconnect storm.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

pub fn options(
    cfg: &MqttConfig,
    client_id: &str,
    topics: &Topics,
) -> Result<MqttOptions, DaemonError> {
    let mut opts = MqttOptions::new(client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_s));
    // With QoS 1 the broker keeps our subscriptions and queues messages while we are away;
    // with QoS 0 there is nothing to keep.
    let persistent = cfg.qos > 0 && cfg.session_expiry_s > 0;
    opts.set_clean_start(!persistent);
    if persistent {
        opts.set_session_expiry_interval(Some(cfg.session_expiry_s));
    }
    // MQTT 5's Maximum Packet Size: the broker does not send us what we would reject, so a
    // huge (retained or queued) message cannot kill the connection over and over. It is
    // also rumqttc's limit for what it reads, which bounds its buffer.
    let max_packet = cfg.max_payload_bytes.saturating_add(PACKET_OVERHEAD);
    opts.set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)));
    opts.set_request_channel_capacity(cfg.request_queue);
    opts.set_connection_timeout(cfg.connect_timeout_s);
    opts.set_last_will(LastWill::new(
        &topics.status,
        "offline",
        qos(cfg.qos),
        true,
        None,
    ));
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

pub struct PollTask {
    pub eventloop: EventLoop,
    pub outbox: Arc<Outbox>,
    pub cfg: MqttConfig,
    pub client_id: String,
    pub shared: Arc<Shared>,
    pub router: Router,
    /// Told once, at the first successful connection (systemd's READY waits for it).
    pub connected: Option<tokio::sync::oneshot::Sender<()>>,
    /// Home Assistant discovery messages, re-sent at every connection; empty when off.
    pub discovery: Vec<(String, serde_json::Value)>,
}

/// Why a connection attempt or a connection failed, in words an operator can act on.
pub fn explain(e: &ConnectionError) -> String {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code;
    match e {
        ConnectionError::ConnectionRefused(Code::BadUserNamePassword) => {
            "the broker refused the user name or password (check [mqtt] username and password)"
                .into()
        }
        ConnectionError::ConnectionRefused(Code::NotAuthorized) => {
            "the broker says this client is not authorised (check [mqtt] username, password and the broker's ACL)".into()
        }
        ConnectionError::ConnectionRefused(Code::ClientIdentifierNotValid) => {
            "the broker refused the client id (check [mqtt] client_id)".into()
        }
        ConnectionError::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        ConnectionError::Tls(e) => format!("TLS handshake failed: {e} (check [mqtt] ca_file and that the broker's certificate names this host)"),
        ConnectionError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: nothing listens there (is the broker running, is the port right?)".into()
        }
        ConnectionError::Io(e) => format!("network error: {e}"),
        ConnectionError::Timeout(_) => "no answer from the broker in time".into(),
        ConnectionError::MqttState(StateError::IncomingPacketTooLarge { pkt_size, max }) => {
            format!("the broker sent a message of {pkt_size} bytes, over our limit of {max}")
        }
        ConnectionError::MqttState(StateError::Io(e)) => format!("connection lost: {e}"),
        other => other.to_string(),
    }
}

impl PollTask {
    /// Polls until a requested disconnect has gone out (or the connection is gone while
    /// stopping). Never returns on broker errors: it backs off and reconnects, and says why
    /// at warn level (the same reason at most once a minute).
    pub async fn run(mut self) {
        let min = Duration::from_millis(self.cfg.reconnect_min_ms);
        let max = Duration::from_millis(self.cfg.reconnect_max_ms);
        let mut backoff = min;
        let mut down_since = Some(Instant::now());
        let mut up_since: Option<Instant> = None;
        let mut last_warning: Option<(String, Instant)> = None;
        let qos = qos(self.cfg.qos);
        let status_topic: Arc<str> = self.router.topics.status.as_str().into();
        let mut ledger = Ledger::new(self.outbox.clone());
        let mut refusals = Refusals::new(
            self.shared.clone(),
            self.cfg.username.as_deref(),
            &self.cfg.discovery_prefix,
        );
        let address = format!(
            "{}://{}:{}",
            if self.cfg.tls { "mqtts" } else { "mqtt" },
            self.cfg.host,
            self.cfg.port
        );
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    ledger.connected(ack.session_present);
                    if !ack.session_present {
                        // Nothing of the old session will be answered, so a publish held
                        // back for one of its packet ids would wait for ever.
                        self.release_collision(None);
                    }
                    up_since = Some(Instant::now());
                    last_warning = None;
                    self.shared.connected.store(true, Relaxed);
                    if let Some(since) = down_since.take() {
                        let ms = since.elapsed().as_millis() as u64;
                        self.shared
                            .counters
                            .mqtt_disconnected_ms_total
                            .fetch_add(ms, Relaxed);
                    }
                    tracing::info!(
                        "connected to {address}{}",
                        if ack.session_present {
                            " (resumed the broker's session)"
                        } else {
                            ""
                        }
                    );
                    if let Some(tx) = self.connected.take() {
                        let _ = tx.send(());
                    } else {
                        let serving = format!("serving: connected to {address}");
                        super::notify::status(&self.shared.serving_status(&serving));
                    }
                    // Subscribing again even to a resumed session is harmless: the broker
                    // only re-sends retained messages, which ingest ignores.
                    for topic in self.router.topics.inputs() {
                        match self.outbox.client().try_subscribe(topic, qos) {
                            Ok(()) => ledger.subscribing(topic),
                            Err(e) => tracing::error!("subscribing to {topic}: {e}"),
                        }
                    }
                    let out = &self.outbox;
                    out.publish(&status_topic, QoS::AtLeastOnce, true, b"online".to_vec());
                    for (topic, config) in &self.discovery {
                        let payload = config.to_string().into_bytes();
                        out.publish(&topic.as_str().into(), QoS::AtLeastOnce, true, payload);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let topic = ledger.puback(ack.pkid);
                    if refusals::publish_refused(ack.reason) {
                        self.release_collision(Some(ack.pkid));
                        refusals.publish(topic, ack.reason);
                    } else if refusals.accepted(topic) {
                        let serving = format!("serving: connected to {address}");
                        super::notify::status(&self.shared.serving_status(&serving));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let topic = ledger.suback(ack.pkid);
                    for code in &ack.return_codes {
                        if refusals::subscription_refused(code) {
                            refusals.subscription(topic.clone(), code);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => match std::str::from_utf8(&p.topic) {
                    Ok(topic) => self.router.route(topic, &p.payload, p.retain),
                    Err(_) => {
                        self.shared.counters.rejected_total.fetch_add(1, Relaxed);
                    }
                },
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(Event::Outgoing(event)) => ledger.outgoing(&event),
                Ok(_) => {}
                Err(e) => {
                    ledger.connection_lost(&self.eventloop.pending);
                    if self.shared.stopping.load(Relaxed) && down_since.is_some() {
                        break;
                    }
                    if let ConnectionError::MqttState(StateError::IncomingPacketTooLarge {
                        ..
                    }) = e
                    {
                        self.shared.counters.oversized_total.fetch_add(1, Relaxed);
                    }
                    if self.shared.connected.swap(false, Relaxed) {
                        self.shared
                            .counters
                            .mqtt_reconnects_total
                            .fetch_add(1, Relaxed);
                        down_since = Some(Instant::now());
                    }
                    if up_since
                        .take()
                        .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                    {
                        backoff = min;
                    }
                    let reason = explain(&e);
                    let repeated = last_warning.as_ref().is_some_and(|(r, at)| {
                        *r == reason && at.elapsed() < Duration::from_secs(60)
                    });
                    if repeated {
                        tracing::debug!("{address}: {reason}; next try in {backoff:?}");
                    } else {
                        tracing::warn!("broker {address}: {reason}; retrying in {backoff:?}");
                        super::notify::status(&format!("no broker at {address}: {reason}"));
                        last_warning = Some((reason, Instant::now()));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                }
            }
        }
    }

    /// Sends the publish rumqttc holds back for a packet id (`pkid`: the one just refused;
    /// none: whichever, the session being new) without waiting for an answer that will not
    /// come: it goes first, with the number it was given, as rumqttc sends it after a
    /// successful PubAck.
    fn release_collision(&mut self, pkid: Option<u16>) {
        let state = &mut self.eventloop.state;
        let held = state
            .collision
            .as_ref()
            .is_some_and(|p| pkid.is_none_or(|id| p.pkid == id));
        if let (true, Some(publish)) = (held, state.collision.take()) {
            state.collision_ping_count = 0;
            self.eventloop.pending.push_front(Request::Publish(publish));
        }
    }
}
