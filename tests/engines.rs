//! tract against ONNX Runtime, and the rules that choose an engine and its providers.

mod common;

use common::*;
use emberd::engine::Backend;

#[test]
fn tiny_models_of_every_layout_match_their_reference_on_tract() {
    for layout in TINY_LAYOUTS {
        let dir = tiny_dir(layout);
        let reference = read_json(dir.join("reference.json"));
        let mut generator = generator(dir, Backend::Tract);
        assert_eq!(generator.engine_info().engine, "tract");
        for case in reference["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            // The 4-bit models' reference from ONNX Runtime's fast kernel quantizes activations
            // to int8; tract computes in f32, so it is held to the exact reference and its path.
            let (ids_key, key) = if case.get("step_logits_exact").is_some() {
                ("greedy_ids_exact", "step_logits_exact")
            } else {
                ("greedy_ids", "step_logits")
            };
            let expected = ids(&case[ids_key]);
            let (got, logits) = common::greedy_trace(&mut generator, &prompt, expected.len());
            assert_eq!(
                got, expected,
                "{layout}: greedy ids on tract differ from the reference"
            );
            let mut worst = 0.0f32;
            for (step, want) in case[key].as_array().unwrap().iter().enumerate() {
                let want = floats(want);
                worst = worst.max(max_abs_diff(&logits[step], &want));
            }
            assert!(worst <= 1e-3, "{layout}: tract logits differ by {worst}");
            eprintln!("tract {layout}: max |Δlogit| {worst:e}");
        }
    }
}

#[test]
fn tract_matches_the_exact_reference_on_the_default_model() {
    // The shipped file's 4-bit matmuls run in ONNX Runtime with accuracy_level 4 (int8
    // activations, logits within ~2.4 of exact); the package's exact reference is the same file
    // with f32 activations (accuracy_level 0), which is what tract computes.
    let reference = read_json(default_model_dir().join("reference.json"));
    let mut tract = generator(default_model_dir(), Backend::Tract);
    let mut ort = ORT_ON_TARGET.then(|| generator(default_model_dir(), Backend::Ort));
    for case in reference["prompts"].as_array().unwrap().iter().take(2) {
        let prompt = ids(&case["prompt_ids"]);
        let exact_ids = ids(&case["greedy_ids_exact"]);
        let n = exact_ids.len().min(32);
        let (tract_ids, tract_logits) = common::greedy_trace(&mut tract, &prompt, n);
        assert_eq!(
            tract_ids,
            exact_ids[..n],
            "tract greedy ids differ from the exact reference"
        );
        let mut worst = 0.0f32;
        for (step, top) in case["step_top_exact"]
            .as_array()
            .unwrap()
            .iter()
            .take(8)
            .enumerate()
        {
            for pair in top.as_array().unwrap() {
                let (id, logit) = (
                    pair[0].as_u64().unwrap() as usize,
                    pair[1].as_f64().unwrap() as f32,
                );
                worst = worst.max((tract_logits[step][id] - logit).abs());
            }
        }
        assert!(
            worst <= 1e-2,
            "tract's top logits differ from the exact reference by {worst}"
        );
        eprintln!("default model, first 8 steps: tract vs exact top-5 max |Δlogit| {worst:e}");
        if let Some(ort) = ort.as_mut() {
            let (_, ort_logits) = common::greedy_trace(ort, &prompt, 8);
            let vs_ort = (0..8)
                .map(|s| max_abs_diff(&ort_logits[s], &tract_logits[s]))
                .fold(0.0, f32::max);
            eprintln!("  vs ONNX Runtime accuracy_level 4 (all logits): {vs_ort:e}");
        }
    }
}

fn emberd(args: &[&str]) -> std::process::Output {
    emberd_command()
        .args(args)
        .env("ORT_DYLIB_PATH", ort_library())
        .env("EMBERD_LOG", "warn")
        .output()
        .expect("running emberd")
}

fn last_event(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.lines().last().expect("an event line")).expect("JSON event")
}

#[test]
fn auto_falls_back_to_tract_when_onnx_runtime_is_missing() {
    let model = tiny_dir("optimum");
    let out = emberd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ort-library",
        "/nonexistent/libonnxruntime.so",
        "--raw",
        "--json",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "hello",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("falling back to tract")
            && stderr.contains("/nonexistent/libonnxruntime.so"),
        "{stderr}"
    );
    let done = last_event(&out.stdout);
    assert_eq!(done["type"], "done");
    assert_eq!(done["timings"]["engine"], "tract/cpu");
    assert_eq!(done["usage"]["completion_tokens"], 4);
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn a_provider_the_library_lacks_is_skipped_with_a_warning_naming_it() {
    let model = tiny_dir("optimum");
    let out = emberd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--providers",
        "cuda,cpu",
        "--raw",
        "--json",
        "--max-tokens",
        "2",
        "hello",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("execution provider cuda skipped"),
        "{stderr}"
    );
    assert_eq!(last_event(&out.stdout)["timings"]["engine"], "ort/cpu");
}

/// ONNX Runtime's Linux library starts Microsoft's telemetry when its environment is
/// created (a device id and event queue under ~/.cache/Microsoft, a lookup of its collector)
/// unless ORT_DISABLE_TELEMETRY is set: emberd sets it itself, so a user's shell need not.
#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn onnx_runtime_telemetry_stays_off_without_the_users_help() {
    let home = tempfile::tempdir().unwrap();
    let out = emberd_command()
        .args(["generate", "--backend", "ort", "--raw", "--max-tokens", "2"])
        .arg("--model")
        .arg(tiny_dir("optimum"))
        .arg("--ort-library")
        .arg(ort_library())
        .arg("hello")
        .env_remove("ORT_DISABLE_TELEMETRY")
        .env("HOME", home.path())
        .env("EMBERD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Vec<_> = walk(home.path());
    assert!(
        written.is_empty(),
        "ONNX Runtime wrote into $HOME: {written:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

#[test]
fn forcing_onnx_runtime_with_a_bad_library_is_a_clear_error() {
    let model = tiny_dir("optimum");
    let out = emberd(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--backend",
        "ort",
        "--ort-library",
        "/nonexistent/libonnxruntime.so",
        "hello",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(
            "ONNX Runtime library could not be loaded from /nonexistent/libonnxruntime.so"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn info_reports_layout_engine_and_available_providers() {
    let out = emberd(&["info", "--model", tiny_dir("genai").to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["model"]["layout"], "genai");
    assert_eq!(info["engine"]["engine"], "ort");
    let providers = info["engine"]["available_providers"].as_array().unwrap();
    assert!(
        providers.iter().any(|p| p == "CPUExecutionProvider"),
        "{providers:?}"
    );
    assert_eq!(info["model"]["io"]["past_keys"][1], "past_key_values.1.key");
    // ONNX Runtime's own profile of the first step: the CPU provider ran every node, the
    // matrix products among them.
    let placement = info["engine"]["placement"].as_array().unwrap();
    assert_eq!(placement.len(), 1, "{placement:?}");
    assert_eq!(placement[0]["provider"], "CPUExecutionProvider");
    let by_op = placement[0]["op_types"].as_object().unwrap();
    let counted: u64 = by_op.values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(placement[0]["nodes"], counted, "{placement:?}");
    assert!(by_op.contains_key("MatMul"), "{placement:?}");
}

#[test]
fn bench_runs_on_both_engines_and_prints_the_figures() {
    let backends: &[&str] = if ORT_ON_TARGET {
        &["tract", "ort"]
    } else {
        &["tract"]
    };
    for &backend in backends {
        let out = emberd(&[
            "bench",
            "--model",
            tiny_dir("q4").to_str().unwrap(),
            "--backend",
            backend,
            "--prompt-tokens",
            "32",
            "--gen-tokens",
            "16",
            "--runs",
            "2",
            "--threads",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["engine"], backend);
        assert_eq!(report["prompt_tokens"], 32);
        for key in [
            "load_ms",
            "prefill_ms",
            "prefill_tokens_per_s",
            "ttft_ms",
            "decode_tokens_per_s",
            "peak_rss_mb",
            "rss_mb",
        ] {
            assert!(
                report[key].as_f64().unwrap() > 0.0,
                "{backend}: {key} = {}",
                report[key]
            );
        }
        assert!(
            report["rss_mb"].as_f64().unwrap() <= report["peak_rss_mb"].as_f64().unwrap(),
            "{backend}: resident now above the peak"
        );
        assert!(
            report["spread"]["decode_tokens_per_s"]["min"]
                .as_f64()
                .unwrap()
                <= report["decode_tokens_per_s"].as_f64().unwrap()
        );
    }
}

/// ONNX Runtime keeps the cache of a GroupQueryAttention graph (the 4-bit packages'
/// model.ort.onnx) in buffers that the graph appends to in place. They start at 256 positions
/// and grow by copying what they hold; truncating only shortens the mask. Neither may change
/// what the model computes: the logits after growing, and after truncating and running on,
/// match one prefill over the same ids.
#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn the_in_place_kv_cache_grows_and_truncates_without_changing_the_logits() {
    use emberd::engine::KvCache;
    let package = emberd::model::ModelPackage::load(&tiny_dir("q4")).unwrap();
    let options = emberd::config::ModelConfig {
        backend: Backend::Ort,
        ..Default::default()
    };
    let mut engine = emberd::engine::load(&package, &options).unwrap();
    assert!(engine.info().kv_in_place, "{:?}", engine.info());
    let ids: Vec<u32> = (0..300u32).map(|i| 3 + i * 37 % 380).collect();
    let prefill = |engine: &mut Box<dyn emberd::engine::Engine>, ids: &[u32]| {
        let (mut cache, mut logits) = (KvCache::new(), Vec::new());
        engine.forward(ids, &mut cache, &mut logits).unwrap();
        logits
    };
    // 250 positions, then single steps across the 256-position buffers' growth.
    let mut cache = KvCache::new();
    let mut logits = Vec::new();
    engine
        .forward(&ids[..250], &mut cache, &mut logits)
        .unwrap();
    let mut worst = 0.0f32;
    for end in 251..=300 {
        engine
            .forward(&ids[end - 1..end], &mut cache, &mut logits)
            .unwrap();
        if end % 10 == 0 {
            worst = worst.max(max_abs_diff(&logits, &prefill(&mut engine, &ids[..end])));
        }
    }
    // Back to 100 positions, then a chunk over what the buffers held before.
    engine.truncate(&mut cache, 100).unwrap();
    engine
        .forward(&ids[100..280], &mut cache, &mut logits)
        .unwrap();
    assert_eq!(cache.len(), 280);
    worst = worst.max(max_abs_diff(&logits, &prefill(&mut engine, &ids[..280])));
    eprintln!("in-place KV vs one prefill: max |Δlogit| {worst:e}");
    // Measured 1e-5 (float summation order); a misplaced position moves them by whole units.
    assert!(worst < 1e-3, "max |Δlogit| {worst}");
    let spread = logits.iter().cloned().fold(f32::MIN, f32::max)
        - logits.iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        spread > 1.0,
        "the logits carry information: spread {spread}"
    );
}

/// The one command for one's own model: `models/prepare.sh GGUF --out DIR` converts it, says
/// each stage, and ends with `emberd info`; the package serves what the generated one does.
#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "prepare.sh runs the host's target/release/emberd and .venv"
)]
fn prepare_turns_a_gguf_into_a_package_that_emberd_serves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    let run = std::process::Command::new("bash")
        .arg(repo().join("models/prepare.sh"))
        .arg(tiny_dir("kq-qwen2").join("source.gguf"))
        .args([
            "--out".as_ref(),
            out.as_os_str(),
            "--name".as_ref(),
            "mine".as_ref(),
        ])
        .env("ORT_DYLIB_PATH", ort_library())
        .output()
        .expect("running models/prepare.sh");
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "prepare.sh PATH failed:\n{said}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for stage in [
        "[bring] 1/3 source.gguf: GGUF, architecture qwen2",
        "[bring] 2/3 converting",
        "[bring] 3/3 emberd info",
        "\"family\": \"qwen2\"",
    ] {
        assert!(said.contains(stage), "no '{stage}' in:\n{said}");
    }
    let reference = read_json(tiny_dir("kq-qwen2").join("reference.json"));
    let case = &reference["cases"][0];
    let prompt = ids(&case["prompt_ids"]);
    let steps = ids(&case["greedy_ids"]).len();
    let (mine, _) = greedy_trace(&mut generator(out, serving_backend()), &prompt, steps);
    let mut generated = generator(tiny_dir("kq-qwen2"), serving_backend());
    let (want, _) = greedy_trace(&mut generated, &prompt, steps);
    assert_eq!(mine, want);
}
