//! Constrained decoding: a request's `response_format` compiled by llguidance into a grammar
//! over the model's token bytes, and per step the mask of tokens that keep the output valid.
//! Compiled once per request at the ingress (a bad schema costs no queue slot), stepped by
//! the generator.

use std::sync::Mutex;
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::tokenizer::Tokenizer;
use super::GenerateError;
use crate::protocol::ResponseFormat;

/// Compiled grammars kept for repeated formats (a device sends the same schema each time).
const CACHE_ENTRIES: usize = 16;

/// JSON as a small model should write it: fixed separators, no free whitespace (an
/// unbounded run of spaces or newlines is the usual way a small model derails). For
/// `response_format` and tool calls alike.
pub(super) fn compact_json_options() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// Compiles formats into per-request constraints; built once at load, shared.
pub struct Grammars {
    factory: Result<ParserFactory, String>,
    eos_ids: Vec<u32>,
    cache: Mutex<Vec<(String, Matcher)>>,
}

impl Grammars {
    pub fn new(tokenizer: &Tokenizer, eos_ids: &[u32]) -> Self {
        let factory = match tokenizer.token_env() {
            Ok(env) => factory(env),
            Err(reason) => Err(reason.to_string()),
        };
        Grammars {
            factory,
            eos_ids: eos_ids.to_vec(),
            cache: Mutex::new(Vec::new()),
        }
    }

    /// The constraint for `format`, or None for plain text. Errors name what is wrong with
    /// the schema or grammar.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Option<Constraint>, GenerateError> {
        if let ResponseFormat::Text {} = format {
            return Ok(None);
        }
        let factory = self
            .factory
            .as_ref()
            .map_err(|reason| GenerateError::InvalidFormat(reason.clone()))?;
        let started = Instant::now();
        let key = serde_json::to_string(format).unwrap_or_default();
        let hit = {
            let mut cache = self.lock();
            // Most recently used last, so the entry dropped when full is the least used.
            let found = cache.iter().position(|(k, _)| *k == key);
            found.map(|i| {
                let entry = cache.remove(i);
                let matcher = entry.1.clone();
                cache.push(entry);
                matcher
            })
        };
        let matcher = match hit {
            Some(matcher) => matcher,
            None => {
                let Some(grammar) = grammar(format)? else {
                    return Ok(None);
                };
                let matcher = Matcher::new(factory.create_parser(grammar));
                if let Some(e) = matcher.get_error() {
                    return Err(GenerateError::InvalidFormat(first_line(&e)));
                }
                let mut cache = self.lock();
                if cache.len() == CACHE_ENTRIES {
                    cache.remove(0);
                }
                cache.push((key, matcher.clone()));
                matcher
            }
        };
        Ok(Some(Constraint {
            eos: factory.tok_env().tok_trie().eos_token(),
            eos_ids: self.eos_ids.clone(),
            matcher,
            compile_ms: started.elapsed().as_secs_f64() * 1e3,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Matcher)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// llguidance's grammar for `format` (none for plain text); JSON is held to compact
/// separators unless the schema says otherwise in its own `x-guidance`.
fn grammar(format: &ResponseFormat) -> Result<Option<TopLevelGrammar>, GenerateError> {
    Ok(Some(match format {
        ResponseFormat::Text {} => return Ok(None),
        ResponseFormat::JsonObject {} => {
            let mut schema = json!({"type": "object"});
            schema["x-guidance"] = compact_json_options();
            TopLevelGrammar::from_json_schema(schema)
        }
        ResponseFormat::JsonSchema { json_schema } => {
            let mut schema = json_schema.schema.clone();
            let Some(object) = schema.as_object_mut() else {
                return Err(GenerateError::InvalidFormat(
                    "json_schema.schema must be a JSON object".into(),
                ));
            };
            object
                .entry("x-guidance")
                .or_insert_with(compact_json_options);
            TopLevelGrammar::from_json_schema(schema)
        }
        ResponseFormat::Regex { regex } => TopLevelGrammar::from_regex(regex),
        ResponseFormat::Lark { lark } => TopLevelGrammar::from_lark(lark.clone()),
    }))
}

fn factory(env: &TokEnv) -> Result<ParserFactory, String> {
    let mut factory = ParserFactory::new_simple(env).map_err(|e| e.to_string())?;
    // Errors come back to the caller as values; nothing goes to stderr.
    factory.quiet();
    // Without this an error carries the parser state and the whole grammar.
    factory.limits_mut().verbose_errors = false;
    Ok(factory)
}

/// llguidance errors can carry a long tail of context; the first line names the problem.
fn first_line(error: &str) -> String {
    error.lines().next().unwrap_or(error).trim().to_string()
}

/// One request's grammar state: which tokens may come next, advanced token by token. A clone
/// shares the compiled grammar and its lexer caches (behind llguidance's own lock).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The trie's end-of-sequence token, which stands for all of `eos_ids`.
    eos: u32,
    eos_ids: Vec<u32>,
    /// How long compiling (or fetching from the cache) took.
    pub compile_ms: f64,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("compile_ms", &self.compile_ms)
            .finish_non_exhaustive()
    }
}

/// The tokens allowed at one step, end-of-sequence ids included.
pub struct TokenMask {
    allowed: SimpleVob,
    eos_allowed: bool,
}

impl TokenMask {
    /// Sets the logit of every token the grammar forbids to −∞.
    pub fn apply(&self, logits: &mut [f32]) {
        let limit = self.allowed.len();
        for (id, logit) in logits.iter_mut().enumerate() {
            if id >= limit || !self.allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }

    pub fn allows(&self, id: u32) -> bool {
        (id as usize) < self.allowed.len() && self.allowed.is_allowed(id)
    }

    pub fn allows_eos(&self) -> bool {
        self.eos_allowed
    }
}

impl Constraint {
    /// The tokens that may come next. Once the grammar is complete only EOS is allowed; until
    /// it may end, EOS is forbidden.
    pub fn mask(&mut self) -> Result<TokenMask, GenerateError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GenerateError::Constraint(first_line(&e.to_string())))?;
        let eos_allowed = allowed.is_allowed(self.eos);
        // The trie knows one EOS; the model may end with any of its own.
        let mut allowed = allowed;
        for &id in &self.eos_ids {
            if (id as usize) < allowed.len() {
                allowed.set(id as usize, eos_allowed);
            }
        }
        if allowed.is_zero() {
            return Err(GenerateError::Constraint(
                "the grammar allows no token here".into(),
            ));
        }
        Ok(TokenMask {
            allowed,
            eos_allowed,
        })
    }

    /// Advances the grammar past `token`, which the last mask allowed.
    pub fn commit(&mut self, token: u32) -> Result<(), GenerateError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GenerateError::Constraint(first_line(&e.to_string())))
    }

    /// The grammar is complete and allows nothing more than end-of-sequence.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
