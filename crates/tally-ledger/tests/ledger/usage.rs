//! Usage billing in the state machine: catalog and subscription rules, rated charges,
//! reservations, renewals, low balance, and a property test of exact rating.

use super::*;
use proptest::prelude::*;
use tally_ledger::billing::*;

const DAY: i64 = 86_400_000;
/// Organization 1 is the merchant, 2 and 3 are consumers.
const MERCHANT: OrganizationId = OrganizationId(1);
const CONSUMER: OrganizationId = OrganizationId(2);

fn a(text: &str) -> Amount {
    Amount::parse(text).unwrap()
}

fn q(text: &str) -> Quantity {
    Quantity::parse(text).unwrap()
}

fn apply(state: &mut State, command: Command) -> Receipt {
    state.apply(&command, START).unwrap_or_else(|r| panic!("{command:?} refused: {r:?}"))
}

/// A merchant (org 1, wallet 1) with meters `tokens` (per unit 0.00002), `messages`
/// (dimensional) and `calls` (counted), and plan 1 (5% fee, recurring fee
/// `recurring`); consumers org 2 (wallet 2, funded with `funds`) and org 3 (wallet 3,
/// empty), org 2 subscribed to plan 1.
fn billing(funds: &str, recurring: Option<&str>) -> State {
    let mut state = ledger(3);
    let roles = Roles { merchant: true, consumer: false };
    apply(&mut state, Command::UpdateOrganization { organization: MERCHANT, roles, billing: None });
    apply(&mut state, Command::CreateProduct { merchant: MERCHANT, name: "API".into() });
    for (code, aggregation) in
        [("tokens", Aggregation::Sum), ("messages", Aggregation::Sum), ("calls", Aggregation::Count)]
    {
        let meter = Command::CreateMeter {
            merchant: MERCHANT,
            code: code.into(),
            unit: "unit".into(),
            aggregation,
            product: Some(ProductId(1)),
        };
        apply(&mut state, meter);
    }
    let prices = vec![
        Price { meter: MeterId(1), model: PriceModel::PerUnit { unit_price: a("0.00002") } },
        Price {
            meter: MeterId(2),
            model: PriceModel::Dimensional {
                property: "conversation_type".into(),
                values: vec![("marketing".into(), a("0.025")), ("service".into(), a("0.005"))],
                default: None,
            },
        },
        Price { meter: MeterId(3), model: PriceModel::PerUnit { unit_price: a("0.10") } },
    ];
    let spec = PlanSpec {
        merchant: MERCHANT,
        name: "Pay as you go".into(),
        currency: usd(),
        period: BillingPeriod::Month,
        recurring_fee: recurring.map(a),
        prices,
        platform_fee: Some(PartsPerMillion(50_000)),
        replaces: None,
    };
    apply(&mut state, Command::CreatePlan { spec });
    if a(funds).is_positive() {
        run(&mut state, "fund", credit(2, funds)).unwrap();
    }
    apply(&mut state, Command::Subscribe { consumer: CONSUMER, plan: PlanId(1) });
    state
}

fn event(id: &str, meter: &str, quantity: &str) -> UsageEvent {
    UsageEvent {
        key: IdempotencyKey::new("usage:org_1", id).unwrap(),
        consumer: CONSUMER,
        meter: meter.into(),
        quantity: q(quantity),
        at: START,
        properties: Vec::new(),
        reservation: None,
        finish: false,
    }
}

fn usage(state: &mut State, events: Vec<UsageEvent>, now: Timestamp) -> Vec<Result<UsageCharge, Rejection>> {
    match state.apply(&Command::Usage { merchant: MERCHANT, events }, now).unwrap() {
        Receipt::Usage { results } => results,
        other => panic!("usage answered {other:?}"),
    }
}

fn one(state: &mut State, event: UsageEvent) -> Result<UsageCharge, Rejection> {
    usage(state, vec![event], START).remove(0)
}

#[test]
fn seed_tokens_charge_moves_at_once_less_the_fee() {
    // A consumer tops up 50.00; 1,200 tokens at 0.00002 cost 0.024; the merchant gets
    // it at once less the 5% platform fee.
    let mut state = billing("50.00", None);
    let charge = one(&mut state, event("e1", "tokens", "1200")).unwrap();
    assert_eq!(charge.amount, a("0.024"));
    assert_eq!(charge.fee, a("0.0012"));
    assert_eq!(balance(&state, 2), "49.976");
    assert_eq!(state.wallet(WalletId(1)).unwrap().balance(), a("0.0228"));
    assert_eq!(state.system_balance(usd(), SystemAccount::PlatformRevenue), a("0.0012"));
    let operation = charge.operation.unwrap();
    assert_eq!(operation.kind, OperationKind::Charge);
    assert_eq!(operation.legs[0].balance_after, a("49.976"));
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn seed_grant_first_then_main_balance() {
    // 20.00 promotional grant and 100.00 main: a 50.00 charge takes 20.00 from the
    // grant and 30.00 from the main balance, and the record lists both.
    let mut state = billing("100.00", None);
    let promo = MoneyAction::Credit {
        wallet: WalletId(2),
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
    run(&mut state, "promo", promo).unwrap();
    let charge = one(&mut state, event("e1", "calls", "1")).unwrap();
    assert_eq!(charge.amount, a("0.10"));
    let big = one(&mut state, event("e2", "tokens", "2495000")).unwrap();
    assert_eq!(big.amount, a("49.90"));
    let leg = &big.operation.unwrap().legs[0];
    // The first charge already took 0.10 of the grant: 19.90 from it, 30.00 from main.
    assert_eq!(leg.grants, vec![GrantPortion { grant: GrantId(1), amount: a("-19.90") }]);
    assert_eq!(leg.amount, a("-49.90"));
    assert_eq!(balance(&state, 2), "70.00");
    assert_eq!(state.wallet(WalletId(2)).unwrap().granted, 0);
}

#[test]
fn dimensional_and_counted_meters_rate_by_their_rules() {
    let mut state = billing("10.00", None);
    let mut marketing = event("m1", "messages", "2");
    marketing.properties = vec![("conversation_type".into(), "marketing".into())];
    assert_eq!(one(&mut state, marketing).unwrap().amount, a("0.05"));
    let mut service = event("m2", "messages", "2");
    service.properties = vec![("conversation_type".into(), "service".into())];
    let charged = one(&mut state, service).unwrap();
    assert_eq!((charged.amount, charged.dimension), (a("0.01"), Some(1)));
    // A counting meter counts events, whatever quantity is sent.
    let calls = one(&mut state, event("c1", "calls", "7")).unwrap();
    assert_eq!((calls.amount, calls.quantity), (a("0.10"), Quantity::ONE));
    let subscription = state.subscription(SubscriptionId(1)).unwrap();
    assert_eq!(subscription.meters[1].quantity, q("4"));
    assert_eq!(subscription.meters[2].quantity, q("1"));
}

#[test]
fn every_usage_rejection_changes_nothing() {
    let old = START - 2 * DAY;
    let mut too_old = event("old", "tokens", "1");
    too_old.at = old;
    let mut future = event("future", "tokens", "1");
    future.at = START + 3_600_000;
    let mut stranger = event("stranger", "tokens", "1");
    stranger.consumer = OrganizationId(3);
    let mut unknown_value = event("dim", "messages", "1");
    unknown_value.properties = vec![("conversation_type".into(), "other".into())];
    let mut wrong_reservation = event("resv", "tokens", "1");
    wrong_reservation.reservation = Some(HoldId(1));
    let mut too_many = event("props", "tokens", "1");
    too_many.properties = (0..17).map(|i| (format!("p{i}"), "v".to_string())).collect();
    let cases = vec![
        (Rejection::DuplicateEvent, event("e1", "tokens", "1")),
        (Rejection::EventTooOld, too_old),
        (Rejection::EventInFuture, future),
        (Rejection::NoActiveSubscription, stranger),
        (Rejection::UnknownMeter, event("meter", "minutes", "1")),
        (Rejection::UnknownDimension, unknown_value),
        (Rejection::InsufficientFunds, event("big", "tokens", "1000000")),
        (Rejection::AmountOverflow, event("huge", "tokens", "99999999999999999999")),
        (Rejection::ReservationMismatch, wrong_reservation),
        (Rejection::TooManyItems, too_many),
    ];
    for (expected, bad) in cases {
        let mut state = billing("10.00", None);
        // Hold 1 is the consumer's own hold, not a reservation for this merchant.
        run(
            &mut state,
            "own-hold",
            MoneyAction::PlaceHold {
                wallet: WalletId(2),
                amount: money("1.00"),
                ttl_ms: 60_000,
                exclusive: false,
                payee: None,
                product: None,
                description: String::new(),
            },
        )
        .unwrap();
        one(&mut state, event("e1", "tokens", "1")).unwrap();
        let before = state.clone();
        let description = format!("{bad:?}");
        let results = usage(&mut state, vec![bad], START);
        assert_eq!(results[0].as_ref().err(), Some(&expected), "{description}");
        assert_eq!(state, before, "a refused {description} changed the state");
    }
}

#[test]
fn every_catalog_rejection_changes_nothing() {
    let tokens = MeterId(1);
    let plan = |prices: Vec<Price>, replaces: Option<PlanId>, merchant: OrganizationId| Command::CreatePlan {
        spec: PlanSpec {
            merchant,
            name: "p".into(),
            currency: usd(),
            period: BillingPeriod::Day,
            recurring_fee: None,
            prices,
            platform_fee: None,
            replaces,
        },
    };
    let per_unit = |meter: MeterId, price: &str| Price { meter, model: PriceModel::PerUnit { unit_price: a(price) } };
    let meter = |code: &str, product: Option<ProductId>| Command::CreateMeter {
        merchant: MERCHANT,
        code: code.into(),
        unit: "u".into(),
        aggregation: Aggregation::Sum,
        product,
    };
    let cases = vec![
        (Rejection::NotAMerchant, Command::CreateProduct { merchant: CONSUMER, name: "x".into() }),
        (Rejection::TextLengthOutOfRange, Command::CreateProduct { merchant: MERCHANT, name: String::new() }),
        (Rejection::InvalidCode, meter("Tokens!", None)),
        (Rejection::MeterCodeTaken, meter("tokens", None)),
        (Rejection::ProductNotFound, meter("new", Some(ProductId(9)))),
        (Rejection::MeterNotFound, plan(vec![per_unit(MeterId(9), "1")], None, MERCHANT)),
        (Rejection::InvalidPrice, plan(vec![per_unit(tokens, "-1")], None, MERCHANT)),
        (Rejection::PlanNotFound, plan(vec![], Some(PlanId(9)), MERCHANT)),
        (Rejection::NotAMerchant, plan(vec![], None, CONSUMER)),
        (Rejection::PlanNotFound, Command::Subscribe { consumer: OrganizationId(3), plan: PlanId(9) }),
        (Rejection::PlanSuperseded, Command::Subscribe { consumer: OrganizationId(3), plan: PlanId(2) }),
        (Rejection::SubscriptionExists, Command::Subscribe { consumer: CONSUMER, plan: PlanId(1) }),
        (Rejection::NotAConsumer, Command::Subscribe { consumer: MERCHANT, plan: PlanId(1) }),
        (
            Rejection::SubscriptionNotFound,
            Command::CancelSubscription { subscription: SubscriptionId(9), at_period_end: false },
        ),
        (
            Rejection::SubscriptionCanceled,
            Command::CancelSubscription { subscription: SubscriptionId(2), at_period_end: true },
        ),
    ];
    for (expected, command) in cases {
        let mut state = billing("10.00", None);
        // Plan 2 is archived; subscription 2 (org 3 on plan 3) is canceled.
        apply(&mut state, plan(vec![per_unit(tokens, "1")], None, MERCHANT));
        apply(&mut state, Command::ArchivePlan { plan: PlanId(2) });
        apply(&mut state, plan(vec![per_unit(tokens, "1")], None, MERCHANT));
        apply(&mut state, Command::Subscribe { consumer: OrganizationId(3), plan: PlanId(3) });
        apply(&mut state, Command::CancelSubscription { subscription: SubscriptionId(2), at_period_end: false });
        let before = state.clone();
        let got = state.apply(&command, START);
        assert_eq!(got.as_ref().err(), Some(&expected), "{command:?} gave {got:?}");
        assert_eq!(state, before, "a refused {command:?} changed the state");
    }
}

#[test]
fn a_new_plan_version_leaves_subscriptions_on_theirs() {
    let mut state = billing("10.00", None);
    let mut spec = state.plan(PlanId(1)).unwrap().spec.clone();
    spec.prices[0] = Price { meter: MeterId(1), model: PriceModel::PerUnit { unit_price: a("1") } };
    spec.replaces = Some(PlanId(1));
    apply(&mut state, Command::CreatePlan { spec });
    assert_eq!(state.plan(PlanId(2)).unwrap().version, 2);
    assert!(state.plan(PlanId(1)).unwrap().superseded);
    // The subscriber keeps version 1's price.
    assert_eq!(one(&mut state, event("e1", "tokens", "1000")).unwrap().amount, a("0.02"));
    // A newcomer must take version 2.
    let refused = state.apply(&Command::Subscribe { consumer: OrganizationId(3), plan: PlanId(1) }, START);
    assert_eq!(refused.err(), Some(Rejection::PlanSuperseded));
    apply(&mut state, Command::Subscribe { consumer: OrganizationId(3), plan: PlanId(2) });
}

#[test]
fn subscribing_creates_the_wallet_and_charges_the_fee() {
    let mut state = billing("30.00", Some("25.00"));
    assert_eq!(balance(&state, 2), "5.00");
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().status, SubscriptionStatus::Active);
    // Org 4 has no wallet: subscribing makes one, and with nothing in it, it is past due.
    apply(&mut state, Command::CreateOrganization { name: "new".into(), roles: Roles::default() });
    let receipt = apply(&mut state, Command::Subscribe { consumer: OrganizationId(4), plan: PlanId(1) });
    let Receipt::Subscription { status, wallet_created, fee, .. } = receipt else { panic!("{receipt:?}") };
    assert_eq!((status, fee), (SubscriptionStatus::PastDue, None));
    let wallet = wallet_created.expect("a wallet was created");
    assert_eq!(state.wallet(wallet).unwrap().currency, usd());
    // Usage is refused while past due.
    let mut past_due = event("pd", "tokens", "1");
    past_due.consumer = OrganizationId(4);
    assert_eq!(one(&mut state, past_due).err(), Some(Rejection::NoActiveSubscription));
    // The retry an hour later collects the fee once the wallet has money.
    run(&mut state, "fund4", credit(wallet.0, "30.00")).unwrap();
    let Receipt::Expired { renewals, .. } = state.apply(&Command::Tick, START + 3_600_000).unwrap() else { panic!() };
    assert_eq!(renewals.len(), 1);
    assert_eq!(renewals[0].status, SubscriptionStatus::Active);
    assert_eq!(state.wallet(wallet).unwrap().balance(), a("5"));
    assert!(state.check_invariants().is_empty());
}

#[test]
fn periods_renew_on_time_and_past_due_ends_in_cancellation() {
    let mut state = billing("30.00", Some("25.00"));
    one(&mut state, event("e1", "tokens", "1000")).unwrap();
    let end = state.subscription(SubscriptionId(1)).unwrap().period_end;
    assert!(state.next_due().is_some_and(|due| due <= end));
    // Nothing before the end.
    state.apply(&Command::Tick, end - 1).unwrap();
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().period_index, 0);
    // At the end: a new period, usage restarts, the fee cannot be paid (4.98 left).
    let Receipt::Expired { renewals, .. } = state.apply(&Command::Tick, end).unwrap() else { panic!() };
    assert_eq!(renewals[0].status, SubscriptionStatus::PastDue);
    let subscription = state.subscription(SubscriptionId(1)).unwrap();
    assert_eq!((subscription.period_index, subscription.period_start), (1, end));
    assert_eq!(subscription.meters[0].quantity, Quantity(0));
    assert_eq!(subscription.outstanding, a("25").units());
    // Still unpaid when that period ends: canceled.
    let next_end = subscription.period_end;
    let mut now = end;
    while now < next_end {
        now = state.next_due().unwrap().max(now);
        state.apply(&Command::Tick, now).unwrap();
    }
    let subscription = state.subscription(SubscriptionId(1)).unwrap();
    assert_eq!(subscription.status, SubscriptionStatus::Canceled);
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn cancel_at_period_end_charges_nothing_more() {
    let mut state = billing("60.00", Some("25.00"));
    apply(&mut state, Command::CancelSubscription { subscription: SubscriptionId(1), at_period_end: true });
    let end = state.subscription(SubscriptionId(1)).unwrap().period_end;
    state.apply(&Command::Tick, end).unwrap();
    assert_eq!(state.subscription(SubscriptionId(1)).unwrap().status, SubscriptionStatus::Canceled);
    assert_eq!(balance(&state, 2), "35.00");
    // The consumer may subscribe again.
    apply(&mut state, Command::Subscribe { consumer: CONSUMER, plan: PlanId(1) });
}

fn reserve(state: &mut State, name: &str, quantity: &str) -> Result<Receipt, Rejection> {
    let action = MoneyAction::Reserve {
        merchant: MERCHANT,
        consumer: CONSUMER,
        meter: "tokens".into(),
        quantity: Some(q(quantity)),
        amount: None,
        properties: Vec::new(),
        ttl_ms: 60_000,
    };
    state.apply(&Command::MoveAs { actor: MERCHANT, key: key(name), action }, START)
}

#[test]
fn reservations_are_captured_by_usage_and_released_when_finished() {
    let mut state = billing("1.00", None);
    // Reserve 10,000 tokens: 0.20.
    let Receipt::Reserved { hold, amount, .. } = reserve(&mut state, "r1", "10000").unwrap() else { panic!() };
    assert_eq!(amount, a("0.20"));
    assert_eq!(available(&state, 2), "0.80");
    // Stream usage against it: 4,000 then 5,000 tokens, captured from the hold.
    let mut first = event("s1", "tokens", "4000");
    first.reservation = Some(hold);
    assert_eq!(one(&mut state, first).unwrap().amount, a("0.08"));
    assert_eq!(state.hold(hold).unwrap().amount, a("0.12").units());
    assert_eq!(available(&state, 2), "0.80");
    // An excess beyond the reservation is charged from what is available.
    let mut second = event("s2", "tokens", "8000");
    second.reservation = Some(hold);
    second.finish = false;
    let charged = one(&mut state, second).unwrap();
    assert_eq!(charged.amount, a("0.16"));
    assert_eq!(charged.released, Some(Amount::ZERO));
    assert!(state.hold(hold).is_none(), "a fully used reservation is closed");
    assert_eq!(balance(&state, 2), "0.76");
    // A second reservation, finished early, releases the rest.
    let Receipt::Reserved { hold, .. } = reserve(&mut state, "r2", "10000").unwrap() else { panic!() };
    let mut last = event("s3", "tokens", "1000");
    last.reservation = Some(hold);
    last.finish = true;
    let charged = one(&mut state, last).unwrap();
    assert_eq!((charged.amount, charged.released), (a("0.02"), Some(a("0.18"))));
    assert_eq!(available(&state, 2), "0.74");
    // A reservation that does not fit is refused; one on a resolved hold too.
    assert_eq!(reserve(&mut state, "r3", "100000").err(), Some(Rejection::InsufficientFunds));
    let mut late = event("s4", "tokens", "1");
    late.reservation = Some(hold);
    assert_eq!(one(&mut state, late).err(), Some(Rejection::HoldAlreadyResolved));
    assert!(state.check_invariants().is_empty(), "{:?}", state.check_invariants());
}

#[test]
fn access_checks_estimate_without_changing_anything() {
    let state = billing("0.05", None);
    let check =
        |quantity: &str| state.access_check(MERCHANT, CONSUMER, "tokens", Some(q(quantity)), None, &[], START).unwrap();
    let fits = check("2500");
    assert_eq!((fits.allowed, fits.cost, fits.available), (true, a("0.05"), a("0.05")));
    let too_much = check("2501");
    assert_eq!((too_much.allowed, too_much.reason), (false, Some(Rejection::InsufficientFunds)));
    let stranger = state.access_check(MERCHANT, OrganizationId(3), "tokens", Some(q("1")), None, &[], START);
    assert_eq!(stranger.err(), Some(Rejection::NoActiveSubscription));
}

#[test]
fn low_balance_is_reported_once_per_crossing() {
    let mut state = billing("1.00", None);
    apply(&mut state, Command::SetLowBalanceThreshold { wallet: WalletId(2), threshold: Some(a("0.50")) });
    let charges: Vec<bool> =
        (0..4).map(|i| one(&mut state, event(&format!("e{i}"), "calls", "1")).unwrap().low_balance).collect();
    assert_eq!(charges, vec![false, false, false, false]);
    let crossing: Vec<bool> =
        (4..8).map(|i| one(&mut state, event(&format!("e{i}"), "calls", "1")).unwrap().low_balance).collect();
    // 1.00 - 0.50 is not below 0.50; 0.40 is: reported once.
    assert_eq!(crossing, vec![false, true, false, false]);
    run(&mut state, "topup", credit(2, "5.00")).unwrap();
    one(&mut state, event("after", "calls", "1")).unwrap();
    // Back above, then below again: reported again.
    let mut reported = 0;
    for i in 0..60 {
        if one(&mut state, event(&format!("again{i}"), "calls", "1")).is_ok_and(|c| c.low_balance) {
            reported += 1;
        }
    }
    assert_eq!(reported, 1);
}

#[test]
fn many_events_on_a_small_balance_charge_exactly_what_fits() {
    let mut state = billing("1.05", None);
    let events: Vec<UsageEvent> = (0..50).map(|i| event(&format!("c{i}"), "calls", "1")).collect();
    let results = usage(&mut state, events, START);
    let charged = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(charged, 10);
    assert!(results[10..].iter().all(|r| r.as_ref().err() == Some(&Rejection::InsufficientFunds)));
    assert_eq!(balance(&state, 2), "0.05");
    assert!(state.check_invariants().is_empty());
}

fn price_model() -> impl Strategy<Value = PriceModel> {
    let price = (0i128..5_000_000_000_000).prop_map(Amount::from_units);
    prop_oneof![
        price.clone().prop_map(|unit_price| PriceModel::PerUnit { unit_price }),
        (1i128..5_000, price.clone()).prop_map(|(size, package_price)| PriceModel::Package {
            size: Quantity(size * 1_000_000_000_000),
            package_price
        }),
        (1i128..1_000, price.clone(), price.clone(), price).prop_map(|(first, a, b, c)| PriceModel::Graduated {
            tiers: vec![
                Tier { up_to: Some(Quantity(first * 1_000_000_000_000)), unit_price: a },
                Tier { up_to: Some(Quantity(first * 3_000_000_000_000)), unit_price: b },
                Tier { up_to: None, unit_price: c },
            ]
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// For random prices and event streams, the sum charged equals the exact sum of
    /// price × quantity rounded down, so it is within one ledger unit, and money is
    /// conserved.
    #[test]
    fn charges_sum_to_the_exact_cost(
        model in price_model(),
        quantities in proptest::collection::vec(0i128..5_000_000_000_000_000, 1..60),
    ) {
        let mut state = billing("1000000.00", None);
        let mut spec = state.plan(PlanId(1)).unwrap().spec.clone();
        spec.prices[0] = Price { meter: MeterId(1), model: model.clone() };
        spec.replaces = Some(PlanId(1));
        apply(&mut state, Command::CreatePlan { spec });
        apply(&mut state, Command::Subscribe { consumer: OrganizationId(3), plan: PlanId(2) });
        run(&mut state, "fund3", credit(3, "1000000.00")).unwrap();
        let mut total = 0i128;
        let mut period = Quantity(0);
        for (i, quantity) in quantities.iter().enumerate() {
            let mut e = event(&format!("p{i}"), "tokens", "0");
            e.consumer = OrganizationId(3);
            e.quantity = Quantity(*quantity);
            let charge = one(&mut state, e).unwrap();
            total += charge.amount.units();
            period = Quantity(period.0 + quantity);
        }
        // The exact cost of the whole period, computed in one go with 10^-24 precision.
        let (exact, _) = rate_exact(&model, Quantity(0), period, &[]).unwrap();
        let (expected, _) = exact.split_round_down();
        prop_assert_eq!(total, expected);
        prop_assert!(state.check_invariants().is_empty());
        let spent = a("1000000").units() - state.wallet(WalletId(3)).unwrap().balance().units();
        prop_assert_eq!(spent, total);
    }
}
