//! The model's chat template (Jinja, from tokenizer_config.json), rendered with the
//! semantics of Hugging Face `apply_chat_template`.

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::protocol::{Message, Tool};

use super::GenerateError;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template reads `tools` (Hugging Face's convention for tool support).
    knows_tools: bool,
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [Message],
    /// Absent unless given, so that `tools is defined` is false without tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [Tool]>,
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, GenerateError> {
        let mut env = Environment::new();
        // HF renders with trim_blocks and lstrip_blocks on, and keeps a trailing newline off.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                GenerateError::Template(format!("the chat template does not parse: {e}"))
            })?;
        let knows_tools = env
            .get_template("chat")
            .expect("just added")
            .undeclared_variables(false)
            .contains("tools");
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            knows_tools,
        })
    }

    /// Whether the template renders tools, calls and results itself.
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Tool]>,
        add_generation_prompt: bool,
    ) -> Result<String, GenerateError> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(Context {
                messages,
                tools,
                add_generation_prompt,
                bos_token: &self.bos_token,
                eos_token: &self.eos_token,
            })
            .map_err(|e| {
                GenerateError::Template(format!("rendering the chat template failed: {e}"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", "", "").unwrap();
        let err = t.render(&[], None, true).unwrap_err();
        assert!(err.to_string().contains("only user turns"), "{err}");
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip().upper() }}", "", "").unwrap();
        let m = vec![Message::new("user", "  hi ")];
        assert_eq!(t.render(&m, None, false).unwrap(), "HI");
    }

    #[test]
    fn a_template_that_reads_tools_gets_them() {
        let source = "{% if tools is defined %}{{ tools[0].function.name }}{% endif %}\
                      {{ messages[0].content }}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        assert!(t.knows_tools());
        let tool: Tool =
            serde_json::from_str(r#"{"type": "function", "function": {"name": "set_light"}}"#)
                .unwrap();
        let m = vec![Message::new("user", "hi")];
        assert_eq!(t.render(&m, Some(&[tool]), false).unwrap(), "set_lighthi");
        assert_eq!(t.render(&m, None, false).unwrap(), "hi");
        assert!(!ChatTemplate::new("{{ messages }}", "", "")
            .unwrap()
            .knows_tools());
    }
}
