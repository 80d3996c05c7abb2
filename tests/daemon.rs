//! The daemon end to end: a real Unix socket, a real mosquitto broker on 127.0.0.1, the real
//! ONNX Runtime library and real models.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use emberd::config::Config;
use emberd::engine::Backend;
use emberd::scheduler::Stats;
use emberd::serve::{serve, Ready, SocketSource};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Generous bound so a broken daemon fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

struct Daemon {
    socket: PathBuf,
    stats: Arc<Stats>,
    trigger: emberd::shutdown::ShutdownTrigger,
    done: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    async fn start(model: PathBuf, tweak: impl FnOnce(&mut Config)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.socket.path = dir.path().join("emberd.sock");
        config.mqtt.enabled = false;
        tweak(&mut config);
        let generator = tokio::task::spawn_blocking(move || generator(model, Backend::Ort))
            .await
            .unwrap();
        let (trigger, shutdown) = emberd::shutdown::channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Ready>();
        let done = tokio::spawn(async move {
            serve(config, generator, SocketSource::Bind, shutdown, |r| {
                let _ = ready_tx.send(r);
            })
            .await
            .expect("serve");
        });
        let ready = tokio::time::timeout(PATIENCE, ready_rx)
            .await
            .unwrap()
            .expect("ready");
        Daemon {
            socket: ready.socket.clone().unwrap_or_default(),
            stats: ready.stats,
            trigger,
            done,
            _dir: dir,
        }
    }

    async fn connect(&self) -> Client {
        Client::connect(&self.socket).await
    }

    async fn stop(self) {
        self.trigger.trigger();
        tokio::time::timeout(PATIENCE, self.done)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
        assert!(!self.socket.exists(), "the socket file is removed on exit");
    }
}

struct Client {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Client {
    async fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).await.unwrap();
        let (r, w) = stream.into_split();
        Client {
            lines: BufReader::new(r).lines(),
            writer: w,
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, request: Value) {
        self.send_raw(format!("{request}\n").as_bytes()).await;
    }

    async fn event(&mut self) -> Value {
        let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("open connection");
        serde_json::from_str(&line).unwrap()
    }

    /// Events of one request up to and including its terminal event (events of others are
    /// skipped).
    async fn until_end(&mut self, id: &str) -> Vec<Value> {
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

fn text_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_streams_tokens_for_several_requests_on_one_connection() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut client = daemon.connect().await;
    client
        .send(json!({"id": "a", "prompt": "What is 2+2?", "max_tokens": 12, "temperature": 0}))
        .await;
    client.send(json!({"id": "b", "prompt": "Name a color.", "max_tokens": 12, "temperature": 0, "stream": false})).await;
    let mut by_id: std::collections::HashMap<String, Vec<Value>> = Default::default();
    let mut finished = 0;
    while finished < 2 {
        let e = client.event().await;
        if e["type"] != "token" {
            finished += 1;
        }
        by_id
            .entry(e["id"].as_str().unwrap().to_string())
            .or_default()
            .push(e);
    }
    let a = &by_id["a"];
    assert!(a.len() > 1, "request a streams tokens: {a:?}");
    assert_eq!(a.last().unwrap()["type"], "done");
    assert!(
        a.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            <= 12
    );
    for (i, e) in a.iter().enumerate() {
        assert_eq!(e["seq"], i as u64);
    }
    let b = &by_id["b"];
    assert_eq!(b.len(), 1, "stream=false gives one done event: {b:?}");
    assert!(!b[0]["text"].as_str().unwrap().is_empty());
    // An id-less request gets a generated id that its events carry.
    client.send(json!({"prompt": "Hi", "max_tokens": 2})).await;
    let e = client.event().await;
    assert!(e["id"].as_str().unwrap().starts_with("req-"), "{e}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_lines_get_error_events_and_the_connection_stays_usable() {
    let daemon = Daemon::start(tiny_dir("optimum"), |c| c.limits.max_request_bytes = 2048).await;
    let mut client = daemon.connect().await;
    client.send_raw(b"this is not json\n").await;
    let e = client.event().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{e}"
    );
    client.send_raw(b"{\"prompt\": \"\xff\xfe\"}\n").await;
    let e = client.event().await;
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");
    client
        .send_raw(format!("{{\"prompt\": \"{}\"}}\n", "x".repeat(5000)).as_bytes())
        .await;
    let e = client.event().await;
    assert_eq!(e["code"], "too_long", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("max_request_bytes"),
        "{e}"
    );
    client
        .send(json!({"id": "u", "prompt": "hi", "temprature": 1}))
        .await;
    let e = client.event().await;
    assert!(
        e["id"] == "u" && e["message"].as_str().unwrap().contains("temprature"),
        "{e}"
    );
    client
        .send(json!({"id": "big", "prompt": "hi", "max_tokens": 99999}))
        .await;
    let e = client.event().await;
    assert_eq!(e["code"], "too_long", "{e}");
    client
        .send(json!({"id": "ok", "prompt": "hi", "raw": true, "max_tokens": 3}))
        .await;
    let events = client.until_end("ok").await;
    assert_eq!(events.last().unwrap()["type"], "done");
    daemon.stop().await;
}

/// A request on the default model that runs for a while: no eos, many tokens.
fn long_request(id: &str) -> Value {
    json!({"id": id, "prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": true, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy_at_once_and_requests_run_in_order() {
    let daemon = Daemon::start(default_model_dir(), |c| c.limits.max_queue = 1).await;
    let mut client = daemon.connect().await;
    client.send(long_request("running")).await;
    // Its first token: the worker is busy with it.
    assert_eq!(client.event().await["id"], "running");
    client
        .send(json!({"id": "waiting", "prompt": "hi", "max_tokens": 2}))
        .await;
    client
        .send(json!({"id": "rejected", "prompt": "hi", "max_tokens": 2}))
        .await;
    let busy = loop {
        let e = client.event().await;
        if e["id"] == "rejected" {
            break e;
        }
        assert_eq!(
            e["id"], "running",
            "nothing else may run before the first ends: {e}"
        );
    };
    assert_eq!(busy["code"], "busy", "{busy}");
    client
        .send(json!({"type": "cancel", "id": "running"}))
        .await;
    let running = client.until_end("running").await;
    assert_eq!(running.last().unwrap()["finish_reason"], "cancelled");
    let waiting = client.until_end("waiting").await;
    assert_eq!(waiting.last().unwrap()["type"], "done");
    assert_eq!(daemon.stats.rejected_busy.load(Ordering::Relaxed), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_cancels_its_requests() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut client = daemon.connect().await;
    client.send(long_request("gone")).await;
    assert_eq!(client.event().await["type"], "token");
    drop(client);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while daemon.stats.cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The worker is free again.
    let mut client = daemon.connect().await;
    client
        .send(json!({"id": "next", "prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(
        client.until_end("next").await.last().unwrap()["type"],
        "done"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_ends_the_request_with_timeout() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut client = daemon.connect().await;
    let mut request = long_request("slow");
    request["timeout_s"] = json!(0.5);
    client.send(request).await;
    let events = client.until_end("slow").await;
    let done = events.last().unwrap();
    assert_eq!(done["finish_reason"], "timeout", "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() < 1000);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_and_every_request_still_gets_its_terminal_event() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut client = daemon.connect().await;
    client
        .send(json!({"id": "short", "prompt": "hi", "max_tokens": 8, "temperature": 0}))
        .await;
    assert_eq!(client.event().await["id"], "short");
    daemon.trigger.trigger();
    let events = client.until_end("short").await;
    assert_eq!(
        events.last().unwrap()["type"],
        "done",
        "an in-flight request finishes during the drain"
    );
    tokio::time::timeout(PATIENCE, daemon.done)
        .await
        .unwrap()
        .unwrap();
    assert!(!daemon.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stale.sock");
    // A socket file nobody listens on, as a crash leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let listener = emberd::transport::socket::bind(&path, 0o660).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let err = emberd::transport::socket::bind(&path, 0o660).unwrap_err();
    assert!(err.to_string().contains("already listening"), "{err}");
    drop(listener);
}

// ---------------------------------------------------------------- MQTT

struct Broker {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (the setup installs it)");
        // Ready when it accepts connections.
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};

/// A test client whose event loop forwards incoming publishes to a channel.
async fn mqtt_client(
    port: u16,
    name: &str,
    topics: &[&str],
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Value, Option<PublishProperties>)>,
) {
    let mut options = MqttOptions::new(name, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
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
                    pending_subacks -= 1;
                    if pending_subacks == 0 {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send((topic, value, p.properties)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(PATIENCE, subscribed_rx)
        .await
        .unwrap()
        .unwrap();
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_requests_stream_to_the_response_topic_with_correlation_data() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(tiny_dir("optimum"), |c| {
        c.socket.enabled = false;
        c.mqtt.enabled = true;
        c.mqtt.port = port;
        c.mqtt.device_id = "dev1".into();
        c.mqtt.prefix = "test".into();
    })
    .await;
    let (client, mut rx) = mqtt_client(
        port,
        "tester",
        &["test/dev1/status", "replies/#", "test/dev1/response/#"],
    )
    .await;

    // The retained status says online, with the engine.
    let status = loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "test/dev1/status" && value["state"] == "online" {
            break value;
        }
    };
    assert_eq!(status["engine"], "ort");
    assert_eq!(status["model"], "tiny-optimum");

    // MQTT 5 request/response: Response Topic and Correlation Data.
    let properties = PublishProperties {
        response_topic: Some("replies/one".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-42")),
        ..Default::default()
    };
    let request =
        json!({"id": "m1", "prompt": "hello", "raw": true, "max_tokens": 5, "ignore_eos": true});
    client
        .publish_with_properties(
            "test/dev1/request",
            QoS::AtLeastOnce,
            false,
            request.to_string(),
            properties,
        )
        .await
        .unwrap();
    let mut events = Vec::new();
    loop {
        let (topic, value, props) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic != "replies/one" {
            continue;
        }
        assert_eq!(
            props.and_then(|p| p.correlation_data).as_deref(),
            Some(&b"corr-42"[..])
        );
        let terminal = value["type"] != "token";
        events.push(value);
        if terminal {
            break;
        }
    }
    assert_eq!(events.last().unwrap()["type"], "done");
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 5);
    assert!(!text_of(&events).is_empty());

    // Without a Response Topic (an MQTT 3.1.1 client): the default response topic.
    let request = json!({"id": "m2", "prompt": "hello", "raw": true, "max_tokens": 2});
    client
        .publish(
            "test/dev1/request",
            QoS::AtLeastOnce,
            false,
            request.to_string(),
        )
        .await
        .unwrap();
    loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "test/dev1/response/m2" && value["type"] != "token" {
            assert_eq!(value["type"], "done");
            break;
        }
    }

    // A bad request is answered, and the daemon keeps serving.
    let props = PublishProperties {
        response_topic: Some("replies/bad".into()),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "test/dev1/request",
            QoS::AtLeastOnce,
            false,
            "{not json",
            props,
        )
        .await
        .unwrap();
    loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "replies/bad" {
            assert_eq!(value["code"], "bad_request");
            break;
        }
    }

    // Shutdown publishes a retained offline status.
    daemon.stop().await;
    loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "test/dev1/status" && value["state"] == "offline" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_cancel_topic_stops_a_running_request() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.socket.enabled = false;
        c.mqtt.enabled = true;
        c.mqtt.port = port;
        c.mqtt.device_id = "dev2".into();
    })
    .await;
    let (client, mut rx) = mqtt_client(port, "canceller", &["out/#", "emberd/dev2/status"]).await;
    // emberd is subscribed once its online status is out (it subscribes first).
    loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "emberd/dev2/status" && value["state"] == "online" {
            break;
        }
    }
    let mut request = long_request("c1");
    request["reply_to"] = json!("out/c1");
    client
        .publish(
            "emberd/dev2/request",
            QoS::AtLeastOnce,
            false,
            request.to_string(),
        )
        .await
        .unwrap();
    let first = loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "out/c1" {
            break value;
        }
    };
    assert_eq!(first["type"], "token");
    client
        .publish(
            "emberd/dev2/cancel",
            QoS::AtLeastOnce,
            false,
            json!({"type": "cancel", "id": "c1"}).to_string(),
        )
        .await
        .unwrap();
    loop {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if topic == "out/c1" && value["type"] != "token" {
            assert_eq!(value["finish_reason"], "cancelled", "{value}");
            break;
        }
    }
    daemon.stop().await;
}

// ---------------------------------------------------------------- the binary

#[test]
fn the_binary_exits_zero_on_sigterm_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("emberd.sock");
    // The daemon says when it is ready; no sleeps.
    let mut child = spawn_ready(&write_serve_config(dir.path(), ""));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(&socket).await;
        client
            .send(json!({"id": "x", "prompt": "hi", "max_tokens": 3}))
            .await;
        assert_eq!(client.until_end("x").await.last().unwrap()["type"], "done");
    });
    unsafe { libc_kill(child.id() as i32, 15) };
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        !socket.exists(),
        "the socket file is removed on a clean exit"
    );
}

fn write_serve_config(dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join("emberd.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = {:?}\nort_library = {:?}\n[socket]\npath = {:?}\n[log]\njournald = \"off\"\n{extra}",
            tiny_dir("q4"),
            ort_library(),
            dir.join("emberd.sock")
        ),
    )
    .unwrap();
    config
}

/// Starts the built binary and returns once it says it is ready.
fn spawn_ready(config: &Path) -> std::process::Child {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_emberd"))
        .args(["serve", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    loop {
        let line = lines
            .next()
            .expect("emberd exited before it was ready")
            .unwrap();
        if line.contains("ready:") && line.contains("listening") {
            break;
        }
    }
    // Keep draining stderr so the daemon never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

#[test]
fn emberd_ask_streams_a_reply_from_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = spawn_ready(&write_serve_config(dir.path(), ""));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_emberd"))
        .args([
            "ask",
            "--json",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--socket",
        ])
        .arg(dir.path().join("emberd.sock"))
        .arg("hello")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "done", "{text}");
    assert_eq!(last["usage"]["completion_tokens"], 4);
    unsafe { libc_kill(daemon.id() as i32, 15) };
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn the_last_will_says_offline_when_emberd_is_killed() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_serve_config(
        dir.path(),
        &format!(
            "[mqtt]\nenabled = true\nport = {}\ndevice_id = \"will\"\n",
            broker.port
        ),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (_client, mut rx) = mqtt_client(broker.port, "watcher", &["emberd/will/status"]).await;
        let mut daemon = spawn_ready(&config);
        loop {
            let (_, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
                .await
                .unwrap()
                .unwrap();
            if value["state"] == "online" {
                break;
            }
        }
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        loop {
            let (_, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
                .await
                .unwrap()
                .unwrap();
            if value["state"] == "offline" {
                break;
            }
        }
    });
}

#[test]
fn mosquitto_pub_with_mqtt5_response_topic_gets_the_reply_on_mosquitto_sub() {
    let broker = Broker::start();
    let port = broker.port.to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = write_serve_config(
        dir.path(),
        &format!("[mqtt]\nenabled = true\nport = {port}\ndevice_id = \"cli\"\n"),
    );
    let mut daemon = spawn_ready(&config);
    let mut sub = std::process::Command::new("mosquitto_sub")
        .args([
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "answers/cli",
            "-F",
            "%D|%p",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    // mosquitto_sub gives no readiness signal: publish probes until one comes back.
    loop {
        std::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "answers/cli",
                "-m",
                "probe",
            ])
            .status()
            .unwrap();
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            assert!(line.ends_with("probe"), "{line}");
            break;
        }
    }
    let status = std::process::Command::new("mosquitto_pub")
        .args([
            "-V",
            "mqttv5",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "emberd/cli/request",
        ])
        .args([
            "-D",
            "publish",
            "response-topic",
            "answers/cli",
            "-D",
            "publish",
            "correlation-data",
            "xyz-7",
        ])
        .args([
            "-m",
            r#"{"id":"p1","prompt":"hello","raw":true,"max_tokens":3,"ignore_eos":true}"#,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    loop {
        let line = rx
            .recv_timeout(PATIENCE)
            .expect("a reply on the response topic");
        let (correlation, payload) = line.split_once('|').unwrap();
        let event: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(correlation, "xyz-7", "{line}");
        assert_eq!(event["id"], "p1");
        if event["type"] != "token" {
            assert_eq!(event["type"], "done", "{event}");
            break;
        }
    }
    let _ = sub.kill();
    let _ = sub.wait();
    unsafe { libc_kill(daemon.id() as i32, 15) };
    assert!(daemon.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_group_splits_requests_between_two_daemons_with_none_lost_or_doubled() {
    let broker = Broker::start();
    let port = broker.port;
    let fleet = |device: &'static str| {
        move |c: &mut Config| {
            c.socket.enabled = false;
            c.mqtt.enabled = true;
            c.mqtt.port = port;
            c.mqtt.device_id = device.into();
            c.mqtt.share_group = Some("fleet".into());
        }
    };
    let a = Daemon::start(tiny_dir("optimum"), fleet("fleet-a")).await;
    let b = Daemon::start(tiny_dir("optimum"), fleet("fleet-b")).await;
    let (client, mut rx) = mqtt_client(
        port,
        "dispatcher",
        &[
            "emberd/fleet-a/status",
            "emberd/fleet-b/status",
            "fleet/replies/#",
        ],
    )
    .await;
    // Both members are subscribed once each has published its online status.
    let mut online = std::collections::HashSet::new();
    while online.len() < 2 {
        let (topic, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if value["state"] == "online" {
            online.insert(topic);
        }
    }
    for i in 0..10 {
        let request = json!({"id": format!("job{i}"), "prompt": "hello", "raw": true, "max_tokens": 20, "ignore_eos": true});
        let properties = PublishProperties {
            response_topic: Some(format!("fleet/replies/{i}")),
            ..Default::default()
        };
        client
            .publish_with_properties(
                "emberd/request",
                QoS::AtLeastOnce,
                false,
                request.to_string(),
                properties,
            )
            .await
            .unwrap();
    }
    let mut done: std::collections::HashMap<String, usize> = Default::default();
    while done.values().sum::<usize>() < 10 {
        let (_, value, _) = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .unwrap()
            .unwrap();
        if value["type"] == "done" {
            *done
                .entry(value["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(done.len(), 10, "every request answered: {done:?}");
    assert!(
        done.values().all(|&n| n == 1),
        "none answered twice: {done:?}"
    );
    let served_a = a.stats.served.load(Ordering::Relaxed);
    let served_b = b.stats.served.load(Ordering::Relaxed);
    assert_eq!(served_a + served_b, 10);
    assert!(
        served_a > 0 && served_b > 0,
        "the group split the work: {served_a} + {served_b}"
    );
    a.stop().await;
    b.stop().await;
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
