//! `edgemt run`: the long-running service around the learner (the cargo feature `daemon`).
//!
//! Data path: the MQTT task ([`mqtt`]) routes messages ([`ingest::Router`]) into a
//! byte-bounded queue -> the ingest thread parses them into a bounded queue -> the inference
//! thread embeds a batch, predicts with the current teacher and publishes -> the training
//! thread learns and swaps in each EMA-refreshed teacher. A metrics task publishes
//! [`state::MetricsMessage`] every interval; systemd is told READY, STATUS, WATCHDOG and
//! STOPPING ([`notify`]).
//!
//! [`Daemon::build`] sets all of it up short of connecting, which `edgemt check` does too;
//! [`Daemon::run`] starts it and stops it when its shutdown future completes, so
//! signal handling stays in `main`, which installs [`signals`]' handlers and takes the
//! state directory's lock ([`crate::checkpoint::lock`]) before building. The daemon's config sections are
//! [`config`]'s.

pub mod config;
pub mod discovery;
pub mod error;
pub mod ingest;
pub mod items;
pub mod mqtt;
pub mod notify;
pub mod priority;
pub mod prometheus;
pub mod publish;
pub mod queue;
pub mod ratelimit;
pub mod refusals;
pub mod signals;
pub mod state;
pub mod telemetry;
pub mod workers;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop};
use tokio::sync::oneshot;

pub use config::DaemonConfig;
pub use error::DaemonError;

use crate::checkpoint::lock::{InstanceError, InstanceLock};
use crate::checkpoint::{CheckpointStore, Identity};
use crate::config::{duration_s, Config};
use crate::model::Classifier;
use crate::stream::{Layout, SampleDecoder, WindowAssembler};
use config::MqttConfig;
use ingest::{Ingest, Raw, Router, Topics};
use items::{Incoming, TrainItem};
use queue::BoundedQueue;
use state::Shared;
use workers::{InferenceWorker, TrainerWorker, Workers};

/// How long the stages get to drain their queues at shutdown before the process exits anyway.
const STOP_WORKERS: Duration = Duration::from_secs(3);

/// How long the broker gets to take the final metrics, the `offline` status and the
/// disconnect: short, since systemd is waiting, but a local broker needs only milliseconds.
const FINAL_MESSAGES: Duration = Duration::from_millis(1500);

/// The daemon, built but not running: every stage constructed and the MQTT client created;
/// nothing connected, spawned or bound. `edgemt check` builds one and prints its
/// [`Daemon::summary`]; `edgemt run` builds one and runs it.
pub struct Daemon {
    cfg: DaemonConfig,
    names: Names,
    /// What every stage and task reads and counts into.
    shared: Arc<Shared>,
    queues: Queues,
    stages: Stages,
    broker: Broker,
    /// The Prometheus registry when `[metrics] prometheus` is set; `run` binds its port.
    exposition: Option<Arc<prometheus::Exposition>>,
}

/// The names the daemon goes by on the broker.
struct Names {
    /// `[mqtt] prefix`, else `edgemt/<hostname>`.
    prefix: String,
    /// `[mqtt] client_id`, else `edgemt-<hostname>`.
    client_id: String,
    topics: Topics,
}

/// The bounded queues between the stages: MQTT task -> `raw` -> ingest -> `input` ->
/// inference -> `train` -> training.
struct Queues {
    raw: Arc<BoundedQueue<Raw>>,
    input: Arc<BoundedQueue<Incoming>>,
    train: Arc<BoundedQueue<TrainItem>>,
}

/// The three pipeline stages, each to run on a thread of its own.
struct Stages {
    ingest: Ingest,
    inference: InferenceWorker,
    trainer: TrainerWorker,
}

/// The stage threads, running.
struct Threads {
    ingest: JoinHandle<()>,
    inference: JoinHandle<()>,
    trainer: JoinHandle<()>,
}

/// The MQTT side, created but not connected: the client, its event loop, the router the
/// event loop hands messages to, and the Home Assistant discovery messages sent at every
/// connection (empty when discovery is off).
struct Broker {
    outbox: Arc<publish::Outbox>,
    eventloop: EventLoop,
    router: Router,
    discovery: Vec<(String, Vec<u8>)>,
}

impl Daemon {
    /// Everything `run` needs, short of connecting: the broker options (password source,
    /// TLS files), the checkpoint store, the session (calibration channels against the
    /// model), the queues, stages and discovery messages.
    ///
    /// `edgemt run` builds it as the state directory's `writer` (it holds the lock, and opening
    /// the store removes what a crash left behind); `edgemt check` as a reader, which opens the
    /// store read-only beside a daemon that may be writing it.
    pub fn build(
        cfg: &Config,
        wing: DaemonConfig,
        classifier: &Classifier,
        writer: bool,
    ) -> Result<Daemon, DaemonError> {
        let setup = |e: &dyn std::error::Error| DaemonError::Setup(crate::report(e));
        let names = Names::new(&wing.mqtt);
        let opts = mqtt::options(&wing.mqtt, &names.client_id, &names.topics)?;
        let (client, eventloop) = AsyncClient::new(opts, wing.mqtt.request_queue);
        let state_dir = state_dir(cfg);
        let checkpoints = match &state_dir {
            Some(dir) => {
                let identity = Identity::new(classifier, &cfg.learn)
                    .with_reference(cfg.model.reference.as_deref());
                let keep = cfg.checkpoint.keep;
                let store = if writer {
                    CheckpointStore::open(dir, keep, identity)
                } else {
                    CheckpointStore::open_read_only(dir, keep, identity)
                };
                Some(store.map_err(|e| setup(&e))?)
            }
            None => None,
        };
        let queues = Queues {
            raw: Arc::new(BoundedQueue::new(ingest::raw_budget(
                wing.mqtt.max_payload_bytes,
            ))),
            input: Arc::new(BoundedQueue::new(wing.input.queue_capacity)),
            train: Arc::new(BoundedQueue::new(wing.input.queue_capacity)),
        };
        let depths = state::Queues {
            raw: queues.raw.clone(),
            input: queues.input.clone(),
            train: queues.train.clone(),
        };
        let shared = Arc::new(Shared::new(classifier.pretrained(), state_dir, depths));
        let exposition = wing
            .metrics
            .prometheus
            .is_some()
            .then(|| Arc::new(prometheus::Exposition::new(shared.clone())));
        let outbox = Arc::new(publish::Outbox::new(client, wing.mqtt.request_queue));
        let sink = publish::MqttSink {
            outbox: outbox.clone(),
            predictions_topic: names.topics.predictions.as_str().into(),
            state_topic: names.topics.state.as_str().into(),
            label_request_topic: names.topics.label_request.as_str().into(),
            qos: mqtt::qos(wing.mqtt.qos),
        };
        let Workers {
            mut inference,
            trainer,
        } = Workers::new(
            cfg,
            &wing,
            classifier,
            shared.clone(),
            (queues.input.clone(), queues.train.clone()),
            publish::Sinks {
                predictions: Box::new(sink.clone()),
                requests: Box::new(sink),
            },
            checkpoints,
        )
        .map_err(|e| setup(&e))?;
        inference.latency_histogram = exposition.as_ref().map(|e| e.latency.clone());
        let stages = Stages {
            ingest: ingest_stage(cfg, &wing, classifier, &names, &shared, &queues)?,
            inference,
            trainer,
        };
        let broker = Broker {
            router: Router::new(
                names.topics.clone(),
                shared.clone(),
                queues.raw.clone(),
                wing.mqtt.max_payload_bytes,
                wing.control.allow.clone(),
            ),
            discovery: discovery_messages(&wing, &names, classifier, &cfg.model.path),
            outbox,
            eventloop,
        };
        Ok(Daemon {
            cfg: wing,
            names,
            shared,
            queues,
            stages,
            broker,
            exposition,
        })
    }

    /// `edgemt check`'s daemon half, a line each: the broker it would contact (not
    /// contacted) and the commands it would take. The rest of the check is the core's
    /// (the `check` module), run before the daemon is built.
    pub fn summary(&self) -> Vec<String> {
        let m = &self.cfg.mqtt;
        let allowed: Vec<&str> = self.cfg.control.allow.iter().map(|c| c.name()).collect();
        vec![
            format!(
                "broker {}://{}:{} as {}, topics under {}/ (not contacted)",
                if m.tls { "mqtts" } else { "mqtt" },
                m.host,
                m.port,
                m.username.as_deref().unwrap_or("anonymous"),
                self.names.prefix
            ),
            format!("commands allowed: [{}]", allowed.join(", ")),
        ]
    }

    /// Runs the daemon until `shutdown` completes, then stops within a few seconds.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
        let Daemon {
            cfg,
            names,
            shared,
            queues,
            stages,
            broker,
            exposition,
        } = self;
        // Bound before anything runs, so a taken port is a setup error, not a silent gap.
        let prometheus = match (&cfg.metrics.prometheus, exposition) {
            (Some(addr), Some(exposition)) => Some(bind_prometheus(addr, exposition).await?),
            _ => None,
        };
        let threads = stages.spawn(queues.raw.clone())?;
        let outbox = broker.outbox.clone();
        let (poll, connected) = broker.start(&cfg.mqtt, &names.client_id, &shared);
        let broker_address = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
        tracing::info!(
            "edgemt started: topics under {}/, connecting to broker {broker_address}",
            names.prefix
        );
        notify::status(&format!("connecting to the broker at {broker_address}"));
        let side_tasks = SideTasks {
            cfg: &cfg,
            names: &names,
            shared: &shared,
            outbox: &outbox,
        }
        .spawn(prometheus, connected, broker_address);

        shutdown.await;
        // READY must not follow STOPPING, so the side tasks end first.
        side_tasks.iter().for_each(|t| t.abort());
        tracing::info!("stopping: no new input, finishing the current step");
        notify::notify(&[
            notify::NotifyState::Stopping,
            notify::NotifyState::Status("stopping"),
        ]);
        shared.stopping.store(true, Relaxed);
        threads.stop(queues).await;
        sign_off(&outbox, &names.topics, &shared);
        if tokio::time::timeout(FINAL_MESSAGES, poll).await.is_err() {
            tracing::warn!("the broker did not take the final messages in time");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl Names {
    fn new(cfg: &MqttConfig) -> Self {
        let host = mqtt::hostname();
        let prefix = cfg
            .prefix
            .clone()
            .unwrap_or_else(|| format!("edgemt/{host}"));
        Names {
            client_id: cfg
                .client_id
                .clone()
                .unwrap_or_else(|| format!("edgemt-{host}")),
            topics: Topics::new(&prefix),
            prefix,
        }
    }
}

impl Stages {
    /// Starts each stage on a thread named after it.
    fn spawn(self, raw: Arc<BoundedQueue<Raw>>) -> Result<Threads, DaemonError> {
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| DaemonError::Setup(format!("spawning {name}: {e}")))
        };
        let Stages {
            ingest,
            inference,
            trainer,
        } = self;
        Ok(Threads {
            ingest: spawn("ingest", Box::new(move || ingest.run(raw)))?,
            inference: spawn("inference", Box::new(move || inference.run()))?,
            trainer: spawn("training", Box::new(move || trainer.run()))?,
        })
    }
}

impl Threads {
    /// Stops the stages in data order: each queue closes once the stage in front of it has
    /// drained its own and ended, so nothing already taken in is lost. Gives up after
    /// [`STOP_WORKERS`].
    async fn stop(self, queues: Queues) {
        queues.raw.close();
        let joined = tokio::task::spawn_blocking(move || {
            let _ = self.ingest.join();
            queues.input.close();
            let _ = self.inference.join();
            queues.train.close();
            let _ = self.trainer.join();
        });
        if tokio::time::timeout(STOP_WORKERS, joined).await.is_err() {
            tracing::warn!("workers did not stop within {STOP_WORKERS:?}; exiting anyway");
        }
    }
}

impl Broker {
    /// Starts the task that polls the event loop; the receiver hears of the first
    /// connection.
    fn start(
        self,
        cfg: &MqttConfig,
        client_id: &str,
        shared: &Arc<Shared>,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<()>) {
        let (connected_tx, connected_rx) = oneshot::channel();
        let poll = tokio::spawn(
            mqtt::PollTask {
                eventloop: self.eventloop,
                outbox: self.outbox,
                cfg: cfg.clone(),
                client_id: client_id.to_owned(),
                shared: shared.clone(),
                router: self.router,
                connected: Some(connected_tx),
                discovery: self.discovery,
            }
            .run(),
        );
        (poll, connected_rx)
    }
}

/// The tasks beside the pipeline, all aborted at shutdown: the metrics message, the
/// Prometheus endpoint, the systemd watchdog and READY.
struct SideTasks<'a> {
    cfg: &'a DaemonConfig,
    names: &'a Names,
    shared: &'a Arc<Shared>,
    outbox: &'a Arc<publish::Outbox>,
}

impl SideTasks<'_> {
    fn spawn(
        self,
        prometheus: Option<(tokio::net::TcpListener, Arc<prometheus::Exposition>)>,
        connected: oneshot::Receiver<()>,
        broker_address: String,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![tokio::spawn(publish_metrics(
            self.outbox.clone(),
            self.names.topics.metrics.as_str().into(),
            self.shared.clone(),
            duration_s(self.cfg.metrics.interval_s),
        ))];
        tasks.extend(prometheus.map(|(l, e)| tokio::spawn(prometheus::serve(l, e))));
        tasks.extend(
            notify::watchdog_interval()
                .map(|period| tokio::spawn(watchdog(self.shared.clone(), period))),
        );
        tasks.push(tokio::spawn(announce_ready(
            self.shared.clone(),
            connected,
            duration_s(self.cfg.daemon.ready_timeout_s),
            broker_address,
            self.names.prefix.clone(),
        )));
        tasks
    }
}

/// Where checkpoints go: `[checkpoint] dir`, else systemd's StateDirectory, else nowhere.
pub fn state_dir(cfg: &Config) -> Option<PathBuf> {
    cfg.checkpoint.dir.clone().or_else(state_directory)
}

/// Takes the state directory's [`InstanceLock`] for `edgemt run`, before anything
/// opens the checkpoints or connects; `None` (and a line saying so) without a state directory.
pub fn lock_state_directory(
    cfg: &Config,
    wing: &DaemonConfig,
) -> Result<Option<InstanceLock>, DaemonError> {
    let Some(dir) = state_dir(cfg) else {
        // A warning, not a note: outside systemd this is easy to miss, and every restart
        // then starts learning over.
        tracing::warn!(
            "no state directory ([checkpoint] dir or $STATE_DIRECTORY): this run saves NO \
             checkpoints (a restart starts learning over) and has no lock against a second \
             edgemt with the same identity; set [checkpoint] dir, or run under systemd with \
             StateDirectory="
        );
        return Ok(None);
    };
    let client_id = Names::new(&wing.mqtt).client_id;
    match InstanceLock::acquire(&dir, &client_id) {
        Ok(lock) => Ok(Some(lock)),
        Err(e @ InstanceError::Taken { .. }) => Err(e.into()),
        Err(e) => {
            tracing::warn!(
                "{}; running without the guard against a second edgemt on it",
                crate::report(&e)
            );
            Ok(None)
        }
    }
}

/// The directory systemd's `StateDirectory=` made for the service, if any.
fn state_directory() -> Option<PathBuf> {
    std::env::var_os("STATE_DIRECTORY").and_then(|v| {
        v.to_str()
            .and_then(|s| s.split(':').next())
            .map(PathBuf::from)
    })
}

/// The ingest stage: samples decoded as the model takes them, rows assembled into windows
/// of the model's length, labels by class name reaching back `[input] label_window_s`.
fn ingest_stage(
    cfg: &Config,
    wing: &DaemonConfig,
    classifier: &Classifier,
    names: &Names,
    shared: &Arc<Shared>,
    queues: &Queues,
) -> Result<Ingest, DaemonError> {
    let layout = Layout::for_shape(&classifier.input_shape, cfg.augment.time_axis);
    let window = wing.input.window.unwrap_or(layout.steps);
    if window != layout.steps {
        return Err(DaemonError::Setup(format!(
            "input.window = {window} but the model takes {} time steps per sample",
            layout.steps
        )));
    }
    let hop = wing.input.hop.unwrap_or((window / 2).max(1));
    // Publishers on the samples topic may add their own fields; recordings refuse them.
    let decoder = SampleDecoder::new(&classifier.input_shape, classifier.classes())
        .allowing_unknown_fields()
        .with_max_abs(cfg.input.max_abs);
    Ok(Ingest::new(
        names.topics.clone(),
        shared.clone(),
        queues.input.clone(),
        decoder,
        wing.input.format,
        WindowAssembler::new(layout, hop),
        ingest::LabelWindow {
            class_names: classifier.class_names.clone(),
            capacity: cfg.input.feedback_capacity,
            seconds: duration_s(wing.input.label_window_s),
            inline: wing.input.inline_labels,
            max_samples: wing.input.class_label_max_samples,
        },
    ))
}

/// Home Assistant's discovery configs and removals (retained payloads by topic), or none when
/// `[mqtt] discovery_prefix` is empty.
fn discovery_messages(
    wing: &DaemonConfig,
    names: &Names,
    classifier: &Classifier,
    model_path: &std::path::Path,
) -> Vec<(String, Vec<u8>)> {
    if wing.mqtt.discovery_prefix.is_empty() {
        return Vec::new();
    }
    let model = model_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    discovery::Announce {
        discovery_prefix: &wing.mqtt.discovery_prefix,
        client_id: &names.client_id,
        topics: &names.topics,
        class_names: &classifier.class_names,
        commands: &wing.control.allow,
        model: &model,
    }
    .retained()
}

/// Binds the Prometheus endpoint's port.
async fn bind_prometheus(
    addr: &str,
    exposition: Arc<prometheus::Exposition>,
) -> Result<(tokio::net::TcpListener, Arc<prometheus::Exposition>), DaemonError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        DaemonError::Setup(format!("metrics.prometheus: cannot listen on {addr}: {e}"))
    })?;
    tracing::info!("Prometheus metrics on http://{addr}/metrics");
    Ok((listener, exposition))
}

/// The last words on the broker: the final metrics, the retained `offline` status (the last
/// will says it only when the connection breaks) and a clean disconnect.
fn sign_off(outbox: &publish::Outbox, topics: &Topics, shared: &Shared) {
    let final_metrics = serde_json::to_vec(&shared.metrics()).unwrap_or_default();
    outbox.publish(
        &topics.metrics.as_str().into(),
        QoS::AtLeastOnce,
        false,
        final_metrics,
    );
    outbox.publish(
        &topics.status.as_str().into(),
        QoS::AtLeastOnce,
        true,
        b"offline".to_vec(),
    );
    let _ = outbox.client().try_disconnect();
}

/// READY=1 once the broker connection exists, or after `timeout` without one: systemd
/// would otherwise kill a daemon that only waits for its broker. The STATUS= line says which.
async fn announce_ready(
    shared: Arc<Shared>,
    connected: oneshot::Receiver<()>,
    timeout: Duration,
    broker: String,
    prefix: String,
) {
    let status = match tokio::time::timeout(timeout, connected).await {
        Ok(Ok(())) => shared.serving_status(&format!(
            "serving: connected to {broker}, topics under {prefix}/"
        )),
        _ => {
            tracing::warn!(
                "no connection to the broker at {broker} after {timeout:?}; running anyway and \
                 still trying"
            );
            format!("running without a broker: {broker} has not answered yet; still trying")
        }
    };
    notify::notify(&[
        notify::NotifyState::Ready,
        notify::NotifyState::Status(&status),
    ]);
}

async fn publish_metrics(
    outbox: Arc<publish::Outbox>,
    topic: Arc<str>,
    shared: Arc<Shared>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let payload = serde_json::to_vec(&shared.metrics()).unwrap_or_default();
        if !outbox.publish(&topic, QoS::AtMostOnce, false, payload) {
            shared.counters.publish_dropped_total.fetch_add(1, Relaxed);
        }
    }
}

/// WATCHDOG=1 at half systemd's period, but only while both workers keep turning.
async fn watchdog(shared: Arc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 2);
    loop {
        tick.tick().await;
        let now = shared.now_ms();
        let fresh = |beat: &std::sync::atomic::AtomicU64| {
            now.saturating_sub(beat.load(Relaxed)) < period.as_millis() as u64
        };
        if fresh(&shared.inference_beat) && fresh(&shared.trainer_beat) {
            notify::notify(&[notify::NotifyState::Watchdog]);
        } else {
            tracing::error!("a worker thread stopped turning; withholding the watchdog ping");
        }
    }
}
