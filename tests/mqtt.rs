//! The MQTT v5 transport end to end: a real mosquitto broker on 127.0.0.1, the real
//! mosquitto_pub/mosquitto_sub clients, the real ONNX Runtime library and real models.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::daemon::*;
use common::*;
use emberd::config::{Config, TlsConfig};
use emberd::transport::mqtt::tls_client_config;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_requests_stream_to_the_response_topic_with_correlation_data() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(tiny_dir("optimum"), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "dev1");
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
    let status = wait_on(&mut rx, "test/dev1/status", |v| v["state"] == "online").await;
    assert_eq!(status["engine"], serving_engine());
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
        let (topic, value, props) = tokio::time::timeout(patience(), rx.recv())
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
    assert_eq!(
        end_on(&mut rx, "test/dev1/response/m2").await["type"],
        "done"
    );

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
    assert_eq!(next_on(&mut rx, "replies/bad").await["code"], "bad_request");

    // Shutdown publishes a retained offline status.
    daemon.stop().await;
    wait_on(&mut rx, "test/dev1/status", |v| v["state"] == "offline").await;
}

/// The socket's malformed-line test, over MQTT: the same ingress answers each bad message
/// where its replies go (the errors topic when it names no id), and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_mqtt_messages_get_error_events_and_the_daemon_keeps_serving() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(tiny_dir("optimum"), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "bad");
        c.limits.max_request_bytes = 2048;
        c.limits.max_prompt_tokens = 16;
    })
    .await;
    let (client, mut rx) = mqtt_client(
        port,
        "malformed",
        &[
            "out/#",
            "emberd/bad/errors",
            "emberd/bad/response/#",
            "emberd/bad/status",
        ],
    )
    .await;
    wait_on(&mut rx, "emberd/bad/status", |v| v["state"] == "online").await;
    let publish = |payload: Vec<u8>| {
        let client = client.clone();
        async move {
            client
                .publish("emberd/bad/request", QoS::AtLeastOnce, false, payload)
                .await
                .unwrap()
        }
    };
    publish(b"this is not json".to_vec()).await;
    let e = next_on(&mut rx, "emberd/bad/errors").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    publish(format!("{{\"prompt\": \"{}\"}}", "x".repeat(5000)).into_bytes()).await;
    let e = next_on(&mut rx, "emberd/bad/errors").await;
    assert!(
        e["code"] == "too_long" && e["message"].as_str().unwrap().contains("max_request_bytes"),
        "{e}"
    );
    publish(
        json!({"id": "u", "prompt": "hi", "temprature": 1})
            .to_string()
            .into_bytes(),
    )
    .await;
    let e = next_on(&mut rx, "emberd/bad/response/u").await;
    assert!(e["message"].as_str().unwrap().contains("temprature"), "{e}");
    let long =
        json!({"id": "long", "prompt": "hi ".repeat(40), "raw": true, "reply_to": "out/long"});
    publish(long.to_string().into_bytes()).await;
    let e = next_on(&mut rx, "out/long").await;
    assert!(
        e["code"] == "too_long" && e["message"].as_str().unwrap().contains("max_prompt_tokens"),
        "{e}"
    );
    let ok =
        json!({"id": "ok", "prompt": "hi", "raw": true, "max_tokens": 3, "reply_to": "out/ok"});
    publish(ok.to_string().into_bytes()).await;
    assert_eq!(end_on(&mut rx, "out/ok").await["type"], "done");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_cancel_topic_stops_a_running_request() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "dev2");
    })
    .await;
    let (client, mut rx) = mqtt_client(port, "canceller", &["out/#", "emberd/dev2/status"]).await;
    // emberd is subscribed once its online status is out (it subscribes first).
    wait_on(&mut rx, "emberd/dev2/status", |v| v["state"] == "online").await;
    let mut request = long_request("c1");
    request["reply_to"] = json!("out/c1");
    publish_request(&client, "dev2", &request).await;
    let first = next_on(&mut rx, "out/c1").await;
    assert_eq!(first["type"], "token");
    // A cancel for an id that is not running is ignored (as on every transport): no reply.
    for id in ["ghost", "c1"] {
        client
            .publish(
                "emberd/dev2/cancel",
                QoS::AtLeastOnce,
                false,
                json!({"type": "cancel", "id": id, "reply_to": "out/ghost"}).to_string(),
            )
            .await
            .unwrap();
    }
    let end = loop {
        let (topic, value, _) = tokio::time::timeout(patience(), rx.recv())
            .await
            .expect("a message in time")
            .unwrap();
        assert_ne!(topic, "out/ghost", "a cancel was answered: {value}");
        if topic == "out/c1" && value["type"] != "token" {
            break value;
        }
    };
    assert_eq!(end["finish_reason"], "cancelled", "{end}");
    daemon.stop().await;
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
        wait_on(&mut rx, "emberd/will/status", |v| v["state"] == "online").await;
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        wait_on(&mut rx, "emberd/will/status", |v| v["state"] == "offline").await;
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
            .recv_timeout(patience())
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
            on_broker(c, port, device);
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
        let (topic, value, _) = tokio::time::timeout(patience(), rx.recv())
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
        let (_, value, _) = tokio::time::timeout(patience(), rx.recv())
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
    // A worker counts a request as served after its done event is on its way, so the last
    // count can trail the last event the client sees (by far more under qemu).
    let served = || {
        (
            a.stats.served.load(Ordering::Relaxed),
            b.stats.served.load(Ordering::Relaxed),
        )
    };
    let settled = tokio::time::Instant::now() + patience();
    while served().0 + served().1 < 10 && tokio::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (served_a, served_b) = served();
    assert_eq!(served_a + served_b, 10);
    assert!(
        served_a > 0 && served_b > 0,
        "the group split the work: {served_a} + {served_b}"
    );
    a.stop().await;
    b.stop().await;
}

// ------------------------------------------------- authentication, TLS and broker outages

/// Runs a command of the test's own setup (openssl, mosquitto_passwd) and insists it works.
fn run(program: &str, args: &[&str], dir: &Path) {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed (the setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with
/// openssl; and a mosquitto password file with `emberd:secret` and `tester:tested`.
fn make_credentials(dir: &Path) {
    make_credentials_for(dir, "IP:127.0.0.1");
}

/// A CA, a server certificate for `server_name` (a subjectAltName) and a client certificate.
fn make_credentials_for(dir: &Path, server_name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=emberd test CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    run("openssl", &ca, dir);
    std::fs::write(
        dir.join("server.ext"),
        format!("subjectAltName={server_name}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn) in [("server", "127.0.0.1"), ("client", "emberd")] {
        let subject = format!("/CN={cn}");
        let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
        let mut req = vec!["req", "-subj", subject.as_str()];
        req.extend(ec);
        req.extend(["-keyout", key.as_str(), "-out", csr.as_str()]);
        run("openssl", &req, dir);
        let (crt, ext) = (format!("{name}.crt"), format!("{name}.ext"));
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
            dir,
        );
    }
    run(
        "mosquitto_passwd",
        &["-c", "-b", "passwords", "emberd", "secret"],
        dir,
    );
    run(
        "mosquitto_passwd",
        &["-b", "passwords", "tester", "tested"],
        dir,
    );
    write_secret(&dir.join("emberd-password"), "secret\n");
}

/// A broker that takes only TLS clients with a certificate from the test CA and a password.
fn tls_broker() -> Broker {
    tls_broker_for("IP:127.0.0.1")
}

fn tls_broker_for(server_name: &'static str) -> Broker {
    Broker::with_config(move |port, dir| {
        make_credentials_for(dir, server_name);
        let d = dir.display();
        format!(
            "listener {port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\n\
             keyfile {d}/server.key\nrequire_certificate true\nallow_anonymous false\n\
             password_file {d}/passwords\npersistence false\n"
        )
    })
}

fn test_tls(dir: &Path) -> TlsConfig {
    TlsConfig {
        ca: Some(dir.join("ca.crt")),
        cert: Some(dir.join("client.crt")),
        key: Some(dir.join("client.key")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_client_certificate_and_a_password() {
    let broker = tls_broker();
    let (port, dir) = (broker.port, broker.dir.path().to_path_buf());
    let daemon = Daemon::start(tiny_dir("q4"), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "secure");
        c.mqtt.username = Some("emberd".into());
        c.mqtt.password_file = Some(dir.join("emberd-password"));
        c.mqtt.tls = Some(test_tls(&dir));
    })
    .await;

    let mut options = MqttOptions::new("tester", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_credentials("tester", "tested")
        .set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls_client_config(&test_tls(&dir)).unwrap()),
        ));
    let (client, mut rx) =
        mqtt_client_with(options, &["emberd/secure/status", "secure-out/#"]).await;
    assert_eq!(
        next_on(&mut rx, "emberd/secure/status").await["state"],
        "online"
    );
    let request = json!({"id": "t1", "prompt": "hello", "raw": true, "max_tokens": 4,
                         "ignore_eos": true, "reply_to": "secure-out/t1"});
    publish_request(&client, "secure", &request).await;
    let mut tokens = 0;
    loop {
        let event = next_on(&mut rx, "secure-out/t1").await;
        if event["type"] == "token" {
            tokens += 1;
            continue;
        }
        assert_eq!(event["type"], "done", "{event}");
        assert_eq!(event["usage"]["completion_tokens"], 4);
        break;
    }
    assert!(tokens > 0, "tokens were streamed over TLS");
    daemon.stop().await;
}

#[test]
fn tls_files_that_are_missing_or_not_pem_are_named_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = TlsConfig {
        ca: Some(dir.path().join("nope.crt")),
        ..Default::default()
    };
    let error = tls_client_config(&missing).unwrap_err().to_string();
    assert!(
        error.contains("CA") && error.contains("nope.crt"),
        "{error}"
    );

    std::fs::write(dir.path().join("empty.crt"), "not a certificate\n").unwrap();
    let empty = TlsConfig {
        ca: Some(dir.path().join("empty.crt")),
        ..Default::default()
    };
    let error = tls_client_config(&empty).unwrap_err().to_string();
    assert!(error.contains("empty.crt"), "{error}");

    let half = TlsConfig {
        cert: Some(dir.path().join("client.crt")),
        ..Default::default()
    };
    let error = tls_client_config(&half).unwrap_err().to_string();
    assert!(error.contains("cert") && error.contains("key"), "{error}");

    // The client's private key is a secret: a copy every user may read is refused.
    make_credentials(dir.path());
    let key = dir.path().join("client.key");
    let tls = TlsConfig {
        cert: Some(dir.path().join("client.crt")),
        key: Some(key.clone()),
        ..Default::default()
    };
    assert!(tls_client_config(&tls).is_ok());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = tls_client_config(&tls).unwrap_err().to_string();
    assert!(
        error.contains("mqtt.tls.key") && error.contains("readable by every user"),
        "{error}"
    );
}

#[test]
fn a_wrong_password_is_logged_clearly_and_retried_with_backoff() {
    let broker = tls_broker();
    let dir = tempfile::tempdir().unwrap();
    let bdir = broker.dir.path();
    write_secret(&dir.path().join("wrong"), "not-the-password\n");
    let config = write_serve_config(
        dir.path(),
        &format!(
            "[mqtt]\nenabled = true\nport = {}\ndevice_id = \"locked-out\"\nusername = \"emberd\"\n\
             password_file = {:?}\n[mqtt.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            broker.port,
            dir.path().join("wrong"),
            bdir.join("ca.crt"),
            bdir.join("client.crt"),
            bdir.join("client.key"),
        ),
    );
    let (mut daemon, lines) = spawn_serve(&config);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The pauses emberd says it takes, not the time between attempts: a loaded machine
    // stretches those, the backoff it logs stays what it chose (0.1 s doubling to 5 s).
    let mut pauses = Vec::new();
    while pauses.len() < 5 {
        let line = rx
            .recv_timeout(patience())
            .expect("emberd keeps retrying, logging each refusal");
        if !line.contains("refused the connection") {
            continue;
        }
        assert!(
            (line.contains("BadUserNamePassword") || line.contains("NotAuthorized"))
                && line.contains("mqtt.password_file"),
            "the refusal names the cause and what to check: {line}"
        );
        let pause = line
            .rsplit_once("retrying in ")
            .and_then(|(_, d)| d.strip_suffix("ms").and_then(|ms| ms.parse::<f64>().ok()))
            .or_else(|| {
                line.rsplit_once("retrying in ")
                    .and_then(|(_, d)| d.strip_suffix('s')?.parse::<f64>().ok())
                    .map(|s| s * 1e3)
            })
            .unwrap_or_else(|| panic!("the refusal says how long emberd waits: {line}"));
        pauses.push(pause);
    }
    unsafe { libc_kill(daemon.id() as i32, 15) };
    daemon.wait().unwrap();
    assert!(
        pauses.windows(2).all(|w| w[1] >= w[0]) && pauses[4] >= 8.0 * pauses[0],
        "the pause between attempts grows: {pauses:?} ms"
    );
    assert!(
        pauses.iter().all(|&p| p <= 5000.0),
        "at most 5 s: {pauses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_and_requests_sent_meanwhile_are_answered() {
    // A broker that keeps sessions and queued messages across a restart, as a packaged
    // mosquitto does.
    let mut broker = Broker::with_config(|port, dir| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\n",
            dir.display()
        )
    });
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "outage");
    })
    .await;
    // A client with a persistent session too, so its replies wait for it at the broker.
    let mut options = MqttOptions::new("outage-tester", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (client, mut rx) =
        mqtt_client_with(options, &["emberd/outage/status", "outage-out/#"]).await;
    assert_eq!(
        next_on(&mut rx, "emberd/outage/status").await["state"],
        "online"
    );

    let long = json!({"id": "long", "prompt": "Tell me about the sea.", "max_tokens": 96,
                      "ignore_eos": true, "reply_to": "outage-out/long"});
    publish_request(&client, "outage", &long).await;
    let first = next_on(&mut rx, "outage-out/long").await;
    assert_eq!(first["type"], "token", "{first}");

    // The broker goes away mid-stream; a request is published while it is down (the
    // client holds it until it reconnects), then the broker comes back.
    tokio::task::block_in_place(|| broker.stop());
    let during = json!({"id": "during", "prompt": "Hi", "max_tokens": 4, "ignore_eos": true,
                        "reply_to": "outage-out/during"});
    publish_request(&client, "outage", &during).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| broker.restart());

    // Every event of both requests arrives (QoS 1 may repeat one; `seq` tells).
    let mut seqs: std::collections::HashMap<&str, std::collections::BTreeMap<u64, Value>> =
        Default::default();
    seqs.entry("long")
        .or_default()
        .insert(first["seq"].as_u64().unwrap(), first.clone());
    let finished = |s: &std::collections::HashMap<&str, std::collections::BTreeMap<u64, Value>>,
                    id: &str| {
        s.get(id).is_some_and(|events| {
            events.values().any(|e| {
                e["type"] == "done" && events.len() as u64 == e["seq"].as_u64().unwrap() + 1
            })
        })
    };
    while !(finished(&seqs, "long") && finished(&seqs, "during")) {
        let (topic, event, _) = tokio::time::timeout(patience(), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("events still missing: {seqs:?}\n{}", broker.log()))
            .unwrap();
        let id = match topic.as_str() {
            "outage-out/long" => "long",
            "outage-out/during" => "during",
            _ => continue,
        };
        assert_ne!(event["type"], "error", "{event}");
        seqs.entry(id)
            .or_default()
            .insert(event["seq"].as_u64().unwrap(), event);
    }
    let done = |id: &str| seqs[id].values().last().unwrap().clone();
    assert_eq!(done("long")["usage"]["completion_tokens"], 96);
    assert_eq!(done("during")["usage"]["completion_tokens"], 4);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_notified_only_once_the_broker_holds_emberds_subscriptions() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(patience())).unwrap();
    let config = write_serve_config(
        dir.path(),
        &format!(
            "[mqtt]\nenabled = true\nport = {}\ndevice_id = \"fresh\"\n",
            broker.port
        ),
    );
    let (client, mut rx) = mqtt_client(broker.port, "first-caller", &["fresh-out/#"]).await;
    let mut daemon = emberd_command()
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("a notification");
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    // Published the moment READY arrives (no session of emberd's holds it otherwise):
    // answered only if emberd's subscription was in place before READY.
    let request = json!({"id": "first", "prompt": "hi", "raw": true, "max_tokens": 2,
                         "reply_to": "fresh-out/first"});
    publish_request(&client, "fresh", &request).await;
    let end = end_on(&mut rx, "fresh-out/first").await;
    assert_eq!(end["type"], "done", "{end}");
    unsafe { libc_kill(daemon.id() as i32, 15) };
    assert!(daemon.wait().unwrap().success());
}

/// The retained status follows the queue: once requests have run, it says how many were
/// served (and that none runs), without a reconnect; an idle daemon publishes nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retained_status_follows_the_queue_figures() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(tiny_dir("q4"), |c| on_broker(c, port, "stat1")).await;
    let (_watcher, mut rx) = mqtt_client(port, "stat1-watcher", &["emberd/stat1/status"]).await;
    let online = wait_on(&mut rx, "emberd/stat1/status", |v| v["state"] == "online").await;
    assert_eq!(online["served"], 0);
    assert_eq!(online["running"], 0);
    assert!(online["max_batch"].as_u64().unwrap() >= 1, "{online}");
    let mut client = daemon.connect().await;
    for i in 0..3 {
        client
            .send(json!({"id": format!("s{i}"), "prompt": "hello", "max_tokens": 4}))
            .await;
    }
    // They end in any order (they run as one batch).
    let mut open = 3;
    while open > 0 {
        if client.event().await["type"] != "token" {
            open -= 1;
        }
    }
    let after = wait_on(&mut rx, "emberd/stat1/status", |v| v["served"] == 3).await;
    assert_eq!(after["state"], "online");
    assert_eq!(after["running"], 0);
    assert_eq!(after["queue_depth"], 0);
    daemon.stop().await;
}

/// emberd's side of a TLS connection the broker should not get: the first connection error it
/// logs, once it has logged one (and never "connected").
fn first_tls_refusal(broker: &Broker, ca: &Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let bdir = broker.dir.path();
    write_secret(&dir.path().join("password"), "secret\n");
    let config = write_serve_config(
        dir.path(),
        &format!(
            "[mqtt]\nenabled = true\nport = {}\ndevice_id = \"wary\"\nusername = \"emberd\"\n\
             password_file = {:?}\n[mqtt.tls]\nca = {ca:?}\ncert = {:?}\nkey = {:?}\n",
            broker.port,
            dir.path().join("password"),
            bdir.join("client.crt"),
            bdir.join("client.key"),
        ),
    );
    let (mut daemon, mut lines) = spawn_serve(&config);
    let refusal = loop {
        let line = lines
            .next()
            .expect("emberd exited before it tried the broker")
            .unwrap();
        assert!(
            !line.contains("mqtt: connected"),
            "emberd connected over TLS it should refuse: {line}"
        );
        if line.contains("mqtt: connection error") {
            break line;
        }
    };
    unsafe { libc_kill(daemon.id() as i32, 15) };
    let _ = daemon.wait();
    refusal
}

/// Verification is on: a broker whose certificate no trusted CA signed is refused, and so
/// is one whose certificate names another host (switching verification off fails both).
#[test]
fn tls_refuses_an_untrusted_ca_and_a_certificate_for_another_host() {
    let broker = tls_broker();
    let other = tempfile::tempdir().unwrap();
    make_credentials(other.path());
    let untrusted = first_tls_refusal(&broker, &other.path().join("ca.crt"));
    // The other CA bears the same name, so rustls finds it and the signature fails.
    assert!(
        untrusted.contains("invalid peer certificate")
            && (untrusted.contains("BadSignature") || untrusted.contains("UnknownIssuer")),
        "{untrusted}"
    );

    let misnamed = tls_broker_for("DNS:other.example");
    let refusal = first_tls_refusal(&misnamed, &misnamed.dir.path().join("ca.crt"));
    assert!(
        refusal.contains("invalid peer certificate")
            && refusal.contains("not valid for name \"127.0.0.1\""),
        "{refusal}"
    );
}

/// The example ACL (systemd/mosquitto-acl.example) on a real mosquitto with password users:
/// device dev-a's emberd serves its requester; another device's user can neither ask dev-a
/// nor read dev-a's answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_keeps_each_device_to_its_own_topics() {
    let example = std::fs::read_to_string(repo().join("systemd/mosquitto-acl.example")).unwrap();
    let broker = Broker::with_config(|port, dir| {
        let acl = example.clone()
            + "user panel\ntopic write emberd/dev-a/request\ntopic read emberd/dev-a/response/#\n\
               topic read emberd/dev-a/status\n";
        std::fs::write(dir.join("acl"), acl).unwrap();
        run(
            "mosquitto_passwd",
            &["-c", "-b", "passwords", "dev-a", "pa"],
            dir,
        );
        run("mosquitto_passwd", &["-b", "passwords", "dev-b", "pb"], dir);
        run("mosquitto_passwd", &["-b", "passwords", "panel", "pp"], dir);
        let d = dir.display();
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {d}/passwords\n\
             acl_file {d}/acl\npersistence false\n"
        )
    });
    let port = broker.port;
    let secrets = tempfile::tempdir().unwrap();
    write_secret(&secrets.path().join("pa"), "pa\n");
    let daemon = Daemon::start(tiny_dir("q4"), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "dev-a");
        c.mqtt.username = Some("dev-a".into());
        c.mqtt.password_file = Some(secrets.path().join("pa"));
    })
    .await;
    let as_user = |name: &str, user: &str, password: &str| {
        let mut options = MqttOptions::new(name, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_credentials(user, password);
        options
    };
    // Another device's user tries to read dev-a's answers (the broker refuses the
    // subscription) and to ask dev-a (the broker drops the message).
    let (intruder, mut intruder_rx) = mqtt_client_with(
        as_user("intruder", "dev-b", "pb"),
        &["emberd/dev-a/response/#"],
    )
    .await;
    let (panel, mut panel_rx) = mqtt_client_with(
        as_user("panel", "panel", "pp"),
        &["emberd/dev-a/status", "emberd/dev-a/response/#"],
    )
    .await;
    wait_on(&mut panel_rx, "emberd/dev-a/status", |v| {
        v["state"] == "online"
    })
    .await;
    let ask = |id: &str| {
        json!({"id": id, "prompt": "hi", "max_tokens": 3})
            .to_string()
            .into_bytes()
    };
    intruder
        .publish(
            "emberd/dev-a/request",
            QoS::AtLeastOnce,
            false,
            ask("sneaky"),
        )
        .await
        .unwrap();
    // The panel's own request is answered on dev-a's response topic, after the intruder's
    // attempt: had that reached emberd, its answer would have come first.
    panel
        .publish(
            "emberd/dev-a/request",
            QoS::AtLeastOnce,
            false,
            ask("allowed"),
        )
        .await
        .unwrap();
    let done = end_on(&mut panel_rx, "emberd/dev-a/response/allowed").await;
    assert_eq!(done["type"], "done", "{done}");
    // Had the intruder's request got through, it would be running or done by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.wait_until_idle().await;
    assert_eq!(
        daemon.stats.served.load(Ordering::Relaxed),
        1,
        "only the panel's request reached emberd"
    );
    // Nothing reached the intruder: neither answer.
    let leaked = tokio::time::timeout(Duration::from_millis(300), intruder_rx.recv()).await;
    assert!(
        !matches!(leaked, Ok(Some(_))),
        "dev-b read dev-a's topics: {leaked:?}"
    );
    daemon.stop().await;
}

/// The events of request `id` on the default response topic, through its terminal one.
async fn events_of(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Received>,
    device: &str,
    id: &str,
) -> Vec<Value> {
    let topic = format!("emberd/{device}/response/{id}");
    let mut events = Vec::new();
    loop {
        let event = next_on(rx, &topic).await;
        let terminal = event["type"] != "token";
        events.push(event);
        if terminal {
            return events;
        }
    }
}

/// `stream_interval_ms` (here the config's default, 200) coalesces the pieces of a 64-token
/// reply into a few `token` events, at most one per interval after the first, whose text
/// joins to the same reply as a request that streams every piece (`stream_interval_ms: 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_interval_coalesces_pieces_into_few_token_events() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "slow");
        c.generation.stream_interval_ms = 200;
    })
    .await;
    let (client, mut rx) = device_client(port, "tester", "slow").await;
    let request = |id: &str| {
        json!({"id": id, "prompt": "Write a long story about a lighthouse keeper.", "raw": true,
               "max_tokens": 64, "ignore_eos": true, "temperature": 0})
    };
    // The two compared requests both find the prompt in the cache (prefix reuse), as a first
    // request does not: the same computation, so the same greedy reply.
    publish_request(&client, "slow", &request("warm-up")).await;
    let warm = events_of(&mut rx, "slow", "warm-up").await;
    let speed = warm.last().unwrap()["timings"]["decode_tokens_per_s"]
        .as_f64()
        .unwrap();
    // The config's 200 ms where tokens come several to the interval; where they come slower
    // (under emulation, over a second each) a per-request interval of 8 tokens' time, so
    // that there is something to coalesce.
    let token_ms = 1000.0 / speed;
    let mut coalesced = request("coalesced");
    let interval_ms = if token_ms * 4.0 <= 200.0 {
        200.0
    } else {
        let ms = (token_ms * 8.0).ceil();
        coalesced["stream_interval_ms"] = json!(ms as u64);
        ms
    };
    publish_request(&client, "slow", &coalesced).await;
    let coalesced = events_of(&mut rx, "slow", "coalesced").await;
    let mut each = request("each");
    each["stream_interval_ms"] = json!(0);
    publish_request(&client, "slow", &each).await;
    let every = events_of(&mut rx, "slow", "each").await;

    let done = coalesced.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["usage"]["completion_tokens"], 64);
    assert_eq!(
        text_of(&coalesced),
        text_of(&every),
        "the same reply either way"
    );
    let tokens = coalesced.len() - 1;
    let pieces = every.len() - 1;
    // The first piece goes at once, then one event per interval of the run at most, and the
    // rest with the end: the bound follows from the run's own duration.
    let run_ms = done["timings"]["total_ms"].as_f64().unwrap();
    let bound = 2 + (run_ms / interval_ms).ceil() as usize;
    eprintln!(
        "{pieces} pieces came in {tokens} token events over {run_ms:.0} ms \
         (interval {interval_ms} ms, a token every {token_ms:.0} ms; bound {bound})"
    );
    assert!(
        tokens <= bound,
        "{tokens} token events in {run_ms} ms at {interval_ms} ms intervals"
    );
    assert!(
        tokens < pieces,
        "coalescing sent {tokens} events for {pieces} pieces"
    );
    for (i, event) in coalesced.iter().enumerate() {
        assert_eq!(event["seq"], i, "seq counts events: {event}");
    }

    // Over the limit: a clear error, and the daemon keeps serving.
    let mut bad = request("bad");
    bad["stream_interval_ms"] = json!(600_000);
    publish_request(&client, "slow", &bad).await;
    let error = end_on(&mut rx, "emberd/slow/response/bad").await;
    assert_eq!(error["code"], "bad_request", "{error}");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("stream_interval_ms"));
    daemon.stop().await;
}

/// Home Assistant MQTT discovery: the retained device-discovery message, a prompt from its
/// text entity answered on the reply sensor, attributes and event, the status entities
/// updated after it, the device unavailable when emberd is killed, announced again on Home
/// Assistant's `online`, and removed when discovery is turned off.
#[test]
fn home_assistant_discovery_announces_a_device_that_answers_and_goes_unavailable() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let mqtt = |on: bool| {
        format!(
            "[mqtt]\nenabled = true\nport = {}\ndevice_id = \"kitchen\"\nha_discovery = {on}\n",
            broker.port
        )
    };
    let config = write_serve_config(dir.path(), &mqtt(true));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut daemon = spawn_ready(&config);
        let discovery_topic = "homeassistant/device/kitchen/config";
        // A client that comes later gets the retained announcement, as Home Assistant does.
        let (ha, mut rx) = mqtt_client(
            broker.port,
            "home-assistant",
            &[
                discovery_topic,
                "emberd/kitchen/status",
                "emberd/kitchen/ha/#",
            ],
        )
        .await;
        let discovery = next_on(&mut rx, discovery_topic).await;
        assert_eq!(discovery["device"]["identifiers"][0], "emberd_kitchen");
        assert_eq!(discovery["origin"]["name"], "emberd");
        assert_eq!(discovery["availability_topic"], "emberd/kitchen/status");
        assert_eq!(discovery["availability_template"], "{{ value_json.state }}");
        let components = &discovery["components"];
        let platform = |c: &str| components[c]["p"].as_str().unwrap_or("").to_string();
        assert_eq!(
            [
                "prompt",
                "reply",
                "result",
                "queue_depth",
                "served",
                "decode_tokens_per_s"
            ]
            .map(platform),
            ["text", "sensor", "event", "sensor", "sensor", "sensor"]
        );
        assert_eq!(
            components["result"]["event_types"],
            json!(["done", "error"])
        );
        for c in components.as_object().unwrap().values() {
            assert!(
                c["unique_id"].as_str().unwrap().starts_with("kitchen_"),
                "{c}"
            );
        }

        // The text entity publishes plain text on its command topic.
        let prompt_topic = components["prompt"]["command_topic"].as_str().unwrap();
        let served_before = wait_on(&mut rx, "emberd/kitchen/status", |_| true).await["served"]
            .as_u64()
            .unwrap();
        ha.publish(prompt_topic, QoS::AtLeastOnce, false, "Say hello.")
            .await
            .unwrap();
        let reply_topic = components["reply"]["state_topic"].as_str().unwrap();
        let attributes_topic = components["reply"]["json_attributes_topic"]
            .as_str()
            .unwrap();
        let event_topic = components["result"]["state_topic"].as_str().unwrap();
        let state = next_on(&mut rx, reply_topic).await;
        let attributes = next_on(&mut rx, attributes_topic).await;
        let event = next_on(&mut rx, event_topic).await;
        assert_eq!(event["event_type"], "done", "{event}");
        let text = attributes["text"].as_str().unwrap();
        assert!(!text.is_empty());
        let cut: String = text.chars().take(255).collect();
        assert_eq!(
            state,
            json!(cut),
            "the state is the reply, cut to 255 characters"
        );
        assert!(attributes["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
        // The status entities follow: one more served, a decode speed.
        let status = wait_on(&mut rx, "emberd/kitchen/status", |v| {
            v["served"].as_u64() > Some(served_before)
        })
        .await;
        assert!(
            status["decode_tokens_per_s"].as_f64().unwrap() > 0.0,
            "{status}"
        );

        // Home Assistant restarts: it is told about the device again.
        ha.publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
            .await
            .unwrap();
        let again = next_on(&mut rx, discovery_topic).await;
        assert_eq!(again, discovery);

        // Killed: the Last Will makes the device unavailable.
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        wait_on(&mut rx, "emberd/kitchen/status", |v| {
            v["state"] == "offline"
        })
        .await;

        // Discovery turned off: the retained announcement is removed.
        let config = write_serve_config(dir.path(), &mqtt(false));
        let mut daemon = spawn_ready(&config);
        wait_on(&mut rx, discovery_topic, |v| v == &json!("")).await;
        let (_late, mut late_rx) = mqtt_client(
            broker.port,
            "late",
            &[discovery_topic, "emberd/kitchen/status"],
        )
        .await;
        wait_on(&mut late_rx, "emberd/kitchen/status", |v| {
            v["state"] == "online"
        })
        .await;
        assert!(
            tokio::time::timeout(Duration::from_millis(500), async {
                next_on(&mut late_rx, discovery_topic).await
            })
            .await
            .is_err(),
            "nothing retained on the discovery topic"
        );
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    });
}
