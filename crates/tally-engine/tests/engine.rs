//! The engine's integration tests: durability across restarts, failed commits, timers
//! and back-pressure, against the real SQLite store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tally_engine::*;
use tally_ledger::*;
use tally_store::{JournalBatch, Loaded, Snapshots, SqliteStore, Store, StoreError};

const START: Timestamp = 1_700_000_000_000;

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn credit(wallet: u64, amount: &str, name: &str) -> Command {
    Command::Move {
        key: IdempotencyKey::new("t", name).unwrap(),
        action: MoneyAction::Credit {
            wallet: WalletId(wallet),
            amount: Money::parse(amount, "USD").unwrap(),
            kind: CreditKind::TopUp,
            source: AdjustmentSource::ExternalFunding,
            grant: None,
            reason: String::new(),
        },
    }
}

fn setup(handle: &Handle, wallets: u64) {
    for id in 1..=wallets {
        handle.execute(Command::CreateOrganization { name: format!("org {id}"), roles: Roles::default() }).unwrap();
        handle
            .execute(Command::CreateWallet {
                organization: OrganizationId(id),
                currency: usd(),
                low_balance_threshold: None,
                additional: false,
            })
            .unwrap();
    }
}

fn balance(handle: &Handle, wallet: u64) -> String {
    handle.read(move |state| state.wallet(WalletId(wallet)).unwrap().balance().format(2)).unwrap()
}

fn start<S: Store>(store: S, clock: Arc<ManualClock>) -> Engine {
    Engine::start(store, clock, EngineConfig::default(), None).unwrap()
}

#[test]
fn answered_writes_survive_a_restart_and_keys_stay_known() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("t.db");
    let clock = Arc::new(ManualClock::new(START));
    let engine = start(SqliteStore::open(&path).unwrap(), clock.clone());
    let handle = engine.handle();
    setup(&handle, 2);
    let first = handle.execute(credit(1, "12.34", "a")).unwrap();
    engine.shutdown();
    let engine = start(SqliteStore::open(&path).unwrap(), clock);
    let handle = engine.handle();
    assert_eq!(balance(&handle, 1), "12.34");
    assert_eq!(handle.execute(credit(1, "12.34", "a")).unwrap(), Receipt::Replayed(first.reference()));
    assert_eq!(handle.execute(credit(1, "99.00", "a")), Err(EngineError::Rejected(Rejection::IdempotencyKeyMismatch)));
    assert_eq!(balance(&handle, 1), "12.34");
}

/// A store whose commits fail while `failing` is set, like a full or vanished disk.
struct FlakyStore {
    inner: SqliteStore,
    failing: Arc<AtomicBool>,
}

impl Store for FlakyStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        self.inner.load()
    }
    fn commit(&mut self, batches: &[JournalBatch<'_>]) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt { what: "test", seq: batches[0].seq, detail: "disk unplugged".into() });
        }
        self.inner.commit(batches)
    }
    fn snapshots(&self) -> Result<Box<dyn Snapshots>, StoreError> {
        self.inner.snapshots()
    }
}

#[test]
fn a_failed_commit_fails_its_batch_and_memory_returns_to_disk() {
    let directory = tempfile::tempdir().unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let store =
        FlakyStore { inner: SqliteStore::open(directory.path().join("t.db")).unwrap(), failing: failing.clone() };
    let engine = start(store, Arc::new(ManualClock::new(START)));
    let handle = engine.handle();
    setup(&handle, 1);
    handle.execute(credit(1, "10.00", "ok")).unwrap();
    failing.store(true, Ordering::SeqCst);
    assert!(matches!(handle.execute(credit(1, "5.00", "lost")), Err(EngineError::Storage(_))));
    failing.store(false, Ordering::SeqCst);
    // The failed credit is not in memory: the balance is the durable one, and the same
    // key can be used again because nothing was recorded for it.
    assert_eq!(balance(&handle, 1), "10.00");
    assert!(matches!(handle.execute(credit(1, "5.00", "lost")), Ok(Receipt::Posted { .. })));
    assert_eq!(balance(&handle, 1), "15.00");
    assert_eq!(handle.stats().storage_failures.load(Ordering::Relaxed), 1);
}

#[test]
fn holds_expire_on_time_without_any_request() {
    let directory = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let engine = start(SqliteStore::open(directory.path().join("t.db")).unwrap(), clock.clone());
    let handle = engine.handle();
    setup(&handle, 1);
    handle.execute(credit(1, "10.00", "fund")).unwrap();
    let hold = Command::Move {
        key: IdempotencyKey::new("t", "hold").unwrap(),
        action: MoneyAction::PlaceHold {
            wallet: WalletId(1),
            amount: Money::parse("4.00", "USD").unwrap(),
            ttl_ms: 5_000,
            exclusive: false,
            payee: None,
            product: None,
            description: String::new(),
        },
    };
    handle.execute(hold).unwrap();
    let available = |h: &Handle| h.read(|s| s.wallet(WalletId(1)).unwrap().available().format(2)).unwrap();
    assert_eq!(available(&handle), "6.00");
    clock.advance(5_000);
    let active = |h: &Handle| h.read(|s| s.holds.len()).unwrap();
    // The writer wakes on its own at least every 50 ms; give it a generous while.
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        if active(&handle) == 0 {
            break;
        }
    }
    assert_eq!(active(&handle), 0, "the hold did not expire on its own");
    assert_eq!(available(&handle), "10.00");
}

/// A store whose commits wait at a gate, so the queue behind them fills up.
struct GatedStore {
    inner: SqliteStore,
    gate: Arc<Mutex<()>>,
}

impl Store for GatedStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        self.inner.load()
    }
    fn commit(&mut self, batches: &[JournalBatch<'_>]) -> Result<(), StoreError> {
        let _open = self.gate.lock().unwrap();
        self.inner.commit(batches)
    }
    fn snapshots(&self) -> Result<Box<dyn Snapshots>, StoreError> {
        self.inner.snapshots()
    }
}

#[test]
fn a_full_queue_answers_busy_instead_of_growing() {
    let directory = tempfile::tempdir().unwrap();
    let gate = Arc::new(Mutex::new(()));
    let store = GatedStore { inner: SqliteStore::open(directory.path().join("t.db")).unwrap(), gate: gate.clone() };
    let config = EngineConfig { queue_capacity: 8, batch_size_max: 1, ..EngineConfig::default() };
    let engine = Engine::start(store, Arc::new(ManualClock::new(START)), config, None).unwrap();
    let handle = engine.handle();
    setup(&handle, 1);
    let closed = gate.lock().unwrap();
    let mut busy = 0;
    let (sender, receiver) = crossbeam_channel::unbounded();
    for n in 0..100 {
        let sender = sender.clone();
        match handle.submit(
            Request::Command(credit(1, "1.00", &format!("b{n}"))),
            Box::new(move |outcome| {
                let _ = sender.send(outcome.is_ok());
            }),
        ) {
            Ok(()) => {}
            Err(EngineError::Busy) => busy += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    drop(closed);
    drop(sender);
    let accepted: Vec<bool> = receiver.iter().collect();
    assert!(busy > 0, "a bounded queue must refuse when full");
    assert_eq!(accepted.len() + busy, 100);
    assert!(accepted.iter().all(|ok| *ok));
    assert_eq!(balance(&handle, 1), format!("{}.00", accepted.len()));
}

#[test]
fn a_grant_expiring_under_a_hold_is_still_expired_after_a_crash_restart() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("t.db");
    let clock = Arc::new(ManualClock::new(START));
    let config = EngineConfig { snapshot_on_shutdown: false, ..EngineConfig::default() };
    let engine = Engine::start(SqliteStore::open(&path).unwrap(), clock.clone(), config.clone(), None).unwrap();
    let handle = engine.handle();
    setup(&handle, 1);
    let grant = Command::Move {
        key: IdempotencyKey::new("t", "grant").unwrap(),
        action: MoneyAction::Credit {
            wallet: WalletId(1),
            amount: Money::parse("3.00", "USD").unwrap(),
            kind: CreditKind::Adjustment,
            source: AdjustmentSource::Promotions,
            grant: Some(GrantSpec {
                category: GrantCategory::Promotional,
                priority: 1,
                expires_at: Some(START + 1_000),
                applicability: None,
            }),
            reason: String::new(),
        },
    };
    handle.execute(grant).unwrap();
    let hold = Command::Move {
        key: IdempotencyKey::new("t", "hold").unwrap(),
        action: MoneyAction::PlaceHold {
            wallet: WalletId(1),
            amount: Money::parse("3.00", "USD").unwrap(),
            ttl_ms: 600_000,
            exclusive: false,
            payee: None,
            product: None,
            description: String::new(),
        },
    };
    handle.execute(hold).unwrap();
    clock.advance(2_000);
    let status = |h: &Handle| h.read(|s| s.grant(GrantId(1)).unwrap().status).unwrap();
    for _ in 0..100 {
        if status(&handle) == GrantStatus::Expired {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(&handle), GrantStatus::Expired);
    engine.shutdown();
    // No snapshot was written: the restart replays the journal, ticks included.
    let engine = Engine::start(SqliteStore::open(&path).unwrap(), clock, config, None).unwrap();
    assert_eq!(status(&engine.handle()), GrantStatus::Expired, "replay lost the tick that expired the grant");
}

#[test]
fn settings_are_journaled_so_a_replay_from_nothing_matches() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("t.db");
    let config = EngineConfig {
        settings: Settings { idempotency_retention_ms: 48 * 3_600_000, ..Settings::default() },
        snapshot_on_shutdown: true,
        ..EngineConfig::default()
    };
    let engine =
        Engine::start(SqliteStore::open(&path).unwrap(), Arc::new(ManualClock::new(START)), config, None).unwrap();
    let handle = engine.handle();
    setup(&handle, 1);
    handle.execute(credit(1, "1.00", "k")).unwrap();
    assert_eq!(handle.read(|s| s.settings.idempotency_retention_ms).unwrap(), 48 * 3_600_000);
    engine.shutdown();
    let report = tally_store::deep_check(&mut SqliteStore::open(&path).unwrap(), |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A merchant (org 1, wallet 1) with a `calls` meter at 0.10, and a consumer (org 2,
/// wallet 2) with 1.00, subscribed.
fn billing_setup(handle: &Handle) {
    setup(handle, 2);
    handle
        .execute(Command::UpdateOrganization {
            organization: OrganizationId(1),
            roles: Roles { merchant: true, consumer: false },
            billing: None,
        })
        .unwrap();
    handle.execute(credit(2, "1.00", "fund")).unwrap();
    handle
        .execute(Command::CreateMeter {
            merchant: OrganizationId(1),
            code: "calls".into(),
            unit: "call".into(),
            aggregation: billing::Aggregation::Count,
            product: None,
        })
        .unwrap();
    let unit_price = Amount::parse("0.10").unwrap();
    let spec = billing::PlanSpec {
        merchant: OrganizationId(1),
        name: "calls".into(),
        currency: usd(),
        period: billing::BillingPeriod::Month,
        recurring_fee: None,
        prices: vec![billing::Price { meter: MeterId(1), model: billing::PriceModel::PerUnit { unit_price } }],
        platform_fee: None,
        replaces: None,
    };
    handle.execute(Command::CreatePlan { spec }).unwrap();
    handle.execute(Command::Subscribe { consumer: OrganizationId(2), plan: PlanId(1) }).unwrap();
}

fn call(id: &str, at: Timestamp) -> Command {
    Command::Usage {
        merchant: OrganizationId(1),
        events: vec![UsageEvent {
            key: IdempotencyKey::new("usage:org_1", id).unwrap(),
            consumer: OrganizationId(2),
            meter: "calls".into(),
            quantity: billing::Quantity::ONE,
            at,
            properties: Vec::new(),
            reservation: None,
            finish: false,
        }],
    }
}

fn usage_outcome(receipt: Receipt) -> Result<UsageCharge, Rejection> {
    match receipt {
        Receipt::Usage { mut results } => results.remove(0),
        other => panic!("usage answered {other:?}"),
    }
}

#[test]
fn usage_event_ids_stay_known_across_restarts_for_seven_days() {
    for snapshot_on_shutdown in [true, false] {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("t.db");
        let clock = Arc::new(ManualClock::new(START));
        let config = EngineConfig { snapshot_on_shutdown, ..EngineConfig::default() };
        let engine = Engine::start(SqliteStore::open(&path).unwrap(), clock.clone(), config.clone(), None).unwrap();
        let handle = engine.handle();
        billing_setup(&handle);
        assert!(usage_outcome(handle.execute(call("e1", START)).unwrap()).is_ok());
        engine.shutdown();
        // Six days later, after a restart (from a snapshot, or replaying the journal),
        // the same event id is still a duplicate.
        clock.advance(6 * 24 * 3600 * 1000);
        let engine = Engine::start(SqliteStore::open(&path).unwrap(), clock.clone(), config, None).unwrap();
        let handle = engine.handle();
        let again = usage_outcome(handle.execute(call("e1", clock.now())).unwrap());
        assert_eq!(again, Err(Rejection::DuplicateEvent), "snapshot_on_shutdown = {snapshot_on_shutdown}");
        assert_eq!(balance(&handle, 2), "0.90");
        assert!(usage_outcome(handle.execute(call("e2", clock.now())).unwrap()).is_ok());
        assert_eq!(balance(&handle, 2), "0.80");
        engine.shutdown();
    }
}

#[test]
fn periodic_snapshots_are_rebuilt_off_the_writer_and_a_restart_starts_from_the_newest() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("t.db");
    let clock = Arc::new(ManualClock::new(START));
    let config = EngineConfig { snapshot_every_commands: 20, snapshot_on_shutdown: false, ..EngineConfig::default() };
    let engine = Engine::start(SqliteStore::open(&path).unwrap(), clock.clone(), config.clone(), None).unwrap();
    let handle = engine.handle();
    setup(&handle, 2);
    for n in 0..100 {
        handle.execute(credit(1 + n % 2, "1.00", &format!("c{n}"))).unwrap();
    }
    // The snapshot thread looks every few milliseconds; give it a generous while.
    let snapshot_dir = tally_store::snapshot_dir(&path);
    let newest = || {
        std::fs::read_dir(&snapshot_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".snapshot")?.parse::<u64>().ok())
                    .max()
            })
            .ok()
            .flatten()
    };
    for _ in 0..250 {
        if newest().is_some_and(|seq| seq >= 80) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let snapshot_seq = newest().expect("a periodic snapshot was written");
    // One is due at least every 20 commands, so one follows record 80 or later.
    assert!(snapshot_seq >= 80, "the newest snapshot ({snapshot_seq}) should cover most of the 105 records");
    // Written while the engine ran and after: the shutdown writes none (turned off).
    handle.execute(credit(1, "5.00", "after")).unwrap();
    engine.shutdown();

    let mut store = SqliteStore::open(&path).unwrap();
    let from_snapshot = store.load().unwrap();
    let from_scratch = store.load_with(true).unwrap();
    assert!(from_snapshot.replayed_commands <= 26, "replayed {} commands", from_snapshot.replayed_commands);
    assert!(from_scratch.replayed_commands >= 105);
    assert_eq!(from_snapshot.seq, from_scratch.seq);
    assert_eq!(from_snapshot.state, from_scratch.state);
    let engine = Engine::start(store, clock, config, None).unwrap();
    assert_eq!(balance(&engine.handle(), 1), "55.00");
    assert_eq!(balance(&engine.handle(), 2), "50.00");
}

#[test]
fn a_snapshot_left_beside_another_database_is_ignored() {
    let directory = tempfile::tempdir().unwrap();
    let (first, second) = (directory.path().join("a.db"), directory.path().join("b.db"));
    let clock = Arc::new(ManualClock::new(START));
    let engine = start(SqliteStore::open(&first).unwrap(), clock.clone());
    setup(&engine.handle(), 1);
    engine.handle().execute(credit(1, "7.00", "a")).unwrap();
    engine.shutdown();
    // Another database, started later, with as many journal records, gets the first one's snapshots.
    clock.advance(1_000);
    let engine = Engine::start(
        SqliteStore::open(&second).unwrap(),
        clock.clone(),
        EngineConfig { snapshot_on_shutdown: false, ..EngineConfig::default() },
        None,
    )
    .unwrap();
    setup(&engine.handle(), 1);
    engine.handle().execute(credit(1, "2.00", "b")).unwrap();
    engine.shutdown();
    std::fs::rename(tally_store::snapshot_dir(&first), tally_store::snapshot_dir(&second)).unwrap();
    let mut store = SqliteStore::open(&second).unwrap();
    let loaded = store.load().unwrap();
    let from_scratch = store.load_with(true).unwrap();
    assert_eq!(loaded.replayed_commands, from_scratch.replayed_commands, "the foreign snapshot must not be used");
    assert_eq!(loaded.state.wallet(WalletId(1)).unwrap().balance().format(2), "2.00");
}
