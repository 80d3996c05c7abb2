//! The emberd command line: parses flags, sets up logging, calls the library.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use emberd::config::Config;
use emberd::engine::Backend;
use emberd::generate::{Generator, RunControl};
use emberd::model::ModelPackage;
use emberd::protocol::{Event, Request, ResponseFormat};

#[derive(Parser)]
#[command(
    name = "emberd",
    version,
    about = "Serve a quantized ONNX language model on edge devices"
)]
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
    /// Run the daemon: the model stays loaded and serves the Unix socket and MQTT.
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Unix socket path (overrides socket.path).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Send PROMPT to a running daemon (Unix socket, or MQTT with --mqtt) and stream the
    /// reply; Ctrl-C cancels the request.
    Ask {
        /// The daemon's socket.
        #[arg(long, env = "EMBERD_SOCKET", default_value = "/run/emberd/emberd.sock")]
        socket: PathBuf,
        /// Ask over MQTT instead, through the broker at HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        mqtt: Option<String>,
        /// The daemon's mqtt.device_id.
        #[arg(long, default_value = "emberd", requires = "mqtt")]
        device: String,
        /// The daemon's mqtt.prefix.
        #[arg(long, default_value = "emberd", requires = "mqtt")]
        prefix: String,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print the wire events, one JSON object per line, instead of text.
        #[arg(long)]
        json: bool,
        /// At the end, print to stderr one JSON line with the timings seen by this client
        /// next to the daemon's own.
        #[arg(long)]
        stats: bool,
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
        /// Also measure decode speed after prompts of these lengths, e.g. 100,2000.
        #[arg(long, value_delimiter = ',')]
        decode_at: Vec<usize>,
        /// Also measure TTFT of a request that repeats the previous one's system prompt.
        #[arg(long)]
        shared_prefix: bool,
        /// Also measure N requests arriving together, decoding as one batch: aggregate and
        /// per-stream decode tokens/s, time to first token, peak RSS.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Also measure decoding held to this format (greedy, a chat prompt asking for it):
        /// tokens/s against unconstrained, mask time per token, compile time.
        #[command(flatten)]
        format: FormatArgs,
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
    /// Generate max_tokens even past end-of-sequence (benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    format: FormatArgs,
}

/// The shape the output must take (the request's `response_format`).
#[derive(Args)]
struct FormatArgs {
    /// `json` (any JSON object), or a file holding a JSON Schema or a whole response_format
    /// object.
    #[arg(long, value_name = "FILE|json", conflicts_with_all = ["regex", "lark"])]
    response_format: Option<String>,
    /// Output that matches this regular expression as a whole.
    #[arg(long, conflicts_with = "lark")]
    regex: Option<String>,
    /// Output in the Lark grammar in FILE.
    #[arg(long, value_name = "FILE")]
    lark: Option<PathBuf>,
}

impl FormatArgs {
    fn response_format(&self) -> Result<Option<ResponseFormat>> {
        if let Some(regex) = &self.regex {
            return Ok(Some(ResponseFormat::Regex {
                regex: regex.clone(),
            }));
        }
        if let Some(path) = &self.lark {
            let lark = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            return Ok(Some(ResponseFormat::Lark { lark }));
        }
        let Some(given) = &self.response_format else {
            return Ok(None);
        };
        if given == "json" {
            return Ok(Some(ResponseFormat::JsonObject {}));
        }
        let text = std::fs::read_to_string(given)
            .with_context(|| format!("--response-format: cannot read {given}"))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--response-format: {given} is not JSON"))?;
        // A response_format object names a format as its type; a schema names a JSON type.
        let names_format = matches!(
            value.get("type").and_then(|t| t.as_str()),
            Some("text" | "json_object" | "json_schema" | "regex" | "lark")
        );
        if names_format {
            let format = serde_json::from_value(value)
                .with_context(|| format!("--response-format: {given}"))?;
            Ok(Some(format))
        } else {
            Ok(Some(ResponseFormat::json_schema(value)))
        }
    }
}

impl SamplingArgs {
    fn into_request(self, prompt: String) -> Result<Request> {
        Ok(Request {
            response_format: self.format.response_format()?,
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
            ignore_eos: self.ignore_eos,
            ..Request::default()
        })
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
    let generator = Generator::load(package, &config.model).context("cannot start an engine")?;
    let info = generator.engine_info();
    if let Some(reason) = &info.fallback_reason {
        log::warn!(
            "serving with {}, not the first choice: {reason}",
            info.label()
        );
    }
    Ok(generator)
}

fn generate(model: ModelArgs, sampling: SamplingArgs, json: bool, prompt: String) -> Result<bool> {
    let config = model.config()?;
    let mut generator = load_generator(&config)?;
    let request = sampling
        .into_request(prompt)?
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
    let engine = emberd::engine::load(&package, &config.model).context("cannot start an engine")?;
    let max_batch = emberd::generate::batch_size(config.limits.max_batch, engine.as_ref());
    let report = serde_json::json!({
        "model": package,
        "engine": engine.info(),
        // What `serve` runs: requests decoding together, and their KV cache's budget.
        "batch": {
            "max_batch": max_batch,
            "configured_max_batch": config.limits.max_batch,
            "engine_batches": engine.max_batch() > 1,
            "kv_cache_mb": config.limits.kv_cache_mb,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn serve(model: ModelArgs, socket: Option<PathBuf>) -> Result<()> {
    let config_path = model.config.clone();
    let mut config = model.config()?;
    if let Some(path) = socket {
        config.socket.path = path;
    }
    emberd::service::init_logging(config.log.journald, log_level(&config.log.level));
    emberd::service::debug_call_denied_syscall();
    emberd::service::notify("STATUS=loading the model");
    let generator = load_generator(&config)?;
    let socket_source = match emberd::service::inherited_listener() {
        Some(listener) => emberd::serve::SocketSource::Inherited(listener),
        None => emberd::serve::SocketSource::Bind,
    };
    let runtime = runtime()?;
    runtime.block_on(async move {
        let (trigger, shutdown) = emberd::shutdown::channel();
        // Handlers go in before serve reports ready: a signal in between would otherwise get
        // its default action (SIGHUP: terminate).
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = hup.recv() => reload_log_level(config_path.as_deref()),
                }
            }
            trigger.trigger();
        });
        emberd::serve::serve(
            config,
            generator,
            socket_source,
            shutdown,
            // serve logs the ready line itself (socket, broker, engine).
            |_ready| {},
        )
        .await?;
        anyhow::Ok(())
    })
}

fn ask(
    endpoint: emberd::client::Endpoint,
    sampling: SamplingArgs,
    json: bool,
    stats: bool,
    prompt: String,
) -> Result<bool> {
    let mut request = sampling.into_request(prompt)?;
    request.id = Some(format!("ask-{}", std::process::id()));
    let mut stdout = std::io::stdout();
    let (last, client) =
        runtime()?.block_on(emberd::client::ask(&endpoint, &request, |event| {
            // A closed stdout (a pipe into `head`) is no reason to stop reading the stream.
            let _ = match event {
                _ if json => serde_json::to_string(event)
                    .map_err(std::io::Error::other)
                    .and_then(|line| writeln!(stdout, "{line}")),
                Event::Token { text, .. } => write!(stdout, "{text}").and_then(|_| stdout.flush()),
                Event::Done { .. } => writeln!(stdout),
                Event::Error { .. } => Ok(()),
            };
        }))?;
    match last {
        Event::Done { timings, .. } => {
            if stats {
                let line = serde_json::json!({"client": client, "daemon": timings});
                eprintln!("{line}");
            }
            Ok(true)
        }
        Event::Error { code, message, .. } => {
            eprintln!("error ({code}): {message}");
            Ok(false)
        }
        Event::Token { .. } => unreachable!("ask returns on a terminal event"),
    }
}

/// SIGHUP: the log level is re-read from the config file; everything else (model, engine,
/// transports, limits) is fixed while the daemon runs and needs a restart.
fn reload_log_level(path: Option<&std::path::Path>) {
    let Some(path) = path else {
        log::warn!("SIGHUP: no --config file to reload");
        return;
    };
    match Config::from_file(path) {
        Ok(config) => {
            let level = log_level(&config.log.level);
            log::set_max_level(level);
            log::warn!(
                "SIGHUP: log level is now {level} (from {}); other settings need a restart",
                path.display()
            );
        }
        Err(e) => log::error!("SIGHUP: {e}; keeping the running settings"),
    }
}

/// Log level: EMBERD_LOG wins, then the given default.
fn log_level(default: &str) -> log::LevelFilter {
    std::env::var("EMBERD_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .or_else(|| default.parse().ok())
        .unwrap_or(log::LevelFilter::Info)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The daemon logs as its config says (journald under systemd); the rest to stderr.
    if !matches!(cli.command, Command::Serve { .. }) {
        emberd::service::init_logging(emberd::config::JournaldMode::Off, log_level("warn"));
    }
    match cli.command {
        Command::Generate {
            model,
            sampling,
            json,
            prompt,
        } => {
            if !generate(model, sampling, json, prompt)? {
                std::process::exit(1);
            }
        }
        Command::Info { model } => info(model)?,
        Command::Serve { model, socket } => serve(model, socket)?,
        Command::Ask {
            socket,
            mqtt,
            device,
            prefix,
            sampling,
            json,
            stats,
            prompt,
        } => {
            let endpoint = match mqtt {
                Some(address) => {
                    let (host, port) = address
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
                        .with_context(|| format!("--mqtt {address}: expected HOST:PORT"))?;
                    emberd::client::Endpoint::Mqtt {
                        host,
                        port,
                        prefix,
                        device,
                    }
                }
                None => emberd::client::Endpoint::Socket(socket),
            };
            if !ask(endpoint, sampling, json, stats, prompt)? {
                std::process::exit(1);
            }
        }
        Command::Bench {
            model,
            prompt_tokens,
            gen_tokens,
            runs,
            decode_at,
            shared_prefix,
            concurrency,
            format,
        } => {
            let config = model.config()?;
            let package = load_package(&config)?;
            let options = emberd::bench::BenchOptions {
                prompt_tokens,
                gen_tokens,
                runs: runs.max(1),
                decode_positions: decode_at,
                shared_prefix,
                response_format: format.response_format()?,
                concurrency,
            };
            let report = emberd::bench::run(package, &config.model, &options)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
