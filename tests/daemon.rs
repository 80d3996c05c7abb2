//! The daemon over its Unix socket, end to end: a real socket, the real ONNX Runtime library
//! and real models, in process and as the built binary.

mod common;

use std::sync::atomic::Ordering;

use common::daemon::*;
use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

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
    let daemon = Daemon::start(tiny_dir("optimum"), |c| {
        c.limits.max_request_bytes = 2048;
        c.limits.max_prompt_tokens = 16;
    })
    .await;
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
        .send(json!({"id": "long", "prompt": "hi ".repeat(40), "raw": true}))
        .await;
    let e = client.event().await;
    assert!(
        e["id"] == "long" && e["message"].as_str().unwrap().contains("max_prompt_tokens"),
        "{e}"
    );
    client
        .send(json!({"id": "ok", "prompt": "hi", "raw": true, "max_tokens": 3}))
        .await;
    let events = client.until_end("ok").await;
    assert_eq!(events.last().unwrap()["type"], "done");
    daemon.stop().await;
}

/// A request on the default model that runs for a while: no eos, many tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy_at_once_and_requests_run_in_order() {
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.limits.max_queue = 1;
        c.limits.max_prompt_tokens = 64;
        // One at a time: the second request waits in the queue, the third finds it full.
        c.limits.max_batch = 1;
    })
    .await;
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
    // A prompt over max_prompt_tokens is answered before it would take a queue slot: too
    // long, not busy, though the queue is still full.
    let long_prompt = "sensor reading ".repeat(100);
    client
        .send(json!({"id": "long", "prompt": long_prompt, "max_tokens": 2}))
        .await;
    let long = loop {
        let e = client.event().await;
        if e["id"] == "long" {
            break e;
        }
    };
    assert_eq!(long["code"], "too_long", "{long}");
    assert!(
        long["message"]
            .as_str()
            .unwrap()
            .contains("max_prompt_tokens"),
        "{long}"
    );
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
async fn a_cancel_for_an_id_that_is_not_running_is_ignored() {
    let daemon = Daemon::start(tiny_dir("optimum"), |_| {}).await;
    let mut client = daemon.connect().await;
    client.send(json!({"type": "cancel", "id": "ghost"})).await;
    client
        .send(json!({"id": "after", "prompt": "hi", "max_tokens": 2}))
        .await;
    // No answer to the cancel: the first event is the next request's.
    assert_eq!(client.event().await["id"], "after");
    let events = client.until_end("after").await;
    assert_eq!(events.last().unwrap()["type"], "done");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_cancels_its_requests() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut client = daemon.connect().await;
    client.send(long_request("gone")).await;
    assert_eq!(client.event().await["type"], "token");
    drop(client);
    daemon.wait_for_a_cancel().await;
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
    tokio::time::timeout(patience(), daemon.done)
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
    let listener = emberd::transport::socket::bind(&path, 0o660, None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let err = emberd::transport::socket::bind(&path, 0o660, None).unwrap_err();
    assert!(err.to_string().contains("already listening"), "{err}");
    drop(listener);
}

/// The socket's mode and group are the configured ones; a group that does not exist stops
/// the start with its name.
#[tokio::test]
async fn the_socket_takes_the_configured_mode_and_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let own = std::fs::metadata(dir.path()).unwrap().gid();
    // Another group this process may give its files: any, as root; else one of its own.
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    let mine = String::from_utf8(
        std::process::Command::new("id")
            .arg("-G")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let root = unsafe { common::daemon::libc_getuid() } == 0;
    let other = groups.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let gid: u32 = f.get(2)?.parse().ok()?;
        let allowed = root || mine.split_whitespace().any(|g| g == f[2]);
        (gid != own && allowed).then(|| (f[0].to_string(), gid))
    });
    let cases = match &other {
        Some((name, gid)) => vec![(name.clone(), *gid, 0o640), (gid.to_string(), *gid, 0o600)],
        None => {
            eprintln!("this user has one group only: the socket keeps it");
            vec![(own.to_string(), own, 0o640)]
        }
    };
    for (group, gid, mode) in cases {
        let path = dir.path().join(format!("g{mode:o}.sock"));
        let _listener = emberd::transport::socket::bind(&path, mode, Some(&group)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.gid(), gid, "{group}");
        assert_eq!(meta.mode() & 0o777, mode);
    }
    let err = emberd::transport::socket::bind(
        &dir.path().join("x.sock"),
        0o660,
        Some("no-such-group-here"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("no-such-group-here"), "{err}");
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

#[test]
fn emberd_ask_streams_a_reply_from_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, mut lines) = spawn_serve(&write_serve_config(dir.path(), ""));
    next_log_with(&mut lines, "ready: model");
    let ask = emberd_command()
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
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon logs who connected: this process's user, the client's pid.
    let pid = ask.id();
    let out = ask.wait_with_output().unwrap();
    let connected = next_log_with(&mut lines, "socket: connection from");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc_getuid() };
    assert!(
        connected.contains(&format!("uid {uid} ")) && connected.contains(&format!("pid {pid}")),
        "{connected}"
    );
    std::thread::spawn(move || for _ in lines {});
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
fn sighup_rereads_the_log_level_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_serve_config(dir.path(), "");
    let (mut daemon, mut lines) = spawn_serve(&config);
    next_log_with(&mut lines, "ready: model");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[log]\n", "[log]\nlevel = \"debug\"\n"),
    )
    .unwrap();
    unsafe { libc_kill(daemon.id() as i32, 1) };
    let line = next_log_with(&mut lines, "SIGHUP");
    assert!(line.contains("log level is now DEBUG"), "{line}");
    // Still serving, and still the same process.
    let ask = emberd_command()
        .args(["ask", "--socket"])
        .arg(dir.path().join("emberd.sock"))
        .args(["--max-tokens", "2", "hi"])
        .output()
        .unwrap();
    assert!(ask.status.success());
    unsafe { libc_kill(daemon.id() as i32, 15) };
    assert!(daemon.wait().unwrap().success());
}

/// One connection over `socket.max_connections` gets a `busy` error event naming the limit
/// and is closed; once a connection ends, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_is_told_busy_and_closed() {
    let daemon = Daemon::start(tiny_dir("q4"), |c| c.socket.max_connections = 2).await;
    let first = daemon.connect().await;
    let mut second = daemon.connect().await;
    let mut third = daemon.connect().await;
    let refused = third.event().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "busy", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("socket.max_connections"),
        "{refused}"
    );
    let closed = tokio::time::timeout(patience(), third.lines.next_line()).await;
    assert!(matches!(closed, Ok(Ok(None))), "closed after: {closed:?}");
    // The two within the cap are served.
    second
        .send(json!({"id": "in", "prompt": "hi", "max_tokens": 2}))
        .await;
    assert_eq!(second.until_end("in").await.last().unwrap()["type"], "done");
    drop(first);
    // The freed place is taken again (the server notices the close asynchronously).
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        let mut next = daemon.connect().await;
        // A refused connection may be closed before the request is written: that write fails
        // and the busy event is still there to read.
        let line = format!(
            "{}\n",
            json!({"id": "again", "prompt": "hi", "max_tokens": 2})
        );
        let sent = next.writer.write_all(line.as_bytes()).await.is_ok();
        let e = next.event().await;
        if sent && e["id"] == "again" {
            break;
        }
        assert_eq!(e["code"], "busy", "{e}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    daemon.stop().await;
}

/// The error contract's `timeout` while queued: a request whose deadline passes while it
/// waits for the engine gets an `error` with code `timeout` (it never started), not a `done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_in_the_queue_is_a_timeout_error() {
    let daemon = Daemon::start(default_model_dir(), |c| c.limits.max_batch = 1).await;
    let mut client = daemon.connect().await;
    client.send(long_request("running")).await;
    assert_eq!(client.event().await["id"], "running");
    client
        .send(json!({"id": "late", "prompt": "hi", "max_tokens": 2, "timeout_s": 0.2}))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    client
        .send(json!({"type": "cancel", "id": "running"}))
        .await;
    let late = client.until_end("late").await;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0]["type"], "error", "{late:?}");
    assert_eq!(late[0]["code"], "timeout", "{late:?}");
    assert!(
        late[0]["message"].as_str().unwrap().contains("queue"),
        "{late:?}"
    );
    daemon.stop().await;
}

/// The error contract's `length` at the context limit: with the context capped, a request
/// that would run past it ends `done` with `length`, its prompt and output filling the
/// context, not an error or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_that_reaches_the_context_ends_with_length() {
    let mut generator =
        tokio::task::spawn_blocking(|| generator(tiny_dir("q4"), serving_backend()))
            .await
            .unwrap();
    generator.set_context_len(48);
    let daemon = Daemon::serving(generator, |_| {}).await;
    let mut client = daemon.connect().await;
    client
        .send(
            json!({"id": "full", "prompt": "sensor ".repeat(4), "raw": true,
                     "max_tokens": 200, "ignore_eos": true}),
        )
        .await;
    let events = client.until_end("full").await;
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "length", "{done}");
    let used = done["usage"]["prompt_tokens"].as_u64().unwrap()
        + done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (46..=48).contains(&used),
        "prompt and output fill the 48-position context: {done}"
    );
    daemon.stop().await;
}
