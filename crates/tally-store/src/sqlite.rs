//! The embedded SQLite store: one file, WAL mode, full fsync on every commit.

use crate::codec::{self, FORMAT_VERSION};
use crate::snapshots::{self, snapshot_dir, JournalMark};
use crate::{JournalBatch, Loaded, Snapshots, Store, StoreError};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use tally_ledger::{Command, Receipt, State, Timestamp};

/// Schema migrations, applied in order; the index is the schema version.
const MIGRATIONS: &[&str] = &["CREATE TABLE journal (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        format INTEGER NOT NULL,
        command_count INTEGER NOT NULL,
        commands BLOB NOT NULL,
        receipts BLOB NOT NULL
    );
    CREATE TABLE snapshots (
        seq INTEGER PRIMARY KEY,
        format INTEGER NOT NULL,
        state BLOB NOT NULL
    );
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        prefix TEXT NOT NULL,
        hash BLOB NOT NULL UNIQUE,
        organization INTEGER,
        scopes TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER
    );"];

/// Migrations of the history database, a file of its own beside the ledger's, so the
/// projector's writes never wait for (or hold up) the committer's.
pub(crate) const HISTORY_MIGRATIONS: &[&str] = &[
    "CREATE TABLE projection (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL
    );
    INSERT INTO projection (id, seq) VALUES (1, 0);
    CREATE TABLE operations (
        id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        currency TEXT NOT NULL,
        at INTEGER NOT NULL,
        legs BLOB NOT NULL
    );
    CREATE TABLE movements (
        wallet_id INTEGER NOT NULL,
        operation_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        at INTEGER NOT NULL,
        amount TEXT NOT NULL,
        balance_after TEXT NOT NULL,
        grants TEXT NOT NULL,
        PRIMARY KEY (wallet_id, operation_id)
    ) WITHOUT ROWID;
    CREATE TABLE idempotency_index (
        key BLOB PRIMARY KEY,
        seq INTEGER NOT NULL,
        position INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // Usage billing: one row per charged usage event (the key is the digest of the
    // merchant's event id), and what each charge was for, for statements.
    "CREATE TABLE usage_records (
        key BLOB PRIMARY KEY,
        seq INTEGER NOT NULL,
        subscription INTEGER NOT NULL,
        meter INTEGER NOT NULL,
        dimension INTEGER,
        period_start INTEGER NOT NULL,
        event_at INTEGER NOT NULL,
        quantity TEXT NOT NULL,
        amount TEXT NOT NULL,
        fee TEXT NOT NULL,
        operation_id INTEGER,
        reservation INTEGER,
        released TEXT,
        balance_after TEXT
    ) WITHOUT ROWID;
    CREATE INDEX usage_by_period ON usage_records (subscription, period_start);
    CREATE TABLE charge_details (
        operation_id INTEGER PRIMARY KEY,
        subscription INTEGER NOT NULL,
        product INTEGER,
        meter INTEGER
    );",
    // Events, numbered in journal order, and what the projector must know to say whose
    // they are (receipts name wallets, holds and subscriptions by id alone).
    "CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        organization INTEGER,
        object TEXT NOT NULL,
        at INTEGER NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX events_by_organization ON events (organization, id);
    CREATE TABLE directory_wallets (wallet INTEGER PRIMARY KEY, organization INTEGER NOT NULL, currency TEXT NOT NULL);
    CREATE TABLE directory_holds (hold INTEGER PRIMARY KEY, wallet INTEGER NOT NULL);
    CREATE TABLE directory_plans (plan INTEGER PRIMARY KEY, merchant INTEGER NOT NULL, currency TEXT NOT NULL);
    CREATE TABLE directory_subscriptions (
        subscription INTEGER PRIMARY KEY,
        consumer INTEGER NOT NULL,
        merchant INTEGER NOT NULL
    );",
    // Finding an object's events (a resolved hold's outcome) without a scan.
    "CREATE INDEX events_by_object ON events (object, id);",
    // Usage records in the order they were charged. Keyed by the event id's random
    // digest, every charge wrote a page of its own (single events over HTTP: 17,608/s
    // with that table, 25,091/s without). A duplicate is found through the operation
    // its first charge posted, which the ledger remembers; only records of charges that
    // posted none (nothing to pay) keep an index by key.
    "CREATE TABLE usage_records_in_order (
        key BLOB NOT NULL,
        seq INTEGER NOT NULL,
        subscription INTEGER NOT NULL,
        meter INTEGER NOT NULL,
        dimension INTEGER,
        period_start INTEGER NOT NULL,
        event_at INTEGER NOT NULL,
        quantity TEXT NOT NULL,
        amount TEXT NOT NULL,
        fee TEXT NOT NULL,
        operation_id INTEGER,
        reservation INTEGER,
        released TEXT,
        balance_after TEXT
    );
    INSERT INTO usage_records_in_order SELECT key, seq, subscription, meter, dimension, period_start, event_at,
        quantity, amount, fee, operation_id, reservation, released, balance_after FROM usage_records ORDER BY seq;
    DROP TABLE usage_records;
    ALTER TABLE usage_records_in_order RENAME TO usage_records;
    CREATE INDEX usage_by_period ON usage_records (subscription, period_start);
    CREATE INDEX usage_by_operation ON usage_records (operation_id) WHERE operation_id IS NOT NULL;
    CREATE INDEX usage_unpriced_by_key ON usage_records (key) WHERE operation_id IS NULL;",
    // Whether events were derived from the journal's first record on (see
    // `projector::projected_from_start`): unknown for files made before, so 0.
    "ALTER TABLE projection ADD COLUMN from_start INTEGER NOT NULL DEFAULT 0;",
];

/// The history database's file: `tally.db` keeps its history in `tally.history.db`.
pub fn history_path(path: &Path) -> PathBuf {
    path.with_extension("history.db")
}

/// Applies `migrations` in order, recording the version in `user_version`.
pub(crate) fn migrate(connection: &mut Connection, migrations: &[&str]) -> Result<(), StoreError> {
    let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = migrations.len() as i64;
    if version > known {
        return Err(StoreError::NewerFormat { found: version as u32, supported: known as u32 });
    }
    for (index, migration) in migrations.iter().enumerate().skip(version as usize) {
        if version > 0 {
            // An existing file: a migration may copy a large table, so say what it waits for.
            let file = connection.path().unwrap_or_default().to_string();
            tracing::info!(%file, from = index, to = index + 1, "migrating the schema");
        }
        let transaction = connection.transaction()?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1)?;
        transaction.commit()?;
    }
    Ok(())
}

/// Opens the history database with the ledger database attached read-only as `ledger`.
pub(crate) fn open_history(path: &Path) -> Result<Connection, StoreError> {
    let mut connection = open_connection(&history_path(path))?;
    migrate(&mut connection, HISTORY_MIGRATIONS)?;
    connection.execute("ATTACH DATABASE ?1 AS ledger", rusqlite::params![path.to_string_lossy()])?;
    Ok(connection)
}

pub struct SqliteStore {
    path: PathBuf,
    connection: Connection,
    /// Dropping it stops the checkpointer thread.
    _checkpointer: Checkpointer,
}

/// How often the checkpointer copies committed WAL frames into the database file. Often
/// and small is the point: a commit's sync waits behind the database file's sync on the
/// same disk, so the less each checkpoint has to sync, the less a commit waits. At
/// 50,000 charges/s offered, p99 submit-to-durable was 2.6-3.2 ms with 20 ms, 3.9-6.0 ms
/// with 100 ms, and 2.9-5.7 ms with 1 s between checkpoints (BENCHMARKS.md).
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
/// The WAL file is truncated back to this size when a checkpoint leaves it longer.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 << 20;

/// Checkpoints the WAL from a thread and connection of its own. SQLite would otherwise
/// run each checkpoint inside whichever commit crossed its threshold, and that commit
/// (and every request waiting on it) would wait for the database file's writes and
/// sync: a few milliseconds, several times a second under load. A passive checkpoint
/// never blocks the committer, which keeps appending to the WAL meanwhile.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn spawn(path: &Path) -> Result<Checkpointer, StoreError> {
        let connection = open_connection(path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("tally-checkpoint".into()).spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_INTERVAL) {
                if let Err(error) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(%error, "WAL checkpoint failed; the next one retries");
                }
            }
        })?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens a connection with the pragmas every Tally connection uses.
pub(crate) fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let connection = Connection::open(path)?;
    connection.busy_timeout(std::time::Duration::from_secs(10))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    Ok(connection)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut connection = open_connection(&path)?;
        migrate(&mut connection, MIGRATIONS)?;
        // Commits never checkpoint; the checkpointer thread does (see [`Checkpointer`]).
        connection.pragma_update(None, "wal_autocheckpoint", 0)?;
        connection.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
        let checkpointer = Checkpointer::spawn(&path)?;
        Ok(SqliteStore { path, connection, _checkpointer: checkpointer })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The newest durable journal sequence.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let seq: Option<i64> = self.connection.query_row("SELECT MAX(seq) FROM journal", [], |row| row.get(0))?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// Calls `visit` with every journal record from `from_seq` on, in order.
    pub fn scan_journal(
        &self,
        from_seq: u64,
        visit: impl FnMut(u64, Timestamp, Vec<Command>, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        scan_journal(&self.connection, from_seq, visit)
    }

    /// Loads like [`Store::load`], starting from the snapshot or, with `from_scratch`,
    /// from an empty state and the whole journal.
    pub fn load_with(&mut self, from_scratch: bool) -> Result<Loaded, StoreError> {
        load(&self.connection, &self.path, from_scratch)
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        self.load_with(false)
    }

    fn commit(&mut self, batches: &[JournalBatch<'_>]) -> Result<(), StoreError> {
        let transaction = self.connection.transaction()?;
        {
            let mut insert = transaction.prepare_cached(
                "INSERT INTO journal (seq, at, format, command_count, commands, receipts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for batch in batches {
                let commands: Vec<&Command> = batch.entries.iter().map(|(command, _)| *command).collect();
                let receipts: Vec<&Receipt> = batch.entries.iter().map(|(_, receipt)| *receipt).collect();
                insert.execute(params![
                    batch.seq as i64,
                    batch.at,
                    FORMAT_VERSION,
                    batch.entries.len() as i64,
                    codec::encode(&commands),
                    codec::encode(&receipts)
                ])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    fn snapshots(&self) -> Result<Box<dyn Snapshots>, StoreError> {
        Ok(Box::new(SnapshotFiles { connection: open_connection(&self.path)?, path: self.path.clone() }))
    }
}

/// Loads the state: the newest usable snapshot (or, with `from_scratch`, nothing) and
/// the journal after it.
fn load(connection: &Connection, path: &Path, from_scratch: bool) -> Result<Loaded, StoreError> {
    let snapshot = if from_scratch { None } else { latest_snapshot(connection, path)? };
    crate::replay(snapshot, |from, visit| scan_journal(connection, from, visit))
}

/// Calls `visit` with every journal record from `from_seq` on, in order.
fn scan_journal(
    connection: &Connection,
    from_seq: u64,
    mut visit: impl FnMut(u64, Timestamp, Vec<Command>, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let last: Option<i64> = connection.query_row("SELECT MAX(seq) FROM journal", [], |row| row.get(0))?;
    let Some(last) = last else { return Ok(()) };
    let mut statement = connection.prepare(
        "SELECT seq, at, format, commands, receipts FROM journal WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut next = from_seq as i64;
    while next <= last {
        let mut rows = statement.query(params![next, last, SCAN_PAGE_RECORDS])?;
        let mut read = 0;
        while let Some(row) = rows.next()? {
            let seq = row.get::<_, i64>(0)? as u64;
            let at: i64 = row.get(1)?;
            let format: i64 = row.get(2)?;
            if format as u32 > FORMAT_VERSION {
                return Err(StoreError::NewerFormat { found: format as u32, supported: FORMAT_VERSION });
            }
            let commands = codec::decode_commands(row.get_ref(3)?.as_blob()?, seq)?;
            visit(seq, at, commands, row.get_ref(4)?.as_blob()?)?;
            next = seq as i64 + 1;
            read += 1;
        }
        if read == 0 {
            break;
        }
    }
    Ok(())
}

/// Journal records a scan reads per statement. Each statement is a read transaction of
/// its own: one over the whole journal (seconds, when the snapshot thread rebuilds the
/// state under load) would keep the checkpointer from copying the WAL back and the WAL
/// from starting over, so it would grow by every commit made meanwhile.
const SCAN_PAGE_RECORDS: i64 = 4096;

/// The newest usable snapshot, if any: the newest snapshot file that follows a
/// record of this journal, or a snapshot row (where earlier versions wrote them)
/// when that is newer. An unusable file is reported and passed over; the journal
/// replays from an older snapshot instead.
fn latest_snapshot(connection: &Connection, path: &Path) -> Result<Option<(u64, State)>, StoreError> {
    let row_seq: Option<i64> = connection.query_row("SELECT MAX(seq) FROM snapshots", [], |row| row.get(0))?;
    let row_seq = row_seq.map(|seq| seq as u64);
    let dir = snapshot_dir(path);
    for seq in snapshots::list(&dir)? {
        if row_seq.is_some_and(|row_seq| row_seq >= seq) {
            break;
        }
        match snapshots::read(&dir, seq, |seq| journal_mark(connection, seq)) {
            Ok(bytes) => match codec::decode_state(&bytes, seq) {
                Ok(state) => return Ok(Some((seq, state))),
                // Whole but undecodable: damaged; an older snapshot will do.
                Err(error) => tracing::warn!(seq, dir = %dir.display(), %error, "snapshot file passed over"),
            },
            Err(snapshots::Unusable::Error(error @ StoreError::NewerFormat { .. })) => return Err(error),
            Err(unusable) => {
                tracing::warn!(seq, dir = %dir.display(), %unusable, "snapshot file passed over");
            }
        }
    }
    let Some(seq) = row_seq else { return Ok(None) };
    let (format, bytes): (i64, Vec<u8>) =
        connection.query_row("SELECT format, state FROM snapshots WHERE seq = ?1", params![seq as i64], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    if format as u32 > FORMAT_VERSION {
        return Err(StoreError::NewerFormat { found: format as u32, supported: FORMAT_VERSION });
    }
    Ok(Some((seq, codec::decode_state(&bytes, seq)?)))
}

fn journal_mark(connection: &Connection, seq: u64) -> Result<Option<JournalMark>, StoreError> {
    Ok(connection
        .query_row("SELECT at, length(commands) FROM journal WHERE seq = ?1", params![seq as i64], |row| {
            Ok(JournalMark { at: row.get(0)?, commands_len: row.get::<_, i64>(1)? as u64 })
        })
        .optional()?)
}

/// Reads the journal and writes snapshot files (see [`crate::snapshots`]) with a
/// connection of its own: a reader, which never waits for the committer nor holds it up.
struct SnapshotFiles {
    connection: Connection,
    path: PathBuf,
}

impl Snapshots for SnapshotFiles {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        load(&self.connection, &self.path, false)
    }

    fn write(&mut self, seq: u64, encoded: &[u8]) -> Result<(), StoreError> {
        let mark = journal_mark(&self.connection, seq)?.ok_or_else(|| StoreError::Corrupt {
            what: "snapshot",
            seq,
            detail: "the journal has no record at this sequence".into(),
        })?;
        snapshots::write(&snapshot_dir(&self.path), seq, mark, encoded)
    }
}

/// Encodes a state for [`Snapshots::write`].
pub fn encode_snapshot(state: &State) -> Vec<u8> {
    codec::encode_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_ledger::{Roles, Settings};

    #[test]
    fn a_load_replays_a_journal_longer_than_one_scan_page() {
        let directory = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(directory.path().join("t.db")).unwrap();
        let mut state = State::new(Settings::default());
        let records = SCAN_PAGE_RECORDS as u64 * 2 + 7;
        for seq in 1..=records {
            let command = Command::CreateOrganization { name: format!("org {seq}"), roles: Roles::default() };
            let receipt = state.apply(&command, 1_000).unwrap();
            store.commit(&[JournalBatch { seq, at: 1_000, entries: vec![(&command, &receipt)] }]).unwrap();
        }
        let loaded = store.load().unwrap();
        assert_eq!((loaded.seq, loaded.replayed_batches), (records, records));
        assert_eq!(loaded.state, state);
        // A whole snapshot file of this journal whose state does not decode (damaged) is
        // passed over: the load replays from nothing instead of refusing to start.
        let mark = journal_mark(&store.connection, records).unwrap().unwrap();
        snapshots::write(&snapshot_dir(store.path()), records, mark, b"not a state").unwrap();
        let again = store.load().unwrap();
        assert_eq!((again.replayed_batches, again.state == state), (records, true));
        let mut seen = Vec::new();
        store
            .scan_journal(records - 2, |seq, _, _, _| {
                seen.push(seq);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, vec![records - 2, records - 1, records]);
    }

    /// A history file from before usage records were kept in charge order keeps its
    /// records, and both lookups find them: by operation, and by key without one.
    #[test]
    fn history_migrates_usage_records_into_charge_order() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("h.db");
        let mut connection = open_connection(&path).unwrap();
        // Every migration before the one that put usage records in charge order.
        let before = 4;
        migrate(&mut connection, &HISTORY_MIGRATIONS[..before]).unwrap();
        let insert = "INSERT INTO usage_records (key, seq, subscription, meter, dimension, period_start, event_at,
            quantity, amount, fee, operation_id, reservation, released, balance_after)
            VALUES (?1, ?2, 1, 1, NULL, 0, 5, '3', ?3, '0', ?4, NULL, NULL, NULL)";
        connection.execute(insert, rusqlite::params![&[1u8; 16][..], 2, "70", 9]).unwrap();
        connection.execute(insert, rusqlite::params![&[2u8; 16][..], 1, "0", None::<i64>]).unwrap();
        migrate(&mut connection, HISTORY_MIGRATIONS).unwrap();
        let in_order: Vec<i64> = connection
            .prepare("SELECT seq FROM usage_records ORDER BY rowid")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(in_order, vec![1, 2]);
        let by_operation: String = connection
            .query_row("SELECT amount FROM usage_records WHERE operation_id = 9", [], |row| row.get(0))
            .unwrap();
        assert_eq!(by_operation, "70");
        let by_key: String = connection
            .query_row(
                "SELECT amount FROM usage_records WHERE key = ?1 AND operation_id IS NULL",
                rusqlite::params![&[2u8; 16][..]],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(by_key, "0");
        let indexes: i64 = connection
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_records'
                 AND name IN ('usage_by_period', 'usage_by_operation', 'usage_unpriced_by_key')",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 3);
    }
}
