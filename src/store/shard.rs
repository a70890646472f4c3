//! A shard: one key range of one table on one server, stored as packed slots
//! in regions, plus a header with per-worker progress.
//!
//! A `Shard` value is owned by exactly one thread (a server lane); `push`
//! takes `&mut self`, so the borrow checker enforces the single-writer rule of
//! DESIGN section 2. Remote and shared-memory readers never touch the `Shard`:
//! they read its regions, through `slot::copy_words` + `slot::validate`.
//!
//! Memory: the header lives in its own small region; slots live in chunks.
//! A dense shard has one chunk with a slot per key of the range (slot of key k
//! at index k - start, so no index at all). A sparse shard allocates chunks of
//! a fixed power-of-two number of slots as keys arrive, and keeps a hash index
//! from key to slot; slots never move once created, because a chunk is never
//! reallocated (growth adds chunks).
//!
//! Per-key optimizer state (AdaGrad, FTRL) lives in ordinary process memory
//! beside the slots: no remote reader needs it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::index::{KeyIndex, prefetch};
use super::region::{CACHE_LINE, Region};
use super::slot::{self, SlotLayout, Version};
use crate::error::{Error, Result};
use crate::table::{Init, Key, Storage, TableId};
use crate::updater::{ScalarRule, Updater};

/// A half-open key range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyRange {
    pub start: Key,
    pub end: Key,
}

impl KeyRange {
    pub fn new(start: Key, end: Key) -> Self {
        KeyRange { start, end }
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub fn contains(&self, key: Key) -> bool {
        self.start <= key && key < self.end
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// The keys of one request run: sorted and unique, either spelled out or a
/// contiguous range (dense requests send just the first key and the count).
#[derive(Clone, Copy, Debug)]
pub enum KeyRun<'a> {
    Range { first: Key, count: usize },
    List(&'a [Key]),
}

impl KeyRun<'_> {
    pub fn len(&self) -> usize {
        match *self {
            KeyRun::Range { count, .. } => count,
            KeyRun::List(k) => k.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline]
    pub fn get(&self, i: usize) -> Key {
        match *self {
            KeyRun::Range { first, .. } => first + i as u64,
            KeyRun::List(k) => k[i],
        }
    }
    pub fn first(&self) -> Option<Key> {
        (!self.is_empty()).then(|| self.get(0))
    }
    pub fn last(&self) -> Option<Key> {
        (!self.is_empty()).then(|| self.get(self.len() - 1))
    }
    /// Keys `lo..hi` of the run.
    pub fn slice(&self, lo: usize, hi: usize) -> KeyRun<'_> {
        match *self {
            KeyRun::Range { first, .. } => KeyRun::Range { first: first + lo as u64, count: hi - lo },
            KeyRun::List(k) => KeyRun::List(&k[lo..hi]),
        }
    }
    /// The index of the first key `>= key` at or after `from`.
    pub fn lower_bound(&self, key: Key, from: usize) -> usize {
        let (mut a, mut b) = (from, self.len());
        while a < b {
            let m = a + (b - a) / 2;
            if self.get(m) < key { a = m + 1 } else { b = m }
        }
        a
    }
}

/// Word of a shard's header region holding the minimum progress over
/// workers (what a one-sided reader checks bounded delay against).
pub const HEADER_MIN_PROGRESS: usize = header::MIN_PROGRESS;
/// Word of the header holding `dim | slot words << 32`.
pub const HEADER_LAYOUT: usize = header::LAYOUT;
/// First of the header's per-worker progress words (worker `w` at `+ w`).
pub const HEADER_PROGRESS: usize = header::PROGRESS;

/// Header words (region 0 of every shard).
mod header {
    pub const MAGIC: usize = 0;
    pub const LAYOUT: usize = 1;
    pub const START: usize = 2;
    pub const END: usize = 3;
    pub const MIN_PROGRESS: usize = 4;
    pub const WORKERS: usize = 5;
    pub const TABLE: usize = 6;
    pub const PROGRESS: usize = 8;
    pub const MAGIC_VALUE: u64 = u64::from_le_bytes(*b"PSSHARD1");
}

/// Bytes a sparse chunk aims for; chunk slot counts are powers of two.
const SPARSE_CHUNK_BYTES: usize = 1 << 20;

/// What a shard is for.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    pub table: TableId,
    pub range: KeyRange,
    pub dim: u32,
    pub storage: Storage,
    pub init: Init,
    /// Workers of the job, for the progress header.
    pub workers: usize,
    /// Keep the regions in files of this namespace (shared memory) instead
    /// of anonymous memory.
    pub files: Option<std::sync::Arc<crate::transport::shm::Namespace>>,
    /// A lost worker (one that may come back) holds this shard's progress
    /// at its clock instead of leaving it (see [`Shard::waits_for_lost`]).
    pub waits_for_lost: bool,
}

/// One key range of one table; see the module docs.
pub struct Shard {
    files: Option<std::sync::Arc<crate::transport::shm::Namespace>>,
    table: TableId,
    range: KeyRange,
    layout: SlotLayout,
    storage: Storage,
    init: Init,
    rule: Arc<dyn Updater>,
    waits_for_lost: bool,
    header: Arc<Region>,
    chunks: Vec<Arc<Region>>,
    /// log2 of the slots per chunk.
    chunk_shift: u32,
    /// Sparse only: key -> slot index, and the key of each slot.
    index: KeyIndex,
    keys: Vec<Key>,
    /// Slots in use.
    len: usize,
    state: Vec<f32>,
    state_per_key: usize,
    scratch: Vec<f32>,
    /// Scratch: slot numbers of a batch (`NO_SLOT` for absent keys).
    slot_ids: Vec<u32>,
    /// Aggregating rules: slots touched per clock, and the clock each slot
    /// was last touched at (u64::MAX: not pending).
    touched: std::collections::BTreeMap<u64, Vec<u32>>,
    last_touched: Vec<u64>,
    workers: usize,
    /// Per worker, the seq of the last push run applied (exactly once).
    applied: Vec<u64>,
    /// Slots changed since the last [`Shard::take_changes`], when tracked
    /// (an owner with replicas).
    changes: Option<Changes>,
}

/// The set of changed slots: a bitmap over slot numbers, with the span of
/// words that have bits set, so a dense run marks 64 slots per store and the
/// changed slots come out sorted without a sort.
#[derive(Default)]
struct Changes {
    mark: Vec<u64>,
    /// Words `lo..hi` may have bits set.
    lo: usize,
    hi: usize,
}

impl Changes {
    #[inline]
    fn touch(&mut self, w: usize) {
        if w >= self.mark.len() {
            self.mark.resize(w + 1, 0);
        }
        if self.lo == self.hi {
            (self.lo, self.hi) = (w, w + 1);
        } else {
            self.lo = self.lo.min(w);
            self.hi = self.hi.max(w + 1);
        }
    }

    #[inline]
    fn mark(&mut self, id: u32) {
        let w = id as usize / 64;
        self.touch(w);
        self.mark[w] |= 1 << (id % 64);
    }

    /// Marks slots `lo..hi`.
    fn mark_range(&mut self, lo: usize, hi: usize) {
        if lo >= hi {
            return;
        }
        let (wl, wh) = (lo / 64, (hi - 1) / 64);
        self.touch(wl);
        self.touch(wh);
        for w in wl..=wh {
            let from = if w == wl { lo % 64 } else { 0 };
            let to = if w == wh { (hi - 1) % 64 + 1 } else { 64 };
            let bits = if to - from == 64 { u64::MAX } else { ((1u64 << (to - from)) - 1) << from };
            self.mark[w] |= bits;
        }
    }

    fn is_empty(&self) -> bool {
        self.lo == self.hi
    }

    /// The marked slots in increasing order; clears the set.
    fn take(&mut self) -> Vec<u32> {
        let mut ids = Vec::new();
        for w in self.lo..self.hi {
            let mut bits = std::mem::take(&mut self.mark[w]);
            while bits != 0 {
                ids.push((w * 64) as u32 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        (self.lo, self.hi) = (0, 0);
        ids
    }
}

/// Some slots of a shard as replication moves them: keys (or a contiguous
/// range of them), versions, values and the rule's per-key state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// Keys, unless `range` holds them as `(first, count)`.
    pub keys: Vec<Key>,
    pub range: Option<(Key, u64)>,
    pub versions: Vec<Version>,
    pub values: Vec<f32>,
    /// A contiguous dense range instead as the slots' own words (`words` per
    /// key, versions and checks included): copied as they are, which is
    /// what makes replicating a dense range cost about a memcpy.
    pub raw: Vec<u64>,
    /// The rule's state per key (empty for stateless rules).
    pub state: Vec<f32>,
    /// Aggregating rules: the clock whose pushes each key holds accumulated
    /// (`u64::MAX`: none); empty otherwise.
    pub pending: Vec<u64>,
}

impl Delta {
    pub fn len(&self) -> usize {
        match self.range {
            Some((_, n)) => n as usize,
            None => self.keys.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many keys ahead batch loops prefetch.
const PREFETCH_AHEAD: usize = 16;
/// Marks a key without a slot in `slot_ids`.
const NO_SLOT: u32 = u32::MAX;

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("table", &self.table)
            .field("range", &self.range)
            .field("dim", &self.layout.dim())
            .field("storage", &self.storage)
            .field("slots", &self.len)
            .finish()
    }
}

impl Shard {
    /// Allocates a shard. Dense shards reserve a slot for every key of the
    /// range (zero-filled pages cost nothing until touched; a non-zero `init`
    /// writes every slot now).
    pub fn new(cfg: ShardConfig, rule: Arc<dyn Updater>) -> Result<Shard> {
        let layout = SlotLayout::new(cfg.dim)
            .ok_or_else(|| Error::InvalidSpec(format!("table {}: dim {} is not supported", cfg.table, cfg.dim)))?;
        if cfg.range.is_empty() {
            return Err(Error::InvalidSpec(format!("table {}: empty shard range {}", cfg.table, cfg.range)));
        }
        let header_words = header::PROGRESS + cfg.workers;
        let alloc = |what: &str, bytes: usize| match &cfg.files {
            Some(ns) => ns.create(what, bytes),
            None => Region::anon(bytes),
        };
        let header_region = alloc("header", header_words * 8)?;
        {
            let h = header_region.words();
            h[header::MAGIC].store(header::MAGIC_VALUE, Ordering::Relaxed);
            h[header::LAYOUT].store(u64::from(cfg.dim) | (layout.words() as u64) << 32, Ordering::Relaxed);
            h[header::START].store(cfg.range.start, Ordering::Relaxed);
            h[header::END].store(cfg.range.end, Ordering::Relaxed);
            h[header::WORKERS].store(cfg.workers as u64, Ordering::Relaxed);
            h[header::TABLE].store(u64::from(cfg.table), Ordering::Relaxed);
        }
        let state_per_key = layout.dim() * rule.state_per_value();
        let too_big = || {
            Error::OutOfMemory(format!(
                "table {}: a dense shard of {} keys x {} bytes does not fit in the address space",
                cfg.table,
                cfg.range.len(),
                layout.bytes()
            ))
        };
        let mut shard = Shard {
            files: cfg.files.clone(),
            table: cfg.table,
            range: cfg.range,
            layout,
            storage: cfg.storage,
            init: cfg.init,
            rule,
            waits_for_lost: cfg.waits_for_lost,
            header: Arc::new(header_region),
            chunks: Vec::new(),
            chunk_shift: 0,
            index: KeyIndex::default(),
            slot_ids: Vec::new(),
            touched: Default::default(),
            last_touched: Vec::new(),
            keys: Vec::new(),
            len: 0,
            state: Vec::new(),
            state_per_key,
            scratch: vec![0.0; layout.dim()],
            workers: cfg.workers,
            applied: vec![0; cfg.workers],
            changes: None,
        };
        match cfg.storage {
            Storage::Dense => {
                let n = usize::try_from(cfg.range.len()).map_err(|_| too_big())?;
                let bytes = n.checked_mul(layout.bytes()).filter(|b| *b < (1usize << 47)).ok_or_else(too_big)?;
                shard.chunks.push(Arc::new(alloc("slots", bytes)?));
                shard.chunk_shift = 63;
                shard.len = n;
                if state_per_key > 0 {
                    let total = n.checked_mul(state_per_key).ok_or_else(too_big)?;
                    shard.state = vec![0.0; total];
                    for st in shard.state.chunks_exact_mut(state_per_key) {
                        shard.rule.init_state(st);
                    }
                }
                if !shard.init.is_zeros() {
                    let mut v = vec![0.0; layout.dim()];
                    for i in 0..n {
                        shard.init.fill(cfg.range.start + i as u64, &mut v);
                        slot::init(layout, shard.slot(i), &v);
                    }
                }
            }
            Storage::Sparse => {
                let per_chunk = (SPARSE_CHUNK_BYTES / layout.bytes()).max(1).next_power_of_two();
                shard.chunk_shift = per_chunk.trailing_zeros();
            }
        }
        Ok(shard)
    }

    pub fn table(&self) -> TableId {
        self.table
    }
    pub fn range(&self) -> KeyRange {
        self.range
    }
    pub fn layout(&self) -> SlotLayout {
        self.layout
    }
    /// Slots in use.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory this shard holds (regions and optimizer state).
    pub fn bytes(&self) -> usize {
        self.header.len_bytes()
            + self.chunks.iter().map(|c| c.len_bytes()).sum::<usize>()
            + self.state.capacity() * 4
            + self.index.bytes()
            + self.keys.capacity() * 8
    }

    /// The header region and the slot chunks, for transports that expose them.
    pub fn regions(&self) -> (&Arc<Region>, &[Arc<Region>]) {
        (&self.header, &self.chunks)
    }

    #[inline]
    fn slot(&self, idx: usize) -> &[AtomicU64] {
        slot_in(&self.chunks, self.chunk_shift, self.layout.words(), idx)
    }

    /// Where `key`'s slot lives: (chunk, word offset), if it has one.
    pub fn slot_offset(&self, key: Key) -> Option<(usize, usize)> {
        let idx = self.locate(key)?;
        let mask = (1usize << self.chunk_shift) - 1;
        Some((idx >> self.chunk_shift, (idx & mask) * self.layout.words()))
    }

    #[inline]
    fn locate(&self, key: Key) -> Option<usize> {
        if !self.range.contains(key) {
            return None;
        }
        match self.storage {
            Storage::Dense => Some((key - self.range.start) as usize),
            Storage::Sparse => self.index.get(key).map(|i| i as usize),
        }
    }

    fn out_of_range(&self, key: Key) -> Error {
        Error::NotOwned { table: self.table, key, range: self.range.to_string() }
    }

    /// Runs are sorted (the server checks that before they get here), so the
    /// first and last keys bound the run.
    fn check_run(&self, keys: &KeyRun) -> Result<()> {
        for k in [keys.first(), keys.last()].into_iter().flatten() {
            if !self.range.contains(k) {
                return Err(self.out_of_range(k));
            }
        }
        Ok(())
    }

    /// Creates the slot of `key`; `buf` is `dim` floats of scratch.
    fn insert(&mut self, key: Key, buf: &mut [f32]) -> Result<usize> {
        let idx = self.len;
        if idx >= NO_SLOT as usize {
            return Err(Error::OutOfMemory(format!("table {}: shard {} has 2^32 keys", self.table, self.range)));
        }
        if idx >> self.chunk_shift >= self.chunks.len() {
            let bytes = (1usize << self.chunk_shift) * self.layout.bytes();
            let region = match &self.files {
                Some(ns) => ns.create("slots", bytes)?,
                None => Region::anon(bytes)?,
            };
            self.chunks.push(Arc::new(region));
        }
        self.len += 1;
        self.index.insert_new(key, idx as u32);
        self.keys.push(key);
        if self.state_per_key > 0 {
            let start = self.state.len();
            self.state.resize(start + self.state_per_key, 0.0);
            self.rule.init_state(&mut self.state[start..]);
        }
        if !self.init.is_zeros() {
            self.init.fill(key, buf);
            slot::init(self.layout, self.slot(idx), buf);
        }
        Ok(idx)
    }

    /// Applies one push per key through the table's rule. `keys` are sorted,
    /// unique and inside the shard's range (an error otherwise, with nothing
    /// applied); `values` holds `dim` values per key.
    pub fn push(&mut self, keys: KeyRun, values: &[f32]) -> Result<()> {
        self.push_at(keys, values, 0)
    }

    /// A worker's push run with its sequence number: applied, unless a run
    /// of that worker with this or a later seq was applied already (a retry
    /// after a failover); returns whether it was applied. `seq` 0 is always
    /// applied.
    pub fn push_from(&mut self, keys: KeyRun, values: &[f32], clock: u64, worker: usize, seq: u64) -> Result<bool> {
        if seq != 0 {
            self.check_worker(worker)?;
            if seq <= self.applied[worker] {
                return Ok(false);
            }
        }
        self.push_at(keys, values, clock)?;
        if seq != 0 {
            self.applied[worker] = seq;
        }
        Ok(true)
    }

    /// `worker` is a rank of the job (this shard keeps a seq and a progress
    /// word for each).
    fn check_worker(&self, worker: usize) -> Result<()> {
        if worker >= self.workers {
            return Err(Error::Config(format!(
                "table {}: worker rank {worker} is outside the job's {} workers",
                self.table, self.workers
            )));
        }
        Ok(())
    }

    /// Records seq `seq` of `worker` as applied to the shard's own keys
    /// (pushes applied piece by piece, see the server's lanes).
    pub fn note_applied(&mut self, worker: usize, seq: u64) {
        if let Some(x) = self.applied.get_mut(worker) {
            *x = (*x).max(seq);
        }
    }

    /// [`Shard::push`] of pushes issued at worker clock `clock` (aggregating
    /// rules apply them once every worker has finished that clock).
    pub fn push_at(&mut self, keys: KeyRun, values: &[f32], clock: u64) -> Result<()> {
        let d = self.layout.dim();
        if values.len() != keys.len() * d {
            return Err(Error::LengthMismatch {
                table: self.table,
                keys: keys.len(),
                dim: d as u32,
                expected: keys.len() * d,
                got: values.len(),
            });
        }
        self.check_run(&keys)?;
        if self.rule.aggregates() {
            return self.accumulate_run(keys, values, clock);
        }
        if d == 1
            && let Some(rule) = self.rule.scalar()
        {
            return self.apply_scalar_run(keys, values, rule);
        }
        // The scratch buffer goes back even when a key fails half-way.
        let mut cur = std::mem::take(&mut self.scratch);
        let result = self.apply_run(keys, values, &mut cur);
        self.scratch = cur;
        result
    }

    /// Scalar keys under a stateless rule: one load and one store per key,
    /// and for a dense range no lookups at all.
    fn apply_scalar_run(&mut self, keys: KeyRun, values: &[f32], rule: ScalarRule) -> Result<()> {
        #[inline(always)]
        fn run(words: &[AtomicU64], values: &[f32], f: impl Fn(f32, f32) -> f32) {
            for (w, &g) in words.iter().zip(values) {
                slot::update_scalar(w, |v| f(v, g));
            }
        }
        if let (Storage::Dense, KeyRun::Range { first, count }) = (self.storage, keys) {
            let base = (first - self.range.start) as usize;
            let words = &self.chunks[0].words()[base..base + count];
            match rule {
                ScalarRule::Assign => run(words, values, |_, g| g),
                ScalarRule::Sum => run(words, values, |v, g| v + g),
                r => run(words, values, |v, g| r.apply(v, g)),
            }
            if let Some(c) = &mut self.changes {
                c.mark_range(base, base + count);
            }
            return Ok(());
        }
        // Any other run: find (or create) every key's slot first, then apply,
        // each loop prefetching a few keys ahead so cache misses overlap.
        let mut ids = std::mem::take(&mut self.slot_ids);
        let r = self.slot_ids_for(keys, true, &mut ids);
        if r.is_ok() {
            let words = self.layout.words();
            for (i, &g) in values.iter().enumerate() {
                if let Some(&ahead) = ids.get(i + PREFETCH_AHEAD) {
                    prefetch(self.slot(ahead as usize).as_ptr().cast());
                }
                let slot = slot_in(&self.chunks, self.chunk_shift, words, ids[i] as usize);
                slot::update_scalar(&slot[0], |v| rule.apply(v, g));
            }
            if let Some(c) = &mut self.changes {
                ids.iter().for_each(|&id| c.mark(id));
            }
        }
        self.slot_ids = ids;
        r
    }

    /// The slot numbers of `keys` into `ids`; with `create`, slots are made
    /// for absent keys of a sparse shard, else they get `NO_SLOT`.
    fn slot_ids_for(&mut self, keys: KeyRun, create: bool, ids: &mut Vec<u32>) -> Result<()> {
        ids.clear();
        let n = keys.len();
        let mut scratch = vec![0.0f32; if create { self.layout.dim() } else { 0 }];
        for i in 0..n {
            let key = keys.get(i);
            let id = match self.storage {
                Storage::Dense => {
                    if !self.range.contains(key) {
                        return Err(self.out_of_range(key));
                    }
                    (key - self.range.start) as u32
                }
                Storage::Sparse => {
                    if i + PREFETCH_AHEAD < n {
                        self.index.prefetch(keys.get(i + PREFETCH_AHEAD));
                    }
                    match self.index.get(key) {
                        Some(id) => id,
                        None if !self.range.contains(key) => return Err(self.out_of_range(key)),
                        None if create => self.insert(key, &mut scratch)? as u32,
                        None => NO_SLOT,
                    }
                }
            };
            ids.push(id);
        }
        Ok(())
    }

    /// Aggregating rules: fold each push into its key's state and note the
    /// key as touched at `clock`.
    fn accumulate_run(&mut self, keys: KeyRun, values: &[f32], clock: u64) -> Result<()> {
        let d = self.layout.dim();
        let mut ids = std::mem::take(&mut self.slot_ids);
        let r = self.slot_ids_for(keys, true, &mut ids);
        if r.is_ok() {
            let touched = self.touched.entry(clock).or_default();
            if self.last_touched.len() < self.len {
                self.last_touched.resize(self.len, u64::MAX);
            }
            for (&id, push) in ids.iter().zip(values.chunks_exact(d)) {
                let i = id as usize;
                self.rule.accumulate(&mut self.state[i * self.state_per_key..(i + 1) * self.state_per_key], push);
                if self.last_touched[i] != clock {
                    self.last_touched[i] = clock;
                    touched.push(id);
                }
            }
            if let Some(c) = &mut self.changes {
                ids.iter().for_each(|&id| c.mark(id));
            }
        }
        self.slot_ids = ids;
        r
    }

    /// Aggregating rules: apply what was accumulated for every key touched
    /// at a clock below `progress` (every worker has finished those clocks).
    fn finalize_below(&mut self, progress: u64) {
        let mut cur = std::mem::take(&mut self.scratch);
        while let Some(entry) = self.touched.first_entry() {
            if *entry.key() >= progress {
                break;
            }
            for id in entry.remove() {
                let i = id as usize;
                let key = match self.storage {
                    Storage::Dense => self.range.start + i as u64,
                    Storage::Sparse => self.keys[i],
                };
                let slot = slot_in(&self.chunks, self.chunk_shift, self.layout.words(), i);
                slot::load(self.layout, slot, &mut cur);
                let st = &mut self.state[i * self.state_per_key..(i + 1) * self.state_per_key];
                self.rule.finalize(key, &mut cur, st);
                slot::store(self.layout, slot, &cur);
                self.last_touched[i] = u64::MAX;
                if let Some(c) = &mut self.changes {
                    c.mark(id);
                }
            }
        }
        self.scratch = cur;
    }

    fn apply_run(&mut self, keys: KeyRun, values: &[f32], cur: &mut [f32]) -> Result<()> {
        let d = self.layout.dim();
        for (i, push) in values.chunks_exact(d).enumerate() {
            let key = keys.get(i);
            let idx = match self.locate(key) {
                Some(idx) => idx,
                None if self.storage == Storage::Sparse && self.range.contains(key) => self.insert(key, cur)?,
                None => return Err(self.out_of_range(key)),
            };
            let slot = slot_in(&self.chunks, self.chunk_shift, self.layout.words(), idx);
            slot::load(self.layout, slot, cur);
            let st = &mut self.state[idx * self.state_per_key..(idx + 1) * self.state_per_key];
            self.rule.apply(key, cur, st, push);
            slot::store(self.layout, slot, cur);
            if let Some(c) = &mut self.changes {
                c.mark(idx as u32);
            }
        }
        Ok(())
    }

    /// Reads the current values (and optionally versions) of `keys`. A key of
    /// a sparse shard that was never pushed reads as its initial value at
    /// version 0, without creating a slot.
    pub fn pull(&self, keys: KeyRun, out: &mut [f32], mut versions: Option<&mut [Version]>) -> Result<()> {
        let d = self.layout.dim();
        if out.len() != keys.len() * d {
            return Err(Error::LengthMismatch {
                table: self.table,
                keys: keys.len(),
                dim: d as u32,
                expected: keys.len() * d,
                got: out.len(),
            });
        }
        self.check_run(&keys)?;
        if d == 1
            && versions.is_none()
            && let (Storage::Dense, KeyRun::Range { first, count }) = (self.storage, keys)
        {
            let base = (first - self.range.start) as usize;
            for (o, w) in out.iter_mut().zip(&self.chunks[0].words()[base..base + count]) {
                *o = slot::load_scalar(w);
            }
            return Ok(());
        }
        if d == 1 && versions.is_none() {
            // Batch lookups with prefetching (see `slot_ids_for`).
            let mut ids = Vec::with_capacity(keys.len());
            self.lookup_ids(keys, &mut ids)?;
            for (i, o) in out.iter_mut().enumerate() {
                if let Some(&ahead) = ids.get(i + PREFETCH_AHEAD)
                    && ahead != NO_SLOT
                {
                    prefetch(self.slot(ahead as usize).as_ptr().cast());
                }
                *o = match ids[i] {
                    NO_SLOT => {
                        let mut v = [0.0f32];
                        self.init.fill(keys.get(i), &mut v);
                        v[0]
                    }
                    id => slot::load_scalar(&self.slot(id as usize)[0]),
                };
            }
            return Ok(());
        }
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let key = keys.get(i);
            let v = match self.locate(key) {
                Some(idx) => slot::load(self.layout, self.slot(idx), o),
                None => {
                    self.init.fill(key, o);
                    0
                }
            };
            if let Some(vs) = versions.as_deref_mut() {
                vs[i] = v;
            }
        }
        Ok(())
    }

    /// Read-only lookup of slot numbers (`NO_SLOT` for absent keys).
    fn lookup_ids(&self, keys: KeyRun, ids: &mut Vec<u32>) -> Result<()> {
        let n = keys.len();
        for i in 0..n {
            let key = keys.get(i);
            if !self.range.contains(key) {
                return Err(self.out_of_range(key));
            }
            ids.push(match self.storage {
                Storage::Dense => (key - self.range.start) as u32,
                Storage::Sparse => {
                    if i + PREFETCH_AHEAD < n {
                        self.index.prefetch(keys.get(i + PREFETCH_AHEAD));
                    }
                    self.index.get(key).unwrap_or(NO_SLOT)
                }
            });
        }
        Ok(())
    }

    /// [`Shard::pull`] into a new vector (no zero-filling first).
    pub fn pull_vec(&self, keys: KeyRun) -> Result<Vec<f32>> {
        let d = self.layout.dim();
        if d == 1
            && let (Storage::Dense, KeyRun::Range { first, count }) = (self.storage, keys)
        {
            self.check_run(&keys)?;
            let base = (first - self.range.start) as usize;
            return Ok(self.chunks[0].words()[base..base + count].iter().map(slot::load_scalar).collect());
        }
        let mut out = vec![0.0f32; keys.len() * d];
        self.pull(keys, &mut out, None)?;
        Ok(out)
    }

    /// A version-filtered pull: compares each key's version with `known` and
    /// returns a bitmap of the keys that changed (bit i of byte i/8), their
    /// values and their versions. A key without a slot has version 0.
    pub fn pull_changed(&self, keys: KeyRun, known: &[Version]) -> Result<(Vec<u8>, Vec<f32>, Vec<Version>)> {
        let n = keys.len();
        if known.len() != n {
            return Err(Error::LengthMismatch { table: self.table, keys: n, dim: 1, expected: n, got: known.len() });
        }
        self.check_run(&keys)?;
        let d = self.layout.dim();
        let mut bitmap = vec![0u8; n.div_ceil(8)];
        let (mut vals, mut vers) = (Vec::new(), Vec::new());
        let mut buf = vec![0.0f32; d];
        for (i, &k) in known.iter().enumerate() {
            let key = keys.get(i);
            let v = match self.locate(key) {
                Some(idx) => slot::load(self.layout, self.slot(idx), &mut buf),
                None => {
                    self.init.fill(key, &mut buf);
                    0
                }
            };
            if v != k {
                bitmap[i / 8] |= 1 << (i % 8);
                vals.extend_from_slice(&buf);
                vers.push(v);
            }
        }
        Ok((bitmap, vals, vers))
    }

    /// Versions only (for version-filtered pulls).
    pub fn versions(&self, keys: KeyRun, out: &mut [Version]) -> Result<()> {
        self.check_run(&keys)?;
        for (i, o) in out.iter_mut().enumerate().take(keys.len()) {
            *o = self.locate(keys.get(i)).map_or(0, |idx| slot::version(self.slot(idx)));
        }
        Ok(())
    }

    /// Records that every push `worker` issued at clocks `< clock` has been
    /// applied to this shard, and refreshes the minimum over workers.
    pub fn record_progress(&mut self, worker: usize, clock: u64) -> Result<()> {
        self.check_worker(worker)?;
        // A handle of our own, so that finalizing (which borrows the shard
        // mutably) can happen while the progress words are in use.
        let hdr = self.header.clone();
        let h = hdr.words();
        let p = &h[header::PROGRESS..header::PROGRESS + self.workers];
        // Release: a reader that Acquire-loads the progress (or the minimum)
        // and sees `clock` also sees every slot store this thread made before,
        // i.e. all of that worker's pushes up to `clock`.
        if clock > p[worker].load(Ordering::Relaxed) {
            p[worker].store(clock, Ordering::Release);
            let min = p.iter().map(|w| w.load(Ordering::Relaxed)).min().unwrap_or(clock);
            // Aggregated updates of the clocks everyone finished go in before
            // the new minimum is published: a reader that sees it sees them.
            if self.rule.aggregates() {
                self.finalize_below(min);
            }
            h[header::MIN_PROGRESS].store(min, Ordering::Release);
        }
        Ok(())
    }

    /// Sets `worker`'s progress to `clock`, lower or not: a restarted worker
    /// re-enters at its resume clock (its predecessor's progress was raised
    /// to `u64::MAX` when it was lost, unless the shard waits for lost
    /// workers), a worker taking a free seat at its first clock. The minimum
    /// may fall; nothing is finalized (no clock completed).
    pub fn reset_progress(&mut self, worker: usize, clock: u64) -> Result<()> {
        self.check_worker(worker)?;
        let h = self.header.words();
        let p = &h[header::PROGRESS..header::PROGRESS + self.workers];
        // Release, as in `record_progress`: a lower value claims less, so a
        // reader that sees it (Acquire) and then waits for more is only more
        // careful; one that saw the old value before the reset read a state
        // that was true then (the worker was out of the job).
        p[worker].store(clock, Ordering::Release);
        let min = p.iter().map(|w| w.load(Ordering::Relaxed)).min().unwrap_or(clock);
        h[header::MIN_PROGRESS].store(min, Ordering::Release);
        Ok(())
    }

    /// `progress(w) = c`: all of worker `w`'s pushes of clocks `< c` are applied.
    pub fn progress(&self, worker: usize) -> u64 {
        self.header.words().get(header::PROGRESS + worker).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Whether a lost worker (one that may be restarted) keeps its place in
    /// this shard's progress, so that nobody reads past a clock its pushes
    /// are missing from, instead of counting as left.
    pub fn waits_for_lost(&self) -> bool {
        self.waits_for_lost
    }

    /// The minimum progress over all workers.
    pub fn min_progress(&self) -> u64 {
        self.header.words()[header::MIN_PROGRESS].load(Ordering::Acquire)
    }

    /// Starts (or stops) noting which slots change, for replication.
    pub fn track_changes(&mut self, on: bool) {
        match (on, self.changes.is_some()) {
            (true, false) => self.changes = Some(Changes::default()),
            (false, true) => self.changes = None,
            _ => {}
        }
    }

    /// Whether slots changed since the last [`Shard::take_changes`].
    pub fn has_changes(&self) -> bool {
        self.changes.as_ref().is_some_and(|c| !c.is_empty())
    }

    /// The slots changed since the last call, sorted; clears the set.
    pub fn take_changes(&mut self) -> Vec<u32> {
        self.changes.as_mut().map(Changes::take).unwrap_or_default()
    }

    /// The key of slot `id`.
    pub fn key_of(&self, id: u32) -> Key {
        match self.storage {
            Storage::Dense => self.range.start + u64::from(id),
            Storage::Sparse => self.keys[id as usize],
        }
    }

    /// Slots holding keys of `range` (all of them: a new replica's copy).
    pub fn slots_in(&self, range: KeyRange) -> Vec<u32> {
        match self.storage {
            Storage::Dense => {
                let lo = range.start.max(self.range.start);
                let hi = range.end.min(self.range.end);
                (lo..hi.max(lo)).map(|k| (k - self.range.start) as u32).collect()
            }
            Storage::Sparse => (0..self.len as u32).filter(|&id| range.contains(self.keys[id as usize])).collect(),
        }
    }

    /// The current state of slots `ids`, in key order, as replication sends it.
    pub fn delta_of(&self, ids: &[u32]) -> Delta {
        if !ids.windows(2).all(|w| self.key_of(w[0]) < self.key_of(w[1])) {
            let mut by_key: Vec<u32> = ids.to_vec();
            by_key.sort_unstable_by_key(|&id| self.key_of(id));
            return self.delta_of(&by_key);
        }
        let d = self.layout.dim();
        let mut out = Delta::default();
        let contiguous = ids.windows(2).all(|w| w[1] == w[0] + 1);
        debug_assert!(ids.windows(2).all(|w| self.key_of(w[0]) < self.key_of(w[1])));
        if self.storage == Storage::Dense && contiguous && !ids.is_empty() {
            out.range = Some((self.key_of(ids[0]), ids.len() as u64));
            let w = self.layout.words();
            let base = ids[0] as usize * w;
            out.raw = vec![0; ids.len() * w];
            // The owner's own words: no other thread writes them.
            slot::copy_words(&self.chunks[0].words()[base..base + ids.len() * w], &mut out.raw);
        } else {
            out.keys = ids.iter().map(|&id| self.key_of(id)).collect();
            out.versions = Vec::with_capacity(ids.len());
            out.values = vec![0.0; ids.len() * d];
            for (&id, v) in ids.iter().zip(out.values.chunks_exact_mut(d)) {
                out.versions.push(slot::load(self.layout, self.slot(id as usize), v));
            }
        }
        if self.state_per_key > 0 {
            let spk = self.state_per_key;
            out.state =
                ids.iter().flat_map(|&id| &self.state[id as usize * spk..(id as usize + 1) * spk]).copied().collect();
        }
        if self.rule.aggregates() {
            out.pending =
                ids.iter().map(|&id| self.last_touched.get(id as usize).copied().unwrap_or(u64::MAX)).collect();
        }
        out
    }

    /// Replica side: makes keys hold exactly the owner's state (creating
    /// their slots as needed). Checks every length and key first; on error
    /// nothing is changed.
    pub fn apply_delta(
        &mut self,
        keys: KeyRun,
        versions: &[Version],
        values: &[f32],
        state: &[f32],
        pending: &[u64],
    ) -> Result<()> {
        let (n, d) = (keys.len(), self.layout.dim());
        let bad = |what: String| Error::Config(format!("table {}: replicated state: {what}", self.table));
        if versions.len() != n || values.len() != n * d {
            return Err(bad(format!(
                "{} versions and {} values for {n} keys of dim {d}",
                versions.len(),
                values.len()
            )));
        }
        if state.len() != n * self.state_per_key {
            return Err(bad(format!("{} state values for {n} keys, {} each", state.len(), self.state_per_key)));
        }
        if !pending.is_empty() && (pending.len() != n || !self.rule.aggregates()) {
            return Err(bad(format!("{} pending clocks for {n} keys", pending.len())));
        }
        if let KeyRun::List(k) = keys
            && let Some(i) = k.windows(2).position(|w| w[0] >= w[1])
        {
            return Err(bad(format!("keys not sorted at index {}", i + 1)));
        }
        self.check_run(&keys)?;
        let mut ids = std::mem::take(&mut self.slot_ids);
        let r = self.slot_ids_for(keys, true, &mut ids);
        if r.is_ok() {
            let spk = self.state_per_key;
            if !pending.is_empty() && self.last_touched.len() < self.len {
                self.last_touched.resize(self.len, u64::MAX);
            }
            for (i, &id) in ids.iter().enumerate() {
                let slot = slot_in(&self.chunks, self.chunk_shift, self.layout.words(), id as usize);
                slot::store_at(self.layout, slot, &values[i * d..(i + 1) * d], versions[i]);
                let id = id as usize;
                self.state[id * spk..(id + 1) * spk].copy_from_slice(&state[i * spk..(i + 1) * spk]);
                if let Some(&p) = pending.get(i) {
                    self.last_touched[id] = p;
                }
            }
        }
        self.slot_ids = ids;
        r
    }

    /// Replica side: a contiguous dense range as the owner's slot words
    /// (see [`Delta::raw`]), with the rule's state and pending clocks. Every
    /// word is stored atomically; a concurrent one-sided reader validates
    /// what it copies, as always, so it never accepts a mix of two states.
    pub fn apply_raw(&mut self, first: Key, raw: &[u64], state: &[f32], pending: &[u64]) -> Result<()> {
        let w = self.layout.words();
        let n = raw.len() / w;
        let bad = |what: String| Error::Config(format!("table {}: replicated slots: {what}", self.table));
        if self.storage != Storage::Dense || raw.len() != n * w {
            return Err(bad(format!("{} words are not whole slots of {w} words of a dense shard", raw.len())));
        }
        if n == 0 {
            return Ok(());
        }
        if state.len() != n * self.state_per_key || (!pending.is_empty() && pending.len() != n) {
            return Err(bad(format!("{} state values and {} pending clocks for {n} keys", state.len(), pending.len())));
        }
        let last = first.checked_add(n as u64 - 1).ok_or_else(|| bad("key range overflows".into()))?;
        self.check_run(&KeyRun::Range { first, count: n })?;
        let _ = last;
        let base = (first - self.range.start) as usize;
        let words = &self.chunks[0].words()[base * w..(base + n) * w];
        for (dst, &src) in words.iter().zip(raw) {
            // Release: as any slot store (see `slot::publish`).
            dst.store(src, Ordering::Release);
        }
        let spk = self.state_per_key;
        self.state[base * spk..(base + n) * spk].copy_from_slice(state);
        if !pending.is_empty() {
            if self.last_touched.len() < self.len {
                self.last_touched.resize(self.len, u64::MAX);
            }
            self.last_touched[base..base + n].copy_from_slice(pending);
        }
        Ok(())
    }

    /// Per worker, the seq of the last push run applied.
    pub fn applied(&self) -> &[u64] {
        &self.applied
    }

    /// Progress of every worker.
    pub fn progress_all(&self) -> Vec<u64> {
        (0..self.workers).map(|w| self.progress(w)).collect()
    }

    /// Replica side: takes the owner's progress (it only grows). Nothing is
    /// finalized here: the owner's finalized values arrive as state.
    pub fn merge_progress(&mut self, progress: &[u64]) {
        let h = self.header.words();
        let p = &h[header::PROGRESS..header::PROGRESS + self.workers];
        for (w, &c) in p.iter().zip(progress) {
            if c > w.load(Ordering::Relaxed) {
                // Release: as in `record_progress`.
                w.store(c, Ordering::Release);
            }
        }
        let min = p.iter().map(|w| w.load(Ordering::Relaxed)).min().unwrap_or(0);
        h[header::MIN_PROGRESS].store(min, Ordering::Release);
    }

    /// A replica becomes an owner: the keys holding accumulated pushes are
    /// listed again by clock, so that they are finalized as clocks complete.
    pub fn take_ownership(&mut self) {
        if !self.rule.aggregates() {
            return;
        }
        self.touched.clear();
        for (id, &c) in self.last_touched.iter().enumerate() {
            if c != u64::MAX {
                self.touched.entry(c).or_default().push(id as u32);
            }
        }
    }

    /// Visits every key that has a slot with its values, in slot order.
    pub fn for_each(&self, mut f: impl FnMut(Key, Version, &[f32])) {
        let mut v = vec![0.0; self.layout.dim()];
        for idx in 0..self.len {
            let key = match self.storage {
                Storage::Dense => self.range.start + idx as u64,
                Storage::Sparse => self.keys[idx],
            };
            let ver = slot::load(self.layout, self.slot(idx), &mut v);
            f(key, ver, &v);
        }
    }
}

#[inline]
fn slot_in(chunks: &[Arc<Region>], shift: u32, words: usize, idx: usize) -> &[AtomicU64] {
    let mask = (1usize << shift) - 1;
    let off = (idx & mask) * words;
    &chunks[idx >> shift].words()[off..off + words]
}

/// Reads the validated value of slot `(chunk, offset)` of a shard's regions the
/// way a one-sided reader does: copy the words, then validate. Retries torn
/// copies up to `tries` times.
pub fn read_slot_one_sided(
    chunks: &[Arc<Region>],
    layout: SlotLayout,
    chunk: usize,
    offset: usize,
    out: &mut [f32],
    tries: usize,
) -> Option<Version> {
    let mut img = vec![0u64; layout.words()];
    let src = chunks.get(chunk)?.words().get(offset..offset + layout.words())?;
    for _ in 0..tries.max(1) {
        slot::copy_words(src, &mut img);
        if let Ok(v) = slot::validate(layout, &img, out) {
            return Some(v);
        }
    }
    None
}

/// `CACHE_LINE` is re-exported for layout arithmetic by transports.
pub const SLOT_ALIGN: usize = CACHE_LINE;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::UpdaterSpec;

    #[test]
    fn changed_slots_come_out_once_each_in_order() {
        let mut c = Changes::default();
        assert!(c.is_empty());
        c.mark_range(60, 200);
        c.mark(5);
        c.mark(70);
        c.mark(1000);
        c.mark_range(3, 4);
        let ids = c.take();
        let mut want: Vec<u32> = (60..200).collect();
        want.extend([3, 5, 1000]);
        want.sort_unstable();
        assert_eq!(ids, want);
        assert!(c.is_empty() && c.take().is_empty());
        c.mark_range(64, 128);
        assert_eq!(c.take(), (64..128).collect::<Vec<u32>>());
    }
    use crate::updater::Rules;

    fn shard(storage: Storage, range: KeyRange, dim: u32, spec: UpdaterSpec, init: Init) -> Shard {
        let rule = Rules::default().resolve(&spec).unwrap();
        let cfg = ShardConfig { table: 1, range, dim, storage, init, workers: 3, files: None, waits_for_lost: false };
        Shard::new(cfg, rule).unwrap()
    }

    #[test]
    fn dense_push_then_pull_sees_it() {
        let mut s = shard(Storage::Dense, KeyRange::new(10, 20), 2, UpdaterSpec::Sum, Init::Zeros);
        s.push(KeyRun::List(&[11, 15]), &[1.0, 2.0, 3.0, 4.0]).unwrap();
        s.push(KeyRun::Range { first: 11, count: 2 }, &[1.0, 1.0, 1.0, 1.0]).unwrap();
        let mut out = vec![0.0; 6];
        let mut ver = vec![0; 3];
        s.pull(KeyRun::List(&[11, 12, 15]), &mut out, Some(&mut ver)).unwrap();
        assert_eq!(out, vec![2.0, 3.0, 1.0, 1.0, 3.0, 4.0]);
        assert_eq!(ver, vec![4, 2, 2]);
    }

    #[test]
    fn sparse_keys_are_created_on_push_and_read_as_init_before() {
        let init = Init::Constant(0.5);
        let mut s = shard(Storage::Sparse, KeyRange::new(0, u64::MAX), 1, UpdaterSpec::Sum, init);
        let mut out = [0.0; 2];
        s.pull(KeyRun::List(&[7, 1 << 60]), &mut out, None).unwrap();
        assert_eq!(out, [0.5, 0.5]);
        assert_eq!(s.len(), 0);
        s.push(KeyRun::List(&[1 << 60]), &[1.0]).unwrap();
        s.pull(KeyRun::List(&[7, 1 << 60]), &mut out, None).unwrap();
        assert_eq!(out, [0.5, 1.5]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn sparse_shards_grow_by_chunks_without_moving_slots() {
        let mut s = shard(Storage::Sparse, KeyRange::new(0, u64::MAX), 64, UpdaterSpec::Assign, Init::Zeros);
        let per_chunk = 1usize << s.chunk_shift;
        let n = per_chunk * 2 + 3;
        let first_chunk = s.regions().1.first().map(|c| c.as_ptr());
        for k in 0..n as u64 {
            s.push(KeyRun::List(&[k * 1000]), &[k as f32; 64]).unwrap();
            if k == 0 {
                assert_eq!(s.regions().1.len(), 1);
            }
        }
        assert_eq!(s.regions().1.len(), 3);
        assert!(first_chunk.is_none() || first_chunk == s.regions().1.first().map(|c| c.as_ptr()));
        let mut out = vec![0.0; 64];
        for k in [0u64, per_chunk as u64, n as u64 - 1] {
            let (c, o) = s.slot_offset(k * 1000).unwrap();
            assert_eq!(read_slot_one_sided(s.regions().1, s.layout(), c, o, &mut out, 1), Some(2));
            assert_eq!(out[0], k as f32);
        }
        let mut seen = 0;
        s.for_each(|_, _, _| seen += 1);
        assert_eq!(seen, n);
    }

    #[test]
    fn dense_non_zero_init_is_written_at_version_zero() {
        let s = shard(Storage::Dense, KeyRange::new(0, 4), 3, UpdaterSpec::Sum, Init::Constant(2.0));
        let mut out = [0.0; 3];
        let (c, o) = s.slot_offset(3).unwrap();
        assert_eq!(read_slot_one_sided(s.regions().1, s.layout(), c, o, &mut out, 1), Some(0));
        assert_eq!(out, [2.0; 3]);
    }

    #[test]
    fn keys_outside_the_range_and_wrong_lengths_are_errors_and_change_nothing() {
        let mut s = shard(Storage::Dense, KeyRange::new(10, 20), 1, UpdaterSpec::Sum, Init::Zeros);
        assert!(matches!(s.push(KeyRun::List(&[5]), &[1.0]), Err(Error::NotOwned { key: 5, .. })));
        assert!(matches!(s.push(KeyRun::List(&[19, 20]), &[1.0, 1.0]), Err(Error::NotOwned { key: 20, .. })));
        assert!(matches!(s.push(KeyRun::List(&[11]), &[1.0, 2.0]), Err(Error::LengthMismatch { .. })));
        assert!(s.pull(KeyRun::Range { first: 18, count: 5 }, &mut [0.0; 5], None).is_err());
        let mut out = [9.0; 10];
        s.pull(KeyRun::Range { first: 10, count: 10 }, &mut out, None).unwrap();
        assert_eq!(out, [0.0; 10]);
    }

    #[test]
    fn stateful_rules_keep_state_per_key() {
        let spec = UpdaterSpec::AdaGrad { lr: 1.0, eps: 0.0, initial_accumulator: 0.0 };
        let mut s = shard(Storage::Sparse, KeyRange::new(0, 100), 1, spec, Init::Zeros);
        s.push(KeyRun::List(&[1, 2]), &[2.0, 4.0]).unwrap();
        s.push(KeyRun::List(&[1]), &[2.0]).unwrap();
        let mut out = [0.0; 2];
        s.pull(KeyRun::List(&[1, 2]), &mut out, None).unwrap();
        // key 1: n=4, w=-1; n=8, w=-1-2/sqrt(8). key 2: n=16, w=-1.
        assert!((out[0] - (-1.0 - 2.0 / 8f32.sqrt())).abs() < 1e-6);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn aggregating_rules_apply_once_every_worker_finished_the_clock() {
        let spec = UpdaterSpec::ProximalNewton { l1: 0.0, l2: 0.0, max_step: 0.0 };
        let mut s = shard(Storage::Sparse, KeyRange::new(0, 100), 2, spec, Init::Zeros);
        // Clock 0: two of three workers push for key 5; nothing changes yet.
        s.push_at(KeyRun::List(&[5]), &[-2.0, 1.0], 0).unwrap();
        s.push_at(KeyRun::List(&[5]), &[-2.0, 1.0], 0).unwrap();
        s.record_progress(0, 1).unwrap();
        s.record_progress(1, 1).unwrap();
        let mut out = [0.0; 2];
        s.pull(KeyRun::List(&[5]), &mut out, None).unwrap();
        assert_eq!(out, [0.0, 0.0]);
        // The last worker finishes clock 0: w = (h*0 - g)/h = 4/2 = 2.
        s.record_progress(2, 1).unwrap();
        s.pull(KeyRun::List(&[5]), &mut out, None).unwrap();
        assert_eq!(out, [2.0, -4.0]);
    }

    #[test]
    fn progress_tracks_each_worker_and_the_minimum() {
        let mut s = shard(Storage::Dense, KeyRange::new(0, 4), 1, UpdaterSpec::Sum, Init::Zeros);
        s.record_progress(0, 3).unwrap();
        s.record_progress(1, 2).unwrap();
        assert_eq!(s.min_progress(), 0);
        s.record_progress(2, 5).unwrap();
        assert_eq!(s.min_progress(), 2);
        s.record_progress(1, 1).unwrap(); // never goes back
        assert_eq!((s.progress(1), s.min_progress()), (2, 2));
        assert!(s.record_progress(3, 1).is_err());
    }

    #[test]
    fn a_reset_lowers_a_left_workers_progress_and_the_minimum() {
        let mut s = shard(Storage::Dense, KeyRange::new(0, 4), 1, UpdaterSpec::Sum, Init::Zeros);
        s.record_progress(0, 7).unwrap();
        s.record_progress(1, 9).unwrap();
        s.record_progress(2, u64::MAX).unwrap(); // worker 2 left
        assert_eq!(s.min_progress(), 7);
        s.reset_progress(2, 4).unwrap(); // and came back at clock 4
        assert_eq!((s.progress(2), s.min_progress()), (4, 4));
        s.record_progress(2, 5).unwrap(); // raises from there again
        assert_eq!((s.progress(2), s.min_progress()), (5, 5));
        assert!(s.reset_progress(3, 1).is_err());
    }
}
