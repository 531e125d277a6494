//! A real mosquitto broker on a free loopback port, started and stopped by the tests, and a
//! real `edgemt run` daemon process talking to it.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

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

pub struct Broker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Broker {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let mut b = Broker {
            port,
            dir,
            child: None,
        };
        b.restart();
        b
    }

    /// Starts (again) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n",
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
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
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a daemon config for `broker` under `prefix` into `dir`; `extra` is appended.
pub fn daemon_config(dir: &Path, broker: &Broker, prefix: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("{}.toml", prefix.replace('/', "_")));
    let text = format!(
        "[model]\npath = {:?}\n[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nprefix = \"{prefix}\"\nclient_id = \"edgemt-{}\"\nreconnect_max_ms = 1000\n[metrics]\ninterval_s = 0.5\n{extra}",
        crate::util::path("models/hapt_mlp.onnx").display().to_string(),
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

    /// SIGTERM, then the exit status and how long it took (panics after 10 s).
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "daemon ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A sensor or dashboard: a real MQTT client whose received messages arrive on a channel.
pub struct MqttPeer {
    pub client: Client,
    rx: Receiver<(String, Vec<u8>)>,
}

impl MqttPeer {
    pub fn connect(port: u16, id: &str, subscriptions: &[&str]) -> MqttPeer {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut connection) = Client::new(opts, 10_000);
        let (tx, rx) = channel();
        let (ack_tx, ack_rx) = channel();
        let wanted = subscriptions.len();
        std::thread::spawn(move || {
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
                    Ok(_) => {}
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
        MqttPeer { client, rx }
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
