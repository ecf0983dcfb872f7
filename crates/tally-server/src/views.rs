//! How ledger objects look over the wire. Every view is a pure function of ledger data,
//! so a replayed request renders exactly the answer the first one got.

use crate::time;
use serde_json::{json, Value};
use tally_ledger::*;

pub fn amount(value: Amount, currency: Currency) -> String {
    Money::new(value, currency).format_amount()
}

/// An operation with its legs: the same JSON events carry, with an RFC 3339 time.
pub fn operation(operation: &Operation) -> Value {
    let mut view = tally_store::events::operation_json(operation);
    if let Some(object) = view.as_object_mut() {
        object.remove("created_at_ms");
        object.insert("created_at".into(), Value::String(time::format(operation.at)));
    }
    view
}

pub fn grant(grant: &Grant, currency: Currency) -> Value {
    json!({
        "id": grant.id.to_string(),
        "object": "grant",
        "wallet": grant.wallet.to_string(),
        "category": grant.category,
        "priority": grant.priority,
        "expires_at": grant.expires_at.map(time::format),
        "amount": amount(Amount::from_units(grant.amount), currency),
        "remaining": amount(Amount::from_units(grant.remaining), currency),
        "reserved": amount(Amount::from_units(grant.reserved), currency),
        "status": grant.status,
        "applicability": grant.applicability.as_ref().map(|a| json!({
            "merchants": a.merchants.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            "products": a.products.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        })),
    })
}

pub fn wallet(state: &State, wallet: &Wallet) -> Value {
    let currency = wallet.currency;
    json!({
        "id": wallet.id.to_string(),
        "object": "wallet",
        "organization": wallet.organization.to_string(),
        "currency": currency.code(),
        "status": wallet.status,
        "balance": amount(wallet.balance(), currency),
        "held": amount(wallet.held(), currency),
        "available": amount(wallet.available(), currency),
        "low_balance_threshold": wallet.low_balance_threshold.map(|t| amount(t, currency)),
        "grants": wallet.grants.iter().filter_map(|g| state.grant(*g)).map(|g| grant(g, currency)).collect::<Vec<_>>(),
    })
}

pub fn hold(hold: &Hold, currency: Currency) -> Value {
    json!({
        "id": hold.id.to_string(),
        "object": "hold",
        "wallet": hold.wallet.to_string(),
        "amount": amount(Amount::from_units(hold.amount), currency),
        "currency": currency.code(),
        "status": "active",
        "exclusive": hold.exclusive,
        "payee": hold.payee.map(|p| p.to_string()),
        "created_at": time::format(hold.placed_at),
        "expires_at": time::format(hold.expires_at),
        "reservations": hold.reservations.iter().map(|r| json!({
            "source": match r.portion { Portion::Main => "main".to_string(), Portion::Grant(g) => g.to_string() },
            "amount": amount(Amount::from_units(r.amount), currency),
        })).collect::<Vec<_>>(),
    })
}

pub fn organization(organization: &Organization) -> Value {
    json!({
        "id": organization.id.to_string(),
        "object": "organization",
        "name": &*organization.name,
        "roles": {"merchant": organization.roles.merchant, "consumer": organization.roles.consumer},
        "billing_details": organization.billing.as_deref(),
        "wallets": organization.wallets.iter().map(|(_, w)| w.to_string()).collect::<Vec<_>>(),
    })
}

/// The answer to a money-moving request, from the request and its receipt.
/// `released_currency`: the currency of a released hold's wallet (a release's receipt
/// names only the hold), found by the caller; without it the amount has no fixed
/// decimals.
pub fn money_answer(action: &MoneyAction, receipt: &Receipt, released_currency: Option<Currency>) -> (u16, Value) {
    match (action, receipt) {
        (_, Receipt::Posted { operation: posted, grant: Some(grant) }) => {
            (201, json!({"grant": grant.to_string(), "operation": operation(posted)}))
        }
        (_, Receipt::Posted { operation: posted, grant: None }) => (201, operation(posted)),
        (
            MoneyAction::PlaceHold { wallet, amount: money, exclusive, payee, description, .. },
            Receipt::HoldPlaced { hold, expires_at },
        ) => (
            201,
            json!({
                "id": hold.to_string(),
                "object": "hold",
                "wallet": wallet.to_string(),
                "amount": money.format_amount(),
                "currency": money.currency.code(),
                "status": "active",
                "exclusive": exclusive,
                "payee": payee.map(|p| p.to_string()),
                "description": description,
                "expires_at": time::format(*expires_at),
            }),
        ),
        (_, Receipt::HoldCaptured { hold, operation: posted, released }) => (
            200,
            json!({
                "hold": hold.to_string(),
                "status": "captured",
                "released": amount(*released, posted.currency),
                "operation": operation(posted),
            }),
        ),
        (_, Receipt::HoldReleased { hold, released }) => {
            let released = match released_currency {
                Some(currency) => amount(*released, currency),
                None => released.format(0),
            };
            (200, json!({"hold": hold.to_string(), "status": "released", "released": released}))
        }
        (_, Receipt::GrantVoided { grant, operation: posted }) => {
            (200, json!({"grant": grant.to_string(), "status": "voided", "operation": posted.as_ref().map(operation)}))
        }
        (MoneyAction::Reserve { consumer, .. }, Receipt::Reserved { hold, expires_at, amount: held, .. }) => (
            201,
            json!({
                "id": hold.to_string(),
                "object": "reservation",
                "consumer": consumer.to_string(),
                "amount": held.format(2),
                "status": "active",
                "expires_at": time::format(*expires_at),
            }),
        ),
        (_, other) => (200, json!({"result": format!("{other:?}")})),
    }
}
