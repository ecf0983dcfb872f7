//! Payments over HTTP against the sandbox provider: payment methods (card numbers
//! refused), taxed top-ups with receipts, every sandbox outcome, provider outages,
//! slow confirmations, auto top-up, and wallet-first checkouts.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tally_server::payments::provider::PaymentState;

/// An organization with `roles`, a USD wallet, billing details in US-CA and a key.
async fn organization(server: &Server, name: &str, merchant: bool) -> (String, String, String) {
    let roles = json!({"merchant": merchant, "consumer": !merchant});
    let (status, org) =
        server.post("/v1/organizations", &server.admin, None, json!({"name": name, "roles": roles})).await;
    assert_eq!(status, StatusCode::CREATED, "{org}");
    let org = org["id"].as_str().unwrap().to_string();
    let (status, wallet) =
        server.post(&format!("/v1/organizations/{org}/wallets"), &server.admin, None, json!({"currency": "USD"})).await;
    assert_eq!(status, StatusCode::CREATED, "{wallet}");
    let (status, key) = server.post("/v1/api-keys", &server.admin, None, json!({"organization": org})).await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let billing = json!({"legal_name": name, "email": "billing@example.com", "address": "1 Main St",
                         "country": "US", "region": "CA"});
    let (status, body) = server
        .call("PUT", &format!("/v1/organizations/{org}/billing-details"), &server.admin, None, Some(billing))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (org, wallet["id"].as_str().unwrap().to_string(), key["secret"].as_str().unwrap().to_string())
}

async fn add_method(server: &Server, org: &str, key: &str, token: &str) -> String {
    let (status, method) =
        server.post(&format!("/v1/organizations/{org}/payment-methods"), key, None, json!({"token": token})).await;
    assert_eq!(status, StatusCode::CREATED, "{method}");
    method["id"].as_str().unwrap().to_string()
}

async fn request_top_up(
    server: &Server,
    wallet: &str,
    key: &str,
    idempotency: &str,
    amount: &str,
    method: &str,
) -> (StatusCode, Value) {
    server
        .post(
            &format!("/v1/wallets/{wallet}/top-ups"),
            key,
            Some(idempotency),
            json!({"amount": amount, "payment_method": method}),
        )
        .await
}

async fn sales_tax(server: &Server) {
    let profile = json!({"country": "US", "subdivision": "CA", "taxes": [
        {"name": "Sales tax", "rate": "0.05"},
        {"name": "Emergency services surcharge", "fixed_amount": "0.75", "currency": "USD"},
    ]});
    let (status, body) = server.call("PUT", "/v1/tax-profiles", &server.admin, None, Some(profile)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Waits until `path` answers with `field` equal to `value`.
async fn eventually(server: &Server, path: &str, field: &str, value: &str) -> Value {
    for _ in 0..100 {
        let (_, body) = server.get(path, &server.admin).await;
        if body[field] == value {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never had {field} = {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taxed_top_up_credits_the_amount_once_and_has_a_receipt() {
    let server = Server::start().await;
    sales_tax(&server).await;
    let (org, wallet, key) = organization(&server, "Acme", false).await;
    // A card number is never accepted, in any field or shape.
    let (status, body) = server
        .post(
            &format!("/v1/organizations/{org}/payment-methods"),
            &key,
            None,
            json!({"token": "pm_card_visa", "number": "4242 4242 4242 4242"}),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("card_number_not_accepted")), "{body}");
    let method = add_method(&server, &org, &key, "pm_card_visa").await;
    let (_, methods) = server.get(&format!("/v1/organizations/{org}/payment-methods"), &key).await;
    assert_eq!(methods["data"][0]["last4"], "4242");
    assert_eq!(methods["data"][0]["default"], true);
    assert!(!methods.to_string().contains("pm_card_visa"), "the provider token is not shown: {methods}");

    let (status, quote) = server.get(&format!("/v1/wallets/{wallet}/top-up-quote?amount=20.00"), &key).await;
    assert_eq!(status, StatusCode::OK, "{quote}");
    assert_eq!(quote["total"], "21.75");

    let (status, top_up) = request_top_up(&server, &wallet, &key, "t1", "20.00", &method).await;
    assert_eq!(status, StatusCode::CREATED, "{top_up}");
    assert_eq!(top_up["status"], "succeeded", "{top_up}");
    assert_eq!((top_up["amount"].as_str(), top_up["total"].as_str()), (Some("20.00"), Some("21.75")));
    assert_eq!(
        top_up["taxes"],
        json!([{"name": "Sales tax", "amount": "1.00"},
                                       {"name": "Emergency services surcharge", "amount": "0.75"}])
    );
    assert_eq!(server.wallet(&wallet).await["balance"], "20.00");
    // The same request again is the same top-up: nothing charged or credited twice.
    let (status, again) = request_top_up(&server, &wallet, &key, "t1", "20.00", &method).await;
    assert_eq!((status, &again["id"]), (StatusCode::CREATED, &top_up["id"]));
    let (status, body) = request_top_up(&server, &wallet, &key, "t1", "25.00", &method).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_mismatch")));
    assert_eq!(server.wallet(&wallet).await["balance"], "20.00");
    let records = server.sandbox.records();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].payment.state.clone(), records[0].captured_minor), (PaymentState::Captured, 2175));

    let id = top_up["id"].as_str().unwrap();
    let (status, receipt) = server.get(&format!("/v1/top-ups/{id}/receipt"), &key).await;
    assert_eq!(status, StatusCode::OK, "{receipt}");
    assert_eq!(receipt["number"], "R-00000001");
    assert_eq!(receipt["total"], "21.75");
    assert_eq!(receipt["billed_to"]["legal_name"], "Acme");
    assert_eq!(receipt["payment_method"], json!({"brand": "visa", "last4": "4242"}));
    let (status, html) = server.get(&format!("/v1/top-ups/{id}/receipt?format=html"), &key).await;
    assert_eq!(status, StatusCode::OK);
    let html = html.as_str().unwrap();
    assert!(html.contains("R-00000001") && html.contains("21.75 USD") && html.contains("ending in 4242"), "{html}");
    // Another organization sees none of it.
    let (_, _, stranger) = organization(&server, "Stranger", false).await;
    assert_eq!(server.get(&format!("/v1/top-ups/{id}"), &stranger).await.0, StatusCode::NOT_FOUND);
    // The platform's tax payable holds the taxes; events tell the story.
    let (_, events) = server.get(&format!("/v1/events?object={id}"), &server.admin).await;
    let kinds: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| k.starts_with("top_up.")).count(), 2, "{kinds:?}");
    assert!(kinds.contains(&"top_up.created") && kinds.contains(&"top_up.succeeded"), "{kinds:?}");
    let metrics = server.client.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"tally_payments_total{kind="top_up",outcome="succeeded"} 1"#), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_charges_only_the_total_reviewed_and_a_method_is_saved_once() {
    let server = Server::start().await;
    sales_tax(&server).await;
    let (org, wallet, key) = organization(&server, "Acme", false).await;
    let method = add_method(&server, &org, &key, "pm_card_visa").await;
    // Saving the same token again (a retry) gives the same method, not a second one.
    let (status, again) = server
        .post(&format!("/v1/organizations/{org}/payment-methods"), &key, None, json!({"token": "pm_card_visa"}))
        .await;
    assert_eq!((status, again["id"].as_str()), (StatusCode::OK, Some(method.as_str())), "{again}");
    let (_, methods) = server.get(&format!("/v1/organizations/{org}/payment-methods"), &key).await;
    assert_eq!(methods["data"].as_array().unwrap().len(), 1, "{methods}");

    let (_, quote) = server.get(&format!("/v1/wallets/{wallet}/top-up-quote?amount=20.00"), &key).await;
    assert_eq!(quote["total"], "21.75");
    // The platform raises the tax between the quote and the payer's confirmation.
    let profile = json!({"country": "US", "subdivision": "CA", "taxes": [{"name": "Sales tax", "rate": "0.10"}]});
    let (status, body) = server.call("PUT", "/v1/tax-profiles", &server.admin, None, Some(profile)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reviewed = |idempotency: &'static str, total: &'static str| {
        let (server, wallet, key, method) = (&server, &wallet, &key, &method);
        async move {
            server
                .post(
                    &format!("/v1/wallets/{wallet}/top-ups"),
                    key,
                    Some(idempotency),
                    json!({"amount": "20.00", "payment_method": method, "total": total}),
                )
                .await
        }
    };
    let (status, body) = reviewed("r0", "21.755").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("amount_not_in_minor_units")), "{body}");
    let (status, body) = reviewed("r1", "21.75").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("total_changed")), "{body}");
    assert!(server.sandbox.records().is_empty(), "nothing may be charged at a total nobody reviewed");
    assert_eq!(server.wallet(&wallet).await["balance"], "0.00");
    let (status, body) = reviewed("r2", "22.00").await;
    assert_eq!(
        (status, body["status"].as_str(), body["total"].as_str()),
        (StatusCode::CREATED, Some("succeeded"), Some("22.00")),
        "{body}"
    );
    assert_eq!(server.sandbox.records()[0].captured_minor, 2200);
    assert_eq!(server.wallet(&wallet).await["balance"], "20.00");
    // The same key with another reviewed total is another request.
    let (status, body) = reviewed("r2", "23.00").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_mismatch")));
    // Top-ups are listed newest first, in pages.
    for total in ["r3", "r4"] {
        let (status, body) = reviewed(total, "22.00").await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let path = format!("/v1/wallets/{wallet}/top-ups");
    let ids = |page: &Value| -> Vec<String> {
        page["data"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect()
    };
    let (_, all) = server.get(&path, &key).await;
    let all = ids(&all);
    assert_eq!(all.len(), 3, "{all:?}");
    let (_, first) = server.get(&format!("{path}?limit=2"), &key).await;
    assert_eq!((ids(&first), first["next_cursor"].as_str()), (all[..2].to_vec(), Some(all[1].as_str())));
    let (_, rest) = server.get(&format!("{path}?limit=2&before={}", all[1]), &key).await;
    assert_eq!((ids(&rest), rest["next_cursor"].is_null()), (all[2..].to_vec(), true));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sandbox_outcome_and_every_refusal() {
    let server = Server::start().await;
    let (org, wallet, key) = organization(&server, "Acme", false).await;
    for (token, code) in [
        ("pm_card_declined", "card_declined"),
        ("pm_card_insufficient_funds", "insufficient_funds"),
        ("pm_card_expired", "expired_card"),
    ] {
        let method = add_method(&server, &org, &key, token).await;
        let (status, top_up) = request_top_up(&server, &wallet, &key, token, "10.00", &method).await;
        assert_eq!(status, StatusCode::CREATED, "{top_up}");
        assert_eq!((top_up["status"].as_str(), top_up["failure_code"].as_str()), (Some("failed"), Some(code)));
    }
    assert_eq!(server.wallet(&wallet).await["balance"], "0.00", "failed top-ups credit nothing");

    // Slow confirmation: pending at first, credited once the provider confirms.
    let slow = add_method(&server, &org, &key, "pm_card_slow").await;
    let (_, pending) = request_top_up(&server, &wallet, &key, "slow", "7.00", &slow).await;
    assert_eq!(pending["status"], "pending", "{pending}");
    assert_eq!(server.wallet(&wallet).await["balance"], "0.00");
    let id = pending["id"].as_str().unwrap();
    eventually(&server, &format!("/v1/top-ups/{id}"), "status", "succeeded").await;
    assert_eq!(server.wallet(&wallet).await["balance"], "7.00");

    // A provider outage leaves the top-up pending; the worker finishes it later.
    let visa = add_method(&server, &org, &key, "pm_card_visa").await;
    server.sandbox.fail_next(1);
    let (status, pending) = request_top_up(&server, &wallet, &key, "outage", "3.00", &visa).await;
    assert_eq!((status, pending["status"].as_str()), (StatusCode::CREATED, Some("pending")), "{pending}");
    let id = pending["id"].as_str().unwrap();
    eventually(&server, &format!("/v1/top-ups/{id}"), "status", "succeeded").await;
    assert_eq!(server.wallet(&wallet).await["balance"], "10.00");

    // Refusals, each with its code, none moving money.
    let limits = json!({"min_amount": "5.00", "max_amount": "100.00", "presets": ["10.00", "25.00"]});
    let (status, settings) =
        server.call("PUT", &format!("/v1/wallets/{wallet}/top-up-limits"), &server.admin, None, Some(limits)).await;
    assert_eq!(status, StatusCode::OK, "{settings}");
    assert_eq!(settings["presets"], json!(["10.00", "25.00"]));
    for (amount, code) in [
        ("4.00", "amount_below_minimum"),
        ("100.01", "amount_above_maximum"),
        ("10.005", "amount_not_in_minor_units"),
        ("0", "amount_must_be_positive"),
    ] {
        let (status, body) = request_top_up(&server, &wallet, &key, amount, amount, &visa).await;
        assert_eq!(body["code"], code, "{amount}: {status} {body}");
    }
    let (other_org, other_wallet, other_key) = organization(&server, "Other", false).await;
    let (status, body) = request_top_up(&server, &other_wallet, &other_key, "x", "10.00", &visa).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("payment_method_not_found")), "{body}");
    let (status, body) = request_top_up(&server, &wallet, &other_key, "y", "10.00", &visa).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = server
        .post(&format!("/v1/organizations/{other_org}/payment-methods"), &other_key, None, json!({"token": "pm_nope"}))
        .await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_payment_method")), "{body}");
    // No billing details: refused before anything else.
    let (status, bare) = server.post("/v1/organizations", &server.admin, None, json!({"name": "Bare"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let bare = bare["id"].as_str().unwrap();
    let (_, bare_wallet) = server
        .post(&format!("/v1/organizations/{bare}/wallets"), &server.admin, None, json!({"currency": "USD"}))
        .await;
    let bare_method = add_method(&server, bare, &server.admin, "pm_card_visa").await;
    let (status, body) =
        request_top_up(&server, bare_wallet["id"].as_str().unwrap(), &server.admin, "z", "10.00", &bare_method).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("billing_details_required")));
    // The platform restricts method types per organization.
    let (status, _) = server
        .call(
            "PUT",
            &format!("/v1/organizations/{other_org}/payment-method-types"),
            &server.admin,
            None,
            Some(json!({"types": ["bank_account"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .post(
            &format!("/v1/organizations/{other_org}/payment-methods"),
            &other_key,
            None,
            json!({"token": "pm_card_visa"}),
        )
        .await;
    assert_eq!(body["code"], "payment_method_type_not_allowed", "{status} {body}");
    assert_eq!(server.wallet(&wallet).await["balance"], "10.00");
    assert_eq!(server.wallet(&other_wallet).await["balance"], "0.00");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_top_up_runs_once_when_a_debit_crosses_the_threshold() {
    let server = Server::start().await;
    let (org, wallet, key) = organization(&server, "Acme", false).await;
    let visa = add_method(&server, &org, &key, "pm_card_visa").await;
    server.credit(&wallet, "30.00", "fund").await;
    let rule = json!({"threshold": "10.00", "amount": "40.00", "payment_method": visa, "max_amount_per_day": "200.00"});
    let (status, settings) =
        server.call("PUT", &format!("/v1/wallets/{wallet}/auto-top-up"), &key, None, Some(rule)).await;
    assert_eq!(status, StatusCode::OK, "{settings}");
    let debit = json!({"direction": "debit", "amount": "22.00", "currency": "USD", "reason": "usage"});
    let (status, body) =
        server.post(&format!("/v1/wallets/{wallet}/adjustments"), &server.admin, Some("debit"), debit).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    eventually(&server, &format!("/v1/wallets/{wallet}"), "balance", "48.00").await;
    let (_, top_ups) = server.get(&format!("/v1/wallets/{wallet}/top-ups"), &key).await;
    let top_ups = top_ups["data"].as_array().unwrap().clone();
    assert_eq!(top_ups.len(), 1, "{top_ups:?}");
    assert_eq!((top_ups[0]["automatic"].as_bool(), top_ups[0]["amount"].as_str()), (Some(true), Some("40.00")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, again) = server.get(&format!("/v1/wallets/{wallet}/top-ups"), &key).await;
    assert_eq!(again["data"].as_array().unwrap().len(), 1, "no second auto top-up above the threshold");
    let (_, events) = server.get("/v1/events?type=auto_top_up.succeeded", &key).await;
    assert_eq!(events["data"].as_array().unwrap().len(), 1, "{events}");

    // A failing method: the failure is recorded, backs off, and is an event.
    let declined = add_method(&server, &org, &key, "pm_card_declined").await;
    let rule =
        json!({"threshold": "100.00", "amount": "5.00", "payment_method": declined, "max_amount_per_day": "50.00"});
    server.call("PUT", &format!("/v1/wallets/{wallet}/auto-top-up"), &key, None, Some(rule)).await;
    let debit = json!({"direction": "debit", "amount": "1.00", "currency": "USD", "reason": "usage"});
    server.post(&format!("/v1/wallets/{wallet}/adjustments"), &server.admin, Some("debit-2"), debit).await;
    let mut failed = Value::Null;
    for _ in 0..100 {
        let (_, events) = server.get("/v1/events?type=auto_top_up.failed", &key).await;
        if !events["data"].as_array().unwrap().is_empty() {
            failed = events;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed["data"][0]["data"]["failure_code"], "card_declined", "{failed}");
    let (_, settings) = server.get(&format!("/v1/wallets/{wallet}/payment-settings"), &key).await;
    assert_eq!(settings["auto_top_up"]["failures_in_a_row"], 1, "{settings}");
    assert!(settings["auto_top_up"]["retry_at"].is_string(), "{settings}");
    assert_eq!(server.wallet(&wallet).await["balance"], "47.00");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_pays_from_the_wallet_first_and_the_card_for_the_rest() {
    let server = Server::start().await;
    let (consumer, wallet, key) = organization(&server, "Consumer", false).await;
    let (merchant, merchant_wallet, _) = organization(&server, "Merchant", true).await;
    let visa = add_method(&server, &consumer, &key, "pm_card_visa").await;
    let declined = add_method(&server, &consumer, &key, "pm_card_declined").await;
    server.credit(&wallet, "20.00", "fund").await;
    let checkout = |method: &str, amount: &str| {
        json!({"consumer": consumer, "merchant": merchant, "amount": amount, "currency": "USD",
               "description": "order", "payment_method": method})
    };
    // Declined: the hold is released and nothing moves.
    let (status, failed) = server.post("/v1/checkouts", &key, Some("c1"), checkout(&declined, "50.00")).await;
    assert_eq!(status, StatusCode::CREATED, "{failed}");
    assert_eq!((failed["status"].as_str(), failed["failure_code"].as_str()), (Some("failed"), Some("card_declined")));
    assert_eq!(failed["outstanding"], "50.00");
    let consumer_wallet = server.wallet(&wallet).await;
    assert_eq!(
        (consumer_wallet["balance"].as_str(), consumer_wallet["available"].as_str()),
        (Some("20.00"), Some("20.00"))
    );
    // The seed: 20.00 from the wallet, 30.00 from the card, both captured.
    let (status, paid) = server.post("/v1/checkouts", &key, Some("c2"), checkout(&visa, "50.00")).await;
    assert_eq!(status, StatusCode::CREATED, "{paid}");
    assert_eq!(paid["status"], "succeeded", "{paid}");
    assert_eq!((paid["wallet_part"].as_str(), paid["card_part"].as_str()), (Some("20.00"), Some("30.00")));
    assert_eq!(paid["outstanding"], "0.00");
    assert_eq!(server.wallet(&wallet).await["balance"], "0.00");
    assert_eq!(server.wallet(&merchant_wallet).await["balance"], "50.00");
    let captured: Vec<i64> = server
        .sandbox
        .records()
        .iter()
        .filter(|r| r.payment.state == PaymentState::Captured)
        .map(|r| r.captured_minor)
        .collect();
    assert_eq!(captured, vec![3000]);
    // Replayed: the same checkout, nothing paid twice.
    let (_, again) = server.post("/v1/checkouts", &key, Some("c2"), checkout(&visa, "50.00")).await;
    assert_eq!(again["id"], paid["id"]);
    assert_eq!(server.wallet(&merchant_wallet).await["balance"], "50.00");
    // An exclusive hold (a renewal collecting its fee) refuses a checkout using the wallet.
    server.credit(&wallet, "10.00", "fund-2").await;
    let hold = json!({"amount": "5.00", "currency": "USD", "ttl_seconds": 60, "exclusive": true});
    let (status, body) = server.post(&format!("/v1/wallets/{wallet}/holds"), &key, Some("h1"), hold).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = server.post("/v1/checkouts", &key, Some("c3"), checkout(&visa, "5.00")).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("wallet_on_hold")), "{body}");
    let (status, body) = server.post("/v1/checkouts", &key, Some("c4"), checkout(&visa, "0")).await;
    assert_eq!(body["code"], "amount_must_be_positive", "{status} {body}");
    // A merchant cannot start a checkout out of its consumer's wallet.
    let (_, _, merchant_key) = organization(&server, "Merchant 2", true).await;
    let (status, _) = server.post("/v1/checkouts", &merchant_key, Some("c5"), checkout(&visa, "5.00")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_of_a_top_up_and_of_a_checkout() {
    let server = Server::start().await;
    sales_tax(&server).await;
    let (consumer, wallet, key) = organization(&server, "Consumer", false).await;
    let (merchant, merchant_wallet, merchant_key) = organization(&server, "Merchant", true).await;
    let visa = add_method(&server, &consumer, &key, "pm_card_visa").await;
    let (_, top_up) = request_top_up(&server, &wallet, &key, "t1", "20.00", &visa).await;
    let id = top_up["id"].as_str().unwrap();
    // The consumer's own key cannot refund; the platform can.
    let (status, _) = server.post(&format!("/v1/top-ups/{id}/refunds"), &key, Some("r1"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, refund) =
        server.post(&format!("/v1/top-ups/{id}/refunds"), &server.admin, Some("r1"), json!({"amount": "10.00"})).await;
    assert_eq!(status, StatusCode::CREATED, "{refund}");
    assert_eq!((refund["status"].as_str(), refund["total"].as_str()), (Some("succeeded"), Some("10.88")), "{refund}");
    assert_eq!(server.wallet(&wallet).await["balance"], "10.00");
    let record = server.sandbox.records().into_iter().next().unwrap();
    assert_eq!(record.payment.refunded_minor, 1088);
    // Beyond what is left: refused, nothing moves.
    let (status, body) =
        server.post(&format!("/v1/top-ups/{id}/refunds"), &server.admin, Some("r2"), json!({"amount": "10.01"})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("refund_exceeds_payment")));

    // A checkout paid from the wallet, refunded by the merchant.
    let body = json!({"consumer": consumer, "merchant": merchant, "amount": "4.00", "currency": "USD"});
    let (status, paid) = server.post("/v1/checkouts", &key, Some("c1"), body).await;
    assert_eq!((status, paid["status"].as_str()), (StatusCode::CREATED, Some("succeeded")), "{paid}");
    let operation = paid["operation"].as_str().unwrap();
    let path = format!("/v1/operations/{operation}/refunds");
    let (status, _) = server.post(&path, &key, Some("cr1"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the consumer cannot refund itself");
    let (status, refund) = server.post(&path, &merchant_key, Some("cr1"), json!({"reason": "goodwill"})).await;
    assert_eq!(status, StatusCode::CREATED, "{refund}");
    assert_eq!((refund["amount"].as_str(), refund["status"].as_str()), (Some("4.00"), Some("succeeded")));
    assert_eq!(server.wallet(&wallet).await["balance"], "10.00");
    assert_eq!(server.wallet(&merchant_wallet).await["balance"], "0.00");
    let refund_id = refund["id"].as_str().unwrap();
    assert_eq!(server.get(&format!("/v1/refunds/{refund_id}"), &key).await.0, StatusCode::OK);
    // It shows in both parties' movements.
    // (The consumer's also holds the top-up refund.)
    for (w, k, count) in [(&wallet, &key, 2), (&merchant_wallet, &merchant_key, 1)] {
        let (_, movements) = server.get(&format!("/v1/wallets/{w}/movements?kind=refund"), k).await;
        assert_eq!(movements["data"].as_array().map(Vec::len), Some(count), "{movements}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkouts_and_auto_top_ups_never_overdraw_and_never_overlap() {
    let server = std::sync::Arc::new(Server::start().await);
    let (consumer, wallet, key) = organization(&server, "Consumer", false).await;
    let (merchant, merchant_wallet, _) = organization(&server, "Merchant", true).await;
    let visa = add_method(&server, &consumer, &key, "pm_card_visa").await;
    // Auto top-ups confirm slowly (300 ms), so debits keep arriving while one is pending.
    let slow = add_method(&server, &consumer, &key, "pm_card_slow").await;
    server.credit(&wallet, "30.00", "fund").await;
    let rule = json!({"threshold": "25.00", "amount": "10.00", "payment_method": slow,
                      "max_per_day": 100, "max_amount_per_day": "1000.00"});
    let (status, body) = server.call("PUT", &format!("/v1/wallets/{wallet}/auto-top-up"), &key, None, Some(rule)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (server, key, consumer, merchant, visa) =
            (server.clone(), key.clone(), consumer.clone(), merchant.clone(), visa.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"consumer": consumer, "merchant": merchant, "amount": "3.00", "currency": "USD",
                              "payment_method": visa});
            let (status, body) = server.post("/v1/checkouts", &key, Some(&format!("c{i}")), body).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            assert_eq!(body["status"], "succeeded", "{body}");
            tokio::time::sleep(Duration::from_millis(20 * (i % 5))).await;
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Let the last auto top-up settle.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(server.wallet(&merchant_wallet).await["balance"], "120.00");
    // Never negative: every movement's balance after is at least zero.
    let (_, movements) = server.get(&format!("/v1/wallets/{wallet}/movements?limit=200"), &key).await;
    for movement in movements["data"].as_array().unwrap() {
        assert!(!movement["balance_after"].as_str().unwrap().starts_with('-'), "{movement}");
    }
    // Never two auto top-ups in flight: each starts after the previous one settled.
    let (_, top_ups) = server.get(&format!("/v1/wallets/{wallet}/top-ups"), &key).await;
    let mut auto: Vec<(String, String)> = top_ups["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["automatic"] == true)
        .map(|t| (t["created_at"].as_str().unwrap().to_string(), t["settled_at"].as_str().unwrap_or("~").to_string()))
        .collect();
    auto.sort();
    assert!(!auto.is_empty(), "the wallet went below its threshold, so auto top-ups ran");
    for pair in auto.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "overlapping auto top-ups: {pair:?}");
    }
    let server = std::sync::Arc::into_inner(server).expect("tasks are done");
    server.stop().await;
}

/// Waits until `check` holds for the JSON at `path`, or fails with what was last seen.
async fn wait_for(server: &Server, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = server.get(path, &server.admin).await.1;
        if check(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never reached the expected state; last: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sandbox_outcome_through_auto_top_up_checkout_and_renewal() {
    let server = Server::start().await;
    let (merchant, merchant_wallet, merchant_key) = organization(&server, "Merchant", true).await;
    let plan = json!({"name": "Pro", "currency": "USD", "billing_period": "month", "recurring_fee": "5.00",
                      "prices": []});
    let (status, plan) = server.post("/v1/plans", &merchant_key, None, plan).await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    let plan = plan["id"].as_str().unwrap().to_string();
    let mut merchant_expected = 0;
    for (token, failure) in [
        ("pm_card_visa", None),
        ("pm_card_slow", None),
        ("pm_card_declined", Some("card_declined")),
        ("pm_card_insufficient_funds", Some("insufficient_funds")),
        ("pm_card_expired", Some("expired_card")),
    ] {
        // Auto top-up: 3.00 above a 5.00 threshold, then a 1.00 debit crosses it.
        let (org, wallet, key) = organization(&server, &format!("auto {token}"), false).await;
        let method = add_method(&server, &org, &key, token).await;
        server.credit(&wallet, "6.00", &format!("fund-{token}")).await;
        let rule =
            json!({"threshold": "5.50", "amount": "10.00", "payment_method": method, "max_amount_per_day": "50.00"});
        server.call("PUT", &format!("/v1/wallets/{wallet}/auto-top-up"), &key, None, Some(rule)).await;
        let debit = json!({"direction": "debit", "amount": "1.00", "currency": "USD", "reason": "usage"});
        server
            .post(&format!("/v1/wallets/{wallet}/adjustments"), &server.admin, Some(&format!("d-{token}")), debit)
            .await;
        let top_ups = wait_for(&server, &format!("/v1/wallets/{wallet}/top-ups"), |list| {
            list["data"].as_array().is_some_and(|d| d.len() == 1 && d[0]["status"] != "pending")
        })
        .await;
        let top_up = &top_ups["data"][0];
        assert_eq!(top_up["automatic"], true);
        match failure {
            None => {
                assert_eq!(top_up["status"], "succeeded", "{token}: {top_up}");
                assert_eq!(server.wallet(&wallet).await["balance"], "15.00", "{token}");
            }
            Some(code) => {
                assert_eq!((top_up["status"].as_str(), top_up["failure_code"].as_str()), (Some("failed"), Some(code)));
                assert_eq!(server.wallet(&wallet).await["balance"], "5.00", "{token}");
            }
        }

        // Checkout: an empty wallet, so the card pays all of it.
        let (org, _, key) = organization(&server, &format!("checkout {token}"), false).await;
        let method = add_method(&server, &org, &key, token).await;
        let body = json!({"consumer": org, "merchant": merchant, "amount": "10.00", "currency": "USD",
                          "payment_method": method});
        let (status, checkout) = server.post("/v1/checkouts", &key, Some("c1"), body).await;
        assert_eq!(status, StatusCode::CREATED, "{checkout}");
        let id = checkout["id"].as_str().unwrap();
        let checkout = wait_for(&server, &format!("/v1/checkouts/{id}"), |c| c["status"] != "pending").await;
        match failure {
            None => {
                assert_eq!(checkout["status"], "succeeded", "{token}: {checkout}");
                merchant_expected += 1000;
            }
            Some(code) => assert_eq!(checkout["failure_code"], code, "{token}: {checkout}"),
        }

        // Renewal: subscribing charges the first 5.00 fee; the wallet is empty, so the
        // default payment method pays it.
        let (org, _, key) = organization(&server, &format!("renewal {token}"), false).await;
        add_method(&server, &org, &key, token).await;
        let (status, subscription) =
            server.post("/v1/subscriptions", &key, None, json!({"consumer": org, "plan": plan})).await;
        assert_eq!(status, StatusCode::CREATED, "{subscription}");
        let id = subscription["id"].as_str().unwrap();
        let expected = if failure.is_none() { "active" } else { "past_due" };
        let settled = wait_for(&server, &format!("/v1/subscriptions/{id}"), |s| {
            s["status"] == expected && (failure.is_some() || s["outstanding"] == "0.00")
        })
        .await;
        assert_eq!(settled["status"], expected, "{token}: {settled}");
        if failure.is_none() {
            merchant_expected += 500;
            let expected = format!("{}.{:02}", merchant_expected / 100, merchant_expected % 100);
            wait_for(&server, &format!("/v1/wallets/{merchant_wallet}"), |w| w["balance"] == expected.as_str()).await;
        }
    }
    let expected = format!("{}.{:02}", merchant_expected / 100, merchant_expected % 100);
    assert_eq!(server.wallet(&merchant_wallet).await["balance"], expected.as_str());
    server.stop().await;
}
