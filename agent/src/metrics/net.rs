//! Network metrics of the watched services, counted from kernel events: bytes moved,
//! connections opened and closed, TCP retransmits and resets.
//!
//! Memory is bounded: the table of open (pid, sock) pairs is capped (the least recently used
//! eighth is dropped when it is full, and counted), and a resource's series are dropped after it
//! has been idle for [`NetConfig::idle_series_ttl`] (they start again from zero, with a new start
//! time, if it comes back).

use std::{
    collections::HashMap,
    sync::Arc,
    time::Duration,
};

use super::{
    model::{Data, Metric, ResourceMetrics, Snapshot},
    process::{int, metric, point},
};
use crate::{
    capture::event::{Direction, Event, Role, TcpEventKind},
    model::{Attributes, Resource},
};

/// Limits of [`NetMetrics`].
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Most (pid, sock) pairs remembered as open connections.
    pub max_open_connections: usize,
    /// A resource without events for this long loses its series.
    pub idle_series_ttl: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { max_open_connections: 65_536, idle_series_ttl: Duration::from_secs(15 * 60) }
    }
}

/// Counts network activity per resource from kernel events.
pub struct NetMetrics {
    config: NetConfig,
    /// Keyed by the resource's address; the `Arc` held in the series keeps it unique.
    series: HashMap<usize, Series>,
    open: HashMap<(u32, u64), OpenConn>,
    /// Logical clock for the least-recently-used order of `open`.
    tick: u64,
    evicted: u64,
}

#[derive(Clone, Copy)]
struct OpenConn {
    role: Role,
    last_used: u64,
}

struct Series {
    resource: Arc<Resource>,
    start_unix_nano: u64,
    /// When an event last touched it, as of the snapshot that noticed.
    last_active_unix_nano: u64,
    touched: bool,
    received: u64,
    transmitted: u64,
    /// Per role, indexed by [`role_index`].
    opened: [u64; 3],
    closed: [u64; 3],
    retransmits: u64,
    resets_sent: u64,
    resets_received: u64,
}

const ROLES: [(Role, &str); 3] = [(Role::Server, "server"), (Role::Client, "client"), (Role::Unknown, "unknown")];

fn role_index(role: Role) -> usize {
    match role {
        Role::Server => 0,
        Role::Client => 1,
        Role::Unknown => 2,
    }
}

impl NetMetrics {
    /// Empty counters with the given limits.
    pub fn new(config: NetConfig) -> Self {
        NetMetrics { config, series: HashMap::new(), open: HashMap::new(), tick: 0, evicted: 0 }
    }

    /// Counts one kernel event for `resource` (the resource of `event.origin().pid`). Call it for
    /// every event read from the ring buffer, next to the correlator.
    pub fn on_event(&mut self, event: &Event, resource: &Arc<Resource>) {
        self.tick += 1;
        match event {
            Event::Data(d) => {
                let len = u64::from(d.total_len);
                // sock 0: the kernel did not tell which connection; a zero-length read is an EOF,
                // not the start of a connection.
                let opened = (d.origin.sock != 0 && self.touch_open((d.origin.pid, d.origin.sock), d.role, len > 0)).then_some(d.role);
                let s = self.series_for(resource);
                match d.direction {
                    Direction::Ingress => s.received += len,
                    Direction::Egress => s.transmitted += len,
                }
                if let Some(role) = opened {
                    s.opened[role_index(role)] += 1;
                }
            }
            Event::Close(origin) => {
                let closed = self.open.remove(&(origin.pid, origin.sock)).map(|c| c.role);
                let s = self.series_for(resource);
                if let Some(role) = closed {
                    s.closed[role_index(role)] += 1;
                }
            }
            Event::Tcp { kind, .. } => {
                let s = self.series_for(resource);
                match kind {
                    TcpEventKind::Retransmit => s.retransmits += 1,
                    TcpEventKind::ResetSent => s.resets_sent += 1,
                    TcpEventKind::ResetReceived => s.resets_received += 1,
                }
            }
        }
    }

    fn series_for(&mut self, resource: &Arc<Resource>) -> &mut Series {
        let s = self.series.entry(Arc::as_ptr(resource) as usize).or_insert_with(|| Series::new(resource.clone()));
        s.touched = true;
        s
    }

    /// Marks the pair as used now; returns true when it was not known and is now open.
    fn touch_open(&mut self, pair: (u32, u64), role: Role, may_open: bool) -> bool {
        let tick = self.tick;
        if let Some(conn) = self.open.get_mut(&pair) {
            conn.last_used = tick;
            return false;
        }
        if !may_open {
            return false;
        }
        if self.open.len() >= self.config.max_open_connections.max(1) {
            self.evict();
        }
        self.open.insert(pair, OpenConn { role, last_used: tick });
        true
    }

    /// Drops the least recently used eighth of the open-connection table.
    fn evict(&mut self) {
        let mut ages: Vec<u64> = self.open.values().map(|c| c.last_used).collect();
        let n = (ages.len() / 8).max(1);
        let (_, threshold, _) = ages.select_nth_unstable(n - 1);
        let threshold = *threshold;
        let before = self.open.len();
        self.open.retain(|_, c| c.last_used > threshold);
        self.evicted += (before - self.open.len()) as u64;
    }

    /// The cumulative counts of every live resource (sorted by service name), then forgets the
    /// resources idle for longer than the TTL. Call it on each metrics tick.
    pub fn snapshot(&mut self, now_unix_nano: u64) -> Snapshot {
        let ttl = u64::try_from(self.config.idle_series_ttl.as_nanos()).unwrap_or(u64::MAX);
        self.series.retain(|_, s| {
            if std::mem::take(&mut s.touched) {
                s.last_active_unix_nano = s.last_active_unix_nano.max(now_unix_nano);
            }
            now_unix_nano.saturating_sub(s.last_active_unix_nano) <= ttl
        });
        let mut out: Vec<ResourceMetrics> = self
            .series
            .values()
            .map(|s| ResourceMetrics { resource: s.resource.clone(), metrics: s.metrics(now_unix_nano) })
            .collect();
        out.sort_by(|a, b| a.resource.service_name.cmp(&b.resource.service_name));
        out
    }

    /// Connections currently remembered as open.
    pub fn open_connections(&self) -> usize {
        self.open.len()
    }

    /// Open connections forgotten because the table was full, since start (for the agent's own
    /// telemetry: their closes are not counted).
    pub fn evicted_connections(&self) -> u64 {
        self.evicted
    }
}

impl Default for NetMetrics {
    fn default() -> Self {
        Self::new(NetConfig::default())
    }
}

impl Series {
    fn new(resource: Arc<Resource>) -> Self {
        let now = super::now_unix_nano();
        Series {
            resource,
            start_unix_nano: now,
            last_active_unix_nano: now,
            touched: false,
            received: 0,
            transmitted: 0,
            opened: [0; 3],
            closed: [0; 3],
            retransmits: 0,
            resets_sent: 0,
            resets_received: 0,
        }
    }

    fn metrics(&self, now: u64) -> Vec<Metric> {
        let start = self.start_unix_nano.min(now);
        let one = |key: &'static str, value: &str| {
            let mut a = Attributes::default();
            a.push(key, value);
            a
        };
        let counter = |name: &str, description: &str, unit: &str, points: Vec<(Attributes, u64)>| {
            metric(
                name,
                description,
                unit,
                Data::Sum { monotonic: true, points: points.into_iter().map(|(a, v)| point(a, start, now, int(v))).collect() },
            )
        };
        let direction = |rx: u64, tx: u64| vec![(one("network.io.direction", "receive"), rx), (one("network.io.direction", "transmit"), tx)];
        // Roles that ever opened a connection.
        let roles = |counts: &[u64; 3]| -> Vec<(Attributes, u64)> {
            ROLES
                .iter()
                .filter(|(r, _)| self.opened[role_index(*r)] > 0)
                .map(|(r, name)| (one("tapwire.connection.role", name), counts[role_index(*r)]))
                .collect()
        };
        let mut out = vec![counter(
            "tapwire.network.io",
            "Bytes the service read from (receive) and wrote to (transmit) its TCP connections",
            "By",
            direction(self.received, self.transmitted),
        )];
        if self.opened.iter().any(|n| *n > 0) {
            out.push(counter(
                "tapwire.tcp.connections.opened",
                "TCP connections the service started using (first data seen on a socket)",
                "{connection}",
                roles(&self.opened),
            ));
            out.push(counter(
                "tapwire.tcp.connections.closed",
                "TCP connections the service closed, among those counted as opened",
                "{connection}",
                roles(&self.closed),
            ));
        }
        out.push(counter(
            "tapwire.tcp.retransmits",
            "TCP segments retransmitted on the service's connections",
            "{segment}",
            vec![(Attributes::default(), self.retransmits)],
        ));
        out.push(counter(
            "tapwire.tcp.resets",
            "TCP resets the service's connections sent (transmit) or received (receive)",
            "{segment}",
            direction(self.resets_received, self.resets_sent),
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capture::event::{DataEvent, Origin},
        metrics::{
            model::Number,
            process::tests::{find, points, res, value},
        },
    };
    use tapwire_common::Syscall;

    fn origin(pid: u32, sock: u64) -> Origin {
        Origin { pid, tid: pid, cgroup_id: 7, sock, fd: 5, ts_ns: 1 }
    }

    fn data(pid: u32, sock: u64, direction: Direction, len: u32, role: Role) -> Event {
        Event::Data(DataEvent {
            origin: origin(pid, sock),
            direction,
            syscall: Syscall::Read,
            total_len: len,
            payload: Vec::new(),
            role,
            endpoints: None,
            trace: None,
        })
    }

    fn tcp(pid: u32, kind: TcpEventKind) -> Event {
        Event::Tcp { origin: origin(pid, 0xa), kind, endpoints: None }
    }

    use crate::metrics::now_unix_nano as now;

    #[test]
    fn collectors_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<NetMetrics>();
        send::<crate::metrics::process::ProcessMetrics>();
        send::<crate::metrics::queue::ListenQueues>();
    }

    #[test]
    fn counts_bytes_connections_retransmits_and_resets() {
        let (web, db) = (res("web", 10), res("db", 20));
        let mut m = NetMetrics::default();
        // web: two server connections, one client connection to db.
        m.on_event(&data(10, 0xa, Direction::Ingress, 100, Role::Server), &web);
        m.on_event(&data(10, 0xa, Direction::Egress, 250, Role::Server), &web);
        m.on_event(&data(10, 0xb, Direction::Ingress, 40, Role::Server), &web);
        m.on_event(&data(10, 0xc, Direction::Egress, 7, Role::Client), &web);
        m.on_event(&data(10, 0xc, Direction::Ingress, 0, Role::Client), &web); // EOF
        m.on_event(&Event::Close(origin(10, 0xa)), &web);
        m.on_event(&Event::Close(origin(10, 0xa)), &web); // twice: counted once
        m.on_event(&Event::Close(origin(10, 0xeeee)), &web); // unknown pair: not counted
        m.on_event(&tcp(10, TcpEventKind::Retransmit), &web);
        m.on_event(&tcp(10, TcpEventKind::Retransmit), &web);
        m.on_event(&tcp(10, TcpEventKind::ResetSent), &web);
        m.on_event(&tcp(10, TcpEventKind::ResetReceived), &web);
        m.on_event(&tcp(10, TcpEventKind::ResetReceived), &web);
        m.on_event(&tcp(10, TcpEventKind::ResetReceived), &web);
        // db: a zero-length EOF on an unknown pair opens nothing; sock 0 is not tracked.
        m.on_event(&data(20, 0xd, Direction::Ingress, 0, Role::Server), &db);
        m.on_event(&data(20, 0, Direction::Ingress, 9, Role::Unknown), &db);
        assert_eq!(m.open_connections(), 2);

        let t = now();
        let snap = m.snapshot(t);
        assert_eq!(snap.iter().map(|r| r.resource.service_name.as_str()).collect::<Vec<_>>(), ["db", "web"]);
        let (db_rm, web_rm) = (&snap[0], &snap[1]);
        assert!(Arc::ptr_eq(&web_rm.resource, &web));

        let io = find(web_rm, "tapwire.network.io").unwrap();
        assert_eq!(io.unit, "By");
        assert!(matches!(io.data, Data::Sum { monotonic: true, .. }));
        assert_eq!(value(io, "network.io.direction", "receive"), Number::Int(140));
        assert_eq!(value(io, "network.io.direction", "transmit"), Number::Int(257));
        assert!(points(io).iter().all(|p| p.start_unix_nano <= t && p.start_unix_nano > 0 && p.time_unix_nano == t));

        let opened = find(web_rm, "tapwire.tcp.connections.opened").unwrap();
        assert_eq!(opened.unit, "{connection}");
        assert_eq!(points(opened).len(), 2, "only the roles seen");
        assert_eq!(value(opened, "tapwire.connection.role", "server"), Number::Int(2));
        assert_eq!(value(opened, "tapwire.connection.role", "client"), Number::Int(1));
        let closed = find(web_rm, "tapwire.tcp.connections.closed").unwrap();
        assert_eq!(value(closed, "tapwire.connection.role", "server"), Number::Int(1));
        assert_eq!(value(closed, "tapwire.connection.role", "client"), Number::Int(0));

        let retrans = find(web_rm, "tapwire.tcp.retransmits").unwrap();
        assert_eq!((retrans.unit.as_str(), value(retrans, "", "")), ("{segment}", Number::Int(2)));
        let resets = find(web_rm, "tapwire.tcp.resets").unwrap();
        assert_eq!(value(resets, "network.io.direction", "transmit"), Number::Int(1));
        assert_eq!(value(resets, "network.io.direction", "receive"), Number::Int(3));

        assert_eq!(value(find(db_rm, "tapwire.network.io").unwrap(), "network.io.direction", "receive"), Number::Int(9));
        assert!(find(db_rm, "tapwire.tcp.connections.opened").is_none());
        assert_eq!(value(find(db_rm, "tapwire.tcp.retransmits").unwrap(), "", ""), Number::Int(0));

        // Cumulative: a later snapshot adds on, with the same start.
        m.on_event(&data(10, 0xb, Direction::Ingress, 60, Role::Server), &web);
        let snap2 = m.snapshot(t + 1);
        let io2 = find(&snap2[1], "tapwire.network.io").unwrap();
        assert_eq!(value(io2, "network.io.direction", "receive"), Number::Int(200));
        assert_eq!(points(io2)[0].start_unix_nano, points(io)[0].start_unix_nano);
        assert_eq!(value(find(&snap2[1], "tapwire.tcp.connections.opened").unwrap(), "tapwire.connection.role", "server"), Number::Int(2));
    }

    #[test]
    fn open_table_is_capped_least_recently_used_first() {
        let r = res("web", 1);
        let mut m = NetMetrics::new(NetConfig { max_open_connections: 16, ..NetConfig::default() });
        for sock in 1..=16u64 {
            m.on_event(&data(1, sock, Direction::Ingress, 1, Role::Server), &r);
        }
        // Touch the oldest so it survives; the next new one evicts socks 2 and 3.
        m.on_event(&data(1, 1, Direction::Ingress, 1, Role::Server), &r);
        m.on_event(&data(1, 17, Direction::Ingress, 1, Role::Server), &r);
        assert_eq!((m.open_connections(), m.evicted_connections()), (15, 2));
        for sock in [1, 2, 3, 17] {
            m.on_event(&Event::Close(origin(1, sock)), &r);
        }
        let snap = m.snapshot(now());
        assert_eq!(value(find(&snap[0], "tapwire.tcp.connections.opened").unwrap(), "tapwire.connection.role", "server"), Number::Int(17));
        // 2 and 3 were forgotten: their closes do not count.
        assert_eq!(value(find(&snap[0], "tapwire.tcp.connections.closed").unwrap(), "tapwire.connection.role", "server"), Number::Int(2));
        let mut tiny = NetMetrics::new(NetConfig { max_open_connections: 0, ..NetConfig::default() });
        for sock in 1..=5u64 {
            tiny.on_event(&data(1, sock, Direction::Ingress, 1, Role::Server), &r);
        }
        assert_eq!((tiny.open_connections(), tiny.evicted_connections()), (1, 4));
    }

    #[test]
    fn idle_resources_are_dropped_and_restart_from_zero() {
        let (busy, idle) = (res("busy", 1), res("idle", 2));
        let mut m = NetMetrics::new(NetConfig { idle_series_ttl: Duration::from_secs(60), ..NetConfig::default() });
        m.on_event(&data(1, 1, Direction::Egress, 5, Role::Client), &busy);
        m.on_event(&data(2, 2, Direction::Egress, 5, Role::Client), &idle);
        let t0 = now();
        assert_eq!(m.snapshot(t0).len(), 2);
        m.on_event(&data(1, 1, Direction::Egress, 5, Role::Client), &busy);
        assert_eq!(m.snapshot(t0 + 30_000_000_000).len(), 2, "idle for 30 s: kept");
        let snap = m.snapshot(t0 + 61_000_000_000);
        assert_eq!(snap.len(), 1, "idle for 61 s: dropped");
        assert_eq!(snap[0].resource.service_name, "busy");
        // It comes back: a fresh series, counted from zero.
        m.on_event(&data(2, 3, Direction::Egress, 1, Role::Client), &idle);
        let snap = m.snapshot(t0 + 62_000_000_000);
        let again = snap.iter().find(|r| r.resource.service_name == "idle").unwrap();
        assert_eq!(value(find(again, "tapwire.network.io").unwrap(), "network.io.direction", "transmit"), Number::Int(1));
    }
}
