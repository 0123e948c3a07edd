//! A [`Snapshot`] in the Prometheus text exposition format (0.0.4), mapped as the OpenTelemetry
//! "Prometheus and OpenMetrics compatibility" spec says:
//!
//! - names: every character outside `[a-zA-Z0-9_:]` becomes `_` (so dots become underscores),
//!   runs of `_` collapse, a leading digit gets a `_` prefix; the unit is appended as a word
//!   (`s` -> `_seconds`, `By` -> `_bytes`, `1` -> `_ratio` except on counters, `{...}`
//!   annotations dropped, `X/Y` -> `X_per_Y`) unless the name already ends with it; monotonic
//!   sums are counters and end in `_total`; other sums and gauges are gauges; histograms are
//!   `_bucket{le=...}` (cumulative, up to `le="+Inf"`), `_sum` and `_count`.
//! - labels: attribute keys sanitised the same way (a leading digit gets `key_`, a leading `_`
//!   gets `key`); keys that collide after sanitising get their values joined with `;` in key
//!   order. Every sample carries `job` (`service.namespace/service.name`, or `service.name`)
//!   and `instance` (`service.instance.id`) of its resource; point attributes named `job`,
//!   `instance` or `le` are dropped, never duplicated.
//! - one `target_info` gauge per resource carries its other attributes.
//!
//! Families with the same name from several resources are merged (one HELP and TYPE). A metric
//! whose name maps onto an existing family of another type, and a sample whose label set is
//! already present, are left out rather than produce an exposition Prometheus rejects.
//!
//! Why not the `prometheus-client` crate: it only writes OpenMetrics 1.0 text, where a counter
//! family `x` has samples `x_total`; `promtool check metrics` (which the e2e tests run) parses
//! that with the classic parser and reports "no help text" for `x_total`. The classic format
//! here is accepted by both Prometheus and promtool.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
};

use crate::{
    export::metrics::encode::group_by_resource,
    metrics::model::{Data, HistogramPoint, Metric, Number, NumberPoint, Snapshot},
    model::{Attributes, Resource, Value},
};

/// `Content-Type` of the rendered text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family: its metadata and sample lines.
struct Family {
    name: String,
    help: String,
    kind: Kind,
    lines: String,
    /// Label sets already written (rendered), to leave out duplicates.
    seen: HashSet<String>,
}

/// The families in order of first appearance, by name.
#[derive(Default)]
struct Families {
    list: Vec<Family>,
    index: HashMap<String, usize>,
}

impl Families {
    /// The family `name`, created if new; `None` when it exists with another type (the later
    /// metric is left out).
    fn get(&mut self, name: &str, help: &str, kind: Kind) -> Option<&mut Family> {
        let i = match self.index.get(name) {
            Some(i) => *i,
            None => {
                self.list.push(Family {
                    name: name.to_owned(),
                    help: help.to_owned(),
                    kind,
                    lines: String::new(),
                    seen: HashSet::new(),
                });
                self.index.insert(name.to_owned(), self.list.len() - 1);
                self.list.len() - 1
            }
        };
        let f = &mut self.list[i];
        (f.kind == kind).then_some(f)
    }
}

/// Renders a snapshot; resources equal by value are merged first.
pub fn render(snapshot: &Snapshot) -> String {
    let groups = group_by_resource(snapshot);
    let mut families = Families::default();

    // target_info first, one sample per resource.
    for (resource, _) in &groups {
        let mut labels = identity_labels(resource);
        labels.extend(
            merge_labels(&resource.attributes, &["service.name", "service.namespace", "service.instance.id"])
                .into_iter()
                .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance")),
        );
        if let Some(f) = families.get("target_info", "Target metadata", Kind::Gauge) {
            push_sample(f, "target_info", &labels, None, "1");
        }
    }

    for (resource, metrics) in &groups {
        let base = identity_labels(resource);
        for metric in metrics {
            let kind = match &metric.data {
                Data::Sum { monotonic: true, .. } => Kind::Counter,
                Data::Sum { monotonic: false, .. } | Data::Gauge { .. } => Kind::Gauge,
                Data::Histogram { .. } => Kind::Histogram,
            };
            let name = metric_name(metric, kind);
            let help = if metric.description.is_empty() {
                metric.name.as_str()
            } else {
                metric.description.as_str()
            };
            let Some(f) = families.get(&name, help, kind) else {
                tracing::debug!(metric = metric.name, "metric left out of /metrics: its name is taken by a metric of another type");
                continue;
            };
            match &metric.data {
                Data::Sum { points, .. } | Data::Gauge { points } => {
                    for p in points {
                        number_sample(f, &name, &base, p);
                    }
                }
                Data::Histogram { points } => {
                    for p in points {
                        histogram_samples(f, &name, &base, p);
                    }
                }
            }
        }
    }

    let mut out = String::new();
    for f in families.list.iter().filter(|f| !f.lines.is_empty()) {
        let help = if f.help.is_empty() { &f.name } else { &f.help };
        let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(help));
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
        out.push_str(&f.lines);
    }
    out
}

fn number_sample(f: &mut Family, name: &str, base: &[(String, String)], p: &NumberPoint) {
    let labels = point_labels(base, &p.attributes);
    let value = match p.value {
        Number::Int(i) => i.to_string(),
        Number::Double(d) => format_float(d),
    };
    push_sample(f, name, &labels, None, &value);
}

fn histogram_samples(f: &mut Family, name: &str, base: &[(String, String)], p: &HistogramPoint) {
    let labels = point_labels(base, &p.attributes);
    let key = render_labels(&labels, None);
    if !f.seen.insert(key) {
        return;
    }
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (bound, n) in p.bounds.iter().zip(&p.bucket_counts) {
        cumulative += n;
        if bound.is_finite() {
            write_line(&mut f.lines, &bucket, &labels, Some(&format_float(*bound)), &cumulative.to_string());
        }
    }
    write_line(&mut f.lines, &bucket, &labels, Some("+Inf"), &p.count.to_string());
    write_line(&mut f.lines, &format!("{name}_sum"), &labels, None, &format_float(p.sum));
    write_line(&mut f.lines, &format!("{name}_count"), &labels, None, &p.count.to_string());
}

/// Writes one sample unless its label set is already in the family.
fn push_sample(f: &mut Family, name: &str, labels: &[(String, String)], le: Option<&str>, value: &str) {
    if f.seen.insert(render_labels(labels, le)) {
        write_line(&mut f.lines, name, labels, le, value);
    }
}

fn write_line(out: &mut String, name: &str, labels: &[(String, String)], le: Option<&str>, value: &str) {
    out.push_str(name);
    out.push_str(&render_labels(labels, le));
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// `{k="v",...}` (with `le` last), or nothing when there are no labels.
fn render_labels(labels: &[(String, String)], le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let mut first = true;
    for (k, v) in labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
    out
}

/// `job` and `instance` of a resource (each only when it has the attributes).
fn identity_labels(resource: &Resource) -> Vec<(String, String)> {
    let get = |k: &str| resource.attributes.get(k).map(Value::to_string).filter(|v| !v.is_empty());
    let name = get("service.name").or_else(|| (!resource.service_name.is_empty()).then(|| resource.service_name.clone()));
    let job = match (get("service.namespace"), name) {
        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
        (None, Some(name)) => Some(name),
        (Some(ns), None) => Some(ns),
        (None, None) => None,
    };
    let mut out = Vec::new();
    if let Some(job) = job {
        out.push(("job".to_owned(), job));
    }
    if let Some(instance) = get("service.instance.id") {
        out.push(("instance".to_owned(), instance));
    }
    out
}

/// The resource's identity labels followed by the point's attributes (minus reserved names).
fn point_labels(base: &[(String, String)], attributes: &Attributes) -> Vec<(String, String)> {
    let mut labels = base.to_vec();
    labels.extend(
        merge_labels(attributes, &[])
            .into_iter()
            .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance" | "le")),
    );
    labels
}

/// Attributes as labels: keys sanitised, `skip` left out, values of colliding keys joined with
/// `;` in the order of their original keys. Labels stay in order of first appearance.
fn merge_labels(attributes: &Attributes, skip: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, Vec<(&str, String)>)> = Vec::new();
    for (key, value) in &attributes.0 {
        if skip.contains(&key.as_ref()) {
            continue;
        }
        let name = sanitize_label(key);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push((key, value.to_string())),
            None => out.push((name, vec![(key, value.to_string())])),
        }
    }
    out.into_iter()
        .map(|(name, mut values)| {
            values.sort_by(|a, b| a.0.cmp(b.0));
            let joined = values.into_iter().map(|(_, v)| v).collect::<Vec<_>>().join(";");
            (name, joined)
        })
        .collect()
}

/// The Prometheus name of a metric: sanitised, unit word appended, `_total` for counters.
fn metric_name(metric: &Metric, kind: Kind) -> String {
    let mut name = sanitize_name(&metric.name);
    if let Some(unit) = unit_suffix(&metric.unit, kind)
        && !name.ends_with(&format!("_{unit}"))
    {
        name.push('_');
        name.push_str(&unit);
    }
    if kind == Kind::Counter && !name.ends_with("_total") {
        name.push_str("_total");
    }
    name
}

/// `[a-zA-Z0-9_:]` only, no runs of `_`, no leading digit.
fn sanitize_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || c == ':' { c } else { '_' };
        if c == '_' && out.ends_with('_') {
            continue;
        }
        out.push(c);
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// `[a-zA-Z0-9_]` only; a leading digit gets `key_`, a leading `_` gets `key`.
fn sanitize_label(key: &str) -> String {
    let mut out: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "key_");
    } else if out.starts_with('_') {
        out.insert_str(0, "key");
    }
    out
}

/// The unit as a name suffix, `None` when there is none (empty or only annotations).
fn unit_suffix(unit: &str, kind: Kind) -> Option<String> {
    // `{request}` and `{packet}/s` style annotations carry no unit.
    let mut plain = String::new();
    let mut depth = 0u32;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            c if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let plain = plain.trim();
    if plain.is_empty() {
        return None;
    }
    if plain == "1" {
        // A ratio; a counter of "1" is a plain count.
        return (kind != Kind::Counter).then(|| "ratio".to_owned());
    }
    let (num, per) = match plain.split_once('/') {
        Some((n, d)) => (n.trim(), Some(d.trim())),
        None => (plain, None),
    };
    let num = match num {
        "" | "1" => None,
        n => Some(unit_word(n)),
    };
    let per = per.filter(|d| !d.is_empty()).map(per_unit_word);
    let word = match (num, per) {
        (Some(n), Some(d)) => format!("{n}_per_{d}"),
        (None, Some(d)) => format!("per_{d}"),
        (Some(n), None) => n,
        (None, None) => return None,
    };
    let word = sanitize_name(&word);
    Some(word.trim_matches('_').to_owned()).filter(|w| !w.is_empty())
}

fn unit_word(unit: &str) -> String {
    match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tebibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "bit" => "bits",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        other => other,
    }
    .to_owned()
}

fn per_unit_word(unit: &str) -> String {
    match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        other => other,
    }
    .to_owned()
}

/// Go-compatible float text: `+Inf`, `-Inf`, `NaN`, else the shortest round-trip decimal.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        v.to_string()
    }
}

/// Label values: backslash, double quote and line feed escaped.
fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn names_units_and_suffixes() {
        let m = |name: &str, unit: &str, kind: Kind| {
            metric_name(
                &Metric {
                    name: name.into(),
                    description: String::new(),
                    unit: unit.into(),
                    data: Data::Gauge { points: vec![] },
                },
                kind,
            )
        };
        assert_eq!(m("http.server.request.duration", "s", Kind::Histogram), "http_server_request_duration_seconds");
        assert_eq!(m("http.server.request.body.size", "By", Kind::Histogram), "http_server_request_body_size_bytes");
        assert_eq!(m("http.server.active_requests", "{request}", Kind::Gauge), "http_server_active_requests");
        assert_eq!(m("tapwire.agent.events.read", "{event}", Kind::Counter), "tapwire_agent_events_read_total");
        assert_eq!(m("process.cpu.time", "s", Kind::Counter), "process_cpu_time_seconds_total");
        assert_eq!(m("process.cpu.utilization", "1", Kind::Gauge), "process_cpu_utilization_ratio");
        assert_eq!(m("system.network.io", "By/s", Kind::Gauge), "system_network_io_bytes_per_second");
        assert_eq!(m("packets", "{packet}/s", Kind::Gauge), "packets_per_second");
        assert_eq!(m("already_seconds", "s", Kind::Gauge), "already_seconds");
        assert_eq!(m("requests_total", "", Kind::Counter), "requests_total");
        assert_eq!(m("odd-name..x", "", Kind::Gauge), "odd_name_x");
        assert_eq!(m("9lives", "ms", Kind::Gauge), "_9lives_milliseconds");
        assert_eq!(m("count", "1", Kind::Counter), "count_total");
    }

    #[test]
    fn label_keys_are_sanitised() {
        assert_eq!(sanitize_label("http.request.method"), "http_request_method");
        assert_eq!(sanitize_label("9x"), "key_9x");
        assert_eq!(sanitize_label("_x"), "key_x");
        assert_eq!(sanitize_label("__x"), "key__x");
        assert_eq!(sanitize_label("a-b/c"), "a_b_c");
    }

    #[test]
    fn floats_and_escapes() {
        assert_eq!(format_float(0.005), "0.005");
        assert_eq!(format_float(1.0), "1");
        assert_eq!(format_float(1e10), "10000000000");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }
}
