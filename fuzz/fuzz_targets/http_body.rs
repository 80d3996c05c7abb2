//! An HTTP API body decoded as each generation route does, then validated like any request.
#![no_main]

use emberd::transport::http::decode_body;
use libfuzzer_sys::fuzz_target;

mod model;

const ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
];

fuzz_target!(|input: &[u8]| {
    // The first byte picks the route, the rest is the body.
    let Some((&pick, body)) = input.split_first() else {
        return;
    };
    let path = ROUTES[usize::from(pick) % ROUTES.len()];
    match decode_body(path, body, "smollm2-135m-instruct") {
        Ok(Some(request)) => {
            let _ = request.validate(model::policy(), || "generated".into());
        }
        Ok(None) => {}
        Err(message) => assert!(!message.is_empty()),
    }
});
