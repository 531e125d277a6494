//! `edgemt run`: the long-running service around the learner.
//!
//! Data path: the MQTT task ([`mqtt`]) routes messages ([`ingest::Router`]) into a
//! byte-bounded queue -> the ingest thread parses them into a bounded queue -> the inference
//! thread embeds a batch, predicts with the current teacher and publishes -> the training
//! thread learns and swaps in each EMA-refreshed teacher. A metrics task publishes
//! [`state::MetricsMessage`] every interval; systemd is told READY, STATUS, WATCHDOG and
//! STOPPING ([`notify`]). `run` takes the shutdown signal as a future, so signal handling
//! stays in `main`.

pub mod discovery;
pub mod ingest;
pub mod mqtt;
pub mod notify;
pub mod priority;
pub mod prometheus;
pub mod queue;
pub mod state;
pub mod workers;

use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;

use crate::checkpoint::{CheckpointStore, Identity};
use crate::config::Config;
use crate::model::Classifier;
use crate::session::{Predictor, Session};
use crate::stream::Layout;
use crate::stream::{SampleDecoder, WindowAssembler};
use ingest::{Ingest, Router, Topics};
use queue::BoundedQueue;
use state::Shared;
use workers::{InferenceWorker, TrainerWorker};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("setting up the daemon: {0}")]
    Setup(String),
}

/// `edgemt check`: everything `run` would set up, short of connecting: the broker options
/// (password source, TLS files), the checkpoint directory, the session (calibration
/// channels against the model) and one inference of an all-zero sample. Returns what it
/// found, a line each.
pub fn preflight(cfg: &Config, classifier: &Classifier) -> Result<Vec<String>, DaemonError> {
    let setup = |e: &dyn std::error::Error| DaemonError::Setup(crate::report(e));
    let mut found = Vec::new();
    let prefix = cfg
        .mqtt
        .prefix
        .clone()
        .unwrap_or_else(|| format!("edgemt/{}", mqtt::hostname()));
    mqtt::options(&cfg.mqtt, "edgemt-check", &Topics::new(&prefix))?;
    found.push(format!(
        "broker {}://{}:{} as {}, topics under {prefix}/ (not contacted)",
        if cfg.mqtt.tls { "mqtts" } else { "mqtt" },
        cfg.mqtt.host,
        cfg.mqtt.port,
        cfg.mqtt.username.as_deref().unwrap_or("anonymous")
    ));
    match &cfg.checkpoint.dir {
        Some(dir) => {
            CheckpointStore::open(
                dir,
                cfg.checkpoint.keep,
                Identity::new(classifier, &cfg.learn),
            )
            .map_err(|e| setup(&e))?;
            let probe = tempfile::NamedTempFile::new_in(dir).map_err(|e| {
                DaemonError::Setup(format!(
                    "checkpoint.dir {} is not writable: {e}",
                    dir.display()
                ))
            })?;
            drop(probe);
            found.push(format!("checkpoints in {} (writable)", dir.display()));
        }
        None => found.push(
            "checkpoints in $STATE_DIRECTORY when run by systemd ([checkpoint] dir unset)".into(),
        ),
    }
    Session::new(classifier, cfg, cfg.daemon.seed).map_err(|e| setup(&e))?;
    let mut predictor = Predictor::new(classifier.backbone.clone());
    let zeros = vec![0.0; classifier.sample_len()];
    let mut out = Vec::new();
    predictor
        .run(&zeros, 1, None, &classifier.pretrained(), &mut out)
        .map_err(|e| setup(&e))?;
    let p = out.first().copied().ok_or_else(|| {
        DaemonError::Setup("the model returned no prediction for a sample".into())
    })?;
    if !p.confidence.is_finite() {
        return Err(DaemonError::Setup(
            "the model's prediction for an all-zero sample is not finite".into(),
        ));
    }
    found.push(format!(
        "one inference of an all-zero sample: class {} ({}) at confidence {:.3}",
        p.class,
        classifier
            .class_names
            .get(p.class)
            .map(String::as_str)
            .unwrap_or("?"),
        p.confidence
    ));
    let allowed: Vec<&str> = cfg.control.allow.iter().map(|c| c.name()).collect();
    found.push(format!("commands allowed: [{}]", allowed.join(", ")));
    Ok(found)
}

/// Runs the daemon until `shutdown` completes, then stops within a few seconds.
pub async fn run(
    cfg: Config,
    classifier: Classifier,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let host = mqtt::hostname();
    let prefix = cfg
        .mqtt
        .prefix
        .clone()
        .unwrap_or_else(|| format!("edgemt/{host}"));
    let client_id = cfg
        .mqtt
        .client_id
        .clone()
        .unwrap_or_else(|| format!("edgemt-{host}"));
    let topics = Topics::new(&prefix);
    let model_name = cfg
        .model
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let opts = mqtt::options(&cfg.mqtt, &client_id, &topics)?;
    let (client, eventloop) = AsyncClient::new(opts, cfg.mqtt.request_queue);
    let qos = mqtt::qos(cfg.mqtt.qos);

    // Checkpoints go to [checkpoint] dir, else systemd's StateDirectory.
    let state_dir = cfg.checkpoint.dir.clone().or_else(|| {
        std::env::var_os("STATE_DIRECTORY").and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(std::path::PathBuf::from)
        })
    });
    let checkpoints = match &state_dir {
        Some(dir) => Some(
            CheckpointStore::open(
                dir,
                cfg.checkpoint.keep,
                Identity::new(&classifier, &cfg.learn),
            )
            .map_err(|e| DaemonError::Setup(crate::report(&e)))?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared::new(classifier.pretrained(), state_dir));
    let input = Arc::new(BoundedQueue::new(cfg.input.queue_capacity));
    let train = Arc::new(BoundedQueue::new(cfg.input.queue_capacity));

    let layout = Layout::for_shape(&classifier.input_shape, cfg.augment.time_axis);
    let window = cfg.input.window.unwrap_or(layout.steps);
    if window != layout.steps {
        return Err(DaemonError::Setup(format!(
            "input.window = {window} but the model takes {} time steps per sample",
            layout.steps
        )));
    }
    let hop = cfg.input.hop.unwrap_or((window / 2).max(1));
    let decoder = SampleDecoder::new(&classifier.input_shape, classifier.classes())
        .with_max_abs(cfg.input.max_abs);
    let raw = Arc::new(BoundedQueue::new(ingest::raw_budget(
        cfg.mqtt.max_payload_bytes,
    )));
    let router = Router::new(
        topics.clone(),
        shared.clone(),
        raw.clone(),
        cfg.mqtt.max_payload_bytes,
        cfg.control.allow.clone(),
    );
    let ingest = Ingest::new(
        topics.clone(),
        shared.clone(),
        input.clone(),
        decoder,
        cfg.input.format,
        WindowAssembler::new(layout, hop),
        ingest::LabelWindow {
            class_names: classifier.class_names.clone(),
            capacity: cfg.input.feedback_capacity,
            seconds: crate::config::duration_s(cfg.input.label_window_s),
        },
    );

    // Bound before anything runs, so a taken port is a setup error, not a silent gap.
    let prometheus = match &cfg.metrics.prometheus {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                DaemonError::Setup(format!("metrics.prometheus: cannot listen on {addr}: {e}"))
            })?;
            tracing::info!("Prometheus metrics on http://{addr}/metrics");
            let exposition = Arc::new(prometheus::Exposition::new(shared.clone()));
            Some((listener, exposition))
        }
        None => None,
    };
    let inference = InferenceWorker {
        shared: shared.clone(),
        predictor: Predictor::new(classifier.backbone.clone()),
        input: input.clone(),
        train: train.clone(),
        client: client.clone(),
        predictions_topic: topics.predictions.clone(),
        class_names: classifier.class_names.clone(),
        qos,
        max_batch: cfg.input.max_batch,
        sample_len: classifier.sample_len(),
        latency_histogram: prometheus.as_ref().map(|(_, e)| e.latency.clone()),
        state_topic: topics.state.clone(),
        state_every: crate::config::duration_s(cfg.metrics.state_interval_s),
    };
    let trainer = TrainerWorker {
        shared: shared.clone(),
        session: Session::new(&classifier, &cfg, cfg.daemon.seed)
            .map_err(|e| DaemonError::Setup(crate::report(&e)))?,
        queue: train.clone(),
        checkpoints,
        exporter: workers::Exporter {
            proto: classifier.proto().clone(),
            trainable: classifier.trainable.clone(),
            input_shape: classifier.input_shape.clone(),
            fingerprint: classifier.fingerprint,
        },
        published: (
            crate::learn::Serving::Pretrained,
            crate::calibration::SignedPerm::IDENTITY,
        ),
        recent_feedback: workers::RecentFeedback::new(cfg.metrics.recent_labels),
    };
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| DaemonError::Setup(format!("spawning {name}: {e}")))
    };
    let ingest_raw = raw.clone();
    let ingest_thread = spawn("ingest", Box::new(move || ingest.run(ingest_raw)))?;
    let inference_thread = spawn("inference", Box::new(move || inference.run()))?;
    let trainer_thread = spawn("training", Box::new(move || trainer.run()))?;

    let discovery = if cfg.mqtt.discovery_prefix.is_empty() {
        Vec::new()
    } else {
        discovery::Announce {
            discovery_prefix: &cfg.mqtt.discovery_prefix,
            client_id: &client_id,
            topics: &topics,
            class_names: &classifier.class_names,
            commands: &cfg.control.allow,
            model: &model_name,
        }
        .messages()
    };
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let poll = tokio::spawn(
        mqtt::PollTask {
            eventloop,
            client: client.clone(),
            cfg: cfg.mqtt.clone(),
            client_id: client_id.clone(),
            shared: shared.clone(),
            router,
            connected: Some(connected_tx),
            discovery,
        }
        .run(),
    );
    let metrics_task = tokio::spawn(publish_metrics(
        client.clone(),
        topics.metrics.clone(),
        shared.clone(),
        crate::config::duration_s(cfg.metrics.interval_s),
    ));
    let prometheus_task = prometheus
        .map(|(listener, exposition)| tokio::spawn(prometheus::serve(listener, exposition)));
    let watchdog_task =
        notify::watchdog_interval().map(|period| tokio::spawn(watchdog(shared.clone(), period)));
    let broker = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
    tracing::info!("edgemt started: topics under {prefix}/, connecting to broker {broker}");
    notify::status(&format!("connecting to the broker at {broker}"));
    let ready = tokio::spawn(announce_ready(
        connected_rx,
        crate::config::duration_s(cfg.daemon.ready_timeout_s),
        broker,
        prefix,
    ));

    shutdown.await;
    ready.abort();
    tracing::info!("stopping: no new input, finishing the current step");
    notify::notify(&[
        notify::NotifyState::Stopping,
        notify::NotifyState::Status("stopping"),
    ]);
    shared.stopping.store(true, Relaxed);
    metrics_task.abort();
    if let Some(p) = prometheus_task {
        p.abort();
    }
    if let Some(w) = watchdog_task {
        w.abort();
    }
    // Each stage closes the queue behind it once it has drained its own.
    raw.close();
    let joined = tokio::task::spawn_blocking(move || {
        let _ = ingest_thread.join();
        input.close();
        let _ = inference_thread.join();
        train.close();
        let _ = trainer_thread.join();
    });
    if tokio::time::timeout(Duration::from_secs(3), joined)
        .await
        .is_err()
    {
        tracing::warn!("workers did not stop within 3 s; exiting anyway");
    }
    let final_metrics = serde_json::to_vec(&shared.metrics()).unwrap_or_default();
    let _ = client.try_publish(&topics.metrics, QoS::AtLeastOnce, false, final_metrics);
    let _ = client.try_publish(&topics.status, QoS::AtLeastOnce, true, "offline");
    let _ = client.try_disconnect();
    if tokio::time::timeout(Duration::from_millis(1500), poll)
        .await
        .is_err()
    {
        tracing::warn!("the broker did not take the final messages in time");
    }
    tracing::info!("stopped");
    Ok(())
}

/// READY=1 once the broker connection exists, or after `timeout` without one: systemd
/// would otherwise kill a daemon that only waits for its broker. The STATUS= line says which.
async fn announce_ready(
    connected: tokio::sync::oneshot::Receiver<()>,
    timeout: Duration,
    broker: String,
    prefix: String,
) {
    let status = match tokio::time::timeout(timeout, connected).await {
        Ok(Ok(())) => format!("serving: connected to {broker}, topics under {prefix}/"),
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

async fn publish_metrics(client: AsyncClient, topic: String, shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let payload = serde_json::to_vec(&shared.metrics()).unwrap_or_default();
        if client
            .try_publish(&topic, QoS::AtMostOnce, false, payload)
            .is_err()
        {
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
