//! The Ollama-compatible routes, for the clients that speak Ollama's API (Home Assistant's
//! Ollama integration, Open WebUI, the `ollama` client libraries): `/api/chat` and
//! `/api/generate` (NDJSON streaming by default, the last object with `done: true`, the
//! counts and the durations in nanoseconds), `/api/tags`, `/api/ps`, `/api/show`,
//! `/api/version`, and `/api/pull`, which succeeds for the model already here.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};

use super::{events, serves, stop_or_length, whole, wire_field, Api, ApiError, Dialect};
use crate::protocol::{
    Event, FinishReason, Message, Request, ResponseFormat, Timings, ToolCall, Usage,
};

pub(super) async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// What Ollama lists about a model: the package's size on disk and newest file time, its
/// format and family.
fn model_entry(api: &Api) -> Map<String, Value> {
    let package = api.ingress.scheduler().package();
    let files: Vec<std::fs::Metadata> = std::fs::read_dir(&package.dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .collect();
    let size: u64 = files.iter().map(std::fs::Metadata::len).sum();
    let modified = files
        .iter()
        .filter_map(|m| m.modified().ok())
        .max()
        .unwrap_or(UNIX_EPOCH);
    let family = package.family.clone();
    let mut entry = Map::new();
    entry.insert("name".into(), json!(api.model));
    entry.insert("model".into(), json!(api.model));
    entry.insert("modified_at".into(), json!(rfc3339(modified)));
    entry.insert("size".into(), json!(size));
    entry.insert(
        "details".into(),
        json!({
            "parent_model": "",
            "format": "onnx",
            "family": family,
            "families": family.as_slice(),
        }),
    );
    entry
}

pub(super) async fn tags(State(api): State<Arc<Api>>) -> Json<Value> {
    Json(json!({"models": [model_entry(&api)]}))
}

/// The model is always loaded: it never expires, and it lives in host memory.
pub(super) async fn ps(State(api): State<Arc<Api>>) -> Json<Value> {
    let mut entry = model_entry(&api);
    entry.insert("expires_at".into(), json!("2318-01-01T00:00:00Z"));
    entry.insert("size_vram".into(), json!(0));
    entry.insert(
        "context_length".into(),
        json!(api.ingress.prompter().context_len()),
    );
    Json(json!({"models": [entry]}))
}

/// The model named by a body's `model` (or Ollama's older `name`), if it is ours.
fn named_model(api: &Api, body: &[u8]) -> Result<(), ApiError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let name = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("model is required"))?;
    if !serves(&api.model, name) {
        return Err(not_found(name));
    }
    Ok(())
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found("model_not_found", format!("model '{name}' not found"))
}

pub(super) async fn show(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    if let Err(e) = api
        .check_size(&body)
        .and_then(|()| named_model(&api, &body))
    {
        return e.respond(Dialect::Ollama);
    }
    let entry = model_entry(&api);
    let package = api.ingress.scheduler().package();
    let family = package.family.clone().unwrap_or_else(|| "unknown".into());
    let context = api.ingress.prompter().context_len();
    Json(json!({
        "modelfile": format!("# served by emberd from {}\nFROM {}\n", package.dir.display(), api.model),
        "parameters": "",
        "template": package.chat_template.clone().unwrap_or_default(),
        "details": entry["details"],
        "model_info": {
            "general.architecture": family,
            format!("{family}.context_length"): context,
            format!("{family}.block_count"): package.layers,
            format!("{family}.attention.head_count_kv"): package.kv_heads,
            format!("{family}.vocab_size"): package.vocab_size,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": entry["modified_at"],
    }))
    .into_response()
}

/// Models come with the device: pulling the one served succeeds at once, any other is 404.
pub(super) async fn pull(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    match api
        .check_size(&body)
        .and_then(|()| named_model(&api, &body))
    {
        Ok(()) => Json(json!({"status": "success"})).into_response(),
        Err(e) => e.respond(Dialect::Ollama),
    }
}

/// Which generation route a request came in on: their objects differ.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Generate,
}

pub(super) async fn chat(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    serve(api, body, Kind::Chat).await
}

pub(super) async fn generate(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    serve(api, body, Kind::Generate).await
}

async fn serve(api: Arc<Api>, body: axum::body::Bytes, kind: Kind) -> Response {
    let accepted_at = Instant::now();
    let frame = Frame {
        model: api.model.clone(),
        kind,
    };
    let started = async {
        let asked = api
            .check_size(&body)
            .and_then(|()| ollama_request(&body, kind, &api.model))
            .map_err(|e| api.refused(e))?;
        match asked {
            None => Ok(None),
            Some((request, stream)) => {
                let (first, rx) = api.start(request, accepted_at).await?;
                Ok::<_, ApiError>(Some((stream, first, rx)))
            }
        }
    };
    let (stream, first, rx) = match started.await {
        Ok(Some(started)) => started,
        Ok(None) => {
            let mut loaded = frame.object("", true);
            loaded.insert("done_reason".into(), json!("load"));
            return Json(loaded).into_response();
        }
        Err(e) => return e.respond(Dialect::Ollama),
    };
    let events = events(first, rx);
    if stream {
        stream_response(frame, events)
    } else {
        whole_response(frame, events).await
    }
}

/// The parts every object repeats.
struct Frame {
    model: String,
    kind: Kind,
}

impl Frame {
    /// An object carrying a piece of text (a chunk, or the whole answer).
    fn object(&self, text: &str, done: bool) -> Map<String, Value> {
        let mut object = Map::new();
        object.insert("model".into(), json!(self.model));
        object.insert("created_at".into(), json!(rfc3339(SystemTime::now())));
        match self.kind {
            Kind::Chat => object.insert(
                "message".into(),
                json!({"role": "assistant", "content": text}),
            ),
            Kind::Generate => object.insert("response".into(), json!(text)),
        };
        object.insert("done".into(), json!(done));
        object
    }

    /// The object that carries a tool call, streamed before the last one.
    fn tool_calls(&self, calls: &[ToolCall]) -> Value {
        let mut object = self.object("", false);
        if let Some(message) = object.get_mut("message") {
            message["tool_calls"] = tool_calls_json(calls);
        }
        Value::Object(object)
    }

    /// The last object: why it ended, the counts, the durations in nanoseconds.
    fn last(&self, text: &str, reason: FinishReason, usage: &Usage, timings: &Timings) -> Value {
        let ns = |ms: f64| (ms.max(0.0) * 1e6).round() as u64;
        let mut object = self.object(text, true);
        let fields = [
            ("done_reason", json!(stop_or_length(reason))),
            ("total_duration", json!(ns(timings.total_ms))),
            // The model is loaded once, at start: no request waits for it.
            ("load_duration", json!(0)),
            ("prompt_eval_count", json!(usage.prompt_tokens)),
            ("prompt_eval_duration", json!(ns(timings.prefill_ms))),
            ("eval_count", json!(usage.completion_tokens)),
            (
                "eval_duration",
                json!(ns(timings.total_ms - timings.queue_ms - timings.prefill_ms)),
            ),
        ];
        for (name, value) in fields {
            object.insert(name.into(), value);
        }
        Value::Object(object)
    }
}

/// Calls in Ollama's shape: `{"function": {"name", "arguments"}}`, the arguments an object.
fn tool_calls_json(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|c| json!({"function": {"name": c.function.name, "arguments": c.function.arguments}}))
        .collect()
}

/// NDJSON: an object per piece of text, the last with `done: true`. An error after the
/// first token is an `{"error": ...}` line (the status is already sent), as Ollama does.
fn stream_response(frame: Frame, events: impl Stream<Item = Event> + Send + 'static) -> Response {
    let lines = events.map(move |event| {
        let objects = match event {
            Event::Token { text, .. } => vec![Value::Object(frame.object(&text, false))],
            // As Ollama streams a call: an object with the call, then the last one.
            Event::Done {
                finish_reason,
                usage,
                timings,
                tool_calls,
                ..
            } => tool_calls
                .iter()
                .map(|calls| frame.tool_calls(calls))
                .chain([frame.last("", finish_reason, &usage, &timings)])
                .collect(),
            Event::Error { code, message, .. } => {
                vec![ApiError::from_event(code, message).body(Dialect::Ollama)]
            }
        };
        let lines: String = objects.iter().map(|o| format!("{o}\n")).collect();
        Ok::<_, std::convert::Infallible>(lines)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn whole_response(frame: Frame, events: impl Stream<Item = Event>) -> Response {
    match whole(events).await {
        Ok(w) => {
            let mut last = frame.last(&w.text, w.finish_reason, &w.usage, &w.timings);
            if let Some(calls) = &w.tool_calls {
                last["message"]["tool_calls"] = tool_calls_json(calls);
            }
            Json(last).into_response()
        }
        Err(e) => e.respond(Dialect::Ollama),
    }
}

/// Maps an Ollama body to emberd's `Request` and whether to stream, refusing what would be
/// silently ignored. None: nothing to generate from (Ollama's way to load a model).
fn ollama_request(
    body: &[u8],
    kind: Kind,
    served: &str,
) -> Result<Option<(Request, bool)>, ApiError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let Value::Object(fields) = body else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let mut request = Request::default();
    // Ollama streams unless told not to.
    let mut stream = true;
    let mut model = None;
    for (name, value) in &fields {
        let wrong =
            |what: &str| ApiError::bad_request(format!("{name} must be {what}, got {value}"));
        let empty = value.is_null()
            || value.as_str() == Some("")
            || value.as_array().is_some_and(|a| a.is_empty());
        match (name.as_str(), value) {
            ("model", Value::String(m)) => model = Some(m.clone()),
            ("model", _) => return Err(wrong("a string")),
            ("messages", _) if kind == Kind::Chat => {
                if !value.is_null() {
                    request.messages = Some(messages(value)?);
                }
            }
            ("prompt", Value::String(p)) if kind == Kind::Generate => {
                request.prompt = Some(p.clone())
            }
            ("system", Value::String(s)) if kind == Kind::Generate => {
                request.system = Some(s.clone())
            }
            ("raw", Value::Bool(raw)) if kind == Kind::Generate => request.raw = *raw,
            ("stream", Value::Bool(b)) => stream = *b,
            ("stream" | "options" | "prompt" | "system" | "raw", Value::Null) => {}
            ("options", Value::Object(options)) => apply_options(&mut request, options)?,
            // The model stays loaded whatever is asked.
            ("keep_alive", _) => {}
            ("think" | "logprobs", v) if v.is_null() || *v == Value::Bool(false) => {}
            ("top_logprobs", v) if v.is_null() || v.as_u64() == Some(0) => {}
            ("think", _) => {
                return Err(ApiError::bad_request(format!(
                    "{served:?} does not support thinking"
                )))
            }
            ("format" | "tools" | "images" | "suffix" | "template" | "context", _) if empty => {}
            // The same shape as emberd's own field (and OpenAI's). Ollama has no tool_choice:
            // the config's `generation.tool_choice` applies.
            ("tools", _) if kind == Kind::Chat => request.tools = Some(wire_field("tools", value)?),
            ("format", Value::String(f)) if f == "json" => {
                request.response_format = Some(ResponseFormat::JsonObject {})
            }
            // Ollama's structured outputs: the JSON Schema itself.
            ("format", Value::Object(_)) => {
                request.response_format = Some(ResponseFormat::json_schema(value.clone()))
            }
            ("format", _) => return Err(wrong("\"json\" or a JSON Schema object")),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{name} = {value} is not supported by this server (it would change the output)"
                )))
            }
        }
    }
    let model = model.ok_or_else(|| ApiError::bad_request("model is required"))?;
    if !serves(served, &model) {
        return Err(not_found(&model));
    }
    // Nothing to generate from: Ollama answers that the model is loaded.
    let nothing = match kind {
        Kind::Chat => request.messages.as_ref().is_none_or(|m| m.is_empty()),
        Kind::Generate => {
            request.prompt.as_deref().unwrap_or_default().is_empty() && request.system.is_none()
        }
    };
    if nothing {
        return Ok(None);
    }
    if kind == Kind::Generate && request.prompt.is_none() {
        request.prompt = Some(String::new());
    }
    request.stream = Some(stream);
    Ok(Some((request, stream)))
}

/// `ollama_request` without the stream flag, for `super::decode_body`.
pub(super) fn decode(body: &[u8], kind: Kind, model: &str) -> Result<Option<Request>, ApiError> {
    ollama_request(body, kind, model).map(|asked| asked.map(|(request, _)| request))
}

/// Ollama's `options`: the sampling ones map onto the request; the ones about how the model
/// runs (threads, batch, context size...) change nothing about the text and are accepted.
fn apply_options(request: &mut Request, options: &Map<String, Value>) -> Result<(), ApiError> {
    for (name, value) in options {
        let wrong = |what: &str| {
            ApiError::bad_request(format!("options.{name} must be {what}, got {value}"))
        };
        let number = || value.as_f64().ok_or_else(|| wrong("a number"));
        if value.is_null() {
            continue;
        }
        match name.as_str() {
            // -1 (no limit) and -2 (fill the context) leave the server's cap.
            "num_predict" => {
                let n = value.as_i64().ok_or_else(|| wrong("an integer"))?;
                if n >= 0 {
                    request.max_tokens = Some(u32::try_from(n).unwrap_or(u32::MAX));
                }
            }
            "temperature" => request.temperature = Some(number()? as f32),
            "top_p" => request.top_p = Some(number()? as f32),
            "min_p" => request.min_p = Some(number()? as f32),
            "top_k" => {
                let k = value.as_u64().ok_or_else(|| wrong("a non-negative integer"))?;
                request.top_k = Some(u32::try_from(k).unwrap_or(u32::MAX));
            }
            "repeat_penalty" => request.repetition_penalty = Some(number()? as f32),
            "seed" => request.seed = Some(value.as_i64().ok_or_else(|| wrong("an integer"))? as u64),
            "stop" => {
                let stops: Option<Vec<String>> = value
                    .as_array()
                    .map(|l| l.iter().map(|s| s.as_str().map(str::to_string)).collect())
                    .unwrap_or_else(|| value.as_str().map(|s| vec![s.to_string()]));
                request.stop = Some(stops.ok_or_else(|| wrong("a list of strings"))?);
            }
            // How the model runs, not what it says; the context is the model's own.
            "num_ctx" | "num_batch" | "num_gpu" | "main_gpu" | "num_thread" | "use_mmap"
            | "use_mlock" | "low_vram" | "numa" | "vocab_only" | "num_keep" => {}
            // Neutral values of samplers emberd does not have.
            "presence_penalty" | "frequency_penalty" | "mirostat" if number()? == 0.0 => {}
            "typical_p" | "tfs_z" if number()? == 1.0 => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "options.{name} = {value} is not supported by this server (it would change the output)"
                )))
            }
        }
    }
    Ok(())
}

/// Ollama's messages: text content, an assistant's tool calls (the arguments an object), a
/// tool's result (`tool_name` names the function); images are not served.
fn messages(value: &Value) -> Result<Vec<Message>, ApiError> {
    let list = value
        .as_array()
        .ok_or_else(|| ApiError::bad_request("messages must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(fields) = m else {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}] must be an object"
                )));
            };
            let mut role = None;
            let mut content = String::new();
            let mut tool_calls = None;
            let mut tool_name = None;
            for (name, value) in fields {
                let empty = value.is_null()
                    || value.as_str() == Some("")
                    || value.as_array().is_some_and(|a| a.is_empty());
                match (name.as_str(), value) {
                    ("role", Value::String(r)) => role = Some(r.clone()),
                    ("content", Value::String(c)) => content = c.clone(),
                    ("content", Value::Null) => {}
                    // A thinking model's reasoning in history; templates leave it out.
                    ("thinking", _) => {}
                    ("images" | "tool_calls" | "tool_name", _) if empty => {}
                    ("tool_calls", _) => {
                        let field = format!("messages[{i}].tool_calls");
                        tool_calls = Some(wire_field::<Vec<ToolCall>>(&field, value)?)
                    }
                    ("tool_name", Value::String(n)) => tool_name = Some(n.clone()),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}].{name} = {value} is not supported by this server"
                        )))
                    }
                }
            }
            let role = role
                .ok_or_else(|| ApiError::bad_request(format!("messages[{i}].role is required")))?;
            let mut message = Message::new(role, content);
            message.tool_calls = tool_calls;
            message.name = tool_name;
            Ok(message)
        })
        .collect()
}

/// RFC 3339 in UTC with nanoseconds, as Ollama writes its times.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60,
        since.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        // 2024-02-29 12:34:56.5 UTC: a leap day.
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_500);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.500000000Z");
    }
}
