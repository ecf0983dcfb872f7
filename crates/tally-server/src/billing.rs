//! Usage billing over HTTP: the catalog (products, meters, plans), subscriptions, usage
//! events (one or a batch), access checks with reservations, usage summaries and wallet
//! statements (JSON or CSV).

use super::*;
use crate::views::amount as format_amount;
use std::collections::BTreeMap;
use tally_ledger::billing::*;
use tally_store::UsageRecord;
use utoipa::ToSchema;
use utoipa_axum::routes;

/// Largest usage batch body: 10,000 events of a few hundred bytes each.
pub const BATCH_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Most usage records a summary reads, and movements a statement reads.
const SUMMARY_RECORDS_MAX: u32 = 1_000_000;

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<Arc<AppState>> {
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(create_product, list_products))
        .routes(routes!(create_meter, list_meters))
        .routes(routes!(create_plan, list_plans))
        .routes(routes!(get_plan))
        .routes(routes!(archive_plan))
        .routes(routes!(subscribe, list_subscriptions))
        .routes(routes!(get_subscription))
        .routes(routes!(cancel_subscription))
        .routes(routes!(usage_summary))
        .routes(routes!(report_usage))
        .routes(routes!(access_check))
        .routes(routes!(statement))
        .merge(
            utoipa_axum::router::OpenApiRouter::new()
                .routes(routes!(report_usage_batch))
                .layer(DefaultBodyLimit::max(BATCH_BODY_BYTES_MAX)),
        )
}

/// The merchant a catalog or usage request acts for: an organization key acts for its
/// own organization; an admin key names one.
fn merchant_of(caller: &Caller, named: Option<&str>) -> Result<OrganizationId, ApiError> {
    match (caller, named) {
        (Caller::Organization { organization, .. }, None) => Ok(*organization),
        (Caller::Organization { organization, .. }, Some(text)) => {
            let named = parse_id("merchant", text, OrganizationId::parse)?;
            if named == *organization {
                Ok(named)
            } else {
                Err(ApiError::not_found())
            }
        }
        (Caller::Admin { .. }, Some(text)) => parse_id("merchant", text, OrganizationId::parse),
        (Caller::Admin { .. }, None) => Err(ApiError::invalid("merchant", "an admin key must name the merchant")),
    }
}

pub(crate) fn fee_rate(field: &str, text: &str) -> Result<PartsPerMillion, ApiError> {
    let value = Amount::parse(text).map_err(|e| ApiError::field("invalid_amount", field, e.to_string()))?;
    let units = value.units();
    // A rate of 1 is 10^12 ledger units and 10^6 parts per million.
    if !(0..=1_000_000_000_000).contains(&units) || units % 1_000_000 != 0 {
        return Err(ApiError::invalid(field, "a fraction from 0 to 1 with at most 6 decimals (0.05 is 5%)"));
    }
    Ok(PartsPerMillion((units / 1_000_000) as u32))
}

fn price_amount(field: &str, text: &str) -> Result<Amount, ApiError> {
    let value = Amount::parse(text).map_err(|e| ApiError::field("invalid_amount", field, e.to_string()))?;
    if value.units() < 0 {
        return Err(ApiError::field("invalid_price", field, "prices cannot be negative"));
    }
    Ok(value)
}

fn quantity(field: &str, text: &str) -> Result<Quantity, ApiError> {
    Quantity::parse(text).map_err(|r| ApiError::field(r.code(), field, r.to_string()))
}

fn properties(map: &BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// ---- views ----

fn product_view(product: &Product) -> Value {
    json!({
        "id": product.id.to_string(),
        "object": "product",
        "merchant": product.merchant.to_string(),
        "name": &*product.name,
        "created_at": time::format(product.created_at),
    })
}

fn meter_view(meter: &Meter) -> Value {
    json!({
        "id": meter.id.to_string(),
        "object": "meter",
        "merchant": meter.merchant.to_string(),
        "code": &*meter.code,
        "unit": &*meter.unit,
        "aggregation": meter.aggregation,
        "product": meter.product.map(|p| p.to_string()),
        "created_at": time::format(meter.created_at),
    })
}

fn price_view(state: &State, price: &Price) -> Value {
    let meter = state.meter(price.meter).map(|m| m.code.to_string()).unwrap_or_default();
    let text = |a: &Amount| a.format(0);
    let model = match &price.model {
        PriceModel::PerUnit { unit_price } => json!({"model": "per_unit", "unit_price": text(unit_price)}),
        PriceModel::Package { size, package_price } => {
            json!({"model": "package", "package_size": size.format(), "package_price": text(package_price)})
        }
        PriceModel::Graduated { tiers } => json!({"model": "graduated", "tiers": tiers.iter().map(|t| json!({
            "up_to": t.up_to.map(|q| q.format()), "unit_price": text(&t.unit_price)
        })).collect::<Vec<_>>()}),
        PriceModel::Dimensional { property, values, default } => json!({
            "model": "dimensional",
            "property": property,
            "values": values.iter().map(|(name, price)| (name.clone(), Value::String(text(price)))).collect::<serde_json::Map<_, _>>(),
            "default_unit_price": default.as_ref().map(text),
        }),
    };
    let mut view = json!({"meter": meter, "meter_id": price.meter.to_string()});
    if let (Some(view), Some(model)) = (view.as_object_mut(), model.as_object()) {
        view.extend(model.clone());
    }
    view
}

fn plan_view(state: &State, plan: &PricePlan) -> Value {
    let spec = &plan.spec;
    json!({
        "id": plan.id.to_string(),
        "object": "plan",
        "merchant": spec.merchant.to_string(),
        "name": spec.name,
        "version": plan.version,
        "replaces": spec.replaces.map(|p| p.to_string()),
        "status": if plan.superseded { "archived" } else { "active" },
        "currency": spec.currency.code(),
        "billing_period": spec.period,
        "recurring_fee": spec.recurring_fee.map(|f| format_amount(f, spec.currency)),
        "platform_fee_rate": spec.platform_fee.map(|r| Amount::from_units(i128::from(r.0) * 1_000_000).format(0)),
        "prices": spec.prices.iter().map(|p| price_view(state, p)).collect::<Vec<_>>(),
        "created_at": time::format(plan.created_at),
    })
}

fn subscription_view(state: &State, subscription: &Subscription) -> Value {
    let currency = state.wallet(subscription.wallet).map(|w| w.currency);
    let plan = state.plan(subscription.plan);
    json!({
        "id": subscription.id.to_string(),
        "object": "subscription",
        "consumer": subscription.consumer.to_string(),
        "merchant": subscription.merchant.to_string(),
        "plan": subscription.plan.to_string(),
        "wallet": subscription.wallet.to_string(),
        "status": subscription.status,
        "current_period_start": time::format(subscription.period_start),
        "current_period_end": time::format(subscription.period_end),
        "cancel_at_period_end": subscription.cancel_at_period_end,
        "outstanding": currency.map(|c| format_amount(Amount::from_units(subscription.outstanding), c)),
        "created_at": time::format(subscription.created_at),
        "canceled_at": subscription.canceled_at.map(time::format),
        "usage": plan.map(|plan| plan.spec.prices.iter().zip(&subscription.meters).map(|(price, period)| json!({
            "meter": state.meter(price.meter).map(|m| m.code.to_string()),
            "quantity": period.quantity.format(),
            "amount": currency.map(|c| format_amount(Amount::from_units(period.charged), c)),
        })).collect::<Vec<_>>()),
    })
}

/// Where part of a charge came from: a grant, or the main balance.
#[derive(serde::Serialize)]
struct ChargePart {
    source: String,
    amount: String,
}

/// A charged event as the API shows it. Typed rather than built as a JSON value: a batch
/// answers with ten thousand of these.
#[derive(serde::Serialize)]
struct ChargeAnswer<'a> {
    event_id: &'a str,
    status: &'static str,
    subscription: String,
    quantity: String,
    amount: String,
    platform_fee: String,
    currency: &'a str,
    operation: Option<String>,
    charges: Vec<ChargePart>,
    balance_after: Option<String>,
    reservation: Option<String>,
    reservation_released: Option<String>,
    low_balance: bool,
}

/// A charged event as the API shows it, from the ledger's receipt.
fn charge_view(event_id: &str, charge: &UsageCharge, currency: Currency) -> Value {
    serde_json::to_value(charge_answer(event_id, charge, &currency)).unwrap_or(Value::Null)
}

fn charge_answer<'a>(event_id: &'a str, charge: &UsageCharge, currency: &'a Currency) -> ChargeAnswer<'a> {
    let currency_value = *currency;
    let leg = charge.operation.as_ref().map(|o| &o.legs[0]);
    let from_grants: i128 = leg.map_or(0, |l| l.grants.iter().map(|g| -g.amount.units()).sum());
    let mut charges: Vec<ChargePart> = leg.map_or_else(Vec::new, |l| {
        l.grants
            .iter()
            .map(|g| ChargePart {
                source: g.grant.to_string(),
                amount: format_amount(Amount::from_units(-g.amount.units()), currency_value),
            })
            .collect()
    });
    let main = charge.amount.units() - from_grants;
    if main > 0 {
        charges.push(ChargePart {
            source: "main".into(),
            amount: format_amount(Amount::from_units(main), currency_value),
        });
    }
    ChargeAnswer {
        event_id,
        status: "charged",
        subscription: charge.subscription.to_string(),
        quantity: charge.quantity.format(),
        amount: format_amount(charge.amount, currency_value),
        platform_fee: format_amount(charge.fee, currency_value),
        currency: currency.code(),
        operation: charge.operation.as_ref().map(|o| o.id.to_string()),
        charges,
        balance_after: leg.map(|l| format_amount(l.balance_after, currency_value)),
        reservation: charge.reservation.map(|h| h.to_string()),
        reservation_released: charge.released.map(|r| format_amount(r, currency_value)),
        low_balance: charge.low_balance,
    }
}

/// The first result of a duplicate event, from history.
fn record_view(event_id: &str, record: &UsageRecord, currency: Currency) -> Value {
    json!({
        "event_id": event_id,
        "status": "charged",
        "subscription": record.subscription.to_string(),
        "quantity": record.quantity.format(),
        "amount": format_amount(record.amount, currency),
        "platform_fee": format_amount(record.fee, currency),
        "currency": currency.code(),
        "operation": record.operation.map(|o| o.to_string()),
        "balance_after": record.balance_after.map(|b| format_amount(b, currency)),
        "reservation": record.reservation.map(|h| h.to_string()),
    })
}

// ---- response shapes (OpenAPI only) ----
//
// The fields the views above send. Amounts are decimal strings in the major unit, ids
// prefixed strings, times RFC 3339.

/// A product in a merchant's catalog.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = Product)]
pub struct ProductShape {
    /// `prd_…`
    pub id: String,
    /// Always `product`.
    pub object: String,
    /// The merchant organization's id.
    pub merchant: String,
    pub name: String,
    pub created_at: String,
}
crate::schemas::list!(
    ProductList,
    ProductShape,
    "A page of a merchant's products, oldest first; `next_cursor` goes in `after`."
);

/// What a merchant measures usage in.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = Meter)]
pub struct MeterShape {
    /// `mtr_…`
    pub id: String,
    /// Always `meter`.
    pub object: String,
    pub merchant: String,
    /// Unique per merchant; usage events and prices name the meter by it.
    pub code: String,
    pub unit: String,
    /// `sum` of quantities or `count` of events.
    pub aggregation: String,
    /// The product it belongs to, if any.
    pub product: Option<String>,
    pub created_at: String,
}
crate::schemas::list!(
    MeterList,
    MeterShape,
    "A page of a merchant's meters, oldest first; `next_cursor` goes in `after`."
);

/// One tier of a graduated price.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = PlanPriceTier)]
pub struct PlanPriceTierShape {
    /// The period quantity this tier ends at; null on the last tier.
    pub up_to: Option<String>,
    pub unit_price: String,
}

/// How one meter is priced. `model` says which of the optional fields are present:
/// `per_unit` → `unit_price`; `package` → `package_size`, `package_price`; `graduated`
/// → `tiers`; `dimensional` → `property`, `values`, `default_unit_price`.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = PlanPrice)]
pub struct PlanPriceShape {
    /// The meter's code (empty if the meter is gone).
    pub meter: String,
    /// The meter's id.
    pub meter_id: String,
    /// `per_unit`, `package`, `graduated` or `dimensional`.
    pub model: String,
    /// `per_unit` only.
    #[schema(nullable = false)]
    pub unit_price: Option<String>,
    /// `package` only: the quantity one package covers.
    #[schema(nullable = false)]
    pub package_size: Option<String>,
    /// `package` only.
    #[schema(nullable = false)]
    pub package_price: Option<String>,
    /// `graduated` only.
    #[schema(nullable = false)]
    pub tiers: Option<Vec<PlanPriceTierShape>>,
    /// `dimensional` only: the event property the price depends on.
    #[schema(nullable = false)]
    pub property: Option<String>,
    /// `dimensional` only: the unit price per property value.
    #[schema(nullable = false)]
    pub values: Option<BTreeMap<String, String>>,
    /// `dimensional` only: the unit price of other values; null when they are refused.
    pub default_unit_price: Option<String>,
}

/// A price plan version. Plans never change: a change is a new version (`replaces`).
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = Plan)]
pub struct PlanShape {
    /// `pln_…`
    pub id: String,
    /// Always `plan`.
    pub object: String,
    pub merchant: String,
    pub name: String,
    /// 1 for a new plan, one more for each version that replaces it.
    pub version: u32,
    /// The plan this one is a new version of.
    pub replaces: Option<String>,
    /// `active`, or `archived` once archived or replaced by a newer version.
    pub status: String,
    /// ISO 4217.
    pub currency: String,
    /// `day`, `week` or `month`.
    pub billing_period: String,
    /// Charged at the start of each period, if any.
    pub recurring_fee: Option<String>,
    /// The platform's fee as a fraction (`0.05` is 5%); null: the platform's default.
    pub platform_fee_rate: Option<String>,
    pub prices: Vec<PlanPriceShape>,
    pub created_at: String,
}
crate::schemas::list!(
    PlanList,
    PlanShape,
    "A page of a merchant's plans (every version), oldest first; `next_cursor` goes in `after`."
);

/// A subscription's usage of one priced meter in the current period.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = SubscriptionUsage)]
pub struct SubscriptionUsageShape {
    /// The meter's code; null if the meter is gone.
    pub meter: Option<String>,
    pub quantity: String,
    /// Charged for this meter in the period; null if the wallet is gone.
    pub amount: Option<String>,
}

/// A consumer's subscription to a merchant's plan.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = Subscription)]
pub struct SubscriptionShape {
    /// `sub_…`
    pub id: String,
    /// Always `subscription`.
    pub object: String,
    /// The paying organization.
    pub consumer: String,
    pub merchant: String,
    /// The plan version subscribed to.
    pub plan: String,
    /// The consumer's wallet that pays.
    pub wallet: String,
    /// `active`, `past_due` or `canceled`.
    pub status: String,
    pub current_period_start: String,
    pub current_period_end: String,
    pub cancel_at_period_end: bool,
    /// Owed and not yet paid (a recurring fee the wallet could not cover); null if the
    /// wallet is gone.
    pub outstanding: Option<String>,
    pub created_at: String,
    pub canceled_at: Option<String>,
    /// One line per priced meter of the plan, in the plan's order; null if the plan is gone.
    pub usage: Option<Vec<SubscriptionUsageShape>>,
    /// Only in the answer that creates the subscription: the operation that charged the
    /// first period's recurring fee, or null when none was charged.
    pub first_fee_operation: Option<String>,
}
/// A page of subscriptions, oldest first.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct SubscriptionList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<SubscriptionShape>,
    /// The cursor of the next page (give it as `after`), or null on the last one.
    pub next_cursor: Option<String>,
}

/// Part of a usage charge paid from one source.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct UsageChargeSource {
    /// A grant id, or `main` for the wallet's own balance.
    pub source: String,
    pub amount: String,
}

/// A usage event rated and charged.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = UsageCharge)]
pub struct UsageChargeShape {
    /// The merchant's id for the event.
    pub event_id: String,
    /// Always `charged`.
    pub status: String,
    pub subscription: String,
    /// The quantity counted (1 for counting meters).
    pub quantity: String,
    /// What the consumer paid.
    pub amount: String,
    /// The platform's part of `amount`.
    pub platform_fee: String,
    pub currency: String,
    /// The charge's operation; null when the event cost less than one ledger unit so far
    /// (the fraction is carried to the next event).
    pub operation: Option<String>,
    /// Where the money came from: grants first, then `main`.
    pub charges: Vec<UsageChargeSource>,
    /// The consumer wallet's balance after the charge; null when `operation` is.
    pub balance_after: Option<String>,
    /// The reservation captured from, if the event named one.
    pub reservation: Option<String>,
    /// What went back to the wallet when the event finished its reservation.
    pub reservation_released: Option<String>,
    /// This charge took the wallet's available balance below its low-balance threshold
    /// (true once per crossing; a `balance.low` event is recorded).
    pub low_balance: bool,
}

/// A usage event's first result, as history keeps it.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = UsageRecord)]
pub struct UsageRecordShape {
    pub event_id: String,
    /// Always `charged`.
    pub status: String,
    pub subscription: String,
    pub quantity: String,
    pub amount: String,
    pub platform_fee: String,
    pub currency: String,
    pub operation: Option<String>,
    pub balance_after: Option<String>,
    pub reservation: Option<String>,
}

/// A usage event whose id was already reported: nothing is charged again.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct UsageDuplicate {
    pub event_id: String,
    /// Always `duplicate`.
    pub status: String,
    /// `duplicate_event`.
    pub code: String,
    pub detail: String,
    /// The first event's result; null if history does not have it.
    pub original: Option<UsageRecordShape>,
}

/// A usage event refused (in a batch; a single event's refusal is a problem+json).
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct UsageRejected {
    pub event_id: String,
    /// Always `rejected`.
    pub status: String,
    /// The stable error code, for example `no_active_subscription` or `insufficient_funds`.
    pub code: String,
    pub detail: String,
}

/// One event's outcome in a batch.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(untagged)]
pub enum UsageBatchResult {
    Charged(UsageChargeShape),
    Duplicate(UsageDuplicate),
    Rejected(UsageRejected),
}

/// A usage batch's outcomes, one per event in order.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct UsageBatchAnswer {
    /// Always `usage_batch`.
    pub object: String,
    /// Events charged.
    pub charged: u64,
    /// Events refused, duplicates included.
    pub refused: u64,
    pub results: Vec<UsageBatchResult>,
}

/// The money an access check reserved.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = AccessReservation)]
pub struct AccessReservationShape {
    /// The hold's id (`hld_…`): usage naming it as `reservation` captures from it.
    pub id: String,
    /// Always `reservation`.
    pub object: String,
    pub consumer: String,
    pub amount: String,
    /// `active`.
    pub status: String,
    pub expires_at: String,
}

/// Whether a consumer can afford some usage now.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = AccessCheck)]
pub struct AccessCheckShape {
    /// Always `access_check`.
    pub object: String,
    pub allowed: bool,
    /// Why not, when not allowed: a stable code such as `insufficient_funds`,
    /// `wallet_frozen`, `wallet_closed` or `wallet_on_hold`.
    pub reason: Option<String>,
    /// What the usage would cost.
    pub estimated_cost: String,
    /// What the consumer's wallet can spend with this merchant now.
    pub available: String,
    pub currency: String,
    /// The subscription that would be charged.
    pub subscription: String,
    /// The reservation made when `reserve` was asked and the check allowed; else null.
    pub reservation: Option<AccessReservationShape>,
}

/// Usage of one meter (and dimension value) in a period.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = UsageSummaryLine)]
pub struct UsageSummaryLineShape {
    /// The meter's code.
    pub meter: String,
    /// The property value that priced these events under a dimensional price; null for
    /// other prices and for events a dimensional price's default priced.
    pub dimension: Option<String>,
    pub quantity: String,
    pub amount: String,
    /// Events counted.
    pub events: u64,
}

/// A subscription's usage in one period.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = UsageSummary)]
pub struct UsageSummaryShape {
    /// Always `usage_summary`.
    pub object: String,
    pub subscription: String,
    pub period_start: String,
    pub currency: String,
    /// The sum of the lines' amounts.
    pub total: String,
    pub lines: Vec<UsageSummaryLineShape>,
}

/// A statement's totals by category (signed; positive credits the wallet). Only the
/// categories with movements in the period are present.
#[allow(dead_code)]
#[derive(ToSchema)]
pub struct StatementTotals {
    #[schema(nullable = false)]
    pub top_ups: Option<String>,
    #[schema(nullable = false)]
    pub adjustments: Option<String>,
    #[schema(nullable = false)]
    pub grants_granted: Option<String>,
    #[schema(nullable = false)]
    pub grants_expired: Option<String>,
    #[schema(nullable = false)]
    pub grants_voided: Option<String>,
    /// Usage charges, recurring fees and hold captures paid.
    #[schema(nullable = false)]
    pub charges: Option<String>,
    /// Usage charges, recurring fees and hold captures received.
    #[schema(nullable = false)]
    pub earnings: Option<String>,
    #[schema(nullable = false)]
    pub refunds: Option<String>,
    #[schema(nullable = false)]
    pub transfers_out: Option<String>,
    #[schema(nullable = false)]
    pub transfers_in: Option<String>,
}

/// Billing movements summed by counterparty, product and category.
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = StatementCharge)]
pub struct StatementChargeShape {
    /// The merchant paid (for charges) or the consumer paying (for earnings); empty if
    /// the subscription is gone.
    pub counterparty: String,
    /// The product's id, or `recurring_fee`; null when neither.
    pub product: Option<String>,
    /// `charges`, `earnings` or another totals category.
    pub category: String,
    /// Signed.
    pub amount: String,
}

/// A wallet statement for [from, until).
#[allow(dead_code)]
#[derive(ToSchema)]
#[schema(as = Statement)]
pub struct StatementShape {
    /// Always `statement`.
    pub object: String,
    pub wallet: String,
    pub currency: String,
    pub from: String,
    pub until: String,
    pub opening_balance: String,
    pub closing_balance: String,
    pub totals: StatementTotals,
    pub charges_by_merchant_and_product: Vec<StatementChargeShape>,
    /// How many movements the period has.
    pub movements: u64,
}

// ---- catalog ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateProduct {
    /// Required with an admin key; an organization key creates its own.
    merchant: Option<String>,
    name: String,
}

#[utoipa::path(post, path = "/v1/products", tag = "catalog", summary = "Create a product", request_body = CreateProduct, responses((status = 201, description = "the product created", body = ProductShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_product(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreateProduct>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let merchant = merchant_of(&caller, body.merchant.as_deref())?;
    let name = text("name", &body.name, false)?;
    let Receipt::ProductCreated(id) = app.execute(Command::CreateProduct { merchant, name }).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let view = app.read(move |state| state.product(id).map(product_view)).await?;
    Ok(created(view.unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
struct MerchantQuery {
    merchant: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

impl MerchantQuery {
    /// How many of an id-ordered list (index = id - 1) the cursor `after` skips.
    fn skip(&self, parse: fn(&str) -> Option<u64>) -> Result<usize, ApiError> {
        match self.after.as_deref() {
            Some(cursor) => Ok(parse_id("after", cursor, parse)? as usize),
            None => Ok(0),
        }
    }
}

#[utoipa::path(get, path = "/v1/products", tag = "catalog", summary = "A merchant's products", params(("merchant" = Option<String>, Query, description = "the merchant (admin keys)"), ("limit" = Option<u32>, Query, description = "page size, default 50, at most 500"), ("after" = Option<String>, Query, description = "cursor: the last id seen (`next_cursor`)")), responses((status = 200, description = "a page of the merchant's products, oldest first", body = ProductList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_products(AxumState(app): App, headers: HeaderMap, Query(query): Query<MerchantQuery>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let merchant = merchant_of(&caller, query.merchant.as_deref())?;
    let after = query.skip(|text| ProductId::parse(text).map(|id| id.0))?;
    let (data, next) = app
        .read(move |state| {
            let products = state.products.iter().skip(after).filter(|p| p.merchant == merchant);
            let (items, next) = page(products, query.limit, |p| p.id.to_string());
            (items.into_iter().map(product_view).collect::<Vec<_>>(), next)
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateMeter {
    merchant: Option<String>,
    /// Lowercase letters, digits, '_', '.', '-'; unique per merchant.
    code: String,
    unit: String,
    /// `sum` of quantities or `count` of events.
    #[schema(value_type = String)]
    aggregation: Aggregation,
    product: Option<String>,
}

#[utoipa::path(post, path = "/v1/meters", tag = "catalog", summary = "Create a meter", request_body = CreateMeter, responses((status = 201, description = "the meter created", body = MeterShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_meter(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreateMeter>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let merchant = merchant_of(&caller, body.merchant.as_deref())?;
    let product = match body.product.as_deref() {
        Some(text) => Some(parse_id("product", text, ProductId::parse)?),
        None => None,
    };
    let unit = text("unit", &body.unit, false)?;
    let command = Command::CreateMeter { merchant, code: body.code, unit, aggregation: body.aggregation, product };
    let Receipt::MeterCreated(id) = app.execute(command).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let view = app.read(move |state| state.meter(id).map(meter_view)).await?;
    Ok(created(view.unwrap_or(Value::Null)))
}

#[utoipa::path(get, path = "/v1/meters", tag = "catalog", summary = "A merchant's meters", params(("merchant" = Option<String>, Query, description = "the merchant (admin keys)"), ("limit" = Option<u32>, Query, description = "page size, default 50, at most 500"), ("after" = Option<String>, Query, description = "cursor: the last id seen (`next_cursor`)")), responses((status = 200, description = "a page of the merchant's meters, oldest first", body = MeterList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_meters(AxumState(app): App, headers: HeaderMap, Query(query): Query<MerchantQuery>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let merchant = merchant_of(&caller, query.merchant.as_deref())?;
    let after = query.skip(|text| MeterId::parse(text).map(|id| id.0))?;
    let (data, next) = app
        .read(move |state| {
            let meters = state.meters.iter().skip(after).filter(|m| m.merchant == merchant);
            let (items, next) = page(meters, query.limit, |m| m.id.to_string());
            (items.into_iter().map(meter_view).collect::<Vec<_>>(), next)
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TierBody {
    /// The period quantity this tier ends at; omitted on the last tier.
    up_to: Option<String>,
    unit_price: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PriceBody {
    /// The meter's code.
    meter: String,
    /// `per_unit`, `package`, `graduated` or `dimensional`.
    model: String,
    unit_price: Option<String>,
    package_size: Option<String>,
    package_price: Option<String>,
    tiers: Option<Vec<TierBody>>,
    /// The event property a dimensional price depends on.
    property: Option<String>,
    /// Unit price per property value.
    values: Option<BTreeMap<String, String>>,
    default_unit_price: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreatePlan {
    merchant: Option<String>,
    name: String,
    currency: String,
    /// `day`, `week` or `month`.
    #[schema(value_type = String)]
    billing_period: BillingPeriod,
    recurring_fee: Option<String>,
    prices: Vec<PriceBody>,
    /// The platform's fee as a fraction (0.05 = 5%); admin keys only. Without it the
    /// platform's default applies.
    platform_fee_rate: Option<String>,
    /// The plan this is a new version of.
    replaces: Option<String>,
}

fn price_model(body: &PriceBody, field: &str) -> Result<PriceModel, ApiError> {
    let need = |value: &Option<String>, name: &str| {
        value.clone().ok_or_else(|| ApiError::invalid(&format!("{field}.{name}"), format!("{name} is required")))
    };
    Ok(match body.model.as_str() {
        "per_unit" => PriceModel::PerUnit {
            unit_price: price_amount(&format!("{field}.unit_price"), &need(&body.unit_price, "unit_price")?)?,
        },
        "package" => PriceModel::Package {
            size: quantity(&format!("{field}.package_size"), &need(&body.package_size, "package_size")?)?,
            package_price: price_amount(
                &format!("{field}.package_price"),
                &need(&body.package_price, "package_price")?,
            )?,
        },
        "graduated" => {
            let tiers = body.tiers.as_ref().ok_or_else(|| ApiError::invalid(field, "tiers are required"))?;
            if tiers.len() > TIERS_MAX {
                return Err(ApiError::field("too_many_items", field, format!("at most {TIERS_MAX} tiers")));
            }
            let mut parsed = Vec::with_capacity(tiers.len());
            for (i, tier) in tiers.iter().enumerate() {
                let up_to = match &tier.up_to {
                    Some(text) => Some(quantity(&format!("{field}.tiers[{i}].up_to"), text)?),
                    None => None,
                };
                let unit_price = price_amount(&format!("{field}.tiers[{i}].unit_price"), &tier.unit_price)?;
                parsed.push(Tier { up_to, unit_price });
            }
            PriceModel::Graduated { tiers: parsed }
        }
        "dimensional" => {
            let values = body.values.as_ref().ok_or_else(|| ApiError::invalid(field, "values are required"))?;
            if values.len() > DIMENSION_VALUES_MAX {
                return Err(ApiError::field("too_many_items", field, format!("at most {DIMENSION_VALUES_MAX} values")));
            }
            let mut parsed = Vec::with_capacity(values.len());
            for (name, price) in values {
                parsed.push((name.clone(), price_amount(&format!("{field}.values.{name}"), price)?));
            }
            let default = match &body.default_unit_price {
                Some(text) => Some(price_amount(&format!("{field}.default_unit_price"), text)?),
                None => None,
            };
            PriceModel::Dimensional { property: need(&body.property, "property")?, values: parsed, default }
        }
        _ => {
            return Err(ApiError::field(
                "invalid_price",
                &format!("{field}.model"),
                "model is per_unit, package, graduated or dimensional",
            ))
        }
    })
}

#[utoipa::path(post, path = "/v1/plans", tag = "catalog", summary = "Create a plan, or a new version of one (`replaces`)", request_body = CreatePlan, responses((status = 201, description = "the plan (version) created", body = PlanShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn create_plan(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<CreatePlan>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let merchant = merchant_of(&caller, body.merchant.as_deref())?;
    let currency = currency("currency", &body.currency)?;
    let name = text("name", &body.name, false)?;
    if body.prices.len() > PRICES_PER_PLAN_MAX {
        return Err(ApiError::field("too_many_items", "prices", format!("at most {PRICES_PER_PLAN_MAX} prices")));
    }
    let platform_fee = match body.platform_fee_rate.as_deref() {
        Some(_) if !caller.is_admin() => {
            return Err(ApiError::field("forbidden", "platform_fee_rate", "only the platform sets fees"))
        }
        Some(text) => Some(fee_rate("platform_fee_rate", text)?),
        None => None,
    };
    let recurring_fee = match body.recurring_fee.as_deref() {
        Some(text) => Some(amount("recurring_fee", text)?),
        None => None,
    };
    let replaces = match body.replaces.as_deref() {
        Some(text) => Some(parse_id("replaces", text, PlanId::parse)?),
        None => None,
    };
    let codes: Vec<String> = body.prices.iter().map(|p| p.meter.clone()).collect();
    let meters = app
        .read(move |state| {
            codes
                .iter()
                .map(|code| state.meters.iter().find(|m| m.merchant == merchant && *m.code == **code).map(|m| m.id))
                .collect::<Vec<_>>()
        })
        .await?;
    let mut prices = Vec::with_capacity(body.prices.len());
    for (i, (price, meter)) in body.prices.iter().zip(meters).enumerate() {
        let field = format!("prices[{i}]");
        let meter = meter.ok_or_else(|| ApiError::field("meter_not_found", &field, "no meter with this code"))?;
        prices.push(Price { meter, model: price_model(price, &field)? });
    }
    let spec = PlanSpec {
        merchant,
        name,
        currency,
        period: body.billing_period,
        recurring_fee,
        prices,
        platform_fee,
        replaces,
    };
    let Receipt::PlanCreated { plan, .. } = app.execute(Command::CreatePlan { spec }).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let view = app.read(move |state| state.plan(plan).map(|p| plan_view(state, p))).await?;
    Ok(created(view.unwrap_or(Value::Null)))
}

#[utoipa::path(get, path = "/v1/plans", tag = "catalog", summary = "A merchant's plans", params(("merchant" = Option<String>, Query, description = "the merchant (admin keys)"), ("limit" = Option<u32>, Query, description = "page size, default 50, at most 500"), ("after" = Option<String>, Query, description = "cursor: the last id seen (`next_cursor`)")), responses((status = 200, description = "a page of the merchant's plans, oldest first", body = PlanList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_plans(AxumState(app): App, headers: HeaderMap, Query(query): Query<MerchantQuery>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let merchant = merchant_of(&caller, query.merchant.as_deref())?;
    let after = query.skip(|text| PlanId::parse(text).map(|id| id.0))?;
    let (data, next) = app
        .read(move |state| {
            let plans = state.plans.iter().skip(after).filter(|p| p.spec.merchant == merchant);
            let (items, next) = page(plans, query.limit, |p| p.id.to_string());
            (items.into_iter().map(|p| plan_view(state, p)).collect::<Vec<_>>(), next)
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

/// Plans are public to every key: a consumer must see what it subscribes to.
#[utoipa::path(get, path = "/v1/plans/{id}", tag = "catalog", summary = "Get a plan", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the plan", body = PlanShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_plan(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    caller(&app, &headers)?;
    let plan = parse_id("plan", &id, PlanId::parse)?;
    let view = app.read(move |state| state.plan(plan).map(|p| plan_view(state, p))).await?;
    view.map(ok).ok_or_else(ApiError::not_found)
}

#[utoipa::path(post, path = "/v1/plans/{id}/archive", tag = "catalog", summary = "Stop a plan taking new subscriptions", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the plan, now archived", body = PlanShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn archive_plan(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let plan = parse_id("plan", &id, PlanId::parse)?;
    let merchant = app.read(move |state| state.plan(plan).map(|p| p.spec.merchant)).await?;
    if !merchant.is_some_and(|m| caller.owns(m)) {
        return Err(ApiError::not_found());
    }
    app.execute(Command::ArchivePlan { plan }).await?;
    let view = app.read(move |state| state.plan(plan).map(|p| plan_view(state, p))).await?;
    Ok(ok(view.unwrap_or(Value::Null)))
}

// ---- subscriptions ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    consumer: String,
    plan: String,
}

/// Whether the caller may see or change a subscription: the platform, the consumer, or
/// the merchant.
fn may_see(caller: &Caller, subscription: &Subscription) -> bool {
    caller.owns(subscription.consumer) || caller.owns(subscription.merchant)
}

#[utoipa::path(post, path = "/v1/subscriptions", tag = "subscriptions", summary = "Subscribe a consumer to a plan (the platform, the consumer, or the plan's merchant)", request_body = Subscribe, responses((status = 201, description = "the subscription created, with `first_fee_operation`", body = SubscriptionShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn subscribe(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<Subscribe>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let consumer = parse_id("consumer", &body.consumer, OrganizationId::parse)?;
    let plan = parse_id("plan", &body.plan, PlanId::parse)?;
    let merchant = app.read(move |state| state.plan(plan).map(|p| p.spec.merchant)).await?;
    let merchant = merchant.ok_or_else(|| ApiError::field("plan_not_found", "plan", "no such plan"))?;
    if !caller.owns(consumer) && !caller.owns(merchant) {
        return Err(ApiError::not_found());
    }
    let receipt = app.execute(Command::Subscribe { consumer, plan }).await?;
    let Receipt::Subscription { subscription, fee, .. } = receipt else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let view = app
        .read(move |state| state.subscription(subscription).map(|s| subscription_view(state, s)))
        .await?
        .unwrap_or(Value::Null);
    let mut view = view;
    view["first_fee_operation"] = json!(fee.map(|o| o.id.to_string()));
    Ok(created(view))
}

#[derive(Deserialize)]
struct SubscriptionQuery {
    consumer: Option<String>,
    merchant: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

#[utoipa::path(get, path = "/v1/subscriptions", tag = "subscriptions", summary = "Subscriptions the caller is party to, by consumer or merchant", params(("consumer" = Option<String>, Query, description = "filter by consumer"), ("merchant" = Option<String>, Query, description = "filter by merchant"), ("limit" = Option<u32>, Query, description = "page size, default 50, at most 500"), ("after" = Option<String>, Query, description = "cursor: the last subscription id seen (`next_cursor`)")), responses((status = 200, description = "a page of subscriptions, oldest first", body = SubscriptionList), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn list_subscriptions(
    AxumState(app): App,
    headers: HeaderMap,
    Query(query): Query<SubscriptionQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let consumer = match query.consumer.as_deref() {
        Some(text) => Some(parse_id("consumer", text, OrganizationId::parse)?),
        None => None,
    };
    let merchant = match query.merchant.as_deref() {
        Some(text) => Some(parse_id("merchant", text, OrganizationId::parse)?),
        None => None,
    };
    let after = match query.after.as_deref() {
        Some(cursor) => parse_id("after", cursor, SubscriptionId::parse)?.0,
        None => 0,
    };
    let (data, next) = app
        .read(move |state| {
            let mine = state
                .subscriptions
                .iter()
                .skip(after as usize)
                .filter(|s| may_see(&caller, s))
                .filter(|s| consumer.is_none_or(|c| c == s.consumer) && merchant.is_none_or(|m| m == s.merchant));
            let (items, next) = page(mine, query.limit, |s| s.id.to_string());
            (items.into_iter().map(|s| subscription_view(state, s)).collect::<Vec<_>>(), next)
        })
        .await?;
    Ok(ok(json!({"object": "list", "data": data, "next_cursor": next})))
}

async fn visible_subscription(app: &AppState, caller: &Caller, id: &str) -> Result<(Subscription, Value), ApiError> {
    let subscription = parse_id("subscription", id, SubscriptionId::parse)?;
    let found = app
        .read(move |state| state.subscription(subscription).map(|s| (s.clone(), subscription_view(state, s))))
        .await?;
    match found {
        Some((subscription, view)) if may_see(caller, &subscription) => Ok((subscription, view)),
        _ => Err(ApiError::not_found()),
    }
}

#[utoipa::path(get, path = "/v1/subscriptions/{id}", tag = "subscriptions", summary = "Get a subscription with its period's usage", params(("id" = String, Path, description = "the object's id")), responses((status = 200, description = "the subscription", body = SubscriptionShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn get_subscription(AxumState(app): App, headers: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    Ok(ok(visible_subscription(&app, &caller, &id).await?.1))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Cancel {
    /// Cancel when the current period ends (default) or at once.
    #[serde(default = "yes")]
    at_period_end: bool,
}

fn yes() -> bool {
    true
}

#[utoipa::path(post, path = "/v1/subscriptions/{id}/cancel", tag = "subscriptions", summary = "Cancel at period end or at once", params(("id" = String, Path, description = "the object's id")), request_body = Cancel, responses((status = 200, description = "the subscription after the change", body = SubscriptionShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn cancel_subscription(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Cancel>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_write()?;
    let (subscription, _) = visible_subscription(&app, &caller, &id).await?;
    app.execute(Command::CancelSubscription { subscription: subscription.id, at_period_end: body.at_period_end })
        .await?;
    Ok(ok(visible_subscription(&app, &caller, &id).await?.1))
}

// ---- usage ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UsageBody {
    /// The merchant's id for this event: a second event with the same id is a duplicate.
    event_id: String,
    consumer: String,
    /// The meter's code.
    meter: String,
    /// A plain decimal; counting meters count the event whatever it says.
    quantity: String,
    /// RFC 3339; defaults to now.
    timestamp: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    /// A reservation (from an access check) to capture from first.
    reservation: Option<String>,
    /// Release what is left of the reservation after this event.
    #[serde(default)]
    finish: bool,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UsageBatch {
    /// Admin keys name the merchant; a merchant's key reports its own usage.
    merchant: Option<String>,
    events: Vec<UsageBody>,
}

fn usage_event(app: &AppState, merchant: OrganizationId, body: UsageBody) -> Result<UsageEvent, ApiError> {
    let scope = format!("usage:{merchant}");
    let key = IdempotencyKey::new(&scope, &body.event_id)
        .map_err(|_| ApiError::field("text_length_out_of_range", "event_id", "event ids are 1 to 255 bytes"))?;
    let consumer = parse_id("consumer", &body.consumer, OrganizationId::parse)?;
    let at = match body.timestamp.as_deref() {
        Some(text) => time::parse(text).ok_or_else(|| ApiError::invalid("timestamp", "an RFC 3339 time"))?,
        None => app.now(),
    };
    let reservation = match body.reservation.as_deref() {
        Some(text) => Some(parse_id("reservation", text, HoldId::parse)?),
        None => None,
    };
    if body.meter.len() > CODE_LENGTH_MAX {
        return Err(ApiError::field("unknown_meter", "meter", "no such meter"));
    }
    Ok(UsageEvent {
        key,
        consumer,
        meter: body.meter,
        quantity: quantity("quantity", &body.quantity)?,
        at,
        properties: properties(&body.properties),
        reservation,
        finish: body.finish,
    })
}

/// One event's outcome: charged (rendered late, typed), or a refusal already rendered.
/// Most outcomes are charges, so boxing the large variant would only add allocations.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Charged(UsageCharge, Currency),
    Refused(u16, Value),
}

/// Renders one event's refusal; a duplicate is answered with its first result.
async fn usage_outcome(
    app: &Arc<AppState>,
    event_id: &str,
    key: IdempotencyKey,
    outcome: Result<UsageCharge, Rejection>,
) -> Result<Outcome, ApiError> {
    match outcome {
        Ok(charge) => {
            let currency = charge.currency;
            Ok(Outcome::Charged(charge, currency))
        }
        Err(Rejection::DuplicateEvent) => {
            let operation = app.read(move |state| state.usage_key(key).and_then(|r| r.reference().operation)).await?;
            let record = app.history(move |reader| reader.usage_record(key, operation)).await?;
            let original = match record {
                Some(record) => {
                    let subscription = record.subscription;
                    let currency = app
                        .read(move |state| {
                            state.subscription(subscription).and_then(|s| state.wallet(s.wallet)).map(|w| w.currency)
                        })
                        .await?
                        .unwrap_or(Currency::parse("USD").unwrap());
                    record_view(event_id, &record, currency)
                }
                None => Value::Null,
            };
            let rejection = Rejection::DuplicateEvent;
            Ok(Outcome::Refused(
                409,
                json!({"event_id": event_id, "status": "duplicate", "code": rejection.code(), "detail": rejection.to_string(), "original": original}),
            ))
        }
        Err(rejection) => {
            let status = crate::error::status_of(rejection.code()).as_u16();
            Ok(Outcome::Refused(
                status,
                json!({"event_id": event_id, "status": "rejected", "code": rejection.code(), "detail": rejection.to_string()}),
            ))
        }
    }
}

/// Applies usage events in one command and renders every outcome.
async fn run_usage(
    app: &Arc<AppState>,
    merchant: OrganizationId,
    ids: Vec<String>,
    events: Vec<UsageEvent>,
) -> Result<Vec<Outcome>, ApiError> {
    let keys: Vec<IdempotencyKey> = events.iter().map(|e| e.key).collect();
    let Receipt::Usage { results } = app.execute(Command::Usage { merchant, events }).await? else {
        return Err(ApiError::new("internal", "unexpected receipt"));
    };
    let mut answers = Vec::with_capacity(results.len());
    for ((id, key), outcome) in ids.iter().zip(keys).zip(results) {
        answers.push(usage_outcome(app, id, key, outcome).await?);
    }
    Ok(answers)
}

#[utoipa::path(post, path = "/v1/usage", tag = "usage", summary = "Report one usage event: rated and charged at once (the event id is the idempotency key)", request_body = UsageBody, responses((status = 201, description = "the event, rated and charged", body = UsageChargeShape), (status = 409, description = "a duplicate event id: nothing charged; the first result is in `original`", body = UsageDuplicate), (status = "4XX", description = "problem+json with a stable code; a duplicate answers 409 with the original result", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn report_usage(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<UsageBody>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Usage)?;
    let merchant = merchant_of(&caller, None)?;
    let event_id = body.event_id.clone();
    let event = usage_event(&app, merchant, body)?;
    let (status, answer) = match run_usage(&app, merchant, vec![event_id.clone()], vec![event]).await?.remove(0) {
        Outcome::Charged(charge, currency) => (201, charge_view(&event_id, &charge, currency)),
        Outcome::Refused(status, answer) => (status, answer),
    };
    if status >= 400 && status != 409 {
        let code = answer["code"].as_str().unwrap_or("internal");
        let rejection = Rejection::ALL.iter().find(|r| r.code() == code).copied();
        return Err(rejection.map(ApiError::from).unwrap_or_else(|| ApiError::new("internal", "unknown rejection")));
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    Ok((status, Json(answer)).into_response())
}

#[utoipa::path(post, path = "/v1/usage/batch", tag = "usage", summary = "Report up to 10,000 usage events; each is charged or refused on its own", request_body = UsageBatch, responses((status = 200, description = "one result per event, in order", body = UsageBatchAnswer), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn report_usage_batch(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<UsageBatch>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    caller.require_scope(crate::Scope::Usage)?;
    let merchant = merchant_of(&caller, body.merchant.as_deref())?;
    if body.events.is_empty() || body.events.len() > USAGE_BATCH_MAX {
        return Err(ApiError::field("too_many_items", "events", format!("1 to {USAGE_BATCH_MAX} events")));
    }
    let mut ids = Vec::with_capacity(body.events.len());
    let mut events = Vec::with_capacity(body.events.len());
    for (i, event) in body.events.into_iter().enumerate() {
        ids.push(event.event_id.clone());
        events.push(usage_event(&app, merchant, event).map_err(|mut e| {
            e.field = Some(format!("events[{i}].{}", e.field.unwrap_or_default()));
            e
        })?);
    }
    let answers = run_usage(&app, merchant, ids.clone(), events).await?;
    let charged = answers.iter().filter(|outcome| matches!(outcome, Outcome::Charged(..))).count();
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    #[allow(clippy::large_enum_variant)]
    enum Item<'a> {
        Charged(ChargeAnswer<'a>),
        Refused(&'a Value),
    }
    #[derive(serde::Serialize)]
    struct BatchAnswer<'a> {
        object: &'static str,
        charged: usize,
        refused: usize,
        results: Vec<Item<'a>>,
    }
    let results: Vec<Item<'_>> = answers
        .iter()
        .zip(&ids)
        .map(|(outcome, id)| match outcome {
            Outcome::Charged(charge, currency) => Item::Charged(charge_answer(id, charge, currency)),
            Outcome::Refused(_, answer) => Item::Refused(answer),
        })
        .collect();
    let answer = BatchAnswer { object: "usage_batch", charged, refused: results.len() - charged, results };
    // Serialized once into a buffer sized for the answer (about 300 bytes per event):
    // growing axum's default buffer from 128 bytes to megabytes copied it over and over.
    let mut body = Vec::with_capacity(results_capacity(answer.results.len()));
    serde_json::to_writer(&mut body, &answer).map_err(|_| ApiError::new("internal", "answer encoding"))?;
    Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Bytes to reserve for a batch answer of `events` results.
fn results_capacity(events: usize) -> usize {
    const ANSWER_BYTES_PER_EVENT: usize = 320;
    64 + events * ANSWER_BYTES_PER_EVENT
}

// ---- access checks ----

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Reserve {
    ttl_seconds: i64,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AccessCheckBody {
    consumer: String,
    meter: String,
    /// The usage to price; or give `amount`.
    quantity: Option<String>,
    amount: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    /// Hold the cost for the merchant (Idempotency-Key required); usage naming the
    /// reservation captures from it.
    reserve: Option<Reserve>,
}

#[utoipa::path(post, path = "/v1/access-checks", tag = "usage", summary = "Can the consumer afford this usage now? Optionally reserve the money", params(("Idempotency-Key" = Option<String>, Header, description = "required with `reserve`")), request_body = AccessCheckBody, responses((status = 200, description = "whether the usage is allowed, and the reservation when one was asked for", body = AccessCheckShape), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn access_check(AxumState(app): App, headers: HeaderMap, ApiJson(body): ApiJson<AccessCheckBody>) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let merchant = merchant_of(&caller, None)?;
    let consumer = parse_id("consumer", &body.consumer, OrganizationId::parse)?;
    let quantity = match body.quantity.as_deref() {
        Some(text) => Some(quantity("quantity", text)?),
        None => None,
    };
    let amount = match body.amount.as_deref() {
        Some(text) => Some(amount("amount", text)?),
        None => None,
    };
    if quantity.is_none() == amount.is_none() {
        return Err(ApiError::invalid("quantity", "give exactly one of quantity and amount"));
    }
    if body.meter.len() > CODE_LENGTH_MAX {
        return Err(ApiError::field("unknown_meter", "meter", "no such meter"));
    }
    let properties = properties(&body.properties);
    let now = app.now();
    let (meter, props) = (body.meter.clone(), properties.clone());
    let check =
        app.read(move |state| state.access_check(merchant, consumer, &meter, quantity, amount, &props, now)).await??;
    let currency = check.currency;
    let mut answer = json!({
        "object": "access_check",
        "allowed": check.allowed,
        "reason": check.reason.map(|r| r.code()),
        "estimated_cost": format_amount(check.cost, currency),
        "available": format_amount(check.available, currency),
        "currency": currency.code(),
        "subscription": check.subscription.to_string(),
        "reservation": Value::Null,
    });
    let Some(reserve) = body.reserve else { return Ok(ok(answer)) };
    if !check.allowed {
        return Ok(ok(answer));
    }
    let ttl_ms =
        reserve.ttl_seconds.checked_mul(1000).ok_or_else(|| ApiError::invalid("reserve.ttl_seconds", "too large"))?;
    let action = MoneyAction::Reserve { merchant, consumer, meter: body.meter, quantity, amount, properties, ttl_ms };
    let response = run_money(&app, &caller, &headers, action).await;
    match response {
        Ok(response) => {
            let replayed = response.headers().get("idempotent-replayed").cloned();
            let bytes = axum::body::to_bytes(response.into_body(), BODY_BYTES_MAX)
                .await
                .map_err(|_| ApiError::new("internal", "reservation answer"))?;
            let hold: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            answer["reservation"] = hold;
            let mut response = ok(answer);
            if let Some(replayed) = replayed {
                response.headers_mut().insert("idempotent-replayed", replayed);
            }
            Ok(response)
        }
        // The balance changed between the check and the reservation.
        Err(error) if error.code == "insufficient_funds" => {
            answer["allowed"] = json!(false);
            answer["reason"] = json!("insufficient_funds");
            Ok(ok(answer))
        }
        Err(error) => Err(error),
    }
}

// ---- usage summaries and statements ----

#[derive(Deserialize)]
struct FormatQuery {
    /// RFC 3339 start of the period; defaults to the current period.
    period_start: Option<String>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

fn wants_csv(format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(_) => Err(ApiError::invalid("format", "json or csv")),
    }
}

fn csv_response(name: &str, rows: Vec<Vec<String>>) -> Response {
    let mut body = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .into_iter()
            .map(
                |cell| {
                    if cell.contains([',', '"', '\n']) {
                        format!("\"{}\"", cell.replace('"', "\"\""))
                    } else {
                        cell
                    }
                },
            )
            .collect();
        body.push_str(&cells.join(","));
        body.push('\n');
    }
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}.csv\"")) {
        headers.insert(axum::http::header::CONTENT_DISPOSITION, value);
    }
    response
}

#[utoipa::path(get, path = "/v1/subscriptions/{id}/usage", tag = "usage", summary = "Usage summary of a period: quantity and amount per meter and dimension (JSON or CSV)", params(("id" = String, Path, description = "the object's id"), ("period_start" = Option<String>, Query, description = "RFC 3339; the current period by default"), ("format" = Option<String>, Query, description = "json or csv")), responses((status = 200, description = "the period's usage by meter and dimension, as JSON or CSV (`format=csv`: one row per line)", content((UsageSummaryShape = "application/json"), (String = "text/csv"))), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn usage_summary(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<FormatQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let csv = wants_csv(query.format.as_deref())?;
    let (subscription, _) = visible_subscription(&app, &caller, &id).await?;
    let period_start = match query.period_start.as_deref() {
        Some(text) => time::parse(text).ok_or_else(|| ApiError::invalid("period_start", "an RFC 3339 time"))?,
        None => subscription.period_start,
    };
    let sub_id = subscription.id;
    let records = app.history(move |reader| reader.usage_of_period(sub_id, period_start, SUMMARY_RECORDS_MAX)).await?;
    let plan = subscription.plan;
    let wallet = subscription.wallet;
    let (names, currency) = app
        .read(move |state| {
            let names: BTreeMap<(MeterId, Option<u16>), (String, Option<String>)> = state
                .plan(plan)
                .map(|p| {
                    p.spec
                        .prices
                        .iter()
                        .flat_map(|price| {
                            let code = state.meter(price.meter).map(|m| m.code.to_string()).unwrap_or_default();
                            let mut entries = vec![((price.meter, None), (code.clone(), None))];
                            if let PriceModel::Dimensional { values, .. } = &price.model {
                                for (i, (value, _)) in values.iter().enumerate() {
                                    entries.push(((price.meter, Some(i as u16)), (code.clone(), Some(value.clone()))));
                                }
                            }
                            entries
                        })
                        .collect()
                })
                .unwrap_or_default();
            (names, state.wallet(wallet).map(|w| w.currency))
        })
        .await?;
    let currency = currency.ok_or_else(ApiError::not_found)?;
    let mut lines: BTreeMap<(MeterId, Option<u16>), (i128, i128, u64)> = BTreeMap::new();
    for record in &records {
        let line = lines.entry((record.meter, record.dimension)).or_default();
        line.0 += record.quantity.0;
        line.1 += record.amount.units();
        line.2 += 1;
    }
    let total: i128 = lines.values().map(|l| l.1).sum();
    let rows: Vec<(String, String, String, String, u64)> = lines
        .iter()
        .map(|(key, (quantity, amount, events))| {
            let (meter, dimension) = names.get(key).cloned().unwrap_or_default();
            let dimension = dimension.unwrap_or_else(|| if key.1.is_none() { String::new() } else { "default".into() });
            (
                meter,
                dimension,
                Quantity(*quantity).format(),
                format_amount(Amount::from_units(*amount), currency),
                *events,
            )
        })
        .collect();
    if csv {
        let mut table = vec![vec![
            "meter".into(),
            "dimension".into(),
            "quantity".into(),
            "amount".into(),
            "currency".into(),
            "events".into(),
        ]];
        for (meter, dimension, quantity, amount, events) in rows {
            table.push(vec![meter, dimension, quantity, amount, currency.code().into(), events.to_string()]);
        }
        return Ok(csv_response(&format!("usage-{}", subscription.id), table));
    }
    Ok(ok(json!({
        "object": "usage_summary",
        "subscription": subscription.id.to_string(),
        "period_start": time::format(period_start),
        "currency": currency.code(),
        "total": format_amount(Amount::from_units(total), currency),
        "lines": rows.into_iter().map(|(meter, dimension, quantity, amount, events)| json!({
            "meter": meter, "dimension": (!dimension.is_empty()).then_some(dimension),
            "quantity": quantity, "amount": amount, "events": events,
        })).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct StatementQuery {
    from: String,
    until: String,
    format: Option<String>,
}

/// Which statement line a movement belongs to.
fn statement_category(kind: &str, amount: i128) -> &'static str {
    match kind {
        "top_up" => "top_ups",
        "adjustment_credit" => "adjustments",
        "adjustment_debit" => "adjustments",
        "grant_credit" => "grants_granted",
        "grant_expiry" => "grants_expired",
        "grant_void" => "grants_voided",
        "charge" | "recurring_fee" | "hold_capture" if amount < 0 => "charges",
        "charge" | "recurring_fee" | "hold_capture" => "earnings",
        "refund" => "refunds",
        _ if amount < 0 => "transfers_out",
        _ => "transfers_in",
    }
}

#[utoipa::path(get, path = "/v1/wallets/{id}/statement", tag = "history", summary = "A wallet statement for [from, until): opening and closing balance, totals by kind, charges by merchant and product (JSON or CSV)", params(("id" = String, Path, description = "the wallet's id"), ("from" = String, Query, description = "RFC 3339, inclusive"), ("until" = String, Query, description = "RFC 3339, exclusive"), ("format" = Option<String>, Query, description = "json or csv")), responses((status = 200, description = "the statement, as JSON or CSV (`format=csv`: one row per movement)", content((StatementShape = "application/json"), (String = "text/csv"))), (status = "4XX", description = "problem+json with a stable code", body = crate::error::Problem, content_type = "application/problem+json"), (status = "5XX", description = "problem+json: `busy`, `not_ready`, `shutting_down` or `not_leader` (503, retry after Retry-After), `provider_unavailable` (502) or `internal` (500)", body = crate::error::Problem, content_type = "application/problem+json")), security(("bearer" = [])))]
async fn statement(
    AxumState(app): App,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<StatementQuery>,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let csv = wants_csv(query.format.as_deref())?;
    let (wallet, _, currency) = owned_wallet_meta(&app, &caller, &id).await?;
    let from = time::parse(&query.from).ok_or_else(|| ApiError::invalid("from", "an RFC 3339 time"))?;
    let until = time::parse(&query.until).ok_or_else(|| ApiError::invalid("until", "an RFC 3339 time"))?;
    if until <= from {
        return Err(ApiError::invalid("until", "must be after from"));
    }
    let (opening, lines) = app
        .history(move |reader| {
            Ok((
                reader.balance_before(wallet, from)?,
                reader.statement_lines(wallet, from, until, SUMMARY_RECORDS_MAX)?,
            ))
        })
        .await?;
    let subscriptions: Vec<SubscriptionId> = lines.iter().filter_map(|(_, d)| d.map(|d| d.subscription)).collect();
    let merchants: BTreeMap<SubscriptionId, (OrganizationId, OrganizationId)> = app
        .read(move |state| {
            subscriptions
                .iter()
                .filter_map(|id| state.subscription(*id).map(|s| (*id, (s.consumer, s.merchant))))
                .collect()
        })
        .await?;
    let mut totals: BTreeMap<&'static str, i128> = BTreeMap::new();
    // (merchant or consumer, product) → amount
    let mut by_party: BTreeMap<(String, String, &'static str), i128> = BTreeMap::new();
    let mut closing = opening.units();
    let mut csv_rows = vec![vec![
        "operation".to_string(),
        "time".into(),
        "kind".into(),
        "category".into(),
        "counterparty".into(),
        "product".into(),
        "amount".into(),
        "balance_after".into(),
        "currency".into(),
    ]];
    for (movement, detail) in &lines {
        let amount = movement.amount.units();
        let category = statement_category(&movement.kind, amount);
        *totals.entry(category).or_default() += amount;
        closing += amount;
        let (party, product) = match detail {
            Some(detail) => {
                let parties = merchants.get(&detail.subscription).copied();
                let party = parties.map(|(consumer, merchant)| if amount < 0 { merchant } else { consumer });
                let party = party.map(|p| p.to_string()).unwrap_or_default();
                let product = detail.product.map(|p| p.to_string()).unwrap_or_else(|| {
                    if movement.kind == "recurring_fee" {
                        "recurring_fee".into()
                    } else {
                        String::new()
                    }
                });
                (party, product)
            }
            None => (String::new(), String::new()),
        };
        if detail.is_some() {
            *by_party.entry((party.clone(), product.clone(), category)).or_default() += amount;
        }
        csv_rows.push(vec![
            movement.operation.to_string(),
            time::format(movement.at),
            movement.kind.clone(),
            category.to_string(),
            party,
            product,
            format_amount(movement.amount, currency),
            format_amount(movement.balance_after, currency),
            currency.code().to_string(),
        ]);
        debug_assert_eq!(closing, movement.balance_after.units(), "statement lines must chain");
    }
    if csv {
        return Ok(csv_response(&format!("statement-{wallet}"), csv_rows));
    }
    let text = |units: i128| format_amount(Amount::from_units(units), currency);
    Ok(ok(json!({
        "object": "statement",
        "wallet": wallet.to_string(),
        "currency": currency.code(),
        "from": time::format(from),
        "until": time::format(until),
        "opening_balance": text(opening.units()),
        "closing_balance": text(closing),
        "totals": totals.iter().map(|(k, v)| (k.to_string(), Value::String(text(*v)))).collect::<serde_json::Map<_, _>>(),
        "charges_by_merchant_and_product": by_party.iter().map(|((party, product, category), amount)| json!({
            "counterparty": party, "product": (!product.is_empty()).then_some(product), "category": category, "amount": text(*amount),
        })).collect::<Vec<_>>(),
        "movements": lines.len(),
    })))
}
