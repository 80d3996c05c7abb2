//! HTTP (axum): the OpenAI-compatible API (`openai`), the Ollama-compatible API (`ollama`),
//! the device page (`page`), `/health`, `/status` and `/metrics`. Framing only: a body
//! becomes a `Request` for the one ingress, and its events become that API's answer.
//!
//! On both APIs a field that would change the output and that emberd cannot honour is a 400
//! naming it, never silently ignored; harmless ones are accepted. A client that goes away
//! cancels its request (the ingress sees its reply channel close).

mod ollama;
mod openai;
mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::config::HttpConfig;
use crate::ingress::{Ingress, Intent, Origin, Scope};
use crate::protocol::{ErrorCode, Event, FinishReason, Request, Timings, ToolCall, Usage};
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http: cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
    #[error("http.api_key_file: {0}")]
    ApiKey(#[from] crate::secret::SecretError),
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
                let key = crate::secret::read_secret(path)?.trim().to_string();
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
            .route("/", get(page::page))
            .route("/health", get(health))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(openai::models))
            .route("/v1/chat/completions", post(openai::chat_completions))
            .route("/v1/completions", post(openai::completions))
            .route("/api/version", get(ollama::version).head(ollama::version))
            .route("/api/tags", get(ollama::tags))
            .route("/api/ps", get(ollama::ps))
            .route("/api/show", post(ollama::show))
            .route("/api/pull", post(ollama::pull))
            .route("/api/chat", post(ollama::chat))
            .route("/api/generate", post(ollama::generate))
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

/// What a request whose events stop before a terminal one is answered (never expected).
const NO_ANSWER: &str = "the request ended without an answer";

/// An error as either API shapes it: OpenAI's `{"error": {"message", "type", "code"}}` or
/// Ollama's `{"error": "message"}`, with the same status.
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// Which API a route belongs to: its errors take that API's shape.
#[derive(Clone, Copy, PartialEq)]
enum Dialect {
    OpenAi,
    Ollama,
}

impl Dialect {
    fn of_path(path: &str) -> Dialect {
        if path.starts_with("/api/") {
            Dialect::Ollama
        } else {
            Dialect::OpenAi
        }
    }
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }

    fn not_found(code: &'static str, message: String) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code,
            message,
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

    /// The answer to a request whose events stopped before a terminal one (never expected).
    fn no_answer() -> Self {
        ApiError::from_event(ErrorCode::Internal, NO_ANSWER.into())
    }

    fn body(&self, dialect: Dialect) -> Value {
        match dialect {
            Dialect::Ollama => json!({"error": self.message}),
            Dialect::OpenAi => {
                let kind = if self.status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                };
                json!({"error": {"message": self.message, "type": kind, "code": self.code}})
            }
        }
    }

    fn respond(self, dialect: Dialect) -> Response {
        let mut response = (self.status, Json(self.body(dialect))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Routes that answer without a key: the load balancer's probe, and the device page, which
/// is static (its data comes from the routes that need the key, which it asks for).
fn is_public(path: &str) -> bool {
    path == "/health" || path == "/"
}

async fn authorize(State(api): State<Arc<Api>>, request: HttpRequest, next: Next) -> Response {
    if let Some(key) = &api.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let path = request.uri().path();
        if !is_public(path) && given != Some(key.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                code: "invalid_api_key",
                message: "a valid API key is needed: Authorization: Bearer <key>".into(),
            }
            .respond(Dialect::of_path(path));
        }
    }
    next.run(request).await
}

async fn not_found(request: HttpRequest) -> Response {
    let path = request.uri().path();
    ApiError::not_found("not_found", format!("no route {} {path}", request.method()))
        .respond(Dialect::of_path(path))
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

/// What the device page shows: the model, the engine and the queue, now.
async fn status(State(api): State<Arc<Api>>) -> Json<Value> {
    let scheduler = api.ingress.scheduler();
    let engine = scheduler.engine();
    let stats = scheduler.stats();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({
        "model": scheduler.model_name(),
        "engine": engine.engine,
        "provider": engine.provider,
        "threads": engine.threads,
        "fallback_reason": engine.fallback_reason,
        "context_length": api.ingress.prompter().context_len(),
        "queue_depth": scheduler.queue_depth(),
        "running": stats.running.load(std::sync::atomic::Ordering::Relaxed),
        "max_batch": stats.max_batch.load(std::sync::atomic::Ordering::Relaxed),
        "served": load(&stats.served),
        "cancelled": load(&stats.cancelled),
        "rejected_busy": load(&stats.rejected_busy),
        "uptime_s": scheduler.uptime().as_secs(),
        "draining": api.shutdown.is_triggered(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let text = api.ingress.metrics().encode(api.ingress.scheduler());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Whether `name` is the model served: the package's name, with Ollama's `:latest` tag or
/// without it.
fn serves(model: &str, name: &str) -> bool {
    name == model || name.strip_suffix(":latest") == Some(model)
}

/// Decodes a body as the route at `path` does before it reaches the ingress (None: the
/// route has nothing to generate, or `path` takes no body). What the fuzz target drives.
pub fn decode_body(path: &str, body: &[u8], model: &str) -> Result<Option<Request>, String> {
    let refused = |e: ApiError| format!("{} {}: {}", e.status, e.code, e.message);
    match path {
        "/v1/chat/completions" => openai::decode(body, openai::Kind::Chat, model).map(Some),
        "/v1/completions" => openai::decode(body, openai::Kind::Completion, model).map(Some),
        "/api/chat" => ollama::decode(body, ollama::Kind::Chat, model),
        "/api/generate" => ollama::decode(body, ollama::Kind::Generate, model),
        _ => return Ok(None),
    }
    .map_err(refused)
}

impl Api {
    /// Hands a decoded request to the ingress and waits for its first event: an error there
    /// (invalid, too long, busy...) becomes this API's error; else the events follow.
    async fn start(
        &self,
        request: Request,
        accepted_at: Instant,
    ) -> Result<(Event, mpsc::UnboundedReceiver<Event>), ApiError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
        let origin = Origin {
            transport: "http",
            scope: &Scope::default(),
            intent: Intent::Any,
        };
        self.ingress
            .handle_request(request, accepted_at, origin, |_| tx);
        match rx.recv().await {
            None => Err(ApiError::no_answer()),
            Some(Event::Error { code, message, .. }) => Err(ApiError::from_event(code, message)),
            Some(first) => Ok((first, rx)),
        }
    }

    /// Counts in the metrics a request refused here, before the ingress (which counts its
    /// own refusals), so that every transport's refusals are counted alike.
    fn refused(&self, e: ApiError) -> ApiError {
        self.ingress.metrics().record_refusal("http", e.code);
        e
    }

    /// The size check every route with a body makes before parsing it.
    fn check_size(&self, body: &[u8]) -> Result<(), ApiError> {
        match self.ingress.oversize(body.len()) {
            Some(message) => Err(ApiError::from_event(ErrorCode::TooLong, message)),
            None => Ok(()),
        }
    }
}

/// A request's events as a stream, from the first to the terminal one; a channel that closes
/// before a terminal event ends with an internal error, so every stream ends with one.
fn events(first: Event, rx: mpsc::UnboundedReceiver<Event>) -> impl Stream<Item = Event> {
    futures_util::stream::unfold(
        (Some(first), Some(rx)),
        |(pending, rx): (Option<Event>, Option<mpsc::UnboundedReceiver<Event>>)| async move {
            let mut rx = rx?;
            let event = match pending {
                Some(event) => event,
                None => rx
                    .recv()
                    .await
                    .unwrap_or_else(|| Event::error("", ErrorCode::Internal, NO_ANSWER)),
            };
            let rest = if event.is_terminal() { None } else { Some(rx) };
            Some((event, (None, rest)))
        },
    )
}

/// A whole (not streamed) answer: the text and how it ended.
struct Whole {
    text: String,
    tool_calls: Option<Vec<ToolCall>>,
    finish_reason: FinishReason,
    usage: Usage,
    timings: Timings,
}

/// Collects a request's events into its whole answer, or the error it ended with.
async fn whole(events: impl Stream<Item = Event>) -> Result<Whole, ApiError> {
    let mut events = std::pin::pin!(events);
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event {
            Event::Token { text: piece, .. } => text.push_str(&piece),
            Event::Done {
                finish_reason,
                usage,
                timings,
                text: whole,
                tool_calls,
                ..
            } => {
                return Ok(Whole {
                    text: whole.unwrap_or(text),
                    tool_calls,
                    finish_reason,
                    usage,
                    timings,
                })
            }
            Event::Error { code, message, .. } => return Err(ApiError::from_event(code, message)),
        }
    }
    Err(ApiError::no_answer())
}

/// A field that carries one of emberd's own wire types (`response_format`, `tools`, ...),
/// read from the body; a value of the wrong shape is a 400 naming the field.
fn wire_field<T: serde::de::DeserializeOwned>(name: &str, value: &Value) -> Result<T, ApiError> {
    serde_json::from_value(value.clone()).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))
}

/// Both APIs know two ways to end: `stop` (end of sequence, a stop sequence) and `length`
/// (OpenAI's `tool_calls` is its own; Ollama's is `stop`). A request cut short (its
/// deadline, a cancel) did not end on its own, so it is `length`.
fn stop_or_length(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopSequence | FinishReason::ToolCalls => "stop",
        FinishReason::Length | FinishReason::Cancelled | FinishReason::Timeout => "length",
    }
}
