//! The pure-Rust fallback engine: tract runs the same model package on any CPU, with no
//! native library to install.

use std::sync::Arc;

use tract_onnx::prelude::*;

use super::kv::KvStore;
use super::{Engine, EngineError, EngineInfo, KvCache};
use crate::config::ModelConfig;
use crate::model::{IoNames, KvElem, ModelPackage};

pub struct TractEngine {
    plan: Arc<TypedRunnableModel>,
    /// Position of each named input in the plan's input list.
    input_order: Vec<InputRole>,
    /// Output positions of the logits and of the present keys/values (keys then values per layer).
    logits_output: usize,
    present_outputs: Vec<usize>,
    kv_heads: usize,
    head_dim: usize,
    layers: usize,
    vocab_size: usize,
    info: EngineInfo,
}

#[derive(Debug, Clone, Copy)]
enum InputRole {
    Ids,
    Mask,
    Positions,
    UseCacheBranch,
    /// Index into the past list (2 * layer for keys, 2 * layer + 1 for values).
    Past(usize),
}

/// Per-layer keys then values, as tract produced them.
pub(crate) struct TractKv(Vec<Tensor>);

fn tract_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tract(format!("{e:#}"))
}

fn role_of(io: &IoNames, name: &str) -> Option<InputRole> {
    if name == io.input_ids {
        return Some(InputRole::Ids);
    }
    if io.attention_mask.as_deref() == Some(name) {
        return Some(InputRole::Mask);
    }
    if io.position_ids.as_deref() == Some(name) {
        return Some(InputRole::Positions);
    }
    if io.use_cache_branch.as_deref() == Some(name) {
        return Some(InputRole::UseCacheBranch);
    }
    for layer in 0..io.past_keys.len() {
        if io.past_keys[layer] == name {
            return Some(InputRole::Past(2 * layer));
        }
        if io.past_values[layer] == name {
            return Some(InputRole::Past(2 * layer + 1));
        }
    }
    None
}

impl TractEngine {
    /// `fallback_reason` says why tract serves instead of ONNX Runtime, when it does.
    pub fn load(
        package: &ModelPackage,
        options: &ModelConfig,
        fallback_reason: Option<String>,
    ) -> Result<Self, EngineError> {
        let path = &package.plain_file;
        if package.kv_elem != KvElem::F32 && *path == package.ort_file {
            return Err(EngineError::Tract(format!(
                "{}: the KV cache is {}; emberd's tract engine keeps it in f32 (ONNX Runtime \
                 serves this file, or an f32-cache file of the same export)",
                path.display(),
                package.kv_elem.name()
            )));
        }
        let mut model = tract_onnx::onnx()
            // Files quantized by ONNX Runtime carry value_info shapes that contradict tract's inference.
            .with_ignore_value_info(true)
            .model_for_path(path)
            .map_err(|e| EngineError::Tract(format!("cannot load {}: {e:#}", path.display())))?;
        let s = model.sym("S");
        let p = model.sym("P");
        let io = &package.io;
        let mut input_order = Vec::new();
        let outlets = model.input_outlets().map_err(tract_error)?.to_vec();
        for (ix, outlet) in outlets.iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let role = role_of(io, &name).ok_or_else(|| {
                EngineError::Tract(format!(
                    "{}: unexpected graph input {name:?}",
                    path.display()
                ))
            })?;
            let one = 1usize.to_dim();
            let fact = match role {
                InputRole::Ids | InputRole::Positions => {
                    InferenceFact::dt_shape(i64::datum_type(), [one, s.to_dim()])
                }
                InputRole::Mask => {
                    InferenceFact::dt_shape(i64::datum_type(), [one, p.to_dim() + s.to_dim()])
                }
                InputRole::UseCacheBranch => InferenceFact::dt_shape(bool::datum_type(), [one]),
                InputRole::Past(_) => InferenceFact::dt_shape(
                    f32::datum_type(),
                    [
                        one,
                        package.kv_heads.to_dim(),
                        p.to_dim(),
                        package.head_dim.to_dim(),
                    ],
                ),
            };
            model.set_input_fact(ix, fact).map_err(tract_error)?;
            input_order.push(role);
        }
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(tract_error)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let find_output = |name: &str| {
            output_names.iter().position(|n| n == name).ok_or_else(|| {
                EngineError::Tract(format!("{}: no graph output {name:?}", path.display()))
            })
        };
        let logits_output = find_output(&io.logits)?;
        let mut present_outputs = Vec::new();
        for layer in 0..io.past_keys.len() {
            present_outputs.push(find_output(&io.present_keys[layer])?);
            present_outputs.push(find_output(&io.present_values[layer])?);
        }
        let threads = options.resolved_threads();
        let typed = model.into_optimized().map_err(|e| {
            EngineError::Tract(format!("cannot optimize {}: {e:#}", path.display()))
        })?;
        if threads > 1 {
            // tract's defaults (64 panels or 2^21 multiply-adds) keep every decode-sized
            // product of a small model on one thread; with steps on a pool worker (see
            // `step_pool`) splitting them pays: decode 45 -> 57-66 tok/s on 2 threads
            // (SmolLM2-135M), prefill unchanged. These are process-wide, and only tract
            // reads them.
            tract_linalg::multithread::set_threading_panel_threshold(8);
            tract_linalg::multithread::set_threading_mac_threshold(1 << 16);
        }
        let plan = typed.into_runnable().map_err(tract_error)?;
        release_freed_heap();
        let info = EngineInfo {
            engine: "tract",
            provider: "cpu".into(),
            threads,
            model_file: path.clone(),
            version: "tract-onnx 0.23".into(),
            fallback_reason,
            available_providers: Vec::new(),
            kv_in_place: false,
            placement: Vec::new(),
        };
        log::info!(
            "tract serving {} on the CPU with {} threads",
            path.display(),
            info.threads
        );
        Ok(TractEngine {
            plan,
            input_order,
            logits_output,
            present_outputs,
            kv_heads: package.kv_heads,
            head_dim: package.head_dim,
            layers: package.layers,
            vocab_size: package.vocab_size,
            info,
        })
    }
}

/// Loading parses the whole file and builds each weight more than once on its way to the
/// packed form, and the allocator keeps what was freed: returning it cuts the resident
/// memory of a loaded SmolLM2-135M from 300 to 200 MB (ONNX Runtime, measured the same
/// way, gains nothing, so only tract does this).
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free heap pages back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

thread_local! {
    /// The pool tract splits products over, with this (the stepping) thread as worker 0.
    static STEP_POOL: std::cell::RefCell<Option<Arc<rayon::ThreadPool>>> =
        const { std::cell::RefCell::new(None) };
}

/// A step runs on the calling thread, which is worker 0 of the pool that tract splits its
/// products over. The thread then works on its share at once and takes back any share the
/// other workers have not picked up yet. Calling into a pool from outside parks the caller
/// on every product while a sleeping worker wakes up, which costs more than a decode-sized
/// product saves (2 threads decoded slower than 1 that way). The pool lives as long as the
/// thread (rayon keeps a pool that adopted its caller), and engines on one thread share it.
fn step_pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, EngineError> {
    STEP_POOL.with_borrow_mut(|slot| {
        if let Some(pool) = slot.as_ref().filter(|p| p.current_num_threads() == threads) {
            return Ok(pool.clone());
        }
        let builder = || {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("emberd-tract-{i}"))
        };
        // A thread already in a pool cannot join another one (another thread count asked
        // on the same thread); that pool is then called from outside.
        let pool = builder()
            .use_current_thread()
            .build()
            .or_else(|_| builder().build())
            .map_err(|e| EngineError::Tract(format!("cannot start {threads} threads: {e}")))?;
        let pool = Arc::new(pool);
        *slot = Some(pool.clone());
        Ok(pool)
    })
}

fn i64_tensor(values: &[i64]) -> Result<Tensor, EngineError> {
    Tensor::from_shape(&[1, values.len()], values).map_err(tract_error)
}

impl Engine for TractEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn truncate(&self, cache: &mut KvCache, len: usize) -> Result<(), EngineError> {
        if len >= cache.len() {
            return Ok(());
        }
        let kv = match cache.take_store() {
            KvStore::Tract(kv) if len > 0 => kv,
            KvStore::Tract(_) | KvStore::Empty => {
                cache.clear();
                return Ok(());
            }
            other => {
                let owner = other.owner();
                cache.store = other;
                return Err(EngineError::ForeignCache(owner));
            }
        };
        let trimmed: Result<Vec<Tensor>, _> =
            kv.0.iter()
                .map(|t| t.slice(2, 0, len).map_err(tract_error))
                .collect();
        match trimmed {
            Ok(t) => {
                cache.store = KvStore::Tract(TractKv(t));
                cache.truncate_tokens(len);
                Ok(())
            }
            Err(e) => {
                cache.clear();
                Err(e)
            }
        }
    }

    fn forward(
        &mut self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        // Before the cache is taken apart, so that an error here leaves it whole.
        let threads = self.info.threads;
        let pool = if threads > 1 {
            Some(step_pool(threads)?)
        } else {
            None
        };
        let past_len = cache.len();
        let n = ids.len();
        let mut past: Vec<Option<Tensor>> = match cache.take_store() {
            KvStore::Tract(kv) => kv.0.into_iter().map(Some).collect(),
            KvStore::Empty => Vec::new(),
            other => {
                let owner = other.owner();
                cache.store = other;
                return Err(EngineError::ForeignCache(owner));
            }
        };
        let mut inputs: TVec<TValue> = TVec::with_capacity(self.input_order.len());
        for role in &self.input_order {
            let tensor = match role {
                InputRole::Ids => {
                    i64_tensor(&ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>())?
                }
                InputRole::Mask => i64_tensor(&vec![1; past_len + n])?,
                InputRole::Positions => {
                    i64_tensor(&(past_len as i64..(past_len + n) as i64).collect::<Vec<_>>())?
                }
                InputRole::UseCacheBranch => {
                    Tensor::from_shape(&[1], &[past_len > 0]).map_err(tract_error)?
                }
                InputRole::Past(i) => match past.get_mut(*i).and_then(Option::take) {
                    Some(t) => t,
                    None => Tensor::from_shape::<f32>(&[1, self.kv_heads, 0, self.head_dim], &[])
                        .map_err(tract_error)?,
                },
            };
            inputs.push(tensor.into_tvalue());
        }
        let run = || self.plan.run(inputs);
        let result = match pool {
            Some(pool) => tract_linalg::multithread::multithread_tract_scope(
                tract_linalg::multithread::Executor::MultiThread(pool),
                run,
            ),
            None => run(),
        };
        let mut outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                // The past tensors were moved into the failed run: the cache is gone.
                cache.clear();
                return Err(tract_error(e));
            }
        };
        let all = outputs[self.logits_output]
            .try_as_plain_ram()
            .and_then(|plain| plain.as_slice::<f32>())
            .map_err(tract_error)?;
        let start = super::last_row_start(all.len(), self.vocab_size)?;
        logits.clear();
        logits.extend_from_slice(&all[start..]);
        let mut next = Vec::with_capacity(2 * self.layers);
        for &ix in &self.present_outputs {
            // Outputs are exclusively owned here, so this moves the tensor out without a copy.
            let value = std::mem::replace(&mut outputs[ix], Tensor::default().into_tvalue());
            next.push(value.into_tensor());
        }
        cache.store = KvStore::Tract(TractKv(next));
        cache.extend(ids);
        Ok(())
    }
}
