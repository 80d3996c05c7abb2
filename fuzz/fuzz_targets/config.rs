//! A config file: parse, validate, and what the daemon derives from it at start.
#![no_main]

use emberd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    let policy = config.request_policy();
    assert!(policy.max_tokens_cap >= 1);
    assert!(!policy.request_timeout.is_zero());
    assert!(config.model.resolved_threads() >= 1);
    let _ = config.model.model_dir();
    for provider in &config.model.providers {
        let _ = config.model.options_of(provider);
    }
});
