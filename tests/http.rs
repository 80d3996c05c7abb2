//! The HTTP API with real clients: the official `openai` Python package, curl, and a raw
//! TCP client that hangs up mid-stream.

mod common;

use std::process::Command;

use common::daemon::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_daemon(tweak: impl FnOnce(&mut emberd::config::Config)) -> (Daemon, String) {
    let daemon = Daemon::start(default_model_dir(), |c| {
        c.http.enabled = true;
        c.http.listen = "127.0.0.1:0".into();
        tweak(c);
    })
    .await;
    let base = format!("http://{}", daemon.http.expect("the HTTP API listens"));
    (daemon, base)
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (body.to_string(), status.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_gets_the_same_text_streamed_and_whole() {
    let (daemon, base) = http_daemon(|_| {}).await;
    let python = repo().join(".venv/bin/python");
    let script = repo().join("tests/http/openai_client.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(format!("{base}/v1"))
            .arg("smollm2-135m-instruct")
            .output()
            .expect("the .venv that the test command makes (with tests/requirements.txt)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen:#}");
    assert_eq!(seen["models"], serde_json::json!(["smollm2-135m-instruct"]));
    let whole = seen["whole_text"].as_str().unwrap();
    assert!(!whole.is_empty());
    assert_eq!(
        seen["stream_text"].as_str().unwrap(),
        whole,
        "greedy: streamed == whole"
    );
    assert!(seen["stream_pieces"].as_u64().unwrap() > 1, "{seen}");
    assert_eq!(seen["stream_roles"], serde_json::json!(["assistant"]));
    assert_eq!(
        seen["stream_finishes"].as_array().unwrap().len(),
        1,
        "{seen}"
    );
    assert_eq!(
        seen["stream_usage"]["completion_tokens"],
        seen["whole_usage"]["completion_tokens"]
    );
    assert!(seen["whole_usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(!seen["completion_text"].as_str().unwrap().is_empty());
    assert_eq!(seen["unknown_model"]["status"], 404, "{seen}");
    assert_eq!(seen["unsupported_field"]["status"], 400, "{seen}");
    assert!(
        seen["unsupported_field"]["body"]["message"]
            .as_str()
            .unwrap()
            .contains("logit_bias"),
        "{seen}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_streams_sse_and_gets_openai_errors_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "s3cret\n").unwrap();
    let (daemon, base) = http_daemon(|c| c.http.api_key_file = Some(key_file)).await;
    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let auth = "Authorization: Bearer s3cret".to_string();

    // /health needs no key; everything else does.
    let (body, status) = run(vec![format!("{base}/health")]).await;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("200", r#"{"status":"ok"}"#)
    );
    let (body, status) = run(vec![format!("{base}/v1/models")]).await;
    assert_eq!(status, "401", "{body}");
    assert!(body.contains("invalid_api_key"), "{body}");

    let request = serde_json::json!({"model": "smollm2-135m-instruct", "max_tokens": 12,
        "temperature": 0, "stream": true,
        "messages": [{"role": "user", "content": "Say hello."}]});
    let (body, status) = run(vec![
        "-N".into(),
        "-H".into(),
        auth.clone(),
        "-H".into(),
        "Content-Type: application/json".into(),
        "-d".into(),
        request.to_string(),
        format!("{base}/v1/chat/completions"),
    ])
    .await;
    assert_eq!(status, "200", "{body}");
    let data: Vec<&str> = body
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not SSE: {l}"))
        })
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1, "exactly one chunk has a finish_reason: {body}");

    // Errors: OpenAI's shape, the right status.
    let (body, status) = run(vec![
        "-H".into(),
        auth.clone(),
        "-d".into(),
        "{not json".into(),
        format!("{base}/v1/chat/completions"),
    ])
    .await;
    assert_eq!(status, "400", "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(error["error"]["message"].is_string() && error["error"]["type"].is_string());
    let long = serde_json::json!({"model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "word ".repeat(9000)}]});
    let (body, status) = run(vec![
        "-H".into(),
        auth.clone(),
        "-d".into(),
        long.to_string(),
        format!("{base}/v1/chat/completions"),
    ])
    .await;
    assert_eq!(status, "413", "{body}");
    let (body, status) = run(vec!["-H".into(), auth, format!("{base}/v2/nothing")]).await;
    assert_eq!(status, "404", "{body}");
    assert!(body.contains("\"error\""), "{body}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_cancels_its_request() {
    let (daemon, _) = http_daemon(|_| {}).await;
    let addr = daemon.http.unwrap();
    let body = serde_json::json!({"model": "smollm2-135m-instruct", "max_tokens": 1000,
        "stream": true, "messages": [{"role": "user", "content": "Tell me a long story."}]})
    .to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    // Read until the first content chunk, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"") || seen.len() < 400 {
        let n = tokio::time::timeout(patience(), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the server closed first");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    daemon.wait_for_a_cancel().await;
    daemon.stop().await;
}
