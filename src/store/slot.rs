//! The versioned slot: one key's version and values, and the single rule by
//! which any reader (local thread, shared-memory peer, RDMA READ) decides
//! whether a copy of a slot is consistent.
//!
//! # Layout
//! Slots are packed arrays of little-endian 64-bit words; a slot never straddles
//! an alignment it relies on because every slot starts on an 8-byte boundary.
//!
//! * `dim == 1` (the scalar keys of billion-key models): **one word**, the
//!   version in the low 32 bits and the `f32` value's bits in the high 32 bits.
//!   8 bytes per key, 4 of them overhead. The writer publishes version and value
//!   with a single 64-bit store, and every transport reads an aligned 8-byte
//!   word atomically, so such a slot is *self-validating*: every copy is a state
//!   the writer published.
//! * `dim >= 2`: a header word (version in the low 32 bits, check in the high
//!   32 bits) followed by the values, two per word, the last word padded with
//!   zeros when `dim` is odd. Overhead 8 bytes per key (+4 of padding for odd
//!   `dim`): 12.5% at `dim = 16`, 0.8% at `dim = 256`.
//!
//! # Why a copy can be trusted
//! A one-sided read promises only that each aligned 8-byte word is read
//! atomically; the order in which words (or cache lines) are read, and when,
//! is unspecified, so a copy may mix words of several writes. The writer
//! therefore stores `check = crc32c(version ++ values) ^ zero_check` in the
//! header of every published state, and marks the header odd while it writes.
//! A copy is accepted only if its version is even and its check matches its
//! own version and values. A mix of words from different writes carries values
//! that the header's check was not computed over, which CRC-32C detects with
//! certainty when the differing bits span at most 32 bits and otherwise misses
//! with probability about 2^-32 per torn copy (torn copies only arise when a
//! read races a write of the same slot). The check does not depend on read
//! order, on cache-line atomicity or on memory fences at the reader, which is
//! why the same function serves local, shared-memory and RDMA readers.
//! `zero_check` makes an all-zero slot (a fresh anonymous page) valid.
//!
//! The writer also follows the seqlock discipline (odd header, Release fence,
//! values, Release store of the even header), so a local reader that copies
//! after an Acquire load sees the values of the version it loaded or a torn
//! copy the check rejects; never a silent mix.
//!
//! # Single writer
//! Only the shard's owner calls [`store`] and [`load`] (the owner's own,
//! unvalidated read). That is enforced by `Shard` being owned by one lane
//! thread; nothing here locks.

use std::sync::atomic::{AtomicU64, Ordering, fence};

#[cfg(target_endian = "big")]
compile_error!("pserver's slot and wire formats are little-endian; big-endian hosts are not supported");

/// A slot's version: even for every published state, +2 per applied update.
pub type Version = u32;

/// Largest supported `dim`: keeps a slot's byte size well inside `u32`.
pub const MAX_DIM: u32 = 1 << 24;

/// Shape of the slots of one table: how many words a slot takes and how its
/// check is seeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotLayout {
    dim: u32,
    zero_check: u32,
}

/// A slot copy that failed validation; read it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Torn;

impl SlotLayout {
    /// Layout for `dim` values per key; `None` when `dim` is 0 or above [`MAX_DIM`].
    pub fn new(dim: u32) -> Option<Self> {
        if dim == 0 || dim > MAX_DIM {
            return None;
        }
        let zero_check = if dim == 1 { 0 } else { raw_check_of_zeros(dim as usize) };
        Some(SlotLayout { dim, zero_check })
    }

    /// Values per key.
    #[inline]
    pub fn dim(self) -> usize {
        self.dim as usize
    }

    /// 64-bit words per slot.
    #[inline]
    pub fn words(self) -> usize {
        if self.dim == 1 { 1 } else { 1 + self.dim().div_ceil(2) }
    }

    /// Bytes per slot.
    #[inline]
    pub fn bytes(self) -> usize {
        self.words() * 8
    }

    /// Bytes per slot beyond the values themselves.
    pub fn overhead_bytes(self) -> usize {
        self.bytes() - 4 * self.dim()
    }

    #[inline]
    fn check(self, version: Version, values: &[u8]) -> u32 {
        crc32c::crc32c_append(crc32c::crc32c(&version.to_le_bytes()), values) ^ self.zero_check
    }
}

fn raw_check_of_zeros(dim: usize) -> u32 {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut crc = crc32c::crc32c(&0u32.to_le_bytes());
    let mut left = dim * 4;
    while left > 0 {
        let n = left.min(ZEROS.len());
        crc = crc32c::crc32c_append(crc, &ZEROS[..n]);
        left -= n;
    }
    crc
}

/// **The** validation of a slot copy. `image` is `layout.words()` words copied
/// by any means (each word read atomically, in any order); on success the
/// values are written to `values` (`layout.dim()` long) and the version is
/// returned.
#[inline]
pub fn validate(layout: SlotLayout, image: &[u64], values: &mut [f32]) -> Result<Version, Torn> {
    debug_assert_eq!(image.len(), layout.words());
    debug_assert_eq!(values.len(), layout.dim());
    let header = image[0];
    if layout.dim == 1 {
        // One aligned word, read atomically: always a published state.
        values[0] = f32::from_bits((header >> 32) as u32);
        return Ok(header as u32);
    }
    let version = header as u32;
    if version & 1 == 1 {
        return Err(Torn);
    }
    let stored: &[f32] = &bytemuck::cast_slice(&image[1..])[..layout.dim()];
    if layout.check(version, bytemuck::cast_slice(stored)) != (header >> 32) as u32 {
        return Err(Torn);
    }
    values.copy_from_slice(stored);
    Ok(version)
}

/// Validates `values.len() / dim` consecutive slot images, the shape one
/// contiguous one-sided read returns. Values and versions of valid slots are
/// written out; the indices of torn slots are appended to `torn` so that the
/// caller reads just those again.
pub fn validate_run(
    layout: SlotLayout,
    image: &[u64],
    values: &mut [f32],
    mut versions: Option<&mut [Version]>,
    torn: &mut Vec<usize>,
) {
    let (w, d) = (layout.words(), layout.dim());
    debug_assert_eq!(image.len() / w, values.len() / d);
    for (i, (img, out)) in image.chunks_exact(w).zip(values.chunks_exact_mut(d)).enumerate() {
        match validate(layout, img, out) {
            Ok(v) => {
                if let Some(vs) = versions.as_deref_mut() {
                    vs[i] = v;
                }
            }
            Err(Torn) => torn.push(i),
        }
    }
}

/// Reads `values.len() / dim` consecutive slots straight from memory that
/// others may be writing (a local or shared-memory mapping): each slot is
/// copied word by word into a small image and checked with [`validate`], so
/// the rule is the same as for copies that came over RDMA. Torn slots are
/// appended to `torn` for the caller to read again.
#[inline]
pub fn read_run(layout: SlotLayout, src: &[AtomicU64], values: &mut [f32], torn: &mut Vec<usize>) {
    let (w, d) = (layout.words(), layout.dim());
    if layout.dim == 1 {
        // One word per slot: the copy is the atomic load itself.
        for (i, (s, v)) in src.iter().zip(values.iter_mut()).enumerate() {
            let img = [s.load(Ordering::Relaxed)];
            if validate(layout, &img, std::slice::from_mut(v)).is_err() {
                torn.push(i);
            }
        }
        return;
    }
    let mut img = vec![0u64; w];
    for (i, (s, v)) in src.chunks_exact(w).zip(values.chunks_exact_mut(d)).enumerate() {
        copy_words(s, &mut img);
        if validate(layout, &img, v).is_err() {
            torn.push(i);
        }
    }
}

/// Copies words out of memory that others may be writing, each word with one
/// atomic load and nothing more promised: the same guarantee an RDMA READ
/// gives. Pair with [`validate`].
#[inline]
pub fn copy_words(src: &[AtomicU64], dst: &mut [u64]) {
    debug_assert_eq!(src.len(), dst.len());
    for (d, s) in dst.iter_mut().zip(src) {
        // Relaxed: validation does not rely on ordering between words.
        *d = s.load(Ordering::Relaxed);
    }
}

/// Owner-only: the slot's current version and values. No validation is needed
/// because the calling thread is the slot's only writer.
#[inline]
pub(crate) fn load(layout: SlotLayout, slot: &[AtomicU64], values: &mut [f32]) -> Version {
    // Relaxed everywhere: a thread always observes its own latest stores.
    let header = slot[0].load(Ordering::Relaxed);
    if layout.dim == 1 {
        values[0] = f32::from_bits((header >> 32) as u32);
        return header as u32;
    }
    let mut pairs = values.chunks_mut(2);
    for (word, pair) in slot[1..].iter().zip(&mut pairs) {
        let w = word.load(Ordering::Relaxed);
        pair[0] = f32::from_bits(w as u32);
        if let Some(hi) = pair.get_mut(1) {
            *hi = f32::from_bits((w >> 32) as u32);
        }
    }
    header as u32
}

/// Owner-only: the slot's current version.
#[inline]
pub(crate) fn version(slot: &[AtomicU64]) -> Version {
    slot[0].load(Ordering::Relaxed) as u32
}

/// Owner-only, `dim == 1`: replaces the value `v` of a scalar slot by `f(v)`
/// and bumps its version, with one load and one store of its word. The hot
/// loop of dense scalar pushes.
#[inline(always)]
pub(crate) fn update_scalar(word: &AtomicU64, f: impl FnOnce(f32) -> f32) {
    let old = word.load(Ordering::Relaxed);
    let v = f(f32::from_bits((old >> 32) as u32));
    // Release, as in `publish`.
    word.store(u64::from(v.to_bits()) << 32 | u64::from((old as u32).wrapping_add(2)), Ordering::Release);
}

/// Owner-only, `dim == 1`: the value of a scalar slot.
#[inline(always)]
pub(crate) fn load_scalar(word: &AtomicU64) -> f32 {
    f32::from_bits((word.load(Ordering::Relaxed) >> 32) as u32)
}

/// Owner-only: publishes `values` as the slot's next state (version + 2) and
/// returns the new version.
#[inline]
pub(crate) fn store(layout: SlotLayout, slot: &[AtomicU64], values: &[f32]) -> Version {
    debug_assert_eq!(values.len(), layout.dim());
    let old = slot[0].load(Ordering::Relaxed) as u32;
    let next = old.wrapping_add(2);
    publish(layout, slot, old, next, values);
    next
}

/// Owner-only: publishes `values` at exactly `version` (a copy of another
/// shard's slot, kept at the same version so that version-filtered pulls
/// stay right across a failover).
pub(crate) fn store_at(layout: SlotLayout, slot: &[AtomicU64], values: &[f32], version: Version) {
    debug_assert_eq!(values.len(), layout.dim());
    let old = slot[0].load(Ordering::Relaxed) as u32;
    publish(layout, slot, old, version & !1, values);
}

/// Owner-only, before the slot has ever been written: sets its initial values
/// at version 0.
pub(crate) fn init(layout: SlotLayout, slot: &[AtomicU64], values: &[f32]) {
    let old = slot[0].load(Ordering::Relaxed) as u32;
    publish(layout, slot, old, 0, values);
}

#[inline]
fn publish(layout: SlotLayout, slot: &[AtomicU64], old: Version, next: Version, values: &[f32]) {
    if layout.dim == 1 {
        // Version and value in one word, one atomic store: nothing to order
        // within the slot. Release so that a reader that Acquire-loads this
        // word also sees everything the owner wrote before (the shard's
        // progress protocol relies on this).
        slot[0].store(u64::from(values[0].to_bits()) << 32 | u64::from(next), Ordering::Release);
        return;
    }
    // 1. Mark "being written" with an odd version.
    slot[0].store(u64::from(old | 1), Ordering::Relaxed);
    // A reader that sees any of the value stores below and then issues an
    // Acquire fence also sees the odd header (or a later one): the seqlock
    // writer's fence, as in crossbeam's SeqLock::write.
    fence(Ordering::Release);
    // 2. The values, two per word; Relaxed because the header publishes them.
    let mut pairs = values.chunks(2);
    for (word, pair) in slot[1..].iter().zip(&mut pairs) {
        let hi = pair.get(1).map_or(0, |v| v.to_bits());
        word.store(u64::from(pair[0].to_bits()) | u64::from(hi) << 32, Ordering::Relaxed);
    }
    // 3. Publish: even version and the check over exactly those values. Release
    //    orders the value stores before it for Acquire readers.
    let check = layout.check(next, bytemuck::cast_slice(values));
    slot[0].store(u64::from(check) << 32 | u64::from(next), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_mem(layout: SlotLayout) -> Vec<AtomicU64> {
        (0..layout.words()).map(|_| AtomicU64::new(0)).collect()
    }

    fn image(slot: &[AtomicU64]) -> Vec<u64> {
        let mut img = vec![0; slot.len()];
        copy_words(slot, &mut img);
        img
    }

    #[test]
    fn layout_sizes_meet_the_space_bounds() {
        let l1 = SlotLayout::new(1).unwrap();
        assert_eq!((l1.bytes(), l1.overhead_bytes()), (8, 4));
        let l16 = SlotLayout::new(16).unwrap();
        assert_eq!((l16.bytes(), l16.overhead_bytes()), (72, 8));
        let l256 = SlotLayout::new(256).unwrap();
        assert_eq!((l256.bytes(), l256.overhead_bytes()), (1032, 8));
        let l3 = SlotLayout::new(3).unwrap();
        assert_eq!(l3.bytes(), 24);
        assert!(SlotLayout::new(0).is_none());
        assert!(SlotLayout::new(MAX_DIM + 1).is_none());
    }

    #[test]
    fn a_zeroed_slot_is_valid_at_version_zero() {
        for dim in [1, 2, 3, 16, 1000] {
            let l = SlotLayout::new(dim).unwrap();
            let mut out = vec![1.0; dim as usize];
            assert_eq!(validate(l, &vec![0; l.words()], &mut out), Ok(0));
            assert!(out.iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn store_then_validate_round_trips_and_bumps_version_by_two() {
        for dim in [1u32, 2, 5, 16, 257] {
            let l = SlotLayout::new(dim).unwrap();
            let slot = slot_mem(l);
            let vals: Vec<f32> = (0..dim).map(|i| i as f32 * 0.5 - 3.0).collect();
            assert_eq!(store(l, &slot, &vals), 2);
            assert_eq!(store(l, &slot, &vals), 4);
            let mut out = vec![0.0; dim as usize];
            assert_eq!(validate(l, &image(&slot), &mut out), Ok(4));
            assert_eq!(out, vals);
            let mut own = vec![0.0; dim as usize];
            assert_eq!(load(l, &slot, &mut own), 4);
            assert_eq!(own, vals);
        }
    }

    #[test]
    fn init_sets_version_zero() {
        let l = SlotLayout::new(4).unwrap();
        let slot = slot_mem(l);
        init(l, &slot, &[1.0, 2.0, 3.0, 4.0]);
        let mut out = [0.0; 4];
        assert_eq!(validate(l, &image(&slot), &mut out), Ok(0));
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn an_odd_version_is_rejected() {
        let l = SlotLayout::new(4).unwrap();
        let slot = slot_mem(l);
        store(l, &slot, &[1.0; 4]);
        let mut img = image(&slot);
        img[0] |= 1;
        assert_eq!(validate(l, &img, &mut [0.0; 4]), Err(Torn));
    }

    /// Every way of mixing the words of two consecutive states (each word
    /// taken from one or the other, as an unordered one-sided read may) is
    /// rejected unless the mix equals one of the states.
    #[test]
    fn every_torn_mix_of_two_states_is_rejected() {
        let l = SlotLayout::new(8).unwrap(); // 5 words: 32 mixes
        let slot = slot_mem(l);
        store(l, &slot, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let a = image(&slot);
        store(l, &slot, &[1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]);
        let b = image(&slot);
        for mask in 0u32..(1 << l.words()) {
            let mix: Vec<u64> = (0..l.words()).map(|i| if mask >> i & 1 == 1 { b[i] } else { a[i] }).collect();
            let r = validate(l, &mix, &mut [0.0; 8]);
            if mix == a || mix == b {
                assert!(r.is_ok(), "mask {mask:b}");
            } else {
                assert_eq!(r, Err(Torn), "mask {mask:b} accepted a torn copy");
            }
        }
    }

    #[test]
    fn a_single_flipped_value_bit_is_rejected() {
        let l = SlotLayout::new(16).unwrap();
        let slot = slot_mem(l);
        store(l, &slot, &[0.25; 16]);
        let img = image(&slot);
        for word in 1..l.words() {
            for bit in 0..64 {
                if word == l.words() - 1 && l.dim() % 2 == 1 && bit >= 32 {
                    continue; // padding is not covered
                }
                let mut bad = img.clone();
                bad[word] ^= 1 << bit;
                assert_eq!(validate(l, &bad, &mut [0.0; 16]), Err(Torn));
            }
        }
    }

    #[test]
    fn validate_run_reports_only_the_torn_slots() {
        let l = SlotLayout::new(2).unwrap();
        let mem: Vec<AtomicU64> = (0..3 * l.words()).map(|_| AtomicU64::new(0)).collect();
        for i in 0..3 {
            store(l, &mem[i * l.words()..(i + 1) * l.words()], &[i as f32, -(i as f32)]);
        }
        let mut img = image(&mem);
        img[l.words() + 1] ^= 1 << 40; // tear slot 1
        let mut vals = [0.0; 6];
        let mut vers = [9; 3];
        let mut torn = Vec::new();
        validate_run(l, &img, &mut vals, Some(&mut vers), &mut torn);
        assert_eq!(torn, vec![1]);
        assert_eq!((vals[4], vals[5]), (2.0, -2.0));
        assert_eq!((vers[0], vers[2]), (2, 2));
    }
}
