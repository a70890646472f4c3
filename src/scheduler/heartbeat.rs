//! Heartbeats: every node tells the scheduler it is alive at a fixed
//! interval, so that a node that hangs (not only one whose connection drops)
//! is noticed. Intervals come from `PSERVER_HEARTBEAT_MS` (default 1000) and
//! the scheduler's timeout from `PSERVER_HEARTBEAT_TIMEOUT_MS` (default
//! 30000): generous, because a loaded machine must not be mistaken for a
//! dead one.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::proto::Control;
use crate::transport::{Messenger, PeerId};

fn env_ms(name: &str, default: u64) -> Duration {
    let ms = std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok()).filter(|&v| v > 0).unwrap_or(default);
    Duration::from_millis(ms)
}

/// The interval nodes send heartbeats at.
pub fn interval() -> Duration {
    env_ms("PSERVER_HEARTBEAT_MS", 1000)
}

/// How long the scheduler waits without hearing from a node.
pub fn timeout() -> Duration {
    env_ms("PSERVER_HEARTBEAT_TIMEOUT_MS", 30_000)
}

/// A thread sending heartbeats until dropped.
pub struct Heartbeat {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(net: Arc<dyn Messenger>, scheduler: PeerId, every: Duration) -> Heartbeat {
        Heartbeat::start_reporting(net, scheduler, every, || None)
    }

    /// Heartbeats, each followed by the node's figures from `report` (for
    /// `pserver status` and metrics).
    pub fn start_reporting(
        net: Arc<dyn Messenger>,
        scheduler: PeerId,
        every: Duration,
        report: impl Fn() -> Option<crate::status::Report> + Send + 'static,
    ) -> Heartbeat {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("pserver-heartbeat".into())
            .spawn(move || {
                let (lock, cv) = &*s2;
                let mut stopped = lock.lock();
                while !*stopped {
                    if cv.wait_for(&mut stopped, every).timed_out() {
                        // Sent unlocked, so stopping never waits on a send.
                        let gone = parking_lot::MutexGuard::unlocked(&mut stopped, || {
                            if net.send(scheduler, Control::Heartbeat.to_frame(0)).is_err() {
                                return true;
                            }
                            if let Some(r) = report() {
                                let _ = net.send(scheduler, Control::Report(r).to_frame(0));
                            }
                            false
                        });
                        if gone {
                            return; // the scheduler is gone; the node notices by itself
                        }
                    }
                }
            })
            .ok();
        Heartbeat { stop, thread }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}
