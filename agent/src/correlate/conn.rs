//! One tracked connection: which side of HTTP the process is on, its two HTTP/1 streams, and
//! the requests waiting for responses.

use std::sync::Arc;

use super::{
    Ctx, Side,
    exchange::{Exchanges, Paired},
    span::{ConnView, Outcome},
};
use crate::{
    capture::event::{DataEvent, Direction, Endpoints, KernelTrace, Role},
    model::{Resource, Span},
    telemetry::Counters,
    protocols::http1::{
        Head, Http1Event, Http1Stream, MessageKind, NoHints, Sniff, Start, sniff_request,
    },
};

/// Whether to keep following a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Stop parsing it: not HTTP/1, given up, or switched protocols.
    Ignore,
}

#[derive(Debug)]
enum Phase {
    /// Role unknown (the connection predates the agent): waiting for a read or write that
    /// starts with an HTTP request. `chunks` counts the ones that did not.
    Pending { chunks: u32 },
    Http(Box<HttpConn>),
    /// Not HTTP/1 (or no longer): events only refresh the entry until the close.
    Ignored,
}

/// A connection of one process, keyed by (pid, struct sock address).
#[derive(Debug)]
pub(crate) struct Conn {
    kernel_role: Role,
    endpoints: Option<Endpoints>,
    resource: Arc<Resource>,
    /// Monotonic ns of the latest event.
    pub last_seen_ns: u64,
    phase: Phase,
}

impl Conn {
    pub fn new(role: Role, endpoints: Option<Endpoints>, resource: Arc<Resource>, ts: u64, ctx: &Ctx) -> Conn {
        let phase = match role {
            Role::Server => Phase::Http(Box::new(HttpConn::new(Side::Server, Start::Fresh, Start::Fresh, ctx))),
            Role::Client => Phase::Http(Box::new(HttpConn::new(Side::Client, Start::Fresh, Start::Fresh, ctx))),
            Role::Unknown => Phase::Pending { chunks: 0 },
        };
        Conn { kernel_role: role, endpoints, resource, last_seen_ns: ts, phase }
    }

    /// False when the event shows that the socket address now belongs to another connection
    /// (the close was missed and the kernel reused the `struct sock`): a known role other than
    /// the one recorded, or known endpoints other than the ones recorded. An event without role
    /// or endpoints says nothing (the kernel forgets sockets in TCP_CLOSE, and its table is LRU).
    pub fn is_same(&self, role: Role, endpoints: Option<Endpoints>) -> bool {
        (role == Role::Unknown || role == self.kernel_role)
            && match (self.endpoints, endpoints) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// The service and the methods of the requests this process has read and not yet answered
    /// (server side only): `http.server.active_requests`.
    pub fn active_server_requests(&self) -> Option<(&Arc<Resource>, impl Iterator<Item = &str>)> {
        match &self.phase {
            Phase::Http(h) if h.side == Side::Server => Some((&self.resource, h.exchanges.methods())),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn is_ignored(&self) -> bool {
        matches!(self.phase, Phase::Ignored)
    }

    /// Bytes held in this connection's head and chunk-line buffers.
    pub fn buffered_bytes(&self) -> usize {
        match &self.phase {
            Phase::Http(h) => h.requests.buffered_bytes() + h.responses.buffered_bytes(),
            _ => 0,
        }
    }

    /// (queue slots, buffered bytes) of this connection, for tests of bounded memory.
    #[cfg(test)]
    pub fn footprint(&self) -> (usize, usize) {
        match &self.phase {
            Phase::Http(h) => (h.exchanges.slots(), h.requests.buffered_bytes() + h.responses.buffered_bytes()),
            _ => (0, 0),
        }
    }

    pub fn on_data(&mut self, d: &DataEvent, ctx: &mut Ctx, out: &mut Vec<Span>) {
        self.last_seen_ns = self.last_seen_ns.max(d.origin.ts_ns);
        if self.endpoints.is_none() {
            self.endpoints = d.endpoints;
        }
        if d.total_len == 0 {
            return;
        }
        if let Phase::Pending { chunks } = &mut self.phase {
            if sniff_request(&d.payload) == Sniff::Yes {
                let side = match d.direction {
                    Direction::Ingress => Side::Server,
                    Direction::Egress => Side::Client,
                };
                // Responses already under way belong to requests we never saw.
                self.phase = Phase::Http(Box::new(HttpConn::new(side, Start::Fresh, Start::MidStream, ctx)));
            } else {
                *chunks += 1;
                if *chunks >= ctx.config.max_unknown_chunks {
                    Counters::inc(&ctx.counters.connections_ignored);
                    self.phase = Phase::Ignored;
                }
                return;
            }
        }
        let Phase::Http(http) = &mut self.phase else { return };
        let view = ConnView { side: http.side, resource: &self.resource, endpoints: self.endpoints };
        if http.on_data(d, &view, ctx, out) == Flow::Ignore {
            Counters::add(&ctx.counters.requests_dropped, http.exchanges.len() as u64);
            Counters::inc(&ctx.counters.connections_ignored);
            self.phase = Phase::Ignored;
        }
    }

    /// The connection is gone (`Outcome::Closed`) or idle (`Outcome::Timeout`): ends the message
    /// in progress and turns every request still waiting into a span.
    pub fn finish(self, outcome: Outcome, ctx: &mut Ctx, out: &mut Vec<Span>) {
        if let Phase::Http(mut http) = self.phase {
            let view = ConnView { side: http.side, resource: &self.resource, endpoints: self.endpoints };
            http.finish(outcome, &view, ctx, out);
        }
    }
}

/// A connection speaking HTTP/1, seen from `side`.
#[derive(Debug)]
struct HttpConn {
    side: Side,
    requests: Http1Stream,
    responses: Http1Stream,
    exchanges: Exchanges,
    /// Exchange id of the request whose body is being read.
    current_request: Option<u64>,
    /// Monotonic ns of the latest data event: the "last seen byte" of unanswered requests.
    last_data_ts: u64,
    /// Kernel trace context of the data event at this time: it belongs to the request whose
    /// head starts in that event, and to no other.
    kernel_trace: Option<(u64, KernelTrace)>,
}

impl HttpConn {
    fn new(side: Side, requests: Start, responses: Start, ctx: &Ctx) -> HttpConn {
        HttpConn {
            side,
            requests: Http1Stream::new(MessageKind::Request, ctx.stream.clone(), requests),
            responses: Http1Stream::new(MessageKind::Response, ctx.stream.clone(), responses),
            exchanges: Exchanges::new(ctx.config.max_pending_requests),
            current_request: None,
            last_data_ts: 0,
            kernel_trace: None,
        }
    }

    fn on_data(&mut self, d: &DataEvent, view: &ConnView<'_>, ctx: &mut Ctx, out: &mut Vec<Span>) -> Flow {
        let ts = d.origin.ts_ns;
        let total = u64::from(d.total_len);
        let to_requests = matches!(
            (self.side, d.direction),
            (Side::Server, Direction::Ingress) | (Side::Client, Direction::Egress)
        );
        let mut events = std::mem::take(&mut ctx.scratch);
        if let Some(t) = d.trace
            && to_requests
            && t.side == match self.side {
                Side::Server => Role::Server,
                Side::Client => Role::Client,
            }
        {
            self.kernel_trace = Some((ts, t));
        }
        if to_requests {
            self.requests.feed(ts, total, &d.payload, &NoHints, &mut events);
        } else {
            self.responses.feed(ts, total, &d.payload, &self.exchanges, &mut events);
        }
        self.last_data_ts = self.last_data_ts.max(ts);
        let mut flow = Flow::Continue;
        for ev in events.drain(..) {
            flow = if to_requests {
                self.on_request_event(ev, view, ctx, out)
            } else {
                self.on_response_event(ev, view, ctx, out)
            };
            if flow == Flow::Ignore {
                break;
            }
        }
        ctx.scratch = events;
        flow
    }

    fn on_request_event(&mut self, ev: Http1Event, view: &ConnView<'_>, ctx: &mut Ctx, out: &mut Vec<Span>) -> Flow {
        match ev {
            Http1Event::Head { head, start_ts } => {
                let Head::Request(request) = *head else { return Flow::Continue };
                if self.responses.is_open_ended() {
                    // The response's own framing could not tell its end: a new request does.
                    let mut ended = Vec::new();
                    self.responses.end_open_ended(&mut ended);
                    for e in ended {
                        self.on_response_event(e, view, ctx, out);
                    }
                }
                let kernel_trace = match self.kernel_trace.take() {
                    Some((ts, t)) if ts == start_ts => Some(t),
                    _ => None,
                };
                if let Some(k) = &kernel_trace
                    && k.side == Role::Server
                {
                    ctx.server_request_started(k);
                }
                self.current_request = self.exchanges.push(Box::new(request), start_ts, kernel_trace);
                if self.current_request.is_none() {
                    ctx.request_dropped(self.exchanges.len());
                }
            }
            Http1Event::Uncaptured { .. } => {
                ctx.parse_failure(None);
                self.exchanges.push_dropped();
                self.current_request = None;
            }
            Http1Event::End { body_bytes, .. } => {
                if let Some(id) = self.current_request.take() {
                    self.exchanges.request_end(id, body_bytes);
                }
            }
            Http1Event::Error(e) => ctx.parse_failure(Some(&e)),
            Http1Event::NotHttp => return Flow::Ignore,
            Http1Event::GaveUp => {
                ctx.gave_up();
                return Flow::Ignore;
            }
            Http1Event::Upgraded => return Flow::Ignore,
        }
        Flow::Continue
    }

    fn on_response_event(&mut self, ev: Http1Event, view: &ConnView<'_>, ctx: &mut Ctx, out: &mut Vec<Span>) -> Flow {
        match ev {
            Http1Event::Head { head, .. } => {
                let Head::Response(response) = *head else { return Flow::Continue };
                if (100..200).contains(&response.status) && response.status != 101 {
                    // Interim (100 Continue, 103 Early Hints): the final response follows.
                    return Flow::Continue;
                }
                if self.exchanges.response_head(Some(Box::new(response))) == Paired::Orphan {
                    Counters::inc(&ctx.counters.responses_orphaned);
                }
            }
            Http1Event::Uncaptured { .. } => {
                ctx.parse_failure(None);
                if self.exchanges.response_head(None) == Paired::Orphan {
                    Counters::inc(&ctx.counters.responses_orphaned);
                }
            }
            Http1Event::End { end_ts, body_bytes, .. } => {
                if let Some(ex) = self.exchanges.response_end(body_bytes) {
                    ctx.emit(view, ex, end_ts, Outcome::Answered, out);
                }
            }
            Http1Event::Error(e) => ctx.parse_failure(Some(&e)),
            Http1Event::GaveUp => {
                ctx.gave_up();
                return Flow::Ignore;
            }
            Http1Event::NotHttp | Http1Event::Upgraded => return Flow::Ignore,
        }
        Flow::Continue
    }

    fn finish(&mut self, outcome: Outcome, view: &ConnView<'_>, ctx: &mut Ctx, out: &mut Vec<Span>) {
        let mut events = Vec::new();
        self.requests.finish(&mut events);
        for ev in events.drain(..) {
            self.on_request_event(ev, view, ctx, out);
        }
        self.responses.finish(&mut events);
        for ev in events.drain(..) {
            self.on_response_event(ev, view, ctx, out);
        }
        for ex in self.exchanges.drain() {
            let outcome = if ex.answered { Outcome::Answered } else { outcome };
            ctx.emit(view, ex, self.last_data_ts, outcome, out);
        }
    }
}
