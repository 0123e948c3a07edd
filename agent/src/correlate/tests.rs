use std::net::SocketAddr;

use rand::{Rng, rngs::StdRng};
use tapwire_common::Syscall;

use super::*;
use crate::{
    capture::event::{Direction, Endpoints, Origin, Role},
    model::{Attributes, Resource, SpanKind, Status, Value},
};

struct FixedResource(Arc<Resource>);

impl ResourceLookup for FixedResource {
    fn resource_for(&mut self, _pid: u32, _cgroup_id: u64) -> Arc<Resource> {
        self.0.clone()
    }
}

fn resources() -> FixedResource {
    let mut attributes = Attributes::default();
    attributes.push("service.name", "svc");
    FixedResource(Arc::new(Resource { service_name: "svc".into(), attributes }))
}

fn endpoints() -> Endpoints {
    Endpoints { local: "10.0.0.1:8080".parse().unwrap(), peer: "10.0.0.2:51000".parse().unwrap() }
}

fn origin(sock: u64, ts: u64) -> Origin {
    Origin { pid: 42, tid: 42, cgroup_id: 7, sock, fd: 5, ts_ns: ts }
}

fn data(sock: u64, role: Role, direction: Direction, ts: u64, payload: &[u8], gap: u32) -> Event {
    Event::Data(DataEvent {
        origin: origin(sock, ts),
        direction,
        syscall: if direction == Direction::Ingress { Syscall::Read } else { Syscall::Write },
        total_len: payload.len() as u32 + gap,
        payload: payload.to_vec(),
        role,
        endpoints: Some(endpoints()),
        trace: None,
    })
}

struct Harness {
    c: Correlator,
    r: FixedResource,
    counters: Arc<Counters>,
    spans: Vec<Span>,
}

impl Harness {
    fn new(config: CorrelateConfig) -> Self {
        let counters = Arc::new(Counters::default());
        Harness { c: Correlator::new(config, Clock::with_offset(0), counters.clone()), r: resources(), counters, spans: Vec::new() }
    }

    fn ev(&mut self, e: Event) {
        self.c.on_event(e, &mut self.r, &mut self.spans);
    }

    fn server_in(&mut self, sock: u64, ts: u64, bytes: &[u8]) {
        self.ev(data(sock, Role::Server, Direction::Ingress, ts, bytes, 0));
    }

    fn server_out(&mut self, sock: u64, ts: u64, bytes: &[u8]) {
        self.ev(data(sock, Role::Server, Direction::Egress, ts, bytes, 0));
    }

    fn close(&mut self, sock: u64, ts: u64) {
        self.ev(Event::Close(origin(sock, ts)));
    }
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a Value> {
    s.attributes.get(key)
}

fn str_attr(s: &Span, key: &str) -> Option<String> {
    attr(s, key).map(ToString::to_string)
}

#[test]
fn server_span_has_the_conventional_attributes() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(
        1,
        1_000,
        b"POST /api/items?token=s3cr3t HTTP/1.1\r\nHost: shop.example:8080\r\nUser-Agent: curl/8.5\r\n\
          Authorization: Bearer s3cr3t\r\nContent-Length: 4\r\n\r\nbody",
    );
    h.server_out(1, 5_000, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
    assert_eq!(h.spans.len(), 1);
    let s = &h.spans[0];
    assert_eq!(s.name, "POST /api/items");
    assert_eq!(s.kind, SpanKind::Server);
    assert_eq!((s.start_unix_nano, s.end_unix_nano), (1_000, 5_000));
    assert_eq!(s.status, Status::Unset);
    assert_eq!(s.resource.service_name, "svc");
    let expected: Vec<(&str, Value)> = vec![
        ("http.request.method", "POST".into()),
        ("url.path", "/api/items".into()),
        ("url.scheme", "http".into()),
        ("url.query", "REDACTED".into()),
        ("http.response.status_code", 201i64.into()),
        ("server.address", "shop.example".into()),
        ("server.port", 8080i64.into()),
        ("client.address", "10.0.0.2".into()),
        ("network.peer.address", "10.0.0.2".into()),
        ("network.peer.port", 51000i64.into()),
        ("network.local.address", "10.0.0.1".into()),
        ("network.local.port", 8080i64.into()),
        ("network.protocol.version", "1.1".into()),
        ("user_agent.original", "curl/8.5".into()),
        ("http.request.body.size", 4i64.into()),
        ("http.response.body.size", 2i64.into()),
        ("http.route", "/api/items".into()),
    ];
    let got: Vec<(&str, Value)> = s.attributes.0.iter().map(|(k, v)| (k.as_ref(), v.clone())).collect();
    assert_eq!(got, expected);
    assert_eq!(s.parent_span_id, None);
    assert_eq!(s.flags, 1);
    assert!(!format!("{s:?}").contains("s3cr3t"));
    assert_eq!(Counters::get(&h.counters.spans_created), 1);
    assert_eq!(h.c.connections(), 1);
    h.close(1, 6_000);
    assert_eq!(h.c.connections(), 0);
    assert_eq!(h.spans.len(), 1);
}

#[test]
fn other_methods_are_normalised() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 1, b"GET / HTTP/1.1\r\n\r\n");
    h.server_out(1, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    h.server_in(1, 3, b"PROPFIND /dav HTTP/1.1\r\n\r\n");
    h.server_out(1, 4, b"HTTP/1.1 207 Multi-Status\r\nContent-Length: 0\r\n\r\n");
    let s = &h.spans[1];
    assert_eq!(s.name, "HTTP");
    assert_eq!(str_attr(s, "http.request.method").as_deref(), Some("_OTHER"));
    assert_eq!(str_attr(s, "http.request.method_original").as_deref(), Some("PROPFIND"));
}

#[test]
fn socket_reuse_with_a_new_role_resets_the_connection() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 10, b"GET /lost HTTP/1.1\r\n\r\n");
    // Same pid and sock, but now a client connection: the close was missed.
    h.ev(data(1, Role::Client, Direction::Egress, 20, b"GET /out HTTP/1.1\r\nHost: up\r\n\r\n", 0));
    assert_eq!(h.spans.len(), 1);
    assert_eq!(str_attr(&h.spans[0], "error.type").as_deref(), Some("connection_closed"));
    assert_eq!(h.spans[0].end_unix_nano, 10);
    h.ev(data(1, Role::Client, Direction::Ingress, 30, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0));
    assert_eq!(h.spans.len(), 2);
    assert_eq!(h.spans[1].kind, SpanKind::Client);
}

#[test]
fn role_and_endpoints_forgotten_by_the_kernel_do_not_reset() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 10, b"GET /a HTTP/1.1\r\n\r\n");
    let mut e = data(1, Role::Unknown, Direction::Egress, 20, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0);
    if let Event::Data(d) = &mut e {
        d.endpoints = None;
    }
    h.ev(e);
    assert_eq!(h.spans.len(), 1);
    assert_eq!(h.spans[0].status, Status::Unset);
    assert_eq!(str_attr(&h.spans[0], "network.peer.port").as_deref(), Some("51000"));
}

#[test]
fn new_endpoints_reset_the_connection() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 10, b"GET /a HTTP/1.1\r\n\r\n");
    let mut e = data(1, Role::Server, Direction::Ingress, 20, b"GET /b HTTP/1.1\r\n\r\n", 0);
    if let Event::Data(d) = &mut e {
        d.endpoints = Some(Endpoints { local: "10.0.0.1:8080".parse().unwrap(), peer: "10.0.0.3:1".parse().unwrap() });
    }
    h.ev(e);
    assert_eq!(h.spans.len(), 1, "the old connection's request ends");
    h.server_out(1, 30, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(str_attr(&h.spans[1], "url.path").as_deref(), Some("/b"));
    assert_eq!(str_attr(&h.spans[1], "network.peer.address").as_deref(), Some("10.0.0.3"));
}

#[test]
fn least_recently_used_connection_is_evicted() {
    let mut h = Harness::new(CorrelateConfig { max_connections: 2, ..Default::default() });
    h.server_in(1, 1, b"GET /1 HTTP/1.1\r\n\r\n");
    h.server_in(2, 2, b"GET /2 HTTP/1.1\r\n\r\n");
    h.server_out(1, 3, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    h.server_in(3, 4, b"GET /3 HTTP/1.1\r\n\r\n");
    assert_eq!(h.c.connections(), 2);
    assert_eq!(Counters::get(&h.counters.connections_evicted), 1);
    // Connection 2 was evicted: its response pairs with nothing.
    h.server_out(2, 5, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(h.spans.len(), 1);
    assert_eq!(Counters::get(&h.counters.connections_evicted), 2);
}

#[test]
fn idle_connections_expire_with_timeout_errors() {
    let second = 1_000_000_000;
    let mut h = Harness::new(CorrelateConfig { idle_timeout: Duration::from_secs(10), ..Default::default() });
    h.server_in(1, second, b"GET /slow HTTP/1.1\r\n\r\n");
    h.server_in(2, 5 * second, b"GET /fast HTTP/1.1\r\n\r\n");
    let mut out = Vec::new();
    h.c.expire(10 * second, &mut h.r, &mut out);
    assert!(out.is_empty());
    h.c.expire(11 * second, &mut h.r, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status, Status::Error { message: "no response before the connection went idle".into() });
    assert_eq!(str_attr(&out[0], "error.type").as_deref(), Some("timeout"));
    assert_eq!((out[0].start_unix_nano, out[0].end_unix_nano), (second, second));
    assert_eq!(h.c.connections(), 1);
    assert_eq!(Counters::get(&h.counters.connections_expired), 1);
    h.c.expire(100 * second, &mut h.r, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(h.c.connections(), 0);
    assert_eq!(h.c.buffered_bytes(), 0);
    assert_eq!(Counters::get(&h.counters.connections_expired), 2);
}

#[test]
fn non_http_connections_are_ignored_without_parse_failures() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 1, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
    h.server_out(1, 2, b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03");
    h.server_in(1, 3, b"GET / HTTP/1.1\r\n\r\n");
    h.server_out(1, 4, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert!(h.spans.is_empty());
    assert_eq!(Counters::get(&h.counters.parse_failures_http1), 0);
    assert_eq!(Counters::get(&h.counters.connections_ignored), 1);
    assert!(h.c.table.get(&(42, 1)).is_some_and(Conn::is_ignored));
    h.close(1, 5);
    assert_eq!(h.c.connections(), 0);
}

#[test]
fn unknown_role_waits_for_a_clean_request() {
    let mut h = Harness::new(CorrelateConfig::default());
    let unknown = |dir, ts, bytes: &[u8]| data(9, Role::Unknown, dir, ts, bytes, 0);
    // The middle of an earlier exchange: a response tail and a body.
    h.ev(unknown(Direction::Egress, 1, b"lo world</html>"));
    h.ev(unknown(Direction::Ingress, 2, b"more body bytes\r\n\r\n"));
    h.ev(unknown(Direction::Egress, 3, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
    assert!(h.spans.is_empty());
    h.ev(unknown(Direction::Ingress, 4, b"GET /fresh HTTP/1.1\r\n\r\n"));
    h.ev(unknown(Direction::Egress, 5, b"HTTP/1.1 204 No Content\r\n\r\n"));
    assert_eq!(h.spans.len(), 1);
    assert_eq!(h.spans[0].kind, SpanKind::Server);
    assert_eq!(str_attr(&h.spans[0], "url.path").as_deref(), Some("/fresh"));
    assert_eq!(Counters::get(&h.counters.parse_failures_http1), 0);
}

#[test]
fn unknown_role_egress_request_makes_a_client() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.ev(data(9, Role::Unknown, Direction::Egress, 4, b"GET /v1/x?k=v HTTP/1.1\r\nHost: api.internal\r\n\r\n", 0));
    h.ev(data(9, Role::Unknown, Direction::Ingress, 9, b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n", 0));
    let s = &h.spans[0];
    assert_eq!(s.kind, SpanKind::Client);
    assert_eq!(str_attr(s, "url.full").as_deref(), Some("http://api.internal/v1/x?REDACTED"));
    assert_eq!(str_attr(s, "server.address").as_deref(), Some("api.internal"));
    assert_eq!(str_attr(s, "server.port").as_deref(), Some("51000"), "peer port when Host has none");
    assert_eq!(str_attr(s, "error.type").as_deref(), Some("503"));
}

#[test]
fn unknown_role_gives_up_after_a_while() {
    let mut h = Harness::new(CorrelateConfig { max_unknown_chunks: 3, ..Default::default() });
    for ts in 0..3 {
        h.ev(data(9, Role::Unknown, Direction::Ingress, ts, b"\x00\x01binary", 0));
    }
    h.ev(data(9, Role::Unknown, Direction::Ingress, 5, b"GET / HTTP/1.1\r\n\r\n", 0));
    h.ev(data(9, Role::Unknown, Direction::Egress, 6, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0));
    assert!(h.spans.is_empty());
    assert_eq!(Counters::get(&h.counters.connections_ignored), 1);
}

#[test]
fn full_pipelining_queue_drops_requests_but_keeps_pairing() {
    let mut h = Harness::new(CorrelateConfig { max_pending_requests: 2, ..Default::default() });
    h.server_in(1, 1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n");
    assert_eq!(Counters::get(&h.counters.requests_dropped), 1);
    h.server_out(1, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    h.server_out(1, 3, b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n");
    h.server_out(1, 4, b"HTTP/1.1 202 OK\r\nContent-Length: 0\r\n\r\n");
    h.server_in(1, 5, b"GET /4 HTTP/1.1\r\n\r\n");
    h.server_out(1, 6, b"HTTP/1.1 203 OK\r\nContent-Length: 0\r\n\r\n");
    let got: Vec<(String, String)> = h
        .spans
        .iter()
        .map(|s| (str_attr(s, "url.path").unwrap(), str_attr(s, "http.response.status_code").unwrap()))
        .collect();
    let want = [("/1", "200"), ("/2", "201"), ("/4", "203")].map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(got, want);
}

#[test]
fn lost_response_framing_ends_at_the_next_request() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 10, b"GET /stream HTTP/1.1\r\n\r\n");
    h.server_out(1, 20, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    // A chunk-size line falls in the uncaptured tail of this write.
    h.ev(data(1, Role::Server, Direction::Egress, 30, b"5\r\nhello\r\n", 5000));
    h.ev(data(1, Role::Server, Direction::Egress, 40, b"", 700));
    assert!(h.spans.is_empty());
    h.server_in(1, 50, b"GET /next HTTP/1.1\r\n\r\n");
    assert_eq!(h.spans.len(), 1);
    assert_eq!((h.spans[0].start_unix_nano, h.spans[0].end_unix_nano), (10, 40));
    assert_eq!(h.spans[0].status, Status::Unset);
    assert_eq!(str_attr(&h.spans[0], "http.response.body.size").as_deref(), Some("5705"));
}

#[test]
fn upgrade_ends_the_exchange_and_stops_parsing() {
    let mut h = Harness::new(CorrelateConfig::default());
    h.server_in(1, 1, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    h.server_out(1, 2, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n");
    h.server_in(1, 3, b"\x81\x85garbage frames");
    h.server_out(1, 4, b"\x81\x05hello");
    assert_eq!(h.spans.len(), 1);
    assert_eq!(str_attr(&h.spans[0], "http.response.status_code").as_deref(), Some("101"));
    assert_eq!(Counters::get(&h.counters.parse_failures_http1), 0);
    h.close(1, 5);
    assert_eq!(h.spans.len(), 1);
}

#[test]
fn ipv6_peer_and_missing_endpoints() {
    let mut h = Harness::new(CorrelateConfig::default());
    let mut e = data(1, Role::Server, Direction::Ingress, 1, b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", 0);
    if let Event::Data(d) = &mut e {
        d.endpoints = Some(Endpoints {
            local: "[::1]:8080".parse::<SocketAddr>().unwrap(),
            peer: "[::1]:40000".parse::<SocketAddr>().unwrap(),
        });
    }
    h.ev(e);
    h.server_out(1, 2, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(str_attr(&h.spans[0], "server.address").as_deref(), Some("::1"));
    assert_eq!(str_attr(&h.spans[0], "client.address").as_deref(), Some("::1"));

    let mut e = data(2, Role::Server, Direction::Ingress, 1, b"GET / HTTP/1.1\r\n\r\n", 0);
    if let Event::Data(d) = &mut e {
        d.endpoints = None;
    }
    h.ev(e);
    h.close(2, 3);
    let s = &h.spans[1];
    assert!(attr(s, "server.port").is_none() && attr(s, "network.peer.address").is_none());
    assert_eq!(str_attr(s, "error.type").as_deref(), Some("connection_closed"));
}

/// Random events over a few connections: valid HTTP fragments, garbage, gaps, closes, role
/// changes and expiries. Nothing panics; the table, queues and buffers stay within their caps.
#[test]
fn fuzz_random_events_keep_state_bounded() {
    use rand::SeedableRng;
    let config = CorrelateConfig {
        max_connections: 8,
        max_head_bytes: 256,
        max_pending_requests: 4,
        max_unknown_chunks: 16,
        idle_timeout: Duration::from_micros(50),
        ..Default::default()
    };
    let mut h = Harness::new(config.clone());
    let mut rng = StdRng::seed_from_u64(0x7a9_0002);
    let pieces: [&[u8]; 14] = [
        b"GET /a?b=c HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"HEAD / HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.0 500 Oops\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
        b"\r\n",
        b"GET",
        b" / HTTP/1.1\r\n",
        b"\x16\x03\x01garbage\x00\xff",
    ];
    let roles = [Role::Server, Role::Client, Role::Unknown];
    let mut ts = 0u64;
    for _ in 0..5000 {
        ts += rng.random_range(0..20_000);
        let sock = rng.random_range(0..12u64);
        if rng.random_bool(0.03) {
            h.close(sock, ts);
            continue;
        }
        if rng.random_bool(0.01) {
            let mut out = Vec::new();
            h.c.expire(ts, &mut h.r, &mut out);
            h.spans.extend(out);
            continue;
        }
        let mut payload = Vec::new();
        for _ in 0..rng.random_range(0..4) {
            if rng.random_bool(0.85) {
                payload.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
            } else {
                payload.extend((0..rng.random_range(0..40)).map(|_| rng.random::<u8>()));
            }
        }
        let cut = rng.random_range(0..=payload.len());
        let gap = if rng.random_bool(0.1) { rng.random_range(0..4000) } else { 0 };
        let role = if rng.random_bool(0.97) { roles[(sock % 3) as usize] } else { roles[rng.random_range(0..3)] };
        let dir = if rng.random_bool(0.5) { Direction::Ingress } else { Direction::Egress };
        h.ev(data(sock, role, dir, ts, &payload[..cut], gap));

        assert!(h.c.connections() <= config.max_connections);
        for conn in h.c.table.values() {
            let (slots, buffered) = conn.footprint();
            assert!(slots <= 2 * config.max_pending_requests + 1, "{slots} queue slots");
            assert!(buffered <= 4096 + 1024, "{buffered} bytes buffered");
        }
    }
    for s in &h.spans {
        assert!(s.end_unix_nano >= s.start_unix_nano);
        assert!(!s.name.is_empty());
        assert!(attr(s, "url.query").is_none_or(|q| *q == Value::from(REDACTED)));
    }
    assert!(!h.spans.is_empty(), "the fragments do make some valid exchanges");
    assert_eq!(Counters::get(&h.counters.spans_created), h.spans.len() as u64);
}
