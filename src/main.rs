//! The `edgemt` command line: parses arguments, sets up logging, loads the config and hands
//! off to the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgemt::checkpoint::{CheckpointStore, Identity};
use edgemt::config::Config;
use edgemt::learn::Serving;
use edgemt::model::export::{write_adapted, Adapted};
use edgemt::model::{Classifier, HeadSelection};
use edgemt::replay::{replay, LabelBudget, Progress, ReplayOptions};
use edgemt::session::PredictionMessage;

#[derive(Parser)]
#[command(
    name = "edgemt",
    version,
    about = "Keeps an ONNX classifier accurate on an edge device from its own sensor stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay a recording prequentially: predict each sample, then learn from it.
    Replay(ReplayArgs),
    /// Run the daemon: MQTT in, predictions and metrics out, learning on the side (needs
    /// the cargo feature `daemon`, on by default).
    ///
    /// SIGTERM and SIGINT stop it cleanly: no new input, the current step finished, a final
    /// checkpoint, the final metrics and the retained `offline` status, exit 0. SIGHUP,
    /// SIGUSR1, SIGUSR2, SIGQUIT and SIGALRM do the same (SIGHUP does not reload: restart
    /// the daemon to apply a changed config; it resumes from the final checkpoint). One
    /// daemon per state directory: a second one refuses to start, naming the first's pid.
    Run {
        /// The config file (TOML; see config/edgemt.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write the model the device serves, from the newest valid checkpoint, as a standard
    /// ONNX file: what the serving gate lets answer there (the adapted teacher, or the
    /// pretrained model), behind the adopted mounting if any. Says which it wrote and why.
    Export {
        /// Checkpoint directory.
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// Output ONNX file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Config naming the model (default: the model recorded in the checkpoint).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Write the adapted teacher even when the gate does not serve it.
        #[arg(long)]
        teacher: bool,
    },
    /// Check a config and its model without running: config keys, model and trainable
    /// layers, checkpoint directory, calibration channels, one inference, and with the
    /// daemon the broker options (password, TLS files). Exits non-zero with the reason when
    /// something is wrong.
    Check {
        /// The config file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a model's embedding reference from a recording of the inputs it was made for
    /// (its training or validation data, never the device's stream): per class the
    /// pretrained model gives, where the backbone's embeddings sit and how far they spread.
    /// Name it in `[model] reference`: label trust then tells a swap of labels from a shifted
    /// sensor (README, "Who may label").
    Reference {
        /// Config naming the model (`[model]`).
        #[arg(long)]
        config: PathBuf,
        /// The recording (JSON Lines, as replay reads them; labels are not read).
        recording: PathBuf,
        /// Output JSON file.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Show a model's inputs, outputs, detected trainable layers and embedding.
    Inspect {
        /// The ONNX model file.
        model: PathBuf,
        /// Classifier output to use (default: the first float output).
        #[arg(long)]
        output: Option<String>,
        /// How many learned layers, counted back from the output, to lift out.
        #[arg(long, value_name = "N", default_value_t = 1)]
        trainable_layers: usize,
    },
}

fn main() {
    edgemt::logging::init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Replay(args) => replay_cmd(args),
        Command::Run { config } => run_cmd(&config),
        Command::Export {
            checkpoint,
            output,
            config,
            teacher,
        } => export_cmd(&checkpoint, &output, config.as_deref(), teacher),
        Command::Check { config } => check_cmd(&config),
        Command::Reference {
            config,
            recording,
            output,
        } => reference_cmd(&config, &recording, &output),
        Command::Inspect {
            model,
            output,
            trainable_layers,
        } => inspect_cmd(&model, output, trainable_layers),
    }
}

/// `edgemt replay`'s arguments.
#[derive(clap::Args)]
struct ReplayArgs {
    /// The config file (TOML; see config/edgemt.toml).
    #[arg(long)]
    config: PathBuf,
    /// JSON Lines recording to replay.
    recording: PathBuf,
    /// Labeled holdout to score the final teacher, student and pretrained model on.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed for sampling and augmentation (overrides [replay] seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Resume from the newest valid checkpoint in DIR and save checkpoints there.
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Write the device's answer for every sample as JSON Lines here: the served model's
    /// class, as the daemon would have published it, and which model answered.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Draw the timeline as an SVG here: the adapted teacher's and the pretrained
    /// model's accuracy and the pseudo-label acceptance over the stream, rollbacks, and
    /// with --eval the final holdout accuracies.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Simulate label requests: ignore the recording's labels, let the device ask for at
    /// most FRACTION of the samples seen so far, and answer each request from that sample's
    /// `truth`.
    #[arg(long, value_name = "FRACTION", value_parser = parse_fraction)]
    label_budget: Option<f64>,
    /// Samples between a request and its simulated answer (with --label-budget).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 20,
        requires = "label_budget"
    )]
    label_delay: usize,
    /// Ignore fields a line does not define (x, label, truth, ts, id, meta) instead of
    /// refusing the line: for recordings that carry their own data outside "meta".
    #[arg(long)]
    allow_unknown_fields: bool,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

fn replay_cmd(args: ReplayArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config)?;
    let classifier = load_classifier(&cfg)?;
    let bar = progress_bar(std::fs::metadata(&args.recording).map_or(0, |m| m.len()));
    let mut predictions = match &args.predictions {
        Some(path) => Some(PredictionsFile::create(path)?),
        None => None,
    };
    let outcome = replay(
        &classifier,
        &cfg,
        &args.recording,
        args.eval.as_deref(),
        &ReplayOptions {
            seed: args.seed,
            checkpoint: args.checkpoint.clone(),
            label_budget: args.label_budget.map(|fraction| LabelBudget {
                fraction,
                delay: args.label_delay,
            }),
            allow_unknown_fields: args.allow_unknown_fields,
        },
        |progress| match progress {
            Progress::Read { bytes } => {
                if let Some(bar) = &bar {
                    bar.set_position(bytes);
                }
            }
            Progress::Prediction {
                sample,
                id,
                answer,
                teacher_version,
            } => {
                if let Some(out) = predictions.as_mut() {
                    out.write(&PredictionMessage {
                        sample: Some(sample),
                        id,
                        ..PredictionMessage::new(&answer, &classifier.class_names, teacher_version)
                    });
                }
            }
        },
    )?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // What this replay wrote, listed last so a reader finds it under the summary.
    let mut written = Vec::new();
    if let Some(out) = predictions {
        out.finish()?;
        if let Some(path) = &args.predictions {
            written.push(format!(
                "{} (the device's answer for every sample)",
                path.display()
            ));
        }
    }
    print_summary(&outcome.report);
    if let Some(path) = args.report {
        let json = serde_json::to_string_pretty(&outcome.report)?;
        std::fs::write(&path, json)
            .with_context(|| format!("writing report {}", path.display()))?;
        written.push(format!("{} (the report, JSON)", path.display()));
    }
    if let Some(path) = args.plot {
        let recording = &args.recording;
        let name = recording.file_name().unwrap_or(recording.as_os_str());
        edgemt::plot::write_svg(&outcome.report, &name.to_string_lossy(), &path)?;
        written.push(format!("{} (the plot, SVG)", path.display()));
    }
    if let Some(dir) = &args.checkpoint {
        let n = outcome.report.checkpoints_written;
        written.push(format!("{} ({n} checkpoint(s))", dir.display()));
    }
    for file in written {
        println!("wrote {file}");
    }
    Ok(())
}

/// `replay --predictions`: one JSON line per answered sample. The first write error stops the
/// writing and is reported when the replay ends (the callback cannot return it).
struct PredictionsFile {
    out: std::io::BufWriter<std::fs::File>,
    error: Option<std::io::Error>,
}

impl PredictionsFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("writing predictions {}", path.display()))?;
        Ok(PredictionsFile {
            out: std::io::BufWriter::new(file),
            error: None,
        })
    }

    /// One line: the message the daemon would have published for the sample.
    fn write(&mut self, message: &PredictionMessage) {
        if self.error.is_none() {
            let written = serde_json::to_writer(&mut self.out, message)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(self.out));
            if let Err(e) = written {
                self.error = Some(e);
            }
        }
    }

    fn finish(mut self) -> anyhow::Result<()> {
        if let Some(e) = self.error {
            return Err(e).context("writing predictions");
        }
        self.out.flush().context("writing predictions")
    }
}

#[cfg(feature = "daemon")]
fn run_cmd(config: &Path) -> anyhow::Result<()> {
    use edgemt::daemon::signals::StopSignals;
    use edgemt::daemon::{lock_state_directory, Daemon, DaemonConfig};
    let cfg = Config::load(config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // First, so that no signal from here on kills the process mid-step: one that arrives
    // while the model loads or the broker connects ends the run cleanly once it starts.
    let signals = {
        let _runtime = runtime.enter();
        StopSignals::register()?
    };
    let wing = DaemonConfig::from_config(&cfg)?;
    // Before the checkpoint store is opened (it tidies the directory) or anything connects.
    let _lock = lock_state_directory(&cfg, &wing)?;
    let classifier = load_classifier(&cfg)?;
    let daemon = Daemon::build(&cfg, wing, &classifier, true)?;
    runtime.block_on(daemon.run(async move {
        signals.recv().await;
    }))?;
    Ok(())
}

#[cfg(not(feature = "daemon"))]
fn run_cmd(_config: &Path) -> anyhow::Result<()> {
    anyhow::bail!(
        "this edgemt was built without the daemon (cargo feature `daemon`); \
         build it with default features to use `edgemt run`"
    )
}

fn export_cmd(
    checkpoint: &Path,
    output: &Path,
    config: Option<&Path>,
    teacher: bool,
) -> anyhow::Result<()> {
    let cfg = match config {
        Some(path) => Config::load(path)?,
        None => {
            let (model, layers, reference) = CheckpointStore::recorded_model(checkpoint)
                .with_context(|| {
                    format!(
                        "no readable checkpoint manifest in {}",
                        checkpoint.display()
                    )
                })?;
            let mut cfg = Config::for_model(&model);
            cfg.model.trainable_layers = layers;
            // The reference the device judged labels with, so a dispute comes back here too.
            cfg.model.reference = reference;
            cfg
        }
    };
    let classifier = load_classifier(&cfg)?;
    // Read-only: the daemon may be writing a checkpoint there right now.
    let store = CheckpointStore::open_read_only(
        checkpoint,
        cfg.checkpoint.keep,
        Identity::new(&classifier, &cfg.learn).with_reference(cfg.model.reference.as_deref()),
    )?;
    // A learner restored from the checkpoint, so the gate decides here as it does on the
    // device (its evidence is saved; the wealth is recomputed from it).
    let mut learner = edgemt::session::learner_for(&classifier, &cfg, 0)?;
    let restored = store.restore_latest(&mut learner).with_context(|| {
        format!(
            "no valid checkpoint for this model in {}",
            checkpoint.display()
        )
    })?;
    let manifest = &restored.manifest;
    let version = manifest.counters.teacher_version;
    let mounting = manifest.mounting.as_ref().map(|m| m.name.as_str());
    let serving = learner.serving();
    let (head, what) = if teacher {
        let served = match serving {
            Serving::Adapted => "it is also the served model".to_string(),
            Serving::Pretrained => {
                format!("the device serves {} instead", serving.describe(mounting))
            }
        };
        (
            learner.teacher(),
            format!(
                "{} (--teacher; {served})",
                Serving::Adapted.describe(mounting)
            ),
        )
    } else {
        (
            learner.served(),
            format!(
                "the served model, {}, because {}{}",
                serving.describe(mounting),
                learner.serving_reason(),
                match serving {
                    Serving::Pretrained => "; --teacher writes the adapted teacher",
                    Serving::Adapted => "",
                }
            ),
        )
    };
    write_adapted(
        output,
        classifier.proto(),
        &classifier.trainable,
        &classifier.input_shape,
        &Adapted {
            head,
            mounting: manifest.mounting.as_ref().map(Into::into),
            from_fingerprint: classifier.fingerprint,
            teacher_version: version,
        },
    )?;
    println!(
        "wrote {}: {what} (teacher_version {version}, from checkpoint {})",
        output.display(),
        manifest.sequence
    );
    Ok(())
}

fn check_cmd(config: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    #[cfg(feature = "daemon")]
    let wing = edgemt::daemon::DaemonConfig::from_config(&cfg)?;
    println!("config {}: valid", config.display());
    let classifier = load_classifier(&cfg)?;
    println!(
        "model {}: input [N, {}], {} classes, trainable {} on '{}' ({} features)",
        cfg.model.path.display(),
        join(&classifier.input_shape),
        classifier.classes(),
        classifier.trainable.path.join(" -> "),
        classifier.trainable.embedding,
        classifier.embedding_dim
    );
    let mut found = edgemt::check::core(&cfg, &classifier)?;
    #[cfg(feature = "daemon")]
    found.extend(edgemt::daemon::Daemon::build(&cfg, wing, &classifier, false)?.summary());
    #[cfg(not(feature = "daemon"))]
    found.push("broker: not checked (this edgemt was built without the daemon)".into());
    for line in found {
        println!("{line}");
    }
    println!("ok");
    Ok(())
}

fn inspect_cmd(
    model: &Path,
    output: Option<String>,
    trainable_layers: usize,
) -> anyhow::Result<()> {
    let c = Classifier::load(
        model,
        &HeadSelection {
            output,
            embedding: None,
            trainable_layers,
        },
    )?;
    let t = &c.trainable;
    println!("model        {}", c.path.display());
    println!(
        "input        '{}' [N, {}]",
        c.input_name,
        join(&c.input_shape)
    );
    println!("output       '{}' ({:?})", t.output, t.kind);
    println!("embedding    '{}' [N, {}]", t.embedding, c.embedding_dim);
    println!("trainable    {}", t.path.join(" -> "));
    for (l, layer) in t.layers.iter().enumerate() {
        println!(
            "layer {l}      '{}' {} [{}, {}], weights '{}' {:?}{}",
            layer.node,
            layer.op,
            layer.weight.nrows(),
            layer.weight.ncols(),
            layer.weight_name,
            layer.weight_layout,
            layer
                .bias_name
                .as_ref()
                .map(|b| format!(", bias '{b}'"))
                .unwrap_or_default()
        );
    }
    println!(
        "classes      {} ({})",
        c.classes(),
        c.class_names.join(", ")
    );
    println!(
        "parameters   {} in the graph, {} trainable in {} layer(s)",
        c.parameters,
        t.parameters(),
        t.layers.len()
    );
    println!("fingerprint  {:016x}", c.fingerprint);
    Ok(())
}

fn reference_cmd(config: &Path, recording: &Path, output: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let classifier = load_classifier(&cfg)?;
    let r = edgemt::replay::make_reference(&classifier, recording, cfg.replay.batch, false)
        .with_context(|| format!("making a reference from {}", recording.display()))?;
    // What a daemon would refuse to read is not written.
    r.check(
        classifier.fingerprint,
        classifier.embedding_dim,
        classifier.classes(),
    )
    .map_err(|reason| {
        anyhow::anyhow!(
            "{} does not make a usable reference: {reason} (a class needs {} samples the \
             pretrained model gives it)",
            recording.display(),
            edgemt::learn::reference::MIN_CLASS_SAMPLES
        )
    })?;
    let text = serde_json::to_string(&r)?;
    std::fs::write(output, text + "\n").with_context(|| format!("writing {}", output.display()))?;
    println!("reference    {} ({})", output.display(), r.source);
    for (c, s) in r.classes.iter().enumerate() {
        let name = &classifier.class_names[c];
        match s {
            Some(s) => println!("  {name:<20} {} samples", s.samples),
            None => println!(
                "  {name:<20} fewer than {} samples: not described",
                edgemt::learn::reference::MIN_CLASS_SAMPLES
            ),
        }
    }
    println!(
        "atypical     nearest-class score above {:.3} (95 % of these inputs stay within)",
        r.atypical
    );
    Ok(())
}

fn load_classifier(cfg: &Config) -> anyhow::Result<Classifier> {
    let selection = HeadSelection {
        output: cfg.model.output.clone(),
        embedding: cfg.model.embedding.clone(),
        trainable_layers: cfg.model.trainable_layers,
    };
    let mut c = Classifier::load(&cfg.model.path, &selection)
        .with_context(|| format!("loading model {}", cfg.model.path.display()))?;
    if let Some(names) = &cfg.model.class_names {
        anyhow::ensure!(
            names.len() == c.classes(),
            "config key model.class_names: {} names for a model with {} classes",
            names.len(),
            c.classes()
        );
        c.class_names = names.clone();
    }
    tracing::info!(
        "model {}: input [N, {}], trainable {} on '{}' ({} features, {} classes)",
        cfg.model.path.display(),
        join(&c.input_shape),
        c.trainable.path.join(" -> "),
        c.trainable.embedding,
        c.embedding_dim,
        c.classes()
    );
    Ok(c)
}

fn progress_bar(total_bytes: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total_bytes);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

/// The replay's summary on stdout: what happened, in the words the README uses. Each model
/// has one name: "pretrained" (the model as shipped, on the device's own axes), "calibrated"
/// (the pretrained model behind the adopted mounting), "adapted teacher" (what learning made),
/// "served" (whichever of them the serving gate lets answer).
fn print_summary(r: &edgemt::replay::Report) {
    println!(
        "samples {} (labeled {}, scored {}, rejected {})",
        r.samples, r.labeled, r.scored, r.rejected
    );
    let adopted = r.adopted_mounting();
    if let Some(c) = &r.calibration {
        match c.adoptions.as_slice() {
            [] => println!(
                "mounting: none adopted ({} proposal(s)); the models see the sensor's own axes",
                c.proposals
            ),
            adoptions => {
                for (sample, mounting) in adoptions {
                    println!(
                        "mounting: {mounting} adopted at sample {sample} (calibration proposed it, the labels so far confirmed it); from then on every model sees the sensor through it"
                    );
                }
            }
        }
    }
    let a = &r.prequential_accuracy;
    println!(
        "prequential accuracy (each answer before its sample was learned from): served {:.4}, adapted teacher {:.4}, {} {:.4}",
        a.served,
        a.teacher,
        if adopted.is_some() {
            "calibrated (pretrained until the adoption)"
        } else {
            "pretrained"
        },
        a.source
    );
    if let Some(e) = &r.eval {
        let calibrated = match adopted {
            Some(_) => format!(", calibrated {:.4}", e.calibrated_accuracy),
            None => String::new(),
        };
        println!(
            "holdout ({} samples): served {:.4} ({:+.1} points over pretrained), adapted teacher {:.4}, student {:.4}{calibrated}, pretrained {:.4}",
            e.samples,
            e.served_accuracy,
            100.0 * (e.served_accuracy - e.source_accuracy),
            e.teacher_accuracy,
            e.student_accuracy,
            e.source_accuracy,
        );
    }
    let g = &r.gate;
    let switches = match g.switches.as_slice() {
        [] => "no switches".to_string(),
        s => {
            let each: Vec<String> = s
                .iter()
                .map(|s| format!("to {} at sample {}", s.serving.describe(adopted), s.sample))
                .collect();
            format!("switched {}", each.join(", "))
        }
    };
    println!(
        "served at the end: {}, because {}; {switches}",
        g.serving.describe(adopted),
        g.reason,
    );
    let t = &r.trust;
    if t.counts.held > 0 {
        println!(
            "label trust: {} labels held (contradicting a confident pretrained model against their neighbours; from {}), {} released, {} dropped, {} still held{}",
            t.counts.held,
            t.counts.held_from.describe(),
            t.counts.released,
            t.counts.dropped,
            t.holding,
            match t.disputed {
                Some((a, b)) => format!("; labels DISPUTED between classes {a} and {b}: the pretrained model is served"),
                None => String::new(),
            }
        );
    }
    if let Some(q) = &r.requests {
        println!(
            "label requests: {} made ({} at disagreements, {} uncertain), {} answered after {} samples, {} of them discordant",
            q.counts.made,
            q.counts.disagreement,
            q.counts.uncertain,
            q.counts.answered,
            q.delay,
            q.counts.discordant
        );
    }
    let p = &r.pseudo_labels;
    println!(
        "pseudo-labels: {} offered, {} accepted ({:.1}%), {} of those correct",
        p.offered,
        p.accepted,
        if p.offered > 0 {
            100.0 * p.accepted as f64 / p.offered as f64
        } else {
            0.0
        },
        p.accepted_correct
    );
    println!(
        "{} train steps, {} EMA updates, {:.0} samples/s, peak RSS {:.1} MiB",
        r.train_steps,
        r.ema_updates,
        r.throughput_samples_per_s,
        r.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    );
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
