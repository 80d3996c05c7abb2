//! From a request to what the model is fed and held to: the chat template, the tokenizer,
//! the prompt's length limits and the compiled `response_format`. Shared (behind an `Arc`)
//! by the ingress, which tokenizes, checks the length and compiles the grammar before a
//! request takes a queue slot, and the generator, which detokenizes what the model produces.

use super::constraint::{Constraint, Grammars};
use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use super::GenerateError;
use crate::model::ModelPackage;
use crate::protocol::{Message, PromptInput, ResponseFormat, ToolUse, ValidRequest};

pub struct Prompter {
    tokenizer: Tokenizer,
    grammars: Grammars,
    template: Option<ChatTemplate>,
    /// Positions the KV cache may hold (the model's, or less when configured).
    context_len: usize,
    /// The longest prompt accepted (`limits.max_prompt_tokens`, at most `context_len`).
    max_prompt_tokens: usize,
}

impl Prompter {
    pub fn load(package: &ModelPackage) -> Result<Self, GenerateError> {
        let tokenizer = Tokenizer::load(package)?;
        let grammars = Grammars::new(&tokenizer, &package.eos_ids);
        let template = match &package.chat_template {
            Some(source) => Some(ChatTemplate::new(
                source,
                &package.bos_token,
                &package.eos_token,
            )?),
            None => None,
        };
        Ok(Prompter {
            tokenizer,
            grammars,
            template,
            context_len: package.context_len,
            max_prompt_tokens: package.context_len,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// The generator's context length (at most the model's).
    pub fn set_context_len(&mut self, context_len: usize) {
        self.context_len = context_len.max(1);
        self.max_prompt_tokens = self.max_prompt_tokens.min(self.context_len);
    }

    pub fn set_max_prompt_tokens(&mut self, limit: usize) {
        self.max_prompt_tokens = limit.min(self.context_len);
    }

    /// Renders `messages` with the model's chat template, with `tools` in its context where
    /// it reads them, else told by the default tool prompt (`tools::plain_messages`).
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&ToolUse>,
        add_generation_prompt: bool,
    ) -> Result<String, GenerateError> {
        let template = self.template.as_ref().ok_or(GenerateError::NoTemplate)?;
        let has_tool_turns = messages
            .iter()
            .any(|m| m.role == "tool" || m.tool_calls.is_some());
        if template.knows_tools() || (tools.is_none() && !has_tool_turns) {
            let tools = tools.map(|t| t.tools.as_slice());
            return template.render(messages, tools, add_generation_prompt);
        }
        // Results as "tool" turns; as user turns where the template allows only the usual
        // roles (it raises on others).
        let plain = |role| super::tools::plain_messages(messages, tools, role);
        template
            .render(&plain("tool"), None, add_generation_prompt)
            .or_else(|_| template.render(&plain("user"), None, add_generation_prompt))
    }

    /// The text the model sees for `input`, told about `tools`.
    pub fn text(
        &self,
        input: &PromptInput,
        tools: Option<&ToolUse>,
    ) -> Result<String, GenerateError> {
        match input {
            PromptInput::Raw(text) => Ok(text.clone()),
            PromptInput::Tokens(ids) => self.tokenizer.decode(ids, false),
            PromptInput::Chat(messages) => self.render(messages, tools, true),
        }
    }

    /// The token ids of `input`, without a length check.
    pub fn ids(&self, input: &PromptInput) -> Result<Vec<u32>, GenerateError> {
        self.ids_with(input, None)
    }

    fn ids_with(
        &self,
        input: &PromptInput,
        tools: Option<&ToolUse>,
    ) -> Result<Vec<u32>, GenerateError> {
        if let PromptInput::Tokens(ids) = input {
            return Ok(ids.clone());
        }
        let text = self.text(input, tools)?;
        // Templates write their own special tokens, so the tokenizer must not add more.
        self.tokenizer.encode(&text)
    }

    /// `format` compiled for one request; None for plain text.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Option<Constraint>, GenerateError> {
        self.grammars.compile(format)
    }

    /// What `request` is fed and held to: its prompt ids, checked against the limits, and
    /// its grammar, compiled.
    pub fn prepare(
        &self,
        request: &ValidRequest,
    ) -> Result<(Vec<u32>, Option<Constraint>), GenerateError> {
        Ok((self.checked_ids(request)?, self.constraint_for(request)?))
    }

    /// The prompt ids of `request` (its tools told to the model), checked against the limits.
    pub fn checked_ids(&self, request: &ValidRequest) -> Result<Vec<u32>, GenerateError> {
        let ids = self.ids_with(&request.input, request.tools.as_ref())?;
        self.check(&ids)?;
        Ok(ids)
    }

    /// The grammar `request` is held to: its tools' or its `response_format`; None for free
    /// text.
    pub fn constraint_for(
        &self,
        request: &ValidRequest,
    ) -> Result<Option<Constraint>, GenerateError> {
        let Some(tools) = &request.tools else {
            return self.constraint(&request.response_format);
        };
        let lark = super::tools::grammar(tools);
        self.grammars
            .compile(&ResponseFormat::Lark { lark })
            .map_err(|e| match e {
                GenerateError::InvalidFormat(why) => GenerateError::InvalidTools(why),
                e => e,
            })
    }

    /// Checks prompt ids against the limits: not empty, within `max_prompt_tokens`, and
    /// leaving room in the context for one generated token.
    pub fn check(&self, ids: &[u32]) -> Result<(), GenerateError> {
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if ids.len() > self.max_prompt_tokens {
            let what = if self.max_prompt_tokens < self.context_len {
                "max_prompt_tokens"
            } else {
                "the model's context length"
            };
            return Err(GenerateError::PromptTooLong {
                tokens: ids.len(),
                limit: self.max_prompt_tokens,
                what,
            });
        }
        if ids.len() >= self.context_len {
            return Err(GenerateError::PromptTooLong {
                tokens: ids.len(),
                limit: self.context_len - 1,
                what: "the context length, leaving room for one generated token",
            });
        }
        Ok(())
    }
}
