//! Where spans go and how, resolved from the standard OpenTelemetry environment variables
//! (OTLP exporter spec and BatchSpanProcessor spec) plus an explicit exporter choice.
//!
//! Precedence: an explicit [`ExporterChoice`] (the CLI) > `OTEL_TRACES_EXPORTER` > auto-detection
//! (OTLP when an endpoint variable is set, else the console). Within the OTLP variables the
//! `_TRACES_` form wins over the generic one. Empty values count as unset, as the spec says.

use std::time::Duration;

use hyper::{
    Uri,
    header::{HeaderName, HeaderValue},
};

// The variables read, by their standard names.
/// Base URL for all signals (`/v1/traces` is appended for http/protobuf).
pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// Full URL for traces, used as-is.
pub const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// `grpc` or `http/protobuf`.
pub const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// `grpc` or `http/protobuf`, for traces.
pub const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// `k=v,k2=v2`, values percent-encoded.
pub const HEADERS: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// `k=v,k2=v2` for traces (replaces the generic list).
pub const TRACES_HEADERS: &str = "OTEL_EXPORTER_OTLP_TRACES_HEADERS";
/// Per-request timeout in milliseconds.
pub const TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TIMEOUT";
/// Per-request timeout in milliseconds, for traces.
pub const TRACES_TIMEOUT: &str = "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT";
/// `gzip` or `none`.
pub const COMPRESSION: &str = "OTEL_EXPORTER_OTLP_COMPRESSION";
/// `gzip` or `none`, for traces.
pub const TRACES_COMPRESSION: &str = "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION";
/// `otlp`, `console` (or `logging`) or `none`; read in auto mode only.
pub const TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
/// Export queue capacity in spans.
pub const BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
/// Spans per export request.
pub const BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
/// Milliseconds a span may wait for its batch.
pub const BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
/// Batch delay of the console exporter when OTEL_BSP_SCHEDULE_DELAY is not set.
pub const CONSOLE_SCHEDULE_DELAY: Duration = Duration::from_millis(200);
/// Milliseconds one batch export may take, retries included.
pub const BSP_EXPORT_TIMEOUT: &str = "OTEL_BSP_EXPORT_TIMEOUT";

/// The per-signal variables of the OTLP exporter spec and the path appended to the generic
/// endpoint for http/protobuf. The generic variables are shared by every signal.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SignalVars {
    pub endpoint: &'static str,
    pub protocol: &'static str,
    pub headers: &'static str,
    pub timeout: &'static str,
    pub compression: &'static str,
    /// Appended to `OTEL_EXPORTER_OTLP_ENDPOINT` for http/protobuf, e.g. `v1/traces`.
    pub path: &'static str,
}

/// The traces signal.
pub(crate) const TRACES: SignalVars = SignalVars {
    endpoint: TRACES_ENDPOINT,
    protocol: TRACES_PROTOCOL,
    headers: TRACES_HEADERS,
    timeout: TRACES_TIMEOUT,
    compression: TRACES_COMPRESSION,
    path: "v1/traces",
};
/// Default collector endpoints when OTLP is chosen but no endpoint is set.
const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318";
const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";

/// A bad value in one of the environment variables; always names the variable and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: unknown protocol, expected `grpc` or `http/protobuf`")]
    UnknownProtocol { var: &'static str, value: String },
    #[error("{var}={value:?}: `http/json` is not supported, use `http/protobuf` or `grpc`")]
    UnsupportedProtocol { var: &'static str, value: String },
    #[error("{var}={value:?}: unknown compression, expected `gzip` or `none`")]
    UnknownCompression { var: &'static str, value: String },
    #[error("{var}={value:?}: unknown exporter, expected `otlp`, `console` or `none`")]
    UnknownExporter { var: &'static str, value: String },
    #[error("{var}={value:?}: unknown metrics exporter, expected `otlp`, `prometheus`, `console` or `none`")]
    UnknownMetricsExporter { var: &'static str, value: String },
    #[error("{var}={value:?}: not a valid endpoint URL: {reason}")]
    InvalidEndpoint { var: &'static str, value: String, reason: String },
    #[error("{var}={value:?}: not a number")]
    InvalidNumber {
        var: &'static str,
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("{var}={value:?}: must be greater than zero")]
    Zero { var: &'static str, value: String },
    #[error("{var}: malformed header entry {entry:?}: {reason}")]
    InvalidHeader { var: &'static str, entry: String, reason: String },
}

/// The exporter the user asked for (the CLI's `--exporter`); `Auto` defers to the environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExporterChoice {
    /// `OTEL_TRACES_EXPORTER` if set, else OTLP when an OTLP endpoint variable is set, else console.
    #[default]
    Auto,
    /// One line per span on stdout.
    Console,
    /// OTLP to the configured endpoint (or the spec's default localhost endpoint).
    Otlp,
    /// Spans are discarded.
    None,
}

/// OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`TraceService/Export`).
    Grpc,
    /// OTLP/HTTP with a binary protobuf body.
    HttpProtobuf,
}

/// Payload compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Bodies go uncompressed.
    None,
    /// gzip (`Content-Encoding: gzip`, gRPC `grpc-encoding: gzip`).
    Gzip,
}

/// Everything the OTLP exporter needs to reach the collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    /// Full URL: for http/protobuf it includes the signal path (`.../v1/traces`); for gRPC it is
    /// the collector's base URL.
    pub endpoint: String,
    /// Which transport carries the requests.
    pub protocol: Protocol,
    /// Extra headers (gRPC metadata) sent with every request; names are lowercase.
    pub headers: Vec<(String, String)>,
    /// Upper bound for one request (one attempt).
    pub timeout: Duration,
    /// Whether request bodies are gzip-compressed.
    pub compression: Compression,
}

/// Batching, as in the OpenTelemetry BatchSpanProcessor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Spans waiting for export; more are dropped and counted (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_queue_size: usize,
    /// Spans per export request (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, at most the queue size).
    pub max_export_batch_size: usize,
    /// Longest a span waits before its batch is exported (`OTEL_BSP_SCHEDULE_DELAY`).
    pub scheduled_delay: Duration,
    /// Longest one batch export may take, retries included (`OTEL_BSP_EXPORT_TIMEOUT`).
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_queue_size: 2048,
            max_export_batch_size: 512,
            scheduled_delay: Duration::from_millis(5000),
            export_timeout: Duration::from_millis(30_000),
        }
    }
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportMode {
    /// One line per span on stdout.
    Console,
    /// OTLP to a collector.
    Otlp(OtlpConfig),
    /// Spans are discarded.
    None,
}

/// The resolved export configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// Where spans go.
    pub mode: ExportMode,
    /// How they are batched on the way.
    pub batch: BatchConfig,
}

/// An environment lookup: `std::env::var` in production, a map in tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

impl ExportConfig {
    /// Resolves the configuration from the environment with the exporter choice applied.
    pub fn resolve(choice: ExporterChoice, env: Env<'_>) -> Result<ExportConfig, ConfigError> {
        let mut batch = batch_config(env)?;
        let choice = match choice {
            ExporterChoice::Auto => auto_choice(env)?,
            other => other,
        };
        let mode = match choice {
            ExporterChoice::Console => ExportMode::Console,
            ExporterChoice::None => ExportMode::None,
            ExporterChoice::Otlp | ExporterChoice::Auto => ExportMode::Otlp(otlp_config(env, &TRACES)?),
        };
        // A person reading the terminal wants each span as it ends, not every 5 s.
        if matches!(mode, ExportMode::Console) && get(env, BSP_SCHEDULE_DELAY).is_none() {
            batch.scheduled_delay = CONSOLE_SCHEDULE_DELAY;
        }
        Ok(ExportConfig { mode, batch })
    }

    /// Auto-detection only: OTLP when an endpoint variable is set, console otherwise.
    pub fn from_env(env: Env<'_>) -> Result<ExportConfig, ConfigError> {
        Self::resolve(ExporterChoice::Auto, env)
    }

    /// Applies an explicit exporter choice to an already resolved configuration. Choosing OTLP
    /// on a configuration that is not OTLP re-reads the OTLP variables from `env`.
    pub fn with_choice(self, choice: ExporterChoice, env: Env<'_>) -> Result<ExportConfig, ConfigError> {
        let mode = match (choice, self.mode) {
            (ExporterChoice::Auto, mode) => mode,
            (ExporterChoice::Console, _) => ExportMode::Console,
            (ExporterChoice::None, _) => ExportMode::None,
            (ExporterChoice::Otlp, ExportMode::Otlp(otlp)) => ExportMode::Otlp(otlp),
            (ExporterChoice::Otlp, _) => ExportMode::Otlp(otlp_config(env, &TRACES)?),
        };
        Ok(ExportConfig { mode, batch: self.batch })
    }
}

/// Reads a variable; empty or blank values count as unset.
pub(crate) fn get(env: Env<'_>, var: &'static str) -> Option<(&'static str, String)> {
    env(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).map(|v| (var, v))
}

/// The per-signal variable if set, else the generic one.
fn get_either(env: Env<'_>, signal: &'static str, generic: &'static str) -> Option<(&'static str, String)> {
    get(env, signal).or_else(|| get(env, generic))
}

fn auto_choice(env: Env<'_>) -> Result<ExporterChoice, ConfigError> {
    if let Some((var, value)) = get(env, TRACES_EXPORTER) {
        // The spec allows a comma-separated list; tapwire runs one exporter, the first.
        let first = value.split(',').next().unwrap_or("").trim().to_ascii_lowercase();
        return match first.as_str() {
            "otlp" => Ok(ExporterChoice::Otlp),
            "console" | "logging" => Ok(ExporterChoice::Console),
            "none" => Ok(ExporterChoice::None),
            _ => Err(ConfigError::UnknownExporter { var, value }),
        };
    }
    if get(env, TRACES_ENDPOINT).is_some() || get(env, ENDPOINT).is_some() {
        Ok(ExporterChoice::Otlp)
    } else {
        Ok(ExporterChoice::Console)
    }
}

/// The OTLP settings of one signal: its own variables first, then the generic ones.
pub(crate) fn otlp_config(env: Env<'_>, signal: &SignalVars) -> Result<OtlpConfig, ConfigError> {
    let signal_endpoint = get(env, signal.endpoint);
    let generic_endpoint = get(env, ENDPOINT);
    let explicit = signal_endpoint.is_some();
    let given = signal_endpoint.or(generic_endpoint);
    if let Some((var, value)) = &given {
        validate_url(var, value)?;
    }

    let protocol = match get_either(env, signal.protocol, PROTOCOL) {
        Some((var, value)) => parse_protocol(var, value)?,
        None => match given.as_ref().and_then(|(_, url)| port_of(url)) {
            Some(4317) => Protocol::Grpc,
            _ => Protocol::HttpProtobuf,
        },
    };

    let endpoint = match (given, protocol) {
        (Some((_, url)), Protocol::Grpc) => url,
        (Some((_, url)), Protocol::HttpProtobuf) if explicit => url,
        (Some((var, url)), Protocol::HttpProtobuf) => {
            let joined = append_signal_path(&url, signal.path);
            validate_url(var, &joined)?;
            joined
        }
        (None, Protocol::Grpc) => DEFAULT_GRPC_ENDPOINT.to_owned(),
        (None, Protocol::HttpProtobuf) => append_signal_path(DEFAULT_HTTP_ENDPOINT, signal.path),
    };

    let headers = match get_either(env, signal.headers, HEADERS) {
        Some((var, value)) => parse_headers(var, &value)?,
        None => Vec::new(),
    };

    let timeout = match get_either(env, signal.timeout, TIMEOUT) {
        Some((var, value)) => Duration::from_millis(parse_positive(var, value)?),
        None => Duration::from_millis(10_000),
    };

    let compression = match get_either(env, signal.compression, COMPRESSION) {
        Some((var, value)) => match value.to_ascii_lowercase().as_str() {
            "gzip" => Compression::Gzip,
            "none" => Compression::None,
            _ => return Err(ConfigError::UnknownCompression { var, value }),
        },
        // The specification's default. gzip (level 6 in tonic, not adjustable) took ~14% of the
        // agent's CPU at 20k requests/s; it pays where the collector is across a costly network.
        None => Compression::None,
    };

    Ok(OtlpConfig {
        endpoint,
        protocol,
        headers,
        timeout,
        compression,
    })
}

fn batch_config(env: Env<'_>) -> Result<BatchConfig, ConfigError> {
    let mut batch = BatchConfig::default();
    let number = |var: &'static str| get(env, var).map(|(var, value)| parse_positive(var, value)).transpose();
    if let Some(n) = number(BSP_MAX_QUEUE_SIZE)? {
        batch.max_queue_size = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = number(BSP_MAX_EXPORT_BATCH_SIZE)? {
        batch.max_export_batch_size = usize::try_from(n).unwrap_or(usize::MAX);
    }
    // The spec: the batch size must not exceed the queue size.
    batch.max_export_batch_size = batch.max_export_batch_size.min(batch.max_queue_size);
    // Zero is fine here: every batch goes out as soon as a span arrives.
    if let Some((var, value)) = get(env, BSP_SCHEDULE_DELAY) {
        let ms = value
            .parse::<u64>()
            .map_err(|source| ConfigError::InvalidNumber { var, value, source })?;
        batch.scheduled_delay = Duration::from_millis(ms);
    }
    if let Some(ms) = number(BSP_EXPORT_TIMEOUT)? {
        batch.export_timeout = Duration::from_millis(ms);
    }
    Ok(batch)
}

fn parse_protocol(var: &'static str, value: String) -> Result<Protocol, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        "http/json" => Err(ConfigError::UnsupportedProtocol { var, value }),
        _ => Err(ConfigError::UnknownProtocol { var, value }),
    }
}

pub(crate) fn parse_positive(var: &'static str, value: String) -> Result<u64, ConfigError> {
    match value.parse::<u64>() {
        Ok(0) => Err(ConfigError::Zero { var, value }),
        Ok(n) => Ok(n),
        Err(source) => Err(ConfigError::InvalidNumber { var, value, source }),
    }
}

fn validate_url(var: &'static str, value: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidEndpoint {
        var,
        value: value.to_owned(),
        reason,
    };
    let uri: Uri = value.parse().map_err(|e: hyper::http::uri::InvalidUri| invalid(e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(invalid(format!("scheme `{other}` is not http or https"))),
        None => return Err(invalid("missing scheme (http:// or https://)".into())),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(()),
        _ => Err(invalid("missing host".into())),
    }
}

/// The explicit port of a URL, if it parses and has one.
fn port_of(url: &str) -> Option<u16> {
    url.parse::<Uri>().ok()?.port_u16()
}

/// `http://h:4318` -> `http://h:4318/v1/traces`; `http://h/otlp/` -> `http://h/otlp/v1/traces`.
fn append_signal_path(base: &str, path: &str) -> String {
    // A query string would end up in the wrong place; collectors do not use one on the base URL.
    if base.ends_with('/') {
        format!("{base}{path}")
    } else {
        format!("{base}/{path}")
    }
}

/// The endpoint for logs: `http://user:secret@host/` -> `http://***@host/`.
pub fn redact_userinfo(endpoint: &str) -> String {
    let Some(start) = endpoint.find("://").map(|i| i + 3) else {
        return endpoint.to_owned();
    };
    let authority_end = endpoint[start..].find('/').map_or(endpoint.len(), |i| start + i);
    match endpoint[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &endpoint[..start], &endpoint[start + at..]),
        None => endpoint.to_owned(),
    }
}

/// Parses `k1=v1,k2=v2` (W3C-baggage-like); values are percent-decoded, names lowercased.
pub(crate) fn parse_headers(var: &'static str, value: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut headers = Vec::new();
    for entry in value.split(',') {
        if entry.trim().is_empty() {
            continue;
        }
        let bad = |reason: &str| ConfigError::InvalidHeader {
            var,
            entry: entry.to_owned(),
            reason: reason.to_owned(),
        };
        let (name, raw) = entry.split_once('=').ok_or_else(|| bad("expected key=value"))?;
        let name = percent_decode(name.trim())
            .ok_or_else(|| bad("bad percent-encoding in the key"))?
            .to_ascii_lowercase();
        let decoded = percent_decode(raw.trim()).ok_or_else(|| bad("bad percent-encoding in the value"))?;
        if name.is_empty() {
            return Err(bad("empty key"));
        }
        HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("not a valid header name"))?;
        HeaderValue::from_str(&decoded).map_err(|_| bad("not a valid header value"))?;
        headers.push((name, decoded));
    }
    Ok(headers)
}

/// `%XX` decoding into UTF-8; `None` on a truncated escape, bad hex or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
