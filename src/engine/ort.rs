//! ONNX Runtime through the `ort` crate, loaded at run time (`load-dynamic`), so one
//! emberd binary works with whichever ONNX Runtime build a device has (CPU, CUDA,
//! TensorRT, NPU providers).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use super::{ort_library_path, Engine, EngineError, EngineInfo, EngineOptions, KvCache};
use crate::model::{IoNames, ModelPackage};

/// Provider names accepted in `providers`, in the spelling of the config.
pub const KNOWN_PROVIDERS: &[&str] = &[
    "tensorrt", "cuda", "openvino", "qnn", "acl", "xnnpack", "coreml", "rocm", "migraphx", "cann",
    "nnapi", "cpu",
];

/// The process-wide ONNX Runtime environment and the library it came from.
/// ONNX Runtime allows one environment per process; the library cannot be swapped once loaded.
static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

fn ort_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Ort(e.to_string())
}

/// Loads the ONNX Runtime library (once per process) and returns its environment.
pub fn environment(library: &Path) -> Result<&'static Environment, EngineError> {
    let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        if loaded != library {
            return Err(EngineError::OrtLibrary {
                path: library.to_path_buf(),
                reason: format!(
                    "this process already loaded ONNX Runtime from {}",
                    loaded.display()
                ),
            });
        }
        return Ok(env);
    }
    if !library.exists() {
        return Err(EngineError::OrtLibrary {
            path: library.to_path_buf(),
            reason: "no such file (run the setup, set ORT_DYLIB_PATH or model.ort_library)".into(),
        });
    }
    let env = ort::init_from(library)
        .map_err(|e| EngineError::OrtLibrary {
            path: library.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_name("emberd")
        .with_telemetry(false)
        .build()
        .map_err(ort_error)?;
    Ok(&ENVIRONMENT.get_or_init(|| (library.to_path_buf(), env)).1)
}

/// The version string of the ONNX Runtime library at `path` ("1.32.0").
fn library_version(path: &Path) -> String {
    // SAFETY: the library is already loaded by ort (this only takes another reference), and
    // OrtGetApiBase/GetVersionString are plain C functions that return static data.
    unsafe {
        let Ok(lib) = libloading::Library::new(path) else {
            return "unknown".into();
        };
        let Ok(get_base) =
            lib.get::<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase>(b"OrtGetApiBase")
        else {
            return "unknown".into();
        };
        let base = get_base();
        if base.is_null() {
            return "unknown".into();
        }
        let version = ((*base).GetVersionString)();
        std::ffi::CStr::from_ptr(version)
            .to_string_lossy()
            .into_owned()
    }
}

/// Execution providers compiled into the loaded library (ONNX Runtime's names).
pub fn available_providers() -> Result<Vec<String>, EngineError> {
    let api = ort::api();
    let mut names: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut count: std::ffi::c_int = 0;
    // SAFETY: the library is loaded (ort::api() would have panicked otherwise); the array is
    // read before it is released, and its length comes from the same call.
    unsafe {
        ort::Error::result_from_status((api.GetAvailableProviders)(&mut names, &mut count))
            .map_err(ort_error)?;
        let list = (0..count as usize)
            .map(|i| {
                std::ffi::CStr::from_ptr(*names.add(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        let _ = ort::Error::result_from_status((api.ReleaseAvailableProviders)(names, count));
        Ok(list)
    }
}

/// Registers one provider; an Err carries ONNX Runtime's own reason.
fn register(builder: &mut SessionBuilder, name: &str) -> Result<(), EngineError> {
    let result = match name {
        "tensorrt" => ep::TensorRT::default().register(builder),
        "cuda" => ep::CUDA::default().register(builder),
        "openvino" => ep::OpenVINO::default().register(builder),
        "qnn" => ep::QNN::default().register(builder),
        "acl" => ep::ACL::default().register(builder),
        "xnnpack" => ep::XNNPACK::default().register(builder),
        "coreml" => ep::CoreML::default().register(builder),
        "rocm" => ep::ROCm::default().register(builder),
        "migraphx" => ep::MIGraphX::default().register(builder),
        "cann" => ep::CANN::default().register(builder),
        "nnapi" => ep::NNAPI::default().register(builder),
        // The CPU provider is always there; registering it only sets the arena.
        "cpu" => ep::CPU::default()
            .with_arena_allocator(true)
            .register(builder),
        other => return Err(EngineError::UnknownProvider(other.to_string())),
    };
    result.map_err(ort_error)
}

pub struct OrtEngine {
    session: Session,
    io: IoNames,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    info: EngineInfo,
}

/// Per-layer keys then values, as ONNX Runtime produced them.
struct OrtKv(Vec<DynValue>);

impl OrtEngine {
    pub fn load(package: &ModelPackage, options: &EngineOptions) -> Result<Self, EngineError> {
        let library = ort_library_path(options.ort_library.as_ref());
        let env = environment(&library)?;
        let available = available_providers()?;
        let mut builder = Session::builder(env)
            .map_err(ort_error)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(ort_error)?;
        let threads = options.resolved_threads();
        builder = builder.with_intra_threads(threads).map_err(ort_error)?;
        let mut provider = None;
        for name in &options.providers {
            match register(&mut builder, name) {
                Ok(()) if provider.is_none() => provider = Some(name.clone()),
                Ok(()) => {}
                Err(EngineError::UnknownProvider(n)) => {
                    return Err(EngineError::UnknownProvider(n))
                }
                Err(e) => log::warn!("execution provider {name} skipped: {e}"),
            }
        }
        let provider = provider.unwrap_or_else(|| "cpu".to_string());
        let session = builder.commit_from_file(&package.ort_file).map_err(|e| {
            EngineError::Ort(format!(
                "cannot create a session for {}: {e}",
                package.ort_file.display()
            ))
        })?;
        let info = EngineInfo {
            engine: "ort",
            provider,
            threads,
            model_file: package.ort_file.clone(),
            version: library_version(&library),
            fallback_reason: None,
            available_providers: available,
        };
        log::info!(
            "ONNX Runtime {} from {} serving {} on {}",
            info.version,
            library.display(),
            package.ort_file.display(),
            info.provider
        );
        Ok(OrtEngine {
            session,
            io: package.io.clone(),
            kv_heads: package.kv_heads,
            head_dim: package.head_dim,
            vocab_size: package.vocab_size,
            info,
        })
    }

    fn empty_past(&self) -> Result<Vec<DynValue>, EngineError> {
        let shape = [1usize, self.kv_heads, 0, self.head_dim];
        (0..self.io.past_keys.len() * 2)
            .map(|_| {
                Tensor::from_array((shape, Vec::<f32>::new()))
                    .map(|t| t.into_dyn())
                    .map_err(ort_error)
            })
            .collect()
    }
}

fn i64_tensor(values: Vec<i64>) -> Result<DynValue, EngineError> {
    let shape = [1usize, values.len()];
    Tensor::from_array((shape, values))
        .map(|t| t.into_dyn())
        .map_err(ort_error)
}

impl Engine for OrtEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn truncate(&self, cache: &mut KvCache, len: usize) -> Result<(), EngineError> {
        if len >= cache.len() {
            return Ok(());
        }
        if len == 0 {
            cache.clear();
            return Ok(());
        }
        let Some(kv) = cache.store.as_ref().and_then(|s| s.downcast_ref::<OrtKv>()) else {
            cache.clear();
            return Ok(());
        };
        let mut trimmed = Vec::with_capacity(kv.0.len());
        for value in &kv.0 {
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(ort_error)?;
            let (heads, past, dim) = (shape[1] as usize, shape[2] as usize, shape[3] as usize);
            let mut out = Vec::with_capacity(heads * len * dim);
            for h in 0..heads {
                out.extend_from_slice(&data[h * past * dim..(h * past + len) * dim]);
            }
            trimmed.push(
                Tensor::from_array(([1usize, heads, len, dim], out))
                    .map_err(ort_error)?
                    .into_dyn(),
            );
        }
        cache.store = Some(Box::new(OrtKv(trimmed)));
        cache.truncate_tokens(len);
        Ok(())
    }

    fn forward(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let past_len = cache.len();
        let n = ids.len();
        let layers = self.io.past_keys.len();
        let empty;
        let past: &[DynValue] = match cache.store.as_ref().and_then(|s| s.downcast_ref::<OrtKv>()) {
            Some(kv) => &kv.0,
            None => {
                empty = self.empty_past()?;
                &empty
            }
        };
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(4 + 2 * layers);
        inputs.push((
            Cow::Borrowed(self.io.input_ids.as_str()),
            i64_tensor(ids.iter().map(|&i| i64::from(i)).collect())?.into(),
        ));
        if let Some(name) = &self.io.attention_mask {
            inputs.push((
                Cow::Borrowed(name.as_str()),
                i64_tensor(vec![1; past_len + n])?.into(),
            ));
        }
        if let Some(name) = &self.io.position_ids {
            let positions = (past_len as i64..(past_len + n) as i64).collect();
            inputs.push((Cow::Borrowed(name.as_str()), i64_tensor(positions)?.into()));
        }
        if let Some(name) = &self.io.use_cache_branch {
            let flag = Tensor::from_array(([1usize], vec![past_len > 0])).map_err(ort_error)?;
            inputs.push((Cow::Borrowed(name.as_str()), flag.into_dyn().into()));
        }
        for layer in 0..layers {
            inputs.push((
                Cow::Borrowed(self.io.past_keys[layer].as_str()),
                (&past[2 * layer]).into(),
            ));
            inputs.push((
                Cow::Borrowed(self.io.past_values[layer].as_str()),
                (&past[2 * layer + 1]).into(),
            ));
        }
        let mut outputs = self.session.run(inputs).map_err(ort_error)?;
        let (shape, all_logits) = outputs[self.io.logits.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(ort_error)?;
        let vocab = shape.last().copied().unwrap_or(0) as usize;
        if vocab == 0
            || all_logits.len() % vocab != 0
            || (vocab != self.vocab_size && self.vocab_size != 0)
        {
            return Err(EngineError::BadLogits {
                got: all_logits.len(),
                vocab: self.vocab_size,
            });
        }
        logits.clear();
        logits.extend_from_slice(&all_logits[all_logits.len() - vocab..]);
        // The present outputs become the next step's past as they are: no copy.
        let mut next = Vec::with_capacity(2 * layers);
        for layer in 0..layers {
            for name in [&self.io.present_keys[layer], &self.io.present_values[layer]] {
                next.push(
                    outputs
                        .remove(name.as_str())
                        .ok_or_else(|| EngineError::Ort(format!("output {name} missing")))?,
                );
            }
        }
        drop(outputs);
        cache.store = Some(Box::new(OrtKv(next)));
        cache.extend(ids);
        Ok(())
    }
}
