//! `emberd serve`: the scheduler plus every enabled transport, until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::generate::Generator;
use crate::ingress::Ingress;
use crate::scheduler::Scheduler;
use crate::service;
use crate::shutdown::Shutdown;
use crate::shutdown::Shutdown as ShutdownSignal;
#[cfg(feature = "http")]
use crate::transport::http;
use crate::transport::{mqtt, socket};

/// How long in-flight requests may run on after shutdown begins before they are cancelled.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long readiness waits for the MQTT broker to acknowledge emberd's subscriptions.
pub const MQTT_READY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    #[cfg(feature = "http")]
    Http(#[from] http::HttpError),
    #[error("[http] is enabled, but this emberd was built without the http feature")]
    HttpNotBuilt,
    #[error("no transport is enabled; enable [socket], [http] or [mqtt]")]
    NoTransport,
}

/// What `serve` tells its caller once every transport is up.
#[derive(Debug, Clone)]
pub struct Ready {
    pub socket: Option<PathBuf>,
    pub mqtt: Option<String>,
    /// Where the HTTP API listens (the bound address: port 0 becomes the real one).
    pub http: Option<std::net::SocketAddr>,
    pub engine: String,
    pub model: String,
    /// Live counters of the scheduler (served, cancelled, queue depth...).
    pub stats: Arc<crate::scheduler::Stats>,
}

/// Where the Unix socket comes from: a path to bind, or a listener systemd handed over.
pub enum SocketSource {
    Bind,
    Inherited(std::os::unix::net::UnixListener),
}

/// Serves until `shutdown` fires, then drains: transports stop taking requests, requests in
/// flight get `DRAIN_TIMEOUT` to finish, the rest are cancelled (each still ends with its
/// terminal event), MQTT publishes `offline`, and the engine worker exits.
pub async fn serve(
    config: Config,
    mut generator: Generator,
    socket_source: SocketSource,
    shutdown: Shutdown,
    on_ready: impl FnOnce(Ready),
) -> Result<(), ServeError> {
    if !config.socket.enabled && !config.mqtt.enabled && !config.http.enabled {
        return Err(ServeError::NoTransport);
    }
    generator.set_max_prompt_tokens(config.limits.max_prompt_tokens);
    generator.set_batch(config.limits.max_batch, config.limits.kv_cache_mb);
    let prompter = generator.prompter();
    let (scheduler, worker) = Scheduler::start(generator, config.limits.max_queue);
    // The one request path every transport hands its messages to.
    let ingress = Ingress::new(
        scheduler.clone(),
        prompter,
        Arc::new(config.request_policy()),
        config.limits.max_request_bytes,
    );
    let mut tasks = tokio::task::JoinSet::new();
    let mut ready = Ready {
        socket: None,
        mqtt: None,
        http: None,
        engine: scheduler.engine().label(),
        model: scheduler.model_name().to_string(),
        stats: scheduler.stats().clone(),
    };

    if config.socket.enabled {
        let (listener, path) = match socket_source {
            SocketSource::Inherited(std_listener) => {
                std_listener
                    .set_nonblocking(true)
                    .map_err(|source| socket::SocketError::Io {
                        path: config.socket.path.clone(),
                        source,
                    })?;
                let listener =
                    tokio::net::UnixListener::from_std(std_listener).map_err(|source| {
                        socket::SocketError::Io {
                            path: config.socket.path.clone(),
                            source,
                        }
                    })?;
                // systemd owns an inherited socket file; leave it in place on exit.
                (listener, None)
            }
            SocketSource::Bind => (
                socket::bind(
                    &config.socket.path,
                    config.socket.mode.0,
                    config.socket.group.as_deref(),
                )?,
                Some(config.socket.path.clone()),
            ),
        };
        ready.socket = Some(config.socket.path.clone());
        tasks.spawn(
            socket::Listener {
                listener,
                path,
                max_connections: config.socket.max_connections,
                max_unread_bytes: config.socket.max_unread_bytes,
                ingress: ingress.clone(),
                shutdown: shutdown.clone(),
            }
            .run(),
        );
    }
    if config.http.enabled {
        #[cfg(feature = "http")]
        {
            let server =
                http::Server::bind(&config.http, ingress.clone(), shutdown.clone()).await?;
            ready.http = server.local_addr();
            tasks.spawn(server.run());
        }
        #[cfg(not(feature = "http"))]
        return Err(ServeError::HttpNotBuilt);
    }
    let mut mqtt_subscribed = None;
    if config.mqtt.enabled {
        let mut transport = mqtt::Transport::new(&config.mqtt, ingress.clone(), shutdown.clone())?;
        ready.mqtt = Some(format!("{}:{}", config.mqtt.host, config.mqtt.port));
        mqtt_subscribed = Some(transport.subscribed());
        tasks.spawn(transport.run());
    }
    let mut status = format!("serving {} on {}", ready.model, ready.engine);
    if let Some(subscribed) = mqtt_subscribed {
        // Ready means requests published now get answered; but a broker that is down must not
        // keep the local socket from serving, so after a bound emberd is ready without it.
        let broker = ready.mqtt.clone().unwrap_or_default();
        service::notify(&format!("STATUS=connecting to MQTT broker {broker}"));
        let mut waiting = shutdown.clone();
        tokio::select! {
            result = tokio::time::timeout(MQTT_READY_TIMEOUT, subscribed) => {
                if result.is_err() {
                    log::warn!(
                        "mqtt: broker {broker} not reached within {MQTT_READY_TIMEOUT:?}; \
                         ready without it, still retrying"
                    );
                    status.push_str(&format!(" (MQTT broker {broker} unreachable, retrying)"));
                }
            }
            _ = waiting.wait() => {}
        }
    }
    log::info!(
        "ready: model {}, engine {}, socket {}, http {}, mqtt broker {}",
        ready.model,
        ready.engine,
        ready
            .socket
            .as_ref()
            .map_or("off".to_string(), |p| p.display().to_string()),
        ready
            .http
            .map_or("off".to_string(), |a| format!("http://{a}")),
        ready.mqtt.as_deref().unwrap_or("off")
    );
    service::notify(&format!("READY=1\nSTATUS={status}"));
    on_ready(ready);
    if let Some(interval) = service::watchdog_interval() {
        tasks.spawn(watchdog(scheduler.clone(), interval, shutdown.clone()));
    }

    let mut shutdown = shutdown;
    shutdown.wait().await;
    service::notify("STOPPING=1\nSTATUS=draining");
    scheduler.close();
    log::info!(
        "shutting down: draining {} request(s)",
        scheduler.queue_depth()
    );
    let drain_until = Instant::now() + DRAIN_TIMEOUT;
    while scheduler.queue_depth() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    scheduler.cancel_all();
    while tasks.join_next().await.is_some() {}
    // The worker exits once every handle to the scheduler is gone (the ingress holds one).
    drop(ingress);
    drop(scheduler);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    log::info!("stopped");
    Ok(())
}

/// Pings systemd's watchdog while the engine worker shows signs of life; a hung engine stops
/// the pings, and systemd restarts the service. Also keeps STATUS= current.
async fn watchdog(scheduler: Scheduler, interval: Duration, mut shutdown: ShutdownSignal) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let silent = scheduler.since_heartbeat();
        if silent < interval {
            let stats = scheduler.stats();
            service::notify(&format!(
                "WATCHDOG=1\nSTATUS=serving: {} served, {} in flight",
                stats.served.load(std::sync::atomic::Ordering::Relaxed),
                scheduler.queue_depth()
            ));
        } else {
            log::error!(
                "the engine worker has been silent for {silent:?}; withholding the watchdog ping"
            );
        }
    }
}
