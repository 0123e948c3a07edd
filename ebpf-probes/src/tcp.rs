//! tcp:* tracepoints: retransmits and resets on connections of selected processes. They fire in
//! softirq or timer context, so the owner comes from the OWNERS map, never from the current task.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use tapwire_common::{DIR_EGRESS, DIR_INGRESS, EventKind};

use crate::{
    maps::{OWNERS, SCRATCH, SOCKS, Scratch},
    syscalls::{fill_header, output},
};

/// Emits a TCP event for `sk` if a selected process owns it.
#[inline(always)]
fn emit(ctx: &TracePointContext, sk_offset: usize, kind: EventKind, direction: u32) -> u32 {
    // SAFETY: offset from the tracepoint format.
    let sk = unsafe { ctx.read_at::<u64>(sk_offset).unwrap_or(0) };
    // SAFETY: the value is copied immediately.
    let Some(owner) = (unsafe { OWNERS.get(&sk) }).copied() else { return 0 };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch owned by this program invocation.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    let ts = unsafe { bpf_ktime_get_ns() };
    fill_header(&mut scratch.header, kind, direction, u64::from(owner.pid) << 32, sk, ts);
    scratch.header.cgroup_id = owner.cgroup_id;
    output(scratch, 0)
}

/// tcp:tcp_retransmit_skb: a segment of a watched connection was sent again.
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    emit(&ctx, 16, EventKind::TcpRetransmit, DIR_EGRESS)
}

/// tcp:tcp_send_reset: the kernel answered a watched connection with RST.
#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    emit(&ctx, 16, EventKind::TcpResetSent, DIR_EGRESS)
}

/// tcp:tcp_receive_reset: the peer of a watched connection sent RST.
#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    emit(&ctx, 8, EventKind::TcpResetReceived, DIR_INGRESS)
}

/// tcp:tcp_destroy_sock: the kernel frees a TCP socket; its entries go with it, so that closed
/// connections leave nothing behind in the socket maps (a reset sent on close has been seen by
/// then: the socket is destroyed after it).
#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracepoint format (skaddr).
    let sk = unsafe { ctx.read_at::<u64>(8).unwrap_or(0) };
    let _ = OWNERS.remove(&sk);
    let _ = SOCKS.remove(&sk);
    0
}
