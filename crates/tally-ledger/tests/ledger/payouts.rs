//! Payouts in the state machine: verification, bank accounts and their test deposits,
//! every refusal with its code, paid and failed payouts, and schedules; the domain's
//! payout seed scenario as written.

use super::*;
use tally_ledger::payments::{PaymentStatus, ProviderOutcome};
use tally_ledger::payouts::*;

const MERCHANT: OrganizationId = OrganizationId(1);

fn a(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

fn payout_cmd(state: &mut State, command: PayoutCommand, now: Timestamp) -> Result<PayoutReceipt, Rejection> {
    match state.apply(&Command::payout(command), now)? {
        Receipt::Payout(receipt) => Ok(receipt),
        other => panic!("unexpected {other:?}"),
    }
}

fn run_payout(state: &mut State, command: PayoutCommand) -> Result<PayoutReceipt, Rejection> {
    payout_cmd(state, command, START)
}

/// Org 1 with billing details, wallet 1 funded with `funds`; bank account ba_1 in USD.
fn merchant(funds: &str) -> State {
    let mut state = ledger(2);
    let billing = BillingDetails {
        legal_name: "Shop".into(),
        email: "shop@example.com".into(),
        address: String::new(),
        country: "US".into(),
        region: "NY".into(),
        tax_id: String::new(),
    };
    let roles = Roles { merchant: true, consumer: false };
    state.apply(&Command::UpdateOrganization { organization: MERCHANT, roles, billing: Some(billing) }, START).unwrap();
    if a(funds).is_positive() {
        run(&mut state, "fund", credit(1, funds)).unwrap();
    }
    let account = NewBankAccount {
        organization: MERCHANT,
        country: "US".into(),
        currency: usd(),
        holder_name: "Shop LLC".into(),
        last4: "6789".into(),
        token: "btok_1".into(),
    };
    run_payout(&mut state, PayoutCommand::AddBankAccount { account }).unwrap();
    state
}

fn verify_all(state: &mut State) {
    run_payout(state, PayoutCommand::SubmitVerification { organization: MERCHANT }).unwrap();
    let approve = PayoutCommand::DecideVerification { organization: MERCHANT, approve: true, reason: String::new() };
    run_payout(state, approve).unwrap();
    run_payout(state, PayoutCommand::VerifyBankAccount { account: BankAccountId(1) }).unwrap();
}

fn create(state: &mut State, name: &str, amount: &str) -> Result<Payout, Rejection> {
    let command = PayoutCommand::CreatePayout {
        key: key(name),
        actor: Some(MERCHANT),
        wallet: WalletId(1),
        amount: money(amount),
        bank_account: BankAccountId(1),
    };
    match run_payout(state, command)? {
        PayoutReceipt::Payout { payout, .. } => Ok(*payout),
        other => panic!("unexpected {other:?}"),
    }
}

fn system(state: &State, account: SystemAccount) -> String {
    state.system_balance(usd(), account).format(2)
}

#[test]
fn seed_a_verified_merchant_pays_out_and_a_failed_payout_returns_the_money() {
    let mut state = merchant("1000.00");
    verify_all(&mut state);
    let payout = create(&mut state, "p1", "999.99").unwrap();
    assert_eq!(payout.status, PaymentStatus::Pending);
    assert_eq!(balance(&state, 1), "0.01");
    assert_eq!(system(&state, SystemAccount::PayoutsInTransit), "999.99", "in transit");
    let paid = PayoutCommand::SettlePayout {
        payout: payout.id,
        outcome: ProviderOutcome::Succeeded { reference: "r".into() },
    };
    run_payout(&mut state, paid.clone()).unwrap();
    assert_eq!(system(&state, SystemAccount::PayoutsInTransit), "0.00");
    assert_eq!(system(&state, SystemAccount::ExternalFunding), "-0.01", "999.99 of the 1,000.00 left");
    // A late answer changes nothing.
    let failed = ProviderOutcome::Failed { code: "account_closed".into(), message: "closed".into() };
    run_payout(&mut state, PayoutCommand::SettlePayout { payout: payout.id, outcome: failed.clone() }).unwrap();
    assert_eq!(state.payouts.payout(payout.id).unwrap().status, PaymentStatus::Succeeded);
    // A failed payout returns the money to the wallet, with the reason.
    run(&mut state, "more", credit(1, "50.00")).unwrap();
    let second = create(&mut state, "p2", "50.00").unwrap();
    assert_eq!(balance(&state, 1), "0.01");
    run_payout(&mut state, PayoutCommand::SettlePayout { payout: second.id, outcome: failed }).unwrap();
    assert_eq!(balance(&state, 1), "50.01");
    let record = state.payouts.payout(second.id).unwrap();
    assert_eq!((record.status, record.failure_code.as_deref()), (PaymentStatus::Failed, Some("account_closed")));
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn every_payout_refusal_has_its_code_and_moves_nothing() {
    let mut state = merchant("100.00");
    let before = state.clone();
    assert_eq!(create(&mut state, "a", "10.00").unwrap_err(), Rejection::OrganizationNotVerified);
    assert_eq!(state, before);
    run_payout(&mut state, PayoutCommand::SubmitVerification { organization: MERCHANT }).unwrap();
    assert_eq!(
        create(&mut state, "a", "10.00").unwrap_err(),
        Rejection::OrganizationNotVerified,
        "pending is not verified"
    );
    let reject =
        PayoutCommand::DecideVerification { organization: MERCHANT, approve: false, reason: "blurry id".into() };
    let PayoutReceipt::Verification { verification, .. } = run_payout(&mut state, reject).unwrap() else { panic!() };
    assert_eq!(
        (verification.status, verification.reason.as_deref()),
        (VerificationStatus::Rejected, Some("blurry id"))
    );
    assert_eq!(
        run_payout(
            &mut state,
            PayoutCommand::DecideVerification { organization: MERCHANT, approve: true, reason: String::new() }
        )
        .unwrap_err(),
        Rejection::InvalidStatusChange,
        "only a pending organization is decided"
    );
    run_payout(&mut state, PayoutCommand::SubmitVerification { organization: MERCHANT }).unwrap();
    run_payout(
        &mut state,
        PayoutCommand::DecideVerification { organization: MERCHANT, approve: true, reason: String::new() },
    )
    .unwrap();
    let before = state.clone();
    assert_eq!(create(&mut state, "b", "10.00").unwrap_err(), Rejection::BankAccountNotVerified);
    run_payout(&mut state, PayoutCommand::VerifyBankAccount { account: BankAccountId(1) }).unwrap();
    run_payout(&mut state, PayoutCommand::SetMinimum { minimum: money("5.00") }).unwrap();
    let verified = state.clone();
    assert_eq!(create(&mut state, "c", "4.99").unwrap_err(), Rejection::AmountBelowMinimum);
    assert_eq!(create(&mut state, "d", "10.001").unwrap_err(), Rejection::AmountNotInMinorUnits);
    assert_eq!(create(&mut state, "e", "100.01").unwrap_err(), Rejection::InsufficientFunds);
    assert_eq!(create(&mut state, "f", "0").unwrap_err(), Rejection::AmountMustBePositive);
    let eur = PayoutCommand::CreatePayout {
        key: key("g"),
        actor: Some(MERCHANT),
        wallet: WalletId(1),
        amount: Money::parse("10.00", "EUR").unwrap(),
        bank_account: BankAccountId(1),
    };
    assert_eq!(run_payout(&mut state, eur).unwrap_err(), Rejection::CurrencyMismatch);
    let other = PayoutCommand::CreatePayout {
        key: key("h"),
        actor: Some(OrganizationId(2)),
        wallet: WalletId(1),
        amount: money("10.00"),
        bank_account: BankAccountId(1),
    };
    assert_eq!(run_payout(&mut state, other).unwrap_err(), Rejection::WalletNotFound, "another organization's wallet");
    assert_eq!(state, verified);
    let _ = before;
    // Held money is not available for a payout.
    let hold = MoneyAction::PlaceHold {
        wallet: WalletId(1),
        amount: money("95.00"),
        ttl_ms: 60_000,
        exclusive: false,
        payee: None,
        product: None,
        description: String::new(),
    };
    run(&mut state, "hold", hold).unwrap();
    assert_eq!(create(&mut state, "i", "10.00").unwrap_err(), Rejection::InsufficientFunds);
    // The same key again is the same payout; with another amount it is refused.
    let mut state = verified;
    let first = create(&mut state, "j", "10.00").unwrap();
    assert_eq!(create(&mut state, "j", "10.00").unwrap().id, first.id);
    assert_eq!(create(&mut state, "j", "11.00").unwrap_err(), Rejection::IdempotencyKeyMismatch);
    assert_eq!(balance(&state, 1), "90.00");
}

#[test]
fn test_deposits_verify_an_account_and_three_wrong_answers_fail_it() {
    let mut state = merchant("0");
    let start = PayoutCommand::StartDepositVerification { account: BankAccountId(1), deposits: (32, 45) };
    run_payout(&mut state, start).unwrap();
    let confirm = |deposits| PayoutCommand::ConfirmDeposits { account: BankAccountId(1), deposits };
    let PayoutReceipt::BankAccount(account) = run_payout(&mut state, confirm((45, 32))).unwrap() else { panic!() };
    assert_eq!(account.status, BankAccountStatus::Verified, "either order");
    // A second account: three wrong answers fail it.
    let account = NewBankAccount {
        organization: MERCHANT,
        country: "DE".into(),
        currency: Currency::parse("EUR").unwrap(),
        holder_name: "Shop GmbH".into(),
        last4: "3000".into(),
        token: "btok_2".into(),
    };
    run_payout(&mut state, PayoutCommand::AddBankAccount { account }).unwrap();
    run_payout(&mut state, PayoutCommand::StartDepositVerification { account: BankAccountId(2), deposits: (11, 12) })
        .unwrap();
    let confirm = |deposits| PayoutCommand::ConfirmDeposits { account: BankAccountId(2), deposits };
    for attempt in 1..=3 {
        let PayoutReceipt::BankAccount(account) = run_payout(&mut state, confirm((1, 2))).unwrap() else { panic!() };
        let expected = if attempt < 3 { BankAccountStatus::PendingVerification } else { BankAccountStatus::Failed };
        assert_eq!(account.status, expected, "attempt {attempt}");
    }
    assert_eq!(run_payout(&mut state, confirm((11, 12))).unwrap_err(), Rejection::InvalidStatusChange);
}

#[test]
fn a_schedule_pays_out_available_above_the_reserve_once_per_period() {
    let mut state = merchant("250.00");
    verify_all(&mut state);
    let schedule = PayoutSchedule {
        interval: PayoutInterval::Daily,
        reserve: a("100.00"),
        bank_account: BankAccountId(1),
        next_at: START + 1000,
    };
    run_payout(&mut state, PayoutCommand::SetSchedule { wallet: WalletId(1), schedule: Some(schedule) }).unwrap();
    assert_eq!(
        payout_cmd(&mut state, PayoutCommand::RunSchedule { wallet: WalletId(1) }, START).unwrap_err(),
        Rejection::InvalidStatusChange,
        "not due yet"
    );
    let PayoutReceipt::Payout { payout, .. } =
        payout_cmd(&mut state, PayoutCommand::RunSchedule { wallet: WalletId(1) }, START + 1000).unwrap()
    else {
        panic!()
    };
    assert_eq!((payout.amount, payout.scheduled), (a("150.00").units(), true));
    assert_eq!(balance(&state, 1), "100.00");
    // Run again in the same period: not due.
    assert!(payout_cmd(&mut state, PayoutCommand::RunSchedule { wallet: WalletId(1) }, START + 2000).is_err());
    // Next day: nothing above the reserve, skipped, and moved on.
    let next = START + 1000 + 86_400_000;
    assert_eq!(
        payout_cmd(&mut state, PayoutCommand::RunSchedule { wallet: WalletId(1) }, next).unwrap(),
        PayoutReceipt::ScheduleSkipped { wallet: WalletId(1), reason: Rejection::AmountMustBePositive }
    );
    assert_eq!(state.payouts.schedules[&WalletId(1)].next_at, next + 86_400_000);
}
