//! Maps and globals shared by the programs, plus the filter every program applies first.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tapwire_common::{COUNTER_SLOTS, Counter, EventHeader, MAX_PAYLOAD, RING_BYTES, SockInfo, TraceCtx};

/// tgid of the agent: never captured, even if it sits in a selected cgroup. Set at load time.
#[unsafe(no_mangle)]
pub static AGENT_TGID: u32 = 0;
/// Payload bytes copied per syscall, at most MAX_PAYLOAD. Set at load time.
#[unsafe(no_mangle)]
pub static PAYLOAD_CAP: u32 = tapwire_common::DEFAULT_PAYLOAD_CAP;

#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// cgroup id -> CGROUP_ALL or CGROUP_LISTED for every selected cgroup (user space keeps it in
/// sync with the selection).
#[map(name = "SELECTED_CGROUPS")]
pub static SELECTED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(16384, 0);

/// tgid -> TGID_INCLUDE or TGID_EXCLUDE: per-process verdicts inside selected cgroups
/// (executable names, ports, processes exporting OTLP themselves).
#[map(name = "SELECTED_TGIDS")]
pub static SELECTED_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(16384, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// A syscall in progress on one thread, keyed by pid_tgid.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inflight {
    /// tapwire_common::Syscall number.
    pub syscall: u32,
    pub direction: u32,
    pub fd: i64,
    /// User pointer: the buffer (read/write/recvfrom/sendto), the iovec array (readv/writev) or
    /// the msghdr (recvmsg/sendmsg).
    pub arg: u64,
    /// Third argument: iovec count (readv/writev), else unused.
    pub count: u64,
    /// Set by sock:sock_{send,recv}_length when the fd turned out to be a TCP socket.
    pub sock: u64,
    /// CLOCK_MONOTONIC at syscall entry.
    pub enter_ns: u64,
    /// 1 when the connection already has a request without response (known at entry).
    pub pipelined: u32,
    pub _pad: u32,
}

/// pid_tgid -> client context the sk_msg program decided (and injected) during the thread's
/// current send; taken by the syscall's exit probe.
#[map(name = "SEND_CTX")]
pub static SEND_CTX: LruHashMap<u64, TraceCtx> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "INFLIGHT")]
pub static INFLIGHT: HashMap<u64, Inflight> = HashMap::with_max_entries(16384, 0);

/// Endpoints and role of TCP sockets, by `struct sock` address.
#[map(name = "SOCKS")]
pub static SOCKS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// (tgid << 32 | fd) -> `struct sock` address, learnt on data syscalls, used by close().
#[map(name = "FD_SOCKS")]
pub static FD_SOCKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU scratch space where an event is assembled before it is copied to the ring buffer
/// with its exact length (a ring-buffer reservation would have to be of constant size).
#[repr(C)]
pub struct Scratch {
    pub header: EventHeader,
    /// Twice the largest payload, so that the verifier can prove offset + length in bounds.
    pub payload: [u8; 2 * MAX_PAYLOAD],
}

#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// True when the current thread belongs to a selected cgroup, is not the agent, and its process
/// is not excluded (in a CGROUP_LISTED cgroup: is listed as included).
#[inline(always)]
pub fn selected() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: read of a load-time constant; volatile so the compiler keeps the load.
    if tgid == unsafe { core::ptr::read_volatile(&AGENT_TGID) } {
        return false;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the values are copied out at once.
    let Some(mode) = (unsafe { SELECTED_CGROUPS.get(&cgroup) }).copied() else { return false };
    match unsafe { SELECTED_TGIDS.get(&tgid) } {
        Some(verdict) => *verdict == tapwire_common::TGID_INCLUDE,
        None => mode == tapwire_common::CGROUP_ALL,
    }
}

/// The process that last moved data on a socket, for events raised in kernel context.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Owner {
    pub pid: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
}

/// `struct sock` address -> owner, for the sockets of selected processes only: retransmits and
/// resets happen in softirq context, where the current task says nothing about the socket.
#[map(name = "OWNERS")]
pub static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU copy of the start of a send, scanned by the sk_msg program (inject.rs) with the same
/// code as captured payloads.
#[map(name = "MSG_SCRATCH")]
pub static MSG_SCRATCH: PerCpuArray<[u8; 2 * MAX_PAYLOAD]> = PerCpuArray::with_max_entries(1, 0);

/// The buffer a scan works on: `BUF_MSG` the sk_msg copy, otherwise the event payload.
#[inline(always)]
pub fn buffer(which: u32) -> Option<&'static [u8; 2 * MAX_PAYLOAD]> {
    // SAFETY: per-CPU map values, alive while the program runs.
    unsafe {
        if which == crate::context::BUF_MSG {
            MSG_SCRATCH.get_ptr(0).map(|p| &*p)
        } else {
            SCRATCH.get_ptr(0).map(|s| &(*s).payload)
        }
    }
}
