//! The NATS JetStream event sink: every event published once, across a restart.
//! Needs NATS with JetStream at TALLY_TEST_NATS_URL; outside CI it skips (saying so)
//! when that is unset, under CI=true it must run.

mod common;

use common::{Server, WebhookConfig};

fn test_webhooks() -> WebhookConfig {
    WebhookConfig { allow_private: true, ..WebhookConfig::default() }
}
use std::time::Duration;
use tally_server::nats::NatsConfig;

fn nats_url() -> Option<String> {
    match std::env::var("TALLY_TEST_NATS_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true: set TALLY_TEST_NATS_URL (NATS with JetStream) so the event stream test runs")
        }
        Err(_) => {
            eprintln!(
                "SKIPPED: the NATS event stream test needs TALLY_TEST_NATS_URL (for example nats://127.0.0.1:4222)"
            );
            None
        }
    }
}

async fn stream_messages(jetstream: &async_nats::jetstream::Context, name: &str) -> u64 {
    let mut stream = jetstream.get_stream(name).await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_published_once_across_a_restart() {
    let Some(url) = nats_url() else { return };
    let unique = format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let config = NatsConfig {
        url: url.clone(),
        stream: format!("TALLY_TEST_{unique}"),
        subject_prefix: format!("tally-test-{unique}"),
    };
    let client = async_nats::connect(&url).await.expect("NATS is reachable");
    let jetstream = async_nats::jetstream::new(client);
    let server = Server::start_configured(tempfile::tempdir().unwrap(), test_webhooks(), Some(config.clone())).await;
    let (_, wallet, key) = server.organization("Acme").await;
    server.credit(&wallet, "5.00", "c1").await;
    let (_, events) = server.get("/v1/events?limit=500", &server.admin).await;
    let expected = events["data"].as_array().unwrap().len() as u64;
    assert_eq!(expected, 3, "{events}");
    let mut published = 0;
    for _ in 0..100 {
        if jetstream.get_stream(&config.stream).await.is_ok() {
            published = stream_messages(&jetstream, &config.stream).await;
            if published >= expected {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(published, expected);
    // One message per event type subject, carrying the event.
    let message = jetstream
        .get_stream(&config.stream)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&format!("{}.operation.created", config.subject_prefix))
        .await
        .expect("the operation event was published");
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(body["data"]["legs"][0]["amount"], "5.00");
    // Restart: nothing is published again, and new events follow.
    let directory = server.stop_keeping_data().await;
    let server = Server::start_configured(directory, test_webhooks(), Some(config.clone())).await;
    server.credit(&wallet, "1.00", "c2").await;
    let _ = key;
    for _ in 0..100 {
        published = stream_messages(&jetstream, &config.stream).await;
        if published > expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stream_messages(&jetstream, &config.stream).await, expected + 1);
    jetstream.delete_stream(&config.stream).await.unwrap();
    server.stop().await;
}
