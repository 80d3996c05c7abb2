//! Continuous batching: requests of different lengths joining the batch at different steps,
//! one cancelled half-way, each get the greedy ids of their own run alone (a generator that
//! serves one request at a time); the KV budget makes a request wait instead of failing; an
//! engine that cannot batch serves one at a time and says so.

mod common;

use std::collections::HashMap;

use common::*;
use emberd::engine::Backend;
use emberd::generate::{Admission, Generator, RunControl};
use emberd::model::ModelPackage;
use emberd::protocol::{Event, PromptInput, ValidRequest};

/// A greedy request for exactly `prompt` that runs its full length, whatever the model says.
fn greedy(prompt: Vec<u32>, max_tokens: u32) -> ValidRequest {
    let mut request = greedy_request(PromptInput::Tokens(prompt.clone()), max_tokens);
    request.id = format!("p{}", prompt.len());
    request.ignore_eos = true;
    request.prompt_ids = Some(prompt);
    request
}

/// A prompt of `len` ids from the vocabulary's ordinary range, different for every length.
fn prompt_of(len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (100 + (i * 7919 + len * 104_729) % (vocab - 200)) as u32)
        .collect()
}

struct Plan {
    prompt: Vec<u32>,
    max_tokens: u32,
    /// The round (`advance` call) at which it is submitted.
    join_at: usize,
    /// Cancelled once it has streamed this many tokens.
    cancel_after: Option<usize>,
}

/// What each plan's request generated in the batch, and the most requests that ran at once.
fn run_batched(generator: &mut Generator, plans: &[Plan]) -> (Vec<Vec<u32>>, usize) {
    let controls: Vec<RunControl> = plans.iter().map(|_| RunControl::new()).collect();
    let mut streamed = vec![0usize; plans.len()];
    let mut ends: HashMap<u64, Event> = HashMap::new();
    let mut outputs: Vec<Option<Vec<u32>>> = vec![None; plans.len()];
    let mut admitted = vec![false; plans.len()];
    let (mut round, mut most) = (0, 0);
    let mut record = |key: u64, event: Event| {
        let i = key as usize;
        match event {
            Event::Token { .. } => {
                streamed[i] += 1;
                if plans[i].cancel_after.is_some_and(|n| streamed[i] >= n) {
                    controls[i].cancel.cancel();
                }
            }
            end => {
                assert!(ends.insert(key, end).is_none(), "request {i} ended twice");
            }
        }
        true
    };
    while admitted.iter().any(|a| !a) || generator.running() > 0 {
        // Arrival order: a plan waits for those before it.
        for (i, plan) in plans.iter().enumerate() {
            if admitted[i] {
                continue;
            }
            let request = greedy(plan.prompt.clone(), plan.max_tokens);
            if plan.join_at > round || !generator.can_admit(&request) {
                break;
            }
            admitted[i] = true;
            let control = controls[i].clone();
            if let Admission::Ended(_) = generator.admit(i as u64, request, control, &mut record) {
                panic!("request {i} was refused");
            }
        }
        most = most.max(generator.running());
        for (key, stats) in generator.advance(&mut record) {
            outputs[key as usize] = Some(stats.output_ids);
        }
        round += 1;
        assert!(round < 100_000, "the batch does not finish");
    }
    for (i, plan) in plans.iter().enumerate() {
        match &ends[&(i as u64)] {
            Event::Done { finish_reason, .. } => {
                let expected = if plan.cancel_after.is_some() {
                    "cancelled"
                } else {
                    "length"
                };
                assert_eq!(finish_reason.as_str(), expected, "request {i}");
            }
            other => panic!("request {i} ended with {other:?}"),
        }
    }
    let outputs = outputs.into_iter().map(Option::unwrap).collect();
    (outputs, most)
}

/// Each plan's ids, run alone on `alone` (one request at a time) from an empty cache.
fn run_alone(alone: &mut Generator, plans: &[Plan]) -> Vec<Vec<u32>> {
    plans
        .iter()
        .map(|plan| {
            alone.clear_cache();
            let stats = alone.run(
                &greedy(plan.prompt.clone(), plan.max_tokens),
                &RunControl::new(),
                &mut |_| true,
            );
            stats.output_ids
        })
        .collect()
}

/// Prompts of 5, 37, 120 and 300 tokens joining at rounds 0, 2, 9 and 20 (the 300-token one
/// prefills in two chunks between decode steps); the 37-token one is cancelled half-way.
fn plans(vocab: usize, max_tokens: u32) -> Vec<Plan> {
    [
        (5, 0, None),
        (37, 2, Some(max_tokens as usize / 2)),
        (120, 9, None),
        (300, 20, None),
    ]
    .into_iter()
    .map(|(len, join_at, cancel_after)| Plan {
        prompt: prompt_of(len, vocab),
        max_tokens,
        join_at,
        cancel_after,
    })
    .collect()
}

fn load(package: ModelPackage, max_batch: usize) -> Generator {
    let mut generator = Generator::load(package, &engine_options(serving_backend()))
        .unwrap_or_else(|e| panic!("{e}"));
    generator.set_prefill_chunk(256);
    generator.set_batch(max_batch, 256);
    generator
}

/// Where the batched ids part from the ids alone, the batched pick must be a near tie in the
/// logits of the run alone at that step (same context): within `tolerance` of its best.
fn assert_equal_or_near_tie(
    alone: &mut Generator,
    plans: &[Plan],
    batched: &[Vec<u32>],
    solo: &[Vec<u32>],
    tolerance: f32,
) {
    for (i, plan) in plans.iter().enumerate() {
        let n = batched[i].len().min(solo[i].len());
        if plan.cancel_after.is_none() {
            assert_eq!(batched[i].len(), plan.max_tokens as usize, "request {i}");
        }
        let same = (0..n).take_while(|&s| batched[i][s] == solo[i][s]).count();
        if same == n {
            eprintln!("prompt of {}: {n} ids equal", plan.prompt.len());
            continue;
        }
        assert!(
            tolerance > 0.0,
            "prompt of {}: ids part at step {same} of {n}: {:?} vs alone {:?}",
            plan.prompt.len(),
            &batched[i][same..],
            &solo[i][same..]
        );
        let mut context = plan.prompt.clone();
        context.extend_from_slice(&solo[i][..same]);
        let logits = alone.forward(&context, true).unwrap().to_vec();
        let (b, a) = (batched[i][same] as usize, solo[i][same] as usize);
        let gap = logits[a] - logits[b];
        eprintln!(
            "prompt of {}: ids equal for {same} of {n}, then batched {b} vs alone {a} (gap {gap:.3})",
            plan.prompt.len()
        );
        assert!(
            gap <= tolerance,
            "prompt of {}: at step {same} the batch picked {b}, alone {a}: not a near tie (gap {gap}, bound {tolerance})",
            plan.prompt.len()
        );
    }
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn batched_requests_equal_their_runs_alone_on_the_exact_default_graph() {
    // The shipped graph with f32 activations (models/prepare.sh writes it beside the shipped
    // one): each row's arithmetic is the same alone or in a batch.
    let mut package = ModelPackage::load(&default_model_dir()).unwrap();
    package.ort_file = default_model_dir().join("model.exact.onnx");
    let vocab = package.vocab_size;
    let mut batch = load(package.clone(), 4);
    assert_eq!(batch.max_batch(), 4);
    let plans = plans(vocab, 24);
    let (batched, most) = run_batched(&mut batch, &plans);
    assert!(most >= 3, "at most {most} requests ran at once");
    let mut alone = load(package, 1);
    let solo = run_alone(&mut alone, &plans);
    assert_equal_or_near_tie(&mut alone, &plans, &batched, &solo, 0.0);
}

/// The shipped graph quantizes activations to int8 per row; a batch runs its rows through
/// the multi-row kernels, which may round a tie the other way.
const NEAR_TIE: f32 = 0.5;

/// The plans batched on `package`, against each alone.
fn batched_against_alone(package: ModelPackage, max_tokens: u32, tolerance: f32) {
    let vocab = package.vocab_size;
    let mut batch = load(package.clone(), 4);
    let plans = plans(vocab, max_tokens);
    let (batched, _) = run_batched(&mut batch, &plans);
    let mut alone = load(package, 1);
    let solo = run_alone(&mut alone, &plans);
    assert_equal_or_near_tie(&mut alone, &plans, &batched, &solo, tolerance);
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn batched_requests_on_the_shipped_graph_part_from_their_runs_alone_only_at_near_ties() {
    batched_against_alone(
        ModelPackage::load(&default_model_dir()).unwrap(),
        24,
        NEAR_TIE,
    );
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn batched_requests_equal_their_runs_alone_on_the_tiny_model() {
    // Held to equality: each row is quantized on its own, and the tiny model's logits are far
    // from ties (a failure prints where the ids part).
    batched_against_alone(ModelPackage::load(&tiny_dir("q4")).unwrap(), 40, 0.0);
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn batched_requests_on_an_f16_cache_part_from_their_runs_alone_only_at_near_ties() {
    // The f16 export's slot rows are f16 buffers; f16 logits tie more often than f32 ones
    // (their spacing near 4 is 0.004), and a batch may round such a tie the other way.
    let package = ModelPackage::load(&tiny_dir("q4f16")).unwrap();
    assert_eq!(package.kv_elem, emberd::model::KvElem::F16);
    batched_against_alone(package, 40, 0.01);
}

#[test]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
fn a_request_over_the_kv_budget_waits_for_room() {
    let package = ModelPackage::load(&default_model_dir()).unwrap();
    let per_position = package.layers * 2 * package.kv_heads * package.head_dim * 4;
    let vocab = package.vocab_size;
    let mut generator = load(package, 4);
    // Room for two rows of 256 positions, not three.
    let mb = (2 * 256 * per_position).div_ceil(1 << 20);
    generator.set_batch(4, mb);
    let plans: Vec<Plan> = (0..4)
        .map(|i| Plan {
            prompt: prompt_of(10 + i, vocab),
            max_tokens: 16,
            join_at: 0,
            cancel_after: None,
        })
        .collect();
    let (outputs, most) = run_batched(&mut generator, &plans);
    assert_eq!(most, 2, "the budget ({mb} MiB) holds two rows");
    assert!(outputs.iter().all(|o| o.len() == 16));
}

#[test]
fn an_engine_that_cannot_batch_serves_one_request_at_a_time() {
    // The plain graph returns a grown copy of the cache: no shared rows to batch in.
    let dir = tiny_dir("optimum");
    let mut generator = Generator::load(
        ModelPackage::load(&dir).unwrap(),
        &engine_options(Backend::Tract),
    )
    .unwrap();
    generator.set_batch(4, 256);
    assert_eq!(generator.max_batch(), 1);
    let vocab = generator.package().vocab_size;
    let plans = plans(vocab, 8);
    let (outputs, most) = run_batched(&mut generator, &plans);
    assert_eq!(most, 1);
    assert!(outputs.iter().all(|o| !o.is_empty()));
    let out = emberd_command()
        .args(["info", "--backend", "tract", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["batch"]["max_batch"], 1, "{info}");
    assert_eq!(info["batch"]["engine_batches"], false);
}

/// A small deterministic generator for the stress test's choices (xorshift).
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// 200 requests from 20 clients at once, random prompt and output lengths; some cancelled
/// after their first token, some abandoned by a client that hangs up. Every request a client
/// waits for ends with exactly one terminal event, every accepted one is served, and
/// afterwards nothing runs and the daemon's memory is what it was after a warm-up at full
/// batch. The daemon is the built binary, so its memory is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    target_arch = "arm",
    ignore = "ONNX Runtime ships no 32-bit ARM library"
)]
async fn a_stress_of_many_clients_leaves_no_slot_or_memory_behind() {
    use common::daemon::*;
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let config = write_serve_config(
        dir.path(),
        &format!(
            "[limits]\nmax_batch = 4\nmax_queue = 32\n[http]\nenabled = true\nlisten = \"127.0.0.1:{http}\"\n"
        ),
    );
    let mut daemon = tokio::task::spawn_blocking(move || spawn_ready(&config))
        .await
        .unwrap();
    let socket = dir.path().join("emberd.sock");
    assert_eq!(http_status(http).await["max_batch"], 4);
    let idle = |s: &serde_json::Value| s["queue_depth"] == 0 && s["running"] == 0;
    let wait_idle = || async {
        let deadline = tokio::time::Instant::now() + patience();
        loop {
            let s = http_status(http).await;
            if idle(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "never idle: {s}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    // Warm-up at full batch: the slot buffers reach the size the stress needs.
    let mut warm = Client::connect(&socket).await;
    for i in 0..8 {
        let prompt = "sensor ".repeat(20 + i);
        warm.send(
            json!({"id": format!("w{i}"), "prompt": prompt, "max_tokens": 48, "ignore_eos": true}),
        )
        .await;
    }
    // They end in any order: read until all eight have.
    let mut open = 8;
    while open > 0 {
        if warm.event().await["type"] != "token" {
            open -= 1;
        }
    }
    wait_idle().await;
    let idle_rss = rss_mib(daemon.id());

    let mut clients = Vec::new();
    for c in 0..20u64 {
        let socket = socket.clone();
        clients.push(tokio::spawn(async move {
            let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ ((c + 1) * 0x1000_0001));
            let mut client = Client::connect(&socket).await;
            let (mut ended, mut abandoned) = (0, 0);
            for r in 0..10 {
                let id = format!("c{c}r{r}");
                let prompt = "reading ".repeat(1 + dice.roll(40) as usize);
                let max_tokens = 1 + dice.roll(40);
                client
                    .send(json!({"id": id, "prompt": prompt, "max_tokens": max_tokens}))
                    .await;
                match dice.roll(5) {
                    // Hang up after the first event; the next request uses a new connection.
                    0 => {
                        client.event().await;
                        abandoned += 1;
                        client = Client::connect(&socket).await;
                        continue;
                    }
                    // Cancel after the first event.
                    1 => {
                        let first = client.event().await;
                        if first["type"] == "token" {
                            client.send(json!({"type": "cancel", "id": id})).await;
                        } else {
                            ended += 1;
                            continue;
                        }
                    }
                    _ => {}
                }
                let events = client.until_end(&id).await;
                let terminals = events.iter().filter(|e| e["type"] != "token").count();
                assert_eq!(terminals, 1, "{id}: {events:?}");
                let last = events.last().unwrap();
                assert!(
                    last["type"] == "done" || last["code"] == "busy",
                    "{id} ended with {last}"
                );
                ended += 1;
            }
            // Nothing more for this connection's requests once each has ended.
            let extra = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                client.lines.next_line(),
            )
            .await;
            assert!(
                !matches!(extra, Ok(Ok(Some(_)))),
                "an event after the terminal one: {extra:?}"
            );
            (ended, abandoned)
        }));
    }
    let (mut ended, mut abandoned) = (0, 0);
    for client in clients {
        let (e, a) = client.await.unwrap();
        ended += e;
        abandoned += a;
    }
    assert_eq!(ended + abandoned, 200);
    let after = wait_idle().await;
    let busy = after["rejected_busy"].as_u64().unwrap();
    assert_eq!(
        after["served"].as_u64().unwrap(),
        8 + 200 - busy,
        "every accepted request was served: {after}"
    );
    let rss = rss_mib(daemon.id());
    eprintln!(
        "{abandoned} abandoned, {busy} busy; daemon RSS after warm-up {idle_rss:.1} MiB, after the stress {rss:.1} MiB"
    );
    assert!(
        rss <= idle_rss + 8.0,
        "the daemon's memory grew from {idle_rss:.1} to {rss:.1} MiB"
    );
    // SAFETY: signalling our own child.
    unsafe { libc_kill(daemon.id() as i32, 15) };
    assert!(daemon.wait().unwrap().success());
}
