//! The binary encoding of journal records and snapshots (bincode, varint integers).
//! Its version is stored with every record so a newer build can still read old ones.

use crate::StoreError;
use bincode::Options;
use tally_ledger::{Command, Receipt, State};

/// The version of the record layout this build writes (it reads every version up to
/// it). 2: payments gained `CreateReviewedTopUp`, `AddMethodOnce` and the
/// `MethodSavedBefore` receipt (appended variants, so version 1 records decode as they
/// were); an older build refuses version 2 records as newer rather than failing to
/// decode them, so upgrade every node before a rollback would read them.
pub const FORMAT_VERSION: u32 = 2;
/// Largest record decoded, so a corrupt length cannot make decoding allocate without bound.
const RECORD_BYTES_MAX: u64 = 4 << 30;

fn options() -> impl Options {
    bincode::DefaultOptions::new().with_varint_encoding().with_limit(RECORD_BYTES_MAX)
}

pub fn encode<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    options().serialize(value).expect("in-memory values always encode")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str, seq: u64) -> Result<T, StoreError> {
    options().deserialize(bytes).map_err(|error| StoreError::Corrupt { what, seq, detail: error.to_string() })
}

pub fn decode_commands(bytes: &[u8], seq: u64) -> Result<Vec<Command>, StoreError> {
    decode(bytes, "commands", seq)
}

pub fn decode_receipts(bytes: &[u8], seq: u64) -> Result<Vec<Receipt>, StoreError> {
    decode(bytes, "receipts", seq)
}

pub fn decode_legs(bytes: &[u8], seq: u64) -> Result<Vec<tally_ledger::Leg>, StoreError> {
    decode(bytes, "operation legs", seq)
}

pub fn encode_state(state: &State) -> Vec<u8> {
    encode(state)
}

pub fn decode_state(bytes: &[u8], seq: u64) -> Result<State, StoreError> {
    decode(bytes, "snapshot", seq)
}
