//! The service graph: which watched service calls which, how often, how often it fails and how
//! long it takes, as the metrics of the OpenTelemetry Collector's `servicegraph` connector and
//! Grafana Tempo's metrics-generator, so that Grafana's service map and node-graph panels read
//! them unchanged.
//!
//! Both ends of a call between two watched services on this node are seen: the caller's CLIENT
//! span and the callee's SERVER span. They are paired by the TCP connection they share, not by
//! trace context, so the edge is known even when no `traceparent` reached the callee: the client
//! span's local address and port (`network.local.*`) are the server span's peer address and port
//! (`network.peer.*`) and the other way round, and the two spans overlap in time (the server span
//! lies inside the client span: both come from the same kernel clock). Several requests on one
//! connection (keep-alive, pipelining) pair in order; a connection 4-tuple used again later (port
//! reuse) never pairs with an old span because the times must overlap, and old spans expire.
//!
//! | metric | kind | attributes |
//! | --- | --- | --- |
//! | `traces_service_graph_request_total` | counter | `client`, `server`, `connection_type` (+ `virtual_node`) |
//! | `traces_service_graph_request_failed_total` | counter | the same; a request failed when either span has status Error |
//! | `traces_service_graph_request_server_seconds` | histogram (s) | the same; duration of the server span |
//! | `traces_service_graph_request_client_seconds` | histogram (s) | the same; duration of the client span |
//! | `traces_service_graph_unpaired_spans_total` | counter | `client` (client spans) or `server` (server spans) |
//! | `traces_service_graph_dropped_spans_total` | counter | as unpaired: spans evicted because too many waited |
//!
//! A span left without its other half for [`ServiceGraphConfig::wait`] is unpaired, and handled
//! as the connector does with its virtual nodes: a CLIENT span (a call to a peer that is not
//! watched, or on another node) becomes an edge to `server = server.address` of the span
//! (`unknown` without one), with `connection_type = "virtual_node"` and
//! `virtual_node = "server"`; a SERVER span that starts its trace (no parent: a caller that is
//! not watched) becomes an edge from `client = "user"` with `virtual_node = "client"`; a SERVER
//! span with a parent is only counted as unpaired. Only the side that was seen is measured: a
//! virtual edge has one of the two duration histograms (the connector records a 0 for the other,
//! which would read as a real latency).
//!
//! Memory is bounded: at most [`ServiceGraphConfig::max_pending`] spans wait for their other
//! half (the oldest is evicted past that and counted in `dropped_spans`), at most
//! [`ServiceGraphConfig::max_edges`] edge series exist (further edges go to one overflow series
//! with `otel.metric.overflow = true`, counted in `Counters::metric_series_overflowed`), and
//! series idle for [`ServiceGraphConfig::idle_expiry`] are dropped.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use super::{
    model::{Data, HistogramPoint, Metric, Number, NumberPoint},
    red::{Histogram, OVERFLOW_ATTRIBUTE},
};
use crate::{
    model::{Attributes, Resource, Span, SpanKind, Status, Value},
    telemetry::Counters,
};

/// Bucket bounds (seconds) of the two duration histograms: the connector's defaults.
pub const SERVICE_GRAPH_BOUNDS_S: [f64; 16] =
    [0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0];

/// `client` of edges whose caller is not watched (the connector's name for it).
pub const USER_NODE: &str = "user";
/// `server` of edges to a peer with neither a watched server span nor a `server.address`.
pub const UNKNOWN_NODE: &str = "unknown";
/// `connection_type` of edges with one end not seen.
pub const VIRTUAL_NODE: &str = "virtual_node";

/// Limits of the matcher and of the aggregation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceGraphConfig {
    /// How long a span waits for its other half before it counts as unpaired.
    pub wait: Duration,
    /// Spans waiting at once; past this the oldest is dropped (counted).
    pub max_pending: usize,
    /// Edge series (client, server, connection type) before new ones go to the overflow series.
    pub max_edges: usize,
    /// A series not updated for this long is dropped at the next snapshot.
    pub idle_expiry: Duration,
}

impl Default for ServiceGraphConfig {
    fn default() -> Self {
        ServiceGraphConfig {
            wait: Duration::from_secs(5),
            max_pending: 10_000,
            max_edges: 2000,
            idle_expiry: Duration::from_secs(600),
        }
    }
}

/// One TCP connection, named the same from both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    client: SocketAddr,
    server: SocketAddr,
}

/// One side of a call, waiting for the other.
#[derive(Clone, Debug)]
struct Half {
    kind: SpanKind,
    /// Its service (`service.name` of the resource: an `Arc`, not a copy of the name).
    resource: Arc<Resource>,
    start: u64,
    end: u64,
    seconds: f64,
    failed: bool,
    /// Server spans: the span starts its trace (no parent).
    root: bool,
    /// Client spans: `server.address`, the name of an unwatched peer.
    server_address: Option<String>,
    conn: Option<ConnKey>,
    arrived: u64,
}

impl Half {
    fn of(span: &Span, now: u64) -> Half {
        let server_address = match span.attributes.get("server.address") {
            Some(Value::Str(s)) if span.kind == SpanKind::Client && !s.is_empty() => Some(s.to_string()),
            _ => None,
        };
        Half {
            kind: span.kind,
            resource: span.resource.clone(),
            start: span.start_unix_nano,
            end: span.end_unix_nano.max(span.start_unix_nano),
            seconds: span.duration_ns() as f64 / 1e9,
            failed: matches!(span.status, Status::Error { .. }),
            root: span.parent_span_id.is_none(),
            server_address,
            conn: conn_key(span),
            arrived: now,
        }
    }

    fn service(&self) -> &str {
        &self.resource.service_name
    }

    fn overlaps(&self, other: &Half) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

/// The connection of a span from its `network.local.*` and `network.peer.*` attributes.
fn conn_key(span: &Span) -> Option<ConnKey> {
    let addr = |a: &str, p: &str| -> Option<SocketAddr> {
        let ip: IpAddr = match span.attributes.get(a)? {
            Value::Str(s) => s.parse().ok()?,
            _ => return None,
        };
        let port = match span.attributes.get(p)? {
            Value::Int(i) => u16::try_from(*i).ok()?,
            _ => return None,
        };
        // A dual-stack server sees an IPv4 caller as ::ffff:a.b.c.d.
        Some(SocketAddr::new(ip.to_canonical(), port))
    };
    let local = addr("network.local.address", "network.local.port")?;
    let peer = addr("network.peer.address", "network.peer.port")?;
    Some(match span.kind {
        SpanKind::Client => ConnKey { client: local, server: peer },
        SpanKind::Server => ConnKey { client: peer, server: local },
    })
}

/// Labels of one edge series.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct EdgeKey {
    client: String,
    server: String,
    /// "" for a call seen from both ends, [`VIRTUAL_NODE`] otherwise.
    connection_type: &'static str,
    /// Which end is virtual: "client" or "server".
    virtual_node: Option<&'static str>,
}

impl EdgeKey {
    fn attributes(&self) -> Attributes {
        let mut a = Attributes::default();
        a.push("client", self.client.as_str());
        a.push("server", self.server.as_str());
        a.push("connection_type", self.connection_type);
        if let Some(v) = self.virtual_node {
            a.push("virtual_node", v);
        }
        a
    }
}

#[derive(Clone, Debug)]
struct EdgeSeries {
    created: u64,
    updated: u64,
    requests: u64,
    failed: u64,
    server: Option<Histogram>,
    client: Option<Histogram>,
}

impl EdgeSeries {
    fn new(now: u64) -> EdgeSeries {
        EdgeSeries { created: now, updated: now, requests: 0, failed: 0, server: None, client: None }
    }
}

/// A counter per service and side (unpaired and dropped spans).
#[derive(Clone, Debug)]
struct SideCount {
    created: u64,
    updated: u64,
    value: u64,
}

/// Spans waiting for their other half, oldest first, found by sequence number in constant time.
#[derive(Debug, Default)]
struct Pending {
    slots: VecDeque<Option<Half>>,
    /// Sequence number of `slots[0]`.
    first_seq: u64,
    live: usize,
}

impl Pending {
    fn len(&self) -> usize {
        self.live
    }

    /// Adds the newest span; returns its sequence number.
    fn push(&mut self, half: Half) -> u64 {
        self.slots.push_back(Some(half));
        self.live += 1;
        self.first_seq + self.slots.len() as u64 - 1
    }

    fn get(&self, seq: u64) -> Option<&Half> {
        let i = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.slots.get(i)?.as_ref()
    }

    fn remove(&mut self, seq: u64) -> Option<Half> {
        let i = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        let half = self.slots.get_mut(i)?.take()?;
        self.live -= 1;
        self.trim();
        Some(half)
    }

    /// The oldest waiting span.
    fn first(&self) -> Option<&Half> {
        self.slots.front()?.as_ref()
    }

    fn pop_first(&mut self) -> Option<(u64, Half)> {
        let seq = self.first_seq;
        let half = self.slots.pop_front()??;
        self.first_seq += 1;
        self.live -= 1;
        self.trim();
        Some((seq, half))
    }

    /// Drops the slots of spans that left, up to the oldest one still waiting.
    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.first_seq += 1;
        }
    }
}

/// The waiting spans of one connection (sequence numbers), client spans then server spans.
type ConnQueues = [VecDeque<u64>; 2];

fn side(kind: SpanKind) -> usize {
    match kind {
        SpanKind::Client => 0,
        SpanKind::Server => 1,
    }
}

/// `(kind, service)`: the label is `client` for client spans, `server` for server spans.
type SideKey = (bool, String);

/// Pairs client and server spans and aggregates the service-graph metrics.
#[derive(Debug)]
pub struct ServiceGraph {
    config: ServiceGraphConfig,
    counters: Arc<Counters>,
    /// Waiting spans in arrival order, the one at index `i` with sequence number
    /// `first_seq + i`; `None` once it left (paired) while older ones still wait.
    pending: Pending,
    /// Waiting spans of each connection, in arrival order: client spans, server spans. A span
    /// looks for its other half among the other kind only, so spans whose peer is not watched
    /// (a whole queue of one kind) cost nothing to the spans after them.
    by_conn: crate::FastMap<ConnKey, ConnQueues>,
    /// Arrival times never go backwards (a wall-clock step would break the expiry order).
    last_now: u64,
    edges: BTreeMap<EdgeKey, EdgeSeries>,
    overflow: Option<EdgeSeries>,
    unpaired: BTreeMap<SideKey, SideCount>,
    dropped: BTreeMap<SideKey, SideCount>,
}

impl ServiceGraph {
    pub fn new(config: ServiceGraphConfig, counters: Arc<Counters>) -> ServiceGraph {
        ServiceGraph {
            config,
            counters,
            pending: Pending::default(),
            by_conn: crate::FastMap::default(),
            last_now: 0,
            edges: BTreeMap::new(),
            overflow: None,
            unpaired: BTreeMap::new(),
            dropped: BTreeMap::new(),
        }
    }

    /// Spans waiting for their other half now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Edge series held now (the overflow series not counted).
    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    /// Every finished span, at `now_unix_nano` (its arrival: the wait counts from here). Spans
    /// older than the wait are expired first.
    pub fn record(&mut self, span: &Span, now_unix_nano: u64) {
        let now = now_unix_nano.max(self.last_now);
        self.last_now = now;
        self.expire(now);
        let half = Half::of(span, now);
        let Some(conn) = half.conn else {
            // Without both endpoints nothing can pair with it.
            self.unpaired(half, now);
            return;
        };
        if let Some(queues) = self.by_conn.get_mut(&conn) {
            let others = &mut queues[1 - side(half.kind)];
            let found = others.iter().position(|&seq| self.pending.get(seq).is_some_and(|other| other.overlaps(&half)));
            if let Some(i) = found {
                let seq = others.remove(i).unwrap_or_default();
                if queues.iter().all(VecDeque::is_empty) {
                    self.by_conn.remove(&conn);
                }
                if let Some(other) = self.pending.remove(seq) {
                    let (client, server) = if half.kind == SpanKind::Client { (half, other) } else { (other, half) };
                    self.paired(&client, &server, now);
                }
                return;
            }
        }
        if self.pending.len() >= self.config.max_pending.max(1)
            && let Some((_, oldest)) = self.pop_oldest()
        {
            let key = (oldest.kind == SpanKind::Client, oldest.service().to_owned());
            self.count_side(true, key, now);
        }
        let kind = half.kind;
        let seq = self.pending.push(half);
        self.by_conn.entry(conn).or_default()[side(kind)].push_back(seq);
    }

    /// Turns spans that waited `wait` or longer into unpaired spans (and virtual-node edges).
    pub fn expire(&mut self, now_unix_nano: u64) {
        let now = now_unix_nano.max(self.last_now);
        self.last_now = now;
        let wait = u64::try_from(self.config.wait.as_nanos()).unwrap_or(u64::MAX);
        while let Some(first) = self.pending.first() {
            if now.saturating_sub(first.arrived) < wait {
                break;
            }
            let Some((_, half)) = self.pop_oldest() else { break };
            self.unpaired(half, now);
        }
    }

    fn pop_oldest(&mut self) -> Option<(u64, Half)> {
        let (seq, half) = self.pending.pop_first()?;

        if let Some(conn) = half.conn
            && let Some(queues) = self.by_conn.get_mut(&conn)
        {
            let queue = &mut queues[side(half.kind)];
            // The oldest span of all is the oldest of its connection too.
            if queue.front() == Some(&seq) {
                queue.pop_front();
            } else {
                queue.retain(|s| *s != seq);
            }
            if queues.iter().all(VecDeque::is_empty) {
                self.by_conn.remove(&conn);
            }
        }
        Some((seq, half))
    }

    fn paired(&mut self, client: &Half, server: &Half, now: u64) {
        let key = EdgeKey {
            client: client.service().to_owned(),
            server: server.service().to_owned(),
            connection_type: "",
            virtual_node: None,
        };
        self.add_edge(key, client.failed || server.failed, Some(server.seconds), Some(client.seconds), now);
    }

    fn unpaired(&mut self, half: Half, now: u64) {
        let is_client = half.kind == SpanKind::Client;
        self.count_side(false, (is_client, half.service().to_owned()), now);
        if is_client {
            let key = EdgeKey {
                client: half.service().to_owned(),
                server: half.server_address.unwrap_or_else(|| UNKNOWN_NODE.to_owned()),
                connection_type: VIRTUAL_NODE,
                virtual_node: Some("server"),
            };
            self.add_edge(key, half.failed, None, Some(half.seconds), now);
        } else if half.root {
            let key = EdgeKey {
                client: USER_NODE.to_owned(),
                server: half.service().to_owned(),
                connection_type: VIRTUAL_NODE,
                virtual_node: Some("client"),
            };
            self.add_edge(key, half.failed, Some(half.seconds), None, now);
        }
    }

    fn add_edge(&mut self, key: EdgeKey, failed: bool, server_s: Option<f64>, client_s: Option<f64>, now: u64) {
        let series = if self.edges.contains_key(&key) || self.edges.len() < self.config.max_edges {
            self.edges.entry(key).or_insert_with(|| EdgeSeries::new(now))
        } else {
            Counters::inc(&self.counters.metric_series_overflowed);
            self.overflow.get_or_insert_with(|| EdgeSeries::new(now))
        };
        series.updated = series.updated.max(now);
        series.requests += 1;
        series.failed += u64::from(failed);
        if let Some(s) = server_s {
            series.server.get_or_insert_with(|| Histogram::new(&SERVICE_GRAPH_BOUNDS_S)).record(s);
        }
        if let Some(s) = client_s {
            series.client.get_or_insert_with(|| Histogram::new(&SERVICE_GRAPH_BOUNDS_S)).record(s);
        }
    }

    /// Counts one unpaired (`dropped == false`) or dropped span of a service. The tables are
    /// bounded by `max_edges` like the edges; past that the span is only counted as an overflow.
    fn count_side(&mut self, dropped: bool, key: SideKey, now: u64) {
        let limit = self.config.max_edges;
        let table = if dropped { &mut self.dropped } else { &mut self.unpaired };
        if !table.contains_key(&key) && table.len() >= limit {
            Counters::inc(&self.counters.metric_series_overflowed);
            return;
        }
        let c = table.entry(key).or_insert(SideCount { created: now, updated: now, value: 0 });
        c.updated = c.updated.max(now);
        c.value += 1;
    }

    /// The cumulative state at `now_unix_nano`, after expiring waiting spans and dropping
    /// series idle for `idle_expiry`. Empty when nothing was ever recorded.
    pub fn snapshot(&mut self, now_unix_nano: u64) -> Vec<Metric> {
        self.expire(now_unix_nano);
        let now = now_unix_nano;
        let idle = u64::try_from(self.config.idle_expiry.as_nanos()).unwrap_or(u64::MAX);
        let fresh = |updated: u64| now.saturating_sub(updated) < idle;
        self.edges.retain(|_, s| fresh(s.updated));
        if self.overflow.as_ref().is_some_and(|s| !fresh(s.updated)) {
            self.overflow = None;
        }
        self.unpaired.retain(|_, c| fresh(c.updated));
        self.dropped.retain(|_, c| fresh(c.updated));

        let series: Vec<(Attributes, &EdgeSeries)> = self
            .edges
            .iter()
            .map(|(k, s)| (k.attributes(), s))
            .chain(self.overflow.iter().map(|s| {
                let mut a = Attributes::default();
                a.push(OVERFLOW_ATTRIBUTE, true);
                (a, s)
            }))
            .collect();
        let count = |s: &EdgeSeries, a: &Attributes, v: u64| NumberPoint {
            attributes: a.clone(),
            start_unix_nano: s.created.min(now),
            time_unix_nano: now,
            value: Number::Int(i64::try_from(v).unwrap_or(i64::MAX)),
        };
        let mut out = Vec::new();
        let mut push = |name: &str, unit: &str, description: &str, data: Data| {
            let empty = match &data {
                Data::Sum { points, .. } | Data::Gauge { points } => points.is_empty(),
                Data::Histogram { points } => points.is_empty(),
            };
            if !empty {
                out.push(Metric { name: name.into(), description: description.into(), unit: unit.into(), data });
            }
        };
        push(
            "traces_service_graph_request_total",
            "{request}",
            "Requests between two services.",
            Data::Sum { monotonic: true, points: series.iter().map(|(a, s)| count(s, a, s.requests)).collect() },
        );
        push(
            "traces_service_graph_request_failed_total",
            "{request}",
            "Failed requests between two services (either span has status Error).",
            Data::Sum { monotonic: true, points: series.iter().map(|(a, s)| count(s, a, s.failed)).collect() },
        );
        let histogram = |pick: fn(&EdgeSeries) -> Option<&Histogram>| -> Vec<HistogramPoint> {
            series
                .iter()
                .filter_map(|(a, s)| pick(s).map(|h| h.point(a.clone(), s.created.min(now), now)))
                .collect()
        };
        push(
            "traces_service_graph_request_server_seconds",
            "s",
            "Duration of requests between two services as seen by the server.",
            Data::Histogram { points: histogram(|s| s.server.as_ref()) },
        );
        push(
            "traces_service_graph_request_client_seconds",
            "s",
            "Duration of requests between two services as seen by the client.",
            Data::Histogram { points: histogram(|s| s.client.as_ref()) },
        );
        let sides = |table: &BTreeMap<SideKey, SideCount>| -> Vec<NumberPoint> {
            table
                .iter()
                .map(|((is_client, service), c)| {
                    let mut a = Attributes::default();
                    a.push(if *is_client { "client" } else { "server" }, service.as_str());
                    NumberPoint {
                        attributes: a,
                        start_unix_nano: c.created.min(now),
                        time_unix_nano: now,
                        value: Number::Int(i64::try_from(c.value).unwrap_or(i64::MAX)),
                    }
                })
                .collect()
        };
        push(
            "traces_service_graph_unpaired_spans_total",
            "{span}",
            "Spans whose other half was not seen in time (client: the peer is not watched here; server: the caller is not).",
            Data::Sum { monotonic: true, points: sides(&self.unpaired) },
        );
        push(
            "traces_service_graph_dropped_spans_total",
            "{span}",
            "Spans dropped unpaired because too many were waiting for their other half.",
            Data::Sum { monotonic: true, points: sides(&self.dropped) },
        );
        out
    }
}

#[cfg(test)]
#[path = "servicegraph_tests.rs"]
mod tests;
