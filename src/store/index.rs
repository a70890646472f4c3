//! The key index of a sparse shard: key -> slot number, open addressing with
//! linear probing over one array of (key, slot) pairs.
//!
//! Written for batches: a request's keys are looked up in a loop that
//! prefetches the probe position of a key several iterations before it is
//! needed ([`KeyIndex::prefetch`]), so the cache misses of a large batch
//! overlap instead of adding up. `u64::MAX` marks an empty entry; it is never
//! a key, since keys lie in `0..keys` of their table.

const EMPTY: u64 = u64::MAX;
/// Grow when more than 7/10 of the entries are used.
const LOAD_NUM: usize = 7;
const LOAD_DEN: usize = 10;

#[derive(Clone, Debug)]
pub struct KeyIndex {
    /// (key, slot) pairs; capacity is a power of two.
    entries: Vec<[u64; 2]>,
    shift: u32,
    len: usize,
}

impl Default for KeyIndex {
    fn default() -> Self {
        KeyIndex::with_capacity(0)
    }
}

#[inline(always)]
fn hash(key: u64, shift: u32) -> usize {
    // Fibonacci hashing: the high bits of key * 2^64/phi.
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize
}

impl KeyIndex {
    pub fn with_capacity(n: usize) -> KeyIndex {
        let cap = (n * LOAD_DEN / LOAD_NUM + 1).next_power_of_two().max(16);
        KeyIndex { entries: vec![[EMPTY, 0]; cap], shift: 64 - cap.trailing_zeros(), len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory held.
    pub fn bytes(&self) -> usize {
        self.entries.capacity() * 16
    }

    /// Hints the CPU to fetch the entry where `key`'s probe starts.
    #[inline(always)]
    pub fn prefetch(&self, key: u64) {
        let i = hash(key, self.shift);
        prefetch(self.entries.as_ptr().wrapping_add(i).cast());
    }

    #[inline]
    pub fn get(&self, key: u64) -> Option<u32> {
        debug_assert_ne!(key, EMPTY);
        let mask = self.entries.len() - 1;
        let mut i = hash(key, self.shift);
        loop {
            let [k, v] = self.entries[i];
            if k == key {
                return Some(v as u32);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Inserts a key that is not present.
    pub fn insert_new(&mut self, key: u64, slot: u32) {
        debug_assert_ne!(key, EMPTY);
        if (self.len + 1) * LOAD_DEN > self.entries.len() * LOAD_NUM {
            self.grow();
        }
        self.place(key, slot);
        self.len += 1;
    }

    fn place(&mut self, key: u64, slot: u32) {
        let mask = self.entries.len() - 1;
        let mut i = hash(key, self.shift);
        while self.entries[i][0] != EMPTY {
            debug_assert_ne!(self.entries[i][0], key, "insert_new of a present key");
            i = (i + 1) & mask;
        }
        self.entries[i] = [key, u64::from(slot)];
    }

    fn grow(&mut self) {
        let cap = (self.entries.len() * 2).max(16);
        let old = std::mem::replace(&mut self.entries, vec![[EMPTY, 0]; cap]);
        self.shift = 64 - self.entries.len().trailing_zeros();
        for [k, v] in old {
            if k != EMPTY {
                self.place(k, v as u32);
            }
        }
    }
}

/// A prefetch hint for the cache line holding `p`; never faults.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not fault on any address, and SSE
    // is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn behaves_like_a_map_through_growth() {
        let mut idx = KeyIndex::default();
        let mut reference = HashMap::new();
        let mut x = 12345u64;
        for i in 0..100_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = if i % 3 == 0 { u64::from(i) } else { x >> 1 };
            if let std::collections::hash_map::Entry::Vacant(e) = reference.entry(key) {
                e.insert(i);
                idx.insert_new(key, i);
            }
        }
        assert_eq!(idx.len(), reference.len());
        for (&k, &v) in &reference {
            assert_eq!(idx.get(k), Some(v));
        }
        assert_eq!(idx.get(u64::MAX - 1), reference.get(&(u64::MAX - 1)).copied());
        assert_eq!(idx.get(7_777_777_777), None);
    }
}
