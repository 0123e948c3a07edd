"""Sampling end to end: which spans leave the agent, and that metrics never depend on it.

The head-sampling rule is recomputed here, independently of the agent, from the trace ids:
a ratio sampler keeps a trace iff R >= T, R = the 56 low bits of the trace id (bytes 9..16,
big-endian), T = round((1 - ratio) * 2^56). Clients send their own `traceparent` with random
trace ids, so the test knows exactly which traces must be exported.

    ratio run (one service, OTEL_TRACES_SAMPLER=traceidratio, ratio 0.1, one agent):
      A  2000 x GET /items/{i}, client traceparent, random ids and random sampled flags
         (traceidratio ignores the parent's flag)
      B   300 x GET /items/{i} without traceparent: the agent draws the trace ids
      C    60 x GET /fail (500) with ids the ratio drops, 10 with ids it keeps
      D    30 x GET /items/{i}?delay_ms=250 and 30 x ?delay_ms=30, ids the ratio drops, with
         --keep-slower-than SERVICE:/items/{id}=150ms (and a 5 s rule for everything, which the
         more specific one overrides)
    always_off run: 150 OK + 50 errors with TAPWIRE_KEEP_ERRORS=false: no span, every metric
    chain run (front -> backend, one agent watching both): the same trace ids kept by both
      services, for traceidratio and parentbased_traceidratio

Loopback only; every load loop and wait is bounded. Failures carry the agent's stderr tail.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import requests

import cgroupfs
import procs
from otlp_receiver import OtlpReceiver

V4 = "127.0.0.1"
TWO_56 = 1 << 56
KEPT_BY = "tapwire.sampling.kept_by"
SERVER, CLIENT = 2, 3  # OTLP SpanKind
SETTLE_TIMEOUT_S = 30.0
CONCURRENCY = 4
LOAD_DEADLINE_S = 120.0


# ---- the rule, recomputed -----------------------------------------------------------------------

def threshold(ratio: float) -> int:
    """T = round((1 - ratio) * 2^56), half away from zero like Rust's f64::round, in [0, 2^56]."""
    return min(max(math.floor((1.0 - ratio) * TWO_56 + 0.5), 0), TWO_56)


def randomness(trace_id: str) -> int:
    """R: the 56 least significant bits of the trace id (hex), i.e. bytes 9..16."""
    return int(trace_id[18:32], 16)


def ratio_keeps(trace_id: str, ratio: float) -> bool:
    return randomness(trace_id) >= threshold(ratio)


def binomial_interval(n: int, p: float, confidence: float = 0.999) -> tuple[int, int]:
    """The central `confidence` interval [lo, hi] of Binomial(n, p), exactly (from the pmf)."""
    tail = (1.0 - confidence) / 2
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(n + 1)]
    cdf, lo, hi = 0.0, None, n
    for k, lp in enumerate(log_pmf):
        cdf += math.exp(lp)
        if lo is None and cdf > tail:
            lo = k
        if cdf >= 1.0 - tail:
            hi = k
            break
    return lo, hi


def keep_probability(ratio: float) -> float:
    return (TWO_56 - threshold(ratio)) / TWO_56


def random_trace_id(ratio: float | None = None, kept: bool | None = None) -> str:
    """A random non-zero trace id; with `kept`, one the ratio keeps (True) or drops (False)."""
    while True:
        trace_id = os.urandom(16).hex()
        if int(trace_id, 16) == 0:
            continue
        if kept is None or ratio_keeps(trace_id, ratio) == kept:
            return trace_id


def traceparent(trace_id: str, sampled: bool) -> str:
    span_id = os.urandom(8).hex()
    while int(span_id, 16) == 0:
        span_id = os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


# ---- unit checks of the helpers above (they must agree with agent/src/sampling/rule.rs) ---------

def test_rule_helpers_match_the_agent():
    # Values asserted by the agent's own unit tests (rule.rs).
    assert threshold(0.1) == 64_851_834_634_135_144
    assert threshold(0.5) == 1 << 55 and threshold(1.0) == 0 and threshold(0.0) == TWO_56
    assert randomness("4bf92f3577b34da6a3ce929d0e0e4736") == 0xce929d0e0e4736
    assert randomness("0000000000000000ff00000000000001") == 1
    lo, hi = binomial_interval(2000, 0.1)
    # Normal approximation: 200 +- 3.29 * sqrt(180) = [156, 244].
    assert 150 <= lo <= 160 and 240 <= hi <= 250, (lo, hi)


# ---- processes ----------------------------------------------------------------------------------

class Requests:
    """Sends planned requests CONCURRENCY at a time on kept-alive sessions; bounded in time."""

    def __init__(self):
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self.local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # loopback only, whatever proxy the environment names
            self.local.session = s
            with self.lock:
                self.sessions.append(s)
        return s

    def run(self, plan: list[tuple[str, dict[str, str]]]) -> list[int]:
        deadline = time.monotonic() + LOAD_DEADLINE_S

        def one(item: tuple[str, dict[str, str]]) -> int:
            if time.monotonic() > deadline:
                raise AssertionError(f"the load did not finish within {LOAD_DEADLINE_S:.0f}s")
            url, headers = item
            return self.session().get(url, headers=headers, timeout=10).status_code

        try:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                return list(pool.map(one, plan))
        finally:
            for s in self.sessions:
                s.close()


class Stack:
    """Cgroups, services, one agent and one OTLP receiver. Teardown: agent (SIGTERM, exit 0),
    receiver, services, cgroups."""

    def __init__(self, tapwire_bin: str, cgroup2_root: Path, workdir: Path, name: str):
        self.tapwire_bin, self.root, self.workdir, self.name = tapwire_bin, cgroup2_root, workdir, name
        self.cgroups: list[Path] = []
        self.services: list[procs.ServiceProcess] = []
        self.agent: procs.TapwireProcess | None = None
        self.receiver = OtlpReceiver().start()
        self.prometheus_port = 0

    def service(self, app: str, role: str, env: dict[str, str]) -> procs.ServiceProcess:
        cgroup = cgroupfs.create(f"tapwire-e2e-sampling-{self.name}-{role}-{os.getpid()}", self.root)
        self.cgroups.append(cgroup)
        service = procs.start_http_service(
            lambda port: [sys.executable, "-m", "uvicorn", app, "--app-dir", str(procs.APPS_DIR),
                          "--host", V4, "--port", port, "--http", "h11", "--loop", "asyncio",
                          "--no-access-log", "--log-level", "warning"],
            self.workdir, f"{self.name}-{role}", cgroup=cgroup, env=env, hosts=(V4,))
        self.services.append(service)
        return service

    def start_agent(self, env: dict[str, str], args: list[str]) -> procs.TapwireProcess:
        self.prometheus_port = procs.free_port()
        env = {**self.receiver.exporter_env("grpc"), "OTEL_METRIC_EXPORT_INTERVAL": "1000", **env}
        self.agent = procs.TapwireProcess(
            self.tapwire_bin, [str(c) for c in self.cgroups], procs.base_env(env), self.workdir,
            label=f"tapwire-{self.name}",
            extra_args=["--prometheus-listen", f"{V4}:{self.prometheus_port}", *args])
        self.agent.start()
        return self.agent

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """The agent's Prometheus exposition as {(name, labels): value}."""
        session = requests.Session()
        session.trust_env = False
        try:
            text = session.get(f"http://{V4}:{self.prometheus_port}/metrics", timeout=5).text
        finally:
            session.close()
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            name, _, labels = head.partition("{")
            pairs = frozenset(tuple(kv.split("=", 1)) for kv in _split_labels(labels.rstrip("}")))
            out[(name, pairs)] = float(value)
        return out

    def diagnostics(self) -> str:
        parts = [self.agent.diagnostics()] if self.agent else ["(no agent started)"]
        return "\n".join(parts + [s.diagnostics() for s in self.services])

    def close(self) -> None:
        errors = []
        if self.agent is not None and self.agent.proc is not None:
            try:
                code = self.agent.stop()
                if code != 0:
                    errors.append(f"{self.agent.label} exited with {code}\n{self.agent.diagnostics()}")
            except AssertionError as err:
                errors.append(str(err))
        self.receiver.stop()
        for service in reversed(self.services):
            service.stop()
        for path in reversed(self.cgroups):
            cgroupfs.remove(path)
        assert not errors, "\n".join(errors)


def _split_labels(text: str) -> list[str]:
    """`a="x",b="y,z"` -> ['a=x', 'b=y,z'] (values unquoted; tapwire escapes no quote here)."""
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
            continue
        if ch == "," and not quoted:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur:
        out.append(cur)
    return out


def total(expo: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in expo.items() if n == name and want <= set(ls))


@contextlib.contextmanager
def stack(tapwire_bin, cgroup2_root, tmp_path_factory, name: str):
    built = Stack(tapwire_bin, cgroup2_root, tmp_path_factory.mktemp(f"sampling-{name}"), name)
    try:
        yield built
    finally:
        built.close()


def settle(s: Stack, created: int) -> dict:
    """Waits until the agent built `created` spans and the receiver holds every span the agent
    exported (created - sampled_out), then 1.5 s more; returns the last scrape."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    detail = ""
    while time.monotonic() < deadline:
        expo = s.scrape()
        got = {state: total(expo, "tapwire_agent_spans_total", job="tapwire", state=state)
               for state in ("created", "sampled_out", "exported")}
        detail = f"agent {got}, receiver {s.receiver.span_count()} spans, wanted created={created}"
        if got["created"] == created and got["exported"] == created - got["sampled_out"] \
                == s.receiver.span_count():
            time.sleep(1.5)
            return s.scrape()
        time.sleep(0.25)
    raise AssertionError(f"spans did not settle in {SETTLE_TIMEOUT_S:.0f}s: {detail}\n"
                         f"{s.diagnostics()}")


# ---- ratio run ----------------------------------------------------------------------------------

RATIO = 0.1
SHOP = "sampling-shop"
N_A, N_B, N_ERR_DROP, N_ERR_KEEP, N_SLOW, N_FAST = 2000, 300, 60, 10, 30, 30
SLOW_MS, FAST_MS, ROUTE_THRESHOLD = 250, 30, "150ms"


class RatioRun:
    def __init__(self, stack: Stack, plan: dict, expo: dict):
        self.stack, self.plan, self.expo = stack, plan, expo
        self.spans = stack.receiver.spans()
        self.by_trace: dict[str, list[dict]] = {}
        for span in self.spans:
            self.by_trace.setdefault(span["trace_id"], []).append(span)

    def fail_if(self, problems: list[str], what: str) -> None:
        if problems:
            shown = "\n  ".join(problems[:40])
            more = f"\n  ... {len(problems) - 40} more" if len(problems) > 40 else ""
            pytest.fail(f"{what}: {len(problems)} problems\n  {shown}{more}\n"
                        f"{self.stack.diagnostics()}", pytrace=False)


@pytest.fixture(scope="module")
def ratio_run(tapwire_bin, cgroup2_root, tmp_path_factory):
    with stack(tapwire_bin, cgroup2_root, tmp_path_factory, "ratio") as s:
        shop = s.service("fastapi_app:app", "shop", {"OTEL_SERVICE_NAME": SHOP})
        s.start_agent({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(RATIO)},
                      ["--keep-slower-than", "5s",
                       "--keep-slower-than", f"{SHOP}:/items/{{id}}={ROUTE_THRESHOLD}"])
        rng = random.Random()
        plan: dict[str, list[tuple[str, dict[str, str]]]] = {
            "A": [], "B": [], "err_drop": [], "err_keep": [], "slow": [], "fast": []}
        ids: dict[str, list[str]] = {k: [] for k in plan}

        def add(group: str, path: str, trace_id: str | None, sampled: bool = True):
            headers = {} if trace_id is None else {"traceparent": traceparent(trace_id, sampled)}
            plan[group].append((shop.url(path), headers))
            if trace_id is not None:
                ids[group].append(trace_id)

        for i in range(N_A):
            add("A", f"/items/{i}", random_trace_id(), sampled=rng.random() < 0.5)
        for i in range(N_B):
            add("B", f"/items/{i}", None)
        for _ in range(N_ERR_DROP):
            add("err_drop", "/fail", random_trace_id(RATIO, kept=False))
        for _ in range(N_ERR_KEEP):
            add("err_keep", "/fail", random_trace_id(RATIO, kept=True))
        for i in range(N_SLOW):
            add("slow", f"/items/{i}?delay_ms={SLOW_MS}", random_trace_id(RATIO, kept=False))
        for i in range(N_FAST):
            add("fast", f"/items/{i}?delay_ms={FAST_MS}", random_trace_id(RATIO, kept=False))
        everything = [(g, item) for g, items in plan.items() for item in items]
        rng.shuffle(everything)
        statuses = Requests().run([item for _, item in everything])
        wrong = [(g, item[0], st) for (g, item), st in zip(everything, statuses)
                 if st != (500 if g.startswith("err") else 200)]
        assert not wrong, f"unexpected statuses: {wrong[:10]}"
        expo = settle(s, len(everything))
        yield RatioRun(s, ids, expo)


def test_ratio_exports_exactly_the_traces_the_rule_keeps(ratio_run):
    """Client-chosen ids: the exported traces are exactly those with R >= T (whatever the
    sampled flag the client sent), their count is within the binomial 99.9% interval, and each
    exported span says sampled in its flags."""
    run = ratio_run
    sent = run.plan["A"]
    expected = {t for t in sent if ratio_keeps(t, RATIO)}
    exported = {t for t in sent if t in run.by_trace}
    problems = [f"trace {t} exported, the rule drops it (R={randomness(t)})"
                for t in sorted(exported - expected)]
    problems += [f"trace {t} missing, the rule keeps it (R={randomness(t)})"
                 for t in sorted(expected - exported)]
    lo, hi = binomial_interval(N_A, keep_probability(RATIO))
    if not lo <= len(exported) <= hi:
        problems.append(f"{len(exported)} of {N_A} traces exported, outside the binomial 99.9% "
                        f"interval [{lo}, {hi}] for p={keep_probability(RATIO):.6f}")
    for t in exported:
        for span in run.by_trace[t]:
            if span["flags"] & 1 != 1 or KEPT_BY in span["attributes"] or span["kind"] != SERVER:
                problems.append(f"trace {t}: flags {span['flags']:#x}, kind {span['kind_name']}, "
                                f"attributes {span['attributes']}")
        if len(run.by_trace[t]) != 1:
            problems.append(f"trace {t}: {len(run.by_trace[t])} spans, expected 1")
    print(f"traceidratio {RATIO}: {len(exported)} of {N_A} client traces exported, "
          f"99.9% interval [{lo}, {hi}]")
    run.fail_if(problems, "traceidratio sampling")


def test_ratio_applies_to_ids_the_agent_draws(ratio_run):
    """Requests without traceparent: every exported trace id satisfies the rule and the count
    is within the binomial interval; nothing else was exported."""
    run = ratio_run
    sent = {t for ids in run.plan.values() for t in ids}
    own = [t for t in run.by_trace if t not in sent]
    problems = [f"agent-drawn trace {t} exported, the rule drops it" for t in own
                if not ratio_keeps(t, RATIO)]
    problems += [f"trace {t}: {run.by_trace[t]}" for t in own
                 if len(run.by_trace[t]) != 1 or run.by_trace[t][0]["attributes"].get("url.path", "")
                 .split("/")[1:2] != ["items"]]
    lo, hi = binomial_interval(N_B, keep_probability(RATIO))
    if not lo <= len(own) <= hi:
        problems.append(f"{len(own)} of {N_B} agent-drawn traces exported, outside [{lo}, {hi}]")
    print(f"agent-drawn ids: {len(own)} of {N_B} exported, 99.9% interval [{lo}, {hi}]")
    run.fail_if(problems, "sampling of agent-drawn trace ids")


def test_every_error_is_exported(ratio_run):
    """Errors whose trace the ratio drops are exported with kept_by=error and the sampled flag
    clear; errors it keeps are exported unmarked."""
    run = ratio_run
    problems = []
    for group, marked in (("err_drop", True), ("err_keep", False)):
        for t in run.plan[group]:
            spans = run.by_trace.get(t, [])
            if len(spans) != 1:
                problems.append(f"{group} trace {t}: {len(spans)} spans exported, expected 1")
                continue
            span = spans[0]
            want = ("error", 0) if marked else (None, 1)
            got = (span["attributes"].get(KEPT_BY), span["flags"] & 1)
            if got != want or span["status_name"] != "ERROR" \
                    or span["attributes"].get("http.response.status_code") != 500:
                problems.append(f"{group} trace {t}: kept_by/sampled {got}, expected {want}; "
                                f"status {span['status_name']}, attributes {span['attributes']}")
    run.fail_if(problems, "errors kept")


def test_every_slow_request_is_exported(ratio_run):
    """Requests slower than the route's threshold (150 ms) are exported with kept_by=latency;
    30 ms requests on the same route, dropped by the ratio, are not (the 5 s rule for every
    route is less specific and does not apply)."""
    run = ratio_run
    problems = []
    for t in run.plan["slow"]:
        spans = run.by_trace.get(t, [])
        if len(spans) != 1 or spans[0]["attributes"].get(KEPT_BY) != "latency" \
                or spans[0]["duration_ns"] < SLOW_MS * 1_000_000:
            problems.append(f"slow trace {t}: {spans}")
    for t in run.plan["fast"]:
        if t in run.by_trace:
            problems.append(f"fast trace {t} exported: {run.by_trace[t]}")
    run.fail_if(problems, "slow requests kept")


def test_metrics_count_every_request(ratio_run):
    """RED counts are exact although about 90% of the traces were dropped, and the agent's own
    counters add up: sampled out + exported = created, kept by rule = 60 errors + 30 slow."""
    run, expo = ratio_run, ratio_run.expo
    count = "http_server_request_duration_seconds_count"
    ok = total(expo, count, job=SHOP, http_route="/items/{id}", http_response_status_code="200")
    failed = total(expo, count, job=SHOP, http_route="/fail", http_response_status_code="500")
    n_ok = N_A + N_B + N_SLOW + N_FAST
    n_err = N_ERR_DROP + N_ERR_KEEP
    created = total(expo, "tapwire_agent_spans_total", job="tapwire", state="created")
    sampled_out = total(expo, "tapwire_agent_spans_total", job="tapwire", state="sampled_out")
    exported = total(expo, "tapwire_agent_spans_total", job="tapwire", state="exported")
    kept = {rule: total(expo, "tapwire_agent_spans_kept_total", job="tapwire",
                        tapwire_sampling_kept_by=rule) for rule in ("error", "latency")}
    received = len(run.spans)
    got = {"items 200": ok, "fail 500": failed, "created": created,
           "sampled_out + exported": sampled_out + exported, "exported": exported,
           "kept": kept, "lost events": total(expo, "tapwire_agent_events_lost_total")}
    want = {"items 200": n_ok, "fail 500": n_err, "created": n_ok + n_err,
            "sampled_out + exported": n_ok + n_err, "exported": received,
            "kept": {"error": N_ERR_DROP, "latency": N_SLOW}, "lost events": 0}
    print(f"RED {ok:g} + {failed:g} requests counted; {sampled_out:g} spans sampled out, "
          f"{exported:g} exported")
    problems = [f"{k}: {got[k]}, expected {want[k]}" for k in want if got[k] != want[k]]
    if sampled_out < 0.8 * (n_ok + n_err):
        problems.append(f"only {sampled_out:g} spans sampled out: expected about 90%")
    run.fail_if(problems, "metrics from every request")


# ---- always_off ---------------------------------------------------------------------------------

def test_always_off_exports_no_span_yet_every_metric(tapwire_bin, cgroup2_root, tmp_path_factory):
    """always_off with the error rule off: 200 requests, OTLP metrics count all of them, the
    receiver gets no span at all (also after the final flush at SIGTERM)."""
    with stack(tapwire_bin, cgroup2_root, tmp_path_factory, "off") as s:
        shop = s.service("fastapi_app:app", "shop", {"OTEL_SERVICE_NAME": "sampling-off"})
        s.start_agent({"OTEL_TRACES_SAMPLER": "always_off", "TAPWIRE_KEEP_ERRORS": "false"}, [])
        plan = [(shop.url(f"/items/{i}"), {}) for i in range(150)] + \
               [(shop.url("/fail"), {}) for _ in range(50)]
        random.shuffle(plan)
        statuses = Requests().run(plan)
        assert sorted(statuses) == [200] * 150 + [500] * 50
        settle(s, 200)

        def otlp_counts() -> dict:
            out = {}
            for p in s.receiver.latest_metric_points("http.server.request.duration"):
                if p["service_name"] == "sampling-off":
                    code = p["attributes"].get("http.response.status_code")
                    out[code] = out.get(code, 0) + p["count"]
            return out

        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while otlp_counts() != {200: 150, 500: 50} and time.monotonic() < deadline:
            time.sleep(0.25)
        counts = otlp_counts()
        s.agent.stop()
        expo_spans = s.receiver.span_count()
        assert counts == {200: 150, 500: 50}, \
            f"OTLP request counts {counts}, expected 150 x 200 and 50 x 500\n{s.diagnostics()}"
        assert expo_spans == 0, s.receiver.describe("always_off exported spans", s.diagnostics)
        final = {p["attributes"].get("state"): p["value"]
                 for p in s.receiver.latest_metric_points("tapwire.agent.spans")}
        assert {k: final.get(k) for k in ("created", "sampled_out", "exported")} == \
            {"created": 200, "sampled_out": 200, "exported": 0}, f"agent spans {final}"


# ---- two-service chain --------------------------------------------------------------------------

CHAIN_REQUESTS = 300


@pytest.mark.parametrize("sampler,ratio", [("traceidratio", 0.1), ("parentbased_traceidratio", 0.5)])
def test_chain_keeps_the_same_traces_in_both_services(tapwire_bin, cgroup2_root, tmp_path_factory,
                                                      sampler, ratio):
    """front -> backend, each in its own cgroup, one agent. The client sends a traceparent with
    random ids and a random sampled flag; front forwards it to backend. The exported trace ids
    of front's SERVER and CLIENT spans and of backend's SERVER spans are the same set: the
    ratio rule's for traceidratio, the sampled flag's for parentbased_traceidratio."""
    with stack(tapwire_bin, cgroup2_root, tmp_path_factory, f"chain-{sampler}") as s:
        backend = s.service("fastapi_app:app", "backend", {"OTEL_SERVICE_NAME": "chain-backend"})
        front = s.service("sampling_front:app", "front",
                          {"OTEL_SERVICE_NAME": "chain-front", "BACKEND_URL": backend.base_url,
                           "FORWARD_TRACEPARENT": "1"})
        s.start_agent({"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": str(ratio),
                       "TAPWIRE_KEEP_ERRORS": "false"}, [])
        sent = [(random_trace_id(), random.random() < 0.5) for _ in range(CHAIN_REQUESTS)]
        plan = [(front.url(f"/front/{i}"), {"traceparent": traceparent(t, flag)})
                for i, (t, flag) in enumerate(sent)]
        statuses = Requests().run(plan)
        assert statuses == [200] * CHAIN_REQUESTS
        settle(s, 3 * CHAIN_REQUESTS)
        if sampler == "traceidratio":
            expected = {t for t, _ in sent if ratio_keeps(t, ratio)}
        else:
            expected = {t for t, flag in sent if flag}
        kept = {key: set() for key in ("front server", "front client", "backend server")}
        for span in s.receiver.spans():
            role = "front" if span["service_name"] == "chain-front" else "backend"
            kept[f"{role} {'server' if span['kind'] == SERVER else 'client'}"].add(span["trace_id"])
        problems = []
        for key, ids in kept.items():
            if ids != expected:
                problems.append(f"{key}: {len(ids)} traces, expected {len(expected)}; "
                                f"{len(ids - expected)} unexpected, {len(expected - ids)} missing")
        print(f"{sampler} {ratio}: {len(expected)} of {CHAIN_REQUESTS} traces kept in both services")
        assert not problems, "\n".join(problems) + "\n" + s.diagnostics()


# ---- bad settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("env,args,message", [
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, [],
     'OTEL_TRACES_SAMPLER="sometimes": unknown sampler, expected one of always_on, always_off, '
     'traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio'),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, [],
     'OTEL_TRACES_SAMPLER_ARG="1.5": traceidratio takes a sampling ratio between 0 and 1'),
    ({"OTEL_TRACES_SAMPLER": "always_on"}, ["--traces-sampler", "parentbased_traceidratio",
                                            "--traces-sampler-arg", "ten percent"],
     '--traces-sampler-arg="ten percent": parentbased_traceidratio takes a sampling ratio'),
    ({"TAPWIRE_KEEP_SLOWER_THAN": "checkout=fast"}, [],
     'TAPWIRE_KEEP_SLOWER_THAN="checkout=fast": "fast" is not a duration'),
    ({"TAPWIRE_KEEP_ERRORS": "sometimes"}, [],
     'TAPWIRE_KEEP_ERRORS="sometimes": expected true or false'),
])
def test_bad_sampling_settings_stop_the_agent_with_their_name(tapwire_bin, cgroup, env, args,
                                                              message):
    """A bad sampler, ratio or keep rule: `tapwire run` exits 1 before loading anything, with
    one error line naming the variable or flag and the value."""
    path = cgroup("sampling-bad")
    proc = subprocess.run([tapwire_bin, "run", "--cgroup", str(path), *args],
                          env=procs.base_env({"TAPWIRE_EXPORTER": "none", **env}),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stderr}"
    assert message in proc.stderr, proc.stderr
    assert "capture ready" not in proc.stderr, proc.stderr
