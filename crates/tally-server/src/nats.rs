//! The event stream: an optional sink that publishes every event to NATS JetStream, on
//! a subject per event type (`<prefix>.<type>`), resuming after the last event it
//! published. Each message carries `Nats-Msg-Id: evt_<id>`, so a publish repeated after
//! a crash (between the server's acknowledgment and the saved cursor) is dropped by
//! JetStream's duplicate window rather than delivered twice.

use crate::webhooks::Webhooks;
use std::sync::Arc;
use std::time::Duration;

/// Events published per round.
const EVENTS_PER_ROUND: u32 = 500;
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct NatsConfig {
    pub url: String,
    /// The JetStream stream, created if missing.
    pub stream: String,
    /// Subjects are `<prefix>.<event type>`.
    pub subject_prefix: String,
}

impl NatsConfig {
    fn sink_name(&self) -> String {
        format!("nats:{}:{}", self.stream, self.subject_prefix)
    }
}

async fn connect(config: &NatsConfig) -> Result<async_nats::jetstream::Context, String> {
    let client = async_nats::connect(&config.url).await.map_err(|e| format!("connecting to {}: {e}", config.url))?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{}.>", config.subject_prefix)],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating stream {}: {e}", config.stream))?;
    Ok(jetstream)
}

/// Publishes the next events; returns how many.
async fn publish_some(
    jetstream: &async_nats::jetstream::Context,
    webhooks: &Arc<Webhooks>,
    config: &NatsConfig,
) -> Result<usize, String> {
    let (cursor, events) = {
        let store = webhooks.store.lock().expect("webhook store lock");
        let cursor = store.sink_cursor(&config.sink_name()).map_err(|e| e.to_string())?;
        (cursor, store.events_after(cursor, EVENTS_PER_ROUND).map_err(|e| e.to_string())?)
    };
    let mut last = cursor;
    for (id, kind, body) in &events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("evt_{id}").as_str());
        let subject = format!("{}.{kind}", config.subject_prefix);
        let ack = jetstream
            .publish_with_headers(subject, headers, bytes::Bytes::from(body.clone()))
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())?;
        last = *id;
    }
    if last != cursor {
        let store = webhooks.store.lock().expect("webhook store lock");
        store.set_sink_cursor(&config.sink_name(), last).map_err(|e| e.to_string())?;
    }
    Ok(events.len())
}

/// Starts the sink; it reconnects with backoff and runs until aborted.
pub fn spawn(webhooks: Arc<Webhooks>, config: NatsConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            let jetstream = match connect(&config).await {
                Ok(jetstream) => jetstream,
                Err(error) => {
                    tracing::warn!(%error, "event stream unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            loop {
                match publish_some(&jetstream, &webhooks, &config).await {
                    Ok(0) => tokio::time::sleep(POLL_INTERVAL).await,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "publishing events failed; reconnecting");
                        tokio::time::sleep(backoff).await;
                        break;
                    }
                }
            }
        }
    })
}
