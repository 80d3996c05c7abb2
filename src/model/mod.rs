//! A model package: a directory with an ONNX decoder, its tokenizer and its configs.
//!
//! Three layouts are recognised, by the files present and the graph's inputs:
//! - Optimum single file (`model.onnx` with `past_key_values.*` inputs),
//! - Optimum merged (`decoder_model_merged.onnx` with a `use_cache_branch` input),
//! - onnxruntime-genai (`genai_config.json` naming the file and the I/O names).
//!
//! emberd's own packages add `emberd.json`, which names the ONNX file each engine uses.
//! Hub exports that keep several quantizations in `onnx/` (`model.onnx`, `model_q4.onnx`, …)
//! are served from the first of `ONNX_SUBDIR_FILES` there.

pub mod onnx_io;

use std::path::{Path, PathBuf};

use serde_json::Value;

use onnx_io::{Dim, GraphIo, ValueInfo, ELEM_BOOL, ELEM_F16, ELEM_F32};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{dir}: no ONNX model found (looked for emberd.json, genai_config.json, {}, and in onnx/ for {})", TOP_LEVEL_FILES.join(", "), ONNX_SUBDIR_FILES.join(", "))]
    NoModelFile { dir: PathBuf },
    #[error("{path}: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
}

impl ModelError {
    fn bad(path: &Path, reason: impl Into<String>) -> Self {
        ModelError::BadFile {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
    fn inconsistent(path: &Path, reason: impl Into<String>) -> Self {
        ModelError::Inconsistent {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    Optimum,
    OptimumMerged,
    Genai,
}

/// Names of the graph inputs and outputs the engines feed and read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IoNames {
    pub input_ids: String,
    pub attention_mask: Option<String>,
    pub position_ids: Option<String>,
    pub use_cache_branch: Option<String>,
    pub past_keys: Vec<String>,
    pub past_values: Vec<String>,
    pub logits: String,
    pub present_keys: Vec<String>,
    pub present_values: Vec<String>,
}

impl IoNames {
    /// (past, present) of the cache's `i`-th tensor: each layer's keys, then its values.
    pub fn kv_names(&self, i: usize) -> (&str, &str) {
        let layer = i / 2;
        if i.is_multiple_of(2) {
            (&self.past_keys[layer], &self.present_keys[layer])
        } else {
            (&self.past_values[layer], &self.present_values[layer])
        }
    }
}

/// Everything the engines and the generator need to know about a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub name: String,
    /// The architecture, as config.json's `model_type` names it ("llama"), where it does.
    pub family: Option<String>,
    pub layout: Layout,
    /// ONNX file for ONNX Runtime.
    pub ort_file: PathBuf,
    /// The graph in ONNX's standard operators (and MatMulNBits), without ONNX Runtime's fused
    /// CPU attention: tract's, and what ONNX Runtime's device providers get (OpenVINO takes the
    /// fused GroupQueryAttention only on a GPU; on its CPU device the fused graph split into 31
    /// pieces and decoded 4x slower). The same file as `ort_file` where a package has one graph.
    pub plain_file: PathBuf,
    /// The ONNX Runtime graph attends with com.microsoft.GroupQueryAttention, which writes
    /// the new keys and values into a buffer bound as both past and present: the engine can
    /// keep the cache in place instead of receiving a grown copy every step.
    pub ort_kv_in_place: bool,
    /// The KV cache's element type, as the graph's past inputs declare it.
    pub kv_elem: KvElem,
    pub io: IoNames,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_len: usize,
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub tokenizer_file: PathBuf,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
}

/// Element type of a graph's KV cache: f32, or f16 where the whole graph runs in half
/// precision (hub exports' `model_q4f16.onnx`, `model_fp16.onnx`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvElem {
    F32,
    F16,
}

impl KvElem {
    pub fn size(self) -> usize {
        match self {
            KvElem::F32 => 4,
            KvElem::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvElem::F32 => "f32",
            KvElem::F16 => "f16",
        }
    }
}

fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::bad(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| ModelError::bad(path, format!("not valid JSON: {e}")))
}

fn read_json_opt(path: &Path) -> Result<Option<Value>, ModelError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// `eos_token_id` may be a number or a list of numbers.
fn id_list(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// A special token in tokenizer_config.json is a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn usize_at(v: Option<&Value>) -> Option<usize> {
    v.and_then(|x| x.as_u64()).map(|x| x as usize)
}

fn fixed(dim: Option<&Dim>) -> Option<usize> {
    match dim {
        Some(Dim::Fixed(n)) if *n > 0 => Some(*n as usize),
        _ => None,
    }
}

impl ModelPackage {
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::NoDirectory(dir.to_path_buf()));
        }
        let genai = read_json_opt(&dir.join("genai_config.json"))?;
        let manifest = read_json_opt(&dir.join("emberd.json"))?;
        let config = read_json_opt(&dir.join("config.json"))?;
        let generation = read_json_opt(&dir.join("generation_config.json"))?;

        let (ort_file, plain_file) = model_files(dir, genai.as_ref(), manifest.as_ref())?;
        let graph = onnx_io::read_graph_io(&ort_file)
            .map_err(|e| ModelError::bad(&ort_file, format!("cannot read the ONNX graph: {e}")))?;
        let genai_decoder = genai.as_ref().and_then(|g| g.pointer("/model/decoder"));
        let io = io_names(&ort_file, &graph, genai_decoder)?;
        let ort_kv_in_place = graph.op_types.contains_key("GroupQueryAttention");
        let layout = if genai.is_some() {
            Layout::Genai
        } else if io.use_cache_branch.is_some() {
            Layout::OptimumMerged
        } else {
            Layout::Optimum
        };

        let past_key = graph
            .inputs
            .iter()
            .find(|i| i.name == io.past_keys[0])
            .expect("checked in io_names");
        let kv_elem = match past_key.elem_type {
            ELEM_F32 => KvElem::F32,
            ELEM_F16 => KvElem::F16,
            other => {
                return Err(ModelError::inconsistent(
                    &ort_file,
                    format!(
                        "{} is {}; emberd keeps a KV cache in f32 or f16",
                        past_key.name,
                        onnx_io::elem_type_name(other)
                    ),
                ))
            }
        };
        let cfg = |key: &str| config.as_ref().and_then(|c| c.get(key));
        let dec = |key: &str| genai_decoder.and_then(|d| d.get(key));
        let kv_heads = fixed(past_key.dims.get(1))
            .or_else(|| usize_at(dec("num_key_value_heads")))
            .or_else(|| usize_at(cfg("num_key_value_heads")))
            .ok_or_else(|| {
                ModelError::inconsistent(
                    &ort_file,
                    "the number of KV heads is neither in the graph nor in the config",
                )
            })?;
        let head_dim = fixed(past_key.dims.get(3))
            .or_else(|| usize_at(dec("head_size")))
            .or_else(|| usize_at(cfg("head_dim")))
            .ok_or_else(|| {
                ModelError::inconsistent(
                    &ort_file,
                    "the head size is neither in the graph nor in the config",
                )
            })?;
        let logits = graph
            .outputs
            .iter()
            .find(|o| o.name == io.logits)
            .expect("checked in io_names");
        let vocab_size = fixed(logits.dims.get(2))
            .or_else(|| usize_at(genai.as_ref().and_then(|g| g.pointer("/model/vocab_size"))))
            .or_else(|| usize_at(cfg("vocab_size")))
            .ok_or_else(|| {
                ModelError::inconsistent(
                    &ort_file,
                    "the vocabulary size is neither in the graph nor in the config",
                )
            })?;
        let context_len = usize_at(
            genai
                .as_ref()
                .and_then(|g| g.pointer("/model/context_length")),
        )
        .or_else(|| usize_at(cfg("max_position_embeddings")))
        .unwrap_or(2048);

        let tokenizer_file = dir.join("tokenizer.json");
        if !tokenizer_file.is_file() {
            return Err(ModelError::bad(
                &tokenizer_file,
                "missing: a model package needs tokenizer.json",
            ));
        }
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = read_json_opt(&tok_config_path)?;
        let chat_template = chat_template(dir, tok_config.as_ref());
        let tcfg = |key: &str| tok_config.as_ref().and_then(|c| c.get(key));
        let bos_token = token_string(tcfg("bos_token")).unwrap_or_default();
        let eos_token = token_string(tcfg("eos_token")).unwrap_or_default();

        let mut eos_ids = id_list(generation.as_ref().and_then(|g| g.get("eos_token_id")));
        if eos_ids.is_empty() {
            eos_ids = id_list(
                genai
                    .as_ref()
                    .and_then(|g| g.pointer("/model/eos_token_id")),
            );
        }
        if eos_ids.is_empty() {
            eos_ids = id_list(cfg("eos_token_id"));
        }
        let bos_id = id_list(generation.as_ref().and_then(|g| g.get("bos_token_id")))
            .first()
            .copied()
            .or_else(|| id_list(cfg("bos_token_id")).first().copied());
        let name = manifest
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });

        let family = config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(ModelPackage {
            dir: dir.to_path_buf(),
            name,
            family,
            layout,
            ort_file,
            plain_file,
            ort_kv_in_place,
            kv_elem,
            layers: io.past_keys.len(),
            io,
            kv_heads,
            head_dim,
            vocab_size,
            context_len,
            eos_ids,
            bos_id,
            tokenizer_file,
            chat_template,
            bos_token,
            eos_token,
        })
    }
}

/// Optimum's file names, single and merged decoder.
const TOP_LEVEL_FILES: [&str; 3] = [
    "model.onnx",
    "decoder_model_merged.onnx",
    "decoder_with_past_model.onnx",
];

/// The hub's `onnx/` folder holds one export in several quantizations (`optimum-cli` then
/// ONNX Runtime's quantizers, as transformers.js names them): the 4-bit one with f32 caches
/// first, as an edge device wants; the f16 ones last: ONNX Runtime's CPU kernels compute most
/// of them in f32 after converting (the real q4f16 export decodes at 28 tokens/s where its
/// q4 twin does 37, same run), and tract keeps f32 caches only.
const ONNX_SUBDIR_FILES: [&str; 8] = [
    "model_q4.onnx",
    "model_int8.onnx",
    "model_quantized.onnx",
    "model_uint8.onnx",
    "model.onnx",
    "model_bnb4.onnx",
    "model_q4f16.onnx",
    "model_fp16.onnx",
];

fn model_files(
    dir: &Path,
    genai: Option<&Value>,
    manifest: Option<&Value>,
) -> Result<(PathBuf, PathBuf), ModelError> {
    let existing = |name: &str, from: &Path| -> Result<PathBuf, ModelError> {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ModelError::inconsistent(
                from,
                format!("names {name}, which does not exist in {}", dir.display()),
            ))
        }
    };
    if let Some(m) = manifest {
        let from = dir.join("emberd.json");
        let ort = m
            .pointer("/files/ort")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::bad(&from, "missing files.ort"))?;
        let tract = m
            .pointer("/files/tract")
            .and_then(|v| v.as_str())
            .unwrap_or(ort);
        return Ok((existing(ort, &from)?, existing(tract, &from)?));
    }
    if let Some(g) = genai {
        let from = dir.join("genai_config.json");
        let file = g
            .pointer("/model/decoder/filename")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::bad(&from, "missing model.decoder.filename"))?;
        let path = existing(file, &from)?;
        return Ok((path.clone(), path));
    }
    let found = TOP_LEVEL_FILES
        .iter()
        .map(|name| dir.join(name))
        .chain(
            ONNX_SUBDIR_FILES
                .iter()
                .map(|name| dir.join("onnx").join(name)),
        )
        .find(|path| path.is_file());
    if let Some(path) = found {
        return Ok((path.clone(), path));
    }
    Err(ModelError::NoModelFile {
        dir: dir.to_path_buf(),
    })
}

fn chat_template(dir: &Path, tok_config: Option<&Value>) -> Option<String> {
    // Newer exports keep the template in its own file.
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    match tok_config?.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: the one called "default".
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Finds the I/O names: from genai_config.json where given, else by Optimum's conventions.
fn io_names(
    path: &Path,
    graph: &GraphIo,
    genai_decoder: Option<&Value>,
) -> Result<IoNames, ModelError> {
    let input = |name: &str| graph.inputs.iter().find(|i| i.name == name);
    let has_output = |name: &str| graph.outputs.iter().any(|o| o.name == name);
    let named = |section: &str, key: &str, default: &str| -> String {
        genai_decoder
            .and_then(|d| d.get(section))
            .and_then(|s| s.get(key))
            .and_then(|v| v.as_str())
            .unwrap_or(default)
            .to_string()
    };
    let past_key_pattern = named("inputs", "past_key_names", "past_key_values.%d.key");
    let past_value_pattern = named("inputs", "past_value_names", "past_key_values.%d.value");
    let present_key_pattern = named("outputs", "present_key_names", "present.%d.key");
    let present_value_pattern = named("outputs", "present_value_names", "present.%d.value");

    let mut io = IoNames {
        input_ids: named("inputs", "input_ids", "input_ids"),
        attention_mask: Some(named("inputs", "attention_mask", "attention_mask")),
        position_ids: Some(named("inputs", "position_ids", "position_ids")),
        use_cache_branch: Some("use_cache_branch".into()),
        past_keys: Vec::new(),
        past_values: Vec::new(),
        logits: named("outputs", "logits", "logits"),
        present_keys: Vec::new(),
        present_values: Vec::new(),
    };
    if input(&io.input_ids).is_none() {
        return Err(ModelError::inconsistent(
            path,
            format!("the graph has no input {:?}", io.input_ids),
        ));
    }
    if !has_output(&io.logits) {
        return Err(ModelError::inconsistent(
            path,
            format!("the graph has no output {:?}", io.logits),
        ));
    }
    io.attention_mask = io.attention_mask.filter(|n| input(n).is_some());
    io.position_ids = io.position_ids.filter(|n| input(n).is_some());
    io.use_cache_branch = io
        .use_cache_branch
        .filter(|n| input(n).is_some_and(|i: &ValueInfo| i.elem_type == ELEM_BOOL));
    for layer in 0.. {
        let key = past_key_pattern.replace("%d", &layer.to_string());
        if input(&key).is_none() {
            break;
        }
        let value = past_value_pattern.replace("%d", &layer.to_string());
        let present_key = present_key_pattern.replace("%d", &layer.to_string());
        let present_value = present_value_pattern.replace("%d", &layer.to_string());
        for (name, found) in [
            (&value, input(&value).is_some()),
            (&present_key, has_output(&present_key)),
            (&present_value, has_output(&present_value)),
        ] {
            if !found {
                return Err(ModelError::inconsistent(
                    path,
                    format!("layer {layer} has {key} but no {name}"),
                ));
            }
        }
        io.past_keys.push(key);
        io.past_values.push(value);
        io.present_keys.push(present_key);
        io.present_values.push(present_value);
    }
    if io.past_keys.is_empty() {
        return Err(ModelError::inconsistent(
            path,
            format!("the graph has no KV-cache inputs named like {past_key_pattern:?}; emberd needs a model exported with past key values"),
        ));
    }
    Ok(io)
}
