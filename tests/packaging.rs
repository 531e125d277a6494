//! Deployment files: the systemd unit in packaging/ and cross.toml. Only std is used, so these
//! tests check the files as text; tools/check_packaging.sh runs `systemd-analyze verify`.

use std::path::PathBuf;

fn repo_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every `Key=value` assignment in the `[Service]` section, in order (keys may repeat).
fn service_settings() -> Vec<(String, String)> {
    let text = repo_file("packaging/edgemt.service");
    let mut logical = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(line);
                logical.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in logical {
        if line.starts_with('[') && line.ends_with(']') {
            section = line;
        } else if section == "[Service]" {
            if let Some((key, value)) = line.split_once('=') {
                settings.push((key.trim().to_string(), value.trim().to_string()));
            }
        }
    }
    settings
}

/// The effective value of a `[Service]` key: its last assignment.
fn service_value(key: &str) -> Option<String> {
    service_settings()
        .into_iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn assert_service_value(key: &str, expected: &str) {
    assert_eq!(
        service_value(key).as_deref(),
        Some(expected),
        "packaging/edgemt.service: expected {key}={expected} in [Service]"
    );
}

#[test]
fn service_unit_is_type_notify_with_a_watchdog() {
    assert_service_value("Type", "notify");
    let watchdog = service_value("WatchdogSec").expect("WatchdogSec= in [Service]");
    let seconds: u64 = watchdog
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("WatchdogSec={watchdog} is not a plain number of seconds"));
    assert!(seconds > 0, "WatchdogSec=0 disables the watchdog");
}

#[test]
fn service_unit_restarts_the_daemon_when_it_fails() {
    assert_service_value("Restart", "on-failure");
}

#[test]
fn service_unit_runs_edgemt_with_a_config_file() {
    let exec = service_value("ExecStart").expect("ExecStart= in [Service]");
    assert!(exec.contains("edgemt run --config"), "ExecStart={exec}");
}

#[test]
fn service_unit_runs_as_an_unprivileged_user_with_a_state_directory() {
    let dynamic = service_value("DynamicUser").is_some_and(|v| v == "yes");
    let user = service_value("User").filter(|u| !u.is_empty() && u != "root" && u != "0");
    assert!(
        dynamic || user.is_some(),
        "expected DynamicUser=yes or a non-root User="
    );
    let state = service_value("StateDirectory").unwrap_or_default();
    assert!(
        !state.is_empty(),
        "expected StateDirectory= (checkpoints go to $STATE_DIRECTORY)"
    );
}

#[test]
fn service_unit_makes_the_system_read_only_and_forbids_privilege_gain() {
    assert_service_value("ProtectSystem", "strict");
    assert_service_value("NoNewPrivileges", "yes");
}

#[test]
fn cross_toml_names_both_arm_targets() {
    let text = repo_file("cross.toml");
    let headers: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .collect();
    for target in ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"] {
        let header = format!("[target.{target}]");
        assert!(
            headers.contains(&header.as_str()),
            "cross.toml has no {header} section"
        );
    }
}

#[test]
fn every_repository_file_cross_toml_mentions_exists() {
    let text = repo_file("cross.toml");
    let mentioned: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .map(|w| w.trim_end_matches(['.', ';', ':']))
        .filter(|w| {
            ["tools/", "packaging/", ".cargo/", "src/", "tests/"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .collect();
    assert!(!mentioned.is_empty(), "cross.toml names the files to read");
    for path in mentioned {
        assert!(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(path)
                .exists(),
            "cross.toml mentions {path}, which does not exist"
        );
    }
}
