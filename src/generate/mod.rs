//! From a validated request to a stream of events: template → tokenize → prefill → loop
//! { logits → mask → sampler → token → detokenize → stop? }. The daemon, `emberd generate`
//! and `emberd bench` all run this one loop.

pub mod constraint;
pub mod detok;
pub mod prompt;
pub mod sampler;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod tools;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::ModelConfig;
use crate::engine::{self, Engine, EngineError, EngineInfo, KvCache};
use crate::model::{ModelError, ModelPackage};
use crate::protocol::{ErrorCode, Event, FinishReason, PromptInput, Timings, Usage, ValidRequest};

use constraint::Constraint;
use detok::IncrementalDecoder;
use prompt::Prompter;
use sampler::Sampler;
use stop::{StopCheck, StopMatcher};
use tokenizer::Tokenizer;

/// Prompt tokens run per forward call during prefill; between chunks the generator checks
/// for cancellation, so a long prompt can be stopped.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
    #[error("the model package has no chat template; send raw prompts (\"raw\": true)")]
    NoTemplate,
    #[error("the prompt is {tokens} tokens; the limit is {limit} ({what})")]
    PromptTooLong {
        tokens: usize,
        limit: usize,
        what: &'static str,
    },
    #[error("the prompt is empty after tokenization")]
    EmptyPrompt,
    /// A `response_format` that cannot be compiled: names what is wrong with it.
    #[error("response_format: {0}")]
    InvalidFormat(String),
    /// A tool's parameter schema that cannot be compiled into a grammar.
    #[error("tools: {0}")]
    InvalidTools(String),
    /// The grammar failed while generating (a fault, not the request's).
    #[error("constraint: {0}")]
    Constraint(String),
}

impl GenerateError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GenerateError::PromptTooLong { .. } => ErrorCode::TooLong,
            GenerateError::Template(_)
            | GenerateError::NoTemplate
            | GenerateError::EmptyPrompt
            | GenerateError::InvalidFormat(_)
            | GenerateError::InvalidTools(_) => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
}

/// Set from outside (a cancel message, a disconnect, shutdown); checked between steps.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// How one run is steered from outside.
#[derive(Debug, Clone)]
pub struct RunControl {
    pub cancel: CancelToken,
    /// Past this instant the run ends with finish_reason `timeout`.
    pub deadline: Option<Instant>,
    /// When the request was accepted; queue time and TTFT count from here.
    pub accepted_at: Instant,
    /// Where the request came from ("socket", "mqtt", "cli"), for the logs.
    pub transport: &'static str,
}

impl RunControl {
    pub fn new() -> Self {
        RunControl {
            cancel: CancelToken::new(),
            deadline: None,
            accepted_at: Instant::now(),
            transport: "cli",
        }
    }

    fn interrupted(&self) -> Option<FinishReason> {
        if self.cancel.is_cancelled() {
            Some(FinishReason::Cancelled)
        } else if self.deadline.is_some_and(|d| Instant::now() >= d) {
            Some(FinishReason::Timeout)
        } else {
            None
        }
    }
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}

/// Figures of one run, for `bench`.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache of the previous request.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_ms: f64,
    pub ttft_ms: f64,
    pub decode_ms: f64,
    pub finish_reason: Option<FinishReason>,
    /// With a `response_format`: how long compiling it took (at the ingress, or here).
    pub grammar_compile_ms: Option<f64>,
    /// With a `response_format`: the time to compute each step's token mask, in µs.
    pub mask_us: Vec<f64>,
    /// The generated ids (for comparisons: a request in a batch against its run alone).
    pub output_ids: Vec<u32>,
}

impl RunStats {
    /// Tokens after the first, over the time after the first; 0 with fewer than two.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.generated_tokens > 1 && self.decode_ms > 0.0 {
            (self.generated_tokens - 1) as f64 / (self.decode_ms / 1e3)
        } else {
            0.0
        }
    }
}

/// The default for `limits.max_batch`: sequences decoding together.
pub const DEFAULT_MAX_BATCH: usize = 4;
/// The default for `limits.kv_cache_mb`: the batch's keys and values together.
pub const DEFAULT_KV_CACHE_MB: usize = 256;

/// One loaded model: engine, prompter (template, tokenizer, limits), and the requests in
/// flight, each in a slot of the batch (continuous batching: new ones are prefilled one chunk
/// at a time between the decode steps of the others, which decode together).
pub struct Generator {
    engine: Box<dyn Engine>,
    /// Shared with the ingress once serving starts; its limits are set before that.
    prompter: Arc<Prompter>,
    package: ModelPackage,
    /// One KV cache per slot; a cache outlives its request, so the next request in the slot
    /// reuses the prefix they share.
    slots: Vec<KvCache>,
    /// In admission order.
    running: Vec<Running>,
    /// The prefill's logits.
    logits: Vec<f32>,
    /// A decode step's logits, a row per sequence.
    batch_logits: Vec<f32>,
    prefill_chunk: usize,
    /// The budget for every slot's keys and values together, in bytes.
    kv_budget: usize,
    /// Test-only fault injection (`EMBERD_DEBUG_FAIL_STEP_ON_PROMPT`): the decode step of a
    /// request whose prompt holds this marker fails after its second token, as an engine
    /// failure would, so the fault tests can see what every request in that step gets.
    fail_marker: Option<String>,
}

/// How many requests run at once with `configured` (`limits.max_batch`) on `engine`: at least
/// one, at most what the engine can batch.
pub fn batch_size(configured: usize, engine: &dyn Engine) -> usize {
    configured.clamp(1, engine.max_batch().max(1))
}

/// A request in a slot.
struct Running {
    /// The caller's handle for its events (the scheduler's job key).
    key: u64,
    slot: usize,
    control: RunControl,
    sequence: Sequence,
    phase: Phase,
    stats: RunStats,
    started: Instant,
    /// Its decode steps fail (`fail_marker`).
    faulty: bool,
}

enum Phase {
    /// Prompt positions up to `done` are in the cache.
    Prefill { done: usize },
    /// `next` is to be run through the model.
    Decode { next: u32 },
}

/// What `Generator::admit` did with a request.
pub enum Admission {
    /// In a slot; `advance` serves it.
    Started,
    /// It ended at once (its terminal event is sent): a prompt the generator refused.
    Ended(RunStats),
}

impl Generator {
    /// Loads the engine that `model` asks for, with its context cap and prefill chunk.
    pub fn load(package: ModelPackage, model: &ModelConfig) -> Result<Self, GenerateError> {
        let engine = engine::load(&package, model)?;
        let mut generator = Self::with_engine(package, engine)?;
        if model.context > 0 {
            generator.set_context_len(model.context);
        }
        generator.set_prefill_chunk(model.prefill_chunk);
        Ok(generator)
    }

    pub fn with_engine(
        package: ModelPackage,
        engine: Box<dyn Engine>,
    ) -> Result<Self, GenerateError> {
        let prompter = Arc::new(Prompter::load(&package)?);
        Ok(Generator {
            engine,
            prompter,
            package,
            slots: vec![KvCache::new()],
            running: Vec::new(),
            logits: Vec::new(),
            batch_logits: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_budget: DEFAULT_KV_CACHE_MB << 20,
            fail_marker: std::env::var("EMBERD_DEBUG_FAIL_STEP_ON_PROMPT")
                .ok()
                .filter(|m| !m.is_empty()),
        })
    }

    /// Serves up to `max_batch` requests at once where the engine can batch (one otherwise),
    /// their keys and values within `kv_cache_mb`. Set before serving starts.
    pub fn set_batch(&mut self, max_batch: usize, kv_cache_mb: usize) {
        assert!(self.running.is_empty(), "the batch is set before serving");
        let engine_max = self.engine.max_batch();
        let slots = batch_size(max_batch, self.engine.as_ref());
        if max_batch > 1 && engine_max <= 1 {
            log::info!(
                "{} with {} cannot batch: one request at a time (max_batch 1)",
                self.engine.info().label(),
                self.engine.info().model_file.display()
            );
        }
        self.slots = if slots > 1 {
            (0..slots).map(KvCache::for_slot).collect()
        } else {
            vec![KvCache::new()]
        };
        self.kv_budget = kv_cache_mb.saturating_mul(1 << 20);
    }

    /// How many requests run at once.
    pub fn max_batch(&self) -> usize {
        self.slots.len()
    }

    /// The budget for all slots' keys and values, in bytes.
    pub fn kv_budget(&self) -> usize {
        self.kv_budget
    }

    /// Requests in slots (prefilling or decoding).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether a slot is free (the KV budget may still make a request wait: `can_admit`).
    pub fn has_free_slot(&self) -> bool {
        self.running.len() < self.slots.len()
    }

    /// Caps the context below the model's (a smaller KV cache, less memory).
    pub fn set_context_len(&mut self, context_len: usize) {
        let context_len = context_len.min(self.package.context_len);
        self.prompter_mut().set_context_len(context_len);
    }

    pub fn set_max_prompt_tokens(&mut self, limit: usize) {
        self.prompter_mut().set_max_prompt_tokens(limit);
    }

    fn prompter_mut(&mut self) -> &mut Prompter {
        Arc::get_mut(&mut self.prompter).expect("limits are set before the prompter is shared")
    }

    /// The template, tokenizer and limits, for the ingress to tokenize and check prompts
    /// before they are queued.
    pub fn prompter(&self) -> Arc<Prompter> {
        self.prompter.clone()
    }

    pub fn set_prefill_chunk(&mut self, chunk: usize) {
        self.prefill_chunk = chunk.max(1);
    }

    /// Forgets the cached keys and values, so the next prompt is run in full.
    pub fn clear_cache(&mut self) {
        for cache in &mut self.slots {
            cache.clear();
        }
    }

    pub fn engine_info(&self) -> &EngineInfo {
        self.engine.info()
    }

    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// The text the model sees for `input`.
    pub fn prompt_text(&self, input: &PromptInput) -> Result<String, GenerateError> {
        self.prompter.text(input, None)
    }

    pub fn prompt_ids(&self, input: &PromptInput) -> Result<Vec<u32>, GenerateError> {
        self.prompter.ids(input)
    }

    /// Bytes of keys and values per position of one sequence.
    fn kv_bytes_per_position(&self) -> usize {
        let p = &self.package;
        p.layers * 2 * p.kv_heads * p.head_dim * p.kv_elem.size()
    }

    /// The free slot for `prompt`: the one whose cache shares the longest prefix with it,
    /// the lowest of equals (a decode step runs the rows up to the highest slot in use).
    fn free_slot(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        (0..self.slots.len())
            .filter(|slot| self.running.iter().all(|r| r.slot != *slot))
            .map(|slot| {
                let shared = crate::engine::kv::common_prefix(self.slots[slot].tokens(), prompt);
                (slot, shared)
            })
            .max_by_key(|&(slot, shared)| (shared, std::cmp::Reverse(slot)))
    }

    /// Whether `request` can start now: a slot is free and, with it, the batch's keys and
    /// values fit the budget (a lone request always may: the context bounds it). Batch rows
    /// share one length, so the budget counts every row in use at the longest need.
    pub fn can_admit(&self, request: &ValidRequest) -> bool {
        let prompt = request.prompt_ids.as_deref().unwrap_or(&[]);
        let Some((slot, _)) = self.free_slot(prompt) else {
            return false;
        };
        if self.running.is_empty() || self.slots.len() == 1 {
            return true;
        }
        let context = self.prompter.context_len();
        let need = |prompt: usize, max_tokens: u32| (prompt + max_tokens as usize + 1).min(context);
        let longest = self
            .running
            .iter()
            .map(|r| need(r.stats.prompt_tokens, r.sequence.request.max_tokens))
            .chain([need(prompt.len(), request.max_tokens)])
            .max()
            .unwrap_or(0);
        let rows = self
            .running
            .iter()
            .map(|r| r.slot)
            .chain([slot])
            .max()
            .unwrap_or(0)
            + 1;
        let positions = longest
            .max(self.engine.slot_capacity())
            .max(crate::engine::MIN_KV_CAPACITY)
            .next_power_of_two();
        rows * positions * self.kv_bytes_per_position() <= self.kv_budget
    }

    /// The prompt ids and the compiled format of `request`: the ingress's, or made here.
    fn prepare(
        &self,
        request: &ValidRequest,
    ) -> Result<(Vec<u32>, Option<Constraint>), GenerateError> {
        // The ingress tokenized, checked and compiled a served request before queueing it.
        let prompt = match &request.prompt_ids {
            Some(ids) => ids.clone(),
            None => self.prompter.checked_ids(request)?,
        };
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let constraint = match &request.constraint {
            Some(c) => Some(c.clone()),
            None => self.prompter.constraint_for(request)?,
        };
        Ok((prompt, constraint))
    }

    /// Starts serving `request` in a free slot (`can_admit` said there is one); `emit` gets
    /// its events under `key`. Its prompt is prefilled by the next calls of `advance`.
    pub fn admit(
        &mut self,
        key: u64,
        request: ValidRequest,
        control: RunControl,
        emit: &mut dyn FnMut(u64, Event) -> bool,
    ) -> Admission {
        let started = Instant::now();
        let mut stats = RunStats::default();
        let (prompt, constraint) = match self.prepare(&request) {
            Ok(prepared) => prepared,
            Err(e) => {
                log::warn!(request_id = request.id.as_str(); "request {} failed: {e}", request.id);
                emit(
                    key,
                    Event::error(request.id.clone(), e.code(), e.to_string()),
                );
                return Admission::Ended(stats);
            }
        };
        let (slot, shared) = self
            .free_slot(&prompt)
            .expect("admit is called when a slot is free");
        // At least one prompt token is run, for its logits.
        let reuse = shared.min(prompt.len() - 1);
        let cache = &mut self.slots[slot];
        if let Err(e) = self.engine.truncate(cache, reuse) {
            log::warn!("dropping the KV cache: {e}");
            cache.clear();
        }
        stats.prompt_tokens = prompt.len();
        stats.cached_prompt_tokens = cache.len();
        stats.grammar_compile_ms = constraint.as_ref().map(|c| c.compile_ms);
        let done = cache.len();
        let faulty = self
            .fail_marker
            .as_deref()
            .is_some_and(|m| request.input.contains(m));
        self.running.push(Running {
            key,
            slot,
            control,
            sequence: Sequence::new(request, prompt, constraint),
            phase: Phase::Prefill { done },
            stats,
            started,
            faulty,
        });
        Admission::Started
    }

    /// One round of work: requests cancelled or past their deadline end, the first request
    /// still prefilling runs one chunk, then every decoding request gets one token, in one
    /// engine step. Returns the requests that ended (their terminal events are sent).
    pub fn advance(&mut self, emit: &mut dyn FnMut(u64, Event) -> bool) -> Vec<(u64, RunStats)> {
        let mut ended = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            match self.running[i].control.interrupted() {
                Some(reason) => ended.push(self.finish(i, Ok(reason), emit)),
                None => i += 1,
            }
        }
        if let Some(i) = self
            .running
            .iter()
            .position(|r| matches!(r.phase, Phase::Prefill { .. }))
        {
            if let Some(end) = self.prefill_chunk_of(i, emit) {
                ended.push(self.finish(i, end, emit));
            }
        }
        let decoding: Vec<usize> = (0..self.running.len())
            .filter(|&i| matches!(self.running[i].phase, Phase::Decode { .. }))
            .collect();
        if decoding.is_empty() {
            return ended;
        }
        let mut ids = Vec::with_capacity(decoding.len());
        let mut caches = Vec::with_capacity(decoding.len());
        for &i in &decoding {
            let Phase::Decode { next } = self.running[i].phase else {
                unreachable!("filtered above")
            };
            ids.push(next);
            caches.push(std::mem::take(&mut self.slots[self.running[i].slot]));
        }
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let injected = decoding.iter().any(|&i| {
            let r = &self.running[i];
            r.faulty && r.sequence.generated >= 2
        });
        let step = if injected {
            log::warn!("EMBERD_DEBUG_FAIL_STEP_ON_PROMPT matched: this decode step fails");
            Err(EngineError::Ort(
                "an injected failure (EMBERD_DEBUG_FAIL_STEP_ON_PROMPT)".into(),
            ))
        } else {
            self.engine
                .decode_batch(&ids, &mut refs, &mut self.batch_logits)
        };
        for (&i, cache) in decoding.iter().zip(caches) {
            self.slots[self.running[i].slot] = cache;
        }
        let mut logits = std::mem::take(&mut self.batch_logits);
        let vocab = logits.len() / decoding.len().max(1);
        // Outcomes first, then removals from the back, so the indexes stay valid.
        let mut outcomes = Vec::new();
        for (row, &i) in decoding.iter().enumerate() {
            let outcome = match &step {
                Err(e) => {
                    // A failed step leaves the caches in an unknown state.
                    self.slots[self.running[i].slot].clear();
                    Some(Err(GenerateError::from(e.clone())))
                }
                Ok(()) => self.sample(i, &mut logits[row * vocab..(row + 1) * vocab], emit),
            };
            outcomes.push((i, outcome));
        }
        self.batch_logits = logits;
        for (i, outcome) in outcomes.into_iter().rev() {
            if let Some(end) = outcome {
                ended.push(self.finish(i, end, emit));
            }
        }
        ended
    }

    /// Runs the next prefill chunk of request `i`; at the prompt's end, samples its first
    /// token. Returns how it ended, if it did.
    fn prefill_chunk_of(
        &mut self,
        i: usize,
        emit: &mut dyn FnMut(u64, Event) -> bool,
    ) -> Option<Result<FinishReason, GenerateError>> {
        let Phase::Prefill { done } = self.running[i].phase else {
            return None;
        };
        let r = &mut self.running[i];
        let prompt = &r.sequence.history[..r.stats.prompt_tokens];
        let end = (done + self.prefill_chunk).min(prompt.len());
        let cache = &mut self.slots[r.slot];
        if let Err(e) = self
            .engine
            .forward(&prompt[done..end], cache, &mut self.logits)
        {
            // A failed step leaves the cache in an unknown state.
            cache.clear();
            return Some(Err(e.into()));
        }
        if end < prompt.len() {
            r.phase = Phase::Prefill { done: end };
            return None;
        }
        r.stats.prefill_ms = ms(Instant::now() - r.started);
        let mut logits = std::mem::take(&mut self.logits);
        let outcome = self.sample(i, &mut logits, emit);
        self.logits = logits;
        outcome
    }

    /// Picks request `i`'s next token from `logits` and streams it; the token is run by the
    /// next decode step unless the request ends here.
    fn sample(
        &mut self,
        i: usize,
        logits: &mut [f32],
        emit: &mut dyn FnMut(u64, Event) -> bool,
    ) -> Option<Result<FinishReason, GenerateError>> {
        let r = &mut self.running[i];
        let key = r.key;
        let step = r.sequence.step(
            logits,
            self.prompter.tokenizer(),
            &self.package.eos_ids,
            &r.control,
            &mut |event| emit(key, event),
        );
        let token = match step {
            Ok(Step::Next(token)) => token,
            Ok(Step::Finished(reason)) => return Some(Ok(reason)),
            Err(e) => return Some(Err(e)),
        };
        if r.sequence.generated >= r.sequence.request.max_tokens as usize
            || self.slots[r.slot].len() + 1 >= self.prompter.context_len()
        {
            return Some(Ok(FinishReason::Length));
        }
        if let Some(reason) = r.control.interrupted() {
            return Some(Ok(reason));
        }
        r.phase = Phase::Decode { next: token };
        None
    }

    /// Ends request `i`: the held-back text and `done`, or `error`; frees its slot.
    fn finish(
        &mut self,
        i: usize,
        end: Result<FinishReason, GenerateError>,
        emit: &mut dyn FnMut(u64, Event) -> bool,
    ) -> (u64, RunStats) {
        let Running {
            key,
            control,
            mut sequence,
            mut stats,
            started,
            phase,
            ..
        } = self.running.remove(i);
        let request_id = sequence.request.id.clone();
        let flushed = end.and_then(|finish| {
            sequence.flush(finish, self.prompter.tokenizer(), &mut |event| {
                emit(key, event)
            })?;
            Ok(match sequence.tool_calls {
                Some(_) => FinishReason::ToolCalls,
                None => finish,
            })
        });
        let finish = match flushed {
            Ok(finish) => finish,
            Err(e) => {
                log::warn!(request_id = request_id.as_str(); "request {request_id} failed: {e}");
                emit(key, Event::error(request_id, e.code(), e.to_string()));
                return (key, stats);
            }
        };
        let end = Instant::now();
        if matches!(phase, Phase::Prefill { .. }) {
            // Interrupted before its prompt was in.
            stats.prefill_ms = ms(end - started);
        }
        let accepted = control.accepted_at.min(started);
        let first = sequence.first_token_at.unwrap_or(end);
        stats.generated_tokens = sequence.generated;
        stats.ttft_ms = ms(first - started);
        stats.decode_ms = ms(end - first);
        stats.finish_reason = Some(finish);
        stats.mask_us = std::mem::take(&mut sequence.mask_us);
        stats.output_ids = sequence
            .history
            .split_off(stats.prompt_tokens.min(sequence.history.len()));
        let timings = Timings {
            queue_ms: ms(started - accepted),
            prefill_ms: stats.prefill_ms,
            ttft_ms: ms(first - accepted),
            decode_tokens_per_s: stats.decode_tokens_per_s(),
            total_ms: ms(end - accepted),
            engine: self.engine.info().label(),
        };
        log::info!(
            request_id = request_id.as_str(),
            transport = control.transport,
            engine = timings.engine.as_str(),
            prompt_tokens = stats.prompt_tokens,
            cached_prompt_tokens = stats.cached_prompt_tokens,
            completion_tokens = stats.generated_tokens,
            queue_ms = timings.queue_ms,
            prefill_ms = timings.prefill_ms,
            ttft_ms = timings.ttft_ms,
            total_ms = timings.total_ms,
            tokens_per_s = timings.decode_tokens_per_s;
            "request {request_id} finished: {finish:?}"
        );
        emit(
            key,
            Event::Done {
                id: request_id,
                seq: sequence.seq,
                finish_reason: finish,
                text: (!sequence.request.stream).then_some(sequence.text),
                tool_calls: sequence.tool_calls,
                usage: Usage {
                    prompt_tokens: stats.prompt_tokens as u32,
                    completion_tokens: stats.generated_tokens as u32,
                    cached_prompt_tokens: stats.cached_prompt_tokens as u32,
                },
                timings,
            },
        );
        (key, stats)
    }

    /// Serves one request alone, as a batch of one: calls `emit` with each event, ending with
    /// exactly one `Done` or `Error`. `emit` returns false when the client is gone, which
    /// cancels the run. (`emberd generate`, `bench` and tests; the daemon's scheduler admits
    /// and advances requests itself.)
    pub fn run(
        &mut self,
        request: &ValidRequest,
        control: &RunControl,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> RunStats {
        assert!(self.running.is_empty(), "run serves one request alone");
        let mut emit = |_key: u64, event: Event| emit(event);
        if let Admission::Ended(stats) = self.admit(0, request.clone(), control.clone(), &mut emit)
        {
            return stats;
        }
        loop {
            if let Some((_, stats)) = self.advance(&mut emit).pop() {
                return stats;
            }
        }
    }

    /// Runs `ids` after what the cache holds (everything, when `fresh`) and returns the
    /// logits of the last position: the raw model, for evaluation and reference checks.
    pub fn forward(&mut self, ids: &[u32], fresh: bool) -> Result<&[f32], GenerateError> {
        let cache = &mut self.slots[0];
        if fresh {
            cache.clear();
        }
        if let Err(e) = self.engine.forward(ids, cache, &mut self.logits) {
            cache.clear();
            return Err(e.into());
        }
        Ok(&self.logits)
    }
}

/// What one step of a sequence decided.
enum Step {
    /// Feed this token back and go on.
    Next(u32),
    Finished(FinishReason),
}

/// One request in flight: everything the decode loop keeps between steps, so that the loop
/// itself is prefill → steps → flush.
struct Sequence {
    request: ValidRequest,
    sampler: Sampler,
    constraint: Option<Constraint>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Prompt and generated ids: what the repetition penalty looks at.
    history: Vec<u32>,
    /// Everything made, for a request that does not stream (and for its tool call).
    text: String,
    /// The call the answer turned out to be, read back when it ends.
    tool_calls: Option<Vec<crate::protocol::ToolCall>>,
    /// The next token event's number.
    seq: u32,
    /// Text made but not yet sent: held until `stream_interval` has passed since the last
    /// token event.
    pending: String,
    last_sent: Option<Instant>,
    generated: usize,
    first_token_at: Option<Instant>,
    mask_us: Vec<f64>,
}

impl Sequence {
    fn new(request: ValidRequest, prompt: Vec<u32>, constraint: Option<Constraint>) -> Self {
        Sequence {
            sampler: Sampler::new(request.sampling.clone()),
            constraint,
            decoder: IncrementalDecoder::new(),
            stops: StopMatcher::new(request.stop.clone()),
            request,
            history: prompt,
            text: String::new(),
            tool_calls: None,
            seq: 0,
            pending: String::new(),
            last_sent: None,
            generated: 0,
            first_token_at: None,
            mask_us: Vec::new(),
        }
    }

    /// Picks the next token from `logits` and streams the text it completes.
    fn step(
        &mut self,
        logits: &mut [f32],
        tokenizer: &Tokenizer,
        eos_ids: &[u32],
        control: &RunControl,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Step, GenerateError> {
        let mask = match &mut self.constraint {
            Some(constraint) => {
                let started = Instant::now();
                let mask = constraint.mask()?;
                self.mask_us.push(started.elapsed().as_secs_f64() * 1e6);
                Some(mask)
            }
            None => None,
        };
        let token = self.sampler.sample(logits, &self.history, mask.as_ref());
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        // A grammar's end is the output's end, ignore_eos or not.
        if eos_ids.contains(&token) && (!self.request.ignore_eos || self.constraint.is_some()) {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        if let Some(constraint) = &mut self.constraint {
            constraint.commit(token)?;
        }
        self.generated += 1;
        self.history.push(token);
        let piece = self.decoder.push(tokenizer, token)?;
        let (text, stopped) = match self.stops.push(&piece) {
            StopCheck::Continue(t) => (t, false),
            StopCheck::Stopped(t) => (t, true),
        };
        if !self.send(text, token, false, emit) {
            control.cancel.cancel();
        }
        if stopped {
            return Ok(Step::Finished(FinishReason::StopSequence));
        }
        // Complete: only end-of-sequence could follow, so no step is spent on it.
        if self
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_finished)
        {
            return Ok(Step::Finished(FinishReason::Stop));
        }
        Ok(Step::Next(token))
    }

    /// Emits what is still held back (an unfinished character, a partial stop sequence, text
    /// waiting for its interval), less anything a stop sequence cut off.
    fn flush(
        &mut self,
        finish: FinishReason,
        tokenizer: &Tokenizer,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> Result<(), GenerateError> {
        let tail = if finish == FinishReason::StopSequence {
            String::new()
        } else {
            let rest = self.decoder.finish(tokenizer)?;
            let (StopCheck::Continue(held) | StopCheck::Stopped(held)) = self.stops.push(&rest);
            held + &self.stops.flush()
        };
        let token = *self.history.last().unwrap_or(&0);
        if let Some(tools) = &self.request.tools {
            let whole = format!("{}{tail}", self.text);
            if tools::may_be_call(tools, &whole) {
                self.tool_calls = tools::parse(&whole, &self.request.id);
            }
            if self.tool_calls.is_some() {
                // A call is no text: it goes out in `done`, and nothing was streamed of it.
                self.text.clear();
                self.pending.clear();
                return Ok(());
            }
        }
        // The run is over: a client gone now has nothing left to cancel.
        self.send(tail, token, true, emit);
        Ok(())
    }

    /// Adds `text` to the answer and streams it, at once or, with a `stream_interval`, once
    /// the interval since the last token event has passed (the first piece goes at once, the
    /// rest at the end); false when the client is gone.
    fn send(
        &mut self,
        text: String,
        token: u32,
        last: bool,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> bool {
        self.text.push_str(&text);
        if !self.request.stream {
            return true;
        }
        self.pending.push_str(&text);
        if self.pending.is_empty() {
            return true;
        }
        // What may still become a tool call is held back until the end shows which it is.
        if !last && (self.request.tools.as_ref()).is_some_and(|t| tools::may_be_call(t, &self.text))
        {
            return true;
        }
        let due = self
            .last_sent
            .is_none_or(|at| at.elapsed() >= self.request.stream_interval);
        if !(last || due) {
            return true;
        }
        self.last_sent = Some(Instant::now());
        let event = Event::Token {
            id: self.request.id.clone(),
            seq: self.seq,
            text: std::mem::take(&mut self.pending),
            token,
        };
        self.seq += 1;
        emit(event)
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
