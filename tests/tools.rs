//! Tool calls with the default model, through a running daemon's socket: calls held to each
//! tool's parameter schema over many seeds (checked by a real JSON Schema validator), one
//! named function, `none` for text, a tool's result answered in text, and the refusals.
//! tests/http.rs drives the same through the `openai` and `ollama` clients.

mod common;

use common::daemon::*;
use common::*;
use serde_json::{json, Value};

const SEEDS: u64 = 20;

/// A two-tool house: `set_light(room, on)` and `get_temperature(room)`.
fn home_tools() -> Value {
    read_json(repo().join("tests/tools/home.tools.json"))
}

/// The schema a call `{"name", "arguments"}` must meet: one of the tools, with its own
/// parameters.
fn call_schema(tools: &Value) -> Value {
    let calls: Vec<Value> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            json!({"type": "object",
                   "properties": {"name": {"const": t["function"]["name"]},
                                  "arguments": t["function"]["parameters"]},
                   "required": ["name", "arguments"], "additionalProperties": false})
        })
        .collect();
    json!({"oneOf": calls})
}

fn ask(id: &str, prompt: &str, seed: u64) -> Value {
    json!({"id": id, "prompt": prompt, "tools": home_tools(), "temperature": 1.0,
           "seed": seed, "max_tokens": 64})
}

/// The call a request's events end with: nothing streamed before it, one call, `tool_calls`.
fn the_call(id: &str, events: &[Value]) -> Value {
    let end = events.last().unwrap();
    assert_eq!(events.len(), 1, "{id}: a call streams no text: {events:?}");
    assert_eq!(end["finish_reason"], "tool_calls", "{id}: {end}");
    let calls = end["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1, "{id}: {end}");
    assert_eq!(calls[0]["id"], format!("call_{id}"), "{id}: {end}");
    assert_eq!(calls[0]["type"], "function", "{id}: {end}");
    calls[0]["function"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_calls_hold_to_their_tools_schemas_and_none_and_results_give_text() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut socket = daemon.connect().await;
    let prompts = [
        "Turn on the light in the kitchen.",
        "How warm is it in the bedroom?",
    ];
    let mut calls = Vec::new();
    for seed in 0..SEEDS {
        let id = format!("req{seed}");
        let mut request = ask(&id, prompts[seed as usize % 2], seed);
        request["tool_choice"] = json!("required");
        socket.send(request).await;
        let call = the_call(&id, &socket.until_end(&id).await);
        calls.push(json!({"name": call["name"], "arguments": call["arguments"]}).to_string());
    }
    let distinct: std::collections::BTreeSet<_> = calls.iter().collect();
    eprintln!("{} distinct calls: {distinct:?}", distinct.len());
    assert_valid("required calls", &call_schema(&home_tools()), &calls);

    // One function by name: the call is to it.
    let mut request = ask("named", "Is the hall cold?", 7);
    request["tool_choice"] = json!({"type": "function", "function": {"name": "get_temperature"}});
    socket.send(request).await;
    let call = the_call("named", &socket.until_end("named").await);
    assert_eq!(call["name"], "get_temperature", "{call}");
    let named = json!({"name": call["name"], "arguments": call["arguments"]}).to_string();
    assert_valid("the named call", &call_schema(&home_tools()), &[named]);

    // none: text, streamed, no call.
    let mut request = ask("none", "Turn on the light in the kitchen.", 3);
    request["tool_choice"] = json!("none");
    request["temperature"] = json!(0);
    socket.send(request).await;
    let events = socket.until_end("none").await;
    let end = events.last().unwrap();
    assert_eq!(end["type"], "done", "{end}");
    assert!(end.get("tool_calls").is_none(), "{end}");
    assert_ne!(end["finish_reason"], "tool_calls", "{end}");
    assert!(!text_of(&events).trim().is_empty(), "{events:?}");

    // A tool's result comes back: the model answers it in text (tool_choice auto, greedy).
    let conversation = json!([
        {"role": "user", "content": "How warm is it in the kitchen?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_temperature", "arguments": "{\"room\": \"kitchen\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 21.5}"},
    ]);
    socket
        .send(
            json!({"id": "result", "messages": conversation, "tools": home_tools(),
                     "temperature": 0, "max_tokens": 48, "stream": false}),
        )
        .await;
    let end = socket.until_end("result").await.pop().unwrap();
    assert_eq!(end["type"], "done", "{end}");
    assert!(
        end.get("tool_calls").is_none(),
        "answered with a call: {end}"
    );
    let text = end["text"].as_str().unwrap();
    eprintln!("the answer to the result: {text:?}");
    assert!(!text.trim().is_empty(), "{end}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tools_are_refused_naming_the_problem_and_the_daemon_serves_on() {
    let daemon = Daemon::start(tiny_dir("optimum"), |_| {}).await;
    let mut socket = daemon.connect().await;
    let tools = home_tools();
    // The tiny model's context is short: one small tool, with a type no schema has.
    let unknown_type = json!([{"type": "function", "function": {"name": "paint",
        "parameters": {"type": "object", "properties": {"shade": {"type": "colour"}}}}}]);
    let cases = [
        (
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "open_door"}}}),
            "\"open_door\", which is not among tools",
        ),
        (
            json!({"tools": tools, "response_format": {"type": "json_object"}}),
            "response_format cannot be combined with tools",
        ),
        (
            json!({"tools": [tools[0], tools[0]]}),
            "tools[1]: the name \"set_light\" is given twice",
        ),
        (
            json!({"tools": tools, "tool_choice": "sometimes"}),
            "tool_choice must be auto, none, required or a function",
        ),
        (json!({"tools": unknown_type}), "tools: "),
        (json!({"tool_choice": "required"}), "tools is empty"),
    ];
    for (i, (fields, expected)) in cases.into_iter().enumerate() {
        let id = format!("bad{i}");
        let mut request = json!({"id": id, "prompt": "Lights on."});
        for (k, v) in fields.as_object().unwrap() {
            request[k] = v.clone();
        }
        socket.send(request).await;
        let end = socket.until_end(&id).await.pop().unwrap();
        assert_eq!(end["type"], "error", "{id}: {end}");
        assert_eq!(end["code"], "bad_request", "{id}: {end}");
        let message = end["message"].as_str().unwrap();
        assert!(
            message.contains(expected),
            "{id}: {message:?} lacks {expected:?}"
        );
    }
    // Still serving.
    socket
        .send(json!({"id": "after", "prompt": "Hi", "max_tokens": 4}))
        .await;
    let end = socket.until_end("after").await.pop().unwrap();
    assert_eq!(end["type"], "done", "{end}");
    daemon.stop().await;
}
