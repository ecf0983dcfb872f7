//! Tally's pure ledger core. It never reads the clock, the disk or the network: time
//! and commands are arguments, and the same inputs always give the same state.

pub mod billing;
pub mod command;
pub mod ids;
pub mod keys;
pub mod money;
pub mod payments;
pub mod payouts;
pub mod rejection;
pub mod state;
mod usage;

pub use command::*;
pub use ids::*;
pub use money::{Amount, Currency, Money, MoneyError, PartsPerMillion};
pub use payments::{PaymentCommand, PaymentReceipt, PaymentStatus, ProviderOutcome};
pub use payouts::{PayoutCommand, PayoutReceipt};
pub use rejection::Rejection;
pub use state::{
    fingerprint, Grant, GrantStatus, Hold, IdempotencyRecord, Organization, Portion, Reservation, Settings, State,
    Wallet,
};
