//! Safe, typed wrappers over libibverbs: the only module that calls
//! `rdma-sys`. Everything above it is safe Rust.
//!
//! One type per verbs object, each owning its handle and what the handle
//! needs alive: a [`Pd`] keeps its [`Context`], a [`Mr`] keeps its `Pd` and
//! the [`Region`] it registered (so the memory cannot be unmapped while a NIC
//! may still reach it), a [`Cq`] keeps its [`CompChannel`], a [`Qp`] keeps
//! its `Pd` and `Cq`. Drop releases each handle after its dependents are
//! gone, because dependents hold `Arc`s of what they depend on.
//!
//! Thread safety: libibverbs objects may be used from several threads at
//! once (the library and providers lock internally where they must), so the
//! handle types are `Send + Sync`. What *this crate* must serialize (posting
//! work that shares a buffer, polling a completion queue whose completions
//! one caller waits for) is serialized by the callers' own locks.
//!
//! Memory ordering against the NIC: a NIC writes registered memory by DMA and
//! reads it when a posted request executes. `ibv_post_send` issues the write
//! barrier that makes CPU stores before it visible to the device, and
//! `ibv_poll_cq` the read barrier that makes data placed before a completion
//! visible to the CPU after it (both inside the provider). Both are opaque
//! calls, so the compiler cannot move loads or stores across them either.
//! Registered memory is only ever touched through `AtomicU64` views
//! ([`Region::words`]), so Rust code never holds a plain reference to bytes a
//! device writes.

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use rdma_sys as sys;

use crate::error::{Error, Result};
use crate::store::Region;

fn os_error(what: impl Into<String>) -> Error {
    Error::io(what, std::io::Error::last_os_error())
}

/// errno-style return codes (libibverbs returns the error number itself).
fn check(rc: c_int, what: impl FnOnce() -> String) -> Result<()> {
    if rc == 0 { Ok(()) } else { Err(Error::io(what(), std::io::Error::from_raw_os_error(rc.abs()))) }
}

/// The RDMA devices of this host.
pub struct DeviceList {
    list: NonNull<*mut sys::ibv_device>,
    len: usize,
}

// SAFETY: the list is an immutable array of device pointers owned by this
// value; libibverbs allows reading it and opening its devices from any thread.
unsafe impl Send for DeviceList {}

impl DeviceList {
    /// Lists the devices; an empty list (not an error) when there are none.
    pub fn get() -> Result<DeviceList> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the returned array (or NULL) is
        // owned by us until ibv_free_device_list.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        match NonNull::new(list) {
            Some(list) => Ok(DeviceList { list, len: n.max(0) as usize }),
            // No kernel support at all (ENOSYS) reads as "no devices".
            None => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOSYS) {
                    Ok(DeviceList { list: NonNull::dangling(), len: 0 })
                } else {
                    Err(Error::io("listing RDMA devices", e))
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device at `i`.
    pub fn get_device(&self, i: usize) -> Option<Device<'_>> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `i < len`, and the array holds `len` valid device pointers
        // while the list lives (which the returned borrow enforces).
        let ptr = unsafe { *self.list.as_ptr().add(i) };
        NonNull::new(ptr).map(|ptr| Device { ptr, _list: std::marker::PhantomData })
    }

    pub fn iter(&self) -> impl Iterator<Item = Device<'_>> {
        (0..self.len).filter_map(|i| self.get_device(i))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if self.len > 0 || self.list != NonNull::dangling() {
            // SAFETY: the list came from ibv_get_device_list and is freed once;
            // contexts opened from its devices stay valid (libibverbs keeps
            // device structures referenced by open contexts).
            unsafe { sys::ibv_free_device_list(self.list.as_ptr()) };
        }
    }
}

/// A device of a [`DeviceList`].
pub struct Device<'a> {
    ptr: NonNull<sys::ibv_device>,
    _list: std::marker::PhantomData<&'a DeviceList>,
}

impl Device<'_> {
    /// The kernel's name of the device, e.g. `rxe0` or `mlx5_0`.
    pub fn name(&self) -> String {
        // SAFETY: the device is valid while the list lives; the name is a
        // NUL-terminated string inside the device structure.
        let p = unsafe { sys::ibv_get_device_name(self.ptr.as_ptr()) };
        if p.is_null() {
            return String::from("?");
        }
        // SAFETY: non-null, NUL-terminated, valid for the device's lifetime.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Opens the device.
    pub fn open(&self) -> Result<Arc<Context>> {
        let name = self.name();
        // SAFETY: the device pointer is valid; the context returned (or NULL)
        // is owned by the new `Context` and closed on its drop.
        let ctx = unsafe { sys::ibv_open_device(self.ptr.as_ptr()) };
        let ctx = NonNull::new(ctx).ok_or_else(|| os_error(format!("opening RDMA device {name}")))?;
        Ok(Arc::new(Context { ptr: ctx, name }))
    }
}

/// An open device.
pub struct Context {
    ptr: NonNull<sys::ibv_context>,
    name: String,
}

// SAFETY: an ibv_context may be used from any thread (libibverbs is
// thread-safe); the pointer is owned by this value and freed once on drop.
unsafe impl Send for Context {}
// SAFETY: as above; every call through `&Context` is a thread-safe verb.
unsafe impl Sync for Context {}

/// What pserver needs to know about a device.
#[derive(Clone, Copy, Debug)]
pub struct DeviceAttr {
    pub max_qp_wr: u32,
    pub max_cqe: u32,
    pub max_mr_size: u64,
    /// Outstanding RDMA READs a QP may have as responder / as initiator.
    pub max_qp_rd_atom: u32,
    pub max_qp_init_rd_atom: u32,
    pub phys_port_cnt: u8,
}

/// What pserver needs to know about a port.
#[derive(Clone, Copy, Debug)]
pub struct PortAttr {
    pub active: bool,
    /// `ibv_mtu` enum value (1 = 256 .. 5 = 4096).
    pub active_mtu: u8,
    pub lid: u16,
    pub gid_table_len: u32,
    /// 1 = InfiniBand, 2 = Ethernet (RoCE).
    pub link_layer: u8,
    pub max_msg_size: u32,
}

impl Context {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn query_device(&self) -> Result<DeviceAttr> {
        // SAFETY: ibv_device_attr is plain C data; all-zero is a valid value.
        let mut a: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { sys::ibv_query_device(self.ptr.as_ptr(), &mut a) };
        check(rc, || format!("querying RDMA device {}", self.name))?;
        Ok(DeviceAttr {
            max_qp_wr: a.max_qp_wr.max(0) as u32,
            max_cqe: a.max_cqe.max(0) as u32,
            max_mr_size: a.max_mr_size,
            max_qp_rd_atom: a.max_qp_rd_atom.max(0) as u32,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom.max(0) as u32,
            phys_port_cnt: a.phys_port_cnt,
        })
    }

    pub fn query_port(&self, port: u8) -> Result<PortAttr> {
        // SAFETY: ibv_port_attr is plain C data; all-zero is a valid value.
        let mut a: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer of the full (new) structure,
        // which the inline wrapper passes with its size.
        let rc = unsafe { sys::___ibv_query_port(self.ptr.as_ptr(), port, &mut a) };
        check(rc, || format!("querying port {port} of RDMA device {}", self.name))?;
        Ok(PortAttr {
            active: a.state == sys::ibv_port_state::IBV_PORT_ACTIVE,
            active_mtu: a.active_mtu as u8,
            lid: a.lid,
            gid_table_len: a.gid_tbl_len.max(0) as u32,
            link_layer: a.link_layer,
            max_msg_size: a.max_msg_sz,
        })
    }

    /// GID `index` of `port` (16 bytes, network order).
    pub fn query_gid(&self, port: u8, index: u32) -> Result<[u8; 16]> {
        // SAFETY: ibv_gid is a 16-byte union of plain data.
        let mut gid: sys::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-pointer.
        let rc = unsafe { sys::ibv_query_gid(self.ptr.as_ptr(), port, index as c_int, &mut gid) };
        if rc != 0 {
            return Err(os_error(format!("reading GID {index} of port {port} of RDMA device {}", self.name)));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        Ok(unsafe { gid.raw })
    }

    /// The protection domain of this process (callers keep one; see
    /// `super::Rdma`).
    pub fn alloc_pd(self: &Arc<Self>) -> Result<Arc<Pd>> {
        // SAFETY: valid context; the PD is owned by the new value.
        let pd = unsafe { sys::ibv_alloc_pd(self.ptr.as_ptr()) };
        let pd =
            NonNull::new(pd).ok_or_else(|| os_error(format!("allocating a protection domain on {}", self.name)))?;
        Ok(Arc::new(Pd { ptr: pd, ctx: self.clone() }))
    }

    /// A completion channel: a file descriptor that becomes readable when
    /// a CQ bound to it, once armed, gets a completion.
    pub fn comp_channel(self: &Arc<Self>) -> Result<Arc<CompChannel>> {
        // SAFETY: valid context; the channel is owned by the new value.
        let ch = unsafe { sys::ibv_create_comp_channel(self.ptr.as_ptr()) };
        let ch = NonNull::new(ch).ok_or_else(|| os_error(format!("creating a completion channel on {}", self.name)))?;
        // SAFETY: `ch` is valid; its fd is an ordinary descriptor we may
        // switch to non-blocking mode (waiting goes through poll(2)).
        let fd = unsafe { (*ch.as_ptr()).fd };
        // SAFETY: fcntl on a valid descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            let e = os_error("making a completion channel non-blocking");
            // SAFETY: the channel has no CQ yet; destroyed once.
            unsafe { sys::ibv_destroy_comp_channel(ch.as_ptr()) };
            return Err(e);
        }
        Ok(Arc::new(CompChannel { ptr: ch, _ctx: self.clone() }))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every object created from this context holds an Arc of it,
        // so none is left when this runs.
        unsafe { sys::ibv_close_device(self.ptr.as_ptr()) };
    }
}

/// A protection domain: memory regions and queue pairs of one PD can reach
/// each other; nothing of another PD can.
pub struct Pd {
    ptr: NonNull<sys::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: PD verbs are thread-safe; the pointer is owned and freed once.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc of their PD, so none is left.
        unsafe { sys::ibv_dealloc_pd(self.ptr.as_ptr()) };
    }
}

/// Rights on a memory region, as the verbs know them. A typed set, so that
/// "remote write" cannot be asked for by a stray integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessFlags(u32);

impl AccessFlags {
    /// The local NIC may write the memory (destination of a READ or of an
    /// incoming WRITE).
    pub const LOCAL_WRITE: AccessFlags = AccessFlags(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// Peers may write it (requires `LOCAL_WRITE`).
    pub const REMOTE_WRITE: AccessFlags = AccessFlags(sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// Peers may read it.
    pub const REMOTE_READ: AccessFlags = AccessFlags(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    pub const NONE: AccessFlags = AccessFlags(0);

    pub const fn union(self, o: AccessFlags) -> AccessFlags {
        AccessFlags(self.0 | o.0)
    }

    pub fn contains(self, o: AccessFlags) -> bool {
        self.0 & o.0 == o.0
    }

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl std::ops::BitOr for AccessFlags {
    type Output = AccessFlags;
    fn bitor(self, o: AccessFlags) -> AccessFlags {
        self.union(o)
    }
}

/// A registered memory region: a byte range of a [`Region`] the NIC may
/// access with the granted rights. Deregistered on drop, before the region
/// can be unmapped (this value holds the region).
pub struct Mr {
    ptr: NonNull<sys::ibv_mr>,
    region: Arc<Region>,
    offset: usize,
    len: usize,
    access: AccessFlags,
    _pd: Arc<Pd>,
    _locked: super::memlock::Reservation,
}

// SAFETY: an ibv_mr is immutable after registration (we only read lkey/rkey);
// deregistration happens once, on drop.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl std::fmt::Debug for Mr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mr({:#x}+{} bytes, {:?})", self.addr(), self.len, self.access)
    }
}

impl Mr {
    /// Registers bytes `offset..offset+len` of `region` with `access`.
    /// `offset` and `len` must be multiples of 8 inside the region.
    pub fn register(pd: &Arc<Pd>, region: Arc<Region>, offset: usize, len: usize, access: AccessFlags) -> Result<Mr> {
        let inside = offset.checked_add(len).is_some_and(|end| end <= region.len_bytes());
        if !inside || len == 0 || !offset.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(Error::Config(format!(
                "cannot register bytes {offset}..+{len} of a region of {} bytes",
                region.len_bytes()
            )));
        }
        if access.contains(AccessFlags::REMOTE_WRITE) && !access.contains(AccessFlags::LOCAL_WRITE) {
            return Err(Error::Config("remote write access needs local write access too".into()));
        }
        let locked = super::memlock::reserve(region.as_ptr() as u64 + offset as u64, len as u64)?;
        // SAFETY: `offset..offset+len` lies inside the mapping (checked), which
        // stays mapped while `self.region` lives; the MR is deregistered in
        // Drop before that Arc is released. The pointer is cast to *mut only
        // because the C API takes one: the memory is only ever accessed as
        // atomics by this process, which is what lets a device write it.
        let addr = unsafe { region.as_ptr().add(offset) } as *mut c_void;
        // SAFETY: valid PD, memory range valid as argued above.
        let mr = unsafe { sys::ibv_reg_mr(pd.ptr.as_ptr(), addr, len, access.bits() as c_int) };
        let mr = NonNull::new(mr).ok_or_else(|| {
            let e = std::io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENOMEM) | Some(libc::EPERM) | Some(libc::EAGAIN) => {
                    format!(" ({})", super::memlock::explain(len as u64))
                }
                _ => String::new(),
            };
            Error::io(format!("registering {len} bytes of memory with RDMA device {}{hint}", pd.ctx.name), e)
        })?;
        Ok(Mr { ptr: mr, region, offset, len, access, _pd: pd.clone(), _locked: locked })
    }

    /// The region's address as the NIC sees it (what a peer puts in its work
    /// requests).
    pub fn addr(&self) -> u64 {
        self.region.as_ptr() as u64 + self.offset as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is valid while self lives; lkey is immutable.
        unsafe { (*self.ptr.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.ptr.as_ptr()).rkey }
    }

    pub fn access(&self) -> AccessFlags {
        self.access
    }

    /// The registered words (for this process's own loads and stores).
    pub fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        &self.region.words()[self.offset / 8..(self.offset + self.len) / 8]
    }

    /// A scatter/gather entry for words `word..word+words` of this MR.
    pub fn sge(&self, word: usize, words: usize) -> Option<Sge> {
        let end = word.checked_add(words)?;
        (end * 8 <= self.len && words > 0).then(|| Sge {
            addr: self.addr() + word as u64 * 8,
            len: (words * 8) as u32,
            lkey: self.lkey(),
        })
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered once, deregistered once; the region is still
        // mapped (we hold it) and is released only after this returns.
        unsafe { sys::ibv_dereg_mr(self.ptr.as_ptr()) };
    }
}

/// A local buffer in a work request: inside a registered MR (made only by
/// [`Mr::sge`], which checks the bounds).
#[derive(Clone, Copy, Debug)]
pub struct Sge {
    addr: u64,
    len: u32,
    lkey: u32,
}

/// A completion channel (see [`Context::comp_channel`]).
pub struct CompChannel {
    ptr: NonNull<sys::ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: the channel's fd may be polled and read from any thread; the
// pointer is owned and freed once.
unsafe impl Send for CompChannel {}
// SAFETY: as above.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    fn fd(&self) -> c_int {
        // SAFETY: the channel is valid while self lives; fd is immutable.
        unsafe { (*self.ptr.as_ptr()).fd }
    }

    /// Blocks (without spinning) until an event is pending or `timeout`
    /// passes; true when an event is pending.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let mut p = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::io("waiting on a completion channel", e));
        }
        Ok(rc > 0)
    }

    /// Takes one pending event, acknowledging it at once; returns the
    /// `cq_context` of the CQ it belongs to, `None` when none is pending.
    ///
    /// Acknowledging immediately keeps `ibv_destroy_cq` from waiting for
    /// events, so callers must make sure a CQ that can still get events is
    /// not dropped while another thread is inside this call: the owners of
    /// shared channels destroy CQs only on the thread that takes events.
    pub fn take_event(&self) -> Result<Option<u64>> {
        let mut cq: *mut sys::ibv_cq = ptr::null_mut();
        let mut ctx: *mut c_void = ptr::null_mut();
        // SAFETY: valid channel and out-pointers; the fd is non-blocking, so
        // this returns -1 (EAGAIN) when nothing is pending.
        let rc = unsafe { sys::ibv_get_cq_event(self.ptr.as_ptr(), &mut cq, &mut ctx) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(Error::io("reading a completion event", e));
        }
        // SAFETY: `cq` is the live CQ the event is for (it cannot be destroyed
        // before its events are acknowledged, which happens right here).
        unsafe { sys::ibv_ack_cq_events(cq, 1) };
        Ok(Some(ctx as u64))
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: CQs bound to the channel hold an Arc of it, so none is left.
        unsafe { sys::ibv_destroy_comp_channel(self.ptr.as_ptr()) };
    }
}

/// What finished: one work completion, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wc {
    pub wr_id: u64,
    /// `None` on success, else the verbs status code.
    pub error: Option<u32>,
    pub opcode: WcOpcode,
    pub byte_len: u32,
    /// Immediate data (host order) of a received write-with-immediate.
    pub imm: Option<u32>,
    pub qp_num: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcOpcode {
    Read,
    Write,
    RecvWithImm,
    Other(u32),
}

impl Wc {
    /// A readable description of a failed completion.
    pub fn error_text(&self) -> Option<String> {
        let code = self.error?;
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        let s = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(code)) };
        Some(format!("{} (status {code})", s.to_string_lossy()))
    }
}

/// A completion queue bound to a completion channel.
pub struct Cq {
    ptr: NonNull<sys::ibv_cq>,
    channel: Arc<CompChannel>,
    capacity: u32,
}

// SAFETY: polling and arming a CQ are thread-safe verbs; callers serialize
// polling where completions must not be taken by the wrong thread.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    /// A CQ of at least `entries` entries whose events carry `tag` (see
    /// [`CompChannel::take_event`]).
    pub fn new(ctx: &Arc<Context>, channel: &Arc<CompChannel>, entries: u32, tag: u64) -> Result<Arc<Cq>> {
        // SAFETY: valid context and channel; `tag` is an opaque value the
        // library hands back, never dereferenced.
        let cq = unsafe {
            sys::ibv_create_cq(ctx.ptr.as_ptr(), entries as c_int, tag as *mut c_void, channel.ptr.as_ptr(), 0)
        };
        let cq = NonNull::new(cq)
            .ok_or_else(|| os_error(format!("creating a completion queue of {entries} entries on {}", ctx.name)))?;
        Ok(Arc::new(Cq { ptr: cq, channel: channel.clone(), capacity: entries }))
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn channel(&self) -> &Arc<CompChannel> {
        &self.channel
    }

    /// Asks for an event on the channel at the next completion. Poll once
    /// more after arming: a completion that arrived before it raises none.
    pub fn arm(&self) -> Result<()> {
        // SAFETY: valid CQ.
        let rc = unsafe { sys::ibv_req_notify_cq(self.ptr.as_ptr(), 0) };
        check(rc, || "arming a completion queue".into())
    }

    /// Moves up to `out.capacity()` finished completions into `out`
    /// (cleared first); returns how many.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> Result<usize> {
        const BATCH: usize = 32;
        out.clear();
        // SAFETY: ibv_wc is plain C data; zeroed is valid.
        let mut raw: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        while out.len() < max {
            let want = (max - out.len()).min(BATCH);
            // SAFETY: valid CQ, `raw` has room for `want` entries.
            let n = unsafe { sys::ibv_poll_cq(self.ptr.as_ptr(), want as c_int, raw.as_mut_ptr()) };
            if n < 0 {
                return Err(Error::io("polling a completion queue", std::io::Error::from_raw_os_error(-n)));
            }
            for w in &raw[..n as usize] {
                let ok = w.status == sys::ibv_wc_status::IBV_WC_SUCCESS;
                let opcode = match w.opcode {
                    sys::ibv_wc_opcode::IBV_WC_RDMA_READ => WcOpcode::Read,
                    sys::ibv_wc_opcode::IBV_WC_RDMA_WRITE => WcOpcode::Write,
                    sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvWithImm,
                    o => WcOpcode::Other(o),
                };
                let with_imm = ok && w.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
                // SAFETY: the union holds imm_data when IBV_WC_WITH_IMM is set
                // (checked); both members are u32, so any bits are valid.
                let imm = with_imm.then(|| u32::from_be(unsafe { w.imm_data_invalidated_rkey_union.imm_data }));
                out.push(Wc {
                    wr_id: w.wr_id,
                    error: (!ok).then_some(w.status),
                    opcode,
                    byte_len: w.byte_len,
                    imm,
                    qp_num: w.qp_num,
                });
            }
            if (n as usize) < want {
                break;
            }
        }
        Ok(out.len())
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs using this CQ hold an Arc of it, so none is left; every
        // event taken from the channel was acknowledged at once.
        unsafe { sys::ibv_destroy_cq(self.ptr.as_ptr()) };
    }
}

/// The states of a queue pair that callers can ask about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QpState {
    Reset,
    Init,
    ReadyToReceive,
    ReadyToSend,
    Error,
    Other(u32),
}

/// What one side tells the other to connect an RC queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// `ibv_mtu` value.
    pub mtu: u8,
}

/// Sizes of a queue pair.
#[derive(Clone, Copy, Debug)]
pub struct QpCaps {
    pub send_wr: u32,
    pub recv_wr: u32,
}

/// A reliable-connected queue pair.
pub struct Qp {
    ptr: NonNull<sys::ibv_qp>,
    _pd: Arc<Pd>,
    _cq: Arc<Cq>,
    port: u8,
    gid_index: u8,
}

// SAFETY: posting and modifying a QP are thread-safe verbs; the pointer is
// owned and destroyed once.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

/// Path parameters for RTR/RTS (see `Qp::connect`).
#[derive(Clone, Copy, Debug)]
pub struct PathParams {
    /// Outstanding RDMA READs this side may issue / serve.
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    /// Local ACK timeout exponent (4.096 us x 2^timeout) and retries: how
    /// long until an unanswered request fails the QP instead of hanging.
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub min_rnr_timer: u8,
}

impl Qp {
    /// An RC QP whose send and receive completions go to `cq`, moved to
    /// INIT on `port` with remote `access` (what peers may do through it:
    /// READ and WRITE for a server's QP, nothing for a worker's).
    pub fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, caps: QpCaps, port: u8, gid_index: u8, access: AccessFlags) -> Result<Qp> {
        // SAFETY: ibv_qp_init_attr is plain C data; zeroed is a valid start.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.ptr.as_ptr();
        init.recv_cq = cq.ptr.as_ptr();
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = caps.send_wr;
        init.cap.max_recv_wr = caps.recv_wr.max(1);
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: valid PD and attributes; the QP is owned by the new value.
        let qp = unsafe { sys::ibv_create_qp(pd.ptr.as_ptr(), &mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| os_error(format!("creating a queue pair on {}", pd.ctx.name)))?;
        let q = Qp { ptr: qp, _pd: pd.clone(), _cq: cq.clone(), port, gid_index };
        // SAFETY: zeroed attributes are valid; only the masked fields are read.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = access.bits();
        use sys::ibv_qp_attr_mask as M;
        q.modify(&mut a, M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS, "INIT")?;
        Ok(q)
    }

    fn modify(&self, a: &mut sys::ibv_qp_attr, mask: sys::ibv_qp_attr_mask, to: &str) -> Result<()> {
        // SAFETY: valid QP; `a` holds every field `mask` names.
        let rc = unsafe { sys::ibv_modify_qp(self.ptr.as_ptr(), a, mask.0 as c_int) };
        check(rc, || format!("moving queue pair {} to {to}", self.qpn()))
    }

    pub fn qpn(&self) -> u32 {
        // SAFETY: valid QP; qp_num is immutable.
        unsafe { (*self.ptr.as_ptr()).qp_num }
    }

    /// INIT -> RTR -> RTS towards `remote`, sending from `local_psn`.
    pub fn connect(&self, remote: &PeerAddr, local_psn: u32, p: PathParams) -> Result<()> {
        use sys::ibv_qp_attr_mask as M;
        // SAFETY: zeroed attributes are valid; only the masked fields are read.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = u32::from(remote.mtu);
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = p.max_dest_rd_atomic;
        a.min_rnr_timer = p.min_rnr_timer;
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = self.port;
        // RoCE (and routed IB) needs the global route header: the peer's GID
        // and which of our GIDs to send from.
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = sys::ibv_gid { raw: remote.gid };
        a.ah_attr.grh.sgid_index = self.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.grh.flow_label = 0;
        a.ah_attr.grh.traffic_class = 0;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;
        // SAFETY: as above.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.timeout = p.timeout;
        a.retry_cnt = p.retry_cnt;
        a.rnr_retry = p.rnr_retry;
        a.sq_psn = local_psn;
        a.max_rd_atomic = p.max_rd_atomic;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Moves the QP to the error state: outstanding requests complete with
    /// a flush error. Used to tear a connection down, and by tests.
    pub fn set_error(&self) -> Result<()> {
        // SAFETY: zeroed attributes are valid; only qp_state is read.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, sys::ibv_qp_attr_mask::IBV_QP_STATE, "ERR")
    }

    pub fn state(&self) -> Result<QpState> {
        // SAFETY: zeroed attribute structures are valid out-parameters.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid QP and out-pointers.
        let rc = unsafe {
            sys::ibv_query_qp(self.ptr.as_ptr(), &mut a, sys::ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int, &mut init)
        };
        check(rc, || format!("querying queue pair {}", self.qpn()))?;
        use sys::ibv_qp_state as S;
        Ok(match a.qp_state {
            S::IBV_QPS_RESET => QpState::Reset,
            S::IBV_QPS_INIT => QpState::Init,
            S::IBV_QPS_RTR => QpState::ReadyToReceive,
            S::IBV_QPS_RTS => QpState::ReadyToSend,
            S::IBV_QPS_ERR => QpState::Error,
            o => QpState::Other(o),
        })
    }

    fn post_send(&self, wr: &mut sys::ibv_send_wr) -> Result<()> {
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: valid QP; `wr` is one fully initialized request whose
        // scatter entry points into a registered MR (an `Sge` can only be made
        // from one), kept alive by the caller until the request completes.
        let rc = unsafe { sys::ibv_post_send(self.ptr.as_ptr(), wr, &mut bad) };
        check(rc, || format!("posting a send request on queue pair {}", self.qpn()))
    }

    /// Posts an RDMA READ of `local.len` bytes at `remote_addr` (rkey) into
    /// `local`. `fence`: start only after every earlier READ on this QP has
    /// completed (so this one observes memory no older than they did).
    ///
    /// The caller must not touch `local`'s bytes until the completion.
    pub fn post_read(
        &self,
        wr_id: u64,
        local: Sge,
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
        fence: bool,
    ) -> Result<()> {
        let mut sge = sys::ibv_sge { addr: local.addr, length: local.len, lkey: local.lkey };
        // SAFETY: ibv_send_wr is plain C data (pointers and integers); zeroed
        // is a valid start and every field the opcode uses is set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
        wr.send_flags = flags(signaled, fence);
        wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
        self.post_send(&mut wr)
    }

    /// Posts a plain RDMA WRITE of `local` to `remote_addr` (rkey): no
    /// immediate, so nothing completes at the peer. pserver's own traffic
    /// always rings a doorbell ([`Qp::post_write_imm`]); tests use this to
    /// show what the peer's registrations allow.
    pub fn post_write(&self, wr_id: u64, local: Sge, remote_addr: u64, rkey: u32, signaled: bool) -> Result<()> {
        let mut sge = sys::ibv_sge { addr: local.addr, length: local.len, lkey: local.lkey };
        // SAFETY: as in post_read.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
        wr.send_flags = flags(signaled, false);
        wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
        self.post_send(&mut wr)
    }

    /// Posts an RDMA WRITE of `local` to `remote_addr` (rkey) that also
    /// consumes a receive request at the peer and completes it with `imm`
    /// (the doorbell), after the data is in place.
    pub fn post_write_imm(
        &self,
        wr_id: u64,
        local: Sge,
        remote_addr: u64,
        rkey: u32,
        imm: u32,
        signaled: bool,
    ) -> Result<()> {
        let mut sge = sys::ibv_sge { addr: local.addr, length: local.len, lkey: local.lkey };
        // SAFETY: as in post_read.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.send_flags = flags(signaled, false);
        wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
        self.post_send(&mut wr)
    }

    /// Posts `n` receive requests without buffers (for writes with
    /// immediate, whose data goes where the writer said), ids from `first_id`.
    pub fn post_recvs(&self, first_id: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // SAFETY: ibv_recv_wr is plain C data; zeroed is valid.
        let mut wrs: Vec<sys::ibv_recv_wr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        let base = wrs.as_mut_ptr();
        for (i, w) in wrs.iter_mut().enumerate() {
            w.wr_id = first_id + i as u64;
            w.num_sge = 0;
            w.sg_list = ptr::null_mut();
            // SAFETY: `i + 1 <= n`, so the pointer stays inside (or one past)
            // the vector, which outlives the call.
            w.next = if i + 1 < n { unsafe { base.add(i + 1) } } else { ptr::null_mut() };
        }
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: valid QP; a well-formed chain of `n` requests without
        // buffers, alive for the duration of the call (the provider copies
        // them).
        let rc = unsafe { sys::ibv_post_recv(self.ptr.as_ptr(), base, &mut bad) };
        check(rc, || format!("posting {n} receive requests on queue pair {}", self.qpn()))
    }
}

fn flags(signaled: bool, fence: bool) -> u32 {
    let mut f = 0;
    if signaled {
        f |= sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
    }
    if fence {
        f |= sys::ibv_send_flags::IBV_SEND_FENCE.0;
    }
    f
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: destroyed once; requests still posted are discarded by the
        // device, and their buffers (MRs) are kept by the QP's owner, which
        // drops them after this QP (field order of the owning structs).
        unsafe { sys::ibv_destroy_qp(self.ptr.as_ptr()) };
    }
}
