use std::{collections::HashMap, net::SocketAddr, time::Duration};

use super::*;
use crate::export::config::{COMPRESSION, Compression, ExportConfig, ExportMode, HEADERS, PROTOCOL, Protocol, TIMEOUT};

fn resolve(choice: ExporterChoice, vars: &[(&str, &str)]) -> Result<MetricsExportConfig, ConfigError> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    MetricsExportConfig::resolve(choice, &|k| map.get(k).cloned())
}

fn otlp(vars: &[(&str, &str)]) -> OtlpConfig {
    resolve(ExporterChoice::Auto, vars)
        .expect("valid config")
        .otlp
        .expect("OTLP chosen")
}

#[test]
fn nothing_set_exports_nothing_with_spec_defaults() {
    let cfg = resolve(ExporterChoice::Auto, &[]).unwrap();
    assert_eq!(cfg, MetricsExportConfig::default());
    assert_eq!(
        (cfg.otlp, cfg.console, cfg.prometheus, cfg.interval, cfg.export_timeout),
        (None, false, None, Duration::from_secs(60), Duration::from_secs(30))
    );
    assert!(!MetricsExportConfig::default().pushes());
}

#[test]
fn generic_endpoint_gets_the_metrics_path() {
    let o = otlp(&[(ENDPOINT, "http://collector:4318")]);
    assert_eq!(o.endpoint, "http://collector:4318/v1/metrics");
    assert_eq!(o.protocol, Protocol::HttpProtobuf);
    assert_eq!(o.timeout, Duration::from_secs(10));
    assert_eq!(o.compression, Compression::None);
    let o = otlp(&[(ENDPOINT, "http://collector/otlp/")]);
    assert_eq!(o.endpoint, "http://collector/otlp/v1/metrics");
    // The span exporter still gets its own path from the same variable.
    let map: HashMap<&str, &str> = [(ENDPOINT, "http://collector:4318"), (METRICS_ENDPOINT, "http://m:1/x")].into();
    let traces = ExportConfig::from_env(&|k| map.get(k).map(|v| (*v).to_owned())).unwrap();
    let ExportMode::Otlp(t) = traces.mode else { panic!("OTLP expected") };
    assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
}

#[test]
fn metrics_variables_win_over_generic_ones() {
    let o = otlp(&[
        (ENDPOINT, "http://generic:4318"),
        (METRICS_ENDPOINT, "http://metrics:9999/custom"),
        (PROTOCOL, "grpc"),
        (METRICS_PROTOCOL, "http/protobuf"),
        (HEADERS, "a=1,b=2"),
        (METRICS_HEADERS, "x-tenant=acme%20corp"),
        (TIMEOUT, "1000"),
        (METRICS_TIMEOUT, "2500"),
        (COMPRESSION, "none"),
        (METRICS_COMPRESSION, "gzip"),
    ]);
    assert_eq!(
        o,
        OtlpConfig {
            endpoint: "http://metrics:9999/custom".into(),
            protocol: Protocol::HttpProtobuf,
            headers: vec![("x-tenant".into(), "acme corp".into())],
            timeout: Duration::from_millis(2500),
            compression: Compression::Gzip,
        }
    );
    // Generic ones apply when the metrics ones are absent; gRPC keeps the base URL.
    let o = otlp(&[(ENDPOINT, "http://generic:4317"), (HEADERS, "a=1"), (TIMEOUT, "700")]);
    assert_eq!(o.endpoint, "http://generic:4317");
    assert_eq!(o.protocol, Protocol::Grpc);
    assert_eq!(o.compression, Compression::None, "the specification's default");
    assert_eq!(o.headers, vec![("a".to_owned(), "1".to_owned())]);
    assert_eq!(o.timeout, Duration::from_millis(700));
    let o = otlp(&[(METRICS_ENDPOINT, "http://m:4317"), (METRICS_PROTOCOL, "grpc")]);
    assert_eq!((o.endpoint.as_str(), o.protocol), ("http://m:4317", Protocol::Grpc));
}

#[test]
fn exporter_list_selects_backends() {
    let cfg = resolve(ExporterChoice::Auto, &[(METRICS_EXPORTER, "prometheus, console"), (ENDPOINT, "http://c:4318")]).unwrap();
    assert_eq!(cfg.otlp, None, "an explicit list without otlp means no OTLP, endpoint or not");
    assert!(cfg.console);
    assert_eq!(cfg.prometheus, Some(SocketAddr::from(([127, 0, 0, 1], 9464))));

    let cfg = resolve(ExporterChoice::Otlp, &[(METRICS_EXPORTER, "none"), (ENDPOINT, "http://c:4318")]).unwrap();
    assert!(!cfg.pushes() && cfg.prometheus.is_none());

    let cfg = resolve(ExporterChoice::None, &[(METRICS_EXPORTER, "OTLP,logging")]).unwrap();
    assert_eq!(cfg.otlp.unwrap().endpoint, "http://localhost:4318/v1/metrics");
    assert!(cfg.console);

    let err = resolve(ExporterChoice::Auto, &[(METRICS_EXPORTER, "otlp,statsd")]).unwrap_err();
    assert!(matches!(err, ConfigError::UnknownMetricsExporter { var: METRICS_EXPORTER, .. }), "{err}");
    assert!(err.to_string().contains("prometheus"), "{err}");
}

#[test]
fn without_a_list_the_span_exporter_choice_decides() {
    let with_endpoint = [(METRICS_ENDPOINT, "http://m:4318/v1/metrics")];
    assert!(resolve(ExporterChoice::Auto, &with_endpoint).unwrap().otlp.is_some());
    assert!(resolve(ExporterChoice::Auto, &[(ENDPOINT, "http://c:4318")]).unwrap().otlp.is_some());
    assert!(resolve(ExporterChoice::Auto, &[]).unwrap().otlp.is_none());
    let o = resolve(ExporterChoice::Otlp, &[]).unwrap().otlp.unwrap();
    assert_eq!(o.endpoint, "http://localhost:4318/v1/metrics", "the spec's default endpoint");
    assert!(resolve(ExporterChoice::Console, &with_endpoint).unwrap().otlp.is_none());
    assert!(resolve(ExporterChoice::None, &with_endpoint).unwrap().otlp.is_none());
}

#[test]
fn interval_and_timeout() {
    let cfg = resolve(ExporterChoice::Auto, &[(METRIC_EXPORT_INTERVAL, "15000"), (METRIC_EXPORT_TIMEOUT, " 5000 ")]).unwrap();
    assert_eq!((cfg.interval, cfg.export_timeout), (Duration::from_secs(15), Duration::from_secs(5)));
    assert!(matches!(
        resolve(ExporterChoice::Auto, &[(METRIC_EXPORT_INTERVAL, "0")]),
        Err(ConfigError::Zero { var: METRIC_EXPORT_INTERVAL, .. })
    ));
    assert!(matches!(
        resolve(ExporterChoice::Auto, &[(METRIC_EXPORT_TIMEOUT, "soon")]),
        Err(ConfigError::InvalidNumber { var: METRIC_EXPORT_TIMEOUT, .. })
    ));
    // Empty counts as unset.
    assert_eq!(resolve(ExporterChoice::Auto, &[(METRIC_EXPORT_INTERVAL, "")]).unwrap().interval, Duration::from_secs(60));
}

#[test]
fn prometheus_address_from_env_and_cli() {
    let prom = |vars: &[(&str, &str)]| {
        let mut all = vec![(METRICS_EXPORTER, "prometheus")];
        all.extend_from_slice(vars);
        resolve(ExporterChoice::Auto, &all).map(|c| c.prometheus.unwrap())
    };
    assert_eq!(prom(&[]).unwrap(), SocketAddr::from(([127, 0, 0, 1], 9464)));
    assert_eq!(
        prom(&[(PROMETHEUS_HOST, "0.0.0.0"), (PROMETHEUS_PORT, "9100")]).unwrap(),
        SocketAddr::from(([0, 0, 0, 0], 9100))
    );
    assert_eq!(prom(&[(PROMETHEUS_HOST, "[::1]")]).unwrap(), "[::1]:9464".parse().unwrap());
    assert!(matches!(
        prom(&[(PROMETHEUS_HOST, "metrics.example")]),
        Err(ConfigError::InvalidEndpoint { var: PROMETHEUS_HOST, .. })
    ));
    assert!(matches!(
        prom(&[(PROMETHEUS_PORT, "70000")]),
        Err(ConfigError::InvalidNumber { var: PROMETHEUS_PORT, .. })
    ));

    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = resolve(ExporterChoice::Auto, &[]).unwrap().with_prometheus_listen(Some(listen));
    assert_eq!(cfg.prometheus, Some(listen), "--prometheus-listen enables the endpoint");
    let cfg = resolve(ExporterChoice::Auto, &[(METRICS_EXPORTER, "prometheus")])
        .unwrap()
        .with_prometheus_listen(None);
    assert_eq!(cfg.prometheus, Some(SocketAddr::from(([127, 0, 0, 1], 9464))), "no flag: the env's choice stays");
}
