//! Table-driven checks of every rejection and of the seed scenarios in domain.md.

use super::*;

fn transfer(from: u64, to: u64, amount: &str) -> MoneyAction {
    MoneyAction::Transfer {
        from: WalletId(from),
        to: WalletId(to),
        amount: money(amount),
        fee: Fee::None,
        kind: TransferKind::Transfer,
        product: None,
        description: String::new(),
    }
}

fn hold(wallet: u64, amount: &str, exclusive: bool) -> MoneyAction {
    MoneyAction::PlaceHold {
        wallet: WalletId(wallet),
        amount: money(amount),
        ttl_ms: 60_000,
        exclusive,
        payee: None,
        product: None,
        description: String::new(),
    }
}

fn promo(wallet: u64, amount: &str, priority: u32, expires_at: Option<Timestamp>) -> MoneyAction {
    MoneyAction::Credit {
        wallet: WalletId(wallet),
        amount: money(amount),
        kind: CreditKind::Adjustment,
        source: AdjustmentSource::Promotions,
        grant: Some(GrantSpec { category: GrantCategory::Promotional, priority, expires_at, applicability: None }),
        reason: String::new(),
    }
}

/// A funded ledger: wallet 1 holds 50.00, wallet 2 is empty, wallet 3 is frozen with 5.00,
/// hold 1 (10.00 on wallet 1) is active, hold 2 was released; wallet 4 is in EUR.
fn fixture() -> State {
    let mut state = ledger(3);
    run(&mut state, "f1", credit(1, "60.00")).unwrap();
    run(&mut state, "f3", credit(3, "5.00")).unwrap();
    state.apply(&Command::SetWalletStatus { wallet: WalletId(3), status: WalletStatus::Frozen }, START).unwrap();
    run(&mut state, "h1", hold(1, "10.00", false)).unwrap();
    run(&mut state, "h2", hold(1, "1.00", false)).unwrap();
    run(&mut state, "r2", MoneyAction::ReleaseHold { hold: HoldId(2) }).unwrap();
    run(
        &mut state,
        "d1",
        MoneyAction::Debit {
            wallet: WalletId(1),
            amount: money("10.00"),
            source: AdjustmentSource::ExternalFunding,
            reason: String::new(),
        },
    )
    .unwrap();
    state.apply(&Command::CreateOrganization { name: "eur".into(), roles: Roles::default() }, START).unwrap();
    state
        .apply(
            &Command::CreateWallet {
                organization: OrganizationId(4),
                currency: Currency::parse("EUR").unwrap(),
                low_balance_threshold: None,
                additional: false,
            },
            START,
        )
        .unwrap();
    state
}

#[test]
fn every_rejection_changes_nothing() {
    let eur = Money::parse("1.00", "EUR").unwrap();
    let cases: Vec<(Rejection, Command)> = vec![
        (Rejection::InsufficientFunds, mv("x1", transfer(1, 2, "40.01"))),
        (
            Rejection::CurrencyMismatch,
            mv(
                "x2",
                MoneyAction::Credit {
                    wallet: WalletId(1),
                    amount: eur,
                    kind: CreditKind::TopUp,
                    source: AdjustmentSource::ExternalFunding,
                    grant: None,
                    reason: String::new(),
                },
            ),
        ),
        (Rejection::WalletFrozen, mv("x3", transfer(3, 2, "1.00"))),
        (Rejection::WalletNotFound, mv("x4", transfer(1, 99, "1.00"))),
        (
            Rejection::WalletAlreadyExists,
            Command::CreateWallet {
                organization: OrganizationId(1),
                currency: usd(),
                low_balance_threshold: None,
                additional: false,
            },
        ),
        (Rejection::WalletNotEmpty, Command::SetWalletStatus { wallet: WalletId(1), status: WalletStatus::Closed }),
        (
            Rejection::OrganizationNotFound,
            Command::CreateWallet {
                organization: OrganizationId(99),
                currency: usd(),
                low_balance_threshold: None,
                additional: false,
            },
        ),
        (Rejection::HoldNotFound, mv("x5", MoneyAction::ReleaseHold { hold: HoldId(99) })),
        (Rejection::HoldAlreadyResolved, mv("x6", MoneyAction::ReleaseHold { hold: HoldId(2) })),
        (
            Rejection::CaptureExceedsHold,
            mv(
                "x7",
                MoneyAction::CaptureHold {
                    hold: HoldId(1),
                    amount: Some(Amount::parse("10.01").unwrap()),
                    to: WalletId(2),
                    fee: Fee::None,
                },
            ),
        ),
        (
            Rejection::HoldTtlOutOfRange,
            mv(
                "x8",
                MoneyAction::PlaceHold {
                    wallet: WalletId(1),
                    amount: money("1.00"),
                    ttl_ms: 10,
                    exclusive: false,
                    payee: None,
                    product: None,
                    description: String::new(),
                },
            ),
        ),
        (Rejection::GrantNotFound, mv("x9", MoneyAction::VoidGrant { grant: GrantId(9), reason: String::new() })),
        (Rejection::GrantExpiryInPast, mv("x10", promo(1, "1.00", 1, Some(START)))),
        (Rejection::AmountMustBePositive, mv("x11", transfer(1, 2, "0"))),
        (Rejection::AmountMustBePositive, mv("x12", transfer(1, 2, "-1.00"))),
        (
            Rejection::AmountOverflow,
            mv(
                "x13",
                MoneyAction::Credit {
                    wallet: WalletId(2),
                    amount: Money::new(Amount::from_units(i128::MAX), usd()),
                    kind: CreditKind::TopUp,
                    source: AdjustmentSource::ExternalFunding,
                    grant: None,
                    reason: String::new(),
                },
            ),
        ),
        (
            Rejection::FeeExceedsAmount,
            mv(
                "x14",
                MoneyAction::Transfer {
                    from: WalletId(1),
                    to: WalletId(2),
                    amount: money("1.00"),
                    fee: Fee::Fixed(Amount::parse("1.01").unwrap()),
                    kind: TransferKind::Charge,
                    product: None,
                    description: String::new(),
                },
            ),
        ),
        (Rejection::SameWallet, mv("x15", transfer(1, 1, "1.00"))),
        (Rejection::IdempotencyKeyMismatch, mv("f1", credit(1, "61.00"))),
        (
            Rejection::TextLengthOutOfRange,
            mv(
                "x16",
                MoneyAction::Debit {
                    wallet: WalletId(1),
                    amount: money("1.00"),
                    source: AdjustmentSource::ExternalFunding,
                    reason: "x".repeat(256),
                },
            ),
        ),
        (
            Rejection::InvalidSetting,
            Command::Configure { settings: Settings { idempotency_retention_ms: 1000, ..Settings::default() } },
        ),
    ];
    for (expected, command) in cases {
        let mut state = fixture();
        let before = state.clone();
        let got = state.apply(&command, START + 1);
        assert_eq!(got.as_ref().err(), Some(&expected), "{command:?} gave {got:?}");
        assert_eq!(state, before, "a rejected {command:?} changed the state");
    }
}

#[test]
fn wallet_on_hold_and_closed_and_grant_not_active() {
    let mut state = fixture();
    run(&mut state, "ex", hold(1, "1.00", true)).unwrap();
    assert_eq!(run(&mut state, "ex2", hold(1, "1.00", false)), Err(Rejection::WalletOnHold));
    state.apply(&Command::SetWalletStatus { wallet: WalletId(2), status: WalletStatus::Closed }, START).unwrap();
    assert_eq!(run(&mut state, "c1", credit(2, "1.00")), Err(Rejection::WalletClosed));
    assert_eq!(
        state.apply(&Command::SetWalletStatus { wallet: WalletId(2), status: WalletStatus::Active }, START),
        Err(Rejection::InvalidStatusChange)
    );
    run(&mut state, "g", promo(1, "2.00", 1, None)).unwrap();
    run(&mut state, "v", MoneyAction::VoidGrant { grant: GrantId(1), reason: String::new() }).unwrap();
    assert_eq!(
        run(&mut state, "v2", MoneyAction::VoidGrant { grant: GrantId(1), reason: String::new() }),
        Err(Rejection::GrantNotActive)
    );
    assert!(state.check_invariants().is_empty());
}

fn mv(name: &str, action: MoneyAction) -> Command {
    Command::Move { key: key(name), action }
}

#[test]
fn grant_then_main_balance_seed_scenario() {
    // A 20.00 promotional grant and 100.00 main: a 50.00 charge takes 20.00 from the
    // grant and 30.00 from main, and its record lists both.
    let mut state = ledger(2);
    run(&mut state, "main", credit(1, "100.00")).unwrap();
    run(&mut state, "promo", promo(1, "20.00", 1, None)).unwrap();
    let receipt = run(
        &mut state,
        "charge",
        MoneyAction::Transfer {
            from: WalletId(1),
            to: WalletId(2),
            amount: money("50.00"),
            fee: Fee::Rate(PartsPerMillion(20_000)),
            kind: TransferKind::Charge,
            product: None,
            description: String::new(),
        },
    )
    .unwrap();
    let Receipt::Posted { operation, .. } = receipt else { panic!("not posted") };
    assert_eq!(operation.kind, OperationKind::Charge);
    let consumer = &operation.legs[0];
    assert_eq!(consumer.amount, Amount::parse("-50.00").unwrap());
    assert_eq!(consumer.grants, vec![GrantPortion { grant: GrantId(1), amount: Amount::parse("-20.00").unwrap() }]);
    assert_eq!(balance(&state, 1), "70.00");
    assert_eq!(balance(&state, 2), "49.00");
    assert_eq!(state.system_balance(usd(), SystemAccount::PlatformRevenue).format(2), "1.00");
    assert!(state.check_invariants().is_empty());
}

#[test]
fn seed_usage_charge_and_admin_overdraft() {
    let mut state = ledger(2);
    run(&mut state, "topup", credit(1, "50.00")).unwrap();
    // 1,200 tokens at 0.00002 per token is 0.024.
    let cost = Amount::from_units(1_200 * Amount::parse("0.00002").unwrap().units());
    assert_eq!(cost.format(2), "0.024");
    run(
        &mut state,
        "usage",
        MoneyAction::Transfer {
            from: WalletId(1),
            to: WalletId(2),
            amount: Money::new(cost, usd()),
            fee: Fee::Rate(PartsPerMillion(50_000)),
            kind: TransferKind::Charge,
            product: None,
            description: String::new(),
        },
    )
    .unwrap();
    assert_eq!(balance(&state, 1), "49.976");
    assert_eq!(balance(&state, 2), "0.0228");
    // An admin debits 80.00 from a wallet holding 50.00: refused, nothing changes.
    let before = state.clone();
    let debit = MoneyAction::Debit {
        wallet: WalletId(1),
        amount: money("80.00"),
        source: AdjustmentSource::ExternalFunding,
        reason: "oops".into(),
    };
    assert_eq!(run(&mut state, "debit", debit), Err(Rejection::InsufficientFunds));
    assert_eq!(state, before);
}

#[test]
fn holds_capture_part_release_rest_and_expire_on_time() {
    let mut state = ledger(2);
    run(&mut state, "fund", credit(1, "30.00")).unwrap();
    run(&mut state, "h", hold(1, "20.00", false)).unwrap();
    assert_eq!(available(&state, 1), "10.00");
    let captured = run(
        &mut state,
        "c",
        MoneyAction::CaptureHold {
            hold: HoldId(1),
            amount: Some(Amount::parse("15.00").unwrap()),
            to: WalletId(2),
            fee: Fee::None,
        },
    )
    .unwrap();
    assert!(matches!(captured, Receipt::HoldCaptured { released, .. } if released.format(2) == "5.00"));
    assert_eq!(balance(&state, 1), "15.00");
    assert_eq!(available(&state, 1), "15.00");
    assert_eq!(
        run(&mut state, "c2", MoneyAction::ReleaseHold { hold: HoldId(1) }),
        Err(Rejection::HoldAlreadyResolved)
    );
    // A hold expires at its time-to-live through a tick, with no request for it.
    run(&mut state, "h2", hold(1, "5.00", false)).unwrap();
    assert_eq!(state.next_due().map(|due| due <= START + 60_000), Some(true));
    state.apply(&Command::Tick, START + 59_999).unwrap();
    assert_eq!(available(&state, 1), "10.00");
    let expired = state.apply(&Command::Tick, START + 60_000).unwrap();
    assert!(matches!(expired, Receipt::Expired { ref holds, .. } if holds == &vec![HoldId(2)]));
    assert_eq!(available(&state, 1), "15.00");
    assert!(state.check_invariants().is_empty());
}

#[test]
fn grants_expire_to_expired_credits_except_what_a_hold_reserved() {
    let mut state = ledger(2);
    run(&mut state, "g", promo(1, "10.00", 1, Some(START + 1_000))).unwrap();
    run(&mut state, "h", hold(1, "4.00", false)).unwrap();
    state.apply(&Command::Tick, START + 1_000).unwrap();
    // 6.00 expired; 4.00 stays reserved for the hold.
    assert_eq!(balance(&state, 1), "4.00");
    assert_eq!(state.system_balance(usd(), SystemAccount::ExpiredCredits).format(2), "6.00");
    run_at(&mut state, "r", MoneyAction::ReleaseHold { hold: HoldId(1) }, START + 2_000).unwrap();
    state.apply(&Command::Tick, START + 2_000).unwrap();
    assert_eq!(balance(&state, 1), "0.00");
    assert_eq!(state.system_balance(usd(), SystemAccount::ExpiredCredits).format(2), "10.00");
    assert!(state.check_invariants().is_empty());
}

#[test]
fn grants_are_spent_by_priority_then_expiry_then_age() {
    let mut state = ledger(2);
    run(&mut state, "a", promo(1, "1.00", 5, None)).unwrap(); // grant 1
    run(&mut state, "b", promo(1, "1.00", 1, Some(START + 9_000))).unwrap(); // grant 2
    run(&mut state, "c", promo(1, "1.00", 1, Some(START + 5_000))).unwrap(); // grant 3
    run(&mut state, "d", promo(1, "1.00", 1, Some(START + 5_000))).unwrap(); // grant 4
    run(&mut state, "m", credit(1, "1.00")).unwrap();
    let Receipt::Posted { operation, .. } = run(&mut state, "t", transfer(1, 2, "4.50")).unwrap() else { panic!() };
    let order: Vec<u64> = operation.legs[0].grants.iter().map(|g| g.grant.0).collect();
    assert_eq!(order, vec![3, 4, 2, 1]);
    assert_eq!(balance(&state, 1), "0.50");
}

#[test]
fn repeats_answer_the_first_result() {
    let mut state = ledger(2);
    let first = run(&mut state, "same", credit(1, "5.00")).unwrap();
    let again = run(&mut state, "same", credit(1, "5.00")).unwrap();
    assert_eq!(again, Receipt::Replayed(first.reference()));
    assert_eq!(balance(&state, 1), "5.00");
    // Keys of another scope never collide with this one.
    let other = state
        .apply(&Command::Move { key: IdempotencyKey::new("other", "same").unwrap(), action: credit(1, "5.00") }, START);
    assert!(matches!(other, Ok(Receipt::Posted { .. })));
}

#[test]
fn an_organization_acting_for_itself_cannot_touch_another_organizations_money() {
    let mut state = ledger(2);
    run(&mut state, "fund", credit(2, "10.00")).unwrap();
    run(&mut state, "hold", hold(2, "1.00", false)).unwrap();
    run(&mut state, "grant", promo(2, "1.00", 1, None)).unwrap();
    let before = state.clone();
    let as_org_1 =
        |name: &str, action: MoneyAction| Command::MoveAs { actor: OrganizationId(1), key: key(name), action };
    let cases = [
        (as_org_1("a", transfer(2, 1, "1.00")), Rejection::WalletNotFound),
        (as_org_1("b", hold(2, "1.00", false)), Rejection::WalletNotFound),
        (
            as_org_1("c", MoneyAction::CaptureHold { hold: HoldId(1), amount: None, to: WalletId(1), fee: Fee::None }),
            Rejection::HoldNotFound,
        ),
        (as_org_1("d", MoneyAction::ReleaseHold { hold: HoldId(1) }), Rejection::HoldNotFound),
        (as_org_1("e", MoneyAction::VoidGrant { grant: GrantId(1), reason: String::new() }), Rejection::GrantNotFound),
    ];
    for (command, expected) in cases {
        assert_eq!(state.apply(&command, START), Err(expected), "{command:?}");
        assert_eq!(state, before);
    }
    // Its own wallet works, and paying into another organization's wallet is allowed.
    run(&mut state, "fund1", credit(1, "2.00")).unwrap();
    assert!(state.apply(&as_org_1("f", transfer(1, 2, "1.00")), START).is_ok());
}
