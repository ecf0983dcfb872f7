//! Tally paying through the Stripe adapter (against the fake Stripe), with a payment
//! confirmed later by a signed webhook: stale, duplicate and out-of-order webhooks
//! change nothing twice, and a badly signed one is refused.

mod common;

use common::fake_stripe::*;
use common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tally_server::payments::stripe::{sign_webhook, Stripe};

const WEBHOOK_SECRET: &str = "whsec_test";

async fn deliver(server: &Server, event: &Value, secret: &str) -> (StatusCode, Value) {
    let body = serde_json::to_vec(event).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let response = server
        .client
        .post(format!("{}/v1/provider-webhooks/stripe", server.base))
        .header("Stripe-Signature", sign_webhook(&body, secret, now))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn event(id: &str, kind: &str, intent: &Value) -> Value {
    json!({"id": id, "object": "event", "type": kind, "data": {"object": intent}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_confirms_a_top_up_once_whatever_the_order_and_repeats() {
    let (fake, base) = FakeStripe::start().await;
    let server = Server::start_with_provider(Arc::new(Stripe::new(base, SECRET_KEY)), WEBHOOK_SECRET).await;
    let (status, org) = server.post("/v1/organizations", &server.admin, None, json!({"name": "Acme"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let org = org["id"].as_str().unwrap().to_string();
    let billing = json!({"legal_name": "Acme", "email": "a@example.com", "country": "US", "region": "CA"});
    server.call("PUT", &format!("/v1/organizations/{org}/billing-details"), &server.admin, None, Some(billing)).await;
    let (_, wallet) =
        server.post(&format!("/v1/organizations/{org}/wallets"), &server.admin, None, json!({"currency": "USD"})).await;
    let wallet = wallet["id"].as_str().unwrap().to_string();
    let (status, method) = server
        .post(
            &format!("/v1/organizations/{org}/payment-methods"),
            &server.admin,
            None,
            json!({"token": "pm_card_threeds"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{method}");
    assert_eq!(method["last4"], "3220");
    let body = json!({"amount": "20.00", "payment_method": method["id"]});
    let (status, top_up) = server.post(&format!("/v1/wallets/{wallet}/top-ups"), &server.admin, Some("t1"), body).await;
    assert_eq!((status, top_up["status"].as_str()), (StatusCode::CREATED, Some("pending")), "{top_up}");
    let id = top_up["id"].as_str().unwrap().to_string();

    // A badly signed webhook is refused.
    let stale = event("evt_1", "payment_intent.requires_action", &json!({"metadata": {"tally_id": id}}));
    let (status, body) = deliver(&server, &stale, "whsec_wrong").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_signature")), "{body}");
    // An event that arrives before the payment is confirmed: Tally asks, finds it not
    // yet capturable, and waits.
    assert_eq!(deliver(&server, &stale, WEBHOOK_SECRET).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.get(&format!("/v1/top-ups/{id}"), &server.admin).await.1["status"], "pending");
    assert_eq!(server.wallet(&wallet).await["balance"], "0.00");

    // The customer completes the payment; the webhook says so, twice, then the stale
    // one arrives again, out of order.
    let intent = fake.confirm(&id);
    let capturable = event("evt_2", "payment_intent.amount_capturable_updated", &intent);
    for event in [&capturable, &capturable, &stale] {
        assert_eq!(deliver(&server, event, WEBHOOK_SECRET).await.0, StatusCode::OK);
    }
    let mut settled = Value::Null;
    for _ in 0..100 {
        let (_, top_up) = server.get(&format!("/v1/top-ups/{id}"), &server.admin).await;
        if top_up["status"] == "succeeded" {
            settled = top_up;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(settled["status"], "succeeded", "the webhook settled the top-up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deliver(&server, &capturable, WEBHOOK_SECRET).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.wallet(&wallet).await["balance"], "20.00", "credited once");
    let intent_id = intent["id"].as_str().unwrap();
    assert_eq!(fake.posts_to(&format!("/v1/payment_intents/{intent_id}/capture")).len(), 1, "captured once");
    assert_eq!(fake.intent_count(), 1);
    server.stop().await;
}
