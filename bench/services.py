"""The services under test, each in its own cgroup on CPU_SERVICE, started before any agent (their
readiness requests are real HTTP requests)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import procs
from harness import CPU_SERVICE, ROOT, Harness, Proc, wait_http_ok

APPS_DIR = ROOT / "bench" / "apps"
STATIC_FILE = "f512.bin"
STATIC_BYTES = 512

# The OpenTelemetry Python SDK in zero-code mode, as its documentation sets it up: traces and
# metrics over OTLP/gRPC (to the bench's receiver), FastAPI instrumentation found by the distro,
# default sampler (always on) and batch span processor. Logs export is off: the receiver has no
# logs service, and tapwire exports no logs either.
SDK_ENV = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_LOGS_EXPORTER": "none",
}


@dataclass
class Service:
    proc: Proc
    port: int
    cgroup: Path
    name: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_seed(h: Harness, cgroup: str, service_name: str,
               sdk_env: dict[str, str] | None = None) -> Service:
    """uvicorn + bench/apps/seed.py, one worker; under `opentelemetry-instrument` with sdk_env."""
    venv_bin = Path(sys.executable).parent
    port = procs.free_port()
    argv = [sys.executable, "-m", "uvicorn", "seed:app", "--app-dir", str(APPS_DIR),
            "--host", "127.0.0.1", "--port", str(port), "--http", "h11", "--loop", "asyncio",
            "--no-access-log", "--log-level", "warning"]
    env = {"OTEL_SERVICE_NAME": service_name,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    if sdk_env is not None:
        argv = [str(venv_bin / "opentelemetry-instrument"), *argv]
        env.update(SDK_ENV)
        env.update(sdk_env)
    proc = h.spawn(service_name, argv, cgroup, CPU_SERVICE, env=env)
    wait_http_ok(proc, port, "/hello")
    return Service(proc, port, h.cgroup(cgroup), service_name)


NGINX_CONF = """\
# nginx of `cargo xtask bench`: one worker, a {size} B static file, keep-alive, no access log.
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {logdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    client_body_temp_path {dir}/nginx-tmp/body;
    proxy_temp_path {dir}/nginx-tmp/proxy;
    fastcgi_temp_path {dir}/nginx-tmp/fastcgi;
    uwsgi_temp_path {dir}/nginx-tmp/uwsgi;
    scgi_temp_path {dir}/nginx-tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/html;
        location / {{ }}
    }}
}}
"""


def start_nginx(h: Harness, cgroup: str) -> Service:
    """nginx (master + 1 worker) serving STATIC_FILE, with its config under the bench's workdir."""
    base = h.tempdir("nginx")
    (base / "html").mkdir()
    (base / "html").chmod(0o755)
    (base / "nginx-tmp").mkdir()
    static = base / "html" / STATIC_FILE
    static.write_bytes(bytes((i * 7 + 13) % 251 for i in range(STATIC_BYTES)))
    static.chmod(0o644)
    port = procs.free_port()
    conf = base / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=base, logdir=h.workdir, port=port, size=STATIC_BYTES))
    proc = h.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(base), "-e",
                             str(h.workdir / "nginx-error.log")], cgroup, CPU_SERVICE)
    wait_http_ok(proc, port, f"/{STATIC_FILE}")
    return Service(proc, port, h.cgroup(cgroup), "nginx")


def start_idle(h: Harness, cgroup: str) -> Service:
    """A service that gets no traffic (Python's http.server): what tapwire watches while it
    should leave nginx alone."""
    port = procs.free_port()
    proc = h.spawn("idle", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                            str(port), "--directory", str(APPS_DIR)], cgroup, CPU_SERVICE)
    wait_http_ok(proc, port, "/seed.py")
    return Service(proc, port, h.cgroup(cgroup), "idle")
