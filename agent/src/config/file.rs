//! The YAML configuration file (`--config FILE`): every section and key, with its meaning.
//!
//! Every key is optional: what the file leaves out comes from the defaults, and the
//! environment and the command line override what it sets. Unknown keys are errors.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{
    correlate::route::Pattern,
    discover::select::{CgroupPattern, ExeGlob, LabelSelector},
    export::ExporterChoice,
};

/// The whole file.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Which services to watch (cgroups, Kubernetes pods, ports, executables) and which not.
    #[serde(default)]
    pub selection: SelectionFile,
    /// What the kernel side copies.
    #[serde(default)]
    pub capture: CaptureFile,
    /// HTTP-specific settings.
    #[serde(default)]
    pub http: HttpFile,
    /// Where spans and metrics go.
    #[serde(default)]
    pub export: ExportFile,
    /// Resource attributes added to every service tapwire reports.
    #[serde(default)]
    pub resource: ResourceFile,
    /// Kubernetes metadata (pod names, owners, labels).
    #[serde(default)]
    pub kubernetes: KubernetesFile,
    /// Span sampling.
    #[serde(default)]
    pub sampling: SamplingFile,
    /// The agent's own log filter (tracing `EnvFilter` syntax, e.g. `info,tapwire=debug`).
    pub log: Option<String>,
}

/// Selection: a process is watched when it matches every kind of criterion given (cgroups,
/// namespaces, pod selectors, ports, executables; any one value of a kind is enough) and no
/// exclusion.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionFile {
    /// cgroup v2 paths or globs (relative to the cgroup2 mount, or absolute inside it); each
    /// selects the matching directories and everything below them. `*` stays within one path
    /// component, `**` spans any number of them: `/kubepods/**/pod*`.
    pub cgroups: Option<Vec<CgroupPattern>>,
    /// cgroup paths or globs whose directories (and everything below them) are never watched.
    pub exclude_cgroups: Option<Vec<CgroupPattern>>,
    /// Kubernetes namespaces whose pods are watched.
    pub namespaces: Option<Vec<String>>,
    /// Kubernetes namespaces whose pods are never watched.
    pub exclude_namespaces: Option<Vec<String>>,
    /// Kubernetes label selectors (`app=web,tier in (front,api)`); a pod matching any is watched.
    pub pod_selectors: Option<Vec<LabelSelector>>,
    /// Label selectors of pods that are never watched.
    pub exclude_pod_selectors: Option<Vec<LabelSelector>>,
    /// TCP ports: processes listening on any of them are watched.
    pub ports: Option<Vec<u16>>,
    /// TCP ports: processes listening on any of them are never watched.
    pub exclude_ports: Option<Vec<u16>>,
    /// Executable name globs (`python3*`, `nginx`): matching processes are watched.
    pub executables: Option<Vec<ExeGlob>>,
    /// Executable name globs of processes that are never watched.
    pub exclude_executables: Option<Vec<ExeGlob>>,
    /// Leave out processes that export OTLP traces themselves (an OpenTelemetry SDK or agent);
    /// default true.
    pub exclude_otlp_exporters: Option<bool>,
}

/// Kernel-side capture.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    /// Payload bytes copied per syscall, 64..4096 (default 1024).
    pub payload_bytes: Option<PayloadBytes>,
    /// `headers` (default) or `off`: whether outbound HTTP/1 requests get a `traceparent`.
    pub context_propagation: Option<ContextPropagationFile>,
    /// A connection without any event for this long is forgotten (`120s`; `ms`, `s`, `m`).
    pub idle_timeout: Option<IdleTimeout>,
    /// Connections tracked at once; past it the least recently used is forgotten (65536).
    pub max_connections: Option<MaxConnections>,
}

/// HTTP settings.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpFile {
    /// Route templates for `http.route` (`/users/{id}`, `/static/*`), tried in order.
    pub routes: Option<Vec<Route>>,
}

/// Export settings. The `otlp` keys are the file form of the standard `OTEL_*` variables,
/// which override them.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFile {
    /// `auto`, `console`, `otlp` or `none` (default auto).
    pub exporter: Option<Exporter>,
    /// Address of the Prometheus endpoint (`0.0.0.0:9464`); unset: no endpoint.
    pub prometheus_listen: Option<std::net::SocketAddr>,
    /// OTLP exporter settings.
    #[serde(default)]
    pub otlp: OtlpFile,
}

/// OTLP exporter settings; each names the variable that overrides it.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpFile {
    /// Collector base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Full URL for traces (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub traces_endpoint: Option<String>,
    /// Full URL for metrics (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`).
    pub metrics_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (`OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub protocol: Option<String>,
    /// Headers sent with every request (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Option<BTreeMap<String, String>>,
    /// Per-request timeout in ms (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub timeout_ms: Option<u64>,
    /// `gzip` or `none` (`OTEL_EXPORTER_OTLP_COMPRESSION`).
    pub compression: Option<String>,
    /// `otlp`, `console` or `none`, read when `exporter` is auto (`OTEL_TRACES_EXPORTER`).
    pub traces_exporter: Option<String>,
    /// `otlp`, `prometheus`, `console`, `none`, comma list (`OTEL_METRICS_EXPORTER`).
    pub metrics_exporter: Option<String>,
    /// OTLP metrics push interval in ms (`OTEL_METRIC_EXPORT_INTERVAL`).
    pub metric_export_interval_ms: Option<u64>,
    /// Span export queue capacity (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_queue_size: Option<u64>,
    /// Spans per export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub max_export_batch_size: Option<u64>,
    /// Longest a span waits for its batch, ms (`OTEL_BSP_SCHEDULE_DELAY`).
    pub schedule_delay_ms: Option<u64>,
    /// Longest one batch export may take, ms (`OTEL_BSP_EXPORT_TIMEOUT`).
    pub export_timeout_ms: Option<u64>,
}

/// Resource attributes.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceFile {
    /// Added to every service's resource (`deployment.environment.name: prod`); the agent's
    /// own `OTEL_RESOURCE_ATTRIBUTES` overrides them key by key.
    pub attributes: Option<BTreeMap<String, String>>,
}

/// Kubernetes metadata (`kubernetes:`): pod names, owners and labels from the API server.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesFile {
    /// `auto` (default: when running in a pod, or when `kubeconfig`/`api_url` is set), `on`
    /// (an error when impossible) or `off`, as `TAPWIRE_K8S`.
    pub mode: Option<String>,
    /// This node's name, to watch only its pods, as `NODE_NAME` (the DaemonSet sets it from
    /// the downward API).
    pub node_name: Option<String>,
    /// A kubeconfig file instead of the in-cluster service account, as `TAPWIRE_K8S_KUBECONFIG`.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// An API server URL used as-is, without credentials (`kubectl proxy`), as
    /// `TAPWIRE_K8S_API_URL`.
    pub api_url: Option<String>,
}

/// Span sampling (`sampling:`); each key is overridden by its variable and flag.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingFile {
    /// Head sampler, as `OTEL_TRACES_SAMPLER` (`parentbased_traceidratio`, ...).
    pub sampler: Option<String>,
    /// Ratio of the `*traceidratio` samplers, as `OTEL_TRACES_SAMPLER_ARG`.
    pub ratio: Option<f64>,
    /// Keep spans with Error status even when head sampling dropped their trace, as
    /// `TAPWIRE_KEEP_ERRORS`.
    pub keep_errors: Option<bool>,
    /// Latency keep rules (`2s`, `checkout:/pay/{id}=500ms`), as `TAPWIRE_KEEP_SLOWER_THAN`.
    pub keep_slower_than: Option<Vec<String>>,
    /// Head sampler overrides by `service.name`, in file order.
    #[serde(default, deserialize_with = "ordered_map")]
    pub services: Vec<(String, ServiceSamplingFile)>,
}

/// One service's head sampler.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSamplingFile {
    /// Head sampler name (default: the agent-wide one).
    pub sampler: Option<String>,
    /// Ratio of a `*traceidratio` sampler.
    pub ratio: Option<f64>,
}

impl SamplingFile {
    /// The form `crate::sampling` resolves.
    pub fn to_sampling(&self) -> crate::sampling::SamplingFile {
        crate::sampling::SamplingFile {
            sampler: self.sampler.clone(),
            ratio: self.ratio,
            keep_errors: self.keep_errors,
            keep_slower_than: self.keep_slower_than.clone(),
            services: self
                .services
                .iter()
                .map(|(k, v)| (k.clone(), crate::sampling::ServiceSamplingFile { sampler: v.sampler.clone(), ratio: v.ratio }))
                .collect(),
        }
    }
}

/// A YAML mapping kept in file order.
fn ordered_map<'de, D, V>(d: D) -> Result<Vec<(String, V)>, D::Error>
where
    D: serde::Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visit<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
        type Value = Vec<(String, V)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a mapping of service names")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, V)> = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, V>()? {
                if out.iter().any(|(seen, _)| *seen == k) {
                    return Err(serde::de::Error::custom(format!("service {k:?} appears twice")));
                }
                out.push((k, v));
            }
            Ok(out)
        }
    }
    d.deserialize_map(Visit(std::marker::PhantomData))
}

/// Payload bytes per syscall: the one range check shared by every source.
pub fn check_payload_bytes(n: u32) -> Result<u32, String> {
    let max = tapwire_common::MAX_PAYLOAD as u32;
    if (64..=max).contains(&n) { Ok(n) } else { Err(format!("{n} is out of range: expected 64..={max}")) }
}

/// `auto`, `console`, `otlp` or `none`.
pub fn parse_exporter(s: &str) -> Result<ExporterChoice, String> {
    <ExporterChoice as clap::ValueEnum>::from_str(s.trim(), true)
        .map_err(|_| format!("{s:?}: unknown exporter, expected `auto`, `console`, `otlp` or `none`"))
}

/// Whether tapwire inserts `traceparent` into outbound plaintext HTTP/1 requests that carry
/// none (sock_ops, sk_msg and sk_skb programs on the watched cgroups' client sockets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ContextPropagation {
    /// Insert `traceparent: 00-<trace id>-<client span id>-<flags>` after the request line.
    #[default]
    Headers,
    /// Change no byte and attach none of the propagation programs.
    Off,
}

pub fn parse_context_propagation(s: &str) -> Result<ContextPropagation, String> {
    <ContextPropagation as clap::ValueEnum>::from_str(s.trim(), true)
        .map_err(|_| format!("{s:?}: unknown context propagation, expected `headers` or `off`"))
}

/// A context propagation mode checked while the file is read.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct ContextPropagationFile(pub ContextPropagation);

impl TryFrom<String> for ContextPropagationFile {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_context_propagation(&s).map(ContextPropagationFile).map_err(|e| format!("context_propagation: {e}"))
    }
}

/// A route template (`/users/{id}`).
pub fn parse_route(s: &str) -> Result<Pattern, String> {
    Pattern::parse(s.trim()).map_err(|e| e.to_string())
}

/// A payload size checked while the file is read (so the error has the line). The message
/// names the key itself: the YAML crate's path stops at the enclosing section for scalars.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "u32")]
pub struct PayloadBytes(pub u32);

impl TryFrom<u32> for PayloadBytes {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        check_payload_bytes(n).map(PayloadBytes).map_err(|e| format!("payload_bytes: {e}"))
    }
}

/// Connection idle timeout: the one check shared by every source (1 ms .. 1 day).
pub fn parse_idle_timeout(s: &str) -> Result<std::time::Duration, String> {
    let ns = crate::sampling::keep::parse_duration(s.trim())?;
    let d = std::time::Duration::from_nanos(ns);
    if (std::time::Duration::from_millis(1)..=std::time::Duration::from_secs(86_400)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{s:?} is out of range: expected 1ms..=24h"))
    }
}

/// Connection table size: the one check shared by every source.
pub fn parse_max_connections(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    check_max_connections(n)
}

fn check_max_connections(n: usize) -> Result<usize, String> {
    const MAX: usize = 1 << 22;
    if (1..=MAX).contains(&n) { Ok(n) } else { Err(format!("{n} is out of range: expected 1..={MAX}")) }
}

/// An idle timeout checked while the file is read.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct IdleTimeout(pub std::time::Duration);

impl TryFrom<String> for IdleTimeout {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_idle_timeout(&s).map(IdleTimeout).map_err(|e| format!("idle_timeout: {e}"))
    }
}

/// A connection table size checked while the file is read.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "usize")]
pub struct MaxConnections(pub usize);

impl TryFrom<usize> for MaxConnections {
    type Error = String;
    fn try_from(n: usize) -> Result<Self, String> {
        check_max_connections(n).map(MaxConnections).map_err(|e| format!("max_connections: {e}"))
    }
}

/// An exporter name checked while the file is read.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Exporter(pub ExporterChoice);

impl TryFrom<String> for Exporter {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_exporter(&s).map(Exporter).map_err(|e| format!("exporter: {e}"))
    }
}

/// A route template checked while the file is read.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub struct Route(pub Pattern);

impl TryFrom<String> for Route {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_route(&s).map(Route)
    }
}
