//! A fake of the part of Stripe's API the adapter uses, for tests: payment intents
//! (authorize, capture, cancel, search by metadata), refunds and payment methods; it can
//! simulate an outage, a lost answer, and a payment that needs confirming later.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub const SECRET_KEY: &str = "sk_test_fake";
const BEARER: &str = "Bearer sk_test_fake";

pub type Fields = HashMap<String, String>;

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub form: Fields,
}

#[derive(Default)]
struct Books {
    intents: HashMap<String, Value>,
    /// Refunded minor units per payment intent.
    refunded: HashMap<String, i64>,
    /// Idempotency-Key → the answer first given under it (status, body).
    answers: HashMap<String, (u16, Value)>,
    seen: Vec<Seen>,
    count: u32,
}

/// A fake of the part of Stripe's API the adapter uses.
#[derive(Clone, Default)]
pub struct FakeStripe {
    books: Arc<Mutex<Books>>,
    /// Requests still to answer with 500 before doing anything (an outage).
    pub fail_next: Arc<AtomicU32>,
    /// Requests still to carry out and then answer with 500 (the answer lost on its way).
    pub lose_next: Arc<AtomicU32>,
}

impl FakeStripe {
    /// Starts the fake on a free local port; returns it and its base URL.
    pub async fn start() -> (FakeStripe, String) {
        let fake = FakeStripe::default();
        let app = axum::Router::new().fallback(handle).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, base)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.books.lock().unwrap().seen.clone()
    }

    pub fn posts_to(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.method == "POST" && s.path == path).collect()
    }

    /// The customer completes the extra step of a `pm_card_threeds` payment: it becomes
    /// capturable. Returns the payment intent as Stripe's webhook would carry it.
    pub fn confirm(&self, tally_id: &str) -> Value {
        let mut books = self.books.lock().unwrap();
        let intent = books.intents.values_mut().find(|i| i["metadata"]["tally_id"] == tally_id).expect("an intent");
        intent["status"] = json!("requires_capture");
        intent.clone()
    }

    pub fn intent_count(&self) -> usize {
        self.books.lock().unwrap().intents.len()
    }

    fn answer(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
        let path = uri.path().to_string();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let key = header("idempotency-key");
        let form = pairs(&String::from_utf8_lossy(body));
        let query = pairs(uri.query().unwrap_or_default());
        let mut books = self.books.lock().unwrap();
        books.seen.push(Seen {
            method: method.to_string(),
            path: path.clone(),
            idempotency_key: key.clone(),
            form: form.clone(),
        });
        if take_one(&self.fail_next) {
            return reply(500, error_body("api_error", "", "simulated outage"));
        }
        if header("authorization").as_deref() != Some(BEARER) {
            return reply(401, error_body("invalid_request_error", "", "Invalid API Key provided: sk_test_****"));
        }
        if *method == Method::POST && header("content-type").as_deref() != Some("application/x-www-form-urlencoded") {
            return reply(400, error_body("invalid_request_error", "", "Stripe takes form-encoded bodies"));
        }
        let post = *method == Method::POST;
        let replayed = key.as_ref().filter(|_| post).and_then(|key| books.answers.get(key).cloned());
        let (status, answer) = match replayed {
            Some(answer) => answer,
            None => {
                let answer = route(&mut books, method, &path, &form, &query);
                if let Some(key) = key.filter(|_| post) {
                    books.answers.insert(key, answer.clone());
                }
                answer
            }
        };
        drop(books);
        if take_one(&self.lose_next) {
            return reply(500, error_body("api_error", "", "the answer was lost"));
        }
        reply(status, answer)
    }
}

async fn handle(State(fake): State<FakeStripe>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    fake.answer(&method, &uri, &headers, &body)
}

/// Takes one from a counter if it is above zero.
fn take_one(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// Decodes `a=1&b%5B%5D=2` (a query string or a form body).
fn pairs(text: &str) -> Fields {
    reqwest::Url::parse(&format!("http://fake/?{text}"))
        .map(|url| url.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

fn reply(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
}

fn error_body(kind: &str, code: &str, message: &str) -> Value {
    json!({"error": {"type": kind, "code": code, "message": message}})
}

fn missing(id: &str) -> (u16, Value) {
    (404, error_body("invalid_request_error", "resource_missing", &format!("No such object: '{id}'")))
}

fn bad(code: &str, message: &str) -> (u16, Value) {
    (400, error_body("invalid_request_error", code, message))
}

fn route(books: &mut Books, method: &Method, path: &str, form: &Fields, query: &Fields) -> (u16, Value) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let expand = query.get("expand[]").map(String::as_str);
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "payment_intents"]) => create(books, form),
        ("GET", ["v1", "payment_intents", "search"]) => search(books, query),
        ("GET", ["v1", "payment_intents", id]) => match books.intents.get(*id) {
            Some(intent) => (200, view(books, intent, expand == Some("latest_charge"))),
            None => missing(id),
        },
        ("POST", ["v1", "payment_intents", id, "capture"]) => capture(books, id, form),
        ("POST", ["v1", "payment_intents", id, "cancel"]) => cancel(books, id),
        ("POST", ["v1", "refunds"]) => refund(books, form),
        ("GET", ["v1", "payment_methods", id]) => match payment_method(id) {
            Some(method) => (200, method),
            None => missing(id),
        },
        _ => (404, error_body("invalid_request_error", "", &format!("Unrecognized request URL ({method} {path})"))),
    }
}

fn payment_method(token: &str) -> Option<Value> {
    let card = |brand: &str, last4: &str| {
        json!({
            "id": token, "object": "payment_method", "type": "card",
            "card": {"brand": brand, "last4": last4, "exp_month": 12, "exp_year": 2034, "funding": "credit"},
        })
    };
    match token {
        "pm_card_visa" => Some(card("visa", "4242")),
        "pm_card_declined" => Some(card("visa", "0002")),
        "pm_card_threeds" => Some(card("visa", "3220")),
        "pm_us_bank_account" => Some(json!({
            "id": token, "object": "payment_method", "type": "us_bank_account",
            "us_bank_account": {"bank_name": "STRIPE TEST BANK", "last4": "6789", "account_type": "checking"},
        })),
        _ => None,
    }
}

/// An intent as answered; `expand`: with its latest charge as an object.
fn view(books: &Books, intent: &Value, expand: bool) -> Value {
    let mut intent = intent.clone();
    if expand {
        let id = intent["id"].as_str().unwrap_or_default().to_string();
        let refunded = books.refunded.get(&id).copied().unwrap_or(0);
        let charge = intent["latest_charge"].clone();
        intent["latest_charge"] = json!({"id": charge, "object": "charge", "amount_refunded": refunded});
    }
    intent
}

fn create(books: &mut Books, form: &Fields) -> (u16, Value) {
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let Some(amount) = form.get("amount").and_then(|a| a.parse::<i64>().ok()).filter(|a| *a > 0) else {
        return bad("parameter_invalid_integer", "amount");
    };
    let currency = field("currency");
    if currency.len() != 3 || currency != currency.to_lowercase() {
        return bad("parameter_invalid", "currency");
    }
    for (name, wanted) in [("confirm", "true"), ("capture_method", "manual")] {
        if field(name) != wanted {
            return bad("parameter_invalid", name);
        }
    }
    let tally_id = field("metadata[tally_id]");
    if tally_id.is_empty() {
        return bad("parameter_missing", "metadata[tally_id]");
    }
    let token = field("payment_method");
    let Some(method) = payment_method(&token) else {
        return bad("resource_missing", &format!("No such PaymentMethod: '{token}'"));
    };
    books.count += 1;
    let id = format!("pi_fake{}", books.count);
    let mut intent = json!({
        "id": id, "object": "payment_intent", "amount": amount, "amount_received": 0, "currency": currency,
        "capture_method": "manual", "status": "requires_capture", "description": field("description"),
        "payment_method": token, "metadata": {"tally_id": tally_id}, "last_payment_error": null,
        "latest_charge": format!("ch_fake{}", books.count),
    });
    if token == "pm_card_threeds" {
        intent["status"] = json!("requires_action");
    }
    let answer = if token == "pm_card_declined" {
        let mut error = json!({
            "type": "card_error", "code": "card_declined", "decline_code": "generic_decline",
            "message": "Your card was declined.", "payment_method": method,
        });
        intent["status"] = json!("requires_payment_method");
        intent["last_payment_error"] = error.clone();
        error["payment_intent"] = intent.clone();
        (402, json!({ "error": error }))
    } else {
        (200, intent.clone())
    };
    books.intents.insert(id, intent);
    answer
}

fn search(books: &Books, query: &Fields) -> (u16, Value) {
    let text = query.get("query").map(String::as_str).unwrap_or_default();
    let Some(key) = text.strip_prefix("metadata['tally_id']:'").and_then(|rest| rest.strip_suffix('\'')) else {
        return bad("parameter_invalid", &format!("unsupported search query {text:?}"));
    };
    let expand = query.get("expand[]").map(String::as_str) == Some("data.latest_charge");
    let mut data: Vec<Value> =
        books.intents.values().filter(|i| i["metadata"]["tally_id"] == key).map(|i| view(books, i, expand)).collect();
    data.sort_by_key(|i| i["id"].as_str().unwrap_or_default().to_string());
    (200, json!({"object": "search_result", "data": data, "has_more": false}))
}

fn capture(books: &mut Books, id: &str, form: &Fields) -> (u16, Value) {
    let Some(intent) = books.intents.get_mut(id) else { return missing(id) };
    let amount = intent["amount"].as_i64().unwrap_or(0);
    let to_capture = match form.get("amount_to_capture").map(|a| a.parse::<i64>()) {
        None => amount,
        Some(Ok(a)) if a > 0 && a <= amount => a,
        Some(_) => return bad("amount_too_large", "amount_to_capture"),
    };
    if intent["status"] != "requires_capture" {
        return bad("payment_intent_unexpected_state", "the payment intent cannot be captured");
    }
    intent["status"] = json!("succeeded");
    intent["amount_received"] = json!(to_capture);
    (200, intent.clone())
}

fn cancel(books: &mut Books, id: &str) -> (u16, Value) {
    let Some(intent) = books.intents.get_mut(id) else { return missing(id) };
    let cancelable =
        ["requires_payment_method", "requires_capture", "requires_confirmation", "requires_action", "processing"];
    if !cancelable.iter().any(|status| intent["status"] == *status) {
        return bad("payment_intent_unexpected_state", "the payment intent cannot be canceled");
    }
    intent["status"] = json!("canceled");
    (200, intent.clone())
}

fn refund(books: &mut Books, form: &Fields) -> (u16, Value) {
    let id = form.get("payment_intent").cloned().unwrap_or_default();
    let Some(intent) = books.intents.get(&id) else { return missing(&id) };
    if intent["status"] != "succeeded" {
        return bad("charge_not_refundable", "only captured payments are refunded");
    }
    let received = intent["amount_received"].as_i64().unwrap_or(0);
    let already = books.refunded.get(&id).copied().unwrap_or(0);
    let amount = match form.get("amount") {
        Some(a) => a.parse::<i64>().unwrap_or(0),
        None => received - already,
    };
    if amount <= 0 || already + amount > received {
        return bad("amount_too_large", "amount");
    }
    books.refunded.insert(id.clone(), already + amount);
    books.count += 1;
    let refund = json!({
        "id": format!("re_fake{}", books.count), "object": "refund",
        "amount": amount, "payment_intent": id, "status": "succeeded",
    });
    (200, refund)
}
