//! The in-process transport: endpoints are objects in one address space, a
//! connection is a pair of table entries, and sending a frame calls the
//! receiver's handler on the sender's thread with the frame moved, not copied
//! (segments are reference-counted `Bytes`). Remote memory is a registry of
//! regions read and written word by word with atomics, exactly the guarantee
//! a one-sided transport gives.
//!
//! Each [`Inproc`] value is its own network: endpoints of different values
//! cannot see each other, so concurrent tests and jobs do not collide.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex, RwLock};

use super::frame::{Frame, Limits, check_outgoing};
use super::{Access, Completion, Handler, LocalBuf, Messenger, PeerId, RegionDesc, RemoteMemory, Transport};
use crate::error::{Error, Result};
use crate::store::Region;
use crate::store::slot::copy_words;

/// An in-process network.
#[derive(Clone, Default)]
pub struct Inproc {
    net: Arc<Net>,
}

/// A registered region: the memory, the rights granted, and the endpoint
/// whose doorbells it rings.
type Registered = (Arc<Region>, Access, Weak<MemoryInner>);

#[derive(Default)]
struct Net {
    endpoints: Mutex<HashMap<String, Weak<Endpoint>>>,
    next_auto: AtomicU64,
    regions: RwLock<HashMap<u64, Registered>>,
    next_region: AtomicU64,
    limits: Limits,
}

impl Inproc {
    pub fn new() -> Self {
        Self::default()
    }

    /// A network whose frames are held to `limits` (as a real wire would).
    pub fn with_limits(limits: Limits) -> Self {
        Inproc { net: Arc::new(Net { limits, ..Net::default() }) }
    }
}

impl Transport for Inproc {
    fn name(&self) -> &'static str {
        "inproc"
    }

    fn bind(&self, addr: &str, handler: Arc<dyn Handler>) -> Result<Arc<dyn Messenger>> {
        let mut eps = self.net.endpoints.lock();
        let addr = if addr.is_empty() {
            format!("inproc-{}", self.net.next_auto.fetch_add(1, Ordering::Relaxed))
        } else {
            addr.to_string()
        };
        if eps.get(&addr).and_then(Weak::upgrade).is_some() {
            return Err(Error::Config(format!("inproc address {addr} is already bound")));
        }
        let ep = Arc::new_cyclic(|me| Endpoint {
            addr: addr.clone(),
            me: me.clone(),
            net: self.net.clone(),
            handler: RwLock::new(Some(handler)),
            links: RwLock::new(HashMap::new()),
            next_peer: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            memory: Arc::new(MemoryInner::default()),
        });
        eps.insert(addr, Arc::downgrade(&ep));
        Ok(ep)
    }
}

struct Link {
    remote: Weak<Endpoint>,
    remote_peer: PeerId,
}

struct Endpoint {
    addr: String,
    me: Weak<Endpoint>,
    net: Arc<Net>,
    handler: RwLock<Option<Arc<dyn Handler>>>,
    links: RwLock<HashMap<PeerId, Link>>,
    next_peer: AtomicU64,
    closed: AtomicBool,
    memory: Arc<MemoryInner>,
}

impl Endpoint {
    fn alloc_peer(&self) -> PeerId {
        PeerId(self.next_peer.fetch_add(1, Ordering::Relaxed))
    }

    fn as_messenger(&self) -> Option<Arc<dyn Messenger>> {
        self.me.upgrade().map(|e| e as Arc<dyn Messenger>)
    }

    /// The other side dropped the link `peer`.
    fn drop_link(&self, peer: PeerId) {
        if self.links.write().remove(&peer).is_none() {
            return;
        }
        let handler = self.handler.read().clone();
        if let (Some(h), Some(me)) = (handler, self.as_messenger()) {
            h.on_disconnect(&me, peer);
        }
    }
}

impl Messenger for Endpoint {
    fn local_addr(&self) -> String {
        self.addr.clone()
    }

    fn connect(&self, addr: &str) -> Result<PeerId> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let remote = self
            .net
            .endpoints
            .lock()
            .get(addr)
            .and_then(Weak::upgrade)
            .filter(|r| !r.closed.load(Ordering::Acquire))
            .ok_or_else(|| Error::Unreachable { addr: addr.into(), detail: "no inproc endpoint bound there".into() })?;
        let (mine, theirs) = (self.alloc_peer(), remote.alloc_peer());
        remote.links.write().insert(theirs, Link { remote: self.me.clone(), remote_peer: mine });
        self.links.write().insert(mine, Link { remote: Arc::downgrade(&remote), remote_peer: theirs });
        Ok(mine)
    }

    fn send(&self, peer: PeerId, frame: Frame) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        check_outgoing(&frame, &self.net.limits).map_err(|e| Error::LimitExceeded(e.to_string()))?;
        let (remote, rp) = {
            let links = self.links.read();
            let link = links.get(&peer).ok_or_else(|| Error::Disconnected(self.peer_addr(peer)))?;
            (link.remote.upgrade(), link.remote_peer)
        };
        let remote = remote
            .filter(|r| !r.closed.load(Ordering::Acquire))
            .ok_or_else(|| Error::Disconnected(self.peer_addr(peer)))?;
        let handler = remote.handler.read().clone().ok_or_else(|| Error::Disconnected(remote.addr.clone()))?;
        let net: Arc<dyn Messenger> = remote;
        handler.on_frame(&net, rp, frame);
        Ok(())
    }

    fn peer_addr(&self, peer: PeerId) -> String {
        self.links
            .read()
            .get(&peer)
            .and_then(|l| l.remote.upgrade())
            .map_or_else(|| format!("{peer} of {}", self.addr), |r| r.addr.clone())
    }

    fn disconnect(&self, peer: PeerId) {
        let link = self.links.write().remove(&peer);
        if let Some(link) = link
            && let Some(r) = link.remote.upgrade()
        {
            r.drop_link(link.remote_peer);
        }
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut eps = self.net.endpoints.lock();
            if eps.get(&self.addr).is_some_and(|w| w.as_ptr() == self.me.as_ptr()) {
                eps.remove(&self.addr);
            }
        }
        let links: Vec<Link> = self.links.write().drain().map(|(_, l)| l).collect();
        for l in links {
            if let Some(r) = l.remote.upgrade() {
                r.drop_link(l.remote_peer);
            }
        }
        // Dropping the handler breaks the handler -> messenger reference cycle.
        self.handler.write().take();
        self.net.regions.write().retain(|_, (_, _, owner)| !std::ptr::eq(owner.as_ptr(), Arc::as_ptr(&self.memory)));
    }

    fn remote_memory(&self) -> Option<Arc<dyn RemoteMemory>> {
        Some(Arc::new(InprocMemory { net: self.net.clone(), inner: self.memory.clone() }))
    }
}

#[derive(Default)]
struct MemoryInner {
    done: Mutex<VecDeque<Completion>>,
    ready: Condvar,
    doorbells: Mutex<Vec<(u64, u32)>>,
}

/// One endpoint's view of the network's registered memory.
struct InprocMemory {
    net: Arc<Net>,
    inner: Arc<MemoryInner>,
}

impl InprocMemory {
    fn lookup(&self, desc: &RegionDesc, want: Access, offset: u64, words: usize) -> Result<(Arc<Region>, usize)> {
        let regions = self.net.regions.read();
        let (region, access, owner) = regions.get(&desc.id).ok_or_else(|| Error::Remote {
            peer: format!("region {}", desc.id),
            message: "not registered (deregistered or never offered)".into(),
        })?;
        if !access.allows(want) {
            return Err(Error::Remote {
                peer: format!("region {}", desc.id),
                message: format!("access {want:?} not granted (region allows {access:?})"),
            });
        }
        let start =
            usize::try_from(offset).ok().filter(|o| o.checked_add(words).is_some_and(|e| e <= region.words().len()));
        let start = start.ok_or_else(|| Error::Remote {
            peer: format!("region {}", desc.id),
            message: format!("words {offset}..+{words} are outside its {} words", region.words().len()),
        })?;
        let _ = owner;
        Ok((region.clone(), start))
    }

    fn complete(&self, c: Completion) {
        self.inner.done.lock().push_back(c);
        self.inner.ready.notify_all();
    }
}

impl RemoteMemory for InprocMemory {
    fn register(&self, region: Arc<Region>, access: Access) -> Result<RegionDesc> {
        let id = self.net.next_region.fetch_add(1, Ordering::Relaxed) + 1;
        let len = region.len_bytes() as u64;
        self.net.regions.write().insert(id, (region, access, Arc::downgrade(&self.inner)));
        Ok(RegionDesc { id, len, rkey: 0, access: access.bits() })
    }

    fn deregister(&self, desc: &RegionDesc) {
        self.net.regions.write().remove(&desc.id);
    }

    fn alloc(&self, words: usize) -> Result<LocalBuf> {
        Ok(LocalBuf { words: vec![0; words] })
    }

    fn post_read(&self, region: &RegionDesc, offset: u64, mut buf: LocalBuf, wr_id: u64) -> Result<()> {
        let result = self.lookup(region, Access::READ, offset, buf.len()).map(|(r, start)| {
            copy_words(&r.words()[start..start + buf.len()], &mut buf);
        });
        self.complete(Completion { wr_id, buf, result });
        Ok(())
    }

    fn post_write(&self, region: &RegionDesc, offset: u64, buf: LocalBuf, imm: Option<u32>, wr_id: u64) -> Result<()> {
        let result = self.lookup(region, Access::WRITE, offset, buf.len()).map(|(r, start)| {
            for (d, s) in r.words()[start..start + buf.len()].iter().zip(buf.iter()) {
                d.store(*s, Ordering::Relaxed);
            }
            if let Some(imm) = imm {
                // Release: the owner that sees the doorbell (under the mutex)
                // also sees the words stored above.
                std::sync::atomic::fence(Ordering::Release);
                let owner = self.net.regions.read().get(&region.id).and_then(|(_, _, o)| o.upgrade());
                if let Some(o) = owner {
                    o.doorbells.lock().push((region.id, imm));
                }
            }
        });
        self.complete(Completion { wr_id, buf, result });
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Completion>, max: usize, block: bool) -> Result<usize> {
        let mut done = self.inner.done.lock();
        // Inproc operations complete when posted, so a blocking poll never
        // has to wait for a transfer; it returns what is there.
        let _ = block;
        let n = done.len().min(max);
        out.extend(done.drain(..n));
        Ok(n)
    }

    fn take_doorbells(&self, out: &mut Vec<(u64, u32)>) {
        out.append(&mut self.inner.doorbells.lock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[derive(Default)]
    struct Echo {
        got: Mutex<Vec<(PeerId, u64)>>,
        gone: Mutex<Vec<PeerId>>,
    }

    impl Handler for Echo {
        fn on_frame(&self, net: &Arc<dyn Messenger>, from: PeerId, frame: Frame) {
            self.got.lock().push((from, frame.id));
            if frame.kind == 1 {
                net.send(from, Frame::new(2, frame.id, Bytes::new())).unwrap();
            }
        }
        fn on_disconnect(&self, _: &Arc<dyn Messenger>, peer: PeerId) {
            self.gone.lock().push(peer);
        }
    }

    #[test]
    fn frames_arrive_in_order_and_replies_route_back() {
        let t = Inproc::new();
        let (hs, hc) = (Arc::new(Echo::default()), Arc::new(Echo::default()));
        let server = t.bind("s", hs.clone()).unwrap();
        let client = t.bind("", hc.clone()).unwrap();
        let p = client.connect("s").unwrap();
        for id in 0..5 {
            client.send(p, Frame::new(1, id, Bytes::new())).unwrap();
        }
        assert_eq!(hs.got.lock().iter().map(|g| g.1).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert_eq!(hc.got.lock().len(), 5);
        assert!(hc.got.lock().iter().all(|(from, _)| *from == p));
        assert_eq!(client.peer_addr(p), "s");
        server.shutdown();
        assert!(matches!(client.send(p, Frame::new(1, 9, Bytes::new())), Err(Error::Disconnected(_))));
        assert_eq!(hc.gone.lock().as_slice(), &[p]);
        assert!(client.connect("s").is_err());
    }

    #[test]
    fn separate_networks_do_not_see_each_other_and_addresses_are_unique() {
        let (a, b) = (Inproc::new(), Inproc::new());
        let _s = a.bind("x", Arc::new(Echo::default())).unwrap();
        assert!(a.bind("x", Arc::new(Echo::default())).is_err());
        let c = b.bind("", Arc::new(Echo::default())).unwrap();
        assert!(matches!(c.connect("x"), Err(Error::Unreachable { .. })));
    }

    #[test]
    fn oversized_frames_are_refused_by_the_sender() {
        let t = Inproc::with_limits(Limits { max_frame: 128, ..Limits::default() });
        let _s = t.bind("s", Arc::new(Echo::default())).unwrap();
        let c = t.bind("", Arc::new(Echo::default())).unwrap();
        let p = c.connect("s").unwrap();
        let big = Frame::new(0, 0, Bytes::new()).with_segment(Bytes::from(vec![0u8; 200]));
        assert!(matches!(c.send(p, big), Err(Error::LimitExceeded(_))));
    }

    #[test]
    fn one_sided_reads_and_writes_respect_access_and_bounds() {
        let t = Inproc::new();
        let s = t.bind("s", Arc::new(Echo::default())).unwrap();
        let c = t.bind("", Arc::new(Echo::default())).unwrap();
        let (sm, cm) = (s.remote_memory().unwrap(), c.remote_memory().unwrap());
        let region = Arc::new(Region::anon(64).unwrap());
        region.words()[3].store(77, Ordering::Relaxed);
        let ro = sm.register(region.clone(), Access::READ).unwrap();
        let ring = Arc::new(Region::anon(64).unwrap());
        let rw = sm.register(ring.clone(), Access::WRITE).unwrap();

        let buf = cm.read(&ro, 2, cm.alloc(2).unwrap()).unwrap();
        assert_eq!(&buf[..], &[0, 77]);
        assert!(cm.read(&ro, 7, cm.alloc(2).unwrap()).is_err(), "out of bounds");

        let mut w = cm.alloc(1).unwrap();
        w[0] = 5;
        cm.post_write(&ro, 0, w, None, 1).unwrap();
        let mut done = Vec::new();
        cm.poll(&mut done, 8, true).unwrap();
        assert!(done[0].result.is_err(), "a read-only region must refuse writes");
        assert_eq!(region.words()[0].load(Ordering::Relaxed), 0);

        let mut w = cm.alloc(1).unwrap();
        w[0] = 5;
        cm.post_write(&rw, 1, w, Some(42), 2).unwrap();
        done.clear();
        cm.poll(&mut done, 8, true).unwrap();
        assert!(done[0].result.is_ok());
        assert_eq!(ring.words()[1].load(Ordering::Relaxed), 5);
        let mut bells = Vec::new();
        sm.take_doorbells(&mut bells);
        assert_eq!(bells, vec![(rw.id, 42)]);

        sm.deregister(&ro);
        assert!(cm.read(&ro, 0, cm.alloc(1).unwrap()).is_err());
    }
}
