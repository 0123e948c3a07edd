//! The contract between tapwire's kernel programs and its user-space agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides agree on the layout
//! byte for byte. Event kinds and flag bits are stable numbers: never renumber them.
#![no_std]

/// Names of the maps and globals, shared so that user space finds what the kernel side declares.
/// SELECTED_CGROUPS value: every process of the cgroup is captured unless excluded by tgid.
pub const CGROUP_ALL: u32 = 1;
/// SELECTED_CGROUPS value: only processes listed as included by tgid are captured.
pub const CGROUP_LISTED: u32 = 2;
/// SELECTED_TGIDS value: the process is not captured.
pub const TGID_EXCLUDE: u32 = 0;
/// SELECTED_TGIDS value: the process is captured (in a selected cgroup).
pub const TGID_INCLUDE: u32 = 1;

pub mod names {
    /// Ring buffer carrying [`crate::EventHeader`]-prefixed events to user space.
    pub const EVENTS: &str = "EVENTS";
    /// cgroup id (u64) -> [`crate::CGROUP_ALL`] or [`crate::CGROUP_LISTED`] for every selected
    /// cgroup. Filled by user space.
    pub const SELECTED_CGROUPS: &str = "SELECTED_CGROUPS";
    /// tgid (u32) -> [`crate::TGID_INCLUDE`] or [`crate::TGID_EXCLUDE`]. Filled by user space.
    pub const SELECTED_TGIDS: &str = "SELECTED_TGIDS";
    /// Per-CPU loss counters, indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Global: tgid of the agent itself, never captured.
    pub const AGENT_TGID: &str = "AGENT_TGID";
    /// Global: how many payload bytes to copy per syscall (at most [`crate::MAX_PAYLOAD`]).
    pub const PAYLOAD_CAP: &str = "PAYLOAD_CAP";
    /// Single-slot array holding the [`crate::SamplerParams`] the kernel applies to new traces.
    pub const SAMPLER: &str = "SAMPLER";
    /// Sockhash of the client TCP sockets of selected cgroups (sock_ops adds them, the
    /// sk_msg program that injects `traceparent` is attached to it).
    pub const CLIENT_SOCKS: &str = "CLIENT_SOCKS";
}

/// Largest payload prefix one event can carry. The runtime cap (`PAYLOAD_CAP`) is at most this.
pub const MAX_PAYLOAD: usize = 4096;
/// Default runtime payload prefix: 1 KiB per syscall.
pub const DEFAULT_PAYLOAD_CAP: u32 = 1024;
/// Capacity of the ring buffer in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 8 << 20;
/// Unread bytes in the ring buffer past which the kernel wakes the agent at once; below it the
/// agent drains on its own timer (`RING_POLL_INTERVAL_MS`), saving a wakeup per event.
pub const WAKEUP_BYTES: u32 = 256 << 10;
/// How often the agent drains the ring buffer without a wakeup. Every wakeup costs the agent
/// tens of microseconds of CPU here (a context switch in a VM), so this bounds its idle cost
/// (20 wakeups/s) and the delay before a span is seen. Past ~6k requests/s (3 events, ~800 B,
/// per request) `WAKEUP_BYTES` fill up first and the kernel wakes the agent sooner.
pub const RING_POLL_INTERVAL_MS: u64 = 50;

/// What an event is. The numbers are part of the ABI.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(Debug))]
pub enum EventKind {
    /// Bytes read from or written to a TCP socket by a selected process.
    Data = 1,
    /// A selected process closed a TCP socket it had used.
    Close = 2,
    /// tcp:tcp_retransmit_skb on a socket a selected process used. pid/cgroup are the owner's.
    TcpRetransmit = 3,
    /// tcp:tcp_send_reset on a socket a selected process used.
    TcpResetSent = 4,
    /// tcp:tcp_receive_reset on a socket a selected process used.
    TcpResetReceived = 5,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Data),
            2 => Some(Self::Close),
            3 => Some(Self::TcpRetransmit),
            4 => Some(Self::TcpResetSent),
            5 => Some(Self::TcpResetReceived),
            _ => None,
        }
    }
}

/// Direction of a data event, seen from the process.
pub const DIR_INGRESS: u32 = 0;
pub const DIR_EGRESS: u32 = 1;

/// Role of a connection, learnt in the kernel from `sock:inet_sock_set_state`.
pub const ROLE_UNKNOWN: u32 = 0;
/// The process opened the connection (it went through SYN_SENT).
pub const ROLE_CLIENT: u32 = 1;
/// The connection was accepted from a listening socket (it came from SYN_RECV).
pub const ROLE_SERVER: u32 = 2;

/// Which syscall produced a data event (for diagnostics and per-path tests).
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(Debug))]
pub enum Syscall {
    Read = 1,
    Write = 2,
    Readv = 3,
    Writev = 4,
    Recvfrom = 5,
    Sendto = 6,
    Recvmsg = 7,
    Sendmsg = 8,
    Close = 9,
    /// sendfile(2): bytes counted, no payload (the data never passes through user memory).
    Sendfile = 10,
}

impl Syscall {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Read),
            2 => Some(Self::Write),
            3 => Some(Self::Readv),
            4 => Some(Self::Writev),
            5 => Some(Self::Recvfrom),
            6 => Some(Self::Sendto),
            7 => Some(Self::Recvmsg),
            8 => Some(Self::Sendmsg),
            9 => Some(Self::Close),
            10 => Some(Self::Sendfile),
            _ => None,
        }
    }
}

/// Endpoints of a TCP connection as the kernel reported them in `inet_sock_set_state`.
/// `saddr`/`sport` are the local side. IPv4 addresses use the first 4 bytes of the arrays.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug, PartialEq, Eq))]
pub struct SockInfo {
    /// AF_INET (2) or AF_INET6 (10); 0 when the kernel never reported this socket's state.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad: u16,
    /// One of the `ROLE_*` constants.
    pub role: u32,
    pub _pad2: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl SockInfo {
    pub const EMPTY: Self = Self {
        family: 0,
        sport: 0,
        dport: 0,
        _pad: 0,
        role: ROLE_UNKNOWN,
        _pad2: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
}

/// What the trace context of a data event says (`TraceCtx::kind`).
pub const CTX_NONE: u32 = 0;
/// The event starts a request the process serves: the ids are those of its SERVER span.
pub const CTX_SERVER: u32 = 1;
/// The event starts a request the process sends: the ids are those of its CLIENT span.
pub const CTX_CLIENT: u32 = 2;

/// Where the parent of a span decided in the kernel comes from (`TraceCtx::source`).
/// No parent: the span starts a new trace (a CLIENT span here is "unparented").
pub const PARENT_NONE: u32 = 0;
/// SERVER span: the `traceparent` header of the request it serves.
pub const PARENT_HEADER: u32 = 1;
/// CLIENT span: the only server request in flight on the sending thread.
pub const PARENT_THREAD: u32 = 2;
/// CLIENT span: the only server request in flight in the sending process.
pub const PARENT_PROCESS: u32 = 3;
/// CLIENT span: the request carries the application's own `traceparent`; user space takes its
/// ids from that header (the kernel ids are unused).
pub const PARENT_APP_HEADER: u32 = 4;

/// What the sk_msg program did to an outbound request (`TraceCtx::inject`).
pub const INJECT_NOT_TRIED: u32 = 0;
/// `traceparent: 00-<trace_id>-<span_id>-<flags>` was inserted after the request line.
pub const INJECT_DONE: u32 = 1;

/// Trace context the kernel decided for the request an event starts. Ids are in wire order
/// (the bytes of their hex form); zero parent means none.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug, PartialEq, Eq))]
pub struct TraceCtx {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: [u8; 8],
    /// One of `CTX_*`.
    pub kind: u32,
    /// One of `PARENT_*`.
    pub source: u32,
    /// W3C trace flags (bit 0: sampled).
    pub flags: u32,
    /// One of `INJECT_*`.
    pub inject: u32,
}

impl TraceCtx {
    pub const EMPTY: Self = Self {
        trace_id: [0; 16],
        span_id: [0; 8],
        parent_span_id: [0; 8],
        kind: CTX_NONE,
        source: PARENT_NONE,
        flags: 0,
        inject: INJECT_NOT_TRIED,
    };
}

/// Head sampling for traces that start on this node, applied in the kernel so that the
/// `traceparent` it injects carries the decision. A trace is kept when its randomness (the 56
/// least significant bits of the trace id, read big-endian) is at least `threshold`
/// (OpenTelemetry consistent probability sampling): 0 keeps all, 2^56 none.
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug, PartialEq, Eq))]
pub struct SamplerParams {
    pub threshold: u64,
    /// 1: a request with an incoming `traceparent` follows its sampled flag (parent-based).
    pub parent_based: u32,
    pub _pad: u32,
}

/// 2^56: the threshold that keeps nothing.
pub const SAMPLE_NONE: u64 = 1 << 56;

impl SamplerParams {
    /// parentbased_always_on, the OpenTelemetry default.
    pub const DEFAULT: Self = Self { threshold: 0, parent_based: 1, _pad: 0 };

    /// The sampled flag of a new trace with this id.
    pub const fn keeps(&self, trace_id: &[u8; 16]) -> bool {
        let mut r: u64 = 0;
        let mut i = 9;
        while i < 16 {
            r = (r << 8) | trace_id[i] as u64;
            i += 1;
        }
        r >= self.threshold
    }
}

/// The fixed header in front of every ring-buffer event. For [`EventKind::Data`] it is followed
/// by `captured_len` payload bytes (the prefix of what the syscall moved).
#[repr(C)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug))]
pub struct EventHeader {
    /// One of [`EventKind`].
    pub kind: u32,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u32,
    /// Process id (tgid) and thread id.
    pub pid: u32,
    pub tid: u32,
    /// cgroup v2 id (inode number of the cgroup directory) of the calling thread.
    pub cgroup_id: u64,
    /// Address of the kernel `struct sock`: identifies the connection while it lives.
    pub sock: u64,
    /// CLOCK_MONOTONIC nanoseconds: reads at syscall exit (the bytes are there), writes at
    /// syscall entry (the peer may read them before write() returns), close at entry.
    pub ts_ns: u64,
    /// Bytes the syscall moved (its return value).
    pub total_len: u32,
    /// Payload bytes that follow this header (<= total_len, <= PAYLOAD_CAP).
    pub captured_len: u32,
    /// File descriptor in the process.
    pub fd: i32,
    /// One of [`Syscall`].
    pub syscall: u32,
    /// Connection endpoints and role, when known.
    pub sock_info: SockInfo,
    /// Trace context of the request this event starts, if the kernel decided one.
    pub trace: TraceCtx,
}

pub const HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// Indexes into the per-CPU `COUNTERS` array: every loss in the kernel is counted.
#[repr(u32)]
#[derive(Clone, Copy)]
#[cfg_attr(feature = "user", derive(Debug))]
pub enum Counter {
    /// Events that did not fit in the ring buffer.
    RingbufFull = 0,
    /// Payload copies from user memory that failed (the event is sent without payload).
    PayloadReadFailed = 1,
    /// Syscalls whose entry state could not be stored (map full).
    InflightMapFull = 2,
    /// Events emitted.
    EventsEmitted = 3,
    /// Server requests given a trace context in the kernel.
    ServerContexts = 4,
    /// Client requests whose parent is the one server request in flight on their thread.
    ParentThread = 5,
    /// ... the one server request in flight in their process.
    ParentProcess = 6,
    /// ... none: several (or no) server requests in flight, so the client span starts a trace.
    Unparented = 7,
    /// Client requests carrying the application's own traceparent.
    AppTraceparent = 8,
    /// `traceparent` inserted into an outbound request.
    Injected = 9,
    /// Not injected: the request already has a traceparent (the application propagates).
    InjectSkipHasHeader = 10,
    /// Not injected: the request head does not end within this send (larger than one send,
    /// or longer than the scan window).
    InjectSkipSplit = 11,
    /// Not injected: pipelined (a request still unanswered on the connection, or a second
    /// request in the same send).
    InjectSkipPipelined = 12,
    /// Not injected: the kernel refused to insert the bytes.
    InjectFailed = 13,
    /// Client sockets not added to the sockhash because it was full or the socket belongs to
    /// another sockmap user (EBUSY): their requests are never injected.
    SockhashRefused = 14,
    /// Server requests that found the per-connection context table full.
    ContextMapFull = 15,
    /// Not injected: the send does not start with an HTTP/1 request line (other protocols,
    /// TLS, bodies).
    InjectSkipNotHttp = 16,
}
pub const COUNTER_SLOTS: u32 = 24;

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), every field an integer or integer array, no padding holes.
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::TraceCtx {}
    unsafe impl aya::Pod for super::SamplerParams {}
}

// Layout checks: a change here is an ABI change on both sides.
const _: () = assert!(core::mem::size_of::<SockInfo>() == 48);
const _: () = assert!(core::mem::size_of::<TraceCtx>() == 48);
const _: () = assert!(core::mem::size_of::<EventHeader>() == 152);
