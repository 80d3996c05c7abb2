//! The bounded queue in front of the one engine worker.
//!
//! Transports `submit` validated requests; each gets a stream of events and a cancel token.
//! The model runs on one named OS thread (never on a tokio worker). Requests start in arrival
//! order, as many at once as the generator's batch has slots (and its KV budget allows); the
//! rest wait in the queue. A full queue answers `busy` at once instead of waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::EngineInfo;
use crate::generate::{Admission, CancelToken, Generator, RunControl, RunStats};
use crate::model::ModelPackage;
use crate::protocol::{ErrorCode, Event, FinishReason, ValidRequest};

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
    /// Requests in the batch's slots (prefilling or decoding); the rest of `in_flight` waits.
    pub running: AtomicUsize,
    /// The batch's slots: requests that can run at once.
    pub max_batch: AtomicUsize,
    /// Set when shutdown begins: new requests are refused with `shutting_down`.
    pub closed: AtomicBool,
    /// The decode tokens/s of the last request that decoded, as f64 bits (the MQTT status).
    pub last_decode_tokens_per_s: AtomicU64,
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
        stats
            .max_batch
            .store(generator.max_batch(), Ordering::Relaxed);
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
        if self.stats.closed.load(Ordering::Acquire) {
            return Err(Box::new(Event::error(
                request.id,
                ErrorCode::ShuttingDown,
                "emberd is shutting down",
            )));
        }
        let (events_tx, events) = unbounded_channel();
        let cancel = CancelToken::new();
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let id = request.id.clone();
        let control = RunControl {
            cancel: cancel.clone(),
            deadline: accepted_at.checked_add(request.timeout),
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

    /// Refuses every later request with `shutting_down`; those accepted run on. A transport
    /// that still reads during the drain answers its clients instead of leaving them waiting.
    pub fn close(&self) {
        self.stats.closed.store(true, Ordering::Release);
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
    // Where each running request's events go, by job key.
    let mut outboxes: HashMap<u64, UnboundedSender<Event>> = HashMap::new();
    // The next request in arrival order, taken from the queue but waiting for room.
    let mut waiting: Option<Job> = None;
    let mut last_trim = Instant::now();
    let ended = |key: u64, run: Option<RunStats>, outboxes: &mut HashMap<u64, _>| {
        outboxes.remove(&key);
        if let Some(tps) = run
            .as_ref()
            .map(RunStats::decode_tokens_per_s)
            .filter(|t| *t > 0.0)
        {
            stats
                .last_decode_tokens_per_s
                .store(tps.to_bits(), Ordering::Relaxed);
        }
        match run.and_then(|r| r.finish_reason) {
            Some(FinishReason::Cancelled) => stats.cancelled.fetch_add(1, Ordering::Relaxed),
            Some(FinishReason::Timeout) => stats.timed_out.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        active.lock().expect("active lock").remove(&key);
        stats.in_flight.fetch_sub(1, Ordering::AcqRel);
        stats.served.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        // Admit in arrival order while there is room. Idle, the worker sleeps on the queue:
        // no wake-ups, so an idle daemon uses no CPU. Every Scheduler handle gone means no
        // more work can arrive: the worker ends once the running requests have.
        loop {
            let job = match waiting.take() {
                Some(job) => job,
                None if generator.running() == 0 => {
                    // Idle: a worker waiting on the queue cannot hang (see since_heartbeat).
                    stats.running.store(0, Ordering::Relaxed);
                    stats.working.store(false, Ordering::Release);
                    release_free_memory();
                    last_trim = Instant::now();
                    match jobs.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                }
                // A job stays in the queue (where it counts against `max_queue`) until a
                // slot is free for it.
                None if !generator.has_free_slot() => break,
                None => match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            beat(&stats);
            stats.working.store(true, Ordering::Release);
            if hang_marker
                .as_deref()
                .is_some_and(|m| job.request.input.contains(m))
            {
                log::warn!("EMBERD_DEBUG_HANG_ON_PROMPT matched: the engine worker hangs now");
                loop {
                    std::thread::park();
                }
            }
            if job.control.deadline.is_some_and(|d| Instant::now() >= d) {
                stats.timed_out.fetch_add(1, Ordering::Relaxed);
                let _ = job.events.send(Event::error(
                    job.request.id.clone(),
                    ErrorCode::Timeout,
                    format!(
                        "the request waited longer than its timeout of {:.1}s in the queue",
                        job.request.timeout.as_secs_f64()
                    ),
                ));
                ended(job.key, None, &mut outboxes);
                continue;
            }
            if !generator.can_admit(&job.request) {
                waiting = Some(job);
                break;
            }
            let Job {
                request,
                control,
                events,
                key,
            } = job;
            outboxes.insert(key, events);
            let admission = generator.admit(key, request, control, &mut |key, event| {
                outboxes.get(&key).is_some_and(|tx| tx.send(event).is_ok())
            });
            if let Admission::Ended(run) = admission {
                ended(key, Some(run), &mut outboxes);
            }
        }
        stats.running.store(generator.running(), Ordering::Relaxed);
        if generator.running() == 0 {
            continue;
        }
        let finished = generator.advance(&mut |key, event| {
            beat(&stats);
            outboxes.get(&key).is_some_and(|tx| tx.send(event).is_ok())
        });
        beat(&stats);
        for (key, run) in finished {
            ended(key, Some(run), &mut outboxes);
        }
        stats.running.store(generator.running(), Ordering::Relaxed);
        if last_trim.elapsed() >= TRIM_EVERY {
            release_free_memory();
            last_trim = Instant::now();
        }
    }
}

/// How often a busy worker hands freed memory back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Hands the allocator's free pages back to the system. Steps allocate and free tensors of
/// every size from several threads; glibc keeps what they free in per-thread arenas, and a
/// soak's memory grew by megabytes a minute without this.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
