//! syscalls:sys_enter_* / sys_exit_* tracepoints for the data path and close().

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tapwire_common::{
    Counter, DIR_EGRESS, DIR_INGRESS, EventKind, HEADER_LEN, MAX_PAYLOAD, ROLE_CLIENT, ROLE_SERVER,
    SockInfo, Syscall, TraceCtx, WAKEUP_BYTES,
};

use crate::{
    context::{self, CLIENT_PENDING},
    maps::{
        EVENTS, FD_SOCKS, INFLIGHT, Inflight, OWNERS, Owner, PAYLOAD_CAP, SCRATCH, SEND_CTX, SOCKS, Scratch, count,
        selected,
    },
};

/// bpf_ringbuf_query / bpf_ringbuf_output flags (uapi bpf.h).
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Offsets in the syscalls:* tracepoint records (see .../events/syscalls/*/format).
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

/// iovecs followed per vectored syscall: enough for HTTP heads and chunk framing that
/// servers write as several pieces (Node writes `size`, CRLF, data, CRLF in one writev).
const MAX_IOVECS: u64 = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Stores the syscall's fd and buffer arguments for the exit probe, if the thread is selected.
#[inline(always)]
fn enter(ctx: &TracePointContext, syscall: Syscall, direction: u32) -> u32 {
    if !selected() {
        return 0;
    }
    // SAFETY: offsets from the tracepoint format; read_at uses bpf_probe_read_kernel.
    let (fd, arg, count_arg) = unsafe {
        (
            ctx.read_at::<i64>(ARG0).unwrap_or(-1),
            ctx.read_at::<u64>(ARG1).unwrap_or(0),
            ctx.read_at::<u64>(ARG2).unwrap_or(0),
        )
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    // A send on a client connection that still waits for a response is pipelined: the sk_msg
    // program must leave it alone. The socket is known from earlier traffic on the fd (a
    // connection's first request cannot be pipelined).
    let mut pipelined = 0;
    if direction == DIR_EGRESS {
        let key = (pid_tgid & 0xffff_ffff_0000_0000) | (fd as u64 & 0xffff_ffff);
        // SAFETY: values are copied immediately.
        if let Some(sock) = unsafe { FD_SOCKS.get(&key) }.copied()
            && CLIENT_PENDING.get_ptr(&sock).is_some()
        {
            pipelined = 1;
        }
    }
    let inflight = Inflight {
        syscall: syscall as u32,
        direction,
        fd,
        arg,
        count: count_arg,
        sock: 0,
        enter_ns: unsafe { bpf_ktime_get_ns() },
        pipelined,
        _pad: 0,
    };
    if INFLIGHT.insert(&pid_tgid, &inflight, 0).is_err() {
        count(Counter::InflightMapFull);
    }
    0
}

/// Where the bytes of this syscall live in user memory: an iovec array and its length. Plain
/// buffers are one iovec; `None` when there is nothing to copy (sendfile).
#[inline(always)]
fn iovecs(inflight: &Inflight, ret: u64) -> Option<(u64, u64, Option<Iovec>)> {
    match inflight.syscall {
        s if s == Syscall::Readv as u32 || s == Syscall::Writev as u32 => Some((inflight.arg, inflight.count, None)),
        s if s == Syscall::Recvmsg as u32 || s == Syscall::Sendmsg as u32 => {
            // struct user_msghdr: msg_name, msg_namelen (+pad), msg_iov at 16, msg_iovlen at 24.
            // SAFETY: user pointers read through the helper, which fails safely on bad addresses.
            let iov = unsafe { bpf_probe_read_user((inflight.arg + 16) as *const u64).ok()? };
            let len = unsafe { bpf_probe_read_user((inflight.arg + 24) as *const u64).ok()? };
            Some((iov, len, None))
        }
        s if s == Syscall::Sendfile as u32 => None,
        _ => Some((0, 1, Some(Iovec { base: inflight.arg, len: ret }))),
    }
}

/// Copies up to `want` bytes from the syscall's buffers into `payload`. Returns the bytes
/// copied, or `None` when a copy from user memory failed.
#[inline(always)]
fn copy_payload(inflight: &Inflight, ret: u64, want: u64, payload: &mut [u8; 2 * MAX_PAYLOAD]) -> Option<u64> {
    let (array, n_iov, single) = iovecs(inflight, ret)?;
    let mut off: u64 = 0;
    for i in 0..MAX_IOVECS {
        if i >= n_iov || off >= want {
            break;
        }
        let v = match single {
            Some(v) => v,
            // SAFETY: user pointer read through the helper.
            None => unsafe { bpf_probe_read_user((array + i * 16) as *const Iovec).ok()? },
        };
        let mut n = want - off;
        if v.len < n {
            n = v.len;
        }
        if n > MAX_PAYLOAD as u64 {
            n = MAX_PAYLOAD as u64;
        }
        // off < want <= MAX_PAYLOAD: the mask only shows the verifier the bound, and the buffer
        // is twice MAX_PAYLOAD so that offset + length always fits.
        let at = (off & (MAX_PAYLOAD as u64 - 1)) as usize;
        // SAFETY: at + n <= 2 * MAX_PAYLOAD; the helper checks the user pointer.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                payload.as_mut_ptr().add(at).cast(),
                n as u32,
                v.base as *const core::ffi::c_void,
            )
        };
        if rc != 0 {
            return None;
        }
        off += n;
    }
    Some(off)
}

/// Emits a data event for a finished syscall that moved bytes on a TCP socket.
#[inline(always)]
fn exit(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the entry is copied out before it is removed.
    let Some(inflight) = (unsafe { INFLIGHT.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = INFLIGHT.remove(&pid_tgid);
    if inflight.sock == 0 {
        return 0; // not a TCP socket
    }
    // SAFETY: offset from the tracepoint format.
    let ret = unsafe { ctx.read_at::<i64>(RET).unwrap_or(-1) };
    if ret <= 0 {
        return 0;
    }
    let ts = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let tgid = (pid_tgid >> 32) as u32;
    let _ = FD_SOCKS.insert(&((u64::from(tgid) << 32) | (inflight.fd as u64 & 0xffff_ffff)), &inflight.sock, 0);
    // Entries are not removed at close: the RST of a close with unread data comes after it.
    // They age out of the LRU map, and a reused `struct sock` address is overwritten here.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is compared immediately.
    let known = unsafe { OWNERS.get(&inflight.sock) }.is_some_and(|o| o.pid == tgid && o.cgroup_id == cgroup_id);
    if !known {
        let _ = OWNERS.insert(&inflight.sock, &Owner { pid: tgid, _pad: 0, cgroup_id }, 0);
    }

    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch owned by this program invocation.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    let ret = ret as u64;
    // SAFETY: read of a load-time constant.
    let mut want = u64::from(unsafe { core::ptr::read_volatile(&PAYLOAD_CAP) });
    if ret < want {
        want = ret;
    }
    if want > MAX_PAYLOAD as u64 {
        want = MAX_PAYLOAD as u64;
    }
    let captured = match copy_payload(&inflight, ret, want, &mut scratch.payload) {
        Some(n) => n,
        None => {
            count(Counter::PayloadReadFailed);
            0
        }
    };
    // Writes are stamped when they start and reads when they return: on loopback the peer can
    // read the bytes before write() returns, and a span must never end after the one it caused.
    let ts = if inflight.direction == DIR_EGRESS { inflight.enter_ns } else { ts };
    fill_header(&mut scratch.header, EventKind::Data, inflight.direction, pid_tgid, inflight.sock, ts);
    scratch.header.total_len = if ret > u64::from(u32::MAX) { u32::MAX } else { ret as u32 };
    scratch.header.captured_len = captured as u32;
    scratch.header.fd = inflight.fd as i32;
    scratch.header.syscall = inflight.syscall;
    tapwire_trace_context(pid_tgid, inflight.sock, inflight.direction, captured as u32);
    output(scratch, captured as usize)
}

/// Sets the trace context of the event assembled in the scratch space: that of the request
/// this syscall starts, if it starts one (see context.rs); also keeps the books of requests in
/// flight. A global function, so the verifier checks it once on its own rather than once for
/// every path through the payload copy that precedes it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tapwire_trace_context(pid_tgid: u64, sock: u64, direction: u32, captured: u32) -> u32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch owned by the calling program invocation.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    let captured = (captured as usize) & (2 * MAX_PAYLOAD - 1);
    scratch.header.trace = trace_context(sock, direction, pid_tgid, scratch, captured);
    0
}

#[inline(always)]
fn trace_context(sock: u64, direction: u32, pid_tgid: u64, scratch: &Scratch, captured: usize) -> TraceCtx {
    let p = &scratch.payload;
    let starts_request = captured >= 8 && context::is_request_start([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
    match (scratch.header.sock_info.role, direction) {
        (ROLE_SERVER, DIR_INGRESS) => {
            if starts_request && !context::server_request_in_flight(sock) {
                return context::server_request(sock, pid_tgid, p, captured);
            }
        }
        // The response starts: the request is no longer in flight.
        (ROLE_SERVER, _) => context::server_request_done(sock),
        (ROLE_CLIENT, DIR_EGRESS) => {
            // SAFETY: the value is copied before the entry is removed.
            if let Some(trace) = unsafe { SEND_CTX.get(&pid_tgid) }.copied() {
                // Decided (and injected) by the sk_msg program during this send.
                let _ = SEND_CTX.remove(&pid_tgid);
                let _ = CLIENT_PENDING.insert(&sock, &1, 0);
                return trace;
            }
            if starts_request && CLIENT_PENDING.get_ptr(&sock).is_none() {
                let _ = CLIENT_PENDING.insert(&sock, &1, 0);
                return context::client_request(pid_tgid, context::has_traceparent(captured));
            }
        }
        (ROLE_CLIENT, _) => {
            let _ = CLIENT_PENDING.remove(&sock);
        }
        _ => {}
    }
    TraceCtx::EMPTY
}

#[inline(always)]
pub(crate) fn fill_header(
    h: &mut tapwire_common::EventHeader,
    kind: EventKind,
    direction: u32,
    pid_tgid: u64,
    sock: u64,
    ts: u64,
) {
    h.kind = kind as u32;
    h.direction = direction;
    h.pid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.sock = sock;
    h.ts_ns = ts;
    h.total_len = 0;
    h.captured_len = 0;
    h.fd = -1;
    h.syscall = 0;
    h.trace = TraceCtx::EMPTY;
    // SAFETY: the value is copied immediately.
    h.sock_info = match unsafe { SOCKS.get(&sock) } {
        Some(info) => *info,
        None => SockInfo::EMPTY,
    };
}

/// Copies header + `payload_len` payload bytes from the scratch space into the ring buffer.
#[inline(always)]
pub(crate) fn output(scratch: &Scratch, payload_len: usize) -> u32 {
    let mut len = HEADER_LEN + payload_len;
    if len > HEADER_LEN + MAX_PAYLOAD {
        len = HEADER_LEN + MAX_PAYLOAD;
    }
    // SAFETY: len <= size_of::<Scratch>(); the slice lives in the per-CPU map value.
    let bytes = unsafe { core::slice::from_raw_parts((scratch as *const Scratch).cast::<u8>(), len) };
    // Waking the agent for every record costs a context switch per syscall; it drains the ring
    // on a short timer instead, and is woken early only when a backlog builds up.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= u64::from(WAKEUP_BYTES) { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    match EVENTS.output::<[u8]>(bytes, flags) {
        Ok(()) => count(Counter::EventsEmitted),
        Err(_) => count(Counter::RingbufFull),
    }
    0
}

macro_rules! data_syscall {
    ($enter:ident, $exit:ident, $syscall:expr, $dir:expr) => {
        /// syscalls:sys_enter_* of a data syscall: remember fd and buffer for the exit probe.
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter(&ctx, $syscall, $dir)
        }
        /// syscalls:sys_exit_* of a data syscall: emit the bytes moved on a TCP socket.
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit(&ctx)
        }
    };
}

data_syscall!(sys_enter_read, sys_exit_read, Syscall::Read, DIR_INGRESS);
data_syscall!(sys_enter_write, sys_exit_write, Syscall::Write, DIR_EGRESS);
data_syscall!(sys_enter_readv, sys_exit_readv, Syscall::Readv, DIR_INGRESS);
data_syscall!(sys_enter_writev, sys_exit_writev, Syscall::Writev, DIR_EGRESS);
data_syscall!(sys_enter_recvfrom, sys_exit_recvfrom, Syscall::Recvfrom, DIR_INGRESS);
data_syscall!(sys_enter_sendto, sys_exit_sendto, Syscall::Sendto, DIR_EGRESS);
data_syscall!(sys_enter_recvmsg, sys_exit_recvmsg, Syscall::Recvmsg, DIR_INGRESS);
data_syscall!(sys_enter_sendmsg, sys_exit_sendmsg, Syscall::Sendmsg, DIR_EGRESS);
data_syscall!(sys_enter_sendfile64, sys_exit_sendfile64, Syscall::Sendfile, DIR_EGRESS);

/// syscalls:sys_enter_close: a selected process closes a socket it used; tell user space so
/// the connection's state is finished (the `struct sock` address may be reused afterwards).
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    if !selected() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: offset from the tracepoint format.
    let fd = unsafe { ctx.read_at::<i64>(ARG0).unwrap_or(-1) };
    let key = ((pid_tgid >> 32) << 32) | (fd as u64 & 0xffff_ffff);
    // SAFETY: the value is copied immediately.
    let Some(sock) = (unsafe { FD_SOCKS.get(&key) }).copied() else { return 0 };
    let _ = FD_SOCKS.remove(&key);
    context::server_request_done(sock);
    let _ = CLIENT_PENDING.remove(&sock);
    let ts = unsafe { bpf_ktime_get_ns() };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch owned by this program invocation.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    fill_header(&mut scratch.header, EventKind::Close, DIR_INGRESS, pid_tgid, sock, ts);
    scratch.header.fd = fd as i32;
    scratch.header.syscall = Syscall::Close as u32;
    output(scratch, 0)
}
