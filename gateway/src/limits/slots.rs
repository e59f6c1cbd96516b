//! Per-client caps on things held open (connections, joins in flight): a count per
//! [`ClientKey`], taken with [`KeyedSlots::try_acquire`] and given back when the permit drops.
//! A key is forgotten when its count falls to zero, so the map never holds more keys than
//! there are permits alive, which the listener's own caps already bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::ClientKey;

/// The client already holds as many as the cap allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{key} already holds {cap}, the most one client may")]
pub struct AtCapacity {
    /// The client.
    pub key: ClientKey,
    /// The cap it reached.
    pub cap: u32,
}

/// Counts per client, each at most `cap`.
#[derive(Debug)]
pub struct KeyedSlots {
    cap: u32,
    held: Mutex<HashMap<ClientKey, u32>>,
}

impl KeyedSlots {
    /// At most `cap` at once per client.
    pub fn new(cap: u32) -> Arc<Self> {
        Arc::new(Self {
            cap,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// One more for `key`, unless it already holds `cap`.
    pub fn try_acquire(self: &Arc<Self>, key: ClientKey) -> Result<SlotPermit, AtCapacity> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key).or_insert(0);
        if *count >= self.cap {
            return Err(AtCapacity { key, cap: self.cap });
        }
        *count += 1;
        Ok(SlotPermit {
            slots: self.clone(),
            key,
        })
    }

    /// How many `key` holds now.
    pub fn held(&self, key: ClientKey) -> u32 {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(&key).copied().unwrap_or(0)
    }

    /// How many clients hold at least one.
    pub fn clients(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn release(&self, key: ClientKey) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&key);
            }
        }
    }
}

/// One slot held for a client; dropping it gives the slot back.
#[derive(Debug)]
pub struct SlotPermit {
    slots: Arc<KeyedSlots>,
    key: ClientKey,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.slots.release(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(last: u8) -> ClientKey {
        ClientKey::of(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    #[test]
    fn a_client_gets_cap_slots_and_others_are_unaffected() {
        let slots = KeyedSlots::new(2);
        let a1 = slots.try_acquire(key(1)).unwrap();
        let _a2 = slots.try_acquire(key(1)).unwrap();
        let refused = slots.try_acquire(key(1)).unwrap_err();
        assert_eq!((refused.key, refused.cap), (key(1), 2));
        let _b = slots.try_acquire(key(2)).unwrap();
        // Giving one back makes room again.
        drop(a1);
        assert_eq!(slots.held(key(1)), 1);
        let _a3 = slots.try_acquire(key(1)).unwrap();
        assert!(slots.try_acquire(key(1)).is_err());
    }

    #[test]
    fn a_key_is_forgotten_when_its_last_slot_is_given_back() {
        let slots = KeyedSlots::new(3);
        let permits: Vec<_> = (0..50)
            .map(|i| slots.try_acquire(key(i)).unwrap())
            .collect();
        assert_eq!(slots.clients(), 50);
        drop(permits);
        assert_eq!(slots.clients(), 0);
    }
}
