//! Arbitrary token ids through the incremental detokenizer and the stop matcher, as the
//! generator streams them: what is emitted must equal the one-shot decode of all the ids,
//! cut at the first stop sequence.
#![no_main]

use emberd::generate::detok::IncrementalDecoder;
use emberd::generate::stop::{StopCheck, StopMatcher};
use libfuzzer_sys::fuzz_target;

mod model;

fuzz_target!(|input: &[u8]| {
    // Up to two stop sequences (length-prefixed), then the ids as little-endian u16s.
    let mut rest = input;
    let mut stops = Vec::new();
    for _ in 0..2 {
        let Some((&len, tail)) = rest.split_first() else {
            return;
        };
        let len = usize::from(len % 8);
        if tail.len() < len {
            return;
        }
        let (stop, tail) = tail.split_at(len);
        if let Ok(stop) = std::str::from_utf8(stop) {
            if !stop.is_empty() {
                stops.push(stop.to_string());
            }
        }
        rest = tail;
    }
    let tokenizer = model::prompter().tokenizer();
    let vocab = tokenizer.vocab_size() as u32;
    let ids: Vec<u32> = rest
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % vocab)
        .take(64)
        .collect();

    let mut decoder = IncrementalDecoder::new();
    let mut streamed = String::new();
    for &id in &ids {
        streamed.push_str(&decoder.push(tokenizer, id).expect("decodes"));
    }
    streamed.push_str(&decoder.finish(tokenizer).expect("decodes"));
    let whole = tokenizer.decode(&ids, true).expect("decodes");
    assert_eq!(streamed, whole, "ids {ids:?}");

    // The same text in the pieces the decoder made, through the stop matcher.
    let mut matcher = StopMatcher::new(stops.clone());
    let mut decoder = IncrementalDecoder::new();
    let mut emitted = String::new();
    let mut stopped = false;
    for &id in &ids {
        let piece = decoder.push(tokenizer, id).expect("decodes");
        match matcher.push(&piece) {
            StopCheck::Continue(text) => emitted.push_str(&text),
            StopCheck::Stopped(text) => {
                emitted.push_str(&text);
                stopped = true;
                break;
            }
        }
    }
    if !stopped {
        match matcher.push(&decoder.finish(tokenizer).expect("decodes")) {
            StopCheck::Continue(text) => emitted.push_str(&text),
            StopCheck::Stopped(text) => {
                emitted.push_str(&text);
                stopped = true;
            }
        }
        if !stopped {
            emitted.push_str(&matcher.flush());
        }
    }
    let first_stop = stops.iter().filter_map(|s| whole.find(s.as_str())).min();
    let expected = &whole[..first_stop.unwrap_or(whole.len())];
    assert_eq!(emitted, expected, "stops {stops:?}, ids {ids:?}");
    assert_eq!(stopped, first_stop.is_some());
});
