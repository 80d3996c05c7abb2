//! Faults injected into a running emberd, real processes all: a client that never reads its
//! events, SIGTERM during a burst, an engine failure on a step, the broker killed (SIGKILL)
//! and restarted without its sessions, the broker unreachable at start, a client gone
//! mid-prefill, a model directory that cannot be read at start or is gone at a reload, a
//! request that arrives during the shutdown drain, connections that come and go. Each time
//! every accepted request ends with exactly one terminal event (where its client can still
//! receive one), and the daemon serves the next request.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::*;
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The built daemon on the tiny model, with write_serve_config's file as `edit` makes it (to
/// change a table it has already, which a later one may not repeat) and `env` set; once ready.
async fn start(
    dir: &Path,
    edit: impl FnOnce(String) -> String + Send + 'static,
    env: &'static [(&'static str, &'static str)],
) -> (Spawned, Log) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let config = write_serve_config(&dir, "");
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, edit(text)).unwrap();
        let (child, lines) = spawn_serve_with(&config, env);
        let child = Spawned(child);
        let log = Log::of(lines);
        log.wait_for("ready: model");
        (child, log)
    })
    .await
    .unwrap()
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc_kill(child.id() as i32, sig) }, 0);
}

/// Waits (bounded) for the child to exit; its status.
fn exit_of(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + patience();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "emberd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One short request on a new connection ends with `done`.
async fn serves_the_next(socket: &Path) {
    let mut client = Client::connect(socket).await;
    client
        .send(json!({"id": "next", "prompt": "hello", "max_tokens": 4}))
        .await;
    let events = client.until_end("next").await;
    assert_eq!(events.last().unwrap()["type"], "done", "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
async fn a_client_that_never_reads_is_cut_off_and_the_daemons_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, log) = start(
        dir.path(),
        |text| text.replace("[socket]\n", "[socket]\nmax_unread_bytes = 65536\n"),
        &[],
    )
    .await;
    let socket = dir.path().join("emberd.sock");
    // Warm up, so the figure below is the serving daemon's.
    serves_the_next(&socket).await;
    let before = rss_mib(daemon.id());

    // Far more events than the socket's buffers and the unread limit hold, never read.
    let mut stuck = tokio::net::UnixStream::connect(&socket).await.unwrap();
    for i in 0..40 {
        let request = json!({"id": format!("r{i}"), "prompt": "go", "max_tokens": 400,
                             "ignore_eos": true});
        stuck
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
    }
    let line = tokio::task::spawn_blocking(move || {
        let line = log.wait_for("cutting off a client");
        (line, log)
    })
    .await
    .unwrap();
    let (line, log) = line;
    assert!(line.contains("max_unread_bytes = 65536"), "{line}");
    // The daemon closed the connection: what the kernel held is read, then the end.
    let mut sink = Vec::new();
    tokio::time::timeout(patience(), stuck.read_to_end(&mut sink))
        .await
        .expect("the daemon closes a client it cut off")
        .unwrap();
    assert!(!sink.is_empty());
    serves_the_next(&socket).await;
    let after = rss_mib(daemon.id());
    eprintln!("RSS before {before:.1} MiB, after the stuck client {after:.1} MiB");
    assert!(
        after <= before + 8.0,
        "memory grew from {before:.1} to {after:.1} MiB"
    );
    signal(&daemon, 15);
    assert!(exit_of(&mut daemon).success(), "{}", log.rest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
async fn sigterm_during_a_burst_ends_every_accepted_request_with_one_terminal_event() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let extra = format!(
        "[limits]\nmax_batch = 2\nmax_queue = 8\n[http]\nenabled = true\nlisten = \"127.0.0.1:{http}\"\n"
    );
    // The default model: slow enough that the 10 s drain ends with requests cancelled.
    let tiny = format!("{:?}", tiny_dir("q4"));
    let default = format!("{:?}", default_model_dir());
    let (mut daemon, log) = start(
        dir.path(),
        move |text| text.replace(&tiny, &default) + &extra,
        &[],
    )
    .await;
    let socket = dir.path().join("emberd.sock");
    // One request that runs before the burst and outlasts the drain: its connection stays
    // open and read during the drain, and carries the late request below. (A burst client's
    // requests may all be told busy when the server reads its lines last; its connection then
    // closes at once on SIGTERM.)
    let mut anchor = Client::connect(&socket).await;
    anchor.send(long_request("anchor")).await;
    assert_eq!(anchor.event().await["type"], "token", "the anchor runs");
    // Ten clients with three requests each: some run, some wait, some are told busy; most
    // outlast the 10 s drain, which cancels them.
    let mut clients = vec![anchor];
    for c in 0..10 {
        let mut client = Client::connect(&socket).await;
        for r in 0..3 {
            let mut request = long_request(&format!("c{c}r{r}"));
            request["max_tokens"] = json!(200 + 150 * r);
            client.send(request).await;
        }
        clients.push(client);
    }
    // Once every request has been taken (running, queued or told busy) and tokens flow, stop
    // the daemon the way systemd does.
    let deadline = Instant::now() + patience();
    loop {
        let s = http_status(http).await;
        let taken: u64 = ["queue_depth", "rejected_busy", "served"]
            .map(|k| s[k].as_u64().unwrap())
            .iter()
            .sum();
        if taken == 31 && s["running"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the burst was never all taken: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    signal(&daemon, 15);
    // A request sent during the drain, on a connection whose requests still run, is read and
    // refused (the scheduler is closed before the drain is logged).
    tokio::task::block_in_place(|| log.wait_for("shutting down: draining"));
    clients[0]
        .send(json!({"id": "late", "prompt": "too late", "max_tokens": 4}))
        .await;
    let mut ends: std::collections::BTreeMap<String, usize> = Default::default();
    for (c, mut client) in clients.into_iter().enumerate() {
        let mut open: Vec<String> = match c {
            0 => vec!["anchor".into(), "late".into()],
            c => (0..3).map(|r| format!("c{}r{r}", c - 1)).collect(),
        };
        while !open.is_empty() {
            let event = client.event().await;
            let id = event["id"].as_str().unwrap().to_string();
            if event["type"] == "token" {
                assert!(open.contains(&id), "a token after {id}'s terminal event");
                continue;
            }
            assert!(
                open.contains(&id),
                "a second terminal event for {id}: {event}"
            );
            open.retain(|o| *o != id);
            let end = match event["type"].as_str().unwrap() {
                "done" => format!("done/{}", event["finish_reason"].as_str().unwrap()),
                _ => format!("error/{}", event["code"].as_str().unwrap()),
            };
            assert!(
                matches!(
                    end.as_str(),
                    "done/length" | "done/cancelled" | "error/busy" | "error/shutting_down"
                ),
                "{id} ended {end}: {event}"
            );
            if id == "late" {
                assert_eq!(end, "error/shutting_down", "{event}");
            }
            *ends.entry(end).or_default() += 1;
        }
        // Nothing after the last terminal event: the connection ends.
        let rest = tokio::time::timeout(patience(), client.lines.next_line())
            .await
            .expect("the connection closes once its requests have ended");
        assert!(matches!(rest, Ok(None)), "{rest:?}");
    }
    eprintln!("31 requests at SIGTERM and 1 after ended: {ends:?}");
    assert_eq!(ends.values().sum::<usize>(), 32);
    assert!(ends.contains_key("done/cancelled") || ends.contains_key("done/length"));
    let status = exit_of(&mut daemon);
    assert!(status.success(), "{status}: {}", log.rest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
async fn an_engine_failure_on_a_step_ends_its_requests_with_internal_and_the_next_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, log) = start(
        dir.path(),
        |text| text + "[limits]\nmax_batch = 2\n",
        &[("EMBERD_DEBUG_FAIL_STEP_ON_PROMPT", "BREAK-HERE")],
    )
    .await;
    let socket = dir.path().join("emberd.sock");
    let greedy = |id: &str, prompt: &str| {
        json!({"id": id, "prompt": prompt, "max_tokens": 24, "temperature": 0,
               "ignore_eos": true})
    };
    let mut client = Client::connect(&socket).await;
    client.send(greedy("before", "the same words")).await;
    let before = text_of(&client.until_end("before").await);

    // A request whose step fails, and one decoding beside it in the same batch.
    client
        .send(json!({"id": "beside", "prompt": "go on", "max_tokens": 400,
                     "ignore_eos": true}))
        .await;
    assert_eq!(client.event().await["id"], "beside");
    client.send(greedy("broken", "BREAK-HERE")).await;
    let mut ends = std::collections::HashMap::new();
    while ends.len() < 2 {
        let event = client.event().await;
        if event["type"] != "token" {
            let id = event["id"].as_str().unwrap().to_string();
            assert!(ends.insert(id, event).is_none(), "two terminal events");
        }
    }
    let broken = &ends["broken"];
    assert_eq!(broken["type"], "error", "{broken}");
    assert_eq!(broken["code"], "internal", "{broken}");
    assert!(
        broken["message"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{broken}"
    );
    // The failed step was the whole batch's: the request beside it ends the same way.
    assert_eq!(ends["beside"]["code"], "internal", "{}", ends["beside"]);

    // The caches were dropped, not trusted: the same request gives the same text as before.
    client.send(greedy("after", "the same words")).await;
    let after = text_of(&client.until_end("after").await);
    assert_eq!(after, before);
    signal(&daemon, 15);
    assert!(exit_of(&mut daemon).success(), "{}", log.rest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_without_its_sessions_gets_emberd_back() {
    // A broker that keeps nothing: killed, it forgets emberd's session, subscriptions and
    // retained status.
    let mut broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "amnesia");
    })
    .await;
    let (client, mut rx) = device_client(port, "amnesia-before", "amnesia").await;
    let long = json!({"id": "long", "prompt": "Tell me about the sea.", "max_tokens": 300,
                      "ignore_eos": true});
    publish_request(&client, "amnesia", &long).await;
    let first = next_on(&mut rx, "emberd/amnesia/response/long").await;
    assert_eq!(first["type"], "token", "{first}");

    tokio::task::block_in_place(|| {
        broker.kill();
        broker.start_again();
    });
    // A new client: emberd's status is retained again (it republished it) and a request is
    // answered (it subscribed again).
    let (client, mut rx) = device_client(port, "amnesia-after", "amnesia").await;
    let request = json!({"id": "after", "prompt": "Hi", "max_tokens": 4, "ignore_eos": true});
    publish_request(&client, "amnesia", &request).await;
    let end = end_on(&mut rx, "emberd/amnesia/response/after").await;
    assert_eq!(end["type"], "done", "{end}");
    assert_eq!(end["usage"]["completion_tokens"], 4);
    // The request that ran through the outage ended too, once, on the daemon's side (events
    // published to the broker before it died died with it: a broker that keeps nothing).
    daemon.wait_until_idle().await;
    assert_eq!(
        daemon
            .stats
            .served
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_published_during_the_drain_is_answered_shutting_down() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.socket.enabled = false;
        on_broker(c, port, "drain");
    })
    .await;
    let (client, mut rx) = device_client(port, "drain-client", "drain").await;
    // Runs on into the drain (most likely through it, to be cancelled).
    let long = json!({"id": "long", "prompt": "Tell me about the sea.", "max_tokens": 1000,
                      "ignore_eos": true});
    publish_request(&client, "drain", &long).await;
    let first = next_on(&mut rx, "emberd/drain/response/long").await;
    assert_eq!(first["type"], "token", "{first}");

    daemon.trigger.trigger();
    daemon
        .wait_for("the scheduler closed", |s| {
            s.closed.load(std::sync::atomic::Ordering::Acquire)
        })
        .await;
    // The broker hands this to emberd (QoS 1, acknowledged): it must be answered, not dropped.
    let late = json!({"id": "late", "prompt": "Hi", "max_tokens": 4});
    publish_request(&client, "drain", &late).await;
    let refused = end_on(&mut rx, "emberd/drain/response/late").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "shutting_down", "{refused}");
    let end = end_on(&mut rx, "emberd/drain/response/long").await;
    assert_eq!(end["type"], "done", "{end}");
    assert!(
        matches!(end["finish_reason"].as_str(), Some("cancelled" | "length")),
        "{end}"
    );
    tokio::time::timeout(patience(), daemon.done)
        .await
        .expect("serve returns after the drain")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_connections_that_come_and_go_leave_nothing_behind() {
    // The soak's memory drift: each ended connection's task stayed in the listener's set.
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let extra = format!("[http]\nenabled = true\nlisten = \"127.0.0.1:{http}\"\n");
    let (daemon, log) = start(dir.path(), move |text| text + &extra, &[]).await;
    let socket = dir.path().join("emberd.sock");
    for i in 0..300 {
        let mut client = Client::connect(&socket).await;
        if i % 3 == 0 {
            continue; // connects and hangs up at once
        }
        let id = format!("c{i}");
        client
            .send(json!({"id": id, "prompt": "hi", "max_tokens": 2}))
            .await;
        client.until_end(&id).await;
    }
    let deadline = Instant::now() + patience();
    let held = loop {
        let held = metric(
            &http_get(http, "/metrics").await,
            "emberd_socket_connections",
        );
        if held == Some(0.0) || Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        held,
        Some(0.0),
        "after 300 connections ended the listener still holds some; log: {}",
        log.rest()
    );
    serves_the_next(&socket).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_unreachable_at_start_leaves_emberd_serving_the_socket_and_then_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = format!("[mqtt]\nenabled = true\nport = {port}\ndevice_id = \"late\"\n");
    let (mut daemon, log) = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let config = write_serve_config(&dir, &extra);
            let (child, lines) = spawn_serve(&config);
            let child = Spawned(child);
            let log = Log::of(lines);
            // systemd hears READY after the bound, without the broker.
            let line = log.wait_for("not reached within");
            assert!(line.contains("ready without it"), "{line}");
            log.wait_for("ready: model");
            (child, log)
        })
        .await
        .unwrap()
    };
    serves_the_next(&dir.path().join("emberd.sock")).await;

    let broker = tokio::task::spawn_blocking(move || {
        Broker::with_config_on(port, |port, _| {
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        })
    })
    .await
    .unwrap();
    let (client, mut rx) = device_client(broker.port, "late-caller", "late").await;
    let request = json!({"id": "m", "prompt": "Hi", "max_tokens": 3, "ignore_eos": true});
    publish_request(&client, "late", &request).await;
    let end = end_on(&mut rx, "emberd/late/response/m").await;
    assert_eq!(end["type"], "done", "{end}");
    signal(&daemon, 15);
    assert!(exit_of(&mut daemon).success(), "{}", log.rest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_prefill_cancels_its_request() {
    // A small prefill chunk, so a long prompt is many engine steps: time to see the client go.
    let generator = tokio::task::spawn_blocking(|| {
        let mut generator = generator(default_model_dir(), serving_backend());
        generator.set_prefill_chunk(16);
        generator
    })
    .await
    .unwrap();
    let daemon = Daemon::serving(generator, |_| {}).await;
    let mut client = daemon.connect().await;
    let prompt = "The sensor on the north wall reports the temperature. ".repeat(60);
    client
        .send(json!({"id": "gone", "prompt": prompt, "max_tokens": 8}))
        .await;
    // Gone once the request is running (prefilling), before its first token.
    daemon
        .wait_for("the request running", |s| {
            s.running.load(std::sync::atomic::Ordering::Relaxed) == 1
        })
        .await;
    drop(client);
    daemon.wait_for_a_cancel().await;
    daemon.wait_until_idle().await;
    serves_the_next(&daemon.socket).await;
    daemon.stop().await;
}

/// A copy of the tiny model package that `spoil` then damages.
fn spoiled_model(dir: &Path, spoil: impl FnOnce(&Path)) -> std::path::PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(tiny_dir("q4")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    spoil(&model);
    model
}

/// A config serving `model` (auto backend), its socket beside the model directory.
fn config_for(model: &Path) -> std::path::PathBuf {
    let dir = model.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("emberd.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = {model:?}\nort_library = {:?}\n[socket]\npath = {:?}\n[log]\njournald = \"off\"\n",
            ort_library(),
            dir.join("emberd.sock")
        ),
    )
    .unwrap();
    config
}

/// `emberd serve` on `model`: it must exit at once, non-zero, saying what is wrong.
fn refuses_to_start(model: &Path, expected: &str) {
    let (child, lines) = spawn_serve(&config_for(model));
    let mut child = Spawned(child);
    let log = Log::of(lines);
    let status = exit_of(&mut child);
    let said = log.rest();
    assert!(!status.success(), "{status}: {said}");
    assert!(said.contains(expected), "expected {expected:?} in: {said}");
}

#[test]
fn a_model_directory_that_cannot_be_read_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory in a file's place cannot be read, even by root.
    let model = spoiled_model(&dir.path().join("a"), |m| {
        std::fs::remove_file(m.join("tokenizer.json")).unwrap();
        std::fs::create_dir(m.join("tokenizer.json")).unwrap();
    });
    refuses_to_start(&model, "tokenizer.json");
    // The graph cut short, as by a full disk.
    let model = spoiled_model(&dir.path().join("b"), |m| {
        let graph = m.join("model.onnx");
        let bytes = std::fs::read(&graph).unwrap();
        std::fs::write(&graph, &bytes[..bytes.len() / 3]).unwrap();
    });
    refuses_to_start(&model, "model.onnx");
    // No directory at all.
    refuses_to_start(&dir.path().join("c/none"), "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
async fn a_reload_with_the_model_directory_gone_keeps_serving_the_loaded_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = spoiled_model(dir.path(), |_| {});
    let config = config_for(&model);
    let (daemon, lines) = spawn_serve(&config);
    let mut daemon = Spawned(daemon);
    let log = Log::of(lines);
    log.wait_for("ready: model");
    std::fs::remove_dir_all(&model).unwrap();
    signal(&daemon, 1);
    log.wait_for("SIGHUP");
    serves_the_next(&dir.path().join("emberd.sock")).await;
    signal(&daemon, 15);
    assert!(exit_of(&mut daemon).success(), "{}", log.rest());
}
