"""Foundation end to end: HTTP/1 SERVER spans from a real uvicorn service, captured by tapwire in
the kernel and exported over OTLP (gRPC and HTTP/protobuf) to an independent receiver.

Every test here needs root, a real kernel and $TAPWIRE_BIN; none is ever skipped.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import subprocess
import time

import pytest

import cgroupfs
import procs
from http_clients import Exchange, RequestsClient, TraceParent, curl_get

PROTOCOLS = ["grpc", "http/protobuf"]
PROTOCOL_IDS = ["grpc", "http-protobuf"]
SERVICE_NAME = "catalog-api"

# Span timing tolerance. The kernel timestamps (first request byte read, last response byte
# written) lie strictly inside the client's window (request written ... response read) and
# outside the handler's window (its sleep), so no slack is needed beyond clock granularity:
# 1 ms covers curl's microsecond time_total rounding and the agent's clock conversions.
TIMING_TOLERANCE_NS = 1_000_000
# Span start/end are unix-epoch nanoseconds; they must fall inside the client's wall-clock window
# give or take this much. Generous on purpose: it catches boot-time-vs-epoch mix-ups and broken
# clock offsets without depending on how precisely the agent maps kernel time to wall time.
WALL_CLOCK_TOLERANCE_NS = 100_000_000

SPANS_TIMEOUT_S = 30  # all spans of a run must arrive within this (export delay is 200 ms)
SETTLE_S = 1.5  # after the expected count arrived, wait this long to see that no extra arrives

HOOKS = ["sys_enter_read", "sys_exit_read", "sys_enter_write", "sys_exit_write",
         "sys_enter_recvfrom", "sys_enter_sendto", "sock_send_length", "sock_recv_length",
         "inet_sock_set_state"]


# ---- the request plan ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Planned:
    index: int
    client: str  # "curl" or "requests"
    path_and_query: str
    with_traceparent: bool


FAIL_AT = {7, 24, 41}  # 3 requests answered 500
HELLO_AT = {3, 18, 33, 48}
TRACEPARENT_AT = {2, 11, 24, 33, 45}  # includes a /fail (24) and a /hello (33)
REQUEST_COUNT = 50


def plan_requests() -> list[Planned]:
    """50 requests: curl on even, requests on odd indexes (25 each); known delays of 5..30 ms."""
    plan = []
    for i in range(REQUEST_COUNT):
        delay_ms = 5 + (i * 7) % 26
        if i in FAIL_AT:
            target = f"/fail?delay_ms={delay_ms}"
        elif i in HELLO_AT:
            target = "/hello"
        else:
            target = f"/items/{1000 + i}?delay_ms={delay_ms}"  # unique path per request
        plan.append(Planned(i, "curl" if i % 2 == 0 else "requests", target,
                            i in TRACEPARENT_AT))
    assert sum(p.client == "curl" for p in plan) == 25
    assert sum(p.path_and_query.startswith("/fail") for p in plan) == 3
    assert sum(p.with_traceparent for p in plan) == 5
    return plan


def send(planned: Planned, base_url: str, client: RequestsClient, tag: str) -> Exchange:
    traceparent = TraceParent.random() if planned.with_traceparent else None
    user_agent = f"tapwire-e2e-{tag}-{planned.client}/{planned.index}"
    url = base_url + planned.path_and_query
    if planned.client == "curl":
        return curl_get(url, user_agent, traceparent)
    return client.get(url, user_agent, traceparent)


def run_plan(plan: list[Planned], service: procs.ServiceProcess,
             outside: procs.ServiceProcess | None = None) -> tuple[list[Exchange], list[Exchange]]:
    """Sends the plan one request at a time; every 5th, also one to the `outside` service."""
    client = RequestsClient()
    exchanges, outside_exchanges = [], []
    try:
        for planned in plan:
            exchanges.append(send(planned, service.base_url, client, "in"))
            if outside is not None and planned.index % 5 == 4:
                other = Planned(planned.index, planned.client,
                                f"/items/{9000 + planned.index}?delay_ms=1", False)
                outside_exchanges.append(send(other, outside.base_url, client, "outside"))
    finally:
        client.close()
    for exchange in exchanges + outside_exchanges:
        expected = 500 if exchange.path == "/fail" else 200
        assert exchange.status == expected, f"the service itself misbehaved: {exchange.describe()}"
    return exchanges, outside_exchanges


# ---- checking spans against exchanges ----------------------------------------------------------

def is_int(value) -> bool:
    return type(value) is int  # bool is an int subclass; OTLP int_value must not be a bool


def match_spans(spans: list[dict], exchanges: list[Exchange]) -> tuple[list, list[str]]:
    """Pairs spans with exchanges by url.path; paths that repeat (/fail, /hello) pair in order,
    since requests were sent one after another. Returns (pairs, problems)."""
    problems = []
    by_path: dict[str, list[dict]] = {}
    for span in spans:
        by_path.setdefault(span["attributes"].get("url.path"), []).append(span)
    wanted: dict[str, list[Exchange]] = {}
    for exchange in exchanges:
        wanted.setdefault(exchange.path, []).append(exchange)
    pairs = []
    for path, path_exchanges in wanted.items():
        path_spans = sorted(by_path.pop(path, []), key=lambda s: s["start_ns"])
        if len(path_spans) != len(path_exchanges):
            problems.append(f"url.path {path!r}: {len(path_spans)} spans for "
                            f"{len(path_exchanges)} requests")
            continue
        pairs.extend(zip(path_exchanges, path_spans))
    for path, extra in by_path.items():
        problems.append(f"{len(extra)} spans with unexpected url.path {path!r}")
    return pairs, problems


def check_span(exchange: Exchange, span: dict, service: procs.ServiceProcess) -> list[str]:
    """Everything the contract says about one SERVER span, as a list of readable problems."""
    attrs = span["attributes"]
    expected_attrs = {
        "http.request.method": "GET",
        "url.path": exchange.path,
        "url.scheme": "http",
        "http.response.status_code": exchange.status,
        "server.port": service.port,
        "client.address": "127.0.0.1",
        "network.peer.address": "127.0.0.1",
        "network.peer.port": exchange.local_port,
        "network.protocol.version": "1.1",
        "user_agent.original": exchange.user_agent,
    }
    problems = []
    if span["kind_name"] != "SERVER":
        problems.append(f"kind {span['kind_name']}, expected SERVER")
    # Identifier-like path segments are templated, so /items/1042 has the route /items/{id}.
    route = re.sub(r"^/items/\d+$", "/items/{id}", exchange.path)
    if span["name"] != f"GET {route}":
        problems.append(f"name {span['name']!r}, expected 'GET {route}'")
    if attrs.get("http.route") != route:
        problems.append(f"http.route={attrs.get('http.route')!r}, expected {route!r}")
    for key, value in expected_attrs.items():
        if attrs.get(key) != value:
            problems.append(f"{key}={attrs.get(key)!r}, expected {value!r}")
    for key in ("http.response.status_code", "server.port", "network.peer.port"):
        if key in attrs and not is_int(attrs[key]):
            problems.append(f"{key} must be an int attribute, got {type(attrs[key]).__name__}")
    if exchange.status >= 500:
        if span["status_name"] != "ERROR":
            problems.append(f"status {span['status_name']}, expected ERROR for {exchange.status}")
        if attrs.get("error.type") != str(exchange.status):
            problems.append(f"error.type={attrs.get('error.type')!r}, "
                            f"expected {str(exchange.status)!r}")
    else:
        if span["status_name"] != "UNSET":
            problems.append(f"status {span['status_name']}, expected UNSET")
        if "error.type" in attrs:
            problems.append(f"error.type={attrs['error.type']!r} on a {exchange.status}")

    if not re.fullmatch(r"[0-9a-f]{32}", span["trace_id"]) or int(span["trace_id"], 16) == 0:
        problems.append(f"invalid trace id {span['trace_id']!r}")
    if not re.fullmatch(r"[0-9a-f]{16}", span["span_id"]) or int(span["span_id"], 16) == 0:
        problems.append(f"invalid span id {span['span_id']!r}")
    if exchange.traceparent is not None:
        if span["trace_id"] != exchange.traceparent.trace_id:
            problems.append(f"trace id {span['trace_id']}, expected the traceparent's "
                            f"{exchange.traceparent.trace_id}")
        if span["parent_span_id"] != exchange.traceparent.parent_id:
            problems.append(f"parent span id {span['parent_span_id'] or '(none)'}, expected the "
                            f"traceparent's {exchange.traceparent.parent_id}")
    elif span["parent_span_id"] != "":
        problems.append(f"parent span id {span['parent_span_id']} on a request without "
                        f"traceparent, expected none (a root span)")

    duration = span["duration_ns"]
    floor = max(exchange.delay_ms * 1_000_000, exchange.handler_ns)
    if duration < floor - TIMING_TOLERANCE_NS:
        problems.append(f"duration {duration / 1e6:.3f} ms < handler time {floor / 1e6:.3f} ms")
    if duration > exchange.client_ns + TIMING_TOLERANCE_NS:
        problems.append(f"duration {duration / 1e6:.3f} ms > client-measured "
                        f"{exchange.client_ns / 1e6:.3f} ms")
    if not (exchange.wall_start_ns - WALL_CLOCK_TOLERANCE_NS <= span["start_ns"]
            <= span["end_ns"] <= exchange.wall_end_ns + WALL_CLOCK_TOLERANCE_NS):
        problems.append(f"start/end {span['start_ns']}/{span['end_ns']} outside the client's "
                        f"wall-clock window {exchange.wall_start_ns}..{exchange.wall_end_ns}")
    return problems


def check_resource(span: dict, service: procs.ServiceProcess, service_name: str) -> list[str]:
    resource = span["resource"]
    expected = {
        # Current semconv: "On Linux based systems, this SHOULD be set to the base name of the
        # target of /proc/[pid]/exe" (here python3.11, not the comm "python").
        "service.name": service_name,
        "process.pid": service.pid,
        "process.executable.name": procs.exe_name(service.pid),
        "host.name": socket.gethostname(),
        "telemetry.sdk.name": "tapwire",
    }
    problems = [f"resource {key}={resource.get(key)!r}, expected {value!r}"
                for key, value in expected.items() if resource.get(key) != value]
    instance = resource.get("service.instance.id")
    if not isinstance(instance, str) or not instance:
        problems.append(f"resource service.instance.id={instance!r}, expected a non-empty string")
    return problems


def check_run(receiver, agent, spans: list[dict], exchanges: list[Exchange],
              service: procs.ServiceProcess, service_name: str) -> None:
    """Asserts the whole run: counts, per-span contents, ids, resources; one readable failure."""
    problems = []
    if len(spans) != len(exchanges):
        problems.append(f"{len(spans)} spans for {len(exchanges)} requests")
    server_spans = [s for s in spans if s["kind_name"] == "SERVER"]
    if len(server_spans) != len(exchanges):
        problems.append(f"{len(server_spans)} SERVER spans, expected {len(exchanges)}")
    errors = [s for s in spans if s["status_name"] == "ERROR"]
    expected_errors = sum(e.status >= 500 for e in exchanges)
    if len(errors) != expected_errors:
        problems.append(f"{len(errors)} spans with status ERROR, expected {expected_errors}")

    pairs, match_problems = match_spans(spans, exchanges)
    problems += match_problems
    for exchange, span in pairs:
        problems += [f"{exchange.describe()}: {p}" for p in check_span(exchange, span, service)]
        problems += [f"{exchange.describe()}: {p}"
                     for p in check_resource(span, service, service_name)]

    span_ids = [s["span_id"] for s in spans]
    if len(set(span_ids)) != len(span_ids):
        problems.append("span ids are not unique")
    root_traces = [s["trace_id"] for e, s in pairs if e.traceparent is None]
    if len(set(root_traces)) != len(root_traces):
        problems.append("requests without traceparent share trace ids: each must start a trace")

    # One ResourceSpans per service in each export request.
    for index, request in enumerate(receiver.trace_requests()):
        names = [rs_name(rs) for rs in request.message.resource_spans]
        if len(names) != len(set(names)):
            problems.append(f"export request {index} ({request.transport}) carries several "
                            f"ResourceSpans for one service: {names}")

    assert not problems, receiver.describe(
        f"{len(problems)} problems:\n  " + "\n  ".join(problems[:80]), agent.diagnostics)


def rs_name(resource_spans) -> str:
    for kv in resource_spans.resource.attributes:
        if kv.key == "service.name":
            return kv.value.string_value
    return "(no service.name)"


# ---- tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("naming", ["env", "cgroup"],
                         ids=["svcname-from-env+abs-path", "svcname-from-cgroup+rel-path"])
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_http_server_spans(protocol, naming, cgroup, fastapi_service, tapwire, otlp_receiver,
                           cgroup2_root):
    """50 real requests (curl + requests; 3 fail, 5 with traceparent) -> exactly 50 right spans,
    while a second service outside every selected cgroup gets traffic that yields no span."""
    cg = cgroup("foundation")
    if naming == "env":
        service = fastapi_service(cg, env={"OTEL_SERVICE_NAME": SERVICE_NAME}, label="catalog")
        expected_name, cgroup_arg = SERVICE_NAME, str(cg)
    else:
        service = fastapi_service(cg, label="catalog")
        # The cgroup directory's name; tapwire gets the path relative to the cgroup2 mount.
        expected_name, cgroup_arg = cg.name, str(cg.relative_to(cgroup2_root))
    outside = fastapi_service(None, label="outside")  # in the test's own cgroup: not selected
    assert cgroupfs.cgroup_of(outside.pid) != cgroupfs.cgroup_of(service.pid)

    agent = tapwire([cgroup_arg], env=otlp_receiver.exporter_env(protocol))
    exchanges, outside_exchanges = run_plan(plan_requests(), service, outside)
    assert len(outside_exchanges) == 10

    spans = otlp_receiver.wait_for_spans(REQUEST_COUNT, SPANS_TIMEOUT_S, settle=SETTLE_S,
                                         diagnostics=agent.diagnostics)
    from_outside = [s for s in spans if s["resource"].get("process.pid") == outside.pid
                    or s["attributes"].get("server.port") == outside.port]
    assert not from_outside, otlp_receiver.describe(
        f"{len(from_outside)} spans from the service outside the selected cgroup",
        agent.diagnostics)
    assert otlp_receiver.errors == [], otlp_receiver.describe("the receiver rejected requests",
                                                              agent.diagnostics)
    assert {r.transport for r in otlp_receiver.trace_requests()} == \
        {"grpc" if protocol == "grpc" else "http"}
    check_run(otlp_receiver, agent, spans, exchanges, service, expected_name)


def test_check_names_every_hook(tapwire_bin):
    """`tapwire check` exits 0 and reports each needed hook, and the environment, as ok."""
    try:
        done = subprocess.run([tapwire_bin, "check"], capture_output=True, text=True, timeout=60,
                              env=procs.base_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as hung:
        so_far = b"".join(x if isinstance(x, bytes) else x.encode()
                          for x in (hung.stdout, hung.stderr) if x)
        pytest.fail(f"`tapwire check` did not finish within 60 s\n--- its output so far ---\n"
                    f"{so_far.decode(errors='replace')}", pytrace=False)
    output = done.stdout + done.stderr
    report = f"--- tapwire check (exit {done.returncode}) ---\n{output}"
    assert done.returncode == 0, report
    lines = output.splitlines()
    problems = []
    for hook in HOOKS:
        pattern = re.compile(rf"(?<![A-Za-z0-9_]){hook}(?![A-Za-z0-9_])")
        named = [line for line in lines if pattern.search(line)]
        if not named:
            problems.append(f"no line names {hook}")
        elif not any(re.search(r"\bok\b", l, re.I) and not re.search(r"\bfail", l, re.I)
                     for l in named):
            problems.append(f"{hook} is not reported ok: {named}")
    for topic in ("kernel", "btf", "tracefs", "cgroup2"):
        if not any(topic in line.lower() for line in lines):
            problems.append(f"no line about {topic}")
    assert not problems, "\n".join(problems) + "\n" + report


def test_console_exporter_by_default(cgroup, fastapi_service, tapwire):
    """Without any OTLP endpoint, tapwire prints one line per span to stdout."""
    cg = cgroup("console")
    service = fastapi_service(cg, label="console")
    agent = tapwire([str(cg)])  # no OTEL_* at all: procs.base_env scrubs them
    client = RequestsClient()
    try:
        exchanges = [curl_get(f"{service.base_url}/items/1?delay_ms=5", "tapwire-e2e-console/0"),
                     client.get(f"{service.base_url}/items/2?delay_ms=5", "tapwire-e2e-console/1"),
                     curl_get(f"{service.base_url}/hello", "tapwire-e2e-console/2")]
    finally:
        client.close()
    assert [e.status for e in exchanges] == [200, 200, 200]

    def server_lines() -> list[str]:
        return [line for line in agent.stdout().splitlines() if line.startswith("SERVER")]

    deadline = time.monotonic() + 10
    while len(server_lines()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    code = agent.stop()
    stdout = agent.stdout()
    assert code == 0, f"tapwire exited with {code} after SIGTERM\n{agent.diagnostics()}"
    lines = stdout.splitlines()
    server = [line for line in lines if line.startswith("SERVER")]
    assert len(server) == 3, f"{len(server)} SERVER lines, expected 3\n{agent.diagnostics()}"
    assert all("GET" in line for line in server), f"SERVER lines without GET:\n{stdout}"
    assert not [line for line in lines if line.startswith("CLIENT")], \
        f"CLIENT lines, expected none (the clients are outside the cgroup):\n{stdout}"


def test_configured_routes_win_over_the_heuristic(cgroup, fastapi_service, tapwire, otlp_receiver):
    """TAPWIRE_ROUTES (same as --route) names routes; paths no pattern matches fall back to the
    identifier heuristic."""
    cg = cgroup("routes")
    service = fastapi_service(cg, label="routes")
    env = otlp_receiver.exporter_env("http/protobuf")
    env["TAPWIRE_ROUTES"] = "/items/{item_id},/static/*"
    tapwire([str(cg)], env=env)
    exchanges = [curl_get(f"{service.base_url}/items/7?delay_ms=1", "tapwire-e2e-routes/0"),
                 curl_get(f"{service.base_url}/hello", "tapwire-e2e-routes/1")]
    assert [e.status for e in exchanges] == [200, 200]
    spans = otlp_receiver.wait_for_spans(2, 20)
    got = sorted((s["name"], s["attributes"].get("http.route")) for s in spans)
    assert got == [("GET /hello", "/hello"), ("GET /items/{item_id}", "/items/{item_id}")], got


def test_bad_route_pattern_is_a_clear_error(tapwire_bin, cgroup):
    result = subprocess.run([tapwire_bin, "run", "--cgroup", str(cgroup("badroute")), "--route", "users/{id}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "users/{id}" in result.stderr and "must start with '/'" in result.stderr, result.stderr


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_sigterm_flushes_pending_spans(protocol, cgroup, fastapi_service, tapwire,
                                       otlp_receiver):
    """Spans of requests answered just before SIGTERM are exported before tapwire exits 0.

    The export schedule delay is 60 s, so only the shutdown flush can deliver them."""
    cg = cgroup("flush")
    service = fastapi_service(cg, label="flush")
    env = otlp_receiver.exporter_env(protocol, schedule_delay_ms=60_000)
    agent = tapwire([str(cg)], env=env)
    plan = [Planned(i, "curl" if i % 2 == 0 else "requests",
                    f"/items/{2000 + i}?delay_ms=5", False) for i in range(5)]
    exchanges, _ = run_plan(plan, service)

    code = agent.stop()  # right after the last response: no sleep
    assert code == 0, f"tapwire exited with {code} after SIGTERM\n{agent.diagnostics()}"
    # Delivered means acknowledged by the receiver before tapwire exited; the short bound only
    # absorbs the receiver thread's bookkeeping.
    spans = otlp_receiver.wait_for_spans(len(plan), 2, diagnostics=agent.diagnostics)
    assert len(spans) == len(plan), otlp_receiver.describe(
        f"{len(spans)} spans, expected {len(plan)}", agent.diagnostics)
    pairs, problems = match_spans(spans, exchanges)
    for exchange, span in pairs:
        problems += [f"{exchange.describe()}: {p}" for p in check_span(exchange, span, service)]
    assert not problems, otlp_receiver.describe("\n".join(problems), agent.diagnostics)
