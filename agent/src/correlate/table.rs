//! A map that knows which entry was used least recently: eviction when full and idle expiry
//! both walk it from the oldest end.

use std::{
    collections::BTreeMap,
    hash::Hash,
};

use crate::FastMap;

/// Entries ordered by last use. Every operation is O(log n).
#[derive(Debug)]
pub(crate) struct LruTable<K, V> {
    map: FastMap<K, (u64, V)>,
    /// use sequence number -> key; the first entry is the least recently used.
    order: BTreeMap<u64, K>,
    next: u64,
}

impl<K: Hash + Eq + Clone, V> LruTable<K, V> {
    pub fn new() -> Self {
        LruTable { map: FastMap::default(), order: BTreeMap::new(), next: 0 }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(_, v)| v)
    }

    /// The entry, marked as just used.
    pub fn touch(&mut self, key: &K) -> Option<&mut V> {
        let (seq, value) = self.map.get_mut(key)?;
        self.order.remove(seq);
        *seq = self.next;
        self.order.insert(self.next, key.clone());
        self.next += 1;
        Some(value)
    }

    /// Inserts (or replaces) an entry as the most recently used.
    pub fn insert(&mut self, key: K, value: V) {
        if let Some((seq, _)) = self.map.remove(&key) {
            self.order.remove(&seq);
        }
        self.order.insert(self.next, key.clone());
        self.map.insert(key, (self.next, value));
        self.next += 1;
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (seq, value) = self.map.remove(key)?;
        self.order.remove(&seq);
        Some(value)
    }

    /// The least recently used entry.
    pub fn oldest(&self) -> Option<(&K, &V)> {
        let (_, key) = self.order.first_key_value()?;
        self.map.get(key).map(|(_, v)| (key, v))
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (_, value) = self.map.remove(&key)?;
        Some((key, value))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_comes_first() {
        let mut t = LruTable::new();
        t.insert(1, "a");
        t.insert(2, "b");
        t.insert(3, "c");
        assert_eq!(t.oldest(), Some((&1, &"a")));
        t.touch(&1);
        assert_eq!(t.pop_oldest(), Some((2, "b")));
        t.insert(3, "c2");
        assert_eq!(t.pop_oldest(), Some((1, "a")));
        assert_eq!(t.remove(&3), Some("c2"));
        assert_eq!(t.len(), 0);
        assert!(t.pop_oldest().is_none());
        assert!(t.touch(&9).is_none());
    }
}
