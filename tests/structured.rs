//! Constrained output with the default model, through a running daemon: an IoT command
//! schema held over the socket and MQTT at temperature 1 (checked by a real JSON Schema
//! validator), a regular expression and a Lark grammar, each over many seeds.

mod common;

use common::daemon::*;
use common::*;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{json, Value};

const DEVICE: &str = "structured";
const SEEDS: u64 = 50;

fn iot_schema() -> Value {
    read_json(repo().join("tests/structured/iot_command.schema.json"))
}

/// What a device would send: the system prompt describes the schema (the model chooses
/// better), the constraint guarantees the shape.
fn iot_request(id: &str, seed: u64) -> Value {
    json!({
        "id": id,
        "system": "You control a smart home. Answer with one JSON object: device (kitchen_light, \
                   porch_light, thermostat or fan), on (true or false), level (0 to 100) and \
                   optionally a short note.",
        "prompt": "It is getting dark, turn the porch light on, not too bright.",
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 64,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "iot_command", "schema": iot_schema(),
                                            "strict": true}},
    })
}

/// The text of a non-streamed request's done event, which must end by the grammar (stop).
fn finished_text(what: &str, end: &Value) -> String {
    assert_eq!(end["type"], "done", "{what}: {end}");
    assert_eq!(end["finish_reason"], "stop", "{what}: {end}");
    end["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iot_schema_holds_for_fifty_seeds_over_the_socket_and_mqtt() {
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::start(default_model_dir(), |c| {
        on_broker(c, port, DEVICE);
    })
    .await;
    // Not the device id as client id: the daemon's own client goes by that.
    let (client, mut rx) = device_client(port, "structured-client", DEVICE).await;
    let mut socket = daemon.connect().await;
    let (mut over_socket, mut over_mqtt) = (Vec::new(), Vec::new());
    for seed in 0..SEEDS {
        let id = format!("s{seed}");
        let mut request = iot_request(&id, seed);
        request["stream"] = json!(false);
        socket.send(request.clone()).await;
        let end = socket.until_end(&id).await.pop().unwrap();
        over_socket.push(finished_text(&id, &end));

        let id = format!("m{seed}");
        request["id"] = json!(id);
        client
            .publish(
                format!("emberd/{DEVICE}/request"),
                QoS::AtLeastOnce,
                false,
                request.to_string(),
            )
            .await
            .unwrap();
        let end = end_on(&mut rx, &format!("emberd/{DEVICE}/response/{id}")).await;
        over_mqtt.push(finished_text(&id, &end));
    }
    // The same seed gives the same answer on either transport.
    assert_eq!(over_socket, over_mqtt);
    let distinct: std::collections::BTreeSet<_> = over_socket.iter().collect();
    eprintln!(
        "{} distinct answers, e.g. {:?}",
        distinct.len(),
        over_socket[0]
    );
    assert!(
        distinct.len() > 1,
        "temperature 1 over 50 seeds: {distinct:?}"
    );
    assert_valid("socket", &iot_schema(), &over_socket);
    assert_valid("mqtt", &iot_schema(), &over_mqtt);
    daemon.stop().await;
}

/// Streams request `id` over the socket and returns its text, checking that the token events
/// add up to what the grammar accepted.
async fn streamed(socket: &mut Client, request: Value) -> String {
    let id = request["id"].as_str().unwrap().to_string();
    socket.send(request).await;
    let events = socket.until_end(&id).await;
    let end = events.last().unwrap();
    assert_eq!(end["type"], "done", "{id}: {end}");
    assert_eq!(end["finish_reason"], "stop", "{id}: {end}");
    text_of(&events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regex_and_a_lark_grammar_hold_for_twenty_seeds() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut socket = daemon.connect().await;
    let lark = r#"
        start: "set " device " to " level
        device: "fan" | "heater" | "pump"
        level: /[1-9][0-9]?/
    "#;
    let mut seen = Vec::new();
    for seed in 0..20u64 {
        let text = streamed(
            &mut socket,
            json!({"id": format!("rx{seed}"), "prompt": "Is the porch light on or off?",
                   "temperature": 1.0, "seed": seed, "max_tokens": 8,
                   "response_format": {"type": "regex", "regex": "^(on|off)$"}}),
        )
        .await;
        assert!(text == "on" || text == "off", "seed {seed}: {text:?}");

        let text = streamed(
            &mut socket,
            json!({"id": format!("lk{seed}"), "prompt": "Tell the pump controller what to do.",
                   "temperature": 1.0, "seed": seed, "max_tokens": 16,
                   "response_format": {"type": "lark", "lark": lark}}),
        )
        .await;
        let rest = text
            .strip_prefix("set ")
            .unwrap_or_else(|| panic!("{text:?}"));
        let (device, level) = rest
            .split_once(" to ")
            .unwrap_or_else(|| panic!("{text:?}"));
        assert!(["fan", "heater", "pump"].contains(&device), "{text:?}");
        let level: u32 = level.parse().unwrap_or_else(|_| panic!("{text:?}"));
        assert!((1..100).contains(&level), "{text:?}");
        seen.push(text);
    }
    eprintln!("lark outputs: {seen:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_mid_value_ends_with_length_and_a_bad_grammar_is_named() {
    let daemon = Daemon::start(default_model_dir(), |_| {}).await;
    let mut socket = daemon.connect().await;
    // Two tokens cannot finish this object: the text is cut, and says so.
    let mut request = iot_request("cut", 1);
    request["max_tokens"] = json!(2);
    socket.send(request).await;
    let events = socket.until_end("cut").await;
    let end = events.last().unwrap();
    assert_eq!(end["finish_reason"], "length", "{end}");
    assert!(serde_json::from_str::<Value>(&text_of(&events)).is_err());

    for (format, names) in [
        (
            json!({"type": "json_schema", "json_schema": {"schema":
                {"type": "object", "properties": {"a": {"type": "bogus"}}}}}),
            "bogus",
        ),
        (json!({"type": "regex", "regex": "(on|off"}), "regex"),
        (
            json!({"type": "lark", "lark": "start: missing_rule"}),
            "missing_rule",
        ),
        (json!({"type": "xml"}), "xml"),
    ] {
        socket
            .send(json!({"id": "bad", "prompt": "Hi", "response_format": format}))
            .await;
        let end = socket.until_end("bad").await.pop().unwrap();
        assert_eq!(end["code"], "bad_request", "{format}: {end}");
        let message = end["message"].as_str().unwrap();
        assert!(message.contains(names), "{format}: {message}");
    }
    daemon.stop().await;
}
