//! Payments in the state machine: taxed top-ups credited exactly once, auto top-up
//! rules (one in flight, back-off, disable after three failures, daily limits) and
//! wallet-first checkouts, with the domain's seed scenarios as written.

use super::*;
use tally_ledger::payments::*;

const CONSUMER: OrganizationId = OrganizationId(1);
const MERCHANT: OrganizationId = OrganizationId(2);
const OTHER: OrganizationId = OrganizationId(3);

fn a(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

fn pay(state: &mut State, command: PaymentCommand) -> Result<PaymentReceipt, Rejection> {
    pay_at(state, command, START)
}

fn pay_at(state: &mut State, command: PaymentCommand, now: Timestamp) -> Result<PaymentReceipt, Rejection> {
    match state.apply(&Command::payment(command), now)? {
        Receipt::Payment(receipt) => Ok(receipt),
        other => panic!("unexpected receipt {other:?}"),
    }
}

fn billing(country: &str, region: &str) -> BillingDetails {
    BillingDetails {
        legal_name: "Acme".into(),
        email: "billing@acme.test".into(),
        address: "1 Main St".into(),
        country: country.into(),
        region: region.into(),
        tax_id: String::new(),
    }
}

fn card() -> MethodDetails {
    MethodDetails { kind: MethodType::Card, brand: "visa".into(), last4: "4242".into(), exp_month: 12, exp_year: 2034 }
}

/// Org 1 (consumer, wallet 1) with billing details in US-CA and card pm_1; org 2 a
/// merchant (wallet 2); org 3 (wallet 3) with card pm_2.
fn payments_ledger() -> State {
    let mut state = ledger(3);
    for (organization, roles) in [
        (CONSUMER, Roles { merchant: false, consumer: true }),
        (MERCHANT, Roles { merchant: true, consumer: false }),
        (OTHER, Roles { merchant: false, consumer: true }),
    ] {
        let command = Command::UpdateOrganization { organization, roles, billing: Some(billing("US", "CA")) };
        state.apply(&command, START).unwrap();
    }
    for organization in [CONSUMER, OTHER] {
        let add = PaymentCommand::AddMethod { organization, token: "tok".into(), details: card(), make_default: true };
        pay(&mut state, add).unwrap();
    }
    state
}

fn top_up(state: &mut State, name: &str, amount: &str) -> Result<TopUp, Rejection> {
    let command = PaymentCommand::CreateTopUp {
        key: key(name),
        actor: None,
        wallet: WalletId(1),
        amount: money(amount),
        method: PaymentMethodId(1),
    };
    match pay(state, command)? {
        PaymentReceipt::TopUp { top_up, .. } => Ok(*top_up),
        other => panic!("unexpected {other:?}"),
    }
}

fn succeeded() -> ProviderOutcome {
    ProviderOutcome::Succeeded { reference: "pay_1".into() }
}

fn declined() -> ProviderOutcome {
    ProviderOutcome::Failed { code: "card_declined".into(), message: "declined".into() }
}

fn settle(state: &mut State, id: TopUpId, outcome: ProviderOutcome, now: Timestamp) -> TopUp {
    match pay_at(state, PaymentCommand::SettleTopUp { top_up: id, outcome }, now).unwrap() {
        PaymentReceipt::TopUp { top_up, .. } => *top_up,
        other => panic!("unexpected {other:?}"),
    }
}

fn system(state: &State, account: SystemAccount) -> String {
    state.system_balance(usd(), account).format(2)
}

fn sales_tax(state: &mut State) {
    let profile = TaxProfile {
        country: "US".into(),
        subdivision: Some("CA".into()),
        taxes: vec![
            Tax { name: "Sales tax".into(), rate: PartsPerMillion(50_000), fixed: None },
            Tax { name: "Emergency services surcharge".into(), rate: PartsPerMillion(0), fixed: Some(money("0.75")) },
        ],
    };
    pay(state, PaymentCommand::SetTaxProfile { profile }).unwrap();
}

#[test]
fn seed_a_taxed_top_up_charges_amount_plus_taxes_and_credits_the_amount() {
    let mut state = payments_ledger();
    sales_tax(&mut state);
    // A country-wide profile exists too; the subdivision's is more specific and wins.
    let country = TaxProfile {
        country: "US".into(),
        subdivision: None,
        taxes: vec![Tax { name: "Federal".into(), rate: PartsPerMillion(10_000), fixed: None }],
    };
    pay(&mut state, PaymentCommand::SetTaxProfile { profile: country }).unwrap();
    let pending = top_up(&mut state, "t1", "20.00").unwrap();
    assert_eq!(pending.status, PaymentStatus::Pending);
    assert_eq!(pending.total, a("21.75").units());
    assert_eq!(pending.taxes.iter().map(|t| t.amount).collect::<Vec<_>>(), vec![a("1.00").units(), a("0.75").units()]);
    // Nothing moves until the provider confirms.
    assert_eq!(balance(&state, 1), "0.00");
    let done = settle(&mut state, pending.id, succeeded(), START + 1);
    assert_eq!(done.status, PaymentStatus::Succeeded);
    assert_eq!(done.receipt_number, Some(1));
    assert_eq!(balance(&state, 1), "20.00");
    assert_eq!(system(&state, SystemAccount::TaxPayable), "1.75");
    assert_eq!(system(&state, SystemAccount::ExternalFunding), "-21.75");
    // A repeated or contrary late answer changes nothing.
    settle(&mut state, pending.id, succeeded(), START + 2);
    settle(&mut state, pending.id, declined(), START + 3);
    assert_eq!(balance(&state, 1), "20.00");
    assert_eq!(state.payments.top_up(pending.id).unwrap().status, PaymentStatus::Succeeded);
    // Another region: the country profile applies; a region without one pays no tax.
    let mut other = payments_ledger();
    let country = TaxProfile {
        country: "US".into(),
        subdivision: None,
        taxes: vec![Tax { name: "Federal".into(), rate: PartsPerMillion(10_000), fixed: None }],
    };
    pay(&mut other, PaymentCommand::SetTaxProfile { profile: country }).unwrap();
    assert_eq!(top_up(&mut other, "t1", "20.00").unwrap().total, a("20.20").units());
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn tax_lines_round_half_to_even_to_minor_units() {
    let profile = TaxProfile {
        country: "US".into(),
        subdivision: None,
        taxes: vec![Tax { name: "t".into(), rate: PartsPerMillion(125_000), fixed: None }],
    };
    // 12.5% of 0.20 = 0.025 -> 0.02 (half to even); of 0.60 = 0.075 -> 0.08.
    assert_eq!(compute_taxes(Some(&profile), a("0.20"), usd()).unwrap()[0].amount, a("0.02").units());
    assert_eq!(compute_taxes(Some(&profile), a("0.60"), usd()).unwrap()[0].amount, a("0.08").units());
    // A fixed amount in another currency does not apply.
    let eur = TaxProfile {
        country: "US".into(),
        subdivision: None,
        taxes: vec![Tax {
            name: "f".into(),
            rate: PartsPerMillion(0),
            fixed: Some(Money::parse("1.00", "EUR").unwrap()),
        }],
    };
    assert!(compute_taxes(Some(&eur), a("10.00"), usd()).unwrap().is_empty());
}

#[test]
fn top_up_refusals_change_nothing() {
    let mut state = ledger(2);
    let add =
        PaymentCommand::AddMethod { organization: CONSUMER, token: "tok".into(), details: card(), make_default: true };
    pay(&mut state, add).unwrap();
    let before = state.clone();
    assert_eq!(top_up(&mut state, "t", "20.00").unwrap_err(), Rejection::BillingDetailsRequired);
    assert_eq!(state, before);
    let mut state = payments_ledger();
    let limits = PaymentCommand::SetWalletLimits {
        wallet: WalletId(1),
        min_top_up: Some(a("5.00")),
        max_top_up: Some(a("500.00")),
        presets: vec![a("10.00"), a("25.00")],
    };
    pay(&mut state, limits).unwrap();
    let before = state.clone();
    assert_eq!(top_up(&mut state, "a", "4.99").unwrap_err(), Rejection::AmountBelowMinimum);
    assert_eq!(top_up(&mut state, "b", "500.01").unwrap_err(), Rejection::AmountAboveMaximum);
    assert_eq!(top_up(&mut state, "c", "10.001").unwrap_err(), Rejection::AmountNotInMinorUnits);
    assert_eq!(top_up(&mut state, "d", "0").unwrap_err(), Rejection::AmountMustBePositive);
    let foreign = PaymentCommand::CreateTopUp {
        key: key("e"),
        actor: None,
        wallet: WalletId(1),
        amount: money("10.00"),
        method: PaymentMethodId(2),
    };
    assert_eq!(pay(&mut state, foreign).unwrap_err(), Rejection::PaymentMethodNotFound);
    assert_eq!(state, before, "refusals change nothing");
    pay(&mut state, PaymentCommand::SetMethodTypes { organization: CONSUMER, types: vec![MethodType::BankAccount] })
        .unwrap();
    assert_eq!(top_up(&mut state, "f", "10.00").unwrap_err(), Rejection::PaymentMethodTypeNotAllowed);
    pay(&mut state, PaymentCommand::SetMethodTypes { organization: CONSUMER, types: MethodType::ALL.to_vec() })
        .unwrap();
    // The same key with another amount is refused; with the same body it is the same top-up.
    let first = top_up(&mut state, "g", "10.00").unwrap();
    assert_eq!(top_up(&mut state, "g", "11.00").unwrap_err(), Rejection::IdempotencyKeyMismatch);
    assert_eq!(top_up(&mut state, "g", "10.00").unwrap().id, first.id);
    assert_eq!(state.payments.top_ups.len(), 1);
}

fn auto_rule(state: &mut State, threshold: &str, amount: AutoAmount, per_day: u32, amount_per_day: &str) {
    let rule = AutoTopUpSpec {
        threshold: a(threshold),
        amount,
        method: PaymentMethodId(1),
        max_per_day: per_day,
        max_amount_per_day: a(amount_per_day),
    };
    pay(state, PaymentCommand::SetAutoTopUp { wallet: WalletId(1), rule: Some(rule) }).unwrap();
}

fn debit(state: &mut State, name: &str, amount: &str, now: Timestamp) {
    let action = MoneyAction::Debit {
        wallet: WalletId(1),
        amount: money(amount),
        source: AdjustmentSource::ExternalFunding,
        reason: String::new(),
    };
    run_at(state, name, action, now).unwrap();
}

fn start_auto(state: &mut State, now: Timestamp) -> PaymentReceipt {
    pay_at(state, PaymentCommand::StartAutoTopUp { wallet: WalletId(1) }, now).unwrap()
}

#[test]
fn seed_auto_top_up_runs_once_while_pending() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "30.00")).unwrap();
    auto_rule(&mut state, "10.00", AutoAmount::Fixed(a("40.00")), 5, "500.00");
    assert!(state.payments.auto_due.is_empty());
    debit(&mut state, "d1", "22.00", START);
    assert_eq!(available(&state, 1), "8.00");
    assert_eq!(state.payments.auto_due.len(), 1, "the debit below the threshold makes the rule due");
    let PaymentReceipt::TopUp { top_up, created: true, .. } = start_auto(&mut state, START) else { panic!() };
    assert_eq!((top_up.amount, top_up.auto), (a("40.00").units(), true));
    // A second debit while it is pending does not start another.
    debit(&mut state, "d2", "1.00", START + 1);
    assert!(state.payments.auto_due.is_empty());
    assert_eq!(
        start_auto(&mut state, START + 2),
        PaymentReceipt::AutoTopUpSkipped { wallet: WalletId(1), reason: Rejection::AutoTopUpInFlight }
    );
    assert_eq!(state.payments.top_ups.len(), 1);
    settle(&mut state, top_up.id, succeeded(), START + 3);
    assert_eq!(available(&state, 1), "47.00");
    // Above the threshold again: a success does not start another by itself.
    assert!(state.payments.auto_due.is_empty());
    assert!(state.check_invariants().is_empty());
}

#[test]
fn auto_top_up_up_to_a_target_charges_the_difference_in_one_go() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "12.00")).unwrap();
    auto_rule(&mut state, "10.00", AutoAmount::UpTo(a("50.00")), 5, "500.00");
    debit(&mut state, "d1", "4.505", START);
    let PaymentReceipt::TopUp { top_up, .. } = start_auto(&mut state, START) else { panic!() };
    // 50.00 - 7.495 = 42.505, rounded up to whole cents.
    assert_eq!(top_up.amount, a("42.51").units());
}

#[test]
fn failing_auto_top_ups_back_off_then_disable_the_rule() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "30.00")).unwrap();
    auto_rule(&mut state, "10.00", AutoAmount::Fixed(a("40.00")), 10, "1000.00");
    debit(&mut state, "d1", "25.00", START);
    let mut now = START;
    let mut waits = Vec::new();
    for attempt in 1..=3 {
        let PaymentReceipt::TopUp { top_up, .. } = start_auto(&mut state, now) else { panic!("attempt {attempt}") };
        let PaymentReceipt::TopUp { rule_disabled, .. } =
            pay_at(&mut state, PaymentCommand::SettleTopUp { top_up: top_up.id, outcome: declined() }, now).unwrap()
        else {
            panic!()
        };
        assert_eq!(rule_disabled, attempt == 3);
        if attempt < 3 {
            let (due, _) = *state.payments.auto_due.first().expect("due again after the back-off");
            waits.push(due - now);
            // Too early: skipped, and still due at the same time.
            assert_eq!(
                start_auto(&mut state, due - 1),
                PaymentReceipt::AutoTopUpSkipped { wallet: WalletId(1), reason: Rejection::AutoTopUpBackingOff }
            );
            now = due;
        }
    }
    assert_eq!(waits, vec![AUTO_TOP_UP_BACKOFF_FIRST_MS, 2 * AUTO_TOP_UP_BACKOFF_FIRST_MS]);
    let rule = state.payments.wallets[&WalletId(1)].auto.clone().unwrap();
    assert!(!rule.enabled);
    assert!(state.payments.auto_due.is_empty());
    debit(&mut state, "d2", "1.00", now + 1);
    assert!(state.payments.auto_due.is_empty(), "a disabled rule never triggers");
    assert_eq!(balance(&state, 1), "4.00", "failed top-ups moved nothing");
}

#[test]
fn auto_top_up_respects_its_daily_limits() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "100.00")).unwrap();
    auto_rule(&mut state, "95.00", AutoAmount::Fixed(a("10.00")), 2, "1000.00");
    for i in 0..3 {
        debit(&mut state, &format!("d{i}"), "20.00", START + i);
        let receipt = start_auto(&mut state, START + i);
        if i < 2 {
            let PaymentReceipt::TopUp { top_up, .. } = receipt else { panic!("{receipt:?}") };
            settle(&mut state, top_up.id, succeeded(), START + i);
        } else {
            assert_eq!(
                receipt,
                PaymentReceipt::AutoTopUpSkipped { wallet: WalletId(1), reason: Rejection::AutoTopUpLimitReached }
            );
        }
    }
    // The next UTC day the count starts again.
    debit(&mut state, "next-day", "1.00", START + 86_400_000);
    assert!(matches!(start_auto(&mut state, START + 86_400_000), PaymentReceipt::TopUp { .. }));
}

fn checkout(state: &mut State, name: &str, amount: &str, use_wallet: bool) -> Result<PaymentReceipt, Rejection> {
    let command = PaymentCommand::StartCheckout {
        key: key(name),
        actor: Some(CONSUMER),
        consumer: CONSUMER,
        merchant: MERCHANT,
        amount: money(amount),
        use_wallet,
        method: Some(PaymentMethodId(1)),
        description: "order".into(),
    };
    pay(state, command)
}

fn started(receipt: PaymentReceipt) -> Checkout {
    match receipt {
        PaymentReceipt::Checkout { checkout, .. } => *checkout,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn seed_checkout_holds_the_wallet_part_and_captures_both_on_success() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "20.00")).unwrap();
    let started = started(checkout(&mut state, "c1", "50.00", true).unwrap());
    assert_eq!((started.wallet_part, started.card_part), (a("20.00").units(), a("30.00").units()));
    assert_eq!(available(&state, 1), "0.00");
    assert_eq!(balance(&state, 1), "20.00", "held, not yet taken");
    let PaymentReceipt::Checkout { checkout: done, operation: Some(operation), .. } =
        pay(&mut state, PaymentCommand::SettleCheckout { checkout: started.id, outcome: succeeded() }).unwrap()
    else {
        panic!()
    };
    assert_eq!(done.status, PaymentStatus::Succeeded);
    assert_eq!(operation.kind, OperationKind::Checkout);
    assert_eq!(balance(&state, 1), "0.00");
    assert_eq!(balance(&state, 2), "50.00");
    assert_eq!(system(&state, SystemAccount::ExternalFunding), "-50.00");
    assert!(state.holds.is_empty());
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn seed_declined_checkout_releases_the_hold_and_moves_nothing() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "20.00")).unwrap();
    let started = started(checkout(&mut state, "c1", "50.00", true).unwrap());
    pay(&mut state, PaymentCommand::SettleCheckout { checkout: started.id, outcome: declined() }).unwrap();
    assert_eq!(available(&state, 1), "20.00");
    assert_eq!(balance(&state, 1), "20.00");
    assert_eq!(balance(&state, 2), "0.00");
    assert_eq!(state.payments.checkout(started.id).unwrap().status, PaymentStatus::Failed);
    assert!(state.holds.is_empty());
    // A late success after the failure changes nothing.
    pay(&mut state, PaymentCommand::SettleCheckout { checkout: started.id, outcome: succeeded() }).unwrap();
    assert_eq!(balance(&state, 2), "0.00");
}

#[test]
fn seed_exclusive_hold_refuses_a_checkout_that_uses_the_wallet() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "100.00")).unwrap();
    let renewal = MoneyAction::PlaceHold {
        wallet: WalletId(1),
        amount: money("10.00"),
        ttl_ms: 60_000,
        exclusive: true,
        payee: None,
        product: None,
        description: "renewal".into(),
    };
    run(&mut state, "renewal", renewal).unwrap();
    let before = state.clone();
    assert_eq!(checkout(&mut state, "c1", "5.00", true).unwrap_err(), Rejection::WalletOnHold);
    assert_eq!(state, before);
    // Paying all by card does not touch the wallet, so it is allowed.
    let card_only = started(checkout(&mut state, "c2", "5.00", false).unwrap());
    assert_eq!((card_only.wallet_part, card_only.card_part), (0, a("5.00").units()));
}

#[test]
fn a_checkout_the_wallet_covers_completes_at_once_and_refusals_move_nothing() {
    let mut state = payments_ledger();
    run(&mut state, "fund", credit(1, "100.00")).unwrap();
    let done = started(checkout(&mut state, "c1", "30.00", true).unwrap());
    assert_eq!(done.status, PaymentStatus::Succeeded);
    assert_eq!(balance(&state, 1), "70.00");
    assert_eq!(balance(&state, 2), "30.00");
    let before = state.clone();
    assert_eq!(checkout(&mut state, "c2", "0", true).unwrap_err(), Rejection::AmountMustBePositive);
    assert_eq!(checkout(&mut state, "c3", "1.005", true).unwrap_err(), Rejection::AmountNotInMinorUnits);
    let no_method = PaymentCommand::StartCheckout {
        key: key("c4"),
        actor: None,
        consumer: CONSUMER,
        merchant: MERCHANT,
        amount: money("500.00"),
        use_wallet: true,
        method: None,
        description: String::new(),
    };
    assert_eq!(pay(&mut state, no_method).unwrap_err(), Rejection::PaymentMethodRequired);
    assert_eq!(state, before);
}

/// Merchant org 2 with plan 1 (recurring fee 30.00, no usage prices, no platform fee);
/// consumer org 1 (card pm_1 as default) funded with `funds` and subscribed.
fn renewal_ledger(funds: &str) -> (State, PaymentReceipt) {
    use tally_ledger::billing::*;
    let mut state = payments_ledger();
    let spec = PlanSpec {
        merchant: MERCHANT,
        name: "Pro".into(),
        currency: usd(),
        period: BillingPeriod::Month,
        recurring_fee: Some(a("30.00")),
        prices: Vec::new(),
        platform_fee: Some(PartsPerMillion(0)),
        replaces: None,
    };
    state.apply(&Command::CreatePlan { spec }, START).unwrap();
    run(&mut state, "fund", credit(1, funds)).unwrap();
    state.apply(&Command::Subscribe { consumer: CONSUMER, plan: PlanId(1) }, START).unwrap();
    let pending = state.payments.pending_checkouts.first().copied().expect("a renewal payment is pending");
    let checkout = state.payments.checkout(pending).unwrap().clone();
    (state, PaymentReceipt::Checkout { checkout: Box::new(checkout), created: true, settled: false, operation: None })
}

#[test]
fn seed_renewal_collects_wallet_first_under_an_exclusive_hold_and_the_card_for_the_rest() {
    use tally_ledger::billing::SubscriptionStatus;
    let (mut state, receipt) = renewal_ledger("10.00");
    let renewal = started(receipt);
    assert_eq!((renewal.wallet_part, renewal.card_part), (a("10.00").units(), a("20.00").units()));
    assert_eq!(renewal.subscription, Some(SubscriptionId(1)));
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().status, SubscriptionStatus::Active);
    // While the renewal's exclusive hold is active, a checkout using the wallet is refused.
    assert_eq!(checkout(&mut state, "c1", "1.00", true).unwrap_err(), Rejection::WalletOnHold);
    let PaymentReceipt::Checkout { operation: Some(operation), .. } =
        pay(&mut state, PaymentCommand::SettleCheckout { checkout: renewal.id, outcome: succeeded() }).unwrap()
    else {
        panic!()
    };
    assert_eq!(operation.kind, OperationKind::RecurringFee);
    assert_eq!(balance(&state, 1), "0.00");
    assert_eq!(balance(&state, 2), "30.00");
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().outstanding, 0);
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn a_renewal_whose_card_fails_releases_the_hold_and_goes_past_due() {
    use tally_ledger::billing::SubscriptionStatus;
    let (mut state, receipt) = renewal_ledger("10.00");
    let renewal = started(receipt);
    pay(&mut state, PaymentCommand::SettleCheckout { checkout: renewal.id, outcome: declined() }).unwrap();
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().status, SubscriptionStatus::PastDue);
    assert_eq!(available(&state, 1), "10.00");
    assert_eq!(balance(&state, 2), "0.00");
    assert!(state.holds.is_empty());
}

fn refund(state: &mut State, command: PaymentCommand) -> Result<Refund, Rejection> {
    match pay(state, command)? {
        PaymentReceipt::Refund { refund, .. } => Ok(*refund),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn top_up_refunds_return_unspent_money_and_taxes_in_proportion() {
    let mut state = payments_ledger();
    sales_tax(&mut state);
    let paid = top_up(&mut state, "t1", "20.00").unwrap();
    settle(&mut state, paid.id, succeeded(), START);
    // Spend 5.00: only 15.00 is unspent.
    debit(&mut state, "spend", "5.00", START);
    let too_much = PaymentCommand::RefundTopUp {
        key: key("r0"),
        top_up: paid.id,
        amount: Some(a("16.00")),
        reason: String::new(),
    };
    let before = state.clone();
    assert_eq!(refund(&mut state, too_much).unwrap_err(), Rejection::InsufficientFunds);
    assert_eq!(state, before);
    let half = PaymentCommand::RefundTopUp {
        key: key("r1"),
        top_up: paid.id,
        amount: Some(a("10.00")),
        reason: String::new(),
    };
    let first = refund(&mut state, half).unwrap();
    // 5% of 10.00 is 0.50; the 0.75 surcharge in proportion is 0.375 -> 0.38 (half to even).
    assert_eq!(first.taxes.iter().map(|t| t.amount).collect::<Vec<_>>(), vec![a("0.50").units(), a("0.38").units()]);
    assert_eq!(first.total, a("10.88").units());
    assert_eq!(first.status, PaymentStatus::Pending);
    assert_eq!(balance(&state, 1), "5.00", "the money leaves at once");
    // The provider refuses: everything goes back.
    pay(&mut state, PaymentCommand::SettleRefund { refund: first.id, outcome: declined() }).unwrap();
    assert_eq!(balance(&state, 1), "15.00");
    assert_eq!(system(&state, SystemAccount::TaxPayable), "1.75");
    // Two refunds that together return everything: the taxes add up exactly.
    credit_back(&mut state);
    for (name, amount) in [("r2", Some(a("10.00"))), ("r3", None)] {
        let command = PaymentCommand::RefundTopUp { key: key(name), top_up: paid.id, amount, reason: String::new() };
        let made = refund(&mut state, command).unwrap();
        pay(&mut state, PaymentCommand::SettleRefund { refund: made.id, outcome: succeeded() }).unwrap();
    }
    assert_eq!(system(&state, SystemAccount::TaxPayable), "0.00");
    assert_eq!(state.payments.top_up(paid.id).unwrap().refunded, a("20.00").units());
    let more = PaymentCommand::RefundTopUp { key: key("r4"), top_up: paid.id, amount: None, reason: String::new() };
    assert_eq!(refund(&mut state, more).unwrap_err(), Rejection::RefundExceedsPayment);
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

/// Puts 5.00 back in wallet 1 so that all of the 20.00 top-up is unspent again.
fn credit_back(state: &mut State) {
    run(state, "back", credit(1, "5.00")).unwrap();
}

#[test]
fn payment_refunds_go_back_to_their_grants_and_come_from_merchant_and_fee_in_proportion() {
    let mut state = payments_ledger();
    state
        .apply(
            &Command::Configure {
                settings: Settings { platform_fee: PartsPerMillion(100_000), ..Settings::default() },
            },
            START,
        )
        .unwrap();
    // A 20.00 promotional grant and 100.00 main; a 50.00 checkout takes 20 + 30.
    let grant = MoneyAction::Credit {
        wallet: WalletId(1),
        amount: money("20.00"),
        kind: CreditKind::Adjustment,
        source: AdjustmentSource::Promotions,
        grant: Some(GrantSpec {
            category: GrantCategory::Promotional,
            priority: 1,
            expires_at: None,
            applicability: None,
        }),
        reason: String::new(),
    };
    run(&mut state, "grant", grant).unwrap();
    run(&mut state, "fund", credit(1, "100.00")).unwrap();
    let PaymentReceipt::Checkout { operation: Some(operation), .. } =
        checkout(&mut state, "c1", "50.00", true).unwrap()
    else {
        panic!("the wallet covers it")
    };
    assert_eq!(balance(&state, 2), "45.00", "less the 10% fee");
    // The merchant must cover its share.
    let before = state.clone();
    let drained = MoneyAction::Debit {
        wallet: WalletId(2),
        amount: money("40.00"),
        source: AdjustmentSource::ExternalFunding,
        reason: String::new(),
    };
    run(&mut state, "drain", drained).unwrap();
    let all = PaymentCommand::RefundPayment {
        key: key("r1"),
        operation: Box::new(operation.clone()),
        amount: None,
        reason: String::new(),
    };
    let after_drain = state.clone();
    assert_eq!(refund(&mut state, all.clone()).unwrap_err(), Rejection::MerchantInsufficientFunds);
    assert_eq!(state, after_drain);
    state = before;
    // 25.00 back: 2.50 from the fee, 22.50 from the merchant; to the grant first.
    let part = PaymentCommand::RefundPayment {
        key: key("r2"),
        operation: Box::new(operation.clone()),
        amount: Some(a("25.00")),
        reason: String::new(),
    };
    let made = refund(&mut state, part).unwrap();
    assert_eq!((made.merchant_part, made.fee_part), (a("22.50").units(), a("2.50").units()));
    assert_eq!(balance(&state, 2), "22.50");
    let wallet = state.wallet(WalletId(1)).unwrap();
    assert_eq!((wallet.granted, wallet.main), (a("20.00").units(), a("75.00").units()));
    // The rest, then nothing more.
    refund(
        &mut state,
        PaymentCommand::RefundPayment {
            key: key("r3"),
            operation: Box::new(operation.clone()),
            amount: None,
            reason: String::new(),
        },
    )
    .unwrap();
    assert_eq!(balance(&state, 1), "120.00");
    assert_eq!(balance(&state, 2), "0.00");
    assert_eq!(system(&state, SystemAccount::PlatformRevenue), "0.00");
    assert_eq!(
        refund(
            &mut state,
            PaymentCommand::RefundPayment {
                key: key("r4"),
                operation: Box::new(operation),
                amount: None,
                reason: String::new()
            }
        )
        .unwrap_err(),
        Rejection::RefundExceedsPayment
    );
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn a_period_that_ends_while_a_renewal_card_is_pending_never_takes_a_fee_twice() {
    use tally_ledger::billing::SubscriptionStatus;
    let (mut state, receipt) = renewal_ledger("10.00");
    let renewal = started(receipt);
    // Enough arrives in the wallet for both periods' fees while the card is pending.
    run(&mut state, "more", credit(1, "100.00")).unwrap();
    let period_end = state.subscription(SubscriptionId(1)).unwrap().period_end;
    state.apply(&Command::Tick, period_end).unwrap();
    assert_eq!(balance(&state, 2), "0.00", "nothing collected while a card pays the first fee");
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().outstanding, a("60.00").units());
    // The card's answer comes after the wallet part's hold expired: the checkout fails
    // (the driver refunds the card) and the subscription is past due for both fees.
    let PaymentReceipt::Checkout { checkout, .. } = pay_at(
        &mut state,
        PaymentCommand::SettleCheckout { checkout: renewal.id, outcome: succeeded() },
        period_end + 1,
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(checkout.failure_code.as_deref(), Some("hold_expired"));
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().status, SubscriptionStatus::PastDue);
    // The retry collects both fees from the wallet, once each.
    state.apply(&Command::Tick, period_end + 3_600_001).unwrap();
    assert_eq!(balance(&state, 2), "60.00");
    assert_eq!(balance(&state, 1), "50.00");
    let subscription = state.subscription(SubscriptionId(1)).unwrap();
    assert_eq!((subscription.outstanding, subscription.status), (0, SubscriptionStatus::Active));
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn a_token_is_saved_once_and_a_reviewed_total_must_still_hold() {
    let mut state = payments_ledger();
    let methods = state.payments.methods.len();
    let once = PaymentCommand::AddMethodOnce {
        organization: CONSUMER,
        token: "tok".into(),
        details: card(),
        make_default: false,
    };
    match pay(&mut state, once).unwrap() {
        PaymentReceipt::MethodSavedBefore(method) => assert_eq!(method.id, PaymentMethodId(1)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(state.payments.methods.len(), methods, "no second method for the same token");
    // The original command still adds a method each time, as journals written before
    // `AddMethodOnce` existed recorded it, so they replay exactly.
    let add =
        PaymentCommand::AddMethod { organization: CONSUMER, token: "tok".into(), details: card(), make_default: false };
    let PaymentReceipt::Method(method) = pay(&mut state, add).unwrap() else { panic!("AddMethod adds") };
    assert_eq!(method.id, PaymentMethodId(methods as u64 + 1));

    // US-CA in `payments_ledger` has no tax profile yet: the total is the amount.
    let reviewed = |name: &str, total: &str| PaymentCommand::CreateReviewedTopUp {
        key: key(name),
        actor: None,
        wallet: WalletId(1),
        amount: money("20.00"),
        method: PaymentMethodId(1),
        total: a(total),
    };
    let before = state.clone();
    assert_eq!(pay(&mut state, reviewed("r", "21.00")).unwrap_err(), Rejection::TotalChanged);
    assert_eq!(state, before, "a refused top-up changes nothing");
    let PaymentReceipt::TopUp { top_up, created: true, .. } = pay(&mut state, reviewed("r", "20.00")).unwrap() else {
        panic!("the reviewed total holds: the top-up is created")
    };
    assert_eq!(top_up.total, a("20.00").units());
    assert_eq!(pay(&mut state, reviewed("r", "21.00")).unwrap_err(), Rejection::IdempotencyKeyMismatch);
}
