//! Ring-buffer records decoded into typed events.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tapwire_common::{
    CTX_CLIENT, CTX_SERVER, DIR_EGRESS, EventHeader, EventKind, HEADER_LEN, INJECT_DONE, PARENT_APP_HEADER,
    PARENT_HEADER, PARENT_PROCESS, PARENT_THREAD, ROLE_CLIENT, ROLE_SERVER, SockInfo, Syscall, TraceCtx,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the process read from the socket.
    Ingress,
    /// Bytes the process wrote to the socket.
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Unknown,
    /// The watched process opened the connection.
    Client,
    /// The watched process accepted the connection.
    Server,
}

/// Local and peer endpoints of a TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Fields common to every event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    /// Kernel `struct sock` address: the connection's identity while it is open.
    pub sock: u64,
    pub fd: i32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataEvent {
    pub origin: Origin,
    pub direction: Direction,
    pub syscall: Syscall,
    /// Bytes the syscall moved; `payload` holds only the first `payload.len()` of them.
    pub total_len: u32,
    pub payload: Vec<u8>,
    pub role: Role,
    pub endpoints: Option<Endpoints>,
    /// Trace context the kernel decided for the request this event starts, if it starts one.
    pub trace: Option<KernelTrace>,
}

/// Where the parent of a span with kernel-decided ids comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentSource {
    /// No parent: the span starts a trace.
    None,
    /// SERVER span: the request's own `traceparent`.
    Header,
    /// CLIENT span: the one server request in flight on the sending thread.
    Thread,
    /// CLIENT span: the one server request in flight in the sending process.
    Process,
    /// CLIENT span: the application sent its own `traceparent`; its ids win.
    AppHeader,
}

impl ParentSource {
    /// Every source, in declaration order (the agent's counters index by `source as usize`).
    pub const ALL: [ParentSource; 5] =
        [ParentSource::None, ParentSource::Header, ParentSource::Thread, ParentSource::Process, ParentSource::AppHeader];

    /// Label value for the agent's own metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ParentSource::None => "none",
            ParentSource::Header => "header",
            ParentSource::Thread => "thread",
            ParentSource::Process => "process",
            ParentSource::AppHeader => "application",
        }
    }
}

/// Ids the kernel drew for a SERVER or CLIENT span, known there before the span's request was
/// sent on, so that the `traceparent` it injected names exactly this span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelTrace {
    pub side: Role,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The parent span (from the header for SERVER spans, the in-flight server request for
    /// CLIENT spans); `None` when `source` is `None`.
    pub parent_span_id: Option<[u8; 8]>,
    pub source: ParentSource,
    pub flags: u8,
    /// The kernel inserted `traceparent` into this request.
    pub injected: bool,
}

impl KernelTrace {
    fn decode(t: &TraceCtx) -> Option<KernelTrace> {
        let side = match t.kind {
            CTX_SERVER => Role::Server,
            CTX_CLIENT => Role::Client,
            _ => return None,
        };
        let source = match t.source {
            PARENT_HEADER => ParentSource::Header,
            PARENT_THREAD => ParentSource::Thread,
            PARENT_PROCESS => ParentSource::Process,
            PARENT_APP_HEADER => ParentSource::AppHeader,
            _ => ParentSource::None,
        };
        if t.trace_id == [0; 16] || t.span_id == [0; 8] {
            return None;
        }
        let parent = (t.parent_span_id != [0; 8]).then_some(t.parent_span_id);
        Some(KernelTrace {
            side,
            trace_id: t.trace_id,
            span_id: t.span_id,
            parent_span_id: parent,
            source: if parent.is_none() && source != ParentSource::AppHeader { ParentSource::None } else { source },
            flags: t.flags as u8,
            injected: t.inject == INJECT_DONE,
        })
    }
}

/// TCP-level trouble on a connection of a watched process (kernel context: `origin.tid` is 0,
/// `origin.pid` and `origin.cgroup_id` are those of the process that last used the socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEventKind {
    Retransmit,
    ResetSent,
    ResetReceived,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Data(DataEvent),
    Close(Origin),
    Tcp { origin: Origin, kind: TcpEventKind, endpoints: Option<Endpoints> },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than the {HEADER_LEN}-byte event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown syscall number {0}")]
    UnknownSyscall(u32),
    #[error("payload length {captured} exceeds the record ({available} bytes) or the total ({total})")]
    BadLength { captured: u32, available: usize, total: u32 },
}

impl Event {
    /// Decodes one ring-buffer record. Never panics, whatever the bytes.
    pub fn decode(record: &[u8]) -> Result<Event, DecodeError> {
        if record.len() < HEADER_LEN {
            return Err(DecodeError::Short(record.len()));
        }
        // SAFETY: EventHeader is plain old data and the record holds at least HEADER_LEN bytes;
        // read_unaligned copes with any alignment of the ring-buffer slice.
        let h: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let origin = Origin {
            pid: h.pid,
            tid: h.tid,
            cgroup_id: h.cgroup_id,
            sock: h.sock,
            fd: h.fd,
            ts_ns: h.ts_ns,
        };
        match EventKind::from_u32(h.kind) {
            Some(EventKind::Close) => Ok(Event::Close(origin)),
            Some(k @ (EventKind::TcpRetransmit | EventKind::TcpResetSent | EventKind::TcpResetReceived)) => Ok(Event::Tcp {
                origin,
                kind: match k {
                    EventKind::TcpRetransmit => TcpEventKind::Retransmit,
                    EventKind::TcpResetSent => TcpEventKind::ResetSent,
                    _ => TcpEventKind::ResetReceived,
                },
                endpoints: endpoints(&h.sock_info),
            }),
            Some(EventKind::Data) => {
                let syscall = Syscall::from_u32(h.syscall).ok_or(DecodeError::UnknownSyscall(h.syscall))?;
                let available = record.len() - HEADER_LEN;
                if h.captured_len as usize > available || h.captured_len > h.total_len {
                    return Err(DecodeError::BadLength {
                        captured: h.captured_len,
                        available,
                        total: h.total_len,
                    });
                }
                let payload = record[HEADER_LEN..HEADER_LEN + h.captured_len as usize].to_vec();
                Ok(Event::Data(DataEvent {
                    origin,
                    direction: if h.direction == DIR_EGRESS { Direction::Egress } else { Direction::Ingress },
                    syscall,
                    total_len: h.total_len,
                    payload,
                    role: match h.sock_info.role {
                        ROLE_CLIENT => Role::Client,
                        ROLE_SERVER => Role::Server,
                        _ => Role::Unknown,
                    },
                    endpoints: endpoints(&h.sock_info),
                    trace: KernelTrace::decode(&h.trace),
                }))
            }
            None => Err(DecodeError::UnknownKind(h.kind)),
        }
    }

    pub fn origin(&self) -> &Origin {
        match self {
            Event::Data(d) => &d.origin,
            Event::Close(o) => o,
            Event::Tcp { origin, .. } => origin,
        }
    }
}

/// Endpoints from the kernel's view of the socket, `None` when it never reported them.
pub fn endpoints(info: &SockInfo) -> Option<Endpoints> {
    let ip = |a: &[u8; 16]| -> Option<IpAddr> {
        match info.family as i32 {
            libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
            libc::AF_INET6 => {
                let v6 = Ipv6Addr::from(*a);
                // An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d; report it as IPv4.
                Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
            }
            _ => None,
        }
    };
    Some(Endpoints {
        local: SocketAddr::new(ip(&info.saddr)?, info.sport),
        peer: SocketAddr::new(ip(&info.daddr)?, info.dport),
    })
}

/// Encodes an event the way the kernel lays it out. Used by tests, golden files and fuzzing.
pub fn encode(header: &EventHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // SAFETY: EventHeader is repr(C) plain old data without padding holes.
    let bytes = unsafe { std::slice::from_raw_parts((header as *const EventHeader).cast::<u8>(), HEADER_LEN) };
    out.extend_from_slice(bytes);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapwire_common::{DIR_INGRESS, ROLE_UNKNOWN};

    fn header(kind: u32, total: u32, captured: u32) -> EventHeader {
        let mut info = SockInfo::EMPTY;
        info.family = libc::AF_INET as u16;
        info.role = ROLE_SERVER;
        info.sport = 8000;
        info.dport = 41234;
        info.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        info.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        EventHeader {
            kind,
            direction: DIR_INGRESS,
            pid: 42,
            tid: 43,
            cgroup_id: 7,
            sock: 0xffff_8881_0000_1000,
            ts_ns: 123_456_789,
            total_len: total,
            captured_len: captured,
            fd: 5,
            syscall: Syscall::Recvfrom as u32,
            sock_info: info,
            trace: TraceCtx::EMPTY,
        }
    }

    #[test]
    fn kernel_trace_context_decodes() {
        let payload = b"GET / HTTP/1.1\r\n";
        let mut h = header(EventKind::Data as u32, 16, 16);
        let Event::Data(d) = Event::decode(&encode(&h, payload)).unwrap() else { panic!("not data") };
        assert_eq!(d.trace, None, "no context decided");
        h.trace = TraceCtx {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            parent_span_id: [0x02; 8],
            kind: CTX_CLIENT,
            source: PARENT_THREAD,
            flags: 1,
            inject: INJECT_DONE,
        };
        let Event::Data(d) = Event::decode(&encode(&h, payload)).unwrap() else { panic!("not data") };
        assert_eq!(
            d.trace,
            Some(KernelTrace {
                side: Role::Client,
                trace_id: [0xab; 16],
                span_id: [0x01; 8],
                parent_span_id: Some([0x02; 8]),
                source: ParentSource::Thread,
                flags: 1,
                injected: true,
            })
        );
        // A root span: no parent, whatever the source field says; zero ids are no context.
        h.trace.parent_span_id = [0; 8];
        let Event::Data(d) = Event::decode(&encode(&h, payload)).unwrap() else { panic!("not data") };
        assert_eq!(d.trace.map(|t| (t.parent_span_id, t.source)), Some((None, ParentSource::None)));
        h.trace.span_id = [0; 8];
        let Event::Data(d) = Event::decode(&encode(&h, payload)).unwrap() else { panic!("not data") };
        assert_eq!(d.trace, None);
    }

    #[test]
    fn data_event_round_trips() {
        let payload = b"GET / HTTP/1.1\r\n";
        let rec = encode(&header(EventKind::Data as u32, 100, payload.len() as u32), payload);
        let Event::Data(d) = Event::decode(&rec).unwrap() else { panic!("not a data event") };
        assert_eq!(d.origin, Origin { pid: 42, tid: 43, cgroup_id: 7, sock: 0xffff_8881_0000_1000, fd: 5, ts_ns: 123_456_789 });
        assert_eq!(d.direction, Direction::Ingress);
        assert_eq!(d.syscall, Syscall::Recvfrom);
        assert_eq!(d.total_len, 100);
        assert_eq!(d.payload, payload);
        assert_eq!(d.role, Role::Server);
        let ep = d.endpoints.unwrap();
        assert_eq!(ep.local, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(ep.peer, "127.0.0.2:41234".parse().unwrap());
    }

    #[test]
    fn close_event_decodes() {
        let rec = encode(&header(EventKind::Close as u32, 0, 0), &[]);
        assert!(matches!(Event::decode(&rec).unwrap(), Event::Close(o) if o.fd == 5 && o.pid == 42));
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        assert_eq!(Event::decode(&[0u8; 10]), Err(DecodeError::Short(10)));
        let rec = encode(&header(99, 0, 0), &[]);
        assert_eq!(Event::decode(&rec), Err(DecodeError::UnknownKind(99)));
        // Claims more payload than the record carries.
        let rec = encode(&header(EventKind::Data as u32, 100, 50), b"short");
        assert!(matches!(Event::decode(&rec), Err(DecodeError::BadLength { captured: 50, available: 5, total: 100 })));
        // Captured more than the syscall moved.
        let rec = encode(&header(EventKind::Data as u32, 2, 5), b"hello");
        assert!(matches!(Event::decode(&rec), Err(DecodeError::BadLength { .. })));
        let mut h = header(EventKind::Data as u32, 1, 0);
        h.syscall = 77;
        assert_eq!(Event::decode(&encode(&h, &[])), Err(DecodeError::UnknownSyscall(77)));
        // Every truncation of a valid record fails cleanly.
        let rec = encode(&header(EventKind::Data as u32, 4, 4), b"abcd");
        for n in 0..rec.len() {
            let _ = Event::decode(&rec[..n]);
        }
    }

    #[test]
    fn endpoints_for_ipv6_and_mapped_ipv4() {
        let mut info = SockInfo::EMPTY;
        info.family = libc::AF_INET6 as u16;
        info.sport = 443;
        info.dport = 5000;
        info.saddr = std::net::Ipv6Addr::LOCALHOST.octets();
        info.daddr = std::net::Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
        let ep = endpoints(&info).unwrap();
        assert_eq!(ep.local, "[::1]:443".parse().unwrap());
        assert_eq!(ep.peer, "10.0.0.1:5000".parse().unwrap());
        info.family = 0;
        info.role = ROLE_UNKNOWN;
        assert_eq!(endpoints(&info), None);
    }
}
