//! Key ranges on a consistent-hash ring with virtual nodes.
//!
//! Each server places `vnodes` tokens on the ring, at positions hashed from
//! its id; for a table with key space `0..n` a token's position is scaled
//! into `0..n`, and a key belongs to the server of the nearest token at or
//! below it (keys below the first token wrap to the last token). Adding or
//! removing a server only moves the keys next to its own tokens, about 1/S of
//! the table. Adjacent ranges of one server are merged, so a job with one
//! server has one range per table.
//!
//! Every node computes the same map from the same server list: the scheduler
//! distributes the list (with an epoch), never the ranges themselves.

use crate::proto::ServerInfo;
use crate::store::KeyRange;
use crate::table::{Key, mix64};

/// The servers of a job and how many tokens each places.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    servers: Vec<ServerInfo>,
    vnodes: u32,
    epoch: u32,
}

impl Ring {
    pub fn new(servers: Vec<ServerInfo>, vnodes: u32, epoch: u32) -> Ring {
        Ring { servers, vnodes: vnodes.max(1), epoch }
    }
    pub fn servers(&self) -> &[ServerInfo] {
        &self.servers
    }
    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The range map of a key space `0..n`.
    pub fn ranges(&self, n: u64) -> RangeMap {
        if self.servers.is_empty() || n == 0 {
            return RangeMap { starts: vec![], ends: vec![], owners: vec![] };
        }
        let mut tokens: Vec<(u64, u32)> = Vec::with_capacity(self.servers.len() * self.vnodes as usize);
        for (idx, s) in self.servers.iter().enumerate() {
            for v in 0..self.vnodes {
                let h = mix64(mix64(u64::from(s.id)) ^ u64::from(v));
                let pos = ((u128::from(h) * u128::from(n)) >> 64) as u64;
                tokens.push((pos, idx as u32));
            }
        }
        // Ties (small key spaces) resolve by server index: deterministic.
        tokens.sort_unstable();
        tokens.dedup_by_key(|t| t.0);
        let mut map = RangeMap { starts: vec![], ends: vec![], owners: vec![] };
        let wrap_owner = tokens.last().expect("at least one token").1;
        let mut push = |start: u64, end: u64, owner: u32| {
            if start >= end {
                return;
            }
            if map.owners.last() == Some(&owner) && map.ends.last() == Some(&start) {
                *map.ends.last_mut().expect("non-empty") = end;
            } else {
                map.starts.push(start);
                map.ends.push(end);
                map.owners.push(owner);
            }
        };
        push(0, tokens[0].0, wrap_owner);
        for (i, &(pos, owner)) in tokens.iter().enumerate() {
            let end = tokens.get(i + 1).map_or(n, |t| t.0);
            push(pos, end, owner);
        }
        map
    }
}

/// Sorted, disjoint ranges covering a key space, each with its server index
/// (an index into the ring's server list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeMap {
    starts: Vec<Key>,
    ends: Vec<Key>,
    owners: Vec<u32>,
}

/// Keys `lo..hi` (indices into a request's sorted keys) that belong to range
/// `range` of server `server`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub server: u32,
    pub range: usize,
    pub lo: usize,
    pub hi: usize,
}

impl RangeMap {
    pub fn len(&self) -> usize {
        self.starts.len()
    }
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }
    pub fn range(&self, i: usize) -> (KeyRange, u32) {
        (KeyRange::new(self.starts[i], self.ends[i]), self.owners[i])
    }
    pub fn iter(&self) -> impl Iterator<Item = (KeyRange, u32)> + '_ {
        (0..self.len()).map(|i| self.range(i))
    }

    /// The ranges owned by server index `server`.
    pub fn ranges_of(&self, server: u32) -> impl Iterator<Item = KeyRange> + '_ {
        self.iter().filter(move |(_, o)| *o == server).map(|(r, _)| r)
    }

    /// Index of the range holding `key`.
    pub fn find(&self, key: Key) -> Option<usize> {
        let i = self.starts.partition_point(|&s| s <= key).checked_sub(1)?;
        (key < self.ends[i]).then_some(i)
    }

    /// Splits sorted keys into runs, one per range they touch, in key order.
    /// `key_at(i)` gives the i-th of `n` keys. Keys beyond the last range are
    /// not covered (callers check the key space first).
    pub fn split(&self, n: usize, key_at: impl Fn(usize) -> Key, out: &mut Vec<Run>) {
        let mut lo = 0;
        while lo < n {
            let Some(r) = self.find(key_at(lo)) else { return };
            let end = self.ends[r];
            // First index at or after lo whose key is >= end (keys are sorted).
            let (mut a, mut b) = (lo + 1, n);
            while a < b {
                let mid = a + (b - a) / 2;
                if key_at(mid) < end { a = mid + 1 } else { b = mid }
            }
            out.push(Run { server: self.owners[r], range: r, lo, hi: a });
            lo = a;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: u32) -> Vec<ServerInfo> {
        (0..n).map(|id| ServerInfo { id, addr: format!("s{id}") }).collect()
    }

    fn shares(map: &RangeMap, s: usize, n: u64) -> Vec<f64> {
        let mut owned = vec![0u64; s];
        for (r, o) in map.iter() {
            owned[o as usize] += r.len();
        }
        owned.iter().map(|&k| k as f64 / n as f64).collect()
    }

    #[test]
    fn ranges_cover_the_key_space_exactly_once() {
        for (s, n) in [(1, 10u64), (2, 1_000_000), (3, 7), (5, u64::MAX), (4, 1)] {
            let map = Ring::new(servers(s), 32, 1).ranges(n);
            let mut next = 0;
            for (r, o) in map.iter() {
                assert_eq!(r.start, next);
                assert!(r.end > r.start);
                assert!((o as usize) < s as usize);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn one_server_owns_one_range() {
        let map = Ring::new(servers(1), 64, 1).ranges(1 << 40);
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn load_is_balanced_within_a_reasonable_band() {
        let n = 1u64 << 32;
        for s in [2u32, 3, 4, 8] {
            let map = Ring::new(servers(s), 64, 1).ranges(n);
            for share in shares(&map, s as usize, n) {
                let fair = 1.0 / s as f64;
                assert!(share > 0.6 * fair && share < 1.4 * fair, "{s} servers: share {share}");
            }
        }
    }

    #[test]
    fn adding_a_server_moves_only_about_its_share() {
        let n = 1u64 << 32;
        let before = Ring::new(servers(4), 64, 1).ranges(n);
        let after = Ring::new(servers(5), 64, 2).ranges(n);
        // Sample keys: a key moves only if its owner changed.
        let moved = (0..100_000u64)
            .map(|i| mix64(i) % n)
            .filter(|&k| {
                let o1 = before.range(before.find(k).unwrap()).1;
                let o2 = after.range(after.find(k).unwrap()).1;
                o1 != o2
            })
            .count();
        let frac = moved as f64 / 100_000.0;
        assert!(frac < 0.3, "moved {frac}");
        // And everything that moved went to the new server.
        for i in 0..10_000u64 {
            let k = mix64(i) % n;
            let o1 = before.range(before.find(k).unwrap()).1;
            let o2 = after.range(after.find(k).unwrap()).1;
            assert!(o1 == o2 || o2 == 4);
        }
    }

    #[test]
    fn split_groups_sorted_keys_by_range() {
        let map = Ring::new(servers(3), 8, 1).ranges(1000);
        let keys: Vec<u64> = (0..1000).step_by(7).collect();
        let mut runs = Vec::new();
        map.split(keys.len(), |i| keys[i], &mut runs);
        let mut next = 0;
        for r in &runs {
            assert_eq!(r.lo, next);
            let (range, owner) = map.range(r.range);
            assert_eq!(owner, r.server);
            assert!(keys[r.lo..r.hi].iter().all(|&k| range.contains(k)));
            next = r.hi;
        }
        assert_eq!(next, keys.len());
    }
}
