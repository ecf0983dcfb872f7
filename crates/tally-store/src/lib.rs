//! Tally's durable storage. The commit path writes each batch of accepted commands and
//! their receipts as one journal record in one transaction; snapshots of the state cut
//! restart time; the queryable history (operations, movements) is projected from the
//! journal by a separate thread, off the commit path.

mod api_keys;
mod check;
mod codec;
pub mod events;
mod postgres;
mod projector;
mod snapshots;
mod sqlite;
pub mod webhooks;

pub use api_keys::{ApiKeyRecord, ApiKeys};
pub use check::{deep_check, CheckReport};
pub use codec::{decode_commands, decode_receipts, FORMAT_VERSION};
pub use postgres::{JournalMirror, Lease, PostgresStore};
pub use projector::{
    rebuild_renumbers_events, remove_history, ChargeDetail, EventFilter, EventRow, HistoryReader, Movement,
    MovementFilter, Projector, UsageRecord, PAGE_SIZE_MAX,
};
pub use snapshots::snapshot_dir;
pub use sqlite::{encode_snapshot, history_path, SqliteStore};

use tally_ledger::{Command, Receipt, State, Timestamp};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL error: {0}")]
    Postgres(String),
    #[error("fenced: {holder} no longer holds the writer's lease at epoch {epoch}; another node took over")]
    Fenced { holder: String, epoch: i64 },
    #[error("a stored value has the wrong type: {0}")]
    WrongType(#[from] rusqlite::types::FromSqlError),
    #[error("could not decode stored record {what} at journal sequence {seq}: {detail}")]
    Corrupt { what: &'static str, seq: u64, detail: String },
    #[error("the database was written by a newer Tally (format {found}, this build reads up to {supported})")]
    NewerFormat { found: u32, supported: u32 },
    #[error("replaying journal sequence {seq} diverged: {detail}")]
    ReplayDiverged { seq: u64, detail: String },
    #[error("the loaded state breaks {} invariant(s): {}", .0.len(), .0.join("; "))]
    Invariants(Vec<String>),
}

/// One batch as it goes to disk: the commands that changed state, with their receipts,
/// all applied at time `at`.
pub struct JournalBatch<'a> {
    pub seq: u64,
    pub at: Timestamp,
    pub entries: Vec<(&'a Command, &'a Receipt)>,
}

/// The state as loaded, and the journal sequence it reflects.
pub struct Loaded {
    pub state: State,
    pub seq: u64,
    pub replayed_batches: u64,
    pub replayed_commands: u64,
}

/// Applies journal record `record_seq` (its commands, at time `at`) to a state that
/// reflects every record up to `seq`, exactly as the writer applied it: the step shared
/// by loading and by a standby following the journal.
pub fn apply_record(
    state: &mut State,
    seq: u64,
    record_seq: u64,
    at: Timestamp,
    commands: &[Command],
) -> Result<(), StoreError> {
    if record_seq != seq + 1 {
        return Err(StoreError::ReplayDiverged { seq: record_seq, detail: format!("expected sequence {}", seq + 1) });
    }
    for command in commands {
        if let Err(rejection) = state.apply(command, at) {
            return Err(StoreError::ReplayDiverged {
                seq: record_seq,
                detail: format!("a journaled command was rejected on replay: {}", rejection.code()),
            });
        }
    }
    Ok(())
}

/// Replays journal records (as `scan` visits them) onto `snapshot` (or an empty state
/// with default settings), then checks the invariants: the load both stores share.
/// Every change to settings is a journaled `Configure`, so a replay from nothing
/// decides exactly as the first run did.
pub(crate) fn replay(
    snapshot: Option<(u64, State)>,
    scan: impl FnOnce(
        u64,
        &mut dyn FnMut(u64, Timestamp, Vec<Command>, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>,
) -> Result<Loaded, StoreError> {
    let (mut seq, mut state) = snapshot.unwrap_or((0, State::new(tally_ledger::Settings::default())));
    let mut replayed_batches = 0;
    let mut replayed_commands = 0;
    scan(seq + 1, &mut |batch_seq, at, commands, _| {
        apply_record(&mut state, seq, batch_seq, at, &commands)?;
        replayed_batches += 1;
        replayed_commands += commands.len() as u64;
        seq = batch_seq;
        Ok(())
    })?;
    let problems = state.check_invariants();
    if !problems.is_empty() {
        return Err(StoreError::Invariants(problems));
    }
    Ok(Loaded { state, seq, replayed_batches, replayed_commands })
}

/// What the engine needs from durable storage.
pub trait Store: Send + 'static {
    /// Loads the latest snapshot and replays the journal after it.
    fn load(&mut self) -> Result<Loaded, StoreError>;
    /// Makes batches durable, all in one transaction, or fails having written nothing.
    fn commit(&mut self, batches: &[JournalBatch<'_>]) -> Result<(), StoreError>;
    /// A second handle on the same storage for the snapshot thread, which rebuilds the
    /// state from the newest snapshot and the durable journal after it, and stores the
    /// result as the next snapshot, without holding up the writer or the committer.
    fn snapshots(&self) -> Result<Box<dyn Snapshots>, StoreError>;
}

/// Snapshots, as the snapshot thread reads and writes them.
pub trait Snapshots: Send + 'static {
    /// Loads like [`Store::load`]: the newest snapshot and the durable journal after it.
    fn load(&mut self) -> Result<Loaded, StoreError>;
    /// Stores the encoded state after journal sequence `seq`, which is durable.
    fn write(&mut self, seq: u64, encoded: &[u8]) -> Result<(), StoreError>;
}
