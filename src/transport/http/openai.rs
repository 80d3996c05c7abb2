//! The OpenAI-compatible routes: `/v1/chat/completions` and `/v1/completions`, streaming
//! (SSE `data:` chunks, `[DONE]` last) or whole, and `/v1/models`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Map, Value};

use super::{events, serves, stop_or_length, unix_now, whole, wire_field, Api, ApiError, Dialect};
use crate::protocol::{Event, FinishReason, Message, Request, ToolCall, Usage};

pub(super) async fn models(State(api): State<Arc<Api>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": api.model, "object": "model", "created": api.created, "owned_by": "emberd"}],
    }))
}

/// Which OpenAI route a request came in on: the shapes of their answers differ.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

pub(super) async fn chat_completions(
    State(api): State<Arc<Api>>,
    body: axum::body::Bytes,
) -> Response {
    serve(api, body, Kind::Chat).await
}

pub(super) async fn completions(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    serve(api, body, Kind::Completion).await
}

/// What the OpenAI body asks of the answer, beyond the `Request`.
struct Wanted {
    stream: bool,
    include_usage: bool,
}

async fn serve(api: Arc<Api>, body: axum::body::Bytes, kind: Kind) -> Response {
    let accepted_at = Instant::now();
    let started = async {
        let (request, wanted) = api
            .check_size(&body)
            .and_then(|()| openai_request(&body, kind, &api.model))
            .map_err(|e| api.refused(e))?;
        let (first, rx) = api.start(request, accepted_at).await?;
        Ok::<_, ApiError>((wanted, first, rx))
    };
    let (wanted, first, rx) = match started.await {
        Ok(started) => started,
        Err(e) => return e.respond(Dialect::OpenAi),
    };
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    let frame = Frame {
        id: format!("{prefix}-{}", first.id()),
        model: api.model.clone(),
        created: unix_now(),
        kind,
    };
    let events = events(first, rx);
    if wanted.stream {
        stream_response(frame, events, wanted.include_usage).into_response()
    } else {
        whole_response(frame, events).await
    }
}

/// The parts every chunk and response repeats.
struct Frame {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
}

impl Frame {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One streamed chunk: a piece of text, and the finish reason on the last one.
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(text) = text {
                    delta.insert("content".into(), json!(text));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [choice]})
    }

    /// The chunk that carries a tool call, whole (a client joins argument pieces; here
    /// there is one).
    fn tool_calls_chunk(&self, calls: &[ToolCall]) -> Value {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let mut call = tool_call_json(call);
                call["index"] = json!(index);
                call
            })
            .collect();
        let choice = json!({"index": 0, "delta": {"tool_calls": calls}, "logprobs": null,
                            "finish_reason": null});
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [choice]})
    }

    fn usage_chunk(&self, usage: &Usage) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [], "usage": usage_json(usage)})
    }
}

/// A call as OpenAI writes it: the arguments as a string of JSON.
fn tool_call_json(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function",
           "function": {"name": call.function.name,
                        "arguments": call.function.arguments.to_string()}})
}

/// OpenAI's finish reasons: `stop`, `length`, and `tool_calls` for a call.
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::ToolCalls => "tool_calls",
        reason => stop_or_length(reason),
    }
}

fn usage_json(usage: &Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    })
}

/// The SSE stream: the role first (chat), a chunk per piece of text, one chunk with the
/// finish reason, the usage chunk when asked for, `[DONE]` last. An error after the first
/// token is an error object in the stream (the status is already sent).
fn stream_response(
    frame: Frame,
    events: impl Stream<Item = Event> + Send + 'static,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let frame = Arc::new(frame);
    let role = (frame.kind == Kind::Chat).then(|| frame.chunk(Some(""), true, None));
    let chunks = events.flat_map(move |event| {
        let chunks = match event {
            Event::Token { text, .. } => vec![frame.chunk(Some(&text), false, None)],
            Event::Done {
                finish_reason: reason,
                usage,
                tool_calls,
                ..
            } => {
                let mut last: Vec<Value> = tool_calls
                    .iter()
                    .map(|calls| frame.tool_calls_chunk(calls))
                    .collect();
                last.push(frame.chunk(None, false, Some(finish_reason(reason))));
                if include_usage {
                    last.push(frame.usage_chunk(&usage));
                }
                last
            }
            Event::Error { code, message, .. } => {
                vec![ApiError::from_event(code, message).body(Dialect::OpenAi)]
            }
        };
        futures_util::stream::iter(chunks.into_iter().map(|c| c.to_string()))
    });
    let all = futures_util::stream::iter(role.map(|c| c.to_string()))
        .chain(chunks)
        .chain(futures_util::stream::iter(["[DONE]".to_string()]));
    Sse::new(all.map(|data| Ok(SseEvent::default().data(data))))
}

async fn whole_response(frame: Frame, events: impl Stream<Item = Event>) -> Response {
    let w = match whole(events).await {
        Ok(w) => w,
        Err(e) => return e.respond(Dialect::OpenAi),
    };
    let finish = finish_reason(w.finish_reason);
    let choice = match frame.kind {
        Kind::Chat => {
            let message = match &w.tool_calls {
                Some(calls) => json!({"role": "assistant", "content": null,
                    "tool_calls": calls.iter().map(tool_call_json).collect::<Vec<_>>()}),
                None => json!({"role": "assistant", "content": w.text}),
            };
            json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": w.text, "logprobs": null, "finish_reason": finish})
        }
    };
    Json(
        json!({"id": frame.id, "object": frame.object(false), "created": frame.created,
        "model": frame.model, "choices": [choice], "usage": usage_json(&w.usage)}),
    )
    .into_response()
}

/// Maps an OpenAI body to emberd's `Request`, refusing what would be silently ignored.
fn openai_request(body: &[u8], kind: Kind, model: &str) -> Result<(Request, Wanted), ApiError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let Value::Object(fields) = body else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    let mut request = Request::default();
    let mut wanted = Wanted {
        stream: false,
        include_usage: false,
    };
    for (name, value) in &fields {
        let wrong =
            |what: &str| ApiError::bad_request(format!("{name} must be {what}, got {value}"));
        match (name.as_str(), value) {
            ("model", Value::String(m)) => {
                if !serves(model, m) {
                    return Err(ApiError::not_found(
                        "model_not_found",
                        format!(
                            "the model {m:?} does not exist; this server has {:?}",
                            model
                        ),
                    ));
                }
            }
            ("model", Value::Null) => {}
            ("model", _) => return Err(wrong("a string")),
            ("messages", _) if kind == Kind::Chat => request.messages = Some(messages(value)?),
            ("prompt", _) if kind == Kind::Completion => {
                request.prompt = Some(match value {
                    Value::String(p) => p.clone(),
                    Value::Array(list) if list.len() == 1 && list[0].is_string() => {
                        list[0].as_str().unwrap_or_default().to_string()
                    }
                    _ => return Err(wrong("a string (one prompt per request)")),
                });
                request.raw = true;
            }
            ("max_tokens" | "max_completion_tokens", Value::Null) => {}
            ("max_tokens" | "max_completion_tokens", v) => {
                let n = v.as_u64().ok_or_else(|| wrong("a positive integer"))?;
                request.max_tokens = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
            ("temperature", Value::Null) | ("top_p", Value::Null) | ("seed", Value::Null) => {}
            ("temperature", v) => {
                request.temperature = Some(v.as_f64().ok_or_else(|| wrong("a number"))? as f32)
            }
            ("top_p", v) => {
                request.top_p = Some(v.as_f64().ok_or_else(|| wrong("a number"))? as f32)
            }
            ("seed", v) => {
                request.seed = Some(v.as_i64().ok_or_else(|| wrong("an integer"))? as u64)
            }
            ("stop", Value::Null) => {}
            ("stop", Value::String(s)) => request.stop = Some(vec![s.clone()]),
            ("stop", Value::Array(list)) => {
                let stops: Option<Vec<String>> = list
                    .iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect();
                request.stop = Some(stops.ok_or_else(|| wrong("a string or a list of strings"))?);
            }
            ("stop", _) => return Err(wrong("a string or a list of strings")),
            ("stream", Value::Bool(b)) => wanted.stream = *b,
            ("stream", Value::Null) => {}
            ("stream", _) => return Err(wrong("true or false")),
            ("stream_options", Value::Null) => {}
            ("stream_options", Value::Object(options)) => {
                for (option, v) in options {
                    match (option.as_str(), v) {
                        ("include_usage", Value::Bool(b)) => wanted.include_usage = *b,
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "stream_options.{option} is not supported"
                            )))
                        }
                    }
                }
            }
            // Harmless: they change nothing about the text.
            ("user" | "store" | "metadata" | "service_tier" | "parallel_tool_calls", _) => {}
            ("n" | "best_of", v) if v.is_null() || v.as_u64() == Some(1) => {}
            ("logprobs" | "echo", v) if v.is_null() || *v == Value::Bool(false) => {}
            ("top_logprobs" | "suffix", Value::Null) => {}
            ("presence_penalty" | "frequency_penalty", v)
                if v.is_null() || v.as_f64() == Some(0.0) => {}
            ("response_format", Value::Null) => {}
            // The same object as emberd's own field.
            ("response_format", v) => {
                request.response_format = Some(wire_field("response_format", v)?)
            }
            ("tools" | "tool_choice", Value::Null) => {}
            // emberd's own fields have OpenAI's shapes.
            ("tools", v) if kind == Kind::Chat => request.tools = Some(wire_field("tools", v)?),
            ("tool_choice", v) if kind == Kind::Chat => {
                request.tool_choice = Some(wire_field("tool_choice", v)?)
            }
            // The deprecated form of tools, with nothing in it.
            ("functions", v) if v.is_null() || v.as_array().is_some_and(|a| a.is_empty()) => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{name} = {value} is not supported by this server (it would change the output)"
                )))
            }
        }
    }
    match kind {
        Kind::Chat if request.messages.is_none() => {
            return Err(ApiError::bad_request("messages is required"))
        }
        Kind::Completion if request.prompt.is_none() => {
            return Err(ApiError::bad_request("prompt is required"))
        }
        _ => {}
    }
    // emberd streams by itself; a whole answer is collected here from the one done event.
    request.stream = Some(wanted.stream);
    Ok((request, wanted))
}

/// `openai_request` without what it asks of the answer, for `super::decode_body`.
pub(super) fn decode(body: &[u8], kind: Kind, model: &str) -> Result<Request, ApiError> {
    openai_request(body, kind, model).map(|(request, _)| request)
}

/// OpenAI's messages: `content` is a string or a list of text parts.
fn messages(value: &Value) -> Result<Vec<Message>, ApiError> {
    let list = value
        .as_array()
        .ok_or_else(|| ApiError::bad_request("messages must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad_request(format!("messages[{i}].role is required")))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => {
                                return Err(ApiError::bad_request(format!(
                                    "messages[{i}].content: only text parts are supported"
                                )))
                            }
                        }
                    }
                    text
                }
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                    "messages[{i}].content must be a string or a list of text parts, got {other}"
                )))
                }
            };
            // The developer role is OpenAI's newer name for system.
            let role = if role == "developer" { "system" } else { role };
            let mut message = Message::new(role, content);
            let text = |field: &str| m.get(field).and_then(Value::as_str).map(str::to_string);
            message.tool_call_id = text("tool_call_id");
            message.name = text("name");
            message.tool_calls = match m.get("tool_calls") {
                None | Some(Value::Null) => None,
                Some(calls) => Some(wire_field(&format!("messages[{i}].tool_calls"), calls)?),
            };
            Ok(message)
        })
        .collect()
}
