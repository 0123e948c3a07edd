"""`cargo xtask demo`, run the way a newcomer runs it, checked from what it prints.

The demo (examples/pipeline/demo.py) sends one traced question and then 80 more to the gateway,
so the request counts per service are known exactly: every 10th question (from the 4th) asks
about a page the site does not have, every 10th (from the 8th) asks the LLM for too many tokens.
After it exits nothing it started may be left: no cgroup, no process, no eBPF program of its agent.

The report's helpers (examples/pipeline/report.py) are also checked on hand-made inputs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import procs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "pipeline"))

import report  # noqa: E402  (examples/pipeline)

SERVICES = ["gateway", "orchestrator", "scraper", "processor", "search", "vectorstore"]
# 1 traced question + 80: 8 about the missing page, 8 asking for too many tokens.
EXPECTED_REQUESTS = {"gateway": 81, "orchestrator": 81, "scraper": 81, "processor": 73,
                     "search": 73, "vectorstore": 146}
EXPECTED_ERRORS = {"gateway": 16, "orchestrator": 16, "scraper": 8, "processor": 0, "search": 0,
                   "vectorstore": 0}
DEMO_TIMEOUT_S = 240


class DemoRun:
    def __init__(self, result: subprocess.CompletedProcess):
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr

    def section(self, title_start: str) -> str:
        """The text of the `== title ...` section of stdout, up to the next one."""
        parts = re.split(r"^== ", self.stdout, flags=re.M)
        for part in parts:
            if part.startswith(title_start):
                return part.split("\n", 1)[1]
        raise AssertionError(f"no section {title_start!r} in the demo's output:\n{self.stdout}")

    def table(self) -> dict[str, list[str]]:
        rows = {}
        for line in self.section("per service").splitlines():
            cells = line.split()
            if cells and cells[0] in SERVICES and len(cells) == len(report.TABLE_HEADER):
                rows[cells[0]] = cells
        return rows

    def describe(self) -> str:
        return f"--- demo stdout ---\n{self.stdout}\n--- demo stderr ---\n{self.stderr}"


@pytest.fixture(scope="module")
def demo(tapwire_bin, cgroup2_root) -> DemoRun:
    """`cargo xtask demo --tapwire $TAPWIRE_BIN`, once for the module (it runs about 30 s)."""
    result = subprocess.run(["cargo", "xtask", "demo", "--tapwire", tapwire_bin], cwd=ROOT,
                            env=procs.base_env(), stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=DEMO_TIMEOUT_S)
    return DemoRun(result)


def test_demo_succeeds_with_exact_counts_per_service(demo):
    assert demo.returncode == 0, demo.describe()
    table = demo.table()
    assert sorted(table) == sorted(SERVICES), demo.describe()
    for service, cells in table.items():
        _, requests, rate, errors, p50, p95, cpu, memory, queue = cells
        assert int(requests) == EXPECTED_REQUESTS[service], (service, cells)
        assert float(rate.removesuffix("/s")) > 0, (service, cells)
        expected_ratio = 100 * EXPECTED_ERRORS[service] / EXPECTED_REQUESTS[service]
        assert float(errors.removesuffix("%")) == pytest.approx(expected_ratio, abs=0.05), cells
        # p50 <= p95, both measured; CPU and memory from the service's cgroup, both non-zero.
        assert 0 < float(p50.removesuffix("ms")) <= float(p95.removesuffix("ms")), cells
        assert float(cpu.removesuffix("%")) > 0, cells
        assert float(memory.removesuffix("MiB")) > 1, cells
        assert int(queue) >= 0, cells
    assert "Every count is what the requests sent imply" in demo.stdout, demo.describe()


# (caller, callee, calls, failed) of tapwire's service graph: `user` is the demo's own client
# (its first, traced request has a parent, so it is not an edge from `user`), 127.0.0.1 the static
# site (called by the scraper) and the LLM stub (called by the orchestrator), not watched.
EXPECTED_GRAPH = sorted([
    ("user*", "gateway", 80, 16), ("gateway", "orchestrator", 81, 16),
    ("orchestrator", "scraper", 81, 8), ("scraper", "processor", 73, 0),
    ("processor", "vectorstore", 73, 0), ("scraper", "127.0.0.1*", 81, 8),
    ("orchestrator", "search", 73, 0), ("search", "vectorstore", 73, 0),
    ("orchestrator", "127.0.0.1*", 73, 8)])

GRAPH_LINE = re.compile(r"^(?P<prefix>[|` ]*)[|`]-> (?P<node>\S+)  \((?P<calls>\d+) calls"
                        r"(?:, (?P<failed>\d+) failed)?")


def parse_graph(text: str) -> list[tuple[str, str, int, int]]:
    """(caller, callee, calls, failed) of each arrow of `format_graph`'s drawing."""
    edges = []
    path: list[str] = []
    for line in text.splitlines():
        if line and not line[0] in "|` " and "->" not in line:
            path = [line.strip()]  # an entry node
            continue
        m = GRAPH_LINE.match(line)
        if not m:
            continue
        depth = len(m["prefix"]) // 4 + 1
        del path[depth:]
        edges.append((path[depth - 1], m["node"], int(m["calls"]), int(m["failed"] or 0)))
        path.append(m["node"])
    return sorted(edges)


def test_demo_prints_the_service_graph_and_the_endpoint(demo):
    graph = demo.section("service graph")
    assert parse_graph(graph) == EXPECTED_GRAPH, graph
    assert re.search(r"Prometheus endpoint: http://127\.0\.0\.1:\d+/metrics", demo.stdout)


def test_demo_leaves_nothing_behind(demo, tapwire_bin):
    out = demo.stdout + demo.stderr
    cgroup = re.search(r"created cgroup (\S+tapwire-demo-\d+) ", out)
    assert cgroup, demo.describe()
    assert not Path(cgroup.group(1)).exists(), f"{cgroup.group(1)} is still there"
    pids = [int(p) for p in re.findall(r"^\[demo\]\s+\S+\s+pid (\d+)", demo.stderr, flags=re.M)]
    agent = re.search(r"tapwire ready in [\d.]+ s: pid (\d+), (\d+) eBPF programs attached "
                      r"\(ids ([\d,]+)\)", demo.stderr)
    assert len(pids) == 9 and agent, demo.describe()
    alive = [p for p in pids if _running(p) and "tapwire-demo-" in _read(f"/proc/{p}/cgroup")]
    assert alive == [], f"processes of the demo still running: {alive}"
    agent_pid = int(agent.group(1))
    assert not (_running(agent_pid) and tapwire_bin in _read(f"/proc/{agent_pid}/cmdline")), \
        f"the demo's agent (pid {agent_pid}) is still running"
    ids = {int(i) for i in agent.group(3).split(",")}
    assert len(ids) == int(agent.group(2)) > 0
    still = {i: n for i, n in procs.loaded_programs().items() if i in ids}
    assert still == {}, f"the demo's agent left programs loaded: {still}"


def _running(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _read(path: str) -> str:
    """The file's text, empty when the process it belongs to is gone."""
    try:
        return Path(path).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


# ---- report.py on hand-made inputs ---------------------------------------------------------------

def test_histogram_quantile_interpolates_like_promql():
    buckets = {0.005: 0, 0.01: 10, 0.025: 30, 0.05: 40, float("inf"): 40}
    assert report.histogram_quantile(0.5, buckets) == pytest.approx(0.01 + 0.015 * 10 / 20)
    assert report.histogram_quantile(0.25, buckets) == pytest.approx(0.005 + 0.005 * 10 / 10)
    assert report.histogram_quantile(0.95, buckets) == pytest.approx(0.025 + 0.025 * 8 / 10)
    assert report.histogram_quantile(0.5, {0.1: 0, float("inf"): 0}) is None
    assert report.histogram_quantile(0.99, {0.1: 1, float("inf"): 10}) == 0.1


def test_parse_prometheus_labels_and_errors():
    samples = report.parse_prometheus(
        '# HELP x y\nhttp_server_request_duration_seconds_count{job="gateway",'
        'error_type="500",path="a\\"b\\\\c"} 7\nup 1 1700000000000\n')
    assert samples[0] == report.Sample("http_server_request_duration_seconds_count",
                                       {"job": "gateway", "error_type": "500", "path": 'a"b\\c'}, 7.0)
    assert samples[1].value == 1.0
    with pytest.raises(ValueError, match="line 1"):
        report.parse_prometheus("not a sample at all!")


def test_service_table_counts_what_changed_between_scrapes():
    def scrape(ok: int, failed: int, cpu: float) -> list:
        d = "http_server_request_duration_seconds"
        return report.parse_prometheus(f"""
{d}_count{{job="gw",http_route="/a"}} {ok}
{d}_count{{job="gw",http_route="/a",error_type="500"}} {failed}
{d}_bucket{{job="gw",http_route="/a",le="0.01"}} {ok}
{d}_bucket{{job="gw",http_route="/a",le="+Inf"}} {ok}
{d}_bucket{{job="gw",http_route="/a",error_type="500",le="0.01"}} 0
{d}_bucket{{job="gw",http_route="/a",error_type="500",le="+Inf"}} {failed}
container_cpu_time_seconds_total{{job="gw",cpu_mode="user"}} {cpu}
container_cpu_time_seconds_total{{job="gw",cpu_mode="system"}} {cpu}
process_memory_usage_bytes{{job="gw",instance="1"}} 1048576
process_memory_usage_bytes{{job="gw",instance="2"}} 1048576
""")
    during = [report.parse_prometheus('http_server_active_requests{job="gw"} 3\n'
                                      'tapwire_listen_backlog{job="gw",server_port="1"} 2\n'),
              report.parse_prometheus('http_server_active_requests{job="gw"} 4\n')]
    [row] = report.service_table(["gw"], scrape(10, 1, 1.0), scrape(30, 6, 1.5), during,
                                 traffic_s=5.0, window_s=10.0)
    assert (row.requests, row.errors, row.rate) == (25, 5, 5.0)
    assert row.cpu_s == pytest.approx(1.0) and row.cpu_share == pytest.approx(0.1)
    assert row.memory_bytes == 2 * 1048576 and row.queue_peak == 5
    # 20 of the 25 in (0, 10 ms], the 5 errors above: p50 at rank 12.5 -> 6.25 ms.
    assert row.p50_s == pytest.approx(0.00625) and row.p95_s == pytest.approx(0.01)
    line = report.format_table([row]).splitlines()[1].split()
    assert line == ["gw", "25", "5.0/s", "20.0%", "6.2ms", "10.0ms", "10.0%", "2.0MiB", "5"]


def span(service, kind, span_id, parent, start_ms, dur_ms, trace="t1", **attrs):
    return {"service_name": service, "kind_name": kind, "span_id": span_id,
            "parent_span_id": parent, "trace_id": trace, "start_ns": int(start_ms * 1e6),
            "duration_ns": int(dur_ms * 1e6), "status_name": "UNSET",
            "attributes": {"http.request.method": "GET", "http.response.status_code": 200,
                           **attrs}}


def test_trace_tree_follows_parents_across_services():
    spans = [
        span("gateway", "SERVER", "a", "x", 0, 10, **{"http.route": "/ask"}),
        span("gateway", "CLIENT", "b", "a", 1, 8, **{"server.port": 2, "url.path": "/answer"}),
        span("orchestrator", "SERVER", "c", "b", 2, 6, **{"http.route": "/answer"}),
        span("orchestrator", "CLIENT", "d", "c", 3, 2, **{"server.port": 9, "url.path": "/v1"}),
        span("search", "SERVER", "e", "", 0, 1, trace="t2"),
    ]
    text, rows = report.trace_tree(spans, "t1", {2: "orchestrator", 9: "llm-stub"},
                                   {"gateway", "orchestrator"})
    assert [(d, s["span_id"]) for d, s in rows] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    lines = [report.TREE_LINE.match(line) for line in text.splitlines()[2:]]
    assert all(lines), text
    assert [(len(m["prefix"]) // 3, m["service"], m["kind"]) for m in lines] == [
        (0, "gateway", "server"), (1, "gateway", "client"), (2, "orchestrator", "server"),
        (3, "orchestrator", "client")]
    assert "-> llm-stub/v1 (not watched)" in text and "-> orchestrator/answer 200" in text


def test_service_graph_from_metrics_is_drawn_from_the_entry():
    def scrape(n: int) -> list:
        g = "traces_service_graph_request"
        return report.parse_prometheus(f"""
{g}_total{{client="user",server="gw",connection_type="virtual_node",virtual_node="client"}} {n}
{g}_total{{client="gw",server="api"}} {2 * n}
{g}_failed_total{{client="gw",server="api"}} {n}
{g}_total{{client="api",server="10.0.0.1",connection_type="virtual_node",virtual_node="server"}} {n}
{g}_client_seconds_bucket{{client="gw",server="api",le="0.01"}} {2 * n}
{g}_client_seconds_bucket{{client="gw",server="api",le="+Inf"}} {2 * n}
{g}_server_seconds_bucket{{client="user",server="gw",le="0.1"}} 0
{g}_server_seconds_bucket{{client="user",server="gw",le="0.2"}} {n}
{g}_server_seconds_bucket{{client="user",server="gw",le="+Inf"}} {n}
{g}_total{{client="old",server="gone"}} 5
""")
    edges = report.service_graph(scrape(1), scrape(3))
    assert edges == {
        ("user", "gw"): report.Edge(2, 0, pytest.approx(0.15), "client"),
        ("gw", "api"): report.Edge(4, 2, pytest.approx(0.005), None),
        ("api", "10.0.0.1"): report.Edge(2, 0, None, "server")}
    text = report.format_graph(edges)
    assert text.splitlines() == [
        "user*", "`-> gw  (2 calls, median 150.0ms)", "    `-> api  (4 calls, 2 failed, median 5.0ms)",
        "        `-> 10.0.0.1*  (2 calls)"]
    assert parse_graph(text) == [("api", "10.0.0.1*", 2, 0), ("gw", "api", 4, 2),
                                 ("user*", "gw", 2, 0)]


# The trace of the first question, as the demo prints it: (service, kind, callee) -> children.
# Every CLIENT span's child is the SERVER span of the service it called; the site and the LLM
# stub are not watched, so their CLIENT spans are leaves.
EXPECTED_TRACE = (("gateway", "server", None), (
    (("gateway", "client", "orchestrator"), (
        (("orchestrator", "server", None), (
            (("orchestrator", "client", "scraper"), (
                (("scraper", "server", None), (
                    (("scraper", "client", "site"), ()),
                    (("scraper", "client", "processor"), (
                        (("processor", "server", None), (
                            (("processor", "client", "vectorstore"), (
                                (("vectorstore", "server", None), ()),)),)),)),)),)),
            (("orchestrator", "client", "search"), (
                (("search", "server", None), (
                    (("search", "client", "vectorstore"), (
                        (("vectorstore", "server", None), ()),)),)),)),
            (("orchestrator", "client", "llm-stub"), ()),)),)),))


def parse_tree(text: str) -> list[tuple]:
    """The printed trace as nested (node, children) tuples, checking on the way that every span
    lies within its parent's time (printed to 0.1 ms)."""
    roots: list[list] = []
    stack: list[tuple[int, list, float, float]] = []  # depth, [node, children], start, end
    for line in text.splitlines():
        m = report.TREE_LINE.match(line)
        if not m:
            continue
        depth = len(m["prefix"]) // 3
        start, end = float(m["start"]), float(m["start"]) + float(m["duration"])
        callee = re.match(r"\S+ -> ([a-z][a-z0-9-]*)", m["what"]) if m["kind"] == "client" else None
        entry = [(m["service"], m["kind"], callee.group(1) if callee else None), []]
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            assert stack[-1][0] == depth - 1, f"a line skips a level: {line!r}"
            _, parent, p_start, p_end = stack[-1]
            assert p_start - 0.1 <= start and end <= p_end + 0.2, \
                f"{line!r} is not within its parent ({p_start}..{p_end} ms)"
            parent[1].append(entry)
        else:
            assert depth == 0, f"the first line is not a root: {line!r}"
            roots.append(entry)
        stack.append((depth, entry, start, end))

    def freeze(entry) -> tuple:
        return (entry[0], tuple(freeze(kid) for kid in entry[1]))
    return [freeze(r) for r in roots]


def _sorted(tree: tuple) -> tuple:
    node, kids = tree
    return (node, tuple(sorted((_sorted(k) for k in kids), key=repr)))


def test_demo_trace_spans_all_six_services_nested(demo):
    """Needs the trace context carried from service to service (kernel-side traceparent
    injection): without it each service's spans start a trace of their own."""
    assert demo.returncode == 0, demo.describe()
    text = demo.section("one request through the pipeline")
    header = re.search(r"(\d+) spans? from (\d+) services? \(([^)]*)\)", text)
    assert header, text
    assert set(header.group(3).split(", ")) == set(SERVICES), text
    trees = parse_tree(text)
    assert len(trees) == 1, f"expected one root span, got {len(trees)}:\n{text}"
    assert _sorted(trees[0]) == _sorted(EXPECTED_TRACE), text
    assert int(header.group(1)) == 15, text  # 7 server spans (vectorstore twice), 8 client


def test_parse_tree_reads_what_trace_tree_prints():
    """The check above, on a made-up trace of the expected shape, and on one that breaks it."""
    ports = {1: "orchestrator", 2: "scraper", 3: "site", 4: "processor", 5: "vectorstore",
             6: "search", 7: "llm-stub"}
    spans, serial = [], iter(range(1, 100))

    def add(tree: tuple, parent: str, start: float, end: float) -> None:
        (service, kind, target), kids = tree
        span_id = f"s{next(serial)}"
        port = {v: k for k, v in ports.items()}.get(target, 0)
        spans.append(span(service, kind.upper(), span_id, parent, start, end - start,
                          **{"server.port": port, "url.path": "/x"}))
        step = (end - start) / (2 * len(kids) + 1) if kids else 0
        for i, kid in enumerate(kids):
            add(kid, span_id, start + step * (2 * i + 1), start + step * (2 * i + 2))

    add(EXPECTED_TRACE, "", 0.0, 300.0)
    text, _ = report.trace_tree(spans, "t1", ports, set(SERVICES))
    assert [_sorted(t) for t in parse_tree(text)] == [_sorted(EXPECTED_TRACE)], text
    assert re.search(r"15 spans from 6 services", text), text
    # A child that ends after its parent is caught.
    spans[-1]["duration_ns"] += int(400e6)
    text, _ = report.trace_tree(spans, "t1", ports, set(SERVICES))
    with pytest.raises(AssertionError, match="not within its parent"):
        parse_tree(text)
