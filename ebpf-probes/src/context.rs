//! Trace context decided in the kernel, so that the ids tapwire exports are known at the moment
//! a watched process sends its next request (and can be injected into it, see inject.rs).
//!
//! - A request a process starts serving (first bytes read on an accepted socket that had no
//!   request in flight) gets its SERVER span's ids here: the trace id and parent of its
//!   `traceparent` header, or a new random trace id; a random span id; the sampled flag.
//! - Each thread and each process keeps the sum of the contexts of the server requests it has
//!   in flight, and how many there are. With exactly one in flight the sum *is* that context,
//!   so the sums stay right whatever order requests start and finish in.
//! - A request the process sends (first bytes written on a connected socket with nothing
//!   unanswered) gets its CLIENT span's ids here: parent = the one server request in flight on
//!   the sending thread, else the one in flight in the process, else none (a new trace). Never
//!   a guess between several.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{Array, LruHashMap},
};
use tapwire_common::{
    CTX_CLIENT, CTX_SERVER, Counter, MAX_PAYLOAD, PARENT_APP_HEADER, PARENT_HEADER, PARENT_NONE, PARENT_PROCESS,
    PARENT_THREAD, SamplerParams, TraceCtx,
};

use crate::maps::count;

const BPF_NOEXIST: u64 = 1;
/// How far into a request head the kernel looks for `traceparent` and the head's end. Headers
/// past this point are not seen (user space sees the same captured bytes).
pub const SCAN_BYTES: usize = 1024;
/// Mask keeping scratch-payload offsets in bounds for the verifier (the buffer is twice
/// MAX_PAYLOAD long, and every offset used is below MAX_PAYLOAD + 64).
const PAYLOAD_MASK: usize = 2 * MAX_PAYLOAD - 1;

/// A server request in flight, by `struct sock` address of its connection.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ServerReq {
    pub ctx: Sum,
    /// Thread that read the request: its sum holds this request until the response starts.
    pub pid_tgid: u64,
}

/// Sum (wrapping) of the contexts of the server requests in flight on a thread or in a
/// process. `writers` and `generation` let a reader see whether an update raced with its read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sum {
    pub count: u64,
    pub trace_hi: u64,
    pub trace_lo: u64,
    pub span: u64,
    pub flags: u64,
    pub writers: u64,
    pub generation: u64,
}

impl Sum {
    const ZERO: Sum = Sum { count: 0, trace_hi: 0, trace_lo: 0, span: 0, flags: 0, writers: 0, generation: 0 };

    fn of(ctx: &TraceCtx) -> Sum {
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&ctx.trace_id[..8]);
        lo.copy_from_slice(&ctx.trace_id[8..]);
        Sum {
            count: 1,
            trace_hi: u64::from_ne_bytes(hi),
            trace_lo: u64::from_ne_bytes(lo),
            span: u64::from_ne_bytes(ctx.span_id),
            flags: u64::from(ctx.flags),
            writers: 0,
            generation: 0,
        }
    }
}

#[map(name = "SERVER_REQS")]
pub static SERVER_REQS: LruHashMap<u64, ServerReq> = LruHashMap::with_max_entries(65536, 0);

/// pid_tgid -> sum for a thread; (tgid << 32) -> sum for a process (no thread has id 0).
#[map(name = "CTX_SUMS")]
pub static CTX_SUMS: LruHashMap<u64, Sum> = LruHashMap::with_max_entries(65536, 0);

/// `struct sock` address -> 1 while a client connection has a request without response.
#[map(name = "CLIENT_PENDING")]
pub static CLIENT_PENDING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "SAMPLER")]
pub static SAMPLER: Array<SamplerParams> = Array::with_max_entries(1, 0);

#[inline(always)]
fn sampler() -> SamplerParams {
    match SAMPLER.get(0) {
        Some(p) => *p,
        None => SamplerParams::DEFAULT,
    }
}

#[inline(always)]
fn random_u64() -> u64 {
    // SAFETY: helper without arguments.
    let (a, b) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let v = (u64::from(a) << 32) | u64::from(b);
    if v == 0 { 1 } else { v }
}

#[inline(always)]
fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_ne_bytes());
    id[8..].copy_from_slice(&random_u64().to_ne_bytes());
    id
}

/// `*p += v` as one atomic instruction (BPF_ATOMIC add; the old value is not fetched).
#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // SAFETY: `p` points into a map value, 8-byte aligned, alive while the program runs.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Adds (`sign` = 1) or removes (`sign` = u64::MAX, i.e. -1) a context from the sum at `key`.
#[inline(always)]
fn update_sum(key: u64, delta: &Sum, sign: u64) {
    let mut p = CTX_SUMS.get_ptr_mut(&key);
    if p.is_none() {
        if sign != 1 {
            return; // evicted: nothing to take away
        }
        let _ = CTX_SUMS.insert(&key, &Sum::ZERO, BPF_NOEXIST);
        p = CTX_SUMS.get_ptr_mut(&key);
    }
    let Some(s) = p else {
        count(Counter::ContextMapFull);
        return;
    };
    // SAFETY: pointers into the map value; each field is updated with an atomic add so that
    // threads of one process on several CPUs never lose an update.
    unsafe {
        add(&raw mut (*s).writers, 1);
        add(&raw mut (*s).count, sign);
        add(&raw mut (*s).trace_hi, delta.trace_hi.wrapping_mul(sign));
        add(&raw mut (*s).trace_lo, delta.trace_lo.wrapping_mul(sign));
        add(&raw mut (*s).span, delta.span.wrapping_mul(sign));
        add(&raw mut (*s).flags, delta.flags.wrapping_mul(sign));
        add(&raw mut (*s).generation, 1);
        add(&raw mut (*s).writers, u64::MAX);
    }
}

/// The one context in flight at `key`, or `None` when there are none, several, or an update
/// raced with this read.
#[inline(always)]
fn single(key: u64) -> Option<Sum> {
    let s = CTX_SUMS.get_ptr(&key)?;
    // SAFETY: volatile reads of a live map value; torn reads are detected through generation/writers.
    unsafe {
        let generation = core::ptr::read_volatile(&raw const (*s).generation);
        if core::ptr::read_volatile(&raw const (*s).writers) != 0 {
            return None;
        }
        let v = core::ptr::read_volatile(s);
        if v.count != 1
            || core::ptr::read_volatile(&raw const (*s).writers) != 0
            || core::ptr::read_volatile(&raw const (*s).generation) != generation
        {
            return None;
        }
        Some(v)
    }
}

/// True when `p` (at least 8 readable bytes) starts with an HTTP/1 request method and a space.
#[inline(always)]
pub fn is_request_start(b: [u8; 8]) -> bool {
    matches!(
        b,
        [b'G', b'E', b'T', b' ', ..]
            | [b'P', b'O', b'S', b'T', b' ', ..]
            | [b'P', b'U', b'T', b' ', ..]
            | [b'H', b'E', b'A', b'D', b' ', ..]
            | [b'D', b'E', b'L', b'E', b'T', b'E', b' ', ..]
            | [b'P', b'A', b'T', b'C', b'H', b' ', ..]
            | [b'O', b'P', b'T', b'I', b'O', b'N', b'S', b' ']
    )
}

#[inline(always)]
fn at(payload: &[u8; 2 * MAX_PAYLOAD], i: usize) -> u8 {
    payload[i & PAYLOAD_MASK]
}

#[inline(always)]
fn lower(c: u8) -> u8 {
    c | 0x20
}

/// `scan_head` reads the payload of the event being assembled...
pub const BUF_EVENT: u32 = 0;
/// ... or the copy of the send the sk_msg program is looking at.
pub const BUF_MSG: u32 = 1;

/// What one pass over a request head found (offsets; 0 = not found).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scan {
    which: u32,
    len: u32,
    /// Just past the request line's CRLF.
    pub line_end: u32,
    /// Just past the blank line ending the head.
    pub head_end: u32,
    /// Just past `traceparent:` (the first one).
    pub traceparent: u32,
    _pad: u32,
}

/// Scans the first `len` bytes (at most SCAN_BYTES) of a buffer for the end of the request
/// line, the end of the head and a `traceparent` header. bpf_loop runs the step as a callback
/// that the verifier checks once, whatever the number of iterations.
#[inline(always)]
pub fn scan_head(which: u32, len: usize) -> Scan {
    let mut scan = Scan {
        which,
        len: if len < SCAN_BYTES { len as u32 } else { SCAN_BYTES as u32 },
        line_end: 0,
        head_end: 0,
        traceparent: 0,
        _pad: 0,
    };
    // SAFETY: the callback only touches `scan`, which outlives the call.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(
            SCAN_BYTES as u32,
            scan_step as *const () as *mut core::ffi::c_void,
            (&raw mut scan).cast(),
            0,
        );
    }
    scan
}

/// One byte of `scan_head`: returns 1 to stop.
#[inline(never)]
extern "C" fn scan_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer scan_head gave it.
    let s = unsafe { &mut *ctx.cast::<Scan>() };
    let i = (index as usize) & (SCAN_BYTES - 1);
    let len = s.len as usize;
    if i + 2 > len {
        return 1;
    }
    let Some(p) = crate::maps::buffer(s.which) else { return 1 };
    let b0 = at(p, i);
    if b0 == b'\r' {
        if at(p, i + 1) == b'\n' {
            if s.line_end == 0 {
                s.line_end = (i + 2) as u32;
            }
            if i + 4 <= len && at(p, i + 2) == b'\r' && at(p, i + 3) == b'\n' {
                s.head_end = (i + 4) as u32;
                return 1;
            }
        }
        return 0;
    }
    if b0 == b'\n' && s.traceparent == 0 && i + 13 <= len {
        let d = (lower(at(p, i + 1)) ^ b't')
            | (lower(at(p, i + 2)) ^ b'r')
            | (lower(at(p, i + 3)) ^ b'a')
            | (lower(at(p, i + 4)) ^ b'c')
            | (lower(at(p, i + 5)) ^ b'e')
            | (lower(at(p, i + 6)) ^ b'p')
            | (lower(at(p, i + 7)) ^ b'a')
            | (lower(at(p, i + 8)) ^ b'r')
            | (lower(at(p, i + 9)) ^ b'e')
            | (lower(at(p, i + 10)) ^ b'n')
            | (lower(at(p, i + 11)) ^ b't')
            | (at(p, i + 12) ^ b':');
        if d == 0 {
            s.traceparent = (i + 13) as u32;
        }
    }
    0
}

/// Offset just past `traceparent:` in the head in `payload[..len]`, if present.
#[inline(always)]
fn find_traceparent(which: u32, len: usize) -> Option<usize> {
    let pos = scan_head(which, len).traceparent as usize & (2 * SCAN_BYTES - 1);
    if pos == 0 { None } else { Some(pos) }
}

#[inline(always)]
fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Parses the value after `traceparent:` at `pos`: version 00, lower-case hex, non-zero ids,
/// nothing but blanks after it on the line (the same rules as user space).
#[inline(always)]
fn parse_traceparent(payload: &[u8; 2 * MAX_PAYLOAD], len: usize, pos: usize) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut p = pos;
    if at(payload, p) == b' ' || at(payload, p) == b'\t' {
        p += 1;
    }
    if p + 56 > len || at(payload, p) != b'0' || at(payload, p + 1) != b'0' || at(payload, p + 2) != b'-' {
        return None;
    }
    let mut trace = [0u8; 16];
    for k in 0..16 {
        trace[k] = (hex(at(payload, p + 3 + 2 * k))? << 4) | hex(at(payload, p + 4 + 2 * k))?;
    }
    if at(payload, p + 35) != b'-' || at(payload, p + 52) != b'-' {
        return None;
    }
    let mut span = [0u8; 8];
    for k in 0..8 {
        span[k] = (hex(at(payload, p + 36 + 2 * k))? << 4) | hex(at(payload, p + 37 + 2 * k))?;
    }
    let flags = (hex(at(payload, p + 53))? << 4) | hex(at(payload, p + 54))?;
    let next = at(payload, p + 55);
    if next != b'\r' && next != b' ' && next != b'\t' {
        return None;
    }
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags))
}

/// First bytes of a request head read on an accepted connection with no request in flight:
/// decides the SERVER span's context and adds it to the thread's and process's sums.
#[inline(always)]
pub fn server_request(sock: u64, pid_tgid: u64, payload: &[u8; 2 * MAX_PAYLOAD], len: usize) -> TraceCtx {
    let mut ctx = TraceCtx::EMPTY;
    ctx.kind = CTX_SERVER;
    let params = sampler();
    let incoming = match find_traceparent(BUF_EVENT, len) {
        Some(pos) => parse_traceparent(payload, len, pos),
        None => None,
    };
    match incoming {
        Some((trace, parent, flags)) => {
            ctx.trace_id = trace;
            ctx.parent_span_id = parent;
            ctx.source = PARENT_HEADER;
            let sampled = if params.parent_based != 0 { flags & 1 != 0 } else { params.keeps(&trace) };
            ctx.flags = u32::from((flags & !1) | u8::from(sampled));
        }
        None => {
            ctx.trace_id = new_trace_id();
            ctx.source = PARENT_NONE;
            ctx.flags = u32::from(params.keeps(&ctx.trace_id));
        }
    }
    ctx.span_id = random_u64().to_ne_bytes();
    let sum = Sum::of(&ctx);
    if SERVER_REQS.insert(&sock, &ServerReq { ctx: sum, pid_tgid }, 0).is_err() {
        count(Counter::ContextMapFull);
        return ctx;
    }
    count(Counter::ServerContexts);
    update_sum(pid_tgid, &sum, 1);
    update_sum(pid_tgid & 0xffff_ffff_0000_0000, &sum, 1);
    ctx
}

/// The server request on this connection is answered (its response starts) or the connection
/// closes: it is no longer in flight.
#[inline(always)]
pub fn server_request_done(sock: u64) {
    // SAFETY: the value is copied before the entry is removed.
    let Some(req) = (unsafe { SERVER_REQS.get(&sock) }).copied() else { return };
    // Only the program that removes the entry takes it out of the sums (a close can race with
    // the response on another CPU).
    if SERVER_REQS.remove(&sock).is_ok() {
        update_sum(req.pid_tgid, &req.ctx, u64::MAX);
        update_sum(req.pid_tgid & 0xffff_ffff_0000_0000, &req.ctx, u64::MAX);
    }
}

/// Whether a server connection has a request in flight.
#[inline(always)]
pub fn server_request_in_flight(sock: u64) -> bool {
    SERVER_REQS.get_ptr(&sock).is_some()
}

/// Decides the CLIENT span's context of a request sent now by `pid_tgid`. With `app_header`
/// the request carries the application's own `traceparent`: user space takes the ids from the
/// header, and the kernel's only say is the parent.
#[inline(always)]
pub fn client_request(pid_tgid: u64, app_header: bool) -> TraceCtx {
    let mut ctx = TraceCtx::EMPTY;
    ctx.kind = CTX_CLIENT;
    let parent = match single(pid_tgid) {
        Some(s) => {
            ctx.source = PARENT_THREAD;
            Some(s)
        }
        None => match single(pid_tgid & 0xffff_ffff_0000_0000) {
            Some(s) => {
                ctx.source = PARENT_PROCESS;
                Some(s)
            }
            None => None,
        },
    };
    match parent {
        Some(s) => {
            ctx.trace_id[..8].copy_from_slice(&s.trace_hi.to_ne_bytes());
            ctx.trace_id[8..].copy_from_slice(&s.trace_lo.to_ne_bytes());
            ctx.parent_span_id = s.span.to_ne_bytes();
            ctx.flags = s.flags as u32;
        }
        None => {
            ctx.trace_id = new_trace_id();
            ctx.flags = u32::from(sampler().keeps(&ctx.trace_id));
        }
    }
    ctx.span_id = random_u64().to_ne_bytes();
    if app_header {
        ctx.source = PARENT_APP_HEADER;
    }
    count(match ctx.source {
        PARENT_THREAD => Counter::ParentThread,
        PARENT_PROCESS => Counter::ParentProcess,
        PARENT_APP_HEADER => Counter::AppTraceparent,
        _ => Counter::Unparented,
    });
    ctx
}

/// Whether the head of the event being assembled (`len` bytes) carries a `traceparent`.
#[inline(always)]
pub fn has_traceparent(len: usize) -> bool {
    find_traceparent(BUF_EVENT, len).is_some()
}
