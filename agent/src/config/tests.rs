use std::{collections::HashMap, io::Write as _, time::Duration};

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: RunArgs,
}

fn args(argv: &[&str]) -> RunArgs {
    Cmd::try_parse_from(std::iter::once("tapwire").chain(argv.iter().copied())).unwrap().args
}

fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn resolve_with(argv: &[&str], env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
    resolve(&args(argv), &|k: &str| env.get(k).cloned())
}

struct TempFile(PathBuf);
impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("tapwire-config-{}-{name}.yaml", std::process::id()));
        std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
        TempFile(path)
    }
    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn source_of<'a>(s: &'a Settings, key: &str) -> &'a Source {
    &s.origins.iter().find(|o| o.key == key).unwrap_or_else(|| panic!("no origin for {key}")).source
}

const FILE: &str = "\
selection:
  cgroups: ['/kubepods/**/pod*']
  exclude_namespaces: [kube-system]
  ports: [8080, 9090]
  exclude_otlp_exporters: false
capture:
  payload_bytes: 2048
  context_propagation: 'off'
http:
  routes: ['/users/{id}']
export:
  exporter: otlp
  prometheus_listen: 127.0.0.1:9464
  otlp:
    endpoint: http://collector:4317
    headers: {x-api-key: s3cret}
    timeout_ms: 2500
resource:
  attributes: {deployment.environment.name: staging, team: shop}
kubernetes:
  node_name: node-a
  mode: 'off'
sampling:
  sampler: parentbased_traceidratio
  ratio: 0.25
  services:
    search: {ratio: 0.01}
    checkout: {sampler: always_on}
log: debug
";

#[test]
fn defaults_when_only_a_cgroup_is_given() {
    let s = resolve_with(&["--cgroup", "svc"], &env_of(&[])).unwrap();
    assert_eq!(s.payload_bytes, tapwire_common::DEFAULT_PAYLOAD_CAP);
    assert_eq!(s.context_propagation, file::ContextPropagation::Headers);
    assert_eq!(s.exporter, ExporterChoice::Auto);
    assert!(s.selection.exclude_otlp_exporters);
    assert_eq!(s.prometheus_listen, None);
    assert_eq!(s.log, "info");
    assert_eq!(source_of(&s, "capture.payload_bytes"), &Source::Default);
    assert_eq!(source_of(&s, "selection.cgroups"), &Source::Flag("--cgroup".into()));
}

#[test]
fn connection_limits_from_every_source() {
    let s = resolve_with(&["--cgroup", "svc"], &env_of(&[])).unwrap();
    assert_eq!((s.idle_timeout, s.max_connections), (Duration::from_secs(120), 65536));
    let f = TempFile::new("conn", "capture:\n  idle_timeout: 2m\n  max_connections: 300\n");
    let s = resolve_with(&["--config", f.arg(), "--cgroup", "svc"], &env_of(&[])).unwrap();
    assert_eq!((s.idle_timeout, s.max_connections), (Duration::from_secs(120), 300));
    assert_eq!(source_of(&s, "capture.idle_timeout"), &Source::File(f.0.clone()));
    let env = env_of(&[("TAPWIRE_IDLE_TIMEOUT", "1500ms"), ("TAPWIRE_MAX_CONNECTIONS", "64")]);
    let s = resolve_with(&["--config", f.arg(), "--cgroup", "svc"], &env).unwrap();
    assert_eq!((s.idle_timeout, s.max_connections), (Duration::from_millis(1500), 64));
    let s = resolve_with(&["--config", f.arg(), "--cgroup", "svc", "--idle-timeout", "3s", "--max-connections", "9"], &env).unwrap();
    assert_eq!((s.idle_timeout, s.max_connections), (Duration::from_secs(3), 9));
    assert_eq!(source_of(&s, "capture.max_connections"), &Source::Flag("--max-connections".into()));
    for (var, value, want) in [
        ("TAPWIRE_IDLE_TIMEOUT", "30", "no unit"),
        ("TAPWIRE_IDLE_TIMEOUT", "0s", "out of range"),
        ("TAPWIRE_MAX_CONNECTIONS", "0", "out of range"),
        ("TAPWIRE_MAX_CONNECTIONS", "many", "not a number"),
    ] {
        let err = resolve_with(&["--cgroup", "svc"], &env_of(&[(var, value)])).unwrap_err().to_string();
        assert!(err.contains(var) && err.contains(want), "{var}={value}: {err}");
    }
    let f = TempFile::new("conn-bad", "capture:\n  idle_timeout: soon\n");
    let err = resolve_with(&["--config", f.arg()], &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("idle_timeout") && err.contains("line 2"), "{err}");
}

#[test]
fn file_values_apply() {
    let f = TempFile::new("apply", FILE);
    let s = resolve_with(&["--config", f.arg()], &env_of(&[])).unwrap();
    assert_eq!(s.selection.cgroups.iter().map(|c| c.as_str()).collect::<Vec<_>>(), vec!["/kubepods/**/pod*"]);
    assert_eq!(s.selection.exclude_namespaces, vec!["kube-system"]);
    assert_eq!(s.selection.ports, vec![8080, 9090]);
    assert!(!s.selection.exclude_otlp_exporters);
    assert_eq!(s.payload_bytes, 2048);
    assert_eq!(s.context_propagation, file::ContextPropagation::Off);
    assert_eq!(source_of(&s, "capture.context_propagation"), &Source::File(f.0.clone()));
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.exporter, ExporterChoice::Otlp);
    assert_eq!(s.prometheus_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(s.kubernetes.node_name.as_deref(), Some("node-a"));
    assert_eq!(s.kubernetes.mode, crate::discover::k8s::K8sMode::Off);
    assert_eq!(s.log, "debug");
    let none = |_: &str| None;
    assert_eq!(s.otel_var(&none, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(), Some("http://collector:4317"));
    assert_eq!(s.otel_var(&none, "OTEL_EXPORTER_OTLP_TIMEOUT").as_deref(), Some("2500"));
    assert_eq!(s.otel_var(&none, "OTEL_EXPORTER_OTLP_HEADERS").as_deref(), Some("x-api-key=s3cret"));
    assert_eq!(
        s.resource_attributes,
        vec![("deployment.environment.name".into(), "staging".into()), ("team".into(), "shop".into())]
    );
    assert_eq!(source_of(&s, "capture.payload_bytes"), &Source::File(f.0.clone()));
    let sampling = s.sampling.to_sampling();
    assert_eq!(sampling.ratio, Some(0.25));
    assert_eq!(sampling.services.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["search", "checkout"]);
}

#[test]
fn precedence_flag_over_env_over_file_over_default() {
    let f = TempFile::new("prec", FILE);
    let env = env_of(&[
        ("TAPWIRE_PAYLOAD_BYTES", "512"),
        ("TAPWIRE_PORTS", "7000, 7001"),
        ("TAPWIRE_EXPORTER", "console"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team=payments,region=eu%2Dwest"),
    ]);
    let s = resolve_with(&["--config", f.arg(), "--payload-bytes", "256"], &env).unwrap();
    // flag beats env and file
    assert_eq!(s.payload_bytes, 256);
    assert_eq!(source_of(&s, "capture.payload_bytes"), &Source::Flag("--payload-bytes".into()));
    // env beats file
    assert_eq!(s.selection.ports, vec![7000, 7001]);
    assert_eq!(source_of(&s, "selection.ports"), &Source::Env("TAPWIRE_PORTS".into()));
    assert_eq!(s.exporter, ExporterChoice::Console);
    let lookup = |k: &str| env.get(k).cloned();
    assert_eq!(s.otel_var(&lookup, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(), Some("http://env:4318"));
    assert_eq!(source_of(&s, "export.otlp.endpoint"), &Source::Env("OTEL_EXPORTER_OTLP_ENDPOINT".into()));
    // file beats default
    assert_eq!(s.selection.exclude_namespaces, vec!["kube-system"]);
    // resource attributes merge key by key, the environment winning
    assert_eq!(
        s.resource_attributes,
        vec![
            ("deployment.environment.name".into(), "staging".into()),
            ("team".into(), "payments".into()),
            ("region".into(), "eu-west".into())
        ]
    );
    // the file's cgroups still apply (nothing overrides them)
    assert_eq!(source_of(&s, "selection.cgroups"), &Source::File(f.0.clone()));
}

#[test]
fn config_file_from_the_environment() {
    let f = TempFile::new("envfile", "selection: {executables: ['python3*']}\n");
    let s = resolve_with(&[], &env_of(&[("TAPWIRE_CONFIG", f.arg())])).unwrap();
    assert!(s.selection.executables[0].matches("python3.11"));
    assert_eq!(source_of(&s, "config"), &Source::Env("TAPWIRE_CONFIG".into()));
}

#[test]
fn unknown_keys_name_the_key_and_line() {
    let f = TempFile::new("unknown", "selection:\n  cgroups: [svc]\n  namespace: [shop]\n");
    let err = resolve_with(&["--config", f.arg()], &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("unknown field `namespace`"), "{err}");
    assert!(err.contains("selection"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains(f.arg()), "{err}");

    let f = TempFile::new("unknown-top", "capture: {}\nselections: {}\n");
    let err = resolve_with(&["--config", f.arg()], &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("unknown field `selections`") && err.contains("line 2"), "{err}");
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        ("capture:\n  payload_bytes: 9000\n", "capture: payload_bytes", "out of range"),
        ("capture:\n  context_propagation: header\n", "capture: context_propagation", "expected `headers` or `off`"),
        ("selection:\n  ports: [80, 70000]\n", "selection.ports", "line 2"),
        ("export:\n  exporter: jaeger\n", "export: exporter", "unknown exporter"),
        ("selection:\n  pod_selectors: ['app in (a']\n", "selection.pod_selectors", "unbalanced"),
        ("selection:\n  cgroups: ['/a/x**']\n", "selection.cgroups", "whole path component"),
        ("http:\n  routes: [users]\n", "http.routes", "must start with '/'"),
        ("export:\n  prometheus_listen: nine\n", "export.prometheus_listen", "line 2"),
        ("sampling:\n  rate: 0.5\n", "sampling", "unknown field `rate`"),
        ("selection: [a]\n", "selection", "line 1"),
    ];
    let mut wrong = Vec::new();
    for (text, key, want) in cases {
        let f = TempFile::new("bad", text);
        let err = resolve_with(&["--config", f.arg()], &env_of(&[])).unwrap_err().to_string();
        if !(err.contains(key) && err.contains(want)) {
            wrong.push(format!("{text:?}: {err}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let env_cases = [
        ("TAPWIRE_PAYLOAD_BYTES", "lots", "not a number"),
        ("TAPWIRE_PORTS", "80,http", "not a TCP port"),
        ("TAPWIRE_EXCLUDE_OTLP_EXPORTERS", "maybe", "not a boolean"),
        ("TAPWIRE_EXPORTER", "zipkin", "unknown exporter"),
        ("TAPWIRE_PROMETHEUS_LISTEN", "9464", "expected ADDRESS:PORT"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team", "not key=value"),
        ("TAPWIRE_NAMESPACES", "shop,Bad_NS", "not a valid Kubernetes namespace"),
        ("TAPWIRE_K8S", "maybe", "expected auto, on or off"),
    ];
    for (var, value, want) in env_cases {
        let err = resolve_with(&["--cgroup", "svc"], &env_of(&[(var, value)])).unwrap_err().to_string();
        assert!(err.contains(var) && err.contains(value) && err.contains(want), "{var}: {err}");
    }
    let err = resolve_with(&["--config", "/nonexistent/tapwire.yaml"], &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tapwire.yaml"), "{err}");
    let flag = Cmd::try_parse_from(["tapwire", "--payload-bytes", "10"]).err().unwrap().to_string();
    assert!(flag.contains("--payload-bytes") && flag.contains("out of range"), "{flag}");
}

#[test]
fn nothing_selected_is_an_error() {
    let err = resolve_with(&[], &env_of(&[])).unwrap_err();
    assert!(matches!(err, ConfigError::NothingSelected), "{err}");
    // An exclusion alone selects nothing either.
    assert!(resolve_with(&["--exclude-cgroup", "x"], &env_of(&[])).is_err());
}

#[test]
fn otel_errors_from_the_file_name_the_key() {
    let f = TempFile::new("otelbad", "selection: {cgroups: [a]}\nexport:\n  otlp:\n    protocol: thrift\n");
    let s = resolve_with(&["--config", f.arg()], &env_of(&[])).unwrap();
    let none = |_: &str| None;
    let lookup = |k: &str| s.otel_var(&none, k);
    let err = crate::export::ExportConfig::resolve(ExporterChoice::Otlp, &lookup).unwrap_err().to_string();
    let explained = s.explain_otel_error(&none, &err);
    assert!(explained.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && explained.contains("export.otlp.protocol"), "{explained}");
}

#[test]
fn print_shows_sources_and_hides_secrets() {
    let env = env_of(&[("TAPWIRE_PAYLOAD_BYTES", "512"), ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://user:pw@x:4318/v1/traces")]);
    let f = TempFile::new("print", &FILE.replace("sampling:\n  sampler: parentbased_traceidratio\n  ratio: 0.25\n  services:\n    search: {ratio: 0.01}\n    checkout: {sampler: always_on}\n", ""));
    let s = resolve_with(&["--config", f.arg(), "--exe", "nginx"], &env).unwrap();
    let text = render(&s);
    let line = |key: &str| text.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap_or_else(|| panic!("{key} missing:\n{text}"));
    assert!(line("capture.payload_bytes").contains("512") && line("capture.payload_bytes").ends_with("# env TAPWIRE_PAYLOAD_BYTES"));
    assert!(line("selection.executables").contains("[\"nginx\"]") && line("selection.executables").ends_with("# flag --exe"));
    assert!(line("selection.ports").ends_with(&format!("# file {}", f.arg())));
    assert!(line("selection.exclude_cgroups").ends_with("# default"));
    assert!(line("export.otlp.headers").contains("x-api-key=***"), "{text}");
    assert!(!text.contains("s3cret") && !text.contains("pw@"), "{text}");
    assert!(line("sampling").ends_with("# default"));
    assert!(line("kubernetes.node_name").contains("node-a"));
}

#[test]
fn the_example_file_in_deploy_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tapwire.example.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let file = parse_file(&path, &text).unwrap();
    assert_eq!(file.selection.exclude_namespaces.as_deref(), Some(&["kube-system".to_string()][..]));
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    assert!(readme.contains(&body), "README's example and deploy/tapwire.example.yaml differ");
}

#[test]
fn context_propagation_from_env_and_flag() {
    let s = resolve_with(&["--cgroup", "svc"], &env_of(&[("TAPWIRE_CONTEXT_PROPAGATION", "off")])).unwrap();
    assert_eq!(s.context_propagation, file::ContextPropagation::Off);
    let s = resolve_with(&["--cgroup", "svc", "--context-propagation", "headers"], &env_of(&[("TAPWIRE_CONTEXT_PROPAGATION", "off")]))
        .unwrap();
    assert_eq!(s.context_propagation, file::ContextPropagation::Headers);
    assert_eq!(source_of(&s, "capture.context_propagation"), &Source::Flag("--context-propagation".into()));
    let e = resolve_with(&["--cgroup", "svc"], &env_of(&[("TAPWIRE_CONTEXT_PROPAGATION", "on")])).unwrap_err().to_string();
    assert!(e.contains("TAPWIRE_CONTEXT_PROPAGATION") && e.contains("expected `headers` or `off`"), "{e}");
}

#[test]
fn the_daemonset_config_file_selects_every_pod_with_either_cgroup_driver() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base/tapwire.yaml");
    let s = resolve_with(&["--config", path.to_str().unwrap()], &env_of(&[])).unwrap();
    let selects = |dir: &str| {
        let parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        // A pattern selects the directories it matches and everything below them.
        (1..=parts.len()).any(|n| s.selection.cgroups.iter().any(|c| c.matches(&parts[..n])))
    };
    // cgroupfs driver, then systemd driver (kubeadm's default).
    assert!(selects("/kubepods/burstable/pod0f3c2d1e/0123abcd"));
    assert!(selects("/kubepods/pod0f3c2d1e/0123abcd"));
    assert!(selects("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3c.slice/cri-containerd-0123.scope"));
    assert!(selects("/kubepods.slice/kubepods-pod0f3c.slice/cri-containerd-0123.scope"));
    for not_a_pod in ["/system.slice/containerd.service", "/user.slice", "/init.scope", "/"] {
        assert!(!selects(not_a_pod), "{not_a_pod}");
    }
}
