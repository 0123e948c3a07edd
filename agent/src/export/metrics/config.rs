//! Where metrics go and how often, from the standard OpenTelemetry environment variables.
//!
//! `OTEL_METRICS_EXPORTER` is a comma list of `otlp`, `prometheus`, `console` (or `logging`) and
//! `none`. When it is not set, tapwire follows the span exporter's choice instead of the spec's
//! plain `otlp` default, so that an agent without a collector does not log a connection failure
//! every minute: OTLP when the choice is `otlp`, or when it is `auto` and an OTLP endpoint
//! variable (generic or `_METRICS_`) is set; nothing otherwise. Prometheus is also enabled by the
//! CLI's `--prometheus-listen` ([`MetricsExportConfig::with_prometheus_listen`]).
//!
//! The OTLP variables follow the exporter spec exactly as for traces: `_METRICS_` forms win over
//! the generic ones, and the generic endpoint gets `/v1/metrics` appended for http/protobuf.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use crate::export::config::{
    ConfigError, ENDPOINT, Env, ExporterChoice, OtlpConfig, SignalVars, get, otlp_config, parse_positive,
};

/// Full URL for metrics, used as-is.
pub const METRICS_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT";
/// `grpc` or `http/protobuf`, for metrics.
pub const METRICS_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL";
/// `k=v,k2=v2` for metrics (replaces the generic list).
pub const METRICS_HEADERS: &str = "OTEL_EXPORTER_OTLP_METRICS_HEADERS";
/// Per-request timeout in milliseconds, for metrics.
pub const METRICS_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT";
/// `gzip` or `none`, for metrics.
pub const METRICS_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION";
/// Comma list of `otlp`, `prometheus`, `console` (`logging`), `none`.
pub const METRICS_EXPORTER: &str = "OTEL_METRICS_EXPORTER";
/// Milliseconds between two pushes (OTLP, console). Default 60000.
pub const METRIC_EXPORT_INTERVAL: &str = "OTEL_METRIC_EXPORT_INTERVAL";
/// Milliseconds one push may take, retries included. Default 30000.
pub const METRIC_EXPORT_TIMEOUT: &str = "OTEL_METRIC_EXPORT_TIMEOUT";
/// Address the Prometheus endpoint listens on when chosen by `OTEL_METRICS_EXPORTER` (an IP
/// address or `localhost`). Default `localhost`.
pub const PROMETHEUS_HOST: &str = "OTEL_EXPORTER_PROMETHEUS_HOST";
/// Port of the Prometheus endpoint. Default 9464.
pub const PROMETHEUS_PORT: &str = "OTEL_EXPORTER_PROMETHEUS_PORT";

/// Default of `OTEL_EXPORTER_PROMETHEUS_PORT`.
pub const DEFAULT_PROMETHEUS_PORT: u16 = 9464;

/// The metrics signal's variables.
const METRICS: SignalVars = SignalVars {
    endpoint: METRICS_ENDPOINT,
    protocol: METRICS_PROTOCOL,
    headers: METRICS_HEADERS,
    timeout: METRICS_TIMEOUT,
    compression: METRICS_COMPRESSION,
    path: "v1/metrics",
};

/// The resolved metrics export configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsExportConfig {
    /// Push to an OTLP collector, when set.
    pub otlp: Option<OtlpConfig>,
    /// Print each pushed snapshot to stdout (Prometheus text format).
    pub console: bool,
    /// Serve `/metrics` on this address, when set.
    pub prometheus: Option<SocketAddr>,
    /// Time between two pushes (`OTEL_METRIC_EXPORT_INTERVAL`).
    pub interval: Duration,
    /// Longest one push may take, retries included (`OTEL_METRIC_EXPORT_TIMEOUT`).
    pub export_timeout: Duration,
}

impl Default for MetricsExportConfig {
    /// Nothing exported; the spec's interval and timeout.
    fn default() -> Self {
        MetricsExportConfig {
            otlp: None,
            console: false,
            prometheus: None,
            interval: Duration::from_millis(60_000),
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

impl MetricsExportConfig {
    /// Resolves the configuration from `env`; `traces` is the span exporter's choice (the CLI's
    /// `--exporter`), consulted only when `OTEL_METRICS_EXPORTER` is not set.
    pub fn resolve(traces: ExporterChoice, env: Env<'_>) -> Result<MetricsExportConfig, ConfigError> {
        let mut cfg = MetricsExportConfig::default();
        let number = |var: &'static str| get(env, var).map(|(var, value)| parse_positive(var, value)).transpose();
        if let Some(ms) = number(METRIC_EXPORT_INTERVAL)? {
            cfg.interval = Duration::from_millis(ms);
        }
        if let Some(ms) = number(METRIC_EXPORT_TIMEOUT)? {
            cfg.export_timeout = Duration::from_millis(ms);
        }
        let (mut otlp, mut prometheus) = (false, false);
        match get(env, METRICS_EXPORTER) {
            Some((var, value)) => {
                for name in value.split(',').map(|n| n.trim().to_ascii_lowercase()) {
                    match name.as_str() {
                        "otlp" => otlp = true,
                        "prometheus" => prometheus = true,
                        "console" | "logging" => cfg.console = true,
                        "none" | "" => {}
                        _ => return Err(ConfigError::UnknownMetricsExporter { var, value }),
                    }
                }
            }
            None => {
                otlp = match traces {
                    ExporterChoice::Otlp => true,
                    ExporterChoice::Auto => get(env, METRICS_ENDPOINT).is_some() || get(env, ENDPOINT).is_some(),
                    ExporterChoice::Console | ExporterChoice::None => false,
                };
            }
        }
        if otlp {
            cfg.otlp = Some(otlp_config(env, &METRICS)?);
        }
        if prometheus {
            cfg.prometheus = Some(prometheus_addr(env)?);
        }
        Ok(cfg)
    }

    /// `--prometheus-listen`: when given, serve Prometheus there (the CLI wins over the
    /// environment); when `None`, keep what the environment chose.
    pub fn with_prometheus_listen(mut self, listen: Option<SocketAddr>) -> MetricsExportConfig {
        if listen.is_some() {
            self.prometheus = listen;
        }
        self
    }

    /// Whether anything is pushed (OTLP or console), i.e. whether the app needs to call
    /// `MetricsExporterHandle::export` at all.
    pub fn pushes(&self) -> bool {
        self.otlp.is_some() || self.console
    }
}

/// `OTEL_EXPORTER_PROMETHEUS_HOST`:`OTEL_EXPORTER_PROMETHEUS_PORT`, defaults localhost:9464.
fn prometheus_addr(env: Env<'_>) -> Result<SocketAddr, ConfigError> {
    let ip = match get(env, PROMETHEUS_HOST) {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some((_, host)) if host.eq_ignore_ascii_case("localhost") => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some((var, host)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| ConfigError::InvalidEndpoint {
                var,
                value: host.clone(),
                reason: "expected an IP address or `localhost`".into(),
            })?,
    };
    let port = match get(env, PROMETHEUS_PORT) {
        None => DEFAULT_PROMETHEUS_PORT,
        Some((var, value)) => value
            .parse::<u16>()
            .map_err(|source| ConfigError::InvalidNumber { var, value, source })?,
    };
    Ok(SocketAddr::new(ip, port))
}

/// Resolves the metrics configuration from the process environment.
pub fn resolve_metrics_config(traces: ExporterChoice) -> Result<MetricsExportConfig, ConfigError> {
    MetricsExportConfig::resolve(traces, &|name| std::env::var(name).ok())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
