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
//!
//! Two clients with one client id take the session from each other: MQTT 5 brokers close
//! the older connection with DISCONNECT reason 0x8E (session taken over), the older one
//! reconnects and takes it back, and so on; brokers that do not send the reason (mosquitto
//! 2.0.11) just close the older connection, which leaves only the pattern: an accepted
//! connection closed without a reason, again and again. The task names the cause (or the
//! likely cause) with the client id, at most once a minute however often it happens
//! ([`Takeovers`]).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, LastWill, Packet};
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
    /// Home Assistant discovery messages (configs, and empty payloads that remove entities
    /// not announced), re-sent at every connection; empty when off.
    pub discovery: Vec<(String, Vec<u8>)>,
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
        e if taken_over(e) => {
            "the broker handed this session to another client that connected with the same client id".into()
        }
        other => other.to_string(),
    }
}

/// Whether the broker closed the connection because another client took the session
/// (MQTT 5 DISCONNECT reason 0x8E).
pub fn taken_over(e: &ConnectionError) -> bool {
    matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            ..
        })
    )
}

/// How often a session taken over is told: the two clients take it from each other at every
/// reconnect, and each time must not become a log line.
const TAKEOVER_LOG_PERIOD: Duration = Duration::from_secs(60);

/// A broker that closes a connection it had accepted, without a reason, this many times
/// within [`CLOSE_WINDOW`] is probably handing our session to another client with our
/// client id: a broker that does not send MQTT 5's reason 0x8E (mosquitto 2.0.11, Debian
/// 12's, just closes the older connection) leaves nothing else to go on. A broker restart
/// closes it once.
const CLOSES_SUSPECTED: usize = 3;
const CLOSE_WINDOW: Duration = Duration::from_secs(300);

/// Whether the connection ended without a word from the broker (no DISCONNECT).
fn closed_without_a_reason(e: &ConnectionError) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => {
            matches!(io.kind(), ConnectionReset | UnexpectedEof | BrokenPipe)
        }
        _ => false,
    }
}

/// Sessions taken over by another client with our client id, said by the broker (reason
/// 0x8E) or inferred from repeated closes ([`CLOSES_SUSPECTED`]): told at warn level at most
/// once per [`TAKEOVER_LOG_PERIOD`], with how many times it happened since the last line.
/// Unlike other connection failures, not forgotten at the next ConnAck, since every
/// takeover follows one.
#[derive(Default)]
struct Takeovers {
    /// When the broker closed an accepted connection without a reason, the newest last.
    closes: std::collections::VecDeque<Instant>,
    last_told: Option<Instant>,
    untold: u64,
}

impl Takeovers {
    /// Notes a connection failure (`was_up`: the connection had been accepted). True when it
    /// is a takeover, told or withheld here; false when the caller should report it as usual.
    fn note(
        &mut self,
        e: &ConnectionError,
        was_up: bool,
        address: &str,
        client_id: &str,
        backoff: Duration,
    ) -> bool {
        let said = taken_over(e);
        if !said {
            if !(was_up && closed_without_a_reason(e)) {
                return false;
            }
            let now = Instant::now();
            self.closes.push_back(now);
            while self.closes.len() > CLOSES_SUSPECTED
                || self
                    .closes
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > CLOSE_WINDOW)
            {
                self.closes.pop_front();
            }
            if self.closes.len() < CLOSES_SUSPECTED {
                return false;
            }
        }
        self.untold += 1;
        if self
            .last_told
            .is_some_and(|t| t.elapsed() < TAKEOVER_LOG_PERIOD)
        {
            tracing::debug!("{address}: session taken over again; next try in {backoff:?}");
            return true;
        }
        let times = if self.untold > 1 {
            format!(" ({} times since the last such line)", self.untold)
        } else {
            String::new()
        };
        if said {
            tracing::warn!(
                "broker {address}: session taken over by another client with client id \
                 {client_id}{times}: two clients (two edgemt instances?) share this [mqtt] \
                 client_id and take the session from each other; give each its own; retrying \
                 in {backoff:?}"
            );
        } else {
            tracing::warn!(
                "broker {address}: session taken over? The broker closed the connection \
                 without a reason {CLOSES_SUSPECTED} times within {CLOSE_WINDOW:?}{times}, each \
                 time after accepting it: possibly another client with client id {client_id} \
                 (a second edgemt with this [mqtt] client_id?) takes the session from this one; \
                 mosquitto then logs 'Client {client_id} already connected, closing old \
                 connection'; retrying in {backoff:?}"
            );
        }
        super::notify::status(&format!(
            "session taken over{} by another client with client id {client_id}",
            if said { "" } else { " (possibly)" }
        ));
        self.last_told = Some(Instant::now());
        self.untold = 0;
        true
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
        let mut takeovers = Takeovers::default();
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
                    for (topic, payload) in &self.discovery {
                        let payload = payload.clone();
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
                    let was_up = self.shared.connected.swap(false, Relaxed);
                    if was_up {
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
                    if takeovers.note(&e, was_up, &address, &self.client_id, backoff) {
                        // Told (or withheld, as a repeat) as a session taken over.
                    } else if repeated {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn closed() -> ConnectionError {
        ConnectionError::MqttState(StateError::ConnectionAborted)
    }

    fn said() -> ConnectionError {
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            reason_string: None,
        })
    }

    #[test]
    fn a_takeover_the_broker_names_is_told_at_once_and_then_once_a_minute() {
        let mut t = Takeovers::default();
        let note = |t: &mut Takeovers, e| t.note(&e, true, "mqtt://b:1883", "id", Duration::ZERO);
        assert!(note(&mut t, said()));
        let told = t.last_told.expect("told");
        assert!(note(&mut t, said()));
        assert_eq!(t.last_told, Some(told), "not told again within the minute");
        assert_eq!(t.untold, 1, "but counted for the next line");
    }

    #[test]
    fn the_third_close_of_an_accepted_connection_without_a_reason_is_a_suspected_takeover() {
        let mut t = Takeovers::default();
        let mut note = |e, was_up| t.note(&e, was_up, "mqtt://b:1883", "id", Duration::ZERO);
        // Never accepted: a broker that is down, not a takeover.
        for _ in 0..5 {
            assert!(!note(closed(), false));
        }
        assert!(!note(closed(), true));
        assert!(!note(closed(), true));
        assert!(note(closed(), true));
        // Other failures stay the caller's to report.
        let refused = ConnectionError::Io(std::io::ErrorKind::ConnectionRefused.into());
        assert!(!note(refused, true));
    }
}
