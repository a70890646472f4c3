//! The transports embedded-job tests run over: in process, TCP, and TCP
//! plus shared memory (one-sided pulls) where /dev/shm is usable.

use std::sync::Arc;

use pserver::JobConfig;
use pserver::transport::Transport;
use pserver::transport::inproc::Inproc;
use pserver::transport::tcp::{IoMode, Tcp};
use pserver::worker::ShmMode;

/// A transport, and whether workers and servers share memory over it.
#[derive(Clone)]
pub struct Via(pub Arc<dyn Transport>, pub ShmMode);

impl Via {
    /// An embedded job over this transport.
    pub fn job(&self) -> JobConfig {
        let mut c = JobConfig::default().transport(self.0.clone());
        c.worker.shm = self.1;
        c
    }
}

/// inproc, tcp and (where /dev/shm is usable) shm, by name.
pub fn transports() -> Vec<(&'static str, Via)> {
    let tcp = || Arc::new(Tcp::new(IoMode::Auto, Default::default()));
    let mut v = vec![("inproc", Via(Arc::new(Inproc::new()), ShmMode::Off)), ("tcp", Via(tcp(), ShmMode::Off))];
    if pserver::transport::shm::available() {
        v.push(("shm", Via(tcp(), ShmMode::Require)));
    } else {
        eprintln!("SKIPPED over shm: no usable shared-memory directory");
    }
    v
}
