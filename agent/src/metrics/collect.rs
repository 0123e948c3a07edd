//! All the agent's metric producers behind one call: what the main loop feeds and snapshots.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use super::{
    agent::{AgentGauge, agent_metrics, agent_resource},
    ebpf::program_metrics,
    model::Snapshot,
    net::NetMetrics,
    now_unix_nano,
    process::{ProcessMetrics, WatchedProcess},
    queue::ListenQueues,
    red::{RedConfig, RedMetrics},
    servicegraph::{ServiceGraph, ServiceGraphConfig},
};
use crate::{capture::{event::Event, probes::ProgramRunStats}, discover::ResourceLookup, model::{Resource, Span, SpanKind}, telemetry::Counters};

/// RED metrics and the service graph from spans, network counters from kernel events, and
/// per-service CPU, memory and accept queues read from /proc and the cgroup at each snapshot.
pub struct Collectors {
    red: RedMetrics,
    graph: ServiceGraph,
    /// The latest per-program run statistics (`set_program_stats`).
    programs: Vec<ProgramRunStats>,
    net: NetMetrics,
    process: ProcessMetrics,
    queues: ListenQueues,
    agent: Arc<Resource>,
    counters: Arc<Counters>,
    started_unix_nano: u64,
    /// Methods each service has served, so that `http.server.active_requests` reads 0 for them
    /// when nothing is in flight (rather than having no series).
    served_methods: Vec<(Arc<Resource>, Vec<String>)>,
    /// (connections tracked, bytes buffered) by the correlator (`set_connections`).
    connections: (usize, usize),
}

impl Collectors {
    pub fn new(counters: Arc<Counters>) -> Self {
        Collectors {
            red: RedMetrics::new(RedConfig::default(), counters.clone()),
            graph: ServiceGraph::new(ServiceGraphConfig::default(), counters.clone()),
            programs: Vec::new(),
            net: NetMetrics::default(),
            process: ProcessMetrics::default(),
            queues: ListenQueues::default(),
            agent: agent_resource(),
            counters,
            started_unix_nano: now_unix_nano(),
            served_methods: Vec::new(),
            connections: (0, 0),
        }
    }

    /// Every kernel event, before the correlator takes it.
    pub fn on_event(&mut self, event: &Event, resources: &mut dyn ResourceLookup) {
        let o = event.origin();
        let resource = resources.resource_for(o.pid, o.cgroup_id);
        self.net.on_event(event, &resource);
    }

    /// Every finished span, before it is exported (and before any sampling).
    pub fn on_span(&mut self, span: &Span) {
        self.red.record(span);
        self.graph.record(span, now_unix_nano());
        if span.kind == SpanKind::Server
            && let Some(crate::model::Value::Str(method)) = span.attributes.get("http.request.method")
        {
            let known = self.served(&span.resource);
            if !known.iter().any(|m| m == method) {
                known.push(method.to_string());
            }
        }
    }

    /// Run count and run time of each eBPF program (`Probes::program_stats`), for the next
    /// snapshots.
    pub fn set_program_stats(&mut self, stats: Vec<ProgramRunStats>) {
        self.programs = stats;
    }

    /// The correlator's connection table: connections tracked and bytes held in their buffers,
    /// for `tapwire.agent.connections.active` and `tapwire.agent.connections.buffer.size`.
    pub fn set_connections(&mut self, tracked: usize, buffered_bytes: usize) {
        self.connections = (tracked, buffered_bytes);
    }

    /// Requests in flight per service and method (from the correlator), for
    /// `http.server.active_requests`; methods a service served before and has none of in
    /// flight now read 0.
    pub fn set_active_requests(&mut self, active: &[crate::correlate::ActiveRequests]) {
        for (resource, methods) in active {
            let known = self.served(resource);
            for (m, _) in methods {
                if !known.contains(m) {
                    known.push(m.clone());
                }
            }
        }
        for (resource, methods) in &self.served_methods {
            let in_flight = active.iter().find(|(r, _)| r == resource).map(|(_, m)| m.as_slice()).unwrap_or(&[]);
            let counts: Vec<(String, String, i64)> = methods
                .iter()
                .map(|m| {
                    let n = in_flight.iter().find(|(im, _)| im == m).map_or(0, |(_, n)| *n);
                    (m.clone(), "http".to_owned(), n)
                })
                .collect();
            self.red.set_active_requests(resource, &counts);
        }
    }

    /// The methods list of a service, created on first use (bounded: a few methods per service,
    /// and at most MAX_SERVICES services, the oldest forgotten first).
    fn served(&mut self, resource: &Arc<Resource>) -> &mut Vec<String> {
        const MAX_SERVICES: usize = 4096;
        let i = match self.served_methods.iter().position(|(r, _)| r == resource) {
            Some(i) => i,
            None => {
                if self.served_methods.len() >= MAX_SERVICES {
                    self.served_methods.remove(0);
                }
                self.served_methods.push((resource.clone(), Vec::new()));
                self.served_methods.len() - 1
            }
        };
        &mut self.served_methods[i].1
    }

    /// Everything now. `cgroups` are the selected cgroups (id -> directory); `span_queue` is the
    /// span exporter's queue length.
    pub fn snapshot(
        &mut self,
        cgroups: &HashMap<u64, PathBuf>,
        resources: &mut dyn ResourceLookup,
        span_queue: usize,
    ) -> Snapshot {
        let now = now_unix_nano();
        let procs = WatchedProcess::list(cgroups, resources);
        let mut snap = self.red.snapshot(now);
        snap.extend(self.process.collect(&procs, now));
        snap.extend(self.queues.collect(&procs, now));
        snap.extend(self.net.snapshot(now));
        let pending = AgentGauge {
            name: "tapwire.agent.service_graph.pending",
            unit: "{span}",
            description: "Spans waiting for their other half to make a service-graph edge.",
            value: i64::try_from(self.graph.pending()).unwrap_or(i64::MAX),
        };
        let mut agent = agent_metrics(
            &self.counters,
            &self.agent,
            self.started_unix_nano,
            now,
            &[
                AgentGauge::export_queue_size(span_queue),
                AgentGauge::metric_series(self.red.series_count()),
                pending,
                AgentGauge::connections(self.connections.0),
                AgentGauge::connection_buffers(self.connections.1),
            ],
        );
        agent.metrics.extend(program_metrics(&self.programs, self.started_unix_nano, now));
        // Edges belong to neither of their services: they go under the agent's own resource.
        agent.metrics.extend(self.graph.snapshot(now));
        snap.push(agent);
        snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        metrics::model::{Data, Number},
        model::{Attributes, Status, Value},
    };

    fn active(snap: &Snapshot, service: &str) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for rm in snap.iter().filter(|rm| rm.resource.service_name == service) {
            for m in rm.metrics.iter().filter(|m| m.name == "http.server.active_requests") {
                let (Data::Sum { points, .. } | Data::Gauge { points }) = &m.data else { continue };
                for p in points {
                    let method = p.attributes.get("http.request.method").map(Value::to_string).unwrap_or_default();
                    let Number::Int(n) = p.value else { panic!("active requests must be an integer") };
                    out.push((method, n));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn active_requests_read_zero_for_served_methods() {
        let mut c = Collectors::new(Arc::new(Counters::default()));
        let resource = Arc::new(Resource { service_name: "api".into(), attributes: Attributes::default() });
        let mut attributes = Attributes::default();
        attributes.push("http.request.method", "GET");
        let span = Span {
            resource: resource.clone(),
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: String::new(),
            flags: 1,
            name: "GET /".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            attributes,
            status: Status::Unset,
        };
        c.on_span(&span);
        let mut resources = crate::discover::resource::ProcResources::new();
        c.set_active_requests(&[(resource.clone(), vec![("GET".into(), 2), ("POST".into(), 1)])]);
        let snap = c.snapshot(&HashMap::new(), &mut resources, 0);
        assert_eq!(active(&snap, "api"), vec![("GET".into(), 2), ("POST".into(), 1)]);
        c.set_active_requests(&[]);
        let snap = c.snapshot(&HashMap::new(), &mut resources, 0);
        assert_eq!(active(&snap, "api"), vec![("GET".into(), 0), ("POST".into(), 0)]);
    }
}
