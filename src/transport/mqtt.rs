//! MQTT v5 (rumqttc): requests on `{prefix}/{device}/request` (and on
//! `$share/{group}/{prefix}/request` when a share group is set), events to the request's
//! Response Topic with its Correlation Data, cancels on `{prefix}/{device}/cancel`, a
//! retained status on `{prefix}/{device}/status` with a Last Will of `offline`.
//!
//! One task owns rumqttc's `EventLoop` and only polls it; replies go out through clones of
//! the `AsyncClient`, from one task per request.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
use rumqttc::v5::mqttbytes::v5::{
    LastWill, Packet, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event as MqttEvent, EventLoop, MqttOptions};

use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::config::{MqttConfig, TlsConfig};
use crate::ingress::{Ingress, Intent, Origin, Reply, Route, Scope};
use crate::protocol::Event;
use crate::scheduler::Scheduler;
use crate::shutdown::Shutdown;
use crate::transport::ha::HaTopics;

/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long shutdown keeps polling so the last events and `offline` reach the broker.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The broker keeps our subscriptions and queued QoS 1 requests this long while we are away.
const SESSION_EXPIRY_S: u32 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.password_file: {0}")]
    Password(#[from] crate::secret::SecretError),
    #[error("mqtt: cannot read TLS {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("mqtt: TLS {what} {path} holds no usable {what}")]
    TlsEmpty {
        what: &'static str,
        path: std::path::PathBuf,
    },
    #[error("mqtt: TLS setup failed: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("mqtt.tls: `cert` and `key` go together; set both or neither")]
    TlsClientAuthHalf,
    #[error("mqtt.tls.key: {0}")]
    TlsKey(crate::secret::SecretError),
}

#[derive(Debug, Clone)]
pub struct Topics {
    pub request: String,
    pub shared_request: Option<String>,
    pub cancel: String,
    pub status: String,
    base: String,
}

impl Topics {
    pub fn new(config: &MqttConfig) -> Self {
        let base = format!("{}/{}", config.prefix, config.device_id);
        Topics {
            request: format!("{base}/request"),
            shared_request: config
                .share_group
                .as_ref()
                .map(|g| format!("$share/{g}/{}/request", config.prefix)),
            cancel: format!("{base}/cancel"),
            status: format!("{base}/status"),
            base,
        }
    }

    /// Where events go when the request names no Response Topic and no `reply_to`.
    pub fn default_response(&self, id: &str) -> String {
        format!("{}/response/{id}", self.base)
    }

    /// Where errors about unreadable requests go when there is no reply address at all.
    pub fn errors(&self) -> String {
        format!("{}/errors", self.base)
    }
}

pub struct Transport {
    client: AsyncClient,
    eventloop: EventLoop,
    topics: Topics,
    ingress: Ingress,
    shutdown: Shutdown,
    /// Every MQTT request that has not ended: cancels come on one topic for the device.
    running: Scope,
    /// Fired once the first connection's subscriptions are acknowledged.
    subscribed: Option<tokio::sync::oneshot::Sender<()>>,
    /// Subscriptions of the current connection not yet acknowledged.
    pending_subacks: usize,
    /// Whether the broker has accepted the current connection (for the status refresher).
    connected: Arc<std::sync::atomic::AtomicBool>,
    /// Home Assistant discovery: `Some(true)` announces, `Some(false)` removes, None leaves
    /// the discovery topic alone.
    ha: Option<(HaTopics, bool)>,
}

/// What a status refresh compares: queue depth, running, served.
type StatusFigures = (usize, u64, u64);

/// How often the retained status is brought up to date while its figures change.
const STATUS_REFRESH: Duration = Duration::from_secs(2);

pub fn options(
    config: &MqttConfig,
    max_request_bytes: usize,
    topics: &Topics,
    offline: Vec<u8>,
) -> Result<MqttOptions, MqttError> {
    let mut options = MqttOptions::new(config.device_id.clone(), config.host.clone(), config.port);
    // Events are small publishes sent as they are made: with Nagle's algorithm each one
    // waited for the broker's delayed ACK (about 40 ms a token, measured by tests/load.rs).
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options
        .set_network_options(network)
        .set_keep_alive(Duration::from_secs(config.keep_alive_s.max(5)))
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_S))
        // Requests may be up to max_request_bytes plus topic and properties.
        .set_max_packet_size(Some((max_request_bytes + 4096) as u32))
        .set_last_will(LastWill::new(
            topics.status.clone(),
            offline,
            QoS::AtLeastOnce,
            true,
            None,
        ));
    if let Some(user) = &config.username {
        let password = match &config.password_file {
            Some(path) => crate::secret::read_secret(path)?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => String::new(),
        };
        options.set_credentials(user.clone(), password);
    }
    if let Some(tls) = &config.tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls_client_config(tls)?),
        ));
    }
    Ok(options)
}

/// A rustls client (ring provider) trusting `tls.ca`, or the system's roots without one, and
/// presenting a client certificate when `cert` and `key` are set. Read once at start, so a
/// bad file fails `serve` with its path instead of failing every reconnect.
pub fn tls_client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, MqttError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path).map_err(pem_error("CA", path))? {
                roots.add(cert.map_err(pem_error("CA", path))?)?;
            }
            if roots.is_empty() {
                return Err(MqttError::TlsEmpty {
                    what: "CA",
                    path: path.clone(),
                });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                log::warn!("mqtt: reading the system's CA certificates: {error}");
            }
            roots.add_parsable_certificates(found.certs);
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(pem_error("certificate", cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error("certificate", cert))?;
            if chain.is_empty() {
                return Err(MqttError::TlsEmpty {
                    what: "certificate",
                    path: cert.clone(),
                });
            }
            // The client's private key is a secret like the password: refused if world-readable.
            let pem = crate::secret::read_secret(key).map_err(MqttError::TlsKey)?;
            let key =
                PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(pem_error("key", key))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(MqttError::TlsClientAuthHalf),
    };
    Ok(Arc::new(config))
}

/// What to check when the broker refuses the connection.
fn refusal_hint(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
            " (check mqtt.username and mqtt.password_file)"
        }
        ConnectReturnCode::ClientIdentifierNotValid => " (check mqtt.device_id)",
        _ => "",
    }
}

fn pem_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(pem::Error) -> MqttError + 'a {
    move |e| MqttError::TlsFile {
        what,
        path: path.to_path_buf(),
        source: match e {
            pem::Error::Io(io) => io,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{other:?}")),
        },
    }
}

/// Republishes the retained status while connected, every `STATUS_REFRESH`, when its queue
/// figures changed since the last time (an idle daemon publishes nothing).
async fn refresh_status(
    client: AsyncClient,
    topic: String,
    scheduler: Scheduler,
    connected: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut tick = tokio::time::interval(STATUS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said = None;
    loop {
        tick.tick().await;
        if !connected.load(Ordering::Acquire) {
            // A new connection publishes the status itself.
            said = None;
            continue;
        }
        let now = status_figures(&scheduler);
        if said == Some(now) {
            continue;
        }
        // Never waits: a full request channel means a connection in trouble, and the next
        // tick tries again.
        let status = status_json(&scheduler, true);
        if client
            .try_publish(topic.clone(), QoS::AtMostOnce, true, status)
            .is_ok()
        {
            said = Some(now);
        }
    }
}

fn status_figures(scheduler: &Scheduler) -> StatusFigures {
    let stats = scheduler.stats();
    (
        scheduler.queue_depth(),
        stats.running.load(Ordering::Relaxed) as u64,
        stats.served.load(Ordering::Relaxed),
    )
}

/// The retained status message.
pub fn status_json(scheduler: &Scheduler, online: bool) -> Vec<u8> {
    let engine = scheduler.engine();
    serde_json::json!({
        "state": if online { "online" } else { "offline" },
        "model": scheduler.model_name(),
        "engine": engine.engine,
        "provider": engine.provider,
        "fallback_reason": engine.fallback_reason,
        "queue_depth": scheduler.queue_depth(),
        "running": scheduler.stats().running.load(Ordering::Relaxed),
        "max_batch": scheduler.stats().max_batch.load(Ordering::Relaxed),
        "served": scheduler.stats().served.load(Ordering::Relaxed),
        // The last request's: what Home Assistant's decode-speed sensor shows.
        "decode_tokens_per_s": (f64::from_bits(
            scheduler.stats().last_decode_tokens_per_s.load(Ordering::Relaxed),
        ) * 10.0)
            .round()
            / 10.0,
    })
    .to_string()
    .into_bytes()
}

/// Where one request's events go.
#[derive(Clone)]
struct ReplyTo {
    topic: String,
    correlation: Option<Bytes>,
}

/// A request's reply address on the broker, with the client that publishes there.
struct MqttReply {
    client: AsyncClient,
    to: ReplyTo,
}

impl Reply for MqttReply {
    fn deliver(&self, event: Event) -> impl Future<Output = bool> + Send + 'static {
        let client = self.client.clone();
        let to = self.to.clone();
        async move { publish_event(&client, &to, &event).await }
    }
}

impl Transport {
    pub fn new(
        config: &MqttConfig,
        ingress: Ingress,
        shutdown: Shutdown,
    ) -> Result<Self, MqttError> {
        let topics = Topics::new(config);
        let offline = status_json(ingress.scheduler(), false);
        let options = options(config, ingress.max_request_bytes(), &topics, offline)?;
        let (client, eventloop) = AsyncClient::new(options, 64);
        let ha = config.ha_discovery.map(|on| {
            let model = ingress.scheduler().model_name();
            (HaTopics::new(config, &topics.status, model), on)
        });
        Ok(Transport {
            client,
            eventloop,
            topics,
            ingress,
            shutdown,
            running: Scope::default(),
            subscribed: None,
            pending_subacks: 0,
            connected: Arc::default(),
            ha,
        })
    }

    /// Resolves once the broker has acknowledged every subscription (or resumed a session
    /// that holds them): from then on, requests published to the broker reach emberd.
    pub fn subscribed(&mut self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.subscribed = Some(tx);
        rx
    }

    fn subscriptions(&self) -> Vec<String> {
        let mut topics = vec![self.topics.request.clone(), self.topics.cancel.clone()];
        topics.extend(self.topics.shared_request.clone());
        if let Some((ha, true)) = &self.ha {
            topics.extend([ha.prompt.clone(), ha.ha_status.clone()]);
        }
        topics
    }

    fn note_subscribed(&mut self) {
        if self.pending_subacks == 0 {
            if let Some(tx) = self.subscribed.take() {
                let _ = tx.send(());
            }
        }
    }

    /// Polls the connection until shutdown, then publishes `offline` and flushes.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut shutdown = self.shutdown.clone();
        // Its own task: a timer in the select below would cancel the event loop's poll.
        let refresher = tokio::spawn(refresh_status(
            self.client.clone(),
            self.topics.status.clone(),
            self.ingress.scheduler().clone(),
            self.connected.clone(),
        ));
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                polled = self.eventloop.poll() => match polled {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                        backoff = Duration::from_millis(100);
                        log::info!("mqtt: connected (session present: {})", ack.session_present);
                        self.pending_subacks = if ack.session_present { 0 } else { self.subscriptions().len() };
                        self.on_connect(ack.session_present);
                        self.note_subscribed();
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                        for code in &ack.return_codes {
                            if !matches!(code, SubscribeReasonCode::Success(_)) {
                                log::error!("mqtt: the broker refused a subscription: {code:?}");
                            }
                        }
                        self.pending_subacks = self.pending_subacks.saturating_sub(1);
                        self.note_subscribed();
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(publish))) => self.on_publish(publish),
                    Ok(_) => {}
                    Err(e) => {
                        self.connected.store(false, Ordering::Release);
                        // rumqttc reconnects on the next poll; without a pause it would spin.
                        match e {
                            ConnectionError::ConnectionRefused(code) => log::error!(
                                "mqtt: the broker refused the connection: {code:?}{}; retrying in {backoff:?}",
                                refusal_hint(code)
                            ),
                            e => log::warn!("mqtt: connection error: {e}; retrying in {backoff:?}"),
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.wait() => break,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                },
            }
        }
        refresher.abort();
        self.finish().await;
    }

    fn on_connect(&self, session_present: bool) {
        let client = self.client.clone();
        let topics = self.topics.clone();
        self.connected.store(true, Ordering::Release);
        let status = status_json(self.ingress.scheduler(), true);
        let subscriptions = if session_present {
            Vec::new()
        } else {
            self.subscriptions()
        };
        // Announced on every connection (a broker that lost its retained messages gets it
        // again); turned off, an empty retained message removes the device.
        let discovery = self.ha.as_ref().map(|(ha, on)| {
            let payload = if *on {
                ha.announcement.clone()
            } else {
                Vec::new()
            };
            (ha.config.clone(), payload)
        });
        tokio::spawn(async move {
            for topic in subscriptions {
                if let Err(e) = client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                    log::warn!("mqtt: subscribing to {topic} failed: {e}");
                }
            }
            if let Err(e) = client
                .publish(topics.status.clone(), QoS::AtLeastOnce, true, status)
                .await
            {
                log::warn!("mqtt: publishing status failed: {e}");
            }
            if let Some((topic, payload)) = discovery {
                publish_discovery(&client, topic, payload).await;
            }
        });
    }

    fn on_publish(&self, publish: Publish) {
        answer(
            publish,
            &self.client,
            &self.topics,
            self.ha(),
            &self.ingress,
            &self.running,
        );
    }

    /// The Home Assistant topics, where discovery is on.
    fn ha(&self) -> Option<&HaTopics> {
        match &self.ha {
            Some((ha, true)) => Some(ha),
            _ => None,
        }
    }

    /// Publishes `offline`, disconnects, and polls until the broker has everything.
    async fn finish(mut self) {
        let offline = status_json(self.ingress.scheduler(), false);
        let client = self.client.clone();
        let status = self.topics.status.clone();
        let running = self.running.clone();
        let (ingress, topics) = (self.ingress.clone(), self.topics.clone());
        let ha = self.ha().cloned();
        let flush = async {
            // Wait for the streams still running (the scheduler's drain ends them).
            let deadline = Instant::now() + FLUSH_TIMEOUT * 6;
            let drained = async {
                while !running.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = client
                    .publish(status, QoS::AtLeastOnce, true, offline)
                    .await;
                let _ = client.disconnect().await;
            };
            tokio::pin!(drained);
            let mut drained_done = false;
            loop {
                tokio::select! {
                    _ = &mut drained, if !drained_done => drained_done = true,
                    polled = self.eventloop.poll() => match polled {
                        Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        // The broker has been told it was delivered: it is answered
                        // (`shutting_down`, or a cancel carried out), never dropped.
                        Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                            answer(publish, &client, &topics, ha.as_ref(), &ingress, &running)
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    },
                }
            }
        };
        if tokio::time::timeout(FLUSH_TIMEOUT * 7, flush)
            .await
            .is_err()
        {
            log::warn!("mqtt: the broker did not acknowledge the last messages in time");
        }
    }
}

/// Hands a received message to the ingress, with where its events go.
fn answer(
    publish: Publish,
    client: &AsyncClient,
    topics: &Topics,
    ha: Option<&HaTopics>,
    ingress: &Ingress,
    running: &Scope,
) {
    let topic = String::from_utf8_lossy(&publish.topic);
    if let Some(ha) = ha {
        if topic == ha.ha_status {
            // Home Assistant (re)started: it forgets devices that are not announced again.
            if publish.payload.as_ref() == b"online" {
                let client = client.clone();
                let (topic, payload) = (ha.config.clone(), ha.announcement.clone());
                tokio::spawn(async move { publish_discovery(&client, topic, payload).await });
            }
            return;
        }
    }
    let intent = if topic == topics.cancel {
        Intent::Cancel
    } else {
        Intent::Any
    };
    let origin = Origin {
        transport: "mqtt",
        scope: running,
        intent,
    };
    if let Some(ha) = ha.filter(|ha| topic == ha.prompt) {
        ingress.handle_request(
            HaTopics::request(&publish.payload),
            Instant::now(),
            origin,
            |_| ha.reply(client),
        );
        return;
    }
    // Replies go to the Response Topic (MQTT 5) with its Correlation Data; else to the
    // request's `reply_to`; else to the response topic of its id; else, for a message
    // whose id is unknown, to the device's errors topic.
    let properties = publish.properties.unwrap_or_default();
    let route = |route: Route| {
        let to = match (properties.response_topic, route.reply_to) {
            (Some(topic), _) => ReplyTo {
                topic,
                correlation: properties.correlation_data,
            },
            (None, Some(topic)) => ReplyTo {
                topic,
                correlation: None,
            },
            (None, None) if route.id.is_empty() => ReplyTo {
                topic: topics.errors(),
                correlation: None,
            },
            (None, None) => ReplyTo {
                topic: topics.default_response(&route.id),
                correlation: None,
            },
        };
        MqttReply {
            client: client.clone(),
            to,
        }
    };
    ingress.handle(&publish.payload, origin, route);
}

/// Publishes the Home Assistant device-discovery message (empty: the device removed).
async fn publish_discovery(client: &AsyncClient, topic: String, payload: Vec<u8>) {
    if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, payload).await {
        log::warn!("mqtt: publishing the Home Assistant discovery failed: {e}");
    }
}

/// Publishes one event; false when it cannot be handed to the client (its event loop is gone).
async fn publish_event(client: &AsyncClient, to: &ReplyTo, event: &Event) -> bool {
    let properties = PublishProperties {
        correlation_data: to.correlation.clone(),
        content_type: Some("application/json".into()),
        payload_format_indicator: Some(1),
        ..PublishProperties::default()
    };
    if let Err(e) = client
        .publish_with_properties(
            to.topic.clone(),
            QoS::AtLeastOnce,
            false,
            event.to_json(),
            properties,
        )
        .await
    {
        log::warn!("mqtt: publishing to {} failed: {e}", to.topic);
        return false;
    }
    true
}
