use std::collections::HashMap;

use super::*;

fn resolve(choice: ExporterChoice, vars: &[(&str, &str)]) -> Result<ExportConfig, ConfigError> {
    let map: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    ExportConfig::resolve(choice, &|k| map.get(k).cloned())
}

fn otlp(vars: &[(&str, &str)]) -> OtlpConfig {
    match resolve(ExporterChoice::Auto, vars).expect("valid config").mode {
        ExportMode::Otlp(o) => o,
        other => panic!("expected OTLP, got {other:?}"),
    }
}

#[test]
fn no_endpoint_means_console() {
    let cfg = resolve(ExporterChoice::Auto, &[]).unwrap();
    assert_eq!(cfg.mode, ExportMode::Console);
    // The console flushes quickly for a person watching; everything else keeps the defaults.
    assert_eq!(cfg.batch, BatchConfig { scheduled_delay: CONSOLE_SCHEDULE_DELAY, ..BatchConfig::default() });
    let cfg = resolve(ExporterChoice::Auto, &[(BSP_SCHEDULE_DELAY, "3000")]).unwrap();
    assert_eq!(cfg.batch.scheduled_delay, Duration::from_millis(3000), "an explicit delay wins");
    // Empty values count as unset.
    let cfg = resolve(ExporterChoice::Auto, &[(ENDPOINT, ""), (TRACES_ENDPOINT, "  ")]).unwrap();
    assert_eq!(cfg.mode, ExportMode::Console);
}

#[test]
fn generic_endpoint_gets_signal_path_and_defaults() {
    let o = otlp(&[(ENDPOINT, "http://collector:4318")]);
    assert_eq!(o.endpoint, "http://collector:4318/v1/traces");
    assert_eq!(o.protocol, Protocol::HttpProtobuf);
    assert_eq!(o.timeout, Duration::from_millis(10_000));
    assert_eq!(o.compression, Compression::None);
    assert!(o.headers.is_empty());
    let o = otlp(&[(ENDPOINT, "http://collector/otlp/")]);
    assert_eq!(o.endpoint, "http://collector/otlp/v1/traces");
}

#[test]
fn traces_endpoint_is_used_as_is_and_wins() {
    let o = otlp(&[(ENDPOINT, "http://generic:4318"), (TRACES_ENDPOINT, "http://traces:9999/custom")]);
    assert_eq!(o.endpoint, "http://traces:9999/custom");
    assert_eq!(o.protocol, Protocol::HttpProtobuf);
}

#[test]
fn port_picks_protocol_when_unset() {
    let o = otlp(&[(ENDPOINT, "http://collector:4317")]);
    assert_eq!(o.protocol, Protocol::Grpc);
    assert_eq!(o.endpoint, "http://collector:4317", "gRPC uses the endpoint without a path");
    assert_eq!(o.compression, Compression::None, "the spec's default, over gRPC too");
    let o = otlp(&[(ENDPOINT, "http://collector:4318")]);
    assert_eq!(o.protocol, Protocol::HttpProtobuf);
    // The traces endpoint's port decides, not the generic one's.
    let o = otlp(&[(ENDPOINT, "http://collector:4318"), (TRACES_ENDPOINT, "http://collector:4317")]);
    assert_eq!(o.protocol, Protocol::Grpc);
    // Any other port: the spec default.
    let o = otlp(&[(ENDPOINT, "https://collector.example")]);
    assert_eq!(o.protocol, Protocol::HttpProtobuf);
}

#[test]
fn explicit_protocol_beats_port_and_traces_var_wins() {
    let o = otlp(&[(ENDPOINT, "http://collector:4317"), (PROTOCOL, "http/protobuf")]);
    assert_eq!(o.protocol, Protocol::HttpProtobuf);
    assert_eq!(o.endpoint, "http://collector:4317/v1/traces");
    let o = otlp(&[
        (ENDPOINT, "http://collector:4318"),
        (PROTOCOL, "http/protobuf"),
        (TRACES_PROTOCOL, "grpc"),
    ]);
    assert_eq!(o.protocol, Protocol::Grpc);
    assert_eq!(o.endpoint, "http://collector:4318");
}

#[test]
fn compression_gzip_over_grpc_and_over_http() {
    let o = otlp(&[(ENDPOINT, "http://c:4317"), (COMPRESSION, "gzip")]);
    assert_eq!(o.compression, Compression::Gzip);
    let o = otlp(&[(ENDPOINT, "http://c:4317"), (COMPRESSION, "GZIP"), (TRACES_COMPRESSION, "none")]);
    assert_eq!(o.compression, Compression::None);
    let o = otlp(&[(ENDPOINT, "http://c:4318"), (COMPRESSION, "none"), (TRACES_COMPRESSION, "gzip")]);
    assert_eq!(o.compression, Compression::Gzip);
}

#[test]
fn headers_are_parsed_decoded_and_traces_var_wins() {
    let o = otlp(&[(ENDPOINT, "http://c:4318"), (HEADERS, "Api-Key=secret%20value, x-tenant = a%3Db ,")]);
    assert_eq!(
        o.headers,
        vec![
            ("api-key".to_owned(), "secret value".to_owned()),
            ("x-tenant".to_owned(), "a=b".to_owned())
        ]
    );
    let o = otlp(&[(ENDPOINT, "http://c:4318"), (HEADERS, "a=1"), (TRACES_HEADERS, "b=2")]);
    assert_eq!(o.headers, vec![("b".to_owned(), "2".to_owned())]);
    // A value may itself contain '=' (only the first one splits).
    let o = otlp(&[(ENDPOINT, "http://c:4318"), (HEADERS, "authorization=Basic dXNlcjpwYXNz==")]);
    assert_eq!(o.headers, vec![("authorization".to_owned(), "Basic dXNlcjpwYXNz==".to_owned())]);
}

#[test]
fn timeouts_in_milliseconds_with_traces_precedence() {
    let o = otlp(&[(ENDPOINT, "http://c:4318"), (TIMEOUT, "2500")]);
    assert_eq!(o.timeout, Duration::from_millis(2500));
    let o = otlp(&[(ENDPOINT, "http://c:4318"), (TIMEOUT, "2500"), (TRACES_TIMEOUT, "700")]);
    assert_eq!(o.timeout, Duration::from_millis(700));
}

#[test]
fn batch_settings_from_env() {
    let cfg = resolve(
        ExporterChoice::Auto,
        &[
            (BSP_MAX_QUEUE_SIZE, "100"),
            (BSP_MAX_EXPORT_BATCH_SIZE, "512"),
            (BSP_SCHEDULE_DELAY, "200"),
            (BSP_EXPORT_TIMEOUT, "1000"),
        ],
    )
    .unwrap();
    assert_eq!(
        cfg.batch,
        BatchConfig {
            max_queue_size: 100,
            max_export_batch_size: 100, // clamped to the queue size
            scheduled_delay: Duration::from_millis(200),
            export_timeout: Duration::from_millis(1000),
        }
    );
}

/// Each bad value gives an error whose message names the variable and the value.
#[test]
fn bad_values_name_the_variable() {
    /// (environment, variable the message must name, value it must quote)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case<'_>] = &[
        (&[(ENDPOINT, "http://c:4318"), (PROTOCOL, "thrift")], PROTOCOL, "thrift"),
        (
            &[(ENDPOINT, "http://c:4318"), (TRACES_PROTOCOL, "http/json")],
            TRACES_PROTOCOL,
            "http/json",
        ),
        (&[(ENDPOINT, "http://c:4318"), (TIMEOUT, "10s")], TIMEOUT, "10s"),
        (&[(ENDPOINT, "http://c:4318"), (TRACES_TIMEOUT, "0")], TRACES_TIMEOUT, "0"),
        (&[(ENDPOINT, "http://c:4318"), (COMPRESSION, "zstd")], COMPRESSION, "zstd"),
        (&[(ENDPOINT, "collector:4318")], ENDPOINT, "collector:4318"),
        (&[(ENDPOINT, "ftp://collector:4318")], ENDPOINT, "ftp://collector:4318"),
        (&[(TRACES_ENDPOINT, "http://bad host/")], TRACES_ENDPOINT, "http://bad host/"),
        (&[(ENDPOINT, "http://c:4318"), (HEADERS, "novalue")], HEADERS, "novalue"),
        (&[(ENDPOINT, "http://c:4318"), (TRACES_HEADERS, "k=%zz")], TRACES_HEADERS, "%zz"),
        (&[(ENDPOINT, "http://c:4318"), (HEADERS, "bad key=v")], HEADERS, "bad key"),
        (&[(BSP_MAX_QUEUE_SIZE, "-1")], BSP_MAX_QUEUE_SIZE, "-1"),
        (&[(TRACES_EXPORTER, "zipkin")], TRACES_EXPORTER, "zipkin"),
    ];
    for (vars, var, value) in cases {
        let err = resolve(ExporterChoice::Auto, vars).expect_err(&format!("{vars:?} should fail"));
        let msg = err.to_string();
        assert!(
            msg.contains(var) && msg.contains(value),
            "{vars:?}: message {msg:?} should name {var} and {value}"
        );
    }
}

#[test]
fn explicit_choice_overrides_detection() {
    let vars = [(ENDPOINT, "http://c:4318")];
    assert_eq!(resolve(ExporterChoice::Console, &vars).unwrap().mode, ExportMode::Console);
    assert_eq!(resolve(ExporterChoice::None, &vars).unwrap().mode, ExportMode::None);
    // OTLP without an endpoint: the spec's default localhost endpoints.
    let ExportMode::Otlp(o) = resolve(ExporterChoice::Otlp, &[]).unwrap().mode else {
        panic!("expected OTLP")
    };
    assert_eq!(o.endpoint, "http://localhost:4318/v1/traces");
    let ExportMode::Otlp(o) = resolve(ExporterChoice::Otlp, &[(PROTOCOL, "grpc")]).unwrap().mode else {
        panic!("expected OTLP")
    };
    assert_eq!(o.endpoint, "http://localhost:4317");
    // OTEL_TRACES_EXPORTER is honoured in auto mode only.
    assert_eq!(
        resolve(ExporterChoice::Auto, &[(TRACES_EXPORTER, "none"), (ENDPOINT, "http://c:4318")])
            .unwrap()
            .mode,
        ExportMode::None
    );
    assert_eq!(
        resolve(ExporterChoice::Console, &[(TRACES_EXPORTER, "otlp")]).unwrap().mode,
        ExportMode::Console
    );
    // with_choice on an already resolved config.
    let env = |_: &str| None;
    let cfg = resolve(ExporterChoice::Auto, &vars).unwrap();
    assert_eq!(cfg.clone().with_choice(ExporterChoice::None, &env).unwrap().mode, ExportMode::None);
    assert_eq!(cfg.clone().with_choice(ExporterChoice::Auto, &env).unwrap(), cfg);
}

#[test]
fn percent_decoding_edge_cases() {
    assert_eq!(percent_decode("a%2Cb%C3%A9").as_deref(), Some("a,bé"));
    assert_eq!(percent_decode("100%"), None);
    assert_eq!(percent_decode("%+1"), None);
    assert_eq!(percent_decode("%FF"), None, "invalid UTF-8");
}

#[test]
fn zero_schedule_delay_is_allowed_and_userinfo_is_redacted() {
    let cfg = resolve(ExporterChoice::Auto, &[(BSP_SCHEDULE_DELAY, "0")]).unwrap();
    assert_eq!(cfg.batch.scheduled_delay, Duration::ZERO);
    assert_eq!(
        redact_userinfo("https://user:secret@collector:4318/v1/traces"),
        "https://***@collector:4318/v1/traces"
    );
    assert_eq!(redact_userinfo("http://collector:4318/a@b"), "http://collector:4318/a@b");
    assert_eq!(redact_userinfo("http://collector:4318"), "http://collector:4318");
}
