//! The bounded queue in front of the one engine worker.
//!
//! Transports `submit` validated requests; each gets a stream of events and a cancel token.
//! The model runs on one named OS thread (never on a tokio worker), one request at a time,
//! in arrival order. A full queue answers `busy` at once instead of waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::EngineInfo;
use crate::generate::{CancelToken, Generator, RunControl};
use crate::model::ModelPackage;
use crate::protocol::{ErrorCode, Event, FinishReason, PromptInput, ValidRequest};

struct Job {
    request: ValidRequest,
    control: RunControl,
    events: UnboundedSender<Event>,
    key: u64,
}

/// What a transport holds for one accepted request.
pub struct Submission {
    pub id: String,
    pub events: UnboundedReceiver<Event>,
    pub cancel: CancelToken,
}

/// Counters for status messages and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Accepted and not yet finished (waiting or running).
    pub in_flight: AtomicUsize,
    pub served: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// Requests that ended cancelled (cancel message, disconnect, shutdown).
    pub cancelled: AtomicU64,
    pub timed_out: AtomicU64,
    /// Milliseconds since `started` at the engine worker's last sign of life.
    pub heartbeat_ms: AtomicU64,
    /// Whether the worker is running a job (an idle worker waits on the queue and cannot hang).
    pub working: AtomicBool,
}

#[derive(Clone)]
pub struct Scheduler {
    queue: SyncSender<Job>,
    /// Cancel tokens of every accepted, unfinished request; shutdown cancels them all.
    active: Arc<Mutex<HashMap<u64, CancelToken>>>,
    next_key: Arc<AtomicU64>,
    stats: Arc<Stats>,
    engine: Arc<EngineInfo>,
    package: Arc<ModelPackage>,
    started: Instant,
}

/// Runs on the worker thread when it ends.
pub struct WorkerHandle {
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Waits until the worker has finished every job it was given.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Scheduler {
    /// Starts the engine worker thread; `max_queue` requests may wait behind the running one.
    pub fn start(generator: Generator, max_queue: usize) -> (Scheduler, WorkerHandle) {
        let (queue, jobs) = mpsc::sync_channel::<Job>(max_queue);
        let active: Arc<Mutex<HashMap<u64, CancelToken>>> = Arc::default();
        let stats = Arc::new(Stats::default());
        let started = Instant::now();
        let scheduler = Scheduler {
            queue,
            active: active.clone(),
            next_key: Arc::default(),
            stats: stats.clone(),
            engine: Arc::new(generator.engine_info().clone()),
            package: Arc::new(generator.package().clone()),
            started,
        };
        let thread = std::thread::Builder::new()
            .name("emberd-engine".into())
            .spawn(move || worker(generator, jobs, active, stats, started))
            .expect("spawning the engine thread");
        (
            scheduler,
            WorkerHandle {
                thread: Some(thread),
            },
        )
    }

    /// Queues a request, or answers `busy` at once when the queue is full.
    pub fn submit(
        &self,
        request: ValidRequest,
        accepted_at: Instant,
        transport: &'static str,
    ) -> Result<Submission, Box<Event>> {
        let (events_tx, events) = unbounded_channel();
        let cancel = CancelToken::new();
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let id = request.id.clone();
        let control = RunControl {
            cancel: cancel.clone(),
            deadline: Some(accepted_at + request.timeout),
            accepted_at,
            transport,
        };
        self.active
            .lock()
            .expect("active lock")
            .insert(key, cancel.clone());
        self.stats.in_flight.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(Job {
            request,
            control,
            events: events_tx,
            key,
        }) {
            Ok(()) => Ok(Submission { id, events, cancel }),
            Err(e) => {
                self.active.lock().expect("active lock").remove(&key);
                self.stats.in_flight.fetch_sub(1, Ordering::AcqRel);
                let (code, message) = match e {
                    TrySendError::Full(_) => {
                        self.stats.rejected_busy.fetch_add(1, Ordering::Relaxed);
                        (
                            ErrorCode::Busy,
                            "the queue is full; try again later".to_string(),
                        )
                    }
                    TrySendError::Disconnected(_) => (
                        ErrorCode::ShuttingDown,
                        "emberd is shutting down".to_string(),
                    ),
                };
                Err(Box::new(Event::error(id, code, message)))
            }
        }
    }

    /// Cancels every accepted request; each still ends with its terminal event.
    pub fn cancel_all(&self) {
        for token in self.active.lock().expect("active lock").values() {
            token.cancel();
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn queue_depth(&self) -> usize {
        self.stats.in_flight.load(Ordering::Acquire)
    }

    pub fn engine(&self) -> &EngineInfo {
        &self.engine
    }

    pub fn model_name(&self) -> &str {
        &self.package.name
    }

    /// Time since the scheduler started (the daemon's uptime, as a client sees it).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The model package being served.
    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// Time since the engine worker last showed it is alive (between jobs and between steps).
    pub fn since_heartbeat(&self) -> Duration {
        if !self.stats.working.load(Ordering::Acquire) {
            return Duration::ZERO;
        }
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.stats.heartbeat_ms.load(Ordering::Acquire)))
    }
}

fn worker(
    mut generator: Generator,
    jobs: mpsc::Receiver<Job>,
    active: Arc<Mutex<HashMap<u64, CancelToken>>>,
    stats: Arc<Stats>,
    started: Instant,
) {
    let beat = |stats: &Stats| {
        stats
            .heartbeat_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Release)
    };
    // Test-only fault injection: a request whose prompt contains this marker hangs the worker,
    // so the service tests can see systemd's watchdog restart a hung engine.
    let hang_marker = std::env::var("EMBERD_DEBUG_HANG_ON_PROMPT")
        .ok()
        .filter(|m| !m.is_empty());
    // Idle, the worker sleeps on the queue: no wake-ups, so an idle daemon uses no CPU.
    // Every Scheduler handle gone means no more work can arrive.
    while let Ok(job) = jobs.recv() {
        beat(&stats);
        stats.working.store(true, Ordering::Release);
        let Job {
            request,
            control,
            events,
            key,
        } = job;
        if hang_marker
            .as_deref()
            .is_some_and(|m| prompt_contains(&request.input, m))
        {
            log::warn!("EMBERD_DEBUG_HANG_ON_PROMPT matched: the engine worker hangs now");
            loop {
                std::thread::park();
            }
        }
        let expired = control.deadline.is_some_and(|d| Instant::now() >= d);
        if expired {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
            let _ = events.send(Event::error(
                request.id.clone(),
                ErrorCode::Timeout,
                format!(
                    "the request waited longer than its timeout of {:.1}s in the queue",
                    request.timeout.as_secs_f64()
                ),
            ));
        } else {
            let run = generator.run(&request, &control, &mut |event| {
                beat(&stats);
                events.send(event).is_ok()
            });
            match run.finish_reason {
                Some(FinishReason::Cancelled) => stats.cancelled.fetch_add(1, Ordering::Relaxed),
                Some(FinishReason::Timeout) => stats.timed_out.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }
        stats.working.store(false, Ordering::Release);
        active.lock().expect("active lock").remove(&key);
        stats.in_flight.fetch_sub(1, Ordering::AcqRel);
        stats.served.fetch_add(1, Ordering::Relaxed);
    }
}

fn prompt_contains(input: &PromptInput, marker: &str) -> bool {
    match input {
        PromptInput::Chat(messages) => messages.iter().any(|m| m.content.contains(marker)),
        PromptInput::Raw(text) => text.contains(marker),
        PromptInput::Tokens(_) => false,
    }
}
