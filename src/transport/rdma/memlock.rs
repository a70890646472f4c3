//! Locked-memory accounting. Registering memory with an RDMA device pins its
//! pages, and the kernel counts them against `RLIMIT_MEMLOCK` unless the
//! process has `CAP_IPC_LOCK` (root usually has it). Ordinary users often
//! get 8 MiB, far less than a server's shards: registration then fails with
//! a bare ENOMEM. So every registration first reserves its pages here, and a
//! reservation that would pass the limit is refused with an explanation of
//! what to change, before the device is asked.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

const PAGE: u64 = 4096;

/// Bytes of pages this process has registered (or is registering).
static LOCKED: AtomicU64 = AtomicU64::new(0);

/// Pages held for one registration; released on drop.
#[derive(Debug)]
pub struct Reservation(u64);

impl Drop for Reservation {
    fn drop(&mut self) {
        LOCKED.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// Bytes of whole pages covering `addr..addr+len`.
fn pages(addr: u64, len: u64) -> u64 {
    let start = addr / PAGE * PAGE;
    let end = (addr + len).div_ceil(PAGE) * PAGE;
    end - start
}

/// The soft RLIMIT_MEMLOCK, `None` when unlimited.
pub fn limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit structure.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}

/// Whether the process may lock memory beyond the limit (`CAP_IPC_LOCK` in
/// its effective capabilities).
pub fn exempt() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps >> CAP_IPC_LOCK & 1 == 1)
}

fn human(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Why registering `bytes` more may fail, for error messages.
pub fn explain(bytes: u64) -> String {
    let held = LOCKED.load(Ordering::Relaxed);
    match limit() {
        Some(l) if !exempt() => format!(
            "RDMA registration pins memory: this process has {} registered, {} more would pass its locked-memory \
             limit (RLIMIT_MEMLOCK) of {}; raise it (`ulimit -l unlimited`, `LimitMEMLOCK=infinity` for a systemd \
             unit, `memlock` in /etc/security/limits.conf, `--ulimit memlock=-1` for a container) or run with \
             CAP_IPC_LOCK, or make the tables and PSERVER_RDMA_RING_BYTES smaller",
            human(held),
            human(bytes),
            human(l)
        ),
        _ => format!(
            "the device could not pin {} more (this process has {} registered; the locked-memory limit does not \
             apply to it)",
            human(bytes),
            human(held)
        ),
    }
}

/// Reserves the pages of `addr..addr+len`, or explains why the registration
/// would fail.
pub fn reserve(addr: u64, len: u64) -> Result<Reservation> {
    let need = pages(addr, len);
    let before = LOCKED.fetch_add(need, Ordering::Relaxed);
    let r = Reservation(need);
    if let Some(l) = limit()
        && before + need > l
        && !exempt()
    {
        drop(r);
        return Err(Error::Config(format!("cannot register {} of memory for RDMA: {}", human(len), explain(need))));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_partial_pages_at_both_ends() {
        assert_eq!(pages(0, 1), PAGE);
        assert_eq!(pages(4095, 2), 2 * PAGE);
        assert_eq!(pages(8192, 8192), 2 * PAGE);
    }

    #[test]
    fn a_reservation_past_the_limit_is_refused_with_an_explanation() {
        match limit() {
            Some(l) if !exempt() => {
                let e = reserve(0, l + PAGE).unwrap_err().to_string();
                assert!(e.contains("RLIMIT_MEMLOCK") && e.contains("ulimit -l"), "{e}");
            }
            _ => {
                // Unlimited or exempt (root): large reservations pass.
                drop(reserve(0, 1 << 40).unwrap());
            }
        }
    }
}
