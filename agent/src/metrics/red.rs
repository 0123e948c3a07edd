//! RED metrics (rate, errors, duration) of HTTP, aggregated from finished spans into cumulative
//! OpenTelemetry semantic-convention histograms, per resource and attribute set.
//!
//! | metric | kind | unit | from |
//! | --- | --- | --- | --- |
//! | `http.server.request.duration` | histogram | `s` | SERVER spans: end - start |
//! | `http.server.request.body.size` | histogram | `By` | SERVER spans with `http.request.body.size` |
//! | `http.server.response.body.size` | histogram | `By` | SERVER spans with `http.response.body.size` |
//! | `http.server.active_requests` | up-down sum | `{request}` | [`RedMetrics::set_active_requests`] |
//! | `http.client.request.duration` | histogram | `s` | CLIENT spans |
//! | `http.client.request.body.size` | histogram | `By` | CLIENT spans with `http.request.body.size` |
//! | `http.client.response.body.size` | histogram | `By` | CLIENT spans with `http.response.body.size` |
//!
//! Attributes are copied from the span when present, never invented: [`SERVER_ATTRIBUTES`] and,
//! for clients, [`CLIENT_ATTRIBUTES`]. No path, query or other raw request data is ever used.
//!
//! Cardinality is bounded twice: a resource holds at most `max_series_per_resource` attribute
//! sets (server, client and active-request sets together); measurements for new sets beyond
//! that go to one overflow series per metric family, with the single attribute
//! `otel.metric.overflow=true`, and are counted in `Counters::metric_series_overflowed`. Series
//! not updated for `idle_expiry` are dropped at the next snapshot, and so is a resource left
//! without series.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::model::{DURATION_BOUNDS_S, Data, HistogramPoint, Metric, Number, NumberPoint, ResourceMetrics, SIZE_BOUNDS_BYTES, Snapshot};
use crate::{
    export::ratelimit::LogLimiter,
    model::{Attributes, Resource, Span, SpanKind, Value},
    telemetry::Counters,
};

/// Span attributes copied onto the server metrics, in this order (when present).
pub const SERVER_ATTRIBUTES: [&str; 6] = [
    "http.request.method",
    "http.response.status_code",
    "http.route",
    "url.scheme",
    "error.type",
    "network.protocol.version",
];

/// Span attributes copied onto the client metrics, in this order (when present).
pub const CLIENT_ATTRIBUTES: [&str; 8] = [
    "http.request.method",
    "http.response.status_code",
    "http.route",
    "url.scheme",
    "error.type",
    "network.protocol.version",
    "server.address",
    "server.port",
];

/// Attributes whose value is an integer; any other listed attribute is a string.
const INT_ATTRIBUTES: [&str; 2] = ["http.response.status_code", "server.port"];

/// The attribute marking the series that collects measurements beyond the cardinality limit.
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

/// At most one overflow warning per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Limits of the aggregation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedConfig {
    /// Distinct attribute sets per resource before new ones go to the overflow series.
    pub max_series_per_resource: usize,
    /// A series not updated for this long is dropped at the next snapshot.
    pub idle_expiry: Duration,
}

impl Default for RedConfig {
    fn default() -> Self {
        RedConfig {
            max_series_per_resource: 2000,
            idle_expiry: Duration::from_secs(600),
        }
    }
}

/// An attribute value as a hashable, ordered key part.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum KeyValue {
    Str(String),
    Int(i64),
}

/// One attribute set: (key, value) in the order of the attribute list.
type Key = Vec<(&'static str, KeyValue)>;

fn key_to_attributes(key: &Key) -> Attributes {
    let mut out = Attributes::default();
    for (k, v) in key {
        match v {
            KeyValue::Str(s) => out.push(*k, s.as_str()),
            KeyValue::Int(i) => out.push(*k, *i),
        }
    }
    out
}

fn overflow_attributes() -> Attributes {
    let mut a = Attributes::default();
    a.push(OVERFLOW_ATTRIBUTE, true);
    a
}

/// Picks the listed attributes from a span, typed as the conventions say.
fn key_of(attributes: &Attributes, keys: &[&'static str]) -> Key {
    let mut out = Vec::with_capacity(keys.len());
    for &k in keys {
        let Some(v) = attributes.get(k) else { continue };
        let value = if INT_ATTRIBUTES.contains(&k) {
            match v {
                Value::Int(i) => KeyValue::Int(*i),
                Value::Str(s) => match s.trim().parse() {
                    Ok(i) => KeyValue::Int(i),
                    Err(_) => continue,
                },
                Value::Double(_) | Value::Bool(_) => continue,
            }
        } else {
            match v {
                Value::Str(s) => KeyValue::Str(s.to_string()),
                other => KeyValue::Str(other.to_string()),
            }
        };
        out.push((k, value));
    }
    out
}

/// A body size attribute as bytes; negative or non-numeric values are ignored.
fn size_of(attributes: &Attributes, key: &str) -> Option<f64> {
    match attributes.get(key)? {
        Value::Int(i) if *i >= 0 => Some(*i as f64),
        Value::Double(d) if *d >= 0.0 && d.is_finite() => Some(*d),
        _ => None,
    }
}

/// A cumulative explicit-bucket histogram.
#[derive(Clone, Debug)]
pub(super) struct Histogram {
    bounds: &'static [f64],
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    buckets: Vec<u64>,
}

impl Histogram {
    pub(super) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            buckets: vec![0; bounds.len() + 1],
        }
    }

    /// Bucket `i` counts values in `(bounds[i-1], bounds[i]]`; the last one everything above.
    pub(super) fn record(&mut self, value: f64) {
        if value.is_nan() {
            return;
        }
        let bucket = self.bounds.partition_point(|b| *b < value);
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    pub(super) fn point(&self, attributes: Attributes, start_unix_nano: u64, time_unix_nano: u64) -> HistogramPoint {
        let seen = self.count > 0;
        HistogramPoint {
            attributes,
            start_unix_nano,
            time_unix_nano,
            count: self.count,
            sum: self.sum,
            bounds: self.bounds.to_vec(),
            bucket_counts: self.buckets.clone(),
            min: seen.then_some(self.min),
            max: seen.then_some(self.max),
        }
    }
}

/// The three histograms of one HTTP attribute set.
#[derive(Clone, Debug)]
struct HttpSeries {
    created: u64,
    updated: u64,
    duration: Histogram,
    request_body: Option<Histogram>,
    response_body: Option<Histogram>,
}

impl HttpSeries {
    fn new(now: u64) -> HttpSeries {
        HttpSeries {
            created: now,
            updated: now,
            duration: Histogram::new(&DURATION_BOUNDS_S),
            request_body: None,
            response_body: None,
        }
    }

    fn record(&mut self, at: u64, seconds: f64, request_body: Option<f64>, response_body: Option<f64>) {
        // `created` stays put even for a span that ended earlier (spans finish out of order): a
        // cumulative series whose start time moves looks like a reset to the backend.
        self.updated = self.updated.max(at);
        self.duration.record(seconds);
        if let Some(size) = request_body {
            self.request_body
                .get_or_insert_with(|| Histogram::new(&SIZE_BOUNDS_BYTES))
                .record(size);
        }
        if let Some(size) = response_body {
            self.response_body
                .get_or_insert_with(|| Histogram::new(&SIZE_BOUNDS_BYTES))
                .record(size);
        }
    }
}

/// One `http.server.active_requests` series. Its times are those of the snapshot that first
/// (and last) saw it set, since the setter carries no time.
#[derive(Clone, Debug, Default)]
struct ActiveSeries {
    created: Option<u64>,
    updated: u64,
    /// Set since the last snapshot.
    touched: bool,
    value: i64,
}

/// Attribute sets of one metric family, plus the overflow series.
#[derive(Clone, Debug)]
struct Table<S> {
    series: BTreeMap<Key, S>,
    overflow: Option<S>,
}

impl<S> Default for Table<S> {
    fn default() -> Self {
        Table {
            series: BTreeMap::new(),
            overflow: None,
        }
    }
}

impl<S> Table<S> {
    /// The series for `key`, created if there is room (`room`), else the overflow series. The
    /// bool is true when the measurement went to the overflow series.
    fn entry(&mut self, key: Key, room: bool, new: impl FnOnce() -> S) -> (&mut S, bool) {
        if room || self.series.contains_key(&key) {
            (self.series.entry(key).or_insert_with(new), false)
        } else {
            (self.overflow.get_or_insert_with(new), true)
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&S) -> bool) {
        self.series.retain(|_, s| keep(s));
        if self.overflow.as_ref().is_some_and(|s| !keep(s)) {
            self.overflow = None;
        }
    }

    /// Every series with its attributes, the overflow series last.
    fn iter(&self) -> impl Iterator<Item = (Attributes, &S)> {
        self.series
            .iter()
            .map(|(k, s)| (key_to_attributes(k), s))
            .chain(self.overflow.iter().map(|s| (overflow_attributes(), s)))
    }

    fn is_empty(&self) -> bool {
        self.series.is_empty() && self.overflow.is_none()
    }
}

/// Everything aggregated for one resource.
#[derive(Debug)]
struct PerResource {
    resource: Arc<Resource>,
    server: Table<HttpSeries>,
    client: Table<HttpSeries>,
    active: Table<ActiveSeries>,
}

impl PerResource {
    /// Regular series (the overflow ones are not counted against the limit).
    fn series_count(&self) -> usize {
        self.server.series.len() + self.client.series.len() + self.active.series.len()
    }

    fn is_empty(&self) -> bool {
        self.server.is_empty() && self.client.is_empty() && self.active.is_empty()
    }
}

/// Cumulative RED metrics of every resource, fed with finished spans.
#[derive(Debug)]
pub struct RedMetrics {
    config: RedConfig,
    counters: Arc<Counters>,
    /// In order of first appearance; few enough for a linear scan (pointer first, then value).
    resources: Vec<PerResource>,
    limiter: LogLimiter,
}

impl RedMetrics {
    /// An empty aggregation; overflowing measurements are counted in `counters`.
    pub fn new(config: RedConfig, counters: Arc<Counters>) -> RedMetrics {
        RedMetrics {
            config,
            counters,
            resources: Vec::new(),
            limiter: LogLimiter::new(LOG_INTERVAL),
        }
    }

    /// Regular (non-overflow) series held now, over all resources.
    pub fn series_count(&self) -> usize {
        self.resources.iter().map(PerResource::series_count).sum()
    }

    fn resource_index(&mut self, resource: &Arc<Resource>) -> usize {
        if let Some(i) = self.resources.iter().position(|r| Arc::ptr_eq(&r.resource, resource)) {
            return i;
        }
        if let Some(i) = self.resources.iter().position(|r| *r.resource == **resource) {
            return i;
        }
        self.resources.push(PerResource {
            resource: resource.clone(),
            server: Table::default(),
            client: Table::default(),
            active: Table::default(),
        });
        self.resources.len() - 1
    }

    fn overflowed(&self, resource: &Resource, n: u64) {
        Counters::add(&self.counters.metric_series_overflowed, n);
        if let Some(held_back) = self.limiter.check(&resource.service_name) {
            tracing::warn!(
                service = resource.service_name,
                limit = self.config.max_series_per_resource,
                held_back,
                overflowed_total = Counters::get(&self.counters.metric_series_overflowed),
                "metric series limit reached: recording into the overflow series"
            );
        }
    }

    /// Adds one finished span to the histograms of its resource. The span's end time counts as
    /// the time of the measurement (series creation and idle expiry).
    pub fn record(&mut self, span: &Span) {
        let (keys, is_server) = match span.kind {
            SpanKind::Server => (&SERVER_ATTRIBUTES[..], true),
            SpanKind::Client => (&CLIENT_ATTRIBUTES[..], false),
        };
        let key = key_of(&span.attributes, keys);
        let seconds = span.duration_ns() as f64 / 1e9;
        let request_body = size_of(&span.attributes, "http.request.body.size");
        let response_body = size_of(&span.attributes, "http.response.body.size");
        let at = span.end_unix_nano;

        let limit = self.config.max_series_per_resource;
        let i = self.resource_index(&span.resource);
        let r = &mut self.resources[i];
        let room = r.series_count() < limit;
        let table = if is_server { &mut r.server } else { &mut r.client };
        let (series, overflowed) = table.entry(key, room, || HttpSeries::new(at));
        series.record(at, seconds, request_body, response_body);
        if overflowed {
            let resource = r.resource.clone();
            self.overflowed(&resource, 1);
        }
    }

    /// Sets `http.server.active_requests` of one resource: `(method, scheme, in-flight count)`.
    /// Replaces the previous call's values; a set missing from `counts` drops to 0 (and expires
    /// once it has not been set for `idle_expiry`). Duplicate entries are added up.
    pub fn set_active_requests(&mut self, resource: &Arc<Resource>, counts: &[(String, String, i64)]) {
        let limit = self.config.max_series_per_resource;
        let i = self.resource_index(resource);
        let r = &mut self.resources[i];
        for s in r.active.series.values_mut().chain(r.active.overflow.as_mut()) {
            s.value = 0;
            s.touched = false;
        }
        let mut overflowed = 0;
        for (method, scheme, n) in counts {
            let key = vec![
                ("http.request.method", KeyValue::Str(method.clone())),
                ("url.scheme", KeyValue::Str(scheme.clone())),
            ];
            let room = r.series_count() < limit;
            let (series, over) = r.active.entry(key, room, ActiveSeries::default);
            series.value += n;
            series.touched = true;
            overflowed += u64::from(over);
        }
        if overflowed > 0 {
            let resource = r.resource.clone();
            self.overflowed(&resource, overflowed);
        }
    }

    /// The cumulative state at `now_unix_nano`, after dropping series idle for `idle_expiry`
    /// and resources left empty. Metrics without points are left out.
    pub fn snapshot(&mut self, now_unix_nano: u64) -> Snapshot {
        let idle = u64::try_from(self.config.idle_expiry.as_nanos()).unwrap_or(u64::MAX);
        let fresh = |updated: u64| now_unix_nano.saturating_sub(updated) < idle;
        for r in &mut self.resources {
            for s in r.active.series.values_mut().chain(r.active.overflow.as_mut()) {
                if s.touched {
                    s.touched = false;
                    s.updated = now_unix_nano;
                    s.created.get_or_insert(now_unix_nano);
                }
            }
            r.server.retain(|s| fresh(s.updated));
            r.client.retain(|s| fresh(s.updated));
            r.active.retain(|s| s.created.is_some() && fresh(s.updated));
        }
        self.resources.retain(|r| !r.is_empty());
        self.resources.iter().map(|r| resource_metrics(r, now_unix_nano)).collect()
    }
}

fn resource_metrics(r: &PerResource, now: u64) -> ResourceMetrics {
    let mut metrics = Vec::new();
    http_metrics(&mut metrics, "server", &r.server, now);
    let active: Vec<NumberPoint> = r
        .active
        .iter()
        .map(|(attributes, s)| NumberPoint {
            attributes,
            start_unix_nano: s.created.unwrap_or(now).min(now),
            time_unix_nano: now,
            value: Number::Int(s.value),
        })
        .collect();
    if !active.is_empty() {
        metrics.push(Metric {
            name: "http.server.active_requests".into(),
            description: "Number of active HTTP server requests.".into(),
            unit: "{request}".into(),
            data: Data::Sum {
                monotonic: false,
                points: active,
            },
        });
    }
    http_metrics(&mut metrics, "client", &r.client, now);
    ResourceMetrics {
        resource: r.resource.clone(),
        metrics,
    }
}

/// The duration and body-size histograms of one side ("server" or "client").
fn http_metrics(out: &mut Vec<Metric>, side: &str, table: &Table<HttpSeries>, now: u64) {
    let histogram = |pick: &dyn Fn(&HttpSeries) -> Option<&Histogram>| -> Vec<HistogramPoint> {
        table
            .iter()
            .filter_map(|(attributes, s)| pick(s).map(|h| h.point(attributes, s.created.min(now), now)))
            .collect()
    };
    let families: [(&str, &str, &str, Vec<HistogramPoint>); 3] = [
        (
            "request.duration",
            "s",
            "Duration of HTTP {side} requests.",
            histogram(&|s| Some(&s.duration)),
        ),
        (
            "request.body.size",
            "By",
            "Size of HTTP {side} request bodies.",
            histogram(&|s| s.request_body.as_ref()),
        ),
        (
            "response.body.size",
            "By",
            "Size of HTTP {side} response bodies.",
            histogram(&|s| s.response_body.as_ref()),
        ),
    ];
    for (suffix, unit, description, points) in families {
        if points.is_empty() {
            continue;
        }
        out.push(Metric {
            name: format!("http.{side}.{suffix}"),
            description: description.replace("{side}", side),
            unit: unit.into(),
            data: Data::Histogram { points },
        });
    }
}

#[cfg(test)]
#[path = "red_tests.rs"]
mod tests;
