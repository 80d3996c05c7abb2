//! A `response_format` compiled for the default model's tokenizer, then a few constrained
//! steps as the generator takes them: every mask leaves a token (or end-of-sequence) to pick,
//! and every token a mask allows is accepted.
#![no_main]

use emberd::protocol::ResponseFormat;
use libfuzzer_sys::fuzz_target;

mod model;

fuzz_target!(|input: &[u8]| {
    // A NUL separates the format (JSON) from the bytes that pick the tokens.
    let (format, picks) = match input.iter().position(|&b| b == 0) {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (input, &[][..]),
    };
    let Ok(format) = serde_json::from_slice::<ResponseFormat>(format) else {
        return;
    };
    let model = model::model();
    let Ok(Some(mut constraint)) = model.prompter.constraint(&format) else {
        return;
    };
    let vocab = model.prompter.tokenizer().vocab_size() as u32;
    for &pick in picks.iter().take(16) {
        if constraint.is_finished() {
            break;
        }
        let mask = constraint
            .mask()
            .expect("an unfinished constraint gives a mask");
        // End-of-sequence ends the output; the generator never commits it.
        let allowed: Vec<u32> = (0..vocab)
            .filter(|&id| mask.allows(id) && !model.eos_ids.contains(&id))
            .collect();
        assert!(
            !allowed.is_empty() || mask.allows_eos(),
            "the mask for {format:?} allows nothing"
        );
        let Some(&token) = allowed.get(usize::from(pick) % allowed.len().max(1)) else {
            break;
        };
        constraint
            .commit(token)
            .expect("a token the mask allowed is accepted");
    }
});
