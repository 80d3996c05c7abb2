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
            | GenerateError::InvalidFormat(_) => ErrorCode::BadRequest,
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

/// One loaded model: engine, prompter (template, tokenizer, limits), and the scratch state
/// of the loop.
pub struct Generator {
    engine: Box<dyn Engine>,
    /// Shared with the ingress once serving starts; its limits are set before that.
    prompter: Arc<Prompter>,
    package: ModelPackage,
    cache: KvCache,
    logits: Vec<f32>,
    prefill_chunk: usize,
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
        let cache = KvCache::new();
        Ok(Generator {
            engine,
            prompter,
            package,
            cache,
            logits: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        })
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
        self.cache.clear();
    }

    pub fn engine_info(&self) -> &EngineInfo {
        self.engine.info()
    }

    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// The text the model sees for `input`.
    pub fn prompt_text(&self, input: &PromptInput) -> Result<String, GenerateError> {
        self.prompter.text(input)
    }

    pub fn prompt_ids(&self, input: &PromptInput) -> Result<Vec<u32>, GenerateError> {
        self.prompter.ids(input)
    }

    /// Runs `ids` through the model in chunks; the logits of the last one end in `self.logits`.
    /// The part of `ids` that the cache already holds (a shared system prompt, the previous
    /// turns of a conversation) is not run again; at least one token is, for its logits.
    /// Returns how many prompt tokens came from the cache, and why it stopped early if it did.
    fn prefill(
        &mut self,
        ids: &[u32],
        control: &RunControl,
    ) -> Result<(usize, Option<FinishReason>), EngineError> {
        let reuse = crate::engine::kv::common_prefix(self.cache.tokens(), ids).min(ids.len() - 1);
        if let Err(e) = self.engine.truncate(&mut self.cache, reuse) {
            log::warn!("dropping the KV cache: {e}");
            self.cache.clear();
        }
        let start = self.cache.len();
        for chunk in ids[start..].chunks(self.prefill_chunk) {
            if let Some(reason) = control.interrupted() {
                return Ok((start, Some(reason)));
            }
            if let Err(e) = self
                .engine
                .forward(chunk, &mut self.cache, &mut self.logits)
            {
                // A failed step leaves the cache in an unknown state.
                self.cache.clear();
                return Err(e);
            }
        }
        Ok((start, None))
    }

    /// Serves one request: calls `emit` with each event, ending with exactly one `Done` or
    /// `Error`. `emit` returns false when the client is gone, which cancels the run.
    pub fn run(
        &mut self,
        request: &ValidRequest,
        control: &RunControl,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> RunStats {
        let mut stats = RunStats::default();
        match self.run_inner(request, control, emit, &mut stats) {
            Ok(()) => {}
            Err(e) => {
                log::warn!(request_id = request.id.as_str(); "request {} failed: {e}", request.id);
                emit(Event::error(request.id.clone(), e.code(), e.to_string()));
            }
        }
        stats
    }

    fn run_inner(
        &mut self,
        request: &ValidRequest,
        control: &RunControl,
        emit: &mut dyn FnMut(Event) -> bool,
        stats: &mut RunStats,
    ) -> Result<(), GenerateError> {
        let started = Instant::now();
        let queue_ms = ms(started - control.accepted_at.min(started));
        // The ingress tokenized, checked and compiled a served request before queueing it.
        let prompt = match &request.prompt_ids {
            Some(ids) => ids.clone(),
            None => self.prompter.checked_ids(&request.input)?,
        };
        let constraint = match &request.constraint {
            Some(c) => Some(c.clone()),
            None => self.prompter.constraint(&request.response_format)?,
        };
        stats.prompt_tokens = prompt.len();
        stats.grammar_compile_ms = constraint.as_ref().map(|c| c.compile_ms);
        let mut sequence = Sequence::new(request, prompt, constraint);

        let (reused, interrupted_in_prefill) = self.prefill(&sequence.history, control)?;
        stats.cached_prompt_tokens = reused;
        stats.prefill_ms = ms(Instant::now() - started);

        let finish = match interrupted_in_prefill {
            Some(reason) => reason,
            None => loop {
                let token = match sequence.step(
                    &mut self.logits,
                    self.prompter.tokenizer(),
                    &self.package.eos_ids,
                    control,
                    emit,
                )? {
                    Step::Next(token) => token,
                    Step::Finished(reason) => break reason,
                };
                if sequence.generated >= request.max_tokens as usize
                    || self.cache.len() + 1 >= self.prompter.context_len()
                {
                    break FinishReason::Length;
                }
                if let Some(reason) = control.interrupted() {
                    break reason;
                }
                if let Err(e) = self
                    .engine
                    .forward(&[token], &mut self.cache, &mut self.logits)
                {
                    self.cache.clear();
                    return Err(e.into());
                }
            },
        };
        sequence.flush(finish, self.prompter.tokenizer(), emit)?;

        let end = Instant::now();
        let first = sequence.first_token_at.unwrap_or(end);
        let decode_s = (end - first).as_secs_f64();
        let generated = sequence.generated;
        let prompt_tokens = stats.prompt_tokens;
        stats.generated_tokens = generated;
        stats.ttft_ms = ms(first - started);
        stats.decode_ms = decode_s * 1e3;
        stats.finish_reason = Some(finish);
        stats.mask_us = std::mem::take(&mut sequence.mask_us);
        let timings = Timings {
            queue_ms,
            prefill_ms: stats.prefill_ms,
            ttft_ms: ms(first - control.accepted_at.min(started)),
            decode_tokens_per_s: stats.decode_tokens_per_s(),
            total_ms: ms(end - control.accepted_at.min(started)),
            engine: self.engine.info().label(),
        };
        log::info!(
            request_id = request.id.as_str(),
            transport = control.transport,
            engine = timings.engine.as_str(),
            prompt_tokens = prompt_tokens,
            cached_prompt_tokens = reused,
            completion_tokens = generated,
            queue_ms = timings.queue_ms,
            prefill_ms = timings.prefill_ms,
            ttft_ms = timings.ttft_ms,
            total_ms = timings.total_ms,
            tokens_per_s = timings.decode_tokens_per_s;
            "request {} finished: {:?}", request.id, finish
        );
        emit(Event::Done {
            id: request.id.clone(),
            seq: sequence.seq,
            finish_reason: finish,
            text: (!request.stream).then_some(sequence.text),
            usage: Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: generated as u32,
                cached_prompt_tokens: reused as u32,
            },
            timings,
        });
        Ok(())
    }

    /// Runs `ids` after what the cache holds (everything, when `fresh`) and returns the
    /// logits of the last position: the raw model, for evaluation and reference checks.
    pub fn forward(&mut self, ids: &[u32], fresh: bool) -> Result<&[f32], GenerateError> {
        if fresh {
            self.cache.clear();
        }
        if let Err(e) = self.engine.forward(ids, &mut self.cache, &mut self.logits) {
            self.cache.clear();
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
struct Sequence<'r> {
    request: &'r ValidRequest,
    sampler: Sampler,
    constraint: Option<Constraint>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    /// Prompt and generated ids: what the repetition penalty looks at.
    history: Vec<u32>,
    /// Everything emitted, for a request that does not stream.
    text: String,
    /// The next token event's number.
    seq: u32,
    generated: usize,
    first_token_at: Option<Instant>,
    mask_us: Vec<f64>,
}

impl<'r> Sequence<'r> {
    fn new(request: &'r ValidRequest, prompt: Vec<u32>, constraint: Option<Constraint>) -> Self {
        Sequence {
            request,
            sampler: Sampler::new(request.sampling.clone()),
            constraint,
            decoder: IncrementalDecoder::new(),
            stops: StopMatcher::new(request.stop.clone()),
            history: prompt,
            text: String::new(),
            seq: 0,
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
        if !self.send(text, token, emit) {
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

    /// Emits what is still held back (an unfinished character, a partial stop sequence),
    /// unless a stop sequence ended the run.
    fn flush(
        &mut self,
        finish: FinishReason,
        tokenizer: &Tokenizer,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> Result<(), GenerateError> {
        if finish == FinishReason::StopSequence {
            return Ok(());
        }
        let tail = self.decoder.finish(tokenizer)?;
        let (StopCheck::Continue(mut tail) | StopCheck::Stopped(mut tail)) = self.stops.push(&tail);
        tail.push_str(&self.stops.flush());
        let token = *self.history.last().unwrap_or(&0);
        // The run is over: a client gone now has nothing left to cancel.
        self.send(tail, token, emit);
        Ok(())
    }

    /// Adds `text` to the answer and streams it; false when the client is gone.
    fn send(&mut self, text: String, token: u32, emit: &mut dyn FnMut(Event) -> bool) -> bool {
        if text.is_empty() {
            return true;
        }
        self.text.push_str(&text);
        if !self.request.stream {
            return true;
        }
        let event = Event::Token {
            id: self.request.id.clone(),
            seq: self.seq,
            text,
            token,
        };
        self.seq += 1;
        emit(event)
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
