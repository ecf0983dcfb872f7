//! A standby's engine: it keeps an in-memory state that follows the journal in
//! PostgreSQL (replaying each record as the leader applied it), answers reads from it,
//! and refuses commands with `NotLeader`. So a standby serves every read the leader
//! serves, slightly behind, and never writes.

use crate::{Answer, EngineError, EngineStats, Handle, Message, Request};
use crossbeam_channel::{bounded, RecvTimeoutError};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tally_ledger::State;
use tally_store::{PostgresStore, Store, StoreError};

/// Requests waiting for a standby (reads are quick; this bounds a burst).
const FOLLOWER_QUEUE: usize = 4_096;

pub struct Follower {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Follower {
    /// Loads the state from `store` and follows its journal every `poll`. `leader` is
    /// where writes should go, told to clients that send one here.
    pub fn start(
        mut store: PostgresStore,
        poll: Duration,
        leader: Arc<Mutex<Option<String>>>,
    ) -> Result<Follower, StoreError> {
        let loaded = store.load()?;
        let stats = Arc::new(EngineStats::default());
        stats.durable_seq.store(loaded.seq, Ordering::Release);
        // Not ready: a standby must not receive the leader's traffic.
        stats.ready.store(false, Ordering::Release);
        let (queue, requests) = bounded(FOLLOWER_QUEUE);
        let thread = {
            let stats = stats.clone();
            let (mut state, mut seq) = (loaded.state, loaded.seq);
            std::thread::Builder::new()
                .name("tally-follower".into())
                .spawn(move || {
                    let mut followed = Instant::now();
                    loop {
                        let wait = poll.saturating_sub(followed.elapsed());
                        let mut next = match requests.recv_timeout(wait) {
                            Ok(message) => Some(message),
                            Err(RecvTimeoutError::Timeout) => None,
                            Err(RecvTimeoutError::Disconnected) => return,
                        };
                        while let Some(message) = next {
                            match message {
                                Message::Request(Request::Read(read), Some(reply)) => {
                                    reply(Ok(Answer::Read(read(&state))))
                                }
                                Message::Request(Request::Command(_), Some(reply)) => {
                                    let leader = leader.lock().expect("leader lock").clone();
                                    reply(Err(EngineError::NotLeader { leader }))
                                }
                                Message::Request(_, None) => {}
                                Message::Shutdown => return,
                            }
                            next = requests.try_recv().ok();
                        }
                        if followed.elapsed() >= poll {
                            followed = Instant::now();
                            match follow(&mut store, &mut state, seq) {
                                Ok(new_seq) => {
                                    seq = new_seq;
                                    stats.durable_seq.store(seq, Ordering::Release);
                                }
                                Err(error) => {
                                    tracing::warn!(%error, "following the journal failed; loading again");
                                    match store.load() {
                                        Ok(loaded) => {
                                            (state, seq) = (loaded.state, loaded.seq);
                                            stats.durable_seq.store(seq, Ordering::Release);
                                        }
                                        Err(error) => tracing::warn!(%error, "loading the journal failed; retrying"),
                                    }
                                }
                            }
                        }
                    }
                })
                .expect("spawn follower thread")
        };
        Ok(Follower { handle: Handle { queue, stats }, thread: Some(thread) })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Stops following; requests still queued get no answer (their callers see the
    /// engine gone).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.handle.queue.send(Message::Shutdown);
            let _ = thread.join();
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Applies every journal record after `seq`, as the leader applied it; the new sequence.
fn follow(store: &mut PostgresStore, state: &mut State, mut seq: u64) -> Result<u64, StoreError> {
    store.scan_journal(seq + 1, |record_seq, at, commands, _| {
        tally_store::apply_record(state, seq, record_seq, at, &commands)?;
        seq = record_seq;
        Ok(())
    })?;
    Ok(seq)
}
