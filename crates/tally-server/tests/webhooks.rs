//! Events and webhooks over HTTP: events for every change and none for a refusal,
//! ownership, signed at-least-once delivery with retries, redelivery, delivery across a
//! restart, and refused destinations.

mod common;

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use common::{Server, WebhookConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A local receiver that answers `failures` requests with 500 before answering 200;
/// it keeps every request's signature header and body.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<(String, String)>>>,
    failures: Arc<Mutex<u32>>,
}

impl Receiver {
    async fn start(failures: u32, status: u16) -> (Receiver, String) {
        let receiver = Receiver { failures: Arc::new(Mutex::new(failures)), ..Receiver::default() };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let state = state.clone();
                async move {
                    let signature =
                        headers.get("tally-signature").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    state.seen.lock().unwrap().push((signature, body));
                    let mut failures = state.failures.lock().unwrap();
                    if *failures > 0 {
                        *failures -= 1;
                        return (AxumStatus::INTERNAL_SERVER_ERROR, "not now".to_string());
                    }
                    (AxumStatus::from_u16(status).unwrap(), "ok".to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    fn bodies(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_make_events_refusals_make_none_and_organizations_see_their_own() {
    let server = Server::start().await;
    let (org, wallet, key) = server.organization("Acme").await;
    let (_, other_wallet, other_key) = server.organization("Other").await;
    server.credit(&wallet, "10.00", "c1").await;
    // A refused debit: no event.
    let (status, _) = server
        .post(
            &format!("/v1/wallets/{wallet}/adjustments"),
            &server.admin,
            Some("d1"),
            json!({"direction": "debit", "amount": "80.00", "currency": "USD", "reason": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, hold) = server
        .post(
            &format!("/v1/wallets/{wallet}/holds"),
            &key,
            Some("h1"),
            json!({"amount": "2.00", "currency": "USD", "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    let hold = hold["id"].as_str().unwrap();
    server.post(&format!("/v1/holds/{hold}/release"), &key, Some("r1"), json!({})).await;
    let (_, events) = server.get("/v1/events?limit=100", &key).await;
    let kinds: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec!["organization.created", "wallet.created", "operation.created", "hold.placed", "hold.released"]
    );
    assert!(events["data"].as_array().unwrap().iter().all(|e| e["organization"] == org.as_str()));
    let operation = &events["data"][2];
    assert_eq!(operation["data"]["legs"][0]["amount"], "10.00");
    // The other organization sees only its own two events.
    let (_, theirs) = server.get("/v1/events", &other_key).await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 2);
    assert_eq!(theirs["data"][1]["object_id"], other_wallet.as_str());
    // Filters and the cursor.
    let (_, holds) = server.get(&format!("/v1/events?type=hold.placed,hold.released&object={hold}"), &key).await;
    assert_eq!(holds["data"].as_array().unwrap().len(), 2);
    let first = events["data"][1]["id"].as_str().unwrap();
    let (_, after) = server.get(&format!("/v1/events?after={first}&limit=2"), &key).await;
    assert_eq!(after["data"][0]["type"], "operation.created");
    assert_eq!(after["next_cursor"], after["data"][1]["id"]);
    let (status, problem) = server.get("/v1/events?type=nope", &key).await;
    assert_eq!((status, problem["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "invalid_request"));
    // The platform sees everyone's.
    let (_, all) = server.get("/v1/events?limit=100", &server.admin).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 7);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_until_accepted_and_redeliverable() {
    let server = Server::start().await;
    let (receiver, url) = Receiver::start(2, 200).await;
    let (_, wallet, key) = server.organization("Acme").await;
    let (status, endpoint) = server
        .post("/v1/webhook-endpoints", &key, None, json!({"url": url, "event_types": ["operation.created"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{endpoint}");
    let secret = endpoint["secret"].as_str().unwrap().to_string();
    let id = endpoint["id"].as_str().unwrap().to_string();
    server.credit(&wallet, "5.00", "c1").await;
    // Two failures, then success: three requests for the one event, and no more.
    wait_until(|| receiver.bodies().len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = receiver.bodies();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    for (signature, body) in &seen {
        assert_eq!(tally_server::webhooks::verify(&secret, signature, body.as_bytes(), now, 300), Ok(()));
        let event: Value = serde_json::from_str(body).unwrap();
        assert_eq!(event["type"], "operation.created");
        assert_eq!(event["data"]["legs"][0]["amount"], "5.00");
    }
    assert!(seen.iter().all(|(_, body)| *body == seen[0].1), "every attempt sends the same event");
    // The attempts are kept and listed.
    let (_, deliveries) = server.get(&format!("/v1/webhook-endpoints/{id}/deliveries"), &key).await;
    let delivery = &deliveries["data"][0];
    assert_eq!(delivery["status"], "delivered");
    let statuses: Vec<u64> =
        delivery["attempts"].as_array().unwrap().iter().map(|a| a["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![500, 500, 200]);
    // Manual redelivery sends it once more.
    let delivery_id = delivery["id"].as_str().unwrap();
    let (status, _) =
        server.post(&format!("/v1/webhook-deliveries/{delivery_id}/redeliver"), &key, None, json!({})).await;
    assert_eq!(status, StatusCode::OK);
    wait_until(|| receiver.bodies().len() >= 4).await;
    // Another organization cannot see or touch the endpoint.
    let (_, _, stranger) = server.organization("Stranger").await;
    let (status, _) = server.get(&format!("/v1/webhook-endpoints/{id}"), &stranger).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        server.post(&format!("/v1/webhook-deliveries/{delivery_id}/redeliver"), &stranger, None, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A rotated secret: both sign during the overlap.
    let (_, rotated) = server.post(&format!("/v1/webhook-endpoints/{id}/rotate-secret"), &key, None, json!({})).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    server.credit(&wallet, "1.00", "c2").await;
    wait_until(|| receiver.bodies().len() >= 5).await;
    let (signature, body) = receiver.bodies()[4].clone();
    assert_eq!(tally_server::webhooks::verify(&new_secret, &signature, body.as_bytes(), now, 300), Ok(()));
    assert_eq!(tally_server::webhooks::verify(&secret, &signature, body.as_bytes(), now, 300), Ok(()));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waits_through_a_restart_for_a_receiver_that_was_down() {
    let server = Server::start().await;
    // The receiver fails everything at first: it is "down".
    let (receiver, url) = Receiver::start(u32::MAX, 200).await;
    let (_, wallet, key) = server.organization("Acme").await;
    server.post("/v1/webhook-endpoints", &key, None, json!({"url": url, "event_types": ["*"]})).await;
    server.credit(&wallet, "5.00", "c1").await;
    wait_until(|| receiver.bodies().iter().any(|(_, b)| b.contains("operation.created"))).await;
    let directory = server.stop_keeping_data().await;
    *receiver.failures.lock().unwrap() = 0;
    let server = Server::start_in(directory, true).await;
    // After the restart the pending delivery is retried and accepted.
    wait_until(|| {
        receiver.bodies().len() >= 2
            && receiver.bodies().iter().filter(|(_, b)| b.contains("operation.created")).count() >= 2
    })
    .await;
    let (_, endpoints) = server.get("/v1/webhook-endpoints", &key).await;
    let id = endpoints["data"][0]["id"].as_str().unwrap();
    let (_, deliveries) = server.get(&format!("/v1/webhook-endpoints/{id}/deliveries"), &key).await;
    let delivered = deliveries["data"].as_array().unwrap().iter().filter(|d| d["status"] == "delivered").count();
    assert!(delivered >= 1, "{deliveries}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_destinations_other_schemes_and_redirects_are_refused() {
    let server = Server::start_with(false).await;
    let (_, _, key) = server.organization("Acme").await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "ftp://example.com/",
        "file:///etc/passwd",
        "http://localhost:9/",
    ] {
        let (status, problem) =
            server.post("/v1/webhook-endpoints", &key, None, json!({"url": url, "event_types": ["*"]})).await;
        assert_eq!(
            (status, problem["code"].as_str().unwrap_or("")),
            (StatusCode::BAD_REQUEST, "invalid_url"),
            "{url}: {problem}"
        );
    }
    let (status, problem) = server
        .post("/v1/webhook-endpoints", &key, None, json!({"url": "https://example.com/hook", "event_types": ["nope"]}))
        .await;
    assert_eq!((status, problem["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "invalid_request"));
    server.stop().await;
    // A redirect is an answer, not a place to go: the attempt fails with its status.
    let server = Server::start().await;
    let (receiver, url) = Receiver::start(0, 302).await;
    let (_, wallet, key) = server.organization("Acme").await;
    let (_, endpoint) = server
        .post("/v1/webhook-endpoints", &key, None, json!({"url": url, "event_types": ["operation.created"]}))
        .await;
    server.credit(&wallet, "5.00", "c1").await;
    wait_until(|| !receiver.bodies().is_empty()).await;
    let id = endpoint["id"].as_str().unwrap();
    let mut attempt = Value::Null;
    for _ in 0..100 {
        let (_, deliveries) = server.get(&format!("/v1/webhook-endpoints/{id}/deliveries"), &key).await;
        attempt = deliveries["data"][0]["attempts"][0].clone();
        if !attempt.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(attempt["status"], 302, "{attempt}");
    assert_eq!(attempt["error"], "answered 302");
    server.stop().await;
}

/// The value of one sample line of the exposition, if present.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let server = Server::start().await;
    let (_, wallet, _) = server.organization("Acme").await;
    server.organization("Other").await;
    server.credit(&wallet, "5.00", "c1").await;
    let (status, _) = server
        .post(
            &format!("/v1/wallets/{wallet}/adjustments"),
            &server.admin,
            Some("d1"),
            json!({"direction": "debit", "amount": "80.00", "currency": "USD", "reason": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let response = server.client.get(format!("{}/metrics", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(response.headers().contains_key("x-request-id"));
    let text = response.text().await.unwrap();
    // Every line is a comment or `name{labels} value`, and the exposition ends with # EOF.
    assert_eq!(text.lines().last(), Some("# EOF"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "bad value: {line}");
        let name: String = series.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        assert!(name.starts_with("tally_"), "bad name: {line}");
        let labels = &series[name.len()..];
        assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "bad labels: {line}");
    }
    assert_eq!(
        sample(&text, r#"tally_http_requests_total{method="POST",route="/v1/organizations",status="201"}"#),
        Some(2.0)
    );
    assert_eq!(sample(&text, r#"tally_engine_commands_total{kind="create_organization"}"#), Some(2.0));
    assert_eq!(sample(&text, r#"tally_engine_rejections_total{code="insufficient_funds"}"#), Some(1.0));
    assert!(sample(&text, "tally_engine_commit_seconds_count").unwrap() >= 1.0, "{text}");
    assert!(sample(&text, "tally_webhook_backlog").is_some(), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_for_the_whole_window_is_disabled_and_the_platform_told() {
    let config =
        WebhookConfig { allow_private: true, retry_first_ms: 100, retry_window_ms: 1_000, ..WebhookConfig::default() };
    let server = Server::start_configured(tempfile::tempdir().unwrap(), config, None).await;
    let (receiver, url) = Receiver::start(u32::MAX, 200).await;
    let (_, wallet, key) = server.organization("Acme").await;
    let (_, endpoint) = server
        .post("/v1/webhook-endpoints", &key, None, json!({"url": url, "event_types": ["operation.created"]}))
        .await;
    let id = endpoint["id"].as_str().unwrap().to_string();
    server.credit(&wallet, "5.00", "c1").await;
    let mut disabled = Value::Null;
    for _ in 0..100 {
        let (_, current) = server.get(&format!("/v1/webhook-endpoints/{id}"), &key).await;
        if current["enabled"] == false {
            disabled = current;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(disabled["enabled"], false, "the endpoint was never disabled");
    assert!(disabled["disabled_reason"].as_str().unwrap().contains("failed"));
    assert!(receiver.bodies().len() >= 2, "it was retried before giving up");
    let (_, deliveries) = server.get(&format!("/v1/webhook-endpoints/{id}/deliveries"), &key).await;
    assert_eq!(deliveries["data"][0]["status"], "failed");
    // The platform hears of it; the organization's own event list does not carry it.
    let mut notice = Value::Null;
    for _ in 0..50 {
        let (_, events) = server.get("/v1/events?type=webhook_endpoint.disabled", &server.admin).await;
        if let Some(first) = events["data"].as_array().and_then(|a| a.first()) {
            notice = first.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(notice["object_id"], id.as_str(), "{notice}");
    assert_eq!(notice["organization"], Value::Null);
    let (_, theirs) = server.get("/v1/events?type=webhook_endpoint.disabled", &key).await;
    assert_eq!(theirs["data"], json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_receives_its_events_in_order() {
    let server = Server::start().await;
    let (receiver, url) = Receiver::start(0, 200).await;
    let (_, wallet, key) = server.organization("Acme").await;
    server.post("/v1/webhook-endpoints", &key, None, json!({"url": url, "event_types": ["operation.created"]})).await;
    for i in 0..20 {
        server.credit(&wallet, "1.00", &format!("c{i}")).await;
    }
    wait_until(|| receiver.bodies().len() >= 20).await;
    let ids: Vec<u64> = receiver
        .bodies()
        .iter()
        .map(|(_, body)| {
            let event: Value = serde_json::from_str(body).unwrap();
            event["id"].as_str().unwrap().trim_start_matches("evt_").parse().unwrap()
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "delivered out of order or twice");
    assert_eq!(ids.len(), 20);
    server.stop().await;
}
