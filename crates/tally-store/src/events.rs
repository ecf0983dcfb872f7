//! Events: the facts platforms react to, derived from journal records. A journal record
//! is one durable batch holding each accepted command and its receipt, so an event
//! exists exactly when its change does: both are that record. The projector derives
//! them in journal order and numbers them in that order, so re-projecting the journal
//! gives the same events with the same ids.

use serde_json::{json, Value};
use tally_ledger::billing::SubscriptionStatus;
use tally_ledger::payments::{Checkout, TopUp};
use tally_ledger::*;

/// Every event type, for documentation and for endpoint subscriptions.
pub const EVENT_TYPES: &[&str] = &[
    "organization.created",
    "organization.updated",
    "wallet.created",
    "wallet.updated",
    "operation.created",
    "grant.created",
    "grant.voided",
    "grant.expired",
    "hold.placed",
    "hold.captured",
    "hold.released",
    "hold.expired",
    "reservation.created",
    "usage.charged",
    "balance.low",
    "product.created",
    "meter.created",
    "plan.created",
    "subscription.created",
    "subscription.renewed",
    "subscription.past_due",
    "subscription.canceled",
    "webhook_endpoint.disabled",
    "payment_method.created",
    "payment_method.removed",
    "top_up.created",
    "top_up.succeeded",
    "top_up.failed",
    "auto_top_up.started",
    "auto_top_up.succeeded",
    "auto_top_up.failed",
    "auto_top_up.disabled",
    "checkout.created",
    "checkout.succeeded",
    "checkout.failed",
    "refund.created",
    "refund.succeeded",
    "refund.failed",
    "organization.verification_updated",
    "bank_account.created",
    "bank_account.updated",
    "payout.created",
    "payout.paid",
    "payout.failed",
];

/// An event before it is numbered: its type, the organization it belongs to (None:
/// the platform's), the affected object's id and the object as it was after the change.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub kind: &'static str,
    pub organization: Option<OrganizationId>,
    pub object: String,
    pub data: Value,
}

/// What the projector knows about objects named in receipts by id alone.
pub trait Directory {
    fn wallet(&mut self, wallet: WalletId) -> Option<(OrganizationId, Currency)>;
    fn hold_wallet(&mut self, hold: HoldId) -> Option<WalletId>;
    fn subscription(&mut self, subscription: SubscriptionId) -> Option<(OrganizationId, OrganizationId)>;
}

fn money(amount: Amount, currency: Currency) -> String {
    Money::new(amount, currency).format_amount()
}

/// The JSON of an operation, as events carry it.
pub fn operation_json(operation: &Operation) -> Value {
    operation_json_of(operation.id, operation.kind.code(), operation.currency, operation.at, &operation.legs)
}

fn operation_json_of(id: OperationId, kind: &str, currency: Currency, at: Timestamp, legs: &[Leg]) -> Value {
    json!({
        "id": id.to_string(),
        "object": "operation",
        "kind": kind,
        "currency": currency.code(),
        "created_at_ms": at,
        "legs": legs.iter().map(|leg| json!({
            "account": match leg.account {
                Account::Wallet(wallet) => wallet.to_string(),
                Account::System(kind, currency) => format!("system:{}:{}", serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(), currency),
            },
            "amount": money(leg.amount, currency),
            "balance_after": money(leg.balance_after, currency),
            "grants": leg.grants.iter().map(|g| json!({"grant": g.grant.to_string(), "amount": money(g.amount, currency)})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The organizations whose wallets an operation touches, in leg order, once each.
fn owners_of(operation: &Operation, directory: &mut dyn Directory) -> Vec<OrganizationId> {
    let mut owners = Vec::new();
    for leg in &operation.legs {
        if let Account::Wallet(wallet) = leg.account {
            if let Some((owner, _)) = directory.wallet(wallet) {
                if !owners.contains(&owner) {
                    owners.push(owner);
                }
            }
        }
    }
    owners
}

fn operation_events(operation: &Operation, directory: &mut dyn Directory, out: &mut Vec<NewEvent>) {
    for owner in owners_of(operation, directory) {
        out.push(operation_created(owner, operation));
    }
}

/// An `operation.created` event. Its data, the operation itself ([`operation_json`]), is
/// left out (`null`): history already keeps every operation once, so the event row
/// does not store a copy per owner, and readers rebuild the data from the operation
/// (`HistoryReader::events`). Building and storing that JSON twice per charge was a
/// quarter of the projector's time.
pub fn operation_created(organization: OrganizationId, operation: &Operation) -> NewEvent {
    NewEvent {
        kind: OPERATION_CREATED,
        organization: Some(organization),
        object: operation.id.to_string(),
        data: Value::Null,
    }
}

/// The type of the event whose data history rebuilds from the operation.
pub const OPERATION_CREATED: &str = "operation.created";

/// A usage charge's event. Its row stores only the meter's code (a JSON string); readers
/// rebuild the rest ([`usage_charged_json`]) from the charge's usage record and
/// operation, which history keeps anyway. Building and storing the whole object took
/// about a third of the projector's time per usage event (replaying one journal: 1.44
/// s with it, 1.03 s without; BENCHMARKS.md).
pub const USAGE_CHARGED: &str = "usage.charged";

/// The data of a `usage.charged` event.
#[allow(clippy::too_many_arguments)]
pub fn usage_charged_json(
    subscription: SubscriptionId,
    meter: &str,
    quantity: tally_ledger::billing::Quantity,
    amount: Amount,
    fee: Amount,
    currency: Currency,
    operation: OperationId,
    balance_after: Amount,
) -> Value {
    json!({
        "object": "usage_charge",
        "subscription": subscription.to_string(),
        "meter": meter,
        "quantity": quantity.format(),
        "amount": money(amount, currency),
        "platform_fee": money(fee, currency),
        "currency": currency.code(),
        "operation": operation.to_string(),
        "balance_after": money(balance_after, currency),
    })
}

/// An event's data as delivered: the stored text, or for an `operation.created` row
/// (stored without data) the operation, read from the `operations` table of `schema`
/// (`main` in the history database, `history` where it is attached under that name).
pub(crate) fn event_data(
    connection: &rusqlite::Connection,
    schema: &str,
    kind: &str,
    object: &str,
    data: String,
) -> Result<String, crate::StoreError> {
    if kind == USAGE_CHARGED && data.starts_with('"') {
        return usage_charged_data(connection, schema, object, &data);
    }
    if !data.is_empty() || kind != OPERATION_CREATED {
        return Ok(data);
    }
    let corrupt = |detail: String| crate::StoreError::Corrupt { what: "operation event", seq: 0, detail };
    let id = OperationId::parse(object).ok_or_else(|| corrupt(object.to_string()))?;
    let mut statement = connection
        .prepare_cached(&format!("SELECT seq, kind, currency, at, legs FROM {schema}.operations WHERE id = ?1"))?;
    let row: Option<(i64, String, String, i64, Vec<u8>)> =
        rusqlite::OptionalExtension::optional(statement.query_row(rusqlite::params![id.0 as i64], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
        }))?;
    // The projector writes an operation and its events in one transaction, so this is
    // only missing if history was damaged; the event is still delivered, without data.
    let Some((seq, kind, currency, at, legs)) = row else {
        tracing::warn!(operation = object, "an operation.created event's operation is missing from history");
        return Ok("null".into());
    };
    let currency = Currency::parse(&currency).map_err(|_| corrupt(currency))?;
    let legs = crate::codec::decode_legs(&legs, seq as u64)?;
    Ok(operation_json_of(id, &kind, currency, at, &legs).to_string())
}

/// A `usage.charged` event's data, rebuilt from its usage record and operation; `data`
/// is the stored meter code (a JSON string).
fn usage_charged_data(
    connection: &rusqlite::Connection,
    schema: &str,
    object: &str,
    data: &str,
) -> Result<String, crate::StoreError> {
    let corrupt = |detail: String| crate::StoreError::Corrupt { what: "usage event", seq: 0, detail };
    let id = OperationId::parse(object).ok_or_else(|| corrupt(object.to_string()))?;
    let meter: String = serde_json::from_str(data).map_err(|_| corrupt(data.to_string()))?;
    let mut statement = connection.prepare_cached(&format!(
        "SELECT u.subscription, u.quantity, u.amount, u.fee, u.balance_after, o.currency
         FROM {schema}.usage_records u JOIN {schema}.operations o ON o.id = u.operation_id
         WHERE u.operation_id = ?1"
    ))?;
    type Row = (i64, String, String, String, Option<String>, String);
    let row: Option<Row> =
        rusqlite::OptionalExtension::optional(statement.query_row(rusqlite::params![id.0 as i64], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?))
        }))?;
    // Written in the same transaction as the event, so only missing if history was damaged.
    let Some((subscription, quantity, amount, fee, balance_after, currency)) = row else {
        tracing::warn!(operation = object, "a usage.charged event's usage record is missing from history");
        return Ok("null".into());
    };
    let units = |text: &str| text.parse::<i128>().map_err(|_| corrupt(text.to_string()));
    let currency = Currency::parse(&currency).map_err(|_| corrupt(currency))?;
    Ok(usage_charged_json(
        SubscriptionId(subscription as u64),
        &meter,
        tally_ledger::billing::Quantity(units(&quantity)?),
        Amount::from_units(units(&amount)?),
        Amount::from_units(units(&fee)?),
        currency,
        id,
        Amount::from_units(units(balance_after.as_deref().unwrap_or("0"))?),
    )
    .to_string())
}

fn balance_low(wallet: WalletId, directory: &mut dyn Directory, balance_after: Option<Amount>) -> Option<NewEvent> {
    let (owner, currency) = directory.wallet(wallet)?;
    Some(NewEvent {
        kind: "balance.low",
        organization: Some(owner),
        object: wallet.to_string(),
        data: json!({"wallet": wallet.to_string(), "currency": currency.code(),
                     "balance_after": balance_after.map(|b| money(b, currency))}),
    })
}

fn subscription_event(
    kind: &'static str,
    subscription: SubscriptionId,
    status: SubscriptionStatus,
    fee: Option<&Operation>,
    directory: &mut dyn Directory,
    out: &mut Vec<NewEvent>,
) {
    let Some((consumer, merchant)) = directory.subscription(subscription) else { return };
    let data = json!({
        "id": subscription.to_string(),
        "object": "subscription",
        "consumer": consumer.to_string(),
        "merchant": merchant.to_string(),
        "status": status,
        "fee_operation": fee.map(|o| o.id.to_string()),
    });
    for organization in [consumer, merchant] {
        out.push(NewEvent {
            kind,
            organization: Some(organization),
            object: subscription.to_string(),
            data: data.clone(),
        });
    }
}

/// The events of one accepted command and its receipt, applied at `at`.
pub fn derive(command: &Command, receipt: &Receipt, directory: &mut dyn Directory) -> Vec<NewEvent> {
    let mut out = Vec::new();
    match (command, receipt) {
        (Command::CreateOrganization { name, roles }, Receipt::OrganizationCreated(id)) => out.push(NewEvent {
            kind: "organization.created",
            organization: Some(*id),
            object: id.to_string(),
            data: json!({"id": id.to_string(), "object": "organization", "name": name,
                         "roles": {"merchant": roles.merchant, "consumer": roles.consumer}}),
        }),
        (Command::UpdateOrganization { roles, billing, .. }, Receipt::OrganizationUpdated(id)) => out.push(NewEvent {
            kind: "organization.updated",
            organization: Some(*id),
            object: id.to_string(),
            data: json!({"id": id.to_string(), "object": "organization",
                         "roles": {"merchant": roles.merchant, "consumer": roles.consumer},
                         "billing_details": billing}),
        }),
        (Command::CreateWallet { organization, currency, .. }, Receipt::WalletCreated(wallet)) => {
            out.push(wallet_created_event(*wallet, *organization, *currency))
        }
        (Command::SetWalletStatus { status, .. }, Receipt::WalletUpdated(wallet)) => {
            if let Some((owner, _)) = directory.wallet(*wallet) {
                out.push(NewEvent {
                    kind: "wallet.updated",
                    organization: Some(owner),
                    object: wallet.to_string(),
                    data: json!({"id": wallet.to_string(), "object": "wallet", "status": status}),
                });
            }
        }
        (Command::SetLowBalanceThreshold { threshold, .. }, Receipt::WalletUpdated(wallet)) => {
            if let Some((owner, currency)) = directory.wallet(*wallet) {
                out.push(NewEvent {
                    kind: "wallet.updated",
                    organization: Some(owner),
                    object: wallet.to_string(),
                    data: json!({"id": wallet.to_string(), "object": "wallet",
                                 "low_balance_threshold": threshold.map(|t| money(t, currency))}),
                });
            }
        }
        (Command::Move { action, .. } | Command::MoveAs { action, .. }, receipt) => {
            money_events(action, receipt, directory, &mut out)
        }
        (_, Receipt::Expired { holds, operations, renewals, .. }) => {
            for hold in holds {
                if let Some(wallet) = directory.hold_wallet(*hold) {
                    if let Some((owner, _)) = directory.wallet(wallet) {
                        out.push(NewEvent {
                            kind: "hold.expired",
                            organization: Some(owner),
                            object: hold.to_string(),
                            data: json!({"id": hold.to_string(), "object": "hold", "wallet": wallet.to_string(), "status": "expired"}),
                        });
                    }
                }
            }
            for operation in operations {
                let kind = if operation.kind == OperationKind::GrantVoid { "grant.voided" } else { "grant.expired" };
                if let Some(grant) = operation.legs.iter().flat_map(|l| l.grants.iter()).next() {
                    for owner in owners_of(operation, directory) {
                        out.push(NewEvent {
                            kind,
                            organization: Some(owner),
                            object: grant.grant.to_string(),
                            data: json!({"id": grant.grant.to_string(), "object": "grant", "operation": operation_json(operation)}),
                        });
                    }
                }
            }
            for renewal in renewals {
                let kind = match renewal.status {
                    SubscriptionStatus::Active => "subscription.renewed",
                    SubscriptionStatus::PastDue => "subscription.past_due",
                    SubscriptionStatus::Canceled => "subscription.canceled",
                };
                subscription_event(
                    kind,
                    renewal.subscription,
                    renewal.status,
                    renewal.fee.as_ref(),
                    directory,
                    &mut out,
                );
                if let Some(fee) = &renewal.fee {
                    operation_events(fee, directory, &mut out);
                    if renewal.low_balance {
                        if let Some(Account::Wallet(wallet)) = fee.legs.first().map(|l| l.account) {
                            out.extend(balance_low(wallet, directory, fee.legs.first().map(|l| l.balance_after)));
                        }
                    }
                }
            }
        }
        (Command::Notice { kind, organization, object, data }, Receipt::Noticed) => {
            if let Some(kind) = EVENT_TYPES.iter().find(|k| **k == kind.as_str()) {
                out.push(NewEvent {
                    kind,
                    organization: *organization,
                    object: object.clone(),
                    data: serde_json::from_str(data).unwrap_or(Value::Null),
                });
            }
        }
        (Command::CreateProduct { merchant, name }, Receipt::ProductCreated(id)) => out.push(NewEvent {
            kind: "product.created",
            organization: Some(*merchant),
            object: id.to_string(),
            data: json!({"id": id.to_string(), "object": "product", "name": name}),
        }),
        (Command::CreateMeter { merchant, code, unit, aggregation, product }, Receipt::MeterCreated(id)) => {
            out.push(NewEvent {
                kind: "meter.created",
                organization: Some(*merchant),
                object: id.to_string(),
                data: json!({"id": id.to_string(), "object": "meter", "code": code, "unit": unit,
                             "aggregation": aggregation, "product": product.map(|p| p.to_string())}),
            })
        }
        (Command::CreatePlan { spec }, Receipt::PlanCreated { plan, wallet_created }) => {
            if let Some(wallet) = wallet_created {
                out.push(wallet_created_event(*wallet, spec.merchant, spec.currency));
            }
            out.push(NewEvent {
                kind: "plan.created",
                organization: Some(spec.merchant),
                object: plan.to_string(),
                data: json!({"id": plan.to_string(), "object": "plan", "name": spec.name, "currency": spec.currency.code(),
                             "replaces": spec.replaces.map(|p| p.to_string())}),
            })
        }
        (
            Command::Subscribe { consumer, .. },
            Receipt::Subscription { subscription, status, wallet_created, fee, low_balance },
        ) => {
            if let Some(wallet) = wallet_created {
                if let Some(currency) =
                    fee.as_ref().map(|f| f.currency).or_else(|| directory.wallet(*wallet).map(|w| w.1))
                {
                    out.push(wallet_created_event(*wallet, *consumer, currency));
                }
            }
            subscription_event("subscription.created", *subscription, *status, fee.as_ref(), directory, &mut out);
            if *status == SubscriptionStatus::PastDue {
                subscription_event("subscription.past_due", *subscription, *status, None, directory, &mut out);
            }
            if let Some(fee) = fee {
                operation_events(fee, directory, &mut out);
                if *low_balance {
                    if let Some(Account::Wallet(wallet)) = fee.legs.first().map(|l| l.account) {
                        out.extend(balance_low(wallet, directory, fee.legs.first().map(|l| l.balance_after)));
                    }
                }
            }
        }
        (
            Command::CancelSubscription { at_period_end: false, .. },
            Receipt::Subscription { subscription, status, .. },
        ) => {
            subscription_event("subscription.canceled", *subscription, *status, None, directory, &mut out);
        }
        (Command::Usage { events, .. }, Receipt::Usage { results }) => {
            for (event, result) in events.iter().zip(results) {
                let Ok(charge) = result else { continue };
                let Some(operation) = &charge.operation else { continue };
                let leg = &operation.legs[0];
                // Stored as the meter's code alone; readers rebuild the rest from the
                // charge's usage record (see [`event_data`]).
                out.push(NewEvent {
                    kind: USAGE_CHARGED,
                    organization: Some(event.consumer),
                    object: operation.id.to_string(),
                    data: Value::String(event.meter.clone()),
                });
                if charge.low_balance {
                    if let Account::Wallet(wallet) = leg.account {
                        out.extend(balance_low(wallet, directory, Some(leg.balance_after)));
                    }
                }
            }
        }
        (Command::Payment(command), Receipt::Payment(receipt)) => payment_events(command, receipt, &mut out),
        (Command::Payout(command), Receipt::Payout(receipt)) => payout_events(command, receipt, &mut out),
        _ => {}
    }
    out
}

fn status_text<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The JSON of a top-up, as events carry it.
pub fn top_up_json(top_up: &TopUp) -> Value {
    let currency = top_up.currency;
    json!({
        "id": top_up.id.to_string(),
        "object": "top_up",
        "wallet": top_up.wallet.to_string(),
        "organization": top_up.organization.to_string(),
        "currency": currency.code(),
        "amount": money(Amount::from_units(top_up.amount), currency),
        "taxes": top_up.taxes.iter().map(|t| json!({"name": t.name.as_ref(), "amount": money(Amount::from_units(t.amount), currency)})).collect::<Vec<_>>(),
        "total": money(Amount::from_units(top_up.total), currency),
        "payment_method": top_up.method.to_string(),
        "status": status_text(&top_up.status),
        "automatic": top_up.auto,
        "created_at_ms": top_up.created_at,
        "settled_at_ms": top_up.settled_at,
        "failure_code": top_up.failure_code.as_deref(),
        "failure_message": top_up.failure_message.as_deref(),
        "operation": top_up.operation.map(|o| o.to_string()),
    })
}

/// The JSON of a checkout, as events carry it.
pub fn checkout_json(checkout: &Checkout) -> Value {
    let currency = checkout.currency;
    let units = |u: i128| money(Amount::from_units(u), currency);
    json!({
        "id": checkout.id.to_string(),
        "object": "checkout",
        "consumer": checkout.consumer.to_string(),
        "merchant": checkout.merchant.to_string(),
        "currency": currency.code(),
        "amount": units(checkout.amount),
        "wallet_part": units(checkout.wallet_part),
        "card_part": units(checkout.card_part),
        "platform_fee": units(checkout.fee),
        "subscription": checkout.subscription.map(|s| s.to_string()),
        "status": status_text(&checkout.status),
        "created_at_ms": checkout.created_at,
        "settled_at_ms": checkout.settled_at,
        "failure_code": checkout.failure_code.as_deref(),
        "operation": checkout.operation.map(|o| o.to_string()),
    })
}

fn payment_events(command: &PaymentCommand, receipt: &PaymentReceipt, out: &mut Vec<NewEvent>) {
    match (command, receipt) {
        (
            PaymentCommand::AddMethod { .. }
            | PaymentCommand::AddMethodOnce { .. }
            | PaymentCommand::RemoveMethod { .. },
            PaymentReceipt::Method(method),
        ) => {
            let kind = if method.removed { "payment_method.removed" } else { "payment_method.created" };
            out.push(NewEvent {
                kind,
                organization: Some(method.organization),
                object: method.id.to_string(),
                data: json!({"id": method.id.to_string(), "object": "payment_method", "type": status_text(&method.kind),
                             "brand": method.brand.as_ref(), "last4": method.last4.as_ref()}),
            });
        }
        (_, PaymentReceipt::TopUp { top_up, created, settled, operation, rule_disabled }) => {
            let data = top_up_json(top_up);
            let event = |kind| NewEvent {
                kind,
                organization: Some(top_up.organization),
                object: top_up.id.to_string(),
                data: data.clone(),
            };
            if *created {
                out.push(event("top_up.created"));
                if top_up.auto {
                    out.push(event("auto_top_up.started"));
                }
            }
            if *settled {
                let succeeded = top_up.status == PaymentStatus::Succeeded;
                out.push(event(if succeeded { "top_up.succeeded" } else { "top_up.failed" }));
                if top_up.auto {
                    out.push(event(if succeeded { "auto_top_up.succeeded" } else { "auto_top_up.failed" }));
                }
                if *rule_disabled {
                    out.push(event("auto_top_up.disabled"));
                }
            }
            if let Some(operation) = operation {
                out.push(operation_created(top_up.organization, operation));
            }
        }
        (_, PaymentReceipt::Checkout { checkout, created, settled, operation }) => {
            let data = checkout_json(checkout);
            let mut both = |kind: &'static str| {
                for organization in [checkout.consumer, checkout.merchant] {
                    out.push(NewEvent {
                        kind,
                        organization: Some(organization),
                        object: checkout.id.to_string(),
                        data: data.clone(),
                    });
                }
            };
            if *created {
                both("checkout.created");
            }
            if *settled {
                both(if checkout.status == PaymentStatus::Succeeded {
                    "checkout.succeeded"
                } else {
                    "checkout.failed"
                });
                // A renewal's card part failed: the subscription is past due.
                if let (Some(subscription), PaymentStatus::Failed) = (checkout.subscription, checkout.status) {
                    for organization in [checkout.consumer, checkout.merchant] {
                        out.push(NewEvent {
                            kind: "subscription.past_due",
                            organization: Some(organization),
                            object: subscription.to_string(),
                            data: json!({"id": subscription.to_string(), "object": "subscription",
                                         "consumer": checkout.consumer.to_string(),
                                         "merchant": checkout.merchant.to_string(), "status": "past_due",
                                         "checkout": checkout.id.to_string()}),
                        });
                    }
                }
            }
            if let Some(operation) = operation {
                for organization in [checkout.consumer, checkout.merchant] {
                    out.push(operation_created(organization, operation));
                }
            }
        }
        (_, PaymentReceipt::Refund { refund, created, settled, operation }) => {
            let currency = refund.currency;
            let units = |u: i128| money(Amount::from_units(u), currency);
            let data = json!({
                "id": refund.id.to_string(),
                "object": "refund",
                "wallet": refund.wallet.to_string(),
                "currency": currency.code(),
                "amount": units(refund.amount),
                "total": units(refund.total),
                "merchant_part": units(refund.merchant_part),
                "platform_fee_part": units(refund.fee_part),
                "status": status_text(&refund.status),
                "failure_code": refund.failure_code.as_deref(),
                "operation": refund.operation.map(|o| o.to_string()),
            });
            let mut kinds = Vec::new();
            if *created {
                kinds.push("refund.created");
            }
            if *settled {
                kinds.push(if refund.status == PaymentStatus::Succeeded {
                    "refund.succeeded"
                } else {
                    "refund.failed"
                });
            }
            for kind in kinds {
                out.push(NewEvent {
                    kind,
                    organization: Some(refund.organization),
                    object: refund.id.to_string(),
                    data: data.clone(),
                });
            }
            if let Some(operation) = operation {
                out.push(operation_created(refund.organization, operation));
            }
        }
        _ => {}
    }
}

fn payout_events(command: &PayoutCommand, receipt: &PayoutReceipt, out: &mut Vec<NewEvent>) {
    use tally_ledger::payouts::BankAccountStatus;
    match receipt {
        PayoutReceipt::Verification { organization, verification } => out.push(NewEvent {
            kind: "organization.verification_updated",
            organization: Some(*organization),
            object: organization.to_string(),
            data: json!({"object": "verification", "organization": organization.to_string(),
                         "status": status_text(&verification.status), "reason": verification.reason.as_deref()}),
        }),
        PayoutReceipt::BankAccount(account) => {
            // A wrong test-deposit answer that changes no status says nothing.
            let changed = !matches!(
                (command, account.status),
                (PayoutCommand::ConfirmDeposits { .. }, BankAccountStatus::PendingVerification)
            );
            if changed {
                let kind = if matches!(command, PayoutCommand::AddBankAccount { .. }) {
                    "bank_account.created"
                } else {
                    "bank_account.updated"
                };
                out.push(NewEvent {
                    kind,
                    organization: Some(account.organization),
                    object: account.id.to_string(),
                    data: json!({"id": account.id.to_string(), "object": "bank_account",
                                 "currency": account.currency.code(), "last4": account.last4.as_ref(),
                                 "status": status_text(&account.status)}),
                });
            }
        }
        PayoutReceipt::Payout { payout, created, settled, operation } => {
            let currency = payout.currency;
            let data = json!({
                "id": payout.id.to_string(),
                "object": "payout",
                "wallet": payout.wallet.to_string(),
                "bank_account": payout.bank_account.to_string(),
                "currency": currency.code(),
                "amount": money(Amount::from_units(payout.amount), currency),
                "status": match payout.status {
                    PaymentStatus::Pending => "in_transit",
                    PaymentStatus::Succeeded => "paid",
                    PaymentStatus::Failed => "failed",
                },
                "failure_code": payout.failure_code.as_deref(),
            });
            let mut kinds = Vec::new();
            if *created {
                kinds.push("payout.created");
            }
            if *settled {
                kinds.push(if payout.status == PaymentStatus::Succeeded { "payout.paid" } else { "payout.failed" });
            }
            for kind in kinds {
                out.push(NewEvent {
                    kind,
                    organization: Some(payout.organization),
                    object: payout.id.to_string(),
                    data: data.clone(),
                });
            }
            // Money left or came back to the wallet: an operation the owner sees. (Paid
            // moves only system accounts, so it is the payout.paid event alone.)
            if let Some(operation) =
                operation.as_ref().filter(|o| o.legs.iter().any(|l| matches!(l.account, Account::Wallet(_))))
            {
                out.push(operation_created(payout.organization, operation));
            }
        }
        PayoutReceipt::MinimumSet | PayoutReceipt::ScheduleSet(_) | PayoutReceipt::ScheduleSkipped { .. } => {}
    }
}

fn wallet_created_event(wallet: WalletId, organization: OrganizationId, currency: Currency) -> NewEvent {
    NewEvent {
        kind: "wallet.created",
        organization: Some(organization),
        object: wallet.to_string(),
        data: json!({"id": wallet.to_string(), "object": "wallet", "organization": organization.to_string(),
                     "currency": currency.code(), "status": "active"}),
    }
}

fn money_events(action: &MoneyAction, receipt: &Receipt, directory: &mut dyn Directory, out: &mut Vec<NewEvent>) {
    match receipt {
        Receipt::Posted { operation, grant } => {
            if let Some(grant) = grant {
                for owner in owners_of(operation, directory) {
                    out.push(NewEvent {
                        kind: "grant.created",
                        organization: Some(owner),
                        object: grant.to_string(),
                        data: json!({"id": grant.to_string(), "object": "grant", "operation": operation_json(operation)}),
                    });
                }
            }
            operation_events(operation, directory, out);
        }
        Receipt::HoldPlaced { hold, expires_at } | Receipt::Reserved { hold, expires_at, .. } => {
            let (wallet, amount, currency, kind) = match action {
                MoneyAction::PlaceHold { wallet, amount, .. } => {
                    (Some(*wallet), Some(amount.amount), Some(amount.currency), "hold.placed")
                }
                MoneyAction::Reserve { .. } => {
                    let Receipt::Reserved { amount, wallet, .. } = receipt else { return };
                    (Some(*wallet), Some(*amount), None, "reservation.created")
                }
                _ => (None, None, None, "hold.placed"),
            };
            let Some(wallet) = wallet else { return };
            let Some((owner, wallet_currency)) = directory.wallet(wallet) else { return };
            let currency = currency.unwrap_or(wallet_currency);
            out.push(NewEvent {
                kind,
                organization: Some(owner),
                object: hold.to_string(),
                data: json!({"id": hold.to_string(), "object": "hold", "wallet": wallet.to_string(),
                             "amount": amount.map(|a| money(a, currency)), "currency": currency.code(),
                             "status": "active", "expires_at_ms": expires_at}),
            });
        }
        Receipt::HoldCaptured { hold, operation, released } => {
            if let Some(wallet) = directory.hold_wallet(*hold) {
                if let Some((owner, currency)) = directory.wallet(wallet) {
                    out.push(NewEvent {
                        kind: "hold.captured",
                        organization: Some(owner),
                        object: hold.to_string(),
                        data: json!({"id": hold.to_string(), "object": "hold", "wallet": wallet.to_string(),
                                     "status": "captured", "released": money(*released, currency),
                                     "operation": operation.id.to_string()}),
                    });
                }
            }
            operation_events(operation, directory, out);
        }
        Receipt::HoldReleased { hold, released } => {
            if let Some(wallet) = directory.hold_wallet(*hold) {
                if let Some((owner, currency)) = directory.wallet(wallet) {
                    out.push(NewEvent {
                        kind: "hold.released",
                        organization: Some(owner),
                        object: hold.to_string(),
                        data: json!({"id": hold.to_string(), "object": "hold", "wallet": wallet.to_string(),
                                     "status": "released", "released": money(*released, currency)}),
                    });
                }
            }
        }
        Receipt::GrantVoided { grant, operation: Some(operation) } => {
            for owner in owners_of(operation, directory) {
                out.push(NewEvent {
                    kind: "grant.voided",
                    organization: Some(owner),
                    object: grant.to_string(),
                    data: json!({"id": grant.to_string(), "object": "grant", "status": "voided",
                                 "operation": operation_json(operation)}),
                });
            }
            operation_events(operation, directory, out);
        }
        _ => {}
    }
}
