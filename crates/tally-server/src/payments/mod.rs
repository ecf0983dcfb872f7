//! Payments over HTTP: payment methods, tax profiles, top-ups (with receipts), auto
//! top-up rules and wallet-first checkouts, and the driver that talks to the provider.
//!
//! Every payment follows one path. The ledger records it as pending (durably) before
//! the provider is asked; `drive_top_up` / `drive_checkout` then ask the provider under
//! the record's id as idempotency key (look up, else authorize; capture) and send the
//! final answer back to the ledger, which moves the money once. The same functions run
//! from the request, from the background worker for auto top-ups and slow
//! confirmations, and after a restart for whatever was left pending: so a crash
//! between the provider's capture and the ledger's credit ends in exactly one credit.

pub mod provider;
pub mod sandbox;
pub mod stripe;

use super::*;
use axum::body::Bytes;
use provider::*;
use std::collections::HashMap;
use std::time::Instant;
use tally_ledger::payments::*;
use utoipa::ToSchema;
use utoipa_axum::routes;

/// Most concurrent provider conversations the background worker starts.
const DRIVES_MAX: usize = 64;
/// Most records one listing returns.
const LISTED_MAX: usize = 1_000;

#[derive(Clone, Debug)]
pub struct PaymentsConfig {
    /// How often the worker looks for due auto top-ups and pending payments.
    pub poll: Duration,
    /// How long after an attempt a pending payment is asked about again.
    pub retry_after: Duration,
    /// Fault injection for the crash test: abort the process right after the provider
    /// captured a payment, before the ledger hears of it.
    pub abort_after_capture: bool,
    /// The secret that signs the provider's webhooks (Stripe's `whsec_...`); without
    /// it, provider webhooks are refused and pending payments are polled.
    pub webhook_secret: Option<String>,
}

impl Default for PaymentsConfig {
    fn default() -> PaymentsConfig {
        PaymentsConfig {
            poll: Duration::from_millis(250),
            retry_after: Duration::from_secs(2),
            abort_after_capture: false,
            webhook_secret: None,
        }
    }
}

pub struct Payments {
    pub provider: Arc<dyn PaymentProvider>,
    config: PaymentsConfig,
    /// Ids being driven now, and when each was last tried.
    attempts: Mutex<(HashSet<String>, HashMap<String, Instant>)>,
    drives: tokio::sync::Semaphore,
}

/// Marks one record as being driven; dropping it ends that.
struct Driving<'a>(&'a Payments, String);

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.attempts.lock().expect("attempts lock").0.remove(&self.1);
    }
}

impl Payments {
    pub fn new(provider: Arc<dyn PaymentProvider>, config: PaymentsConfig) -> Payments {
        Payments {
            provider,
            config,
            attempts: Mutex::new((HashSet::new(), HashMap::new())),
            drives: tokio::sync::Semaphore::new(DRIVES_MAX),
        }
    }

    fn begin(&self, key: &str) -> Option<Driving<'_>> {
        let mut attempts = self.attempts.lock().expect("attempts lock");
        if !attempts.0.insert(key.to_string()) {
            return None;
        }
        attempts.1.insert(key.to_string(), Instant::now());
        Some(Driving(self, key.to_string()))
    }

    /// Like `begin`, but when another task is driving the record (the worker picked up
    /// a fresh one), waits for it to finish, so a request answers with the outcome.
    async fn begin_or_wait(&self, key: &str, wait: bool) -> Option<Driving<'_>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(driving) = self.begin(key) {
                return Some(driving);
            }
            if !wait || Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether a pending record is due to be asked about (never tried by this process,
    /// or not for `retry_after`).
    fn due(&self, key: &str) -> bool {
        let attempts = self.attempts.lock().expect("attempts lock");
        !attempts.0.contains(key) && attempts.1.get(key).is_none_or(|at| at.elapsed() >= self.config.retry_after)
    }

    fn forget(&self, key: &str) {
        self.attempts.lock().expect("attempts lock").1.remove(key);
    }
}

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<Arc<AppState>> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(add_method, list_methods))
        .routes(routes!(remove_method))
        .routes(routes!(default_method))
        .routes(routes!(method_types))
        .routes(routes!(set_tax_profile, list_tax_profiles))
        .routes(routes!(top_up_limits))
        .routes(routes!(payment_settings))
        .routes(routes!(set_auto_top_up, delete_auto_top_up))
        .routes(routes!(create_top_up, list_top_ups))
        .routes(routes!(top_up_quote))
        .routes(routes!(get_top_up))
        .routes(routes!(top_up_receipt))
        .routes(routes!(create_checkout))
        .routes(routes!(get_checkout))
        .routes(routes!(refund_top_up))
        .routes(routes!(refund_operation))
        .routes(routes!(get_refund))
        .routes(routes!(stripe_webhook))
}

fn payments(app: &AppState) -> Result<&Arc<Payments>, ApiError> {
    app.payments.as_ref().ok_or_else(|| ApiError::new("not_found", "payments are not enabled on this server"))
}

fn provider_error(error: ProviderError) -> ApiError {
    match error {
        ProviderError::Unavailable(detail) => {
            tracing::warn!(%detail, "payment provider unavailable");
            ApiError::new("provider_unavailable", "the payment provider is unavailable; retry shortly")
        }
        ProviderError::Invalid { code, message } => {
            ApiError::new("invalid_payment_method", format!("the payment provider refused it: {code}: {message}"))
        }
    }
}

// ---- views ----

fn money_text(units: i128, currency: Currency) -> String {
    views::amount(Amount::from_units(units), currency)
}

fn method_view(method: &PaymentMethod, default: bool) -> Value {
    json!({
        "id": method.id.to_string(),
        "object": "payment_method",
        "organization": method.organization.to_string(),
        "type": method.kind,
        "brand": method.brand.as_ref(),
        "last4": method.last4.as_ref(),
        "exp_month": method.exp_month,
        "exp_year": method.exp_year,
        "default": default,
        "removed": method.removed,
    })
}

fn taxes_view(taxes: &[TaxLine], currency: Currency) -> Value {
    Value::Array(
        taxes.iter().map(|t| json!({"name": t.name.as_ref(), "amount": money_text(t.amount, currency)})).collect(),
    )
}

/// Replaces the event JSON's `<name>_ms` times with RFC 3339 `<name>` fields.
fn with_times(mut view: Value, times: &[(&str, Option<Timestamp>)]) -> Value {
    if let Some(object) = view.as_object_mut() {
        for (name, at) in times {
            object.remove(&format!("{name}_ms"));
            object.insert((*name).to_string(), json!(at.map(time::format)));
        }
    }
    view
}

/// A top-up as the API shows it: the event's JSON, with times as RFC 3339 and what
/// only its owner sees (provider reference, receipt number).
pub(crate) fn top_up_view(top_up: &TopUp) -> Value {
    let mut view = with_times(
        tally_store::events::top_up_json(top_up),
        &[("created_at", Some(top_up.created_at)), ("settled_at", top_up.settled_at)],
    );
    view["provider_reference"] = json!(top_up.provider_reference.as_deref());
    view["receipt_number"] = json!(top_up.receipt_number.map(receipt_number));
    view
}

pub(crate) fn checkout_view(checkout: &Checkout) -> Value {
    let currency = checkout.currency;
    let paid = checkout.status == PaymentStatus::Succeeded;
    let mut view = with_times(
        tally_store::events::checkout_json(checkout),
        &[("created_at", Some(checkout.created_at)), ("settled_at", checkout.settled_at)],
    );
    view["outstanding"] = json!(money_text(if paid { 0 } else { checkout.amount }, currency));
    view["hold"] = json!(checkout.hold.map(|h| h.to_string()));
    view["payment_method"] = json!(checkout.method.map(|m| m.to_string()));
    view["description"] = json!(checkout.description.as_ref());
    view["provider_reference"] = json!(checkout.provider_reference.as_deref());
    view["failure_message"] = json!(checkout.failure_message.as_deref());
    view
}

fn receipt_number(number: u64) -> String {
    format!("R-{number:08}")
}

// ---- response shapes (OpenAPI only) ----
//
// The fields `method_view`, `top_up_view` and `checkout_view` send. Amounts are decimal
// strings in the major unit, times RFC 3339.

/// A saved payment method (only what may be shown: never the provider's token).
#[derive(ToSchema)]
#[schema(as = PaymentMethod)]
pub struct MethodShape {
    /// `pm_…`
    pub id: String,
    /// Always `payment_method`.
    pub object: String,
    pub organization: String,
    /// `card` or `bank_account`.
    pub r#type: String,
    /// The card brand (`visa`, …) or the bank's name, as the provider describes it.
    pub brand: String,
    pub last4: String,
    pub exp_month: u32,
    /// Bank accounts, which do not expire, show 12/2099.
    pub exp_year: u32,
    /// Whether it is its organization's default method.
    pub default: bool,
    /// True in the answer that removes it; removed methods are no longer listed.
    pub removed: bool,
}

/// A saved payment method list, with the method types the organization may use.
#[derive(ToSchema)]
pub struct PaymentMethodList {
    /// Always `list`.
    pub object: String,
    /// The organization's methods not removed.
    pub data: Vec<MethodShape>,
    /// The method types the organization may save and pay with: `card`, `bank_account`.
    pub allowed_types: Vec<String>,
}

/// One tax computed on an amount.
#[derive(ToSchema)]
pub struct AppliedTax {
    pub name: String,
    pub amount: String,
}

/// A top-up of a wallet through the payment provider.
#[derive(ToSchema)]
#[schema(as = TopUp)]
pub struct TopUpShape {
    /// `top_…`
    pub id: String,
    /// Always `top_up`.
    pub object: String,
    pub wallet: String,
    pub organization: String,
    pub currency: String,
    /// What the wallet gets.
    pub amount: String,
    /// The taxes added on top of `amount`.
    pub taxes: Vec<AppliedTax>,
    /// What the payment method is charged: `amount` plus taxes.
    pub total: String,
    /// The payment method charged.
    pub payment_method: String,
    /// `pending` (until the provider confirms), `succeeded` or `failed`.
    pub status: String,
    /// Started by the wallet's auto top-up rule.
    pub automatic: bool,
    pub created_at: String,
    /// When it succeeded or failed; null while pending.
    pub settled_at: Option<String>,
    /// The provider's code, when it failed.
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// The operation that credited the wallet, once succeeded.
    pub operation: Option<String>,
    /// The provider's id of the payment, once known.
    pub provider_reference: Option<String>,
    /// `R-00000001`: the receipt number of a succeeded top-up.
    pub receipt_number: Option<String>,
}
crate::schemas::list!(TopUpList, TopUpShape, "A wallet's top-ups, newest first.");

/// A wallet-first payment to a merchant: the consumer's wallet pays what it can, a
/// payment method the rest.
#[derive(ToSchema)]
#[schema(as = Checkout)]
pub struct CheckoutShape {
    /// `chk_…`
    pub id: String,
    /// Always `checkout`.
    pub object: String,
    /// The paying organization.
    pub consumer: String,
    /// The organization paid.
    pub merchant: String,
    pub currency: String,
    pub amount: String,
    /// Paid from the consumer's wallet (held until the card part is settled).
    pub wallet_part: String,
    /// Paid by the payment method.
    pub card_part: String,
    /// The platform's fee, out of what the merchant gets.
    pub platform_fee: String,
    /// The subscription whose recurring fee this collects (a renewal), if any.
    pub subscription: Option<String>,
    /// `pending` (until the provider confirms), `succeeded` or `failed`.
    pub status: String,
    pub created_at: String,
    /// When it succeeded or failed; null while pending.
    pub settled_at: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// The operation that paid the merchant, once succeeded.
    pub operation: Option<String>,
    /// What is left to pay: `0` once succeeded, else the whole amount.
    pub outstanding: String,
    /// The hold on the wallet part, if any.
    pub hold: Option<String>,
    /// The method that pays the card part, if any.
    pub payment_method: Option<String>,
    /// Empty when none was given.
    pub description: String,
    /// The provider's id of the card payment, once known.
    pub provider_reference: Option<String>,
}

// ---- card numbers never enter ----

/// Whether `body` holds something that looks like a card number: 13 to 19 digits
/// (spaces or dashes between them allowed) that pass the Luhn check.
pub fn contains_card_number(body: &[u8]) -> bool {
    let mut digits: Vec<u8> = Vec::new();
    let check = |digits: &mut Vec<u8>| {
        let found = (13..=19).contains(&digits.len()) && luhn(digits);
        digits.clear();
        found
    };
    let mut previous_was_digit = false;
    for &byte in body {
        if byte.is_ascii_digit() {
            digits.push(byte - b'0');
            previous_was_digit = true;
            if digits.len() > 19 {
                digits.clear();
            }
        } else if (byte == b' ' || byte == b'-') && previous_was_digit {
            previous_was_digit = false;
        } else {
            previous_was_digit = false;
            if check(&mut digits) {
                return true;
            }
        }
    }
    check(&mut digits)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

// ---- payment methods ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AddMethod {
    /// The provider's payment method token (sandbox: `pm_card_visa`, ...).
    token: String,
    #[serde(default)]
    default: bool,
}

async fn owned_organization(app: &AppState, caller: &Caller, id: &str) -> Result<OrganizationId, ApiError> {
    let organization = parse_id("organization", id, OrganizationId::parse)?;
    let exists = app.read(move |state| state.organization(organization).is_some()).await?;
    if !exists || !caller.owns(organization) {
        return Err(ApiError::not_found());
    }
    Ok(organization)
}

#[utoipa::path(post, path = "/v1/organizations/{id}/payment-methods", tag = "payments", summary = "Save a payment method by its provider token (card numbers are refused; a token saved before gives that method)", request_body = AddMethod, params(("id" = String, Path, description = "organization id")), responses((status = 201, description = "the payment method saved", body = MethodShape), (status = 200, description = "this token was saved before: that method", body = MethodShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn add_method(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>, body: Bytes) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    if contains_card_number(&body) {
        return Err(ApiError::new(
            "card_number_not_accepted",
            "Tally never accepts card numbers: tokenize the card with the payment provider and send its token",
        ));
    }
    let body: AddMethod =
        serde_json::from_slice(&body).map_err(|error| ApiError::new("invalid_request", error.to_string()))?;
    let organization = owned_organization(&app, &caller, &id).await?;
    let payments = payments(&app)?;
    text("token", &body.token, false)?;
    let details = payments.provider.describe_method(&body.token).await.map_err(provider_error)?;
    let command =
        PaymentCommand::AddMethodOnce { organization, token: body.token, details, make_default: body.default };
    let (method, saved) = match app.execute(Command::payment(command)).await? {
        Receipt::Payment(PaymentReceipt::Method(method)) => (method, false),
        Receipt::Payment(PaymentReceipt::MethodSavedBefore(method)) => (method, true),
        _ => return Err(ApiError::new("internal", "unexpected receipt")),
    };
    let id = method.id;
    let default = app.read(move |state| state.payments.default_method.values().any(|m| *m == id)).await?;
    // 200 for a token saved before (the ledger gave back that method), 201 for a new one.
    Ok(if saved { ok(method_view(&method, default)) } else { created(method_view(&method, default)) })
}

#[utoipa::path(get, path = "/v1/organizations/{id}/payment-methods", tag = "payments", summary = "An organization's saved payment methods", params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the organization's payment methods and the types it may use", body = PaymentMethodList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_methods(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let organization = owned_organization(&app, &caller, &id).await?;
    let data = app
        .read(move |state| {
            let default = state.payments.default_method.get(&organization).copied();
            let methods = state.payments.methods.iter().filter(|m| m.organization == organization && !m.removed);
            let allowed: Vec<MethodType> = [MethodType::Card, MethodType::BankAccount]
                .into_iter()
                .filter(|kind| state.payments.allows(organization, *kind))
                .collect();
            (methods.map(|m| method_view(m, Some(m.id) == default)).collect::<Vec<_>>(), allowed)
        })
        .await?;
    let (data, allowed) = data;
    Ok(ok(json!({"object": "list", "data": data, "allowed_types": allowed})))
}

async fn owned_method(app: &AppState, caller: &Caller, id: &str) -> Result<PaymentMethodId, ApiError> {
    let method = parse_id("payment_method", id, PaymentMethodId::parse)?;
    let owner =
        app.read(move |state| state.payments.method(method).filter(|m| !m.removed).map(|m| m.organization)).await?;
    match owner {
        Some(owner) if caller.owns(owner) => Ok(method),
        _ => Err(ApiError::not_found()),
    }
}

#[utoipa::path(delete, path = "/v1/payment-methods/{id}", tag = "payments", summary = "Remove a saved payment method", params(("id" = String, Path, description = "payment method id")), responses((status = 200, description = "the payment method, now removed", body = MethodShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn remove_method(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let method = owned_method(&app, &caller, &id).await?;
    let Receipt::Payment(PaymentReceipt::Method(method)) =
        app.execute(Command::payment(PaymentCommand::RemoveMethod { method })).await?
    else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    Ok(ok(method_view(&method, false)))
}

#[utoipa::path(post, path = "/v1/payment-methods/{id}/default", tag = "payments", summary = "Make a payment method its organization's default", params(("id" = String, Path, description = "payment method id")), responses((status = 200, description = "the payment method, now the default", body = MethodShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn default_method(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let method = owned_method(&app, &caller, &id).await?;
    let Receipt::Payment(PaymentReceipt::Method(method)) =
        app.execute(Command::payment(PaymentCommand::SetDefaultMethod { method })).await?
    else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    Ok(ok(method_view(&method, true)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MethodTypes {
    /// `card`, `bank_account`; an empty list allows none.
    types: Vec<String>,
}

#[utoipa::path(put, path = "/v1/organizations/{id}/payment-method-types", tag = "payments", summary = "Which payment method types an organization may use (platform setting)", request_body = MethodTypes, params(("id" = String, Path, description = "organization id")), responses((status = 200, description = "the types the organization may now use", body = PaymentMethodTypes), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn method_types(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<MethodTypes>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let organization = owned_organization(&app, &caller, &id).await?;
    let mut types = Vec::new();
    for text in &body.types {
        types.push(match text.as_str() {
            "card" => MethodType::Card,
            "bank_account" => MethodType::BankAccount,
            _ => return Err(ApiError::invalid("types", "types are card and bank_account")),
        });
    }
    app.execute(Command::payment(PaymentCommand::SetMethodTypes { organization, types: types.clone() })).await?;
    Ok(ok(json!({"organization": organization.to_string(), "payment_method_types": types})))
}

/// Which payment method types an organization may now use.
#[derive(ToSchema)]
pub struct PaymentMethodTypes {
    pub organization: String,
    /// `card`, `bank_account`; empty: none.
    pub payment_method_types: Vec<String>,
}

// ---- tax profiles ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TaxInput {
    name: String,
    /// A fraction: "0.05" is 5%.
    #[serde(default)]
    rate: Option<String>,
    /// A fixed amount added to every top-up in `currency`.
    #[serde(default)]
    fixed_amount: Option<String>,
    #[serde(default)]
    currency: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TaxProfileInput {
    /// ISO 3166-1 alpha-2, as in billing details.
    country: String,
    /// The billing details' region it applies to; absent: the whole country.
    #[serde(default)]
    subdivision: Option<String>,
    /// An empty list removes the profile.
    taxes: Vec<TaxInput>,
}

fn profile_view(profile: &TaxProfile) -> Value {
    json!({
        "object": "tax_profile",
        "country": profile.country,
        "subdivision": profile.subdivision,
        "taxes": profile.taxes.iter().map(|t| json!({
            "name": t.name,
            "rate": Amount::from_units(i128::from(t.rate.0) * 1_000_000).format(2),
            "fixed_amount": t.fixed.map(|f| f.format_amount()),
            "currency": t.fixed.map(|f| f.currency.code().to_string()),
        })).collect::<Vec<_>>(),
    })
}

// ---- response shapes (OpenAPI only) ----

/// One tax of a profile: a rate, a fixed amount, or both.
#[derive(ToSchema)]
pub struct TaxProfileTax {
    pub name: String,
    /// A fraction with at least two decimals: `"0.05"` is 5%.
    pub rate: String,
    /// The fixed amount added to every top-up in `currency`; null: none.
    pub fixed_amount: Option<String>,
    /// The fixed amount's currency; null when there is no fixed amount.
    pub currency: Option<String>,
}

/// The taxes added to top-ups of organizations billed in a region.
#[derive(ToSchema)]
#[schema(as = TaxProfile)]
pub struct TaxProfileShape {
    /// Always `tax_profile`.
    pub object: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    /// The billing details' region it applies to; null: the whole country.
    pub subdivision: Option<String>,
    /// Empty in the answer that removes the profile.
    pub taxes: Vec<TaxProfileTax>,
}
crate::schemas::list!(TaxProfileList, TaxProfileShape, "Every tax profile.");

#[utoipa::path(put, path = "/v1/tax-profiles", tag = "payments", summary = "Set a region's taxes on top-ups (platform)", request_body = TaxProfileInput, responses((status = 200, description = "the tax profile as set (no taxes: removed)", body = TaxProfileShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn set_tax_profile(
    AxumState(app): App,
    headers: HeaderMap,
    ApiJson(body): ApiJson<TaxProfileInput>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let mut taxes = Vec::new();
    for (i, tax) in body.taxes.iter().enumerate() {
        let rate = match &tax.rate {
            Some(text) => billing::fee_rate(&format!("taxes[{i}].rate"), text)?,
            None => PartsPerMillion(0),
        };
        let fixed = match (&tax.fixed_amount, &tax.currency) {
            (Some(amount), Some(code)) => Some(money(&format!("taxes[{i}].fixed_amount"), amount, code)?),
            (None, None) => None,
            _ => return Err(ApiError::invalid(&format!("taxes[{i}]"), "a fixed amount needs a currency")),
        };
        taxes.push(Tax { name: tax.name.clone(), rate, fixed });
    }
    let profile = TaxProfile { country: body.country, subdivision: body.subdivision, taxes };
    app.execute(Command::payment(PaymentCommand::SetTaxProfile { profile: profile.clone() })).await?;
    Ok(ok(profile_view(&profile)))
}

#[utoipa::path(get, path = "/v1/tax-profiles", tag = "payments", summary = "Every tax profile", responses((status = 200, description = "every tax profile", body = TaxProfileList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_tax_profiles(AxumState(app): App, headers: HeaderMap) -> ApiResult {
    caller(&app, &headers)?;
    let data = app.read(|state| state.payments.tax_profiles.iter().map(profile_view).collect::<Vec<_>>()).await?;
    Ok(ok(json!({"object": "list", "data": data})))
}

// ---- wallet payment settings ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TopUpLimits {
    #[serde(default)]
    min_amount: Option<String>,
    #[serde(default)]
    max_amount: Option<String>,
    /// Amounts clients show as buttons.
    #[serde(default)]
    presets: Vec<String>,
}

fn settings_view(state: &State, wallet: &Wallet) -> Value {
    let currency = wallet.currency;
    let settings = state.payments.wallets.get(&wallet.id).cloned().unwrap_or_default();
    let auto = settings.auto.as_ref().map(|rule| {
        let (amount, target) = match rule.spec.amount {
            AutoAmount::Fixed(a) => (Some(views::amount(a, currency)), None),
            AutoAmount::UpTo(t) => (None, Some(views::amount(t, currency))),
        };
        json!({
            "threshold": views::amount(rule.spec.threshold, currency),
            "amount": amount,
            "target_balance": target,
            "payment_method": rule.spec.method.to_string(),
            "max_per_day": rule.spec.max_per_day,
            "max_amount_per_day": views::amount(rule.spec.max_amount_per_day, currency),
            "enabled": rule.enabled,
            "failures_in_a_row": rule.failures,
            "retry_at": (rule.retry_at > 0).then(|| time::format(rule.retry_at)),
            "in_flight": rule.in_flight.map(|t| t.to_string()),
        })
    });
    json!({
        "object": "wallet_payment_settings",
        "wallet": wallet.id.to_string(),
        "currency": currency.code(),
        "min_top_up": settings.min_top_up.map(|a| views::amount(a, currency)),
        "max_top_up": settings.max_top_up.map(|a| views::amount(a, currency)),
        "presets": settings.presets.iter().map(|a| views::amount(*a, currency)).collect::<Vec<_>>(),
        "auto_top_up": auto,
    })
}

// ---- response shapes (OpenAPI only) ----

/// A wallet's auto top-up rule and its running state.
#[derive(ToSchema)]
pub struct AutoTopUpRule {
    /// Triggers when a debit takes available below this.
    pub threshold: String,
    /// Tops up by this fixed amount; null when the rule tops up to `target_balance`.
    pub amount: Option<String>,
    /// Tops up to bring available to this; null when the rule tops up by `amount`.
    pub target_balance: Option<String>,
    pub payment_method: String,
    pub max_per_day: u32,
    pub max_amount_per_day: String,
    /// False once the rule disabled itself after failures in a row.
    pub enabled: bool,
    pub failures_in_a_row: u32,
    /// When a failed auto top-up is tried again; null: no retry waiting.
    pub retry_at: Option<String>,
    /// The auto top-up in progress (`top_…`), if any.
    pub in_flight: Option<String>,
}

/// A wallet's top-up limits, preset amounts and auto top-up rule.
#[derive(ToSchema)]
#[schema(as = PaymentSettings)]
pub struct PaymentSettingsShape {
    /// Always `wallet_payment_settings`.
    pub object: String,
    pub wallet: String,
    pub currency: String,
    /// Smallest top-up; null: no minimum.
    pub min_top_up: Option<String>,
    /// Largest top-up; null: no maximum.
    pub max_top_up: Option<String>,
    /// Amounts clients show as buttons.
    pub presets: Vec<String>,
    /// Null: no auto top-up rule.
    pub auto_top_up: Option<AutoTopUpRule>,
}

async fn settings_answer(app: &AppState, wallet: WalletId) -> ApiResult {
    let view = app.read(move |state| state.wallet(wallet).map(|w| settings_view(state, w))).await?;
    Ok(ok(view.unwrap_or(Value::Null)))
}

#[utoipa::path(put, path = "/v1/wallets/{id}/top-up-limits", tag = "payments", summary = "A wallet's top-up minimum, maximum and preset amounts (platform)", request_body = TopUpLimits, params(("id" = String, Path, description = "wallet id")), responses((status = 200, description = "the wallet's payment settings", body = PaymentSettingsShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn top_up_limits(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<TopUpLimits>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    let (wallet, _, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let parse = |field: &str, text: &str| money(field, text, currency.code()).map(|m| m.amount);
    let min_top_up = body.min_amount.as_deref().map(|t| parse("min_amount", t)).transpose()?;
    let max_top_up = body.max_amount.as_deref().map(|t| parse("max_amount", t)).transpose()?;
    let presets = body.presets.iter().map(|t| parse("presets", t)).collect::<Result<Vec<_>, _>>()?;
    let command = PaymentCommand::SetWalletLimits { wallet, min_top_up, max_top_up, presets };
    app.execute(Command::payment(command)).await?;
    settings_answer(&app, wallet).await
}

#[utoipa::path(get, path = "/v1/wallets/{id}/payment-settings", tag = "payments", summary = "A wallet's top-up limits, presets and auto top-up rule", params(("id" = String, Path, description = "wallet id")), responses((status = 200, description = "the wallet's payment settings", body = PaymentSettingsShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn payment_settings(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (wallet, _, _) = owned_wallet_meta(&app, &caller, &id).await?;
    settings_answer(&app, wallet).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AutoTopUpInput {
    /// Triggers when a debit takes available below this.
    threshold: String,
    /// Top up by this amount ...
    #[serde(default)]
    amount: Option<String>,
    /// ... or by what brings available up to this (give one of the two).
    #[serde(default)]
    target_balance: Option<String>,
    payment_method: String,
    #[serde(default = "default_per_day")]
    max_per_day: u32,
    max_amount_per_day: String,
}

fn default_per_day() -> u32 {
    5
}

#[utoipa::path(put, path = "/v1/wallets/{id}/auto-top-up", tag = "payments", summary = "Set a wallet's auto top-up rule", request_body = AutoTopUpInput, params(("id" = String, Path, description = "wallet id")), responses((status = 200, description = "the wallet's payment settings with the rule", body = PaymentSettingsShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn set_auto_top_up(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AutoTopUpInput>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let (wallet, _, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let parse = |field: &str, text: &str| money(field, text, currency.code()).map(|m| m.amount);
    let amount = match (&body.amount, &body.target_balance) {
        (Some(a), None) => AutoAmount::Fixed(parse("amount", a)?),
        (None, Some(t)) => AutoAmount::UpTo(parse("target_balance", t)?),
        _ => return Err(ApiError::invalid("amount", "give either amount or target_balance")),
    };
    let spec = AutoTopUpSpec {
        threshold: parse("threshold", &body.threshold)?,
        amount,
        method: parse_id("payment_method", &body.payment_method, PaymentMethodId::parse)?,
        max_per_day: body.max_per_day,
        max_amount_per_day: parse("max_amount_per_day", &body.max_amount_per_day)?,
    };
    app.execute(Command::payment(PaymentCommand::SetAutoTopUp { wallet, rule: Some(spec) })).await?;
    settings_answer(&app, wallet).await
}

#[utoipa::path(delete, path = "/v1/wallets/{id}/auto-top-up", tag = "payments", summary = "Remove a wallet's auto top-up rule", params(("id" = String, Path, description = "wallet id")), responses((status = 200, description = "the wallet's payment settings without a rule", body = PaymentSettingsShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn delete_auto_top_up(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let (wallet, _, _) = owned_wallet_meta(&app, &caller, &id).await?;
    app.execute(Command::payment(PaymentCommand::SetAutoTopUp { wallet, rule: None })).await?;
    settings_answer(&app, wallet).await
}

// ---- top-ups ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateTopUp {
    /// What the wallet gets, in whole minor units; taxes are added on top.
    amount: String,
    /// A saved payment method; absent: the organization's default.
    #[serde(default)]
    payment_method: Option<String>,
    /// The total with taxes the payer reviewed (for example the quote's `total`): the
    /// top-up is refused with 409 `total_changed` if the taxes now give another total,
    /// so the card is charged exactly what was shown.
    #[serde(default)]
    total: Option<String>,
}

pub(crate) fn idempotency_key(caller: &Caller, headers: &HeaderMap) -> Result<IdempotencyKey, ApiError> {
    let text = headers.get("idempotency-key").and_then(|value| value.to_str().ok()).ok_or_else(|| {
        ApiError::new("idempotency_key_required", "requests that move money need an Idempotency-Key header")
    })?;
    IdempotencyKey::new(&caller.scope(), text)
        .map_err(|_| ApiError::field("invalid_request", "Idempotency-Key", "the key must be 1 to 255 bytes"))
}

async fn default_method_of(app: &AppState, organization: OrganizationId) -> Result<PaymentMethodId, ApiError> {
    app.read(move |state| state.payments.default_method.get(&organization).copied()).await?.ok_or_else(|| {
        ApiError::new("payment_method_required", "give a payment method: the organization has no default")
    })
}

#[utoipa::path(post, path = "/v1/wallets/{id}/top-ups", tag = "payments", summary = "Top up a wallet through the payment provider (taxes added; credited once the provider confirms)", request_body = CreateTopUp, params(("id" = String, Path, description = "wallet id"), ("Idempotency-Key" = String, Header, description = "required")), responses((status = 201, description = "the top-up: succeeded, failed, or pending until the provider confirms (also for a replayed Idempotency-Key, with the `Idempotent-Replayed: true` header)", body = TopUpShape), (status = 409, description = "`total_changed`: the taxes now give another total than the `total` reviewed; nothing was charged", body = crate::error::Problem, content_type = "application/problem+json"), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_top_up(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateTopUp>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    payments(&app)?;
    let key = idempotency_key(&caller, &headers)?;
    let (wallet, organization, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let amount = positive_money("amount", &body.amount, currency.code())?;
    let method = match &body.payment_method {
        Some(text) => parse_id("payment_method", text, PaymentMethodId::parse)?,
        None => default_method_of(&app, organization).await?,
    };
    let actor = (!caller.is_admin()).then_some(organization);
    let command = match &body.total {
        Some(total) => {
            let total = positive_money("total", total, currency.code())?;
            if !total.amount.is_whole_minor_units(currency) {
                return Err(ApiError::field(
                    "amount_not_in_minor_units",
                    "total",
                    "a total is charged to a card: whole minor units of the currency",
                ));
            }
            let total = total.amount;
            PaymentCommand::CreateReviewedTopUp { key, actor, wallet, amount, method, total }
        }
        None => PaymentCommand::CreateTopUp { key, actor, wallet, amount, method },
    };
    let Receipt::Payment(PaymentReceipt::TopUp { top_up, created, .. }) =
        app.execute(Command::payment(command)).await?
    else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let id = top_up.id;
    if top_up.status == PaymentStatus::Pending {
        drive_top_up(&app, id, true).await;
    }
    let view = app.read(move |state| state.payments.top_up(id).map(top_up_view)).await?.unwrap_or(Value::Null);
    Ok(created_or_replayed(view, created))
}

#[derive(Deserialize)]
struct TopUpQuery {
    limit: Option<u32>,
    before: Option<String>,
}

#[utoipa::path(get, path = "/v1/wallets/{id}/top-ups", tag = "payments", summary = "A wallet's top-ups, newest first", params(("id" = String, Path, description = "wallet id"), ("limit" = Option<u32>, Query, description = "page size, default 50, at most 500"), ("before" = Option<String>, Query, description = "cursor: the last top-up id seen (`next_cursor`)")), responses((status = 200, description = "the wallet's top-ups, newest first", body = TopUpList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_top_ups(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<TopUpQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (wallet, _, _) = owned_wallet_meta(&app, &caller, &id).await?;
    let before = match query.before.as_deref() {
        Some(cursor) => Some(parse_id("before", cursor, TopUpId::parse)?.0),
        None => None,
    };
    let (data, next) = app
        .read(move |state| {
            let older = before_cursor(&state.payments.top_ups, before);
            let top_ups = older.iter().rev().filter(|t| t.wallet == wallet);
            let (items, next) = page(top_ups, query.limit, |t| t.id.to_string());
            (items.into_iter().map(top_up_view).collect::<Vec<_>>(), next)
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

// ---- response shapes (OpenAPI only) ----

/// The taxes and total a top-up of an amount would charge now.
#[derive(ToSchema)]
pub struct TopUpQuote {
    /// Always `top_up_quote`.
    pub object: String,
    pub currency: String,
    /// What the wallet would get.
    pub amount: String,
    pub taxes: Vec<AppliedTax>,
    /// What the payment method would be charged (give it as the top-up's `total`).
    pub total: String,
}

/// A line of a receipt.
#[derive(ToSchema)]
pub struct ReceiptLine {
    pub description: String,
    pub amount: String,
}

/// The payment method a receipt was paid with (empty strings if it is unknown).
#[derive(ToSchema)]
pub struct ReceiptPaymentMethod {
    pub brand: String,
    pub last4: String,
}

/// The receipt of a succeeded top-up.
#[derive(ToSchema)]
pub struct TopUpReceipt {
    /// Always `receipt`.
    pub object: String,
    /// `R-00000001`
    pub number: String,
    /// When the top-up succeeded.
    pub date: String,
    /// The top-up's id.
    pub top_up: String,
    /// The organization's billing details (empty strings when it has none).
    pub billed_to: crate::schemas::BillingDetails,
    pub lines: Vec<ReceiptLine>,
    pub taxes: Vec<AppliedTax>,
    pub total: String,
    pub currency: String,
    pub payment_method: ReceiptPaymentMethod,
}

#[derive(Deserialize)]
struct QuoteQuery {
    amount: String,
}

#[utoipa::path(get, path = "/v1/wallets/{id}/top-up-quote", tag = "payments", summary = "The taxes and total a top-up of an amount would charge", params(("id" = String, Path, description = "wallet id"), ("amount" = String, Query, description = "what the wallet would get")), responses((status = 200, description = "the quote", body = TopUpQuote), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn top_up_quote(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<QuoteQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (_, organization, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let amount = positive_money("amount", &query.amount, currency.code())?;
    if !amount.amount.is_whole_minor_units(currency) {
        return Err(Rejection::AmountNotInMinorUnits.into());
    }
    let taxes = app
        .read(move |state| {
            let billing = state.organization(organization).and_then(|o| o.billing.as_deref()).cloned();
            let billing = billing.ok_or(Rejection::BillingDetailsRequired)?;
            compute_taxes(state.payments.tax_profile(&billing.country, &billing.region), amount.amount, currency)
        })
        .await??;
    let total = taxes.iter().map(|t| t.amount).sum::<i128>() + amount.amount.units();
    Ok(ok(json!({
        "object": "top_up_quote",
        "currency": currency.code(),
        "amount": views::amount(amount.amount, currency),
        "taxes": taxes_view(&taxes, currency),
        "total": money_text(total, currency),
    })))
}

async fn owned_top_up(
    app: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(TopUp, Option<PaymentMethod>, Option<BillingDetails>), ApiError> {
    let top_up = parse_id("top_up", id, TopUpId::parse)?;
    let found = app
        .read(move |state| {
            let t = state.payments.top_up(top_up)?.clone();
            let method = state.payments.method(t.method).cloned();
            let billing = state.organization(t.organization).and_then(|o| o.billing.as_deref()).cloned();
            Some((t, method, billing))
        })
        .await?;
    match found {
        Some(found) if caller.owns(found.0.organization) => Ok(found),
        _ => Err(ApiError::not_found()),
    }
}

#[utoipa::path(get, path = "/v1/top-ups/{id}", tag = "payments", summary = "A top-up", params(("id" = String, Path, description = "top-up id")), responses((status = 200, description = "the top-up", body = TopUpShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_top_up(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (top_up, _, _) = owned_top_up(&app, &caller, &id).await?;
    Ok(ok(top_up_view(&top_up)))
}

#[derive(Deserialize)]
struct ReceiptQuery {
    format: Option<String>,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

#[utoipa::path(get, path = "/v1/top-ups/{id}/receipt", tag = "payments", summary = "The receipt of a succeeded top-up, as JSON or (format=html) a printable page", params(("id" = String, Path, description = "top-up id"), ("format" = Option<String>, Query, description = "json (default) or html")), responses((status = 200, description = "the receipt: JSON, or with format=html a printable page", content((TopUpReceipt = "application/json"), (String = "text/html"))), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn top_up_receipt(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<ReceiptQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (top_up, method, billing) = owned_top_up(&app, &caller, &id).await?;
    let (Some(number), Some(settled_at)) = (top_up.receipt_number, top_up.settled_at) else {
        return Err(ApiError::new("not_found", "only a succeeded top-up has a receipt"));
    };
    let currency = top_up.currency;
    let billing = billing.unwrap_or_else(|| BillingDetails {
        legal_name: String::new(),
        email: String::new(),
        address: String::new(),
        country: String::new(),
        region: String::new(),
        tax_id: String::new(),
    });
    let (brand, last4) = method.map_or((String::new(), String::new()), |m| (m.brand.to_string(), m.last4.to_string()));
    let receipt = json!({
        "object": "receipt",
        "number": receipt_number(number),
        "date": time::format(settled_at),
        "top_up": top_up.id.to_string(),
        "billed_to": {
            "legal_name": billing.legal_name, "email": billing.email, "address": billing.address,
            "country": billing.country, "region": billing.region, "tax_id": billing.tax_id,
        },
        "lines": [{"description": "Wallet top-up", "amount": money_text(top_up.amount, currency)}],
        "taxes": taxes_view(&top_up.taxes, currency),
        "total": money_text(top_up.total, currency),
        "currency": currency.code(),
        "payment_method": {"brand": brand, "last4": last4},
    });
    if query.format.as_deref() != Some("html") {
        return Ok(ok(receipt));
    }
    let mut rows = format!(
        "<tr><td>Wallet top-up</td><td class=n>{} {}</td></tr>",
        money_text(top_up.amount, currency),
        currency.code()
    );
    for tax in &top_up.taxes {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=n>{} {}</td></tr>",
            escape(&tax.name),
            money_text(tax.amount, currency),
            currency.code()
        ));
    }
    let page = format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Receipt {number}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:2em auto;color:#111}}\
         table{{width:100%;border-collapse:collapse}}td{{padding:.3em;border-bottom:1px solid #ccc}}\
         .n{{text-align:right;font-variant-numeric:tabular-nums}}</style></head><body>\
         <h1>Receipt {number}</h1><p>Date: {date}</p>\
         <p>Billed to: {name}<br>{email}<br>{address}<br>{region} {country}<br>Tax id: {tax_id}</p>\
         <table>{rows}<tr><th>Total</th><th class=n>{total} {code}</th></tr></table>\
         <p>Paid with {brand} ending in {last4}.</p></body></html>",
        number = receipt_number(number),
        date = time::format(settled_at),
        name = escape(&billing.legal_name),
        email = escape(&billing.email),
        address = escape(&billing.address),
        region = escape(&billing.region),
        country = escape(&billing.country),
        tax_id = escape(&billing.tax_id),
        total = money_text(top_up.total, currency),
        code = currency.code(),
        brand = escape(&brand),
        last4 = escape(&last4),
    );
    Ok(([(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response())
}

// ---- checkouts ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateCheckout {
    consumer: String,
    merchant: String,
    amount: String,
    currency: String,
    #[serde(default)]
    description: String,
    /// Pay from the consumer's wallet first (default true).
    #[serde(default = "yes")]
    use_wallet: bool,
    /// Pays what the wallet does not; absent: the consumer's default method.
    #[serde(default)]
    payment_method: Option<String>,
}

fn yes() -> bool {
    true
}

#[utoipa::path(post, path = "/v1/checkouts", tag = "payments", summary = "Pay a merchant: the wallet first, a payment method for the rest", request_body = CreateCheckout, params(("Idempotency-Key" = String, Header, description = "required")), responses((status = 201, description = "the checkout: succeeded, failed, or pending until the provider confirms (also for a replayed Idempotency-Key, with the `Idempotent-Replayed: true` header)", body = CheckoutShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_checkout(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreateCheckout>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    payments(&app)?;
    let key = idempotency_key(&caller, &headers)?;
    let consumer = parse_id("consumer", &body.consumer, OrganizationId::parse)?;
    let merchant = parse_id("merchant", &body.merchant, OrganizationId::parse)?;
    // The consumer pays for itself (or the platform for it); a merchant cannot start
    // a payment out of someone else's wallet.
    if !caller.owns(consumer) {
        return Err(ApiError::not_found());
    }
    let amount = positive_money("amount", &body.amount, &body.currency)?;
    let method = match &body.payment_method {
        Some(text) => Some(parse_id("payment_method", text, PaymentMethodId::parse)?),
        None => app.read(move |state| state.payments.default_method.get(&consumer).copied()).await?,
    };
    text("description", &body.description, true)?;
    let actor = (!caller.is_admin()).then_some(consumer);
    let command = PaymentCommand::StartCheckout {
        key,
        actor,
        consumer,
        merchant,
        amount,
        use_wallet: body.use_wallet,
        method,
        description: body.description,
    };
    let Receipt::Payment(PaymentReceipt::Checkout { checkout, created, .. }) =
        app.execute(Command::payment(command)).await?
    else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let id = checkout.id;
    if checkout.status == PaymentStatus::Pending {
        drive_checkout(&app, id, true).await;
    }
    let view = app.read(move |state| state.payments.checkout(id).map(checkout_view)).await?.unwrap_or(Value::Null);
    Ok(created_or_replayed(view, created))
}

#[utoipa::path(get, path = "/v1/checkouts/{id}", tag = "payments", summary = "A checkout", params(("id" = String, Path, description = "checkout id")), responses((status = 200, description = "the checkout", body = CheckoutShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_checkout(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let checkout = parse_id("checkout", &id, CheckoutId::parse)?;
    let found = app.read(move |state| state.payments.checkout(checkout).cloned()).await?;
    match found {
        Some(c) if caller.owns(c.consumer) || caller.owns(c.merchant) => Ok(ok(checkout_view(&c))),
        _ => Err(ApiError::not_found()),
    }
}

// ---- refunds ----

pub(crate) fn refund_view(refund: &Refund) -> Value {
    let currency = refund.currency;
    let (kind, of) = match refund.of {
        RefundOf::TopUp(top_up) => ("top_up", top_up.to_string()),
        RefundOf::Payment(operation) => ("payment", operation.to_string()),
    };
    json!({
        "id": refund.id.to_string(),
        "object": "refund",
        "kind": kind,
        "of": of,
        "wallet": refund.wallet.to_string(),
        "organization": refund.organization.to_string(),
        "currency": currency.code(),
        "amount": money_text(refund.amount, currency),
        "taxes": taxes_view(&refund.taxes, currency),
        "total": money_text(refund.total, currency),
        "merchant_wallet": refund.merchant_wallet.map(|w| w.to_string()),
        "merchant_part": money_text(refund.merchant_part, currency),
        "platform_fee_part": money_text(refund.fee_part, currency),
        "reason": refund.reason.as_ref(),
        "status": refund.status,
        "created_at": time::format(refund.created_at),
        "settled_at": refund.settled_at.map(time::format),
        "operation": refund.operation.map(|o| o.to_string()),
        "reversal": refund.reversal.map(|o| o.to_string()),
        "failure_code": refund.failure_code.as_deref(),
    })
}

// ---- response shapes (OpenAPI only) ----

/// A refund of a top-up (to its payment method) or of a payment (back to the
/// consumer's wallet, from the merchant and the platform fee).
#[derive(ToSchema)]
#[schema(as = Refund)]
pub struct RefundShape {
    /// `ref_…`
    pub id: String,
    /// Always `refund`.
    pub object: String,
    /// `top_up` or `payment`.
    pub kind: String,
    /// What is refunded: the top-up id, or the payment's operation id.
    pub of: String,
    /// The consumer's wallet the money leaves (top-up) or returns to (payment).
    pub wallet: String,
    pub organization: String,
    pub currency: String,
    pub amount: String,
    /// Taxes refunded with a top-up refund (empty for payments).
    pub taxes: Vec<AppliedTax>,
    /// What goes back to the payment method (amount plus taxes); `0` for payments.
    pub total: String,
    /// For a payment refund: the merchant's wallet; null for top-ups.
    pub merchant_wallet: Option<String>,
    /// For a payment refund: what the merchant gives back.
    pub merchant_part: String,
    /// For a payment refund: what the platform's fee gives back.
    pub platform_fee_part: String,
    /// Empty when none was given.
    pub reason: String,
    /// `pending` (until the provider confirms), `succeeded` or `failed`.
    pub status: String,
    pub created_at: String,
    pub settled_at: Option<String>,
    /// The operation that moved the money.
    pub operation: Option<String>,
    /// The operation that put the money back when the provider refused the refund.
    pub reversal: Option<String>,
    pub failure_code: Option<String>,
}

/// The provider's webhook was accepted.
#[derive(ToSchema)]
pub struct ProviderWebhookReceived {
    /// Always true.
    pub received: bool,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateRefund {
    /// Absent: all that is left to refund.
    #[serde(default)]
    amount: Option<String>,
    #[serde(default)]
    reason: String,
}

async fn refund_answer(app: &Arc<AppState>, command: PaymentCommand) -> ApiResult {
    let Receipt::Payment(PaymentReceipt::Refund { refund, created, .. }) =
        app.execute(Command::payment(command)).await?
    else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let id = refund.id;
    if refund.status == PaymentStatus::Pending {
        drive_refund(app, id, true).await;
    }
    let view = app.read(move |state| state.payments.refunds.get(id.0 as usize - 1).map(refund_view)).await?;
    Ok(created_or_replayed(view.unwrap_or(Value::Null), created))
}

#[utoipa::path(post, path = "/v1/top-ups/{id}/refunds", tag = "payments", summary = "Refund a top-up's unspent money (and its taxes in proportion) to its payment method (platform)", request_body = CreateRefund, params(("id" = String, Path, description = "top-up id"), ("Idempotency-Key" = String, Header, description = "required")), responses((status = 201, description = "the refund: succeeded, failed, or pending until the provider confirms (also for a replayed Idempotency-Key, with the `Idempotent-Replayed: true` header)", body = RefundShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn refund_top_up(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateRefund>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_admin()?;
    payments(&app)?;
    let key = idempotency_key(&caller, &headers)?;
    let (top_up, _, _) = owned_top_up(&app, &caller, &id).await?;
    let amount = match &body.amount {
        Some(text) => Some(positive_money("amount", text, top_up.currency.code())?.amount),
        None => None,
    };
    text("reason", &body.reason, true)?;
    refund_answer(&app, PaymentCommand::RefundTopUp { key, top_up: top_up.id, amount, reason: body.reason }).await
}

#[utoipa::path(post, path = "/v1/operations/{id}/refunds", tag = "payments", summary = "Refund a charge or checkout to the consumer, taken from the merchant and the platform fee in proportion (the merchant or the platform)", request_body = CreateRefund, params(("id" = String, Path, description = "operation id"), ("Idempotency-Key" = String, Header, description = "required")), responses((status = 201, description = "the refund (also for a replayed Idempotency-Key, with the `Idempotent-Replayed: true` header)", body = RefundShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn refund_operation(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CreateRefund>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let key = idempotency_key(&caller, &headers)?;
    let id = parse_id("operation", &id, OperationId::parse)?;
    let operation = app.history(move |reader| reader.operation(id)).await?.ok_or_else(ApiError::not_found)?;
    // Only the payee (the merchant) or the platform gives money back.
    let payee = operation.legs.iter().find_map(|leg| match leg.account {
        Account::Wallet(wallet) if leg.amount.units() > 0 => Some(wallet),
        _ => None,
    });
    let owner = match payee {
        Some(wallet) => app.wallet_meta(wallet).await?.map(|(owner, _)| owner),
        None => None,
    };
    if !owner.is_some_and(|o| caller.owns(o)) {
        return Err(ApiError::not_found());
    }
    let amount = match &body.amount {
        Some(text) => Some(positive_money("amount", text, operation.currency.code())?.amount),
        None => None,
    };
    text("reason", &body.reason, true)?;
    refund_answer(
        &app,
        PaymentCommand::RefundPayment { key, operation: Box::new(operation), amount, reason: body.reason },
    )
    .await
}

#[utoipa::path(get, path = "/v1/refunds/{id}", tag = "payments", summary = "A refund", params(("id" = String, Path, description = "refund id")), responses((status = 200, description = "the refund", body = RefundShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_refund(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let refund = parse_id("refund", &id, RefundId::parse)?;
    let found = app
        .read(move |state| {
            let r = state.payments.refunds.get(usize::try_from(refund.0).ok()?.checked_sub(1)?)?.clone();
            let merchant = r.merchant_wallet.and_then(|w| state.wallet(w)).map(|w| w.organization);
            Some((r, merchant))
        })
        .await?;
    match found {
        Some((r, merchant)) if caller.owns(r.organization) || merchant.is_some_and(|m| caller.owns(m)) => {
            Ok(ok(refund_view(&r)))
        }
        _ => Err(ApiError::not_found()),
    }
}

/// Largest provider webhook body.
const PROVIDER_WEBHOOK_BYTES_MAX: usize = 256 * 1024;

#[utoipa::path(post, path = "/v1/provider-webhooks/stripe", tag = "payments", summary = "Stripe's webhooks (signed with the configured secret): a payment intent changed, so Tally asks Stripe where it stands and settles it", responses((status = 200, description = "received; the payment is settled in the background", body = ProviderWebhookReceived), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")))]
async fn stripe_webhook(AxumState(app): App, headers: HeaderMap, body: Bytes) -> ApiResult {
    let payments = payments(&app)?;
    let Some(secret) = payments.config.webhook_secret.as_deref() else {
        return Err(ApiError::new("not_found", "provider webhooks are not configured"));
    };
    if body.len() > PROVIDER_WEBHOOK_BYTES_MAX {
        return Err(ApiError::new("payload_too_large", "webhook body too large"));
    }
    let signature = headers.get("stripe-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let now_s = app.now() / 1000;
    stripe::verify_webhook_signature(signature, &body, secret, now_s, stripe::WEBHOOK_TOLERANCE_S).map_err(
        |error| ApiError::new("invalid_signature", format!("the Stripe-Signature header does not verify: {error}")),
    )?;
    let event: Value =
        serde_json::from_slice(&body).map_err(|error| ApiError::new("invalid_request", error.to_string()))?;
    // The event only says something changed; what it says may be stale or repeated, so
    // Tally asks the provider for the payment's state now and settles from that.
    let tally_id = event["data"]["object"]["metadata"]["tally_id"].as_str().unwrap_or_default();
    if let Some(top_up) = TopUpId::parse(tally_id) {
        let app = app.clone();
        tokio::spawn(async move { drive_top_up(&app, top_up, false).await });
    } else if let Some(checkout) = CheckoutId::parse(tally_id) {
        let app = app.clone();
        tokio::spawn(async move { drive_checkout(&app, checkout, false).await });
    }
    Ok(ok(json!({"received": true})))
}

/// Asks the provider to refund a pending top-up refund (idempotent by the refund's id).
pub(crate) async fn drive_refund(app: &Arc<AppState>, id: RefundId, wait: bool) {
    let Some(payments) = app.payments.clone() else { return };
    let key = id.to_string();
    let Some(_driving) = payments.begin_or_wait(&key, wait).await else { return };
    let found = app
        .read(move |state| {
            let refund = state.payments.refunds.get(usize::try_from(id.0).ok()?.checked_sub(1)?)?.clone();
            let RefundOf::TopUp(top_up) = refund.of else { return None };
            let reference = state.payments.top_up(top_up)?.provider_reference.as_deref()?.to_string();
            Some((refund, reference))
        })
        .await;
    let Ok(Some((refund, reference))) = found else { return };
    if refund.status != PaymentStatus::Pending {
        payments.forget(&key);
        return;
    }
    let outcome = match payments.provider.refund(&reference, minor_units(refund.total, refund.currency), &key).await {
        Ok(_) => ProviderOutcome::Succeeded { reference },
        Err(ProviderError::Invalid { code, message }) => ProviderOutcome::Failed { code, message },
        Err(error) => {
            tracing::warn!(refund = %key, %error, "refund left pending; will retry");
            return;
        }
    };
    app.metrics.count_payment("refund", outcome_text(&outcome));
    match app.execute(Command::payment(PaymentCommand::SettleRefund { refund: id, outcome })).await {
        Ok(_) => payments.forget(&key),
        Err(error) => tracing::warn!(refund = %key, code = error.code, "settling a refund failed; will retry"),
    }
}

// ---- talking to the provider ----

/// What a provider's state means for a pending record, once captured if authorized.
enum Step {
    Settle(ProviderOutcome),
    Wait,
}

/// Asks the provider about the payment under `key` (or starts it), captures it when
/// authorized, and says what the ledger should record.
async fn provider_step(payments: &Payments, request: &PaymentRequest) -> Result<Step, ProviderError> {
    let provider = &payments.provider;
    let payment = match provider.lookup(&request.idempotency_key).await? {
        Some(payment) => payment,
        None => match provider.authorize(request).await {
            Ok(payment) => payment,
            Err(ProviderError::Invalid { code, message }) => {
                return Ok(Step::Settle(ProviderOutcome::Failed { code, message }))
            }
            Err(error) => return Err(error),
        },
    };
    let payment = match payment.state {
        PaymentState::Authorized => provider.capture(&payment.reference, payment.amount_minor).await?,
        _ => payment,
    };
    Ok(match payment.state {
        PaymentState::Captured => {
            if payments.config.abort_after_capture {
                tracing::error!(key = %request.idempotency_key, "fault injection: aborting after the provider's capture");
                std::process::abort();
            }
            Step::Settle(ProviderOutcome::Succeeded { reference: payment.reference })
        }
        PaymentState::Failed { code, message } => Step::Settle(ProviderOutcome::Failed { code, message }),
        PaymentState::Canceled => Step::Settle(ProviderOutcome::Failed {
            code: "canceled".into(),
            message: "the payment was canceled at the provider".into(),
        }),
        PaymentState::Pending | PaymentState::Authorized => Step::Wait,
    })
}

fn outcome_text(outcome: &ProviderOutcome) -> &'static str {
    match outcome {
        ProviderOutcome::Succeeded { .. } => "succeeded",
        ProviderOutcome::Failed { .. } => "failed",
    }
}

fn minor_units(units: i128, currency: Currency) -> i64 {
    (units / currency.units_per_minor()) as i64
}

/// Drives a pending top-up as far as the provider allows; errors are logged and the
/// worker tries again later.
pub(crate) async fn drive_top_up(app: &Arc<AppState>, id: TopUpId, wait: bool) {
    let Some(payments) = app.payments.clone() else { return };
    let key = id.to_string();
    let Some(_driving) = payments.begin_or_wait(&key, wait).await else { return };
    let found = app
        .read(move |state| {
            let top_up = state.payments.top_up(id)?.clone();
            let token = state.payments.method(top_up.method)?.token.to_string();
            Some((top_up, token))
        })
        .await;
    let Ok(Some((top_up, token))) = found else { return };
    if top_up.status != PaymentStatus::Pending {
        payments.forget(&key);
        return;
    }
    let request = PaymentRequest {
        idempotency_key: key.clone(),
        amount_minor: minor_units(top_up.total, top_up.currency),
        currency: top_up.currency.code().to_string(),
        method_token: token,
        description: format!("Tally wallet top-up {key}"),
    };
    match provider_step(&payments, &request).await {
        Ok(Step::Settle(outcome)) => {
            app.metrics.count_payment("top_up", outcome_text(&outcome));
            let command = Command::payment(PaymentCommand::SettleTopUp { top_up: id, outcome });
            match app.execute(command).await {
                Ok(_) => payments.forget(&key),
                Err(error) => tracing::warn!(top_up = %key, code = error.code, "settling a top-up failed; will retry"),
            }
        }
        Ok(Step::Wait) => app.metrics.count_payment("top_up", "pending"),
        Err(error) => {
            app.metrics.count_payment("top_up", "pending");
            tracing::warn!(top_up = %key, %error, "top-up left pending; will retry")
        }
    }
}

pub(crate) async fn drive_checkout(app: &Arc<AppState>, id: CheckoutId, wait: bool) {
    let Some(payments) = app.payments.clone() else { return };
    let key = id.to_string();
    let Some(_driving) = payments.begin_or_wait(&key, wait).await else { return };
    let found = app
        .read(move |state| {
            let checkout = state.payments.checkout(id)?.clone();
            let token = checkout.method.and_then(|m| state.payments.method(m)).map(|m| m.token.to_string());
            Some((checkout, token))
        })
        .await;
    let Ok(Some((checkout, Some(token)))) = found else { return };
    if checkout.status != PaymentStatus::Pending {
        payments.forget(&key);
        return;
    }
    let request = PaymentRequest {
        idempotency_key: key.clone(),
        amount_minor: minor_units(checkout.card_part, checkout.currency),
        currency: checkout.currency.code().to_string(),
        method_token: token,
        description: format!("Tally checkout {key}"),
    };
    let outcome = match provider_step(&payments, &request).await {
        Ok(Step::Settle(outcome)) => {
            app.metrics.count_payment("checkout", outcome_text(&outcome));
            outcome
        }
        Ok(Step::Wait) => {
            app.metrics.count_payment("checkout", "pending");
            return;
        }
        Err(error) => {
            app.metrics.count_payment("checkout", "pending");
            tracing::warn!(checkout = %key, %error, "checkout left pending; will retry");
            return;
        }
    };
    let command = Command::payment(PaymentCommand::SettleCheckout { checkout: id, outcome: outcome.clone() });
    match app.execute(command).await {
        Ok(Receipt::Payment(PaymentReceipt::Checkout { checkout: settled, .. })) => {
            payments.forget(&key);
            // The card was captured but the wallet part could not be (its hold
            // expired): give the card its money back.
            if let (ProviderOutcome::Succeeded { reference }, PaymentStatus::Failed) = (&outcome, settled.status) {
                let refund_key = format!("{key}-refund");
                if let Err(error) = payments.provider.refund(reference, request.amount_minor, &refund_key).await {
                    tracing::error!(checkout = %key, %error, "refunding the card part of a failed checkout failed");
                }
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(checkout = %key, code = error.code, "settling a checkout failed; will retry"),
    }
}

/// The background worker: starts due auto top-ups and asks the provider again about
/// pending payments (slow confirmations, and whatever a crash left pending).
pub fn spawn_worker(app: Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    let payments = app.payments.clone()?;
    Some(tokio::spawn(async move {
        let mut interval = tokio::time::interval(payments.config.poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let now = app.now();
            let Ok((due, top_ups, checkouts, refunds)) = app
                .read(move |state| {
                    let p = &state.payments;
                    let due: Vec<WalletId> =
                        p.auto_due.iter().take_while(|(at, _)| *at <= now).map(|(_, w)| *w).collect();
                    let top_ups: Vec<TopUpId> = p.pending_top_ups.iter().copied().take(LISTED_MAX).collect();
                    let checkouts: Vec<CheckoutId> = p.pending_checkouts.iter().copied().take(LISTED_MAX).collect();
                    let refunds: Vec<RefundId> = p.pending_refunds.iter().copied().take(LISTED_MAX).collect();
                    (due, top_ups, checkouts, refunds)
                })
                .await
            else {
                continue;
            };
            for wallet in due {
                match app.execute(Command::payment(PaymentCommand::StartAutoTopUp { wallet })).await {
                    Ok(Receipt::Payment(PaymentReceipt::TopUp { top_up, .. })) => {
                        spawn_drive(&app, &payments, Pending::TopUp(top_up.id))
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%wallet, code = error.code, "starting an auto top-up failed"),
                }
            }
            for id in top_ups {
                if payments.due(&id.to_string()) {
                    spawn_drive(&app, &payments, Pending::TopUp(id));
                }
            }
            for id in checkouts {
                if payments.due(&id.to_string()) {
                    spawn_drive(&app, &payments, Pending::Checkout(id));
                }
            }
            for id in refunds {
                if payments.due(&id.to_string()) {
                    spawn_drive(&app, &payments, Pending::Refund(id));
                }
            }
        }
    }))
}

enum Pending {
    TopUp(TopUpId),
    Checkout(CheckoutId),
    Refund(RefundId),
}

fn spawn_drive(app: &Arc<AppState>, payments: &Arc<Payments>, pending: Pending) {
    let Ok(permit) = payments.drives.try_acquire() else { return };
    permit.forget();
    let (app, payments) = (app.clone(), payments.clone());
    tokio::spawn(async move {
        match pending {
            Pending::TopUp(id) => drive_top_up(&app, id, false).await,
            Pending::Checkout(id) => drive_checkout(&app, id, false).await,
            Pending::Refund(id) => drive_refund(&app, id, false).await,
        }
        payments.drives.add_permits(1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_numbers_are_found_in_any_shape() {
        for body in [
            &br#"{"token":"pm_card_visa","number":"4242424242424242"}"#[..],
            br#"{"pan":"4242 4242 4242 4242"}"#,
            br#"{"x":"5555-5555-5555-4444"}"#,
            b"378282246310005",
            br#"{"card":{"n":4000056655665556}}"#,
        ] {
            assert!(contains_card_number(body), "{}", String::from_utf8_lossy(body));
        }
        for body in [
            &br#"{"token":"pm_card_visa","default":true}"#[..],
            br#"{"n":"4242424242424241"}"#,
            br#"{"id":"1234567890"}"#,
            br#"{"amount":"20.00","exp_year":2034}"#,
        ] {
            assert!(!contains_card_number(body), "{}", String::from_utf8_lossy(body));
        }
    }
}
