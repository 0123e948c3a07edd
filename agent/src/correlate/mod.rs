//! From kernel events to spans: per-connection HTTP/1 reassembly, request/response pairing,
//! trace context, span building.
//!
//! Connections are keyed by (pid, `struct sock` address). A connection accepted from a listener
//! yields SERVER spans (requests are what the process reads), one it opened yields CLIENT spans
//! (requests are what it writes). A connection older than the agent is followed from the first
//! read or write that starts with an HTTP request; anything that does not look like HTTP/1 is
//! ignored until it closes. Memory is bounded: the connection table (LRU eviction), the queue of
//! unanswered requests per connection, and the head buffers all have caps, and every loss is
//! counted.

mod conn;
mod exchange;
mod ratelimit;
pub mod route;
mod span;
mod table;
pub(crate) mod trace;

use std::{sync::Arc, time::Duration};

use rand::{SeedableRng, rngs::SmallRng};

use self::{
    conn::Conn,
    exchange::Exchange,
    ratelimit::RateLimit,
    span::{ConnView, Outcome},
    table::LruTable,
};
pub use self::span::REDACTED;
use crate::{
    capture::event::{DataEvent, Event, KernelTrace, Role},
    clock::Clock,
    discover::ResourceLookup,
    model::{Resource, Span},
    protocols::http1::{ParseError, StreamConfig},
    telemetry::Counters,
};

/// Limits of the correlator.
#[derive(Clone, Debug)]
pub struct CorrelateConfig {
    /// Connections tracked at once; past this the least recently used one is forgotten
    /// (counted in `connections_evicted`).
    pub max_connections: usize,
    /// A connection without any event for this long is forgotten; its unanswered requests end
    /// as spans with `error.type = "timeout"`.
    pub idle_timeout: Duration,
    /// Largest incomplete HTTP/1 head buffered per direction; longer is a parse failure.
    pub max_head_bytes: usize,
    /// Unanswered requests kept per connection (pipelining depth); more are counted and dropped.
    pub max_pending_requests: usize,
    /// Reads/writes examined on a connection of unknown role (opened before the agent started)
    /// before it is ignored for not starting an HTTP request.
    pub max_unknown_chunks: u32,
    /// Consecutive parse failures after which a connection is ignored.
    pub max_parse_failures: u32,
    /// User-configured route patterns (`/users/{id}`), tried before the id heuristic.
    pub route_patterns: Vec<route::Pattern>,
    /// Distinct `http.route` values per service; later ones become `route::OVERFLOW_ROUTE`.
    pub max_routes_per_service: usize,
}

impl Default for CorrelateConfig {
    fn default() -> Self {
        CorrelateConfig {
            max_connections: 65536,
            idle_timeout: Duration::from_secs(120),
            max_head_bytes: 16 * 1024,
            max_pending_requests: 64,
            max_unknown_chunks: 256,
            max_parse_failures: 8,
            route_patterns: Vec::new(),
            max_routes_per_service: 500,
        }
    }
}

/// Which side of HTTP the watched process is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Server,
    Client,
}

/// A service and how many requests of each method it has read and not yet answered.
pub type ActiveRequests = (Arc<Resource>, Vec<(String, i64)>);

/// Connection identity: (pid, kernel `struct sock` address).
type ConnKey = (u32, u64);

/// Turns kernel events into spans. Single-threaded: owned by the event loop.
pub struct Correlator {
    table: LruTable<ConnKey, Conn>,
    ctx: Ctx,
}

/// What every connection shares: limits, clock, counters, randomness, log limits.
#[derive(Debug)]
pub(crate) struct Ctx {
    config: CorrelateConfig,
    stream: StreamConfig,
    clock: Clock,
    counters: Arc<Counters>,
    rng: SmallRng,
    /// Reused event buffer.
    scratch: Vec<crate::protocols::http1::Http1Event>,
    log_parse: RateLimit,
    log_drop: RateLimit,
    log_evict: RateLimit,
    log_traceparent: RateLimit,
    routes: route::RouteTable,
    /// Server requests in flight whose ids the kernel drew: span id -> that span's parent.
    /// Tells a CLIENT request's own `traceparent` passed on from one the application made
    /// (see [`trace::kernel_span_ids`]). Bounded: when full it is emptied, and CLIENT spans
    /// fall back to the rule that needs no knowledge of the server request.
    server_parents: crate::FastMap<[u8; 8], Option<[u8; 8]>>,
}

/// Bound of [`Ctx::server_parents`]: far above the requests one node serves at once.
const MAX_SERVER_PARENTS: usize = 65_536;

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Ctx {
    fn parse_failure(&mut self, error: Option<&ParseError>) {
        Counters::inc(&self.counters.parse_failures_http1);
        if let Some(suppressed) = self.log_parse.check() {
            match error {
                Some(e) => tracing::warn!(error = %e, suppressed, "an HTTP/1 message could not be parsed"),
                None => tracing::warn!(suppressed, "an HTTP/1 message head was not captured"),
            }
        }
    }

    fn gave_up(&mut self) {
        if let Some(suppressed) = self.log_parse.check() {
            tracing::warn!(suppressed, "too many HTTP/1 parse failures on a connection: no longer following it");
        }
    }

    /// A server request whose ids the kernel drew has been read (see `server_parents`).
    fn server_request_started(&mut self, k: &KernelTrace) {
        if self.server_parents.len() >= MAX_SERVER_PARENTS {
            self.server_parents.clear();
        }
        self.server_parents.insert(k.span_id, k.parent_span_id);
    }

    fn request_dropped(&mut self, queued: usize) {
        Counters::inc(&self.counters.requests_dropped);
        if let Some(suppressed) = self.log_drop.check() {
            tracing::warn!(queued, suppressed, "too many unanswered requests on a connection: request dropped");
        }
    }

    /// Builds the span of a finished exchange and hands it over.
    fn emit(&mut self, conn: &ConnView<'_>, ex: Exchange, end_ts: u64, outcome: Outcome, out: &mut Vec<Span>) {
        let headers = &ex.request.headers;
        let (ids, invalid) = match ex.kernel_trace {
            Some(k) => {
                self.counters.count_parent(k.source);
                let server_parent = match k.side {
                    Role::Server => {
                        self.server_parents.remove(&k.span_id);
                        None
                    }
                    Role::Client => k.parent_span_id.and_then(|p| self.server_parents.get(&p).copied()),
                    Role::Unknown => None,
                };
                trace::kernel_span_ids(&k, headers.traceparent.as_deref(), headers.tracestate.as_deref(), server_parent)
            }
            None => trace::span_ids(headers.traceparent.as_deref(), headers.tracestate.as_deref(), &mut self.rng),
        };
        if invalid {
            Counters::inc(&self.counters.traceparent_invalid);
            if let Some(suppressed) = self.log_traceparent.check() {
                tracing::debug!(suppressed, "ignored an invalid traceparent header");
            }
        }
        let mut span = span::build(conn, &ex, end_ts, outcome, ids, &self.clock);
        if span.kind == crate::model::SpanKind::Server {
            self.add_route(&mut span);
        }
        out.push(span);
        Counters::inc(&self.counters.spans_created);
    }

    /// Sets `http.route` and names the span `{method} {route}`; never the raw path.
    fn add_route(&mut self, span: &mut Span) {
        let Some(crate::model::Value::Str(path)) = span.attributes.get("url.path") else { return };
        let (route, source) = self.routes.route(&span.resource.service_name, path);
        if source == route::RouteSource::Overflow {
            Counters::inc(&self.counters.routes_overflowed);
        }
        if span.name != "HTTP" {
            span.name = format!("{} {route}", span.name);
        }
        span.attributes.push("http.route", route);
    }
}

impl Correlator {
    /// A correlator with an empty connection table; `clock` maps kernel times to span times,
    /// `counters` receives parse failures, evictions and created spans.
    pub fn new(config: CorrelateConfig, clock: Clock, counters: Arc<Counters>) -> Self {
        let stream = StreamConfig { max_head_bytes: config.max_head_bytes, max_failures: config.max_parse_failures };
        let routes = route::RouteTable::new(config.route_patterns.clone(), config.max_routes_per_service);
        Correlator {
            table: LruTable::new(),
            ctx: Ctx {
                config,
                stream,
                clock,
                counters,
                rng: SmallRng::from_os_rng(),
                scratch: Vec::new(),
                log_parse: RateLimit::new(LOG_EVERY),
                log_drop: RateLimit::new(LOG_EVERY),
                log_evict: RateLimit::new(LOG_EVERY),
                log_traceparent: RateLimit::new(LOG_EVERY),
                routes,
                server_parents: crate::FastMap::default(),
            },
        }
    }

    /// Feeds one kernel event; finished spans are pushed to `out`.
    pub fn on_event(&mut self, event: Event, resources: &mut dyn ResourceLookup, out: &mut Vec<Span>) {
        match event {
            Event::Data(d) => self.on_data(&d, resources, out),
            Event::Close(origin) => {
                if let Some(conn) = self.table.remove(&(origin.pid, origin.sock)) {
                    conn.finish(Outcome::Closed, &mut self.ctx, out);
                }
            }
            // TCP retransmits and resets feed the network metrics, not spans.
            Event::Tcp { .. } => {}
        }
    }

    /// Requests read and not yet answered, per service and (normalised) method.
    pub fn active_server_requests(&self) -> Vec<ActiveRequests> {
        let mut out: Vec<ActiveRequests> = Vec::new();
        for conn in self.table.values() {
            let Some((resource, methods)) = conn.active_server_requests() else { continue };
            let i = match out.iter().position(|(r, _)| Arc::ptr_eq(r, resource) || r == resource) {
                Some(i) => i,
                None => {
                    out.push((resource.clone(), Vec::new()));
                    out.len() - 1
                }
            };
            for method in methods {
                let method = span::normalise_method(method);
                match out[i].1.iter_mut().find(|(m, _)| m == method) {
                    Some((_, n)) => *n += 1,
                    None => out[i].1.push((method.to_owned(), 1)),
                }
            }
        }
        out
    }

    /// Expires idle connections (now = CLOCK_MONOTONIC ns), ending their in-flight exchanges
    /// as spans with `error.type = "timeout"`.
    ///
    /// Walks the table from the least recently used entry and stops at the first one that is
    /// not idle, so the cost is proportional to what expires.
    pub fn expire(&mut self, now_mono_ns: u64, _resources: &mut dyn ResourceLookup, out: &mut Vec<Span>) {
        let idle_ns = u64::try_from(self.ctx.config.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        while let Some((key, conn)) = self.table.oldest() {
            if now_mono_ns.saturating_sub(conn.last_seen_ns) < idle_ns {
                break;
            }
            let key = *key;
            if let Some(conn) = self.table.remove(&key) {
                Counters::inc(&self.ctx.counters.connections_expired);
                conn.finish(Outcome::Timeout, &mut self.ctx, out);
            }
        }
    }

    /// Connections currently tracked.
    pub fn connections(&self) -> usize {
        self.table.len()
    }

    /// Bytes held in the HTTP/1 head and chunk-line buffers of every tracked connection.
    pub fn buffered_bytes(&self) -> usize {
        self.table.values().map(Conn::buffered_bytes).sum()
    }

    fn on_data(&mut self, d: &DataEvent, resources: &mut dyn ResourceLookup, out: &mut Vec<Span>) {
        let key = (d.origin.pid, d.origin.sock);
        if self.table.get(&key).is_some_and(|c| !c.is_same(d.role, d.endpoints))
            && let Some(old) = self.table.remove(&key)
        {
            // The close was missed and the kernel reused the socket for a new connection.
            old.finish(Outcome::Closed, &mut self.ctx, out);
        }
        if self.table.get(&key).is_none() {
            while self.table.len() >= self.ctx.config.max_connections.max(1) {
                if self.table.pop_oldest().is_none() {
                    break;
                }
                Counters::inc(&self.ctx.counters.connections_evicted);
                if let Some(suppressed) = self.ctx.log_evict.check() {
                    tracing::warn!(
                        max_connections = self.ctx.config.max_connections,
                        suppressed,
                        "connection table full: forgot the least recently used connection"
                    );
                }
            }
            let resource = resources.resource_for(d.origin.pid, d.origin.cgroup_id);
            let conn = Conn::new(d.role, d.endpoints, resource, d.origin.ts_ns, &self.ctx);
            self.table.insert(key, conn);
        }
        if let Some(conn) = self.table.touch(&key) {
            conn.on_data(d, &mut self.ctx, out);
        }
    }
}

#[cfg(test)]
mod tests;
