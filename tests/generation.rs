//! The generation core against real models and the real ONNX Runtime library.

mod common;

use common::*;
use emberd::engine::Backend;
use emberd::generate::prompt::Prompter;
use emberd::generate::sampler::Sampler;
use emberd::generate::RunControl;
use emberd::model::{Layout, ModelPackage};
use emberd::protocol::{
    ErrorCode, Event, FinishReason, Message, PromptInput, ResponseFormat, SamplingParams,
    ValidRequest,
};

fn collect(generator: &mut emberd::generate::Generator, req: &ValidRequest) -> Vec<Event> {
    let mut events = Vec::new();
    generator.run(req, &RunControl::new(), &mut |e| {
        events.push(e);
        true
    });
    events
}

/// ONNX Runtime's 4-bit kernels quantize activations to int8 (accuracy_level 4) the way
/// each CPU's kernels do: the references, recorded by onnxruntime on x86-64, hold to 1e-4
/// only there. Elsewhere (aarch64) emberd is held to the exact reference within the int8
/// activations' error, and the default model's ids to the first 32 tokens.
const X86_REFERENCE: bool = cfg!(target_arch = "x86_64");
const INT8_ACTIVATION_TOLERANCE: f32 = 2.5;

fn check_reference_logits(layout: &str, backend: Backend, tolerance: f32) -> f32 {
    let dir = tiny_dir(layout);
    let reference = read_json(dir.join("reference.json"));
    let mut generator = generator(dir, backend);
    let mut worst = 0.0f32;
    for case in reference["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        // Off x86-64 a converted (4-bit) package is held to its exact reference along the exact
        // greedy path: int8 activations may tip a close argmax there either way.
        let converted = case.get("step_logits_exact").is_some();
        let (logits, key, tolerance) = if converted && !X86_REFERENCE {
            let path = ids(&case["greedy_ids_exact"]);
            let logits = common::forced_trace(&mut generator, &prompt, &path);
            (logits, "step_logits_exact", INT8_ACTIVATION_TOLERANCE)
        } else {
            let expected = ids(&case["greedy_ids"]);
            let (got, logits) = common::greedy_trace(&mut generator, &prompt, expected.len());
            assert_eq!(got, expected, "{layout} on {backend:?}: greedy ids differ");
            (logits, "step_logits", tolerance)
        };
        for (step, want) in case[key].as_array().unwrap().iter().enumerate() {
            let want = floats(want);
            let diff = max_abs_diff(&logits[step], &want);
            assert!(
                diff <= tolerance,
                "{layout} on {backend:?} step {step}: max |Δlogit| {diff} > {tolerance}"
            );
            worst = worst.max(diff);
        }
    }
    worst
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn tiny_models_of_every_layout_match_their_reference_on_onnx_runtime() {
    for layout in TINY_LAYOUTS {
        let worst = check_reference_logits(layout, Backend::Ort, 1e-4);
        eprintln!("ort {layout}: max |Δlogit| {worst:e}");
    }
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn a_half_precision_export_serves_with_its_f16_cache_and_tract_says_why_it_cannot() {
    // A hub export's onnx/model_q4f16.onnx: f16 cache and logits. emberd keeps the cache in
    // f16 in place; the reference is onnxruntime (Python) growing it by concatenation.
    let dir = tiny_dir("q4f16");
    let package = ModelPackage::load(&dir).unwrap();
    assert_eq!(package.kv_elem, emberd::model::KvElem::F16);
    assert!(package.ort_file.ends_with("onnx/model_q4f16.onnx"));
    let reference = read_json(dir.join("reference.json"));
    let mut generator = generator(dir.clone(), Backend::Ort);
    assert!(generator.engine_info().kv_in_place);
    let mut worst = 0.0f32;
    for case in reference["cases"].as_array().unwrap() {
        let (prompt, path) = (ids(&case["prompt_ids"]), ids(&case["greedy_ids"]));
        // Other CPUs' f16 kernels round differently: there the reference's own path,
        // teacher-forced.
        let logits = if X86_REFERENCE {
            let (got, logits) = common::greedy_trace(&mut generator, &prompt, path.len());
            assert_eq!(got, path, "greedy ids on the f16 export differ");
            logits
        } else {
            common::forced_trace(&mut generator, &prompt, &path)
        };
        for (step, want) in case["step_logits"].as_array().unwrap().iter().enumerate() {
            let want = floats(want);
            worst = worst.max(max_abs_diff(&logits[step], &want));
        }
    }
    // aarch64's kernels compute in f16 itself where x86-64's convert to f32: 0.79 measured
    // under qemu, as far as this graph's f16 form is from its f32 one (0.84 on x86-64).
    let tolerance = if X86_REFERENCE { 1e-4 } else { 1.5 };
    assert!(worst <= tolerance, "f16 export: max |Δlogit| {worst}");
    eprintln!("ort q4f16: max |Δlogit| {worst:e}");

    let tract = emberd::generate::Generator::load(package, &engine_options(Backend::Tract));
    let err = tract.err().expect("tract refuses an f16 cache").to_string();
    assert!(
        err.contains("f16") && err.contains("model_q4f16.onnx"),
        "tract's refusal names neither the type nor the file: {err}"
    );
}

#[test]
fn layouts_are_detected_from_the_package() {
    let expect = [
        ("optimum", Layout::Optimum),
        ("optimum-merged", Layout::OptimumMerged),
        ("genai", Layout::Genai),
        ("q4", Layout::Optimum),
    ];
    for (dir, layout) in expect {
        let p = ModelPackage::load(&tiny_dir(dir)).unwrap();
        assert_eq!(p.layout, layout, "{dir}");
        assert_eq!(
            (p.layers, p.kv_heads, p.head_dim, p.vocab_size),
            (2, 2, 16, 384),
            "{dir}"
        );
    }
    let genai = ModelPackage::load(&tiny_dir("genai")).unwrap();
    assert!(
        genai.io.position_ids.is_none(),
        "the genai test model has no position_ids input"
    );
    assert_eq!(
        genai.eos_ids,
        vec![2, 0],
        "several eos ids come from genai_config.json"
    );
    let merged = ModelPackage::load(&tiny_dir("optimum-merged")).unwrap();
    assert_eq!(
        merged.io.use_cache_branch.as_deref(),
        Some("use_cache_branch")
    );
    let default = ModelPackage::load(&default_model_dir()).unwrap();
    assert_eq!(
        (
            default.layers,
            default.kv_heads,
            default.head_dim,
            default.vocab_size
        ),
        (30, 3, 64, 49152)
    );
    assert!(default.context_len >= 2048);
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn default_model_greedy_ids_equal_onnx_runtime_python() {
    let dir = default_model_dir();
    let reference = read_json(dir.join("reference.json"));
    let mut generator = generator(dir, Backend::Ort);
    let policy = emberd::config::Config::default().request_policy();
    for case in reference["prompts"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let system = case["system"].as_str().map(str::to_string);
        let mut req = emberd::protocol::Request {
            messages: Some(messages),
            system,
            ..Default::default()
        };
        req.max_tokens = Some(64);
        let valid = req.validate(&policy, || "r".into()).unwrap();
        let prompt = generator.prompt_ids(&valid.input).unwrap();
        assert_eq!(
            generator.prompt_text(&valid.input).unwrap(),
            case["text"].as_str().unwrap()
        );
        assert_eq!(
            prompt,
            ids(&case["prompt_ids"]),
            "prompt ids differ from Hugging Face tokenization"
        );
        let expected = ids(&case["greedy_ids"]);
        let n = expected.len().min(64);
        assert!(n >= 32, "the reference holds at least 32 tokens");
        if !X86_REFERENCE {
            greedy_ids_follow_the_exact_reference(&mut generator, &prompt, case);
            continue;
        }
        let (got, _) = common::greedy_trace(&mut generator, &prompt, n);
        assert_eq!(
            got[..n],
            expected[..n],
            "greedy ids differ for {:?}",
            case["text"]
        );
    }
}

/// Where ONNX Runtime's int8 activations differ from x86's (see X86_REFERENCE): the greedy ids
/// follow the exact reference until, at most, a near tie, where emberd's pick must be one of
/// the exact top 5 and within the int8 activations' error of the best.
fn greedy_ids_follow_the_exact_reference(
    generator: &mut emberd::generate::Generator,
    prompt: &[u32],
    case: &serde_json::Value,
) {
    let exact = ids(&case["greedy_ids_exact"]);
    let n = exact.len().min(32);
    let (got, _) = common::greedy_trace(generator, prompt, n);
    let Some(step) = (0..n).find(|&i| got[i] != exact[i]) else {
        return;
    };
    let top: Vec<(u32, f32)> = case["step_top_exact"][step]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
        .collect();
    let picked = top.iter().find(|(id, _)| *id == got[step]);
    let gap = picked.map(|(_, logit)| top[0].1 - logit);
    assert!(
        gap.is_some_and(|g| g <= INT8_ACTIVATION_TOLERANCE),
        "step {step}: emberd picked {} where the exact best is {:?} (gap {gap:?})",
        got[step],
        top[0]
    );
    eprintln!(
        "greedy ids equal the exact reference for {step} tokens, then a near tie (gap {:.2})",
        gap.unwrap_or_default()
    );
}

#[test]
fn streaming_pieces_add_up_to_the_done_text_and_stop_at_eos_or_length() {
    let mut generator = generator(default_model_dir(), serving_backend());
    let chat = PromptInput::Chat(vec![Message::new("user", "Name three colors.")]);
    let events = collect(&mut generator, &greedy_request(chat.clone(), 48));
    let streamed: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(!streamed.is_empty());
    let Some(Event::Done {
        finish_reason,
        usage,
        timings,
        seq,
        ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert!(matches!(
        finish_reason,
        FinishReason::Stop | FinishReason::Length
    ));
    assert!(
        usage.prompt_tokens > 10 && usage.completion_tokens > 0 && usage.completion_tokens <= 48
    );
    assert_eq!(*seq as usize, events.len() - 1, "seq numbers every event");
    assert!(timings.ttft_ms > 0.0 && timings.engine == serving_label());
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);

    // The same request without streaming: one done event with the same text. (From a cold
    // cache: a reused prefix runs the last prompt token alone, and ONNX Runtime's int8 4-bit
    // kernels round a one-row matmul differently from a many-row one.)
    generator.clear_cache();
    let mut whole = greedy_request(chat, 48);
    whole.stream = false;
    let events = collect(&mut generator, &whole);
    assert_eq!(events.len(), 1);
    let Event::Done { text, .. } = &events[0] else {
        panic!()
    };
    assert_eq!(text.as_deref(), Some(streamed.as_str()));
}

#[test]
fn a_stop_sequence_ends_generation_and_is_not_emitted() {
    let mut generator = generator(default_model_dir(), serving_backend());
    let chat = PromptInput::Chat(vec![Message::new(
        "user",
        "Tell me about Paris, the capital of France.",
    )]);
    // The greedy reply starts "Bonjour, I'm delighted..."; stop on a string inside it.
    let mut req = greedy_request(chat, 64);
    req.stop = vec!["delighted".into()];
    req.stream = false;
    let events = collect(&mut generator, &req);
    let Some(Event::Done {
        text,
        finish_reason,
        ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert_eq!(*finish_reason, FinishReason::StopSequence);
    assert_eq!(text.as_deref(), Some("Bonjour, I'm "));
}

#[test]
fn same_seed_gives_the_same_text_and_max_tokens_is_respected() {
    let mut generator = generator(tiny_dir("optimum"), serving_backend());
    let mut req = greedy_request(PromptInput::Raw("hello world".into()), 20);
    req.sampling = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.0,
        repetition_penalty: 1.1,
        seed: Some(7),
    };
    req.ignore_eos = true;
    req.stream = false;
    let first = collect(&mut generator, &req);
    let second = collect(&mut generator, &req);
    let text = |e: &[Event]| match e.last() {
        Some(Event::Done { text, usage, .. }) => (text.clone(), usage.completion_tokens),
        other => panic!("{other:?}"),
    };
    assert_eq!(text(&first), text(&second));
    assert_eq!(text(&first).1, 20);
}

#[test]
fn a_prompt_longer_than_the_context_is_too_long_not_a_panic() {
    let mut generator = generator(tiny_dir("optimum"), serving_backend());
    let long = "lorem ipsum dolor sit amet ".repeat(200);
    let events = collect(&mut generator, &greedy_request(PromptInput::Raw(long), 4));
    match &events[..] {
        [Event::Error {
            code: ErrorCode::TooLong,
            message,
            ..
        }] => assert!(message.contains("512"), "{message}"),
        other => panic!("{other:?}"),
    }
    // The generator still serves afterwards.
    let events = collect(
        &mut generator,
        &greedy_request(PromptInput::Raw("hi".into()), 2),
    );
    assert!(matches!(events.last(), Some(Event::Done { .. })));
}

#[test]
fn cancellation_between_steps_ends_with_done_cancelled() {
    let mut generator = generator(tiny_dir("optimum"), serving_backend());
    let mut req = greedy_request(PromptInput::Raw("hi".into()), 400);
    req.ignore_eos = true;
    let control = RunControl::new();
    let mut events = Vec::new();
    generator.run(&req, &control, &mut |e| {
        if matches!(e, Event::Token { seq: 2, .. }) {
            control.cancel.cancel();
        }
        events.push(e);
        true
    });
    let Some(Event::Done {
        finish_reason,
        usage,
        ..
    }) = events.last()
    else {
        panic!()
    };
    assert_eq!(*finish_reason, FinishReason::Cancelled);
    assert!(
        usage.completion_tokens < 10,
        "stopped within a step: {usage:?}"
    );
}

#[test]
fn bad_model_directories_get_errors_that_name_the_problem() {
    let missing = ModelPackage::load(std::path::Path::new("/nonexistent/model")).unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/model"),
        "{missing}"
    );

    let dir = tempfile::tempdir().unwrap();
    let src = tiny_dir("optimum");
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "emberd.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("model.onnx"),
        b"this is not an onnx file at all",
    )
    .unwrap();
    let corrupt = ModelPackage::load(dir.path()).unwrap_err();
    assert!(corrupt.to_string().contains("model.onnx"), "{corrupt}");

    std::fs::copy(src.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let no_tokenizer = ModelPackage::load(dir.path()).unwrap_err();
    assert!(
        no_tokenizer.to_string().contains("tokenizer.json"),
        "{no_tokenizer}"
    );

    std::fs::write(
        dir.path().join("emberd.json"),
        r#"{"format":1,"files":{"ort":"gone.onnx"}}"#,
    )
    .unwrap();
    let dangling = ModelPackage::load(dir.path()).unwrap_err();
    assert!(dangling.to_string().contains("gone.onnx"), "{dangling}");
}

#[test]
fn the_chat_template_renders_like_hugging_face() {
    let fixtures = read_json(repo().join("tests/fixtures/templates.json"));
    let generator = generator(default_model_dir(), serving_backend());
    let cases = fixtures["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = generator.prompter().render(&messages, None, add).unwrap();
        assert_eq!(rendered, case["expected"].as_str().unwrap(), "{messages:?}");
    }
}

#[test]
fn a_shared_prompt_prefix_is_served_from_the_cache_with_the_same_result() {
    let system = Message::new(
        "system",
        "You are a sensor gateway assistant. Answer briefly.",
    );
    let ask = |q: &str| {
        let mut r = greedy_request(
            PromptInput::Chat(vec![system.clone(), Message::new("user", q)]),
            16,
        );
        r.ignore_eos = true;
        r.stream = false;
        r
    };
    let done = |events: Vec<Event>| match events.into_iter().last() {
        Some(Event::Done { text, usage, .. }) => (text.unwrap(), usage),
        other => panic!("{other:?}"),
    };
    let ort_layouts: &[&str] = if ORT_ON_TARGET {
        &["optimum", "q4"]
    } else {
        &[]
    };
    for layout in ort_layouts {
        let mut warm = generator(tiny_dir(layout), Backend::Ort);
        let (_, first) = done(collect(&mut warm, &ask("What is the temperature?")));
        assert_eq!(first.cached_prompt_tokens, 0);
        let (warm_text, second) = done(collect(&mut warm, &ask("Is the pump running?")));
        assert!(
            second.cached_prompt_tokens >= 10,
            "{layout}: the system prompt is reused: {second:?}"
        );
        let mut cold = generator(tiny_dir(layout), Backend::Ort);
        let (cold_text, _) = done(collect(&mut cold, &ask("Is the pump running?")));
        assert_eq!(
            warm_text, cold_text,
            "{layout}: reusing the prefix changes nothing"
        );
    }
    // tract too.
    let mut warm = generator(tiny_dir("optimum"), Backend::Tract);
    done(collect(&mut warm, &ask("What is the temperature?")));
    let (warm_text, second) = done(collect(&mut warm, &ask("Is the pump running?")));
    assert!(second.cached_prompt_tokens >= 10);
    let mut cold = generator(tiny_dir("optimum"), Backend::Tract);
    assert_eq!(
        warm_text,
        done(collect(&mut cold, &ask("Is the pump running?"))).0
    );
}

fn sampling(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        ..SamplingParams::greedy()
    }
}

#[test]
fn a_token_the_mask_forbids_is_never_drawn_and_eos_waits_for_the_grammar() {
    // The grammar and the sampler alone: no engine runs.
    let package = ModelPackage::load(&tiny_dir("optimum")).unwrap();
    let prompter = Prompter::load(&package).unwrap();
    let tokenizer = prompter.tokenizer();
    let vocab = package.vocab_size;
    let eos_ids = package.eos_ids.clone();
    let format = ResponseFormat::Regex {
        regex: "abc".into(),
    };
    let mut constraint = prompter.constraint(&format).unwrap().unwrap();
    let mask = constraint.mask().unwrap();
    assert!(!mask.allows_eos(), "EOS before the grammar is complete");
    let allowed: Vec<u32> = (0..vocab as u32).filter(|&t| mask.allows(t)).collect();
    assert!(!allowed.is_empty());
    for &t in &allowed {
        let bytes = tokenizer.token_bytes(t).unwrap();
        assert!(
            !bytes.is_empty() && b"abc".starts_with(&bytes),
            "token {t} ({bytes:?}) cannot start \"abc\""
        );
    }
    let forbidden = (0..vocab as u32)
        .find(|&t| !mask.allows(t) && !eos_ids.contains(&t))
        .unwrap();
    // The largest logits on a forbidden token and on EOS: neither is ever drawn, greedy or
    // at temperature 1, where without the mask they would win nearly every draw.
    for seed in 0..200 {
        for temperature in [0.0, 1.0] {
            let mut logits = vec![0.0f32; vocab];
            logits[forbidden as usize] = 50.0;
            logits[eos_ids[0] as usize] = 40.0;
            let token =
                Sampler::new(sampling(temperature, seed)).sample(&mut logits, &[], Some(&mask));
            assert!(mask.allows(token), "seed {seed}: drew {token}");
        }
    }
    // Once the text is complete, EOS and nothing else.
    for t in tokenizer.encode("abc").unwrap() {
        constraint.commit(t).unwrap();
    }
    assert!(constraint.is_finished());
    let mask = constraint.mask().unwrap();
    let allowed: Vec<u32> = (0..vocab as u32).filter(|&t| mask.allows(t)).collect();
    assert!(mask.allows_eos());
    assert!(allowed.iter().all(|t| eos_ids.contains(t)), "{allowed:?}");
}

#[test]
fn constrained_generation_on_a_tiny_model_follows_the_grammar_and_ends_by_it() {
    let mut generator = generator(tiny_dir("optimum"), serving_backend());
    let mut free = greedy_request(PromptInput::Raw("hello world".into()), 8);
    free.stream = false;
    let mut held = free.clone();
    held.response_format = ResponseFormat::Regex {
        regex: "[a-d]{3,5}".into(),
    };
    let text = |events: &[Event]| match events.last() {
        Some(Event::Done {
            text,
            finish_reason,
            ..
        }) => (text.clone().unwrap(), *finish_reason),
        other => panic!("{other:?}"),
    };
    let (unconstrained, _) = text(&collect(&mut generator, &free));
    eprintln!("unconstrained: {unconstrained:?}");
    for seed in 0..20 {
        held.sampling = sampling(1.0, seed);
        let (out, finish) = text(&collect(&mut generator, &held));
        assert!(
            (3..=5).contains(&out.len()) && out.bytes().all(|b| (b'a'..=b'd').contains(&b)),
            "seed {seed}: {out:?}"
        );
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {out:?}");
    }
    // The tiny model's own text is not of that shape: the mask did the work.
    assert!(!unconstrained.bytes().all(|b| (b'a'..=b'd').contains(&b)));
}

#[test]
fn the_default_tokenizer_is_byte_level_and_its_token_bytes_agree_with_decoding() {
    let package = ModelPackage::load(&default_model_dir()).unwrap();
    let prompter = Prompter::load(&package).unwrap();
    let tokenizer = prompter.tokenizer();
    assert_eq!(tokenizer.decoder_type(), "ByteLevel");
    let mut checked = 0;
    for id in 0..package.vocab_size as u32 {
        let bytes = tokenizer.token_bytes(id).unwrap();
        // Special tokens carry llguidance's marker byte; ordinary ones their own bytes.
        if bytes.first() == Some(&0xFF) {
            continue;
        }
        if let Ok(text) = std::str::from_utf8(&bytes) {
            assert_eq!(tokenizer.decode(&[id], false).unwrap(), text, "token {id}");
            checked += 1;
        }
    }
    assert!(checked > 40_000, "only {checked} tokens checked");
}
