//! The HTTP API with real clients: the official `openai` and `ollama` Python packages, curl,
//! headless Chromium on the device page, and a raw TCP client that hangs up.
#![cfg(feature = "http")]

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

/// Runs one of the Python clients in tests/http with `args`; its stdout is one JSON object.
async fn python_client(script: &str, args: Vec<String>) -> serde_json::Value {
    let python = repo().join(".venv/bin/python");
    let script = repo().join("tests/http").join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(&script)
            .args(args)
            .env("EMBERD_PAGE_PATIENCE", patience().as_secs().to_string())
            .output()
            .expect("the .venv that the test command makes (with tests/requirements.txt)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen:#}");
    seen
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
    let seen = python_client(
        "openai_client.py",
        vec![format!("{base}/v1"), "smollm2-135m-instruct".into()],
    )
    .await;
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
    assert_eq!(seen["schema_finish"], "stop", "{seen}");
    assert_eq!(seen["schema_valid"], true, "{seen}");
    assert_eq!(seen["bad_schema"]["status"], 400, "{seen}");
    assert!(seen["bad_schema"]["body"]["message"]
        .as_str()
        .unwrap()
        .contains("nothing"));
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
    write_secret(&key_file, "s3cret\n");
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
async fn the_ollama_client_gets_the_same_text_streamed_and_whole() {
    let (daemon, base) = http_daemon(|_| {}).await;
    let model = "smollm2-135m-instruct";
    let seen = python_client("ollama_client.py", vec![base, model.into()]).await;
    assert_eq!(seen["tags"], serde_json::json!([model]));
    assert_eq!(seen["ps"][0]["model"], model);
    assert!(seen["ps"][0]["size"].as_u64().unwrap() > 0, "{seen}");
    assert!(seen["ps"][0]["context_length"].as_u64().unwrap() > 0);
    assert_eq!(seen["show"]["family"], "llama");
    assert_eq!(seen["show"]["format"], "onnx");
    assert_eq!(seen["load"], "load", "a request with no prompt loads");
    for (whole, streamed) in [
        ("chat_whole_text", "chat_stream_text"),
        ("generate_whole_text", "generate_stream_text"),
    ] {
        assert!(!seen[whole].as_str().unwrap().is_empty(), "{whole}");
        assert_eq!(seen[streamed], seen[whole], "greedy: streamed == whole");
    }
    assert!(seen["chat_stream_pieces"].as_u64().unwrap() > 1);
    assert_eq!(
        seen["chat_stream_dones"], 1,
        "exactly one object has done: true"
    );
    for last in ["chat_whole", "chat_stream", "generate_whole"] {
        let last = &seen[last];
        assert_eq!(last["done"], true);
        assert!(["stop", "length"].contains(&last["done_reason"].as_str().unwrap()));
        assert!(last["prompt_eval_count"].as_u64().unwrap() > 0, "{last}");
        assert!(last["eval_count"].as_u64().unwrap() > 0, "{last}");
        let total = last["total_duration"].as_u64().unwrap();
        // Nanoseconds: a request of a few tokens takes more than a millisecond.
        assert!(total > 1_000_000, "{last}");
        assert!(last["eval_duration"].as_u64().unwrap() <= total, "{last}");
    }
    assert_eq!(
        seen["chat_stream"]["eval_count"],
        seen["chat_whole"]["eval_count"]
    );
    assert_eq!(seen["unknown_model"]["status"], 404, "{seen}");
    assert_eq!(seen["unsupported_option"]["status"], 400, "{seen}");
    assert!(seen["unsupported_option"]["error"]
        .as_str()
        .unwrap()
        .contains("mirostat"));
    // Structured output: format "json" and a schema come back whole and parse; the schema
    // holds (checked by `jsonschema` in the client); a schema that cannot compile is a 400.
    for key in ["format_json", "format_schema"] {
        assert_eq!(seen[format!("{key}_done")], "stop", "{seen}");
        let text = seen[key].as_str().unwrap();
        assert!(
            serde_json::from_str::<serde_json::Value>(text).is_ok(),
            "{key}: {text}"
        );
    }
    assert_eq!(seen["format_schema_valid"], true, "{seen}");
    assert_eq!(seen["bad_format"]["status"], 400, "{seen}");
    assert!(seen["bad_format"]["error"]
        .as_str()
        .unwrap()
        .contains("minProperties"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_page_streams_a_reply_and_stops_it_in_headless_chromium() {
    let (daemon, base) = http_daemon(|_| {}).await;
    let model = "smollm2-135m-instruct";
    // Kept after the run, for a look at what the page showed.
    let shot = repo().join("target/test-artifacts/device-page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let seen = python_client(
        "page_check.py",
        vec![base, model.into(), shot.display().to_string()],
    )
    .await;
    assert_eq!(seen["title"], "emberd");
    assert!(seen["status"]["model"].as_str().unwrap().starts_with(model));
    assert_eq!(
        seen["status"]["engine"].as_str().unwrap().split(',').next(),
        Some(serving_engine())
    );
    assert!(!seen["reply"].as_str().unwrap().is_empty(), "{seen}");
    // The reply grew piece by piece: several lengths between empty and whole.
    let lengths = seen["lengths_seen"].as_array().unwrap();
    assert!(lengths.len() >= 4, "the text appeared at once: {lengths:?}");
    assert!(seen["ttft"].as_str().unwrap().ends_with(" ms"), "{seen}");
    assert!(seen["tps"].as_str().unwrap().parse::<f64>().unwrap() > 0.0);
    assert_eq!(seen["error"], "");
    assert_eq!(seen["stopped_error"], "stopped");
    assert_eq!(seen["exceptions"], serde_json::json!([]));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "a screenshot"
    );
    // Stop aborted the fetch; the daemon cancelled the request.
    daemon.wait_for_a_cancel().await;
    daemon.stop().await;
}

/// The value of the one sample `name` (with its labels, as written) in a text exposition.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_usage_clients_were_sent() {
    let (daemon, base) = http_daemon(|_| {}).await;
    let (mut prompt, mut generated) = (0u64, 0u64);
    let mut client = daemon.connect().await;
    for (i, text) in ["Say hi.", "Count to three."].iter().enumerate() {
        let id = format!("m{i}");
        client
            .send(serde_json::json!({"id": id, "prompt": text, "max_tokens": 8}))
            .await;
        let events = client.until_end(&id).await;
        let usage = &events.last().unwrap()["usage"];
        prompt += usage["prompt_tokens"].as_u64().unwrap();
        generated += usage["completion_tokens"].as_u64().unwrap();
    }
    client
        .send(serde_json::json!({"id": "bad", "prompt": "x", "colour": "red"}))
        .await;
    assert_eq!(client.until_end("bad").await[0]["code"], "bad_request");

    let run = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let (body, status) = run(vec![
        "-d".into(),
        serde_json::json!({"model": "smollm2-135m-instruct", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello!"}]})
        .to_string(),
        format!("{base}/v1/chat/completions"),
    ])
    .await;
    assert_eq!(status, "200", "{body}");
    let usage = serde_json::from_str::<serde_json::Value>(&body).unwrap()["usage"].clone();
    prompt += usage["prompt_tokens"].as_u64().unwrap();
    generated += usage["completion_tokens"].as_u64().unwrap();
    let (body, status) = run(vec![
        "-d".into(),
        serde_json::json!({"model": "smollm2-135m-instruct", "stream": false,
            "options": {"num_predict": 8}, "prompt": "Why is the sky blue?"})
        .to_string(),
        format!("{base}/api/generate"),
    ])
    .await;
    assert_eq!(status, "200", "{body}");
    let last: serde_json::Value = serde_json::from_str(&body).unwrap();
    prompt += last["prompt_eval_count"].as_u64().unwrap();
    generated += last["eval_count"].as_u64().unwrap();
    let too_long = serde_json::json!({"model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "word ".repeat(9000)}]});
    let (_, status) = run(vec![
        "-d".into(),
        too_long.to_string(),
        format!("{base}/v1/chat/completions"),
    ])
    .await;
    assert_eq!(status, "413");
    // Refused by HTTP itself, before the ingress: counted alike.
    let (_, status) = run(vec![
        "-d".into(),
        "{not json".into(),
        format!("{base}/api/chat"),
    ])
    .await;
    assert_eq!(status, "400");

    let (text, status) = run(vec![format!("{base}/metrics")]).await;
    assert_eq!(status, "200", "{text}");
    eprintln!("{text}");
    assert_eq!(sample(&text, "emberd_prompt_tokens_total"), prompt as f64);
    assert_eq!(
        sample(&text, "emberd_generated_tokens_total"),
        generated as f64
    );
    let requests = |labels: &str| {
        text.lines()
            .filter(|l| l.starts_with("emberd_requests_total{") && l.contains(labels))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(requests(r#"transport="socket""#), 3.0);
    assert_eq!(requests(r#"transport="socket",outcome="bad_request""#), 1.0);
    assert_eq!(requests(r#"transport="http""#), 4.0);
    assert_eq!(requests(r#"transport="http",outcome="bad_request""#), 1.0);
    assert_eq!(requests(r#"transport="http",outcome="too_long""#), 1.0);
    assert_eq!(sample(&text, "emberd_request_latency_seconds_count"), 4.0);
    assert_eq!(sample(&text, "emberd_queue_depth"), 0.0);
    assert!(text.contains(&format!(
        r#"emberd_model_info{{model="smollm2-135m-instruct",engine="{}""#,
        serving_engine()
    )));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_request_on_both_apis_streaming_or_not() {
    let (daemon, _) = http_daemon(|_| {}).await;
    let addr = daemon.http.unwrap();
    let model = "smollm2-135m-instruct";
    let story = serde_json::json!([{"role": "user", "content": "Tell me a long story."}]);
    let cases = [
        (
            "/v1/chat/completions",
            serde_json::json!({"model": model, "max_tokens": 1000,
            "stream": true, "messages": story}),
            true,
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"model": model, "max_tokens": 1000,
            "messages": story}),
            false,
        ),
        (
            "/api/chat",
            serde_json::json!({"model": model, "options": {"num_predict": 1000},
            "messages": story}),
            true,
        ),
        (
            "/api/generate",
            serde_json::json!({"model": model, "options": {"num_predict": 1000},
            "prompt": "Tell me a long story.", "stream": false}),
            false,
        ),
    ];
    for (n, (path, body, streams)) in cases.into_iter().enumerate() {
        daemon.wait_until_idle().await;
        let body = body.to_string();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        if streams {
            // Read until text has come, then hang up.
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
        } else {
            // Hang up while the engine runs the request (nothing has been sent back yet).
            daemon
                .wait_for("the request running", |s| {
                    s.working.load(std::sync::atomic::Ordering::Acquire)
                })
                .await;
        }
        drop(stream);
        eprintln!("{path} (streaming: {streams}): hung up");
        daemon.wait_for_cancels(n as u64 + 1).await;
    }
    daemon.stop().await;
}

/// A key file every user may read is no secret: `serve` refuses to start and says how to fix
/// it, rather than serving behind a key anyone on the device can read.
#[test]
fn a_world_readable_api_key_file_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("api-key");
    std::fs::write(&key, "s3cret\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = write_serve_config(
        dir.path(),
        &format!(
            "[http]\nenabled = true\nlisten = \"127.0.0.1:{}\"\napi_key_file = {key:?}\n",
            free_port()
        ),
    );
    let out = emberd_command()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("http.api_key_file") && stderr.contains("readable by every user"),
        "{stderr}"
    );
    assert!(stderr.contains("chmod o-rwx"), "{stderr}");
}

/// Tool calls through both clients with the two-tool house (tests/http/tools_client.py checks
/// every call's arguments against its tool's schema with `jsonschema`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_through_the_openai_and_ollama_clients_hold_to_their_schemas() {
    // Ollama's API has no tool_choice: the daemon's default asks for a call (OpenAI's
    // requests below say their own).
    let (daemon, base) = http_daemon(|c| {
        c.generation.tool_choice = emberd::protocol::DefaultToolChoice::Required;
    })
    .await;
    let seeds = 20;
    let seen = python_client(
        "tools_client.py",
        vec![base, "smollm2-135m-instruct".into(), seeds.to_string()],
    )
    .await;
    let none = serde_json::json!([]);
    // OpenAI, tool_choice required: a valid call every time.
    let required = &seen["openai_required"];
    assert_eq!(
        required["calls"].as_array().unwrap().len(),
        seeds,
        "{required}"
    );
    assert_eq!(required["invalid"], none, "{required}");
    assert_eq!(required["finishes"], serde_json::json!(["tool_calls"]));
    // Streamed, to a named function: one call in deltas, no content.
    let stream = &seen["openai_stream"];
    assert_eq!(stream["calls"].as_array().unwrap().len(), 1, "{stream}");
    assert_eq!(stream["calls"][0]["name"], "set_light", "{stream}");
    assert!(stream["calls"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("call_"));
    assert_eq!(stream["invalid"], none, "{stream}");
    assert_eq!(stream["content"], "", "{stream}");
    assert_eq!(stream["finishes"], serde_json::json!(["tool_calls"]));
    // none: text. A tool's result: answered in text.
    for key in ["openai_none", "openai_result"] {
        let answer = &seen[key];
        assert!(
            !answer["content"].as_str().unwrap().trim().is_empty(),
            "{key}: {answer}"
        );
        assert!(
            !answer["tool_calls"].as_bool().unwrap_or(false),
            "{key}: {answer}"
        );
        assert!(
            ["stop", "length"].contains(&answer["finish"].as_str().unwrap()),
            "{key}"
        );
    }
    assert!(seen["openai_none"]["tool_calls"].is_null());
    // auto: text, or a call that holds.
    let auto = &seen["openai_auto"];
    assert_eq!(auto["invalid"], none, "{auto}");
    match auto["calls"].as_array().unwrap().len() {
        0 => assert!(
            !auto["content"].as_str().unwrap().trim().is_empty(),
            "{auto}"
        ),
        _ => assert_eq!(auto["finish"], "tool_calls", "{auto}"),
    }
    // Ollama, with the daemon's default of required: a valid call every time.
    let required = &seen["ollama_required"];
    assert_eq!(
        required["calls"].as_array().unwrap().len(),
        seeds,
        "{required}"
    );
    assert_eq!(required["texts"], none, "{required}");
    assert_eq!(required["invalid"], none, "{required}");
    let stream = &seen["ollama_stream"];
    assert_eq!(stream["dones"], 1, "{stream}");
    assert_eq!(stream["calls"].as_array().unwrap().len(), 1, "{stream}");
    assert_eq!(stream["content"], "", "{stream}");
    let result = &seen["ollama_result"];
    assert!(
        !result["content"].as_str().unwrap().trim().is_empty(),
        "{result}"
    );
    assert_eq!(result["tool_calls"], false, "{result}");
    daemon.stop().await;
}

/// Home Assistant's Ollama integration, replayed from its source with its own client
/// (tests/http/home_assistant_ollama.py): setup, the model check and pull, the poll, a
/// conversation turn that calls the Assist API's tools until it answers, and an AI Task with
/// a JSON Schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistants_ollama_integration_gets_its_answers() {
    // A device that exists to act: a user's message is answered by a call (the README's
    // Home Assistant configuration). Home Assistant sends no seed or temperature, so each
    // run samples differently at the default temperature, as it does in a house.
    let (daemon, base) = http_daemon(|c| {
        c.generation.tool_choice = emberd::protocol::DefaultToolChoice::Required;
    })
    .await;
    let model = "smollm2-135m-instruct";
    let seen = python_client("home_assistant_ollama.py", vec![base, model.into()]).await;
    assert_eq!(seen["downloaded"], serde_json::json!([model]), "{seen}");
    assert_eq!(seen["pull_present"], "success");
    assert_eq!(seen["pull_missing"]["status"], 404, "{seen}");
    assert_eq!(seen["poll"]["installed"], serde_json::json!([model]));
    assert_eq!(seen["poll"]["loaded"][0]["model"], model);
    let turns = seen["turns"].as_array().unwrap();
    // The first answer is a call; the loop ends with text before Home Assistant gives up.
    assert!(!turns[0]["calls"].as_array().unwrap().is_empty(), "{seen}");
    let last = turns.last().unwrap();
    assert!(
        last["calls"].as_array().unwrap().is_empty(),
        "no answer in 10 turns: {seen}"
    );
    assert!(
        !last["content"].as_str().unwrap().trim().is_empty(),
        "{last}"
    );
    for turn in turns {
        assert_eq!(turn["problems"], serde_json::json!([]), "{turn}");
        assert!(turn["chunks"].as_u64().unwrap() >= 1, "{turn}");
    }
    assert!(seen["ai_task"]["lights_on"].is_boolean(), "{seen}");
    daemon.stop().await;
}
