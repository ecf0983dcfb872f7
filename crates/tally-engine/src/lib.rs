//! Tally's single writer. One thread owns the ledger state; requests arrive on a bounded
//! queue; the writer applies a batch of them in order, hands the batch to the committer
//! thread, which makes it durable in one transaction and only then answers every request
//! in it. While one batch is being committed the writer applies the next, so the disk
//! and the state machine work at the same time; answers still leave strictly in order.

mod clock;
mod follower;

pub use clock::{Clock, ManualClock, SystemClock};
pub use follower::Follower;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tally_ledger::{Command, PaymentReceipt, PayoutReceipt, Receipt, Rejection, Settings, State, Timestamp};
use tally_store::{encode_snapshot, JournalBatch, Loaded, Snapshots, Store, StoreError};

/// How many commands ahead of the one being applied the writer prefetches.
pub const PREFETCH_DISTANCE: usize = 8;

/// Idempotency keys the writer makes room for when it starts (about 100 MB), so the
/// first hours of traffic never wait for the key table to grow.
pub const IDEMPOTENCY_KEYS_RESERVED: usize = 2 << 20;

/// A read: a function of the state, run on the writer thread and answered in order.
pub type ReadFn = Box<dyn FnOnce(&State) -> Box<dyn Any + Send> + Send>;
/// How an answer gets back to its caller; called on the committer thread, so it must be quick.
pub type Reply = Box<dyn FnOnce(Outcome) + Send>;
pub type Outcome = Result<Answer, EngineError>;

pub enum Request {
    Command(Command),
    /// A read answered after every write before it is durable.
    Read(ReadFn),
}

// Receipts are moved, not boxed: one allocation less per command on the hot path.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    Receipt(Receipt),
    Read(Box<dyn Any + Send>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Rejected(Rejection),
    #[error("the engine's queue is full; retry shortly")]
    Busy,
    #[error("storage failed; the batch was not applied: {0}")]
    Storage(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// This node follows the journal as a standby; writes go to the leader.
    #[error("this node is a standby; send writes to the leader")]
    NotLeader { leader: Option<String> },
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Requests waiting for the writer; beyond this, submit answers `Busy` at once
    /// instead of letting a backlog (and its latency) grow without bound.
    pub queue_capacity: usize,
    /// Most requests applied and committed as one batch.
    pub batch_size_max: usize,
    /// Journaled commands between snapshots; bounds how much a restart replays.
    pub snapshot_every_commands: u64,
    /// Whether a clean shutdown writes a snapshot (benchmarks of crash recovery turn it off).
    pub snapshot_on_shutdown: bool,
    pub settings: Settings,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            queue_capacity: 65_536,
            batch_size_max: 8_192,
            snapshot_every_commands: 2_000_000,
            snapshot_on_shutdown: true,
            settings: Settings::default(),
        }
    }
}

/// Counters the engine keeps for benchmarks, health checks and metrics.
#[derive(Debug)]
pub struct EngineStats {
    pub batches: AtomicU64,
    pub requests: AtomicU64,
    pub journaled_commands: AtomicU64,
    pub durable_seq: AtomicU64,
    pub storage_failures: AtomicU64,
    pub ready: AtomicBool,
    /// Commands applied, by `Command::kind_index`.
    pub commands: Vec<AtomicU64>,
    /// Refusals, by `Rejection::index`.
    pub rejections: Vec<AtomicU64>,
    /// Requests per batch.
    pub batch_sizes: Histogram,
    /// Seconds per journal commit.
    pub commit_seconds: Histogram,
}

impl Default for EngineStats {
    fn default() -> EngineStats {
        EngineStats {
            batches: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            journaled_commands: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            storage_failures: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            commands: (0..Command::KINDS.len()).map(|_| AtomicU64::new(0)).collect(),
            rejections: (0..Rejection::ALL.len()).map(|_| AtomicU64::new(0)).collect(),
            batch_sizes: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
        }
    }
}

enum Message {
    Request(Request, Option<Reply>),
    Shutdown,
}

enum CommitMessage {
    Batch(Batch),
    /// The encoded state after batch `seq` (on shutdown), written once every batch before it is durable.
    Snapshot(u64, Vec<u8>),
    Reload(Sender<Result<Loaded, StoreError>>),
    Stop,
}

struct Entry {
    /// The command, kept only when it changed the state and so goes to the journal.
    journaled: Option<Command>,
    outcome: Outcome,
    reply: Option<Reply>,
}

struct Batch {
    seq: u64,
    at: Timestamp,
    entries: Vec<Entry>,
}

/// The cheap, cloneable way in: submit requests, or run them and wait.
#[derive(Clone)]
pub struct Handle {
    queue: Sender<Message>,
    stats: Arc<EngineStats>,
}

impl Handle {
    /// Queues a request; `reply` is called once with the outcome after it is durable.
    pub fn submit(&self, request: Request, reply: Reply) -> Result<(), EngineError> {
        match self.queue.try_send(Message::Request(request, Some(reply))) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(EngineError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShuttingDown),
        }
    }

    /// Runs a command and waits for its durable outcome.
    pub fn execute(&self, command: Command) -> Result<Receipt, EngineError> {
        let (sender, receiver) = bounded(1);
        self.submit(Request::Command(command), Box::new(move |outcome| drop(sender.send(outcome))))?;
        match receiver.recv().map_err(|_| EngineError::ShuttingDown)?? {
            Answer::Receipt(receipt) => Ok(receipt),
            Answer::Read(_) => unreachable!("a command is answered with a receipt"),
        }
    }

    /// Reads from the state as of all writes before it, once they are durable.
    pub fn read<T: Send + 'static>(&self, read: impl FnOnce(&State) -> T + Send + 'static) -> Result<T, EngineError> {
        let (sender, receiver) = bounded(1);
        let request = Request::Read(Box::new(move |state| Box::new(read(state)) as Box<dyn Any + Send>));
        self.submit(request, Box::new(move |outcome| drop(sender.send(outcome))))?;
        match receiver.recv().map_err(|_| EngineError::ShuttingDown)?? {
            Answer::Read(value) => Ok(*value.downcast::<T>().expect("read answers with its own type")),
            Answer::Receipt(_) => unreachable!("a read is answered with a value"),
        }
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

pub struct Engine {
    handle: Handle,
    writer: Option<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
    snapshotter: Option<JoinHandle<()>>,
}

/// What happens after each durable commit (for example, waking the history projector).
pub type OnCommit = Box<dyn Fn(u64) + Send>;

impl Engine {
    /// Loads the state from `store`, checks it, and starts the writer and committer.
    pub fn start<S: Store>(
        mut store: S,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        on_commit: Option<OnCommit>,
    ) -> Result<Engine, StoreError> {
        let loaded = store.load()?;
        tracing::info!(
            seq = loaded.seq,
            replayed_batches = loaded.replayed_batches,
            replayed_commands = loaded.replayed_commands,
            wallets = loaded.state.wallets.len(),
            "ledger state loaded"
        );
        // Journal records are numbered without gaps, so the loaded snapshot is the
        // record before the first one replayed.
        let loaded_snapshot_seq = loaded.seq - loaded.replayed_batches;
        let mut loaded = loaded;
        if loaded.state.settings != config.settings {
            // A settings change is journaled like any command, so replays stay exact.
            let configure = Command::Configure { settings: config.settings };
            let now = clock.now();
            let receipt = loaded
                .state
                .apply(&configure, now)
                .map_err(|rejection| StoreError::ReplayDiverged { seq: loaded.seq, detail: rejection.code().into() })?;
            loaded.seq += 1;
            store.commit(&[JournalBatch { seq: loaded.seq, at: now, entries: vec![(&configure, &receipt)] }])?;
        }
        loaded.state.reserve_idempotency_keys(IDEMPOTENCY_KEYS_RESERVED);
        let stats = Arc::new(EngineStats::default());
        stats.durable_seq.store(loaded.seq, Ordering::Release);
        let (queue, requests) = bounded(config.queue_capacity);
        // Batches in flight between writer and committer: the writer keeps applying
        // while a commit is under way, and the committer groups what piled up.
        let (commits, commit_queue) = bounded(COMMIT_QUEUE_BATCHES);
        let failed = Arc::new(AtomicBool::new(false));
        // The newest snapshot's sequence: the loaded one, then each one written.
        let snapshot_seq = Arc::new(AtomicU64::new(loaded_snapshot_seq));
        let (snapshots, snapshot_queue) = bounded(1);
        let snapshotter = {
            let snapshotter = Snapshotter {
                store: store.snapshots()?,
                every: config.snapshot_every_commands,
                stats: stats.clone(),
                snapshot_seq: snapshot_seq.clone(),
                journaled_before: -(loaded.replayed_commands as i64),
                rest_until: Instant::now(),
            };
            std::thread::Builder::new()
                .name("tally-snapshot".into())
                .spawn(move || snapshotter.run(snapshot_queue))
                .expect("spawn snapshot thread")
        };
        let committer = {
            let (stats, failed) = (stats.clone(), failed.clone());
            std::thread::Builder::new()
                .name("tally-committer".into())
                .spawn(move || run_committer(store, commit_queue, stats, failed, on_commit, snapshots))
                .expect("spawn committer thread")
        };
        let writer = {
            let stats = stats.clone();
            let writer = Writer {
                state: loaded.state,
                seq: loaded.seq,
                last_now: Timestamp::MIN,
                clock,
                config,
                commits,
                failed,
                stats,
                snapshot_seq,
            };
            std::thread::Builder::new()
                .name("tally-writer".into())
                .spawn(move || writer.run(requests))
                .expect("spawn writer thread")
        };
        stats.ready.store(true, Ordering::Release);
        Ok(Engine {
            handle: Handle { queue, stats },
            writer: Some(writer),
            committer: Some(committer),
            snapshotter: Some(snapshotter),
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stops taking requests, answers everything already queued, writes a snapshot and
    /// waits for both threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(writer) = self.writer.take() {
            // A blocking send: shutdown waits its turn behind queued requests.
            let _ = self.handle.queue.send(Message::Shutdown);
            let _ = writer.join();
        }
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
        // The committer's end closes the snapshot queue; a snapshot being written (the
        // one a clean shutdown takes) is finished first.
        if let Some(snapshotter) = self.snapshotter.take() {
            let _ = snapshotter.join();
        }
        self.handle.stats.ready.store(false, Ordering::Release);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Writer {
    state: State,
    seq: u64,
    last_now: Timestamp,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    commits: Sender<CommitMessage>,
    failed: Arc<AtomicBool>,
    stats: Arc<EngineStats>,
    /// The newest snapshot's sequence.
    snapshot_seq: Arc<AtomicU64>,
}

/// The longest the writer sleeps without looking at the clock, so expiry runs on time
/// even when no request arrives.
const IDLE_WAKE_MAX: Duration = Duration::from_millis(50);

impl Writer {
    fn now(&mut self) -> Timestamp {
        // Time never runs backwards inside the ledger, whatever the wall clock does.
        self.last_now = self.last_now.max(self.clock.now());
        self.last_now
    }

    fn run(mut self, requests: Receiver<Message>) {
        let mut shutting_down = false;
        while !shutting_down {
            let wait = match self.state.next_due() {
                Some(due) => Duration::from_millis(due.saturating_sub(self.clock.now()).clamp(0, 50) as u64),
                None => IDLE_WAKE_MAX,
            };
            let first = match requests.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Checked after the wait, so a request sent after a failed commit was
            // answered is applied to the reloaded state, not the stale one.
            if self.failed.load(Ordering::Acquire) {
                self.recover();
            }
            let now = self.now();
            let mut entries = Vec::new();
            if self.state.next_due().is_some_and(|due| due <= now) {
                self.apply(Request::Command(Command::Tick), None, now, &mut entries);
            }
            // Drain the batch first, so each command's memory can be prefetched a few
            // commands before it is applied.
            let mut pending: VecDeque<(Request, Option<Reply>)> = VecDeque::new();
            let mut next = first;
            while let Some(message) = next {
                match message {
                    Message::Request(request, reply) => pending.push_back((request, reply)),
                    Message::Shutdown => {
                        shutting_down = true;
                        // Answer what is already queued; later senders see the closed queue.
                        while let Ok(Message::Request(request, reply)) = requests.try_recv() {
                            pending.push_back((request, reply));
                        }
                        break;
                    }
                }
                if pending.len() >= self.config.batch_size_max {
                    break;
                }
                next = requests.try_recv().ok();
            }
            entries.reserve(pending.len());
            while let Some((request, reply)) = pending.pop_front() {
                if let Some((Request::Command(ahead), _)) = pending.get(PREFETCH_DISTANCE - 1) {
                    self.state.prefetch(ahead);
                }
                if let Some((Request::Command(ahead), _)) = pending.get(PREFETCH_DISTANCE / 2 - 1) {
                    self.state.prefetch_dependent(ahead);
                }
                self.apply(request, reply, now, &mut entries);
            }
            if !entries.is_empty() {
                self.send_batch(now, entries);
            }
            if shutting_down && self.config.snapshot_on_shutdown && self.seq > self.snapshot_seq.load(Ordering::Acquire)
            {
                self.snapshot();
            }
        }
        let _ = self.commits.send(CommitMessage::Stop);
    }

    fn apply(&mut self, request: Request, reply: Option<Reply>, now: Timestamp, entries: &mut Vec<Entry>) {
        let (journaled, outcome) = match request {
            Request::Command(command) => {
                let result = self.state.apply(&command, now);
                self.stats.commands[command.kind_index()].fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(receipt) => {
                        let changed = match &receipt {
                            Receipt::Replayed(_) => false,
                            // A repeated top-up or checkout request, or a late provider
                            // answer to a settled one, changes nothing.
                            Receipt::Payment(
                                PaymentReceipt::TopUp { created: false, settled: false, .. }
                                | PaymentReceipt::Checkout { created: false, settled: false, .. }
                                | PaymentReceipt::Refund { created: false, settled: false, .. },
                            ) => false,
                            Receipt::Payout(PayoutReceipt::Payout { created: false, settled: false, .. }) => false,
                            // A tick runs only when something is due, and it may change state
                            // without moving money (a grant turning expired), so every tick is
                            // journaled: replay must see it.
                            Receipt::Expired { .. } => true,
                            _ => true,
                        };
                        (changed.then_some(command), Ok(Answer::Receipt(receipt)))
                    }
                    Err(rejection) => {
                        self.stats.rejections[rejection.index()].fetch_add(1, Ordering::Relaxed);
                        (None, Err(EngineError::Rejected(rejection)))
                    }
                }
            }
            Request::Read(read) => (None, Ok(Answer::Read(read(&self.state)))),
        };
        if journaled.is_none() && reply.is_none() {
            return;
        }
        entries.push(Entry { journaled, outcome, reply });
    }

    fn send_batch(&mut self, now: Timestamp, entries: Vec<Entry>) {
        let journals = entries.iter().any(|entry| entry.journaled.is_some());
        if journals {
            self.seq += 1;
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.batch_sizes.observe(entries.len() as f64);
        self.stats.requests.fetch_add(entries.len() as u64, Ordering::Relaxed);
        // A batch that wrote nothing (reads, rejections, replays) answers from state; when
        // every write applied so far is already durable, that state is durable too, so it
        // is answered here rather than after a hop through the committer.
        if !journals
            && self.stats.durable_seq.load(Ordering::Acquire) == self.seq
            && !self.failed.load(Ordering::Acquire)
        {
            for entry in entries {
                if let Some(reply) = entry.reply {
                    reply(entry.outcome);
                }
            }
            return;
        }
        let batch = Batch { seq: if journals { self.seq } else { 0 }, at: now, entries };
        if self.commits.send(CommitMessage::Batch(batch)).is_err() {
            tracing::error!("committer stopped; requests in the batch are dropped unanswered");
        }
    }

    /// On shutdown, the state is encoded here (nothing waits any more) and written by
    /// the snapshot thread once every batch before it is durable; the periodic
    /// snapshots are the snapshot thread's own work (see [`Snapshotter`]).
    fn snapshot(&mut self) {
        let encoded = encode_snapshot(&self.state);
        let _ = self.commits.send(CommitMessage::Snapshot(self.seq, encoded));
    }

    /// After a failed commit: memory may be ahead of disk, so it is replaced by the
    /// last durable state, loaded again from storage.
    fn recover(&mut self) {
        tracing::warn!("a commit failed; reloading the last durable state");
        let (sender, receiver) = bounded(1);
        if self.commits.send(CommitMessage::Reload(sender)).is_err() {
            return;
        }
        match receiver.recv() {
            Ok(Ok(loaded)) => {
                self.state = loaded.state;
                self.seq = loaded.seq;
            }
            Ok(Err(error)) => panic!("the durable state cannot be reloaded: {error}"),
            Err(_) => {}
        }
    }
}

/// The shortest time between two commits. Commits faster than this only add small
/// synchronous writes that the disk serializes; waiting lets the next commit carry
/// every batch applied meanwhile. Costs at most this much latency when idle, and a
/// closed-loop client (64 HTTP connections, each waiting for its answer) pays it on
/// every request: 1 ms gave 26,245–26,444 transfers/s over HTTP, 250 µs
/// 30,695–31,998/s, side by side; the engine's p99 at 50,000 charges/s offered stayed
/// at 1.7–2.8 ms (BENCHMARKS.md).
const COMMIT_INTERVAL_MIN: Duration = Duration::from_micros(250);
/// A commit slower than this is logged: it delays every request behind it.
const SLOW_COMMIT: Duration = Duration::from_millis(20);

/// Writer batches that may wait for the committer before the writer itself waits.
const COMMIT_QUEUE_BATCHES: usize = 64;
/// Most writer batches committed in one transaction.
const COMMIT_GROUP_MAX: usize = 64;

/// How long the committer waits between attempts to reload after a storage failure.
const RELOAD_RETRY: Duration = Duration::from_millis(500);
/// Attempts to reload before giving up; the process then stops rather than serve stale state.
const RELOAD_ATTEMPTS_MAX: u32 = 120;

fn run_committer<S: Store>(
    mut store: S,
    queue: Receiver<CommitMessage>,
    stats: Arc<EngineStats>,
    failed: Arc<AtomicBool>,
    on_commit: Option<OnCommit>,
    snapshots: Sender<(u64, Vec<u8>)>,
) {
    let mut last_commit = Instant::now();
    let mut deferred: Option<CommitMessage> = None;
    loop {
        let message = match deferred.take() {
            Some(message) => message,
            None => match queue.recv() {
                Ok(message) => message,
                Err(_) => break,
            },
        };
        match message {
            CommitMessage::Batch(batch) => {
                // Group commit across batches: when commits come faster than the disk
                // likes, wait out the minimum interval and take every batch that
                // arrived meanwhile into the same transaction (one sync for all).
                // Batches of reads and rejections write nothing, so they do not wait.
                let since = last_commit.elapsed();
                if batch.seq != 0 && since < COMMIT_INTERVAL_MIN {
                    std::thread::sleep(COMMIT_INTERVAL_MIN - since);
                }
                let mut group = vec![batch];
                while group.len() < COMMIT_GROUP_MAX {
                    match queue.try_recv() {
                        Ok(CommitMessage::Batch(batch)) => group.push(batch),
                        Ok(other) => {
                            deferred = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if commit_group(&mut store, group, &stats, &failed, on_commit.as_ref()) {
                    last_commit = Instant::now();
                }
            }
            CommitMessage::Snapshot(seq, encoded) => {
                // Every batch up to `seq` came before this message: each is durable, or
                // one failed and the state may hold writes the disk does not.
                if !failed.load(Ordering::Acquire) {
                    let _ = snapshots.send((seq, encoded));
                }
            }
            CommitMessage::Reload(answer) => {
                let mut attempt = 0;
                let loaded = loop {
                    attempt += 1;
                    match store.load() {
                        Ok(loaded) => break Ok(loaded),
                        Err(error) if attempt >= RELOAD_ATTEMPTS_MAX => break Err(error),
                        Err(error) => {
                            tracing::warn!(%error, attempt, "reload failed; retrying");
                            std::thread::sleep(RELOAD_RETRY);
                        }
                    }
                };
                if loaded.is_ok() {
                    failed.store(false, Ordering::Release);
                    stats.ready.store(true, Ordering::Release);
                }
                let _ = answer.send(loaded);
            }
            CommitMessage::Stop => break,
        }
    }
}

/// Gives the calling thread the lowest priority (nice 19): when the cores are busy it
/// gets a small share, so a snapshot's rebuild barely takes a core from the writer or
/// the committer (at 50,000 charges/s, p99 14.6 ms across a snapshot at normal
/// priority), yet it always progresses, so snapshots never stop under full load.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; setpriority with PRIO_PROCESS and a thread
        // id changes only that thread's nice value.
        let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        if result != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "the snapshot thread keeps its normal priority");
        }
    }
}

/// How often the snapshot thread looks whether a snapshot is due.
const SNAPSHOT_POLL: Duration = Duration::from_millis(20);

/// Takes the periodic snapshots off the writer's and the committer's paths. Copying the
/// writer's state would stop it for as long as the copy takes (seconds for hundreds of
/// megabytes of key tables on a machine that faults fresh memory in slowly; measured
/// 1.6-4 s), and encoding it there for hundreds of milliseconds. Instead this thread
/// rebuilds the state from storage, the newest snapshot plus the durable journal
/// after it, exactly as a restart would (so every snapshot also proves the journal
/// replays), and writes the result. It costs a second copy of the state while it
/// runs, and the replay's CPU on the other core.
struct Snapshotter {
    store: Box<dyn Snapshots>,
    every: u64,
    stats: Arc<EngineStats>,
    snapshot_seq: Arc<AtomicU64>,
    /// The journaled-command count as of the newest snapshot (negative at start: the
    /// commands replayed after the loaded snapshot count too).
    journaled_before: i64,
    /// No snapshot starts before this: after each one the thread rests as long as it
    /// took, so snapshots use at most half a core however fast commands arrive.
    rest_until: Instant,
}

impl Snapshotter {
    fn run(mut self, shutdown_snapshots: Receiver<(u64, Vec<u8>)>) {
        lower_priority();
        loop {
            match shutdown_snapshots.recv_timeout(SNAPSHOT_POLL) {
                Ok((seq, encoded)) => self.write(seq, &encoded, Duration::ZERO),
                Err(RecvTimeoutError::Timeout) => {
                    let journaled = self.stats.journaled_commands.load(Ordering::Relaxed) as i64;
                    if journaled - self.journaled_before >= self.every as i64 && Instant::now() >= self.rest_until {
                        // Whatever happens, the next attempt waits for another interval.
                        self.journaled_before = journaled;
                        self.take();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn take(&mut self) {
        let started = Instant::now();
        match self.store.load() {
            Ok(loaded) if loaded.replayed_batches > 0 => {
                let encoded = encode_snapshot(&loaded.state);
                drop(loaded.state);
                self.write(loaded.seq, &encoded, started.elapsed());
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "rebuilding the state for a snapshot failed; the journal still holds everything")
            }
        }
        self.rest_until = Instant::now() + started.elapsed();
    }

    fn write(&mut self, seq: u64, encoded: &[u8], rebuilt_in: Duration) {
        let started = Instant::now();
        match self.store.write(seq, encoded) {
            Ok(()) => {
                self.snapshot_seq.fetch_max(seq, Ordering::AcqRel);
                tracing::info!(
                    seq,
                    bytes = encoded.len(),
                    rebuild_ms = rebuilt_in.as_secs_f64() * 1e3,
                    write_ms = started.elapsed().as_secs_f64() * 1e3,
                    "snapshot written"
                );
            }
            Err(error) => tracing::warn!(%error, seq, "snapshot not written; the journal still holds everything"),
        }
    }
}

/// Commits a group of batches in one transaction, then answers every request in them in
/// order; on failure every request gets the error and the writer is told to reload.
fn commit_group<S: Store>(
    store: &mut S,
    group: Vec<Batch>,
    stats: &EngineStats,
    failed: &AtomicBool,
    on_commit: Option<&OnCommit>,
) -> bool {
    let writes = group.iter().any(|batch| batch.seq != 0);
    let result = if failed.load(Ordering::Acquire) {
        Err("an earlier batch failed to commit".to_string())
    } else {
        let journals: Vec<JournalBatch<'_>> = group
            .iter()
            .filter(|batch| batch.seq != 0)
            .map(|batch| JournalBatch {
                seq: batch.seq,
                at: batch.at,
                entries: batch
                    .entries
                    .iter()
                    .filter_map(|entry| match (&entry.journaled, &entry.outcome) {
                        (Some(command), Ok(Answer::Receipt(receipt))) => Some((command, receipt)),
                        _ => None,
                    })
                    .collect(),
            })
            .collect();
        if journals.is_empty() {
            Ok(())
        } else {
            let started = Instant::now();
            let result = store.commit(&journals).map_err(|error| error.to_string());
            let took = started.elapsed();
            stats.commit_seconds.observe(took.as_secs_f64());
            if took > SLOW_COMMIT {
                tracing::warn!(took_ms = took.as_millis() as u64, batches = journals.len(), "slow commit");
            }
            result
        }
    };
    match result {
        Ok(()) => {
            if let Some(seq) = group.iter().map(|batch| batch.seq).max().filter(|seq| *seq != 0) {
                stats.durable_seq.store(seq, Ordering::Release);
                let journaled = group.iter().flat_map(|b| &b.entries).filter(|e| e.journaled.is_some()).count();
                stats.journaled_commands.fetch_add(journaled as u64, Ordering::Relaxed);
                if let Some(on_commit) = on_commit {
                    on_commit(seq);
                }
            }
            for entry in group.into_iter().flat_map(|batch| batch.entries) {
                if let Some(reply) = entry.reply {
                    reply(entry.outcome);
                }
            }
        }
        Err(error) => {
            if !failed.swap(true, Ordering::AcqRel) {
                tracing::error!(%error, "commit failed");
                stats.storage_failures.fetch_add(1, Ordering::Relaxed);
                stats.ready.store(false, Ordering::Release);
            }
            for entry in group.into_iter().flat_map(|batch| batch.entries) {
                if let Some(reply) = entry.reply {
                    reply(Err(EngineError::Storage(error.clone())));
                }
            }
        }
    }
    writes
}
