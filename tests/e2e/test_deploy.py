"""deploy/: the Kubernetes manifests, alert rules, dashboard and collector configuration.

Static checks (offline; no cluster, no container engine, no Grafana, no collector binary):
- `kubectl kustomize` renders every overlay; the objects pass `kubernetes-validate --strict` for
  the Kubernetes versions in K8S_VERSIONS; yamllint passes on deploy/;
- what the schema cannot see: the capability set of each overlay, probes, ports, Service,
  RBAC, the ConfigMap's configuration file mounted where --config points, and the image wired
  to each other and to the collector's receiver;
- `promtool check rules` and `promtool test rules` on the alerts, `promtool check config` on the
  example Prometheus configuration, and every PromQL expression of the dashboard through
  `promtool check rules` (as recording rules);
- the collector's pipelines only name components it defines; the Containerfile's pinned
  versions match xtask's.

Live checks (root, the real agent from $TAPWIRE_BIN):
- the rendered DaemonSet's args, the ConfigMap's configuration file as it is (a key the agent
  does not know stops it), capability set and read-only root file system (emulated: setpriv
  with the same bounding set and no_new_privs as root, in a mount namespace where every mount is
  read-only) start the agent; only the cgroup, the listen address and the collector address are
  overridden, by the variables that take precedence over the file; its probe endpoint answers;
  it exits 0 on SIGTERM; without CAP_BPF the same command fails with a sentence naming the
  capability (the emulation is real);
- every metric name the dashboard and the alerts use appears in a real /metrics scrape of an
  agent watching a FastAPI service.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml

import procs

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ["default", "privileged"]
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yaml"
DASHBOARD = DEPLOY / "grafana" / "tapwire-dashboard.json"
COLLECTOR = DEPLOY / "otel-collector" / "config.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
YAMLLINT_CONFIG = DEPLOY / ".yamllint"

# Schemas the rendered objects must pass: the oldest Kubernetes minor we claim and the newest
# the pinned kubernetes-validate knows.
K8S_VERSIONS = ["1.31.0", "1.37.0"]

# The least-privilege capability set (overlays/default) and what overlays/privileged adds.
DEFAULT_CAPS = {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "SYS_RESOURCE"}
PRIVILEGED_EXTRA_CAPS = {"SYS_ADMIN"}


# Grafana's built-in interval variables, replaced by a duration before promtool parses a query.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")

SERVICE_NAME = "deploy-check"  # OTEL_SERVICE_NAME of the watched FastAPI service -> `job`
SCRAPE_TIMEOUT_S = 30.0  # every expected name and count must show in /metrics within this
SPANS_TIMEOUT_S = 30.0  # the ConfigMap keeps the default 5 s batch delay

# What the test changes in the DaemonSet's configuration to run it here, each with the variable
# that overrides the file's key (README, "Configuration": environment over file).
OVERRIDES = {"selection.cgroups": "TAPWIRE_CGROUPS",
             "export.prometheus_listen": "TAPWIRE_PROMETHEUS_LISTEN",
             "export.otlp.endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT"}


# ---- tools (missing ones fail with the way to get them, never skip) ---------------------------

def _tool(name: str, how: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: {how}", pytrace=False)
    return path


def _venv_tool(name: str) -> str:
    """A console script of the test venv (next to this Python), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return _tool(name, "install the pinned Python packages (`pip install -r "
                       f"tests/requirements.txt`, which `cargo xtask setup` does) to get {name}")


@pytest.fixture(scope="module")
def kubectl() -> str:
    return _tool("kubectl", "kubectl (with its built-in kustomize) renders deploy/kubernetes. "
                            "It is preinstalled at /usr/bin/kubectl on the project machines and "
                            "is not a Debian package there; elsewhere install kubectl >= 1.27 "
                            "from https://kubernetes.io/docs/tasks/tools/")


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool", "install the Debian package `prometheus` (in xtask's APT_PACKAGES; "
                             "`cargo xtask setup` installs it)")


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def ok(proc: subprocess.CompletedProcess) -> str:
    """stdout of a command that must have succeeded, else a failure with its output."""
    assert proc.returncode == 0, (
        f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc.stdout


# ---- rendered manifests -----------------------------------------------------------------------

def render(kubectl: str, directory: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(ok(run([kubectl, "kustomize", str(directory)]))) if d]
    assert docs, f"`kubectl kustomize {directory}` rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {overlay: render(kubectl, KUSTOMIZE / "overlays" / overlay) for overlay in OVERLAYS}


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(docs: list[dict]) -> dict:
    containers = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"expected one container in the DaemonSet, got {len(containers)}"
    return containers[0]


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} must appear exactly once in the DaemonSet args {args}"
    return args[args.index(flag) + 1]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def listen_port(config: dict) -> int:
    return int(config["export"]["prometheus_listen"].rsplit(":", 1)[1])


def container_port(c: dict, port: int | str) -> int:
    """A probe's or Service's port (number or name) resolved against the container's ports."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"port name {port!r} is not a port of the container ({c.get('ports')})"
    return named[0]


def config_file(docs: list[dict]) -> tuple[str, str]:
    """(path, text) of the file the container's `--config` names, read from the ConfigMap
    volume mounted at that path's directory."""
    c = container(docs)
    path = Path(flag_value(c["args"], "--config"))
    mounts = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert len(mounts) == 1, f"no single volume mounted at {path.parent}: {c['volumeMounts']}"
    assert mounts[0].get("readOnly") is True and "subPath" not in mounts[0], mounts[0]
    volumes = one(docs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mounts[0]["name"]]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    name = volume["configMap"]["name"]
    assert name in maps, f"volume {volume['name']} names ConfigMap {name!r}, rendered: {sorted(maps)}"
    data = maps[name]["data"]
    assert path.name in data, f"ConfigMap {name} has no key {path.name!r}: {sorted(data)}"
    return str(path), data[path.name]


def config_of(docs: list[dict]) -> dict:
    return yaml.safe_load(config_file(docs)[1])


def workspace_version() -> str:
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    return cargo["workspace"]["package"]["version"]


# ---- static: manifests ------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_passes_strict_schema_validation(rendered, overlay, tmp_path):
    docs = rendered[overlay]
    kinds = Counter(d["kind"] for d in docs)
    assert kinds == Counter({"Namespace": 1, "ServiceAccount": 1, "ClusterRole": 1,
                             "ClusterRoleBinding": 1, "ConfigMap": 1, "Service": 1,
                             "DaemonSet": 1}), f"unexpected objects in overlays/{overlay}: {kinds}"
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    validate = _venv_tool("kubernetes-validate")
    for version in K8S_VERSIONS:
        ok(run([validate, "--strict", "--quiet", "-k", version, str(path)]))


def test_yamllint_passes_on_deploy():
    ok(run([_venv_tool("yamllint"), "--strict", "-c", str(YAMLLINT_CONFIG), str(DEPLOY)]))


def test_default_overlay_is_least_privilege(rendered):
    docs = rendered["default"]
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    c = container(docs)
    sc = c["securityContext"]
    assert set(sc["capabilities"]["add"]) == DEFAULT_CAPS
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged", False)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork", False) and not pod.get("hostIPC", False)
    # No SYS_ADMIN, so tracefs is the host's, mounted in; cgroupfs and BTF read-only; the
    # host's bpffs writable (the propagation sockhash is pinned there). The only other volume
    # is the configuration file.
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: (volumes[m["name"]], m.get("readOnly", False))
              for m in c["volumeMounts"] if m["name"] in volumes}
    assert mounts == {"/sys/kernel/tracing": ("/sys/kernel/tracing", True),
                      "/sys/fs/cgroup": ("/sys/fs/cgroup", True),
                      "/sys/kernel/btf": ("/sys/kernel/btf", True),
                      "/sys/fs/bpf": ("/sys/fs/bpf", False)}
    assert [v["name"] for v in pod["volumes"] if "hostPath" not in v] == ["config"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                              "limits": {"cpu": "1", "memory": "256Mi"}}


def test_privileged_overlay_differs_only_in_its_security_context(rendered):
    default, privileged = rendered["default"], rendered["privileged"]
    sc = container(privileged)["securityContext"]
    assert sc["privileged"] is True
    assert set(sc["capabilities"]["add"]) == DEFAULT_CAPS | PRIVILEGED_EXTRA_CAPS
    # The API server rejects privileged: true together with allowPrivilegeEscalation: false.
    assert sc.get("allowPrivilegeEscalation") is not False

    def without_security_context(docs):
        docs = json.loads(json.dumps(docs))
        for c in one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]:
            c.pop("securityContext")
        return docs

    assert without_security_context(privileged) == without_security_context(default)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_are_wired_together(rendered, overlay):
    docs = rendered[overlay]
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = container(docs)
    # Every setting comes from the configuration file: no other flag, no environment but the
    # node's name from the downward API.
    assert c["args"] == ["run", "--config", "/etc/tapwire/tapwire.yaml"]
    assert "envFrom" not in c
    assert c["env"] == [{"name": "NODE_NAME",
                         "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    config = config_of(docs)
    # Every pod of the node, whichever cgroup driver the kubelet uses (a unit test matches the
    # pattern against both layouts).
    assert config["selection"] == {"cgroups": ["/kubepods*"]}
    port = listen_port(config)
    assert config["export"]["prometheus_listen"] == f"0.0.0.0:{port}"
    assert container_port(c, "metrics") == port

    # Probes hit /healthz on the port the agent listens on.
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/healthz", f"{probe}: {get}"
        assert container_port(c, get["port"]) == port, f"{probe} port {get['port']} != {port}"

    # The metrics Service: headless, selects the agent pods, scrape annotations on that port.
    svc = one(docs, "Service")
    assert svc["metadata"]["name"] == "tapwire-metrics"
    assert svc["spec"]["clusterIP"] == "None"
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == port and container_port(c, svc_port["targetPort"]) == port
    annotations = svc["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}

    # Namespace admits the pod; everything namespaced lives in it.
    ns = one(docs, "Namespace")
    assert ns["metadata"]["name"] == "tapwire"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for d in docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"].get("namespace") == "tapwire", f"{d['kind']} not in tapwire"

    # RBAC: watch pods, get the ReplicaSets and Jobs they name as owners, nothing more, bound to
    # the pod's ServiceAccount.
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    role = one(docs, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
    ]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "tapwire"}]

    # Spans to the collector's OTLP/gRPC receiver; metrics pulled, not pushed as well.
    assert config["export"]["exporter"] == "otlp"
    assert config["export"]["otlp"] == {"endpoint": "http://otel-collector.observability:4317",
                                        "protocol": "grpc", "metrics_exporter": "prometheus"}
    grpc_receiver = yaml.safe_load(COLLECTOR.read_text())["receivers"]["otlp"]["protocols"]["grpc"]
    assert config["export"]["otlp"]["endpoint"].rsplit(":", 1)[1] == \
        grpc_receiver["endpoint"].rsplit(":", 1)[1]
    assert config["kubernetes"] == {"mode": "auto"} and config["log"] == "info"
    # Only keys the live tests override by their variables are changed to run it here.
    for key in OVERRIDES:
        section = config
        for part in key.split("."):
            assert part in section, f"the configuration file has no {key}"
            section = section[part]

    # The image tag is the version being built.
    assert c["image"] == f"tapwire:{workspace_version()}"


# ---- static: Prometheus -----------------------------------------------------------------------

def test_alert_rules_check_and_unit_tests_pass(promtool):
    ok(run([promtool, "check", "rules", str(ALERTS)]))
    ok(run([promtool, "test", "rules", str(ALERTS_TEST)]))

    # Every alert has a test where it fires and one where it must stay silent.
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert alerts, "no alerts in alerts.yaml"
    assert alerts <= fires, f"alerts never expected to fire in a test: {sorted(alerts - fires)}"
    assert alerts <= silent, f"alerts never expected silent in a test: {sorted(alerts - silent)}"


def test_example_prometheus_config_is_valid_and_honours_labels(promtool):
    ok(run([promtool, "check", "config", str(PROMETHEUS_CONFIG)]))
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tapwire"]
    assert job["honor_labels"] is True, "tapwire's `job` labels would become exported_job"


# ---- static: dashboard ------------------------------------------------------------------------

def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for p in dashboard["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows hold their panels
    return panels


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' selector)."""
    queries = []
    for p in dashboard_panels(dashboard):
        for t in p.get("targets", []):
            queries.append((f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
            m = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", query.strip())
            assert m, f"variable {v['name']}: expected label_values(SELECTOR, LABEL), got {query!r}"
            queries.append((f"variable {v['name']}", m.group(1)))
    return queries


def grafana_to_promql(expr: str, variables: list[str]) -> str:
    """Replaces Grafana's variables so that promtool can parse the query."""
    for name in GRAFANA_INTERVALS:
        expr = expr.replace(name, "5m")
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", "x").replace("$" + name, "x")
    assert "$" not in expr, f"unknown variable left in {expr!r}"
    return expr


def test_dashboard_structure():
    d = load_dashboard()
    assert d["uid"] == "tapwire-services" and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["query"] == "label_values(http_server_request_duration_seconds_count, job)"
    panels = [p for p in dashboard_panels(d) if p["type"] != "row"]
    ids = [p["id"] for p in dashboard_panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], f"{p['title']} {t['refId']}"
            # Panels about watched services follow the `service` variable.
            if re.search(r"\b(http_|process_|tapwire_listen)", t["expr"]):
                assert 'job=~"$service"' in t["expr"], f"{p['title']}: {t['expr']}"
    titles = {p["title"]: p for p in panels}
    graph = titles["Service map"]
    assert graph["type"] == "nodeGraph"
    # The node graph finds its two frames by these refIds.
    assert [t["refId"] for t in graph["targets"]] == ["nodes", "edges"]
    assert all(t["format"] == "table" and t["instant"] for t in graph["targets"])
    used = set().union(*(metric_names(t["expr"]) for t in graph["targets"]))
    assert used == {"traces_service_graph_request_total"}


def test_every_dashboard_query_parses(promtool, tmp_path):
    d = load_dashboard()
    variables = [v["name"] for v in d["templating"]["list"]]
    queries = dashboard_queries(d)
    assert len(queries) >= 15, f"expected the dashboard's queries, found {len(queries)}"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": grafana_to_promql(expr, variables)}
        for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    where = "\n".join(f"dashboard:query_{i}:check  {w}" for i, (w, _) in enumerate(queries))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, (f"a dashboard query does not parse:\n{proc.stdout}{proc.stderr}"
                                  f"\nwhich rule is which query:\n{where}")


# ---- static: collector and image --------------------------------------------------------------

def test_collector_pipelines_use_defined_components():
    config = yaml.safe_load(COLLECTOR.read_text())
    defined = {kind: set(config.get(kind) or {})
               for kind in ("receivers", "processors", "exporters", "connectors", "extensions")}
    service = config["service"]
    assert set(service.get("extensions", [])) <= defined["extensions"]
    pipelines = service["pipelines"]
    assert {p.split("/")[0] for p in pipelines} == {"traces", "metrics"}
    connectors_in, connectors_out = set(), set()
    for name, p in pipelines.items():
        for r in p["receivers"]:
            assert r in defined["receivers"] | defined["connectors"], f"{name}: receiver {r}"
            if r in defined["connectors"]:
                connectors_in.add(r)
        for e in p["exporters"]:
            assert e in defined["exporters"] | defined["connectors"], f"{name}: exporter {e}"
            if e in defined["connectors"]:
                connectors_out.add(e)
        assert set(p["processors"]) <= defined["processors"], name
        # memory_limiter first (refuse before buffering), batch last.
        assert p["processors"][0] == "memory_limiter" and p["processors"][-1] == "batch", name
    # A connector must end one pipeline and start another, or the collector refuses to start.
    assert connectors_in == connectors_out == defined["connectors"]
    # Nothing defined and unused: it would be mistaken for something in effect.
    for kind in ("receivers", "processors", "exporters"):
        used = {c for p in pipelines.values() for c in p[kind]}
        assert defined[kind] <= used, f"{kind} not in any pipeline: {defined[kind] - used}"


def test_containerfile_matches_xtask_toolchain():
    text = CONTAINERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    setup = (REPO / "xtask" / "src" / "setup.rs").read_text()
    linker = re.search(r'pub const BPF_LINKER_VERSION: &str = "([^"]+)";', setup).group(1)
    assert args["BPF_LINKER_VERSION"] == linker
    package = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]
    rust = package["rust-version"]
    assert args["RUST_VERSION"] == rust or args["RUST_VERSION"].startswith(rust + ".")
    assert re.match(r"nightly-\d{4}-\d{2}-\d{2}$", args["NIGHTLY"])
    assert "--component rust-src" in text
    assert "cargo build --release --locked -p tapwire" in text
    assert 'ENTRYPOINT ["/usr/local/bin/tapwire"]' in text


# ---- metric names in PromQL -------------------------------------------------------------------

_PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                    "group_right", "offset", "bool", "atan2", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (no `{__name__=...}` selectors in deploy/)."""
    assert "__name__" not in expr, f"selectors on __name__ are not handled: {expr!r}"
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])", s):
        if m.group(1) in _PROMQL_KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue  # keyword, or a function / aggregation call
        names.add(m.group(1))
    return names


def test_metric_name_extraction():
    assert metric_names(
        'sum by (job, le) (rate(a_bucket{job=~"x", le="1"}[5m] offset 1h)) / on (job) '
        'group_left b > 0.5 and c unless d{e="f(g)"}') == {"a_bucket", "b", "c", "d"}
    assert metric_names("histogram_quantile(0.95, sum(rate(x_bucket[5m])) by (le))") == {"x_bucket"}
    assert metric_names("1e3 * foo:bar - 2 > bool 1") == {"foo:bar"}
    assert metric_names('sum without (instance) (up{job="a"}) or vector(0)') == {"up"}


def referenced_metrics() -> dict[str, list[str]]:
    """Every metric name the dashboard and the alert rules use -> where."""
    where: dict[str, list[str]] = {}
    d = load_dashboard()
    variables = [v["name"] for v in d["templating"]["list"]]
    for place, expr in dashboard_queries(d):
        for name in metric_names(grafana_to_promql(expr, variables)):
            where.setdefault(name, []).append(f"dashboard {place}")
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                rule_name = rule.get("alert") or rule.get("record")
                where.setdefault(name, []).append(f"alert {rule_name}")
    return where


# ---- live: the rendered DaemonSet runs the real agent ------------------------------------------

def ensure_tracefs() -> None:
    """The default overlay mounts the node's tracefs; make sure this node has one mounted."""
    if not Path("/sys/kernel/tracing/events").is_dir():
        ok(run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))


def ensure_bpffs() -> None:
    """The default overlay mounts the node's bpffs; make sure this node has one mounted (as
    systemd does at boot)."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    if not any(m[1] == "/sys/fs/bpf" and m[2] == "bpf" for m in mounts):
        ok(run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]))


def capability_wrapper(security_context: dict, drop: set[str] = frozenset()) -> list[str]:
    """setpriv arguments that give a root process the container's capabilities and no more.

    As root, execve() grants the bounding set; no_new_privs is allowPrivilegeEscalation: false.
    A privileged container keeps every capability: no wrapper.
    """
    if security_context.get("privileged"):
        return []
    assert security_context["capabilities"]["drop"] == ["ALL"]
    caps = set(security_context["capabilities"]["add"]) - set(drop)
    return procs.with_capabilities(
        caps, no_new_privs=security_context.get("allowPrivilegeEscalation") is False)


# Runs "$@" in a private mount namespace where every mount is read-only but bpffs, which the
# DaemonSet mounts writable (stricter than the container, whose /dev/shm stays writable; the
# test's own processes are unaffected).
_READ_ONLY_MOUNTS = ('for m in $(awk \'{print $2}\' /proc/self/mounts | sort -u); do '
                     '[ "$m" = /sys/fs/bpf ] || mount -o remount,bind,ro "$m" 2>/dev/null; done; exec "$@"')


# A node without tracefs mounted, as the container sees it: an empty directory (a read-only
# tmpfs) over tracefs and its debugfs alias, in the same private mount namespace.
_HIDE_TRACEFS = ('for d in /sys/kernel/tracing /sys/kernel/debug/tracing; do '
                 'if [ -d "$d/events" ]; then mount -t tmpfs -o ro,size=4k none "$d" || exit 97; fi; '
                 'done; ')


def read_only_wrapper(security_context: dict, hide_tracefs: bool = False) -> list[str]:
    """readOnlyRootFilesystem: the agent gets a file system it cannot write to (and, with
    `hide_tracefs`, no tracefs), in a mount namespace of its own."""
    script = (_HIDE_TRACEFS if hide_tracefs else "") + \
        (_READ_ONLY_MOUNTS if security_context.get("readOnlyRootFilesystem") else 'exec "$@"')
    if script == 'exec "$@"':
        return []
    unshare = _tool("unshare", "install util-linux")
    return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]


def container_env(c: dict) -> dict[str, str]:
    """The container's `env`, with the downward API's node name as a kubelet would fill it."""
    env = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, var
            env[var["name"]] = "test-node"
    return env


def command_from_manifest(docs: list[dict], tapwire_bin: str, cgroup: Path, port: int,
                          otlp_endpoint: str, config_dir: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the DaemonSet's container run here: its args, with the ConfigMap's
    configuration file written unchanged to `config_dir` (the pod's mount path does not exist
    here), and its env; the test's cgroup, a local listen address and the test receiver are set
    by the variables that override the file's keys (OVERRIDES)."""
    c = container(docs)
    mount_path, text = config_file(docs)
    local = config_dir / Path(mount_path).name
    local.write_text(text)
    env = container_env(c)
    values = {"selection.cgroups": "/" + cgroup.name,  # relative to the cgroup2 mount
              "export.prometheus_listen": f"127.0.0.1:{port}",
              "export.otlp.endpoint": otlp_endpoint}
    env.update({OVERRIDES[key]: value for key, value in values.items()})
    return [tapwire_bin, *with_flag(c["args"], "--config", str(local))], env


def agent_from_manifest(docs: list[dict], tapwire_bin: str, cgroup: Path, port: int,
                        otlp_endpoint: str, log_dir: Path, label: str,
                        drop_caps: set[str] = frozenset(),
                        hide_tracefs: bool = False) -> procs.TapwireProcess:
    """The DaemonSet's container as a local process (command_from_manifest), with its
    capabilities and its read-only file system."""
    config_dir = log_dir / f"{label}-config"
    config_dir.mkdir(parents=True, exist_ok=True)
    argv, env = command_from_manifest(docs, tapwire_bin, cgroup, port, otlp_endpoint, config_dir)
    agent = procs.TapwireProcess(tapwire_bin, [], procs.base_env(env), log_dir, label=label)
    sc = container(docs)["securityContext"]
    # Each wrapper execs the next, so the pid (and SIGTERM) is the agent's.
    agent.argv = [*read_only_wrapper(sc, hide_tracefs), *capability_wrapper(sc, drop_caps), *argv]
    return agent


def leaf_keys(section: dict, prefix: str = "") -> list[str]:
    """Dotted keys of a configuration file's values (`export.otlp.endpoint`)."""
    keys = []
    for key, value in section.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def effective_sources(argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """`tapwire config --print` with the same arguments: setting -> where its value came from."""
    assert argv[1] == "run", argv
    out = ok(run([argv[0], "config", "--print", *argv[2:]], env=procs.base_env(env)))
    sources = {}
    for line in out.splitlines()[1:]:
        m = re.fullmatch(r"([\w.]+): .*?\s+# (.+)", line)
        assert m, f"unexpected `tapwire config --print` line {line!r}"
        sources[m.group(1)] = m.group(2)
    return sources


def http_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy the environment names
    return session


def stop_agent(agent: procs.TapwireProcess) -> None:
    code = agent.stop()
    assert code == 0, f"{agent.label} exited with {code} after SIGTERM\n{agent.diagnostics()}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_daemonset_starts_the_agent(rendered, overlay, tapwire_bin, cgroup,
                                             otlp_receiver, attach_log, tmp_path):
    ensure_tracefs()
    ensure_bpffs()
    cg = cgroup(f"deploy-{overlay}")
    port = procs.free_port()

    # The agent reads every key of the ConfigMap's file; only the overridden ones come from
    # elsewhere, and the node name from the downward API's variable.
    argv, env = command_from_manifest(rendered[overlay], tapwire_bin, cg, port,
                                      otlp_receiver.grpc_endpoint, tmp_path)
    local_config = argv[argv.index("--config") + 1]
    sources = effective_sources(argv, env)
    expected = {key: f"env {OVERRIDES[key]}" if key in OVERRIDES else f"file {local_config}"
                for key in leaf_keys(config_of(rendered[overlay]))}
    expected["kubernetes.node_name"] = "env NODE_NAME"
    assert {key: sources.get(key) for key in expected} == expected, sources

    agent = agent_from_manifest(rendered[overlay], tapwire_bin, cg, port,
                                otlp_receiver.grpc_endpoint, tmp_path, f"tapwire-{overlay}")
    attach_log(f"tapwire ({overlay} overlay) logs", agent.diagnostics)
    agent.start()  # fails with the agent's stderr if it exits or never logs `capture ready`
    try:
        # What the kubelet's probes do.
        c = container(rendered[overlay])
        path = c["readinessProbe"]["httpGet"]["path"]
        with http_session() as session:
            response = session.get(f"http://127.0.0.1:{port}{path}", timeout=5)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text!r}"
        # With the manifest's capabilities and mounts, the propagation sockhash is pinned.
        pin = procs.pin_of(agent)
        assert pin is not None and pin.exists(), agent.diagnostics()
    finally:
        stop_agent(agent)


def the_error(agent: procs.TapwireProcess) -> str:
    """The one `tapwire: ` line an agent that could not start printed (exit 1)."""
    with pytest.raises(AssertionError, match="exited with code 1 "):
        agent.start(ready_timeout=30)
    errors = [line for line in agent.stderr().splitlines() if line.startswith("tapwire: ")]
    assert len(errors) == 1 and agent.stderr().splitlines()[-1] == errors[0], agent.diagnostics()
    return errors[0].removeprefix("tapwire: ")


def test_capability_set_is_enforced(rendered, tapwire_bin, cgroup, otlp_receiver, attach_log,
                                    tmp_path):
    """Control for the test above: the same command without CAP_BPF must fail, so the
    capability emulation really restricts the agent; the agent says which one is missing."""
    ensure_tracefs()
    cg = cgroup("deploy-nobpf")
    agent = agent_from_manifest(rendered["default"], tapwire_bin, cg, procs.free_port(),
                                otlp_receiver.grpc_endpoint, tmp_path, "tapwire-nobpf",
                                drop_caps={"BPF"})
    attach_log("tapwire without CAP_BPF logs", agent.diagnostics)
    assert the_error(agent) == (
        "tapwire lacks CAP_BPF, which it needs to load and attach its eBPF programs: run it as "
        "root or grant it (in Kubernetes, securityContext.capabilities.add: [BPF]); "
        "`tapwire check` lists every capability")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_node_without_tracefs(rendered, overlay, tapwire_bin, cgroup, otlp_receiver, attach_log,
                              tmp_path):
    """tracefs not mounted on the node: the default overlay (no CAP_SYS_ADMIN) stops with one
    sentence saying how to mount it; the privileged overlay mounts it itself and starts, as
    the README says."""
    ensure_tracefs()  # so that hiding it is what makes the difference
    cg = cgroup(f"deploy-notracefs-{overlay}")
    agent = agent_from_manifest(rendered[overlay], tapwire_bin, cg, procs.free_port(),
                                otlp_receiver.grpc_endpoint, tmp_path, f"tapwire-notracefs-{overlay}",
                                hide_tracefs=True)
    attach_log(f"tapwire ({overlay} overlay, no tracefs) logs", agent.diagnostics)
    if overlay == "privileged":
        agent.start()
        stop_agent(agent)
        return
    assert the_error(agent) == (
        "tracefs is not mounted at /sys/kernel/tracing and tapwire could not mount it "
        "(EPERM: Operation not permitted): mount it with "
        "`mount -t tracefs tracefs /sys/kernel/tracing` (on the node, when tapwire runs in a "
        "container) or grant tapwire CAP_SYS_ADMIN")


# `tapwire check` under the DaemonSet's capability set, less the capabilities dropped: the mark
# each capability's line must show (the others: ok; SYS_ADMIN, which the default overlay leaves
# out on purpose: warn), and the exit status.
CHECK_CASES = {
    "daemonset": (set(), {}, 0),
    "no-bpf-perfmon": ({"BPF", "PERFMON"}, {"CAP_BPF": "FAIL", "CAP_PERFMON": "FAIL"}, 1),
    "no-net-admin": ({"NET_ADMIN"}, {"CAP_NET_ADMIN": "FAIL"}, 1),
    "no-proc-access": ({"SYS_PTRACE", "DAC_READ_SEARCH"},
                       {"CAP_SYS_PTRACE": "warn", "CAP_DAC_READ_SEARCH": "warn"}, 0),
}


@pytest.mark.parametrize("case", list(CHECK_CASES))
def test_check_reports_capabilities_by_name(rendered, tapwire_bin, case):
    dropped, marks, code = CHECK_CASES[case]
    ensure_tracefs()
    sc = container(rendered["default"])["securityContext"]
    done = run([*capability_wrapper(sc, dropped), tapwire_bin, "check"], env=procs.base_env())
    report = f"exit {done.returncode}\n{done.stdout}{done.stderr}"
    assert done.returncode == code, report
    lines = {m.group(2): (m.group(1).strip(), m.group(3)) for m in
             re.finditer(r"^\[(ok  |FAIL|warn)\] (CAP_\w+)\s+(.*)$", done.stdout, re.M)}
    assert set(lines) == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_PTRACE",
                          "CAP_DAC_READ_SEARCH", "CAP_SYS_RESOURCE", "CAP_SYS_ADMIN"}, report
    expected = {cap: "ok" for cap in lines} | {"CAP_SYS_ADMIN": "warn"} | marks
    assert {cap: mark for cap, (mark, _) in lines.items()} == expected, report
    for cap, (mark, detail) in lines.items():
        fix = rf"; grant {cap} \(Kubernetes: capabilities\.add {cap[4:]}\) or run as root"
        if mark == "FAIL":
            assert re.fullmatch(rf"missing: tapwire cannot run without it, it is needed to [^;]+{fix}",
                                detail), detail
        elif mark == "warn":
            assert re.fullmatch(rf"missing: [^;]+{fix}", detail), detail
        else:
            assert detail.startswith(("held: tapwire uses it to ", "not held, not needed: ")), detail
    assert re.search(r"^\[ok  \] privileges\s+uid 0; of the capabilities below, holds ", done.stdout,
                     re.M), report
    last = done.stdout.splitlines()[-1]
    assert last == ("tapwire can run on this node." if code == 0 else
                    "tapwire cannot run on this node: fix the FAIL lines above."), report


# ---- live: the dashboard and the alerts only use names the agent exports ------------------------

def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        assert m, f"unparsable exposition line {line!r}"
        labels = dict(re.findall(r'([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def process_memory_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, kernel memory of the eBPF maps and programs it holds), in bytes."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    objects: dict[tuple[str, int], int] = {}
    for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(l.split(":", 1) for l in fdinfo.read_text().splitlines() if ":" in l)
        except (FileNotFoundError, ValueError):
            continue
        for kind in ("map_id", "prog_id"):
            if kind in fields and "memlock" in fields:
                objects[(kind, int(fields[kind]))] = int(fields["memlock"])
    return rss, sum(objects.values())


def mebibytes(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert m, f"unexpected memory quantity {quantity!r}"
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def test_dashboard_and_alerts_use_only_exported_metrics(rendered, tapwire_bin, cgroup,
                                                       fastapi_service, otlp_receiver,
                                                       attach_log, tmp_path):
    referenced = referenced_metrics()
    expected = set(referenced)

    ensure_tracefs()
    docs = rendered["default"]
    cg = cgroup("deploy-metrics")
    service = fastapi_service(cg, env={"OTEL_SERVICE_NAME": SERVICE_NAME}, label="deploy-fastapi")
    port = procs.free_port()
    agent = agent_from_manifest(docs, tapwire_bin, cg, port, otlp_receiver.grpc_endpoint,
                                tmp_path, "tapwire-metrics")
    attach_log("tapwire logs", agent.diagnostics)
    agent.start()
    try:
        # 6 answered 200 (one slow enough for a few buckets) and 2 answered 500.
        plan = [("/items/1", 200), ("/items/2?delay_ms=30", 200), ("/fail", 500),
                ("/items/3", 200), ("/hello", 200), ("/fail?delay_ms=10", 500),
                ("/items/4?delay_ms=120", 200), ("/hello", 200)]
        with http_session() as session:
            for path, status in plan:
                r = session.get(f"{service.base_url}{path}", timeout=10,
                                headers={"Connection": "close"})
                assert r.status_code == status, f"GET {path}: {r.status_code}"

        # Scrape until the counts and every expected name are there.
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        with http_session() as session:
            while True:
                text = session.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                samples = parse_exposition(text)
                names = {name for name, _, _ in samples}
                counted = sum(value for name, labels, value in samples
                              if name == "http_server_request_duration_seconds_count"
                              and labels.get("job") == SERVICE_NAME)
                done = expected <= names and counted >= len(plan)
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        attach_log("last /metrics scrape", lambda: text)

        # The dashboard's `service` variable is the `job` label, the service's own name, and
        # its queries count what happened.
        server_counts = [(labels, value) for name, labels, value in samples
                         if name == "http_server_request_duration_seconds_count"
                         and labels.get("job") == SERVICE_NAME]
        assert server_counts, \
            f"no http_server_request_duration_seconds_count{{job={SERVICE_NAME!r}}}"
        assert all("http_route" in labels for labels, _ in server_counts), server_counts
        total = sum(v for _, v in server_counts)
        errors = sum(v for labels, v in server_counts
                     if labels.get("http_response_status_code", "").startswith("5"))
        assert (total, errors) == (len(plan), 2), f"counts by labels: {server_counts}"

        # The ConfigMap's OTLP settings deliver the spans (gRPC, to the stand-in collector).
        spans = otlp_receiver.wait_for_spans(len(plan), SPANS_TIMEOUT_S,
                                             diagnostics=agent.diagnostics)
        mine = [s for s in spans if s["service_name"] == SERVICE_NAME]
        assert len(mine) == len(plan), otlp_receiver.describe("spans of the watched service")
        assert {r.transport for r in otlp_receiver.trace_requests()} == {"grpc"}

        # The memory request (and so the limit) covers the agent and the eBPF maps charged to
        # its cgroup.
        rss, bpf = process_memory_bytes(agent.pid)
        request = mebibytes(container(docs)["resources"]["requests"]["memory"]) * 2**20
        assert rss + bpf < request, \
            f"RSS {rss} B + eBPF maps/programs {bpf} B >= memory request {request} B"
        print(f"agent memory: RSS {rss / 2**20:.1f} MiB, "
              f"eBPF maps and programs {bpf / 2**20:.1f} MiB")

        # Last, so that a missing name does not hide the checks above.
        missing = expected - names
        assert not missing, (
            "metric names used by deploy/ but absent from the agent's /metrics:\n"
            + "\n".join(f"  {n}  (used by {', '.join(referenced[n])})" for n in sorted(missing)))
    finally:
        stop_agent(agent)
