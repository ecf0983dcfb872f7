//! The ledger core's integration tests: every rejection, the domain's seed scenarios,
//! and a property test against a separately written reference model.

mod model;
mod payments;
mod payouts;
mod rules;
mod usage;

use tally_ledger::*;

pub const START: Timestamp = 1_700_000_000_000;

pub fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

pub fn money(text: &str) -> Money {
    Money::parse(text, "USD").unwrap()
}

pub fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::new("test", text).unwrap()
}

/// A ledger with `count` organizations, each with one USD wallet (ids 1..=count).
pub fn ledger(count: u64) -> State {
    let mut state = State::new(Settings::default());
    for id in 1..=count {
        state
            .apply(&Command::CreateOrganization { name: format!("org {id}"), roles: Roles::default() }, START)
            .unwrap();
        state
            .apply(
                &Command::CreateWallet {
                    organization: OrganizationId(id),
                    currency: usd(),
                    low_balance_threshold: None,
                    additional: false,
                },
                START,
            )
            .unwrap();
    }
    state
}

pub fn credit(wallet: u64, amount: &str) -> MoneyAction {
    MoneyAction::Credit {
        wallet: WalletId(wallet),
        amount: money(amount),
        kind: CreditKind::Adjustment,
        source: AdjustmentSource::ExternalFunding,
        grant: None,
        reason: "test".into(),
    }
}

pub fn run(state: &mut State, name: &str, action: MoneyAction) -> Result<Receipt, Rejection> {
    run_at(state, name, action, START)
}

pub fn run_at(state: &mut State, name: &str, action: MoneyAction, now: Timestamp) -> Result<Receipt, Rejection> {
    state.apply(&Command::Move { key: key(name), action }, now)
}

pub fn balance(state: &State, wallet: u64) -> String {
    state.wallet(WalletId(wallet)).unwrap().balance().format(2)
}

pub fn available(state: &State, wallet: u64) -> String {
    state.wallet(WalletId(wallet)).unwrap().available().format(2)
}
