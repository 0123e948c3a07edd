"""What the demo prints, from what tapwire exported: pure functions over spans and scrapes.

- `parse_prometheus(text)`: the samples of a text-format 0.0.4 scrape;
- `service_table(...)`: per service, requests, rate, error rate, p50/p95 (from the duration
  histogram, interpolated within a bucket as PromQL's histogram_quantile does), CPU, memory and
  the peak queue seen while the traffic ran;
- `trace_tree(spans, trace_id, ...)`: one trace as an indented tree that follows parent span ids
  across services;
- `service_graph(before, after)`: who calls whom, how often, how often it fails, from tapwire's
  `traces_service_graph_*` metrics (client and server spans paired by their TCP connection).

Nothing here does I/O, so tests/e2e/test_demo.py checks it on hand-made inputs too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any, Iterable

# ---- Prometheus text format ------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+-?\d+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Every sample of a text-format scrape; raises ValueError naming the first bad line."""
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            raise ValueError(f"line {number} is not a Prometheus sample: {line!r}")
        name, raw_labels, value, _ = match.groups()
        labels = {}
        if raw_labels:
            body = raw_labels[1:-1]
            pos = 0
            while pos < len(body):
                label = _LABEL.match(body, pos)
                if not label or label.end() == pos:
                    raise ValueError(f"line {number}: bad labels {raw_labels!r}")
                labels[label.group(1)] = re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)],
                                                label.group(2))
                pos = label.end()
        samples.append(Sample(name, labels, float(value)))
    return samples


def by_job(samples: Iterable[Sample], name: str, **match: str) -> dict[str, float]:
    """Sum of `name`'s samples per `job` label, over the samples whose labels contain `match`."""
    sums: dict[str, float] = defaultdict(float)
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
            sums[s.labels.get("job", "")] += s.value
    return dict(sums)


def bucket_counts(samples: Iterable[Sample], name: str) -> dict[str, dict[float, float]]:
    """job -> upper bound -> cumulative count, summed over every other label of `name`_bucket."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        if s.name == f"{name}_bucket":
            buckets[s.labels.get("job", "")][float(s.labels["le"])] += s.value
    return {job: dict(b) for job, b in buckets.items()}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly within its bucket like
    PromQL's histogram_quantile (the lowest bucket starts at 0; in +Inf, the last finite bound)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


# ---- the per-service table -------------------------------------------------------------------

DURATION = "http_server_request_duration_seconds"


@dataclasses.dataclass
class ServiceRow:
    service: str
    requests: int
    rate: float  # requests per second over the traffic's wall time
    errors: int
    p50_s: float | None
    p95_s: float | None
    cpu_s: float  # CPU time used by the service's cgroup while the traffic ran
    cpu_share: float  # cpu_s / the window between the two scrapes (1.0 = one core)
    memory_bytes: float  # of the service's cgroup (else its processes' RSS), at the end
    queue_peak: float  # largest in-flight requests + accept backlog seen while the traffic ran

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def _delta(after: dict[str, float], before: dict[str, float], job: str) -> float:
    return after.get(job, 0.0) - before.get(job, 0.0)


def service_table(services: list[str], before: list[Sample], after: list[Sample],
                  during: list[list[Sample]], traffic_s: float, window_s: float) -> list[ServiceRow]:
    """One row per service (in the order given): what changed between the `before` and `after`
    scrapes, and the largest queue among the scrapes `during` the traffic."""
    count_b, count_a = by_job(before, f"{DURATION}_count"), by_job(after, f"{DURATION}_count")
    errors_a = _error_counts(after)
    errors_b = _error_counts(before)
    hist_b, hist_a = bucket_counts(before, DURATION), bucket_counts(after, DURATION)
    cpu_b = by_job(before, "container_cpu_time_seconds_total")
    cpu_a = by_job(after, "container_cpu_time_seconds_total")
    # The cgroup's own figure where the memory controller sees it (cgroup v2, or a matching v1
    # group), else the resident memory of its processes.
    memory = {**by_job(after, "process_memory_usage_bytes"),
              **by_job(after, "container_memory_usage_bytes")}
    peaks: dict[str, float] = defaultdict(float)
    for scrape in during:
        active = by_job(scrape, "http_server_active_requests")
        backlog = by_job(scrape, "tapwire_listen_backlog")
        for job in set(active) | set(backlog):
            peaks[job] = max(peaks[job], active.get(job, 0.0) + backlog.get(job, 0.0))
    rows = []
    for job in services:
        requests = round(_delta(count_a, count_b, job))
        delta_buckets = {le: n - hist_b.get(job, {}).get(le, 0.0)
                         for le, n in hist_a.get(job, {}).items()}
        cpu = _delta(cpu_a, cpu_b, job)
        rows.append(ServiceRow(
            service=job, requests=requests,
            rate=requests / traffic_s if traffic_s > 0 else 0.0,
            errors=round(_delta(errors_a, errors_b, job)),
            p50_s=histogram_quantile(0.50, delta_buckets),
            p95_s=histogram_quantile(0.95, delta_buckets),
            cpu_s=cpu, cpu_share=cpu / window_s if window_s > 0 else 0.0,
            memory_bytes=memory.get(job, 0.0), queue_peak=peaks.get(job, 0.0)))
    return rows


def _error_counts(samples: Iterable[Sample]) -> dict[str, float]:
    """Requests answered with an error (the histogram's series carrying `error_type`) per job."""
    sums: dict[str, float] = defaultdict(float)
    for s in samples:
        if s.name == f"{DURATION}_count" and s.labels.get("error_type"):
            sums[s.labels.get("job", "")] += s.value
    return dict(sums)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}MiB"


TABLE_HEADER = ("service", "requests", "rate", "errors", "p50", "p95", "cpu", "memory", "queue")


def format_table(rows: list[ServiceRow]) -> str:
    """A fixed-width table; every row is `service requests rate/s error% p50 p95 cpu% mem queue`
    with no spaces inside a cell, so it is also easy to parse."""
    cells = [TABLE_HEADER]
    for r in rows:
        cells.append((r.service, str(r.requests), f"{r.rate:.1f}/s",
                      f"{100 * r.error_ratio:.1f}%", _ms(r.p50_s), _ms(r.p95_s),
                      f"{100 * r.cpu_share:.1f}%", _mib(r.memory_bytes), f"{r.queue_peak:.0f}"))
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_HEADER))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join([first, *rest]))
    return "\n".join(lines)


# ---- spans: the trace tree and the service graph ---------------------------------------------

def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _attr(span: dict[str, Any], key: str, default: Any = None) -> Any:
    return span["attributes"].get(key, default)


def callee(span: dict[str, Any], children: list[dict[str, Any]], ports: dict[int, str]) -> str:
    """Who a CLIENT span called: the service of a SERVER span below it, else the service known to
    listen on the port it called, else `host:port`."""
    for child in children:
        if child["kind_name"] == "SERVER":
            return child["service_name"]
    port = _attr(span, "server.port")
    return ports.get(port, f"{_attr(span, 'server.address', '?')}:{port}")


def _children_index(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    children: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        if span["parent_span_id"]:
            children[span["parent_span_id"]].append(span)
    for kids in children.values():
        kids.sort(key=lambda s: (s["start_ns"], s["kind_name"] != "CLIENT"))
    return children


def _describe(span: dict[str, Any], children: list[dict[str, Any]], ports: dict[int, str],
              watched: set[str]) -> str:
    status = _attr(span, "http.response.status_code", "?")
    error = " ERROR" if span["status_name"] == "ERROR" else ""
    if span["kind_name"] == "CLIENT":
        target = callee(span, children, ports)
        note = "" if target in watched else " (not watched)"
        what = f"{_attr(span, 'http.request.method', '?')} -> {target}{_attr(span, 'url.path', '')}{note}"
    else:
        what = f"{_attr(span, 'http.request.method', '?')} {_attr(span, 'http.route') or _attr(span, 'url.path', '')}"
    return f"{span['kind_name'].lower()} {what} {status}{error}"


TREE_LINE = re.compile(r"^\s*(?P<start>[\d.]+)ms\s+(?P<duration>[\d.]+)ms  (?P<prefix>[|` -]*?)"
                       r"(?P<service>[a-z0-9][a-z0-9.-]*): (?P<kind>server|client) (?P<what>.*)$")
"""A line of `trace_tree`'s text: depth = len(prefix) // 3."""


def trace_tree(spans: list[dict[str, Any]], trace_id: str, ports: dict[int, str],
               watched: set[str]) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The spans of `trace_id` as an indented tree, following parent span ids whatever service a
    span belongs to. Returns the text and the (depth, span) rows in print order.

    A span whose parent is not among the trace's spans (its caller is not watched) is a root.
    Each line (TREE_LINE): start offset from the trace's first span, duration, then the tree
    drawing, `service: kind`, method, route or callee and path, status.
    """
    mine = [s for s in spans if s["trace_id"] == trace_id]
    if not mine:
        return f"trace {trace_id}: no spans", []
    ids = {s["span_id"] for s in mine}
    children = _children_index(mine)
    roots = sorted((s for s in mine if s["parent_span_id"] not in ids), key=lambda s: s["start_ns"])
    t0 = min(s["start_ns"] for s in mine)
    rows: list[tuple[int, dict[str, Any]]] = []
    lines: list[str] = []

    def walk(span: dict[str, Any], prefix: str, last: bool, depth: int) -> None:
        kids = children.get(span["span_id"], [])
        branch = "" if depth == 0 else ("`- " if last else "|- ")
        lines.append(f"{(span['start_ns'] - t0) / 1e6:8.1f}ms {span['duration_ns'] / 1e6:8.1f}ms  "
                     f"{prefix}{branch}{span['service_name'] or '?'}: "
                     f"{_describe(span, kids, ports, watched)}")
        rows.append((depth, span))
        deeper = prefix if depth == 0 else prefix + ("   " if last else "|  ")
        for i, kid in enumerate(kids):
            walk(kid, deeper, i == len(kids) - 1, depth + 1)

    for root in roots:
        walk(root, "", True, 0)
    services = sorted({s["service_name"] for s in mine})
    head = (f"{_plural(len(mine), 'span')} from {_plural(len(services), 'service')} "
            f"({', '.join(services)})\n"
            f"   start  duration  service: span")
    return head + "\n" + "\n".join(lines), rows


# ---- the service graph, from tapwire's servicegraph metrics ------------------------------------

GRAPH = "traces_service_graph_request"


@dataclasses.dataclass
class Edge:
    calls: int
    errors: int
    median_s: float | None  # seen by the client (by the server when the client is not watched)
    virtual: str | None  # which end tapwire does not watch: "client", "server" or None


def _edge_sums(samples: Iterable[Sample], name: str) -> dict[tuple[str, str], float]:
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for s in samples:
        if s.name == name:
            sums[(s.labels.get("client", ""), s.labels.get("server", ""))] += s.value
    return sums


def _edge_buckets(samples: Iterable[Sample], name: str) -> dict[tuple[str, str], dict[float, float]]:
    buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        if s.name == f"{name}_bucket":
            key = (s.labels.get("client", ""), s.labels.get("server", ""))
            buckets[key][float(s.labels["le"])] += s.value
    return buckets


def service_graph(before: list[Sample], after: list[Sample]) -> dict[tuple[str, str], Edge]:
    """(client, server) -> the calls, failures and median duration that tapwire's
    `traces_service_graph_*` metrics counted between the two scrapes."""
    calls_b, calls_a = _edge_sums(before, f"{GRAPH}_total"), _edge_sums(after, f"{GRAPH}_total")
    fail_b = _edge_sums(before, f"{GRAPH}_failed_total")
    fail_a = _edge_sums(after, f"{GRAPH}_failed_total")
    virtual = {(s.labels.get("client", ""), s.labels.get("server", "")): s.labels["virtual_node"]
               for s in after if s.name == f"{GRAPH}_total" and s.labels.get("virtual_node")}
    edges = {}
    for key, total in calls_a.items():
        calls = round(total - calls_b.get(key, 0.0))
        if calls <= 0:
            continue
        median = None
        for side in ("client", "server"):
            b = _edge_buckets(before, f"{GRAPH}_{side}_seconds").get(key, {})
            a = _edge_buckets(after, f"{GRAPH}_{side}_seconds").get(key, {})
            median = histogram_quantile(0.5, {le: n - b.get(le, 0.0) for le, n in a.items()})
            if median is not None:
                break
        edges[key] = Edge(calls, round(fail_a.get(key, 0.0) - fail_b.get(key, 0.0)), median,
                          virtual.get(key))
    return edges


def format_graph(edges: dict[tuple[str, str], Edge]) -> str:
    """The graph drawn as a tree from the nodes nobody calls (a node reached twice is drawn under
    each caller), each arrow with its calls, failures and median duration; nodes tapwire does
    not watch are marked with `*`."""
    out: dict[str, list[str]] = defaultdict(list)
    unwatched = set()
    for (client, server), edge in edges.items():
        out[client].append(server)
        if edge.virtual == "client":
            unwatched.add(client)
        if edge.virtual == "server":
            unwatched.add(server)
    called = {server for _, server in edges}
    entry = sorted(set(out) - called) or sorted(out)[:1]
    lines: list[str] = []

    def star(node: str) -> str:
        return f"{node}*" if node in unwatched else node

    def label(client: str, server: str) -> str:
        e = edges[(client, server)]
        median = "" if e.median_s is None else f", median {e.median_s * 1000:.1f}ms"
        failed = f", {e.errors} failed" if e.errors else ""
        return f"{star(server)}  ({e.calls} calls{failed}{median})"

    def walk(node: str, prefix: str, path: tuple[str, ...]) -> None:
        kids = sorted(out.get(node, []), key=lambda t: (t in unwatched, t))
        for i, server in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(f"{prefix}{'`-> ' if last else '|-> '}{label(node, server)}")
            if server not in path:
                walk(server, prefix + ("    " if last else "|   "), path + (server,))

    for node in entry:
        lines.append(star(node))
        walk(node, "", (node,))
    return "\n".join(lines)
