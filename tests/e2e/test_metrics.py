"""Metrics end to end: the numbers dashboards are built on, checked against ground truth.

RED (one tapwire watching two services, each in its own cgroup, scraped over
--prometheus-listen and exporting OTLP/gRPC to an independent receiver every second):

    metrics-fastapi   uvicorn + apps/metrics_fastapi.py   (asyncio)
    metrics-flask     gunicorn gthread 1 worker x 4 threads + apps/metrics_flask.py

300 requests per service over /a/<id>, /b, GET+POST /c, 20 answered 500 and 10 answered 404,
each with a handler delay the client chose, sent 8 at a time (4 per service). From what the
clients sent and measured, the test knows every series' count, its cumulative bucket counts,
bounds on its sum and its exact body sizes, and compares them with tapwire's exposition, with a
real Prometheus server scraping it, and with the OTLP export.

Resources and network (each service in its own cgroup, its own tapwire):

    burner          apps/burner.py: 1.5 s of CPU and 200 MiB, compared with the cgroup's cpu.stat
                    and the process's VmRSS read by the test at the same moment
    stuck-listener  apps/stuck_listener.py: listens (backlog 128), never accepts; 20 clients
                    connect, so exactly 20 connections wait in its accept queue
    net             apps/metrics_fastapi.py GET /blob: 10 x 100,000-byte responses on 10
                    connections, byte counts known to the client exactly

Loopback only; every wait and every load loop is bounded. Failures carry the relevant
exposition lines and the agent's stderr tail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import requests

import cgroupfs
import procs
from otlp_receiver import OtlpReceiver

APPS = procs.APPS_DIR
V4 = "127.0.0.1"
PROMETHEUS_BIN = "/usr/bin/prometheus"
PROMTOOL_BIN = "/usr/bin/promtool"

EXPORT_INTERVAL_MS = 1000  # OTEL_METRIC_EXPORT_INTERVAL of every agent here
SETTLE_TIMEOUT_S = 20  # counts must reach the expected totals within this after the load ...
SETTLE_S = 2.5  # ... then this long (over two export intervals) must bring nothing more
POLL_S = 0.25
VALUE_TIMEOUT_S = 15  # a gauge or counter must show the expected value within this

# http.server.request.duration's bucket bounds (seconds), as the contract (and semconv) fixes them.
DURATION_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0]

# Handler delays (ms). Each lies at least 3 ms above the bucket bound below it, so the measured
# duration (never less than the delay) cannot fall into a lower bucket, and at least 12 ms below
# the bound above it: room for the framework's own time under load (measured on the project's
# 2-CPU machines: median 1.5 ms, p99 6 ms, rarely up to 15 ms). Whether a request's bucket
# really was unambiguous is checked per request with the client's own measurement (see
# SeriesTruth.cumulative).
DELAYS_MS = [13, 28, 31, 34, 53, 56, 59, 78, 81, 84, 103, 130, 160, 200]
MIN_ABOVE_BOUND_MS, MIN_BELOW_BOUND_MS = 3, 12

REQUESTS_PER_SERVICE = 300
SERVER_ERRORS = 20  # answered 500
NOT_FOUND = 10  # answered 404
# Client threads: 4 per service, 8 in all. Never more in flight at a service than gunicorn has
# threads, so no request waits in a queue, which would inflate the client's measurement (the
# upper bound of the server's duration) and blur the bucket it proves.
CONCURRENCY_PER_SERVICE = 4
# (method, route template, requests) per service; they add up to REQUESTS_PER_SERVICE.
ROUTE_MIX = [("GET", "/a/{id}", 120), ("GET", "/b", 90), ("GET", "/c", 45), ("POST", "/c", 45)]
RED_SERVICES = {"metrics-fastapi": 20261124, "metrics-flask": 20261125}  # name -> plan seed

BURN_MS = 1500
ALLOC_MIB = 200
RESOURCE_TOLERANCE = 0.10

BACKLOG_CLIENTS = 20
BLOB_SIZE = 100_000
BLOB_REQUESTS = 10


def _check_delays() -> None:
    for delay in DELAYS_MS:
        below = max([b for b in DURATION_BOUNDS if b * 1000 <= delay], default=0.0) * 1000
        above = min(b for b in DURATION_BOUNDS if b * 1000 > delay) * 1000
        assert delay - below >= MIN_ABOVE_BOUND_MS and above - delay >= MIN_BELOW_BOUND_MS, \
            f"delay {delay} ms is too close to a bucket bound ({below:g} / {above:g} ms)"
    assert sum(n for _, _, n in ROUTE_MIX) == REQUESTS_PER_SERVICE


_check_delays()


# ---- Prometheus exposition ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float
    line: str


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(text: str, line: str) -> dict:
    labels, pos = {}, 0
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if match is None:
            raise AssertionError(f"unparsable labels in exposition line: {line!r}")
        labels[match[1]] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m[0]], match[2])
        pos = match.end()
    return labels


class Exposition:
    """A parsed Prometheus text exposition (format 0.0.4)."""

    def __init__(self, text: str):
        self.text = text
        self.samples: list[Sample] = []
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            match = _SAMPLE_RE.match(line)
            if match is None:
                raise AssertionError(f"unparsable exposition line: {line!r}")
            self.samples.append(Sample(match[1], _labels(match[2] or "", line),
                                       float(match[3]), line))

    def select(self, name: str, **labels) -> list[Sample]:
        return [s for s in self.samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    def total(self, name: str, **labels) -> float | None:
        """Sum of the matching samples; None when there is none."""
        found = self.select(name, **labels)
        return sum(s.value for s in found) if found else None

    def lines(self, prefixes: tuple[str, ...], job: str | None = None, limit: int = 150) -> str:
        picked = [s.line for s in self.samples if s.name.startswith(prefixes)
                  and (job is None or s.labels.get("job") == job)]
        more = f"\n  ... {len(picked) - limit} more" if len(picked) > limit else ""
        shown = "\n  ".join(picked[:limit]) if picked else "(none)"
        what = ", ".join(prefixes) + (f" with job={job!r}" if job else "")
        return f"exposition lines of {what}:\n  {shown}{more}"

    def instance_of_pid(self, pid: int) -> str | None:
        """The instance label of the target_info whose process_pid is `pid`."""
        for s in self.select("target_info", process_pid=str(pid)):
            return s.labels.get("instance")
        return None


def scrape(port: int, path: str = "/metrics") -> requests.Response:
    session = requests.Session()
    session.trust_env = False  # loopback only, whatever proxy the environment names
    try:
        return session.get(f"http://{V4}:{port}{path}", timeout=5)
    finally:
        session.close()


def scrape_metrics(port: int) -> Exposition:
    response = scrape(port)
    assert response.status_code == 200, \
        f"GET /metrics answered {response.status_code}: {response.text[:2000]}"
    return Exposition(response.text)


AGENT_SELF = ("tapwire_agent_",)


# ---- services, agents, cgroups for module-scoped runs -------------------------------------------

def uvicorn_argv(app: str) -> Callable[[int], list]:
    return lambda port: [sys.executable, "-m", "uvicorn", app, "--app-dir", APPS,
                         "--host", V4, "--port", port, "--http", "h11", "--loop", "asyncio",
                         "--no-access-log", "--log-level", "warning"]


def gunicorn_argv(app: str) -> Callable[[int], list]:
    return lambda port: [sys.executable, "-m", "gunicorn", "--chdir", APPS,
                         "--worker-class", "gthread", "--workers", "1", "--threads", "4",
                         "--keep-alive", "30", "--bind", f"{V4}:{port}", app]


def agent_args(prometheus_port: int) -> list[str]:
    return ["--prometheus-listen", f"{V4}:{prometheus_port}"]


def metric_env(receiver: OtlpReceiver | None = None, protocol: str = "grpc",
               interval_ms: int = EXPORT_INTERVAL_MS) -> dict[str, str]:
    env = {"OTEL_METRIC_EXPORT_INTERVAL": str(interval_ms)}
    if receiver is not None:
        env.update(receiver.exporter_env(protocol))
    else:
        env["TAPWIRE_EXPORTER"] = "none"  # no console spans; metrics still served
    return env


class Stack:
    """Cgroups, the processes in them and one agent, for a module-scoped fixture. Teardown
    order: the agent (SIGTERM, must exit 0), then processes, then cgroups."""

    def __init__(self, tapwire_bin: str, cgroup2_root: Path, workdir: Path, name: str):
        self.tapwire_bin, self.root, self.workdir, self.name = (tapwire_bin, cgroup2_root,
                                                                workdir, name)
        self.cgroups: list[Path] = []
        self.services: list[procs.ServiceProcess] = []
        self.agent: procs.TapwireProcess | None = None
        self.prometheus_port = 0

    def new_cgroup(self, role: str) -> Path:
        path = cgroupfs.create(f"tapwire-e2e-metrics-{role}-{os.getpid()}", self.root)
        self.cgroups.append(path)
        return path

    def http_service(self, argv_for_port, cgroup: Path, label: str,
                     env: dict[str, str] | None = None) -> procs.ServiceProcess:
        service = procs.start_http_service(argv_for_port, self.workdir, label, cgroup=cgroup,
                                           env=env, hosts=(V4,))
        self.services.append(service)
        return service

    def start_agent(self, cgroups: list[Path], env: dict[str, str]) -> procs.TapwireProcess:
        self.prometheus_port = procs.free_port()
        self.agent = procs.TapwireProcess(self.tapwire_bin, [str(c) for c in cgroups],
                                          procs.base_env(env), self.workdir,
                                          label=f"tapwire-{self.name}",
                                          extra_args=agent_args(self.prometheus_port))
        self.agent.start()
        return self.agent

    def scrape(self) -> Exposition:
        return scrape_metrics(self.prometheus_port)

    def diagnostics(self) -> str:
        parts = [self.agent.diagnostics()] if self.agent else ["(no agent started)"]
        return "\n".join(parts + [s.diagnostics() for s in self.services])

    def close(self) -> None:
        errors = []
        if self.agent is not None and self.agent.proc is not None:
            try:
                code = self.agent.stop()
                if code != 0:
                    errors.append(f"{self.agent.label} exited with {code} after SIGTERM\n"
                                  f"{self.agent.diagnostics()}")
            except AssertionError as err:
                errors.append(str(err))
        for service in reversed(self.services):
            service.stop()
        for path in reversed(self.cgroups):
            cgroupfs.remove(path)
        assert not errors, "\n".join(errors)


@contextlib.contextmanager
def stack(tapwire_bin, cgroup2_root, tmp_path_factory, name: str):
    built = Stack(tapwire_bin, cgroup2_root, tmp_path_factory.mktemp(f"metrics-{name}"), name)
    try:
        yield built
    finally:
        built.close()


def wait_for(check: Callable[[], tuple[bool, str]], timeout: float,
             interval: float = POLL_S) -> tuple[bool, str]:
    """Calls check() until it returns (True, _) or `timeout` passes; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = check()
        if ok or time.monotonic() >= deadline:
            return ok, detail
        time.sleep(interval)


# ---- the RED plan and its ground truth ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Planned:
    service: str
    index: int
    method: str
    route: str  # the template http.route must show
    target: str  # path and query, as sent
    delay_ms: int
    status: int
    body_size: int  # request body bytes (POST only)


def plan_service(service: str, seed: int) -> list[Planned]:
    """REQUESTS_PER_SERVICE requests over ROUTE_MIX, SERVER_ERRORS answered 500 and NOT_FOUND
    answered 404 at random (seeded) places, delays drawn from DELAYS_MS."""
    rng = random.Random(seed)
    routes = [(m, r) for m, r, n in ROUTE_MIX for _ in range(n)]
    rng.shuffle(routes)
    odd = rng.sample(range(REQUESTS_PER_SERVICE), SERVER_ERRORS + NOT_FOUND)
    status = {i: 500 for i in odd[:SERVER_ERRORS]} | {i: 404 for i in odd[SERVER_ERRORS:]}
    plan = []
    for i, (method, route) in enumerate(routes):
        delay = rng.choice(DELAYS_MS)
        code = status.get(i, 200)
        path = f"/a/{1000 + i}" if route == "/a/{id}" else route
        body = 100 + (i * 37) % 900 if method == "POST" else 0
        plan.append(Planned(service, i, method, route, f"{path}?delay_ms={delay}&status={code}",
                            delay, code, body))
    return plan


@dataclasses.dataclass
class Sent:
    planned: Planned
    status: int
    client_ns: int  # perf_counter around the whole exchange (request written .. body read)
    response_bytes: int  # response body length the client received
    error: str = ""


def drive(plans: list[list[Planned]], base_urls: dict[str, str]) -> list[Sent]:
    """Sends every plan (one per service) at the same time, each CONCURRENCY_PER_SERVICE
    requests at a time, each thread with its own keep-alive session. Never retries: a retried
    request would count twice on the server."""
    local = threading.local()
    sessions, lock = [], threading.Lock()

    def session() -> requests.Session:
        if getattr(local, "session", None) is None:
            local.session = requests.Session()
            local.session.trust_env = False
            with lock:
                sessions.append(local.session)
        return local.session

    def one(p: Planned) -> Sent:
        data = b"p" * p.body_size if p.method == "POST" else None
        start = time.perf_counter_ns()
        try:
            response = session().request(p.method, base_urls[p.service] + p.target, data=data,
                                         timeout=10)
            content = response.content
        except requests.RequestException as err:
            return Sent(p, 0, time.perf_counter_ns() - start, 0, repr(err))
        return Sent(p, response.status_code, time.perf_counter_ns() - start, len(content))

    pools = [ThreadPoolExecutor(CONCURRENCY_PER_SERVICE) for _ in plans]
    try:
        futures = [[pool.submit(one, p) for p in plan] for pool, plan in zip(pools, plans)]
        return [f.result() for per_service in futures for f in per_service]
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for s in sessions:
            s.close()


def bucket_index(seconds: float) -> int:
    """Index of the first bound >= seconds (len(DURATION_BOUNDS) for +Inf)."""
    return next((i for i, b in enumerate(DURATION_BOUNDS) if seconds <= b), len(DURATION_BOUNDS))


Key = tuple[str, str, str, str]  # (job, http_route, http_request_method, http_response_status_code)


@dataclasses.dataclass
class SeriesTruth:
    sent: list[Sent] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sent)

    @property
    def delay_sum_s(self) -> float:
        return sum(s.planned.delay_ms for s in self.sent) / 1000

    @property
    def client_sum_s(self) -> float:
        return sum(s.client_ns for s in self.sent) / 1e9

    @property
    def request_bytes(self) -> int:
        return sum(s.planned.body_size for s in self.sent)

    @property
    def response_bytes(self) -> int:
        return sum(s.response_bytes for s in self.sent)

    def cumulative(self, bound: float) -> tuple[int, int]:
        """(low, high) for the cumulative bucket count le=bound. A request's server-side duration
        lies between its handler delay and the client's measurement; when both fall into the same
        bucket (the planned case) low == high and the count is exact."""
        low = sum(s.client_ns / 1e9 <= bound for s in self.sent)
        high = sum(s.planned.delay_ms / 1000 <= bound for s in self.sent)
        return low, high

    def ambiguous(self) -> list[Sent]:
        return [s for s in self.sent if bucket_index(s.planned.delay_ms / 1000)
                != bucket_index(s.client_ns / 1e9)]


def key_of(sample: Sample) -> Key:
    labels = sample.labels
    return (labels.get("job", ""), labels.get("http_route", ""),
            labels.get("http_request_method", ""), labels.get("http_response_status_code", ""))


def le_value(sample: Sample) -> float:
    return math.inf if sample.labels["le"] == "+Inf" else float(sample.labels["le"])


# ---- the RED run (module scope) -----------------------------------------------------------------

@dataclasses.dataclass
class RedRun:
    stack: Stack
    receiver: OtlpReceiver
    services: dict[str, procs.ServiceProcess]
    serving_pid: dict[str, int]  # service -> the pid that answers requests
    sent: list[Sent]
    truth: dict[Key, SeriesTruth]
    settled: bool
    final: Exposition  # scraped once the counts settled

    def truth_of(self, job: str) -> dict[Key, SeriesTruth]:
        return {k: v for k, v in self.truth.items() if k[0] == job}

    def fail_if(self, problems: list[str], headline: str, *, prefixes: tuple[str, ...] = (),
                extra: str = "") -> None:
        if not problems:
            return
        parts = [f"{headline}: {len(problems)} problems:\n  " + "\n  ".join(problems[:100])]
        if not self.settled:
            parts.append(f"(the per-service totals never reached {REQUESTS_PER_SERVICE} within "
                         f"{SETTLE_TIMEOUT_S} s of the load)")
        ambiguous = [s for t in self.truth.values() for s in t.ambiguous()]
        if ambiguous:
            parts.append(f"{len(ambiguous)} requests' client time crossed a bucket bound, so "
                         f"their bucket was checked as a range: "
                         + ", ".join(f"{s.planned.delay_ms}ms->{s.client_ns / 1e6:.1f}ms"
                                     for s in ambiguous[:20]))
        for job in self.services:
            for prefix in prefixes:
                parts.append(self.final.lines((prefix,), job))
        parts.append(self.final.lines(AGENT_SELF))
        if extra:
            parts.append(extra)
        parts.append(self.stack.agent.diagnostics())
        pytest.fail("\n".join(parts), pytrace=False)


@pytest.fixture(scope="module")
def red(tapwire_bin, cgroup2_root, tmp_path_factory):
    receiver = OtlpReceiver().start()
    try:
        with stack(tapwire_bin, cgroup2_root, tmp_path_factory, "red") as st:
            services, cgroups = {}, []
            for name in RED_SERVICES:
                cg = st.new_cgroup(name.split("-", 1)[1])
                cgroups.append(cg)
                argv = (uvicorn_argv("metrics_fastapi:app") if name == "metrics-fastapi"
                        else gunicorn_argv("metrics_flask:app"))
                services[name] = st.http_service(argv, cg, name, env={"OTEL_SERVICE_NAME": name})
            serving = {"metrics-fastapi": services["metrics-fastapi"].pid}
            workers = [p for p in cgroupfs.procs(services["metrics-flask"].cgroup)
                       if p != services["metrics-flask"].pid]
            assert len(workers) == 1, f"gunicorn should run exactly one worker, found {workers}"
            serving["metrics-flask"] = workers[0]
            st.start_agent(cgroups, metric_env(receiver))

            plans = [plan_service(name, seed) for name, seed in RED_SERVICES.items()]
            sent = drive(plans, {n: s.base_url for n, s in services.items()})
            broken = [s for s in sent if s.error or s.status != s.planned.status]
            assert not broken, (f"{len(broken)} requests did not get their planned answer (the "
                                f"services misbehaved, not the agent): "
                                + "; ".join(f"{s.planned.method} {s.planned.target} -> "
                                            f"{s.status} {s.error}" for s in broken[:10])
                                + "\n" + st.diagnostics())
            truth: dict[Key, SeriesTruth] = defaultdict(SeriesTruth)
            for s in sent:
                p = s.planned
                truth[(p.service, p.route, p.method, str(p.status))].sent.append(s)

            def settled() -> tuple[bool, str]:
                expo = st.scrape()
                totals = {job: expo.total("http_server_request_duration_seconds_count", job=job)
                          for job in services}
                return all((t or 0) >= REQUESTS_PER_SERVICE for t in totals.values()), str(totals)

            ok, _ = wait_for(settled, SETTLE_TIMEOUT_S)
            time.sleep(SETTLE_S)
            yield RedRun(st, receiver, services, serving, sent, dict(truth), ok, st.scrape())
    finally:
        receiver.stop()


@pytest.fixture
def red_run(red, attach_log) -> RedRun:
    attach_log("RED stack logs", red.stack.diagnostics)
    return red


# ---- 1. ground truth ----------------------------------------------------------------------------

def test_red_request_counts_are_exact(red_run):
    """Per (service, route, method, status): the _count series equal the requests sent; 5xx
    (and only 5xx) carry error_type; per service 300 requests, 20 errors, 10 not found."""
    run, expo = red_run, red_run.final
    problems = []
    for job in run.services:
        counts = {key_of(s): s.value for s in
                  expo.select("http_server_request_duration_seconds_count", job=job)}
        expected = {k: t.count for k, t in run.truth_of(job).items()}
        for key in sorted(set(counts) | set(expected)):
            if counts.get(key) != expected.get(key):
                problems.append(f"{key}: _count {counts.get(key)}, expected {expected.get(key)}")
        total = sum(counts.values())
        if total != REQUESTS_PER_SERVICE:
            problems.append(f"{job}: {total:g} requests counted, expected {REQUESTS_PER_SERVICE}")
        errors = sum(v for k, v in counts.items() if k[3].startswith("5"))
        if errors != SERVER_ERRORS:
            problems.append(f"{job}: {errors:g} 5xx requests counted, expected {SERVER_ERRORS}")
        not_found = sum(v for k, v in counts.items() if k[3] == "404")
        if not_found != NOT_FOUND:
            problems.append(f"{job}: {not_found:g} 404 requests counted, expected {NOT_FOUND}")
        for s in expo.select("http_server_request_duration_seconds_count", job=job):
            status = s.labels.get("http_response_status_code", "")
            want_error = status if status.startswith("5") else None
            if s.labels.get("error_type") != want_error:
                problems.append(f"error_type={s.labels.get('error_type')!r} on status {status}, "
                                f"expected {want_error!r}: {s.line}")
            for label, value in (("url_scheme", "http"), ("network_protocol_version", "1.1")):
                if s.labels.get(label) != value:
                    problems.append(f"{label}={s.labels.get(label)!r}, expected {value!r}: "
                                    f"{s.line}")
    run.fail_if(problems, "request counts",
                prefixes=("http_server_request_duration_seconds_count",))


def test_red_duration_buckets_are_exact(red_run):
    """Every request is in its bucket: per series, each cumulative bucket count equals the
    number of requests whose delay is at most the bound (exact whenever the client's own
    measurement lands in the same bucket; otherwise between the two), +Inf equals _count, and
    the bounds are exactly the contract's."""
    run, expo = red_run, red_run.final
    problems = []
    wanted_les = DURATION_BOUNDS + [math.inf]
    for job in run.services:
        buckets: dict[Key, dict[float, float]] = defaultdict(dict)
        for s in expo.select("http_server_request_duration_seconds_bucket", job=job):
            buckets[key_of(s)][le_value(s)] = s.value
        for key, truth in sorted(run.truth_of(job).items()):
            got = buckets.get(key)
            if got is None:
                problems.append(f"{key}: no _bucket series ({truth.count} requests sent)")
                continue
            if sorted(got) != wanted_les:
                problems.append(f"{key}: le bounds {sorted(got)}, expected {wanted_les}")
            for bound in DURATION_BOUNDS:
                low, high = truth.cumulative(bound)
                value = got.get(bound)
                if value is None or not low <= value <= high:
                    want = f"{high}" if low == high else f"between {low} and {high}"
                    problems.append(f"{key} le={bound:g}: {value}, expected {want}")
            if got.get(math.inf) != truth.count:
                problems.append(f"{key} le=+Inf: {got.get(math.inf)}, expected {truth.count}")
            ordered = [got[b] for b in sorted(got)]
            if ordered != sorted(ordered):
                problems.append(f"{key}: cumulative buckets decrease: {ordered}")
        extra = set(buckets) - set(run.truth_of(job))
        problems += [f"{k}: unexpected _bucket series" for k in sorted(extra)]
    run.fail_if(problems, "duration buckets",
                prefixes=("http_server_request_duration_seconds_bucket",))


def test_red_duration_sums_are_bounded(red_run):
    """Per series, _sum lies within [sum of the handler delays, sum of the client-measured
    durations]: the server's time is inside the client's and covers the handler's."""
    run, expo = red_run, red_run.final
    problems = []
    for job in run.services:
        sums = {key_of(s): s.value for s in
                expo.select("http_server_request_duration_seconds_sum", job=job)}
        for key, truth in sorted(run.truth_of(job).items()):
            got = sums.get(key)
            if got is None or not truth.delay_sum_s - 1e-6 <= got <= truth.client_sum_s + 1e-6:
                problems.append(f"{key}: _sum {got}, expected within [{truth.delay_sum_s:.6f}, "
                                f"{truth.client_sum_s:.6f}] s ({truth.count} requests)")
    run.fail_if(problems, "duration sums", prefixes=("http_server_request_duration_seconds_sum",))


def test_red_body_sizes_are_exact(red_run):
    """Per series, the request and response body size histograms count every request and sum
    exactly the bytes the clients sent (POST /c) and received."""
    run, expo = red_run, red_run.final
    problems = []
    families = [("http_server_request_body_size_bytes", "request_bytes"),
                ("http_server_response_body_size_bytes", "response_bytes")]
    for job in run.services:
        for family, attr in families:
            counts = {key_of(s): s.value for s in expo.select(f"{family}_count", job=job)}
            sums = {key_of(s): s.value for s in expo.select(f"{family}_sum", job=job)}
            for key, truth in sorted(run.truth_of(job).items()):
                want = getattr(truth, attr)
                if counts.get(key) != truth.count or sums.get(key) != want:
                    problems.append(f"{family} {key}: _count {counts.get(key)} _sum "
                                    f"{sums.get(key)}, expected {truth.count} and {want}")
    run.fail_if(problems, "body sizes", prefixes=("http_server_request_body_size_bytes_sum",
                                                  "http_server_response_body_size_bytes_sum"))


def test_one_target_info_per_service(red_run):
    """Each service's series carry one instance, the one of its serving process's target_info
    (job = service.name, instance = service.instance.id); one target_info per job/instance;
    the agent's own under job="tapwire"."""
    run, expo = red_run, red_run.final
    problems = []
    seen: dict[tuple, int] = defaultdict(int)
    for s in expo.select("target_info"):
        seen[(s.labels.get("job"), s.labels.get("instance"))] += 1
    problems += [f"{n} target_info lines for job/instance {k}" for k, n in seen.items() if n > 1]
    for job, pid in run.serving_pid.items():
        infos = expo.select("target_info", job=job, process_pid=str(pid))
        if len(infos) != 1:
            problems.append(f"{job}: {len(infos)} target_info with process_pid={pid}, expected 1")
            continue
        instance = infos[0].labels.get("instance")
        red = [s for s in expo.samples if s.name.startswith("http_server_")
               and s.labels.get("job") == job]
        instances = {s.labels.get("instance") for s in red}
        if instances != {instance}:
            problems.append(f"{job}: HTTP series carry instances {sorted(map(str, instances))}, "
                            f"expected only {instance!r} (target_info of pid {pid})")
    agent = expo.select("target_info", job="tapwire")
    if [s.labels.get("process_pid") for s in agent] != [str(run.stack.agent.pid)]:
        problems.append(f"agent target_info {[s.line for s in agent]}, expected one with "
                        f"process_pid={run.stack.agent.pid}")
    run.fail_if(problems, "target_info", prefixes=("target_info",),
                extra=expo.lines(("target_info",)))


def test_agent_counts_its_spans(red_run):
    """The agent's own metrics: one span created per request (600), none lost on the way,
    all exported (to the OTLP receiver, which holds exactly that many)."""
    run = red_run
    total = REQUESTS_PER_SERVICE * len(RED_SERVICES)

    def check() -> tuple[bool, str]:
        expo = run.stack.scrape()
        got = {state: expo.total("tapwire_agent_spans_total", job="tapwire", state=state)
               for state in ("created", "exported", "failed", "dropped")}
        got["events_lost"] = expo.total("tapwire_agent_events_lost_total", job="tapwire")
        got["receiver_spans"] = run.receiver.span_count()
        want = {"created": total, "exported": total, "failed": 0, "dropped": 0,
                "events_lost": 0, "receiver_spans": total}
        return got == want, f"got {got}, expected {want}"

    ok, detail = wait_for(check, VALUE_TIMEOUT_S)
    run.fail_if([] if ok else [detail], "agent self metrics")


# ---- 2. a real Prometheus server ----------------------------------------------------------------

PROMETHEUS_CONFIG = """\
# Written by tapwire's test_metrics.py: scrape one agent every second.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: tapwire-agent
    honor_labels: true  # keep tapwire's job/instance (deploy/prometheus/prometheus.yaml does too)
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"""


class Prometheus:
    def __init__(self, workdir: Path, target: str):
        self.workdir = workdir
        self.port = procs.free_port()
        config = workdir / "prometheus.yml"
        config.write_text(PROMETHEUS_CONFIG.replace("{target}", target))
        self.log_path = workdir / "prometheus.log"
        argv = [PROMETHEUS_BIN, f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={V4}:{self.port}", "--log.level=warn"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=workdir,
                                         env=procs.base_env())
        self.session = requests.Session()
        self.session.trust_env = False

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> tuple[bool, str]:
            if self.proc.poll() is not None:
                return True, f"exited with {self.proc.returncode}"
            try:
                r = self.session.get(f"http://{V4}:{self.port}/-/ready", timeout=2)
                return r.status_code == 200, f"/-/ready answered {r.status_code}"
            except requests.RequestException as err:
                return False, repr(err)
        ok, detail = wait_for(ready, timeout)
        assert ok and self.proc.poll() is None, \
            f"Prometheus not ready within {timeout} s: {detail}\n{self.diagnostics()}"

    def query(self, promql: str) -> dict[tuple, float]:
        """Instant query -> {tuple of sorted label items: value}."""
        r = self.session.get(f"http://{V4}:{self.port}/api/v1/query", params={"query": promql},
                             timeout=5)
        body = r.json()
        assert body.get("status") == "success", f"query {promql!r} failed: {body}"
        return {tuple(sorted(item["metric"].items())): float(item["value"][1])
                for item in body["data"]["result"]}

    def diagnostics(self) -> str:
        return f"--- prometheus output ---\n{procs.tail(self.log_path)}"

    def stop(self) -> None:
        self.session.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def prometheus_server(red_run, tmp_path, attach_log):
    assert os.access(PROMETHEUS_BIN, os.X_OK), \
        f"{PROMETHEUS_BIN} is missing: install the Debian package prometheus"
    server = Prometheus(tmp_path, f"{V4}:{red_run.stack.prometheus_port}")
    attach_log("prometheus", server.diagnostics)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _by(labels: tuple, *names: str) -> tuple:
    d = dict(labels)
    return tuple(d.get(n, "") for n in names)


def test_prometheus_server_gets_the_exact_numbers(red_run, prometheus_server):
    """A real Prometheus scraping tapwire every second answers PromQL with the exact numbers:
    requests and errors per job, per route/method/status, and bucket counts per job and le."""
    run, prom = red_run, prometheus_server
    jobs = list(run.services)
    selector = '{job=~"' + "|".join(jobs) + '"}'
    per_series = {k: float(t.count) for k, t in run.truth.items()}
    buckets_from_scrape: dict[tuple, float] = defaultdict(float)
    for s in run.final.select("http_server_request_duration_seconds_bucket"):
        if s.labels.get("job") in jobs:
            buckets_from_scrape[(s.labels["job"], s.labels["le"])] += s.value

    def compare() -> tuple[bool, str]:
        checks = {
            "up": ({(f"{V4}:{run.stack.prometheus_port}",): 1.0},
                   {_by(k, "instance"): v for k, v in
                    prom.query('up{job="tapwire-agent"}').items()}),
            "requests by job": ({(j,): float(REQUESTS_PER_SERVICE) for j in jobs},
                                {_by(k, "job"): v for k, v in prom.query(
                                    f"sum by (job) (http_server_request_duration_seconds_count"
                                    f"{selector})").items()}),
            "5xx by job": ({(j,): float(SERVER_ERRORS) for j in jobs},
                           {_by(k, "job"): v for k, v in prom.query(
                               'sum by (job) (http_server_request_duration_seconds_count{job=~"'
                               + "|".join(jobs) + '",http_response_status_code=~"5.."})'
                           ).items()}),
            "404 by job": ({(j,): float(NOT_FOUND) for j in jobs},
                           {_by(k, "job"): v for k, v in prom.query(
                               'sum by (job) (http_server_request_duration_seconds_count{job=~"'
                               + "|".join(jobs) + '",http_response_status_code="404"})'
                           ).items()}),
            "requests by job/route/method/status": (per_series, {
                _by(k, "job", "http_route", "http_request_method", "http_response_status_code"): v
                for k, v in prom.query(
                    "sum by (job, http_route, http_request_method, http_response_status_code) "
                    f"(http_server_request_duration_seconds_count{selector})").items()}),
            "buckets by job/le (vs tapwire's own exposition)": (dict(buckets_from_scrape), {
                _by(k, "job", "le"): v for k, v in prom.query(
                    f"sum by (job, le) (http_server_request_duration_seconds_bucket{selector})"
                ).items()}),
        }
        bad = [f"{name}: Prometheus says {got}, expected {want}"
               for name, (want, got) in checks.items() if got != want]
        return not bad, "\n  ".join(bad)

    ok, detail = wait_for(compare, 30, interval=1.0)
    run.fail_if([] if ok else [detail], "Prometheus server",
                prefixes=("http_server_request_duration_seconds_count",),
                extra=prom.diagnostics())


def test_promtool_accepts_the_exposition(red_run):
    """`promtool check metrics` (parser and linter) passes on a scrape of the endpoint; the
    content type is the text format 0.0.4, and /healthz answers 200."""
    run = red_run
    response = scrape(run.stack.prometheus_port)
    problems = []
    content_type = response.headers.get("Content-Type", "")
    if not content_type.startswith("text/plain") or "version=0.0.4" not in content_type:
        problems.append(f"Content-Type {content_type!r}, expected text/plain; version=0.0.4")
    done = subprocess.run([PROMTOOL_BIN, "check", "metrics"], input=response.text,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        problems.append(f"promtool check metrics exited {done.returncode}:\n"
                        f"{done.stdout}{done.stderr}")
    health = scrape(run.stack.prometheus_port, "/healthz")
    if health.status_code != 200:
        problems.append(f"/healthz answered {health.status_code}: {health.text[:200]}")
    run.fail_if(problems, "exposition format")


# ---- 3. the same numbers over OTLP --------------------------------------------------------------

def otlp_duration_points(receiver: OtlpReceiver, jobs) -> list[dict]:
    return [p for p in receiver.latest_metric_points("http.server.request.duration")
            if p["service_name"] in jobs]


def test_otlp_metrics_match_prometheus(red_run):
    """The OTLP export (cumulative, latest point per stream) carries the same histogram per
    service and attribute set as the Prometheus exposition: count, every bucket, sum; typed
    attributes, the contract's bounds, unit s, and the same service.instance.id."""
    run = red_run
    jobs = list(run.services)

    def arrived() -> tuple[bool, str]:
        totals = {j: sum(p["count"] for p in otlp_duration_points(run.receiver, [j]))
                  for j in jobs}
        return all(t == REQUESTS_PER_SERVICE for t in totals.values()), f"OTLP totals {totals}"

    ok, detail = wait_for(arrived, VALUE_TIMEOUT_S)
    problems = [] if ok else [detail]
    expo = run.final
    prom_count = {key_of(s): s for s in expo.select("http_server_request_duration_seconds_count")}
    prom_sum = {key_of(s): s.value for s in expo.select("http_server_request_duration_seconds_sum")}
    prom_buckets: dict[Key, dict[float, float]] = defaultdict(dict)
    for s in expo.select("http_server_request_duration_seconds_bucket"):
        prom_buckets[key_of(s)][le_value(s)] = s.value
    otlp_keys = set()
    for p in otlp_duration_points(run.receiver, jobs):
        a = p["attributes"]
        status = a.get("http.response.status_code")
        key = (p["service_name"], a.get("http.route", ""), a.get("http.request.method", ""),
               str(status))
        otlp_keys.add(key)
        where = f"OTLP {key}"
        if type(status) is not int:
            problems.append(f"{where}: http.response.status_code is {type(status).__name__}, "
                            f"expected int")
        if p["type"] != "histogram" or p["temporality"] != "CUMULATIVE" or p["unit"] != "s":
            problems.append(f"{where}: {p['type']} {p['temporality']} unit {p['unit']!r}, "
                            f"expected a CUMULATIVE histogram in s")
            continue
        if p["explicit_bounds"] != DURATION_BOUNDS:
            problems.append(f"{where}: bounds {p['explicit_bounds']}, expected {DURATION_BOUNDS}")
        truth = run.truth.get(key)
        if truth is None or p["count"] != truth.count:
            problems.append(f"{where}: count {p['count']}, expected "
                            f"{truth.count if truth else 0} (requests sent)")
        prom = prom_count.get(key)
        if prom is None:
            problems.append(f"{where}: no such series in the Prometheus exposition")
            continue
        if p["count"] != prom.value:
            problems.append(f"{where}: count {p['count']}, Prometheus _count {prom.value:g}")
        if p["sum"] is None or not math.isclose(p["sum"], prom_sum.get(key, math.nan),
                                                rel_tol=1e-9, abs_tol=1e-9):
            problems.append(f"{where}: sum {p['sum']}, Prometheus _sum {prom_sum.get(key)}")
        cumulative, running = {}, 0
        for bound, n in zip(p["explicit_bounds"] + [math.inf], p["bucket_counts"]):
            running += n
            cumulative[bound] = float(running)
        if cumulative != prom_buckets.get(key):
            problems.append(f"{where}: cumulative buckets {cumulative}, Prometheus "
                            f"{prom_buckets.get(key)}")
        instance = p["resource"].get("service.instance.id")
        if instance != prom.labels.get("instance"):
            problems.append(f"{where}: service.instance.id {instance!r}, Prometheus instance "
                            f"{prom.labels.get('instance')!r}")
    missing = {k for k in prom_count if k[0] in jobs} - otlp_keys
    problems += [f"{k}: in the Prometheus exposition, not in the OTLP export" for k in missing]
    if run.receiver.errors:
        problems.append(f"the receiver rejected requests: {run.receiver.errors}")
    transports = {r.transport for r in run.receiver.metric_requests()}
    if transports != {"grpc"}:
        problems.append(f"metric requests arrived over {transports}, expected only grpc")
    run.fail_if(problems, "OTLP vs Prometheus",
                prefixes=("http_server_request_duration_seconds_count",),
                extra=f"{len(run.receiver.metric_requests())} metric requests received")


# ---- function-scoped services -------------------------------------------------------------------

@pytest.fixture
def services(tmp_path, attach_log):
    """Factory: services(argv_for_port, cgroup, label, env=None) -> ServiceProcess on 127.0.0.1,
    answering GET /hello; stopped at teardown."""
    started: list[procs.ServiceProcess] = []

    def start(argv_for_port, cgroup: Path, label: str, env: dict[str, str] | None = None):
        service = procs.start_http_service(argv_for_port, tmp_path, label, cgroup=cgroup,
                                           env=env, hosts=(V4,))
        started.append(service)
        attach_log(f"{label} (pid {service.pid}, port {service.port})", service.diagnostics)
        return service

    yield start
    for service in started:
        service.stop()


def get(url: str, timeout: float = 10) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    try:
        return session.get(url, timeout=timeout)
    finally:
        session.close()


def test_otlp_final_metric_export_at_sigterm(cgroup, services, tapwire, otlp_receiver):
    """With a 60 s export interval, only the export at SIGTERM can deliver the metrics: it does,
    over OTLP/HTTP protobuf, with the exact counts (9 x 200, 3 x 500)."""
    cg = cgroup("metrics-final")
    service = services(uvicorn_argv("metrics_fastapi:app"), cg, "final",
                       env={"OTEL_SERVICE_NAME": "metrics-final"})
    env = metric_env(otlp_receiver, "http/protobuf", interval_ms=60_000)
    agent = tapwire([cg], env=env)
    statuses = [200] * 9 + [500] * 3
    for i, status in enumerate(statuses):
        r = get(f"{service.base_url}/b?delay_ms=13&status={status}")
        assert r.status_code == status, f"request {i}: the service answered {r.status_code}"
    code = agent.stop()
    assert code == 0, f"tapwire exited with {code} after SIGTERM\n{agent.diagnostics()}"
    points = [p for p in otlp_receiver.latest_metric_points("http.server.request.duration")
              if p["service_name"] == "metrics-final"]
    got = {p["attributes"].get("http.response.status_code"): p["count"] for p in points}
    transports = {r.transport for r in otlp_receiver.metric_requests()}
    assert got == {200: 9, 500: 3} and transports == {"http"}, (
        f"after SIGTERM the receiver holds counts {got} (by status) over {transports}, "
        f"expected {{200: 9, 500: 3}} over http; "
        f"{len(otlp_receiver.metric_requests())} metric requests, errors "
        f"{otlp_receiver.errors}\n{agent.diagnostics()}")


def test_active_requests(cgroup, services, tapwire):
    """http.server.active_requests: 5 requests held 4 s in the handler show as 5 in flight
    while they last, and 0 once they are answered."""
    cg = cgroup("metrics-active")
    service = services(uvicorn_argv("metrics_fastapi:app"), cg, "active",
                       env={"OTEL_SERVICE_NAME": "metrics-active"})
    port = procs.free_port()
    agent = tapwire([cg], env=metric_env(), args=agent_args(port))
    in_flight, hold_ms = 5, 4000
    seen: list[float | None] = []
    last = [Exposition("")]

    def active() -> float | None:
        last[0] = scrape_metrics(port)
        return last[0].total("http_server_active_requests", job="metrics-active")

    with ThreadPoolExecutor(in_flight) as pool:
        futures = [pool.submit(get, f"{service.base_url}/b?delay_ms={hold_ms}", 15)
                   for _ in range(in_flight)]
        deadline = time.monotonic() + hold_ms / 1000 - 0.5
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            seen.append(active())
            if seen[-1] == in_flight:
                break
            time.sleep(POLL_S)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * in_flight, f"the service answered {statuses}"
    ok, _ = wait_for(lambda: (active() == 0, ""), VALUE_TIMEOUT_S)
    problems = []
    if in_flight not in seen:
        problems.append(f"while {in_flight} requests were in flight, http_server_active_requests "
                        f"read {seen}")
    if not ok:
        problems.append(f"after they were answered it read {active()}, expected 0")
    assert not problems, ("\n".join(problems) + "\n"
                          + last[0].lines(("http_server_active_requests",))
                          + "\n" + agent.diagnostics())


# ---- 4. resources -------------------------------------------------------------------------------

def cgroup_usage_s(cg: Path) -> float:
    for line in (cg / "cpu.stat").read_text().splitlines():
        name, value = line.split()
        if name == "usage_usec":
            return int(value) / 1e6
    raise AssertionError(f"no usage_usec in {cg / 'cpu.stat'}")


def vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@dataclasses.dataclass
class Burner:
    stack: Stack
    service: procs.ServiceProcess
    cgroup: Path
    job: str
    burn: dict  # what GET /burn reported


@pytest.fixture(scope="module")
def burner(tapwire_bin, cgroup2_root, tmp_path_factory):
    with stack(tapwire_bin, cgroup2_root, tmp_path_factory, "burner") as st:
        cg = st.new_cgroup("burner")
        job = "metrics-burner"
        service = st.http_service(lambda p: [sys.executable, APPS / "burner.py", "--port", p],
                                  cg, "burner", env={"OTEL_SERVICE_NAME": job})
        st.start_agent([cg], metric_env())
        burn = get(f"{service.base_url}/burn?ms={BURN_MS}", timeout=60).json()
        held = get(f"{service.base_url}/alloc?mb={ALLOC_MIB}", timeout=60).json()
        assert held["held_mib"] == ALLOC_MIB, f"burner holds {held}"
        yield Burner(st, service, cg, job, burn)


@pytest.fixture
def burner_run(burner, attach_log) -> Burner:
    attach_log("burner stack logs", burner.stack.diagnostics)
    return burner


def compare_resource(b: Burner, what: str, read_metric: Callable[[Exposition], float | None],
                     read_truth: Callable[[], float], unit: str, floor: float) -> None:
    """Polls until the metric is within RESOURCE_TOLERANCE of the truth read right around the
    scrape (bounded), else fails with both readings and the exposition lines."""
    last: dict = {}

    def check() -> tuple[bool, str]:
        before = read_truth()
        expo = b.stack.scrape()
        after = read_truth()
        truth = (before + after) / 2
        value = read_metric(expo)
        last.update(expo=expo, truth=truth, value=value, spread=after - before)
        return value is not None and abs(value - truth) <= RESOURCE_TOLERANCE * truth, ""

    ok, _ = wait_for(check, VALUE_TIMEOUT_S, interval=0.5)
    assert last["truth"] >= floor, (f"test setup: the truth for {what} is only "
                                    f"{last['truth']:g} {unit}, expected at least {floor:g}")
    if not ok:
        pytest.fail(
            f"{what}: tapwire says {last['value']} {unit}, the kernel says {last['truth']:g} "
            f"{unit} (moved by {last['spread']:g} during the scrape); tolerance "
            f"{RESOURCE_TOLERANCE:.0%}; burner pid {b.service.pid}, cgroup {b.cgroup}, "
            f"/burn reported {b.burn}\n"
            # Unfiltered: this agent watches the burner alone, and a wrong job label is evidence.
            + last["expo"].lines(("process_", "container_", "target_info")) + "\n"
            + b.stack.agent.diagnostics(), pytrace=False)


def test_process_cpu_time(burner_run):
    """process_cpu_time_seconds_total (user + system) of the burner's process is within 10% of
    the cgroup's own cpu.stat usage_usec (the process is alone in it)."""
    b = burner_run

    def metric(expo: Exposition) -> float | None:
        instance = expo.instance_of_pid(b.service.pid)
        series = expo.select("process_cpu_time_seconds_total", job=b.job, instance=instance)
        modes = {s.labels.get("cpu_mode") for s in series}
        return sum(s.value for s in series) if modes == {"user", "system"} else None

    compare_resource(b, "process.cpu.time", metric, lambda: cgroup_usage_s(b.cgroup), "s",
                     BURN_MS / 1000)


def test_container_cpu_time(burner_run):
    """container_cpu_time_seconds_total of the burner's cgroup is within 10% of that cgroup's
    cpu.stat usage_usec."""
    b = burner_run
    compare_resource(b, "container.cpu.time",
                     lambda expo: expo.total("container_cpu_time_seconds_total", job=b.job),
                     lambda: cgroup_usage_s(b.cgroup), "s", BURN_MS / 1000)


def test_process_memory_usage(burner_run):
    """process_memory_usage_bytes of the burner's process (holding 200 MiB it has written to)
    is within 10% of its VmRSS."""
    b = burner_run

    def metric(expo: Exposition) -> float | None:
        instance = expo.instance_of_pid(b.service.pid)
        return expo.total("process_memory_usage_bytes", job=b.job, instance=instance)

    compare_resource(b, "process.memory.usage", metric, lambda: vm_rss_bytes(b.service.pid),
                     "bytes", ALLOC_MIB * 1024 * 1024)


# ---- 5. accept queue ----------------------------------------------------------------------------

def listen_rx_queue(port: int) -> int | None:
    """The kernel's own accept-queue length of the 127.0.0.1:port listener (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return None


def test_listen_backlog(cgroup, start_in_cgroup, tapwire):
    """A server that never accepts, with 20 connected clients waiting in its accept queue:
    tapwire_listen_backlog{server_port} reads 20 (within 1), as /proc/net/tcp does."""
    cg = cgroup("metrics-backlog")
    port = procs.free_port()
    job = "metrics-stuck"
    start_in_cgroup(cg, [sys.executable, str(APPS / "stuck_listener.py"), "--port", str(port),
                         "--backlog", "128"], env={"OTEL_SERVICE_NAME": job})
    ok, _ = wait_for(lambda: (listen_rx_queue(port) is not None, ""), 10, interval=0.05)
    assert ok, f"stuck_listener.py never listened on {V4}:{port}"
    prom_port = procs.free_port()
    agent = tapwire([cg], env=metric_env(), args=agent_args(prom_port))
    clients = []
    try:
        for _ in range(BACKLOG_CLIENTS):
            clients.append(socket.create_connection((V4, port), timeout=5))
        kernel = listen_rx_queue(port)
        assert kernel == BACKLOG_CLIENTS, \
            f"test setup: the kernel shows {kernel} queued connections, expected {BACKLOG_CLIENTS}"
        last = [Exposition("")]

        def check() -> tuple[bool, str]:
            last[0] = scrape_metrics(prom_port)
            value = last[0].total("tapwire_listen_backlog", server_port=str(port))
            return value is not None and abs(value - BACKLOG_CLIENTS) <= 1, str(value)

        ok, value = wait_for(check, VALUE_TIMEOUT_S)
        jobs = {s.labels.get("job")
                for s in last[0].select("tapwire_listen_backlog", server_port=str(port))}
        kernel = listen_rx_queue(port)
    finally:
        for c in clients:
            c.close()
    assert ok and jobs == {job}, (
        f"tapwire_listen_backlog{{server_port=\"{port}\"}} = {value} (jobs {jobs}), expected "
        f"{BACKLOG_CLIENTS} +- 1 under job {job!r}; the kernel's /proc/net/tcp shows {kernel}\n"
        + last[0].lines(("tapwire_listen_",)) + "\n" + agent.diagnostics())


# ---- 6. network ---------------------------------------------------------------------------------

@dataclasses.dataclass
class NetRun:
    stack: Stack
    job: str
    sent_bytes: int  # request bytes the clients wrote
    received_bytes: int  # response bytes (head + body) the clients read
    connections: int


def raw_get(port: int, target: str) -> tuple[int, int]:
    """One GET on a fresh connection, `Connection: close`; read to EOF.
    Returns (bytes sent, bytes received)."""
    request = (f"GET {target} HTTP/1.1\r\nHost: {V4}:{port}\r\nUser-Agent: tapwire-e2e-net\r\n"
               f"Connection: close\r\n\r\n").encode()
    with socket.create_connection((V4, port), timeout=10) as sock:
        sock.sendall(request)
        received = 0
        while chunk := sock.recv(65536):
            received += len(chunk)
    return len(request), received


@pytest.fixture(scope="module")
def net(tapwire_bin, cgroup2_root, tmp_path_factory):
    with stack(tapwire_bin, cgroup2_root, tmp_path_factory, "net") as st:
        cg = st.new_cgroup("net")
        job = "metrics-net"
        service = st.http_service(uvicorn_argv("metrics_fastapi:app"), cg, "net",
                                  env={"OTEL_SERVICE_NAME": job})
        st.start_agent([cg], metric_env())
        sent = received = 0
        for _ in range(BLOB_REQUESTS):
            s, r = raw_get(service.port, f"/blob?size={BLOB_SIZE}")
            assert r > BLOB_SIZE, f"GET /blob returned only {r} bytes"
            sent, received = sent + s, received + r
        yield NetRun(st, job, sent, received, BLOB_REQUESTS)


@pytest.fixture
def net_run(net, attach_log) -> NetRun:
    attach_log("net stack logs", net.stack.diagnostics)
    return net


def test_network_io_bytes(net_run):
    """10 x 100,000-byte responses: tapwire_network_io_bytes_total{direction=transmit} of the
    service is >= 1,000,000 and < 1,100,000, and equals exactly the bytes the clients read
    (receive: exactly the bytes they wrote)."""
    n = net_run
    last = [Exposition("")]

    def read(direction: str) -> float | None:
        return last[0].total("tapwire_network_io_bytes_total", job=n.job,
                             network_io_direction=direction)

    def check() -> tuple[bool, str]:
        last[0] = n.stack.scrape()
        return read("transmit") == n.received_bytes and read("receive") == n.sent_bytes, ""

    wait_for(check, VALUE_TIMEOUT_S)
    tx, rx = read("transmit"), read("receive")
    problems = []
    low, high = BLOB_SIZE * BLOB_REQUESTS, BLOB_SIZE * BLOB_REQUESTS * 1.1
    if tx is None or not low <= tx < high:
        problems.append(f"transmit {tx}, expected >= {low:,} and < {high:,.0f}")
    if tx != n.received_bytes:
        problems.append(f"transmit {tx}, expected exactly {n.received_bytes:,} (what the "
                        f"clients read)")
    if rx != n.sent_bytes:
        problems.append(f"receive {rx}, expected exactly {n.sent_bytes:,} (what the clients "
                        f"wrote)")
    assert not problems, ("tapwire_network_io_bytes_total: " + "; ".join(problems) + "\n"
                          + last[0].lines(("tapwire_network_", "tapwire_tcp_")) + "\n"
                          + n.stack.agent.diagnostics())


def test_tcp_connection_counts(net_run):
    """The 10 connections (one per request, closed by the server) are counted as 10 opened and
    10 closed server connections, with no retransmit and no reset on loopback."""
    n = net_run
    last = [Exposition("")]

    def values() -> dict:
        e = last[0]
        return {
            "opened": e.total("tapwire_tcp_connections_opened_total", job=n.job,
                              tapwire_connection_role="server"),
            "closed": e.total("tapwire_tcp_connections_closed_total", job=n.job,
                              tapwire_connection_role="server"),
            "retransmits": e.total("tapwire_tcp_retransmits_total", job=n.job),
            "resets": e.total("tapwire_tcp_resets_total", job=n.job),
        }

    want = {"opened": n.connections, "closed": n.connections, "retransmits": 0, "resets": 0}

    def check() -> tuple[bool, str]:
        last[0] = n.stack.scrape()
        return values() == want, ""

    ok, _ = wait_for(check, VALUE_TIMEOUT_S)
    assert ok, (f"connection counters {values()}, expected {want}\n"
                + last[0].lines(("tapwire_tcp_",)) + "\n" + n.stack.agent.diagnostics())
