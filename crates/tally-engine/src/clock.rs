//! Where the engine gets the time. The core never reads a clock; the engine reads one
//! of these once per batch, and tests inject a manual one to drive expiry.

use std::sync::atomic::{AtomicI64, Ordering};
use tally_ledger::Timestamp;

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let elapsed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("the system clock is after 1970");
        i64::try_from(elapsed.as_millis()).expect("milliseconds fit in i64")
    }
}

/// A clock that moves only when told to.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock(AtomicI64::new(start))
    }

    pub fn advance(&self, milliseconds: i64) {
        self.0.fetch_add(milliseconds, Ordering::SeqCst);
    }

    pub fn set(&self, now: Timestamp) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        self.0.load(Ordering::SeqCst)
    }
}
