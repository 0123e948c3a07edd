"""Redaction by default: secrets that cross a watched service never leave tapwire.

apps/secrets_app.py runs in a watched cgroup; the test calls its /forward with secrets in
Authorization, Proxy-Authorization, Cookie, X-Api-Key and the query string; /forward calls the
service's own /login with other secrets in the same places and a secret form body; /login answers
with a secret Set-Cookie and a secret in its body, /forward with another Set-Cookie. That is two
SERVER spans and one CLIENT span, with secrets on both sides of both directions.

Every secret starts with one random seed. Three agents watch the service with every export
turned on and logs at debug level, and the test then looks for the seed in everything they put
out: the raw OTLP protobuf bytes the receiver got (traces over gRPC and metrics over HTTP from
one agent, the other way round from the second), the Prometheus scrape, the console exporter's
spans and metrics (third agent), and every agent's stdout and stderr. It must be nowhere. The
spans themselves must be there, with the query shown as REDACTED, so the search is not vacuous.
"""

from __future__ import annotations

import re
import secrets
import sys
import time

import requests

import procs
from test_metrics import scrape

SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")
SPANS_TIMEOUT_S = 30
CALLS = 5
CONSOLE_SPANS = {("SERVER", "GET /forward"): CALLS, ("SERVER", "POST /login"): CALLS,
                 ("CLIENT", "POST"): CALLS}


def console_spans(stdout: str) -> dict[tuple[str, str], int]:
    """(kind, name) -> count of the console exporter's span lines (`SERVER svc  GET /x  ...`)."""
    out: dict[tuple[str, str], int] = {}
    for line in stdout.splitlines():
        match = re.match(r"^(SERVER|CLIENT) \S+\s+(.*?)\s+status=", line)
        if match:
            key = (match[1], match[2])
            out[key] = out.get(key, 0) + 1
    return out


def test_secrets_never_leave_tapwire(cgroup, tapwire, otlp_receiver, tmp_path):
    seed = "tw" + secrets.token_hex(12)
    # A control: exported on purpose (as user_agent.original), so it must be found where spans go.
    canary = "canary" + secrets.token_hex(8)
    cg = cgroup("redaction")
    service = procs.start_http_service(
        lambda port: [sys.executable, "-m", "uvicorn", "secrets_app:app", "--app-dir",
                      str(procs.APPS_DIR), "--host", "127.0.0.1", "--port", port, "--http", "h11",
                      "--no-access-log", "--log-level", "warning"],
        tmp_path, "secrets-app", cgroup=cg, env={"SECRET_SEED": seed}, hosts=("127.0.0.1",))
    try:
        grpc_url, http_url = otlp_receiver.grpc_endpoint, otlp_receiver.http_endpoint
        common = {"TAPWIRE_LOG": "debug", "OTEL_BSP_SCHEDULE_DELAY": "200",
                  "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
        prometheus_port = procs.free_port()
        agents = [
            tapwire([cg], label="tapwire-grpc-traces", env={
                **common, "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": grpc_url,
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
                "OTEL_METRICS_EXPORTER": "otlp,prometheus",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{http_url}/v1/metrics",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf"},
                args=["--prometheus-listen", f"127.0.0.1:{prometheus_port}"]),
            tapwire([cg], label="tapwire-http-traces", env={
                **common, "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{http_url}/v1/traces",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": grpc_url,
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}),
            tapwire([cg], label="tapwire-console", args=["--exporter", "console"],
                    env={**common, "OTEL_METRICS_EXPORTER": "console"}),
        ]

        session = requests.Session()
        session.trust_env = False
        for _ in range(CALLS):
            answer = session.get(
                f"{service.base_url}/forward",
                params={"port": service.port, "token": f"{seed}-srv-query"},
                headers={"User-Agent": f"redaction-test/{canary}",
                         "Authorization": f"Bearer {seed}-srv-authorization",
                         "Proxy-Authorization": f"Basic {seed}-srv-proxy-authorization",
                         "Cookie": f"sid={seed}-srv-cookie",
                         "X-Api-Key": f"{seed}-srv-x-api-key"},
                timeout=10)
            assert answer.status_code == 200, answer.text
            # The secrets really crossed the wire, both ways.
            assert seed in answer.headers["Set-Cookie"]
            login = answer.json()["login"]
            assert all(login["headers"][h].count(seed) == 1 for h in SECRET_HEADERS), login
            assert seed in login["query"] and seed in login["body"] and seed in login["token"]
            assert seed in answer.json()["set_cookie"]
        session.close()

        # Each OTLP agent exports 3 spans per call; wait for them and a few metric pushes.
        spans = otlp_receiver.wait_for_spans(2 * 3 * CALLS, SPANS_TIMEOUT_S, settle=1.5)
        scraped = scrape(prometheus_port).text
        deadline = time.monotonic() + SPANS_TIMEOUT_S
        while console_spans(agents[2].stdout()) != CONSOLE_SPANS and time.monotonic() < deadline:
            time.sleep(0.2)
        for agent in agents:
            assert agent.stop() == 0, agent.diagnostics()
    finally:
        service.stop()

    # Not vacuous: every span is there, query strings present but redacted.
    by_route = {}
    for span in spans:
        key = (span["transport"], span["kind_name"], span["attributes"].get("url.path")
               or span["attributes"].get("url.full"))
        by_route[key] = by_route.get(key, 0) + 1
    full = f"http://127.0.0.1:{service.port}/login?REDACTED"
    assert by_route == {(t, kind, what): CALLS for t in ("grpc", "http")
                        for kind, what in (("SERVER", "/forward"), ("SERVER", "/login"),
                                           ("CLIENT", full))}, by_route
    assert all(s["attributes"].get("url.query", "REDACTED") == "REDACTED" for s in spans)
    assert console_spans(agents[2].stdout()) == CONSOLE_SPANS, agents[2].stdout()[-3000:]
    assert "tapwire_agent_spans_total" in scraped
    assert otlp_receiver.metric_requests(), "no metrics were exported"
    assert {r.transport for r in otlp_receiver.trace_requests()} == {"grpc", "http"}
    assert {r.transport for r in otlp_receiver.metric_requests()} == {"grpc", "http"}

    # The search: the seed must appear nowhere.
    outputs = {f"raw OTLP {r.transport} {r.signal} request #{i}": r.raw
               for i, r in enumerate(otlp_receiver.received())}
    assert all(outputs.values()), "the receiver kept no raw bytes"
    outputs["Prometheus scrape"] = scraped.encode()
    for agent in agents:
        outputs[f"{agent.label} stdout"] = agent.stdout().encode()
        outputs[f"{agent.label} stderr"] = agent.stderr().encode()
    assert any(b"DEBUG" in out for out in outputs.values()), "debug logs were not on"
    found = sorted(name.split(" #")[0] for name, out in outputs.items() if canary.encode() in out)
    assert {"raw OTLP grpc traces request", "raw OTLP http traces request"} <= set(found), \
        f"the control was found only in {found}"
    leaks = {name: out.count(seed.encode()) for name, out in outputs.items()
             if seed.encode() in out}
    assert leaks == {}, f"secrets found in: {leaks}"
    print(f"searched {len(outputs)} outputs, {sum(len(o) for o in outputs.values())} bytes, "
          f"for the seed of {len(SECRET_HEADERS) * 2 + 6} planted secrets: none found")
