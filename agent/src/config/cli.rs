//! The flags of `tapwire run` and `tapwire config`. None has a default here: defaults, the
//! configuration file and the environment are layered under the flags in [`super::resolve`],
//! which records where each value came from.

use std::{net::SocketAddr, path::PathBuf};

use super::file::{
    ContextPropagation, check_payload_bytes, parse_context_propagation, parse_exporter, parse_idle_timeout, parse_max_connections,
    parse_route,
};
use crate::{
    correlate::route::Pattern,
    discover::select::{CgroupPattern, ExeGlob, LabelSelector},
    export::ExporterChoice,
};

fn payload_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    check_payload_bytes(n)
}

#[derive(clap::Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// YAML configuration file (see the README); flags and environment variables override it.
    /// [env: TAPWIRE_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// cgroup v2 directory or glob to watch, with everything below it: absolute, or relative
    /// to the cgroup2 mount; `*` within one path component, `**` across them
    /// (`/kubepods/**/pod*`). Repeatable. [env: TAPWIRE_CGROUPS, comma list]
    #[arg(long = "cgroup", value_name = "PATH", value_parser = CgroupPattern::parse)]
    pub cgroups: Vec<CgroupPattern>,
    /// cgroup directory or glob never watched, with everything below it. Repeatable.
    /// [env: TAPWIRE_EXCLUDE_CGROUPS]
    #[arg(long = "exclude-cgroup", value_name = "PATH", value_parser = CgroupPattern::parse)]
    pub exclude_cgroups: Vec<CgroupPattern>,
    /// Kubernetes namespace whose pods are watched. Repeatable. [env: TAPWIRE_NAMESPACES]
    #[arg(long = "namespace", value_name = "NAME")]
    pub namespaces: Vec<String>,
    /// Kubernetes namespace whose pods are never watched. Repeatable.
    /// [env: TAPWIRE_EXCLUDE_NAMESPACES]
    #[arg(long = "exclude-namespace", value_name = "NAME")]
    pub exclude_namespaces: Vec<String>,
    /// Pod label selector (`app=web,tier in (front,api)`); pods matching any are watched.
    /// Repeatable. [env: TAPWIRE_POD_SELECTORS, `;`-separated]
    #[arg(long = "pod-selector", value_name = "SELECTOR", value_parser = LabelSelector::parse)]
    pub pod_selectors: Vec<LabelSelector>,
    /// Pod label selector of pods never watched. Repeatable.
    /// [env: TAPWIRE_EXCLUDE_POD_SELECTORS, `;`-separated]
    #[arg(long = "exclude-pod-selector", value_name = "SELECTOR", value_parser = LabelSelector::parse)]
    pub exclude_pod_selectors: Vec<LabelSelector>,
    /// Watch processes listening on this TCP port. Repeatable. [env: TAPWIRE_PORTS]
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Never watch processes listening on this TCP port. Repeatable. [env: TAPWIRE_EXCLUDE_PORTS]
    #[arg(long = "exclude-port", value_name = "PORT")]
    pub exclude_ports: Vec<u16>,
    /// Watch processes whose executable file name matches this glob (`python3*`). Repeatable.
    /// [env: TAPWIRE_EXECUTABLES]
    #[arg(long = "exe", value_name = "GLOB", value_parser = ExeGlob::parse)]
    pub executables: Vec<ExeGlob>,
    /// Never watch processes whose executable name matches this glob. Repeatable.
    /// [env: TAPWIRE_EXCLUDE_EXECUTABLES]
    #[arg(long = "exclude-exe", value_name = "GLOB", value_parser = ExeGlob::parse)]
    pub exclude_executables: Vec<ExeGlob>,
    /// Leave out processes that export OTLP traces themselves (default true).
    /// [env: TAPWIRE_EXCLUDE_OTLP_EXPORTERS]
    #[arg(long, value_name = "BOOL")]
    pub exclude_otlp_exporters: Option<bool>,
    /// Payload bytes captured per syscall, 64..4096 (default 1024; enough for HTTP heads).
    /// [env: TAPWIRE_PAYLOAD_BYTES]
    #[arg(long, value_name = "N", value_parser = payload_bytes)]
    pub payload_bytes: Option<u32>,
    /// `headers` (default): insert a W3C `traceparent` into outbound plaintext HTTP/1 requests
    /// of watched processes that carry none, so the next service joins the trace; `off`: change
    /// no byte. [env: TAPWIRE_CONTEXT_PROPAGATION]
    #[arg(long, value_name = "MODE", value_parser = parse_context_propagation)]
    pub context_propagation: Option<ContextPropagation>,
    /// Forget a connection after this long without any read, write or close (default 120s;
    /// `500ms`, `30s`, `2m`); its unanswered requests end as timed-out spans.
    /// [env: TAPWIRE_IDLE_TIMEOUT]
    #[arg(long, value_name = "DURATION", value_parser = parse_idle_timeout)]
    pub idle_timeout: Option<std::time::Duration>,
    /// Connections tracked at once (default 65536); past it the least recently used is
    /// forgotten and counted. [env: TAPWIRE_MAX_CONNECTIONS]
    #[arg(long, value_name = "N", value_parser = parse_max_connections)]
    pub max_connections: Option<usize>,
    /// Where spans go: auto (OTLP when an OTEL_EXPORTER_OTLP_*ENDPOINT is set, else console),
    /// console, otlp, none. [env: TAPWIRE_EXPORTER]
    #[arg(long, value_name = "EXPORTER", value_parser = parse_exporter)]
    pub exporter: Option<ExporterChoice>,
    /// Route template for `http.route`, e.g. `/users/{id}` or `/static/*`; tried in order before
    /// the built-in heuristic (identifier-like segments become `{id}`). Repeatable.
    /// [env: TAPWIRE_ROUTES, comma list]
    #[arg(long = "route", value_name = "PATTERN", value_parser = parse_route)]
    pub routes: Vec<Pattern>,
    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz), e.g. 0.0.0.0:9464.
    /// [env: TAPWIRE_PROMETHEUS_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub prometheus_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub sampling: crate::sampling::SamplingArgs,
}
