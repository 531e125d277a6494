//! `edgemt check`: a config and its model checked without running, as an installer or an
//! operator would before `systemctl start`, with the reason when something is wrong.

use crate::util::{self, config_with, edgemt, tempdir};

#[test]
fn check_accepts_the_shipped_config_after_one_inference() {
    let out = util::run_ok(
        edgemt()
            .args(["check", "--config"])
            .arg(util::path("config/edgemt.toml")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("one inference of an all-zero sample"),
        "{text}"
    );
    assert!(text.contains("6 classes"), "{text}");
    // The core's lines, then the daemon's (built, not connected).
    assert!(text.contains("checkpoints"), "{text}");
    assert!(text.contains("(not contacted)"), "{text}");
    assert!(text.contains("commands allowed: ["), "{text}");
    assert!(text.trim_end().ends_with("ok"), "{text}");
}

/// Runs `edgemt check` on a config and returns its stderr, asserting it failed.
fn check_fails(config: &std::path::Path) -> String {
    let out = edgemt()
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "check passed a broken setup");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_names_what_is_wrong_and_exits_non_zero() {
    let dir = tempdir();
    // A model that is not ONNX at all: said in words, not as protobuf internals.
    let text_model = dir.path().join("model.onnx");
    std::fs::write(&text_model, "name,value\n1,2\n").unwrap();
    let cfg = dir.path().join("text.toml");
    std::fs::write(&cfg, format!("[model]\npath = {:?}\n", text_model)).unwrap();
    let err = check_fails(&cfg);
    assert!(err.contains("is not an ONNX model"), "{err}");
    assert!(!err.contains("wire type"), "{err}");

    // A TLS CA file that is not there.
    let cfg = config_with(
        dir.path(),
        "[mqtt]\ntls = true\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    let err = check_fails(&cfg);
    assert!(err.contains("mqtt.ca_file"), "{err}");

    // A checkpoint directory that cannot be created.
    let cfg = config_with(dir.path(), "[checkpoint]\ndir = \"/proc/edgemt\"\n");
    let err = check_fails(&cfg);
    assert!(err.contains("/proc/edgemt"), "{err}");

    // Calibration channels the model does not have.
    let cfg = config_with(dir.path(), "[calibration]\npolar = [[6, 7, 8]]\n");
    let err = check_fails(&cfg);
    assert!(err.contains("calibration"), "{err}");

    // A password file that is missing.
    let cfg = config_with(
        dir.path(),
        "[mqtt]\nusername = \"edgemt\"\npassword_file = \"/nonexistent/pw\"\n",
    );
    let err = check_fails(&cfg);
    assert!(err.contains("password_file"), "{err}");
}

/// Under systemd (JOURNAL_STREAM set) every log line carries journald's `<N>` priority, so
/// `journalctl -p warning` finds the warnings; on a terminal there is no prefix.
#[test]
fn log_lines_carry_syslog_priorities_when_stderr_is_the_journal() {
    let run = |journal: bool| {
        let mut cmd = edgemt();
        cmd.args(["check", "--config"])
            .arg(util::path("config/edgemt.toml"));
        if journal {
            cmd.env("JOURNAL_STREAM", "8:12345");
        } else {
            cmd.env_remove("JOURNAL_STREAM");
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stderr).into_owned()
    };
    let journal = run(true);
    let info = journal
        .lines()
        .find(|l| l.contains("model "))
        .expect("an info line");
    assert!(info.starts_with("<6>"), "{info}");
    assert!(
        !info.contains("Z "),
        "journald stamps the time itself: {info}"
    );
    let plain = run(false);
    let info = plain
        .lines()
        .find(|l| l.contains("model "))
        .expect("the same info line");
    assert!(!info.starts_with('<'), "{info}");
    assert!(plain.lines().all(|l| !l.starts_with('<')), "{plain}");
}

/// `edgemt check` and `edgemt export` only read a checkpoint directory, so they may run beside
/// the daemon that writes it: they remove nothing, not even a tensor file whose manifest is not
/// written yet (the daemon may be between the two) or a temporary file.
#[test]
fn check_and_export_leave_a_writers_unfinished_files_alone() {
    let dir = tempdir();
    let (ck, _) = util::replay_then_export(dir.path(), "", &[]);
    let in_progress = [
        ck.join("ckpt-0000999999.safetensors"),
        ck.join("ckpt-0000999999.safetensors.tmp"),
    ];
    for f in &in_progress {
        std::fs::write(f, b"being written").unwrap();
    }
    let cfg = config_with(
        dir.path(),
        &format!("[checkpoint]\ndir = {:?}\n", ck.display().to_string()),
    );
    util::run_ok(edgemt().args(["check", "--config"]).arg(&cfg));
    util::run_ok(
        edgemt()
            .args(["export", "--checkpoint"])
            .arg(&ck)
            .arg("-o")
            .arg(dir.path().join("again.onnx")),
    );
    for f in &in_progress {
        assert!(f.exists(), "{} was removed", f.display());
    }
}
