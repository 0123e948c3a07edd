"""Selection end to end: cgroup globs watched with inotify, exclusions, per-process criteria and
the service's own OTEL_SERVICE_NAME, checked by exact span counts at an OTLP receiver.

Every cgroup here is tapwire-e2e-<name>-<pytest pid>, so the globs below match this test's
cgroups only, whatever else runs on the machine.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections import Counter

import requests

import procs

N = 5  # requests per service
SPANS_TIMEOUT_S = 20
SETTLE_S = 1.5  # after the expected spans arrived, time for any unexpected extra to show up


def server_paths(spans, service_name=None):
    return [s["attributes"].get("url.path") for s in spans
            if s["kind_name"] == "SERVER" and (service_name is None or s["service_name"] == service_name)]


def get(port: int, path: str) -> None:
    r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    assert r.status_code == 200, (path, r.status_code, r.text)


def test_new_cgroup_is_traced_from_its_first_request(cgroup, start_in_cgroup, tapwire, otlp_receiver):
    """A cgroup created after tapwire started, matching its glob, is watched within 1 s: the
    very first request of the service started in it has its span."""
    pid = os.getpid()
    agent = tapwire([f"/tapwire-e2e-late-*-{pid}"], env=otlp_receiver.exporter_env("grpc"))
    port = procs.free_port()
    created = time.monotonic()
    cg = cgroup("late-a")
    start_in_cgroup(cg, [sys.executable, str(procs.APPS_DIR / "tiny_http.py"), str(port)])
    # Ready = accepts a TCP connection (no HTTP request: the first request is the test's).
    deadline = created + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "tiny_http.py never listened"
            time.sleep(0.005)
    first_request_after = time.monotonic() - created
    path = f"/first-{uuid.uuid4().hex[:8]}"
    get(port, path)
    spans = otlp_receiver.wait_for_spans(1, SPANS_TIMEOUT_S, settle=SETTLE_S, diagnostics=agent.diagnostics)
    assert first_request_after < 1.0, (
        f"the service answered its first connection {first_request_after:.2f}s after its cgroup "
        "was created: this test checks pick-up within 1 s, so the first request must come sooner")
    assert server_paths(spans) == [path], otlp_receiver.describe(
        f"expected exactly the first request's span ({path}), "
        f"{first_request_after * 1000:.0f} ms after the cgroup was created", agent.diagnostics)
    assert spans[0]["service_name"] == cg.name


def test_glob_selects_two_of_three(cgroup, fastapi_service, tapwire, otlp_receiver):
    pid = os.getpid()
    services = {name: fastapi_service(cgroup(name), label=name) for name in ("pick-one", "pick-two", "other")}
    agent = tapwire([f"tapwire-e2e-pick-*-{pid}"], env=otlp_receiver.exporter_env("http/protobuf"))
    for name, svc in services.items():
        for i in range(N):
            get(svc.port, f"/items/{i}")
    spans = otlp_receiver.wait_for_spans(2 * N, SPANS_TIMEOUT_S, settle=SETTLE_S, diagnostics=agent.diagnostics)
    counts = Counter(s["service_name"] for s in spans if s["kind_name"] == "SERVER")
    want = {f"tapwire-e2e-pick-one-{pid}": N, f"tapwire-e2e-pick-two-{pid}": N}
    assert counts == want, otlp_receiver.describe(f"span counts {dict(counts)}, expected {want}", agent.diagnostics)


def test_exclusions_and_the_services_own_name(cgroup, fastapi_service, tapwire, otlp_receiver):
    """--exclude-cgroup and the default exclusion of processes exporting OTLP themselves yield
    nothing; OTEL_SERVICE_NAME in a service's environment names it."""
    pid = os.getpid()
    plain = fastapi_service(cgroup("sel-plain"), label="plain")
    named = fastapi_service(cgroup("sel-named"), env={"OTEL_SERVICE_NAME": "checkout"}, label="named")
    excluded = fastapi_service(cgroup("sel-excluded"), label="excluded")
    # Configured to export OTLP (to a port where nothing listens: it never gets that far).
    sdk = fastapi_service(cgroup("sel-sdk"), env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
                          label="sdk")
    env = {**otlp_receiver.exporter_env("grpc"), "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=e2e"}
    agent = tapwire([f"/tapwire-e2e-sel-*-{pid}"], env=env,
                    args=["--exclude-cgroup", f"/tapwire-e2e-sel-excluded-{pid}"])
    for svc in (plain, named, excluded, sdk):
        for i in range(N):
            get(svc.port, f"/items/{i}")
    spans = otlp_receiver.wait_for_spans(2 * N, SPANS_TIMEOUT_S, settle=SETTLE_S, diagnostics=agent.diagnostics)
    counts = Counter(s["service_name"] for s in spans if s["kind_name"] == "SERVER")
    want = {f"tapwire-e2e-sel-plain-{pid}": N, "checkout": N}
    assert counts == want, otlp_receiver.describe(f"span counts {dict(counts)}, expected {want}", agent.diagnostics)
    assert "not watching a process that exports OTLP itself" in agent.diagnostics()
    # The agent's own OTEL_RESOURCE_ATTRIBUTES are on every service it reports.
    assert {s["resource"].get("deployment.environment.name") for s in spans} == {"e2e"}


def test_port_selects_one_process_of_a_cgroup(cgroup, fastapi_service, tapwire, otlp_receiver):
    """Two services in one cgroup: --port keeps the one listening there (per-process kernel
    filter), --exe with a glob that both match changes nothing."""
    shared = cgroup("sel-ports")
    wanted = fastapi_service(shared, label="wanted")
    other = fastapi_service(shared, label="other")
    agent = tapwire([shared], env=otlp_receiver.exporter_env("grpc"),
                    args=["--port", str(wanted.port), "--exe", "python3*"])
    for svc in (wanted, other):
        for i in range(N):
            get(svc.port, f"/items/{i}")
    spans = otlp_receiver.wait_for_spans(N, SPANS_TIMEOUT_S, settle=SETTLE_S, diagnostics=agent.diagnostics)
    ports = Counter(s["attributes"].get("server.port") for s in spans if s["kind_name"] == "SERVER")
    assert ports == {wanted.port: N}, otlp_receiver.describe(
        f"spans per server.port {dict(ports)}, expected only {wanted.port} x {N}", agent.diagnostics)
