//! Black-box tests over HTTP: a server on port 0 with a fresh database per test.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_flow_credit_hold_capture_history() {
    let server = Server::start().await;
    let (_, consumer, consumer_key) = server.organization("Consumer").await;
    let (_, merchant, _) = server.organization("Merchant").await;
    server.credit(&consumer, "50.00", "welcome").await;
    let (status, hold) = server
        .post(
            &format!("/v1/wallets/{consumer}/holds"),
            &consumer_key,
            Some("h1"),
            json!({"amount": "20.00", "currency": "USD", "ttl_seconds": 300}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{hold}");
    assert_eq!(server.wallet(&consumer).await["available"], "30.00");
    let hold_id = hold["id"].as_str().unwrap();
    let (status, captured) = server
        .post(
            &format!("/v1/holds/{hold_id}/capture"),
            &consumer_key,
            Some("c1"),
            json!({"amount": "15.00", "to_wallet": merchant}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{captured}");
    assert_eq!(captured["released"], "5.00");
    let wallet = server.wallet(&consumer).await;
    assert_eq!((wallet["balance"].as_str(), wallet["held"].as_str()), (Some("35.00"), Some("0.00")));
    assert_eq!(server.wallet(&merchant).await["balance"], "15.00");
    // Fees are the platform's to set: an organization key cannot choose one.
    let (status, refused) = server
        .post("/v1/transfers", &consumer_key, Some("fee"), json!({"from_wallet": consumer, "to_wallet": merchant, "amount": "1.00", "currency": "USD", "fee_amount": "1.00"}))
        .await;
    assert_eq!((status, refused["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
    let (status, page) = server.get(&format!("/v1/wallets/{consumer}/movements?limit=1"), &consumer_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["data"][0]["kind"], "hold_capture");
    assert_eq!(page["data"][0]["balance_after"], "35.00");
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, older) = server.get(&format!("/v1/wallets/{consumer}/movements?before={cursor}"), &consumer_key).await;
    assert_eq!(older["data"][0]["kind"], "adjustment_credit");
    let operation = page["data"][0]["operation"].as_str().unwrap();
    let (status, operation) = server.get(&format!("/v1/operations/{operation}"), &consumer_key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(operation["legs"].as_array().unwrap().len(), 2, "consumer and merchant; no fee");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_organizations_key_gets_404_everywhere_and_changes_nothing() {
    let server = Server::start().await;
    let (org, wallet, key) = server.organization("Victim").await;
    let (_, _, intruder) = server.organization("Intruder").await;
    server.credit(&wallet, "10.00", "fund").await;
    let (_, hold) = server
        .post(
            &format!("/v1/wallets/{wallet}/holds"),
            &key,
            Some("h"),
            json!({"amount": "1.00", "currency": "USD", "ttl_seconds": 60}),
        )
        .await;
    let hold = hold["id"].as_str().unwrap().to_string();
    let (_, page) = server.get(&format!("/v1/wallets/{wallet}/movements"), &key).await;
    let operation = page["data"][0]["operation"].as_str().unwrap().to_string();
    let before = server.wallet(&wallet).await;
    let usd = |amount: &str| json!({"amount": amount, "currency": "USD"});
    let cases: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", format!("/v1/organizations/{org}"), None),
        (
            "PUT",
            format!("/v1/organizations/{org}/billing-details"),
            Some(json!({"legal_name": "x", "email": "a@b", "country": "US"})),
        ),
        ("GET", format!("/v1/organizations/{org}/wallets"), None),
        ("POST", format!("/v1/organizations/{org}/wallets"), Some(json!({"currency": "EUR"}))),
        ("GET", format!("/v1/wallets/{wallet}"), None),
        ("POST", format!("/v1/wallets/{wallet}/freeze"), None),
        ("POST", format!("/v1/wallets/{wallet}/unfreeze"), None),
        ("POST", format!("/v1/wallets/{wallet}/close"), None),
        ("PUT", format!("/v1/wallets/{wallet}/settings"), Some(json!({"low_balance_threshold": "1.00"}))),
        (
            "POST",
            format!("/v1/wallets/{wallet}/adjustments"),
            Some(json!({"direction": "debit", "amount": "1.00", "currency": "USD", "reason": "x"})),
        ),
        (
            "POST",
            format!("/v1/wallets/{wallet}/grants"),
            Some(json!({"amount": "1.00", "currency": "USD", "category": "promotional"})),
        ),
        ("GET", format!("/v1/wallets/{wallet}/grants"), None),
        (
            "POST",
            format!("/v1/wallets/{wallet}/holds"),
            Some(json!({"amount": "1.00", "currency": "USD", "ttl_seconds": 60})),
        ),
        ("GET", format!("/v1/wallets/{wallet}/holds"), None),
        ("GET", format!("/v1/holds/{hold}"), None),
        ("POST", format!("/v1/holds/{hold}/capture"), Some(json!({"to_wallet": "wal_2"}))),
        ("POST", format!("/v1/holds/{hold}/release"), None),
        ("GET", format!("/v1/wallets/{wallet}/movements"), None),
        ("GET", format!("/v1/operations/{operation}"), None),
        (
            "POST",
            "/v1/transfers".to_string(),
            Some(json!({"from_wallet": wallet, "to_wallet": "wal_2", "amount": "1.00", "currency": "USD"})),
        ),
        ("POST", "/v1/grants/grt_1/void".to_string(), None),
    ];
    let _ = usd;
    for (method, path, body) in cases {
        let body = body.or(Some(json!({})));
        let (status, answer) = server.call(method, &path, &intruder, Some("intruder-key"), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path} gave {status}: {answer}");
        let code = answer["code"].as_str().unwrap_or_default();
        assert!(code.ends_with("not_found"), "{method} {path}: {code}");
    }
    assert_eq!(server.wallet(&wallet).await, before, "the intruder changed the wallet");
    assert_eq!(server.get(&format!("/v1/holds/{hold}"), &key).await.0, StatusCode::OK, "the hold is still active");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replays_mismatches_and_fifty_concurrent_repeats() {
    let server = Server::start().await;
    let (_, wallet, _) = server.organization("Org").await;
    let body = json!({"direction": "credit", "amount": "5.00", "currency": "USD", "reason": "r"});
    let path = format!("/v1/wallets/{wallet}/adjustments");
    let (first_status, first) = server.post(&path, &server.admin, Some("same"), body.clone()).await;
    let response = server
        .client
        .post(format!("{}{}", server.base, path))
        .header("Authorization", format!("Bearer {}", server.admin))
        .header("Idempotency-Key", "same")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), first_status);
    assert_eq!(response.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(response.json::<Value>().await.unwrap(), first, "the replay must be the first answer");
    let (status, mismatch) = server
        .post(
            &path,
            &server.admin,
            Some("same"),
            json!({"direction": "credit", "amount": "6.00", "currency": "USD", "reason": "r"}),
        )
        .await;
    assert_eq!(
        (status, mismatch["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_mismatch"))
    );
    let (status, missing) = server.post(&path, &server.admin, None, body.clone()).await;
    assert_eq!((status, missing["code"].as_str()), (StatusCode::BAD_REQUEST, Some("idempotency_key_required")));

    let server = Arc::new(server);
    let concurrent = futures::future::join_all((0..50).map(|_| {
        let server = server.clone();
        let path = path.clone();
        async move {
            server
                .post(
                    &path,
                    &server.admin,
                    Some("burst"),
                    json!({"direction": "credit", "amount": "1.00", "currency": "USD", "reason": "r"}),
                )
                .await
                .0
        }
    }))
    .await;
    assert!(concurrent.iter().all(|s| *s == StatusCode::CREATED || *s == StatusCode::CONFLICT), "{concurrent:?}");
    assert!(concurrent.contains(&StatusCode::CREATED));
    // 5.00 once, plus 1.00 exactly once however many of the 50 got through.
    assert_eq!(server.wallet(&wallet).await["balance"], "6.00");
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_debits_of_one_against_ten() {
    let server = Server::start().await;
    let (_, wallet, key) = server.organization("Spender").await;
    let (_, merchant, _) = server.organization("Shop").await;
    server.credit(&wallet, "10.00", "fund").await;
    let server = Arc::new(server);
    let statuses = futures::future::join_all((0..100).map(|n| {
        let (server, wallet, merchant, key) = (server.clone(), wallet.clone(), merchant.clone(), key.clone());
        async move {
            let body = json!({"from_wallet": wallet, "to_wallet": merchant, "amount": "1.00", "currency": "USD"});
            server.post("/v1/transfers", &key, Some(&format!("t{n}")), body).await
        }
    }))
    .await;
    let succeeded = statuses.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    let refused = statuses
        .iter()
        .filter(|(s, b)| *s == StatusCode::UNPROCESSABLE_ENTITY && b["code"] == "insufficient_funds")
        .count();
    assert_eq!((succeeded, refused), (10, 90));
    assert_eq!(server.wallet(&wallet).await["balance"], "0.00");
    assert_eq!(server.wallet(&merchant).await["balance"], "10.00");
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_never_a_500() {
    let server = Server::start().await;
    let (_, wallet, key) = server.organization("Org").await;
    let path = format!("/v1/wallets/{wallet}/holds");
    let hold = |amount: &str, currency: &str| json!({"amount": amount, "currency": currency, "ttl_seconds": 60});
    let mut answers = Vec::new();
    for (name, body) in [
        ("exponent", hold("1e3", "USD")),
        ("too_precise", hold("0.1234567891234", "USD")),
        ("negative", hold("-5", "USD")),
        ("nan", hold("NaN", "USD")),
        ("zero", hold("0", "USD")),
        ("unknown_currency", hold("1.00", "XXX")),
        ("unknown_field", json!({"amount": "1.00", "currency": "USD", "ttl_seconds": 60, "color": "red"})),
        ("wrong_type", json!({"amount": 1.0, "currency": "USD", "ttl_seconds": 60})),
        ("too_long", json!({"amount": "1.00", "currency": "USD", "ttl_seconds": 60, "description": "x".repeat(300)})),
        (
            "ttl",
            hold("1.00", "USD")
                .as_object()
                .cloned()
                .map(|mut o| {
                    o.insert("ttl_seconds".into(), json!(0));
                    Value::Object(o)
                })
                .unwrap(),
        ),
    ] {
        let (status, answer) = server.post(&path, &key, Some(name), body).await;
        assert!(status.is_client_error(), "{name}: {status} {answer}");
        answers.push((name, status.as_u16(), answer));
    }
    let raw = server
        .client
        .post(format!("{}{}", server.base, path))
        .header("Authorization", format!("Bearer {key}"))
        .header("Idempotency-Key", "malformed")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    answers.push(("malformed", raw.status().as_u16(), raw.json().await.unwrap()));
    let big = server
        .client
        .post(format!("{}{}", server.base, path))
        .header("Authorization", format!("Bearer {key}"))
        .header("Idempotency-Key", "big")
        .header("content-type", "application/json")
        .body(format!("{{\"description\": \"{}\"}}", "x".repeat(100_000)))
        .send()
        .await
        .unwrap();
    answers.push(("oversized", big.status().as_u16(), big.json().await.unwrap()));
    let (status, answer) = server.get(&format!("/v1/wallets/{wallet}"), "tly_org_not_a_key").await;
    answers.push(("bad_key", status.as_u16(), answer));
    for (name, status, answer) in &answers {
        assert!((400..500).contains(status), "{name}: {status}");
        assert!(answer["code"].is_string() && answer["detail"].is_string(), "{name}: {answer}");
    }
    insta::assert_json_snapshot!(
        "bad_input_answers",
        answers.iter().map(|(n, s, a)| json!({"case": n, "status": s, "body": a})).collect::<Vec<_>>()
    );
    assert_eq!(server.wallet(&wallet).await["held"], "0.00");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_capture_replays_its_first_answer_and_holds_are_listed() {
    let server = Server::start().await;
    let (_, wallet, key) = server.organization("Consumer").await;
    let (_, merchant, _) = server.organization("Merchant").await;
    server.credit(&wallet, "10.00", "fund").await;
    for n in 0..3 {
        let body = json!({"amount": format!("{}.00", n + 1), "currency": "USD", "ttl_seconds": 60});
        let (status, _) = server.post(&format!("/v1/wallets/{wallet}/holds"), &key, Some(&format!("h{n}")), body).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, listed) = server.get(&format!("/v1/wallets/{wallet}/holds"), &key).await;
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["hld_1", "hld_2", "hld_3"]);
    let capture = json!({"to_wallet": merchant});
    let (first_status, first) = server.post("/v1/holds/hld_2/capture", &key, Some("cap"), capture.clone()).await;
    assert_eq!(first_status, StatusCode::OK, "{first}");
    // The hold is resolved now; the retry still gets the first answer, not a 404.
    let (again_status, again) = server.post("/v1/holds/hld_2/capture", &key, Some("cap"), capture.clone()).await;
    assert_eq!((again_status, &again), (first_status, &first));
    // A new key for the same hold is refused: a hold resolves once.
    let (status, refused) = server.post("/v1/holds/hld_2/capture", &key, Some("cap2"), capture).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    assert_eq!(server.wallet(&merchant).await["balance"], "2.00");
    assert_eq!(server.wallet(&wallet).await["held"], "4.00");
    // Answers that posted no operation replay too: a placement (of a hold captured
    // since) and a release, each under its own key.
    let placed_again = json!({"amount": "2.00", "currency": "USD", "ttl_seconds": 60});
    let (status, placement) = server.post(&format!("/v1/wallets/{wallet}/holds"), &key, Some("h1"), placed_again).await;
    assert_eq!((status, placement["id"].as_str()), (StatusCode::CREATED, Some("hld_2")), "{placement}");
    let (status, released) = server.post("/v1/holds/hld_3/release", &key, Some("rel"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{released}");
    // The amount released is in the wallet's currency, cents and all, on the replay too.
    let cents = released["released"].as_str().and_then(|a| a.split_once('.')).map(|(_, cents)| cents.len());
    assert_eq!(cents, Some(2), "{released}");
    let (again_status, again) = server.post("/v1/holds/hld_3/release", &key, Some("rel"), json!({})).await;
    assert_eq!((again_status, &again), (status, &released));
    // And a credit that made a grant: found through its operation.
    let grant = json!({"amount": "1.00", "currency": "USD", "category": "promotional"});
    let (status, first) =
        server.post(&format!("/v1/wallets/{wallet}/grants"), &server.admin, Some("g"), grant.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (again_status, again) =
        server.post(&format!("/v1/wallets/{wallet}/grants"), &server.admin, Some("g"), grant).await;
    assert_eq!((again_status, &again), (status, &first));
    assert_eq!(server.wallet(&wallet).await["held"], "1.00");
    server.stop().await;
}

/// Every endpoint the router serves, by method and path. Routes and their documentation
/// are registered together, so this list checks both: a route missing here or in the
/// document fails the test.
const ENDPOINTS: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("post", "/v1/organizations"),
    ("get", "/v1/organizations"),
    ("get", "/v1/organizations/{id}"),
    ("put", "/v1/organizations/{id}/billing-details"),
    ("post", "/v1/organizations/{id}/wallets"),
    ("get", "/v1/organizations/{id}/wallets"),
    ("get", "/v1/wallets/{id}"),
    ("post", "/v1/wallets/{id}/freeze"),
    ("post", "/v1/wallets/{id}/unfreeze"),
    ("post", "/v1/wallets/{id}/close"),
    ("put", "/v1/wallets/{id}/settings"),
    ("post", "/v1/wallets/{id}/adjustments"),
    ("post", "/v1/wallets/{id}/grants"),
    ("get", "/v1/wallets/{id}/grants"),
    ("post", "/v1/grants/{id}/void"),
    ("post", "/v1/wallets/{id}/holds"),
    ("get", "/v1/wallets/{id}/holds"),
    ("get", "/v1/holds/{id}"),
    ("post", "/v1/holds/{id}/capture"),
    ("post", "/v1/holds/{id}/release"),
    ("post", "/v1/transfers"),
    ("get", "/v1/wallets/{id}/movements"),
    ("get", "/v1/operations/{id}"),
    ("post", "/v1/api-keys"),
    ("get", "/v1/api-keys"),
    ("delete", "/v1/api-keys/{id}"),
    ("post", "/v1/products"),
    ("get", "/v1/products"),
    ("post", "/v1/meters"),
    ("get", "/v1/meters"),
    ("post", "/v1/plans"),
    ("get", "/v1/plans"),
    ("get", "/v1/plans/{id}"),
    ("post", "/v1/plans/{id}/archive"),
    ("post", "/v1/subscriptions"),
    ("get", "/v1/subscriptions"),
    ("get", "/v1/subscriptions/{id}"),
    ("post", "/v1/subscriptions/{id}/cancel"),
    ("get", "/v1/subscriptions/{id}/usage"),
    ("post", "/v1/usage"),
    ("post", "/v1/usage/batch"),
    ("post", "/v1/access-checks"),
    ("get", "/v1/wallets/{id}/statement"),
    ("get", "/metrics"),
    ("get", "/v1/events"),
    ("post", "/v1/webhook-endpoints"),
    ("get", "/v1/webhook-endpoints"),
    ("get", "/v1/webhook-endpoints/{id}"),
    ("post", "/v1/webhook-endpoints/{id}"),
    ("delete", "/v1/webhook-endpoints/{id}"),
    ("post", "/v1/webhook-endpoints/{id}/rotate-secret"),
    ("get", "/v1/webhook-endpoints/{id}/deliveries"),
    ("post", "/v1/webhook-deliveries/{id}/redeliver"),
    ("post", "/v1/organizations/{id}/payment-methods"),
    ("get", "/v1/organizations/{id}/payment-methods"),
    ("delete", "/v1/payment-methods/{id}"),
    ("post", "/v1/payment-methods/{id}/default"),
    ("put", "/v1/organizations/{id}/payment-method-types"),
    ("put", "/v1/tax-profiles"),
    ("get", "/v1/tax-profiles"),
    ("put", "/v1/wallets/{id}/top-up-limits"),
    ("get", "/v1/wallets/{id}/payment-settings"),
    ("put", "/v1/wallets/{id}/auto-top-up"),
    ("delete", "/v1/wallets/{id}/auto-top-up"),
    ("post", "/v1/wallets/{id}/top-ups"),
    ("get", "/v1/wallets/{id}/top-ups"),
    ("get", "/v1/wallets/{id}/top-up-quote"),
    ("get", "/v1/top-ups/{id}"),
    ("get", "/v1/top-ups/{id}/receipt"),
    ("post", "/v1/checkouts"),
    ("get", "/v1/checkouts/{id}"),
    ("post", "/v1/top-ups/{id}/refunds"),
    ("post", "/v1/operations/{id}/refunds"),
    ("get", "/v1/refunds/{id}"),
    ("post", "/v1/provider-webhooks/stripe"),
    ("get", "/v1/organizations/{id}/verification"),
    ("post", "/v1/organizations/{id}/verification/submit"),
    ("post", "/v1/organizations/{id}/verification/approve"),
    ("post", "/v1/organizations/{id}/verification/reject"),
    ("post", "/v1/organizations/{id}/bank-accounts"),
    ("get", "/v1/organizations/{id}/bank-accounts"),
    ("post", "/v1/bank-accounts/{id}/test-deposits"),
    ("post", "/v1/bank-accounts/{id}/test-deposits/confirm"),
    ("post", "/v1/bank-accounts/{id}/verify"),
    ("delete", "/v1/bank-accounts/{id}"),
    ("post", "/v1/payouts"),
    ("get", "/v1/payouts"),
    ("get", "/v1/payouts/{id}"),
    ("put", "/v1/wallets/{id}/payout-schedule"),
    ("delete", "/v1/wallets/{id}/payout-schedule"),
    ("put", "/v1/payout-minimums"),
    ("post", "/v1/portal-sessions"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_endpoint_with_its_errors() {
    let server = Server::start().await;
    let response = server.client.get(format!("{}/openapi.json", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"), "{}", document["openapi"]);
    let paths = document["paths"].as_object().unwrap();
    let mut documented = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            documented += 1;
            assert!(
                ENDPOINTS.contains(&(method.as_str(), path.as_str())),
                "{method} {path} is documented but not expected"
            );
            assert!(operation["responses"]["4XX"].is_object(), "{method} {path} documents no errors");
            // Every success documents its body: a JSON schema, or another content type
            // (CSV, HTML, OpenMetrics text); only 204 has none.
            for (status, response) in operation["responses"].as_object().unwrap() {
                if status.starts_with('2') && status != "204" {
                    let content = response["content"].as_object();
                    assert!(
                        content.is_some_and(|c| c.values().all(|media| media["schema"].is_object())),
                        "{method} {path} {status} documents no response schema"
                    );
                }
            }
        }
    }
    for (method, path) in ENDPOINTS {
        assert!(
            paths.get(*path).and_then(|item| item.get(*method)).is_some(),
            "{method} {path} is missing from the document"
        );
        // And the server really serves it (anything but the router's own 404 or 405).
        let url = format!("{}{}", server.base, path.replace("{id}", "x_1"));
        let answer = server.client.request(method.to_uppercase().parse().unwrap(), url).send().await.unwrap();
        assert_ne!(answer.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
    assert_eq!(documented, ENDPOINTS.len());
    for schema in ["CreateOrganization", "PlaceHold", "Transfer", "Problem"] {
        assert!(document["components"]["schemas"][schema].is_object(), "schema {schema} missing");
    }
    server.stop().await;
}

/// The contract check that every black-box answer goes through really catches a wrong
/// answer: an undocumented field, a missing one, a wrong type, a value outside an enum.
#[tokio::test]
async fn the_contract_check_refuses_answers_that_differ_from_the_document() {
    use common::contract::{response_schema, template_of, validate};
    let server = Server::start().await;
    let (_, wallet, key) = server.organization("Checked").await;
    let (status, answer) = server.get(&format!("/v1/wallets/{wallet}"), &key).await;
    assert_eq!(status, StatusCode::OK);
    let template = template_of(&format!("/v1/wallets/{wallet}?x=1")).unwrap();
    assert_eq!(template, "/v1/wallets/{id}");
    let schema = response_schema("GET", &template, 200, "application/json").expect("a documented wallet");
    assert_eq!(validate(schema, &answer, "$"), Ok(()));
    let mut extra = answer.clone();
    extra["surprise"] = json!(1);
    assert!(validate(schema, &extra, "$").unwrap_err().contains("$.surprise"));
    let mut missing = answer.clone();
    missing.as_object_mut().unwrap().remove("balance");
    assert!(validate(schema, &missing, "$").unwrap_err().contains("balance"));
    let mut wrong_type = answer.clone();
    wrong_type["balance"] = json!(5);
    assert!(validate(schema, &wrong_type, "$").is_err());
    let mut outside = answer.clone();
    outside["status"] = json!("melted");
    assert!(validate(schema, &outside, "$").is_err());
    let mut nested = answer.clone();
    nested["grants"] = json!([{"id": "grt_1"}]);
    assert!(validate(schema, &nested, "$").unwrap_err().contains("grants[0]"));
    // Errors are checked against the problem schema.
    let problem = response_schema("GET", &template, 404, "application/problem+json").expect("a documented problem");
    assert!(response_schema("GET", &template, 404, "application/json").is_none(), "errors are problem+json only");
    let (status, body) = server.get("/v1/wallets/wal_999", &key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(validate(problem, &body, "$"), Ok(()));
    assert!(validate(problem, &json!({"code": 5}), "$").is_err());
    // A hold answers either shape: active or resolved.
    let hold = response_schema("GET", "/v1/holds/{id}", 200, "application/json").unwrap();
    let resolved = json!({"id": "hld_1", "object": "hold", "wallet": wallet, "amount": "1.00", "currency": "USD",
        "status": "released", "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:01:00Z",
        "resolved_at": "2026-01-01T00:00:30Z", "released": "1.00"});
    assert_eq!(validate(hold, &resolved, "$"), Ok(()));
    assert!(validate(hold, &json!({"id": "hld_1"}), "$").is_err());
    server.stop().await;
}

#[tokio::test]
async fn each_api_key_is_rate_limited_on_its_own() {
    let server = Server::start().await;
    let (_, wallet, key) = server.organization("Busy").await;
    // A tight limit on this server's state, as `--rate-limit-per-key 5` would set.
    let limiter = tally_server::RateLimiter::new(5);
    let caller = server.state.keys.authenticate(&key, 0).unwrap();
    let allowed = (0..10).filter(|_| limiter.check(caller.key_id()).is_ok()).count();
    assert_eq!(allowed, 5, "a full bucket holds one second's worth");
    let refused = limiter.check(caller.key_id()).unwrap_err();
    assert_eq!((refused.code, tally_server::status_of(refused.code).as_u16()), ("rate_limited", 429));
    // Another key has its own bucket.
    assert!(limiter.check(caller.key_id() + 1).is_ok());
    // The bucket refills with time.
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    assert!(limiter.check(caller.key_id()).is_ok(), "refilled after 0.45 s at 5/s");
    // Off when zero.
    let off = tally_server::RateLimiter::new(0);
    assert!((0..10_000).all(|_| off.check(1).is_ok()));
    // Over HTTP, a server with the default limit serves a burst without refusing.
    for _ in 0..50 {
        let (status, body) = server.get(&format!("/v1/wallets/{wallet}"), &key).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // With a limit of 3 a second, the fourth request at once is refused with 429 and
    // Retry-After, and changes nothing; the admin's own bucket is untouched.
    server.state.rate_limit.set(3);
    let credit = json!({"direction": "credit", "amount": "1", "currency": "USD", "reason": "x"});
    let mut answers = Vec::new();
    for n in 0..4 {
        let response = server
            .client
            .post(format!("{}/v1/transfers", server.base))
            .bearer_auth(&key)
            .header("Idempotency-Key", format!("rl-{n}"))
            .json(&json!({"from_wallet": wallet, "to_wallet": wallet, "amount": "1", "currency": "USD"}))
            .send()
            .await
            .unwrap();
        answers.push((response.status(), response.headers().get("retry-after").is_some()));
    }
    assert_eq!(answers[3], (StatusCode::TOO_MANY_REQUESTS, true), "{answers:?}");
    let (status, _) =
        server.post(&format!("/v1/wallets/{wallet}/adjustments"), &server.admin, Some("rl-admin"), credit).await;
    assert_eq!(status, StatusCode::CREATED);
    server.state.rate_limit.set(tally_server::RATE_LIMIT_DEFAULT);
}

#[tokio::test]
async fn a_resolved_hold_shows_how_it_ended_to_its_owner_only() {
    let server = Server::start().await;
    let (_, wallet, key) = server.organization("Holder").await;
    let (_, merchant, other_key) = server.organization("Payee").await;
    server.credit(&wallet, "50", "fund").await;
    let place = |n: &str| json!({"amount": "10.00", "currency": "USD", "ttl_seconds": 600, "description": n});
    let (_, captured) = server.post(&format!("/v1/wallets/{wallet}/holds"), &key, Some("p1"), place("a")).await;
    let (_, released) = server.post(&format!("/v1/wallets/{wallet}/holds"), &key, Some("p2"), place("b")).await;
    let (captured, released) = (captured["id"].as_str().unwrap(), released["id"].as_str().unwrap());
    let (status, body) = server
        .post(
            &format!("/v1/holds/{captured}/capture"),
            &key,
            Some("c1"),
            json!({"amount": "4.00", "to_wallet": merchant}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = server.post(&format!("/v1/holds/{released}/release"), &key, Some("r1"), json!({})).await;
    assert_eq!(status, StatusCode::OK);

    let (status, view) = server.get(&format!("/v1/holds/{captured}"), &key).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(
        (view["status"].as_str(), view["amount"].as_str(), view["released"].as_str()),
        (Some("captured"), Some("10.00"), Some("6.00")),
        "{view}"
    );
    assert!(
        view["operation"].as_str().is_some_and(|o| o.starts_with("op_")) && view["resolved_at"].is_string(),
        "{view}"
    );
    let (status, view) = server.get(&format!("/v1/holds/{released}"), &key).await;
    assert_eq!((status, view["status"].as_str()), (StatusCode::OK, Some("released")), "{view}");
    // Another organization gets 404, as for a hold that never existed.
    assert_eq!(server.get(&format!("/v1/holds/{captured}"), &other_key).await.0, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/v1/holds/hld_999", &key).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn scoped_keys_do_only_what_their_scopes_allow() {
    let server = Server::start().await;
    let (org, wallet, _) = server.organization("Scoped").await;
    let (_, other_wallet, _) = server.organization("Elsewhere").await;
    server.credit(&wallet, "20", "fund").await;
    let key_with = |scopes: Value| {
        let body = json!({"organization": org, "scopes": scopes});
        let server = &server;
        async move {
            let (status, key) = server.post("/v1/api-keys", &server.admin, None, body).await;
            assert_eq!(status, StatusCode::CREATED, "{key}");
            (key["secret"].as_str().unwrap().to_string(), key["scopes"].clone())
        }
    };
    let (usage, scopes) = key_with(json!(["usage"])).await;
    assert_eq!(scopes, json!(["read", "usage"]), "every key reads");
    let (payouts, _) = key_with(json!(["payouts"])).await;
    let transfer = json!({"from_wallet": wallet, "to_wallet": other_wallet, "amount": "1", "currency": "USD"});
    for key in [&usage, &payouts] {
        // Reads work; a transfer does not, and nothing moves.
        assert_eq!(server.get(&format!("/v1/wallets/{wallet}"), key).await.0, StatusCode::OK);
        let (status, body) = server.post("/v1/transfers", key, Some("t"), transfer.clone()).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{body}");
    }
    // Payout endpoints need the payouts scope: the usage key is refused before any check.
    let (status, body) =
        server.post(&format!("/v1/organizations/{org}/verification/submit"), &usage, None, json!({})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{body}");
    let (status, body) =
        server.post(&format!("/v1/organizations/{org}/verification/submit"), &payouts, None, json!({})).await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");
    // Usage endpoints need the usage scope.
    let event = json!({"event_id": "e1", "consumer": org, "meter": "calls", "quantity": "1"});
    let (status, body) = server.post("/v1/usage", &payouts, None, event.clone()).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{body}");
    let (status, body) = server.post("/v1/usage", &usage, None, event).await;
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(server.get(&format!("/v1/wallets/{wallet}"), &server.admin).await.1["balance"], "20.00");
    // Unknown scopes and scopes with read_only are refused.
    for body in [
        json!({"organization": org, "scopes": ["admin"]}),
        json!({"organization": org, "scopes": ["usage"], "read_only": true}),
        json!({"scopes": ["usage"]}),
    ] {
        let (status, answer) = server.post("/v1/api-keys", &server.admin, None, body).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{answer}");
    }
}
