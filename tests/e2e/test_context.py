"""One trace across services: a chain of four services, each in its own cgroup and network
namespace (joined by veth pairs this test creates), none with OpenTelemetry code.

    test client (root netns) -> gw (Flask, gunicorn gthread) -> proc (FastAPI, asyncio)
        -> search (Flask, gunicorn gthread) -> store (FastAPI, asyncio)

Every request /chain/<rid> carries its id down the chain, so each span can be told apart by
rid: a link between spans of different rids is a wrong link. Each service logs the
`traceparent` it received, so the header tapwire injected can be compared with the ids of the
spans it exported.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

import cgroupfs
import procs
from test_sampling import ratio_keeps

SERVICES = [  # name, kind, next hop index or None
    ("gw", "threaded"),
    ("proc", "async"),
    ("search", "threaded"),
    ("store", "async"),
]
PORT = 8000
SPANS_PER_REQUEST = 7  # 4 SERVER + 3 CLIENT
SUBNET = "10.213"


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Chain:
    netns: list[str]
    veths: list[str]
    logs: dict[str, Path]
    services: list[subprocess.Popen] = field(default_factory=list)

    @property
    def entry(self) -> str:
        return f"http://{SUBNET}.0.2:{PORT}"

    def received(self) -> dict[tuple[str, str], str | None]:
        """(service, rid) -> the traceparent that service received for that rid."""
        out = {}
        for name, path in self.logs.items():
            if path.exists():
                for line in path.read_text().splitlines():
                    entry = json.loads(line)
                    out[(name, entry["rid"])] = entry["traceparent"]
        return out


@pytest.fixture
def chain(tmp_path, cgroup, request):
    """Four services in four netns and cgroups; yields (Chain, [cgroup paths])."""
    tag = f"{os.getpid() % 100000}"
    netns = [f"twc{tag}{i}" for i in range(len(SERVICES))]
    veths = []
    chain = Chain(netns=netns, veths=veths, logs={n: tmp_path / f"{n}.headers" for n, _ in SERVICES})
    cgroups = []
    try:
        for ns in netns:
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # root <-> gw, then gw <-> proc <-> search <-> store: hop i is SUBNET.i.0/30, .1 upstream.
        for i in range(len(SERVICES)):
            a, b = f"twc{tag}{i}a", f"twc{tag}{i}b"
            run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            veths.append(a)
            up_ns = None if i == 0 else netns[i - 1]
            if up_ns:
                run("ip", "link", "set", a, "netns", up_ns)
            run("ip", "link", "set", b, "netns", netns[i])
            up = ["ip", "-n", up_ns] if up_ns else ["ip"]
            run(*up, "addr", "add", f"{SUBNET}.{i}.1/30", "dev", a)
            run(*up, "link", "set", a, "up")
            run("ip", "-n", netns[i], "addr", "add", f"{SUBNET}.{i}.2/30", "dev", b)
            run("ip", "-n", netns[i], "link", "set", b, "up")
        for i, (name, kind) in enumerate(SERVICES):
            cg = cgroup(f"chain-{name}")
            cgroups.append(cg)
            env = procs.base_env({
                "CHAIN_NAME": name,
                "CHAIN_LOG": str(chain.logs[name]),
                "OTEL_SERVICE_NAME": name,
                "PYTHONUNBUFFERED": "1",
            })
            if i + 1 < len(SERVICES):
                env["CHAIN_NEXT"] = f"http://{SUBNET}.{i + 1}.2:{PORT}"
            if kind == "threaded":
                server = [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", "16", "-w", "1",
                          "-b", f"0.0.0.0:{PORT}", "--chdir", str(procs.APPS_DIR), "chain_threaded:app"]
            else:
                server = [sys.executable, "-m", "uvicorn", "chain_async:app", "--host", "0.0.0.0",
                          "--port", str(PORT), "--app-dir", str(procs.APPS_DIR), "--log-level", "warning"]
            log = open(tmp_path / f"{name}.log", "wb")
            chain.services.append(cgroupfs.popen_in_cgroup(
                cg, ["ip", "netns", "exec", netns[i], *server], env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        for i, (name, _) in enumerate(SERVICES):
            while subprocess.run(["ip", "netns", "exec", netns[i], "curl", "-sf", "-o", "/dev/null",
                                  f"http://127.0.0.1:{PORT}/health"], timeout=10).returncode != 0:
                assert chain.services[i].poll() is None, (tmp_path / f"{name}.log").read_text()
                assert time.monotonic() < deadline, f"{name} not ready within 60 s"
                time.sleep(0.2)
        yield chain, cgroups
    finally:
        for proc in chain.services:
            proc.kill()
            proc.wait(10)
        for cg in cgroups:
            cgroupfs.kill_all(cg)
        for ns in netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def drive(chain: Chain, rids: list[str], concurrency: int, headers: dict[str, str] | None = None) -> None:
    """GET /chain/<rid> for every rid, `concurrency` at a time; every answer must be 200."""
    def one(rid: str) -> int:
        with requests.Session() as s:
            s.trust_env = False
            return s.get(f"{chain.entry}/chain/{rid}", headers=headers or {}, timeout=30).status_code
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, rids))
    assert codes == [200] * len(rids)


def rid_of(span: dict) -> str | None:
    a = span["attributes"]
    path = a.get("url.path") or a.get("url.full", "")
    marker = "/chain/"
    return path.split(marker, 1)[1] if marker in path else None


@dataclass
class Verdict:
    complete: set[str]
    wrong_links: list[str]
    # per service with outbound calls: (client spans parented to their own server span, total)
    parented: dict[str, list[int]]


def judge(spans: list[dict], rids: list[str]) -> Verdict:
    """Checks every parent link of the chain spans of `rids`.

    A rid's trace is complete when its 7 spans share one trace id and every link is right:
    gw SERVER has no parent (or the client's), each CLIENT's parent is its service's SERVER
    span of the same rid, each downstream SERVER's parent is the upstream CLIENT span.
    A wrong link is a parent that is a span of another rid, or an id that is no exported span.
    """
    by_id = {s["span_id"]: s for s in spans}
    by_rid: dict[str, list[dict]] = {}
    for s in spans:
        r = rid_of(s)
        if r is not None:
            by_rid.setdefault(r, []).append(s)
    wrong, complete = [], set()
    parented = {name: [0, 0] for name, _ in SERVICES[:-1]}
    for rid in rids:
        group = by_rid.get(rid, [])
        ok = len(group) == SPANS_PER_REQUEST and len({s["trace_id"] for s in group}) == 1
        for s in group:
            p = s["parent_span_id"]
            if p and p in by_id and rid_of(by_id[p]) != rid:
                wrong.append(f"{s['service_name']} {s['kind_name']} {rid} -> parent of rid {rid_of(by_id[p])}")
        for i, (name, _) in enumerate(SERVICES):
            server = [s for s in group if s["service_name"] == name and s["kind_name"] == "SERVER"]
            client = [s for s in group if s["service_name"] == name and s["kind_name"] == "CLIENT"]
            if len(server) != 1 or len(client) != (0 if i == len(SERVICES) - 1 else 1):
                ok = False
                continue
            if client:
                parented[name][1] += 1
                if client[0]["parent_span_id"] == server[0]["span_id"]:
                    parented[name][0] += 1
                else:
                    ok = False
            if i > 0:
                up = [s for s in group if s["service_name"] == SERVICES[i - 1][0] and s["kind_name"] == "CLIENT"]
                if not up or server[0]["parent_span_id"] != up[0]["span_id"]:
                    ok = False
        if ok:
            complete.add(rid)
    return Verdict(complete, wrong, parented)


def chain_spans(receiver, count: int, agent) -> list[dict]:
    spans = receiver.wait_for_spans(count, timeout=90, settle=1.0, diagnostics=agent.diagnostics)
    return [s for s in spans if rid_of(s) is not None]


def test_chain_one_trace_per_request(chain, tapwire, otlp_receiver):
    chain, cgroups = chain
    agent = tapwire(cgroups, env=otlp_receiver.exporter_env("grpc"))  # propagation on by default
    serial = [f"s{i}" for i in range(200)]
    parallel = [f"p{i}" for i in range(200)]
    drive(chain, serial, 1)
    drive(chain, parallel, 16)
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    given = [f"t{i}" for i in range(5)]
    for rid in given:
        drive(chain, [rid], 1, {"traceparent": f"00-{incoming_trace}-00f067aa0ba902b7-01"})
    total = (len(serial) + len(parallel) + len(given)) * SPANS_PER_REQUEST
    spans = chain_spans(otlp_receiver, total, agent)
    assert len(spans) == total, f"expected exactly {total} chain spans, got {len(spans)}"

    # Concurrency 1: every request is exactly one complete, correctly linked trace.
    v1 = judge(spans, serial)
    assert v1.wrong_links == []
    assert sorted(set(serial) - v1.complete) == [], "incomplete traces at concurrency 1"
    assert len({s["trace_id"] for s in spans if rid_of(s) in set(serial)}) == len(serial)
    # The header each downstream service received names the upstream CLIENT span exported.
    received = chain.received()
    by_rid = {}
    for s in spans:
        by_rid.setdefault(rid_of(s), []).append(s)
    for rid in serial:
        for i in range(1, len(SERVICES)):
            up = next(s for s in by_rid[rid] if s["service_name"] == SERVICES[i - 1][0] and s["kind_name"] == "CLIENT")
            assert received[(SERVICES[i][0], rid)] == f"00-{up['trace_id']}-{up['span_id']}-01"

    # Concurrency 16: never a wrong link; report the correct share per runtime.
    v16 = judge(spans, parallel)
    assert v16.wrong_links == [], v16.wrong_links[:10]
    shares = {name: f"{ok}/{n}" for name, (ok, n) in v16.parented.items()}
    print(f"\ncontext propagation, concurrency 16: complete traces {len(v16.complete)}/{len(parallel)}; "
          f"client spans parented per service {shares} (gw, search threaded; proc asyncio)")
    # Thread-per-request services know the request on the sending thread: always parented.
    for name, kind in SERVICES[:-1]:
        if kind == "threaded":
            assert v16.parented[name][0] == v16.parented[name][1] == len(parallel), (name, v16.parented[name])

    # An incoming traceparent: that trace id end to end, the gw SERVER span its child.
    vt = judge(spans, given)
    assert vt.complete == set(given)
    for s in spans:
        if rid_of(s) in set(given):
            assert s["trace_id"] == incoming_trace
            if s["service_name"] == "gw" and s["kind_name"] == "SERVER":
                assert s["parent_span_id"] == "00f067aa0ba902b7"


def test_chain_application_traceparent_names_the_client_span(chain, tapwire, otlp_receiver):
    """search (threaded) sends its own traceparent for rids starting with "own": the incoming
    trace id and a span id it made, as an application with its own tracing would. Its CLIENT
    span takes that span id (so store's SERVER span, whose parent the header names, nests under
    it) and stays the child of search's SERVER span: every trace is still complete."""
    chain, cgroups = chain
    agent = tapwire(cgroups, env=otlp_receiver.exporter_env("grpc"))
    rids = [f"own{i}" for i in range(20)]
    drive(chain, rids, 1)
    spans = chain_spans(otlp_receiver, len(rids) * SPANS_PER_REQUEST, agent)
    v = judge(spans, rids)
    assert v.wrong_links == [], v.wrong_links
    assert v.complete == set(rids), f"incomplete: {sorted(set(rids) - v.complete)}"
    received = chain.received()
    for rid in rids:
        sent = received[("store", rid)]  # the header search's application made
        client = [s for s in spans if rid_of(s) == rid and s["service_name"] == "search"
                  and s["kind_name"] == "CLIENT"]
        assert [c["span_id"] for c in client] == [sent[36:52]], (rid, sent, client)
        assert received[("search", rid)][36:52] != sent[36:52]  # a new id, not the incoming one


def test_injected_header_carries_the_sampling_decision(chain, tapwire, otlp_receiver):
    """traceidratio 0.5: the sampled flag of every traceparent tapwire injects is the ratio
    rule's decision for its trace id, the same on every hop, and the traces marked sampled are
    exactly the ones exported (downstream services and SDKs agree with tapwire)."""
    chain, cgroups = chain
    agent = tapwire(cgroups, env={**otlp_receiver.exporter_env("grpc"), "OTEL_TRACES_SAMPLER": "traceidratio",
                                  "OTEL_TRACES_SAMPLER_ARG": "0.5", "TAPWIRE_KEEP_ERRORS": "false"})
    rids = [f"r{i}" for i in range(40)]
    drive(chain, rids, 1)
    received = chain.received()
    kept = set()
    for rid in rids:
        hops = [received[(name, rid)] for name, _ in SERVICES[1:]]
        trace = hops[0][3:35]
        assert all(h is not None and h[3:35] == trace for h in hops), (rid, hops)
        flag = "01" if ratio_keeps(trace, 0.5) else "00"
        assert [h[53:55] for h in hops] == [flag] * len(hops), (rid, hops)
        if flag == "01":
            kept.add(trace)
    print(f"\ntraceidratio 0.5: {len(kept)} of {len(rids)} injected headers marked sampled")
    assert 0 < len(kept) < len(rids)  # both decisions seen (fails with probability 2^-39)
    spans = chain_spans(otlp_receiver, len(kept) * SPANS_PER_REQUEST, agent)
    time.sleep(2)  # anything else exported would arrive by now
    spans = [s for s in otlp_receiver.spans() if rid_of(s) in set(rids)]
    assert len(spans) == len(kept) * SPANS_PER_REQUEST
    assert {s["trace_id"] for s in spans} == kept


def test_chain_propagation_off_injects_nothing(chain, tapwire, otlp_receiver):
    chain, cgroups = chain
    agent = tapwire(cgroups, env={**otlp_receiver.exporter_env("grpc"), "TAPWIRE_CONTEXT_PROPAGATION": "off"})
    names = {procs.loaded_programs().get(i) for i in procs.programs_of(agent.pid)}
    assert not names & {"inject_traceparent", "client_sockets", "client_receive"}, names
    rids = [f"o{i}" for i in range(20)]
    drive(chain, rids, 1)
    spans = chain_spans(otlp_receiver, len(rids) * SPANS_PER_REQUEST, agent)
    assert len(spans) == len(rids) * SPANS_PER_REQUEST
    received = chain.received()
    assert all(received[(name, rid)] is None for name, _ in SERVICES for rid in rids)
    # Still one process's CLIENT span nests under its SERVER span; the chain is not joined.
    v = judge(spans, rids)
    assert v.wrong_links == []
    assert all(ok == n == len(rids) for ok, n in v.parented.values()), v.parented
    assert len({s["trace_id"] for s in spans}) == len(rids) * len(SERVICES)
