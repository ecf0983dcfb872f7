//! The idempotency key table: open addressing over 128-bit key digests. Digests are
//! already uniformly random, so their low bits are the slot, and the slot of a key a few
//! commands ahead can be prefetched before it is needed. Keys are never removed one by
//! one (a whole generation is dropped at once), so the table needs no tombstones.

use crate::state::IdempotencyRecord;
use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// The digest; 0 marks an empty slot (a real digest of 0 is stored as 1).
    key: u128,
    record: IdempotencyRecord,
}

/// Smallest table, in slots (a power of two).
const CAPACITY_MIN: usize = 16;

/// Slots of the outgrown table moved into the new one per insert. Moving all at once
/// would stop the writer for tens of milliseconds at a million keys (measured: 34–60 ms
/// stalls under load); at two or more per insert the move ends before the new table
/// (twice the size) reaches its own load limit.
const MIGRATE_PER_INSERT: usize = 8;

/// A table of `capacity` empty slots, allocated zeroed: the kernel supplies zero pages
/// on first touch, so a large table costs nothing until it fills.
fn empty_slots(capacity: usize) -> Vec<Slot> {
    let layout = std::alloc::Layout::array::<Slot>(capacity).expect("key table size fits in memory");
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: the layout is non-zero-sized and valid for `capacity` slots; an all-zero
    // Slot is a valid value (integers 0 and `false`): an empty slot; the Vec takes
    // ownership of the allocation with the same layout it will free it with.
    unsafe {
        let pointer = std::alloc::alloc_zeroed(layout).cast::<Slot>();
        if pointer.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Vec::from_raw_parts(pointer, capacity, capacity)
    }
}

/// Open addressing with incremental growth: when the table must grow, the old one is
/// kept beside the new one and moved over a few slots per insert, so no insert pays
/// for rehashing every key. Lookups look in the new table, then in the old one.
#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    slots: Vec<Slot>,
    /// Keys in `slots`.
    len: usize,
    /// The outgrown table while its keys move to `slots`; empty otherwise.
    old: Vec<Slot>,
    /// Slots of `old` before this index have been moved.
    old_moved: usize,
    /// Keys in `old` not yet moved.
    old_len: usize,
}

fn stored(key: u128) -> u128 {
    key.max(1)
}

fn slot_of(slots: &[Slot], key: u128) -> usize {
    (key as usize ^ (key >> 64) as usize) & (slots.len() - 1)
}

fn find(slots: &[Slot], key: u128) -> Option<&IdempotencyRecord> {
    if slots.is_empty() {
        return None;
    }
    let mask = slots.len() - 1;
    let mut index = slot_of(slots, key);
    loop {
        let slot = &slots[index];
        if slot.key == key {
            return Some(&slot.record);
        }
        if slot.key == 0 {
            return None;
        }
        index = (index + 1) & mask;
    }
}

/// Puts a key that is not in `slots` into its first free slot; the caller keeps the load
/// below 1.
fn place(slots: &mut [Slot], key: u128, record: IdempotencyRecord) {
    let mask = slots.len() - 1;
    let mut index = slot_of(slots, key);
    while slots[index].key != 0 {
        debug_assert_ne!(slots[index].key, key, "insert_new of a key already present");
        index = (index + 1) & mask;
    }
    slots[index] = Slot { key, record };
}

impl KeyTable {
    pub fn with_capacity(keys: usize) -> KeyTable {
        let mut table = KeyTable::default();
        table.reserve(keys);
        table
    }

    pub fn len(&self) -> usize {
        self.len + self.old_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys the table holds before it must grow.
    pub fn capacity(&self) -> usize {
        self.slots.len() / 4 * 3
    }

    /// Makes room for `additional` more keys at a load of at most 3/4, at once (for
    /// start-up and sizing ahead; inserts grow the table incrementally).
    pub fn reserve(&mut self, additional: usize) {
        let needed = (self.len() + additional).saturating_mul(4).div_ceil(3);
        if needed <= self.slots.len() && self.old.is_empty() {
            return;
        }
        let capacity = needed.max(self.slots.len()).next_power_of_two().max(CAPACITY_MIN);
        let current = std::mem::replace(&mut self.slots, empty_slots(capacity));
        let old = std::mem::take(&mut self.old);
        let old_moved = std::mem::take(&mut self.old_moved);
        self.len = 0;
        self.old_len = 0;
        for slot in current.iter().chain(old.iter().skip(old_moved)).filter(|slot| slot.key != 0) {
            place(&mut self.slots, slot.key, slot.record);
            self.len += 1;
        }
    }

    pub fn get(&self, key: u128) -> Option<&IdempotencyRecord> {
        let key = stored(key);
        find(&self.slots, key).or_else(|| if self.old_len > 0 { find(&self.old, key) } else { None })
    }

    /// Inserts a key that is not in the table (the caller has looked it up).
    pub fn insert_new(&mut self, key: u128, record: IdempotencyRecord) {
        if !self.old.is_empty() {
            self.migrate(MIGRATE_PER_INSERT);
        }
        if (self.len + self.old_len + 1) * 4 > self.slots.len() * 3 {
            if self.slots.is_empty() {
                self.slots = empty_slots(CAPACITY_MIN);
            } else {
                // A move still under way ends first (it cannot be: two slots per insert
                // finish it before the new table is 3/4 full; this keeps it true).
                self.migrate(usize::MAX);
                let capacity = self.slots.len() * 2;
                self.old = std::mem::replace(&mut self.slots, empty_slots(capacity));
                self.old_moved = 0;
                self.old_len = self.len;
                self.len = 0;
            }
        }
        place(&mut self.slots, stored(key), record);
        self.len += 1;
    }

    /// Moves up to `count` slots of the outgrown table; frees it when all have moved.
    fn migrate(&mut self, count: usize) {
        let end = self.old_moved.saturating_add(count).min(self.old.len());
        for index in self.old_moved..end {
            let slot = self.old[index];
            if slot.key != 0 {
                place(&mut self.slots, slot.key, slot.record);
                self.len += 1;
                self.old_len -= 1;
            }
        }
        self.old_moved = end;
        if self.old_moved == self.old.len() {
            debug_assert_eq!(self.old_len, 0);
            self.old = Vec::new();
            self.old_moved = 0;
        }
    }

    /// Asks the processor to fetch the key's slot into cache ahead of use.
    pub fn prefetch(&self, key: u128) {
        if !self.slots.is_empty() {
            crate::state::prefetch(&self.slots[slot_of(&self.slots, stored(key))]);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u128, &IdempotencyRecord)> {
        self.slots
            .iter()
            .chain(self.old.iter().skip(self.old_moved))
            .filter(|slot| slot.key != 0)
            .map(|slot| (slot.key, &slot.record))
    }
}

impl PartialEq for KeyTable {
    fn eq(&self, other: &KeyTable) -> bool {
        self.len() == other.len() && self.iter().all(|(key, record)| other.get(key) == Some(record))
    }
}

impl Eq for KeyTable {}

impl Serialize for KeyTable {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut sequence = serializer.serialize_seq(Some(self.len()))?;
        for entry in self.iter() {
            sequence.serialize_element(&entry)?;
        }
        sequence.end()
    }
}

impl<'de> Deserialize<'de> for KeyTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<KeyTable, D::Error> {
        struct TableVisitor;
        impl<'de> Visitor<'de> for TableVisitor {
            type Value = KeyTable;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a list of idempotency keys and records")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<KeyTable, A::Error> {
                let mut table = KeyTable::with_capacity(sequence.size_hint().unwrap_or(0).min(1 << 24));
                while let Some((key, record)) = sequence.next_element::<(u128, IdempotencyRecord)>()? {
                    if table.get(key).is_none() {
                        table.insert_new(key, record);
                    }
                }
                Ok(table)
            }
        }
        deserializer.deserialize_seq(TableVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> IdempotencyRecord {
        IdempotencyRecord { fingerprint: n, operation: n, object: 0, object_is_grant: false }
    }

    #[test]
    fn inserts_grow_and_are_found() {
        let mut table = KeyTable::default();
        for n in 0..10_000u64 {
            let key = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834);
            assert!(table.get(key).is_none());
            table.insert_new(key, record(n));
        }
        assert_eq!(table.len(), 10_000);
        for n in 0..10_000u64 {
            let key = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834);
            assert_eq!(table.get(key), Some(&record(n)));
        }
        assert!(table.get(12345).is_none());
        // Digest 0 is stored as 1 and still found.
        let mut zero = KeyTable::default();
        zero.insert_new(0, record(7));
        assert_eq!(zero.get(0), Some(&record(7)));
    }

    fn digest(n: u64) -> u128 {
        u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834) ^ 0x5555
    }

    #[test]
    fn growth_moves_keys_a_few_at_a_time_and_loses_none() {
        let mut table = KeyTable::default();
        let mut saw_migration = false;
        for n in 0..50_000u64 {
            table.insert_new(digest(n), record(n));
            saw_migration |= !table.old.is_empty();
            // While a move is under way, keys on both sides are found, and the total
            // counts each once.
            assert_eq!(table.len(), n as usize + 1);
            if n % 97 == 0 {
                for m in (0..=n).step_by(13) {
                    assert_eq!(table.get(digest(m)), Some(&record(m)), "key {m} after {n} inserts");
                }
                assert!(table.get(digest(n + 1)).is_none());
            }
            // The load of the new table never passes 3/4.
            assert!(table.len * 4 <= table.slots.len() * 3);
        }
        assert!(saw_migration);
    }

    #[test]
    fn a_table_mid_move_serializes_and_compares_like_a_settled_one() {
        let mut moving = KeyTable::default();
        let mut n = 0;
        while moving.old.is_empty() || moving.old_moved < moving.old.len() / 2 {
            moving.insert_new(digest(n), record(n));
            n += 1;
        }
        assert!(!moving.old.is_empty() && moving.old_len > 0);
        let mut settled = KeyTable::with_capacity(n as usize);
        for m in 0..n {
            settled.insert_new(digest(m), record(m));
        }
        assert!(settled.old.is_empty());
        assert_eq!(moving, settled);
        let encoded = serde_json::to_string(&moving).unwrap();
        let decoded: KeyTable = serde_json::from_str(&encoded).unwrap();
        assert_eq!(decoded.len(), n as usize);
        assert_eq!(decoded, settled);
        // Reserving ends the move at once and keeps every key.
        moving.reserve(10);
        assert!(moving.old.is_empty());
        assert_eq!(moving, settled);
    }

    #[test]
    fn a_table_sized_to_another_capacity_is_the_same_size() {
        let table = KeyTable::with_capacity(1000);
        let next = KeyTable::with_capacity(table.capacity());
        assert_eq!(next.slots.len(), table.slots.len());
        assert!(table.capacity() >= 1000);
    }
}
