//! The metric data model every producer fills and every exporter encodes: close to the OTLP data
//! model (cumulative temporality only), so that OTLP and Prometheus render the same numbers.

use std::sync::Arc;

use crate::model::{Attributes, Resource};

/// Bucket bounds (seconds) of the HTTP duration histograms, as the semantic conventions advise.
pub const DURATION_BOUNDS_S: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

/// Bucket bounds (bytes) of the body size histograms.
pub const SIZE_BOUNDS_BYTES: [f64; 10] =
    [0.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0, 10_000_000.0, 100_000_000.0, 1e9, 1e10];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Number {
    Int(i64),
    Double(f64),
}

/// One data point of a sum or a gauge.
#[derive(Clone, Debug, PartialEq)]
pub struct NumberPoint {
    pub attributes: Attributes,
    /// Start of the cumulative period (unix ns); for gauges, 0.
    pub start_unix_nano: u64,
    pub time_unix_nano: u64,
    pub value: Number,
}

/// One cumulative explicit-bucket histogram point. `bucket_counts.len() == bounds.len() + 1`.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramPoint {
    pub attributes: Attributes,
    pub start_unix_nano: u64,
    pub time_unix_nano: u64,
    pub count: u64,
    pub sum: f64,
    pub bounds: Vec<f64>,
    pub bucket_counts: Vec<u64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    /// Cumulative sum; `monotonic` for counters, not for up-down counters.
    Sum { monotonic: bool, points: Vec<NumberPoint> },
    Gauge { points: Vec<NumberPoint> },
    Histogram { points: Vec<HistogramPoint> },
}

/// One metric stream: OTel name (dots), unit (UCUM, e.g. "s", "By", "{request}"), description.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub description: String,
    pub unit: String,
    pub data: Data,
}

/// The metrics of one resource (one OTLP ResourceMetrics; one Prometheus target_info).
#[derive(Clone, Debug)]
pub struct ResourceMetrics {
    pub resource: Arc<Resource>,
    pub metrics: Vec<Metric>,
}

/// Everything collected at one instant, ready for any exporter.
pub type Snapshot = Vec<ResourceMetrics>;
