//! Running emberd for the daemon tests: in process or as the built binary, a socket client,
//! a real mosquitto broker and an MQTT test client.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use emberd::config::Config;
use emberd::scheduler::Stats;
use emberd::serve::{serve, Ready, SocketSource};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::*;

/// Generous bound so a broken daemon fails the test instead of hanging it: 60 s, and five
/// times that when the tests run under an emulator (cross/test.sh), where the default model
/// prefills one request in seconds while the other tests' daemons share the two cores.
pub fn patience() -> Duration {
    if std::env::var_os("EMBERD_TEST_EXEC_WRAPPER").is_some() {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(60)
    }
}

pub struct Daemon {
    pub socket: PathBuf,
    /// The HTTP API's address, when `[http]` is enabled.
    pub http: Option<std::net::SocketAddr>,
    pub stats: Arc<Stats>,
    pub trigger: emberd::shutdown::ShutdownTrigger,
    pub done: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub async fn start(model: PathBuf, tweak: impl FnOnce(&mut Config)) -> Daemon {
        let generator = tokio::task::spawn_blocking(move || generator(model, serving_backend()))
            .await
            .unwrap();
        Daemon::serving(generator, tweak).await
    }

    /// A daemon serving with `generator`, however it was loaded.
    pub async fn serving(
        generator: emberd::generate::Generator,
        tweak: impl FnOnce(&mut Config),
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.socket.path = dir.path().join("emberd.sock");
        config.mqtt.enabled = false;
        tweak(&mut config);
        let (trigger, shutdown) = emberd::shutdown::channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Ready>();
        let done = tokio::spawn(async move {
            serve(config, generator, SocketSource::Bind, shutdown, |r| {
                let _ = ready_tx.send(r);
            })
            .await
            .expect("serve");
        });
        let ready = tokio::time::timeout(patience(), ready_rx)
            .await
            .unwrap()
            .expect("ready");
        Daemon {
            socket: ready.socket.clone().unwrap_or_default(),
            http: ready.http,
            stats: ready.stats,
            trigger,
            done,
            _dir: dir,
        }
    }

    /// Returns once the scheduler has cancelled a request (a disconnect, a cancel message).
    pub async fn wait_for_a_cancel(&self) {
        self.wait_for_cancels(1).await;
    }

    /// Waits until `n` requests in all have ended cancelled.
    pub async fn wait_for_cancels(&self, n: u64) {
        self.wait_for(&format!("{n} cancelled requests"), |s| {
            s.cancelled.load(Ordering::Relaxed) >= n
        })
        .await;
    }

    /// Waits until no request is waiting or running.
    pub async fn wait_until_idle(&self) {
        self.wait_for("no request in flight", |s| {
            s.in_flight.load(Ordering::Acquire) == 0
        })
        .await;
    }

    /// Waits until `ready` holds of the daemon's counters; `what` names it if it never does.
    pub async fn wait_for(&self, what: &str, ready: impl Fn(&Stats) -> bool) {
        let deadline = tokio::time::Instant::now() + patience();
        while !ready(&self.stats) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited in vain for {what}: {:?}",
                self.stats
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.socket).await
    }

    pub async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(patience(), self.done)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        assert!(!self.socket.exists(), "the socket file is removed on exit");
    }
}

pub struct Client {
    pub lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    pub writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).await.unwrap();
        let (r, w) = stream.into_split();
        Client {
            lines: BufReader::new(r).lines(),
            writer: w,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, request: Value) {
        self.send_raw(format!("{request}\n").as_bytes()).await;
    }

    pub async fn event(&mut self) -> Value {
        let line = tokio::time::timeout(patience(), self.lines.next_line())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("open connection");
        serde_json::from_str(&line).unwrap()
    }

    /// Events of one request up to and including its terminal event (events of others are
    /// skipped).
    pub async fn until_end(&mut self, id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            let e = self.event().await;
            if e["id"] != id {
                continue;
            }
            let terminal = e["type"] != "token";
            events.push(e);
            if terminal {
                return events;
            }
        }
    }
}

/// A request that runs until it is stopped (cancel, disconnect, deadline, shutdown).
pub fn long_request(id: &str) -> Value {
    serde_json::json!({"id": id, "prompt": "Tell me a long story.", "max_tokens": 1000,
                       "ignore_eos": true, "temperature": 0})
}

pub fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

/// A real mosquitto on a free port of 127.0.0.1, stopped when dropped.
pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Broker {
    /// An open broker: anonymous clients, no persistence.
    pub fn start() -> Broker {
        Broker::with_config(|port, _| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
        })
    }

    /// A broker whose mosquitto.conf is `conf(port, dir)` (dir: for its files).
    pub fn with_config(conf: impl FnOnce(u16, &Path) -> String) -> Broker {
        Broker::with_config_on(free_port(), conf)
    }

    /// Like `with_config`, listening on `port`.
    pub fn with_config_on(port: u16, conf: impl FnOnce(u16, &Path) -> String) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // As root, mosquitto would switch to the `mosquitto` user and lose access to dir.
        let text = conf(port, dir.path()) + "user root\n";
        std::fs::write(dir.path().join("mosquitto.conf"), text).unwrap();
        let mut broker = Broker {
            port,
            dir,
            child: None,
        };
        broker.run();
        broker
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto must be installed (the setup installs it)");
        self.child = Some(child);
        // Ready when it accepts connections.
        let deadline = std::time::Instant::now() + patience();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker the way a service manager does (SIGTERM: it saves its sessions).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc_kill(child.id() as i32, 15) };
            child.wait().unwrap();
        }
    }

    /// Kills the broker (SIGKILL): what it had not written to disk is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts it again after `stop` or `kill`, on the same port with the same files.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is still running");
        self.run();
    }

    /// Starts it again on the same port with the same configuration and files.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// What mosquitto logged (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a test client receives: topic, payload (JSON, else its text as a string), MQTT 5
/// properties.
pub type Received = (String, Value, Option<PublishProperties>);

/// A test client whose event loop forwards incoming publishes to a channel.
pub async fn mqtt_client(
    port: u16,
    name: &str,
    topics: &[&str],
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let mut options = MqttOptions::new(name, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    mqtt_client_with(options, topics).await
}

/// Like `mqtt_client` with the caller's options. The client outlives broker restarts: it
/// keeps polling (rumqttc reconnects and, with a persistent session, resends what was
/// pending).
pub async fn mqtt_client_with(
    mut options: MqttOptions,
    topics: &[&str],
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    // As emberd does: a small publish goes out at once, not after the broker's delayed ACK.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let mut pending_subacks = topics.len();
    for t in topics {
        client
            .subscribe(t.to_string(), QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    pending_subacks = pending_subacks.saturating_sub(1);
                    if pending_subacks == 0 {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let value = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&p.payload).into_owned())
                    });
                    if tx.send((topic, value, p.properties)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) if tx.is_closed() => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(patience(), subscribed_rx)
        .await
        .unwrap()
        .unwrap();
    (client, rx)
}

/// Turns on the MQTT transport of the daemon `c` configures, on the broker at `port`, as
/// device `device`.
pub fn on_broker(c: &mut Config, port: u16, device: &str) {
    c.mqtt.enabled = true;
    c.mqtt.port = port;
    c.mqtt.device_id = device.into();
}

/// A client of device `device`'s topics (its responses, errors and status), returned once
/// the daemon says it is online.
pub async fn device_client(
    port: u16,
    name: &str,
    device: &str,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let status = format!("emberd/{device}/status");
    let topics = [
        format!("emberd/{device}/errors"),
        format!("emberd/{device}/response/#"),
        status.clone(),
    ];
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let (client, mut rx) = mqtt_client(port, name, &topics).await;
    wait_on(&mut rx, &status, |v| v["state"] == "online").await;
    (client, rx)
}

/// Publishes `request` (QoS 1) to `device`'s request topic, as a device client does.
pub async fn publish_request(client: &AsyncClient, device: &str, request: &Value) {
    client
        .publish(
            format!("emberd/{device}/request"),
            QoS::AtLeastOnce,
            false,
            request.to_string(),
        )
        .await
        .unwrap();
}

/// The next message on `topic` that `wanted` accepts, skipping all others.
pub async fn wait_on(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Received>,
    topic: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let (t, value, _) = tokio::time::timeout(patience(), rx.recv())
            .await
            .expect("a message in time")
            .expect("the client is running");
        if t == topic && wanted(&value) {
            return value;
        }
    }
}

/// The next message on `topic`, skipping others.
pub async fn next_on(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Received>,
    topic: &str,
) -> Value {
    wait_on(rx, topic, |_| true).await
}

/// The terminal event (`done` or `error`) on `topic`, skipping token events and others.
pub async fn end_on(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Received>, topic: &str) -> Value {
    wait_on(rx, topic, |v| v["type"] != "token").await
}

pub fn write_serve_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("emberd.toml");
    let backend = if ORT_ON_TARGET { "auto" } else { "tract" };
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = {:?}\nort_library = {:?}\nbackend = {backend:?}\n[socket]\npath = {:?}\n[log]\njournald = \"off\"\n{extra}",
            tiny_dir("q4"),
            ort_library(),
            dir.join("emberd.sock")
        ),
    )
    .unwrap();
    config
}

/// The log lines of a daemon started by `spawn_serve`.
pub type LogLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// Starts `emberd serve --config CONFIG` with its log (stderr) piped to the caller.
pub fn spawn_serve(config: &Path) -> (std::process::Child, LogLines) {
    spawn_serve_with(config, &[])
}

/// `spawn_serve` with these environment variables set (the test-only fault hooks).
pub fn spawn_serve_with(config: &Path, env: &[(&str, &str)]) -> (std::process::Child, LogLines) {
    let mut child = emberd_command()
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    (
        child,
        std::io::BufRead::lines(std::io::BufReader::new(stderr)),
    )
}

/// The next log line containing `text`; panics if emberd exits first.
pub fn next_log_with(lines: &mut LogLines, text: &str) -> String {
    loop {
        let line = lines
            .next()
            .expect("emberd exited before logging it")
            .unwrap();
        if line.contains(text) {
            return line;
        }
    }
}

/// A daemon's log, line by line, read on its own thread so waits on it have a bound.
pub struct Log(std::sync::mpsc::Receiver<String>);

impl Log {
    pub fn of(lines: LogLines) -> Log {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end even once nobody listens: a full pipe would block emberd.
            for line in lines.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Log(rx)
    }

    /// The next line containing `text`; fails the test after `patience()` or at emberd's
    /// exit, with what emberd logged meanwhile.
    pub fn wait_for(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + patience();
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let why = match self.0.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(line) => {
                    skipped.push(line);
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => "never logged",
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => "exited before logging",
            };
            let tail = skipped[skipped.len().saturating_sub(20)..].join("\n");
            panic!("emberd {why} {text:?}; its last lines:\n{tail}");
        }
    }

    /// Everything logged until emberd exits.
    pub fn rest(&self) -> String {
        let mut all = String::new();
        while let Ok(line) = self.0.recv_timeout(patience()) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    }
}

/// Starts the built binary and returns once it says it is ready (bounded by `patience`).
pub fn spawn_ready(config: &Path) -> Spawned {
    let (child, lines) = spawn_serve(config);
    let child = Spawned(child);
    Log::of(lines).wait_for("ready: model");
    child
}

/// A daemon the test started, killed if the test ends without having waited for it (a failed
/// assertion), so that no emberd outlives its test holding the test's output open.
pub struct Spawned(pub std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The daemon's `/status`, over a plain HTTP/1.0 GET.
pub async fn http_status(port: u16) -> Value {
    serde_json::from_str(&http_get(port, "/status").await).unwrap()
}

/// The body of `GET path` on the daemon's HTTP port (HTTP/1.0: the reply ends the connection).
pub async fn http_get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut reply)
        .await
        .unwrap();
    reply
        .split_once("\r\n\r\n")
        .expect("an HTTP reply")
        .1
        .to_string()
}

/// A gauge or counter's value in Prometheus text (`name value` line).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Resident memory of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

extern "C" {
    #[link_name = "kill"]
    pub fn libc_kill(pid: i32, sig: i32) -> i32;
    #[link_name = "getuid"]
    pub fn libc_getuid() -> u32;
}
