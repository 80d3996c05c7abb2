//! `emberd bench`: load time, prefill and decode speed, TTFT and peak RSS of one model,
//! as medians (with min and max) over several runs.

use std::time::Instant;

use serde::Serialize;

use crate::engine::EngineOptions;
use crate::generate::{GenerateError, Generator, RunControl};
use crate::model::ModelPackage;
use crate::protocol::{PromptInput, SamplingParams, ValidRequest};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub runs: usize,
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
    pub peak_rss_mb: f64,
    pub spread: BenchSpread,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchSpread {
    pub prefill_ms: Spread,
    pub prefill_tokens_per_s: Spread,
    pub ttft_ms: Spread,
    pub decode_tokens_per_s: Spread,
}

/// Peak resident set size of this process (VmHWM), in MiB; 0 where /proc is absent.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
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

pub fn run(
    package: ModelPackage,
    engine: &EngineOptions,
    options: &BenchOptions,
) -> Result<BenchReport, GenerateError> {
    let loading = Instant::now();
    let mut generator = Generator::load(package, engine)?;
    let load_ms = loading.elapsed().as_secs_f64() * 1e3;
    let prompt = prompt_of(&generator, options.prompt_tokens)?;
    let request = ValidRequest {
        id: "bench".into(),
        input: PromptInput::Tokens(prompt.clone()),
        max_tokens: options.gen_tokens as u32,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stream: true,
        timeout: std::time::Duration::from_secs(3600),
        reply_to: None,
        ignore_eos: true,
    };
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
        let decoded = stats.generated_tokens.saturating_sub(1) as f64;
        decode_tps.push(if stats.decode_ms > 0.0 {
            decoded / (stats.decode_ms / 1e3)
        } else {
            0.0
        });
    }
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
        peak_rss_mb: peak_rss_mb(),
        spread,
    })
}
