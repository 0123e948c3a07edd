//! sock:* tracepoints: which socket a syscall uses, and each TCP connection's endpoints and role.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext};
use tapwire_common::{ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN, SockInfo};

use crate::maps::{INFLIGHT, SOCKS};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

/// Offsets in sock:sock_{send,recv}_length.
const LEN_SK: usize = 8;
const LEN_FAMILY: usize = 16;
const LEN_PROTOCOL: usize = 18;

/// Marks the thread's in-flight syscall as a TCP socket operation on `sk`.
#[inline(always)]
fn mark_socket(ctx: &TracePointContext) -> u32 {
    let Some(inflight) = INFLIGHT.get_ptr_mut(&bpf_get_current_pid_tgid()) else {
        return 0; // not a selected thread inside a data syscall
    };
    // SAFETY: offsets from the tracepoint format.
    let (sk, family, protocol) = unsafe {
        (
            ctx.read_at::<u64>(LEN_SK).unwrap_or(0),
            ctx.read_at::<u16>(LEN_FAMILY).unwrap_or(0),
            ctx.read_at::<u16>(LEN_PROTOCOL).unwrap_or(0),
        )
    };
    if (family == AF_INET || family == AF_INET6) && protocol == IPPROTO_TCP {
        // SAFETY: map value of this thread's own entry.
        unsafe { (*inflight).sock = sk };
    }
    0
}

/// sock:sock_send_length fires inside sock_sendmsg() in the sending thread.
#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    mark_socket(&ctx)
}

/// sock:sock_recv_length fires inside sock_recvmsg() in the receiving thread.
#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    mark_socket(&ctx)
}

/// Offsets in sock:inet_sock_set_state.
const ST_SKADDR: usize = 8;
const ST_OLDSTATE: usize = 16;
const ST_NEWSTATE: usize = 20;
const ST_SPORT: usize = 24;
const ST_DPORT: usize = 26;
const ST_FAMILY: usize = 28;
const ST_PROTOCOL: usize = 30;
const ST_SADDR: usize = 32;
const ST_DADDR: usize = 36;
const ST_SADDR6: usize = 40;
const ST_DADDR6: usize = 56;

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

/// sock:inet_sock_set_state: records endpoints and role by `struct sock` address. Runs in
/// softirq context for passive sockets, so it never looks at the current pid or cgroup.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint format.
    unsafe {
        if ctx.read_at::<u16>(ST_PROTOCOL).unwrap_or(0) != IPPROTO_TCP {
            return 0;
        }
        let sk = ctx.read_at::<u64>(ST_SKADDR).unwrap_or(0);
        let old = ctx.read_at::<i32>(ST_OLDSTATE).unwrap_or(0);
        let new = ctx.read_at::<i32>(ST_NEWSTATE).unwrap_or(0);
        if new == TCP_CLOSE {
            let _ = SOCKS.remove(&sk);
            return 0;
        }
        let role = if new == TCP_SYN_SENT || (new == TCP_ESTABLISHED && old == TCP_SYN_SENT) {
            ROLE_CLIENT
        } else if new == TCP_SYN_RECV || (new == TCP_ESTABLISHED && old == TCP_SYN_RECV) {
            ROLE_SERVER
        } else {
            ROLE_UNKNOWN
        };
        if role == ROLE_UNKNOWN {
            return 0;
        }
        let family = ctx.read_at::<u16>(ST_FAMILY).unwrap_or(0);
        let mut info = SockInfo::EMPTY;
        info.family = family;
        info.role = role;
        info.sport = ctx.read_at::<u16>(ST_SPORT).unwrap_or(0);
        info.dport = ctx.read_at::<u16>(ST_DPORT).unwrap_or(0);
        if family == AF_INET {
            let s = ctx.read_at::<[u8; 4]>(ST_SADDR).unwrap_or([0; 4]);
            let d = ctx.read_at::<[u8; 4]>(ST_DADDR).unwrap_or([0; 4]);
            info.saddr[..4].copy_from_slice(&s);
            info.daddr[..4].copy_from_slice(&d);
        } else if family == AF_INET6 {
            info.saddr = ctx.read_at::<[u8; 16]>(ST_SADDR6).unwrap_or([0; 16]);
            info.daddr = ctx.read_at::<[u8; 16]>(ST_DADDR6).unwrap_or([0; 16]);
        } else {
            return 0;
        }
        let _ = SOCKS.insert(&sk, &info, 0);
    }
    0
}
