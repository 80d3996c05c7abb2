//! The client side of emberd's two APIs, for `emberd ask`: sends one request over the Unix
//! socket or over MQTT, hands each event to the caller as it arrives, turns Ctrl-C into a
//! cancel, and times the stream as the client sees it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent, MqttOptions};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::protocol::{Event, Request};

/// How long the MQTT client waits for the broker to take its subscription.
const MQTT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path} (is emberd serve running?): {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connection to emberd: {0}")]
    Io(#[from] std::io::Error),
    #[error("emberd closed the connection before the request ended")]
    Closed,
    #[error("unexpected reply from emberd: {0}")]
    BadEvent(String),
    #[error("mqtt: {0}")]
    Mqtt(String),
}

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Socket(PathBuf),
    Mqtt {
        host: String,
        port: u16,
        prefix: String,
        device: String,
    },
}

/// The stream as the client saw it: time to the first token and decode speed measured on
/// arrival, next to the daemon's own figures in the `done` event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientTimings {
    pub token_events: usize,
    pub ttft_ms: f64,
    /// Generated tokens after the first, over the time from the first token event to `done`.
    pub decode_tokens_per_s: f64,
    pub total_ms: f64,
}

/// Sends `request` (its `id` must be set) and calls `on_event` for each of its events up to
/// and including the terminal one, which is returned with the client's timings.
pub async fn ask(
    endpoint: &Endpoint,
    request: &Request,
    mut on_event: impl FnMut(&Event),
) -> Result<(Event, ClientTimings), ClientError> {
    let id = request.id.clone().unwrap_or_default();
    let cancel = serde_json::json!({"type": "cancel", "id": id}).to_string();
    let started = Instant::now();
    let (mut events, canceller) = match endpoint {
        Endpoint::Socket(path) => socket_stream(path, request).await?,
        Endpoint::Mqtt {
            host,
            port,
            prefix,
            device,
        } => mqtt_stream(host, *port, prefix, device, request).await?,
    };
    let mut cancelled = false;
    let mut first_token_at = None;
    let mut token_events = 0;
    loop {
        let event = tokio::select! {
            event = events.recv() => event.ok_or(ClientError::Closed)??,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                canceller.send(cancel.clone()).await.map_err(|_| ClientError::Closed)?;
                continue;
            }
        };
        on_event(&event);
        match &event {
            Event::Token { .. } => {
                token_events += 1;
                first_token_at.get_or_insert_with(Instant::now);
            }
            Event::Done { usage, .. } => {
                let end = Instant::now();
                let first = first_token_at.unwrap_or(end);
                let decode_s = (end - first).as_secs_f64();
                let after_first = usage.completion_tokens.saturating_sub(1) as f64;
                let timings = ClientTimings {
                    token_events,
                    ttft_ms: (first - started).as_secs_f64() * 1e3,
                    decode_tokens_per_s: if decode_s > 0.0 {
                        after_first / decode_s
                    } else {
                        0.0
                    },
                    total_ms: (end - started).as_secs_f64() * 1e3,
                };
                return Ok((event, timings));
            }
            Event::Error { .. } => return Ok((event, ClientTimings::default())),
        }
    }
}

type EventStream = mpsc::Receiver<Result<Event, ClientError>>;
/// Lines to send to the daemon after the request (the cancel message).
type Canceller = mpsc::Sender<String>;

fn parse_event(bytes: &[u8]) -> Result<Event, ClientError> {
    serde_json::from_slice(bytes)
        .map_err(|_| ClientError::BadEvent(String::from_utf8_lossy(bytes).into_owned()))
}

async fn socket_stream(
    path: &std::path::Path,
    request: &Request,
) -> Result<(EventStream, Canceller), ClientError> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (reader, mut writer) = stream.into_split();
    let line = serde_json::to_string(request).expect("a request serializes") + "\n";
    writer.write_all(line.as_bytes()).await?;
    let (events_tx, events) = mpsc::channel(64);
    let (cancel_tx, mut cancel_rx) = mpsc::channel::<String>(1);
    tokio::spawn(async move {
        while let Some(line) = cancel_rx.recv().await {
            if writer.write_all((line + "\n").as_bytes()).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        loop {
            let event = match lines.next_line().await {
                Ok(Some(line)) => parse_event(line.as_bytes()),
                Ok(None) => return,
                Err(e) => Err(e.into()),
            };
            if events_tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok((events, cancel_tx))
}

/// MQTT 5 request/response: the reply comes to a topic of this client's own, named in the
/// request's Response Topic.
async fn mqtt_stream(
    host: &str,
    port: u16,
    prefix: &str,
    device: &str,
    request: &Request,
) -> Result<(EventStream, Canceller), ClientError> {
    let client_id = format!("emberd-ask-{}", std::process::id());
    let reply_topic = format!("{prefix}/{device}/ask/{client_id}");
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(reply_topic.clone(), QoS::AtLeastOnce)
        .await
        .map_err(|e| ClientError::Mqtt(e.to_string()))?;
    // Publish only once the subscription holds, or the first events could be missed.
    let subscribed = tokio::time::timeout(MQTT_CONNECT_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(ClientError::Mqtt(format!("{host}:{port}: {e}"))),
            }
        }
    })
    .await;
    match subscribed {
        Ok(result) => result?,
        Err(_) => {
            return Err(ClientError::Mqtt(format!(
                "{host}:{port}: no answer within {MQTT_CONNECT_TIMEOUT:?}"
            )))
        }
    }
    let properties = PublishProperties {
        response_topic: Some(reply_topic.clone()),
        correlation_data: request.id.clone().map(Bytes::from),
        ..Default::default()
    };
    let payload = serde_json::to_vec(request).expect("a request serializes");
    client
        .publish_with_properties(
            format!("{prefix}/{device}/request"),
            QoS::AtLeastOnce,
            false,
            payload,
            properties,
        )
        .await
        .map_err(|e| ClientError::Mqtt(e.to_string()))?;
    let (events_tx, events) = mpsc::channel(64);
    let (cancel_tx, mut cancel_rx) = mpsc::channel::<String>(1);
    let cancel_topic = format!("{prefix}/{device}/cancel");
    let canceller = client.clone();
    tokio::spawn(async move {
        while let Some(line) = cancel_rx.recv().await {
            let _ = canceller
                .publish(cancel_topic.clone(), QoS::AtLeastOnce, false, line)
                .await;
        }
    });
    tokio::spawn(async move {
        // The client lives as long as this task polls its event loop.
        let _client = client;
        loop {
            let event = match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) if p.topic == reply_topic => {
                    parse_event(&p.payload)
                }
                Ok(_) => continue,
                Err(e) => Err(ClientError::Mqtt(e.to_string())),
            };
            let failed = event.is_err();
            if events_tx.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    Ok((events, cancel_tx))
}
