//! Shared helpers: where the prepared models and the ONNX Runtime library are.
#![allow(dead_code)]

pub mod daemon;

use std::path::PathBuf;

use emberd::config::ModelConfig;
use emberd::engine::Backend;
use emberd::generate::Generator;
use emberd::model::ModelPackage;

pub const TINY_LAYOUTS: &[&str] = &[
    "optimum",
    "optimum-merged",
    "genai",
    "q4",
    "kq-llama3",
    "kq-qwen2",
];

/// ONNX Runtime publishes no library for 32-bit ARM (a Pi with a 32-bit OS): there emberd
/// serves with tract, the tests that exercise ONNX Runtime itself are ignored, and the rest
/// run on tract (`cross/test.sh armv7`).
pub const ORT_ON_TARGET: bool = !cfg!(target_arch = "arm");

/// The engine a daemon serves with on this target.
pub fn serving_backend() -> Backend {
    if ORT_ON_TARGET {
        Backend::Ort
    } else {
        Backend::Tract
    }
}

/// The serving engine's name, as the MQTT status and `emberd info` give it.
pub fn serving_engine() -> &'static str {
    if ORT_ON_TARGET {
        "ort"
    } else {
        "tract"
    }
}

/// `engine/provider`, as events and logs name the serving engine.
pub fn serving_label() -> String {
    format!("{}/cpu", serving_engine())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn must_exist(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `bash models/prepare.sh` first",
        path.display()
    );
    path
}

pub fn tiny_dir(layout: &str) -> PathBuf {
    must_exist(repo().join("models/test/generated").join(layout))
}

pub fn default_model_dir() -> PathBuf {
    must_exist(repo().join("models/smollm2-135m-instruct"))
}

pub fn ort_library() -> PathBuf {
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) => PathBuf::from(p),
        None => must_exist(repo().join("vendor/onnxruntime/lib/libonnxruntime.so")),
    }
}

pub fn engine_options(backend: Backend) -> ModelConfig {
    ModelConfig {
        backend,
        ort_library: Some(ort_library()),
        threads: 2,
        ..ModelConfig::default()
    }
}

pub fn generator(dir: PathBuf, backend: Backend) -> Generator {
    let package =
        ModelPackage::load(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    Generator::load(package, &engine_options(backend))
        .unwrap_or_else(|e| panic!("engine for {}: {e}", dir.display()))
}

/// Runs exactly `prompt` then `steps` greedy tokens from an empty cache; returns the ids and
/// the logits of every step, for comparison with reference logits.
pub fn greedy_trace(
    generator: &mut Generator,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut ids = Vec::with_capacity(steps);
    let mut all_logits = Vec::with_capacity(steps);
    let mut logits = generator.forward(prompt, true).unwrap().to_vec();
    for step in 0..steps {
        let token = emberd::generate::sampler::argmax(&logits);
        ids.push(token);
        all_logits.push(logits);
        if step + 1 == steps {
            break;
        }
        logits = generator.forward(&[token], false).unwrap().to_vec();
    }
    (ids, all_logits)
}

/// The logits of the prompt and then of each of `path`'s tokens but the last, fed in turn
/// (teacher forcing): one list per step, as greedy_trace returns them.
pub fn forced_trace(generator: &mut Generator, prompt: &[u32], path: &[u32]) -> Vec<Vec<f32>> {
    let mut all_logits = vec![generator.forward(prompt, true).unwrap().to_vec()];
    for &token in &path[..path.len().saturating_sub(1)] {
        all_logits.push(generator.forward(&[token], false).unwrap().to_vec());
    }
    all_logits
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON list of numbers (a reference's logits) as f32.
pub fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .expect("a number list")
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// Largest absolute difference between two logit vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The argv that runs the built emberd binary. When the tests themselves run under an
/// emulator (cross/qemu-run.sh), `EMBERD_TEST_EXEC_WRAPPER` names it: the kernel cannot run
/// the foreign binary on its own (no binfmt here).
pub fn emberd_argv() -> Vec<String> {
    let mut argv: Vec<String> = std::env::var("EMBERD_TEST_EXEC_WRAPPER")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    argv.push(env!("CARGO_BIN_EXE_emberd").to_string());
    argv
}

/// The built emberd binary as a command (through the emulator when cross-testing).
pub fn emberd_command() -> std::process::Command {
    let argv = emberd_argv();
    let mut command = std::process::Command::new(&argv[0]);
    command.args(&argv[1..]);
    command
}

/// Writes a secret file as emberd wants one: readable by its owner only.
pub fn write_secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A greedy, streamed request for `input` of up to `max_tokens` tokens, id "t", with the
/// ingress's work (ids, format) left to the generator.
pub fn greedy_request(
    input: emberd::protocol::PromptInput,
    max_tokens: u32,
) -> emberd::protocol::ValidRequest {
    emberd::protocol::ValidRequest {
        id: "t".into(),
        input,
        max_tokens,
        sampling: emberd::protocol::SamplingParams::greedy(),
        stop: Vec::new(),
        stream: true,
        timeout: std::time::Duration::from_secs(600),
        reply_to: None,
        ignore_eos: false,
        stream_interval: std::time::Duration::ZERO,
        prompt_ids: None,
        response_format: Default::default(),
        tools: None,
        constraint: None,
    }
}

/// Checks `outputs` against `schema` with Python's `jsonschema`; panics naming each failure.
pub fn assert_valid(what: &str, schema: &serde_json::Value, outputs: &[String]) {
    use std::io::Write;
    let mut child = std::process::Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/structured/validate.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the .venv that the test command makes (with tests/requirements.txt)");
    let input = serde_json::json!({"schema": schema, "outputs": outputs}).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the validator failed");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{what}: {report}");
    assert_eq!(report["checked"], outputs.len(), "{report}");
    assert_eq!(report["invalid"], 0, "{what}: {report}");
}
