use super::*;
use crate::model::Resource;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn resource(name: &str) -> Arc<Resource> {
    let mut attributes = Attributes::default();
    attributes.push("service.name", name);
    Arc::new(Resource { service_name: name.into(), attributes })
}

/// A span of `service` on the connection `client_addr` -> `server_addr`, from `start` to `end` ns.
fn span(kind: SpanKind, service: &str, client_addr: &str, server_addr: &str, start: u64, end: u64) -> Span {
    let (local, peer): (SocketAddr, SocketAddr) = match kind {
        SpanKind::Client => (client_addr.parse().unwrap(), server_addr.parse().unwrap()),
        SpanKind::Server => (server_addr.parse().unwrap(), client_addr.parse().unwrap()),
    };
    let mut a = Attributes::default();
    a.push("http.request.method", "GET");
    if kind == SpanKind::Client {
        a.push("server.address", server_addr.rsplit_once(':').unwrap().0.trim_matches(['[', ']']));
    }
    a.push("network.peer.address", peer.ip().to_string());
    a.push("network.peer.port", i64::from(peer.port()));
    a.push("network.local.address", local.ip().to_string());
    a.push("network.local.port", i64::from(local.port()));
    Span {
        resource: resource(service),
        trace_id: [1; 16],
        span_id: [2; 8],
        parent_span_id: None,
        trace_state: String::new(),
        flags: 1,
        name: "GET".into(),
        kind,
        start_unix_nano: start,
        end_unix_nano: end,
        attributes: a,
        status: Status::Unset,
    }
}

fn client(service: &str, from: &str, to: &str, start: u64, end: u64) -> Span {
    span(SpanKind::Client, service, from, to, start, end)
}

fn server(service: &str, from: &str, to: &str, start: u64, end: u64) -> Span {
    span(SpanKind::Server, service, from, to, start, end)
}

fn failed(mut s: Span) -> Span {
    s.status = Status::Error { message: String::new() };
    s
}

fn with_parent(mut s: Span) -> Span {
    s.parent_span_id = Some([9; 8]);
    s
}

fn graph() -> ServiceGraph {
    ServiceGraph::new(ServiceGraphConfig::default(), Arc::new(Counters::default()))
}

fn label(a: &Attributes, k: &str) -> String {
    a.get(k).map(Value::to_string).unwrap_or_default()
}

/// (metric, "client>server/connection_type/virtual_node") -> integer value or histogram count.
fn flat(metrics: &[Metric]) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for m in metrics {
        let key = |a: &Attributes| {
            if a.get(OVERFLOW_ATTRIBUTE).is_some() {
                return "overflow".to_owned();
            }
            format!(
                "{}>{}/{}/{}",
                label(a, "client"),
                label(a, "server"),
                label(a, "connection_type"),
                label(a, "virtual_node")
            )
        };
        match &m.data {
            Data::Sum { points, monotonic: true } => {
                for p in points {
                    let Number::Int(v) = p.value else { panic!("integer counters") };
                    out.insert((m.name.clone(), key(&p.attributes)), u64::try_from(v).unwrap());
                }
            }
            Data::Histogram { points } => {
                for p in points {
                    assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count);
                    out.insert((m.name.clone(), key(&p.attributes)), p.count);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

fn get(metrics: &[Metric], name: &str, edge: &str) -> Option<u64> {
    flat(metrics).get(&(name.to_owned(), edge.to_owned())).copied()
}

fn histogram<'a>(metrics: &'a [Metric], name: &str, client: &str) -> &'a HistogramPoint {
    metrics
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| match &m.data {
            Data::Histogram { points } => points.iter(),
            _ => panic!("{name} is a histogram"),
        })
        .find(|p| label(&p.attributes, "client") == client)
        .unwrap_or_else(|| panic!("no {name} point for client {client}"))
}

const TOTAL: &str = "traces_service_graph_request_total";
const FAILED: &str = "traces_service_graph_request_failed_total";
const SERVER_S: &str = "traces_service_graph_request_server_seconds";
const CLIENT_S: &str = "traces_service_graph_request_client_seconds";
const UNPAIRED: &str = "traces_service_graph_unpaired_spans_total";
const DROPPED: &str = "traces_service_graph_dropped_spans_total";

#[test]
fn client_and_server_of_one_connection_make_one_edge_in_either_order() {
    for server_first in [true, false] {
        let mut g = graph();
        let c = client("a", "127.0.0.1:40000", "127.0.0.1:8001", 10 * MS, 60 * MS);
        let s = server("b", "127.0.0.1:40000", "127.0.0.1:8001", 12 * MS, 42 * MS);
        if server_first {
            g.record(&s, S);
            g.record(&c, S);
        } else {
            g.record(&c, S);
            g.record(&s, S);
        }
        assert_eq!(g.pending(), 0);
        let m = g.snapshot(2 * S);
        assert_eq!(get(&m, TOTAL, "a>b//"), Some(1), "{:?}", flat(&m));
        assert_eq!(get(&m, FAILED, "a>b//"), Some(0));
        let sh = histogram(&m, SERVER_S, "a");
        let ch = histogram(&m, CLIENT_S, "a");
        assert_eq!((sh.count, ch.count), (1, 1));
        assert!((sh.sum - 0.030).abs() < 1e-9, "server duration {}", sh.sum);
        assert!((ch.sum - 0.050).abs() < 1e-9, "client duration {}", ch.sum);
        assert_eq!(sh.bounds, SERVICE_GRAPH_BOUNDS_S.to_vec());
        // 30 ms is in (10 ms, 50 ms]: bucket 5.
        assert_eq!(sh.bucket_counts[5], 1);
        assert_eq!(get(&m, UNPAIRED, ">b//"), None);
        // Nothing is left to expire later.
        let m = g.snapshot(100 * S);
        assert_eq!(get(&m, TOTAL, "a>b//"), Some(1));
        assert_eq!(flat(&m).keys().filter(|(n, _)| n == UNPAIRED).count(), 0);
    }
}

#[test]
fn keep_alive_and_pipelined_requests_pair_in_order() {
    let mut g = graph();
    let conn = ("10.0.0.1:40000", "10.0.0.2:80");
    // Pipelined: both requests written before the first answer; the server answers in order.
    let c1 = client("a", conn.0, conn.1, 100, 1_000);
    let c2 = client("a", conn.0, conn.1, 110, 1_200);
    let s1 = failed(server("b", conn.0, conn.1, 200, 500));
    let s2 = server("b", conn.0, conn.1, 600, 900);
    g.record(&s1, S);
    g.record(&s2, S);
    g.record(&c1, S);
    g.record(&c2, S);
    // Keep-alive: a third request later on the same connection.
    g.record(&client("a", conn.0, conn.1, 2_000, 3_000), S);
    g.record(&server("b", conn.0, conn.1, 2_100, 2_900), S);
    assert_eq!(g.pending(), 0);
    let m = g.snapshot(S);
    assert_eq!(get(&m, TOTAL, "a>b//"), Some(3));
    assert_eq!(get(&m, FAILED, "a>b//"), Some(1));
    let sh = histogram(&m, SERVER_S, "a");
    assert!((sh.sum - (300.0 + 300.0 + 800.0) / 1e9).abs() < 1e-15, "{}", sh.sum);
}

#[test]
fn a_reused_port_never_pairs_with_an_old_span() {
    let mut g = graph();
    let conn = ("127.0.0.1:40000", "127.0.0.1:8001");
    // The server span of the first call was never seen (say it failed to parse).
    g.record(&client("a", conn.0, conn.1, 10 * MS, 20 * MS), S);
    // One second later the same 4-tuple carries a new connection, to another watched service.
    let s = server("c", conn.0, conn.1, 1_012 * MS, 1_015 * MS);
    g.record(&s, S + 100 * MS);
    assert_eq!(g.pending(), 2, "no overlap in time: no pair");
    g.record(&client("a", conn.0, conn.1, 1_010 * MS, 1_020 * MS), S + 200 * MS);
    assert_eq!(g.pending(), 1, "the new client span pairs with the new server span");
    let m = g.snapshot(S + 300 * MS);
    assert_eq!(get(&m, TOTAL, "a>c//"), Some(1));
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), None, "the old span still waits");
    // The old client span expires as a call to an unwatched peer.
    let m = g.snapshot(S + 5 * S);
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), Some(1));
    assert_eq!(get(&m, UNPAIRED, "a>//"), Some(1));
    assert_eq!(g.pending(), 0);
}

#[test]
fn an_unmatched_client_span_expires_into_a_virtual_server_node() {
    let mut g = graph();
    g.record(&client("a", "127.0.0.1:40001", "127.0.0.1:9999", 0, 5 * MS), S);
    g.record(&failed(client("a", "127.0.0.1:40002", "127.0.0.1:9999", 0, 7 * MS)), S + MS);
    let m = g.snapshot(S + 4 * S);
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), None, "still within the wait");
    assert_eq!(g.pending(), 2);
    let m = g.snapshot(S + 5 * S);
    assert_eq!(g.pending(), 1, "the first waited exactly 5 s, the second not yet");
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), Some(1));
    let m = g.snapshot(S + 5 * S + MS);
    assert_eq!(g.pending(), 0);
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), Some(2));
    assert_eq!(get(&m, FAILED, "a>127.0.0.1/virtual_node/server"), Some(1));
    assert_eq!(get(&m, CLIENT_S, "a>127.0.0.1/virtual_node/server"), Some(2));
    assert_eq!(get(&m, SERVER_S, "a>127.0.0.1/virtual_node/server"), None, "the server side was not seen");
    assert_eq!(get(&m, UNPAIRED, "a>//"), Some(2));
}

#[test]
fn an_unmatched_server_span_is_a_call_from_user_only_when_it_starts_its_trace() {
    let mut g = graph();
    g.record(&server("b", "127.0.0.1:40001", "127.0.0.1:8001", 0, MS), S);
    g.record(&failed(server("b", "127.0.0.1:40002", "127.0.0.1:8001", 0, MS)), S);
    g.record(&with_parent(server("b", "127.0.0.1:40003", "127.0.0.1:8001", 0, MS)), S);
    let m = g.snapshot(10 * S);
    assert_eq!(get(&m, TOTAL, "user>b/virtual_node/client"), Some(2));
    assert_eq!(get(&m, FAILED, "user>b/virtual_node/client"), Some(1));
    assert_eq!(get(&m, SERVER_S, "user>b/virtual_node/client"), Some(2));
    assert_eq!(get(&m, CLIENT_S, "user>b/virtual_node/client"), None);
    assert_eq!(get(&m, UNPAIRED, ">b//"), Some(3));
}

#[test]
fn spans_without_endpoints_are_unpaired_at_once() {
    let mut g = graph();
    let mut c = client("a", "127.0.0.1:40001", "127.0.0.1:9999", 0, MS);
    c.attributes.0.retain(|(k, _)| !k.starts_with("network.local"));
    g.record(&c, S);
    assert_eq!(g.pending(), 0);
    let m = g.snapshot(S);
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), Some(1));
    assert_eq!(get(&m, UNPAIRED, "a>//"), Some(1));
}

#[test]
fn an_ipv4_caller_of_a_dual_stack_server_pairs() {
    let mut g = graph();
    g.record(&client("a", "127.0.0.1:40000", "127.0.0.1:8001", 0, 10), S);
    g.record(&server("b", "[::ffff:127.0.0.1]:40000", "[::ffff:127.0.0.1]:8001", 2, 8), S);
    assert_eq!(get(&g.snapshot(S), TOTAL, "a>b//"), Some(1));
}

#[test]
fn a_full_store_drops_the_oldest_span_and_counts_it() {
    let config = ServiceGraphConfig { max_pending: 3, ..ServiceGraphConfig::default() };
    let mut g = ServiceGraph::new(config, Arc::new(Counters::default()));
    for i in 0..5u64 {
        let from = format!("127.0.0.1:{}", 40_000 + i);
        g.record(&client("a", &from, "127.0.0.1:9999", i, i + 10), S);
        assert!(g.pending() <= 3);
    }
    assert_eq!(g.pending(), 3);
    // The server side of the newest one still pairs; of the oldest (dropped) one it cannot.
    g.record(&server("b", "127.0.0.1:40004", "127.0.0.1:9999", 5, 12), S);
    g.record(&server("b", "127.0.0.1:40000", "127.0.0.1:9999", 1, 9), S);
    let m = g.snapshot(S);
    assert_eq!(get(&m, TOTAL, "a>b//"), Some(1));
    assert_eq!(get(&m, DROPPED, "a>//"), Some(2));
    let m = g.snapshot(10 * S);
    assert_eq!(get(&m, TOTAL, "a>127.0.0.1/virtual_node/server"), Some(2), "the two still waiting expire");
    assert_eq!(get(&m, TOTAL, "user>b/virtual_node/client"), Some(1), "the late server span expires too");
    assert_eq!(get(&m, DROPPED, "a>//"), Some(2));
    assert_eq!(g.pending(), 0);
}

#[test]
fn edges_beyond_the_limit_go_to_the_overflow_series() {
    let counters = Arc::new(Counters::default());
    let config = ServiceGraphConfig { max_edges: 2, ..ServiceGraphConfig::default() };
    let mut g = ServiceGraph::new(config, counters.clone());
    for (i, callee) in ["b", "c", "d", "e"].into_iter().enumerate() {
        let from = format!("127.0.0.1:{}", 40_000 + i);
        g.record(&client("a", &from, "127.0.0.1:8000", 0, 10), S);
        g.record(&server(callee, &from, "127.0.0.1:8000", 1, 9), S);
    }
    let m = g.snapshot(S);
    assert_eq!(get(&m, TOTAL, "a>b//"), Some(1));
    assert_eq!(get(&m, TOTAL, "a>c//"), Some(1));
    assert_eq!(get(&m, TOTAL, "overflow"), Some(2));
    assert_eq!(g.edge_count(), 2);
    assert_eq!(Counters::get(&counters.metric_series_overflowed), 2);
}

#[test]
fn idle_edges_expire() {
    let mut g = graph();
    g.record(&client("a", "127.0.0.1:40000", "127.0.0.1:8001", 0, 10), S);
    g.record(&server("b", "127.0.0.1:40000", "127.0.0.1:8001", 1, 9), S);
    assert_eq!(get(&g.snapshot(2 * S), TOTAL, "a>b//"), Some(1));
    assert!(g.snapshot(S + 601 * S).is_empty());
    assert_eq!(g.edge_count(), 0);
}

#[test]
fn metric_names_and_attributes_are_the_connectors() {
    let mut g = graph();
    g.record(&client("a", "127.0.0.1:40000", "127.0.0.1:8001", 0, 10), S);
    g.record(&server("b", "127.0.0.1:40000", "127.0.0.1:8001", 1, 9), S);
    let m = g.snapshot(S);
    let names: Vec<(&str, &str)> = m.iter().map(|m| (m.name.as_str(), m.unit.as_str())).collect();
    assert_eq!(
        names,
        vec![(TOTAL, "{request}"), (FAILED, "{request}"), (SERVER_S, "s"), (CLIENT_S, "s")]
    );
    let Data::Sum { points, monotonic: true } = &m[0].data else { panic!("a counter") };
    let keys: Vec<&str> = points[0].attributes.0.iter().map(|(k, _)| k.as_ref()).collect();
    assert_eq!(keys, ["client", "server", "connection_type"]);
    assert_eq!(points[0].start_unix_nano, S);
    assert_eq!(points[0].time_unix_nano, S);
}
