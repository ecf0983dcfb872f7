//! Usage billing over HTTP: catalog, subscriptions, usage (one and batch), duplicates,
//! access checks with reservations, summaries, statements, and who may see what.

mod common;

use common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

/// A merchant (with a USD wallet and key), a consumer funded with `funds`, a
/// `tokens` meter at 0.00002, a `messages` meter priced by `conversation_type`, a 5%
/// platform fee, and the consumer subscribed.
struct Billing {
    merchant: String,
    merchant_key: String,
    merchant_wallet: String,
    consumer: String,
    consumer_key: String,
    consumer_wallet: String,
    subscription: String,
}

async fn billing(server: &Server, funds: &str) -> Billing {
    let (status, merchant) = server
        .post(
            "/v1/organizations",
            &server.admin,
            None,
            json!({"name": "Merchant", "roles": {"merchant": true, "consumer": false}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{merchant}");
    let merchant = merchant["id"].as_str().unwrap().to_string();
    let (_, key) = server.post("/v1/api-keys", &server.admin, None, json!({"organization": merchant})).await;
    let merchant_key = key["secret"].as_str().unwrap().to_string();
    let (consumer, consumer_wallet, consumer_key) = server.organization("Consumer").await;
    if funds != "0" {
        server.credit(&consumer_wallet, funds, "fund").await;
    }
    let (status, product) = server.post("/v1/products", &merchant_key, None, json!({"name": "Chat API"})).await;
    assert_eq!(status, StatusCode::CREATED, "{product}");
    let product = product["id"].as_str().unwrap();
    for code in ["tokens", "messages"] {
        let body = json!({"code": code, "unit": code, "aggregation": "sum", "product": product});
        let (status, meter) = server.post("/v1/meters", &merchant_key, None, body).await;
        assert_eq!(status, StatusCode::CREATED, "{meter}");
    }
    // The platform sets the fee, so the admin creates the plan for the merchant.
    let plan = json!({
        "merchant": merchant,
        "name": "Pay as you go",
        "currency": "USD",
        "billing_period": "month",
        "platform_fee_rate": "0.05",
        "prices": [
            {"meter": "tokens", "model": "per_unit", "unit_price": "0.00002"},
            {"meter": "messages", "model": "dimensional", "property": "conversation_type",
             "values": {"marketing": "0.025", "service": "0.005"}},
        ],
    });
    let (status, plan) = server.post("/v1/plans", &server.admin, None, plan).await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    assert_eq!(plan["platform_fee_rate"], "0.05");
    let plan = plan["id"].as_str().unwrap().to_string();
    let (status, subscription) =
        server.post("/v1/subscriptions", &consumer_key, None, json!({"consumer": consumer, "plan": plan})).await;
    assert_eq!(status, StatusCode::CREATED, "{subscription}");
    assert_eq!(subscription["status"], "active");
    let (_, wallets) = server.get(&format!("/v1/organizations/{merchant}/wallets"), &server.admin).await;
    Billing {
        merchant,
        merchant_key,
        merchant_wallet: wallets["data"][0]["id"].as_str().unwrap().to_string(),
        consumer,
        consumer_key,
        consumer_wallet,
        subscription: subscription["id"].as_str().unwrap().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_are_paged_and_hold_only_the_merchants_own() {
    let server = Server::start().await;
    let b = billing(&server, "0").await;
    let ids = |page: &Value| -> Vec<String> {
        page["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    // Another merchant's product lands between this merchant's.
    let other = json!({"name": "Other", "roles": {"merchant": true, "consumer": false}});
    let (_, other) = server.post("/v1/organizations", &server.admin, None, other).await;
    let (_, key) = server.post("/v1/api-keys", &server.admin, None, json!({"organization": other["id"]})).await;
    let other_key = key["secret"].as_str().unwrap().to_string();
    let (_, theirs) = server.post("/v1/products", &other_key, None, json!({"name": "Theirs"})).await;
    let mut mine = ids(&server.get("/v1/products", &b.merchant_key).await.1);
    for name in ["Two", "Three"] {
        let (status, product) = server.post("/v1/products", &b.merchant_key, None, json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "{product}");
        mine.push(product["id"].as_str().unwrap().to_string());
    }
    assert_eq!(mine.len(), 3);
    let (status, first) = server.get("/v1/products?limit=2", &b.merchant_key).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((ids(&first), first["next_cursor"].as_str()), (mine[..2].to_vec(), Some(mine[1].as_str())));
    let (_, rest) = server.get(&format!("/v1/products?limit=2&after={}", mine[1]), &b.merchant_key).await;
    assert_eq!((ids(&rest), rest["next_cursor"].is_null()), (mine[2..].to_vec(), true));
    let (_, only) = server.get("/v1/products", &other_key).await;
    assert_eq!(ids(&only), vec![theirs["id"].as_str().unwrap().to_string()]);
    // Meters and plans page the same way.
    let (_, meters) = server.get("/v1/meters?limit=1", &b.merchant_key).await;
    let first_meter = ids(&meters);
    assert_eq!((first_meter.len(), meters["next_cursor"].as_str()), (1, Some(first_meter[0].as_str())));
    let (_, meters) = server.get(&format!("/v1/meters?after={}", first_meter[0]), &b.merchant_key).await;
    assert_eq!((meters["data"][0]["code"].as_str(), meters["next_cursor"].is_null()), (Some("messages"), true));
    let (_, plans) = server.get("/v1/plans?limit=1", &b.merchant_key).await;
    assert_eq!((ids(&plans).len(), plans["next_cursor"].is_null()), (1, true));
    let (status, bad) = server.get("/v1/plans?after=nope", &b.merchant_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{bad}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_listed_in_pages() {
    let server = Server::start().await;
    let b = billing(&server, "10.00").await;
    let (_, plans) = server.get("/v1/plans", &b.merchant_key).await;
    let plan = plans["data"][0]["id"].as_str().unwrap().to_string();
    for name in ["Second", "Third"] {
        let (consumer, _, key) = server.organization(name).await;
        let (status, body) =
            server.post("/v1/subscriptions", &key, None, json!({"consumer": consumer, "plan": plan})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let ids = |page: &Value| -> Vec<String> {
        page["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    let (status, first) = server.get("/v1/subscriptions?limit=2", &b.merchant_key).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((ids(&first), first["next_cursor"].as_str()), (vec!["sub_1".into(), "sub_2".into()], Some("sub_2")));
    let (_, rest) = server.get("/v1/subscriptions?limit=2&after=sub_2", &b.merchant_key).await;
    assert_eq!((ids(&rest), rest["next_cursor"].is_null()), (vec!["sub_3".to_string()], true));
    // A consumer sees only its own, paged the same way.
    let (_, own) = server.get("/v1/subscriptions?limit=2", &b.consumer_key).await;
    assert_eq!((ids(&own), own["next_cursor"].is_null()), (vec!["sub_1".to_string()], true));
    let (status, bad) = server.get("/v1/subscriptions?after=nope", &b.merchant_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{bad}");
    server.stop().await;
}

fn usage(b: &Billing, id: &str, meter: &str, quantity: &str) -> Value {
    json!({"event_id": id, "consumer": b.consumer, "meter": meter, "quantity": quantity})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_charged_at_once_and_duplicates_answer_the_original() {
    let server = Server::start().await;
    let b = billing(&server, "50.00").await;
    // The seed scenario: 1,200 tokens at 0.00002 = 0.024, less a 5% fee for the platform.
    let (status, charged) = server.post("/v1/usage", &b.merchant_key, None, usage(&b, "evt-1", "tokens", "1200")).await;
    assert_eq!(status, StatusCode::CREATED, "{charged}");
    assert_eq!(charged["amount"], "0.024");
    assert_eq!(charged["platform_fee"], "0.0012");
    assert_eq!(charged["balance_after"], "49.976");
    assert_eq!(charged["charges"], json!([{"source": "main", "amount": "0.024"}]));
    assert_eq!(server.wallet(&b.consumer_wallet).await["balance"], "49.976");
    assert_eq!(server.wallet(&b.merchant_wallet).await["balance"], "0.0228");
    // The same event id again: 409 with the original result, nothing charged twice.
    let (status, duplicate) =
        server.post("/v1/usage", &b.merchant_key, None, usage(&b, "evt-1", "tokens", "999999")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{duplicate}");
    assert_eq!(duplicate["code"], "duplicate_event");
    assert_eq!(duplicate["original"]["amount"], "0.024");
    assert_eq!(duplicate["original"]["operation"], charged["operation"]);
    assert_eq!(server.wallet(&b.consumer_wallet).await["balance"], "49.976");
    // An event that costs nothing posts no operation; its duplicate finds it all the same.
    let (status, free) = server.post("/v1/usage", &b.merchant_key, None, usage(&b, "evt-0", "tokens", "0")).await;
    assert_eq!((status, &free["operation"]), (StatusCode::CREATED, &Value::Null), "{free}");
    let (status, duplicate) = server.post("/v1/usage", &b.merchant_key, None, usage(&b, "evt-0", "tokens", "5")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{duplicate}");
    assert_eq!(
        (duplicate["original"]["quantity"].as_str(), duplicate["original"]["operation"].is_null()),
        (Some("0"), true)
    );
    // Refusals carry their codes.
    let cases = [
        (usage(&b, "evt-2", "minutes", "1"), StatusCode::UNPROCESSABLE_ENTITY, "unknown_meter"),
        (usage(&b, "evt-3", "tokens", "1e3"), StatusCode::BAD_REQUEST, "invalid_quantity"),
        (usage(&b, "evt-4", "tokens", "-5"), StatusCode::BAD_REQUEST, "invalid_quantity"),
        (usage(&b, "evt-5", "tokens", "100000000"), StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds"),
        (usage(&b, "evt-6", "messages", "1"), StatusCode::UNPROCESSABLE_ENTITY, "unknown_dimension"),
        (
            json!({"event_id": "evt-7", "consumer": b.consumer, "meter": "tokens", "quantity": "1", "timestamp": "2020-01-01T00:00:00Z"}),
            StatusCode::BAD_REQUEST,
            "event_too_old",
        ),
        (
            json!({"event_id": "evt-8", "consumer": b.merchant, "meter": "tokens", "quantity": "1"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_active_subscription",
        ),
    ];
    for (body, expected_status, code) in cases {
        let (status, problem) = server.post("/v1/usage", &b.merchant_key, None, body.clone()).await;
        assert_eq!((status, problem["code"].as_str().unwrap_or("")), (expected_status, code), "{body}: {problem}");
    }
    assert_eq!(server.wallet(&b.consumer_wallet).await["balance"], "49.976");
    // One usage.charged event for the one charge: none for the duplicate or refusals.
    let (_, events) = server.get("/v1/events?type=usage.charged", &b.consumer_key).await;
    let events = events["data"].as_array().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    // History stores the event's data compactly and rebuilds it for readers: every field.
    assert_eq!(
        events[0]["data"],
        json!({
            "object": "usage_charge",
            "subscription": charged["subscription"],
            "meter": "tokens",
            "quantity": "1200",
            "amount": "0.024",
            "platform_fee": "0.0012",
            "currency": "USD",
            "operation": charged["operation"],
            "balance_after": "49.976",
        })
    );
    assert!(charged["subscription"].as_str().is_some_and(|s| s.starts_with("sub_")), "{charged}");
    let (_, created) = server.get("/v1/events?type=subscription.created", &b.merchant_key).await;
    assert_eq!(created["data"].as_array().unwrap().len(), 1);
    // A consumer's key cannot report usage: it is not a merchant.
    let (status, problem) = server.post("/v1/usage", &b.consumer_key, None, usage(&b, "evt-9", "tokens", "1")).await;
    assert_eq!((status, problem["code"].as_str().unwrap()), (StatusCode::UNPROCESSABLE_ENTITY, "not_a_merchant"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_charges_each_event_on_its_own() {
    let server = Server::start().await;
    let b = billing(&server, "1.00").await;
    let mut events: Vec<Value> = (0..30)
        .map(|i| {
            json!({"event_id": format!("m{i}"), "consumer": b.consumer, "meter": "messages", "quantity": "1",
               "properties": {"conversation_type": "marketing"}})
        })
        .collect();
    events.push(usage(&b, "m0", "tokens", "1"));
    events.push(usage(&b, "bad-meter", "nope", "1"));
    let (status, answer) = server.post("/v1/usage/batch", &b.merchant_key, None, json!({"events": events})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 32);
    // 1.00 pays for exactly 40 marketing messages at 0.025; all 30 fit.
    assert_eq!(answer["charged"], 30);
    assert_eq!(results[29]["balance_after"], "0.25");
    assert_eq!(results[30]["code"], "duplicate_event");
    assert_eq!(results[30]["original"]["amount"], "0.025");
    assert_eq!(results[31]["code"], "unknown_meter");
    // Ten more fit; the eleventh is refused and nothing goes negative.
    let more: Vec<Value> = (30..45)
        .map(|i| {
            json!({"event_id": format!("m{i}"), "consumer": b.consumer, "meter": "messages", "quantity": "1",
               "properties": {"conversation_type": "marketing"}})
        })
        .collect();
    let (_, answer) = server.post("/v1/usage/batch", &b.merchant_key, None, json!({"events": more})).await;
    assert_eq!((answer["charged"].as_u64(), answer["refused"].as_u64()), (Some(10), Some(5)));
    assert_eq!(server.wallet(&b.consumer_wallet).await["balance"], "0.00");
    // Limits: an empty batch, and more than 10,000 events.
    let (status, problem) = server.post("/v1/usage/batch", &b.merchant_key, None, json!({"events": []})).await;
    assert_eq!((status, problem["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "too_many_items"));
    let huge: Vec<Value> = (0..10_001).map(|i| usage(&b, &format!("h{i}"), "tokens", "1")).collect();
    let (status, problem) = server.post("/v1/usage/batch", &b.merchant_key, None, json!({"events": huge})).await;
    assert_eq!((status, problem["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "too_many_items"));
    // The usage summary adds it up per meter and dimension, in JSON and CSV.
    let path = format!("/v1/subscriptions/{}/usage", b.subscription);
    let (status, summary) = server.get(&path, &b.consumer_key).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["total"], "1.00");
    assert_eq!(
        summary["lines"],
        json!([{"meter": "messages", "dimension": "marketing", "quantity": "40", "amount": "1.00", "events": 40}])
    );
    let csv = server
        .client
        .get(format!("{}{path}?format=csv", server.base))
        .header("Authorization", format!("Bearer {}", b.merchant_key))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        csv.text().await.unwrap(),
        "meter,dimension,quantity,amount,currency,events\nmessages,marketing,40,1.00,USD,40\n"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_checks_answer_and_reservations_are_captured_by_usage() {
    let server = Server::start().await;
    let b = billing(&server, "1.00").await;
    let check = |quantity: &str| json!({"consumer": b.consumer, "meter": "tokens", "quantity": quantity});
    let (status, answer) = server.post("/v1/access-checks", &b.merchant_key, None, check("50000")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!((answer["allowed"].as_bool(), answer["estimated_cost"].as_str()), (Some(true), Some("1.00")));
    let (_, answer) = server.post("/v1/access-checks", &b.merchant_key, None, check("50001")).await;
    assert_eq!((answer["allowed"].as_bool(), answer["reason"].as_str()), (Some(false), Some("insufficient_funds")));
    // Reserve 10,000 tokens (0.20): it needs an Idempotency-Key.
    let mut reserve = check("10000");
    reserve["reserve"] = json!({"ttl_seconds": 60});
    let (status, problem) = server.post("/v1/access-checks", &b.merchant_key, None, reserve.clone()).await;
    assert_eq!((status, problem["code"].as_str().unwrap()), (StatusCode::BAD_REQUEST, "idempotency_key_required"));
    let (status, answer) = server.post("/v1/access-checks", &b.merchant_key, Some("r1"), reserve.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let reservation = answer["reservation"]["id"].as_str().unwrap().to_string();
    assert_eq!(server.wallet(&b.consumer_wallet).await["available"], "0.80");
    // A retry replays the same reservation.
    let (_, again) = server.post("/v1/access-checks", &b.merchant_key, Some("r1"), reserve).await;
    assert_eq!(again["reservation"]["id"], reservation.as_str());
    assert_eq!(server.wallet(&b.consumer_wallet).await["available"], "0.80");
    // Streamed usage captures from the reservation; finishing releases the rest.
    let mut first = usage(&b, "s1", "tokens", "4000");
    first["reservation"] = json!(reservation);
    let (status, charged) = server.post("/v1/usage", &b.merchant_key, None, first).await;
    assert_eq!(status, StatusCode::CREATED, "{charged}");
    assert_eq!(charged["amount"], "0.08");
    let mut last = usage(&b, "s2", "tokens", "1000");
    last["reservation"] = json!(reservation);
    last["finish"] = json!(true);
    let (_, charged) = server.post("/v1/usage", &b.merchant_key, None, last).await;
    assert_eq!((charged["amount"].as_str(), charged["reservation_released"].as_str()), (Some("0.02"), Some("0.10")));
    let wallet = server.wallet(&b.consumer_wallet).await;
    assert_eq!((wallet["balance"].as_str(), wallet["available"].as_str()), (Some("0.90"), Some("0.90")));
    // Another merchant cannot check or charge this consumer: no subscription to it.
    let (_, _, other_key) = server.organization("Other").await;
    let (status, problem) = server.post("/v1/access-checks", &other_key, None, check("1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_reconcile_with_movements_and_parties_see_only_theirs() {
    let server = Server::start().await;
    let b = billing(&server, "10.00").await;
    for i in 0..5 {
        server.post("/v1/usage", &b.merchant_key, None, usage(&b, &format!("e{i}"), "tokens", "10000")).await;
    }
    let path =
        format!("/v1/wallets/{}/statement?from=2000-01-01T00:00:00Z&until=2100-01-01T00:00:00Z", b.consumer_wallet);
    let (status, statement) = server.get(&path, &b.consumer_key).await;
    assert_eq!(status, StatusCode::OK, "{statement}");
    assert_eq!(statement["opening_balance"], "0.00");
    assert_eq!(statement["totals"]["adjustments"], "10.00");
    assert_eq!(statement["totals"]["charges"], "-1.00");
    assert_eq!(statement["closing_balance"], "9.00");
    assert_eq!(statement["closing_balance"], server.wallet(&b.consumer_wallet).await["balance"]);
    let by_merchant = &statement["charges_by_merchant_and_product"][0];
    assert_eq!(
        (by_merchant["counterparty"].as_str(), by_merchant["amount"].as_str()),
        (Some(b.merchant.as_str()), Some("-1.00"))
    );
    assert_eq!(by_merchant["product"], "prd_1");
    // A later window opens with the balance the earlier one closed with.
    let (_, empty) = server
        .get(
            &format!(
                "/v1/wallets/{}/statement?from=2099-01-01T00:00:00Z&until=2100-01-01T00:00:00Z",
                b.consumer_wallet
            ),
            &b.consumer_key,
        )
        .await;
    assert_eq!((empty["opening_balance"].as_str(), empty["closing_balance"].as_str()), (Some("9.00"), Some("9.00")));
    // The merchant sees the subscription, but not the consumer's wallet or statement.
    let (status, _) = server.get(&format!("/v1/subscriptions/{}", b.subscription), &b.merchant_key).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.get(&path, &b.merchant_key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A third organization sees neither.
    let (_, _, stranger) = server.organization("Stranger").await;
    for path in [
        format!("/v1/subscriptions/{}", b.subscription),
        format!("/v1/subscriptions/{}/usage", b.subscription),
        path.clone(),
    ] {
        let (status, _) = server.get(&path, &stranger).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, _) =
        server.post(&format!("/v1/subscriptions/{}/cancel", b.subscription), &stranger, None, json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = server.get("/v1/subscriptions", &stranger).await;
    assert_eq!(listed["data"], json!([]));
    // The consumer cancels at once; usage is then refused.
    let (status, canceled) = server
        .post(
            &format!("/v1/subscriptions/{}/cancel", b.subscription),
            &b.consumer_key,
            None,
            json!({"at_period_end": false}),
        )
        .await;
    assert_eq!((status, canceled["status"].as_str()), (StatusCode::OK, Some("canceled")));
    let (_, problem) = server.post("/v1/usage", &b.merchant_key, None, usage(&b, "late", "tokens", "1")).await;
    assert_eq!(problem["code"], "no_active_subscription");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_charge_exactly_what_fits_and_retries_charge_once() {
    let server = Server::start().await;
    let b = Arc::new(billing(&server, "0.25").await);
    let server = Arc::new(server);
    // 0.25 pays for ten marketing messages; fifty arrive at once.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (server, b) = (server.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"event_id": format!("c{i}"), "consumer": b.consumer, "meter": "messages",
                              "quantity": "1", "properties": {"conversation_type": "marketing"}});
            server.post("/v1/usage", &b.merchant_key, None, body).await.0
        }));
    }
    let mut charged = 0;
    for task in tasks {
        if task.await.unwrap() == StatusCode::CREATED {
            charged += 1;
        }
    }
    assert_eq!(charged, 10);
    assert_eq!(server.wallet(&b.consumer_wallet).await["balance"], "0.00");
    // One event id retried twenty times at once is charged once.
    server.credit(&b.consumer_wallet, "1.00", "more").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (server, b) = (server.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            server.post("/v1/usage", &b.merchant_key, None, usage(&b, "retried", "tokens", "5000")).await.0
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CREATED).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::CONFLICT).count(), 19, "{statuses:?}");
    assert_eq!(server.wallet(&b.consumer_wallet).await["balance"], "0.90");
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}
