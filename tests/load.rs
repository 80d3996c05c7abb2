//! A burst of 1,000 requests from 50 clients at once, on each transport in turn (Unix socket,
//! MQTT, HTTP), against the built daemon: every request ends with exactly one terminal event,
//! what was accepted is served, the queue bound holds, a full queue answers `busy` without
//! waiting, and the daemon's file descriptors and memory come back to their idle figures.
//! The burst's figures (accepted, busy, latencies) are printed, not asserted: time is for
//! benchmarks.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::daemon::*;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const CLIENTS: usize = 50;
const PER_CLIENT: usize = 20;
const MAX_QUEUE: u64 = 16;
const MAX_BATCH: u64 = 4;
const DEVICE: &str = "burst";

/// How one request ended, and how long its first event took.
struct Record {
    id: String,
    /// "done", or the error code.
    end: String,
    first_event: Duration,
}

/// The one terminal event among `events` (all of one request), checked to be the last.
fn record(id: String, events: &[Value], first_event: Duration) -> Record {
    let terminals: Vec<&Value> = events.iter().filter(|e| e["type"] != "token").collect();
    assert_eq!(terminals.len(), 1, "{id}: {events:?}");
    let last = events.last().unwrap();
    assert!(
        last["type"] != "token",
        "{id}: events after its terminal one: {events:?}"
    );
    let end = match last["type"].as_str() {
        Some("done") => "done".to_string(),
        _ => last["code"].as_str().unwrap_or("?").to_string(),
    };
    Record {
        id,
        end,
        first_event,
    }
}

/// A short request: the burst is about the daemon's plumbing, not the model.
fn request(id: &str, c: usize, r: usize) -> Value {
    json!({"id": id, "prompt": "reading ".repeat(1 + (c + r) % 8),
           "max_tokens": 1 + (c * 7 + r) % 8, "temperature": 0})
}

async fn socket_client(socket: PathBuf, c: usize) -> Vec<Record> {
    let mut client = Client::connect(&socket).await;
    let mut records = Vec::new();
    for r in 0..PER_CLIENT {
        let id = format!("s{c}-{r}");
        let sent = Instant::now();
        client.send(request(&id, c, r)).await;
        let first = client.event().await;
        let first_event = sent.elapsed();
        assert_eq!(first["id"], id.as_str());
        let mut events = vec![first];
        if events[0]["type"] == "token" {
            events.extend(client.until_end(&id).await);
        }
        records.push(record(id, &events, first_event));
    }
    records
}

async fn mqtt_client_run(port: u16, c: usize) -> Vec<Record> {
    let topic = format!("burst/m{c}");
    let (client, mut rx) = mqtt_client(port, &format!("burst-client-{c}"), &[&topic]).await;
    let mut records = Vec::new();
    for r in 0..PER_CLIENT {
        let id = format!("m{c}-{r}");
        let mut message = request(&id, c, r);
        message["reply_to"] = json!(topic);
        let sent = Instant::now();
        client
            .publish(
                format!("emberd/{DEVICE}/request"),
                QoS::AtLeastOnce,
                false,
                message.to_string(),
            )
            .await
            .unwrap();
        let mut events = vec![next_on(&mut rx, &topic).await];
        let first_event = sent.elapsed();
        while events.last().unwrap()["type"] == "token" {
            events.push(next_on(&mut rx, &topic).await);
        }
        assert!(events.iter().all(|e| e["id"] == id.as_str()), "{events:?}");
        records.push(record(id, &events, first_event));
    }
    client.disconnect().await.unwrap();
    records
}

/// One streamed completion over HTTP/1.0 (so the body ends with the connection: no chunked
/// framing to undo). Its SSE chunks become wire-like events: a chunk with text is a token, the
/// one with a finish reason is `done`, an error answer (before or during the stream) is an
/// error.
async fn http_once(port: u16, id: &str, body: &Value) -> (Vec<Value>, Duration) {
    let sent = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status = next_line(&mut lines).await.expect("a status line");
    let first_event = sent.elapsed();
    let ok = status.split_whitespace().nth(1) == Some("200");
    // Past the headers.
    while next_line(&mut lines).await.is_some_and(|l| !l.is_empty()) {}
    let mut events = Vec::new();
    let mut first_at = None;
    while let Some(line) = next_line(&mut lines).await {
        if !ok {
            let answer: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let code = answer["error"]["code"].as_str().unwrap_or("?");
            events.push(json!({"id": id, "type": "error", "code": code}));
            continue;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if chunk.get("error").is_some() {
            let code = chunk["error"]["code"].as_str().unwrap_or("?");
            events.push(json!({"id": id, "type": "error", "code": code}));
        } else if !chunk["choices"][0]["finish_reason"].is_null() {
            events.push(json!({"id": id, "type": "done"}));
        } else if chunk["choices"][0]["text"] != "" {
            first_at.get_or_insert_with(|| sent.elapsed());
            events.push(json!({"id": id, "type": "token"}));
        }
    }
    // A streamed answer's first event is its first token (or its end, if it had none).
    let first = if ok {
        first_at.unwrap_or_else(|| sent.elapsed())
    } else {
        first_event
    };
    (events, first)
}

async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
) -> Option<String> {
    tokio::time::timeout(patience(), lines.next_line())
        .await
        .expect("an answer in time")
        .unwrap()
}

async fn http_client(port: u16, c: usize) -> Vec<Record> {
    let mut records = Vec::new();
    for r in 0..PER_CLIENT {
        let id = format!("h{c}-{r}");
        let mut body = request(&id, c, r);
        let prompt = body["prompt"].take();
        let max_tokens = body["max_tokens"].take();
        let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                          "stream": true});
        let (events, first_event) = http_once(port, &id, &body).await;
        records.push(record(id, &events, first_event));
    }
    records
}

async fn wait_idle(http: u16) -> Value {
    let deadline = Instant::now() + patience();
    loop {
        let s = http_status(http).await;
        if s["queue_depth"] == 0 && s["running"] == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "never idle: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process's open file descriptors, each with what it points at.
fn fds_of(pid: u32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    fds.sort();
    fds
}

/// Nearest-rank percentile of `values` (sorted here), in milliseconds.
fn percentile_ms(values: &mut [Duration], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort();
    let rank = ((p / 100.0 * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1].as_secs_f64() * 1e3
}

/// Samples `/status` until `stop`, keeping the most requests seen waiting (accepted, not
/// running) and running.
fn watch_bounds(http: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let (mut queue, mut running) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            let s = http_status(http).await;
            let now_running = s["running"].as_u64().unwrap();
            let in_flight = s["queue_depth"].as_u64().unwrap();
            queue = queue.max(in_flight.saturating_sub(now_running));
            running = running.max(now_running);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (queue, running)
    })
}

/// Runs one transport's burst and checks and prints what it did.
async fn burst<F, Fut>(name: &str, http: u16, pid: u32, client: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<Record>> + Send + 'static,
{
    let before = wait_idle(http).await;
    let idle_fds = fds_of(pid);
    let idle_rss = rss_mib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_bounds(http, stop.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS).map(|c| tokio::spawn(client(c))).collect();
    let mut records = Vec::new();
    for task in tasks {
        records.extend(task.await.unwrap());
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (most_queued, most_running) = watcher.await.unwrap();
    let after = wait_idle(http).await;

    assert_eq!(records.len(), CLIENTS * PER_CLIENT, "{name}");
    let others: Vec<String> = records
        .iter()
        .filter(|r| r.end != "done" && r.end != "busy")
        .map(|r| format!("{} ended with {}", r.id, r.end))
        .collect();
    assert!(
        others.is_empty(),
        "{name}: {} requests ended otherwise, the first: {:?}",
        others.len(),
        &others[..others.len().min(5)]
    );
    let (mut done, mut busy): (Vec<_>, Vec<_>) = records.iter().partition(|r| r.end == "done");
    let figure = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    assert_eq!(
        figure("served"),
        done.len() as u64,
        "{name}: served {after}"
    );
    assert_eq!(
        figure("rejected_busy"),
        busy.len() as u64,
        "{name}: {after}"
    );
    assert!(!done.is_empty(), "{name}: nothing was accepted");
    // A submission counts itself in flight just before the queue answers busy, one per
    // runtime thread of the daemon's (two): the slack the figure may show past the bound.
    assert!(
        most_queued <= MAX_QUEUE + 2 && most_running <= MAX_BATCH,
        "{name}: the queue held {most_queued} (bound {MAX_QUEUE}), {most_running} ran (batch {MAX_BATCH})"
    );

    // Connections closed and buffers dropped: back to the idle figures.
    let deadline = Instant::now() + patience();
    let fds = loop {
        let fds = fds_of(pid);
        if fds.len() <= idle_fds.len() || Instant::now() > deadline {
            break fds;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        fds.len() <= idle_fds.len(),
        "{name}: {} descriptors open after the burst, {} before; now: {fds:#?}",
        fds.len(),
        idle_fds.len()
    );
    let rss = rss_mib(pid);
    let mut busy_lat: Vec<Duration> = busy.iter_mut().map(|r| r.first_event).collect();
    let mut first_lat: Vec<Duration> = done.iter_mut().map(|r| r.first_event).collect();
    eprintln!(
        "[burst] {name}: {} requests from {CLIENTS} clients in {:.1} s: {} accepted and served, \
         {} busy, {} terminal events; busy p50 {:.1} ms p99 {:.1} ms; first token p50 {:.0} ms \
         p99 {:.0} ms; queue at most {most_queued}/{MAX_QUEUE}, running at most \
         {most_running}/{MAX_BATCH}; fds {} -> {}; RSS {idle_rss:.1} -> {rss:.1} MiB",
        records.len(),
        took.as_secs_f64(),
        done.len(),
        busy.len(),
        records.len(),
        percentile_ms(&mut busy_lat, 50.0),
        percentile_ms(&mut busy_lat, 99.0),
        percentile_ms(&mut first_lat, 50.0),
        percentile_ms(&mut first_lat, 99.0),
        idle_fds.len(),
        fds.len(),
    );
    assert!(
        rss <= idle_rss + 8.0,
        "{name}: the daemon's memory grew from {idle_rss:.1} to {rss:.1} MiB"
    );
}

/// Ends the built daemon with SIGTERM; it must exit cleanly.
fn terminate(mut daemon: Spawned) {
    // SAFETY: signalling our own child.
    unsafe { libc_kill(daemon.id() as i32, 15) };
    assert!(daemon.wait().unwrap().success());
}

fn start(dir: &Path, broker: u16, http: u16) -> Spawned {
    let config = write_serve_config(
        dir,
        &format!(
            "[limits]\nmax_batch = {MAX_BATCH}\nmax_queue = {MAX_QUEUE}\n\
             [http]\nenabled = true\nlisten = \"127.0.0.1:{http}\"\n\
             [mqtt]\nenabled = true\nport = {broker}\ndevice_id = \"{DEVICE}\"\n"
        ),
    );
    spawn_ready(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
async fn a_burst_of_a_thousand_requests_on_each_transport_loses_none_and_leaves_nothing_behind() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let port = broker.port;
    let daemon = {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || start(&dir, port, http))
            .await
            .unwrap()
    };
    let pid = daemon.id();
    // Warm-up at full batch, so the slot buffers are what a burst needs before the figures.
    let socket = dir.path().join("emberd.sock");
    let warm = (0..8).map(|c| tokio::spawn(socket_client(socket.clone(), c)));
    for w in warm {
        w.await.unwrap();
    }
    let socket_path = socket.clone();
    burst("socket", http, pid, move |c| {
        socket_client(socket_path.clone(), c)
    })
    .await;
    burst("mqtt", http, pid, move |c| mqtt_client_run(port, c)).await;
    burst("http", http, pid, move |c| http_client(http, c)).await;
    tokio::task::spawn_blocking(move || terminate(daemon))
        .await
        .unwrap();
}
