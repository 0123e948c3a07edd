//! `traceparent` injection into outbound HTTP/1 requests (`--context-propagation headers`).
//!
//! sock_ops (attached to the selected cgroups only) adds each client TCP socket to a sockhash
//! when its connection is established; the sk_msg program attached to that sockhash sees every
//! send on those sockets before TCP does. For a send that holds a whole request head without a
//! `traceparent`, it decides the client span's context (context.rs) and inserts
//! `traceparent: 00-<trace id>-<span id>-<flags>\r\n` right after the request line with
//! bpf_msg_push_data. Everything else passes untouched: the program always returns SK_PASS and
//! never redirects, so the socket's data path is TCP's own.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_msg_pull_data, generated},
    macros::{map, sk_msg, sock_ops, stream_verdict},
    maps::SockHash,
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};
use tapwire_common::{Counter, DIR_EGRESS, INJECT_DONE, MAX_PAYLOAD, TraceCtx};

use crate::{
    context::{self, SCAN_BYTES},
    maps::{AGENT_TGID, INFLIGHT, MSG_SCRATCH, SEND_CTX, count},
};

const SK_PASS: u32 = 1;
/// Age past which an INFLIGHT entry is not the current syscall's.
const STALE_NS: u64 = 1_000_000_000;
const BPF_NOEXIST: u64 = 1;
/// uapi: the active side of a connection reached ESTABLISHED.
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
/// `traceparent: 00-` + 32 + `-` + 16 + `-` + 2 + CRLF.
const LINE_LEN: usize = 70;
const PREFIX: &[u8; 16] = b"traceparent: 00-";
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Client sockets of selected cgroups, by socket cookie.
#[map(name = "CLIENT_SOCKS")]
pub static CLIENT_SOCKS: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// sock_ops on the selected cgroups: a client connection is established, so its sends go
/// through the sk_msg program from now on.
#[sock_ops]
pub fn client_sockets(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the context pointer is the program's own argument.
        let mut key = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        // SAFETY: as above; the helper takes the sock_ops context.
        let ops = unsafe { &mut *ctx.ops };
        // Fails when the map is full or when another sockmap user already owns the socket's
        // message hooks (EBUSY): that socket is simply never injected.
        if CLIENT_SOCKS.update(&mut key, ops, BPF_NOEXIST).is_err() {
            count(Counter::SockhashRefused);
        }
    }
    1
}

/// Verdict on what the client sockets receive: always pass it to the socket itself.
///
/// It changes nothing in the data and is there for its side effect. On kernels with the
/// sockmap FIONREAD change (Linux commit 929e30f93125, in 6.6.128+, 6.12.75+, 6.18.14+ and
/// 6.19+), a socket that is in a sockhash without a verdict program answers `ioctl(FIONREAD)`
/// with 0 whatever it holds, and its readiness wakeups can be lost: nginx proxying to an
/// upstream stops reading a response, epoll-driven clients stall. With a verdict program the
/// kernel moves received data to the socket's psock queue, which FIONREAD, poll and recvmsg all
/// see. The agent checks this on a loopback socket of its own before it attaches sock_ops.
/// (Correcting FIONREAD at the ioctl's exit instead, with bpf_probe_write_user, is not possible
/// under kernel lockdown, as on the platform tapwire is built on.)
///
/// The psock queue is freed when the socket leaves the sockhash, so the sockhash is pinned and
/// outlives the agent (agent/src/capture/pin.rs): a stopped or killed tapwire never takes
/// received data with it.
#[stream_verdict]
pub fn client_receive(_ctx: SkBuffContext) -> u32 {
    SK_PASS
}

/// sk_msg on the client sockets: insert `traceparent` into a request head that lacks one.
#[sk_msg]
pub fn inject_traceparent(ctx: SkMsgContext) -> u32 {
    try_inject(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_inject(ctx: &SkMsgContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: read of a load-time constant.
    if (pid_tgid >> 32) as u32 == unsafe { core::ptr::read_volatile(&AGENT_TGID) } {
        return;
    }
    // Only sends inside a syscall of a selected thread (its entry probe stored the syscall).
    // SAFETY: the fields are copied out at once.
    let Some((direction, pipelined, enter_ns)) =
        unsafe { INFLIGHT.get(&pid_tgid) }.map(|i| (i.direction, i.pipelined, i.enter_ns))
    else {
        return;
    };
    // The entry is written by the send's own entry probe, microseconds ago. An old one is left
    // from a syscall whose exit probe never ran: tapwire stopped while this sockhash (pinned)
    // lives on, and no request is injected any more.
    if unsafe { bpf_ktime_get_ns() }.wrapping_sub(enter_ns) > STALE_NS {
        return;
    }
    if direction != DIR_EGRESS || SEND_CTX.get_ptr(&pid_tgid).is_some() {
        return; // not a send, or a later chunk of a send already handled
    }
    let size = ctx.size() as usize;
    let len = if size < SCAN_BYTES { size } else { SCAN_BYTES };
    if len < 16 {
        count(Counter::InjectSkipNotHttp);
        return;
    }
    let Some(buf) = MSG_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU buffer owned by this invocation.
    let buf = unsafe { &mut *buf };
    // Make the first `len` bytes contiguous, then copy them out to scan them.
    // SAFETY: msg is the program's context.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, len as u32, 0) } != 0 {
        count(Counter::InjectFailed);
        return;
    }
    let data = ctx.data();
    if data + len > ctx.data_end() {
        count(Counter::InjectSkipSplit);
        return;
    }
    // SAFETY: len <= SCAN_BYTES < the buffer; the source range was just checked.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(
            buf.as_mut_ptr().cast(),
            (len & (SCAN_BYTES * 2 - 1)) as u32,
            data as *const core::ffi::c_void,
        )
    };
    if rc != 0 {
        count(Counter::InjectFailed);
        return;
    }
    if !context::is_request_start([buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]]) {
        count(Counter::InjectSkipNotHttp);
        return;
    }
    let scan = context::scan_head(context::BUF_MSG, len);
    if scan.traceparent != 0 {
        count(Counter::InjectSkipHasHeader);
        return;
    }
    if scan.line_end == 0 || scan.head_end == 0 {
        count(Counter::InjectSkipSplit);
        return;
    }
    let line_end = scan.line_end as usize & (SCAN_BYTES - 1);
    let head_end = scan.head_end as usize & (2 * SCAN_BYTES - 1);
    if pipelined != 0 || starts_another_request(buf, len, head_end) {
        count(Counter::InjectSkipPipelined);
        return;
    }
    let mut trace = context::client_request(pid_tgid, false);
    let mut line = [0u8; LINE_LEN];
    render(&trace, &mut line);
    if ctx.push_data(line_end as u32, LINE_LEN as u32, 0).is_err() {
        count(Counter::InjectFailed);
        let _ = SEND_CTX.insert(&pid_tgid, &trace, 0); // the context stands; only the header is missing
        return;
    }
    if !write_line(ctx, line_end, &line) {
        // Undo the insertion rather than send bytes that are not the header.
        let _ = ctx.pop_data(line_end as u32, LINE_LEN as u32, 0);
        count(Counter::InjectFailed);
        let _ = SEND_CTX.insert(&pid_tgid, &trace, 0);
        return;
    }
    trace.inject = INJECT_DONE;
    let _ = SEND_CTX.insert(&pid_tgid, &trace, 0);
    count(Counter::Injected);
}

/// Whether the bytes after the head begin a second request (pipelining in one send).
#[inline(always)]
fn starts_another_request(buf: &[u8; 2 * MAX_PAYLOAD], len: usize, head_end: usize) -> bool {
    if head_end + 8 > len {
        return false;
    }
    let at = |k: usize| buf[(head_end + k) & (2 * MAX_PAYLOAD - 1)];
    context::is_request_start([at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7)])
}

/// The header line for `trace`.
#[inline(always)]
fn render(trace: &TraceCtx, line: &mut [u8; LINE_LEN]) {
    line[..16].copy_from_slice(PREFIX);
    for k in 0..16 {
        line[16 + 2 * k] = HEX[(trace.trace_id[k] >> 4) as usize];
        line[17 + 2 * k] = HEX[(trace.trace_id[k] & 15) as usize];
    }
    line[48] = b'-';
    for k in 0..8 {
        line[49 + 2 * k] = HEX[(trace.span_id[k] >> 4) as usize];
        line[50 + 2 * k] = HEX[(trace.span_id[k] & 15) as usize];
    }
    line[65] = b'-';
    let flags = trace.flags as u8;
    line[66] = HEX[(flags >> 4) as usize];
    line[67] = HEX[(flags & 15) as usize];
    line[68] = b'\r';
    line[69] = b'\n';
}

/// Writes `line` over the bytes just pushed at `start`.
#[inline(always)]
fn write_line(ctx: &SkMsgContext, start: usize, line: &[u8; LINE_LEN]) -> bool {
    // SAFETY: msg is the program's context.
    if unsafe { bpf_msg_pull_data(ctx.msg, start as u32, (start + LINE_LEN) as u32, 0) } != 0 {
        return false;
    }
    let data = ctx.data();
    if data + LINE_LEN > ctx.data_end() {
        return false;
    }
    let p = data as *mut u8;
    for (k, b) in line.iter().enumerate() {
        // SAFETY: k < LINE_LEN and data + LINE_LEN <= data_end was checked above.
        unsafe { *p.add(k) = *b };
    }
    true
}
