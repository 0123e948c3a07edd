//! The correlator on arbitrary event sequences over a few connections: nothing panics and the
//! connection table stays within its cap.
//! Input: records of [op, conn, length, bytes...].
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tapwire::{
    capture::event::{DataEvent, Direction, Endpoints, Event, Origin, Role},
    clock::Clock,
    correlate::{CorrelateConfig, Correlator},
    discover::ResourceLookup,
    model::{Attributes, Resource},
    telemetry::Counters,
};
use tapwire_common::Syscall;

struct OneService(Arc<Resource>);

impl ResourceLookup for OneService {
    fn resource_for(&mut self, _pid: u32, _cgroup_id: u64) -> Arc<Resource> {
        self.0.clone()
    }
}

fuzz_target!(|data: &[u8]| {
    let config = CorrelateConfig { max_connections: 4, max_head_bytes: 256, max_pending_requests: 4, ..Default::default() };
    let mut c = Correlator::new(config, Clock::with_offset(0), Arc::new(Counters::default()));
    let mut resources = OneService(Arc::new(Resource { service_name: "fuzz".into(), attributes: Attributes::default() }));
    let mut spans = Vec::new();
    let endpoints = Endpoints { local: "127.0.0.1:80".parse().unwrap(), peer: "127.0.0.1:5000".parse().unwrap() };
    let mut rest = data;
    let mut ts = 0u64;
    while rest.len() >= 3 {
        let (op, conn, n) = (rest[0], rest[1] % 8, usize::from(rest[2]).min(rest.len() - 3));
        let payload = rest[3..3 + n].to_vec();
        rest = &rest[3 + n..];
        ts += 1000;
        let origin = Origin { pid: 1, tid: 1, cgroup_id: 1, sock: u64::from(conn), fd: 3, ts_ns: ts };
        let event = match op % 8 {
            0 => Event::Close(origin),
            6 => {
                c.expire(ts, &mut resources, &mut spans);
                continue;
            }
            k => Event::Data(DataEvent {
                origin,
                direction: if k % 2 == 0 { Direction::Ingress } else { Direction::Egress },
                syscall: Syscall::Read,
                total_len: (n + usize::from(op >> 4) * 100) as u32,
                payload,
                role: match k {
                    1 | 2 => Role::Server,
                    3 | 4 => Role::Client,
                    _ => Role::Unknown,
                },
                endpoints: (k != 7).then_some(endpoints),
                trace: None,
            }),
        };
        c.on_event(event, &mut resources, &mut spans);
        assert!(c.connections() <= 4, "connection table above its cap");
        spans.clear();
    }
});
