//! The history projection: a thread that reads journal records after its watermark and
//! writes the queryable tables (operations, movements), and the reader that queries them.
//! It runs beside the writer, so history can lag the journal by a moment; readers that
//! must see a given write wait until the watermark passes it.

use crate::codec;
use crate::events::Directory;
use crate::sqlite::open_history;
use crate::StoreError;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tally_ledger::billing::Quantity;
use tally_ledger::{
    Account, Amount, Command, Currency, GrantId, GrantPortion, HoldId, IdempotencyKey, MeterId, MoneyAction, Operation,
    OperationId, OrganizationId, ProductId, Receipt, ReceiptRef, SubscriptionId, Timestamp, WalletId,
};

/// Most journal records projected per transaction, so one transaction stays bounded. A
/// full transaction means the projector is behind: it goes on without pausing.
const PROJECTION_BATCH_RECORDS: i64 = 4096;
/// While writes keep coming, the projector starts a transaction at most this often, so
/// each one carries many operations: a history page (a wallet's latest movements, an
/// organization's latest events) is then written once per transaction rather than once
/// per operation, and the WAL and its checkpoints shrink accordingly. Under a transfer
/// load over HTTP, 20 ms gave 18,805/s and 100 ms 23,907/s (30,113/s together with
/// fewer idempotency-index rows), measured side by side (BENCHMARKS.md). The price is
/// paid by a history read during heavy writes: it hurries the projector
/// ([`Projector::wait_for`]) but waits for what is not yet projected, 40-54 ms then.
const PROJECTION_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Most movements one history query returns.
pub const PAGE_SIZE_MAX: u32 = 500;

pub struct Projector {
    stop: Arc<AtomicBool>,
    watermark: Arc<AtomicU64>,
    /// New journal records are there.
    wake: crossbeam_like::Sender,
    /// A reader waits for the watermark: project now rather than gather more.
    hurry: crossbeam_like::Sender,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A tiny wake-up signal, so the projector sleeps when idle and starts at once after a commit.
mod crossbeam_like {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::Duration;

    #[derive(Clone, Default)]
    pub struct Sender(Arc<(Mutex<bool>, Condvar)>);

    impl Sender {
        pub fn notify(&self) {
            let (flag, condvar) = &*self.0;
            *flag.lock().expect("wake flag lock") = true;
            condvar.notify_one();
        }

        pub fn wait(&self, timeout: Duration) {
            let (flag, condvar) = &*self.0;
            let mut woken = flag.lock().expect("wake flag lock");
            if !*woken {
                woken = condvar.wait_timeout(woken, timeout).expect("wake flag lock").0;
            }
            *woken = false;
        }
    }
}

impl Projector {
    pub fn spawn(path: impl AsRef<Path>) -> Result<Projector, StoreError> {
        Projector::spawn_on_boot(path, boot_id().as_deref())
    }

    /// [`Projector::spawn`] as if the machine's current boot were `boot` (None: unknown,
    /// so history is written with syncs).
    pub fn spawn_on_boot(path: impl AsRef<Path>, boot: Option<&str>) -> Result<Projector, StoreError> {
        let path: PathBuf = path.as_ref().to_path_buf();
        let marker = HistoryMarker(history_marker_path(&path));
        // Written without syncs on a boot that is not this one (or on an unknown boot,
        // when this one cannot be known): the machine stopped mid-write.
        if let Some(written_on) = marker.open_on()? {
            if boot != Some(written_on.as_str()) {
                tracing::warn!(
                    history = %crate::sqlite::history_path(&path).display(),
                    "history was being written without syncs when the machine stopped; rebuilding it from the journal"
                );
                remove_history(&path)?;
            }
        }
        let mut connection = open_history(&path)?;
        let from_start = projected_from_start(&connection)?;
        let unsynced = boot.is_some() && from_start;
        match boot {
            // See [`HistoryMarker`]: no syncs while the marker says which boot writes, and
            // only on a history whose rebuild numbers its events the same.
            Some(boot) if unsynced => {
                marker.set(&format!("open {boot}"))?;
                connection.pragma_update(None, "synchronous", "OFF")?;
                connection.pragma_update(None, "wal_autocheckpoint", HISTORY_CHECKPOINT_PAGES)?;
            }
            // History can be rebuilt from the journal, so the projection need not fsync
            // each commit; checkpoints sync.
            _ => connection.pragma_update(None, "synchronous", "NORMAL")?,
        }
        let start: i64 = connection.query_row("SELECT seq FROM projection WHERE id = 1", [], |row| row.get(0))?;
        let stop = Arc::new(AtomicBool::new(false));
        let watermark = Arc::new(AtomicU64::new(start as u64));
        let wake = crossbeam_like::Sender::default();
        let hurry = crossbeam_like::Sender::default();
        let thread = {
            let (stop, watermark, wake, hurry) = (stop.clone(), watermark.clone(), wake.clone(), hurry.clone());
            std::thread::Builder::new()
                .name("tally-projector".into())
                .spawn(move || {
                    let mut wallets = WalletOwners::default();
                    while !stop.load(Ordering::Acquire) {
                        let started = std::time::Instant::now();
                        match project_some(&mut connection, watermark.load(Ordering::Acquire), &mut wallets) {
                            Ok(Some((seq, records))) => {
                                watermark.store(seq, Ordering::Release);
                                let behind = records >= PROJECTION_BATCH_RECORDS as usize;
                                match PROJECTION_INTERVAL_MIN.checked_sub(started.elapsed()) {
                                    Some(rest) if !behind => hurry.wait(rest),
                                    _ => {}
                                }
                            }
                            Ok(None) => wake.wait(Duration::from_millis(50)),
                            Err(error) => {
                                tracing::error!(%error, "history projection failed; retrying");
                                std::thread::sleep(Duration::from_millis(500));
                            }
                        }
                    }
                    if unsynced {
                        if let Err(error) = close_history(&connection, &path, &marker) {
                            tracing::warn!(%error, "history could not be synced on close; it is rebuilt if the machine stops first");
                        }
                    }
                })
                .expect("spawn projector thread")
        };
        Ok(Projector { stop, watermark, wake, hurry, thread: Mutex::new(Some(thread)) })
    }

    /// Stops the projection, syncing history first; what is not yet projected is
    /// projected by the next start.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify();
        self.hurry.notify();
        if let Some(thread) = self.thread.lock().expect("projector thread lock").take() {
            let _ = thread.join();
        }
    }

    /// The journal sequence up to which history is queryable.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// Tells the projector that new journal records are there.
    pub fn notify(&self) {
        self.wake.notify();
    }

    /// Waits until history includes journal sequence `seq`, or the timeout passes.
    pub fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.watermark() < seq {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            self.notify();
            self.hurry.notify();
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether this history was projected from the journal's first record by a build that
/// derives events, so that projecting the journal again gives every event the same id
/// (webhook deliveries, the NATS sink and clients' cursors name events by id). A file
/// that nothing has been projected into yet is marked so now; an older file, whose
/// events began partway through the journal, never is: it keeps syncing, and a rebuild
/// of it renumbers its events (`tally admin rebuild-history --renumber-events`).
fn projected_from_start(connection: &Connection) -> Result<bool, StoreError> {
    let (seq, from_start): (i64, bool) =
        connection.query_row("SELECT seq, from_start FROM projection WHERE id = 1", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    if seq == 0 && !from_start {
        connection.execute("UPDATE projection SET from_start = 1 WHERE id = 1", [])?;
        return Ok(true);
    }
    Ok(from_start)
}

/// History's write pages per checkpoint. Unsynced, a checkpoint is a copy within the
/// page cache, so it can be large: a page that many transactions dirty (a busy
/// wallet's latest movements) is copied once per checkpoint, not once per transaction.
const HISTORY_CHECKPOINT_PAGES: i64 = 10_000;

/// The file beside history that says whether history is being written without syncs,
/// and on which boot of the machine. History is derived from the journal, so it is
/// written with `synchronous=OFF`: no fsync at all, which under usage load halved the
/// disk writes and lifted single usage events over HTTP from 30,110/s to 33,386/s
/// (BENCHMARKS.md). That is safe against the process dying (the kernel has every
/// write), not against the machine stopping (unsynced pages are lost, and the file may
/// be corrupt). So before writing, the projector records `open <boot id>` here
/// (synced), and after a clean stop (history checkpointed and synced) `closed`; a start
/// that finds `open` with another boot's id knows the machine stopped mid-write, and
/// rebuilds history from the journal.
struct HistoryMarker(PathBuf);

impl HistoryMarker {
    /// The boot that was writing history without syncs, if a stop did not close it.
    fn open_on(&self) -> Result<Option<String>, StoreError> {
        match std::fs::read_to_string(&self.0) {
            Ok(text) => Ok(text.trim().strip_prefix("open ").map(str::to_string)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Replaces the marker durably: a new file, synced, renamed over the old one, and
    /// the directory synced.
    fn set(&self, text: &str) -> Result<(), StoreError> {
        use std::io::Write;
        let fresh = self.0.with_extension("new");
        let mut file = std::fs::File::create(&fresh)?;
        file.write_all(format!("{text}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&fresh, &self.0)?;
        if let Some(directory) = self.0.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(directory)?.sync_all()?;
        }
        Ok(())
    }
}

fn history_marker_path(path: &Path) -> PathBuf {
    path.with_extension("history.state")
}

/// This boot of the machine (Linux), if it can be known.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|id| !id.is_empty())
}

/// Whether rebuilding the history beside `path` would give its events other ids than
/// they have (see [`projected_from_start`]); false when there is no history yet.
pub fn rebuild_renumbers_events(path: &Path) -> Result<bool, StoreError> {
    if !crate::sqlite::history_path(path).exists() {
        return Ok(false);
    }
    Ok(!projected_from_start(&open_history(path)?)?)
}

/// The history database's files: the database, its WAL and its shared-memory index.
fn history_files(path: &Path) -> [PathBuf; 3] {
    let history = crate::sqlite::history_path(path);
    let beside = |suffix: &str| PathBuf::from(format!("{}{suffix}", history.display()));
    [beside("-wal"), beside("-shm"), history]
}

/// Deletes the history database and its WAL (with the marker), to be projected again.
pub fn remove_history(path: &Path) -> Result<(), StoreError> {
    let [wal, shm, history] = history_files(path);
    for file in [history, wal, shm, history_marker_path(path)] {
        match std::fs::remove_file(&file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        }
    }
    Ok(())
}

/// Syncs history and marks it closed: a checkpoint (a reader may keep it from finishing,
/// which is fine), then both files synced whatever SQLite wrote to them.
fn close_history(connection: &Connection, path: &Path, marker: &HistoryMarker) -> Result<(), StoreError> {
    connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let [wal, _, history] = history_files(path);
    for file in [wal, history] {
        match std::fs::File::open(&file) {
            Ok(open) => open.sync_all()?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error.into()),
        }
    }
    marker.set("closed")
}

fn grants_text(grants: &[GrantPortion]) -> String {
    let parts: Vec<String> = grants.iter().map(|g| format!("{}:{}", g.grant.0, g.amount.units())).collect();
    parts.join(",")
}

fn parse_grants(text: &str) -> Vec<GrantPortion> {
    text.split(',')
        .filter(|part| !part.is_empty())
        .filter_map(|part| {
            let (grant, amount) = part.split_once(':')?;
            Some(GrantPortion { grant: GrantId(grant.parse().ok()?), amount: Amount::from_units(amount.parse().ok()?) })
        })
        .collect()
}

/// Records charged usage events and what each charge was for.
fn project_billing(
    command: &Command,
    receipt: &Receipt,
    seq: u64,
    insert_usage: &mut rusqlite::CachedStatement<'_>,
    insert_charge: &mut rusqlite::CachedStatement<'_>,
) -> Result<(), StoreError> {
    match (command, receipt) {
        (Command::Usage { events, .. }, Receipt::Usage { results }) => {
            for (event, result) in events.iter().zip(results) {
                let Ok(charge) = result else { continue };
                let operation = charge.operation.as_ref();
                insert_usage.execute(params![
                    &event.key.0.to_le_bytes()[..],
                    seq as i64,
                    charge.subscription.0 as i64,
                    charge.meter.0 as i64,
                    charge.dimension.map(i64::from),
                    charge.period_start,
                    event.at,
                    charge.quantity.0.to_string(),
                    charge.amount.units().to_string(),
                    charge.fee.units().to_string(),
                    operation.map(|o| o.id.0 as i64),
                    charge.reservation.map(|h| h.0 as i64),
                    charge.released.map(|r| r.units().to_string()),
                    operation.map(|o| o.legs[0].balance_after.units().to_string()),
                ])?;
                if let Some(operation) = operation {
                    insert_charge.execute(params![
                        operation.id.0 as i64,
                        charge.subscription.0 as i64,
                        charge.product.map(|p| p.0 as i64),
                        charge.meter.0 as i64,
                    ])?;
                }
            }
        }
        (_, Receipt::Subscription { subscription, fee: Some(operation), .. }) => {
            insert_charge.execute(params![operation.id.0 as i64, subscription.0 as i64, None::<i64>, None::<i64>])?;
        }
        (_, Receipt::Expired { renewals, .. }) => {
            for renewal in renewals {
                if let Some(operation) = &renewal.fee {
                    insert_charge.execute(params![
                        operation.id.0 as i64,
                        renewal.subscription.0 as i64,
                        None::<i64>,
                        None::<i64>
                    ])?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The projector's directory of who owns what, kept in history tables.
struct SqlDirectory<'a> {
    transaction: &'a rusqlite::Transaction<'a>,
    wallets: &'a mut WalletOwners,
}

/// Wallets' owners and currencies as the projector has looked them up: they never
/// change, so every charge need not ask the directory table again. Bounded: it starts
/// over when full.
#[derive(Default)]
struct WalletOwners(std::collections::HashMap<WalletId, (OrganizationId, Currency)>);

/// Most wallets [`WalletOwners`] remembers.
const WALLET_OWNERS_MAX: usize = 1 << 20;

impl SqlDirectory<'_> {
    fn wallet_from_table(&self, wallet: WalletId) -> Option<(OrganizationId, Currency)> {
        let mut statement = self
            .transaction
            .prepare_cached("SELECT organization, currency FROM directory_wallets WHERE wallet = ?1")
            .ok()?;
        let (organization, currency): (i64, String) =
            statement.query_row(params![wallet.0 as i64], |row| Ok((row.get(0)?, row.get(1)?))).ok()?;
        Some((OrganizationId(organization as u64), Currency::parse(&currency).ok()?))
    }
}

impl Directory for SqlDirectory<'_> {
    fn wallet(&mut self, wallet: WalletId) -> Option<(OrganizationId, Currency)> {
        if let Some(known) = self.wallets.0.get(&wallet) {
            return Some(*known);
        }
        let found = self.wallet_from_table(wallet)?;
        if self.wallets.0.len() >= WALLET_OWNERS_MAX {
            self.wallets.0.clear();
        }
        self.wallets.0.insert(wallet, found);
        Some(found)
    }

    fn hold_wallet(&mut self, hold: HoldId) -> Option<WalletId> {
        let mut statement =
            self.transaction.prepare_cached("SELECT wallet FROM directory_holds WHERE hold = ?1").ok()?;
        let wallet: i64 = statement.query_row(params![hold.0 as i64], |row| row.get(0)).ok()?;
        Some(WalletId(wallet as u64))
    }

    fn subscription(&mut self, subscription: SubscriptionId) -> Option<(OrganizationId, OrganizationId)> {
        let mut statement = self
            .transaction
            .prepare_cached("SELECT consumer, merchant FROM directory_subscriptions WHERE subscription = ?1")
            .ok()?;
        let (consumer, merchant): (i64, i64) =
            statement.query_row(params![subscription.0 as i64], |row| Ok((row.get(0)?, row.get(1)?))).ok()?;
        Some((OrganizationId(consumer as u64), OrganizationId(merchant as u64)))
    }
}

/// Records the objects a command created in the directory, then its events.
fn project_events(
    transaction: &rusqlite::Transaction<'_>,
    wallets: &mut WalletOwners,
    command: &Command,
    receipt: &Receipt,
    seq: u64,
    at: Timestamp,
) -> Result<(), StoreError> {
    let wallet = |wallet: WalletId, organization: OrganizationId, currency: Currency| {
        transaction
            .prepare_cached(
                "INSERT OR REPLACE INTO directory_wallets (wallet, organization, currency) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![wallet.0 as i64, organization.0 as i64, currency.code()])
    };
    let hold = |hold: HoldId, wallet: WalletId| {
        transaction
            .prepare_cached("INSERT OR REPLACE INTO directory_holds (hold, wallet) VALUES (?1, ?2)")?
            .execute(params![hold.0 as i64, wallet.0 as i64])
    };
    match (command, receipt) {
        (Command::CreateWallet { organization, currency, .. }, Receipt::WalletCreated(id)) => {
            wallet(*id, *organization, *currency)?;
        }
        (Command::CreatePlan { spec }, Receipt::PlanCreated { plan, wallet_created }) => {
            if let Some(id) = wallet_created {
                wallet(*id, spec.merchant, spec.currency)?;
            }
            transaction
                .prepare_cached(
                    "INSERT OR REPLACE INTO directory_plans (plan, merchant, currency) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![plan.0 as i64, spec.merchant.0 as i64, spec.currency.code()])?;
        }
        (Command::Subscribe { consumer, plan }, Receipt::Subscription { subscription, wallet_created, .. }) => {
            let found: Option<(i64, String)> = transaction
                .prepare_cached("SELECT merchant, currency FROM directory_plans WHERE plan = ?1")?
                .query_row(params![plan.0 as i64], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            if let Some((merchant, currency)) = found {
                if let (Some(id), Ok(currency)) = (wallet_created, Currency::parse(&currency)) {
                    wallet(*id, *consumer, currency)?;
                }
                transaction
                    .prepare_cached(
                        "INSERT OR REPLACE INTO directory_subscriptions (subscription, consumer, merchant) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![subscription.0 as i64, consumer.0 as i64, merchant])?;
            }
        }
        (
            Command::Move { action: MoneyAction::PlaceHold { wallet, .. }, .. }
            | Command::MoveAs { action: MoneyAction::PlaceHold { wallet, .. }, .. },
            Receipt::HoldPlaced { hold: id, .. },
        ) => {
            hold(*id, *wallet)?;
        }
        (_, Receipt::Reserved { hold: id, wallet, .. }) => {
            hold(*id, *wallet)?;
        }
        _ => {}
    }
    let events = crate::events::derive(command, receipt, &mut SqlDirectory { transaction, wallets });
    if events.is_empty() {
        return Ok(());
    }
    let mut insert = transaction.prepare_cached(
        "INSERT INTO events (seq, type, organization, object, at, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for event in events {
        insert.execute(params![
            seq as i64,
            event.kind,
            event.organization.map(|o| o.0 as i64),
            event.object,
            at,
            // An operation's own event stores no copy of it; the reader rebuilds it.
            if event.data.is_null() { String::new() } else { event.data.to_string() },
        ])?;
    }
    Ok(())
}

/// Projects up to a batch of journal records after `after`; returns the new watermark.
fn project_some(
    connection: &mut Connection,
    after: u64,
    wallets: &mut WalletOwners,
) -> Result<Option<(u64, usize)>, StoreError> {
    let transaction = connection.transaction()?;
    let mut last = None;
    let mut records = 0;
    {
        let mut select = transaction.prepare_cached(
            "SELECT seq, commands, receipts, at FROM ledger.journal WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut insert_key = transaction
            .prepare_cached("INSERT OR REPLACE INTO idempotency_index (key, seq, position) VALUES (?1, ?2, ?3)")?;
        let mut insert_operation = transaction.prepare_cached(
            "INSERT OR REPLACE INTO operations (id, seq, kind, currency, at, legs) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut insert_movement = transaction.prepare_cached(
            "INSERT OR REPLACE INTO movements (wallet_id, operation_id, kind, at, amount, balance_after, grants)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut insert_usage = transaction.prepare_cached(
            "INSERT INTO usage_records (key, seq, subscription, meter, dimension, period_start, event_at,
                quantity, amount, fee, operation_id, reservation, released, balance_after)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        let mut insert_charge = transaction.prepare_cached(
            "INSERT OR REPLACE INTO charge_details (operation_id, subscription, product, meter) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut rows = select.query(params![after as i64, PROJECTION_BATCH_RECORDS])?;
        while let Some(row) = rows.next()? {
            records += 1;
            let seq = row.get::<_, i64>(0)? as u64;
            let commands = codec::decode_commands(row.get_ref(1)?.as_blob()?, seq)?;
            let receipts = codec::decode_receipts(row.get_ref(2)?.as_blob()?, seq)?;
            for (position, (command, receipt)) in commands.iter().zip(&receipts).enumerate() {
                // A request that posted an operation is found again through it (see
                // `receipt_for_key`); only the others need a row here. Keys are random, so
                // each row dirties a page of its own: a row per transfer cost a fifth of
                // the HTTP transfer rate.
                if let Command::Move { key, .. } | Command::MoveAs { key, .. } = command {
                    if receipt.reference().operation.is_none() {
                        insert_key.execute(params![&key.0.to_le_bytes()[..], seq as i64, position as i64])?;
                    }
                }
            }
            let at: i64 = row.get(3)?;
            for (command, receipt) in commands.iter().zip(&receipts) {
                project_billing(command, receipt, seq, &mut insert_usage, &mut insert_charge)?;
                project_events(&transaction, wallets, command, receipt, seq, at)?;
            }
            for receipt in &receipts {
                for operation in receipt.operations() {
                    insert_operation.execute(params![
                        operation.id.0 as i64,
                        seq as i64,
                        operation.kind.code(),
                        operation.currency.code(),
                        operation.at,
                        codec::encode(&operation.legs),
                    ])?;
                    for leg in &operation.legs {
                        if let Account::Wallet(wallet) = leg.account {
                            insert_movement.execute(params![
                                wallet.0 as i64,
                                operation.id.0 as i64,
                                operation.kind.code(),
                                operation.at,
                                leg.amount.units().to_string(),
                                leg.balance_after.units().to_string(),
                                grants_text(&leg.grants),
                            ])?;
                        }
                    }
                }
            }
            last = Some(seq);
        }
    }
    if let Some(seq) = last {
        transaction.execute("UPDATE projection SET seq = ?1 WHERE id = 1", params![seq as i64])?;
        transaction.commit()?;
    }
    Ok(last.map(|seq| (seq, records)))
}

/// One line of a wallet's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Movement {
    pub wallet: WalletId,
    pub operation: OperationId,
    pub kind: String,
    pub at: Timestamp,
    pub amount: Amount,
    pub balance_after: Amount,
    pub grants: Vec<GrantPortion>,
}

#[derive(Clone, Debug, Default)]
pub struct MovementFilter {
    /// Only movements of operations older than this one (the cursor).
    pub before: Option<OperationId>,
    pub kinds: Vec<String>,
    pub from: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub limit: u32,
}

/// An event as history keeps it; `data` is the object's JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRow {
    pub id: u64,
    pub kind: String,
    pub organization: Option<OrganizationId>,
    pub object: String,
    pub at: Timestamp,
    pub data: String,
}

#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Only events after this id (the cursor).
    pub after: u64,
    /// Only this organization's events; None for all (the platform).
    pub organization: Option<OrganizationId>,
    pub types: Vec<String>,
    pub object: Option<String>,
    pub from: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub limit: u32,
}

/// A movement from a row whose first six columns are operation_id, kind, at, amount,
/// balance_after, grants.
fn movement_row(wallet: WalletId, row: &rusqlite::Row<'_>) -> rusqlite::Result<Movement> {
    Ok(Movement {
        wallet,
        operation: OperationId(row.get::<_, i64>(0)? as u64),
        kind: row.get(1)?,
        at: row.get(2)?,
        amount: Amount::from_units(row.get::<_, String>(3)?.parse().unwrap_or_default()),
        balance_after: Amount::from_units(row.get::<_, String>(4)?.parse().unwrap_or_default()),
        grants: parse_grants(&row.get::<_, String>(5)?),
    })
}

/// A query's optional conditions, each with its bound value, then order and page size.
struct Conditions {
    sql: String,
    values: Vec<rusqlite::types::Value>,
}

impl Conditions {
    fn new(sql: &str, values: Vec<rusqlite::types::Value>) -> Conditions {
        Conditions { sql: sql.to_string(), values }
    }

    /// Adds `AND <condition>?n` when there is a value.
    fn and<T: Into<rusqlite::types::Value>>(&mut self, condition: &str, value: Option<T>) {
        if let Some(value) = value {
            self.values.push(value.into());
            self.sql.push_str(&format!(" AND {condition}?{}", self.values.len()));
        }
    }

    /// Adds `AND <column> IN (...)` when the list is not empty.
    fn and_in(&mut self, column: &str, items: &[String]) {
        if items.is_empty() {
            return;
        }
        let mut marks = Vec::with_capacity(items.len());
        for item in items {
            self.values.push(item.clone().into());
            marks.push(format!("?{}", self.values.len()));
        }
        self.sql.push_str(&format!(" AND {column} IN ({})", marks.join(",")));
    }

    fn finish(mut self, order: &str, limit: u32) -> (String, Vec<rusqlite::types::Value>) {
        self.values.push(i64::from(limit.clamp(1, PAGE_SIZE_MAX)).into());
        self.sql.push_str(&format!(" ORDER BY {order} LIMIT ?{}", self.values.len()));
        (self.sql, self.values)
    }
}

/// A charged usage event as history keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub subscription: SubscriptionId,
    pub meter: MeterId,
    pub dimension: Option<u16>,
    pub period_start: Timestamp,
    pub event_at: Timestamp,
    pub quantity: Quantity,
    pub amount: Amount,
    pub fee: Amount,
    pub operation: Option<OperationId>,
    pub reservation: Option<HoldId>,
    pub released: Option<Amount>,
    pub balance_after: Option<Amount>,
}

/// What a charge was for: the subscription, and the product and meter of usage (none
/// for a recurring fee).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChargeDetail {
    pub subscription: SubscriptionId,
    pub product: Option<ProductId>,
    pub meter: Option<MeterId>,
}

const USAGE_SELECT: &str = "SELECT subscription, meter, dimension, period_start, event_at, quantity, amount, fee,
    operation_id, reservation, released, balance_after FROM usage_records";

fn usage_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRecord> {
    let units = |text: String| text.parse::<i128>().unwrap_or_default();
    Ok(UsageRecord {
        subscription: SubscriptionId(row.get::<_, i64>(0)? as u64),
        meter: MeterId(row.get::<_, i64>(1)? as u64),
        dimension: row.get::<_, Option<i64>>(2)?.map(|d| d as u16),
        period_start: row.get(3)?,
        event_at: row.get(4)?,
        quantity: Quantity(units(row.get(5)?)),
        amount: Amount::from_units(units(row.get(6)?)),
        fee: Amount::from_units(units(row.get(7)?)),
        operation: row.get::<_, Option<i64>>(8)?.map(|o| OperationId(o as u64)),
        reservation: row.get::<_, Option<i64>>(9)?.map(|h| HoldId(h as u64)),
        released: row.get::<_, Option<String>>(10)?.map(|r| Amount::from_units(units(r))),
        balance_after: row.get::<_, Option<String>>(11)?.map(|b| Amount::from_units(units(b))),
    })
}

/// Read-only queries of the projected history, on a connection of its own.
pub struct HistoryReader {
    connection: Connection,
}

impl HistoryReader {
    pub fn open(path: impl AsRef<Path>) -> Result<HistoryReader, StoreError> {
        let connection = open_history(path.as_ref())?;
        Ok(HistoryReader { connection })
    }

    pub fn projected_seq(&self) -> Result<u64, StoreError> {
        let seq: i64 = self.connection.query_row("SELECT seq FROM projection WHERE id = 1", [], |row| row.get(0))?;
        Ok(seq as u64)
    }

    /// A wallet's movements, newest first.
    pub fn movements(&self, wallet: WalletId, filter: &MovementFilter) -> Result<Vec<Movement>, StoreError> {
        let mut query = Conditions::new(
            "SELECT operation_id, kind, at, amount, balance_after, grants FROM movements WHERE wallet_id = ?1 AND operation_id < ?2",
            vec![(wallet.0 as i64).into(), filter.before.map(|o| o.0 as i64).unwrap_or(i64::MAX).into()],
        );
        query.and("at >= ", filter.from);
        query.and("at < ", filter.until);
        query.and_in("kind", &filter.kinds);
        let (sql, values) = query.finish("operation_id DESC", filter.limit);
        let mut statement = self.connection.prepare_cached(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(values), |row| movement_row(wallet, row))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The receipt a money-moving request got the first time its key was used, once
    /// history has caught up with it; an HTTP replay renders the same answer from it.
    /// `reference` is what the ledger remembers of that first answer: when it names an
    /// operation, the journal record that posted the operation holds the request (the
    /// first command there with this key); otherwise the idempotency index says where.
    pub fn receipt_for_key(&self, key: IdempotencyKey, reference: ReceiptRef) -> Result<Option<Receipt>, StoreError> {
        let by_operation: Option<i64> = match reference.operation {
            Some(operation) => self
                .connection
                .query_row("SELECT seq FROM operations WHERE id = ?1", params![operation.0 as i64], |row| row.get(0))
                .optional()?,
            None => None,
        };
        let found: Option<(i64, Option<i64>)> = match by_operation {
            Some(seq) => Some((seq, None)),
            None => self
                .connection
                .query_row(
                    "SELECT seq, position FROM idempotency_index WHERE key = ?1",
                    params![&key.0.to_le_bytes()[..]],
                    |row| Ok((row.get(0)?, Some(row.get(1)?))),
                )
                .optional()?,
        };
        let Some((seq, position)) = found else { return Ok(None) };
        let (commands, receipts): (Vec<u8>, Vec<u8>) = self.connection.query_row(
            "SELECT commands, receipts FROM ledger.journal WHERE seq = ?1",
            params![seq],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        let position = match position {
            Some(position) => position as usize,
            None => {
                let commands = codec::decode_commands(&commands, seq as u64)?;
                let first = commands.iter().position(
                    |command| matches!(command, Command::Move { key: k, .. } | Command::MoveAs { key: k, .. } if *k == key),
                );
                let Some(position) = first else { return Ok(None) };
                position
            }
        };
        let mut receipts = codec::decode_receipts(&receipts, seq as u64)?;
        Ok((position < receipts.len()).then(|| receipts.swap_remove(position)))
    }

    /// The record of a charged usage event: by the operation its charge posted (what the
    /// ledger remembers of the event), or, for a charge of nothing, by the digest of its id.
    pub fn usage_record(
        &self,
        key: IdempotencyKey,
        operation: Option<OperationId>,
    ) -> Result<Option<UsageRecord>, StoreError> {
        let found = match operation {
            Some(operation) => self
                .connection
                .prepare_cached(&format!("{USAGE_SELECT} WHERE operation_id = ?1"))?
                .query_row(params![operation.0 as i64], usage_row)
                .optional()?,
            None => self
                .connection
                .prepare_cached(&format!(
                    "{USAGE_SELECT} WHERE key = ?1 AND operation_id IS NULL ORDER BY seq DESC LIMIT 1"
                ))?
                .query_row(params![&key.0.to_le_bytes()[..]], usage_row)
                .optional()?,
        };
        Ok(found)
    }

    /// Every charged usage event of a subscription's period, oldest first (at most
    /// `limit`).
    pub fn usage_of_period(
        &self,
        subscription: SubscriptionId,
        period_start: Timestamp,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut statement = self.connection.prepare_cached(&format!(
            "{USAGE_SELECT} WHERE subscription = ?1 AND period_start = ?2 ORDER BY seq, event_at LIMIT ?3"
        ))?;
        let rows = statement.query_map(params![subscription.0 as i64, period_start, i64::from(limit)], usage_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// A wallet's balance just before `at`: the balance after its last earlier movement.
    pub fn balance_before(&self, wallet: WalletId, at: Timestamp) -> Result<Amount, StoreError> {
        let found: Option<String> = self
            .connection
            .query_row(
                "SELECT balance_after FROM movements WHERE wallet_id = ?1 AND at < ?2
                 ORDER BY operation_id DESC LIMIT 1",
                params![wallet.0 as i64, at],
                |row| row.get(0),
            )
            .optional()?;
        Ok(Amount::from_units(found.and_then(|text| text.parse().ok()).unwrap_or(0)))
    }

    /// Every movement of a wallet in [from, until), oldest first, with what each charge
    /// was for; at most `limit`.
    pub fn statement_lines(
        &self,
        wallet: WalletId,
        from: Timestamp,
        until: Timestamp,
        limit: u32,
    ) -> Result<Vec<(Movement, Option<ChargeDetail>)>, StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT m.operation_id, m.kind, m.at, m.amount, m.balance_after, m.grants, c.subscription, c.product, c.meter
             FROM movements m LEFT JOIN charge_details c ON c.operation_id = m.operation_id
             WHERE m.wallet_id = ?1 AND m.at >= ?2 AND m.at < ?3 ORDER BY m.operation_id LIMIT ?4",
        )?;
        let rows = statement.query_map(params![wallet.0 as i64, from, until, i64::from(limit)], |row| {
            let movement = movement_row(wallet, row)?;
            let detail = row.get::<_, Option<i64>>(6)?.map(|subscription| ChargeDetail {
                subscription: SubscriptionId(subscription as u64),
                product: row.get::<_, Option<i64>>(7).ok().flatten().map(|p| ProductId(p as u64)),
                meter: row.get::<_, Option<i64>>(8).ok().flatten().map(|m| MeterId(m as u64)),
            });
            Ok((movement, detail))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Events, oldest first after the cursor `after` (an event id), at most `limit`.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let mut query = Conditions::new(
            "SELECT id, type, organization, object, at, data FROM events WHERE id > ?1",
            vec![(filter.after as i64).into()],
        );
        query.and("organization = ", filter.organization.map(|o| o.0 as i64));
        query.and_in("type", &filter.types);
        query.and("object = ", filter.object.clone());
        query.and("at >= ", filter.from);
        query.and("at < ", filter.until);
        let (sql, values) = query.finish("id", filter.limit);
        let mut statement = self.connection.prepare_cached(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
            Ok(EventRow {
                id: row.get::<_, i64>(0)? as u64,
                kind: row.get(1)?,
                organization: row.get::<_, Option<i64>>(2)?.map(|o| OrganizationId(o as u64)),
                object: row.get(3)?,
                at: row.get(4)?,
                data: row.get(5)?,
            })
        })?;
        let mut events = rows.collect::<Result<Vec<_>, _>>()?;
        for event in &mut events {
            let data = std::mem::take(&mut event.data);
            event.data = crate::events::event_data(&self.connection, "main", &event.kind, &event.object, data)?;
        }
        Ok(events)
    }

    /// The currency of a hold's wallet, from the directory of holds ever placed.
    pub fn hold_currency(&self, hold: HoldId) -> Result<Option<Currency>, StoreError> {
        let found: Option<String> = self
            .connection
            .query_row(
                "SELECT w.currency FROM directory_holds h JOIN directory_wallets w ON w.wallet = h.wallet
                 WHERE h.hold = ?1",
                params![hold.0 as i64],
                |row| row.get(0),
            )
            .optional()?;
        Ok(found.and_then(|code| Currency::parse(&code).ok()))
    }

    /// One operation with all its legs.
    pub fn operation(&self, id: OperationId) -> Result<Option<Operation>, StoreError> {
        let row: Option<(i64, String, String, i64, Vec<u8>)> = self
            .connection
            .query_row(
                "SELECT seq, kind, currency, at, legs FROM operations WHERE id = ?1",
                params![id.0 as i64],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
            )
            .optional()?;
        let Some((seq, _, _, _, legs)) = row else { return Ok(None) };
        let seq = seq as u64;
        // The whole operation, kind and currency included, comes from the journal record.
        let receipts: Vec<u8> = self.connection.query_row(
            "SELECT receipts FROM ledger.journal WHERE seq = ?1",
            params![seq as i64],
            |row| row.get(0),
        )?;
        let receipts = codec::decode_receipts(&receipts, seq)?;
        let found =
            receipts.iter().flat_map(|receipt| receipt.operations()).find(|operation| operation.id == id).cloned();
        debug_assert!(found.as_ref().is_none_or(|operation| codec::encode(&operation.legs) == legs));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JournalBatch, Store};
    use tally_ledger::{Roles, Settings, State};

    /// A journal of `records` organizations created, each its own record (and event).
    fn journal(path: &Path, records: u64) {
        let mut store = crate::SqliteStore::open(path).unwrap();
        let mut state = State::new(Settings::default());
        for seq in 1..=records {
            let command = Command::CreateOrganization { name: format!("org {seq}"), roles: Roles::default() };
            let receipt = state.apply(&command, 1_000).unwrap();
            store.commit(&[JournalBatch { seq, at: 1_000, entries: vec![(&command, &receipt)] }]).unwrap();
        }
    }

    fn projected(path: &Path, boot: &str, until: u64) -> Projector {
        let projector = Projector::spawn_on_boot(path, Some(boot)).unwrap();
        projector.notify();
        assert!(projector.wait_for(until, Duration::from_secs(30)), "history caught up");
        projector
    }

    /// A stray row only this history file has: it survives unless history is rebuilt.
    fn mark(path: &Path) {
        let connection = Connection::open(crate::sqlite::history_path(path)).unwrap();
        connection.execute("INSERT INTO directory_holds (hold, wallet) VALUES (999, 999)", []).unwrap();
    }

    fn marked(path: &Path) -> bool {
        let connection = Connection::open(crate::sqlite::history_path(path)).unwrap();
        connection
            .query_row("SELECT COUNT(*) FROM directory_holds WHERE hold = 999", [], |row| row.get::<_, i64>(0))
            .unwrap()
            == 1
    }

    #[test]
    fn unsynced_history_is_rebuilt_only_after_the_machine_stopped_mid_write() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("tally.db");
        journal(&path, 5);
        let state = || std::fs::read_to_string(history_marker_path(&path)).unwrap();

        // While projecting, the marker names the boot; a clean stop closes it.
        let projector = projected(&path, "boot-a", 5);
        assert_eq!(state(), "open boot-a\n");
        projector.stop();
        assert_eq!(state(), "closed\n");
        mark(&path);

        // Closed: a later boot keeps history.
        projected(&path, "boot-b", 5).stop();
        assert!(marked(&path));

        // The process died mid-write (the marker stays open) but the machine did not:
        // the same boot keeps history, since the kernel had every write.
        std::fs::write(history_marker_path(&path), "open boot-b\n").unwrap();
        let projector = projected(&path, "boot-b", 5);
        assert!(marked(&path));
        drop(projector);

        // The machine stopped mid-write: another boot finds the marker open, throws
        // history away and projects the journal again, events and all.
        std::fs::write(history_marker_path(&path), "open boot-b\n").unwrap();
        let projector = projected(&path, "boot-c", 5);
        assert!(!marked(&path), "history was rebuilt");
        let reader = HistoryReader::open(&path).unwrap();
        let events = reader.events(&EventFilter { limit: 100, ..EventFilter::default() }).unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(reader.projected_seq().unwrap(), 5);
        drop(projector);

        // With no boot id known, a marker left open means the same: rebuild.
        mark(&path);
        std::fs::write(history_marker_path(&path), "open boot-c\n").unwrap();
        let projector = Projector::spawn_on_boot(&path, None).unwrap();
        projector.notify();
        assert!(projector.wait_for(5, Duration::from_secs(30)), "history caught up");
        projector.stop();
        assert!(!marked(&path), "history was rebuilt");
        // And history is then written with syncs: no marker is opened.
        assert!(!history_marker_path(&path).exists());

        // A history whose events began partway through the journal (an older build's)
        // keeps syncing, since a rebuild would renumber its events; it says so.
        assert!(!rebuild_renumbers_events(&path).unwrap());
        let connection = Connection::open(crate::sqlite::history_path(&path)).unwrap();
        connection.execute("UPDATE projection SET from_start = 0", []).unwrap();
        drop(connection);
        assert!(rebuild_renumbers_events(&path).unwrap());
        Projector::spawn_on_boot(&path, Some("boot-d")).unwrap().stop();
        assert_eq!(std::fs::read_to_string(history_marker_path(&path)).ok(), None, "no unsynced writes were made");
    }
}
