//! The Stripe adapter against a local fake of Stripe's API: payment methods, authorize,
//! capture, cancel, refund and lookup; a declined card; retries under one idempotency key
//! through an outage and a lost answer; giving up; and webhook signatures.

mod common;

use common::fake_stripe::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tally_ledger::payments::{MethodDetails, MethodType};
use tally_server::payments::provider::{PaymentProvider, PaymentRequest, PaymentState, ProviderError};
use tally_server::payments::stripe::{
    sign_webhook, verify_webhook_signature, SignatureError, Stripe, WEBHOOK_TOLERANCE_S,
};

fn request(key: &str, token: &str, amount_minor: i64) -> PaymentRequest {
    PaymentRequest {
        idempotency_key: key.to_string(),
        amount_minor,
        currency: "USD".to_string(),
        method_token: token.to_string(),
        description: format!("Tally test {key}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_is_described_authorized_captured_found_and_refunded() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = Stripe::new(&base, SECRET_KEY);
    assert_eq!(stripe.name(), "stripe");

    let card = stripe.describe_method("pm_card_visa").await.unwrap();
    let visa = MethodDetails {
        kind: MethodType::Card,
        brand: "visa".into(),
        last4: "4242".into(),
        exp_month: 12,
        exp_year: 2034,
    };
    assert_eq!(card, visa);
    let bank = stripe.describe_method("pm_us_bank_account").await.unwrap();
    let account = MethodDetails {
        kind: MethodType::BankAccount,
        brand: "STRIPE TEST BANK".into(),
        last4: "6789".into(),
        exp_month: 12,
        exp_year: 2099,
    };
    assert_eq!(bank, account);
    match stripe.describe_method("pm_unknown").await {
        Err(ProviderError::Invalid { code, .. }) => assert_eq!(code, "invalid_payment_method"),
        other => panic!("an unknown token: {other:?}"),
    }

    assert_eq!(stripe.lookup("top_1").await.unwrap(), None);
    let authorized = stripe.authorize(&request("top_1", "pm_card_visa", 2_000)).await.unwrap();
    assert_eq!(authorized.state, PaymentState::Authorized);
    assert_eq!(authorized.idempotency_key, "top_1");
    assert_eq!(authorized.amount_minor, 2_000);
    assert_eq!(authorized.refunded_minor, 0);
    assert!(authorized.reference.starts_with("pi_"), "{}", authorized.reference);
    let creates = fake.posts_to("/v1/payment_intents");
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].idempotency_key.as_deref(), Some("top_1"));
    for (name, value) in [
        ("amount", "2000"),
        ("currency", "usd"),
        ("payment_method", "pm_card_visa"),
        ("confirm", "true"),
        ("capture_method", "manual"),
        ("description", "Tally test top_1"),
        ("metadata[tally_id]", "top_1"),
    ] {
        assert_eq!(creates[0].form.get(name).map(String::as_str), Some(value), "{name}");
    }
    // Authorizing again under the same key is the same payment.
    let again = stripe.authorize(&request("top_1", "pm_card_visa", 2_000)).await.unwrap();
    assert_eq!(again, authorized);
    assert_eq!(fake.intent_count(), 1);

    let reference = authorized.reference.clone();
    let captured = stripe.capture(&reference, 2_000).await.unwrap();
    assert_eq!(captured.state, PaymentState::Captured);
    assert_eq!((captured.reference.as_str(), captured.idempotency_key.as_str()), (reference.as_str(), "top_1"));
    let captures = fake.posts_to(&format!("/v1/payment_intents/{reference}/capture"));
    assert_eq!(captures.len(), 1);
    assert_eq!(captures[0].idempotency_key, Some(format!("{reference}-capture-2000")));
    assert_eq!(captures[0].form.get("amount_to_capture").map(String::as_str), Some("2000"));

    let found = stripe.lookup("top_1").await.unwrap().expect("the payment is found by its key");
    assert_eq!(found, captured);
    assert_eq!(stripe.lookup("top_other").await.unwrap(), None);

    let refunded = stripe.refund(&reference, 500, "top_1-refund").await.unwrap();
    assert_eq!(refunded.state, PaymentState::Captured);
    assert_eq!(refunded.refunded_minor, 500);
    // The same refund again (same key) is one refund.
    let again = stripe.refund(&reference, 500, "top_1-refund").await.unwrap();
    assert_eq!(again.refunded_minor, 500);
    let refunds = fake.posts_to("/v1/refunds");
    assert_eq!(refunds.len(), 2);
    assert!(refunds.iter().all(|r| r.idempotency_key.as_deref() == Some("top_1-refund")));
    assert_eq!(refunds[0].form.get("payment_intent"), Some(&reference));
    assert_eq!(refunds[0].form.get("amount").map(String::as_str), Some("500"));
    // Beyond what was captured: refused.
    match stripe.refund(&reference, 5_000, "top_1-refund-2").await {
        Err(ProviderError::Invalid { code, .. }) => assert_eq!(code, "amount_too_large"),
        other => panic!("a refund beyond the payment: {other:?}"),
    }

    // An authorization can be canceled instead, and canceling twice is one cancel.
    let second = stripe.authorize(&request("top_2", "pm_card_visa", 700)).await.unwrap();
    let canceled = stripe.cancel(&second.reference).await.unwrap();
    assert_eq!(canceled.state, PaymentState::Canceled);
    assert_eq!(canceled.idempotency_key, "top_2");
    assert_eq!(stripe.cancel(&second.reference).await.unwrap(), canceled);
    let cancels = fake.posts_to(&format!("/v1/payment_intents/{}/cancel", second.reference));
    assert_eq!(cancels.len(), 2);
    assert!(cancels.iter().all(|c| c.idempotency_key == Some(format!("{}-cancel", second.reference))));
    // Capturing a canceled payment is refused.
    match stripe.capture(&second.reference, 700).await {
        Err(ProviderError::Invalid { code, .. }) => assert_eq!(code, "payment_intent_unexpected_state"),
        other => panic!("capturing a canceled payment: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_is_a_failed_payment_not_an_error() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = Stripe::new(&base, SECRET_KEY);
    let declined = PaymentState::Failed { code: "generic_decline".into(), message: "Your card was declined.".into() };

    let payment = stripe.authorize(&request("co_1", "pm_card_declined", 1_500)).await.unwrap();
    assert_eq!(payment.state, declined);
    assert_eq!(payment.idempotency_key, "co_1");
    assert_eq!(payment.amount_minor, 1_500);
    assert!(payment.reference.starts_with("pi_"), "{}", payment.reference);
    assert_eq!(fake.intent_count(), 1);

    // Looked up later, the intent tells the same story.
    let found = stripe.lookup("co_1").await.unwrap().expect("the declined payment is found");
    assert_eq!((found.reference, found.state), (payment.reference, declined));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_under_the_same_idempotency_key() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = Stripe::new(&base, SECRET_KEY);

    fake.fail_next.store(2, Ordering::SeqCst);
    let payment = stripe.authorize(&request("top_r", "pm_card_visa", 1_000)).await.unwrap();
    assert_eq!(payment.state, PaymentState::Authorized);
    let creates = fake.posts_to("/v1/payment_intents");
    assert_eq!(creates.len(), 3);
    assert!(creates.iter().all(|c| c.idempotency_key.as_deref() == Some("top_r")), "{creates:?}");
    assert_eq!(fake.intent_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_replayed_not_repeated() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = Stripe::new(&base, SECRET_KEY);

    // Stripe made the payment, but its answer never arrived.
    fake.lose_next.store(1, Ordering::SeqCst);
    let payment = stripe.authorize(&request("top_l", "pm_card_visa", 1_000)).await.unwrap();
    assert_eq!(payment.state, PaymentState::Authorized);
    let creates = fake.posts_to("/v1/payment_intents");
    assert_eq!(creates.len(), 2);
    assert!(creates.iter().all(|c| c.idempotency_key.as_deref() == Some("top_l")), "{creates:?}");
    assert_eq!(fake.intent_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_that_outlasts_the_retries_is_unavailable() {
    let (fake, base) = FakeStripe::start().await;
    let stripe = Stripe::new(&base, SECRET_KEY);

    fake.fail_next.store(10, Ordering::SeqCst);
    let started = Instant::now();
    let result = stripe.authorize(&request("top_down", "pm_card_visa", 1_000)).await;
    assert!(matches!(result, Err(ProviderError::Unavailable(_))), "{result:?}");
    // Three attempts, 50 ms and then 100 ms apart.
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
    let creates = fake.posts_to("/v1/payment_intents");
    assert_eq!(creates.len(), 3);
    assert!(creates.iter().all(|c| c.idempotency_key.as_deref() == Some("top_down")), "{creates:?}");
    assert_eq!(fake.intent_count(), 0);
    let result = stripe.lookup("top_down").await;
    assert!(matches!(result, Err(ProviderError::Unavailable(_))), "{result:?}");

    // Once Stripe is back, the same key makes the payment once.
    fake.fail_next.store(0, Ordering::SeqCst);
    let payment = stripe.authorize(&request("top_down", "pm_card_visa", 1_000)).await.unwrap();
    assert_eq!(payment.state, PaymentState::Authorized);
    assert_eq!(fake.intent_count(), 1);

    // A refused secret key is a configuration problem, not a failed payment: unavailable,
    // and not retried.
    let before = fake.seen().len();
    let wrong = Stripe::new(&base, "sk_test_wrong");
    let result = wrong.authorize(&request("top_key", "pm_card_visa", 1_000)).await;
    assert!(matches!(result, Err(ProviderError::Unavailable(_))), "{result:?}");
    assert_eq!(fake.seen().len(), before + 1);
}

#[test]
fn webhook_signatures_verify_and_refuse_tampering_wrong_secrets_and_age() {
    let payload = br#"{"id":"evt_1","object":"event","type":"payment_intent.succeeded"}"#;
    let secret = "whsec_test_secret";
    let t = 1_700_000_000;
    let header = sign_webhook(payload, secret, t);
    assert!(header.starts_with(&format!("t={t},v1=")), "{header}");

    assert_eq!(verify_webhook_signature(&header, payload, secret, t, WEBHOOK_TOLERANCE_S), Ok(()));
    assert_eq!(verify_webhook_signature(&header, payload, secret, t + 300, WEBHOOK_TOLERANCE_S), Ok(()));
    let tampered = br#"{"id":"evt_1","object":"event","type":"payment_intent.canceled"}"#;
    assert_eq!(
        verify_webhook_signature(&header, tampered, secret, t, WEBHOOK_TOLERANCE_S),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify_webhook_signature(&header, payload, "whsec_other", t, WEBHOOK_TOLERANCE_S),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        verify_webhook_signature(&header, payload, secret, t + 301, WEBHOOK_TOLERANCE_S),
        Err(SignatureError::Stale)
    );
    assert_eq!(
        verify_webhook_signature("v1=00", payload, secret, t, WEBHOOK_TOLERANCE_S),
        Err(SignatureError::Malformed)
    );
}
