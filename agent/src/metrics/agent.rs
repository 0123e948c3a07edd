//! The agent's own metrics: every [`Counters`] field as a cumulative counter, plus gauges the
//! app samples, under a resource of its own (`service.name = tapwire`).
//!
//! | metric | unit | attributes | counter field |
//! | --- | --- | --- | --- |
//! | `tapwire.agent.events.read` | `{event}` | | `events_read` |
//! | `tapwire.agent.events.lost` | `{event}` | | `events_lost` |
//! | `tapwire.agent.events.malformed` | `{event}` | | `events_malformed` |
//! | `tapwire.agent.parse.failures` | `{message}` | `network.protocol.name=http` | `parse_failures_http1` |
//! | `tapwire.agent.connections.evicted` | `{connection}` | | `connections_evicted` |
//! | `tapwire.agent.connections.expired` | `{connection}` | | `connections_expired` |
//! | `tapwire.agent.connections.ignored` | `{connection}` | | `connections_ignored` |
//! | `tapwire.agent.requests.dropped` | `{request}` | | `requests_dropped` |
//! | `tapwire.agent.responses.orphaned` | `{response}` | | `responses_orphaned` |
//! | `tapwire.agent.traceparent.invalid` | `{request}` | | `traceparent_invalid` |
//! | `tapwire.agent.routes.overflowed` | `{request}` | | `routes_overflowed` |
//! | `tapwire.agent.spans` | `{span}` | `state` = `created`, `sampled_out`, `exported`, `failed`, `dropped` | `spans_*` |
//! | `tapwire.agent.spans.kept` | `{span}` | `tapwire.sampling.kept_by` = `error`, `latency` | `spans_kept_*` |
//! | `tapwire.agent.metric_points.exported` | `{data_point}` | | `metric_points_exported` |
//! | `tapwire.agent.metric_points.failed` | `{data_point}` | | `metric_points_failed` |
//! | `tapwire.agent.metric_snapshots.dropped` | `{snapshot}` | | `metric_snapshots_dropped` |
//! | `tapwire.agent.metric_series.overflowed` | `{measurement}` | | `metric_series_overflowed` |
//! | `tapwire.agent.k8s.api.failures` | `{request}` | `operation` = `list`, `watch`, `get_owner` | `k8s_*_failures` |
//! | `tapwire.agent.k8s.relists` | `{list}` | | `k8s_relists` |
//! | `tapwire.agent.k8s.pods.dropped` | `{pod}` | | `k8s_pods_dropped` |
//! | `tapwire.agent.context.spans` | `{span}` | `tapwire.context.parent` = `none`, `header`, `thread`, `process`, `application` | `spans_by_parent` |
//! | `tapwire.agent.context.injections` | `{request}` | `tapwire.context.result` = `injected`, `has_header`, `split`, `pipelined`, `not_http`, `failed` | `kernel` |
//! | `tapwire.agent.context.sockets_refused` | `{socket}` | | `kernel` |
//! | `tapwire.agent.context.table_full` | `{request}` | | `kernel` |
//! | gauges passed in, e.g. `tapwire.agent.export.queue.size` | `{span}` | | [`AgentGauge`] |
//!
//! `tapwire.agent.spans` is one metric with a `state` attribute so that one query shows the
//! whole pipeline. The states are not disjoint: `created` counts every span built (metrics are
//! computed from all of them), `sampled_out` those sampling did not export, the other three
//! what became of the rest, handed to the exporter (`exported + failed + dropped <= created -
//! sampled_out`, the difference is in flight). Never sum over `state`; divide by
//! `state="created"` instead. `tapwire.agent.spans.kept` counts the spans head sampling dropped
//! that a keep rule exported anyway (they are among those handed to the exporter).

use std::sync::Arc;

use super::model::{Data, Metric, Number, NumberPoint, ResourceMetrics};
use crate::{
    model::{Attributes, Resource},
    telemetry::Counters,
};

/// `service.name` of the agent's own resource.
pub const AGENT_SERVICE_NAME: &str = "tapwire";

/// A gauge the app samples at snapshot time (queue lengths, table sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentGauge<'a> {
    /// OTel metric name, e.g. `tapwire.agent.export.queue.size`.
    pub name: &'a str,
    /// UCUM unit, e.g. `{span}`.
    pub unit: &'a str,
    /// One sentence (the Prometheus HELP text).
    pub description: &'a str,
    pub value: i64,
}

impl AgentGauge<'static> {
    /// `tapwire.agent.export.queue.size`: spans waiting in the span export queue
    /// (`ExporterHandle::queue_len`).
    pub fn export_queue_size(spans: usize) -> AgentGauge<'static> {
        AgentGauge {
            name: "tapwire.agent.export.queue.size",
            unit: "{span}",
            description: "Spans waiting in the span export queue.",
            value: i64::try_from(spans).unwrap_or(i64::MAX),
        }
    }

    /// `tapwire.agent.connections.active`: connections the correlator tracks
    /// (`Correlator::connections`), at most its `max_connections`.
    pub fn connections(n: usize) -> AgentGauge<'static> {
        AgentGauge {
            name: "tapwire.agent.connections.active",
            unit: "{connection}",
            description: "Connections tracked by the agent (bounded by max_connections; idle ones expire).",
            value: i64::try_from(n).unwrap_or(i64::MAX),
        }
    }

    /// `tapwire.agent.connections.buffer.size`: bytes held in HTTP/1 head and chunk-line
    /// buffers of the tracked connections (`Correlator::buffered_bytes`).
    pub fn connection_buffers(bytes: usize) -> AgentGauge<'static> {
        AgentGauge {
            name: "tapwire.agent.connections.buffer.size",
            unit: "By",
            description: "Bytes held in the HTTP/1 head buffers of the tracked connections.",
            value: i64::try_from(bytes).unwrap_or(i64::MAX),
        }
    }

    /// `tapwire.agent.metric_series.active`: RED series held (`RedMetrics::series_count`).
    pub fn metric_series(series: usize) -> AgentGauge<'static> {
        AgentGauge {
            name: "tapwire.agent.metric_series.active",
            unit: "{series}",
            description: "HTTP metric series currently aggregated.",
            value: i64::try_from(series).unwrap_or(i64::MAX),
        }
    }
}

/// The agent's resource on this host: `service.name = tapwire`, `service.version`,
/// `service.instance.id = HOST:PID` (as for watched services), `host.name`, `process.pid` and
/// the `telemetry.sdk.*` attributes.
pub fn agent_resource() -> Arc<Resource> {
    let host = nix::unistd::gethostname().map_or_else(|_| "unknown".into(), |h| h.to_string_lossy().into_owned());
    agent_resource_for(&host, std::process::id())
}

/// [`agent_resource`] for a given host name and pid.
pub fn agent_resource_for(host_name: &str, pid: u32) -> Arc<Resource> {
    let mut attributes = Attributes::default();
    attributes.push("service.name", AGENT_SERVICE_NAME);
    attributes.push("service.version", env!("CARGO_PKG_VERSION"));
    attributes.push("service.instance.id", format!("{host_name}:{pid}"));
    attributes.push("host.name", host_name);
    attributes.push("process.pid", i64::from(pid));
    attributes.push("telemetry.sdk.name", "tapwire");
    attributes.push("telemetry.sdk.language", "rust");
    attributes.push("telemetry.sdk.version", env!("CARGO_PKG_VERSION"));
    Arc::new(Resource {
        service_name: AGENT_SERVICE_NAME.to_owned(),
        attributes,
    })
}

/// Reads every counter once: cumulative sums since `start_unix_nano` (the agent's start), the
/// given gauges, all stamped `now_unix_nano`.
pub fn agent_metrics(
    counters: &Counters,
    resource: &Arc<Resource>,
    start_unix_nano: u64,
    now_unix_nano: u64,
    gauges: &[AgentGauge<'_>],
) -> ResourceMetrics {
    let c = counters;
    let point = |attributes: Attributes, value: u64| NumberPoint {
        attributes,
        start_unix_nano,
        time_unix_nano: now_unix_nano,
        value: Number::Int(i64::try_from(value).unwrap_or(i64::MAX)),
    };
    let counter = |name: &str, unit: &str, description: &str, points: Vec<NumberPoint>| Metric {
        name: name.to_owned(),
        description: description.to_owned(),
        unit: unit.to_owned(),
        data: Data::Sum { monotonic: true, points },
    };
    let plain = |value: u64| vec![point(Attributes::default(), value)];
    let attr = |key: &'static str, value: &str| {
        let mut a = Attributes::default();
        a.push(key, value);
        a
    };
    let get = Counters::get;

    let kernel = |slot: tapwire_common::Counter| get(&c.kernel[slot as usize]);
    let mut metrics = vec![
        counter(
            "tapwire.agent.events.read",
            "{event}",
            "Ring-buffer events decoded by the agent.",
            plain(get(&c.events_read)),
        ),
        counter(
            "tapwire.agent.events.lost",
            "{event}",
            "Events the kernel could not queue because the ring buffer was full.",
            plain(get(&c.events_lost)),
        ),
        counter(
            "tapwire.agent.events.malformed",
            "{event}",
            "Ring-buffer records that failed to decode.",
            plain(get(&c.events_malformed)),
        ),
        counter(
            "tapwire.agent.parse.failures",
            "{message}",
            "Protocol messages that failed to parse.",
            vec![point(attr("network.protocol.name", "http"), get(&c.parse_failures_http1))],
        ),
        counter(
            "tapwire.agent.connections.evicted",
            "{connection}",
            "Connections dropped from the tracking table because it was full.",
            plain(get(&c.connections_evicted)),
        ),
        counter(
            "tapwire.agent.connections.expired",
            "{connection}",
            "Connections forgotten after the idle timeout without any event.",
            plain(get(&c.connections_expired)),
        ),
        counter(
            "tapwire.agent.connections.ignored",
            "{connection}",
            "Connections no longer parsed: not HTTP/1, too many parse failures, or never seen starting a request.",
            plain(get(&c.connections_ignored)),
        ),
        counter(
            "tapwire.agent.requests.dropped",
            "{request}",
            "Requests that did not become spans: too many unanswered on one connection, or their connection stopped being parsed.",
            plain(get(&c.requests_dropped)),
        ),
        counter(
            "tapwire.agent.responses.orphaned",
            "{response}",
            "Responses that had no request to answer.",
            plain(get(&c.responses_orphaned)),
        ),
        counter(
            "tapwire.agent.traceparent.invalid",
            "{request}",
            "Requests whose traceparent header was invalid (the span started a new trace).",
            plain(get(&c.traceparent_invalid)),
        ),
        counter(
            "tapwire.agent.routes.overflowed",
            "{request}",
            "Requests whose route went to the per-service overflow route.",
            plain(get(&c.routes_overflowed)),
        ),
        counter(
            "tapwire.agent.spans",
            "{span}",
            "Spans by state: created, sampled_out (not exported by sampling), exported, failed, dropped.",
            [
                ("created", &c.spans_created),
                ("sampled_out", &c.spans_sampled_out),
                ("exported", &c.spans_exported),
                ("failed", &c.spans_failed),
                ("dropped", &c.spans_dropped),
            ]
            .into_iter()
            .map(|(state, n)| point(attr("state", state), get(n)))
            .collect(),
        ),
        counter(
            "tapwire.agent.spans.kept",
            "{span}",
            "Spans head sampling dropped that a keep rule exported anyway, by rule.",
            [("error", &c.spans_kept_error), ("latency", &c.spans_kept_latency)]
                .into_iter()
                .map(|(rule, n)| point(attr(crate::sampling::KEPT_BY_ATTRIBUTE, rule), get(n)))
                .collect(),
        ),
        counter(
            "tapwire.agent.metric_points.exported",
            "{data_point}",
            "Metric data points the collector accepted.",
            plain(get(&c.metric_points_exported)),
        ),
        counter(
            "tapwire.agent.metric_points.failed",
            "{data_point}",
            "Metric data points whose export failed for good.",
            plain(get(&c.metric_points_failed)),
        ),
        counter(
            "tapwire.agent.metric_snapshots.dropped",
            "{snapshot}",
            "Metric snapshots replaced by a newer one while the exporter was busy.",
            plain(get(&c.metric_snapshots_dropped)),
        ),
        counter(
            "tapwire.agent.metric_series.overflowed",
            "{measurement}",
            "Measurements recorded into an overflow series because of the series limit.",
            plain(get(&c.metric_series_overflowed)),
        ),
        counter(
            "tapwire.agent.k8s.api.failures",
            "{request}",
            "Kubernetes API requests that failed: pod lists and watches, owner (ReplicaSet, Job) lookups.",
            [("list", &c.k8s_list_failures), ("watch", &c.k8s_watch_failures), ("get_owner", &c.k8s_owner_failures)]
                .into_iter()
                .map(|(operation, n)| point(attr("operation", operation), get(n)))
                .collect(),
        ),
        counter(
            "tapwire.agent.k8s.relists",
            "{list}",
            "Complete lists of this node's pods (the first one, and one after each expired watch).",
            plain(get(&c.k8s_relists)),
        ),
        counter(
            "tapwire.agent.k8s.pods.dropped",
            "{pod}",
            "Pods left without Kubernetes metadata (pod store full, or no uid).",
            plain(get(&c.k8s_pods_dropped)),
        ),
        counter(
            "tapwire.agent.context.spans",
            "{span}",
            "Spans whose trace context the kernel decided, by the source of their parent: none (a new trace), header (incoming traceparent), thread or process (the one server request in flight there), application (the request's own traceparent).",
            crate::capture::event::ParentSource::ALL
                .iter()
                .zip(&c.spans_by_parent)
                .map(|(source, n)| point(attr("tapwire.context.parent", source.as_str()), get(n)))
                .collect(),
        ),
        counter(
            "tapwire.agent.context.injections",
            "{request}",
            "Outbound HTTP/1 requests by what traceparent injection did: injected, or why not (has_header, split, pipelined, not_http, failed).",
            {
                use tapwire_common::Counter as K;
                [
                    ("injected", K::Injected),
                    ("has_header", K::InjectSkipHasHeader),
                    ("split", K::InjectSkipSplit),
                    ("pipelined", K::InjectSkipPipelined),
                    ("not_http", K::InjectSkipNotHttp),
                    ("failed", K::InjectFailed),
                ]
                .into_iter()
                .map(|(result, slot)| point(attr("tapwire.context.result", result), kernel(slot)))
                .collect()
            },
        ),
        counter(
            "tapwire.agent.context.sockets_refused",
            "{socket}",
            "Client sockets the kernel could not add to tapwire's sockhash (full, or owned by another sockmap user): their requests are never injected.",
            plain(kernel(tapwire_common::Counter::SockhashRefused)),
        ),
        counter(
            "tapwire.agent.context.table_full",
            "{request}",
            "Server requests whose trace context found the kernel's table full (their outbound calls stay unparented).",
            plain(kernel(tapwire_common::Counter::ContextMapFull)),
        ),
    ];
    metrics.extend(gauges.iter().map(|g| Metric {
        name: g.name.to_owned(),
        description: g.description.to_owned(),
        unit: g.unit.to_owned(),
        data: Data::Gauge {
            points: vec![NumberPoint {
                attributes: Attributes::default(),
                start_unix_nano: 0,
                time_unix_nano: now_unix_nano,
                value: Number::Int(g.value),
            }],
        },
    }));
    ResourceMetrics {
        resource: resource.clone(),
        metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Value;

    #[test]
    fn resource_identifies_the_agent() {
        let r = agent_resource_for("node-1", 4242);
        assert_eq!(r.service_name, "tapwire");
        let get = |k: &str| r.attributes.get(k).cloned();
        assert_eq!(get("service.name"), Some(Value::Str("tapwire".into())));
        assert_eq!(get("service.instance.id"), Some(Value::Str("node-1:4242".into())));
        assert_eq!(get("host.name"), Some(Value::Str("node-1".into())));
        assert_eq!(get("process.pid"), Some(Value::Int(4242)));
        assert_eq!(get("telemetry.sdk.name"), Some(Value::Str("tapwire".into())));
        assert_eq!(agent_resource().service_name, "tapwire");
    }

    #[test]
    fn every_counter_maps_to_its_metric() {
        let c = Counters::default();
        let fields = [
            &c.events_read,
            &c.events_lost,
            &c.events_malformed,
            &c.parse_failures_http1,
            &c.connections_evicted,
            &c.connections_expired,
            &c.connections_ignored,
            &c.requests_dropped,
            &c.responses_orphaned,
            &c.traceparent_invalid,
            &c.routes_overflowed,
            &c.spans_created,
            &c.spans_sampled_out,
            &c.spans_exported,
            &c.spans_failed,
            &c.spans_dropped,
            &c.spans_kept_error,
            &c.spans_kept_latency,
            &c.metric_points_exported,
            &c.metric_points_failed,
            &c.metric_snapshots_dropped,
            &c.metric_series_overflowed,
            &c.k8s_list_failures,
            &c.k8s_watch_failures,
            &c.k8s_owner_failures,
            &c.k8s_relists,
            &c.k8s_pods_dropped,
        ];
        for (i, f) in fields.into_iter().enumerate() {
            Counters::add(f, 100 + i as u64);
        }
        for (i, f) in c.spans_by_parent.iter().enumerate() {
            Counters::add(f, 200 + i as u64);
        }
        for (i, f) in c.kernel.iter().enumerate() {
            Counters::add(f, 300 + i as u64);
        }
        let r = agent_resource_for("h", 1);
        let rm = agent_metrics(&c, &r, 10, 20, &[AgentGauge::export_queue_size(7), AgentGauge::metric_series(3)]);
        assert!(Arc::ptr_eq(&rm.resource, &r));
        /// (metric, unit, attributes as text, value)
        type Row = (String, String, Vec<(String, String)>, i64);
        let flat: Vec<Row> = rm
            .metrics
            .iter()
            .flat_map(|m| {
                let (points, kind) = match &m.data {
                    Data::Sum { monotonic: true, points } => (points, "counter"),
                    Data::Gauge { points } => (points, "gauge"),
                    other => panic!("unexpected {other:?}"),
                };
                points.iter().map(move |p| {
                    let Number::Int(v) = p.value else { panic!("ints only") };
                    let expected_start = if kind == "counter" { 10 } else { 0 };
                    assert_eq!((p.start_unix_nano, p.time_unix_nano), (expected_start, 20), "{}", m.name);
                    (
                        m.name.clone(),
                        m.unit.clone(),
                        p.attributes.0.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                        v,
                    )
                })
            })
            .collect();
        let row = |name: &str, unit: &str, attrs: &[(&str, &str)], v: i64| {
            (
                name.to_owned(),
                unit.to_owned(),
                attrs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>(),
                v,
            )
        };
        assert_eq!(
            flat,
            vec![
                row("tapwire.agent.events.read", "{event}", &[], 100),
                row("tapwire.agent.events.lost", "{event}", &[], 101),
                row("tapwire.agent.events.malformed", "{event}", &[], 102),
                row("tapwire.agent.parse.failures", "{message}", &[("network.protocol.name", "http")], 103),
                row("tapwire.agent.connections.evicted", "{connection}", &[], 104),
                row("tapwire.agent.connections.expired", "{connection}", &[], 105),
                row("tapwire.agent.connections.ignored", "{connection}", &[], 106),
                row("tapwire.agent.requests.dropped", "{request}", &[], 107),
                row("tapwire.agent.responses.orphaned", "{response}", &[], 108),
                row("tapwire.agent.traceparent.invalid", "{request}", &[], 109),
                row("tapwire.agent.routes.overflowed", "{request}", &[], 110),
                row("tapwire.agent.spans", "{span}", &[("state", "created")], 111),
                row("tapwire.agent.spans", "{span}", &[("state", "sampled_out")], 112),
                row("tapwire.agent.spans", "{span}", &[("state", "exported")], 113),
                row("tapwire.agent.spans", "{span}", &[("state", "failed")], 114),
                row("tapwire.agent.spans", "{span}", &[("state", "dropped")], 115),
                row("tapwire.agent.spans.kept", "{span}", &[("tapwire.sampling.kept_by", "error")], 116),
                row("tapwire.agent.spans.kept", "{span}", &[("tapwire.sampling.kept_by", "latency")], 117),
                row("tapwire.agent.metric_points.exported", "{data_point}", &[], 118),
                row("tapwire.agent.metric_points.failed", "{data_point}", &[], 119),
                row("tapwire.agent.metric_snapshots.dropped", "{snapshot}", &[], 120),
                row("tapwire.agent.metric_series.overflowed", "{measurement}", &[], 121),
                row("tapwire.agent.k8s.api.failures", "{request}", &[("operation", "list")], 122),
                row("tapwire.agent.k8s.api.failures", "{request}", &[("operation", "watch")], 123),
                row("tapwire.agent.k8s.api.failures", "{request}", &[("operation", "get_owner")], 124),
                row("tapwire.agent.k8s.relists", "{list}", &[], 125),
                row("tapwire.agent.k8s.pods.dropped", "{pod}", &[], 126),
                row("tapwire.agent.context.spans", "{span}", &[("tapwire.context.parent", "none")], 200),
                row("tapwire.agent.context.spans", "{span}", &[("tapwire.context.parent", "header")], 201),
                row("tapwire.agent.context.spans", "{span}", &[("tapwire.context.parent", "thread")], 202),
                row("tapwire.agent.context.spans", "{span}", &[("tapwire.context.parent", "process")], 203),
                row("tapwire.agent.context.spans", "{span}", &[("tapwire.context.parent", "application")], 204),
                row("tapwire.agent.context.injections", "{request}", &[("tapwire.context.result", "injected")], 309),
                row("tapwire.agent.context.injections", "{request}", &[("tapwire.context.result", "has_header")], 310),
                row("tapwire.agent.context.injections", "{request}", &[("tapwire.context.result", "split")], 311),
                row("tapwire.agent.context.injections", "{request}", &[("tapwire.context.result", "pipelined")], 312),
                row("tapwire.agent.context.injections", "{request}", &[("tapwire.context.result", "not_http")], 316),
                row("tapwire.agent.context.injections", "{request}", &[("tapwire.context.result", "failed")], 313),
                row("tapwire.agent.context.sockets_refused", "{socket}", &[], 314),
                row("tapwire.agent.context.table_full", "{request}", &[], 315),
                row("tapwire.agent.export.queue.size", "{span}", &[], 7),
                row("tapwire.agent.metric_series.active", "{series}", &[], 3),
            ]
        );
        assert!(rm.metrics.iter().all(|m| !m.description.is_empty()), "every metric has a HELP text");
    }
}
