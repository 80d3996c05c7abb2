//! The TOML config. Every field has a default, so an empty file (or none) is valid;
//! `validate` checks the values once at start with messages that name the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::Backend;
use crate::protocol::{GenerationDefaults, RequestPolicy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub generation: GenerationDefaults,
    pub limits: LimitsConfig,
    pub socket: SocketConfig,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Model package directory; the setup's default package when absent.
    pub dir: Option<PathBuf>,
    pub backend: Backend,
    /// Execution providers in priority order.
    pub providers: Vec<String>,
    /// Per provider, the options ONNX Runtime passes to it (`[model.provider_options.openvino]
    /// device_type = "GPU"`), as the provider's documentation names them.
    pub provider_options: BTreeMap<String, BTreeMap<String, OptionValue>>,
    pub ort_library: Option<PathBuf>,
    /// 0: one per core.
    pub threads: usize,
    /// Context length cap (KV cache size); 0: the model's own.
    pub context: usize,
    /// Prompt tokens per forward call in prefill; smaller reacts faster to cancellation.
    pub prefill_chunk: usize,
    /// ONNX Runtime's CPU memory arena; off by default. It extends itself by doubling when the
    /// shapes of a step vary (prompt lengths, batch sizes) and never gives memory back (a
    /// soak saw its region go from 128 to 256 MB). Off, what a step frees goes back to
    /// malloc, which the engine worker trims (decode speed the same, prefill a little slower).
    pub cpu_arena: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dir: None,
            backend: Backend::Auto,
            providers: vec!["cpu".into()],
            provider_options: BTreeMap::new(),
            ort_library: None,
            threads: 0,
            context: 0,
            prefill_chunk: crate::generate::DEFAULT_PREFILL_CHUNK,
            cpu_arena: false,
        }
    }
}

impl ModelConfig {
    /// The thread count to give the engine. 0 is resolved here, from the CPUs this process
    /// may run on (affinity and cgroup quota), rather than left to ONNX Runtime: left to
    /// itself it reads /proc/cpuinfo (hidden by the unit's ProcSubset=pid) and pins its
    /// threads with sched_setaffinity (refused by the unit's seccomp filter: SIGSYS).
    pub fn resolved_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The options for provider `name`, as ONNX Runtime takes them: strings.
    pub fn options_of(&self, name: &str) -> Vec<(String, String)> {
        self.provider_options
            .get(name)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }

    pub fn model_dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(crate::paths::default_model_dir)
    }
}

/// A provider option as TOML writes it; ONNX Runtime takes every option as a string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::String(s) => f.write_str(s),
            OptionValue::Integer(n) => write!(f, "{n}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_queue: usize,
    pub max_prompt_tokens: usize,
    pub max_tokens: u32,
    pub request_timeout_s: f64,
    pub max_request_bytes: usize,
    /// Requests decoding together (continuous batching); 1 serves one at a time.
    pub max_batch: usize,
    /// The KV cache of all running requests together, in MiB; a request that would exceed it
    /// waits for a running one to end.
    pub kv_cache_mb: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_queue: 16,
            max_prompt_tokens: 2048,
            max_tokens: 1024,
            request_timeout_s: 300.0,
            max_request_bytes: 64 * 1024,
            max_batch: crate::generate::DEFAULT_MAX_BATCH,
            kv_cache_mb: crate::generate::DEFAULT_KV_CACHE_MB,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    pub enabled: bool,
    pub path: PathBuf,
    /// The socket file's mode, written in octal as a string: "0660".
    pub mode: SocketMode,
    /// The socket file's group (a name or number), whose members the mode lets connect;
    /// unset keeps the daemon's own. Under socket activation the unit's `SocketGroup=` rules.
    pub group: Option<String>,
    /// Connections served at once; one more gets a `busy` error event and is closed.
    pub max_connections: usize,
    /// Bytes of events a connection may leave unread; past it the client is cut off (its
    /// requests cancelled, the connection closed), so a client that stops reading cannot
    /// grow the daemon's memory.
    pub max_unread_bytes: usize,
}

/// A file mode, parsed once from its octal string when the config is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o7777)
            .map(SocketMode)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "socket.mode must be an octal mode like \"0660\", got {text:?}"
                ))
            })
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            enabled: true,
            path: PathBuf::from("/run/emberd/emberd.sock"),
            mode: SocketMode(0o660),
            group: None,
            max_connections: 64,
            max_unread_bytes: 1 << 20,
        }
    }
}

/// The HTTP API (OpenAI-compatible routes, `/health`); off unless enabled.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Loopback by default: exposing the API to a network is a deliberate choice.
    pub listen: String,
    /// A file holding the API key; when set, every route but `/health` needs
    /// `Authorization: Bearer <key>`.
    pub api_key_file: Option<PathBuf>,
    /// Connections served at once; more get 503 at once.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: false,
            listen: "127.0.0.1:8080".into(),
            api_key_file: None,
            max_connections: 64,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub device_id: String,
    pub prefix: String,
    pub share_group: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    pub keep_alive_s: u64,
    /// Home Assistant MQTT discovery: `true` announces the device (retained, under
    /// `discovery_prefix`), `false` removes an announcement made before; unset leaves the
    /// discovery topic alone.
    pub ha_discovery: Option<bool>,
    pub discovery_prefix: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: false,
            host: "127.0.0.1".into(),
            port: 1883,
            device_id: "emberd".into(),
            prefix: "emberd".into(),
            share_group: None,
            username: None,
            password_file: None,
            tls: None,
            keep_alive_s: 30,
            ha_discovery: None,
            discovery_prefix: "homeassistant".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum JournaldMode {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub journald: JournaldMode,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            journald: JournaldMode::Auto,
        }
    }
}

const MAX_REQUEST_TIMEOUT_S: f64 = 365.0 * 86_400.0;

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.limits.max_batch == 0 {
            return bad("limits.max_batch must be at least 1".into());
        }
        if self.limits.kv_cache_mb == 0 {
            return bad("limits.kv_cache_mb must be at least 1".into());
        }
        if self.limits.max_queue == 0 {
            return bad("limits.max_queue must be at least 1".into());
        }
        if self.limits.max_tokens == 0 {
            return bad("limits.max_tokens must be at least 1".into());
        }
        // A year at most: a deadline must stay a time the clock can hold.
        let timeout = self.limits.request_timeout_s;
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= MAX_REQUEST_TIMEOUT_S) {
            return bad(format!(
                "limits.request_timeout_s must be positive and at most {MAX_REQUEST_TIMEOUT_S} (a year), got {}",
                self.limits.request_timeout_s
            ));
        }
        if self.limits.max_request_bytes < 64 {
            return bad(format!(
                "limits.max_request_bytes must be at least 64, got {}",
                self.limits.max_request_bytes
            ));
        }
        if self.generation.max_tokens > self.limits.max_tokens {
            return bad(format!(
                "generation.max_tokens ({}) exceeds limits.max_tokens ({})",
                self.generation.max_tokens, self.limits.max_tokens
            ));
        }
        if self.generation.stream_interval_ms > crate::protocol::MAX_STREAM_INTERVAL_MS {
            return bad(format!(
                "generation.stream_interval_ms ({}) is over the limit of {} ms",
                self.generation.stream_interval_ms,
                crate::protocol::MAX_STREAM_INTERVAL_MS
            ));
        }
        if self.model.providers.is_empty() {
            return bad("model.providers must name at least one provider (e.g. [\"cpu\"])".into());
        }
        // Provider names, in both places they are given.
        let named = self.model.providers.iter().map(|p| ("model.providers", p));
        let optioned = self.model.provider_options.keys();
        for (field, name) in named.chain(optioned.map(|p| ("model.provider_options", p))) {
            if !crate::engine::ort::KNOWN_PROVIDERS.contains(&name.as_str()) {
                return bad(format!(
                    "{field}: unknown provider {name:?}; known: {}",
                    crate::engine::ort::KNOWN_PROVIDERS.join(", ")
                ));
            }
        }
        for (name, options) in &self.model.provider_options {
            if !options.is_empty() && !crate::engine::ort::takes_options(name) {
                return bad(format!(
                    "model.provider_options.{name}: emberd passes no options to {name}"
                ));
            }
        }
        if self.http.enabled && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!(
                "http.listen must be an address and port like \"127.0.0.1:8080\", got {:?}",
                self.http.listen
            ));
        }
        if self.socket.max_connections == 0 {
            return bad("socket.max_connections must be at least 1".into());
        }
        if self.socket.max_unread_bytes < 4096 {
            return bad(format!(
                "socket.max_unread_bytes must be at least 4096, got {}",
                self.socket.max_unread_bytes
            ));
        }
        if self.http.max_connections == 0 {
            return bad("http.max_connections must be at least 1".into());
        }
        if self.mqtt.enabled && self.mqtt.device_id.is_empty() {
            return bad("mqtt.device_id must not be empty".into());
        }
        if self.mqtt.enabled && self.mqtt.device_id.contains(['/', '+', '#']) {
            return bad(format!(
                "mqtt.device_id must not contain '/', '+' or '#', got {:?}",
                self.mqtt.device_id
            ));
        }
        Ok(())
    }

    pub fn request_policy(&self) -> RequestPolicy {
        RequestPolicy {
            max_tokens_cap: self.limits.max_tokens,
            defaults: self.generation.clone(),
            max_stop_sequences: 8,
            request_timeout: Duration::from_secs_f64(self.limits.request_timeout_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_timeout_past_a_year_is_refused() {
        for t in ["1e300", "1e10", "0.0", "-1.0", "nan"] {
            let e = Config::from_toml(&format!("[limits]\nrequest_timeout_s = {t}\n")).unwrap_err();
            assert!(e.to_string().contains("request_timeout_s"), "{t}: {e}");
        }
        let c = Config::from_toml("[limits]\nrequest_timeout_s = 31536000.0\n").unwrap();
        assert_eq!(c.request_policy().request_timeout.as_secs(), 31_536_000);
    }

    #[test]
    fn the_shipped_config_parses_and_names_the_defaults() {
        let shipped = Config::from_toml(include_str!("../systemd/emberd.toml")).unwrap();
        let defaults = Config::default();
        assert_eq!(
            shipped.generation.tool_choice,
            defaults.generation.tool_choice
        );
        assert_eq!(
            shipped.generation.max_tokens,
            defaults.generation.max_tokens
        );
        let required = Config::from_toml("[generation]\ntool_choice = \"required\"\n").unwrap();
        assert_eq!(
            required.generation.tool_choice,
            crate::protocol::DefaultToolChoice::Required
        );
        let err = Config::from_toml("[generation]\ntool_choice = \"always\"\n").unwrap_err();
        assert!(err.to_string().contains("tool_choice"), "{err}");
    }

    #[test]
    fn an_empty_config_is_all_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits.max_queue, 16);
        assert_eq!(c.model.backend, Backend::Auto);
    }

    #[test]
    fn the_socket_mode_is_parsed_once_when_read() {
        let c = Config::from_toml("[socket]\nmode = \"0600\"\n").unwrap();
        assert_eq!(c.socket.mode, SocketMode(0o600));
        assert_eq!(Config::default().socket.mode, SocketMode(0o660));
        let err = Config::from_toml("[socket]\nmode = \"rw-rw----\"\n").unwrap_err();
        assert!(err.to_string().contains("socket.mode"), "{err}");
    }

    #[test]
    fn one_max_tokens_cap_whatever_builds_the_policy() {
        let c = Config::default();
        assert_eq!(c.request_policy().max_tokens_cap, c.limits.max_tokens);
        assert!(c.generation.max_tokens <= c.limits.max_tokens);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("[model]\nthreds = 2\n").unwrap_err();
        assert!(err.to_string().contains("threds"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let err = Config::from_toml("[limits]\nmax_queue = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.max_queue"), "{err}");
        let err = Config::from_toml("[model]\nproviders = [\"cuda\", \"gpu9\"]\n").unwrap_err();
        assert!(err.to_string().contains("gpu9"), "{err}");
        let err = Config::from_toml("[model.provider_options.gpu9]\nx = 1\n").unwrap_err();
        assert!(err.to_string().contains("gpu9"), "{err}");
        let err = Config::from_toml("[model.provider_options.nnapi]\nx = 1\n").unwrap_err();
        assert!(
            err.to_string().contains("model.provider_options.nnapi"),
            "{err}"
        );
    }

    #[test]
    fn provider_options_reach_onnx_runtime_as_strings() {
        let c = Config::from_toml(
            "[model.provider_options.openvino]\ndevice_type = \"GPU.0\"\nnum_of_threads = 4\nenable_qdq_optimizer = true\n",
        )
        .unwrap();
        assert_eq!(
            c.model.options_of("openvino"),
            [
                ("device_type".to_string(), "GPU.0".to_string()),
                ("enable_qdq_optimizer".into(), "true".into()),
                ("num_of_threads".into(), "4".into()),
            ]
        );
        assert!(c.model.options_of("cuda").is_empty());
    }
}
