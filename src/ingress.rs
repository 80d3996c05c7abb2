//! The one request path every transport uses: size check → parse → cancel lookup → validate
//! (the id generated when absent) → template, tokenize and check the prompt's length →
//! duplicate id → submit → forward the events. A prompt that is too long is answered before
//! it takes a queue slot, and the engine thread gets token ids, not text.
//!
//! A transport only frames: it hands the bytes of one message to [`Ingress::handle`] with
//! the [`Scope`] the message belongs to, and says where replies go once the request's id and
//! `reply_to` are known. The behaviour is the same on every transport:
//!
//! - Every error about a message (too large, not JSON, invalid, duplicate id, busy) is an
//!   `error` event sent where that message's replies go.
//! - A cancel stops the request with that id in the same scope. A cancel for an id that is
//!   not running there (never was, or has ended) is logged and otherwise ignored: cancelling
//!   is idempotent, and an answer would look like a second terminal event for that id.
//! - An id leaves its scope before its terminal event is delivered, so a client may reuse it
//!   as soon as it sees `done` or `error`.
//! - An event that cannot be delivered (the client is gone) cancels the request.
//! - Every message's outcome (its terminal event, refusals included) goes into the metrics
//!   here, once, whatever the transport.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::generate::prompt::Prompter;
use crate::generate::CancelToken;
use crate::metrics::Metrics;
use crate::protocol::{id_hint, parse_request, ErrorCode, Event, Request, RequestPolicy};
use crate::scheduler::Scheduler;

/// Where the events of one message go.
pub trait Reply: Send + Sync + 'static {
    /// Delivers one event; false when the client is gone. The future is spawned or awaited
    /// in order: an implementation that can deliver at once should do it when called.
    fn deliver(&self, event: Event) -> impl Future<Output = bool> + Send + 'static;

    /// Resolves when the client is known to be gone before an event shows it (an HTTP
    /// client that disconnected during prefill); never, where a transport cannot tell.
    fn closed(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::pending()
    }
}

/// The socket's writer channel: delivery is a send on it, done when called.
impl Reply for tokio::sync::mpsc::UnboundedSender<Event> {
    fn deliver(&self, event: Event) -> impl Future<Output = bool> + Send + 'static {
        std::future::ready(self.send(event).is_ok())
    }

    fn closed(&self) -> impl Future<Output = ()> + Send + '_ {
        tokio::sync::mpsc::UnboundedSender::closed(self)
    }
}

/// The requests of one scope that have not ended, by id: what cancels and duplicate-id checks
/// look in. A socket connection is a scope; so is the whole MQTT transport.
#[derive(Clone, Default)]
pub struct Scope {
    running: Arc<Mutex<HashMap<String, CancelToken>>>,
}

impl Scope {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancelToken>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels every request still running in this scope (a closed connection).
    pub fn cancel_all(&self) {
        for token in self.lock().values() {
            token.cancel();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// What a message asks for, as its transport received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// A request, or a cancel (`"type": "cancel"`).
    Any,
    /// Arrived where only cancels go (MQTT's cancel topic): read as a cancel whatever its type.
    Cancel,
}

/// Where a message came from: its transport, its scope, and what it may ask for.
#[derive(Clone, Copy)]
pub struct Origin<'a> {
    pub transport: &'static str,
    pub scope: &'a Scope,
    pub intent: Intent,
}

/// Where replies to a message go, as far as the message says: its id (empty when unknown)
/// and its `reply_to`.
pub struct Route {
    pub id: String,
    pub reply_to: Option<String>,
}

#[derive(Clone)]
pub struct Ingress {
    scheduler: Scheduler,
    prompter: Arc<Prompter>,
    policy: Arc<RequestPolicy>,
    max_request_bytes: usize,
    metrics: Arc<Metrics>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn generated_id() -> String {
    format!("req-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

impl Ingress {
    pub fn new(
        scheduler: Scheduler,
        prompter: Arc<Prompter>,
        policy: Arc<RequestPolicy>,
        max_request_bytes: usize,
    ) -> Self {
        let metrics = Arc::new(Metrics::new(&scheduler));
        Ingress {
            scheduler,
            prompter,
            policy,
            max_request_bytes,
            metrics,
        }
    }

    pub fn prompter(&self) -> &Prompter {
        &self.prompter
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Why a message of `len` bytes is refused, when it is over `max_request_bytes`; the
    /// same words on every transport (HTTP checks its body before decoding it).
    pub fn oversize(&self, len: usize) -> Option<String> {
        (len > self.max_request_bytes).then(|| {
            format!(
                "request of {len} bytes exceeds max_request_bytes = {}",
                self.max_request_bytes
            )
        })
    }

    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Takes one message. `route` names where its replies go once what the message says
    /// about that is known; every outcome is delivered there.
    pub fn handle<R: Reply>(
        &self,
        bytes: &[u8],
        origin: Origin<'_>,
        route: impl FnOnce(Route) -> R,
    ) {
        let accepted_at = Instant::now();
        if let Some(message) = self.oversize(bytes.len()) {
            let reply = route(Route {
                id: String::new(),
                reply_to: None,
            });
            self.refuse(
                origin.transport,
                &reply,
                Event::error("", ErrorCode::TooLong, message),
            );
            return;
        }
        let request = match parse_request(bytes) {
            Ok(r) => r,
            Err(e) => {
                let id = id_hint(bytes);
                let reply = route(Route {
                    id: id.clone(),
                    reply_to: None,
                });
                let event = Event::error(id, e.code(), e.to_string());
                self.refuse(origin.transport, &reply, event);
                return;
            }
        };
        self.handle_request(request, accepted_at, origin, route);
    }

    /// Takes a request that its transport decoded itself (HTTP maps the OpenAI shape to a
    /// `Request`); from here on the path is the same as for `handle`.
    pub fn handle_request<R: Reply>(
        &self,
        request: Request,
        accepted_at: Instant,
        origin: Origin<'_>,
        route: impl FnOnce(Route) -> R,
    ) {
        let Origin {
            transport,
            scope,
            intent,
        } = origin;
        if request.is_cancel() || intent == Intent::Cancel {
            let token = request
                .id
                .as_deref()
                .and_then(|id| scope.lock().get(id).cloned());
            match token {
                Some(token) => token.cancel(),
                None => log::info!(
                    "{transport}: cancel for {:?}, which is not running here",
                    request.id.as_deref().unwrap_or_default()
                ),
            }
            return;
        }
        let given_id = request.id.clone();
        let given_reply_to = request.reply_to.clone();
        let mut valid = match request.validate(&self.policy, generated_id) {
            Ok(v) => v,
            Err(e) => {
                let id = given_id.unwrap_or_default();
                let reply = route(Route {
                    id: id.clone(),
                    reply_to: given_reply_to,
                });
                self.refuse(transport, &reply, Event::error(id, e.code(), e.to_string()));
                return;
            }
        };
        let reply = route(Route {
            id: valid.id.clone(),
            reply_to: valid.reply_to.clone(),
        });
        // Tokenized, length-checked and the grammar compiled here, so that a request the
        // model cannot serve costs no queue slot.
        match self.prompter.prepare(&valid) {
            Ok((ids, constraint)) => {
                valid.prompt_ids = Some(ids);
                valid.constraint = constraint;
            }
            Err(e) => {
                let event = Event::error(valid.id, e.code(), e.to_string());
                self.refuse(transport, &reply, event);
                return;
            }
        }
        if scope.lock().contains_key(&valid.id) {
            let id = valid.id.clone();
            let message = format!("a request with id {id:?} is still running");
            self.refuse(
                transport,
                &reply,
                Event::error(id, ErrorCode::BadRequest, message),
            );
            return;
        }
        let mut submission = match self.scheduler.submit(valid, accepted_at, transport) {
            Ok(s) => s,
            Err(event) => {
                self.refuse(transport, &reply, *event);
                return;
            }
        };
        scope
            .lock()
            .insert(submission.id.clone(), submission.cancel.clone());
        let scope = scope.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = submission.events.recv() => event,
                    // The client left while nothing was being sent (prefill): stop the work
                    // now; the terminal event still comes and goes nowhere.
                    _ = reply.closed(), if !submission.cancel.is_cancelled() => {
                        submission.cancel.cancel();
                        continue;
                    }
                };
                let Some(event) = event else { break };
                let terminal = event.is_terminal();
                if terminal {
                    scope.lock().remove(&submission.id);
                    metrics.record(transport, &event);
                }
                if !reply.deliver(event).await {
                    // The client is gone; stop the work.
                    submission.cancel.cancel();
                }
                if terminal {
                    return;
                }
            }
            // The scheduler always ends with a terminal event; this is only a safety net.
            scope.lock().remove(&submission.id);
        });
    }

    /// Delivers the one event that answers a message that was not accepted.
    fn refuse<R: Reply>(&self, transport: &'static str, reply: &R, event: Event) {
        self.metrics.record(transport, &event);
        tokio::spawn(reply.deliver(event));
    }
}
