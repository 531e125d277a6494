//! A real mosquitto broker on a free loopback port, started and stopped by the tests, and a
//! real `edgemt run` daemon process talking to it.
//!
//! The broker runs as configured by [`BrokerOptions`]: anonymous and without persistence by
//! default, or with TLS (a CA and certificates made here with the `openssl` CLI), password
//! users, an ACL file, on-disk persistence and unlimited queues.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};

fn mosquitto_bin() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

/// How a [`Broker`] is set up; the default is an anonymous plain listener without persistence.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// The (only) listener speaks TLS with a certificate for 127.0.0.1 and localhost signed by
    /// a CA made for this broker ([`Broker::ca_file`]).
    pub tls: bool,
    /// With `tls`: serve a certificate signed by the other CA ([`Broker::other_ca_file`]).
    pub tls_cert_from_other_ca: bool,
    /// Password users (`mosquitto_passwd`); when any are given, anonymous clients are refused.
    pub users: Vec<(String, String)>,
    /// A mosquitto `acl_file`.
    pub acl_file: Option<PathBuf>,
    /// Sessions and queued QoS 1 messages are saved to disk on a graceful stop and restored
    /// on restart.
    pub persistence: bool,
    /// No broker-side drops: no limit on queued messages, a large in-flight window.
    pub unlimited_queues: bool,
}

/// `[("name", "password"), ..]` as [`BrokerOptions::users`] takes them.
pub fn users(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect()
}

pub struct Broker {
    pub port: u16,
    options: BrokerOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(BrokerOptions::default())
    }

    pub fn start_with(options: BrokerOptions) -> Broker {
        let mut b = Broker::unstarted(options);
        b.restart();
        b
    }

    /// A broker with its port and files chosen but not running yet: nothing listens on
    /// `port` until [`Broker::restart`].
    pub fn unstarted(options: BrokerOptions) -> Broker {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        Broker {
            port,
            options,
            dir,
            child: None,
        }
    }

    /// The CA that signs the broker's certificate (unless `tls_cert_from_other_ca`).
    pub fn ca_file(&self) -> PathBuf {
        make_tls_files(self.dir.path());
        self.dir.path().join("ca.crt")
    }

    /// A second CA, made the same way, that did not sign the default certificate.
    pub fn other_ca_file(&self) -> PathBuf {
        make_tls_files(self.dir.path());
        self.dir.path().join("other-ca.crt")
    }

    /// What mosquitto logged (all runs of this broker).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// mosquitto.conf for the current options; writes the files it names (password file,
    /// certificates) on the way.
    fn config(&self) -> String {
        let o = &self.options;
        let d = self.dir.path();
        // As root, mosquitto would switch to the `mosquitto` user, which cannot read the
        // 0700 temp dir; `user root` keeps it (and is ignored when not started as root).
        let mut c = format!("user root\nlistener {} 127.0.0.1\n", self.port);
        if o.tls {
            make_tls_files(d);
            let server = if o.tls_cert_from_other_ca {
                "server-other"
            } else {
                "server"
            };
            c += &format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                d.join("ca.crt").display(),
                d.join(format!("{server}.crt")).display(),
                d.join(format!("{server}.key")).display()
            );
        }
        if o.users.is_empty() {
            c += "allow_anonymous true\n";
        } else {
            let file = d.join("passwords");
            let _ = std::fs::remove_file(&file);
            for (i, (user, password)) in o.users.iter().enumerate() {
                let mut cmd = Command::new("mosquitto_passwd");
                if i == 0 {
                    cmd.arg("-c");
                }
                let ok = cmd
                    .arg("-b")
                    .arg(&file)
                    .args([user, password])
                    .status()
                    .expect("mosquitto_passwd runs")
                    .success();
                assert!(ok, "mosquitto_passwd for {user}");
            }
            c += &format!("allow_anonymous false\npassword_file {}\n", file.display());
        }
        if let Some(acl) = &o.acl_file {
            c += &format!("acl_file {}\n", acl.display());
        }
        if o.persistence {
            c += &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 0\n",
                d.display()
            );
        } else {
            c += "persistence false\n";
        }
        if o.unlimited_queues {
            c += "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 65535\n";
        }
        c
    }

    /// Starts (again) on the same port with the same options.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(&conf, self.config()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts (install it with tools/setup.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "mosquitto did not listen on {} ({exited:?}):\n{}",
                self.port,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops, changes the options, and starts again on the same port.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut BrokerOptions)) {
        self.stop_gracefully();
        change(&mut self.options);
        self.restart();
    }

    /// SIGKILL: the broker vanishes without saving anything.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: mosquitto closes its connections and, with persistence, writes its
    /// database (sessions, subscriptions, queued QoS 1 messages) before exiting.
    pub fn stop_gracefully(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "mosquitto ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two self-made CAs in `dir` and, for each, a server certificate for 127.0.0.1 and
/// localhost: `ca.crt` signs `server.crt`, `other-ca.crt` signs `server-other.crt`. Made once
/// per directory (EC P-256 keys, quick to generate).
fn make_tls_files(dir: &Path) {
    if dir.join("server-other.crt").exists() {
        return;
    }
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    for (ca, server) in [("ca", "server"), ("other-ca", "server-other")] {
        let (ca_key, ca_crt) = (format!("{ca}.key"), format!("{ca}.crt"));
        let subject = format!("/CN=edgemt test {ca}");
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args);
        let (key, csr, crt) = (
            format!("{server}.key"),
            format!("{server}.csr"),
            format!("{server}.crt"),
        );
        let mut args = vec!["req", "-new"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
        openssl(&args);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
    }
}

/// A loopback port nothing listens on right now (the OS's pick, released at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a daemon config for `broker` under `prefix` into `dir` (the shipped model and its
/// embedding reference, as the shipped config has them); `extra` is appended.
pub fn daemon_config(dir: &Path, broker: &Broker, prefix: &str, extra: &str) -> PathBuf {
    daemon_config_mqtt(dir, broker, prefix, "", extra)
}

/// [`daemon_config`] with `mqtt_extra` added to its `[mqtt]` table (credentials, TLS, QoS).
pub fn daemon_config_mqtt(
    dir: &Path,
    broker: &Broker,
    prefix: &str,
    mqtt_extra: &str,
    extra: &str,
) -> PathBuf {
    let p = dir.join(format!("{}.toml", prefix.replace('/', "_")));
    let text = format!(
        "[model]\npath = {:?}\nreference = {:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nprefix = \"{prefix}\"\nclient_id = \"edgemt-{}\"\nreconnect_max_ms = 1000\n{mqtt_extra}\n[metrics]\ninterval_s = 0.5\n{extra}",
        crate::util::path("models/hapt_mlp.onnx").display().to_string(),
        crate::util::path("models/hapt_mlp.embeddings.json").display().to_string(),
        broker.port,
        prefix.replace('/', "-"),
    );
    std::fs::write(&p, text).unwrap();
    p
}

pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Daemon {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log).unwrap();
        // EDGEMT_TEST_BIN runs these tests against another build (e.g. an older commit's,
        // to show a test fails there).
        let bin = std::env::var_os("EDGEMT_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgemt")));
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("edgemt starts");
        Daemon {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's peak resident set size so far (`VmHWM`), read from /proc.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the daemon's /proc status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kb * 1024
    }

    /// SIGKILL: no chance to say goodbye (the broker's Last Will speaks for it).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGINT (Ctrl-C), then the exit status and how long it took (panics after 10 s).
    pub fn interrupt(&mut self) -> (ExitStatus, Duration) {
        self.stop_with("-INT")
    }

    /// SIGTERM, then the exit status and how long it took (panics after 10 s).
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        self.stop_with("-TERM")
    }

    /// Sends `signal` (as `kill` names it: `-HUP`, `-USR1`, ...), then the exit status and
    /// how long it took (panics after 10 s).
    pub fn stop_with_signal(&mut self, signal: &str) -> (ExitStatus, Duration) {
        self.stop_with(signal)
    }

    /// Waits up to `timeout` for the daemon to exit by itself; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the daemon has a handler installed for signal number `signo` (its bit in
    /// `SigCgt` of /proc/<pid>/status): from then on that signal cannot kill it on the spot.
    pub fn catches(&self, signo: u32) -> bool {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (signo - 1)) != 0)
    }

    fn stop_with(&mut self, signal: &str) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal}");
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "daemon ignored {signal}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until the daemon's log satisfies `done` or `timeout` passes; returns whether it did.
pub fn wait_for_log(daemon: &Daemon, done: impl Fn(&str) -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done(&daemon.log_text()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first log line at WARN level that contains (case-insensitively) one of `words`.
pub fn warn_line<'a>(log: &'a str, words: &[&str]) -> Option<&'a str> {
    log.lines().find(|l| {
        let lower = l.to_lowercase();
        l.contains("WARN") && words.iter().any(|w| lower.contains(&w.to_lowercase()))
    })
}

/// systemd's side of `Type=notify`: a datagram socket the daemon reports to
/// (`NOTIFY_SOCKET`), read by a thread that stamps each message with when it arrived.
pub struct Notifications {
    rx: Receiver<(Duration, String)>,
    pub path: PathBuf,
    /// Every message received so far, with its arrival time since `bind`.
    pub seen: Vec<(Duration, String)>,
}

impl Notifications {
    pub fn bind(dir: &Path) -> Notifications {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let bound = Instant::now();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if let Ok(n) = socket.recv(&mut buf) {
                    let note = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if tx.send((bound.elapsed(), note)).is_err() {
                        return;
                    }
                } else if tx.send((Duration::ZERO, String::new())).is_err() {
                    // A read timeout: check now and then whether anyone still listens.
                    return;
                }
            }
        });
        Notifications {
            rx,
            path,
            seen: Vec::new(),
        }
    }

    /// The environment variable to start the daemon with.
    pub fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().unwrap())
    }

    /// Receives until a message satisfies `wanted` (true) or `timeout` passes (false).
    pub fn wait_for(&mut self, wanted: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        self.wait_for_after(0, wanted, timeout)
    }

    /// [`Notifications::wait_for`], looking only at messages from index `first` of `seen` on.
    pub fn wait_for_after(
        &mut self,
        first: usize,
        wanted: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.seen.iter().skip(first).any(|(_, n)| wanted(n)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((_, note)) if note.is_empty() => {}
                Ok(stamped) => self.seen.push(stamped),
                Err(_) => return false,
            }
        }
    }
}

/// Whether an sd_notify message holds the line `line` (e.g. `READY=1`).
pub fn has_line(note: &str, line: &str) -> bool {
    note.lines().any(|l| l == line)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How an [`MqttPeer`] connects beyond the defaults (plain TCP, anonymous, clean session).
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    pub credentials: Option<(String, String)>,
    /// Connect with TLS, trusting this CA.
    pub ca_file: Option<PathBuf>,
    /// A persistent session (`clean_session = false`): the broker keeps the subscriptions
    /// and queues QoS 1 messages while the peer is away, and the peer reconnects by itself
    /// whenever the connection drops.
    pub persistent: bool,
    /// Largest packet sent or received (default 4 MiB).
    pub max_packet_bytes: Option<usize>,
}

/// A sensor or dashboard: a real MQTT client whose received messages arrive on a channel.
pub struct MqttPeer {
    pub client: Client,
    rx: Receiver<(String, Vec<u8>)>,
    counts: Arc<PeerCounts>,
    thread: std::thread::JoinHandle<()>,
}

/// What a peer's connection has done so far.
#[derive(Debug, Default)]
struct PeerCounts {
    /// Publishes written to the network (QoS 0 messages are then with the broker).
    published: AtomicU64,
    /// PUBACKs received: QoS 1 messages the broker has accepted.
    acked: AtomicU64,
}

impl MqttPeer {
    pub fn connect(port: u16, id: &str, subscriptions: &[&str]) -> MqttPeer {
        MqttPeer::connect_with(port, id, subscriptions, PeerOptions::default())
    }

    pub fn connect_with(
        port: u16,
        id: &str,
        subscriptions: &[&str],
        options: PeerOptions,
    ) -> MqttPeer {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let max = options.max_packet_bytes.unwrap_or(4 << 20);
        opts.set_max_packet_size(max, max);
        opts.set_clean_session(!options.persistent);
        if let Some((user, password)) = &options.credentials {
            opts.set_credentials(user, password);
        }
        if let Some(ca) = &options.ca_file {
            // rumqttc is built without a default crypto provider (as the daemon is).
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca: std::fs::read(ca).unwrap(),
                alpn: None,
                client_auth: None,
            }));
        }
        let (client, mut connection) = Client::new(opts, 10_000);
        let (tx, rx) = channel();
        let (ack_tx, ack_rx) = channel();
        let counts = Arc::new(PeerCounts::default());
        let counted = counts.clone();
        let wanted = subscriptions.len();
        let persistent = options.persistent;
        let thread = std::thread::spawn(move || {
            let mut acks = 0;
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acks += 1;
                        if acks == wanted {
                            let _ = ack_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) if wanted == 0 => {
                        let _ = ack_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counted.acked.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                        counted.published.fetch_add(1, Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    // Polling again reconnects; the broker resumes the session.
                    Err(_) if persistent => std::thread::sleep(Duration::from_millis(100)),
                    Err(_) => return,
                }
            }
        });
        for s in subscriptions {
            client.subscribe(*s, QoS::AtLeastOnce).unwrap();
        }
        ack_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscribed");
        MqttPeer {
            client,
            rx,
            counts,
            thread,
        }
    }

    /// Sends DISCONNECT and returns once it is out: the broker then knows the peer is gone
    /// (dropping a peer closes its connection only at its next network event), and keeps a
    /// persistent session for it.
    pub fn disconnect(self) {
        self.client.disconnect().unwrap();
        self.thread.join().unwrap();
    }

    /// Publishes at the given QoS (`publish` uses QoS 1).
    pub fn publish_qos(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, false, payload).unwrap();
    }

    /// Publishes written to the network so far (retransmissions count again).
    pub fn published(&self) -> u64 {
        self.counts.published.load(Relaxed)
    }

    /// PUBACKs received so far.
    pub fn acked(&self) -> u64 {
        self.counts.acked.load(Relaxed)
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// The next received message, if one arrives within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Receives until `done` says so (true) or `timeout` passes; returns everything received.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[(String, Vec<u8>)]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => got.push(m),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        got
    }
}

/// The payloads received on one topic, as text.
pub fn on<'a>(msgs: &'a [(String, Vec<u8>)], topic: &'a str) -> impl Iterator<Item = String> + 'a {
    msgs.iter()
        .filter(move |(t, _)| t == topic)
        .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
}

/// Waits up to `timeout` for a metrics message on `topic` that `done` accepts and returns
/// it; panics with the last one and `daemon`'s log if none came.
pub fn metrics_where(
    peer: &MqttPeer,
    topic: &str,
    daemon: &Daemon,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let got = peer.collect_until(timeout, |m| {
        last_metrics(m, topic).is_some_and(|v| done(&v))
    });
    let last = last_metrics(&got, topic);
    last.clone().filter(|v| done(v)).unwrap_or_else(|| {
        panic!(
            "metrics never got there (last: {last:?}); the daemon said:\n{}",
            daemon.log_text()
        )
    })
}

/// One number of a metrics message; panics naming the key if it is missing.
pub fn num(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("metrics lack {key}: {v}"))
}

/// The ids of the predictions among `msgs`, in arrival order.
pub fn predicted_ids(msgs: &[(String, Vec<u8>)], topic: &str) -> Vec<String> {
    on(msgs, topic)
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(&p).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The last metrics message received on `topic`, parsed.
pub fn last_metrics(msgs: &[(String, Vec<u8>)], topic: &str) -> Option<serde_json::Value> {
    on(msgs, topic)
        .last()
        .map(|t| serde_json::from_str(&t).expect("metrics are JSON"))
}

/// A `mosquitto_sub` or `mosquitto_pub` command aimed at `topic` on the test broker.
fn mosquitto_client(program: &str, port: u16, topic: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic]);
    cmd
}

/// `mosquitto_sub` reading one (retained) message from a topic.
pub fn mosquitto_sub_one(port: u16, topic: &str) -> String {
    let out = mosquitto_client("mosquitto_sub", port, topic)
        .args(["-C", "1", "-W", "5"])
        .output()
        .expect("mosquitto_sub runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `mosquitto_pub` one message.
pub fn mosquitto_pub(port: u16, topic: &str, message: &str) {
    let ok = mosquitto_client("mosquitto_pub", port, topic)
        .args(["-m", message])
        .status()
        .expect("mosquitto_pub runs")
        .success();
    assert!(ok);
}

/// A broker, a daemon on it under `prefix` with `extra` config, and a peer subscribed (before
/// the daemon starts, so it misses nothing) to `topics` under the prefix: where most daemon
/// tests start. Dropped, it stops the daemon, then the broker.
pub struct Rig {
    pub daemon: Daemon,
    pub peer: MqttPeer,
    pub broker: Broker,
    pub prefix: &'static str,
    _dir: tempfile::TempDir,
}

impl Rig {
    pub fn start(prefix: &'static str, peer_id: &str, extra: &str, topics: &[&str]) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = Broker::start();
        let cfg = daemon_config(dir.path(), &broker, prefix, extra);
        let topics: Vec<String> = topics.iter().map(|t| format!("{prefix}/{t}")).collect();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let peer = MqttPeer::connect(broker.port, peer_id, &topics);
        let daemon = Daemon::start(&cfg, &[]);
        Rig {
            daemon,
            peer,
            broker,
            prefix,
            _dir: dir,
        }
    }

    /// `{prefix}/{name}`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// [`metrics_where`] on this rig's metrics topic (the peer must subscribe to it).
    pub fn metrics_where(
        &self,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        metrics_where(
            &self.peer,
            &self.topic("metrics"),
            &self.daemon,
            timeout,
            done,
        )
    }
}
