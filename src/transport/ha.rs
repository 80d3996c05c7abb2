//! Home Assistant MQTT discovery: one retained device-discovery message on
//! `{discovery_prefix}/device/{device_id}/config` that makes emberd a device in Home Assistant,
//! with a text entity to send a prompt, a sensor with the last reply, an event entity for
//! done/error, and sensors read from the retained status (queue depth, served requests, decode
//! tokens/s). Its availability is the status topic, whose Last Will says `offline`.
//!
//! The prompt entity publishes plain text on `{prefix}/{device}/ha/prompt`; the answer goes to
//! `{prefix}/{device}/ha/reply` (state: the first 255 characters, Home Assistant's limit), its
//! attributes (the whole text, usage, timings) and the event topic.

use std::future::Future;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::{json, Value};

use crate::config::MqttConfig;
use crate::ingress::Reply;
use crate::protocol::{Event, Request};

/// Home Assistant keeps a sensor's state to this many characters.
const STATE_MAX_CHARS: usize = 255;

#[derive(Debug, Clone)]
pub struct HaTopics {
    /// The retained device-discovery message.
    pub config: String,
    /// Home Assistant's birth message (`online`): discovery is published again on it.
    pub ha_status: String,
    pub prompt: String,
    reply: String,
    attributes: String,
    event: String,
    /// The device-discovery message (`discovery`), made once: nothing in it changes while
    /// emberd runs.
    pub announcement: Vec<u8>,
}

impl HaTopics {
    pub fn new(config: &MqttConfig, status_topic: &str, model: &str) -> Self {
        let base = format!("{}/{}/ha", config.prefix, config.device_id);
        let mut topics = HaTopics {
            config: format!(
                "{}/device/{}/config",
                config.discovery_prefix, config.device_id
            ),
            ha_status: format!("{}/status", config.discovery_prefix),
            prompt: format!("{base}/prompt"),
            reply: format!("{base}/reply"),
            attributes: format!("{base}/reply/attributes"),
            event: format!("{base}/event"),
            announcement: Vec::new(),
        };
        topics.announcement = topics.discovery(config, status_topic, model);
        topics
    }

    /// The device-discovery message: the device, the origin, and the components.
    fn discovery(&self, config: &MqttConfig, status_topic: &str, model: &str) -> Vec<u8> {
        let id = &config.device_id;
        let version = env!("CARGO_PKG_VERSION");
        let from_status = |key: &str, name: &str, extra: Value| {
            let mut c = json!({
                "p": "sensor",
                "name": name,
                "unique_id": format!("{id}_{key}"),
                "state_topic": status_topic,
                "value_template": format!("{{{{ value_json.{key} }}}}"),
            });
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            c
        };
        json!({
            "device": {
                "identifiers": [format!("emberd_{id}")],
                "name": format!("emberd {id}"),
                "manufacturer": "emberd",
                "model": model,
                "sw_version": version,
            },
            "origin": {"name": "emberd", "sw_version": version},
            "availability_topic": status_topic,
            "availability_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "components": {
                "prompt": {
                    "p": "text",
                    "name": "Prompt",
                    "unique_id": format!("{id}_prompt"),
                    "command_topic": self.prompt,
                    "max": STATE_MAX_CHARS,
                },
                "reply": {
                    "p": "sensor",
                    "name": "Last reply",
                    "unique_id": format!("{id}_reply"),
                    "state_topic": self.reply,
                    "json_attributes_topic": self.attributes,
                },
                "result": {
                    "p": "event",
                    "name": "Result",
                    "unique_id": format!("{id}_result"),
                    "state_topic": self.event,
                    "event_types": ["done", "error"],
                },
                "queue_depth": from_status("queue_depth", "Queue depth",
                    json!({"state_class": "measurement"})),
                "served": from_status("served", "Served requests",
                    json!({"state_class": "total_increasing"})),
                "decode_tokens_per_s": from_status("decode_tokens_per_s", "Decode speed",
                    json!({"state_class": "measurement", "unit_of_measurement": "tokens/s"})),
            },
        })
        .to_string()
        .into_bytes()
    }

    /// A prompt from the text entity: plain text, answered whole.
    pub fn request(payload: &[u8]) -> Request {
        Request {
            prompt: Some(String::from_utf8_lossy(payload).into_owned()),
            stream: Some(false),
            ..Default::default()
        }
    }

    pub fn reply(&self, client: &AsyncClient) -> HaReply {
        HaReply {
            client: client.clone(),
            topics: self.clone(),
        }
    }
}

/// Where the answer to a text-entity prompt goes: the reply sensor, its attributes, the event.
pub struct HaReply {
    client: AsyncClient,
    topics: HaTopics,
}

impl Reply for HaReply {
    fn deliver(&self, event: Event) -> impl Future<Output = bool> + Send + 'static {
        let client = self.client.clone();
        let topics = self.topics.clone();
        async move {
            let mut out = Vec::new();
            match &event {
                Event::Token { .. } => return true,
                Event::Done {
                    text,
                    finish_reason,
                    usage,
                    timings,
                    ..
                } => {
                    let text = text.clone().unwrap_or_default();
                    let state: String = text.chars().take(STATE_MAX_CHARS).collect();
                    out.push((topics.reply, state.into_bytes(), true));
                    let attributes = json!({
                        "text": text, "finish_reason": finish_reason,
                        "usage": usage, "timings": timings,
                    });
                    out.push((topics.attributes, attributes.to_string().into_bytes(), true));
                    let done = json!({"event_type": "done", "finish_reason": finish_reason});
                    out.push((topics.event, done.to_string().into_bytes(), false));
                }
                Event::Error { code, message, .. } => {
                    let error = json!({"event_type": "error", "code": code, "message": message});
                    out.push((topics.event, error.to_string().into_bytes(), false));
                }
            }
            for (topic, payload, retain) in out {
                if let Err(e) = client
                    .publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
                    .await
                {
                    log::warn!("mqtt: publishing to {topic} failed: {e}");
                    return false;
                }
            }
            true
        }
    }
}
