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
    Counter, DIR_EGRESS, DIR_INGRESS, EventKind, HEADER_LEN, MAX_PAYLOAD, SockInfo, Syscall,
};

use crate::maps::{
    EVENTS, FD_SOCKS, INFLIGHT, Inflight, OWNERS, Owner, PAYLOAD_CAP, SCRATCH, SOCKS, Scratch, count,
    selected,
};

/// Offsets in the syscalls:* tracepoint records (see .../events/syscalls/*/format).
const ARG0: usize = 16;
const ARG1: usize = 24;
const RET: usize = 16;

#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// Stores the syscall's fd and buffer argument for the exit probe, if the thread is selected.
#[inline(always)]
fn enter(ctx: &TracePointContext, syscall: Syscall, direction: u32) -> u32 {
    if !selected() {
        return 0;
    }
    // SAFETY: offsets from the tracepoint format; read_at uses bpf_probe_read_kernel.
    let (fd, arg) = unsafe {
        (ctx.read_at::<i64>(ARG0).unwrap_or(-1), ctx.read_at::<u64>(ARG1).unwrap_or(0))
    };
    let inflight = Inflight { syscall: syscall as u32, direction, fd, arg, sock: 0 };
    if INFLIGHT.insert(&bpf_get_current_pid_tgid(), &inflight, 0).is_err() {
        count(Counter::InflightMapFull);
    }
    0
}

/// Finds the first iovec's buffer and length for the vectored syscalls.
#[inline(always)]
fn first_iovec(iov: u64) -> Option<Iovec> {
    // SAFETY: user pointer read through the helper, which fails safely on bad addresses.
    unsafe { bpf_probe_read_user(iov as *const Iovec).ok() }
}

/// Resolves where the bytes of this syscall live in user memory: (pointer, length available).
#[inline(always)]
fn user_buffer(inflight: &Inflight, ret: u64) -> Option<(u64, u64)> {
    match inflight.syscall {
        s if s == Syscall::Readv as u32 || s == Syscall::Writev as u32 => {
            let v = first_iovec(inflight.arg)?;
            Some((v.base, v.len))
        }
        s if s == Syscall::Recvmsg as u32 || s == Syscall::Sendmsg as u32 => {
            // struct user_msghdr: msg_name, msg_namelen (+pad), msg_iov at offset 16.
            // SAFETY: user pointer read through the helper.
            let iov = unsafe { bpf_probe_read_user((inflight.arg + 16) as *const u64).ok()? };
            let v = first_iovec(iov)?;
            Some((v.base, v.len))
        }
        s if s == Syscall::Sendfile as u32 => Some((0, 0)),
        _ => Some((inflight.arg, ret)),
    }
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
    let mut captured: u64 = 0;
    if let Some((ptr, avail)) = user_buffer(&inflight, ret).filter(|&(_, avail)| avail > 0) {
        // SAFETY: read of a load-time constant.
        let cap = u64::from(unsafe { core::ptr::read_volatile(&PAYLOAD_CAP) });
        let mut n = if ret < avail { ret } else { avail };
        if n > cap {
            n = cap;
        }
        if n > MAX_PAYLOAD as u64 {
            n = MAX_PAYLOAD as u64;
        }
        // SAFETY: n <= MAX_PAYLOAD = the scratch payload size; the helper checks the user pointer.
        let rc = unsafe {
            generated::bpf_probe_read_user(
                scratch.payload.as_mut_ptr().cast(),
                n as u32,
                ptr as *const core::ffi::c_void,
            )
        };
        if rc == 0 {
            captured = n;
        } else {
            count(Counter::PayloadReadFailed);
        }
    } else if inflight.syscall != Syscall::Sendfile as u32 {
        count(Counter::PayloadReadFailed);
    }
    fill_header(&mut scratch.header, EventKind::Data, inflight.direction, pid_tgid, inflight.sock, ts);
    scratch.header.total_len = if ret > u64::from(u32::MAX) { u32::MAX } else { ret as u32 };
    scratch.header.captured_len = captured as u32;
    scratch.header.fd = inflight.fd as i32;
    scratch.header.syscall = inflight.syscall;
    output(scratch, captured as usize)
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
    match EVENTS.output::<[u8]>(bytes, 0) {
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
    let ts = unsafe { bpf_ktime_get_ns() };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU scratch owned by this program invocation.
    let scratch: &mut Scratch = unsafe { &mut *scratch };
    fill_header(&mut scratch.header, EventKind::Close, DIR_INGRESS, pid_tgid, sock, ts);
    scratch.header.fd = fd as i32;
    scratch.header.syscall = Syscall::Close as u32;
    output(scratch, 0)
}
