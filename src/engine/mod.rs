//! Engines run one forward step of the decoder: ids in, logits of the last position out,
//! keys and values kept in a `KvCache`. They know nothing of tokens as text, of requests
//! or of transports.

pub mod kv;
pub mod ort;
mod ort_kv;
#[cfg(feature = "tract")]
pub mod tract;

use std::path::PathBuf;

pub use kv::KvCache;

use crate::config::ModelConfig;
use crate::model::ModelPackage;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("ONNX Runtime library could not be loaded from {path}: {reason}")]
    OrtLibrary { path: PathBuf, reason: String },
    #[error("ONNX Runtime: {0}")]
    Ort(String),
    #[error("tract: {0}")]
    Tract(String),
    #[error("execution provider {0:?} is unknown; known: tensorrt, cuda, openvino, qnn, acl, xnnpack, coreml, directml, rocm, migraphx, cann, nnapi, cpu")]
    UnknownProvider(String),
    #[error("execution provider {provider} could not start: {reason}")]
    Provider { provider: String, reason: String },
    #[error("no engine could start: {0}")]
    NoEngine(String),
    #[error("this emberd was built without the tract engine (cargo feature `tract`)")]
    TractNotBuilt,
    #[error("the model produced {got} logits, expected a multiple of the vocabulary size {vocab}")]
    BadLogits { got: usize, vocab: usize },
    #[error("the KV cache holds {0} tensors, not this engine's")]
    ForeignCache(&'static str),
    #[error("the KV cache holds {len} positions, the context is {context}")]
    ContextFull { len: usize, context: usize },
}

/// The smallest in-place KV buffer, in positions; buffers double from there as a sequence
/// grows, so memory follows the positions in use rather than the context length.
pub const MIN_KV_CAPACITY: usize = 256;

/// Which engine to use.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime, falling back to tract when it cannot start.
    #[default]
    Auto,
    Ort,
    Tract,
}

/// What is actually running, for `info`, logs, `done` events and the MQTT status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    /// "ort" or "tract".
    pub engine: &'static str,
    /// The execution provider serving the graph ("cpu", "cuda", ...).
    pub provider: String,
    pub threads: usize,
    pub model_file: PathBuf,
    /// Library version for ort; crate version for tract.
    pub version: String,
    /// Why the engine in use is not the first choice, when it is not.
    pub fallback_reason: Option<String>,
    /// Providers the loaded ONNX Runtime library offers (empty for tract).
    pub available_providers: Vec<String>,
    /// The graph appends each step's keys and values to the cache in place; otherwise it
    /// returns a grown copy of the cache every step.
    pub kv_in_place: bool,
    /// Where ONNX Runtime ran the graph's nodes, per provider, from its own profile of the
    /// first step; empty where unknown (tract runs every node itself).
    pub placement: Vec<Placement>,
}

/// The nodes one execution provider ran in a step (an OpenVINO or TensorRT subgraph counts
/// as one node, with the subgraph as its op type).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Placement {
    /// ONNX Runtime's name ("CPUExecutionProvider", "OpenVINOExecutionProvider", ...).
    pub provider: String,
    pub nodes: usize,
    pub op_types: std::collections::BTreeMap<String, usize>,
    /// What its subgraphs hold, by op type, where it took the whole graph (the profile sees
    /// only the subgraph; the graph file says what is in it). Empty otherwise.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub subgraph_op_types: std::collections::BTreeMap<String, usize>,
}

impl EngineInfo {
    pub fn label(&self) -> String {
        format!("{}/{}", self.engine, self.provider)
    }
}

pub trait Engine: Send {
    fn info(&self) -> &EngineInfo;

    /// Runs `ids` at the positions after those already in `cache`, appends their keys and
    /// values to it, and writes the logits of the last position into `logits`.
    fn forward(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError>;

    /// Keeps only the first `len` positions of `cache`, so a new prompt that shares a prefix
    /// with what is cached (the same system prompt, say) runs only its new part.
    fn truncate(&self, cache: &mut KvCache, len: usize) -> Result<(), EngineError>;

    /// How many sequences one `decode_batch` step carries at most; 1 where this engine or
    /// graph cannot batch (its caches are then its own, not slot rows).
    fn max_batch(&self) -> usize {
        1
    }

    /// Positions each slot row holds room for now (0 where the engine does not batch).
    fn slot_capacity(&self) -> usize {
        0
    }

    /// One decode step for several sequences together: `ids[i]` after `caches[i]` (slot
    /// caches, `KvCache::for_slot`), row `i`'s logits into `logits[i * vocab..]`. An engine
    /// that cannot batch runs them one after the other.
    fn decode_batch(
        &mut self,
        ids: &[u32],
        caches: &mut [&mut KvCache],
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        decode_each(self, ids, caches, logits)
    }
}

/// `decode_batch` one sequence at a time.
fn decode_each<E: Engine + ?Sized>(
    engine: &mut E,
    ids: &[u32],
    caches: &mut [&mut KvCache],
    logits: &mut Vec<f32>,
) -> Result<(), EngineError> {
    let mut row = Vec::new();
    logits.clear();
    for (&id, cache) in ids.iter().zip(caches.iter_mut()) {
        engine.forward(&[id], cache, &mut row)?;
        logits.extend_from_slice(&row);
    }
    Ok(())
}

/// Where the last position's row starts in `len` logits, which must be whole rows of `vocab`.
fn last_row_start(len: usize, vocab: usize) -> Result<usize, EngineError> {
    if vocab == 0 || len == 0 || !len.is_multiple_of(vocab) {
        return Err(EngineError::BadLogits { got: len, vocab });
    }
    Ok(len - vocab)
}

/// Resolves the ONNX Runtime library: config, else `ORT_DYLIB_PATH`, else the copy that the
/// setup extracted next to the binary's repository (`vendor/onnxruntime/lib`).
pub fn ort_library_path(configured: Option<&PathBuf>) -> PathBuf {
    if let Some(p) = configured {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    crate::paths::default_ort_library()
}

/// Builds the engine that `options` asks for, falling back from ONNX Runtime to tract under
/// `Backend::Auto` and saying why.
pub fn load(package: &ModelPackage, options: &ModelConfig) -> Result<Box<dyn Engine>, EngineError> {
    match options.backend {
        Backend::Ort => Ok(Box::new(ort::OrtEngine::load(package, options)?)),
        Backend::Tract => load_tract(package, options, None),
        Backend::Auto => match ort::OrtEngine::load(package, options) {
            Ok(engine) => Ok(Box::new(engine)),
            Err(ort_error) => {
                log::warn!("ONNX Runtime unavailable ({ort_error}); falling back to tract");
                load_tract(package, options, Some(ort_error.to_string())).map_err(|e| {
                    EngineError::NoEngine(format!("ONNX Runtime: {ort_error}; tract: {e}"))
                })
            }
        },
    }
}

#[cfg(feature = "tract")]
fn load_tract(
    package: &ModelPackage,
    options: &ModelConfig,
    fallback_reason: Option<String>,
) -> Result<Box<dyn Engine>, EngineError> {
    Ok(Box::new(tract::TractEngine::load(
        package,
        options,
        fallback_reason,
    )?))
}

#[cfg(not(feature = "tract"))]
fn load_tract(
    _package: &ModelPackage,
    _options: &ModelConfig,
    _fallback_reason: Option<String>,
) -> Result<Box<dyn Engine>, EngineError> {
    Err(EngineError::TractNotBuilt)
}

/// The build without tract (`--no-default-features`): ONNX Runtime serves, and asking for
/// tract, or falling back to it, says that this build has none.
#[cfg(all(test, not(feature = "tract")))]
mod without_tract {
    use super::*;

    #[test]
    fn onnx_runtime_serves_and_tract_is_named_missing() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/test/generated/q4");
        let package = ModelPackage::load(&dir).expect("models/prepare.sh makes the tiny models");
        let mut options = ModelConfig {
            backend: Backend::Tract,
            threads: 1,
            ..ModelConfig::default()
        };
        let err = load(&package, &options)
            .err()
            .expect("no tract in this build");
        assert!(matches!(err, EngineError::TractNotBuilt), "{err}");
        assert!(err.to_string().contains("feature `tract`"), "{err}");

        options.backend = Backend::Auto;
        options.ort_library = Some("/nonexistent/libonnxruntime.so".into());
        let err = load(&package, &options).err().expect("neither engine");
        assert!(
            err.to_string().contains("without the tract engine"),
            "{err}"
        );

        // The library the test command extracts (ORT_DYLIB_PATH): ONNX Runtime runs a step.
        options.ort_library = None;
        let mut engine = load(&package, &options).expect("ONNX Runtime loads");
        assert_eq!(engine.info().engine, "ort");
        let mut cache = KvCache::new();
        let mut logits = Vec::new();
        engine.forward(&[1, 5, 9], &mut cache, &mut logits).unwrap();
        assert_eq!(logits.len(), package.vocab_size);
        assert!(logits.iter().all(|l| l.is_finite()));
    }
}
