//! Payouts over HTTP against the sandbox rail: verification, bank accounts (validated,
//! masked, verified by test deposits), every refusal, paid, failed and slow payouts,
//! schedules, and the domain's payout seed scenario.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

/// A merchant with billing details and a USD wallet funded with `funds`.
async fn merchant(server: &Server, funds: &str) -> (String, String, String) {
    let (org, wallet, key) = server.organization("Shop").await;
    let billing = json!({"legal_name": "Shop LLC", "email": "shop@example.com", "country": "US", "region": "NY"});
    let (status, body) = server
        .call("PUT", &format!("/v1/organizations/{org}/billing-details"), &server.admin, None, Some(billing))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.credit(&wallet, funds, "fund").await;
    (org, wallet, key)
}

async fn us_account(server: &Server, org: &str, key: &str, account_number: &str) -> (StatusCode, Value) {
    let body = json!({"country": "US", "currency": "USD", "holder_name": "Shop LLC",
                      "routing_number": "011000015", "account_number": account_number});
    server.post(&format!("/v1/organizations/{org}/bank-accounts"), key, None, body).await
}

async fn verify(server: &Server, org: &str, key: &str) {
    let (status, body) =
        server.post(&format!("/v1/organizations/{org}/verification/submit"), key, None, json!({})).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("pending")), "{body}");
    let (status, body) =
        server.post(&format!("/v1/organizations/{org}/verification/approve"), &server.admin, None, json!({})).await;
    assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("verified")), "{body}");
}

async fn payout(
    server: &Server,
    key: &str,
    idempotency: &str,
    wallet: &str,
    amount: &str,
    account: &str,
) -> (StatusCode, Value) {
    let body = json!({"wallet": wallet, "amount": amount, "bank_account": account});
    server.post("/v1/payouts", key, Some(idempotency), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_a_verified_merchant_pays_out_999_99_and_every_refusal_has_its_code() {
    let server = Server::start().await;
    let (org, wallet, key) = merchant(&server, "1000.00").await;
    // Bank account details are checked by format and checksum, and kept masked.
    let (status, body) = us_account(&server, &org, &key, "abc").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_bank_account")), "{body}");
    let bad_routing = json!({"country": "US", "currency": "USD", "holder_name": "Shop", "routing_number": "011000016",
                             "account_number": "000123456789"});
    let (_, body) = server.post(&format!("/v1/organizations/{org}/bank-accounts"), &key, None, bad_routing).await;
    assert_eq!(body["code"], "invalid_bank_account", "{body}");
    let bad_iban = json!({"country": "DE", "currency": "EUR", "holder_name": "Shop", "iban": "DE89370400440532013001"});
    let (_, body) = server.post(&format!("/v1/organizations/{org}/bank-accounts"), &key, None, bad_iban).await;
    assert_eq!(body["code"], "invalid_bank_account", "{body}");
    let (status, account) = us_account(&server, &org, &key, "000123456789").await;
    assert_eq!(status, StatusCode::CREATED, "{account}");
    assert_eq!((account["last4"].as_str(), account["status"].as_str()), (Some("6789"), Some("new")));
    let (_, listed) = server.get(&format!("/v1/organizations/{org}/bank-accounts"), &key).await;
    assert!(!listed.to_string().contains("123456789"), "the full number is never shown: {listed}");
    let account = account["id"].as_str().unwrap().to_string();

    // Refusals, each with its code, none moving money.
    let (status, body) = payout(&server, &key, "p0", &wallet, "10.00", &account).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("organization_not_verified")));
    let (_, body) = server.post(&format!("/v1/organizations/{org}/verification/approve"), &key, None, json!({})).await;
    assert_eq!(body["code"], "not_found", "an organization cannot approve itself: {body}");
    server.post(&format!("/v1/organizations/{org}/verification/submit"), &key, None, json!({})).await;
    let (_, rejected) = server
        .post(
            &format!("/v1/organizations/{org}/verification/reject"),
            &server.admin,
            None,
            json!({"reason": "blurry id"}),
        )
        .await;
    assert_eq!((rejected["status"].as_str(), rejected["reason"].as_str()), (Some("rejected"), Some("blurry id")));
    verify(&server, &org, &key).await;
    let (_, body) = payout(&server, &key, "p1", &wallet, "10.00", &account).await;
    assert_eq!(body["code"], "bank_account_not_verified", "{body}");
    // Test deposits: two wrong answers, then the right ones.
    let (status, sent) =
        server.post(&format!("/v1/bank-accounts/{account}/test-deposits"), &key, None, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(sent["status"], "pending_verification");
    let deposits = sent["sandbox_test_deposits"].clone();
    for _ in 0..2 {
        let (_, wrong) = server
            .post(
                &format!("/v1/bank-accounts/{account}/test-deposits/confirm"),
                &key,
                None,
                json!({"amounts": ["1.00", "1.00"]}),
            )
            .await;
        assert_eq!(wrong["status"], "pending_verification", "{wrong}");
    }
    let (_, verified) = server
        .post(&format!("/v1/bank-accounts/{account}/test-deposits/confirm"), &key, None, json!({"amounts": deposits}))
        .await;
    assert_eq!(verified["status"], "verified", "{verified}");
    let (status, _) = server
        .call("PUT", "/v1/payout-minimums", &server.admin, None, Some(json!({"amount": "5.00", "currency": "USD"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    for (amount, code) in [
        ("4.99", "amount_below_minimum"),
        ("10.001", "amount_not_in_minor_units"),
        ("1000.01", "insufficient_funds"),
        ("0", "amount_must_be_positive"),
    ] {
        let (_, body) = payout(&server, &key, amount, &wallet, amount, &account).await;
        assert_eq!(body["code"], code, "{amount}: {body}");
    }
    let eur = json!({"country": "DE", "currency": "EUR", "holder_name": "Shop", "iban": "DE89 3704 0044 0532 0130 00"});
    let (status, eur) = server.post(&format!("/v1/organizations/{org}/bank-accounts"), &key, None, eur).await;
    assert_eq!(status, StatusCode::CREATED, "{eur}");
    let eur = eur["id"].as_str().unwrap();
    server.post(&format!("/v1/bank-accounts/{eur}/verify"), &server.admin, None, json!({})).await;
    let (_, body) = payout(&server, &key, "eur", &wallet, "10.00", eur).await;
    assert_eq!(body["code"], "currency_mismatch", "{body}");
    assert_eq!(server.wallet(&wallet).await["balance"], "1000.00");

    // The seed: 999.99 goes out, in transit then paid.
    let (status, paid) = payout(&server, &key, "seed", &wallet, "999.99", &account).await;
    assert_eq!(status, StatusCode::CREATED, "{paid}");
    assert_eq!(paid["status"], "paid", "{paid}");
    assert_eq!(server.wallet(&wallet).await["balance"], "0.01");
    assert_eq!(server.rail.records(), vec![(paid["id"].as_str().unwrap().to_string(), 99_999)]);
    let (_, again) = payout(&server, &key, "seed", &wallet, "999.99", &account).await;
    assert_eq!(again["id"], paid["id"], "a repeat is the same payout");
    assert_eq!(server.rail.records().len(), 1);
    let id = paid["id"].as_str().unwrap();
    let (_, events) = server.get(&format!("/v1/events?object={id}"), &key).await;
    let kinds: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"payout.created") && kinds.contains(&"payout.paid"), "{kinds:?}");
    let (_, list) = server.get("/v1/payouts", &key).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    // Paged newest first: one page here, and nothing before the only payout.
    let (_, page) = server.get("/v1/payouts?limit=1", &key).await;
    assert_eq!((page["data"][0]["id"].as_str(), page["next_cursor"].is_null()), (Some(id), true), "{page}");
    let (_, older) = server.get(&format!("/v1/payouts?before={id}"), &key).await;
    assert_eq!((older["data"].as_array().map(Vec::len), older["next_cursor"].is_null()), (Some(0), true), "{older}");
    let (_, _, stranger) = server.organization("Stranger").await;
    assert_eq!(server.get(&format!("/v1/payouts/{id}"), &stranger).await.0, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_payout_returns_the_money_and_a_slow_one_is_paid_later() {
    let server = Server::start().await;
    let (org, wallet, key) = merchant(&server, "100.00").await;
    verify(&server, &org, &key).await;
    let mut accounts = Vec::new();
    for number in ["1230002", "1230003"] {
        let (_, account) = us_account(&server, &org, &key, number).await;
        let id = account["id"].as_str().unwrap().to_string();
        server.post(&format!("/v1/bank-accounts/{id}/verify"), &server.admin, None, json!({})).await;
        accounts.push(id);
    }
    let (_, failed) = payout(&server, &key, "f", &wallet, "40.00", &accounts[0]).await;
    assert_eq!((failed["status"].as_str(), failed["failure_code"].as_str()), (Some("failed"), Some("account_closed")));
    assert_eq!(server.wallet(&wallet).await["balance"], "100.00", "the money came back");
    let (_, slow) = payout(&server, &key, "s", &wallet, "30.00", &accounts[1]).await;
    assert_eq!(slow["status"], "in_transit", "{slow}");
    assert_eq!(server.wallet(&wallet).await["balance"], "70.00");
    let id = slow["id"].as_str().unwrap();
    let mut status = Value::Null;
    for _ in 0..100 {
        status = server.get(&format!("/v1/payouts/{id}"), &key).await.1["status"].clone();
        if status == "paid" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, "paid");
    assert_eq!(server.wallet(&wallet).await["balance"], "70.00");
    // A daily schedule (its first run is a day later; the ledger tests run it).
    let schedule = json!({"interval": "daily", "reserve": "20.00", "bank_account": accounts[1]});
    let (status, body) =
        server.call("PUT", &format!("/v1/wallets/{wallet}/payout-schedule"), &key, None, Some(schedule)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["interval"], "daily");
    server.stop().await;
}
