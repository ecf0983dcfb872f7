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

const EMPTY: Slot =
    Slot { key: 0, record: IdempotencyRecord { fingerprint: 0, operation: 0, object: 0, object_is_grant: false } };

/// Smallest table, in slots (a power of two).
const CAPACITY_MIN: usize = 16;

#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    slots: Vec<Slot>,
    len: usize,
}

fn stored(key: u128) -> u128 {
    key.max(1)
}

impl KeyTable {
    pub fn with_capacity(keys: usize) -> KeyTable {
        let mut table = KeyTable::default();
        table.reserve(keys);
        table
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, key: u128) -> usize {
        (key as usize ^ (key >> 64) as usize) & (self.slots.len() - 1)
    }

    /// Makes room for `additional` more keys at a load of at most 3/4.
    pub fn reserve(&mut self, additional: usize) {
        let needed = (self.len + additional).saturating_mul(4) / 3 + 1;
        if needed <= self.slots.len() {
            return;
        }
        let capacity = needed.next_power_of_two().max(CAPACITY_MIN);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; capacity]);
        self.len = 0;
        for slot in old.into_iter().filter(|slot| slot.key != 0) {
            self.insert_new(slot.key, slot.record);
        }
    }

    pub fn get(&self, key: u128) -> Option<&IdempotencyRecord> {
        if self.slots.is_empty() {
            return None;
        }
        let key = stored(key);
        let mask = self.slots.len() - 1;
        let mut index = self.slot_of(key);
        loop {
            let slot = &self.slots[index];
            if slot.key == key {
                return Some(&slot.record);
            }
            if slot.key == 0 {
                return None;
            }
            index = (index + 1) & mask;
        }
    }

    /// Inserts a key that is not in the table (the caller has looked it up).
    pub fn insert_new(&mut self, key: u128, record: IdempotencyRecord) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.reserve((self.len + 1).max(CAPACITY_MIN));
        }
        let key = stored(key);
        let mask = self.slots.len() - 1;
        let mut index = self.slot_of(key);
        while self.slots[index].key != 0 {
            debug_assert_ne!(self.slots[index].key, key, "insert_new of a key already present");
            index = (index + 1) & mask;
        }
        self.slots[index] = Slot { key, record };
        self.len += 1;
    }

    /// Asks the processor to fetch the key's slot into cache ahead of use.
    pub fn prefetch(&self, key: u128) {
        if !self.slots.is_empty() {
            crate::state::prefetch(&self.slots[self.slot_of(stored(key))]);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u128, &IdempotencyRecord)> {
        self.slots.iter().filter(|slot| slot.key != 0).map(|slot| (slot.key, &slot.record))
    }
}

impl PartialEq for KeyTable {
    fn eq(&self, other: &KeyTable) -> bool {
        self.len == other.len && self.iter().all(|(key, record)| other.get(key) == Some(record))
    }
}

impl Eq for KeyTable {}

impl Serialize for KeyTable {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut sequence = serializer.serialize_seq(Some(self.len))?;
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
}
