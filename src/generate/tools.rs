//! Tool calling: how a request's tools reach the model, the grammar a call is held to, and
//! the call read back from what the model wrote.
//!
//! A call is written as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the
//! Hermes form that Qwen's and SmolLM's templates teach). Decoding is constrained to it, with
//! the arguments held to the function's own schema, so a call always parses and validates.
//! With `tool_choice: "auto"` the grammar also allows text that does not start with the
//! call's opening marker: once the text leaves the marker, it is streamed as an answer.
//!
//! A chat template that uses `tools` gets them in its context and the messages as they are.
//! Any other gets [`system_prompt`] and the calls and results of earlier turns written in
//! that same form, as text it can render.

use serde_json::{json, Value};

use crate::protocol::{FunctionCall, Message, Tool, ToolCall, ToolUse};

const OPEN: &str = "<tool_call>\n";
const CLOSE: &str = "\n</tool_call>";

/// The system prompt that tells a model without tool support in its template about the
/// tools (appended to the request's own system message, if it has one).
pub fn system_prompt(tools: &[Tool]) -> String {
    let mut prompt = String::from(
        "You can call functions to act or to find things out. They are listed as JSON \
         within <tools></tools>:\n<tools>\n",
    );
    for tool in tools {
        prompt.push_str(&serde_json::to_string(tool).expect("tools serialize"));
        prompt.push('\n');
    }
    prompt.push_str(
        "</tools>\nTo call one, reply with only this, the arguments following the \
         function's parameters:\n<tool_call>\n{\"name\": \"function name\", \"arguments\": \
         {\"parameter\": \"value\"}}\n</tool_call>\nOtherwise, answer in plain text. A \
         function's result comes back within <tool_response></tool_response>: then answer \
         the user in plain text with it.",
    );
    prompt
}

/// The messages as a template without tool support can render them: the tool prompt in the
/// system message, earlier calls as the assistant's text, results within
/// `<tool_response></tool_response>` as turns of `result_role` ("tool"; "user" for a template
/// that refuses other roles).
pub fn plain_messages(
    messages: &[Message],
    tools: Option<&ToolUse>,
    result_role: &str,
) -> Vec<Message> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if let Some(tools) = tools {
        let prompt = system_prompt(&tools.tools);
        let content = match messages.split_first() {
            Some((first, after)) if first.role == "system" => {
                rest = after;
                format!("{}\n\n{prompt}", first.content)
            }
            _ => prompt,
        };
        out.push(Message::new("system", content));
    }
    for m in rest {
        out.push(match (m.role.as_str(), &m.tool_calls) {
            ("assistant", Some(calls)) => {
                let mut content = m.content.clone();
                for call in calls {
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&written(&call.function));
                }
                Message::new("assistant", content)
            }
            ("tool", _) => Message::new(
                result_role,
                format!("<tool_response>\n{}\n</tool_response>", m.content),
            ),
            _ => Message::new(m.role.clone(), m.content.clone()),
        });
    }
    out
}

/// A call as the model writes it: the name first, as the grammar has it.
fn written(call: &FunctionCall) -> String {
    let name = serde_json::to_string(&call.name).expect("strings serialize");
    format!(
        "{OPEN}{{\"name\": {name}, \"arguments\": {}}}{CLOSE}",
        call.arguments
    )
}

/// The Lark grammar (llguidance's dialect) a request with `tools` is held to: one call to a
/// callable function, its arguments valid under that function's schema; with `auto`, plain
/// text (not starting with the call's marker) instead.
pub fn grammar(tools: &ToolUse) -> String {
    let calls: Vec<Value> = tools
        .tools
        .iter()
        .filter(|t| tools.callable.contains(&t.function.name))
        .map(|t| {
            let mut parameters = t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            // Only the parameters the tool names: a schema that says nothing of others
            // (Home Assistant's) would let a small model invent keys, which the tool refuses.
            if let Some(object) = parameters.as_object_mut() {
                object
                    .entry("additionalProperties")
                    .or_insert(Value::Bool(false));
            }
            bound_lengths(&mut parameters);
            json!({
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = if calls.len() == 1 {
        calls.into_iter().next().expect("one")
    } else {
        json!({"anyOf": calls})
    };
    schema["x-guidance"] = super::constraint::compact_json_options();
    let call = format!(
        "call: {} %json {schema} {}\n",
        lark_string(OPEN),
        lark_string(CLOSE)
    );
    if tools.required {
        format!("start: call\n{call}")
    } else {
        format!(
            "start: call | TEXT\n{call}TEXT: /{}/\n",
            not_starting_with(OPEN)
        )
    }
}

/// Items in an argument array whose schema sets no `maxItems`: a small model sampling an
/// unbounded array (Home Assistant's `device_class`) can repeat an item until `max_tokens`
/// cuts the call off. An array of enum values gets at most as many items as there are values.
pub const MAX_ARRAY_ITEMS: usize = 16;

/// Characters in an argument string whose schema sets no `maxLength`: sampled at Home
/// Assistant's default temperature, SmolLM2 ran a `name` on until `max_tokens` cut the
/// call off (about one run in eight).
pub const MAX_STRING_CHARS: usize = 200;

/// Sets `maxItems` on every array and `maxLength` on every free string in `schema` that has
/// none (see [`MAX_ARRAY_ITEMS`], [`MAX_STRING_CHARS`]).
fn bound_lengths(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let free_string = object.get("type").is_some_and(|t| t == "string")
        && !["maxLength", "enum", "const", "pattern", "format"]
            .iter()
            .any(|k| object.contains_key(*k));
    if free_string {
        object.insert("maxLength".into(), json!(MAX_STRING_CHARS));
    }
    let is_array = object.get("type").is_some_and(|t| t == "array") || object.contains_key("items");
    if is_array && !object.contains_key("maxItems") {
        let choices = object
            .get("items")
            .and_then(|items| items.get("enum"))
            .and_then(Value::as_array)
            .map(Vec::len);
        let limit = choices.unwrap_or(MAX_ARRAY_ITEMS).clamp(1, MAX_ARRAY_ITEMS);
        object.insert("maxItems".into(), json!(limit));
    }
    for (key, value) in object.iter_mut() {
        match key.as_str() {
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                if let Some(children) = value.as_object_mut() {
                    children.values_mut().for_each(bound_lengths);
                }
            }
            "items" | "additionalProperties" => bound_lengths(value),
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Some(children) = value.as_array_mut() {
                    children.iter_mut().for_each(bound_lengths);
                }
            }
            _ => {}
        }
    }
}

/// A regular expression (no lookahead in llguidance's) for any text that does not start
/// with `marker`: it leaves the marker at some character. (Text that is a strict prefix of the
/// marker, such as a lone `<`, is left out: no answer is that.)
fn not_starting_with(marker: &str) -> String {
    let mut branches = Vec::new();
    let mut prefix = String::new();
    for c in marker.chars() {
        let class = match c {
            '\n' => "\\n".to_string(),
            c if c.is_ascii_alphanumeric() || c == '_' || c == '<' || c == '>' => c.to_string(),
            c => format!("\\{c}"),
        };
        branches.push(format!("{prefix}[^{class}]"));
        prefix.push_str(&class);
    }
    format!("({})(.|\\n)*", branches.join("|"))
}

/// `text` as a Lark string literal.
fn lark_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

/// Whether what the model has written so far may still be a call (and is held back).
pub fn may_be_call(tools: &ToolUse, text: &str) -> bool {
    tools.required || text.starts_with(OPEN) || OPEN.starts_with(text)
}

/// The call in `text`, if it is one (the grammar made it so unless generation was cut
/// short); its id is made from the request's.
pub fn parse(text: &str, request_id: &str) -> Option<Vec<ToolCall>> {
    let body = text.strip_prefix(OPEN)?.strip_suffix(CLOSE)?;
    let mut call: Value = serde_json::from_str(body).ok()?;
    let name = call.get("name")?.as_str()?.to_string();
    let arguments = call.get_mut("arguments")?.take();
    arguments.is_object().then(|| {
        vec![ToolCall {
            id: Some(format!("call_{request_id}")),
            kind: "function".into(),
            function: FunctionCall { name, arguments },
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        serde_json::from_value(json!({"type": "function", "function": {"name": name,
            "parameters": {"type": "object", "properties": {"room": {"enum": ["hall"]}}}}}))
        .unwrap()
    }

    #[test]
    fn a_written_call_parses_back_and_text_does_not() {
        let call = FunctionCall {
            name: "get_temperature".into(),
            arguments: json!({"room": "hall"}),
        };
        let calls = parse(&written(&call), "r1").unwrap();
        assert_eq!(calls[0].function, call);
        assert_eq!(calls[0].id.as_deref(), Some("call_r1"));
        assert_eq!(parse("It is warm.", "r1"), None);
        assert_eq!(parse("<tool_call>\n{\"name\": \"get_te", "r1"), None);
    }

    #[test]
    fn history_is_written_for_a_template_without_tools() {
        let tools = ToolUse {
            tools: vec![tool("get_temperature")],
            required: false,
            callable: vec!["get_temperature".into()],
        };
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(
            parse(
                &written(&FunctionCall {
                    name: "get_temperature".into(),
                    arguments: json!({"room": "hall"}),
                }),
                "r1",
            )
            .unwrap(),
        );
        let messages = vec![
            Message::new("system", "Be brief."),
            Message::new("user", "How warm is the hall?"),
            call,
            Message::new("tool", "21.5"),
        ];
        let out = plain_messages(&messages, Some(&tools), "tool");
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert!(out[0]
            .content
            .starts_with("Be brief.\n\nYou can call functions"));
        assert!(out[0].content.contains("\"name\":\"get_temperature\""));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"get_temperature\", \"arguments\": {\"room\":\"hall\"}}\n</tool_call>"
        );
        assert_eq!(out[3].content, "<tool_response>\n21.5\n</tool_response>");
        // Without a system message, the tool prompt becomes one.
        let out = plain_messages(&messages[1..], Some(&tools), "user");
        assert_eq!(out[3].role, "user");
        assert_eq!(out[0].role, "system");
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn the_grammar_names_only_the_callable_functions() {
        let tools = ToolUse {
            tools: vec![tool("a"), tool("b")],
            required: true,
            callable: vec!["b".into()],
        };
        let g = grammar(&tools);
        assert!(g.starts_with("start: call\n"), "{g}");
        assert!(
            g.contains(r#""const":"b""#) && !g.contains(r#""const":"a""#),
            "{g}"
        );
        let auto = ToolUse {
            required: false,
            callable: vec!["a".into(), "b".into()],
            ..tools
        };
        assert!(grammar(&auto).contains("anyOf") && grammar(&auto).contains("TEXT"));
    }

    #[test]
    fn arrays_and_strings_without_a_bound_get_one() {
        let mut schema = json!({"type": "object", "properties": {
            "domain": {"type": "array", "items": {"type": "string"}},
            "device_class": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "given": {"type": "array", "items": {"type": "integer"}, "maxItems": 40},
            "nested": {"type": "object", "properties": {"tags": {"items": {"type": "string"}}}},
        }});
        bound_lengths(&mut schema);
        let p = &schema["properties"];
        assert_eq!(p["domain"]["maxItems"], MAX_ARRAY_ITEMS);
        assert_eq!(p["device_class"]["maxItems"], 2);
        assert_eq!(p["given"]["maxItems"], 40);
        assert_eq!(
            p["nested"]["properties"]["tags"]["maxItems"],
            MAX_ARRAY_ITEMS
        );
    }

    #[test]
    fn text_is_held_only_while_it_may_still_open_a_call() {
        let auto = ToolUse {
            tools: vec![tool("a")],
            required: false,
            callable: vec!["a".into()],
        };
        assert!(may_be_call(&auto, ""));
        assert!(may_be_call(&auto, "<tool_c"));
        assert!(may_be_call(&auto, "<tool_call>\n{\"na"));
        assert!(!may_be_call(&auto, "<tool_r"));
        assert!(!may_be_call(&auto, "It is"));
        let required = ToolUse {
            required: true,
            ..auto
        };
        assert!(may_be_call(&required, "It is"));
    }
}
