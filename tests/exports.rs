//! Real exports of the default model, made by the official tools (models/real_exports.sh:
//! Optimum fp32, the same through ONNX Runtime's 4-bit quantizer and then its float16
//! converter (f16 cache and logits), and onnxruntime-genai's int4 builder): emberd serves each directory as it comes, and its greedy ids equal those of
//! the exporting tool's own runtime on the same directory (models/real-exports/references.json).

mod common;

use std::path::PathBuf;

use common::*;
use emberd::engine::Backend;
use emberd::model::{Layout, ModelPackage};
use emberd::protocol::{Message, Request};

const EXPORTS: [(&str, Layout); 4] = [
    ("optimum-fp32", Layout::Optimum),
    ("optimum-int4", Layout::Optimum),
    ("optimum-q4f16", Layout::Optimum),
    ("genai-int4", Layout::Genai),
];

fn exports() -> PathBuf {
    let link = repo().join("models/real-exports");
    // Resolved: ONNX Runtime checks that external data lies inside the model's directory.
    std::fs::canonicalize(&link).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run `bash models/real_exports.sh` (the test command does)",
            link.display()
        )
    })
}

/// Every file under `dir` with its size and modification time: emberd must leave an export as
/// it found it.
fn snapshot(dir: &std::path::Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(snapshot(&path));
        } else {
            let meta = path.metadata().unwrap();
            files.push((path, meta.len(), meta.modified().unwrap()));
        }
    }
    files.sort();
    files
}

#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
#[test]
fn each_real_export_is_served_as_it_comes_with_its_tools_greedy_ids() {
    let root = exports();
    let references = read_json(root.join("references.json"));
    let policy = emberd::config::Config::default().request_policy();
    for (name, layout) in EXPORTS {
        let dir = root.join(name);
        let before = snapshot(&dir);
        let package = ModelPackage::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(package.layout, layout, "{name}");
        let mut generator = generator(dir.clone(), Backend::Ort);
        let reference = &references["exports"][name];
        for case in reference["cases"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let request = Request {
                messages: Some(messages),
                ..Default::default()
            };
            let valid = request.validate(&policy, || "r".into()).unwrap();
            assert_eq!(
                generator.prompt_text(&valid.input).unwrap(),
                case["text"].as_str().unwrap(),
                "{name}: emberd's chat template renders differently from transformers'"
            );
            let prompt = generator.prompt_ids(&valid.input).unwrap();
            assert_eq!(prompt, ids(&case["prompt_ids"]), "{name}: prompt ids");
            let expected = ids(&case["greedy_ids"]);
            let (got, _) = greedy_trace(&mut generator, &prompt, expected.len());
            assert_eq!(
                got, expected,
                "{name}: emberd's greedy ids differ from {}'s on {:?}",
                reference["runtime"], case["text"]
            );
        }
        eprintln!(
            "{name}: {} prompts, greedy ids equal {}'s",
            reference["cases"].as_array().unwrap().len(),
            reference["runtime"]
        );
        drop(generator);
        assert_eq!(snapshot(&dir), before, "{name}: emberd changed the export");
    }
}

/// The daemon's own path, end to end: `emberd generate` on each export gives the tool's
/// greedy reply as text.
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
#[test]
fn emberd_generate_replies_with_the_tools_greedy_text() {
    let root = exports();
    let references = read_json(root.join("references.json"));
    for (name, _) in EXPORTS {
        // The first prompt is a lone user message, which is what `generate PROMPT` sends.
        let case = &references["exports"][name]["cases"][0];
        let prompt = case["messages"][0]["content"].as_str().unwrap();
        let expected = ids(&case["greedy_ids"]);
        let out = emberd_command()
            .args(["generate", "--json", "--backend", "ort", "--threads", "2"])
            .args([
                "--temperature",
                "0",
                "--max-tokens",
                &expected.len().to_string(),
            ])
            .arg("--model")
            .arg(root.join(name))
            .arg(prompt)
            .env("ORT_DYLIB_PATH", ort_library())
            .env("EMBERD_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let events: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let done = events.last().unwrap();
        assert_eq!(done["type"], "done", "{name}: {stdout}");
        let reply: String = events
            .iter()
            .filter(|e| e["type"] == "token")
            .map(|e| e["text"].as_str().unwrap())
            .collect();
        let expected_text = case["greedy_text"].as_str().expect("greedy_text");
        assert!(
            !expected_text.is_empty(),
            "{name}: an empty reference reply"
        );
        assert_eq!(
            reply, expected_text,
            "{name}: the reply differs from the tool's greedy text"
        );
    }
}

/// tract serves what it can run, with logits along ONNX Runtime's greedy path that agree
/// (the 4-bit graphs within the error of ONNX Runtime's int8 activations, accuracy_level 4),
/// and for what it cannot (the genai builder's GroupQueryAttention, an f16 cache) says what.
#[test]
fn tract_serves_the_optimum_exports_and_names_what_it_cannot_run() {
    let root = exports();
    let references = read_json(root.join("references.json"));
    for (name, tolerance, unsupported) in [
        ("optimum-fp32", 1e-2, None),
        ("optimum-int4", 2.5, None),
        ("optimum-q4f16", 0.0, Some("f16")),
        ("genai-int4", 0.0, Some("GroupQueryAttention")),
    ] {
        let package = ModelPackage::load(&root.join(name)).unwrap();
        let loaded = emberd::generate::Generator::load(package, &engine_options(Backend::Tract));
        let mut tract = match (loaded, unsupported) {
            (Ok(tract), None) => tract,
            (Err(e), Some(op)) => {
                let err = e.to_string();
                assert!(
                    err.contains(op),
                    "{name}: tract's error does not name {op}: {err}"
                );
                eprintln!("{name} on tract: {err}");
                continue;
            }
            (Ok(_), Some(op)) => panic!("{name}: tract now loads a graph with {op}: test it"),
            (Err(e), None) => panic!("{name} on tract: {e}"),
        };
        let case = &references["exports"][name]["cases"][0];
        let prompt = ids(&case["prompt_ids"]);
        let path = ids(&case["greedy_ids"]);
        let tract_logits = forced_trace(&mut tract, &prompt, &path);
        drop(tract);
        let picked = tract_logits
            .iter()
            .zip(&path)
            .filter(|(l, &id)| emberd::generate::sampler::argmax(l) == id)
            .count();
        eprintln!(
            "{name} on tract: argmax equals the tool's greedy id at {picked} of {} steps",
            path.len()
        );
        if !ORT_ON_TARGET {
            continue;
        }
        let mut ort = generator(root.join(name), Backend::Ort);
        let ort_logits = forced_trace(&mut ort, &prompt, &path);
        let worst = tract_logits
            .iter()
            .zip(&ort_logits)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0f32, f32::max);
        eprintln!("{name}: tract vs ONNX Runtime, max |Δlogit| {worst:e}");
        assert!(
            worst <= tolerance,
            "{name}: tract and ONNX Runtime differ by {worst} > {tolerance}"
        );
    }
}
