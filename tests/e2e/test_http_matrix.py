"""HTTP/1.x in full, end to end: real servers x real clients, every span checked against what
the client actually sent and got back.

Servers (each in its own cgroup, started once per module, with its own tapwire watching it):

    fastapi  uvicorn (asyncio loop, h11)                 recvfrom / sendto
    flask    gunicorn gthread, 1 worker x 4 threads      recvfrom / sendto
    node     Node.js `http`                              read / write / writev
    go       Go net/http, built here from apps/goserver  read / write
    rawmsg   apps/matrix_raw.py --io msg                 recvmsg / sendmsg
    rawvec   apps/matrix_raw.py --io vec                 readv / writev
    nginx    static files, `return`, reverse proxy       recvfrom / writev / sendfile
             (to a Go upstream in a second selected cgroup: HTTP/1.0, a connection per request,
             to 127.0.0.1; and HTTP/1.1 keep-alive to [::1])

all offering GET /hello, GET /items/<n> (JSON), GET /fail (500), GET /missing (404), GET /big
(5 MiB; HEAD too), GET /stream (chunked), POST /echo (nginx: only /hello, /items, /fail,
/missing, /big) on 127.0.0.1 and [::1], same port.

Clients (outside every selected cgroup, so they yield no span of their own): curl, Python
requests and httpx (one keep-alive connection per plan), Node.js fetch, wrk, and raw sockets
(pipelining). For CLIENT spans, the same clients run inside a selected cgroup against the Go
server, and nginx's proxy is checked against its upstream.

Every request carries a unique User-Agent, so each span is paired with exactly one request;
counts are exact, attributes are compared with the values the client observed (status, body
bytes, its own port), and durations with the client's own measurement.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import cgroupfs
import procs
from otlp_receiver import OtlpReceiver, SpansTimeout

APPS = procs.APPS_DIR
BIG_SIZE = 5 * 1024 * 1024  # GET /big
ECHO_SIZE = 100 * 1024  # POST /echo
V4, V6 = "127.0.0.1", "::1"

SPANS_TIMEOUT_S = 10  # the spans of one test must all arrive within this (export delay 200 ms)
SETTLE_S = 1.0  # after the expected number arrived, wait this long to see that no extra arrives
# Kernel timestamps lie inside the client's own measurement; 1 ms covers curl's microsecond
# time_total rounding and the agent's clock conversion (as in test_foundation.py).
TIMING_TOLERANCE_NS = 1_000_000
# Span start/end are unix-epoch ns and must fall inside the client's wall-clock window, give or
# take this much: catches boot-time-vs-epoch mix-ups without depending on clock-mapping precision.
WALL_CLOCK_TOLERANCE_NS = 100_000_000

WRK_THREADS = 2  # wrk -t2 -c2: one connection per thread ...
WRK_PER_CONNECTION = 250  # ... each stopped by apps/wrk_stop.lua after exactly this many responses
WRK_DURATION_S = 2  # wrk's main thread sleeps this long whatever happens (gunicorn needs ~0.3 s)

SERVERS = ["fastapi", "flask", "node", "go", "rawmsg", "rawvec", "nginx"]
# Servers with application endpoints (POST /echo, chunked GET /stream): nginx has them only
# behind its proxy.
APP_SERVERS = [s for s in SERVERS if s != "nginx"]
STREAM_SIZE = 33  # GET /stream: 3 chunks of 11 bytes
IO_PATHS = {
    "fastapi": "recvfrom/sendto", "flask": "recvfrom/sendto", "node": "read/write/writev",
    "go": "read/write", "rawmsg": "recvmsg/sendmsg", "rawvec": "readv/writev",
    "nginx": "recvfrom/writev/sendfile",
}
CLIENTS = ["curl", "requests", "httpx", "node-fetch"]


def stacks(*names: str):
    """Parametrizes a test over server stacks; module scope, so each stack starts once."""
    return pytest.mark.parametrize("stack", list(names), indirect=True, scope="module")


# ---- what was sent and what must be seen ---------------------------------------------------------

@dataclasses.dataclass
class Req:
    """One planned request. `host` is what the URL names (an IP or a name)."""

    method: str
    target: str  # path and query, as sent
    user_agent: str | None
    host: str = V4
    body_size: int = 0
    expect_continue: bool = False  # curl only: send `Expect: 100-continue`
    http10_no_host: bool = False  # raw client only: HTTP/1.0 without a Host header

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def has_query(self) -> bool:
        return "?" in self.target

    def url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}{self.target}"

    def host_header(self, port: int) -> str | None:
        if self.http10_no_host:
            return None
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


@dataclasses.dataclass
class Sent:
    """A request as the client saw it go out and come back."""

    client: str
    req: Req
    port: int  # the server port it went to
    status: int
    body_len: int  # response body bytes received
    local_port: int | None  # the client's ephemeral port (None: the client does not tell)
    peer_ip: str  # the address the client connected to
    client_ns: int | None  # client-measured duration of the whole exchange
    wall_start_ns: int
    wall_end_ns: int

    def describe(self) -> str:
        return (f"{self.client} {self.req.method} {self.req.url(self.port)} "
                f"UA={self.req.user_agent!r} -> {self.status} body={self.body_len}B "
                f"port={self.local_port} client={(self.client_ns or 0) / 1e6:.3f}ms")


def expected_route(path: str) -> str:
    """The contract's heuristic, for the paths this module uses (ids are all-digit segments)."""
    return "/".join("{id}" if seg.isdigit() else seg for seg in path.split("/"))


def is_int(value) -> bool:
    return type(value) is int


def check_timing(span: dict, sent: Sent) -> list[str]:
    problems = []
    if not 0 < span["start_ns"] <= span["end_ns"]:
        problems.append(f"start {span['start_ns']} / end {span['end_ns']} not ordered")
    if sent.client_ns is not None and \
            span["duration_ns"] > sent.client_ns + TIMING_TOLERANCE_NS:
        problems.append(f"duration {span['duration_ns'] / 1e6:.3f} ms > client-measured "
                        f"{sent.client_ns / 1e6:.3f} ms")
    if not (sent.wall_start_ns - WALL_CLOCK_TOLERANCE_NS <= span["start_ns"]
            <= span["end_ns"] <= sent.wall_end_ns + WALL_CLOCK_TOLERANCE_NS):
        problems.append(f"start/end {span['start_ns']}/{span['end_ns']} outside the client's "
                        f"wall-clock window {sent.wall_start_ns}..{sent.wall_end_ns}")
    return problems


def check_server_span(span: dict, sent: Sent, *, path: str | None = None,
                      protocol: str = "1.1", timing: bool = True) -> list[str]:
    """Everything the contract says about a SERVER span. `path` overrides the request's own (an
    upstream behind nginx sees the path without nginx's prefix)."""
    req = sent.req
    path = path or req.path
    route = expected_route(path)
    attrs = span["attributes"]
    expected = {
        "http.request.method": req.method,
        "http.route": route,
        "url.path": path,
        "url.scheme": "http",
        "http.response.status_code": sent.status,
        "server.port": sent.port,
        "client.address": sent.peer_ip,  # on loopback the client's source = the server's address
        "network.peer.address": sent.peer_ip,
        "network.protocol.version": protocol,
        "http.response.body.size": sent.body_len,
    }
    if req.method == "HEAD":
        # No body is transferred; the Content-Length describes what a GET would return. 0 or
        # no attribute both say that.
        del expected["http.response.body.size"]
    if sent.local_port is not None:
        expected["network.peer.port"] = sent.local_port
    if req.user_agent is not None:
        expected["user_agent.original"] = req.user_agent
    if req.body_size:
        expected["http.request.body.size"] = req.body_size
    problems = []
    if span["kind_name"] != "SERVER":
        problems.append(f"kind {span['kind_name']}, expected SERVER")
    if span["name"] != f"{req.method} {route}":
        problems.append(f"name {span['name']!r}, expected {req.method + ' ' + route!r}")
    for key, value in expected.items():
        if attrs.get(key) != value:
            problems.append(f"{key}={attrs.get(key)!r}, expected {value!r}")
        elif isinstance(value, int) and not is_int(attrs[key]):
            problems.append(f"{key} must be an int attribute, got {type(attrs[key]).__name__}")
    if req.method == "HEAD" and attrs.get("http.response.body.size", 0) != 0:
        problems.append(f"http.response.body.size={attrs['http.response.body.size']!r} on a "
                        f"HEAD response, which has no body")
    if not req.body_size and attrs.get("http.request.body.size", 0) != 0:
        problems.append(f"http.request.body.size={attrs['http.request.body.size']!r} on a "
                        f"request without body")
    if req.user_agent is None and "user_agent.original" in attrs:
        problems.append(f"user_agent.original={attrs['user_agent.original']!r}, the request "
                        f"had no User-Agent")
    if req.has_query:
        if attrs.get("url.query") != "REDACTED":
            problems.append(f"url.query={attrs.get('url.query')!r}, expected 'REDACTED'")
    elif "url.query" in attrs:
        problems.append(f"url.query={attrs['url.query']!r} on a request without query")
    leaked = [k for k, v in attrs.items() if isinstance(v, str) and "s3cr3t" in v]
    if leaked:
        problems.append(f"the query's secret leaked into {leaked}")
    if sent.status >= 500:
        if span["status_name"] != "ERROR":
            problems.append(f"status {span['status_name']}, expected ERROR for {sent.status}")
        if attrs.get("error.type") != str(sent.status):
            problems.append(f"error.type={attrs.get('error.type')!r}, "
                            f"expected {str(sent.status)!r}")
    else:
        if span["status_name"] != "UNSET":
            problems.append(f"status {span['status_name']}, expected UNSET for {sent.status}")
        if "error.type" in attrs:
            problems.append(f"error.type={attrs['error.type']!r} on a {sent.status}")
    if timing:
        problems += check_timing(span, sent)
    return problems


def check_client_span(span: dict, sent: Sent, *, target: str, host_header: str | None,
                      peer_ip: str, peer_port: int, timing: bool = True) -> list[str]:
    """Everything the contract says about a CLIENT span of a request to `target` carrying
    `host_header` (None: no Host header), sent to peer_ip:peer_port."""
    attrs = span["attributes"]
    if host_header is None:
        address, authority = peer_ip, (f"[{peer_ip}]" if ":" in peer_ip else peer_ip) + \
            f":{peer_port}"
    else:
        authority = host_header
        address = re.sub(r":\d+$", "", host_header).strip("[]")
    query = "?REDACTED" if "?" in target else ""
    expected = {
        "http.request.method": sent.req.method,
        "server.address": address,
        "server.port": peer_port,
        "url.full": f"http://{authority}{target.split('?', 1)[0]}{query}",
        "http.response.status_code": sent.status,
        "network.peer.address": peer_ip,
        "network.peer.port": peer_port,
    }
    problems = []
    if span["kind_name"] != "CLIENT":
        problems.append(f"kind {span['kind_name']}, expected CLIENT")
    if span["name"] != sent.req.method:
        problems.append(f"name {span['name']!r}, expected {sent.req.method!r}")
    for key, value in expected.items():
        if attrs.get(key) != value:
            problems.append(f"{key}={attrs.get(key)!r}, expected {value!r}")
        elif isinstance(value, int) and not is_int(attrs[key]):
            problems.append(f"{key} must be an int attribute, got {type(attrs[key]).__name__}")
    leaked = [k for k, v in attrs.items() if isinstance(v, str) and "s3cr3t" in v]
    if leaked:
        problems.append(f"the query's secret leaked into {leaked}")
    wanted = "ERROR" if sent.status >= 400 else "UNSET"
    if span["status_name"] != wanted:
        problems.append(f"status {span['status_name']}, expected {wanted} for {sent.status}")
    if timing:
        problems += check_timing(span, sent)
    return problems


def contains(outer: dict, inner: dict) -> bool:
    """outer's [start, end] contains inner's, on the same clock and with no slack."""
    return outer["start_ns"] <= inner["start_ns"] <= inner["end_ns"] <= outer["end_ns"]


def span_window(span: dict) -> str:
    return (f"{span['kind_name']} {span['name']!r} [{span['start_ns']}, {span['end_ns']}] "
            f"({span['duration_ns'] / 1e6:.3f} ms)")


# ---- clients -------------------------------------------------------------------------------------

CURL_FORMAT = "%{http_code} %{size_download} %{local_port} %{time_total} %{remote_ip}"


def _run(argv: list[str], cgroup: Path | None, timeout: float = 60) -> str:
    """Runs argv (inside `cgroup` when given) and returns its stdout; fails on a non-zero exit."""
    env = procs.base_env({"NO_PROXY": "*", "no_proxy": "*"})
    if cgroup is None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
        out, err, code = done.stdout, done.stderr, done.returncode
    else:
        proc = cgroupfs.popen_in_cgroup(cgroup, argv, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        text=True)
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    if code != 0:
        raise AssertionError(f"client failed with {code}: {' '.join(argv)[:300]}\n{err[-2000:]}")
    return out


def run_client(client: str, plan: list[Req], port: int, tmp: Path,
               cgroup: Path | None = None) -> list[Sent]:
    """Sends `plan` with one client, in order, and returns what the client saw."""
    if client == "curl":
        return [_curl(req, port, tmp, cgroup) for req in plan]
    if client == "node-fetch":
        argv = [node_binary(), str(APPS / "matrix_fetch.mjs"),
                json.dumps({"requests": [_plan_entry(r, port) for r in plan]})]
    else:  # requests, httpx, raw (apps/matrix_client.py)
        entries = [_plan_entry(r, port) for r in plan]
        if client == "raw":
            entries = [{"host": r.host, "port": port, "payload": _raw_payload(r)} for r in plan]
        argv = [sys.executable, str(APPS / "matrix_client.py"),
                json.dumps({"client": client, "requests": entries})]
    wall_start = time.time_ns()
    results = json.loads(_run(argv, cgroup))
    wall_end = time.time_ns()
    assert len(results) == len(plan), f"{client}: {len(results)} results for {len(plan)} requests"
    sent = []
    for req, res in zip(plan, results):
        peer = res.get("remote_ip") or req.host
        sent.append(Sent(client, req, port, res["status"], res["body_len"], res["local_port"],
                         peer, res["client_ns"], res.get("wall_start_ns") or wall_start,
                         res.get("wall_end_ns") or wall_end))
    return sent


def _plan_entry(req: Req, port: int) -> dict:
    headers = {"User-Agent": req.user_agent} if req.user_agent else {}
    return {"method": req.method, "url": req.url(port), "headers": headers,
            "body_size": req.body_size}


def _raw_payload(req: Req) -> str:
    assert req.http10_no_host, "the raw client sends HTTP/1.0 without Host only"
    ua = f"User-Agent: {req.user_agent}\r\n" if req.user_agent else ""
    return f"{req.method} {req.target} HTTP/1.0\r\n{ua}\r\n"


def _curl(req: Req, port: int, tmp: Path, cgroup: Path | None) -> Sent:
    argv = ["curl", "--silent", "--show-error", "--http1.1", "--noproxy", "*", "--globoff",
            "--max-time", "20", "--output", "/dev/null", "--write-out", CURL_FORMAT]
    if req.user_agent:
        argv += ["--user-agent", req.user_agent]
    if req.body_size:
        body = tmp / f"body-{req.body_size}"
        if not body.exists():
            body.write_bytes(b"x" * req.body_size)
        argv += ["--data-binary", f"@{body}", "--header", "Content-Type: application/octet-stream",
                 "--header", "Expect: 100-continue" if req.expect_continue else "Expect:"]
    if req.method not in ("GET", "POST"):
        argv += ["--request", req.method]
    argv.append(req.url(port))
    wall_start = time.time_ns()
    out = _run(argv, cgroup)
    wall_end = time.time_ns()
    status, size, local_port, total, remote_ip = out.split()
    return Sent("curl", req, port, int(status), int(size), int(local_port), remote_ip,
                round(float(total) * 1e9), wall_start, wall_end)


def node_binary() -> str:
    found = shutil.which("node") or ("/usr/bin/node" if os.path.exists("/usr/bin/node") else None)
    if not found:
        pytest.fail("node (Node.js 20) is needed for the Node server and fetch client",
                    pytrace=False)
    return found


def read_http_responses(sock: socket.socket, count: int, timeout: float = 10) -> list[tuple]:
    """Reads `count` Content-Length-framed responses: [(status, body_len)]."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"server closed after {len(out)} of {count} responses")
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        assert match, f"response without Content-Length: {head!r}"
        length = int(match.group(1))
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                raise AssertionError("server closed in the middle of a body")
            rest += data
        out.append((status, length))
        buf = rest[length:]
    return out


# ---- stacks: servers + their agent ---------------------------------------------------------------

@dataclasses.dataclass
class Stack:
    name: str
    server: procs.ServiceProcess
    agent: procs.TapwireProcess
    cgroups: list[Path]
    upstream: procs.ServiceProcess | None = None  # nginx's proxy target (Go)
    client_cgroup: Path | None = None  # go: clients started here are watched too

    @property
    def port(self) -> int:
        return self.server.port

    def diagnostics(self) -> str:
        parts = [self.agent.diagnostics(), self.server.diagnostics()]
        if self.upstream is not None:
            parts.append(self.upstream.diagnostics())
        return "\n".join(parts)


@pytest.fixture(scope="module")
def receiver():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("http-matrix")


@pytest.fixture(scope="module")
def go_server_binary(workdir) -> Path:
    """apps/goserver built with the stdlib only, caches in the temp dir."""
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    if not os.path.exists(go):
        pytest.fail("the Go toolchain is missing: `cargo xtask setup` installs golang-go",
                    pytrace=False)
    out = workdir / "goserver"
    env = procs.base_env({"GOFLAGS": "-mod=mod", "GOCACHE": str(workdir / "gocache"),
                          "GOPATH": str(workdir / "gopath"), "CGO_ENABLED": "0",
                          "GOTOOLCHAIN": "local"})
    done = subprocess.run([go, "build", "-o", str(out), "."], cwd=APPS / "goserver", env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"go build failed:\n{done.stdout}\n{done.stderr}"
    return out


def _server_argv(name: str, port: int, go_binary: Path, workdir: Path,
                 upstream_port: int | None = None) -> list:
    both = ["--host", V4, "--host", V6]
    if name == "fastapi":
        return [sys.executable, APPS / "matrix_fastapi.py", "--port", port, *both]
    if name == "flask":
        return [sys.executable, "-m", "gunicorn", "--chdir", APPS, "--worker-class", "gthread",
                "--workers", "1", "--threads", "4", "--keep-alive", "30",
                "--bind", f"{V4}:{port}", "--bind", f"[{V6}]:{port}", "matrix_flask:app"]
    if name == "node":
        return [node_binary(), APPS / "matrix_node.js", port, V4, V6]
    if name == "go":
        return [go_binary, "-listen", f"{V4}:{port}", "-listen", f"[{V6}]:{port}"]
    if name in ("rawmsg", "rawvec"):
        return [sys.executable, APPS / "matrix_raw.py", "--io", name[3:], "--port", port, *both]
    if name == "nginx":
        return ["nginx", "-p", workdir / "nginx", "-e", workdir / "nginx" / "error.log",
                "-c", _nginx_conf(workdir, port, upstream_port)]
    raise ValueError(name)


NGINX_CONF = """\
# nginx of tapwire's HTTP matrix test: static files (sendfile), `return`, reverse proxy.
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_timeout 30s;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream tapwire_pooled {{
        server [::1]:{up};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port};
        listen [::1]:{port};
        root {dir}/www;
        location = /hello {{ default_type application/json; }}
        location = /big {{ }}
        location ~ ^/items/(\\d+)$ {{
            default_type application/json;
            return 200 '{{"id":$1}}';
        }}
        location = /fail {{
            default_type application/json;
            return 500 '{{"error":"injected failure"}}';
        }}
        # nginx's default upstream protocol: HTTP/1.0, a connection per request, Host from
        # proxy_pass.
        location /direct/ {{ proxy_pass http://127.0.0.1:{up}/; }}
        # HTTP/1.1 with pooled keep-alive connections over IPv6, and a Host of our choosing.
        location /pooled/ {{
            proxy_pass http://tapwire_pooled/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host tapwire-upstream:{up};
        }}
    }}
}}
"""


def _nginx_conf(workdir: Path, port: int, upstream_port: int | None) -> Path:
    assert upstream_port is not None
    base = workdir / "nginx"
    (base / "www").mkdir(parents=True, exist_ok=True)
    (base / "www" / "hello").write_bytes(b'{"hello":"world"}')
    big = base / "www" / "big"
    if not big.exists():
        big.write_bytes(b"0123456789abcdef" * (BIG_SIZE // 16))
    conf = base / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=base, port=port, up=upstream_port))
    return conf


@pytest.fixture(scope="module")
def stack(request, tapwire_bin, cgroup2_root, receiver, workdir, go_server_binary):
    """The server stack named by the test's parameter, started once, with tapwire watching it
    (its cgroups only) and exporting over OTLP/gRPC to the module's receiver."""
    name = request.param
    created: list[Path] = []
    services: list[procs.ServiceProcess] = []
    agent = None

    def new_cgroup(role: str) -> Path:
        path = cgroupfs.create(f"tapwire-e2e-matrix-{role}-{os.getpid()}", cgroup2_root)
        created.append(path)
        return path

    try:
        log_dir = workdir / name
        cg = new_cgroup(name)
        upstream = client_cg = None
        watched = [cg]
        if name == "nginx":
            up_cg = new_cgroup("nginx-upstream")
            watched.append(up_cg)
            upstream = procs.start_http_service(
                lambda p: _server_argv("go", p, go_server_binary, workdir), log_dir,
                "upstream-go", cgroup=up_cg)
            services.append(upstream)
        if name == "go":
            client_cg = new_cgroup("go-clients")
            watched.append(client_cg)
        server = procs.start_http_service(
            lambda p: _server_argv(name, p, go_server_binary, workdir,
                                   upstream.port if upstream else None),
            log_dir, name, cgroup=cg)
        services.append(server)
        agent = procs.TapwireProcess(tapwire_bin, [str(c) for c in watched],
                                     procs.base_env(receiver.exporter_env("grpc")), log_dir,
                                     label=f"tapwire-{name}")
        agent.start()
        yield Stack(name, server, agent, watched, upstream, client_cg)
    finally:
        stop_error = None
        if agent is not None and agent.proc is not None:
            try:
                agent.stop()
            except AssertionError as err:  # hung: killed; still clean up the rest
                stop_error = str(err)
        for service in reversed(services):
            service.stop()
        for path in reversed(created):
            cgroupfs.remove(path)
    assert stop_error is None, stop_error
    assert agent.returncode == 0, \
        f"tapwire-{name} exited with {agent.returncode} after SIGTERM\n{agent.diagnostics()}"


class Scenario:
    """One test's view: a cleared receiver, unique user agents, and a bounded wait for spans."""

    def __init__(self, stack: Stack, receiver: OtlpReceiver, tmp: Path, test: str):
        self.stack, self.receiver, self.tmp, self.test = stack, receiver, tmp, test
        self._serial = 0
        self.stale: list[dict] = []
        receiver.clear()
        self.t0 = time.time_ns()

    def ua(self, client: str) -> str:
        self._serial += 1
        return f"tapwire-matrix/{self.stack.name}/{self.test}/{client}/{self._serial}"

    def spans(self, expected: int, timeout: float = SPANS_TIMEOUT_S) -> list[dict]:
        """Waits (bounded) for `expected` spans, then SETTLE_S more; returns every span received
        since the test began. Too few is reported by the callers' checks, with the evidence."""
        try:
            self.receiver.wait_for_spans(expected, timeout, settle=SETTLE_S)
        except SpansTimeout:
            pass
        spans = self.receiver.spans()
        # Late spans of an earlier test (it ended before this one began) are set aside and shown
        # if this test fails.
        self.stale = [s for s in spans if s["end_ns"] < self.t0]
        return [s for s in spans if s["end_ns"] >= self.t0]

    def fail_if(self, problems: list[str], headline: str = "") -> None:
        if problems and self.stale:
            problems.append(f"(also received {len(self.stale)} spans that ended before this "
                            f"test began, set aside; they are in the list below)")
        assert not problems, self.receiver.describe(
            f"{self.stack.name} ({IO_PATHS[self.stack.name]}): {headline}{len(problems)} "
            f"problems:\n  "
            + "\n  ".join(problems[:80]), self.stack.agent.diagnostics, max_spans=80)


@pytest.fixture
def scenario(request, stack, receiver, tmp_path, attach_log) -> Scenario:
    attach_log(f"stack {stack.name} logs", stack.diagnostics)
    return Scenario(stack, receiver, tmp_path, request.node.originalname)


def pair_by_user_agent(spans: list[dict], sent: list[Sent], kind: str = "SERVER",
                       port: int | None = None) -> tuple[list[tuple[Sent, dict]], list[str]]:
    """Pairs each request with the one `kind` span carrying its User-Agent (on `port`)."""
    problems, pairs = [], []
    mine = [s for s in spans if s["kind_name"] == kind
            and (port is None or s["attributes"].get("server.port") == port)]
    by_ua: dict[str, list[dict]] = {}
    for span in mine:
        by_ua.setdefault(span["attributes"].get("user_agent.original"), []).append(span)
    for item in sent:
        found = by_ua.pop(item.req.user_agent, [])
        if len(found) != 1:
            problems.append(f"{item.describe()}: {len(found)} {kind} spans, expected 1")
            continue
        pairs.append((item, found[0]))
    for ua, extra in by_ua.items():
        problems.append(f"{len(extra)} unexpected {kind} spans with user_agent.original={ua!r}: "
                        + ", ".join(f"{s['name']!r} url.path={s['attributes'].get('url.path')!r}"
                                    for s in extra[:5]))
    return pairs, problems


def check_all_server_spans(scenario: Scenario, sent: list[Sent], spans: list[dict],
                           protocol: str = "1.1") -> list[str]:
    """Exact count per (route, status), exactly one span per request, every span's contents."""
    stack = scenario.stack
    problems = []
    if len(spans) != len(sent):
        problems.append(f"{len(spans)} spans in all for {len(sent)} requests")
    others = [s for s in spans if not (s["kind_name"] == "SERVER"
                                       and s["attributes"].get("server.port") == stack.port)]
    if others:
        problems.append(f"{len(others)} spans that are not SERVER spans of port {stack.port}: "
                        + "; ".join(f"{s['kind_name']} {s['name']!r}" for s in others[:5]))
    want = Counter((expected_route(s.req.path), s.status) for s in sent)
    got = Counter((s["attributes"].get("http.route"), s["attributes"].get(
        "http.response.status_code")) for s in spans if s["kind_name"] == "SERVER")
    if want != got:
        problems.append(f"spans per (http.route, status): {dict(got)}, expected {dict(want)}")
    pairs, pair_problems = pair_by_user_agent(spans, sent, port=stack.port)
    problems += pair_problems
    for item, span in pairs:
        problems += [f"{item.describe()}: {p}"
                     for p in check_server_span(span, item, protocol=protocol)]
    return problems


def api_plan(scenario: Scenario, client: str, host: str = V4) -> list[Req]:
    """The common API: /hello, two /items/<n> (one with a query), /fail (500), /missing (404)."""
    return [Req("GET", "/hello", scenario.ua(client), host),
            Req("GET", "/items/101", scenario.ua(client), host),
            Req("GET", "/items/102?token=s3cr3t&page=2", scenario.ua(client), host),
            Req("GET", "/fail", scenario.ua(client), host),
            Req("GET", "/missing", scenario.ua(client), host)]


def assert_statuses(sent: list[Sent]) -> None:
    """The servers themselves must behave, or no span check means anything."""
    for item in sent:
        path = item.req.path
        want = 500 if path.endswith("/fail") else 404 if path.endswith("/missing") else 200
        assert item.status == want, f"the service misbehaved: {item.describe()}, expected {want}"
        if path.endswith("/big") and item.req.method == "GET":
            assert item.body_len == BIG_SIZE, f"the service misbehaved: {item.describe()}"
        if item.req.method == "HEAD":
            assert item.body_len == 0, f"a HEAD response with a body: {item.describe()}"
        if path.endswith("/stream"):
            assert item.body_len == STREAM_SIZE, f"the service misbehaved: {item.describe()}"
        if path.endswith("/echo"):
            assert item.body_len == item.req.body_size, f"echo misbehaved: {item.describe()}"


# ---- server x client matrix ----------------------------------------------------------------------

@stacks(*SERVERS)
@pytest.mark.parametrize("client", CLIENTS)
def test_api_matrix(stack, client, scenario):
    """Each client sends /hello, /items/<n>, /items/<n>?query, /fail, /missing (keep-alive
    where the client does it): one exactly right SERVER span per request, names with routes."""
    sent = run_client(client, api_plan(scenario, client), stack.port, scenario.tmp)
    assert_statuses(sent)
    spans = scenario.spans(len(sent))
    scenario.fail_if(check_all_server_spans(scenario, sent, spans))


@stacks(*SERVERS)
def test_keepalive_one_span_per_request(stack, scenario):
    """Six requests on one requests.Session connection: six spans, one peer port, in order."""
    plan = [Req("GET", f"/items/{200 + i}" if i % 2 else "/hello", scenario.ua("requests"))
            for i in range(6)]
    sent = run_client("requests", plan, stack.port, scenario.tmp)
    assert_statuses(sent)
    ports = {s.local_port for s in sent}
    assert len(ports) == 1, f"requests did not keep one connection: ports {ports}"
    scenario.fail_if(check_one_connection(scenario, sent))


def check_one_connection(scenario: Scenario, sent: list[Sent]) -> list[str]:
    """Requests sent one after another on one connection: every span right, and the spans
    follow each other in request order without overlapping."""
    spans = scenario.spans(len(sent))
    problems = check_all_server_spans(scenario, sent, spans)
    pairs, _ = pair_by_user_agent(spans, sent, port=scenario.stack.port)
    if len(pairs) == len(sent):
        for (a, first), (b, second) in zip(pairs, pairs[1:]):
            if first["end_ns"] > second["start_ns"]:
                problems.append(f"{a.req.method} {a.req.target} span ends after the next request "
                                f"({b.req.method} {b.req.target}) span starts: "
                                f"{span_window(first)} vs {span_window(second)}")
    return problems


@stacks(*SERVERS)
def test_head_keepalive(stack, scenario):
    """HEAD announces a Content-Length but carries no body: on a keep-alive connection, HEAD
    /big, GET /items/<n>, HEAD /hello, GET /hello give four right spans (a parser that waited
    for the announced 5 MiB would swallow the next responses)."""
    plan = [Req("HEAD", "/big", scenario.ua("requests")),
            Req("GET", "/items/801", scenario.ua("requests")),
            Req("HEAD", "/hello", scenario.ua("requests")),
            Req("GET", "/hello", scenario.ua("requests"))]
    sent = run_client("requests", plan, stack.port, scenario.tmp)
    assert_statuses(sent)
    assert len({s.local_port for s in sent}) == 1, [s.describe() for s in sent]
    scenario.fail_if(check_one_connection(scenario, sent))


@stacks(*APP_SERVERS)
def test_chunked_keepalive(stack, scenario):
    """Chunked responses (3 chunks, 5 ms apart) between others on one keep-alive connection:
    each span ends with its last chunk, http.response.body.size is the payload (33 bytes)."""
    plan = [Req("GET", "/stream", scenario.ua("requests")),
            Req("GET", "/items/802", scenario.ua("requests")),
            Req("GET", "/stream", scenario.ua("requests")),
            Req("GET", "/hello", scenario.ua("requests"))]
    sent = run_client("requests", plan, stack.port, scenario.tmp)
    assert_statuses(sent)
    assert len({s.local_port for s in sent}) == 1, [s.describe() for s in sent]
    problems = check_one_connection(scenario, sent)
    streams = [span for span in scenario.receiver.spans()
               if span["attributes"].get("url.path") == "/stream"]
    # Two 5 ms pauses separate the first chunk from the last; 8 ms leaves room for timers that
    # fire a little early (libuv), while a span ended at the first chunk lasts well under 1 ms.
    short = [span_window(span) for span in streams if span["duration_ns"] < 8_000_000]
    if short:
        problems.append(f"/stream spans shorter than the pauses between its first and last "
                        f"chunk (ended before the last chunk?): {short}")
    scenario.fail_if(problems)


@stacks(*SERVERS)
def test_pipelining(stack, scenario):
    """Three GETs in one write on one raw connection, three responses read back: three spans,
    in request order (start and end times non-decreasing), one peer port."""
    items = [301, 302, 303]
    uas = [scenario.ua("pipeline") for _ in items]
    payload = b"".join(f"GET /items/{n} HTTP/1.1\r\nHost: {V4}:{stack.port}\r\n"
                       f"User-Agent: {ua}\r\n\r\n".encode() for n, ua in zip(items, uas))
    wall_start, start = time.time_ns(), time.perf_counter_ns()
    with socket.create_connection((V4, stack.port), timeout=10) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(payload)  # one send() of all three requests
        responses = read_http_responses(sock, len(items))
        client_ns = time.perf_counter_ns() - start
    wall_end = time.time_ns()
    assert [r[0] for r in responses] == [200] * 3, f"the service misbehaved: {responses}"
    sent = [Sent("pipeline", Req("GET", f"/items/{n}", ua), stack.port, status, length,
                 local_port, V4, client_ns, wall_start, wall_end)
            for n, ua, (status, length) in zip(items, uas, responses)]
    spans = scenario.spans(len(sent))
    problems = check_all_server_spans(scenario, sent, spans)
    pairs, _ = pair_by_user_agent(spans, sent, port=stack.port)
    if len(pairs) == len(sent):
        ordered = [span for _, span in pairs]
        starts = [s["start_ns"] for s in ordered]
        ends = [s["end_ns"] for s in ordered]
        if starts != sorted(starts) or ends != sorted(ends):
            problems.append("spans not in request order: " +
                            ", ".join(f"{s['attributes'].get('url.path')} "
                                      f"[{s['start_ns']}, {s['end_ns']}]" for s in ordered))
    scenario.fail_if(problems)


@stacks(*SERVERS)
def test_ipv6_loopback(stack, scenario):
    """curl and requests over [::1]: client.address and network.peer.address are ::1."""
    sent = run_client("curl", [Req("GET", "/items/401", scenario.ua("curl"), V6),
                               Req("GET", "/fail", scenario.ua("curl"), V6)],
                      stack.port, scenario.tmp)
    sent += run_client("requests", [Req("GET", "/hello", scenario.ua("requests"), V6),
                                    Req("GET", "/items/402?token=s3cr3t", scenario.ua("requests"),
                                        V6)], stack.port, scenario.tmp)
    assert_statuses(sent)
    assert {s.peer_ip for s in sent} == {V6}, [s.describe() for s in sent]
    spans = scenario.spans(len(sent))
    scenario.fail_if(check_all_server_spans(scenario, sent, spans))


@stacks(*SERVERS)
def test_big_response(stack, scenario):
    """GET /big (5 MiB; nginx: sendfile) with curl: http.response.body.size is exact and the
    span lasts no longer than curl measured."""
    sent = run_client("curl", [Req("GET", "/big", scenario.ua("curl"))], stack.port,
                      scenario.tmp)
    assert_statuses(sent)
    spans = scenario.spans(len(sent))
    scenario.fail_if(check_all_server_spans(scenario, sent, spans))


@stacks(*APP_SERVERS)
@pytest.mark.parametrize("client", ["requests", "curl-expect-100"])
def test_post_echo(stack, client, scenario):
    """POST /echo with a 100 KiB body (curl: with `Expect: 100-continue`, so the server first
    sends an interim 100): one span, exact request and response body sizes."""
    kind = "curl" if client.startswith("curl") else client
    plan = [Req("POST", "/echo", scenario.ua(client), body_size=ECHO_SIZE,
                expect_continue=client == "curl-expect-100")]
    sent = run_client(kind, plan, stack.port, scenario.tmp)
    assert_statuses(sent)
    spans = scenario.spans(len(sent))
    scenario.fail_if(check_all_server_spans(scenario, sent, spans))


@stacks(*SERVERS)
def test_wrk_exact_count(stack, scenario):
    """wrk -t2 -c2, each thread stopped by apps/wrk_stop.lua after exactly 250 responses on its
    one connection: 500 spans, 250 per connection, all `GET /hello` 200."""
    sizing = run_client("curl", [Req("GET", "/hello", scenario.ua("curl"))], stack.port,
                        scenario.tmp)
    assert_statuses(sizing)
    hello_size = sizing[0].body_len
    wall_start = time.time_ns()
    done = subprocess.run(
        ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_THREADS}", f"-d{WRK_DURATION_S}s",
         "-s", str(APPS / "wrk_stop.lua"), f"http://{V4}:{stack.port}/hello"],
        capture_output=True, text=True, timeout=WRK_DURATION_S + 30,
        env=procs.base_env({"WRK_LIMIT": str(WRK_PER_CONNECTION)}), stdin=subprocess.DEVNULL)
    wall_end = time.time_ns()
    assert done.returncode == 0, f"wrk failed:\n{done.stdout}\n{done.stderr}"
    match = re.search(r"(\d+) requests in", done.stdout)
    assert match, f"no request count in wrk's output:\n{done.stdout}"
    completed = int(match.group(1))
    expected = WRK_THREADS * WRK_PER_CONNECTION
    assert completed == expected, (f"wrk completed {completed} requests, expected {expected} "
                                   f"(the server was too slow for {WRK_DURATION_S} s?)\n"
                                   f"{done.stdout}")
    assert "Non-2xx" not in done.stdout and "Socket errors" not in done.stdout, done.stdout

    spans = scenario.spans(completed + 1, timeout=20)
    problems = check_all_server_spans(scenario, sizing, [
        s for s in spans if s["attributes"].get("user_agent.original")])
    wrk_spans = [s for s in spans if not s["attributes"].get("user_agent.original")]
    if len(wrk_spans) != completed:
        problems.append(f"{len(wrk_spans)} spans for wrk's {completed} completed requests")
    per_port = Counter(s["attributes"].get("network.peer.port") for s in wrk_spans)
    if sorted(per_port.values()) != [WRK_PER_CONNECTION] * WRK_THREADS:
        problems.append(f"wrk spans per connection (peer port): {dict(per_port)}, expected "
                        f"{WRK_THREADS} connections x {WRK_PER_CONNECTION}")
    shapes = Counter((s["kind_name"], s["name"], s["attributes"].get("url.path"),
                      s["attributes"].get("http.response.status_code"),
                      s["attributes"].get("http.response.body.size"),
                      s["attributes"].get("server.port")) for s in wrk_spans)
    want = ("SERVER", "GET /hello", "/hello", 200, hello_size, stack.port)
    if set(shapes) - {want}:
        problems.append(f"wrk spans that are not {want}: "
                        f"{ {k: v for k, v in shapes.items() if k != want} }")
    outside = [s for s in wrk_spans if not (wall_start - WALL_CLOCK_TOLERANCE_NS <= s["start_ns"]
                                            <= s["end_ns"] <= wall_end + WALL_CLOCK_TOLERANCE_NS)]
    if outside:
        problems.append(f"{len(outside)} wrk spans outside wrk's wall-clock window")
    scenario.fail_if(problems, f"wrk: {completed} requests; ")


# ---- nginx reverse proxy: SERVER -> CLIENT -> upstream SERVER ------------------------------------

@stacks("nginx")
@pytest.mark.parametrize("route", ["direct", "pooled"])
def test_nginx_proxy(stack, route, scenario):
    """Requests through nginx to a Go upstream in another selected cgroup. /direct: HTTP/1.0, a
    connection per request, to 127.0.0.1; /pooled: HTTP/1.1 keep-alive to [::1] with Host
    tapwire-upstream:PORT. Per request: exactly one nginx SERVER span, one nginx CLIENT span and
    one upstream SERVER span, the CLIENT inside the nginx SERVER, the upstream SERVER inside the
    CLIENT (same clock, no slack)."""
    up = stack.upstream
    assert up is not None
    upstream_ip = V4 if route == "direct" else V6
    host_header = f"{V4}:{up.port}" if route == "direct" else f"tapwire-upstream:{up.port}"
    protocol = "1.0" if route == "direct" else "1.1"
    plan = [Req("GET", f"/{route}/items/501", scenario.ua("requests")),
            Req("GET", f"/{route}/items/502?token=s3cr3t", scenario.ua("requests")),
            Req("GET", f"/{route}/fail", scenario.ua("requests")),
            Req("GET", f"/{route}/missing", scenario.ua("requests")),
            Req("POST", f"/{route}/echo", scenario.ua("requests"), body_size=ECHO_SIZE)]
    sent = run_client("requests", plan, stack.port, scenario.tmp)
    assert_statuses(sent)
    spans = scenario.spans(3 * len(sent))

    problems = []
    nginx_server = [s for s in spans if s["kind_name"] == "SERVER"
                    and s["attributes"].get("server.port") == stack.port]
    upstream_server = [s for s in spans if s["kind_name"] == "SERVER"
                       and s["attributes"].get("server.port") == up.port]
    clients = [s for s in spans if s["kind_name"] == "CLIENT"]
    counts = (len(nginx_server), len(clients), len(upstream_server), len(spans))
    if counts != (len(sent), len(sent), len(sent), 3 * len(sent)):
        problems.append(f"nginx SERVER / CLIENT / upstream SERVER / all spans: {counts}, "
                        f"expected {len(sent)} / {len(sent)} / {len(sent)} / {3 * len(sent)}")

    outer_pairs, outer_problems = pair_by_user_agent(nginx_server, sent, port=stack.port)
    problems += [f"nginx: {p}" for p in outer_problems]
    inner_pairs, inner_problems = pair_by_user_agent(upstream_server, sent, port=up.port)
    problems += [f"upstream: {p}" for p in inner_problems]
    outer = {item.req.user_agent: span for item, span in outer_pairs}
    inner = {item.req.user_agent: span for item, span in inner_pairs}
    for item in sent:
        upstream_target = item.req.target[len(route) + 1:]
        label = item.describe()
        if item.req.user_agent in outer:
            problems += [f"{label}: nginx SERVER: {p}"
                         for p in check_server_span(outer[item.req.user_agent], item)]
        upstream_view = dataclasses.replace(
            item, port=up.port, local_port=None, peer_ip=upstream_ip, client_ns=None)
        if item.req.user_agent in inner:
            problems += [f"{label}: upstream SERVER: {p}" for p in check_server_span(
                inner[item.req.user_agent], upstream_view, path=upstream_target.split("?")[0],
                protocol=protocol)]
        wanted_url = f"/{upstream_target.split('?')[0]}"
        found = [c for c in clients
                 if re.sub(r"^http://[^/]+", "", str(c["attributes"].get("url.full", "")))
                 .split("?")[0] == upstream_target.split("?")[0]]
        if len(found) != 1:
            problems.append(f"{label}: {len(found)} CLIENT spans for the upstream request "
                            f"{upstream_target}, expected 1 (url.full ending in {wanted_url!r})")
            continue
        client_span = found[0]
        problems += [f"{label}: nginx CLIENT: {p}" for p in check_client_span(
            client_span, upstream_view, target=upstream_target, host_header=host_header,
            peer_ip=upstream_ip, peer_port=up.port)]
        if item.req.user_agent in outer and not contains(outer[item.req.user_agent], client_span):
            problems.append(f"{label}: nginx SERVER {span_window(outer[item.req.user_agent])} "
                            f"does not contain its CLIENT {span_window(client_span)}")
        if item.req.user_agent in inner and not contains(client_span, inner[item.req.user_agent]):
            problems.append(f"{label}: nginx CLIENT {span_window(client_span)} does not contain "
                            f"the upstream SERVER {span_window(inner[item.req.user_agent])}")
    scenario.fail_if(problems)


# ---- CLIENT spans of watched clients -------------------------------------------------------------

def client_span_plan(scenario: Scenario, client: str) -> list[Req]:
    if client == "raw-http10":  # HTTP/1.0 without Host: server.address falls back to the peer
        return [Req("GET", "/items/601?token=s3cr3t", scenario.ua(client), V4,
                    http10_no_host=True),
                Req("GET", "/missing", scenario.ua(client), V4, http10_no_host=True)]
    # Host: localhost:PORT for curl/requests/httpx; fetch connects to IP literals only, so the
    # test knows the peer address.
    named = "localhost" if client != "node-fetch" else V4
    return [Req("GET", "/items/602?token=s3cr3t", scenario.ua(client), V4),
            Req("GET", "/missing", scenario.ua(client), named),
            Req("GET", "/fail", scenario.ua(client), V6),
            Req("POST", "/echo", scenario.ua(client), V4, body_size=ECHO_SIZE)]


@stacks("go")
@pytest.mark.parametrize("client", CLIENTS + ["raw-http10"])
def test_client_spans(stack, client, scenario):
    """The client runs inside a selected cgroup and calls the (also selected) Go server: one
    CLIENT span per request with server.address from the Host header (else the peer address),
    url.full with the query redacted, ERROR from 400 on, and containing the server's span."""
    assert stack.client_cgroup is not None
    kind = "raw" if client == "raw-http10" else client
    sent = run_client(kind, client_span_plan(scenario, client), stack.port, scenario.tmp,
                      cgroup=stack.client_cgroup)
    assert_statuses(sent)
    spans = scenario.spans(2 * len(sent))

    problems = []
    clients = [s for s in spans if s["kind_name"] == "CLIENT"]
    servers = [s for s in spans if s["kind_name"] == "SERVER"]
    if (len(clients), len(servers), len(spans)) != (len(sent), len(sent), 2 * len(sent)):
        problems.append(f"CLIENT / SERVER / all spans: {len(clients)} / {len(servers)} / "
                        f"{len(spans)}, expected {len(sent)} / {len(sent)} / {2 * len(sent)}")
    server_pairs, server_problems = pair_by_user_agent(servers, sent, port=stack.port)
    problems += [f"Go SERVER: {p}" for p in server_problems]
    protocol = "1.0" if client == "raw-http10" else "1.1"
    for item, span in server_pairs:
        problems += [f"{item.describe()}: Go SERVER: {p}"
                     for p in check_server_span(span, item, protocol=protocol)]
    server_of = {item.req.user_agent: span for item, span in server_pairs}
    for item in sent:
        found = [c for c in clients
                 if c["attributes"].get("network.peer.port") == stack.port
                 and re.sub(r"^http://[^/]+", "", str(c["attributes"].get("url.full", "")))
                 .split("?")[0] == item.req.path]
        if len(found) != 1:
            problems.append(f"{item.describe()}: {len(found)} CLIENT spans with url.full path "
                            f"{item.req.path!r} to port {stack.port}, expected 1")
            continue
        problems += [f"{item.describe()}: CLIENT: {p}" for p in check_client_span(
            found[0], item, target=item.req.target, host_header=item.req.host_header(stack.port),
            peer_ip=item.peer_ip, peer_port=stack.port)]
        server_span = server_of.get(item.req.user_agent)
        if server_span is not None and not contains(found[0], server_span):
            problems.append(f"{item.describe()}: CLIENT {span_window(found[0])} does not "
                            f"contain the server's {span_window(server_span)}")
    scenario.fail_if(problems)
