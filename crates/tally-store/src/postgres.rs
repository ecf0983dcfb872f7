//! The PostgreSQL store: the same journal and snapshots as the SQLite store, in one
//! database that several nodes can reach. A commit is one transaction with one
//! statement for all of its batches (`unnest` over arrays), so a commit costs one
//! round trip and one WAL flush however many batches it carries.

use crate::codec::{self, FORMAT_VERSION};
use crate::{JournalBatch, Loaded, Snapshots, Store, StoreError};
use postgres::{Client, NoTls};
use tally_ledger::{Command, Receipt, State, Timestamp};

/// Schema migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE journal (
        seq BIGINT PRIMARY KEY,
        at BIGINT NOT NULL,
        format INT NOT NULL,
        command_count INT NOT NULL,
        commands BYTEA NOT NULL,
        receipts BYTEA NOT NULL
    );
    CREATE TABLE snapshots (
        seq BIGINT PRIMARY KEY,
        format INT NOT NULL,
        state BYTEA NOT NULL
    );",
    // The writer's lease: one row; a node that takes it over bumps the epoch.
    "CREATE TABLE tally_lease (
        id INT PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );",
    // API keys, shared by every node (only hashes, as in SQLite).
    "CREATE TABLE api_keys (
        id BIGSERIAL PRIMARY KEY,
        prefix TEXT NOT NULL,
        hash BYTEA NOT NULL UNIQUE,
        organization BIGINT,
        scopes TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        revoked_at BIGINT
    );",
];

/// Snapshots kept besides the newest.
const SNAPSHOTS_KEPT: i64 = 2;

pub struct PostgresStore {
    client: Client,
    /// Where to connect again after the connection is lost (a database restart).
    url: String,
    schema: Option<String>,
    /// With a lease: every commit first checks, in its own transaction, that this
    /// holder and epoch still hold it (fencing), so a writer that lost its lease can
    /// never commit.
    lease: Option<(String, i64)>,
}

/// The writer's lease as the database holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired), by the database's clock.
    pub remaining_ms: i64,
}

pub(crate) fn database(error: postgres::Error) -> StoreError {
    match error.as_db_error() {
        Some(db) => StoreError::Postgres(format!("{} ({}): {}", error, db.code().code(), db.message())),
        None => StoreError::Postgres(error.to_string()),
    }
}

pub(crate) fn connect(url: &str, schema: Option<&str>) -> Result<Client, StoreError> {
    let mut config: postgres::Config = url.parse().map_err(database)?;
    // Named by schema, so an operator (or a test) can tell this node's connection apart.
    config.application_name(&format!("tally:{}", schema.unwrap_or("public")));
    let mut client = config.connect(NoTls).map_err(database)?;
    if let Some(schema) = schema {
        // Two nodes starting at once can race to create the schema; the loser sees a
        // unique violation and finds it there on the next try.
        let mut attempts = 0;
        loop {
            match client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")) {
                Ok(()) => break,
                Err(error) if attempts < 3 && error.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    attempts += 1;
                }
                Err(error) => return Err(database(error)),
            }
        }
        client.batch_execute(&format!("SET search_path TO {schema}")).map_err(database)?;
    }
    Ok(client)
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/database`) and brings the schema up
    /// to date, in the database's default schema.
    pub fn open(url: &str) -> Result<PostgresStore, StoreError> {
        PostgresStore::open_in_schema(url, None)
    }

    /// The same, with every table in `schema` (created if missing): tests use one schema
    /// each, so they share the machine's database without seeing each other.
    pub fn open_in_schema(url: &str, schema: Option<&str>) -> Result<PostgresStore, StoreError> {
        if let Some(schema) = schema {
            if !schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
                return Err(StoreError::Postgres(format!("schema name {schema:?}: use [a-z0-9_]")));
            }
        }
        let client = connect(url, schema)?;
        let mut store = PostgresStore { client, url: url.to_string(), schema: schema.map(str::to_string), lease: None };
        store.migrate()?;
        Ok(store)
    }

    /// Connects again if the connection was lost; the next operation then works once
    /// the database is back (the engine retries its reload until it is).
    fn reconnect_if_closed(&mut self) -> Result<(), StoreError> {
        if self.client.is_closed() {
            tracing::warn!("the PostgreSQL connection was lost; connecting again");
            self.client = connect(&self.url, self.schema.as_deref())?;
        }
        Ok(())
    }

    /// Terminates every connection named `application_name` (an operator's tool, and
    /// how tests simulate a database restart); returns how many.
    pub fn terminate_connections(&mut self, application_name: &str) -> Result<u64, StoreError> {
        self.reconnect_if_closed()?;
        let row = self
            .client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&application_name],
            )
            .map_err(database)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Drops a schema made by `open_in_schema` (tests clean up after themselves).
    pub fn drop_schema(url: &str, schema: &str) -> Result<(), StoreError> {
        if !schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            return Err(StoreError::Postgres(format!("schema name {schema:?}: use [a-z0-9_]")));
        }
        let mut client = Client::connect(url, NoTls).map_err(database)?;
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).map_err(database)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let mut transaction = self.client.transaction().map_err(database)?;
        transaction
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS tally_schema (version INT NOT NULL);
                 LOCK TABLE tally_schema IN EXCLUSIVE MODE;",
            )
            .map_err(database)?;
        let version: i32 = transaction
            .query_opt("SELECT version FROM tally_schema", &[])
            .map_err(database)?
            .map_or(0, |row| row.get(0));
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            transaction.batch_execute(migration).map_err(database)?;
            let version = index as i32 + 1;
            transaction.execute("DELETE FROM tally_schema", &[]).map_err(database)?;
            transaction.execute("INSERT INTO tally_schema (version) VALUES ($1)", &[&version]).map_err(database)?;
        }
        transaction.commit().map_err(database)
    }

    /// Takes the writer's lease for `holder` if it is free or expired (bumping the
    /// epoch), or keeps it if `holder` has it. Times are the database's, so nodes'
    /// clocks do not matter. Returns the epoch held, or None when another node holds it.
    pub fn acquire_lease(&mut self, holder: &str, lease_ms: i64) -> Result<Option<i64>, StoreError> {
        self.reconnect_if_closed()?;
        let row = self
            .client
            .query_opt(
                "INSERT INTO tally_lease (id, holder, epoch, expires_at)
                 VALUES (1, $1, 1, now() + $2 * interval '1 millisecond')
                 ON CONFLICT (id) DO UPDATE SET
                     holder = EXCLUDED.holder,
                     epoch = CASE WHEN tally_lease.holder = EXCLUDED.holder AND tally_lease.expires_at > now()
                                  THEN tally_lease.epoch ELSE tally_lease.epoch + 1 END,
                     expires_at = EXCLUDED.expires_at
                 WHERE tally_lease.expires_at <= now() OR tally_lease.holder = EXCLUDED.holder
                 RETURNING epoch",
                &[&holder, &(lease_ms as f64)],
            )
            .map_err(database)?;
        let epoch = row.map(|row| row.get::<_, i64>(0));
        if let Some(epoch) = epoch {
            self.lease = Some((holder.to_string(), epoch));
        }
        Ok(epoch)
    }

    /// Makes this connection act for a lease taken on another one (the node renews on
    /// its own connection while the engine commits on the store's).
    pub fn adopt_lease(&mut self, holder: &str, epoch: i64) {
        self.lease = Some((holder.to_string(), epoch));
    }

    /// The holder and epoch this store commits under, if any.
    pub fn held_lease(&self) -> Option<(String, i64)> {
        self.lease.clone()
    }

    /// Extends the lease this store holds; false when it was lost (taken over).
    pub fn renew_lease(&mut self, lease_ms: i64) -> Result<bool, StoreError> {
        self.reconnect_if_closed()?;
        let Some((holder, epoch)) = self.lease.clone() else { return Ok(false) };
        let renewed = self
            .client
            .execute(
                "UPDATE tally_lease SET expires_at = now() + $3 * interval '1 millisecond'
                 WHERE id = 1 AND holder = $1 AND epoch = $2",
                &[&holder, &epoch, &(lease_ms as f64)],
            )
            .map_err(database)?;
        Ok(renewed == 1)
    }

    /// The lease as the database has it now.
    pub fn lease(&mut self) -> Result<Option<Lease>, StoreError> {
        self.reconnect_if_closed()?;
        let row = self
            .client
            .query_opt(
                "SELECT holder, epoch, (EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::BIGINT FROM tally_lease",
                &[],
            )
            .map_err(database)?;
        Ok(row.map(|row| Lease { holder: row.get(0), epoch: row.get(1), remaining_ms: row.get(2) }))
    }

    /// The newest durable journal sequence.
    pub fn last_seq(&mut self) -> Result<u64, StoreError> {
        self.reconnect_if_closed()?;
        let row = self.client.query_one("SELECT COALESCE(MAX(seq), 0) FROM journal", &[]).map_err(database)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Calls `visit` with every journal record from `from_seq` on, in order, reading in
    /// pages so a long journal is never held in memory at once.
    pub fn scan_journal(
        &mut self,
        from_seq: u64,
        mut visit: impl FnMut(u64, Timestamp, Vec<Command>, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        const PAGE: i64 = 1_000;
        let mut next = from_seq as i64;
        loop {
            let rows = self
                .client
                .query(
                    "SELECT seq, at, format, commands, receipts FROM journal WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&next, &PAGE],
                )
                .map_err(database)?;
            for row in &rows {
                let seq = row.get::<_, i64>(0) as u64;
                let format = row.get::<_, i32>(2) as u32;
                if format > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat { found: format, supported: FORMAT_VERSION });
                }
                let commands = codec::decode_commands(row.get::<_, &[u8]>(3), seq)?;
                visit(seq, row.get(1), commands, row.get::<_, &[u8]>(4))?;
                next = seq as i64 + 1;
            }
            if (rows.len() as i64) < PAGE {
                return Ok(());
            }
        }
    }

    fn latest_snapshot(&mut self) -> Result<Option<(u64, State)>, StoreError> {
        let row = self
            .client
            .query_opt("SELECT seq, format, state FROM snapshots ORDER BY seq DESC LIMIT 1", &[])
            .map_err(database)?;
        let Some(row) = row else { return Ok(None) };
        let (seq, format) = (row.get::<_, i64>(0) as u64, row.get::<_, i32>(1) as u32);
        if format > FORMAT_VERSION {
            return Err(StoreError::NewerFormat { found: format, supported: FORMAT_VERSION });
        }
        Ok(Some((seq, codec::decode_state(row.get::<_, &[u8]>(2), seq)?)))
    }
}

impl Store for PostgresStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        self.reconnect_if_closed()?;
        let snapshot = self.latest_snapshot()?;
        crate::replay(snapshot, |from, visit| self.scan_journal(from, visit))
    }

    fn commit(&mut self, batches: &[JournalBatch<'_>]) -> Result<(), StoreError> {
        self.reconnect_if_closed()?;
        let mut seqs = Vec::with_capacity(batches.len());
        let mut ats = Vec::with_capacity(batches.len());
        let mut formats = Vec::with_capacity(batches.len());
        let mut counts = Vec::with_capacity(batches.len());
        let mut commands = Vec::with_capacity(batches.len());
        let mut receipts = Vec::with_capacity(batches.len());
        for batch in batches {
            let batch_commands: Vec<&Command> = batch.entries.iter().map(|(command, _)| *command).collect();
            let batch_receipts: Vec<&Receipt> = batch.entries.iter().map(|(_, receipt)| *receipt).collect();
            seqs.push(batch.seq as i64);
            ats.push(batch.at);
            formats.push(FORMAT_VERSION as i32);
            counts.push(batch.entries.len() as i32);
            commands.push(codec::encode(&batch_commands));
            receipts.push(codec::encode(&batch_receipts));
        }
        // One statement for every batch; the transaction commits all or nothing.
        let mut transaction = self.client.transaction().map_err(database)?;
        fence(&mut transaction, &self.lease)?;
        transaction
            .execute(
                "INSERT INTO journal (seq, at, format, command_count, commands, receipts)
                 SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::INT[], $4::INT[], $5::BYTEA[], $6::BYTEA[])",
                &[&seqs, &ats, &formats, &counts, &commands, &receipts],
            )
            .map_err(database)?;
        transaction.commit().map_err(database)
    }

    fn snapshots(&self) -> Result<Box<dyn Snapshots>, StoreError> {
        let store = PostgresStore::open_in_schema(&self.url, self.schema.as_deref())?;
        Ok(Box::new(SnapshotRows { store }))
    }
}

/// Reads the journal and writes snapshot rows over a connection of its own, unfenced
/// on purpose: a snapshot only restates journal records that were committed under the
/// lease, which a later leader continues and never rewrites, and taking the lease row's
/// lock would make the commits wait for the whole write.
struct SnapshotRows {
    store: PostgresStore,
}

impl Snapshots for SnapshotRows {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        self.store.load()
    }

    fn write(&mut self, seq: u64, encoded: &[u8]) -> Result<(), StoreError> {
        self.store.reconnect_if_closed()?;
        let mut transaction = self.store.client.transaction().map_err(database)?;
        transaction
            .execute(
                "INSERT INTO snapshots (seq, format, state) VALUES ($1, $2, $3)
                 ON CONFLICT (seq) DO UPDATE SET format = EXCLUDED.format, state = EXCLUDED.state",
                &[&(seq as i64), &(FORMAT_VERSION as i32), &encoded],
            )
            .map_err(database)?;
        transaction
            .execute(
                "DELETE FROM snapshots WHERE seq NOT IN (SELECT seq FROM snapshots ORDER BY seq DESC LIMIT $1)",
                &[&(SNAPSHOTS_KEPT + 1)],
            )
            .map_err(database)?;
        transaction.commit().map_err(database)
    }
}

/// Fencing: with a lease, checks that it is still this holder's at this epoch, and locks
/// the lease row for the rest of the transaction, so a takeover (which updates it)
/// either waits for this transaction or came before it and makes this check fail.
/// Either way no two writers ever write.
fn fence(transaction: &mut postgres::Transaction<'_>, lease: &Option<(String, i64)>) -> Result<(), StoreError> {
    let Some((holder, epoch)) = lease else { return Ok(()) };
    let held = transaction
        .query_opt("SELECT 1 FROM tally_lease WHERE id = 1 AND holder = $1 AND epoch = $2 FOR SHARE", &[holder, epoch])
        .map_err(database)?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced { holder: holder.clone(), epoch: *epoch }),
    }
}

/// Keeps a node's local SQLite journal a copy of PostgreSQL's, so the node's history
/// projection (movements, events, webhooks) works as on the embedded store. The copy is
/// a cache: it is only ever appended from PostgreSQL, in sequence order.
pub struct JournalMirror {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Journal records copied per round.
const MIRROR_PAGE: i64 = 1_000;

impl JournalMirror {
    /// Copies new records from `url` into the SQLite database at `path` (migrated by
    /// `SqliteStore::open`) every `poll`, or at once after `notify`, then calls
    /// `copied`.
    pub fn spawn(
        url: &str,
        schema: Option<&str>,
        path: &std::path::Path,
        poll: std::time::Duration,
        copied: impl Fn() + Send + 'static,
    ) -> Result<JournalMirror, StoreError> {
        use std::sync::atomic::Ordering;
        let local = crate::sqlite::open_connection(path)?;
        let (url, schema) = (url.to_string(), schema.map(str::to_string));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wake = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let thread = {
            let (stop, wake) = (stop.clone(), wake.clone());
            std::thread::Builder::new()
                .name("tally-mirror".into())
                .spawn(move || {
                    let mut remote: Option<Client> = None;
                    while !stop.load(Ordering::Acquire) {
                        let copied_some = match mirror_some(&mut remote, &url, schema.as_deref(), &local) {
                            Ok(count) => count > 0,
                            Err(error) => {
                                tracing::warn!(%error, "copying the journal from PostgreSQL failed; retrying");
                                remote = None;
                                false
                            }
                        };
                        if copied_some {
                            copied();
                            continue;
                        }
                        let (flag, condvar) = &*wake;
                        let mut woken = flag.lock().expect("mirror wake lock");
                        if !*woken {
                            woken = condvar.wait_timeout(woken, poll).expect("mirror wake lock").0;
                        }
                        *woken = false;
                    }
                })
                .expect("spawn mirror thread")
        };
        Ok(JournalMirror { stop, wake, thread: Some(thread) })
    }

    /// New records are in PostgreSQL (the engine committed).
    pub fn notify(&self) {
        let (flag, condvar) = &*self.wake;
        *flag.lock().expect("mirror wake lock") = true;
        condvar.notify_one();
    }
}

impl Drop for JournalMirror {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.notify();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mirror_some(
    remote: &mut Option<Client>,
    url: &str,
    schema: Option<&str>,
    local: &rusqlite::Connection,
) -> Result<usize, StoreError> {
    if remote.as_ref().is_none_or(|client| client.is_closed()) {
        *remote = Some(connect(url, schema)?);
    }
    let client = remote.as_mut().expect("connected above");
    let last: i64 = local.query_row("SELECT COALESCE(MAX(seq), 0) FROM journal", [], |row| row.get(0))?;
    let rows = client
        .query(
            "SELECT seq, at, format, command_count, commands, receipts FROM journal WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&last, &MIRROR_PAGE],
        )
        .map_err(database)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let transaction = local.unchecked_transaction()?;
    let mut inserted = 0;
    {
        let mut insert = transaction.prepare_cached(
            "INSERT OR IGNORE INTO journal (seq, at, format, command_count, commands, receipts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (expected, row) in (last + 1..).zip(rows.iter()) {
            let seq: i64 = row.get(0);
            if seq != expected {
                // A gap: a commit with a lower sequence is not visible yet. Stop here
                // and copy it next round, so the copy never skips a record.
                break;
            }
            insert.execute(rusqlite::params![
                seq,
                row.get::<_, i64>(1),
                row.get::<_, i32>(2),
                row.get::<_, i32>(3),
                row.get::<_, &[u8]>(4),
                row.get::<_, &[u8]>(5)
            ])?;
            inserted += 1;
        }
    }
    transaction.commit()?;
    Ok(inserted)
}
