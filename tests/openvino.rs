//! ONNX Runtime's OpenVINO build (vendor/onnxruntime-openvino, which the test command installs
//! on x86-64 Linux) serving the default model: where its nodes ran, the same greedy answers as
//! the CPU provider, the provider named in `done` events and the MQTT status, and the fallback
//! when OpenVINO cannot start. Its own test binary: a process loads one ONNX Runtime library.

mod common;

use std::path::PathBuf;

use common::daemon::*;
use common::*;
use emberd::config::{ModelConfig, OptionValue};
use emberd::engine::Backend;
use emberd::generate::Generator;
use emberd::model::ModelPackage;
use serde_json::json;

const OPENVINO: &str = "OpenVINOExecutionProvider";

/// The OpenVINO build, or None (and why, on stderr) where Intel publishes none.
fn openvino_library() -> Option<PathBuf> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        eprintln!("skipped: the onnxruntime-openvino wheel exists for x86-64 Linux only");
        return None;
    }
    let path = repo().join("vendor/onnxruntime-openvino/lib/libonnxruntime.so");
    assert!(
        path.exists(),
        "{} is missing: run `EMBERD_OPENVINO=1 bash models/prepare.sh` (the test command does)",
        path.display()
    );
    Some(path)
}

fn options(library: PathBuf, providers: &[&str], backend: Backend) -> ModelConfig {
    ModelConfig {
        backend,
        providers: providers.iter().map(|p| p.to_string()).collect(),
        ort_library: Some(library),
        threads: 2,
        ..ModelConfig::default()
    }
}

fn load(options: &ModelConfig) -> Generator {
    let package = ModelPackage::load(&default_model_dir()).unwrap();
    Generator::load(package, options).unwrap_or_else(|e| panic!("{:?}: {e}", options.providers))
}

/// `emberd info` with a config naming the OpenVINO build; its JSON, and its stderr.
fn emberd_info(
    library: &std::path::Path,
    extra: &str,
    backend: &str,
) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("emberd.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = {:?}\nort_library = {:?}\nbackend = {backend:?}\nthreads = 2\n{extra}",
            default_model_dir(),
            library
        ),
    )
    .unwrap();
    let out = emberd_command()
        .args(["info", "--config"])
        .arg(&config)
        .env("EMBERD_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return (serde_json::Value::Null, stderr);
    }
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn emberd_info_shows_openvino_running_the_whole_plain_graph() {
    let Some(library) = openvino_library() else {
        return;
    };
    let (info, stderr) = emberd_info(&library, "providers = [\"openvino\", \"cpu\"]\n", "auto");
    let engine = &info["engine"];
    assert_eq!(engine["provider"], "openvino", "{stderr}");
    assert_eq!(engine["fallback_reason"], serde_json::Value::Null);
    assert!(
        engine["available_providers"]
            .as_array()
            .unwrap()
            .contains(&json!(OPENVINO)),
        "{engine}"
    );
    // The fused graph's GroupQueryAttention is a CPU kernel to OpenVINO: it gets the plain one.
    assert!(
        engine["model_file"]
            .as_str()
            .unwrap()
            .ends_with("/model.onnx"),
        "{engine}"
    );
    let placement = engine["placement"].as_array().unwrap();
    assert_eq!(
        placement.len(),
        1,
        "OpenVINO should take every node; the CPU ran some as fallback: {placement:#?}"
    );
    let openvino = &placement[0];
    assert_eq!(openvino["provider"], OPENVINO);
    assert!(openvino["nodes"].as_u64().unwrap() >= 1);
    let inside = &openvino["subgraph_op_types"];
    assert!(
        inside["MatMulNBits"].as_u64().unwrap() > 0 && inside["Softmax"].as_u64().unwrap() > 0,
        "{openvino}"
    );
    assert!(
        stderr.contains("OpenVINOExecutionProvider took the whole graph"),
        "{stderr}"
    );
}

#[test]
fn a_device_openvino_cannot_open_gives_way_to_the_cpu_with_onnx_runtimes_reason() {
    let Some(library) = openvino_library() else {
        return;
    };
    // No NPU on a build machine; a key OpenVINO does not know.
    for (options, reason) in [
        ("device_type = \"NPU\"", "Device NPU is not available"),
        ("no_such_option = \"1\"", "no_such_option"),
    ] {
        let extra = format!(
            "providers = [\"openvino\", \"cpu\"]\n[model.provider_options.openvino]\n{options}\n"
        );
        let (info, stderr) = emberd_info(&library, &extra, "auto");
        let engine = &info["engine"];
        assert_eq!(engine["provider"], "cpu", "{stderr}");
        let why = engine["fallback_reason"].as_str().unwrap_or_default();
        assert!(
            why.contains("execution provider openvino could not start") && why.contains(reason),
            "{why}"
        );
        assert!(
            stderr.contains(reason) && stderr.contains("trying cpu"),
            "{stderr}"
        );
        assert_eq!(engine["placement"][0]["provider"], "CPUExecutionProvider");
        assert_eq!(
            engine["kv_in_place"], true,
            "the CPU gets its fused graph back"
        );

        // Forced onto ONNX Runtime with that list, there is no next provider: a clear error.
        let (info, stderr) = emberd_info(&library, &extra, "ort");
        assert!(info.is_null());
        assert!(
            stderr.contains("execution provider openvino could not start")
                && stderr.contains(reason),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// The CPU provider's 4-bit kernels quantize activations to int8 (accuracy level 4); OpenVINO
/// computes its own way. Where the greedy ids part, both picks must be a near tie on both sides:
/// each within this of the other's best logit (the same bound the exact reference allows the
/// int8 activations; see tests/generation.rs).
const NEAR_TIE: f32 = 2.5;

#[test]
fn greedy_ids_on_openvino_equal_the_cpu_providers_or_part_at_a_near_tie() {
    let Some(library) = openvino_library() else {
        return;
    };
    let mut openvino = load(&options(
        library.clone(),
        &["openvino", "cpu"],
        Backend::Ort,
    ));
    assert_eq!(openvino.engine_info().provider, "openvino");
    let mut cpu = load(&options(library, &["cpu"], Backend::Ort));
    let reference = read_json(default_model_dir().join("reference.json"));
    for case in reference["prompts"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let n = 32;
        let (ov_ids, ov_logits) = common::greedy_trace(&mut openvino, &prompt, n);
        let (cpu_ids, cpu_logits) = common::greedy_trace(&mut cpu, &prompt, n);
        let same = (0..n).take_while(|&i| ov_ids[i] == cpu_ids[i]).count();
        // Over the steps both made with the same context.
        let shared = same.min(n - 1) + 1;
        let worst = (0..shared)
            .map(|s| max_abs_diff(&ov_logits[s], &cpu_logits[s]))
            .fold(0.0f32, f32::max);
        let text = &case["messages"][0]["content"];
        if same == n {
            eprintln!("{text}: {n} ids equal; max |Δlogit| {worst:.3}");
            continue;
        }
        let (o, c) = (ov_ids[same] as usize, cpu_ids[same] as usize);
        let gap_cpu = cpu_logits[same][c] - cpu_logits[same][o];
        let gap_ov = ov_logits[same][o] - ov_logits[same][c];
        eprintln!(
            "{text}: ids equal for {same} tokens, then OpenVINO {o} vs CPU {c}: gap {gap_cpu:.3} \
             in the CPU's logits, {gap_ov:.3} in OpenVINO's; max |Δlogit| before {worst:.3}"
        );
        assert!(
            gap_cpu <= NEAR_TIE && gap_ov <= NEAR_TIE,
            "{text}: at step {same} OpenVINO picked {o}, the CPU {c}: not a near tie \
             (gaps {gap_cpu} and {gap_ov}, bound {NEAR_TIE})"
        );
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_done_event_and_the_mqtt_status_name_openvino() {
    let Some(library) = openvino_library() else {
        return;
    };
    let mut options = options(library, &["openvino", "cpu"], Backend::Auto);
    // Options reach OpenVINO: its CPU device, named.
    options.provider_options.insert(
        "openvino".into(),
        [("device_type".to_string(), OptionValue::String("CPU".into()))].into(),
    );
    let generator = tokio::task::spawn_blocking(move || load(&options))
        .await
        .unwrap();
    let broker = Broker::start();
    let port = broker.port;
    let daemon = Daemon::serving(generator, |c| on_broker(c, port, "ov1")).await;
    let (_client, mut rx) = mqtt_client(port, "ov1-watcher", &["emberd/ov1/status"]).await;
    let status = wait_on(&mut rx, "emberd/ov1/status", |v| v["state"] == "online").await;
    assert_eq!(status["engine"], "ort");
    assert_eq!(status["provider"], "openvino");

    let mut client = daemon.connect().await;
    client
        .send(json!({"id": "ov", "prompt": "Name a colour.", "max_tokens": 8, "temperature": 0}))
        .await;
    let events = client.until_end("ov").await;
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done", "{events:?}");
    assert_eq!(done["timings"]["engine"], "ort/openvino");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    daemon.stop().await;
}
