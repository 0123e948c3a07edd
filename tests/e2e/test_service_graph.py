"""The service graph and the per-program eBPF statistics, end to end.

Two watched services, each in its own cgroup: graph-a (apps/graph_caller.py) whose handler
calls graph-b (apps/fastapi_app.py) over loopback, and an unwatched copy of fastapi_app outside
every test cgroup. No traceparent is involved: the edge graph-a -> graph-b comes from pairing
graph-a's CLIENT spans with graph-b's SERVER spans by their TCP connection.

The test (unwatched) sends graph-a:
- B_OK calls that make graph-a call graph-b /items/N?delay_ms=B_DELAY_MS (200),
- B_FAIL calls that make it call graph-b /fail?delay_ms=5 (500),
- C_CALLS calls that make it call the unwatched service /hello.

Expected, exactly, on the Prometheus endpoint and over OTLP:
- traces_service_graph_request_total{client="graph-a", server="graph-b"} = B_OK + B_FAIL, with
  failed_total = B_FAIL and both duration histograms counting B_OK + B_FAIL;
- {client="graph-a", server="127.0.0.1", connection_type="virtual_node"} = C_CALLS (an unwatched
  peer is named by server.address) and unpaired client spans of graph-a = C_CALLS;
- {client="user", server="graph-a", connection_type="virtual_node"} = every request the test
  sent (graph-a's callers are not watched), none failed;
- nothing else calls graph-b;
- tapwire_agent_ebpf_program_runs_total of the socket hooks grows by at least the traffic.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

import procs
from test_metrics import Exposition, scrape_metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tapwire-dashboard.json"

B_OK = 9
B_FAIL = 3
C_CALLS = 4
B_DELAY_MS = 20
FAIL_DELAY_MS = 5
WAIT_S = 5.0  # ServiceGraphConfig::wait: unpaired spans become virtual-node edges after this
TIMEOUT_S = 40.0  # every expected count must show within this
EXPORT_INTERVAL_MS = 1000
SLACK_PER_CALL_S = 0.001  # kernel stamps vs the caller's perf_counter around the call

TOTAL = "traces_service_graph_request_total"
FAILED = "traces_service_graph_request_failed_total"
SERVER_COUNT = "traces_service_graph_request_server_seconds_count"
CLIENT_COUNT = "traces_service_graph_request_client_seconds_count"
SERVER_SUM = "traces_service_graph_request_server_seconds_sum"
CLIENT_SUM = "traces_service_graph_request_client_seconds_sum"
UNPAIRED = "traces_service_graph_unpaired_spans_total"
RUNS = "tapwire_agent_ebpf_program_runs_total"
RUN_TIME = "tapwire_agent_ebpf_program_run_time_seconds_total"


def edge(expo: Exposition, name: str, client: str, server: str, virtual: bool) -> float | None:
    found = [s for s in expo.select(name, client=client, server=server)
             if (s.labels.get("connection_type", "") == "virtual_node") == virtual]
    return sum(s.value for s in found) if found else None


def program_runs(expo: Exposition) -> dict[str, float]:
    return {s.labels["program"]: s.value for s in expo.select(RUNS)}


def wait_for(port: int, done, what: str, agent: procs.TapwireProcess) -> Exposition:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        expo = scrape_metrics(port)
        if done(expo):
            return expo
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} not seen within {TIMEOUT_S} s\n"
                f"{expo.lines(('traces_service_graph_',))}\n{agent.diagnostics()}")
        time.sleep(0.5)


@pytest.fixture
def graph_a(tmp_path):
    """Factory: graph_a(cgroup, env) -> the caller service (stopped at teardown)."""
    started: list[procs.ServiceProcess] = []

    def start(cgroup_path, env):
        service = procs.start_uvicorn("graph_caller:app", tmp_path, "graph-a",
                                      cgroup=cgroup_path, env=env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def test_service_graph_edges_and_program_runs(cgroup, fastapi_service, graph_a, tapwire,
                                              otlp_receiver, attach_log):
    cg_a, cg_b = cgroup("graph-a"), cgroup("graph-b")
    b = fastapi_service(cg_b, env={"OTEL_SERVICE_NAME": "graph-b"}, label="graph-b")
    c = fastapi_service(None, env={"OTEL_SERVICE_NAME": "graph-unwatched"},
                        label="graph-unwatched")
    a = graph_a(cg_a, {"OTEL_SERVICE_NAME": "graph-a"})
    attach_log("graph-a output", a.diagnostics)

    port = procs.free_port()
    env = {**otlp_receiver.exporter_env("grpc"),
           "OTEL_METRIC_EXPORT_INTERVAL": str(EXPORT_INTERVAL_MS)}
    agent = tapwire([cg_a, cg_b], env=env, label="tapwire-graph",
                    args=["--prometheus-listen", f"127.0.0.1:{port}"])

    # Per-program statistics are read every second: take the baseline once they are there.
    before = program_runs(wait_for(port, lambda e: program_runs(e), "per-program run counts",
                                   agent))
    assert {"sys_enter_recvfrom", "sock_recv_length", "sys_enter_sendto"} <= before.keys(), before

    plan = ([(b.port, f"/items/{i}?delay_ms={B_DELAY_MS}", 200) for i in range(B_OK)]
            + [(b.port, f"/fail?delay_ms={FAIL_DELAY_MS}", 500) for _ in range(B_FAIL)]
            + [(c.port, "/hello", 200) for _ in range(C_CALLS)])
    elapsed_b_s = 0.0
    session = requests.Session()
    session.trust_env = False
    try:
        for callee, path, status in plan:
            r = session.get(f"{a.base_url}/call", params={"port": callee, "path": path},
                            timeout=15, headers={"Connection": "close"})
            assert r.status_code == 200, f"graph-a /call {path}: {r.status_code} {r.text}"
            body = r.json()
            assert body["status"] == status, f"{path} via graph-a: {body}"
            if callee == b.port:
                elapsed_b_s += body["elapsed_ns"] / 1e9
    finally:
        session.close()
    sent = len(plan)
    b_calls = B_OK + B_FAIL

    # Unpaired spans need WAIT_S to become virtual-node edges; wait for every expected count.
    def complete(e: Exposition) -> bool:
        return (edge(e, TOTAL, "graph-a", "graph-b", False) == b_calls
                and edge(e, TOTAL, "graph-a", "127.0.0.1", True) == C_CALLS
                and edge(e, TOTAL, "user", "graph-a", True) == sent)

    started_wait = time.monotonic()
    wait_for(port, complete, "every service-graph edge", agent)
    # Then one more export interval and a wait past the pairing window: nothing more may come.
    time.sleep(max(EXPORT_INTERVAL_MS / 1000 + 0.5, WAIT_S + 1.0 - (time.monotonic() - started_wait)))
    expo = scrape_metrics(port)
    attach_log("last /metrics scrape (service graph)", lambda: expo.lines(
        ("traces_service_graph_", "tapwire_agent_ebpf_", "tapwire_agent_service_graph")))

    problems = []

    def check(what, got, want):
        if got != want:
            problems.append(f"{what}: got {got}, want {want}")

    check("A->B requests", edge(expo, TOTAL, "graph-a", "graph-b", False), b_calls)
    check("A->B failed", edge(expo, FAILED, "graph-a", "graph-b", False), B_FAIL)
    check("A->B server histogram count", edge(expo, SERVER_COUNT, "graph-a", "graph-b", False),
          b_calls)
    check("A->B client histogram count", edge(expo, CLIENT_COUNT, "graph-a", "graph-b", False),
          b_calls)
    check("A->unwatched requests", edge(expo, TOTAL, "graph-a", "127.0.0.1", True), C_CALLS)
    check("A->unwatched failed", edge(expo, FAILED, "graph-a", "127.0.0.1", True), 0)
    check("A->unwatched client histogram count",
          edge(expo, CLIENT_COUNT, "graph-a", "127.0.0.1", True), C_CALLS)
    check("A->unwatched server histogram (not seen: absent)",
          edge(expo, SERVER_COUNT, "graph-a", "127.0.0.1", True), None)
    check("user->A requests", edge(expo, TOTAL, "user", "graph-a", True), sent)
    check("user->A failed", edge(expo, FAILED, "user", "graph-a", True), 0)
    check("user->A server histogram count", edge(expo, SERVER_COUNT, "user", "graph-a", True),
          sent)
    check("unpaired client spans of A", expo.total(UNPAIRED, client="graph-a"), C_CALLS)
    check("unpaired server spans of B", expo.total(UNPAIRED, server="graph-b"), None)
    callers_of_b = sorted({s.labels["client"] for s in expo.select(TOTAL, server="graph-b")})
    check("callers of graph-b", callers_of_b, ["graph-a"])
    check("pending spans", expo.total("tapwire_agent_service_graph_pending"), 0)
    job = {s.labels.get("job") for s in expo.select(TOTAL)}
    check("job of the edges (the agent's own resource)", job, {"tapwire"})

    # Durations: graph-b sleeps at least its delay; its span lies inside graph-a's client span,
    # which lies inside graph-a's own measurement around the call.
    server_sum = edge(expo, SERVER_SUM, "graph-a", "graph-b", False) or 0.0
    client_sum = edge(expo, CLIENT_SUM, "graph-a", "graph-b", False) or 0.0
    floor = (B_OK * B_DELAY_MS + B_FAIL * FAIL_DELAY_MS) / 1000
    if not floor <= server_sum <= client_sum <= elapsed_b_s + b_calls * SLACK_PER_CALL_S:
        problems.append(f"durations: want {floor:.4f} <= server {server_sum:.4f} <= client "
                        f"{client_sum:.4f} <= caller-measured {elapsed_b_s:.4f} s "
                        f"(+{b_calls * SLACK_PER_CALL_S:.3f} s)")

    # Per-program statistics grew with the traffic: every request read by graph-a, graph-b (and
    # the unwatched service) went through recvfrom and sock_recv_length.
    after = program_runs(expo)
    for program in ("sys_enter_recvfrom", "sock_recv_length", "sys_enter_sendto"):
        grown = after.get(program, 0) - before.get(program, 0)
        if grown < sent + b_calls:
            problems.append(f"{RUNS}{{program={program!r}}} grew by {grown}, "
                            f"want >= {sent + b_calls} (the requests read)")
    run_time = {s.labels["program"]: s.value for s in expo.select(RUN_TIME)}
    if not run_time.get("sys_enter_recvfrom", 0) > 0:
        problems.append(f"{RUN_TIME} of sys_enter_recvfrom is {run_time.get('sys_enter_recvfrom')}")

    # The same edges over OTLP (the agent's resource, cumulative sums).
    deadline = time.monotonic() + 10
    while True:
        points = [p for p in otlp_receiver.latest_metric_points(TOTAL)
                  if p["attributes"].get("client") == "graph-a"
                  and p["attributes"].get("server") == "graph-b"]
        if (points and points[0]["value"] == b_calls) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    otlp = [(p["service_name"], p["attributes"], p["value"], p["monotonic"], p["temporality"])
            for p in points]
    check("OTLP A->B", otlp, [("tapwire", {"client": "graph-a", "server": "graph-b",
                                           "connection_type": ""}, b_calls, True, "CUMULATIVE")])
    hist = [p for p in otlp_receiver.latest_metric_points(
        "traces_service_graph_request_server_seconds")
        if p["attributes"].get("client") == "graph-a" and p["attributes"].get("server") == "graph-b"]
    check("OTLP A->B server histogram count", [p["count"] for p in hist], [b_calls])
    check("OTLP A->B server histogram unit", [p["unit"] for p in hist], ["s"])

    assert not problems, "\n".join(problems) + "\n" + expo.lines(("traces_service_graph_",))
    print(expo.lines(("traces_service_graph_request_total", "traces_service_graph_request_failed",
                      "traces_service_graph_unpaired")))
    print("program runs grown: " + ", ".join(
        f"{p} +{after[p] - before.get(p, 0):.0f}" for p in sorted(after)))


def test_dashboard_service_map_queries_shape_nodes_and_edges(tmp_path):
    """The node graph's two queries, evaluated by promtool on known series: one node per service
    (callers that receive nothing included, each once) and one edge per client/server pair,
    with the id/title/source/target labels the node graph reads."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("`promtool` is not on PATH: install the Debian package `prometheus` "
                    "(`cargo xtask setup` does)", pytrace=False)
    panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "nodeGraph")
    exprs = {t["refId"]: t["expr"].replace("$__range", "5m") for t in panel["targets"]}
    series = "traces_service_graph_request_total"
    # Per minute: user -> a 60 requests (1/s), a -> b 30 (0.5/s), a -> 127.0.0.1 6 (0.1/s).
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": f'{series}{{client="user", server="a", connection_type="virtual_node"}}',
             "values": "0+60x10"},
            {"series": f'{series}{{client="a", server="b", connection_type=""}}',
             "values": "0+30x10"},
            {"series": f'{series}{{client="a", server="127.0.0.1", connection_type="virtual_node"}}',
             "values": "0+6x10"},
        ],
        "promql_expr_test": [
            {"expr": exprs["nodes"], "eval_time": "10m", "exp_samples": [
                {"labels": '{id="a", title="a"}', "value": 1.0},
                {"labels": '{id="b", title="b"}', "value": 0.5},
                {"labels": '{id="127.0.0.1", title="127.0.0.1"}', "value": 0.1},
                {"labels": '{id="user", title="user"}', "value": 0.0},
            ]},
            {"expr": exprs["edges"], "eval_time": "10m", "exp_samples": [
                {"labels": '{client="user", server="a", source="user", target="a", id="user->a"}',
                 "value": 1.0},
                {"labels": '{client="a", server="b", source="a", target="b", id="a->b"}',
                 "value": 0.5},
                {"labels": '{client="a", server="127.0.0.1", source="a", target="127.0.0.1", '
                           'id="a->127.0.0.1"}', "value": 0.1},
            ]},
        ],
    }]}
    path = tmp_path / "service-map-test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"promtool test rules:\n{done.stdout}{done.stderr}"
