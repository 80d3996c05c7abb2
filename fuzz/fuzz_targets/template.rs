//! The default model's chat template rendered with arbitrary messages (tool results too,
//! which its template renders through emberd's tool prompt path), then tokenized.
#![no_main]

use emberd::protocol::Message;
use libfuzzer_sys::fuzz_target;

mod model;

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fuzz_target!(|input: &[u8]| {
    // Messages separated by 0xff bytes; each one's first byte picks its role.
    let messages: Vec<Message> = input
        .split(|&b| b == 0xff)
        .filter_map(|part| {
            let (&role, content) = part.split_first()?;
            Some(Message::new(
                ROLES[usize::from(role) % ROLES.len()],
                String::from_utf8_lossy(content).into_owned(),
            ))
        })
        .collect();
    let generation_prompt = input.first().is_some_and(|b| b & 1 == 0);
    let prompter = model::prompter();
    let Ok(text) = prompter.render(&messages, None, generation_prompt) else {
        return;
    };
    // Every message's text reaches the model, as given.
    for m in &messages {
        assert!(
            text.contains(&m.content),
            "{:?} is missing from {text:?}",
            m.content
        );
    }
    prompter
        .tokenizer()
        .encode(&text)
        .expect("a rendered prompt tokenizes");
});
