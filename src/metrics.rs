//! Prometheus metrics (served by HTTP's `GET /metrics`). The ingress records every request
//! that reaches it, on every transport, from the one terminal event each request ends with:
//! so the token counters are the sums of the `usage` the clients were sent.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::protocol::Event;
use crate::scheduler::Scheduler;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    transport: &'static str,
    /// A finish reason (`stop`, `length`, `cancelled`...) or an error code (`busy`...).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    engine: String,
    provider: String,
    version: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Counter,
    cached_prompt_tokens: Counter,
    generated_tokens: Counter,
    queue_time: Histogram,
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    request_latency: Histogram,
    queued: Gauge,
    running: Gauge,
    max_batch: Gauge,
    uptime: Gauge,
    socket_connections: Gauge,
}

/// Seconds, from 1 ms to about 65 s.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub fn new(scheduler: &Scheduler) -> Metrics {
        let mut registry = Registry::with_prefix("emberd");
        let engine = scheduler.engine();
        registry.register(
            "model",
            "The model served, and the engine and execution provider serving it",
            Info::new(ModelLabels {
                model: scheduler.model_name().to_string(),
                engine: engine.engine.to_string(),
                provider: engine.provider.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            }),
        );
        let mut metrics = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            queue_time: latency_buckets(),
            time_to_first_token: latency_buckets(),
            time_per_output_token: latency_buckets(),
            request_latency: latency_buckets(),
            queued: Gauge::default(),
            running: Gauge::default(),
            max_batch: Gauge::default(),
            uptime: Gauge::default(),
            socket_connections: Gauge::default(),
            registry,
        };
        let r = &mut metrics.registry;
        r.register(
            "requests",
            "Requests that ended, by transport and outcome (finish reason or error code)",
            metrics.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of the requests served",
            metrics.prompt_tokens.clone(),
        );
        r.register(
            "cached_prompt_tokens",
            "Prompt tokens served from the cache of a shared prefix",
            metrics.cached_prompt_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated for the requests served",
            metrics.generated_tokens.clone(),
        );
        r.register(
            "queue_time_seconds",
            "Time from acceptance to the engine starting the request",
            metrics.queue_time.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time from acceptance to the first generated token",
            metrics.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Mean time between generated tokens, one observation per request",
            metrics.time_per_output_token.clone(),
        );
        r.register(
            "request_latency_seconds",
            "Time from acceptance to the last event",
            metrics.request_latency.clone(),
        );
        r.register(
            "queue_depth",
            "Requests accepted and waiting for the engine",
            metrics.queued.clone(),
        );
        r.register(
            "running",
            "Requests the engine is running",
            metrics.running.clone(),
        );
        r.register(
            "max_batch",
            "Requests the engine can run at once (the batch's slots)",
            metrics.max_batch.clone(),
        );
        r.register(
            "socket_connections",
            "Connections the Unix socket holds (idle: 0; counts a connection until it is reaped)",
            metrics.socket_connections.clone(),
        );
        r.register(
            "uptime_seconds",
            "Seconds since the daemon started serving",
            metrics.uptime.clone(),
        );
        metrics
    }

    /// The socket listener keeps this at the number of connection tasks it holds.
    pub fn socket_connections(&self) -> Gauge {
        self.socket_connections.clone()
    }

    /// Counts a request by the terminal event it ended with.
    pub fn record(&self, transport: &'static str, event: &Event) {
        let outcome = match event {
            Event::Token { .. } => return,
            Event::Error { code, .. } => code.to_string(),
            Event::Done {
                finish_reason,
                usage,
                timings,
                ..
            } => {
                self.prompt_tokens.inc_by(usage.prompt_tokens.into());
                self.cached_prompt_tokens
                    .inc_by(usage.cached_prompt_tokens.into());
                self.generated_tokens.inc_by(usage.completion_tokens.into());
                self.queue_time.observe(timings.queue_ms / 1e3);
                self.request_latency.observe(timings.total_ms / 1e3);
                if usage.completion_tokens > 0 {
                    self.time_to_first_token.observe(timings.ttft_ms / 1e3);
                }
                if usage.completion_tokens > 1 && timings.decode_tokens_per_s > 0.0 {
                    self.time_per_output_token
                        .observe(1.0 / timings.decode_tokens_per_s);
                }
                finish_reason.as_str().to_string()
            }
        };
        self.requests
            .get_or_create(&RequestLabels { transport, outcome })
            .inc();
    }

    /// Counts a request that its transport refused before it reached the ingress (HTTP: a
    /// body that is too large or not valid for its API), by the code it was answered with.
    pub fn record_refusal(&self, transport: &'static str, code: &str) {
        let outcome = code.to_string();
        self.requests
            .get_or_create(&RequestLabels { transport, outcome })
            .inc();
    }

    /// The text exposition, with the gauges read from the scheduler now.
    pub fn encode(&self, scheduler: &Scheduler) -> String {
        let stats = scheduler.stats();
        let running = i64::try_from(stats.running.load(Ordering::Acquire)).unwrap_or(0);
        let in_flight = i64::try_from(stats.in_flight.load(Ordering::Acquire)).unwrap_or(0);
        self.running.set(running);
        self.queued.set((in_flight - running).max(0));
        self.max_batch
            .set(i64::try_from(stats.max_batch.load(Ordering::Acquire)).unwrap_or(0));
        self.uptime
            .set(i64::try_from(scheduler.uptime().as_secs()).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
