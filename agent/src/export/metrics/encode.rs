//! `metrics::model::Snapshot` -> OTLP `ExportMetricsServiceRequest`: one `ResourceMetrics` per
//! distinct resource, one `tapwire` scope, cumulative temporality.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::InstrumentationScope,
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric as ProtoMetric, NumberDataPoint,
        ResourceMetrics as ProtoResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
    resource::v1::Resource as ProtoResource,
};

use crate::{
    export::otlp::encode::{SCOPE_NAME, SCOPE_VERSION, encode_attributes},
    metrics::model::{Data, HistogramPoint, Metric, Number, NumberPoint, Snapshot},
    model::Resource,
};

/// Requests stay below this many data points unless one resource alone has more (collectors
/// refuse gRPC messages over 4 MiB by default; a histogram point is a few hundred bytes).
pub const MAX_POINTS_PER_REQUEST: usize = 8192;

/// The snapshot's metrics grouped by resource (equal by value, in order of first appearance).
/// Producers may report the same resource separately (RED and process metrics); both the OTLP
/// and the Prometheus encoders need each resource once.
pub fn group_by_resource(snapshot: &Snapshot) -> Vec<(&Arc<Resource>, Vec<&Metric>)> {
    let mut groups: Vec<(&Arc<Resource>, Vec<&Metric>)> = Vec::new();
    for rm in snapshot {
        match groups
            .iter_mut()
            .find(|(r, _)| Arc::ptr_eq(r, &rm.resource) || ***r == *rm.resource)
        {
            Some((_, metrics)) => metrics.extend(&rm.metrics),
            None => groups.push((&rm.resource, rm.metrics.iter().collect())),
        }
    }
    groups
}

/// Data points in a metric (a histogram point counts as one, as in OTLP's `rejected_data_points`).
pub fn point_count(metric: &Metric) -> usize {
    match &metric.data {
        Data::Sum { points, .. } | Data::Gauge { points } => points.len(),
        Data::Histogram { points } => points.len(),
    }
}

/// Data points in a snapshot.
pub fn snapshot_points(snapshot: &Snapshot) -> usize {
    snapshot.iter().flat_map(|rm| &rm.metrics).map(point_count).sum()
}

/// The whole snapshot as one request.
pub fn encode_request(snapshot: &Snapshot) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: group_by_resource(snapshot)
            .into_iter()
            .map(|(r, metrics)| encode_resource(r, &metrics))
            .collect(),
    }
}

/// The snapshot as requests of at most `max_points` data points each, split between resources
/// (never inside one), with the data points in each. Empty snapshot: no request.
pub fn encode_requests(snapshot: &Snapshot, max_points: usize) -> Vec<(ExportMetricsServiceRequest, usize)> {
    let mut out: Vec<(ExportMetricsServiceRequest, usize)> = Vec::new();
    for (r, metrics) in group_by_resource(snapshot) {
        let points: usize = metrics.iter().map(|m| point_count(m)).sum();
        let encoded = encode_resource(r, &metrics);
        match out.last_mut() {
            Some((request, n)) if *n + points <= max_points => {
                request.resource_metrics.push(encoded);
                *n += points;
            }
            _ => out.push((
                ExportMetricsServiceRequest {
                    resource_metrics: vec![encoded],
                },
                points,
            )),
        }
    }
    out
}

fn encode_resource(resource: &Resource, metrics: &[&Metric]) -> ProtoResourceMetrics {
    ProtoResourceMetrics {
        resource: Some(ProtoResource {
            attributes: encode_attributes(&resource.attributes),
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: SCOPE_NAME.to_owned(),
                version: SCOPE_VERSION.to_owned(),
                ..Default::default()
            }),
            metrics: metrics.iter().map(|m| encode_metric(m)).collect(),
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    }
}

/// One metric; sums and histograms are cumulative.
pub fn encode_metric(metric: &Metric) -> ProtoMetric {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let data = match &metric.data {
        Data::Sum { monotonic, points } => metric::Data::Sum(Sum {
            data_points: points.iter().map(number_point).collect(),
            aggregation_temporality: cumulative,
            is_monotonic: *monotonic,
        }),
        Data::Gauge { points } => metric::Data::Gauge(Gauge {
            data_points: points.iter().map(number_point).collect(),
        }),
        Data::Histogram { points } => metric::Data::Histogram(Histogram {
            data_points: points.iter().map(histogram_point).collect(),
            aggregation_temporality: cumulative,
        }),
    };
    ProtoMetric {
        name: metric.name.clone(),
        description: metric.description.clone(),
        unit: metric.unit.clone(),
        metadata: Vec::new(),
        data: Some(data),
    }
}

fn number_point(p: &NumberPoint) -> NumberDataPoint {
    NumberDataPoint {
        attributes: encode_attributes(&p.attributes),
        start_time_unix_nano: p.start_unix_nano,
        time_unix_nano: p.time_unix_nano,
        exemplars: Vec::new(),
        flags: 0,
        value: Some(match p.value {
            Number::Int(i) => number_data_point::Value::AsInt(i),
            Number::Double(d) => number_data_point::Value::AsDouble(d),
        }),
    }
}

fn histogram_point(p: &HistogramPoint) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes: encode_attributes(&p.attributes),
        start_time_unix_nano: p.start_unix_nano,
        time_unix_nano: p.time_unix_nano,
        count: p.count,
        sum: Some(p.sum),
        bucket_counts: p.bucket_counts.clone(),
        explicit_bounds: p.bounds.clone(),
        exemplars: Vec::new(),
        flags: 0,
        min: p.min,
        max: p.max,
    }
}
