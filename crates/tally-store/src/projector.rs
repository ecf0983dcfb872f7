//! The history projection: a thread that reads journal records after its watermark and
//! writes the queryable tables (operations, movements), and the reader that queries them.
//! It runs beside the writer, so history can lag the journal by a moment; readers that
//! must see a given write wait until the watermark passes it.

use crate::codec;
use crate::sqlite::open_history;
use crate::StoreError;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tally_ledger::{
    Account, Amount, Command, GrantId, GrantPortion, IdempotencyKey, Operation, OperationId, Receipt, Timestamp,
    WalletId,
};

/// Journal records projected per transaction: large enough to amortise the fsync,
/// small enough that a reader waiting for the watermark does not wait long.
const PROJECTION_BATCH_RECORDS: i64 = 64;
/// Most movements one history query returns.
pub const PAGE_SIZE_MAX: u32 = 500;

pub struct Projector {
    stop: Arc<AtomicBool>,
    watermark: Arc<AtomicU64>,
    wake: crossbeam_like::Sender,
    thread: Option<JoinHandle<()>>,
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
        let path: PathBuf = path.as_ref().to_path_buf();
        let mut connection = open_history(&path)?;
        // History can be rebuilt from the journal, so the projection need not fsync.
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        let start: i64 = connection.query_row("SELECT seq FROM projection WHERE id = 1", [], |row| row.get(0))?;
        let stop = Arc::new(AtomicBool::new(false));
        let watermark = Arc::new(AtomicU64::new(start as u64));
        let wake = crossbeam_like::Sender::default();
        let thread = {
            let (stop, watermark, wake) = (stop.clone(), watermark.clone(), wake.clone());
            std::thread::Builder::new()
                .name("tally-projector".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        match project_some(&mut connection, watermark.load(Ordering::Acquire)) {
                            Ok(Some(seq)) => watermark.store(seq, Ordering::Release),
                            Ok(None) => wake.wait(Duration::from_millis(50)),
                            Err(error) => {
                                tracing::error!(%error, "history projection failed; retrying");
                                std::thread::sleep(Duration::from_millis(500));
                            }
                        }
                    }
                })
                .expect("spawn projector thread")
        };
        Ok(Projector { stop, watermark, wake, thread: Some(thread) })
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
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for Projector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

/// Projects up to a batch of journal records after `after`; returns the new watermark.
fn project_some(connection: &mut Connection, after: u64) -> Result<Option<u64>, StoreError> {
    let transaction = connection.transaction()?;
    let mut last = None;
    {
        let mut select = transaction.prepare_cached(
            "SELECT seq, commands, receipts FROM ledger.journal WHERE seq > ?1 ORDER BY seq LIMIT ?2",
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
        let mut rows = select.query(params![after as i64, PROJECTION_BATCH_RECORDS])?;
        while let Some(row) = rows.next()? {
            let seq = row.get::<_, i64>(0)? as u64;
            let commands = codec::decode_commands(row.get_ref(1)?.as_blob()?, seq)?;
            let receipts = codec::decode_receipts(row.get_ref(2)?.as_blob()?, seq)?;
            for (position, command) in commands.iter().enumerate() {
                if let Command::Move { key, .. } | Command::MoveAs { key, .. } = command {
                    insert_key.execute(params![&key.0.to_le_bytes()[..], seq as i64, position as i64])?;
                }
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
    Ok(last)
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
        let mut sql = String::from(
            "SELECT operation_id, kind, at, amount, balance_after, grants FROM movements WHERE wallet_id = ?1 AND operation_id < ?2",
        );
        let mut values: Vec<rusqlite::types::Value> =
            vec![(wallet.0 as i64).into(), filter.before.map(|o| o.0 as i64).unwrap_or(i64::MAX).into()];
        if let Some(from) = filter.from {
            values.push(from.into());
            sql.push_str(&format!(" AND at >= ?{}", values.len()));
        }
        if let Some(until) = filter.until {
            values.push(until.into());
            sql.push_str(&format!(" AND at < ?{}", values.len()));
        }
        if !filter.kinds.is_empty() {
            let mut marks = Vec::new();
            for kind in &filter.kinds {
                values.push(kind.clone().into());
                marks.push(format!("?{}", values.len()));
            }
            sql.push_str(&format!(" AND kind IN ({})", marks.join(",")));
        }
        values.push(i64::from(filter.limit.clamp(1, PAGE_SIZE_MAX)).into());
        sql.push_str(&format!(" ORDER BY operation_id DESC LIMIT ?{}", values.len()));
        let mut statement = self.connection.prepare_cached(&sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
            Ok(Movement {
                wallet,
                operation: OperationId(row.get::<_, i64>(0)? as u64),
                kind: row.get(1)?,
                at: row.get(2)?,
                amount: Amount::from_units(row.get::<_, String>(3)?.parse().unwrap_or_default()),
                balance_after: Amount::from_units(row.get::<_, String>(4)?.parse().unwrap_or_default()),
                grants: parse_grants(&row.get::<_, String>(5)?),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The receipt a money-moving request got the first time its key was used, once
    /// history has caught up with it; an HTTP replay renders the same answer from it.
    pub fn receipt_for_key(&self, key: IdempotencyKey) -> Result<Option<Receipt>, StoreError> {
        let found: Option<(i64, i64)> = self
            .connection
            .query_row(
                "SELECT seq, position FROM idempotency_index WHERE key = ?1",
                params![&key.0.to_le_bytes()[..]],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let Some((seq, position)) = found else { return Ok(None) };
        let receipts: Vec<u8> =
            self.connection
                .query_row("SELECT receipts FROM ledger.journal WHERE seq = ?1", params![seq], |row| row.get(0))?;
        let mut receipts = codec::decode_receipts(&receipts, seq as u64)?;
        let position = position as usize;
        Ok((position < receipts.len()).then(|| receipts.swap_remove(position)))
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
