//! The agent's configuration: defaults < YAML file (`--config`) < environment (`TAPWIRE_*` and
//! the standard `OTEL_*` names) < command-line flags. [`resolve`] applies that order once and
//! records where every value came from, for `tapwire config --print`.

pub mod cli;
pub mod file;
mod print;

use std::{
    collections::BTreeMap,
    fmt::Display,
    net::SocketAddr,
    path::{Path, PathBuf},
};

pub use cli::RunArgs;
pub use file::{FileConfig, KubernetesFile, SamplingFile};
pub use print::render;

use crate::{
    correlate::route::Pattern,
    discover::k8s::K8sMode,
    discover::select::{CgroupPattern, ExeGlob, LabelSelector, SelectionConfig},
    export::ExporterChoice,
};

/// An environment lookup: `std::env::var` in production, a map in tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The variable naming the configuration file when `--config` is not given.
pub const CONFIG_VAR: &str = "TAPWIRE_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is part of the sentence (not a source: the error chain would repeat it), so that
    /// the fix comes after it.
    #[error("cannot read the configuration file {} (given by {given_by}): {error}; check the path", path.display())]
    Read {
        path: PathBuf,
        /// `--config` or `TAPWIRE_CONFIG`.
        given_by: String,
        error: std::io::Error,
    },
    /// serde_norway's message names the key (`selection.ports[1]`) and the line and column; it
    /// is part of the sentence (not a source: the error chain would repeat it), so that the fix
    /// comes after it.
    #[error("configuration file {}: {error}; correct that line (the README's \"Configuration\" section lists every key)", path.display())]
    Parse {
        path: PathBuf,
        error: serde_norway::Error,
    },
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error(
        "nothing to watch: give at least one of --cgroup, --namespace, --pod-selector, --port or --exe \
         (or the same under `selection:` in the configuration file)"
    )]
    NothingSelected,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag(fl) => write!(f, "flag {fl}"),
        }
    }
}

/// One effective setting as `config --print` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Dotted key as in the file (`selection.cgroups`).
    pub key: String,
    /// The value, rendered (secrets redacted).
    pub value: String,
    pub source: Source,
}

/// The effective configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub selection: SelectionConfig,
    pub payload_bytes: u32,
    pub context_propagation: file::ContextPropagation,
    /// Connections without any event for this long are forgotten (`capture.idle_timeout`).
    pub idle_timeout: std::time::Duration,
    /// Connections tracked at once (`capture.max_connections`).
    pub max_connections: usize,
    pub exporter: ExporterChoice,
    pub routes: Vec<Pattern>,
    pub prometheus_listen: Option<SocketAddr>,
    /// Added to every service's resource: the file's `resource.attributes`, overridden key by
    /// key by the agent's own `OTEL_RESOURCE_ATTRIBUTES`.
    pub resource_attributes: Vec<(String, String)>,
    /// How to reach the Kubernetes API (`kubernetes:`, `TAPWIRE_K8S*`, `NODE_NAME`).
    pub kubernetes: crate::discover::k8s::K8sOptions,
    /// The `sampling:` section of the file.
    pub sampling: SamplingFile,
    /// The sampling flags (`--traces-sampler` ...), resolved by `crate::sampling`.
    pub sampling_args: crate::sampling::SamplingArgs,
    /// Log filter (`TAPWIRE_LOG` syntax).
    pub log: String,
    /// `OTEL_*` exporter variables set in the file (`export.otlp`), by variable name; the
    /// environment overrides them (see [`Settings::otel_var`]).
    file_otel: BTreeMap<&'static str, String>,
    /// Every key, its value and where it came from, in file order.
    pub origins: Vec<Origin>,
}

/// File key -> the standard variable it stands for. The values are strings as in the
/// environment, so one validation (export::config) serves both.
pub const OTEL_KEYS: &[(&str, &str)] = &[
    ("export.otlp.endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ("export.otlp.traces_endpoint", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    ("export.otlp.metrics_endpoint", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
    ("export.otlp.protocol", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ("export.otlp.headers", "OTEL_EXPORTER_OTLP_HEADERS"),
    ("export.otlp.timeout_ms", "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ("export.otlp.compression", "OTEL_EXPORTER_OTLP_COMPRESSION"),
    ("export.otlp.traces_exporter", "OTEL_TRACES_EXPORTER"),
    ("export.otlp.metrics_exporter", "OTEL_METRICS_EXPORTER"),
    ("export.otlp.metric_export_interval_ms", "OTEL_METRIC_EXPORT_INTERVAL"),
    ("export.otlp.max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE"),
    ("export.otlp.max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
    ("export.otlp.schedule_delay_ms", "OTEL_BSP_SCHEDULE_DELAY"),
    ("export.otlp.export_timeout_ms", "OTEL_BSP_EXPORT_TIMEOUT"),
];

impl Settings {
    /// The value of an `OTEL_*` variable: the environment's when set (non-blank), else the
    /// file's. Pass this to the exporter configuration instead of `std::env::var`.
    pub fn otel_var(&self, env: Env<'_>, name: &str) -> Option<String> {
        env(name)
            .filter(|v| !v.trim().is_empty())
            .or_else(|| self.file_otel.get(name).cloned())
    }

    /// Explains an exporter configuration error that names `OTEL_*` variables: when the bad
    /// value came from the file, says which key holds it.
    pub fn explain_otel_error(&self, env: Env<'_>, message: &str) -> String {
        for (key, var) in OTEL_KEYS {
            let from_env = env(var).is_some_and(|v| !v.trim().is_empty());
            if message.contains(var) && !from_env && self.file_otel.contains_key(var) {
                let path = self.origins.iter().find(|o| o.key == *key).map(|o| o.source.to_string());
                return format!("{message} (set as `{key}` in the configuration {})", path.unwrap_or_default());
            }
        }
        message.to_owned()
    }
}

/// Reads and parses the configuration file; `given_by` (`--config`, `TAPWIRE_CONFIG`) is named
/// when it cannot be read.
pub fn load_file(path: &Path, given_by: &str) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.into(), given_by: given_by.into(), error })?;
    parse_file(path, &text)
}

/// Parses configuration text; `path` only names it in errors.
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_norway::from_str(text).map_err(|error| ConfigError::Parse { path: path.into(), error })
}

/// Applies the precedence flags > environment > file > defaults.
pub fn resolve(args: &RunArgs, env: Env<'_>) -> Result<Settings, ConfigError> {
    let (file_path, file_source) = match (&args.config, nonblank(env, CONFIG_VAR)) {
        (Some(p), _) => (Some(p.clone()), Source::Flag("--config".into())),
        (None, Some(p)) => (Some(PathBuf::from(p)), Source::Env(CONFIG_VAR.into())),
        (None, None) => (None, Source::Default),
    };
    let file = match &file_path {
        Some(p) => load_file(
            p,
            match &file_source {
                Source::Env(var) => var,
                _ => "--config",
            },
        )?,
        None => FileConfig::default(),
    };
    let mut r = Resolver { env, file_source: Source::File(file_path.clone().unwrap_or_default()), origins: Vec::new() };
    if let Some(p) = &file_path {
        r.origins.push(Origin { key: "config".into(), value: p.display().to_string(), source: file_source });
    }

    let s = &file.selection;
    let cgroups = r.list("selection.cgroups", "--cgroup", &args.cgroups, "TAPWIRE_CGROUPS", ',', CgroupPattern::parse, s.cgroups.as_ref())?;
    let exclude_cgroups = r.list("selection.exclude_cgroups", "--exclude-cgroup", &args.exclude_cgroups, "TAPWIRE_EXCLUDE_CGROUPS", ',', CgroupPattern::parse, s.exclude_cgroups.as_ref())?;
    let namespaces = r.list("selection.namespaces", "--namespace", &args.namespaces, "TAPWIRE_NAMESPACES", ',', parse_name, s.namespaces.as_ref())?;
    let exclude_namespaces = r.list("selection.exclude_namespaces", "--exclude-namespace", &args.exclude_namespaces, "TAPWIRE_EXCLUDE_NAMESPACES", ',', parse_name, s.exclude_namespaces.as_ref())?;
    let pod_selectors = r.list("selection.pod_selectors", "--pod-selector", &args.pod_selectors, "TAPWIRE_POD_SELECTORS", ';', LabelSelector::parse, s.pod_selectors.as_ref())?;
    let exclude_pod_selectors = r.list("selection.exclude_pod_selectors", "--exclude-pod-selector", &args.exclude_pod_selectors, "TAPWIRE_EXCLUDE_POD_SELECTORS", ';', LabelSelector::parse, s.exclude_pod_selectors.as_ref())?;
    let ports = r.list("selection.ports", "--port", &args.ports, "TAPWIRE_PORTS", ',', parse_port, s.ports.as_ref())?;
    let exclude_ports = r.list("selection.exclude_ports", "--exclude-port", &args.exclude_ports, "TAPWIRE_EXCLUDE_PORTS", ',', parse_port, s.exclude_ports.as_ref())?;
    let executables = r.list("selection.executables", "--exe", &args.executables, "TAPWIRE_EXECUTABLES", ',', ExeGlob::parse, s.executables.as_ref())?;
    let exclude_executables = r.list("selection.exclude_executables", "--exclude-exe", &args.exclude_executables, "TAPWIRE_EXCLUDE_EXECUTABLES", ',', ExeGlob::parse, s.exclude_executables.as_ref())?;
    let exclude_otlp_exporters = r.scalar(
        "selection.exclude_otlp_exporters",
        ("--exclude-otlp-exporters", args.exclude_otlp_exporters),
        Some("TAPWIRE_EXCLUDE_OTLP_EXPORTERS"),
        parse_bool,
        s.exclude_otlp_exporters,
        true,
        |b| b.to_string(),
    )?;
    let selection = SelectionConfig {
        cgroups,
        exclude_cgroups,
        namespaces,
        exclude_namespaces,
        pod_selectors,
        exclude_pod_selectors,
        ports,
        exclude_ports,
        executables,
        exclude_executables,
        exclude_otlp_exporters,
    };

    let payload_bytes = r.scalar(
        "capture.payload_bytes",
        ("--payload-bytes", args.payload_bytes),
        Some("TAPWIRE_PAYLOAD_BYTES"),
        |v| v.parse::<u32>().map_err(|_| format!("{v:?} is not a number")).and_then(file::check_payload_bytes),
        file.capture.payload_bytes.map(|p| p.0),
        tapwire_common::DEFAULT_PAYLOAD_CAP,
        |n| n.to_string(),
    )?;
    let context_propagation = r.scalar(
        "capture.context_propagation",
        ("--context-propagation", args.context_propagation),
        Some("TAPWIRE_CONTEXT_PROPAGATION"),
        file::parse_context_propagation,
        file.capture.context_propagation.map(|p| p.0),
        file::ContextPropagation::Headers,
        |p| format!("{p:?}").to_ascii_lowercase(),
    )?;
    let defaults = crate::correlate::CorrelateConfig::default();
    let idle_timeout = r.scalar(
        "capture.idle_timeout",
        ("--idle-timeout", args.idle_timeout),
        Some("TAPWIRE_IDLE_TIMEOUT"),
        file::parse_idle_timeout,
        file.capture.idle_timeout.map(|t| t.0),
        defaults.idle_timeout,
        |d| format!("{d:?}"),
    )?;
    let max_connections = r.scalar(
        "capture.max_connections",
        ("--max-connections", args.max_connections),
        Some("TAPWIRE_MAX_CONNECTIONS"),
        file::parse_max_connections,
        file.capture.max_connections.map(|n| n.0),
        defaults.max_connections,
        usize::to_string,
    )?;
    let file_routes: Option<Vec<Pattern>> = file.http.routes.as_ref().map(|v| v.iter().map(|r| r.0.clone()).collect());
    let routes = r.list("http.routes", "--route", &args.routes, "TAPWIRE_ROUTES", ',', file::parse_route, file_routes.as_ref())?;
    let exporter = r.scalar(
        "export.exporter",
        ("--exporter", args.exporter),
        Some("TAPWIRE_EXPORTER"),
        file::parse_exporter,
        file.export.exporter.map(|e| e.0),
        ExporterChoice::Auto,
        |e| format!("{e:?}").to_ascii_lowercase(),
    )?;
    let prometheus_listen = r.scalar(
        "export.prometheus_listen",
        ("--prometheus-listen", args.prometheus_listen.map(Some)),
        Some("TAPWIRE_PROMETHEUS_LISTEN"),
        |v| v.parse::<SocketAddr>().map(Some).map_err(|e| format!("{v:?}: {e} (expected ADDRESS:PORT)")),
        file.export.prometheus_listen.map(Some),
        None,
        |a| a.map_or_else(|| "off".into(), |a| a.to_string()),
    )?;
    let file_otel = r.otel(&file.export.otlp);

    let resource_attributes = r.resource_attributes(file.resource.attributes.as_ref())?;
    let k = &file.kubernetes;
    let file_mode = k.mode.as_deref().map(parse_k8s_mode).transpose().map_err(|reason| ConfigError::Invalid {
        origin: "kubernetes.mode in the configuration file".into(),
        reason,
    })?;
    let show_mode = |m: &K8sMode| format!("{m:?}").to_ascii_lowercase();
    let mode = r.scalar("kubernetes.mode", ("", None), Some("TAPWIRE_K8S"), parse_k8s_mode, file_mode, K8sMode::Auto, show_mode)?;
    let some = |v: &str| Ok(Some(v.to_owned()));
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
    let node_name = r.scalar("kubernetes.node_name", ("", None), Some("NODE_NAME"), some, k.node_name.clone().map(Some), None, opt)?;
    let file_kubeconfig = k.kubeconfig.as_ref().map(|p| Some(p.display().to_string()));
    let kubeconfig = r.scalar("kubernetes.kubeconfig", ("", None), Some("TAPWIRE_K8S_KUBECONFIG"), some, file_kubeconfig, None, opt)?;
    let api_url = r.scalar("kubernetes.api_url", ("", None), Some("TAPWIRE_K8S_API_URL"), some, k.api_url.clone().map(Some), None, opt)?;
    let kubernetes = crate::discover::k8s::K8sOptions {
        mode,
        node_name,
        kubeconfig: kubeconfig.map(PathBuf::from),
        api_url,
        ..Default::default()
    };
    let sampling_source = r.file_or_default(file.sampling != SamplingFile::default());
    r.origins.push(Origin {
        key: "sampling".into(),
        value: "(resolved with OTEL_TRACES_SAMPLER and --traces-sampler; see the startup log)".into(),
        source: sampling_source,
    });
    let log = r.scalar("log", ("", None), Some("TAPWIRE_LOG"), |v| Ok(v.to_owned()), file.log.clone(), "info".to_owned(), String::clone)?;

    let settings = Settings {
        selection,
        payload_bytes,
        context_propagation,
        idle_timeout,
        max_connections,
        exporter,
        routes,
        prometheus_listen,
        resource_attributes,
        kubernetes,
        sampling: file.sampling,
        sampling_args: args.sampling.clone(),
        log,
        file_otel,
        origins: r.origins,
    };
    if !settings.selection.selects_anything() {
        return Err(ConfigError::NothingSelected);
    }
    Ok(settings)
}

fn nonblank(env: Env<'_>, var: &str) -> Option<String> {
    env(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{v:?} is not a boolean (true or false)")),
    }
}

fn parse_k8s_mode(v: &str) -> Result<K8sMode, String> {
    match v.trim() {
        "auto" => Ok(K8sMode::Auto),
        "on" => Ok(K8sMode::On),
        "off" => Ok(K8sMode::Off),
        other => Err(format!("{other:?}: expected auto, on or off")),
    }
}

fn parse_port(v: &str) -> Result<u16, String> {
    match v.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{v:?} is not a TCP port (1..65535)")),
        Ok(p) => Ok(p),
    }
}

fn parse_name(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return Err(format!("{v:?} is not a valid Kubernetes namespace name"));
    }
    Ok(v.to_owned())
}

/// How a list element appears in `config --print`.
trait Show {
    fn show(&self) -> String;
}

macro_rules! show_display {
    ($($t:ty),*) => { $(impl Show for $t { fn show(&self) -> String { self.to_string() } })* };
}
show_display!(CgroupPattern, ExeGlob, LabelSelector, String, u16);

impl Show for Pattern {
    fn show(&self) -> String {
        self.as_str().to_owned()
    }
}

struct Resolver<'a> {
    env: Env<'a>,
    file_source: Source,
    origins: Vec<Origin>,
}

impl Resolver<'_> {
    fn file_or_default(&self, in_file: bool) -> Source {
        if in_file { self.file_source.clone() } else { Source::Default }
    }

    fn invalid(origin: String, reason: String) -> ConfigError {
        ConfigError::Invalid { origin, reason }
    }

    /// A repeatable setting: the flags when any is given, else the variable (split at `sep`),
    /// else the file's list, else empty.
    #[expect(clippy::too_many_arguments, reason = "one call per setting reads best with every source side by side")]
    fn list<T: Clone + Show>(
        &mut self,
        key: &str,
        flag: &str,
        cli: &[T],
        var: &str,
        sep: char,
        parse: impl Fn(&str) -> Result<T, String>,
        file: Option<&Vec<T>>,
    ) -> Result<Vec<T>, ConfigError> {
        let (values, source) = if !cli.is_empty() {
            (cli.to_vec(), Source::Flag(flag.into()))
        } else if let Some(raw) = nonblank(self.env, var) {
            let values = raw
                .split(sep)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| parse(s).map_err(|reason| Self::invalid(format!("{var}={raw:?}"), reason)))
                .collect::<Result<Vec<_>, _>>()?;
            (values, Source::Env(var.into()))
        } else if let Some(values) = file {
            (values.clone(), self.file_source.clone())
        } else {
            (Vec::new(), Source::Default)
        };
        let shown = format!("[{}]", values.iter().map(|v| format!("{:?}", v.show())).collect::<Vec<_>>().join(", "));
        self.origins.push(Origin { key: key.into(), value: shown, source });
        Ok(values)
    }

    /// A single value: flag > variable > file > default. `flag.0` empty: no flag exists.
    #[expect(clippy::too_many_arguments, reason = "one call per setting reads best with every source side by side")]
    fn scalar<T: Clone>(
        &mut self,
        key: &str,
        flag: (&str, Option<T>),
        var: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
        file: Option<T>,
        default: T,
        show: impl Fn(&T) -> String,
    ) -> Result<T, ConfigError> {
        let from_env = var.and_then(|v| nonblank(self.env, v).map(|raw| (v, raw)));
        let (value, source) = if let (name, Some(v)) = flag {
            (v, Source::Flag(name.into()))
        } else if let Some((var, raw)) = from_env {
            let v = parse(&raw).map_err(|reason| Self::invalid(format!("{var}={raw:?}"), reason))?;
            (v, Source::Env(var.into()))
        } else if let Some(v) = file {
            (v, self.file_source.clone())
        } else {
            (default, Source::Default)
        };
        self.origins.push(Origin { key: key.into(), value: show(&value), source });
        Ok(value)
    }

    /// Records the OTLP settings (environment over file) and returns the file's, by variable.
    fn otel(&mut self, otlp: &file::OtlpFile) -> BTreeMap<&'static str, String> {
        let num = |n: Option<u64>| n.map(|n| n.to_string());
        let headers = otlp.headers.as_ref().map(|h| {
            h.iter().map(|(k, v)| format!("{}={}", k.trim(), percent_encode(v))).collect::<Vec<_>>().join(",")
        });
        let from_file: [Option<String>; 14] = [
            otlp.endpoint.clone(),
            otlp.traces_endpoint.clone(),
            otlp.metrics_endpoint.clone(),
            otlp.protocol.clone(),
            headers,
            num(otlp.timeout_ms),
            otlp.compression.clone(),
            otlp.traces_exporter.clone(),
            otlp.metrics_exporter.clone(),
            num(otlp.metric_export_interval_ms),
            num(otlp.max_queue_size),
            num(otlp.max_export_batch_size),
            num(otlp.schedule_delay_ms),
            num(otlp.export_timeout_ms),
        ];
        let mut out = BTreeMap::new();
        for ((key, var), file_value) in OTEL_KEYS.iter().zip(from_file) {
            let env_value = nonblank(self.env, var);
            let (value, source) = match (env_value, &file_value) {
                (Some(v), _) => (v, Source::Env((*var).into())),
                (None, Some(v)) => (v.clone(), self.file_source.clone()),
                (None, None) => ("(unset)".into(), Source::Default),
            };
            let value = if var.ends_with("HEADERS") { redact_headers(&value) } else { crate::export::config::redact_userinfo(&value) };
            self.origins.push(Origin { key: (*key).into(), value, source });
            if let Some(v) = file_value {
                out.insert(*var, v);
            }
        }
        out
    }

    /// The file's `resource.attributes`, overridden key by key by `OTEL_RESOURCE_ATTRIBUTES`.
    fn resource_attributes(&mut self, file: Option<&BTreeMap<String, String>>) -> Result<Vec<(String, String)>, ConfigError> {
        const VAR: &str = "OTEL_RESOURCE_ATTRIBUTES";
        let mut merged: Vec<(String, String, Source)> =
            file.into_iter().flatten().map(|(k, v)| (k.clone(), v.clone(), self.file_source.clone())).collect();
        if let Some(raw) = nonblank(self.env, VAR) {
            for (k, v) in parse_resource_attributes(&raw).map_err(|reason| Self::invalid(format!("{VAR}={raw:?}"), reason))? {
                merged.retain(|(mk, _, _)| *mk != k);
                merged.push((k, v, Source::Env(VAR.into())));
            }
        }
        if merged.is_empty() {
            self.origins.push(Origin { key: "resource.attributes".into(), value: "{}".into(), source: Source::Default });
        }
        for (k, v, source) in &merged {
            self.origins.push(Origin { key: format!("resource.attributes.{k}"), value: v.clone(), source: source.clone() });
        }
        Ok(merged.into_iter().map(|(k, v, _)| (k, v)).collect())
    }
}

/// `k=v,k2=v2` with percent-encoded values (the OpenTelemetry resource SDK format).
pub fn parse_resource_attributes(raw: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (k, v) = entry.split_once('=').ok_or_else(|| format!("entry {entry:?} is not key=value"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("entry {entry:?} has an empty key"));
        }
        let v = percent_decode(v.trim()).ok_or_else(|| format!("entry {entry:?}: bad percent-encoding"))?;
        out.push((k.to_owned(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~ /:".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// `k=secret,k2=x` -> `k=***,k2=***`: header values are often credentials.
fn redact_headers(v: &str) -> String {
    if v == "(unset)" {
        return v.into();
    }
    v.split(',').map(|e| e.split_once('=').map_or_else(|| e.to_owned(), |(k, _)| format!("{}=***", k.trim()))).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests;
