//! From a validated request to a stream of events: template → tokenize → prefill → loop
//! { logits → sampler → token → detokenize → stop? }. The daemon, `emberd generate` and
//! `emberd bench` all run this one loop.

pub mod detok;
pub mod prompt;
pub mod sampler;
pub mod stop;
pub mod template;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::engine::{self, Engine, EngineError, EngineInfo, KvCache};
use crate::model::{ModelError, ModelPackage};
use crate::protocol::{ErrorCode, Event, FinishReason, PromptInput, Timings, Usage, ValidRequest};

use detok::IncrementalDecoder;
use prompt::Prompter;
use sampler::Sampler;
use stop::{StopCheck, StopMatcher};

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
}

impl GenerateError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GenerateError::PromptTooLong { .. } => ErrorCode::TooLong,
            GenerateError::Template(_) | GenerateError::NoTemplate | GenerateError::EmptyPrompt => {
                ErrorCode::BadRequest
            }
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

    pub fn tokenizer(&self) -> &Tokenizer {
        self.prompter.tokenizer()
    }

    /// Renders `messages` with the model's chat template.
    pub fn template_render(
        &self,
        messages: &[crate::protocol::Message],
        add_generation_prompt: bool,
    ) -> Result<String, GenerateError> {
        self.prompter.render(messages, add_generation_prompt)
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
        // The ingress tokenized and checked a served request before queueing it.
        let prompt = match &request.prompt_ids {
            Some(ids) => ids.clone(),
            None => self.prompter.checked_ids(&request.input)?,
        };
        stats.prompt_tokens = prompt.len();
        let mut history = prompt.clone();

        let (reused, interrupted_in_prefill) = self.prefill(&prompt, control)?;
        stats.cached_prompt_tokens = reused;
        let prefill_done = Instant::now();
        stats.prefill_ms = ms(prefill_done - started);

        let mut sampler = Sampler::new(request.sampling.clone());
        let mut decoder = IncrementalDecoder::new();
        let mut stops = StopMatcher::new(request.stop.clone());
        let mut full_text = String::new();
        let mut seq = 0u32;
        let mut first_token_at = None;
        let mut generated = 0usize;

        let finish = 'decode: {
            if let Some(reason) = interrupted_in_prefill {
                break 'decode reason;
            }
            loop {
                let token = sampler.sample(&mut self.logits, &history);
                if first_token_at.is_none() {
                    first_token_at = Some(Instant::now());
                }
                if !request.ignore_eos && self.package.eos_ids.contains(&token) {
                    break 'decode FinishReason::Stop;
                }
                generated += 1;
                history.push(token);
                let piece = decoder.push(self.prompter.tokenizer(), token)?;
                let (text, stopped) = match stops.push(&piece) {
                    StopCheck::Continue(t) => (t, false),
                    StopCheck::Stopped(t) => (t, true),
                };
                if !text.is_empty() {
                    full_text.push_str(&text);
                    if request.stream {
                        let event = Event::Token {
                            id: request.id.clone(),
                            seq,
                            text,
                            token,
                        };
                        seq += 1;
                        if !emit(event) {
                            control.cancel.cancel();
                        }
                    }
                }
                if stopped {
                    break 'decode FinishReason::StopSequence;
                }
                if generated >= request.max_tokens as usize
                    || self.cache.len() + 1 >= self.prompter.context_len()
                {
                    break 'decode FinishReason::Length;
                }
                if let Some(reason) = control.interrupted() {
                    break 'decode reason;
                }
                if let Err(e) = self
                    .engine
                    .forward(&[token], &mut self.cache, &mut self.logits)
                {
                    self.cache.clear();
                    return Err(e.into());
                }
            }
        };
        if finish != FinishReason::StopSequence {
            // Held-back text: an unfinished character or a partial stop sequence.
            let mut tail = decoder.finish(self.prompter.tokenizer())?;
            let (StopCheck::Continue(t) | StopCheck::Stopped(t)) = stops.push(&tail);
            tail = t;
            tail.push_str(&stops.flush());
            if !tail.is_empty() {
                full_text.push_str(&tail);
                if request.stream {
                    let token = *history.last().unwrap_or(&0);
                    emit(Event::Token {
                        id: request.id.clone(),
                        seq,
                        text: tail,
                        token,
                    });
                    seq += 1;
                }
            }
        }

        let end = Instant::now();
        let first = first_token_at.unwrap_or(end);
        let decode_s = (end - first).as_secs_f64();
        stats.generated_tokens = generated;
        stats.ttft_ms = ms(first - started);
        stats.decode_ms = decode_s * 1e3;
        stats.finish_reason = Some(finish);
        let timings = Timings {
            queue_ms,
            prefill_ms: stats.prefill_ms,
            ttft_ms: ms(first - control.accepted_at.min(started)),
            // Tokens after the first, over the time after the first.
            decode_tokens_per_s: if generated > 1 && decode_s > 0.0 {
                (generated - 1) as f64 / decode_s
            } else {
                0.0
            },
            total_ms: ms(end - control.accepted_at.min(started)),
            engine: self.engine.info().label(),
        };
        log::info!(
            request_id = request.id.as_str(),
            transport = control.transport,
            engine = timings.engine.as_str(),
            prompt_tokens = prompt.len(),
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
            seq,
            finish_reason: finish,
            text: (!request.stream).then_some(full_text),
            usage: Usage {
                prompt_tokens: prompt.len() as u32,
                completion_tokens: generated as u32,
                cached_prompt_tokens: reused as u32,
            },
            timings,
        });
        Ok(())
    }

    /// Runs exactly `prompt` then `steps` greedy tokens and returns the ids and the logits of
    /// every step; for tests that compare against reference logits.
    pub fn greedy_trace(
        &mut self,
        prompt: &[u32],
        steps: usize,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>), GenerateError> {
        self.cache.clear();
        self.engine
            .forward(prompt, &mut self.cache, &mut self.logits)?;
        let mut ids = Vec::with_capacity(steps);
        let mut all_logits = Vec::with_capacity(steps);
        for step in 0..steps {
            all_logits.push(self.logits.clone());
            let token = sampler::argmax(&self.logits);
            ids.push(token);
            if step + 1 < steps {
                self.engine
                    .forward(&[token], &mut self.cache, &mut self.logits)?;
            }
        }
        Ok((ids, all_logits))
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
