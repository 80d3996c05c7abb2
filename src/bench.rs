//! `emberd bench`: load time, prefill and decode speed, TTFT and peak RSS of one model,
//! as medians (with min and max) over several runs.

use std::time::Instant;

use serde::Serialize;

use crate::config::ModelConfig;
use crate::generate::{GenerateError, Generator, RunControl};
use crate::model::ModelPackage;
use crate::protocol::{Event, Message, PromptInput, ResponseFormat, SamplingParams, ValidRequest};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
    /// Also measure decode speed after prompts of these lengths (cost growing with the cache).
    pub decode_positions: Vec<usize>,
    /// Also measure TTFT of a request whose system prompt the previous request already sent.
    pub shared_prefix: bool,
    /// Also measure decoding held to this format.
    pub response_format: Option<ResponseFormat>,
    /// Also measure this many requests at once, decoding together (continuous batching).
    pub concurrency: usize,
}

/// min / median / max of one figure over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Spread {
            min: values[0],
            median,
            max: values[n - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub engine: String,
    pub provider: String,
    pub threads: usize,
    pub runs: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub load_ms: f64,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    pub ttft_ms: f64,
    pub decode_tokens_per_s: f64,
    /// Median decode tokens/s after a prompt of each length in `decode_positions`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decode_by_position: Vec<PositionFigure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_prefix: Option<SharedPrefixFigure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constrained: Option<ConstrainedFigure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent: Option<ConcurrentFigure>,
    pub peak_rss_mb: f64,
    /// Resident set size after the runs: what a serving process holds, without the peak
    /// that loading passes through.
    pub rss_mb: f64,
    pub spread: BenchSpread,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchSpread {
    pub prefill_ms: Spread,
    pub prefill_tokens_per_s: Spread,
    pub ttft_ms: Spread,
    pub decode_tokens_per_s: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub struct PositionFigure {
    pub position: usize,
    pub decode_tokens_per_s: Spread,
}

/// A first request with a system prompt, then one with the same system prompt and another
/// question: the second prefills only what differs.
#[derive(Debug, Clone, Serialize)]
pub struct SharedPrefixFigure {
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub first_ttft_ms: Spread,
    pub second_ttft_ms: Spread,
    /// Median second TTFT over median first TTFT.
    pub ratio: f64,
}

/// The same chat request decoded free and held to a format, alternately, greedy.
#[derive(Debug, Clone, Serialize)]
pub struct ConstrainedFigure {
    pub format: String,
    /// Compiling the grammar the first time (later requests with the same format hit the
    /// cache).
    pub grammar_compile_ms: f64,
    pub cached_compile_ms: Spread,
    pub free_tokens: usize,
    pub constrained_tokens: usize,
    pub free_decode_tokens_per_s: Spread,
    pub constrained_decode_tokens_per_s: Spread,
    /// Median constrained over median free decode tokens/s.
    pub ratio: f64,
    /// Time to compute one step's token mask, over every constrained step of every run.
    pub mask_us_p50: f64,
    pub mask_us_p99: f64,
    pub mask_us_max: f64,
    /// Whether every constrained output parsed as JSON (JSON formats only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs_parse: Option<bool>,
}

/// `concurrency` requests (prompt_tokens each, different prompts) arriving together and
/// served as one batch, `gen_tokens` each; figures over every request of every run.
#[derive(Debug, Clone, Serialize)]
pub struct ConcurrentFigure {
    pub concurrency: usize,
    /// The slots the engine gave (1 where it cannot batch).
    pub max_batch: usize,
    /// Generated tokens after each request's first, over the time from the first request's
    /// first token to the last request's end (median over the runs).
    pub aggregate_decode_tokens_per_s: Spread,
    /// The same for one request alone on this batching generator (a batch of one).
    pub single_decode_tokens_per_s: Spread,
    /// Aggregate over single (medians).
    pub ratio: f64,
    /// Each request's own decode rate and time to first token, under the load.
    pub stream_decode_tokens_per_s_p50: f64,
    pub stream_decode_tokens_per_s_p95_low: f64,
    pub stream_ttft_ms_p50: f64,
    pub stream_ttft_ms_p95: f64,
    /// Peak RSS once the batched runs are done (the peak of the whole bench so far).
    pub peak_rss_mb: f64,
}

/// The `q` quantile (nearest rank) of `sorted`; 0 when it is empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is absent.
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Resident set size of this process now (VmRSS), in MiB; 0 where /proc is absent.
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A raw prompt of exactly `n` tokens: a repeated ordinary sentence, cut to size.
fn prompt_of(generator: &Generator, n: usize) -> Result<Vec<u32>, GenerateError> {
    let text = "The quick brown fox jumps over the lazy dog while the sensor reports a steady temperature. ".repeat(n / 8 + 4);
    let mut ids = generator.prompt_ids(&PromptInput::Raw(text))?;
    ids.truncate(n);
    Ok(ids)
}

fn greedy(id: &str, input: PromptInput, max_tokens: usize) -> ValidRequest {
    ValidRequest {
        id: id.into(),
        input,
        max_tokens: max_tokens as u32,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stream: true,
        timeout: std::time::Duration::from_secs(3600),
        reply_to: None,
        ignore_eos: true,
        stream_interval: std::time::Duration::ZERO,
        prompt_ids: None,
        response_format: Default::default(),
        tools: None,
        constraint: None,
    }
}

/// Decode tokens/s of `gen_tokens` tokens generated after a prompt of `position` tokens.
fn decode_at(
    generator: &mut Generator,
    position: usize,
    options: &BenchOptions,
) -> Result<PositionFigure, GenerateError> {
    let request = greedy(
        "bench-position",
        PromptInput::Tokens(prompt_of(generator, position)?),
        options.gen_tokens,
    );
    let mut rates = Vec::new();
    for _ in 0..options.runs {
        generator.clear_cache();
        let stats = generator.run(&request, &RunControl::new(), &mut |_| true);
        rates.push(stats.decode_tokens_per_s());
    }
    Ok(PositionFigure {
        position,
        decode_tokens_per_s: Spread::of(rates),
    })
}

/// Decode speed of one chat request free and held to `format` (runs alternate, so drift
/// hits both alike), and the mask time of every constrained step.
fn constrained(
    generator: &mut Generator,
    format: &ResponseFormat,
    options: &BenchOptions,
) -> Result<ConstrainedFigure, GenerateError> {
    let input = PromptInput::Chat(vec![Message::new(
        "user",
        "Turn on the kitchen light at 40 percent brightness. Reply as JSON with the \
            device, the action and the level.",
    )]);
    let mut free = greedy("bench-free", input.clone(), options.gen_tokens);
    let mut held = free.clone();
    held.id = "bench-constrained".into();
    held.ignore_eos = false;
    held.stream = false;
    held.response_format = format.clone();
    let first_compile = Instant::now();
    generator.prompter().constraint(format)?;
    let grammar_compile_ms = first_compile.elapsed().as_secs_f64() * 1e3;
    let (mut free_tps, mut held_tps, mut compile, mut mask_us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut free_tokens, mut held_tokens, mut parse) = (0, 0, true);
    let json = matches!(
        format,
        ResponseFormat::JsonObject {} | ResponseFormat::JsonSchema { .. }
    );
    // Free decoding as long as the constrained answer, so both are measured over the same
    // positions (decode slows as the cache grows).
    generator.clear_cache();
    let first = generator.run(&held, &RunControl::new(), &mut |_| true);
    free.max_tokens = first.generated_tokens.max(2) as u32;
    for _ in 0..options.runs {
        generator.clear_cache();
        let stats = generator.run(&free, &RunControl::new(), &mut |_| true);
        free_tokens = stats.generated_tokens;
        free_tps.push(stats.decode_tokens_per_s());
        generator.clear_cache();
        let mut text = None;
        let stats = generator.run(&held, &RunControl::new(), &mut |event| {
            if let Event::Done { text: t, .. } = event {
                text = t;
            }
            true
        });
        held_tokens = stats.generated_tokens;
        held_tps.push(stats.decode_tokens_per_s());
        compile.push(stats.grammar_compile_ms.unwrap_or(0.0));
        mask_us.extend(stats.mask_us);
        if json {
            let text = text.unwrap_or_default();
            parse &= serde_json::from_str::<serde_json::Value>(&text).is_ok();
        }
    }
    mask_us.sort_by(f64::total_cmp);
    let (free_tps, held_tps) = (Spread::of(free_tps), Spread::of(held_tps));
    Ok(ConstrainedFigure {
        format: serde_json::to_string(format).unwrap_or_default(),
        grammar_compile_ms,
        cached_compile_ms: Spread::of(compile),
        free_tokens,
        constrained_tokens: held_tokens,
        ratio: held_tps.median / free_tps.median,
        free_decode_tokens_per_s: free_tps,
        constrained_decode_tokens_per_s: held_tps,
        mask_us_p50: quantile(&mask_us, 0.5),
        mask_us_p99: quantile(&mask_us, 0.99),
        mask_us_max: quantile(&mask_us, 1.0),
        outputs_parse: json.then_some(parse),
    })
}

/// Requests arriving together, served as one batch; see `ConcurrentFigure`.
fn concurrent(
    generator: &mut Generator,
    options: &BenchOptions,
) -> Result<ConcurrentFigure, GenerateError> {
    use crate::generate::Admission;
    let n = options.concurrency;
    generator.set_batch(n, crate::generate::DEFAULT_KV_CACHE_MB);
    let base = prompt_of(generator, options.prompt_tokens + n)?;
    // Different prompts (each starts at its own offset), so no request reuses another's prefix.
    let requests: Vec<ValidRequest> = (0..n)
        .map(|i| {
            let mut request = greedy(
                &format!("bench-stream-{i}"),
                PromptInput::Tokens(base[i..i + options.prompt_tokens].to_vec()),
                options.gen_tokens,
            );
            request.prompt_ids = Some(base[i..i + options.prompt_tokens].to_vec());
            request
        })
        .collect();
    let (mut aggregate, mut single, mut stream_tps, mut stream_ttft) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One warm-up run, as for the other figures.
    for run in 0..=options.runs {
        generator.clear_cache();
        let solo = generator.run(&requests[0], &RunControl::new(), &mut |_| true);
        generator.clear_cache();
        let started = Instant::now();
        let mut ended = Vec::new();
        for (key, request) in requests.iter().enumerate() {
            assert!(generator.can_admit(request), "the bench's batch has room");
            if let Admission::Ended(_) = generator.admit(
                key as u64,
                request.clone(),
                RunControl::new(),
                &mut |_, _| true,
            ) {
                return Err(GenerateError::Tokenizer(
                    "a bench prompt was refused".into(),
                ));
            }
        }
        while generator.running() > 0 {
            for (_, stats) in generator.advance(&mut |_, _| true) {
                ended.push((stats, started.elapsed().as_secs_f64()));
            }
        }
        if run == 0 {
            continue;
        }
        single.push(solo.decode_tokens_per_s());
        // A request's first token came at ttft_ms from its admission, all admitted at start.
        let first = ended
            .iter()
            .map(|(s, _)| s.ttft_ms / 1e3)
            .fold(f64::INFINITY, f64::min);
        let last = ended.iter().map(|(_, t)| *t).fold(0.0, f64::max);
        let tokens: usize = ended
            .iter()
            .map(|(s, _)| s.generated_tokens.saturating_sub(1))
            .sum();
        aggregate.push(tokens as f64 / (last - first));
        for (stats, _) in &ended {
            stream_tps.push(stats.decode_tokens_per_s());
            stream_ttft.push(stats.ttft_ms);
        }
    }
    let max_batch = generator.max_batch();
    generator.set_batch(1, crate::generate::DEFAULT_KV_CACHE_MB);
    stream_tps.sort_by(f64::total_cmp);
    stream_ttft.sort_by(f64::total_cmp);
    let (aggregate, single) = (Spread::of(aggregate), Spread::of(single));
    Ok(ConcurrentFigure {
        concurrency: n,
        max_batch,
        ratio: aggregate.median / single.median,
        aggregate_decode_tokens_per_s: aggregate,
        single_decode_tokens_per_s: single,
        stream_decode_tokens_per_s_p50: quantile(&stream_tps, 0.5),
        stream_decode_tokens_per_s_p95_low: quantile(&stream_tps, 0.05),
        stream_ttft_ms_p50: quantile(&stream_ttft, 0.5),
        stream_ttft_ms_p95: quantile(&stream_ttft, 0.95),
        peak_rss_mb: peak_rss_mb(),
    })
}

/// An IoT-style system prompt sent with every request, then different questions.
fn shared_prefix(
    generator: &mut Generator,
    runs: usize,
) -> Result<SharedPrefixFigure, GenerateError> {
    let system = "You are the assistant of an industrial gateway. Answer in one short sentence. \
        Readings come as JSON with fields sensor, unit and value; temperatures are in degrees \
        Celsius, pressures in kilopascal. Never invent readings that you were not given. If a \
        value is outside the normal range say so first. Normal ranges: temperature 10 to 35, \
        pressure 95 to 105, humidity 20 to 60 percent.";
    let ask = |question: &str| {
        PromptInput::Chat(vec![
            Message::new("system", system),
            Message::new("user", question),
        ])
    };
    let first = greedy("bench-first", ask("Is 41 degrees normal for sensor t1?"), 4);
    let second = greedy("bench-second", ask("Pressure p2 reads 99. Fine?"), 4);
    let (mut first_ttft, mut second_ttft) = (Vec::new(), Vec::new());
    let (mut prompt_tokens, mut cached) = (0, 0);
    for _ in 0..runs.max(1) {
        generator.clear_cache();
        let a = generator.run(&first, &RunControl::new(), &mut |_| true);
        let b = generator.run(&second, &RunControl::new(), &mut |_| true);
        first_ttft.push(a.ttft_ms);
        second_ttft.push(b.ttft_ms);
        prompt_tokens = b.prompt_tokens;
        cached = b.cached_prompt_tokens;
    }
    let (first_ttft_ms, second_ttft_ms) = (Spread::of(first_ttft), Spread::of(second_ttft));
    Ok(SharedPrefixFigure {
        prompt_tokens,
        cached_prompt_tokens: cached,
        ratio: second_ttft_ms.median / first_ttft_ms.median,
        first_ttft_ms,
        second_ttft_ms,
    })
}

pub fn run(
    package: ModelPackage,
    model: &ModelConfig,
    options: &BenchOptions,
) -> Result<BenchReport, GenerateError> {
    let loading = Instant::now();
    let mut generator = Generator::load(package, model)?;
    let load_ms = loading.elapsed().as_secs_f64() * 1e3;
    let prompt = prompt_of(&generator, options.prompt_tokens)?;
    let request = greedy(
        "bench",
        PromptInput::Tokens(prompt.clone()),
        options.gen_tokens,
    );
    let mut prefill = Vec::new();
    let mut prefill_tps = Vec::new();
    let mut ttft = Vec::new();
    let mut decode_tps = Vec::new();
    // One warm-up run: first calls pay for allocations and kernel selection.
    for run in 0..=options.runs {
        // Every run measures a cold prefill, not the prefix cache.
        generator.clear_cache();
        let stats = generator.run(&request, &RunControl::new(), &mut |_| true);
        if run == 0 {
            continue;
        }
        prefill.push(stats.prefill_ms);
        prefill_tps.push(stats.prompt_tokens as f64 / (stats.prefill_ms / 1e3));
        ttft.push(stats.ttft_ms);
        decode_tps.push(stats.decode_tokens_per_s());
    }
    // Before the position runs, whose longer caches are not what the figure compares.
    let rss_after_runs = rss_mb();
    let mut decode_by_position = Vec::new();
    for &position in &options.decode_positions {
        decode_by_position.push(decode_at(&mut generator, position, options)?);
    }
    let shared_prefix = if options.shared_prefix {
        Some(shared_prefix(&mut generator, options.runs)?)
    } else {
        None
    };
    let constrained = match &options.response_format {
        Some(format) => Some(constrained(&mut generator, format, options)?),
        None => None,
    };
    let concurrent = if options.concurrency > 1 {
        Some(concurrent(&mut generator, options)?)
    } else {
        None
    };
    let info = generator.engine_info().clone();
    let spread = BenchSpread {
        prefill_ms: Spread::of(prefill),
        prefill_tokens_per_s: Spread::of(prefill_tps),
        ttft_ms: Spread::of(ttft),
        decode_tokens_per_s: Spread::of(decode_tps),
    };
    Ok(BenchReport {
        model: generator.package().name.clone(),
        engine: info.engine.to_string(),
        provider: info.provider.clone(),
        threads: info.threads,
        runs: options.runs,
        prompt_tokens: prompt.len(),
        gen_tokens: options.gen_tokens,
        load_ms,
        prefill_ms: spread.prefill_ms.median,
        prefill_tokens_per_s: spread.prefill_tokens_per_s.median,
        ttft_ms: spread.ttft_ms.median,
        decode_tokens_per_s: spread.decode_tokens_per_s.median,
        decode_by_position,
        shared_prefix,
        constrained,
        concurrent,
        peak_rss_mb: peak_rss_mb(),
        rss_mb: rss_after_runs,
        spread,
    })
}
