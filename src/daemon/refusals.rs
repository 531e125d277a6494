//! What the broker refuses, counted and said. A broker's ACL that denies edgemt a topic is
//! silent at QoS 0: mosquitto drops the publish and MQTT gives the client no way to know. At
//! QoS 1 (MQTT 5) the PubAck carries a reason code, and a refused subscription comes back in
//! the SubAck, but rumqttc reports both by packet id alone, logs a WARN per packet and
//! otherwise carries on as if all was well. Here the packet ids are matched back to topics
//! ([`Ledger`]), and each refusal is counted (`publish_denied_total`,
//! `subscribe_denied_total`) and told ([`Refusals`]): in the log once per topic per minute
//! with the reason, and in the systemd STATUS line until that topic is accepted again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Request;
use rumqttc::Outgoing;

use super::publish::Outbox;
use super::state::Shared;

/// Which topic each packet id in flight belongs to. rumqttc numbers QoS 1 publishes and
/// subscribes as it takes them from its request queue, in queue order, and says so with an
/// `Outgoing` event; the topics were noted in the same order as they were queued (the
/// [`Outbox`] for publishes, [`Ledger::subscribing`] for subscriptions).
pub struct Ledger {
    outbox: Arc<Outbox>,
    /// QoS 1 publishes sent and not yet answered.
    in_flight: HashMap<u16, Arc<str>>,
    /// A publish rumqttc holds back because its packet id was still in flight.
    collided: Option<(u16, Arc<str>)>,
    /// Subscriptions asked for and not yet numbered, oldest first.
    unnumbered_subscriptions: VecDeque<String>,
    /// Subscriptions sent and not yet answered.
    subscriptions: HashMap<u16, String>,
    /// Unnumbered QoS 1 publishes and subscriptions that rumqttc moved from its queue to its
    /// pending list when the connection was lost; it drops them if the next session is new.
    held: (usize, usize),
}

impl Ledger {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        Ledger {
            outbox,
            in_flight: HashMap::new(),
            collided: None,
            unnumbered_subscriptions: VecDeque::new(),
            subscriptions: HashMap::new(),
            held: (0, 0),
        }
    }

    /// A subscription was queued (after it, in queue order, comes the next one).
    pub fn subscribing(&mut self, topic: &str) {
        self.unnumbered_subscriptions.push_back(topic.to_owned());
    }

    /// rumqttc has numbered (and sent) a packet, or held one back.
    pub fn outgoing(&mut self, event: &Outgoing) {
        match *event {
            // A retransmission keeps its number and its entry.
            Outgoing::Publish(pkid) if pkid != 0 && !self.in_flight.contains_key(&pkid) => {
                let topic = match self.collided.take() {
                    Some((held, topic)) if held == pkid => Some(topic),
                    other => {
                        self.collided = other;
                        self.outbox.numbered()
                    }
                };
                if let Some(topic) = topic {
                    self.in_flight.insert(pkid, topic);
                }
            }
            Outgoing::AwaitAck(pkid) => {
                self.collided = self.outbox.numbered().map(|topic| (pkid, topic));
            }
            Outgoing::Subscribe(pkid) => {
                if let Some(topic) = self.unnumbered_subscriptions.pop_front() {
                    self.subscriptions.insert(pkid, topic);
                }
            }
            _ => {}
        }
    }

    /// The topic a PubAck answers.
    pub fn puback(&mut self, pkid: u16) -> Option<Arc<str>> {
        self.in_flight.remove(&pkid)
    }

    /// The topic a SubAck answers.
    pub fn suback(&mut self, pkid: u16) -> Option<String> {
        self.subscriptions.remove(&pkid)
    }

    /// The connection is lost: rumqttc has moved what it had not sent yet to `pending`.
    pub fn connection_lost(&mut self, pending: &VecDeque<Request>) {
        self.held = pending.iter().fold((0, 0), |(p, s), r| match r {
            Request::Publish(x) if x.pkid == 0 && x.qos != QoS::AtMostOnce => (p + 1, s),
            Request::Subscribe(_) => (p, s + 1),
            _ => (p, s),
        });
    }

    /// Connected again: a new session starts without what the old one had in flight or
    /// pending; a resumed one sends it all again. Answers to subscriptions of the old
    /// connection never come either way.
    pub fn connected(&mut self, session_present: bool) {
        let (publishes, subscriptions) = std::mem::take(&mut self.held);
        if !session_present {
            self.outbox.forget_oldest(publishes);
            let n = subscriptions.min(self.unnumbered_subscriptions.len());
            self.unnumbered_subscriptions.drain(..n);
            self.in_flight.clear();
        }
        self.subscriptions.clear();
    }
}

/// Whether a PubAck is a refusal. "No matching subscribers" is a success that says nobody
/// listens.
pub fn publish_refused(reason: PubAckReason) -> bool {
    !matches!(
        reason,
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
    )
}

/// Whether a SubAck's code for one filter is a refusal.
pub fn subscription_refused(code: &SubscribeReasonCode) -> bool {
    !matches!(code, SubscribeReasonCode::Success(_))
}

/// How often each topic's refusals are told.
const SAY_EVERY: Duration = Duration::from_secs(60);

/// Topics remembered for the once-a-minute limit. edgemt publishes to a few dozen (most of
/// them Home Assistant discovery configs); the bound only keeps a broken ledger from
/// growing the map.
const TOPICS_REMEMBERED: usize = 256;

/// Refusals of one topic since it was last told.
#[derive(Default)]
struct Told {
    at: Option<Instant>,
    untold: u64,
}

/// Counts refusals and tells them: once per topic per minute, in the log at WARN and as the
/// systemd STATUS line, with the reason and what to check. Home Assistant's discovery
/// configs (a few dozen topics, one ACL rule) are told as one topic, `{discovery_prefix}/#`.
pub struct Refusals {
    shared: Arc<Shared>,
    /// Who the broker refuses, for the hint ("check the ACL of user edgemt").
    user: String,
    /// `{discovery_prefix}/`, or none when discovery is off.
    discovery: Option<String>,
    told: HashMap<(bool, Arc<str>), Told>,
    /// The topic whose refused publishes the STATUS line names.
    in_status: Option<Arc<str>>,
}

impl Refusals {
    pub fn new(shared: Arc<Shared>, username: Option<&str>, discovery_prefix: &str) -> Self {
        Refusals {
            shared,
            user: username.map_or_else(|| "anonymous clients".into(), |u| format!("user {u}")),
            discovery: (!discovery_prefix.is_empty()).then(|| format!("{discovery_prefix}/")),
            told: HashMap::new(),
            in_status: None,
        }
    }

    /// The topic as the refusals are told: itself, or for a discovery config the ACL rule
    /// that covers them all.
    fn told_as(&self, topic: &Arc<str>) -> Arc<str> {
        match &self.discovery {
            Some(prefix) if topic.starts_with(prefix.as_str()) => format!("{prefix}#").into(),
            _ => topic.clone(),
        }
    }

    /// The broker accepted a publish on `topic`: true when that ends the refusals the STATUS
    /// line names (an administrator fixed the ACL), which is then said.
    pub fn accepted(&mut self, topic: Option<Arc<str>>) -> bool {
        let Some(topic) = topic.map(|t| self.told_as(&t)) else {
            return false;
        };
        if self.in_status.as_ref() != Some(&topic) {
            return false;
        }
        self.in_status = None;
        self.shared.set_refusal(None);
        tracing::info!("the broker accepts publishes on {topic} again");
        true
    }

    /// The broker refused a publish on `topic` (unknown when the ledger lost step).
    pub fn publish(&mut self, topic: Option<Arc<str>>, reason: PubAckReason) {
        let denied = &self.shared.counters.publish_denied_total;
        let total = denied.fetch_add(1, Relaxed) + 1;
        let topic = topic.map_or_else(|| "an unknown topic".into(), |t| self.told_as(&t));
        if let Some(untold) = self.due(true, &topic) {
            tracing::warn!(
                "the broker refused a publish on {topic}: {reason:?}{}; nobody receives what \
                 edgemt publishes there (publish_denied_total = {total}): check that the \
                 broker's ACL lets {} write {topic}",
                more(untold),
                self.user
            );
            self.shared.set_refusal(Some(format!(
                "publishes on {topic} ({reason:?}): check its ACL for {}",
                self.user
            )));
            self.in_status = Some(topic.clone());
            super::notify::status(&self.shared.serving_status("serving"));
        }
    }

    /// The broker refused the subscription to `topic`.
    pub fn subscription(&mut self, topic: Option<String>, code: &SubscribeReasonCode) {
        let denied = &self.shared.counters.subscribe_denied_total;
        denied.fetch_add(1, Relaxed);
        let topic: Arc<str> = topic.map_or_else(|| "an unknown topic".into(), Into::into);
        if let Some(untold) = self.due(false, &topic) {
            tracing::warn!(
                "the broker refused the subscription to {topic}: {code:?}{}; edgemt receives \
                 nothing sent there: check that the broker's ACL lets {} read {topic}",
                more(untold),
                self.user
            );
            self.shared.set_refusal(Some(format!(
                "the subscription to {topic} ({code:?}): check its ACL for {}",
                self.user
            )));
            super::notify::status(&self.shared.serving_status("serving"));
        }
    }

    /// Counts one refusal; returns how many went untold before it if it is time to tell.
    fn due(&mut self, publish: bool, topic: &Arc<str>) -> Option<u64> {
        if self.told.len() >= TOPICS_REMEMBERED {
            self.told.clear();
        }
        let told = self.told.entry((publish, topic.clone())).or_default();
        if told.at.is_some_and(|at| at.elapsed() < SAY_EVERY) {
            told.untold += 1;
            return None;
        }
        told.at = Some(Instant::now());
        Some(std::mem::take(&mut told.untold))
    }
}

fn more(untold: u64) -> String {
    if untold == 0 {
        String::new()
    } else {
        format!(" ({untold} more since the last line about it)")
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::v5::Publish;
    use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};

    use super::*;

    /// A ledger over an outbox whose client is never connected: its queue only fills (the
    /// event loop, never polled, is returned because the queue closes with it).
    fn ledger() -> (Ledger, Arc<Outbox>, EventLoop) {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "localhost", 1), 64);
        let outbox = Arc::new(Outbox::new(client, 64));
        (Ledger::new(outbox.clone()), outbox, eventloop)
    }

    fn send(outbox: &Outbox, topic: &str, qos: QoS) {
        assert!(outbox.publish(&topic.into(), qos, false, b"x".to_vec()));
    }

    #[test]
    fn packet_ids_are_paired_with_topics_in_queue_order_and_qos_0_takes_none() {
        let (mut ledger, outbox, _eventloop) = ledger();
        send(&outbox, "a", QoS::AtLeastOnce);
        send(&outbox, "zero", QoS::AtMostOnce);
        send(&outbox, "b", QoS::AtLeastOnce);
        ledger.outgoing(&Outgoing::Publish(1));
        ledger.outgoing(&Outgoing::Publish(0));
        ledger.outgoing(&Outgoing::Publish(2));
        assert_eq!(ledger.puback(2).as_deref(), Some("b"));
        assert_eq!(ledger.puback(1).as_deref(), Some("a"));
        assert_eq!(ledger.puback(1), None, "answered once");
    }

    #[test]
    fn a_retransmission_keeps_its_topic_and_a_held_back_publish_gets_its_own() {
        let (mut ledger, outbox, _eventloop) = ledger();
        send(&outbox, "a", QoS::AtLeastOnce);
        send(&outbox, "b", QoS::AtLeastOnce);
        send(&outbox, "c", QoS::AtLeastOnce);
        ledger.outgoing(&Outgoing::Publish(1));
        // "b" was numbered 1 too while "a" was in flight: rumqttc holds it back.
        ledger.outgoing(&Outgoing::AwaitAck(1));
        // "a" is sent again (a resumed session) and keeps its entry.
        ledger.outgoing(&Outgoing::Publish(1));
        assert_eq!(ledger.puback(1).as_deref(), Some("a"));
        // Its PubAck lets "b" go, with number 1; then "c" gets 2.
        ledger.outgoing(&Outgoing::Publish(1));
        ledger.outgoing(&Outgoing::Publish(2));
        assert_eq!(ledger.puback(1).as_deref(), Some("b"));
        assert_eq!(ledger.puback(2).as_deref(), Some("c"));
    }

    #[test]
    fn a_new_session_forgets_what_rumqttc_dropped_and_keeps_what_was_queued_after() {
        let (mut ledger, outbox, _eventloop) = ledger();
        send(&outbox, "sent", QoS::AtLeastOnce);
        ledger.outgoing(&Outgoing::Publish(1));
        send(&outbox, "dropped", QoS::AtLeastOnce);
        // The connection is lost: rumqttc moved "sent" (numbered) and "dropped" (not yet) to
        // its pending list, which a new session clears.
        let mut sent = Publish::new("sent", QoS::AtLeastOnce, "x", None);
        sent.pkid = 1;
        let pending = VecDeque::from([
            Request::Publish(sent),
            Request::Publish(Publish::new("dropped", QoS::AtLeastOnce, "x", None)),
        ]);
        ledger.connection_lost(&pending);
        send(&outbox, "after", QoS::AtLeastOnce);
        ledger.connected(false);
        ledger.outgoing(&Outgoing::Publish(2));
        assert_eq!(ledger.puback(1), None, "the old session's publish is gone");
        assert_eq!(ledger.puback(2).as_deref(), Some("after"));
    }

    #[test]
    fn subscriptions_are_paired_with_their_topics() {
        let (mut ledger, _, _eventloop) = ledger();
        ledger.subscribing("in/a");
        ledger.subscribing("in/b");
        ledger.outgoing(&Outgoing::Subscribe(7));
        ledger.outgoing(&Outgoing::Subscribe(8));
        assert_eq!(ledger.suback(8).as_deref(), Some("in/b"));
        assert_eq!(ledger.suback(7).as_deref(), Some("in/a"));
    }

    #[test]
    fn only_refusals_count_as_refusals() {
        assert!(!publish_refused(PubAckReason::Success));
        assert!(!publish_refused(PubAckReason::NoMatchingSubscribers));
        assert!(publish_refused(PubAckReason::NotAuthorized));
        assert!(publish_refused(PubAckReason::QuotaExceeded));
        assert!(!subscription_refused(&SubscribeReasonCode::Success(
            QoS::AtLeastOnce
        )));
        assert!(subscription_refused(&SubscribeReasonCode::NotAuthorized));
    }
}
