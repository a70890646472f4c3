//! The RDMA API of a build without the `rdma` feature: the same types, none
//! of which can be made, so every use reports that this build has no RDMA.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::ConnInfo;
use crate::error::{Error, Result};
use crate::store::Region;
use crate::transport::frame::{Frame, Limits};
use crate::transport::{Access, RegionDesc};

fn unavailable() -> Error {
    Error::Config("this pserver was built without RDMA support (cargo feature `rdma`, which needs libibverbs)".into())
}

/// No device: [`device`] always fails.
#[derive(Debug)]
pub struct Rdma {
    never: Infallible,
}

pub fn device() -> Result<Arc<Rdma>> {
    Err(unavailable())
}

/// What every link of this process did (nothing, in this build).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes_read: u64,
    pub frames: u64,
    pub links: u64,
}

pub fn totals() -> Totals {
    Totals::default()
}

impl Rdma {
    pub fn describe(&self) -> String {
        match self.never {}
    }
    pub fn name(&self) -> &str {
        match self.never {}
    }
    pub fn gid_index(&self) -> u8 {
        match self.never {}
    }
    pub fn word_atomic(&self) -> bool {
        match self.never {}
    }
    pub fn register(&self, _region: Arc<Region>, _access: Access) -> Result<Registration> {
        match self.never {}
    }
}

pub struct Registration {
    never: Infallible,
}

impl Registration {
    pub fn desc(&self) -> RegionDesc {
        match self.never {}
    }
}

#[derive(Debug, Default)]
pub struct LinkStats {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub frames: AtomicU64,
    pub bytes_written: AtomicU64,
}

pub struct Link {
    never: Infallible,
}

impl Link {
    pub fn new(rdma: &Arc<Rdma>, _peer: &str) -> Result<(Link, ConnInfo)> {
        match rdma.never {}
    }
    pub fn establish(&self, _remote: &ConnInfo, _ring: RegionDesc, _ring_ctl: RegionDesc) -> Result<()> {
        match self.never {}
    }
    pub fn stats(&self) -> &LinkStats {
        match self.never {}
    }
    pub fn word_atomic(&self) -> bool {
        match self.never {}
    }
    pub fn failure(&self) -> Option<Error> {
        match self.never {}
    }
    pub fn max_read_words(&self) -> usize {
        match self.never {}
    }
    pub fn read<R>(
        &self,
        _progress: Option<(&RegionDesc, usize)>,
        _slots: &RegionDesc,
        _at: usize,
        _words: usize,
        _f: impl FnOnce(u64, &[AtomicU64]) -> R,
    ) -> Result<R> {
        match self.never {}
    }
    pub fn send(&self, _frame: &Frame) -> Result<bool> {
        match self.never {}
    }
    #[doc(hidden)]
    pub fn unchecked_transfer_for_test(&self, _write: bool, _addr: u64, _rkey: u32, _buf: &mut [u64]) -> Result<()> {
        match self.never {}
    }
}

pub type Deliver = Box<dyn Fn(u64, Result<Frame>) + Send + Sync>;

pub struct Accepted {
    pub info: ConnInfo,
    pub ring: RegionDesc,
    pub ring_ctl: RegionDesc,
}

pub struct Inbox {
    never: Infallible,
}

impl Inbox {
    pub fn start(rdma: Arc<Rdma>, _limits: Limits, _deliver: Deliver) -> Result<Inbox> {
        match rdma.never {}
    }
    pub fn rdma(&self) -> &Arc<Rdma> {
        match self.never {}
    }
    pub fn accept(&self, _token: u64, _remote: &ConnInfo, _ring_bytes: usize) -> Result<Accepted> {
        match self.never {}
    }
    pub fn close(&self, _token: u64) {
        match self.never {}
    }
    pub fn links(&self) -> usize {
        match self.never {}
    }
}
