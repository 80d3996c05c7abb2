//! The emberd command line: parses flags, sets up logging, calls the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use emberd::config::Config;
use emberd::engine::{Backend, EngineOptions};
use emberd::generate::{Generator, RunControl};
use emberd::model::ModelPackage;
use emberd::protocol::{Event, Request};

#[derive(Parser)]
#[command(name = "emberd", version, about = "Serve a quantized ONNX language model on edge devices")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to PROMPT, streaming text to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print the wire events, one JSON object per line, instead of text.
        #[arg(long)]
        json: bool,
        prompt: String,
    },
    /// Show the model package and the engine that would serve it.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Measure load time, prefill and decode speed, TTFT and peak memory; prints JSON.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model package directory (default: the package the setup prepared).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Execution providers in priority order, e.g. cuda,cpu.
    #[arg(long, value_delimiter = ',')]
    providers: Option<Vec<String>>,
    #[arg(long)]
    ort_library: Option<PathBuf>,
    /// Intra-op threads (0: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Context length cap.
    #[arg(long)]
    context: Option<usize>,
}

#[derive(Args)]
struct SamplingArgs {
    #[arg(long)]
    max_tokens: Option<u32>,
    /// 0 means greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop sequence (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt as-is, without the chat template.
    #[arg(long)]
    raw: bool,
}

impl SamplingArgs {
    fn into_request(self, prompt: String) -> Request {
        Request {
            prompt: Some(prompt),
            raw: self.raw,
            system: self.system,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: (!self.stop.is_empty()).then_some(self.stop),
            ..Request::default()
        }
    }
}

impl ModelArgs {
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let m = &mut config.model;
        if let Some(dir) = &self.model {
            m.dir = Some(dir.clone());
        }
        if let Some(b) = self.backend {
            m.backend = b;
        }
        if let Some(p) = &self.providers {
            m.providers = p.clone();
        }
        if let Some(l) = &self.ort_library {
            m.ort_library = Some(l.clone());
        }
        if let Some(t) = self.threads {
            m.threads = t;
        }
        if let Some(c) = self.context {
            m.context = c;
        }
        config.validate()?;
        Ok(config)
    }
}

fn load_package(config: &Config) -> Result<ModelPackage> {
    let dir = config.model.model_dir();
    ModelPackage::load(&dir).with_context(|| {
        format!(
            "cannot load the model package at {} (run the setup, or pass --model DIR)",
            dir.display()
        )
    })
}

fn load_generator(config: &Config) -> Result<Generator> {
    let package = load_package(config)?;
    let engine: EngineOptions = config.model.engine_options();
    let mut generator = Generator::load(package, &engine).context("cannot start an engine")?;
    if config.model.context > 0 {
        generator.set_context_len(config.model.context);
    }
    generator.set_prefill_chunk(config.model.prefill_chunk);
    let info = generator.engine_info();
    if let Some(reason) = &info.fallback_reason {
        log::warn!("serving with {} because ONNX Runtime could not start: {reason}", info.label());
    }
    Ok(generator)
}

fn generate(model: ModelArgs, sampling: SamplingArgs, json: bool, prompt: String) -> Result<bool> {
    let config = model.config()?;
    let mut generator = load_generator(&config)?;
    let request = sampling
        .into_request(prompt)
        .validate(&config.request_policy(), || "cli".into())?;
    let stdout = std::io::stdout();
    let mut ok = true;
    generator.run(&request, &RunControl::new(), &mut |event| {
        let mut out = stdout.lock();
        let written = if json {
            writeln!(out, "{}", event.to_json())
        } else {
            match &event {
                Event::Token { text, .. } => write!(out, "{text}"),
                Event::Done { .. } => writeln!(out),
                Event::Error { code, message, .. } => {
                    ok = false;
                    eprintln!("error ({code}): {message}");
                    Ok(())
                }
            }
        };
        if json {
            if let Event::Error { .. } = event {
                ok = false;
            }
        }
        written.and_then(|_| out.flush()).is_ok()
    });
    Ok(ok)
}

fn info(model: ModelArgs) -> Result<()> {
    let config = model.config()?;
    let package = load_package(&config)?;
    let engine = emberd::engine::load(&package, &config.model.engine_options()).context("cannot start an engine")?;
    let report = serde_json::json!({
        "model": package,
        "engine": engine.info(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn init_logging() {
    let level = std::env::var("EMBERD_LOG").ok().and_then(|l| l.parse().ok()).unwrap_or(log::LevelFilter::Warn);
    log::set_max_level(level);
    let _ = log::set_boxed_logger(Box::new(StderrLogger));
}

/// Plain stderr logging for the interactive subcommands.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && record.target().starts_with("emberd") {
            eprintln!("emberd: {}: {}", record.level().as_str().to_lowercase(), record.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> Result<()> {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate { model, sampling, json, prompt } => {
            if !generate(model, sampling, json, prompt)? {
                std::process::exit(1);
            }
        }
        Command::Info { model } => info(model)?,
        Command::Bench { model, prompt_tokens, gen_tokens, runs } => {
            let config = model.config()?;
            let package = load_package(&config)?;
            let options = emberd::bench::BenchOptions { prompt_tokens, gen_tokens, runs: runs.max(1) };
            let report = emberd::bench::run(package, &config.model.engine_options(), &options)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
