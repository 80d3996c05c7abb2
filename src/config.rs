//! The TOML config. Every field has a default, so an empty file (or none) is valid;
//! `validate` checks the values once at start with messages that name the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::{Backend, EngineOptions};
use crate::protocol::RequestPolicy;

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
    pub generation: GenerationConfig,
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
    pub ort_library: Option<PathBuf>,
    /// 0: one per core.
    pub threads: usize,
    /// Context length cap (KV cache size); 0: the model's own.
    pub context: usize,
    /// Prompt tokens per forward call in prefill; smaller reacts faster to cancellation.
    pub prefill_chunk: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            dir: None,
            backend: Backend::Auto,
            providers: vec!["cpu".into()],
            ort_library: None,
            threads: 0,
            context: 0,
            prefill_chunk: crate::generate::DEFAULT_PREFILL_CHUNK,
        }
    }
}

impl ModelConfig {
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            backend: self.backend,
            providers: self.providers.clone(),
            ort_library: self.ort_library.clone(),
            threads: self.threads,
        }
    }

    pub fn model_dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(crate::paths::default_model_dir)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    /// System prompt for requests that bring none; absent keeps the template's default.
    pub system: Option<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        let p = RequestPolicy::default();
        GenerationConfig {
            max_tokens: p.default_max_tokens,
            temperature: p.default_temperature,
            top_k: p.default_top_k,
            top_p: p.default_top_p,
            min_p: p.default_min_p,
            repetition_penalty: p.default_repetition_penalty,
            system: None,
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
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_queue: 16,
            max_prompt_tokens: 2048,
            max_tokens: 1024,
            request_timeout_s: 300.0,
            max_request_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketConfig {
    pub enabled: bool,
    pub path: PathBuf,
    /// Octal file mode as a string, e.g. "0660".
    pub mode: String,
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            enabled: true,
            path: PathBuf::from("/run/emberd/emberd.sock"),
            mode: "0660".into(),
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
        if self.limits.max_queue == 0 {
            return bad("limits.max_queue must be at least 1".into());
        }
        if self.limits.max_tokens == 0 {
            return bad("limits.max_tokens must be at least 1".into());
        }
        if !(self.limits.request_timeout_s.is_finite() && self.limits.request_timeout_s > 0.0) {
            return bad(format!(
                "limits.request_timeout_s must be positive, got {}",
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
        if u32::from_str_radix(self.socket.mode.trim_start_matches("0o"), 8).is_err() {
            return bad(format!(
                "socket.mode must be an octal mode like \"0660\", got {:?}",
                self.socket.mode
            ));
        }
        if self.model.providers.is_empty() {
            return bad("model.providers must name at least one provider (e.g. [\"cpu\"])".into());
        }
        for p in &self.model.providers {
            if !crate::engine::ort::KNOWN_PROVIDERS.contains(&p.as_str()) {
                return bad(format!(
                    "model.providers: unknown provider {p:?}; known: {}",
                    crate::engine::ort::KNOWN_PROVIDERS.join(", ")
                ));
            }
        }
        if self.http.enabled && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!(
                "http.listen must be an address and port like \"127.0.0.1:8080\", got {:?}",
                self.http.listen
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
        let g = &self.generation;
        RequestPolicy {
            max_tokens_cap: self.limits.max_tokens,
            default_max_tokens: g.max_tokens,
            default_temperature: g.temperature,
            default_top_k: g.top_k,
            default_top_p: g.top_p,
            default_min_p: g.min_p,
            default_repetition_penalty: g.repetition_penalty,
            default_system: g.system.clone(),
            max_stop_sequences: 8,
            request_timeout: Duration::from_secs_f64(self.limits.request_timeout_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_config_is_all_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.limits.max_queue, 16);
        assert_eq!(c.model.backend, Backend::Auto);
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
    }
}
