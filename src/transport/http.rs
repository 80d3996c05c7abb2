//! HTTP (axum): the OpenAI-compatible routes `/v1/chat/completions`, `/v1/completions` and
//! `/v1/models`, and `/health`. Framing only: a body becomes a `Request` for the one ingress,
//! its events become an OpenAI response (JSON) or stream (SSE `data:` chunks, `[DONE]` last).
//!
//! A field that would change the output and that emberd cannot honour is a 400 naming it,
//! never silently ignored; harmless ones (`user`, `n: 1`, `logprobs: false`...) are accepted.
//! A client that goes away cancels its request (the ingress sees its reply channel close).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::HttpConfig;
use crate::ingress::{Ingress, Intent, Origin, Scope};
use crate::protocol::{ErrorCode, Event, FinishReason, Message, Request, Usage};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http: cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
    #[error("http: cannot read api_key_file {path}: {source}")]
    ApiKey {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("http: api_key_file {0} is empty")]
    EmptyApiKey(std::path::PathBuf),
}

struct Api {
    ingress: Ingress,
    model: String,
    api_key: Option<String>,
    shutdown: Shutdown,
    created: u64,
}

pub struct Server {
    listener: TcpListener,
    api: Arc<Api>,
    connections: Arc<Semaphore>,
    shutdown: Shutdown,
}

impl Server {
    /// Binds `config.listen` and reads the API key, so that start fails clearly.
    pub async fn bind(
        config: &HttpConfig,
        ingress: Ingress,
        shutdown: Shutdown,
    ) -> Result<Server, HttpError> {
        let api_key = match &config.api_key_file {
            None => None,
            Some(path) => {
                let key = std::fs::read_to_string(path)
                    .map_err(|source| HttpError::ApiKey {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string();
                if key.is_empty() {
                    return Err(HttpError::EmptyApiKey(path.clone()));
                }
                Some(key)
            }
        };
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| HttpError::Listen {
                    listen: config.listen.clone(),
                    source,
                })?;
        let model = ingress.scheduler().model_name().to_string();
        Ok(Server {
            listener,
            api: Arc::new(Api {
                ingress,
                model,
                api_key,
                shutdown: shutdown.clone(),
                created: unix_now(),
            }),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            shutdown,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until shutdown; streams in flight end with their requests (the drain).
    pub async fn run(self) {
        let api = self.api.clone();
        let app = Router::new()
            .route("/health", get(health))
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(api.clone(), authorize))
            .with_state(api);
        let listener = Limited {
            inner: self.listener,
            permits: self.connections,
        };
        let mut shutdown = self.shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            log::warn!("http: the server stopped: {e}");
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Accepts connections while fewer than `max_connections` are open; a connection over the
/// limit gets a 503 at once and is closed, instead of waiting in the kernel's backlog.
struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

/// A connection and its place among the `max_connections`.
struct Counted {
    stream: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl axum::serve::Listener for Limited {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (mut stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    log::warn!("http: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    return (
                        Counted {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    )
                }
                Err(_) => {
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let body = r#"{"error":{"message":"too many connections; try again later","type":"server_error","code":"busy"}}"#;
                        let reply = format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(reply.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "code"}}`.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    fn from_event(code: ErrorCode, message: String) -> Self {
        let (status, code) = match code {
            ErrorCode::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorCode::TooLong => (StatusCode::PAYLOAD_TOO_LARGE, "too_long"),
            ErrorCode::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
            ErrorCode::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError {
            status,
            code,
            message,
        }
    }

    fn body(&self) -> Value {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn authorize(
    State(api): State<Arc<Api>>,
    request: HttpRequest,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &api.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if request.uri().path() != "/health" && given != Some(key.as_str()) {
            return Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                code: "invalid_api_key",
                message: "a valid API key is needed: Authorization: Bearer <key>".into(),
            });
        }
    }
    Ok(next.run(request).await)
}

async fn not_found(request: HttpRequest) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("no route {} {}", request.method(), request.uri().path()),
    }
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    if api.shutdown.is_triggered() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

async fn models(State(api): State<Arc<Api>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": api.model, "object": "model", "created": api.created, "owned_by": "emberd"}],
    }))
}

/// Which OpenAI route a request came in on: the shapes of their answers differ.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    serve(api, body, Kind::Chat).await
}

async fn completions(State(api): State<Arc<Api>>, body: axum::body::Bytes) -> Response {
    serve(api, body, Kind::Completion).await
}

/// What the OpenAI body asks of the answer, beyond the `Request`.
struct Wanted {
    stream: bool,
    include_usage: bool,
}

async fn serve(api: Arc<Api>, body: axum::body::Bytes, kind: Kind) -> Response {
    let accepted_at = Instant::now();
    let limit = api.ingress.max_request_bytes();
    if body.len() > limit {
        let message = format!(
            "request of {} bytes exceeds max_request_bytes = {limit}",
            body.len()
        );
        return ApiError::from_event(ErrorCode::TooLong, message).into_response();
    }
    let (request, wanted) = match openai_request(&body, kind, &api.model) {
        Ok(parsed) => parsed,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let origin = Origin {
        transport: "http",
        scope: &Scope::default(),
        intent: Intent::Any,
    };
    api.ingress
        .handle_request(request, accepted_at, origin, |_| tx);
    // The first event decides the status: an error before any token is an HTTP error.
    let Some(first) = rx.recv().await else {
        return ApiError::from_event(
            ErrorCode::Internal,
            "the request ended without an answer".into(),
        )
        .into_response();
    };
    if let Event::Error { code, message, .. } = first {
        return ApiError::from_event(code, message).into_response();
    }
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        first.id()
    );
    let frame = Frame {
        id,
        model: api.model.clone(),
        created: unix_now(),
        kind,
    };
    if wanted.stream {
        stream_response(frame, first, rx, wanted.include_usage).into_response()
    } else {
        whole_response(frame, first, rx).await
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

    fn usage_chunk(&self, usage: &Usage) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [], "usage": usage_json(usage)})
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

/// OpenAI's finish reasons: a stop sequence is `stop`; a request cut short by its deadline
/// or cancelled is `length` (it did not end on its own).
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence => "stop",
        FinishReason::Length | FinishReason::Cancelled | FinishReason::Timeout => "length",
    }
}

fn stream_response(
    frame: Frame,
    first: Event,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut queue = std::collections::VecDeque::new();
    // The first chunk carries the role (chat) and no text.
    if frame.kind == Kind::Chat {
        queue.push_back(frame.chunk(Some(""), true, None).to_string());
    }
    let state = Streaming {
        frame,
        pending: Some(first),
        rx,
        include_usage,
        queue,
        finished: false,
    };
    Sse::new(futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(chunk) = st.queue.pop_front() {
                return Some((Ok(SseEvent::default().data(chunk)), st));
            }
            if st.finished {
                return None;
            }
            let event = match st.pending.take() {
                Some(event) => Some(event),
                None => st.rx.recv().await,
            };
            match event {
                Some(Event::Token { text, .. }) => {
                    st.queue
                        .push_back(st.frame.chunk(Some(&text), false, None).to_string());
                    continue;
                }
                Some(Event::Done {
                    finish_reason: reason,
                    usage,
                    ..
                }) => {
                    let last = st.frame.chunk(None, false, Some(finish_reason(reason)));
                    st.queue.push_back(last.to_string());
                    if st.include_usage {
                        st.queue.push_back(st.frame.usage_chunk(&usage).to_string());
                    }
                }
                Some(Event::Error { code, message, .. }) => {
                    st.queue
                        .push_back(ApiError::from_event(code, message).body().to_string());
                }
                None => {}
            }
            st.queue.push_back("[DONE]".to_string());
            st.finished = true;
        }
    }))
}

/// Where an SSE stream is: chunks ready to send, and the events still to come.
struct Streaming {
    frame: Frame,
    pending: Option<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    /// `data:` payloads ready to send.
    queue: std::collections::VecDeque<String>,
    finished: bool,
}

async fn whole_response(
    frame: Frame,
    first: Event,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let mut text = String::new();
    let mut next = Some(first);
    while let Some(event) = next.take() {
        match event {
            Event::Token { text: piece, .. } => text.push_str(&piece),
            Event::Done {
                finish_reason: reason,
                usage,
                text: whole,
                ..
            } => {
                if let Some(whole) = whole {
                    text = whole;
                }
                let choice = match frame.kind {
                    Kind::Chat => json!({"index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null, "finish_reason": finish_reason(reason)}),
                    Kind::Completion => json!({"index": 0, "text": text, "logprobs": null,
                        "finish_reason": finish_reason(reason)}),
                };
                return Json(json!({"id": frame.id, "object": frame.object(false),
                    "created": frame.created, "model": frame.model,
                    "choices": [choice], "usage": usage_json(&usage)}))
                .into_response();
            }
            Event::Error { code, message, .. } => {
                return ApiError::from_event(code, message).into_response()
            }
        }
        next = rx.recv().await;
    }
    ApiError::from_event(
        ErrorCode::Internal,
        "the request ended without an answer".into(),
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
                if m != model {
                    return Err(ApiError {
                        status: StatusCode::NOT_FOUND,
                        code: "model_not_found",
                        message: format!(
                            "the model {m:?} does not exist; this server has {model:?}"
                        ),
                    });
                }
            }
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
            ("response_format", v) if v.is_null() || v.get("type") == Some(&json!("text")) => {}
            ("tool_choice", v) if v.is_null() || *v == json!("none") => {}
            ("tools" | "functions", v)
                if v.is_null() || v.as_array().is_some_and(|a| a.is_empty()) => {}
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
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}
