//! ONNX Runtime through the `ort` crate, loaded at run time (`load-dynamic`), so one
//! emberd binary works with whichever ONNX Runtime build a device has (CPU, CUDA,
//! TensorRT, NPU providers).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};
use ort::logging::LogLevel;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use super::kv::KvStore;
use super::ort_kv::{self, KvBuffer, KvShape, Logits};
use super::{ort_library_path, Backend, Engine, EngineError, EngineInfo, KvCache, Placement};
use crate::config::ModelConfig;
use crate::model::{IoNames, KvElem, ModelPackage};

/// Provider names accepted in `providers`, in the spelling of the config.
pub const KNOWN_PROVIDERS: &[&str] = &[
    "tensorrt", "cuda", "openvino", "qnn", "acl", "xnnpack", "coreml", "rocm", "migraphx", "cann",
    "nnapi", "cpu",
];

/// ONNX Runtime's name for a provider of `KNOWN_PROVIDERS` (what GetAvailableProviders and
/// the profile say).
pub fn ort_name(name: &str) -> &'static str {
    match name {
        "tensorrt" => "TensorrtExecutionProvider",
        "cuda" => "CUDAExecutionProvider",
        "openvino" => "OpenVINOExecutionProvider",
        "qnn" => "QNNExecutionProvider",
        "acl" => "ACLExecutionProvider",
        "xnnpack" => "XnnpackExecutionProvider",
        "coreml" => "CoreMLExecutionProvider",
        "rocm" => "ROCMExecutionProvider",
        "migraphx" => "MIGraphXExecutionProvider",
        "cann" => "CANNExecutionProvider",
        "nnapi" => "NnapiExecutionProvider",
        _ => "CPUExecutionProvider",
    }
}

/// Whether emberd passes `provider_options` to this provider (ort registers the others with
/// fixed fields only).
pub fn takes_options(name: &str) -> bool {
    matches!(
        name,
        "tensorrt" | "cuda" | "openvino" | "qnn" | "xnnpack" | "coreml" | "rocm" | "cann"
    )
}

/// Providers that compute in this process's memory, on the CPU: they run ONNX Runtime's
/// fused CPU graph and may keep the KV cache in place.
fn on_host(name: &str) -> bool {
    matches!(name, "cpu" | "xnnpack")
}

/// The process-wide ONNX Runtime environment and the library it came from.
/// ONNX Runtime allows one environment per process; the library cannot be swapped once loaded.
static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

pub(super) fn ort_error(e: impl std::fmt::Display) -> EngineError {
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
    // ONNX Runtime's Linux library (1.32) starts Microsoft's 1DS telemetry when its environment
    // is created, whatever DisableTelemetryEvents says: it writes a device id and an event
    // queue under ~/.cache/Microsoft/DeveloperTools and resolves mobile.events.data.microsoft.com
    // to upload them. emberd sends nothing off the device; this variable, read at that moment,
    // turns it off. (Only when unset: set_var races getenv on other threads, and the test
    // command exports it before anything starts.)
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        std::env::set_var("ORT_DISABLE_TELEMETRY", "1");
    }
    let env = ort::init_from(library)
        .map_err(|e| EngineError::OrtLibrary {
            path: library.to_path_buf(),
            reason: e.to_string(),
        })?
        .with_name("emberd")
        .with_telemetry(false)
        .with_logger(std::sync::Arc::new(log_from_ort))
        .build()
        .map_err(ort_error)?;
    // ort opens the custom logger at verbose; ONNX Runtime formats only what passes this.
    env.set_log_level(LogLevel::Warning);
    Ok(&ENVIRONMENT.get_or_init(|| (library.to_path_buf(), env)).1)
}

thread_local! {
    /// The last error ONNX Runtime logged on this thread: a provider that fails to start
    /// logs its reason and returns only "Failed to load provider".
    static LAST_ORT_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// ONNX Runtime's log, into emberd's. Errors go to debug and are kept for the error they come
/// with (see `with_ort_reason`), which says them once, where they matter.
fn log_from_ort(level: LogLevel, _category: &str, _id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Error | LogLevel::Fatal => {
            log::debug!("onnxruntime: {location}: {message}");
            LAST_ORT_ERROR.with(|last| *last.borrow_mut() = Some(ort_reason(message).to_string()));
        }
        LogLevel::Warning => log::warn!("onnxruntime: {message}"),
        LogLevel::Info | LogLevel::Verbose => log::trace!("onnxruntime: {message}"),
    }
}

/// The reason in an ONNX Runtime exception message, without the source location and function
/// signature in front ("/onnxruntime/.../factory.cc:141 std::string ns::F(args) [ERROR]
/// [OpenVINO] Device NPU is not available" gives "[OpenVINO] Device NPU is not available").
fn ort_reason(message: &str) -> &str {
    let Some((location, rest)) = message.split_once(' ') else {
        return message;
    };
    if !location.contains(".cc:") && !location.contains(".h:") {
        return message;
    }
    // The signature ends at the first space outside brackets after its argument list.
    let (mut depth, mut seen_args) = (0i32, false);
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => {
                depth -= 1;
                seen_args |= c == ')' && depth == 0;
            }
            ' ' if depth == 0 && seen_args => {
                let reason = rest[i + 1..].trim();
                return reason.strip_prefix("[ERROR] ").unwrap_or(reason);
            }
            _ => {}
        }
    }
    rest
}

/// Runs `f`, and on failure adds the reason ONNX Runtime logged meanwhile, where its error
/// does not already carry it.
fn with_ort_reason<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    LAST_ORT_ERROR.with(|last| last.borrow_mut().take());
    f().map_err(
        |e| match LAST_ORT_ERROR.with(|last| last.borrow_mut().take()) {
            Some(reason) if !e.to_string().contains(&reason) => EngineError::Ort(format!(
                "{}: {reason}",
                e.to_string().trim_start_matches("ONNX Runtime: ")
            )),
            _ => e,
        },
    )
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

/// Registers one provider with its options; an Err carries ONNX Runtime's own reason.
fn register(
    builder: &mut SessionBuilder,
    name: &str,
    options: &[(String, String)],
) -> Result<(), EngineError> {
    fn with<E: ep::ArbitrarilyConfigurableExecutionProvider>(
        mut provider: E,
        options: &[(String, String)],
    ) -> E {
        for (key, value) in options {
            provider = provider.with_arbitrary_config(key, value);
        }
        provider
    }
    let result = match name {
        "tensorrt" => with(ep::TensorRT::default(), options).register(builder),
        "cuda" => with(ep::CUDA::default(), options).register(builder),
        "openvino" => with(ep::OpenVINO::default(), options).register(builder),
        "qnn" => with(ep::QNN::default(), options).register(builder),
        "acl" => ep::ACL::default().register(builder),
        "xnnpack" => with(ep::XNNPACK::default(), options).register(builder),
        "coreml" => with(ep::CoreML::default(), options).register(builder),
        "rocm" => with(ep::ROCm::default(), options).register(builder),
        "migraphx" => ep::MIGraphX::default().register(builder),
        "cann" => with(ep::CANN::default(), options).register(builder),
        "nnapi" => ep::NNAPI::default().register(builder),
        // The CPU provider is always there; registering it only sets the arena, which the
        // session builder has set already (`model.cpu_arena`).
        "cpu" => Ok(()),
        other => return Err(EngineError::UnknownProvider(other.to_string())),
    };
    result.map_err(ort_error)
}

/// The provider lists to try in turn. Under `auto` a provider that fails at session creation
/// (a bad option, a device that is not there) gives way to the next, down to the CPU alone;
/// `ort` tries the list once.
fn attempts(providers: &[String], backend: Backend) -> Vec<Vec<String>> {
    if backend != Backend::Auto {
        return vec![providers.to_vec()];
    }
    let mut lists = Vec::new();
    for i in 0..providers.len() {
        lists.push(providers[i..].to_vec());
        // What follows the CPU is never used: it takes every node.
        if providers[i] == "cpu" {
            return lists;
        }
    }
    lists.push(vec!["cpu".to_string()]);
    lists
}

pub struct OrtEngine {
    session: Session,
    io: IoNames,
    kv_heads: usize,
    head_dim: usize,
    kv_elem: KvElem,
    vocab_size: usize,
    /// Where ONNX Runtime puts the logits of an in-place step (see `InPlaceKv`).
    cpu_memory: MemoryInfo<'static>,
    /// The batch's keys and values, a row per slot (continuous batching).
    rows: SlotRows,
    info: EngineInfo,
}

/// Per-layer keys then values of every batch slot, in buffers `[rows, heads, capacity, dim]`:
/// a slot is a row. A prefill binds its slot's row alone (GroupQueryAttention takes several
/// new positions after a past only at batch 1); a decode step binds the first rows together,
/// each with its own length in the attention mask. Both in place, as `InPlaceKv`.
#[derive(Default)]
struct SlotRows {
    buffers: Vec<KvBuffer>,
    capacity: usize,
    /// Positions each row holds, as of its last step (one entry per row): a row inside a
    /// decode step's range whose slot is idle writes a throwaway position just past them.
    lens: Vec<usize>,
}

/// Per-layer keys then values, as ONNX Runtime produced them: each step's present outputs
/// (past and the new positions, a fresh copy) become the next step's past.
pub(crate) struct GrownKv(Vec<DynValue>);

/// Per-layer keys then values in buffers of `capacity` positions, bound as both past and
/// present. GroupQueryAttention sees the same memory on both sides and writes only the new
/// positions (its past_present_share_buffer mode), so a step does not copy the cache, and
/// dropping positions is only a shorter attention mask.
pub(crate) struct InPlaceKv {
    buffers: Vec<KvBuffer>,
    capacity: usize,
}

impl OrtEngine {
    pub fn load(package: &ModelPackage, options: &ModelConfig) -> Result<Self, EngineError> {
        let library = ort_library_path(options.ort_library.as_ref());
        let env = environment(&library)?;
        let available = available_providers()?;
        let version = library_version(&library);
        let lists = attempts(&options.providers, options.backend);
        let mut failures = Vec::new();
        for (i, providers) in lists.iter().enumerate() {
            match Self::start(env, package, options, providers, &available, true) {
                Ok(mut engine) => {
                    engine.info.version = version;
                    engine.info.available_providers = available;
                    if !failures.is_empty() {
                        let mut reasons = failures;
                        reasons.extend(engine.info.fallback_reason.take());
                        engine.info.fallback_reason = Some(reasons.join("; "));
                    }
                    engine.log_start(&library);
                    return Ok(engine);
                }
                Err(e) => match lists.get(i + 1) {
                    Some(next) => {
                        log::warn!("{e}; trying {}", next.join(", "));
                        failures.push(e.to_string());
                    }
                    None => return Err(e),
                },
            }
        }
        unreachable!("attempts() returns at least one list")
    }

    /// A session with `providers` registered in order (those the library lacks are skipped),
    /// its first step run (and profiled, with `profile`: then the session that serves is
    /// made again without the profiler, see below).
    fn start(
        env: &'static Environment,
        package: &ModelPackage,
        options: &ModelConfig,
        providers: &[String],
        available: &[String],
        profile: bool,
    ) -> Result<Self, EngineError> {
        let mut builder = Session::builder(env)
            .map_err(ort_error)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(ort_error)?
            // Planned buffers pay off for fixed shapes; every step here has a new length, and
            // the plan only raised the memory peak (measured: 10 MB, same speed).
            .with_memory_pattern(false)
            .map_err(ort_error)?;
        // ONNX Runtime's CPU arena: see `ModelConfig::cpu_arena`.
        ep::CPU::default()
            .with_arena_allocator(options.cpu_arena)
            .register(&mut builder)
            .map_err(ort_error)?;
        let threads = options.resolved_threads();
        builder = builder.with_intra_threads(threads).map_err(ort_error)?;
        // ONNX Runtime's own record of which provider ran each node: the first step (made
        // below, at load) is profiled, then profiling ends.
        // ONNX Runtime names the file by the second: a process loading two engines at once
        // (tests do) needs a prefix of each one's own.
        static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        if profile {
            let load = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let prefix = std::env::temp_dir()
                .join(format!("emberd-placement-{}-{load}", std::process::id()));
            builder = builder.with_profiling(&prefix).map_err(ort_error)?;
        }
        let mut lead: Option<&str> = None;
        for name in providers {
            if name != "cpu" && !available.iter().any(|a| a == ort_name(name)) {
                log::warn!(
                    "execution provider {name} skipped: this ONNX Runtime library lacks {} (it has {})",
                    ort_name(name),
                    available.join(", ")
                );
                continue;
            }
            let mut provider_options = options.options_of(name);
            // OpenVINO runs its own thread pool, which takes every core unless told: it gets
            // the same count as ONNX Runtime's, so `threads` leaves cores free either way.
            if name == "openvino" && !provider_options.iter().any(|(k, _)| k == "num_of_threads") {
                provider_options.push(("num_of_threads".into(), threads.to_string()));
            }
            // The library has it: failing here (a bad option, a device that is not there)
            // is this attempt's failure, which `auto` answers with the next provider.
            with_ort_reason(|| register(&mut builder, name, &provider_options)).map_err(
                |e| match e {
                    EngineError::UnknownProvider(_) => e,
                    e => EngineError::Provider {
                        provider: name.clone(),
                        reason: e.to_string(),
                    },
                },
            )?;
            lead.get_or_insert(name);
        }
        let lead = lead.unwrap_or("cpu");
        // The fused graph's attention and layer norms are ONNX Runtime CPU kernels; a device
        // provider gets the plain graph, which it can take whole.
        let file = if on_host(lead) {
            &package.ort_file
        } else {
            &package.plain_file
        };
        let session = with_ort_reason(|| builder.commit_from_file(file).map_err(ort_error))
            .map_err(|e| EngineError::Provider {
                provider: lead.to_string(),
                reason: format!("no session for {}: {e}", file.display()),
            })?;
        let released = unmap_clean_weight_pages(file);
        if released > 0 {
            log::debug!(
                "dropped {} KiB of weight-file pages after loading",
                released / 1024
            );
        }
        // In place only where the cache lives in CPU memory: a device provider would copy the
        // bound buffers to and from the device each step, and past and present would no
        // longer be the same memory.
        let kv_in_place = package.ort_kv_in_place && on_host(lead) && *file == package.ort_file;
        let cpu_memory = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )
        .map_err(ort_error)?;
        let mut engine = OrtEngine {
            session,
            io: package.io.clone(),
            kv_heads: package.kv_heads,
            head_dim: package.head_dim,
            kv_elem: package.kv_elem,
            vocab_size: package.vocab_size,
            cpu_memory,
            rows: SlotRows::default(),
            info: EngineInfo {
                engine: "ort",
                provider: lead.to_string(),
                threads,
                model_file: file.clone(),
                version: String::new(),
                fallback_reason: None,
                available_providers: Vec::new(),
                kv_in_place,
                placement: Vec::new(),
            },
        };
        let first_step_failed = |e: EngineError| EngineError::Provider {
            provider: lead.to_string(),
            reason: format!("the first step failed: {e}"),
        };
        if !profile {
            // A first step even so: a provider that cannot run the graph fails here, at load.
            let (mut cache, mut logits) = (KvCache::new(), Vec::new());
            engine
                .forward(&[0], &mut cache, &mut logits)
                .map_err(first_step_failed)?;
            return Ok(engine);
        }
        engine.info.placement = engine.profiled_step().map_err(first_step_failed)?;
        if let [whole] = engine.info.placement.as_mut_slice() {
            if whole.provider != ort_name("cpu") {
                match crate::model::onnx_io::read_graph_io(file) {
                    Ok(graph) => whole.subgraph_op_types = graph.op_types,
                    Err(e) => log::debug!("{}: {e}", file.display()),
                }
            }
        }
        // The provider in use is the one that ran nodes: one that was given the graph and
        // took none of it leaves the work to the CPU.
        let ran = |name: &str| {
            engine
                .info
                .placement
                .iter()
                .any(|p| p.provider == ort_name(name))
        };
        if !engine.info.placement.is_empty() && !ran(lead) {
            engine.info.fallback_reason = Some(format!(
                "execution provider {lead} took no node of the graph; the CPU runs them all"
            ));
            engine.info.provider = "cpu".to_string();
        }
        // ONNX Runtime's thread-pool profiler goes on recording after end_profiling, some 60
        // bytes a step for good, wherever there is more than one thread (the tiny model, 8,000
        // requests: +11 MB profiled, flat without). So the profiled session only says where
        // the nodes run; a second one, the same but for the profiler, serves.
        let mut serving = Self::start(env, package, options, providers, available, false)?;
        serving.info = engine.info;
        Ok(serving)
    }

    fn log_start(&self, library: &Path) {
        let info = &self.info;
        log::info!(
            "ONNX Runtime {} from {} serving {} on {} with {} threads",
            info.version,
            library.display(),
            info.model_file.display(),
            info.provider,
            info.threads
        );
        let counts = |ops: &std::collections::BTreeMap<String, usize>| {
            let ops: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
            ops.join(", ")
        };
        for p in &info.placement {
            log::info!(
                "{} ran {} nodes: {}",
                p.provider,
                p.nodes,
                counts(&p.op_types)
            );
            if !p.subgraph_op_types.is_empty() {
                log::info!(
                    "{} took the whole graph: {} nodes ({})",
                    p.provider,
                    p.subgraph_op_types.values().sum::<usize>(),
                    counts(&p.subgraph_op_types)
                );
            }
        }
    }

    /// Runs one step (the profiler has been on since the session was made), ends profiling
    /// and reads which provider ran each node: empty, with a warning, where the profile
    /// cannot be read; an error where the step fails.
    fn profiled_step(&mut self) -> Result<Vec<Placement>, EngineError> {
        let (mut cache, mut logits) = (KvCache::new(), Vec::new());
        self.forward(&[0], &mut cache, &mut logits)?;
        let placement = match self.session.end_profiling() {
            Ok(file) => {
                let read = std::fs::read_to_string(&file);
                let _ = std::fs::remove_file(&file);
                read.map_err(|e| format!("{file}: {e}"))
                    .and_then(|json| placement_from_profile(&json))
            }
            Err(e) => Err(format!("no profile: {e}")),
        };
        Ok(placement.unwrap_or_else(|reason| {
            log::warn!("where ONNX Runtime runs the nodes is unknown: {reason}");
            Vec::new()
        }))
    }

    /// Makes the in-place buffers of `cache` hold at least `positions`, keeping what they hold.
    fn reserve_in_place(&self, cache: &mut KvCache, positions: usize) -> Result<(), EngineError> {
        let filled = cache.len();
        let old = match cache.take_store() {
            KvStore::OrtInPlace(kv) if kv.capacity >= positions => {
                cache.store = KvStore::OrtInPlace(kv);
                return Ok(());
            }
            KvStore::OrtInPlace(kv) => Some(kv),
            KvStore::Empty => None,
            other => {
                let owner = other.owner();
                cache.store = other;
                return Err(EngineError::ForeignCache(owner));
            }
        };
        let capacity = positions.next_power_of_two().max(super::MIN_KV_CAPACITY);
        let kept = old.as_ref().map(|kv| (kv.buffers.as_slice(), kv.capacity));
        let buffers = self.kv_buffers(capacity, &[filled], kept)?;
        cache.store = KvStore::OrtInPlace(InPlaceKv { buffers, capacity });
        Ok(())
    }

    /// Per-layer key and value buffers `[lens.len(), heads, capacity, dim]`; with `old`
    /// (buffers of `old_capacity` positions), row `r` keeps its first `lens[r]` positions.
    fn kv_buffers(
        &self,
        capacity: usize,
        lens: &[usize],
        old: Option<(&[KvBuffer], usize)>,
    ) -> Result<Vec<KvBuffer>, EngineError> {
        let shape = self.kv_shape(capacity);
        let mut buffers = Vec::with_capacity(self.io.past_keys.len() * 2);
        for i in 0..self.io.past_keys.len() * 2 {
            let mut buffer = KvBuffer::new(self.kv_elem, lens.len(), shape)?;
            if let Some((from, old_capacity)) = old.and_then(|(b, c)| Some((b.get(i)?, c))) {
                buffer.keep_rows(from, old_capacity, lens, shape);
            }
            buffers.push(buffer);
        }
        Ok(buffers)
    }

    fn kv_shape(&self, capacity: usize) -> KvShape {
        KvShape {
            heads: self.kv_heads,
            capacity,
            dim: self.head_dim,
        }
    }

    fn forward_in_place(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let past_len = cache.len();
        self.reserve_in_place(cache, past_len + ids.len())?;
        let KvStore::OrtInPlace(kv) = &mut cache.store else {
            unreachable!("reserved above")
        };
        let mut binding = self.session.create_binding().map_err(ort_error)?;
        for (name, value) in token_inputs(&self.io, ids, past_len)? {
            binding.bind_input(name, &value).map_err(ort_error)?;
        }
        let shape = self.kv_shape(kv.capacity);
        for (i, buffer) in kv.buffers.iter_mut().enumerate() {
            let names = self.io.kv_names(i);
            buffer.bind_rows(&mut binding, names, &self.cpu_memory, (0, 1), shape)?;
        }
        self.run_for_logits(binding, logits)?;
        cache.extend(ids);
        Ok(())
    }

    /// Binds the logits to CPU memory, runs `binding` and copies the last position's row.
    fn run_for_logits(
        &mut self,
        mut binding: ort::session::IoBinding,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        binding
            .bind_output_to_device(self.io.logits.as_str(), &self.cpu_memory)
            .map_err(ort_error)?;
        let outputs = self.session.run_binding(&binding).map_err(ort_error)?;
        last_logits(&outputs[self.io.logits.as_str()], self.vocab_size, logits)
    }

    /// Whether slot caches share batch buffers: the in-place graph, which takes each row's
    /// length from the attention mask.
    fn batches(&self) -> bool {
        self.info.kv_in_place && self.io.attention_mask.is_some()
    }

    /// Makes the slot buffers hold at least `rows` rows of `positions`, keeping what every
    /// row holds (idle slots keep their prefix for reuse).
    fn reserve_rows(&mut self, rows: usize, positions: usize) -> Result<(), EngineError> {
        let old = &self.rows;
        if old.lens.len() >= rows && old.capacity >= positions {
            return Ok(());
        }
        let capacity = positions
            .max(old.capacity)
            .next_power_of_two()
            .max(super::MIN_KV_CAPACITY);
        let mut lens = old.lens.clone();
        lens.resize(rows.max(lens.len()), 0);
        let buffers = self.kv_buffers(capacity, &lens, Some((&old.buffers, old.capacity)))?;
        self.rows = SlotRows {
            buffers,
            capacity,
            lens,
        };
        Ok(())
    }

    /// Binds rows `first..first + count` of every slot buffer as both past and present.
    fn bind_rows(
        &mut self,
        binding: &mut ort::session::IoBinding,
        first: usize,
        count: usize,
    ) -> Result<(), EngineError> {
        let shape = self.kv_shape(self.rows.capacity);
        for (i, buffer) in self.rows.buffers.iter_mut().enumerate() {
            let names = self.io.kv_names(i);
            buffer.bind_rows(binding, names, &self.cpu_memory, (first, count), shape)?;
        }
        Ok(())
    }

    /// Runs `ids` after what slot `row` holds (a prefill chunk, or one step of a lone
    /// sequence), in that row of the slot buffers.
    fn forward_row(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        row: usize,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let past_len = cache.len();
        self.reserve_rows(row + 1, past_len + ids.len())?;
        let mut binding = self.session.create_binding().map_err(ort_error)?;
        for (name, value) in token_inputs(&self.io, ids, past_len)? {
            binding.bind_input(name, &value).map_err(ort_error)?;
        }
        self.bind_rows(&mut binding, row, 1)?;
        self.run_for_logits(binding, logits)?;
        self.rows.lens[row] = past_len + ids.len();
        cache.extend(ids);
        Ok(())
    }

    /// One token for each slot cache in `caches`, in one run over rows `0..=max slot`. A row in
    /// that range whose slot is idle runs a throwaway token just past what it holds, which
    /// leaves its cached prefix as it was.
    fn decode_rows(
        &mut self,
        ids: &[u32],
        caches: &mut [&mut KvCache],
        slots: &[usize],
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let rows = slots.iter().max().map_or(0, |&s| s + 1);
        let mut positions: Vec<usize> = (0..rows)
            .map(|r| self.rows.lens.get(r).copied().unwrap_or(0))
            .collect();
        let mut tokens = vec![0i64; rows];
        for ((&slot, cache), &id) in slots.iter().zip(caches.iter()).zip(ids) {
            positions[slot] = cache.len();
            tokens[slot] = i64::from(id);
        }
        let total = positions.iter().max().map_or(0, |&p| p + 1);
        self.reserve_rows(rows, total)?;
        let mut binding = self.session.create_binding().map_err(ort_error)?;
        let input_ids = Tensor::from_array(([rows, 1usize], tokens)).map_err(ort_error)?;
        binding
            .bind_input(self.io.input_ids.as_str(), &input_ids)
            .map_err(ort_error)?;
        // Each row attends to its own positions: ones up to its length, zeros after.
        let mut mask = vec![0i64; rows * total];
        for (r, &p) in positions.iter().enumerate() {
            mask[r * total..r * total + p + 1].fill(1);
        }
        let mask = Tensor::from_array(([rows, total], mask)).map_err(ort_error)?;
        if let Some(name) = &self.io.attention_mask {
            binding
                .bind_input(name.as_str(), &mask)
                .map_err(ort_error)?;
        }
        let position_ids = Tensor::from_array((
            [rows, 1usize],
            positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
        ))
        .map_err(ort_error)?;
        if let Some(name) = &self.io.position_ids {
            binding
                .bind_input(name.as_str(), &position_ids)
                .map_err(ort_error)?;
        }
        self.bind_rows(&mut binding, 0, rows)?;
        binding
            .bind_output_to_device(self.io.logits.as_str(), &self.cpu_memory)
            .map_err(ort_error)?;
        let outputs = self.session.run_binding(&binding).map_err(ort_error)?;
        let all = Logits::of(&outputs[self.io.logits.as_str()])?;
        let vocab = all.vocab;
        // [rows, positions, vocab]: each row's last position.
        let per_row = all.len() / rows.max(1);
        if vocab != self.vocab_size || per_row < vocab || all.len() != per_row * rows {
            return Err(EngineError::BadLogits {
                got: all.len(),
                vocab: self.vocab_size,
            });
        }
        logits.clear();
        for &slot in slots {
            let end = (slot + 1) * per_row;
            all.extend(end - vocab..end, logits);
        }
        drop(outputs);
        drop(binding);
        for ((&slot, cache), &id) in slots.iter().zip(caches.iter_mut()).zip(ids) {
            self.rows.lens[slot] = cache.len() + 1;
            cache.extend(&[id]);
        }
        Ok(())
    }

    fn empty_past(&self) -> Result<Vec<DynValue>, EngineError> {
        (0..self.io.past_keys.len() * 2)
            .map(|_| ort_kv::empty_past(self.kv_elem, self.kv_heads, self.head_dim))
            .collect()
    }
}

fn i64_tensor(values: Vec<i64>) -> Result<DynValue, EngineError> {
    let shape = [1usize, values.len()];
    Tensor::from_array((shape, values))
        .map(|t| t.into_dyn())
        .map_err(ort_error)
}

/// The inputs other than the KV cache for running `ids` after `past_len` cached positions.
fn token_inputs<'a>(
    io: &'a IoNames,
    ids: &[u32],
    past_len: usize,
) -> Result<Vec<(&'a str, DynValue)>, EngineError> {
    let n = ids.len();
    let mut inputs = Vec::with_capacity(4);
    inputs.push((
        io.input_ids.as_str(),
        i64_tensor(ids.iter().map(|&i| i64::from(i)).collect())?,
    ));
    if let Some(name) = &io.attention_mask {
        inputs.push((name.as_str(), i64_tensor(vec![1; past_len + n])?));
    }
    if let Some(name) = &io.position_ids {
        let positions = (past_len as i64..(past_len + n) as i64).collect();
        inputs.push((name.as_str(), i64_tensor(positions)?));
    }
    if let Some(name) = &io.use_cache_branch {
        let flag = Tensor::from_array(([1usize], vec![past_len > 0])).map_err(ort_error)?;
        inputs.push((name.as_str(), flag.into_dyn()));
    }
    Ok(inputs)
}

/// Copies the last position's row of a `[batch, positions, vocab]` logits output into `out`.
fn last_logits(value: &DynValue, vocab_size: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
    let all = Logits::of(value)?;
    let vocab = all.vocab;
    if vocab_size != 0 && vocab != vocab_size {
        return Err(EngineError::BadLogits {
            got: all.len(),
            vocab: vocab_size,
        });
    }
    let start = super::last_row_start(all.len(), vocab)?;
    out.clear();
    all.extend(start..all.len(), out);
    Ok(())
}

impl Engine for OrtEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        if self.batches() {
            usize::MAX
        } else {
            1
        }
    }

    fn slot_capacity(&self) -> usize {
        self.rows.capacity
    }

    fn decode_batch(
        &mut self,
        ids: &[u32],
        caches: &mut [&mut KvCache],
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let slots: Option<Vec<usize>> = caches.iter().map(|c| c.slot()).collect();
        match slots {
            Some(slots) if self.batches() && !slots.is_empty() => {
                self.decode_rows(ids, caches, &slots, logits)
            }
            _ => super::decode_each(self, ids, caches, logits),
        }
    }

    fn truncate(&self, cache: &mut KvCache, len: usize) -> Result<(), EngineError> {
        if len >= cache.len() {
            return Ok(());
        }
        if len == 0 {
            cache.clear();
            return Ok(());
        }
        if self.info.kv_in_place {
            // Positions past `len` are beyond the attention mask from now on and are
            // overwritten by the next forward (a slot row's length is set by its next step).
            cache.truncate_tokens(len);
            return Ok(());
        }
        let kv = match &cache.store {
            KvStore::OrtGrown(kv) => kv,
            KvStore::Empty => {
                cache.clear();
                return Ok(());
            }
            other => return Err(EngineError::ForeignCache(other.owner())),
        };
        let trimmed =
            kv.0.iter()
                .map(|value| ort_kv::truncated(value, len))
                .collect::<Result<Vec<_>, _>>()?;
        cache.store = KvStore::OrtGrown(GrownKv(trimmed));
        cache.truncate_tokens(len);
        Ok(())
    }

    fn forward(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        if let Some(row) = cache.slot().filter(|_| self.batches()) {
            return self.forward_row(ids, cache, row, logits);
        }
        if self.info.kv_in_place {
            return self.forward_in_place(ids, cache, logits);
        }
        let past_len = cache.len();
        let layers = self.io.past_keys.len();
        let empty;
        let past: &[DynValue] = match &cache.store {
            KvStore::OrtGrown(kv) => &kv.0,
            KvStore::Empty => {
                empty = self.empty_past()?;
                &empty
            }
            other => return Err(EngineError::ForeignCache(other.owner())),
        };
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(4 + 2 * layers);
        for (name, value) in token_inputs(&self.io, ids, past_len)? {
            inputs.push((Cow::Borrowed(name), value.into()));
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
        last_logits(&outputs[self.io.logits.as_str()], self.vocab_size, logits)?;
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
        cache.store = KvStore::OrtGrown(GrownKv(next));
        cache.extend(ids);
        Ok(())
    }
}

/// Per provider, the nodes of an ONNX Runtime profile (a JSON list of events; a node's
/// `"cat": "Node"` events carry `args.provider` and `args.op_name`).
fn placement_from_profile(json: &str) -> Result<Vec<Placement>, String> {
    let events: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("the profile is not JSON: {e}"))?;
    let mut seen = std::collections::HashSet::new();
    let mut by_provider: std::collections::BTreeMap<String, Placement> = Default::default();
    for event in &events {
        let args = &event["args"];
        let (Some("Node"), Some(name), Some(provider), Some(op)) = (
            event["cat"].as_str(),
            event["name"].as_str(),
            args["provider"].as_str(),
            args["op_name"].as_str(),
        ) else {
            continue;
        };
        // A node's run is its kernel-time event (fences are events of their own); each node
        // counts once.
        let Some(node) = name.strip_suffix("_kernel_time") else {
            continue;
        };
        if !seen.insert(node.to_string()) {
            continue;
        }
        let entry = by_provider
            .entry(provider.to_string())
            .or_insert_with(|| Placement {
                provider: provider.to_string(),
                nodes: 0,
                op_types: Default::default(),
                subgraph_op_types: Default::default(),
            });
        entry.nodes += 1;
        *entry
            .op_types
            .entry(subgraph_kind(op).to_string())
            .or_default() += 1;
    }
    if by_provider.is_empty() {
        return Err("the profile has no node events".into());
    }
    // Most nodes first: the provider doing the work leads.
    let mut placement: Vec<Placement> = by_provider.into_values().collect();
    placement.sort_by_key(|p| std::cmp::Reverse(p.nodes));
    Ok(placement)
}

/// A compiling provider's fused node is named by its number ("OpenVINO-EP-subgraph_3"): the
/// number is dropped, so the op types count subgraphs of a kind.
fn subgraph_kind(op: &str) -> &str {
    match op.rsplit_once('_') {
        Some((kind, n)) if op.contains("subgraph") && n.bytes().all(|b| b.is_ascii_digit()) => kind,
        _ => op,
    }
}

/// After the session is built, the pages of the model files that ONNX Runtime mapped (external
/// data) and read while prepacking stay resident, though the prepacked copies are what runs;
/// only the embedding rows a prompt gathers are read again. Dropping those pages from this
/// process lets them count as page cache instead (measured on the default model: peak RSS in
/// `emberd bench` 254 → 230 MiB); a later read maps them back from the page cache. Only
/// mappings without a dirty page are touched: for a clean private mapping this changes no
/// contents. Returns the bytes released.
#[cfg(target_os = "linux")]
fn unmap_clean_weight_pages(model_file: &Path) -> usize {
    let Some(dir) = model_file.parent().and_then(|d| d.canonicalize().ok()) else {
        return 0;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut released = 0;
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-').and_then(|(a, b)| {
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        }) {
            // "start-end perms offset dev inode path"
            let path = fields.nth(4).map(Path::new);
            current = path
                .filter(|p| p.parent() == Some(dir.as_path()))
                .map(|_| (start, end));
        } else if first == "Private_Dirty:" {
            let dirty = fields.next().unwrap_or("1") != "0";
            if let Some((start, end)) = current.take().filter(|_| !dirty) {
                // SAFETY: a range of this process's own file mapping with no dirty page;
                // MADV_DONTNEED on it only drops page-table entries, and the contents read
                // afterwards are the file's, as before.
                let (addr, len) = (start as *mut libc::c_void, end - start);
                if unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) } == 0 {
                    released += len;
                }
            }
        }
    }
    released
}

#[cfg(not(target_os = "linux"))]
fn unmap_clean_weight_pages(_model_file: &Path) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_counts_each_node_once_per_provider_with_its_op_types() {
        // The shape of ONNX Runtime's profile: session events, then node events.
        let profile = r#"[
            {"cat":"Session","name":"model_run","args":{}},
            {"cat":"Node","name":"attn0_kernel_time","args":{"op_name":"GroupQueryAttention","provider":"CPUExecutionProvider"}},
            {"cat":"Node","name":"attn1_kernel_time","args":{"op_name":"GroupQueryAttention","provider":"CPUExecutionProvider"}},
            {"cat":"Node","name":"attn1_fence_before","args":{"op_name":"GroupQueryAttention","provider":"CPUExecutionProvider"}},
            {"cat":"Node","name":"ln_kernel_time","args":{"op_name":"SimplifiedLayerNormalization","provider":"CPUExecutionProvider"}},
            {"cat":"Node","name":"OpenVINOExecutionProvider_OpenVINO-EP-subgraph_1_0_kernel_time","args":{"op_name":"OpenVINO-EP-subgraph_1","provider":"OpenVINOExecutionProvider"}}
        ]"#;
        let placement = placement_from_profile(profile).unwrap();
        assert_eq!(placement.len(), 2);
        assert_eq!(placement[0].provider, "CPUExecutionProvider");
        assert_eq!(placement[0].nodes, 3, "{placement:?}");
        assert_eq!(placement[0].op_types["GroupQueryAttention"], 2);
        assert_eq!(placement[1].provider, "OpenVINOExecutionProvider");
        assert_eq!(placement[1].nodes, 1);
        assert_eq!(placement[1].op_types["OpenVINO-EP-subgraph"], 1);
        assert!(placement_from_profile("[]").is_err());
        assert!(placement_from_profile("not json").is_err());
    }

    #[test]
    fn the_reason_is_cut_out_of_onnx_runtimes_exception_text() {
        let npu = "/onnxruntime/onnxruntime/core/providers/openvino/openvino_provider_factory.cc:141 std::string onnxruntime::openvino_ep::ParseDeviceType(std::shared_ptr<OVCore>, const onnxruntime::ProviderOptions&) [ERROR] [OpenVINO] Device NPU is not available";
        assert_eq!(ort_reason(npu), "[OpenVINO] Device NPU is not available");
        let option = "/onnxruntime/onnxruntime/core/providers/openvino/openvino_provider_factory.cc:232 onnxruntime::openvino_ep::ParseProviderInfo(const onnxruntime::ProviderOptions&, const onnxruntime::ConfigOptions*, ProviderInfo&)::<lambda()> Invalid provider_option key: bogus_option";
        assert_eq!(
            ort_reason(option),
            "Invalid provider_option key: bogus_option"
        );
        assert_eq!(ort_reason("plain words"), "plain words");
    }

    #[test]
    fn under_auto_each_provider_gives_way_to_the_next_down_to_the_cpu() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tried = attempts(&list(&["openvino", "cpu", "cuda"]), Backend::Auto);
        assert_eq!(
            tried,
            [list(&["openvino", "cpu", "cuda"]), list(&["cpu", "cuda"])]
        );
        let tried = attempts(&list(&["tensorrt", "cuda"]), Backend::Auto);
        assert_eq!(
            tried,
            [list(&["tensorrt", "cuda"]), list(&["cuda"]), list(&["cpu"])]
        );
        assert_eq!(
            attempts(&list(&["openvino", "cpu"]), Backend::Ort),
            [list(&["openvino", "cpu"])]
        );
    }
}
