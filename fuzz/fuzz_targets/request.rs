//! A wire message through the ingress's checks: decode, validate, template, tokenize, length.
#![no_main]

use emberd::protocol::{id_hint, parse_request, ErrorCode};
use libfuzzer_sys::fuzz_target;

mod model;

fuzz_target!(|bytes: &[u8]| {
    let request = match parse_request(bytes) {
        Ok(request) => request,
        Err(e) => {
            assert_eq!(e.code(), ErrorCode::BadRequest);
            assert!(!e.to_string().is_empty());
            // The error event carries the id when the message has one.
            let _ = id_hint(bytes);
            return;
        }
    };
    if request.is_cancel() {
        return;
    }
    let policy = model::policy();
    let valid = match request.validate(policy, || "generated".into()) {
        Ok(valid) => valid,
        Err(e) => {
            assert!(matches!(
                e.code(),
                ErrorCode::BadRequest | ErrorCode::TooLong
            ));
            return;
        }
    };
    assert!(valid.max_tokens >= 1 && valid.max_tokens <= policy.max_tokens_cap);
    assert!(valid.timeout <= policy.request_timeout);
    assert!(!valid.id.is_empty() && valid.id.len() <= 128);
    assert!(valid.stop.iter().all(|s| !s.is_empty()));
    let prompter = model::prompter();
    if let Ok(ids) = prompter.checked_ids(&valid) {
        assert!(!ids.is_empty() && ids.len() < prompter.context_len());
    }
});
