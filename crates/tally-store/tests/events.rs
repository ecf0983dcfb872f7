//! Every change makes exactly the events the catalog promises, and a refused command
//! makes none: commands run through the real state machine, and each accepted
//! command's receipt goes through `events::derive`, as the projector does.

use std::collections::HashMap;
use tally_ledger::billing::*;
use tally_ledger::*;
use tally_store::events::{derive, Directory, NewEvent, EVENT_TYPES};

const START: Timestamp = 1_700_000_000_000;

/// What the projector's directory tables would hold.
#[derive(Default)]
struct Memory {
    wallets: HashMap<WalletId, (OrganizationId, Currency)>,
    holds: HashMap<HoldId, WalletId>,
    subscriptions: HashMap<SubscriptionId, (OrganizationId, OrganizationId)>,
}

impl Directory for Memory {
    fn wallet(&mut self, wallet: WalletId) -> Option<(OrganizationId, Currency)> {
        self.wallets.get(&wallet).copied()
    }
    fn hold_wallet(&mut self, hold: HoldId) -> Option<WalletId> {
        self.holds.get(&hold).copied()
    }
    fn subscription(&mut self, subscription: SubscriptionId) -> Option<(OrganizationId, OrganizationId)> {
        self.subscriptions.get(&subscription).copied()
    }
}

struct World {
    state: State,
    directory: Memory,
    now: Timestamp,
}

impl World {
    /// Applies a command; returns the kinds and owners of the events it made.
    fn run(&mut self, command: Command) -> Vec<(&'static str, Option<u64>)> {
        let receipt = match self.state.apply(&command, self.now) {
            Ok(receipt) => receipt,
            Err(_) => return Vec::new(), // a refusal is never journaled, so it has no events
        };
        match (&command, &receipt) {
            (Command::CreateWallet { organization, currency, .. }, Receipt::WalletCreated(id)) => {
                self.directory.wallets.insert(*id, (*organization, *currency));
            }
            (Command::Move { action: MoneyAction::PlaceHold { wallet, .. }, .. }, Receipt::HoldPlaced { hold, .. }) => {
                self.directory.holds.insert(*hold, *wallet);
            }
            (Command::CreatePlan { spec }, Receipt::PlanCreated { wallet_created: Some(id), .. }) => {
                self.directory.wallets.insert(*id, (spec.merchant, spec.currency));
            }
            (Command::Subscribe { consumer, plan }, Receipt::Subscription { subscription, wallet_created, .. }) => {
                let spec = &self.state.plan(*plan).unwrap().spec;
                if let Some(id) = wallet_created {
                    self.directory.wallets.insert(*id, (*consumer, spec.currency));
                }
                self.directory.subscriptions.insert(*subscription, (*consumer, spec.merchant));
            }
            _ => {}
        }
        let events: Vec<NewEvent> = derive(&command, &receipt, &mut self.directory);
        for event in &events {
            assert!(EVENT_TYPES.contains(&event.kind), "{} is not in the catalog", event.kind);
        }
        events.iter().map(|e| (e.kind, e.organization.map(|o| o.0))).collect()
    }
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn money(text: &str) -> Money {
    Money::parse(text, "USD").unwrap()
}

fn mv(name: &str, action: MoneyAction) -> Command {
    Command::Move { key: IdempotencyKey::new("t", name).unwrap(), action }
}

fn credit(wallet: u64, amount: &str, grant: Option<GrantSpec>) -> MoneyAction {
    MoneyAction::Credit {
        wallet: WalletId(wallet),
        amount: money(amount),
        kind: CreditKind::TopUp,
        source: if grant.is_some() { AdjustmentSource::Promotions } else { AdjustmentSource::ExternalFunding },
        grant,
        reason: String::new(),
    }
}

#[test]
fn every_change_makes_its_events_and_refusals_none() {
    let mut w = World { state: State::new(Settings::default()), directory: Memory::default(), now: START };
    let merchant = Roles { merchant: true, consumer: false };
    assert_eq!(
        w.run(Command::CreateOrganization { name: "m".into(), roles: merchant }),
        vec![("organization.created", Some(1))]
    );
    assert_eq!(
        w.run(Command::CreateOrganization { name: "c".into(), roles: Roles::default() }),
        vec![("organization.created", Some(2))]
    );
    let wallet = |organization| Command::CreateWallet {
        organization: OrganizationId(organization),
        currency: usd(),
        low_balance_threshold: None,
        additional: false,
    };
    assert_eq!(w.run(wallet(1)), vec![("wallet.created", Some(1))]);
    assert_eq!(w.run(wallet(2)), vec![("wallet.created", Some(2))]);
    assert_eq!(w.run(wallet(2)), vec![], "refused: the wallet exists");
    let threshold = Command::SetLowBalanceThreshold { wallet: WalletId(2), threshold: Some(Amount::from_major(1)) };
    assert_eq!(w.run(threshold), vec![("wallet.updated", Some(2))]);
    assert_eq!(w.run(mv("c1", credit(2, "3.00", None))), vec![("operation.created", Some(2))]);
    let spec = GrantSpec {
        category: GrantCategory::Promotional,
        priority: 1,
        expires_at: Some(START + 1000),
        applicability: None,
    };
    assert_eq!(
        w.run(mv("g1", credit(2, "1.00", Some(spec)))),
        vec![("grant.created", Some(2)), ("operation.created", Some(2))]
    );
    let refused_debit = MoneyAction::Debit {
        wallet: WalletId(2),
        amount: money("80.00"),
        source: AdjustmentSource::ExternalFunding,
        reason: String::new(),
    };
    assert_eq!(w.run(mv("d1", refused_debit)), vec![]);
    let transfer = MoneyAction::Transfer {
        from: WalletId(2),
        to: WalletId(1),
        amount: money("0.50"),
        fee: Fee::None,
        kind: TransferKind::Transfer,
        product: None,
        description: String::new(),
    };
    assert_eq!(w.run(mv("t1", transfer)), vec![("operation.created", Some(2)), ("operation.created", Some(1))]);
    let hold = |name: &str| {
        mv(
            name,
            MoneyAction::PlaceHold {
                wallet: WalletId(2),
                amount: money("0.25"),
                ttl_ms: 60_000,
                exclusive: false,
                payee: None,
                product: None,
                description: String::new(),
            },
        )
    };
    assert_eq!(w.run(hold("h1")), vec![("hold.placed", Some(2))]);
    let capture = MoneyAction::CaptureHold { hold: HoldId(1), amount: None, to: WalletId(1), fee: Fee::None };
    assert_eq!(
        w.run(mv("cap1", capture)),
        vec![("hold.captured", Some(2)), ("operation.created", Some(2)), ("operation.created", Some(1))]
    );
    assert_eq!(w.run(hold("h2")), vec![("hold.placed", Some(2))]);
    assert_eq!(w.run(mv("rel2", MoneyAction::ReleaseHold { hold: HoldId(2) })), vec![("hold.released", Some(2))]);
    assert_eq!(w.run(mv("rel2b", MoneyAction::ReleaseHold { hold: HoldId(2) })), vec![], "refused: resolved");
    assert_eq!(w.run(hold("h3")), vec![("hold.placed", Some(2))]);
    // Time passes: the grant expires and the hold expires, each with its event.
    w.now = START + 61_000;
    assert_eq!(w.run(Command::Tick), vec![("hold.expired", Some(2)), ("grant.expired", Some(2))]);
    // Usage billing.
    assert_eq!(
        w.run(Command::CreateProduct { merchant: OrganizationId(1), name: "p".into() }),
        vec![("product.created", Some(1))]
    );
    let meter = Command::CreateMeter {
        merchant: OrganizationId(1),
        code: "calls".into(),
        unit: "call".into(),
        aggregation: Aggregation::Count,
        product: Some(ProductId(1)),
    };
    assert_eq!(w.run(meter), vec![("meter.created", Some(1))]);
    let spec = PlanSpec {
        merchant: OrganizationId(1),
        name: "calls".into(),
        currency: usd(),
        period: BillingPeriod::Day,
        recurring_fee: Some(Amount::from_major(1)),
        prices: vec![Price {
            meter: MeterId(1),
            model: PriceModel::PerUnit { unit_price: Amount::parse("0.40").unwrap() },
        }],
        platform_fee: None,
        replaces: None,
    };
    assert_eq!(w.run(Command::CreatePlan { spec }), vec![("plan.created", Some(1))]);
    // Subscribing charges the 1.00 fee (3.00 → 2.00; the expired grant's 0.25 is gone):
    // created, for both parties, and the fee.
    assert_eq!(
        w.run(Command::Subscribe { consumer: OrganizationId(2), plan: PlanId(1) }),
        vec![
            ("subscription.created", Some(2)),
            ("subscription.created", Some(1)),
            ("operation.created", Some(2)),
            ("operation.created", Some(1))
        ]
    );
    let usage = |id: &str| Command::Usage {
        merchant: OrganizationId(1),
        events: vec![UsageEvent {
            key: IdempotencyKey::new("usage:org_1", id).unwrap(),
            consumer: OrganizationId(2),
            meter: "calls".into(),
            quantity: Quantity::ONE,
            at: START + 61_000,
            properties: Vec::new(),
            reservation: None,
            finish: false,
        }],
    };
    // 2.00 → 1.60 → 1.20: above the 1.00 threshold. → 0.80: below it, reported once.
    assert_eq!(w.run(usage("u1")), vec![("usage.charged", Some(2))]);
    assert_eq!(w.run(usage("u2")), vec![("usage.charged", Some(2))]);
    assert_eq!(w.run(usage("u3")), vec![("usage.charged", Some(2)), ("balance.low", Some(2))]);
    assert_eq!(w.run(usage("u4")), vec![("usage.charged", Some(2))]);
    assert_eq!(w.run(usage("u4")), vec![], "a duplicate charges nothing and says nothing");
    // The next period's fee cannot be paid (0.40 left): past due.
    w.now = START + 61_000 + 86_400_000;
    assert_eq!(w.run(Command::Tick), vec![("subscription.past_due", Some(2)), ("subscription.past_due", Some(1))]);
    let cancel = Command::CancelSubscription { subscription: SubscriptionId(1), at_period_end: false };
    assert_eq!(w.run(cancel), vec![("subscription.canceled", Some(2)), ("subscription.canceled", Some(1))]);
    // A notice from outside the ledger, for the platform.
    let notice = Command::Notice {
        kind: "webhook_endpoint.disabled".into(),
        organization: None,
        object: "whe_1".into(),
        data: "{}".into(),
    };
    assert_eq!(w.run(notice), vec![("webhook_endpoint.disabled", None)]);
}

#[test]
fn every_payment_change_makes_its_events_and_refusals_none() {
    use tally_ledger::payments::*;
    let mut w = World { state: State::new(Settings::default()), directory: Memory::default(), now: START };
    let billing = BillingDetails {
        legal_name: "c".into(),
        email: "c@example.com".into(),
        address: String::new(),
        country: "US".into(),
        region: "CA".into(),
        tax_id: String::new(),
    };
    for (organization, roles) in
        [(1, Roles { merchant: true, consumer: false }), (2, Roles { merchant: false, consumer: true })]
    {
        w.run(Command::CreateOrganization { name: "o".into(), roles });
        w.run(Command::CreateWallet {
            organization: OrganizationId(organization),
            currency: usd(),
            low_balance_threshold: None,
            additional: false,
        });
        w.run(Command::UpdateOrganization {
            organization: OrganizationId(organization),
            roles,
            billing: Some(billing.clone()),
        });
    }
    let card = |token: &str| {
        Command::payment(PaymentCommand::AddMethod {
            organization: OrganizationId(2),
            token: token.into(),
            details: MethodDetails {
                kind: MethodType::Card,
                brand: "visa".into(),
                last4: "4242".into(),
                exp_month: 12,
                exp_year: 2034,
            },
            make_default: false,
        })
    };
    assert_eq!(w.run(card("ok")), vec![("payment_method.created", Some(2))]);
    assert_eq!(w.run(card("bad")), vec![("payment_method.created", Some(2))]);
    let top_up = |key: &str, method: u64| {
        Command::payment(PaymentCommand::CreateTopUp {
            key: IdempotencyKey::new("t", key).unwrap(),
            actor: None,
            wallet: WalletId(2),
            amount: money("20.00"),
            method: PaymentMethodId(method),
        })
    };
    let settle = |id: u64, outcome: ProviderOutcome| {
        Command::payment(PaymentCommand::SettleTopUp { top_up: TopUpId(id), outcome })
    };
    let ok = || ProviderOutcome::Succeeded { reference: "p".into() };
    let declined = || ProviderOutcome::Failed { code: "card_declined".into(), message: "no".into() };
    assert_eq!(w.run(top_up("t1", 1)), vec![("top_up.created", Some(2))]);
    assert_eq!(w.run(top_up("t1", 1)), vec![], "a repeat is the same top-up");
    assert_eq!(w.run(top_up("t1", 2)), vec![], "refused: the key was used for another request");
    assert_eq!(w.run(settle(1, ok())), vec![("top_up.succeeded", Some(2)), ("operation.created", Some(2))]);
    assert_eq!(w.run(settle(1, declined())), vec![], "a late answer changes nothing");
    assert_eq!(w.run(top_up("t2", 2)), vec![("top_up.created", Some(2))]);
    assert_eq!(w.run(settle(2, declined())), vec![("top_up.failed", Some(2))]);
    // Auto top-up: a debit below the threshold, then the worker starts it.
    let rule = AutoTopUpSpec {
        threshold: Amount::from_major(10),
        amount: AutoAmount::Fixed(Amount::from_major(5)),
        method: PaymentMethodId(2),
        max_per_day: 5,
        max_amount_per_day: Amount::from_major(100),
    };
    w.run(Command::payment(PaymentCommand::SetAutoTopUp { wallet: WalletId(2), rule: Some(rule) }));
    let debit = MoneyAction::Debit {
        wallet: WalletId(2),
        amount: money("15.00"),
        source: AdjustmentSource::ExternalFunding,
        reason: String::new(),
    };
    assert_eq!(w.run(mv("d1", debit)), vec![("operation.created", Some(2))]);
    assert_eq!(
        w.run(Command::payment(PaymentCommand::StartAutoTopUp { wallet: WalletId(2) })),
        vec![("top_up.created", Some(2)), ("auto_top_up.started", Some(2))]
    );
    assert_eq!(w.run(settle(3, declined())), vec![("top_up.failed", Some(2)), ("auto_top_up.failed", Some(2))]);
    // A checkout the wallet covers: created and succeeded at once, for both parties.
    let checkout = Command::payment(PaymentCommand::StartCheckout {
        key: IdempotencyKey::new("t", "c1").unwrap(),
        actor: None,
        consumer: OrganizationId(2),
        merchant: OrganizationId(1),
        amount: money("2.00"),
        use_wallet: true,
        method: None,
        description: String::new(),
    });
    assert_eq!(
        w.run(checkout),
        vec![
            ("checkout.created", Some(2)),
            ("checkout.created", Some(1)),
            ("checkout.succeeded", Some(2)),
            ("checkout.succeeded", Some(1)),
            ("operation.created", Some(2)),
            ("operation.created", Some(1)),
        ]
    );
    let refund = Command::payment(PaymentCommand::RefundTopUp {
        key: IdempotencyKey::new("t", "r1").unwrap(),
        top_up: TopUpId(1),
        amount: Some(Amount::from_major(1)),
        reason: String::new(),
    });
    assert_eq!(w.run(refund.clone()), vec![("refund.created", Some(2)), ("operation.created", Some(2))]);
    assert_eq!(w.run(refund), vec![], "a repeat is the same refund");
    let settle_refund = Command::payment(PaymentCommand::SettleRefund { refund: RefundId(1), outcome: ok() });
    assert_eq!(w.run(settle_refund), vec![("refund.succeeded", Some(2))]);
    let too_much = Command::payment(PaymentCommand::RefundTopUp {
        key: IdempotencyKey::new("t", "r2").unwrap(),
        top_up: TopUpId(1),
        amount: Some(Amount::from_major(100)),
        reason: String::new(),
    });
    assert_eq!(w.run(too_much), vec![], "refused: more than was paid");
}

#[test]
fn every_payout_change_makes_its_events_and_refusals_none() {
    use tally_ledger::payments::ProviderOutcome;
    use tally_ledger::payouts::*;
    let mut w = World { state: State::new(Settings::default()), directory: Memory::default(), now: START };
    let roles = Roles { merchant: true, consumer: false };
    w.run(Command::CreateOrganization { name: "m".into(), roles });
    w.run(Command::CreateWallet {
        organization: OrganizationId(1),
        currency: usd(),
        low_balance_threshold: None,
        additional: false,
    });
    w.run(mv("fund", credit(1, "100.00", None)));
    let org = OrganizationId(1);
    let submit = Command::payout(PayoutCommand::SubmitVerification { organization: org });
    assert_eq!(w.run(submit.clone()), vec![], "refused: no billing details yet");
    let billing = BillingDetails {
        legal_name: "m".into(),
        email: "m@example.com".into(),
        address: String::new(),
        country: "US".into(),
        region: String::new(),
        tax_id: String::new(),
    };
    assert_eq!(
        w.run(Command::UpdateOrganization { organization: org, roles, billing: Some(billing) }),
        vec![("organization.updated", Some(1))]
    );
    assert_eq!(w.run(submit), vec![("organization.verification_updated", Some(1))]);
    let approve = PayoutCommand::DecideVerification { organization: org, approve: true, reason: String::new() };
    assert_eq!(w.run(Command::payout(approve.clone())), vec![("organization.verification_updated", Some(1))]);
    assert_eq!(w.run(Command::payout(approve)), vec![], "refused: not pending");
    let account = NewBankAccount {
        organization: org,
        country: "US".into(),
        currency: usd(),
        holder_name: "m".into(),
        last4: "6789".into(),
        token: "btok".into(),
    };
    assert_eq!(
        w.run(Command::payout(PayoutCommand::AddBankAccount { account })),
        vec![("bank_account.created", Some(1))]
    );
    let start = PayoutCommand::StartDepositVerification { account: BankAccountId(1), deposits: (3, 4) };
    assert_eq!(w.run(Command::payout(start)), vec![("bank_account.updated", Some(1))]);
    let wrong = PayoutCommand::ConfirmDeposits { account: BankAccountId(1), deposits: (1, 1) };
    assert_eq!(w.run(Command::payout(wrong)), vec![], "a wrong answer that changes no status says nothing");
    let right = PayoutCommand::ConfirmDeposits { account: BankAccountId(1), deposits: (4, 3) };
    assert_eq!(w.run(Command::payout(right)), vec![("bank_account.updated", Some(1))]);
    let payout = |key: &str, amount: &str| {
        Command::payout(PayoutCommand::CreatePayout {
            key: IdempotencyKey::new("t", key).unwrap(),
            actor: None,
            wallet: WalletId(1),
            amount: money(amount),
            bank_account: BankAccountId(1),
        })
    };
    assert_eq!(w.run(payout("p1", "200.00")), vec![], "refused: more than available");
    assert_eq!(w.run(payout("p1", "60.00")), vec![("payout.created", Some(1)), ("operation.created", Some(1))]);
    assert_eq!(w.run(payout("p1", "60.00")), vec![], "a repeat is the same payout");
    let settle = |id: u64, outcome| Command::payout(PayoutCommand::SettlePayout { payout: PayoutId(id), outcome });
    assert_eq!(w.run(settle(1, ProviderOutcome::Succeeded { reference: "r".into() })), vec![("payout.paid", Some(1))]);
    assert_eq!(w.run(payout("p2", "10.00")), vec![("payout.created", Some(1)), ("operation.created", Some(1))]);
    let failed = ProviderOutcome::Failed { code: "account_closed".into(), message: "closed".into() };
    assert_eq!(
        w.run(settle(2, failed.clone())),
        vec![("payout.failed", Some(1)), ("operation.created", Some(1))],
        "the money coming back is an operation"
    );
    assert_eq!(w.run(settle(2, failed)), vec![], "a late answer says nothing");
}
