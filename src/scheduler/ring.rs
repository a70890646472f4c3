//! Key ranges on a consistent-hash ring with virtual nodes, with their
//! owners and replicas.
//!
//! Each server places `vnodes` tokens on the ring, at positions hashed from
//! its id; for a table with key space `0..n` a token's position is scaled
//! into `0..n`, and the keys from a token up to the next token belong to it
//! (keys below the first token belong to the last one). Adjacent tokens with
//! the same owner and replicas form one *range*, so a job with one server
//! has one range per table and a request sends one run per server.
//!
//! Servers are never removed from the ring, only marked dead, and a joining
//! server adds tokens: every range boundary of every epoch is a token
//! position. A server keeps the shards it built in earlier epochs; a range
//! it owns later may span several of them (its own and the copy of a dead
//! server's range it took over), which is why a server splits a run along
//! its shards (see `server`).
//!
//! Owner and replicas: walking the tokens downwards from a key's token
//! (wrapping around), the first live server met owns the key and the next
//! `replicas` distinct live servers hold its copies. When the owner dies, the
//! first replica is the first live server of the same walk, i.e. the new
//! owner already holds the data; a replica that dies is replaced by the next
//! live server of the walk, which receives a copy.
//!
//! Joining (DESIGN section 6, two-phase migration): a server marked
//! `joining` places its tokens but takes no part in the walks that choose
//! owners and replicas, so nothing moves yet; every range whose walk *would*
//! include it lists it as a *learner*, which its owner fills with a copy and
//! keeps up to date like a replica. Once every learner copy is complete the
//! flag is cleared: the joiner owns its ranges (its copies are current) and
//! holds copies of the others, exactly as if it had been there from the
//! start.
//!
//! Every node computes the same map from the same server list: the scheduler
//! distributes the list (with an epoch), never the ranges themselves.

use crate::proto::ServerInfo;
use crate::store::KeyRange;
use crate::table::{Key, mix64};

/// No live server (every server of the walk is dead).
pub const NO_SERVER: u32 = u32::MAX;

/// The servers of a job (dead ones included, marked), how many tokens each
/// places, and how many copies besides the owner's each range has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    servers: Vec<ServerInfo>,
    vnodes: u32,
    epoch: u32,
    replicas: u32,
}

impl Ring {
    /// A ring without replicas.
    pub fn new(servers: Vec<ServerInfo>, vnodes: u32, epoch: u32) -> Ring {
        Ring { servers, vnodes: vnodes.max(1), epoch, replicas: 0 }
    }
    /// The same ring with `k` copies of every range besides the owner's.
    pub fn with_replicas(mut self, k: u32) -> Ring {
        self.replicas = k;
        self
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
    pub fn replicas(&self) -> u32 {
        self.replicas
    }
    /// Whether server index `s` is alive.
    pub fn is_alive(&self, s: u32) -> bool {
        self.servers.get(s as usize).is_some_and(|i| i.alive)
    }
    /// Whether server index `s` is alive and a full member (not joining).
    fn is_member(&self, s: u32) -> bool {
        self.servers.get(s as usize).is_some_and(|i| i.alive && !i.joining)
    }
    /// Servers alive.
    pub fn live(&self) -> usize {
        self.servers.iter().filter(|s| s.alive).count()
    }

    /// Sorted token positions of a key space `0..n` with their server index
    /// (equal positions, in small key spaces, by server index).
    fn tokens(&self, n: u64) -> Vec<(u64, u32)> {
        let mut tokens: Vec<(u64, u32)> = Vec::with_capacity(self.servers.len() * self.vnodes as usize);
        for (idx, s) in self.servers.iter().enumerate() {
            for v in 0..self.vnodes {
                let h = mix64(mix64(u64::from(s.id)) ^ u64::from(v));
                let pos = ((u128::from(h) * u128::from(n)) >> 64) as u64;
                tokens.push((pos, idx as u32));
            }
        }
        // Equal positions (small key spaces) all stay: the range between
        // them is empty, but every server still takes part in the walks, so
        // a tiny table outlives any one server like the others do.
        tokens.sort_unstable();
        tokens
    }

    /// The range map of a key space `0..n`.
    pub fn ranges(&self, n: u64) -> RangeMap {
        let k = self.replicas as usize;
        let mut map = RangeMap { starts: vec![], ends: vec![], owners: vec![], copies: vec![], learners: vec![], k };
        if self.servers.is_empty() || n == 0 {
            return map;
        }
        let tokens = self.tokens(n);
        // The first k + 1 distinct servers the walk downwards from token `t`
        // meets among those `take` accepts.
        let walk = |t: usize, take: &dyn Fn(u32) -> bool| {
            let mut chain: Vec<u32> = Vec::with_capacity(k + 1);
            for step in 0..tokens.len() {
                let s = tokens[(t + tokens.len() - step) % tokens.len()].1;
                if take(s) && !chain.contains(&s) {
                    chain.push(s);
                    if chain.len() == k + 1 {
                        break;
                    }
                }
            }
            chain
        };
        let joining = self.servers.iter().any(|s| s.alive && s.joining);
        // Owner and replicas of each token (full members only), the joining
        // servers the walk would meet once they are members, and who would
        // own it then (ranges are split where that differs too, so that no
        // range of this map ever has two owners once the joiners are in).
        let chains: Vec<(Vec<u32>, Vec<u32>, u32)> = (0..tokens.len())
            .map(|t| {
                let chain = walk(t, &|s| self.is_member(s));
                if !joining {
                    return (chain, Vec::new(), NO_SERVER);
                }
                let future = walk(t, &|s| self.is_alive(s));
                let next_owner = future.first().copied().unwrap_or(NO_SERVER);
                (chain, future.into_iter().filter(|&s| !self.is_member(s)).collect(), next_owner)
            })
            .collect();
        let mut next_owners: Vec<u32> = Vec::new();
        let mut push = |start: u64, end: u64, (chain, learners, next_owner): &(Vec<u32>, Vec<u32>, u32)| {
            if start >= end {
                return;
            }
            let owner = chain.first().copied().unwrap_or(NO_SERVER);
            let copies = (0..k).map(|i| chain.get(i + 1).copied().unwrap_or(NO_SERVER));
            let n = map.starts.len();
            let same = n > 0
                && map.ends[n - 1] == start
                && map.owners[n - 1] == owner
                && map.copies[(n - 1) * k..n * k].iter().copied().eq(copies.clone())
                && map.learners[n - 1] == *learners
                && next_owners[n - 1] == *next_owner;
            if same {
                map.ends[n - 1] = end;
                return;
            }
            map.starts.push(start);
            map.ends.push(end);
            map.owners.push(owner);
            map.copies.extend(copies);
            map.learners.push(learners.clone());
            next_owners.push(*next_owner);
        };
        push(0, tokens[0].0, &chains[tokens.len() - 1]);
        for (i, &(pos, _)) in tokens.iter().enumerate() {
            let end = tokens.get(i + 1).map_or(n, |t| t.0);
            push(pos, end, &chains[i]);
        }
        map
    }
}

/// Sorted, disjoint ranges covering a key space, each with its owner and
/// replicas (indices into the ring's server list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeMap {
    starts: Vec<Key>,
    ends: Vec<Key>,
    owners: Vec<u32>,
    /// `k` replica slots per range, `NO_SERVER` where fewer are alive.
    copies: Vec<u32>,
    /// Joining servers that will hold range `i` (its owner fills them).
    learners: Vec<Vec<u32>>,
    k: usize,
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
    /// Range `i` and its owner.
    pub fn range(&self, i: usize) -> (KeyRange, u32) {
        (KeyRange::new(self.starts[i], self.ends[i]), self.owners[i])
    }
    /// The live replicas of range `i` (not counting the owner).
    pub fn replicas(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        self.copies[i * self.k..(i + 1) * self.k].iter().copied().filter(|&s| s != NO_SERVER)
    }
    /// The joining servers learning a copy of range `i`.
    pub fn learners(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        self.learners[i].iter().copied()
    }
    /// Everyone the owner of range `i` sends its changes to: replicas, then
    /// learners.
    pub fn targets(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        self.replicas(i).chain(self.learners(i))
    }
    pub fn iter(&self) -> impl Iterator<Item = (KeyRange, u32)> + '_ {
        (0..self.len()).map(|i| self.range(i))
    }

    /// The ranges owned by server index `server`.
    pub fn ranges_of(&self, server: u32) -> impl Iterator<Item = KeyRange> + '_ {
        self.iter().filter(move |(_, o)| *o == server).map(|(r, _)| r)
    }

    /// The ranges `server` holds a copy of, with their owners.
    pub fn copies_of(&self, server: u32) -> impl Iterator<Item = (KeyRange, u32)> + '_ {
        (0..self.len()).filter(move |&i| self.replicas(i).any(|s| s == server)).map(|i| self.range(i))
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
        (0..n).map(|id| ServerInfo { id, addr: format!("s{id}"), alive: true, joining: false }).collect()
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
    fn adjacent_tokens_with_the_same_owner_and_replicas_form_one_range() {
        let map = Ring::new(servers(3), 32, 1).with_replicas(1).ranges(1 << 40);
        for i in 1..map.len() {
            let same_owner = map.range(i - 1).1 == map.range(i).1;
            let same_copies = map.replicas(i - 1).eq(map.replicas(i));
            assert!(!(same_owner && same_copies), "ranges {} and {i} should be one", i - 1);
        }
    }

    #[test]
    fn replicas_are_distinct_live_servers_and_the_first_takes_over() {
        let n = 1u64 << 32;
        let ring = Ring::new(servers(4), 16, 1).with_replicas(2);
        let map = ring.ranges(n);
        for i in 0..map.len() {
            let (_, owner) = map.range(i);
            let reps: Vec<u32> = map.replicas(i).collect();
            assert_eq!(reps.len(), 2);
            assert!(!reps.contains(&owner) && reps[0] != reps[1]);
        }
        // Server 1 dies: every key it owned goes to its first replica, the
        // others keep their owner, and nobody keeps server 1 as a copy.
        let mut dead = servers(4);
        dead[1].alive = false;
        let after = Ring::new(dead, 16, 2).with_replicas(2).ranges(n);
        for i in 0..10_000u64 {
            let k = mix64(i) % n;
            let (b, a) = (map.find(k).unwrap(), after.find(k).unwrap());
            let (o1, o2) = (map.range(b).1, after.range(a).1);
            let first_replica = map.replicas(b).next().unwrap();
            assert_eq!(o2, if o1 == 1 { first_replica } else { o1 }, "key {k}");
            assert!(after.replicas(a).all(|s| s != 1 && s != o2));
        }
        // With fewer live servers than copies, every live server holds one.
        let mut two = servers(3);
        two[0].alive = false;
        let m = Ring::new(two, 8, 3).with_replicas(2).ranges(1000);
        for i in 0..m.len() {
            assert_eq!(m.replicas(i).count(), 1);
        }
    }

    #[test]
    fn range_boundaries_of_every_epoch_are_token_positions() {
        // A server joins (more tokens) and another dies (marked, tokens
        // stay): every boundary of the later map is a token of the ring.
        let n = 1u64 << 40;
        let mut more = servers(4);
        more[0].alive = false;
        let ring = Ring::new(more, 16, 2).with_replicas(1);
        let tokens: std::collections::HashSet<u64> = ring.tokens(n).into_iter().map(|t| t.0).collect();
        for (r, _) in ring.ranges(n).iter() {
            assert!(r.start == 0 || tokens.contains(&r.start), "{r} starts between tokens");
        }
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
    fn a_dead_servers_keys_all_go_to_live_servers() {
        let mut s = servers(3);
        s[2].alive = false;
        let map = Ring::new(s, 32, 2).ranges(1 << 20);
        assert!(map.iter().all(|(_, o)| o < 2));
        let mut none = servers(2);
        none.iter_mut().for_each(|s| s.alive = false);
        assert!(Ring::new(none, 4, 3).ranges(100).iter().all(|(_, o)| o == NO_SERVER));
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

    #[test]
    fn a_joining_server_learns_what_it_will_hold_and_owns_nothing_yet() {
        let n = 1u64 << 32;
        for k in [0u32, 1, 2] {
            let before = Ring::new(servers(3), 16, 1).with_replicas(k).ranges(n);
            let mut s = servers(4);
            s[3].joining = true;
            let learning = Ring::new(s.clone(), 16, 2).with_replicas(k).ranges(n);
            s[3].joining = false;
            let after = Ring::new(s, 16, 3).with_replicas(k).ranges(n);
            for i in 0..20_000u64 {
                let key = mix64(i) % n;
                let (b, l, a) = (before.find(key).unwrap(), learning.find(key).unwrap(), after.find(key).unwrap());
                // While joining: owners and replicas as before.
                assert_eq!(before.range(b).1, learning.range(l).1, "key {key}");
                assert!(before.replicas(b).eq(learning.replicas(l)));
                // It learns exactly the keys it owns or copies afterwards.
                let holds_after = after.range(a).1 == 3 || after.replicas(a).any(|s| s == 3);
                assert_eq!(learning.learners(l).any(|s| s == 3), holds_after, "key {key} k {k}");
                assert!(learning.targets(l).eq(learning.replicas(l).chain(learning.learners(l))));
                // What it takes over, a member had (the old owner stays a
                // copy whenever there are copies).
                if after.range(a).1 == 3 && k > 0 {
                    assert_eq!(after.replicas(a).next(), Some(before.range(b).1));
                }
            }
            assert!((0..after.len()).all(|i| after.learners(i).next().is_none()));
            // Every range of the joining map has one owner afterwards (runs
            // routed by it never straddle two owners after the handover).
            for i in 0..learning.len() {
                let (r, _) = learning.range(i);
                let owner_at = |k: u64| after.range(after.find(k).unwrap()).1;
                let o = owner_at(r.start);
                for j in 0..16u64 {
                    let k = r.start + (r.end - r.start - 1) / 15 * j.min(15);
                    assert_eq!(owner_at(k), o, "range {r} of the joining map has two owners afterwards");
                }
                assert_eq!(owner_at(r.end - 1), o);
            }
        }
    }

    #[test]
    fn a_one_key_table_survives_the_death_of_any_server() {
        for dead in 0..3 {
            let mut s = servers(3);
            s[dead].alive = false;
            let map = Ring::new(s, 64, 2).with_replicas(1).ranges(1);
            assert_eq!(map.len(), 1);
            let (r, owner) = map.range(0);
            assert_eq!((r.start, r.end), (0, 1));
            assert!(owner != NO_SERVER && owner as usize != dead, "dead {dead}: owner {owner}");
            assert_eq!(map.replicas(0).count(), 1);
        }
    }
}
