//! Property test: random command sequences run against the ledger and against a
//! reference model written separately, in the plainest way (maps and sorting). After
//! every step both must agree on the outcome and on every balance, and the ledger's
//! invariants must hold.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const WALLETS: u64 = 4;

#[derive(Clone, Debug)]
enum Step {
    Credit {
        wallet: u64,
        cents: i64,
    },
    Grant {
        wallet: u64,
        cents: i64,
        priority: u32,
        expires_in: Option<i64>,
    },
    Debit {
        wallet: u64,
        cents: i64,
    },
    Transfer {
        from: u64,
        to: u64,
        cents: i64,
        fee_ppm: u32,
    },
    Hold {
        wallet: u64,
        cents: i64,
        ttl: i64,
        exclusive: bool,
    },
    Capture {
        hold: u64,
        cents: Option<i64>,
        to: u64,
    },
    Release {
        hold: u64,
    },
    Freeze {
        wallet: u64,
        frozen: bool,
    },
    Advance {
        ms: i64,
    },
    /// Sends an earlier step again with the same key.
    Repeat {
        back: usize,
    },
    /// Sends a different request under an earlier step's key.
    Reuse {
        back: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    let wallet = 1..=WALLETS;
    let cents = -50i64..5_000;
    prop_oneof![
        3 => (wallet.clone(), cents.clone()).prop_map(|(wallet, cents)| Step::Credit { wallet, cents }),
        2 => (wallet.clone(), 1i64..3_000, 0u32..3, proptest::option::of(1i64..20_000))
            .prop_map(|(wallet, cents, priority, expires_in)| Step::Grant { wallet, cents, priority, expires_in }),
        2 => (wallet.clone(), cents.clone()).prop_map(|(wallet, cents)| Step::Debit { wallet, cents }),
        4 => (wallet.clone(), wallet.clone(), cents.clone(), prop_oneof![Just(0u32), Just(25_000u32), Just(333_333u32)])
            .prop_map(|(from, to, cents, fee_ppm)| Step::Transfer { from, to, cents, fee_ppm }),
        3 => (wallet.clone(), cents.clone(), prop_oneof![Just(500i64), Just(2_000), Just(30_000)], proptest::bool::weighted(0.15))
            .prop_map(|(wallet, cents, ttl, exclusive)| Step::Hold { wallet, cents, ttl, exclusive }),
        2 => (1u64..8, proptest::option::of(1i64..4_000), wallet.clone()).prop_map(|(hold, cents, to)| Step::Capture { hold, cents, to }),
        1 => (1u64..8).prop_map(|hold| Step::Release { hold }),
        1 => (wallet, proptest::bool::ANY).prop_map(|(wallet, frozen)| Step::Freeze { wallet, frozen }),
        2 => (1i64..10_000).prop_map(|ms| Step::Advance { ms }),
        1 => (1usize..6).prop_map(|back| Step::Repeat { back }),
        1 => (1usize..6).prop_map(|back| Step::Reuse { back }),
    ]
}

fn cents(value: i64) -> i128 {
    i128::from(value) * 10_000_000_000
}

// ---- the reference model: plain maps, no sharing of the ledger's code ----

#[derive(Clone, Debug, Default)]
struct ModelGrant {
    id: u64,
    priority: u32,
    expires_at: Option<Timestamp>,
    remaining: i128,
    reserved: i128,
    expired: bool,
}

#[derive(Clone, Debug)]
struct ModelHold {
    wallet: u64,
    amount: i128,
    /// (grant id or 0 for main, amount)
    parts: Vec<(u64, i128)>,
    expires_at: Timestamp,
    exclusive: bool,
}

#[derive(Clone, Debug, Default)]
struct Model {
    main: BTreeMap<u64, i128>,
    main_reserved: BTreeMap<u64, i128>,
    grants: BTreeMap<u64, Vec<ModelGrant>>,
    frozen: BTreeMap<u64, bool>,
    holds: BTreeMap<u64, ModelHold>,
    next_hold: u64,
    next_grant: u64,
    outside: i128,
}

impl Model {
    fn new() -> Model {
        Model { next_hold: 1, next_grant: 1, ..Model::default() }
    }

    fn balance(&self, wallet: u64) -> i128 {
        self.main.get(&wallet).copied().unwrap_or(0)
            + self.grants.get(&wallet).map_or(0, |g| g.iter().map(|g| g.remaining).sum())
    }

    fn held(&self, wallet: u64) -> i128 {
        self.holds.values().filter(|h| h.wallet == wallet).map(|h| h.amount).sum()
    }

    fn available(&self, wallet: u64) -> i128 {
        self.balance(wallet) - self.held(wallet)
    }

    /// Grants usable now, in the order the rules say: priority, earliest expiry, oldest.
    fn order(&self, wallet: u64, now: Timestamp) -> Vec<u64> {
        let mut grants: Vec<&ModelGrant> = self
            .grants
            .get(&wallet)
            .map(|g| g.iter().filter(|g| !g.expired && g.expires_at.is_none_or(|at| at > now)).collect())
            .unwrap_or_default();
        grants.sort_by_key(|g| (g.priority, g.expires_at.unwrap_or(i64::MAX), g.id));
        grants.iter().map(|g| g.id).collect()
    }

    fn grant_mut(&mut self, wallet: u64, id: u64) -> &mut ModelGrant {
        self.grants.get_mut(&wallet).unwrap().iter_mut().find(|g| g.id == id).unwrap()
    }

    fn plan(&self, wallet: u64, amount: i128, now: Timestamp) -> Option<Vec<(u64, i128)>> {
        if amount > self.available(wallet) {
            return None;
        }
        let mut left = amount;
        let mut parts = Vec::new();
        for id in self.order(wallet, now) {
            let grant = self.grants[&wallet].iter().find(|g| g.id == id).unwrap();
            let take = (grant.remaining - grant.reserved).min(left);
            if take > 0 {
                parts.push((id, take));
                left -= take;
            }
        }
        let free_main =
            self.main.get(&wallet).copied().unwrap_or(0) - self.main_reserved.get(&wallet).copied().unwrap_or(0);
        let take = free_main.min(left);
        if take > 0 {
            parts.push((0, take));
            left -= take;
        }
        (left == 0).then_some(parts)
    }

    fn take(&mut self, wallet: u64, parts: &[(u64, i128)], reserved: bool) {
        for &(id, amount) in parts {
            if id == 0 {
                *self.main.entry(wallet).or_default() -= amount;
                if reserved {
                    *self.main_reserved.entry(wallet).or_default() -= amount;
                }
            } else {
                let grant = self.grant_mut(wallet, id);
                grant.remaining -= amount;
                if reserved {
                    grant.reserved -= amount;
                }
            }
        }
    }

    fn unreserve(&mut self, wallet: u64, parts: &[(u64, i128)]) {
        for &(id, amount) in parts {
            if id == 0 {
                *self.main_reserved.entry(wallet).or_default() -= amount;
            } else {
                self.grant_mut(wallet, id).reserved -= amount;
            }
        }
    }

    fn tick(&mut self, now: Timestamp) {
        let due: Vec<u64> = self.holds.iter().filter(|(_, h)| h.expires_at <= now).map(|(id, _)| *id).collect();
        for id in due {
            let hold = self.holds.remove(&id).unwrap();
            self.unreserve(hold.wallet, &hold.parts);
        }
        for grants in self.grants.values_mut() {
            for grant in grants.iter_mut() {
                if grant.expires_at.is_some_and(|at| at <= now) {
                    grant.expired = true;
                }
                if grant.expired && grant.remaining > grant.reserved {
                    self.outside += grant.remaining - grant.reserved; // to expired credits
                    grant.remaining = grant.reserved;
                }
            }
        }
    }

    /// Applies a step; Ok(summary) or Err(code).
    fn apply(&mut self, step: &Step, now: Timestamp) -> Result<String, &'static str> {
        match *step {
            Step::Credit { wallet, cents: c } => {
                let amount = cents(c);
                if amount <= 0 {
                    return Err("amount_must_be_positive");
                }
                *self.main.entry(wallet).or_default() += amount;
                self.outside -= amount;
                Ok("posted".into())
            }
            Step::Grant { wallet, cents: c, priority, expires_in } => {
                let amount = cents(c);
                let id = self.next_grant;
                self.next_grant += 1;
                self.grants.entry(wallet).or_default().push(ModelGrant {
                    id,
                    priority,
                    expires_at: expires_in.map(|ms| now + ms),
                    remaining: amount,
                    reserved: 0,
                    expired: false,
                });
                self.outside -= amount;
                Ok(format!("grant {id}"))
            }
            Step::Debit { wallet, cents: c } => {
                let amount = cents(c);
                if amount <= 0 {
                    return Err("amount_must_be_positive");
                }
                if self.frozen.get(&wallet).copied().unwrap_or(false) {
                    return Err("wallet_frozen");
                }
                // Admin debits take from every grant, applicable or not.
                let parts = self.plan(wallet, amount, now).ok_or("insufficient_funds")?;
                self.take(wallet, &parts, false);
                self.outside += amount;
                Ok("posted".into())
            }
            Step::Transfer { from, to, cents: c, fee_ppm } => {
                let amount = cents(c);
                if amount <= 0 {
                    return Err("amount_must_be_positive");
                }
                if from == to {
                    return Err("same_wallet");
                }
                if self.frozen.get(&from).copied().unwrap_or(false) {
                    return Err("wallet_frozen");
                }
                let fee = amount * i128::from(fee_ppm) / 1_000_000;
                let parts = self.plan(from, amount, now).ok_or("insufficient_funds")?;
                self.take(from, &parts, false);
                *self.main.entry(to).or_default() += amount - fee;
                self.outside += fee;
                Ok("posted".into())
            }
            Step::Hold { wallet, cents: c, ttl, exclusive } => {
                let amount = cents(c);
                if amount <= 0 {
                    return Err("amount_must_be_positive");
                }
                if !(1_000..=7 * 24 * 3_600_000).contains(&ttl) {
                    return Err("hold_ttl_out_of_range");
                }
                if self.frozen.get(&wallet).copied().unwrap_or(false) {
                    return Err("wallet_frozen");
                }
                if self.holds.values().any(|h| h.wallet == wallet && h.exclusive) {
                    return Err("wallet_on_hold");
                }
                let parts = self.plan(wallet, amount, now).ok_or("insufficient_funds")?;
                for &(id, part) in &parts {
                    if id == 0 {
                        *self.main_reserved.entry(wallet).or_default() += part;
                    } else {
                        self.grant_mut(wallet, id).reserved += part;
                    }
                }
                let id = self.next_hold;
                self.next_hold += 1;
                self.holds.insert(id, ModelHold { wallet, amount, parts, expires_at: now + ttl, exclusive });
                Ok(format!("hold {id}"))
            }
            Step::Capture { hold, cents: c, to } => {
                let Some(held) = self.holds.get(&hold).cloned() else {
                    return Err(if hold < self.next_hold { "hold_already_resolved" } else { "hold_not_found" });
                };
                let amount = match c {
                    Some(c) => cents(c),
                    None => held.amount,
                };
                if amount > held.amount {
                    return Err("capture_exceeds_hold");
                }
                if held.wallet == to {
                    return Err("same_wallet");
                }
                if self.frozen.get(&held.wallet).copied().unwrap_or(false) {
                    return Err("wallet_frozen");
                }
                self.holds.remove(&hold);
                let mut left = amount;
                let mut taken = Vec::new();
                let mut returned = Vec::new();
                for &(id, part) in &held.parts {
                    let take = part.min(left);
                    left -= take;
                    if take > 0 {
                        taken.push((id, take));
                    }
                    if part > take {
                        returned.push((id, part - take));
                    }
                }
                self.take(held.wallet, &taken, true);
                self.unreserve(held.wallet, &returned);
                *self.main.entry(to).or_default() += amount;
                Ok(format!("captured {hold}"))
            }
            Step::Release { hold } => {
                let Some(held) = self.holds.remove(&hold) else {
                    return Err(if hold < self.next_hold { "hold_already_resolved" } else { "hold_not_found" });
                };
                self.unreserve(held.wallet, &held.parts);
                Ok(format!("released {hold}"))
            }
            Step::Freeze { .. } | Step::Advance { .. } | Step::Repeat { .. } | Step::Reuse { .. } => {
                unreachable!("handled by the runner")
            }
        }
    }
}

fn action(step: &Step) -> MoneyAction {
    let m = |c: i64| Money::new(Amount::from_units(cents(c)), usd());
    match *step {
        Step::Credit { wallet, cents: c } => MoneyAction::Credit {
            wallet: WalletId(wallet),
            amount: m(c),
            kind: CreditKind::TopUp,
            source: AdjustmentSource::ExternalFunding,
            grant: None,
            reason: String::new(),
        },
        Step::Grant { wallet, cents: c, priority, expires_in } => MoneyAction::Credit {
            wallet: WalletId(wallet),
            amount: m(c),
            kind: CreditKind::Adjustment,
            source: AdjustmentSource::Promotions,
            // The expiry is absolute; the runner fills it in from the step's time.
            grant: Some(GrantSpec {
                category: GrantCategory::Promotional,
                priority,
                expires_at: expires_in,
                applicability: None,
            }),
            reason: String::new(),
        },
        Step::Debit { wallet, cents: c } => MoneyAction::Debit {
            wallet: WalletId(wallet),
            amount: m(c),
            source: AdjustmentSource::ExternalFunding,
            reason: String::new(),
        },
        Step::Transfer { from, to, cents: c, fee_ppm } => MoneyAction::Transfer {
            from: WalletId(from),
            to: WalletId(to),
            amount: m(c),
            fee: Fee::Rate(PartsPerMillion(fee_ppm)),
            kind: TransferKind::Charge,
            product: None,
            description: String::new(),
        },
        Step::Hold { wallet, cents: c, ttl, exclusive } => MoneyAction::PlaceHold {
            wallet: WalletId(wallet),
            amount: m(c),
            ttl_ms: ttl,
            exclusive,
            payee: None,
            product: None,
            description: String::new(),
        },
        Step::Capture { hold, cents: c, to } => MoneyAction::CaptureHold {
            hold: HoldId(hold),
            amount: c.map(|c| Amount::from_units(cents(c))),
            to: WalletId(to),
            fee: Fee::None,
        },
        Step::Release { hold } => MoneyAction::ReleaseHold { hold: HoldId(hold) },
        _ => unreachable!("not a money action"),
    }
}

fn summary(receipt: &Receipt) -> String {
    match receipt {
        Receipt::Posted { grant: Some(grant), .. } => format!("grant {}", grant.0),
        Receipt::Posted { .. } => "posted".into(),
        Receipt::HoldPlaced { hold, .. } => format!("hold {}", hold.0),
        Receipt::HoldCaptured { hold, .. } => format!("captured {}", hold.0),
        Receipt::HoldReleased { hold, .. } => format!("released {}", hold.0),
        other => format!("{other:?}"),
    }
}

fn check_agreement(state: &State, model: &Model, context: &str) {
    let problems = state.check_invariants();
    assert!(problems.is_empty(), "{context}: invariants broken: {problems:?}");
    for wallet in 1..=WALLETS {
        let w = state.wallet(WalletId(wallet)).unwrap();
        assert_eq!(w.balance().units(), model.balance(wallet), "{context}: balance of wallet {wallet}");
        assert_eq!(w.held().units(), model.held(wallet), "{context}: held of wallet {wallet}");
        assert!(w.available().units() >= 0, "{context}: negative available");
        for grant in model.grants.get(&wallet).into_iter().flatten() {
            let real = state.grant(GrantId(grant.id)).unwrap();
            assert_eq!(real.remaining, grant.remaining, "{context}: grant {} remaining", grant.id);
            assert_eq!(real.reserved, grant.reserved, "{context}: grant {} reserved", grant.id);
        }
    }
    // What left the wallets went to (or came from) the system accounts.
    let wallets: i128 = (1..=WALLETS).map(|w| model.balance(w)).sum();
    assert_eq!(wallets + model.outside, 0, "{context}: the model does not conserve money");
}

/// Sequences per run; CI runs the default, `TALLY_MODEL_CASES` asks for more.
const CASES_DEFAULT: u32 = 1_000;

#[derive(Default)]
struct Counts {
    sequences: u64,
    steps: u64,
    accepted: u64,
    rejected: u64,
}

#[test]
fn ledger_agrees_with_the_reference_model() {
    let cases = std::env::var("TALLY_MODEL_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES_DEFAULT);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    let counts = std::cell::RefCell::new(Counts::default());
    let result =
        runner.run(&proptest::collection::vec(step(), 1..40), |steps| run_sequence(&steps, &mut counts.borrow_mut()));
    let counts = counts.into_inner();
    println!(
        "model test: {} sequences (asked for {}), {} steps, {} accepted, {} rejected",
        counts.sequences, cases, counts.steps, counts.accepted, counts.rejected
    );
    if let Err(error) = result {
        panic!("{error}");
    }
    assert!(counts.sequences >= u64::from(cases), "fewer sequences ran than asked");
    assert!(counts.accepted > counts.sequences && counts.rejected > 0, "the generator must exercise both outcomes");
}

fn run_sequence(steps: &[Step], counts: &mut Counts) -> Result<(), TestCaseError> {
    counts.sequences += 1;
    {
        let mut state = ledger(WALLETS);
        let mut model = Model::new();
        let mut now = START;
        for wallet in 1..=WALLETS {
            let funding = Step::Credit { wallet, cents: 10_000 };
            state.apply(&Command::Move { key: key(&format!("fund{wallet}")), action: action(&funding) }, now).unwrap();
            model.apply(&funding, now).unwrap();
        }
        // (key name, action, first receipt) of accepted money steps, for repeats.
        let mut sent: Vec<(String, MoneyAction, Result<Receipt, Rejection>)> = Vec::new();
        for (index, step) in steps.iter().enumerate() {
            // The engine ticks before a batch whenever something is due; so do we.
            if state.next_due().is_some_and(|due| due <= now) {
                state.apply(&Command::Tick, now).unwrap();
            }
            model.tick(now);
            let context = format!("step {index} {step:?}");
            match step {
                Step::Advance { ms } => now += ms,
                Step::Freeze { wallet, frozen } => {
                    let status = if *frozen { WalletStatus::Frozen } else { WalletStatus::Active };
                    state.apply(&Command::SetWalletStatus { wallet: WalletId(*wallet), status }, now).unwrap();
                    model.frozen.insert(*wallet, *frozen);
                }
                Step::Repeat { back } | Step::Reuse { back } => {
                    let Some((name, action, first)) = sent.len().checked_sub(*back).map(|i| sent[i].clone()) else {
                        continue;
                    };
                    let reuse = matches!(step, Step::Reuse { .. });
                    let request = if reuse { MoneyAction::ReleaseHold { hold: HoldId(1_000) } } else { action };
                    let before = state.clone();
                    let got = state.apply(&Command::Move { key: key(&name), action: request }, now);
                    match (&first, reuse) {
                        // A key whose first request was accepted is remembered.
                        (Ok(receipt), false) => {
                            prop_assert_eq!(got, Ok(Receipt::Replayed(receipt.reference())), "{}", context)
                        }
                        (Ok(_), true) => prop_assert_eq!(got, Err(Rejection::IdempotencyKeyMismatch), "{}", context),
                        // A rejected request left no trace, not even its key.
                        (Err(_), _) => {
                            state = before;
                            continue;
                        }
                    }
                    prop_assert_eq!(&state, &before, "{}: a repeat changed the state", context);
                }
                _ => {
                    let name = format!("k{index}");
                    let mut request = action(step);
                    if let MoneyAction::Credit { grant: Some(spec), .. } = &mut request {
                        spec.expires_at = spec.expires_at.map(|ms| now + ms);
                    }
                    let before = state.clone();
                    let got = state.apply(&Command::Move { key: key(&name), action: request.clone() }, now);
                    let expected = model.apply(step, now);
                    counts.steps += 1;
                    if got.is_ok() {
                        counts.accepted += 1;
                    } else {
                        counts.rejected += 1;
                    }
                    match (&got, &expected) {
                        (Ok(receipt), Ok(summary_expected)) => {
                            prop_assert_eq!(&summary(receipt), summary_expected, "{}", context)
                        }
                        (Err(rejection), Err(code)) => {
                            prop_assert_eq!(rejection.code(), *code, "{}", context);
                            prop_assert_eq!(&state, &before, "{}: a rejection changed the state", context);
                        }
                        _ => prop_assert!(false, "{}: ledger gave {:?}, model {:?}", context, got, expected),
                    }
                    sent.push((name, request, got));
                }
            }
            check_agreement(&state, &model, &format!("after step {index} {step:?}"));
        }
    }
    Ok(())
}
