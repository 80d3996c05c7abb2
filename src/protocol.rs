//! The wire contract shared by every transport (see DESIGN.md, "Wire contract").
//!
//! ```text
//! client                                  emberd
//!   | {"id":"r1","prompt":"Hi","max_tokens":8} |
//!   |---------------------------------------->|  Request  -> validate() -> ValidRequest
//!   |   {"id":"r1","type":"token","seq":0,...} |
//!   |<----------------------------------------|  Event::Token (one per text piece)
//!   |   {"id":"r1","type":"done",...}          |
//!   |<----------------------------------------|  exactly one Event::Done or Event::Error
//!   | {"type":"cancel","id":"r1"}              |  (optional) ends the request early
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::generate::constraint::Constraint;

/// What a request's unset fields become: the `[generation]` section of the config, and the
/// one place these defaults are written down.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationDefaults {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// System prompt for requests that bring none; absent keeps the template's default.
    pub system: Option<String>,
    /// Coalesce streamed pieces into one `token` event per this many milliseconds (a request's
    /// `stream_interval_ms` overrides it); 0 sends every piece as it comes.
    pub stream_interval_ms: u32,
    /// For a request with tools and no `tool_choice` (Ollama's API has none).
    pub tool_choice: DefaultToolChoice,
}

/// `[generation] tool_choice`: what a request with tools and no `tool_choice` gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultToolChoice {
    /// The model answers in text or calls a tool.
    #[default]
    Auto,
    /// A user's message is answered by a call; a tool's result as with `auto` (in text, or
    /// another call), so that a client that runs calls until a text answer comes ends. For
    /// a device that exists to act: a small model seldom chooses a call by itself.
    Required,
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        GenerationDefaults {
            max_tokens: 256,
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            repetition_penalty: 1.0,
            system: None,
            stream_interval_ms: 0,
            tool_choice: DefaultToolChoice::Auto,
        }
    }
}

/// A longer interval than a minute is no stream: `stream: false` says that.
pub const MAX_STREAM_INTERVAL_MS: u32 = 60_000;

/// Limits and defaults that `validate` applies; `Config::request_policy` makes it.
#[derive(Debug, Clone)]
pub struct RequestPolicy {
    pub max_tokens_cap: u32,
    pub defaults: GenerationDefaults,
    pub max_stop_sequences: usize,
    pub request_timeout: std::time::Duration,
}

/// One chat message: `system`, `user`, `assistant` (which may carry the tool calls it made)
/// or `tool` (a call's result). Fields that are absent stay absent for the chat template,
/// which tests them with `is defined`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    /// Null (OpenAI's assistant message that only calls tools) reads as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// On a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a `tool` message: the function that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(de: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(de)?.unwrap_or_default())
}

/// A function the model may call, in OpenAI's shape:
/// `{"type": "function", "function": {"name", "description", "parameters"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema for the arguments object; absent: any object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    /// Accepted; the schema is always enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"auto"` (the model answers in text or calls one tool), `"none"` (text),
/// `"required"` (one call), or one function by name
/// (`{"type": "function", "function": {"name": ...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Function {
        #[serde(rename = "type")]
        kind: String,
        function: FunctionName,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    pub name: String,
}

/// A call the model made (in a `done` event) or made earlier (in an assistant message).
/// Unknown fields are let through here: clients echo back what servers add to a call
/// (`index`), and a past call's extras change nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// A JSON object. OpenAI's clients send it as a string of JSON; `validate` parses that.
    pub arguments: serde_json::Value,
}

/// How a request may use its tools, once validated: the tools the model is told about and
/// those it may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub tools: Vec<Tool>,
    /// A call is the only answer allowed (`required`, or one named function).
    pub required: bool,
    /// The functions a call may name: all of `tools`, or the one `tool_choice` names.
    pub callable: Vec<String>,
}

/// A generation request as it arrives on any transport.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Echoed on every event so one connection can carry several requests.
    #[serde(default)]
    pub id: Option<String>,
    /// Present only on cancel messages (`{"type":"cancel","id":...}`).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// A single user message, wrapped by the chat template unless `raw`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// A whole conversation, instead of `prompt`.
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
    /// Feed `prompt` to the model as-is, without the chat template.
    #[serde(default)]
    pub raw: bool,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// false: no token events, one `done` carrying the whole text.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Per-request deadline in seconds; only ever lowers the configured one.
    #[serde(default)]
    pub timeout_s: Option<f64>,
    /// Where MQTT 3.1.1 clients (no Response Topic) want their events.
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Keep generating past end-of-sequence up to max_tokens (load tests, benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// At most one `token` event per this many milliseconds, carrying the pieces made
    /// meanwhile (fewer messages for small devices); 0: every piece. Default from the config.
    #[serde(default)]
    pub stream_interval_ms: Option<u32>,
    /// The shape the output must take; plain text when absent.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call (OpenAI's shape); a call comes back in `done`'s
    /// `tool_calls`, its arguments held to the function's schema.
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// `auto` (the default with tools), `none`, `required`, or one named function.
    #[serde(default)]
    pub tool_choice: Option<ToolChoice>,
}

/// The shape the output must take: OpenAI's `response_format`, plus a regular expression and
/// a Lark grammar. Enforced token by token, so what comes back always parses (unless
/// `max_tokens` cuts it: then `finish_reason` is `length`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    // Braced, so that a field beside the type (`{"type":"json_object","schema":..}`) is
    // refused rather than ignored: serde checks unknown fields only in struct variants.
    Text {},
    /// Any JSON object.
    JsonObject {},
    /// JSON valid under a JSON Schema.
    JsonSchema {
        json_schema: JsonSchemaFormat,
    },
    /// Text matching a regular expression, as a whole.
    Regex {
        regex: String,
    },
    /// Text of a Lark grammar (llguidance's dialect; `%json` embeds a schema).
    Lark {
        lark: String,
    },
}

/// OpenAI's `json_schema` object; `name`, `description` and `strict` are accepted and do not
/// change anything: the schema is always enforced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub schema: serde_json::Value,
    #[serde(default)]
    pub strict: Option<bool>,
}

impl Default for ResponseFormat {
    fn default() -> Self {
        ResponseFormat::Text {}
    }
}

impl ResponseFormat {
    pub fn json_schema(schema: serde_json::Value) -> Self {
        ResponseFormat::JsonSchema {
            json_schema: JsonSchemaFormat {
                name: None,
                description: None,
                schema,
                strict: None,
            },
        }
    }
}

/// Sampling settings after defaults and limits are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
        }
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Rendered by the chat template.
    Chat(Vec<Message>),
    /// Tokenized as-is.
    Raw(String),
    /// Token ids, fed as they are (benchmarks; not on the wire).
    Tokens(Vec<u32>),
}

impl PromptInput {
    /// Whether the text the model is asked to continue contains `text` (token ids never do).
    pub fn contains(&self, text: &str) -> bool {
        match self {
            PromptInput::Chat(messages) => messages.iter().any(|m| m.content.contains(text)),
            PromptInput::Raw(prompt) => prompt.contains(text),
            PromptInput::Tokens(_) => false,
        }
    }
}

/// A request that passed `validate`: the only type the generator and scheduler accept.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub id: String,
    pub input: PromptInput,
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stream: bool,
    pub timeout: std::time::Duration,
    pub reply_to: Option<String>,
    /// Generate `max_tokens` even past end-of-sequence.
    pub ignore_eos: bool,
    /// Pieces made within this interval go out as one `token` event; zero: each at once.
    pub stream_interval: std::time::Duration,
    /// The prompt as the model sees it, once the ingress has templated, tokenized and
    /// length-checked it (before queueing); `None` leaves that to the generator.
    pub prompt_ids: Option<Vec<u32>>,
    pub response_format: ResponseFormat,
    /// The tools the model is told about and may call; `None` without tools or with
    /// `tool_choice: "none"`.
    pub tools: Option<ToolUse>,
    /// `response_format` compiled, by the ingress before queueing; `None` with a format
    /// other than text leaves that to the generator.
    pub constraint: Option<Constraint>,
}

/// Stable error codes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLong,
    Busy,
    Timeout,
    Internal,
    ShuttingDown,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLong => "too_long",
            ErrorCode::Busy => "busy",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
        };
        f.write_str(s)
    }
}

/// Why a request was refused before generation started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLong(String),
}

impl RequestError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::BadRequest(_) => ErrorCode::BadRequest,
            RequestError::TooLong(_) => ErrorCode::TooLong,
        }
    }
}

/// Why generation ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    StopSequence,
    Cancelled,
    Timeout,
    /// The answer is a tool call (`done` carries it in `tool_calls`).
    ToolCalls,
}

impl FinishReason {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose keys and values were already cached (a shared prefix), not run again.
    #[serde(default)]
    pub cached_prompt_tokens: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub ttft_ms: f64,
    pub decode_tokens_per_s: f64,
    pub total_ms: f64,
    /// Engine and execution provider that served the request, e.g. "ort/cpu".
    pub engine: String,
}

/// One event on the wire; every request ends with exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Token {
        id: String,
        seq: u32,
        text: String,
        token: u32,
    },
    Done {
        id: String,
        seq: u32,
        finish_reason: FinishReason,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        text: Option<String>,
        /// The tool call the answer is (`finish_reason` is then `tool_calls`).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        tool_calls: Option<Vec<ToolCall>>,
        usage: Usage,
        timings: Timings,
    },
    Error {
        id: String,
        code: ErrorCode,
        message: String,
    },
}

impl Event {
    pub fn error(id: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Event {
        Event::Error {
            id: id.into(),
            code,
            message: message.into(),
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Event::Token { id, .. } | Event::Done { id, .. } | Event::Error { id, .. } => id,
        }
    }

    pub fn is_terminal(&self) -> bool {
        !matches!(self, Event::Token { .. })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }
}

/// Parses one wire message, naming the offending field on error.
pub fn parse_request(bytes: &[u8]) -> Result<Request, RequestError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| RequestError::BadRequest(format!("request is not valid UTF-8: {e}")))?;
    let bad =
        |e: &dyn std::fmt::Display| RequestError::BadRequest(format!("invalid request JSON: {e}"));
    let mut de = serde_json::Deserializer::from_str(text);
    // serde's own message names the type it wanted, not the field: the path does.
    let request: Request = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "" | "." => bad(e.inner()),
            path => {
                RequestError::BadRequest(format!("invalid request JSON: {path}: {}", e.inner()))
            }
        }
    })?;
    de.end().map_err(|e| bad(&e))?;
    Ok(request)
}

/// The `id` of a message that failed to parse, if it has one, so its error can carry it.
pub fn id_hint(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string))
        .unwrap_or_default()
}

fn check_range(name: &str, value: f32, lo: f32, hi: f32) -> Result<f32, RequestError> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(value)
    } else {
        Err(RequestError::BadRequest(format!(
            "{name} must be between {lo} and {hi}, got {value}"
        )))
    }
}

impl Request {
    pub fn is_cancel(&self) -> bool {
        self.kind.as_deref() == Some("cancel")
    }

    /// Applies defaults and limits; the one place requests are checked (TGI's `validate`).
    pub fn validate(
        self,
        policy: &RequestPolicy,
        fallback_id: impl FnOnce() -> String,
    ) -> Result<ValidRequest, RequestError> {
        if let Some(kind) = &self.kind {
            return Err(RequestError::BadRequest(format!(
                "unknown message type {kind:?}; requests carry no type, cancels use \"cancel\""
            )));
        }
        let id = match self.id {
            Some(id) if id.is_empty() || id.len() > 128 => {
                return Err(RequestError::BadRequest(format!(
                    "id must be 1 to 128 characters, got {} characters",
                    id.len()
                )))
            }
            Some(id) => id,
            None => fallback_id(),
        };
        let input = match (self.prompt, self.messages, self.raw) {
            (Some(_), Some(_), _) => {
                return Err(RequestError::BadRequest(
                    "give either prompt or messages, not both".into(),
                ))
            }
            (None, None, _) => {
                return Err(RequestError::BadRequest(
                    "missing prompt: give prompt or messages".into(),
                ))
            }
            (None, Some(_), true) => {
                return Err(RequestError::BadRequest(
                    "raw applies to prompt, not to messages".into(),
                ))
            }
            (Some(prompt), None, true) => {
                if self.system.is_some() {
                    return Err(RequestError::BadRequest(
                        "system cannot be combined with raw".into(),
                    ));
                }
                PromptInput::Raw(prompt)
            }
            (Some(prompt), None, false) => {
                let mut messages = Vec::new();
                if let Some(system) = self.system.or_else(|| policy.defaults.system.clone()) {
                    messages.push(Message::new("system", system));
                }
                messages.push(Message::new("user", prompt));
                PromptInput::Chat(messages)
            }
            (None, Some(mut given), false) => {
                if given.is_empty() {
                    return Err(RequestError::BadRequest(
                        "messages must not be empty".into(),
                    ));
                }
                for (i, m) in given.iter_mut().enumerate() {
                    check_message(m)
                        .map_err(|e| RequestError::BadRequest(format!("messages[{i}].{e}")))?;
                }
                let has_system = given.iter().any(|m| m.role == "system");
                let mut messages = Vec::with_capacity(given.len() + 1);
                match self.system {
                    Some(_) if has_system => {
                        return Err(RequestError::BadRequest(
                            "system given twice: as a field and in messages".into(),
                        ))
                    }
                    Some(system) => messages.push(Message::new("system", system)),
                    None if !has_system => {
                        if let Some(system) = &policy.defaults.system {
                            messages.push(Message::new("system", system.clone()));
                        }
                    }
                    None => {}
                }
                messages.extend(given);
                PromptInput::Chat(messages)
            }
        };
        let max_tokens = self.max_tokens.unwrap_or(policy.defaults.max_tokens);
        if max_tokens == 0 {
            return Err(RequestError::BadRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if max_tokens > policy.max_tokens_cap {
            return Err(RequestError::TooLong(format!(
                "max_tokens {max_tokens} exceeds the limit max_tokens = {}",
                policy.max_tokens_cap
            )));
        }
        let sampling = SamplingParams {
            temperature: check_range(
                "temperature",
                self.temperature.unwrap_or(policy.defaults.temperature),
                0.0,
                100.0,
            )?,
            top_k: self.top_k.unwrap_or(policy.defaults.top_k),
            top_p: check_range(
                "top_p",
                self.top_p.unwrap_or(policy.defaults.top_p),
                0.0,
                1.0,
            )?,
            min_p: check_range(
                "min_p",
                self.min_p.unwrap_or(policy.defaults.min_p),
                0.0,
                1.0,
            )?,
            repetition_penalty: check_range(
                "repetition_penalty",
                self.repetition_penalty
                    .unwrap_or(policy.defaults.repetition_penalty),
                0.01,
                100.0,
            )?,
            seed: self.seed,
        };
        if sampling.top_p == 0.0 {
            return Err(RequestError::BadRequest(
                "top_p must be greater than 0".into(),
            ));
        }
        let stop = self.stop.unwrap_or_default();
        if stop.len() > policy.max_stop_sequences {
            return Err(RequestError::BadRequest(format!(
                "stop has {} sequences, the limit is {}",
                stop.len(),
                policy.max_stop_sequences
            )));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(RequestError::BadRequest(
                "stop sequences must not be empty".into(),
            ));
        }
        let timeout = match self.timeout_s {
            Some(t) if !(t.is_finite() && t > 0.0) => {
                return Err(RequestError::BadRequest(format!(
                    "timeout_s must be a positive number of seconds, got {t}"
                )))
            }
            // Past what a Duration holds (1e300) is simply longer than the configured one.
            Some(t) => std::time::Duration::try_from_secs_f64(t)
                .map_or(policy.request_timeout, |t| policy.request_timeout.min(t)),
            None => policy.request_timeout,
        };
        let stream_interval_ms = self
            .stream_interval_ms
            .unwrap_or(policy.defaults.stream_interval_ms);
        if stream_interval_ms > MAX_STREAM_INTERVAL_MS {
            return Err(RequestError::BadRequest(format!(
                "stream_interval_ms {stream_interval_ms} is over the limit of {MAX_STREAM_INTERVAL_MS}"
            )));
        }
        let answers_a_result = match &input {
            PromptInput::Chat(messages) => messages.last().is_some_and(|m| m.role == "tool"),
            _ => false,
        };
        let choice = self.tool_choice.or_else(|| {
            let has_tools = self.tools.as_ref().is_some_and(|t| !t.is_empty());
            (policy.defaults.tool_choice == DefaultToolChoice::Required
                && has_tools
                && !answers_a_result)
                .then(|| ToolChoice::Mode("required".into()))
        });
        let tools = tool_use(self.tools, choice)?;
        if tools.is_some() && !matches!(self.response_format, None | Some(ResponseFormat::Text {}))
        {
            return Err(RequestError::BadRequest(
                "response_format cannot be combined with tools: a call is held to its tool's \
                 schema, and a text answer is free"
                    .into(),
            ));
        }
        if tools.is_some() && matches!(input, PromptInput::Raw(_)) {
            return Err(RequestError::BadRequest(
                "tools need the chat template: they cannot be combined with raw".into(),
            ));
        }
        Ok(ValidRequest {
            id,
            input,
            max_tokens,
            sampling,
            stop,
            stream: self.stream.unwrap_or(true),
            timeout,
            reply_to: self.reply_to,
            ignore_eos: self.ignore_eos,
            stream_interval: std::time::Duration::from_millis(stream_interval_ms.into()),
            prompt_ids: None,
            response_format: self.response_format.unwrap_or_default(),
            tools,
            constraint: None,
        })
    }
}

/// Checks one message: its role, and that tool calls and results carry what they need.
/// A call's arguments given as a string of JSON (OpenAI's way) become the object. Errors
/// start with the field's name (the caller adds `messages[i].`).
fn check_message(m: &mut Message) -> Result<(), String> {
    match m.role.as_str() {
        "system" | "user" => {}
        "assistant" => {
            for (j, call) in m.tool_calls.iter_mut().flatten().enumerate() {
                if let serde_json::Value::String(text) = &call.function.arguments {
                    call.function.arguments = serde_json::from_str(text).map_err(|e| {
                        format!("tool_calls[{j}].function.arguments is not JSON: {e}")
                    })?;
                }
                if !call.function.arguments.is_object() {
                    return Err(format!(
                        "tool_calls[{j}].function.arguments must be a JSON object"
                    ));
                }
            }
        }
        "tool" => {}
        role => {
            return Err(format!(
                "role must be system, user, assistant or tool, got {role:?}"
            ))
        }
    }
    if m.role != "assistant" && m.tool_calls.is_some() {
        return Err("tool_calls: only assistant messages carry tool calls".into());
    }
    Ok(())
}

/// Longest tool name accepted (OpenAI's limit).
const MAX_TOOL_NAME: usize = 64;

/// `tools` and `tool_choice` checked and resolved; `None` when the model is not to call any.
fn tool_use(
    tools: Option<Vec<Tool>>,
    choice: Option<ToolChoice>,
) -> Result<Option<ToolUse>, RequestError> {
    let bad = |m: String| Err(RequestError::BadRequest(m));
    let tools = tools.unwrap_or_default();
    for (i, tool) in tools.iter().enumerate() {
        let name = &tool.function.name;
        if tool.kind != "function" {
            return bad(format!(
                "tools[{i}].type must be \"function\", got {:?}",
                tool.kind
            ));
        }
        let well_formed = !name.is_empty()
            && name.len() <= MAX_TOOL_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
        if !well_formed {
            return bad(format!(
                "tools[{i}].function.name must be 1 to {MAX_TOOL_NAME} letters, digits, \
                 '_', '-' or '.', got {name:?}"
            ));
        }
        if tools[..i].iter().any(|t| t.function.name == *name) {
            return bad(format!("tools[{i}]: the name {name:?} is given twice"));
        }
        match &tool.function.parameters {
            None | Some(serde_json::Value::Object(_)) => {}
            Some(_) => {
                return bad(format!(
                    "tools[{i}].function.parameters must be a JSON Schema object"
                ))
            }
        }
    }
    let names = || tools.iter().map(|t| t.function.name.clone()).collect();
    let (required, callable) = match choice {
        None => (false, names()),
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "auto" => (false, names()),
            "none" => return Ok(None),
            "required" => (true, names()),
            other => {
                return bad(format!(
                    "tool_choice must be auto, none, required or a function, got {other:?}"
                ))
            }
        },
        Some(ToolChoice::Function { kind, function }) => {
            if kind != "function" {
                return bad(format!(
                    "tool_choice.type must be \"function\", got {kind:?}"
                ));
            }
            if !tools.iter().any(|t| t.function.name == function.name) {
                return bad(format!(
                    "tool_choice names {:?}, which is not among tools",
                    function.name
                ));
            }
            (true, vec![function.name])
        }
    };
    if tools.is_empty() {
        if required {
            return bad("tool_choice asks for a call, but tools is empty".into());
        }
        return Ok(None);
    }
    Ok(Some(ToolUse {
        tools,
        required,
        callable,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(json: &str) -> Result<ValidRequest, RequestError> {
        parse_request(json.as_bytes())?
            .validate(&crate::config::Config::default().request_policy(), || {
                "gen".into()
            })
    }

    #[test]
    fn a_timeout_too_large_for_a_duration_keeps_the_configured_one() {
        let policy = crate::config::Config::default().request_policy();
        for t in ["1e300", "1.8e19", "1e10"] {
            let r = valid(&format!(r#"{{"prompt":"hi","timeout_s":{t}}}"#)).unwrap();
            assert_eq!(r.timeout, policy.request_timeout, "{t}");
        }
        let r = valid(r#"{"prompt":"hi","timeout_s":0.5}"#).unwrap();
        assert_eq!(r.timeout, std::time::Duration::from_millis(500));
    }

    #[test]
    fn a_value_of_the_wrong_type_is_refused_naming_its_field() {
        for (json, field) in [
            (r#"{"prompt":"hi","max_tokens":"ten"}"#, "max_tokens"),
            (r#"{"prompt":"hi","temperature":[1]}"#, "temperature"),
            (
                r#"{"messages":[{"role":"user","content":7}]}"#,
                "messages[0].content",
            ),
            (r#"{"prompt":"hi","stop":[1,2]}"#, "stop"),
        ] {
            let e = parse_request(json.as_bytes()).unwrap_err();
            assert_eq!(e.code(), ErrorCode::BadRequest);
            assert!(e.to_string().contains(field), "{json}: {e}");
        }
        let e = parse_request(br#"{"prompt":"hi"} trailing"#).unwrap_err();
        assert!(e.to_string().contains("trailing"), "{e}");
    }

    #[test]
    fn response_format_takes_openais_shape_and_names_what_is_wrong() {
        let r = valid(
            r#"{"prompt":"hi","response_format":{"type":"json_schema","json_schema":
                {"name":"c","schema":{"type":"object"},"strict":true}}}"#,
        )
        .unwrap();
        assert_eq!(
            r.response_format,
            ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: Some("c".into()),
                    description: None,
                    schema: serde_json::json!({"type": "object"}),
                    strict: Some(true),
                }
            }
        );
        assert_eq!(
            valid(r#"{"prompt":"hi"}"#).unwrap().response_format,
            ResponseFormat::Text {}
        );
        for (body, names) in [
            (r#"{"type":"xml"}"#, "xml"),
            (r#"{"type":"regex"}"#, "regex"),
            (r#"{"type":"json_object","schema":{}}"#, "schema"),
        ] {
            let json = format!(r#"{{"prompt":"hi","response_format":{body}}}"#);
            let e = valid(&json).unwrap_err();
            assert_eq!(e.code(), ErrorCode::BadRequest);
            assert!(e.to_string().contains(names), "{body}: {e}");
        }
    }

    #[test]
    fn prompt_becomes_a_user_message_with_defaults() {
        let r = valid(r#"{"prompt":"hi"}"#).unwrap();
        assert_eq!(r.id, "gen");
        assert_eq!(r.input, PromptInput::Chat(vec![Message::new("user", "hi")]));
        assert_eq!(r.max_tokens, 256);
        assert!(r.stream);
    }

    #[test]
    fn unknown_fields_are_named_in_the_error() {
        let err = valid(r#"{"prompt":"hi","temprature":0.5}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
        assert!(err.to_string().contains("temprature"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected_with_the_field() {
        let err = valid(r#"{"prompt":"hi","max_tokens":"ten"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn max_tokens_over_the_cap_is_too_long_and_names_the_limit() {
        let err = valid(r#"{"prompt":"hi","max_tokens":100000}"#).unwrap_err();
        assert_eq!(err.code(), ErrorCode::TooLong);
        assert!(err.to_string().contains("max_tokens = 1024"), "{err}");
    }

    #[test]
    fn out_of_range_sampling_values_are_bad_requests() {
        for json in [
            r#"{"prompt":"x","temperature":-1}"#,
            r#"{"prompt":"x","top_p":1.5}"#,
            r#"{"prompt":"x","min_p":2}"#,
            r#"{"prompt":"x","max_tokens":0}"#,
            r#"{"prompt":"x","messages":[]}"#,
            r#"{}"#,
        ] {
            assert_eq!(
                valid(json).unwrap_err().code(),
                ErrorCode::BadRequest,
                "{json}"
            );
        }
    }

    /// Every limit docs/protocol.md gives, at and past its edge: refused with the code it
    /// documents and a message that names the field; the edge itself passes.
    #[test]
    fn each_documented_limit_is_refused_naming_its_field() {
        let long_id = "i".repeat(129);
        let nine_stops = serde_json::to_string(&vec!["s"; 9]).unwrap();
        let refused = [
            (
                r#"{"id":"","prompt":"x"}"#.to_string(),
                "id",
                ErrorCode::BadRequest,
            ),
            (
                format!(r#"{{"id":"{long_id}","prompt":"x"}}"#),
                "id",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","messages":[{"role":"user","content":"y"}]}"#.into(),
                "prompt or messages",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"messages":[{"role":"user","content":"y"}],"raw":true}"#.into(),
                "raw",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","raw":true,"system":"s"}"#.into(),
                "system",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"messages":[{"role":"robot","content":"y"}]}"#.into(),
                "messages[0].role",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"messages":[{"role":"user","content":"y","tool_calls":[{"function":
                    {"name":"f","arguments":{}}}]}]}"#
                    .into(),
                "messages[0].tool_calls: only assistant messages",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"messages":[{"role":"assistant","tool_calls":[{"function":
                    {"name":"f","arguments":"{not json"}}]}]}"#
                    .into(),
                "messages[0].tool_calls[0].function.arguments is not JSON",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","tools":[{"type":"function","function":{"name":"a b"}}]}"#
                    .into(),
                "tools[0].function.name",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","raw":true,"tools":[{"type":"function","function":{"name":"f"}}]}"#
                    .into(),
                "cannot be combined with raw",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"system":"a","messages":[{"role":"system","content":"b"}]}"#.into(),
                "system",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","max_tokens":0}"#.into(),
                "max_tokens",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","max_tokens":1025}"#.into(),
                "max_tokens",
                ErrorCode::TooLong,
            ),
            (
                r#"{"prompt":"x","temperature":100.5}"#.into(),
                "temperature",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","temperature":-0.1}"#.into(),
                "temperature",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","top_p":0}"#.into(),
                "top_p",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","top_p":1.01}"#.into(),
                "top_p",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","min_p":-0.5}"#.into(),
                "min_p",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","min_p":1.5}"#.into(),
                "min_p",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","repetition_penalty":0}"#.into(),
                "repetition_penalty",
                ErrorCode::BadRequest,
            ),
            (
                format!(r#"{{"prompt":"x","stop":{nine_stops}}}"#),
                "stop",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","stop":[""]}"#.into(),
                "stop",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","timeout_s":0}"#.into(),
                "timeout_s",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","timeout_s":-3}"#.into(),
                "timeout_s",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","top_k":-1}"#.into(),
                "top_k",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","seed":1.5}"#.into(),
                "seed",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"prompt":"x","stream":"yes"}"#.into(),
                "stream",
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"cancelled","id":"a"}"#.into(),
                "cancel",
                ErrorCode::BadRequest,
            ),
        ];
        for (json, field, code) in &refused {
            let err = valid(json).unwrap_err();
            assert_eq!(err.code(), *code, "{json}: {err}");
            assert!(
                err.to_string().contains(field),
                "{json}: {err} should name {field}"
            );
        }
        let id_128 = "i".repeat(128);
        let eight_stops = serde_json::to_string(&vec!["s"; 8]).unwrap();
        for json in [
            format!(r#"{{"id":"{id_128}","prompt":"x"}}"#),
            r#"{"prompt":"x","max_tokens":1024,"temperature":100,"top_p":1,"min_p":1}"#.into(),
            r#"{"prompt":"x","temperature":0,"min_p":0,"repetition_penalty":0.01,"top_k":0}"#
                .into(),
            format!(r#"{{"prompt":"x","stop":{eight_stops},"timeout_s":0.001}}"#),
        ] {
            assert!(valid(&json).is_ok(), "{json}: {:?}", valid(&json).err());
        }
    }

    #[test]
    fn system_field_is_prepended_to_messages() {
        let r =
            valid(r#"{"system":"be brief","messages":[{"role":"user","content":"a"}]}"#).unwrap();
        let PromptInput::Chat(m) = r.input else {
            panic!()
        };
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].content, "a");
    }

    #[test]
    fn per_request_timeout_only_lowers_the_configured_one() {
        let r = valid(r#"{"prompt":"x","timeout_s":99999}"#).unwrap();
        assert_eq!(
            r.timeout,
            crate::config::Config::default()
                .request_policy()
                .request_timeout
        );
        let r = valid(r#"{"prompt":"x","timeout_s":2}"#).unwrap();
        assert_eq!(r.timeout.as_secs(), 2);
    }

    #[test]
    fn events_serialize_to_the_wire_shape() {
        let e = Event::Token {
            id: "r1".into(),
            seq: 0,
            text: "The".into(),
            token: 504,
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"token","id":"r1","seq":0,"text":"The","token":504}"#
        );
        let e = Event::error("r1", ErrorCode::Busy, "queue full");
        assert_eq!(
            e.to_json(),
            r#"{"type":"error","id":"r1","code":"busy","message":"queue full"}"#
        );
    }
}
