"""Real HTTP clients for the tests (curl and Python requests), recording what a span should show.

Each call returns an Exchange: what was sent (method, path, headers), what came back (status, the
handler's own timing from the JSON body) and the client-side view: the client's measured duration
and the client's local port, which the server sees as network.peer.port.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import time
import urllib.parse

import requests

CURL_MARKER = "\n@@tapwire-e2e@@ "
REQUEST_TIMEOUT_S = 10


@dataclasses.dataclass
class TraceParent:
    trace_id: str  # 32 lowercase hex digits, not all zero
    parent_id: str  # 16 lowercase hex digits, not all zero

    @classmethod
    def random(cls) -> "TraceParent":
        while True:
            trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
            if int(trace_id, 16) and int(parent_id, 16):
                return cls(trace_id, parent_id)

    @property
    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-01"


@dataclasses.dataclass
class Exchange:
    client: str  # "curl" or "requests"
    method: str
    url: str
    path: str  # path only, what url.path must be
    user_agent: str
    traceparent: TraceParent | None
    status: int
    body: dict
    client_ns: int  # client-measured duration of the whole exchange
    wall_start_ns: int  # time.time_ns() just before the client started
    wall_end_ns: int  # time.time_ns() just after it finished
    local_port: int  # the client's ephemeral port, i.e. the server's peer port

    @property
    def handler_ns(self) -> int:
        return int(self.body.get("handler_ns", 0))

    @property
    def delay_ms(self) -> int:
        return int(self.body.get("delay_ms", 0))

    def describe(self) -> str:
        tp = f" traceparent={self.traceparent.header}" if self.traceparent else ""
        return (f"{self.client} {self.method} {self.url} -> {self.status} "
                f"client={self.client_ns / 1e6:.3f}ms handler={self.handler_ns / 1e6:.3f}ms "
                f"port={self.local_port}{tp}")


def _headers(user_agent: str, traceparent: TraceParent | None) -> dict[str, str]:
    headers = {"User-Agent": user_agent}
    if traceparent is not None:
        headers["traceparent"] = traceparent.header
    return headers


def curl_get(url: str, user_agent: str, traceparent: TraceParent | None = None) -> Exchange:
    """GET with the curl binary, one connection per call. The duration is curl's own time_total
    (microsecond resolution), which spans name lookup to the last byte received."""
    argv = ["curl", "--silent", "--show-error", "--http1.1", "--noproxy", "*",
            "--max-time", str(REQUEST_TIMEOUT_S), "--output", "-",
            "--write-out", CURL_MARKER + "%{http_code} %{time_total} %{local_port}"]
    for name, value in _headers(user_agent, traceparent).items():
        argv += ["--header", f"{name}: {value}"]
    argv.append(url)
    wall_start = time.time_ns()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S + 5)
    wall_end = time.time_ns()
    if done.returncode != 0 or CURL_MARKER not in done.stdout:
        raise AssertionError(f"curl {url} failed with {done.returncode}: {done.stderr.strip()}")
    body, trailer = done.stdout.rsplit(CURL_MARKER, 1)
    status, time_total, local_port = trailer.split()
    return Exchange("curl", "GET", url, urllib.parse.urlsplit(url).path, user_agent, traceparent,
                    int(status), json.loads(body), round(float(time_total) * 1e9),
                    wall_start, wall_end, int(local_port))


class RequestsClient:
    """Python requests with one keep-alive Session (several requests share a connection)."""

    def __init__(self) -> None:
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies from the environment: loopback only

    def get(self, url: str, user_agent: str, traceparent: TraceParent | None = None) -> Exchange:
        wall_start = time.time_ns()
        start = time.perf_counter_ns()
        response = self.session.get(url, headers=_headers(user_agent, traceparent),
                                    timeout=REQUEST_TIMEOUT_S, stream=True)
        # While streaming, the pooled connection is still attached to the response.
        local_port = response.raw._connection.sock.getsockname()[1]
        content = response.content
        client_ns = time.perf_counter_ns() - start
        wall_end = time.time_ns()
        return Exchange("requests", "GET", url, urllib.parse.urlsplit(url).path, user_agent,
                        traceparent, response.status_code, json.loads(content), client_ns,
                        wall_start, wall_end, local_port)

    def close(self) -> None:
        self.session.close()
