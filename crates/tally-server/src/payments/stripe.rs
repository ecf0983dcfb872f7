//! Stripe as a payment provider, over its PaymentIntents API.
//!
//! One Tally payment is one PaymentIntent: `authorize` creates and confirms it at once
//! with manual capture, `capture` and `cancel` finish it, `refund` gives money back.
//! Tally's idempotency key goes to Stripe twice: as the `Idempotency-Key` header, so a
//! repeated create replays the first answer instead of charging again (Stripe keeps
//! keys for 24 hours), and as `metadata[tally_id]`, so `lookup` can find the payment by
//! searching for it. Stripe's search is eventually consistent (a new intent can take a
//! while to show up), so a lookup that misses right after an authorize is followed by
//! an authorize under the same key, which the header makes harmless.
//!
//! Requests are form-encoded (`metadata[tally_id]=...`) with the secret key as bearer
//! token; answers are JSON. A network error, a timeout, 409 (a concurrent request under
//! the same key), 429 or a 5xx is retried a few times under the same idempotency key,
//! then reported as `Unavailable`: the outcome is unknown and the caller asks again
//! later. So is a refused secret key (401, 403): a configuration error must not fail
//! payments for good. A declined card (402) is an answer, not an error: a payment in
//! state `Failed`. Any other refusal is `Invalid`.
//!
//! [`verify_webhook_signature`] checks the `Stripe-Signature` header of the webhook
//! requests Stripe sends.

use super::provider::*;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use sha2::Sha256;
use std::time::Duration;
use tally_ledger::payments::{MethodDetails, MethodType};

/// Stripe's API.
pub const API_BASE: &str = "https://api.stripe.com";
/// How far a webhook's signed timestamp may be from now, in seconds (Stripe's default).
pub const WEBHOOK_TOLERANCE_S: i64 = 300;
/// Time limit of one attempt.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request, in total.
const ATTEMPTS: u32 = 3;
/// The pause before the first retry; it doubles before each next one.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The expiry recorded for methods that have none (bank accounts).
const NO_EXPIRY: (u8, u16) = (12, 2099);
/// How much of an unexpected answer goes into an error message.
const EXCERPT_CHARS: usize = 200;

/// Form fields or query parameters.
type Params<'a> = [(&'a str, String)];

/// The Stripe adapter: one secret key and one connection pool; share it behind an `Arc`.
pub struct Stripe {
    client: reqwest::Client,
    base_url: String,
    secret_key: String,
    /// Attempts per request, in total (at least one).
    retries: u32,
}

impl std::fmt::Debug for Stripe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret key.
        f.debug_struct("Stripe")
            .field("base_url", &self.base_url)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// An answer Stripe gave that is not to be retried: its status and JSON body.
struct Answer {
    status: StatusCode,
    body: Value,
}

/// What one attempt came to.
enum Attempt {
    Answered(ProviderResult<Answer>),
    /// No answer, or a transient failure: worth another attempt under the same key.
    Retry(String),
}

impl Stripe {
    /// An adapter for the API at `base_url` ([`API_BASE`], or a fake in tests).
    pub fn new(base_url: impl Into<String>, secret_key: impl Into<String>) -> Stripe {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("an HTTP client with a time limit and rustls builds");
        let base_url = base_url.into().trim_end_matches('/').to_string();
        Stripe { client, base_url, secret_key: secret_key.into(), retries: ATTEMPTS }
    }

    /// Sets how many attempts each request gets in total (at least one).
    pub fn with_attempts(mut self, attempts: u32) -> Stripe {
        self.retries = attempts.max(1);
        self
    }

    /// The URL of an API path given as segments; each segment is percent-encoded, so an
    /// id cannot reach another path.
    fn url(&self, segments: &[&str]) -> ProviderResult<Url> {
        let mut url = Url::parse(&self.base_url)
            .map_err(|error| ProviderError::Unavailable(format!("bad Stripe base URL {:?}: {error}", self.base_url)))?;
        url.path_segments_mut()
            .map_err(|()| ProviderError::Unavailable(format!("bad Stripe base URL {:?}", self.base_url)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    async fn post(&self, segments: &[&str], form: &Params<'_>, idempotency_key: &str) -> ProviderResult<Answer> {
        self.send(Method::POST, segments, &[], form, Some(idempotency_key)).await
    }

    async fn get(&self, segments: &[&str], query: &Params<'_>) -> ProviderResult<Answer> {
        self.send(Method::GET, segments, query, &[], None).await
    }

    /// Sends a request, retrying transient failures under the same idempotency key.
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &Params<'_>,
        form: &Params<'_>,
        idempotency_key: Option<&str>,
    ) -> ProviderResult<Answer> {
        let url = self.url(segments)?;
        let attempts = self.retries.max(1);
        let mut delay = BACKOFF_FIRST;
        let mut problem = String::new();
        for attempt in 1..=attempts {
            let mut request = self.client.request(method.clone(), url.clone()).bearer_auth(&self.secret_key);
            if !query.is_empty() {
                request = request.query(query);
            }
            if method == Method::POST {
                // Even an empty form: Stripe wants the form content type on every POST.
                request = request.form(form);
            }
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            match Self::attempt(request).await {
                Attempt::Answered(answer) => return answer,
                Attempt::Retry(why) => {
                    tracing::warn!(%method, path = url.path(), attempt, attempts, %why, "Stripe request failed");
                    problem = why;
                }
            }
            if attempt < attempts {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
        }
        Err(ProviderError::Unavailable(format!("Stripe {method} {}: {problem} ({attempts} attempts)", url.path())))
    }

    async fn attempt(request: reqwest::RequestBuilder) -> Attempt {
        let response = match request.send().await {
            Ok(response) => response,
            // Nothing was sent: not worth repeating, and not the payment's fault.
            Err(error) if error.is_builder() => {
                return Attempt::Answered(Err(ProviderError::Unavailable(format!("bad Stripe request: {error}"))))
            }
            Err(error) => return Attempt::Retry(format!("no answer: {error}")),
        };
        let status = response.status();
        let should_retry =
            response.headers().get("stripe-should-retry").and_then(|v| v.to_str().ok()).map(|v| v == "true");
        let text = match response.text().await {
            Ok(text) => text,
            Err(error) => return Attempt::Retry(format!("HTTP {status}, the answer was cut off: {error}")),
        };
        let transient =
            status == StatusCode::CONFLICT || status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
        if transient || status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let why = format!("HTTP {status}: {}", excerpt(&text));
            return if transient && should_retry != Some(false) {
                Attempt::Retry(why)
            } else {
                Attempt::Answered(Err(ProviderError::Unavailable(why)))
            };
        }
        match serde_json::from_str(&text) {
            Ok(body) => Attempt::Answered(Ok(Answer { status, body })),
            Err(error) => Attempt::Answered(Err(ProviderError::Unavailable(format!(
                "HTTP {status}, an answer that is not JSON ({error}): {}",
                excerpt(&text)
            )))),
        }
    }

    /// A payment intent, with its latest charge expanded so that refunds are known.
    async fn payment_intent(&self, reference: &str) -> ProviderResult<ProviderPayment> {
        let answer =
            self.get(&["v1", "payment_intents", reference], &[("expand[]", "latest_charge".to_string())]).await?;
        payment_answer(&answer, "", 0)
    }
}

/// Stripe's error message in an answer, or the start of the answer.
fn excerpt(text: &str) -> String {
    let message =
        serde_json::from_str::<Value>(text).ok().and_then(|v| nonempty(&v["error"]["message"]).map(str::to_string));
    message.unwrap_or_else(|| text.chars().take(EXCERPT_CHARS).collect())
}

/// A JSON string that is there and not empty.
fn nonempty(value: &Value) -> Option<&str> {
    value.as_str().filter(|text| !text.is_empty())
}

fn malformed(what: &str) -> ProviderError {
    ProviderError::Unavailable(format!("Stripe answered with {what}"))
}

fn invalid(code: &str, message: impl Into<String>) -> ProviderError {
    ProviderError::Invalid { code: code.to_string(), message: message.into() }
}

/// A refusal (4xx other than 402) as an error.
fn refusal(answer: &Answer) -> ProviderError {
    let error = &answer.body["error"];
    let message = nonempty(&error["message"]).map_or_else(|| format!("HTTP {}", answer.status), str::to_string);
    invalid(nonempty(&error["code"]).unwrap_or("invalid_request"), message)
}

/// A failed payment's state from a Stripe error object (a 402's `error`, or an
/// intent's `last_payment_error`).
fn failure(error: &Value) -> PaymentState {
    PaymentState::Failed {
        code: nonempty(&error["decline_code"])
            .or_else(|| nonempty(&error["code"]))
            .unwrap_or("payment_failed")
            .to_string(),
        message: nonempty(&error["message"]).unwrap_or("the payment was refused").to_string(),
    }
}

/// A PaymentIntent as a provider payment; `idempotency_key` is used if the intent
/// carries no `metadata[tally_id]`.
fn payment(intent: &Value, idempotency_key: &str) -> ProviderResult<ProviderPayment> {
    let reference = nonempty(&intent["id"]).ok_or_else(|| malformed("a payment intent without an id"))?;
    let amount_minor = intent["amount"].as_i64().ok_or_else(|| malformed("a payment intent without an amount"))?;
    let state = match intent["status"].as_str().unwrap_or_default() {
        "requires_capture" => PaymentState::Authorized,
        "succeeded" => PaymentState::Captured,
        "processing" | "requires_action" | "requires_confirmation" => PaymentState::Pending,
        "canceled" => PaymentState::Canceled,
        "requires_payment_method" => failure(&intent["last_payment_error"]),
        other => return Err(malformed(&format!("a payment intent in an unknown status {other:?}"))),
    };
    Ok(ProviderPayment {
        reference: reference.to_string(),
        idempotency_key: nonempty(&intent["metadata"]["tally_id"]).unwrap_or(idempotency_key).to_string(),
        amount_minor,
        state,
        // Known only when the latest charge was expanded.
        refunded_minor: intent["latest_charge"]["amount_refunded"].as_i64().unwrap_or(0),
    })
}

/// An answer about one payment intent: the intent, a declined card (402), or a refusal.
fn payment_answer(answer: &Answer, idempotency_key: &str, amount_minor: i64) -> ProviderResult<ProviderPayment> {
    if answer.status.is_success() {
        return payment(&answer.body, idempotency_key);
    }
    if answer.status != StatusCode::PAYMENT_REQUIRED {
        return Err(refusal(answer));
    }
    let error = &answer.body["error"];
    let intent = &error["payment_intent"];
    Ok(ProviderPayment {
        reference: nonempty(&intent["id"]).unwrap_or_default().to_string(),
        idempotency_key: nonempty(&intent["metadata"]["tally_id"]).unwrap_or(idempotency_key).to_string(),
        amount_minor: intent["amount"].as_i64().unwrap_or(amount_minor),
        state: failure(error),
        refunded_minor: 0,
    })
}

/// What may be shown of a PaymentMethod.
fn method_details(method: &Value) -> ProviderResult<MethodDetails> {
    match method["type"].as_str().unwrap_or_default() {
        "card" => {
            let card = &method["card"];
            let exp_month = card["exp_month"].as_u64().and_then(|m| u8::try_from(m).ok());
            let exp_year = card["exp_year"].as_u64().and_then(|y| u16::try_from(y).ok());
            let (Some(exp_month), Some(exp_year)) = (exp_month, exp_year) else {
                return Err(malformed("a card without a valid expiry"));
            };
            Ok(MethodDetails {
                kind: MethodType::Card,
                brand: nonempty(&card["brand"]).unwrap_or("card").to_string(),
                last4: nonempty(&card["last4"]).unwrap_or_default().to_string(),
                exp_month,
                exp_year,
            })
        }
        kind @ ("us_bank_account" | "sepa_debit") => {
            let account = &method[kind];
            Ok(MethodDetails {
                kind: MethodType::BankAccount,
                brand: nonempty(&account["bank_name"]).unwrap_or(kind).to_string(),
                last4: nonempty(&account["last4"]).unwrap_or_default().to_string(),
                exp_month: NO_EXPIRY.0,
                exp_year: NO_EXPIRY.1,
            })
        }
        other => Err(invalid("unsupported_payment_method", format!("Tally does not take {other:?} payment methods"))),
    }
}

/// A value inside single quotes in Stripe's search language.
fn search_quoted(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\'', "\\'")
}

impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn describe_method<'a>(&'a self, token: &'a str) -> BoxFuture<'a, ProviderResult<MethodDetails>> {
        Box::pin(async move {
            let answer = self.get(&["v1", "payment_methods", token], &[]).await?;
            if answer.status == StatusCode::NOT_FOUND {
                let message = nonempty(&answer.body["error"]["message"])
                    .map_or_else(|| format!("no payment method {token}"), str::to_string);
                return Err(invalid("invalid_payment_method", message));
            }
            if !answer.status.is_success() {
                return Err(refusal(&answer));
            }
            method_details(&answer.body)
        })
    }

    fn authorize<'a>(&'a self, request: &'a PaymentRequest) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            let key = request.idempotency_key.as_str();
            let form = [
                ("amount", request.amount_minor.to_string()),
                ("currency", request.currency.to_lowercase()),
                ("payment_method", request.method_token.clone()),
                ("confirm", "true".to_string()),
                ("capture_method", "manual".to_string()),
                // Without these, newer API versions want a `return_url` for confirming
                // at once; Tally's payments never redirect anyone.
                ("automatic_payment_methods[enabled]", "true".to_string()),
                ("automatic_payment_methods[allow_redirects]", "never".to_string()),
                ("description", request.description.clone()),
                ("metadata[tally_id]", key.to_string()),
            ];
            let answer = self.post(&["v1", "payment_intents"], &form, key).await?;
            payment_answer(&answer, key, request.amount_minor)
        })
    }

    fn capture<'a>(&'a self, reference: &'a str, amount_minor: i64) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            let key = format!("{reference}-capture-{amount_minor}");
            let form = [("amount_to_capture", amount_minor.to_string())];
            let answer = self.post(&["v1", "payment_intents", reference, "capture"], &form, &key).await?;
            payment_answer(&answer, "", amount_minor)
        })
    }

    fn cancel<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            let key = format!("{reference}-cancel");
            let answer = self.post(&["v1", "payment_intents", reference, "cancel"], &[], &key).await?;
            payment_answer(&answer, "", 0)
        })
    }

    fn refund<'a>(
        &'a self,
        reference: &'a str,
        amount_minor: i64,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, ProviderResult<ProviderPayment>> {
        Box::pin(async move {
            let form = [("payment_intent", reference.to_string()), ("amount", amount_minor.to_string())];
            let answer = self.post(&["v1", "refunds"], &form, idempotency_key).await?;
            if !answer.status.is_success() {
                return Err(refusal(&answer));
            }
            self.payment_intent(reference).await
        })
    }

    fn lookup<'a>(&'a self, idempotency_key: &'a str) -> BoxFuture<'a, ProviderResult<Option<ProviderPayment>>> {
        Box::pin(async move {
            let query = [
                ("query", format!("metadata['tally_id']:'{}'", search_quoted(idempotency_key))),
                ("expand[]", "data.latest_charge".to_string()),
            ];
            let answer = self.get(&["v1", "payment_intents", "search"], &query).await?;
            if !answer.status.is_success() {
                return Err(refusal(&answer));
            }
            let data = answer.body["data"].as_array().ok_or_else(|| malformed("a search result without data"))?;
            data.first().map(|intent| payment(intent, idempotency_key)).transpose()
        })
    }
}

// ---- webhook signatures ----

/// Why a `Stripe-Signature` header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is not t=<seconds>,v1=<hex>")]
    Malformed,
    #[error("the signature's timestamp is outside the tolerance")]
    Stale,
    #[error("no v1 signature matches this secret and payload")]
    Mismatch,
}

/// The HMAC-SHA256 of `"{t}.{payload}"` under `secret`, not yet finalized.
fn webhook_mac(secret: &str, t: &str, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// A `Stripe-Signature` header for `payload` signed at unix time `t`, as Stripe sends it
/// (for tests, and for replaying events locally).
pub fn sign_webhook(payload: &[u8], secret: &str, t: i64) -> String {
    let signature: String = webhook_mac(secret, &t.to_string(), payload)
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={signature}")
}

/// Checks a `Stripe-Signature` header (`t=<unix seconds>,v1=<hex>[,v1=<hex>...]`; other
/// schemes such as `v0` are ignored) against the raw request body and the endpoint's
/// signing secret, in constant time; then that `t` is within `tolerance_s` of `now_s`
/// (use [`WEBHOOK_TOLERANCE_S`]). Any one `v1` matching is enough: Stripe sends one per
/// active secret while a secret is being rolled.
pub fn verify_webhook_signature(
    header: &str,
    payload: &[u8],
    secret: &str,
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = Some(value),
            Some(("v1", value)) => signatures.push(value),
            _ => {}
        }
    }
    let t_text = timestamp.ok_or(SignatureError::Malformed)?;
    let t: i64 = t_text.parse().map_err(|_| SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // Signed is the timestamp as it appears in the header.
    let mac = webhook_mac(secret, t_text, payload);
    if !signatures.into_iter().filter_map(decode_hex).any(|bytes| mac.clone().verify_slice(&bytes).is_ok()) {
        return Err(SignatureError::Mismatch);
    }
    if now_s.abs_diff(t) > tolerance_s.max(0).unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "whsec_test_secret";
    const PAYLOAD: &[u8] = br#"{"id":"evt_1","object":"event","type":"payment_intent.succeeded"}"#;
    const NOW: i64 = 1_700_000_000;

    fn verify(header: &str, payload: &[u8], secret: &str, now_s: i64) -> Result<(), SignatureError> {
        verify_webhook_signature(header, payload, secret, now_s, WEBHOOK_TOLERANCE_S)
    }

    #[test]
    fn a_signed_payload_verifies_within_the_tolerance() {
        let header = sign_webhook(PAYLOAD, SECRET, NOW);
        assert!(header.starts_with(&format!("t={NOW},v1=")), "{header}");
        assert_eq!(header.len(), format!("t={NOW},v1=").len() + 64);
        assert_eq!(verify(&header, PAYLOAD, SECRET, NOW), Ok(()));
        assert_eq!(verify(&header, PAYLOAD, SECRET, NOW + WEBHOOK_TOLERANCE_S), Ok(()));
        assert_eq!(verify(&header, PAYLOAD, SECRET, NOW - WEBHOOK_TOLERANCE_S), Ok(()));
        // Other schemes are ignored, and any one v1 may match (a secret being rolled).
        let rolled = format!("{header},v1={},v0=6ffbb59b2300aae63f27240", "ab".repeat(32));
        assert_eq!(verify(&rolled, PAYLOAD, SECRET, NOW), Ok(()));
        let first_wrong = format!("t={NOW},v1={},{}", "00".repeat(32), header.split(',').nth(1).unwrap_or_default());
        assert_eq!(verify(&first_wrong, PAYLOAD, SECRET, NOW), Ok(()));
    }

    #[test]
    fn a_tampered_payload_or_another_secret_is_a_mismatch() {
        let header = sign_webhook(PAYLOAD, SECRET, NOW);
        let tampered = br#"{"id":"evt_1","object":"event","type":"payment_intent.canceled"}"#;
        assert_eq!(verify(&header, tampered, SECRET, NOW), Err(SignatureError::Mismatch));
        assert_eq!(verify(&header, PAYLOAD, "whsec_other", NOW), Err(SignatureError::Mismatch));
        // The timestamp is signed too.
        let moved = header.replacen(&format!("t={NOW}"), &format!("t={}", NOW + 1), 1);
        assert_eq!(verify(&moved, PAYLOAD, SECRET, NOW), Err(SignatureError::Mismatch));
        let not_hex = format!("t={NOW},v1=zz");
        assert_eq!(verify(&not_hex, PAYLOAD, SECRET, NOW), Err(SignatureError::Mismatch));
    }

    #[test]
    fn an_old_or_future_timestamp_is_stale() {
        let header = sign_webhook(PAYLOAD, SECRET, NOW);
        assert_eq!(verify(&header, PAYLOAD, SECRET, NOW + WEBHOOK_TOLERANCE_S + 1), Err(SignatureError::Stale));
        assert_eq!(verify(&header, PAYLOAD, SECRET, NOW - WEBHOOK_TOLERANCE_S - 1), Err(SignatureError::Stale));
    }

    #[test]
    fn a_malformed_header_is_refused() {
        let signature = "ab".repeat(32);
        for header in [
            String::new(),
            format!("v1={signature}"),
            format!("t={NOW}"),
            format!("t={NOW},v0={signature}"),
            format!("t=soon,v1={signature}"),
            "garbage".to_string(),
        ] {
            assert_eq!(verify(&header, PAYLOAD, SECRET, NOW), Err(SignatureError::Malformed), "{header}");
        }
    }

    #[test]
    fn payment_intents_map_to_states() {
        let intent = |status: &str| {
            json!({
                "id": "pi_1", "amount": 2000, "status": status,
                "metadata": {"tally_id": "top_1"}, "latest_charge": "ch_1",
            })
        };
        for (status, state) in [
            ("requires_capture", PaymentState::Authorized),
            ("succeeded", PaymentState::Captured),
            ("processing", PaymentState::Pending),
            ("requires_action", PaymentState::Pending),
            ("requires_confirmation", PaymentState::Pending),
            ("canceled", PaymentState::Canceled),
        ] {
            let mapped = payment(&intent(status), "fallback").map_err(|e| e.to_string());
            let expected = ProviderPayment {
                reference: "pi_1".into(),
                idempotency_key: "top_1".into(),
                amount_minor: 2000,
                state,
                refunded_minor: 0,
            };
            assert_eq!(mapped, Ok(expected), "{status}");
        }
        let mut failed = intent("requires_payment_method");
        failed["last_payment_error"] = json!({
            "code": "card_declined", "decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds.",
        });
        failed["metadata"] = json!({});
        failed["latest_charge"] = json!({"id": "ch_1", "amount_refunded": 0});
        let failed = payment(&failed, "fallback").map_err(|e| e.to_string());
        assert_eq!(
            failed.as_ref().map(|p| (p.idempotency_key.as_str(), &p.state)),
            Ok((
                "fallback",
                &PaymentState::Failed {
                    code: "insufficient_funds".into(),
                    message: "Your card has insufficient funds.".into()
                }
            ))
        );
        let mut refunded = intent("succeeded");
        refunded["latest_charge"] = json!({"id": "ch_1", "amount_refunded": 500});
        assert_eq!(payment(&refunded, "").map(|p| p.refunded_minor), Ok(500));
        assert!(matches!(payment(&intent("mystery"), ""), Err(ProviderError::Unavailable(_))));
        assert!(matches!(payment(&json!({"error": {}}), ""), Err(ProviderError::Unavailable(_))));
    }

    #[test]
    fn urls_keep_ids_inside_their_segment() {
        let stripe = Stripe::new("http://127.0.0.1:1/", "sk_test");
        let url = stripe.url(&["v1", "payment_intents", "pi_1/../../v1/refunds", "capture"]).map(|u| u.to_string());
        assert_eq!(url, Ok("http://127.0.0.1:1/v1/payment_intents/pi_1%2F..%2F..%2Fv1%2Frefunds/capture".to_string()));
    }
}
