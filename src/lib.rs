//! emberd: one decoder-only language model, kept loaded, serving local and IoT clients.
//!
//! | module | job |
//! |---|---|
//! | [`protocol`] | the wire contract: `Request` → `ValidRequest`, `Event`s, error codes |
//! | [`config`] | the TOML config, every field defaulted, validated at start |
//! | [`model`] | a model package directory: ONNX file(s), tokenizer, configs, layout detection |
//! | [`engine`] | one forward step: ONNX Runtime (`engine::ort`) or tract (`engine::tract`), KV cache |
//! | [`generate`] | template → tokenize → prefill → sample → detokenize → stop; the one loop |
//! | [`scheduler`] | bounded queue, the engine worker thread, cancellation, deadlines |
//! | [`ingress`] | the one request path: size, parse, cancel, validate, ids, submit, forward |
//! | [`transport`] | Unix socket (NDJSON) and MQTT v5: framing only, messages ↔ the ingress |
//! | [`serve`] | the daemon: scheduler + transports until shutdown, then drain |
//! | [`service`] | systemd: sd_notify, watchdog, socket activation, journald logging |
//! | [`shutdown`] | the one shutdown signal every task watches |
//! | [`client`] | the client side of both APIs, for `emberd ask` |
//! | [`bench`] | load/prefill/decode figures of one model on this machine |
//! | [`paths`] | where the setup's files are found when nothing names them |
//! | [`secret`] | reading a password or key file, refusing one every user may read |

pub mod bench;
pub mod client;
pub mod config;
pub mod engine;
pub mod generate;
pub mod ingress;
pub mod metrics;
pub mod model;
pub mod paths;
pub mod protocol;
pub mod scheduler;
pub mod secret;
pub mod serve;
pub mod service;
pub mod shutdown;
pub mod transport;
