//! Config loading: defaults, unknown keys and out-of-range values, in the core sections and
//! in the daemon's.

use edgemt::config::{Config, ConfigError};
use edgemt::daemon::DaemonConfig;

/// The whole file as `edgemt run` reads it: the core config, then the daemon's sections.
fn load_all(text: &str) -> Result<(Config, DaemonConfig), ConfigError> {
    let cfg = Config::from_toml(text)?;
    let daemon = DaemonConfig::from_config(&cfg)?;
    Ok((cfg, daemon))
}

#[test]
fn a_config_with_only_the_model_path_gets_every_default() {
    let cfg = Config::from_toml("[model]\npath = \"m.onnx\"\n").unwrap();
    assert_eq!(cfg.learn.ema_decay, 0.99);
    assert_eq!(cfg.replay.batch, 32);
    assert_eq!(cfg.model.trainable_layers, 1);
    let deep = Config::from_toml("[model]\npath = \"m.onnx\"\ntrainable_layers = 16\n").unwrap();
    assert_eq!(deep.model.trainable_layers, 16);
}

#[test]
fn the_shipped_commented_config_parses_and_matches_the_defaults() {
    let cfg = Config::load(&crate::util::path("config/edgemt.toml")).unwrap();
    let defaults = Config::from_toml("[model]\npath = \"x\"\n").unwrap();
    let daemon = DaemonConfig::from_config(&cfg).unwrap();
    let daemon_defaults = DaemonConfig::default();
    // The commented config documents the defaults: every section but [model] is equal.
    assert_eq!(
        toml::to_string(&cfg.learn).unwrap(),
        toml::to_string(&defaults.learn).unwrap()
    );
    assert_eq!(
        toml::to_string(&cfg.augment).unwrap(),
        toml::to_string(&defaults.augment).unwrap()
    );
    assert_eq!(
        toml::to_string(&cfg.replay).unwrap(),
        toml::to_string(&defaults.replay).unwrap()
    );
    for (a, b) in [
        (
            toml::to_string(&cfg.guard).unwrap(),
            toml::to_string(&defaults.guard).unwrap(),
        ),
        (
            toml::to_string(&cfg.checkpoint).unwrap(),
            toml::to_string(&defaults.checkpoint).unwrap(),
        ),
        (
            toml::to_string(&cfg.gate).unwrap(),
            toml::to_string(&defaults.gate).unwrap(),
        ),
        (
            toml::to_string(&daemon).unwrap(),
            toml::to_string(&daemon_defaults).unwrap(),
        ),
    ] {
        assert_eq!(a, b);
    }
    // [calibration] is off by default; the shipped config declares the shipped model's
    // channels (the rest of the section at its defaults).
    assert!(!defaults.calibration.enabled());
    assert_eq!(cfg.calibration.polar, vec![[0, 1, 2]]);
    assert_eq!(cfg.calibration.axial, vec![[3, 4, 5]]);
    let declared = edgemt::calibration::CalibrationConfig {
        polar: vec![[0, 1, 2]],
        axial: vec![[3, 4, 5]],
        ..Default::default()
    };
    assert_eq!(cfg.calibration, declared);
    assert_eq!(cfg.input.max_abs, defaults.input.max_abs);
    assert_eq!(
        cfg.input.feedback_capacity,
        defaults.input.feedback_capacity
    );
    assert!(cfg.model.path.ends_with("models/hapt_mlp.onnx") && cfg.model.path.exists());
}

/// A build without the daemon keeps the daemon's sections as written, so it reads the same
/// file; the core's list of the daemon's `[input]` keys is exactly the daemon's.
#[test]
fn the_core_keeps_the_daemons_sections_and_knows_its_input_keys() {
    let cfg = Config::load(&crate::util::path("config/edgemt.toml")).unwrap();
    assert!(cfg.mqtt.contains_key("host"), "{:?}", cfg.mqtt);
    assert!(cfg.input.daemon.contains_key("format"));
    let mut every = DaemonConfig::default().input;
    every.window = Some(1);
    every.hop = Some(1);
    let table = toml::Table::try_from(&every).unwrap();
    let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
    let mut listed = edgemt::config::DAEMON_INPUT_KEYS.to_vec();
    keys.sort_unstable();
    listed.sort_unstable();
    assert_eq!(keys, listed);
}

#[test]
fn the_daemons_relative_paths_start_at_the_config_files_folder() {
    let dir = crate::util::tempdir();
    let path = dir.path().join("edgemt.toml");
    std::fs::write(
        &path,
        "[model]\npath = \"m.onnx\"\n[mqtt]\nusername = \"u\"\npassword_file = \"pw\"\n",
    )
    .unwrap();
    let cfg = Config::load(&path).unwrap();
    let daemon = DaemonConfig::from_config(&cfg).unwrap();
    assert_eq!(daemon.mqtt.password_file, Some(dir.path().join("pw")));
    assert_eq!(cfg.model.path, dir.path().join("m.onnx"));
}

#[test]
fn an_unknown_key_is_an_error_naming_it() {
    let err =
        Config::from_toml("[model]\npath = \"m.onnx\"\n[learn]\nlamda_pseudo = 2.0\n").unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }));
    assert!(err.to_string().contains("lamda_pseudo"), "{err}");
    let err = Config::from_toml("[model]\npath = \"m.onnx\"\n[modle]\n").unwrap_err();
    assert!(err.to_string().contains("modle"), "{err}");
    // In the daemon's sections and keys too, with the right key among those suggested.
    for (text, typo, right) in [
        ("[mqtt]\nhots = \"b\"", "hots", "host"),
        (
            "[input]\nqueue_capacty = 1",
            "queue_capacty",
            "queue_capacity",
        ),
        ("[input]\nmax_ab = 1.0", "max_ab", "max_abs"),
        ("[metrics]\ninterval = 1.0", "interval", "interval_s"),
        ("[mqqt]\nhost = \"b\"", "mqqt", "mqtt"),
    ] {
        let err = load_all(&format!("[model]\npath = \"m.onnx\"\n{text}\n")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("`{typo}`")) && msg.contains(&format!("`{right}`")),
            "{text}: {msg}"
        );
    }
}

#[test]
fn out_of_range_values_are_errors_naming_the_key() {
    for (text, key) in [
        ("[learn]\nema_decay = 1.5", "learn.ema_decay"),
        (
            "[learn]\nconfidence_threshold = -0.1",
            "learn.confidence_threshold",
        ),
        ("[learn]\nlearning_rate = 0.0", "learn.learning_rate"),
        ("[learn]\ntrain_every = 0", "learn.train_every"),
        (
            "[learn]\nbatch_unlabeled = 64\nunlabeled_capacity = 10",
            "learn.unlabeled_capacity",
        ),
        ("[augment]\ntime_axis = 2", "augment.time_axis"),
        ("[replay]\nbatch = 0", "replay.batch"),
        ("[mqtt]\nqos = 2", "mqtt.qos"),
        ("[mqtt]\nprefix = \"a/#\"", "mqtt.prefix"),
        ("[mqtt]\ntls = true", "mqtt.ca_file"),
        ("[guard]\nmargin = 1.5", "guard.margin"),
        ("[checkpoint]\nkeep = 0", "checkpoint.keep"),
        ("[metrics]\ninterval_s = 0.0", "metrics.interval_s"),
        // Still in [model]: the text follows its path line.
        ("trainable_layers = 0", "model.trainable_layers"),
        ("trainable_layers = 17", "model.trainable_layers"),
    ] {
        let err = load_all(&format!("[model]\npath = \"m.onnx\"\n{text}\n")).unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
}

/// Every key a section validates, one bad value each (the list above covers the rest).
#[test]
fn every_validated_key_rejects_a_bad_value_by_name() {
    for (text, key) in [
        ("[learn]\nlambda_pseudo = -1.0", "learn.lambda_pseudo"),
        (
            "[learn]\nalpha_consistency = -1.0",
            "learn.alpha_consistency",
        ),
        ("[learn]\nanchor = -1.0", "learn.anchor"),
        ("[learn]\ndiversity = -1.0", "learn.diversity"),
        ("[learn]\nmomentum = 1.5", "learn.momentum"),
        ("[learn]\nadam_eps = -1.0", "learn.adam_eps"),
        ("[learn]\nmax_grad_norm = -1.0", "learn.max_grad_norm"),
        (
            "[learn]\nalignment_momentum = 1.5",
            "learn.alignment_momentum",
        ),
        ("[learn]\nema_every = 0", "learn.ema_every"),
        ("[learn]\nbatch_labeled = 0", "learn.batch_labeled"),
        ("[learn]\nbatch_unlabeled = 0", "learn.batch_unlabeled"),
        ("[learn]\nlabeled_per_class = 0", "learn.labeled_per_class"),
        ("[augment]\njitter = -1.0", "augment.jitter"),
        ("[augment]\nscale = -1.0", "augment.scale"),
        ("[replay]\ntimeline_every = 0", "replay.timeline_every"),
        ("[daemon]\nready_timeout_s = -1.0", "daemon.ready_timeout_s"),
        ("[mqtt]\nhost = \"\"", "mqtt.host"),
        ("[mqtt]\nkeep_alive_s = 1", "mqtt.keep_alive_s"),
        ("[mqtt]\nmax_payload_bytes = 0", "mqtt.max_payload_bytes"),
        ("[mqtt]\nrequest_queue = 0", "mqtt.request_queue"),
        ("[mqtt]\nreconnect_min_ms = 0", "mqtt.reconnect_min_ms"),
        (
            "[mqtt]\nreconnect_min_ms = 500\nreconnect_max_ms = 100",
            "mqtt.reconnect_max_ms",
        ),
        ("[mqtt]\nconnect_timeout_s = 0", "mqtt.connect_timeout_s"),
        ("[mqtt]\nclient_cert = \"c.pem\"", "mqtt.client_key"),
        ("[input]\nqueue_capacity = 0", "input.queue_capacity"),
        ("[input]\nmax_batch = 0", "input.max_batch"),
        ("[input]\nfeedback_capacity = 0", "input.feedback_capacity"),
        ("[input]\nwindow = 0", "input.window"),
        ("[input]\nhop = 0", "input.hop"),
        ("[input]\nmax_abs = -1.0", "input.max_abs"),
        ("[input]\nlabel_window_s = 0.0", "input.label_window_s"),
        (
            "[input]\nclass_label_max_samples = 0",
            "input.class_label_max_samples",
        ),
        (
            "[metrics]\nstate_interval_s = 0.0",
            "metrics.state_interval_s",
        ),
        ("[metrics]\nrecent_labels = 0", "metrics.recent_labels"),
        (
            "[metrics]\nprometheus = \"port 9898\"",
            "metrics.prometheus",
        ),
        ("[checkpoint]\nevery_steps = 0", "checkpoint.every_steps"),
        ("[checkpoint]\nevery_s = 1e300", "checkpoint.every_s"),
        (
            "[checkpoint]\nmin_interval_s = -1",
            "checkpoint.min_interval_s",
        ),
        (
            "[checkpoint]\nmax_mib_per_day = 0",
            "checkpoint.max_mib_per_day",
        ),
        ("[guard]\nmin_agreement = 1.5", "guard.min_agreement"),
        ("[guard]\ncollapse_ratio = 1.5", "guard.collapse_ratio"),
        ("[guard]\ncapacity = 0", "guard.capacity"),
        ("[guard]\ncheck_every_steps = 0", "guard.check_every_steps"),
        ("[gate]\nalpha = 1.5", "gate.alpha"),
        ("[gate]\nwindow = 0", "gate.window"),
        ("[calibration]\npolar = [[0, 1, 1]]", "calibration"),
    ] {
        let err = load_all(&format!("[model]\npath = \"m.onnx\"\n{text}\n")).expect_err(text);
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
}

#[test]
fn a_wrongly_typed_value_is_an_error_naming_the_key() {
    let err = Config::from_toml("[model]\npath = \"m.onnx\"\n[learn]\nema_decay = \"high\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("ema_decay"), "{err}");
    let err = Config::from_toml("[learn]\nema_decay = 0.9\n").unwrap_err();
    assert!(
        err.to_string().contains("model"),
        "missing [model] is named: {err}"
    );
}
